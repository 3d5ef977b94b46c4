"""Property tests (hypothesis): every input either works or raises a MemtuneError subclass
whose message names the fix, and the CLI turns every input into its documented exit code
with at most one line on stderr.

Covers ``Budget.parse``, ``Plan.from_dict``/``ModelProfile.from_dict`` (round trips,
arbitrary JSON, and valid files with one field replaced by arbitrary JSON: the result is
then planned or summarized, which must work or raise a MemtuneError too), and CLI argument
lists built from the real options and junk.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import math
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import memtune
from memtune import Budget, MemtuneError, ModelProfile, Plan
from memtune.cli import EXIT_CODES, EXIT_INTERNAL, _budget, main
from memtune.errors import BudgetError, PlanFileError

ROOT = Path(__file__).resolve().parents[1]
FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                       HealthCheck.too_slow])

JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
                    lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=8), c, max_size=4),
                    max_leaves=12)


@pytest.fixture(scope="module")
def real():
    """A small real profile and plan (the files the property tests mutate)."""
    from examples.models import tiny_gpt

    model, sample = tiny_gpt()
    prof = memtune.profile(model, sample, optimizer="muon2", target="cpu")
    return prof, memtune.plan(prof, "5MB", device="cpu")


# ----------------------------------------------------------------------------- budgets
BUDGET_TEXT = st.from_regex(r"\s?-?\d{1,30}(\.\d{0,20})?\s?([KMGT]i?B|[kmgt]i?b|B|%|XB|)?\s?", fullmatch=True) | st.just("9" * 400 + "GB")


@FAST
@given(st.one_of(st.text(max_size=30), BUDGET_TEXT, st.integers(), st.floats(), st.none(), st.booleans(),
                 st.lists(st.integers(), max_size=2)),
       st.sampled_from(["cpu", "H100", "A100-40GB", "TPUv9"]))
def test_budget_parse_works_or_names_the_accepted_forms(value, device):
    try:
        b = Budget.parse(value, device=device)
    except BudgetError as e:
        assert any(w in str(e) for w in ("accepted forms", "reserved for", "unknown device")), str(e)
        return
    assert 0 < b.usable_bytes <= b.budget_bytes < 2**63


# ----------------------------------------------------------------------------- plan / profile files
def _variants():
    """Step variants whose choices can run together (one choice per lever, drawn from its own kind)."""
    from memtune.levers import compatible
    from memtune.variant import StepVariant

    return st.fixed_dictionaries({
        "micro_batch_size": st.none() | st.integers(1, 512), "weights": st.sampled_from([None, "bf16-sr", "bf16-master"]),
        "optimizer_in_backward": st.booleans(), "state_offload": st.booleans(),
        "loss_chunks": st.none() | st.integers(2, 64)}).map(lambda d: StepVariant(**d)).filter(compatible)


def _plans():
    from memtune.plan import Decision, UnitCost

    size, ms = st.integers(0, 2**50), st.floats(0, 1e9, allow_nan=False)
    name = st.text("abcdefgh.0123", min_size=1, max_size=12)
    decisions = st.dictionaries(name, st.sampled_from(Decision), max_size=5)
    save_ops = st.lists(st.sampled_from(["aten.mm.default#0", "aten.gelu.default#1", "aten.addmm.default#3"]),
                        min_size=1, max_size=3, unique=True).map(tuple)

    def with_save_sets(d):
        """A save set for every SELECTIVE unit (a Plan refuses one without)."""
        chosen = [u for u, dec in d.items() if dec is Decision.SELECTIVE]
        return st.fixed_dictionaries({u: save_ops for u in chosen}).map(lambda sets: (d, sets))

    unit_choices = decisions.flatmap(with_save_sets)
    unit_cost = st.builds(UnitCost, saved_bytes=size, kept_bytes=size, recomputed_bytes=size, added_ms=ms)
    return st.tuples(unit_choices, st.dictionaries(name, unit_cost, max_size=3)).flatmap(
        lambda t: _plan_rest(t[0][0], t[0][1], t[1], size, ms, name))


def _plan_rest(decisions, save_ops, unit_costs, size, ms, name):
    from memtune.plan import MemoryBreakdown, OptimizerPlan, TimeBreakdown

    return st.builds(
        Plan, budget_bytes=size, usable_bytes=size, decisions=st.just(decisions), save_ops=st.just(save_ops),
        unit_costs=st.just(unit_costs),
        optimizer=st.builds(OptimizerPlan, name=st.sampled_from(["muon2", "muon", "adamw"]), ns_steps=st.integers(0, 9),
                            state_dtype=st.sampled_from(["fp32", "bf16", "int8"]),
                            muon_params=st.lists(name, max_size=3).map(tuple), adamw_params=st.lists(name, max_size=3).map(tuple)),
        variant=_variants(), grad_accum_steps=st.integers(1, 64), predicted_peak_bytes=size,
        memory=st.builds(MemoryBreakdown, peak_bytes=size, params_bytes=size, phase=st.text(max_size=10)),
        predicted_step_ms=ms, time=st.builds(TimeBreakdown, forward_ms=ms, backward_ms=ms,
                                             lever_ms=st.dictionaries(st.sampled_from(["state_offload", "loss_chunks"]),
                                                                      ms, max_size=2)),
        planner=st.text(max_size=8), profile_hash=st.text("0123456789abcdef", max_size=16), target=st.text(max_size=8),
        notes=st.lists(st.text(max_size=20), max_size=2).map(tuple))


@FAST
@given(_plans())
def test_plan_round_trips_through_json(plan):
    assert Plan.from_dict(plan.to_dict()) == plan
    assert Plan.from_json(plan.to_json()) == plan


@FAST
@given(JSON)
def test_arbitrary_json_is_no_plan_and_no_profile(doc):
    for cls in (Plan, ModelProfile):
        with pytest.raises(PlanFileError):
            cls.from_dict(doc)
        with pytest.raises(PlanFileError):
            cls.from_json(json.dumps(doc))


def _paths(d, prefix=()):
    """Every (path, value) inside a JSON document."""
    yield prefix, d
    if isinstance(d, dict):
        for k, v in d.items():
            yield from _paths(v, prefix + (k,))
    elif isinstance(d, list):
        for i, v in enumerate(d[:3]):
            yield from _paths(v, prefix + (i,))


def _mutate(doc, data):
    doc = copy.deepcopy(doc)
    paths = [p for p, _ in _paths(doc) if p]
    path = data.draw(st.sampled_from(paths), label="path")
    parent = doc
    for k in path[:-1]:
        parent = parent[k]
    if isinstance(parent, dict) and data.draw(st.booleans(), label="delete"):
        del parent[path[-1]]
    else:
        parent[path[-1]] = data.draw(JSON | st.sampled_from([-1, 0, 1, float("nan"), float("inf"), "1", True, 2**70]),
                                     label="value")
    return doc, path


@pytest.mark.slow
@FAST
@given(st.data())
def test_a_plan_with_one_field_replaced_is_rejected_or_usable(real, data):
    _, plan = real
    doc, path = _mutate(plan.to_dict(), data)
    try:
        p = Plan.from_dict(doc)
    except PlanFileError as e:
        assert "plan" in str(e) and ("memtune plan" in str(e) or "re-plan" in str(e))
        return
    p.summary()  # a plan that loads is usable
    assert all(isinstance(v, (int, float)) and math.isfinite(v) and v >= 0
               for v in (p.predicted_peak_bytes, p.predicted_step_ms, p.budget_bytes, p.grad_accum_steps))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                 HealthCheck.too_slow])
@given(st.data())
def test_a_profile_with_one_field_replaced_is_rejected_or_plannable(real, data):
    prof, _ = real
    doc, path = _mutate(prof.to_dict(), data)
    try:
        p = ModelProfile.from_dict(doc)
    except PlanFileError as e:
        assert "profile" in str(e) and "memtune" in str(e)
        return
    assert ModelProfile.from_dict(p.to_dict()) == p
    try:  # a profile that loads can be planned, or says why not
        memtune.plan(p, "5MB", "greedy", device="cpu")
    except MemtuneError:
        pass


def test_a_number_where_a_recording_belongs_is_a_corrupt_profile(real):
    # Found by the property above (CI, hypothesis's draw): optimizer_steps[0] replaced by -1
    # raised AttributeError from the loader instead of the profile error.
    prof, _ = real
    for field in ("optimizer_steps", "step_variants", "params"):
        doc = prof.to_dict()
        doc[field] = [-1, *doc[field][1:]]
        with pytest.raises(PlanFileError, match="not a memtune profile"):
            ModelProfile.from_dict(doc)


# ----------------------------------------------------------------------------- the CLI
def run_cli(argv) -> tuple[int, str]:
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            code = main(argv)
        except SystemExit as e:  # argparse: --help, --version, usage errors
            code = e.code if isinstance(e.code, int) else 2
    return code, err.getvalue()


TOKENS = ["profile", "plan", "fit", "sweep", "report", "--budget", "--steps", "--device", "--target", "--out",
          "--profile", "--plan", "--run", "--trials", "--storage", "--planner", "--optimizer", "--precision",
          "--checkpoint", "--fresh", "--no-progress", "--objective", "--checkpoint-every", "--lr",
          "24XB", "5MB", "-3", "0", "1", "nan", "cuda", "bogus", "cpu", "H100", "exact", "muon9", "/proc/x/y.json",
          "examples/nope.py:f", "no_such_pkg:f", "examples/models.py:nope", "nocolon", "bogus://x", "loss,step_ms"]


@FAST
@given(st.lists(st.sampled_from(TOKENS) | st.text(max_size=6), max_size=8))
def test_any_argument_list_gives_a_documented_exit_code_and_one_line(argv):
    assume(not any(a.startswith("-") and "help" in a or a == "--version" for a in argv))
    code, err = run_cli(argv)
    assert code in EXIT_CODES and code != EXIT_INTERNAL, (argv, code, err)
    if code:
        lines = [ln for ln in err.splitlines() if ln.strip()]
        assert len(lines) == 1 and lines[0].startswith("memtune: error:"), (argv, err)


@FAST
@given(budget=st.one_of(BUDGET_TEXT, st.text(max_size=10)), planner=st.sampled_from(["exact", "greedy", "bogus"]),
       optimizer=st.sampled_from(["muon2", "adamw", "sgd"]))
@pytest.mark.slow
def test_plan_from_a_saved_profile_with_any_budget(real, tmp_path_factory, budget, planner, optimizer):
    assume(budget and not budget.startswith("-"))
    d = tmp_path_factory.mktemp("cli")
    prof, _ = real
    prof.to_json(d / "profile.json")
    code, err = run_cli(["plan", "--profile", str(d / "profile.json"), "--budget", budget, "--planner", planner,
                         "--optimizer", optimizer, "--out", str(d / "plan.json")])
    assert code in (0, 2, 3), (budget, code, err)
    if code == 0:
        assert Plan.from_json(d / "plan.json").predicted_peak_bytes <= Budget.parse(_budget(budget), device="cpu").usable_bytes
    else:
        assert len(err.strip().splitlines()) == 1
