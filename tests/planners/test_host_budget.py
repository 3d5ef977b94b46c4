"""The host-memory budget (``host_budget``): what a plan pins in host memory (offloaded optimizer
state, offloaded activations) stays within it, the exact planner is still optimal under it, and
when the host is what does not fit, the error says so and how much would."""

from __future__ import annotations

import random

import pytest
from synthetic import chain_profile

import memtune
from memtune.budget import parse_host_budget
from memtune.devices import DeviceSpec
from memtune.errors import BudgetError, InfeasibleBudgetError
from memtune.levers import held_at_default
from memtune.plan import Decision
from memtune.budget import Budget
from memtune.planners import PLANNERS, REFERENCE_PLANNERS, PlannerOptions

ONLY_OFFLOAD = dict(allow_offload=True, levers=held_at_default(lambda lever: True))
"""Activation offload and nothing else (every lever at its default)."""
SLOW_COMPUTE = DeviceSpec(name="slow-compute", kind="cuda", memory_bytes=80 << 30, bf16_flops=2e8, fp32_flops=2e8,
                          mem_bandwidth=2e12)
"""A device on which recomputing costs more than offloading, so a host budget has something to trade."""


def offload_only_chain(n=6, seed=3):
    """A CUDA-target chain whose units cannot be recomputed: offload is the only way down."""
    return chain_profile(n, seed=seed, target_name="H100", scale=2**20, blocked=tuple(range(n)))


@pytest.mark.parametrize("planner", ["exact", "greedy"])
def test_offloaded_activations_stay_within_the_host_budget(planner):
    """Every plan returned under a host budget pins at most that much; every refusal names the
    host budget; and some budgets below what the unlimited plan pins still give a plan."""
    prof = chain_profile(8, seed=3, target_name="H100", scale=2**20)
    capped_ok = 0
    for frac in (0.7, 0.6, 0.55, 0.5):
        budget = int(prof.baseline_peak_bytes * frac)
        try:
            free = memtune.plan(prof, budget, planner, reserve=0, device=SLOW_COMPUTE, **ONLY_OFFLOAD)
        except InfeasibleBudgetError:
            continue   # below what this chain can reach at all
        offloaded = free.units_with(Decision.OFFLOAD)
        assert free.memory.host_bytes == sum(prof.unit(f).saved_activation_bytes for f in offloaded)
        for share in (1.0, 0.7, 0.4, 0.0):
            host = int(free.memory.host_bytes * share)
            try:
                p = memtune.plan(prof, budget, planner, reserve=0, device=SLOW_COMPUTE, **ONLY_OFFLOAD,
                                 host_budget=host)
            except InfeasibleBudgetError as e:
                assert "host_budget" in str(e)
                continue
            assert p.memory.host_bytes <= host and p.predicted_peak_bytes <= budget
            # No faster than the unlimited plan: up to the exact planner's proven gap on each.
            assert p.predicted_step_ms >= free.predicted_step_ms / (1 + PlannerOptions().mip_rel_gap) - 1e-9
            capped_ok += p.memory.host_bytes < free.memory.host_bytes
    assert capped_ok >= 2   # recomputation took over from offload where the host ran out
    assert "in host memory" in free.summary()


def test_exact_equals_brute_force_under_random_host_budgets():
    exact, brute = PLANNERS["exact"], REFERENCE_PLANNERS["brute"]
    rng = random.Random(0)
    compared = 0
    for seed in range(4):
        prof = offload_only_chain(n=5, seed=seed)
        for _ in range(4):
            budget = Budget.parse(int(prof.baseline_peak_bytes * rng.uniform(0.6, 0.95)), device="H100", reserve=0)
            options = PlannerOptions(**ONLY_OFFLOAD, host_budget=int(prof.saved_activation_bytes * rng.uniform(0, 0.6)))
            try:
                ref = brute.plan(prof, budget, options=options)
            except InfeasibleBudgetError:
                with pytest.raises(InfeasibleBudgetError):
                    exact.plan(prof, budget, options=options)
                continue
            got = exact.plan(prof, budget, options=options)
            assert got.memory.host_bytes <= options.host_budget and got.predicted_peak_bytes <= budget.usable_bytes
            assert ref.predicted_step_ms - 1e-9 <= got.predicted_step_ms <= ref.predicted_step_ms * (1 + options.mip_rel_gap)
            compared += 1
    assert compared >= 6


def test_a_host_budget_that_rules_out_every_fitting_plan_says_so():
    prof = offload_only_chain()
    budget = int(prof.baseline_peak_bytes * 0.6)
    free = memtune.plan(prof, budget, "exact", reserve=0, **ONLY_OFFLOAD)
    with pytest.raises(InfeasibleBudgetError) as e:
        memtune.plan(prof, budget, "exact", reserve=0, **ONLY_OFFLOAD, host_budget=free.memory.host_bytes // 4)
    msg = str(e.value)
    assert "host_budget" in msg and "pins" in msg and "a host budget of" in msg
    # the suggested host budget is enough
    need = int(e.value.suggestions[0].split("(")[1].split(" bytes")[0])
    assert memtune.plan(prof, budget, "exact", reserve=0, **ONLY_OFFLOAD, host_budget=need).memory.host_bytes <= need


def test_the_host_budget_is_ignored_on_a_cpu_target():
    prof = chain_profile(6, seed=1, target_name="cpu")
    budget = int(prof.baseline_peak_bytes * 0.7)
    a = memtune.plan(prof, budget, "exact", reserve=0)
    b = memtune.plan(prof, budget, "exact", reserve=0, host_budget=0)
    assert a.decisions == b.decisions and b.memory.host_bytes == 0


def test_host_budget_strings():
    assert parse_host_budget(None) is None and parse_host_budget("64GB") == 64 * 10**9
    assert parse_host_budget(0) == 0 and parse_host_budget(1 << 30) == 1 << 30
    assert 0 <= parse_host_budget("auto") and 0 < parse_host_budget("50%")
    with pytest.raises(BudgetError, match="host_budget 'lots' is not a size"):
        parse_host_budget("lots")
    with pytest.raises(BudgetError, match="host_budget"):
        memtune.plan(chain_profile(3, seed=0, target_name="H100"), "1GB", host_budget="-5GB")
