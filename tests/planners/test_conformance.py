"""Conformance suite every planner in PLANNERS must pass: the plan fits the budget it was
given (as predict_peak sees it), round-trips through JSON, is deterministic, and is
never beaten by brute force (exact: equal to it). Greedy must find a plan whenever exact does."""

from __future__ import annotations

import random

import pytest

from memtune.budget import Budget
from memtune.errors import InfeasibleBudgetError
from memtune.memory_model import predict_peak
from memtune.plan import Plan
from memtune.planners import PLANNERS, REFERENCE_PLANNERS, PlannerOptions
from synthetic import chain_profile

FRACTIONS = (1.0, 0.8, 0.6, 0.45, 0.3)
OPTIONS = {
    "adamw-fp32": PlannerOptions(optimizer="adamw", state_dtypes=("fp32",)),
    "muon2-all": PlannerOptions(optimizer="muon2", allow_offload=True, allow_microbatching=True),
}


def _instances(max_units: int = 4):
    """Small random chains; odd seeds target an H100 so that OFFLOAD is in play. Every unit has
    up to four selective save sets besides SAVE, RECOMPUTE (and OFFLOAD): brute force takes up
    to 7^N plans per configuration, so it gets chains of at most three units."""
    for seed in range(6):
        target = "H100" if seed % 2 else "cpu"
        yield f"chain{seed}-{target}", lambda seed=seed, t=target: chain_profile(
            min(max_units, random.Random(seed).randint(2, 4)), seed, target_name=t)


def _budget(prof, frac: float) -> Budget:
    return Budget.parse(int(prof.baseline_peak_bytes * frac), device=prof.target_name, reserve=0)


def _try(planner, profile, budget, options):
    try:
        return planner.plan(profile, budget, options=options)
    except InfeasibleBudgetError as e:
        return e


@pytest.mark.slow
@pytest.mark.parametrize("planner_name", sorted(PLANNERS))
@pytest.mark.parametrize("opt_name", sorted(OPTIONS))
def test_plans_fit_roundtrip_and_are_deterministic(planner_name, opt_name, profile_of):
    planner, options = PLANNERS[planner_name], OPTIONS[opt_name]
    profiles = [make() for _, make in _instances()] + [profile_of("gpt")]
    n_plans = 0
    for prof in profiles:
        for frac in FRACTIONS:
            budget = _budget(prof, frac)
            plan = _try(planner, prof, budget, options)
            if isinstance(plan, InfeasibleBudgetError):
                assert plan.min_feasible_bytes > budget.budget_bytes
                continue
            n_plans += 1
            assert plan.fits and plan.predicted_peak_bytes <= budget.usable_bytes
            assert predict_peak(prof, plan).peak_bytes == plan.predicted_peak_bytes
            assert set(plan.decisions) == set(prof.unit_fqns)
            assert plan.planner == planner_name and plan.profile_hash == prof.fingerprint
            assert Plan.from_json(plan.to_json()) == plan
            assert planner.plan(prof, budget, options=options) == plan  # deterministic
    assert n_plans >= len(profiles)  # at least the 100% budget always fits


@pytest.mark.slow
@pytest.mark.parametrize("opt_name", sorted(OPTIONS))
def test_exact_equals_brute_force_and_greedy_finds_a_plan_whenever_exact_does(opt_name):
    options = OPTIONS[opt_name]
    exact, greedy, brute = PLANNERS["exact"], PLANNERS["greedy"], REFERENCE_PLANNERS["brute"]
    compared = 0
    for name, make in _instances(max_units=3):
        prof = make()
        for frac in FRACTIONS:
            budget = _budget(prof, frac)
            e, b, g = (_try(p, prof, budget, options) for p in (exact, brute, greedy))
            assert isinstance(e, Exception) == isinstance(b, Exception), (name, frac)
            if isinstance(e, Exception):
                assert isinstance(g, Exception)
                assert e.min_feasible_bytes == b.min_feasible_bytes
                continue
            compared += 1
            # Equal up to the MILP's proven gap (PlannerOptions.mip_rel_gap, relative to the step time).
            assert b.predicted_step_ms - 1e-9 <= e.predicted_step_ms <= b.predicted_step_ms * (1 + options.mip_rel_gap)
            assert not isinstance(g, Exception), f"greedy found no plan for {name} at {frac} where exact did"
            assert g.predicted_step_ms >= e.predicted_step_ms - 1e-9
    assert compared >= 10


def test_infeasible_budget_min_feasible_is_tight():
    """Planning at the reported minimum succeeds; one byte less does not."""
    prof = chain_profile(4, 11)
    options = OPTIONS["adamw-fp32"]
    with pytest.raises(InfeasibleBudgetError) as info:
        PLANNERS["exact"].plan(prof, Budget.parse(int(prof.baseline_peak_bytes * 0.2), device="cpu"), options=options)
    mf = info.value.min_feasible_bytes
    for name, planner in PLANNERS.items():
        assert planner.plan(prof, Budget.parse(mf, device="cpu"), options=options).predicted_peak_bytes <= mf
    with pytest.raises(InfeasibleBudgetError):
        PLANNERS["exact"].plan(prof, Budget.parse(mf - 1, device="cpu"), options=options)
    assert info.value.top_consumers and info.value.suggestions
