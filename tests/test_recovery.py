"""The decision behind in-place recovery across ranks (memtune.distributed.recovery), without
torchrun: records exchanged through a store, and the one decision every rank takes from them.
The recovery itself runs under torchrun in tests/test_distributed.py and tests/test_hsdp.py."""

from __future__ import annotations

import json
import time

import pytest
import torch
import torch.distributed as dist

import memtune
from memtune.distributed import recovery
from memtune.errors import DistributedError, UsageError


def _record(rank: int, *, oom: bool = False, safe: bool = True, where: str = "in forward",
            error: str = "RuntimeError: Timed out waiting 5000ms for recv operation to complete") -> dict:
    return {"rank": rank, "oom": oom, "retry_safe": safe, "where": where, "peak": None,
            "error": "OutOfMemoryError: CUDA out of memory" if oom else error}


def test_an_oom_on_one_rank_with_every_rank_able_to_retry_is_recovered_in_place():
    assert recovery.decide([_record(0), _record(1, oom=True)]) is None


def test_no_oom_anywhere_is_raised_on_every_rank_with_every_ranks_error():
    reason = recovery.decide([_record(0), _record(1, error="ValueError: bad shape in my model")])
    assert "no rank ran out of memory" in reason
    assert "rank 1: ValueError: bad shape in my model" in reason and "rank 0: RuntimeError" in reason


def test_a_rank_past_its_optimizer_step_stops_in_place_recovery():
    reason = recovery.decide([_record(0, safe=False, where="after its optimizer step"), _record(1, oom=True)])
    assert "rank 0 after its optimizer step" in reason and "[1] ran out of memory" in reason


def test_records_come_back_in_rank_order_through_the_store():
    store = dist.HashStore()
    store.set(recovery._prefix(1) + "1", json.dumps(_record(1, oom=True)))
    got = recovery.exchange(store, 1, _record(0), rank=0, world=2, wait_s=5)
    assert [r["rank"] for r in got] == [0, 1] and got[1]["oom"]


def test_a_rank_that_never_reports_is_named_and_nothing_hangs():
    store = dist.HashStore()
    t0 = time.perf_counter()
    with pytest.raises(DistributedError, match=r"rank\(s\) \[1\] did not report within 0.2 s") as e:
        recovery.exchange(store, 1, _record(0), rank=0, world=2, wait_s=0.2)
    assert time.perf_counter() - t0 < 5
    assert "--max-restarts" in str(e.value)


@pytest.mark.parametrize("bad", [0, -1, "5", True])
def test_collective_timeout_must_be_positive_seconds(bad):
    with pytest.raises(UsageError, match="collective_timeout"):
        memtune.fit(torch.nn.Linear(4, 4), budget="1GB", collective_timeout=bad)


def test_the_step_deadline_is_a_no_op_without_a_process_group():
    assert not dist.is_initialized()
    with recovery.step_deadline(5.0):
        pass


def test_the_step_deadline_holds_inside_the_step_and_the_groups_own_timeout_comes_back():
    # In a process of its own: a process group initialized here would outlive the test.
    import subprocess
    import sys
    import textwrap

    code = textwrap.dedent("""
        from datetime import timedelta
        import torch.distributed as dist
        from memtune.distributed import recovery
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1, timeout=timedelta(seconds=77))
        pg = dist.group.WORLD
        assert recovery._backend_timeout(pg) == timedelta(seconds=77)
        with recovery.step_deadline(2.5):
            assert recovery._backend_timeout(pg) == timedelta(seconds=2.5)
        assert recovery._backend_timeout(pg) == timedelta(seconds=77)
        print("ok")
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]
