"""``memtune.plan`` and ``memtune.pareto``: pick the fastest plan that fits a memory budget.

    >>> prof = memtune.profile(model, batch, target="H100")
    >>> plan = memtune.plan(prof, "24GB")                       # exact MILP by default
    >>> plan = memtune.plan(prof, "24GB", planner="greedy", allow_microbatching=True)
    >>> frontier = memtune.pareto(prof)                          # peak vs step time

Options are the fields of :class:`memtune.planners.PlannerOptions`. A budget no plan fits
raises :class:`~memtune.errors.InfeasibleBudgetError` with the smallest budget that would
fit, the biggest consumers and the changes that would help.
"""

from __future__ import annotations

import dataclasses
import logging

from .budget import Budget
from .errors import InfeasibleBudgetError, OptionError, UsageError
from .plan import Plan
from .profile import ModelProfile

log = logging.getLogger("memtune.planning")


def _options(options: dict):
    from memtune.planners import PlannerOptions

    known = {f.name for f in dataclasses.fields(PlannerOptions)}
    unknown = sorted(set(options) - known)
    if unknown:
        raise OptionError(f"unknown planner option(s) {unknown}; valid options are {sorted(known)}")
    if "host_budget" in options:
        from .budget import parse_host_budget

        options = {**options, "host_budget": parse_host_budget(options["host_budget"])}
    return PlannerOptions(**options)


def plan(profile: ModelProfile, budget: int | str | Budget = "24GB", planner: str | None = None, *,
         reserve: int | str | None = None, **options) -> Plan:
    """The plan with the lowest predicted step time whose predicted peak fits ``budget``.

    Args:
        profile: from :func:`memtune.profile`.
        budget: bytes, ``"24GB"``, ``"80%"``... parsed for ``profile.target_name``
            (:meth:`Budget.parse`); the usable part is the budget minus the reserve
            (1 GiB on CUDA, 0 on CPU).
        planner: a key of :data:`memtune.planners.PLANNERS`; ``None``: ``"exact"``, or
            ``"greedy"`` past ``max_exact_units`` units (said in ``plan.notes`` and logged).
        reserve: override the budget reserve.
        **options: :class:`memtune.planners.PlannerOptions` fields.
    """
    from memtune.planners import PLANNERS

    opts = _options(options)
    b = Budget.parse(budget, device=profile.target_name, reserve=reserve)
    notes: tuple[str, ...] = ()
    if planner is None:
        planner = "exact"
        if len(profile.units) > opts.max_exact_units:
            planner = "greedy"
            msg = (f"{len(profile.units)} units exceed max_exact_units={opts.max_exact_units}: planned with the "
                   f"greedy heuristic, which may be slower than the exact optimum")
            log.warning(msg)
            notes = (msg,)
    if planner not in PLANNERS:
        raise UsageError(f"unknown planner {planner!r}; choose one of {sorted(PLANNERS)}")
    result = PLANNERS[planner].plan(profile, b, options=opts)
    timed_out = [n for n in result.notes if n.startswith("MILP stopped")]
    if timed_out:
        log.warning("%s", timed_out[0])
    if notes:
        result = dataclasses.replace(result, notes=notes + result.notes)
    return result


def pareto(profile: ModelProfile, planner: str | None = None, *, max_points: int = 32,
           reserve: int | str | None = None, **options) -> list[Plan]:
    """Plans on the frontier of predicted peak vs predicted step time, from the fastest (the
    biggest peak) to the most memory-frugal. Each point is the fastest plan whose peak is
    strictly below the previous point's, so with the exact planner every point is optimal
    for its peak; at most ``max_points`` points (then budgets are sampled evenly)."""
    from memtune.planners import PLANNERS

    opts = _options(options)
    planner = planner or ("exact" if len(profile.units) <= opts.max_exact_units else "greedy")
    impl = PLANNERS[planner]
    reserve_bytes = Budget.parse(1 << 62, device=profile.target_name, reserve=reserve).reserve_bytes
    frontier: list[Plan] = []
    budget_bytes = 1 << 62
    while len(frontier) < max_points:
        try:
            p = impl.plan(profile, Budget.parse(budget_bytes, device=profile.target_name, reserve=reserve), options=opts)
        except InfeasibleBudgetError:
            break
        if frontier and p.predicted_peak_bytes >= frontier[-1].predicted_peak_bytes:
            break
        frontier.append(p)
        budget_bytes = p.predicted_peak_bytes - 1 + reserve_bytes
    if len(frontier) == max_points:  # too many points: fall back to evenly spaced budgets
        lo = _min_peak(profile, opts, reserve)
        hi = frontier[0].predicted_peak_bytes
        pts = []
        for k in range(max_points):
            target = hi - (hi - lo) * k // (max_points - 1)
            try:
                p = impl.plan(profile, Budget.parse(target + reserve_bytes, device=profile.target_name,
                                                    reserve=reserve), options=opts)
            except InfeasibleBudgetError:
                continue
            if not pts or p.predicted_peak_bytes < pts[-1].predicted_peak_bytes:
                pts.append(p)
        frontier = pts
    # Equal-time plans with different peaks: keep only the lowest peak (the others are dominated).
    kept: list[Plan] = []
    for p in frontier:
        while kept and kept[-1].predicted_step_ms >= p.predicted_step_ms - 1e-12:
            kept.pop()
        kept.append(p)
    return kept


def _min_peak(profile: ModelProfile, opts, reserve) -> int:
    from memtune.planners.infeasible import most_frugal_plan

    b = Budget.parse(1 << 62, device=profile.target_name, reserve=reserve)
    return most_frugal_plan(profile, b, opts).predicted_peak_bytes
