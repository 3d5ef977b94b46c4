"""Joint-space conformance: every plan the planner can return fits its budget when it runs.

For model families beyond the profiler's suite (memtune's zoo plus Hugging Face Llama, GPT-2,
BERT, T5 and Mixtral configs: decoders, an encoder, an encoder-decoder, two MoEs, a CNN with
batch norm and a model with value-dependent control flow), plans are sampled across optimizer
× state precision × Newton-Schulz steps × micro-batching × weight offload × recompute sets (whole units and
per-op save sets), at budgets from the
minimum feasible to 100% of the configuration's unplanned peak. Each plan is applied to a fresh
model, trained for real CPU steps the way memtune's runtime takes them, and the steady-state
step is measured with PyTorch's MemTracker (tests/reference.py). Every measured peak must be
within 3% of the prediction, and a planner's plan must fit its budget.

The table of every sampled plan is printed at the end of the test session.
"""

from __future__ import annotations

import dataclasses
import random
import zlib

import pytest
import torch
import torch.nn.functional as F

import memtune
from memtune import zoo
from memtune.apply import apply_plan
from memtune.errors import InfeasibleBudgetError
from memtune.optimizers import FAMILIES
from memtune.plan import Decision, Plan
from memtune.variant import StepVariant
from memtune.units_fmt import fmt_bytes
from cases import Case, _lm_loss
from reference import measure_planned_step

TOLERANCE = 0.03
PLANNED_PER_MODEL = 3
RANDOM_PER_MODEL = 2


def _tokens(batch: int = 8, seq: int = 32):
    from memtune.data import TextCorpus

    return TextCorpus.load().batch("train", batch, seq, generator=torch.Generator().manual_seed(0))


def families() -> dict[str, Case]:
    g = torch.Generator().manual_seed(0)
    x, y = _tokens()
    lm = {"input_ids": x, "labels": y}
    return {c.name: c for c in [
        Case("gpt", lambda: zoo.GPT(zoo.GPTConfig(n_layer=3, n_embd=32, n_head=2, block_size=32)), (x, y)),
        Case("moe", lambda: zoo.MoE(width=32, hidden=64, depth=3), (x, y), _lm_loss),
        Case("cnn", lambda: zoo.ConvNet(channels=8, depth=3),
             (torch.randn(8, 3, 16, 16, generator=g), torch.randint(0, 10, (8,), generator=g)), F.cross_entropy),
        Case("branchy", lambda: zoo.Branchy(d_in=16, width=64, depth=3),
             (torch.randn(64, 16, generator=g), torch.randint(0, 10, (64,), generator=g)), F.cross_entropy),
        Case("hf_llama", lambda: zoo.hf_llama(hidden_size=32, intermediate_size=86, num_hidden_layers=3,
                                              num_attention_heads=2), lm),
        Case("hf_gpt2", lambda: zoo.hf_gpt2(n_embd=32, n_layer=3, n_head=2), lm),
        Case("hf_bert", lambda: zoo.hf_bert_mlm(hidden_size=32, num_hidden_layers=3, intermediate_size=64), lm),
        Case("hf_t5", lambda: zoo.hf_t5(d_model=32, d_kv=8, d_ff=64, num_layers=2), lm),
        Case("hf_mixtral", lambda: zoo.hf_mixtral(hidden_size=32, intermediate_size=64, num_hidden_layers=2), lm),
    ]}


CASES = families()


def fresh(case: Case) -> torch.nn.Module:
    torch.manual_seed(0)
    return case.make()


def _profile(case: Case):
    # Every family, each at its own NS floor (Muon² 3, Muon 5), every precision, every halved micro-batch.
    # Weight offload too: on the CPU its copies are host memory, counted as MemTracker counts them.
    return memtune.profile(fresh(case), case.batch, loss_fn=case.loss_fn, target="cpu",
                           space=memtune.PlanSpace(optimizers=FAMILIES, levers={"weight_offload": (False, True)}))


def _measure(case: Case, plan: Plan) -> int:
    model = fresh(case)
    opt = apply_plan(model, plan)
    return measure_planned_step(model, case.batch, plan, opt, loss_fn=case.loss_fn)


def _pinned_options(opt, micro: int | None, weight_offload: bool = False) -> dict:
    return dict(optimizer=opt.name, state_dtypes=(opt.state_dtype,), min_ns_steps=opt.ns_steps or None,
                max_ns_steps=opt.ns_steps or None,
                levers={"micro_batch_size": (micro,), "weight_offload": (weight_offload,)})


def _row(name, plan, budget, measured, kind):
    kind += "+wo" if plan.variant.weight_offload else ""
    o = plan.optimizer
    err = (measured - plan.predicted_peak_bytes) / measured
    return dict(model=name, kind=kind, optimizer=f"{o.name}/{o.state_dtype}/ns{o.ns_steps}",
                micro=f"{plan.micro_batch_size or '-'}x{plan.grad_accum_steps}",
                recompute=f"{len(plan.recompute_units)}/{len(plan.decisions)}"
                  + (f"s{len(plan.save_ops)}" if plan.save_ops else ""), budget=budget,
                predicted=plan.predicted_peak_bytes, measured=measured, error=err)


def _random_decisions(prof, variant, rng):
    """Per unit SAVE, RECOMPUTE or SELECTIVE with one of its candidate save sets, at random."""
    from memtune.timeline import recording_for, timeline_model

    tm = timeline_model(recording_for(prof, variant))
    decisions, save_ops = {}, {}
    for k, u in enumerate(tm.fqns):
        choice = rng.random() if tm.recomputable[k] else 1.0
        if choice < 0.3:
            decisions[u] = Decision.RECOMPUTE
        elif choice < 0.6 and tm.K[k]:
            decisions[u] = Decision.SELECTIVE
            save_ops[u] = rng.choice(tm.policies[k]).save_ops
        else:
            decisions[u] = Decision.SAVE
    return decisions, save_ops


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(CASES))
def test_sampled_plans_fit_and_match_memtracker(name, fidelity_rows):
    case = CASES[name]
    prof = _profile(case)
    rng = random.Random(zlib.crc32(name.encode()))
    steps = list(prof.optimizer_steps)
    micros = list(prof.recorded_choices("micro_batch_size"))
    rows = []
    for _ in range(PLANNED_PER_MODEL):
        rec = rng.choice(steps)
        micro = rng.choice(micros)
        opts = _pinned_options(rec, micro, weight_offload=rng.random() < 0.5)
        with pytest.raises(InfeasibleBudgetError) as info:
            memtune.plan(prof, 1, **opts)
        lo = info.value.min_feasible_bytes
        hi = memtune.plan(prof, 1 << 50, **opts).predicted_peak_bytes
        budget = int(lo + rng.random() * max(0, hi - lo))
        plan = memtune.plan(prof, budget, **opts)
        measured = _measure(case, plan)
        rows.append(_row(name, plan, budget, measured, "planned"))
        assert measured <= budget, rows[-1]
    for _ in range(RANDOM_PER_MODEL):
        rec = rng.choice(steps)
        micro = rng.choice(micros)
        draft = memtune.plan(prof, 1 << 50, **_pinned_options(rec, micro, weight_offload=rng.random() < 0.5))
        variant = StepVariant(micro_batch_size=draft.micro_batch_size, weight_offload=draft.variant.weight_offload)
        decisions, save_ops = _random_decisions(prof, variant, rng)
        plan = Plan(budget_bytes=1 << 50, usable_bytes=1 << 50, decisions=decisions, save_ops=save_ops,
                    optimizer=draft.optimizer, variant=variant, grad_accum_steps=draft.grad_accum_steps)
        plan = dataclasses.replace(plan, predicted_peak_bytes=memtune.predict_peak(prof, plan).peak_bytes)
        measured = _measure(case, plan)
        rows.append(_row(name, plan, None, measured, "random"))
    fidelity_rows.extend(rows)
    worst = max(rows, key=lambda r: abs(r["error"]))
    assert abs(worst["error"]) <= TOLERANCE, worst


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(CASES))
def test_readme_default_path_fits_and_matches(name, fidelity_rows):
    """profile -> plan -> apply_plan with every default, at half and 80% of the unplanned peak
    (or the minimum feasible budget when that is more)."""
    case = CASES[name]
    prof = memtune.profile(fresh(case), case.batch, loss_fn=case.loss_fn, target="cpu")
    for frac in (0.5, 0.8):
        budget = int(prof.baseline_peak_bytes * frac)
        try:
            plan = memtune.plan(prof, budget)
        except InfeasibleBudgetError as e:
            budget = e.min_feasible_bytes
            plan = memtune.plan(prof, budget)
        assert plan.optimizer.name == prof.optimizer  # no silent optimizer switch
        measured = _measure(case, plan)
        fidelity_rows.append(_row(name, plan, budget, measured, f"default@{frac:.0%}"))
        assert measured <= budget, fidelity_rows[-1]
        assert abs(fidelity_rows[-1]["error"]) <= TOLERANCE, fidelity_rows[-1]


def format_rows(rows: list[dict]) -> str:
    head = f"{'model':<11} {'plan':<11} {'optimizer':<18} {'micro':>6} {'rc':>5} {'budget':>11} {'predicted':>11} " \
           f"{'measured':>11} {'error':>8}"
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['model']:<11} {r['kind']:<11} {r['optimizer']:<18} {r['micro']:>6} {r['recompute']:>5} "
                     f"{fmt_bytes(r['budget']) if r['budget'] else '-':>11} {fmt_bytes(r['predicted']):>11} "
                     f"{fmt_bytes(r['measured']):>11} {r['error']:>+8.3%}")
    if rows:
        worst = max(rows, key=lambda r: abs(r["error"]))
        over = sum(1 for r in rows if r["budget"] and r["measured"] > r["budget"])
        lines.append(f"{len(rows)} plans, {over} over budget, worst error {worst['error']:+.3%} "
                     f"({worst['model']}, {worst['optimizer']})")
    return "\n".join(lines)
