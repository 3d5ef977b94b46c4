"""A simulation of PyTorch's CUDA caching allocator, so profiles can predict
``torch.cuda.max_memory_allocated`` instead of the sum of tensor sizes.

``torch.cuda.memory_allocated`` is not the sum of the tensors' sizes: it is the sum of the
sizes of the *blocks* the caching allocator handed out, and a block can be larger than the
request (a cached block reused for a smaller request is only split when the remainder is
large enough). :class:`CachingAllocatorSim` replays a sequence of ``malloc``/``free`` calls
through the same rules as ``c10/cuda/CUDACachingAllocator.cpp`` (``DeviceCachingAllocator``,
checked against the upstream source) and reports the allocator's own statistics.

Scope: one device, one stream, the default configuration
(``PYTORCH_CUDA_ALLOC_CONF`` unset). The rules modelled:

* **Rounding** (``round_size``): requests are rounded up to a multiple of
  ``kMinBlockSize = 512`` bytes, at least 512. (``roundup_power2_divisions`` is off by default.)
* **Pools** (``get_pool``): a rounded size ``<= kSmallSize = 1 MiB`` goes to the small pool,
  anything larger to the large pool. Blocks never move between pools.
* **Best fit** (``get_free_block``): the free blocks of a pool are ordered by
  ``(size, address)``; the request takes the first block with ``size >= request``, i.e. the
  smallest block that fits, lowest address first among equals.
  The "oversize" rules there (don't hand a block ``>= max_split_size`` to a smaller request,
  and only hand an oversize block to a request within ``max_non_split_rounding_size`` of it)
  only apply when ``max_split_size`` is set; by default it is unlimited, so they never fire.
* **New segment** (``alloc_block`` / ``get_allocation_size``) when no free block fits:
  ``size <= 1 MiB`` -> a ``kSmallBuffer = 2 MiB`` segment; ``size < kMinLargeAlloc = 10 MiB``
  -> a ``kLargeBuffer = 20 MiB`` segment; otherwise ``size`` rounded up to
  ``kRoundLarge = 2 MiB``. The whole segment becomes one block, then split as below.
  (Out-of-memory handling -- freeing cached segments and retrying -- is not modelled: the
  simulated device has unlimited memory, and segments are never released.)
* **Split** (``should_split``): after taking block ``b`` for a request of ``size``, the
  remainder ``b.size - size`` becomes a separate free block when, in the small pool,
  ``remainder >= 512``; in the large pool, ``remainder > 1 MiB`` (the ``size < max_split_size``
  clause is always true by default). Otherwise the request gets the *whole* block, and that
  whole block is what ``allocated_bytes`` counts.
* **Free** (``free_block`` / ``try_merge_blocks``): the block goes back to its pool, merged
  with its previous and next neighbours in the same segment if those are free.
  (With one stream there are no cross-stream events delaying the free.)
* **Stats**: ``allocated_bytes`` = sum of the sizes of allocated blocks (what
  ``torch.cuda.memory_allocated`` / ``max_memory_allocated`` report); ``reserved_bytes`` =
  sum of segment sizes (``memory_reserved``); ``requested_bytes`` = sum of the original
  request sizes; each with its peak, reset by :meth:`CachingAllocatorSim.reset_peaks`
  (``reset_peak_memory_stats`` sets each peak to the current value).

Not modelled: several streams (blocks are per stream and ``record_stream`` delays frees),
``expandable_segments:True`` (one growing segment per stream, and small-pool split rule for
large blocks), ``max_split_size_mb`` / ``roundup_power2_divisions`` / garbage collection,
CUDA graph private pools, and the order in which ``cudaMalloc`` returns addresses:
segments get increasing simulated addresses in creation order, which only matters for
tie-breaking between free blocks of equal size.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field

MiB = 1 << 20
K_MIN_BLOCK_SIZE = 512
K_SMALL_SIZE = 1 * MiB
K_SMALL_BUFFER = 2 * MiB
K_LARGE_BUFFER = 20 * MiB
K_MIN_LARGE_ALLOC = 10 * MiB
K_ROUND_LARGE = 2 * MiB


def round_size(nbytes: int) -> int:
    """The allocator's rounding of a request: a multiple of 512 bytes, at least 512."""
    if nbytes < K_MIN_BLOCK_SIZE:
        return K_MIN_BLOCK_SIZE
    return K_MIN_BLOCK_SIZE * ((nbytes + K_MIN_BLOCK_SIZE - 1) // K_MIN_BLOCK_SIZE)


def allocation_size(size: int) -> int:
    """Size of the segment ``cudaMalloc``'ed for a (rounded) request that no cached block fits."""
    if size <= K_SMALL_SIZE:
        return K_SMALL_BUFFER
    if size < K_MIN_LARGE_ALLOC:
        return K_LARGE_BUFFER
    return K_ROUND_LARGE * ((size + K_ROUND_LARGE - 1) // K_ROUND_LARGE)


@dataclass(eq=False)
class _Segment:
    addr: int
    size: int
    small: bool


@dataclass(eq=False)
class _Block:
    addr: int
    size: int
    segment: _Segment
    allocated: bool = False
    requested: int = 0
    prev: _Block | None = field(default=None, repr=False)
    next: _Block | None = field(default=None, repr=False)

    @property
    def key(self) -> tuple[int, int]:
        return (self.size, self.addr)


class CachingAllocatorSim:
    """One-stream simulation of ``DeviceCachingAllocator`` (see the module docstring).

    >>> a = CachingAllocatorSim()
    >>> h = a.malloc(1000)          # 1024-byte block in a new 2 MiB small segment
    >>> a.allocated_bytes, a.reserved_bytes
    (1024, 2097152)
    >>> a.free(h); a.allocated_bytes, a.peak_allocated_bytes
    (0, 1024)
    """

    def __init__(self) -> None:
        # Free blocks of each pool, sorted by (size, address): the allocator's BlockComparatorSize.
        self._free: dict[bool, list[tuple[int, int, _Block]]] = {True: [], False: []}
        self._live: dict[int, _Block] = {}
        self._next_handle = 1
        self._next_addr = 0
        self.segments: list[_Segment] = []
        self.allocated_bytes = 0
        self.reserved_bytes = 0
        self.requested_bytes = 0
        self.peak_allocated_bytes = 0
        self.peak_reserved_bytes = 0
        self.peak_requested_bytes = 0
        self.num_allocs = 0

    # ------------------------------------------------------------------ public API
    def malloc(self, nbytes: int) -> int | None:
        """Allocate ``nbytes``; returns a handle for :meth:`free`. A zero-byte request
        allocates nothing (the real allocator returns a null pointer) and returns ``None``."""
        if nbytes < 0:
            raise ValueError(f"negative allocation size {nbytes}")
        if nbytes == 0:
            return None
        size = round_size(nbytes)
        small = size <= K_SMALL_SIZE
        block = self._take_free_block(size, small)
        if block is None:
            block = self._new_segment(size, small)
        if self._should_split(block, size):
            rest = _Block(block.addr + size, block.size - size, block.segment, prev=block, next=block.next)
            if block.next is not None:
                block.next.prev = rest
            block.next = rest
            block.size = size
            self._insert_free(rest)
        block.allocated = True
        block.requested = nbytes
        self.allocated_bytes += block.size
        self.requested_bytes += nbytes
        self.num_allocs += 1
        self.peak_allocated_bytes = max(self.peak_allocated_bytes, self.allocated_bytes)
        self.peak_requested_bytes = max(self.peak_requested_bytes, self.requested_bytes)
        handle = self._next_handle
        self._next_handle += 1
        self._live[handle] = block
        return handle

    def free(self, handle: int | None) -> None:
        """Return an allocation to the cache (merging it with free neighbours)."""
        if handle is None:
            return
        block = self._live.pop(handle)
        block.allocated = False
        self.allocated_bytes -= block.size
        self.requested_bytes -= block.requested
        block.requested = 0
        for nb in (block.prev, block.next):
            if nb is not None and not nb.allocated:
                self._remove_free(nb)
                if nb is block.prev:  # absorb into the previous block: it keeps its address
                    nb.size += block.size
                    nb.next = block.next
                    if block.next is not None:
                        block.next.prev = nb
                    block = nb
                else:
                    block.size += nb.size
                    block.next = nb.next
                    if nb.next is not None:
                        nb.next.prev = block
        self._insert_free(block)

    def block_size(self, handle: int | None) -> int:
        """Bytes the allocation really occupies (what ``allocated_bytes`` counts for it)."""
        return 0 if handle is None else self._live[handle].size

    def reset_peaks(self) -> None:
        """Like ``torch.cuda.reset_peak_memory_stats``: each peak becomes the current value."""
        self.peak_allocated_bytes = self.allocated_bytes
        self.peak_reserved_bytes = self.reserved_bytes
        self.peak_requested_bytes = self.requested_bytes

    def snapshot(self) -> list[tuple[int, bool, list[tuple[int, bool]]]]:
        """``[(segment size, is small pool, [(block size, allocated), ...] in address order)]``."""
        heads: dict[int, _Block] = {}
        for blocks in (self._live.values(), (b for pool in self._free.values() for *_, b in pool)):
            for b in blocks:
                while b.prev is not None:
                    b = b.prev
                heads[id(b.segment)] = b
        out = []
        for seg in self.segments:
            b, blocks = heads[id(seg)], []
            while b is not None:
                blocks.append((b.size, b.allocated))
                b = b.next
            out.append((seg.size, seg.small, blocks))
        return out

    # ------------------------------------------------------------------ internals
    def _take_free_block(self, size: int, small: bool) -> _Block | None:
        pool = self._free[small]
        i = bisect.bisect_left(pool, (size, -1))
        if i == len(pool):
            return None
        return pool.pop(i)[2]

    def _new_segment(self, size: int, small: bool) -> _Block:
        seg = _Segment(self._next_addr, allocation_size(size), small)
        self._next_addr += seg.size
        self.segments.append(seg)
        self.reserved_bytes += seg.size
        self.peak_reserved_bytes = max(self.peak_reserved_bytes, self.reserved_bytes)
        return _Block(seg.addr, seg.size, seg)

    @staticmethod
    def _should_split(block: _Block, size: int) -> bool:
        remaining = block.size - size
        if block.segment.small:
            return remaining >= K_MIN_BLOCK_SIZE
        return remaining > K_SMALL_SIZE

    def _insert_free(self, block: _Block) -> None:
        bisect.insort(self._free[block.segment.small], (block.size, block.addr, block))

    def _remove_free(self, block: _Block) -> None:
        pool = self._free[block.segment.small]
        i = bisect.bisect_left(pool, (block.size, block.addr))
        assert pool[i][2] is block, "free-pool bookkeeping out of sync"
        pool.pop(i)
