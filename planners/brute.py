"""Brute force, for tests only: every configuration × every unit decision, each priced with
``predict_peak`` and the cost model. Exponential (2^N or 3^N plans per configuration); refuses
more than ``MAX_UNITS`` units."""

from __future__ import annotations

import itertools

from memtune.budget import Budget
from memtune.plan import Plan
from memtune.profile import ModelProfile

from .options import PlannerOptions, choose_tier, configs, costs_for, make_plan, unit_choices

MAX_UNITS = 10


class BrutePlanner:
    name = "brute"

    def plan(self, profile: ModelProfile, budget: Budget, *, options: PlannerOptions) -> Plan:
        if len(profile.units) > MAX_UNITS:
            raise ValueError(f"brute force takes at most {MAX_UNITS} units, got {len(profile.units)}; use 'exact'")
        best = None
        fqns = [u.fqn for u in profile.units]
        tiers = sorted({cfg.lossiness if options.prefer_lossless else 0 for cfg in configs(profile, options)})
        per_tier = {}
        for tier in tiers:
            best = self._best(profile, budget, options, fqns, tier)
            if best is not None:
                per_tier[tier] = best
        if not per_tier:
            from .infeasible import infeasible_error
            raise infeasible_error(profile, budget, options)
        return choose_tier(per_tier, options)

    def _best(self, profile, budget, options, fqns, tier):
        best = None
        for cfg in configs(profile, options):
            if (cfg.lossiness if options.prefer_lossless else 0) != tier:
                continue
            table = costs_for(profile, cfg, options)
            for combo in itertools.product(*(unit_choices(profile, options, f) for f in fqns)):
                plan = make_plan(profile, budget, cfg, dict(zip(fqns, combo)), planner=self.name, options=options,
                                 table=table)
                if plan.predicted_peak_bytes <= budget.usable_bytes and (
                        best is None or plan.predicted_step_ms < best.predicted_step_ms):
                    best = plan
        return best
