"""Synthetic chain profiles for the planner tests: valid :class:`ModelProfile` objects whose
timeline, storages, units, micro-batch recordings and optimizer recordings follow the
profiler's semantics (docs/profiler.md), with random sizes so that planners meet shapes no
zoo model has.

A chain of ``n_units`` units, each with one weight matrix and a bias. Per unit, randomly:

* its input (the previous unit's output) is saved by the unit itself (a kept checkpoint
  input, never dropped), or by nobody (a checkpoint must keep it: an *unsaved input*);
* 1-3 internal storages saved only by the unit (window ``[fe(u), bs(u))``);
* sometimes a storage produced by the unit and saved by it *and* the next unit (shared);
* sometimes a storage also saved by code outside the units (never dropped).

Live bytes at every event are the sum of what is alive then, peaks add random transients,
gradients appear as backward proceeds (or are live from the start in the accumulation-mode
micro-batch recordings, whose activations shrink with the micro-batch, not exactly
linearly), and the optimizer step adds a random temporary. Every optimizer configuration a
plan may choose is "recorded" with its own state bytes and step temporary.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field

from memtune.optimizers import DEFAULT_NS_STEPS, FAMILIES
from memtune.plan import STATE_DTYPES
from memtune.profile import (ModelProfile, OptimizerStepProfile, ParamInfo, StepRecording, StorageInfo, TimelineEvent,
                             UnitProfile)


@dataclass
class _Chain:
    n_units: int
    fs: list[int]
    fe: list[int]
    loss: int
    bs: dict[int, int]
    bwd_end: int
    n_events: int
    storages: list[tuple] = field(default_factory=list)   # (bytes, created, freed, producer, holders, outside, blob)
    blobs: list[tuple] = field(default_factory=list)      # (bytes, created, freed, is_activation)
    saved: dict[int, list[int]] = field(default_factory=dict)
    inputs: dict[int, list[int]] = field(default_factory=dict)
    input_blobs: dict[int, list[int]] = field(default_factory=dict)  # indices into blobs


def _name(k: int) -> str:
    return f"blocks.{k}"


def _structure(n_units: int, rng: random.Random, scale: int, batch_size: int) -> _Chain:
    fs = [1 + 2 * k for k in range(n_units)]
    fe = [2 + 2 * k for k in range(n_units)]
    loss = 1 + 2 * n_units
    bs = {k: loss + 1 + (n_units - 1 - k) for k in range(n_units)}
    bwd_end = loss + 1 + n_units
    ch = _Chain(n_units, fs, fe, loss, bs, bwd_end, bwd_end + 5,
                saved={k: [] for k in range(n_units)}, inputs={k: [] for k in range(n_units)},
                input_blobs={k: [] for k in range(n_units)})

    def storage(nbytes, created, freed, producer, holders, outside=False) -> int:
        ch.storages.append((nbytes, created, freed, producer, tuple(holders), outside, len(ch.blobs)))
        ch.blobs.append((nbytes, created, freed, True))
        return len(ch.storages) - 1

    prev_out = (rng.randint(1, 8) * scale, 0, None)
    for k in range(n_units):
        nb, created, producer = prev_out
        if rng.random() < 0.6:
            sid = storage(nb, created, bs[k], producer, [_name(k)])
            ch.saved[k].append(sid)
            ch.inputs[k].append(sid)
            ch.input_blobs[k].append(len(ch.blobs) - 1)
        else:
            ch.blobs.append((nb, created, fe[k], True))   # freed once the unit's forward is done
            ch.input_blobs[k].append(len(ch.blobs) - 1)
        for _ in range(rng.randint(1, 3)):
            ch.saved[k].append(storage(rng.randint(1, 16) * scale, fs[k], bs[k], _name(k), [_name(k)]))
        if k + 1 < n_units and rng.random() < 0.3:
            sid = storage(rng.randint(1, 8) * scale, fs[k], bs[k], _name(k), [_name(k), _name(k + 1)])
            ch.saved[k].append(sid)
            ch.saved[k + 1].append(sid)
        if rng.random() < 0.2:
            ch.saved[k].append(storage(rng.randint(1, 4) * scale, fs[k], bs[k], _name(k), [_name(k)], outside=True))
        prev_out = (rng.randint(1, 8) * scale, fs[k], _name(k))
    out_b, out_c, out_p = prev_out
    storage(out_b, out_c, loss, out_p, [], outside=True)
    storage(rng.randint(1, 8) * scale, fe[-1], loss, None, [], outside=True)
    ch.blobs.append((batch_size * 8, -1, ch.n_events, False))   # the batch lives all step
    return ch


def _recording(ch: _Chain, rng: random.Random, *, factor: float, accumulate: bool, param_bytes: int, opt_state: int,
               unit_params: dict[int, int], head_params: int, unit_stats: list[dict]) -> dict:
    """Units, storages and timeline with activation sizes times ``factor`` (rounded up, plus a
    little noise so that micro-batches are not exactly proportional)."""
    n = ch.n_events
    loss, end = ch.loss, ch.bwd_end + 4
    optim_start, optim_end = ch.bwd_end + 2, ch.bwd_end + 3

    def size(b: int, is_act: bool = True) -> int:
        if not is_act or factor == 1.0:
            return b
        return max(1, math.ceil(b * factor) + rng.randint(0, 3) * 16)

    sizes = [size(b, act) for b, _, _, act in ch.blobs]
    storages = [StorageInfo(nbytes=sizes[s[6]], created=s[1], freed=s[2], producer=s[3], holders=s[4],
                            saved_outside=s[5]) for s in ch.storages]
    done_by = [0] * (n + 1)
    for k in range(ch.n_units):
        done_by[ch.bs[k] + 1] += unit_params[k]
    unit_grads, acc = [0] * n, 0
    for i in range(n):
        acc += done_by[i]
        unit_grads[i] = acc

    def grads_at(i: int) -> int:
        if i >= end:
            return 0
        if accumulate:
            return param_bytes
        return 0 if i <= loss else head_params + unit_grads[i]

    diff = [0] * (n + 2)
    for b, (_, c, f, _) in zip(sizes, ch.blobs):
        diff[max(c + 1, 0)] += b
        diff[min(f, n - 1) + 1] -= b
    act, live = 0, []
    for i in range(n):
        act += diff[i]
        live.append(param_bytes + opt_state + grads_at(i) + act)
    live[end] = param_bytes + opt_state + ch.blobs[-1][0]
    events = []
    for i in range(n):
        nm, unit = _event(i, ch, optim_start, optim_end)
        nxt = live[i + 1] if i + 1 < n else live[i]
        extra = rng.randint(0, 12) * 1024 if i not in (optim_end, end) else 0
        if i == optim_start:
            extra = rng.randint(0, 2 * param_bytes)
        events.append(TimelineEvent(name=nm, unit=unit, live_bytes=live[i], peak_bytes=max(live[i], nxt) + extra,
                                    grad_bytes=grads_at(i)))
    units = []
    for k in range(ch.n_units):
        st = unit_stats[k]
        units.append(UnitProfile(
            fqn=_name(k), module_type="Block", order=k, param_bytes=unit_params[k], grad_bytes=unit_params[k],
            saved_activation_bytes=sum(storages[s].nbytes for s in ch.saved[k]),
            input_bytes=sum(sizes[b] for b in ch.input_blobs[k]), output_bytes=size(st["output"]),
            fwd_flops=int(st["fwd_flops"] * factor), bwd_flops=int(st["bwd_flops"] * factor),
            fwd_transient_bytes=size(st["fwd_transient"]), bwd_transient_bytes=size(st["bwd_transient"]),
            saved_storages=tuple(ch.saved[k]), input_storages=tuple(ch.inputs[k]),
            input_storage_bytes=tuple(sizes[b] for b in ch.input_blobs[k])))
    return dict(units=tuple(units), storages=tuple(storages), timeline=tuple(events),
                outside_activation_bytes=sum(s.nbytes for s in storages if s.saved_outside),
                baseline_peak_bytes=max(e.peak_bytes for e in events),
                fwd_flops=sum(u.fwd_flops for u in units) + 10**6, bwd_flops=sum(u.bwd_flops for u in units) + 2 * 10**6)


def chain_profile(n_units: int, seed: int, *, batch_size: int = 4, scale: int = 1024,
                  target_name: str = "cpu", blocked: tuple[int, ...] = ()) -> ModelProfile:
    """``target_name="H100"`` makes a CUDA-target profile (offload is only planned there).
    ``blocked``: unit indices whose recomputation the "profiler" found unsafe."""
    rng = random.Random(seed)
    ch = _structure(n_units, rng, scale, batch_size)
    widths = [rng.choice([8, 16, 32]) for _ in range(n_units)]
    params = [ParamInfo(fqn="embed.weight", shape=(64, 8), dtype="float32", param_bytes=64 * 8 * 4, unit=None,
                        module_type="Embedding")]
    for k, d in enumerate(widths):
        params.append(ParamInfo(fqn=f"{_name(k)}.fc.weight", shape=(d, d), dtype="float32", param_bytes=4 * d * d,
                                unit=_name(k), module_type="Linear"))
        params.append(ParamInfo(fqn=f"{_name(k)}.fc.bias", shape=(d,), dtype="float32", param_bytes=4 * d,
                                unit=_name(k), module_type="Linear"))
    params.append(ParamInfo(fqn="head.weight", shape=(64, 8), dtype="float32", param_bytes=64 * 8 * 4, unit=None,
                            module_type="Linear"))
    param_bytes = sum(p.param_bytes for p in params)
    unit_params = {k: 4 * widths[k] * widths[k] + 4 * widths[k] for k in range(n_units)}
    head_params = param_bytes - sum(unit_params.values())
    opt_state = 2 * param_bytes
    stats = [dict(output=rng.randint(1, 8) * scale, fwd_flops=rng.randint(1, 50) * 10**6,
                  bwd_flops=rng.randint(2, 100) * 10**6, fwd_transient=rng.randint(0, 24) * scale,
                  bwd_transient=rng.randint(0, 24) * scale) for _ in range(n_units)]
    common = dict(param_bytes=param_bytes, opt_state=opt_state, unit_params=unit_params, head_params=head_params,
                  unit_stats=stats)
    main = _recording(ch, random.Random(seed * 7919 + 1), factor=1.0, accumulate=False, **common)
    micro = []
    m = batch_size
    while m % 2 == 0 and m > 1:
        m //= 2
        rec = _recording(ch, random.Random(seed * 7919 + 1 + m), factor=m / batch_size, accumulate=True, **common)
        micro.append(StepRecording(micro_batch_size=m, sample=f"({m}, 2) int64", **rec))
    if blocked:
        reason = "synthetic: recomputation saves different tensors"
        fix = lambda units: tuple(UnitProfile(**{**{f: getattr(u, f) for f in u.__slots__},  # noqa: E731
                                                 "recompute_blocker": reason if k in blocked else ""})
                                  for k, u in enumerate(units))
        main["units"] = fix(main["units"])
        micro = [StepRecording(**{**{f: getattr(r, f) for f in r.__dataclass_fields__}, "units": fix(r.units)})
                 for r in micro]
    ev = main["timeline"]
    i = next(i for i, e in enumerate(ev) if e.name == "optim_start")
    optimizer_steps = _optimizer_steps(params, opt_state, ev[i].peak_bytes - ev[i].live_bytes,
                                       random.Random(seed * 31 + 5))
    return ModelProfile(
        model=f"SyntheticChain(n={n_units}, seed={seed})", tracer="synthetic", tracers_tried=(),
        target="cpu" if target_name == "cpu" else "cuda", target_name=target_name, precision="fp32", optimizer="adamw",
        batch_size=batch_size, sample=f"({batch_size}, 2) int64", param_bytes=param_bytes, buffer_bytes=0,
        grad_bytes=param_bytes, optimizer_state_bytes=opt_state, input_bytes=batch_size * 8, params=tuple(params),
        optimizer_steps=optimizer_steps, micro_batch_steps=tuple(micro), **main)


def _optimizer_steps(params, opt_state: int, profiled_transient: int, rng: random.Random):
    """Every (family, precision, floor NS steps) with plausible state bytes and a random temporary."""
    elem = {"fp32": 4, "bf16": 2, "int8": 1}
    matrices = tuple(p.fqn for p in params if p.fqn.startswith("blocks") and p.fqn.endswith("weight"))
    out = []
    for fam in FAMILIES:
        for dt in STATE_DTYPES:
            profiled = fam == "adamw" and dt == "fp32"
            muon = matrices if fam != "adamw" else ()
            state = 0
            for p in params:
                n_buffers = 1 if (fam == "muon" and p.fqn in muon) else 2
                state += n_buffers * (math.prod(p.shape) * elem[dt] + (4 * math.ceil(math.prod(p.shape) / 256)
                                                                        if dt == "int8" else 0))
            out.append(OptimizerStepProfile(
                name=fam, state_dtype=dt, ns_steps=DEFAULT_NS_STEPS[fam], settings=None if profiled else {"name": fam},
                muon_params=muon, adamw_params=tuple(p.fqn for p in params if p.fqn not in muon),
                state_bytes=opt_state if profiled else state,
                step_transient_bytes=profiled_transient if profiled else rng.randint(0, 4 * opt_state),
                profiled=profiled))
    return tuple(out)


def _event(i, ch: _Chain, optim_start, optim_end):
    if i == 0:
        return "start", None
    if i in ch.fs:
        return "fwd_start", _name(ch.fs.index(i))
    if i in ch.fe:
        return "fwd_end", _name(ch.fe.index(i))
    if i == ch.loss:
        return "loss", None
    for k, j in ch.bs.items():
        if j == i:
            return "bwd_start", _name(k)
    if i == ch.bwd_end:
        return "bwd_end", _name(0)
    return {ch.bwd_end + 1: ("bwd_done", None), optim_start: ("optim_start", None),
            optim_end: ("optim_end", None)}.get(i, ("end", None))
