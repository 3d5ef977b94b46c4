"""The model-zoo table: third-party models, each profiled, planned and trained on the CPU.

For each model of tests/model_zoo.py (tiny configs, random init, no hub): the unplanned peak
memtune predicts against PyTorch's MemTracker on a real AdamW step; the plans at 50% and 70%
of that peak (or at the smallest feasible budget, marked ``*``, when the fraction is below
it), predicted against measured; and ``memtune.fit`` at 60% (likewise), with its first and
last loss.
A model that fails says where and why. The same checks are tests/test_model_zoo.py's.

    python benchmarks/model_zoo.py                       # every model
    python benchmarks/model_zoo.py --models gpt_neox,phi3,falcon --no-fit

Writes benchmarks/results/model_zoo.json (with the command, versions and machine).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests"))
import _record  # noqa: E402
import model_zoo  # noqa: E402


def run(case: model_zoo.ZooCase, *, with_fit: bool) -> dict:
    row: dict = {"model": case.name, "kind": case.kind}
    stage = "build"
    try:
        model = model_zoo.build(case)
        row["params"] = sum(p.numel() for p in model.parameters())
        stage = "profile"
        t0 = time.perf_counter()
        prof = model_zoo.profile(case)
        row["profile_s"] = round(time.perf_counter() - t0, 2)
        row["units"] = len(prof.units)
        stage = "unplanned"
        row["unplanned"] = {"predicted_bytes": prof.baseline_peak_bytes,
                            "measured_bytes": model_zoo.measure_unplanned(case)}
        row["plans"] = []
        for frac in model_zoo.PLAN_FRACTIONS:
            stage = f"plan {frac:.0%}"
            plan, budget, at_floor = model_zoo.plan_at(prof, frac)
            row["plans"].append({"fraction": frac, "budget_bytes": budget, "at_floor": at_floor,
                                 "recompute": f"{len(plan.recompute_units)}/{len(plan.decisions)}",
                                 "state_dtype": plan.optimizer.state_dtype,
                                 "predicted_bytes": plan.predicted_peak_bytes,
                                 "measured_bytes": model_zoo.measure_plan(case, plan)})
        if with_fit:
            stage = "fit"
            _, budget, at_floor = model_zoo.plan_at(prof, model_zoo.FIT_FRACTION)
            trainer = model_zoo.fit(case, budget)
            row["fit"] = {"budget_bytes": budget, "at_floor": at_floor, "losses": [h["loss"] for h in trainer.history],
                          "max_peak_bytes": max(h["peak_bytes"] for h in trainer.history)}
    except Exception as e:  # noqa: BLE001 - a failing model is a row of the table
        row["error"] = {"stage": stage, "type": type(e).__name__, "message": str(e)[:300],
                        "traceback": traceback.format_exc(limit=-4)}
    return row


def _err(m: dict) -> str:
    return f"{(m['predicted_bytes'] - m['measured_bytes']) / m['measured_bytes']:+.1%}"


def _kib(n: int) -> str:
    return f"{n / 1024:.0f}"


def table(rows: list[dict]) -> str:
    head = ("| model | kind | params | unplanned pred / meas KiB (err) | plan 50% pred / meas KiB (err) "
            "| plan 70% pred / meas KiB (err) | fit 60% loss first → last |")
    lines = [head, "|" + "---|" * 7]
    for r in rows:
        cells = [r["model"], r["kind"], f"{r.get('params', 0):,}"]
        if "unplanned" in r:
            u = r["unplanned"]
            cells.append(f"{_kib(u['predicted_bytes'])} / {_kib(u['measured_bytes'])} ({_err(u)})")
        for p in r.get("plans", []):
            over = " **over**" if p["measured_bytes"] > p["budget_bytes"] else ""
            floor = "*" if p["at_floor"] else ""
            cells.append(f"{_kib(p['predicted_bytes'])} / {_kib(p['measured_bytes'])} ({_err(p)}){floor}{over}")
        if "fit" in r:
            losses = r["fit"]["losses"]
            over = " **over**" if r["fit"]["max_peak_bytes"] > r["fit"]["budget_bytes"] else ""
            cells.append(f"{losses[0]:.3f} → {losses[-1]:.3f}{'*' if r['fit']['at_floor'] else ''}{over}")
        if "error" in r:
            e = r["error"]
            cells.append(f"fails at {e['stage']}: {e['type']}: {e['message'][:90]}")
        cells += [""] * (7 - len(cells))
        lines.append("| " + " | ".join(c.replace("|", "/") for c in cells[:7]) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", help="comma-separated names (default: the whole zoo)")
    ap.add_argument("--no-fit", action="store_true", help="skip memtune.fit")
    ap.add_argument("--out", default=str(_record.RESULTS / "model_zoo.json"))
    args = ap.parse_args()
    cases = model_zoo.cases()
    names = args.models.split(",") if args.models else list(cases)
    unknown = sorted(set(names) - set(cases))
    if unknown:
        ap.error(f"unknown models {unknown}; the zoo has {sorted(cases)}")
    rows = []
    for name in names:
        rows.append(run(cases[name], with_fit=not args.no_fit))
        print(table(rows[-1:]).splitlines()[-1], flush=True)
    print()
    print(table(rows))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"environment": _record.environment(), "rows": rows}, indent=1))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
