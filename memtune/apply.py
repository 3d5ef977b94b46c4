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
plan later switches units between decisions. A Hugging Face ``config.use_cache`` is turned
off: a KV cache keeps keys/values outside autograd and grows on every recomputation.
"""

from __future__ import annotations

import functools
import logging

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from .errors import MemtuneError
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
        settings: a :class:`memtune.optim.OptimizerSettings` for learning rates etc.; its
            name, NS steps, state precision and parameter split are replaced by the plan's.
    """
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
    config = getattr(model, "config", None)
    if config is not None and getattr(config, "use_cache", False):
        config.use_cache = False
    if optimizer is not None:
        return optimizer
    return build_plan_optimizer(model, plan, settings)


def remove_plan(model: nn.Module) -> None:
    """Undo :func:`apply_plan`: every unit runs its own forward again."""
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
        pin = torch.cuda.is_available()

        @functools.wraps(forward)
        def wrapped(*args, **kwargs):
            with torch.autograd.graph.save_on_cpu(pin_memory=pin):
                return forward(*args, **kwargs)
    else:  # pragma: no cover - SAVE is never wrapped
        raise ValueError(decision)
    module.__dict__[_ORIGINAL] = original
    module.__dict__[_DECISION] = decision
    module.__dict__["forward"] = wrapped


def build_plan_optimizer(model: nn.Module, plan: Plan, settings=None) -> torch.optim.Optimizer:
    """The optimizer ``plan.optimizer`` names, with its NS steps, state precision and split.

    AdamW with fp32 state is ``torch.optim.AdamW`` (foreach on CUDA, as the profiler measures
    it), so the planned memory matches the profile; everything else comes from
    :func:`memtune.optim.build_optimizer`."""
    o = plan.optimizer
    params = [p for p in model.parameters() if p.requires_grad]
    if o.name == "adamw" and o.state_dtype == "fp32" and settings is None:
        foreach = any(p.is_cuda for p in params)
        return torch.optim.AdamW(params, lr=1e-3, foreach=foreach)
    try:
        from memtune.optim import OptimizerSettings, build_optimizer, split_parameters
    except ImportError:
        if o.name == "adamw" and o.state_dtype == "fp32":
            return torch.optim.AdamW(params, lr=getattr(settings, "adamw_lr", 1e-3))
        raise MemtuneError(f"plan asks for {o.name} with {o.state_dtype} state, which needs memtune.optim; "
                           "install memtune completely or plan with optimizer='adamw', state_dtypes=('fp32',)")
    import dataclasses

    base = settings or OptimizerSettings()
    settings = dataclasses.replace(base, name=o.name, ns_steps=max(1, o.ns_steps or base.ns_steps),
                                   state_dtype=o.state_dtype)
    if o.name != "adamw" and (o.muon_params or o.adamw_params):
        default = split_parameters(model, settings)
        want_muon = set(o.muon_params)
        overrides = dict(base.overrides)
        for fqn in default.muon:
            if fqn not in want_muon:
                overrides[fqn] = "adamw"
        for fqn in default.adamw:
            if fqn in want_muon:
                overrides[fqn] = o.name
        settings = dataclasses.replace(settings, overrides=overrides)
    return build_optimizer(model, settings)
