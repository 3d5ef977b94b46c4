"""The critical batch size, measured two ways, and ``global_batch="auto"`` against fixed batches.

A byte-level GPT (2 layers × 64, context 64) on the repository's pydoc text
(:class:`memtune.data.TextCorpus`), trained through ``memtune.fit`` on the CPU, AdamW and
Muon², seeds 0-2. Parts, in one run:

    noise   B_noise over training, from the runtime's two-batch estimator (global batch 32,
            growth off): the gradient noise scale at 10 %, 50 % and 100 % of the steps
    sweep   fixed global batches 8, 16, 32, 64, learning rates by the square-root rule from
            their values at 16: steps, samples and seconds of training to the target
            validation loss. The direct measure of the critical batch: where doubling the
            batch stops halving the steps (McCandlish et al.'s S/S_min - 1 = (E/E_min - 1)^-1)
    auto    global_batch="auto" from 8 (warm-up 10, interval 10): seconds to the target,
            against the best fixed batch of the sweep, side by side in the same run

The target is the validation loss the batch-16 AdamW run of seed 0 reaches at step
``TARGET_STEP``. Validation: 8 fixed batches of 16 windows, every ``EVAL_EVERY`` steps (not
timed). Every run's wall time counts training only, including memtune's own work (profiling,
the re-profiles after a growth).

    python benchmarks/critical_batch.py            # ~15 min on 2 idle cores
    python benchmarks/critical_batch.py --quick    # a smoke run (1 seed, short), not a result

Writes benchmarks/results/critical_batch.json and prints the tables.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import _record  # noqa: E402

import memtune  # noqa: E402
from memtune import zoo  # noqa: E402
from memtune.data import TextCorpus  # noqa: E402
from memtune.optim import OptimizerSettings  # noqa: E402
from memtune.runtime.global_batch import AutoBatchConfig  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
CONFIG = dict(n_layer=2, n_embd=64, n_head=4, block_size=64)
BASE_BATCH = 16
LR = {"adamw": dict(adamw_lr=3e-3), "muon2": dict(lr=0.02, adamw_lr=3e-3)}
"""Learning rates at the base batch of 16 (AdamW: memtune's default; Muon²: its default)."""
SIZES = (8, 16, 32, 64)
TARGET_STEP = 150
EVAL_EVERY = 10


class Stream:
    """A re-iterable loader: 8-window batches of the training text, the same for every run of a seed."""

    def __init__(self, corpus: TextCorpus, seed: int, n: int):
        self.corpus, self.seed, self.n = corpus, seed, n

    def __iter__(self):
        g = torch.Generator().manual_seed(1000 + self.seed)
        for _ in range(self.n):
            yield self.corpus.batch("train", 8, CONFIG["block_size"], generator=g)


def settings(opt: str, batch: int) -> OptimizerSettings:
    scale = math.sqrt(batch / BASE_BATCH)
    return OptimizerSettings(name=opt, ns_dtype="fp32", **{k: v * scale for k, v in LR[opt].items()})


def val_loss(model, val) -> float:
    model.eval()
    with torch.no_grad():
        out = sum(float(model(x, y)) for x, y in val) / len(val)
    model.train()
    return out


def run(corpus, val, opt: str, seed: int, *, batch, max_samples: int, target: float | None,
        auto: AutoBatchConfig | None = None) -> dict:
    """Train until ``target`` (or ``max_samples``); the curve of (step, samples, seconds, val loss)."""
    torch.manual_seed(seed)
    model = zoo.GPT(zoo.GPTConfig(**CONFIG))
    start = auto.start if auto is not None else batch
    trainer = memtune.fit(model, "1GB", optimizer=opt, optimizer_settings=settings(opt, start), device="cpu",
                          progress=False, retune=False, global_batch="auto" if auto is not None else batch,
                          auto_batch=auto)
    loader = Stream(corpus, seed, max_samples // 8 + 1)
    curve, seconds, reached = [], 0.0, None
    while trainer.samples_seen + (trainer.local_batch or start) <= max_samples:
        t0 = time.perf_counter()
        trainer.train(loader, steps=trainer.step_count + EVAL_EVERY)
        seconds += time.perf_counter() - t0
        loss = val_loss(trainer.model, val)
        curve.append({"step": trainer.step_count, "samples": trainer.samples_seen, "seconds": round(seconds, 3),
                      "val_loss": round(loss, 4), "global_batch": trainer.history[-1].get("global_batch"),
                      "b_noise": trainer.history[-1].get("b_noise")})
        if target is not None and loss <= target and reached is None:
            reached = curve[-1]
            break
        if not math.isfinite(loss):
            break
    return {"opt": opt, "seed": seed, "batch": batch, "auto": auto is not None, "curve": curve, "reached": reached,
            "events": [e for e in trainer.events if e["kind"].startswith("global-batch")],
            "b_noise": [h.get("b_noise") for h in trainer.history]}


def noise_over_training(corpus, val, opt, seed, steps) -> dict:
    """B_noise along a fixed-batch run (the auto schedule's measurement, growth disabled)."""
    cfg = AutoBatchConfig(start=32, warmup_steps=10 ** 9)
    r = run(corpus, val, opt, seed, batch=32, max_samples=32 * steps, target=None, auto=cfg)
    b = r["b_noise"]

    def at(frac):
        window = [v for v in b[max(0, int(len(b) * frac) - 10):int(len(b) * frac) or 1] if v is not None]
        return statistics.median(window) if window else None
    return {"opt": opt, "seed": seed, "steps": len(b), "b_noise_10": at(0.1), "b_noise_50": at(0.5),
            "b_noise_100": at(1.0), "final_val_loss": r["curve"][-1]["val_loss"] if r["curve"] else None}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(2)
    seeds = (0,) if args.quick else (0, 1, 2)
    target_step = 40 if args.quick else TARGET_STEP
    noise_steps = 40 if args.quick else 200
    corpus = TextCorpus.load()
    val = corpus.eval_batches(16, CONFIG["block_size"], 8)
    t_all = time.perf_counter()

    ref = run(corpus, val, "adamw", 0, batch=BASE_BATCH, max_samples=BASE_BATCH * target_step, target=None)
    target = ref["curve"][-1]["val_loss"]
    print(f"target validation loss {target:.4f} (AdamW, batch {BASE_BATCH}, seed 0, step {ref['curve'][-1]['step']})")
    budget = 64 * target_step * 2  # samples: enough for the largest batch to reach it

    noise = [noise_over_training(corpus, val, opt, s, noise_steps) for opt in ("adamw", "muon2") for s in seeds]
    sweep, auto = [], []
    for seed in seeds:
        for opt in ("adamw", "muon2"):
            for b in SIZES:
                sweep.append(run(corpus, val, opt, seed, batch=b, max_samples=budget, target=target))
            auto.append(run(corpus, val, opt, seed, batch="auto", max_samples=budget, target=target,
                            auto=AutoBatchConfig(start=8, warmup_steps=10, interval=10, max_global_batch=64)))

    def med(xs):
        xs = [x for x in xs if x is not None]
        return statistics.median(xs) if xs else None

    rows = []
    for opt in ("adamw", "muon2"):
        for b in SIZES:
            rs = [r for r in sweep if r["opt"] == opt and r["batch"] == b]
            hit = [r["reached"] for r in rs if r["reached"]]
            rows.append({"opt": opt, "batch": b, "reached": f"{len(hit)}/{len(rs)}",
                         "steps": med([h["step"] for h in hit]), "samples": med([h["samples"] for h in hit]),
                         "seconds": med([h["seconds"] for h in hit]) if len(hit) == len(rs) else None})
        rs = [r for r in auto if r["opt"] == opt]
        hit = [r["reached"] for r in rs if r["reached"]]
        rows.append({"opt": opt, "batch": "auto", "reached": f"{len(hit)}/{len(rs)}",
                     "steps": med([h["step"] for h in hit]), "samples": med([h["samples"] for h in hit]),
                     "seconds": med([h["seconds"] for h in hit]) if len(hit) == len(rs) else None,
                     "final_batch": med([r["curve"][-1]["global_batch"] for r in rs if r["curve"]])})
    noise_rows = []
    for opt in ("adamw", "muon2"):
        ns = [n for n in noise if n["opt"] == opt]
        noise_rows.append({"opt": opt, **{k: med([n[k] for n in ns]) for k in ("b_noise_10", "b_noise_50",
                                                                                "b_noise_100", "final_val_loss")}})
    for opt in ("adamw", "muon2"):
        fixed = [r for r in rows if r["opt"] == opt and r["batch"] != "auto" and r["seconds"] is not None]
        best = min(fixed, key=lambda r: r["seconds"]) if fixed else None
        a = next(r for r in rows if r["opt"] == opt and r["batch"] == "auto")
        a["best_fixed_batch"] = best["batch"] if best else None
        a["vs_best_fixed"] = round(a["seconds"] / best["seconds"], 3) if best and a["seconds"] else None

    print(f"\nGradient noise scale B_noise (median over seeds {seeds}; batch 32, growth off)")
    print(f"{'optimizer':>9} {'at 10%':>8} {'at 50%':>8} {'at 100%':>8} {'val loss':>9}")
    for r in noise_rows:
        f = lambda v: f"{v:8.1f}" if v is not None else "       -"  # noqa: E731
        print(f"{r['opt']:>9} {f(r['b_noise_10'])} {f(r['b_noise_50'])} {f(r['b_noise_100'])} {r['final_val_loss']:9.4f}")
    print(f"\nTo validation loss {target:.4f} (medians over seeds {seeds})")
    print(f"{'optimizer':>9} {'batch':>6} {'reached':>8} {'steps':>7} {'samples':>8} {'seconds':>8} {'vs best':>8}")
    for r in rows:
        g = lambda v, w=8: f"{v:{w}.1f}" if isinstance(v, float) else f"{v if v is not None else '-':>{w}}"  # noqa: E731
        print(f"{r['opt']:>9} {str(r['batch']):>6} {r['reached']:>8} {g(r['steps'], 7)} {g(r['samples'])} "
              f"{g(r['seconds'])} {g(r.get('vs_best_fixed'))}")
    out = {"environment": _record.environment(), "config": CONFIG, "lr_at_16": LR, "sizes": SIZES, "seeds": seeds,
           "target_val_loss": target, "target_step": target_step, "noise": noise_rows, "rows": rows,
           "runs": {"noise": noise, "sweep": sweep, "auto": auto}, "seconds": round(time.perf_counter() - t_all, 1)}
    RESULTS.mkdir(exist_ok=True)
    name = "critical_batch_quick.json" if args.quick else "critical_batch.json"
    (RESULTS / name).write_text(json.dumps(out, indent=1, default=str))
    print(f"\nwrote {RESULTS / name} ({out['seconds']} s)")


if __name__ == "__main__":
    main()
