"""A zoo of third-party models, each tiny, built from its library's config with random init.

Every entry is a :class:`ZooCase`: a builder (seeded, no hub access), one batch and, where the
model does not compute its own loss, a loss function. The kinds cover what people train:
decoders, encoders, encoder-decoders, vision, speech, a contrastive two-tower model, mixtures
of experts, a state-space model, a U-Net with long skips, shared weights, a custom autograd
function, a plain ``nn.Sequential`` and a PEFT LoRA adapter.

Used by tests/test_model_zoo.py (the conformance test) and benchmarks/model_zoo.py (the table),
which share the checks at the end of this file. Sizes are chosen for a CPU test: hidden 32, two
layers, sequences of 16 tokens, 32-pixel images. Hugging Face configs keep the library's own
defaults (``use_cache`` included) wherever a test does not need otherwise: dropout is off so
that two runs of a step are the same step.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Callable

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
import torch.nn as nn
import torch.nn.functional as F

import memtune
from memtune import zoo
from memtune.apply import apply_plan
from memtune.errors import InfeasibleBudgetError
from memtune.levers import held_at_default
from reference import measure_planned_step, measure_step

BATCH = 8
SEQ = 32
VOCAB = 256
IMAGE = 32
IMAGE_BATCH = 16
NO_DROPOUT = dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


@dataclass(frozen=True)
class ZooCase:
    name: str
    kind: str
    make: Callable[[], nn.Module]
    batch: Any
    loss_fn: Callable | None = None


def build(case: ZooCase) -> nn.Module:
    """A fresh model, with the same weights every time."""
    torch.manual_seed(0)
    return case.make()


# ----------------------------------------------------------------------------- batches
def _gen() -> torch.Generator:
    return torch.Generator().manual_seed(0)


def _lm_batch() -> dict:
    ids = torch.randint(0, VOCAB, (BATCH, SEQ), generator=_gen())
    return {"input_ids": ids, "labels": ids.clone()}


def _image_batch(labels: int = 10) -> dict:
    g = _gen()
    return {"pixel_values": torch.randn(IMAGE_BATCH, 3, IMAGE, IMAGE, generator=g),
            "labels": torch.randint(0, labels, (IMAGE_BATCH,), generator=g)}


def _classes(d_in: int = 32, n: int = 10, rows: int = 128) -> tuple:
    g = _gen()
    return torch.randn(rows, d_in, generator=g), torch.randint(0, n, (rows,), generator=g)


def _lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten())


def clip_loss(output, batch) -> torch.Tensor:
    """CLIP's symmetric contrastive loss: the i-th image goes with the i-th text."""
    logits = output.logits_per_image
    labels = torch.arange(logits.shape[0], device=logits.device)
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels)) / 2


# ----------------------------------------------------------------------------- transformers builders
def _decoder(config_cls: str, model_cls: str, **kw) -> nn.Module:
    import transformers

    cfg = getattr(transformers, config_cls)(vocab_size=VOCAB, num_hidden_layers=2, **kw)  # use_cache as the library sets it
    return getattr(transformers, model_cls)(cfg)


def gpt_neox():
    return _decoder("GPTNeoXConfig", "GPTNeoXForCausalLM", hidden_size=32, intermediate_size=64,
                    num_attention_heads=2, max_position_embeddings=64, hidden_dropout=0.0, attention_dropout=0.0)


def phi3():
    return _decoder("Phi3Config", "Phi3ForCausalLM", hidden_size=32, intermediate_size=64, num_attention_heads=2,
                    num_key_value_heads=2, max_position_embeddings=64, original_max_position_embeddings=64,
                    pad_token_id=0, bos_token_id=1, eos_token_id=2)


def falcon():
    return _decoder("FalconConfig", "FalconForCausalLM", hidden_size=32, num_attention_heads=2,
                    hidden_dropout=0.0, attention_dropout=0.0)


def mistral():
    return _decoder("MistralConfig", "MistralForCausalLM", hidden_size=32, intermediate_size=64,
                    num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64)


def qwen2():
    return _decoder("Qwen2Config", "Qwen2ForCausalLM", hidden_size=32, intermediate_size=64, num_attention_heads=2,
                    num_key_value_heads=1, max_position_embeddings=64)


def gemma():
    return _decoder("GemmaConfig", "GemmaForCausalLM", hidden_size=32, intermediate_size=64, num_attention_heads=2,
                    num_key_value_heads=1, head_dim=16, max_position_embeddings=64)


def mamba():
    return _decoder("MambaConfig", "MambaForCausalLM", hidden_size=32, state_size=8, expand=2, conv_kernel=4)


def deberta_v2():
    from transformers import DebertaV2Config, DebertaV2ForMaskedLM

    return DebertaV2ForMaskedLM(DebertaV2Config(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2,
                                                num_attention_heads=2, intermediate_size=64,
                                                max_position_embeddings=64, **NO_DROPOUT))


def albert():
    from transformers import AlbertConfig, AlbertForMaskedLM

    # One shared layer applied six times (ALBERT's cross-layer sharing).
    return AlbertForMaskedLM(AlbertConfig(vocab_size=VOCAB, embedding_size=16, hidden_size=32, num_hidden_layers=6,
                                          num_attention_heads=2, intermediate_size=64, max_position_embeddings=64,
                                          classifier_dropout_prob=0.0, **NO_DROPOUT))


def bart():
    from transformers import BartConfig, BartForConditionalGeneration

    return BartForConditionalGeneration(BartConfig(
        vocab_size=VOCAB, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=2,
        decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=64,
        dropout=0.0, attention_dropout=0.0, activation_dropout=0.0,
        pad_token_id=1, bos_token_id=0, eos_token_id=2, decoder_start_token_id=2))


def vit():
    from transformers import ViTConfig, ViTForImageClassification

    return ViTForImageClassification(ViTConfig(image_size=IMAGE, patch_size=4, hidden_size=32, num_hidden_layers=2,
                                               num_attention_heads=2, intermediate_size=64, num_labels=10,
                                               **NO_DROPOUT))


def convnext():
    from transformers import ConvNextConfig, ConvNextForImageClassification

    return ConvNextForImageClassification(ConvNextConfig(hidden_sizes=[16, 32], depths=[1, 3], num_stages=2,
                                                         image_size=IMAGE, num_labels=10, drop_path_rate=0.0))


def swin():
    from transformers import SwinConfig, SwinForImageClassification

    return SwinForImageClassification(SwinConfig(image_size=IMAGE, patch_size=4, embed_dim=16, depths=[1, 3],
                                                  num_heads=[2, 2], window_size=4, num_labels=10,
                                                  drop_path_rate=0.0, **NO_DROPOUT))


def resnet():
    from transformers import ResNetConfig, ResNetForImageClassification

    # Batch norm in every block.
    return ResNetForImageClassification(ResNetConfig(embedding_size=8, hidden_sizes=[8, 16, 32], depths=[1, 1, 1],
                                                     layer_type="basic", num_labels=10))


def whisper():
    from transformers import WhisperConfig, WhisperForConditionalGeneration

    return WhisperForConditionalGeneration(WhisperConfig(
        vocab_size=VOCAB, num_mel_bins=16, d_model=32, encoder_layers=2, decoder_layers=2,
        encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64,
        max_source_positions=16, max_target_positions=32, dropout=0.0, attention_dropout=0.0,
        activation_dropout=0.0, pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=1,
        suppress_tokens=None, begin_suppress_tokens=None))


def wav2vec2():
    from transformers import Wav2Vec2Config, Wav2Vec2ForSequenceClassification

    return Wav2Vec2ForSequenceClassification(Wav2Vec2Config(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        conv_dim=(16, 16), conv_stride=(5, 2), conv_kernel=(10, 3), num_conv_pos_embeddings=16,
        num_conv_pos_embedding_groups=2, classifier_proj_size=16, num_labels=4, mask_time_prob=0.0,
        hidden_dropout=0.0, attention_dropout=0.0, activation_dropout=0.0, feat_proj_dropout=0.0,
        final_dropout=0.0, layerdrop=0.0))


def clip():
    from transformers import CLIPConfig, CLIPModel

    # Two towers and a 0-d parameter (logit_scale).
    return CLIPModel(CLIPConfig(
        text_config=dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=SEQ),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=IMAGE, patch_size=8),
        projection_dim=16))


def lora_llama():
    import peft

    base = zoo.hf_llama(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
    return peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0,
                                                     target_modules=["q_proj", "v_proj", "up_proj", "down_proj"]))


# ----------------------------------------------------------------------------- own modules
class UNet(nn.Module):
    """A small diffusion-style U-Net: the encoder's features skip across to the decoder (long skips)."""

    def __init__(self, channels: tuple[int, ...] = (8, 16, 32)):
        super().__init__()
        self.inp = nn.Conv2d(3, channels[0], 3, padding=1)
        self.down = nn.ModuleList(self._block(a, b) for a, b in zip(channels, channels[1:]))
        self.mid = self._block(channels[-1], channels[-1])
        self.up = nn.ModuleList(self._block(2 * b, a) for a, b in reversed(list(zip(channels, channels[1:]))))
        self.out = nn.Conv2d(channels[0], 3, 1)

    @staticmethod
    def _block(c_in: int, c_out: int) -> nn.Module:
        return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1), nn.GroupNorm(4, c_out), nn.SiLU(),
                             nn.Conv2d(c_out, c_out, 3, padding=1), nn.GroupNorm(4, c_out), nn.SiLU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        skips = []
        for block in self.down:
            h = block(h)
            skips.append(h)
            h = F.avg_pool2d(h, 2)
        h = self.mid(h)
        for block in self.up:
            h = F.interpolate(h, scale_factor=2.0, mode="nearest")
            h = block(torch.cat([h, skips.pop()], dim=1))
        return self.out(h)


class TiedLM(nn.Module):
    """Shared weights: the output head is the input embedding, and one MLP is applied at every depth."""

    def __init__(self, width: int = 64, depth: int = 3):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, width)
        self.shared = zoo.ResidualMLPBlock(width, 2 * width)
        self.blocks = nn.ModuleList(zoo.ResidualMLPBlock(width, 2 * width) for _ in range(depth))
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, VOCAB, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.embed(idx)
        for block in self.blocks:
            x = self.shared(block(x))
        return self.head(self.norm(x))


class _SquaredReLU(torch.autograd.Function):
    """relu(x)**2 with a hand-written backward that saves only its input."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x.clamp(min=0).square()

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return grad * 2 * x.clamp(min=0)


class _CustomFnBlock(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.fc1 = nn.Linear(width, 4 * width)
        self.fc2 = nn.Linear(4 * width, width)

    def forward(self, x):
        return x + self.fc2(_SquaredReLU.apply(self.fc1(self.norm(x))))


class CustomFnMLP(nn.Module):
    """Residual blocks whose activation is a custom ``torch.autograd.Function``."""

    def __init__(self, d_in: int = 32, width: int = 64, depth: int = 3, n_classes: int = 10):
        super().__init__()
        self.inp = nn.Linear(d_in, width)
        self.blocks = nn.ModuleList(_CustomFnBlock(width) for _ in range(depth))
        self.head = nn.Linear(width, n_classes)

    def forward(self, x):
        x = self.inp(x)
        for block in self.blocks:
            x = block(x)
        return self.head(x)


def sequential_mlp(d_in: int = 32, width: int = 64, depth: int = 16, n_classes: int = 10) -> nn.Sequential:
    """A deep plain MLP, as people stack one: activations outweigh parameters and their state,
    so recomputation (of segments of the chain: memtune.units) is what a budget needs."""
    layers: list[nn.Module] = [nn.Linear(d_in, width), nn.ReLU()]
    for _ in range(depth - 1):
        layers += [nn.Linear(width, width), nn.ReLU()]
    return nn.Sequential(*layers, nn.Linear(width, n_classes))


# ----------------------------------------------------------------------------- the zoo
def cases() -> dict[str, ZooCase]:
    g = _gen()
    lm = _lm_batch()
    text = {"input_ids": lm["input_ids"]}
    x, y = _classes()
    return {c.name: c for c in [
        ZooCase("llama", "decoder", lambda: zoo.hf_llama(hidden_size=32, intermediate_size=64, num_attention_heads=2), lm),
        ZooCase("gpt2", "decoder", lambda: zoo.hf_gpt2(n_embd=32, n_head=2), lm),
        ZooCase("gpt_neox", "decoder", gpt_neox, lm),
        ZooCase("phi3", "decoder", phi3, lm),
        ZooCase("falcon", "decoder", falcon, lm),
        ZooCase("mistral", "decoder", mistral, lm),
        ZooCase("qwen2", "decoder", qwen2, lm),
        ZooCase("gemma", "decoder", gemma, lm),
        ZooCase("bert", "encoder", lambda: zoo.hf_bert_mlm(hidden_size=32, intermediate_size=64), lm),
        ZooCase("deberta_v2", "encoder", deberta_v2, lm),
        ZooCase("albert", "encoder (shared layer)", albert, lm),
        ZooCase("t5", "seq2seq", lambda: zoo.hf_t5(d_model=32, d_kv=8, d_ff=64, num_heads=2), lm),
        ZooCase("bart", "seq2seq", bart, lm),
        ZooCase("vit", "vision", vit, _image_batch()),
        ZooCase("convnext", "vision", convnext, _image_batch()),
        ZooCase("swin", "vision", swin, _image_batch()),
        ZooCase("resnet", "vision (batch norm)", resnet, _image_batch()),
        ZooCase("whisper", "speech seq2seq", whisper,
                {"input_features": torch.randn(BATCH, 16, 32, generator=g), "labels": lm["input_ids"][:, :8] % 200 + 3}),
        ZooCase("wav2vec2", "speech encoder", wav2vec2,
                {"input_values": torch.randn(BATCH, 800, generator=g), "labels": torch.randint(0, 4, (BATCH,), generator=g)}),
        ZooCase("clip", "contrastive two-tower", clip,
                {**text, "pixel_values": torch.randn(BATCH, 3, IMAGE, IMAGE, generator=g)}, clip_loss),
        ZooCase("qwen2_moe", "MoE", lambda: zoo.hf_qwen2_moe(hidden_size=32, intermediate_size=64, moe_intermediate_size=32,
                                                             shared_expert_intermediate_size=32, num_attention_heads=2,
                                                             num_key_value_heads=1), lm),
        ZooCase("mixtral", "MoE", lambda: zoo.hf_mixtral(hidden_size=32, intermediate_size=64, num_attention_heads=2,
                                                         num_key_value_heads=1), lm),
        ZooCase("mamba", "state space", mamba, lm),
        ZooCase("unet", "U-Net (long skips)", UNet,
                (torch.randn(BATCH, 3, IMAGE, IMAGE, generator=g), torch.randn(BATCH, 3, IMAGE, IMAGE, generator=g)),
                F.mse_loss),
        ZooCase("tied_lm", "shared weights", TiedLM, (lm["input_ids"], lm["input_ids"].roll(-1, dims=1)), _lm_loss),
        ZooCase("custom_fn", "custom autograd.Function", CustomFnMLP, (x, y), F.cross_entropy),
        ZooCase("sequential", "nn.Sequential MLP", sequential_mlp, _classes(rows=256), F.cross_entropy),
        ZooCase("lora_llama", "PEFT LoRA", lora_llama, lm),
    ]}


# ----------------------------------------------------------------------------- the checks
PLAN_FRACTIONS = (0.5, 0.7)
"""Budgets for the plan checks, as fractions of the unplanned peak."""
FIT_FRACTION = 0.6
FIT_STEPS = 3
MINIMAL_LEVERS = held_at_default(lambda lever: True)
"""Every lever at its default: plans of unit decisions and state precision, as
``PlanSpace.minimal()`` records (one quick profile per model, shared by every check)."""


def profile(case: ZooCase) -> memtune.ModelProfile:
    """The profile every check of ``case`` shares: AdamW, fp32, CPU target, minimal plan space."""
    return memtune.profile(build(case), case.batch, loss_fn=case.loss_fn, target="cpu",
                           space=memtune.PlanSpace.minimal())


def measure_unplanned(case: ZooCase) -> int:
    """MemTracker's peak of a steady-state AdamW step of the model as built (no memtune applied)."""
    model = build(case)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    return measure_step(model, case.batch, loss_fn=case.loss_fn, opt=opt)


def plan_at(prof: memtune.ModelProfile, fraction: float) -> tuple[memtune.Plan, int, bool]:
    """``(plan, budget, at_floor)``: the plan at ``fraction`` of the unplanned peak, or, when
    that is infeasible, at the smallest budget the error names (``at_floor``)."""
    budget = int(prof.baseline_peak_bytes * fraction)
    try:
        return memtune.plan(prof, budget), budget, False
    except InfeasibleBudgetError as e:
        return memtune.plan(prof, e.min_feasible_bytes), e.min_feasible_bytes, True


def measure_plan(case: ZooCase, plan: memtune.Plan) -> int:
    """MemTracker's peak of a steady-state step of a fresh model with ``plan`` applied."""
    model = build(case)
    opt = apply_plan(model, plan)
    return measure_planned_step(model, case.batch, plan, opt, loss_fn=case.loss_fn)


def fit(case: ZooCase, budget: int, steps: int = FIT_STEPS):
    """``memtune.fit`` at ``budget`` trained ``steps`` steps on the case's batch; the trainer."""
    trainer = memtune.fit(build(case), budget, sample=case.batch, loss_fn=case.loss_fn, device="cpu",
                          optimizer="adamw", progress=False, planner_options={"levers": MINIMAL_LEVERS})
    trainer.train([case.batch] * steps, steps=steps)
    return trainer
