"""``TrainerConfig``: every setting of :class:`~memtune.runtime.trainer.Trainer` in one typed object.

``memtune.fit(model, budget, **kwargs)`` keeps its keyword arguments for users; they become a
``TrainerConfig``, which rejects an unknown keyword with the list of known ones. The budget is
the one setting that matters; every field here has a default derived from it or from the device.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from memtune.errors import OptionError, UsageError


@dataclass(kw_only=True, slots=True)
class TrainerConfig:
    """How :func:`memtune.fit` trains (see its docstring for the user's view of each)."""

    sample: Any = None
    """The batch to profile with; ``None``: the first batch."""
    loss_fn: Any = None
    """How to get a loss from the model's output, when the model does not return one."""
    optimizer: str = "muon2"
    """The optimizer memtune builds: ``muon2``, ``muon`` or ``adamw`` (a session also takes yours)."""
    optimizer_settings: Any = None
    """A :class:`memtune.optim.OptimizerSettings` for learning rates and the like; ``None``: defaults
    with bf16 Newton-Schulz on CUDA and on CPUs with native bf16 matmul (avx512_bf16, AMX), fp32
    on other CPUs (:func:`memtune.optim.settings.default_ns_dtype`)."""
    planner: str | None = None
    """A key of :data:`memtune.planners.PLANNERS`; ``None``: exact, greedy past ``max_exact_units``."""
    device: Any = None
    """``None``: CUDA when present, else CPU."""
    precision: str | None = None
    """``None``: ``bf16-mixed`` on a CUDA device that supports it, else ``fp32``."""
    allow_microbatching: bool = True
    """Whether plans may split the batch into micro-batches (with gradient accumulation)."""
    allow_offload: bool = False
    """Whether plans may offload saved activations to host memory (activation offload)."""
    retune: bool = True
    """Re-plan between steps when the memory the device has left changes (tighten, relax)."""
    retune_config: Any = None
    """A :class:`memtune.runtime.retune.RetuneConfig`; ``None``: its defaults."""
    telemetry: Any = None
    """A :class:`~memtune.runtime.telemetry.Telemetry` or its sources; ``None``: NVML and torch.cuda
    on CUDA, psutil on a CPU."""
    metrics_path: str | Path | None = None
    """JSON-lines file for per-step metrics."""
    checkpoint_path: str | Path | None = None
    """Crash-safe checkpoint file (written every ``checkpoint_every`` steps and when training ends)."""
    checkpoint_every: int = 0
    """Steps between checkpoints (0: only at the end, when ``checkpoint_path`` is set), >= 0."""
    max_oom_retries: int = 4
    """Out-of-memory retries of one step before the run stops, >= 0."""
    enforce_budget: bool = True
    """Cap the process to the budget (CUDA memory fraction; on a CPU a tensor-memory guard)."""
    progress: bool = True
    """A progress bar (tqdm)."""
    planner_options: dict[str, Any] = field(default_factory=dict)
    """Extra :class:`memtune.planners.PlannerOptions` fields."""
    on_nonfinite: str = "raise"
    """``raise``: a NaN/inf loss or gradient stops the run before the optimizer step; ``skip``: skip
    the batch, with an event."""
    max_skipped_batches: int = 10
    """Non-finite batches skipped in a row before even ``skip`` stops, >= 0."""
    max_grad_norm: float | None = None
    """Clip the global gradient norm (> 0); ``None``: no clip."""
    max_compiled_plans: int = 4
    """With a ``torch.compile``-d model, distinct plans the runtime may compile before it stops
    relaxing to new ones (each new plan is one recompile), >= 1."""
    collective_timeout: float | None = 300.0
    """Under torchrun: seconds a rank waits inside a step's collectives for a peer before it takes
    the peer as failed (> 0). An out-of-memory error on one rank is then recovered in place on
    every rank (:mod:`memtune.distributed.recovery`); ``None``: the process group's own timeout
    (30 minutes on gloo). Give more than the longest a rank may wait for its peers in a step."""
    link: str = "loopback"
    """Under torchrun: the interconnect collectives are priced on (:data:`memtune.distributed.LINKS`)."""
    global_batch: int | str | None = None
    """Samples per optimizer step, exactly, whatever the loader yields (its batches are gathered
    or cut to match; under torchrun, across all ranks); ``"auto"``: grown toward the measured
    critical batch size; ``None``: each loader batch is one step. See
    :mod:`memtune.runtime.global_batch`."""
    host_budget: int | str | None = "auto"
    """Host memory plans may pin for what they move off a CUDA device (offloaded optimizer state
    and activations): bytes, a size (``"64GB"``), a share of RAM (``"50%"``), ``"auto"`` (what
    psutil reports available when training starts, less 10% of RAM and at least 2 GiB) or ``None``
    (no limit). A plan that fits the device but not the host is refused, with the host bytes it
    would need. On a CPU the device memory is the host's, and the budget covers it."""
    auto_batch: Any = None
    """With ``global_batch="auto"``: a :class:`memtune.runtime.global_batch.AutoBatchConfig`;
    ``None``: its defaults."""

    def __post_init__(self) -> None:
        from . import safety

        if self.on_nonfinite not in safety.NONFINITE_POLICIES:
            raise UsageError(f"on_nonfinite={self.on_nonfinite!r}: use 'raise' (stop with an error) or 'skip' "
                             "(skip the batch)")
        if self.max_grad_norm is not None and self.max_grad_norm <= 0:
            raise UsageError(f"max_grad_norm={self.max_grad_norm}: give a positive norm, or None to not clip")
        for name in ("checkpoint_every", "max_oom_retries", "max_skipped_batches"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise UsageError(f"{name}={value!r}: give a whole number >= 0")
        if self.collective_timeout is not None and not (isinstance(self.collective_timeout, (int, float))
                                                        and not isinstance(self.collective_timeout, bool)
                                                        and self.collective_timeout > 0):
            raise UsageError(f"collective_timeout={self.collective_timeout!r}: give seconds > 0, or None for the "
                             "process group's own timeout")
        self.planner_options = dict(self.planner_options or {})
        from memtune.budget import parse_host_budget

        self.host_budget = parse_host_budget(self.host_budget)   # "auto" is read once, when training is set up
        from .global_batch import check_global_batch

        check_global_batch(self.global_batch)

    @classmethod
    def from_kwargs(cls, kwargs: dict[str, Any], *, base: "TrainerConfig | None" = None) -> "TrainerConfig":
        """A config from :func:`memtune.fit`'s keyword arguments (on top of ``base``'s fields);
        an unknown one is an :class:`~memtune.errors.OptionError` that lists the known ones."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise OptionError(f"unknown fit/Trainer option(s) {unknown}; valid options are {sorted(known)}")
        inherited = {name: getattr(base, name) for name in known} if base is not None else {}
        return cls(**{**inherited, **kwargs})
