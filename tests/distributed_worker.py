"""One torchrun job that runs every distributed check and writes what it saw as JSON.

    torchrun --nproc_per_node 2 tests/distributed_worker.py OUT_DIR

Each rank writes ``OUT_DIR/rank<r>.json``; ``tests/test_distributed.py`` launches it once and
asserts on the files, against single-process references it computes itself. Checks:

* ``exact_<strategy>``: fp32 AdamW losses of ``memtune.fit`` on this rank's half of each
  global batch, with the layout forced to FSDP2 or DDP (under DDP rank 1 runs out of memory in
  the backward of step 2, recovered in place on both ranks); ``muon2_<strategy>``: the same with
  Muon² (sharded, owner-rank Newton-Schulz, under FSDP2);
* ``budget``: a per-rank budget below what one process can plan; the plan, and the peak of a
  steady-state step measured by PyTorch's ``FSDPMemTracker``;
* ``infeasible``: a budget no layout fits: the error each rank raised;
* ``muon2``: Muon² on FSDP2 shards (owner-rank Newton-Schulz) against Muon² on DDP replicas.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

import memtune
from memtune import zoo
from memtune.data import TextCorpus
from memtune.levers import parallel_restrictions

STEPS = 4
LOCAL_BATCH = 4
SEQ = 32
CONFIG = dict(n_layer=4, n_embd=128, n_head=2, block_size=SEQ)


def make_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return zoo.GPT(zoo.GPTConfig(**CONFIG))


def global_batches(world_size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    corpus = TextCorpus.load()
    return [corpus.batch("train", LOCAL_BATCH * world_size, SEQ, generator=torch.Generator().manual_seed(100 + k))
            for k in range(STEPS)]


def local(batch, rank: int):
    return tuple(t[rank * LOCAL_BATCH:(rank + 1) * LOCAL_BATCH] for t in batch)


def sharded_muon2_against_replicated(rank: int) -> dict:
    """Muon² on FSDP2 shards (ShardedMuon2: owner-rank Newton-Schulz) against Muon² on DDP
    replicas, same data, fp32 NS; matrices with row counts that do not divide by the ranks."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from torch.distributed.fsdp import fully_shard
    from torch.nn.parallel import DistributedDataParallel

    from memtune.distributed.muon import ShardedMuon2
    from memtune.optim import Muon2

    def mlp():
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Linear(24, 37, bias=False), torch.nn.Tanh(),
                                   torch.nn.Linear(37, 53, bias=False), torch.nn.Tanh(), torch.nn.Linear(53, 8, bias=False))

    g = torch.Generator().manual_seed(rank)
    data = [(torch.randn(16, 24, generator=g), torch.randn(16, 8, generator=g)) for _ in range(STEPS)]
    kw = dict(lr=0.02, ns_steps=5, ns_dtype=torch.float32)
    replica = mlp()
    ddp, ddp_opt = DistributedDataParallel(replica), Muon2(replica.parameters(), **kw)
    sharded = mlp()
    for m in sharded:
        if isinstance(m, torch.nn.Linear):
            fully_shard(m)
    fully_shard(sharded)
    sharded_opt = ShardedMuon2(sharded.parameters(), **kw)
    for x, y in data:
        for model, opt in ((ddp, ddp_opt), (sharded, sharded_opt)):
            torch.nn.functional.mse_loss(model(x), y).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    full = get_model_state_dict(sharded, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank != 0:
        return {}  # the full weights are gathered on rank 0
    init = mlp().state_dict()
    return {k: {"rel_diff": float((full[k] - v).norm() / v.norm()), "moved": float((v - init[k]).norm())}
            for k, v in replica.state_dict().items()}


def muon2_checkpoint_resume(rank: int, batches, clean, out_dir: Path) -> dict:
    """Muon² on FSDP2 shards (ShardedMuon2), checkpointed with DCP at step 2 and resumed by a
    fresh trainer on a fresh model, against the uninterrupted run ``clean`` of the same options."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    opts = dict(optimizer="muon2", progress=False, planner_options={"strategies": ("fsdp",)})
    path = out_dir / "muon2.ckpt"
    first = memtune.fit(make_model(), budget="1GB", checkpoint_path=path, checkpoint_every=2, **opts)
    first.train(batches[:2], steps=2)
    resumed = memtune.Trainer.resume(path, make_model(), "1GB", checkpoint_path=path, checkpoint_every=2, **opts)
    resumed.train(batches, steps=STEPS)

    def full(trainer):
        return get_model_state_dict(trainer.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    a, b = full(clean), full(resumed)
    out = {"parts": sorted(type(p).__name__ for p in getattr(resumed.optimizer, "parts", {}).values()),
           "clean_losses": [h["loss"] for h in clean.history], "resumed_losses": [h["loss"] for h in resumed.history],
           "events": [e["kind"] for e in resumed.events]}
    if rank == 0:
        out["equal"] = {k: bool(torch.equal(a[k], b[k])) for k in a}
        out["moved"] = {k: float((a[k] - v).norm()) for k, v in make_model().state_dict().items() if k in a}
    return out


THIRTY_CONFIG = dict(n_layer=4, n_embd=128, n_head=2, block_size=256)
THIRTY_STEPS = 2


def thirty_percent_batches(world_size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    corpus = TextCorpus.load()
    return [corpus.batch("train", LOCAL_BATCH * world_size, THIRTY_CONFIG["block_size"],
                         generator=torch.Generator().manual_seed(300 + k)) for k in range(THIRTY_STEPS)]


def thirty_percent_model():
    torch.manual_seed(0)
    return zoo.GPT(zoo.GPTConfig(**THIRTY_CONFIG))


def measured_run(trainer, batches) -> int:
    """Train ``trainer`` on all but the last batch, then the last one under FSDPMemTracker: its peak."""
    from torch.distributed._tools.fsdp2_mem_tracker import FSDPMemTracker

    trainer.train(batches[:-1], steps=len(batches) - 1)
    tracker = FSDPMemTracker(trainer.model, optm=trainer.optimizer)
    piece = trainer.runner._piece

    def each_piece(*args, **kwargs):
        # FSDPMemTracker refuses a second root forward in one tracked region (each micro-batch
        # is one): clear its per-module stats between them; the peak it tracks is kept.
        tracker.reset_mod_stats()
        return piece(*args, **kwargs)

    trainer.runner._piece = each_piece
    with tracker:
        trainer.step(batches[-1])
    trainer.runner._piece = piece
    return int(tracker.get_tracker_snapshot("peak")[torch.device("cpu")]["Total"])


def chunked_loss(rank: int, world: int) -> dict:
    """The thirty-percent model with its head and loss in 4 chunks, on FSDP2."""
    batches = [local(b, rank) for b in thirty_percent_batches(world)]
    trainer = memtune.fit(thirty_percent_model(), budget="1GB", optimizer="adamw", progress=False,
                          planner_options={"levers": {"loss_chunks": (4,)}, "strategies": ("fsdp",)})
    measured = measured_run(trainer, batches)
    plan = trainer.plan
    return {"usable_bytes": plan.usable_bytes, "predicted_peak_bytes": plan.predicted_peak_bytes,
            "measured_peak_bytes": measured, "loss_chunks": plan.variant["loss_chunks"],
            "strategy": plan.parallel.strategy, "losses": [h["loss"] for h in trainer.history]}


def bf16_mixed(rank: int, world: int) -> dict:
    """The thirty-percent model in bf16-mixed on FSDP2 (MixedPrecisionPolicy: bf16 parameters,
    fp32 reduce) at half its single-process unplanned peak per rank, measured by FSDPMemTracker."""
    batches = [local(b, rank) for b in thirty_percent_batches(world)]
    prof = memtune.profile(thirty_percent_model(), batches[0], optimizer="adamw", target="cpu", precision="bf16-mixed",
                           space=memtune.PlanSpace.minimal())
    trainer = memtune.fit(thirty_percent_model(), budget=int(0.5 * prof.baseline_peak_bytes), optimizer="adamw",
                          progress=False, precision="bf16-mixed", planner_options={"strategies": ("fsdp",)})
    measured = measured_run(trainer, batches)
    plan = trainer.plan
    return {"usable_bytes": plan.usable_bytes, "predicted_peak_bytes": plan.predicted_peak_bytes,
            "measured_peak_bytes": measured, "mixed_precision": plan.parallel.mixed_precision,
            "losses": [h["loss"] for h in trainer.history]}


RETUNE_STEPS = 9


def agreed_retune(rank: int, world: int) -> dict:
    """Live re-tuning across ranks: only rank 1's (replayed) device loses memory to another
    process, from step 3 to step 6; every rank must tighten and relax together, to the same plans."""
    from memtune.runtime.retune import RetuneConfig
    from memtune.runtime.telemetry import DEFAULT_CONTEXT_BYTES_ESTIMATE, SyntheticDevice

    corpus = TextCorpus.load()
    batches = [local(corpus.batch("train", LOCAL_BATCH * world, THIRTY_CONFIG["block_size"],
                                  generator=torch.Generator().manual_seed(500 + k)), rank) for k in range(RETUNE_STEPS)]
    prof = memtune.profile(thirty_percent_model(), batches[0], optimizer="adamw", target="cpu",
                           space=memtune.PlanSpace.minimal())
    budget = prof.baseline_peak_bytes // 2
    ctx = DEFAULT_CONTEXT_BYTES_ESTIMATE
    device = SyntheticDevice(total_bytes=ctx + 2 * budget, our_reserved_bytes=budget // 4, context_bytes=ctx)
    if rank == 1:
        device = device.grab(2 * budget - int(0.65 * budget), at_step=3, release_step=6)
    trainer = memtune.fit(thirty_percent_model(), budget=budget, optimizer="adamw", progress=False,
                          telemetry=[device.replay(RETUNE_STEPS + 1)], retune_config=RetuneConfig(relax_after_steps=2))
    trainer.train(batches, steps=RETUNE_STEPS)
    return {"budget_bytes": budget,
            "events": [[e["kind"], e["step"], e["predicted_peak_bytes"], e["recompute"], e["variant"]]
                       for e in trainer.events],
            "losses": [h["loss"] for h in trainer.history]}


def thirty_percent(rank: int, world: int) -> dict:
    """A GPT whose activations dominate (seq 256) at 30% of its single-process unplanned peak
    per rank: fit must combine sharding with the other levers (micro-batching, recompute). One
    steady-state step is measured by FSDPMemTracker."""
    batches = [local(b, rank) for b in thirty_percent_batches(world)]
    prof = memtune.profile(thirty_percent_model(), batches[0], optimizer="adamw", target="cpu",
                           space=memtune.PlanSpace.minimal())
    budget = int(0.30 * prof.baseline_peak_bytes)
    trainer = memtune.fit(thirty_percent_model(), budget=budget, optimizer="adamw", progress=False)
    measured = measured_run(trainer, batches)
    plan = trainer.plan
    return {"budget_bytes": budget, "baseline_peak_bytes": prof.baseline_peak_bytes, "usable_bytes": plan.usable_bytes,
            "predicted_peak_bytes": plan.predicted_peak_bytes, "measured_peak_bytes": measured,
            "strategy": plan.parallel.strategy, "micro_batch_size": plan.variant["micro_batch_size"],
            "recompute": list(plan.recompute_units), "losses": [h["loss"] for h in trainer.history],
            "events": [e["kind"] for e in trainer.events], "summary": plan.summary(),
            "plan_hash": memtune.distributed.digest(plan.to_dict())}


def main(out_dir: Path) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    batches = [local(b, rank) for b in global_batches(world)]
    result: dict = {"rank": rank, "world_size": world}

    for optimizer, strategy in (("adamw", "fsdp"), ("adamw", "ddp"), ("muon2", "fsdp"), ("muon2", "ddp")):
        t0 = time.perf_counter()
        oom = (optimizer, strategy) == ("adamw", "ddp")  # rank 1 runs out of memory: recovered in place
        trainer = memtune.fit(make_model(), budget="1GB", optimizer=optimizer, progress=False,
                              planner_options={"strategies": (strategy,)}, collective_timeout=3 if oom else 300)
        if oom and rank == 1:
            trainer.inject_oom(1, "backward")
        trainer.train(batches, steps=STEPS)
        key = f"exact_{strategy}" if optimizer == "adamw" else f"{optimizer}_{strategy}"
        result[key] = {"optimizer": type(trainer.optimizer).__name__,
                       "parts": sorted(type(p).__name__ for p in getattr(trainer.optimizer, "parts", {}).values()),
                       "losses": [h["loss"] for h in trainer.history],
                       "ranks": [h["ranks"] for h in trainer.history],
                       "strategy": trainer.plan.parallel.strategy,
                       "plan_hash": memtune.distributed.digest(trainer.plan.to_dict()),
                       "regroups": [[e["step"], e["ranks"]] for e in trainer.events if e["kind"] == "regroup"],
                       "seconds": time.perf_counter() - t0}
        if (optimizer, strategy) == ("muon2", "fsdp"):
            result["muon2_resume"] = muon2_checkpoint_resume(rank, batches, trainer, out_dir)

    # A per-rank budget below the smallest peak one process can plan (same levers: recompute,
    # fp32 AdamW) at this rank's local batch.
    from torch.distributed._tools.fsdp2_mem_tracker import FSDPMemTracker

    prof = memtune.profile(make_model(), batches[0], optimizer="adamw", target="cpu",
                           space=memtune.PlanSpace.minimal())
    single_min = memtune.plan(prof, 1 << 40, optimizer="adamw", levers=parallel_restrictions())
    from memtune.planning import pareto

    frontier = pareto(prof, optimizer="adamw", levers=parallel_restrictions())
    single_min_peak = frontier[-1].predicted_peak_bytes
    budget = int(single_min_peak * 0.85)
    trainer = memtune.fit(make_model(), budget=budget, optimizer="adamw", progress=False)
    trainer.train(batches[:2], steps=2)
    tracker = FSDPMemTracker(trainer.model, optm=trainer.optimizer) if trainer.plan.parallel.strategy == "fsdp" \
        else None
    if tracker is None:
        from torch.distributed._tools.mem_tracker import MemTracker

        tracker = MemTracker()
        tracker.track_external(trainer.model, trainer.optimizer)
    with tracker:
        trainer.step(batches[2])
    measured = int(tracker.get_tracker_snapshot("peak")[torch.device("cpu")]["Total"])
    result["budget"] = {"budget_bytes": budget, "usable_bytes": trainer.plan.usable_bytes,
                        "single_process_min_peak_bytes": single_min_peak,
                        "single_process_unplanned_peak_bytes": single_min.predicted_peak_bytes,
                        "baseline_peak_bytes": prof.baseline_peak_bytes,
                        "predicted_peak_bytes": trainer.plan.predicted_peak_bytes, "measured_peak_bytes": measured,
                        "strategy": trainer.plan.parallel.strategy,
                        "recompute": list(trainer.plan.recompute_units), "summary": trainer.plan.summary(),
                        "plan_hash": memtune.distributed.digest(trainer.plan.to_dict())}

    try:
        memtune.fit(make_model(), budget=single_min_peak // 8, optimizer="adamw", progress=False).train(batches, steps=1)
        result["infeasible"] = {"error": None}
    except memtune.MemtuneError as e:
        result["infeasible"] = {"error": f"{type(e).__name__}: {e}"}

    # Rank 1 feeds a smaller local batch at step 1: every rank refuses that step, with one message.
    trainer = memtune.fit(make_model(), budget="1GB", optimizer="adamw", progress=False)
    trainer.step(batches[0])
    before = [p.detach().clone() for p in trainer.model.parameters()]
    short = batches[1] if rank == 0 else tuple(t[: t.shape[0] // 2] for t in batches[1])
    try:
        trainer.step(short)
        result["unequal"] = {"error": None}
    except memtune.MemtuneError as e:
        result["unequal"] = {"error": f"{type(e).__name__}: {e}", "step_count": trainer.step_count,
                             "unchanged": all(torch.equal(a, b) for a, b in zip(before, trainer.model.parameters()))}

    result["muon2"] = sharded_muon2_against_replicated(rank)
    result["thirty"] = thirty_percent(rank, world)
    result["chunked"] = chunked_loss(rank, world)
    result["retune"] = agreed_retune(rank, world)
    result["bf16"] = bf16_mixed(rank, world)

    (out_dir / f"rank{rank}.json").write_text(json.dumps(result, indent=1))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
