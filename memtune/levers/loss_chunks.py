"""A chunked loss: the output head and the loss computed over slices of the tokens, each
recomputed in backward, so that full logits never exist (:mod:`memtune.loss_chunking`).

Recorded where the model allows it (:func:`memtune.loss_chunking.support`): a forward that takes
``loss_chunks``, or a Hugging Face causal LM whose loss is the plain shifted cross-entropy. It
costs the head and loss forward once more, in backward.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

from memtune import loss_chunking

from .base import Applied, Lever, ProfileContext, count_or_none

DEFAULT_LOSS_CHUNKS = 8
"""Chunks a profile records when the space does not say."""


class LossChunksLever(Lever):
    name = "loss_chunks"
    default = None
    affects_step = True
    profile_on_demand = True
    supported_under_parallel = True
    """It changes only activations (the logits of one chunk at a time), which the per-rank model
    keeps as recorded; under FSDP2 the head is the root's, unsharded through backward."""
    legacy_hint = "allow_loss_chunking=True (head and loss in chunks)"
    numerics = "the same mean cross-entropy, summed in another order"

    def validate(self, value: Any) -> int | None:
        return count_or_none(self.name, value, minimum=2, none_means="the loss as the model computes it")

    def recorded_choices(self, space, ctx: ProfileContext) -> tuple:
        if ctx.loss_fn is not None or not loss_chunking.support(ctx.model):
            return (None,)  # the loss is the caller's, or the model's loss cannot be cut
        return super().recorded_choices(space, ctx)

    def default_space(self, ctx: ProfileContext) -> tuple:
        return (None, DEFAULT_LOSS_CHUNKS)

    def legacy_allowed(self, options) -> tuple | None:
        return None if options.allow_loss_chunking else (None,)

    @contextlib.contextmanager
    def recording(self, value, setup) -> Iterator[None]:
        loss_chunking.apply(setup.model, value)
        try:
            yield
        finally:
            loss_chunking.remove(setup.model)

    def cost(self, value, ctx) -> None:
        ctx.add_term(self.name, lambda c: c.outside_forward_s)  # the head and loss run again in backward

    def lossiness(self, value) -> int:
        return 1 if value is not None else 0

    def describe(self, value) -> str:
        return "the loss as the model computes it" if value is None else f"head and loss in {value} chunks"

    def apply(self, model, value, ctx) -> Applied:
        loss_chunking.apply(model, value)
        return _Chunked(model)


class _Chunked(Applied):
    def __init__(self, model):
        self.model = model

    def remove(self) -> None:
        loss_chunking.remove(self.model)
