"""``StepRecorder``: live-memory, saved-tensor and FLOP accounting for one training step.

A ``TorchDispatchMode`` that sees every aten op of the step (forward, backward, optimizer)
and tracks storages the way an allocator would: a storage is allocated when an op first
returns it and freed when its last reference dies (a weakref callback, so it works for
fake tensors that own no memory). Each storage is rounded up to the target's allocation
granularity (512 B on CUDA). Events (unit boundaries) split the step into intervals; for
each interval the recorder keeps the live bytes at its start and its peak.

Autograd's saved tensors are seen through ``saved_tensors_hooks``: the pack hook notes
which unit saved which storage (deduplicated by storage, so views count once) and returns
a detached alias, which keeps the storage alive exactly as autograd would without the
reference cycle a saved output would otherwise form.

This is the measuring instrument of :func:`memtune.profile`; it is written to be exact
for eager execution, and checked against ``torch.distributed._tools.mem_tracker.MemTracker``
in the tests.

For a CUDA target the recorder also logs every allocation and free, in the order the step
makes them, and when the step ends (``__exit__``) replays that log through
:class:`~memtune.cuda_allocator.CachingAllocatorSim`: the static storages once, then the step
``cuda_warmup_steps + 1`` times (a real measured step runs on a cache that earlier steps
filled and fragmented; storages of one step still alive at its end are freed before the
next). Each interval's live and peak bytes are then taken from the last replayed step as
the simulated allocator's *allocated* bytes: the sizes of the blocks it hands out, which can exceed the 512-rounded
requests when a cached block is reused without being split. That is what
``torch.cuda.max_memory_allocated`` reports. Per-storage sizes (``StorageRecord.nbytes``)
stay the rounded requests. The static storages (parameters, buffers, the batch, optimizer
state) are allocated first, in registration order (parameter order): on a real GPU they
were allocated before the step, possibly interleaved with earlier steps' temporaries, so
this is an approximation of the cache's layout. With ``late_optimizer_state`` (default) the
static storages that are not parameters (optimizer state, and also buffers and the batch,
which the recorder cannot tell apart) are instead allocated in the first replayed step at
``optim_start``, as a real first ``optimizer.step()`` creates its state. The replayed allocator stays on
``recorder.allocator`` (``peak_reserved_bytes`` predicts ``max_memory_reserved``).
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import flop_registry
from torch.utils.weak import WeakIdKeyDictionary

from .cuda_allocator import CachingAllocatorSim
from .devices import cuda_sdpa_backend, cuda_sdpa_logsumexp_bytes, round_allocation
from .fake_compat import EAGER_KERNELS
from .profile import StepEvent, StepPhase

aten = torch.ops.aten

_DEVICE_QUERY = torch.ops.prim.device.default
_SDPA_CPU = {aten._scaled_dot_product_flash_attention_for_cpu.default}
def _cpu_flash_flops(query, key, value, *args, **kwargs) -> int:
    from torch.utils.flop_counter import sdpa_flop_count

    return sdpa_flop_count(query.shape, key.shape, value.shape)


def _cpu_flash_backward_flops(grad_out, query, key, value, *args, **kwargs) -> int:
    from torch.utils.flop_counter import sdpa_backward_flop_count

    return sdpa_backward_flop_count(grad_out.shape, query.shape, key.shape, value.shape)


_EXTRA_FLOPS = {aten._scaled_dot_product_flash_attention_for_cpu.default: _cpu_flash_flops,
                aten._scaled_dot_product_flash_attention_for_cpu_backward.default: _cpu_flash_backward_flops}
"""FLOP formulas ``torch.utils.flop_counter`` lacks: the CPU flash-attention kernel, which every
fake-tensor profile runs for ``scaled_dot_product_attention`` (the CUDA kernels' formulas apply)."""
_NOT_OPS = {aten.detach.default}
"""Not ops of the model: the recorder's own pack hook detaches every saved tensor (and
``torch.utils.checkpoint``'s policy functions never see ``detach`` either)."""


@dataclass(eq=False)
class StorageRecord:
    nbytes: int
    created: int
    producer: str | None
    freed: int | None = None
    holders: list[str] = field(default_factory=list)
    saved_outside: bool = False
    excluded: bool = False
    """Host memory, not counted (see :meth:`StepRecorder.exclude`)."""
    trace_key: int | None = None
    op: int = -1
    """Index into the producing unit's :attr:`StepRecorder.unit_ops` of the op that allocated it
    (-1: allocated outside every unit's forward)."""
    mutated: bool = False
    """An in-place op wrote it after it was allocated."""
    freed_op: int = 0
    """When its producing unit's forward freed it: the number of that forward's ops that had run
    (at least 1; 0: still alive when the forward ended)."""
    weight: bool = False
    """A streamed parameter's device copy (:mod:`memtune.streaming`): live bytes while its
    storage is allocated, never a saved activation (autograd's views of it are the weight)."""

    @property
    def saved(self) -> bool:
        return bool(self.holders) or self.saved_outside


@dataclass(eq=False)
class OpEntry:
    """One aten op of a unit's forward, as the recorder saw it (see :class:`memtune.profile.OpRecord`)."""

    name: str
    flops: int
    io_bytes: int
    random: bool
    inplace: bool
    view: bool
    outputs: list[StorageRecord] = field(default_factory=list)
    deps: tuple[int, ...] = ()
    saves: bool = False


@dataclass
class Interval:
    name: StepEvent
    unit: str | None
    live_bytes: int
    peak_bytes: int
    grad_bytes: int = 0


class StepRecorder(TorchDispatchMode):
    """Record one step. Use as a context manager *inside* the fake (or real) tensor mode."""

    def __init__(self, *, granularity: int = 1, target: str = "cpu", resolve_data_dependent: bool = True,
                 cuda_warmup_steps: int = 2, late_optimizer_state: bool = True):
        super().__init__()
        self.granularity = granularity
        self.target = target
        self.resolve_data_dependent = resolve_data_dependent
        self.live_bytes = 0
        self.intervals: list[Interval] = []
        self.records: list[StorageRecord] = []
        self._by_storage: WeakIdKeyDictionary = WeakIdKeyDictionary()
        self._static: WeakIdKeyDictionary = WeakIdKeyDictionary()
        self.static_bytes = 0
        self.unit_stack: list[str] = []
        self.bwd_unit: str | None = None
        self.phase = StepPhase.FORWARD
        self.flops: dict[tuple[str, str | None], int] = {}
        self.assumptions: list[str] = []
        self._overrides: dict[int, int] = {}
        self.grad_bytes = 0
        """Parameter gradients accumulated so far (see :meth:`watch_grads`)."""
        self.cuda_warmup_steps = cuda_warmup_steps
        self.late_optimizer_state = late_optimizer_state
        self.allocator: CachingAllocatorSim | None = None
        """The simulated CUDA caching allocator after replaying the step (CUDA targets only)."""
        # CUDA targets: ("m", key, nbytes) / ("f", key) / ("mark", interval index), in step order.
        self._trace: list[tuple] | None = [] if target == "cuda" else None
        self._next_key = 0
        self._param_storages: WeakIdKeyDictionary = WeakIdKeyDictionary()
        self._late_static: list[tuple[int, int]] = []
        self.unit_ops: dict[str, list[OpEntry]] = {}
        """Per unit, every aten op its forward ran, in order (the per-op record)."""
        self._op: OpEntry | None = None
        self._host: WeakIdKeyDictionary = WeakIdKeyDictionary()

    @property
    def peak_reserved_bytes(self) -> int | None:
        """Simulated ``torch.cuda.max_memory_reserved`` of the step (CUDA targets only)."""
        return None if self.allocator is None else self.allocator.peak_reserved_bytes

    @property
    def peak_allocated_bytes(self) -> int | None:
        """Simulated ``torch.cuda.max_memory_allocated`` of the step (CUDA targets only)."""
        return None if self.allocator is None else self.allocator.peak_allocated_bytes

    # ------------------------------------------------------------------ events
    @property
    def current_unit(self) -> str | None:
        if self.phase is StepPhase.BACKWARD:
            return self.bwd_unit
        return self.unit_stack[-1] if self.unit_stack else None

    def mark(self, name: StepEvent, unit: str | None = None) -> None:
        """Close the current interval and open one starting at this event."""
        self.intervals.append(Interval(name, unit, self.live_bytes, self.live_bytes, self.grad_bytes))
        if self._trace is not None:
            self._trace.append(("mark", len(self.intervals) - 1))

    def __exit__(self, *exc):
        out = super().__exit__(*exc)
        if self._trace is not None and exc[0] is None:
            self._replay_cuda_allocator()
        return out

    def _replay_cuda_allocator(self) -> None:
        """Replace each interval's live/peak bytes by the simulated caching allocator's
        allocated bytes (block sizes) on the last of ``cuda_warmup_steps + 1`` replayed steps."""
        trace, self._trace = self._trace, None  # frees after the step are not part of it
        assert trace is not None
        first = next((i for i, ev in enumerate(trace) if ev[0] == "mark"), len(trace))
        sim = CachingAllocatorSim()
        static: dict[int, int | None] = {}
        late = dict(self._late_static) if self.late_optimizer_state else {}
        for ev in trace[:first]:  # parameters (buffers, batch, optimizer state): in registration order
            if ev[0] == "m":
                if ev[1] not in late:
                    static[ev[1]] = sim.malloc(ev[2])
            elif ev[1] in static:
                sim.free(static.pop(ev[1]))
        optim_mark = next((i for i, iv in enumerate(self.intervals) if iv.name == StepEvent.OPTIM_START), None)

        def allocate_late() -> None:
            for key, n in late.items():
                if key not in static:
                    static[key] = sim.malloc(n)
        for it in range(self.cuda_warmup_steps + 1):
            last = it == self.cuda_warmup_steps
            if last:
                sim.reset_peaks()  # like torch.cuda.reset_peak_memory_stats() before the measured step
            handles = dict(static)
            cur = -1
            for ev in trace[first:]:
                kind = ev[0]
                if kind == "m":
                    handles[ev[1]] = sim.malloc(ev[2])
                elif kind == "f":
                    h = handles.pop(ev[1], None)
                    static.pop(ev[1], None)
                    sim.free(h)
                else:
                    cur = ev[1]
                    if it == 0 and cur == optim_mark:
                        allocate_late()
                        handles.update(static)
                    if last:
                        iv = self.intervals[cur]
                        iv.live_bytes = iv.peak_bytes = sim.allocated_bytes
                    continue
                if last and cur >= 0 and sim.allocated_bytes > self.intervals[cur].peak_bytes:
                    self.intervals[cur].peak_bytes = sim.allocated_bytes
            allocate_late()
            handles.update(static)
            if not last:  # the step's leftovers die before the next step allocates much
                for key, h in handles.items():
                    if key not in static:
                        sim.free(h)
        self.allocator = sim

    def watch_grads(self, params: list[torch.Tensor], *, live_from_start: bool = False) -> list:
        """Count each parameter's gradient once it is first accumulated (handles returned).
        ``live_from_start``: the gradients already exist (gradient accumulation) and count from
        the start of the step."""
        done: set[int] = set()
        if live_from_start:
            for p in params:
                if p.grad is not None:
                    done.add(id(p))
                    self.grad_bytes += round_allocation(p.grad.untyped_storage().nbytes(), self.granularity)

        for p in params:
            self._param_storages[p.untyped_storage()] = True

        def hook(p: torch.Tensor) -> None:
            if id(p) not in done:
                done.add(id(p))
                self.grad_bytes += round_allocation(p.untyped_storage().nbytes(), self.granularity)

        return [p.register_post_accumulate_grad_hook(hook) for p in params if p.requires_grad]

    def _bump_peak(self) -> None:
        if self.intervals and self.live_bytes > self.intervals[-1].peak_bytes:
            self.intervals[-1].peak_bytes = self.live_bytes

    # ------------------------------------------------------------------ storages
    def _nbytes(self, st: torch.UntypedStorage) -> int:
        return round_allocation(int(st.nbytes()), self.granularity)

    def register_static(self, *objs: Any) -> int:
        """Count pre-existing tensors (parameters, buffers, optimizer state, the batch) as live
        for the whole step. Returns the bytes added."""
        added = 0
        leaves, _ = tree_flatten(list(objs))
        for t in leaves:
            if not isinstance(t, torch.Tensor):
                continue
            st = t.untyped_storage()
            if st in self._static or st in self._by_storage or st in self._host:
                continue
            n = self._nbytes(st)
            self._static[st] = n
            self._watch(st, n, record=None)
            added += n
        self.static_bytes += added
        self.live_bytes += added
        self._bump_peak()
        return added

    def exclude(self, t: torch.Tensor) -> None:
        """Stop counting ``t``'s storage: it lives in host memory, not on the device being
        modelled (offloaded optimizer state on a CUDA target)."""
        st = t.untyped_storage()
        entry = self._by_storage.get(st)
        if entry is not None and not entry[0].excluded:
            entry[0].excluded = True
            self.live_bytes -= entry[0].nbytes
            if self._trace is not None and entry[0].trace_key is not None:
                self._trace.append(("f", entry[0].trace_key))

    def host_static(self, tensors) -> None:
        """Tensors that live in host memory for the whole step (streamed parameters on a CUDA
        target): :meth:`register_static` does not count them."""
        for t in tensors:
            self._host[t.untyped_storage()] = True

    def in_host_memory(self, t: torch.Tensor) -> bool:
        """Whether ``t`` was declared host-resident (:meth:`host_static`)."""
        return t.untyped_storage() in self._host

    def nbytes_of(self, t: torch.Tensor) -> int:
        return self._nbytes(t.untyped_storage())

    def mark_weight(self, t: torch.Tensor) -> None:
        """``t`` (just allocated) is a streamed parameter's device copy (:attr:`StorageRecord.weight`)."""
        entry = self._by_storage.get(t.untyped_storage())
        if entry is not None:
            entry[0].weight = True

    def resize(self, t: torch.Tensor, nbytes: int) -> None:
        """``t``'s storage was resized to ``nbytes`` (a streamed copy freed, or fetched again)."""
        entry = self._by_storage.get(t.untyped_storage())
        if entry is None:
            return
        rec = entry[0]
        new = round_allocation(nbytes, self.granularity) if nbytes else 0
        if not rec.excluded:
            self.live_bytes += new - rec.nbytes
            if self._trace is not None:
                if rec.nbytes and rec.trace_key is not None:
                    self._trace.append(("f", rec.trace_key))
                if new:
                    rec.trace_key = self._next_key
                    self._next_key += 1
                    self._trace.append(("m", rec.trace_key, new))
        rec.nbytes = new
        self._bump_peak()

    def is_static(self, t: torch.Tensor) -> bool:
        return t.untyped_storage() in self._static

    def record_of(self, t: torch.Tensor) -> StorageRecord | None:
        entry = self._by_storage.get(t.untyped_storage())
        return None if entry is None else entry[0]

    def _watch(self, st: torch.UntypedStorage, nbytes: int, record: StorageRecord | None) -> None:
        key = None
        if self._trace is not None:
            key = self._next_key
            self._next_key += 1
            if record is None and self._param_storages and st not in self._param_storages:
                self._late_static.append((key, nbytes))  # optimizer state (or buffer / batch)
            self._trace.append(("m", key, nbytes))

        def on_free(_ref, self=self, nbytes=nbytes, record=record, key=key):
            if record is not None:
                if record.excluded:
                    return
                nbytes, key = record.nbytes, record.trace_key  # (a resized storage: its current size)
            self.live_bytes -= nbytes
            if self._trace is not None and nbytes:
                self._trace.append(("f", key))
            if record is not None:
                record.freed = len(self.intervals) - 1
                if record.op >= 0 and self.unit_stack and self.unit_stack[-1] == record.producer \
                        and self.phase is StepPhase.FORWARD:
                    record.freed_op = len(self.unit_ops[record.producer])
            else:
                self.static_bytes -= nbytes

        if record is not None:
            record.trace_key = key
        # The weakref must outlive the storage for the callback to fire: keep it on the record map.
        ref = weakref.ref(st, on_free)
        if record is not None:
            self._by_storage[st] = (record, ref)
        else:
            self._static[st] = (nbytes, ref)

    def _track_output(self, t: torch.Tensor) -> None:
        st = t.untyped_storage()
        if st in self._by_storage or st in self._static or st in self._host:
            return  # (host memory written in place, e.g. offloaded state copied back, is not the device's)
        n = self._overrides.pop(id(t), None)
        n = self._nbytes(st) if n is None else round_allocation(n, self.granularity)
        rec = StorageRecord(nbytes=n, created=len(self.intervals) - 1, producer=self.current_unit if self.phase is StepPhase.FORWARD else None)
        if self._op is not None:
            rec.op = len(self.unit_ops[rec.producer]) - 1
            self._op.outputs.append(rec)
        self.records.append(rec)
        self._watch(st, n, rec)
        self.live_bytes += n

    # ------------------------------------------------------------------ saved tensors
    def pack(self, t: torch.Tensor) -> torch.Tensor:
        if self.unit_stack and self.phase is StepPhase.FORWARD:
            ops = self.unit_ops.get(self.unit_stack[-1])
            if ops:
                ops[-1].saves = True  # autograd saves right after the op that needs it ran
        entry = self._by_storage.get(t.untyped_storage())
        if entry is not None and not entry[0].weight:
            rec = entry[0]
            unit = self.unit_stack[-1] if self.unit_stack else None
            if unit is None:
                rec.saved_outside = True
            elif unit not in rec.holders:
                rec.holders.append(unit)
        # A detached alias keeps the storage alive as autograd would, without a reference
        # cycle through the grad_fn of a saved output.
        return t.detach()

    @staticmethod
    def unpack(t: torch.Tensor) -> torch.Tensor:
        return t

    # ------------------------------------------------------------------ dispatch
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is _DEVICE_QUERY:  # ``t.device``: allocates nothing, computes nothing (60% of the calls)
            return func(*args, **(kwargs or {}))
        kwargs = kwargs or {}
        if self.resolve_data_dependent:
            resolved = self._resolve_data_dependent(func, args)
            if resolved is not NotImplemented:
                return resolved
        out = None
        eager = EAGER_KERNELS.get(func)
        if eager is not None and _is_fake(args[0]):
            hit = eager(func, args, kwargs)
            if hit is not None:
                out, note = hit
                self._assume(note)
        if out is None:
            out = func(*args, **kwargs)
        flops = self._count_flops(func, args, kwargs, out)
        if self.target == "cuda" and func in _SDPA_CPU:
            self._model_cuda_sdpa(args, kwargs, out)
        leaves, _ = tree_flatten(out)
        self._op = self._record_op(func, args, kwargs, leaves, flops)
        try:
            for t in leaves:
                if isinstance(t, torch.Tensor):
                    self._track_output(t)
        finally:
            self._op = None
        self._bump_peak()
        return out

    def _count_flops(self, func, args, kwargs, out) -> int:
        fn = flop_registry.get(func._overloadpacket) or _EXTRA_FLOPS.get(func)
        if fn is None:
            return 0
        n = int(fn(*args, **kwargs, out_val=out))
        key = (self.phase, self.current_unit)
        self.flops[key] = self.flops.get(key, 0) + n
        return n

    def _record_op(self, func, args, kwargs, out_leaves, flops: int) -> OpEntry | None:
        """The per-op record of an op in a unit's forward (``None`` elsewhere): its name, FLOPs,
        bytes read and written, whether it draws random numbers, writes in place or aliases, and
        the earlier ops of the unit whose storages it reads. An in-place write marks the storages
        it writes as mutated."""
        if (self.phase is not StepPhase.FORWARD or not self.unit_stack or func.namespace != "aten"
                or func in _NOT_OPS or not any(isinstance(t, torch.Tensor) for t in out_leaves)):
            return None
        unit = self.unit_stack[-1]
        ops = self.unit_ops.setdefault(unit, [])
        in_leaves, _ = tree_flatten((args, kwargs))
        io = 0
        deps: set[int] = set()
        for t in in_leaves:
            if isinstance(t, torch.Tensor):
                io += t.numel() * t.element_size()
                rec = self.record_of(t)
                if rec is not None and rec.producer == unit and rec.op >= 0:
                    deps.add(rec.op)
        io += sum(t.numel() * t.element_size() for t in out_leaves if isinstance(t, torch.Tensor))
        schema = func._schema
        named = dict(zip((a.name for a in schema.arguments), args)) | kwargs
        written = [a.name for a in schema.arguments if a.alias_info is not None and a.alias_info.is_write]
        for name in written:
            t = named.get(name)
            rec = self.record_of(t) if isinstance(t, torch.Tensor) else None
            if rec is not None:
                rec.mutated = True
        random = torch.Tag.nondeterministic_seeded in func.tags
        if random and any(a.name == "dropout_p" for a in schema.arguments):  # attention: random only with dropout
            random = float(named.get("dropout_p", 0.0) or 0.0) > 0.0
        entry = OpEntry(name=str(func), flops=flops, io_bytes=0 if func.is_view else io, random=random, inplace=bool(written),
                        view=bool(func.is_view), deps=tuple(sorted(deps)))
        ops.append(entry)
        return entry

    def _model_cuda_sdpa(self, args, kwargs, out) -> None:
        """Replace the CPU kernel's saved log-sum-exp by what the CUDA kernel would save.

        The CPU flash kernel returns ``(out, logsumexp(B, H, T))``; on CUDA the flash kernel
        saves the same plus two RNG-state scalars, the memory-efficient kernel pads the
        log-sum-exp to a multiple of 32, and the math kernel materializes the attention
        matrix (added as an extra saved allocation of ``B*H*T*S`` elements).
        """
        q, k = args[0], args[1]
        attn_mask = kwargs.get("attn_mask")
        dropout = args[3] if len(args) > 3 else kwargs.get("dropout_p", 0.0)
        B, H, T, D = q.shape
        backend = cuda_sdpa_backend(dtype=q.dtype, head_dim=D, has_mask=attn_mask is not None, dropout_p=dropout)
        lse = out[1]
        if backend in ("flash", "efficient"):
            self._overrides[id(lse)] = cuda_sdpa_logsumexp_bytes(backend, B, H, T)
        else:
            self._overrides[id(lse)] = B * H * T * k.shape[2] * q.element_size()
            self.assumptions.append(
                f"scaled_dot_product_attention ({tuple(q.shape)}, {q.dtype}) runs the math kernel on CUDA: "
                "counted the attention matrix as saved"
            ) if not any("math kernel" in a for a in self.assumptions) else None

    def _resolve_data_dependent(self, func, args):
        """Under fake tensors a value read (``bool(t)``, ``t.item()``) or a data-dependent
        shape (``nonzero``) has no answer. A value read resolves as true (or 1): checks in
        training code are mostly guards whose normal answer is yes ("all finite", "no
        padding", "mask is all ones"). ``nonzero`` keeps every element, an upper bound on
        memory. Each resolution is listed in ``profile.assumptions``."""
        if func is aten._local_scalar_dense.default:
            t = args[0]
            if not (_is_fake(t) or t.is_meta):
                return NotImplemented
            value: Any = True if t.dtype == torch.bool else (1 if not t.is_floating_point() else 1.0)
            if self.phase is not StepPhase.OPTIMIZER:  # optimizers read their step counters: not a model assumption
                self._assume(f"value read of a {t.dtype} tensor in {self.current_unit or 'the model'} resolved as {value!r}")
            return value
        if func is aten.nonzero.default and _is_fake(args[0]):
            x = args[0]
            self._assume(f"nonzero on {tuple(x.shape)} in {self.current_unit or 'the model'}: assumed every element is selected")
            out = torch.empty((x.numel(), x.dim()), dtype=torch.long, device=x.device)
            self._track_output(out)
            self._bump_peak()
            return out
        return NotImplemented

    def _assume(self, text: str) -> None:
        if text not in self.assumptions:
            self.assumptions.append(text)


def _is_fake(t: Any) -> bool:
    from torch._subclasses.fake_tensor import FakeTensor

    return isinstance(t, FakeTensor)

