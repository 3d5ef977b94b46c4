"""Cost of ``Telemetry.sample()`` next to the step time of a small GPT training step.

The runtime samples telemetry every step, so a sample must cost < 1 % of a step. In one run
this script measures, side by side on the same device:

    step        median ms of a GPT training step (forward, backward, AdamW, ``loss.item()``),
                alternating steps without and with a ``Telemetry.sample()``
    in-loop     ``Telemetry.mean_sample_ms`` during the training blocks (default sources + JSONL)
    isolated    each source's ``read()`` and a full ``sample()`` in a tight loop (median/p99),
                and on a GPU each NVML call alone

and reports the overhead as sample ms / step ms, plus the smallest ``every=N`` that keeps it
under 1 %. Model: ``memtune.zoo.GPT`` (4 layers, width 128, context 128, batch 8) on
``memtune.data.TextCorpus``. Writes benchmarks/results/telemetry_overhead.{json,md}
(``telemetry_overhead_gpu`` on CUDA) with the command, torch version, device and commit. Run:

    python benchmarks/telemetry_overhead.py            # ~1 min on 2 CPU cores
    python benchmarks/telemetry_overhead.py --quick    # smoke run (not a result)
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _record  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from memtune.data import TextCorpus  # noqa: E402
from memtune.runtime.telemetry import Telemetry, default_sources  # noqa: E402
from memtune.zoo import GPT, GPTConfig  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"




def dirty_files() -> list[str]:
    """Uncommitted changes in the files this benchmark measures (empty: the commit is the code)."""
    try:
        out = subprocess.check_output(["git", "status", "--porcelain", "--", "runtime/telemetry.py", "benchmarks/telemetry_overhead.py"],
                                      cwd=Path(__file__).resolve().parents[1], text=True)
        return [line[3:] for line in out.splitlines()]
    except Exception:
        return ["unknown"]


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"


def timings_us(fn, n: int) -> dict:
    """Median, mean and p99 microseconds of ``n`` calls of ``fn`` (after 10 warm-up calls)."""
    for _ in range(10):
        fn()
    ts = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        ts.append((time.perf_counter() - t0) * 1e6)
    ts.sort()
    return {"median_us": statistics.median(ts), "mean_us": statistics.fmean(ts), "p99_us": ts[int(0.99 * (n - 1))], "n": n}


def nvml_calls(device: torch.device, n: int) -> dict:
    """Each NVML query alone, to see which one dominates a sample."""
    import pynvml

    pynvml.nvmlInit()
    try:
        index = device.index if device.index is not None else torch.cuda.current_device()
        uuid = getattr(torch.cuda.get_device_properties(index), "uuid", None)
        text = str(uuid) if uuid is not None else None
        h = (pynvml.nvmlDeviceGetHandleByUUID(text if text.startswith("GPU-") else f"GPU-{text}") if text
             else pynvml.nvmlDeviceGetHandleByIndex(index))
        calls = {
            "nvmlDeviceGetMemoryInfo": lambda: pynvml.nvmlDeviceGetMemoryInfo(h),
            "nvmlDeviceGetComputeRunningProcesses": lambda: pynvml.nvmlDeviceGetComputeRunningProcesses(h),
            "nvmlDeviceGetUtilizationRates": lambda: pynvml.nvmlDeviceGetUtilizationRates(h),
            "nvmlDeviceGetTemperature": lambda: pynvml.nvmlDeviceGetTemperature(h, pynvml.NVML_TEMPERATURE_GPU),
            "nvmlDeviceGetPowerUsage": lambda: pynvml.nvmlDeviceGetPowerUsage(h),
            "torch.cuda.memory_stats_as_nested_dict": lambda: torch.cuda.memory_stats_as_nested_dict(device),
            "torch.cuda.memory_stats (flat)": lambda: torch.cuda.memory_stats(device),
            "torch.cuda.mem_get_info": lambda: torch.cuda.mem_get_info(device),
        }
        out = {}
        for name, fn in calls.items():
            try:
                out[name] = timings_us(fn, n)
            except pynvml.NVMLError as e:
                out[name] = {"error": str(e)}
        return out
    finally:
        pynvml.nvmlShutdown()


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pairs", type=int, default=60, help="(without, with) step pairs, alternated")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--block", type=int, default=128)
    ap.add_argument("--n-layer", type=int, default=4)
    ap.add_argument("--n-embd", type=int, default=128)
    ap.add_argument("--isolated", type=int, default=2000, help="calls per isolated timing")
    ap.add_argument("--quick", action="store_true", help="5 step pairs, 200 isolated calls: a smoke run")
    ap.add_argument("--out", default=None, help="output stem; default results/telemetry_overhead[_gpu]")
    args = ap.parse_args(argv)
    if args.quick:
        args.pairs, args.isolated = 5, 200
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    out_stem = Path(args.out) if args.out else RESULTS / ("telemetry_overhead_gpu" if device.type == "cuda" else "telemetry_overhead")

    torch.manual_seed(0)
    cfg = GPTConfig(n_layer=args.n_layer, n_head=4, n_embd=args.n_embd, block_size=args.block)
    model = GPT(cfg).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4)
    corpus = TextCorpus.load()
    batches = corpus.batches("train", args.batch, args.block, seed=0)

    def train_step() -> float:
        x, y = (t.to(device, non_blocking=True) for t in next(batches))
        loss = model(x, y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()  # every trainer logs the loss; it also ends the step on a GPU

    for _ in range(5):
        train_step()

    tmp = Path(tempfile.mkdtemp(prefix="memtune-telemetry-"))
    tel = Telemetry(jsonl_path=tmp / "telemetry.jsonl")
    source_names = [type(s).__name__ for s in tel.sources]
    without_ms, with_ms = [], []
    step = 0
    # alternate step by step: on a shared machine load drifts over seconds, and adjacent
    # steps see the same load, so the two arms stay comparable
    for _ in range(args.pairs):
        for use_telemetry, bucket in ((False, without_ms), (True, with_ms)):
            t0 = time.perf_counter()
            loss = train_step()
            if use_telemetry:
                tel.sample(step, loss=loss, step_ms=(time.perf_counter() - t0) * 1e3, plan_version=0)
            bucket.append((time.perf_counter() - t0) * 1e3)
            step += 1
    in_loop_ms = tel.mean_sample_ms
    in_loop_n = tel.n_samples

    isolated = {f"{type(s).__name__}.read": timings_us(lambda s=s: s.read(step=0), args.isolated) for s in tel.sources}
    counter = iter(range(10**9))
    isolated["Telemetry.sample (all sources + JSONL line)"] = timings_us(lambda: tel.sample(next(counter), loss=1.0), args.isolated)
    tel.close()
    with Telemetry(default_sources(), every=10) as tel10:
        isolated["Telemetry.sample every=10 (amortised per step)"] = timings_us(lambda: tel10.sample(next(counter)), args.isolated)
    calls = nvml_calls(device, args.isolated) if device.type == "cuda" else None

    step_without = statistics.median(without_ms)
    step_with = statistics.median(with_ms)
    sample_ms = isolated["Telemetry.sample (all sources + JSONL line)"]["median_us"] / 1e3
    overhead_pct = 100 * in_loop_ms / step_without
    every_for_1pct = max(1, math.ceil(in_loop_ms / (0.01 * step_without)))
    result = {
        "command": " ".join([Path(sys.executable).name] + sys.argv),
        "torch": torch.__version__, "python": platform.python_version(), "device": device_name(device),
        "commit": _record.git_commit(), "dirty_files": dirty_files(), "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "quick": args.quick,
        "model": {"n_layer": args.n_layer, "n_embd": args.n_embd, "block": args.block, "batch": args.batch,
                  "params": sum(p.numel() for p in model.parameters())},
        "sources": source_names,
        "steps_per_arm": len(without_ms),
        "step_ms_median_without_telemetry": step_without,
        "step_ms_median_with_telemetry": step_with,
        "sample_ms_mean_in_loop": in_loop_ms, "samples_in_loop": in_loop_n,
        "sample_ms_median_isolated": sample_ms,
        "overhead_pct_of_step": overhead_pct,
        "every_for_under_1pct": every_for_1pct,
        "isolated_us": isolated, "calls_us": calls,
    }
    out_stem.parent.mkdir(parents=True, exist_ok=True)
    out_stem.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    md = render_md(result)
    out_stem.with_suffix(".md").write_text(md)
    print(md)


def render_md(r: dict) -> str:
    lines = [
        "# Telemetry overhead", "",
        f"`{r['command']}` on {r['device']}, torch {r['torch']}, commit `{r['commit'][:12]}`{' + uncommitted ' + ', '.join(r['dirty_files']) if r['dirty_files'] else ''}, {r['time']}"
        + (" (quick smoke run, not a result)" if r["quick"] else ""), "",
        f"GPT {r['model']['n_layer']} layers x {r['model']['n_embd']}, context {r['model']['block']}, batch "
        f"{r['model']['batch']} ({r['model']['params'] / 1e6:.2f} M params); sources: {', '.join(r['sources'])}; "
        f"{r['steps_per_arm']} steps per arm, alternated step by step.", "",
        "| measure | value |", "|---|---:|",
        f"| step, median, without telemetry | {r['step_ms_median_without_telemetry']:.3f} ms |",
        f"| step, median, with `sample()` per step | {r['step_ms_median_with_telemetry']:.3f} ms |",
        f"| `sample()` mean, in the training loop | {r['sample_ms_mean_in_loop'] * 1e3:.1f} us |",
        f"| `sample()` median, isolated | {r['sample_ms_median_isolated'] * 1e3:.1f} us |",
        f"| **overhead: in-loop sample / step** | **{r['overhead_pct_of_step']:.3f} %** |",
        f"| smallest `every=N` for < 1 % | {r['every_for_under_1pct']} |", "",
        "| isolated call | median us | mean us | p99 us |", "|---|---:|---:|---:|",
    ]
    rows = dict(r["isolated_us"])
    rows.update(r["calls_us"] or {})
    for name, t in rows.items():
        if "error" in t:
            lines.append(f"| {name} | {t['error']} | | |")
        else:
            lines.append(f"| {name} | {t['median_us']:.1f} | {t['mean_us']:.1f} | {t['p99_us']:.1f} |")
    lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
