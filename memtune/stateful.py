"""Stateful layers: the buffers a training step writes (batch norm's running statistics and
``num_batches_tracked``, a module that counts its calls), kept as one clean step leaves them.

Three things run part of a step again, or throw a step away, and each would otherwise write
these buffers once too often:

* **recompute** (:func:`memtune.apply_plan`, RECOMPUTE and SELECTIVE units): the recomputed
  forward runs on private copies of the buffers the forward wrote, holding the values the
  forward saw (:class:`RecomputedBuffers`), so the buffers are written once and the recomputed
  outputs equal the forward's;
* **an out-of-memory retry** and **a skipped non-finite batch** (the runtime's trainer): the
  buffers the profiled step writes are copied before each step and put back before the retry,
  or when the batch is skipped (:class:`BufferSnapshot`);
* **micro-batching** changes what these layers compute (statistics per micro-batch, one update
  per micro-batch), which no bookkeeping undoes: the profile lists them
  (``ModelProfile.batch_statistics``, ``ModelProfile.written_buffers``) and the micro-batch
  lever prices it as lossy for such a model (:mod:`memtune.levers.micro_batch`).

Which buffers a step writes is measured, not modelled: :class:`BufferWrites` watches the aten
ops of a forward (fake in the profiler, real the first time a recomputed unit runs) and notes
every buffer an op writes. An op's schema declares most writes (``Tensor(a!)``); batch norm's
kernels update the running statistics without declaring it, and without bumping their version
counters, so :data:`UNDECLARED_WRITES` lists those arguments.

Memory: only written buffers are ever copied. A recomputed unit keeps one copy of the buffers
its forward writes from forward to backward (for batch norm, two vectors of its channel count
and a counter), the trainer one copy of the step's written buffers for the length of a step.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Mapping

import torch
import torch.nn as nn
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes

UNDECLARED_WRITES: dict[str, tuple[str, ...]] = {
    "aten::native_batch_norm": ("running_mean", "running_var"),
    "aten::cudnn_batch_norm": ("running_mean", "running_var"),
    "aten::miopen_batch_norm": ("running_mean", "running_var"),
}
"""Ops that update arguments their schema does not mark as written (when ``training`` is true):
the batch-norm kernels eager PyTorch dispatches to, which update the running statistics in place."""


def batch_statistics(model: nn.Module) -> tuple[str, ...]:
    """FQNs of the modules that normalize with statistics over the batch as ``model`` is now
    (batch norm in training mode, SyncBatchNorm included, with or without running statistics):
    their outputs depend on which samples share a batch."""
    from torch.nn.modules.batchnorm import _BatchNorm

    return tuple(n for n, m in model.named_modules() if isinstance(m, _BatchNorm) and m.training)


def _storage_key(t: torch.Tensor) -> StorageWeakRef | None:
    try:
        return StorageWeakRef(t.untyped_storage())
    except (RuntimeError, NotImplementedError, TypeError):  # a tensor subclass without a storage of its own
        return None


class BufferWrites(TorchDispatchMode):
    """While active, notes which of ``buffers`` (name -> tensor) an op writes, in place or
    through a view. With ``copy_before``, keeps a copy of each one's value from just before its
    first write (``written[name]``; otherwise ``None``): what a forward saw, paid for only by the
    buffers that are written."""

    def __init__(self, buffers: Mapping[str, torch.Tensor], *, copy_before: bool = False):
        super().__init__()
        self.buffers = dict(buffers)
        self.copy_before = copy_before
        self.written: dict[str, torch.Tensor | None] = {}
        self._names: dict[StorageWeakRef, list[str]] = {}
        for name, t in self.buffers.items():
            key = _storage_key(t) if t.numel() else None
            if key is not None:
                self._names.setdefault(key, []).append(name)  # tied buffers share a storage

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self._names:
            for t in _written_args(func, args, kwargs):
                key = _storage_key(t)
                for name in self._names.get(key, ()) if key is not None else ():
                    if name not in self.written:
                        self.written[name] = self.buffers[name].clone() if self.copy_before else None
        return func(*args, **kwargs)


def _written_args(func, args, kwargs) -> Iterable[torch.Tensor]:
    """The tensors an aten op writes: the arguments its schema marks ``(a!)``, and those of
    :data:`UNDECLARED_WRITES` in training."""
    schema = func._schema
    undeclared = UNDECLARED_WRITES.get(schema.name, ())
    if not schema.is_mutable and not undeclared:
        return
    for i, arg in enumerate(schema.arguments):
        writes = arg.alias_info is not None and arg.alias_info.is_write
        if not writes and arg.name not in undeclared:
            continue
        value = args[i] if i < len(args) and not arg.kwarg_only else kwargs.get(arg.name)
        if undeclared and not writes:
            training = args[5] if len(args) > 5 else kwargs.get("training", False)
            if not training:
                continue
        for t in value if isinstance(value, (list, tuple)) else (value,):
            if isinstance(t, torch.Tensor):
                yield t


def _buffer_slots(module: nn.Module) -> list[tuple[str, nn.Module, str]]:
    """(name, owning module, key in its ``_buffers``) for every buffer of ``module``'s subtree,
    tied ones under each name."""
    return [(f"{prefix}.{key}" if prefix else key, owner, key)
            for prefix, owner in module.named_modules(remove_duplicate=False)
            for key, t in owner._buffers.items() if t is not None]


class RecomputedBuffers:
    """Makes a recomputed unit of ``module`` write its buffers once, and recompute with the
    values its forward saw.

    The first forward runs under :class:`BufferWrites` to learn which buffers it writes and
    what they held; later forwards copy just those before running. The recomputation (the second
    call of the checkpointed function, from backward) then runs with private copies of the
    forward's values in the module's buffer slots, and the module's own buffers, which hold what
    the one forward wrote, are put back afterwards, also when non-reentrant checkpoint stops the
    recomputation early by raising. The copies are made outside the checkpoint's dispatch modes:
    a selective policy counts op calls, and must count the unit's ops only."""

    def __init__(self, module: nn.Module):
        self.slots = _buffer_slots(module)
        self.written: tuple[str, ...] | None = None
        """Names (relative to the module) of the buffers its forward writes; ``None``: not yet run."""

    def run(self, forward: Callable, checkpointed: Callable[[Callable], Any]) -> Any:
        """``checkpointed(fn)`` (``torch.utils.checkpoint.checkpoint`` of ``fn`` on the call's
        arguments), for an ``fn`` that runs ``forward`` as described above."""
        if not self.slots:
            return checkpointed(forward)
        held = {name: owner._buffers[key] for name, owner, key in self.slots}
        before: dict[str, torch.Tensor] = {}
        calls = 0

        def fn(*args, **kwargs):
            nonlocal calls
            calls += 1
            return forward(*args, **kwargs) if calls == 1 else self._recompute(forward, before, args, kwargs)

        if self.written is None:
            # Outside the checkpoint's modes, so that the checkpoint's own modes see only the unit's ops.
            with BufferWrites(held, copy_before=True) as watch:
                out = checkpointed(fn)
            before.update(watch.written)
        else:
            before.update({name: held[name].clone() for name in self.written})
            out = checkpointed(fn)
        # A buffer the forward replaced (``self.count = self.count + 1``) is written too: the
        # object it replaced still holds the value the forward saw.
        now = {name: owner._buffers[key] for name, owner, key in self.slots}
        before.update({name: t for name, t in held.items() if name not in before and now[name] is not t})
        self.written = tuple(dict.fromkeys((*(self.written or ()), *before)))
        return out

    def _recompute(self, forward, before: dict, args, kwargs) -> Any:
        replaced: list[tuple[nn.Module, str, torch.Tensor]] = []
        copies: dict[int, torch.Tensor] = {}  # one copy per tensor, so that tied buffers stay tied
        try:
            # Copies (a second recomputation, after retain_graph, needs the forward's values again),
            # made where a selective policy does not count them among the unit's ops.
            with _disable_current_modes():
                for name, owner, key in self.slots:
                    if name in before:
                        value = before[name]
                        replaced.append((owner, key, owner._buffers[key]))
                        owner._buffers[key] = copies.setdefault(id(value), value.clone())
            return forward(*args, **kwargs)
        finally:
            for owner, key, t in replaced:
                owner._buffers[key] = t


class BufferSnapshot:
    """A model's buffers as a step finds them; :meth:`restore` puts them back.

    Copies only the buffers ``names`` (those the profiled step writes in place); of the others it
    keeps the tensor objects, so that a step which replaces a buffer (``self.count = self.count +
    1``) gets the untouched one back. Names the model does not have are skipped."""

    def __init__(self, model: nn.Module, names: Iterable[str]):
        self.slots = [(owner, key, t) for _, owner, key in _buffer_slots(model)
                      for t in (owner._buffers[key],)]
        self.copies: list[tuple[torch.Tensor, torch.Tensor]] = []
        for name in names:
            prefix, _, key = name.rpartition(".")
            try:
                t = model.get_submodule(prefix)._buffers.get(key)
            except AttributeError:
                continue
            if t is not None:
                self.copies.append((t, t.detach().clone()))

    def restore(self) -> None:
        for owner, key, t in self.slots:
            owner._buffers[key] = t
        with torch.no_grad():
            for t, copy in self.copies:
                t.copy_(copy)
