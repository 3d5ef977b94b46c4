"""``StepVariant``: one way of running the training step, the key of everything a lever changes.

A plan dimension that changes how the step runs (micro-batching, bf16 weights, the optimizer step
in backward, optimizer-state offload, a chunked loss...) is a *lever* (:mod:`memtune.levers`). A
``StepVariant`` names one choice per lever; levers left at their default are not stored, so the
profiled step is ``StepVariant()`` and no code asks lever by lever whether anything changed.

It keys the profile's step recordings (:class:`~memtune.profile.StepRecording`), its optimizer
recordings (:class:`~memtune.profile.OptimizerStepProfile`), the planners' configurations and
:class:`~memtune.plan.Plan`. A lever's choice reads as an attribute (``variant.loss_chunks``) or
an item (``variant["loss_chunks"]``). The fields are not declared one by one because a lever is
one file plus one registry line: a variant accepts the name of any registered lever.

    >>> v = StepVariant(micro_batch_size=4)
    >>> v.micro_batch_size, v.loss_chunks, v == StepVariant(micro_batch_size=4, loss_chunks=None)
    (4, None, True)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator


def _levers():
    from memtune.levers import LEVERS

    return LEVERS


@dataclass(frozen=True, slots=True, init=False, repr=False)
class StepVariant:
    choices: tuple[tuple[str, Any], ...]
    """(lever name, choice) of every lever not at its default, in :data:`memtune.levers.LEVERS` order."""

    def __init__(self, **choices: Any) -> None:
        levers = _levers()
        unknown = sorted(set(choices) - set(levers))
        if unknown:
            raise ValueError(f"StepVariant: unknown lever(s) {unknown}; the levers are {list(levers)}")
        items = []
        for name, lever in levers.items():
            if name in choices:
                value = lever.validate(choices[name])
                if value != lever.default:
                    items.append((name, value))
        object.__setattr__(self, "choices", tuple(items))

    # ------------------------------------------------------------------ reading
    def __getattr__(self, name: str) -> Any:  # only reached for names that are not slots
        if name.startswith("__"):
            raise AttributeError(name)
        lever = _levers().get(name)
        if lever is None:
            raise AttributeError(f"StepVariant has no lever {name!r}; the levers are {list(_levers())}")
        return self[name]

    def __getitem__(self, name: str) -> Any:
        for k, v in self.choices:
            if k == name:
                return v
        return _levers()[name].default

    def items(self) -> Iterator[tuple[str, Any]]:
        """(lever name, choice) for every registered lever, defaults included, in registry order."""
        for name in _levers():
            yield name, self[name]

    @property
    def is_default(self) -> bool:
        """The profiled step (every lever at its default)."""
        return not self.choices

    def replace(self, **changes: Any) -> "StepVariant":
        return StepVariant(**{**dict(self.choices), **changes})

    # ------------------------------------------------------------------ what a recording is keyed by
    def for_step(self) -> "StepVariant":
        """The key of the step recording that serves this variant: the levers that change the
        recorded training step, each as it is recorded (:meth:`memtune.levers.Lever.recorded_as`)."""
        levers = _levers()
        return StepVariant(**{k: levers[k].recorded_as(v) for k, v in self.choices if levers[k].affects_step})

    def for_optimizer(self) -> "StepVariant":
        """The part of the key of an optimizer recording this variant decides."""
        levers = _levers()
        return StepVariant(**{k: v for k, v in self.choices if levers[k].affects_optimizer})

    def order_key(self) -> tuple:
        """A total order over variants (every lever in registry order), for deterministic ties."""
        return tuple(lever.order_key(self[name]) for name, lever in _levers().items())

    # ------------------------------------------------------------------ JSON and words
    def to_dict(self) -> dict[str, Any]:
        levers = _levers()
        return {k: levers[k].encode(v) for k, v in self.choices}

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> "StepVariant":
        if d is None:
            return cls()
        if not isinstance(d, dict):
            raise ValueError(f"a step variant is a JSON object of lever choices, got {type(d).__name__}")
        levers = _levers()
        unknown = sorted(set(d) - set(levers))
        if unknown:
            raise ValueError(f"unknown lever(s) {unknown} in a step variant; this memtune knows {list(levers)}")
        return cls(**{k: levers[k].decode(v) for k, v in d.items()})

    def describe(self) -> str:
        """One clause per lever not at its default ("the profiled step" when none is)."""
        levers = _levers()
        return "; ".join(levers[k].describe(v) for k, v in self.choices) or "the profiled step"

    def __repr__(self) -> str:
        return "StepVariant(" + ", ".join(f"{k}={v!r}" for k, v in self.to_dict().items()) + ")"
