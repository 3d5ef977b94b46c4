"""Muon² with streamed weights: where the Newton-Schulz of a host-resident matrix runs.

    python benchmarks/muon2_streamed.py            # Llama-2-7B at 12GB, about 2 minutes on 2 cores

With weight offload every unit's parameters, gradients and optimizer state live in host memory
and step there. Muon²'s momentum and second moment are elementwise and stay on the host; its
Newton-Schulz is matmuls, which the GPU runs hundreds of times faster than a server's CPU. Each
streamed matrix's NS input goes to the GPU in bf16 and the result comes back
(:func:`memtune.optim.muon2.orthogonalize`) wherever the cost model prices that faster,
transfers included (:func:`memtune.cost_model.ns_on_device`).

Llama-2-7B (seq 2048, batch 1, bf16-mixed) is profiled for an H100 under fake tensors, with
weight offload and the levers that combine with it, and planned at 12GB for AdamW, Muon (5 NS
steps) and Muon² (3 NS steps: the paper's 40% fewer), fp32 state. Each row gives the plan's
predicted tokens/s with the NS on the GPU, the same plan priced with the NS on the host (what
memtune did before), and the device transient of the largest matrix's NS that the optimizer
recording holds. Predictions from this CPU, not measurements. Writes
``benchmarks/results/muon2_streamed.{json,md}``.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from unittest import mock

import torch

import memtune
from memtune import cost_model, zoo

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _record  # noqa: E402

SHAPE = dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32)
SEQ = 2048
BUDGET = "12GB"
RUNS = (("adamw", None), ("muon", 5), ("muon2", 3))


def main() -> None:
    with torch.device("meta"):
        model = zoo.hf_llama(vocab_size=32000, max_position_embeddings=4096, **SHAPE)
    ids = torch.zeros(1, SEQ, dtype=torch.long, device="meta")
    space = memtune.PlanSpace(optimizers=tuple(name for name, _ in RUNS), state_dtypes=("fp32",),
                              levers={"weight_offload": (True,), "weights": (None,), "state_offload": (False,),
                                      "optimizer_in_backward": (False,)})
    t0 = time.perf_counter()
    prof = memtune.profile(model, {"input_ids": ids, "labels": ids}, precision="bf16-mixed", target="H100",
                           space=space)
    profile_s = time.perf_counter() - t0
    rows = []
    for name, ns in RUNS:
        pins = dict(optimizer=name, state_dtypes=("fp32",))
        if ns:
            pins.update(min_ns_steps=ns, max_ns_steps=ns)
        plan = memtune.plan(prof, BUDGET, **pins)
        t = cost_model.predict_step_time(prof, plan)
        with mock.patch.object(cost_model, "ns_on_device", lambda *a: False):
            host = cost_model.predict_step_time(prof, plan)
        rec = next(r for r in prof.optimizer_steps if r.name == name and r.ns_steps == plan.optimizer.ns_steps
                   and r.state_dtype == "fp32" and r.variant == plan.variant.for_optimizer())
        rows.append(dict(optimizer=name, ns_steps=plan.optimizer.ns_steps, weight_offload=bool(plan.variant.weight_offload),
                         tokens_per_s=round(SEQ / (t.total_ms / 1e3)), step_ms=round(t.total_ms, 1),
                         weight_stream_ms=round(t.lever_ms.get("weight_offload", 0.0), 1),
                         host_ns_tokens_per_s=round(SEQ / (host.total_ms / 1e3)), host_ns_step_ms=round(host.total_ms, 1),
                         step_transient_mib=round(rec.step_transient_bytes / 2**20, 1),
                         peak_gib=round(plan.predicted_peak_bytes / 2**30, 2),
                         usable_gib=round(plan.usable_bytes / 2**30, 2), host_gib=round(plan.memory.host_bytes / 2**30, 1),
                         recomputed=f"{len(plan.recompute_units)}/{len(plan.decisions)}"))
    lines = [f"Llama-2-7B, seq {SEQ}, bf16-mixed, H100 at {BUDGET}, weight offload; profile {profile_s:.0f} s",
             "",
             "| optimizer | NS steps | tokens/s (NS on GPU) | step | weight offload's term | tokens/s (NS on host) | "
             "step | device step transient | peak / usable | host |",
             "|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|"]
    for r in rows:
        lines.append(f"| {r['optimizer']} | {r['ns_steps'] or '-'} | {r['tokens_per_s']:,} | {r['step_ms']:,.0f} ms | "
                     f"{r['weight_stream_ms']:,.0f} ms | {r['host_ns_tokens_per_s']:,} | {r['host_ns_step_ms']:,.0f} ms | "
                     f"{r['step_transient_mib']:,.1f} MiB | {r['peak_gib']:.2f} / {r['usable_gib']:.2f} GiB | "
                     f"{r['host_gib']:.1f} GiB |")
    print("\n".join(lines))
    path = _record.write("muon2_streamed", dict(rows=rows, profile_s=round(profile_s, 1)), "\n".join(lines))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
