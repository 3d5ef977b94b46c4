"""One training step under the applied plan, apart from the trainer's policy.

:class:`StepRunner` runs forward and backward for each piece of the batch the plan's levers cut
(micro-batches), under the precision they ask for, checks the loss and gradients for NaN/inf
before anything is applied, steps the optimizer, and measures the step's peak memory. It does
not re-plan, retry or log: an out-of-memory error propagates to the trainer, and
:meth:`StepRunner.retry_safe` says whether the step may be retried from the same batch.

Where the step is, is a :class:`TrainerPhase`. Tests inject faults by listening to phase
changes (:mod:`memtune.runtime.faults`); a run without listeners pays nothing for it.
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from typing import TYPE_CHECKING, Any, Callable

import torch
from torch.utils._pytree import tree_flatten

from memtune.apply import applied_levers
from memtune.batching import batch_size_of, loss_from_output, split_batch, split_micro_batches
from memtune.errors import NonFiniteError
from memtune.optimizer_recording import optimizer_state_tensors
from memtune.profile import StepPhase

from . import safety
from .memguard import HostPeakMeter, TensorMemoryGuard

if TYPE_CHECKING:
    from .trainer import Trainer


TrainerPhase = StepPhase
"""Where a step is (the runtime's counterpart of ``mem_tracker._ModState``): the profile's
:class:`~memtune.profile.StepPhase`, which the recorder uses too."""


class NonFiniteStep(Exception):
    """Raised inside a step when the loss or a gradient is NaN/inf, before the optimizer step."""

    def __init__(self, loss: float, params: list[str]):
        super().__init__(loss, params)
        self.loss, self.params = loss, params


class StepRunner:
    """Runs steps for a :class:`~memtune.runtime.trainer.Trainer` (its model, optimizer, plan
    and its overridable ``_backward``/``_optimizer_step``, which a session changes for AMP)."""

    def __init__(self, trainer: "Trainer"):
        self.trainer = trainer
        self.phase = TrainerPhase.IDLE
        self.listeners: list[Callable[[TrainerPhase, int], None]] = []
        """Called on every phase change with the phase and the trainer's step count (test hooks)."""
        self.last_peak: int | None = None
        """The peak the memory guard saw in the last step, even one that failed."""

    # ------------------------------------------------------------------ phases
    def enter(self, phase: TrainerPhase) -> None:
        self.phase = phase
        for listener in self.listeners:
            listener(phase, self.trainer.step_count)

    def levers_updating_during_backward(self) -> list[str]:
        """The applied levers that update parameters during backward (a failed step is not retried)."""
        return [name for name, a in applied_levers(self.trainer.model).items() if not a.retry_safe]

    @staticmethod
    def held_at_default(names) -> dict:
        """``PlannerOptions.levers`` that keep ``names`` at their default (for messages)."""
        from memtune.levers import LEVERS

        return {name: (LEVERS[name].encode(LEVERS[name].default),) for name in names}

    def retry_safe(self) -> bool:
        """Whether a step that failed in the current phase may run again from the same batch:
        not once the optimizer steps, nor in backward when an applied lever updates parameters there."""
        if self.phase is TrainerPhase.OPTIMIZER:
            return False
        if self.phase is TrainerPhase.BACKWARD:
            return all(a.retry_safe for a in applied_levers(self.trainer.model).values())
        return True

    # ------------------------------------------------------------------ the step
    def run(self, batch: Any) -> tuple[float, int | None]:
        """One step on ``batch``: (its loss, its measured peak bytes or ``None``)."""
        t = self.trainer
        guard, meter, graphs_before = self._measurement()
        total = 0.0
        levers = list(applied_levers(t.model).values())
        with guard if guard is not None else meter if meter is not None else nullcontext():
            if guard is not None or meter is not None:
                (guard or meter).track(self.static_tensors(batch))
            try:
                total = self._forward_backward(batch, levers)
                if guard is not None:
                    # A partial optimizer step cannot be retried, so here the CPU guard only measures;
                    # an overflow feeds the closed loop, which tightens the plan before the next step.
                    guard.limit_bytes = None
                self._check_gradients(total, levers)
                self.enter(TrainerPhase.OPTIMIZER)
                t._optimizer_step()
            finally:
                if guard is not None:
                    self.last_peak = guard.peak_bytes
        self.enter(TrainerPhase.IDLE)
        if guard is not None:
            return total, guard.peak_bytes
        if meter is not None:
            # A step that compiled also holds the compiler's memory: not a measurement of the step.
            return total, meter.peak_bytes if t._recompiles.graphs == graphs_before else None
        if t.device.type == "cuda":
            return total, torch.cuda.max_memory_allocated(t.device)
        return total, None

    def _measurement(self):
        """(guard, meter, compiled graphs so far): how this step's memory is measured."""
        t = self.trainer
        self.last_peak = None
        if t.device.type == "cpu" and t.compiled:
            # A dispatch-mode guard would make Dynamo run the compiled model eagerly: measure the
            # compiled step from the outside instead (enforced between steps by the retuner).
            return None, HostPeakMeter() if HostPeakMeter.available() else None, t._recompiles.graphs
        if t.device.type == "cpu" and t.enforce_budget and t.dist is None:
            # (Not across ranks: FSDP2 frees and re-allocates unsharded parameters by resizing
            # storages, which a dispatch mode cannot see; CUDA's allocator does see it.)
            return TensorMemoryGuard(t.budget.usable_bytes), None, None
        if t.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(t.device)
        return None, None, None

    def _pieces(self, batch: Any, levers) -> list[tuple[Any, float]]:
        """The pieces the applied levers cut ``batch`` into, each with its loss weight."""
        pieces = [(batch, 1.0)]
        for applied in levers:
            pieces = [(part, w * w2) for piece, w in pieces for part, w2 in applied.split_batch(piece)]
        return pieces

    def _autocast(self, levers):
        t = self.trainer
        precision = next((a.precision for a in levers if a.precision), t.precision)
        if precision == "bf16-mixed":
            return torch.autocast(t.device.type, dtype=torch.bfloat16)
        return nullcontext()

    def _forward_backward(self, batch: Any, levers) -> float:
        t = self.trainer
        updates_during_backward = not all(a.retry_safe for a in levers)
        total = 0.0
        pieces = self._pieces(batch, levers)
        measure = t.auto is not None
        self.noise_measure = None
        if measure and len(pieces) == 1:
            pieces = halves(batch)  # two batch sizes for the noise scale; the same gradient sum
        first = None
        # Under DDP the gradients are synchronized on the last micro-batch only (they accumulate in
        # DDP's buckets either way); FSDP2 reduce-scatters every micro-batch, so that its
        # accumulated gradients stay shards (memtune.distributed.memory prices it so).
        # (Not while measuring the noise scale, which reads the first piece's synchronized gradient.)
        no_sync = getattr(t._forward, "no_sync", None) if len(pieces) > 1 and not measure else None
        for k, (part, weight) in enumerate(pieces):
            with no_sync() if no_sync is not None and k < len(pieces) - 1 else nullcontext():
                loss = self._piece(part, levers, updates_during_backward, weight)
            total += float(loss.detach()) * weight
            del loss
            if measure and first is None and len(pieces) > 1:
                first = (grad_sq(t.model) / weight ** 2, batch_size_of(part))  # |G_b|² of the first b samples
        if first is not None:
            self.noise_measure = (first[0], first[1], grad_sq(t.model), batch_size_of(batch))
        return total

    def _piece(self, part: Any, levers, updates_during_backward: bool, weight: float) -> torch.Tensor:
        """Forward and backward of one piece of the batch; its (unweighted) loss."""
        t = self.trainer
        self.enter(TrainerPhase.FORWARD)
        args, kwargs, target = split_batch(part, t.loss_fn)
        with self._autocast(levers):
            out = t._forward(*args, **kwargs)
            loss = loss_from_output(out, part, target, t.loss_fn)
        del out
        if updates_during_backward and not math.isfinite(float(loss.detach())):
            # Backward updates parameters as it goes: catch a non-finite loss before it starts.
            raise NonFiniteStep(float(loss.detach()), [])
        self.enter(TrainerPhase.BACKWARD)
        t._backward(loss if weight == 1.0 else loss * weight)
        return loss

    def _check_gradients(self, total: float, levers) -> None:
        """Nothing non-finite is ever applied: check before the optimizer step (an optimizer that
        steps in backward reports the parameters it refused to update)."""
        t = self.trainer
        refused = getattr(t.optimizer, "nonfinite", ())
        if refused:
            updating = self.levers_updating_during_backward()
            raise NonFiniteError(
                f"step {t.step_count}: the gradients of {', '.join(refused)} hold NaN or inf. With parameters updated "
                f"in backward ({', '.join(updating) or 'the optimizer step in backward'}) the other parameters were "
                "already updated (these were not); resume from the last checkpoint, lower the learning rate, or plan "
                f"with levers={self.held_at_default(updating)} to have non-finite steps caught before any update")
        if not all(a.retry_safe for a in levers):
            return  # the parameters were updated in backward: there is nothing left to check
        bad = safety.non_finite_gradients(t.model) if t._checks_gradients and math.isfinite(total) else []
        if bad or not math.isfinite(total):
            raise NonFiniteStep(total, bad)

    noise_measure: tuple[float, int, float, int] | None = None
    """After a step with ``global_batch="auto"``: (|G_b|², b, |G_N|², N) for the noise scale."""

    def static_tensors(self, batch: Any = None) -> list:
        """What is alive before a step begins (parameters, buffers, optimizer state and the
        batch): what a step meter tracks before it measures the step."""
        t = self.trainer
        return [list(t.model.parameters()), list(t.model.buffers()), optimizer_state_tensors(t.optimizer)] + \
            ([tree_flatten(batch)[0]] if batch is not None else [])


def grad_sq(model) -> float:
    """|g|², the squared L2 norm of every gradient of ``model`` together."""
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    return float(torch.nn.utils.get_total_norm(grads)) ** 2 if grads else 0.0


def halves(batch: Any) -> list[tuple[Any, float]]:
    """``batch`` as two micro-batches (its first half and the rest), each with its weight."""
    n = batch_size_of(batch)
    if not n or n < 2:
        return [(batch, 1.0)]
    return split_micro_batches(batch, (n + 1) // 2)
