"""bf16 weights: the parameters stored in bf16, updated through an fp32 working copy.

``bf16-sr`` rounds each update back stochastically (unbiased, no extra memory); ``bf16-master``
keeps an fp32 master copy with the optimizer state, which only makes sense in host memory, so it
comes with ``state_offload``. Batch norm keeps its affine parameters in fp32 beside its fp32
running statistics (:func:`memtune.stepping.bf16_weight_names`). The step runs under bf16
autocast, whatever the run's precision, so fp32 inputs meet the bf16 weights as profiled.
The mechanism is :class:`memtune.stepping.PlanOptimizer`.

Applied to a live model (:func:`memtune.apply_plan`), the lever also makes the model's own
forward run under that autocast, through two removable forward hooks on the model: a user's
plain loop (``model(x)``, no autocast of its own) then runs the forward the profile recorded
and the runtime runs, and fp32 inputs (audio features, images) meet the bf16 convolutions and
linears cast as they are there. Inside the runtime's own autocast the hooks change nothing.
A loss computed outside the model runs as the caller writes it: to compute it exactly as the
runtime does, compute it under :func:`memtune.apply.step_autocast`.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch

from memtune.stepping import MASTER, WeightMode, bf16_weight_names

from .base import Applied, Lever, ProfileContext


class WeightsLever(Lever):
    name = "weights"
    default = None
    affects_step = True
    affects_optimizer = True
    wraps_optimizer = True
    changeable_mid_run = False  # a re-plan never converts the parameters mid-run
    profile_on_demand = True
    legacy_hint = "weights=(None, 'bf16-sr', 'bf16-master') (bf16 parameters)"
    numerics = ("parameters rounded to bf16 after every update (stochastically, or from an fp32 master copy); "
                "forward and backward in bf16")

    def validate(self, value: Any) -> WeightMode | None:
        if value is None:
            return None
        try:
            return WeightMode(value)
        except ValueError:
            raise ValueError(f"weights={value!r}: use None (as profiled) or one of "
                             f"{[m.value for m in WeightMode]}") from None

    def encode(self, value: WeightMode | None) -> str | None:
        return None if value is None else value.value

    # ------------------------------------------------------------------ what to record
    def default_space(self, ctx: ProfileContext) -> tuple:
        trainable = [p for p in ctx.params.values() if p.requires_grad and p.is_floating_point()]
        low = bool(trainable) and all(p.dtype in (torch.float32, torch.bfloat16) for p in trainable)
        return (None, *WeightMode) if low else (None,)

    def legacy_allowed(self, options) -> tuple | None:
        return None if options.weights is None else tuple(self.validate(w) for w in options.weights)

    def compatible(self, value, variant) -> str:
        if value is WeightMode.BF16_MASTER and not variant.state_offload:
            return "bf16-master keeps an fp32 master copy, which fits only in host memory: it needs state_offload"
        return ""

    def recorded_as(self, value):
        # The training step stores the parameters alike under both modes; they differ only in the
        # optimizer state, which the optimizer recordings measure.
        return WeightMode.BF16_SR if value is not None else None

    def param_dtypes(self, value, model) -> dict[str, torch.dtype]:
        if value is None:
            return {}
        return {n: torch.bfloat16 for n in bf16_weight_names(model)}

    @contextlib.contextmanager
    def recording(self, value, setup) -> Iterator[None]:
        from memtune.step_recording import RecordingKind

        setup.retype_params(self.param_dtypes(value, setup.model))
        setup.stepping["weights"] = value
        if setup.kind is RecordingKind.STEP:
            setup.precision = "bf16-mixed"  # bf16 weights compute in bf16 (see the module docstring)
        yield

    # ------------------------------------------------------------------ cost and numerics
    def cost(self, value, ctx) -> None:
        if any(p.dtype == "float32" for p in ctx.profile.params):
            ctx.param_byte_scale = 0.5  # forward and backward move half the parameter bytes
        ctx.fp32_working_copy = True
        if value is WeightMode.BF16_MASTER:
            ctx.master_bytes_per_element = 4

    def lossiness(self, value) -> int:
        # bf16-master's updates are exact in fp32 and only the stored copy rounds; stochastic
        # rounding perturbs every update (unbiased, but noisier): measured in docs/benchmarks.md.
        return {None: 0, WeightMode.BF16_MASTER: 2, WeightMode.BF16_SR: 4}[value]

    # ------------------------------------------------------------------ words
    def describe(self, value) -> str:
        return {None: "weights as profiled", WeightMode.BF16_SR: "bf16 weights, stochastically rounded updates",
                WeightMode.BF16_MASTER: "bf16 weights with an fp32 master copy"}[value]

    def suggest(self, profile, options, recorded) -> str | None:
        if not any(v is not None for v in recorded):
            return (f"bf16 weights (profile with space=memtune.PlanSpace(levers={{'{self.name}': "
                    f"(None, 'bf16-sr')}}))")
        return super().suggest(profile, options, recorded)

    # ------------------------------------------------------------------ runtime
    def apply(self, model, value, ctx) -> Applied:
        """Store the parameters in bf16, in place (the Parameter objects, their FQNs and any
        optimizer holding them are kept). For ``bf16-master`` the fp32 values become the master
        copies, one parameter at a time, once the optimizer exists."""
        stored = _BF16Weights(model)
        names = set(self.param_dtypes(value, model))
        masters = {}
        for n, p in model.named_parameters():
            if n in names and p.dtype != torch.bfloat16:
                stored.original[n] = p.dtype
                if value is WeightMode.BF16_MASTER and p.requires_grad:
                    masters[p] = p.detach().float().cpu() if torch.cuda.is_available() else p.detach().clone()
                p.data = p.data.to(torch.bfloat16)

        def seed(optimizer) -> None:
            stored.optimizer = optimizer
            for p, master in masters.items():
                optimizer.seed_master(p, master)
            masters.clear()
        ctx.after_optimizer.append(seed)
        stored.forward_autocast = _ForwardAutocast(model)
        return stored

    def stepping(self, value) -> dict[str, Any]:
        return {"weights": value}


class _ForwardAutocast:
    """Forward hooks that run ``model``'s forward under bf16 autocast on its parameters' device,
    as the runtime runs a step under bf16 weights (:meth:`remove` takes them off). The exit hook
    is ``always_call``, so a forward that raises leaves no autocast behind. Under
    ``torch.compile`` the hooks run eagerly (Dynamo cannot trace a bare ``__enter__``), and the
    compiled forward runs under the autocast they set, as it would inside a ``with`` block."""

    def __init__(self, model: torch.nn.Module):
        self.active: list[torch.autocast] = []
        self.handles = [model.register_forward_pre_hook(self._enter, prepend=True),
                        model.register_forward_hook(self._exit, always_call=True)]

    @torch.compiler.disable
    def _enter(self, module, args) -> None:
        device = next((p.device.type for p in module.parameters()), "cpu")
        if not torch.amp.is_autocast_available(device):  # e.g. meta: nothing runs there to cast
            return
        autocast = torch.autocast(device, dtype=torch.bfloat16)
        autocast.__enter__()
        self.active.append(autocast)

    @torch.compiler.disable
    def _exit(self, module, args, output) -> None:
        if self.active:  # empty when a hook before ours raised, or on a device without autocast
            self.active.pop().__exit__(None, None, None)

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []


class _BF16Weights(Applied):
    precision = "bf16-mixed"

    def __init__(self, model):
        self.model = model
        self.original: dict[str, torch.dtype] = {}
        self.optimizer = None
        self.forward_autocast: _ForwardAutocast | None = None

    def remove(self) -> None:
        """Store the parameters in their own dtype again: from the fp32 master copy where the
        optimizer keeps one (the trained values, exactly), else by widening the bf16 values;
        the forward runs in the run's own precision again."""
        if self.forward_autocast is not None:
            self.forward_autocast.remove()
            self.forward_autocast = None
        state = getattr(self.optimizer, "state", {})
        for n, p in self.model.named_parameters():
            dtype = self.original.pop(n, None)
            if dtype is None:
                continue
            master = state.get(p, {}).get(MASTER) if p in state else None
            p.data = (master if master is not None else p.data).to(device=p.device, dtype=dtype)
