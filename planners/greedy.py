"""The greedy planner: fast, no solver, O(N) peak evaluations per configuration.

Per outer configuration (cheapest first, skipping those that cannot beat the best plan):

1. rank (unit, option) pairs by bytes freed per millisecond of extra step time (full
   recomputation or offload, whichever is cheaper, and each selective save set), and walk the
   ranking, taking an option when it frees more than the unit's current one and does not raise
   the predicted peak, until the plan fits;
2. if it still does not fit, steepest descent on the peak: repeatedly apply the single change
   (any unit, any decision, any selective save set) that lowers the peak most, until the plan
   fits or nothing helps;
3. relaxation: most expensive first, move each marked unit to its cheapest option that still
   fits: SAVE, a selective save set that recomputes less, or offload instead of recomputation.

Each plan is evaluated on the peak rows of :class:`~memtune.timeline.TimelineModel`, the rows
``predict_peak`` and the exact planner read.
When greedy can miss a plan that exact finds is documented in docs/planners.md.
"""

from __future__ import annotations

import time

import numpy as np

from memtune.budget import Budget
from memtune.plan import Plan
from memtune.profile import ModelProfile

from memtune.timeline import ConfigConstants, TimelineModel, UnitChoices

from .options import (Config, PlannerOptions, choose_tier, configs, costs_for, host_limit, make_plan, offload_allowed,
                      prunable, timeline_for)

SAVE, RECOMPUTE, OFFLOAD = (0.0, 0.0, 0), (1.0, 1.0, 0), (1.0, 0.0, 0)
"""A unit's (x, r, s) option triples (SELECTIVE is (1, 1, k) for its level k)."""

DESCENT_EVAL_LIMIT = 200_000
"""Peak evaluations the descent phase may spend per configuration (N² for N units, capped)."""


class GreedyPlanner:
    name = "greedy"

    def plan(self, profile: ModelProfile, budget: Budget, *, options: PlannerOptions) -> Plan:
        U, H = float(budget.usable_bytes), host_limit(profile, options)
        cands = sorted(((costs_for(profile, c, options), c) for c in configs(profile, options)),
                       key=lambda t: (t[1].lossiness if options.prefer_lossless else 0, t[0].base.total_ms, t[1].key))
        per_tier: dict[int, Plan] = {}
        floor_ms = min((t.base.total_ms for t, _ in cands), default=0.0)
        for table, cfg in cands:
            tier = cfg.lossiness if options.prefer_lossless else 0
            best = per_tier.get(tier)
            if best is not None and table.base.total_ms >= best.predicted_step_ms - 1e-12:
                continue
            if prunable(per_tier, tier, floor_ms, options):
                continue
            tm, cc = timeline_for(profile, cfg)
            if cc.fixed_peak > U:
                continue
            state = greedy_decisions(tm, cc, table, U, allow_offload=offload_allowed(profile, options), host_budget=H)
            if state is None:
                continue
            plan = make_plan(profile, budget, cfg, state.decisions, planner=self.name, options=options, table=table,
                             save_ops=state.save_ops)
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
                         frugal.decisions, planner=self.name, options=options, notes=(note,), save_ops=frugal.save_ops)


def greedy_decisions(tm: TimelineModel, cc: ConfigConstants, table, U: float, *, allow_offload: bool,
                     minimize_peak: bool = False, host_budget: float = float("inf")) -> UnitChoices | None:
    """Greedy decisions for one configuration that fit ``U`` and ``host_budget`` (``None`` if
    none found). With ``minimize_peak``, keep descending until no single change lowers the peak."""
    host_left = host_budget - tm.host_bytes(cc)
    if host_left < 0:
        return None  # the configuration's offloaded state alone is over the host budget
    search = _Search(tm, cc, table, allow_offload=allow_offload, host_left=host_left)
    if search.cur <= U and not minimize_peak:
        return search.choices()
    search.walk_ranking(U, minimize_peak)
    search.descend(U, minimize_peak)
    if search.cur > U:
        return None
    if not minimize_peak:
        search.relax(U)
    return search.choices()


class _Search:
    """The state of one greedy search: the decision vectors, the current peak and the costs.
    Each unit's options are (x, r, s) triples with their added time: SAVE, its selective levels,
    full recomputation and offload, as far as they are allowed."""

    def __init__(self, tm: TimelineModel, cc: ConfigConstants, table, *, allow_offload: bool,
                 host_left: float = float("inf")):
        from .exact import column_ms

        self.tm, self.cc, self.allow_offload = tm, cc, allow_offload
        self.host_left, self.host_used = host_left, 0.0   # pinned bytes OFFLOAD units may take, and take
        self.x = np.zeros(tm.N)
        self.r = np.zeros(tm.N)
        self.s = np.zeros(tm.N, dtype=np.int64)
        col_ms = column_ms(tm, table)
        self.rc = col_ms[:tm.N]
        self.off = col_ms[tm.N:2 * tm.N]
        self.can_rc = tm.recomputable
        self.use_off = allow_offload & ((self.off < self.rc) | ~self.can_rc)
        self.options: list[list[tuple[tuple[float, float, int], float]]] = []
        for u in range(tm.N):
            opts = [(SAVE, 0.0)]
            if self.can_rc[u]:
                opts += [((1.0, 1.0, k), float(col_ms[tm.q_start[u] + k - 1])) for k in range(1, int(tm.K[u]) + 1)]
                opts.append((RECOMPUTE, float(self.rc[u])))
            if allow_offload:
                opts.append((OFFLOAD, float(self.off[u])))
            self.options.append(opts)
        self.cur = self.peak()

    def peak(self) -> float:
        return self.tm.peak(self.cc, self.x, self.r, self.s)

    def choices(self) -> UnitChoices:
        return self.tm.choices(self.x, self.r, self.s)

    def _get(self, u: int) -> tuple[float, float, int]:
        return (self.x[u], self.r[u], int(self.s[u]))

    def _set(self, u: int, opt: tuple[float, float, int]) -> None:
        hb = self.tm.offload_host_bytes[u]
        self.host_used += (hb if opt == OFFLOAD else 0.0) - (hb if self._get(u) == OFFLOAD else 0.0)
        self.x[u], self.r[u], self.s[u] = opt

    def _host_ok(self, u: int, opt: tuple[float, float, int]) -> bool:
        """Whether ``u`` may take ``opt`` within the host budget (only OFFLOAD uses host memory)."""
        if opt != OFFLOAD or self._get(u) == OFFLOAD:
            return True
        return self.host_used + self.tm.offload_host_bytes[u] <= self.host_left

    def _cost(self, u: int) -> float:
        now = self._get(u)
        return next((ms for opt, ms in self.options[u] if opt == now), 0.0)

    def walk_ranking(self, U: float, minimize_peak: bool) -> None:
        """1. Rank every (unit, option) by the bytes it frees on its own per millisecond it adds,
        and take each in turn while that does not raise the peak. Options are full
        recomputation or offload (the unit's groups with no other holder) and each selective
        save set (what the unit saves less what the set keeps), so a unit may go to a shallow
        save set first and deeper later; an option never replaces a deeper one."""
        tm = self.tm
        own = np.zeros(tm.N)
        for g in range(tm.G):
            if len(tm.g_holders[g]) == 1 and not tm.g_blockers[g]:
                own[tm.g_holders[g][0]] += tm.g_bytes[g]
        shared = np.asarray(tm.H.sum(axis=0)).ravel() > 0
        whole = np.where(self.use_off, self.off, self.rc)
        cands = []   # (-bytes per ms, unit, depth, option)
        for u in range(tm.N):
            if not (self.use_off[u] or self.can_rc[u]):
                continue  # neither recomputable nor offloadable
            freed = own[u] + 1e-3 * shared[u]  # units that only share storages still rank (last)
            opt = OFFLOAD if self.use_off[u] else RECOMPUTE
            cands.append((-freed / max(whole[u], 1e-12), u, freed, opt))
            if self.can_rc[u]:
                saved = float(tm.profile.units[u].saved_activation_bytes) or 1.0
                for k, pol in enumerate(tm.policies[u], start=1):
                    f = own[u] * max(0.0, 1.0 - (pol.kept_bytes + pol.cached_bytes) / saved)
                    ms = float(self.options[u][k][1])
                    cands.append((-f / max(ms, 1e-12), u, f, (1.0, 1.0, k)))
        cands.sort(key=lambda c: (c[0], c[1], -c[2]))
        depth = np.full(tm.N, -1.0)   # bytes the unit's current option frees
        for _, u, freed, opt in cands:
            if freed <= depth[u] or not self._host_ok(u, opt):
                continue
            old = self._get(u)
            self._set(u, opt)
            new = self.peak()
            if new <= self.cur:
                self.cur, depth[u] = new, freed
                if self.cur <= U and not minimize_peak:
                    break
            else:
                self._set(u, old)

    def descend(self, U: float, minimize_peak: bool) -> None:
        """2. Steepest descent on the peak: apply the single change (any unit, any option) that
        lowers the peak most, until it fits or nothing helps."""
        evals = 0
        deadline = time.perf_counter() + 5.0
        while (self.cur > U or minimize_peak) and evals < DESCENT_EVAL_LIMIT and time.perf_counter() < deadline:
            best = (self.cur, None)
            for u in range(self.tm.N):
                old = self._get(u)
                for opt, _ in self.options[u]:
                    if opt == old or not self._host_ok(u, opt):
                        continue
                    self._set(u, opt)
                    val = self.peak()
                    evals += 1
                    if val < best[0] - 1e-9:
                        best = (val, (u, opt))
                self._set(u, old)
            if best[1] is None:
                break
            u, opt = best[1]
            self._set(u, opt)
            self.cur = best[0]

    def relax(self, U: float) -> None:
        """3. For each marked unit, most expensive first, take its cheapest option that still fits
        (SAVE, a selective level that recomputes less, or offload instead of recomputation)."""
        marked = sorted(np.nonzero(self.x)[0], key=lambda u: (-self._cost(u), u))
        for u in marked:
            old, old_ms = self._get(u), self._cost(u)
            for opt, ms in sorted(self.options[u], key=lambda t: t[1]):
                if ms >= old_ms or opt == old:
                    break
                if not self._host_ok(u, opt):
                    continue
                self._set(u, opt)
                if self.peak() <= U:
                    break
                self._set(u, old)
        self.cur = self.peak()
