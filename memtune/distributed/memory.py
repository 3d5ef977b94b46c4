"""The step as one rank sees it: a measured single-process step, rewritten for DDP or FSDP2.

The profiler records one training step at the *local* batch (what each rank feeds). Data
parallelism changes that step in a few well-defined ways, all of them about parameters, their
gradients and the optimizer state; activations are those of the local batch and stay as
recorded. :func:`per_rank_profile` returns the recorded profile with its timeline rewritten so,
and the planners (and :mod:`memtune.timeline`) plan on it unchanged.

**FSDP2** (``torch.distributed.fsdp.fully_shard`` on every unit, then on the root):

* parameters, gradients and optimizer state are held as dim-0 shards: each rank stores
  ``ceil(dim0 / N)`` rows of every parameter (FSDP2 pads dim 0 to a multiple of N);
* a unit's parameters are unsharded (all-gathered) from its forward start to its forward end,
  or, with ``reshard_after_forward=False``, until its backward ends; and again for its backward;
* the root's parameters (those outside every unit: embeddings, head) stay unsharded from the
  first forward to the end of backward (FSDP2 does not reshard the root after forward);
* the all-gather output of the last unit gathered stays alive until the next gather, and the
  reduce-scatter input of the last unit reduced until the next reduce;
* a unit's gradients are unsharded while its backward runs and sharded once it ends; the root's
  stay unsharded until the end of backward;
* the optimizer steps on shards: its state and step temporaries shrink like the parameters.

**DDP** (``DistributedDataParallel(gradient_as_bucket_view=True)``): everything is replicated;
the gradient buckets (the size of the trainable parameters) are allocated once and the
gradients live in them, so gradient bytes are resident for the whole step.

These rules were checked against PyTorch's own ``FSDPMemTracker``/``MemTracker`` on real 2-rank
gloo runs (``tests/test_distributed.py`` asserts within 5% on every run; docs/distributed.md).
Only the recordings of levers that declare themselves supported under data parallelism
(:attr:`memtune.levers.Lever.supported_under_parallel`) are kept; today that is none, so only
the profiled step is rewritten and a distributed plan never chooses a lever. The per-op record
is dropped too: a distributed plan recomputes whole units (no SELECTIVE save sets).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping

import torch

from memtune.profile import ModelProfile, StepEvent, TimelineEvent


def shard_bytes(shape: tuple[int, ...], dtype: str, world_size: int) -> int:
    """Bytes one rank holds of a parameter FSDP2 shards on dim 0 (padded to a multiple of N)."""
    itemsize = torch.empty((), dtype=getattr(torch, dtype)).element_size()
    if not shape:
        return itemsize  # a scalar is padded to one element per rank
    rows = math.ceil(shape[0] / world_size)
    return rows * math.prod(shape[1:]) * itemsize


def unsharded_bytes_by_unit(profile: ModelProfile, world_size: int) -> dict[str | None, int]:
    """Bytes each unit's parameters take once all-gathered (dim 0 padded to a multiple of N);
    the key ``None`` holds the root's (parameters outside every unit)."""
    out: dict[str | None, int] = {}
    for q in profile.params:
        out[q.unit] = out.get(q.unit, 0) + shard_bytes(tuple(q.shape), q.dtype, world_size) * world_size
    return out


def per_rank_profile(profile: ModelProfile, world_size: int, strategy: str,
                     reshard_after_forward: Mapping[str, bool] | None = None) -> ModelProfile:
    """``profile`` (recorded at the local batch) as one of ``world_size`` ranks sees it under
    ``strategy`` (``"ddp"`` or ``"fsdp"``). ``reshard_after_forward`` maps unit FQN to FSDP2's
    flag (default True for every unit)."""
    if strategy == "ddp":
        return _ddp(profile)
    if strategy != "fsdp":
        raise ValueError(f"strategy must be 'ddp' or 'fsdp', got {strategy!r}")
    return _fsdp(profile, world_size, dict(reshard_after_forward or {}))


def _drop_variants(profile: ModelProfile, **changes) -> ModelProfile:
    """Only the recordings of levers that run across ranks (every other lever at its default)
    are rewritten; the others are dropped, so a distributed plan never chooses them."""
    from memtune.levers import LEVERS

    def parallel(variant) -> bool:
        return all(LEVERS[name].supported_under_parallel for name, _ in variant.choices)

    # Per-op save sets are not planned across ranks yet: selective checkpointing under FSDP2
    # measured a spike of one all-gathered weight (+3.2% of the peak) on one rank in one run of
    # three (tests/test_distributed.py). Without the per-op record every unit is planned whole.
    units = tuple(dataclasses.replace(u, ops=()) for u in profile.units)
    return dataclasses.replace(profile, units=units,
                               step_variants=tuple(r for r in profile.step_variants if parallel(r.variant)),
                               optimizer_steps=tuple(o for o in profile.optimizer_steps if parallel(o.variant)),
                               **changes)


def _ddp(p: ModelProfile) -> ModelProfile:
    trainable = p.grad_bytes  # bucket bytes: one gradient per trainable parameter
    events = tuple(dataclasses.replace(e, live_bytes=e.live_bytes - e.grad_bytes + trainable,
                                       peak_bytes=e.peak_bytes - e.grad_bytes + trainable, grad_bytes=trainable)
                   for e in p.timeline)
    # "end" (after zero_grad) keeps the buckets too.
    return _drop_variants(p, timeline=events, baseline_peak_bytes=max(e.peak_bytes for e in events))


def _fsdp(p: ModelProfile, N: int, reshard: dict[str, bool]) -> ModelProfile:
    unit_fqns = [u.fqn for u in sorted(p.units, key=lambda u: u.order)]
    by_unit = unsharded_bytes_by_unit(p, N)
    full = {u: by_unit.get(u, 0) for u in unit_fqns}  # unsharded (padded) bytes per unit
    root_full = sum(b for u, b in by_unit.items() if u not in full)
    shard_total = sum(by_unit.values()) // N
    ratio = shard_total / max(1, sum(full.values()) + root_full)
    param_cut = p.param_bytes - shard_total
    state_sharded = int(round(p.optimizer_state_bytes * ratio))
    state_cut = p.optimizer_state_bytes - state_sharded
    unit_grad_cut = {u: b - b // N for u, b in full.items()}  # what sharding a finished unit's gradient saves

    ev = p.timeline
    fwd_open: set[str] = set()       # units whose forward has started and not ended
    kept: set[str] = set()           # reshard_after_forward=False units gathered until their backward ends
    bwd_unit: str | None = None      # unit whose backward runs
    done: list[str] = []             # units whose backward finished (gradients reduce-scattered)
    last_gathered = 0
    last_reduced = 0
    in_step = True                   # forward/backward (root unsharded)
    out: list[TimelineEvent] = []
    for e in ev:
        name, u = e.name, e.unit
        if name == StepEvent.FWD_START and u in full:
            fwd_open.add(u)
            last_gathered = full[u]
        elif name == StepEvent.FWD_END and u in full:
            fwd_open.discard(u)
            if not reshard.get(u, True):
                kept.add(u)
        elif name in (StepEvent.BWD_START, StepEvent.BWD_END, StepEvent.BWD_DONE) and bwd_unit is not None:
            done.append(bwd_unit)
            kept.discard(bwd_unit)
            last_reduced = full[bwd_unit]
            bwd_unit = None
        if name == StepEvent.BWD_START and u in full:
            bwd_unit = u
            # A unit kept unsharded since its forward is not gathered again; by then the last
            # forward all-gather's output has been released.
            last_gathered = full[u] if reshard.get(u, True) else 0
        if name in (StepEvent.BWD_DONE, StepEvent.OPTIM_START, StepEvent.OPTIM_END, StepEvent.END):
            in_step = False
        optim = name == StepEvent.OPTIM_START
        if in_step:
            gathered = root_full + sum(full[x] for x in fwd_open | kept | ({bwd_unit} if bwd_unit else set()))
            buffers = last_gathered + last_reduced
            grad_cut = sum(unit_grad_cut[x] for x in done)
        else:
            gathered, buffers = 0, 0
            grad_cut = e.grad_bytes - int(round(e.grad_bytes * ratio))
        shift = -param_cut - state_cut - grad_cut + gathered + buffers
        step_tmp = e.peak_bytes - e.live_bytes
        if optim:  # the optimizer's temporaries are per parameter: they shrink with the shards
            step_tmp = int(round(step_tmp * ratio))
        live = e.live_bytes + shift
        out.append(dataclasses.replace(e, live_bytes=live, peak_bytes=live + step_tmp,
                                       grad_bytes=e.grad_bytes - grad_cut))
    steps = tuple(dataclasses.replace(o, state_bytes=int(round(o.state_bytes * ratio)),
                                      step_transient_bytes=int(round(o.step_transient_bytes * ratio)))
                  for o in p.optimizer_steps)
    sharded = dataclasses.replace(p, optimizer_steps=steps)
    return _drop_variants(sharded, timeline=tuple(out), param_bytes=shard_total,
                          grad_bytes=int(round(p.grad_bytes * ratio)), optimizer_state_bytes=state_sharded,
                          baseline_peak_bytes=max(e.peak_bytes for e in out))
