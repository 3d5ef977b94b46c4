"""memtune's planners (installed as ``memtune.planners``). A planner implements one method,

    plan(profile: ModelProfile, budget: Budget, *, options: PlannerOptions) -> Plan

and is registered in :data:`PLANNERS`. ``exact`` solves a MILP that restates
``predict_peak`` exactly; ``greedy`` is the fast heuristic the front end falls back to on very
large profiles. ``brute`` (tests only) enumerates every plan. See docs/planners.md.
"""

from .brute import BrutePlanner
from .exact import ExactPlanner
from .greedy import GreedyPlanner
from .options import PlannerOptions

PLANNERS = {"exact": ExactPlanner(), "greedy": GreedyPlanner()}
"""Planner name -> planner; what ``memtune.plan(..., planner=name)`` accepts."""

REFERENCE_PLANNERS = {"brute": BrutePlanner()}
"""Exhaustive reference for the tests; not for use on real models."""

__all__ = ["PLANNERS", "REFERENCE_PLANNERS", "BrutePlanner", "ExactPlanner", "GreedyPlanner", "PlannerOptions"]
