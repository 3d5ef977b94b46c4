"""Faults inside a framework's own training step (the Hugging Face or Lightning Trainer), raised
where real ones arise: an out-of-memory error from an op the dispatcher runs during backward,
armed after memtune has profiled and planned."""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import _get_current_dispatch_mode_stack


@torch.library.custom_op("memtune_test::oom_when_armed", mutates_args=())
def oom_when_armed(grad: torch.Tensor) -> torch.Tensor:
    if OOMInBackward.armed:
        OOMInBackward.armed = False
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (injected in backward)")
    return grad.clone()


@oom_when_armed.register_fake
def _(grad):
    return torch.empty_like(grad)


class OOMInBackward(torch.autograd.Function):
    """Identity forward; the backward's gradient goes through :func:`oom_when_armed`."""

    armed = False

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return oom_when_armed(grad)


def arm_oom_in_backward(module: torch.nn.Module):
    """From now on ``module``'s output passes through :class:`OOMInBackward`, armed to fail
    once; returns the hook handle."""
    OOMInBackward.armed = True
    return module.register_forward_hook(lambda m, a, out: OOMInBackward.apply(out))


def memtune_modes_left() -> list:
    """memtune dispatch modes still entered (none may outlive a failed step)."""
    return [m for m in _get_current_dispatch_mode_stack() if type(m).__module__.startswith("memtune")]
