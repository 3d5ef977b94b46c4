"""The one home of the step-memory rules: a recorded step's timeline, replayed under a plan.

:func:`memtune.predict_peak` and both planners evaluate plans here. A profile records, for each
interval between the events of a plain step (no recomputation), the live bytes at its start and
its peak, and every activation storage autograd saved, with where it was created and freed and
which units hold it. A plan changes that timeline in exactly these ways:

* **RECOMPUTE** unit *u*: a storage that only non-SAVE units hold (and that no non-SAVE unit
  takes as a checkpoint input) is dropped from the end of its holders' forward until the
  first holder's backward starts. There the unit's forward runs again: the recompute peak is
  *u*'s measured forward transient on top of what is live at that moment, before the
  storages it restores are back. Inputs of *u* that nobody else saved are kept alive by the
  checkpoint from the end of its forward until its backward ends.
* **OFFLOAD** unit *u*: as RECOMPUTE, but the storages come back by copy (no transient).
* **Optimizer**: the state bytes of the plan's optimizer configuration replace the profiled
  optimizer's for the whole step, and the optimizer-step intervals carry the plan's measured
  step temporaries instead (both from :class:`~memtune.profile.OptimizerStepProfile`); an
  optimizer step in backward adds each parameter's update temporaries at its ``step`` event.
* **Levers** (:mod:`memtune.levers`): the plan is replayed on the step recorded as its step
  variant runs it (:meth:`~memtune.profile.ModelProfile.recording`).

The rules are written once, as **peak rows** (:class:`TimelineModel`), in the style of
``torch/distributed/_tools/sac_ilp.py``. Variables, per plan:

* ``x_u`` = 1 if unit *u* is not SAVE, ``r_u`` = 1 if it is RECOMPUTE;
* ``e_g`` = 1 if group *g* is dropped: a group merges the storages that share holders,
  checkpoint-input units, drop window ``[lo, hi)`` and restoring unit. [Eligibility] ``e_g ≤ x_h``
  for every holder *h*, ``e_g ≤ 1 − x_v`` for every unit *v* taking it as a checkpoint input;
* ``D_i`` = net bytes dropped in interval *i*. [Drops] ``D = cumsum(Δ · [e; x])``: a group adds its
  bytes at ``lo`` and removes them at ``hi``; a non-SAVE unit's unsaved inputs count negative
  from its forward end to its backward end.

[Peak rows] each row *j* is ``value_j = const_j − P_j · [e; D]``, active always or only when its
unit recomputes (``gate_j``): one row per interval outside the optimizer step (its peak with
nothing dropped, less ``D_i``), per in-backward parameter update (live bytes plus that
update's temporaries, less ``D_i``), per unit's recompute (live bytes at its backward start plus
its forward transient, less ``D`` there and what it restores) and per optimizer-step interval
(constant). The predicted peak is the largest active row. ``peak`` and ``breakdown`` evaluate
the rows with ``e`` at the bound the eligibility rows allow (dropping only lowers rows); the
exact planner hands the very same matrices to HiGHS.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp

from .errors import UnrecordedPlanError
from .plan import Decision, MemoryBreakdown, OptimizerPlan
from .profile import ModelProfile, StepEvent
from .variant import StepVariant

__all__ = ["ConfigConstants", "OptimizerMemory", "TimelineModel", "UnrecordedPlanError", "optimizer_memory",
           "plan_optimizer_memory", "plan_recording", "recording_for", "timeline_model"]


@dataclass(frozen=True, slots=True)
class OptimizerMemory:
    state_bytes: int
    """State held on the device for the whole step."""
    step_transient_bytes: int
    """Temporaries of the optimizer step after backward (0 when it steps in backward)."""
    param_step_bytes: dict[str, int] | None = None
    """Per parameter, the temporaries of its update in backward."""
    host_bytes: int = 0
    """State kept in host memory instead."""


def optimizer_memory(recording: ModelProfile, opt: OptimizerPlan, variant: StepVariant | None = None) -> OptimizerMemory:
    """State and step temporaries of ``opt`` (stepped as ``variant`` says), as recorded on
    ``recording``'s model. The profiled configuration on the profiled step uses the step in the
    timeline itself."""
    variant = variant or StepVariant()
    rec = recording.optimizer_step(*opt.key, variant=variant)
    if rec is None:
        have = ", ".join(f"{o.name}/{o.state_dtype}/ns{o.ns_steps}" for o in recording.optimizer_steps
                         if o.variant == variant.for_optimizer())
        raise UnrecordedPlanError(
            f"the profile did not record optimizer {opt.name} with {opt.state_dtype} state and {opt.ns_steps} NS steps "
            f"({variant.for_optimizer().describe()}; recorded: {have or 'none'}); re-profile with memtune.profile(..., "
            f"space=memtune.PlanSpace(optimizers=({opt.name!r},), ns_steps=({max(opt.ns_steps, 1)},))) so its memory "
            "is measured")
    if rec.profiled and recording.variant.for_step().is_default:  # the profiled configuration on the profiled step
        ev = recording.timeline
        i = next(i for i, e in enumerate(ev) if e.name == StepEvent.OPTIM_START)
        return OptimizerMemory(recording.optimizer_state_bytes, ev[i].peak_bytes - ev[i].live_bytes)
    if rec.param_step_bytes:
        return OptimizerMemory(rec.state_bytes, 0, dict(rec.param_step_bytes), rec.host_state_bytes)
    return OptimizerMemory(rec.state_bytes, rec.step_transient_bytes, None, rec.host_state_bytes)


def recording_for(profile: ModelProfile, variant: StepVariant | None = None) -> ModelProfile:
    """The recorded step a plan with ``variant`` replays."""
    variant = variant or StepVariant()
    try:
        return profile.recording(variant)
    except KeyError:
        wanted = variant.for_step()
        raise UnrecordedPlanError(
            f"the profile did not record the step with {wanted.describe()}; re-profile with memtune.profile(..., "
            f"space=memtune.PlanSpace(levers={{{', '.join(f'{k!r}: ({v!r},)' for k, v in wanted.to_dict().items())}}}))"
        ) from None


def plan_recording(profile: ModelProfile, plan) -> ModelProfile:
    """:func:`recording_for` a :class:`~memtune.plan.Plan` (or a planner's configuration)."""
    return recording_for(profile, plan.variant)


def plan_optimizer_memory(recording: ModelProfile, plan) -> OptimizerMemory:
    return optimizer_memory(recording, plan.optimizer, plan.variant)


# ----------------------------------------------------------------------------- rows
ROW_INTERVAL, ROW_RECOMPUTE, ROW_PARAM_STEP, ROW_OPTIMIZER = 0, 1, 2, 3
"""Kinds of peak row; within one interval they are compared in this order (ties keep the first)."""


class ConfigConstants:
    """What one optimizer configuration fixes on a timeline, before any unit decision: the
    constant of every peak row."""

    __slots__ = ("const", "fixed_peak", "state_bytes", "host_bytes", "delta")

    def __init__(self, *, const: np.ndarray, fixed_peak: float, state_bytes: int, host_bytes: int, delta: float):
        self.const = const
        """Per peak row: its value with nothing dropped."""
        self.fixed_peak = fixed_peak
        """Peak of the optimizer step: no unit decision changes it."""
        self.state_bytes = state_bytes
        self.host_bytes = host_bytes
        self.delta = delta
        """The configuration's state bytes less the recording's."""


class TimelineModel:
    """The decision-independent structure of one recorded step (build with :func:`timeline_model`):
    the eligibility, drop and peak rows of the module docstring."""

    def __init__(self, profile: ModelProfile):
        p = self.profile = profile
        ev = p.timeline
        self.n = len(ev)
        self.fqns = [u.fqn for u in p.units]
        self.N = len(self.fqns)
        self._events(ev)
        self._groups(p)
        self._drop_rows()
        self._peak_rows()
        self.static = p.param_bytes + p.buffer_bytes + p.workspace_bytes
        self.base_state = p.optimizer_state_bytes
        self.grad = np.array([e.grad_bytes for e in ev], dtype=np.float64)
        self.recomputable = np.array([not u.recompute_blocker for u in p.units], dtype=bool)

    # ------------------------------------------------------------------ structure
    def _events(self, ev) -> None:
        """Where each unit's forward ends and its backward starts and ends."""
        fe: dict[str, int] = {}
        bs: dict[str, int] = {}
        for i, e in enumerate(ev):
            if e.name == StepEvent.FWD_END and e.unit not in fe:
                fe[e.unit] = i
            elif e.name == StepEvent.BWD_START and e.unit not in bs:
                bs[e.unit] = i
        self._fe, self._bs = fe, bs
        self.is_opt = np.zeros(self.n, dtype=bool)
        start = next(i for i, e in enumerate(ev) if e.name == StepEvent.OPTIM_START)
        end = next(i for i, e in enumerate(ev) if e.name == StepEvent.OPTIM_END)
        self.is_opt[start:end] = True
        self.bs = np.array([bs.get(f, -1) for f in self.fqns], dtype=np.int64)
        self.fe = np.array([fe.get(f, -1) for f in self.fqns], dtype=np.int64)
        # A unit's backward ends at the next backward boundary after its start (its bwd_end,
        # another unit's bwd_start, or the end of backward); in-backward "step" events do not end it.
        bounds = np.array([i for i, e in enumerate(ev) if e.name in (StepEvent.BWD_START, StepEvent.BWD_END,
                                                                    StepEvent.BWD_DONE, StepEvent.OPTIM_START)]
                          + [self.n], dtype=np.int64)
        self.be = np.where(self.bs >= 0, bounds[np.searchsorted(bounds, self.bs, side="right")], -1)
        self.live = np.array([e.live_bytes for e in ev], dtype=np.float64)
        self.peak_b = np.array([e.peak_bytes for e in ev], dtype=np.float64)
        self.step_idx = np.array([i for i, e in enumerate(ev) if e.name == StepEvent.PARAM_STEP], dtype=np.int64)
        self.step_params = [ev[i].unit for i in self.step_idx]

    def _groups(self, p: ModelProfile) -> None:
        """Storages that are dropped together, and the eligibility incidence (``H``: holders,
        ``Bk``: units that take the group as a checkpoint input)."""
        index = {f: k for k, f in enumerate(self.fqns)}
        fe, bs = self._fe, self._bs
        inputs_of: dict[int, list[int]] = {}
        for k, u in enumerate(p.units):
            for sid in u.input_storages:
                inputs_of.setdefault(sid, []).append(k)
        groups: dict[tuple, int] = {}
        for sid, s in enumerate(p.storages):
            if s.saved_outside or not s.holders:
                continue
            holders = tuple(sorted({index[h] for h in s.holders if h in index}))
            blockers = tuple(sorted(set(inputs_of.get(sid, ()))))
            if len(holders) != len(set(s.holders)) or set(holders) & set(blockers):
                continue  # a holder outside the units, or a holder whose checkpoint keeps it: never dropped
            fes = [fe[h] for h in s.holders if h in fe]
            if not fes:
                continue
            lo = max(max(fes), s.created + 1)
            hi = min(min(bs.get(h, s.freed) for h in s.holders), s.freed)
            if lo >= hi:
                continue
            restorer = next((index[h] for h in s.holders if bs.get(h) == hi), -1)
            key = (holders, blockers, lo, hi, restorer)
            groups[key] = groups.get(key, 0) + s.nbytes
        keys = sorted(groups)
        self.G = G = len(keys)
        self.g_bytes = np.array([groups[k] for k in keys], dtype=np.float64)
        self.g_lo = np.array([k[2] for k in keys], dtype=np.int64)
        self.g_hi = np.array([k[3] for k in keys], dtype=np.int64)
        self.g_restorer = np.array([k[4] for k in keys], dtype=np.int64)
        self.g_holders = [k[0] for k in keys]
        self.g_blockers = [k[1] for k in keys]
        self.H = _incidence(self.g_holders, G, self.N)
        self.Bk = _incidence(self.g_blockers, G, self.N)
        # Inputs a checkpoint keeps although nobody saved them (negative drops).
        unsaved = np.zeros(self.N)
        for k, u in enumerate(p.units):
            if u.fqn in fe and u.fqn in bs:
                extra = sum(u.input_storage_bytes) - sum(p.storages[i].nbytes for i in u.input_storages)
                unsaved[k] = max(0, extra)
        self.unsaved = unsaved

    def _drop_rows(self) -> None:
        """[Drops] ``Δ`` ((n+1) × (G+N) over ``[e; x]``): ``D = cumsum(Δ · [e; x])[:n]``."""
        G, N, n = self.G, self.N, self.n
        ok = (self.fe >= 0) & (self.bs >= 0) & (self.unsaved > 0)
        units = np.nonzero(ok)[0]
        rows = np.concatenate([self.g_lo, self.g_hi, self.fe[units], self.be[units]])
        cols = np.concatenate([np.arange(G), np.arange(G), G + units, G + units])
        vals = np.concatenate([self.g_bytes, -self.g_bytes, -self.unsaved[units], self.unsaved[units]])
        self.delta = sp.csr_matrix((vals, (rows, cols)), shape=(n + 1, G + N))
        self.max_raise = float(self.unsaved.sum())
        """The most any decision can raise a row (kept unsaved inputs): ``−D ≤ max_raise``."""

    def _peak_rows(self) -> None:
        """[Peak rows] in interval order, each interval's rows in ``ROW_*`` order."""
        n, G = self.n, self.G
        by_bs: dict[int, list[int]] = {}
        for k in range(self.N):
            if self.bs[k] >= 0:
                by_bs.setdefault(int(self.bs[k]), []).append(k)
        by_step: dict[int, list[int]] = {}
        for j, i in enumerate(self.step_idx):
            by_step.setdefault(int(i), []).append(j)
        kind, event, ref = [], [], []
        for i in range(n):
            if self.is_opt[i]:
                kind.append(ROW_OPTIMIZER), event.append(i), ref.append(i)
                continue
            kind.append(ROW_INTERVAL), event.append(i), ref.append(i)
            for k in by_bs.get(i, ()):
                kind.append(ROW_RECOMPUTE), event.append(i), ref.append(k)
            for j in by_step.get(i, ()):
                kind.append(ROW_PARAM_STEP), event.append(i), ref.append(j)
        self.row_kind = np.array(kind, dtype=np.int64)
        self.row_event = np.array(event, dtype=np.int64)
        self.row_ref = np.array(ref, dtype=np.int64)
        """Per row: the interval (interval, optimizer rows), the unit (recompute) or the update (step)."""
        m = len(kind)
        self.row_gate = np.where(self.row_kind == ROW_RECOMPUTE, self.row_ref, -1)
        self.gated_rows = np.nonzero(self.row_gate >= 0)[0]
        self.gated_units = self.row_gate[self.gated_rows]
        # P over [e (G); D (n)]: D at the row's interval (not for constant optimizer rows), plus
        # the bytes a recomputing unit restores.
        varying = np.nonzero(self.row_kind != ROW_OPTIMIZER)[0]
        rows = [varying]
        cols = [G + self.row_event[varying]]
        vals = [np.ones(len(varying))]
        rc_rows = {int(k): r for r, k in zip(np.nonzero(self.row_kind == ROW_RECOMPUTE)[0],
                                             self.row_ref[self.row_kind == ROW_RECOMPUTE])}
        restored = [(rc_rows[int(u)], g) for g, u in enumerate(self.g_restorer) if u >= 0 and int(u) in rc_rows]
        if restored:
            rr, gg = np.array(restored, dtype=np.int64).T
            rows.append(rr)
            cols.append(gg)
            vals.append(self.g_bytes[gg])
        self.P = sp.csr_matrix((np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))), shape=(m, G + n))
        self.rc_rows = np.array([rc_rows.get(k, -1) for k in range(self.N)], dtype=np.int64)
        """Per unit, its recompute row (-1: its backward never starts)."""

    # ------------------------------------------------------------------ per configuration
    def constants(self, opt: OptimizerMemory) -> ConfigConstants:
        delta = opt.state_bytes - self.base_state
        if len(self.step_idx) and opt.param_step_bytes is None:
            raise ValueError("an in-backward recording needs the optimizer's per-parameter recording")
        per_param = opt.param_step_bytes or {}
        i, kind, ref = self.row_event, self.row_kind, self.row_ref
        const = np.empty(len(kind))
        const[:] = self.peak_b[i] + delta  # ROW_INTERVAL
        opt_rows = kind == ROW_OPTIMIZER
        const[opt_rows] = self.live[i[opt_rows]] + delta + opt.step_transient_bytes
        rc = kind == ROW_RECOMPUTE
        ft = np.array([u.fwd_transient_bytes for u in self.profile.units], dtype=np.float64)
        const[rc] = self.live[i[rc]] + delta + ft[ref[rc]]
        st = kind == ROW_PARAM_STEP
        const[st] = self.live[i[st]] + delta + np.array([per_param.get(self.step_params[j], 0) for j in ref[st]],
                                                        dtype=np.float64)
        fixed = float(const[opt_rows].max()) if opt_rows.any() else 0.0
        return ConfigConstants(const=const, fixed_peak=fixed, state_bytes=opt.state_bytes, host_bytes=opt.host_bytes,
                               delta=delta)

    # ------------------------------------------------------------------ evaluation
    def dropped(self, x: np.ndarray) -> np.ndarray:
        """[Eligibility] ``e`` for non-SAVE indicator ``x``, at the bound its rows allow."""
        return ((self.H @ (1.0 - x) == 0) & (self.Bk @ x == 0)).astype(np.float64)

    def drops(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(e per group, D per interval) for non-SAVE indicator ``x`` (0/1 floats)."""
        e = self.dropped(x)
        D = np.cumsum(self.delta @ np.concatenate([e, x]))[:self.n]
        return e, D

    def row_values(self, cc: ConfigConstants, x: np.ndarray, r: np.ndarray) -> np.ndarray:
        """Every peak row's value under decisions ``x`` (non-SAVE) / ``r`` (RECOMPUTE); rows whose
        unit does not recompute are ``-inf``."""
        e, D = self.drops(x)
        vals = cc.const - self.P @ np.concatenate([e, D])
        vals[self.gated_rows[r[self.gated_units] <= 0.5]] = -np.inf
        return vals

    def peak(self, cc: ConfigConstants, x: np.ndarray, r: np.ndarray) -> float:
        """Predicted peak bytes of decisions ``x`` (non-SAVE) / ``r`` (RECOMPUTE)."""
        return float(self.row_values(cc, x, r).max())

    def breakdown(self, cc: ConfigConstants, x: np.ndarray, r: np.ndarray, *, reserve_bytes: int) -> MemoryBreakdown:
        """The peak of :meth:`peak` (its first row, in interval order), with what is live there by category."""
        vals = self.row_values(cc, x, r)
        j = int(np.argmax(vals))
        i, kind, ref = int(self.row_event[j]), int(self.row_kind[j]), int(self.row_ref[j])
        e, D = self.drops(x)
        nonact = self.static + self.base_state + self.grad[i]
        act = self.live[i] - nonact - D[i]
        rc = opt_tmp = other = 0.0
        phase = _phase(self.profile.timeline[i].name)
        if kind == ROW_OPTIMIZER:
            act, phase = self.live[i] - nonact, "optimizer"
            opt_tmp = vals[j] - self.live[i] - cc.delta
        elif kind == ROW_INTERVAL:
            other = self.peak_b[i] - self.live[i]
        elif kind == ROW_RECOMPUTE:
            act -= float((self.P[j, :self.G] @ e).item())
            rc = self.profile.units[ref].fwd_transient_bytes
            phase = f"recompute:{self.fqns[ref]}"
        else:
            opt_tmp = vals[j] + D[i] - self.live[i] - cc.delta
            phase = f"optimizer-in-backward:{self.step_params[ref]}"
        return MemoryBreakdown(
            peak_bytes=int(math.ceil(vals[j])), params_bytes=int(self.static), grads_bytes=int(self.grad[i]),
            optimizer_state_bytes=int(cc.state_bytes), saved_activation_bytes=int(act),
            recompute_transient_bytes=int(rc), optimizer_transient_bytes=int(opt_tmp), other_transient_bytes=int(other),
            reserve_bytes=reserve_bytes, phase=phase,
            host_bytes=int(cc.host_bytes) if self.profile.target != "cpu" else 0)

    def indicators(self, decisions: dict[str, Decision]) -> tuple[np.ndarray, np.ndarray]:
        """(x, r) vectors of a decision dict (units it omits are SAVE)."""
        x = np.array([decisions.get(f, Decision.SAVE) is not Decision.SAVE for f in self.fqns], dtype=float)
        r = np.array([decisions.get(f, Decision.SAVE) is Decision.RECOMPUTE for f in self.fqns], dtype=float)
        return x, r

    def decisions(self, x: np.ndarray, r: np.ndarray) -> dict[str, Decision]:
        """The decision dict of (x, r) vectors (the inverse of :meth:`indicators`)."""
        return {f: (Decision.RECOMPUTE if r[k] else Decision.OFFLOAD) if x[k] else Decision.SAVE
                for k, f in enumerate(self.fqns)}


def timeline_model(recording: ModelProfile) -> TimelineModel:
    """The :class:`TimelineModel` of a recording, built once per profile object (kept on the
    profile itself, so it lives exactly as long as the profile)."""
    tm = recording.__dict__.get("_timeline_model")
    if tm is None:
        tm = recording.__dict__["_timeline_model"] = TimelineModel(recording)
    return tm


def _incidence(rows: list[tuple[int, ...]], G: int, N: int) -> sp.csr_matrix:
    r = [g for g, units in enumerate(rows) for _ in units]
    c = [u for units in rows for u in units]
    return sp.csr_matrix((np.ones(len(r)), (r, c)), shape=(G, N))


def _phase(event: StepEvent) -> str:
    if event.during_forward:
        return "forward"
    if event is StepEvent.LOSS:
        return "loss"
    if event.during_backward:
        return "backward"
    return "optimizer"
