"""Profile and plan files of schema 3 (memtune before levers) still read, and mean the same.

tests/data/profile_v3.json and plans_v3.json were written by memtune at commit 0ab7ecb (a
2-layer GPT profiled for an H100 with micro-batches, bf16 weights, in-backward stepping, state
offload and a chunked loss recorded; three plans, with the options below). Read by this
memtune, the plans predict the very peak and step time they were written with, and planning
the profile again at their budgets returns the same choices; a plan that offloads optimizer
state is refused with the remedy (its recording predates the pipelined state stream).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import memtune
from memtune.cost_model import predict_step_time
from memtune.errors import UnrecordedPlanError
from memtune.plan import Plan
from memtune.profile import ModelProfile
from memtune.variant import StepVariant

DATA = Path(__file__).resolve().parent / "data"
OPTIONS = {"default": {}, "micro": dict(allow_microbatching=True, allow_optimizer_in_backward=False,
                                        allow_state_offload=False), "roomy": {}}


@pytest.fixture(scope="module")
def v3():
    return ModelProfile.from_json(DATA / "profile_v3.json"), json.loads((DATA / "plans_v3.json").read_text())


def test_a_schema_3_profile_reads_with_its_levers_as_variants(v3):
    prof, _ = v3
    assert prof.schema_version == 5 and prof.variant == StepVariant()
    assert all(not u.ops for u in prof.units)  # no per-op record: whole-unit decisions only
    recorded = set(prof.recorded_variants)
    assert {StepVariant(micro_batch_size=2), StepVariant(weights="bf16-sr"), StepVariant(optimizer_in_backward=True),
            StepVariant(loss_chunks=4)} <= recorded  # schema 3's "bf16" recording is bf16-sr's
    # Its offloaded-state recordings predate the pipelined state stream, whose buffers they do not
    # measure: they are dropped, and the profile says so.
    assert not any(o.variant.state_offload for o in prof.optimizer_steps)
    assert any("re-profile to plan state offload" in a for a in prof.assumptions)


@pytest.mark.parametrize("name", sorted(OPTIONS))
def test_a_schema_3_plan_predicts_what_it_was_written_with(v3, name):
    prof, plans = v3
    d = plans[name]
    assert d["schema_version"] == 3
    plan = Plan.from_dict(d)
    assert plan.schema_version == 4
    if plan.variant.state_offload:
        # Its state stream is not what this memtune runs (see above): refused, with the remedy.
        with pytest.raises(UnrecordedPlanError, match="re-profile"):
            memtune.predict_peak(prof, plan)
        return
    assert memtune.predict_peak(prof, plan).peak_bytes == d["predicted_peak_bytes"]
    assert predict_step_time(prof, plan).total_ms == pytest.approx(d["predicted_step_ms"], rel=1e-9)
    again = memtune.plan(prof, d["budget_bytes"], **OPTIONS[name])
    assert (again.decisions, again.optimizer, again.variant, again.grad_accum_steps) == \
        (plan.decisions, plan.optimizer, plan.variant, plan.grad_accum_steps)
    assert Plan.from_json(plan.to_json()) == plan
