"""memtune in a Lightning ``Trainer``: one callback.

    >>> from memtune.integrations.lightning import MemtuneCallback
    >>> trainer = lightning.Trainer(max_steps=1000, callbacks=[MemtuneCallback(budget="24GB")])
    >>> trainer.fit(module, datamodule=data)

A LightningModule computes its loss in ``training_step``, not in ``forward``. So at
``on_train_start`` the callback profiles a view of the module, :class:`TrainingStep`, whose
forward *is* ``training_step(batch, 0)``. It profiles on the first training batch (drawn
without moving the run's RNG) with *the optimizer that* ``configure_optimizers`` *built*. It then
plans into the budget and applies the plan's recompute decisions to the module's own blocks.
``self.log`` calls are silenced while the profiler runs ``training_step`` on fake tensors.

What the callback leaves alone:

- the optimizer, its LR schedulers, ``gradient_clip_val``, ``accumulate_grad_batches`` and the
  precision plugin. The plan keeps all of them: :func:`memtune.runtime.session.user_optimizer_locks`.
  memtune's micro-batching and chunked loss are off, because the loss is yours, inside
  ``training_step``;
- ``precision="bf16-mixed"`` / ``"16-mixed"`` profile as ``bf16-mixed``.

Each training batch is measured (the CUDA allocator's peak; on a CPU memtune's tensor-memory
guard) and recorded in ``callback.session.history``, with telemetry. Between steps the plan is
re-tuned when the memory available changes, as :func:`memtune.fit` does. The logged metrics
gain ``memtune/peak_bytes``, ``memtune/predicted_peak_bytes`` and ``memtune/plan_version``.

Refused with an error: manual optimization (``training_step`` then runs its own backward and
step, which the profile would run twice; Lightning allows several optimizers only there), and
more than one process.
An out-of-memory error is not retried: Lightning owns the loop (the error gains a note saying
so, and the step's meter is closed at ``on_exception``). Use :func:`memtune.session` in your own
loop for that. A NaN or infinite loss or gradient raises :class:`~memtune.errors.NonFiniteError`
at ``on_before_optimizer_step``, before the optimizer applies it, as :func:`memtune.fit` does;
``MemtuneCallback(..., on_nonfinite="ignore")`` keeps Lightning's behaviour (with
``precision="16-mixed"`` only the loss is checked: its gradient scaler skips inf gradients).
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any

import torch
import torch.nn as nn

from memtune.batching import find_loss
from memtune.errors import UsageError

from ._loop import CallbackSettings, StepMeter, first_batch, note_oom

log = logging.getLogger("memtune.integrations.lightning")

try:  # the base class when Lightning is installed; the callback is duck-typed otherwise
    from lightning.pytorch import Callback as _Base
except ImportError:  # pragma: no cover - lightning is a test dependency
    try:
        from pytorch_lightning import Callback as _Base
    except ImportError:
        _Base = object


class TrainingStep(nn.Module):
    """A LightningModule seen as a model whose forward returns the training loss:
    ``TrainingStep(m)(batch=b)`` is ``m.training_step(b, 0)`` (its ``"loss"`` when it returns a
    dict). Unit names gain the prefix ``module.``. The module is held, not copied, so a plan
    applied here changes the LightningModule's own blocks."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module

    def forward(self, batch: Any) -> torch.Tensor:
        out = self.module.training_step(batch, 0)
        loss = find_loss(out)
        if loss is None:
            raise UsageError(f"training_step returned {type(out).__name__}; memtune needs the loss (a scalar tensor, or a "
                             "dict with 'loss') to profile the step")
        return loss


@contextlib.contextmanager
def _no_logging(module):
    """``self.log``/``self.log_dict`` do nothing while the profiler runs ``training_step``:
    they would log fake tensors, outside the loop that collects them."""
    names = [n for n in ("log", "log_dict") if hasattr(module, n)]
    for n in names:
        setattr(module, n, lambda *a, **k: None)
    try:
        yield
    finally:
        for n in names:
            delattr(module, n)  # the instance attribute goes; the class's method shows again


class MemtuneCallback(CallbackSettings, _Base):
    """Train a LightningModule inside ``budget``; see the module docstring. Arguments and results:
    :class:`~memtune.integrations._loop.CallbackSettings`."""

    def on_train_start(self, trainer, pl_module) -> None:
        from memtune.runtime.session import Session, lock

        if getattr(trainer, "world_size", 1) > 1:
            raise UsageError(f"MemtuneCallback plans for one process, but this Trainer runs {trainer.world_size}; "
                             "train on one device, or use memtune.fit under torchrun for several")
        if not getattr(pl_module, "automatic_optimization", True):
            raise UsageError("MemtuneCallback needs automatic optimization: with automatic_optimization=False, "
                             "training_step runs its own backward and optimizer step, which profiling would repeat; "
                             "use memtune.session(model, budget, optimizer=opt) in a loop you own instead")
        loader = trainer.train_dataloader
        if loader is None:
            raise UsageError("the Lightning Trainer has no train dataloader at on_train_start")
        device = pl_module.device
        sample = first_batch(loader, device, who="Lightning Trainer")
        prec = str(getattr(trainer, "precision", "32-true"))
        precision = "bf16-mixed" if ("bf16" in prec or prec.startswith("16")) else "fp32"
        if "true" in prec and prec not in ("32-true", "32"):
            raise UsageError(f"precision={prec!r} stores the weights in low precision, which memtune does not profile "
                             "for a module it did not build; use '32-true' or 'bf16-mixed'")
        # The loss is inside training_step: memtune cannot chunk it.
        options = lock({**self.planner_options,
                        "levers": {**self.planner_options.get("levers", {}), "loss_chunks": (None,)}},
                       ("micro_batch_size", "loss_chunks"),
                       "a smaller batch_size in your DataLoader (with accumulate_grad_batches to keep the global batch)")
        self.session = Session(TrainingStep(pl_module), self.budget, optimizer=trainer.optimizers[0], device=device,
                               precision=precision, allow_microbatching=False, retune=self.retune,
                               planner_options=options, **self.session_kwargs())
        with _no_logging(pl_module):
            self.session.setup({"batch": sample})
        self._meter = StepMeter(self.session, "Lightning")
        self._fp16 = prec.startswith("16")
        self._backward_losses: list[float] = []
        log.info("memtune: %s", self.session.plan.summary().splitlines()[0])

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self._meter is not None:
            self._meter.begin()

    def on_before_backward(self, trainer, pl_module, loss) -> None:
        if isinstance(loss, torch.Tensor) and loss.numel() == 1:
            self._backward_losses.append(float(loss.detach()))  # (scaled by accumulation: only checked)

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        losses, self._backward_losses = self._backward_losses, []
        if self._meter is not None:
            self._meter.check_finite(self.on_nonfinite, pl_module, losses=losses, check_grads=not self._fp16)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self._meter is None:
            return
        self._meter.add_loss(find_loss(outputs))
        h = self._meter.end()
        pl_module.log_dict({"memtune/peak_bytes": float(h["peak_bytes"] or 0),
                            "memtune/predicted_peak_bytes": float(h["predicted_peak_bytes"]),
                            "memtune/plan_version": float(h["plan_version"])}, on_step=True, on_epoch=False,
                           batch_size=1)

    def on_exception(self, trainer, pl_module, exception) -> None:
        note_oom(exception, "Lightning")
        if self._meter is not None:
            self._meter.abandon()

    def on_train_end(self, trainer, pl_module) -> None:
        if self._meter is not None:
            self._meter.abandon()
        if self.session is not None:
            self.session.close()
