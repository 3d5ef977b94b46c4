"""The optimizer step in backward: each parameter is updated as soon as its gradient is complete,
and the gradient is freed, so full gradients never coexist.

Recorded with each gradient freed where it completes and a ``step`` event at that moment
(:data:`memtune.profile.StepEvent.PARAM_STEP`); the optimizer recordings step one parameter at a
time in that order and measure each update's temporaries. It excludes gradient accumulation and a
global gradient-norm clip (every gradient at once), and a step that fails in backward cannot be
retried: some parameters are already updated. The mechanism is
:class:`memtune.stepping.PlanOptimizer` (``register_post_accumulate_grad_hook``).
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

from memtune.profile import StepEvent

from .base import Applied, ProfileContext, SwitchLever

class OptimizerInBackwardLever(SwitchLever):
    name = "optimizer_in_backward"
    affects_step = True
    affects_optimizer = True
    wraps_optimizer = True
    lossless = True
    allows_global_grad_clip = False  # gradients are freed as they complete
    numerics = "none: each parameter takes the same update, earlier"
    legacy_hint = "allow_optimizer_in_backward=True (gradients freed as they complete)"
    record_hint = "the optimizer step in backward"

    def default_space(self, ctx: ProfileContext) -> tuple:
        return (False, True)

    def legacy_allowed(self, options) -> tuple | None:
        return None if options.allow_optimizer_in_backward else (False,)

    def compatible(self, value, variant) -> str:
        if value and variant.micro_batch_size is not None:
            return "the optimizer step in backward frees each gradient, so it cannot accumulate over micro-batches"
        return ""

    # ------------------------------------------------------------------ recording
    @contextlib.contextmanager
    def recording(self, value, setup) -> Iterator[None]:
        from memtune.step_recording import RecordingKind

        if setup.kind is RecordingKind.OPTIMIZER:
            setup.stepping["in_backward"] = True  # each parameter alone, in setup.order (backward's)
        else:
            setup.param_hooks.append(_free_gradients_as_they_complete)
        yield

    def cost(self, value, ctx) -> None:
        ctx.optimizer_overlaps_backward = True

    # ------------------------------------------------------------------ words
    def describe(self, value) -> str:
        return ("optimizer step in backward (gradients freed as they complete)" if value
                else "optimizer step after backward")

    # ------------------------------------------------------------------ runtime
    def apply(self, model, value, ctx) -> Applied:
        return _UpdatesInBackward()

    def stepping(self, value) -> dict[str, Any]:
        return {"in_backward": True}


class _UpdatesInBackward(Applied):
    retry_safe = False  # backward has updated parameters by the time it fails


def _free_gradients_as_they_complete(rec, params: dict) -> list:
    """Post-accumulate-grad hooks that mark where each parameter's update runs and free its
    gradient there, as a step in backward does (registered after the recorder counts gradients)."""
    from memtune.devices import round_allocation

    def freed(name):
        def hook(p):
            rec.mark(StepEvent.PARAM_STEP, name)
            rec.grad_bytes -= round_allocation(p.grad.untyped_storage().nbytes(), rec.granularity)
            p.grad = None
        return hook
    return [p.register_post_accumulate_grad_hook(freed(n)) for n, p in params.items() if p.requires_grad]
