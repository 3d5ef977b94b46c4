"""FSDPMemTracker, step after step, against the per-rank prediction (2 CPU ranks, gloo).

    python benchmarks/fsdp_tracker_extra.py            # launches torchrun itself; ~1 minute a run

The test model of tests/test_distributed.py is fitted at a few shares of its unplanned peak;
then 8 steps are measured one by one with ``FSDPMemTracker``, and, beside it, the process's
large allocations (glibc ``mallinfo2`` mmapped bytes, sampled after every op, with a 64 KiB mmap
threshold so that every tensor of 64 KiB or more is one mapping). The table gives, per plan and
rank, what the tracker read above the prediction in each step, and the mmapped peak of each
step above where the step began. docs/distributed.md ("An extra the rules do not explain")
reads it. Writes benchmarks/results/fsdp_tracker_extra.{json,md}.
"""

from __future__ import annotations

import ctypes
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
SHARES = (0.56, 0.64, 0.68)
STEPS = 8


class _MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                 "fsmblks", "uordblks", "fordblks", "keepcost")]


def worker(out: Path) -> None:
    import torch
    import torch.distributed as dist
    from torch.distributed._tools.fsdp2_mem_tracker import FSDPMemTracker
    from torch.utils._python_dispatch import TorchDispatchMode

    sys.path.insert(0, str(HERE.parent / "tests"))
    import distributed_worker as w

    import memtune

    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = _MallInfo2

    class MmapPeak(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.peak = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            self.peak = max(self.peak, libc.mallinfo2().hblkhd)
            return out

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    batches = [w.local(b, rank) for b in w.global_batches(dist.get_world_size())]
    prof = memtune.profile(w.make_model(), batches[0], optimizer="adamw", target="cpu",
                           space=memtune.PlanSpace.minimal())
    rows = []
    for share in SHARES:
        trainer = memtune.fit(w.make_model(), budget=int(share * prof.baseline_peak_bytes), optimizer="adamw",
                              progress=False)
        trainer.train(batches[:2], steps=2)
        extra, mmapped = [], []
        for k in range(STEPS):
            tracker, meter = FSDPMemTracker(trainer.model, optm=trainer.optimizer), MmapPeak()
            start = libc.mallinfo2().hblkhd
            with tracker, meter:
                trainer.step(batches[k % len(batches)])
            extra.append(int(tracker.get_tracker_snapshot("peak")[torch.device("cpu")]["Total"])
                         - trainer.plan.predicted_peak_bytes)
            mmapped.append(meter.peak - start)
        plan = trainer.plan
        rows.append({"share": share, "rank": rank, "usable_bytes": plan.usable_bytes,
                     "predicted_peak_bytes": plan.predicted_peak_bytes, "units": plan.summary().splitlines()[1].strip(),
                     "optimizer_state": plan.optimizer.state_dtype, "tracker_minus_predicted": extra,
                     "mmapped_step_peak": mmapped})
    (out / f"rank{rank}.json").write_text(json.dumps(rows))
    dist.destroy_process_group()


def main() -> None:
    sys.path.insert(0, str(HERE))
    import _record

    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": "65536"}
        subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        __file__, "--worker", tmp], env=env, check=True)
        rows = [r for k in range(2) for r in json.loads((Path(tmp) / f"rank{k}.json").read_text())]
    lines = ["| share | rank | plan | state | tracker − predicted, per step (bytes) | mmapped step peak (MiB) |",
             "|--:|--:|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (r["share"], r["rank"])):
        lines.append(f"| {r['share']:.0%} | {r['rank']} | {r['units']} | {r['optimizer_state']} | "
                     f"{', '.join(f'{x:,}' for x in r['tracker_minus_predicted'])} | "
                     f"{', '.join(f'{x / 2**20:.2f}' for x in r['mmapped_step_peak'])} |")
    md = "\n".join(lines) + "\n"
    path = _record.write("fsdp_tracker_extra", {"rows": rows}, md)
    print(md)
    print(f"wrote {path}")


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--worker":
        worker(Path(sys.argv[2]))
    else:
        main()
