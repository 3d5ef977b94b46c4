"""A real English text corpus that every Python installation carries, as byte tokens.

Source: ``pydoc_data.topics``, the help topics of the Python Language Reference that
CPython ships in its standard library (about 465 KB of prose and grammar; PSF License
Version 2, the licence of the Python documentation). It is read from the interpreter
at hand, so no download is needed, on a laptop, in CI or on a GPU machine.

Tokens are raw UTF-8 bytes (vocabulary 256), which keeps the models small and the
pipeline free of a tokenizer download.

    >>> from memtune.data import TextCorpus
    >>> corpus = TextCorpus.load()
    >>> x, y = corpus.batch("train", batch_size=8, block_size=64, generator=torch.Generator().manual_seed(0))
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import torch

VOCAB_SIZE = 256
SOURCE = "pydoc_data.topics (CPython standard library, Python Language Reference help topics; PSF License v2)"


def corpus_text() -> str:
    """The corpus as one string: every help topic, in sorted topic order."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics))


@dataclass(frozen=True)
class TextCorpus:
    """Byte tokens split 90/10 into train and validation (the split is by position, so the
    validation text is unseen prose, not shuffled neighbours of training windows)."""

    train: torch.Tensor
    val: torch.Tensor

    @classmethod
    def load(cls, val_fraction: float = 0.1) -> "TextCorpus":
        data = torch.frombuffer(bytearray(corpus_text().encode("utf-8")), dtype=torch.uint8).long()
        n_val = int(len(data) * val_fraction)
        return cls(train=data[:-n_val], val=data[-n_val:])

    def batch(self, split: str, batch_size: int, block_size: int, *, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Random windows: inputs ``(B, T)`` and next-byte targets ``(B, T)``."""
        data = {"train": self.train, "val": self.val}[split]
        starts = torch.randint(len(data) - block_size - 1, (batch_size,), generator=generator)
        offs = torch.arange(block_size)
        x = data[starts[:, None] + offs]
        y = data[starts[:, None] + offs + 1]
        return x, y

    def batches(self, split: str, batch_size: int, block_size: int, *, seed: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """An endless, seeded stream of :meth:`batch` draws."""
        g = torch.Generator().manual_seed(seed)
        while True:
            yield self.batch(split, batch_size, block_size, generator=g)

    def eval_batches(self, batch_size: int, block_size: int, n_batches: int, *, split: str = "val") -> list[tuple[torch.Tensor, torch.Tensor]]:
        """A fixed set of evenly spaced windows, so every run is scored on the same text."""
        data = {"train": self.train, "val": self.val}[split]
        n = batch_size * n_batches
        starts = torch.linspace(0, len(data) - block_size - 2, n).long()
        offs = torch.arange(block_size)
        xs, ys = data[starts[:, None] + offs], data[starts[:, None] + offs + 1]
        return [(xs[i : i + batch_size], ys[i : i + batch_size]) for i in range(0, n, batch_size)]
