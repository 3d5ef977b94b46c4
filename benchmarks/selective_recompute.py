"""Per-op selective recomputation against whole-block checkpointing, side by side on the CPU.

    .venv/bin/python benchmarks/selective_recompute.py [--steps 9] [--models gpt,llama] [--quick]

For a nanoGPT-shaped GPT of our own (memtune.zoo.GPT: d=256, 6 layers, seq 256, batch 8) and a
Hugging Face Llama of the same shape (random weights), AdamW with fp32 state and no other lever
(the comparison is about what is recomputed), at 80%, 60%, 50% and 35% of the unplanned peak:

* **memtune**: the exact plan, per-op save sets in its space (``SELECTIVE`` units);
* **whole units**: the exact plan over whole-unit decisions only (the same profile without its
  per-op record: what memtune planned before per-op decisions);
* **every block**: full checkpointing of every block;
* **save matmuls**: every block under a fixed selective policy that keeps the outputs of its
  matmuls and attention (``mm``, ``addmm``, ``bmm``, scaled-dot-product attention) and
  recomputes the rest.

Per row: the predicted peak (memtune's rows), the measured peak (MemTracker, the steady-state
step of tests/reference.py) and the step time relative to the same model without
recomputation: one thread, plain and planned steps alternating in one run, medians of
``--steps`` steps each after a warm-up step. Writes benchmarks/results/selective_recompute.{json,md}.

``torch.compile``'s ``activation_memory_budget`` is not a row: MemTracker cannot see inside a
compiled graph on the CPU, so its peak cannot be measured the same way (benchmarks/plan_quality.py
compares it on saved-for-backward bytes instead).
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _record  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

import memtune  # noqa: E402
from memtune import zoo  # noqa: E402
from memtune.errors import InfeasibleBudgetError  # noqa: E402
from memtune.levers import LEVERS  # noqa: E402
from memtune.plan import Decision, Plan  # noqa: E402
from memtune.selective import op_keys  # noqa: E402
from reference import measure_planned_step, planned_step  # noqa: E402

FRACTIONS = (0.8, 0.6, 0.5, 0.35)
MATMULS = ("aten.mm.default", "aten.addmm.default", "aten.bmm.default", "aten.baddbmm.default",
           "aten._scaled_dot_product_flash_attention_for_cpu.default",
           "aten._scaled_dot_product_efficient_attention.default", "aten._scaled_dot_product_flash_attention.default")
OPTIONS = dict(optimizer="adamw", state_dtypes=("fp32",), levers={n: (lever.default,) for n, lever in LEVERS.items()})


@dataclasses.dataclass
class Model:
    name: str
    make: object
    batch: object
    loss_fn: object = None


def models(quick: bool) -> dict[str, Model]:
    d, layers, seq, batch = (64, 3, 64, 4) if quick else (256, 6, 256, 8)
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (batch, seq), generator=g)
    y = torch.roll(x, -1, dims=1)

    def gpt():
        torch.manual_seed(0)
        return zoo.GPT(zoo.GPTConfig(n_layer=layers, n_embd=d, n_head=4, block_size=seq))

    def llama():
        torch.manual_seed(0)
        return zoo.hf_llama(hidden_size=d, intermediate_size=int(d * 8 / 3) // 8 * 8, num_hidden_layers=layers,
                            num_attention_heads=4)

    return {"gpt": Model(f"GPT d={d} L={layers} seq={seq} b={batch}", gpt, (x, y)),
            "llama": Model(f"HF Llama d={d} L={layers} seq={seq} b={batch}", llama, {"input_ids": x, "labels": y})}


def without_ops(profile):
    d = profile.to_dict()
    for rec in [d] + list(d.get("step_variants", ())):
        for u in rec["units"]:
            u["ops"] = []
    return memtune.ModelProfile.from_dict(d)


def plan_at(profile, budget):
    try:
        return memtune.plan(profile, budget, **OPTIONS), budget
    except InfeasibleBudgetError as e:
        return memtune.plan(profile, e.min_feasible_bytes, **OPTIONS), e.min_feasible_bytes


def fixed_plan(profile, base: Plan, policy: str) -> Plan:
    if policy == "every block":
        return dataclasses.replace(base, decisions={u: Decision.RECOMPUTE for u in profile.unit_fqns}, save_ops={})
    save = {u.fqn: tuple(k for k, o in zip(op_keys(u), u.ops) if o.name in MATMULS) for u in profile.units}
    return dataclasses.replace(base, decisions={u: Decision.SELECTIVE for u in profile.unit_fqns}, save_ops=save)


def measure(m: Model, plan: Plan) -> int:
    model = m.make()
    opt = memtune.apply_plan(model, plan)
    return measure_planned_step(model, m.batch, plan, opt, loss_fn=m.loss_fn)


def overhead(m: Model, plain_plan: Plan, plan: Plan, steps: int) -> tuple[float, float]:
    """(plain median s, planned / plain - 1) from alternating steps of two identical models."""
    a, b = m.make(), m.make()
    opt_a, opt_b = memtune.apply_plan(a, plain_plan), memtune.apply_plan(b, plan)
    ta, tb = [], []
    for k in range(steps + 1):
        order = ((a, opt_a, plain_plan, ta), (b, opt_b, plan, tb))
        for model, opt, p, out in (order if k % 2 == 0 else order[::-1]):
            t0 = time.perf_counter()
            planned_step(model, m.batch, p, opt, loss_fn=m.loss_fn)
            out.append(time.perf_counter() - t0)
    plain, planned = statistics.median(ta[1:]), statistics.median(tb[1:])
    return plain, planned / plain - 1


def run_model(key: str, m: Model, steps: int) -> list[dict]:
    t0 = time.perf_counter()
    prof = memtune.profile(m.make(), m.batch, loss_fn=m.loss_fn, target="cpu")
    whole_prof = without_ops(prof)
    print(f"{m.name}: profiled in {time.perf_counter() - t0:.1f} s; unplanned peak "
          f"{prof.baseline_peak_bytes / 2**20:.2f} MiB", flush=True)
    plain = memtune.plan(prof, 1 << 50, **OPTIONS)
    rows = []
    fixed = {name: fixed_plan(prof, plain, name) for name in ("every block", "save matmuls")}
    fixed_rows = {}
    for name, plan in fixed.items():
        measured = measure(m, plan)
        _, ovh = overhead(m, plain, plan, steps)
        fixed_rows[name] = dict(measured=measured, overhead=ovh)
    for frac in FRACTIONS:
        budget = int(prof.baseline_peak_bytes * frac)
        for name, profile in (("memtune", prof), ("whole units", whole_prof)):
            plan, used = plan_at(profile, budget)
            measured = measure(m, plan)
            _, ovh = overhead(m, plain, plan, steps)
            rows.append(dict(model=key, level=frac, row=name, budget=used, predicted=plan.predicted_peak_bytes,
                             measured=measured, overhead=ovh, fits=measured <= used,
                             selective=sum(d is Decision.SELECTIVE for d in plan.decisions.values()),
                             recompute=sum(d is Decision.RECOMPUTE for d in plan.decisions.values()),
                             predicted_ms=plan.predicted_step_ms))
            print(_line(rows[-1], prof.baseline_peak_bytes), flush=True)
        for name, r in fixed_rows.items():
            rows.append(dict(model=key, level=frac, row=name, budget=None, predicted=None, **r,
                             fits=r["measured"] <= budget))
            print(_line(rows[-1], prof.baseline_peak_bytes), flush=True)
    for r in rows:
        r["unplanned_peak"] = prof.baseline_peak_bytes
    return rows


def _line(r: dict, base: int) -> str:
    pred = f"{r['predicted'] / 2**20:8.2f}" if r["predicted"] else "       -"
    err = f"{(r['measured'] - r['predicted']) / r['measured']:+6.2%}" if r["predicted"] else "     -"
    units = f"{r.get('selective', '-')}/{r.get('recompute', '-')}" if "selective" in r else "-"
    return (f"{r['model']:<6} {r['level']:>4.0%} {r['row']:<13} {pred} {r['measured'] / 2**20:8.2f} "
            f"{r['measured'] / base:6.1%} {err:>7} {r['overhead']:+7.1%} {'yes' if r['fits'] else 'NO':>4} {units:>6}")


HEADER = (f"{'model':<6} {'lvl':>4} {'row':<13} {'pred MiB':>8} {'meas MiB':>8} {'of peak':>6} {'error':>7} "
          f"{'time':>7} {'fits':>4} {'sel/rc':>6}")


def markdown(rows: list[dict], names: dict[str, str], steps: int) -> str:
    out = ["# Selective recomputation: side by side (CPU, one thread)", "",
           f"Medians of {steps} alternating steps; time is relative to the same model without recomputation. "
           "`fits`: measured peak (MemTracker) at or under the budget of that level; the fixed rows "
           "(`every block`, `save matmuls`) have one peak whatever the level.", ""]
    for key, name in names.items():
        out += [f"## {name}", "", "| level | row | predicted MiB | measured MiB | of unplanned peak | error | "
                "time vs no recompute | fits | selective/recompute units |", "|---|---|---|---|---|---|---|---|---|"]
        for r in rows:
            if r["model"] != key:
                continue
            pred = f"{r['predicted'] / 2**20:.2f}" if r["predicted"] else "-"
            err = f"{(r['measured'] - r['predicted']) / r['measured']:+.2%}" if r["predicted"] else "-"
            units = f"{r['selective']}/{r['recompute']}" if "selective" in r else "-"
            out.append(f"| {r['level']:.0%} | {r['row']} | {pred} | {r['measured'] / 2**20:.2f} | "
                       f"{r['measured'] / r['unplanned_peak']:.1%} | {err} | {r['overhead']:+.1%} | "
                       f"{'yes' if r['fits'] else 'no'} | {units} |")
        out.append("")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=9)
    ap.add_argument("--models", default="gpt,llama")
    ap.add_argument("--quick", action="store_true", help="small shapes (a smoke run, not the figures)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    all_models = models(args.quick)
    keys = [k for k in args.models.split(",") if k]
    print(HEADER)
    rows = []
    for key in keys:
        rows += run_model(key, all_models[key], args.steps)
    names = {k: all_models[k].name for k in keys}
    md = markdown(rows, names, args.steps)
    path = _record.write("selective_recompute" + ("_quick" if args.quick else ""),
                         {"steps": args.steps, "models": names, "rows": rows}, md)
    print(md)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
