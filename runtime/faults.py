"""Test hooks: faults injected into a trainer's steps, as the allocator would raise them.

:meth:`memtune.runtime.trainer.Trainer.inject_oom` registers an :class:`OOMInjection` as a
listener of the step runner's phase changes (:class:`~memtune.runtime.step.TrainerPhase`), so
the step itself carries no test code.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .step import TrainerPhase


@dataclass
class OOMInjection:
    """Raise ``torch.OutOfMemoryError`` at optimizer step ``step`` (0-based) when the step enters
    ``phase`` (forward or backward), ``times`` times in a row."""

    step: int
    phase: TrainerPhase = TrainerPhase.BACKWARD
    times: int = 1

    def __post_init__(self) -> None:
        self.phase = TrainerPhase(self.phase)
        if self.phase not in (TrainerPhase.FORWARD, TrainerPhase.BACKWARD):
            raise ValueError("phase must be 'forward' or 'backward'")

    def __call__(self, phase: TrainerPhase, step: int) -> None:
        if step == self.step and phase is self.phase and self.times > 0:
            self.times -= 1
            raise torch.OutOfMemoryError(f"injected out-of-memory error at step {self.step} ({self.phase.value})")
