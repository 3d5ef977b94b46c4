"""Brute force, for tests only: every configuration × every unit decision, each priced with
``predict_peak`` and the cost model. Exponential (2^N or 3^N plans per configuration); refuses
more than ``MAX_UNITS`` units."""

from __future__ import annotations

import itertools

from memtune.budget import Budget
from memtune.plan import Plan
from memtune.profile import ModelProfile

from .options import PlannerOptions, configs, costs_for, make_plan, unit_choices

MAX_UNITS = 10


class BrutePlanner:
    name = "brute"

    def plan(self, profile: ModelProfile, budget: Budget, *, options: PlannerOptions) -> Plan:
        if len(profile.units) > MAX_UNITS:
            raise ValueError(f"brute force takes at most {MAX_UNITS} units, got {len(profile.units)}; use 'exact'")
        best = None
        fqns = [u.fqn for u in profile.units]
        for cfg in configs(profile, options):
            table = costs_for(profile, cfg, options)
            for combo in itertools.product(*(unit_choices(profile, options, f) for f in fqns)):
                plan = make_plan(profile, budget, cfg, dict(zip(fqns, combo)), planner=self.name, options=options,
                                 table=table)
                if plan.predicted_peak_bytes <= budget.usable_bytes and (
                        best is None or plan.predicted_step_ms < best.predicted_step_ms):
                    best = plan
        if best is None:
            from .infeasible import infeasible_error
            raise infeasible_error(profile, budget, options)
        return best
