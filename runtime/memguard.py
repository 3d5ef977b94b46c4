"""Keep a training step inside its memory budget, and measure its peak.

On CUDA the caching allocator does both: ``torch.cuda.set_per_process_memory_fraction``
makes an allocation past the budget raise ``torch.OutOfMemoryError``, and
``torch.cuda.max_memory_allocated`` gives the peak.

A CPU has no such allocator, so the budget applies to tracked tensor memory:
:class:`TensorMemoryGuard` is a ``TorchDispatchMode`` that counts every tensor storage
alive during the step (parameters, gradients and optimizer state included) and raises
``torch.OutOfMemoryError`` when an op would take the total past the limit, as the CUDA
allocator would. The runtime's recovery path is therefore the same on both devices.
"""

from __future__ import annotations

import weakref
from typing import Any, Iterable

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.weak import WeakIdKeyDictionary

from memtune.units_fmt import fmt_bytes


class TensorMemoryGuard(TorchDispatchMode):
    """Live tensor bytes with a hard limit. ``limit_bytes=None`` only measures."""

    def __init__(self, limit_bytes: int | None = None):
        super().__init__()
        self.limit_bytes = limit_bytes
        self.live_bytes = 0
        self.peak_bytes = 0
        self._storages: WeakIdKeyDictionary = WeakIdKeyDictionary()

    def track(self, objs: Iterable[Any]) -> None:
        """Count tensors that exist before the step (parameters, optimizer state, the batch)."""
        leaves, _ = tree_flatten(list(objs))
        for t in leaves:
            if isinstance(t, torch.Tensor):
                self._add(t.untyped_storage())
        self.peak_bytes = max(self.peak_bytes, self.live_bytes)

    def _add(self, st: torch.UntypedStorage) -> int:
        if st in self._storages:
            return 0
        n = int(st.nbytes())

        def on_free(_ref, self=self, n=n):
            self.live_bytes -= n

        self._storages[st] = weakref.ref(st, on_free)
        self.live_bytes += n
        return n

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        leaves, _ = tree_flatten(out)
        for t in leaves:
            if isinstance(t, torch.Tensor):
                self._add(t.untyped_storage())
        if self.live_bytes > self.peak_bytes:
            self.peak_bytes = self.live_bytes
        if self.limit_bytes is not None and self.live_bytes > self.limit_bytes:
            over = self.live_bytes
            del out, leaves  # the failed allocation is released, as with a real allocator
            raise torch.OutOfMemoryError(
                f"memtune CPU budget exceeded: {func} needs tracked tensor memory of {fmt_bytes(over)}, "
                f"over the {fmt_bytes(self.limit_bytes)} budget"
            )
        return out
