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

from .base import Lever, ProfileContext


class StateOffloadLever(Lever):
    name = "state_offload"
    default = False
    affects_step = False
    affects_optimizer = True
    wraps_optimizer = True
    lossless = True
    numerics = "none: the state is copied, not changed"

    def validate(self, value: Any) -> bool:
        if not isinstance(value, bool):
            raise ValueError(f"state_offload={value!r}: use True or False")
        return value

    def recorded_choices(self, space, ctx: ProfileContext) -> tuple:
        if ctx.custom_optimizer:
            return (False,)
        requested = space.lever_choices(self.name)
        if requested is None:
            return (False, True) if ctx.target_kind != "cpu" else (False,)
        return tuple(dict.fromkeys((False, *map(self.validate, requested))))

    def allowed(self, options) -> tuple | None:
        explicit = options.lever_choices(self.name)
        if explicit is not None:
            return tuple(map(self.validate, explicit))
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
        if profile.target == "cpu":
            return None
        allowed = self.allowed(options)
        if True not in recorded and (allowed is None or True in allowed):
            return (f"optimizer-state offload (profile with space=memtune.PlanSpace(levers="
                    f"{{'{self.name}': (False, True)}}))")
        return super().suggest(profile, options, recorded if True in recorded else (False, True))

    def allow_hint(self, options, choices) -> str:
        if options.lever_choices(self.name) is None:
            return "allow_state_offload=True (optimizer state in host memory)"
        return super().allow_hint(options, choices)

    def stepping(self, value) -> dict[str, Any]:
        return {"offload": True}
