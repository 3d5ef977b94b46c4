"""Does memtune's predicted peak hold when the step runs under ``torch.compile`` (inductor)?

For a GPT and a Hugging Face Llama on real text, at 50% and 80% of the unplanned peak: plan
(AdamW, as a user's own optimizer allows: recompute, micro-batching, chunked loss), then
measure one steady-state step eager and compiled, at the same plan, on the CPU. Then compare
with torch.compile's own knob, ``torch._functorch.config.activation_memory_budget``, at equal
measured peak: for each setting, the unplanned compiled model's measured peak becomes
memtune's budget, and memtune's plan is compiled and timed next to it (same optimizer, same
batch, same process layout), so the two step times are measured side by side.

How the peak is measured: inductor's kernels allocate below the dispatcher, where MemTracker
cannot see, so every run is measured the same way, from the process's resident high-water
mark (:class:`memtune.runtime.memguard.HostPeakMeter`) in a fresh process started with
``MALLOC_MMAP_THRESHOLD_=65536``; the eager run is cross-checked with the dispatch-level
:class:`~memtune.runtime.memguard.TensorMemoryGuard`.

    python benchmarks/compile_fidelity.py            # ~10 min on 2 CPU cores
    python benchmarks/compile_fidelity.py --quick    # GPT only, no activation_memory_budget sweep
    python benchmarks/compile_fidelity.py --graph    # the compiled-graph prediction (about 8 min)

``--graph`` checks :func:`memtune.compiled.predict_compiled_peak` and
:func:`memtune.compiled.plan_compiled`: for each model, unplanned and planned for the compiled
step at 50% and 80% of the eager unplanned peak, with and without ``let_checkpoints_compile()``,
the recorded prediction against the measured compiled peak (writes compile_graph_fidelity.*).

Writes benchmarks/results/compile_fidelity.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

PLAN_OPTIONS = dict(state_dtypes=("fp32",), allow_microbatching=True,
                    levers={"weights": (None,), "optimizer_in_backward": (False,), "state_offload": (False,)})
"""What a plan may change under a plain AdamW, as memtune.session allows it."""
AMB_VALUES = (0.5, 0.2, 0.05)


def build(name: str):
    import torch

    from memtune import zoo
    from memtune.data import TextCorpus

    torch.manual_seed(0)
    x, y = TextCorpus.load().batch("train", 8, 256, generator=torch.Generator().manual_seed(0))
    if name == "gpt":
        model = zoo.GPT(zoo.GPTConfig(n_layer=4, n_embd=256, n_head=4, block_size=256))
        return model, (x, y)
    model = zoo.hf_llama(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=4)
    return model, {"input_ids": x, "labels": x}


def _step(model, batch, plan, opt):
    from memtune.batching import loss_from_output, split_batch, split_micro_batches

    parts = split_micro_batches(batch, plan.micro_batch_size if plan is not None and plan.grad_accum_steps > 1 else None)
    for part, weight in parts:
        args, kwargs, target = split_batch(part, None)
        loss = loss_from_output(model(*args, **kwargs), part, target, None)
        (loss if weight == 1.0 else loss * weight).backward()
        del loss
    opt.step()
    opt.zero_grad(set_to_none=True)


def _measure(model, inner, batch, plan, opt, *, guard: bool) -> dict:
    """Peak (resident high-water mark) of one steady-state step and the median of 3 step times."""
    import torch
    from torch.utils._pytree import tree_flatten

    from memtune.optimizer_recording import optimizer_state_tensors
    from memtune.runtime.memguard import HostPeakMeter, TensorMemoryGuard

    for _ in range(2):  # the first creates the optimizer state (and compiles)
        _step(model, batch, plan, opt)
    static = [list(inner.parameters()), list(inner.buffers()), optimizer_state_tensors(opt), tree_flatten(batch)[0]]
    meter = HostPeakMeter()
    meter.track(static)
    with meter:
        _step(model, batch, plan, opt)
    out = {"peak_bytes": meter.peak_bytes}
    if guard:
        g = TensorMemoryGuard()
        g.track(static)
        with g:
            _step(model, batch, plan, opt)
        out["guard_peak_bytes"] = g.peak_bytes
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        _step(model, batch, plan, opt)
        times.append((time.perf_counter() - t0) * 1000)
    out["step_ms"] = round(statistics.median(times), 1)
    torch._dynamo.reset()
    return out


def worker_plan(name: str, frac: float, *, eager_too: bool = True, fast: bool = False) -> dict:
    """Plan at ``frac`` of the unplanned peak (``frac > 1``: at that many bytes); measure it
    eager, then compiled (``fast``: after :func:`memtune.compiled.let_checkpoints_compile`)."""
    import torch

    import memtune

    if fast:
        from memtune.compiled import let_checkpoints_compile

        let_checkpoints_compile()

    model, batch = build(name)
    prof = memtune.profile(model, batch, optimizer="adamw", target="cpu")
    budget = int(frac) if frac > 1 else int(prof.baseline_peak_bytes * frac)
    plan = memtune.plan(prof, budget, **PLAN_OPTIONS)
    opt = memtune.apply_plan(model, plan)
    eager = _measure(model, model, batch, plan, opt, guard=True) if eager_too else None
    compiled_model = torch.compile(model)
    t0 = time.perf_counter()
    _step(compiled_model, batch, plan, opt)
    compile_s = time.perf_counter() - t0
    compiled = _measure(compiled_model, model, batch, plan, opt, guard=False)
    return {"model": name, "fraction": frac, "unplanned_peak_bytes": prof.baseline_peak_bytes,
            "budget_bytes": budget, "predicted_peak_bytes": plan.predicted_peak_bytes,
            "plan": {"recompute": list(plan.recompute_units), "micro_batch_size": plan.micro_batch_size,
                     "grad_accum_steps": plan.grad_accum_steps, "loss_chunks": plan.loss_chunks},
            "eager": eager, "compiled": compiled, "first_compiled_step_s": round(compile_s, 1)}


def worker_amb(name: str, budget: float) -> dict:
    """The unplanned model compiled with inductor's activation_memory_budget."""
    import torch
    import torch._functorch.config as fconfig

    model, batch = build(name)
    opt = torch.optim.AdamW(model.parameters())
    fconfig.activation_memory_budget = budget
    compiled_model = torch.compile(model)
    _step(compiled_model, batch, None, opt)
    return {"model": name, "activation_memory_budget": budget,
            "compiled": _measure(compiled_model, model, batch, None, opt, guard=False)}


def worker_graph(name: str, frac: float, *, fast: bool) -> dict:
    """The compiled-graph prediction of the unplanned step (``frac`` 0) or of the plan
    :func:`memtune.compiled.plan_compiled` makes at ``frac`` of the eager unplanned peak, then
    the real compiled step measured."""
    import torch

    import memtune
    from memtune.compiled import let_checkpoints_compile, plan_compiled, predict_compiled_peak

    if fast:
        let_checkpoints_compile()
    model, batch = build(name)
    t0 = time.perf_counter()
    if frac == 0:
        plan, budget = None, None
        pred = predict_compiled_peak(model, batch)
        opt = torch.optim.AdamW(model.parameters())
        eager_pred = None
    else:
        prof = memtune.profile(model, batch, optimizer="adamw", target="cpu")
        budget = int(prof.baseline_peak_bytes * frac)
        try:
            plan, pred = plan_compiled(model, batch, budget, profile=prof, **PLAN_OPTIONS)
        except memtune.MemtuneError as e:  # no plan whose compiled recording can be trusted fits: said, not measured
            return {"model": name, "fraction": frac, "let_checkpoints_compile": fast, "budget_bytes": budget,
                    "refused": str(e),
                    "predict_and_plan_s": round(time.perf_counter() - t0, 1)}
        eager_pred = plan.predicted_peak_bytes
        opt = memtune.apply_plan(model, plan)
    plan_s = time.perf_counter() - t0
    compiled_model = torch.compile(model)
    _step(compiled_model, batch, plan, opt)
    measured = _measure(compiled_model, model, batch, plan, opt, guard=False)
    return {"model": name, "fraction": frac, "let_checkpoints_compile": fast, "budget_bytes": budget,
            "predicted_peak_bytes": pred.peak_bytes, "predicted_phase": pred.phase, "graphs": pred.graphs,
            "rng_replays": pred.rng_replays,
            "eager_predicted_peak_bytes": eager_pred, "predict_and_plan_s": round(plan_s, 1),
            "plan": None if plan is None else {"decisions": {u: d.value for u, d in plan.decisions.items()},
                                               "micro_batch_size": plan.micro_batch_size,
                                               "grad_accum_steps": plan.grad_accum_steps},
            "compiled": measured}


def graph_main() -> None:
    from _record import write

    rows = [_spawn("graph" + ("fast" if fast else ""), m, str(f))
            for m in ("gpt", "llama") for f in (0, 0.5, 0.8) for fast in (False, True)]
    table = _graph_table(rows)
    print(table)
    write("compile_graph_fidelity", {"rows": rows},
          "# torch.compile: the compiled-graph prediction against the measured compiled step\n\n"
          "Error = (predicted - measured) / measured; negative means the step used more than predicted.\n\n" + table + "\n")


def _graph_table(rows: list[dict]) -> str:
    import re
    from collections import Counter

    from memtune.units_fmt import fmt_bytes

    lines = ["| model | budget | let_checkpoints_compile | plan | eager prediction | compiled-graph prediction | "
             "measured compiled | error | under budget | graphs | RNG replays | predict + plan s | ms |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        budget = "-" if r["budget_bytes"] is None else f"{int(r['fraction'] * 100)}% ({fmt_bytes(r['budget_bytes'])})"
        let = "yes" if r["let_checkpoints_compile"] else "no"
        if "refused" in r:  # plan_compiled found no plan to return: (planning budget, compiled peak, RNG replays) tried
            tried = [(int(p), int(n)) for _, p, n in re.findall(r"\((\d+), (\d+), (\d+)\)", r["refused"])]
            peaks = [p for p, _ in tried]
            lines.append(f"| {r['model']} | {budget} | {let} | refused: {len(tried)} plans tried, compiled peaks "
                         f"{fmt_bytes(min(peaks))}–{fmt_bytes(max(peaks))}, {sum(1 for _, n in tried if n)} replaying "
                         f"RNG | | | | | no plan | | | {r['predict_and_plan_s']} | |")
            continue
        m, p = r["compiled"]["peak_bytes"], r["predicted_peak_bytes"]
        r["error_pct"] = _err(p, m)
        r["under_budget"] = None if r["budget_bytes"] is None else m <= r["budget_bytes"]
        plan = "unplanned" if r["plan"] is None else ", ".join(
            f"{k} {v}" for k, v in sorted(Counter(r["plan"]["decisions"].values()).items()) if k != "save") or "save all"
        if r["plan"] and r["plan"]["grad_accum_steps"] > 1:
            plan += f", micro {r['plan']['micro_batch_size']}x{r['plan']['grad_accum_steps']}"
        eager = "-" if r["eager_predicted_peak_bytes"] is None else fmt_bytes(r["eager_predicted_peak_bytes"])
        lines.append(f"| {r['model']} | {budget} | {let} | {plan} | {eager} | "
                     f"{fmt_bytes(p)} | {fmt_bytes(m)} | {r['error_pct']:+.2f}% | "
                     f"{'-' if r['under_budget'] is None else ('yes' if r['under_budget'] else 'NO')} | {r['graphs']} | "
                     f"{r['rng_replays']} | {r['predict_and_plan_s']} | {r['compiled']['step_ms']} |")
    return "\n".join(lines)


def _spawn(*args: str) -> dict:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    out = subprocess.run([sys.executable, __file__, "--worker", *args], capture_output=True, text=True, env=env)
    if out.returncode:
        raise RuntimeError(f"worker {args} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _plan_text(p: dict) -> str:
    return f"recompute {len(p['recompute'])}" + (f", micro {p['micro_batch_size']}x{p['grad_accum_steps']}"
                                                 if p["grad_accum_steps"] > 1 else "") + \
        (f", loss chunks {p['loss_chunks']}" if p["loss_chunks"] else "")


def _err(pred: int, measured: int) -> float:
    return round(100 * (pred - measured) / measured, 2)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--graph", action="store_true", help="check the compiled-graph prediction")
    ap.add_argument("--worker", nargs="+")
    args = ap.parse_args()
    if args.graph:
        graph_main()
        return
    if args.worker:
        kind, name, value = args.worker
        if kind.startswith("graph"):
            result = worker_graph(name, float(value), fast=kind.endswith("fast"))
        elif kind == "amb":
            result = worker_amb(name, float(value))
        else:
            result = worker_plan(name, float(value), eager_too=kind == "plan", fast=kind.endswith("fast"))
        print(json.dumps(result))
        return

    from _record import write
    from memtune.units_fmt import fmt_bytes

    models = ("gpt",) if args.quick else ("gpt", "llama")
    rows = [_spawn("plan", m, str(f)) for m in models for f in (0.5, 0.8)]
    for r in rows:  # the same plan compiled with let_checkpoints_compile (no graph break around recomputed blocks)
        r["compiled_fast"] = _spawn("planfast", r["model"], str(r["fraction"]))["compiled"]
    amb = [] if args.quick else [_spawn("amb", m, str(b)) for m in models for b in (1.0, *AMB_VALUES)]
    lines = ["| model | budget | plan | predicted | eager measured (err) | compiled measured (err) | "
             "compiled + let_checkpoints_compile (err) | eager ms | compiled ms | + let_checkpoints_compile ms |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        p, e, c = r["predicted_peak_bytes"], r["eager"]["peak_bytes"], r["compiled"]["peak_bytes"]
        f = r["compiled_fast"]["peak_bytes"]
        r["eager_error_pct"], r["compiled_error_pct"], r["compiled_fast_error_pct"] = _err(p, e), _err(p, c), _err(p, f)
        plan = _plan_text(r["plan"])
        lines.append(f"| {r['model']} | {int(r['fraction'] * 100)}% | {plan} | {fmt_bytes(p)} | {fmt_bytes(e)} "
                     f"({r['eager_error_pct']:+.2f}%) | {fmt_bytes(c)} ({r['compiled_error_pct']:+.2f}%) | "
                     f"{fmt_bytes(f)} ({r['compiled_fast_error_pct']:+.2f}%) | "
                     f"{r['eager']['step_ms']} | {r['compiled']['step_ms']} | {r['compiled_fast']['step_ms']} |")
    comparisons = []
    if amb:
        lines += ["", "At equal measured peak: each activation_memory_budget setting's measured peak (unplanned "
                  "compiled model) is memtune's budget; memtune's plan is compiled and timed in the same run, as it "
                  "is and after let_checkpoints_compile.", "",
                  "| model | activation_memory_budget | its peak | its ms | memtune plan | memtune peak | memtune ms | "
                  "+ let_checkpoints_compile peak | ms | time vs knob (as is / + let) |", "|---|---|---|---|---|---|---|---|---|---|"]
        for a in amb:
            peak = a["compiled"]["peak_bytes"]
            mine = _spawn("match", a["model"], str(peak))
            fast = _spawn("matchfast", a["model"], str(peak))
            c, cf = mine["compiled"], fast["compiled"]
            ratio = round(c["step_ms"] / a["compiled"]["step_ms"], 3)
            ratio_fast = round(cf["step_ms"] / a["compiled"]["step_ms"], 3)
            comparisons.append({"model": a["model"], "activation_memory_budget": a["activation_memory_budget"],
                                "knob_peak_bytes": peak, "knob_step_ms": a["compiled"]["step_ms"],
                                "memtune_plan": mine["plan"], "memtune_predicted_peak_bytes": mine["predicted_peak_bytes"],
                                "memtune_peak_bytes": c["peak_bytes"], "memtune_step_ms": c["step_ms"],
                                "time_ratio": ratio, "fast_peak_bytes": cf["peak_bytes"], "fast_step_ms": cf["step_ms"],
                                "fast_time_ratio": ratio_fast})
            lines.append(f"| {a['model']} | {a['activation_memory_budget']} | {fmt_bytes(peak)} | "
                         f"{a['compiled']['step_ms']} | {_plan_text(mine['plan'])} | {fmt_bytes(c['peak_bytes'])} | "
                         f"{c['step_ms']} | {fmt_bytes(cf['peak_bytes'])} | {cf['step_ms']} | {ratio} / {ratio_fast} |")
    table = "\n".join(lines)
    print(table)
    write("compile_fidelity_quick" if args.quick else "compile_fidelity", {"rows": rows, "activation_memory_budget": amb, "comparisons": comparisons},
          "# torch.compile: predicted vs measured peak, and activation_memory_budget\n\n" + table + "\n")


if __name__ == "__main__":
    main()
