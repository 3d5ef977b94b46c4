"""``memtune.profile``: measure one training step of a model without allocating its memory.

The model's parameters, buffers and the sample are replaced by fake tensors on the CPU
(``FakeTensorMode``), so a 7B model is profiled on a laptop: every op computes shapes,
dtypes and strides only. One steady-state training step (forward, loss, backward,
optimizer step, with the optimizer's state already created) runs under a
:class:`~memtune.recorder.StepRecorder`, which replays what the target's allocator would
do. The model may arrive on any device, including ``meta``; it is never modified.

The graph is captured with torch.fx: ``symbolic_trace`` where it works, else an aten-level
graph from ``make_fx`` over fake tensors. It is kept on the profile as ``profile.graph``.

Why trace on fake *CPU* tensors when the target is CUDA: on a CPU-only torch, fake CUDA
tensors run forward but abort in autograd. The CUDA differences are modelled explicitly:
512-byte allocation rounding, the SDPA kernel CUDA would pick and what it saves, and the
optimizer implementation CUDA defaults to (``foreach``). See docs/profiler.md.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn as nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._pytree import tree_flatten, tree_map_only

from .batching import LossFn, batch_size_of, describe, loss_from_output, split_batch, split_micro_batches
from .devices import CUDA_ALLOCATION_GRANULARITY, CUDA_WORKSPACE_BYTES, DeviceSpec, resolve_device
from .errors import SampleError, TraceError
from . import loss_chunking
from .fake_compat import EAGER_KERNELS, eager_hf_masking, raised_by_fake_kernel, training_configs
from .optimizer_recording import optimizer_state_tensors, record_optimizer_steps, unique_bytes
from .optimizers import as_on_target, build_optimizer_for
from .plan import STATE_DTYPES, OptimizerPlan
from .profile import ModelProfile, OptimizerStepProfile, ParamInfo, StepRecording
from .recorder import StepRecorder
from .stepping import PlanOptimizer, bf16_weight_names
from .step_recording import assemble_recording, forward_loss, record_step
from .units import UnitSpec, resolve_units

PRECISIONS = ("fp32", "bf16-mixed")
OptimizerSpec = str | Callable[[list[torch.Tensor]], torch.optim.Optimizer]
_DATA_DEPENDENT = ("DataDependentOutputException", "DynamicOutputShapeException", "GuardOnDataDependentSymNode")


@dataclass(frozen=True, kw_only=True, slots=True)
class PlanSpace:
    """What a profile records beyond the profiled step, so that every plan the planner may
    return is priced from a measurement. The defaults cover every plan :func:`memtune.plan`
    can return with its default options; narrower spaces profile faster."""

    optimizers: tuple[str, ...] | None = None
    """Optimizer families a plan may switch to (any of ``muon2``, ``muon``, ``adamw``);
    ``None``: only the profiled optimizer's own family. Each costs a few fake optimizer steps."""
    state_dtypes: tuple[str, ...] = STATE_DTYPES
    """State precisions recorded for each family."""
    ns_steps: tuple[int, ...] | None = None
    """Newton-Schulz step counts recorded for the Muon families; ``None``: each family's default
    floor (:data:`memtune.optimizers.DEFAULT_NS_STEPS`) and the profiled optimizer's own."""
    micro_batch_sizes: tuple[int, ...] | None = None
    """Micro-batch sizes whose gradient-accumulation step is recorded; ``None``: the batch halved
    while it divides evenly, and 1 (8 → 4, 2, 1); ``()``: none."""
    weights: tuple[str | None, ...] | None = None
    """Parameter storage a plan may choose (``None`` as profiled, ``"bf16-sr"``, ``"bf16-master"``,
    :mod:`memtune.stepping`); ``None``: all three when the trainable parameters are fp32."""
    in_backward: tuple[bool, ...] = (False, True)
    """Whether a plan may step the optimizer in backward."""
    state_offload: tuple[bool, ...] | None = None
    """Whether a plan may keep optimizer state in host memory; ``None``: both on a CUDA target,
    only on-device on a CPU target (where host memory *is* the device)."""
    loss_chunks: tuple[int | None, ...] | None = None
    """Chunk counts of the head and loss a plan may choose; ``None``: as the model computes it,
    and 8 chunks when the model allows (:func:`memtune.loss_chunking.support`)."""

    def __post_init__(self) -> None:
        from .optimizers import FAMILIES
        from .stepping import WEIGHTS

        bad = [o for o in (self.optimizers or ()) if o not in FAMILIES]
        if bad:
            raise ValueError(f"PlanSpace.optimizers: {bad} cannot be re-configured by a plan; use any of {FAMILIES}")
        if not self.state_dtypes or any(d not in STATE_DTYPES for d in self.state_dtypes):
            raise ValueError(f"PlanSpace.state_dtypes={self.state_dtypes!r}: use a non-empty subset of {STATE_DTYPES}")
        if self.ns_steps is not None and any(k < 1 for k in self.ns_steps):
            raise ValueError(f"PlanSpace.ns_steps={self.ns_steps!r}: Newton-Schulz needs at least 1 step")
        if self.micro_batch_sizes is not None and any(m < 1 for m in self.micro_batch_sizes):
            raise ValueError(f"PlanSpace.micro_batch_sizes={self.micro_batch_sizes!r}: sizes must be >= 1")
        if self.weights is not None and any(w not in WEIGHTS for w in self.weights):
            raise ValueError(f"PlanSpace.weights={self.weights!r}: use a subset of {WEIGHTS}")
        if self.loss_chunks is not None and any(c is not None and c < 2 for c in self.loss_chunks):
            raise ValueError(f"PlanSpace.loss_chunks={self.loss_chunks!r}: use None or chunk counts >= 2")

    @classmethod
    def minimal(cls, **overrides) -> "PlanSpace":
        """Only what a plan of unit decisions and state precisions needs: no micro-batches, no
        bf16 weights, no in-backward step, no state offload, no chunked loss (fast profiles)."""
        kw = dict(micro_batch_sizes=(), weights=(None,), in_backward=(False,), state_offload=(False,),
                  loss_chunks=(None,))
        return cls(**{**kw, **overrides})

    def micro_sizes(self, batch_size: int | None) -> tuple[int, ...]:
        if not batch_size or batch_size < 2:
            return ()
        if self.micro_batch_sizes is not None:
            bad = [m for m in self.micro_batch_sizes if m > batch_size or batch_size % m]
            if bad:
                raise ValueError(f"PlanSpace.micro_batch_sizes: {bad} do not divide the batch of {batch_size}")
            return tuple(sorted(set(self.micro_batch_sizes), reverse=True))
        sizes, m = [], batch_size
        while m % 2 == 0 and m > 1:
            m //= 2
            sizes.append(m)
        if 1 not in sizes:
            sizes.append(1)
        return tuple(sizes)

    def weight_options(self, params: dict[str, torch.Tensor]) -> tuple[str | None, ...]:
        if self.weights is not None:
            return tuple(dict.fromkeys((None, *self.weights)))
        trainable = [p for p in params.values() if p.requires_grad and p.is_floating_point()]
        low = bool(trainable) and all(p.dtype in (torch.float32, torch.bfloat16) for p in trainable)
        return (None, "bf16-sr", "bf16-master") if low else (None,)

    def offload_options(self, target_kind: str) -> tuple[bool, ...]:
        if self.state_offload is not None:
            return tuple(dict.fromkeys((False, *self.state_offload)))
        return (False, True) if target_kind != "cpu" else (False,)

    def chunk_options(self, chunkable: bool) -> tuple[int | None, ...]:
        if self.loss_chunks is not None:
            return tuple(dict.fromkeys((None, *self.loss_chunks))) if chunkable else (None,)
        return (None, DEFAULT_LOSS_CHUNKS) if chunkable else (None,)


DEFAULT_LOSS_CHUNKS = 8


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
            configurations, micro-batch sizes, bf16 weights, in-backward stepping, state offload,
            chunked loss. Default: every plan the default planner options can return.
    """
    t0 = time.perf_counter()
    from .compiled import unwrap

    model = unwrap(model)  # a torch.compile wrapper: profile the module it compiles (its FQNs, its forwards)
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    space = space or PlanSpace()
    spec = _target_spec(target)
    granularity = CUDA_ALLOCATION_GRANULARITY if spec.kind == "cuda" else 1
    explicit_units = units is not None
    unit_fqns = resolve_units(model, units)
    base_config, custom = _profiled_config(optimizer)
    chunking = loss_chunking.support(model) if loss_fn is None else ""

    fake_mode = FakeTensorMode(allow_non_fake_inputs=False)
    named_params = dict(model.named_parameters())  # tied parameters appear once
    bf16_names = bf16_weight_names(model)
    named_buffers = dict(model.named_buffers())
    with fake_mode:
        fparams = {n: _fake_like(p).requires_grad_(p.requires_grad) for n, p in named_params.items()}
        fbuffers = {n: _fake_like(b) for n, b in named_buffers.items()}
        fsample = tree_map_only(torch.Tensor, _fake_like, sample)
    weight_options = space.weight_options(named_params) if custom is None else (None,)
    in_backward_options = space.in_backward if custom is None else (False,)
    workspace = CUDA_WORKSPACE_BYTES if spec.kind == "cuda" else 0
    foreach = spec.kind == "cuda"

    with training_configs(model):
        graph, tracer, tried = _capture_graph(model, unit_fqns, fake_mode, fparams, fbuffers, fsample, loss_fn,
                                              precision, sample)
        view = _FakeParamView(model, fparams)
        with fake_mode, eager_hf_masking():
            opt = custom(list(p for p in fparams.values() if p.requires_grad)) if custom else \
                as_on_target(build_optimizer_for(view, base_config, foreach=foreach), spec.kind)
            _create_optimizer_state(opt, fparams)
            rec = StepRecorder(granularity=granularity, target=spec.kind)
            try:
                record_step(rec, model, unit_fqns, fparams, fbuffers, fsample, loss_fn, precision, opt)
            except Exception as e:
                raise _classify_failure(e, model, tried, tracer, sample, loss_fn) from e
            if not explicit_units:
                unit_fqns = [u for u in unit_fqns if any(iv.name == "fwd_start" and iv.unit == u for iv in rec.intervals)]
                rec.unit_io = {u: rec.unit_io[u] for u in unit_fqns}
            with_grad = set(rec.params_with_grad)
            unit_params = _unit_params(named_params, fparams, unit_fqns, granularity)
            main = assemble_recording(rec, model, unit_fqns, workspace_bytes=workspace, unit_params=unit_params)
            assumptions = list(rec.assumptions)
            nbytes = lambda t: _nbytes(t, granularity)  # noqa: E731
            state_bytes = unique_bytes(optimizer_state_tensors(opt), nbytes)
            B = batch_size_of(sample)

            # ---- the step as each plan variant changes it
            variants: list[StepRecording] = []
            step_order: tuple[str, ...] = ()
            recorder_args = (model, unit_fqns, fbuffers, loss_fn, precision)
            for w in dict.fromkeys("bf16" if w else None for w in weight_options):
                params = fparams if w is None else _params_like(named_params, bf16_names, "cpu")
                if w is None:
                    wopt = opt
                else:  # the profiled optimizer on bf16 weights, updated as a bf16 plan would
                    inner = as_on_target(build_optimizer_for(_FakeParamView(model, params), base_config,
                                                             foreach=foreach), spec.kind)
                    wopt = PlanOptimizer(inner, _FakeParamView(model, params), weights="bf16-sr")
                    _create_optimizer_state(wopt, params)
                wparams = _unit_params(named_params, params, unit_fqns, granularity)
                wstate = unique_bytes(optimizer_state_tensors(wopt), nbytes)
                for chunks in space.chunk_options(bool(chunking)):
                    shapes = [(None, ib) for ib in in_backward_options] + [(m, False) for m in space.micro_sizes(B)]
                    for m, ib in shapes:
                        if (m, w, ib, chunks) == (None, None, False, None):
                            continue  # the profiled step itself
                        vrec = StepRecorder(granularity=granularity, target=spec.kind)
                        part = _slice_batch(fsample, B, m) if m else fsample
                        loss_chunking.apply(model, chunks)
                        try:
                            # bf16 weights compute in bf16: the runtime runs their forward under bf16 autocast
                            # (so fp32 inputs meet bf16 weights correctly), whatever the profiled precision.
                            record_step(vrec, model, unit_fqns, params, fbuffers, part, loss_fn,
                                        "bf16-mixed" if w else precision, wopt, static=(fsample,),
                                        accumulate_weight=(m / B) if m else None, in_backward=ib,
                                        step_optimizer=False)  # priced by the optimizer recordings
                        finally:
                            loss_chunking.remove(model)
                        if ib and not step_order:
                            step_order = tuple(iv.unit for iv in vrec.intervals if iv.name == "step")
                        fields = assemble_recording(vrec, model, unit_fqns, workspace_bytes=workspace,
                                                    unit_params=wparams)
                        variants.append(StepRecording(
                            micro_batch_size=m, weights=w, in_backward=ib, loss_chunks=chunks, sample=describe(part),
                            param_bytes=sum(_nbytes(t, granularity) for t in params.values()),
                            grad_bytes=sum(_nbytes(t, granularity) for t in params.values() if t.requires_grad),
                            optimizer_state_bytes=wstate, **fields))
                        assumptions += [a for a in vrec.assumptions if a not in assumptions]
                del wopt
            del opt
            blockers = recompute_blockers(model, unit_fqns, fparams, fbuffers, fsample, loss_fn, precision)
    opt_steps = []
    if custom is None:
        # Optimizer steps need no autograd and no fake-tensor bookkeeping: plain meta tensors
        # record the same allocations (checked in tests/test_profiler.py) at half the cost.
        for cfg, w in _configs_to_record(base_config, space, weight_options, space.offload_options(spec.kind)):
            meta = _params_like(named_params, bf16_names if w is not None else set(), "meta")
            opt_steps += record_optimizer_steps(
                _FakeParamView(model, meta), meta, cfg, granularity=granularity, target=spec.kind,
                foreach=foreach, with_grad=with_grad, weights=w, modes=tuple(in_backward_options), order=step_order,
                profiled=(cfg.key == base_config.key and not cfg.offload and w is None))
    else:
        opt_steps.append(OptimizerStepProfile(
            name="custom", state_dtype="fp32", ns_steps=0, settings=None, muon_params=(),
            adamw_params=tuple(n for n, p in fparams.items() if p.requires_grad), state_bytes=state_bytes,
            step_transient_bytes=_profiled_step_transient(main["timeline"]), profiled=True))
    if blockers:
        def mark(units):
            return tuple(dataclasses.replace(u, recompute_blocker=blockers.get(u.fqn, "")) for u in units)
        main["units"] = mark(main["units"])
        variants = [dataclasses.replace(r, units=mark(r.units)) for r in variants]

    params = tuple(
        ParamInfo(fqn=n, shape=tuple(p.shape), dtype=str(p.dtype).removeprefix("torch."),
                  param_bytes=_nbytes(fparams[n], granularity), unit=_unit_of(n, unit_fqns),
                  module_type=_owner_types(model).get(id(p), "?"))
        for n, p in named_params.items()
    )
    return ModelProfile(
        model=type(model).__name__, tracer=tracer, tracers_tried=tuple(tried), target=spec.kind, target_name=spec.name,
        precision=precision, optimizer=base_config.name, batch_size=B, sample=describe(sample),
        param_bytes=sum(p.param_bytes for p in params),
        buffer_bytes=sum(_nbytes(b, granularity) for b in fbuffers.values()),
        grad_bytes=sum(p.param_bytes for p, fp in zip(params, fparams.values()) if fp.requires_grad),
        optimizer_state_bytes=state_bytes,
        input_bytes=unique_bytes([t for t in tree_flatten(fsample)[0] if isinstance(t, torch.Tensor)], nbytes),
        workspace_bytes=workspace, params=params, assumptions=tuple(assumptions), allocation_granularity=granularity,
        optimizer_steps=tuple(opt_steps), step_variants=tuple(variants), loss_chunking=chunking,
        profile_seconds=round(time.perf_counter() - t0, 3), torch_version=torch.__version__, graph=graph, **main,
    )


# ----------------------------------------------------------------------------- setup
def _target_spec(target: str | torch.device | DeviceSpec) -> DeviceSpec:
    if isinstance(target, str) and target == "cuda" and not torch.cuda.is_available():
        return resolve_device("H100")
    return resolve_device(target)


def _fake_like(t: torch.Tensor) -> torch.Tensor:
    """A fake CPU tensor with ``t``'s shape, strides and dtype (call under the fake mode)."""
    return torch.empty_strided(tuple(t.shape), tuple(t.stride()), dtype=t.dtype, device="cpu")


def _nbytes(t: torch.Tensor, granularity: int) -> int:
    from .devices import round_allocation

    return round_allocation(t.untyped_storage().nbytes(), granularity)


def _params_like(named_params: dict[str, torch.Tensor], bf16_names: set[str], device: str) -> dict[str, torch.Tensor]:
    """Empty parameters shaped like ``named_params``, those in ``bf16_names`` in bf16 (as a
    bf16-weights plan stores them). ``device="cpu"`` under the fake mode makes fake tensors;
    ``"meta"`` makes meta tensors."""
    return {n: torch.empty_strided(tuple(p.shape), tuple(p.stride()),
                                   dtype=torch.bfloat16 if n in bf16_names else p.dtype, device=device)
            .requires_grad_(p.requires_grad) for n, p in named_params.items()}


def _slice_batch(batch: Any, full: int, m: int) -> Any:
    """The first micro-batch of size ``m``, cut as the runtime cuts it."""
    return split_micro_batches(batch, m)[0][0]


def _unit_of(fqn: str, unit_fqns) -> str | None:
    for u in unit_fqns:
        if fqn == u or fqn.startswith(u + "."):
            return u
    return None


def _owner_types(model: nn.Module) -> dict[int, str]:
    owner: dict[int, str] = {}
    for mod in model.modules():
        for p in mod.parameters(recurse=False):
            owner.setdefault(id(p), type(mod).__name__)
    return owner


def _unit_params(named_params, fparams, unit_fqns, granularity) -> dict[str, tuple[int, int]]:
    out: dict[str, tuple[int, int]] = {}
    for n in named_params:
        u = _unit_of(n, unit_fqns)
        if u is None:
            continue
        b = _nbytes(fparams[n], granularity)
        pb, gb = out.get(u, (0, 0))
        out[u] = (pb + b, gb + (b if fparams[n].requires_grad else 0))
    return out


def _profiled_step_transient(timeline) -> int:
    i = next(i for i, e in enumerate(timeline) if e.name == "optim_start")
    return timeline[i].peak_bytes - timeline[i].live_bytes


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
    if name in ("adamw", "adam", "sgd", "none"):
        return OptimizerPlan(name=name), None
    if name in ("muon2", "muon"):
        s = OptimizerSettings(name=name)
        return OptimizerPlan(name=name, ns_steps=s.ns_steps, settings=s.to_dict()), None
    raise ValueError(f"unknown optimizer {optimizer!r}: use adamw, adam, sgd, muon2, muon, none, an OptimizerSettings "
                     "or a callable")


def _configs_to_record(base: OptimizerPlan, space: PlanSpace, weight_options,
                       offload_options) -> list[tuple[OptimizerPlan, str | None]]:
    """Every (optimizer configuration, weights) the space allows, built like ``base``. An fp32
    master copy only makes sense in host memory, so ``bf16-master`` is recorded with offloaded
    state only."""
    from .optim import OptimizerSettings
    from .optimizers import FAMILIES, ns_floor

    if base.name not in FAMILIES:
        return [(base, None)]
    families = space.optimizers if space.optimizers is not None else (base.name,)
    if base.name not in families:
        families = (base.name, *families)
    configs = {base.key: base}
    for fam in families:
        ns_values = (0,) if fam == "adamw" else (
            space.ns_steps if space.ns_steps is not None else (ns_floor(fam),)) + ((base.ns_steps,) if fam == base.name else ())
        for dt in space.state_dtypes + ((base.state_dtype,) if fam == base.name else ()):
            for ns in ns_values:
                if base.settings is None:
                    settings = None if (fam == "adamw" and dt == "fp32") else OptimizerSettings(name=fam).to_dict()
                else:
                    settings = {**base.settings, "name": fam}
                cfg = OptimizerPlan(name=fam, state_dtype=dt, ns_steps=ns, settings=settings)
                configs.setdefault(cfg.key, cfg)
    out = []
    for cfg in configs.values():
        for offload in offload_options:
            for w in weight_options:
                if w == "bf16-master" and not offload:
                    continue
                out.append((cfg if not offload else OptimizerPlan(**{**_fields(cfg), "offload": True}), w))
    return out


def _fields(obj) -> dict:
    return {f: getattr(obj, f) for f in obj.__dataclass_fields__}


# ----------------------------------------------------------------------------- graph
class _UnitTracer(torch.fx.Tracer):
    """symbolic_trace that keeps each unit as one ``call_module`` node."""

    def __init__(self, unit_fqns):
        super().__init__()
        self.unit_fqns = set(unit_fqns)

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return qualname in self.unit_fqns or super().is_leaf_module(m, qualname)


def _capture_graph(model, unit_fqns, fake_mode, fparams, fbuffers, fsample, loss_fn, precision, sample):
    """``(graph, tracer, tried)``: symbolic_trace first, then make_fx over fake tensors."""
    tried: list[tuple[str, str]] = []
    try:
        # Keep the Graph, not a GraphModule: a GraphModule would hold the user's modules and
        # parameters, and a kept profile would keep the model alive.
        return _UnitTracer(unit_fqns).trace(model), "symbolic_trace", tried
    except Exception as e:  # fx raises many types: TraceError, TypeError, AttributeError...
        tried.append(("symbolic_trace", _one_line(e)))
    from torch.fx.experimental.proxy_tensor import make_fx

    def fwd(params, buffers, batch):
        return forward_loss(model, params, buffers, batch, loss_fn, precision)[1]

    try:
        with fake_mode, StepRecorder(), eager_hf_masking():  # the recorder resolves data-dependent reads
            gm = make_fx(fwd, tracing_mode="real", pre_dispatch=False)(fparams, fbuffers, fsample)
        return gm.graph, "make_fx", tried
    except Exception as e:
        tried.append(("make_fx", _one_line(e)))
        # Tell a bad sample from an untraceable model: does plain eager execution on fake
        # tensors get through the forward?
        try:
            with fake_mode, StepRecorder(), eager_hf_masking():
                fwd(fparams, fbuffers, fsample)
        except Exception as eager_error:
            raise _classify_failure(eager_error, model, tried, "eager", sample, loss_fn) from e
        raise _classify_failure(e, model, tried, None, sample, loss_fn) from e


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"[:300]


REAL_CHECK_MAX_BYTES = 256 * 2**20
"""A model whose real parameters fit in this many bytes is run once on the real sample when its
fake run fails, to tell a bad sample from a fake-tensor limitation."""


def _classify_failure(e: Exception, model: nn.Module, tried, tracer, sample=None, loss_fn=None) -> Exception:
    name = type(model).__name__
    if isinstance(e, (TraceError, SampleError)):
        return e
    attempts = "; ".join(f"{t}: {why}" for t, why in tried) or "none"
    if type(e).__name__ in _DATA_DEPENDENT or "data-dependent" in str(e).lower() or _needs_real_data(e):
        return TraceError(
            f"cannot trace {name}: it depends on tensor values that fake tensors do not have "
            f"({_one_line(e)}). Tracers tried: {attempts}. Fake tensors carry shapes, not values: keep "
            "forward() in torch ops (no .numpy(), .tolist() or data pointers), or move that work out of forward."
        )
    if tracer is None:
        return TraceError(f"cannot trace {name}. Tracers tried: {attempts}")
    kernel = raised_by_fake_kernel(e)
    real = _runs_on_real_tensors(model, sample, loss_fn)
    if real is True:
        where = f"PyTorch's fake-tensor kernel {kernel}() rejected an input" if kernel else "the fake-tensor run failed"
        return TraceError(
            f"cannot profile {name} on fake tensors: {where} ({_one_line(e)}), although the model runs on the real "
            f"sample: a limitation of fake tensors, not of your sample. memtune records the eager kernel for "
            f"{', '.join(str(k) for k in EAGER_KERNELS)}; for another op, profile with the dtype its fake kernel "
            f"accepts (e.g. precision='bf16-mixed') or report the op. Tracers tried: {attempts}")
    hint = ""
    if kernel is not None and real is None:
        hint = (f" The error comes from the fake-tensor kernel {kernel}(): if the real model does run on this sample, "
                "that kernel's fake implementation is at fault, not the sample.")
    return SampleError(
        f"{name} does not run on the sample ({_one_line(e)}). Pass the batch exactly as the training loop "
        "would: a dict for model(**batch), a tuple for model(*batch) (with loss_fn: (inputs..., target)), or a tensor."
        + hint)


def _runs_on_real_tensors(model: nn.Module, sample, loss_fn) -> bool | None:
    """Whether one real forward of a small, materialized CPU model on the real sample works
    (``None``: not tried, because the model is on meta or another device, or too big)."""
    if sample is None:
        return None
    tensors = list(model.parameters()) + list(model.buffers())
    if any(t.device.type != "cpu" for t in tensors):
        return None
    if sum(t.numel() * t.element_size() for t in tensors) > REAL_CHECK_MAX_BYTES:
        return None
    leaves, _ = tree_flatten(sample)
    if any(isinstance(t, torch.Tensor) and t.device.type != "cpu" for t in leaves):
        return None
    from torch.utils._python_dispatch import _disable_current_modes

    args, kwargs, target = split_batch(sample, loss_fn)
    try:
        with _disable_current_modes(), torch.no_grad():  # outside the fake mode and the recorder
            loss_from_output(model(*args, **kwargs), sample, target, loss_fn)
    except Exception:
        return False
    return True


def _needs_real_data(e: Exception) -> bool:
    """Errors that come from asking a fake tensor for real data (``.numpy()``, ``.tolist()``
    into Python, data pointers): the model, not the sample, is at fault."""
    text = str(e)
    return any(k in text for k in ("FakeTensor", "fake tensor", "Cannot access data pointer", "numpy()"))


# ----------------------------------------------------------------------------- optimizer
class _FakeParamView(nn.Module):
    """Exposes ``model``'s structure with the fake parameters, for optimizers that split
    parameters by module type (the Muon²/AdamW hybrid)."""

    def __init__(self, model: nn.Module, fparams: dict[str, torch.Tensor]):
        super().__init__()
        object.__setattr__(self, "_model", model)
        object.__setattr__(self, "_fparams", fparams)

    def named_parameters(self, prefix: str = "", recurse: bool = True, remove_duplicate: bool = True):
        yield from self._fparams.items()

    def parameters(self, recurse: bool = True):
        yield from self._fparams.values()

    def named_modules(self, *args, **kwargs):
        return self._model.named_modules(*args, **kwargs)

    def modules(self):
        return self._model.modules()


def _create_optimizer_state(opt, fparams) -> None:
    """Run one step on zero gradients so the state exists, as in any step after the first."""
    if opt is None:
        return
    for p in fparams.values():
        if p.requires_grad:
            p.grad = torch.zeros_like(p)
    opt.step()
    opt.zero_grad(set_to_none=True)


# ----------------------------------------------------------------------------- recompute safety
def recompute_blockers(model, unit_fqns, fparams, fbuffers, fsample, loss_fn, precision) -> dict[str, str]:
    """Units whose recomputation is not safe, with the reason.

    Runs a fake step with every unit under ``torch.utils.checkpoint`` (as a RECOMPUTE plan
    would). ``checkpoint`` checks that recomputation saves the same tensors as the first
    forward; a unit that fails that check carries state between calls. Such a unit is taken
    out of the set and the step re-run, until the step goes through."""
    from torch.nn.utils.stateless import _reparametrize_module
    from torch.utils.checkpoint import CheckpointError, checkpoint, set_checkpoint_early_stop

    modules = dict(model.named_modules())
    blockers: dict[str, str] = {}
    state = {"backward": False, "last": None}

    def wrap(fqn):
        module = modules[fqn]
        forward = module.forward

        def run(*args, **kwargs):
            if state["backward"]:
                state["last"] = fqn
            return forward(*args, **kwargs)

        def wrapped(*args, **kwargs):
            return checkpoint(run, *args, use_reentrant=False, **kwargs)
        return module, wrapped

    for _ in range(len(unit_fqns)):
        candidates = [u for u in unit_fqns if u not in blockers]
        if not candidates:
            break
        patched = []
        for u in candidates:
            module, wrapped = wrap(u)
            patched.append((module, module.__dict__.get("forward")))
            module.__dict__["forward"] = wrapped
        state.update(backward=False, last=None)
        try:
            # Recomputation runs in backward, so the fake parameters must stay swapped in until then.
            # Early stop would end the recomputation as soon as the first forward's saved tensors are
            # matched, so a unit that saves more on its second call would pass: recompute all of it.
            with StepRecorder(), set_checkpoint_early_stop(False), \
                    _reparametrize_module(model, {**fparams, **fbuffers}, tie_weights=True):
                _, loss = forward_loss(model, fparams, fbuffers, fsample, loss_fn, precision)
                state["backward"] = True
                loss.backward()
            return blockers
        except CheckpointError as e:
            culprit = state["last"]
            if culprit is None:
                return {u: f"recomputation failed ({_one_line(e)})" for u in candidates}
            blockers[culprit] = (f"recomputing it saves different tensors than its forward did ({_one_line(e)[:160]}); "
                                 "it carries state between calls")
        finally:
            for module, original in patched:
                if original is None:
                    module.__dict__.pop("forward", None)
                else:
                    module.__dict__["forward"] = original
            for p in fparams.values():
                p.grad = None
    return blockers
