"""Make a fake-tensor run take the path eager training takes, and say where it cannot.

memtune profiles by running one training step on fake tensors. A model can notice: some
libraries switch to a tracing-safe code path when they see a fake tensor, and some kernels'
fake (meta) implementations check rules that belong to another device. Each fix here either
steers the fake run onto the eager path or records what the eager kernel would allocate, and
says so in ``profile.assumptions``:

* :func:`eager_hf_masking`: Hugging Face models build a full ``(B, 1, T, T)`` attention mask
  when they see a fake tensor, where eager training passes ``is_causal`` and no mask;
* :func:`training_configs`: a Hugging Face KV cache (``use_cache``) is off, as
  :func:`memtune.apply_plan` turns it off for training (on every sub-config: an
  encoder-decoder's decoder keeps its own copy of the config);
* :data:`EAGER_KERNELS`: ops whose meta kernel rejects inputs that the eager kernel takes,
  e.g. ``aten._grouped_mm`` (Mixtral, Qwen-MoE and OLMoE experts in transformers 5), whose
  meta check demands bf16 (the CUDA kernel's rule) while the CPU kernel runs fp32.
"""

from __future__ import annotations

import sys
from contextlib import contextmanager
from typing import Any, Callable

import torch
import torch.nn as nn

aten = torch.ops.aten


@contextmanager
def eager_hf_masking():
    """While the step is recorded, transformers' ``is_tracing`` check ignores fake tensors, so
    the model takes its eager masking path. Whether the batch is padded then becomes a value
    read, which the recorder resolves as "no padding" and lists in ``profile.assumptions``."""
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


def model_configs(model: nn.Module) -> list[Any]:
    """Every distinct Hugging Face-style config (an object with ``use_cache``) held by a module."""
    seen: dict[int, Any] = {}
    for m in model.modules():
        cfg = getattr(m, "config", None)
        if cfg is not None and hasattr(cfg, "use_cache") and id(cfg) not in seen:
            seen[id(cfg)] = cfg
    return list(seen.values())


def disable_kv_cache(model: nn.Module) -> list[tuple[Any, Any]]:
    """Turn ``use_cache`` off on every config in ``model``; returns ``(config, old value)`` pairs.

    Training never wants a KV cache: it holds keys and values outside autograd, and under
    recomputation a decoder's cross-attention finds its keys already cached and saves fewer
    tensors than the first forward did, which ``torch.utils.checkpoint`` rejects (seen on
    T5, whose decoder stack keeps a deep copy of the config)."""
    changed = []
    for cfg in model_configs(model):
        if cfg.use_cache:
            changed.append((cfg, cfg.use_cache))
            cfg.use_cache = False
    return changed


@contextmanager
def training_configs(model: nn.Module):
    """:func:`disable_kv_cache` for the duration of a profile; the model is left as it was.
    Yields the ``(config, old value)`` pairs it changed (for :func:`kv_cache_as_configured`)."""
    changed = disable_kv_cache(model)
    try:
        yield changed
    finally:
        for cfg, value in changed:
            cfg.use_cache = value


@contextmanager
def kv_cache_as_configured(changed: list[tuple[Any, Any]]):
    """Inside :func:`training_configs`, the KV cache back as the user configured it, to record
    the step as the user's own loop runs it."""
    for cfg, value in changed:
        cfg.use_cache = value
    try:
        yield
    finally:
        for cfg, _ in changed:
            cfg.use_cache = False


# ----------------------------------------------------------------------------- kernels
def _grouped_mm_like_eager(func, args, kwargs) -> tuple[torch.Tensor, str] | None:
    """``aten._grouped_mm`` on non-bf16 inputs: the meta kernel only accepts bf16, the eager CPU
    kernel also runs fp32 and returns its input dtype. Compute the shape with bf16 stand-ins and
    return an output of the eager dtype."""
    mat_a, mat_b = args[0], args[1]
    if mat_a.dtype == torch.bfloat16 and mat_b.dtype == torch.bfloat16:
        return None
    out_dtype = kwargs.get("out_dtype") or (args[4] if len(args) > 4 and args[4] is not None else None)
    stand_in = func(mat_a.to(torch.bfloat16), mat_b.to(torch.bfloat16), *args[2:4],
                    **{k: v for k, v in kwargs.items() if k != "out_dtype"})
    out = torch.empty(stand_in.shape, dtype=out_dtype or mat_a.dtype, device=mat_a.device)
    note = (f"aten._grouped_mm on {str(mat_a.dtype).removeprefix('torch.')}: its fake (meta) kernel accepts only bf16, "
            "the CUDA kernel's rule; recorded the eager kernel's output of the same shape in the input dtype")
    return out, note


EAGER_KERNELS: dict[Any, Callable[[Any, tuple, dict], tuple[torch.Tensor, str] | None]] = {
    aten._grouped_mm.default: _grouped_mm_like_eager,
}
"""aten op -> handler(func, args, kwargs) returning ``(what eager allocates, note)``, or ``None``
when the op's own fake kernel is right for these inputs."""


FAKE_KERNEL_FILES = ("_meta_registrations.py", "fake_impls.py", "_refs", "_prims", "fake_tensor.py")
"""Files whose frames in a traceback show that a fake/meta kernel, not the model, raised."""


def raised_by_fake_kernel(error: BaseException) -> str | None:
    """The name of the fake/meta kernel function that raised ``error``, if one did."""
    tb = error.__traceback__
    culprit = None
    while tb is not None:
        filename = tb.tb_frame.f_code.co_filename
        if any(part in filename for part in FAKE_KERNEL_FILES[:4]):
            culprit = tb.tb_frame.f_code.co_name
        tb = tb.tb_next
    return culprit
