"""The memory model (memtune.timeline, which predict_peak and the planners share) against an
independent loop-by-loop replay, and the cost model's documented properties."""

from __future__ import annotations

import dataclasses
import random

import pytest

from memtune.cost_model import calibrate, cost_table, predict_step_time
from memtune.memory_model import predict_peak
from memtune.plan import Decision, OptimizerPlan, Plan
from memtune.variant import StepVariant
from memtune.planners import PlannerOptions
from memtune.planners.options import configs, timeline_for
from replay_reference import reference_peak
from synthetic import chain_profile


@pytest.mark.parametrize("source", ["synthetic", "gpt", "hf_llama", "cnn"])
def test_timeline_model_equals_an_independent_replay(source, profile_of):
    rng = random.Random(0)
    profs = ([chain_profile(rng.randint(2, 7), s, target_name="H100" if s % 2 else "cpu") for s in range(8)]
             if source == "synthetic" else [profile_of(source)])
    options = PlannerOptions(allow_offload=True, allow_microbatching=True)
    checked = 0
    for prof in profs:
        for cfg in configs(prof, options):
            tm, cc = timeline_for(prof, cfg)
            for _ in range(6):
                dec, save_ops = {}, {}
                for k, u in enumerate(tm.fqns):
                    dec[u] = rng.choice([d for d in Decision if d is not Decision.SELECTIVE or tm.K[k]])
                    if dec[u] is Decision.SELECTIVE:
                        save_ops[u] = rng.choice(tm.policies[k]).save_ops
                plan = Plan(budget_bytes=1 << 60, usable_bytes=1 << 60, decisions=dec, save_ops=save_ops,
                            optimizer=cfg.optimizer, variant=cfg.variant, grad_accum_steps=cfg.grad_accum_steps)
                want = reference_peak(prof, plan)
                assert tm.peak(cc, *tm.indicators(dec, save_ops)) == want
                assert predict_peak(prof, plan).peak_bytes == want
                checked += 1
    assert checked >= 18


def _plan(prof, **kw):
    dec = kw.pop("decisions", {u: Decision.SAVE for u in prof.unit_fqns})
    return Plan(budget_bytes=1 << 40, usable_bytes=1 << 40, decisions=dec, **kw)


def test_recompute_time_is_the_forward_time_of_recompute_units():
    prof = chain_profile(4, 3)
    table = cost_table(prof, device="H100")
    rc = {u: Decision.RECOMPUTE if k % 2 else Decision.SAVE for k, u in enumerate(prof.unit_fqns)}
    t0 = predict_step_time(prof, _plan(prof), device="H100")
    t1 = predict_step_time(prof, _plan(prof, decisions=rc), device="H100")
    want = sum(table.recompute_ms[u] for u, d in rc.items() if d is Decision.RECOMPUTE)
    assert t1.recompute_ms == pytest.approx(want) and t1.total_ms == pytest.approx(t0.total_ms + want)
    assert t0.forward_ms > sum(table.recompute_ms.values())  # units plus the code outside them


def test_low_precision_state_is_slower_and_micro_batching_only_adds_launches():
    prof = chain_profile(4, 5)
    names = [p.fqn for p in prof.params]
    times = {dt: predict_step_time(prof, _plan(prof, optimizer=OptimizerPlan(name="adamw", state_dtype=dt,
                                                                               adamw_params=tuple(names))), "H100")
             for dt in ("fp32", "bf16", "int8")}
    assert times["fp32"].optimizer_ms < times["bf16"].optimizer_ms
    assert times["fp32"].optimizer_ms < times["int8"].optimizer_ms
    whole = predict_step_time(prof, _plan(prof), "H100")
    split = predict_step_time(prof, _plan(prof, variant=StepVariant(micro_batch_size=1), grad_accum_steps=4), "H100")
    assert split.forward_ms > whole.forward_ms and split.backward_ms > whole.backward_ms
    no_overhead = dataclasses.replace(calibrate("cpu"), kernel_overhead_s=0.0)
    a = predict_step_time(prof, _plan(prof), no_overhead)
    b = predict_step_time(prof, _plan(prof, variant=StepVariant(micro_batch_size=1), grad_accum_steps=4), no_overhead)
    assert a.forward_ms == pytest.approx(b.forward_ms) and a.backward_ms == pytest.approx(b.backward_ms)


def test_ns_time_uses_ns_flops_at_the_bf16_rate():
    from memtune.optim import ns_flops

    prof = chain_profile(3, 1)
    muon = tuple(p.fqn for p in prof.params if p.fqn.startswith("blocks") and p.fqn.endswith("weight"))
    spec = dataclasses.replace(calibrate("cpu"), kernel_overhead_s=0.0)
    t = predict_step_time(prof, _plan(prof, optimizer=OptimizerPlan(name="muon2", ns_steps=5, muon_params=muon)), spec)
    flops = sum(ns_flops(*p.shape, 5) for p in prof.params if p.fqn in muon)
    assert t.ns_ms == pytest.approx(flops / spec.bf16_flops * 1e3)


def test_calibrate_measures_the_cpu_once_per_process():
    a = calibrate("cpu")
    assert a.fp32_flops > 1e8 and a.mem_bandwidth > 1e8 and 0 < a.kernel_overhead_s < 1e-3
    assert calibrate("cpu") is a
