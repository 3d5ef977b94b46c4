"""The exact planner's MIP gap on a real model: Llama-2-7B planned at two gaps, side by side.

    python benchmarks/plan_gap.py            # about 2.5 minutes on 2 cores

Llama-2-7B (seq 2048, batch 1, bf16-mixed) is profiled once for an H100 under fake tensors,
with every default lever, then planned at 24GB, 12GB and 40GB by the exact planner with
``mip_rel_gap`` 1e-4 (0.01% of the step, the default before) and 5e-3 (0.5%, the default now).
Each row gives the wall time of ``memtune.plan``, the plan's predicted step time, and whether
HiGHS proved the returned plan's gap within the time limit (10 s, shared by every configuration
the planner solves: another configuration may have spent it). Writes
``benchmarks/results/plan_gap.{json,md}``.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

import memtune
from memtune import zoo

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _record  # noqa: E402

SHAPE = dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32)
BUDGETS = ("24GB", "12GB", "40GB")
GAPS = (1e-4, 5e-3)


def main() -> None:
    with torch.device("meta"):
        model = zoo.hf_llama(vocab_size=32000, max_position_embeddings=4096, **SHAPE)
    ids = torch.zeros(1, 2048, dtype=torch.long, device="meta")
    t0 = time.perf_counter()
    prof = memtune.profile(model, {"input_ids": ids, "labels": ids}, precision="bf16-mixed", target="H100")
    profile_s = time.perf_counter() - t0
    rows = []
    for budget in BUDGETS:
        for gap in GAPS:
            t = time.perf_counter()
            plan = memtune.plan(prof, budget, mip_rel_gap=gap)
            rows.append(dict(budget=budget, mip_rel_gap=gap, plan_s=round(time.perf_counter() - t, 2),
                             step_ms=round(plan.predicted_step_ms, 2),
                             proven=not any("before proving optimality" in n for n in plan.notes),
                             variant=repr(plan.variant), recomputed=f"{len(plan.recompute_units)}/{len(plan.decisions)}"))
    lines = [f"Llama-2-7B, seq 2048, bf16-mixed, H100, every default lever; profile {profile_s:.0f} s", "",
             "| budget | MIP gap | plan s | predicted step | returned plan proven |", "|---|--:|--:|--:|---|"]
    for r in rows:
        lines.append(f"| {r['budget']} | {r['mip_rel_gap']:.2%} | {r['plan_s']:.2f} | {r['step_ms']:,.2f} ms | "
                     f"{'yes' if r['proven'] else 'no (time limit)'} |")
    print("\n".join(lines))
    path = _record.write("plan_gap", dict(rows=rows, profile_s=round(profile_s, 1)), "\n".join(lines))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
