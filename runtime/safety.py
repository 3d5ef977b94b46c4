"""Checks the trainer runs so that a run never goes silently wrong.

* :func:`training_device` and :func:`check_trainable`: refuse a device torch cannot use, a
  model on the meta device, or something that is not a module, with a message that names
  the fix, before anything is allocated.
* :func:`non_finite_gradients`: whether a step's loss or gradients hold NaN/inf, checked
  after backward and *before* ``optimizer.step()`` so that nothing non-finite is applied.
  One max-abs reduction per gradient (an ``inf``-norm cannot overflow on finite values,
  unlike a 2-norm) and one device sync for all of them.
* :func:`budget_too_small` / :func:`step_kept_failing`: the two ways OOM recovery can end,
  told apart: no plan fits once the memory model is corrected by what was measured
  (``InfeasibleBudgetError`` with the true minimum), or plans fit but the step kept failing
  (``StepFailedError``: memory held elsewhere, or a transient fault).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn as nn

from memtune.errors import InfeasibleBudgetError, StepFailedError, UsageError
from memtune.units_fmt import fmt_bytes

NONFINITE_POLICIES = ("raise", "skip")


def training_device(device: str | torch.device | None) -> torch.device:
    """The torch device to train on; :class:`UsageError` for one torch cannot use here."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise UsageError(f"unknown device {device!r}: train on 'cpu', 'cuda' or 'cuda:N'") from e
    if dev.type not in ("cpu", "cuda"):
        raise UsageError(f"device {str(dev)!r} is not supported for training: memtune trains on 'cpu' or 'cuda' "
                         f"(device-table names such as 'H100' are for profile/plan --target)")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            built = f"built with CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
            raise UsageError(f"device {str(dev)!r} asked for, but torch sees no CUDA device (torch {torch.__version__}, "
                             f"{built}); train with device='cpu' (--device cpu), or run on a machine with a GPU")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise UsageError(f"device {str(dev)!r} does not exist: this machine has {torch.cuda.device_count()} CUDA "
                             f"device(s), cuda:0..cuda:{torch.cuda.device_count() - 1}")
    return dev


def check_trainable(model: Any) -> None:
    """A model memtune can train: an ``nn.Module`` whose tensors hold data."""
    if not isinstance(model, nn.Module):
        raise UsageError(f"the model is a {type(model).__name__}, not a torch.nn.Module; pass the module itself")
    if not any(p.requires_grad for p in model.parameters()):
        raise UsageError(f"the model ({type(model).__name__}) has no parameters that require grad, so there is nothing "
                         "to train; unfreeze some (module.requires_grad_(True)), or attach the adapters to train")
    on_meta = next((n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta), None)
    if on_meta is not None:
        raise UsageError(f"the model is on the meta device ({on_meta} holds no data): a meta model can be profiled "
                         f"and planned, not trained; build it on 'cpu' or 'cuda', or materialize it with "
                         f"model.to_empty(device=...) and initialise its weights")


def non_finite_gradients(model: nn.Module, limit: int = 3) -> list[str]:
    """Names of (up to ``limit``) parameters whose gradient holds NaN or inf; empty when all
    are finite. One device sync in the common, all-finite case."""
    named = [(n, p.grad) for n, p in model.named_parameters() if p.grad is not None]
    if not named:
        return []
    maxes = torch.stack([torch.linalg.vector_norm(g.detach(), math.inf).float() for _, g in named])
    finite = torch.isfinite(maxes)
    if bool(finite.all()):
        return []
    return [named[i][0] for i in (~finite).nonzero().flatten().tolist()[:limit]]


def budget_too_small(e: InfeasibleBudgetError, *, budget, correction: float, step: int, retries: int,
                     checkpoint: str | None) -> InfeasibleBudgetError:
    """No plan fits once predictions are corrected by what the failed steps measured: the
    smallest budget that would, with the correction applied."""
    reserve = budget.reserve_bytes
    planned_min = (e.min_feasible_bytes or 0) - reserve
    true_min = int(planned_min * correction)
    where = f"; the last checkpoint at {checkpoint} is intact" if checkpoint else ""
    msg = (f"the budget is too small: step {step} ran out of memory {retries} time(s), and with the memory model "
           f"corrected by the measured peaks ({correction:.2f}x its predictions) the most frugal plan needs about "
           f"{fmt_bytes(true_min)}, more than the {fmt_bytes(budget.usable_bytes)} usable of {budget.spec}. Give a "
           f"budget of at least {fmt_bytes(true_min + reserve)} ({true_min + reserve} bytes){where}")
    return InfeasibleBudgetError(msg, min_feasible_bytes=true_min + reserve, top_consumers=e.top_consumers,
                                 suggestions=e.suggestions)


def step_kept_failing(*, plan, budget, correction: float, step: int, failures: int, max_retries: int,
                      checkpoint: str | None) -> StepFailedError:
    where = (f"the last checkpoint at {checkpoint} is intact" if checkpoint
             else "no checkpoint was configured (pass checkpoint_path=... to keep progress)")
    return StepFailedError(
        f"step {step} ran out of memory {failures} times (max_oom_retries={max_retries}) although its plans fit the "
        f"budget (the last predicted "
        f"{fmt_bytes(plan.predicted_peak_bytes)} of {fmt_bytes(budget.usable_bytes)} usable, memory model corrected "
        f"{correction:.2f}x): something outside the plan holds memory (another process, a leak) or the fault is "
        f"transient. The trainer keeps its state and {where}; retry, raise max_oom_retries, or give a larger budget")
