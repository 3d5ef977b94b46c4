"""A torchrun job whose ranks fail twice and are restarted by torchrun, against a clean run.

    torchrun --standalone --nproc_per_node 2 --max-restarts 2 tests/distributed_resume_worker.py OUT_DIR

* attempt 0: a clean run of STEPS steps (FSDP2, a DCP checkpoint every 2 steps), its final full
  weights written to ``OUT_DIR/clean.pt``; then the same run again (``resumed``), in which rank 1
  kills itself with SIGKILL after step 3;
* attempt 1: ``resumed`` resumes from its step-2 checkpoint and finishes; then ``in_place``, in
  which rank 1 alone runs out of memory (injected) in the forward of step 4 and in the backward
  of step 5: every rank recovers in place (no restart) and retries the step; then ``oom`` (a
  checkpoint every step, ``max_oom_retries=0``) in which rank 1 runs out of memory in the
  forward of step 4 and every rank stops: the restart path;
* attempt 2: ``oom`` resumes from its step-3 checkpoint, every rank re-plans below the plan that
  failed, and the run finishes.

``tests/test_distributed.py`` asserts that the weights are bit-identical to the clean run's.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

import memtune
from memtune.distributed.checkpoint import is_distributed_checkpoint

sys.path.insert(0, str(Path(__file__).parent))
from distributed_worker import local, make_model  # noqa: E402
from memtune.data import TextCorpus  # noqa: E402

STEPS = 6
KILL_AFTER = 3
COLLECTIVE_TIMEOUT = 3.0
"""Seconds rank 0 waits inside a step for rank 1 before it joins the recovery."""
OPTIONS = dict(optimizer="adamw", progress=False, checkpoint_every=2, planner_options={"strategies": ("fsdp",)})


def batches(rank: int, world: int):
    corpus = TextCorpus.load()
    return [local(corpus.batch("train", 4 * world, 32, generator=torch.Generator().manual_seed(200 + k)), rank)
            for k in range(STEPS)]


def run(out: Path, name: str, *, kill: bool = False, oom: bool = False) -> None:
    rank, world = dist.get_rank(), dist.get_world_size()
    path = out / f"{name}.ckpt"
    options = dict(OPTIONS, checkpoint_every=1 if name == "oom" else 2, collective_timeout=COLLECTIVE_TIMEOUT)
    if name == "oom":
        options["max_oom_retries"] = 0  # no retry in place: the restart path
    if is_distributed_checkpoint(path):
        trainer = memtune.Trainer.resume(path, make_model(), "1GB", **options)
    else:
        trainer = memtune.fit(make_model(), budget="1GB", checkpoint_path=path, **options)
        if oom and rank == 1:
            trainer.inject_oom(KILL_AFTER, "forward")
            if name == "in_place":
                trainer.inject_oom(KILL_AFTER + 1, "backward")
    data = batches(rank, world)

    def loader():
        for k, b in enumerate(data):
            if kill and rank == 1 and trainer.step_count == KILL_AFTER:
                os.kill(os.getpid(), signal.SIGKILL)
            yield b

    trainer.train(_Reiterable(loader), steps=STEPS)
    weights = get_model_state_dict(trainer.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank == 0:
        torch.save({"weights": weights, "losses": [h["loss"] for h in trainer.history],
                    "steps": [h["step"] for h in trainer.history], "events": [e["kind"] for e in trainer.events],
                    "recompute": list(trainer.plan.recompute_units),
                    "attempt": int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")), "pid": os.getpid(),
                    "budgets": [e.get("budget_bytes") for e in trainer.events if e["kind"] in ("initial", "oom")],
                    "regroups": [e for e in trainer.events if e["kind"] == "regroup"]}, out / f"{name}.pt")
    dist.barrier()


class _Reiterable:
    def __init__(self, make):
        self.make = make

    def __iter__(self):
        return self.make()


def main(out: Path) -> None:
    memtune.distributed.detect()  # memtune initializes the group, under its own prefix after a restart
    if not (out / "clean.pt").exists():
        run(out, "clean", kill=False)
    attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    if not (out / "resumed.pt").exists():
        run(out, "resumed", kill=attempt == 0)
    if not (out / "in_place.pt").exists():
        run(out, "in_place", oom=True)
    run(out, "oom", oom=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
