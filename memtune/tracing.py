"""Capturing a model's graph with torch.fx, and saying why a model cannot be profiled.

:func:`capture_graph` tries ``symbolic_trace`` (each unit kept as one ``call_module`` node),
then an aten-level graph from ``make_fx`` over fake tensors. :func:`classify_failure` turns
what went wrong into a :class:`~memtune.errors.TraceError` (the model cannot be traced: which
tracers were tried and why each failed) or a :class:`~memtune.errors.SampleError` (the model
does not run on this sample), telling a fake-tensor limitation from a bad sample by running a
small model once on the real sample.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from torch.utils._pytree import tree_flatten

from .batching import loss_from_output, split_batch
from .errors import SampleError, TraceError, UsageError
from .fake_compat import EAGER_KERNELS, eager_hf_masking, raised_by_fake_kernel
from .recorder import StepRecorder
from .step_recording import forward_loss

_DATA_DEPENDENT = ("DataDependentOutputException", "DynamicOutputShapeException", "GuardOnDataDependentSymNode")


class _UnitTracer(torch.fx.Tracer):
    """symbolic_trace that keeps each unit as one ``call_module`` node."""

    def __init__(self, unit_fqns):
        super().__init__()
        self.unit_fqns = set(unit_fqns)

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return qualname in self.unit_fqns or super().is_leaf_module(m, qualname)


def capture_graph(model, unit_fqns, fake_mode, fparams, fbuffers, fsample, loss_fn, precision, sample):
    """``(graph, tracer, tried)``: symbolic_trace first, then make_fx over fake tensors."""
    tried: list[tuple[str, str]] = []
    try:
        # Keep the Graph, not a GraphModule: a GraphModule would hold the user's modules and
        # parameters, and a kept profile would keep the model alive.
        return _UnitTracer(unit_fqns).trace(model), "symbolic_trace", tried
    except Exception as e:  # fx raises many types: TraceError, TypeError, AttributeError...
        tried.append(("symbolic_trace", one_line(e)))
    from torch.fx.experimental.proxy_tensor import make_fx

    def fwd(params, buffers, batch):
        return forward_loss(model, params, buffers, batch, loss_fn, precision)[1]

    try:
        with fake_mode, StepRecorder(), eager_hf_masking():  # the recorder resolves data-dependent reads
            gm = make_fx(fwd, tracing_mode="real", pre_dispatch=False)(fparams, fbuffers, fsample)
        return gm.graph, "make_fx", tried
    except Exception as e:
        tried.append(("make_fx", one_line(e)))
        # Tell a bad sample from an untraceable model: does plain eager execution on fake
        # tensors get through the forward?
        try:
            with fake_mode, StepRecorder(), eager_hf_masking():
                fwd(fparams, fbuffers, fsample)
        except Exception as eager_error:
            raise classify_failure(eager_error, model, tried, "eager", sample, loss_fn) from e
        raise classify_failure(e, model, tried, None, sample, loss_fn) from e


def one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"[:300]


REAL_CHECK_MAX_BYTES = 256 * 2**20
"""A model whose real parameters fit in this many bytes is run once on the real sample when its
fake run fails, to tell a bad sample from a fake-tensor limitation."""


def classify_failure(e: Exception, model: nn.Module, tried, tracer, sample=None, loss_fn=None) -> Exception:
    name = type(model).__name__
    if isinstance(e, (TraceError, SampleError, UsageError)):
        return e
    attempts = "; ".join(f"{t}: {why}" for t, why in tried) or "none"
    if type(e).__name__ in _DATA_DEPENDENT or "data-dependent" in str(e).lower() or _needs_real_data(e):
        return TraceError(
            f"cannot trace {name}: it depends on tensor values that fake tensors do not have "
            f"({one_line(e)}). Tracers tried: {attempts}. Fake tensors carry shapes, not values: keep "
            "forward() in torch ops (no .numpy(), .tolist() or data pointers), or move that work out of forward."
        )
    if tracer is None:
        return TraceError(f"cannot trace {name}. Tracers tried: {attempts}")
    kernel = raised_by_fake_kernel(e)
    real = _runs_on_real_tensors(model, sample, loss_fn)
    if real is True:
        where = f"PyTorch's fake-tensor kernel {kernel}() rejected an input" if kernel else "the fake-tensor run failed"
        return TraceError(
            f"cannot profile {name} on fake tensors: {where} ({one_line(e)}), although the model runs on the real "
            f"sample: a limitation of fake tensors, not of your sample. memtune records the eager kernel for "
            f"{', '.join(str(k) for k in EAGER_KERNELS)}; for another op, profile with the dtype its fake kernel "
            f"accepts (e.g. precision='bf16-mixed') or report the op. Tracers tried: {attempts}")
    hint = ""
    if kernel is not None and real is None:
        hint = (f" The error comes from the fake-tensor kernel {kernel}(): if the real model does run on this sample, "
                "that kernel's fake implementation is at fault, not the sample.")
    return SampleError(
        f"{name} does not run on the sample ({one_line(e)}). Pass the batch exactly as the training loop "
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
