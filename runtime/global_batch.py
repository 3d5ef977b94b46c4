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

import dataclasses
import math
from typing import Any, Callable, Iterable, Iterator

import torch
from torch.utils._pytree import tree_flatten, tree_unflatten

from memtune.batching import batch_size_of, slice_batch
from memtune.errors import UsageError


def check_global_batch(value: Any) -> int | str | None:
    """``value`` as a global batch size (``None``: the loader's batches as they come; ``"auto"``:
    grown toward the critical batch size, :class:`AutoBatch`)."""
    if value is None or value == "auto":
        return value
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise UsageError(f"global_batch={value!r}: give a whole number of samples per optimizer step, >= 1, 'auto' "
                         "(grown toward the measured critical batch size), or None (the loader's batches as they come)")
    return value


def local_share(global_batch: int, world_size: int) -> int:
    """The samples each of ``world_size`` ranks feeds per step, for ``global_batch`` in all."""
    if global_batch % world_size:
        raise UsageError(f"global_batch={global_batch} does not divide among {world_size} ranks; give a multiple of "
                         f"{world_size}, so that every rank feeds the same number of samples")
    return global_batch // world_size


def regroup(batches: Iterable[Any], size: int | Callable[[], int], *, skip_samples: int = 0,
            on_remainder=None) -> Iterator[Any]:
    """Batches of exactly ``size`` samples from ``batches`` (concatenated and cut along dim 0),
    after skipping the first ``skip_samples``; ``on_remainder(n)`` is told of the ``n < size``
    samples left at the end, which are not yielded. ``size`` may be a function, read before
    each batch is cut (a global batch that grows)."""
    if not callable(size):
        size = (lambda n: lambda: n)(size)
    held: list[Any] = []
    count = 0
    for batch in batches:
        n = batch_size_of(batch)
        if n is None:
            raise UsageError("global_batch needs batches with a batch dimension (tensors whose dim 0 counts samples); "
                             "this batch holds no tensor with one")
        if skip_samples:
            if n <= skip_samples:
                skip_samples -= n
                continue
            batch, n, skip_samples = slice_batch(batch, skip_samples, n), n - skip_samples, 0
        held.append(batch)
        count += n
        while count >= (n_out := size()):
            whole = concat(held) if len(held) > 1 else held[0]
            yield slice_batch(whole, 0, n_out, count) if count > n_out else whole
            held = [slice_batch(whole, n_out, count, count)] if count > n_out else []
            count -= n_out
    if count and on_remainder is not None:
        on_remainder(count)


def concat(batches: list[Any]) -> Any:
    """``batches`` (the same structure each) joined along dim 0; leaves that are not per-sample
    (no batch dimension) are taken from the first batch."""
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


# ----------------------------------------------------------------------------- global_batch="auto"
class NoiseScale:
    """The gradient noise scale B_noise = tr(Σ) / |G|² (McCandlish et al. 2018, "An empirical
    model of large-batch training"), measured from two batch sizes of one step.

    Of a step's N samples, the first micro-batch's b samples give |G_b|² and the whole step's
    gradient |G_N|². Since E|G_B|² = |G|² + tr(Σ)/B, the unbiased estimates are
    |G|² ≈ (N|G_N|² − b|G_b|²)/(N − b) and tr(Σ) ≈ (|G_b|² − |G_N|²)/(1/b − 1/N). Each is
    noisy, so each is smoothed (an exponential moving average with ``decay``) before the ratio
    is taken, as the paper's Appendix A does. The averages start from zero and are divided by
    ``1 − decay^count``, as Adam's moments are: an average seeded with the first reading would
    weigh that reading, the noisiest of a run, 0.66 after five steps instead of 0.16."""

    def __init__(self, decay: float = 0.9):
        self.decay = decay
        self.g2_ema = 0.0
        self.trace_ema = 0.0
        self.count = 0

    def observe(self, small_sq: float, small: int, big_sq: float, big: int) -> None:
        """One step: ``small_sq`` = |G_small|² over ``small`` samples, ``big_sq`` = |G_big|² over ``big``."""
        if not (0 < small < big) or not (math.isfinite(small_sq) and math.isfinite(big_sq)):
            return
        g2 = (big * big_sq - small * small_sq) / (big - small)
        trace = (small_sq - big_sq) / (1.0 / small - 1.0 / big)
        d = self.decay
        self.g2_ema = d * self.g2_ema + (1 - d) * g2
        self.trace_ema = d * self.trace_ema + (1 - d) * trace
        self.count += 1

    @property
    def g2(self) -> float | None:
        """The smoothed |G|² (``None`` before any measurement)."""
        return self.g2_ema / (1 - self.decay ** self.count) if self.count else None

    @property
    def trace(self) -> float | None:
        """The smoothed tr(Σ) (``None`` before any measurement)."""
        return self.trace_ema / (1 - self.decay ** self.count) if self.count else None

    @property
    def b_noise(self) -> float | None:
        """The smoothed estimate; ``inf`` while the noise is measurable but the smoothed |G|² is
        not yet (the signal is below the measurement's noise: the noise scale is far above both
        batch sizes); ``None`` before any measurement, or when neither is positive."""
        g2, trace = self.g2, self.trace
        if g2 is None or trace is None:
            return None
        if g2 <= 0:
            return math.inf if trace > 0 else None
        return max(trace, 0.0) / g2

    def state_dict(self) -> dict:
        return {"decay": self.decay, "g2_ema": self.g2_ema, "trace_ema": self.trace_ema, "count": self.count}

    def load_state_dict(self, d: dict) -> None:
        self.decay, self.count = float(d["decay"]), int(d["count"])
        if "g2_ema" in d:
            self.g2_ema, self.trace_ema = float(d["g2_ema"]), float(d["trace_ema"])
        else:   # written before the averages were bias-corrected: g2 and trace were the estimates
            scale = 1 - self.decay ** self.count
            self.g2_ema = (d["g2"] or 0.0) * scale
            self.trace_ema = (d["trace"] or 0.0) * scale


@dataclasses.dataclass
class AutoBatchConfig:
    """How ``global_batch="auto"`` grows the batch (:class:`AutoBatch`)."""

    start: int | None = None
    """The first global batch; ``None``: the loader's first batch size."""
    max_global_batch: int = 1 << 16
    """Never above this many samples per step."""
    warmup_steps: int = 20
    """Measurements before the first decision (the estimate is noisy early, and early in training)."""
    interval: int = 20
    """Steps between decisions."""
    growth: int = 2
    """The factor of each growth step."""
    confirm_steps: int = 5
    """Consecutive measurements that must each support a growth before it is made: one noisy
    estimate (early in training the smoothed |G|² can dip below its noise and read as an
    infinite B_noise) does not move the batch."""
    lr_rule: str = "sqrt"
    """How learning rates follow the batch: ``"sqrt"`` (lr ∝ √B) or ``"none"``."""

    def __post_init__(self) -> None:
        for name in ("max_global_batch", "warmup_steps", "interval", "confirm_steps"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise UsageError(f"AutoBatchConfig.{name}={v!r}: give a whole number >= 1")
        if self.start is not None:
            check_global_batch(self.start)
        if not isinstance(self.growth, int) or self.growth < 2:
            raise UsageError(f"AutoBatchConfig.growth={self.growth!r}: give a whole factor >= 2")
        if self.lr_rule not in LR_RULES:
            raise UsageError(f"AutoBatchConfig.lr_rule={self.lr_rule!r}: use one of {LR_RULES}")


LR_RULES = ("sqrt", "none")


class AutoBatch:
    """The schedule of ``global_batch="auto"``: the global batch grows by ``growth`` toward the
    measured critical batch size, never above it, every ``interval`` steps after ``warmup_steps``.

    A larger batch is taken only when the gradient noise scale says the samples would not be
    wasted (B_noise ≥ growth × B: McCandlish et al. find the data-efficient batch near B_noise;
    above it, more samples per step buy little more progress per step). Memory is not a limit
    (the plan accumulates micro-batches), and the runtime keeps a growth only if the new plan's
    predicted samples per second are no lower than the old one's.

    Learning rates follow ``lr_rule``. ``"sqrt"`` (the default) multiplies every learning rate by
    √(B'/B): the square-root rule that the SDE analysis of adaptive methods (Malladi et al. 2022,
    "On the SDEs and Scaling Rules for Adaptive Gradient Algorithms") derives for Adam, whose
    per-coordinate normalization makes the update's size independent of the gradient's scale.
    Muon and Muon² normalize each matrix's update (orthogonalization), the same property, so the
    same rule is used for them. The linear rule of SGD (Goyal et al. 2017) would overshoot
    for both."""

    def __init__(self, config: AutoBatchConfig, start: int):
        self.config = config
        self.global_batch = start
        self.noise = NoiseScale()
        self.last_change = 0
        self.support = 0
        """Consecutive measurements, up to now, whose estimate supports the next growth."""
        self.stopped: str | None = None
        """Why growing stopped for good (throughput, the maximum), or ``None``."""

    def next_size(self) -> int:
        return min(self.global_batch * self.config.growth, self.config.max_global_batch)

    def observe(self, small_sq: float, small: int, big_sq: float, big: int) -> None:
        """One step's two gradient norms (:meth:`NoiseScale.observe`); counts whether the
        smoothed estimate now supports the next growth. An infinite estimate (the signal not yet
        resolved) supports it only after the warm-up."""
        self.noise.observe(small_sq, small, big_sq, big)
        b = self.noise.b_noise
        ok = b is not None and b >= self.next_size() and (math.isfinite(b) or self.noise.count >= self.config.warmup_steps)
        self.support = self.support + 1 if ok else 0

    def decide(self, step: int) -> int | None:
        """The next global batch at ``step``, or ``None`` to keep the current one."""
        c = self.config
        if self.stopped or self.noise.count < c.warmup_steps or step - self.last_change < c.interval:
            return None
        new = self.next_size()
        # support counts only readings with B_noise >= new (confirm_steps >= 1): no need to read it again
        if new <= self.global_batch or self.support < c.confirm_steps:
            return None
        return new

    def lr_factor(self, old: int, new: int) -> float:
        return math.sqrt(new / old) if self.config.lr_rule == "sqrt" else 1.0

    def state_dict(self) -> dict:
        return {"global_batch": self.global_batch, "noise": self.noise.state_dict(), "last_change": self.last_change,
                "stopped": self.stopped, "support": self.support}

    @staticmethod
    def is_state(d: Any) -> bool:
        """Whether ``d`` is what :meth:`state_dict` writes (a checkpoint's contents are checked
        before anything is restored)."""
        def count(v, low=0):
            return type(v) is int and v >= low

        def number(v):
            return v is None or (isinstance(v, float) and math.isfinite(v))
        if not (isinstance(d, dict) and count(d.get("global_batch"), 1) and count(d.get("last_change"))
                and count(d.get("support", 0)) and d.get("stopped") in (None, "throughput")
                and isinstance(d.get("noise"), dict)):
            return False
        n = d["noise"]
        keys = ("g2_ema", "trace_ema") if "g2_ema" in n else ("g2", "trace")
        return (isinstance(n.get("decay"), float) and 0 <= n["decay"] < 1 and number(n.get(keys[0]))
                and number(n.get(keys[1])) and count(n.get("count")))

    def load_state_dict(self, d: dict) -> None:
        self.global_batch = int(d["global_batch"])
        self.noise.load_state_dict(d["noise"])
        self.last_change, self.stopped = int(d["last_change"]), d["stopped"]
        self.support = int(d.get("support", 0))   # checkpoints before confirm_steps lack it
