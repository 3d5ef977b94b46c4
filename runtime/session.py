"""``memtune.session``: memtune's runtime inside a training loop you own.

    >>> opt = torch.optim.AdamW(model.parameters(), lr=3e-4)
    >>> sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=1000)
    >>> with memtune.session(model, "24GB", optimizer=opt, max_grad_norm=1.0) as s:
    ...     for batch in loader:
    ...         loss = s.step(batch)        # forward, backward, clip, opt.step() inside the budget
    ...         sched.step()                # your scheduler drives your optimizer, as before

``Session.step`` is :meth:`memtune.Trainer.step`: the plan is applied on the first batch (or
on ``sample`` when given), the budget is enforced, every step is recorded in ``s.history``
and the telemetry log, the plan is re-tuned between steps, and an out-of-memory error in
forward or backward re-plans and retries the same batch with the same RNG state.

**Your optimizer is kept.** When ``optimizer`` is a ``torch.optim.Optimizer``, the profile
records *that* optimizer's step (its class, hyperparameters and param groups rebuilt on fake
tensors) and the plan may only change what leaves it untouched: which blocks to recompute
(or offload), micro-batching and a chunked loss. It never switches optimizers, never changes
state precision, never steps in backward (which would bypass your ``scheduler``/``GradScaler``)
and never stores bf16 weights. ``s.optimizer is opt`` throughout, so an LR scheduler built on
it keeps working, and so does your checkpointing of ``opt.state_dict()``.

**AMP.** Pass ``grad_scaler=torch.amp.GradScaler(...)`` and ``precision="bf16-mixed"`` (or
run fp16 autocast yourself in ``loss_fn``): each backward goes through ``scaler.scale``, and
the step is ``unscale_`` → clip → ``scaler.step`` → ``scaler.update``, so inf/NaN gradients
skip the step as the scaler decides rather than stopping the run.

Leaving the ``with`` block removes the plan's forward changes (:func:`memtune.remove_plan`)
and, on CUDA, lifts the per-process memory cap.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from memtune.budget import Budget
from memtune.errors import UsageError

from .trainer import Trainer

def user_optimizer_locks() -> dict:
    """The levers a user-owned optimizer locks, each at its default: those that change how the
    optimizer steps (:attr:`memtune.levers.Lever.wraps_optimizer`: in backward, state in host
    memory, bf16 weights), which memtune can only do to an optimizer it wraps."""
    from memtune.levers import held_at_default

    return held_at_default(lambda lever: lever.wraps_optimizer)

USER_OPTIMIZER_HINT = ("pass optimizer='muon2' (or 'adamw') instead of your optimizer object, so that memtune may "
                       "also choose 8-bit state, bf16 weights, the optimizer step in backward and state offload")
"""What an infeasible budget's error suggests instead of the levers a user-owned optimizer locks."""


def lock(options: dict, names, hint: str) -> dict:
    """``options`` with ``names`` added to the planner's ``locked`` options and ``hint`` to its
    ``locked_hint``: an infeasible budget's error then suggests ``hint``, not those options."""
    hints = [h for h in (options.get("locked_hint", ""), hint) if h]
    return {**options, "locked": tuple(dict.fromkeys((*options.get("locked", ()), *names))),
            "locked_hint": "; or ".join(hints)}


class Session(Trainer):
    """A :class:`~memtune.runtime.trainer.Trainer` for a loop you own; see the module docstring.

    Extra arguments over :func:`memtune.fit`: ``optimizer`` may be a live
    ``torch.optim.Optimizer`` (kept, see above); ``grad_scaler``: an AMP ``GradScaler``.
    """

    def __init__(self, model: nn.Module, budget: int | str | Budget, *, optimizer: Any = "muon2",
                 grad_scaler: Any = None, progress: bool = False, **kwargs):
        self.user_optimizer: torch.optim.Optimizer | None = None
        if isinstance(optimizer, torch.optim.Optimizer):
            self.user_optimizer = optimizer
            _check_optimizer_params(model, optimizer)
            options = dict(kwargs.pop("planner_options", None) or {})
            clash = {k: options[k] for k in ("optimizer", "state_dtypes", "min_ns_steps", "max_ns_steps") if k in options}
            if clash:
                raise UsageError(f"planner_options {clash} would change the optimizer you passed "
                                 f"({type(optimizer).__name__}), which the session keeps; drop them, or pass "
                                 "optimizer='muon2'/'adamw' to let memtune build and tune the optimizer")
            locks = user_optimizer_locks()
            kwargs["planner_options"] = lock({**options, "levers": {**options.get("levers", {}), **locks}},
                                             ("optimizer", "state_dtypes", *locks), USER_OPTIMIZER_HINT)
            name = "custom"
        elif isinstance(optimizer, str):
            name = optimizer
        else:
            raise UsageError(f"optimizer={optimizer!r}: pass a torch.optim.Optimizer built on the model's parameters "
                             "(kept as it is), or a name memtune builds ('muon2', 'muon', 'adamw')")
        if grad_scaler is not None and not all(hasattr(grad_scaler, a) for a in ("scale", "unscale_", "step", "update")):
            raise UsageError(f"grad_scaler={grad_scaler!r} is not an AMP GradScaler; pass torch.amp.GradScaler(...)")
        self.grad_scaler = grad_scaler
        if self.user_optimizer is not None and kwargs.get("optimizer_settings") is not None:
            raise UsageError("optimizer_settings configures an optimizer memtune builds; yours is used as you built it")
        super().__init__(model, budget, optimizer=name, progress=progress, **kwargs)
        if self.sample is not None:
            self.setup(self.sample)

    # ------------------------------------------------------------------ the user's optimizer
    def _default_settings(self, name: str, settings: Any):
        if self.user_optimizer is not None:
            return optimizer_builder(self.user_optimizer, self.model)
        return super()._default_settings(name, settings)

    def _plan_space(self):
        space = super()._plan_space()
        if self.user_optimizer is None:
            return space
        import dataclasses

        # (user_optimizer_locks(), in planner_options, already fix the levers that wrap the optimizer.)
        return dataclasses.replace(space, optimizers=None, state_dtypes=("fp32",))

    def _plan_options(self, *, lossless: bool) -> list[dict]:
        options = super()._plan_options(lossless=lossless)
        if self.user_optimizer is None:
            return options
        return [{**{k: v for k, v in o.items() if k not in ("optimizer", "state_dtypes", "min_ns_steps", "max_ns_steps")},
                 "optimizer": None} for o in options]

    def _install(self, plan, *, kind: str, reason: str) -> None:
        if self.user_optimizer is not None and self.optimizer is None:
            self.optimizer = self.user_optimizer  # apply_plan then keeps it instead of building the plan's
        super()._install(plan, kind=kind, reason=reason)
        if self.user_optimizer is not None and self.optimizer is not self.user_optimizer:
            raise AssertionError("a plan for a user optimizer re-wrapped it")  # pragma: no cover - locked out above

    def setup(self, sample: Any) -> None:
        """Profile and plan on ``sample`` now (otherwise the first :meth:`step` does), so that
        ``s.plan`` and, for a memtune-built optimizer, ``s.optimizer`` exist before training."""
        from memtune.batching import move_batch

        if self.plan is None:
            self._setup(move_batch(sample, self.device))

    # ------------------------------------------------------------------ AMP
    @property
    def _checks_gradients(self) -> bool:  # the scaler finds inf/NaN gradients and skips that step itself
        return self.grad_scaler is None

    def _backward(self, loss: torch.Tensor) -> None:
        if self.grad_scaler is None:
            loss.backward()
        else:
            self.grad_scaler.scale(loss).backward()

    def _optimizer_step(self) -> None:
        if self.grad_scaler is None:
            return super()._optimizer_step()
        self.grad_scaler.unscale_(self.optimizer)  # clip the true gradients, not the scaled ones
        if self.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.max_grad_norm)
        self.grad_scaler.step(self.optimizer)
        self.grad_scaler.update()
        self.optimizer.zero_grad(set_to_none=True)

    # ------------------------------------------------------------------ context
    def __enter__(self) -> "Session":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Undo the plan's forward changes and, on CUDA, the memory cap. The model keeps its
        trained weights; the optimizer keeps its state."""
        from memtune.apply import remove_plan

        remove_plan(self.model)
        if self.device.type == "cuda" and self.enforce_budget:
            torch.cuda.set_per_process_memory_fraction(1.0, self.device)


def session(model: nn.Module, budget: int | str | Budget = "24GB", **kwargs) -> Session:
    """memtune's runtime for a loop you own: ``with memtune.session(model, budget, optimizer=opt) as s:
    loss = s.step(batch)``. Arguments are :func:`memtune.fit`'s, plus ``optimizer`` as a live
    ``torch.optim.Optimizer`` and ``grad_scaler``; see :mod:`memtune.runtime.session`."""
    return Session(model, budget, **kwargs)


def _check_optimizer_params(model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    from memtune.compiled import unwrap

    owned = {id(p) for p in unwrap(model).parameters()}
    foreign = sum(1 for g in optimizer.param_groups for p in g["params"] if id(p) not in owned)
    if foreign:
        raise UsageError(f"{type(optimizer).__name__} holds {foreign} tensor(s) that are not parameters of the model; "
                         "build the optimizer on model.parameters() (after moving the model to its device)")


def optimizer_builder(optimizer: torch.optim.Optimizer, model: nn.Module):
    """``memtune.profile(model, batch, optimizer=optimizer_builder(opt, model))`` profiles with
    your optimizer, as a session does. A callable that builds ``optimizer``'s class with its param groups' hyperparameters on
    the profiler's fake parameters, so the profile records that optimizer's own state and step
    (for :func:`memtune.profile`'s ``optimizer=callable``). Fake parameters arrive in the order
    of ``model.named_parameters()`` restricted to those that require grad."""
    from memtune.compiled import unwrap

    trainable = [p for p in unwrap(model).parameters() if p.requires_grad]
    index = {id(p): i for i, p in enumerate(trainable)}
    groups = [([index[id(p)] for p in g["params"] if id(p) in index],
               {k: v for k, v in g.items() if k != "params"}) for g in optimizer.param_groups]
    cls = type(optimizer)

    def build(fake_params: list[torch.Tensor]) -> torch.optim.Optimizer:
        if len(fake_params) != len(trainable):
            raise UsageError(f"the model has {len(trainable)} trainable parameters but the profile fakes "
                             f"{len(fake_params)}; build the optimizer after freezing what stays frozen")
        # fused/capturable kernels need a real device; on fake CPU tensors the default path allocates alike.
        return cls([{"params": [fake_params[i] for i in idx],
                     **{k: v for k, v in hp.items() if k not in ("fused", "capturable")}} for idx, hp in groups if idx])

    build.__name__ = f"{cls.__name__}-as-passed"
    return build
