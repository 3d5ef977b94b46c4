"""Profile Llama-2-7B (seq 2048, bf16-mixed, AdamW, H100 target) on a CPU-only machine.

Target: under 60 s wall time and under 2 GB peak RSS, with no real weight memory (the
model is built on the meta device and traced with fake tensors).

    python benchmarks/profile_7b.py [--seq 2048] [--batch 1]
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _record  # noqa: E402

import memtune  # noqa: E402
from memtune import zoo  # noqa: E402
from memtune.units_fmt import fmt_bytes  # noqa: E402


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--target", default="H100")
    args = ap.parse_args()

    rss_start = peak_rss_bytes()
    t0 = time.perf_counter()
    with torch.device("meta"):
        model = zoo.llama_7b()
    ids = torch.randint(0, 32000, (args.batch, args.seq), device="meta")
    t_build = time.perf_counter() - t0
    prof = memtune.profile(model, {"input_ids": ids, "labels": ids}, precision="bf16-mixed", target=args.target)
    wall = time.perf_counter() - t0
    rss = peak_rss_bytes()

    rows = [
        ("model", f"Llama-2-7B ({sum(p.numel() for p in model.parameters()) / 1e9:.2f} B params), {len(prof.units)} units"),
        ("sample", prof.sample),
        ("tracer", f"{prof.tracer} (tried: {', '.join(t for t, _ in prof.tracers_tried) or 'none'})"),
        ("wall time (build + profile)", f"{wall:.1f} s (build {t_build:.1f} s, profile {prof.profile_seconds:.1f} s)"),
        ("peak RSS", fmt_bytes(rss)),
        ("predicted baseline peak", fmt_bytes(prof.baseline_peak_bytes)),
        ("params / grads / AdamW state", f"{fmt_bytes(prof.param_bytes)} / {fmt_bytes(prof.grad_bytes)} / {fmt_bytes(prof.optimizer_state_bytes)}"),
        ("saved activations", f"{fmt_bytes(prof.saved_activation_bytes)} ({fmt_bytes(prof.units[0].saved_activation_bytes)} per layer)"),
        ("FLOPs per step", f"{(prof.fwd_flops + prof.bwd_flops) / 1e12:.1f} T"),
        ("targets met", f"time < 60 s: {wall < 60}, RSS < 2 GB: {rss < 2e9}"),
    ]
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")
    md = "| metric | value |\n|---|---|\n" + "".join(f"| {k} | {v} |\n" for k, v in rows)
    path = _record.write("profile_7b", {
        "seq": args.seq, "batch": args.batch, "target": args.target, "wall_s": round(wall, 2),
        "build_s": round(t_build, 2), "profile_s": prof.profile_seconds, "peak_rss_bytes": rss,
        "rss_at_start_bytes": rss_start, "baseline_peak_bytes": prof.baseline_peak_bytes,
        "param_bytes": prof.param_bytes, "saved_activation_bytes": prof.saved_activation_bytes,
        "unit_saved_activation_bytes": prof.units[0].saved_activation_bytes, "tracer": prof.tracer,
    }, md)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
