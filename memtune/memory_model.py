"""``memtune.predict_peak``: the peak memory of a training step under a plan.

A thin front end over :mod:`memtune.timeline`, the one home of the step-memory rules: it picks
the recorded step the plan replays (the recording of its step variant), the plan's recorded
optimizer configuration, and evaluates the timeline's peak rows with the plan's unit decisions.
Nothing is estimated from a formula: every term comes from a step recorded under fake tensors
(docs/profiler.md).
"""

from __future__ import annotations

from .errors import UnrecordedPlanError
from .plan import MemoryBreakdown, Plan
from .profile import ModelProfile
from .timeline import OptimizerMemory, optimizer_memory, plan_optimizer_memory, plan_recording, timeline_model

__all__ = ["OptimizerMemory", "UnrecordedPlanError", "optimizer_memory", "predict_peak"]


def predict_peak(profile: ModelProfile, plan: Plan, *, reserve_bytes: int | None = None) -> MemoryBreakdown:
    """Predicted peak memory of one training step of ``profile``'s model under ``plan``.

    Raises :class:`UnrecordedPlanError` when the plan needs an optimizer configuration or a
    step variant the profile did not record."""
    recording = plan_recording(profile, plan)
    tm = timeline_model(recording)
    cc = tm.constants(plan_optimizer_memory(recording, plan))
    x, r, s = tm.indicators(plan.decisions, plan.save_ops)
    reserve = reserve_bytes if reserve_bytes is not None else plan.budget_bytes - plan.usable_bytes
    return tm.breakdown(cc, x, r, s, reserve_bytes=reserve)
