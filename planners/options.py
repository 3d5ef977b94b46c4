"""What every planner shares: :class:`PlannerOptions`, the outer configuration space
(optimizer × state precision × Newton-Schulz steps × step variant, each as the profile recorded
it) and turning a decision set into a verified :class:`~memtune.plan.Plan`.

A configuration (:class:`Config`) fixes everything but the unit decisions: the optimizer and
one choice per lever (:mod:`memtune.levers`). :func:`configs` enumerates the product of each
lever's choices that the options allow and the profile recorded, less the combinations that
cannot run together; the planners choose unit decisions inside each one. Lossiness tiers
(:func:`lossiness`, :func:`choose_tier`) prefer the configurations that change the training
numerics least.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Mapping

from memtune.budget import Budget
from memtune.cost_model import CostTable, apply_decisions, cost_table
from memtune.devices import DeviceSpec
from memtune.errors import UnrecordedPlanError
from memtune.levers import LEVERS, combinations
from memtune.memory_model import predict_peak
from memtune.optimizers import FAMILIES, NAMES, STATE_DTYPES, STATE_PRECISIONS, ns_floor, orthogonalizes
from memtune.plan import Decision, OptimizerPlan, Plan, UnitCost
from memtune.profile import ModelProfile
from memtune.timeline import ConfigConstants, TimelineModel, plan_optimizer_memory, plan_recording, timeline_model
from memtune.variant import StepVariant


@dataclass(frozen=True, kw_only=True, slots=True)
class PlannerOptions:
    """Knobs of every planner. The budget is the one setting that matters; these bound what a
    planner may change to meet it. Every plan a planner returns is priced from the profile's
    recordings (:class:`memtune.PlanSpace`), so options reach only what the profile recorded."""

    optimizer: str | tuple[str, ...] | None = None
    """``None``: keep the profile's optimizer. A name (``muon2``, ``muon``, ``adamw``) or a tuple of
    names to choose from: the plan may switch to it, if the profile recorded it
    (``memtune.profile(..., space=PlanSpace(optimizers=...))``)."""
    min_ns_steps: int | None = None
    """Fewest Newton-Schulz iterations the planner may choose; ``None``: the family's floor
    (:attr:`memtune.optimizers.OptimizerKind.ns_floor`). Fewer NS steps are faster and cost no
    memory, so a time-minimizing plan sits on this floor: raise it when update quality matters more."""
    max_ns_steps: int | None = None
    """Most NS iterations (``None``: the floor). Only matters if a future cost model rewards them."""
    state_dtypes: tuple[str, ...] | None = None
    """Optimizer-state precisions allowed (``fp32``, ``bf16``, ``int8``); ``None``: every precision the
    profile recorded. fp32 is fastest; the others are chosen only when memory needs them."""
    levers: Mapping[str, tuple] = field(default_factory=dict)
    """Lever name -> the choices the planner may take (of those the profile recorded); a lever
    not listed follows its default (:meth:`memtune.levers.Lever.allowed`, which reads the
    deprecated ``allow_*`` fields below)."""
    allow_activation_offload: bool = False
    """Allow OFFLOAD unit decisions (saved activations to pinned host memory; priced at PCIe
    bandwidth). Ignored for CPU targets, where host memory *is* the budget."""
    allow_offload: bool = False
    """Deprecated name of ``allow_activation_offload``."""
    allow_microbatching: bool = False
    """Allow splitting the global batch into micro-batches with gradient accumulation (the
    ``micro_batch_size`` lever; ``levers={"micro_batch_size": ...}`` says which sizes)."""
    global_batch_size: int | None = None
    """Samples per optimizer step; ``None``: the profiled batch size."""
    weights: tuple[str | None, ...] | None = None
    """Deprecated: ``levers={"weights": ...}``."""
    allow_optimizer_in_backward: bool = True
    """Deprecated: ``levers={"optimizer_in_backward": (False,)}`` turns it off (a training loop
    that clips the global gradient norm needs every gradient at once)."""
    allow_state_offload: bool = True
    """Deprecated: ``levers={"state_offload": (False,)}`` turns it off."""
    allow_loss_chunking: bool = True
    """Deprecated: ``levers={"loss_chunks": (None,)}`` turns it off."""
    prefer_lossless: bool = True
    """Prefer the plans that change the training numerics least (see :func:`lossiness`): exact
    plans first, then ones that reorder sums (micro-batching, chunked loss), then lower state
    precision, then bf16 weights, unless the more exact plan is more than
    ``max_lossless_slowdown`` times slower than the fastest plan that fits. ``False``: the
    fastest plan that fits, whatever it changes."""
    max_lossless_slowdown: float = 2.0
    """How much slower (predicted step time, ×) a more exact plan may be and still be preferred
    (>= 1; ``inf``: always the most exact; 1: always the fastest). At 2, a 7B model in 80 GB takes
    int8 AdamW state rather than exact fp32 state streamed from host memory at 7× the step time."""
    micro_batch_sizes: tuple[int, ...] | None = None
    """Micro-batch sizes to consider when micro-batching is allowed (each must divide the global
    batch and be recorded); ``None``: every recorded size that divides it."""
    device: str | DeviceSpec | None = None
    """Device whose rates the cost model uses (a table name, ``"cpu"``, a DeviceSpec, e.g. from
    :func:`memtune.cost_model.calibrate`); ``None``: ``profile.target_name``."""
    host_budget: int | None = None
    """Bytes of host memory the plan may pin for what it moves off the device (offloaded optimizer
    state, offloaded activations); ``None``: no limit. ``memtune.fit`` sets it from what psutil
    reports available on a CUDA machine. A plan that fits the device but needs more host memory
    than this is infeasible, and the error says so. Ignored on a CPU target, whose device memory
    is host memory."""
    time_limit_s: float = 10.0
    """Wall-clock limit of one MILP solve (exact planner); past it the best plan found is used."""
    mip_rel_gap: float = 5e-3
    """Exact planner: stop when the plan's step time is proven within this fraction of the optimum
    (HiGHS's relative MIP gap, taken over the whole predicted step time): 0.5% of the step. A
    model of identical blocks leaves an integrality gap of a few tenths of a percent (whole
    blocks or save sets, not fractions of them) that only branching over near-equivalent blocks
    closes: Llama-2-7B at 24GB spent the whole 10 s limit proving 0.01% and ended unproven, for
    a plan 0.04% faster than the one a 0.5% gap returns in 0.2 s (docs/benchmarks.md, section 11).
    The cost model's own error is far larger than either."""
    max_exact_units: int = 2000
    """:func:`memtune.planning.plan` uses the greedy planner past this many units."""
    locked: tuple[str, ...] = ()
    """Names of the options or levers that the caller's setup fixes (a session with your
    optimizer, a framework callback). An infeasible budget's error then does not suggest changing them."""
    locked_hint: str = ""
    """What to do instead, when ``locked`` is set (said in that error)."""

    def __post_init__(self) -> None:
        if not self.max_lossless_slowdown >= 1.0:
            raise ValueError(f"max_lossless_slowdown={self.max_lossless_slowdown}: use a factor >= 1 (inf: always exact)")
        names = self.optimizer_names or ()
        bad = [n for n in names if n not in NAMES]
        if bad or (self.optimizer is not None and not names):
            raise ValueError(f"optimizer={self.optimizer!r}: use None (the profiled one), one of {FAMILIES}, or a tuple")
        if self.state_dtypes is not None:
            bad = [d for d in self.state_dtypes if d not in STATE_DTYPES]
            if bad or not self.state_dtypes:
                raise ValueError(f"state_dtypes={self.state_dtypes!r}: use a non-empty subset of {STATE_DTYPES}")
        if self.host_budget is not None and (not isinstance(self.host_budget, int) or isinstance(self.host_budget, bool)
                                             or self.host_budget < 0):
            raise ValueError(f"host_budget={self.host_budget!r}: give bytes (an int >= 0) or None for no limit; "
                             "memtune.plan and memtune.fit also take a string such as '64GB'")
        if self.min_ns_steps is not None and self.max_ns_steps is not None and self.min_ns_steps > self.max_ns_steps:
            raise ValueError(f"min_ns_steps={self.min_ns_steps} exceeds max_ns_steps={self.max_ns_steps}")
        unknown = sorted(set(self.levers) - set(LEVERS))
        if unknown:
            raise ValueError(f"levers: unknown lever(s) {unknown}; the levers are {list(LEVERS)}")
        levers = {}
        for name, choices in self.levers.items():
            try:
                levers[name] = tuple(LEVERS[name].validate(v) for v in choices)
            except (TypeError, ValueError) as e:
                raise ValueError(f"levers[{name!r}]: {e}") from None
        object.__setattr__(self, "levers", levers)

    @property
    def optimizer_names(self) -> tuple[str, ...] | None:
        if self.optimizer is None:
            return None
        return (self.optimizer,) if isinstance(self.optimizer, str) else tuple(self.optimizer)

    @property
    def activation_offload(self) -> bool:
        return self.allow_activation_offload or self.allow_offload

    def lever_choices(self, name: str) -> tuple | None:
        """The choices ``levers`` lists for lever ``name`` (``None``: not listed)."""
        return self.levers.get(name)

    def ns_range(self, name: str) -> tuple[int, int]:
        """Allowed NS step counts of optimizer ``name`` (``(0, 0)`` without Newton-Schulz)."""
        if not orthogonalizes(name):
            return 0, 0
        lo = self.min_ns_steps if self.min_ns_steps is not None else ns_floor(name)
        hi = self.max_ns_steps if self.max_ns_steps is not None else max(lo, ns_floor(name))
        return max(1, lo), max(1, hi)


@dataclass(frozen=True, slots=True)
class Config:
    """One point of the outer space; every unit decision is planned inside one."""

    optimizer: OptimizerPlan
    variant: StepVariant = field(default_factory=StepVariant)
    grad_accum_steps: int = 1
    tier: int | None = None
    """Its lossiness for the profiled model (:func:`configs` sets it); ``None``: :func:`lossiness`
    without the model."""

    @property
    def key(self) -> tuple:
        """A total order of configurations (ties between equally fast plans break on it)."""
        o = self.optimizer
        return (o.name, o.state_dtype, o.ns_steps, *self.variant.order_key(), self.grad_accum_steps)

    @property
    def lossiness(self) -> int:
        return lossiness(self) if self.tier is None else self.tier


def choose_tier(per_tier: dict[int, Plan], options: PlannerOptions) -> Plan:
    """From the fastest plan of each lossiness tier, the most exact one that is at most
    ``max_lossless_slowdown`` times slower than the fastest of them all."""
    fastest = min(p.predicted_step_ms for p in per_tier.values())
    limit = fastest * max(1.0, options.max_lossless_slowdown) + 1e-12
    return next(per_tier[t] for t in sorted(per_tier) if per_tier[t].predicted_step_ms <= limit)


def prunable(per_tier: dict[int, Plan], tier: int, floor_ms: float, options: PlannerOptions) -> bool:
    """Whether a configuration of ``tier`` can be skipped: a more exact tier already has a plan
    that :func:`choose_tier` takes whatever the fastest plan turns out to be. ``floor_ms`` is a
    lower bound on every plan's time (the least base time of all the configurations, lossier
    tiers included: those may be faster than this one, and the limit is relative to the fastest)."""
    exact = [p.predicted_step_ms for t, p in per_tier.items() if t < tier]
    return bool(exact) and min(exact) <= floor_ms * max(1.0, options.max_lossless_slowdown)


def lossiness(config, profile: ModelProfile | None = None) -> int:
    """How far a configuration (or a Plan) moves training from the exact fp32 step: its state
    precision's lossiness plus each lever's (:meth:`memtune.levers.Lever.lossiness`; with
    ``profile``, for that model: :meth:`~memtune.levers.Lever.lossiness_for`). Unit decisions
    change no number."""
    return STATE_PRECISIONS[config.optimizer.state_dtype].lossiness + sum(
        LEVERS[name].lossiness(value) if profile is None else LEVERS[name].lossiness_for(value, profile)
        for name, value in config.variant.choices)


def configs(profile: ModelProfile, options: PlannerOptions) -> list[Config]:
    """Every outer configuration the options allow and the profile recorded, in a fixed order.
    Raises :class:`~memtune.errors.UnrecordedPlanError` for an explicit request the profile
    cannot price."""
    optimizers = [o for name in (options.optimizer_names or (profile.optimizer,))
                  for o in _optimizer_choices(profile, options, name)]
    recorded_steps = set(profile.recorded_variants)
    B = profile.batch_size
    G = options.global_batch_size or B
    variants = [(v, math.prod(lever.accumulation_steps(v[name], B, G) for name, lever in LEVERS.items()))
                for v in combinations({name: lever.plan_choices(profile, options, profile.recorded_choices(name))
                                       for name, lever in LEVERS.items()})
                if v.for_step() in recorded_steps]
    out = [Config(opt, v, steps, tier=lossiness(Config(opt, v), profile)) for opt in optimizers for v, steps in variants
           if profile.optimizer_step(*opt.key, variant=v) is not None]
    if not out:
        raise UnrecordedPlanError("no configuration the options allow was recorded in the profile; widen the options "
                                  "or re-profile with a memtune.PlanSpace that covers them")
    return out


def _optimizer_choices(profile: ModelProfile, options: PlannerOptions, name: str) -> list[OptimizerPlan]:
    recorded = [o for o in profile.optimizer_steps if o.name == name and o.variant.is_default]
    if not recorded:
        have = sorted({o.name for o in profile.optimizer_steps}) or ["none"]
        raise UnrecordedPlanError(
            f"the profile recorded no {name} optimizer (recorded: {', '.join(have)}): a plan may only choose an "
            f"optimizer whose step was measured. Re-profile with memtune.profile(..., "
            f"space=memtune.PlanSpace(optimizers=({name!r},))), or plan with optimizer=None to keep {profile.optimizer}")
    dtypes = options.state_dtypes
    if dtypes is None:
        dtypes = tuple(d for d in STATE_DTYPES if any(o.state_dtype == d for o in recorded))
    else:
        missing = [d for d in dtypes if not any(o.state_dtype == d for o in recorded)]
        if missing:
            raise UnrecordedPlanError(
                f"the profile did not record {name} with {'/'.join(missing)} state"
                + (f" ({name} keeps its state as profiled)" if name not in FAMILIES else
                   f"; re-profile with memtune.profile(..., space=memtune.PlanSpace(state_dtypes={tuple(dtypes)}))"))
    lo, hi = options.ns_range(name)
    explicit = options.min_ns_steps is not None or options.max_ns_steps is not None
    out = []
    for dt in dtypes:
        have = sorted(o.ns_steps for o in recorded if o.state_dtype == dt)
        want = [k for k in range(lo, hi + 1)]
        ns_values = [k for k in want if k in have]
        if len(ns_values) < len(want):
            if explicit or not orthogonalizes(name):
                missing = [k for k in want if k not in have]
                if orthogonalizes(name):
                    raise UnrecordedPlanError(
                        f"the profile did not record {name} ({dt} state) with {missing} NS steps (recorded: {have}); "
                        f"re-profile with memtune.profile(..., space=memtune.PlanSpace(ns_steps={tuple(want)}))")
                ns_values = have
            else:  # the default floor was not recorded: the closest recorded count above it, else below
                above = [k for k in have if k >= lo]
                ns_values = [above[0] if above else have[-1]]
        for k in ns_values:
            rec = profile.optimizer_step(name, dt, k)
            out.append(OptimizerPlan(name=name, ns_steps=k, state_dtype=dt, muon_params=rec.muon_params,
                                     adamw_params=rec.adamw_params, settings=rec.settings))
    return out


def costs_for(profile: ModelProfile, config: Config, options: PlannerOptions) -> CostTable:
    return cost_table(profile, optimizer=config.optimizer, variant=config.variant,
                      grad_accum_steps=config.grad_accum_steps, device=options.device)


def offload_allowed(profile: ModelProfile, options: PlannerOptions) -> bool:
    """Activation OFFLOAD only means something when the target has memory apart from the host:
    on a CPU target, "offloading" to host memory frees nothing, so it is never planned there."""
    return options.activation_offload and profile.target != "cpu"


def host_limit(profile: ModelProfile, options: PlannerOptions) -> float:
    """Host bytes a plan may pin (``inf``: no limit, or a CPU target, whose device is the host)."""
    if options.host_budget is None or profile.target == "cpu":
        return float("inf")
    return float(options.host_budget)


def unit_choices(profile: ModelProfile, options: PlannerOptions, unit: str | None = None) -> tuple[Decision, ...]:
    """Decisions a unit may take: RECOMPUTE only where the profiler found recomputation safe
    (``UnitProfile.recompute_blocker``), OFFLOAD only where it frees device memory."""
    recompute = unit is None or not profile.unit(unit).recompute_blocker
    return ((Decision.SAVE,) + ((Decision.RECOMPUTE,) if recompute else ())
            + ((Decision.OFFLOAD,) if offload_allowed(profile, options) else ()))


def tokens_per_sample(sample: str) -> int | None:
    """``T`` when the first tensor of a profiled sample (:func:`memtune.batching.describe`) is
    integer token ids of shape ``(B, T)``."""
    from memtune.batching import described_tensors

    tensors = described_tensors(sample)
    if not tensors:
        return None
    shape, dtype = tensors[0]
    return shape[1] if len(shape) == 2 and re.fullmatch(r"u?int(8|16|32|64)", dtype) else None


def make_plan(profile: ModelProfile, budget: Budget, config: Config, decisions: dict[str, Decision], *, planner: str,
              options: PlannerOptions, notes: tuple[str, ...] = (), table: CostTable | None = None,
              save_ops: dict[str, tuple[str, ...]] | None = None) -> Plan:
    """A Plan whose predicted peak and time come from memory_model and cost_model (``save_ops``:
    the save set of each SELECTIVE unit)."""
    decisions = {u.fqn: decisions.get(u.fqn, Decision.SAVE) for u in profile.units}
    save_ops = {f: tuple(ops) for f, ops in (save_ops or {}).items() if decisions.get(f) is Decision.SELECTIVE}
    draft = Plan(budget_bytes=budget.budget_bytes, usable_bytes=budget.usable_bytes, decisions=decisions,
                 save_ops=save_ops,
                 optimizer=config.optimizer, variant=config.variant, grad_accum_steps=config.grad_accum_steps,
                 planner=planner, profile_hash=fingerprint(profile), target=profile.target_name, notes=tuple(notes),
                 samples_per_step=options.global_batch_size or profile.batch_size,
                 tokens_per_sample=tokens_per_sample(profile.sample))
    memory = predict_peak(profile, draft)
    table = table or costs_for(profile, config, options)
    time = apply_decisions(table, decisions, save_ops)
    return Plan(**{**_fields(draft), "predicted_peak_bytes": memory.peak_bytes, "memory": memory,
                   "predicted_step_ms": _round_ms(time.total_ms), "time": time,
                   "unit_costs": unit_costs(profile, config, decisions, save_ops, table)})


def unit_costs(profile: ModelProfile, config: Config, decisions: dict[str, Decision],
               save_ops: dict[str, tuple[str, ...]], table: CostTable) -> dict[str, UnitCost]:
    """Per unit, what its decision keeps, recomputes or offloads (bytes of the step the
    configuration replays) and the time it adds."""
    tm, _ = timeline_for(profile, config)
    out = {}
    for k, u in enumerate(plan_recording(profile, config).units):
        d = decisions.get(u.fqn, Decision.SAVE)
        saved = u.saved_activation_bytes
        ms = table.added_ms(u.fqn, d, save_ops.get(u.fqn, ()))
        if d is Decision.SELECTIVE:
            pol = tm.policies[k][tm.level_of(k, save_ops[u.fqn]) - 1]
            out[u.fqn] = UnitCost(saved_bytes=saved, kept_bytes=pol.kept_bytes + pol.cached_bytes,
                                  recomputed_bytes=max(0, saved - pol.kept_bytes), added_ms=ms)
        elif d is Decision.RECOMPUTE:
            out[u.fqn] = UnitCost(saved_bytes=saved, recomputed_bytes=saved, added_ms=ms)
        elif d is Decision.OFFLOAD:
            out[u.fqn] = UnitCost(saved_bytes=saved, offloaded_bytes=saved, added_ms=ms)
        else:
            out[u.fqn] = UnitCost(saved_bytes=saved, kept_bytes=saved)
    return out


def fingerprint(profile: ModelProfile) -> str:
    """``profile.fingerprint``, computed once per profile object (it serializes the whole
    profile: ~0.3 s at 1000 units, longer than the MILP) and kept on the profile."""
    fp = profile.__dict__.get("_fingerprint")
    if fp is None:
        fp = profile.__dict__["_fingerprint"] = profile.fingerprint
    return fp


def timeline_for(profile: ModelProfile, config: Config) -> tuple[TimelineModel, ConfigConstants]:
    """The timeline a configuration replays (its step variant's recording) and its constants
    (its recorded optimizer step)."""
    recording = plan_recording(profile, config)
    tm = timeline_model(recording)
    return tm, tm.constants(plan_optimizer_memory(recording, config))


def _round_ms(x: float) -> float:
    return float(f"{x:.12g}")


def _fields(plan: Plan) -> dict:
    return {f: getattr(plan, f) for f in plan.__dataclass_fields__}
