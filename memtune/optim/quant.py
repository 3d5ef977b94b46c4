"""Low-precision optimizer state in pure PyTorch, and its byte count for the planner.

A state buffer (momentum, second moment) is stored in one of three precisions:

    fp32   one fp32 tensor                           4 bytes / element
    bf16   one bf16 tensor (round to nearest)        2 bytes / element
    int8   blockwise absmax quantization             1 byte / element + 4 bytes / block

int8 layout: the buffer is flattened and cut into blocks of ``BLOCK_SIZE`` = 256 elements
(the last block zero-padded during compute, not in storage). Each block keeps its absmax as
one fp32 scale; values are stored as ``round(x / absmax · L)``: signed int8 with L = 127 for
momentum, unsigned uint8 with L = 255 for the second moment (it is non-negative, so the sign
bit would be wasted), and a positive second-moment entry is never stored as 0 (a zeroed V
under a live momentum entry makes U/√V explode; rounding it up to one quantum bounds that).
With ``domain="sqrt"`` the quantized value is ``sign(x)·√|x|``, which
gives small entries much finer steps: an entry 10⁻⁴ of its block's max is representable in
the sqrt domain (√ is 10⁻², above the 1/255 step) but rounds to 0 in the linear one. Which
domain tracks fp32 better is measured in benchmarks/muon2.py (docs/muon2.md).

Buffers are read as fp32 (:func:`read_state`), updated in fp32, and written back
(:func:`write_state`); in fp32 the read returns the stored tensor itself, so nothing is copied.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F

from memtune.optim.settings import OptimizerConfigError, OptimizerSettings, STATE_DTYPES

BLOCK_SIZE = 256
_BYTES_PER_ELEMENT = {"fp32": 4, "bf16": 2, "int8": 1}


def _blocks(flat: torch.Tensor, block_size: int) -> torch.Tensor:
    """``flat`` as (blocks, block_size); a copy with zero padding only if the size needs it."""
    pad = (-flat.numel()) % block_size
    return (F.pad(flat, (0, pad)) if pad else flat).view(-1, block_size)


def quantize_blockwise(x: torch.Tensor, *, signed: bool, domain: str = "sqrt",
                       block_size: int = BLOCK_SIZE) -> tuple[torch.Tensor, torch.Tensor]:
    """``x`` → (codes, absmax): int8 codes (uint8 if not ``signed``) of ``x.numel()`` elements
    and one fp32 absmax per block of ``block_size``.

    Written for few passes over memory (this runs on every buffer every step): one temporary
    holds |x| (or √|x|), is scaled, rounded and signed in place, then cast once."""
    if domain not in ("linear", "sqrt"):
        raise OptimizerConfigError(f"int8 domain {domain!r}: use 'linear' or 'sqrt'")
    flat = x.reshape(-1)
    n = flat.numel()
    blocks = _blocks(flat if flat.dtype == torch.float32 else flat.float(), block_size)
    mag = blocks.abs() if signed else blocks.clamp_min(0)
    if domain == "sqrt":
        mag.sqrt_()
    absmax = mag.amax(dim=1)
    levels = 127.0 if signed else 255.0
    mag.mul_((levels / absmax.clamp_min(torch.finfo(torch.float32).tiny))[:, None]).round_()
    if signed:
        mag.copysign_(blocks)
    else:
        # A positive second moment never rounds to 0: Adam-style U/√V would turn a decaying
        # momentum entry over a zeroed V into a huge step (measured: int8 runs diverged).
        # Code 1 acts as a floor of one quantum, relative to the block's max.
        mag = torch.maximum(mag, blocks.gt(0).float(), out=mag)
    codes = mag.to(torch.int8 if signed else torch.uint8).view(-1)
    if codes.numel() != n:  # the last block's padding leaves storage too (the state keeps ``codes``)
        codes = codes[:n].clone()
    return codes, absmax


def dequantize_blockwise(codes: torch.Tensor, absmax: torch.Tensor, shape: Sequence[int], *, signed: bool,
                         domain: str = "sqrt", block_size: int = BLOCK_SIZE) -> torch.Tensor:
    """Inverse of :func:`quantize_blockwise`, as fp32 of ``shape``."""
    n = codes.numel()
    levels = 127.0 if signed else 255.0
    # int8 × fp32 promotes inside the multiply: the cast costs no pass of its own.
    flat = (_blocks(codes, block_size) * (absmax / levels)[:, None]).view(-1)[:n]
    if domain == "sqrt":
        flat = flat.mul_(flat.abs()) if signed else flat.square_()  # sign(y)·y² undoes sign(x)·√|x|
    # view(tuple), not view(*shape): a 0-d parameter (CLIP's logit_scale) has shape (), and
    # view() with no sizes is an error, while view(()) is the 0-d tensor.
    return flat.view(tuple(shape))


def read_state(state: dict, name: str, shape: Sequence[int], *, signed: bool, domain: str = "sqrt") -> torch.Tensor:
    """State buffer ``name`` as fp32, whatever precision it is stored in. For fp32 storage this
    is the stored tensor (update it in place); otherwise a fresh fp32 copy."""
    if name in state:
        return state[name] if state[name].dtype == torch.float32 else state[name].float()
    codes, absmax = state[name + "_q"], state[name + "_absmax"]
    return dequantize_blockwise(codes, absmax, shape, signed=signed, domain=domain)


def write_state(state: dict, name: str, value: torch.Tensor, state_dtype: str, *, signed: bool,
                domain: str = "sqrt") -> None:
    """Store fp32 ``value`` as buffer ``name`` in ``state_dtype``, replacing any other encoding."""
    if state_dtype == "int8":
        state.pop(name, None)
        state[name + "_q"], state[name + "_absmax"] = quantize_blockwise(value, signed=signed, domain=domain)
        return
    state.pop(name + "_q", None)
    state.pop(name + "_absmax", None)
    if state_dtype == "fp32":
        if state.get(name) is not value:
            state[name] = value.float() if value.dtype != torch.float32 else value
    elif state_dtype == "bf16":
        state[name] = value.to(torch.bfloat16)
    else:
        raise OptimizerConfigError(f"state_dtype={state_dtype!r}: use one of {STATE_DTYPES}")


def buffer_bytes(numel: int, state_dtype: str) -> int:
    """Bytes of one state buffer of ``numel`` elements in ``state_dtype`` (int8 includes scales)."""
    if state_dtype not in _BYTES_PER_ELEMENT:
        raise OptimizerConfigError(f"state_dtype={state_dtype!r}: use one of {STATE_DTYPES}")
    n = numel * _BYTES_PER_ELEMENT[state_dtype]
    if state_dtype == "int8":
        n += 4 * math.ceil(numel / BLOCK_SIZE)
    return n


def state_bytes(param_or_shape: torch.Tensor | Sequence[int], settings: OptimizerSettings | None = None, *,
                kind: str | None = None) -> int:
    """Optimizer-state bytes memtune's optimizers keep for one parameter.

    A pure function of shape and settings, so it prices meta and fake tensors. ``kind`` is
    the part that owns the parameter ("muon2", "muon" or "adamw"); by default a parameter of
    fewer than 2 dims, or any parameter under ``settings.name == "adamw"``, is AdamW, and the
    rest ``settings.name`` (ask :func:`memtune.optim.split_parameters` for a model's real split).

        adamw   exp_avg + exp_avg_sq                      2 buffers
        muon    momentum                                  1 buffer
        muon2   momentum + second moment                  2 buffers
        muon2-F momentum + fp32 row/col factors           1 buffer + 4·(rows + cols) bytes

    For Muon²-F a parameter of more than 2 dims is viewed as ``(shape[0], prod(rest))``, as
    Muon² does for conv weights. Step counters are Python ints and cost no tensor bytes.
    """
    settings = settings or OptimizerSettings()
    shape = tuple(param_or_shape.shape) if isinstance(param_or_shape, torch.Tensor) else tuple(param_or_shape)
    numel = math.prod(shape)
    if kind is None:
        kind = "adamw" if len(shape) < 2 or settings.name == "adamw" else settings.name
    one = buffer_bytes(numel, settings.state_dtype)
    if kind == "adamw":
        return 2 * one
    if kind == "muon":
        return one
    if kind == "muon2":
        if settings.factorized:
            rows, cols = shape[0], numel // max(shape[0], 1)
            return one + 4 * (rows + cols)
        return 2 * one
    raise OptimizerConfigError(f"kind={kind!r}: use 'muon2', 'muon' or 'adamw'")


class StateDtypeMixin:
    """``set_state_dtype`` for optimizers that keep their buffers through :func:`write_state`.

    The optimizer provides ``_recode_group(group, state_dtype)``, which re-encodes one param
    group's buffers (it knows their names and shapes)."""

    def set_state_dtype(self, state_dtype: str) -> None:
        """Re-encode every state buffer in ``state_dtype`` ("fp32" | "bf16" | "int8") in place.
        Going up in precision is exact; going down rounds once, as a step would."""
        from memtune.optim.settings import STATE_DTYPES, OptimizerConfigError

        if state_dtype not in STATE_DTYPES:
            raise OptimizerConfigError(f"state_dtype={state_dtype!r}: use one of {STATE_DTYPES}")
        for group in self.param_groups:
            self._recode_group(group, state_dtype)
            group["state_dtype"] = state_dtype

    def load_state_dict(self, state_dict: dict) -> None:
        # Optimizer.load_state_dict casts floating state to the parameter's dtype (bf16 -> fp32);
        # re-encode so the resumed state has the precision (and the bytes) it was saved with.
        super().load_state_dict(state_dict)
        for group in self.param_groups:
            self._recode_group(group, group["state_dtype"])
