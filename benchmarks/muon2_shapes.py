"""Muon²'s optimizer step against torch.optim.Muon (K=5) on rectangular and real-model shapes.

Every optimizer gets its own copy of the same matrices and gradients; each repetition steps
every optimizer once, in turn (interleaved), so that load from other jobs falls on all alike.
Medians of ``--reps`` steps, 2 threads. Shapes:

    rect    6 × [256×1024] + 6 × [1024×256]
    llama   Llama-2-7B's hidden matrices (4096 / 11008) scaled by 1/8 to 512 / 1376, two layers:
            q, k, v, o [512×512], gate, up [1376×512], down [512×1376]

Rows: torch.optim.Muon K=5 (its NS is bf16 always); Muon² K=3 with the defaults of
``OptimizerSettings`` (bf16 NS, Gram-scaled input, preconditioned); Muon² K=3 with fp32 NS
(what ``memtune.fit`` uses on a CPU); plain Muon (memtune's, K=5, bf16), which must match
torch's time. Each row gives the median and the best step (the best is what the arithmetic
costs when nothing else intrudes), and the minor page faults per step: freed temporaries of a
megabyte or more go back to the OS and fault in again on the next step, which moves the
medians by ±15% from run to run on a small VM. Writes benchmarks/results/muon2_shapes.json.

    python benchmarks/muon2_shapes.py
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import _record  # noqa: E402
from muon2_steptime import muon2_from_settings  # noqa: E402

from memtune.optim import OptimizerSettings  # noqa: E402

SHAPES = {
    "rect": [(256, 1024)] * 6 + [(1024, 256)] * 6,
    "llama": [(512, 512)] * 4 * 2 + [(1376, 512)] * 2 * 2 + [(512, 1376)] * 2,
}


def rows() -> dict:
    return {
        "torch.optim.Muon K=5": lambda ps: torch.optim.Muon(ps, lr=0.02, ns_steps=5),
        "Muon² K=3 (defaults, bf16 NS)": lambda ps: muon2_from_settings(ps, OptimizerSettings(ns_steps=3)),
        "Muon² K=3, fp32 NS": lambda ps: muon2_from_settings(ps, OptimizerSettings(ns_steps=3, ns_dtype="fp32")),
        "Muon K=5 (memtune, bf16 NS)": lambda ps: muon2_from_settings(ps, OptimizerSettings(name="muon", ns_steps=5)),
    }


def measure(shapes, reps: int) -> dict:
    g = torch.Generator().manual_seed(0)
    base = [torch.randn(*s, generator=g) * 0.02 for s in shapes]
    grads = [torch.randn(*s, generator=g) for s in shapes]
    opts = {}
    for name, make in rows().items():
        ps = [torch.nn.Parameter(b.clone()) for b in base]
        for p, gr in zip(ps, grads):
            p.grad = gr.clone()
        opts[name] = make(ps)
    times = {name: [] for name in opts}
    faults = dict.fromkeys(opts, 0)
    for name, opt in opts.items():  # warm-up: state creation, first-call costs
        opt.step()
    for _ in range(reps):
        for name, opt in opts.items():
            f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            t0 = time.perf_counter()
            opt.step()
            times[name].append((time.perf_counter() - t0) * 1e3)
            faults[name] += resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0
    ref = statistics.median(times["torch.optim.Muon K=5"])
    best = min(times["torch.optim.Muon K=5"])
    return {name: {"median_ms": round(statistics.median(ts), 3), "ratio": round(statistics.median(ts) / ref, 3),
                   "min_ms": round(min(ts), 3), "min_ratio": round(min(ts) / best, 3),
                   "minor_faults_per_step": round(faults[name] / reps)}
            for name, ts in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=20)
    args = ap.parse_args()
    torch.set_num_threads(2)
    out = {"environment": _record.environment(), "reps": args.reps, "shapes": SHAPES, "results": {}}
    for label, shapes in SHAPES.items():
        res = measure(shapes, args.reps)
        out["results"][label] = res
        print(f"\n{label}: {len(shapes)} matrices, median of {args.reps} interleaved steps, 2 threads")
        print(f"{'optimizer':<32} {'ms':>8} {'vs torch Muon K=5':>18} {'best ms':>8} {'ratio':>6} {'faults/step':>12}")
        for name, r in res.items():
            print(f"{name:<32} {r['median_ms']:8.2f} {r['ratio']:17.2f}x {r['min_ms']:8.2f} {r['min_ratio']:5.2f}x"
                  f" {r['minor_faults_per_step']:12d}")
    path = Path(__file__).resolve().parent / "results" / "muon2_shapes.json"
    path.write_text(json.dumps(out, indent=1))
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
