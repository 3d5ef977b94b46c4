"""A lever added in a test is one new file (tests/levers/dummy_lever.py) plus one registry line,
and the whole library takes it: the profiler records it, both planners choose it, apply_plan
applies it (and it passes the conformance suite), the CLI and the sweep list it. No library
file knows it exists."""

from __future__ import annotations

import json

import optuna
import pytest

import memtune
from conformance import (batch, check_apply_remove_restores, check_json_round_trip, check_lossiness_tiers,
                         check_measured_peak, check_suggestion, fresh, min_feasible, profile)
from dummy_lever import FreezeEmbeddingsLever, embedding_parameters
from memtune.levers import LEVERS
from memtune.variant import StepVariant

@pytest.fixture(scope="module")
def lever():
    dummy = FreezeEmbeddingsLever()
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(LEVERS, dummy.name, dummy)  # the registry line
        yield dummy


@pytest.fixture(scope="module")
def cpu_profile(lever):
    return profile("cpu")


@pytest.fixture(scope="module")
def h100_profiles(lever):
    """The planner-side checks hold every other lever at its default: only the dummy recorded."""
    return [profile("H100", only=(lever.name,)), profile("H100", "activations", only=(lever.name,))]


@pytest.mark.slow
def test_the_profiler_records_it(lever, cpu_profile):
    frozen = StepVariant(freeze_embeddings=True)
    assert frozen in cpu_profile.recorded_variants
    assert any(o.variant == frozen for o in cpu_profile.optimizer_steps)
    recording = cpu_profile.recording(frozen)
    tables = sum(p.param_bytes for p in cpu_profile.params if p.fqn in embedding_parameters(fresh()))
    assert recording.grad_bytes == cpu_profile.grad_bytes - tables  # measured: no gradient for the tables
    plain = cpu_profile.optimizer_step("adamw", "fp32", 0)
    assert cpu_profile.optimizer_step("adamw", "fp32", 0, frozen).state_bytes < plain.state_bytes


@pytest.mark.slow
def test_both_planners_choose_it_where_nothing_else_fits(lever, cpu_profile):
    without = min_feasible(cpu_profile, levers={lever.name: (False,)}, allow_microbatching=True)
    best = min_feasible(cpu_profile, allow_microbatching=True)
    assert best < without
    for planner in ("exact", "greedy"):
        plan = memtune.plan(cpu_profile, (best + without) // 2, planner, allow_microbatching=True)
        assert plan.freeze_embeddings and plan.predicted_peak_bytes <= (best + without) // 2
        assert "embedding tables frozen" in plan.summary()
    roomy = memtune.plan(cpu_profile, 1 << 40)
    assert not roomy.freeze_embeddings  # lossy: never taken when something more exact fits


@pytest.mark.slow
def test_apply_plan_applies_it_and_it_passes_the_conformance_suite(lever, cpu_profile, h100_profiles):
    plan = memtune.plan(cpu_profile, 1 << 40, levers={lever.name: (True,)})
    model = fresh()
    memtune.apply_plan(model, plan)
    frozen = embedding_parameters(model)
    assert frozen and all(not p.requires_grad for n, p in model.named_parameters() if n in frozen)
    x, y = batch()
    model(x, y).backward()
    assert all(p.grad is None for n, p in model.named_parameters() if n in frozen)
    memtune.remove_plan(model)
    assert all(p.requires_grad for p in model.parameters())
    for check in (check_json_round_trip, check_measured_peak, check_apply_remove_restores):
        check(lever, cpu_profile)
    check_lossiness_tiers(lever, h100_profiles[0])
    check_suggestion(lever, h100_profiles)


@pytest.mark.slow
def test_the_cli_and_the_sweep_list_it(lever, cpu_profile, tmp_path, capsys):
    from memtune import cli
    from memtune.sweep import planner_options, suggest

    with pytest.raises(SystemExit):
        cli.main(["plan", "--help"])
    assert "freeze_embeddings" in capsys.readouterr().out
    cpu_profile.to_json(tmp_path / "profile.json")
    assert cli.main(["plan", "--profile", str(tmp_path / "profile.json"), "--budget", str(1 << 40),
                     "--lever", "freeze_embeddings=true", "--out", str(tmp_path / "plan.json")]) == 0
    plan = memtune.Plan.from_json(tmp_path / "plan.json")
    assert plan.freeze_embeddings and json.loads((tmp_path / "plan.json").read_text())["variant"] == {
        "freeze_embeddings": True}
    trial = optuna.create_study().ask()
    params = suggest(trial, cpu_profile)
    assert params["freeze_embeddings"] in (False, True)
    assert planner_options(params)["levers"]["freeze_embeddings"] == (params["freeze_embeddings"],)
