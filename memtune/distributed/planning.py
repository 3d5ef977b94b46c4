"""Plans for one rank of a data-parallel job: FSDP2 or DDP, resharding per unit, collectives priced.

    >>> plan = plan_distributed(profile, "24GB", world_size=8, link="nvlink")   # budget per device

``profile`` is recorded at the *local* batch (what one rank feeds). For each candidate layout
(:func:`candidates`) the profile is rewritten as one rank sees it
(:func:`memtune.distributed.memory.per_rank_profile`) and planned by an ordinary planner
(recompute per unit, optimizer configuration); the collectives that layout runs are priced
on a :class:`Link`, and the candidate with the lowest predicted step time that fits wins.
Ties break on the candidate order, so every rank, given the same profile, makes the same plan.

The candidate layouts:

* ``fsdp``, every unit resharded after forward (least memory, a second all-gather in backward);
* ``fsdp``, all but the last unit resharded (torchtitan's default: the last unit's backward
  starts right after its forward, so gathering it again buys nothing);
* ``fsdp``, nothing resharded (one all-gather per unit per step);
* ``hsdp`` (over several nodes, or with a ``shard_size``), the same three on a 2-D mesh: sharded
  within a group of ``shard_size`` ranks (a node), replicated across groups, gradient shards
  all-reduced across them on the link between nodes (:func:`hsdp_comm_seconds`);
* ``ddp``: replicated parameters and state, one gradient all-reduce.

Under ``fsdp`` the optimizer steps on shards: its elementwise time is divided by the ranks.
Muon²/Muon need whole matrices for Newton-Schulz and run as
:class:`memtune.distributed.muon.ShardedMuon2`: each matrix is orthogonalized on one owner rank,
so the step pays the busiest owner's NS time plus every matrix's gather and scatter
(:func:`memtune.distributed.muon.sharded_step_seconds`). Their memory is the recorded optimizer
step scaled to the shards; the owner's whole-matrix NS workspace is not measured (a note says so).
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass

from memtune.budget import Budget
from memtune.cost_model import device_for
from memtune.errors import InfeasibleBudgetError, UsageError
from memtune.levers import parallel_restrictions
from memtune.optimizers import orthogonalizes
from memtune.plan import ParallelPlan, Plan
from memtune.profile import ModelProfile

from .memory import per_rank_profile, unsharded_bytes_by_unit
from .muon import sharded_step_seconds

log = logging.getLogger("memtune.distributed")


@dataclass(frozen=True, kw_only=True, slots=True)
class Link:
    """One interconnect, as the ring collectives see it."""

    bandwidth_gbps: float
    """Bus bandwidth per rank in GB/s (1e9 bytes/s) that a ring all-gather achieves."""
    latency_us: float
    """Per ring hop."""
    overlaps: bool
    """Collectives run on their own stream and hide behind compute (GPUs); ``False``: they
    serialize with compute (gloo on CPU)."""


LINKS: dict[str, Link] = {
    # NVLink 4 (H100 SXM): 450 GB/s per direction; NCCL reaches ~80% of it in ring collectives.
    "nvlink": Link(bandwidth_gbps=360.0, latency_us=10.0, overlaps=True),
    # PCIe 5 x16 between GPUs without NVLink: ~64 GB/s per direction, ~40 GB/s achieved through the host.
    "pcie": Link(bandwidth_gbps=40.0, latency_us=20.0, overlaps=True),
    # InfiniBand NDR, 400 Gb/s per GPU (rail-optimized nodes): ~45 GB/s achieved.
    "infiniband": Link(bandwidth_gbps=45.0, latency_us=30.0, overlaps=True),
    # gloo over loopback TCP between processes on one CPU host (the tests): memory copies, no overlap.
    "loopback": Link(bandwidth_gbps=2.0, latency_us=200.0, overlaps=False),
}
"""Interconnects collectives can be priced on (``plan_distributed(link=...)``)."""


STRATEGIES = ("fsdp", "hsdp", "ddp")

DDP_BUCKET_BYTES = 25 * 2**20
"""``DistributedDataParallel``'s default ``bucket_cap_mb``."""


def candidates(profile: ModelProfile, *, strategies: tuple[str, ...] = STRATEGIES) -> list[tuple[str, dict[str, bool]]]:
    """(strategy, reshard_after_forward per unit) for each layout the planner considers, in tie-break order."""
    units = [u.fqn for u in sorted(profile.units, key=lambda u: u.order)]
    out: list[tuple[str, dict[str, bool]]] = []
    for sharded in ("fsdp", "hsdp"):
        if sharded in strategies:
            out.append((sharded, {u: True for u in units}))
            if len(units) > 1:
                out.append((sharded, {u: u != units[-1] for u in units}))
            out.append((sharded, {u: False for u in units}))
    if "ddp" in strategies:
        out.append(("ddp", {}))
    return out


def parse_links(link: str) -> tuple[str, str | None]:
    """``"nvlink"`` or ``"nvlink,infiniband"`` (within a node, between nodes) -> (intra, inter or None)."""
    names = [x.strip() for x in str(link).split(",") if x.strip()]
    bad = [x for x in names if x not in LINKS]
    if not names or len(names) > 2 or bad:
        raise UsageError(f"link={link!r}: give one link, or two (within a node, between nodes) separated by a comma, "
                         f"from {sorted(LINKS)}")
    return names[0], (names[1] if len(names) == 2 else None)


def hsdp_comm_seconds(profile: ModelProfile, world_size: int, shard_size: int, reshard: dict[str, bool], intra: Link,
                      inter: Link, *, compute_s: float) -> float:
    """Collective time per step of HSDP that compute does not hide: FSDP2's all-gathers and
    reduce-scatters within each group of ``shard_size`` ranks on ``intra``, then an all-reduce of
    each gradient shard across the ``world_size / shard_size`` groups on ``inter``. On an
    overlapping link the first all-gather is exposed and the rest hides behind compute as far as
    it lasts (the two links run at once)."""
    within = comm_seconds(profile, shard_size, "fsdp", reshard, dataclasses.replace(intra, overlaps=False),
                          compute_s=0.0)
    R = world_size // shard_size
    full_by_unit = unsharded_bytes_by_unit(profile, shard_size)
    shard_total = sum(full_by_unit.values()) / shard_size
    across = 2 * (R - 1) / R * shard_total / (inter.bandwidth_gbps * 1e9) \
        + 2 * len(full_by_unit) * inter.latency_us * 1e-6 * (R - 1)
    if not (intra.overlaps and inter.overlaps):
        return within + across
    first = (shard_size - 1) / shard_size * _gather_scale(profile) * max(full_by_unit.values(), default=0) \
        / (intra.bandwidth_gbps * 1e9) \
        + intra.latency_us * 1e-6 * (shard_size - 1)
    return max(first, max(within, across) - compute_s)


def _gather_scale(profile: ModelProfile) -> float:
    """Bytes an FSDP2 all-gather moves per byte of stored parameters: half for the fp32 parameters
    of a ``bf16-mixed`` profile (gathered in bf16), else all."""
    if profile.precision != "bf16-mixed":
        return 1.0
    stored = sum(q.param_bytes for q in profile.params) or 1
    fp32 = sum(q.param_bytes for q in profile.params if q.dtype == "float32")
    return 1.0 - 0.5 * fp32 / stored


def comm_seconds(profile: ModelProfile, world_size: int, strategy: str, reshard: dict[str, bool], link: Link,
                 *, compute_s: float) -> float:
    """Collective time per step that compute does not hide.

    Ring collectives move ``(N-1)/N`` of the full tensor per rank: FSDP2 all-gathers every
    unit in forward, again in backward for the units resharded after forward, and
    reduce-scatters every gradient; DDP all-reduces the gradients (twice the bytes of one
    reduce-scatter). A ``bf16-mixed`` profile runs FSDP2 with ``MixedPrecisionPolicy(param_dtype=bf16,
    reduce_dtype=fp32)``: its all-gathers move fp32 parameters at half their bytes. With an
    overlapping link the first all-gather is exposed and the rest hides behind compute as far as
    compute lasts."""
    N = world_size
    if N <= 1:
        return 0.0
    frac = (N - 1) / N
    full_by_unit = unsharded_bytes_by_unit(profile, N)
    total = sum(full_by_unit.values())
    gather_scale = _gather_scale(profile) if strategy != "ddp" else 1.0
    hop = link.latency_us * 1e-6 * (N - 1)
    bw = link.bandwidth_gbps * 1e9
    if strategy == "ddp":
        seconds = 2 * frac * total / bw + 2 * hop
        # Buckets all-reduce while backward runs; the last one (DDP's 25 MiB cap) starts when it ends.
        first = 2 * frac * min(total, DDP_BUCKET_BYTES) / bw + 2 * hop
    else:
        gathers = gather_scale * (total + sum(b for u, b in full_by_unit.items()
                                              if u is not None and reshard.get(u, True)))
        n_collectives = 2 * len(full_by_unit) + sum(1 for u in full_by_unit if u is not None and reshard.get(u, True))
        seconds = frac * (gathers + total) / bw + n_collectives * hop
        first = frac * gather_scale * max(full_by_unit.values(), default=0) / bw + hop
    if not link.overlaps:
        return seconds
    return max(first, seconds - compute_s)


def plan_distributed(profile: ModelProfile, budget: int | str | Budget, *, world_size: int, link: str = "loopback",
                     strategies: tuple[str, ...] | None = None, planner: str | None = None,
                     reserve: int | str | None = None, nnodes: int = 1, shard_size: int | None = None,
                     **options) -> Plan:
    """The fastest layout-and-plan for one of ``world_size`` ranks whose peak fits ``budget``
    (per device). ``options`` are :class:`memtune.planners.PlannerOptions` fields; the levers
    that do not run across ranks (:func:`memtune.levers.parallel_restrictions`) and activation
    offload stay off.

    Over ``nnodes`` nodes (``link="nvlink,infiniband"``: within a node, between nodes) HSDP is a
    candidate too, sharded within a node (``shard_size``: ``world_size / nnodes`` unless given)
    and replicated across nodes; FSDP2 and DDP over every rank are priced on the slower link."""
    from memtune.planning import plan as make_plan

    if world_size < 2:
        raise UsageError(f"world_size={world_size}: a distributed plan needs at least 2 ranks; use memtune.plan")
    intra_name, inter_name = parse_links(link)
    if nnodes < 1 or world_size % nnodes:
        raise UsageError(f"nnodes={nnodes}: give a number of nodes that divides world_size {world_size}")
    if shard_size is None and nnodes > 1:
        shard_size = world_size // nnodes
    if shard_size is not None and not (1 < shard_size < world_size and world_size % shard_size == 0):
        raise UsageError(f"shard_size={shard_size}: HSDP shards within groups that divide world_size {world_size} "
                         "into groups of 2 or more (e.g. the ranks of one node)")
    intra = LINKS[intra_name]
    inter = LINKS[inter_name or intra_name]
    span = inter if nnodes > 1 else intra   # FSDP2 and DDP rings over every rank cross nodes
    link = intra_name
    name = options.get("optimizer") or profile.optimizer
    names = (name,) if isinstance(name, str) else tuple(name)
    notes: tuple[str, ...] = ()
    if strategies is None:
        strategies = STRATEGIES if shard_size else tuple(x for x in STRATEGIES if x != "hsdp")
    if "hsdp" in strategies and not shard_size:
        raise UsageError("strategy 'hsdp' needs nnodes > 1 or a shard_size (the ranks of one shard group)")
    if {"fsdp", "hsdp"} & set(strategies) and any(orthogonalizes(n) for n in names):
        notes = ("under FSDP2, Muon²/Muon orthogonalize each matrix whole on an owner rank "
                 "(memtune.distributed.muon): its NS and gathers are priced, its whole-matrix NS workspace is "
                 "not in the predicted peak",)
    bad = [s for s in strategies if s not in STRATEGIES]
    if bad:
        raise UsageError(f"unknown strategies {bad}; choose from {STRATEGIES}")
    opts = dict(options)
    opts.update(allow_offload=False, levers={**opts.get("levers", {}), **parallel_restrictions()})
    mixed = "bf16" if profile.precision == "bf16-mixed" else None
    best: tuple[float, int, Plan] | None = None
    errors: list[InfeasibleBudgetError] = []
    for k, (strategy, reshard) in enumerate(candidates(profile, strategies=strategies)):
        group = shard_size if strategy == "hsdp" else world_size   # the ranks a parameter is sharded over
        rank_profile = per_rank_profile(profile, group, "fsdp" if strategy == "hsdp" else strategy, reshard,
                                        mixed_precision=mixed)
        try:
            p = make_plan(rank_profile, budget, planner, reserve=reserve, **opts)
        except InfeasibleBudgetError as e:
            errors.append(e)
            continue
        compute_s = (p.time.forward_ms + p.time.backward_ms + p.time.recompute_ms) / 1e3
        if strategy == "hsdp":
            comm_ms = hsdp_comm_seconds(profile, world_size, shard_size, reshard, intra, inter, compute_s=compute_s) * 1e3
        else:
            comm_ms = comm_seconds(profile, world_size, strategy, reshard, span, compute_s=compute_s) * 1e3
        time = p.time
        if strategy in ("fsdp", "hsdp"):
            # The optimizer steps on shards; Newton-Schulz runs whole on owner ranks of the shard group.
            ns_s, muon_comm_s = sharded_step_seconds(profile, p.optimizer, device_for(profile, opts.get("device")),
                                                     group, intra if strategy == "hsdp" else span)
            time = dataclasses.replace(time, optimizer_ms=time.optimizer_ms / group, ns_ms=ns_s * 1e3)
            comm_ms += muon_comm_s * 1e3
        par = ParallelPlan(world_size=world_size, strategy=strategy, reshard_after_forward=reshard,
                           mixed_precision=mixed, link=link, comm_ms=comm_ms,
                           shard_size=shard_size if strategy == "hsdp" else None,
                           inter_link=inter_name if nnodes > 1 or strategy == "hsdp" else None)
        step_ms = p.predicted_step_ms - p.time.total_ms + time.total_ms + comm_ms
        p = dataclasses.replace(p, parallel=par, time=time, predicted_step_ms=step_ms,
                                profile_hash=profile.fingerprint, notes=notes + p.notes)
        if best is None or p.predicted_step_ms < best[0] - 1e-9:
            best = (p.predicted_step_ms, k, p)
    if best is None:
        lowest = min(errors, key=lambda e: e.min_feasible_bytes or 1 << 62)
        need = lowest.min_feasible_bytes
        consumers = ", ".join(f"{name} {b / 2**20:.2f} MiB" for name, b in lowest.top_consumers[:4])
        raise InfeasibleBudgetError(
            f"no layout fits {world_size} ranks in {Budget.parse(budget, device=profile.target_name, reserve=reserve)} "
            f"per rank (FSDP2 and DDP tried, with every lever allowed across ranks): the most frugal needs "
            f"{need / 2**20:.2f} MiB per rank ({need} bytes)" + (f"; biggest consumers per rank: {consumers}" if consumers
                                                                 else "")
            + "; add ranks, raise the budget, or shrink the local batch", min_feasible_bytes=need,
            top_consumers=lowest.top_consumers,
            suggestions=["add ranks", "raise the per-rank budget", "shrink the local batch"])
    plan = best[2]
    log.info("distributed plan: %s over %d ranks, peak %d per rank, %.1f ms (%.1f ms collectives)",
             plan.parallel.strategy, world_size, plan.predicted_peak_bytes, plan.predicted_step_ms, plan.parallel.comm_ms)
    return plan
