"""memtune in the Hugging Face ``Trainer``: one callback.

    >>> from memtune.integrations.hf import MemtuneCallback
    >>> trainer = Trainer(model=model, args=args, train_dataset=ds, callbacks=[MemtuneCallback(budget="24GB")])
    >>> trainer.train()

At ``on_train_begin`` the callback profiles the model on the first training batch with *the
Trainer's own optimizer* (whatever ``args.optim`` or ``optimizers=`` made), plans into the
budget and applies the plan's recompute decisions to the model. It never replaces the
optimizer, the LR scheduler, the gradient clipping or the mixed precision the Trainer runs
(the plan keeps them all: :func:`memtune.runtime.session.user_optimizer_locks`), and it
leaves batch size and gradient accumulation to ``TrainingArguments``: memtune's own
micro-batching is off. Each optimizer step is measured (CUDA allocator peak; on a CPU the
tracked tensor bytes), recorded with the telemetry, and the plan is re-tuned between steps
when the memory available changes, exactly as :func:`memtune.fit` does.

``gradient_checkpointing=True`` (``activation_checkpointing``) in ``TrainingArguments`` wins:
the Trainer already recomputes every layer, so memtune applies no recompute of its own (two
nested checkpoints would recompute twice). It checks that the budget holds with every layer
recomputed, raises :class:`~memtune.errors.InfeasibleBudgetError` before the first step when it
does not, and warns when memtune's plan would fit *without* recomputing every layer (the flag
then costs speed for nothing). Drop the flag to let memtune choose the layers.

A NaN or infinite loss or gradient raises :class:`~memtune.errors.NonFiniteError` at
``on_pre_optimizer_step``, before the Trainer's optimizer applies it, as :func:`memtune.fit`
does (``MemtuneCallback(..., on_nonfinite="ignore")`` keeps the Trainer's behaviour of stepping
on; with ``fp16=True`` only the loss is checked, since the Trainer's gradient scaler skips
steps with inf gradients itself).

What the callback cannot do: retry a batch after an out-of-memory error (the Trainer owns the
loop; an OOM propagates as usual, with a note saying so; ``memtune.session`` in your own loop
retries) and train on several processes. After such an error the step's meter is closed, so
nothing of memtune's keeps running in the process; a new ``trainer.train()`` plans afresh.
"""

from __future__ import annotations

import dataclasses
import logging
import sys
import warnings

import torch

from memtune.batching import find_loss
from memtune.budget import Budget
from memtune.errors import InfeasibleBudgetError, UsageError
from memtune.units_fmt import fmt_bytes

from ._loop import CallbackSettings, StepMeter, first_batch, note_oom

log = logging.getLogger("memtune.integrations.hf")

try:  # the base class when transformers is installed; the callback is duck-typed otherwise
    from transformers import TrainerCallback as _Base
except ImportError:  # pragma: no cover - transformers is a test dependency
    _Base = object


class MemtuneCallback(CallbackSettings, _Base):
    """Train a Hugging Face model inside ``budget``; see the module docstring. Arguments and results:
    :class:`~memtune.integrations._loop.CallbackSettings`."""

    def __init__(self, budget: int | str | Budget = "24GB", **kwargs):
        super().__init__(budget, **kwargs)
        self.hf_recomputes_every_layer = False
        self.all_layers_recomputed_peak_bytes: int | None = None
        self._hook = None
        self._model = None

    # ------------------------------------------------------------------ train begin
    def on_train_begin(self, args, state, control, model=None, optimizer=None, train_dataloader=None, **kwargs):
        from memtune.runtime.session import Session, lock

        if getattr(args, "world_size", 1) > 1:
            raise UsageError(f"MemtuneCallback plans for one process, but this Trainer runs {args.world_size}; "
                             "train on one process, or leave the callback out for distributed runs")
        if model is None or optimizer is None or train_dataloader is None:
            raise UsageError("MemtuneCallback needs the Trainer's model, optimizer and train dataloader at "
                             "on_train_begin; use it with transformers.Trainer(callbacks=[MemtuneCallback(...)])")
        self._close()  # what an earlier train() left when it ended in an exception
        inner = getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer wraps the torch one
        device = next(model.parameters()).device
        sample = first_batch(train_dataloader, device, who="Trainer")
        precision = "bf16-mixed" if (getattr(args, "bf16", False) or getattr(args, "fp16", False)) else "fp32"
        layers = _hf_checkpointing_layers(model)
        self.hf_recomputes_every_layer = bool(layers)
        self.session = Session(model, self.budget, optimizer=inner, device=device, precision=precision,
                               allow_microbatching=False, retune=self.retune and not layers,
                               planner_options=lock(self.planner_options, ("micro_batch_size",),
                                                    "a smaller per_device_train_batch_size (with "
                                                    "gradient_accumulation_steps to keep the global batch)"),
                               **self.session_kwargs())
        with _hf_checkpointing_off(layers):  # profile the model's own step; HF's flag is restored after
            self.session.setup(sample)
        if layers:
            self._defer_to_hf_checkpointing()
        # always_call: the hook also runs when forward raises, and closes the step's meter then.
        self._hook = model.register_forward_hook(self._record_loss, always_call=True)
        self._model = model
        self._meter = StepMeter(self.session, "Hugging Face")
        log.info("memtune: %s", self.session.plan.summary().splitlines()[0])

    def _defer_to_hf_checkpointing(self) -> None:
        """The Trainer recomputes every layer: remove memtune's unit decisions, check the budget
        with every unit recomputed, and say when the flag is not needed."""
        from memtune.apply import remove_plan
        from memtune.memory_model import predict_peak
        from memtune.plan import Decision

        s = self.session
        plan = s.plan
        remove_plan(s.model)
        every = dataclasses.replace(plan, decisions={u: Decision.RECOMPUTE for u in plan.decisions})
        peak = predict_peak(s.profile, every).peak_bytes
        self.all_layers_recomputed_peak_bytes = peak
        if peak > s.budget.usable_bytes:
            raise InfeasibleBudgetError(
                f"with gradient_checkpointing=True the step peaks at {fmt_bytes(peak)}, over the "
                f"{fmt_bytes(s.budget.usable_bytes)} usable of the budget {s.budget}; lower "
                f"per_device_train_batch_size, or turn gradient_checkpointing off and let memtune plan "
                f"(planner_options={{'allow_microbatching': ...}} is not available inside the Trainer)",
                min_feasible_bytes=peak)
        if not plan.recompute_units:
            warnings.warn(f"memtune: the step fits the budget {s.budget} without recomputing any layer "
                          f"(predicted {fmt_bytes(plan.predicted_peak_bytes)}), but gradient_checkpointing=True "
                          "recomputes every layer; drop the flag to train faster", RuntimeWarning, stacklevel=3)
        s.plan = dataclasses.replace(plan, decisions=every.decisions, predicted_peak_bytes=peak)
        s.events.append({"step": 0, "kind": "defer-to-hf-checkpointing", "predicted_peak_bytes": peak,
                         "reason": "TrainingArguments(gradient_checkpointing=True) recomputes every layer"})

    # ------------------------------------------------------------------ each optimizer step
    def _record_loss(self, module, args, output) -> None:
        if self._meter is None:
            return
        failed = sys.exc_info()[1]  # set when forward raised (the hook is always called)
        if failed is not None:
            self._meter.abandon()
            note_oom(failed, "Hugging Face")
            return
        self._meter.add_loss(find_loss(output))

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        if self._meter is not None and self._model is not None:
            self._meter.check_finite(self.on_nonfinite, self._model, check_grads=not getattr(args, "fp16", False))

    def on_step_begin(self, args, state, control, **kwargs):
        self._meter.begin()

    def on_step_end(self, args, state, control, **kwargs):
        self._meter.end()

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is not None and self.session is not None and self.session.history:
            h = self.session.history[-1]
            logs["memtune_peak_bytes"] = h["peak_bytes"]
            logs["memtune_predicted_peak_bytes"] = h["predicted_peak_bytes"]
            logs["memtune_plan_version"] = h["plan_version"]

    def on_train_end(self, args, state, control, **kwargs):
        self._close()

    def _close(self) -> None:
        if self._meter is not None:
            self._meter.abandon()
            self._meter = None
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        self._model = None
        if self.session is not None:
            self.session.close()


def _hf_checkpointing_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The layers Hugging Face gradient checkpointing is turned on for."""
    return [m for m in model.modules() if getattr(m, "gradient_checkpointing", False) is True]


class _hf_checkpointing_off:
    def __init__(self, layers):
        self.layers = layers

    def __enter__(self):
        for m in self.layers:
            m.gradient_checkpointing = False

    def __exit__(self, *exc):
        for m in self.layers:
            m.gradient_checkpointing = True
