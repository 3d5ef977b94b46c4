"""Plans against reality on the CPU: plan with the profiled optimizer (AdamW, fp32 state),
apply the plan, train, and measure the steady-state step with MemTracker
(tests/reference.measure_step). The measured peak must fit the budget and be within 5% of
the predicted one; an infeasible budget must say a minimum that really plans."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from memtune.apply import apply_plan, remove_plan
from memtune.errors import InfeasibleBudgetError
from memtune.plan import Decision, Plan
from memtune.planning import plan as make_plan
from models import cases, fresh
from reference import measure_planned_step, measure_step, train_step

MODELS = ("gpt", "mlp", "cnn", "moe", "hf_llama", "hf_gpt2")
OPTS = dict(optimizer="adamw", state_dtypes=("fp32",), weights=(None,))  # exact fp32 plans (unit decisions, ...)


def _budgets(prof, opts=OPTS) -> list[int]:
    """30% of the baseline peak if it plans, else the computed minimum; plus two in between."""
    base = prof.baseline_peak_bytes
    low = int(base * 0.3)
    try:
        make_plan(prof, low, **opts)
    except InfeasibleBudgetError as e:
        assert e.min_feasible_bytes > low, "the minimum feasible budget must exceed the infeasible one"
        low = e.min_feasible_bytes
    return [low, (low + base) // 2, base]


@pytest.mark.slow
@pytest.mark.parametrize("name", MODELS)
def test_measured_peak_fits_and_matches_prediction(name, profile_of):
    case = cases()[name]
    prof = profile_of(name)
    rows = []
    for budget in _budgets(prof):
        plan = make_plan(prof, budget, **OPTS)
        model = fresh(case)
        opt = apply_plan(model, plan)
        measured = measure_planned_step(model, case.batch, plan, opt, loss_fn=case.loss_fn)
        rows.append((budget, len(plan.recompute_units), plan.predicted_peak_bytes, measured))
        assert measured <= budget, rows
        assert abs(plan.predicted_peak_bytes - measured) / measured <= 0.05, rows
    assert rows[0][1] > 0, "the lowest budget should need recomputation"


def test_infeasible_budget_reports_a_minimum_that_plans(profile_of):
    prof = profile_of("gpt")
    budget = int(prof.static_bytes * 1.5)  # far too small for this model
    with pytest.raises(InfeasibleBudgetError) as info:
        make_plan(prof, budget, **OPTS)
    err = info.value
    assert err.min_feasible_bytes > budget
    assert make_plan(prof, err.min_feasible_bytes, **OPTS).fits
    assert any("optimizer state" in name for name, _ in err.top_consumers)
    assert any("micro" in s for s in err.suggestions)
    # Offload and int8 would not be suggested when already allowed.
    with pytest.raises(InfeasibleBudgetError) as info2:
        make_plan(prof, budget, optimizer="adamw", allow_microbatching=True)
    assert not any("micro" in s or "int8" in s for s in info2.value.suggestions)


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_planned_model_has_identical_losses_and_gradients(profile_of):
    """Same maths (fp32, fixed seeds): a plan of exact choices changes memory, never numbers.
    (A chunked loss reorders a sum; it is left out here.)"""
    case = cases()["gpt"]
    prof = profile_of("gpt")
    exact = dict(OPTS, allow_loss_chunking=False)
    plan = make_plan(prof, _budgets(prof, exact)[0], **exact)
    assert plan.recompute_units
    ref, planned = fresh(case), fresh(case)
    opt_ref = torch.optim.AdamW(ref.parameters(), lr=1e-3)
    opt_plan = apply_plan(planned, plan)
    for step in range(3):
        l_ref = train_step(ref, case.batch, None, None)
        l_plan = train_step(planned, case.batch, None, None)
        assert torch.equal(l_ref, l_plan), step
        g_ref, g_plan = _grads(ref), _grads(planned)
        assert g_ref.keys() == g_plan.keys()
        assert all(torch.equal(g_ref[k], g_plan[k]) for k in g_ref), step
        opt_ref.step(), opt_plan.step()
        opt_ref.zero_grad(set_to_none=True), opt_plan.zero_grad(set_to_none=True)
    assert planned.state_dict().keys() == ref.state_dict().keys()


def _flops_by_module(model, case) -> dict[str, int]:
    with FlopCounterMode(display=False) as fc:
        train_step(model, case.batch, case.loss_fn, None)
    return {k: sum(v.values()) for k, v in fc.get_flop_counts().items()}


@pytest.mark.parametrize("name", ["gpt", "hf_llama"])
def test_flop_counter_sees_recomputation_in_exactly_the_recompute_units(name, profile_of):
    case = cases()[name]
    prof = profile_of(name)
    units = prof.unit_fqns
    decisions = {u: Decision.RECOMPUTE if k % 2 == 0 else Decision.SAVE for k, u in enumerate(units)}
    plan = Plan(budget_bytes=1 << 40, usable_bytes=1 << 40, decisions=decisions)
    base = _flops_by_module(fresh(case), case)
    model = fresh(case)
    apply_plan(model, plan)
    planned = _flops_by_module(model, case)
    root = next(k for k in base if k != "Global" and "." not in k)
    extra_total = planned["Global"] - base["Global"]
    extra_units = 0
    for u in units:
        extra = planned[f"{root}.{u}"] - base[f"{root}.{u}"]
        if decisions[u] is Decision.RECOMPUTE:
            # Non-reentrant checkpoint stops recomputing once every saved tensor is back, so the
            # trailing ops of the block (whose outputs nobody saved) are not re-run.
            assert 0 < extra <= prof.unit(u).fwd_flops, (u, extra)
        else:
            assert extra == 0, u
        extra_units += extra
    assert extra_total == extra_units
    remove_plan(model)
    assert _flops_by_module(model, case)["Global"] == base["Global"]
