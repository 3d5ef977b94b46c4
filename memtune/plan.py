"""``Plan``: what memtune decided for a model under a budget.

Plain frozen data keyed by module FQN, JSON round-trip, no live objects:

* per unit a :class:`Decision` (``save``, ``recompute``, ``offload``);
* the optimizer (:class:`OptimizerPlan`): Muon²/Muon/AdamW, Newton-Schulz steps, state
  precision, and which parameters go to Muon² and which to AdamW;
* the step variant (:class:`~memtune.variant.StepVariant`): one choice per lever
  (:mod:`memtune.levers`: micro-batching, bf16 weights, the optimizer step in backward,
  optimizer-state offload, a chunked loss...), and the gradient-accumulation steps the
  micro-batch implies (the global batch is preserved);
* the predicted peak with its breakdown (:class:`MemoryBreakdown`) and the predicted step
  time with its breakdown (:class:`TimeBreakdown`);
* the planner's name and the fingerprint of the profile it planned for.

A lever's choice also reads as an attribute of the plan named after the lever
(``plan.<lever>`` is ``plan.variant.<lever>``).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

from .errors import PlanFileError
from .optimizers import NAMES as OPTIMIZER_NAMES
from .optimizers import STATE_DTYPES
from .jsonfile import read_json_object
from .units_fmt import fmt_bytes, fmt_ms
from .validation import check_fields, check_object
from .variant import StepVariant

PLAN_SCHEMA_VERSION = 4
"""4: the levers' choices in one ``variant``; version 3 files still read (:mod:`memtune.legacy`)."""
_PLAN_REMEDY = "re-create it with `memtune plan ... --out plan.json`"


class Decision(str, Enum):
    """What happens to a unit's saved activations between its forward and backward
    (the vocabulary follows ``torch.utils.checkpoint.CheckpointPolicy``)."""

    SAVE = "save"
    """Keep them on the device (no recomputation)."""
    RECOMPUTE = "recompute"
    """Drop them after the forward; recompute the unit's forward in backward."""
    OFFLOAD = "offload"
    """Move them to host memory after the forward and bring them back for backward."""
    SELECTIVE = "selective"
    """Keep the outputs of the ops in the unit's save set (:attr:`Plan.save_ops`), drop the rest
    and recompute them in backward (:mod:`memtune.selective`)."""

    @property
    def recomputes(self) -> bool:
        """The unit's forward runs again in backward (wholly or in part)."""
        return self in (Decision.RECOMPUTE, Decision.SELECTIVE)




@dataclass(frozen=True, kw_only=True)
class OptimizerPlan:
    name: str = "adamw"
    """A family memtune re-configures (``muon2``, ``muon``, ``adamw``; with the Muon variants,
    non-matrix parameters use AdamW) or an optimizer kept as profiled (``adam``, ``sgd``,
    ``custom``, ``none``); see :mod:`memtune.optimizers`."""
    ns_steps: int = 0
    """Newton-Schulz iterations per step (0 for AdamW)."""
    state_dtype: str = "fp32"
    """``fp32``, ``bf16`` or ``int8`` (blockwise absmax-quantized)."""
    muon_params: tuple[str, ...] = ()
    """Parameter FQNs updated by Muon²/Muon."""
    adamw_params: tuple[str, ...] = ()
    """Parameter FQNs updated by AdamW (or by the kept optimizer)."""
    settings: dict[str, Any] | None = None
    """The :class:`memtune.optim.OptimizerSettings` whose step the profile recorded, as plain
    data; ``None`` for PyTorch's own optimizers. :func:`memtune.apply_plan` builds exactly this."""

    def __post_init__(self) -> None:
        if self.name not in OPTIMIZER_NAMES:
            raise ValueError(f"optimizer name must be one of {OPTIMIZER_NAMES}, got {self.name!r}")
        if self.state_dtype not in STATE_DTYPES:
            raise ValueError(f"state_dtype must be one of {STATE_DTYPES}, got {self.state_dtype!r}")
        if self.ns_steps < 0:
            raise ValueError(f"ns_steps must be >= 0, got {self.ns_steps}")

    @property
    def key(self) -> tuple[str, str, int]:
        """What identifies the recorded configuration: (name, state precision, NS steps)."""
        return (self.name, self.state_dtype, self.ns_steps)


@dataclass(frozen=True, kw_only=True)
class MemoryBreakdown:
    """Bytes live at the predicted peak, by category. ``peak_bytes`` excludes ``reserve_bytes``
    and is what must fit in the usable budget."""

    peak_bytes: int
    params_bytes: int = 0
    grads_bytes: int = 0
    optimizer_state_bytes: int = 0
    saved_activation_bytes: int = 0
    """Activations retained for backward (and the batch)."""
    recompute_transient_bytes: int = 0
    optimizer_transient_bytes: int = 0
    """Optimizer-step temporaries, e.g. the Newton-Schulz workspace."""
    host_bytes: int = 0
    """Pinned host memory the plan uses, outside ``peak_bytes``: offloaded optimizer state and the
    activations of OFFLOAD units (all on the host at once when forward ends). Planned against
    ``host_budget`` (:class:`memtune.planners.PlannerOptions`)."""
    other_transient_bytes: int = 0
    """Temporaries of the op running at the peak (logits, gradients in flight...)."""
    stream_bytes: int = 0
    """Offloaded optimizer state on its way through the device (fetched ahead, being written
    back), held through backward (:class:`memtune.stepping.PlanOptimizer`)."""
    reserve_bytes: int = 0
    """CUDA context and allocator slack, outside ``peak_bytes``."""
    phase: str = ""
    """Where the peak happens: ``forward``, ``backward``, ``recompute:<unit>``, ``optimizer``."""


@dataclass(frozen=True, kw_only=True)
class TimeBreakdown:
    forward_ms: float = 0.0
    backward_ms: float = 0.0
    recompute_ms: float = 0.0
    ns_ms: float = 0.0
    optimizer_ms: float = 0.0
    offload_ms: float = 0.0
    """What activation offload's copies add beyond the units' own compute (host link; :mod:`memtune.offload`)."""
    lever_ms: dict[str, float] = field(default_factory=dict)
    """Time a lever adds, by lever name (:meth:`memtune.levers.Lever.cost`: e.g. optimizer-state
    traffic not hidden behind backward, or a chunked loss's head run again in backward)."""

    @property
    def total_ms(self) -> float:
        total = (self.forward_ms + self.backward_ms + self.recompute_ms + self.ns_ms + self.optimizer_ms
                 + self.offload_ms)
        for ms in self.lever_ms.values():
            total += ms
        return total


@dataclass(frozen=True, kw_only=True)
class UnitCost:
    """What one unit's decision keeps, frees and costs: bytes held between its forward and its
    backward, and milliseconds per optimizer step."""

    saved_bytes: int
    """What autograd saves in the unit (all of it stays under SAVE)."""
    kept_bytes: int = 0
    """What stays on the device: everything for SAVE; for SELECTIVE the save set's outputs that
    backward needs plus those only the checkpoint's cache holds."""
    recomputed_bytes: int = 0
    """Dropped after the forward and recomputed in backward."""
    offloaded_bytes: int = 0
    """Moved to host memory and back."""
    added_ms: float = 0.0
    """Recompute or offload time the decision adds to the step."""


@dataclass(frozen=True, kw_only=True)
class ParallelPlan:
    """How a plan runs across data-parallel ranks (:mod:`memtune.distributed`); every other
    field of the :class:`Plan` is per rank (the budget is per device)."""

    world_size: int
    """Ranks the plan was made for (each feeds its own local batch)."""
    strategy: str = "fsdp"
    """``fsdp``: FSDP2 ``fully_shard`` on every unit and the root; ``hsdp``: the same on a 2-D
    mesh, sharded within groups of ``shard_size`` ranks (a node) and replicated across them;
    ``ddp``: replicated parameters, gradients all-reduced (``DistributedDataParallel``)."""
    shard_size: int | None = None
    """``hsdp``: ranks per shard group (it divides ``world_size``)."""
    reshard_after_forward: dict[str, bool] = field(default_factory=dict)
    """FSDP2's ``reshard_after_forward`` per unit FQN (True frees the gathered parameters
    after the unit's forward and gathers them again for backward)."""
    mixed_precision: str | None = None
    """``bf16``: FSDP2 ``MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32)``."""
    link: str = "loopback"
    """The :data:`memtune.distributed.LINKS` entry collectives were priced on (within a node)."""
    inter_link: str | None = None
    """The link between nodes (``None``: one node, or the same link)."""
    comm_ms: float = 0.0
    """Predicted collective time per step that compute does not hide."""

    def __post_init__(self) -> None:
        if self.world_size < 1:
            raise ValueError(f"world_size must be >= 1, got {self.world_size}")
        if self.strategy not in ("fsdp", "hsdp", "ddp"):
            raise ValueError(f"strategy must be 'fsdp', 'hsdp' or 'ddp', got {self.strategy!r}")
        if self.strategy == "hsdp" and not (self.shard_size and 1 < self.shard_size < self.world_size
                                            and self.world_size % self.shard_size == 0):
            raise ValueError(f"hsdp needs a shard_size that divides world_size {self.world_size} into groups of "
                             f"2 or more, got {self.shard_size!r}")
        if self.mixed_precision not in (None, "bf16"):
            raise ValueError(f"mixed_precision must be None or 'bf16', got {self.mixed_precision!r}")


@dataclass(frozen=True, kw_only=True)
class Plan:
    budget_bytes: int
    usable_bytes: int
    decisions: dict[str, Decision]
    """Unit FQN -> decision, in execution order."""
    save_ops: dict[str, tuple[str, ...]] = field(default_factory=dict)
    """Per SELECTIVE unit, the op calls whose outputs it keeps (``aten.mm.default#2``: the third
    ``mm`` of the unit's forward; :mod:`memtune.selective`)."""
    unit_costs: dict[str, UnitCost] = field(default_factory=dict)
    """Per unit, what its decision keeps, recomputes or offloads and the time it adds (empty for a
    plan made by hand)."""
    optimizer: OptimizerPlan = field(default_factory=OptimizerPlan)
    variant: StepVariant = field(default_factory=StepVariant)
    """How the step runs: one choice per lever (:mod:`memtune.levers`)."""
    grad_accum_steps: int = 1
    """Forward/backward passes per optimizer step (micro-batches; micro-batch size times this is
    the global batch)."""
    predicted_peak_bytes: int = 0
    memory: MemoryBreakdown = field(default_factory=lambda: MemoryBreakdown(peak_bytes=0))
    predicted_step_ms: float = 0.0
    time: TimeBreakdown = field(default_factory=TimeBreakdown)
    planner: str = ""
    profile_hash: str = ""
    target: str = ""
    """Device-table name planned for."""
    notes: tuple[str, ...] = ()
    """What the planner wants the user to know (fallbacks, assumptions)."""
    parallel: ParallelPlan | None = None
    """Data parallelism across ranks; ``None``: one process."""
    samples_per_step: int | None = None
    """Samples per optimizer step (micro-batch size × accumulation; per rank under torchrun)."""
    tokens_per_sample: int | None = None
    """Tokens per sample when the batch is token ids (an integer ``(batch, tokens)`` input)."""
    schema_version: int = PLAN_SCHEMA_VERSION

    def __post_init__(self) -> None:
        from .levers import check_variant

        for fqn, d in self.decisions.items():
            if not isinstance(d, Decision):
                raise ValueError(f"decision for {fqn!r} must be a Decision, got {d!r}")
        missing = [f for f, d in self.decisions.items() if d is Decision.SELECTIVE and f not in self.save_ops]
        if missing:
            raise ValueError(f"SELECTIVE units {missing[:3]} have no save set in save_ops")
        if self.grad_accum_steps < 1:
            raise ValueError(f"grad_accum_steps must be >= 1, got {self.grad_accum_steps}")
        if not isinstance(self.variant, StepVariant):
            raise ValueError(f"variant must be a StepVariant, got {self.variant!r}")
        check_variant(self.variant)

    def __getattr__(self, name: str) -> Any:
        """A lever's choice, by the lever's name (``plan.<lever>``)."""
        if name.startswith("__") or name == "variant":
            raise AttributeError(name)
        from .levers import LEVERS

        if name in LEVERS:
            return self.variant[name]
        raise AttributeError(f"'Plan' object has no attribute {name!r}")

    # ------------------------------------------------------------------ views
    def units_with(self, decision: Decision) -> tuple[str, ...]:
        return tuple(u for u, d in self.decisions.items() if d is decision)

    @property
    def recompute_units(self) -> tuple[str, ...]:
        """Units whose forward runs again in backward, wholly (RECOMPUTE) or in part (SELECTIVE)."""
        return tuple(u for u, d in self.decisions.items() if d.recomputes)

    @property
    def fits(self) -> bool:
        return self.predicted_peak_bytes <= self.usable_bytes

    # ------------------------------------------------------------------ JSON
    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d = {k: dataclasses.asdict(v) if dataclasses.is_dataclass(v) else v for k, v in d.items()}
        d["decisions"] = {k: v.value for k, v in self.decisions.items()}
        d["unit_costs"] = {k: dataclasses.asdict(v) for k, v in self.unit_costs.items()}
        d["variant"] = self.variant.to_dict()
        return d

    def to_json(self, path: str | Path | None = None, *, indent: int | None = 2) -> str:
        text = json.dumps(self.to_dict(), indent=indent)
        if path is not None:
            Path(path).write_text(text)
        return text

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Plan":
        check_object(d, what="plan", remedy=_PLAN_REMEDY)
        try:
            if d.get("schema_version") == 3:
                from .legacy import plan_v3_to_v4

                d = plan_v3_to_v4(d)
            if d.get("schema_version") != PLAN_SCHEMA_VERSION:
                raise PlanFileError(
                    f"plan schema_version {d.get('schema_version')!r} is not {PLAN_SCHEMA_VERSION}; re-plan with this memtune"
                )
            kw = dict(d)
            kw["decisions"] = {k: Decision(v) for k, v in d["decisions"].items()}
            kw["save_ops"] = {k: tuple(v) for k, v in (d.get("save_ops") or {}).items()}
            kw["unit_costs"] = {k: UnitCost(**v) for k, v in (d.get("unit_costs") or {}).items()}
            o = d["optimizer"]
            kw["optimizer"] = OptimizerPlan(**{**o, "muon_params": tuple(o["muon_params"]),
                                               "adamw_params": tuple(o["adamw_params"])})
            if kw["optimizer"].settings is not None:  # checked now, not at the first step that builds it
                from .optim.settings import OptimizerConfigError, OptimizerSettings

                try:
                    OptimizerSettings.from_dict(kw["optimizer"].settings)
                except OptimizerConfigError as e:
                    raise PlanFileError(f"plan optimizer settings: {e}; re-create the plan with `memtune plan`") from e
            kw["variant"] = StepVariant.from_dict(d.get("variant"))
            kw["memory"] = MemoryBreakdown(**d["memory"])
            kw["time"] = TimeBreakdown(**{**d["time"], "lever_ms": dict(d["time"].get("lever_ms") or {})})
            kw["notes"] = tuple(d.get("notes", ()))
            if d.get("parallel") is not None:
                kw["parallel"] = ParallelPlan(**d["parallel"])
            return check_fields(cls(**kw), what="plan", remedy=_PLAN_REMEDY)
        except PlanFileError:
            raise
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise PlanFileError(
                f"not a valid memtune plan ({type(e).__name__}: {e}); re-create it with `memtune plan ... --out plan.json`"
            ) from e

    @classmethod
    def from_json(cls, text_or_path: str | Path) -> "Plan":
        """A plan from a JSON string or file; :class:`PlanFileError` if it is not one."""
        return cls.from_dict(read_json_object(text_or_path, what="plan",
                                              remedy="re-create it with `memtune plan ... --out plan.json`"))

    def _throughput(self) -> str:
        """``, 1,234 samples/s (78,976 tokens/s) at 64 per step``: the rate at the planned batch."""
        if not self.samples_per_step or not self.predicted_step_ms > 0:
            return ""
        per_s = self.samples_per_step * 1000.0 / self.predicted_step_ms
        tokens = f" ({per_s * self.tokens_per_sample:,.0f} tokens/s)" if self.tokens_per_sample else ""
        return f", {per_s:,.1f} samples/s{tokens} at {self.samples_per_step} per step"

    def summary(self) -> str:
        from .levers import LEVERS

        n_rc = len(self.units_with(Decision.RECOMPUTE))
        n_off = len(self.units_with(Decision.OFFLOAD))
        n_sel = len(self.units_with(Decision.SELECTIVE))
        m, t, o = self.memory, self.time, self.optimizer
        lines = [
            f"Plan ({self.planner}) for {self.target}: peak {fmt_bytes(self.predicted_peak_bytes)} of "
            f"{fmt_bytes(self.usable_bytes)} usable (budget {fmt_bytes(self.budget_bytes)}), step {fmt_ms(self.predicted_step_ms)}"
            + self._throughput(),
            f"  units: {len(self.decisions) - n_rc - n_off - n_sel} save, {n_sel} selective, {n_rc} recompute, "
            f"{n_off} offload",
            f"  optimizer: {o.name} ns_steps={o.ns_steps} state={o.state_dtype} "
            f"({len(o.muon_params)} Muon params, {len(o.adamw_params)} AdamW params)",
            "  step: " + "; ".join(LEVERS[name].describe(value) for name, value in self.variant.items())
            + (f"; {self.grad_accum_steps} accumulation steps" if self.grad_accum_steps > 1 else ""),
            f"  memory at peak ({m.phase}): params {fmt_bytes(m.params_bytes)}, grads {fmt_bytes(m.grads_bytes)}, "
            f"optimizer state {fmt_bytes(m.optimizer_state_bytes)}, activations {fmt_bytes(m.saved_activation_bytes)}, "
            f"recompute {fmt_bytes(m.recompute_transient_bytes)}, optimizer step {fmt_bytes(m.optimizer_transient_bytes)}, "
            f"other {fmt_bytes(m.other_transient_bytes)}"
            + (f", state stream {fmt_bytes(m.stream_bytes)}" if m.stream_bytes else "")
            + f"; reserve {fmt_bytes(m.reserve_bytes)}"
            + (f"; in host memory {fmt_bytes(m.host_bytes)}" if m.host_bytes else ""),
            f"  time: forward {fmt_ms(t.forward_ms)}, backward {fmt_ms(t.backward_ms)}, recompute {fmt_ms(t.recompute_ms)}, "
            f"NS {fmt_ms(t.ns_ms)}, optimizer {fmt_ms(t.optimizer_ms)}"
            + (f", offload {fmt_ms(t.offload_ms)}" if t.offload_ms else "")
            + "".join(f", {name} {fmt_ms(ms)}" for name, ms in t.lever_ms.items() if ms),
        ]
        lines += self._unit_lines()
        if self.parallel is not None:
            par = self.parallel
            links = par.link + (f" within a node, {par.inter_link} between" if par.inter_link else "")
            lines.append(f"  parallel: {par.strategy}"
                         + (f" (shard groups of {par.shard_size})" if par.strategy == "hsdp" else "")
                         + f" over {par.world_size} ranks ({links}), collectives "
                         f"{fmt_ms(par.comm_ms)} not hidden; memory and budget per rank"
                         + (f"; resharded after forward: {sum(par.reshard_after_forward.values())}/"
                            f"{len(par.reshard_after_forward)} units" if par.strategy in ("fsdp", "hsdp") else ""))
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)

    def _unit_lines(self, limit: int = 12) -> list[str]:
        """One line per unit that is not SAVE (the costliest ``limit``): what it keeps, recomputes
        or offloads, and the time that adds."""
        changed = [(u, d) for u, d in self.decisions.items() if d is not Decision.SAVE]
        if not changed:
            return []
        costs = self.unit_costs
        changed.sort(key=lambda t: -(costs[t[0]].added_ms if t[0] in costs else 0.0))
        out = [f"  per unit (not SAVE; {'costliest ' + str(limit) + ' of ' if len(changed) > limit else ''}"
               f"{len(changed)}): kept / recomputed / offloaded, time added"]
        for u, d in changed[:limit]:
            c = costs.get(u)
            what = f"  {u}: {d.value}"
            if c is not None:
                what += (f", keeps {fmt_bytes(c.kept_bytes)} of {fmt_bytes(c.saved_bytes)}"
                         + (f", recomputes {fmt_bytes(c.recomputed_bytes)}" if c.recomputed_bytes else "")
                         + (f", offloads {fmt_bytes(c.offloaded_bytes)}" if c.offloaded_bytes else "")
                         + f", +{fmt_ms(c.added_ms)}")
            if d is Decision.SELECTIVE:
                what += f"; saves {_short_ops(self.save_ops.get(u, ()))}"
            out.append("  " + what)
        return out


def _short_ops(keys: tuple[str, ...]) -> str:
    """``("aten.mm.default#0", "aten.mm.default#2")`` -> ``mm×2``: op calls, counted per overload."""
    counts: dict[str, int] = {}
    for key in keys:
        parts = key.split("#")[0].split(".")
        name = parts[1] if len(parts) >= 2 and parts[0] == "aten" else key
        counts[name] = counts.get(name, 0) + 1
    return ", ".join(f"{n}×{c}" if c > 1 else n for n, c in sorted(counts.items())) or "nothing"
