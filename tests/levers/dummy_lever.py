"""A lever added from outside the library, as docs/extending.md describes: one file plus one
registry line (``LEVERS["freeze_embeddings"] = FreezeEmbeddingsLever()``, done by the tests).

``freeze_embeddings``: the embedding tables are not trained, so they get no gradient and no
optimizer state (a real fine-tuning technique). It changes what trains, so it is lossy, and a
sweep may search it.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch.nn as nn

from memtune.levers import Applied, SwitchLever


def embedding_parameters(model: nn.Module) -> set[str]:
    """FQNs of the parameters of the model's ``nn.Embedding`` tables (tied ones under their first name)."""
    owned = {id(p) for m in model.modules() if isinstance(m, nn.Embedding) for p in m.parameters(recurse=False)}
    return {n for n, p in model.named_parameters() if id(p) in owned}


class FreezeEmbeddingsLever(SwitchLever):
    name = "freeze_embeddings"
    affects_step = True          # the tables get no gradient
    affects_optimizer = True     # nor optimizer state
    searchable = True            # it changes what trains: a sweep judges it
    numerics = "the embedding tables stay as initialised"

    def default_space(self, ctx) -> tuple:
        return (False, True) if embedding_parameters(ctx.model) else (False,)

    @contextlib.contextmanager
    def recording(self, value, setup) -> Iterator[None]:
        frozen = embedding_parameters(setup.model)
        setup.params = {n: setup.make_param(p, p.dtype).requires_grad_(False) if n in frozen else p
                        for n, p in setup.params.items()}
        yield

    def lossiness(self, value) -> int:
        return 5 if value else 0

    def describe(self, value) -> str:
        return "embedding tables frozen" if value else "embedding tables trained"

    def apply(self, model, value, ctx) -> Applied:
        return _Frozen(model)


class _Frozen(Applied):
    def __init__(self, model: nn.Module):
        self.params = [p for n, p in model.named_parameters() if n in embedding_parameters(model) and p.requires_grad]
        for p in self.params:
            p.requires_grad_(False)

    def remove(self) -> None:
        for p in self.params:
            p.requires_grad_(True)
