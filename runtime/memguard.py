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

from memtune.streaming import StreamObserver, register_observer
from memtune.units_fmt import fmt_bytes


class TensorMemoryGuard(TorchDispatchMode, StreamObserver):
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
        size = [int(st.nbytes())]  # (a streamed weight's storage is resized: see resized())

        def on_free(_ref, self=self, size=size):
            self.live_bytes -= size[0]

        self._storages[st] = (weakref.ref(st, on_free), size)
        self.live_bytes += size[0]
        return size[0]

    def __enter__(self):
        # Weight offload frees and refills its device copies by resizing their storage, which no
        # op dispatch shows: the streams tell the guard (memtune.streaming).
        self._unregister = register_observer(self)
        return super().__enter__()

    def __exit__(self, *exc):
        self._unregister()
        return super().__exit__(*exc)

    def resized(self, t: torch.Tensor, nbytes: int) -> None:
        entry = self._storages.get(t.untyped_storage())
        if entry is None:
            return
        self.live_bytes += nbytes - entry[1][0]
        entry[1][0] = nbytes
        self._check(f"a streamed weight's copy of {fmt_bytes(nbytes)}")

    def _check(self, what) -> None:
        self.peak_bytes = max(self.peak_bytes, self.live_bytes)
        if self.limit_bytes is not None and self.live_bytes > self.limit_bytes:
            raise torch.OutOfMemoryError(
                f"memtune CPU budget exceeded: {what} needs tracked tensor memory of {fmt_bytes(self.live_bytes)}, "
                f"over the {fmt_bytes(self.limit_bytes)} budget"
            )

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        leaves, _ = tree_flatten(out)
        for t in leaves:
            if isinstance(t, torch.Tensor):
                self._add(t.untyped_storage())
        try:
            self._check(func)
        except torch.OutOfMemoryError:
            del out, leaves  # the failed allocation is released, as with a real allocator
            raise
        return out


class HostPeakMeter:
    """The step's peak host memory from the process's resident-set high-water mark, for code a
    dispatch mode cannot see into: under an active ``TorchDispatchMode`` Dynamo does not run
    compiled graphs (the step would silently run eager), and inductor's kernels allocate their
    buffers below the dispatcher. Linux only (``/proc/self/clear_refs`` resets ``VmHWM``).

    ``peak_bytes`` = (high-water mark during the step − resident size before it) + the bytes of
    the tensors tracked before the step, so it is comparable with :class:`TensorMemoryGuard`.
    It is exact when large allocations are mmapped and returned on free: start the process with
    ``MALLOC_MMAP_THRESHOLD_=4096`` (glibc; 65536 is enough when activations are MBs). Otherwise freed memory may stay resident and the
    meter reads high, never low: the runtime then plans more conservatively."""

    def __init__(self) -> None:
        self.peak_bytes: int | None = None
        self._base: int | None = None
        self._static = 0

    @staticmethod
    def available() -> bool:
        import os

        return os.path.exists("/proc/self/clear_refs") and os.access("/proc/self/clear_refs", os.W_OK)

    @staticmethod
    def _status(key: str) -> int:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key):
                    return int(line.split()[1]) * 1024
        raise OSError(f"/proc/self/status has no {key}")

    def track(self, objs: Iterable[Any]) -> None:
        leaves, _ = tree_flatten(list(objs))
        seen = {}
        for t in leaves:
            if isinstance(t, torch.Tensor) and t.device.type == "cpu":
                st = t.untyped_storage()
                seen[st.data_ptr()] = st.nbytes()
        self._static = sum(seen.values())

    def __enter__(self) -> "HostPeakMeter":
        import gc

        gc.collect()
        self._base = self._status("VmRSS")
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the high-water mark to the current resident size
        return self

    def __exit__(self, *exc) -> None:
        self.peak_bytes = max(0, self._status("VmHWM") - self._base) + self._static
