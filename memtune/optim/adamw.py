"""AdamW whose two moments can live in fp32, bf16 or blockwise int8 (:mod:`memtune.optim.quant`).

In fp32 it performs torch.optim.AdamW's single-tensor update (decoupled weight decay,
bias-corrected moments, ε outside the root), which tests/optim check against
``torch.optim.AdamW``. It exists so that the AdamW half of the hybrid optimizer can shrink
its state with the Muon² half, and be re-encoded in place by the runtime re-tuner.
"""

from __future__ import annotations

import math

import torch
from torch.optim import Optimizer

from memtune.optim.quant import StateDtypeMixin, read_state, write_state
from memtune.optim.settings import INT8_DOMAINS, STATE_DTYPES, OptimizerConfigError, check_hyperparameters

EXP_AVG, EXP_AVG_SQ = "exp_avg", "exp_avg_sq"
_BUFFERS = ((EXP_AVG, True), (EXP_AVG_SQ, False))  # (name, signed)


class AdamW(StateDtypeMixin, Optimizer):
    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.01, state_dtype: str = "fp32", *, int8_domain: str = "sqrt"):
        if state_dtype not in STATE_DTYPES:
            raise OptimizerConfigError(f"AdamW state_dtype={state_dtype!r}: use one of {STATE_DTYPES}")
        if int8_domain not in INT8_DOMAINS:
            raise OptimizerConfigError(f"AdamW int8_domain={int8_domain!r}: use one of {INT8_DOMAINS}")
        check_hyperparameters("AdamW", lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, state_dtype=state_dtype,
                        int8_domain=int8_domain)
        super().__init__(params, defaults)

    def _recode_group(self, group: dict, state_dtype: str) -> None:
        for p in group["params"]:
            state = self.state.get(p)
            if not state:
                continue
            for name, signed in _BUFFERS:
                value = read_state(state, name, p.shape, signed=signed, domain=group["int8_domain"])
                write_state(state, name, value, state_dtype, signed=signed, domain=group["int8_domain"])

    def _init_state(self, p: torch.Tensor, group: dict) -> dict:
        """The state a parameter starts with (also what a resumed state is checked against)."""
        state = self.state[p]
        state["step"] = 0
        zeros = torch.zeros_like(p, dtype=torch.float32)  # a DTensor for a sharded (FSDP2) parameter
        for name, signed in _BUFFERS:
            write_state(state, name, zeros.clone(), group["state_dtype"], signed=signed, domain=group["int8_domain"])
        return state

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, (beta1, beta2), eps = group["lr"], group["betas"], group["eps"]
            dtype, domain = group["state_dtype"], group["int8_domain"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = p.grad.float()
                state = self.state[p] if self.state.get(p) else self._init_state(p, group)
                state["step"] += 1
                step = state["step"]
                exp_avg = read_state(state, EXP_AVG, p.shape, signed=True, domain=domain)
                exp_avg_sq = read_state(state, EXP_AVG_SQ, p.shape, signed=False, domain=domain)

                p.mul_(1 - lr * group["weight_decay"])
                exp_avg.lerp_(grad, 1 - beta1)
                exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                step_size = lr / (1 - beta1**step)
                denom = (exp_avg_sq.sqrt() / math.sqrt(1 - beta2**step)).add_(eps)
                p.addcdiv_(exp_avg.to(p.dtype), denom.to(p.dtype), value=-step_size)

                write_state(state, EXP_AVG, exp_avg, dtype, signed=True, domain=domain)
                write_state(state, EXP_AVG_SQ, exp_avg_sq, dtype, signed=False, domain=domain)
        return loss
