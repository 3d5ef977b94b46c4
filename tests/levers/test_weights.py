"""bf16 weights applied to a live model (issue 21, item 4): a user's plain loop, with no autocast
of its own, feeds fp32 inputs (audio features, signals) to the bf16 convolutions and trains.

Reference: the same plan stepped as memtune's runtime steps it, forward and loss under bf16
autocast (runtime/step.py, tests/reference.planned_step); with the same seed (stochastic
rounding draws from the global generator) the plain loop must match it exactly, and its
measured peak must be the profile's prediction."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import memtune
from memtune.apply import apply_plan, remove_plan, step_autocast
from reference import measure_step

TOLERANCE = 0.03


class ConvNet(nn.Module):
    """Conv1d blocks over fp32 signals and a classifier that computes its own loss."""

    def __init__(self, channels: int = 16, depth: int = 3):
        super().__init__()
        self.stem = nn.Conv1d(8, channels, 3, padding=1)
        self.blocks = nn.ModuleList(nn.Sequential(nn.Conv1d(channels, channels, 3, padding=1), nn.GELU())
                                    for _ in range(depth))
        self.head = nn.Linear(channels, 4)

    def forward(self, x, y):
        h = self.stem(x)
        for block in self.blocks:
            h = h + block(h)
        return nn.functional.cross_entropy(self.head(h.mean(-1)), y)


def conv_net():
    g = torch.Generator().manual_seed(0)
    return ConvNet, {"x": torch.randn(8, 8, 64, generator=g), "y": torch.randint(0, 4, (8,), generator=g)}


def tiny_whisper():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.WhisperConfig(
        vocab_size=64, num_mel_bins=8, encoder_layers=2, decoder_layers=2, encoder_attention_heads=2,
        decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64, d_model=32, max_source_positions=16,
        max_target_positions=16, pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=1,
        use_cache=False)
    g = torch.Generator().manual_seed(0)
    batch = {"input_features": torch.randn(2, 8, 32, generator=g), "labels": torch.randint(3, 64, (2, 8), generator=g)}
    return (lambda: transformers.WhisperForConditionalGeneration(cfg)), batch


def fresh(make):
    torch.manual_seed(0)
    return make()


def bf16_plan(make, batch):
    prof = memtune.profile(fresh(make), batch, target="cpu", optimizer="adamw",
                           space=memtune.PlanSpace(state_dtypes=("fp32",), levers={"weights": (None, "bf16-sr")}))
    plan = memtune.plan(prof, prof.baseline_peak_bytes, levers={"weights": ("bf16-sr",)})
    assert plan.variant.weights is not None and plan.fits
    return plan


def loss_of(out):
    return out if isinstance(out, torch.Tensor) else out.loss


def train(make, batch, plan, *, runtime_autocast: bool, steps: int = 3):
    model = fresh(make)
    opt = apply_plan(model, plan)
    torch.manual_seed(1)  # the stochastic rounding's noise
    losses = []
    for _ in range(steps):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=runtime_autocast):
            loss = loss_of(model(**batch))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.detach())
    return model, opt, losses


@pytest.mark.parametrize("build", [conv_net, pytest.param(tiny_whisper, marks=pytest.mark.slow)],
                         ids=["conv1d", "whisper"])
def test_plain_loop_with_bf16_weights_is_the_runtime_step(build):
    make, batch = build()
    plan = bf16_plan(make, batch)
    model, opt, losses = train(make, batch, plan, runtime_autocast=False)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert all(torch.isfinite(x) for x in losses) and losses[-1] < losses[0]
    ref, _, ref_losses = train(make, batch, plan, runtime_autocast=True)
    assert all(torch.equal(a, b) for a, b in zip(losses, ref_losses))
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), ref.parameters()))
    # What runs is what the profile recorded: the plain loop's peak is the plan's prediction.
    measured = measure_step(model, batch, opt=opt)
    assert abs(measured - plan.predicted_peak_bytes) / measured < TOLERANCE, (measured, plan.predicted_peak_bytes)


def test_step_autocast_and_remove_plan():
    make, batch = conv_net()
    plan = bf16_plan(make, batch)
    model = fresh(make)
    seen = []
    model.head.register_forward_pre_hook(lambda m, a: seen.append(torch.is_autocast_enabled("cpu")))
    with step_autocast(model):
        assert not torch.is_autocast_enabled("cpu")  # nothing applied yet: the caller's own precision
    apply_plan(model, plan)
    with step_autocast(model):
        assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
    model(**batch)
    assert seen == [True] and not torch.is_autocast_enabled("cpu")  # on inside the forward only
    with pytest.raises((ValueError, RuntimeError)):  # a forward that raises leaves no autocast behind
        model(batch["x"], torch.zeros(3, dtype=torch.long))
    assert not torch.is_autocast_enabled("cpu")
    remove_plan(model)
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    model(**batch)
    assert seen[-1] is False
    with step_autocast(model):
        assert not torch.is_autocast_enabled("cpu")


def test_compiled_model_runs_its_forward_under_the_autocast_too():
    # Dynamo cannot trace the hooks' bare autocast __enter__: they run eagerly, and the compiled
    # forward (eager backend: the same ops) must give the uncompiled plain loop's numbers.
    make, batch = conv_net()
    plan = bf16_plan(make, batch)
    _, _, expected = train(make, batch, plan, runtime_autocast=False, steps=2)
    model = fresh(make)
    opt = apply_plan(model, plan)
    compiled = torch.compile(model, backend="eager")
    torch.manual_seed(1)
    for want in expected:
        loss = compiled(**batch)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        assert torch.equal(loss.detach(), want)
    assert not torch.is_autocast_enabled("cpu")
