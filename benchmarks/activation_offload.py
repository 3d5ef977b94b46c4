"""Activation offload as priced for a GPU (predictions made on this CPU; no GPU was lent).

For GPT blocks (8 of them) of growing width on an H100 (PCIe host link), in fp32 and bf16-mixed, per unit:
its forward (what RECOMPUTE adds), the serial transfer of its saved activations both ways (what
OFFLOAD was priced at before the copies overlapped), and what OFFLOAD is priced at now
(memtune.offload: the copies replayed on the link against the unit's ops). Then the exact
planner (AdamW, fp32 state) at 50% and 35% of the unplanned activations, with and without
``allow_activation_offload``: how many units it offloads and the predicted step time.

    python benchmarks/activation_offload.py        # about 2 minutes on 2 cores

Writes benchmarks/results/activation_offload.{json,md}. To measure the same plans on a GPU:
``python benchmarks/gpu_validation.py --activation-offload``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

import memtune
from memtune import zoo
from memtune.cost_model import cost_table, device_for, host_bandwidth
from memtune.plan import Decision

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _record  # noqa: E402

SHAPES = [(1024, 16, 16, 1024), (2048, 16, 8, 2048), (4096, 32, 4, 4096)]  # (d, heads, batch, seq)
LAYERS = 8


def rows_for(d: int, heads: int, batch: int, seq: int, precision: str) -> list[dict]:
    with torch.device("meta"):
        model = zoo.GPT(zoo.GPTConfig(n_layer=LAYERS, n_embd=d, n_head=heads, block_size=seq))
    ids = torch.randint(0, 256, (batch, seq))
    prof = memtune.profile(model, (ids, ids), target="H100", precision=precision, optimizer="adamw",
                           space=memtune.PlanSpace.minimal())
    spec = device_for(prof, "H100")
    table = cost_table(prof, device="H100")
    u = prof.units[1]
    inputs = set(u.input_storages)
    serial_ms = 2 * sum(prof.storages[s].nbytes for s in u.saved_storages if s not in inputs) / host_bandwidth(spec) * 1e3
    row = {"d": d, "batch": batch, "seq": seq, "precision": precision, "unit_forward_ms": table.recompute_ms[u.fqn],
           "serial_offload_ms": serial_ms, "priced_offload_ms": table.offload_ms[u.fqn], "plans": {}}
    for share in (0.5, 0.35):
        budget = int(prof.baseline_peak_bytes - (1 - share) * prof.saved_activation_bytes)
        for offload in (False, True):
            try:
                plan = memtune.plan(prof, budget, reserve=0, optimizer="adamw", state_dtypes=("fp32",),
                                    allow_activation_offload=offload)
            except memtune.InfeasibleBudgetError as e:
                row["plans"][f"{share:.0%}{' +offload' if offload else ''}"] = {"infeasible": True, "budget": budget,
                                                                                 "min_feasible": e.min_feasible_bytes}
                continue
            row["plans"][f"{share:.0%}{' +offload' if offload else ''}"] = {
                "offload": sum(x is Decision.OFFLOAD for x in plan.decisions.values()),
                "recompute": sum(x is Decision.RECOMPUTE for x in plan.decisions.values()),
                "selective": sum(x is Decision.SELECTIVE for x in plan.decisions.values()),
                "step_ms": plan.predicted_step_ms, "peak": plan.predicted_peak_bytes}
    return [row]


def main() -> None:
    rows = []
    for d, heads, batch, seq in SHAPES:
        for precision in ("fp32", "bf16-mixed"):
            rows += rows_for(d, heads, batch, seq, precision)
            r = rows[-1]
            print(f"d={d} {precision}: unit forward {r['unit_forward_ms']:.2f} ms, offload serial "
                  f"{r['serial_offload_ms']:.2f} ms, priced {r['priced_offload_ms']:.2f} ms", flush=True)

    def cell(p):
        if p.get("infeasible"):
            return f"infeasible: {p['budget'] / 2**30:.1f} GiB, needs {p['min_feasible'] / 2**30:.1f}"
        parts = [f"{p[k]} {k}" for k in ("offload", "recompute", "selective") if p[k]]
        return f"{', '.join(parts) or 'nothing'}; {p['step_ms']:.1f} ms"

    lines = ["| d | tokens | precision | unit forward | offload, serial | offload, priced | 50% | 50% +offload | "
             "35% | 35% +offload |", "|--:|--:|---|--:|--:|--:|---|---|---|---|"]
    for r in rows:
        p = r["plans"]
        lines.append(f"| {r['d']} | {r['batch']}×{r['seq']} | {r['precision']} | {r['unit_forward_ms']:.2f} ms | "
                     f"{r['serial_offload_ms']:.2f} ms | {r['priced_offload_ms']:.2f} ms | {cell(p['50%'])} | "
                     f"{cell(p['50% +offload'])} | {cell(p['35%'])} | {cell(p['35% +offload'])} |")
    md = (f"Predicted for an H100 (PCIe host link), on this CPU: GPT, {LAYERS} blocks, AdamW with fp32 state; "
          "unit times are one block's, per step. Budgets keep that share of the unplanned saved activations.\n\n" + "\n".join(lines) + "\n")
    path = _record.write("activation_offload", {"rows": rows}, md)
    print(md)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
