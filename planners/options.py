"""What every planner shares: :class:`PlannerOptions`, the outer configuration space
(optimizer state precision × Newton-Schulz steps × micro-batch) and turning a decision set
into a verified :class:`~memtune.plan.Plan`."""

from __future__ import annotations

import weakref
from dataclasses import dataclass

from memtune.budget import Budget
from memtune.cost_model import CostTable, apply_decisions, cost_table
from memtune.devices import DeviceSpec
from memtune.memory_model import predict_peak
from memtune.plan import STATE_DTYPES, Decision, OptimizerPlan, Plan
from memtune.profile import ModelProfile

DEFAULT_MIN_NS_STEPS = {"muon2": 3, "muon": 5, "adamw": 0}
HEAD_NAMES = ("lm_head", "head", "classifier", "score", "output", "wte")


@dataclass(frozen=True, kw_only=True, slots=True)
class PlannerOptions:
    """Knobs of every planner. The budget is the one setting that matters; these bound what a
    planner may change to meet it."""

    optimizer: str = "muon2"
    """``muon2``, ``muon`` or ``adamw``. Use the profiled optimizer (``"adamw"`` for a default
    profile) to keep the profile's measured optimizer memory."""
    min_ns_steps: int | None = None
    """Fewest Newton-Schulz iterations the planner may choose; ``None``: 3 for Muon², 5 for Muon.
    Fewer NS steps are faster and cost no memory, so a time-minimizing plan sits on this floor:
    raise it when update quality matters more than speed."""
    max_ns_steps: int | None = None
    """Most NS iterations (``None``: the floor). Only matters if a future cost model rewards them."""
    state_dtypes: tuple[str, ...] = STATE_DTYPES
    """Optimizer-state precisions allowed, any of ``fp32``, ``bf16``, ``int8``. fp32 is fastest; the
    others are chosen only when memory needs them."""
    allow_offload: bool = False
    """Allow OFFLOAD decisions (saved activations to pinned host memory; priced at PCIe bandwidth).
    Ignored for CPU targets, where host memory *is* the budget."""
    allow_microbatching: bool = False
    """Allow splitting the global batch into micro-batches with gradient accumulation."""
    global_batch_size: int | None = None
    """Samples per optimizer step; ``None``: the profiled batch size."""
    micro_batch_sizes: tuple[int, ...] | None = None
    """Micro-batch sizes to consider (each must divide the global batch); ``None``: every divisor."""
    device: str | DeviceSpec | None = None
    """Device whose rates the cost model uses (a table name, ``"cpu"``, a DeviceSpec, e.g. from
    :func:`memtune.cost_model.calibrate`); ``None``: ``profile.target_name``."""
    time_limit_s: float = 10.0
    """Wall-clock limit of one MILP solve (exact planner); past it the best plan found is used."""
    mip_rel_gap: float = 1e-5
    """Exact planner: stop when the plan's step time is proven within this fraction of the optimum
    (HiGHS's relative MIP gap, taken over the whole predicted step time)."""
    max_exact_units: int = 2000
    """:func:`memtune.planning.plan` uses the greedy planner past this many units."""

    def __post_init__(self) -> None:
        if self.optimizer not in DEFAULT_MIN_NS_STEPS:
            raise ValueError(f"optimizer={self.optimizer!r}: use one of {tuple(DEFAULT_MIN_NS_STEPS)}")
        bad = [d for d in self.state_dtypes if d not in STATE_DTYPES]
        if bad or not self.state_dtypes:
            raise ValueError(f"state_dtypes={self.state_dtypes!r}: use a non-empty subset of {STATE_DTYPES}")
        lo, hi = self.ns_range
        if lo > hi:
            raise ValueError(f"min_ns_steps={lo} exceeds max_ns_steps={hi}")

    @property
    def ns_range(self) -> tuple[int, int]:
        if self.optimizer == "adamw":
            return 0, 0
        lo = self.min_ns_steps if self.min_ns_steps is not None else DEFAULT_MIN_NS_STEPS[self.optimizer]
        hi = self.max_ns_steps if self.max_ns_steps is not None else lo
        return max(1, lo), max(1, hi)


@dataclass(frozen=True, slots=True)
class Config:
    """One point of the outer space; every unit decision is planned inside one."""

    optimizer: OptimizerPlan
    micro_batch_size: int | None
    grad_accum_steps: int

    @property
    def key(self) -> tuple:
        return (self.optimizer.state_dtype, self.optimizer.ns_steps, self.micro_batch_size or 0)


def split_from_profile(profile: ModelProfile, name: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(Muon FQNs, AdamW FQNs), following :func:`memtune.optim.split_parameters`'s rules on the
    profile's parameter table: 1-D, embeddings and the output head go to AdamW."""
    fqns = [p.fqn for p in profile.params]
    if name == "adamw":
        return (), tuple(fqns)
    linears = [p for p in profile.params if p.module_type == "Linear"]
    mod = lambda p: p.fqn.rsplit(".", 1)[0] if "." in p.fqn else ""  # noqa: E731
    heads = {mod(p) for p in linears if mod(p).split(".")[-1] in HEAD_NAMES}
    if not heads:
        vocab = {p.shape[0] for p in profile.params if p.module_type == "Embedding" and p.shape}
        if vocab:
            heads = {mod(p) for p in linears if len(p.shape) == 2 and p.shape[0] in vocab}
        elif linears:
            heads = {mod(linears[-1])}
    muon = tuple(p.fqn for p in profile.params
                 if len(p.shape) >= 2 and p.module_type != "Embedding" and mod(p) not in heads)
    return muon, tuple(f for f in fqns if f not in set(muon))


def configs(profile: ModelProfile, options: PlannerOptions) -> list[Config]:
    """Every outer configuration the options allow, in a fixed order."""
    muon, adamw = split_from_profile(profile, options.optimizer)
    lo, hi = options.ns_range
    B = profile.batch_size or 1
    G = options.global_batch_size or B
    if options.allow_microbatching and profile.batch_size:
        sizes = options.micro_batch_sizes or tuple(d for d in range(1, G + 1) if G % d == 0)
        bad = [m for m in sizes if m < 1 or G % m]
        if bad:
            raise ValueError(f"micro_batch_sizes {bad} do not divide the global batch {G}")
    else:
        sizes = (G,)
    out = []
    for dt in options.state_dtypes:
        for ns in range(lo, hi + 1):
            opt = OptimizerPlan(name=options.optimizer, ns_steps=ns, state_dtype=dt, muon_params=muon, adamw_params=adamw)
            for m in sorted(set(sizes), reverse=True):
                mb = None if (m == B and G == B) else m
                out.append(Config(opt, mb, G // m))
    return out


def costs_for(profile: ModelProfile, config: Config, options: PlannerOptions) -> CostTable:
    return cost_table(profile, optimizer=config.optimizer, micro_batch_size=config.micro_batch_size,
                      grad_accum_steps=config.grad_accum_steps, device=options.device)


def offload_allowed(profile: ModelProfile, options: PlannerOptions) -> bool:
    """OFFLOAD only means something when the target has memory apart from the host: on a CPU
    target, "offloading" to host memory frees nothing, so it is never planned there."""
    return options.allow_offload and profile.target != "cpu"


def unit_choices(profile: ModelProfile, options: PlannerOptions) -> tuple[Decision, ...]:
    return (Decision.SAVE, Decision.RECOMPUTE) + ((Decision.OFFLOAD,) if offload_allowed(profile, options) else ())


def make_plan(profile: ModelProfile, budget: Budget, config: Config, decisions: dict[str, Decision], *, planner: str,
              options: PlannerOptions, notes: tuple[str, ...] = (), table: CostTable | None = None) -> Plan:
    """A Plan whose predicted peak and time come from memory_model and cost_model."""
    decisions = {u.fqn: decisions.get(u.fqn, Decision.SAVE) for u in profile.units}
    draft = Plan(budget_bytes=budget.budget_bytes, usable_bytes=budget.usable_bytes, decisions=decisions,
                 optimizer=config.optimizer, micro_batch_size=config.micro_batch_size,
                 grad_accum_steps=config.grad_accum_steps, planner=planner, profile_hash=fingerprint(profile),
                 target=profile.target_name, notes=tuple(notes))
    memory = predict_peak(profile, draft)
    time = apply_decisions(table or costs_for(profile, config, options), decisions)
    return Plan(**{**_fields(draft), "predicted_peak_bytes": memory.peak_bytes, "memory": memory,
                   "predicted_step_ms": _round_ms(time.total_ms), "time": time})


_FINGERPRINTS: dict[int, tuple[weakref.ref, str]] = {}


def fingerprint(profile: ModelProfile) -> str:
    """``profile.fingerprint``, computed once per profile object (it serializes the whole
    profile: ~0.3 s at 1000 units, longer than the MILP)."""
    hit = _FINGERPRINTS.get(id(profile))
    if hit is not None and hit[0]() is profile:
        return hit[1]
    fp = profile.fingerprint
    _FINGERPRINTS[id(profile)] = (weakref.ref(profile, lambda _, k=id(profile): _FINGERPRINTS.pop(k, None)), fp)
    return fp


def _round_ms(x: float) -> float:
    return float(f"{x:.12g}")


def _fields(plan: Plan) -> dict:
    return {f: getattr(plan, f) for f in plan.__dataclass_fields__}
