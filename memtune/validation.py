"""Checks that a plan, a profile or a checkpoint is sound, and that it belongs to the model
it is applied to.

Two kinds of check, both raising a :class:`~memtune.errors.MemtuneError` subclass whose
message says what is wrong and how to fix it:

* **Well-formed data** (:func:`check_fields`): walks the fields of a frozen dataclass
  (``Plan``, ``ModelProfile`` and everything nested in them) against their type
  annotations, so it keeps working when fields are added. Rules: every value has its
  annotated type (an ``int`` field holds an int, not a string or a bool); every number is
  finite and non-negative (no field of a plan or a profile is negative: sizes in
  ``*_bytes``, counts in ``*_flops``, times in ``*_ms``/``*_seconds``, indices, shapes);
  a field named ``*_size`` that is set is at least 1. A profile's storage indices and
  timeline intervals must point inside it (:func:`check_profile_consistency`).
* **Right model** (:func:`check_plan_matches_model`, :func:`check_profile_matches_model`,
  :func:`check_state_dict_matches_model`): unit and parameter names, parameter shapes
  and dtypes, the profile hash a plan was made from, the parameter bytes it planned for.

``Plan.from_dict``/``ModelProfile.from_dict`` call :func:`check_object` and
:func:`check_fields`; ``apply_plan``, ``Trainer`` and ``Trainer.resume`` call the model checks.
"""

from __future__ import annotations

import dataclasses
import enum
import math
import types
import typing
from typing import Any

import torch

from .errors import ModelMismatchError, PlanFileError
from .units import unit_problem

_HINTS: dict[type, dict[str, Any]] = {}


def check_object(d: Any, *, what: str, remedy: str) -> None:
    """``d`` must be a JSON object (a dict with string keys)."""
    if not isinstance(d, dict):
        raise PlanFileError(f"{what} must be a JSON object, got {type(d).__name__}; {remedy}")


def check_fields(obj: Any, *, what: str, remedy: str) -> Any:
    """``obj`` (a dataclass instance) after checking every field against its annotation and
    the number rules in the module docstring; raises :class:`PlanFileError` naming the first
    bad fields. Returns ``obj`` so that ``from_dict`` can ``return check_fields(cls(**kw), ...)``."""
    errors: list[str] = []
    _check_dataclass(obj, what, errors)
    if not errors:
        check = _CONSISTENCY.get(type(obj).__name__)
        if check is not None:
            errors += check(obj)
    if errors:
        more = f" (and {len(errors) - 3} more)" if len(errors) > 3 else ""
        raise PlanFileError(f"invalid {what}: {'; '.join(errors[:3])}{more}; {remedy}")
    return obj


def _hints(cls: type) -> dict[str, Any]:
    hints = _HINTS.get(cls)
    if hints is None:
        hints = _HINTS[cls] = typing.get_type_hints(cls)
    return hints


def _check_dataclass(obj: Any, path: str, errors: list[str]) -> None:
    hints = _hints(type(obj))
    for f in dataclasses.fields(obj):
        if not f.compare and not f.repr:  # in-memory only (a profile's fx graph)
            continue
        _check_value(getattr(obj, f.name), hints.get(f.name, Any), f"{path}.{f.name}", f.name, errors)


def _check_value(value: Any, tp: Any, path: str, name: str, errors: list[str]) -> None:
    if len(errors) > 20:
        return
    if tp is Any:
        return
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        arms = typing.get_args(tp)
        if value is None and type(None) in arms:
            return
        real = [a for a in arms if a is not type(None)]
        if len(real) == 1:  # Optional[X]: X's own message ("must be >= 1") says more
            _check_value(value, real[0], path, name, errors)
            return
        for arm in arms:
            if arm is type(None):
                continue
            trial: list[str] = []
            _check_value(value, arm, path, name, trial)
            if not trial:
                return
        errors.append(f"{path} must be {_describe(tp)}, got {_short(value)}")
        return
    if tp is type(None):
        if value is not None:
            errors.append(f"{path} must be null, got {_short(value)}")
        return
    if origin is tuple or tp is tuple:
        if not isinstance(value, (tuple, list)):
            errors.append(f"{path} must be a list, got {_short(value)}")
            return
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            for i, v in enumerate(value):
                _check_value(v, args[0], f"{path}[{i}]", name, errors)
        elif args:
            if len(value) != len(args):
                errors.append(f"{path} must have {len(args)} items, got {len(value)}")
                return
            for i, (v, a) in enumerate(zip(value, args)):
                _check_value(v, a, f"{path}[{i}]", name, errors)
        return
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            errors.append(f"{path} must be an object, got {_short(value)}")
            return
        args = typing.get_args(tp) or (Any, Any)
        for k, v in value.items():
            _check_value(k, args[0], f"{path} key", name, errors)
            _check_value(v, args[1], f"{path}[{k!r}]", name, errors)
        return
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        if not isinstance(value, tp):
            errors.append(f"{path} must be an object ({tp.__name__}), got {_short(value)}")
            return
        _check_dataclass(value, path, errors)
        return
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        if not isinstance(value, tp):
            errors.append(f"{path} must be one of {[m.value for m in tp]}, got {_short(value)}")
        return
    if tp is bool:
        if not isinstance(value, bool):
            errors.append(f"{path} must be true or false, got {_short(value)}")
        return
    if tp is int or tp is float:
        ok = isinstance(value, int) if tp is int else isinstance(value, (int, float))
        if not ok or isinstance(value, bool):
            errors.append(f"{path} must be {'an integer' if tp is int else 'a number'}, got {_short(value)}")
            return
        if not math.isfinite(value):
            errors.append(f"{path} must be finite, got {value}")
        elif name.endswith("_size") and value < 1:
            errors.append(f"{path} must be >= 1 when set, got {value}")
        elif value < 0:
            errors.append(f"{path} must be >= 0, got {value}")
        return
    if tp is str:
        if not isinstance(value, str):
            errors.append(f"{path} must be a string, got {_short(value)}")
        return
    # Anything else (a new kind of annotation): at least not a NaN hiding in it.
    if isinstance(value, float) and not math.isfinite(value):
        errors.append(f"{path} must be finite, got {value}")


def _describe(tp: Any) -> str:
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    names = " or ".join(getattr(a, "__name__", str(a)) for a in args)
    return f"{names} or null" if type(None) in typing.get_args(tp) else names


def _short(value: Any) -> str:
    text = repr(value)
    return f"{type(value).__name__} {text[:40]}{'...' if len(text) > 40 else ''}"


def check_profile_consistency(profile: Any) -> list[str]:
    """Cross-references inside a profile: unit storage indices (its per-op records' too) and
    storage intervals point inside it (a hand-edited profile that breaks them would crash the
    memory model)."""
    errors: list[str] = []
    n_storages, n_events = len(profile.storages), len(profile.timeline)
    for rec in (profile, *getattr(profile, "step_variants", ())):
        errors += _unit_references(rec)
    for i, s in enumerate(profile.storages):
        if s.created > n_events or s.freed > n_events:
            errors.append(f"storage {i} lives in intervals {s.created}..{s.freed}, past the {n_events}-event timeline")
    units = set(profile.unit_fqns)
    if len(units) != len(profile.units):
        errors.append("unit FQNs repeat")
    return errors


def _unit_references(recording: Any) -> list[str]:
    """Storage and op indices of a recording's units (and of their per-op records) point inside it."""
    errors: list[str] = []
    n_storages = len(recording.storages)
    for u in recording.units:
        for field_name in ("saved_storages", "input_storages"):
            bad = [i for i in getattr(u, field_name, ()) if i >= n_storages]
            if bad:
                errors.append(f"unit {u.fqn!r} {field_name} {bad[:3]} point past the {n_storages} storages")
        ops = getattr(u, "ops", ())
        for k, op in enumerate(ops):
            if any(i >= n_storages for i in op.storages):
                errors.append(f"unit {u.fqn!r} op {k} storages {list(op.storages)[:3]} point past the "
                              f"{n_storages} storages")
            if any(i >= k for i in op.deps):
                errors.append(f"unit {u.fqn!r} op {k} depends on ops {list(op.deps)[:3]} that do not run before it")
            if any(len(a) != 3 for a in op.allocations):
                errors.append(f"unit {u.fqn!r} op {k} allocations must be (bytes, freed, needed) triples")
    return errors


_CONSISTENCY = {"ModelProfile": check_profile_consistency}


# ----------------------------------------------------------------------------- right model
def _model_params(model) -> dict[str, Any]:
    return dict(model.named_parameters())


def check_plan_matches_model(model, plan, profile=None) -> None:
    """Raise :class:`ModelMismatchError` when ``plan`` was not made for ``model`` (or, with
    ``profile``, not from that profile). Compares unit names, the optimizer's parameter
    names, the parameter bytes planned for, and ``plan.profile_hash``."""
    diffs: list[str] = []
    modules = dict(model.named_modules())
    missing_units = [u for u in plan.decisions if unit_problem(modules, u) is not None]
    if missing_units:
        diffs.append(f"units {missing_units[:3]} are not in the model")
    params = _model_params(model)
    listed = set(plan.optimizer.muon_params) | set(plan.optimizer.adamw_params)
    unknown = sorted(listed - set(params))  # parameters it does not list go to AdamW, as apply_plan does
    if unknown:
        diffs.append(f"parameters {unknown[:3]} the plan's optimizer updates are not in the model")
    # Sized as the plan stores them (a lever may store parameters in another dtype, e.g. bf16 weights).
    from .levers import LEVERS

    dtypes: dict[str, torch.dtype] = {}
    for name, value in plan.variant.choices:
        dtypes.update(LEVERS[name].param_dtypes(value, model))
    raw = sum(p.numel() * (dtypes[n].itemsize if n in dtypes else p.element_size()) for n, p in params.items())
    planned = plan.memory.params_bytes
    if plan.parallel is not None and plan.parallel.strategy in ("fsdp", "hsdp"):
        # a sharded plan counts one rank's shards
        planned *= plan.parallel.shard_size if plan.parallel.strategy == "hsdp" else plan.parallel.world_size
    # The plan's static bytes include buffers, allocation rounding and kernel workspaces, so
    # they are at least the parameters' own bytes; less means a plan for a smaller model.
    if planned and raw > planned:
        diffs.append(f"the model's parameters take {raw} bytes but the plan was made for {planned} bytes of "
                     f"parameters, buffers and workspaces")
    if profile is not None and plan.profile_hash and plan.profile_hash != profile.fingerprint:
        diffs.append(f"plan.profile_hash {plan.profile_hash} is not the profile's fingerprint {profile.fingerprint}")
    if diffs:
        raise ModelMismatchError(
            f"this plan was made for another model than {type(model).__name__}: {'; '.join(diffs)}; "
            f"plan for this model: memtune.plan(memtune.profile(model, batch), budget)")


def check_profile_matches_model(model, profile) -> None:
    """Raise :class:`ModelMismatchError` when ``profile`` was not made from ``model``:
    parameter names, shapes or dtypes differ, or a unit is missing."""
    diffs: list[str] = []
    params = _model_params(model)
    recorded = {p.fqn: p for p in profile.params}
    missing, extra = sorted(set(recorded) - set(params)), sorted(set(params) - set(recorded))
    if missing:
        diffs.append(f"parameters {missing[:3]} of the profile are not in the model")
    if extra:
        diffs.append(f"model parameters {extra[:3]} are not in the profile")
    for name in sorted(set(recorded) & set(params)):
        want, have = recorded[name], params[name]
        if tuple(want.shape) != tuple(have.shape):
            diffs.append(f"{name} has shape {tuple(have.shape)} in the model, {tuple(want.shape)} in the profile")
        elif want.dtype != str(have.dtype).removeprefix("torch.") and not (
                want.dtype == "float32" and have.dtype == torch.bfloat16):  # stored in bf16 by a bf16-weights plan
            diffs.append(f"{name} is {str(have.dtype).removeprefix('torch.')} in the model, {want.dtype} in the profile")
        if len(diffs) >= 4:
            break
    modules = dict(model.named_modules())
    missing_units = [u for u in profile.unit_fqns if unit_problem(modules, u) is not None]
    if missing_units:
        diffs.append(f"units {missing_units[:3]} are not in the model")
    if diffs:
        raise ModelMismatchError(
            f"this profile ({profile.model}) was made from another model than {type(model).__name__}: "
            f"{'; '.join(diffs[:4])}. Profile this model: memtune.profile(model, batch)")


def check_state_dict_matches_model(model, state: dict, *, source: str) -> None:
    """Raise :class:`ModelMismatchError` unless ``state`` (a model ``state_dict``) has exactly
    the model's keys, shapes and dtypes; called before ``load_state_dict`` touches the model."""
    import torch

    own = model.state_dict()
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ModelMismatchError(f"{source} holds no model state_dict of tensors")
    missing, extra = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    diffs = []
    if missing:
        diffs.append(f"{len(missing)} model entries are missing from it (e.g. {missing[:3]})")
    if extra:
        diffs.append(f"it has {len(extra)} entries the model lacks (e.g. {extra[:3]})")
    for k in sorted(set(own) & set(state)):
        if own[k].shape != state[k].shape:
            diffs.append(f"{k} is {tuple(state[k].shape)} in it, {tuple(own[k].shape)} in the model")
        elif own[k].dtype != state[k].dtype:
            diffs.append(f"{k} is {state[k].dtype} in it, {own[k].dtype} in the model")
        if len(diffs) >= 4:
            break
    if diffs:
        raise ModelMismatchError(f"{source} was saved from another model than this {type(model).__name__}: "
                                 f"{'; '.join(diffs[:4])}. Resume with the architecture and config that wrote it")


__all__ = ["check_fields", "check_object", "check_plan_matches_model", "check_profile_consistency",
           "check_profile_matches_model", "check_run_rows", "check_state_dict_matches_model"]


def check_run_rows(rows: Any, *, source: str) -> list[dict]:
    """The rows of a run's metrics JSONL (``memtune fit --metrics``), checked: each an object
    with an integer ``step``, numbers where numbers belong, and at least one memory reading
    in the file. Raises :class:`PlanFileError` naming the first bad line."""
    fix = "give the --metrics file of a memtune fit run"
    if not isinstance(rows, list) or not rows:
        raise PlanFileError(f"{source} holds no metrics rows; {fix}")
    memory_keys = ("peak_bytes", "predicted_peak_bytes", "budget_bytes")
    for i, r in enumerate(rows):
        if not isinstance(r, dict):
            raise PlanFileError(f"{source}:{i + 1} is a JSON {type(r).__name__}, not an object; {fix}")
        step = r.get("step")
        if not isinstance(step, int) or isinstance(step, bool):
            raise PlanFileError(f"{source}:{i + 1} has no integer 'step' (got {_short(step)}); {fix}")
        for k in (*memory_keys, "loss", "plan_version"):
            v = r.get(k)
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float))):
                raise PlanFileError(f"{source}:{i + 1} '{k}' must be a number, got {_short(v)}; {fix}")
            if k in memory_keys and v is not None and not (math.isfinite(v) and v >= 0):
                raise PlanFileError(f"{source}:{i + 1} '{k}' must be a finite number >= 0, got {v}; {fix}")
    if not any(r.get(k) is not None for r in rows for k in memory_keys):
        raise PlanFileError(f"{source} has no memory readings ({', '.join(memory_keys)}) in any row; {fix}")
    return rows
