"""Brute force, for tests only: every configuration × every unit decision, each priced with
``predict_peak`` and the cost model. Exponential ((2 + K)^N plans per configuration, K selective
candidates per unit, one more with offload); refuses more than ``MAX_UNITS`` units."""

from __future__ import annotations

import itertools
import math

from memtune.budget import Budget
from memtune.plan import Plan
from memtune.profile import ModelProfile

from memtune.cost_model import apply_decisions
from memtune.plan import Decision

from .options import (PlannerOptions, choose_tier, configs, costs_for, host_limit, make_plan, timeline_for,
                      unit_choices)

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
        best, host = None, host_limit(profile, options)
        for cfg in configs(profile, options):
            if (cfg.lossiness if options.prefer_lossless else 0) != tier:
                continue
            table = costs_for(profile, cfg, options)
            tm, cc = timeline_for(profile, cfg)
            per_unit = []
            for k, f in enumerate(fqns):
                opts = [(d, None) for d in unit_choices(profile, options, f)]
                if Decision.RECOMPUTE in (d for d, _ in opts):
                    opts += [(Decision.SELECTIVE, pol.save_ops) for pol in tm.policies[k]]
                per_unit.append(opts)
            for combo in itertools.product(*per_unit):
                decisions = {f: d for f, (d, _) in zip(fqns, combo)}
                save_ops = {f: ops for f, (_, ops) in zip(fqns, combo) if ops is not None}
                # predict_peak and predict_step_time, without building a Plan for every combination
                x, r, s = tm.indicators(decisions, save_ops)
                if tm.host_bytes(cc, x, r) > host:
                    continue
                peak = math.ceil(tm.peak(cc, x, r, s))
                ms = apply_decisions(table, decisions, save_ops).total_ms
                if peak <= budget.usable_bytes and (best is None or ms < best[0]):
                    best = (ms, cfg, decisions, save_ops)
        if best is None:
            return None
        _, cfg, decisions, save_ops = best
        return make_plan(profile, budget, cfg, decisions, planner=self.name, options=options, save_ops=save_ops)
