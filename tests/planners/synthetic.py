"""Synthetic chain profiles for the planner tests: valid :class:`ModelProfile` objects whose
timeline, storages and units follow the profiler's semantics (docs/profiler.md), with random
sizes so that planners meet shapes no zoo model has.

A chain of ``n_units`` units, each with one weight matrix and a bias. Per unit, randomly:

* its input (the previous unit's output) is saved by the unit itself (a kept checkpoint
  input, never dropped), or by nobody (a checkpoint must keep it: an *unsaved input*);
* 1-3 internal storages saved only by the unit (window ``[fe(u), bs(u))``);
* sometimes a storage produced by the unit and saved by it *and* the next unit (shared);
* sometimes a storage also saved by code outside the units (never dropped).

Live bytes at every event are the sum of what is alive then, peaks add random transients,
gradients appear as backward proceeds, and the optimizer step adds a random temporary.
"""

from __future__ import annotations

import random

from memtune.profile import ModelProfile, ParamInfo, StorageInfo, TimelineEvent, UnitProfile


def chain_profile(n_units: int, seed: int, *, batch_size: int = 4, scale: int = 1024,
                  target_name: str = "cpu") -> ModelProfile:
    """``target_name="H100"`` makes a CUDA-target profile (offload is only planned there)."""
    rng = random.Random(seed)
    # Event indices: 0 start, fwd_start(k)=1+2k, fwd_end(k)=2+2k, loss, bwd_start(k) in reverse, ...
    fs = [1 + 2 * k for k in range(n_units)]
    fe = [2 + 2 * k for k in range(n_units)]
    loss = 1 + 2 * n_units
    bs = {k: loss + 1 + (n_units - 1 - k) for k in range(n_units)}
    bwd_end = loss + 1 + n_units
    bwd_done, optim_start, optim_end, end = bwd_end + 1, bwd_end + 2, bwd_end + 3, bwd_end + 4
    n_events = end + 1

    blobs: list[tuple[int, int, int]] = []       # (bytes, created, freed): everything alive
    storages: list[StorageInfo] = []
    saved: dict[int, list[int]] = {k: [] for k in range(n_units)}
    inputs: dict[int, list[int]] = {k: [] for k in range(n_units)}
    input_bytes: dict[int, list[int]] = {k: [] for k in range(n_units)}

    def storage(nbytes, created, freed, producer, holders, outside=False) -> int:
        storages.append(StorageInfo(nbytes=nbytes, created=created, freed=freed, producer=producer,
                                    holders=tuple(holders), saved_outside=outside))
        blobs.append((nbytes, created, freed))
        return len(storages) - 1

    name = lambda k: f"blocks.{k}"  # noqa: E731
    embed_bytes = rng.randint(1, 8) * scale
    prev_out = (embed_bytes, 0, None)  # (bytes, created interval, producer)
    for k in range(n_units):
        nb, created, producer = prev_out
        # The unit's input.
        if rng.random() < 0.6:
            sid = storage(nb, created, bs[k], producer, [name(k)])
            saved[k].append(sid)
            inputs[k].append(sid)
        else:
            blobs.append((nb, created, fe[k]))   # freed once the unit's forward is done
        input_bytes[k].append(nb)
        for _ in range(rng.randint(1, 3)):
            saved[k].append(storage(rng.randint(1, 16) * scale, fs[k], bs[k], name(k), [name(k)]))
        if k + 1 < n_units and rng.random() < 0.3:
            sid = storage(rng.randint(1, 8) * scale, fs[k], bs[k], name(k), [name(k), name(k + 1)])
            saved[k].append(sid)
            saved[k + 1].append(sid)
        if rng.random() < 0.2:
            saved[k].append(storage(rng.randint(1, 4) * scale, fs[k], bs[k], name(k), [name(k)], outside=True))
        prev_out = (rng.randint(1, 8) * scale, fs[k], name(k))
    # The head saves the last output and its own activation; the batch lives all step.
    out_b, out_c, out_p = prev_out
    storage(out_b, out_c, loss, out_p, [], outside=True)
    head_act = rng.randint(1, 8) * scale
    storage(head_act, fe[-1], loss, None, [], outside=True)
    batch_bytes = batch_size * 8
    blobs.append((batch_bytes, -1, n_events))

    widths = [rng.choice([8, 16, 32]) for _ in range(n_units)]
    params = [ParamInfo(fqn="embed.weight", shape=(64, 8), dtype="float32", param_bytes=64 * 8 * 4, unit=None,
                        module_type="Embedding")]
    for k, d in enumerate(widths):
        params.append(ParamInfo(fqn=f"{name(k)}.fc.weight", shape=(d, d), dtype="float32", param_bytes=4 * d * d,
                                unit=name(k), module_type="Linear"))
        params.append(ParamInfo(fqn=f"{name(k)}.fc.bias", shape=(d,), dtype="float32", param_bytes=4 * d,
                                unit=name(k), module_type="Linear"))
    params.append(ParamInfo(fqn="head.weight", shape=(64, 8), dtype="float32", param_bytes=64 * 8 * 4, unit=None,
                            module_type="Linear"))
    param_bytes = sum(p.param_bytes for p in params)
    unit_params = {k: 4 * widths[k] * widths[k] + 4 * widths[k] for k in range(n_units)}
    opt_state = 2 * param_bytes
    head_params = param_bytes - sum(unit_params.values())

    done_by = [0] * (n_events + 1)  # unit gradients appear once the unit's backward ran
    for k in range(n_units):
        done_by[bs[k] + 1] += unit_params[k]
    unit_grads = [0] * n_events
    acc = 0
    for i in range(n_events):
        acc += done_by[i]
        unit_grads[i] = acc

    def grads_at(i: int) -> int:
        return 0 if i <= loss or i >= end else head_params + unit_grads[i]

    diff = [0] * (n_events + 2)
    for b, c, f in blobs:  # alive at events c+1 .. f
        diff[max(c + 1, 0)] += b
        diff[min(f, n_events - 1) + 1] -= b
    act, live = 0, []
    for i in range(n_events):
        act += diff[i]
        live.append(param_bytes + opt_state + grads_at(i) + act)
    live[end] = param_bytes + opt_state + batch_bytes
    events = []
    for i in range(n_events):
        nm, unit = _event(i, fs, fe, loss, bs, bwd_end, bwd_done, optim_start, optim_end, name)
        nxt = live[i + 1] if i + 1 < n_events else live[i]
        extra = rng.randint(0, 12) * scale if i not in (optim_end, end) else 0
        if i == optim_start:
            extra = rng.randint(0, 2 * param_bytes)
        events.append(TimelineEvent(name=nm, unit=unit, live_bytes=live[i], peak_bytes=max(live[i], nxt) + extra,
                                    grad_bytes=grads_at(i)))
    units = []
    for k in range(n_units):
        sv = sum(storages[s].nbytes for s in saved[k])
        units.append(UnitProfile(
            fqn=name(k), module_type="Block", order=k, param_bytes=unit_params[k], grad_bytes=unit_params[k],
            saved_activation_bytes=sv, input_bytes=sum(input_bytes[k]), output_bytes=rng.randint(1, 8) * scale,
            fwd_flops=rng.randint(1, 50) * 10**6, bwd_flops=rng.randint(2, 100) * 10**6,
            fwd_transient_bytes=rng.randint(0, 24) * scale, bwd_transient_bytes=rng.randint(0, 24) * scale,
            saved_storages=tuple(saved[k]), input_storages=tuple(inputs[k]),
            input_storage_bytes=tuple(input_bytes[k])))
    return ModelProfile(
        model=f"SyntheticChain(n={n_units}, seed={seed})", tracer="synthetic", tracers_tried=(),
        target="cpu" if target_name == "cpu" else "cuda", target_name=target_name, precision="fp32", optimizer="adamw", batch_size=batch_size,
        sample=f"({batch_size}, 2) int64", param_bytes=param_bytes, buffer_bytes=0, grad_bytes=param_bytes,
        optimizer_state_bytes=opt_state, input_bytes=batch_bytes,
        outside_activation_bytes=sum(s.nbytes for s in storages if s.saved_outside),
        baseline_peak_bytes=max(e.peak_bytes for e in events),
        fwd_flops=sum(u.fwd_flops for u in units) + 10**6, bwd_flops=sum(u.bwd_flops for u in units) + 2 * 10**6,
        units=tuple(units), params=tuple(params), storages=tuple(storages), timeline=tuple(events))


def _event(i, fs, fe, loss, bs, bwd_end, bwd_done, optim_start, optim_end, name):
    if i == 0:
        return "start", None
    if i in fs:
        return "fwd_start", name(fs.index(i))
    if i in fe:
        return "fwd_end", name(fe.index(i))
    if i == loss:
        return "loss", None
    for k, j in bs.items():
        if j == i:
            return "bwd_start", name(k)
    if i == bwd_end:
        return "bwd_end", name(0)
    return {bwd_done: ("bwd_done", None), optim_start: ("optim_start", None),
            optim_end: ("optim_end", None)}.get(i, ("end", None))
