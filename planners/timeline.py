"""The profile's timeline in the form the planners search over.

:func:`memtune.memory_model.predict_peak` is the ground truth. This module restates it as
linear algebra over unit decisions so that (a) the greedy planner can evaluate thousands of
candidate plans per second and (b) the exact planner can write it as a MILP. Notation:

* ``x_u`` = 1 if unit *u* is not SAVE (RECOMPUTE or OFFLOAD), ``r_u`` = 1 if RECOMPUTE;
* a **group** *g* merges the activation storages that share holders, "input-of" units,
  drop window ``[lo, hi)`` and restoring unit; its bytes are dropped over the window iff every
  holder is non-SAVE and no non-SAVE unit takes it as a checkpoint input:
  ``e_g = AND_h x_h AND NOT OR_v x_v``;
* ``D_i`` = net bytes dropped in interval *i* = difference-array prefix sum of the group windows,
  minus the unsaved inputs a checkpoint keeps over ``[fe(u), bs(u))``;
* interval *i* outside the optimizer step peaks at ``c_i - scale·D_i``; the optimizer step's
  intervals are constants of the configuration; a RECOMPUTE unit adds
  ``a_u - scale·(D_bs(u) + R_u)`` where ``R_u`` is what its recompute restores.

:meth:`TimelineModel.peak` evaluates this for a decision vector; tests check it against
``predict_peak``.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

from memtune.memory_model import optimizer_memory, profiled_optimizer_memory
from memtune.profile import ModelProfile

from .options import Config


class TimelineModel:
    """Decision-independent structure of a profile (built once per planning call)."""

    def __init__(self, profile: ModelProfile):
        p = self.profile = profile
        ev = p.timeline
        self.n = n = len(ev)
        self.fqns = [u.fqn for u in p.units]
        self.N = N = len(self.fqns)
        index = {f: k for k, f in enumerate(self.fqns)}
        fe: dict[str, int] = {}
        bs: dict[str, int] = {}
        for i, e in enumerate(ev):
            if e.name == "fwd_end" and e.unit not in fe:
                fe[e.unit] = i
            elif e.name == "bwd_start" and e.unit not in bs:
                bs[e.unit] = i
        self.optim_start = next(i for i, e in enumerate(ev) if e.name == "optim_start")
        self.optim_end = next(i for i, e in enumerate(ev) if e.name == "optim_end")
        self.bs = np.array([bs.get(f, -1) for f in self.fqns], dtype=np.int64)
        self.ft = np.array([u.fwd_transient_bytes for u in p.units], dtype=np.float64)

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
            if len(holders) != len(set(s.holders)) or set(holders) & set(blockers):
                continue  # a holder outside the units, or a holder whose checkpoint keeps it: never dropped
            fes = [fe[h] for h in s.holders if h in fe]
            if not fes:
                continue
            lo = max(max(fes), s.created + 1)
            hi = min(min(bs.get(h, s.freed) for h in s.holders), s.freed)
            if lo >= hi:
                continue
            restorer = next((index[h] for h in s.holders if bs.get(h) == hi), -1)
            key = (holders, blockers, lo, hi, restorer)
            groups[key] = groups.get(key, 0) + s.nbytes
        keys = sorted(groups)
        self.groups = keys
        self.G = G = len(keys)
        self.g_bytes = np.array([groups[k] for k in keys], dtype=np.float64)
        self.g_lo = np.array([k[2] for k in keys], dtype=np.int64)
        self.g_hi = np.array([k[3] for k in keys], dtype=np.int64)
        self.g_restorer = np.array([k[4] for k in keys], dtype=np.int64)
        self.g_holders = [k[0] for k in keys]
        self.g_blockers = [k[1] for k in keys]
        self.H = _incidence(self.g_holders, G, N)
        self.Bk = _incidence(self.g_blockers, G, N)
        # Inputs a checkpoint keeps although nobody saved them (negative drops).
        unsaved = np.zeros(N)
        self.fe = np.array([fe.get(f, -1) for f in self.fqns], dtype=np.int64)
        for k, u in enumerate(p.units):
            if u.fqn in fe and u.fqn in bs:
                extra = sum(u.input_storage_bytes) - sum(p.storages[i].nbytes for i in u.input_storages)
                unsaved[k] = max(0, extra)
        self.unsaved = unsaved
        self.has_unsaved = bool(unsaved.any())

        base_opt = profiled_optimizer_memory(p)
        self.base_opt = base_opt
        self.static = p.param_bytes + p.buffer_bytes
        self.live = np.array([e.live_bytes for e in ev], dtype=np.float64)
        self.peak_b = np.array([e.peak_bytes for e in ev], dtype=np.float64)
        self.grad = np.array([e.grad_bytes for e in ev], dtype=np.float64)
        self.nonact = self.static + base_opt.state_bytes + self.grad
        self.is_opt = np.zeros(n, dtype=bool)
        self.is_opt[self.optim_start:self.optim_end] = True

    # ------------------------------------------------------------------ per configuration
    def constants(self, config: Config) -> "ConfigConstants":
        p = self.profile
        plan_opt = optimizer_memory(p, config.optimizer)
        scale = 1.0
        if config.micro_batch_size is not None and p.batch_size:
            scale = config.micro_batch_size / p.batch_size
        accum = config.grad_accum_steps > 1
        grads = self.grad.copy()
        if accum:
            grads[: self.optim_start] = p.grad_bytes
        plan_nonact = self.static + plan_opt.state_bytes + grads
        c = plan_nonact + (self.peak_b - self.nonact) * scale
        opt_vals = plan_nonact + (self.live - self.nonact) * scale + plan_opt.step_transient_bytes
        fixed = float(opt_vals[self.is_opt].max()) if self.is_opt.any() else 0.0
        a = np.full(self.N, -np.inf)
        ok = self.bs >= 0
        i = self.bs[ok]
        a[ok] = plan_nonact[i] + (self.live[i] - self.nonact[i] + self.ft[ok]) * scale
        return ConfigConstants(scale=scale, c=c, fixed_peak=fixed, a=a)

    # ------------------------------------------------------------------ evaluation
    def drops(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(D per interval, R per unit) for non-SAVE indicator ``x`` (0/1 floats)."""
        n, N = self.n, self.N
        elig = (self.H @ (1.0 - x) == 0) & (self.Bk @ x == 0)
        be = self.g_bytes * elig
        diff = np.bincount(self.g_lo, be, n + 1) - np.bincount(self.g_hi, be, n + 1)
        if self.has_unsaved:
            ok = (self.fe >= 0) & (self.bs >= 0)
            w = self.unsaved[ok] * x[ok]
            diff -= np.bincount(self.fe[ok], w, n + 1)
            diff += np.bincount(self.bs[ok], w, n + 1)
        D = np.cumsum(diff)[:n]
        rmask = self.g_restorer >= 0
        R = np.bincount(self.g_restorer[rmask], be[rmask], N) if N else np.zeros(0)
        return D, R

    def peak(self, cc: "ConfigConstants", x: np.ndarray, r: np.ndarray) -> float:
        """Predicted peak bytes (before rounding up) of decisions ``x`` (non-SAVE) / ``r`` (RECOMPUTE)."""
        D, R = self.drops(x)
        vals = cc.c - cc.scale * D
        best = max(cc.fixed_peak, float(vals[~self.is_opt].max()))
        rc = r > 0.5
        if rc.any():
            idx = np.nonzero(rc & (self.bs >= 0))[0]
            if len(idx):
                best = max(best, float((cc.a[idx] - cc.scale * (D[self.bs[idx]] + R[idx])).max()))
        return best


class ConfigConstants:
    __slots__ = ("scale", "c", "fixed_peak", "a")

    def __init__(self, *, scale: float, c: np.ndarray, fixed_peak: float, a: np.ndarray):
        self.scale = scale
        self.c = c
        """Per interval: its peak with nothing dropped (optimizer intervals included, unused)."""
        self.fixed_peak = fixed_peak
        """Peak of the optimizer step: no unit decision changes it."""
        self.a = a
        """Per unit: the recompute-time peak at its backward start with nothing dropped."""


def _incidence(rows: list[tuple[int, ...]], G: int, N: int) -> sp.csr_matrix:
    r = [g for g, units in enumerate(rows) for _ in units]
    c = [u for units in rows for u in units]
    return sp.csr_matrix((np.ones(len(r)), (r, c)), shape=(G, N))
