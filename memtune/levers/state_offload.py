"""Optimizer-state offload: the state lives in (pinned) host memory and each parameter's state is
copied to the device just before its update and back just after, so the device holds one
parameter's state at a time.

It changes only the optimizer step, which the optimizer recordings measure (host copies are not
counted against the device on a CUDA target). On a CPU target host memory *is* the device, so it
is recorded and planned only for other targets. The copies cross the host link twice per step;
stepped in backward they overlap the rest of backward. The mechanism is
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

    def default_space(self, ctx: ProfileContext) -> tuple:
        return (False, True) if ctx.target_kind != "cpu" else (False,)

    def legacy_allowed(self, options) -> tuple | None:
        return None if options.allow_state_offload else (False,)

    def plan_choices(self, profile, options, recorded: tuple) -> tuple:
        if profile.target == "cpu" and options.lever_choices(self.name) is None:
            return (False,)  # host memory is the budget: moving state there frees nothing (unless asked)
        return super().plan_choices(profile, options, recorded)

    @contextlib.contextmanager
    def recording(self, value, setup) -> Iterator[None]:
        setup.stepping["offload"] = True
        yield

    def cost(self, value, ctx) -> None:
        def exposed_seconds(c) -> float:
            traffic = 2 * c.state_link_bytes() / c.host_bandwidth  # to the device and back
            return max(0.0, traffic - c.backward_s) if c.optimizer_overlaps_backward else traffic
        ctx.add_term(self.name, exposed_seconds)

    def describe(self, value) -> str:
        return "optimizer state in host memory" if value else "optimizer state on the device"

    def suggest(self, profile, options, recorded) -> str | None:
        return None if profile.target == "cpu" else super().suggest(profile, options, recorded)

    def stepping(self, value) -> dict[str, Any]:
        return {"offload": True}
