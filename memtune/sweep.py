"""``memtune.sweep``: an Optuna search over what the planner leaves open, inside a memory budget.

    >>> study = memtune.sweep(build, budget="24GB", n_trials=50)            # sqlite:///memtune-sweep.db
    >>> study = memtune.sweep(build, budget="24GB", n_trials=50, objective=("loss", "step_ms"))
    >>> study.best_trials                                                    # the Pareto front

The planner already picks the fastest recompute set for a budget; what it cannot judge is
what changes the *maths*: Newton-Schulz steps (3-5), optimizer-state precision, the learning
rate, which planner to trust, and every lever marked searchable (:mod:`memtune.levers`; today
the micro-batch, over the sizes the profile records). Those form the search space. Everything
else stays the planner's, exactly as ``memtune plan`` and ``memtune fit`` leave it: lossless
levers (recompute, the optimizer step in backward) are its to choose, and the other lossy ones
(bf16 weights, a chunked loss) it takes only when nothing more exact fits
(:attr:`~memtune.planners.PlannerOptions.prefer_lossless`). So one model and one budget have
one minimum, whichever command is asked; a trial records its plan's step variant
(the user attribute ``plan_variant``) so that trials that needed a lossy lever can be told apart.

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

Workers that die are survived (:func:`open_study`): a storage URL opens an Optuna
``RDBStorage`` with a heartbeat (``heartbeat_interval``, ``grace_period``), so a trial
whose worker was killed is marked FAIL once its heartbeat goes stale and
``RetryFailedTrialCallback`` queues it again with the same parameters for a live worker.
Several workers may create the same fresh SQLite file at once: the creation runs under a
file lock. The study stops at exactly ``n_trials`` finished trials, however many workers
share it: ``MaxTrialsCallback`` stops each worker, and a trial that a race started beyond
the total is failed at once, before training, with the user attribute ``surplus=True``.
A budget that no configuration of the search space fits raises
:class:`~memtune.errors.InfeasibleBudgetError` with the minimum feasible budget before
any trial runs.
"""

from __future__ import annotations

import contextlib
import inspect
import itertools
import math
import statistics
import sys
import time
import types
import warnings
from typing import Any, Callable, Iterable, Sequence

import optuna

from .errors import InfeasibleBudgetError, MemtuneError, UsageError
from .optimizers import STATE_DTYPES

DEFAULT_STORAGE = "sqlite:///memtune-sweep.db"
NS_STEPS = (3, 5)
LR_RANGE = (1e-3, 1e-1)
OBJECTIVES = ("loss", "step_ms", "time_to_loss")
HEARTBEAT_S = 60
"""Default seconds between a running trial's heartbeats; a trial silent for ``2 x`` this is failed and retried."""
FINISHED = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)


class _Surplus(Exception):
    """A trial that a race between workers started beyond ``n_trials``: failed before it trains."""


@contextlib.contextmanager
def _file_lock(path: str):
    """An exclusive lock on ``path`` (created if needed), held for the ``with`` block."""
    import fcntl

    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def open_storage(url: str, *, heartbeat_interval: int | None = HEARTBEAT_S, grace_period: int | None = None,
                 max_retry: int | None = 3) -> optuna.storages.BaseStorage:
    """An Optuna ``RDBStorage`` for ``url`` with a heartbeat and retries of killed workers'
    trials (``RetryFailedTrialCallback``). A fresh SQLite file is created under a file lock
    (``<file>.lock``), so workers started together do not race on its tables; SQLite waits
    up to a minute for a lock instead of failing. Raises :class:`UsageError` for a URL it
    cannot open."""
    from optuna.storages import RDBStorage

    kw: dict[str, Any] = {}
    if heartbeat_interval:
        # Optuna 4.9 renamed RetryFailedTrialCallback/failed_trial_callback to the "heartbeat stale" names.
        retry = getattr(optuna.storages, "RetryHeartbeatStaleTrialCallback", None) or optuna.storages.RetryFailedTrialCallback
        params = inspect.signature(RDBStorage.__init__).parameters
        cb = "heartbeat_stale_trial_callback" if "heartbeat_stale_trial_callback" in params else "failed_trial_callback"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            kw = dict(heartbeat_interval=int(heartbeat_interval), grace_period=int(grace_period or 2 * heartbeat_interval),
                      **{cb: retry(max_retry=max_retry)})
    sqlite = url.startswith("sqlite:///") and url != "sqlite:///:memory:"
    engine_kwargs = {"connect_args": {"timeout": 60}} if sqlite else None
    lock = _file_lock(url[len("sqlite:///"):] + ".lock") if sqlite else contextlib.nullcontext()
    try:
        with lock, warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return RDBStorage(url, engine_kwargs=engine_kwargs, **kw)
    except (ImportError, ValueError, OSError) as e:
        raise UsageError(f"cannot open Optuna storage {url!r} ({type(e).__name__}: {str(e).splitlines()[0][:200]}); "
                         f"give sqlite:///path/to/file.db or a database URL SQLAlchemy can open") from e
    except Exception as e:  # SQLAlchemy's ArgumentError, OperationalError... without importing sqlalchemy here
        if type(e).__module__.startswith("sqlalchemy"):
            raise UsageError(f"cannot open Optuna storage {url!r} ({type(e).__name__}: "
                             f"{str(e).splitlines()[0][:200]}); give sqlite:///path/to/file.db or a database URL "
                             f"SQLAlchemy can open") from e
        raise


def open_study(storage: str | optuna.storages.BaseStorage | None, *, study_name: str, directions: Sequence[str],
               sampler=None, pruner=None, heartbeat_interval: int | None = HEARTBEAT_S,
               grace_period: int | None = None, definition: dict[str, Any] | None = None) -> optuna.Study:
    """Create or load the study (``load_if_exists``), safely when several workers start at once.
    With ``definition``, a loaded study must be one of the same sweep (:func:`check_study_definition`)."""
    if storage is None or isinstance(storage, str):
        url = storage or DEFAULT_STORAGE
        storage = open_storage(url, heartbeat_interval=heartbeat_interval, grace_period=grace_period)
        sqlite = url.startswith("sqlite:///") and url != "sqlite:///:memory:"
        lock = _file_lock(url[len("sqlite:///"):] + ".lock") if sqlite else contextlib.nullcontext()
    else:
        lock = contextlib.nullcontext()
    with lock:
        study = optuna.create_study(storage=storage, sampler=sampler, pruner=pruner, study_name=study_name,
                                    load_if_exists=True, directions=list(directions))
        if definition is not None:
            check_study_definition(study, {**definition, "directions": _direction_names(directions)})
        return study


def _direction_names(directions) -> list[str]:
    return [d.name.lower() if isinstance(d, optuna.study.StudyDirection) else str(d).lower() for d in directions]


DEFINITION_ATTR = "memtune_sweep"
"""The study user attribute that holds what defines a sweep (:func:`check_study_definition`)."""


def check_study_definition(study: optuna.Study, definition: dict[str, Any]) -> None:
    """Make ``study`` a study of this sweep, or refuse it with :class:`UsageError`.

    A new (empty) study records ``definition`` (budget, objectives, directions, device, steps
    per trial, the profiled model's fingerprint) in its user attributes. A study that holds
    another definition, or trials from another program, is refused before any trial runs: its
    "best" answers another question. A study left by an earlier memtune (trials whose
    parameters are all this sweep's, no definition) is adopted."""
    name = study.study_name
    fix = (f"give another --study-name (study_name=...), or delete the old study "
           f"(optuna delete-study --study-name {name} --storage ...)")
    stored = study.user_attrs.get(DEFINITION_ATTR)
    trials = study.get_trials(deepcopy=False)
    if stored is None:
        ours = {"ns_steps", "state_dtype", "planner", "lr", *searched_levers()}
        foreign = sorted({k for t in trials for k in t.params} - ours)
        if foreign or (trials and not any(t.params for t in trials)):
            raise UsageError(f"study {name!r} already holds {len(trials)} trials that no memtune sweep made "
                             f"(parameters {foreign[:4] or 'none'}); {fix}")
        if len(study.directions) != len(definition["directions"]):
            raise UsageError(f"study {name!r} has {len(study.directions)} objective(s), this sweep asks for "
                             f"{len(definition['directions'])}; {fix}")
        study.set_user_attr(DEFINITION_ATTR, definition)
        return
    if not isinstance(stored, dict):
        raise UsageError(f"study {name!r} holds a damaged sweep definition ({type(stored).__name__}); {fix}")
    differ = [k for k in sorted(definition) if k in stored and stored[k] != definition[k]]
    if differ:
        what = "; ".join(f"{k}: the study has {stored.get(k)!r}, this run {definition.get(k)!r}" for k in differ[:4])
        raise UsageError(f"study {name!r} was made by another sweep ({what}), so its trials answer another question; "
                         f"rerun with the study's settings to continue it, or {fix}")
    missing = {k: v for k, v in definition.items() if k not in stored}
    if missing:  # the model's fingerprint, known once the model is profiled
        study.set_user_attr(DEFINITION_ATTR, {**stored, **missing})


def _surplus(study: optuna.Study, trial: optuna.Trial, n_trials: int) -> bool:
    """Whether ``trial`` is beyond ``n_trials``: as many trials are finished, or ran or wait
    with a smaller number, as the study should hold. Trial numbers order the workers' races,
    so of two trials started for the last slot exactly one goes ahead."""
    ahead = 0
    for t in study.get_trials(deepcopy=False):
        if t.number == trial.number:
            continue
        if t.state in FINISHED or (t.number < trial.number and t.state in (optuna.trial.TrialState.RUNNING,
                                                                           optuna.trial.TrialState.WAITING)):
            ahead += 1
    return ahead >= n_trials


def searched_levers() -> dict:
    """The levers a sweep searches (:attr:`memtune.levers.Lever.searchable`)."""
    from .levers import LEVERS

    return {name: lever for name, lever in LEVERS.items() if lever.searchable}


def suggest(trial: optuna.Trial, profile) -> dict[str, Any]:
    """The search space: NS steps, state precision, planner, learning rate, and each searched
    lever over the choices the profile recorded (in the lever's JSON encoding: a micro-batch of
    ``None`` is the whole batch)."""
    from .planners import PLANNERS

    params = {
        "ns_steps": trial.suggest_int("ns_steps", *NS_STEPS),
        "state_dtype": trial.suggest_categorical("state_dtype", STATE_DTYPES),
        "planner": trial.suggest_categorical("planner", tuple(PLANNERS)),
        "lr": trial.suggest_float("lr", *LR_RANGE, log=True),
    }
    for name, lever in searched_levers().items():
        choices = tuple(lever.encode(v) for v in profile.recorded_choices(name))
        if len(choices) > 1:
            params[name] = trial.suggest_categorical(name, choices)
    return params


def sweep_profile(model, sample, *, loss_fn=None, device: str = "cpu"):
    """The profile every trial's feasibility check uses. It records every configuration the
    search space can ask for (:class:`memtune.PlanSpace`), with the optimizer settings the
    trials train with, so that each check is measured, and every lever ``memtune plan``
    records, so that the sweep and the plan agree on what fits."""
    import memtune
    from memtune.optim import OptimizerSettings
    from memtune.optim.settings import default_ns_dtype

    space = memtune.PlanSpace(ns_steps=tuple(range(NS_STEPS[0], NS_STEPS[1] + 1)), state_dtypes=STATE_DTYPES)
    return memtune.profile(model, sample, loss_fn=loss_fn, target=device, space=space,
                           optimizer=OptimizerSettings(name="muon2", ns_dtype=default_ns_dtype(device)))


def planner_options(params: dict[str, Any], device: str | None = None) -> dict[str, Any]:
    """The :func:`memtune.plan` options a trial's parameters pin down: what they say, and
    nothing besides: the levers not searched are the planner's, as in ``memtune plan``."""
    levers: dict[str, tuple] = {}
    for name, lever in searched_levers().items():
        if name in params:
            levers[name] = (lever.decode(params[name]),)
    opts: dict[str, Any] = dict(optimizer="muon2", min_ns_steps=params["ns_steps"], max_ns_steps=params["ns_steps"],
                                state_dtypes=(params["state_dtype"],), levers=levers)
    if device == "cpu":
        opts["device"] = "cpu"
    return opts


def is_feasible(profile, budget, params: dict[str, Any], *, device: str | None = None) -> bool:
    """Whether :func:`memtune.plan` finds a plan for these trial parameters (what the sweep
    checks before running a trial; public so a test or a user can recompute it)."""
    import memtune

    try:
        memtune.plan(profile, budget, params["planner"], **planner_options(params, device))
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
          callbacks: Sequence[Callable] | None = None, heartbeat_interval: int | None = HEARTBEAT_S,
          grace_period: int | None = None, target_loss: float | None = None) -> optuna.Study:
    """Search NS steps, state precision, planner, learning rate and micro-batch within ``budget``.

    Args:
        build_fn: called once per trial, with no arguments or with the trial's parameters
            (a dict: ``ns_steps``, ``state_dtype``, ``planner``, ``lr``, and one entry per searched
            lever, in the lever's JSON encoding);
            returns ``(model, data)``, ``(model, data, loss_fn)`` or a dict with keys
            ``model``, ``data`` (or ``sample``), ``loss_fn``. ``data`` is an iterable of
            batches; its first batch is the profiling sample. Build a fresh model each call.
        budget: as for :func:`memtune.fit` (``"24GB"``, bytes...).
        n_trials: the number of finished (complete or pruned) trials the study should hold:
            a resumed study runs only the remainder.
        study: an existing :class:`optuna.Study` (then ``storage``, ``sampler``, ``pruner``,
            ``study_name`` and ``directions`` are not used).
        storage: Optuna storage; ``None``: ``sqlite:///memtune-sweep.db``. A URL gets a
            heartbeat and retries of killed workers' trials (:func:`open_storage`).
        sampler, pruner: Optuna's; ``None``: Optuna's defaults.
        objective: ``"loss"`` (mean training loss over the last quarter of the steps),
            ``("loss", "step_ms")`` (adds the median measured step time: a Pareto front), or
            ``"time_to_loss"``: seconds of training until the mean loss of the last
            ``report_every`` steps is at most ``target_loss`` (the trial stops there; one that
            does not reach it within ``steps_per_trial`` is pruned, with the loss it reached).
        target_loss: the loss ``"time_to_loss"`` trains to.
        steps_per_trial: optimizer steps each trial trains.
        report_every: report the running loss to ``trial.report`` every this many steps.
        directions: ``None``: minimize every objective.
        device: ``None``: CUDA when present, else CPU.
        callbacks: passed to :meth:`optuna.Study.optimize`.
        heartbeat_interval, grace_period: seconds (see :func:`open_storage`); ``None``
            turns the heartbeat off. Default 60 and twice that.
    """
    import torch

    import memtune
    from memtune.optim import OptimizerSettings
    from memtune.optim.settings import default_ns_dtype

    objectives = (objective,) if isinstance(objective, str) else tuple(objective)
    bad = [o for o in objectives if o not in OBJECTIVES]
    if bad or not objectives:
        raise UsageError(f"objective={objective!r}: use 'loss', ('loss', 'step_ms') or 'time_to_loss'")
    timed = "time_to_loss" in objectives
    if timed != (target_loss is not None) or (timed and not (isinstance(target_loss, (int, float))
                                                              and math.isfinite(target_loss))):
        raise UsageError(f"objective={objective!r} with target_loss={target_loss!r}: 'time_to_loss' needs a finite "
                         "target_loss, and target_loss is only used by it")
    if not isinstance(n_trials, int) or isinstance(n_trials, bool) or n_trials < 0:
        raise UsageError(f"n_trials={n_trials!r}: give a whole number >= 0")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")

    from .budget import Budget

    # A study of another sweep is refused before anything is profiled or trained.
    b = Budget.parse(budget, device=device)
    definition = {"budget_bytes": b.budget_bytes, "objectives": list(objectives), "steps_per_trial": steps_per_trial,
                  "device": device}
    if timed:
        definition["target_loss"] = float(target_loss)
    if study is None:
        study = open_study(storage, study_name=study_name, directions=directions or ["minimize"] * len(objectives),
                           sampler=sampler, pruner=pruner, heartbeat_interval=heartbeat_interval,
                           grace_period=grace_period, definition=definition)
    else:
        check_study_definition(study, {**definition, "directions": _direction_names(study.directions)})

    # One profile serves every trial's feasibility check: the trial parameters only change
    # planner options, never the traced step.
    model, data, loss_fn = _unpack(_call_default(build_fn))
    sample = next(iter(data))
    profile = sweep_profile(model, sample, loss_fn=loss_fn, device=device)
    del model
    check_study_definition(study, {"model": profile.fingerprint})  # the same model (and memtune) as the study's
    _check_some_trial_fits(profile, budget, device)
    multi = len(study.directions) > 1

    def run_trial(trial: optuna.Trial):
        if _surplus(study, trial, n_trials):
            trial.set_user_attr("surplus", True)
            raise _Surplus(f"trial {trial.number} is beyond n_trials={n_trials}")
        params = suggest(trial, profile)
        if not is_feasible(profile, budget, params, device=device):
            trial.set_user_attr("infeasible", True)
            raise optuna.TrialPruned(f"no plan fits {budget} with {params}")
        plan = memtune.plan(profile, budget, params["planner"], **planner_options(params, device))
        trial.set_user_attr("plan", plan.to_json(indent=None))
        trial.set_user_attr("plan_variant", plan.variant.describe())
        trial.set_user_attr("predicted_step_ms", plan.predicted_step_ms)
        model, data, loss_fn = _unpack(_call(build_fn, params))
        settings = OptimizerSettings(name="muon2", lr=params["lr"], ns_steps=params["ns_steps"],
                                     state_dtype=params["state_dtype"], ns_dtype=default_ns_dtype(device))
        opts = planner_options(params, device)
        opts.pop("optimizer")
        t0 = time.perf_counter()
        losses, step_ms = [], []
        try:
            trainer = memtune.fit(model, budget, sample=sample, loss_fn=loss_fn, optimizer="muon2",
                                  optimizer_settings=settings, planner=params["planner"], device=device,
                                  planner_options=opts, progress=False)
            reached = None
            for step, batch in enumerate(itertools.islice(data, steps_per_trial)):
                losses.append(trainer.step(batch))
                step_ms.append(trainer.history[-1]["step_ms"])
                if not math.isfinite(losses[-1]):
                    raise optuna.TrialPruned(f"loss diverged at step {step}")
                if timed and len(losses) >= report_every and \
                        statistics.fmean(losses[-report_every:]) <= target_loss:
                    reached = sum(step_ms) / 1000.0  # seconds of training steps, memtune's re-plans included
                    trial.set_user_attr("steps_to_loss", step + 1)
                    break
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
        if timed and reached is None:
            trial.set_user_attr("target_not_reached", statistics.fmean(losses[-report_every:]))
            raise optuna.TrialPruned(f"did not reach target_loss={target_loss} in {len(losses)} steps (mean loss of "
                                     f"the last {report_every}: {statistics.fmean(losses[-report_every:]):.4f})")
        values = {"loss": loss, "step_ms": ms, "time_to_loss": reached}
        return tuple(values[o] for o in objectives) if multi else values[objectives[0]]

    cbs = [optuna.study.MaxTrialsCallback(n_trials, states=FINISHED), *(callbacks or [])]
    try:
        _work(study, run_trial, n_trials, cbs)
    finally:
        _record_savings(study)
    _check_some_trial_ran(study, budget)
    return study


def _heartbeat_enabled(study: optuna.Study) -> bool:
    storage = getattr(study, "_storage", None)  # Optuna keeps it private; RDBStorage reports its interval
    get = getattr(storage, "get_heartbeat_interval", None)
    return bool(get and get() is not None)


def _work(study: optuna.Study, run_trial: Callable, n_trials: int, callbacks: list) -> None:
    """Run trials one at a time until the study holds ``n_trials`` finished ones. While other
    workers hold the last slots this worker waits, with a heartbeat, in case one of them dies
    and its trial comes back as WAITING; without a heartbeat it leaves them to it."""
    heartbeat = _heartbeat_enabled(study)
    poll = 1.0
    while True:
        if heartbeat:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                optuna.storages.fail_stale_trials(study)
        trials = study.get_trials(deepcopy=False)
        finished = sum(t.state in FINISHED for t in trials)
        running = sum(t.state == optuna.trial.TrialState.RUNNING for t in trials)
        waiting = sum(t.state == optuna.trial.TrialState.WAITING for t in trials)
        if finished >= n_trials:
            return
        if not waiting and finished + running >= n_trials:
            if not heartbeat:
                return
            time.sleep(poll)
            continue
        study.optimize(run_trial, n_trials=1, callbacks=callbacks, catch=(_Surplus,))


def _check_some_trial_fits(profile, budget, device: str | None) -> None:
    """Raise :class:`InfeasibleBudgetError` when no configuration of the search space fits:
    the most permissive one (any NS steps, state precision, micro-batch) is planned first."""
    import memtune

    opts: dict[str, Any] = dict(optimizer="muon2", min_ns_steps=NS_STEPS[0], max_ns_steps=NS_STEPS[1],
                                state_dtypes=STATE_DTYPES, allow_microbatching=True)
    if device == "cpu":
        opts["device"] = "cpu"
    try:
        memtune.plan(profile, budget, "exact", **opts)
    except InfeasibleBudgetError as e:
        raise InfeasibleBudgetError(f"every trial of this sweep would be infeasible, so none was run: {e}",
                                    min_feasible_bytes=e.min_feasible_bytes, top_consumers=e.top_consumers,
                                    suggestions=e.suggestions) from e


def _check_some_trial_ran(study: optuna.Study, budget) -> None:
    trials = [t for t in study.get_trials(deepcopy=False) if t.state in FINISHED]
    if trials and not any(t.state == optuna.trial.TrialState.COMPLETE for t in trials) and \
            all(t.user_attrs.get("infeasible") or t.user_attrs.get("oom") for t in trials):
        raise InfeasibleBudgetError(
            f"all {len(trials)} trials of study {study.study_name!r} were infeasible under {budget} (pruned before "
            f"or while training), although some configuration of the search space fits: run more trials, or give "
            f"a larger budget")


def _call_default(build_fn: Callable):
    """build_fn with default parameters (for the profiling sample)."""
    defaults = {"ns_steps": NS_STEPS[0], "state_dtype": "fp32", "planner": "exact", "lr": 0.02,
                **{name: lever.encode(lever.default) for name, lever in searched_levers().items()}}
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
