"""Unit discovery (issue 21, item 5): how far below the unplanned peak memtune plans a plain
``nn.Sequential`` MLP and ALBERT, against a lower bound measured on real tensors.

    python benchmarks/unit_discovery.py

The models, batches and the bound are those of ``tests/test_unit_discovery.py`` (see its
docstring for the bound). For each model: the bound, the unplanned peak (MemTracker), and the
smallest budget the planner accepts with memtune's units and with the units discovery used to
pick (the MLP's bare ``Linear`` layers; ALBERT's two top-level children), each plan applied and
its steady-state step measured with MemTracker. AdamW with fp32 state, every lever at its
default: the plans differ only in what they recompute.
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path

import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _record  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

import memtune  # noqa: E402
from memtune.apply import apply_plan  # noqa: E402
from memtune.errors import InfeasibleBudgetError  # noqa: E402
from memtune.units_fmt import fmt_bytes  # noqa: E402
from reference import measure_planned_step, measure_step  # noqa: E402
from test_unit_discovery import CASES, albert, albert_batch, lower_bound  # noqa: E402

CASES = {**CASES, "albert_vocab256": (functools.partial(albert, vocab=256), functools.partial(albert_batch, vocab=256),
                                      None)}
"""The test's models, and ALBERT with a small vocabulary (its loss no longer dominates the peak)."""
BEFORE = {"mlp": [nn.Linear], "albert": ["albert", "predictions"], "albert_vocab256": ["albert", "predictions"]}
"""The units discovery picked before issue 21."""


def fresh(name: str) -> nn.Module:
    torch.manual_seed(0)
    return CASES[name][0]()


def floor_plan(name: str, units) -> dict:
    _, make_batch, loss_fn = CASES[name]
    prof = memtune.profile(fresh(name), make_batch(), loss_fn=loss_fn, target="cpu", units=units,
                           space=memtune.PlanSpace.minimal(state_dtypes=("fp32",)))
    try:
        memtune.plan(prof, 1)
    except InfeasibleBudgetError as e:
        budget = e.min_feasible_bytes
    plan = memtune.plan(prof, budget)
    model = fresh(name)
    opt = apply_plan(model, plan)
    measured = measure_planned_step(model, make_batch(), plan, opt, loss_fn=loss_fn)
    return {"units": [u.fqn for u in prof.units], "recomputed": list(plan.recompute_units), "budget": budget,
            "predicted": plan.predicted_peak_bytes, "measured": measured}


def run(name: str) -> dict:
    _, make_batch, loss_fn = CASES[name]
    model = fresh(name)
    unplanned = measure_step(model, make_batch(), loss_fn=loss_fn, opt=torch.optim.AdamW(model.parameters()))
    return {"model": name, "bound": lower_bound(fresh(name), make_batch(), loss_fn), "unplanned": unplanned,
            "memtune": floor_plan(name, None), "before": floor_plan(name, BEFORE[name])}


def markdown(rows: list[dict]) -> str:
    lines = ["| model | lower bound | unplanned | units | smallest plan: predicted | measured | over the bound |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        b = r["bound"]["bound"]
        for key, label in (("memtune", "memtune"), ("before", "before")):
            p = r[key]
            lines.append(f"| {r['model']} ({label}) | {fmt_bytes(b)} | {fmt_bytes(r['unplanned'])} "
                         f"({r['unplanned'] / b - 1:+.1%}) | {len(p['units'])} ({len(p['recomputed'])} recomputed) | "
                         f"{fmt_bytes(p['predicted'])} | {fmt_bytes(p['measured'])} | {p['predicted'] / b - 1:+.1%} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    torch.set_num_threads(1)
    rows = [run(name) for name in CASES]
    md = markdown(rows)
    path = _record.write("unit_discovery", {"rows": rows}, md)
    print(md)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
