"""Synthetic chain profiles for the planner tests: valid :class:`ModelProfile` objects whose
timeline, storages, units, step variants and optimizer recordings follow the profiler's
semantics (docs/profiler.md), with random sizes so that planners meet shapes no zoo model has.

A chain of ``n_units`` units, each with one weight matrix and a bias. Per unit, randomly:

* its input (the previous unit's output) is saved by the unit itself (a kept checkpoint
  input, never dropped), or by nobody (a checkpoint must keep it: an *unsaved input*);
* 1-3 internal storages saved only by the unit (window ``[fe(u), bs(u))``);
* sometimes a storage produced by the unit and saved by it *and* the next unit (shared);
* sometimes a storage also saved by code outside the units (never dropped).

Each unit has a per-op record: one op per storage it produces (a matmul, a norm, an activation
or a dropout), one or two ops whose outputs backward does not need (what a selective save set
caches for nothing), and a view, with random FLOPs, so that the selective candidates vary.

Live bytes at every event are the sum of what is alive then, peaks add random transients,
gradients appear as backward proceeds, and the optimizer step adds a random temporary. Every
variant a plan may choose is "recorded" with the same structure: micro-batches (gradients live
from the start, activations shrunk, not exactly linearly), bf16 weights (half the parameter
bytes and activations), the optimizer step in backward (a ``step`` event per parameter where
its gradient is complete and then freed) and a chunked loss (smaller head activations). Every
optimizer configuration is recorded with its own state, step temporary and per-parameter
in-backward temporaries; CUDA-target profiles also record offloaded state.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field

from memtune.optimizers import DEFAULT_NS_STEPS, FAMILIES
from memtune.optimizers import STATE_DTYPES
from memtune.variant import StepVariant
from memtune.profile import (ModelProfile, OpRecord, OptimizerStepProfile, ParamInfo, StepRecording, StorageInfo,
                             TimelineEvent, UnitProfile)

LOSS_CHUNKS = 4


@dataclass
class _Chain:
    n_units: int
    fs: list[int]
    fe: list[int]
    loss: int
    bs: dict[int, int]
    steps: dict[int, list[tuple[str, int]]]   # unit -> [(param fqn, event index)] when stepping in backward
    head_steps: list[tuple[str, int]]
    bwd_end: int
    n_events: int
    storages: list[tuple] = field(default_factory=list)   # (bytes, created, freed, producer, holders, outside, blob)
    blobs: list[tuple] = field(default_factory=list)      # (bytes, created, freed, kind) kind: act | head | batch
    saved: dict[int, list[int]] = field(default_factory=dict)
    inputs: dict[int, list[int]] = field(default_factory=dict)
    input_blobs: dict[int, list[int]] = field(default_factory=dict)  # indices into blobs


def _name(k: int) -> str:
    return f"blocks.{k}"


def _structure(n_units: int, rng: random.Random, scale: int, batch_size: int, in_backward: bool) -> _Chain:
    fs = [1 + 2 * k for k in range(n_units)]
    fe = [2 + 2 * k for k in range(n_units)]
    loss = 1 + 2 * n_units
    bs, steps, i = {}, {}, loss + 1
    for k in reversed(range(n_units)):
        bs[k] = i
        i += 1
        if in_backward:  # the unit's weight and bias are complete once its backward ran
            steps[k] = [(f"{_name(k)}.fc.weight", i), (f"{_name(k)}.fc.bias", i + 1)]
            i += 2
    head_steps = [("head.weight", i), ("embed.weight", i + 1)] if in_backward else []
    i += len(head_steps)
    bwd_end = i
    ch = _Chain(n_units, fs, fe, loss, bs, steps, head_steps, bwd_end, bwd_end + 5,
                saved={k: [] for k in range(n_units)}, inputs={k: [] for k in range(n_units)},
                input_blobs={k: [] for k in range(n_units)})

    def storage(nbytes, created, freed, producer, holders, outside=False, kind="act") -> int:
        ch.storages.append((nbytes, created, freed, producer, tuple(holders), outside, len(ch.blobs)))
        ch.blobs.append((nbytes, created, freed, kind))
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
            ch.blobs.append((nb, created, fe[k], "act"))   # freed once the unit's forward is done
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
    storage(rng.randint(4, 16) * scale, fe[-1], loss, None, [], outside=True, kind="head")   # the logits
    ch.blobs.append((batch_size * 8, -1, ch.n_events, "batch"))   # the batch lives all step
    return ch


def _recording(ch: _Chain, rng: random.Random, *, factor: float, accumulate: bool, in_backward: bool, head_factor: float,
               param_sizes: dict[str, int], opt_state: int, unit_params: dict[int, int], unit_stats: list[dict]) -> dict:
    """Units, storages and timeline with activation sizes times ``factor`` (rounded up, plus a
    little noise so that micro-batches are not exactly proportional)."""
    n = ch.n_events
    loss, end = ch.loss, ch.bwd_end + 4
    optim_start, optim_end = ch.bwd_end + 2, ch.bwd_end + 3
    param_bytes = sum(param_sizes.values())

    def size(b: int, kind: str = "act") -> int:
        f = factor * (head_factor if kind == "head" else 1.0)
        if kind == "batch" or f == 1.0:
            return b
        return max(1, math.ceil(b * f) + rng.randint(0, 3) * 16)

    sizes = [size(b, kind) for b, _, _, kind in ch.blobs]
    storages = [StorageInfo(nbytes=sizes[s[6]], created=s[1], freed=s[2], producer=s[3], holders=s[4],
                            saved_outside=s[5]) for s in ch.storages]
    step_at = {i: fqn for k in ch.steps for fqn, i in ch.steps[k]} | {i: fqn for fqn, i in ch.head_steps}
    done_by = [0] * (n + 1)
    head = param_bytes - sum(unit_params.values())
    for k in range(ch.n_units):
        done_by[ch.bs[k] + 1] += unit_params[k]

    def grads_at(i: int) -> int:
        if i >= end:
            return 0
        if in_backward:  # only the parameter whose step this is holds a gradient, for that moment
            return param_sizes[step_at[i]] if i in step_at else 0
        if accumulate:
            return param_bytes
        return 0 if i <= loss else head + sum(done_by[: i + 1])

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
        nm, unit = _event(i, ch, optim_start, optim_end, step_at)
        nxt = live[i + 1] if i + 1 < n else live[i]
        extra = rng.randint(0, 12) * 1024 if i not in (optim_end, end) else 0
        if i == optim_start:
            extra = 0 if in_backward else rng.randint(0, 2 * param_bytes)
        events.append(TimelineEvent(name=nm, unit=unit, live_bytes=live[i], peak_bytes=max(live[i], nxt) + extra,
                                    grad_bytes=grads_at(i)))
    units = []
    for k in range(ch.n_units):
        st = unit_stats[k]
        ops = []
        for name, flops, sid, out, random_op in _op_templates(ch, k, st["op_seed"]):
            nbytes = storages[sid].nbytes if sid is not None else size(out)
            ops.append(OpRecord(name=name, out_bytes=0 if name == "aten.view.default" else nbytes,
                                storages=(sid,) if sid is not None else (), flops=int(flops * factor),
                                io_bytes=0 if name == "aten.view.default" else 2 * nbytes, random=random_op,
                                view=name == "aten.view.default", saves=sid is not None,
                                allocations=() if name == "aten.view.default" else
                                ((nbytes, 0, 1) if sid is not None else (nbytes, 1 + len(ops), 0),)))
        units.append(UnitProfile(
            fqn=_name(k), module_type="Block", order=k, param_bytes=unit_params[k], grad_bytes=unit_params[k],
            saved_activation_bytes=sum(storages[s].nbytes for s in ch.saved[k]),
            input_bytes=sum(sizes[b] for b in ch.input_blobs[k]), output_bytes=size(st["output"]),
            fwd_flops=int(st["fwd_flops"] * factor), bwd_flops=int(st["bwd_flops"] * factor),
            fwd_transient_bytes=size(st["fwd_transient"]), bwd_transient_bytes=size(st["bwd_transient"]),
            saved_storages=tuple(ch.saved[k]), input_storages=tuple(ch.inputs[k]),
            input_storage_bytes=tuple(sizes[b] for b in ch.input_blobs[k]), ops=tuple(ops)))
    return dict(units=tuple(units), storages=tuple(storages), timeline=tuple(events),
                outside_activation_bytes=sum(s.nbytes for s in storages if s.saved_outside),
                baseline_peak_bytes=max(e.peak_bytes for e in events),
                fwd_flops=sum(u.fwd_flops for u in units) + 10**6, bwd_flops=sum(u.bwd_flops for u in units) + 2 * 10**6)


_OP_NAMES = ("aten.mm.default", "aten.native_layer_norm.default", "aten.gelu.default", "aten.mul.Tensor")


def _op_templates(ch: _Chain, k: int, seed: int) -> list[tuple]:
    """(name, FLOPs, storage index or None, bytes when not a storage, random) per op of unit
    ``k``; the same names in every recording of the chain."""
    rng = random.Random(seed)
    out = []
    for sid in ch.saved[k]:
        if ch.storages[sid][3] != _name(k):
            continue  # the unit's input: produced elsewhere
        if rng.random() < 0.15:
            out.append(("aten.native_dropout.default", 0, sid, 0, True))
        else:
            name = rng.choice(_OP_NAMES)
            out.append((name, rng.randint(1, 40) * 10**6 if name == "aten.mm.default" else 0, sid, 0, False))
    for _ in range(rng.randint(1, 2)):
        out.insert(rng.randint(0, len(out)), ("aten.addmm.default", rng.randint(1, 40) * 10**6, None,
                                              rng.randint(1, 6) * 1024, False))
    out.append(("aten.view.default", 0, None, 0, False))
    return out


def chain_profile(n_units: int, seed: int, *, batch_size: int = 4, scale: int = 1024,
                  target_name: str = "cpu", blocked: tuple[int, ...] = ()) -> ModelProfile:
    """``target_name="H100"`` makes a CUDA-target profile (activation and state offload are only
    planned there). ``blocked``: unit indices whose recomputation the "profiler" found unsafe."""
    rng = random.Random(seed)
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
    param_sizes = {p.fqn: p.param_bytes for p in params}
    stats_rng = random.Random(seed * 13 + 7)
    stats = [dict(output=stats_rng.randint(1, 8) * scale, fwd_flops=stats_rng.randint(1, 50) * 10**6,
                  bwd_flops=stats_rng.randint(2, 100) * 10**6, fwd_transient=stats_rng.randint(0, 24) * scale,
                  bwd_transient=stats_rng.randint(0, 24) * scale, op_seed=stats_rng.randint(0, 10**9))
             for _ in range(n_units)]

    def record(*, m=None, bf16=False, in_backward=False, chunks=None):
        ch = _structure(n_units, random.Random(seed), scale, batch_size, in_backward)
        sizes = {f: (b // 2 if bf16 else b) for f, b in param_sizes.items()}
        unit_params = {k: sizes[f"{_name(k)}.fc.weight"] + sizes[f"{_name(k)}.fc.bias"] for k in range(n_units)}
        opt_state = 2 * sum(param_sizes.values())  # the profiled AdamW's fp32 state, whatever the weights
        key = (m or 0) * 1000 + bf16 * 100 + in_backward * 10 + (chunks or 0)
        rec = _recording(ch, random.Random(seed * 7919 + 1 + key), factor=(m / batch_size if m else 1.0) * (0.5 if bf16 else 1.0),
                         accumulate=m is not None, in_backward=in_backward, head_factor=1 / LOSS_CHUNKS if chunks else 1.0,
                         param_sizes=sizes, opt_state=opt_state, unit_params=unit_params, unit_stats=stats)
        if blocked:
            reason = "synthetic: recomputation saves different tensors"
            rec["units"] = tuple(UnitProfile(**{**{f: getattr(u, f) for f in u.__slots__},
                                                "recompute_blocker": reason if k in blocked else ""})
                                 for k, u in enumerate(rec["units"]))
        return rec, dict(param_bytes=sum(sizes.values()), grad_bytes=sum(sizes.values()), optimizer_state_bytes=opt_state)

    main, _ = record()
    variants = []
    sizes_m = []
    m = batch_size
    while m % 2 == 0 and m > 1:
        m //= 2
        sizes_m.append(m)
    for bf16 in (False, True):
        for chunks in (None, LOSS_CHUNKS):
            for m, ib in [(None, False), (None, True)] + [(s, False) for s in sizes_m]:
                if (m, bf16, ib, chunks) == (None, False, False, None):
                    continue
                rec, totals = record(m=m, bf16=bf16, in_backward=ib, chunks=chunks)
                variant = StepVariant(micro_batch_size=m, weights="bf16-sr" if bf16 else None,
                                      optimizer_in_backward=ib, loss_chunks=chunks)
                variants.append(StepRecording(variant=variant, sample=f"({m or batch_size}, 2) int64",
                                              batch_size=m or batch_size, **totals, **rec))
    ev = main["timeline"]
    i = next(i for i, e in enumerate(ev) if e.name == "optim_start")
    optimizer_steps = _optimizer_steps(params, 2 * sum(param_sizes.values()), ev[i].peak_bytes - ev[i].live_bytes,
                                       random.Random(seed * 31 + 5), cuda=target_name != "cpu")
    return ModelProfile(
        model=f"SyntheticChain(n={n_units}, seed={seed})", tracer="synthetic", tracers_tried=(),
        target="cpu" if target_name == "cpu" else "cuda", target_name=target_name, precision="fp32", optimizer="adamw",
        batch_size=batch_size, sample=f"({batch_size}, 2) int64", param_bytes=sum(param_sizes.values()), buffer_bytes=0,
        grad_bytes=sum(param_sizes.values()), optimizer_state_bytes=2 * sum(param_sizes.values()),
        input_bytes=batch_size * 8, params=tuple(params), optimizer_steps=optimizer_steps,
        step_variants=tuple(variants), **main)


def _optimizer_steps(params, opt_state: int, profiled_transient: int, rng: random.Random, *, cuda: bool):
    """Every (family, precision, floor NS steps, weights, offload, in-backward) with plausible state
    bytes and random temporaries."""
    elem = {"fp32": 4, "bf16": 2, "int8": 1}
    matrices = tuple(p.fqn for p in params if p.fqn.startswith("blocks") and p.fqn.endswith("weight"))
    out = []
    for fam in FAMILIES:
        for dt in STATE_DTYPES:
            muon = matrices if fam != "adamw" else ()
            state = 0
            for p in params:
                n_buffers = 1 if (fam == "muon" and p.fqn in muon) else 2
                state += n_buffers * (math.prod(p.shape) * elem[dt] + (4 * math.ceil(math.prod(p.shape) / 256)
                                                                        if dt == "int8" else 0))
            for offload in ((False, True) if cuda else (False,)):
                for weights in (None, "bf16-sr", "bf16-master"):
                    if weights == "bf16-master" and not offload:
                        continue
                    master = sum(4 * math.prod(p.shape) for p in params) if weights == "bf16-master" else 0
                    for ib in (False, True):
                        profiled = fam == "adamw" and dt == "fp32" and not offload and weights is None and not ib
                        host = state + master if offload else 0
                        per_param = tuple((p.fqn, rng.randint(0, 3 * p.param_bytes)) for p in params) if ib else ()
                        out.append(OptimizerStepProfile(
                            name=fam, state_dtype=dt, ns_steps=DEFAULT_NS_STEPS[fam],
                            settings=None if (fam == "adamw" and dt == "fp32") else {"name": fam},
                            muon_params=muon, adamw_params=tuple(p.fqn for p in params if p.fqn not in muon),
                            state_bytes=opt_state if profiled else (0 if offload else state + master),
                            step_transient_bytes=profiled_transient if profiled else (0 if ib else rng.randint(0, 4 * opt_state)),
                            profiled=profiled, host_state_bytes=host, param_step_bytes=per_param,
                            variant=StepVariant(weights=weights, state_offload=offload, optimizer_in_backward=ib)))
    return tuple(out)


def _event(i, ch: _Chain, optim_start, optim_end, step_at):
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
    if i in step_at:
        return "step", step_at[i]
    if i == ch.bwd_end:
        return "bwd_end", _name(0)
    return {ch.bwd_end + 1: ("bwd_done", None), optim_start: ("optim_start", None),
            optim_end: ("optim_end", None)}.get(i, ("end", None))
