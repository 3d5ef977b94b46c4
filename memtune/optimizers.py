"""Which optimizers a plan can name, and the one function that builds them.

memtune knows two kinds of optimizer:

* **families** it can re-configure (:data:`FAMILIES`): ``muon2``, ``muon`` and ``adamw``. A plan
  may change their optimizer-state precision and, for the Muon variants, the Newton-Schulz
  step count; :mod:`memtune.optim` implements all of them.
* optimizers it only **keeps** as profiled (:data:`KEPT`): ``adam`` and ``sgd`` (PyTorch's),
  ``custom`` (a callable the user passed to :func:`memtune.profile`) and ``none``.

:func:`build_optimizer_for` is the only place an optimizer is constructed from a plan's
:class:`~memtune.plan.OptimizerPlan`. The profiler records each optimizer configuration by
building it here on fake parameters, and :func:`memtune.apply_plan` builds the live one here,
so the step that was measured is the step that runs.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

from .errors import MemtuneError

@dataclass(frozen=True, slots=True)
class OptimizerKind:
    """What memtune knows about an optimizer a profile or plan can name."""

    name: str
    reconfigurable: bool
    """A plan may change its state precision (and, when it orthogonalizes, its NS steps):
    memtune builds it (:mod:`memtune.optim`). Otherwise the plan keeps it as profiled."""
    orthogonalizes: bool = False
    """It runs Newton-Schulz on hidden matrices (the Muon family), so NS steps are a choice."""
    ns_floor: int = 0
    """The quality floor of Newton-Schulz iterations: the planner's default ``min_ns_steps`` and
    what a profile records by default. Fewer NS steps cost no memory and save time, so a
    time-minimizing plan sits on this floor (docs/muon2.md says where the values come from)."""


OPTIMIZERS: dict[str, OptimizerKind] = {k.name: k for k in (
    OptimizerKind("muon2", reconfigurable=True, orthogonalizes=True, ns_floor=3),
    OptimizerKind("muon", reconfigurable=True, orthogonalizes=True, ns_floor=5),
    OptimizerKind("adamw", reconfigurable=True),
    OptimizerKind("adam", reconfigurable=False),
    OptimizerKind("sgd", reconfigurable=False),
    OptimizerKind("custom", reconfigurable=False),
    OptimizerKind("none", reconfigurable=False),
)}
"""Every optimizer name a profile or a plan may carry; the one place they are spelled."""

FAMILIES = tuple(n for n, k in OPTIMIZERS.items() if k.reconfigurable)
"""Optimizers whose state precision (and NS steps) a plan may choose."""
KEPT = tuple(n for n, k in OPTIMIZERS.items() if not k.reconfigurable)
"""Optimizers a plan keeps exactly as profiled."""
NAMES = tuple(OPTIMIZERS)

DEFAULT_NS_STEPS = {n: k.ns_floor for n, k in OPTIMIZERS.items() if k.reconfigurable}
"""Each family's Newton-Schulz floor (:attr:`OptimizerKind.ns_floor`)."""


@dataclass(frozen=True, slots=True)
class StatePrecision:
    """One optimizer-state precision a plan may choose."""

    name: str
    bytes_per_element: int
    lossiness: int
    """How far it moves training from fp32 state (0: not at all), on the scale of
    :meth:`memtune.levers.Lever.lossiness`."""


STATE_PRECISIONS: dict[str, StatePrecision] = {p.name: p for p in (
    StatePrecision("fp32", bytes_per_element=4, lossiness=0),
    StatePrecision("bf16", bytes_per_element=2, lossiness=2),
    StatePrecision("int8", bytes_per_element=1, lossiness=3),  # blockwise absmax (memtune.optim.quant)
)}
STATE_DTYPES = tuple(STATE_PRECISIONS)


def orthogonalizes(name: str) -> bool:
    """Whether optimizer ``name`` runs Newton-Schulz (so a plan chooses its NS steps)."""
    kind = OPTIMIZERS.get(name)
    return kind is not None and kind.orthogonalizes


HYPERPARAMETERS = ("lr", "adamw_lr", "momentum", "beta2", "eps", "betas", "adamw_eps", "weight_decay",
                   "adamw_weight_decay")
"""OptimizerSettings fields that change values but never what is allocated: a caller's settings
supply these, the plan supplies the rest (the structure that was measured)."""

TORCH_LR = 1e-3


def ns_floor(name: str) -> int:
    kind = OPTIMIZERS.get(name)
    return kind.ns_floor if kind is not None else 0


def build_optimizer_for(model: nn.Module, opt, *, settings: Any = None, foreach: bool | None = None
                        ) -> torch.optim.Optimizer | None:
    """The optimizer ``opt`` (an :class:`~memtune.plan.OptimizerPlan`) names, on ``model``'s
    trainable parameters.

    ``opt.settings`` (the :class:`memtune.optim.OptimizerSettings` that was profiled, as plain
    data) fixes the structure: implementation, NS dtype, factorization, parameter split.
    ``settings`` (optional) contributes only :data:`HYPERPARAMETERS` such as learning rates.
    ``foreach`` selects PyTorch's multi-tensor path for the PyTorch optimizers (default: when
    the parameters are on CUDA, as PyTorch itself defaults)."""
    params = [p for p in model.parameters() if p.requires_grad]
    if foreach is None:
        foreach = any(p.is_cuda for p in params)
    name = opt.name
    if name == "none":
        return None
    if name == "custom":
        raise MemtuneError("this plan keeps the custom optimizer it was profiled with, which memtune cannot rebuild; "
                           "pass it in: memtune.apply_plan(model, plan, optimizer=my_optimizer)")
    if opt.settings is None:
        lr = getattr(settings, "adamw_lr", TORCH_LR) if settings is not None else TORCH_LR
        if name == "adamw" and opt.state_dtype == "fp32":
            return torch.optim.AdamW(params, lr=lr, foreach=foreach)
        if name == "adam":
            return torch.optim.Adam(params, lr=lr, foreach=foreach)
        if name == "sgd":
            return torch.optim.SGD(params, lr=lr, momentum=0.9, foreach=foreach)
        raise MemtuneError(f"plan optimizer {opt.key} carries no settings; re-plan it from a memtune profile")
    from memtune.optim import OptimizerSettings, build_optimizer, split_parameters

    structure = OptimizerSettings.from_dict(opt.settings)
    if settings is not None:
        structure = dataclasses.replace(structure, **{f: getattr(settings, f) for f in HYPERPARAMETERS})
    structure = dataclasses.replace(structure, name=name, ns_steps=max(1, opt.ns_steps or structure.ns_steps),
                                    state_dtype=opt.state_dtype)
    if name != "adamw" and (opt.muon_params or opt.adamw_params):
        default = split_parameters(model, structure)
        want_muon = set(opt.muon_params)
        overrides = dict(structure.overrides)
        overrides.update({f: "adamw" for f in default.muon if f not in want_muon})
        overrides.update({f: name for f in default.adamw if f in want_muon})
        structure = dataclasses.replace(structure, overrides=overrides)
    return build_optimizer(model, structure)


def optimizer_split(model: nn.Module, optimizer) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(Muon/Muon² parameter FQNs, the others) of a built optimizer over ``model``."""
    names = {id(p): n for n, p in model.named_parameters()}
    muon: list[str] = []
    parts = getattr(optimizer, "parts", None)
    if parts:
        for part_name, part in parts.items():
            if orthogonalizes(part_name):
                muon += [names[id(p)] for g in part.param_groups for p in g["params"] if id(p) in names]
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    chosen = set(muon)
    return tuple(f for f in trainable if f in chosen), tuple(f for f in trainable if f not in chosen)


def optimizer_parts(opt) -> list:
    """The optimizers that step ``opt``'s parameters: through a
    :class:`~memtune.stepping.PlanOptimizer` to its inner optimizer, and a hybrid's parts."""
    inner = getattr(opt, "inner", opt)
    return list((getattr(inner, "parts", None) or {"": inner}).values())


def as_on_target(opt, target: str):
    """``opt`` (built on fake or meta parameters by the profiler) set to take the choices that
    depend on the device as the target device will: Muon²'s batched Newton-Schulz
    (``batch_ns=None`` resolves by the parameters' device, and a fake or meta tensor would
    answer for the wrong one). Returns ``opt``."""
    for part in optimizer_parts(opt):
        for g in getattr(part, "param_groups", ()):
            if "batch_ns" in g and g["batch_ns"] is None:
                g["batch_ns"] = target != "cpu"
    return opt


def build_plan_stepper(model: nn.Module, opt, *, settings: Any = None, foreach: bool | None = None,
                       pin_memory: bool | None = None, **stepping):
    """:func:`build_optimizer_for`, wrapped in a :class:`memtune.stepping.PlanOptimizer` when the
    plan's levers step it one parameter at a time (``stepping``: its ``in_backward``,
    ``offload`` and ``weights`` options)."""
    inner = build_optimizer_for(model, opt, settings=settings, foreach=foreach)
    if inner is None or not stepping:
        return inner
    from .stepping import PlanOptimizer

    return PlanOptimizer(inner, model, pin_memory=pin_memory, **stepping)
