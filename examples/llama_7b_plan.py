"""Fit Llama-2-7B full-parameter training into a 24GB GPU, planned from a CPU-only machine,
then train a tiny Llama for real with the same kinds of plan.

    python examples/llama_7b_plan.py            # about 2 minutes on 2 CPU cores (the 7B profile)

1. Build Llama-2-7B shapes on the ``meta`` device (no memory) and profile one bf16-mixed
   training step for an H100 with fake tensors, with every default: the profile records each
   lever a plan may pull (bf16 weights, the optimizer step in backward, optimizer state in host
   memory, a chunked loss, state precision, recomputation).
2. Plan it for 24GB and 80GB with every default and print both plans: what fits, and what was
   traded for it (weight precision, in-backward stepping, offload traffic, predicted time).
3. Train a 2-layer Llama on real text for 20 CPU steps through ``memtune.fit`` at 35% of its
   unplanned peak, with bf16 weights (stochastic rounding) as in the 24GB plan; the planner
   adds what else it needs (state precision, recomputation). On a CPU target there is no
   device memory to offload to, and for this tiny model the in-backward step does not pay.
"""

from __future__ import annotations

import torch

import memtune
from memtune import zoo
from memtune.data import TextCorpus
from memtune.units_fmt import fmt_bytes


def main() -> None:
    with torch.device("meta"):
        big = zoo.llama_7b()
    ids = torch.zeros(1, 2048, dtype=torch.long, device="meta")
    prof = memtune.profile(big, {"input_ids": ids, "labels": ids}, precision="bf16-mixed", target="H100")
    print(f"Llama-2-7B on an H100, bf16-mixed, AdamW: unplanned peak {fmt_bytes(prof.baseline_peak_bytes)}, "
          f"{len(prof.units)} units, profiled in {prof.profile_seconds:.0f} s")
    for budget in ("24GB", "80GB"):
        try:
            plan = memtune.plan(prof, budget)
            print(f"\n{budget}:\n{plan.summary()}")
        except memtune.InfeasibleBudgetError as e:
            print(f"\n{budget}: infeasible: {e}")

    # A tiny Llama with the same levers, for real, on the CPU.
    corpus = TextCorpus.load()
    data = corpus.batches("train", 4, 64, seed=0)
    sample = next(data)
    batch = {"input_ids": sample[0], "labels": sample[1]}
    torch.manual_seed(0)
    small = zoo.hf_llama(hidden_size=64, intermediate_size=172, num_hidden_layers=2, num_attention_heads=2)
    tiny = memtune.profile(small, batch, optimizer="muon2", target="cpu")
    budget = int(tiny.baseline_peak_bytes * 0.35)
    trainer = memtune.fit(small, budget, sample=batch, device="cpu", progress=False,
                          planner_options=dict(levers={"weights": ("bf16-sr",)}))
    trainer.train(({"input_ids": x, "labels": y} for x, y in data), steps=20)
    p = trainer.plan
    print(f"\ntiny Llama in {fmt_bytes(budget)} (35% of its unplanned {fmt_bytes(tiny.baseline_peak_bytes)}): "
          f"weights {p.weights or 'fp32'}, optimizer step {'in' if p.optimizer_in_backward else 'after'} backward, "
          f"loss in {p.loss_chunks or 1} chunk(s), {len(p.recompute_units)} of {len(p.decisions)} blocks recomputed, "
          f"{p.optimizer.state_dtype} state; measured peak {fmt_bytes(max(h['peak_bytes'] for h in trainer.history))}, "
          f"loss {trainer.history[0]['loss']:.3f} -> {trainer.history[-1]['loss']:.3f}")


if __name__ == "__main__":
    main()
