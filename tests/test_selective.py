"""Per-op selective recomputation (memtune.selective): the per-op record, the same maths as the
plain step, the measured peak against the prediction, and a monotone budget -> peak mapping.

References: the plain step's losses and weights (``torch.equal``, dropout included), PyTorch's
MemTracker for the measured peak (tests/reference.py), brute force for the plans
(tests/planners/test_conformance.py runs exact against brute force with these candidates in the
space), and an independent loop-by-loop replay for the memory model (tests/planners/test_timeline.py).
"""

from __future__ import annotations

import copy
import dataclasses
import random

import pytest
import torch

import memtune
from memtune import zoo
from memtune.errors import InfeasibleBudgetError, UnrecordedPlanError
from memtune.plan import Decision
from memtune.selective import op_keys, recompute_fraction, unit_policies
from memtune.cost_model import device_for
from memtune.timeline import timeline_model
from reference import measure_planned_step


def _gpt(dropout: float = 0.1):
    torch.manual_seed(0)
    return zoo.GPT(zoo.GPTConfig(vocab_size=256, block_size=32, n_layer=3, n_head=2, n_embd=32, dropout=dropout))


def _batch():
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (4, 32), generator=g), torch.randint(0, 256, (4, 32), generator=g)


@pytest.fixture(scope="module")
def gpt_profile():
    return memtune.profile(_gpt(), _batch(), target="cpu")


def _selective(profile, base, level: int | None = None, seed: int = 0):
    """``base`` with every unit SELECTIVE (at ``level``, or a random candidate per unit)."""
    tm = timeline_model(profile)
    rng = random.Random(seed)
    dec, save = {}, {}
    for k, u in enumerate(tm.fqns):
        pols = tm.policies[k]
        dec[u] = Decision.SELECTIVE
        save[u] = pols[min(level, len(pols)) - 1].save_ops if level else rng.choice(pols).save_ops
    plan = dataclasses.replace(base, decisions=dec, save_ops=save)
    return dataclasses.replace(plan, predicted_peak_bytes=memtune.predict_peak(profile, plan).peak_bytes)


# ----------------------------------------------------------------------------- the per-op record
def test_per_op_record_names_every_saved_storage_once_and_flags_random_and_in_place_ops(gpt_profile):
    prof = gpt_profile
    for u in prof.units:
        assert u.ops, u.fqn
        produced = [sid for o in u.ops for sid in o.storages]
        assert len(produced) == len(set(produced))  # each storage has one producing op
        own = {sid for sid in u.saved_storages if prof.storages[sid].producer == u.fqn}
        assert own <= set(produced)  # every storage the unit saves and allocates has its op
        assert all(o.out_bytes == 0 for o in u.ops if o.view)
        assert all(set(o.deps) <= set(range(i)) for i, o in enumerate(u.ops))
        names = [o.name for o in u.ops]
        # nanoGPT's attention dropout: a mask allocated by empty_like, filled in place by bernoulli_
        bern = names.index("aten.bernoulli_.float")
        assert u.ops[bern].random and u.ops[bern].inplace
        mask = u.ops[bern].deps[0]
        assert u.ops[mask].mutated and u.ops[mask].storages
        for o in u.ops:
            assert sum(a[0] for a in o.allocations) == o.out_bytes
            assert all(not a[2] for a in o.allocations if a[1] > 0)  # what backward needs outlives the forward
            needed = sum(a[0] for a in o.allocations if a[2])
            assert needed == sum(prof.storages[s].nbytes for s in o.storages)
    again = memtune.ModelProfile.from_json(prof.to_json())
    assert again.units == prof.units


def test_candidates_are_nested_never_save_random_or_mutated_outputs_and_recompute_less_as_they_keep_more(gpt_profile):
    prof = gpt_profile
    spec = device_for(prof)
    for u in prof.units:
        pols = unit_policies(prof)[u.fqn]
        assert 1 <= len(pols) <= 4
        keys = dict(zip(op_keys(u), u.ops))
        for bigger, smaller in zip(pols, pols[1:]):
            assert set(smaller.save_ops) < set(bigger.save_ops)
            assert smaller.kept_bytes + smaller.cached_bytes < bigger.kept_bytes + bigger.cached_bytes
            assert smaller.recompute_fraction >= bigger.recompute_fraction
        for pol in pols:
            assert pol.kept_bytes + pol.cached_bytes < u.saved_activation_bytes
            for key in pol.save_ops:
                op = keys[key]
                assert not (op.view or op.inplace or op.mutated or op.random)
            assert recompute_fraction(prof, u, pol.save_ops, spec) == pytest.approx(pol.recompute_fraction)


# ----------------------------------------------------------------------------- same maths
def _train(model, plan, batch, steps: int = 3):
    opt = memtune.apply_plan(model, plan)
    torch.manual_seed(1)
    losses = []
    for _ in range(steps):
        loss = model(*batch)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.detach())
    return losses


@pytest.mark.parametrize("level", [1, 2, 3, 4])
def test_losses_and_weights_equal_the_plain_step_dropout_included(gpt_profile, level):
    base = memtune.plan(gpt_profile, 1 << 40)
    assert all(d is Decision.SAVE for d in base.decisions.values())
    plain_model, sel_model = _gpt(), _gpt()
    plain = _train(plain_model, base, _batch())
    selective = _train(sel_model, _selective(gpt_profile, base, level), _batch())
    assert all(torch.equal(a, b) for a, b in zip(plain, selective))
    for (n, a), (_, b) in zip(plain_model.state_dict().items(), sel_model.state_dict().items()):
        assert torch.equal(a, b), n


def test_a_save_set_that_is_not_a_candidate_is_refused(gpt_profile):
    base = memtune.plan(gpt_profile, 1 << 40)
    plan = _selective(gpt_profile, base, 1)
    u = next(iter(plan.save_ops))
    bad = dataclasses.replace(plan, save_ops={**plan.save_ops, u: ("aten.mm.default#99",)})
    with pytest.raises(UnrecordedPlanError, match="not one of its candidates"):
        memtune.predict_peak(gpt_profile, bad)
    with pytest.raises(ValueError, match="no save set"):
        dataclasses.replace(plan, save_ops={})


# ----------------------------------------------------------------------------- measured peak
def _measured(model_fn, batch, plan):
    model = model_fn()
    opt = memtune.apply_plan(model, plan)
    return measure_planned_step(model, batch, plan, opt)


@pytest.mark.parametrize("seed", [0, 1])
def test_random_selective_plans_measure_within_3_percent(gpt_profile, seed):
    base = memtune.plan(gpt_profile, 1 << 40)
    plan = _selective(gpt_profile, base, None, seed)
    measured = _measured(_gpt, _batch(), plan)
    assert abs(measured - plan.predicted_peak_bytes) <= 0.03 * measured, (measured, plan.predicted_peak_bytes)


@pytest.fixture(scope="module")
def planned(gpt_profile):
    """Plans at 80%, 60%, 50% and 35% of the unplanned peak (or the minimum feasible budget),
    priced without the selective policy's per-op dispatch cost, which on this toy shape would
    rule every save set out: the fidelity of the plans the planner returns is what is tested."""
    cheap = dataclasses.replace(device_for(gpt_profile), python_dispatch_s=0.0)
    out = []
    for frac in (0.8, 0.6, 0.5, 0.35):
        budget = int(gpt_profile.baseline_peak_bytes * frac)
        try:
            out.append((budget, memtune.plan(gpt_profile, budget, device=cheap)))
        except InfeasibleBudgetError as e:
            out.append((e.min_feasible_bytes, memtune.plan(gpt_profile, e.min_feasible_bytes, device=cheap)))
    return out


def test_planned_selective_plans_fit_their_budget_when_they_run(planned):
    assert sum(d is Decision.SELECTIVE for _, p in planned for d in p.decisions.values()) >= 4
    for budget, plan in planned:
        measured = _measured(_gpt, _batch(), plan)
        assert measured <= budget, (budget, plan.summary())
        assert abs(measured - plan.predicted_peak_bytes) <= 0.03 * measured


def test_the_planner_uses_selective_recompute_where_it_is_faster(gpt_profile):
    """On a nanoGPT shape (d=256, seq 256: profiled under fake tensors, nothing runs) the best plan
    at 80% of the unplanned peak keeps matmul outputs and recomputes the rest: faster than the
    fastest whole-unit plan at the same budget. On a toy shape the selective policy's per-op
    dispatch cost outweighs what it saves, and whole units win."""
    torch.manual_seed(0)
    big = zoo.GPT(zoo.GPTConfig(vocab_size=256, block_size=256, n_layer=4, n_head=4, n_embd=256))
    x = torch.randint(0, 256, (8, 256))
    prof = memtune.profile(big, (x, x), target="cpu")
    budget = int(prof.baseline_peak_bytes * 0.8)
    plan = memtune.plan(prof, budget)
    whole = memtune.plan(memtune.ModelProfile.from_dict(_without_ops(prof.to_dict())), budget)
    assert any(d is Decision.SELECTIVE for d in plan.decisions.values())
    assert not any(d is Decision.SELECTIVE for d in whole.decisions.values())
    assert plan.predicted_step_ms < whole.predicted_step_ms
    assert "selective" in plan.summary() and plan.unit_costs
    toy = memtune.plan(gpt_profile, int(gpt_profile.baseline_peak_bytes * 0.8))
    assert not any(d is Decision.SELECTIVE for d in toy.decisions.values())


def _without_ops(d: dict) -> dict:
    """A profile file as schema 4 wrote it: no per-op record (whole-unit decisions only)."""
    d = copy.deepcopy(d)
    d["schema_version"] = 4
    for rec in [d] + list(d.get("step_variants", ())):
        for u in rec["units"]:
            u.pop("ops", None)
    return d


# ----------------------------------------------------------------------------- monotone
@pytest.mark.parametrize("planner", ["exact", "greedy"])
def test_a_smaller_budget_never_yields_a_higher_predicted_peak(gpt_profile, planner):
    rng = random.Random(7)
    budgets = sorted(int(gpt_profile.baseline_peak_bytes * rng.uniform(0.25, 1.05)) for _ in range(16))
    peaks = []
    for b in budgets:
        try:
            plan = memtune.plan(gpt_profile, b, planner=planner)
        except InfeasibleBudgetError:
            continue
        assert plan.predicted_peak_bytes <= plan.usable_bytes
        peaks.append(plan.predicted_peak_bytes)
    assert len(peaks) >= 8
    assert peaks == sorted(peaks)
