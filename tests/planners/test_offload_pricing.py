"""Activation offload's price (memtune.offload.exposed_offload_seconds): the copies overlap the
unit's own compute, so what the link adds is between nothing and the whole serial transfer, and
the planner prices OFFLOAD with it."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import memtune
from memtune import zoo
from memtune.cost_model import cost_table, device_for, host_bandwidth
from memtune.offload import exposed_offload_seconds
from memtune.plan import Decision


@pytest.fixture(scope="module")
def h100_profile():
    torch.manual_seed(0)
    model = zoo.GPT(zoo.GPTConfig(n_layer=4, n_embd=128, n_head=4, block_size=128))
    batch = tuple(torch.randint(0, 256, (8, 128)) for _ in range(2))
    return memtune.profile(model, batch, target="H100", space=memtune.PlanSpace.minimal())


def _serial(prof, u, bw):
    inputs = set(u.input_storages)
    return sum(prof.storages[s].nbytes for s in u.saved_storages if s not in inputs) / bw


def test_the_exposed_time_lies_between_nothing_and_the_serial_transfer(h100_profile):
    prof = h100_profile
    spec = device_for(prof, "H100")
    bw = host_bandwidth(spec)
    for u in prof.units:
        serial = _serial(prof, u, bw)
        assert serial > 0
        for compute in (1e-9, serial / 4, serial, 10 * serial):
            f, b = exposed_offload_seconds(prof, u, spec, forward_s=compute, backward_s=2 * compute, host_bw=bw)
            assert 0 <= f <= serial * (1 + 1e-9) and 0 <= b <= serial * (1 + 1e-9)
        # No compute to hide behind: all of it shows. Much more compute: the forward hides all but
        # the copies issued last, the backward all but what its first op waits for.
        f, b = exposed_offload_seconds(prof, u, spec, forward_s=1e-12, backward_s=2e-12, host_bw=bw)
        assert f == pytest.approx(serial, rel=1e-6) and b == pytest.approx(serial, rel=1e-6)
        f, b = exposed_offload_seconds(prof, u, spec, forward_s=100 * serial, backward_s=200 * serial, host_bw=bw)
        assert f < 0.5 * serial and b <= serial
        # Exposure never grows with compute.
        times = [sum(exposed_offload_seconds(prof, u, spec, forward_s=c * serial, backward_s=2 * c * serial,
                                             host_bw=bw)) for c in (0.1, 0.5, 1, 2, 8)]
        assert all(a >= b - 1e-15 for a, b in zip(times, times[1:]))


def test_without_a_per_op_record_each_direction_costs_the_whole_transfer(h100_profile):
    prof = h100_profile
    spec = device_for(prof, "H100")
    bw = host_bandwidth(spec)
    u = dataclasses.replace(prof.units[1], ops=())
    serial = _serial(prof, u, bw)
    assert exposed_offload_seconds(prof, u, spec, forward_s=1.0, backward_s=2.0, host_bw=bw) == (serial, serial)


def test_the_planner_prices_offload_at_its_exposed_time(h100_profile):
    prof = h100_profile
    spec = device_for(prof, "H100")
    table = cost_table(prof, device="H100")
    bw = host_bandwidth(spec)
    for u in prof.units:
        serial_ms = (2 * _serial(prof, u, bw) + 2 * spec.kernel_overhead_s) * 1e3
        assert table.offload_ms[u.fqn] <= serial_ms
    plan = memtune.plan(prof, 1 << 40, allow_activation_offload=True)
    off = dataclasses.replace(plan, decisions={u: Decision.OFFLOAD for u in plan.decisions})
    t = memtune.predict_step_time(prof, off, device="H100")
    assert t.offload_ms == pytest.approx(sum(table.offload_ms.values()))
