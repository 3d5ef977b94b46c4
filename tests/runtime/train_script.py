"""A training run driven as a subprocess by the kill -9 / SIGTERM tests.

    python train_script.py CKPT_PATH STEPS [--resume] [--sleep SECONDS] [--out WEIGHTS]

Deterministic on CPU (one thread, fixed seeds); writes a checkpoint every step and, when
done, the final weights to --out.
"""

import argparse
import time

import torch

import memtune
from memtune import zoo
from memtune.data import TextCorpus


def build():
    torch.manual_seed(0)
    return zoo.GPT(zoo.GPTConfig(n_layer=2, n_embd=64, n_head=2, block_size=64))


class Batches:
    """A deterministic, re-iterable loader."""

    def __init__(self, n):
        self.n = n
        self.corpus = TextCorpus.load()

    def __iter__(self):
        g = torch.Generator().manual_seed(1)
        for _ in range(self.n):
            yield self.corpus.batch("train", 8, 64, generator=g)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("ckpt")
    ap.add_argument("steps", type=int)
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--sleep", type=float, default=0.0)
    ap.add_argument("--out")
    args = ap.parse_args()
    torch.set_num_threads(1)
    kw = dict(checkpoint_path=args.ckpt, checkpoint_every=1, progress=False, device="cpu", metrics_path=args.ckpt + ".jsonl")
    model = build()
    if args.resume:
        trainer = memtune.Trainer.resume(args.ckpt, model, "1GB", **kw)
    else:
        trainer = memtune.fit(model, "1GB", **kw)
    loader = Batches(args.steps)
    if args.sleep:
        orig = trainer.step

        def slow_step(batch):
            loss = orig(batch)
            time.sleep(args.sleep)
            # Printed after the previous step's checkpoint is on disk.
            print(f"step {trainer.step_count}", flush=True)
            return loss
        trainer.step = slow_step
    trainer.train(loader, steps=args.steps)
    if args.out:
        torch.save(trainer.model.state_dict(), args.out)
    print(f"done {trainer.step_count} interrupted={trainer.interrupted}", flush=True)


if __name__ == "__main__":
    main()
