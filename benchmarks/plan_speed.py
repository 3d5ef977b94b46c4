"""How fast the planners plan a large profile.

    .venv/bin/python benchmarks/plan_speed.py [--units 1000] [--repeats 3]

Plans a synthetic chain profile (tests/planners/synthetic.py) of ``--units`` units at several
budgets with ``exact`` (HiGHS MILP) and ``greedy``, two option sets: AdamW with fp32 state
only (one outer configuration), and Muon² with every state precision, micro-batching and
offload (27 outer configurations, searched cheapest-first with pruning). Reports the median
wall time of ``memtune.planning.plan`` (the profile fingerprint is computed once per profile
and cached, as in a real session; its one-off cost is reported separately), the predicted step
time of each plan, and greedy's gap to exact. Writes benchmarks/results/plan_speed.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "planners"))

from synthetic import chain_profile  # noqa: E402

from memtune.errors import InfeasibleBudgetError  # noqa: E402
from memtune.plan import Decision  # noqa: E402
from memtune.planners.options import fingerprint  # noqa: E402
from memtune.planning import plan  # noqa: E402

OPTION_SETS = {  # name -> (profile target, options); offload is only planned for CUDA targets
    "adamw/fp32 (cpu)": ("cpu", dict(optimizer="adamw", state_dtypes=("fp32",))),
    "muon2/all (H100)": ("H100", dict(optimizer="muon2", allow_microbatching=True, allow_offload=True)),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--units", type=int, default=1000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--fractions", type=float, nargs="+", default=[0.8, 0.6, 0.45])
    ap.add_argument("--mip-rel-gap", type=float, default=None,
                    help="the exact planner's proven gap (default: PlannerOptions.mip_rel_gap)")
    args = ap.parse_args()
    gap = {} if args.mip_rel_gap is None else {"mip_rel_gap": args.mip_rel_gap}

    # The H100 chain has MiB-sized activations (KiB on the CPU one): with KiB activations on an
    # H100, recompute and offload both cost ~kernel overhead, near-ties that slow HiGHS's proof.
    profiles = {t: chain_profile(args.units, seed=0, target_name=t, scale=1024 if t == "cpu" else 2**20)
                for t in ("cpu", "H100")}
    prof = profiles["cpu"]
    t0 = time.perf_counter()
    fingerprint(prof)
    fp_s = time.perf_counter() - t0
    fingerprint(profiles["H100"])
    rows = []
    for opt_name, (target, opts) in OPTION_SETS.items():
        prof = profiles[target]
        for frac in args.fractions:
            budget = int(prof.baseline_peak_bytes * frac)
            res = {}
            for planner in ("exact", "greedy"):
                times, p = [], None
                for _ in range(args.repeats):
                    t = time.perf_counter()
                    try:
                        p = plan(prof, budget, planner, reserve=0, **opts, **gap)
                    except InfeasibleBudgetError:
                        p = None
                    times.append(time.perf_counter() - t)
                res[planner] = (statistics.median(times), p)
            e, g = res["exact"][1], res["greedy"][1]
            rows.append({
                "options": opt_name, "budget_fraction": frac, "budget_bytes": budget,
                "exact_s": round(res["exact"][0], 4), "greedy_s": round(res["greedy"][0], 4),
                "exact_step_ms": e.predicted_step_ms if e else None, "greedy_step_ms": g.predicted_step_ms if g else None,
                "greedy_gap_pct": round(100 * (g.predicted_step_ms / e.predicted_step_ms - 1), 3) if e and g else None,
                "exact_recompute_units": len(e.recompute_units) if e else None,
                "exact_offload_units": len(e.units_with(Decision.OFFLOAD)) if e else None,
                "exact_config": f"{e.optimizer.state_dtype}, mb={e.micro_batch_size or prof.batch_size}" if e else None,
                "exact_notes": list(e.notes) if e else [],
            })
    head = ("| options | budget | exact s | greedy s | exact step ms | greedy step ms | greedy gap | recompute / offload "
            "(exact) | config (exact) |\n|---|---|---|---|---|---|---|---|---|")
    lines = [f"# Planning speed: synthetic {args.units}-unit chain ({len(prof.timeline)} timeline events, "
             f"{len(prof.storages)} storages)", "",
             f"Median of {args.repeats} runs; profile fingerprint (once per profile, cached): {fp_s:.3f} s.", "", head]
    for r in rows:
        lines.append(f"| {r['options']} | {r['budget_fraction']:.0%} | {r['exact_s']:.3f} | {r['greedy_s']:.3f} | "
                     f"{_f(r['exact_step_ms'])} | {_f(r['greedy_step_ms'])} | "
                     f"{'' if r['greedy_gap_pct'] is None else str(r['greedy_gap_pct']) + '%'} | "
                     f"{r['exact_recompute_units']} / {r['exact_offload_units']} | {r['exact_config']} |")
    md = "\n".join(lines) + "\n"
    print(md)
    out = ROOT / "benchmarks" / "results"
    out.mkdir(parents=True, exist_ok=True)
    record = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]), "torch_version": torch.__version__,
        "device": f"cpu: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads",
        "git_commit": _git_commit(), "units": args.units, "timeline_events": len(prof.timeline),
        "storages": len(prof.storages), "fingerprint_s": round(fp_s, 4), "rows": rows,
    }
    (out / "plan_speed.json").write_text(json.dumps(record, indent=2))
    (out / "plan_speed.md").write_text(md)


def _f(x):
    return "" if x is None else f"{x:.2f}"


def _git_commit() -> str:
    try:
        return subprocess.check_output(["git", "rev-parse", "HEAD"], cwd=ROOT, text=True).strip()
    except Exception:
        return "unknown"


if __name__ == "__main__":
    main()
