"""Checkpoints of a data-parallel run with ``torch.distributed.checkpoint`` (DCP).

A checkpoint is a directory:

* the model and optimizer state, saved by every rank with ``dcp.save`` from
  ``get_state_dict`` (FSDP2 shards stay shards; DDP's replicas are written once), so DCP can
  load them at this or (where DCP can reshard) another world size;
* ``rank<r>.pt`` per rank (:func:`memtune.runtime.checkpoint.save_atomic`: checksummed): the
  plan, the profile, the step, the data position, the history and that rank's RNG state.

It is written to ``<path>.tmp`` and renamed into place by rank 0 after every rank finished
(a barrier), so a ``kill -9`` at any moment leaves the previous checkpoint whole. Resuming
(:func:`resume`) rebuilds the plan's layout on a fresh model, then loads the state in place.

**Out of memory across ranks, when it cannot be retried in place**
(:mod:`memtune.distributed.recovery`). The rank that ran out of memory writes what failed
(step, plan, peak) to ``<path>.oom-rank<r>.json`` (:func:`record_oom`), every rank raises
:class:`~memtune.errors.StepFailedError`, and torchrun, with ``--max-restarts``, restarts the job.
:func:`resume` reads every rank's record (the same files on every rank), plans every rank
below the smallest failed peak with exact-maths options first, checks that all ranks hold the
same new plan, and retries from the checkpoint: with ``checkpoint_every=1``, the very batch
that failed.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch.distributed as dist

from memtune.errors import CheckpointError, PlanFileError
from memtune.plan import Plan
from memtune.profile import ModelProfile


def _parts(optimizer) -> tuple:
    """The torch optimizers DCP sees: a :class:`memtune.optim.HybridOptimizer`'s parts (their
    parameters are disjoint, so DCP's flattened state keys stay unique)."""
    parts = getattr(optimizer, "parts", None)
    return tuple(parts.values()) if parts else (optimizer,)


def is_distributed_checkpoint(path: str | Path) -> bool:
    return Path(path).is_dir() and any(Path(path).glob("rank*.pt"))


def save(trainer, path: str | Path) -> Path:
    """Write ``trainer``'s state to the directory ``path`` (collective: every rank calls it)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    from memtune.runtime import checkpoint as ckpt

    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    if trainer.dist.is_main and tmp.exists():
        shutil.rmtree(tmp)  # what a killed save left
    dist.barrier()
    model_state, optim_state = get_state_dict(trainer.model, _parts(trainer.optimizer))
    dcp.save({"model": model_state, "optimizer": optim_state}, checkpoint_id=str(tmp))
    ckpt.save_atomic({
        "model": {}, "optimizer": {},  # in the DCP files next to this one
        "retuner": trainer.retuner.state_dict(),
        "plan": trainer.plan.to_dict(), "profile": trainer.profile.to_dict(), "plan_version": trainer.plan_version,
        "plan_budget_bytes": trainer.plan_budget_bytes, "budget_usable_bytes": trainer.budget.usable_bytes,
        "step": trainer.step_count, "batches_seen": trainer.batches_seen, "rng": ckpt.rng_state(),
        "history": trainer.history, "events": trainer.events, "world_size": trainer.dist.world_size,
    }, tmp / f"rank{trainer.dist.rank}.pt")
    dist.barrier()
    if trainer.dist.is_main:
        old = path.with_name(path.name + ".old")
        if old.exists():
            shutil.rmtree(old)
        if path.exists():
            path.rename(old)
        tmp.rename(path)
        if old.exists():
            shutil.rmtree(old)
    dist.barrier()
    return path


def resume(cls, path: str | Path, model, budget, **fit_kwargs):
    """A trainer (every rank) that continues the run saved in the directory ``path``."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    from memtune.runtime import checkpoint as ckpt

    path = Path(path)
    fit_kwargs.setdefault("checkpoint_path", path)
    trainer = cls(model, budget, **fit_kwargs)
    if trainer.dist is None:
        raise CheckpointError(f"{path} is a checkpoint of a run across ranks; resume it under torchrun")
    mine = path / f"rank{trainer.dist.rank}.pt"
    state: dict[str, Any] = ckpt.load(mine if mine.exists() else path / "rank0.pt")
    try:
        profile = ModelProfile.from_dict(state["profile"])
        plan = Plan.from_dict(state["plan"])
    except PlanFileError as e:
        raise CheckpointError(f"checkpoint {path}: {e}") from e
    trainer.profile = profile
    if plan.parallel is None or plan.parallel.world_size != trainer.dist.world_size:
        # Another world size: plan this one (DCP reshards the state on load).
        plan = trainer._make_plan(trainer.retuner.planning_budget(trainer.budget.usable_bytes), lossless=True)
    trainer._install(plan, kind="resume", reason=f"resumed from {path} at step {state['step']}")
    model_state, optim_state = get_state_dict(trainer.model, _parts(trainer.optimizer))
    dcp.load({"model": model_state, "optimizer": optim_state}, checkpoint_id=str(path))
    set_state_dict(trainer.model, _parts(trainer.optimizer), model_state_dict=model_state,
                   optim_state_dict=optim_state)
    trainer.plan_version = state["plan_version"]
    trainer.step_count = state["step"]
    trainer.batches_seen = state["batches_seen"]
    trainer._saved_step = state["step"]
    trainer.retuner.load_state_dict(state["retuner"])
    trainer.history = list(state["history"])
    trainer.events = list(state["events"]) + trainer.events[-1:]
    _replan_after_oom(trainer, path)
    if mine.exists():
        ckpt.set_rng_state(state["rng"])
    return trainer


def _oom_records(path: Path) -> list[Path]:
    return sorted(path.parent.glob(path.name + ".oom-rank*.json"))


def record_oom(trainer, error: BaseException, peak: int | None) -> Path:
    """Write this rank's out-of-memory evidence (step, plan, measured ``peak``) next to
    ``trainer.checkpoint_path``, where :func:`resume` reads it to re-plan every rank below it;
    the file written."""
    rank, where = trainer.dist.rank, trainer.checkpoint_path
    record = {"rank": rank, "step": trainer.step_count, "plan_version": trainer.plan_version,
              "predicted_peak_bytes": trainer.plan.predicted_peak_bytes, "usable_bytes": trainer.plan.usable_bytes,
              "measured_peak_bytes": peak, "error": str(error)[:500]}
    target = where.with_name(f"{where.name}.oom-rank{rank}.json")
    tmp = target.with_name(target.name + f".{os.getpid()}")
    tmp.write_text(json.dumps(record))
    os.replace(tmp, target)
    return target


def _replan_after_oom(trainer, path: Path) -> None:
    records = [json.loads(p.read_text()) for p in _oom_records(path)]
    dist.barrier()  # every rank has read the records before rank 0 removes them
    if trainer.dist.is_main:
        for p in _oom_records(path):
            p.unlink()
    if not records:
        return
    failed_peak = min(r["predicted_peak_bytes"] for r in records)
    budget = min(trainer.budget.usable_bytes, failed_peak - 1)
    ranks = sorted({r["rank"] for r in records})
    plan = trainer._make_plan(budget, lossless=True)  # collective: all ranks plan and agree
    trainer._install(plan, kind="oom-replan",
                     reason=f"rank(s) {ranks} ran out of memory at step {min(r['step'] for r in records)} with a plan "
                            f"predicted at {failed_peak} bytes; re-planned every rank below it")
