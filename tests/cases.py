"""The test models of the profiler issue, each with a batch and a loss, small enough for CPU."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F

from memtune import zoo
from memtune.data import TextCorpus


@dataclass(frozen=True)
class Case:
    name: str
    make: Callable[[], torch.nn.Module]
    batch: Any
    loss_fn: Callable | None = None


class BNBlock(torch.nn.Module):
    """A residual Linear + BatchNorm1d block: batch norm writes its running statistics, and
    refuses a training batch of one sample."""

    def __init__(self, d: int):
        super().__init__()
        self.lin, self.bn = torch.nn.Linear(d, d), torch.nn.BatchNorm1d(d)

    def forward(self, x):
        return x + torch.relu(self.bn(self.lin(x)))


def bn_mlp() -> torch.nn.Module:
    """Three :class:`BNBlock` units of width 32 and a 10-way head, seeded."""
    torch.manual_seed(0)
    return torch.nn.Sequential(*(BNBlock(32) for _ in range(3)), torch.nn.Linear(32, 10))


def _tokens(batch_size: int = 8, block: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    return TextCorpus.load().batch("train", batch_size, block, generator=torch.Generator().manual_seed(0))


def _lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten())


def cases() -> dict[str, Case]:
    g = torch.Generator().manual_seed(0)
    x, y = _tokens()
    return {c.name: c for c in [
        Case("gpt", lambda: zoo.GPT(), (x, y)),
        Case("mlp", lambda: zoo.MLP(), (torch.randn(64, 64, generator=g), torch.randint(0, 10, (64,), generator=g)), F.cross_entropy),
        Case("cnn", lambda: zoo.ConvNet(), (torch.randn(16, 3, 32, 32, generator=g), torch.randint(0, 10, (16,), generator=g)), F.cross_entropy),
        Case("moe", lambda: zoo.MoE(), (x, y), _lm_loss),
        Case("branchy", lambda: zoo.Branchy(), (torch.randn(64, 32, generator=g), torch.randint(0, 10, (64,), generator=g)), F.cross_entropy),
        Case("hf_llama", lambda: zoo.hf_llama(), {"input_ids": x, "labels": y}),
        Case("hf_gpt2", lambda: zoo.hf_gpt2(), {"input_ids": x, "labels": y}),
    ]}
