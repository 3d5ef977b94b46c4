"""Optimizer-state offload: the state (all of it, or a share: ``state_offload=0.5`` keeps the
state of the parameters updated first in backward on the device) lives in (pinned) host memory
and streams through the device one parameter at a time: the next parameter's state is fetched while one updates, and the
last one's written back meanwhile, on separate copy engines.

It changes only the optimizer step, which the optimizer recordings measure, the stream's
buffers included (host copies are not counted against the device on a CUDA target). On a CPU
target host memory *is* the device, so it is recorded and planned only for other targets. Its
price is a timeline of the stream against backward and the updates
(:func:`memtune.cost_model.state_stream_seconds`). The mechanism is
:class:`memtune.stepping.PlanOptimizer`.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

from .base import ProfileContext, SwitchLever


class StateOffloadLever(SwitchLever):
    name = "state_offload"
    affects_step = False
    affects_optimizer = True
    wraps_optimizer = True
    lossless = True
    numerics = "none: the state is copied, not changed"
    legacy_hint = "allow_state_offload=True (optimizer state in host memory)"
    record_hint = "optimizer-state offload"

    def validate(self, value):
        """``False`` (on the device), ``True`` (all in host memory), or the share of the state (by
        elements) in host memory, between 0 and 1: the parameters updated first in backward keep
        theirs on the device (:func:`memtune.stepping.resident_names`)."""
        if isinstance(value, bool):
            return value
        if isinstance(value, (int, float)) and 0 <= value <= 1:
            return True if value == 1 else False if value == 0 else float(value)
        raise ValueError(f"{self.name}={value!r}: use True, False, or the share of the state in host memory (0-1)")

    def default_space(self, ctx: ProfileContext) -> tuple:
        # A share (0.5, ...) is recorded when asked for: each adds every offloaded optimizer
        # recording again (Llama-2-7B's profile: 60 s -> 106 s with 0.5), and at 24-40GB for 7B
        # the planner never took it (docs/planners.md, "The state stream").
        return (False, True) if ctx.target_kind != "cpu" else (False,)

    def legacy_allowed(self, options) -> tuple | None:
        return None if options.allow_state_offload else (False,)

    def plan_choices(self, profile, options, recorded: tuple) -> tuple:
        if profile.target == "cpu" and options.lever_choices(self.name) is None:
            return (False,)  # host memory is the budget: moving state there frees nothing (unless asked)
        return super().plan_choices(profile, options, recorded)

    @contextlib.contextmanager
    def recording(self, value, setup) -> Iterator[None]:
        setup.stepping["offload"] = value
        yield

    def cost(self, value, ctx) -> None:
        from memtune.cost_model import state_stream_seconds

        # The stream's timeline: what cannot hide.
        ctx.add_term(self.name, lambda c: state_stream_seconds(c, offloaded_share=value))

    def describe(self, value) -> str:
        if value is True:
            return "optimizer state in host memory"
        if value:
            return f"{value:.0%} of the optimizer state in host memory (the rest, updated first, on the device)"
        return "optimizer state on the device"

    def suggest(self, profile, options, recorded) -> str | None:
        return None if profile.target == "cpu" else super().suggest(profile, options, recorded)

    def stepping(self, value) -> dict[str, Any]:
        return {"offload": value}
