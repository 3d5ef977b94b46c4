"""memtune: memory-aware training for PyTorch.

    >>> import memtune
    >>> prof = memtune.profile(model, batch, target="H100", precision="bf16-mixed")
    >>> plan = memtune.plan(prof, "24GB")
    >>> trainer = memtune.fit(model, budget="24GB"); trainer.train(loader, steps=1000)
"""

import os as _os

# Expandable segments let the CUDA caching allocator grow segments in place instead of carving
# fixed ones. Under a tight budget on an H100 this removed the fragmentation (reserved far above
# allocated) that otherwise made the first steps run out of memory (docs/benchmarks.md §4).
# It takes effect only before the first CUDA allocation, and a user's own setting wins.
_os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")

from .budget import Budget  # noqa: E402
from .errors import BudgetError, InfeasibleBudgetError, MemtuneError, PlanFileError, SampleError, TraceError  # noqa: E402
from .memory_model import predict_peak  # noqa: E402
from .plan import Decision, MemoryBreakdown, OptimizerPlan, Plan, TimeBreakdown  # noqa: E402
from .profile import ModelProfile, ParamInfo, StorageInfo, TimelineEvent, UnitProfile  # noqa: E402
from .profiler import PlanSpace, profile  # binds the function over the submodule of the same name
from .variant import StepVariant  # noqa: E402
from .planning import pareto, plan  # likewise: memtune.plan is the function, memtune.plan.Plan lives in memtune/plan.py

__version__ = "0.1.0"

# Heavier parts load on first use, so `import memtune` stays quick.
_LAZY = {
    "apply_plan": ("memtune.apply", "apply_plan"),
    "remove_plan": ("memtune.apply", "remove_plan"),
    "step_autocast": ("memtune.apply", "step_autocast"),
    "predict_step_time": ("memtune.cost_model", "predict_step_time"),
    "calibrate": ("memtune.cost_model", "calibrate"),
    "PlannerOptions": ("memtune.planners", "PlannerOptions"),
    "PLANNERS": ("memtune.planners", "PLANNERS"),
    "fit": ("memtune.runtime.trainer", "fit"),
    "Trainer": ("memtune.runtime.trainer", "Trainer"),
    "TrainerConfig": ("memtune.runtime.config", "TrainerConfig"),
    "LEVERS": ("memtune.levers", "LEVERS"),
    "session": ("memtune.runtime.session", "session"),
    "Session": ("memtune.runtime.session", "Session"),
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
    "OptimizerPlan", "ParamInfo", "Plan", "PlanFileError", "PlanSpace", "SampleError", "StepVariant", "StorageInfo",
    "TimeBreakdown",
    "TimelineEvent", "TraceError", "UnitProfile", "pareto", "plan", "predict_peak", "profile", *_LAZY,
]
