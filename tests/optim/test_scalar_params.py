"""Scalar (0-d) and one-element parameters, such as CLIP's ``logit_scale``: the state codecs keep
their shape, memtune's AdamW steps them as ``torch.optim.AdamW`` does in every state precision,
the hybrid gives them to AdamW (never to Newton-Schulz), and a model holding one profiles,
plans and trains (issue 21, item 2)."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import memtune
from memtune.optim import AdamW, OptimizerSettings, build_optimizer, split_parameters, state_bytes
from memtune.optim.quant import dequantize_blockwise, quantize_blockwise, read_state, write_state

SHAPES = [(), (1,), (1, 1)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("domain", ["linear", "sqrt"])
def test_blockwise_roundtrip_keeps_shape_and_value(shape, signed, domain):
    # One element is its own block's absmax, so its code is the top level and decodes to itself
    # (up to fp32 rounding of the scale, and of √ then ² in the sqrt domain).
    for value in (0.37, -2.5, 0.0, 1e-6):
        if not signed and value < 0:
            continue
        x = torch.full(shape, value)
        codes, absmax = quantize_blockwise(x, signed=signed, domain=domain)
        y = dequantize_blockwise(codes, absmax, x.shape, signed=signed, domain=domain)
        assert y.shape == x.shape and y.dtype == torch.float32
        torch.testing.assert_close(y, x, rtol=1e-6, atol=0.0)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("state_dtype", ["fp32", "bf16", "int8"])
def test_state_write_read_keeps_shape(shape, state_dtype):
    state: dict = {}
    x = torch.full(shape, -0.75)
    write_state(state, "m", x, state_dtype, signed=True)
    y = read_state(state, "m", shape, signed=True)
    assert y.shape == x.shape
    torch.testing.assert_close(y, x)  # -0.75 is exact in bf16, and one element is exact in int8


@pytest.mark.parametrize("state_dtype", ["fp32", "bf16", "int8"])
def test_adamw_steps_scalars_like_torch_adamw(state_dtype):
    torch.manual_seed(0)
    ws = [torch.tensor(1.5), torch.randn(1), torch.randn(1, 1), torch.randn(5, 3)]
    ps_ref = [nn.Parameter(w.clone()) for w in ws]
    ps = [nn.Parameter(w.clone()) for w in ws]
    ref = torch.optim.AdamW(ps_ref, lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1, foreach=False)
    mine = AdamW(ps, lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1, state_dtype=state_dtype)
    for _ in range(10):
        for a, b in zip(ps_ref, ps):
            a.grad = torch.randn(a.shape)
            b.grad = a.grad.clone()
        ref.step(), mine.step()
    # fp32 is torch's update; one-element int8 blocks are exact up to fp32 rounding; bf16 rounds
    # the moments to 8 bits of mantissa each step (the (5, 3) matrix keeps int8 honest).
    tol = {"fp32": 1e-6, "int8": 1e-5, "bf16": 2e-3}[state_dtype]
    for a, b in zip(ps_ref[:3], ps[:3]):
        assert b.shape == a.shape
        torch.testing.assert_close(b, a, atol=tol, rtol=tol)
    mine.set_state_dtype("fp32")  # re-encoding keeps 0-d state 0-d
    assert mine.state[ps[0]]["exp_avg"].shape == ()


class Block(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.up = nn.Linear(width, 4 * width)
        self.down = nn.Linear(4 * width, width)

    def forward(self, x):
        return x + self.down(torch.relu(self.up(x)))


class ScaledMLP(nn.Module):
    """Residual MLP blocks and a learned scalar temperature: a small model with a 0-d parameter."""

    def __init__(self, width: int = 16, depth: int = 3):
        super().__init__()
        self.blocks = nn.ModuleList(Block(width) for _ in range(depth))
        self.temperature = nn.Parameter(torch.tensor(1.0))

    def forward(self, x, y):
        for block in self.blocks:
            x = block(x)
        return ((x * self.temperature - y) ** 2).mean()


@pytest.mark.parametrize("state_dtype", ["fp32", "bf16", "int8"])
def test_hybrid_gives_scalars_to_adamw_and_prices_their_state(state_dtype):
    model = ScaledMLP()
    settings = OptimizerSettings(ns_dtype="fp32", state_dtype=state_dtype)
    split = split_parameters(model, settings)
    assert "temperature" in split.adamw and split.reasons["temperature"] == "0-D"
    assert "blocks.0.up.weight" in split.muon
    opt = build_optimizer(model, settings)
    before = model.temperature.detach().clone()
    model(torch.randn(8, 16), torch.randn(8, 16)).backward()
    opt.step()
    assert not torch.equal(model.temperature, before) and model.temperature.shape == ()
    real = sum(t.numel() * t.element_size() for st in opt.state.values() for t in st.values()
               if isinstance(t, torch.Tensor))
    kinds = {f: part for part, o in opt.parts.items() for g in o.param_groups for f in g["param_names"]}
    assert real == sum(state_bytes(p, settings, kind=kinds[f]) for f, p in model.named_parameters())


def tiny_clip():
    transformers = pytest.importorskip("transformers")
    text = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                max_position_embeddings=16, bos_token_id=0, eos_token_id=1, pad_token_id=2)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=16,
                  patch_size=8)
    torch.manual_seed(0)
    model = transformers.CLIPModel(transformers.CLIPConfig(text_config=text, vision_config=vision, projection_dim=16))
    g = torch.Generator().manual_seed(0)
    batch = {"input_ids": torch.randint(3, 64, (4, 8), generator=g), "pixel_values": torch.randn(4, 3, 16, 16, generator=g),
             "return_loss": True}
    return model, batch


def scaled_mlp():
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    return ScaledMLP(), {"x": torch.randn(64, 16, generator=g), "y": torch.randn(64, 16, generator=g)}


@pytest.mark.parametrize("build", [scaled_mlp, pytest.param(tiny_clip, marks=pytest.mark.slow)],
                         ids=["scaled_mlp", "clip"])
def test_model_with_a_scalar_parameter_profiles_plans_and_trains(build):
    model, batch = build()
    scalar = next(n for n, p in model.named_parameters() if p.ndim == 0)
    prof = memtune.profile(model, batch, target="cpu", optimizer="muon2")   # records int8 state too
    budget = int(prof.baseline_peak_bytes * 0.6)
    plan = memtune.plan(prof, budget)
    assert plan.fits and scalar in plan.optimizer.adamw_params
    before = dict(model.named_parameters())[scalar].detach().clone()
    trainer = memtune.fit(model, budget, device="cpu", progress=False, retune=False)
    trainer.train([batch] * 4, steps=4)
    losses = [h["loss"] for h in trainer.history]
    assert losses[-1] < losses[0], losses
    assert all(h["peak_bytes"] <= budget for h in trainer.history)
    assert not torch.equal(dict(model.named_parameters())[scalar], before)
