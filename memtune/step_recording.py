"""Record one training step on fake tensors and turn it into per-unit profile data.

:func:`record_step` runs forward, loss, backward and ``optimizer.step()`` under a
:class:`~memtune.recorder.StepRecorder`, marking unit boundaries with module hooks (forward)
and autograd multi-grad hooks (backward). :func:`assemble_recording` turns the recorder's
intervals and storages into the ``units``, ``storages`` and ``timeline`` of a profile.

What the step runs with is a :class:`RecordingSetup`. The profiler fills one for the profiled
step; to record a step variant, each lever's recording context (:meth:`memtune.levers.Lever.recording`)
changes the setup as its choice changes the step (the batch, the parameters' dtypes, hooks on
the gradients, the model's loss...), so this module knows no lever. The optimizer recordings
(:mod:`memtune.optimizer_recording`) use the same setup, of kind ``OPTIMIZER``.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Callable

import torch
from torch.utils._pytree import tree_flatten

from .batching import loss_from_output, split_batch
from .errors import TraceError
from .profile import OpRecord, StepEvent, StepPhase, StorageInfo, TimelineEvent, UnitProfile
from .recorder import StepRecorder
from .units import split_unit, unit_module_type


class RecordingKind(Enum):
    STEP = "step"
    """A training step (forward, loss, backward; the optimizer step around it)."""
    OPTIMIZER = "optimizer"
    """An optimizer step alone, on meta parameters (:mod:`memtune.optimizer_recording`)."""


@dataclass(eq=False)
class RecordingSetup:
    """What one recording runs with; levers' recording contexts change it (see the module docstring)."""

    kind: RecordingKind
    model: torch.nn.Module
    params: dict[str, torch.Tensor]
    """The parameters the recording runs on (fake for a step, meta for an optimizer step), by FQN."""
    make_param: Callable[[torch.Tensor, torch.dtype], torch.Tensor]
    """An empty parameter like the given one, in the given dtype, of the recording's kind."""
    sample: Any = None
    """The batch the step runs on (a step recording)."""
    batch_size: int | None = None
    """Leading dimension of the profiled batch."""
    precision: str = "fp32"
    accumulate_weight: float | None = None
    """Gradient accumulation: every gradient exists from the start and the loss is scaled by this."""
    static: list = field(default_factory=list)
    """Extra tensors alive before the step (the whole batch when the step runs on part of it)."""
    stepping: dict[str, Any] = field(default_factory=dict)
    """:class:`memtune.stepping.PlanOptimizer` options the choices ask for (per-parameter stepping)."""
    param_hooks: list[Callable[[StepRecorder, dict], list]] = field(default_factory=list)
    """Called with the recorder and the parameters once it counts gradients; return hook handles."""
    order: tuple[str, ...] | None = None
    """The order backward completes the gradients in (optimizer recordings stepped per parameter)."""
    facts: dict[str, Any] = field(default_factory=dict)
    """What earlier recordings of the same profile learnt, for later ones (shared between setups)."""
    recorder: StepRecorder | None = None
    """The recorder, once the recording has run."""
    grad_order: list[str] = field(default_factory=list)
    """The parameters in the order backward completed their gradients, once the step has run."""
    units: tuple[str, ...] = ()
    """The profile's units (names as :func:`memtune.units.split_unit` reads them)."""
    host_params: set[str] = field(default_factory=set)
    """Parameters that live and step in host memory (an optimizer recording)."""

    def retype_params(self, dtypes: dict[str, torch.dtype]) -> None:
        """Store the parameters named in ``dtypes`` in those dtypes (new empty parameters; the
        step recordings of one profile share them, an optimizer recording gets its own)."""
        if not any(self.params[n].dtype != dt for n, dt in dtypes.items() if n in self.params):
            return
        key = ("params", tuple(sorted((n, str(dt)) for n, dt in dtypes.items())))
        if self.kind is RecordingKind.STEP and key in self.facts:
            self.params = self.facts[key]
            return
        self.params = {n: self.make_param(p, dtypes.get(n, p.dtype)).requires_grad_(p.requires_grad)
                       for n, p in self.params.items()}
        if self.kind is RecordingKind.STEP:
            self.facts[key] = self.params


def autocast(precision: str):
    if precision == "bf16-mixed":
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return nullcontext()


def forward_loss(model, fparams, fbuffers, fsample, loss_fn, precision) -> tuple[Any, torch.Tensor]:
    args, kwargs, target = split_batch(fsample, loss_fn)
    with autocast(precision):
        out = torch.func.functional_call(model, {**fparams, **fbuffers}, args, kwargs, strict=False)
        loss = loss_from_output(out, fsample, target, loss_fn)
    return out, loss


def on_backward_start(outs: list[torch.Tensor], fn: Callable[[], None]) -> list:
    """Call ``fn`` once, where backward first runs a node that takes one of ``outs``' gradients:
    after every hook on those gradients has run (hooks that free memory there, as weight
    offload's release of the unit after this one, come before this unit's backward and its
    recomputation). Returns the hook handles."""
    fired = [False]

    def once(*_):
        if not fired[0]:
            fired[0] = True
            fn()

    handles = []
    for t in outs:
        if t.grad_fn is not None:  # node pre-hooks run after the tensor hooks on its inputs
            handles.append(t.grad_fn.register_prehook(lambda grad_outputs: once()))
        else:  # a leaf the unit returns as it is
            handles.append(t.register_hook(lambda grad: once()))
    return handles


def record_step(rec: StepRecorder, setup: RecordingSetup, unit_fqns, fbuffers, loss_fn, opt, *,
                step_optimizer: bool = True) -> None:
    """Run one training step as ``setup`` says, under ``rec``. ``opt``'s state is live for the
    whole step. Without ``step_optimizer`` the step between ``optim_start`` and ``optim_end`` is
    not run: the recording is replayed with another recording of the optimizer step, and only
    needs what is live around it."""
    from .optimizer_recording import optimizer_state_tensors

    model, fparams, fsample = setup.model, setup.params, setup.sample
    accumulate_weight = setup.accumulate_weight
    setup.recorder = rec
    modules = dict(model.named_modules())
    io: dict[str, dict[str, Any]] = {u: {"input_records": [], "output_records": []} for u in unit_fqns}
    handles = []

    def pre_hook(fqn):
        def hook(mod, args, kwargs):
            rec.mark(StepEvent.FWD_START, fqn)
            rec.unit_stack.append(fqn)
            leaves, _ = tree_flatten((args, kwargs))
            tensors = [t for t in leaves if isinstance(t, torch.Tensor) and not rec.is_static(t)]
            # Records, not tensors: holding a unit's inputs or outputs would keep alive what the
            # model frees (a Linear's output, once the ReLU after it has run).
            io[fqn]["input_records"] = _records(rec, tensors)
            grad_inputs = [t for t in tensors if t.requires_grad]
            if grad_inputs:
                torch.autograd.graph.register_multi_grad_hook(grad_inputs, lambda grads: _bwd_end(fqn), mode="all")
        return hook

    def post_hook(fqn):
        def hook(mod, args, kwargs, output):
            rec.unit_stack.pop()
            leaves, _ = tree_flatten(output)
            outs = [t for t in leaves if isinstance(t, torch.Tensor)]
            io[fqn]["output_records"] = _records(rec, outs)
            grad_outs = [t for t in outs if t.requires_grad]
            if grad_outs:
                handles.extend(on_backward_start(grad_outs, lambda: _bwd_start(fqn)))
            rec.mark(StepEvent.FWD_END, fqn)
        return hook

    def _bwd_start(fqn):
        rec.mark(StepEvent.BWD_START, fqn)
        rec.bwd_unit = fqn

    def _bwd_end(fqn):
        if rec.bwd_unit == fqn:
            rec.mark(StepEvent.BWD_END, fqn)
            rec.bwd_unit = None

    trainable = [p for p in fparams.values() if p.requires_grad]
    if accumulate_weight is not None:
        for p in trainable:
            p.grad = torch.zeros_like(p)
    handles += rec.watch_grads(list(fparams.values()), live_from_start=accumulate_weight is not None)
    setup.grad_order = []
    handles += [p.register_post_accumulate_grad_hook(lambda p, n=n: setup.grad_order.append(n))
                for n, p in fparams.items() if p.requires_grad]
    for add_hooks in setup.param_hooks:
        handles += add_hooks(rec, fparams)
    handles += hook_units(modules, unit_fqns, pre_hook, post_hook)
    try:
        with rec:
            grads = [p.grad for p in trainable if p.grad is not None]
            rec.register_static(list(fparams.values()), list(fbuffers.values()), list(setup.static), fsample,
                                optimizer_state_tensors(opt), grads)
            del grads
            rec.mark(StepEvent.START)
            with torch.autograd.graph.saved_tensors_hooks(rec.pack, rec.unpack):
                out, loss = forward_loss(model, fparams, fbuffers, fsample, loss_fn, setup.precision)
                # The runtime keeps the unscaled loss (to log it) while the scaled one backpropagates.
                scaled = loss * accumulate_weight if accumulate_weight is not None else loss
            del out
            rec.mark(StepEvent.LOSS)
            rec.phase = StepPhase.BACKWARD
            scaled.backward()
            rec.bwd_unit = None
            del loss, scaled
            rec.phase = StepPhase.OPTIMIZER
            rec.params_with_grad = tuple(n for n, p in fparams.items() if p.grad is not None)  # type: ignore[attr-defined]
            rec.mark(StepEvent.BWD_DONE)
            rec.mark(StepEvent.OPTIM_START)
            if opt is not None and step_optimizer:
                opt.step()
            rec.mark(StepEvent.OPTIM_END)
            if opt is not None:
                opt.zero_grad(set_to_none=True)
            for p in fparams.values():
                p.grad = None
            rec.grad_bytes = 0
            rec.mark(StepEvent.END)
    finally:
        for h in handles:
            h.remove()
    rec.unit_io = io  # type: ignore[attr-defined]


def hook_units(modules: dict[str, torch.nn.Module], unit_fqns, pre_hook, post_hook) -> list:
    """Forward hooks that call ``pre_hook(unit)(module, args, kwargs)`` where each unit's
    forward starts and ``post_hook(unit)(module, args, kwargs, output)`` where it ends:
    around a module unit; around call *k* of a shared module's (calls counted from the
    hooks' installation); before the first and after the last child of a segment. Returns
    the handles."""
    handles = []
    calls: dict[str, dict[int, str]] = {}
    for name in unit_fqns:
        fqn, call, span = split_unit(name)
        if call is not None:
            calls.setdefault(fqn, {})[call] = name
            continue
        first = last = modules[fqn]
        if span is not None:
            children = list(modules[fqn].children())
            first, last = children[span[0]], children[span[1] - 1]
        handles.append(first.register_forward_pre_hook(pre_hook(name), with_kwargs=True))
        handles.append(last.register_forward_hook(post_hook(name), with_kwargs=True))
    for fqn, by_call in calls.items():
        count, running = [0], []

        def pre(mod, args, kwargs, by_call=by_call, count=count, running=running):
            name = by_call.get(count[0])
            count[0] += 1
            running.append(name)
            if name is not None:
                pre_hook(name)(mod, args, kwargs)

        def post(mod, args, kwargs, output, by_call=by_call, running=running):
            name = running.pop()
            if name is not None:
                post_hook(name)(mod, args, kwargs, output)

        handles.append(modules[fqn].register_forward_pre_hook(pre, with_kwargs=True))
        handles.append(modules[fqn].register_forward_hook(post, with_kwargs=True))
    return handles


def _records(rec: StepRecorder, tensors: list[torch.Tensor]) -> list:
    seen, out = set(), []
    for t in tensors:
        r = rec.record_of(t)
        if r is not None and id(r) not in seen:
            seen.add(id(r))
            out.append(r)
    return out


def _op_records(entries, index: dict[int, int]) -> tuple[OpRecord, ...]:
    """The profile's per-op record of one unit's recorded ops (``index``: storage record id ->
    index into the profile's saved storages)."""
    return tuple(OpRecord(
        name=e.name, out_bytes=sum(r.nbytes for r in e.outputs),
        storages=tuple(index[id(r)] for r in e.outputs if id(r) in index), flops=e.flops, io_bytes=e.io_bytes,
        deps=e.deps, random=e.random, inplace=e.inplace, view=e.view, mutated=any(r.mutated for r in e.outputs),
        saves=e.saves,
        allocations=tuple((r.nbytes, r.freed_op, int(r.saved)) for r in e.outputs))
        for e in entries)


def assemble_recording(rec: StepRecorder, model, unit_fqns, *, workspace_bytes: int, unit_params: dict[str, tuple[int, int]]
                       ) -> dict[str, Any]:
    """The profile fields one recorded step determines: ``units`` (in execution order),
    ``storages``, ``timeline``, ``outside_activation_bytes``, ``baseline_peak_bytes`` and the
    FLOPs. ``unit_params`` maps a unit to its (parameter bytes, gradient bytes)."""
    modules = dict(model.named_modules())
    saved = [r for r in rec.records if r.saved]
    index = {id(r): i for i, r in enumerate(saved)}
    n_events = len(rec.intervals)
    storages = tuple(
        StorageInfo(nbytes=r.nbytes, created=r.created, freed=r.freed if r.freed is not None else n_events,
                    producer=r.producer, holders=tuple(r.holders), saved_outside=r.saved_outside)
        for r in saved
    )
    # Persistent kernel workspaces (cuBLAS on CUDA) are live for the whole step.
    timeline = tuple(TimelineEvent(name=iv.name, unit=iv.unit, live_bytes=iv.live_bytes + workspace_bytes,
                                   peak_bytes=iv.peak_bytes + workspace_bytes, grad_bytes=iv.grad_bytes)
                     for iv in rec.intervals)
    first = {}
    for i, iv in enumerate(rec.intervals):
        first.setdefault((iv.name, iv.unit), i)

    units = []
    for fqn in unit_fqns:
        io = rec.unit_io[fqn]
        fs = first.get((StepEvent.FWD_START, fqn))
        if fs is None:
            raise TraceError(f"unit {fqn!r} never ran in the forward pass; pick units the model calls (units=...)")
        fwd_transient = rec.intervals[fs].peak_bytes - rec.intervals[fs].live_bytes
        bs = first.get((StepEvent.BWD_START, fqn))
        if bs is None:
            bwd_transient = 0
        else:
            be = first.get((StepEvent.BWD_END, fqn))
            stop = be if be is not None and be > bs else bs + 1
            bwd_transient = max(iv.peak_bytes for iv in rec.intervals[bs:stop]) - rec.intervals[bs].live_bytes
        pbytes, gbytes = unit_params.get(fqn, (0, 0))
        in_recs = io["input_records"]
        units.append(UnitProfile(
            fqn=fqn, module_type=unit_module_type(modules, fqn), order=0, param_bytes=pbytes, grad_bytes=gbytes,
            saved_activation_bytes=sum(r.nbytes for r in saved if fqn in r.holders),
            input_bytes=sum(r.nbytes for r in in_recs),
            output_bytes=sum(r.nbytes for r in io["output_records"]),
            fwd_flops=rec.flops.get((StepPhase.FORWARD, fqn), 0), bwd_flops=rec.flops.get((StepPhase.BACKWARD, fqn), 0),
            fwd_transient_bytes=fwd_transient, bwd_transient_bytes=max(bwd_transient, 0),
            saved_storages=tuple(i for i, r in enumerate(saved) if fqn in r.holders),
            input_storages=tuple(index[id(r)] for r in in_recs if id(r) in index),
            input_storage_bytes=tuple(r.nbytes for r in in_recs),
            ops=_op_records(rec.unit_ops.get(fqn, ()), index),
        ))
    # Execution order may differ from registration order.
    units.sort(key=lambda u: first[(StepEvent.FWD_START, u.fqn)])
    units = [UnitProfile(**{**{f: getattr(u, f) for f in u.__slots__}, "order": i}) for i, u in enumerate(units)]
    total_flops = lambda phase: sum(v for (ph, _), v in rec.flops.items() if ph == phase)  # noqa: E731
    return dict(
        units=tuple(units), storages=storages, timeline=timeline,
        outside_activation_bytes=sum(s.nbytes for s in storages if s.saved_outside and not s.holders),
        baseline_peak_bytes=max(e.peak_bytes for e in timeline),
        fwd_flops=total_flops(StepPhase.FORWARD), bwd_flops=total_flops(StepPhase.BACKWARD),
    )
