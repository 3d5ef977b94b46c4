"""Muon² (its 3 Newton-Schulz steps) against torch.optim.Muon (5 steps): wall-clock time to a
target validation loss, trained side by side, beside the Muon² paper's figures.

The paper (arXiv 2604.09967) reports that Muon² needs about 40% fewer Newton-Schulz iterations
than Muon for the same loss, and up to 25% less training time. Here, on text nothing was tuned
on (CPython's standard-library docstrings, benchmarks/muon2_corpora.py "heldout"):

    models     byte-level GPTs of benchmarks/muon2_train.py, "small" 4×128 and "large" 4×192,
               context 128, batch 8, 200 steps, the same warm-down schedule for both
    rows       torch.optim.Muon K=5 (bf16 NS, its only choice) on the hidden matrices, and
               memtune's Muon² K=3 with the defaults of OptimizerSettings (bf16 NS, Gram
               scaling, tuned schedule); both at lr 0.02, the same AdamW (lr 1e-3) on
               embeddings, head and norms
    side by side  the two runs of a seed share one process and alternate step by step, so
               load from other jobs falls on both alike; only forward, backward and the
               optimizer step are timed, not the evaluations
    target     per seed, torch Muon's validation loss after its 200 steps (8 batches of
               16×128 every 10 steps); each run's time to target is the training time at the
               first evaluation at or below it, interpolated linearly between evaluations

Reports steps and seconds to target per seed, the median ratio Muon²/Muon over seeds, and the
optimizer step's share of the step. Writes benchmarks/results/muon2_time_to_loss.json.

    python benchmarks/muon2_time_to_loss.py               # 5 seeds × 2 sizes, ~6 min on 2 cores
    python benchmarks/muon2_time_to_loss.py --seeds 2 --sizes small
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import _record  # noqa: E402
import muon2_corpora  # noqa: E402
from muon2_train import SIZES, evaluate, lr_factor  # noqa: E402

from memtune.optim import OptimizerSettings, build_optimizer, split_parameters  # noqa: E402
from memtune.optim.hybrid import HybridOptimizer  # noqa: E402
from memtune.zoo import GPT  # noqa: E402

LR, ADAMW_LR, STEPS, EVAL_EVERY, EVAL_BATCHES = 0.02, 1e-3, 200, 10, 8
PAPER = {"ns_iterations": "about 40% fewer than Muon", "training_time": "up to 25% less than Muon"}


def make_optimizer(model: torch.nn.Module, row: str) -> torch.optim.Optimizer:
    if row == "muon2":
        return build_optimizer(model, OptimizerSettings(name="muon2", lr=LR, adamw_lr=ADAMW_LR, ns_steps=3))
    # torch.optim.Muon on exactly the matrices Muon² gets; memtune's AdamW part on the rest.
    settings = OptimizerSettings(name="muon", lr=LR, adamw_lr=ADAMW_LR, ns_steps=5)
    hybrid = build_optimizer(model, settings)
    params = dict(model.named_parameters())
    muon = torch.optim.Muon([params[f] for f in split_parameters(model, settings).muon], lr=LR,
                            momentum=settings.momentum, nesterov=settings.nesterov, ns_steps=5,
                            weight_decay=settings.weight_decay, adjust_lr_fn="original")
    return HybridOptimizer({"muon": muon, "adamw": hybrid.parts["adamw"]})


class Run:
    """One model and optimizer stepping through the seed's data, timed per step."""

    def __init__(self, row: str, corpus, size, seed: int, curve_set):
        torch.manual_seed(seed)
        self.row, self.model = row, GPT(size.config())
        self.opt = make_optimizer(self.model, row)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lambda s: lr_factor(s, STEPS))
        self.batches = corpus.batches("train", size.batch_size, size.block_size, seed=1000 + seed)
        self.curve_set, self.train_s, self.opt_ms, self.curve = curve_set, 0.0, [], []

    def step(self, step: int) -> None:
        x, y = next(self.batches)
        t0 = time.perf_counter()
        self.model(x, y).backward()
        t1 = time.perf_counter()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.train_s += time.perf_counter() - t0
        self.opt_ms.append((time.perf_counter() - t1) * 1e3)
        self.sched.step()
        if step % EVAL_EVERY == 0:
            self.curve.append((step, evaluate(self.model, self.curve_set), self.train_s))

    def to_target(self, target: float) -> tuple[float, float] | None:
        """(steps, seconds) at which the curve first reaches ``target``, interpolated."""
        prev = (0, float("inf"), 0.0)
        for point in self.curve:
            if point[1] <= target:
                if prev[1] == float("inf"):
                    return float(point[0]), point[2]
                f = (prev[1] - target) / (prev[1] - point[1])
                return prev[0] + f * (point[0] - prev[0]), prev[2] + f * (point[2] - prev[2])
            prev = point
        return None


def seed_pair(corpus, size, seed: int) -> dict:
    curve_set = corpus.eval_batches(16, size.block_size, EVAL_BATCHES)
    runs = {row: Run(row, corpus, size, seed, curve_set) for row in ("muon", "muon2")}
    order = list(runs.values())
    for step in range(1, STEPS + 1):
        for run in order if step % 2 else order[::-1]:   # alternate who goes first
            run.step(step)
    target = runs["muon"].curve[-1][1]
    out = {"seed": seed, "target": target}
    for row, run in runs.items():
        reached = run.to_target(target)
        out[row] = {"final_val": run.curve[-1][1], "train_s": run.train_s,
                    "opt_ms_median": statistics.median(run.opt_ms[5:]),
                    "step_ms_median": run.train_s / STEPS * 1e3,
                    "steps_to_target": reached[0] if reached else None,
                    "seconds_to_target": reached[1] if reached else None, "curve": run.curve}
    m, m2 = out["muon"], out["muon2"]
    out["time_ratio"] = m2["seconds_to_target"] / m["seconds_to_target"] if m2["seconds_to_target"] else None
    out["steps_ratio"] = m2["steps_to_target"] / m["steps_to_target"] if m2["steps_to_target"] else None
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--sizes", nargs="+", default=["small", "large"], choices=sorted(SIZES))
    args = ap.parse_args()
    torch.set_num_threads(2)
    # Subnormal second moments made CPU steps 2-3x slower (benchmarks/muon2.py); flushing them
    # to zero changes nothing measurable in the losses.
    torch.set_flush_denormal(True)
    corpus, info = muon2_corpora.load("heldout")
    out = {"environment": _record.environment(), "corpus": info, "paper": PAPER, "steps": STEPS, "lr": LR,
           "adamw_lr": ADAMW_LR, "sizes": {}}
    for name in args.sizes:
        size = SIZES[name]
        pairs = []
        for seed in range(args.seeds):
            pairs.append(seed_pair(corpus, size, seed))
            p = pairs[-1]
            print(f"{name} seed {seed}: target {p['target']:.4f}; Muon² reaches it at step "
                  f"{p['muon2']['steps_to_target'] or float('nan'):.0f} ({p['time_ratio'] or float('nan'):.2f}x Muon's time); "
                  f"final {p['muon2']['final_val']:.4f}", flush=True)
        reached = [p for p in pairs if p["time_ratio"] is not None]
        summary = {
            "seeds": len(pairs), "seeds_reached": len(reached),
            "time_ratio_median": statistics.median(p["time_ratio"] for p in reached) if reached else None,
            "steps_ratio_median": statistics.median(p["steps_ratio"] for p in reached) if reached else None,
            "final_val_delta_mean": statistics.mean(p["muon2"]["final_val"] - p["muon"]["final_val"] for p in pairs),
            "opt_ms": {row: statistics.median(p[row]["opt_ms_median"] for p in pairs) for row in ("muon", "muon2")},
            "step_ms": {row: statistics.median(p[row]["step_ms_median"] for p in pairs) for row in ("muon", "muon2")},
        }
        out["sizes"][name] = {"pairs": pairs, "summary": summary}
    print(f"\n{'size':<6} {'seeds reached':>13} {'steps ratio':>11} {'time ratio':>10} {'Δ final val':>11} "
          f"{'opt ms Muon / Muon²':>20} {'step ms Muon / Muon²':>21}")
    for name, r in out["sizes"].items():
        s = r["summary"]
        print(f"{name:<6} {s['seeds_reached']:>6} of {s['seeds']:<4} {s['steps_ratio_median'] or float('nan'):>11.3f} "
              f"{s['time_ratio_median'] or float('nan'):>10.3f} {s['final_val_delta_mean']:>+11.4f} "
              f"{s['opt_ms']['muon']:>9.2f} / {s['opt_ms']['muon2']:<8.2f} {s['step_ms']['muon']:>9.2f} / {s['step_ms']['muon2']:<8.2f}")
    print(f"paper: NS iterations {PAPER['ns_iterations']} (here 3 vs 5: 40% fewer); training time {PAPER['training_time']}")
    path = Path(__file__).resolve().parent / "results" / "muon2_time_to_loss.json"
    path.write_text(json.dumps(out, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
