"""Small CPU models for the planner tests whose activations dominate their memory (so that
budgets well below the baseline peak are feasible), each with a batch and a loss."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from memtune import zoo

# The same Case record and LM loss as the profiler tests' models (tests/cases.py); these are
# smaller so that real training steps at several budgets stay fast.
from cases import Case, _lm_loss


def cases() -> dict[str, Case]:
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (8, 64), generator=g)
    y = torch.randint(0, 256, (8, 64), generator=g)
    return {c.name: c for c in [
        Case("gpt", lambda: zoo.GPT(zoo.GPTConfig(n_layer=3, n_embd=32, n_head=2, block_size=64)), (x, y)),
        Case("mlp", lambda: zoo.MLP(d_in=16, width=32, hidden=128, depth=3),
             (torch.randn(1024, 16, generator=g), torch.randint(0, 10, (1024,), generator=g)), F.cross_entropy),
        Case("cnn", lambda: zoo.ConvNet(channels=8, depth=3),
             (torch.randn(8, 3, 32, 32, generator=g), torch.randint(0, 10, (8,), generator=g)), F.cross_entropy),
        Case("moe", lambda: zoo.MoE(width=32, hidden=64, depth=3), (x, y), _lm_loss),
        Case("hf_llama", lambda: zoo.hf_llama(hidden_size=32, intermediate_size=86, num_hidden_layers=3,
                                              num_attention_heads=2), {"input_ids": x, "labels": y}),
        Case("hf_gpt2", lambda: zoo.hf_gpt2(n_embd=32, n_layer=3, n_head=2), {"input_ids": x, "labels": y}),
    ]}


def fresh(case: Case) -> torch.nn.Module:
    """The case's model with seed-0 weights (the same every call)."""
    torch.manual_seed(0)
    return case.make()
