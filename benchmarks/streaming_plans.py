"""Plans for Llama-2 shapes that do not fit an H100 without streaming, planned from this CPU.

    python benchmarks/streaming_plans.py              # 7B, 13B and 70B, about 4 minutes on 2 cores
    python benchmarks/streaming_plans.py --only 7b

Each model is built on the ``meta`` device, profiled for an H100 (bf16-mixed, seq 2048,
batch 1, AdamW, every default lever recorded, the 70B too) under fake tensors, and planned with every
default at each budget. The table gives the plan's tokens/s, its step time, what the optimizer
state's stream adds to it, and the same plan priced the old way (the stream serial,
``2 × state bytes / host bandwidth``, hidden only behind backward), side by side from one run;
then whether the plan streams the weights from host memory (weight offload), what that adds,
and the host bytes the plan pins. Llama-2-70B is planned for one 80GB H100 with a stated host
budget. Profile and plan times and the peak RSS are printed too.
An infeasible budget prints the planner's reason (its smallest plan and what fills it).
Writes ``benchmarks/results/streaming_plans.{json,md}``.
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

import torch

import memtune
from memtune import zoo
from memtune.cost_model import predict_step_time

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _record  # noqa: E402

SHAPES = {
    "7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32),
    "13b": dict(hidden_size=5120, intermediate_size=13824, num_hidden_layers=40, num_attention_heads=40),
    "70b": dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                num_key_value_heads=8),
}
BUDGETS = {"7b": (("24GB", None), ("12GB", None)), "13b": (("24GB", None),), "70b": (("80GB", "1.5TB"),)}
"""(device budget, host budget) per shape: ``None`` is the default (what psutil reports available
here, less a reserve), which cannot hold a 70B model's host copies on this machine."""
SEQ = 2048


def serial_stream_ms(profile, plan) -> float:
    """The stream's price before the timeline model: serial traffic, hidden only behind backward."""
    from memtune.cost_model import CostContext, device_for, host_bandwidth
    from memtune.levers import LEVERS

    spec = device_for(profile)
    ctx = CostContext(profile=profile, spec=spec, optimizer=plan.optimizer, variant=plan.variant)
    for name, value in plan.variant.choices:
        LEVERS[name].cost(value, ctx)
    traffic = 2 * ctx.state_link_bytes() / host_bandwidth(spec)
    backward_s = plan.time.backward_ms / 1e3
    return 1e3 * (max(0.0, traffic - backward_s) if ctx.optimizer_overlaps_backward else traffic)


def run(name: str) -> list[dict]:
    with torch.device("meta"):
        model = zoo.hf_llama(vocab_size=32000, max_position_embeddings=4096, **SHAPES[name])
    ids = torch.zeros(1, SEQ, dtype=torch.long, device="meta")
    t0 = time.perf_counter()
    prof = memtune.profile(model, {"input_ids": ids, "labels": ids}, precision="bf16-mixed", target="H100")
    profile_s = time.perf_counter() - t0
    rows = []
    for budget, host_budget in BUDGETS[name]:
        t0 = time.perf_counter()
        row = dict(model=f"Llama-2-{name.upper()}", budget=budget, host_budget=host_budget,
                   profile_s=round(profile_s, 1))
        try:
            plan = memtune.plan(prof, budget, **({"host_budget": host_budget} if host_budget else {}))
        except memtune.InfeasibleBudgetError as e:
            row.update(feasible=False, reason=str(e).split(". To fit")[0], min_feasible_bytes=e.min_feasible_bytes)
        else:
            t = predict_step_time(prof, plan)
            stream = t.lever_ms.get("state_offload", 0.0)
            old = serial_stream_ms(prof, plan) if plan.variant.state_offload else 0.0
            old_step = t.total_ms - stream + old
            row.update(feasible=True, tokens_per_s=round(SEQ / (t.total_ms / 1e3)), step_ms=round(t.total_ms, 1),
                       stream_ms=round(stream, 1), serial_stream_ms=round(old, 1),
                       serial_tokens_per_s=round(SEQ / (old_step / 1e3)),
                       peak_gib=round(plan.predicted_peak_bytes / 2**30, 2),
                       usable_gib=round(plan.usable_bytes / 2**30, 2),
                       stream_buffer_gib=round(plan.memory.stream_bytes / 2**30, 2),
                       host_gib=round(plan.memory.host_bytes / 2**30, 2),
                       state=plan.optimizer.state_dtype, weights=plan.variant["weights"] or "fp32",
                       in_backward=bool(plan.variant["optimizer_in_backward"]),
                       state_offload=bool(plan.variant.state_offload),
                       weight_offload=bool(plan.variant["weight_offload"]),
                       weight_stream_ms=round(t.lever_ms.get("weight_offload", 0.0), 1),
                       recomputed=f"{len(plan.recompute_units)}/{len(plan.decisions)}", summary=plan.summary())
        row["plan_s"] = round(time.perf_counter() - t0, 1)
        rows.append(row)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--only", choices=sorted(SHAPES))
    args = ap.parse_args()
    rows = []
    for name in ([args.only] if args.only else list(SHAPES)):
        rows += run(name)
    lines = [f"{'model':<12} {'budget':>6} {'tokens/s':>9} {'step':>9} {'stream':>9} {'serial price: stream':>21} "
             f"{'tokens/s':>9} {'peak / usable GiB':>18} {'state':>6} {'weights':>8} {'streamed':>8} "
             f"{'weight stream':>13} {'host GiB':>9} {'profile+plan s':>14}"]
    for r in rows:
        if not r["feasible"]:
            lines.append(f"{r['model']:<12} {r['budget']:>6}  infeasible: {r['reason']}")
            continue
        streamed = "yes" if r["weight_offload"] else "no"
        lines.append(f"{r['model']:<12} {r['budget']:>6} {r['tokens_per_s']:>9,} {r['step_ms']:>7.1f}ms "
                     f"{r['stream_ms']:>7.1f}ms {r['serial_stream_ms']:>19.1f}ms {r['serial_tokens_per_s']:>9,} "
                     f"{r['peak_gib']:>8.2f} / {r['usable_gib']:<7.2f} {r['state']:>6} {r['weights']:>8} "
                     f"{streamed:>8} {r['weight_stream_ms']:>11.1f}ms {r['host_gib']:>9.1f} "
                     f"{r['profile_s'] + r['plan_s']:>14.1f}")
    peak_rss_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    lines.append(f"peak RSS {peak_rss_gib:.2f} GiB")
    print("\n".join(lines))
    path = _record.write("streaming_plans", dict(rows=rows, peak_rss_gib=round(peak_rss_gib, 2)), "\n".join(lines))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
