"""The exact planner: a MILP (``scipy.optimize.milp``, HiGHS) over unit decisions, solved per
outer configuration (optimizer × state precision × NS steps × step variant) in order of the
configuration's no-recompute step time, stopping as soon as no remaining configuration can beat
the best plan found. Configurations that may still beat it are solved a few at a time, side by
side (:func:`memtune.planners.highs.parallel_solves`), with the same result.

The MILP is built from the timeline's own rows (:class:`memtune.timeline.TimelineModel`, whose
docstring names them), so it cannot disagree with :func:`memtune.predict_peak`. In the notation
of ``torch/distributed/_tools/sac_ilp.py``:

    # r_u: unit u is RECOMPUTE;  o_u: unit u is OFFLOAD (when allowed)
    # q_uk: unit u is SELECTIVE with its k-th save set (memtune.selective; level k)
    # e_g: group g's storages are dropped;  D_i: bytes dropped in interval i
    minimize   Σ_u rc_ms(u)·r_u + off_ms(u)·o_u + Σ_k sel_ms(u,k)·q_uk   (+ the base time, fixed)
    # [Constraint] one decision per unit:            r_u + o_u + Σ_k q_uk ≤ 1
    # [Constraint] eligibility:                      e_g ≤ r_h + o_h + Σ_{k ≥ t_h(g)} q_hk  (holders; t: the
    #                                                      first level whose save set drops the group)
    #                                                e_g ≤ 1 − (r_v + o_v + Σ_k q_vk)      (checkpoint inputs)
    #                                                e_g ≤ 1 − Σ_{k ≤ t_p(g)} q_pk         (cached by p's save set)
    # [Constraint] drops:                            D_i − D_{i−1} = Δ_i · [e; z]
    # [Constraint] peak below the budget:            const_j − P_j · [e; D] ≤ U          (interval, update rows)
    #                                                live_u + Σ_c t_c z_c − P_u · [e; D] ≤ U   (each unit's
    #                                                recomputation: its columns c are one-hot, so no big-M)

``e_g`` only ever lowers a row, so upper bounds suffice: an optimal solution can always raise
``e_g`` to the AND of its bounds, which is what the timeline evaluates. The optimizer-step rows are
constants: a configuration whose optimizer step alone exceeds the budget is skipped. Every
decoded plan is evaluated on the same rows; a plan that exceeds the budget there can only come
from the solver's feasibility tolerance, and then greedy plans that configuration (said in the
plan's notes).

HiGHS runs in a child process (:mod:`memtune.planners.highs`): if it aborts or hangs twice on a
configuration, greedy plans that configuration and the plan says so in its notes.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp

from memtune.budget import Budget
from memtune.plan import Decision, Plan
from memtune.profile import ModelProfile
from memtune.timeline import ROW_INTERVAL, ROW_PARAM_STEP, ConfigConstants, TimelineModel, UnitChoices

from . import highs
from .greedy import greedy_decisions
from .options import (PlannerOptions, choose_tier, configs, costs_for, host_limit, make_plan, offload_allowed,
                      prunable, timeline_for)


class ExactPlanner:
    """Minimum predicted step time subject to predicted peak ≤ usable budget."""

    name = "exact"

    def plan(self, profile: ModelProfile, budget: Budget, *, options: PlannerOptions) -> Plan:
        U, H = float(budget.usable_bytes), host_limit(profile, options)
        cands = []
        for cfg in configs(profile, options):
            table = costs_for(profile, cfg, options)
            tier = cfg.lossiness if options.prefer_lossless else 0
            cands.append((tier, table.base.total_ms, cfg.key, cfg, table))
        cands.sort(key=lambda t: (t[0], t[1], t[2]))
        per_tier: dict[int, Plan] = {}
        floor_ms = min((c[1] for c in cands), default=0.0)
        deadline = time.perf_counter() + options.time_limit_s
        workers = highs.parallel_solves()

        def may_win(cand) -> bool:
            """Whether a configuration may still beat what has been found."""
            tier, base_ms = cand[0], cand[1]
            best = per_tier.get(tier)
            if best is not None and base_ms >= best.predicted_step_ms - 1e-12:
                return False  # cannot beat this tier's best: its time without any recompute is already slower
            return not prunable(per_tier, tier, floor_ms, options)

        def solve(cand):
            tier, _, _, cfg, table = cand
            tm, cc = timeline_for(profile, cfg)
            if cc.fixed_peak > U:
                return None
            left = max(0.05, deadline - time.perf_counter())
            return solve_config(tm, cc, table, U, allow_offload=offload_allowed(profile, options), time_limit_s=left,
                                mip_rel_gap=options.mip_rel_gap, host_budget=H)

        # The next few configurations that may still beat the best are solved side by side, and
        # their plans taken in order, as one at a time would: a configuration that would have
        # been pruned after its neighbour's plan cannot beat that plan, so the result is the same.
        pending = list(cands)
        with ThreadPoolExecutor(max_workers=workers) as pool:
            while pending:
                pending = [c for c in pending if may_win(c)]
                batch, pending = pending[:workers], pending[workers:]
                for cand, sol in zip(batch, pool.map(solve, batch) if len(batch) > 1 else map(solve, batch)):
                    if sol is None or not may_win(cand):
                        continue
                    choices, notes = sol
                    tier, _, _, cfg, table = cand
                    plan = make_plan(profile, budget, cfg, choices.decisions, planner=self.name, options=options,
                                     table=table, notes=notes, save_ops=choices.save_ops)
                    best = per_tier.get(tier)
                    if best is None or plan.predicted_step_ms < best.predicted_step_ms - 1e-12:
                        per_tier[tier] = plan
        if not per_tier:
            from .infeasible import infeasible_error
            raise infeasible_error(profile, budget, options)
        return choose_tier(per_tier, options)


# ----------------------------------------------------------------------------- one configuration
def solve_config(tm: TimelineModel, cc: ConfigConstants, table, U: float, *, allow_offload: bool,
                 time_limit_s: float, minimize_peak: bool = False, mip_rel_gap: float = 1e-5,
                 host_budget: float = float("inf")) -> tuple[UnitChoices, tuple[str, ...]] | None:
    """Optimal unit decisions for one configuration, or ``None`` if none fits ``U`` (and
    ``host_budget``: the host bytes of its offloaded state and activations).

    With ``minimize_peak`` the objective is the peak itself (``U`` is ignored): the most
    memory-frugal decisions of this configuration."""
    host_left = host_budget - tm.host_bytes(cc)
    if host_left < 0:
        return None  # the configuration's offloaded state alone is over the host budget
    x0 = np.zeros(tm.N)
    if not minimize_peak and tm.peak(cc, x0, x0) <= U:
        return tm.choices(x0, x0), ()
    model = _Milp(tm, cc, 0.0 if minimize_peak else U, allow_offload=allow_offload, minimize_peak=minimize_peak,
                  host_left=host_left)
    A, lo, hi = model.constraints()
    cost = model.objective(table)
    lb, ub = model.bounds()
    try:
        res = highs.solve(cost, A, lo, hi, model.integrality(), lb, ub, time_limit_s=time_limit_s,
                          mip_rel_gap=mip_rel_gap)
    except highs.SolverFailed as e:
        return _greedy(tm, cc, table, U, allow_offload, minimize_peak,
                       f"HiGHS failed on this configuration ({e}); greedy planned it", host_budget)
    if res.x is None:
        if res.status == highs.INFEASIBLE:
            return None
        # Out of time before any incumbent (the time limit is shared by every configuration):
        # this configuration is not given up, greedy plans it.
        return _greedy(tm, cc, table, U, allow_offload, minimize_peak,
                       f"the MILP found no plan in its time ({res.message.strip()}); greedy planned this configuration",
                       host_budget)
    x, r, sel = model.decode(res.x)
    notes: tuple[str, ...] = ()
    if res.status != 0:
        notes = (f"MILP stopped before proving optimality ({res.message.strip()}); the plan is the best found",)
    if (not minimize_peak and tm.peak(cc, x, r, sel) > U) or tm.host_bytes(cc, x, r) > host_budget:
        # The same rows give a peak above the budget: only the solver's feasibility tolerance can do that.
        return _greedy(tm, cc, table, U, allow_offload, minimize_peak,
                       "the MILP's solution exceeded the budget by its feasibility tolerance; greedy planned this "
                       "configuration", host_budget)
    return tm.choices(x, r, sel), notes


def _greedy(tm, cc, table, U, allow_offload, minimize_peak, note, host_budget):
    choices = greedy_decisions(tm, cc, table, U, allow_offload=allow_offload, minimize_peak=minimize_peak,
                               host_budget=host_budget)
    return None if choices is None else (choices, (note,))


@dataclass
class _Milp:
    """The MILP of one timeline: its variable layout and the three parts of the model, each
    read from the timeline's rows. Variables: the decision columns ``z`` (R, O, Q of
    :class:`~memtune.timeline.TimelineModel`), then ``e``, ``D``, the peak and the base time."""

    tm: TimelineModel
    cc: ConfigConstants
    U: float
    allow_offload: bool
    minimize_peak: bool
    host_left: float = float("inf")
    """Host bytes the OFFLOAD units' activations may take (after the configuration's own)."""

    def __post_init__(self) -> None:
        tm = self.tm
        C, G, n = tm.C, tm.G, tm.n
        self.iZ, self.iE, self.iD = 0, C, C + G
        self.iP = self.iD + n                                     # the peak itself (minimize_peak)
        self.iB = self.iP + (1 if self.minimize_peak else 0)      # the configuration's base time, fixed at 1
        self.nv = self.iB + 1
        self.interval_peak = float(np.abs(tm.peak_b + self.cc.delta).max(initial=1.0))
        biggest = max(self.U, self.interval_peak, 1.0)
        self.S = float(2 ** max(0, int(np.ceil(np.log2(biggest))) - 20))
        """Bytes per unit of the scaled model (HiGHS's tolerances are absolute: keep values near 2^20)."""

    # ------------------------------------------------------------------ constraints
    def constraints(self) -> tuple[sp.csr_matrix, np.ndarray, np.ndarray]:
        blocks = [self._one_decision(), self._eligibility(), self._drops(), self._peaks(), self._host()]
        A = sp.vstack([b[0] for b in blocks if b[0].shape[0]], format="csr")
        return A, np.concatenate([b[1] for b in blocks]), np.concatenate([b[2] for b in blocks])

    def _block(self, rows, cols, vals, m, lo, hi):
        A = sp.csr_matrix((np.asarray(vals, dtype=float), (np.asarray(rows), np.asarray(cols))), shape=(m, self.nv))
        return A, np.broadcast_to(np.asarray(lo, dtype=float), (m,)).copy(), \
            np.broadcast_to(np.asarray(hi, dtype=float), (m,)).copy()

    def _one_decision(self):
        """[Constraint] Σ_c z_c ≤ 1 per unit (R, O and its selective levels)."""
        X = self.tm.X.tocoo()
        return self._block(X.row, self.iZ + X.col, X.data, self.tm.N, -np.inf, 1.0)

    def _eligibility(self):
        """[Constraint] e_g − Σ z_c ≤ 0 per (group, holder), over the holder's columns that drop the
        group; e_g + Σ z_c ≤ 1 per (group, blocker), over the columns that keep it."""
        tm = self.tm
        h, b = tm.HP.tocoo(), tm.BP.tocoo()
        mh, mb = tm.HP.shape[0], tm.BP.shape[0]
        rows = np.concatenate([np.arange(mh), h.row, mh + np.arange(mb), mh + b.row])
        cols = np.concatenate([self.iE + tm.hp_group, self.iZ + h.col, self.iE + tm.bp_group, self.iZ + b.col])
        vals = np.concatenate([np.ones(mh), -h.data, np.ones(mb), b.data])
        hi = np.concatenate([np.zeros(mh), np.ones(mb)])
        return self._block(rows, cols, vals, mh + mb, -np.inf, hi)

    def _host(self):
        """[Constraint] Σ_u host_u · o_u ≤ host budget left (scaled): every offloaded unit's
        activations are on the host at once when forward ends."""
        tm = self.tm
        if not (self.allow_offload and np.isfinite(self.host_left)):
            none = np.zeros(0, dtype=np.int64)
            return self._block(none, none, np.zeros(0), 0, -np.inf, 0.0)
        cols = self.iZ + tm.N + np.arange(tm.N)
        return self._block(np.zeros(tm.N, dtype=np.int64), cols, tm.offload_host_bytes / self.S, 1, -np.inf,
                           self.host_left / self.S)

    def _drops(self):
        """[Constraint] D_i − D_{i−1} − Δ_i · [e; z] = 0 (scaled)."""
        tm, n, G = self.tm, self.tm.n, self.tm.G
        delta = tm.delta[:n].tocoo()
        rows = [np.arange(n), np.arange(1, n), delta.row]
        cols = [self.iD + np.arange(n), self.iD + np.arange(n - 1),
                np.where(delta.col < G, self.iE + delta.col, self.iZ + delta.col - G)]
        vals = [np.ones(n), -np.ones(n - 1), -delta.data / self.S]
        return self._block(np.concatenate(rows), np.concatenate(cols), np.concatenate(vals), n, 0.0, 0.0)

    def _peaks(self):
        """[Constraint] every peak row under the budget (or under the peak variable): the
        interval rows, the in-backward update rows, and one row per unit for its recomputation
        (the optimizer step's rows are constants, checked before solving).

        A unit's recompute rows differ only in their transient, and at most one of its columns
        is on, so they are written as one row without a big-M: ``live + Σ_c t_c z_c − P·[e; D]
        ≤ U`` over the unit's recomputing columns. With no column on it reads ``live − D − … ≤
        U``, which the interval row of the same moment already implies (an interval's peak is at
        least its live bytes): at integer points it is exactly the gated rows that
        :meth:`TimelineModel.values` evaluates."""
        tm, S, U, cc = self.tm, self.S, self.U, self.cc
        kind = tm.row_kind
        plain = np.concatenate([np.nonzero(kind == ROW_INTERVAL)[0], np.nonzero(kind == ROW_PARAM_STEP)[0]])
        first: dict[int, int] = {}
        cols_of: dict[int, list[int]] = {}
        for r in tm.rc_rows:
            u = int(tm.row_ref[r])
            first.setdefault(u, int(r))
            cols_of.setdefault(u, []).append(int(tm.row_gate[r]))
        units = sorted(first)
        order = np.concatenate([plain, np.array([first[u] for u in units], dtype=np.int64)])
        m = len(order)
        P = tm.P[order].tocoo()
        const = cc.const[order].copy()
        rc_at = len(plain) + np.arange(len(units))
        const[rc_at] -= tm.col_transient[tm.row_gate[order[rc_at]]]  # the base of each unit's row
        const /= S
        is_e = P.col < tm.G
        rows = [P.row]
        cols = [np.where(is_e, self.iE + P.col, self.iD + P.col - tm.G)]
        vals = [np.where(is_e, -P.data / S, -P.data)]  # D is scaled already; e carries bytes
        for j, u in zip(rc_at, units):
            c = np.array(cols_of[u], dtype=np.int64)
            rows.append(np.full(len(c), j))
            cols.append(self.iZ + c)
            vals.append(tm.col_transient[c] / S)
        lo = np.full(m, -np.inf)
        if self.minimize_peak:
            rows.append(np.arange(m))
            cols.append(np.full(m, self.iP))
            vals.append(-np.ones(m))
            hi = -const
        else:
            hi = U / S - const
        A = sp.csr_matrix((np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))), shape=(m, self.nv))
        return A, lo, hi

    # ------------------------------------------------------------------ objective, bounds, decoding
    def objective(self, table) -> np.ndarray:
        tm = self.tm
        cost = np.zeros(self.nv)
        col_ms = column_ms(tm, table)
        if self.minimize_peak:
            cost[self.iP] = 1.0
            # A whisper of time so that, among the most frugal plans, the faster one wins.
            col_ms = col_ms * 1e-6 * max(1.0, self.interval_peak / self.S) / (col_ms.sum() + 1e-9)
        else:
            # The configuration's base time on a fixed variable: HiGHS's relative gap is then
            # relative to the whole step time, not to the (small) recompute/offload part of it.
            cost[self.iB] = table.base.total_ms
        cost[self.iZ:self.iZ + tm.C] = col_ms
        return cost

    def integrality(self) -> np.ndarray:
        out = np.zeros(self.nv)
        out[self.iZ:self.iE] = 1
        return out

    def bounds(self) -> tuple[np.ndarray, np.ndarray]:
        tm, n = self.tm, self.tm.n
        lb, ub = np.zeros(self.nv), np.ones(self.nv)
        ub[self.iZ:self.iE] = column_allowed(tm, allow_offload=self.allow_offload)
        lb[self.iD:self.iD + n], ub[self.iD:self.iD + n] = -np.inf, np.inf
        if self.minimize_peak:
            lb[self.iP], ub[self.iP] = self.cc.fixed_peak / self.S, np.inf
        lb[self.iB] = ub[self.iB] = 1.0
        return lb, ub

    def decode(self, z: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(x, r, s) of a solution: binaries rounded."""
        return self.tm.unpack(np.round(z[self.iZ:self.iE]))


def column_ms(tm: TimelineModel, table) -> np.ndarray:
    """The time each decision column adds to the step: R its unit's forward, O its offload
    traffic, Q_{u,k} the forward of the ops outside save set k."""
    N = tm.N
    out = np.zeros(tm.C)
    out[:N] = [table.recompute_ms[f] for f in tm.fqns]
    out[N:2 * N] = [table.offload_ms[f] for f in tm.fqns]
    for u, pols in enumerate(tm.policies):
        for k, pol in enumerate(pols):
            out[tm.q_start[u] + k] = table.added_ms(tm.fqns[u], Decision.SELECTIVE, pol.save_ops)
    return out


def column_allowed(tm: TimelineModel, *, allow_offload: bool) -> np.ndarray:
    """1 for the decision columns a plan may use: recomputation where it is safe, offload when allowed."""
    ok = tm.recomputable[tm.col_unit].astype(float)
    ok[tm.N:2 * tm.N] = 1.0 if allow_offload else 0.0
    return ok
