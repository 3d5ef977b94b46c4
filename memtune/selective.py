"""Selective recomputation: which op outputs a recomputed unit keeps, chosen per unit from its
per-op record (:class:`~memtune.profile.OpRecord`).

A unit planned ``SELECTIVE`` runs under ``torch.utils.checkpoint`` with a policy from
``create_selective_checkpoint_contexts``: the outputs of the ops in its save set are kept from
the forward (``MUST_SAVE``), every other op runs again in backward (``PREFER_RECOMPUTE``). What
that keeps and what it costs follows from the per-op record:

* **kept**: every storage an op of the save set allocates, whether backward needs it or not (the
  checkpoint caches the op's outputs, not autograd's choice). Storages backward needs stay from
  the forward to the unit's backward, as if the unit were SAVE; the others (*cached bytes*) are
  held from the unit's forward end to its backward end, where a plain step frees them at once;
* **recomputed**: every other op of the unit, in order, at the unit's backward; its time is the
  ops' share of the unit's forward time, each op priced on the target by a roofline of its
  FLOPs and the bytes it reads and writes (:func:`op_seconds`), so memory-bound elementwise ops
  are not free.

A save set names op *calls*: ``aten.mm.default#2`` is the third ``mm`` of the unit's forward
(the policy counts calls per overload, in the forward and again in the recomputation, as
torchtitan's selective policy counts matmuls). Every op that draws random numbers is one item,
so that a recomputation replays the RNG state through exactly the random ops the forward ran:
all of them recomputed, or all saved. Ops that alias (views), write in place, or allocate a
storage a later op writes in place are never saved: their cached value would not be the one
backward needs.

The candidates of a unit (:func:`policies`) are nested save sets on the greedy Pareto front of
bytes kept against recompute time: items that keep under 1% of the unit's saved bytes are in
every set, the others are ranked by seconds of recomputation avoided per byte kept (items under
0.5% of the unit's op time are never saved), and the candidates are the longest prefixes of
that ranking keeping at most 75%, 50%, 30% and 15% of what the unit saves under SAVE. The
planners choose exactly over these candidates (plus SAVE, full recomputation and offload) and
nothing else: the ranking and the four points are what they prune.
"""

from __future__ import annotations

from dataclasses import dataclass

from .devices import DeviceSpec
from .profile import ModelProfile, OpRecord, UnitProfile

MAX_POLICIES = 4
"""Selective candidates per unit (nested save sets; full recomputation is one more level)."""
RANDOM_CLASS = "<random>"


@dataclass(frozen=True, slots=True)
class SavePolicy:
    """One selective candidate of a unit."""

    save_ops: tuple[str, ...]
    """aten overloads whose outputs are kept (sorted): what the checkpoint policy saves."""
    kept_bytes: int
    """Bytes of storages backward needs that the unit keeps (its saved bytes under SAVE less
    what this candidate drops)."""
    cached_bytes: int
    """Bytes of kept outputs that backward does not need: held only because the policy caches them."""
    recompute_fraction: float
    """Share of the unit's forward op time that runs again in backward."""


def op_seconds(op: OpRecord, spec: DeviceSpec, *, bf16: bool) -> float:
    """Roofline time of one op on ``spec``: the larger of its FLOPs at the matmul rate and its
    bytes at the memory bandwidth, plus one kernel launch (views launch nothing)."""
    if op.view:
        return 0.0
    rate = spec.bf16_flops if bf16 else spec.fp32_flops
    compute = op.flops / (rate * spec.matmul_efficiency) if op.flops else 0.0
    memory = op.io_bytes / (spec.mem_bandwidth * spec.bandwidth_efficiency) if op.io_bytes else 0.0
    return max(compute, memory) + spec.kernel_overhead_s


def op_keys(unit: UnitProfile) -> list[str]:
    """The save-set key of each op of ``unit``: ``name#k`` for the ``k``-th call of that overload in
    the unit's forward (what a counting policy function sees again in the recomputation)."""
    seen: dict[str, int] = {}
    out = []
    for o in unit.ops:
        k = seen.get(o.name, 0)
        seen[o.name] = k + 1
        out.append(f"{o.name}#{k}")
    return out


def _savable(op: OpRecord) -> bool:
    return op.out_bytes > 0 and not (op.view or op.inplace or op.mutated)


def policies(profile: ModelProfile, unit: UnitProfile, spec: DeviceSpec) -> tuple[SavePolicy, ...]:
    """The selective candidates of ``unit``, from the largest save set (keeps most, recomputes
    least) to the smallest; empty without a per-op record or when nothing is worth saving."""
    ops = unit.ops
    if not ops:
        return ()
    bf16 = profile.precision == "bf16-mixed"
    seconds = [op_seconds(o, spec, bf16=bf16) for o in ops]
    total = sum(seconds) or 1.0
    keys = op_keys(unit)
    held = set(unit.saved_storages)
    items: dict[str, list[int]] = {}
    for i, o in enumerate(ops):
        if not o.view:
            items.setdefault(RANDOM_CLASS if o.random else keys[i], []).append(i)
    small = max(1, unit.saved_activation_bytes // 100)
    free, ranked = [], []
    for name, members in items.items():
        if not all(_savable(ops[i]) for i in members):
            continue
        out = sum(ops[i].out_bytes for i in members)
        needed = sum(profile.storages[s].nbytes for i in members for s in ops[i].storages if s in held)
        cached = max(0, out - sum(profile.storages[s].nbytes for i in members for s in ops[i].storages))
        t = sum(seconds[i] for i in members)
        entry = (members, needed, cached, t)
        if out <= small:
            free.append(entry)  # keeping it costs next to nothing: in every save set
        elif t / total >= 0.005:
            ranked.append((-t / out, keys[members[0]], entry))
    ranked.sort(key=lambda r: (r[0], r[1]))
    prefixes = []
    for j in range(len(ranked) + 1):
        chosen = free + [r[2] for r in ranked[:j]]
        kept = sum(c[1] for c in chosen)
        cached = sum(c[2] for c in chosen)
        saved_t = sum(c[3] for c in chosen)
        if not chosen or kept + cached >= unit.saved_activation_bytes:
            continue  # nothing saved, or as much as SAVE keeps: never better
        prefixes.append((kept + cached, chosen, kept, cached, saved_t))
    # Up to MAX_POLICIES points of the front, spread over the bytes kept.
    picked: list = []
    for share in _SHARES[:MAX_POLICIES]:
        fit = [p for p in prefixes if p[0] <= share * unit.saved_activation_bytes]
        if fit and fit[-1] not in picked:
            picked.append(fit[-1])
    picked.sort(key=lambda p: -p[0])
    return tuple(SavePolicy(save_ops=tuple(sorted(keys[i] for c in p[1] for i in c[0])), kept_bytes=p[2],
                            cached_bytes=p[3], recompute_fraction=max(0.0, 1.0 - p[4] / total)) for p in picked)


_SHARES = (0.75, 0.5, 0.3, 0.15)
"""Where on the front the candidates sit: the largest save set keeping at most this share of
what the unit saves."""


def recompute_fractions(profile: ModelProfile, unit: UnitProfile, save_sets, spec: DeviceSpec) -> list[float]:
    """Per save set, the share of ``unit``'s forward op time (priced on ``spec``) that a
    recomputation with it runs again (each op priced once for all of them)."""
    bf16 = profile.precision == "bf16-mixed"
    timed = [(key, op_seconds(o, spec, bf16=bf16), _savable(o)) for key, o in zip(op_keys(unit), unit.ops)]
    total = sum(t for _, t, _ in timed)
    out = []
    for save_ops in save_sets:
        keep = set(save_ops)
        rerun = sum(t for key, t, savable in timed if not (savable and key in keep))
        out.append(rerun / total if total else 1.0)
    return out


def recompute_fraction(profile: ModelProfile, unit: UnitProfile, save_ops: tuple[str, ...], spec: DeviceSpec) -> float:
    """Share of ``unit``'s forward op time (priced on ``spec``) that a recomputation with save
    set ``save_ops`` runs again."""
    return recompute_fractions(profile, unit, [save_ops], spec)[0]


def last_saving_op(unit: UnitProfile) -> int:
    """Index of the last op of ``unit`` for which autograd saves tensors: a recomputation stops
    after it (``torch.utils.checkpoint``'s early stop), so later calls are never run again and
    their cached outputs are never consumed."""
    return max((i for i, o in enumerate(unit.ops) if o.saves), default=len(unit.ops) - 1)


def cache_lifetimes(unit: UnitProfile, save_ops: tuple[str, ...]) -> tuple[int, int]:
    """(consumed, held) bytes of outputs the save set caches although backward does not need
    them: ``consumed`` by calls the recomputation reaches (freed there), ``held`` by calls after
    it stops (freed with the checkpoint, at the unit's backward end)."""
    keep = frozenset(save_ops)
    last = last_saving_op(unit)
    consumed = held = 0
    for i, (key, o) in enumerate(zip(op_keys(unit), unit.ops)):
        if key in keep and _savable(o):
            unneeded = sum(nbytes for nbytes, _, needed in o.allocations if not needed)
            if i <= last:
                consumed += unneeded
            else:
                held += unneeded
    return consumed, held


def recompute_transient(unit: UnitProfile, save_ops: tuple[str, ...]) -> int:
    """Peak bytes a recomputation of ``unit`` with save set ``save_ops`` allocates on top of what
    is live when it starts: the forward's allocations replayed op by op up to where the
    recomputation stops (:func:`last_saving_op`), each freed where the forward freed it; the saved
    calls allocate nothing (their outputs come from the cache), and the cached outputs backward
    does not need are live from the start until the forward freed them. Anchored to the measured
    forward transient: what the per-op replay (with nothing saved) misses of it is added back."""
    last = last_saving_op(unit)

    def replay(keep, stop: int) -> int:
        saved = [key in keep and _savable(o) for key, o in zip(op_keys(unit), unit.ops)]
        frees: dict[int, int] = {}
        live = 0
        for i, (is_saved, o) in enumerate(zip(saved, unit.ops)):
            if is_saved and i <= stop:
                for nbytes, freed, needed in o.allocations:
                    if not needed:  # only the cache holds it, until the recomputation consumes it
                        live += nbytes
                        if freed > 0:
                            frees[freed] = frees.get(freed, 0) + nbytes
        peak = live
        for i, (is_saved, o) in enumerate(zip(saved, unit.ops)):
            if i > stop:
                break
            live -= frees.pop(i, 0)
            if not is_saved:
                for nbytes, freed, _ in o.allocations:
                    live += nbytes
                    if freed > 0:
                        frees[freed] = frees.get(freed, 0) + nbytes
            peak = max(peak, live)
        return peak

    full = unit.fwd_transient_bytes
    if not unit.ops or not any(o.allocations for o in unit.ops):
        return full
    unseen = max(0, full - replay(frozenset(), len(unit.ops)))
    return replay(frozenset(save_ops), last) + unseen


def deepest_saving_level(unit: UnitProfile, policy_set: tuple[SavePolicy, ...]) -> dict[int, int]:
    """Per op index of ``unit``: the deepest level (1-based) whose save set still holds the op's
    outputs (0: no level saves them). Level ``k`` is ``policy_set[k-1]``."""
    out: dict[int, int] = {}
    for i, (key, o) in enumerate(zip(op_keys(unit), unit.ops)):
        deepest = 0
        for k, pol in enumerate(policy_set, start=1):
            if key in pol.save_ops and _savable(o):
                deepest = k
        out[i] = deepest
    return out


def unit_policies(profile: ModelProfile) -> dict[str, tuple[SavePolicy, ...]]:
    """:func:`policies` of every unit that may be recomputed, priced on the profile's own target
    (kept on the profile object: the candidates, and so the plan levels, are fixed per profile)."""
    got = profile.__dict__.get("_save_policies")
    if got is None:
        from .cost_model import device_for

        spec = device_for(profile)
        got = {u.fqn: (policies(profile, u, spec) if not u.recompute_blocker else ()) for u in profile.units}
        profile.__dict__["_save_policies"] = got
    return got


def context_fn(save_ops: tuple[str, ...]):
    """The ``context_fn`` of ``torch.utils.checkpoint.checkpoint`` for a save set: a fresh
    policy per checkpointed call that counts the calls of each overload (separately in the
    forward and in the recomputation, which run the same ops in the same order) and answers
    ``MUST_SAVE`` for the listed calls, ``PREFER_RECOMPUTE`` for the rest."""
    from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

    keep = frozenset(save_ops)

    def make():
        counts: dict[tuple[bool, str], int] = {}

        def policy(ctx, op, *args, **kwargs):
            name = str(op)
            k = counts.get((ctx.is_recompute, name), 0)
            counts[(ctx.is_recompute, name)] = k + 1
            return CheckpointPolicy.MUST_SAVE if f"{name}#{k}" in keep else CheckpointPolicy.PREFER_RECOMPUTE

        return create_selective_checkpoint_contexts(policy)

    return make
