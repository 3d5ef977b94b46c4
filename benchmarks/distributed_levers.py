"""Per-rank budgets below what sharding alone fits: `memtune.fit` under torchrun, measured.

    .venv/bin/python benchmarks/distributed_levers.py [--nproc 2] [--fractions 0.30 0.35]

Launches itself under ``torchrun --standalone --nproc_per_node N`` (gloo, CPU, one thread per
rank). For each GPT shape (activations dominate at sequence 256; local batch 4 per rank) and
each per-rank budget (a fraction of the model's single-process unplanned peak at the local
batch), every rank runs ``memtune.fit`` and trains 3 steps; the last is measured by PyTorch's
``FSDPMemTracker`` (``MemTracker`` under DDP). The table gives the plan (layout, micro-batch,
recomputed units), the prediction and the measurement per rank. Writes
``benchmarks/results/distributed_levers.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

SHAPES = {"4x128": dict(n_layer=4, n_embd=128, n_head=2), "6x256": dict(n_layer=6, n_embd=256, n_head=4)}
SEQ, LOCAL_BATCH, STEPS = 256, 4, 3


def worker(args, out: Path) -> None:
    import torch
    import torch.distributed as dist

    import memtune
    from memtune.data import TextCorpus
    from memtune.zoo import GPT, GPTConfig

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from distributed_worker import measured_run  # noqa: E402  (FSDPMemTracker across micro-batches)

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    corpus = TextCorpus.load()
    rows = []
    for name, shape in SHAPES.items():
        def model(shape=shape):
            torch.manual_seed(0)
            return GPT(GPTConfig(block_size=SEQ, **shape))

        batches = [corpus.batch("train", LOCAL_BATCH * world, SEQ, generator=torch.Generator().manual_seed(400 + k))
                   for k in range(STEPS)]
        batches = [tuple(t[rank * LOCAL_BATCH:(rank + 1) * LOCAL_BATCH] for t in b) for b in batches]
        prof = memtune.profile(model(), batches[0], optimizer="adamw", target="cpu", space=memtune.PlanSpace.minimal())
        for frac in args.fractions:
            budget = int(frac * prof.baseline_peak_bytes)
            row = dict(shape=name, fraction=frac, rank=rank, budget_bytes=budget,
                       unplanned_peak_bytes=prof.baseline_peak_bytes)
            try:
                trainer = memtune.fit(model(), budget=budget, optimizer="adamw", progress=False)
                measured = measured_run(trainer, batches)
            except memtune.InfeasibleBudgetError as e:
                row.update(feasible=False, reason=str(e)[:300])
            else:
                p = trainer.plan
                row.update(feasible=True, strategy=p.parallel.strategy, micro_batch=p.variant["micro_batch_size"],
                           recomputed=f"{len(p.recompute_units)}/{len(p.decisions)}", usable_bytes=p.usable_bytes,
                           predicted_peak_bytes=p.predicted_peak_bytes, measured_peak_bytes=measured,
                           error=measured / p.predicted_peak_bytes - 1, losses=[h["loss"] for h in trainer.history])
            rows.append(row)
    (out / f"rank{rank}.json").write_text(json.dumps(rows))
    dist.destroy_process_group()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--fractions", type=float, nargs="+", default=[0.30, 0.35])
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args, Path(args.worker))
        return
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
            env.pop(k, None)
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.nproc}",
               __file__, "--worker", tmp, "--fractions", *map(str, args.fractions)]
        subprocess.run(cmd, env=env, check=True, capture_output=True)
        rows = [r for k in range(args.nproc) for r in json.loads((Path(tmp) / f"rank{k}.json").read_text())]
    mib = 2 ** 20
    lines = [f"{'shape':<7} {'budget':>7} {'rank':>4} {'layout':>7} {'micro':>5} {'recomp':>6} {'usable':>9} "
             f"{'predicted':>10} {'measured':>9} {'error':>7}"]
    for r in rows:
        if not r["feasible"]:
            lines.append(f"{r['shape']:<7} {r['fraction']:>6.0%} {r['rank']:>4}  infeasible: {r['reason'][:120]}")
            continue
        lines.append(f"{r['shape']:<7} {r['fraction']:>6.0%} {r['rank']:>4} {r['strategy']:>7} {str(r['micro_batch']):>5} "
                     f"{r['recomputed']:>6} {r['usable_bytes'] / mib:>8.2f}M {r['predicted_peak_bytes'] / mib:>9.2f}M "
                     f"{r['measured_peak_bytes'] / mib:>8.2f}M {r['error']:>+7.2%}")
    print("\n".join(lines))
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import _record

    path = _record.write("distributed_levers", {"rows": rows}, "\n".join(lines))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
