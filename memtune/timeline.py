"""The one home of the step-memory rules: a recorded step's timeline, replayed under a plan.

:func:`memtune.predict_peak` and both planners evaluate plans here. A profile records, for each
interval between the events of a plain step (no recomputation), the live bytes at its start and
its peak, and every activation storage autograd saved, with where it was created and freed and
which units hold it. A plan changes that timeline in exactly these ways:

* **RECOMPUTE** unit *u*: a storage that only non-SAVE units hold (and that no non-SAVE unit
  takes as a checkpoint input) is dropped from the end of its holders' forward until the
  first holder's backward starts. There the unit's forward runs again: the recompute peak is
  *u*'s measured forward transient on top of what is live at that moment, before the
  storages it restores are back. Inputs of *u* that nobody else saved are kept alive by the
  checkpoint from the end of its forward until its backward ends. A storage that several units
  hold is also absent after the holders whose backward runs first are done with it (their
  backward has ended), if every holder still to come drops it, until the next one's backward,
  which restores it: ResNet's stage output, saved by the stage's closing ReLU and by the next
  stage, is freed after the next stage's backward when the stage recomputes, so its recompute
  does not count it beside the copy it makes.
* **OFFLOAD** unit *u*: as RECOMPUTE, but the storages come back by copy (no transient), all
  at its backward start (:mod:`memtune.offload`); a storage it saves that another unit or code
  outside the units saves too is never freed, and its copy lives beside it from *u*'s backward
  start to its end.
* **SELECTIVE** unit *u* with save set *k* (:mod:`memtune.selective`): as RECOMPUTE for the
  storages whose producing op is outside the save set; those its save set produced stay (and
  no other holder can drop them); the checkpoint's cache holds the save set's other outputs
  (see :meth:`TimelineModel._drop_rows`); the recompute peak is the partial forward's transient.
* **Written buffers** (batch norm's running statistics; :mod:`memtune.stateful`): the trainer's
  snapshot of them is live for the whole step; a RECOMPUTE or SELECTIVE unit also holds a copy of
  the buffers inside it from its forward start to its backward end, and one more while it
  recomputes (in its transient).
* **Optimizer**: the state bytes of the plan's optimizer configuration replace the profiled
  optimizer's for the whole step, and the optimizer-step intervals carry the plan's measured
  step temporaries instead (both from :class:`~memtune.profile.OptimizerStepProfile`); an
  optimizer step in backward adds each parameter's update temporaries at its ``step`` event.
* **Levers** (:mod:`memtune.levers`): the plan is replayed on the step recorded as its step
  variant runs it (:meth:`~memtune.profile.ModelProfile.recording`).

The rules are written once, as **peak rows** (:class:`TimelineModel`), in the style of
``torch/distributed/_tools/sac_ilp.py``. Variables, per plan:

* the decision columns ``z``: ``R_u`` (RECOMPUTE), ``O_u`` (OFFLOAD) and ``Q_{u,k}`` (SELECTIVE with
  save set *k*), at most one per unit; ``x_u`` (not SAVE) is their sum;
* ``e_g`` = 1 if group *g* is dropped: a group merges the storages that share holders (with the
  level from which each holder drops them), checkpoint-input units, caching columns, drop window
  ``[lo, hi)`` (empty when only the restore is saved) and restoring unit; a storage has a group
  per window (:meth:`TimelineModel._windows`). [Eligibility] per holder *h* that must drop it,
  ``e_g`` ≤ the sum of *h*'s columns
  that drop it; ``e_g ≤ 1 − x_v`` for every unit *v* taking it as a checkpoint input, and
  ``e_g ≤ 1 −`` the sum of the selective columns whose save set caches it;
* ``D_i`` = net bytes dropped in interval *i*. [Drops] ``D = cumsum(Δ · [e; z])``: a group adds its
  bytes at ``lo`` and removes them at ``hi``; a non-SAVE unit's unsaved inputs, and what a
  selective column's cache holds, count negative over their windows.

[Peak rows] each row *j* is ``value_j = const_j − P_j · [e; D]``, active always or only when its
unit recomputes (``gate_j``): one row per interval outside the optimizer step (its peak with
nothing dropped, less ``D_i``), per in-backward parameter update (live bytes plus that
update's temporaries, less ``D_i``), per unit's recompute (live bytes at its backward start plus
its forward transient, less ``D`` there and what it restores; one per recomputing column) and per optimizer-step interval
(constant). The predicted peak is the largest active row. ``peak`` and ``breakdown`` evaluate
the rows with ``e`` at the bound the eligibility rows allow (dropping only lowers rows); the
exact planner hands the very same matrices to HiGHS.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import scipy.sparse as sp

from .errors import UnrecordedPlanError
from .plan import Decision, MemoryBreakdown, OptimizerPlan
from .profile import ModelProfile, StepEvent
from .variant import StepVariant

__all__ = ["ConfigConstants", "OptimizerMemory", "TimelineModel", "UnitChoices", "UnrecordedPlanError", "optimizer_memory",
           "plan_optimizer_memory", "plan_recording", "recording_for", "timeline_model"]


class UnitChoices(NamedTuple):
    """What a planner decided for the units of one configuration."""

    decisions: dict[str, Decision]
    save_ops: dict[str, tuple[str, ...]]
    """The save set of each SELECTIVE unit."""


@dataclass(frozen=True, slots=True)
class OptimizerMemory:
    state_bytes: int
    """State held on the device for the whole step."""
    step_transient_bytes: int
    """Temporaries of the optimizer step after backward (0 when it steps in backward)."""
    param_step_bytes: dict[str, int] | None = None
    """Per parameter, the temporaries of its update in backward."""
    host_bytes: int = 0
    """State kept in host memory instead."""
    stream_bytes: int = 0
    """Device bytes the offloaded state's stream holds through backward (counted at every row)."""


def optimizer_memory(recording: ModelProfile, opt: OptimizerPlan, variant: StepVariant | None = None) -> OptimizerMemory:
    """State and step temporaries of ``opt`` (stepped as ``variant`` says), as recorded on
    ``recording``'s model. The profiled configuration on the profiled step uses the step in the
    timeline itself."""
    variant = variant or StepVariant()
    rec = recording.optimizer_step(*opt.key, variant=variant)
    if rec is None:
        have = ", ".join(f"{o.name}/{o.state_dtype}/ns{o.ns_steps}" for o in recording.optimizer_steps
                         if o.variant == variant.for_optimizer())
        raise UnrecordedPlanError(
            f"the profile did not record optimizer {opt.name} with {opt.state_dtype} state and {opt.ns_steps} NS steps "
            f"({variant.for_optimizer().describe()}; recorded: {have or 'none'}); re-profile with memtune.profile(..., "
            f"space=memtune.PlanSpace(optimizers=({opt.name!r},), ns_steps=({max(opt.ns_steps, 1)},))) so its memory "
            "is measured")
    if rec.profiled and recording.variant.for_step().is_default:  # the profiled configuration on the profiled step
        ev = recording.timeline
        i = next(i for i, e in enumerate(ev) if e.name == StepEvent.OPTIM_START)
        return OptimizerMemory(recording.optimizer_state_bytes, ev[i].peak_bytes - ev[i].live_bytes)
    if rec.param_step_bytes:
        return OptimizerMemory(rec.state_bytes, 0, dict(rec.param_step_bytes), rec.host_state_bytes, rec.stream_bytes)
    return OptimizerMemory(rec.state_bytes, rec.step_transient_bytes, None, rec.host_state_bytes)


def recording_for(profile: ModelProfile, variant: StepVariant | None = None) -> ModelProfile:
    """The recorded step a plan with ``variant`` replays."""
    variant = variant or StepVariant()
    try:
        return profile.recording(variant)
    except KeyError:
        wanted = variant.for_step()
        raise UnrecordedPlanError(
            f"the profile did not record the step with {wanted.describe()}; re-profile with memtune.profile(..., "
            f"space=memtune.PlanSpace(levers={{{', '.join(f'{k!r}: ({v!r},)' for k, v in wanted.to_dict().items())}}}))"
        ) from None


def plan_recording(profile: ModelProfile, plan) -> ModelProfile:
    """:func:`recording_for` a :class:`~memtune.plan.Plan` (or a planner's configuration)."""
    return recording_for(profile, plan.variant)


def plan_optimizer_memory(recording: ModelProfile, plan) -> OptimizerMemory:
    return optimizer_memory(recording, plan.optimizer, plan.variant)


# ----------------------------------------------------------------------------- rows
ROW_INTERVAL, ROW_RECOMPUTE, ROW_PARAM_STEP, ROW_OPTIMIZER = 0, 1, 2, 3
"""Kinds of peak row; within one interval they are compared in this order (ties keep the first)."""


class ConfigConstants:
    """What one optimizer configuration fixes on a timeline, before any unit decision: the
    constant of every peak row."""

    __slots__ = ("const", "fixed_peak", "state_bytes", "host_bytes", "delta", "stream_bytes")

    def __init__(self, *, const: np.ndarray, fixed_peak: float, state_bytes: int, host_bytes: int, delta: float,
                 stream_bytes: int = 0):
        self.stream_bytes = stream_bytes
        self.const = const
        """Per peak row: its value with nothing dropped."""
        self.fixed_peak = fixed_peak
        """Peak of the optimizer step: no unit decision changes it."""
        self.state_bytes = state_bytes
        self.host_bytes = host_bytes
        self.delta = delta
        """The configuration's state bytes less the recording's."""


class TimelineModel:
    """The decision-independent structure of one recorded step (build with :func:`timeline_model`):
    the eligibility, drop and peak rows of the module docstring.

    Decisions are columns ``z`` (one-hot per unit, all zero for SAVE): ``R_u`` (full recompute,
    column ``u``), ``O_u`` (offload, ``N + u``) and ``Q_{u,k}`` (selective recompute with the
    unit's ``k``-th save set, :mod:`memtune.selective`; from ``2N``). A column's *level* says how
    much it drops: ``Q_{u,k}`` drops the storages whose producing op is outside save set ``k``
    (level ``k``); ``R_u`` and ``O_u`` drop everything (level ``K_u + 1``). The public methods also
    take the vectors ``x`` (non-SAVE), ``r`` (recomputes) and ``s`` (selective level, 0: none)."""

    def __init__(self, profile: ModelProfile):
        p = self.profile = profile
        ev = p.timeline
        self.n = len(ev)
        self.fqns = [u.fqn for u in p.units]
        self.N = len(self.fqns)
        self._events(ev)
        # The runtime's copies of the buffers the step writes (memtune.stateful): the trainer's
        # snapshot for the whole step; a recomputed unit's copy of its own, held from its forward
        # to its backward, and one more while it recomputes (per recomputing column, below). A
        # profile without per-buffer sizes counts three copies of all of them throughout.
        self.unit_written = np.zeros(self.N)
        """Bytes of the written buffers inside each unit (:func:`memtune.units.inside_unit`)."""
        sizes = p.written_buffer_sizes
        if len(sizes) == len(p.written_buffers) and sizes:
            from .units import inside_unit

            copies = p.written_buffer_bytes
            self.unit_written = np.array([sum(b for n, b in zip(p.written_buffers, sizes) if inside_unit(f, n))
                                          for f in self.fqns], dtype=np.float64)
        else:
            copies = 3 * p.written_buffer_bytes
        self.live += copies
        self.peak_b += copies
        self._columns(p)
        self._offload_copies(p)
        self._groups(p)
        self._drop_rows()
        self._peak_rows()
        self.static = p.param_bytes + p.buffer_bytes + p.workspace_bytes + copies
        self.base_state = p.optimizer_state_bytes
        self.grad = np.array([e.grad_bytes for e in ev], dtype=np.float64)
        self.recomputable = np.array([not u.recompute_blocker for u in p.units], dtype=bool)
        self.offload_host_bytes = np.array([u.saved_activation_bytes for u in p.units], dtype=float)
        """Pinned host bytes each unit's OFFLOAD takes: what it saves for backward, all of it on
        the host at once when forward ends."""

    # ------------------------------------------------------------------ structure
    def _events(self, ev) -> None:
        """Where each unit's forward ends and its backward starts and ends."""
        fs: dict[str, int] = {}
        fe: dict[str, int] = {}
        bs: dict[str, int] = {}
        for i, e in enumerate(ev):
            if e.name == StepEvent.FWD_START and e.unit not in fs:
                fs[e.unit] = i
            elif e.name == StepEvent.FWD_END and e.unit not in fe:
                fe[e.unit] = i
            elif e.name == StepEvent.BWD_START and e.unit not in bs:
                bs[e.unit] = i
        self._fe, self._bs = fe, bs
        self.is_opt = np.zeros(self.n, dtype=bool)
        start = next(i for i, e in enumerate(ev) if e.name == StepEvent.OPTIM_START)
        end = next(i for i, e in enumerate(ev) if e.name == StepEvent.OPTIM_END)
        self.is_opt[start:end] = True
        self.bs = np.array([bs.get(f, -1) for f in self.fqns], dtype=np.int64)
        self.fe = np.array([fe.get(f, -1) for f in self.fqns], dtype=np.int64)
        self.fs = np.array([fs.get(f, -1) for f in self.fqns], dtype=np.int64)
        # A unit's backward ends at the next backward boundary after its start (its bwd_end,
        # another unit's bwd_start, or the end of backward); in-backward "step" events do not end it.
        bounds = np.array([i for i, e in enumerate(ev) if e.name in (StepEvent.BWD_START, StepEvent.BWD_END,
                                                                    StepEvent.BWD_DONE, StepEvent.OPTIM_START)]
                          + [self.n], dtype=np.int64)
        self.be = np.where(self.bs >= 0, bounds[np.searchsorted(bounds, self.bs, side="right")], -1)
        self.live = np.array([e.live_bytes for e in ev], dtype=np.float64)
        self.peak_b = np.array([e.peak_bytes for e in ev], dtype=np.float64)
        self.step_idx = np.array([i for i, e in enumerate(ev) if e.name == StepEvent.PARAM_STEP], dtype=np.int64)
        self.step_params = [ev[i].unit for i in self.step_idx]

    def _columns(self, p: ModelProfile) -> None:
        """The decision columns: R and O per unit, then each unit's selective levels."""
        from .selective import cache_lifetimes, last_saving_op, recompute_transient, deepest_saving_level, unit_policies

        N = self.N
        pol = unit_policies(p)
        self.policies = [pol.get(f, ()) for f in self.fqns]
        """Per unit, its selective candidates (level k is ``policies[u][k-1]``)."""
        self.K = np.array([len(x) for x in self.policies], dtype=np.int64)
        self.q_start = 2 * N + np.concatenate([[0], np.cumsum(self.K)[:-1]]).astype(np.int64) if N else \
            np.zeros(0, dtype=np.int64)
        self.C = 2 * N + int(self.K.sum())
        col_unit = np.concatenate([np.arange(N), np.arange(N)] + [np.full(k, u) for u, k in enumerate(self.K)])
        col_level = np.concatenate([self.K + 1, self.K + 1] + [np.arange(1, k + 1) for k in self.K])
        self.col_unit = col_unit.astype(np.int64)
        self.col_level = col_level.astype(np.int64)
        self.X = sp.csr_matrix((np.ones(self.C), (self.col_unit, np.arange(self.C))), shape=(N, self.C))
        """``x = X @ z``: unit u is not SAVE."""
        ft = np.array([u.fwd_transient_bytes for u in p.units], dtype=np.float64)
        self.col_transient = ft[self.col_unit] if N else np.zeros(0)
        """Transient of each recomputing column: the unit's forward transient (R), or that of the
        partial forward a selective column runs (:func:`memtune.selective.recompute_transient`)."""
        self.cached = np.zeros(self.C)
        """Per selective column: cached outputs backward does not need, which its recomputation consumes."""
        self.held = np.zeros(self.C)
        """Per selective column: cached outputs backward does not need that its recomputation never
        reaches (they live until the unit's backward ends)."""
        for u, pols in enumerate(self.policies):
            for k, pol in enumerate(pols):
                col = self.q_start[u] + k
                self.cached[col], self.held[col] = cache_lifetimes(p.units[u], pol.save_ops)
                self.col_transient[col] = recompute_transient(p.units[u], pol.save_ops)
        # A recomputation runs on one more copy of the buffers its unit writes.
        recomputing = np.ones(self.C, dtype=bool)
        recomputing[N:2 * N] = False  # OFFLOAD columns restore by copy
        self.col_written = np.where(recomputing, self.unit_written[self.col_unit], 0.0) if N else np.zeros(0)
        """Per column: the bytes of the copy of its unit's written buffers it holds from the unit's
        forward start to its backward end (recomputing columns; :mod:`memtune.stateful`)."""
        self.col_transient = self.col_transient + self.col_written
        # Per storage: (producing unit, deepest level of that unit whose save set keeps it).
        self._kept_until: dict[int, tuple[int, int]] = {}
        self.extended: list[tuple[int, float, int, int]] = []
        """(column, bytes, from, to): a storage that backward needs but the unit does not hold
        (the next unit's input, or what code outside the units saves), kept by the column's cache
        from where a plain step frees it to the unit's backward end; and an OFFLOAD column's copy
        of a storage others keep too (:meth:`_offload_copies`)."""
        for u, unit in enumerate(p.units):
            if not self.K[u]:
                continue
            rank = deepest_saving_level(unit, self.policies[u])
            last = last_saving_op(unit)
            for i, op in enumerate(unit.ops):
                # The recomputation consumes the cached call (at the unit's backward start) or
                # stops before it (the cache holds it to the backward end).
                end = int(self.bs[u]) if i <= last else int(self.be[u])
                for sid in op.storages:
                    if not rank[i]:
                        continue
                    self._kept_until[sid] = (u, rank[i])
                    st = p.storages[sid]
                    if unit.fqn not in st.holders and self.fe[u] >= 0 and end > st.freed + 1:
                        for k in range(rank[i]):
                            col = int(self.q_start[u]) + k
                            self.extended.append((col, float(st.nbytes), int(st.freed) + 1, end))
                            if i <= last:  # live until the recomputation consumes it
                                self.col_transient[col] += st.nbytes

    def _offload_copies(self, p: ModelProfile) -> None:
        """An OFFLOAD unit copies back, at its backward start, every storage it saved but its
        inputs; one that another unit or code outside the units also saves was never freed, so
        its copy lives beside it until the unit's backward ends (:mod:`memtune.offload`): an
        :attr:`extended` window of the O column."""
        for u, unit in enumerate(p.units):
            if self.bs[u] < 0 or self.fe[u] < 0:
                continue
            inputs = set(unit.input_storages)  # kept as they are, not copied
            for sid in unit.saved_storages:
                st = p.storages[sid]
                if sid not in inputs and (st.saved_outside or any(h != unit.fqn for h in st.holders)):
                    self.extended.append((self.N + u, float(st.nbytes), int(self.bs[u]), int(self.be[u])))

    def columns(self, x: np.ndarray, r: np.ndarray, s: np.ndarray | None = None) -> np.ndarray:
        """The decision columns ``z`` of vectors ``x`` (non-SAVE), ``r`` (recomputes) and ``s``
        (selective level; ``None``: none)."""
        N = self.N
        z = np.zeros(self.C)
        x = np.asarray(x) > 0.5
        r = np.asarray(r) > 0.5
        sel = np.zeros(N, dtype=np.int64) if s is None else np.asarray(s, dtype=np.int64)
        q = x & (sel > 0)
        z[np.nonzero(x & r & ~q)[0]] = 1.0
        z[N + np.nonzero(x & ~r & ~q)[0]] = 1.0
        qu = np.nonzero(q)[0]
        z[self.q_start[qu] + sel[qu] - 1] = 1.0
        return z

    def _groups(self, p: ModelProfile) -> None:
        """Storages that are dropped together, and the eligibility pairs: per (group, holder) the
        holder's columns that drop it (``HP``), per (group, blocker) the columns that keep it
        (``BP``: every column of a unit that takes it as a checkpoint input; the selective columns
        of the unit whose save set caches it)."""
        index = {f: k for k, f in enumerate(self.fqns)}
        fe, bs = self._fe, self._bs
        inputs_of: dict[int, list[int]] = {}
        for k, u in enumerate(p.units):
            for sid in u.input_storages:
                inputs_of.setdefault(sid, []).append(k)
        groups: dict[tuple, int] = {}
        for sid, s in enumerate(p.storages):
            if s.saved_outside or not s.holders:
                continue
            holders = tuple(sorted({index[h] for h in s.holders if h in index}))
            blockers = tuple(sorted(set(inputs_of.get(sid, ()))))
            if len(holders) != len(set(s.holders)):
                continue  # a holder outside the units: never dropped
            producer, deepest = self._kept_until.get(sid, (-1, 0))
            cache = (producer, deepest) if producer >= 0 and producer not in holders else (-1, 0)
            outside = tuple(v for v in blockers if v not in holders)
            for later, lo, hi, restorer in self._windows(s, holders, blockers):
                thresholds = tuple((h, deepest + 1 if h == producer else 1) for h in later)
                key = (thresholds, outside, cache, lo, hi, restorer, holders)
                groups[key] = groups.get(key, 0) + s.nbytes
        keys = sorted(groups)
        self.G = G = len(keys)
        self.g_bytes = np.array([groups[k] for k in keys], dtype=np.float64)
        self.g_lo = np.array([k[3] for k in keys], dtype=np.int64)
        self.g_hi = np.array([k[4] for k in keys], dtype=np.int64)
        self.g_restorer = np.array([k[5] for k in keys], dtype=np.int64)
        self.g_holders = [k[6] for k in keys]
        """Per group: every unit that holds its storages (those that must drop it, and those done with it)."""
        self.g_blockers = [k[1] for k in keys]
        hp_rows, hp_cols, self.hp_group = [], [], []
        bp_rows, bp_cols, self.bp_group = [], [], []
        for g, (thresholds, blockers, cache, *_rest) in enumerate(keys):
            for h, t in thresholds:
                row = len(self.hp_group)
                self.hp_group.append(g)
                cols = [h, self.N + h] + [int(self.q_start[h]) + k - 1 for k in range(t, int(self.K[h]) + 1)]
                hp_rows += [row] * len(cols)
                hp_cols += cols
            for v in blockers:
                row = len(self.bp_group)
                self.bp_group.append(g)
                cols = [v, self.N + v] + [int(self.q_start[v]) + k for k in range(int(self.K[v]))]
                bp_rows += [row] * len(cols)
                bp_cols += cols
            if cache[0] >= 0:
                row = len(self.bp_group)
                self.bp_group.append(g)
                cols = [int(self.q_start[cache[0]]) + k for k in range(cache[1])]
                bp_rows += [row] * len(cols)
                bp_cols += cols
        self.hp_group = np.array(self.hp_group, dtype=np.int64)
        self.bp_group = np.array(self.bp_group, dtype=np.int64)
        self.HP = sp.csr_matrix((np.ones(len(hp_rows)), (hp_rows, hp_cols)), shape=(len(self.hp_group), self.C))
        self.BP = sp.csr_matrix((np.ones(len(bp_rows)), (bp_rows, bp_cols)), shape=(len(self.bp_group), self.C))
        self.H = _incidence(self.g_holders, G, self.N)
        # Inputs a checkpoint keeps although nobody saved them (negative drops).
        unsaved = np.zeros(self.N)
        for k, u in enumerate(p.units):
            if u.fqn in fe and u.fqn in bs:
                extra = sum(u.input_storage_bytes) - sum(p.storages[i].nbytes for i in u.input_storages)
                unsaved[k] = max(0, extra)
        self.unsaved = unsaved

    def _windows(self, s, holders: tuple[int, ...], blockers: tuple[int, ...]):
        """Where storage ``s`` can be absent: ``(later, lo, hi, restorer)`` per window, dropped if
        every unit of ``later`` drops it (and no other unit keeps it). With its holders in the
        order their backward runs, the first window has them all drop it, from the end of their
        forwards to the first one's backward. The original lives on while any holder still needs
        it; once the first ``k`` holders are done with it (their backward has ended, whether they
        kept it or recomputed their own copy), the remaining ones, if all of them drop it, leave
        it absent up to the next one's backward, which restores it. Such a window may be empty
        (the earlier holders' backward ends where the next one's starts): it still restores, so
        the recomputation does not count the original beside its copy. A window is skipped when
        one of ``later`` keeps the storage as a checkpoint input."""
        fe, bs = self._fe, self._bs
        fqn = self.fqns
        order = sorted(holders, key=lambda h: bs.get(fqn[h], s.freed))
        for k in range(len(order)):
            later = order[k:]
            if set(later) & set(blockers):
                continue  # a holder whose checkpoint keeps it
            if k == 0:
                fes = [fe[fqn[h]] for h in later if fqn[h] in fe]
                if not fes:
                    return
                lo = max(max(fes), s.created + 1)
                hi = min(min(bs.get(fqn[h], s.freed) for h in later), s.freed)
            else:
                if any(fqn[h] not in fe or fqn[h] not in bs for h in order):
                    return
                lo = max([int(self.be[h]) for h in order[:k]] + [fe[fqn[h]] for h in later] + [s.created + 1])
                hi = min(bs[fqn[order[k]]], s.freed)
            restorer = next((h for h in later if bs.get(fqn[h]) == hi), -1)
            if lo < hi or (lo == hi and restorer >= 0):
                yield tuple(sorted(later)), lo, hi, restorer

    def _drop_rows(self) -> None:
        """[Drops] ``Δ`` ((n+1) × (G+C) over ``[e; z]``): ``D = cumsum(Δ · [e; z])[:n]``. A group
        adds its bytes at ``lo`` and removes them at ``hi``; every column of a unit with unsaved
        checkpoint inputs counts them negative from the unit's forward end to its backward end,
        and so does a selective column with the outputs its save set caches for nothing: until its
        recomputation consumes them (:attr:`cached`; its transient counts them from there) or,
        for calls after the recomputation stops, until its backward ends (:attr:`held`); and,
        from where a plain step frees them, with the cached outputs that only others saved
        (:attr:`extended`)."""
        G, n, C = self.G, self.n, self.C
        cu = self.col_unit
        rows, cols, vals = [self.g_lo, self.g_hi], [np.arange(G), np.arange(G)], [self.g_bytes, -self.g_bytes]
        unsaved = self.unsaved[cu] if C else np.zeros(0)
        for amount, start, end in ((unsaved, self.fe, self.be), (self.cached, self.fe, self.bs),
                                   (self.held, self.fe, self.be), (self.col_written, self.fs, self.be)):
            ok = np.nonzero((start[cu] >= 0) & (self.bs[cu] >= 0) & (amount > 0))[0] if C else np.zeros(0, int)
            rows += [start[cu[ok]], end[cu[ok]]]
            cols += [G + ok, G + ok]
            vals += [-amount[ok], amount[ok]]
        if self.extended:
            col, nbytes, start, end = (np.array(v) for v in zip(*self.extended))
            rows += [start.astype(np.int64), end.astype(np.int64)]
            cols += [G + col.astype(np.int64)] * 2
            vals += [-nbytes, nbytes]
        self.delta = sp.csr_matrix((np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))),
                                   shape=(n + 1, G + C))

    def _peak_rows(self) -> None:
        """[Peak rows] in interval order, each interval's rows in ``ROW_*`` order; a unit has one
        recompute row per recomputing column (R, then its selective levels)."""
        n, G, N = self.n, self.G, self.N
        by_bs: dict[int, list[int]] = {}
        for k in range(N):
            if self.bs[k] >= 0:
                by_bs.setdefault(int(self.bs[k]), []).append(k)
        by_step: dict[int, list[int]] = {}
        for j, i in enumerate(self.step_idx):
            by_step.setdefault(int(i), []).append(j)
        kind, event, ref, gate = [], [], [], []
        for i in range(n):
            if self.is_opt[i]:
                kind.append(ROW_OPTIMIZER), event.append(i), ref.append(i), gate.append(-1)
                continue
            kind.append(ROW_INTERVAL), event.append(i), ref.append(i), gate.append(-1)
            for k in by_bs.get(i, ()):
                for col in [k] + [int(self.q_start[k]) + q for q in range(int(self.K[k]))]:
                    kind.append(ROW_RECOMPUTE), event.append(i), ref.append(k), gate.append(col)
            for j in by_step.get(i, ()):
                kind.append(ROW_PARAM_STEP), event.append(i), ref.append(j), gate.append(-1)
        self.row_kind = np.array(kind, dtype=np.int64)
        self.row_event = np.array(event, dtype=np.int64)
        self.row_ref = np.array(ref, dtype=np.int64)
        """Per row: the interval (interval, optimizer rows), the unit (recompute) or the update (step)."""
        m = len(kind)
        self.row_gate = np.array(gate, dtype=np.int64)
        """Per row: the decision column that activates it (-1: always active)."""
        self.gated_rows = np.nonzero(self.row_gate >= 0)[0]
        self.gate_cols = self.row_gate[self.gated_rows]
        # P over [e (G); D (n)]: D at the row's interval (not for constant optimizer rows), plus
        # the bytes a recomputing unit restores.
        varying = np.nonzero(self.row_kind != ROW_OPTIMIZER)[0]
        rows = [varying]
        cols = [G + self.row_event[varying]]
        vals = [np.ones(len(varying))]
        rc_rows: dict[int, list[int]] = {}
        for r in np.nonzero(self.row_kind == ROW_RECOMPUTE)[0]:
            rc_rows.setdefault(int(self.row_ref[r]), []).append(int(r))
        restored = [(r, g) for g, u in enumerate(self.g_restorer) if u >= 0 for r in rc_rows.get(int(u), ())]
        if restored:
            rr, gg = np.array(restored, dtype=np.int64).T
            rows.append(rr)
            cols.append(gg)
            vals.append(self.g_bytes[gg])
        self.P = sp.csr_matrix((np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))), shape=(m, G + n))
        self.rc_rows = np.nonzero(self.row_kind == ROW_RECOMPUTE)[0]
        """Every recompute row."""

    # ------------------------------------------------------------------ per configuration
    def constants(self, opt: OptimizerMemory) -> ConfigConstants:
        # The stream's buffers are held through backward only; counting them at every row keeps
        # the forward rows on the safe side (they peak below backward's in these plans).
        delta = opt.state_bytes + opt.stream_bytes - self.base_state
        if len(self.step_idx) and opt.param_step_bytes is None:
            raise ValueError("an in-backward recording needs the optimizer's per-parameter recording")
        per_param = opt.param_step_bytes or {}
        i, kind, ref = self.row_event, self.row_kind, self.row_ref
        const = np.empty(len(kind))
        const[:] = self.peak_b[i] + delta  # ROW_INTERVAL
        opt_rows = kind == ROW_OPTIMIZER
        const[opt_rows] = self.live[i[opt_rows]] + delta + opt.step_transient_bytes
        rc = kind == ROW_RECOMPUTE
        const[rc] = self.live[i[rc]] + delta + self.col_transient[self.row_gate[rc]]
        st = kind == ROW_PARAM_STEP
        const[st] = self.live[i[st]] + delta + np.array([per_param.get(self.step_params[j], 0) for j in ref[st]],
                                                        dtype=np.float64)
        fixed = float(const[opt_rows].max()) if opt_rows.any() else 0.0
        return ConfigConstants(const=const, fixed_peak=fixed, state_bytes=opt.state_bytes, host_bytes=opt.host_bytes,
                               delta=delta, stream_bytes=opt.stream_bytes)

    # ------------------------------------------------------------------ evaluation
    def dropped(self, z: np.ndarray) -> np.ndarray:
        """[Eligibility] ``e`` for decision columns ``z``, at the bound its rows allow."""
        uncovered = (self.HP @ z < 0.5).astype(np.float64)
        blocked = (self.BP @ z > 0.5).astype(np.float64)
        bad = np.bincount(self.hp_group, weights=uncovered, minlength=self.G)[:self.G]
        bad = bad + np.bincount(self.bp_group, weights=blocked, minlength=self.G)[:self.G]
        return (bad == 0).astype(np.float64)

    def drops(self, z: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(e per group, D per interval) for decision columns ``z``."""
        e = self.dropped(z)
        D = np.cumsum(self.delta @ np.concatenate([e, z]))[:self.n]
        return e, D

    def values(self, cc: ConfigConstants, z: np.ndarray) -> np.ndarray:
        """Every peak row's value under decision columns ``z``; rows whose column is off are ``-inf``."""
        e, D = self.drops(z)
        vals = cc.const - self.P @ np.concatenate([e, D])
        vals[self.gated_rows[z[self.gate_cols] <= 0.5]] = -np.inf
        return vals

    def row_values(self, cc: ConfigConstants, x: np.ndarray, r: np.ndarray, s: np.ndarray | None = None) -> np.ndarray:
        """:meth:`values` of vectors ``x`` (non-SAVE), ``r`` (RECOMPUTE) and ``s`` (selective level)."""
        return self.values(cc, self.columns(x, r, s))

    def peak(self, cc: ConfigConstants, x: np.ndarray, r: np.ndarray, s: np.ndarray | None = None) -> float:
        """Predicted peak bytes of decisions ``x`` (non-SAVE) / ``r`` (RECOMPUTE) / ``s`` (selective level)."""
        return float(self.row_values(cc, x, r, s).max())

    def host_bytes(self, cc: ConfigConstants, x: np.ndarray | None = None, r: np.ndarray | None = None) -> float:
        """Host bytes a plan puts in host memory: the optimizer state it offloads (the
        configuration's) and the activations of its OFFLOAD units (``x`` and not ``r``; without
        them, none: what the configuration pins by itself). Zero on a CPU target, whose device
        memory is host memory."""
        if self.profile.target == "cpu":
            return 0.0
        if x is None:
            return float(cc.host_bytes)
        off = (np.asarray(x) > 0.5) & ~(np.asarray(r) > 0.5)
        return float(cc.host_bytes) + float(self.offload_host_bytes[off].sum())

    def breakdown(self, cc: ConfigConstants, x: np.ndarray, r: np.ndarray, s: np.ndarray | None = None, *,
                  reserve_bytes: int) -> MemoryBreakdown:
        """The peak of :meth:`peak` (its first row, in interval order), with what is live there by category."""
        z = self.columns(x, r, s)
        vals = self.values(cc, z)
        j = int(np.argmax(vals))
        i, kind, ref = int(self.row_event[j]), int(self.row_kind[j]), int(self.row_ref[j])
        e, D = self.drops(z)
        nonact = self.static + self.base_state + self.grad[i]
        act = self.live[i] - nonact - D[i]
        rc = opt_tmp = other = 0.0
        phase = _phase(self.profile.timeline[i].name)
        if kind == ROW_OPTIMIZER:
            act, phase = self.live[i] - nonact, "optimizer"
            opt_tmp = vals[j] - self.live[i] - cc.delta
        elif kind == ROW_INTERVAL:
            other = self.peak_b[i] - self.live[i]
        elif kind == ROW_RECOMPUTE:
            act -= float((self.P[j, :self.G] @ e).item())
            rc = self.col_transient[self.row_gate[j]]
            phase = f"recompute:{self.fqns[ref]}"
        else:
            opt_tmp = vals[j] + D[i] - self.live[i] - cc.delta
            phase = f"optimizer-in-backward:{self.step_params[ref]}"
        return MemoryBreakdown(
            peak_bytes=int(math.ceil(vals[j])), params_bytes=int(self.static), grads_bytes=int(self.grad[i]),
            optimizer_state_bytes=int(cc.state_bytes), saved_activation_bytes=int(act),
            recompute_transient_bytes=int(rc), optimizer_transient_bytes=int(opt_tmp), other_transient_bytes=int(other),
            stream_bytes=int(cc.stream_bytes), reserve_bytes=reserve_bytes, phase=phase,
            host_bytes=int(self.host_bytes(cc, x, r)))

    def indicators(self, decisions: dict[str, Decision], save_ops: dict[str, tuple[str, ...]] | None = None
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(x, r, s) vectors of a decision dict and the save sets of its SELECTIVE units (units it
        omits are SAVE)."""
        x = np.array([decisions.get(f, Decision.SAVE) is not Decision.SAVE for f in self.fqns], dtype=float)
        r = np.array([decisions.get(f, Decision.SAVE) in (Decision.RECOMPUTE, Decision.SELECTIVE)
                      for f in self.fqns], dtype=float)
        s = np.zeros(self.N, dtype=np.int64)
        for u, f in enumerate(self.fqns):
            if decisions.get(f) is Decision.SELECTIVE:
                s[u] = self.level_of(u, (save_ops or {}).get(f, ()))
        return x, r, s

    def level_of(self, u: int, save_ops: tuple[str, ...]) -> int:
        """The selective level of unit ``u`` whose save set is ``save_ops``."""
        want = tuple(sorted(save_ops))
        for k, pol in enumerate(self.policies[u], start=1):
            if pol.save_ops == want:
                return k
        have = [list(p.save_ops) for p in self.policies[u]] or "none"
        raise UnrecordedPlanError(
            f"unit {self.fqns[u]!r} is SELECTIVE with save set {list(want)}, which is not one of its candidates "
            f"({have}); re-plan with this profile (memtune.plan) rather than editing the plan's save sets")

    def decisions(self, x: np.ndarray, r: np.ndarray, s: np.ndarray | None = None) -> dict[str, Decision]:
        """The decision dict of (x, r, s) vectors (the inverse of :meth:`indicators`)."""
        def one(k: int) -> Decision:
            if not x[k]:
                return Decision.SAVE
            if s is not None and s[k] > 0:
                return Decision.SELECTIVE
            return Decision.RECOMPUTE if r[k] else Decision.OFFLOAD
        return {f: one(k) for k, f in enumerate(self.fqns)}

    def save_ops(self, x: np.ndarray, s: np.ndarray | None) -> dict[str, tuple[str, ...]]:
        """The save set of every SELECTIVE unit of (x, s)."""
        if s is None:
            return {}
        return {f: self.policies[k][int(s[k]) - 1].save_ops for k, f in enumerate(self.fqns) if x[k] and s[k] > 0}

    def choices(self, x: np.ndarray, r: np.ndarray, s: np.ndarray | None = None) -> UnitChoices:
        """:meth:`decisions` and :meth:`save_ops` of (x, r, s) together."""
        return UnitChoices(self.decisions(x, r, s), self.save_ops(x, s))

    def unpack(self, z: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(x, r, s) of decision columns ``z`` (the inverse of :meth:`columns`)."""
        N = self.N
        on = np.asarray(z) > 0.5
        x = np.zeros(N)
        np.maximum.at(x, self.col_unit[on], 1.0)
        r = on[:N].astype(float)
        s = np.zeros(N, dtype=np.int64)
        q = np.nonzero(on[2 * N:])[0] + 2 * N
        s[self.col_unit[q]] = self.col_level[q]
        r[self.col_unit[q]] = 1.0
        return x, r, s


def timeline_model(recording: ModelProfile) -> TimelineModel:
    """The :class:`TimelineModel` of a recording, built once per profile object (kept on the
    profile itself, so it lives exactly as long as the profile)."""
    tm = recording.__dict__.get("_timeline_model")
    if tm is None:
        tm = recording.__dict__["_timeline_model"] = TimelineModel(recording)
    return tm


def _incidence(rows: list[tuple[int, ...]], G: int, N: int) -> sp.csr_matrix:
    r = [g for g, units in enumerate(rows) for _ in units]
    c = [u for units in rows for u in units]
    return sp.csr_matrix((np.ones(len(r)), (r, c)), shape=(G, N))


def _phase(event: StepEvent) -> str:
    if event.during_forward:
        return "forward"
    if event is StepEvent.LOSS:
        return "loss"
    if event.during_backward:
        return "backward"
    return "optimizer"
