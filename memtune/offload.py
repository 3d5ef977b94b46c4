"""Activation offload of an OFFLOAD unit: its saved activations go to host memory as its forward
makes them, and come back, all at once, when its backward starts, the copies overlapping the
unit's own compute. The runtime (:class:`ActivationOffload`) and its price
(:func:`exposed_offload_seconds`) are here, one next to the other.

**What runs.** ``saved_tensors_hooks`` see each tensor autograd saves inside the unit. A
parameter (a leaf that requires grad) and a tensor already on the host stay as they are. Any
other tensor's *storage* is copied to host memory once (a saved tensor and its views share one
copy, as they share one storage), on a side CUDA stream and into pinned memory, so the copy of
what an early op saved overlaps the unit's later ops. When the unit's forward returns, the
compute stream waits for the copies and the device storages are let go. When the unit's backward
starts (the first gradient reaches one of its outputs), every storage is copied back on the side
stream, in the order backward needs them (latest first), and each unpack waits only for its own
copy. A storage is let go again after its last saved tensor has been unpacked.

**Memory.** This is what :mod:`memtune.timeline` prices for an OFFLOAD unit: its saved
storages are on the device until its forward ends, absent until its backward starts, and back
from there (the storages of a RECOMPUTE unit, restored by copy; no recompute transient). The
host holds all of them between the two. A storage that someone else keeps too (another unit
that saves it, code outside the units) is not freed by the offload, and its copy comes back
beside it: the timeline counts that copy from the unit's backward start to its end.

**Time** (:func:`exposed_offload_seconds`). The link (``host_bandwidth``) copies one storage
at a time, in the order the copies are issued. Forward: a storage is issued when the op that
makes it ends (the unit's inputs at its start); the unit's forward waits at its end for the copies
still running. Backward: everything is issued at the start, latest first; the backward of an op
runs when every storage it may read has arrived: those made by the op and after it, back to
the earliest op of the unit it reads (every storage, the unit's inputs included, for an op that
reads none of them; nothing for an op that saved nothing). Each op is
priced on the device (:func:`memtune.selective.op_seconds`), scaled so that the unit's ops add
up to the unit's priced forward (backward: twice that, as the unit's backward is priced). What
the link adds beyond the compute in each direction is the exposed time.

On a CPU target there is no separate host memory (the "device" *is* host memory), so planners
never offload activations there (:func:`memtune.planners.options.offload_allowed`); the
runtime's exactness and its copy and release order are tested on the CPU by offloading CPU
tensors to other CPU tensors (``tests/planners/test_apply.py``).
"""

from __future__ import annotations

import bisect
from typing import Any, Callable

import torch
from torch.utils._pytree import tree_flatten

__all__ = ["ActivationOffload", "exposed_offload_seconds"]


def _is_parameter(t: torch.Tensor) -> bool:
    """A parameter (a leaf that requires grad) or a view of one: it lives on the device anyway."""
    base = t._base if t._base is not None else t
    return base.is_leaf and base.requires_grad


class _Entry:
    __slots__ = ("device", "where", "host", "event", "uses", "left")

    def __init__(self, device: torch.UntypedStorage, where: torch.device, host: torch.UntypedStorage) -> None:
        self.device: torch.UntypedStorage | None = device
        self.where = where  # the device it comes back to
        self.host = host
        self.event = None
        self.uses = 0  # saved tensors that read this storage
        self.left = 0  # of them, still to be unpacked in this backward


class _Group:
    """The storages one forward call of an OFFLOAD unit saved."""

    def __init__(self, owner: ActivationOffload, kept: set[int]) -> None:
        self.owner = owner
        self.kept = kept
        """Storages saved as they are: the call's inputs and the module's buffers (the timeline
        never drops the inputs of a unit that does not SAVE, and buffers live all step)."""
        self.entries: dict[int, _Entry] = {}  # insertion order: the order the forward made them
        self.back = False

    # ---------------------------------------------------------------- forward
    def pack(self, t: torch.Tensor) -> Any:
        if t.device.type not in self.owner.device_types or t.layout != torch.strided or _is_parameter(t):
            return (None, t)
        st = t.untyped_storage()
        key = st.data_ptr()  # unique while the entry holds the storage (until the forward ends)
        if key in self.kept:
            return (None, t)
        entry = self.entries.get(key)
        if entry is None:
            host = torch.empty(st.nbytes(), dtype=torch.uint8, device="cpu",
                               pin_memory=self.owner.cuda).untyped_storage()
            stream = self.owner.stream
            if stream is None:
                host.copy_(st)
            else:
                stream.wait_stream(torch.cuda.current_stream(t.device))
                with torch.cuda.stream(stream):
                    host.copy_(st, non_blocking=True)
            entry = self.entries[key] = _Entry(st, t.device, host)
        entry.uses += 1
        entry.left += 1
        return (key, t.dtype, t.device, t.storage_offset(), tuple(t.shape), t.stride())

    def forward_done(self) -> None:
        """The forward returned: wait for the copies, then let the device storages go."""
        stream = self.owner.stream
        if stream is not None and self.entries:
            torch.cuda.current_stream(stream.device).wait_stream(stream)
        for entry in self.entries.values():
            entry.device = None

    # ---------------------------------------------------------------- backward
    def prefetch(self, *unused) -> None:
        """The backward starts: issue every copy back, latest storage first."""
        if self.back:
            return
        self.back = True
        for entry in reversed(self.entries.values()):
            self._fetch(entry)

    def _fetch(self, entry: _Entry) -> None:
        dev = torch.empty(entry.host.nbytes(), dtype=torch.uint8, device=entry.where).untyped_storage()
        stream = self.owner.stream
        if stream is None:
            dev.copy_(entry.host)
        else:
            stream.wait_stream(torch.cuda.current_stream(stream.device))  # the block may be in use there
            with torch.cuda.stream(stream):
                dev.copy_(entry.host, non_blocking=True)
                entry.event = torch.cuda.Event()
                entry.event.record(stream)
        entry.device = dev

    def unpack(self, packed) -> torch.Tensor:
        key = packed[0]
        if key is None:
            return packed[1]
        _, dtype, device, offset, shape, stride = packed
        entry = self.entries[key]
        if entry.device is None:  # no gradient reached an output first (or backward runs again)
            self._fetch(entry)
        if entry.event is not None:
            torch.cuda.current_stream(device).wait_event(entry.event)
            entry.event = None
        out = torch.empty(0, dtype=dtype, device=device).set_(entry.device, offset, shape, stride)
        entry.left -= 1
        if entry.left <= 0:  # its last saved tensor: the storage lives on in what autograd holds
            entry.device = None
            entry.left = entry.uses
        return out


class ActivationOffload:
    """Runs an OFFLOAD unit's forward with its saved activations kept in host memory (see the
    module docstring). One per unit; each forward call keeps its own storages.

    ``device_types``: the device types whose tensors are offloaded (default ``("cuda",)``);
    tests pass ``("cpu",)`` to offload CPU tensors to other CPU tensors, with no side stream."""

    def __init__(self, *, device_types: tuple[str, ...] = ("cuda",)) -> None:
        self.device_types = device_types
        self.cuda = "cuda" in device_types and torch.cuda.is_available()
        """Copies go through pinned memory on a side stream (else they are synchronous)."""
        self.stream = None

    @torch.compiler.disable  # (hooks and side streams: the unit runs eagerly under torch.compile)
    def run(self, forward: Callable, *args, buffers=(), **kwargs):
        kept = {t.untyped_storage().data_ptr() for t in (*tree_flatten((args, kwargs))[0], *buffers)
                if isinstance(t, torch.Tensor)}
        group = _Group(self, kept)
        if self.cuda:
            device = torch.device("cuda", torch.cuda.current_device())
            if self.stream is None or self.stream.device != device:
                self.stream = torch.cuda.Stream(device=device)
        with torch.autograd.graph.saved_tensors_hooks(group.pack, group.unpack):
            out = forward(*args, **kwargs)
        group.forward_done()
        outputs = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor) and t.requires_grad]
        if outputs and group.entries:
            torch.autograd.graph.register_multi_grad_hook(outputs, group.prefetch, mode="any")
        return out


# ----------------------------------------------------------------------------- its price
def exposed_offload_seconds(profile, unit, spec, *, forward_s: float, backward_s: float, scale: float = 1.0,
                            host_bw: float) -> tuple[float, float]:
    """Seconds the copies of ``unit``'s saved storages add to its forward and to its backward
    when the unit is OFFLOAD, beyond its own compute (``forward_s``, ``backward_s``: its priced
    passes); the storages' bytes are multiplied by ``scale`` (a micro-batch's share). Without a
    per-op record (profiles before schema 5, distributed per-rank profiles) nothing overlaps:
    each direction costs the whole transfer."""
    from .selective import op_seconds

    storages = profile.storages
    inputs = set(unit.input_storages)  # kept on the device as they are
    saved = [s for s in unit.saved_storages if s not in inputs]
    total_bytes = sum(storages[s].nbytes for s in saved) * scale
    if not unit.ops or not saved or forward_s <= 0:
        t = total_bytes / host_bw
        return t, t
    made_by = {}
    for i, op in enumerate(unit.ops):
        for s in op.storages:
            made_by.setdefault(s, i)
    pos = {s: made_by.get(s, -1) for s in saved}  # -1: an input of the unit
    bf16 = profile.precision == "bf16-mixed"
    times = [op_seconds(op, spec, bf16=bf16) for op in unit.ops]
    norm = forward_s / sum(times) if sum(times) > 0 else 0.0
    fwd = [t * norm for t in times]
    bwd = [t * norm * (backward_s / forward_s) for t in times]

    # Forward: issued as made, one at a time on the link; the forward waits at its end.
    link = 0.0
    clock = 0.0
    made_at = {-1: 0.0}
    for i, t in enumerate(fwd):
        clock += t
        made_at[i] = clock
    for s in sorted(saved, key=lambda s: pos[s]):
        link = max(link, made_at[pos[s]]) + storages[s].nbytes * scale / host_bw
    exposed_fwd = max(0.0, link - clock)

    # Backward: all issued at its start, latest first; an op waits for what it may read.
    order = sorted(saved, key=lambda s: -pos[s])
    link, back = 0.0, []  # (position, time every storage made at or after it is back), positions falling
    for s in order:
        link += storages[s].nbytes * scale / host_bw
        back.append((pos[s], link))
    ascending = [p for p, _ in reversed(back)]

    def back_by(p: int) -> float:
        k = bisect.bisect_left(ascending, p)  # the first storage made at or after p, in rising order
        return back[len(back) - 1 - k][1] if k < len(back) else 0.0

    clock = 0.0
    for i in reversed(range(len(unit.ops))):
        op = unit.ops[i]
        if op.saves:  # (an op that saved nothing reads nothing back)
            clock = max(clock, back_by(min((i, *op.deps)) if op.deps else -1))
        clock += bwd[i]
    exposed_bwd = max(0.0, clock - sum(bwd))
    return exposed_fwd, exposed_bwd
