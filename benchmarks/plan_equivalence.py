"""Does a refactor change what the planner chooses? The plans of the fidelity suites, recorded.

    .venv/bin/python benchmarks/plan_equivalence.py --label after
    PYTHONPATH=<old checkout's package dir> .venv/bin/python benchmarks/plan_equivalence.py --label before
    .venv/bin/python benchmarks/plan_equivalence.py --compare before after

Replays, without training, every planner call of the joint-fidelity suite
(tests/test_joint_fidelity.py: sampled optimizer × precision × NS × micro-batch options at
sampled budgets, random recompute sets, the README default path at 50% and 80%) and of the
fitting-levers suite (tests/test_fitting_levers.py: each lever pinned, at the minimum feasible
budget and half-way to the unplanned peak), and writes, for each call, the plan's choices, its
predicted peak and its predicted step time. ``--compare`` lists every plan whose choices
differ and the largest relative change of a prediction. The script reads plans only through
attributes that both the old and the new ``Plan`` have, so one copy runs against either.

Writes benchmarks/results/plan_equivalence_<label>.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
import sys
import time
import zlib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import _record  # noqa: E402

RESULTS = _record.RESULTS


def _choices(plan) -> dict:
    o = plan.optimizer
    offload = getattr(plan, "state_offload", None)  # the new Plan names it; the old one kept it on OptimizerPlan
    return {
        "decisions": {u: d.value for u, d in plan.decisions.items()},
        "optimizer": [o.name, o.state_dtype, o.ns_steps, bool(o.offload if offload is None else offload)],
        "micro_batch": [plan.micro_batch_size, plan.grad_accum_steps],
        "weights": plan.weights,
        "in_backward": bool(plan.optimizer_in_backward),
        "loss_chunks": plan.loss_chunks,
    }


def _entry(plan) -> dict:
    return {"choices": _choices(plan), "predicted_peak_bytes": plan.predicted_peak_bytes,
            "predicted_step_ms": plan.predicted_step_ms}


def _min_feasible(memtune, prof, opts) -> int:
    from memtune.errors import InfeasibleBudgetError

    try:
        memtune.plan(prof, 1, **opts)
    except InfeasibleBudgetError as e:
        return e.min_feasible_bytes
    raise AssertionError("a one-byte budget fitted")


def _pinned_options(opt, micro) -> dict:
    """tests/test_joint_fidelity.py's options, in the words both versions understand."""
    return dict(optimizer=opt.name, state_dtypes=(opt.state_dtype,), min_ns_steps=opt.ns_steps or None,
                max_ns_steps=opt.ns_steps or None, allow_microbatching=micro is not None,
                micro_batch_sizes=(micro,) if micro is not None else None)


def joint_fidelity(memtune) -> dict:
    """The planner calls of tests/test_joint_fidelity.py, with the same seeds."""
    import test_joint_fidelity as jf

    out = {}
    for name in sorted(jf.CASES):
        case = jf.CASES[name]
        prof = jf._profile(case)
        rng = random.Random(zlib.crc32(name.encode()))
        steps = list(prof.optimizer_steps)
        micros = (list(prof.recorded_choices("micro_batch_size")) if hasattr(prof, "recorded_choices")
                  else [None, *prof.micro_batch_sizes])
        for k in range(jf.PLANNED_PER_MODEL):
            rec = rng.choice(steps)
            micro = rng.choice(micros)
            opts = _pinned_options(rec, micro)
            lo = _min_feasible(memtune, prof, opts)
            hi = memtune.plan(prof, 1 << 50, **opts).predicted_peak_bytes
            budget = int(lo + rng.random() * max(0, hi - lo))
            out[f"{name}/planned{k}"] = {"min_feasible_bytes": lo, **_entry(memtune.plan(prof, budget, **opts))}
        for k in range(jf.RANDOM_PER_MODEL):
            rec = rng.choice(steps)
            micro = rng.choice(micros)
            decisions = {u.fqn: memtune.Decision.RECOMPUTE if (rng.random() < 0.5 and not u.recompute_blocker)
                         else memtune.Decision.SAVE for u in prof.units}
            draft = memtune.plan(prof, 1 << 50, **_pinned_options(rec, micro))
            plan = dataclasses.replace(draft, decisions=decisions)
            out[f"{name}/random{k}"] = {"choices": _choices(plan),
                                        "predicted_peak_bytes": memtune.predict_peak(prof, plan).peak_bytes}
        prof = memtune.profile(jf.fresh(case), case.batch, loss_fn=case.loss_fn, target="cpu")
        for frac in (0.5, 0.8):
            budget = int(prof.baseline_peak_bytes * frac)
            try:
                plan = memtune.plan(prof, budget)
            except memtune.InfeasibleBudgetError as e:
                plan = memtune.plan(prof, e.min_feasible_bytes)
            out[f"{name}/default@{frac}"] = _entry(plan)
        print(f"  {name}: done", flush=True)
    return out


def fitting_levers(memtune) -> dict:
    """The planner calls of tests/test_fitting_levers.py."""
    import test_fitting_levers as fl

    out = {}
    for name in sorted(fl.CASES):
        case = fl.CASES[name]
        prof = fl._profile(case)
        for dim, opts in fl.DIMENSIONS.items():
            lo = _min_feasible(memtune, prof, opts)
            for frac in (0.0, 0.5):
                budget = int(lo + frac * (prof.baseline_peak_bytes - lo))
                out[f"{name}/{dim}@{frac}"] = {"min_feasible_bytes": lo, **_entry(memtune.plan(prof, budget, **opts))}
        print(f"  {name}: done", flush=True)
    case = fl.CASES["gpt"]
    prof = memtune.profile(fl.fresh(case), case.batch, target="cpu")
    out["gpt/defaults@30%"] = _entry(memtune.plan(prof, int(prof.baseline_peak_bytes * 0.3)))
    return out


def record(label: str) -> Path:
    import memtune

    t0 = time.perf_counter()
    data = {"environment": _record.environment(), "memtune_file": memtune.__file__,
            "joint_fidelity": joint_fidelity(memtune), "fitting_levers": fitting_levers(memtune)}
    data["seconds"] = round(time.perf_counter() - t0, 1)
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"plan_equivalence_{label}.json"
    path.write_text(json.dumps(data, indent=1, sort_keys=True))
    print(f"{sum(len(data[s]) for s in ('joint_fidelity', 'fitting_levers'))} plans in {data['seconds']} s -> {path}")
    return path


def compare(a: str, b: str) -> int:
    old = json.loads((RESULTS / f"plan_equivalence_{a}.json").read_text())
    new = json.loads((RESULTS / f"plan_equivalence_{b}.json").read_text())
    differ, worst = [], {"predicted_peak_bytes": (0.0, ""), "predicted_step_ms": (0.0, ""),
                         "min_feasible_bytes": (0.0, "")}
    total = 0
    for suite in ("joint_fidelity", "fitting_levers"):
        for key, o in old[suite].items():
            n = new[suite].get(key)
            total += 1
            if n is None:
                differ.append(f"{suite}:{key}: missing in {b}")
                continue
            if o["choices"] != n["choices"]:
                what = {f: (o["choices"][f], n["choices"][f]) for f in o["choices"] if o["choices"][f] != n["choices"][f]}
                differ.append(f"{suite}:{key}: {what}")
            for f in worst:
                if f in o and o[f]:
                    rel = abs(n[f] - o[f]) / abs(o[f])
                    if rel > worst[f][0]:
                        worst[f] = (rel, f"{suite}:{key}")
    print(f"{total} plans compared ({a} -> {b}): {len(differ)} with other choices")
    for d in differ:
        print("  " + d)
    for f, (rel, where) in worst.items():
        print(f"  largest change of {f}: {rel:.4%}" + (f" ({where})" if where else ""))
    return len(differ)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--label", help="record the plans of the memtune on sys.path under this label")
    ap.add_argument("--compare", nargs=2, metavar=("BEFORE", "AFTER"), help="compare two recorded labels")
    args = ap.parse_args()
    if args.label:
        record(args.label)
    if args.compare:
        compare(*args.compare)
    if not (args.label or args.compare):
        ap.error("give --label and/or --compare")


if __name__ == "__main__":
    main()
