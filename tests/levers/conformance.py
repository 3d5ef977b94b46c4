"""The checks every lever passes (docs/extending.md), as functions a test calls with one lever.

The model is a small GPT on real text. Its profile records every lever's choices as a CUDA
target would (so optimizer-state offload is recorded too): on the CPU target the steps run and
MemTracker measures them (host memory *is* the device there, so offloaded state counts as the
prediction says); on the H100 target the planner checks run (offload frees device memory there).
"""

from __future__ import annotations

import json

import torch

import memtune
from memtune import zoo
from memtune.apply import apply_plan, remove_plan
from memtune.errors import InfeasibleBudgetError
from memtune.levers import LEVERS, Lever, ProfileContext, compatible
from memtune.plan import Plan
from memtune.planners.exact import solve_config
from memtune.planners.options import configs, costs_for, lossiness, timeline_for
from memtune.variant import StepVariant
from reference import measure_planned_step

TOLERANCE = 0.01


SCENARIOS = {
    # name: (GPT config, batch, sequence). Parameters and optimizer state dominate the first;
    # activations and logits the second (a 2048-token vocabulary over byte-level text).
    "params": (dict(n_layer=2, n_embd=32, n_head=2, block_size=32), 4, 32),
    "activations": (dict(n_layer=2, n_embd=32, n_head=2, block_size=64, vocab_size=2048), 8, 64),
}


def batch(scenario: str = "params"):
    from memtune.data import TextCorpus

    _, b, seq = SCENARIOS[scenario]
    return TextCorpus.load().batch("train", b, seq, generator=torch.Generator().manual_seed(0))


def fresh(scenario: str = "params") -> torch.nn.Module:
    torch.manual_seed(0)
    return zoo.GPT(zoo.GPTConfig(**SCENARIOS[scenario][0]))


def profile(target: str = "cpu", scenario: str = "params", only: tuple[str, ...] | None = None):
    """A scenario's profile, recording every lever's choices as a CUDA target records them (with
    ``only``: those levers' choices, every other lever at its default)."""
    model = fresh(scenario)
    x = batch(scenario)
    ctx = ProfileContext(model=model, params=dict(model.named_parameters()), batch_size=len(x[0]),
                         target_kind="cuda", custom_optimizer=False)
    space = memtune.PlanSpace(levers={name: lever.recorded_choices(memtune.PlanSpace(), ctx)
                                      if only is None or name in only else (lever.default,)
                                      for name, lever in LEVERS.items()})
    return memtune.profile(model, x, target=target, space=space)


def recorded_variants(prof) -> list[StepVariant]:
    """Every variant the profile can price: a recorded step with a recorded optimizer side."""
    out = []
    for step in prof.recorded_variants:
        for o in dict.fromkeys(o.variant for o in prof.optimizer_steps):
            v = StepVariant(**{**dict(step.choices), **dict(o.choices)})
            if compatible(v) and v.for_step() == step and v.for_optimizer() == o:
                out.append(v)
    return list(dict.fromkeys(out))


def variants_with(lever: Lever, prof) -> dict:
    """For each recorded non-default choice of ``lever``, the simplest variant the profile can price that holds it."""
    every = recorded_variants(prof)
    out = {}
    for value in prof.recorded_choices(lever.name):
        holding = [v for v in every if v[lever.name] == value]
        if value != lever.default and holding:
            out[value] = min(holding, key=lambda v: (len(v.choices), v.order_key()))
    return out


def pinned(variant: StepVariant) -> dict:
    return {"levers": {name: (variant[name],) for name in LEVERS}}


def min_feasible(prof, **options) -> int:
    """The smallest budget (reserve included) a plan with these options fits."""
    reserve = memtune.Budget.parse(1 << 40, device=prof.target_name).reserve_bytes
    try:
        memtune.plan(prof, reserve + 1, **options)
    except InfeasibleBudgetError as e:
        return e.min_feasible_bytes
    raise AssertionError("a one-byte budget fitted")


# ----------------------------------------------------------------------------- the checks
def check_json_round_trip(lever: Lever, prof) -> None:
    """Every recorded choice survives JSON, alone and as part of a plan file."""
    for value in prof.recorded_choices(lever.name):
        assert lever.decode(json.loads(json.dumps(lever.encode(value)))) == value
    for variant in variants_with(lever, prof).values():
        plan = memtune.plan(prof, 1 << 50, **pinned(variant))
        assert plan.variant == variant
        assert Plan.from_json(plan.to_json()) == plan


def check_measured_peak(lever: Lever, prof, rows: list | None = None) -> None:
    """Each recorded choice, planned at its minimum feasible budget and without a limit, trains
    real steps whose MemTracker peak is the prediction within 1%."""
    assert variants_with(lever, prof), f"the profile recorded no choice of {lever.name} but its default"
    for value, variant in variants_with(lever, prof).items():
        opts = pinned(variant)
        for budget in (min_feasible(prof, **opts), 1 << 50):
            plan = memtune.plan(prof, budget, **opts)
            model = fresh()
            opt = apply_plan(model, plan)
            measured = measure_planned_step(model, batch(), plan, opt)
            err = (measured - plan.predicted_peak_bytes) / measured
            if rows is not None:
                rows.append((lever.name, lever.encode(value), len(plan.recompute_units), plan.predicted_peak_bytes,
                             measured, err))
            assert abs(err) <= TOLERANCE, (lever.name, variant, plan.predicted_peak_bytes, measured)
            assert budget == 1 << 50 or measured <= budget


def check_apply_remove_restores(lever: Lever, prof) -> None:
    """Applying a plan that pulls the lever, then removing it, leaves the model as it was: the
    same parameters (values, dtypes, requires_grad), no forward replaced, no hook left, the same
    loss. The weights are made bf16-representable first, so that a lever storing bf16 can be exact."""
    for variant in variants_with(lever, prof).values():
        model = fresh()
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(p.to(torch.bfloat16).float())
        before = {n: (p.detach().clone(), p.dtype, p.requires_grad) for n, p in model.named_parameters()}
        x, y = batch()
        want = model(x, y).detach()
        plan = memtune.plan(prof, 1 << 50, **pinned(variant))
        apply_plan(model, plan)
        remove_plan(model)
        after = dict(model.named_parameters())
        assert set(after) == set(before)
        for n, (value, dtype, grad) in before.items():
            p = after[n]
            assert (p.dtype, p.requires_grad) == (dtype, grad) and torch.equal(p.detach(), value), (lever.name, n)
            assert not p._post_accumulate_grad_hooks, (lever.name, n)
        assert all("forward" not in m.__dict__ for m in model.modules()), lever.name
        assert torch.equal(model(x, y).detach(), want), lever.name


def check_lossiness_tiers(lever: Lever, prof) -> None:
    """``lossless`` agrees with ``lossiness``; a configuration's lossiness counts the lever's; and
    at every budget the planner returns a plan of the lowest tier that fits there (no slowdown is
    allowed to outweigh exactness), so the lever's lossy choices are taken only when nothing more
    exact fits."""
    values = prof.recorded_choices(lever.name)
    assert lever.lossiness(lever.default) == 0
    if lever.lossless:
        assert all(lever.lossiness(v) == 0 for v in values), lever.name
    tiers = _tiers(prof)
    for cfg in tiers["configs"]:
        assert cfg.lossiness >= lever.lossiness(cfg.variant[lever.name])
    for peak, lowest, planned, variant in tiers["budgets"]:
        assert planned == lowest, (lever.name, peak, variant)


def _tiers(prof) -> dict:
    """The lever-independent part of :func:`check_lossiness_tiers`, once per profile: every
    configuration's smallest peak, and the plan's lossiness at budgets across their range."""
    cached = prof.__dict__.get("_conformance_tiers")
    if cached is not None:
        return cached
    options = memtune.PlannerOptions(max_lossless_slowdown=float("inf"), allow_microbatching=True)
    cfgs = configs(prof, options)
    frugal = []  # (tier, the configuration's smallest peak)
    for cfg in cfgs:
        tm, cc = timeline_for(prof, cfg)
        choices, _ = solve_config(tm, cc, costs_for(prof, cfg, options), 0.0, allow_offload=False, time_limit_s=10,
                                  minimize_peak=True)
        frugal.append((cfg.lossiness, tm.peak(cc, *tm.indicators(*choices))))
    reserve = memtune.Budget.parse(1 << 40, device=prof.target_name).reserve_bytes
    peaks = sorted({int(p) for _, p in frugal})
    budgets = []
    for peak in peaks[:: max(1, len(peaks) // 8)]:
        lowest = min(tier for tier, p in frugal if p <= peak)
        plan = memtune.plan(prof, peak + reserve, max_lossless_slowdown=float("inf"), allow_microbatching=True)
        budgets.append((peak, lowest, lossiness(plan), plan.variant))
    prof.__dict__["_conformance_tiers"] = {"configs": cfgs, "budgets": budgets}
    return prof.__dict__["_conformance_tiers"]


def check_suggestion(lever: Lever, profiles) -> None:
    """With every lever held at its default, a budget only this lever's other choices reach is
    infeasible, the error suggests the lever, and allowing it (alone) makes the budget feasible:
    on every scenario where the lever lowers the minimum, and there is at least one."""
    defaults = {name: (other.default,) for name, other in LEVERS.items()}
    held = {"levers": defaults}
    alone = {"levers": {k: v for k, v in defaults.items() if k != lever.name}, "allow_microbatching": True}
    helped = 0
    for prof in profiles:
        without, best = min_feasible(prof, **held), min_feasible(prof, **alone)
        if best < without:
            helped += 1
            _check_suggestion_at(lever, prof, held, alone, (best + without) // 2)
    assert helped, f"{lever.name} lowers the minimum budget of no scenario: add one where it does"


def _check_suggestion_at(lever, prof, held, alone, budget) -> None:
    try:
        memtune.plan(prof, budget, **held)
    except InfeasibleBudgetError as e:
        text = lever.suggest(prof, memtune.PlannerOptions(**held), prof.recorded_choices(lever.name))
        assert text and text in e.suggestions, (lever.name, text, e.suggestions)
    else:
        raise AssertionError(f"{budget} fitted with {lever.name} held at its default")
    assert memtune.plan(prof, budget, **alone).predicted_peak_bytes + \
        memtune.Budget.parse(budget, device=prof.target_name).reserve_bytes <= budget
