"""memtune.sweep on SQLite: interrupted after its first trial that trains, then resumed; the
infeasible-trial count must match an independent re-check of every trial's parameters."""

from __future__ import annotations

import optuna
import pytest
import torch

import memtune
from memtune import zoo
from memtune.errors import InfeasibleBudgetError
from memtune.sweep import sweep_profile

BUDGET = 1_000_000  # fits int8/bf16 state with micro-batches 1-2; not fp32 state, nor the whole batch of 4
N_TRIALS = 6


def build():
    torch.manual_seed(0)
    cfg = zoo.GPTConfig(n_layer=2, n_embd=32, n_head=2, block_size=32)
    g = torch.Generator().manual_seed(0)
    data = [tuple(torch.randint(0, 256, (4, 32), generator=g) for _ in range(2)) for _ in range(4)]
    return zoo.GPT(cfg), data


def feasible_by_reference(profile, params) -> bool:
    """Re-derive feasibility with memtune.plan directly (not the sweep's helper)."""
    mb = params["micro_batch_size"]
    opts = dict(optimizer="muon2", device="cpu", min_ns_steps=params["ns_steps"], max_ns_steps=params["ns_steps"],
                state_dtypes=(params["state_dtype"],), allow_microbatching=mb < 4)
    if mb < 4:
        opts["micro_batch_sizes"] = (mb,)
    try:
        memtune.plan(profile, BUDGET, params["planner"], **opts)
    except InfeasibleBudgetError:
        return False
    return True


def test_sweep_interrupted_resumes_and_counts_infeasible(tmp_path):
    storage = f"sqlite:///{tmp_path / 'sweep.db'}"

    def stop_after_first_trained(study, trial):
        if trial.state == optuna.trial.TrialState.COMPLETE:
            raise KeyboardInterrupt

    kw = dict(budget=BUDGET, n_trials=N_TRIALS, storage=storage, steps_per_trial=2, report_every=1, device="cpu",
              study_name="t")
    with pytest.raises(KeyboardInterrupt):
        memtune.sweep(build, sampler=optuna.samplers.RandomSampler(seed=3), callbacks=[stop_after_first_trained], **kw)
    first = optuna.load_study(study_name="t", storage=storage)
    n_first = len(first.trials)
    assert 1 <= n_first < N_TRIALS

    study = memtune.sweep(build, sampler=optuna.samplers.RandomSampler(seed=4), **kw)  # resumes the same study
    finished = [t for t in study.trials if t.state in (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)]
    assert len(study.trials) == N_TRIALS == len(finished)

    model, data = build()
    profile = sweep_profile(model, data[0], device="cpu")  # what the sweep's checks are priced on
    expected = sum(1 for t in study.trials if not feasible_by_reference(profile, t.params))
    assert study.user_attrs["infeasible_pruned"] == expected
    assert expected == sum(1 for t in study.trials if t.user_attrs.get("infeasible"))
    for t in study.trials:
        if t.state == optuna.trial.TrialState.COMPLETE:
            plan = memtune.Plan.from_json(t.user_attrs["plan"])
            assert plan.predicted_peak_bytes <= BUDGET
    if expected and any(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials):
        assert study.user_attrs["device_seconds_saved"] > 0
