"""Device table and device-specific memory rules.

Peak rates are the vendors' published dense figures (no structured sparsity). The
planner's cost model starts from them and, when the device is present, calibrates with
a short measured run (:mod:`memtune.cost_model`).

Memory rules that differ between the CPU the profiler traces on and the CUDA device it
models (see docs/profiler.md):

* the CUDA caching allocator rounds every block up to 512 bytes;
* ``scaled_dot_product_attention`` runs a different kernel per device and dtype, and each
  kernel saves different tensors for backward (:func:`cuda_sdpa_backend`).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch

GiB = 2**30
CUDA_ALLOCATION_GRANULARITY = 512
"""Bytes: the CUDA caching allocator rounds each allocation up to a multiple of this."""

CUDA_CONTEXT_BYTES = 682 * 2**20
"""Device memory of a CUDA context with cuBLAS handles and workspace, outside PyTorch's
caching allocator (measured with NVML on an H100, torch 2.11; docs/benchmarks.md)."""

CUDA_WORKSPACE_BYTES = 128 * 2**20
"""Persistent kernel workspaces that live in PyTorch's caching allocator but belong to no
tensor op (cuBLAS/cuBLASLt workspaces, kept after first use). Measured on an H100 with
torch 2.11 as the constant gap between ``max_memory_allocated`` and a dispatch-level view
of the same step: 65-129 MiB across GPT and Llama, fp32 and bf16, every SDPA kernel
(benchmarks/results/gpu_gap_clean.log); the upper end is used so plans err on the safe side."""

DEFAULT_CUDA_RESERVE_BYTES = 1 * GiB
"""Bytes set aside from a CUDA budget for the CUDA context (:data:`CUDA_CONTEXT_BYTES`) and
for memory no tensor op exposes: cuBLAS/cuDNN/attention workspaces and allocator slack
(the rest, ~340 MiB). Measured on an H100 in docs/benchmarks.md; override with
``Budget.parse(..., reserve=...)``."""


@dataclass(frozen=True, kw_only=True, slots=True)
class DeviceSpec:
    name: str
    kind: str
    """``cuda`` or ``cpu``."""
    memory_bytes: int
    """Total device memory."""
    bf16_flops: float
    """Peak dense bf16 tensor throughput, FLOP/s."""
    fp32_flops: float
    """Peak fp32 throughput for matmuls (TF32 tensor cores where PyTorch's default uses them
    is *not* assumed: ``torch.backends.cuda.matmul.allow_tf32`` is off by default)."""
    mem_bandwidth: float
    """Bytes/s."""
    matmul_efficiency: float = 0.6
    """Fraction of peak FLOP/s that real training matmuls reach (before calibration)."""
    bandwidth_efficiency: float = 0.7
    """Fraction of peak bandwidth that elementwise kernels reach (before calibration)."""
    kernel_overhead_s: float = 6e-6
    """Launch/dispatch overhead per kernel."""
    python_dispatch_s: float = 13e-6
    """Host time per op routed through a Python dispatch mode, forward and recomputation together:
    what selective checkpointing's cache (``create_selective_checkpoint_contexts``) adds to every
    op of a SELECTIVE unit. Measured at 13 µs on the 2-core CI CPU (a 100-op chain of small ops,
    plain checkpoint 7.4 µs/op against 20.3 µs/op with a selective policy)."""


_T = 1e12
_G = 1e9
DEVICES: dict[str, DeviceSpec] = {
    d.name: d
    for d in [
        DeviceSpec(name="H100", kind="cuda", memory_bytes=80 * GiB, bf16_flops=989 * _T, fp32_flops=67 * _T, mem_bandwidth=3350 * _G),
        DeviceSpec(name="H200", kind="cuda", memory_bytes=141 * 10**9, bf16_flops=989 * _T, fp32_flops=67 * _T, mem_bandwidth=4800 * _G),
        DeviceSpec(name="A100-80GB", kind="cuda", memory_bytes=80 * GiB, bf16_flops=312 * _T, fp32_flops=19.5 * _T, mem_bandwidth=2039 * _G),
        DeviceSpec(name="A100-40GB", kind="cuda", memory_bytes=40 * GiB, bf16_flops=312 * _T, fp32_flops=19.5 * _T, mem_bandwidth=1555 * _G),
        DeviceSpec(name="L4", kind="cuda", memory_bytes=24 * GiB, bf16_flops=121 * _T, fp32_flops=30.3 * _T, mem_bandwidth=300 * _G),
        DeviceSpec(name="RTX4090", kind="cuda", memory_bytes=24 * GiB, bf16_flops=165.2 * _T, fp32_flops=82.6 * _T, mem_bandwidth=1008 * _G),
        DeviceSpec(name="RTX3090", kind="cuda", memory_bytes=24 * GiB, bf16_flops=71 * _T, fp32_flops=35.6 * _T, mem_bandwidth=936 * _G),
        # T4 has no bf16 tensor cores; bf16 matmuls run near the fp32 rate.
        DeviceSpec(name="T4", kind="cuda", memory_bytes=16 * GiB, bf16_flops=8.1 * _T, fp32_flops=8.1 * _T, mem_bandwidth=320 * _G),
    ]
}

_CUDA_NAME_KEYS = [("H200", "H200"), ("H100", "H100"), ("A100", None), ("L4", "L4"), ("4090", "RTX4090"),
                   ("3090", "RTX3090"), ("T4", "T4")]


def local_cpu() -> DeviceSpec:
    """This machine's CPU. Rates are conservative per-core guesses until calibrated."""
    import psutil

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return DeviceSpec(
        name="cpu", kind="cpu", memory_bytes=psutil.virtual_memory().total,
        bf16_flops=20 * _G * cores, fp32_flops=40 * _G * cores, mem_bandwidth=8 * _G,
        matmul_efficiency=1.0, bandwidth_efficiency=1.0, kernel_overhead_s=4e-6,
    )


def cuda_spec_for(name: str, total_memory: int | None = None) -> DeviceSpec | None:
    """Match a CUDA device name (``torch.cuda.get_device_name``) against the table."""
    for key, table_name in _CUDA_NAME_KEYS:
        if key in name:
            if key == "A100":
                big = total_memory is None or total_memory > 48 * GiB
                return DEVICES["A100-80GB" if big else "A100-40GB"]
            return DEVICES[table_name]
    return None


def resolve_device(device: str | torch.device | DeviceSpec | None) -> DeviceSpec:
    """A :class:`DeviceSpec` for a table name (``"H100"``), a torch device, or ``None``
    (the current CUDA device if there is one, else the local CPU)."""
    if isinstance(device, DeviceSpec):
        return device
    if isinstance(device, str) and device in DEVICES:
        return DEVICES[device]
    if isinstance(device, str) and device.lower() == "cpu":
        return local_cpu()
    if device is None and torch.cuda.is_available():
        device = torch.device("cuda")
    if device is None:
        return local_cpu()
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ValueError(f"unknown device {device!r}: name a torch device ('cuda', 'cpu') or a device-table entry "
                         f"({', '.join(DEVICES)})") from None
    if dev.type == "cpu":
        return local_cpu()
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(
                f"device {device!r} is CUDA but no CUDA device is present; name a device-table entry "
                f"instead (one of {', '.join(DEVICES)})"
            )
        props = torch.cuda.get_device_properties(dev)
        spec = cuda_spec_for(props.name, props.total_memory)
        if spec is None:  # unknown GPU: keep the real memory size, borrow A100 rates
            base = DEVICES["A100-80GB"]
            return DeviceSpec(name=props.name, kind="cuda", memory_bytes=props.total_memory, bf16_flops=base.bf16_flops,
                              fp32_flops=base.fp32_flops, mem_bandwidth=base.mem_bandwidth)
        return DeviceSpec(**{**_asdict(spec), "memory_bytes": props.total_memory})
    raise ValueError(f"unsupported device {device!r}: use a CUDA device, 'cpu' or one of {', '.join(DEVICES)}")


def _asdict(spec: DeviceSpec) -> dict:
    return {f: getattr(spec, f) for f in spec.__slots__}


def round_allocation(nbytes: int, granularity: int) -> int:
    """Bytes an allocator really hands out for a request of ``nbytes``."""
    if granularity <= 1 or nbytes == 0:
        return nbytes
    return math.ceil(nbytes / granularity) * granularity


# ----------------------------------------------------------------------------- SDPA
def cuda_sdpa_backend(*, dtype: torch.dtype, head_dim: int, has_mask: bool, dropout_p: float) -> str:
    """Which fused kernel PyTorch picks for ``scaled_dot_product_attention`` on a recent
    NVIDIA GPU (sm80+), following its selection order flash -> efficient -> math:

    * flash needs fp16/bf16, no explicit attention mask, head_dim <= 256 and a multiple of 8;
    * memory-efficient takes fp32 too and an additive mask;
    * otherwise the math path materializes the attention matrix.
    """
    if dtype in (torch.float16, torch.bfloat16) and not has_mask and head_dim <= 256 and head_dim % 8 == 0:
        return "flash"
    if dtype in (torch.float16, torch.bfloat16, torch.float32) and head_dim % 8 == 0:
        return "efficient"
    return "math"


def cuda_sdpa_logsumexp_bytes(backend: str, batch: int, heads: int, q_len: int) -> int:
    """Bytes of the fp32 log-sum-exp that a CUDA SDPA kernel saves for backward
    (flash: ``(B, H, T)``; memory-efficient pads T up to a multiple of 32)."""
    if backend == "flash":
        return batch * heads * q_len * 4
    if backend == "efficient":
        return batch * heads * (math.ceil(q_len / 32) * 32) * 4
    return 0
