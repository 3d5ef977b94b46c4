"""What the runtime asks the planner for, and how it compares plans.

* :func:`plan_space`: what a trainer's profile must record so that every plan its options
  allow is measured (one :class:`memtune.PlanSpace` entry per lever);
* :func:`staged_space`: the cheaper first profiling stage (levers marked
  :attr:`~memtune.levers.Lever.profile_on_demand` left out);
* :func:`option_sets`: the option sets a re-plan tries in turn, from the same maths as the
  running plan to anything that fits;
* :func:`same_plan` and :func:`plan_changes`: whether a new plan differs, and how (events).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from memtune.levers import LEVERS, held_at_default
from memtune.plan import Decision, Plan

PLAN_CHOICES = ("decisions", "optimizer", "variant", "grad_accum_steps", "parallel")
"""The fields of a Plan that are choices (the rest are predictions and bookkeeping)."""


def plan_space(options: dict[str, Any], *, optimizer: str):
    """The :class:`memtune.PlanSpace` that records every plan ``options`` (planner options, as
    ``memtune.plan`` takes them) may return for a run that builds ``optimizer``."""
    from memtune.planners import PlannerOptions
    from memtune.profiler import PlanSpace

    known = {f.name for f in dataclasses.fields(PlannerOptions)}  # others are for the distributed planner
    opts = PlannerOptions(**{k: v for k, v in options.items() if k in known})
    names = opts.optimizer_names or ()
    families = tuple(n for n in names if n != optimizer)
    lo, hi = opts.min_ns_steps, opts.max_ns_steps
    ns = tuple(range(lo if lo is not None else hi, (hi if hi is not None else lo) + 1)) if (lo or hi) else None
    levers = {name: lever.allowed(opts) for name, lever in LEVERS.items()}
    return PlanSpace(optimizers=(optimizer, *families) if families else None, ns_steps=ns,
                     levers={k: v for k, v in levers.items() if v is not None},
                     **({"state_dtypes": tuple(opts.state_dtypes)} if opts.state_dtypes else {}))


def staged_space(space):
    """``space`` without the levers recorded on demand (the first, cheaper profiling stage)."""
    return dataclasses.replace(space, levers={**space.levers, **held_at_default(lambda lever: lever.profile_on_demand)})


def option_sets(base: dict[str, Any], current: Plan | None, *, lossless: bool,
                allow_microbatching: bool) -> list[dict[str, Any]]:
    """Option sets to try, in turn. A running plan's levers that cannot change mid-run keep
    their choice in all of them. With ``lossless``, first the running plan's maths exactly (its
    state precision, NS steps and every lever that changes numbers; only unit decisions and
    lossless levers move), then its state precision with every lever open, then anything."""
    full = dict(base, allow_microbatching=allow_microbatching)
    if current is not None:
        pinned = {name: (current.variant[name],) for name, lever in LEVERS.items() if not lever.changeable_mid_run}
        full["levers"] = {**full.get("levers", {}), **pinned}
    if not lossless or current is None:
        return [full]
    exact = {name: (current.variant[name],) for name, lever in LEVERS.items() if not lever.lossless}
    same = dict(full, state_dtypes=(current.optimizer.state_dtype,), levers={**full["levers"], **exact})
    if current.optimizer.ns_steps:  # NS steps change the update too: keep them for exact maths
        same.update(min_ns_steps=current.optimizer.ns_steps, max_ns_steps=current.optimizer.ns_steps)
    same_dtype = dict(full, state_dtypes=(current.optimizer.state_dtype,))
    return [same, same_dtype, full]


def save_sets(plan: Plan) -> dict[str, tuple[str, ...]]:
    """The save set of each SELECTIVE unit of ``plan``: a choice too, kept beside the decisions
    (a plan that changes only what a SELECTIVE unit keeps is another plan)."""
    return {u: tuple(plan.save_ops.get(u, ())) for u, d in plan.decisions.items() if d is Decision.SELECTIVE}


def same_plan(a: Plan, b: Plan) -> bool:
    return all(getattr(a, f) == getattr(b, f) for f in PLAN_CHOICES) and save_sets(a) == save_sets(b)


def plan_changes(old: Plan, new: Plan) -> dict[str, Any]:
    """What changed between two plans, for the run's events."""
    changes: dict[str, Any] = {}
    to_rc = [u for u, d in new.decisions.items() if d is not Decision.SAVE and old.decisions.get(u) is Decision.SAVE]
    to_save = [u for u, d in new.decisions.items() if d is Decision.SAVE and old.decisions.get(u) is not Decision.SAVE]
    if to_rc:
        changes["save->recompute"] = to_rc
    if to_save:
        changes["recompute->save"] = to_save
    old_sets, new_sets = save_sets(old), save_sets(new)
    resaved = [u for u, ops in new_sets.items() if u in old_sets and old_sets[u] != ops]
    if resaved:
        changes["save_ops"] = resaved
    for name in ("ns_steps", "state_dtype"):
        if getattr(new.optimizer, name) != getattr(old.optimizer, name):
            changes[name] = [getattr(old.optimizer, name), getattr(new.optimizer, name)]
    for name, lever in LEVERS.items():
        if new.variant[name] != old.variant[name]:
            changes[name] = [lever.encode(old.variant[name]), lever.encode(new.variant[name])]
    if new.grad_accum_steps != old.grad_accum_steps:
        changes["grad_accum_steps"] = [old.grad_accum_steps, new.grad_accum_steps]
    if new.parallel != old.parallel:
        changes["parallel"] = [dataclasses.asdict(p) if p is not None else None for p in (old.parallel, new.parallel)]
    return changes
