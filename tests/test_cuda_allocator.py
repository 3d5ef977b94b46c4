"""The CUDA caching-allocator simulation: each rule on hand-built sequences (expected stats
worked out by hand from c10/cuda/CUDACachingAllocator.cpp's constants), and its use by the
recorder for CUDA targets."""

import pytest
import torch

import memtune
from memtune import zoo
from memtune.cuda_allocator import CachingAllocatorSim, allocation_size, round_size
from memtune.recorder import StepRecorder

MiB = 2**20


def test_round_size_and_segment_sizes():
    assert [round_size(n) for n in (1, 512, 513, 1000, 1024)] == [512, 512, 1024, 1024, 1024]
    assert allocation_size(512) == 2 * MiB and allocation_size(1 * MiB) == 2 * MiB  # small pool
    assert allocation_size(1 * MiB + 512) == 20 * MiB and allocation_size(10 * MiB - 512) == 20 * MiB
    assert allocation_size(10 * MiB) == 10 * MiB and allocation_size(11 * MiB) == 12 * MiB


def test_small_pool_rounds_and_packs_into_one_2mib_segment():
    a = CachingAllocatorSim()
    assert a.malloc(0) is None and a.reserved_bytes == 0
    h1 = a.malloc(1)
    assert (a.allocated_bytes, a.reserved_bytes) == (512, 2 * MiB)
    a.malloc(1000)  # -> 1024, split from the same segment's remainder
    assert (a.allocated_bytes, a.reserved_bytes, a.requested_bytes) == (1536, 2 * MiB, 1001)
    a.malloc(1 * MiB)  # still small (<= 1 MiB), still fits the remainder
    assert (a.allocated_bytes, a.reserved_bytes) == (1536 + MiB, 2 * MiB)
    assert a.snapshot() == [(2 * MiB, True, [(512, True), (1024, True), (MiB, True), (MiB - 1536, False)])]
    a.free(h1)
    assert a.allocated_bytes == 1024 + MiB and a.peak_allocated_bytes == 1536 + MiB


def test_large_pool_segments_and_split_threshold():
    a = CachingAllocatorSim()
    a.malloc(1 * MiB + 1)  # 1 MiB + 512 -> large pool, a 20 MiB segment, remainder > 1 MiB: split
    assert (a.allocated_bytes, a.reserved_bytes) == (MiB + 512, 20 * MiB)
    b = CachingAllocatorSim()
    b.malloc(11 * MiB)  # own 12 MiB segment; remainder exactly 1 MiB is not > 1 MiB: whole block
    assert (b.allocated_bytes, b.requested_bytes, b.reserved_bytes) == (12 * MiB, 11 * MiB, 12 * MiB)
    c = CachingAllocatorSim()
    c.malloc(12 * MiB + 1)  # 14 MiB segment; remainder 2 MiB - 512 > 1 MiB: split
    assert (c.allocated_bytes, c.reserved_bytes) == (12 * MiB + 512, 14 * MiB)
    assert c.snapshot() == [(14 * MiB, False, [(12 * MiB + 512, True), (2 * MiB - 512, False)])]


def test_cached_block_reused_without_split_counts_whole_block():
    a = CachingAllocatorSim()
    h = a.malloc(4 * MiB)  # 20 MiB segment: 4 MiB allocated + 16 MiB free
    a.free(h)  # merges back into one free 20 MiB block
    assert a.snapshot() == [(20 * MiB, False, [(20 * MiB, False)])]
    a.malloc(19 * MiB + MiB // 2)  # remainder 0.5 MiB: not split, the request gets all 20 MiB
    assert (a.allocated_bytes, a.requested_bytes, a.reserved_bytes) == (20 * MiB, 19 * MiB + MiB // 2, 20 * MiB)
    assert len(a.segments) == 1


def test_best_fit_by_size_then_address():
    a = CachingAllocatorSim()
    x, y = a.malloc(12 * MiB), a.malloc(16 * MiB)  # two exact segments
    a.free(y), a.free(x)
    h = a.malloc(11 * MiB)  # smallest fitting block is x's 12 MiB; remainder 1 MiB: no split
    assert a.block_size(h) == 12 * MiB and a.reserved_bytes == 28 * MiB
    a.malloc(13 * MiB)  # the 16 MiB block; remainder 3 MiB: split
    assert a.allocated_bytes == 25 * MiB and a.reserved_bytes == 28 * MiB
    # equal sizes: the lower address wins
    s = CachingAllocatorSim()
    p, q = s.malloc(12 * MiB), s.malloc(12 * MiB)
    s.free(q), s.free(p)
    s.malloc(12 * MiB)
    assert [blocks[0][1] for _, _, blocks in s.snapshot()] == [True, False]
    # a request never comes from the other pool
    t = CachingAllocatorSim()
    t.free(t.malloc(4 * MiB))
    t.malloc(512)
    assert t.reserved_bytes == 22 * MiB


def test_free_merges_with_free_neighbours():
    a = CachingAllocatorSim()
    h1, h2, h3 = a.malloc(512), a.malloc(512), a.malloc(512)
    a.free(h1)
    a.free(h3)  # merges with the segment's free tail, not with h1 (h2 is in between)
    assert a.snapshot() == [(2 * MiB, True, [(512, False), (512, True), (2 * MiB - 1024, False)])]
    a.malloc(512)  # best fit: the 512-byte hole at the lowest address
    assert a.snapshot()[0][2][0] == (512, True)
    a = CachingAllocatorSim()
    h1, h2, h3 = a.malloc(512), a.malloc(512), a.malloc(512)
    a.free(h1), a.free(h3), a.free(h2)
    assert a.snapshot() == [(2 * MiB, True, [(2 * MiB, False)])]


def test_peaks_and_reset():
    a = CachingAllocatorSim()
    h = a.malloc(30 * MiB)
    a.free(h)
    assert (a.peak_allocated_bytes, a.peak_reserved_bytes, a.allocated_bytes, a.reserved_bytes) == (30 * MiB, 30 * MiB, 0, 30 * MiB)
    a.reset_peaks()
    assert (a.peak_allocated_bytes, a.peak_reserved_bytes) == (0, 30 * MiB)
    a.malloc(1)
    assert a.peak_allocated_bytes == 512 and a.peak_reserved_bytes == 32 * MiB


@pytest.mark.slow
def test_cuda_profile_peak_is_block_sizes(monkeypatch):
    T = 64
    ids = torch.randint(0, 256, (2, T))
    model = zoo.GPT(zoo.GPTConfig(n_layer=2, n_embd=64, n_head=4, block_size=T))
    new = memtune.profile(model, (ids, ids), target="H100")
    monkeypatch.setattr(StepRecorder, "_replay_cuda_allocator", lambda self: None)  # the 512-rounded sums
    old = memtune.profile(model, (ids, ids), target="H100")
    assert new.baseline_peak_bytes >= old.baseline_peak_bytes
    assert new.baseline_peak_bytes % 512 == 0
    for e_new, e_old in zip(new.timeline, old.timeline):
        assert e_new.peak_bytes >= e_old.peak_bytes and e_new.live_bytes >= e_old.live_bytes
        assert e_new.peak_bytes % 512 == 0
    assert [s.nbytes for s in new.storages] == [s.nbytes for s in old.storages] if hasattr(new, "storages") else True
