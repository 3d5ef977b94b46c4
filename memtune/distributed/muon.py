"""Muon² on FSDP2-sharded parameters: each matrix orthogonalized whole, on one owner rank.

Newton-Schulz needs the whole matrix, while FSDP2 leaves each rank a dim-0 shard. As in
Moonlight's distributed Muon and Dion, the elementwise part of the step (momentum, Muon²'s
second moment and preconditioning) runs on the local shards; each matrix has an **owner rank**;
the shards of its NS input are gathered there, the owner orthogonalizes it, and the result is
scattered back to the shards, which every rank applies to its own shard. Owners are assigned by
longest-processing-time first on the NS FLOPs of each matrix (``m·n·min(m, n)``), so every rank
orthogonalizes about the same amount; all gathers are issued before any NS runs and all
scatters after, so the ranks run their NS at the same time.

The update equals replicated Muon² on the same gradients up to the order in which the
gradients were summed across ranks (``tests/test_distributed.py``: within 1e-5 relative).
:func:`shard_optimizer` swaps the Muon² parts of a freshly built optimizer for this class when
the plan shards with FSDP2. Its state dict gives each state tensor as a DTensor sharded like its
parameter, so DCP checkpoints save and load it (:meth:`ShardedMuon2.state_dict`).
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import torch
import torch.distributed as dist

from memtune.optim.muon2 import Muon2, _as_matrix, shape_scale
from memtune.optim.newton_schulz import newton_schulz


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


def _global_rank(pg, rank: int) -> int:
    """``rank`` of ``pg`` as the global rank that ``dist.gather``/``dist.scatter`` take."""
    return dist.get_global_rank(pg, rank) if pg else rank


def assign_owners(shapes: list[tuple[int, int]], world_size: int) -> list[int]:
    """Owner rank per matrix: longest NS work first, each to the least-loaded rank (ties: lowest
    index, then lowest rank), so every rank computes the same assignment."""
    load = [0] * world_size
    owners = [0] * len(shapes)
    order = sorted(range(len(shapes)), key=lambda i: (-shapes[i][0] * shapes[i][1] * min(shapes[i]), i))
    for i in order:
        r = min(range(world_size), key=lambda k: (load[k], k))
        owners[i] = r
        load[r] += shapes[i][0] * shapes[i][1] * min(shapes[i])
    return owners


class ShardedMuon2(Muon2):
    """:class:`memtune.optim.Muon2` for parameters that FSDP2 shards on dim 0 (DTensors).
    Same arguments; ``adaptive_ns`` is not supported here."""

    def __init__(self, params, *args, process_group=None, **kwargs):
        super().__init__(params, *args, **kwargs)
        if any(g["adaptive_ns"] for g in self.param_groups):
            raise ValueError("ShardedMuon2 does not support adaptive_ns; give a fixed ns_steps")
        self.process_group = process_group

    def _step_group(self, gi: int, group: dict) -> None:
        """One group's update on the local shards (called by :meth:`Muon2.step`)."""
        pg = self.process_group
        world, rank = dist.get_world_size(pg), dist.get_rank(pg)
        view = group["matrix_view"]
        items = []
        for p in group["params"]:
            if p.grad is None:
                continue
            local_p = _local(p)
            full_shape = _as_matrix(p, view).shape  # DTensors report their global shape
            proxy = SimpleNamespace(grad=_local(p.grad))
            state = self.state[p] if self.state.get(p) else self._init_state(local_p, group, key=p)
            state["step"] += 1
            update = self._preconditioned_update(proxy, state, group, out=None)  # (local rows, cols)
            items.append((p, local_p, full_shape, update))
        if not items:
            return
        owners = assign_owners([tuple(f[-2:]) for _, _, f, _ in items], world)
        # 1. gather each matrix's NS input on its owner (all gathers first)
        gathered: dict[int, list[torch.Tensor]] = {}
        for k, (p, _, full, update) in enumerate(items):
            chunk = math.ceil(full[0] / world)
            padded = update.new_zeros((chunk, *update.shape[1:]))
            padded[:update.shape[0]] = update
            parts = [torch.empty_like(padded) for _ in range(world)] if owners[k] == rank else None
            dist.gather(padded, parts, dst=_global_rank(pg, owners[k]), group=pg)
            if parts is not None:
                gathered[k] = parts
        # 2. orthogonalize the owned matrices
        ns_kw = dict(coeffs=group["ns_coefficients"], eps=group["ns_eps"], dtype=group["ns_dtype"],
                     normalize=group["ns_normalize"])
        ortho: dict[int, torch.Tensor] = {}
        for k, parts in gathered.items():
            full = items[k][2]
            ortho[k] = newton_schulz(torch.cat(parts)[:full[0]], group["ns_steps"], **ns_kw)
        # 3. scatter the results back to the shards, and apply them
        for k, (p, local_p, full, update) in enumerate(items):
            chunk = math.ceil(full[0] / world)
            out = update.new_empty((chunk, *update.shape[1:]))
            parts = None
            if k in ortho:
                o = ortho[k].float()
                padded = o.new_zeros((chunk * world, *o.shape[1:]))
                padded[:o.shape[0]] = o
                parts = list(padded.split(chunk))
            dist.scatter(out, parts, src=_global_rank(pg, owners[k]), group=pg)
            o_local = out[:update.shape[0]]
            local_p.mul_(1 - group["lr"] * group["weight_decay"])
            local_p.add_(o_local.reshape(local_p.shape), alpha=-group["lr"] * shape_scale(full[-2], full[-1],
                                                                                          group["adjust_lr"]))

    def state_dict(self) -> dict:
        """The optimizer's state dict with every state tensor of a sharded parameter given as a
        DTensor sharded like the parameter (its rows on this rank), so
        ``torch.distributed.checkpoint`` writes each row once and can load it at another world
        size. State that is not laid out by the parameter's rows (factorized second moments,
        int8 codes' block scales) cannot be saved that way: :class:`~memtune.errors.CheckpointError`."""
        sd = super().state_dict()
        params = [p for g in self.param_groups for p in g["params"]]
        for idx, st in list(sd["state"].items()):
            p = params[idx]
            if hasattr(p, "device_mesh"):
                sd["state"][idx] = {k: _sharded_like(p, k, v) for k, v in st.items()}
        return sd

    def load_state_dict(self, state_dict: dict) -> None:
        """Load a state dict from :meth:`state_dict` (DTensor state becomes the local rows again)."""
        state = {idx: {k: _local(v) for k, v in st.items()} for idx, st in state_dict["state"].items()}
        super().load_state_dict({**state_dict, "state": state})

    def _init_state(self, p: torch.Tensor, group: dict, key: torch.Tensor | None = None) -> dict:
        """State of the local shard ``p``, kept under the parameter ``key``."""
        state = super()._init_state(p, group)
        if key is not None and key is not p:
            self.state[key] = self.state.pop(p)
            return self.state[key]
        return state


ASSIGNMENTS = ("balanced", "round-robin", "replicated")
"""Ways to place whole-matrix Newton-Schulz across ranks that :func:`ns_layout_seconds` prices:
``balanced`` is :func:`assign_owners` (longest work first to the least-loaded rank, what
:class:`ShardedMuon2` runs); ``round-robin`` gives matrix *i* to rank ``i mod N``; ``replicated``
all-gathers every update to every rank and each rank orthogonalizes every matrix (no scatter), as
data-parallel Muon does when each rank holds a whole copy (Moonlight's recipe before sharding)."""


def ns_layout_seconds(shapes: list[tuple[int, int]], ns_seconds: list[float], world_size: int, link,
                      assignment: str = "balanced", *, bytes_per_element: int = 4) -> tuple[float, float]:
    """(Newton-Schulz seconds on the busiest rank, gather/scatter seconds) of one optimizer step
    of sharded Muon² over matrices of ``shapes`` (whole rows × columns) whose NS alone takes
    ``ns_seconds`` each, on ``world_size`` ranks joined by ``link`` (a
    :class:`memtune.distributed.planning.Link`).

    The collectives run in the optimizer step, after backward, and nothing overlaps them: each
    matrix's fp32 update (dim 0 padded to a multiple of N) is gathered to its owner and the
    result scattered back, each moving ``(N-1)/N`` of the matrix over the link, plus one ring
    latency per collective."""
    N = world_size
    if N <= 1 or not shapes:
        return sum(ns_seconds), 0.0
    if assignment not in ASSIGNMENTS:
        raise ValueError(f"assignment={assignment!r}: use one of {ASSIGNMENTS}")
    frac = (N - 1) / N
    bw = link.bandwidth_gbps * 1e9
    hop = link.latency_us * 1e-6 * (N - 1)
    padded = [math.ceil(r / N) * N * c * bytes_per_element for r, c in shapes]
    if assignment == "replicated":
        return sum(ns_seconds), sum(frac * b / bw + hop for b in padded)
    owners = assign_owners(shapes, N) if assignment == "balanced" else [i % N for i in range(len(shapes))]
    load = [0.0] * N
    for k, o in enumerate(owners):
        load[o] += ns_seconds[k]
    return max(load), sum(2 * (frac * b / bw + hop) for b in padded)


def sharded_step_seconds(profile, optimizer, spec, world_size: int, link) -> tuple[float, float]:
    """(Newton-Schulz seconds on the busiest owner rank, gather/scatter seconds) of ``profile``'s
    Muon² matrices under :class:`ShardedMuon2` (``optimizer``: the plan's
    :class:`~memtune.plan.OptimizerPlan`; zeros when it does not orthogonalize)."""
    from memtune.cost_model import _price_optimizer_step
    from memtune.optimizers import orthogonalizes

    if optimizer is None or not orthogonalizes(optimizer.name) or not optimizer.muon_params:
        return 0.0, 0.0
    per = _price_optimizer_step(profile, optimizer, spec, False, per_param=True)
    muon = set(optimizer.muon_params)
    mats = [q for q in profile.params if q.fqn in muon and len(q.shape) >= 2]
    shapes = [(q.shape[0], math.prod(q.shape[1:])) for q in mats]
    return ns_layout_seconds(shapes, [per[q.fqn][0] for q in mats], world_size, link)


def _sharded_like(p, key: str, v):
    """State tensor ``v`` of the sharded parameter ``p`` (its local rows) as a DTensor placed as
    ``p`` is; scalars and non-tensors as they are."""
    from torch.distributed.tensor import DTensor

    from memtune.errors import CheckpointError

    if not isinstance(v, torch.Tensor) or v.dim() == 0:
        return v
    local = _local(p)
    rows = local.shape[0] if local.dim() else 1
    if v.shape[0] != rows or math.prod(v.shape[1:]) * rows != local.numel():
        raise CheckpointError(
            f"Muon² state {key!r} of shape {tuple(v.shape)} is not laid out by the rows of its sharded parameter "
            f"(local shard {tuple(local.shape)}), so a distributed checkpoint cannot place it: factorized second "
            "moments and int8 state are not checkpointable on FSDP2 shards; use Muon² with fp32 or bf16, "
            "unfactorized state (the default), or DDP")
    shape = (p.shape[0], *v.shape[1:])
    stride = tuple(math.prod(shape[i + 1:]) for i in range(len(shape)))
    return DTensor.from_local(v, p.device_mesh, p.placements, run_check=False, shape=torch.Size(shape), stride=stride)


def _shard_group(opt):
    """The process group a parameter's shards span: its mesh's ``shard`` dimension under HSDP
    (each replica group orthogonalizes its own copy of the same matrices), else ``None`` (all ranks)."""
    for g in opt.param_groups:
        for p in g["params"]:
            mesh = getattr(p, "device_mesh", None)
            if mesh is not None and mesh.ndim == 2:
                return mesh.get_group("shard")
            if mesh is not None:
                return None
    return None


def shard_optimizer(optimizer):
    """``optimizer`` (fresh, no state yet) with every :class:`Muon2` (alone or a part of a
    :class:`memtune.optim.HybridOptimizer`) replaced by a :class:`ShardedMuon2` over the same
    parameter groups and settings."""
    from memtune.optim.hybrid import HybridOptimizer

    def convert(opt):
        if isinstance(opt, Muon2) and not isinstance(opt, ShardedMuon2):
            if opt.state:
                raise ValueError("shard_optimizer needs a fresh optimizer (this one already holds state)")
            return ShardedMuon2([dict(g) for g in opt.param_groups], process_group=_shard_group(opt))
        return opt

    parts = getattr(optimizer, "parts", None)
    if parts is None:
        return convert(optimizer)
    converted = {name: convert(part) for name, part in parts.items()}
    if all(converted[n] is parts[n] for n in parts):
        return optimizer
    return HybridOptimizer(converted)
