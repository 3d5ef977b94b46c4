"""The one home of the step-memory rules: a recorded step's timeline, replayed under a plan.

:func:`memtune.predict_peak` and both planners evaluate plans here, so a new plan dimension
adds its term in one place. A profile records, for each interval between unit boundaries of a
plain step (no recomputation), the live bytes at its start and its peak, and every activation
storage autograd saved, with where it was created and freed and which units hold it. A plan
changes that timeline in exactly these ways:

* **RECOMPUTE** unit *u*: a storage that only non-SAVE units hold (and that no non-SAVE unit
  takes as a checkpoint input) is dropped from the end of its holders' forward until the
  first holder's backward starts. There the unit's forward runs again: the recompute peak is
  *u*'s measured forward transient on top of what is live at that moment, before the
  storages it restores are back. Inputs of *u* that nobody else saved are kept alive by the
  checkpoint over the same window.
* **OFFLOAD** unit *u*: as RECOMPUTE, but the storages come back by copy (no transient).
* **Optimizer**: the state bytes of the plan's optimizer configuration replace the profiled
  optimizer's for the whole step, and the optimizer-step intervals carry the plan's measured
  step temporaries instead (both from :class:`~memtune.profile.OptimizerStepProfile`).
* **Micro-batching**: the plan is replayed on the step recorded at that micro-batch size in
  gradient-accumulation mode (:meth:`~memtune.profile.ModelProfile.at_micro_batch`).

Notation for the vectorized form (the exact planner writes the same as a MILP):

* ``x_u`` = 1 if unit *u* is not SAVE, ``r_u`` = 1 if RECOMPUTE;
* a **group** *g* merges the storages that share holders, "input-of" units, drop window
  ``[lo, hi)`` and restoring unit; its bytes are dropped over the window iff every holder is
  non-SAVE and no non-SAVE unit takes it as a checkpoint input;
* ``D_i`` = net bytes dropped in interval *i*; interval *i* outside the optimizer step peaks at
  ``c_i − D_i``; the optimizer step's intervals are constants of the configuration; a
  RECOMPUTE unit adds the candidate ``a_u − (D_bs(u) + R_u)`` where ``R_u`` is what its
  recompute restores.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp

from .errors import MemtuneError
from .plan import Decision, MemoryBreakdown, OptimizerPlan
from .profile import ModelProfile


class UnrecordedPlanError(MemtuneError, KeyError):
    """A plan needs something the profile did not record (an optimizer configuration or a
    micro-batch size); the message says how to record it."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


@dataclass(frozen=True, slots=True)
class OptimizerMemory:
    state_bytes: int
    """State held on the device for the whole step."""
    step_transient_bytes: int
    """Temporaries of the optimizer step after backward (0 when it steps in backward)."""
    param_step_bytes: dict[str, int] | None = None
    """Per parameter, the temporaries of its update in backward (in-backward plans)."""
    host_bytes: int = 0
    """State kept in host memory instead."""


def optimizer_memory(recording: ModelProfile, opt: OptimizerPlan, *, weights: str | None = None,
                     in_backward: bool = False) -> OptimizerMemory:
    """State and step temporaries of ``opt`` (stepped as ``weights``/``in_backward`` say), as
    recorded on ``recording``'s model. The profiled configuration on the profiled step uses the
    step in the timeline itself."""
    rec = recording.optimizer_step(*opt.key, weights=weights, offload=opt.offload, in_backward=in_backward)
    if rec is None:
        have = ", ".join(f"{o.name}/{o.state_dtype}/ns{o.ns_steps}" for o in recording.optimizer_steps
                         if (o.weights, o.offload, o.in_backward) == (weights, opt.offload, in_backward))
        extra = (f"weights={weights!r}, " if weights else "") + ("offloaded state, " if opt.offload else "") + \
                ("stepped in backward, " if in_backward else "")
        raise UnrecordedPlanError(
            f"the profile did not record optimizer {opt.name} with {opt.state_dtype} state and {opt.ns_steps} NS steps "
            f"({extra or 'as profiled, '}recorded: {have or 'none'}); re-profile with memtune.profile(..., "
            f"space=memtune.PlanSpace(optimizers=({opt.name!r},), ns_steps=({max(opt.ns_steps, 1)},))) so its memory "
            "is measured")
    profiled_step = not (recording.accumulating or recording.in_backward or recording.weights or recording.loss_chunks)
    if rec.profiled and profiled_step:  # the profiled configuration on the profiled step
        ev = recording.timeline
        i = next(i for i, e in enumerate(ev) if e.name == "optim_start")
        return OptimizerMemory(recording.optimizer_state_bytes, ev[i].peak_bytes - ev[i].live_bytes)
    if in_backward:
        return OptimizerMemory(rec.state_bytes, 0, dict(rec.param_step_bytes), rec.host_state_bytes)
    return OptimizerMemory(rec.state_bytes, rec.step_transient_bytes, None, rec.host_state_bytes)


def recording_for(profile: ModelProfile, micro_batch_size: int | None, grad_accum_steps: int = 1, *,
                  weights: str | None = None, in_backward: bool = False, loss_chunks: int | None = None) -> ModelProfile:
    """The recorded step a plan with these choices replays."""
    if micro_batch_size is not None and micro_batch_size == profile.batch_size and grad_accum_steps <= 1:
        micro_batch_size = None
    key_weights = "bf16" if weights else None
    try:
        return profile.recording(micro_batch_size, weights=key_weights, in_backward=in_backward, loss_chunks=loss_chunks)
    except KeyError:
        what = ", ".join(x for x in (f"micro-batches of {micro_batch_size}" if micro_batch_size else "",
                                     "bf16 weights" if weights else "", "the optimizer step in backward" if in_backward
                                     else "", f"the loss in {loss_chunks} chunks" if loss_chunks else "") if x)
        space = ", ".join(x for x in (f"micro_batch_sizes=({micro_batch_size},)" if micro_batch_size else "",
                                      f"weights=({weights!r},)" if weights else "",
                                      "in_backward=(False, True)" if in_backward else "",
                                      f"loss_chunks=({loss_chunks},)" if loss_chunks else "") if x)
        raise UnrecordedPlanError(
            f"the profile did not record the step with {what}; re-profile with memtune.profile(..., "
            f"space=memtune.PlanSpace({space}))") from None


def plan_recording(profile: ModelProfile, plan) -> ModelProfile:
    """:func:`recording_for` a :class:`~memtune.plan.Plan` (or a planner's configuration)."""
    return recording_for(profile, plan.micro_batch_size, plan.grad_accum_steps, weights=plan.weights,
                         in_backward=plan.optimizer_in_backward, loss_chunks=plan.loss_chunks)


def plan_optimizer_memory(recording: ModelProfile, plan) -> OptimizerMemory:
    return optimizer_memory(recording, plan.optimizer, weights=plan.weights, in_backward=plan.optimizer_in_backward)


class ConfigConstants:
    """What one optimizer configuration fixes on a timeline, before any unit decision."""

    __slots__ = ("c", "fixed_peak", "opt_vals", "a", "state_bytes", "s_vals", "host_bytes")

    def __init__(self, *, c: np.ndarray, fixed_peak: float, opt_vals: np.ndarray, a: np.ndarray, state_bytes: int,
                 s_vals: np.ndarray, host_bytes: int = 0):
        self.c = c
        """Per interval: its peak with nothing dropped (optimizer intervals included, unused)."""
        self.fixed_peak = fixed_peak
        """Peak of the optimizer step: no unit decision changes it."""
        self.opt_vals = opt_vals
        """Per interval: its value if it is an optimizer-step interval."""
        self.a = a
        """Per unit: the recompute-time peak at its backward start with nothing dropped."""
        self.state_bytes = state_bytes
        self.s_vals = s_vals
        """Per in-backward step event: live bytes there plus that parameter's update temporaries."""
        self.host_bytes = host_bytes


class TimelineModel:
    """Decision-independent structure of one recorded step (build with :func:`timeline_model`)."""

    def __init__(self, profile: ModelProfile):
        p = self.profile = profile
        ev = p.timeline
        self.n = n = len(ev)
        self.fqns = [u.fqn for u in p.units]
        self.N = N = len(self.fqns)
        index = {f: k for k, f in enumerate(self.fqns)}
        fe: dict[str, int] = {}
        bs: dict[str, int] = {}
        for i, e in enumerate(ev):
            if e.name == "fwd_end" and e.unit not in fe:
                fe[e.unit] = i
            elif e.name == "bwd_start" and e.unit not in bs:
                bs[e.unit] = i
        self.optim_start = next(i for i, e in enumerate(ev) if e.name == "optim_start")
        self.optim_end = next(i for i, e in enumerate(ev) if e.name == "optim_end")
        self.bs = np.array([bs.get(f, -1) for f in self.fqns], dtype=np.int64)
        # Where each unit's backward ends: the next backward boundary after its bwd_start (its
        # bwd_end, another unit's bwd_start, or the end of backward). "step" events inside it
        # (in-backward plans) do not end it.
        bounds = np.array([i for i, e in enumerate(ev) if e.name in ("bwd_start", "bwd_end", "bwd_done", "optim_start")]
                          + [n], dtype=np.int64)
        self.be = np.where(self.bs >= 0, bounds[np.searchsorted(bounds, self.bs, side="right")], -1)
        self.fe = np.array([fe.get(f, -1) for f in self.fqns], dtype=np.int64)
        self.ft = np.array([u.fwd_transient_bytes for u in p.units], dtype=np.float64)
        self.recomputable = np.array([not u.recompute_blocker for u in p.units], dtype=bool)

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
        self.groups = keys
        self.G = G = len(keys)
        self.g_bytes = np.array([groups[k] for k in keys], dtype=np.float64)
        self.g_lo = np.array([k[2] for k in keys], dtype=np.int64)
        self.g_hi = np.array([k[3] for k in keys], dtype=np.int64)
        self.g_restorer = np.array([k[4] for k in keys], dtype=np.int64)
        self.g_holders = [k[0] for k in keys]
        self.g_blockers = [k[1] for k in keys]
        self.H = _incidence(self.g_holders, G, N)
        self.Bk = _incidence(self.g_blockers, G, N)
        # Inputs a checkpoint keeps although nobody saved them (negative drops): from the end of
        # the unit's forward until its backward is done (the recomputation reads them).
        unsaved = np.zeros(N)
        for k, u in enumerate(p.units):
            if u.fqn in fe and u.fqn in bs:
                extra = sum(u.input_storage_bytes) - sum(p.storages[i].nbytes for i in u.input_storages)
                unsaved[k] = max(0, extra)
        self.unsaved = unsaved
        self.has_unsaved = bool(unsaved.any())

        self.static = p.param_bytes + p.buffer_bytes + p.workspace_bytes
        self.base_state = p.optimizer_state_bytes
        self.live = np.array([e.live_bytes for e in ev], dtype=np.float64)
        self.peak_b = np.array([e.peak_bytes for e in ev], dtype=np.float64)
        self.grad = np.array([e.grad_bytes for e in ev], dtype=np.float64)
        self.is_opt = np.zeros(n, dtype=bool)
        self.is_opt[self.optim_start:self.optim_end] = True
        # In-backward recordings: a "step" event where each parameter's gradient is complete.
        self.step_idx = np.array([i for i, e in enumerate(ev) if e.name == "step"], dtype=np.int64)
        self.step_params = [ev[i].unit for i in self.step_idx]

    # ------------------------------------------------------------------ per configuration
    def constants(self, opt: OptimizerMemory) -> ConfigConstants:
        delta = opt.state_bytes - self.base_state
        c = self.peak_b + delta
        opt_vals = self.live + delta + opt.step_transient_bytes
        fixed = float(opt_vals[self.is_opt].max()) if self.is_opt.any() else 0.0
        a = np.full(self.N, -np.inf)
        ok = self.bs >= 0
        i = self.bs[ok]
        a[ok] = self.live[i] + delta + self.ft[ok]
        per_param = opt.param_step_bytes or {}
        if len(self.step_idx) and opt.param_step_bytes is None:
            raise ValueError("an in-backward recording needs the optimizer's per-parameter recording")
        s_vals = self.live[self.step_idx] + delta + np.array([per_param.get(f, 0) for f in self.step_params],
                                                            dtype=np.float64)
        return ConfigConstants(c=c, fixed_peak=fixed, opt_vals=opt_vals, a=a, state_bytes=opt.state_bytes,
                               s_vals=s_vals, host_bytes=opt.host_bytes)

    # ------------------------------------------------------------------ evaluation
    def drops(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(D per interval, R per unit) for non-SAVE indicator ``x`` (0/1 floats)."""
        n, N = self.n, self.N
        elig = (self.H @ (1.0 - x) == 0) & (self.Bk @ x == 0)
        be = self.g_bytes * elig
        diff = np.bincount(self.g_lo, be, n + 1) - np.bincount(self.g_hi, be, n + 1)
        if self.has_unsaved:
            ok = (self.fe >= 0) & (self.bs >= 0)
            w = self.unsaved[ok] * x[ok]
            diff -= np.bincount(self.fe[ok], w, n + 1)
            diff += np.bincount(self.be[ok], w, n + 1)
        D = np.cumsum(diff)[:n]
        rmask = self.g_restorer >= 0
        R = np.bincount(self.g_restorer[rmask], be[rmask], N) if N else np.zeros(0)
        return D, R

    def peak(self, cc: ConfigConstants, x: np.ndarray, r: np.ndarray) -> float:
        """Predicted peak bytes of decisions ``x`` (non-SAVE) / ``r`` (RECOMPUTE)."""
        D, R = self.drops(x)
        vals = cc.c - D
        best = max(cc.fixed_peak, float(vals[~self.is_opt].max()))
        if len(self.step_idx):
            best = max(best, float((cc.s_vals - D[self.step_idx]).max()))
        rc = r > 0.5
        if rc.any():
            idx = np.nonzero(rc & (self.bs >= 0))[0]
            if len(idx):
                best = max(best, float((cc.a[idx] - (D[self.bs[idx]] + R[idx])).max()))
        return best

    def breakdown(self, cc: ConfigConstants, x: np.ndarray, r: np.ndarray, *, reserve_bytes: int) -> MemoryBreakdown:
        """The peak of :meth:`peak`, with what is live at it by category."""
        D, R = self.drops(x)
        ev = self.profile.timeline
        by_bwd = {int(self.bs[k]): k for k in range(self.N) if self.bs[k] >= 0}
        by_step = {int(i): j for j, i in enumerate(self.step_idx)}
        best = None
        for i in range(self.n):
            nonact = self.static + self.base_state + self.grad[i]
            if self.is_opt[i]:
                cand = (cc.opt_vals[i], "optimizer", self.live[i] - nonact, 0.0, cc.opt_vals[i] - self.live[i]
                        - (cc.state_bytes - self.base_state), 0.0, i)
            else:
                act_live = self.live[i] - nonact - D[i]
                cand = (cc.c[i] - D[i], _phase(ev[i].name), act_live, 0.0, 0.0, self.peak_b[i] - self.live[i], i)
                k = by_bwd.get(i)
                if k is not None and r[k] > 0.5:
                    start = act_live - R[k]
                    rpeak = cc.a[k] - D[i] - R[k]
                    if rpeak > cand[0]:
                        cand = (rpeak, f"recompute:{self.fqns[k]}", start, self.ft[k], 0.0, 0.0, i)
                j = by_step.get(i)
                if j is not None:
                    speak = cc.s_vals[j] - D[i]
                    if speak > cand[0]:
                        cand = (speak, f"optimizer-in-backward:{self.step_params[j]}", act_live, 0.0,
                                cc.s_vals[j] - self.live[i] - (cc.state_bytes - self.base_state), 0.0, i)
            if best is None or cand[0] > best[0]:
                best = cand
        peak, phase, act, rc, opt_tmp, other, i = best
        return MemoryBreakdown(
            peak_bytes=int(math.ceil(peak)), params_bytes=int(self.static), grads_bytes=int(self.grad[i]),
            optimizer_state_bytes=int(cc.state_bytes), saved_activation_bytes=int(act),
            recompute_transient_bytes=int(rc), optimizer_transient_bytes=int(opt_tmp), other_transient_bytes=int(other),
            reserve_bytes=reserve_bytes, phase=phase,
            host_bytes=int(cc.host_bytes) if self.profile.target != "cpu" else 0)

    def indicators(self, decisions: dict[str, Decision]) -> tuple[np.ndarray, np.ndarray]:
        """(x, r) vectors of a decision dict (units it omits are SAVE)."""
        x = np.array([decisions.get(f, Decision.SAVE) is not Decision.SAVE for f in self.fqns], dtype=float)
        r = np.array([decisions.get(f, Decision.SAVE) is Decision.RECOMPUTE for f in self.fqns], dtype=float)
        return x, r


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


def _phase(event_name: str) -> str:
    if event_name.startswith("fwd") or event_name == "start":
        return "forward"
    if event_name == "loss":
        return "loss"
    if event_name.startswith("bwd"):
        return "backward"
    return "optimizer"
