"""Newton-Schulz against the SVD polar factor U Vᵀ, FlopCounterMode and the CUDA allocator."""


import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from memtune.optim.newton_schulz import (DEFAULT_COEFFS, newton_schulz, newton_schulz_traced, ns_flops,
                                         ns_workspace_bytes, orthogonality_error)


def matrix_with_spectrum(m, n, s, seed=0):
    g = torch.Generator().manual_seed(seed)
    U, _ = torch.linalg.qr(torch.randn(m, len(s), generator=g))
    V, _ = torch.linalg.qr(torch.randn(n, len(s), generator=g))
    return U @ torch.diag(s) @ V.T


def polar(G):
    U, _, Vh = torch.linalg.svd(G.double(), full_matrices=False)
    return (U @ Vh).float()


def test_error_to_polar_factor_falls_with_k():
    # Singular values spread over 3 decades: each iteration lifts the small ones further.
    G = matrix_with_spectrum(96, 160, torch.logspace(0, -3, 96))
    P = polar(G)
    errs = [((newton_schulz(G, k).float() - P).norm() / P.norm()).item() for k in range(10)]
    # Measured: 0.95 0.87 0.76 0.64 0.50 0.34 0.24, then a plateau of ~0.24 set by the quintic's
    # band [0.68, 1.14] (it does not converge to U Vᵀ exactly).
    assert all(a > b for a, b in zip(errs[:7], errs[1:7])), errs
    assert errs[0] > 0.9 and max(errs[6:]) < 0.3, errs


def test_singular_values_land_in_the_quintic_band():
    # The scalar map p(x) = a x + b x³ + c x⁵ iterated from (0, 1] settles in [0.68, 1.14]
    # (fp64); its first overshoot reaches 1.20. The bf16 matrix iteration stays inside [0.6, 1.25].
    a, b, c = DEFAULT_COEFFS
    x = torch.linspace(1e-3, 1, 10_000, dtype=torch.float64)
    for _ in range(30):
        x = a * x + b * x**3 + c * x**5
    assert 0.67 < x.min() < 0.69 and 1.13 < x.max() < 1.14
    G = torch.randn(128, 256, generator=torch.Generator().manual_seed(1))
    for k in (5, 8):
        sv = torch.linalg.svdvals(newton_schulz(G, k).float())
        assert sv.min() > 0.6 and sv.max() < 1.25, (k, sv.min(), sv.max())


def test_batched_matches_per_matrix_and_tall_is_transposed():
    g = torch.Generator().manual_seed(2)
    Gs = torch.randn(3, 2, 48, 80, generator=g)
    out = newton_schulz(Gs, 5, dtype=torch.float32)
    for i in range(3):
        for j in range(2):
            torch.testing.assert_close(out[i, j], newton_schulz(Gs[i, j], 5, dtype=torch.float32), atol=2e-5, rtol=1e-4)
    out_bf16 = newton_schulz(Gs, 5)
    assert out_bf16.dtype == torch.bfloat16
    torch.testing.assert_close(out_bf16[1, 0].float(), newton_schulz(Gs[1, 0], 5).float(), atol=2e-2, rtol=0)
    tall = torch.randn(200, 64, generator=g)
    assert torch.equal(newton_schulz(tall, 3), newton_schulz(tall.T, 3).T)
    P = polar(tall)
    assert ((newton_schulz(tall, 5).float() - P).norm() / P.norm()) < 0.25


def test_orthogonality_error_is_rms_of_squared_singular_value_deviation():
    Q, _ = torch.linalg.qr(torch.randn(64, 32))
    assert orthogonality_error(Q) < 1e-5
    assert orthogonality_error(torch.zeros(8, 16)) == pytest.approx(1.0)
    G = torch.randn(40, 24)
    sv = torch.linalg.svdvals(G)
    assert orthogonality_error(G) == pytest.approx(((sv**2 - 1) ** 2).mean().sqrt().item(), rel=1e-4)
    # traced errors are those of each iterate
    X, errs = newton_schulz_traced(G, 4, dtype=torch.float32)
    assert errs.shape == (5,)
    assert errs[-1] == pytest.approx(orthogonality_error(X).item(), abs=1e-4)
    assert errs[3] == pytest.approx(orthogonality_error(newton_schulz(G, 3, dtype=torch.float32)).item(), abs=1e-4)
    torch.testing.assert_close(X, newton_schulz(G, 4, dtype=torch.float32), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("shape", [(64, 160), (160, 64), (96, 96)])
def test_ns_flops_matches_flop_counter(shape):
    G = torch.randn(shape)
    with FlopCounterMode(display=False) as fc:
        newton_schulz(G, 3, dtype=torch.float32)
    assert fc.get_total_flops() == ns_flops(*shape, 3)


def test_ns_workspace_formula():
    assert ns_workspace_bytes((2048, 2048)) == 32 * 2**20  # measured on an H100: 32.0 MiB peak
    assert ns_workspace_bytes((5632, 2048)) == 60 * 2**20  # measured: 60.0 MiB
    assert ns_workspace_bytes((4, 64, 32), torch.float32) == 4 * (2 * 64 * 32 + 2 * 32 * 32) * 4


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_ns_workspace_matches_cuda_peak():
    for shape in [(1024, 1024), (3072, 1024), (2, 512, 768)]:
        G = torch.randn(shape, device="cuda")
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        out = newton_schulz(G, 3)
        peak = torch.cuda.max_memory_allocated() - base
        del out
        assert abs(peak - ns_workspace_bytes(shape)) <= 0.02 * ns_workspace_bytes(shape) + 2**20
