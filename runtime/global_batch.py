"""A fixed global batch: the loader's batches, gathered or cut into batches of exactly N samples.

``memtune.fit(model, budget, global_batch=N)`` trains on N samples per optimizer step,
whatever the loader yields: consecutive loader batches are concatenated along dimension 0 and
cut at every N samples, the remainder carried into the next global batch (across epochs too).
The plan then chooses how to run those N samples (micro-batch size × accumulation × the other
levers); a re-plan after an out-of-memory error or a telemetry change sees the same N-sample
batches, so the global batch, and with it the learning rate and the maths, never change.

The loss of a step is the mean of its micro-batches' losses weighted by their sample counts,
the full batch's loss up to summation order when the loss is a mean over samples (or over
tokens, with the same number of counted tokens per sample). A token-weighted loss over padded
sequences (``ignore_index`` tokens) is averaged per micro-batch, then weighted by samples: that
differs from the full batch's token mean when micro-batches hold different numbers of counted
tokens. Return a per-sample mean from ``loss_fn`` for exact equality there.

Samples at the end of the data that do not fill a global batch are not trained on (as
``drop_last=True``), with an event saying how many. A resume continues from sample
``batches_seen × N`` of the loader's stream, so it continues exactly where the run stopped.
"""

from __future__ import annotations

from typing import Any, Iterable, Iterator

import torch
from torch.utils._pytree import tree_flatten, tree_unflatten

from memtune.batching import batch_size_of
from memtune.errors import UsageError


def check_global_batch(value: Any) -> int | None:
    """``value`` as a global batch size (``None``: the loader's batches as they come)."""
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise UsageError(f"global_batch={value!r}: give a whole number of samples per optimizer step, >= 1 "
                         "(or None to train on the loader's batches as they come)")
    return value


def local_share(global_batch: int, world_size: int) -> int:
    """The samples each of ``world_size`` ranks feeds per step, for ``global_batch`` in all."""
    if global_batch % world_size:
        raise UsageError(f"global_batch={global_batch} does not divide among {world_size} ranks; give a multiple of "
                         f"{world_size}, so that every rank feeds the same number of samples")
    return global_batch // world_size


def regroup(batches: Iterable[Any], size: int, *, skip_samples: int = 0,
            on_remainder=None) -> Iterator[Any]:
    """Batches of exactly ``size`` samples from ``batches`` (concatenated and cut along dim 0),
    after skipping the first ``skip_samples``; ``on_remainder(n)`` is told of the ``n < size``
    samples left at the end, which are not yielded."""
    held: list[Any] = []
    count = 0
    for batch in batches:
        n = batch_size_of(batch)
        if n is None:
            raise UsageError("global_batch needs batches with a batch dimension (tensors whose dim 0 counts samples); "
                             f"this batch holds no tensor with one")
        if skip_samples:
            if n <= skip_samples:
                skip_samples -= n
                continue
            batch, n, skip_samples = _slice(batch, skip_samples, n), n - skip_samples, 0
        held.append(batch)
        count += n
        while count >= size:
            whole = concat(held) if len(held) > 1 else held[0]
            total = count
            yield _slice(whole, 0, size, total) if total > size else whole
            rest = total - size
            held, count = ([_slice(whole, size, total, total)] if rest else []), rest
    if count and on_remainder is not None:
        on_remainder(count)


def _slice(batch: Any, start: int, stop: int, n: int | None = None) -> Any:
    """Samples ``start:stop`` of ``batch`` (its tensors whose dim 0 is the batch's ``n``)."""
    n = batch_size_of(batch) if n is None else n
    leaves, spec = tree_flatten(batch)
    return tree_unflatten([t[start:stop] if isinstance(t, torch.Tensor) and t.dim() > 0 and t.shape[0] == n else t
                           for t in leaves], spec)


def concat(batches: list[Any]) -> Any:
    """``batches`` (the same structure each) joined along dim 0; leaves that are not per-sample
    (no batch dimension) must be equal and are kept once."""
    flat = [tree_flatten(b) for b in batches]
    spec = flat[0][1]
    if any(s != spec for _, s in flat[1:]):
        raise UsageError("global_batch gathers consecutive loader batches into one, but they differ in structure "
                         "(other keys or nesting); give batches of one structure")
    sizes = [batch_size_of(b) for b in batches]
    out = []
    for i, first in enumerate(flat[0][0]):
        column = [leaves[i] for leaves, _ in flat]
        if isinstance(first, torch.Tensor) and first.dim() > 0 and all(
                isinstance(t, torch.Tensor) and t.dim() > 0 and t.shape[0] == n for t, n in zip(column, sizes)):
            shapes = {tuple(t.shape[1:]) for t in column}
            if len(shapes) > 1:
                raise UsageError(f"global_batch gathers consecutive loader batches into one, but their tensors differ "
                                 f"beyond the batch dimension ({' vs '.join(map(str, sorted(shapes)))}); pad every "
                                 "batch to one length (e.g. the collate function's padding='max_length')")
            out.append(torch.cat(column))
        else:
            out.append(first)
    return tree_unflatten(out, spec)
