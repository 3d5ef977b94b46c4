"""``memtune.predict_peak``: the peak memory of a training step under a plan.

It replays the profiled step's **timeline** rather than summing terms. The profile holds
the measured live bytes and peak of every interval between unit boundaries of a plain
step (no recomputation), and every activation storage autograd saved, with the intervals
where it was created and freed and the units that saved it. A plan changes that timeline
in exactly these ways:

* **RECOMPUTE** unit *u*: a storage that only *u* saves (and is not an input that a
  checkpoint keeps anyway) is dropped from the end of *u*'s forward until *u*'s backward
  starts. There *u*'s forward runs again: the recompute transient is *u*'s measured
  forward transient on top of what is live at that moment; afterwards *u*'s storages
  are live again, as in the plain step. Inputs of *u* that nobody else saved are kept by
  the checkpoint over the same window.
* **OFFLOAD** unit *u*: as RECOMPUTE, but the storages come back by copy (no transient).
* **Optimizer**: the plan's state bytes replace the profiled optimizer's for the whole
  step, and the optimizer-step interval uses the plan's step temporaries (e.g. the
  Newton-Schulz workspace) instead of the profiled optimizer's.
* **Micro-batching** (micro-batch *m* of profiled batch *B*): activation bytes scale by
  *m/B*; with more than one accumulation step, all gradients are live from the start of
  every micro-step after the first.

The peak is the maximum over all intervals. Drops are applied with difference arrays,
so a 1000-unit profile is replayed in milliseconds.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .plan import Decision, MemoryBreakdown, OptimizerPlan, Plan
from .profile import ModelProfile

from .optim.quant import BLOCK_SIZE as INT8_BLOCK  # elements per absmax scale in int8 optimizer state

_STATE_ELEM_BYTES = {"fp32": 4, "bf16": 2, "int8": 1}


@dataclass(frozen=True, slots=True)
class OptimizerMemory:
    state_bytes: int
    step_transient_bytes: int


def _state_tensor_bytes(numel: int, state_dtype: str, granularity: int) -> int:
    n = numel * _STATE_ELEM_BYTES[state_dtype]
    if state_dtype == "int8":
        n_scale = math.ceil(numel / INT8_BLOCK) * 4
        return _round(n, granularity) + _round(n_scale, granularity)
    return _round(n, granularity)


def _round(n: int, g: int) -> int:
    return n if g <= 1 or n == 0 else math.ceil(n / g) * g


def optimizer_memory(profile: ModelProfile, opt: OptimizerPlan) -> OptimizerMemory:
    """State bytes and step temporaries of ``opt`` on ``profile``'s parameters.

    Uses the profile's measurement when the profiler ran this optimizer configuration
    (``profile.optimizer_options``), else the state layout of :mod:`memtune.optim`:
    AdamW keeps two moments per parameter, Muon² a momentum and a second moment per
    matrix, Muon a momentum; each in the plan's state precision (int8 adds one fp32
    scale per 256 elements)."""
    for measured in getattr(profile, "optimizer_options", ()):
        if measured.key == opt.key:
            return OptimizerMemory(measured.state_bytes, measured.step_transient_bytes)
    if opt.name == profile.optimizer and opt.state_dtype == "fp32":
        return profiled_optimizer_memory(profile)
    g = profile.allocation_granularity
    muon = set(opt.muon_params) if opt.name != "adamw" else set()
    state = 0
    largest_matrix = 0
    largest_m = 0
    adam_param_bytes = 0
    for p in profile.params:
        numel = math.prod(p.shape)
        if p.fqn in muon:
            n_states = 2 if opt.name == "muon2" else 1
            state += n_states * _state_tensor_bytes(numel, opt.state_dtype, g)
            largest_matrix = max(largest_matrix, numel)
            largest_m = max(largest_m, min(p.shape[0], math.prod(p.shape[1:])) if len(p.shape) >= 2 else 1)
        else:
            state += 2 * _state_tensor_bytes(numel, opt.state_dtype, g)
            adam_param_bytes += p.param_bytes
    # Step temporaries. Muon-family: one matrix at a time: the fp32 update and its
    # preconditioned copy, the bf16 NS iterate and its next value, and two m x m bf16 Gram
    # matrices. AdamW (foreach on CUDA): about one parameter-sized temporary list.
    ns_workspace = 0
    if muon:
        ns_workspace = (_round(largest_matrix * 4, g) * 2 + _round(largest_matrix * 2, g) * 2
                        + _round(largest_m * largest_m * 2, g) * 2)
    adam_tmp = adam_param_bytes if profile.target == "cuda" else max((p.param_bytes for p in profile.params
                                                                      if p.fqn not in muon), default=0)
    if opt.state_dtype != "fp32":  # dequantized fp32 copies of the two moments for the largest tensor
        adam_tmp += 2 * max((math.prod(p.shape) * 4 for p in profile.params), default=0)
    return OptimizerMemory(state, max(ns_workspace, adam_tmp))


def profiled_optimizer_memory(profile: ModelProfile) -> OptimizerMemory:
    """What the profiled optimizer measured: its state and step temporaries."""
    ev = profile.timeline
    i = next(i for i, e in enumerate(ev) if e.name == "optim_start")
    return OptimizerMemory(profile.optimizer_state_bytes, ev[i].peak_bytes - ev[i].live_bytes)


def predict_peak(profile: ModelProfile, plan: Plan, *, reserve_bytes: int | None = None) -> MemoryBreakdown:
    """Predicted peak memory of one training step of ``profile``'s model under ``plan``."""
    return _Replay(profile, plan).run(reserve_bytes if reserve_bytes is not None else plan.budget_bytes - plan.usable_bytes)


class _Replay:
    def __init__(self, profile: ModelProfile, plan: Plan):
        self.p = profile
        self.plan = plan
        ev = profile.timeline
        self.n = len(ev)
        self.fwd_end: dict[str, int] = {}
        self.bwd_start: dict[str, int] = {}
        for i, e in enumerate(ev):
            if e.name == "fwd_end" and e.unit not in self.fwd_end:
                self.fwd_end[e.unit] = i
            elif e.name == "bwd_start" and e.unit not in self.bwd_start:
                self.bwd_start[e.unit] = i
        self.optim_start = next(i for i, e in enumerate(ev) if e.name == "optim_start")
        self.optim_end = next(i for i, e in enumerate(ev) if e.name == "optim_end")

    def _drops(self) -> tuple[list[int], dict[str, int]]:
        """Per interval, bytes a plan removes from the plain step's live set; and per
        dropped unit, the bytes its recompute (or reload) brings back."""
        p, plan = self.p, self.plan
        dropped_units = {u for u, d in plan.decisions.items() if d is not Decision.SAVE}
        diff = [0] * (self.n + 1)
        restored: dict[str, int] = {u: 0 for u in dropped_units}
        if not dropped_units:
            return [0] * self.n, restored
        kept_as_input: set[int] = set()
        for u in p.units:
            if u.fqn in dropped_units:
                kept_as_input.update(u.input_storages)
        for sid, s in enumerate(p.storages):
            if s.saved_outside or not s.holders or sid in kept_as_input:
                continue
            if any(h not in dropped_units for h in s.holders):
                continue
            lo = max(self.fwd_end[h] for h in s.holders if h in self.fwd_end)
            hi = min(self.bwd_start.get(h, s.freed) for h in s.holders)
            lo, hi = max(lo, s.created + 1), min(hi, s.freed)
            if lo < hi:
                diff[lo] += s.nbytes
                diff[hi] -= s.nbytes
                for h in s.holders:  # restored by the last holder to run backward (the first in forward)
                    if self.bwd_start.get(h) == hi:
                        restored[h] += s.nbytes
                        break
        # A checkpoint keeps its inputs alive even where the plain step would have freed them.
        for u in p.units:
            if u.fqn in dropped_units and u.fqn in self.fwd_end and u.fqn in self.bwd_start:
                unsaved = sum(u.input_storage_bytes) - sum(p.storages[i].nbytes for i in u.input_storages)
                if unsaved > 0:
                    diff[self.fwd_end[u.fqn]] -= unsaved
                    diff[self.bwd_start[u.fqn]] += unsaved
        out, acc = [], 0
        for i in range(self.n):
            acc += diff[i]
            out.append(acc)
        return out, restored

    def run(self, reserve_bytes: int) -> MemoryBreakdown:
        p, plan = self.p, self.plan
        ev = p.timeline
        dropped, restored = self._drops()
        base_opt = profiled_optimizer_memory(p)
        plan_opt = optimizer_memory(p, plan.optimizer) if plan.optimizer is not None else base_opt
        scale = 1.0
        if plan.micro_batch_size is not None and p.batch_size:
            scale = plan.micro_batch_size / p.batch_size
        accum = plan.grad_accum_steps > 1
        static = p.param_bytes + p.buffer_bytes + p.workspace_bytes

        def nonact(i: int) -> int:  # bytes that do not scale with the batch
            return static + base_opt.state_bytes + ev[i].grad_bytes

        def plan_nonact(i: int) -> int:
            grads = p.grad_bytes if accum and i < self.optim_start else ev[i].grad_bytes
            return static + plan_opt.state_bytes + grads

        best = None
        units_by_bwd = {i: u for u, i in self.bwd_start.items()}
        for i, e in enumerate(ev):
            if self.optim_start <= i < self.optim_end:
                act_live = e.live_bytes - nonact(i)
                peak = plan_nonact(i) + act_live * scale + plan_opt.step_transient_bytes
                cand = (peak, "optimizer", act_live * scale, 0, plan_opt.step_transient_bytes, 0, i)
            else:
                act_peak = (e.peak_bytes - nonact(i) - dropped[i]) * scale
                act_live = (e.live_bytes - nonact(i) - dropped[i]) * scale
                phase = _phase(e.name)
                cand = (plan_nonact(i) + act_peak, phase, act_live, 0, 0, act_peak - act_live, i)
                u = units_by_bwd.get(i)
                if u is not None and plan.decisions.get(u) is Decision.RECOMPUTE:
                    # Recompute runs at the start of the unit's backward, before its storages are back.
                    start = (e.live_bytes - nonact(i) - dropped[i] - restored[u]) * scale
                    rc = p.unit(u).fwd_transient_bytes * scale
                    rpeak = plan_nonact(i) + start + rc
                    if rpeak > cand[0]:
                        cand = (rpeak, f"recompute:{u}", start, rc, 0, 0, i)
            if best is None or cand[0] > best[0]:
                best = cand
        peak, phase, act, rc, opt_tmp, other, i = best
        return MemoryBreakdown(
            peak_bytes=int(math.ceil(peak)),
            params_bytes=static,
            grads_bytes=p.grad_bytes if accum and i < self.optim_start else ev[i].grad_bytes,
            optimizer_state_bytes=plan_opt.state_bytes,
            saved_activation_bytes=int(act),
            recompute_transient_bytes=int(rc),
            optimizer_transient_bytes=int(opt_tmp),
            other_transient_bytes=int(other),
            reserve_bytes=reserve_bytes,
            phase=phase,
        )


def _phase(event_name: str) -> str:
    if event_name.startswith("fwd") or event_name == "start":
        return "forward"
    if event_name in ("loss",):
        return "loss"
    if event_name.startswith("bwd"):
        return "backward"
    return "optimizer"
