"""What every framework callback shares: the first batch drawn without moving the run's RNG,
and one optimizer step measured and handed to the session (history, telemetry, re-planning).

The frameworks own their loops, so these callbacks only measure. An error raised mid-step
could not be retried there, and the framework unwinds without telling its callbacks, so the
step's meter stops counting at the first exception that leaves an op and is closed at the
next callback (or by the forward hook, for an error in forward). A non-finite loss or
gradient stops the run before the optimizer step, as :func:`memtune.fit` does, unless
``on_nonfinite="ignore"`` keeps the framework's own behaviour.
"""

from __future__ import annotations

import math
import sys
import time
from typing import Any

import torch
from torch.utils._python_dispatch import _get_current_dispatch_mode_stack

from memtune.errors import NonFiniteError, UsageError
from memtune.runtime.memguard import TensorMemoryGuard

NONFINITE = ("raise", "ignore")


def first_batch(loader, device: torch.device, *, who: str) -> Any:
    """The first training batch, drawn without moving the run's RNG (a shuffled sampler draws
    its order from the global generator), on ``device``."""
    from memtune.batching import move_batch
    from memtune.runtime import checkpoint as ckpt

    state = ckpt.RngSnapshot()
    try:
        batch = next(iter(loader))
    except StopIteration:
        raise UsageError(f"the {who}'s train dataloader is empty; memtune profiles on its first batch") from None
    finally:
        state.restore()
    return move_batch(dict(batch) if hasattr(batch, "keys") else batch, device)


class CallbackSettings:
    """What a framework callback is configured with, and what it exposes after training.

    Args:
        budget: bytes, ``"24GB"``, ``"80%"`` (:meth:`memtune.Budget.parse`).
        planner_options: extra :class:`memtune.planners.PlannerOptions` fields (those that would
            change the framework's optimizer are refused).
        retune, retune_config, telemetry, metrics_path: as for :func:`memtune.fit`.
        on_nonfinite: ``"raise"`` (default): a NaN or infinite loss or gradient raises
            :class:`~memtune.errors.NonFiniteError` before the optimizer step, so the weights
            keep the previous step's values; ``"ignore"``: the framework steps on, as it would
            without memtune.

    After training: ``callback.session.history`` (one record per optimizer step: loss, peak,
    prediction, plan version), ``callback.session.events`` (plan changes), ``callback.plan``.
    """

    def __init__(self, budget="24GB", *, planner_options: dict | None = None, retune: bool = True,
                 retune_config=None, telemetry=None, metrics_path=None, on_nonfinite: str = "raise"):
        if on_nonfinite not in NONFINITE:
            raise UsageError(f"on_nonfinite={on_nonfinite!r}: use 'raise' (stop before the optimizer step) or "
                             "'ignore' (step on, as the framework does without memtune)")
        self.on_nonfinite = on_nonfinite
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

    def __init__(self, session, framework: str = "framework") -> None:
        self.session = session
        self.framework = framework
        self._meter = None
        self._t0 = 0.0
        self.losses: list[float] = []

    def begin(self) -> None:
        from memtune.runtime.memguard import HostPeakMeter

        self.abandon()  # a step the framework abandoned on an exception, never ended
        s = self.session
        self.losses = []
        if s.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(s.device)
        else:
            meter = HostPeakMeter() if s.compiled and HostPeakMeter.available() else \
                None if s.compiled else FrameworkStepGuard(self.framework)
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
            stopped = getattr(self._meter, "stopped", False)  # an op failed (and was handled): not a full measure
            peak, self._meter = None if stopped else self._meter.peak_bytes, None
        elif s.device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(s.device)
        loss = sum(self.losses) / len(self.losses) if self.losses else float("nan")
        s.step_count += 1
        s._after_step(loss, step_ms, peak, 0)  # history, telemetry and, between steps, re-planning
        return s.history[-1]

    def abandon(self) -> None:
        """Stop measuring without recording (the step did not finish)."""
        if self._meter is not None:
            meter, self._meter = self._meter, None
            if not getattr(meter, "closed", False):
                meter.__exit__(None, None, None)

    def check_finite(self, policy: str, model: torch.nn.Module, *, losses=None, check_grads: bool = True) -> None:
        """Before the framework's optimizer step: raise :class:`NonFiniteError` when this step's
        loss (``losses``, default those recorded), or (``check_grads``) a gradient of ``model``,
        is NaN or infinite (``policy`` ``"raise"``); the meter is closed first, since the
        framework will unwind."""
        from memtune.runtime.safety import non_finite_gradients

        if policy != "raise":
            return
        bad = [x for x in (self.losses if losses is None else losses) if not math.isfinite(x)]
        grads = non_finite_gradients(model) if check_grads and not bad else []
        if bad:
            what = f"the loss is {bad[0]}"
        elif grads:
            what = f"the gradients of {', '.join(grads)} hold NaN or inf (the loss is finite)"
        else:
            return
        self.abandon()
        step = self.session.step_count
        self.session.events.append({"step": step, "kind": "nonfinite-stop", "reason": what})
        raise NonFiniteError(
            f"step {step}: {what}. The {self.framework} Trainer's optimizer step was stopped before it ran, so the "
            f"weights keep step {step}'s values; lower the learning rate, check this batch's data, or pass "
            "on_nonfinite='ignore' to MemtuneCallback to step on as the Trainer does without memtune")


class FrameworkStepGuard(TensorMemoryGuard):
    """The CPU step meter of a callback: a measuring :class:`TensorMemoryGuard` that stops
    counting when an exception leaves an op. The framework then unwinds its loop without
    telling the callback, so the guard closes itself once the exception has left the frame
    that ran the step (the deepest frame both the callback's ``begin`` and the failing op ran
    under: the framework's loop), watched with ``sys.setprofile`` during the unwind only.
    An out-of-memory error gains a note saying why it is not retried and what to do."""

    def __init__(self, framework: str):
        super().__init__()
        self.framework = framework
        self.stopped = False
        self.closed = False
        self._begun_under: dict[int, Any] = {}  # id -> frame (held, so that no new frame reuses the id)
        self._unwatch = None

    def __enter__(self):
        f = sys._getframe(1)
        while f is not None:  # the frames the step is begun under (the framework's loop among them)
            self._begun_under[id(f)] = f
            f = f.f_back
        return super().__enter__()

    def __exit__(self, *exc):
        if self._unwatch is not None:
            self._unwatch()
        self._begun_under.clear()
        if not self.closed:
            self.closed = True
            super().__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if self.stopped:
            return func(*args, **(kwargs or {}))
        try:
            return super().__torch_dispatch__(func, types, args, kwargs)
        except BaseException as e:
            self.stopped = True
            note_oom(e, self.framework)
            self._close_when_unwound(sys._getframe())
            raise

    def _close_when_unwound(self, frame) -> None:
        """Exit the mode when ``loop`` (the deepest frame the step was begun under) returns,
        which it does by the exception passing through it, unless something catches it first."""
        while frame is not None and self._begun_under.get(id(frame)) is not frame:
            frame = frame.f_back
        self._begun_under.clear()
        if frame is None:
            return
        loop, previous = frame, sys.getprofile()

        def watch(f, event, arg):
            if previous is not None:
                previous(f, event, arg)
            if event == "return" and f is loop:
                unwatch()
                stack = _get_current_dispatch_mode_stack()
                if stack and stack[-1] is self:  # (a mode entered later and still active: leave both)
                    self.__exit__(None, None, None)

        def unwatch():  # also when the step ends after all (the exception was caught inside it)
            self._unwatch = None
            if sys.getprofile() is watch:
                sys.setprofile(previous)

        self._unwatch = unwatch
        sys.setprofile(watch)


def note_oom(e: BaseException, framework: str) -> None:
    """Say on an out-of-memory error from a framework's step why memtune did not retry it."""
    if isinstance(e, torch.OutOfMemoryError) and not any("memtune" in n for n in getattr(e, "__notes__", ())):
        e.add_note(f"memtune: the {framework} Trainer owns the training loop, so MemtuneCallback cannot retry this "
                   "batch; give the callback a smaller budget (its plan then leaves more headroom), or train with "
                   "memtune.session(...) in your own loop, which re-plans and retries an OOM in place")
