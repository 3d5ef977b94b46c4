"""An independent, loop-by-loop replay of a recorded step under a plan: the reference the
vectorized :class:`memtune.timeline.TimelineModel` (which ``predict_peak`` and the planners
use) is checked against. It walks the timeline interval by interval and storage by storage,
with no difference arrays and no groups."""

from __future__ import annotations

from memtune.plan import Decision, Plan
from memtune.profile import ModelProfile
from memtune.timeline import plan_optimizer_memory, plan_recording


def reference_peak(profile: ModelProfile, plan: Plan) -> int:
    p = plan_recording(profile, plan)
    ev = p.timeline
    n = len(ev)
    fwd_end = {e.unit: i for i, e in reversed(list(enumerate(ev))) if e.name == "fwd_end"}
    bwd_start = {e.unit: i for i, e in reversed(list(enumerate(ev))) if e.name == "bwd_start"}
    optim_start = next(i for i, e in enumerate(ev) if e.name == "optim_start")
    optim_end = next(i for i, e in enumerate(ev) if e.name == "optim_end")
    dropped_units = {u for u, d in plan.decisions.items() if d is not Decision.SAVE}
    kept_as_input = {sid for u in p.units if u.fqn in dropped_units for sid in u.input_storages}
    dropped = [0] * n
    restored = {u: 0 for u in dropped_units}
    for sid, s in enumerate(p.storages):
        if s.saved_outside or not s.holders or sid in kept_as_input:
            continue
        if any(h not in dropped_units for h in s.holders):
            continue
        lo = max(max(fwd_end[h] for h in s.holders if h in fwd_end), s.created + 1)
        hi = min(min(bwd_start.get(h, s.freed) for h in s.holders), s.freed)
        for i in range(lo, hi):
            dropped[i] += s.nbytes
        if lo < hi:
            for h in s.holders:  # restored by the holder whose backward starts the window's end
                if bwd_start.get(h) == hi:
                    restored[h] += s.nbytes
                    break
    for u in p.units:  # a checkpoint keeps its inputs, saved or not, until its backward is done
        if u.fqn in dropped_units and u.fqn in fwd_end and u.fqn in bwd_start:
            unsaved = sum(u.input_storage_bytes) - sum(p.storages[i].nbytes for i in u.input_storages)
            end = bwd_start[u.fqn] + 1
            while end < n and ev[end].name not in ("bwd_start", "bwd_end", "bwd_done", "optim_start"):
                end += 1  # "step" events (in-backward updates) happen inside the unit's backward
            for i in range(fwd_end[u.fqn], end):
                dropped[i] -= max(0, unsaved)
    opt = plan_optimizer_memory(p, plan)
    delta = opt.state_bytes - p.optimizer_state_bytes
    best = 0
    for i, e in enumerate(ev):
        if optim_start <= i < optim_end:
            best = max(best, e.live_bytes + delta + opt.step_transient_bytes)
            continue
        best = max(best, e.peak_bytes + delta - dropped[i])
        if e.name == "step":  # an optimizer step in backward updates this parameter here
            best = max(best, e.live_bytes + delta - dropped[i] + opt.param_step_bytes[e.unit])
        for u, j in bwd_start.items():
            if j == i and plan.decisions.get(u) is Decision.RECOMPUTE:
                best = max(best, e.live_bytes + delta - dropped[i] - restored[u] + p.unit(u).fwd_transient_bytes)
    return best
