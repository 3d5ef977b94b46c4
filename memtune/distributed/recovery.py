"""Out-of-memory recovery in place across ranks: no process restarts.

An out-of-memory error on one rank leaves the others inside the step's collectives, waiting
for a rank that has left the step. torch has no way to cancel a collective already waiting (a
gloo ``abort`` does nothing), so the trainer brings every rank to the same decision this way:

1. **A deadline on the step's collectives** (:func:`step_deadline`, ``collective_timeout`` in
   :func:`memtune.fit`): a rank waiting inside a step for a peer that left it fails after that
   long, not after the process group's default (30 minutes on gloo, 10 on NCCL).
2. **A record per rank in the rendezvous store** (:func:`exchange`), not in the process
   group, which the failure has left with unmatched collectives: whether this rank ran out of
   memory, whether its failure can be retried (no parameter updated yet), its measured peak.
3. **One decision from the records**, the same on every rank. An out-of-memory error
   anywhere, and no rank past its optimizer step, is retried in place; anything else is
   raised on every rank, so torchrun's restart path (``--max-restarts`` and a checkpoint)
   takes over, as for a rank that died.
4. **The process group rebuilt in place** (:func:`rebuild`): destroyed and initialized
   again on the same store under a fresh prefix. torch names the groups again from zero after
   the world group is destroyed, so FSDP2's device meshes resolve their groups by the same
   names; the groups FSDP2 and the sharded optimizer hold are refreshed, FSDP2's iteration
   state is reset (``FSDPModule.reset_iter_state``: the failed step's gradients are dropped)
   and DDP's reducer is built again.

The trainer then re-plans tighter (every rank plans from agreed readings and checks the plan
by hash) and retries the same global batch with the same RNG state. Tested with gloo on CPU
(``tests/test_distributed.py``); on NCCL a timed-out collective is torn down by the NCCL
watchdog (``TORCH_NCCL_ASYNC_ERROR_HANDLING``) before this code runs, so there the restart
path applies: not validated on GPUs (docs/distributed.md).
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import time
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed import distributed_c10d as c10d

from memtune.errors import DistributedError, StepFailedError

KEY = "memtune/recovery"
_generations = 0


def next_generation() -> int:
    """A number for the next failure, unique in this process and the same on every rank (every
    rank goes through the same failures of the same trainers, in order): store keys and group
    prefixes of one failure never meet another's, even across trainers in one process."""
    global _generations
    _generations += 1
    return _generations


def _prefix(generation: int) -> str:
    # torchrun's agent keeps one store across restarts: the attempt keeps an attempt's keys apart.
    return f"{KEY}/a{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}/{generation}/"


def _backend_timeout(pg: dist.ProcessGroup) -> timedelta | None:
    """The group's own collective timeout, or ``None`` where its backend does not say."""
    for device in pg._device_types:
        try:
            options = getattr(pg._get_backend(device), "options", None)
        except RuntimeError:  # (no backend registered for that device type)
            continue
        timeout = getattr(options, "_timeout", None)
        if isinstance(timeout, timedelta):
            return timeout
    return None


@contextlib.contextmanager
def step_deadline(seconds: float | None):
    """Every process group's collectives time out after ``seconds`` inside the block (``None``:
    unchanged); the groups' own timeouts come back after it."""
    if seconds is None or not dist.is_initialized():
        yield
        return
    # Only groups whose own timeout can be read (and so restored) get the deadline.
    groups = [(pg, t) for pg in list(c10d._world.pg_map) if (t := _backend_timeout(pg)) is not None]
    for pg, _ in groups:
        pg.set_timeout(timedelta(seconds=seconds))
    try:
        yield
    finally:
        for pg, timeout in groups:
            if pg in c10d._world.pg_map:  # (a rebuilt group has its own)
                pg.set_timeout(timeout)


def exchange(store: dist.Store, generation: int, record: dict[str, Any], *, rank: int, world: int,
             wait_s: float) -> list[dict[str, Any]]:
    """Write this rank's record for failure ``generation`` and read every rank's, through the
    store; a rank that does not report within ``wait_s`` is gone (a :class:`DistributedError`)."""
    prefix = _prefix(generation)
    store.set(prefix + str(rank), json.dumps(record))
    keys = [prefix + str(r) for r in range(world)]
    try:
        store.wait(keys, timedelta(seconds=wait_s))
    except RuntimeError as e:  # (torch raises a DistStoreError, a RuntimeError, on timeout)
        missing = [r for r in range(world) if not store.check([prefix + str(r)])]
        raise DistributedError(
            f"rank {rank}: the step failed ({record['error']}) and rank(s) {missing} did not report within "
            f"{wait_s:g} s: they died or hang; torchrun's restart path (--max-restarts, with checkpoint_path=) "
            "resumes the job from its last checkpoint") from e
    return [json.loads(store.get(k)) for k in keys]


def decide(records: list[dict[str, Any]]) -> str | None:
    """``None`` when every rank may retry the step in place, else why not (the same text on
    every rank)."""
    ooms = [r for r in records if r["oom"]]
    if not ooms:
        failed = "; ".join(f"rank {r['rank']}: {r['error']}" for r in records)
        return f"the step failed on every rank and no rank ran out of memory ({failed})"
    stuck = [r for r in records if not r["retry_safe"]]
    if stuck:
        where = "; ".join(f"rank {r['rank']} {r['where']}" for r in stuck)
        return (f"rank(s) {[r['rank'] for r in ooms]} ran out of memory, but parameters are partly updated ({where}): "
                "the step cannot run again in place")
    return None


def fsdp_root(model: torch.nn.Module):
    """The module the top-level ``fully_shard`` was applied to, or ``None`` (not FSDP2)."""
    from torch.distributed.fsdp import FSDPModule

    for m in model.modules():
        if isinstance(m, FSDPModule):
            state = m._get_fsdp_state()
            if getattr(state, "_is_root", None) is not False:
                return m
    return None


def can_rebuild(trainer) -> str | None:
    """``None`` when :func:`rebuild` can bring ``trainer`` back in place, else why not."""
    if trainer.plan.parallel.strategy in ("fsdp", "hsdp"):
        from torch.distributed.fsdp import FSDPModule

        if not hasattr(FSDPModule, "reset_iter_state"):
            return (f"torch {torch.__version__} has no FSDPModule.reset_iter_state (torch 2.13 has it), which "
                    "in-place recovery needs to drop FSDP2's half-finished step")
    return None


def rebuild(trainer, generation: int, store: dist.Store) -> float:
    """Destroy and initialize the process group again on ``store`` (the job's rendezvous store)
    under a fresh prefix, and bring FSDP2 or DDP, and the sharded optimizer, onto the new
    groups. Returns the seconds it took."""
    t0 = time.perf_counter()
    par = trainer.plan.parallel
    default = c10d._get_default_group()
    backend, name = dist.get_backend(default), default.group_name
    timeout = _backend_timeout(default) or c10d._get_default_timeout(backend)
    rank, world = dist.get_rank(), dist.get_world_size()
    start = None
    if par.strategy == "hsdp":
        start = next((s for info in _mesh_infos(trainer.model)
                      if (s := getattr(info.mesh, "_memtune_group_start", None)) is not None), None)
        if start is None:
            raise DistributedError("the HSDP device mesh was not built by memtune.distributed.parallelize, so its "
                                   "process groups cannot be rebuilt under the same names; restart the job instead")
    if par.strategy == "ddp":
        trainer._forward = None  # the old reducer (and its autograd hooks) goes with its wrapper
        gc.collect()
    c10d.destroy_process_group()
    dist.init_process_group(backend, store=dist.PrefixStore(_prefix(generation) + "group/", store), rank=rank,
                            world_size=world, timeout=timeout)
    if dist.group.WORLD.group_name != name:
        raise DistributedError(f"the rebuilt process group is named {dist.group.WORLD.group_name!r}, not {name!r}: "
                               "the device meshes cannot find it; restart the job (torchrun --max-restarts)")
    from memtune.distributed.parallelize import hsdp_mesh, parallelize

    if par.strategy == "ddp":
        trainer._forward = parallelize(trainer.model, trainer.plan, trainer.device)
    else:
        if par.strategy == "hsdp":
            # The mesh's sub-groups, created again in the same order from the same counter: the same names.
            count, c10d._world.group_count = c10d._world.group_count, start
            hsdp_mesh(par, trainer.device)
            c10d._world.group_count = max(count, c10d._world.group_count)
        _rebind_groups(trainer.model, trainer.optimizer)
        fsdp_root(trainer.model).reset_iter_state()
        _drop_unsharded_grads(trainer.model)
    # ShardedMuon2 gathers within the shard group under HSDP (the default group otherwise): the
    # one FSDP2 now holds (a parameter's own mesh may be an equal one cached from another model).
    from memtune.distributed.checkpoint import _parts
    from memtune.distributed.muon import ShardedMuon2

    shard = _mesh_infos(trainer.model)[0].shard_process_group if par.strategy == "hsdp" else None
    for part in _parts(trainer.optimizer):
        if isinstance(part, ShardedMuon2):
            part.process_group = shard
    return time.perf_counter() - t0


def _fsdp_param_groups(model: torch.nn.Module):
    """FSDP2's parameter groups, over ``model``'s sharded modules."""
    from torch.distributed.fsdp import FSDPModule

    for m in model.modules():
        if isinstance(m, FSDPModule):
            yield from m._get_fsdp_state()._fsdp_param_groups


def _mesh_infos(model: torch.nn.Module) -> list:
    """Every FSDP2 mesh-info object of ``model``'s units and parameters (they hold process groups)."""
    infos = {}
    for group in _fsdp_param_groups(model):
        for owner in (group, *group.fsdp_params):
            for info in (getattr(owner, "mesh_info", None), getattr(owner, "post_forward_mesh_info", None)):
                if info is not None:
                    infos[id(info)] = info
    return list(infos.values())


def _layout(mesh) -> tuple:
    return tuple(mesh.mesh.flatten().tolist()), tuple(mesh.mesh.shape)


def _rebind_groups(model: torch.nn.Module, optimizer) -> None:
    """Point ``model``'s device meshes and FSDP2's mesh-info objects at the rebuilt groups.

    A sharded parameter's DTensor may carry an equal mesh that FSDP2 found cached from an
    earlier model in this process, under that model's group names (gone with the old groups):
    each such name is registered again for the rebuilt group along the same dimension of the
    live mesh with the same layout."""
    infos = _mesh_infos(model)
    live = {_layout(info.mesh): info.mesh for info in infos}
    params = [p for g in getattr(optimizer, "param_groups", []) for p in g["params"]]
    meshes = {}
    for mesh in [*(info.mesh for info in infos), *(getattr(p, "device_mesh", None) for p in params)]:
        for m in (mesh, getattr(mesh, "_root_mesh", None)):
            if m is not None:
                meshes[id(m)] = m
    for mesh in meshes.values():
        names = list(getattr(mesh, "_dim_group_names", []))
        try:
            for dim, name in enumerate(names):
                try:
                    c10d._resolve_process_group(name)
                except (RuntimeError, ValueError):
                    twin = live.get(_layout(mesh))
                    if twin is None or twin is mesh:
                        raise
                    c10d._register_process_group(name, twin.get_group(dim))
            groups = {n: c10d._resolve_process_group(n) for n in names}
        except (RuntimeError, ValueError) as e:
            raise DistributedError(f"the rebuilt process groups do not include the device mesh's {names} ({e}); "
                                   "restart the job instead (torchrun --max-restarts)") from e
        registry = getattr(mesh, "_pg_registry", None)
        if registry is not None:
            registry.clear()
            registry.update(groups)
    for info in infos:
        if getattr(info, "shard_mesh_dim", None) is not None:
            info.shard_process_group = info.mesh.get_group(info.shard_mesh_dim)
        if getattr(info, "replicate_mesh_dim", None) is not None:
            info.replicate_process_group = info.mesh.get_group(info.replicate_mesh_dim)
        if hasattr(info, "reduce_scatter_process_group"):
            info.reduce_scatter_process_group = None


def _drop_unsharded_grads(model: torch.nn.Module) -> None:
    """Gradients a unit computed before its reduce-scatter failed stay on its unsharded
    parameters (``reset_iter_state`` leaves them): the retry would add its own to them."""
    for group in _fsdp_param_groups(model):
        for fp in group.fsdp_params:
            unsharded = getattr(fp, "_unsharded_param", None)
            if unsharded is not None:
                unsharded.grad = None
            fp.unsharded_accumulated_grad = None


def refuse(reason: str, *, rank: int, step: int, own: BaseException) -> StepFailedError:
    """The error every rank raises when the step cannot be retried in place."""
    return StepFailedError(f"rank {rank}, step {step}: {reason}. torchrun's restart path takes over: with "
                           "checkpoint_path= and checkpoint_every=1 and torchrun --max-restarts N the job resumes "
                           f"from its last checkpoint (this rank's error: {type(own).__name__}: "
                           f"{str(own).splitlines()[0][:200] if str(own) else ''})")
