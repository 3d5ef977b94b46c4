"""Small reference models used by the tests, examples and benchmarks.

Each is a plain ``nn.Module`` whose repeated blocks live in a ``ModuleList`` or
``Sequential``, the shape memtune discovers as checkpointable units. They are sized by
their config so that the same code serves a 1-second CPU test and a 7B profile.

    GPT       nanoGPT-style decoder with ``F.scaled_dot_product_attention``
    MLP       stack of residual MLP blocks
    ConvNet   CNN with batch norm
    MoE       decoder-free stack of top-k mixture-of-experts blocks
    Branchy   MLP whose forward branches on tensor *values* (symbolic_trace fails)

``hf_llama`` / ``hf_gpt2`` build Hugging Face models from configs (no weights, no hub).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


# --------------------------------------------------------------------------- GPT
@dataclass(kw_only=True)
class GPTConfig:
    vocab_size: int = 256
    """Tokens; 256 for the byte-level corpus in :mod:`memtune.data`."""
    block_size: int = 128
    """Maximum sequence length."""
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    mlp_ratio: int = 4
    dropout: float = 0.0
    bias: bool = True


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        assert cfg.n_embd % cfg.n_head == 0
        self.n_head = cfg.n_head
        self.dropout = cfg.dropout
        self.c_attn = nn.Linear(cfg.n_embd, 3 * cfg.n_embd, bias=cfg.bias)
        self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        y = F.scaled_dot_product_attention(
            q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0
        )
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.c_proj(y)


class MLPBlockInner(nn.Module):
    def __init__(self, n_embd: int, ratio: int, bias: bool):
        super().__init__()
        self.c_fc = nn.Linear(n_embd, ratio * n_embd, bias=bias)
        self.c_proj = nn.Linear(ratio * n_embd, n_embd, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(F.gelu(self.c_fc(x)))


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.mlp = MLPBlockInner(cfg.n_embd, cfg.mlp_ratio, cfg.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    """Decoder-only transformer. ``forward(idx, targets=None)`` returns logits, or the
    mean cross-entropy loss when ``targets`` is given."""

    def __init__(self, cfg: GPTConfig | None = None):
        super().__init__()
        cfg = cfg or GPTConfig()
        self.config = cfg
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(cfg.vocab_size, cfg.n_embd),
                wpe=nn.Embedding(cfg.block_size, cfg.n_embd),
                h=nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer)),
                ln_f=nn.LayerNorm(cfg.n_embd, bias=cfg.bias),
            )
        )
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        self.apply(self._init_weights)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):  # GPT-2 scaled init of residual projections
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layer))

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, mean=0.0, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, mean=0.0, std=0.02)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, *,
                loss_chunks: int | None = None) -> torch.Tensor:
        """Logits, or the mean cross-entropy against ``targets``; with ``loss_chunks`` the head
        and loss run in that many checkpointed chunks, so full logits never exist
        (:mod:`memtune.loss_chunking`)."""
        T = idx.shape[1]
        pos = torch.arange(T, device=idx.device)
        x = self.transformer.wte(idx) + self.transformer.wpe(pos)
        for block in self.transformer.h:
            x = block(x)
        x = self.transformer.ln_f(x)
        if isinstance(loss_chunks, int) and loss_chunks > 1 and targets is not None and torch.is_grad_enabled():
            from memtune.loss_chunking import chunked_cross_entropy

            return chunked_cross_entropy(x, self.lm_head, targets, loss_chunks)
        logits = self.lm_head(x)
        if targets is None:
            return logits
        return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1))


# --------------------------------------------------------------------------- MLP
class ResidualMLPBlock(nn.Module):
    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.fc1 = nn.Linear(width, hidden)
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(F.relu(self.fc1(self.norm(x))))


class MLP(nn.Module):
    """``forward(x)`` maps ``(B, d_in)`` to ``(B, n_classes)`` logits."""

    def __init__(self, d_in: int = 64, width: int = 256, hidden: int = 1024, depth: int = 4, n_classes: int = 10):
        super().__init__()
        self.inp = nn.Linear(d_in, width)
        self.blocks = nn.Sequential(*(ResidualMLPBlock(width, hidden) for _ in range(depth)))
        self.head = nn.Linear(width, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.inp(x)))


# --------------------------------------------------------------------------- CNN
class ConvBlock(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn1(self.conv1(x)))
        return F.relu(x + self.bn2(self.conv2(y)))


class ConvNet(nn.Module):
    """Small ResNet-style CNN: ``(B, 3, H, W)`` images to class logits."""

    def __init__(self, channels: int = 32, depth: int = 4, n_classes: int = 10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels), nn.ReLU())
        self.blocks = nn.Sequential(*(ConvBlock(channels) for _ in range(depth)))
        self.head = nn.Linear(channels, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(self.stem(x))
        return self.head(x.mean(dim=(2, 3)))


# --------------------------------------------------------------------------- MoE
class MoEBlock(nn.Module):
    """Pre-norm residual mixture-of-experts feed-forward with top-k routing.

    Routing is written densely (every expert runs on every token and a gathered mask
    zeroes the unselected ones) so the graph is static and symbolically traceable; the
    token-dropping sparse variant is :class:`SparseMoEBlock`.
    """

    def __init__(self, width: int, hidden: int, n_experts: int = 4, top_k: int = 2):
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.router = nn.Linear(width, n_experts, bias=False)
        self.w1 = nn.Parameter(torch.randn(n_experts, width, hidden) * width**-0.5)
        self.w2 = nn.Parameter(torch.randn(n_experts, hidden, width) * hidden**-0.5)
        self.top_k = top_k

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(x)
        scores = self.router(h).softmax(dim=-1)  # (..., E)
        top_vals, top_idx = scores.topk(self.top_k, dim=-1)
        gates = torch.zeros_like(scores).scatter(-1, top_idx, top_vals)
        expert_in = torch.einsum("...d,edh->...eh", h, self.w1)
        expert_out = torch.einsum("...eh,ehd->...ed", F.gelu(expert_in), self.w2)
        return x + torch.einsum("...ed,...e->...d", expert_out, gates)


class MoE(nn.Module):
    """Token model of MoE blocks: ``forward(idx)`` gives ``(B, T, vocab)`` logits."""

    def __init__(self, vocab_size: int = 256, width: int = 128, hidden: int = 256, depth: int = 3, n_experts: int = 4, top_k: int = 2):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, width)
        self.layers = nn.ModuleList(MoEBlock(width, hidden, n_experts, top_k) for _ in range(depth))
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocab_size, bias=False)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.embed(idx)
        for layer in self.layers:
            x = layer(x)
        return self.head(self.norm(x))


# --------------------------------------------------------------------------- data-dependent control flow
class BranchyBlock(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.fc = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.fc(x)
        # Python branch on a tensor value: torch.fx.symbolic_trace cannot follow this.
        if y.mean() > 0:
            y = F.gelu(y)
        else:
            y = torch.tanh(y)
        return x + y


class Branchy(nn.Module):
    def __init__(self, d_in: int = 32, width: int = 128, depth: int = 3, n_classes: int = 10):
        super().__init__()
        self.inp = nn.Linear(d_in, width)
        self.blocks = nn.ModuleList(BranchyBlock(width) for _ in range(depth))
        self.head = nn.Linear(width, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.inp(x)
        for b in self.blocks:
            x = b(x)
            # A value-dependent guard at the top level, outside the units.
            if not torch.isfinite(x).all():
                raise FloatingPointError("non-finite activations")
        return self.head(x)


# --------------------------------------------------------------------------- Hugging Face
# Training never wants a KV cache: it would hold keys/values outside autograd and grow on every
# recomputation (Hugging Face turns it off under gradient checkpointing for the same reason).
def hf_llama(*, hidden_size=128, intermediate_size=344, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=None, vocab_size=256, max_position_embeddings=512, **kw) -> nn.Module:
    """A ``transformers`` LlamaForCausalLM built from a config: random weights, no hub."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        hidden_size=hidden_size, intermediate_size=intermediate_size, num_hidden_layers=num_hidden_layers,
        num_attention_heads=num_attention_heads, num_key_value_heads=num_key_value_heads or num_attention_heads,
        vocab_size=vocab_size, max_position_embeddings=max_position_embeddings,
        attn_implementation="sdpa", use_cache=False, **kw,
    )
    return LlamaForCausalLM(cfg)


def llama_7b(**kw) -> nn.Module:
    """Llama-2-7B shapes. Build it under ``torch.device("meta")``: it has 6.7B parameters."""
    return hf_llama(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                    vocab_size=32000, max_position_embeddings=4096, **kw)


def llama_70b(**kw) -> nn.Module:
    """Llama-2-70B shapes (80 layers, grouped-query attention with 8 key/value heads). Build it
    under ``torch.device("meta")``: it has 69B parameters."""
    return hf_llama(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                    num_key_value_heads=8, vocab_size=32000, max_position_embeddings=4096, **kw)


def hf_gpt2(*, n_embd=128, n_layer=2, n_head=4, vocab_size=256, n_positions=512, **kw) -> nn.Module:
    """A ``transformers`` GPT2LMHeadModel built from a config: random weights, no hub."""
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(n_embd=n_embd, n_layer=n_layer, n_head=n_head, vocab_size=vocab_size, n_positions=n_positions,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0,
                     attn_implementation="sdpa", use_cache=False, **kw)
    return GPT2LMHeadModel(cfg)


def hf_bert_mlm(*, hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128, vocab_size=256,
                max_position_embeddings=128, **kw) -> nn.Module:
    """A ``transformers`` BertForMaskedLM (an encoder) built from a config: random weights, no hub."""
    from transformers import BertConfig, BertForMaskedLM

    cfg = BertConfig(hidden_size=hidden_size, num_hidden_layers=num_hidden_layers,
                     num_attention_heads=num_attention_heads, intermediate_size=intermediate_size,
                     vocab_size=vocab_size, max_position_embeddings=max_position_embeddings,
                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, attn_implementation="sdpa", **kw)
    return BertForMaskedLM(cfg)


def hf_t5(*, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4, vocab_size=256, **kw) -> nn.Module:
    """A ``transformers`` T5ForConditionalGeneration (an encoder-decoder) built from a config.
    Its default ``use_cache=True`` is kept: memtune turns the cache off for training itself."""
    from transformers import T5Config, T5ForConditionalGeneration

    cfg = T5Config(d_model=d_model, d_kv=d_kv, d_ff=d_ff, num_layers=num_layers, num_decoder_layers=num_layers,
                   num_heads=num_heads, vocab_size=vocab_size, decoder_start_token_id=0, dropout_rate=0.0, **kw)
    return T5ForConditionalGeneration(cfg)


def hf_mixtral(*, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, vocab_size=256,
               max_position_embeddings=256, **kw) -> nn.Module:
    """A ``transformers`` MixtralForCausalLM (sparse mixture of experts) built from a config."""
    from transformers import MixtralConfig, MixtralForCausalLM

    cfg = MixtralConfig(hidden_size=hidden_size, intermediate_size=intermediate_size,
                        num_hidden_layers=num_hidden_layers, num_attention_heads=num_attention_heads,
                        num_key_value_heads=num_key_value_heads, num_local_experts=num_local_experts,
                        num_experts_per_tok=num_experts_per_tok, vocab_size=vocab_size,
                        max_position_embeddings=max_position_embeddings, use_cache=False, **kw)
    return MixtralForCausalLM(cfg)


def hf_qwen2_moe(*, hidden_size=64, intermediate_size=128, moe_intermediate_size=64, shared_expert_intermediate_size=64,
                 num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, num_experts=4,
                 num_experts_per_tok=2, vocab_size=256, max_position_embeddings=256, **kw) -> nn.Module:
    """A ``transformers`` Qwen2MoeForCausalLM (routed experts plus a shared expert) built from a config."""
    from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM

    cfg = Qwen2MoeConfig(hidden_size=hidden_size, intermediate_size=intermediate_size,
                         moe_intermediate_size=moe_intermediate_size,
                         shared_expert_intermediate_size=shared_expert_intermediate_size,
                         num_hidden_layers=num_hidden_layers, num_attention_heads=num_attention_heads,
                         num_key_value_heads=num_key_value_heads, num_experts=num_experts,
                         num_experts_per_tok=num_experts_per_tok, vocab_size=vocab_size,
                         max_position_embeddings=max_position_embeddings, use_cache=False, **kw)
    return Qwen2MoeForCausalLM(cfg)
