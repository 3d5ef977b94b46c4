"""The exact planner: a MILP (``scipy.optimize.milp``, HiGHS) over unit decisions, solved per
outer configuration (state precision × NS steps × micro-batch) in order of the
configuration's no-recompute step time, stopping as soon as no remaining configuration can
beat the best plan found.

The MILP restates :func:`memtune.memory_model.predict_peak` exactly (docs/planners.md):

    minimize   Σ_u rc_ms(u)·r_u + off_ms(u)·o_u
    s.t.       r_u + o_u ≤ 1                      (x_u := r_u + o_u: unit not SAVE)
               e_g ≤ x_h        for every holder h of group g
               e_g ≤ 1 − x_v    for every non-SAVE-able unit v taking g as an input
               D_i = D_{i−1} + Σ_{lo_g=i} b_g e_g − Σ_{hi_g=i} b_g e_g
                             − Σ_{fe(u)=i} k_u x_u + Σ_{bs(u)=i} k_u x_u      (difference array)
               c_i − s·D_i ≤ U                     for every interval outside the optimizer step
               a_u − s·(D_bs(u) + Σ_{g restored by u} b_g e_g) ≤ U + M_u (1 − r_u)

``e_g`` only ever lowers a peak, so upper bounds suffice: an optimal solution can always
raise ``e_g`` to the AND of its bounds. Constraints have O(T + G + N) non-zeros. Every plan
is re-checked with ``predict_peak``; if rounding ever made it exceed the budget, the bound is
tightened by the excess and the MILP re-solved.

HiGHS runs in a child process (:mod:`memtune.planners.highs`): if it aborts or hangs twice on a
configuration, greedy plans that configuration and the plan says so in its notes.
"""

from __future__ import annotations

import dataclasses
import time

import numpy as np
import scipy.sparse as sp

from memtune.budget import Budget
from memtune.plan import Decision, Plan
from memtune.profile import ModelProfile

from memtune.timeline import ConfigConstants, TimelineModel

from . import highs
from .options import (PlannerOptions, choose_tier, configs, costs_for, make_plan, offload_allowed, prunable,
                      timeline_for)

MAX_TIGHTEN = 4


class ExactPlanner:
    """Minimum predicted step time subject to predicted peak ≤ usable budget."""

    name = "exact"

    def plan(self, profile: ModelProfile, budget: Budget, *, options: PlannerOptions) -> Plan:
        U = float(budget.usable_bytes)
        cands = []
        for cfg in configs(profile, options):
            table = costs_for(profile, cfg, options)
            tier = cfg.lossiness if options.prefer_lossless else 0
            cands.append((tier, table.base.total_ms, cfg.key, cfg, table))
        cands.sort(key=lambda t: (t[0], t[1], t[2]))
        per_tier: dict[int, Plan] = {}
        deadline = time.perf_counter() + options.time_limit_s
        for tier, base_ms, _, cfg, table in cands:
            best = per_tier.get(tier)
            if best is not None and base_ms >= best.predicted_step_ms - 1e-12:
                continue  # cannot beat this tier's best: its time without any recompute is already slower
            if prunable(per_tier, tier, base_ms, options):
                continue
            tm, cc = timeline_for(profile, cfg)
            if cc.fixed_peak > U:
                continue
            left = max(0.05, deadline - time.perf_counter())
            sol = solve_config(tm, cc, table, U, allow_offload=offload_allowed(profile, options), time_limit_s=left,
                               mip_rel_gap=options.mip_rel_gap)
            if sol is None:
                continue
            decisions, notes = sol
            plan = make_plan(profile, budget, cfg, decisions, planner=self.name, options=options, table=table)
            tighten = 0
            while plan.predicted_peak_bytes > budget.usable_bytes and tighten < MAX_TIGHTEN:
                tighten += 1  # float rounding in the solver: tighten by the excess and re-solve
                excess = plan.predicted_peak_bytes - budget.usable_bytes
                sol = solve_config(tm, cc, table, U - excess * 2**tighten,
                                   allow_offload=offload_allowed(profile, options), time_limit_s=left,
                                   mip_rel_gap=options.mip_rel_gap)
                if sol is None:
                    break
                decisions, notes = sol
                notes = notes + (f"MILP bound tightened {tighten}x so predict_peak agrees",)
                plan = make_plan(profile, budget, cfg, decisions, planner=self.name, options=options, table=table)
            if plan.predicted_peak_bytes > budget.usable_bytes:  # still disagrees: greedy for this configuration
                from .greedy import fit

                decisions = fit(tm, cc, table, U, allow_offload=offload_allowed(profile, options))
                if decisions is None:
                    continue
                notes = notes + ("the MILP plan failed verification with predict_peak; greedy planned this "
                                 "configuration",)
                plan = make_plan(profile, budget, cfg, decisions, planner=self.name, options=options, table=table)
                if plan.predicted_peak_bytes > budget.usable_bytes:
                    continue
            if best is None or plan.predicted_step_ms < best.predicted_step_ms - 1e-12:
                per_tier[tier] = dataclasses.replace(plan, notes=notes) if notes else plan
        if not per_tier:
            from .infeasible import infeasible_error
            raise infeasible_error(profile, budget, options)
        return choose_tier(per_tier, options)


def _byte_scale(tm: TimelineModel, cc: ConfigConstants, U: float) -> float:
    biggest = max(U, float(np.abs(cc.c).max(initial=1.0)), 1.0)
    return float(2 ** max(0, int(np.ceil(np.log2(biggest))) - 20))


def solve_config(tm: TimelineModel, cc: ConfigConstants, table, U: float, *, allow_offload: bool,
                 time_limit_s: float, minimize_peak: bool = False, mip_rel_gap: float = 1e-5
                 ) -> tuple[dict[str, Decision], tuple[str, ...]] | None:
    """Optimal unit decisions for one configuration, or ``None`` if none fits ``U``.

    With ``minimize_peak`` the objective is the peak itself (``U`` is ignored): the most
    memory-frugal decisions of this configuration."""
    N, G, n = tm.N, tm.G, tm.n
    x0 = np.zeros(N)
    if not minimize_peak and tm.peak(cc, x0, x0) <= U:
        return {f: Decision.SAVE for f in tm.fqns}, ()
    S = _byte_scale(tm, cc, U)
    no = N if allow_offload else 0
    iR, iO, iE, iD = 0, N, N + no, N + no + G
    iP = iD + n
    nv = iP + (1 if minimize_peak else 0)
    rows, cols, vals, lo, hi = [], [], [], [], []
    r = 0

    def add(entries, lb, ub):
        nonlocal r
        for c, v in entries:
            rows.append(r)
            cols.append(c)
            vals.append(v)
        lo.append(lb)
        hi.append(ub)
        r += 1

    def xterms(u, coef):  # x_u = r_u + o_u
        return [(iR + u, coef)] + ([(iO + u, coef)] if allow_offload else [])

    if allow_offload:
        for u in range(N):
            add([(iR + u, 1.0), (iO + u, 1.0)], -np.inf, 1.0)
    for g in range(G):
        for h in tm.g_holders[g]:
            add([(iE + g, 1.0)] + xterms(h, -1.0), -np.inf, 0.0)
        for v in tm.g_blockers[g]:
            add([(iE + g, 1.0)] + xterms(v, 1.0), -np.inf, 1.0)
    # Difference array: D_i - D_{i-1} - (group starts - group ends) + (unsaved kept inputs) = 0
    starts: dict[int, list] = {}
    for g in range(G):
        b = tm.g_bytes[g] / S
        starts.setdefault(int(tm.g_lo[g]), []).append((iE + g, -b))
        starts.setdefault(int(tm.g_hi[g]), []).append((iE + g, b))
    for u in range(N):
        k = tm.unsaved[u] / S
        if k > 0:
            starts.setdefault(int(tm.fe[u]), []).extend(xterms(u, k))
            starts.setdefault(int(tm.be[u]), []).extend(xterms(u, -k))
    for i in range(n):
        e = [(iD + i, 1.0)] + ([(iD + i - 1, -1.0)] if i else []) + starts.get(i, [])
        add(e, 0.0, 0.0)
    Us = U / S
    for i in range(n):
        if tm.is_opt[i]:
            continue
        if minimize_peak:
            add([(iD + i, -1.0), (iP, -1.0)], -np.inf, -cc.c[i] / S)
        else:
            add([(iD + i, -1.0)], -np.inf, Us - cc.c[i] / S)
    for j, i in enumerate(tm.step_idx):  # an optimizer step in backward: that parameter's update
        if minimize_peak:
            add([(iD + int(i), -1.0), (iP, -1.0)], -np.inf, -cc.s_vals[j] / S)
        else:
            add([(iD + int(i), -1.0)], -np.inf, Us - cc.s_vals[j] / S)
    kmax = tm.unsaved.sum() / S
    restored: dict[int, list[int]] = {}
    for g in range(G):
        if tm.g_restorer[g] >= 0:
            restored.setdefault(int(tm.g_restorer[g]), []).append(g)
    for u in range(N):
        if tm.bs[u] < 0:
            continue
        a = cc.a[u] / S
        terms = [(iD + int(tm.bs[u]), -1.0)] + [(iE + g, -tm.g_bytes[g] / S) for g in restored.get(u, [])]
        if minimize_peak:
            M = max(0.0, a + kmax)
            add(terms + [(iR + u, M), (iP, -1.0)], -np.inf, M - a)
        else:
            M = a + kmax - Us
            if M <= 0:
                continue  # can never exceed the budget
            add(terms + [(iR + u, M)], -np.inf, Us + M - a)
    A = sp.csr_matrix((vals, (rows, cols)), shape=(r, nv))
    cost = np.zeros(nv)
    if minimize_peak:
        cost[iP] = 1.0
        # A whisper of time so that, among the most frugal plans, the faster one wins.
        tot = sum(table.recompute_ms.values()) + sum(table.offload_ms.values()) + 1e-9
        eps = 1e-6 * max(1.0, float(np.abs(cc.c).max()) / S) / tot
        cost[iR:iR + N] = [eps * table.recompute_ms[f] for f in tm.fqns]
        if allow_offload:
            cost[iO:iO + N] = [eps * table.offload_ms[f] for f in tm.fqns]
    else:
        cost[iR:iR + N] = [table.recompute_ms[f] for f in tm.fqns]
        if allow_offload:
            cost[iO:iO + N] = [table.offload_ms[f] for f in tm.fqns]
    # A fixed variable carrying the configuration's base step time: HiGHS's relative gap is then
    # relative to the whole step time, not to the (small) recompute/offload part of it.
    cost = np.append(cost, 0.0 if minimize_peak else table.base.total_ms)
    nv += 1
    A = sp.hstack([A, sp.csr_matrix((r, 1))], format="csr")
    integrality = np.zeros(nv)
    integrality[iR:iR + N + no] = 1
    lb = np.zeros(nv)
    ub = np.ones(nv)
    ub[iR:iR + N] = tm.recomputable  # units whose recomputation is unsafe are never RECOMPUTE
    lb[-1] = ub[-1] = 1.0
    lb[iD:iD + n] = -np.inf
    ub[iD:iD + n] = np.inf
    if minimize_peak:
        lb[iP] = cc.fixed_peak / S
        ub[iP] = np.inf
    try:
        res = highs.solve(cost, A, np.asarray(lo, dtype=float), np.asarray(hi, dtype=float), integrality, lb, ub,
                          time_limit_s=time_limit_s, mip_rel_gap=mip_rel_gap)
    except highs.SolverFailed as e:
        from .greedy import fit

        decisions = fit(tm, cc, table, U, allow_offload=allow_offload, minimize_peak=minimize_peak)
        if decisions is None:
            return None
        return decisions, (f"HiGHS failed on this configuration ({e}); greedy planned it",)
    if res.x is None:
        return None
    notes: tuple[str, ...] = ()
    if res.status != 0:
        notes = (f"MILP stopped before proving optimality ({res.message.strip()}); the plan is the best found",)
    rr = np.round(res.x[iR:iR + N])
    oo = np.round(res.x[iO:iO + N]) if allow_offload else np.zeros(N)
    decisions = {f: Decision.RECOMPUTE if rr[k] else Decision.OFFLOAD if oo[k] else Decision.SAVE
                 for k, f in enumerate(tm.fqns)}
    return decisions, notes
