"""memtune: memory-aware training for PyTorch.

    >>> import memtune
    >>> prof = memtune.profile(model, batch, target="H100", precision="bf16-mixed")
    >>> print(prof.summary())
"""

from .budget import Budget
from .errors import BudgetError, InfeasibleBudgetError, MemtuneError, PlanFileError, SampleError, TraceError
from .profile import ModelProfile, ParamInfo, StorageInfo, TimelineEvent, UnitProfile
from .profiler import profile

__version__ = "0.1.0"
__all__ = [
    "Budget", "BudgetError", "InfeasibleBudgetError", "MemtuneError", "ModelProfile", "ParamInfo", "PlanFileError",
    "SampleError", "StorageInfo", "TimelineEvent", "TraceError", "UnitProfile", "profile",
]
