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
    mb = params["micro_batch_size"]  # None: the whole batch of 4
    opts = dict(optimizer="muon2", device="cpu", min_ns_steps=params["ns_steps"], max_ns_steps=params["ns_steps"],
                state_dtypes=(params["state_dtype"],), allow_microbatching=mb is not None)
    if mb is not None:
        opts["micro_batch_sizes"] = (mb,)
    try:
        memtune.plan(profile, BUDGET, params["planner"], **opts)
    except InfeasibleBudgetError:
        return False
    return True


@pytest.mark.slow
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


# ----------------------------------------------------------------------------- a study reused
def test_a_study_is_continued_only_by_the_same_sweep(tmp_path):
    """Rerunning with another budget or objective, or on another program's study of the same
    name, is refused before any trial runs (its "best" would answer another question)."""
    from memtune.errors import UsageError
    from memtune.sweep import DEFINITION_ATTR

    storage = f"sqlite:///{tmp_path / 'sweep.db'}"
    kw = dict(n_trials=0, storage=storage, steps_per_trial=2, device="cpu", study_name="t")
    study = memtune.sweep(build, budget=BUDGET, **kw)
    assert study.user_attrs[DEFINITION_ATTR]["budget_bytes"] == BUDGET
    # (Continuing with the same settings is test_sweep_interrupted_resumes_and_counts_infeasible.)
    with pytest.raises(UsageError, match="budget_bytes: the study has 1000000, this run 2000000"):
        memtune.sweep(build, budget=2 * BUDGET, **kw)
    with pytest.raises(UsageError, match="objectives: the study has \\['loss'\\], this run \\['loss', 'step_ms'\\]"):
        memtune.sweep(build, budget=BUDGET, objective=("loss", "step_ms"), **kw)
    with pytest.raises(UsageError, match="steps_per_trial"):
        memtune.sweep(build, budget=BUDGET, **{**kw, "steps_per_trial": 3})

    other = optuna.create_study(storage=storage, study_name="other")
    other.optimize(lambda trial: trial.suggest_float("x", 0, 1), n_trials=1)
    with pytest.raises(UsageError, match="1 trials that no memtune sweep made \\(parameters \\['x'\\]\\)"):
        memtune.sweep(build, budget=BUDGET, **{**kw, "study_name": "other"})


def test_time_to_loss_is_the_seconds_of_training_until_the_target(tmp_path):
    """objective='time_to_loss': each trial trains until the mean loss of the last
    report_every steps is at most target_loss and is worth the seconds its steps took; a
    target no trial reaches prunes every trial with the loss it reached."""
    from memtune.errors import UsageError

    kw = dict(budget=BUDGET, steps_per_trial=4, report_every=2, device="cpu", objective="time_to_loss")
    study = memtune.sweep(build, n_trials=2, storage=f"sqlite:///{tmp_path / 'a.db'}", target_loss=100.0, **kw)
    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert done and all(t.user_attrs["steps_to_loss"] == 2 and 0 < t.value < t.user_attrs["wall_s"] for t in done)
    missed = memtune.sweep(build, n_trials=1, storage=f"sqlite:///{tmp_path / 'b.db'}", target_loss=0.0, **kw)
    assert all(t.state == optuna.trial.TrialState.PRUNED and t.user_attrs["target_not_reached"] > 0
               for t in missed.trials if not t.user_attrs.get("infeasible"))
    with pytest.raises(UsageError, match="needs a finite target_loss"):
        memtune.sweep(build, n_trials=1, storage=f"sqlite:///{tmp_path / 'c.db'}", **kw)


# ----------------------------------------------------------------------------- workers that die
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

WORKER = Path(__file__).resolve().parent / "sweep_worker.py"


def _worker(*args):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    return subprocess.Popen([sys.executable, str(WORKER), *map(str, args)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


@pytest.mark.slow
def test_workers_started_together_on_a_fresh_sqlite_file_all_open_it(tmp_path):
    """Three workers create the same fresh SQLite study at once: none crashes on the table
    creation race ("table studies already exists", "UNIQUE constraint failed")."""
    storage = f"sqlite:///{tmp_path / 'fresh.db'}"
    procs = [_worker(storage, 1, "--open-only") for _ in range(3)]
    outs = [p.communicate(timeout=120)[0] for p in procs]
    assert [p.returncode for p in procs] == [0] * 3, outs
    assert len(optuna.get_all_study_summaries(storage)) == 1


@pytest.mark.slow
def test_a_sigkilled_worker_s_trial_is_retried_and_the_study_gets_exactly_n_trials(tmp_path):
    """Two workers start together on one fresh SQLite file; one is SIGKILLed inside a trial.
    The heartbeat fails its trial, RetryFailedTrialCallback queues it again, and the survivor
    finishes the study with exactly N finished trials (none left RUNNING, none extra)."""
    n = 4
    storage = f"sqlite:///{tmp_path / 'sweep.db'}"
    victim, survivor = _worker(storage, n), _worker(storage, n)
    deadline = time.time() + 120
    for line in victim.stdout:
        if line.startswith("trial "):
            victim.send_signal(signal.SIGKILL)
            break
        assert time.time() < deadline, "the victim never started a trial"
    victim.wait(timeout=30)
    out, _ = survivor.communicate(timeout=240)
    assert victim.returncode == -signal.SIGKILL
    assert survivor.returncode == 0, out
    study = optuna.load_study(study_name="w", storage=storage)
    states = [t.state for t in study.trials]
    finished = [t for t in study.trials if t.state in (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)]
    assert len(finished) == n, states
    assert optuna.trial.TrialState.RUNNING not in states and optuna.trial.TrialState.WAITING not in states
    # The victim died inside a trial: the heartbeat failed it and it was retried with the same parameters.
    failed = [t for t in study.trials if t.state == optuna.trial.TrialState.FAIL and not t.user_attrs.get("surplus")]
    retried = [t for t in finished if t.system_attrs.get("failed_trial") is not None]
    assert len(failed) == 1 and len(retried) == 1, states
    assert retried[0].params == failed[0].params
