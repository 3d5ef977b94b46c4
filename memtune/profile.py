"""``ModelProfile``: what one training step of a model costs, per checkpointable unit.

Plain frozen data keyed by module FQN, units in the field names, no live modules. It
round-trips through JSON (:meth:`ModelProfile.to_json` / :meth:`ModelProfile.from_json`)
and carries enough of the measured step to replay it under any plan:

* ``units``: per unit parameter/gradient/saved-activation/input/output bytes, FLOPs and
  transient peaks, in execution order;
* ``storages``: every activation storage saved for backward, deduplicated by storage (a
  view counts once), with the timeline intervals where it was created and freed and the
  units that hold it;
* ``timeline``: the measured live bytes at each event of the step (unit forward start/end,
  unit backward start/end, optimizer) and the peak inside each interval.

The memory model (:mod:`memtune.memory_model`) replays ``timeline`` with the storages a
plan drops or recomputes; see docs/profiler.md for the exact semantics.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

from .errors import PlanFileError
from .jsonfile import ValueEnum, digest, read_json_object
from .validation import check_fields, check_object
from .variant import StepVariant

SCHEMA_VERSION = 5
"""5: a per-op record per unit (:attr:`UnitProfile.ops`). 4: step and optimizer recordings keyed
by a :class:`~memtune.variant.StepVariant`. Versions 3 and 4 still read (:mod:`memtune.legacy`)."""
_PROFILE_REMEDY = "write one with memtune.profile(...).to_json(path) or `memtune profile ... --out profile.json`"


@dataclass(frozen=True, kw_only=True, slots=True)
class ParamInfo:
    """One parameter (tied parameters appear once, under their first FQN)."""

    fqn: str
    shape: tuple[int, ...]
    dtype: str
    """torch dtype name without the ``torch.`` prefix, e.g. ``float32``."""
    param_bytes: int
    """Bytes on the target device (allocation rounding included)."""
    unit: str | None
    """FQN of the unit holding it, or ``None`` for parameters outside every unit."""
    module_type: str
    """Class name of the owning module (``Linear``, ``Embedding``, ``LayerNorm``...)."""


@dataclass(frozen=True, kw_only=True, slots=True)
class OpRecord:
    """One aten op of a unit's forward, in execution order: the per-op record that selective
    recomputation plans from (in the manner of ``torch.distributed._tools.sac_estimator.SACStats``,
    which keeps per op its name, runtime, memory and whether it is a view, random or in place).
    Recorded under fake tensors like the rest of the profile: no real memory."""

    name: str
    """The aten overload, as ``str(op)`` prints it (``aten.mm.default``); what a
    ``torch.utils.checkpoint`` policy function receives."""
    out_bytes: int
    """Bytes of the storages it allocated (allocation rounding included). Views and in-place
    ops allocate none: their outputs share the storage of what they alias, counted once, where it
    was allocated."""
    storages: tuple[int, ...]
    """Indices into :attr:`ModelProfile.storages` of the storages it allocated that backward
    needs (saved by some unit or by code outside the units)."""
    flops: int
    """FLOPs of one run (``torch.utils.flop_counter``; 0 for ops it does not count)."""
    io_bytes: int
    """Bytes it reads and writes (logical sizes of its tensor inputs and outputs): the memory
    traffic of recomputing it."""
    deps: tuple[int, ...] = ()
    """Indices (into the unit's ``ops``) of the earlier ops of the unit whose storages it reads:
    what recomputing it needs, recomputed or saved."""
    random: bool = False
    """It draws random numbers (dropout; attention with dropout): a recomputation replays the
    RNG state, so every random op of a unit is either saved or recomputed, all together."""
    inplace: bool = False
    """It writes one of its inputs in place."""
    view: bool = False
    """Its outputs alias its inputs (no new storage)."""
    mutated: bool = False
    """A later in-place op writes a storage it allocated: its output cannot be saved as it was."""
    saves: bool = False
    """Autograd saves tensors for this op's backward (its inputs or outputs). A recomputation stops
    after the last such op of the unit (``torch.utils.checkpoint``'s early stop)."""
    allocations: tuple[tuple[int, int, int], ...] = ()
    """(bytes, freed, needed) per storage it allocated: ``freed`` is when the unit's forward freed
    it (the number of the unit's ops that had run by then, at least 1; 0: it outlived the forward), ``needed``
    is 1 if backward saved it. What a partial recomputation's transient is computed from."""

    @property
    def saved_for_backward(self) -> bool:
        return bool(self.storages)


@dataclass(frozen=True, kw_only=True, slots=True)
class UnitProfile:
    """A checkpointable unit (a repeated block by default)."""

    fqn: str
    module_type: str
    order: int
    """Position in forward execution order (0 = first)."""
    param_bytes: int
    grad_bytes: int
    saved_activation_bytes: int
    """Distinct storages saved for backward by ops inside the unit (parameters and the
    batch excluded). Includes unit inputs that the unit itself saves."""
    input_bytes: int
    """Distinct activation storages passed in (what a checkpoint of the unit keeps)."""
    output_bytes: int
    fwd_flops: int
    bwd_flops: int
    fwd_transient_bytes: int
    """Peak live bytes during the unit's forward minus live bytes when it started."""
    bwd_transient_bytes: int
    """Peak live bytes during the unit's backward minus live bytes when it started."""
    saved_storages: tuple[int, ...]
    """Indices into :attr:`ModelProfile.storages` of what the unit saves."""
    input_storages: tuple[int, ...]
    """Indices into :attr:`ModelProfile.storages` of the unit's activation inputs that are
    also saved by someone (inputs nobody saves are freed in the baseline too)."""
    input_storage_bytes: tuple[int, ...] = ()
    """Bytes of every activation input storage, saved or not, in input order."""
    recompute_blocker: str = ""
    """Why the unit must not be recomputed (empty: it may be). The profiler runs a fake step with
    every unit checkpointed and records here any unit whose recomputation saves different
    tensors than its forward did (state carried between calls, e.g. a cache)."""
    ops: tuple[OpRecord, ...] = ()
    """Every aten op of the unit's forward, in order (:class:`OpRecord`); empty in profiles
    written before schema 5, which then plan whole-unit recomputation only."""


@dataclass(frozen=True, kw_only=True, slots=True)
class StorageInfo:
    """An activation storage that autograd saved for backward."""

    nbytes: int
    created: int
    """Timeline interval in which it was allocated."""
    freed: int
    """Timeline interval in which it was freed (``len(timeline)`` if it outlived the step)."""
    producer: str | None
    """Unit FQN whose forward allocated it, or ``None`` when allocated outside units."""
    holders: tuple[str, ...]
    """Units that saved it (empty when only code outside units saved it)."""
    saved_outside: bool
    """Code outside every unit (embedding, head, loss) also saved it."""


class StepEvent(ValueEnum):
    """The boundaries a recorded step is cut at (the vocabulary of ``mem_tracker._ModState``).
    The value is what profile files store."""

    START = "start"
    """Before the forward."""
    FWD_START = "fwd_start"
    """A unit's forward begins (``unit`` names it)."""
    FWD_END = "fwd_end"
    LOSS = "loss"
    """The loss exists; backward begins."""
    BWD_START = "bwd_start"
    """A unit's backward begins (the first gradient of one of its outputs arrives)."""
    BWD_END = "bwd_end"
    """A unit's backward ends (every gradient of its inputs is complete)."""
    PARAM_STEP = "step"
    """A parameter's gradient is complete and an optimizer step in backward updates it
    (``unit`` names the parameter); only in recordings of that variant."""
    BWD_DONE = "bwd_done"
    OPTIM_START = "optim_start"
    OPTIM_END = "optim_end"
    END = "end"
    """After ``zero_grad``."""

    @property
    def during_forward(self) -> bool:
        return self in (StepEvent.START, StepEvent.FWD_START, StepEvent.FWD_END)

    @property
    def during_backward(self) -> bool:
        return self in (StepEvent.BWD_START, StepEvent.BWD_END, StepEvent.PARAM_STEP, StepEvent.BWD_DONE)


class StepPhase(ValueEnum):
    """Where a training step is (the recorder's, and the runtime's ``TrainerPhase``)."""

    IDLE = "idle"
    FORWARD = "forward"
    BACKWARD = "backward"
    OPTIMIZER = "optimizer"


@dataclass(frozen=True, kw_only=True, slots=True)
class TimelineEvent:
    """A boundary of the measured step; interval *i* runs from event *i* to event *i+1*."""

    name: StepEvent
    unit: str | None
    live_bytes: int
    """Live tensor bytes at the event."""
    peak_bytes: int
    """Peak live bytes from this event until the next one."""
    grad_bytes: int = 0
    """Parameter-gradient bytes live at the event (part of ``live_bytes``)."""

    def __post_init__(self) -> None:
        if not isinstance(self.name, StepEvent):
            object.__setattr__(self, "name", StepEvent(self.name))


@dataclass(frozen=True, kw_only=True, slots=True)
class OptimizerStepProfile:
    """One optimizer configuration a plan may choose, recorded on the model's fake parameters:
    its state after a few steps and the temporaries of a steady-state ``optimizer.step()``."""

    name: str
    """See :mod:`memtune.optimizers`."""
    state_dtype: str
    ns_steps: int
    settings: dict[str, Any] | None
    """The :class:`memtune.optim.OptimizerSettings` it was built from, as plain data (``None``
    for PyTorch's own optimizers)."""
    muon_params: tuple[str, ...]
    adamw_params: tuple[str, ...]
    state_bytes: int
    """Distinct bytes of every state tensor held on the device (all of it, unless offloaded)."""
    step_transient_bytes: int
    """Peak bytes during the step minus the bytes live when it started (device side)."""
    profiled: bool = False
    """The configuration the profiled training step ran (its step is in the timeline)."""
    variant: StepVariant = field(default_factory=StepVariant)
    """The choices of the levers that change the optimizer step (:meth:`StepVariant.for_optimizer`)
    it was recorded with."""
    host_state_bytes: int = 0
    """State bytes held in host memory (offloaded state)."""
    param_step_bytes: tuple[tuple[str, int], ...] = ()
    """(parameter FQN, temporaries of its update), for a recording that steps one parameter at a
    time where backward completes its gradient; empty otherwise."""
    stream_bytes: int = 0
    """Device bytes the offloaded state's stream holds between two updates in backward (the next
    parameter's state fetched ahead, the last one's still being written back), at its largest:
    held while backward computes, on top of the step's live memory. 0 without offload in backward."""

    @property
    def key(self) -> tuple:
        return (self.name, self.state_dtype, self.ns_steps, self.variant)


def _unpipelined_offload(o: dict) -> bool:
    """A saved optimizer recording of offloaded state made before the pipelined state stream (no
    ``stream_bytes``): it measured one parameter's state at a time on the device."""
    variant = o.get("variant") or {}
    return "stream_bytes" not in o and bool(variant.get("state_offload"))


@dataclass(frozen=True, kw_only=True)
class StepRecording:
    """The training step recorded again as a plan variant runs it (:meth:`ModelProfile.recording`):
    ``variant`` holds the choice of every lever that changes the step (each lever's module in
    :mod:`memtune.levers` says what it changes); the other fields are those of a profile."""

    variant: StepVariant
    sample: str
    batch_size: int | None = None
    """Leading dimension of the batch this recording ran on."""
    param_bytes: int
    grad_bytes: int
    optimizer_state_bytes: int
    """State of the optimizer that was live during this recording (the plan's replaces it)."""
    outside_activation_bytes: int
    baseline_peak_bytes: int
    fwd_flops: int
    bwd_flops: int
    units: tuple[UnitProfile, ...]
    storages: tuple[StorageInfo, ...]
    timeline: tuple[TimelineEvent, ...]


@dataclass(frozen=True, kw_only=True)
class ModelProfile:
    """The result of :func:`memtune.profile`. All sizes in bytes, all FLOPs per step."""

    model: str
    tracer: str
    """``symbolic_trace`` or ``make_fx``: which tracer produced :attr:`graph`."""
    tracers_tried: tuple[tuple[str, str], ...]
    """``(tracer, why it failed)`` for each tracer tried before the one that worked."""
    target: str
    """Device type the profile models (``cuda`` or ``cpu``)."""
    target_name: str
    """Device-table key the profile was made for (``H100``, ``cpu``...)."""
    precision: str
    """``fp32`` or ``bf16-mixed``."""
    optimizer: str
    batch_size: int | None
    """Leading dimension of the sample (the micro-batch the profile was measured at)."""
    sample: str
    """Shapes and dtypes of the sample, for humans."""
    param_bytes: int
    buffer_bytes: int
    grad_bytes: int
    optimizer_state_bytes: int
    input_bytes: int
    """The batch itself."""
    workspace_bytes: int = 0
    """Persistent kernel workspaces the target allocates outside tensor ops (cuBLAS on CUDA),
    live for the whole step and included in the timeline and ``baseline_peak_bytes``."""
    outside_activation_bytes: int
    """Activations saved by code outside every unit (embeddings, head, loss)."""
    baseline_peak_bytes: int
    """Peak of one steady-state training step (forward, backward, optimizer step) with
    ``optimizer`` and no recomputation."""
    fwd_flops: int
    bwd_flops: int
    units: tuple[UnitProfile, ...]
    params: tuple[ParamInfo, ...]
    storages: tuple[StorageInfo, ...]
    timeline: tuple[TimelineEvent, ...]
    assumptions: tuple[str, ...] = ()
    """What the fake run could not know and how it was resolved: data-dependent reads, and
    kernels whose fake implementation differs from eager (what eager allocation was recorded)."""
    written_buffers: tuple[str, ...] = ()
    """FQNs of the buffers the recorded step writes (batch norm's running statistics, a call
    counter), as the ops of the fake step wrote them (:mod:`memtune.stateful`): the runtime copies
    them before each step so that a retried or skipped step leaves them as one clean step would."""
    written_buffer_bytes: int = 0
    """Bytes of ``written_buffers``. The runtime holds copies of them: the step's snapshot (the
    whole step), and a recomputed unit's copy of its own from its forward to its backward plus
    one while it recomputes (:class:`memtune.timeline.TimelineModel`)."""
    written_buffer_sizes: tuple[int, ...] = ()
    """Bytes of each of ``written_buffers``, in order: which unit holds which copy. A profile
    from before it was recorded has none, and the planner then counts three copies of every
    written buffer for the whole step."""
    batch_statistics: tuple[str, ...] = ()
    """FQNs of the modules that normalize with statistics over the batch as profiled (batch norm
    in training mode): with them, or with written buffers, micro-batching changes the maths
    (:mod:`memtune.levers.micro_batch`)."""
    variant: StepVariant = field(default_factory=StepVariant)
    """The step variant this profile's step is: the profiled step, or, for a view from
    :meth:`recording`, the variant recorded."""
    optimizer_steps: tuple[OptimizerStepProfile, ...] = ()
    """Every optimizer configuration recorded for this model (:class:`memtune.PlanSpace`)."""
    step_variants: tuple[StepRecording, ...] = ()
    """The step recorded as each other step variant runs it (:mod:`memtune.levers`)."""
    allocation_granularity: int = 1
    """Every allocation is rounded up to this many bytes (512 for CUDA)."""
    profile_seconds: float = 0.0
    torch_version: str = ""
    schema_version: int = SCHEMA_VERSION
    graph: Any = field(default=None, compare=False, repr=False)
    """The ``torch.fx.Graph`` the tracer produced (kept in memory only, not serialized). A
    plain Graph names modules by FQN and holds no live module or parameter, so keeping a
    profile never keeps the model alive."""

    # ------------------------------------------------------------------ derived
    @property
    def static_bytes(self) -> int:
        """Parameters, buffers and persistent kernel workspaces."""
        return self.param_bytes + self.buffer_bytes + self.workspace_bytes

    @property
    def unit_fqns(self) -> tuple[str, ...]:
        return tuple(u.fqn for u in self.units)

    def unit(self, fqn: str) -> UnitProfile:
        for u in self.units:
            if u.fqn == fqn:
                return u
        raise KeyError(f"no unit {fqn!r}; units are {list(self.unit_fqns)}")

    def optimizer_step(self, name: str, state_dtype: str, ns_steps: int,
                       variant: StepVariant | None = None) -> OptimizerStepProfile | None:
        """The optimizer configuration recorded with this key (and the optimizer-side choices of
        ``variant``), or ``None``."""
        key = (name, state_dtype, ns_steps, (variant or StepVariant()).for_optimizer())
        for o in self.optimizer_steps:
            if o.key == key:
                return o
        return None

    @property
    def recorded_variants(self) -> tuple[StepVariant, ...]:
        """The step variants with a recording of the training step, the profiled one first."""
        return (StepVariant(),) + tuple(r.variant for r in self.step_variants)

    def recorded_choices(self, lever: str) -> tuple:
        """The choices of ``lever`` that this profile recorded (in a step recording or an
        optimizer recording), its default first."""
        from memtune.levers import LEVERS

        seen = [LEVERS[lever].default] + [v[lever] for v in self.recorded_variants]
        seen += [o.variant[lever] for o in self.optimizer_steps]
        return tuple(dict.fromkeys(seen))

    def recording(self, variant: StepVariant | None = None) -> "ModelProfile":
        """This profile as a plan with ``variant`` sees it: the step recorded that way, as a
        profile of its own (the profiled step itself for ``StepVariant()``). Raises
        ``KeyError`` if it was not recorded."""
        key = (variant or StepVariant()).for_step()
        if key.is_default:
            return self
        cache = self.__dict__.setdefault("_variant_cache", {})
        if key not in cache:
            rec = next((r for r in self.step_variants if r.variant == key), None)
            if rec is None:
                raise KeyError(key)
            fields = {f.name: getattr(rec, f.name) for f in dataclasses.fields(rec)}
            fields["batch_size"] = rec.batch_size if rec.batch_size is not None else self.batch_size
            cache[key] = dataclasses.replace(self, **fields, step_variants=())
        return cache[key]

    @property
    def saved_activation_bytes(self) -> int:
        """All distinct activation storages saved for backward."""
        return sum(s.nbytes for s in self.storages)

    @property
    def fingerprint(self) -> str:
        """Stable hash of the serialized profile (timing fields excluded)."""
        d = self.to_dict()
        d.pop("profile_seconds", None)
        return digest(d)

    # ------------------------------------------------------------------ JSON
    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            if f.name == "graph":
                continue
            out[f.name] = _plain(getattr(self, f.name))
        return out

    def to_json(self, path: str | Path | None = None, *, indent: int | None = None) -> str:
        text = json.dumps(self.to_dict(), indent=indent)
        if path is not None:
            Path(path).write_text(text)
        return text

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelProfile":
        check_object(d, what="profile", remedy=_PROFILE_REMEDY)
        try:
            if d.get("schema_version") == 3:
                from .legacy import profile_v3_to_v4

                d = profile_v3_to_v4(d)
            if d.get("schema_version") == 4:  # no per-op record: whole-unit recomputation only
                d = {**d, "schema_version": SCHEMA_VERSION}
            if d.get("schema_version") != SCHEMA_VERSION:
                raise PlanFileError(
                    f"profile schema_version {d.get('schema_version')!r} is not {SCHEMA_VERSION}; "
                    "re-run memtune.profile with this version of memtune"
                )
            kw = dict(d)
            kw["tracers_tried"] = tuple(tuple(t) for t in d["tracers_tried"])
            kw["assumptions"] = tuple(d.get("assumptions", ()))
            kw["written_buffers"] = tuple(d.get("written_buffers", ()))
            kw["written_buffer_sizes"] = tuple(d.get("written_buffer_sizes", ()))
            kw["batch_statistics"] = tuple(d.get("batch_statistics", ()))
            kw["variant"] = StepVariant.from_dict(d.get("variant"))
            kw.update(_recording_from_dict(d))
            kw["params"] = tuple(ParamInfo(**{**p, "shape": tuple(p["shape"])}) for p in d["params"])
            kw["optimizer_steps"] = tuple(
                OptimizerStepProfile(**{**o, "muon_params": tuple(o["muon_params"]),
                                        "adamw_params": tuple(o["adamw_params"]),
                                        "variant": StepVariant.from_dict(o.get("variant")),
                                        "param_step_bytes": tuple(tuple(x) for x in o.get("param_step_bytes", ()))})
                for o in d.get("optimizer_steps", ()) if not _unpipelined_offload(o))
            if len(kw["optimizer_steps"]) < len(d.get("optimizer_steps", ())):
                kw["assumptions"] += ("offloaded-state recordings from before the pipelined state stream were "
                                      "dropped (they do not measure its buffers): re-profile to plan state offload",)
            kw["step_variants"] = tuple(StepRecording(**{**r, **_recording_from_dict(r),
                                                         "variant": StepVariant.from_dict(r["variant"])})
                                        for r in d.get("step_variants", ()))
            return check_fields(cls(**kw), what="profile", remedy=_PROFILE_REMEDY)
        except PlanFileError:
            raise
        except (KeyError, TypeError, ValueError, AttributeError) as e:  # (a list where a mapping belongs)
            raise PlanFileError(
                f"not a memtune profile ({type(e).__name__}: {e}); write one with memtune.profile(...).to_json(path)"
            ) from e

    @classmethod
    def from_json(cls, text_or_path: str | Path) -> "ModelProfile":
        """A profile from a JSON string or file; :class:`PlanFileError` if it is not one."""
        return cls.from_dict(read_json_object(text_or_path, what="profile",
                                              remedy="re-create it with `memtune profile ... --out profile.json`"))

    # ------------------------------------------------------------------ display
    def summary(self) -> str:
        """A readable table: one row per unit, then the whole-model totals."""
        from .units_fmt import fmt_bytes, fmt_flops

        head = (f"{'unit':<28} {'params':>10} {'saved act':>10} {'input':>10} {'fwd peak+':>10} "
                f"{'bwd peak+':>10} {'fwd FLOPs':>10} {'bwd FLOPs':>10}")
        lines = [
            f"ModelProfile of {self.model}: traced with {self.tracer}, target {self.target_name} ({self.target}), "
            f"{self.precision}, optimizer {self.optimizer}, sample {self.sample}",
            head,
            "-" * len(head),
        ]
        for u in self.units:
            lines.append(
                f"{u.fqn:<28} {fmt_bytes(u.param_bytes):>10} {fmt_bytes(u.saved_activation_bytes):>10} "
                f"{fmt_bytes(u.input_bytes):>10} {fmt_bytes(u.fwd_transient_bytes):>10} "
                f"{fmt_bytes(u.bwd_transient_bytes):>10} {fmt_flops(u.fwd_flops):>10} {fmt_flops(u.bwd_flops):>10}"
            )
        lines.append("-" * len(head))
        lines += [
            f"parameters {fmt_bytes(self.param_bytes)} · buffers {fmt_bytes(self.buffer_bytes)} · "
            f"gradients {fmt_bytes(self.grad_bytes)} · optimizer state {fmt_bytes(self.optimizer_state_bytes)} · "
            f"batch {fmt_bytes(self.input_bytes)}"
            + (f" · kernel workspaces {fmt_bytes(self.workspace_bytes)}" if self.workspace_bytes else ""),
            f"saved activations {fmt_bytes(self.saved_activation_bytes)} "
            f"(outside units {fmt_bytes(self.outside_activation_bytes)}) · "
            f"FLOPs fwd {fmt_flops(self.fwd_flops)} bwd {fmt_flops(self.bwd_flops)}",
            f"baseline peak (one training step, no recompute): {fmt_bytes(self.baseline_peak_bytes)}",
        ]
        for a in self.assumptions:
            lines.append(f"assumed: {a}")
        return "\n".join(lines)


def _recording_from_dict(d: dict[str, Any]) -> dict[str, Any]:
    """The units, storages and timeline of a serialized step recording."""
    return {
        "units": tuple(UnitProfile(**{**u, "saved_storages": tuple(u["saved_storages"]),
                                      "input_storages": tuple(u["input_storages"]),
                                      "input_storage_bytes": tuple(u.get("input_storage_bytes", ())),
                                      "ops": tuple(OpRecord(**{**o, "storages": tuple(o["storages"]),
                                                               "deps": tuple(o.get("deps", ())),
                                                               "allocations": tuple(tuple(a) for a in
                                                                                    o.get("allocations", ()))})
                                                   for o in u.get("ops", ()))})
                       for u in d["units"]),
        "storages": tuple(StorageInfo(**{**s, "holders": tuple(s["holders"])}) for s in d["storages"]),
        "timeline": tuple(TimelineEvent(**e) for e in d["timeline"]),
    }


_SCALARS = (int, float, str, bool, type(None))
_FIELD_NAMES: dict[type, tuple[str, ...]] = {}


def _plain(v: Any) -> Any:
    """``v`` as plain JSON data. Written for speed: a 1000-unit profile with its per-op records
    holds millions of values (field names are cached per class; a tuple of scalars is copied
    as it is)."""
    t = type(v)
    if t in _SCALARS:
        return v
    if t is tuple or t is list:
        if all(type(x) in _SCALARS for x in v):
            return list(v)
        return [_plain(x) for x in v]
    if t is dict:
        return {k: _plain(x) for k, x in v.items()}
    if isinstance(v, StepVariant):
        return v.to_dict()
    if isinstance(v, Enum):
        return v.value
    names = _FIELD_NAMES.get(t)
    if names is None and dataclasses.is_dataclass(v) and not isinstance(v, type):
        names = _FIELD_NAMES[t] = tuple(f.name for f in dataclasses.fields(v))
    if names is not None:
        return {n: _plain(getattr(v, n)) for n in names}
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    if isinstance(v, dict):
        return {k: _plain(x) for k, x in v.items()}
    return v
