"""Lower a plan's :class:`~memtune.plan.ParallelPlan` to torch.distributed's own engines.

* ``fsdp``: ``torch.distributed.fsdp.fully_shard`` on every unit (bottom-up, in execution
  order) with the plan's ``reshard_after_forward``, then on the root, as torchtitan does. Unit
  decisions (activation checkpointing) are applied by :func:`memtune.apply_plan` to the unit's
  own ``forward``, which FSDP2's pre/post-forward hooks wrap: the recompute in backward runs
  after FSDP2's pre-backward all-gather, on unsharded parameters, the order FSDP2 expects.
* ``hsdp``: the same on a 2-D device mesh (replicate across groups of ``shard_size`` ranks, shard
  within one): FSDP2's hybrid sharding.
* ``ddp``: ``DistributedDataParallel(gradient_as_bucket_view=True)``. The wrapper is only
  used to call the model, so parameter FQNs, state dicts and plans keep the user's names.

Call :func:`parallelize` before building the optimizer: FSDP2 replaces parameters by DTensors.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from memtune.plan import Plan


def parallelize(model: nn.Module, plan: Plan, device: torch.device) -> nn.Module:
    """Shard or replicate ``model`` in place as ``plan.parallel`` says; returns the module to
    call for forward (``model`` itself under FSDP2, its DDP wrapper under DDP)."""
    par = plan.parallel
    if par is None:
        return model
    if par.strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        ids = [device.index] if device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids, gradient_as_bucket_view=True)
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) \
        if par.mixed_precision == "bf16" else MixedPrecisionPolicy()
    mesh = hsdp_mesh(par, device) if par.strategy == "hsdp" else None
    modules = dict(model.named_modules())
    for fqn in plan.decisions:  # execution order
        if fqn not in modules:  # a call of a shared module, or a segment (memtune.units): the root shards it
            continue
        fully_shard(modules[fqn], reshard_after_forward=par.reshard_after_forward.get(fqn, True), mp_policy=mp,
                    mesh=mesh)
    fully_shard(model, mp_policy=mp, mesh=mesh)
    return model


def hsdp_mesh(par, device: torch.device):
    """HSDP's 2-D device mesh: replicate across groups (nodes) of ``par.shard_size`` ranks, shard
    within one. Its sub-groups are created in a fixed order, named by torch's group counter from
    the value it had here: a rebuilt process group (:mod:`memtune.distributed.recovery`) sets the
    counter back to it and creates them again, under the same names."""
    from torch.distributed import distributed_c10d as c10d
    from torch.distributed.device_mesh import init_device_mesh

    start = c10d._world.group_count  # torch names unnamed groups by this counter
    mesh = init_device_mesh(device.type, (par.world_size // par.shard_size, par.shard_size),
                            mesh_dim_names=("replicate", "shard"))
    mesh._memtune_group_start = start
    return mesh


def set_reshard_after_forward(model: nn.Module, plan: Plan) -> None:
    """Follow a re-plan's ``reshard_after_forward`` on an already sharded model."""
    par = plan.parallel
    if par is None or par.strategy not in ("fsdp", "hsdp"):
        return
    modules = dict(model.named_modules())
    for fqn, flag in par.reshard_after_forward.items():
        m = modules.get(fqn)
        if m is not None and hasattr(m, "set_reshard_after_forward"):
            m.set_reshard_after_forward(flag, recurse=False)
