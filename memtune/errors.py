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


class UsageError(MemtuneError, ValueError):
    """Bad input that is not a budget: a model path that does not resolve, a factory that
    returns the wrong thing, an unknown device, an option out of range."""


class OptionError(UsageError, TypeError):
    """An unknown keyword option (a ``TypeError`` too, as Python raises for unknown keywords)."""


class UnrecordedPlanError(MemtuneError, KeyError):
    """A plan needs something the profile did not record (an optimizer configuration or a step
    variant); the message says how to record it."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


class OptimizerConfigError(MemtuneError, ValueError):
    """Optimizer settings, or an override, that memtune cannot honour; the message says the fix."""


class ModelMismatchError(MemtuneError, ValueError):
    """A plan, profile or checkpoint applied to a model it was not made for; the message
    says what differs (unit or parameter names, shapes, profile hash, batch size)."""


class CheckpointError(PlanFileError):
    """A checkpoint file that is corrupt (checksum mismatch), truncated, not memtune's, of
    another format version, or that would need code execution to load."""


class OutputError(MemtuneError, OSError):
    """A file memtune must write (a checkpoint, a plan, a profile, a report) cannot be
    written: read-only or full file system, missing permissions. Nothing already on disk
    was replaced."""


def write_failure_cause(e: OSError) -> str:
    """Why a write failed, in words, from its errno (the OS's own words otherwise)."""
    import errno

    return {errno.ENOSPC: "the disk is full", errno.EROFS: "the file system is read-only",
            errno.EACCES: "permission denied", errno.EDQUOT: "the disk quota is exceeded",
            errno.EFBIG: "the file size limit is exceeded (ulimit -f)",
            errno.ENOTDIR: "a parent of it is a file, not a directory"}.get(e.errno, e.strerror or str(e))


class TrainingError(MemtuneError):
    """Training stopped at a step for a reason a bigger budget would not fix; the trainer
    keeps its state (``trainer.save(path)`` still works) and the last checkpoint is intact."""


class NonFiniteError(TrainingError, FloatingPointError):
    """A loss or gradient that is NaN or infinite, caught before the optimizer step."""


class StepFailedError(TrainingError):
    """A step kept running out of memory although plans that fit the budget exist
    (memory held by something else, or a transient fault)."""


class DistributedError(MemtuneError):
    """Ranks disagree (plans, budgets, feasibility) or the process group cannot be set up; raised
    on every rank with the same message."""


class TelemetryError(MemtuneError):
    """A telemetry source cannot be read or a reading is not understood; the message says
    which source and what to pass instead."""
