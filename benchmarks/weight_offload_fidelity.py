"""Weight offload on every family of the joint-fidelity suite, on this CPU.

    python benchmarks/weight_offload_fidelity.py      # about 80 s on 2 cores

Each model (and a PEFT LoRA Llama, whose frozen base weights stream too) is profiled on the CPU
with weight offload recorded, planned at 80% of its unplanned
peak with weight offload pinned on, applied, and (1) trained two steps beside the same plan
without weight offload: the parameters must be ``torch.equal``; (2) measured by MemTracker over
one planned step against the prediction. On a CPU target the host Parameters and the device
copies are both CPU memory, and both profile and MemTracker count them. Writes
``benchmarks/results/weight_offload_fidelity.{json,md}``.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from pathlib import Path

import torch

import memtune
from memtune.apply import applied_levers, apply_plan
from memtune.batching import loss_from_output, split_batch
from memtune.variant import StepVariant

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import _record  # noqa: E402
from reference import measure_planned_step  # noqa: E402
from test_joint_fidelity import CASES, fresh  # noqa: E402


def train(case, plan, steps=2):
    model = fresh(case)
    opt = apply_plan(model, plan)
    for _ in range(steps):
        args, kwargs, target = split_batch(case.batch, case.loss_fn)
        loss = loss_from_output(model(*args, **kwargs), case.batch, target, case.loss_fn)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return model


def cases() -> dict:
    """The joint-fidelity families, and a LoRA-wrapped HF Llama (tests/runtime/test_lora.py)."""
    from cases import Case

    out = dict(sorted(CASES.items()))
    try:
        sys.path.insert(0, str(ROOT / "tests" / "runtime"))
        from test_lora import batches, lora_llama
    except ImportError:  # (peft not installed)
        return out
    out["lora_llama"] = Case("lora_llama", lora_llama, batches(1)[0])
    return out


def main() -> None:
    rows = []
    for name, case in cases().items():
        t0 = time.perf_counter()
        prof = memtune.profile(fresh(case), case.batch, loss_fn=case.loss_fn, target="cpu",
                               space=memtune.PlanSpace(levers={"weight_offload": (False, True)}))
        budget = int(prof.baseline_peak_bytes * 0.8)
        plan = memtune.plan(prof, budget, levers={"weight_offload": (True,)})
        streamed_model = train(case, plan)
        streamed = len(applied_levers(streamed_model)["weight_offload"].host_params)
        ordinary = train(case, dataclasses.replace(plan, variant=StepVariant()))
        equal = all(torch.equal(a, b) for a, b in zip(streamed_model.parameters(), ordinary.parameters()))
        model = fresh(case)
        measured = measure_planned_step(model, case.batch, plan, apply_plan(model, plan), loss_fn=case.loss_fn)
        rows.append(dict(model=name, streamed_params=streamed, budget=budget, predicted=plan.predicted_peak_bytes,
                         measured=measured, error=measured / plan.predicted_peak_bytes - 1,
                         fits=measured <= budget, equal=equal, seconds=round(time.perf_counter() - t0, 1)))
        print(rows[-1], flush=True)
    lines = [f"{'model':<11} {'streamed':>8} {'predicted':>10} {'measured':>10} {'error':>8} {'fits':>5} {'equal':>6}"]
    lines += [f"{r['model']:<11} {r['streamed_params']:>8} {r['predicted']:>10,} {r['measured']:>10,} "
              f"{r['error']:>+8.2%} {str(r['fits']):>5} {str(r['equal']):>6}" for r in rows]
    print("\n".join(lines))
    print(f"wrote {_record.write('weight_offload_fidelity', dict(rows=rows), chr(10).join(lines))}")


if __name__ == "__main__":
    main()
