"""How memtune turns a batch into a loss, shared by the profiler and the runtime.

A batch can be

* a ``dict`` (Hugging Face style): ``model(**batch)`` returns an output with ``.loss``;
  with ``loss_fn`` the loss is ``loss_fn(output, batch)``;
* a ``tuple``/``list``: without ``loss_fn``, ``model(*batch)`` returns the loss (a scalar
  tensor) or an output with ``.loss``; with ``loss_fn``, the last element is the target
  and the loss is ``loss_fn(model(*batch[:-1]), batch[-1])``;
* a tensor: ``model(batch)``; the loss is ``loss_fn(output)`` when given, else the output
  itself when it is a scalar.
"""

from __future__ import annotations

import functools
import re
from typing import Any, Callable

import torch
from torch.utils._pytree import tree_flatten, tree_map_only

from .errors import SampleError, UsageError

LossFn = Callable[..., torch.Tensor]


def split_batch(batch: Any, loss_fn: LossFn | None) -> tuple[tuple, dict, Any]:
    """``(args, kwargs, target)`` for calling the model on ``batch``."""
    if isinstance(batch, dict):
        return (), dict(batch), None
    if isinstance(batch, (tuple, list)):
        if loss_fn is not None:
            if len(batch) < 2:
                raise UsageError("with loss_fn, a tuple batch must be (inputs..., target)")
            return tuple(batch[:-1]), {}, batch[-1]
        return tuple(batch), {}, None
    if isinstance(batch, torch.Tensor):
        return (batch,), {}, None
    raise UsageError(f"unsupported batch type {type(batch).__name__}: use a dict, a tuple (inputs..., target) or a "
                     "tensor")


def loss_from_output(output: Any, batch: Any, target: Any, loss_fn: LossFn | None) -> torch.Tensor:
    """The scalar loss for ``output``, per the rules in the module docstring."""
    if loss_fn is not None:
        if isinstance(batch, dict):
            loss = loss_fn(output, batch)
        elif target is None:
            loss = loss_fn(output)
        else:
            loss = loss_fn(output, target)
        return _check_loss(loss, "loss_fn")
    loss = find_loss(output)
    if loss is None:
        what = f"a tensor of shape {tuple(output.shape)}" if isinstance(output, torch.Tensor) else type(output).__name__
        raise SampleError(
            f"cannot find a loss: the model returned {what}; pass loss_fn=..., or make the model return a "
            "scalar loss or an output with .loss"
        )
    return _check_loss(loss, "the model")


def _check_loss(loss: Any, source: str) -> torch.Tensor:
    """``loss`` if backward can start from it: one number, attached to the graph."""
    if not isinstance(loss, torch.Tensor):
        raise UsageError(f"{source} returned a {type(loss).__name__} as the loss; return a scalar tensor")
    if loss.numel() != 1:
        raise UsageError(f"{source} returned a loss of shape {tuple(loss.shape)}; return a scalar (reduce it, e.g. "
                         ".mean() or .sum())")
    if torch.is_grad_enabled() and not loss.requires_grad:
        raise UsageError(f"{source} returned a loss that does not require grad (detached, computed under "
                         "torch.no_grad(), or from parameters that are all frozen), so backward has nothing to do; "
                         "return the loss as computed from the model's output")
    return loss


def find_loss(output: Any) -> torch.Tensor | None:
    """The loss a model (or a training step) returned: its ``.loss``, a dict's ``"loss"``, or the
    output itself when it is a scalar tensor; ``None`` when there is none."""
    loss = getattr(output, "loss", None)
    if loss is None and isinstance(output, dict):
        loss = output.get("loss")
    if loss is None and isinstance(output, torch.Tensor) and output.dim() == 0:
        loss = output
    return loss


def batch_size_of(batch: Any) -> int | None:
    """Leading dimension of the first tensor in the batch."""
    leaves, _ = tree_flatten(batch)
    for leaf in leaves:
        if isinstance(leaf, torch.Tensor) and leaf.dim() > 0:
            return int(leaf.shape[0])
    return None


def describe(batch: Any) -> str:
    """``(4, 128) int64`` style description of every tensor in the batch."""
    leaves, _ = tree_flatten(batch)
    parts = [f"{tuple(t.shape)} {str(t.dtype).removeprefix('torch.')}" for t in leaves if isinstance(t, torch.Tensor)]
    return ", ".join(parts) if parts else "no tensors"


def move_batch(batch: Any, device: torch.device | str) -> Any:
    """``batch`` on ``device``, each tensor in storage of its own size. A copy to a GPU is
    compact anyway; a CPU batch that is a slice of a larger tensor (a dataset held in memory)
    is copied, so that the step holds the batch, not the whole tensor it was cut from, as
    the profile counts it."""
    return tree_map_only(torch.Tensor, lambda t: _compact(t.to(device, non_blocking=True)), batch)


def _compact(t: torch.Tensor) -> torch.Tensor:
    if t.layout is not torch.strided or t.device.type == "meta":
        return t
    try:
        held = t.untyped_storage().nbytes()
    except (RuntimeError, NotImplementedError):  # tensor subclasses without a plain storage
        return t
    return t.clone() if held > t.numel() * t.element_size() else t


def split_micro_batches(batch: Any, micro_batch_size: int | None) -> list[tuple[Any, float]]:
    """``batch`` cut along dim 0 into micro-batches of ``micro_batch_size``, each with its weight
    (its share of the batch; the loss of each is scaled by it before backward). Tensors whose
    leading dimension is not the batch's are passed whole. Slices are views: no new memory."""
    n = batch_size_of(batch)
    if not micro_batch_size or n is None or n <= micro_batch_size:
        return [(batch, 1.0)]
    out = []
    for start in range(0, n, micro_batch_size):
        size = min(micro_batch_size, n - start)
        out.append((slice_batch(batch, start, start + size, n), size / n))
    return out


def slice_batch(batch: Any, start: int, stop: int, n: int | None = None) -> Any:
    """Samples ``start:stop`` of ``batch``: its tensors whose dim 0 is the batch's size ``n``
    are sliced (views), the others passed whole."""
    n = batch_size_of(batch) if n is None else n
    return tree_map_only(torch.Tensor, lambda t: t[start:stop] if t.dim() > 0 and t.shape[0] == n else t, batch)


_DESCRIBED = re.compile(r"\(([\d, ]*)\) (\w+)")


@functools.lru_cache(maxsize=8)
def described_tensors(description: str) -> tuple[tuple[tuple[int, ...], str], ...]:
    """``(shape, dtype name)`` of each tensor in a :func:`describe` string (read every step by
    the runtime: parsed once per profile)."""
    return tuple((tuple(int(d) for d in m.group(1).replace(" ", "").split(",") if d), m.group(2))
                 for m in _DESCRIBED.finditer(description or ""))
