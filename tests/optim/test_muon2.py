"""Muon² against torch.optim.Muon (precondition=False) and against the update rule written
out step by step; low-precision state against fp32; state_dict resume; in-place re-tuning."""

import io
import os

import pytest
import torch

from memtune.optim import AdaptiveNS, Muon2, OptimizerConfigError, newton_schulz
from memtune.optim.muon2 import MUON2_NS, factored_second_moment, next_ns_steps, shape_scale

SHAPES = [(64, 32), (32, 64), (64, 32), (48, 48)]


def make_params(seed=0, shapes=SHAPES):
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=g) * 0.1) for s in shapes]


def run(opt_factory, steps=5, seed=0, shapes=SHAPES):
    params = make_params(seed, shapes)
    opt = opt_factory(params)
    g = torch.Generator().manual_seed(seed + 100)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=g)
        opt.step()
    return params, opt


@pytest.mark.parametrize("nesterov", [True, False])
@pytest.mark.parametrize("adjust_lr", ["original", "match_rms_adamw"])
@pytest.mark.parametrize("batch_ns", [True, False])
def test_without_preconditioning_matches_torch_muon(nesterov, adjust_lr, batch_ns):
    # Both sides run NS in bf16; fp32 params after 6 steps agree to 1e-6 (measured: bit-exact).
    kw = dict(lr=0.02, weight_decay=0.1, momentum=0.9, nesterov=nesterov)
    ref, _ = run(lambda ps: torch.optim.Muon(ps, ns_steps=5, adjust_lr_fn=adjust_lr, **kw), steps=6)
    mine, _ = run(lambda ps: Muon2(ps, ns_steps=5, adjust_lr=adjust_lr, precondition=False, batch_ns=batch_ns, **kw),
                  steps=6)
    for a, b in zip(ref, mine):
        torch.testing.assert_close(b, a, atol=1e-6, rtol=0)


def reference_muon2(params, grads_per_step, *, lr, mu, beta2, eps, k, wd, bias_correction, eps_mode):
    """The update rule of docs/muon2.md, one matrix at a time, no batching, no state codecs."""
    params = [p.detach().clone() for p in params]
    M = [torch.zeros_like(p) for p in params]
    V = [torch.zeros_like(p) for p in params]
    for t, grads in enumerate(grads_per_step, start=1):
        for i, (p, g) in enumerate(zip(params, grads)):
            M[i] = mu * M[i] + (1 - mu) * g
            V[i] = beta2 * V[i] + (1 - beta2) * g * g
            U = (1 - mu) * g + mu * M[i]
            v = V[i] / (1 - beta2**t) if bias_correction else V[i]
            P = U / (v.sqrt() + eps) if eps_mode == "outside" else U / (v + eps).sqrt()
            O = newton_schulz(P, k, MUON2_NS["schedule"], dtype=torch.float32, normalize=MUON2_NS["normalize"])
            scale = max(1.0, p.shape[0] / p.shape[1]) ** 0.5
            params[i] = p * (1 - lr * wd) - lr * scale * O
    return params


@pytest.mark.parametrize("bias_correction,eps_mode", [(False, "outside"), (True, "outside"), (False, "inside")])
def test_matches_update_rule_reference(bias_correction, eps_mode):
    g = torch.Generator().manual_seed(7)
    grads = [[torch.randn(s, generator=g) * 1e-2 for s in SHAPES] for _ in range(4)]
    kw = dict(lr=0.03, mu=0.95, beta2=0.9, eps=1e-6, k=3, wd=0.05, bias_correction=bias_correction, eps_mode=eps_mode)
    ref = reference_muon2(make_params(), grads, **kw)
    params = make_params()
    opt = Muon2(params, lr=0.03, momentum=0.95, beta2=0.9, eps=1e-6, ns_steps=3, weight_decay=0.05,
                bias_correction=bias_correction, eps_mode=eps_mode, ns_dtype=torch.float32)
    for step_grads in grads:
        for p, gr in zip(params, step_grads):
            p.grad = gr
        opt.step()
    for a, b in zip(ref, params):
        torch.testing.assert_close(b.detach(), a, atol=1e-5, rtol=1e-5)


def test_factored_second_moment_is_exact_for_rank_one_g2():
    r, c = torch.rand(12) + 0.1, torch.rand(20) + 0.1
    V = torch.outer(r, c)
    torch.testing.assert_close(factored_second_moment(V.mean(-1), V.mean(-2)), V)


def test_refuses_vectors_and_flattens_conv_weights():
    with pytest.raises(OptimizerConfigError, match="AdamW"):
        Muon2([torch.nn.Parameter(torch.zeros(8))])
    conv = torch.nn.Parameter(torch.randn(16, 4, 3, 3))
    flat = torch.nn.Parameter(conv.detach().reshape(16, 36).clone())
    o1, o2 = Muon2([conv], ns_dtype=torch.float32), Muon2([flat], ns_dtype=torch.float32)
    g = torch.randn(16, 4, 3, 3)
    for _ in range(3):
        conv.grad, flat.grad = g.clone(), g.reshape(16, 36).clone()
        o1.step(), o2.step()
    torch.testing.assert_close(conv.detach().reshape(16, 36), flat.detach())


def test_shape_scale():
    assert shape_scale(1024, 256, "original") == 2.0 and shape_scale(256, 1024, "original") == 1.0
    assert shape_scale(256, 1024, "match_rms_adamw") == pytest.approx(0.2 * 32)


@pytest.mark.parametrize("kw", [dict(), dict(state_dtype="bf16"), dict(state_dtype="int8"), dict(factorized=True),
                                dict(state_dtype="int8", adaptive_ns=AdaptiveNS(k_min=2, k_max=4))])
def test_state_dict_resume_gives_identical_trajectory(kw):
    params, opt = run(lambda ps: Muon2(ps, **kw), steps=3)
    buf = io.BytesIO()
    torch.save({"params": [p.detach() for p in params], "opt": opt.state_dict()}, buf)

    def continue_from(ps, o, steps=3):
        g = torch.Generator().manual_seed(999)
        for _ in range(steps):
            for p in ps:
                p.grad = torch.randn(p.shape, generator=g)
            o.step()
        return [p.detach().clone() for p in ps]

    expected = continue_from(params, opt)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    params2 = [torch.nn.Parameter(t.clone()) for t in saved["params"]]
    opt2 = Muon2(params2, **kw)
    opt2.load_state_dict(saved["opt"])
    # resumed state has the precision it was saved with
    for p in params2:
        st = opt2.state[p]
        if kw.get("state_dtype") == "bf16":
            assert st["momentum_buffer"].dtype == torch.bfloat16
        if kw.get("state_dtype") == "int8":
            assert st["momentum_buffer_q"].dtype == torch.int8 and st["exp_avg_sq_q"].dtype == torch.uint8
    for a, b in zip(expected, continue_from(params2, opt2)):
        assert torch.equal(a, b)


def test_set_state_dtype_keeps_values_and_set_ns_steps_switches_k():
    params, opt = run(lambda ps: Muon2(ps), steps=3)
    before = {id(p): opt.state[p]["momentum_buffer"].clone() for p in params}
    opt.set_state_dtype("bf16")
    opt.set_state_dtype("fp32")
    for p in params:  # one bf16 rounding
        torch.testing.assert_close(opt.state[p]["momentum_buffer"], before[id(p)], rtol=2**-8, atol=0)
    opt.set_state_dtype("int8")
    opt.set_state_dtype("fp32")
    for p in params:  # blockwise absmax: error below one 8-bit step of the block's max (sqrt domain)
        m, ref = opt.state[p]["momentum_buffer"], before[id(p)]
        assert (m - ref).abs().max() <= 2 * ref.abs().max() / 127
    # ns_steps: switching mid-run equals torch.optim.Muon switched the same way
    ref_params, ref_opt = run(lambda ps: torch.optim.Muon(ps, lr=0.02, weight_decay=0.0, ns_steps=3), steps=2)
    my_params, my_opt = run(lambda ps: Muon2(ps, precondition=False, ns_steps=3), steps=2)
    ref_opt.param_groups[0]["ns_steps"] = 5
    my_opt.set_ns_steps(5)
    g = torch.Generator().manual_seed(5)
    for a, b in zip(ref_params, my_params):
        a.grad = torch.randn(a.shape, generator=g)
        b.grad = a.grad.clone()
    ref_opt.step(), my_opt.step()
    for a, b in zip(ref_params, my_params):
        torch.testing.assert_close(b, a, atol=1e-6, rtol=0)


def test_adaptive_ns_rule_and_telemetry():
    rule = AdaptiveNS(k_min=2, k_max=5, target_error=0.45).as_dict()  # default is 0.55
    assert next_ns_steps(3, [1.0, 0.8, 0.6, 0.5], rule) == 4   # X_3 still off target: more
    assert next_ns_steps(3, [1.0, 0.8, 0.4, 0.3], rule) == 2   # X_2 already on target: fewer
    assert next_ns_steps(3, [1.0, 0.8, 0.5, 0.3], rule) == 3
    assert next_ns_steps(5, [1, 1, 1, 1, 1, 0.9], rule) == 5 and next_ns_steps(2, [1, 0.1, 0.1], rule) == 2
    # Ill-conditioned input climbs to k_max; a well-conditioned one drops to k_min.
    ill = torch.linalg.qr(torch.randn(64, 64))[0] @ torch.diag(torch.logspace(0, -4, 64))
    p = torch.nn.Parameter(torch.zeros(64, 64))
    opt = Muon2([("w", p)], precondition=False, momentum=0.0, adaptive_ns=AdaptiveNS(k_min=2, k_max=5))
    for _ in range(4):
        p.grad = ill.clone()
        opt.step()
    assert opt.ns_telemetry["w"]["ns_steps"] == 5 and opt.ns_telemetry["w"]["orthogonality_error"] > 0.55
    opt.set_ns_steps(4)
    q = torch.linalg.qr(torch.randn(64, 64))[0]
    for _ in range(4):
        p.grad = q.clone()
        opt.step()
    assert opt.ns_telemetry["w"]["ns_steps"] == 2


def test_ns_defaults_per_optimizer_and_errors():
    from memtune.optim import OptimizerSettings, build_optimizer
    from memtune.zoo import GPT, GPTConfig

    model = GPT(GPTConfig(n_layer=1, n_embd=32, n_head=2, block_size=16))
    muon = build_optimizer(model, OptimizerSettings(name="muon")).parts["muon"].param_groups[0]
    assert (muon["ns_coefficients"], muon["ns_normalize"]) == ("keller", "frobenius")   # torch.optim.Muon's
    muon2 = build_optimizer(model, OptimizerSettings()).parts["muon2"].param_groups[0]
    assert (muon2["ns_coefficients"], muon2["ns_normalize"]) == (MUON2_NS["schedule"], MUON2_NS["normalize"])
    chosen = build_optimizer(model, OptimizerSettings(ns_schedule="minimax_gram", ns_normalize="frobenius"))
    assert chosen.parts["muon2"].param_groups[0]["ns_coefficients"] == "minimax_gram"
    with pytest.raises(OptimizerConfigError, match="keller"):
        OptimizerSettings(ns_schedule="polar")
    with pytest.raises(OptimizerConfigError, match="gram"):
        OptimizerSettings(ns_normalize="spectral")
    with pytest.raises(OptimizerConfigError, match="ns_coefficients"):
        Muon2(make_params(), ns_coefficients=(1.0, 2.0))


def test_default_ns_dtype_follows_native_bf16_matmul(monkeypatch):
    """bf16 Newton-Schulz on CUDA and on CPUs whose flags say they multiply bf16 natively; fp32 on
    other CPUs, where PyTorch emulates bf16. memtune.fit's default settings take the same choice."""
    import memtune
    from memtune.optim import settings

    flags = open("/proc/cpuinfo").read() if os.path.exists("/proc/cpuinfo") else ""
    native = any(f in flags.split() for f in ("avx512_bf16", "amx_bf16")) and torch.backends.mkldnn.is_available()
    assert settings.cpu_has_bf16_matmul() == native
    assert settings.default_ns_dtype("cuda") == "bf16" and settings.default_ns_dtype(torch.device("cuda", 1)) == "bf16"
    assert settings.default_ns_dtype("cpu") == ("bf16" if native else "fp32")
    monkeypatch.setattr(settings, "_cpu_bf16", False)
    assert settings.default_ns_dtype("cpu") == "fp32"
    monkeypatch.setattr(settings, "_cpu_bf16", True)
    trainer = memtune.fit(torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 2)), "1GB", device="cpu",
                          progress=False, loss_fn=lambda out: out.square().mean())
    assert trainer.optimizer_settings.ns_dtype == "bf16"
