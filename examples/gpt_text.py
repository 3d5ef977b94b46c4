"""memtune's main demo: profile -> plan -> fit a small GPT on real English text, on a CPU.

    make demo                      # or: python examples/gpt_text.py [--steps 150] [--budget 60MB]

1. Profile one training step of a byte-level GPT on fake tensors (no memory used).
2. Plan it for a budget of about half its unplanned peak: the planner picks which blocks
   to recompute, the Muon² Newton-Schulz steps, the optimizer-state precision and the
   micro-batching, for the best predicted speed that fits.
3. Train it with ``memtune.fit`` on the Python Language Reference text that ships with
   CPython (pydoc_data; PSF licence). On a CPU the budget applies to tracked tensor memory
   and is enforced: going over it raises an out-of-memory error, as on a GPU.
4. Report: validation loss before and after, measured against predicted peak, and the
   per-step metrics (runs/demo/metrics.jsonl) and plan (runs/demo/plan.json).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch

import memtune
from memtune import zoo
from memtune.data import SOURCE, TextCorpus
from memtune.units_fmt import fmt_bytes


@torch.no_grad()
def val_loss(model, corpus: TextCorpus, block: int) -> float:
    model.eval()
    losses = [float(model(x, y)) for x, y in corpus.eval_batches(16, block, n_batches=8)]
    model.train()
    return sum(losses) / len(losses)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--budget", default=None, help="memory budget, e.g. 60MB (default: half the unplanned peak)")
    ap.add_argument("--out", default="runs/demo")
    args = ap.parse_args()
    torch.manual_seed(0)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    corpus = TextCorpus.load()
    cfg = zoo.GPTConfig(n_layer=6, n_embd=192, n_head=6, block_size=128)
    model = zoo.GPT(cfg)
    batch = corpus.batch("train", 32, cfg.block_size, generator=torch.Generator().manual_seed(0))
    print(f"Corpus: {SOURCE}: {len(corpus.train) / 1e3:.0f} K training bytes")
    print(f"Model: GPT {cfg.n_layer} layers x {cfg.n_embd}, {sum(p.numel() for p in model.parameters()) / 1e6:.1f} M params\n")

    # 1. Profile (fake tensors: no memory, no compute).
    prof = memtune.profile(model, batch, optimizer="muon2", target="cpu")
    print(prof.summary(), "\n")

    # 2. Plan for the budget.
    budget = args.budget or f"{math.floor(prof.baseline_peak_bytes / 2 / 1e6)}MB"
    plan = memtune.plan(prof, budget, optimizer="muon2", device="cpu", allow_microbatching=True)
    print(f"Budget {budget}: unplanned peak {fmt_bytes(prof.baseline_peak_bytes)}")
    print(plan.summary(), "\n")
    plan.to_json(out / "plan.json")

    # 3. Fit.
    before = val_loss(model, corpus, cfg.block_size)
    trainer = memtune.fit(model, budget, device="cpu", metrics_path=out / "metrics.jsonl",
                          checkpoint_path=out / "checkpoint.pt", checkpoint_every=50)
    t0 = time.perf_counter()
    trainer.train(corpus.batches("train", 32, cfg.block_size, seed=1), steps=args.steps)
    minutes = (time.perf_counter() - t0) / 60
    after = val_loss(trainer.model, corpus, cfg.block_size)

    # 4. Report.
    peaks = [h["peak_bytes"] for h in trainer.history[1:]]
    measured = max(peaks)
    report = {
        "budget": budget, "usable_bytes": trainer.budget.usable_bytes, "unplanned_peak_bytes": prof.baseline_peak_bytes,
        "predicted_peak_bytes": trainer.plan.predicted_peak_bytes, "measured_peak_bytes": measured,
        "val_loss_before": round(before, 4), "val_loss_after": round(after, 4), "steps": trainer.step_count,
        "minutes": round(minutes, 2), "plan_changes": [(e["step"], e["kind"], e["reason"]) for e in trainer.events],
    }
    (out / "report.json").write_text(json.dumps(report, indent=2))
    print(f"\nValidation loss (bytes, nats): {before:.3f} -> {after:.3f} after {trainer.step_count} steps ({minutes:.1f} min)")
    print(f"Peak memory: measured {fmt_bytes(measured)}, predicted {fmt_bytes(trainer.plan.predicted_peak_bytes)}, "
          f"budget {fmt_bytes(trainer.budget.usable_bytes)}, unplanned {fmt_bytes(prof.baseline_peak_bytes)} "
          f"({1 - measured / prof.baseline_peak_bytes:.0%} less)")
    print(f"Plan changes: {len(trainer.events) - 1}; metrics in {out / 'metrics.jsonl'}, report in {out / 'report.json'}")

    # 5. Plots: per-unit memory, the memory/time frontier, and the run's timeline (report.md embeds them).
    from memtune.report import write_report

    write_report(out, plan=trainer.plan, profile=prof, run=out / "metrics.jsonl")
    print(f"Plots and summary in {out / 'report.md'}")


if __name__ == "__main__":
    main()
