"""Every registered lever passes the lever conformance suite (tests/levers/conformance.py)."""

from __future__ import annotations

import pytest

from conformance import (check_apply_remove_restores, check_json_round_trip, check_lossiness_tiers,
                         check_measured_peak, check_suggestion, profile)
from memtune.levers import LEVERS

NAMES = list(LEVERS)


@pytest.fixture(scope="module")
def cpu_profile():
    return profile("cpu")


@pytest.fixture(scope="module")
def h100_profile():
    return profile("H100")


@pytest.fixture(scope="module")
def h100_profiles(h100_profile):
    return [h100_profile, profile("H100", "activations")]


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_choices_round_trip_through_json(name, cpu_profile):
    check_json_round_trip(LEVERS[name], cpu_profile)


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_each_recorded_choice_measures_as_predicted_within_1_percent(name, cpu_profile, fidelity_rows):
    rows = []
    check_measured_peak(LEVERS[name], cpu_profile, rows)
    fidelity_rows.extend(dict(model="gpt", kind=f"lever:{lever}", optimizer=str(value), micro="", recompute=str(rc),
                              budget=None, predicted=pred, measured=meas, error=err)
                         for lever, value, rc, pred, meas, err in rows)


@pytest.mark.parametrize("name", NAMES)
def test_applying_then_removing_restores_the_model(name, cpu_profile):
    check_apply_remove_restores(LEVERS[name], cpu_profile)


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_declared_lossiness_is_honoured_by_the_tiers(name, h100_profile):
    check_lossiness_tiers(LEVERS[name], h100_profile)


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_its_suggestion_appears_where_it_would_make_the_budget_feasible(name, h100_profiles):
    check_suggestion(LEVERS[name], h100_profiles)
