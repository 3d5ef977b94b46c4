"""PEFT LoRA: frozen parameters get no gradient and no optimizer state in the profile or the
plan, and a LoRA-wrapped HF Llama trains on real text inside its budget in memtune.session
(measured per step), leaving the frozen weights untouched."""

from __future__ import annotations

import pytest
import torch

peft = pytest.importorskip("peft")

import memtune  # noqa: E402
from memtune import zoo  # noqa: E402
from memtune.data import TextCorpus  # noqa: E402
from memtune.runtime.session import optimizer_builder  # noqa: E402
from memtune.optimizer_recording import optimizer_state_tensors  # noqa: E402
from memtune.runtime.memguard import TensorMemoryGuard  # noqa: E402
from reference import train_step  # noqa: E402

CORPUS = TextCorpus.load()
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def lora_llama():
    torch.manual_seed(0)
    base = zoo.hf_llama(hidden_size=64, intermediate_size=172, num_hidden_layers=2)
    return peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=TARGETS))


def batches(n):
    g = torch.Generator().manual_seed(0)
    return [{"input_ids": x, "labels": x} for x, _ in (CORPUS.batch("train", 4, 64, generator=g) for _ in range(n))]


def test_frozen_parameters_get_no_gradient_or_state_in_profile_and_plan():
    model = lora_llama()
    batch = batches(1)[0]
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    lora_bytes = sum(p.numel() * p.element_size() for p in trainable.values())
    opt = torch.optim.AdamW(trainable.values())
    prof = memtune.profile(model, batch, optimizer=optimizer_builder(opt, model), target="cpu",
                           space=memtune.PlanSpace.minimal())
    assert prof.grad_bytes == lora_bytes
    assert prof.optimizer_state_bytes == 2 * lora_bytes + 4 * len(trainable)  # exp_avg, exp_avg_sq, step
    plan = memtune.plan(prof, prof.baseline_peak_bytes)
    assert set(plan.optimizer.adamw_params) | set(plan.optimizer.muon_params) == set(trainable)
    # The prediction holds on real tensors. MemTracker cannot referee here (it registers a gradient
    # hook on every parameter, and frozen ones refuse it); TensorMemoryGuard counts the same storages.
    for _ in range(2):
        train_step(model, batch, None, opt)
    guard = TensorMemoryGuard()
    guard.track([list(model.parameters()), optimizer_state_tensors(opt), list(batch.values())])
    with guard:
        train_step(model, batch, None, opt)
    assert abs(guard.peak_bytes - prof.baseline_peak_bytes) / guard.peak_bytes < 0.01


def test_lora_llama_trains_in_a_session_within_budget_and_keeps_frozen_weights():
    model = lora_llama()
    data = batches(10)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-2)
    unplanned = memtune.profile(model, data[0], optimizer=optimizer_builder(opt, model), target="cpu",
                                space=memtune.PlanSpace.minimal()).baseline_peak_bytes
    budget = int(unplanned * 0.7)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    with memtune.session(model, budget, optimizer=opt, device="cpu", allow_microbatching=False,
                         planner_options={"allow_loss_chunking": False}) as s:
        for b in data:
            s.step(b)
        assert s.plan.recompute_units
    assert all(h["peak_bytes"] <= budget for h in s.history)
    steady = s.history[-1]
    assert abs(steady["peak_bytes"] - steady["predicted_peak_bytes"]) / steady["peak_bytes"] < 0.05
    losses = [h["loss"] for h in s.history]
    # Rank-4 adapters on a random base cannot learn the byte frequencies (head and embeddings are frozen):
    # the loss falls by ~0.3 and then flattens.
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.1, losses
    for n, p in model.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), n


def test_default_split_sends_lora_adapters_to_muon2_as_measured():
    """benchmarks/lora_optimizer.py: Muon² on the adapter matrices reached a lower validation loss
    than AdamW at equal steps (each at its best learning rate), so the default split keeps them
    with the hidden matrices; frozen base weights are in neither part."""
    from memtune.optim import split_parameters

    model = lora_llama()
    split = split_parameters(model)
    lora = {n for n, p in model.named_parameters() if p.requires_grad and "lora_" in n}
    assert lora and set(split.muon) == lora and not set(split.adamw) & lora
    assert {split.reasons[n] for n in lora} == {"hidden matrix"}
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert not frozen & (set(split.muon) | set(split.adamw))
