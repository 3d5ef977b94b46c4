"""``apply_plan``: make a live model follow a :class:`~memtune.plan.Plan`.

    >>> opt = memtune.apply_plan(model, plan)               # builds the plan's optimizer
    >>> opt = memtune.apply_plan(model, new_plan, optimizer=opt)   # re-plan, keep the optimizer
    >>> memtune.remove_plan(model)

* RECOMPUTE units run ``torch.utils.checkpoint.checkpoint(forward, ..., use_reentrant=False)``;
* OFFLOAD units run their forward under ``torch.autograd.graph.save_on_cpu`` (pinned when CUDA
  is available);
* SAVE units run unchanged.

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

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from .errors import MemtuneError
from . import loss_chunking
from .fake_compat import disable_kv_cache
from .plan import Decision, Plan
from .validation import check_plan_matches_model

log = logging.getLogger("memtune.apply")

_ORIGINAL = "_memtune_original_forward"
"""Attribute holding what ``module.__dict__['forward']`` was before memtune (``None``: the class's)."""
_DECISION = "_memtune_decision"


def apply_plan(model: nn.Module, plan: Plan, *, optimizer: torch.optim.Optimizer | None = None,
               settings=None) -> torch.optim.Optimizer:
    """Apply ``plan``'s unit decisions to ``model`` and return the optimizer to train it with.

    Args:
        model: the model that was profiled (same unit FQNs).
        plan: from :func:`memtune.plan`.
        optimizer: keep this optimizer (only unit decisions change), e.g. when the runtime
            re-plans mid-training.
        settings: a :class:`memtune.optim.OptimizerSettings` for learning rates and other
            hyperparameters; everything that decides memory (optimizer, NS steps and dtype, state
            precision, parameter split) is the plan's, as the profile recorded it.
    """
    from .compiled import unwrap

    model = unwrap(model)  # under torch.compile, plan the module Dynamo traces; the next call recompiles it
    check_plan_matches_model(model, plan)
    modules = dict(model.named_modules())
    missing = [u for u in plan.decisions if u not in modules]
    if missing:
        raise MemtuneError(
            f"plan names units {missing[:3]} that {type(model).__name__} does not have; plan for this model "
            f"(memtune.plan(memtune.profile(model, batch), ...)) or pass the model that was profiled")
    remove_plan(model)
    for fqn, decision in plan.decisions.items():
        if decision is not Decision.SAVE:
            _wrap(modules[fqn], decision)
    disable_kv_cache(model)
    loss_chunking.apply(model, plan.loss_chunks)
    masters = _store_weights(model, plan.weights)
    if optimizer is not None:
        from .stepping import rewrap

        return rewrap(optimizer, model, in_backward=plan.optimizer_in_backward, offload=plan.optimizer.offload,
                      weights=plan.weights)
    opt = build_plan_optimizer(model, plan, settings)
    if masters:
        for p, value in masters.items():
            opt.seed_master(p, value)
    return opt


def remove_plan(model: nn.Module) -> None:
    """Undo :func:`apply_plan`'s forward changes: every unit runs its own forward again and the
    loss is no longer chunked. Parameters a plan stored in bf16 stay in bf16."""
    from .compiled import unwrap

    model = unwrap(model)
    loss_chunking.remove(model)
    for m in model.modules():
        if _ORIGINAL in m.__dict__:
            original = m.__dict__.pop(_ORIGINAL)
            m.__dict__.pop(_DECISION, None)
            if original is None:
                m.__dict__.pop("forward", None)
            else:
                m.__dict__["forward"] = original


def applied_decisions(model: nn.Module) -> dict[str, Decision]:
    """Unit FQN -> decision currently applied (SAVE units are not listed)."""
    return {n: m.__dict__[_DECISION] for n, m in model.named_modules() if _DECISION in m.__dict__}


def _wrap(module: nn.Module, decision: Decision) -> None:
    original = module.__dict__.get("forward")
    forward = original if original is not None else module.forward  # bound class method

    if decision is Decision.RECOMPUTE:
        @functools.wraps(forward)
        def wrapped(*args, **kwargs):
            if not torch.is_grad_enabled():  # eval / no_grad: nothing to save, nothing to recompute
                return forward(*args, **kwargs)
            return checkpoint(forward, *args, use_reentrant=False, **kwargs)
    elif decision is Decision.OFFLOAD:
        pack, unpack = _offload_hooks(pin_memory=torch.cuda.is_available())

        @functools.wraps(forward)
        def wrapped(*args, **kwargs):
            with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
                return forward(*args, **kwargs)
    else:  # pragma: no cover - SAVE is never wrapped
        raise ValueError(decision)
    module.__dict__[_ORIGINAL] = original
    module.__dict__[_DECISION] = decision
    module.__dict__["forward"] = wrapped


def _offload_hooks(*, pin_memory: bool):
    """Saved-tensor hooks that keep activations in host memory between forward and backward.

    Unlike ``torch.autograd.graph.save_on_cpu``, parameters (and any other leaf that requires
    grad) stay where they are: they live on the device anyway, and copying a weight out and back
    for every op that saves it would cost a device-side copy of the weight in backward."""

    def pack(t: torch.Tensor):
        if (t.is_leaf and t.requires_grad) or t.device.type == "cpu":
            return (None, t)
        host = torch.empty(t.size(), dtype=t.dtype, layout=t.layout, pin_memory=pin_memory)
        host.copy_(t, non_blocking=pin_memory)
        return (t.device, host)

    def unpack(packed):
        device, t = packed
        return t if device is None else t.to(device, non_blocking=pin_memory)

    return pack, unpack


def build_plan_optimizer(model: nn.Module, plan: Plan, settings=None) -> torch.optim.Optimizer | None:
    """The optimizer ``plan.optimizer`` names, built exactly as the profile recorded it
    (:func:`memtune.optimizers.build_plan_stepper`): stepped one parameter at a time when the
    plan steps in backward, offloads its state or stores bf16 weights. ``settings`` contributes
    only learning rates and other hyperparameters that change no allocation."""
    from .optimizers import build_plan_stepper

    return build_plan_stepper(model, plan.optimizer, settings=settings, in_backward=plan.optimizer_in_backward,
                              weights=plan.weights)


def _store_weights(model: nn.Module, weights: str | None) -> dict:
    """Store the floating parameters in bf16 when the plan says so (in place: the Parameter
    objects, their FQNs and any optimizer referencing them are kept). For ``bf16-master`` the
    fp32 values become the master copies, one parameter at a time."""
    from .stepping import bf16_weight_names

    masters = {}
    if not weights:
        return masters
    names = bf16_weight_names(model)
    for n, p in model.named_parameters():
        if n in names and p.dtype != torch.bfloat16:
            if weights == "bf16-master" and p.requires_grad:
                masters[p] = p.detach().float().cpu() if torch.cuda.is_available() else p.detach().clone()
            p.data = p.data.to(torch.bfloat16)
    return masters
