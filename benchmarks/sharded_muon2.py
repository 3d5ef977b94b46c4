"""Sharded Muon² on Llama-2-7B: where Newton-Schulz runs across ranks, and what it costs the step.

    python benchmarks/sharded_muon2.py            # about 2 minutes on 2 CPU cores (the 7B profile)

Llama-2-7B (seq 2048, batch 1 per rank, bf16-mixed, Muon² K=5) is profiled for an H100 under fake
tensors and planned with FSDP2 for 8 and 16 ranks (80GB each, NVLink inside a node, InfiniBand
between nodes). For three placements of the whole-matrix Newton-Schulz
(:data:`memtune.distributed.muon.ASSIGNMENTS`: balanced owners, round-robin owners, every rank
orthogonalizing every matrix after an all-gather) the table gives the busiest rank's NS time, the
gather/scatter time and their share of the predicted step. A model, not a measurement: no GPU.
Writes ``benchmarks/results/sharded_muon2.{json,md}``.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import torch

import memtune
from memtune import zoo
from memtune.cost_model import _price_optimizer_step, device_for
from memtune.distributed.muon import ASSIGNMENTS, ns_layout_seconds
from memtune.distributed.planning import LINKS, plan_distributed

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _record  # noqa: E402


def main() -> None:
    with torch.device("meta"):
        model = zoo.llama_7b()
    ids = torch.zeros(1, 2048, dtype=torch.long, device="meta")
    prof = memtune.profile(model, {"input_ids": ids, "labels": ids}, precision="bf16-mixed", target="H100",
                           optimizer="muon2", space=memtune.PlanSpace.minimal())
    rows = []
    for N, link in ((8, "nvlink"), (16, "infiniband")):
        plan = plan_distributed(prof, "80GB", world_size=N, link=link, strategies=("fsdp",), optimizer="muon2")
        spec = device_for(prof)
        per = _price_optimizer_step(prof, plan.optimizer, spec, False, per_param=True)
        muon = set(plan.optimizer.muon_params)
        mats = [q for q in prof.params if q.fqn in muon and len(q.shape) >= 2]
        shapes = [(q.shape[0], math.prod(q.shape[1:])) for q in mats]
        ns = [per[q.fqn][0] for q in mats]
        # The step without Newton-Schulz and its collectives; each placement adds its own.
        rest_ms = plan.predicted_step_ms - plan.time.ns_ms - plan.parallel.comm_ms
        base_comm_ms = plan.parallel.comm_ms - 1e3 * ns_layout_seconds(shapes, ns, N, LINKS[link], "balanced")[1]
        for assignment in ASSIGNMENTS:
            ns_s, comm_s = ns_layout_seconds(shapes, ns, N, LINKS[link], assignment)
            step_ms = rest_ms + base_comm_ms + 1e3 * (ns_s + comm_s)
            rows.append(dict(ranks=N, link=link, assignment=assignment, ns_ms=1e3 * ns_s, gather_scatter_ms=1e3 * comm_s,
                             step_ms=step_ms, share=1e3 * (ns_s + comm_s) / step_ms, matrices=len(mats),
                             ns_total_ms=1e3 * sum(ns)))
    lines = [f"{'ranks':>5} {'link':>10} {'placement':>12} {'NS (busiest)':>13} {'gather+scatter':>15} {'step':>9} "
             f"{'share':>6}"]
    lines += [f"{r['ranks']:>5} {r['link']:>10} {r['assignment']:>12} {r['ns_ms']:>11.1f}ms "
              f"{r['gather_scatter_ms']:>13.1f}ms {r['step_ms']:>7.1f}ms {r['share']:>6.1%}" for r in rows]
    lines.append(f"({rows[0]['matrices']} matrices; Newton-Schulz on one rank would take {rows[0]['ns_total_ms']:.1f} ms)")
    print("\n".join(lines))
    path = _record.write("sharded_muon2", {"rows": rows}, "\n".join(lines))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
