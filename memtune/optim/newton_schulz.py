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
from torch._subclasses.fake_tensor import is_fake

DEFAULT_COEFFS = (3.4445, -4.7750, 2.0315)
Coeffs = tuple[float, float, float]

# Per-iteration coefficient schedules, by name: for each K, the K triples to use (a K not listed
# takes the longest listed schedule below it, or the shortest, and repeats its last triple). New
# schedules need a test against the SVD polar factor (tests/optim/test_newton_schulz.py).
NS_SCHEDULES: dict[str, dict[int, tuple[Coeffs, ...]]] = {
    "keller": {1: (DEFAULT_COEFFS,)},
    # Greedy minimax schedules (the construction of Amsel, Persson, Musco & Gower 2025, "The Polar
    # Express"): each iteration is the odd quintic closest to 1 in max-norm on the interval the
    # previous one left, starting from [ℓ, 1]. One schedule per K, with ℓ chosen so that K
    # iterations best fit (distance to UVᵀ) the spectra of Muon²'s NS inputs recorded on the tuning
    # text, under that input normalization (benchmarks/muon2_ns.py; results/muon2_schedules.json).
    # Each polynomial is fitted up to 2% above its interval's top, so bf16 rounding cannot make σ
    # escape the interval: these quintics are steep at 1 and amplify any excess ~25x per iteration.
    "minimax_gram": {
        1: ((8.1403, -23.0352, 16.3937),),
        2: ((7.13, -19.2122, 13.4746), (2.8211, -2.0373, 0.4326)),
        3: ((7.6175, -21.0546, 14.8806), (3.2332, -2.339, 0.4641), (2.2568, -1.5864, 0.3873)),
        4: ((7.9198, -22.1992, 15.7548), (3.5686, -2.574, 0.489), (2.6323, -1.8926, 0.4177),
            (1.9417, -1.298, 0.3613)),
        5: ((8.2029, -23.2727, 16.5752), (3.9564, -2.8373, 0.5171), (3.4282, -2.4765, 0.4787),
            (2.4498, -1.7475, 0.4031), (1.8992, -1.2556, 0.3582)),
        6: ((8.2954, -23.6238, 16.8436), (4.1019, -2.9341, 0.5275), (3.8959, -2.7967, 0.5128),
            (3.2667, -2.3628, 0.4666), (2.2857, -1.6111, 0.3897), (1.8751, -1.2312, 0.3567)),
    },
    "minimax_frobenius": {
        1: ((8.334, -23.7701, 16.9554),),
        2: ((7.7356, -21.5014, 15.2218), (3.3557, -2.4257, 0.4733)),
        3: ((7.8355, -21.88, 15.5109), (3.4677, -2.5041, 0.4816), (2.497, -1.7856, 0.4069)),
        4: ((8.0497, -22.6918, 16.1312), (3.7366, -2.6891, 0.5013), (2.9144, -2.1071, 0.4398),
            (2.0491, -1.401, 0.37)),
        5: ((8.2029, -23.2727, 16.5752), (3.9564, -2.8373, 0.5171), (3.4282, -2.4765, 0.4787),
            (2.4498, -1.7475, 0.4031), (1.8992, -1.2556, 0.3582)),
        6: ((8.3029, -23.6523, 16.8654), (4.1141, -2.9422, 0.5284), (3.9412, -2.8271, 0.516),
            (3.386, -2.447, 0.4755), (2.4026, -1.7089, 0.3992), (1.8911, -1.2474, 0.3576)),
    },
}
NS_NORMALIZATIONS = ("frobenius", "gram")


def ns_schedule(coeffs: Coeffs | Sequence[Coeffs] | str, steps: int) -> list[Coeffs]:
    """The ``steps`` coefficient triples an NS call uses. ``coeffs`` is one triple (used every
    iteration), a sequence of triples (iteration t uses ``coeffs[min(t, len - 1)]``), or a name
    in :data:`NS_SCHEDULES` (its schedule for ``steps``)."""
    if isinstance(coeffs, str):
        if coeffs not in NS_SCHEDULES:
            raise ValueError(f"unknown NS schedule {coeffs!r}: use one of {sorted(NS_SCHEDULES)}")
        per_k = NS_SCHEDULES[coeffs]
        listed = [k for k in per_k if k <= steps]
        coeffs = per_k[max(listed) if listed else min(per_k)]
    seq = list(coeffs)
    if seq and not isinstance(seq[0], (tuple, list)):
        seq = [tuple(seq)]
    if not seq or any(len(c) != 3 for c in seq):
        raise ValueError(f"NS coefficients must be (a, b, c) or a sequence of (a, b, c); got {coeffs!r}")
    return [tuple(float(x) for x in seq[min(t, len(seq) - 1)]) for t in range(steps)]


def newton_schulz(
    G: torch.Tensor,
    steps: int,
    coeffs: Coeffs | Sequence[Coeffs] | str = DEFAULT_COEFFS,
    eps: float = 1e-7,
    dtype: torch.dtype = torch.bfloat16,
    *,
    normalize: str = "frobenius",
) -> torch.Tensor:
    """``steps`` quintic Newton-Schulz iterations on ``G`` of shape ``(..., m, n)``.

    Each iteration is ``X ← a·X + (b·A + c·A²)·X`` with ``A = X Xᵀ``, computed in ``dtype``
    (bf16 by default, as in Muon); ``coeffs`` may give each iteration its own (a, b, c)
    (:func:`ns_schedule`). Tall matrices are transposed so that the Gram matrix ``A`` is the
    small ``min(m, n)`` square. Returns a tensor of ``dtype`` and of ``G``'s shape.

    ``normalize`` says how the input is scaled so that its spectral norm is at most 1:

    * ``"frobenius"`` (Muon's): divide by ‖G‖_F. A matrix with k comparable singular values
      then starts with all of them near 1/√k (0.07 for k = 192), far below 1, and the first
      iterations are spent only growing them.
    * ``"gram"``: after the Frobenius step, divide once more by ``‖A²‖_F^{1/4}``
      (= (Σσ⁸)^{1/8} ≥ σ_max), from the ``A·A`` product that the first iteration computes
      anyway: no extra matmul. The same flat spectrum then starts at k^{-1/8} (0.52 for
      k = 192), while σ_max ≤ 1 still holds.

    With the default coefficients the iteration does not converge to 1: singular values of
    the output settle in a band of about [0.68, 1.12] (see tests/optim/test_newton_schulz.py),
    which Muon's authors found does not hurt training.
    """
    if G.ndim < 2:
        raise ValueError(f"newton_schulz needs a matrix or a batch of matrices (..., m, n); got shape {tuple(G.shape)}")
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    if normalize not in NS_NORMALIZATIONS:
        raise ValueError(f"normalize={normalize!r}: use one of {NS_NORMALIZATIONS}")
    schedule = ns_schedule(coeffs, steps)
    X = G.to(dtype)
    tall = G.size(-2) > G.size(-1)
    if tall:
        X = X.mT
    if X.ndim == 2:
        # One matrix: mm/addmm, not the batched path (on a CPU, bmm of a batch of one measured
        # 1.8x slower than mm in bf16). With "frobenius", the same ops in the same order as
        # torch.optim.Muon's _zeropower_via_newtonschulz, so that Muon² with precondition=False
        # reproduces torch.optim.Muon bit for bit.
        start = 0
        if normalize == "gram" and schedule:
            folded = _gram_first_step_folded(X, schedule[0])
            if folded is not None:
                X, start = folded, 1
        if start == 0:
            X = X / X.norm().clamp(min=eps)
        for t, (a, b, c) in enumerate(schedule[start:], start=start):
            A = X @ X.T
            if t == 0 and normalize == "gram":
                X, B = _gram_rescaled_first_step(X, A, b, c, eps)
            else:
                B = torch.addmm(A, A, A, beta=b, alpha=c)
            X = torch.addmm(X, B, X, beta=a)
        return X.T if tall else X
    batch_shape = X.shape[:-2]
    X = X.reshape(-1, X.size(-2), X.size(-1))
    X = X / torch.linalg.vector_norm(X, dim=(-2, -1), keepdim=True).clamp(min=eps)
    for t, (a, b, c) in enumerate(schedule):
        A = X @ X.mT
        if t == 0 and normalize == "gram":
            X, B = _gram_rescaled_first_step(X, A, b, c, eps)
        else:
            B = torch.baddbmm(A, A, A, beta=b, alpha=c)
        X = torch.baddbmm(X, B, X, beta=a)
    X = X.reshape(*batch_shape, X.size(-2), X.size(-1))
    return X.mT if tall else X


def _gram_first_step_folded(X0: torch.Tensor, coeffs: Coeffs) -> torch.Tensor | None:
    """The first Gram-scaled iteration on one un-normalized matrix ``X0`` (k × n, k ≤ n), with
    both input scalings folded into its scalars, so that no pass over ``X0`` rescales it.

    Gram scaling divides the Frobenius-normalized input by ``‖A²‖_F^{1/4}``; the two together
    are ``X = s·X0`` with ``s = ‖A0²‖_F^{-1/4}``, ``A0 = X0 X0ᵀ``. Then ``A = s²A0`` and the first
    iteration ``aX + (bA + cA²)X`` is ``(a s)·X0 + (b s³·A0 + c s⁵·A0²)·X0``: the same three
    matrix products, one ``addmm``. Returns ``None`` when ``s⁵`` would leave fp32's range (the
    scalars reach the kernel as fp32), e.g. for a zero or a huge input; the caller then
    normalizes first."""
    a, b, c = coeffs
    A0 = X0 @ X0.T
    AA = A0 @ A0
    if is_fake(AA) or AA.device.type == "meta":
        r2 = 1.0   # no values to read: same ops, same allocations, for the memory recorders
    else:
        r2 = torch.linalg.matrix_norm(AA.float()).sqrt().item()   # ‖A0²‖^{1/2} = 1/s²
    if not (math.isfinite(r2) and 1e-12 < r2 < 1e12):
        return None
    s = r2 ** -0.5
    B = AA.mul_(c * s**5).add_(A0, alpha=b * s**3)
    return torch.addmm(X0, B, X0, beta=a * s)


def _gram_rescaled_first_step(X: torch.Tensor, A: torch.Tensor, b: float, c: float,
                              eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Rescale ``X`` ((batch,) k, n) by r = ‖A²‖_F^{1/4} ≥ σ_max(X) and return (X/r, b·A/r² + c·A²/r⁴),
    the first iteration's ``B`` for the rescaled X, reusing the A·A product it needs anyway."""
    AA = A @ A
    r2 = torch.linalg.matrix_norm(AA.float(), keepdim=True).sqrt().clamp(min=eps)   # r², (batch, 1, 1)
    B = AA.mul_((c / (r2 * r2)).to(A.dtype)).add_(A * (b / r2).to(A.dtype))
    return X * r2.rsqrt().to(X.dtype), B


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
    coeffs: Coeffs | Sequence[Coeffs] | str = DEFAULT_COEFFS,
    eps: float = 1e-7,
    dtype: torch.dtype = torch.bfloat16,
    *,
    normalize: str = "frobenius",
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`newton_schulz` that also returns the orthogonality error of every iterate.

    Returns ``(X_K, errors)`` with ``errors`` of shape ``(steps + 1, *G.shape[:-2])``:
    ``errors[k]`` is :func:`orthogonality_error` of ``X_k`` (``errors[0]`` is the normalized
    input). The Gram matrix ``A = X_k X_kᵀ`` each iteration computes anyway gives ``errors[k]``
    for ``k < steps`` almost for free; only ``errors[steps]`` costs one more Gram product
    (``2m²n`` flops, about 1/(2·steps) of the iteration). Adaptive NS in :mod:`muon2` uses it.
    """
    if normalize not in NS_NORMALIZATIONS:
        raise ValueError(f"normalize={normalize!r}: use one of {NS_NORMALIZATIONS}")
    schedule = ns_schedule(coeffs, steps)
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
    for t, (a, b, c) in enumerate(schedule):
        A = X @ X.mT
        if t == 0 and normalize == "gram":
            X, B = _gram_rescaled_first_step(X, A, b, c, eps)
            errors.append(err(X @ X.mT))
        else:
            errors.append(err(A))
            B = torch.baddbmm(A, A, A, beta=b, alpha=c)
        X = torch.baddbmm(X, B, X, beta=a)
    if steps == 0 and normalize == "gram":
        A = X @ X.mT
        X, _ = _gram_rescaled_first_step(X, A, 0.0, 0.0, eps)
    errors.append(err(X @ X.mT))
    X = X.reshape(*batch_shape, X.size(-2), X.size(-1))
    if G.size(-2) > G.size(-1):
        X = X.mT
    return X, torch.stack(errors).reshape(steps + 1, *batch_shape)
