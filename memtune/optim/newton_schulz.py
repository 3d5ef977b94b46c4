"""Newton-Schulz orthogonalization, the pure maths under Muon and Muon².

``newton_schulz(G, K)`` maps a matrix ``G = U S Vᵀ`` to roughly ``U S' Vᵀ`` with every
singular value pushed into a band around 1. It is the quintic iteration of Keller Jordan's
Muon (https://kellerjordan.github.io/posts/muon/; coefficients (3.4445, -4.7750, 2.0315)
tuned by Keller Jordan with suggestions from @jxbz, @leloykun and @YouJiacheng), written
so that it accepts a batch ``(..., m, n)`` of same-shape matrices and so that, on a single
2-D matrix, it performs the same bf16 operations in the same order as ``torch.optim.Muon``.

The planner costs an NS call with :func:`ns_flops` and :func:`ns_workspace_bytes`; both are
pure functions of shape, so they work for meta tensors.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

DEFAULT_COEFFS = (3.4445, -4.7750, 2.0315)


def newton_schulz(
    G: torch.Tensor,
    steps: int,
    coeffs: tuple[float, float, float] = DEFAULT_COEFFS,
    eps: float = 1e-7,
    dtype: torch.dtype = torch.bfloat16,
) -> torch.Tensor:
    """``steps`` quintic Newton-Schulz iterations on ``G`` of shape ``(..., m, n)``.

    Each iteration is ``X ← a·X + (b·A + c·A²)·X`` with ``A = X Xᵀ``, computed in ``dtype``
    (bf16 by default, as in Muon). ``G`` is first divided by its Frobenius norm (per matrix),
    which bounds the spectral norm by 1. Tall matrices are transposed so that the Gram
    matrix ``A`` is the small ``min(m, n)`` square. Returns a tensor of ``dtype`` and of
    ``G``'s shape.

    With the default coefficients the iteration does not converge to 1: singular values of
    the output settle in a band of about [0.68, 1.12] (see tests/optim/test_newton_schulz.py),
    which Muon's authors found does not hurt training.
    """
    if G.ndim < 2:
        raise ValueError(f"newton_schulz needs a matrix or a batch of matrices (..., m, n); got shape {tuple(G.shape)}")
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    a, b, c = coeffs
    X = G.to(dtype)
    tall = G.size(-2) > G.size(-1)
    if tall:
        X = X.mT
    if X.ndim == 2:
        # Same ops, in the same order, as torch.optim.Muon's _zeropower_via_newtonschulz, so that
        # Muon² with precondition=False reproduces torch.optim.Muon bit for bit.
        X = X / X.norm().clamp(min=eps)
        for _ in range(steps):
            A = X @ X.T
            B = torch.addmm(A, A, A, beta=b, alpha=c)
            X = torch.addmm(X, B, X, beta=a)
    else:
        batch_shape = X.shape[:-2]
        X = X.reshape(-1, X.size(-2), X.size(-1))
        X = X / torch.linalg.vector_norm(X, dim=(-2, -1), keepdim=True).clamp(min=eps)
        for _ in range(steps):
            A = X @ X.mT
            B = torch.baddbmm(A, A, A, beta=b, alpha=c)
            X = torch.baddbmm(X, B, X, beta=a)
        X = X.reshape(*batch_shape, X.size(-2), X.size(-1))
    return X.mT if tall else X


def orthogonality_error(O: torch.Tensor) -> torch.Tensor:
    """How far ``O`` (``(..., m, n)``) is from having orthonormal rows (or columns, if tall).

    With ``k = min(m, n)`` and ``Ô`` the short-fat orientation of ``O``, the metric is
    ``‖Ô Ôᵀ − I_k‖_F / √k`` computed in fp32, which equals ``sqrt(mean_i (σ_i² − 1)²)`` over
    the singular values σ of ``O``: 0 for an exact polar factor, 1 for the zero matrix. It is
    per matrix: the result has shape ``O.shape[:-2]``.

    The default quintic's fixed band [0.68, 1.12] alone gives an error of roughly 0.2-0.35,
    so compare values against that floor, not against 0.
    """
    X = O.float()
    if X.size(-2) > X.size(-1):
        X = X.mT
    k = X.size(-2)
    gram = X @ X.mT
    eye = torch.eye(k, dtype=gram.dtype, device=gram.device)
    return torch.linalg.matrix_norm(gram - eye) / math.sqrt(k)


def ns_flops(m: int, n: int, steps: int) -> int:
    """Floating-point operations of one NS call on an ``m × n`` matrix (multiply-add = 2).

    Per iteration, with ``m ≤ n`` after transposition: ``X Xᵀ`` (2m²n), ``A·A`` (2m³) and
    ``B·X`` (2m²n), i.e. ``4m²n + 2m³``. Normalization and the axpy terms are O(mn) and left
    out.
    """
    m, n = min(m, n), max(m, n)
    return steps * (4 * m * m * n + 2 * m**3)


def ns_workspace_bytes(shape: Sequence[int], dtype: torch.dtype = torch.bfloat16) -> int:
    """Peak bytes of temporaries that one :func:`newton_schulz` call on ``shape`` allocates.

    Inside an iteration the live tensors are the current ``X`` (m·n), ``A`` and ``B``
    (m² each) and the new ``X`` (m·n), so the peak is ``batch·(2mn + 2m²)`` elements of
    ``dtype``, ``m = min`` of the last two dims. The cast copy of the input and the normalized
    copy (2mn) fit inside that peak. The returned tensor is one of the two ``X`` buffers.
    """
    if len(shape) < 2:
        raise ValueError(f"ns_workspace_bytes needs a matrix shape, got {tuple(shape)}")
    m, n = min(shape[-2], shape[-1]), max(shape[-2], shape[-1])
    batch = math.prod(shape[:-2])
    itemsize = torch.empty((), dtype=dtype).element_size()
    return batch * (2 * m * n + 2 * m * m) * itemsize


def newton_schulz_traced(
    G: torch.Tensor,
    steps: int,
    coeffs: tuple[float, float, float] = DEFAULT_COEFFS,
    eps: float = 1e-7,
    dtype: torch.dtype = torch.bfloat16,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`newton_schulz` that also returns the orthogonality error of every iterate.

    Returns ``(X_K, errors)`` with ``errors`` of shape ``(steps + 1, *G.shape[:-2])``:
    ``errors[k]`` is :func:`orthogonality_error` of ``X_k`` (``errors[0]`` is the normalized
    input). The Gram matrix ``A = X_k X_kᵀ`` each iteration computes anyway gives ``errors[k]``
    for ``k < steps`` almost for free; only ``errors[steps]`` costs one more Gram product
    (``2m²n`` flops, about 1/(2·steps) of the iteration). Adaptive NS in :mod:`muon2` uses it.
    """
    a, b, c = coeffs
    X = G.to(dtype)
    if G.size(-2) > G.size(-1):
        X = X.mT
    batch_shape = X.shape[:-2]
    X = X.reshape(-1, X.size(-2), X.size(-1))
    X = X / torch.linalg.vector_norm(X, dim=(-2, -1), keepdim=True).clamp(min=eps)
    k = X.size(-2)
    eye = torch.eye(k, dtype=torch.float32, device=X.device)

    def err(A: torch.Tensor) -> torch.Tensor:
        return torch.linalg.matrix_norm(A.float() - eye) / math.sqrt(k)

    errors = []
    for _ in range(steps):
        A = X @ X.mT
        errors.append(err(A))
        B = torch.baddbmm(A, A, A, beta=b, alpha=c)
        X = torch.baddbmm(X, B, X, beta=a)
    errors.append(err(X @ X.mT))
    X = X.reshape(*batch_shape, X.size(-2), X.size(-1))
    if G.size(-2) > G.size(-1):
        X = X.mT
    return X, torch.stack(errors).reshape(steps + 1, *batch_shape)
