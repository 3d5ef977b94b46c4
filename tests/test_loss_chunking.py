"""The chunked loss (memtune/loss_chunking.py) on PEFT-wrapped causal LMs (issue 21, item 3).

A ``PeftModel``'s ``base_model`` is its tuner, whose output is the wrapped causal LM's logits;
taking them for hidden states broke profiling. The reference for every check is the same model
computing its loss unchunked."""

from __future__ import annotations

import copy

import pytest
import torch

peft = pytest.importorskip("peft")

import memtune  # noqa: E402
from memtune import loss_chunking, zoo  # noqa: E402
from memtune.apply import apply_plan  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def lora_llama(task_type: str | None = "CAUSAL_LM"):
    torch.manual_seed(0)
    base = zoo.hf_llama(hidden_size=64, intermediate_size=172, num_hidden_layers=2, num_attention_heads=2)
    cfg = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=TARGETS, task_type=task_type)
    model = peft.get_peft_model(base, cfg)
    for n, p in model.named_parameters():  # LoRA's B starts at zero: give the adapters a real effect
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.02)
    return model


def batch(seed=0, size=4, seq=32):
    ids = torch.randint(0, 256, (size, seq), generator=torch.Generator().manual_seed(seed))
    labels = ids.clone()
    labels[0, :7] = -100  # ignored tokens count in neither loss
    return {"input_ids": ids, "labels": labels}


def loss_and_grads(model, b):
    model.zero_grad(set_to_none=True)
    loss = model(**b).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("task_type", ["CAUSAL_LM", None], ids=["PeftModelForCausalLM", "PeftModel"])
def test_chunked_loss_of_a_lora_llama_equals_its_full_loss(task_type):
    model = lora_llama(task_type)
    inner = model.get_base_model()
    assert type(inner).__name__ == "LlamaForCausalLM"
    assert loss_chunking.support(model) == "hf-causal-lm" and loss_chunking.chunk_target(model) is inner
    b = batch()
    full, g_full = loss_and_grads(model, b)
    loss_chunking.apply(model, 4)
    assert "forward" in inner.__dict__ and "forward" not in model.__dict__  # PEFT's own forward still runs
    out = model(**b)
    assert out.logits is None  # no full logits were made
    chunked, g_chunked = loss_and_grads(model, b)
    torch.testing.assert_close(chunked, full, rtol=1e-6, atol=1e-6)
    assert g_chunked.keys() == g_full.keys() and all("lora_" in n for n in g_full)
    for n in g_full:
        torch.testing.assert_close(g_chunked[n], g_full[n], rtol=1e-5, atol=1e-7)
    loss_chunking.remove(model)
    assert "forward" not in inner.__dict__
    torch.testing.assert_close(model(**b).loss, full, rtol=0, atol=0)


@pytest.mark.parametrize("build", [lambda: zoo.hf_llama(hidden_size=64, intermediate_size=172, num_hidden_layers=2,
                                                         num_attention_heads=2),
                                   lambda: zoo.hf_gpt2(n_embd=64, n_layer=2, n_head=2)], ids=["llama", "gpt2"])
def test_chunked_loss_of_plain_hf_causal_lms_equals_their_full_loss(build):
    torch.manual_seed(0)
    model = build()
    assert loss_chunking.support(model) == "hf-causal-lm" and loss_chunking.chunk_target(model) is model
    b = batch()
    full, g_full = loss_and_grads(model, b)
    loss_chunking.apply(model, 3)
    chunked, g_chunked = loss_and_grads(model, b)
    loss_chunking.remove(model)
    torch.testing.assert_close(chunked, full, rtol=1e-6, atol=1e-6)
    for n in g_full:
        torch.testing.assert_close(g_chunked[n], g_full[n], rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_lora_llama_profiles_plans_the_chunked_loss_and_trains_as_unchunked():
    b = batch()
    model = lora_llama()
    prof = memtune.profile(model, b, target="cpu", optimizer="adamw",
                           space=memtune.PlanSpace(state_dtypes=("fp32",), levers={"loss_chunks": (None, 4)}))
    plan = memtune.plan(prof, prof.baseline_peak_bytes, levers={"loss_chunks": (4,), "weights": (None,)})
    assert plan.variant.loss_chunks == 4 and plan.fits

    def train(chunked: bool) -> list[float]:
        m = lora_llama()
        opt = apply_plan(m, plan)
        if not chunked:
            loss_chunking.remove(m)  # the same plan, the loss as the model computes it
        losses = []
        for _ in range(4):
            loss = m(**b).loss  # one batch, memorized: the loss must fall
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(loss.item())
        return losses

    chunked, full = train(True), train(False)
    assert chunked[-1] < chunked[0]
    assert chunked == pytest.approx(full, rel=1e-5, abs=1e-6)
