"""Train a GPT on 2+ ranks with memtune choosing FSDP2 or DDP and recompute per rank.

    torchrun --standalone --nproc_per_node 2 examples/torchrun_gpt.py [--budget 9MB] [--steps 20]

Each rank feeds its own shard of every global batch; the budget is per device. Rank 0 prints
the plan and the global loss (the mean of the ranks' local losses). On CPU the ranks talk over
gloo; on GPUs over NCCL, each on cuda:LOCAL_RANK.
"""

from __future__ import annotations

import argparse

import torch
import torch.distributed as dist

import memtune
from memtune.data import TextCorpus
from memtune.zoo import GPT, GPTConfig


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--budget", default="9MB", help="per device")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--local-batch", type=int, default=4)
    args = ap.parse_args()
    torch.manual_seed(0)  # the same initial weights on every rank
    model = GPT(GPTConfig(n_layer=4, n_embd=128, n_head=2, block_size=32))
    trainer = memtune.fit(model, budget=args.budget, optimizer="adamw", progress=False)
    rank, world = dist.get_rank(), dist.get_world_size()  # fit initialized the process group
    corpus = TextCorpus.load()
    gen = torch.Generator().manual_seed(0)  # the same global batches on every rank ...
    batches = []
    for _ in range(args.steps):
        x, y = corpus.batch("train", args.local_batch * world, 32, generator=gen)
        lo = rank * args.local_batch  # ... of which each rank takes its own shard
        batches.append((x[lo:lo + args.local_batch], y[lo:lo + args.local_batch]))
    trainer.train(batches, steps=args.steps)
    if rank == 0:
        print(trainer.plan.summary())
        print("global loss:", " ".join(f"{h['loss']:.3f}" for h in trainer.history))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
