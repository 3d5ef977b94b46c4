"""The ``memtune.planning`` front end: default planner, greedy fallback, options, Pareto frontier."""

from __future__ import annotations

import logging

import pytest

from memtune.planners.options import PlannerOptions

from memtune.planning import pareto, plan
from synthetic import chain_profile


def test_default_is_exact_and_large_profiles_fall_back_to_greedy_with_a_note(caplog):
    prof = chain_profile(6, 2)
    budget = int(prof.baseline_peak_bytes * 0.7)
    assert plan(prof, budget, optimizer="adamw").planner == "exact"
    with caplog.at_level(logging.WARNING, logger="memtune.planning"):
        p = plan(prof, budget, optimizer="adamw", max_exact_units=3)
    assert p.planner == "greedy" and "greedy" in p.notes[0] and "max_exact_units" in caplog.text


def test_unknown_options_and_planners_are_rejected():
    prof = chain_profile(3, 0)
    with pytest.raises(TypeError, match="valid options"):
        plan(prof, "1GB", alow_offload=True)
    with pytest.raises(ValueError, match="choose one of"):
        plan(prof, "1GB", planner="magic")


def test_cpu_budget_has_no_reserve_and_parses_strings():
    prof = chain_profile(3, 0)
    p = plan(prof, "1GB", optimizer="adamw")
    assert p.budget_bytes == p.usable_bytes == 10**9 and p.target == "cpu"


@pytest.mark.parametrize("planner", ["exact", "greedy"])
def test_pareto_frontier_trades_memory_for_time(planner):
    prof = chain_profile(5, 4)
    front = pareto(prof, planner, optimizer="adamw", state_dtypes=("fp32",))
    assert len(front) >= 2
    peaks = [p.predicted_peak_bytes for p in front]
    times = [p.predicted_step_ms for p in front]
    assert peaks == sorted(peaks, reverse=True) and len(set(peaks)) == len(peaks)
    assert all(a < b for a, b in zip(times, times[1:]))  # strictly: dominated points are dropped
    if planner == "exact":  # each point is the optimum for its own peak, up to the MILP's proven gap
        gap = PlannerOptions().mip_rel_gap
        for p in front:
            assert plan(prof, p.predicted_peak_bytes, optimizer="adamw",
                        state_dtypes=("fp32",)).predicted_step_ms == pytest.approx(p.predicted_step_ms, rel=gap)


def test_greedy_falls_back_to_the_min_peak_plan_when_its_search_fails(monkeypatch):
    """If local search misses (simulated here), greedy still returns a fitting plan, with a note."""
    from memtune.budget import Budget
    from memtune.planners import PLANNERS, PlannerOptions
    import memtune.planners.greedy as greedy

    prof = chain_profile(4, 7)
    opts = PlannerOptions(optimizer="adamw", state_dtypes=("fp32",))
    from memtune.planners.infeasible import most_frugal_plan

    tight = most_frugal_plan(prof, Budget.parse(prof.baseline_peak_bytes, device="cpu"), opts).predicted_peak_bytes
    monkeypatch.setattr(greedy, "greedy_decisions", lambda *a, **k: None)  # min-peak uses the MILP at this size
    p = PLANNERS["greedy"].plan(prof, Budget.parse(tight, device="cpu"), options=opts)
    assert p.fits and p.planner == "greedy" and "most memory-frugal" in p.notes[0]
