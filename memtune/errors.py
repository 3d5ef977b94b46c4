"""Every error memtune raises derives from :class:`MemtuneError`, and each message says
what went wrong and what to do about it."""

from __future__ import annotations


class MemtuneError(Exception):
    """Base class of memtune's errors."""


class BudgetError(MemtuneError, ValueError):
    """A budget that cannot be parsed, or one that cannot hold the model at all."""


class TraceError(MemtuneError):
    """No tracer could capture the model; the message lists each one tried and why it failed."""


class SampleError(MemtuneError):
    """The model does not run on the sample it was given."""


class InfeasibleBudgetError(MemtuneError):
    """No plan fits the budget. Carries the minimum feasible budget, the largest consumers and
    the changes that would make it fit."""

    def __init__(self, message: str, *, min_feasible_bytes: int | None = None,
                 top_consumers: list[tuple[str, int]] | None = None, suggestions: list[str] | None = None):
        super().__init__(message)
        self.min_feasible_bytes = min_feasible_bytes
        self.top_consumers = top_consumers or []
        self.suggestions = suggestions or []


class PlanFileError(MemtuneError, ValueError):
    """A plan or profile file that is not valid JSON of the expected schema."""
