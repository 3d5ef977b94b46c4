"""Step-time pricing of a distributed plan (no processes launched): the optimizer on shards and
sharded Muon²'s owner-rank Newton-Schulz with its gathers and scatters."""

from __future__ import annotations

import pytest
import torch

import memtune
from memtune.distributed.muon import assign_owners, ns_layout_seconds
from memtune.distributed.planning import LINKS, plan_distributed
from memtune.zoo import GPT, GPTConfig


def test_balanced_owners_carry_no_more_than_round_robin_and_replication_does_all_the_work():
    # One big matrix and many small ones: round-robin puts the big one beside small ones.
    shapes = [(4096, 4096)] + [(256, 256)] * 7
    ns = [float(r * c * min(r, c)) for r, c in shapes]  # NS work ~ m·n·min(m, n)
    link = LINKS["nvlink"]
    balanced, comm = ns_layout_seconds(shapes, ns, 4, link, "balanced")
    robin, comm_rr = ns_layout_seconds(shapes, ns, 4, link, "round-robin")
    replicated, comm_rep = ns_layout_seconds(shapes, ns, 4, link, "replicated")
    assert balanced == pytest.approx(ns[0])  # the big matrix alone on its owner
    assert robin == pytest.approx(ns[0] + ns[4])  # rank 0 also gets matrix 4
    assert replicated == pytest.approx(sum(ns))
    assert comm == comm_rr  # a gather and a scatter per matrix, whoever owns it
    assert comm_rep == pytest.approx(comm / 2)  # an all-gather, no scatter
    # Gathers move (N-1)/N of each fp32 matrix (rows padded to a multiple of N) both ways.
    bw, hop = link.bandwidth_gbps * 1e9, link.latency_us * 1e-6 * 3
    expected = sum(2 * (0.75 * (-(-r // 4) * 4) * c * 4 / bw + hop) for r, c in shapes)
    assert comm == pytest.approx(expected)
    # assign_owners balances the NS FLOPs on equal shapes too: 8 equal matrices, 4 ranks, 2 each.
    assert sorted(assign_owners([(64, 64)] * 8, 4)) == [0, 0, 1, 1, 2, 2, 3, 3]


def test_a_sharded_plan_prices_the_optimizer_on_shards_and_ns_on_the_busiest_owner():
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=4, n_embd=64, n_head=2, block_size=32))
    x = torch.randint(0, 256, (4, 32))
    prof = memtune.profile(model, (x, x), optimizer="muon2", target="cpu", space=memtune.PlanSpace.minimal())
    one = memtune.plan(prof, 1 << 40, optimizer="muon2")
    fsdp = plan_distributed(prof, 1 << 40, world_size=2, strategies=("fsdp",), optimizer="muon2")
    ddp = plan_distributed(prof, 1 << 40, world_size=2, strategies=("ddp",), optimizer="muon2")
    assert fsdp.time.optimizer_ms == pytest.approx(one.time.optimizer_ms / 2)
    assert one.time.ns_ms / 2 <= fsdp.time.ns_ms < one.time.ns_ms  # 4 layers' matrices over 2 owners
    assert ddp.time.ns_ms == pytest.approx(one.time.ns_ms)  # replicated: every rank runs every NS
    # The gathers and scatters are in the collectives, and the step adds them up.
    assert fsdp.parallel.comm_ms > 0
    assert fsdp.predicted_step_ms == pytest.approx(fsdp.time.total_ms + fsdp.parallel.comm_ms)
    assert any("NS and gathers are priced" in n for n in fsdp.notes)
