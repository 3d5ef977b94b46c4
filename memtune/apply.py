"""``apply_plan``: make a live model follow a :class:`~memtune.plan.Plan`.

    >>> opt = memtune.apply_plan(model, plan)               # builds the plan's optimizer
    >>> opt = memtune.apply_plan(model, new_plan, optimizer=opt)   # re-plan, keep the optimizer
    >>> memtune.remove_plan(model)

* RECOMPUTE units run ``torch.utils.checkpoint.checkpoint(forward, ..., use_reentrant=False)``;
* SELECTIVE units run the same with a ``create_selective_checkpoint_contexts`` policy that keeps
  the outputs of the op calls in the plan's save set (:func:`memtune.selective.context_fn`);
* OFFLOAD units keep what their forward saves in pinned host memory, copied out and back on a
  side stream that overlaps the unit's compute (:mod:`memtune.offload`);
* SAVE units run unchanged;
* each lever of the plan's step variant (:mod:`memtune.levers`) is applied by its own
  :meth:`~memtune.levers.Lever.apply`, which returns an :class:`~memtune.levers.Applied`
  that can be removed and says whether a failed step may be retried. A re-plan re-applies only
  the levers whose choice changed. Levers that change how the optimizer steps ask, through
  :class:`ApplyContext`, for :class:`memtune.stepping.PlanOptimizer` options; the optimizer is
  built (or re-wrapped, keeping its state) once every lever has spoken.

Only the unit's *instance* ``forward`` is replaced (the class and the module tree are
untouched), so parameter FQNs and ``state_dict`` keys do not change, and applying another
plan later switches units between decisions. Hugging Face ``use_cache`` is turned off on
every config in the model (an encoder-decoder's decoder keeps its own copy): a KV cache keeps
keys/values outside autograd, and a cached cross-attention makes recomputation save fewer
tensors than the first forward did.
"""

from __future__ import annotations

import functools
import logging
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from .errors import MemtuneError
from .fake_compat import disable_kv_cache
from .levers.base import Applied
from .plan import Decision, Plan
from .stateful import RecomputedBuffers
from .unit_forwards import install, uninstall
from .units import split_unit, unit_problem
from .validation import check_plan_matches_model

log = logging.getLogger("memtune.apply")

_DECISION = "_memtune_decisions"
"""Attribute of the model holding unit name -> decision of the units applied (not SAVE)."""
_LEVERS = "_memtune_levers"
"""Attribute holding lever name -> (choice, Applied) of the levers applied to a model."""
OFFLOAD_DEVICE_TYPES: tuple[str, ...] = ("cuda",)
"""Device types whose saved activations OFFLOAD units keep in host memory (the tests set
``("cpu",)``, which offloads CPU tensors to other CPU tensors, to check the runtime on the CPU)."""
_STEPPER = "_memtune_stepper"
"""Attribute holding a weak reference to the PlanOptimizer that hooks the model's parameters."""


@dataclass(eq=False)
class ApplyContext:
    """What a lever's :meth:`~memtune.levers.Lever.apply` may use and ask for."""

    plan: Plan
    after_optimizer: list[Callable[[torch.optim.Optimizer], None]] = field(default_factory=list)
    """Called with the optimizer once it is built or re-wrapped."""
    device: torch.device | None = None
    """The device the model trains on (``None``: where its parameters are)."""


def apply_plan(model: nn.Module, plan: Plan, *, optimizer: torch.optim.Optimizer | None = None,
               settings=None, device: str | torch.device | None = None) -> torch.optim.Optimizer:
    """Apply ``plan``'s unit decisions and levers to ``model`` and return the optimizer to train it with.

    Args:
        model: the model that was profiled (same unit FQNs).
        plan: from :func:`memtune.plan`.
        optimizer: keep this optimizer and its state (it is re-wrapped if the plan steps it
            differently), e.g. when the runtime re-plans mid-training.
        settings: a :class:`memtune.optim.OptimizerSettings` for learning rates and other
            hyperparameters; everything that decides memory (optimizer, NS steps and dtype, state
            precision, parameter split) is the plan's, as the profile recorded it.
        device: the device the model trains on, when it is not there yet (a model kept in host
            memory until its plan makes it fit); ``None``: where its parameters are.
    """
    from .compiled import unwrap

    model = unwrap(model)  # under torch.compile, plan the module Dynamo traces; the next call recompiles it
    check_plan_matches_model(model, plan)
    modules = dict(model.named_modules())
    missing = [u for u in plan.decisions if unit_problem(modules, u) is not None]
    if missing:
        raise MemtuneError(
            f"plan names units {missing[:3]} that {type(model).__name__} does not have; plan for this model "
            f"(memtune.plan(memtune.profile(model, batch), ...)) or pass the model that was profiled")
    install_decisions(model, plan)
    ctx = ApplyContext(plan=plan, device=None if device is None else torch.device(device))
    _apply_levers(model, plan, ctx)
    stepping = plan_stepping(plan)
    if optimizer is not None:
        from .stepping import rewrap

        opt = rewrap(optimizer, model, **stepping)
    else:
        opt = build_plan_optimizer(model, plan, settings)
    for callback in ctx.after_optimizer:
        callback(opt)
    _remember_stepper(model, opt)
    return opt


def remove_plan(model: nn.Module) -> None:
    """Undo :func:`apply_plan`: every unit runs its own forward again, every lever is removed
    (bf16 weights are stored in their own dtype again, from the fp32 master copy where there is
    one), and an optimizer stepping in backward is unhooked."""
    from .compiled import unwrap

    model = unwrap(model)
    _unwrap_units(model)
    for applied in reversed(list(model.__dict__.pop(_LEVERS, {}).values())):
        applied[1].remove()
    stepper = model.__dict__.pop(_STEPPER, None)
    stepper = stepper() if stepper is not None else None
    if stepper is not None:
        stepper.remove_hooks()


def applied_levers(model: nn.Module) -> dict[str, Applied]:
    """Lever name -> what :meth:`~memtune.levers.Lever.apply` returned, for the levers applied
    to ``model`` (those at their default are not listed)."""
    from .compiled import unwrap

    return {name: applied for name, (_, applied) in unwrap(model).__dict__.get(_LEVERS, {}).items()}


def step_autocast(model: nn.Module):
    """The autocast memtune's runtime runs a step of ``model`` under, for the plan applied to it:
    bf16 autocast on the parameters' device while a lever asks for it (bf16 weights), else a
    no-op (the caller's own precision). The model's forward already runs under it (the bf16
    weights lever installs it); a loss computed outside the model matches the runtime's when
    computed under it too::

        with memtune.step_autocast(model):
            loss = loss_fn(model(x), y)
    """
    import contextlib

    precision = next((a.precision for a in applied_levers(model).values() if a.precision), None)
    if precision != "bf16-mixed":
        return contextlib.nullcontext()
    device = next((p.device.type for p in model.parameters()), "cpu")
    return torch.autocast(device, dtype=torch.bfloat16)


def _apply_levers(model: nn.Module, plan: Plan, ctx: ApplyContext) -> None:
    """Apply the levers whose choice differs from what is applied; keep the others."""
    from .levers import LEVERS

    current: dict[str, tuple[Any, Applied]] = model.__dict__.setdefault(_LEVERS, {})
    for name in reversed(list(current)):
        if plan.variant[name] != current[name][0]:
            current.pop(name)[1].remove()
    for name, value in plan.variant.choices:
        if name not in current:
            current[name] = (value, LEVERS[name].apply(model, value, ctx))


def plan_stepping(plan: Plan) -> dict[str, Any]:
    """The :class:`memtune.stepping.PlanOptimizer` options ``plan``'s levers ask for
    (:meth:`memtune.levers.Lever.stepping`); empty: the optimizer steps as built."""
    from .levers import LEVERS

    out: dict[str, Any] = {}
    for name, value in plan.variant.choices:
        out.update(LEVERS[name].stepping(value))
    return out


def _remember_stepper(model: nn.Module, opt) -> None:
    from .stepping import PlanOptimizer

    if isinstance(opt, PlanOptimizer):
        model.__dict__[_STEPPER] = weakref.ref(opt)
    else:
        model.__dict__.pop(_STEPPER, None)


def install_decisions(model: nn.Module, plan: Plan) -> None:
    """Make each unit of ``model`` (the module Dynamo traces) run as ``plan`` decides, replacing
    what was there; no lever, no optimizer (:func:`apply_plan` does the rest)."""
    modules = dict(model.named_modules())
    _unwrap_units(model)
    applied = {u: d for u, d in plan.decisions.items() if d is not Decision.SAVE}
    install(model, {u: functools.partial(_wrap, modules[split_unit(u)[0]], d, plan.save_ops.get(u, ()))
                    for u, d in applied.items()}, units=plan.decisions)
    model.__dict__[_DECISION] = applied
    disable_kv_cache(model)


def _unwrap_units(model: nn.Module) -> None:
    uninstall(model)
    model.__dict__.pop(_DECISION, None)


def applied_decisions(model: nn.Module) -> dict[str, Decision]:
    """Unit name -> decision currently applied (SAVE units are not listed)."""
    from .compiled import unwrap

    return dict(unwrap(model).__dict__.get(_DECISION, {}))


def _wrap(module: nn.Module, decision: Decision, save_ops: tuple[str, ...] = (), forward: Callable = None) -> Callable:
    """What runs instead of ``forward``, one unit of ``module`` (the module itself, one call of
    it, or a segment of its children: :mod:`memtune.unit_forwards`), under ``decision``."""

    if decision.recomputes:
        extra = {}
        if decision is Decision.SELECTIVE:
            from .selective import context_fn

            extra["context_fn"] = context_fn(save_ops)
        buffers = RecomputedBuffers(module)  # the recomputation must not write running stats again

        @functools.wraps(forward)
        def wrapped(*args, **kwargs):
            if not torch.is_grad_enabled():  # eval / no_grad: nothing to save, nothing to recompute
                return forward(*args, **kwargs)
            if torch.compiler.is_compiling():  # AOTAutograd applies buffer writes once, outside the recomputation
                return checkpoint(forward, *args, use_reentrant=False, **extra, **kwargs)
            return buffers.run(forward, lambda fn: checkpoint(fn, *args, use_reentrant=False, **extra, **kwargs))
    elif decision is Decision.OFFLOAD:
        from .offload import ActivationOffload

        offload = ActivationOffload(device_types=OFFLOAD_DEVICE_TYPES)  # read when the plan is applied

        @functools.wraps(forward)
        def wrapped(*args, **kwargs):
            if not torch.is_grad_enabled():
                return forward(*args, **kwargs)
            return offload.run(forward, *args, buffers=tuple(module.buffers()), **kwargs)
    else:  # pragma: no cover - SAVE is never wrapped
        raise ValueError(decision)
    return wrapped


def build_plan_optimizer(model: nn.Module, plan: Plan, settings=None) -> torch.optim.Optimizer | None:
    """The optimizer ``plan.optimizer`` names, built exactly as the profile recorded it
    (:func:`memtune.optimizers.build_plan_stepper`): stepped one parameter at a time when the
    plan's levers ask for it (:func:`plan_stepping`). ``settings`` contributes only learning
    rates and other hyperparameters that change no allocation."""
    from .optimizers import build_plan_stepper

    return build_plan_stepper(model, plan.optimizer, settings=settings, **plan_stepping(plan))
