"""``memtune.sweep``: an Optuna search over what the planner leaves open, inside a memory budget.

    >>> study = memtune.sweep(build, budget="24GB", n_trials=50)            # sqlite:///memtune-sweep.db
    >>> study = memtune.sweep(build, budget="24GB", n_trials=50, objective=("loss", "step_ms"))
    >>> study.best_trials                                                    # the Pareto front

The planner already picks the fastest recompute set for a budget; what it cannot judge is
what changes the *maths*: Newton-Schulz steps (3-5), optimizer-state precision, the
micro-batch, the learning rate, and which planner to trust. Those form the search space.

Every trial is planned on the model's profile before it trains. A configuration no plan
fits (:class:`~memtune.errors.InfeasibleBudgetError`) is pruned without running: such
trials carry the user attribute ``infeasible=True``, and the study's user attributes
``infeasible_pruned`` and ``device_seconds_saved`` (that count times the mean wall time of
the trials that ran) say how much they saved. A trial that runs out of memory while
training is pruned too (``oom=True``). Intermediate losses go to ``trial.report``, so
Optuna's pruners work (single objective only: Optuna does not prune multi-objective trials).

Storage defaults to the SQLite file ``memtune-sweep.db`` with ``load_if_exists=True``:
run the same call again after a kill and the study resumes; run it from several processes
and they share the study. ``optuna-dashboard sqlite:///memtune-sweep.db`` shows it live.
"""

from __future__ import annotations

import inspect
import itertools
import math
import statistics
import sys
import time
import types
from typing import Any, Callable, Iterable, Sequence

import optuna

from .errors import InfeasibleBudgetError, MemtuneError

DEFAULT_STORAGE = "sqlite:///memtune-sweep.db"
NS_STEPS = (3, 5)
STATE_DTYPES = ("fp32", "bf16", "int8")
PLANNERS = ("exact", "greedy")
LR_RANGE = (1e-3, 1e-1)
OBJECTIVES = ("loss", "step_ms")


def suggest(trial: optuna.Trial, *, batch_size: int | None) -> dict[str, Any]:
    """The search space. Micro-batches are the divisors of the profiled batch (whole batch
    = no gradient accumulation)."""
    params = {
        "ns_steps": trial.suggest_int("ns_steps", *NS_STEPS),
        "state_dtype": trial.suggest_categorical("state_dtype", STATE_DTYPES),
        "planner": trial.suggest_categorical("planner", PLANNERS),
        "lr": trial.suggest_float("lr", *LR_RANGE, log=True),
    }
    if batch_size:
        params["micro_batch_size"] = trial.suggest_categorical(
            "micro_batch_size", tuple(d for d in range(1, batch_size + 1) if batch_size % d == 0))
    return params


def sweep_profile(model, sample, *, loss_fn=None, device: str = "cpu"):
    """The profile every trial's feasibility check uses. It records every configuration the
    search space can ask for (:class:`memtune.PlanSpace`), with the optimizer settings the
    trials train with, so that each check is measured."""
    import memtune
    from memtune.batching import batch_size_of
    from memtune.optim import OptimizerSettings

    B = batch_size_of(sample)
    space = memtune.PlanSpace(ns_steps=tuple(range(NS_STEPS[0], NS_STEPS[1] + 1)), state_dtypes=STATE_DTYPES,
                              micro_batch_sizes=tuple(d for d in range(1, B) if B % d == 0) if B else ())
    return memtune.profile(model, sample, loss_fn=loss_fn, target=device, space=space,
                           optimizer=OptimizerSettings(name="muon2", ns_dtype=_ns_dtype(device)))


def _ns_dtype(device: str) -> str:
    """bf16 Newton-Schulz on GPUs; fp32 on CPUs without fast bf16 matmul (as memtune.fit chooses)."""
    return "bf16" if device.startswith("cuda") else "fp32"


def planner_options(params: dict[str, Any], batch_size: int | None, device: str | None) -> dict[str, Any]:
    """The :func:`memtune.plan` options a trial's parameters pin down."""
    opts: dict[str, Any] = dict(optimizer="muon2", min_ns_steps=params["ns_steps"], max_ns_steps=params["ns_steps"],
                                state_dtypes=(params["state_dtype"],))
    mb = params.get("micro_batch_size")
    if mb is not None and batch_size:
        opts["allow_microbatching"] = mb < batch_size
        if mb < batch_size:
            opts["micro_batch_sizes"] = (mb,)
    if device == "cpu":
        opts["device"] = "cpu"
    return opts


def is_feasible(profile, budget, params: dict[str, Any], *, device: str | None = None) -> bool:
    """Whether :func:`memtune.plan` finds a plan for these trial parameters (what the sweep
    checks before running a trial; public so a test or a user can recompute it)."""
    import memtune

    try:
        memtune.plan(profile, budget, params["planner"], **planner_options(params, profile.batch_size, device))
    except InfeasibleBudgetError:
        return False
    return True


def _unpack(built: Any) -> tuple[Any, Iterable, Callable | None]:
    if isinstance(built, dict):
        data = built.get("data")
        if data is None and built.get("sample") is not None:
            data = itertools.repeat(built["sample"])
        return built["model"], data, built.get("loss_fn")
    if isinstance(built, tuple) and len(built) in (2, 3):
        model, data, *rest = built
        return model, data, (rest[0] if rest else None)
    raise MemtuneError(f"build_fn returned {type(built).__name__}; return (model, data), (model, data, loss_fn) "
                       f"or a dict with keys model, data (or sample), loss_fn")


def _call(build_fn: Callable, params: dict[str, Any]):
    return build_fn(params) if inspect.signature(build_fn).parameters else build_fn()


def sweep(build_fn: Callable[..., Any], *, budget: int | str, n_trials: int, study: optuna.Study | None = None,
          storage: str | optuna.storages.BaseStorage | None = None, sampler: optuna.samplers.BaseSampler | None = None,
          pruner: optuna.pruners.BasePruner | None = None, objective: str | Sequence[str] = "loss",
          steps_per_trial: int = 30, report_every: int = 5, study_name: str = "memtune-sweep",
          directions: Sequence[str] | None = None, device: str | None = None,
          callbacks: Sequence[Callable] | None = None) -> optuna.Study:
    """Search NS steps, state precision, planner, learning rate and micro-batch within ``budget``.

    Args:
        build_fn: called once per trial, with no arguments or with the trial's parameters
            (a dict: ``ns_steps``, ``state_dtype``, ``planner``, ``lr``, ``micro_batch_size``);
            returns ``(model, data)``, ``(model, data, loss_fn)`` or a dict with keys
            ``model``, ``data`` (or ``sample``), ``loss_fn``. ``data`` is an iterable of
            batches; its first batch is the profiling sample. Build a fresh model each call.
        budget: as for :func:`memtune.fit` (``"24GB"``, bytes...).
        n_trials: the number of finished (complete or pruned) trials the study should hold:
            a resumed study runs only the remainder.
        study: an existing :class:`optuna.Study` (then ``storage``, ``sampler``, ``pruner``,
            ``study_name`` and ``directions`` are not used).
        storage: Optuna storage; ``None``: ``sqlite:///memtune-sweep.db``.
        sampler, pruner: Optuna's; ``None``: Optuna's defaults.
        objective: ``"loss"`` (mean training loss over the last quarter of the steps) or
            ``("loss", "step_ms")`` (adds the median measured step time: a Pareto front).
        steps_per_trial: optimizer steps each trial trains.
        report_every: report the running loss to ``trial.report`` every this many steps.
        directions: ``None``: minimize every objective.
        device: ``None``: CUDA when present, else CPU.
        callbacks: passed to :meth:`optuna.Study.optimize`.
    """
    import torch

    import memtune
    from memtune.optim import OptimizerSettings

    objectives = (objective,) if isinstance(objective, str) else tuple(objective)
    bad = [o for o in objectives if o not in OBJECTIVES]
    if bad or not objectives:
        raise ValueError(f"objective={objective!r}: use 'loss' or ('loss', 'step_ms')")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if study is None:
        study = optuna.create_study(storage=storage or DEFAULT_STORAGE, sampler=sampler, pruner=pruner,
                                    study_name=study_name, load_if_exists=True,
                                    directions=list(directions or ["minimize"] * len(objectives)))
    multi = len(study.directions) > 1

    # One profile serves every trial's feasibility check: the trial parameters only change
    # planner options, never the traced step.
    model, data, loss_fn = _unpack(_call_default(build_fn))
    sample = next(iter(data))
    profile = sweep_profile(model, sample, loss_fn=loss_fn, device=device)
    del model

    def run_trial(trial: optuna.Trial):
        params = suggest(trial, batch_size=profile.batch_size)
        if not is_feasible(profile, budget, params, device=device):
            trial.set_user_attr("infeasible", True)
            raise optuna.TrialPruned(f"no plan fits {budget} with {params}")
        plan = memtune.plan(profile, budget, params["planner"], **planner_options(params, profile.batch_size, device))
        trial.set_user_attr("plan", plan.to_json(indent=None))
        trial.set_user_attr("predicted_step_ms", plan.predicted_step_ms)
        model, data, loss_fn = _unpack(_call(build_fn, params))
        settings = OptimizerSettings(name="muon2", lr=params["lr"], ns_steps=params["ns_steps"],
                                     state_dtype=params["state_dtype"], ns_dtype=_ns_dtype(device))
        opts = planner_options(params, profile.batch_size, device)
        allow_mb = opts.pop("allow_microbatching", False)
        opts.pop("optimizer")
        t0 = time.perf_counter()
        losses, step_ms = [], []
        try:
            trainer = memtune.fit(model, budget, sample=sample, loss_fn=loss_fn, optimizer="muon2",
                                  optimizer_settings=settings, planner=params["planner"], device=device,
                                  allow_microbatching=allow_mb, planner_options=opts, progress=False)
            for step, batch in enumerate(itertools.islice(data, steps_per_trial)):
                losses.append(trainer.step(batch))
                step_ms.append(trainer.history[-1]["step_ms"])
                if not math.isfinite(losses[-1]):
                    raise optuna.TrialPruned(f"loss diverged at step {step}")
                if not multi and (step + 1) % report_every == 0:
                    trial.report(statistics.fmean(losses[-report_every:]), step)
                    if trial.should_prune():
                        raise optuna.TrialPruned(f"pruned by {type(study.pruner).__name__} at step {step}")
        except (torch.OutOfMemoryError, InfeasibleBudgetError) as e:
            trial.set_user_attr("oom", True)
            raise optuna.TrialPruned(f"out of memory while training: {str(e).splitlines()[0][:200]}") from e
        finally:
            trial.set_user_attr("wall_s", time.perf_counter() - t0)
        if not losses:
            raise MemtuneError("build_fn's data yielded no batches; give an iterable of at least steps_per_trial batches")
        tail = losses[-max(1, len(losses) // 4):]
        loss, ms = statistics.fmean(tail), statistics.median(step_ms)
        trial.set_user_attr("step_ms", ms)
        values = {"loss": loss, "step_ms": ms}
        return tuple(values[o] for o in objectives) if multi else values[objectives[0]]

    finished = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
    remaining = n_trials - len(study.get_trials(deepcopy=False, states=finished))
    try:
        if remaining > 0:
            cbs = [optuna.study.MaxTrialsCallback(n_trials, states=finished), *(callbacks or [])]
            study.optimize(run_trial, n_trials=remaining, callbacks=cbs)
    finally:
        _record_savings(study)
    return study


def _call_default(build_fn: Callable):
    """build_fn with default parameters (for the profiling sample)."""
    defaults = {"ns_steps": NS_STEPS[0], "state_dtype": "fp32", "planner": "exact", "lr": 0.02, "micro_batch_size": None}
    return _call(build_fn, defaults)


def _record_savings(study: optuna.Study) -> None:
    """Count the trials pruned as infeasible and estimate the device time they saved, from
    the storage (so the counts stay right across resumes and workers)."""
    trials = study.get_trials(deepcopy=False)
    infeasible = sum(1 for t in trials if t.user_attrs.get("infeasible"))
    ran = [t.user_attrs["wall_s"] for t in trials if t.state == optuna.trial.TrialState.COMPLETE and "wall_s" in t.user_attrs]
    study.set_user_attr("infeasible_pruned", infeasible)
    study.set_user_attr("device_seconds_saved", infeasible * (statistics.fmean(ran) if ran else 0.0))


class _CallableModule(types.ModuleType):
    """``import memtune.sweep`` binds this module over the package's ``memtune.sweep`` function;
    calling the module calls the function, so ``memtune.sweep(...)`` works either way."""

    def __call__(self, *args, **kwargs):
        return sweep(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
