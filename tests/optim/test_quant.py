"""int8/bf16 state codecs and state_bytes against the bytes the optimizers really hold."""

import pytest
import torch

from memtune.optim import OptimizerSettings, build_optimizer, state_bytes
from memtune.optim.quant import BLOCK_SIZE, buffer_bytes, dequantize_blockwise, quantize_blockwise
from memtune.zoo import GPT, GPTConfig


@pytest.mark.parametrize("domain", ["linear", "sqrt"])
def test_signed_roundtrip_error_is_within_half_a_step(domain):
    x = torch.randn(1000) * torch.logspace(-3, 0, 1000)
    q, absmax = quantize_blockwise(x, signed=True, domain=domain)
    assert q.dtype == torch.int8 and q.numel() == 1000 and absmax.numel() == 4
    y = dequantize_blockwise(q, absmax, x.shape, signed=True, domain=domain)
    blocks = torch.nn.functional.pad(x, (0, 24)).view(-1, BLOCK_SIZE)
    if domain == "linear":
        step = (blocks.abs().amax(1) / 127).repeat_interleave(BLOCK_SIZE)[:1000]
        assert ((x - y).abs() <= step / 2 + 1e-7).all()
    else:  # the error is half a step on √|x|
        step = (blocks.abs().sqrt().amax(1) / 127).repeat_interleave(BLOCK_SIZE)[:1000]
        assert ((x.abs().sqrt() - y.abs().sqrt()).abs() <= step / 2 + 1e-6).all()


def test_second_moment_codes_never_round_to_zero():
    v = torch.cat([torch.tensor([1.0]), torch.full((255,), 1e-9), torch.zeros(1)])
    for domain in ("linear", "sqrt"):
        q, absmax = quantize_blockwise(v, signed=False, domain=domain)
        assert q.dtype == torch.uint8
        assert (q[1:256] == 1).all() and q[256] == 0 and q[0] == 255


def test_state_bytes_formulas():
    s = OptimizerSettings()
    assert state_bytes((1000, 1000), s) == 2 * 4 * 10**6                       # Muon²: M and V in fp32
    assert state_bytes((1000, 1000), OptimizerSettings(name="muon")) == 4 * 10**6
    assert state_bytes((1000, 1000), OptimizerSettings(factorized=True)) == 4 * 10**6 + 4 * 2000
    assert state_bytes((1000,), s) == 8000                                       # 1-D → AdamW
    n8 = 10**6 + 4 * -(-10**6 // 256)
    assert state_bytes((1000, 1000), OptimizerSettings(state_dtype="int8")) == 2 * n8
    assert state_bytes(torch.empty(1000, 1000, device="meta"), OptimizerSettings(state_dtype="bf16")) == 4 * 10**6
    assert buffer_bytes(257, "int8") == 257 + 8


@pytest.mark.parametrize("kw", [dict(), dict(state_dtype="bf16"), dict(state_dtype="int8"), dict(factorized=True),
                                dict(name="muon", state_dtype="int8"), dict(name="adamw", state_dtype="bf16")])
def test_state_bytes_equals_real_state_after_a_step(kw):
    settings = OptimizerSettings(ns_dtype="fp32", **kw)
    model = GPT(GPTConfig(n_layer=1, n_embd=32, n_head=2, block_size=16))
    opt = build_optimizer(model, settings)
    idx = torch.randint(0, 256, (2, 16))
    model(idx, idx).backward()
    opt.step()
    # What the state's storages hold, not the tensors' logical sizes: an int8 buffer kept as a
    # view of its block-padded codes once held up to 255 bytes more than state_bytes says.
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for st in opt.state.values()
                for t in st.values() if isinstance(t, torch.Tensor)}
    real = sum(storages.values())
    split = {f: part for part, opt_part in opt.parts.items() for g in opt_part.param_groups for f in g["param_names"]}
    predicted = sum(state_bytes(p, settings, kind=split[f]) for f, p in model.named_parameters())
    assert real == predicted
