"""memtune: memory-aware training for PyTorch.

    >>> import memtune
    >>> prof = memtune.profile(model, batch, target="H100", precision="bf16-mixed")
    >>> plan = memtune.plan(prof, "24GB")
    >>> trainer = memtune.fit(model, budget="24GB"); trainer.train(loader, steps=1000)
"""

from .budget import Budget
from .errors import BudgetError, InfeasibleBudgetError, MemtuneError, PlanFileError, SampleError, TraceError
from .memory_model import predict_peak
from .plan import Decision, MemoryBreakdown, OptimizerPlan, Plan, TimeBreakdown
from .profile import ModelProfile, ParamInfo, StorageInfo, TimelineEvent, UnitProfile
from .profiler import profile  # binds the function over the submodule of the same name
from .planning import pareto, plan  # likewise: memtune.plan is the function, memtune.plan.Plan lives in memtune/plan.py

__version__ = "0.1.0"

# Heavier parts load on first use, so `import memtune` stays quick.
_LAZY = {
    "apply_plan": ("memtune.apply", "apply_plan"),
    "remove_plan": ("memtune.apply", "remove_plan"),
    "predict_step_time": ("memtune.cost_model", "predict_step_time"),
    "calibrate": ("memtune.cost_model", "calibrate"),
    "PlannerOptions": ("memtune.planners", "PlannerOptions"),
    "PLANNERS": ("memtune.planners", "PLANNERS"),
    "fit": ("memtune.runtime.trainer", "fit"),
    "Trainer": ("memtune.runtime.trainer", "Trainer"),
    "sweep": ("memtune.sweep", "sweep"),
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        value = getattr(importlib.import_module(module), attr)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'memtune' has no attribute {name!r}")


__all__ = [
    "Budget", "BudgetError", "Decision", "InfeasibleBudgetError", "MemoryBreakdown", "MemtuneError", "ModelProfile",
    "OptimizerPlan", "ParamInfo", "Plan", "PlanFileError", "SampleError", "StorageInfo", "TimeBreakdown",
    "TimelineEvent", "TraceError", "UnitProfile", "pareto", "plan", "predict_peak", "profile", *_LAZY,
]
