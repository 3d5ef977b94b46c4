"""Record what each optimizer configuration a plan may choose costs, on fake parameters.

A plan may change the optimizer's state precision, its Newton-Schulz step count, or (when the
caller asks) the optimizer itself. Each such configuration is built with
:func:`memtune.optimizers.build_optimizer_for` (the function :func:`memtune.apply_plan`
uses), on the model's fake parameters with fake gradients. A few steps run to reach the
steady state, then one ``optimizer.step()`` runs under a
:class:`~memtune.recorder.StepRecorder`. The result (:class:`~memtune.profile.OptimizerStepProfile`)
is the state's bytes and the step's temporaries: dequantized copies, batched Newton-Schulz
stacks and workspaces, foreach lists, whatever the implementation allocates. The memory
model replays it; nothing about an optimizer is estimated from a formula.
"""

from __future__ import annotations

import torch

from .optimizers import FAMILIES, build_optimizer_for, optimizer_split
from .plan import OptimizerPlan
from .profile import OptimizerStepProfile
from .recorder import StepRecorder

WARMUP_STEPS = 1
"""Steps before the measured one. The first creates the state and ends by writing it in its
own precision (e.g. int8 codes), so the measured step is already a steady-state step: it
reads that state and replaces it, as every later step does."""


def optimizer_state_tensors(opt) -> list[torch.Tensor]:
    """Every tensor in ``opt``'s state (none for ``None``)."""
    from torch.utils._pytree import tree_flatten

    if opt is None:
        return []
    leaves, _ = tree_flatten([dict(s) for s in opt.state.values()])
    return [t for t in leaves if isinstance(t, torch.Tensor)]


def unique_bytes(tensors, nbytes) -> int:
    seen, total = set(), 0
    for t in tensors:
        key = id(t.untyped_storage())
        if key not in seen:
            seen.add(key)
            total += nbytes(t)
    return total


def record_optimizer_step(view, fparams: dict[str, torch.Tensor], config: OptimizerPlan, *, granularity: int,
                          target: str, foreach: bool, with_grad: set[str], profiled: bool = False
                          ) -> OptimizerStepProfile:
    """Build ``config`` on ``view`` (a module exposing ``fparams``, fake or meta parameters) and
    record a steady-state step. ``with_grad``: FQNs of the parameters that received a gradient
    in the recorded training step (only those are stepped, as in training)."""
    from .devices import round_allocation

    opt = build_optimizer_for(view, config, foreach=foreach)
    if config.name in FAMILIES:
        muon, adamw = optimizer_split(view, opt)
    else:
        muon, adamw = (), tuple(n for n, p in fparams.items() if p.requires_grad)
    stepped = [p for n, p in fparams.items() if n in with_grad]
    try:
        for _ in range(WARMUP_STEPS):
            for p in stepped:
                p.grad = torch.zeros_like(p)
            if opt is not None:
                opt.step()
        rec = StepRecorder(granularity=granularity, target=target)
        with rec:
            rec.register_static(list(fparams.values()), [p.grad for p in stepped], optimizer_state_tensors(opt))
            rec.mark("optim_start")
            if opt is not None:
                opt.step()
            rec.mark("optim_end")
        interval = rec.intervals[0]
        nbytes = lambda t: round_allocation(t.untyped_storage().nbytes(), granularity)  # noqa: E731
        state = unique_bytes(optimizer_state_tensors(opt), nbytes)
    finally:
        for p in fparams.values():
            p.grad = None
    return OptimizerStepProfile(
        name=config.name, state_dtype=config.state_dtype, ns_steps=config.ns_steps, settings=config.settings,
        muon_params=muon, adamw_params=adamw, state_bytes=state,
        step_transient_bytes=max(0, interval.peak_bytes - interval.live_bytes), profiled=profiled)
