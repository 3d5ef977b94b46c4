"""The greedy planner: fast, no solver, O(N) peak evaluations per configuration.

Per outer configuration (cheapest first, skipping those that cannot beat the best plan):

1. rank units by bytes freed per millisecond of extra step time (recompute, or offload when
   allowed, whichever is cheaper per byte);
2. walk the ranking, marking a unit when that does not raise the predicted peak, until the
   plan fits;
3. if it still does not fit, steepest descent on the peak: repeatedly apply the single change
   (any unit, any decision) that lowers the peak most, until the plan fits or nothing helps;
4. relaxation: undo marks that are no longer needed, most expensive first.

Each plan is evaluated with :class:`~memtune.timeline.TimelineModel` (the same model
``predict_peak`` uses) and the final plan is re-checked with ``predict_peak`` itself.
When greedy can miss a plan that exact finds is documented in docs/planners.md.
"""

from __future__ import annotations

import time

import numpy as np

from memtune.budget import Budget
from memtune.plan import Decision, Plan
from memtune.profile import ModelProfile

from memtune.timeline import ConfigConstants, TimelineModel

from .options import (Config, PlannerOptions, choose_tier, configs, costs_for, make_plan, offload_allowed, prunable,
                      timeline_for)

DESCENT_EVAL_LIMIT = 200_000
"""Peak evaluations the descent phase may spend per configuration (N² for N units, capped)."""


class GreedyPlanner:
    name = "greedy"

    def plan(self, profile: ModelProfile, budget: Budget, *, options: PlannerOptions) -> Plan:
        U = float(budget.usable_bytes)
        cands = sorted(((costs_for(profile, c, options), c) for c in configs(profile, options)),
                       key=lambda t: (t[1].lossiness if options.prefer_lossless else 0, t[0].base.total_ms, t[1].key))
        per_tier: dict[int, Plan] = {}
        for table, cfg in cands:
            tier = cfg.lossiness if options.prefer_lossless else 0
            best = per_tier.get(tier)
            if best is not None and table.base.total_ms >= best.predicted_step_ms - 1e-12:
                continue
            if prunable(per_tier, tier, table.base.total_ms, options):
                continue
            tm, cc = timeline_for(profile, cfg)
            if cc.fixed_peak > U:
                continue
            state = fit(tm, cc, table, U, allow_offload=offload_allowed(profile, options))
            if state is None:
                continue
            plan = make_plan(profile, budget, cfg, state, planner=self.name, options=options, table=table)
            if plan.predicted_peak_bytes > budget.usable_bytes:
                continue  # the vectorized model and predict_peak disagree (float rounding): skip
            if best is None or plan.predicted_step_ms < best.predicted_step_ms - 1e-12:
                per_tier[tier] = plan
        if per_tier:
            return choose_tier(per_tier, options)
        # Local search can miss plans that need several units changed at once (docs/planners.md).
        # The most frugal plan (a min-peak MILP up to max_exact_units units) settles it.
        from .infeasible import infeasible_error, most_frugal_plan

        frugal = most_frugal_plan(profile, budget, options)
        if frugal.predicted_peak_bytes > budget.usable_bytes:
            raise infeasible_error(profile, budget, options, frugal=frugal)
        note = ("the greedy search found no plan; this is the most memory-frugal plan "
                "(minimum-peak MILP), which fits but is not time-optimized")
        return make_plan(profile, budget, Config(frugal.optimizer, frugal.micro_batch_size, frugal.grad_accum_steps,
                                                 frugal.weights, frugal.optimizer_in_backward, frugal.loss_chunks),
                         frugal.decisions, planner=self.name, options=options, notes=(note,))


def fit(tm: TimelineModel, cc: ConfigConstants, table, U: float, *, allow_offload: bool,
        minimize_peak: bool = False) -> dict[str, Decision] | None:
    """Greedy decisions for one configuration that fit ``U`` (``None`` if none found).
    With ``minimize_peak``, keep descending until no single change lowers the peak."""
    N = tm.N
    x = np.zeros(N)
    r = np.zeros(N)

    def peak() -> float:
        return tm.peak(cc, x, r)

    cur = peak()
    if cur <= U and not minimize_peak:
        return _decisions(tm, x, r)
    # 1. ranking: bytes a unit frees on its own (its groups with no other holder) per ms.
    own = np.zeros(N)
    for g in range(tm.G):
        if len(tm.g_holders[g]) == 1 and not tm.g_blockers[g]:
            own[tm.g_holders[g][0]] += tm.g_bytes[g]
    shared = np.asarray(tm.H.sum(axis=0)).ravel() > 0
    rc = np.array([table.recompute_ms[f] for f in tm.fqns])
    off = np.array([table.offload_ms[f] for f in tm.fqns])
    can_rc = tm.recomputable
    use_off = allow_offload & ((off < rc) | ~can_rc)
    cost = np.where(use_off, off, rc)
    benefit = own + 1e-3 * shared  # units that only share storages still rank (last)
    order = sorted(range(N), key=lambda u: (-benefit[u] / max(cost[u], 1e-12), u))
    # 2. walk the ranking.
    for u in order:
        if not (use_off[u] or can_rc[u]):
            continue  # neither recomputable nor offloadable
        x[u] = 1.0
        r[u] = 0.0 if use_off[u] else 1.0
        new = peak()
        if new <= cur:
            cur = new
            if cur <= U and not minimize_peak:
                break
        else:
            x[u] = r[u] = 0.0
    # 3. steepest descent on the peak.
    evals = 0
    choices = [(1.0, 1.0), (0.0, 0.0)] + ([(1.0, 0.0)] if allow_offload else [])
    deadline = time.perf_counter() + 5.0
    while (cur > U or minimize_peak) and evals < DESCENT_EVAL_LIMIT and time.perf_counter() < deadline:
        best = (cur, None)
        for u in range(N):
            old = (x[u], r[u])
            for ch in choices:
                if ch == old or (ch[1] and not can_rc[u]):
                    continue
                x[u], r[u] = ch
                val = peak()
                evals += 1
                if val < best[0] - 1e-9:
                    best = (val, (u, ch))
            x[u], r[u] = old
        if best[1] is None:
            break
        u, ch = best[1]
        x[u], r[u] = ch
        cur = best[0]
    if cur > U:
        return None
    # 4. relaxation: undo the most expensive marks that are no longer needed.
    if not minimize_peak:
        marked = sorted(np.nonzero(x)[0], key=lambda u: (-(rc[u] if r[u] else off[u]), u))
        for u in marked:
            old = (x[u], r[u])
            x[u] = r[u] = 0.0
            if peak() > U:
                x[u], r[u] = old
        # A recompute that offload would do more cheaply (or vice versa), if it still fits.
        if allow_offload:
            for u in np.nonzero(x)[0]:
                old = (x[u], r[u])
                alt = (1.0, 0.0) if r[u] else (1.0, 1.0)
                if alt[1] and not can_rc[u]:
                    continue
                if (rc[u] if alt[1] else off[u]) < (rc[u] if old[1] else off[u]):
                    x[u], r[u] = alt
                    if peak() > U:
                        x[u], r[u] = old
    return _decisions(tm, x, r)


def _decisions(tm: TimelineModel, x: np.ndarray, r: np.ndarray) -> dict[str, Decision]:
    return {f: (Decision.RECOMPUTE if r[k] else Decision.OFFLOAD) if x[k] else Decision.SAVE
            for k, f in enumerate(tm.fqns)}
