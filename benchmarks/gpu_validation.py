"""GPU validation of the profiler, memory model and runtime against the real CUDA allocator.

Run on a CUDA machine (skips itself elsewhere):

    python benchmarks/gpu_validation.py [--quick]

It measures, side by side in one run:

1. the budget reserve: NVML-used memory of a process with a CUDA context and cuBLAS
   workspace but no tensors, and the allocator's reserved-minus-allocated slack after
   training steps;
2. profiler fidelity: ``baseline_peak_bytes`` (profiled on fake CPU tensors for this
   GPU) against ``torch.cuda.max_memory_allocated`` of a real steady-state step, for a
   GPT (SDPA) and an HF Llama, in fp32 and bf16-mixed;
3. plans against reality: the exact planner at 30-90 % of the baseline, applied and
   measured;
4. the runtime: ``memtune.fit`` with the budget enforced by
   ``torch.cuda.set_per_process_memory_fraction`` on a model whose unplanned peak is twice
   the budget; then a second process that grabs memory mid-run.

5. streamed plans (``--streaming``, alone): a Llama-2-7B-shaped model (random init, seq 2048,
   batch 1, bf16-mixed, every default) planned for 24GB and 12GB, applied, and trained for 10
   steps under ``set_per_process_memory_fraction`` matching the budget: ``max_memory_allocated``
   against the plan's peak, the measured step time against the predicted one, and the overlap
   of the host<->device copies with compute, read from a ``torch.profiler`` trace of the last
   step. About 3 minutes on one H100 (the profile on fake tensors is most of it).
   Then ``memtune.fit`` itself at 24GB on the same shape given in fp32 on the host: the trainer
   keeps it there until its plan makes the weights fit, then moves it and trains 10 steps under
   its own cap. ``--streaming --cpu-smoke`` runs the same code on a tiny Llama on the CPU (no
   fraction, no trace), to check the script itself.

6. activation offload (``--activation-offload``, alone): on the GPT and HF Llama of section 2
   (bf16-mixed), every other unit and every unit OFFLOAD against the same units RECOMPUTE and
   against no plan, and the planner's plans with and without ``allow_activation_offload`` at 50%
   and 35% of the unplanned activations: ``max_memory_allocated`` against each plan's peak, and
   the median step time of 7 against the predicted one (:mod:`memtune.offload`).

Writes benchmarks/results/gpu_validation.json and .md (``gpu_streaming`` for section 5,
``gpu_activation_offload`` for section 6).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import statistics
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import memtune  # noqa: F401  first, so its CUDA allocator default applies before any allocation
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _record  # noqa: E402

GiB = 2**30


def nvml_used() -> int:
    import pynvml

    pynvml.nvmlInit()
    h = pynvml.nvmlDeviceGetHandleByIndex(torch.cuda.current_device() if torch.cuda.is_initialized() else 0)
    return int(pynvml.nvmlDeviceGetMemoryInfo(h).used)


def measure_reserve() -> dict:
    before = nvml_used()
    torch.cuda.init()
    a = torch.randn(256, 256, device="cuda")
    (a @ a).sum().item()  # cuBLAS handle and workspace
    with torch.autocast("cuda", dtype=torch.bfloat16):
        (a @ a).sum().item()
    torch.cuda.synchronize()
    after = nvml_used()
    allocated = torch.cuda.memory_allocated()
    reserved = torch.cuda.memory_reserved()
    del a
    return {"nvml_used_before": before, "nvml_used_after_init": after,
            "context_and_workspace_bytes": after - before - reserved, "torch_reserved": reserved,
            "torch_allocated": allocated}


def train_step(model, batch, loss_fn, precision, opt) -> None:
    from memtune.batching import loss_from_output, split_batch

    args, kwargs, target = split_batch(batch, loss_fn)
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=precision == "bf16-mixed"):
        out = model(*args, **kwargs)
        loss = loss_from_output(out, batch, target, loss_fn)
    del out
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def real_step_peak(model, batch, loss_fn, precision, opt) -> tuple[int, int]:
    """(max allocated, max reserved) of the third step (the first two create optimizer state)."""

    def step():
        train_step(model, batch, loss_fn, precision, opt)

    for _ in range(2):
        step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated(), torch.cuda.max_memory_reserved()


def models(quick: bool):
    from memtune import zoo

    T = 512 if quick else 1024
    gcfg = zoo.GPTConfig(n_layer=8 if quick else 12, n_embd=768 if quick else 1024, n_head=12 if quick else 16, block_size=T)
    ids = torch.randint(0, 256, (8, T), device="cuda")
    yield "gpt", (lambda: zoo.GPT(gcfg)), (ids, ids), None
    llama = dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=6 if quick else 8, num_attention_heads=16,
                 vocab_size=32000, max_position_embeddings=T)
    ids2 = torch.randint(0, 32000, (4, T), device="cuda")
    yield "hf_llama", (lambda: zoo.hf_llama(**llama)), {"input_ids": ids2, "labels": ids2}, None


def fidelity(quick: bool) -> list[dict]:

    rows = []
    for name, make, batch, loss_fn in models(quick):
        for precision in ("fp32", "bf16-mixed"):
            torch.manual_seed(0)
            model = make().cuda()
            t0 = time.perf_counter()
            prof = memtune.profile(model, batch, loss_fn=loss_fn, precision=precision, target=torch.device("cuda"))
            t_prof = time.perf_counter() - t0
            opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
            alloc, reserved = real_step_peak(model, batch, loss_fn, precision, opt)
            rows.append({"model": name, "precision": precision, "predicted_peak": prof.baseline_peak_bytes,
                         "measured_max_allocated": alloc, "measured_max_reserved": reserved,
                         "error": (prof.baseline_peak_bytes - alloc) / alloc, "profile_s": round(t_prof, 2)})
            print(f"fidelity {name:9s} {precision:10s} predicted {prof.baseline_peak_bytes / GiB:7.3f} GiB  "
                  f"measured {alloc / GiB:7.3f} GiB  err {rows[-1]['error']:+.2%}  reserved {reserved / GiB:.3f} GiB", flush=True)
            # Plans against reality at several budgets.
            for frac in ((0.5,) if quick else (0.3, 0.5, 0.7, 0.9)):
                budget = int(prof.baseline_peak_bytes * frac)
                try:
                    plan = memtune.plan(prof, budget, optimizer="adamw", state_dtypes=("fp32",), reserve=0)
                except memtune.InfeasibleBudgetError as e:
                    rows.append({"model": name, "precision": precision, "budget_fraction": frac, "infeasible": True,
                                 "min_feasible": e.min_feasible_bytes})
                    print(f"   plan {frac:.0%}: infeasible (min {e.min_feasible_bytes / GiB:.2f} GiB)", flush=True)
                    continue
                memtune.remove_plan(model)
                opt = memtune.apply_plan(model, plan)
                alloc, _ = real_step_peak(model, batch, loss_fn, precision, opt)
                memtune.remove_plan(model)
                rows.append({"model": name, "precision": precision, "budget_fraction": frac, "budget": budget,
                             "predicted_peak": plan.predicted_peak_bytes, "measured_max_allocated": alloc,
                             "error": (plan.predicted_peak_bytes - alloc) / alloc, "fits": alloc <= budget,
                             "recompute_units": len(plan.recompute_units)})
                print(f"   plan {frac:.0%}: {len(plan.recompute_units)} recompute, predicted {plan.predicted_peak_bytes / GiB:.3f} "
                      f"measured {alloc / GiB:.3f} GiB err {rows[-1]['error']:+.2%} fits {alloc <= budget}", flush=True)
            del model, opt
            gc.collect()
            torch.cuda.empty_cache()
    return rows


GRABBER = textwrap.dedent("""
    import sys, time, torch
    from pathlib import Path
    go, held, stop, nbytes = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]), int(sys.argv[4])
    torch.cuda.init()
    while not go.exists(): time.sleep(0.01)
    x = torch.empty(nbytes, dtype=torch.uint8, device="cuda"); torch.cuda.synchronize()
    held.write_text("1")
    while not stop.exists(): time.sleep(0.01)
""")


def runtime_checks(quick: bool, tmp: Path) -> dict:
    from memtune import zoo
    from memtune.runtime import RetuneConfig
    from memtune.runtime.telemetry import read_jsonl

    from memtune.data import TextCorpus

    T = 1024
    cfg = zoo.GPTConfig(n_layer=12 if quick else 16, n_embd=1024, n_head=16, block_size=T)
    corpus = TextCorpus.load()
    stream = corpus.batches("train", 16, T, seed=0)

    def text_batch():
        x, y = next(stream)
        return x.cuda(), y.cuda()

    ids = text_batch()
    out: dict = {}

    # (a) unplanned peak = 2x the budget, budget enforced by the allocator.
    torch.manual_seed(0)
    model = zoo.GPT(cfg).cuda()
    prof = memtune.profile(model, ids, optimizer="muon2", precision="bf16-mixed", target=torch.device("cuda"))
    from memtune.devices import DEFAULT_CUDA_RESERVE_BYTES

    usable = prof.baseline_peak_bytes // 2
    trainer = memtune.fit(model, usable + DEFAULT_CUDA_RESERVE_BYTES, progress=False, metrics_path=tmp / "half.jsonl",
                          max_oom_retries=4)
    steps = 10 if quick else 20
    for _ in range(steps):
        trainer.step(text_batch())
    h = trainer.history
    out["half_budget"] = {
        "unplanned_peak": prof.baseline_peak_bytes, "usable_budget": usable,
        "plan": trainer.plan.summary(), "oom_retries": sum(x["oom_retries"] for x in h),
        "predicted_peak": trainer.plan.predicted_peak_bytes, "measured_peaks": [x["peak_bytes"] for x in h],
        "error_last": (trainer.plan.predicted_peak_bytes - h[-1]["peak_bytes"]) / h[-1]["peak_bytes"],
        "losses": [round(x["loss"], 4) for x in h], "step_ms": [x["step_ms"] for x in h],
        "telemetry_last": h[-1].get("telemetry"), "events": trainer.events,
    }
    print(f"runtime half-budget: plan {trainer.plan.summary().splitlines()[0]}", flush=True)
    print(f"   OOM retries {out['half_budget']['oom_retries']}, measured {h[-1]['peak_bytes'] / GiB:.3f} GiB vs predicted "
          f"{trainer.plan.predicted_peak_bytes / GiB:.3f} GiB (err {out['half_budget']['error_last']:+.2%}), "
          f"loss {h[0]['loss']:.3f} -> {h[-1]['loss']:.3f}", flush=True)
    print(f"   NVML reading: {h[-1].get('telemetry')}", flush=True)
    del trainer, model
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.set_per_process_memory_fraction(1.0)

    # (b) a second process grabs memory mid-run: re-plan, no crash; then it lets go.
    torch.manual_seed(0)
    model = zoo.GPT(cfg).cuda()
    budget = int(prof.baseline_peak_bytes * 1.1) + DEFAULT_CUDA_RESERVE_BYTES
    trainer = memtune.fit(model, budget, progress=False, metrics_path=tmp / "grab.jsonl", enforce_budget=False,
                          retune_config=RetuneConfig(relax_after_steps=3))
    go, held, stop = tmp / "go", tmp / "held", tmp / "stop"
    for p in (go, held, stop):
        p.unlink(missing_ok=True)
    trainer.step(text_batch())
    free_now, _ = torch.cuda.mem_get_info()
    # Leave our process ~55 % of its unplanned peak.
    grab = int(free_now + torch.cuda.memory_reserved() - 0.55 * prof.baseline_peak_bytes)
    script = tmp / "grab.py"
    script.write_text(GRABBER)
    proc = subprocess.Popen([sys.executable, str(script), str(go), str(held), str(stop), str(grab)])
    torch.cuda.empty_cache()  # let the other process have what our cache holds, as a real co-tenant would find it
    n = 16 if quick else 24
    grab_at, release_at = 4, 10
    for i in range(1, n):
        if i == grab_at:
            torch.cuda.empty_cache()
            go.write_text("1")
            while not held.exists():
                time.sleep(0.01)
        if i == release_at:
            stop.write_text("1")
            proc.wait(timeout=60)
        trainer.step(text_batch())
    proc.wait(timeout=60)
    metrics = read_jsonl(tmp / "grab.jsonl")
    out["second_process"] = {
        "grab_bytes": grab, "grab_at_step": grab_at, "release_at_step": release_at, "events": trainer.events,
        "peaks": [x["peak_bytes"] for x in trainer.history],
        "other_process_bytes": [m.get("other_process_bytes") for m in metrics],
        "device_free_bytes": [m.get("device_free_bytes") for m in metrics],
        "oom_retries": sum(x["oom_retries"] for x in trainer.history),
    }
    for e in trainer.events:
        print(f"   event step {e['step']}: {e['kind']} -> predicted {e['predicted_peak_bytes'] / GiB:.2f} GiB; {e['reason'][:110]}",
              flush=True)
    print(f"   other-process bytes seen: {[round((b or 0) / GiB, 1) for b in out['second_process']['other_process_bytes']]}",
          flush=True)
    return out


def llama(cpu_smoke: bool) -> torch.nn.Module:
    """Llama-2-7B (:func:`memtune.zoo.llama_7b`), fp32 and random; for the smoke test a tiny
    Llama with the same vocabulary."""
    from memtune import zoo

    if cpu_smoke:
        return zoo.hf_llama(hidden_size=64, intermediate_size=172, num_hidden_layers=2, num_attention_heads=2,
                            vocab_size=32000, max_position_embeddings=4096)
    return zoo.llama_7b()


def copy_overlap(trace) -> dict:
    """Host<->device copy time in a ``torch.profiler`` trace, and the share of it that ran while
    a compute kernel ran: the measured overlap of the stream with compute."""
    from torch.autograd import DeviceType

    copies, kernels = [], []
    for e in trace.events():
        if e.device_type != DeviceType.CUDA:
            continue
        span = (e.time_range.start, e.time_range.end)
        if "Memcpy" in e.name and ("HtoD" in e.name or "DtoH" in e.name):
            copies.append(span)
        elif "Memcpy" not in e.name and "Memset" not in e.name:
            kernels.append(span)
    merged: list[list[float]] = []
    for a, b in sorted(kernels):
        if merged and a <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], b)
        else:
            merged.append([a, b])
    copy_us = sum(b - a for a, b in copies)
    hidden_us = sum(max(0.0, min(b, d) - max(a, c)) for a, b in copies for c, d in merged)
    busy_us = sum(b - a for a, b in merged)
    return {"copy_ms": copy_us / 1e3, "copy_hidden_share": hidden_us / copy_us if copy_us else None,
            "compute_busy_ms": busy_us / 1e3}


def streaming_checks(cpu_smoke: bool, steps: int = 10) -> list[dict]:
    """Section 5: streamed plans for a 7B shape, applied and trained under the budget's memory cap."""
    from memtune.devices import CUDA_CONTEXT_BYTES

    device = torch.device("cpu" if cpu_smoke else "cuda")
    seq = 64 if cpu_smoke else 2048
    budgets = ("90%", "70%") if cpu_smoke else ("24GB", "12GB")
    rows = []
    torch.manual_seed(0)
    with torch.device(device):  # fp32 and random, on the device: the plan converts it before the cap applies
        model = llama(cpu_smoke)
    ids = torch.randint(0, 32000, (1, seq), device=device)
    t0 = time.perf_counter()
    prof = memtune.profile(model, {"input_ids": ids, "labels": ids}, optimizer="adamw", precision="bf16-mixed",
                           target="cpu" if cpu_smoke else device)
    profile_s = time.perf_counter() - t0
    print(f"streaming: profiled {sum(p.numel() for p in model.parameters()) / 1e9:.2f}B parameters in {profile_s:.0f} s; "
          f"unplanned peak {prof.baseline_peak_bytes / GiB:.2f} GiB", flush=True)
    # (The smoke test's budgets are shares of the tiny model's unplanned peak.)
    budgets = [int(prof.baseline_peak_bytes * float(b[:-1]) / 100) if b.endswith("%") else b for b in budgets]
    for budget in budgets:
        row: dict = {"budget": budget, "profile_s": round(profile_s, 1)}
        rows.append(row)
        try:
            plan = memtune.plan(prof, budget, optimizer="adamw")
        except memtune.InfeasibleBudgetError as e:
            row.update(infeasible=True, reason=str(e)[:600], min_feasible=e.min_feasible_bytes)
            print(f"   {budget}: infeasible: {str(e).splitlines()[0][:200]}", flush=True)
            continue
        memtune.remove_plan(model)
        optimizer = memtune.apply_plan(model, plan)
        gc.collect()
        if not cpu_smoke:
            torch.cuda.empty_cache()
            total = torch.cuda.get_device_properties(device).total_memory
            cap = max(plan.usable_bytes, plan.budget_bytes - CUDA_CONTEXT_BYTES)
            torch.cuda.set_per_process_memory_fraction(min(1.0, cap / total), device)
        times, losses, trace = [], [], None
        for i in range(steps):
            batch = torch.randint(0, 32000, (1, seq), device=device)
            if i == 2 and not cpu_smoke:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats(device)  # steps 0-1 create the optimizer state
            last = i == steps - 1 and not cpu_smoke
            ctx = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) if last else \
                contextlib.nullcontext()
            t = time.perf_counter()
            with ctx as traced:
                with memtune.step_autocast(model), torch.autocast(device.type, dtype=torch.bfloat16):
                    loss = model(input_ids=batch, labels=batch).loss
                loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                if not cpu_smoke:
                    torch.cuda.synchronize()
            losses.append(float(loss))
            if last:
                trace = traced
            else:
                times.append((time.perf_counter() - t) * 1e3)
        measured_ms = statistics.median(times[2:]) if len(times) > 2 else statistics.median(times)
        peak = torch.cuda.max_memory_allocated(device) if not cpu_smoke else None
        row.update(plan=plan.summary(), predicted_peak=plan.predicted_peak_bytes, measured_max_allocated=peak,
                   peak_error=None if peak is None else (plan.predicted_peak_bytes - peak) / peak,
                   fits=None if peak is None else peak <= plan.usable_bytes, predicted_step_ms=plan.predicted_step_ms,
                   measured_step_ms=measured_ms, step_ms_ratio=measured_ms / plan.predicted_step_ms,
                   measured_tokens_per_s=seq * 1e3 / measured_ms, predicted_tokens_per_s=seq * 1e3 / plan.predicted_step_ms,
                   loss_first_last=[round(losses[0], 4), round(losses[-1], 4)], **(copy_overlap(trace) if trace is not None else {}))
        print(f"   {budget}: {plan.summary().splitlines()[0]}", flush=True)
        print(f"      peak predicted {plan.predicted_peak_bytes / GiB:.2f} GiB, measured "
              f"{'n/a' if peak is None else f'{peak / GiB:.2f} GiB'}; step predicted {plan.predicted_step_ms:.0f} ms, "
              f"measured {measured_ms:.0f} ms; copies hidden behind compute: {row.get('copy_hidden_share')}", flush=True)
        del optimizer
        if not cpu_smoke:  # (lifted first: removing the plan widens the weights to fp32 again)
            torch.cuda.set_per_process_memory_fraction(1.0, device)
        memtune.remove_plan(model)
        gc.collect()
        if not cpu_smoke:
            torch.cuda.empty_cache()
    del model
    gc.collect()
    rows.append(fit_row(cpu_smoke, seq, budgets[0], steps))
    return rows


def fit_row(cpu_smoke: bool, seq: int, budget: str | int, steps: int) -> dict:
    """``memtune.fit`` itself on the same shape, given in fp32 on the host: the trainer keeps it
    there until its plan makes the weights fit (bf16), then moves it, and trains under its cap."""
    device = torch.device("cpu" if cpu_smoke else "cuda")
    torch.manual_seed(0)
    model = llama(cpu_smoke)  # fp32, on the host
    trainer = memtune.fit(model, budget, device=str(device), precision="bf16-mixed", optimizer="adamw", progress=False)
    deferred = trainer._move_after_plan
    for _ in range(steps):
        ids = torch.randint(0, 32000, (1, seq))
        trainer.step({"input_ids": ids, "labels": ids})
    h, plan = trainer.history, trainer.plan
    peaks = [x["peak_bytes"] for x in h[2:] if x["peak_bytes"] is not None]
    measured_ms = statistics.median(x["step_ms"] for x in h[2:])
    peak = max(peaks) if peaks else None
    row = {"budget": f"fit {budget}", "moved_after_plan": deferred, "plan": plan.summary(),
           "predicted_peak": plan.predicted_peak_bytes, "measured_max_allocated": peak,
           "peak_error": None if peak is None else (plan.predicted_peak_bytes - peak) / peak,
           "fits": None if peak is None else peak <= plan.usable_bytes, "predicted_step_ms": plan.predicted_step_ms,
           "measured_step_ms": measured_ms, "measured_tokens_per_s": seq * 1e3 / measured_ms,
           "predicted_tokens_per_s": seq * 1e3 / plan.predicted_step_ms, "oom_retries": sum(x["oom_retries"] for x in h),
           "events": [e["kind"] for e in trainer.events], "loss_first_last": [round(h[0]["loss"], 4), round(h[-1]["loss"], 4)]}
    print(f"   fit {budget}: weights moved after the plan: {deferred}; {plan.summary().splitlines()[0]}", flush=True)
    print(f"      peak predicted {plan.predicted_peak_bytes / GiB:.2f} GiB, measured "
          f"{'n/a' if peak is None else f'{peak / GiB:.2f} GiB'}; step predicted {plan.predicted_step_ms:.0f} ms, measured "
          f"{measured_ms:.0f} ms; OOM retries {row['oom_retries']}", flush=True)
    del trainer, model
    gc.collect()
    if not cpu_smoke:
        torch.cuda.set_per_process_memory_fraction(1.0, device)
        torch.cuda.empty_cache()
    return row


def streaming_table(rows: list[dict]) -> str:
    lines = [("| budget | plan | predicted peak | max_allocated | error | predicted step | measured step | tokens/s "
              "(measured / predicted) | copies hidden |"), "|---|---|--:|--:|--:|--:|--:|--:|--:|"]
    for r in rows:
        b = r["budget"] if isinstance(r["budget"], str) else f"{r['budget'] / GiB:.3f} GiB"
        if r.get("infeasible"):
            lines.append(f"| {b} | infeasible: {r['reason'].splitlines()[0][:160]} | | | | | | | |")
            continue
        peak = "n/a" if r["measured_max_allocated"] is None else f"{r['measured_max_allocated'] / GiB:.2f} GiB"
        err = "n/a" if r["peak_error"] is None else f"{r['peak_error']:+.1%}"
        hidden = "n/a" if r.get("copy_hidden_share") is None else f"{r['copy_hidden_share']:.0%}"
        lines.append(f"| {b} | {r['plan'].splitlines()[0][:90]} | {r['predicted_peak'] / GiB:.2f} GiB | {peak} | {err} | "
                     f"{r['predicted_step_ms']:.0f} ms | {r['measured_step_ms']:.0f} ms | "
                     f"{r['measured_tokens_per_s']:,.0f} / {r['predicted_tokens_per_s']:,.0f} | {hidden} |")
    return "\n".join(lines) + "\n"


def activation_offload_checks(quick: bool, steps: int = 7) -> list[dict]:
    """OFFLOAD units on the GPU (memtune.offload): each plan's measured peak against its
    prediction, and its median step time against the same model with those units SAVE and
    RECOMPUTE, side by side in one process; and what the planner does with
    ``allow_activation_offload`` at 50% and 35% of the unplanned activations."""
    from memtune.plan import Decision

    def median_step_ms(model, batch, loss_fn, precision, opt) -> float:
        times = []
        for _ in range(steps):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            train_step(model, batch, loss_fn, precision, opt)
            torch.cuda.synchronize()
            times.append((time.perf_counter() - t0) * 1e3)
        return sorted(times)[len(times) // 2]

    rows = []
    for name, make, batch, loss_fn in models(quick):
        precision = "bf16-mixed"
        torch.manual_seed(0)
        model = make().cuda()
        prof = memtune.profile(model, batch, loss_fn=loss_fn, precision=precision, target=torch.device("cuda"))
        base = memtune.plan(prof, 1 << 50, optimizer="adamw", state_dtypes=("fp32",), reserve=0)
        units = list(base.decisions)
        plans = {}
        for label, chosen in (("every other", units[::2]), ("all", units)):
            for d in (Decision.OFFLOAD, Decision.RECOMPUTE):
                p = dataclasses.replace(base, decisions={**base.decisions, **{u: d for u in chosen}})
                plans[f"{label} {d.value}"] = dataclasses.replace(
                    p, predicted_peak_bytes=memtune.predict_peak(prof, p).peak_bytes,
                    predicted_step_ms=memtune.predict_step_time(prof, p).total_ms)
        plans["save"] = base
        acts = prof.saved_activation_bytes
        for frac in (0.5, 0.35):
            budget = int(prof.baseline_peak_bytes - (1 - frac) * acts)
            for off in (False, True):
                try:
                    plans[f"plan {frac:.0%}{' +offload' if off else ''}"] = memtune.plan(
                        prof, budget, optimizer="adamw", state_dtypes=("fp32",), reserve=0, allow_activation_offload=off)
                except memtune.InfeasibleBudgetError:
                    pass
        for label, plan in plans.items():
            memtune.remove_plan(model)
            opt = memtune.apply_plan(model, plan)
            alloc, _ = real_step_peak(model, batch, loss_fn, precision, opt)
            ms = median_step_ms(model, batch, loss_fn, precision, opt)
            n_off = sum(d is Decision.OFFLOAD for d in plan.decisions.values())
            rows.append({"model": name, "plan": label, "offload_units": n_off,
                         "predicted_peak": plan.predicted_peak_bytes, "measured_max_allocated": alloc,
                         "error": (plan.predicted_peak_bytes - alloc) / alloc, "predicted_step_ms": plan.predicted_step_ms,
                         "measured_step_ms": ms, "offload_ms": plan.time.offload_ms if plan.time else None})
            print(f"offload {name:9s} {label:24s} {n_off} offloaded  peak predicted {plan.predicted_peak_bytes / GiB:.3f} "
                  f"measured {alloc / GiB:.3f} GiB ({rows[-1]['error']:+.2%})  step {ms:.1f} ms "
                  f"(predicted {plan.predicted_step_ms:.1f})", flush=True)
            del opt
        memtune.remove_plan(model)
        del model
        gc.collect()
        torch.cuda.empty_cache()
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--tmp", default="/tmp/memtune-gpu")
    ap.add_argument("--skip-fidelity", action="store_true", help="only the reserve and runtime checks")
    ap.add_argument("--skip-runtime", action="store_true", help="only the reserve and fidelity checks")
    ap.add_argument("--streaming", action="store_true", help="only section 5: streamed 7B plans at 24GB and 12GB")
    ap.add_argument("--cpu-smoke", action="store_true", help="with --streaming: a tiny Llama on the CPU")
    ap.add_argument("--activation-offload", action="store_true",
                    help="only OFFLOAD units: measured peak and step time against SAVE and RECOMPUTE")
    args = ap.parse_args()
    if args.activation_offload:
        if not torch.cuda.is_available():
            print("no CUDA device: nothing to validate")
            return
        rows = activation_offload_checks(args.quick)
        lines = ["| model | plan | offloaded units | predicted peak | measured max_allocated | error | step (median) | "
                 "predicted step |", "|---|---|--:|--:|--:|--:|--:|--:|"]
        lines += [f"| {r['model']} | {r['plan']} | {r['offload_units']} | {r['predicted_peak'] / GiB:.3f} GiB | "
                  f"{r['measured_max_allocated'] / GiB:.3f} GiB | {r['error']:+.2%} | {r['measured_step_ms']:.1f} ms | "
                  f"{r['predicted_step_ms']:.1f} ms |" for r in rows]
        md = "\n".join(lines) + "\n"
        path = _record.write("gpu_activation_offload", {"rows": rows}, md)
        print(md)
        print(f"wrote {path}")
        return
    if args.streaming:
        if not (args.cpu_smoke or torch.cuda.is_available()):
            print("no CUDA device: nothing to validate (--cpu-smoke checks the script on a tiny model)")
            return
        rows = streaming_checks(args.cpu_smoke)
        md = streaming_table(rows)
        path = _record.write("gpu_streaming_smoke" if args.cpu_smoke else "gpu_streaming", {"rows": rows}, md)
        print(md)
        print(f"wrote {path}")
        return
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to validate")
        return
    tmp = Path(args.tmp)
    tmp.mkdir(parents=True, exist_ok=True)
    reserve = measure_reserve()
    print(f"reserve: CUDA context + workspaces {reserve['context_and_workspace_bytes'] / 2**20:.0f} MiB", flush=True)
    fid = [] if args.skip_fidelity else fidelity(args.quick)
    rt = {} if args.skip_runtime else runtime_checks(args.quick, tmp)
    # Allocator slack once training ran: reserved beyond the peak allocation.
    slack = torch.cuda.max_memory_reserved() - torch.cuda.max_memory_allocated()
    reserve["allocator_slack_after_training"] = slack
    lines = ["| model | precision | budget | predicted | measured max_allocated | error |", "|---|---|---|---|---|---|"]
    for r in fid:
        if r.get("infeasible"):
            lines.append(f"| {r['model']} | {r['precision']} | {r['budget_fraction']:.0%} | infeasible (min {r['min_feasible'] / GiB:.2f} GiB) | | |")
            continue
        b = "baseline" if "budget_fraction" not in r else f"{r['budget_fraction']:.0%}"
        lines.append(f"| {r['model']} | {r['precision']} | {b} | {r['predicted_peak'] / GiB:.3f} GiB | "
                     f"{r['measured_max_allocated'] / GiB:.3f} GiB | {r['error']:+.2%} |")
    md = (f"Reserve: context+workspaces {reserve['context_and_workspace_bytes'] / 2**20:.0f} MiB; allocator slack after "
          f"training {slack / 2**20:.0f} MiB.\n\n" + "\n".join(lines) + "\n")
    name = "gpu_validation_runtime" if args.skip_fidelity else "gpu_validation"
    path = _record.write(name, {"reserve": reserve, "fidelity": fid, "runtime": rt}, md)
    print(md)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
