"""The greedy planner: fast, no solver, O(N) peak evaluations per configuration.

Per outer configuration (cheapest first, skipping those that cannot beat the best plan):

1. rank units by bytes freed per millisecond of extra step time (recompute, or offload when
   allowed, whichever is cheaper per byte), and walk the ranking, marking a unit when that
   does not raise the predicted peak, until the plan fits;
2. if it still does not fit, steepest descent on the peak: repeatedly apply the single change
   (any unit, any decision) that lowers the peak most, until the plan fits or nothing helps;
3. relaxation: undo marks that are no longer needed, most expensive first.

Each plan is evaluated on the peak rows of :class:`~memtune.timeline.TimelineModel`, the rows
``predict_peak`` and the exact planner read.
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
            state = greedy_decisions(tm, cc, table, U, allow_offload=offload_allowed(profile, options))
            if state is None:
                continue
            plan = make_plan(profile, budget, cfg, state, planner=self.name, options=options, table=table)
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
        return make_plan(profile, budget, Config(frugal.optimizer, frugal.variant, frugal.grad_accum_steps),
                         frugal.decisions, planner=self.name, options=options, notes=(note,))


def greedy_decisions(tm: TimelineModel, cc: ConfigConstants, table, U: float, *, allow_offload: bool,
                     minimize_peak: bool = False) -> dict[str, Decision] | None:
    """Greedy decisions for one configuration that fit ``U`` (``None`` if none found).
    With ``minimize_peak``, keep descending until no single change lowers the peak."""
    search = _Search(tm, cc, table, allow_offload=allow_offload)
    if search.cur <= U and not minimize_peak:
        return search.decisions()
    search.walk_ranking(U, minimize_peak)
    search.descend(U, minimize_peak)
    if search.cur > U:
        return None
    if not minimize_peak:
        search.relax(U)
    return search.decisions()


class _Search:
    """The state of one greedy search: the decision vectors, the current peak and the costs."""

    def __init__(self, tm: TimelineModel, cc: ConfigConstants, table, *, allow_offload: bool):
        self.tm, self.cc, self.allow_offload = tm, cc, allow_offload
        self.x = np.zeros(tm.N)
        self.r = np.zeros(tm.N)
        self.rc = np.array([table.recompute_ms[f] for f in tm.fqns])
        self.off = np.array([table.offload_ms[f] for f in tm.fqns])
        self.can_rc = tm.recomputable
        self.use_off = allow_offload & ((self.off < self.rc) | ~self.can_rc)
        self.cur = self.peak()

    def peak(self) -> float:
        return self.tm.peak(self.cc, self.x, self.r)

    def decisions(self) -> dict[str, Decision]:
        return self.tm.decisions(self.x, self.r)

    def walk_ranking(self, U: float, minimize_peak: bool) -> None:
        """1. Rank units by the bytes they free on their own (their groups with no other holder)
        per millisecond, and mark each in turn while that does not raise the peak."""
        tm, x, r = self.tm, self.x, self.r
        own = np.zeros(tm.N)
        for g in range(tm.G):
            if len(tm.g_holders[g]) == 1 and not tm.g_blockers[g]:
                own[tm.g_holders[g][0]] += tm.g_bytes[g]
        shared = np.asarray(tm.H.sum(axis=0)).ravel() > 0
        cost = np.where(self.use_off, self.off, self.rc)
        benefit = own + 1e-3 * shared  # units that only share storages still rank (last)
        order = sorted(range(tm.N), key=lambda u: (-benefit[u] / max(cost[u], 1e-12), u))
        for u in order:
            if not (self.use_off[u] or self.can_rc[u]):
                continue  # neither recomputable nor offloadable
            x[u] = 1.0
            r[u] = 0.0 if self.use_off[u] else 1.0
            new = self.peak()
            if new <= self.cur:
                self.cur = new
                if self.cur <= U and not minimize_peak:
                    break
            else:
                x[u] = r[u] = 0.0

    def descend(self, U: float, minimize_peak: bool) -> None:
        """2. Steepest descent on the peak: apply the single change (any unit, any decision) that
        lowers the peak most, until it fits or nothing helps."""
        x, r = self.x, self.r
        evals = 0
        choices = [(1.0, 1.0), (0.0, 0.0)] + ([(1.0, 0.0)] if self.allow_offload else [])
        deadline = time.perf_counter() + 5.0
        while (self.cur > U or minimize_peak) and evals < DESCENT_EVAL_LIMIT and time.perf_counter() < deadline:
            best = (self.cur, None)
            for u in range(self.tm.N):
                old = (x[u], r[u])
                for ch in choices:
                    if ch == old or (ch[1] and not self.can_rc[u]):
                        continue
                    x[u], r[u] = ch
                    val = self.peak()
                    evals += 1
                    if val < best[0] - 1e-9:
                        best = (val, (u, ch))
                x[u], r[u] = old
            if best[1] is None:
                break
            u, ch = best[1]
            x[u], r[u] = ch
            self.cur = best[0]

    def relax(self, U: float) -> None:
        """3. Undo the most expensive marks that are no longer needed; then swap a recompute for
        an offload (or back) where that is cheaper and still fits."""
        x, r, rc, off = self.x, self.r, self.rc, self.off
        marked = sorted(np.nonzero(x)[0], key=lambda u: (-(rc[u] if r[u] else off[u]), u))
        for u in marked:
            old = (x[u], r[u])
            x[u] = r[u] = 0.0
            if self.peak() > U:
                x[u], r[u] = old
        if not self.allow_offload:
            return
        for u in np.nonzero(x)[0]:
            old = (x[u], r[u])
            alt = (1.0, 0.0) if r[u] else (1.0, 1.0)
            if alt[1] and not self.can_rc[u]:
                continue
            if (rc[u] if alt[1] else off[u]) < (rc[u] if old[1] else off[u]):
                x[u], r[u] = alt
                if self.peak() > U:
                    x[u], r[u] = old
