"""Weight offload: every unit's own parameters live in (pinned) host memory and stream through
the device, one unit ahead, in forward and again in backward; their gradients go to host memory
as they complete, and their optimizer step runs on the host, where their state lives
(ZeRO-Offload/ZeRO-Infinity's parameter offload, FSDP2's ``CPUOffloadPolicy`` on one device),
except Muon²'s Newton-Schulz, which runs on the GPU wherever that is priced faster
(:meth:`_Streamed.place_newton_schulz`).
Parameters outside every unit, or shared between units (tied embeddings), stay on the device.

Recorded, not modelled: the step recording runs :class:`memtune.streaming.WeightStream` on the
fake parameters, and the recorder follows each device copy's storage as it is allocated, freed
(resized to zero) and fetched again; the optimizer recording steps only the parameters left on
the device (the others step in host memory). On a CUDA target the host copies, host gradients
and host state are not counted against the device; they are the plan's host bytes. On a CPU
target host memory *is* the device, so the lever saves nothing there: it is recorded and planned
only when asked for, and its recordings then count every copy (what a CPU run measures).

Its price (:func:`memtune.cost_model.weight_stream_seconds`) is a timeline of the copies against
forward and backward, with the one-unit prefetch, and the host optimizer step.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from .base import Applied, ProfileContext, SwitchLever


class WeightOffloadLever(SwitchLever):
    name = "weight_offload"
    affects_step = True
    affects_optimizer = True
    changeable_mid_run = False  # moving the weights between memories mid-run is not done
    runs_compiled = False  # its hooks swap the modules' parameters, which a compiled graph would guard on
    profile_on_demand = True  # the runtime records it only when nothing fits without it (or only lossily)
    lossless = True
    numerics = "none: the parameters are copied, not changed, and step in fp32 on the host"
    record_hint = "weight offload (parameters in host memory, streamed per unit)"

    def default_space(self, ctx: ProfileContext) -> tuple:
        return (False, True) if ctx.target_kind != "cpu" else (False,)

    def plan_choices(self, profile, options, recorded: tuple) -> tuple:
        if profile.target == "cpu" and options.lever_choices(self.name) is None:
            return (False,)  # host memory is the budget: streaming through it frees nothing (unless asked)
        return super().plan_choices(profile, options, recorded)

    def compatible(self, value, variant) -> str:
        if not value:
            return ""
        if variant.state_offload:
            return "weight offload keeps the streamed parameters' optimizer state in host memory already"
        if variant.optimizer_in_backward:
            return "weight offload steps the streamed parameters on the host after backward"
        if variant.weights is not None:
            return "weight offload streams the parameters as they are stored; bf16 weights are not combined with it"
        return ""

    @contextlib.contextmanager
    def recording(self, value, setup) -> Iterator[None]:
        from memtune.step_recording import RecordingKind

        if setup.kind is RecordingKind.OPTIMIZER:
            setup.host_params = _streamed(setup)
        else:
            setup.param_hooks.append(lambda rec, fparams: _stream_in_recording(rec, setup))
        yield

    def cost(self, value, ctx) -> None:
        from memtune.cost_model import weight_stream_seconds

        ctx.add_term(self.name, weight_stream_seconds)

    def describe(self, value) -> str:
        return ("parameters in host memory, streamed per unit (host optimizer step)" if value
                else "parameters on the device")

    def suggest(self, profile, options, recorded) -> str | None:
        return None if profile.target == "cpu" else super().suggest(profile, options, recorded)

    def apply(self, model, value, ctx) -> Applied:
        streamed = _Streamed(model, ctx.plan, ctx.device)
        ctx.after_optimizer.append(streamed.place_newton_schulz)
        return streamed


def _unit_modules(model, unit_fqns) -> list:
    from memtune.units import split_unit

    modules = dict(model.named_modules())
    out = []
    for name in unit_fqns:
        fqn, call, span = split_unit(name)
        if call is not None:
            continue  # a shared module's call: its parameters serve other calls too
        mod = modules[fqn]
        out.append((name, list(mod.children())[span[0]:span[1]] if span is not None else [mod]))
    return out


def _install(model, unit_fqns, device, observer):
    """A :class:`~memtune.streaming.WeightStream` over ``model``'s units, its hooks installed at
    the unit boundaries the profiler's recorder uses: (stream, hook handles)."""
    from memtune.step_recording import hook_units
    from memtune.streaming import WeightStream

    units = _unit_modules(model, unit_fqns)
    ws = WeightStream(model, units, device, observer=observer)
    modules = dict(model.named_modules())
    return ws, ws.install(lambda pre, post: hook_units(modules, [u for u, _ in units], pre, post))


def _streamed(setup) -> set[str]:
    from memtune.streaming import owned_parameters

    return {fqn for slots in owned_parameters(setup.model, _unit_modules(setup.model, setup.units)).values()
            for _, _, fqn in slots}


def _stream_in_recording(rec, setup) -> list:
    """Run the stream in a step recording: the recorder follows every copy's storage."""
    from memtune.streaming import StreamObserver

    on_device = rec.target == "cpu"

    class Observer(StreamObserver):
        def created(self, copy):
            rec.mark_weight(copy)

        def resized(self, copy, nbytes):
            rec.resize(copy, nbytes)

        def host_grad(self, grad):
            if on_device:
                rec.grad_bytes += rec.nbytes_of(grad)
            else:
                rec.exclude(grad)

    ws, handles = _install(setup.model, setup.units, None, Observer())
    names = set(ws.streamed)
    if not on_device:
        rec.host_static([p for n, p in setup.params.items() if n in names])

    class _Drop:
        def remove(self):
            ws.drop()
    return [*handles, _Drop()]


class _Streamed(Applied):
    """The model's units streamed: their parameters moved to host memory (pinned on CUDA)."""

    def __init__(self, model, plan, device):
        import torch

        from memtune.streaming import to_host

        self.plan = plan
        self.device = device or next((p.device for p in model.parameters()), torch.device("cpu"))
        self.stream, self.handles = _install(model, list(plan.decisions), self.device, None)
        params = dict(model.named_parameters())
        self.host_params = tuple(params[n] for n in self.stream.streamed)
        to_host(self.host_params, pin=self.device.type == "cuda")

    def place_newton_schulz(self, opt) -> None:
        """The streamed matrices' Newton-Schulz runs on the device where the cost model prices it
        faster than on the host, transfers included (:func:`memtune.cost_model.ns_on_device`;
        on a GPU that is all but the smallest matrices): their state and update stay on the host."""
        from memtune.cost_model import host_bandwidth, ns_on_device
        from memtune.devices import DEVICES, resolve_device
        from memtune.optim.muon2 import Muon2
        from memtune.optimizers import optimizer_parts

        if self.device.type != "cuda":
            return
        spec = DEVICES.get(self.plan.target) or resolve_device(self.device)
        steps, link = self.plan.optimizer.ns_steps or 1, host_bandwidth(spec)
        mine = {id(p) for p in self.host_params}
        for part in optimizer_parts(opt):
            if isinstance(part, Muon2):
                part.run_ns_on([p for g in part.param_groups for p in g["params"]
                                if id(p) in mine and ns_on_device(tuple(p.shape), steps, spec, link)], self.device)

    def discard_step(self) -> None:
        """Every host parameter back in its module, no device copy left."""
        self.stream.drop()

    def remove(self) -> None:
        from memtune.streaming import to_device

        for h in self.handles:
            h.remove()
        self.stream.drop()
        to_device(self.host_params, self.device)
