"""``memtune.profile``: measure one training step of a model without allocating its memory.

The model's parameters, buffers and the sample are replaced by fake tensors on the CPU
(``FakeTensorMode``), so a 7B model is profiled on a laptop: every op computes shapes,
dtypes and strides only. One steady-state training step (forward, loss, backward,
optimizer step, with the optimizer's state already created) runs under a
:class:`~memtune.recorder.StepRecorder`, which replays what the target's allocator would
do. The model may arrive on any device, including ``meta``; it is never modified.

Then every plan the space allows is priced from a measurement too: the step is recorded again
as each step variant runs it (each lever's recording context, :mod:`memtune.levers`), and
every optimizer configuration's step is recorded on meta parameters
(:mod:`memtune.optimizer_recording`), with the levers that change it.

The graph is captured with torch.fx (:mod:`memtune.tracing`): ``symbolic_trace`` where it
works, else an aten-level graph from ``make_fx`` over fake tensors. It is kept on the profile
as ``profile.graph``.

Why trace on fake *CPU* tensors when the target is CUDA: on a CPU-only torch, fake CUDA
tensors run forward but abort in autograd. The CUDA differences are modelled explicitly:
512-byte allocation rounding, the SDPA kernel CUDA would pick and what it saves, and the
optimizer implementation CUDA defaults to (``foreach``). See docs/profiler.md.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import torch
import torch.nn as nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._pytree import tree_flatten, tree_map_only

from .batching import LossFn, batch_size_of, describe
from .devices import CUDA_ALLOCATION_GRANULARITY, CUDA_WORKSPACE_BYTES, DeviceSpec, resolve_device
from .fake_compat import eager_hf_masking, kv_cache_as_configured, training_configs
from .errors import MemtuneError
from .levers import LEVERS, ProfileContext, combinations, held_at_default
from .optimizer_recording import ParamView, optimizer_state_tensors, record_configuration, unique_bytes
from .optimizers import FAMILIES, OPTIMIZERS, STATE_DTYPES, as_on_target, build_optimizer_for, ns_floor, orthogonalizes
from .plan import OptimizerPlan
from .profile import ModelProfile, OptimizerStepProfile, ParamInfo, StepEvent, StepRecording
from .recompute_safety import recompute_blockers
from .recorder import StepRecorder
from .stateful import BufferWrites, batch_statistics
from .stepping import PlanOptimizer
from .step_recording import RecordingKind, RecordingSetup, assemble_recording, record_step
from .tracing import capture_graph, classify_failure
from .units import UnitSpec, owns, resolve_units, split_unit, unit_param_prefixes
from .variant import StepVariant

PRECISIONS = ("fp32", "bf16-mixed")
OptimizerSpec = str | Callable[[list[torch.Tensor]], torch.optim.Optimizer]

_LEGACY_SPACE_FIELDS = {"micro_batch_sizes": "micro_batch_size", "weights": "weights",
                        "in_backward": "optimizer_in_backward", "state_offload": "state_offload",
                        "loss_chunks": "loss_chunks"}
"""PlanSpace fields of memtune 0.1 that became ``PlanSpace.levers`` entries (kept for one release)."""


@dataclass(frozen=True, kw_only=True, slots=True)
class PlanSpace:
    """What a profile records beyond the profiled step, so that every plan the planner may
    return is priced from a measurement. The defaults cover every plan :func:`memtune.plan`
    can return with its default options; narrower spaces profile faster."""

    optimizers: tuple[str, ...] | None = None
    """Optimizer families a plan may switch to (any of :data:`memtune.optimizers.FAMILIES`);
    ``None``: only the profiled optimizer's own family. Each costs a few fake optimizer steps."""
    state_dtypes: tuple[str, ...] = STATE_DTYPES
    """State precisions recorded for each family."""
    ns_steps: tuple[int, ...] | None = None
    """Newton-Schulz step counts recorded for the Muon families; ``None``: each family's default
    floor (:attr:`memtune.optimizers.OptimizerKind.ns_floor`) and the profiled optimizer's own."""
    levers: Mapping[str, tuple | None] = field(default_factory=dict)
    """Lever name -> the choices to record (the default is always recorded). A lever not listed
    records its own default space (:meth:`memtune.levers.Lever.recorded_choices`: e.g. every
    halving of the batch, both in-backward modes, bf16 weights when the parameters allow)."""
    micro_batch_sizes: tuple[int, ...] | None = None
    """Deprecated: ``levers={"micro_batch_size": ...}``."""
    weights: tuple[str | None, ...] | None = None
    """Deprecated: ``levers={"weights": ...}``."""
    in_backward: tuple[bool, ...] | None = None
    """Deprecated: ``levers={"optimizer_in_backward": ...}``."""
    state_offload: tuple[bool, ...] | None = None
    """Deprecated: ``levers={"state_offload": ...}``."""
    loss_chunks: tuple[int | None, ...] | None = None
    """Deprecated: ``levers={"loss_chunks": ...}``."""

    def __post_init__(self) -> None:
        bad = [o for o in (self.optimizers or ()) if o not in FAMILIES]
        if bad:
            raise ValueError(f"PlanSpace.optimizers: {bad} cannot be re-configured by a plan; use any of {FAMILIES}")
        if not self.state_dtypes or any(d not in STATE_DTYPES for d in self.state_dtypes):
            raise ValueError(f"PlanSpace.state_dtypes={self.state_dtypes!r}: use a non-empty subset of {STATE_DTYPES}")
        if self.ns_steps is not None and any(k < 1 for k in self.ns_steps):
            raise ValueError(f"PlanSpace.ns_steps={self.ns_steps!r}: Newton-Schulz needs at least 1 step")
        levers = dict(self.levers)
        for old, name in _LEGACY_SPACE_FIELDS.items():
            value = getattr(self, old)
            if value is not None:
                levers[name] = tuple(value)
                object.__setattr__(self, old, None)
        unknown = sorted(set(levers) - set(LEVERS))
        if unknown:
            raise ValueError(f"PlanSpace.levers: unknown lever(s) {unknown}; the levers are {list(LEVERS)}")
        for name, choices in levers.items():
            if choices is not None:
                try:
                    levers[name] = tuple(LEVERS[name].validate(v) for v in choices)
                except ValueError as e:
                    raise ValueError(f"PlanSpace.levers[{name!r}]: {e}") from None
        object.__setattr__(self, "levers", levers)

    @classmethod
    def minimal(cls, **overrides) -> "PlanSpace":
        """Only what a plan of unit decisions and state precisions needs: every lever at its
        default (fast profiles)."""
        levers = {**held_at_default(lambda lever: True), **overrides.pop("levers", {})}
        return cls(levers=levers, **overrides)

    def lever_choices(self, name: str) -> tuple | None:
        """The choices of lever ``name`` this space asks to record (``None``: the lever's default)."""
        return self.levers.get(name)

    def variants(self, ctx: ProfileContext) -> list[StepVariant]:
        """Every step variant the space records: the product of each lever's recorded choices,
        less the combinations that cannot run together, the profiled step first."""
        return combinations({name: lever.recorded_choices(self, ctx) for name, lever in LEVERS.items()})


def profile(
    model: nn.Module,
    sample: Any,
    *,
    loss_fn: LossFn | None = None,
    optimizer: OptimizerSpec = "adamw",
    precision: str = "fp32",
    target: str | torch.device | DeviceSpec = "cuda",
    units: UnitSpec = None,
    space: PlanSpace | None = None,
) -> ModelProfile:
    """Profile one training step of ``model`` on ``sample`` for the ``target`` device.

    Args:
        model: any ``nn.Module``, on any device (``meta`` included). It is not modified.
        sample: one batch, as the runtime would see it (see :mod:`memtune.batching`).
        loss_fn: how to get a loss from the model's output, when the model does not return one.
        optimizer: ``"adamw"``, ``"adam"``, ``"sgd"``, ``"muon2"``, ``"muon"``, ``"none"``, a
            :class:`memtune.optim.OptimizerSettings` (the exact hybrid that will train), or a
            callable that builds a ``torch.optim.Optimizer`` from a list of parameters.
        precision: ``"fp32"`` or ``"bf16-mixed"`` (autocast to bf16, fp32 master weights).
        target: ``"cuda"`` (an H100 unless a CUDA device is present), ``"cpu"``, a device-table
            name such as ``"A100-80GB"``, or a torch device.
        units: override the checkpointable units: FQNs, module types or a predicate.
        space: what else to record so plans can change it (:class:`PlanSpace`): optimizer
            configurations and every lever's choices (:mod:`memtune.levers`). Default: every
            plan the default planner options can return.
    """
    t0 = time.perf_counter()
    from .compiled import unwrap

    model = unwrap(model)  # a torch.compile wrapper: profile the module it compiles (its FQNs, its forwards)
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    run = _Run.prepare(model, sample, loss_fn=loss_fn, optimizer=optimizer, precision=precision, target=target,
                       units=units, space=space or PlanSpace())
    with training_configs(model) as cache_configs:
        with run.fake_mode, eager_hf_masking():  # by what the forward calls: shared modules, one unit per call
            run.unit_fqns = resolve_units(model, units, calls=_count_calls(run, also=run.unit_fqns))
        run.graph, run.tracer, run.tried = capture_graph(model, [split_unit(u)[0] for u in run.unit_fqns],
                                                         run.fake_mode, run.fparams, run.fbuffers,
                                                         run.fsample, loss_fn, precision, sample)
        with run.fake_mode, eager_hf_masking():
            main = _record_profiled_step(run)
            _unplanned_peak_with_kv_cache(run, main, cache_configs)
            step_variants = _record_step_variants(run)
            run.optimizer = None
            blockers = recompute_blockers(model, run.unit_fqns, run.fparams, run.fbuffers, run.fsample, loss_fn,
                                          precision)
    optimizer_steps = _record_optimizer_steps(run)
    if blockers:
        def mark(units):
            return tuple(dataclasses.replace(u, recompute_blocker=blockers.get(u.fqn, "")) for u in units)
        main["units"] = mark(main["units"])
        step_variants = [dataclasses.replace(r, units=mark(r.units)) for r in step_variants]
    return _assemble(run, main, step_variants, optimizer_steps, seconds=time.perf_counter() - t0)


# ----------------------------------------------------------------------------- the run
@dataclass(eq=False)
class _Run:
    """What every recording of one profile shares."""

    model: nn.Module
    sample: Any
    loss_fn: LossFn | None
    precision: str
    space: PlanSpace
    spec: DeviceSpec
    unit_fqns: list[str]
    explicit_units: bool
    base_config: OptimizerPlan
    custom: Callable | None
    fake_mode: FakeTensorMode
    named_params: dict[str, torch.Tensor]
    fparams: dict[str, torch.Tensor]
    fbuffers: dict[str, torch.Tensor]
    fsample: Any
    variants: list[StepVariant] = field(default_factory=list)
    facts: dict[str, Any] = field(default_factory=dict)
    optimizer: Any = None
    with_grad: set[str] = field(default_factory=set)
    grad_order: tuple[str, ...] = ()
    optimizer_state_bytes: int = 0
    main_timeline: tuple = ()
    assumptions: list[str] = field(default_factory=list)
    graph: Any = None
    tracer: str = ""
    tried: list = field(default_factory=list)
    written_buffers: tuple[str, ...] = ()

    @classmethod
    def prepare(cls, model, sample, *, loss_fn, optimizer, precision, target, units, space) -> "_Run":
        spec = _target_spec(target)
        base_config, custom = _profiled_config(optimizer)
        fake_mode = FakeTensorMode(allow_non_fake_inputs=False)
        named_params = dict(model.named_parameters())  # tied parameters appear once
        with fake_mode:
            fparams = {n: _empty_like(p).requires_grad_(p.requires_grad) for n, p in named_params.items()}
            fbuffers = {n: _empty_like(b) for n, b in model.named_buffers()}
            fsample = tree_map_only(torch.Tensor, _empty_like, sample)
        run = cls(model=model, sample=sample, loss_fn=loss_fn, precision=precision, space=space, spec=spec,
                  unit_fqns=resolve_units(model, units), explicit_units=units is not None, base_config=base_config,
                  custom=custom, fake_mode=fake_mode, named_params=named_params, fparams=fparams, fbuffers=fbuffers,
                  fsample=fsample)
        run.variants = space.variants(ProfileContext(model=model, params=named_params, batch_size=run.batch_size,
                                                     target_kind=spec.kind, custom_optimizer=custom is not None,
                                                     loss_fn=loss_fn))
        return run

    @property
    def batch_size(self) -> int | None:
        return batch_size_of(self.sample)

    @property
    def granularity(self) -> int:
        return CUDA_ALLOCATION_GRANULARITY if self.spec.kind == "cuda" else 1

    @property
    def workspace(self) -> int:
        return CUDA_WORKSPACE_BYTES if self.spec.kind == "cuda" else 0

    @property
    def foreach(self) -> bool:
        return self.spec.kind == "cuda"

    def nbytes(self, t: torch.Tensor) -> int:
        return _nbytes(t, self.granularity)

    def setup(self, kind: RecordingKind) -> RecordingSetup:
        """A recording of the profiled step (``STEP``: on the fake parameters and the sample) or
        of an optimizer step (``OPTIMIZER``: on fresh meta parameters)."""
        if kind is RecordingKind.STEP:  # (recorded under the fake mode: _empty_like makes fake tensors)
            return RecordingSetup(kind=kind, model=self.model, params=self.fparams, make_param=_empty_like,
                                  sample=self.fsample, batch_size=self.batch_size, precision=self.precision,
                                  facts=self.facts, units=tuple(self.unit_fqns))

        make_meta = functools.partial(_empty_like, device="meta")
        params = {n: make_meta(p).requires_grad_(p.requires_grad) for n, p in self.named_params.items()}
        return RecordingSetup(kind=kind, model=self.model, params=params, make_param=make_meta,
                              precision=self.precision, order=self.grad_order, facts=self.facts,
                              units=tuple(self.unit_fqns))

    def build_optimizer(self, params: dict[str, torch.Tensor], stepping: dict[str, Any]):
        """The profiled optimizer on ``params`` (stepped as ``stepping`` says), with its state created."""
        if self.custom is not None:
            opt = self.custom([p for p in params.values() if p.requires_grad])
        else:
            view = ParamView(self.model, params)
            opt = as_on_target(build_optimizer_for(view, self.base_config, foreach=self.foreach), self.spec.kind)
            if opt is not None and stepping:
                opt = PlanOptimizer(opt, view, **stepping)
        _create_optimizer_state(opt, params)
        return opt


@contextlib.contextmanager
def _as_variant(variant: StepVariant, setup: RecordingSetup):
    """``setup`` changed as each lever of ``variant`` changes the recording."""
    with contextlib.ExitStack() as stack:
        for name, value in variant.choices:
            stack.enter_context(LEVERS[name].recording(value, setup))
        yield setup


# ----------------------------------------------------------------------------- the recordings
def _record_profiled_step(run: _Run) -> dict[str, Any]:
    setup = run.setup(RecordingKind.STEP)
    run.optimizer = run.build_optimizer(run.fparams, {})
    rec = StepRecorder(granularity=run.granularity, target=run.spec.kind)
    try:
        with BufferWrites(run.fbuffers) as writes:  # running statistics, counters: what retries must restore
            record_step(rec, setup, run.unit_fqns, run.fbuffers, run.loss_fn, run.optimizer)
        run.written_buffers = tuple(writes.written)
    except Exception as e:
        raise classify_failure(e, run.model, run.tried, run.tracer, run.sample, run.loss_fn) from e
    if not run.explicit_units:  # units the model never called are not units of this step
        called = {iv.unit for iv in rec.intervals if iv.name == StepEvent.FWD_START}
        run.unit_fqns = [u for u in run.unit_fqns if u in called]
        rec.unit_io = {u: rec.unit_io[u] for u in run.unit_fqns}
    run.with_grad = set(rec.params_with_grad)
    run.grad_order = tuple(setup.grad_order)
    run.optimizer_state_bytes = unique_bytes(optimizer_state_tensors(run.optimizer), run.nbytes)
    run.assumptions = list(rec.assumptions)
    main = assemble_recording(rec, run.model, run.unit_fqns, workspace_bytes=run.workspace,
                              unit_params=_unit_params(run.model, run.named_params, run.fparams, run.unit_fqns, run.granularity))
    run.main_timeline = main["timeline"]
    return main


def _unplanned_peak_with_kv_cache(run: _Run, main: dict[str, Any], cache_configs) -> None:
    """The unplanned peak of the step as the user's own loop runs it, when that keeps a Hugging
    Face KV cache (``use_cache=True``, the transformers default) which memtune turns off.

    The cache changes what the step holds: ``DynamicCache.update`` concatenates keys and values
    into fresh tensors, so a model with a fused QKV projection (GPT-NeoX, Phi-3, Falcon) saves
    those copies for attention's backward and frees the fused output, where with the cache off
    attention saves views that keep the whole fused output alive (+4 to 6% on the unplanned
    peak, issue 21). Plans run with the cache off (:func:`memtune.apply_plan`) and are priced
    from the main recording; only ``baseline_peak_bytes``, the step without memtune, comes from
    this one."""
    if not cache_configs:
        return
    rec = StepRecorder(granularity=run.granularity, target=run.spec.kind)
    try:
        with kv_cache_as_configured(cache_configs):
            record_step(rec, run.setup(RecordingKind.STEP), run.unit_fqns, run.fbuffers, run.loss_fn, run.optimizer)
    except Exception as e:  # noqa: BLE001 - the step memtune trains was recorded; say what is missing
        run.assumptions.append(f"unplanned peak recorded with the KV cache off: with use_cache=True the step "
                               f"failed on fake tensors ({type(e).__name__})")
        return
    peak = max(iv.peak_bytes for iv in rec.intervals) + run.workspace
    if peak != main["baseline_peak_bytes"]:
        run.assumptions.append(
            f"unplanned peak {peak} B is the step with the model's KV cache on (use_cache=True); memtune trains "
            f"with it off, whose step without recompute peaks at {main['baseline_peak_bytes']} B")
        main["baseline_peak_bytes"] = peak


def _record_step_variants(run: _Run) -> list[StepRecording]:
    """The step recorded as each other step variant runs it; the optimizer step itself is not
    run (the optimizer recordings price it), only its state is live."""
    keys = list(dict.fromkeys(v.for_step() for v in run.variants if not v.for_step().is_default))
    optimizers: dict[tuple, Any] = {}
    out = []
    failed: set[int] = set()
    for key in keys:
        if key.micro_batch_size in failed:
            continue
        setup = run.setup(RecordingKind.STEP)
        setup.static.append(run.fsample)
        with _as_variant(key, setup):
            cache_key = (tuple(sorted((n, str(p.dtype)) for n, p in setup.params.items())),
                         tuple(sorted(setup.stepping.items(), key=lambda kv: kv[0])))
            if setup.params is run.fparams and not setup.stepping:
                opt = run.optimizer
            elif cache_key in optimizers:
                opt = optimizers[cache_key]
            else:
                opt = optimizers[cache_key] = run.build_optimizer(setup.params, setup.stepping)
            rec = StepRecorder(granularity=run.granularity, target=run.spec.kind)
            try:
                record_step(rec, setup, run.unit_fqns, run.fbuffers, run.loss_fn, opt, step_optimizer=False)
            except MemtuneError:
                raise
            except Exception as e:
                if key.micro_batch_size is None:
                    raise
                # The model cannot run on a micro-batch this small (batch norm on one sample, a
                # batch size the code hard-wires): no plan may use it, and the profile says so.
                failed.add(key.micro_batch_size)
                run.assumptions.append(
                    f"micro-batches of {key.micro_batch_size} were not recorded: the model's step failed on one "
                    f"({type(e).__name__}: {str(e).splitlines()[0][:160]}); plans use larger micro-batches")
                continue
        fields = assemble_recording(rec, run.model, run.unit_fqns, workspace_bytes=run.workspace,
                                    unit_params=_unit_params(run.model, run.named_params, setup.params, run.unit_fqns,
                                                             run.granularity))
        out.append(StepRecording(
            variant=key, sample=describe(setup.sample), batch_size=batch_size_of(setup.sample),
            # (Parameters that live in host memory, weight offload's on a device target, and
            # their gradients, are not the device's.)
            param_bytes=sum(run.nbytes(t) for t in setup.params.values() if not rec.in_host_memory(t)),
            grad_bytes=sum(run.nbytes(t) for t in setup.params.values() if t.requires_grad and not rec.in_host_memory(t)),
            optimizer_state_bytes=unique_bytes(optimizer_state_tensors(opt), run.nbytes), **fields))
        run.assumptions += [a for a in rec.assumptions if a not in run.assumptions]
    if failed:
        run.variants = [v for v in run.variants if v.micro_batch_size not in failed]
        out = [r for r in out if r.variant.micro_batch_size not in failed]
    return out


def _record_optimizer_steps(run: _Run) -> list[OptimizerStepProfile]:
    """Every optimizer configuration × the optimizer-side choices of every variant. Optimizer
    steps need no autograd and no fake-tensor bookkeeping: plain meta tensors record the same
    allocations (checked in tests/test_profiler.py) at half the cost."""
    if run.custom is not None:
        transient = next(e.peak_bytes - e.live_bytes for e in run.main_timeline if e.name == StepEvent.OPTIM_START)
        return [OptimizerStepProfile(
            name="custom", state_dtype="fp32", ns_steps=0, settings=None, muon_params=(),
            adamw_params=tuple(n for n, p in run.fparams.items() if p.requires_grad),
            state_bytes=run.optimizer_state_bytes, step_transient_bytes=transient, profiled=True)]
    keys = list(dict.fromkeys(v.for_optimizer() for v in run.variants))
    out = []
    for config in _optimizer_configs(run.base_config, run.space):
        with contextlib.ExitStack() as stack:  # each key's own setup, as its levers change it
            setups = [(key, stack.enter_context(_as_variant(key, run.setup(RecordingKind.OPTIMIZER)))) for key in keys]
            out += record_configuration(config, setups, granularity=run.granularity, target=run.spec.kind,
                                        foreach=run.foreach, with_grad=run.with_grad,
                                        profiled=config.key == run.base_config.key)
    return out


def _assemble(run: _Run, main: dict[str, Any], step_variants, optimizer_steps, *, seconds: float) -> ModelProfile:
    owners = _owner_types(run.model)
    owned = _owned(run.model, run.unit_fqns)
    params = tuple(
        ParamInfo(fqn=n, shape=tuple(p.shape), dtype=str(p.dtype).removeprefix("torch."),
                  param_bytes=run.nbytes(run.fparams[n]), unit=_unit_of(n, run.unit_fqns, owned),
                  module_type=owners.get(id(p), "?"))
        for n, p in run.named_params.items()
    )
    return ModelProfile(
        model=type(run.model).__name__, tracer=run.tracer, tracers_tried=tuple(run.tried), target=run.spec.kind,
        target_name=run.spec.name, precision=run.precision, optimizer=run.base_config.name, batch_size=run.batch_size,
        sample=describe(run.sample), param_bytes=sum(p.param_bytes for p in params),
        buffer_bytes=sum(run.nbytes(b) for b in run.fbuffers.values()),
        written_buffers=run.written_buffers, batch_statistics=batch_statistics(run.model),
        written_buffer_bytes=sum(run.nbytes(run.fbuffers[n]) for n in run.written_buffers if n in run.fbuffers),
        written_buffer_sizes=tuple(run.nbytes(run.fbuffers[n]) if n in run.fbuffers else 0
                                   for n in run.written_buffers),
        grad_bytes=sum(p.param_bytes for p, fp in zip(params, run.fparams.values()) if fp.requires_grad),
        optimizer_state_bytes=run.optimizer_state_bytes,
        input_bytes=unique_bytes([t for t in tree_flatten(run.fsample)[0] if isinstance(t, torch.Tensor)], run.nbytes),
        workspace_bytes=run.workspace, params=params, assumptions=tuple(run.assumptions),
        allocation_granularity=run.granularity, optimizer_steps=tuple(optimizer_steps),
        step_variants=tuple(step_variants), profile_seconds=round(seconds, 3), torch_version=torch.__version__,
        graph=run.graph, **main,
    )


# ----------------------------------------------------------------------------- setup
def _target_spec(target: str | torch.device | DeviceSpec) -> DeviceSpec:
    if isinstance(target, str) and target == "cuda" and not torch.cuda.is_available():
        return resolve_device("H100")
    return resolve_device(target)


def _empty_like(t: torch.Tensor, dtype: torch.dtype | None = None, *, device: str = "cpu") -> torch.Tensor:
    """An empty tensor with ``t``'s shape and strides, in ``dtype`` (default: ``t``'s); on the CPU
    under the fake mode it is a fake tensor."""
    return torch.empty_strided(tuple(t.shape), tuple(t.stride()), dtype=dtype or t.dtype, device=device)


def _nbytes(t: torch.Tensor, granularity: int) -> int:
    from .devices import round_allocation

    return round_allocation(t.untyped_storage().nbytes(), granularity)


def _count_calls(run: "_Run", also=()) -> dict[str, int]:
    """Module FQN -> how many times one fake forward (and loss) calls it, for the composite
    modules that hold parameters and the modules named in ``also``."""
    from .step_recording import forward_loss

    counts: dict[str, int] = {}
    handles = []
    also = set(also)
    for name, mod in run.model.named_modules():
        if name in also or (name and any(True for _ in mod.children()) and any(True for _ in mod.parameters())):
            def count(*_, name=name):
                counts[name] = counts.get(name, 0) + 1
            handles.append(mod.register_forward_pre_hook(count))
    try:  # (under a recorder, which answers data-dependent ops on fake tensors as the recordings do)
        with torch.no_grad(), StepRecorder():
            forward_loss(run.model, run.fparams, run.fbuffers, run.fsample, run.loss_fn, run.precision)
    except Exception:  # noqa: BLE001 - the profiled step reports why it cannot run, with the tracers tried
        return {}
    finally:
        for h in handles:
            h.remove()
    return counts


def _unit_of(fqn: str, unit_fqns, owned: dict[str, tuple[str, ...]]) -> str | None:
    """The unit that owns parameter ``fqn`` (``owned``: unit -> :func:`memtune.units.unit_param_prefixes`)."""
    for u in unit_fqns:
        if owns(owned[u], fqn):
            return u
    return None


def _owned(model: nn.Module, unit_fqns) -> dict[str, tuple[str, ...]]:
    modules = dict(model.named_modules())
    return {u: unit_param_prefixes(modules, u) for u in unit_fqns}


def _owner_types(model: nn.Module) -> dict[int, str]:
    owner: dict[int, str] = {}
    for mod in model.modules():
        for p in mod.parameters(recurse=False):
            owner.setdefault(id(p), type(mod).__name__)
    return owner


def _unit_params(model, named_params, fparams, unit_fqns, granularity) -> dict[str, tuple[int, int]]:
    out: dict[str, tuple[int, int]] = {}
    owned = _owned(model, unit_fqns)
    for n in named_params:
        u = _unit_of(n, unit_fqns, owned)
        if u is None:
            continue
        b = _nbytes(fparams[n], granularity)
        pb, gb = out.get(u, (0, 0))
        out[u] = (pb + b, gb + (b if fparams[n].requires_grad else 0))
    return out


# ----------------------------------------------------------------------------- optimizer configurations
def _profiled_config(optimizer: OptimizerSpec) -> tuple[OptimizerPlan, Callable | None]:
    """(the profiled optimizer as a plan would name it, the user's builder for a custom one)."""
    from .optim import OptimizerSettings

    if isinstance(optimizer, OptimizerSettings):
        ns = optimizer.ns_steps if optimizer.name != "adamw" else 0
        return OptimizerPlan(name=optimizer.name, state_dtype=optimizer.state_dtype, ns_steps=ns,
                             settings=optimizer.to_dict()), None
    if callable(optimizer):
        return OptimizerPlan(name="custom"), optimizer
    if not isinstance(optimizer, str):
        raise ValueError(f"optimizer={optimizer!r}: use a name, an OptimizerSettings or a callable")
    name = optimizer.lower()
    if name in OPTIMIZERS and name != "custom" and not orthogonalizes(name):
        return OptimizerPlan(name=name), None
    if orthogonalizes(name):
        s = OptimizerSettings(name=name)
        return OptimizerPlan(name=name, ns_steps=s.ns_steps, settings=s.to_dict()), None
    raise ValueError(f"unknown optimizer {optimizer!r}: use adamw, adam, sgd, muon2, muon, none, an OptimizerSettings "
                     "or a callable")


def _optimizer_configs(base: OptimizerPlan, space: PlanSpace) -> list[OptimizerPlan]:
    """Every optimizer configuration the space allows, built like ``base`` (a kept optimizer:
    only itself)."""
    from .optim import OptimizerSettings

    if base.name not in FAMILIES:
        return [base]
    families = space.optimizers if space.optimizers is not None else (base.name,)
    if base.name not in families:
        families = (base.name, *families)
    configs = {base.key: base}
    for fam in families:
        ns_values = (0,) if not orthogonalizes(fam) else (
            space.ns_steps if space.ns_steps is not None else (ns_floor(fam),)) + ((base.ns_steps,) if fam == base.name else ())
        for dt in space.state_dtypes + ((base.state_dtype,) if fam == base.name else ()):
            for ns in ns_values:
                if base.settings is None:
                    settings = None if (fam == "adamw" and dt == "fp32") else OptimizerSettings(name=fam).to_dict()
                else:
                    settings = {**base.settings, "name": fam}
                cfg = OptimizerPlan(name=fam, state_dtype=dt, ns_steps=ns, settings=settings)
                configs.setdefault(cfg.key, cfg)
    return list(configs.values())


# ----------------------------------------------------------------------------- optimizer
def _create_optimizer_state(opt, fparams) -> None:
    """Run one step on zero gradients so the state exists, as in any step after the first."""
    if opt is None:
        return
    for p in fparams.values():
        if p.requires_grad:
            p.grad = torch.zeros_like(p)
    opt.step()
    opt.zero_grad(set_to_none=True)


