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

import time
from contextlib import contextmanager, nullcontext
from typing import Any, Callable

import torch
import torch.nn as nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._pytree import tree_flatten, tree_map_only

from .batching import LossFn, batch_size_of, describe, loss_from_output, split_batch
from .devices import CUDA_ALLOCATION_GRANULARITY, CUDA_WORKSPACE_BYTES, DeviceSpec, resolve_device
from .errors import SampleError, TraceError
from .profile import ModelProfile, ParamInfo, StorageInfo, TimelineEvent, UnitProfile
from .recorder import StepRecorder
from .units import UnitSpec, resolve_units

PRECISIONS = ("fp32", "bf16-mixed")
OptimizerSpec = str | Callable[[list[torch.Tensor]], torch.optim.Optimizer]
_DATA_DEPENDENT = ("DataDependentOutputException", "DynamicOutputShapeException", "GuardOnDataDependentSymNode")


def profile(
    model: nn.Module,
    sample: Any,
    *,
    loss_fn: LossFn | None = None,
    optimizer: OptimizerSpec = "adamw",
    precision: str = "fp32",
    target: str | torch.device | DeviceSpec = "cuda",
    units: UnitSpec = None,
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
    """
    t0 = time.perf_counter()
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    spec = _target_spec(target)
    granularity = CUDA_ALLOCATION_GRANULARITY if spec.kind == "cuda" else 1
    unit_fqns = resolve_units(model, units)

    fake_mode = FakeTensorMode(allow_non_fake_inputs=False)
    named_params = dict(model.named_parameters())  # tied parameters appear once
    named_buffers = dict(model.named_buffers())
    with fake_mode:
        fparams = {n: _fake_like(p).requires_grad_(p.requires_grad) for n, p in named_params.items()}
        fbuffers = {n: _fake_like(b) for n, b in named_buffers.items()}
        fsample = tree_map_only(torch.Tensor, _fake_like, sample)

    graph, tracer, tried = _capture_graph(model, unit_fqns, fake_mode, fparams, fbuffers, fsample, loss_fn, precision)

    with fake_mode, _eager_hf_masking():
        opt = _build_optimizer(optimizer, model, fparams, spec)
        _create_optimizer_state(opt, fparams)
        rec = StepRecorder(granularity=granularity, target=spec.kind)
        try:
            _record_step(rec, model, unit_fqns, fparams, fbuffers, fsample, loss_fn, precision, opt)
        except Exception as e:
            raise _classify_failure(e, model, tried, tracer) from e

    return _assemble(
        model=model, spec=spec, precision=precision, optimizer=optimizer, rec=rec, opt=opt, unit_fqns=unit_fqns,
        named_params=named_params, fparams=fparams, fbuffers=fbuffers, fsample=fsample, sample=sample,
        graph=graph, tracer=tracer, tried=tried, seconds=time.perf_counter() - t0,
    )


# ----------------------------------------------------------------------------- setup
def _target_spec(target: str | torch.device | DeviceSpec) -> DeviceSpec:
    if isinstance(target, str) and target == "cuda" and not torch.cuda.is_available():
        return resolve_device("H100")
    return resolve_device(target)


def _fake_like(t: torch.Tensor) -> torch.Tensor:
    """A fake CPU tensor with ``t``'s shape, strides and dtype (call under the fake mode)."""
    return torch.empty_strided(tuple(t.shape), tuple(t.stride()), dtype=t.dtype, device="cpu")


def _autocast(precision: str):
    if precision == "bf16-mixed":
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return nullcontext()


def _forward_loss(model, fparams, fbuffers, fsample, loss_fn, precision) -> tuple[Any, torch.Tensor]:
    args, kwargs, target = split_batch(fsample, loss_fn)
    with _autocast(precision):
        out = torch.func.functional_call(model, {**fparams, **fbuffers}, args, kwargs, strict=False)
        loss = loss_from_output(out, fsample, target, loss_fn)
    return out, loss


@contextmanager
def _eager_hf_masking():
    """Hugging Face models build a full ``(B, 1, T, T)`` attention mask when they see a
    fake tensor (their tracing-safe path), where eager training passes ``is_causal`` and no
    mask. memtune measures eager training, so while the step is recorded the check ignores
    fake tensors; whether the batch is padded then becomes a value read, which the recorder
    resolves as "no padding" and lists in ``profile.assumptions``."""
    import sys

    masking = sys.modules.get("transformers.masking_utils")
    original = getattr(masking, "is_tracing", None)
    if original is None:
        yield
        return
    from torch._subclasses.fake_tensor import FakeTensor

    def is_tracing(tensor=None):
        return original(None if isinstance(tensor, FakeTensor) else tensor)

    masking.is_tracing = is_tracing
    try:
        yield
    finally:
        masking.is_tracing = original


# ----------------------------------------------------------------------------- graph
class _UnitTracer(torch.fx.Tracer):
    """symbolic_trace that keeps each unit as one ``call_module`` node."""

    def __init__(self, unit_fqns):
        super().__init__()
        self.unit_fqns = set(unit_fqns)

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return qualname in self.unit_fqns or super().is_leaf_module(m, qualname)


def _capture_graph(model, unit_fqns, fake_mode, fparams, fbuffers, fsample, loss_fn, precision):
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
        return _forward_loss(model, params, buffers, batch, loss_fn, precision)[1]

    try:
        with fake_mode, StepRecorder(), _eager_hf_masking():  # the recorder resolves data-dependent reads
            gm = make_fx(fwd, tracing_mode="real", pre_dispatch=False)(fparams, fbuffers, fsample)
        return gm.graph, "make_fx", tried
    except Exception as e:
        tried.append(("make_fx", _one_line(e)))
        # Tell a bad sample from an untraceable model: does plain eager execution on fake
        # tensors get through the forward?
        try:
            with fake_mode, StepRecorder(), _eager_hf_masking():
                fwd(fparams, fbuffers, fsample)
        except Exception as eager_error:
            raise _classify_failure(eager_error, model, tried, "eager") from e
        raise _classify_failure(e, model, tried, None) from e


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"[:300]


def _classify_failure(e: Exception, model: nn.Module, tried, tracer) -> Exception:
    name = type(model).__name__
    if isinstance(e, (TraceError, SampleError)):
        return e
    if type(e).__name__ in _DATA_DEPENDENT or "data-dependent" in str(e).lower() or _needs_real_data(e):
        attempts = "; ".join(f"{t}: {why}" for t, why in tried) or "none"
        return TraceError(
            f"cannot trace {name}: it depends on tensor values that fake tensors do not have "
            f"({_one_line(e)}). Tracers tried: {attempts}. Fake tensors carry shapes, not values: keep "
            "forward() in torch ops (no .numpy(), .tolist() or data pointers), or move that work out of forward."
        )
    if tracer is None:
        attempts = "; ".join(f"{t}: {why}" for t, why in tried)
        return TraceError(f"cannot trace {name}. Tracers tried: {attempts}")
    return SampleError(
        f"{name} does not run on the sample ({_one_line(e)}). Pass the batch exactly as the training loop "
        "would: a dict for model(**batch), a tuple for model(*batch) (with loss_fn: (inputs..., target)), or a tensor."
    )


def _needs_real_data(e: Exception) -> bool:
    """Errors that come from asking a fake tensor for real data (``.numpy()``, ``.tolist()``
    into Python, data pointers): the model, not the sample, is at fault."""
    text = str(e)
    return any(k in text for k in ("FakeTensor", "fake tensor", "Cannot access data pointer", "numpy()"))


# ----------------------------------------------------------------------------- optimizer
def _build_optimizer(optimizer: OptimizerSpec, model: nn.Module, fparams: dict[str, torch.Tensor], spec: DeviceSpec):
    params = [p for p in fparams.values() if p.requires_grad]
    if not isinstance(optimizer, str) and hasattr(optimizer, "state_dtype"):  # memtune.optim.OptimizerSettings
        from .optim import build_optimizer

        return build_optimizer(_FakeParamView(model, fparams), optimizer)
    if callable(optimizer):
        return optimizer(params)
    name = optimizer.lower()
    # CUDA's default implementation is foreach (multi-tensor), whose temporaries count.
    foreach = spec.kind == "cuda"
    if name == "adamw":
        return torch.optim.AdamW(params, lr=1e-3, foreach=foreach)
    if name == "adam":
        return torch.optim.Adam(params, lr=1e-3, foreach=foreach)
    if name == "sgd":
        return torch.optim.SGD(params, lr=1e-3, momentum=0.9, foreach=foreach)
    if name == "none":
        return None
    if name in ("muon2", "muon"):
        from .optim import OptimizerSettings, build_optimizer

        return build_optimizer(_FakeParamView(model, fparams), OptimizerSettings(name=name))
    raise ValueError(f"unknown optimizer {optimizer!r}: use adamw, adam, sgd, muon2, muon, none, or a callable")


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


def optimizer_state_tensors(opt) -> list[torch.Tensor]:
    """Every tensor in ``opt``'s state (none for ``None``)."""
    if opt is None:
        return []
    leaves, _ = tree_flatten([dict(s) for s in opt.state.values()])
    return [t for t in leaves if isinstance(t, torch.Tensor)]


# ----------------------------------------------------------------------------- the measured step
def _record_step(rec: StepRecorder, model, unit_fqns, fparams, fbuffers, fsample, loss_fn, precision, opt) -> None:
    modules = dict(model.named_modules())
    io: dict[str, dict[str, Any]] = {u: {"inputs": [], "outputs": [], "all_inputs": []} for u in unit_fqns}
    handles = []

    def pre_hook(fqn):
        def hook(mod, args, kwargs):
            rec.mark("fwd_start", fqn)
            rec.unit_stack.append(fqn)
            leaves, _ = tree_flatten((args, kwargs))
            tensors = [t for t in leaves if isinstance(t, torch.Tensor) and not rec.is_static(t)]
            io[fqn]["inputs"] = tensors
            grad_inputs = [t for t in tensors if t.requires_grad]
            if grad_inputs:
                torch.autograd.graph.register_multi_grad_hook(grad_inputs, lambda grads: _bwd_end(fqn), mode="all")
        return hook

    def post_hook(fqn):
        def hook(mod, args, kwargs, output):
            rec.unit_stack.pop()
            leaves, _ = tree_flatten(output)
            outs = [t for t in leaves if isinstance(t, torch.Tensor)]
            io[fqn]["outputs"] = outs
            grad_outs = [t for t in outs if t.requires_grad]
            if grad_outs:
                torch.autograd.graph.register_multi_grad_hook(grad_outs, lambda grads: _bwd_start(fqn), mode="any")
            rec.mark("fwd_end", fqn)
        return hook

    def _bwd_start(fqn):
        rec.mark("bwd_start", fqn)
        rec.bwd_unit = fqn

    def _bwd_end(fqn):
        if rec.bwd_unit == fqn:
            rec.mark("bwd_end", fqn)
            rec.bwd_unit = None

    handles += rec.watch_grads(list(fparams.values()))
    for fqn in unit_fqns:
        handles.append(modules[fqn].register_forward_pre_hook(pre_hook(fqn), with_kwargs=True))
        handles.append(modules[fqn].register_forward_hook(post_hook(fqn), with_kwargs=True))
    try:
        with rec:
            rec.register_static(list(fparams.values()), list(fbuffers.values()), fsample, optimizer_state_tensors(opt))
            rec.mark("start")
            with torch.autograd.graph.saved_tensors_hooks(rec.pack, rec.unpack):
                out, loss = _forward_loss(model, fparams, fbuffers, fsample, loss_fn, precision)
            # Keep only references to the unit boundary *records*; drop the tensors so that
            # their storages free when autograd is done with them.
            for d in io.values():
                d["input_records"] = _records(rec, d.pop("inputs"))
                d["output_records"] = _records(rec, d.pop("outputs"))
            del out
            rec.mark("loss")
            rec.phase = "backward"
            loss.backward()
            rec.bwd_unit = None
            del loss
            rec.phase = "optimizer"
            rec.mark("bwd_done")
            rec.mark("optim_start")
            if opt is not None:
                opt.step()
            rec.mark("optim_end")
            if opt is not None:
                opt.zero_grad(set_to_none=True)
            else:
                for p in fparams.values():
                    p.grad = None
            rec.grad_bytes = 0
            rec.mark("end")
    finally:
        for h in handles:
            h.remove()
    rec.unit_io = io  # type: ignore[attr-defined]


def _records(rec: StepRecorder, tensors: list[torch.Tensor]) -> list:
    seen, out = set(), []
    for t in tensors:
        r = rec.record_of(t)
        if r is not None and id(r) not in seen:
            seen.add(id(r))
            out.append(r)
    return out


# ----------------------------------------------------------------------------- assembly
def _assemble(*, model, spec, precision, optimizer, rec: StepRecorder, opt, unit_fqns, named_params, fparams, fbuffers,
              fsample, sample, graph, tracer, tried, seconds) -> ModelProfile:
    g = rec.granularity
    from .devices import round_allocation

    def nbytes(t: torch.Tensor) -> int:
        return round_allocation(t.untyped_storage().nbytes(), g)

    modules = dict(model.named_modules())
    owner = {}
    for mname, mod in modules.items():
        for pname, p in mod.named_parameters(recurse=False):
            full = f"{mname}.{pname}" if mname else pname
            owner.setdefault(id(p), (full, type(mod).__name__))

    def unit_of(fqn: str) -> str | None:
        for u in unit_fqns:
            if fqn == u or fqn.startswith(u + "."):
                return u
        return None

    params = tuple(
        ParamInfo(fqn=n, shape=tuple(p.shape), dtype=str(p.dtype).removeprefix("torch."), param_bytes=nbytes(fparams[n]),
                  unit=unit_of(n), module_type=owner.get(id(p), (n, "?"))[1])
        for n, p in named_params.items()
    )
    # Saved storages, indexed in creation order.
    saved = [r for r in rec.records if r.saved]
    index = {id(r): i for i, r in enumerate(saved)}
    n_events = len(rec.intervals)
    storages = tuple(
        StorageInfo(nbytes=r.nbytes, created=r.created, freed=r.freed if r.freed is not None else n_events,
                    producer=r.producer, holders=tuple(r.holders), saved_outside=r.saved_outside)
        for r in saved
    )
    # Persistent kernel workspaces (cuBLAS on CUDA) are live for the whole step.
    workspace = CUDA_WORKSPACE_BYTES if spec.kind == "cuda" else 0
    timeline = tuple(TimelineEvent(name=iv.name, unit=iv.unit, live_bytes=iv.live_bytes + workspace,
                                   peak_bytes=iv.peak_bytes + workspace, grad_bytes=iv.grad_bytes)
                     for iv in rec.intervals)

    def interval_index(name: str, unit: str) -> int | None:
        for i, iv in enumerate(rec.intervals):
            if iv.name == name and iv.unit == unit:
                return i
        return None

    units = []
    for order, fqn in enumerate(unit_fqns):
        io = rec.unit_io[fqn]
        fs = interval_index("fwd_start", fqn)
        if fs is None:
            raise TraceError(f"unit {fqn!r} never ran in the forward pass; pick units the model calls (units=...)")
        fwd_transient = rec.intervals[fs].peak_bytes - rec.intervals[fs].live_bytes
        bs = interval_index("bwd_start", fqn)
        if bs is None:
            bwd_transient = 0
        else:
            be = interval_index("bwd_end", fqn)
            stop = be if be is not None and be > bs else bs + 1
            bwd_transient = max(iv.peak_bytes for iv in rec.intervals[bs:stop]) - rec.intervals[bs].live_bytes
        unit_params = [p for p in params if p.unit == fqn]
        pbytes = sum(p.param_bytes for p in unit_params)
        gbytes = sum(p.param_bytes for p, (n, fp) in zip(params, fparams.items()) if p.unit == fqn and fp.requires_grad)
        in_recs = io["input_records"]
        units.append(UnitProfile(
            fqn=fqn, module_type=type(modules[fqn]).__name__, order=order, param_bytes=pbytes, grad_bytes=gbytes,
            saved_activation_bytes=sum(r.nbytes for r in saved if fqn in r.holders),
            input_bytes=sum(r.nbytes for r in in_recs),
            output_bytes=sum(r.nbytes for r in io["output_records"]),
            fwd_flops=rec.flops.get(("forward", fqn), 0), bwd_flops=rec.flops.get(("backward", fqn), 0),
            fwd_transient_bytes=fwd_transient, bwd_transient_bytes=max(bwd_transient, 0),
            saved_storages=tuple(i for i, r in enumerate(saved) if fqn in r.holders),
            input_storages=tuple(index[id(r)] for r in in_recs if id(r) in index),
            input_storage_bytes=tuple(r.nbytes for r in in_recs),
        ))
    # Execution order may differ from registration order.
    first_fwd = {iv.unit: i for i, iv in reversed(list(enumerate(rec.intervals))) if iv.name == "fwd_start"}
    units.sort(key=lambda u: first_fwd[u.fqn])
    units = [UnitProfile(**{**{f: getattr(u, f) for f in u.__slots__}, "order": i}) for i, u in enumerate(units)]

    grad_bytes = sum(p.param_bytes for p, fp in zip(params, fparams.values()) if fp.requires_grad)
    total_flops = lambda phase: sum(v for (ph, _), v in rec.flops.items() if ph == phase)  # noqa: E731
    return ModelProfile(
        model=type(model).__name__, tracer=tracer, tracers_tried=tuple(tried), target=spec.kind, target_name=spec.name,
        precision=precision, optimizer=_optimizer_name(optimizer),
        batch_size=batch_size_of(sample), sample=describe(sample),
        param_bytes=sum(p.param_bytes for p in params), buffer_bytes=sum(nbytes(b) for b in fbuffers.values()),
        grad_bytes=grad_bytes, optimizer_state_bytes=_unique_bytes(optimizer_state_tensors(opt), nbytes),
        input_bytes=_unique_bytes([t for t in tree_flatten(fsample)[0] if isinstance(t, torch.Tensor)], nbytes),
        outside_activation_bytes=sum(s.nbytes for s in storages if s.saved_outside and not s.holders),
        workspace_bytes=workspace, baseline_peak_bytes=max(e.peak_bytes for e in timeline),
        fwd_flops=total_flops("forward"), bwd_flops=total_flops("backward"),
        units=tuple(units), params=params, storages=storages, timeline=timeline,
        assumptions=tuple(rec.assumptions), allocation_granularity=g, profile_seconds=round(seconds, 3),
        torch_version=torch.__version__, graph=graph,
    )


def _optimizer_name(optimizer: OptimizerSpec) -> str:
    if isinstance(optimizer, str):
        return optimizer
    name = getattr(optimizer, "name", None)  # OptimizerSettings
    return name if isinstance(name, str) else getattr(optimizer, "__name__", "custom")


def _unique_bytes(tensors, nbytes) -> int:
    seen, total = set(), 0
    for t in tensors:
        key = id(t.untyped_storage())
        if key not in seen:
            seen.add(key)
            total += nbytes(t)
    return total
