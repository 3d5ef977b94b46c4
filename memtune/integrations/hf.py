"""memtune in the Hugging Face ``Trainer``: one callback.

    >>> from memtune.integrations.hf import MemtuneCallback
    >>> trainer = Trainer(model=model, args=args, train_dataset=ds, callbacks=[MemtuneCallback(budget="24GB")])
    >>> trainer.train()

At ``on_train_begin`` the callback profiles the model on the first training batch with *the
Trainer's own optimizer* (whatever ``args.optim`` or ``optimizers=`` made), plans into the
budget and applies the plan's recompute decisions to the model. It never replaces the
optimizer, the LR scheduler, the gradient clipping or the mixed precision the Trainer runs
(the plan keeps them all: :data:`memtune.runtime.session.USER_OPTIMIZER_LOCKS`), and it
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

What the callback cannot do: retry a batch after an out-of-memory error (the Trainer owns the
loop; an OOM propagates as usual; ``memtune.session`` in your own loop retries) and train on
several processes.
"""

from __future__ import annotations

import dataclasses
import logging
import time
import warnings
from typing import Any

import torch

from memtune.budget import Budget
from memtune.errors import InfeasibleBudgetError, UsageError
from memtune.units_fmt import fmt_bytes

log = logging.getLogger("memtune.integrations.hf")

try:  # the base class when transformers is installed; the callback is duck-typed otherwise
    from transformers import TrainerCallback as _Base
except ImportError:  # pragma: no cover - transformers is a test dependency
    _Base = object


class MemtuneCallback(_Base):
    """Train a Hugging Face model inside ``budget``; see the module docstring.

    Args:
        budget: bytes, ``"24GB"``, ``"80%"`` (:meth:`memtune.Budget.parse`).
        planner_options: extra :class:`memtune.planners.PlannerOptions` fields (those that would
            change the Trainer's optimizer are refused).
        retune, retune_config, telemetry, metrics_path: as for :func:`memtune.fit`.

    After training: ``callback.session.history`` (one record per optimizer step: loss, peak,
    prediction, plan version), ``callback.session.events`` (plan changes), ``callback.plan``.
    """

    def __init__(self, budget: int | str | Budget = "24GB", *, planner_options: dict | None = None, retune: bool = True,
                 retune_config=None, telemetry=None, metrics_path=None):
        self.budget = budget
        self.planner_options = dict(planner_options or {})
        self.retune = retune
        self.retune_config = retune_config
        self.telemetry = telemetry
        self.metrics_path = metrics_path
        self.session = None
        self.hf_recomputes_every_layer = False
        self.all_layers_recomputed_peak_bytes: int | None = None
        self._losses: list[float] = []
        self._hook = None
        self._meter = None
        self._t0 = 0.0

    @property
    def plan(self):
        return None if self.session is None else self.session.plan

    # ------------------------------------------------------------------ train begin
    def on_train_begin(self, args, state, control, model=None, optimizer=None, train_dataloader=None, **kwargs):
        from memtune.runtime.session import Session

        if getattr(args, "world_size", 1) > 1:
            raise UsageError(f"MemtuneCallback plans for one process, but this Trainer runs {args.world_size}; "
                             "train on one process, or leave the callback out for distributed runs")
        if model is None or optimizer is None or train_dataloader is None:
            raise UsageError("MemtuneCallback needs the Trainer's model, optimizer and train dataloader at "
                             "on_train_begin; use it with transformers.Trainer(callbacks=[MemtuneCallback(...)])")
        inner = getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer wraps the torch one
        device = next(model.parameters()).device
        sample = _first_batch(train_dataloader, device)
        precision = "bf16-mixed" if (getattr(args, "bf16", False) or getattr(args, "fp16", False)) else "fp32"
        layers = _hf_checkpointing_layers(model)
        self.hf_recomputes_every_layer = bool(layers)
        self.session = Session(model, self.budget, optimizer=inner, device=device, precision=precision,
                               allow_microbatching=False, retune=self.retune and not layers,
                               retune_config=self.retune_config, telemetry=self.telemetry, metrics_path=self.metrics_path,
                               planner_options=self.planner_options)
        with _hf_checkpointing_off(layers):  # profile the model's own step; HF's flag is restored after
            self.session.setup(sample)
        if layers:
            self._defer_to_hf_checkpointing()
        self._hook = model.register_forward_hook(self._record_loss)
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
        loss = getattr(output, "loss", None)
        if loss is None and isinstance(output, dict):
            loss = output.get("loss")
        if isinstance(loss, torch.Tensor) and loss.numel() == 1:
            self._losses.append(float(loss.detach()))

    def on_step_begin(self, args, state, control, **kwargs):
        from memtune.optimizer_recording import optimizer_state_tensors
        from memtune.runtime.memguard import HostPeakMeter, TensorMemoryGuard

        s = self.session
        self._losses = []
        if s.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(s.device)
        else:
            # Measures only: an error raised here could not be retried inside the Trainer's loop.
            meter = HostPeakMeter() if s.compiled and HostPeakMeter.available() else \
                None if s.compiled else TensorMemoryGuard()
            if meter is not None:
                meter.track([list(s.model.parameters()), list(s.model.buffers()), optimizer_state_tensors(s.optimizer)])
                meter.__enter__()
            self._meter = meter
        self._t0 = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        s = self.session
        step_ms = (time.perf_counter() - self._t0) * 1000
        peak = None
        if self._meter is not None:
            self._meter.__exit__(None, None, None)
            peak, self._meter = self._meter.peak_bytes, None
        elif s.device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(s.device)
        loss = sum(self._losses) / len(self._losses) if self._losses else float("nan")
        s.step_count += 1
        s._after_step(loss, step_ms, peak, 0)  # history, telemetry and, between steps, re-planning

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is not None and self.session is not None and self.session.history:
            h = self.session.history[-1]
            logs["memtune_peak_bytes"] = h["peak_bytes"]
            logs["memtune_predicted_peak_bytes"] = h["predicted_peak_bytes"]
            logs["memtune_plan_version"] = h["plan_version"]

    def on_train_end(self, args, state, control, **kwargs):
        if self._meter is not None:
            self._meter.__exit__(None, None, None)
            self._meter = None
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        if self.session is not None:
            self.session.close()


def _first_batch(loader, device: torch.device) -> Any:
    """The first training batch, drawn without moving the run's RNG (a shuffled sampler draws
    its order from the global generator), on the model's device."""
    from memtune.batching import move_batch
    from memtune.runtime import checkpoint as ckpt

    state = ckpt.rng_state()
    try:
        batch = next(iter(loader))
    except StopIteration:
        raise UsageError("the Trainer's train dataloader is empty; memtune profiles on its first batch") from None
    finally:
        ckpt.set_rng_state(state)
    return move_batch(dict(batch) if hasattr(batch, "keys") else batch, device)


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
