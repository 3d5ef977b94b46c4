"""Data-parallel training with memtune: plans per rank, FSDP2 or DDP chosen by the planner.

Under ``torchrun`` (or inside an initialized process group) :func:`memtune.fit` detects the
job (:func:`detect`), treats the budget as per device, records the step at each rank's local
batch, plans with :func:`plan_distributed` (the per-rank memory model is
:mod:`memtune.distributed.memory`), checks that every rank holds the same plan (:func:`agree`)
and shards or replicates the model with torch's own engines (:func:`parallelize`).
See docs/distributed.md.
"""

from .context import DistributedContext, DistributedError, agree, all_ranks_ok, detect, digest
from .memory import per_rank_profile, shard_bytes
from .parallelize import parallelize, set_reshard_after_forward
from .planning import LINKS, STRATEGIES, Link, candidates, comm_seconds, plan_distributed

__all__ = ["DistributedContext", "DistributedError", "LINKS", "Link", "STRATEGIES", "agree", "all_ranks_ok",
           "candidates", "comm_seconds", "detect", "digest", "parallelize", "per_rank_profile", "plan_distributed",
           "set_reshard_after_forward", "shard_bytes"]
