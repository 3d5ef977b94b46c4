"""memtune's levers: the plan dimensions that change how a training step runs.

Each lever is one file here implementing :class:`~memtune.levers.base.Lever`, and one line of
:data:`LEVERS`. Everything else (the profiler, both planners, the infeasibility message,
``Plan.summary``, ``apply_plan``, the runtime, the CLI and sweeps) reads the registry.
docs/extending.md explains how to add one.
"""

from __future__ import annotations

import itertools
from typing import Callable, Mapping

from memtune.variant import StepVariant

from .base import NOTHING_APPLIED, Applied, Lever, ProfileContext, SwitchLever
from .in_backward import OptimizerInBackwardLever
from .loss_chunks import LossChunksLever
from .micro_batch import MicroBatchLever
from .state_offload import StateOffloadLever
from .weight_offload import WeightOffloadLever
from .weights import WeightsLever

LEVERS: dict[str, Lever] = {lever.name: lever for lever in (
    StateOffloadLever(),
    WeightOffloadLever(),
    WeightsLever(),
    OptimizerInBackwardLever(),
    MicroBatchLever(),
    LossChunksLever(),
)}
"""Lever name -> lever. The order is the order of plan summaries and of the tie-break between
equally fast plans."""


def combinations(choices: Mapping[str, tuple]) -> list[StepVariant]:
    """Every step variant whose choices come from ``choices`` (lever name -> its choices, one
    entry per lever in registry order), less the combinations that cannot run together."""
    names = list(choices)
    variants = (StepVariant(**dict(zip(names, combo))) for combo in itertools.product(*choices.values()))
    return [v for v in variants if compatible(v)]


def held_at_default(keep: Callable[[Lever], bool]) -> dict[str, tuple]:
    """``levers`` entries (of :class:`~memtune.PlanSpace` or ``PlannerOptions``) that hold every
    lever ``keep`` selects at its default."""
    return {name: (lever.default,) for name, lever in LEVERS.items() if keep(lever)}


def check_variant(variant) -> None:
    """Raise ``ValueError`` when two choices of ``variant`` cannot run together."""
    for name, value in variant.choices:
        why = LEVERS[name].compatible(value, variant)
        if why:
            raise ValueError(f"{variant!r} cannot run: {why}")


def compatible(variant) -> bool:
    return not any(LEVERS[name].compatible(value, variant) for name, value in variant.choices)


def parallel_restrictions() -> dict[str, tuple]:
    """``PlannerOptions.levers`` entries that keep every lever that does not run across
    data-parallel ranks at its default: the one statement of what distributed plans leave out."""
    return held_at_default(lambda lever: not lever.supported_under_parallel)


__all__ = ["Applied", "LEVERS", "Lever", "NOTHING_APPLIED", "ProfileContext", "SwitchLever", "check_variant",
           "combinations", "compatible", "held_at_default", "parallel_restrictions"]
