"""An independent, loop-by-loop replay of a recorded step under a plan: the reference the
vectorized :class:`memtune.timeline.TimelineModel` (which ``predict_peak`` and the planners
use) is checked against. It walks the timeline interval by interval and storage by storage,
with no difference arrays and no groups."""

from __future__ import annotations

from memtune.plan import Decision, Plan
from memtune.profile import ModelProfile
from memtune.timeline import plan_optimizer_memory, plan_recording
from memtune.units import inside_unit


def reference_peak(profile: ModelProfile, plan: Plan) -> int:
    p = plan_recording(profile, plan)
    ev = p.timeline
    n = len(ev)
    fwd_end = {e.unit: i for i, e in reversed(list(enumerate(ev))) if e.name == "fwd_end"}
    bwd_start = {e.unit: i for i, e in reversed(list(enumerate(ev))) if e.name == "bwd_start"}
    optim_start = next(i for i, e in enumerate(ev) if e.name == "optim_start")
    optim_end = next(i for i, e in enumerate(ev) if e.name == "optim_end")
    dropped_units = {u for u, d in plan.decisions.items() if d is not Decision.SAVE}
    inputs = {u.fqn: set(u.input_storages) for u in p.units}

    def bwd_end(u: str) -> int:
        end = bwd_start[u] + 1
        while end < n and ev[end].name not in ("bwd_start", "bwd_end", "bwd_done", "optim_start"):
            end += 1  # "step" events (in-backward updates) happen inside the unit's backward
        return end

    # A SELECTIVE unit's checkpoint caches the outputs of the ops in its save set.
    # The recomputation stops after the last op that saves anything (early stop): the cached calls
    # it reaches are consumed at the unit's backward start, the later ones live to its end.
    cached_by: dict[int, str] = {}
    extended: list[tuple[str, int, bool]] = []  # (unit, storage, consumed by the recomputation)
    cached_early = {u: 0 for u in dropped_units}
    cached_late = {u: 0 for u in dropped_units}
    for u in p.units:
        if plan.decisions.get(u.fqn) is not Decision.SELECTIVE:
            continue
        last = max([i for i, o in enumerate(u.ops) if o.saves] or [len(u.ops) - 1])
        for i, (key, op) in enumerate(zip(_call_keys(u), u.ops)):
            if key in plan.save_ops[u.fqn] and op.out_bytes and not (op.view or op.inplace or op.mutated):
                for sid in op.storages:
                    cached_by[sid] = u.fqn
                    if u.fqn not in p.storages[sid].holders:
                        extended.append((u.fqn, sid, i <= last))  # kept past where a plain step frees it
                extra = max(0, op.out_bytes - sum(p.storages[sid].nbytes for sid in op.storages))
                if i <= last:
                    cached_early[u.fqn] += extra
                else:
                    cached_late[u.fqn] += extra
    dropped = [0] * n
    restored = {u: 0 for u in dropped_units}
    for sid, s in enumerate(p.storages):
        if s.saved_outside or not s.holders:
            continue
        if cached_by.get(sid, s.holders[0]) not in s.holders:
            continue  # the cache of a unit that does not hold it keeps it
        # The holders in the order their backward runs: the first k are done with it at the end
        # of their backward (with the original or their own copy); if every later one drops it,
        # it is absent from there until the next one's backward, which restores it.
        order = sorted(s.holders, key=lambda h: bwd_start.get(h, s.freed))
        for k, h in enumerate(order):
            later, earlier = order[k:], order[:k]
            if any(v not in dropped_units or cached_by.get(sid) == v for v in later):
                continue
            if any(sid in inputs.get(v, ()) for v in dropped_units if v not in earlier):
                continue  # a checkpoint keeps it
            if not any(v in fwd_end for v in later) or k and any(v not in fwd_end or v not in bwd_start for v in order):
                break
            lo = max([bwd_end(v) for v in earlier] + [fwd_end[v] for v in later if v in fwd_end] + [s.created + 1])
            hi = min(min(bwd_start.get(v, s.freed) for v in later), s.freed)
            for i in range(lo, hi):
                dropped[i] += s.nbytes
            if lo <= hi:
                for v in later:  # restored by the holder whose backward starts the window's end
                    if bwd_start.get(v) == hi:
                        restored[v] += s.nbytes
                        break
    for u in p.units:  # a checkpoint keeps its inputs, saved or not, until its backward is done
        if u.fqn in dropped_units and u.fqn in fwd_end and u.fqn in bwd_start:
            unsaved = max(0, sum(u.input_storage_bytes) - sum(p.storages[i].nbytes for i in u.input_storages))
            for i in range(fwd_end[u.fqn], bwd_end(u.fqn)):
                dropped[i] -= unsaved + cached_late[u.fqn]  # the cache the recomputation never reaches too
            for i in range(fwd_end[u.fqn], bwd_start[u.fqn]):
                dropped[i] -= cached_early[u.fqn]
    popped = {u: 0 for u in dropped_units}
    for fqn, sid, consumed in extended:
        if fqn not in fwd_end or fqn not in bwd_start:
            continue
        end = bwd_end(fqn)
        if consumed:
            end = bwd_start[fqn]
            if end > p.storages[sid].freed + 1:
                popped[fqn] += p.storages[sid].nbytes  # live in the recomputation until consumed
        for i in range(p.storages[sid].freed + 1, end):
            dropped[i] -= p.storages[sid].nbytes
    # An OFFLOAD unit fetches a copy of every storage it saved (not its inputs) when its backward starts; one that
    # someone else saves too was never freed, so the copy is extra until the unit's backward ends.
    for u in p.units:
        if plan.decisions.get(u.fqn) is Decision.OFFLOAD and u.fqn in fwd_end and u.fqn in bwd_start:
            shared = sum(p.storages[sid].nbytes for sid in set(u.saved_storages) - set(u.input_storages)
                         if p.storages[sid].saved_outside or set(p.storages[sid].holders) - {u.fqn})
            for i in range(bwd_start[u.fqn], bwd_end(u.fqn)):
                dropped[i] -= shared
    opt = plan_optimizer_memory(p, plan)
    # Plus the runtime's copies of the buffers the step writes (memtune.stateful): the trainer's
    # snapshot all step; each recomputed unit's own copy from its forward start to its backward
    # end, and one more while it recomputes (three of all throughout without per-buffer sizes).
    written = {u.fqn: 0 for u in p.units}
    if p.written_buffer_sizes:
        delta = opt.state_bytes - p.optimizer_state_bytes + p.written_buffer_bytes
        for u in written:
            written[u] = sum(b for n, b in zip(p.written_buffers, p.written_buffer_sizes) if inside_unit(u, n))
        fwd_start = {e.unit: i for i, e in reversed(list(enumerate(ev))) if e.name == "fwd_start"}
        for u, d in plan.decisions.items():
            if d.recomputes and written[u] and u in fwd_start and u in bwd_start:
                for i in range(fwd_start[u], bwd_end(u)):
                    dropped[i] -= written[u]
    else:
        delta = opt.state_bytes - p.optimizer_state_bytes + 3 * p.written_buffer_bytes
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
                best = max(best, e.live_bytes + delta - dropped[i] - restored[u] + p.unit(u).fwd_transient_bytes
                           + written[u])
            if j == i and plan.decisions.get(u) is Decision.SELECTIVE:
                best = max(best, e.live_bytes + delta - dropped[i] - restored[u]
                           + _partial_forward_peak(p.unit(u), plan.save_ops[u]) + popped[u] + written[u])
    return best


def _partial_forward_peak(unit, save_ops) -> int:
    """What a selective recomputation allocates at its peak, replayed from the per-op record in
    the plainest way: it runs up to the last op that saves anything; at each op, the bytes of
    every allocation a recomputed op made so far that the forward had not freed yet, plus the
    cached outputs backward does not need (live from the start until the forward freed them);
    plus what the forward's measured transient has beyond the full replay with nothing saved."""
    names = _call_keys(unit)
    last = max([i for i, o in enumerate(unit.ops) if o.saves] or [len(unit.ops) - 1])

    def peak(keep, stop) -> int:
        best = 0
        saved = [n in keep and o.out_bytes and not (o.view or o.inplace or o.mutated) for n, o in zip(names, unit.ops)]
        for i in range(stop + 1):
            live = 0
            for j, o in enumerate(unit.ops[:stop + 1]):
                for nbytes, freed, needed in o.allocations:
                    alive = freed == 0 or freed > i
                    if saved[j] and not needed and alive:
                        live += nbytes          # in the cache since the recomputation began
                    elif not saved[j] and j <= i and alive:
                        live += nbytes
            best = max(best, live)
        return best

    if not unit.ops or not any(o.allocations for o in unit.ops):
        return unit.fwd_transient_bytes
    return peak(set(save_ops), last) + max(0, unit.fwd_transient_bytes - peak(set(), len(unit.ops) - 1))


def _call_keys(unit) -> list[str]:
    """``name#k``: the k-th call of an overload in the unit's forward (how save sets name ops)."""
    names, seen = [], {}
    for o in unit.ops:
        names.append(f"{o.name}#{seen.get(o.name, 0)}")
        seen[o.name] = seen.get(o.name, 0) + 1
    return names
