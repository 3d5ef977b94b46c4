"""How good memtune's plans are on real training steps (CPU), and how they compare.

    .venv/bin/python benchmarks/plan_quality.py [--steps 7] [--skip-compile]

For GPT-like models (memtune.zoo.GPT, two sizes, CPU, fp32, AdamW) at budgets of 30%..90% of
the profiled baseline peak:

* memtune's exact plan: predicted peak, measured peak (MemTracker, the steady-state step of
  tests/reference.measure_step), and the measured step-time overhead against the same model
  without recomputation: median of ``--steps`` steps, planned and plain steps alternating in
  one run so that load drift on a shared machine cancels;
* (a) full checkpointing of every block: measured peak and overhead;
* (b) ``torch.distributed._tools.sac_ilp.sac_milp``: run on its own estimators
  (MemTracker + RuntimeEstimator + SACEstimator); reported as it behaves on this machine;
* (c) ``torch.compile`` with ``torch._functorch.config.activation_memory_budget`` at the same
  ratio, in a subprocess under a time cap. MemTracker cannot see inside compiled graphs, so
  for (c) the compared quantity is the bytes saved for backward (``saved_tensors_hooks``,
  deduplicated by storage), next to the same count for the eager model and memtune's plan.

Writes benchmarks/results/plan_quality.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _record  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

import memtune  # noqa: E402
from memtune import zoo  # noqa: E402
from memtune.apply import apply_plan  # noqa: E402
from memtune.errors import InfeasibleBudgetError  # noqa: E402
from memtune.plan import Decision, Plan  # noqa: E402
from memtune.planning import plan as make_plan  # noqa: E402
from reference import measure_step, train_step  # noqa: E402

MODELS = {
    "gpt-4x64": dict(n_layer=4, n_embd=64, n_head=4, block_size=128),
    "gpt-8x96": dict(n_layer=8, n_embd=96, n_head=4, block_size=128),
}
BATCH = 8
FRACTIONS = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
COMPILE_FRACTIONS = (0.5,)
COMPILE_TIMEOUT_S = 300


def make_model(cfg: dict) -> torch.nn.Module:
    torch.manual_seed(0)
    return zoo.GPT(zoo.GPTConfig(**cfg))


def make_batch(cfg: dict):
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (BATCH, cfg["block_size"]), generator=g)
    return x, torch.roll(x, -1, dims=1)


def saved_bytes(model, batch) -> int:
    """Distinct storages saved for backward in one forward (what activation checkpointing cuts)."""
    seen: dict[int, int] = {}
    static = {p.untyped_storage().data_ptr() for p in model.parameters()}

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in static:
            seen[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(*batch)
    loss.backward()
    model.zero_grad(set_to_none=True)
    return sum(seen.values())


def overhead(cfg, batch, plan: Plan, steps: int) -> tuple[float, float, float]:
    """(plain median s, planned median s, overhead) from alternating steps of two identical models."""
    plain, planned = make_model(cfg), make_model(cfg)
    opt_a = torch.optim.AdamW(plain.parameters(), lr=1e-3)
    opt_b = apply_plan(planned, plan)
    ta, tb = [], []
    for k in range(steps + 1):
        for model, opt, out in ((plain, opt_a, ta), (planned, opt_b, tb)) if k % 2 == 0 else (
                (planned, opt_b, tb), (plain, opt_a, ta)):
            t0 = time.perf_counter()
            train_step(model, batch, None, opt)
            out.append(time.perf_counter() - t0)
    ta, tb = ta[1:], tb[1:]  # first step: allocator and optimizer-state warm-up
    a, b = statistics.median(ta), statistics.median(tb)
    return a, b, b / a - 1


def full_checkpoint_plan(prof) -> Plan:
    return Plan(budget_bytes=1 << 62, usable_bytes=1 << 62, decisions={u: Decision.RECOMPUTE for u in prof.unit_fqns})


# ----------------------------------------------------------------------------- (b) sac_milp
def try_sac_milp(cfg, batch, fractions, baseline_peak, device: str = "cpu") -> dict:
    try:
        from torch._subclasses.fake_tensor import FakeTensorMode
        from torch.distributed._tools.ilp_utils import aggregate_stats, parse_module_info
        from torch.distributed._tools.mem_tracker import MemTracker
        from torch.distributed._tools.runtime_estimator import RuntimeEstimator
        from torch.distributed._tools.sac_estimator import SACEstimator
        from torch.distributed._tools.sac_ilp import sac_milp

        errors = {}
        for mode in ("operator-level-cost-model", "operator-level-benchmark"):
            try:
                with FakeTensorMode(), torch.device(device):
                    model = make_model(cfg)
                    fb = tuple(torch.randint(0, 256, t.shape, device=device) for t in batch)
                    opt = torch.optim.AdamW(model.parameters())
                    train_step(model, fb, None, opt)
                    mt = MemTracker()
                    mt.track_external(model, opt)
                    with mt:
                        train_step(model, fb, None, opt)
                    rt = RuntimeEstimator()
                    with rt(mode):
                        train_step(model, fb, None, opt)
                    se = SACEstimator()
                    with se(estimate_mode_type=mode):
                        model(*fb).backward()
                dev = torch.device(device) if device == "cpu" else torch.device("cuda", torch.cuda.current_device())
                info = aggregate_stats(model, mt, rt, se, dev)  # MemTracker keys stats by indexed device
                graph = parse_module_info(info)
                units = [f"GPT.transformer.h.{i}" for i in range(cfg["n_layer"])]
                out = {}
                for f in fractions:
                    dec, rc_time, peak = sac_milp(graph, memory_budget=baseline_peak * f / 2**30, ac_units=units)
                    out[str(f)] = {"discard_ratio": dec, "recompute_ms": rc_time, "peak_upper_bound_bytes": peak}
                return {"ran": True, "mode": mode, "results": out}
            except Exception as e:  # noqa: BLE001 - reported verbatim
                errors[mode] = f"{type(e).__name__}: {str(e).strip().splitlines()[-1] if str(e).strip() else ''}"
        return {"ran": False, "errors": errors}
    except Exception as e:  # noqa: BLE001
        return {"ran": False, "errors": {"import": f"{type(e).__name__}: {e}"}}


# ----------------------------------------------------------------------------- (c) compile
def compile_worker(cfg_name: str, fraction: float, steps: int) -> None:
    """Runs in a subprocess: compile with an activation memory budget, print one JSON line."""
    import torch._functorch.config as fconfig

    cfg = MODELS[cfg_name]
    batch = make_batch(cfg)
    out = {"fraction": fraction}
    fconfig.activation_memory_budget = fraction
    model = make_model(cfg)
    compiled = torch.compile(model)
    t0 = time.perf_counter()
    loss = compiled(*batch)
    loss.backward()
    out["compile_s"] = time.perf_counter() - t0
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        train_step(compiled, batch, None, opt)
        times.append(time.perf_counter() - t)
    out["step_s"] = statistics.median(times)
    out["saved_bytes"] = saved_bytes(compiled, batch)
    print("RESULT " + json.dumps(out))


def try_compile(cfg_name: str, fraction: float, steps: int) -> dict:
    cmd = [sys.executable, __file__, "--compile-worker", cfg_name, str(fraction), "--steps", str(steps),
           "--threads", str(torch.get_num_threads())]
    t0 = time.perf_counter()
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=COMPILE_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return {"ran": False, "error": f"timed out after {COMPILE_TIMEOUT_S} s"}
    for line in r.stdout.splitlines():
        if line.startswith("RESULT "):
            return {"ran": True, "wall_s": time.perf_counter() - t0, **json.loads(line[7:])}
    tail = (r.stderr or r.stdout).strip().splitlines()[-3:]
    return {"ran": False, "error": " | ".join(tail)}


# ----------------------------------------------------------------------------- CUDA
def cuda_main(steps: int) -> None:
    """On a CUDA machine: memtune's plans for the local GPU (predicted vs
    ``torch.cuda.max_memory_allocated`` of a steady-state step, budget reserve excluded), and
    sac_milp with its CUDA estimators. Writes benchmarks/results/plan_quality_cuda.{json,md}."""
    dev = torch.device("cuda")
    record = {"command": " ".join([Path(sys.executable).name, *sys.argv]), "torch_version": torch.__version__,
              "device": torch.cuda.get_device_name(), "git_commit": _record.git_commit(), "batch": BATCH, "models": {}}
    md = [f"# Plan quality on {torch.cuda.get_device_name()} (GPT, fp32, AdamW)", ""]
    for name, cfg in MODELS.items():
        batch = tuple(t.to(dev) for t in make_batch(cfg))
        prof = memtune.profile(make_model(cfg).to(dev), batch, target=dev)
        base = prof.baseline_peak_bytes

        def measured_peak(model, opt) -> int:
            for _ in range(2):
                train_step(model, batch, None, opt)
            torch.cuda.synchronize()
            # Peak of the step above what was allocated before it, plus the tensors the step starts
            # with (parameters, optimizer state, batch): cuBLAS workspaces and other models' leftovers,
            # which the budget reserve covers, are not counted.
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
            train_step(model, batch, None, opt)
            torch.cuda.synchronize()
            start = [*model.parameters(), *batch, *(t for st in opt.state.values() for t in st.values()
                                                     if torch.is_tensor(t) and t.is_cuda)]
            live = sum(-(-t.untyped_storage().nbytes() // 512) * 512 for t in start)
            return torch.cuda.max_memory_allocated() - before + live

        rows = []
        for f in FRACTIONS:
            row = {"fraction": f}
            try:
                p = make_plan(prof, int(base * f) + (1 << 30), optimizer="adamw", state_dtypes=("fp32",))
            except InfeasibleBudgetError as e:
                row.update(infeasible=True, min_feasible_bytes=e.min_feasible_bytes - (1 << 30))
                rows.append(row)
                continue
            model = make_model(cfg).to(dev)
            opt = apply_plan(model, p)
            meas = measured_peak(model, opt)
            row.update(recompute_units=len(p.recompute_units), predicted_peak_bytes=p.predicted_peak_bytes,
                       measured_peak_bytes=meas, error_pct=100 * (p.predicted_peak_bytes - meas) / meas)
            rows.append(row)
            del model, opt
            torch.cuda.empty_cache()
        sac = try_sac_milp(cfg, batch, FRACTIONS, base, device="cuda")
        record["models"][name] = {"config": cfg, "baseline_peak_bytes": base, "memtune": rows, "sac_milp": sac}
        md += [f"## {name}: {cfg}, batch {BATCH}", "", f"Profiled baseline peak {_mib(base)} MiB.", "",
               "| budget (of baseline) | recompute units | predicted MiB | measured MiB | error |", "|---|---|---|---|---|"]
        for r in rows:
            if r.get("infeasible"):
                md.append(f"| {r['fraction']:.0%} | infeasible (min {_mib(r['min_feasible_bytes'])} MiB) | | | |")
            else:
                md.append(f"| {r['fraction']:.0%} | {r['recompute_units']} | {_mib(r['predicted_peak_bytes'])} | "
                          f"{_mib(r['measured_peak_bytes'])} | {r['error_pct']:+.2f}% |")
        md.append("")
        if sac.get("ran"):
            md += ["| budget | sac_milp discard ratios | recompute ms | peak bound MiB |", "|---|---|---|---|"]
            for k, v in sac["results"].items():
                md.append(f"| {float(k):.0%} | {v['discard_ratio']} | {v['recompute_ms']:.3f} | "
                          f"{_mib(v['peak_upper_bound_bytes'])} |")
        else:
            md.append("sac_milp did not run: " + "; ".join(f"{k}: {v}" for k, v in sac["errors"].items()))
        md.append("")
    out = ROOT / "benchmarks" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "plan_quality_cuda.json").write_text(json.dumps(record, indent=2, default=str))
    text = "\n".join(md) + "\n"
    (out / "plan_quality_cuda.md").write_text(text)
    print(text)


# ----------------------------------------------------------------------------- main
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=7)
    ap.add_argument("--skip-compile", action="store_true")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch CPU threads (1: steadier timings on a shared machine)")
    ap.add_argument("--compile-worker", nargs=2, metavar=("MODEL", "FRACTION"))
    ap.add_argument("--cuda", action="store_true", help="run the CUDA comparison instead (needs a GPU)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.cuda:
        cuda_main(args.steps)
        return
    if args.compile_worker:
        compile_worker(args.compile_worker[0], float(args.compile_worker[1]), args.steps)
        return

    record = {"command": " ".join([Path(sys.executable).name, *sys.argv]), "torch_version": torch.__version__,
              "device": f"cpu: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads",
              "git_commit": _record.git_commit(), "batch": BATCH, "models": {}}
    md = ["# Plan quality on CPU (GPT, fp32, AdamW)", ""]
    for name, cfg in MODELS.items():
        batch = make_batch(cfg)
        prof = memtune.profile(make_model(cfg), batch, target="cpu")
        base = prof.baseline_peak_bytes
        m0 = make_model(cfg)
        measured_base = measure_step(m0, batch, opt=torch.optim.AdamW(m0.parameters(), lr=1e-3))
        eager_saved = saved_bytes(make_model(cfg), batch)
        rows = []
        for f in FRACTIONS:
            budget = int(base * f)
            row = {"fraction": f, "budget_bytes": budget}
            try:
                t = time.perf_counter()
                p = make_plan(prof, budget, optimizer="adamw", state_dtypes=("fp32",))
                row["plan_s"] = time.perf_counter() - t
            except InfeasibleBudgetError as e:
                row["infeasible"] = True
                row["min_feasible_bytes"] = e.min_feasible_bytes
                rows.append(row)
                continue
            model = make_model(cfg)
            measured = measure_step(model, batch, opt=apply_plan(model, p))
            a, b, ov = overhead(cfg, batch, p, args.steps)
            planned_model = make_model(cfg)
            apply_plan(planned_model, p)
            row.update(recompute_units=len(p.recompute_units), predicted_peak_bytes=p.predicted_peak_bytes,
                       measured_peak_bytes=measured, error_pct=100 * (p.predicted_peak_bytes - measured) / measured,
                       fits=measured <= budget, plain_step_s=a, planned_step_s=b, overhead_pct=100 * ov,
                       predicted_overhead_pct=100 * p.time.recompute_ms / (p.predicted_step_ms - p.time.recompute_ms),
                       saved_bytes=saved_bytes(planned_model, batch), plan=p.to_dict())
            rows.append(row)
            print(name, f, {k: v for k, v in row.items() if k != "plan"}, flush=True)
        full = full_checkpoint_plan(prof)
        fm = make_model(cfg)
        full_measured = measure_step(fm, batch, opt=apply_plan(fm, full))
        fa, fb, fov = overhead(cfg, batch, full, args.steps)
        fsm = make_model(cfg)
        apply_plan(fsm, full)
        full_row = {"measured_peak_bytes": full_measured, "overhead_pct": 100 * fov, "saved_bytes": saved_bytes(fsm, batch)}
        sac = try_sac_milp(cfg, batch, FRACTIONS, base)
        comp = {} if args.skip_compile else {str(f): try_compile(name, f, args.steps) for f in COMPILE_FRACTIONS}
        record["models"][name] = {"config": cfg, "units": len(prof.units), "baseline_peak_bytes": base,
                                  "measured_baseline_peak_bytes": measured_base, "eager_saved_bytes": eager_saved,
                                  "memtune": rows, "full_checkpoint": full_row, "sac_milp": sac, "compile": comp}
        md += _table(name, cfg, prof, measured_base, eager_saved, rows, full_row, sac, comp)
    out = ROOT / "benchmarks" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "plan_quality.json").write_text(json.dumps(record, indent=2, default=str))
    text = "\n".join(md) + "\n"
    (out / "plan_quality.md").write_text(text)
    print(text)


def _mib(b) -> str:
    return f"{b / 2**20:.2f}"


def _table(name, cfg, prof, measured_base, eager_saved, rows, full_row, sac, comp) -> list[str]:
    md = [f"## {name}: {cfg}, batch {BATCH}, {len(prof.units)} units", "",
          f"Baseline peak: profiled {_mib(prof.baseline_peak_bytes)} MiB, measured {_mib(measured_base)} MiB. "
          f"Saved-for-backward bytes, eager: {_mib(eager_saved)} MiB.", "",
          "| budget | recompute units | predicted peak MiB | measured peak MiB | error | fits | step overhead "
          "(measured) | overhead (predicted) | saved MiB |",
          "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r.get("infeasible"):
            md.append(f"| {r['fraction']:.0%} | infeasible: min {_mib(r['min_feasible_bytes'])} MiB "
                      f"({r['min_feasible_bytes'] / prof.baseline_peak_bytes:.0%}) | | | | | | | |")
            continue
        md.append(f"| {r['fraction']:.0%} | {r['recompute_units']} | {_mib(r['predicted_peak_bytes'])} | "
                  f"{_mib(r['measured_peak_bytes'])} | {r['error_pct']:+.2f}% | {'yes' if r['fits'] else 'NO'} | "
                  f"{r['overhead_pct']:+.1f}% | {r['predicted_overhead_pct']:+.1f}% | {_mib(r['saved_bytes'])} |")
    md.append(f"| (a) full checkpointing | {len(prof.units)} | | {_mib(full_row['measured_peak_bytes'])} | | | "
              f"{full_row['overhead_pct']:+.1f}% | | {_mib(full_row['saved_bytes'])} |")
    md.append("")
    if sac.get("ran"):
        md.append(f"(b) sac_milp ({sac['mode']}): " + "; ".join(
            f"{float(k):.0%}: discard {v['discard_ratio']}, recompute {v['recompute_ms']:.2f} ms, peak bound "
            f"{_mib(v['peak_upper_bound_bytes'])} MiB" for k, v in sac["results"].items()))
    else:
        md.append("(b) sac_milp did not run on this machine: " + "; ".join(f"{k}: {v}" for k, v in sac["errors"].items()))
    md.append("")
    for f, c in comp.items():
        if c.get("ran"):
            md.append(f"(c) torch.compile, activation_memory_budget={f}: compile {c['compile_s']:.1f} s, step "
                      f"{c['step_s'] * 1e3:.1f} ms, saved-for-backward {_mib(c['saved_bytes'])} MiB "
                      f"(eager {_mib(eager_saved)} MiB).")
        else:
            md.append(f"(c) torch.compile, activation_memory_budget={f}: did not finish: {c['error']}")
    md.append("")
    return md




if __name__ == "__main__":
    try:
        main()
    except Exception:
        traceback.print_exc()
        raise
