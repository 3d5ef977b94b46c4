"""Micro-batching: the global batch in smaller pieces, with the gradients accumulated over them.

The step is recorded at each micro-batch size in gradient-accumulation mode: the gradients of
the earlier micro-batches exist from the start and backward adds into them, exactly as the
runtime's loop does (``(loss * weight).backward()`` per micro-batch, then one optimizer step).
Activations scale with the micro-batch; every kernel launches once per micro-batch.

For most models that is the full batch's gradient summed in another order (lossiness 1). Not
for a model with stateful layers (:func:`batch_dependent`): batch norm in training normalizes
each micro-batch by its own statistics and updates its running statistics once per
micro-batch, and any module that writes a buffer per call counts the micro-batches. That is
another model, so for such a model the planner (a) never takes micro-batching unless it is asked
for by size (``levers={"micro_batch_size": (None, 4, 2)}``; ``allow_microbatching`` alone does
not), and (b) ranks it at lossiness :data:`BATCH_DEPENDENT_LOSSINESS`, above lower state
precision, so that an exact plan is preferred whenever one is at most ``max_lossless_slowdown``
slower. A global batch larger than the profiled one is accumulated as the caller asked.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

from memtune.errors import UnrecordedPlanError

from .base import Applied, Lever, ProfileContext, count_or_none

BATCH_DEPENDENT_LOSSINESS = 4
"""Lossiness of micro-batching a model with stateful layers: it changes what the model computes
(as bf16 weights with stochastic rounding change every update), not the order of a sum."""


def batch_dependent(profile) -> tuple[str, ...]:
    """FQNs of the modules of ``profile`` whose numbers depend on how the batch is cut: those
    with statistics over the batch (``profile.batch_statistics``) and those owning a buffer the
    step writes (``profile.written_buffers``: one update, or one count, per micro-batch)."""
    owners = (name.rpartition(".")[0] or "(model)" for name in profile.written_buffers)
    return tuple(dict.fromkeys((*profile.batch_statistics, *owners)))


class MicroBatchLever(Lever):
    name = "micro_batch_size"
    default = None
    affects_step = True
    searchable = True
    supported_under_parallel = True
    """Across ranks each rank splits its local batch. Under FSDP2 every micro-batch's backward
    reduce-scatters, so the accumulated gradients stay shards (the per-rank rewrite,
    :mod:`memtune.distributed.memory`); under DDP the gradients are synchronized only on the last
    micro-batch (``no_sync``), in the buckets they live in anyway."""
    legacy_hint = "allow_microbatching=True (smaller micro-batches with gradient accumulation)"
    numerics = ("the same gradient, summed over the micro-batches in another order; but with stateful layers "
                "(batch norm in training, buffers written per call) statistics are taken and buffers updated per "
                "micro-batch: lossy, and planned only when its sizes are listed in levers")

    def validate(self, value: Any) -> int | None:
        return count_or_none(self.name, value, minimum=1, none_means="the whole batch")

    # ------------------------------------------------------------------ what to record
    def recorded_choices(self, space, ctx: ProfileContext) -> tuple:
        B = ctx.batch_size
        requested = space.lever_choices(self.name)
        if not B or B < 2:
            return (None,)
        if requested is not None:
            sizes = [self.validate(m) for m in requested if m is not None]
            bad = [m for m in sizes if m > B or B % m]
            if bad:
                raise ValueError(f"PlanSpace: micro-batch sizes {bad} do not divide the batch of {B}")
            return (None, *sorted(set(sizes), reverse=True))
        sizes, m = [], B  # the batch halved while it divides evenly, and 1 (8 -> 4, 2, 1)
        while m % 2 == 0 and m > 1:
            m //= 2
            sizes.append(m)
        if 1 not in sizes:
            sizes.append(1)
        return (None, *sizes)

    # ------------------------------------------------------------------ what to plan
    def legacy_allowed(self, options) -> tuple | None:
        if not options.allow_microbatching:
            return (None,)
        return None if options.micro_batch_sizes is None else (None, *map(self.validate, options.micro_batch_sizes))

    def plan_choices(self, profile, options, recorded: tuple) -> tuple:
        """Micro-batch sizes that divide the global batch and were recorded (the whole batch is
        ``None``). An explicit size the profile did not record is an error, not a silent skip."""
        B = profile.batch_size or 1
        G = options.global_batch_size or B
        recorded_sizes = {m for m in recorded if m}
        explicit = options.lever_choices(self.name)
        if explicit is not None:
            sizes = tuple(B if m is None else self.validate(m) for m in explicit)
        elif options.allow_microbatching and profile.batch_size and not (G == B and batch_dependent(profile)):
            sizes = tuple(options.micro_batch_sizes) if options.micro_batch_sizes is not None else None
        else:
            sizes = (G,)
        if sizes is None:
            sizes = tuple(m for m in recorded_sizes if G % m == 0) + ((G,) if G == B else ())
        else:
            bad = [m for m in sizes if m < 1 or G % m]
            if bad:
                raise ValueError(f"micro_batch_sizes {bad} do not divide the global batch {G}")
            missing = [m for m in sizes if m not in recorded_sizes and not (m == B == G)]
            if missing:
                raise UnrecordedPlanError(
                    f"micro-batch sizes {missing} were not recorded (recorded: {sorted(recorded_sizes, reverse=True)}); "
                    f"re-profile with memtune.profile(..., space=memtune.PlanSpace(levers={{'{self.name}': "
                    f"{tuple(missing)}}}))")
        # Each size is recorded, or is the whole batch (``None``: no accumulation).
        return tuple(None if (m == B and G == B) else m for m in sorted(set(sizes), reverse=True))

    def accumulation_steps(self, value, batch_size, global_batch) -> int:
        B = batch_size or 1
        return (global_batch or B) // (value or B)

    # ------------------------------------------------------------------ recording and cost
    @contextlib.contextmanager
    def recording(self, value, setup) -> Iterator[None]:
        from memtune.batching import split_micro_batches

        setup.sample = split_micro_batches(setup.sample, value)[0][0]  # the first micro-batch, cut as the runtime cuts it
        setup.accumulate_weight = value / setup.batch_size
        yield

    def cost(self, value, ctx) -> None:
        B = ctx.profile.batch_size or 1
        ctx.activation_scale = value / B  # activation FLOPs and bytes per micro-step relative to the profile
        ctx.repeats = ctx.grad_accum_steps

    def lossiness(self, value) -> int:
        return 1 if value is not None else 0

    def lossiness_for(self, value, profile) -> int:
        if value is None:
            return 0
        return BATCH_DEPENDENT_LOSSINESS if batch_dependent(profile) else 1

    # ------------------------------------------------------------------ words
    def describe(self, value) -> str:
        return "the whole batch" if value is None else f"micro-batches of {value}"

    def suggest(self, profile, options, recorded: tuple) -> str | None:
        stateful = batch_dependent(profile)
        sizes = tuple(m for m in recorded if m is not None)
        if stateful and sizes and options.lever_choices(self.name) is None:
            named = ", ".join(stateful[:3]) + (f" and {len(stateful) - 3} more" if len(stateful) > 3 else "")
            return (f"levers={{{self.name!r}: {(None, *sizes)!r}}} (micro-batches; lossy for this model: {named} "
                    "would take statistics and update buffers per micro-batch)")
        return super().suggest(profile, options, recorded)

    # ------------------------------------------------------------------ runtime
    def apply(self, model, value, ctx) -> Applied:
        return _Split(value if ctx.plan.grad_accum_steps > 1 else None)


class _Split(Applied):
    def __init__(self, micro_batch_size: int | None):
        self.micro_batch_size = micro_batch_size

    def split_batch(self, batch):
        from memtune.batching import split_micro_batches

        return split_micro_batches(batch, self.micro_batch_size)
