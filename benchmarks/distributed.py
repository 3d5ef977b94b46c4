"""Per-rank memory of FSDP2 and DDP layouts: memtune's prediction against PyTorch's trackers.

    .venv/bin/python benchmarks/distributed.py [--nproc 2] [--layers 4] [--width 128]

Launches itself under ``torchrun --standalone --nproc_per_node N`` (gloo, CPU). Each rank feeds
its own local batch (4 x 32 tokens) of a byte-level GPT (memtune.zoo.GPT). For every layout
(FSDP2 with every unit / no unit resharded after forward, DDP) and every recompute pattern
(none, every other unit, all), the model is sharded or replicated by
``memtune.distributed.parallelize`` with the plan's recompute applied, exactly as
``memtune.fit`` does, and one steady-state step (after a warm-up step) is measured by
``FSDPMemTracker`` (FSDP2) or ``MemTracker`` (DDP). The prediction is
``memtune.predict_peak`` on ``memtune.distributed.per_rank_profile`` of the single-process
profile. Writes benchmarks/results/distributed.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def worker(args, out: Path) -> None:
    import dataclasses

    import torch
    import torch.distributed as dist
    from torch.distributed._tools.fsdp2_mem_tracker import FSDPMemTracker
    from torch.distributed._tools.mem_tracker import MemTracker

    import memtune
    from memtune.apply import apply_plan
    from memtune.data import TextCorpus
    from memtune.distributed import parallelize, per_rank_profile
    from memtune.plan import Decision, ParallelPlan
    from memtune.zoo import GPT, GPTConfig

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    cfg = GPTConfig(n_layer=args.layers, n_embd=args.width, n_head=2, block_size=32)
    x, y = TextCorpus.load().batch("train", 4, 32, generator=torch.Generator().manual_seed(rank))
    torch.manual_seed(0)
    prof = memtune.profile(GPT(cfg), (x, y), optimizer="adamw", target="cpu",
                           space=memtune.PlanSpace.minimal())
    units = [u.fqn for u in prof.units]
    base = memtune.plan(prof, 1 << 40, optimizer="adamw", device="cpu", allow_microbatching=False)
    patterns = {"none": set(), "every other": set(units[::2]), "all": set(units)}
    layouts = [("fsdp", True), ("fsdp", False), ("ddp", None)]
    rows = []
    for (strategy, reshard), (pattern, rc) in [(lo, pa) for lo in layouts for pa in patterns.items()]:
        flags = {u: reshard for u in units} if strategy == "fsdp" else {}
        decisions = {u: Decision.RECOMPUTE if u in rc else Decision.SAVE for u in units}
        rank_prof = per_rank_profile(prof, world, strategy, flags)
        plan = dataclasses.replace(base, decisions=decisions,
                                   parallel=ParallelPlan(world_size=world, strategy=strategy, reshard_after_forward=flags))
        predicted = memtune.predict_peak(rank_prof, plan, reserve_bytes=0).peak_bytes
        torch.manual_seed(0)
        model = GPT(cfg)
        apply_plan(model, plan)
        forward = parallelize(model, plan, torch.device("cpu"))
        opt = apply_plan(model, plan)

        def step():
            forward(x, y).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        step()
        if strategy == "fsdp":
            tracker = FSDPMemTracker(model, optm=opt)
            tracker.track_inputs((x, y))
        else:
            tracker = MemTracker()
            tracker.track_external(model, opt, x, y)
        with tracker:
            step()
        measured = int(tracker.get_tracker_snapshot("peak")[torch.device("cpu")]["Total"])
        rows.append({"layout": strategy + ("" if reshard is None else f" reshard={reshard}"), "recompute": pattern,
                     "predicted_bytes": predicted, "measured_bytes": measured,
                     "error": predicted / measured - 1, "single_process_baseline_bytes": prof.baseline_peak_bytes})
    if rank == 0:
        (out / "rows.json").write_text(json.dumps(rows))
    dist.destroy_process_group()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--width", type=int, default=128)
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args, Path(args.worker))
        return
    import _record

    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.nproc}",
               __file__, "--layers", str(args.layers), "--width", str(args.width), "--worker", tmp]
        subprocess.run(cmd, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        rows = json.loads((Path(tmp) / "rows.json").read_text())
    head = f"| layout ({args.nproc} ranks) | recompute | predicted per rank | measured per rank | error | one process |"
    lines = [head, "|---|---|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['layout']} | {r['recompute']} | {r['predicted_bytes']:,} | {r['measured_bytes']:,} | "
                     f"{r['error']:+.1%} | {r['single_process_baseline_bytes']:,} |")
    table = "\n".join(lines)
    print(table)
    worst = max(abs(r["error"]) for r in rows)
    print(f"worst |error| {worst:.1%}")
    _record.write("distributed", {"nproc": args.nproc, "layers": args.layers, "width": args.width, "rows": rows,
                                  "worst_abs_error": worst},
                  f"# Per-rank peak: predicted vs measured\n\n{table}\n\nworst |error| {worst:.1%}\n")


if __name__ == "__main__":
    main()
