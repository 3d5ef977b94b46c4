"""memtune's levers: the plan dimensions that change how a training step runs.

Each lever is one file here implementing :class:`~memtune.levers.base.Lever`, and one line of
:data:`LEVERS`. Everything else (the profiler, both planners, the infeasibility message,
``Plan.summary``, ``apply_plan``, the runtime, the CLI and sweeps) reads the registry.
docs/extending.md explains how to add one.
"""

from __future__ import annotations

from .base import NOTHING_APPLIED, Applied, Lever, ProfileContext, SwitchLever
from .in_backward import OptimizerInBackwardLever
from .loss_chunks import LossChunksLever
from .micro_batch import MicroBatchLever
from .state_offload import StateOffloadLever
from .weights import WeightsLever

LEVERS: dict[str, Lever] = {lever.name: lever for lever in (
    StateOffloadLever(),
    WeightsLever(),
    OptimizerInBackwardLever(),
    MicroBatchLever(),
    LossChunksLever(),
)}
"""Lever name -> lever. The order is the order of plan summaries and of the tie-break between
equally fast plans."""


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
    return {name: (lever.default,) for name, lever in LEVERS.items() if not lever.supported_under_parallel}


__all__ = ["Applied", "LEVERS", "Lever", "NOTHING_APPLIED", "ProfileContext", "SwitchLever", "check_variant",
           "compatible", "parallel_restrictions"]
