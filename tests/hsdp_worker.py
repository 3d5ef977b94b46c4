"""A torchrun job of 4 ranks as a 2 x 2 HSDP mesh (shard within pairs, replicate across them).

    torchrun --standalone --nproc_per_node 4 tests/hsdp_worker.py OUT_DIR

Each rank runs ``memtune.fit`` with ``strategies=("hsdp",)`` and ``shard_size=2`` on its local
batch, for AdamW and for Muon² (whose Newton-Schulz runs on owner ranks of each shard group), and
measures its last step with ``FSDPMemTracker``. Under Muon², rank 3 alone runs out of memory
(injected) in the backward of step 2: every rank recovers in place and retries the step. ``tests/test_hsdp.py`` compares the losses with
one process on the global batch and the measured peaks with the predictions.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch.distributed as dist

import memtune

sys.path.insert(0, str(Path(__file__).parent))
from distributed_worker import global_batches, local, make_model, measured_run  # noqa: E402

OPTIONS = {"strategies": ("hsdp",), "shard_size": 2}


def main(out: Path) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    batches = [local(b, rank) for b in global_batches(world)]
    result = {}
    for optimizer in ("adamw", "muon2"):
        trainer = memtune.fit(make_model(), budget="1GB", optimizer=optimizer, progress=False, planner_options=OPTIONS,
                              collective_timeout=5)
        if optimizer == "muon2" and rank == 3:
            trainer.inject_oom(1, "backward")  # every rank recovers in place: the 2-D mesh's groups rebuilt
        measured = measured_run(trainer, batches)
        plan = trainer.plan
        result[optimizer] = {
            "losses": [h["loss"] for h in trainer.history], "strategy": plan.parallel.strategy,
            "shard_size": plan.parallel.shard_size, "predicted_peak_bytes": plan.predicted_peak_bytes,
            "measured_peak_bytes": measured, "plan_hash": memtune.distributed.digest(plan.to_dict()),
            "regroups": [(e["step"], e["ranks"]) for e in trainer.events if e["kind"] == "regroup"],
            "parts": sorted(type(p).__name__ for p in getattr(trainer.optimizer, "parts", {}).values())}
    (out / f"rank{rank}.json").write_text(json.dumps(result))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
