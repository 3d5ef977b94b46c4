"""Muon²: Muon with Adam-style second-moment preconditioning before Newton-Schulz.

Liu et al. 2026 (arXiv 2604.09967): dividing Muon's momentum by an RMS estimate of the
gradient, elementwise, before orthogonalizing makes it well conditioned, so 3 NS iterations
do the work of Muon's 5. Per 2-D parameter W with gradient g:

    M ← lerp(M, g, 1 − μ)                        momentum (torch.optim.Muon's form)
    V ← β2·V + (1 − β2)·g²                       second moment (Adafactor row/col factors for Muon²-F)
    U ← lerp(g, M, μ) if nesterov else M         torch.optim.Muon's Nesterov blend
    P ← U / (√V̂ + ε)                              V̂ = V, or V/(1−β2^t) with bias_correction
    O ← NS_K(P)                                  quintic Newton-Schulz in bf16 (newton_schulz.py), input
                                                 scaled by the Gram bound ‖A²‖_F^{1/4} for Muon²
    W ← W·(1 − ηλ) − η·scale(W)·O

With ``precondition=False`` this is exactly ``torch.optim.Muon`` (same NS ops in bf16, same
Nesterov blend, weight decay with the unscaled lr, same ``adjust_lr`` scales), which the
tests check. The paper leaves bias correction, the place of ε and β2 open; the defaults here
are the ones benchmarks/muon2.py measured best (docs/muon2.md).

Parameters of more than 2 dims: a group's ``matrix_view`` says how to see them as matrices.
"flatten" (default, as KellerJordan/Muon does for conv weights) views ``(out, in, kh, kw)``
as ``(out, in·kh·kw)``; "batch" treats ``(..., m, n)`` as a batch of independent matrices
(MoE expert weights). 1-D parameters are refused: give them to AdamW.
"""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Any, Sequence

import torch
from torch.optim import Optimizer

from memtune.optim.newton_schulz import (NS_NORMALIZATIONS, Coeffs, newton_schulz,
                                         newton_schulz_traced, ns_schedule)
from memtune.optim.quant import StateDtypeMixin, read_state, write_state
from memtune.optim.settings import (ADJUST_LR, check_hyperparameters, EPS_MODES, INT8_DOMAINS, STATE_DTYPES, AdaptiveNS,
                                    OptimizerConfigError)

MOMENTUM, SECOND_MOMENT, ROW, COL = "momentum_buffer", "exp_avg_sq", "exp_avg_sq_row", "exp_avg_sq_col"

# Newton-Schulz defaults. Muon (no preconditioning) keeps torch.optim.Muon's quintic, so that
# precondition=False is torch.optim.Muon. Muon²'s won the tuning stage of benchmarks/muon2.py
# (tuning text, small model, 2 seeds): the Gram scaling beat Frobenius on both seeds with either
# schedule, and Keller's quintic beat the minimax schedules under it (docs/muon2.md).
MUON_NS = {"schedule": "keller", "normalize": "frobenius"}
MUON2_NS = {"schedule": "keller", "normalize": "gram"}


def _plain_schedule(coeffs) -> str | tuple:
    """A schedule name stays a name; coefficients become a tuple of floats (or of triples), so
    param groups stay plain data for state_dict."""
    if isinstance(coeffs, str):
        return coeffs
    seq = list(coeffs)
    if seq and isinstance(seq[0], (tuple, list)):
        return tuple(tuple(float(x) for x in c) for c in seq)
    return tuple(float(x) for x in seq)


# ----------------------------------------------------------------------------- pure maths
def shape_scale(rows: int, cols: int, adjust_lr: str) -> float:
    """Per-matrix lr multiplier: √max(1, rows/cols) ("original", Keller Jordan) or
    0.2·√max(rows, cols) ("match_rms_adamw", Moonlight: update RMS ≈ AdamW's)."""
    if adjust_lr == "original":
        return math.sqrt(max(1.0, rows / cols))
    if adjust_lr == "match_rms_adamw":
        return 0.2 * math.sqrt(max(rows, cols))
    raise OptimizerConfigError(f"adjust_lr={adjust_lr!r}: use one of {ADJUST_LR}")


def factored_second_moment(row: torch.Tensor, col: torch.Tensor) -> torch.Tensor:
    """Adafactor's rank-1 estimate ``V̂ = r cᵀ / mean(r)`` from row means ``r`` (..., m) and
    column means ``c`` (..., n) of g²."""
    return row[..., :, None] * col[..., None, :] / row.mean(dim=-1, keepdim=True)[..., None].clamp_min(1e-30)


def denominator(second_moment: torch.Tensor, *, eps: float, eps_mode: str = "outside",
                bias_correction2: float = 1.0) -> torch.Tensor:
    """``√(V/bc2) + ε`` ("outside") or ``√(V/bc2 + ε)`` ("inside"), as a new tensor."""
    if eps_mode == "outside":
        d = second_moment.sqrt()
        if bias_correction2 != 1.0:
            d.div_(math.sqrt(bias_correction2))
        return d.add_(eps)
    if eps_mode == "inside":
        v = second_moment / bias_correction2 if bias_correction2 != 1.0 else second_moment
        return (v + eps).sqrt_()
    raise OptimizerConfigError(f"eps_mode={eps_mode!r}: use one of {EPS_MODES}")


def precondition(update: torch.Tensor, second_moment: torch.Tensor, *, eps: float, eps_mode: str = "outside",
                 bias_correction2: float = 1.0) -> torch.Tensor:
    """``update / (√(V/bc2) + ε)`` ("outside") or ``update / √(V/bc2 + ε)`` ("inside")."""
    return update / denominator(second_moment, eps=eps, eps_mode=eps_mode, bias_correction2=bias_correction2)


def next_ns_steps(k: int, errors: torch.Tensor, rule: dict) -> int:
    """Adaptive-NS rule (:class:`AdaptiveNS`): ``errors[j]`` is the orthogonality error after
    j iterations (max over a batch). Up one if ``X_K`` is off target, down one if ``X_{K-1}``
    was on target, else stay; clamped to [k_min, k_max]."""
    target = rule["target_error"]
    if errors[k] > target:
        k += 1
    elif k >= 1 and errors[k - 1] <= target:
        k -= 1
    return max(rule["k_min"], min(rule["k_max"], k))


def _as_matrix(t: torch.Tensor, view: str) -> torch.Tensor:
    return t.reshape(t.shape[0], -1) if (view == "flatten" and t.ndim > 2) else t


# ----------------------------------------------------------------------------- optimizer shell
def orthogonalize(G: torch.Tensor, steps: int, device: torch.device | None = None, *, traced: bool = False,
                  coeffs, eps: float, dtype: torch.dtype, normalize: str
                  ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Newton-Schulz of ``G`` (:func:`newton_schulz`, or :func:`newton_schulz_traced` with its
    per-iteration errors), run on ``device`` when that is not where ``G`` is: ``G``'s copy in
    ``dtype`` goes there (the first thing NS does on its own is that cast, so the maths is the
    same) and the result comes back. Weight offload's streamed matrices step in host memory and
    orthogonalize on the GPU this way."""
    home = G.device
    moved = device is not None and torch.device(device) != home
    if moved:
        G = G.to(dtype).to(device)
    kw = dict(coeffs=coeffs, eps=eps, dtype=dtype, normalize=normalize)
    ortho, errors = newton_schulz_traced(G, steps, **kw) if traced else (newton_schulz(G, steps, **kw), None)
    if moved:
        ortho = ortho.to(home)
        errors = None if errors is None else errors.to(home)
    return ortho, errors


class Muon2(StateDtypeMixin, Optimizer):
    """Muon² (see module docstring). ``precondition=False`` gives torch.optim.Muon.

    Extra keyword options: ``eps_mode`` ("outside" | "inside"), ``bias_correction`` (bool),
    ``int8_domain`` ("sqrt" | "linear"), ``ns_coefficients`` (a triple, a per-iteration sequence
    of triples, or a name in ``NS_SCHEDULES``), ``ns_normalize`` ("frobenius" | "gram"); both
    ``None`` by default: Muon²'s tuned NS with preconditioning, torch.optim.Muon's without,
    ``ns_eps`` (NS normalization ε),
    ``ns_dtype`` (NS compute dtype, bf16), ``matrix_view`` ("flatten" | "batch"), ``batch_ns``
    (stack same-shape matrices into one batched NS call; ``None``: on accelerators, not on the
    CPU, where one matmul per matrix measured faster: Muon² K=3 step 65 vs 76 ms on the 4×192
    benchmark model's matrices).

    Telemetry: ``ns_telemetry`` maps each parameter's name (from named params, else
    ``"group{i}.param{j}"``) to ``{"ns_steps", "orthogonality_error", "next_ns_steps"}``; it
    is filled when ``adaptive_ns`` is set.
    """

    def __init__(self, params, lr: float = 0.02, momentum: float = 0.95, nesterov: bool = True, beta2: float = 0.99,
                 eps: float = 1e-8, ns_steps: int = 3, weight_decay: float = 0.0, adjust_lr: str = "original",
                 state_dtype: str = "fp32", factorized: bool = False, precondition: bool = True,
                 adaptive_ns: AdaptiveNS | dict | None = None, *, eps_mode: str = "outside",
                 bias_correction: bool = False, int8_domain: str = "sqrt",
                 ns_coefficients: Coeffs | Sequence[Coeffs] | str | None = None, ns_normalize: str | None = None,
                 ns_eps: float = 1e-7, ns_dtype: torch.dtype = torch.bfloat16, matrix_view: str = "flatten",
                 batch_ns: bool | None = None):
        if isinstance(adaptive_ns, AdaptiveNS):
            adaptive_ns = adaptive_ns.as_dict()  # plain dict: state_dict stays loadable with weights_only
        # None: Muon²'s tuned NS with preconditioning, torch.optim.Muon's quintic without it.
        default_ns = MUON2_NS if precondition else MUON_NS
        if ns_coefficients is None:
            ns_coefficients = default_ns["schedule"]
        if ns_normalize is None:
            ns_normalize = default_ns["normalize"]
        defaults = dict(lr=lr, momentum=momentum, nesterov=nesterov, beta2=beta2, eps=eps, ns_steps=ns_steps,
                        weight_decay=weight_decay, adjust_lr=adjust_lr, state_dtype=state_dtype,
                        factorized=factorized, precondition=precondition, adaptive_ns=adaptive_ns,
                        eps_mode=eps_mode, bias_correction=bias_correction, int8_domain=int8_domain,
                        ns_coefficients=_plain_schedule(ns_coefficients), ns_normalize=ns_normalize,
                        ns_eps=ns_eps, ns_dtype=ns_dtype,
                        matrix_view=matrix_view, batch_ns=batch_ns)
        super().__init__(params, defaults)
        for group in self.param_groups:
            self._check_group(group)
        self.ns_telemetry: dict[str, dict[str, Any]] = {}
        self._ns_devices: dict[torch.Tensor, torch.device] = {}
        """Parameters whose Newton-Schulz runs on another device (:meth:`run_ns_on`)."""

    @staticmethod
    def _check_group(group: dict) -> None:
        check_hyperparameters("Muon2", lr=group["lr"], momentum=group["momentum"], beta2=group["beta2"],
                              eps=group["eps"], weight_decay=group["weight_decay"])
        for key, allowed in (("state_dtype", STATE_DTYPES), ("adjust_lr", ADJUST_LR), ("eps_mode", EPS_MODES),
                             ("int8_domain", INT8_DOMAINS), ("matrix_view", ("flatten", "batch")),
                             ("ns_normalize", NS_NORMALIZATIONS)):
            if group[key] not in allowed:
                raise OptimizerConfigError(f"Muon2 {key}={group[key]!r}: use one of {allowed}")
        try:
            ns_schedule(group["ns_coefficients"], 1)
        except ValueError as e:
            raise OptimizerConfigError(f"Muon2 ns_coefficients: {e}") from None
        if group["ns_steps"] < 1 and not group["adaptive_ns"]:
            raise OptimizerConfigError(f"Muon2 ns_steps={group['ns_steps']}: need at least 1")
        for p in group["params"]:
            if p.ndim < 2:
                raise OptimizerConfigError(
                    f"Muon2 optimizes matrices; got a parameter of shape {tuple(p.shape)}. Give 1-D parameters "
                    "(biases, norms) to AdamW, e.g. with memtune.optim.build_optimizer.")
            if torch.is_complex(p):
                raise OptimizerConfigError("Muon2 does not support complex parameters")

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        if hasattr(self, "ns_telemetry"):
            self._check_group(self.param_groups[-1])

    # ---------------------------------------------------------------- state helpers
    def _buffers(self, group: dict) -> list[tuple[str, bool]]:
        """(name, signed) of the buffers stored in ``group``'s state precision."""
        bufs = [(MOMENTUM, True)]
        if group["precondition"] and not group["factorized"]:
            bufs.append((SECOND_MOMENT, False))
        return bufs

    def _init_state(self, p: torch.Tensor, group: dict) -> dict:
        state = self.state[p]
        state["step"] = 0
        g = _as_matrix(p, group["matrix_view"])
        zeros = torch.zeros(g.shape, dtype=torch.float32, device=p.device)
        for name, signed in self._buffers(group):
            write_state(state, name, zeros.clone(), group["state_dtype"], signed=signed, domain=group["int8_domain"])
        if group["precondition"] and group["factorized"]:
            state[ROW] = torch.zeros(g.shape[:-1], dtype=torch.float32, device=p.device)
            state[COL] = torch.zeros(*g.shape[:-2], g.shape[-1], dtype=torch.float32, device=p.device)
        if group["adaptive_ns"]:
            rule = group["adaptive_ns"]
            state["ns_steps"] = max(rule["k_min"], min(rule["k_max"], group["ns_steps"]))
        return state

    def run_ns_on(self, params, device: torch.device | str | None) -> None:
        """Run the Newton-Schulz iterations of ``params`` on ``device`` (their input, in the NS
        dtype, is copied there and the result back; :func:`orthogonalize`); ``None``: where
        each parameter is. Their state and update stay where the parameters are. Not part of
        the state dict: whoever placed the parameters says it again after a restore."""
        for p in params:
            if device is None:
                self._ns_devices.pop(p, None)
            else:
                self._ns_devices[p] = torch.device(device)

    def set_ns_steps(self, ns_steps: int) -> None:
        """Use ``ns_steps`` NS iterations from the next step on (also resets adaptive K)."""
        if ns_steps < 1:
            raise OptimizerConfigError(f"ns_steps={ns_steps}: need at least 1")
        for group in self.param_groups:
            group["ns_steps"] = ns_steps
            for p in group["params"]:
                if "ns_steps" in self.state.get(p, {}):
                    self.state[p]["ns_steps"] = ns_steps

    def _recode_group(self, group: dict, state_dtype: str) -> None:
        for p in group["params"]:
            state = self.state.get(p)
            if not state:
                continue
            shape = _as_matrix(p, group["matrix_view"]).shape
            for name, signed in self._buffers(group):
                value = read_state(state, name, shape, signed=signed, domain=group["int8_domain"])
                write_state(state, name, value, state_dtype, signed=signed, domain=group["int8_domain"])

    def _name(self, gi: int, pi: int, group: dict) -> str:
        names = group.get("param_names")
        return names[pi] if names else f"group{gi}.param{pi}"

    # ---------------------------------------------------------------- step
    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for gi, group in enumerate(self.param_groups):
            self._step_group(gi, group)
        return loss

    def _step_group(self, gi: int, group: dict) -> None:
        mu, beta2, view = group["momentum"], group["beta2"], group["matrix_view"]
        dtype, domain, rule = group["state_dtype"], group["int8_domain"], group["adaptive_ns"]
        precond, factorized = group["precondition"], group["factorized"]
        items = []
        for pi, p in enumerate(group["params"]):
            if p.grad is None:
                continue
            if p.grad.is_sparse:
                raise OptimizerConfigError("Muon2 does not support sparse gradients")
            state = self.state[p] if self.state.get(p) else self._init_state(p, group)
            state["step"] += 1
            items.append((pi, p, state, state["ns_steps"] if rule else group["ns_steps"]))
        if not items:
            return

        # Bucket the NS inputs before computing them, so each update is written straight into its
        # slot of one stacked batch (no torch.stack copy). Tall matrices are stored transposed:
        # NS works on the short-fat orientation anyway, so (768, 192) and (192, 768) share a batch.
        buckets: dict[tuple, list] = defaultdict(list)
        for it in items:
            shape = _as_matrix(it[1], view).shape
            # Batched on accelerators, not on the CPU (nor for matrices in host memory, which
            # weight offload orthogonalizes one at a time, on the device or not).
            if group["batch_ns"] if group["batch_ns"] is not None else it[1].device.type != "cpu":
                tall = shape[-2] > shape[-1]
                short_fat = (*shape[:-2], shape[-1], shape[-2]) if tall else tuple(shape)
                buckets[(short_fat, it[3], it[1].device, self._ns_devices.get(it[1]))].append((it, tall))
            else:
                buckets[(it[0],)].append((it, False))

        ns_kw = dict(coeffs=group["ns_coefficients"], eps=group["ns_eps"], dtype=group["ns_dtype"],
                     normalize=group["ns_normalize"])
        for key, members in buckets.items():
            k = members[0][0][3]
            batch_ns = len(key) > 1
            if batch_ns:
                stacked = torch.empty((len(members), *key[0]), dtype=torch.float32, device=members[0][0][1].device)
                slots = [stacked[j].mT if tall else stacked[j] for j, (_, tall) in enumerate(members)]
            else:
                slots = [None]
            for j, (it, _) in enumerate(members):
                slots[j] = self._preconditioned_update(it[1], it[2], group, out=slots[j])
            if not batch_ns:
                stacked = slots[0]
            ortho, errors = orthogonalize(stacked, k, self._ns_devices.get(members[0][0][1]), traced=bool(rule),
                                          **ns_kw)
            if not batch_ns:
                ortho = ortho[None]
                errors = errors[:, None] if errors is not None else None
            for j, ((pi, p, state, k), tall) in enumerate(members):
                o = ortho[j].mT if tall else ortho[j]
                rows, cols = o.shape[-2], o.shape[-1]
                p.mul_(1 - group["lr"] * group["weight_decay"])
                p.add_(o if o.shape == p.shape else o.reshape(p.shape),
                       alpha=-group["lr"] * shape_scale(rows, cols, group["adjust_lr"]))
                if errors is not None:
                    errs = errors[:, j].reshape(k + 1, -1).amax(dim=1).tolist()
                    state["ns_steps"] = next_ns_steps(k, errs, rule)
                    self.ns_telemetry[self._name(gi, pi, group)] = {
                        "ns_steps": k, "orthogonality_error": errs[k], "next_ns_steps": state["ns_steps"]}

    def _preconditioned_update(self, p: torch.Tensor, state: dict, group: dict,
                               out: torch.Tensor | None) -> torch.Tensor:
        """Update the momentum (and second moment) of ``p`` and return the NS input, written into
        ``out`` when given. In-place ops throughout: one pass per line below."""
        mu, beta2, domain, dtype = group["momentum"], group["beta2"], group["int8_domain"], group["state_dtype"]
        g = _as_matrix(p.grad, group["matrix_view"]).float()
        m = read_state(state, MOMENTUM, g.shape, signed=True, domain=domain)
        m.lerp_(g, 1 - mu)
        if group["nesterov"]:
            update = torch.lerp(g, m, mu, out=out) if out is not None else g.lerp(m, mu)
        else:
            update = out.copy_(m) if out is not None else m.clone()
        write_state(state, MOMENTUM, m, dtype, signed=True, domain=domain)
        if not group["precondition"]:
            return update
        if group["factorized"]:
            g2 = g * g
            state[ROW].mul_(beta2).add_(g2.mean(dim=-1), alpha=1 - beta2)
            state[COL].mul_(beta2).add_(g2.mean(dim=-2), alpha=1 - beta2)
            v = factored_second_moment(state[ROW], state[COL])
        else:
            v = read_state(state, SECOND_MOMENT, g.shape, signed=False, domain=domain)
            v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
            write_state(state, SECOND_MOMENT, v, dtype, signed=False, domain=domain)
        # Newton-Schulz is blind to a positive scale of its input, so the bias correction folds
        # into ε: U/(√(V/bc2)+ε) = √bc2·U/(√V+ε√bc2) and U/√(V/bc2+ε) = √bc2·U/√(V+ε·bc2). The
        # common factor √bc2 is dropped, which saves a pass over the matrix.
        bc2 = 1 - beta2 ** state["step"] if group["bias_correction"] else 1.0
        eps = group["eps"] * (math.sqrt(bc2) if group["eps_mode"] == "outside" else bc2)
        return update.div_(denominator(v, eps=eps, eps_mode=group["eps_mode"]))
