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

Writes benchmarks/results/gpu_validation.json and .md.
"""

from __future__ import annotations

import argparse
import gc
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


def real_step_peak(model, batch, loss_fn, precision, opt) -> tuple[int, int]:
    """(max allocated, max reserved) of the third step (the first two create optimizer state)."""
    from memtune.batching import loss_from_output, split_batch

    def step():
        args, kwargs, target = split_batch(batch, loss_fn)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=precision == "bf16-mixed"):
            out = model(*args, **kwargs)
            loss = loss_from_output(out, batch, target, loss_fn)
        del out
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--tmp", default="/tmp/memtune-gpu")
    ap.add_argument("--skip-fidelity", action="store_true", help="only the reserve and runtime checks")
    ap.add_argument("--skip-runtime", action="store_true", help="only the reserve and fidelity checks")
    args = ap.parse_args()
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
