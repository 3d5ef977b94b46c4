"""The one frozen settings object that configures memtune's optimizers.

``OptimizerSettings`` is plain data (no live tensors or modules): :func:`memtune.optim.build_optimizer`
turns it into an optimizer, and :func:`memtune.optim.state_bytes` prices it for the planner.
"""

from __future__ import annotations

import math

from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Mapping

import torch

from memtune.errors import OptimizerConfigError  # noqa: F401 - re-exported: memtune.optim.OptimizerConfigError
from memtune.optimizers import FAMILIES as OPTIMIZER_NAMES  # the optimizers memtune.optim builds
from memtune.optimizers import STATE_DTYPES

ADJUST_LR = ("original", "match_rms_adamw")
EPS_MODES = ("outside", "inside")
INT8_DOMAINS = ("linear", "sqrt")
NS_DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}

_BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")


def cpu_has_bf16_matmul() -> bool:
    """Whether this CPU multiplies bf16 matrices natively (x86 ``avx512_bf16`` or ``amx_bf16``,
    which oneDNN uses): there a bf16 matmul measured 2x faster than fp32 (0.38 against 0.81 ms
    for X·Xᵀ of 256×1024 on an AMD EPYC with avx512_bf16, docs/benchmarks.md §15). Elsewhere
    PyTorch emulates bf16 and it is slower than fp32."""
    global _cpu_bf16
    if _cpu_bf16 is None:
        try:
            with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
                flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
        except OSError:
            flags = []
        _cpu_bf16 = torch.backends.mkldnn.is_available() and any(fl in flags for fl in _BF16_CPU_FLAGS)
    return _cpu_bf16


_cpu_bf16: bool | None = None


def default_ns_dtype(device: "str | torch.device") -> str:
    """The Newton-Schulz dtype memtune uses when the caller does not choose one: bf16 on CUDA
    (as torch.optim.Muon) and on CPUs with native bf16 matmul; fp32 on other CPUs, where bf16
    is emulated and slower."""
    kind = torch.device(device).type if not isinstance(device, torch.device) else device.type
    return "bf16" if kind == "cuda" or (kind == "cpu" and cpu_has_bf16_matmul()) else "fp32"


def _fraction(v) -> bool:
    """A number in [0, 1): what momentum and decay rates must be."""
    return isinstance(v, (int, float)) and not isinstance(v, bool) and 0 <= v < 1


def check_hyperparameters(owner: str, **values) -> None:
    """The range of each hyperparameter, one rule for :class:`OptimizerSettings` and the
    optimizers' constructors (so that a resumed state dict is held to them too): ``momentum``,
    ``beta2`` and each of ``betas`` in [0, 1); anything else (learning rates, epsilons, weight
    decay) a finite number >= 0. ``owner`` prefixes the message."""
    for name, v in values.items():
        if isinstance(v, torch.Tensor) and v.numel() == 1:  # a tensor lr, as torch's optimizers accept
            v = float(v)
        if name == "betas":
            ok = isinstance(v, (tuple, list)) and len(v) == 2 and all(_fraction(b) for b in v)
            want = "two numbers in [0, 1), such as (0.9, 0.95)"
        elif name in ("momentum", "beta2"):
            ok, want = _fraction(v), "a number in [0, 1)"
        else:
            ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v >= 0
            want = "a finite number >= 0"
        if not ok:
            raise OptimizerConfigError(f"{owner + ' ' if owner else ''}{name}={v!r}: give {want}")


@dataclass(frozen=True, kw_only=True, slots=True)
class AdaptiveNS:
    """Adaptive Newton-Schulz: each matrix picks its own K in ``[k_min, k_max]`` each step.

    After a step with K iterations we know the orthogonality error of the iterates ``X_{K-1}``
    and ``X_K`` (:func:`memtune.optim.newton_schulz.newton_schulz_traced`). If ``X_K`` was
    still worse than ``target_error`` the next step uses K+1; if ``X_{K-1}`` was already
    within ``target_error`` the next step uses K-1; otherwise K stays.
    """

    k_min: int = 2
    """Fewest NS iterations, >= 1."""
    k_max: int = 5
    """Most NS iterations, >= k_min."""
    target_error: float = 0.55
    """Orthogonality error (:func:`orthogonality_error`, the RMS of σ² − 1) counted as converged,
    in (0, 1). The default quintic does not converge to σ = 1 but cycles inside [0.68, 1.2],
    where |σ² − 1| ≤ 0.54, so a converged iterate can read up to ~0.54 (a flat spectrum at the
    band's low edge; measured 0.17-0.53 on an orthogonal input). Above 0.55 some singular value
    is certainly outside the band."""

    def as_dict(self) -> dict:
        return {"k_min": self.k_min, "k_max": self.k_max, "target_error": self.target_error}


@dataclass(frozen=True, kw_only=True, slots=True)
class OptimizerSettings:
    """Hybrid optimizer: hidden matrices get Muon² (or Muon), everything else AdamW."""

    name: str = "muon2"
    """"muon2" (Muon² on hidden matrices), "muon" (plain Muon on them) or "adamw" (AdamW on all)."""
    lr: float = 0.02
    """Learning rate of the Muon/Muon² part, before the shape scale of ``adjust_lr``."""
    adamw_lr: float = 3e-3
    """Learning rate of the AdamW part (embeddings, head, norms, biases)."""
    momentum: float = 0.95
    """Muon momentum μ in [0, 1)."""
    nesterov: bool = True
    beta2: float = 0.99
    """Muon² second-moment decay β2 in [0, 1). 0.99 and 0.999 both beat 0.95 by ~0.015 val loss
    on both benchmark seeds; 0.99 for its shorter memory (docs/muon2.md)."""
    eps: float = 1e-8
    """Muon² preconditioner epsilon (added to √V, or inside the root with ``eps_mode="inside"``)."""
    eps_mode: str = "outside"
    """"outside": U / (√V + ε) (Adam's form); "inside": U / √(V + ε)."""
    bias_correction: bool = False
    """Divide V by (1 − β2^t) in Muon². NS normalizes away a global scale, so this only moves ε."""
    ns_steps: int = 3
    """Newton-Schulz iterations K (the start value when ``adaptive_ns`` is set)."""
    ns_schedule: str | None = None
    """Newton-Schulz coefficients, a name in ``memtune.optim.newton_schulz.NS_SCHEDULES``:
    "keller" (Keller Jordan's fixed quintic) or "minimax_gram" / "minimax_frobenius"
    (per-iteration coefficients fitted to the spectra Muon² sees, one schedule per K; they
    orthogonalize better but trained worse, docs/muon2.md). ``None``: "keller" for both
    optimizers."""
    ns_normalize: str | None = None
    """How NS scales its input: "frobenius" (Muon's ‖G‖_F) or "gram" (the tighter ‖A²‖_F^{1/4}
    bound, free from the first iteration's A·A). ``None``: "gram" for "muon2" (it won the
    tuning stage of benchmarks/muon2.py), "frobenius" for "muon" (torch.optim.Muon's)."""
    ns_dtype: str = "bf16"
    """Newton-Schulz compute dtype, "bf16" (Muon's choice; fast on GPUs) or "fp32" (use on CPUs
    without bf16 matmul units: measured 20-30x faster than bf16 on the CI CPU)."""
    adjust_lr: str = "original"
    """"original": scale √max(1, rows/cols) (Keller Jordan); "match_rms_adamw": 0.2·√max(rows, cols) (Moonlight)."""
    weight_decay: float = 0.0
    """Decoupled weight decay of the Muon part (multiplied by the unscaled lr, as torch.optim.Muon)."""
    adamw_weight_decay: float | None = None
    """Weight decay of the AdamW part; ``None`` means the same as ``weight_decay``."""
    betas: tuple[float, float] = (0.9, 0.95)
    """AdamW (β1, β2)."""
    adamw_eps: float = 1e-8
    state_dtype: str = "fp32"
    """Optimizer-state precision of both parts: "fp32", "bf16" or "int8" (blockwise absmax)."""
    int8_domain: str = "sqrt"
    """What int8 state quantizes: "linear" (the value) or "sqrt" (sign·√|value|, finer near 0)."""
    factorized: bool = False
    """Muon²-F: Adafactor-style row/column second moment, O(rows + cols) instead of O(rows·cols)."""
    adaptive_ns: AdaptiveNS | None = None
    """Per-matrix adaptive K; ``None`` keeps ``ns_steps`` fixed."""
    overrides: Mapping[str, str] = field(default_factory=dict)
    """Parameter FQN → "muon2" | "muon" | "adamw", applied after the automatic split."""

    def __post_init__(self) -> None:
        def check(ok: bool, msg: str) -> None:
            if not ok:
                raise OptimizerConfigError(msg)

        check(self.name in OPTIMIZER_NAMES, f"name={self.name!r}: use one of {OPTIMIZER_NAMES}")
        check(self.state_dtype in STATE_DTYPES, f"state_dtype={self.state_dtype!r}: use one of {STATE_DTYPES}")
        check(self.adjust_lr in ADJUST_LR, f"adjust_lr={self.adjust_lr!r}: use one of {ADJUST_LR}")
        check(self.eps_mode in EPS_MODES, f"eps_mode={self.eps_mode!r}: use one of {EPS_MODES}")
        check(self.int8_domain in INT8_DOMAINS, f"int8_domain={self.int8_domain!r}: use one of {INT8_DOMAINS}")
        check(self.ns_dtype in NS_DTYPES, f"ns_dtype={self.ns_dtype!r}: use one of {tuple(NS_DTYPES)}")
        from memtune.optim.newton_schulz import NS_NORMALIZATIONS, NS_SCHEDULES

        check(self.ns_schedule is None or self.ns_schedule in NS_SCHEDULES,
              f"ns_schedule={self.ns_schedule!r}: use one of {sorted(NS_SCHEDULES)} or None")
        check(self.ns_normalize is None or self.ns_normalize in NS_NORMALIZATIONS,
              f"ns_normalize={self.ns_normalize!r}: use one of {NS_NORMALIZATIONS} or None")
        check(self.ns_steps >= 1, f"ns_steps={self.ns_steps}: need at least 1 Newton-Schulz iteration")
        check_hyperparameters("", **{name: getattr(self, name) for name in (
            "momentum", "beta2", "betas", "lr", "adamw_lr", "eps", "adamw_eps", "weight_decay")})
        check(self.adamw_weight_decay is None or (math.isfinite(self.adamw_weight_decay) and self.adamw_weight_decay >= 0),
              f"adamw_weight_decay={self.adamw_weight_decay!r}: give a finite number >= 0, or None")
        for fqn, choice in self.overrides.items():
            check(choice in OPTIMIZER_NAMES, f"override {fqn!r} → {choice!r}: use one of {OPTIMIZER_NAMES}")
        if self.adaptive_ns is not None:
            a = self.adaptive_ns
            check(1 <= a.k_min <= a.k_max, f"adaptive_ns needs 1 <= k_min <= k_max, got {a.k_min}, {a.k_max}")
        # A read-only copy, so a frozen settings object really is frozen.
        object.__setattr__(self, "overrides", MappingProxyType(dict(self.overrides)))

    def to_dict(self) -> dict:
        """Plain JSON-able data (what profiles and plans store); :meth:`from_dict` inverts it."""
        out = {}
        for name in self.__slots__:
            value = getattr(self, name)
            if isinstance(value, AdaptiveNS):
                value = value.as_dict()
            elif isinstance(value, Mapping):
                value = dict(value)
            elif isinstance(value, tuple):
                value = list(value)
            out[name] = value
        return out

    @classmethod
    def from_dict(cls, d: Mapping) -> "OptimizerSettings":
        known = set(cls.__slots__)
        unknown = sorted(set(d) - known)
        if unknown:
            raise OptimizerConfigError(f"unknown optimizer setting(s) {unknown}; known: {sorted(known)}")
        kw = dict(d)
        if kw.get("adaptive_ns") is not None and not isinstance(kw["adaptive_ns"], AdaptiveNS):
            kw["adaptive_ns"] = AdaptiveNS(**kw["adaptive_ns"])
        if "betas" in kw:
            kw["betas"] = tuple(kw["betas"])
        return cls(**kw)
