"""What every framework callback shares: the first batch drawn without moving the run's RNG,
and one optimizer step measured and handed to the session (history, telemetry, re-planning).

The frameworks own their loops, so these callbacks only measure. An error raised mid-step
could not be retried there.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from memtune.errors import UsageError


def first_batch(loader, device: torch.device, *, who: str) -> Any:
    """The first training batch, drawn without moving the run's RNG (a shuffled sampler draws
    its order from the global generator), on ``device``."""
    from memtune.batching import move_batch
    from memtune.runtime import checkpoint as ckpt

    state = ckpt.rng_state()
    try:
        batch = next(iter(loader))
    except StopIteration:
        raise UsageError(f"the {who}'s train dataloader is empty; memtune profiles on its first batch") from None
    finally:
        ckpt.set_rng_state(state)
    return move_batch(dict(batch) if hasattr(batch, "keys") else batch, device)


class CallbackSettings:
    """What a framework callback is configured with, and what it exposes after training.

    Args:
        budget: bytes, ``"24GB"``, ``"80%"`` (:meth:`memtune.Budget.parse`).
        planner_options: extra :class:`memtune.planners.PlannerOptions` fields (those that would
            change the framework's optimizer are refused).
        retune, retune_config, telemetry, metrics_path: as for :func:`memtune.fit`.

    After training: ``callback.session.history`` (one record per optimizer step: loss, peak,
    prediction, plan version), ``callback.session.events`` (plan changes), ``callback.plan``.
    """

    def __init__(self, budget="24GB", *, planner_options: dict | None = None, retune: bool = True,
                 retune_config=None, telemetry=None, metrics_path=None):
        self.budget = budget
        self.planner_options = dict(planner_options or {})
        self.retune = retune
        self.retune_config = retune_config
        self.telemetry = telemetry
        self.metrics_path = metrics_path
        self.session = None
        self._meter: StepMeter | None = None

    @property
    def plan(self):
        return None if self.session is None else self.session.plan

    def session_kwargs(self) -> dict:
        return dict(retune_config=self.retune_config, telemetry=self.telemetry, metrics_path=self.metrics_path)


class StepMeter:
    """Measure one optimizer step of ``session``'s model, then record it with the session.

    On CUDA the allocator's peak. On a CPU, memtune's tensor-memory guard in measuring mode,
    which agrees with PyTorch's MemTracker byte for byte. A compiled model on a CPU uses the
    resident high-water mark instead, because Dynamo runs eager under a dispatch mode."""

    def __init__(self, session) -> None:
        self.session = session
        self._meter = None
        self._t0 = 0.0
        self.losses: list[float] = []

    def begin(self) -> None:
        from memtune.runtime.memguard import HostPeakMeter, TensorMemoryGuard

        s = self.session
        self.losses = []
        if s.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(s.device)
        else:
            meter = HostPeakMeter() if s.compiled and HostPeakMeter.available() else \
                None if s.compiled else TensorMemoryGuard()
            if meter is not None:
                meter.track(s._static_tensors())
                meter.__enter__()
            self._meter = meter
        self._t0 = time.perf_counter()

    def add_loss(self, loss: Any) -> None:
        if isinstance(loss, torch.Tensor) and loss.numel() == 1:
            self.losses.append(float(loss.detach()))

    def end(self) -> dict:
        """Stop measuring and record the step; returns its history record."""
        s = self.session
        step_ms = (time.perf_counter() - self._t0) * 1000
        peak = None
        if self._meter is not None:
            self._meter.__exit__(None, None, None)
            peak, self._meter = self._meter.peak_bytes, None
        elif s.device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(s.device)
        loss = sum(self.losses) / len(self.losses) if self.losses else float("nan")
        s.step_count += 1
        s._after_step(loss, step_ms, peak, 0)  # history, telemetry and, between steps, re-planning
        return s.history[-1]

    def abandon(self) -> None:
        """Stop measuring without recording (the step did not finish)."""
        if self._meter is not None:
            self._meter.__exit__(None, None, None)
            self._meter = None
