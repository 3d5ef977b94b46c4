"""Step an optimizer one parameter at a time: in backward, from host memory, on bf16 weights.

Three plan dimensions change *when* and *where* a parameter is updated, not *how*:

* **optimizer step in backward** (``Plan.optimizer_in_backward``): each parameter is updated
  in its ``register_post_accumulate_grad_hook`` as soon as its gradient is complete, and the
  gradient is freed at once, so full gradients never coexist;
* **optimizer-state offload** (the ``state_offload`` lever): the state lives in (pinned) host
  memory; a parameter's state is copied to the device just before its update and back just
  after, so the device holds one parameter's state at a time;
* **bf16 weights** (the ``weights`` lever): the parameters are stored in bf16. The update is
  computed in fp32 on a one-parameter working copy and written back either with stochastic
  rounding (``"bf16-sr"``: unbiased, no extra memory) or from an fp32 master copy kept with
  the optimizer state (``"bf16-master"``; with offload, in host memory).

:class:`PlanOptimizer` wraps the optimizer the plan names (built by
:func:`memtune.optimizers.build_optimizer_for`) and steps it one parameter at a time by
masking its parameter groups to that one parameter, so the inner optimizer's own update rule,
state layout, LR schedule and ``state_dict`` are used unchanged. The profiler records this very
class under fake tensors; nothing here is modelled.

What in-backward stepping rules out (the planner knows): gradient accumulation over
micro-batches (gradients must persist), and a global gradient-norm clip (every gradient must
exist at once). A step that fails part-way through backward cannot be retried: some
parameters are already updated (:attr:`PlanOptimizer.retry_safe`).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator

import torch
import torch.nn as nn
from torch.optim import Optimizer

from .jsonfile import ValueEnum


class WeightMode(ValueEnum):
    """How a plan stores bf16 weights (``None`` where a plan stores them as profiled)."""

    BF16_SR = "bf16-sr"
    """bf16 parameters; each update is computed in fp32 and rounded stochastically (no extra memory)."""
    BF16_MASTER = "bf16-master"
    """bf16 parameters with an fp32 master copy in the optimizer state (host memory with offload)."""


WEIGHTS = (None, *WeightMode)
"""Parameter storage a plan may choose: as profiled, or one of :class:`WeightMode`."""

MASTER = "master_weight"
"""Key of the fp32 master copy in a parameter's optimizer state (``bf16-master``)."""

_HOST_OBSERVERS: list[Callable[[torch.Tensor], None]] = []
"""Called with every host-resident tensor this module creates; the profiler's recorder listens,
so that host memory is not counted against the device."""


@contextmanager
def observe_host_tensors(callback: Callable[[torch.Tensor], None]) -> Iterator[None]:
    _HOST_OBSERVERS.append(callback)
    try:
        yield
    finally:
        _HOST_OBSERVERS.remove(callback)


def _to_host(t: torch.Tensor, host: torch.Tensor | None, pin: bool) -> torch.Tensor:
    """``t`` copied into host memory, reusing ``host`` when it has the same layout."""
    if host is None or host.shape != t.shape or host.dtype != t.dtype:
        # Meta tensors (the profiler's recordings) stand for device memory; their host copies are meta too.
        host = torch.empty(t.shape, dtype=t.dtype, device="meta" if t.is_meta else "cpu",
                           pin_memory=pin and not t.is_meta)
        for observe in _HOST_OBSERVERS:
            observe(host)
    host.copy_(t, non_blocking=pin)
    return host


def bf16_weight_names(model: nn.Module) -> set[str]:
    """The parameters a bf16-weights plan stores in bf16: every floating parameter except those
    of batch norm, whose affine parameters stay fp32 next to its fp32 running statistics (as
    autocast keeps them; the CPU and cuDNN kernels take bf16 activations with fp32 parameters,
    but refuse bf16 parameters with fp32 statistics)."""
    keep = {id(p) for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
            for p in m.parameters(recurse=False)}
    return {n for n, p in model.named_parameters() if p.is_floating_point() and id(p) not in keep}


def stochastic_round_to_bf16(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """``x`` (fp32) rounded to bf16 stochastically: up with probability equal to the distance
    to the lower neighbour, so the rounding is unbiased (E[round(x)] = x) and updates smaller
    than bf16's resolution still move the weight on average. Adds uniform 16-bit noise below
    bf16's mantissa and truncates; non-finite values pass through unchanged."""
    bits = x.view(torch.int32)
    noise = torch.randint(0, 1 << 16, x.shape, dtype=torch.int32, device=x.device, generator=generator)
    rounded = ((bits + noise) & -65536).view(torch.float32)  # -65536 == 0xFFFF0000 as int32
    return torch.where(torch.isfinite(x), rounded, x).to(torch.bfloat16)


class PlanOptimizer(Optimizer):
    """The plan's optimizer, stepped one parameter at a time (see the module docstring).

    ``param_groups`` and ``state`` are the inner optimizer's own objects, so LR schedulers,
    ``set_state_dtype``/``set_ns_steps`` and checkpoints act on it directly."""

    def __init__(self, inner: Optimizer, model: nn.Module, *, in_backward: bool = False, offload: bool = False,
                 weights: str | None = None, pin_memory: bool | None = None):
        if weights not in WEIGHTS:
            raise ValueError(f"weights={weights!r}: use one of {[str(w) for w in WEIGHTS]}")
        weights = WeightMode(weights) if weights is not None else None
        self.inner = inner
        self.in_backward = in_backward
        self.offload = offload
        self.weights = weights
        self.pin = torch.cuda.is_available() if pin_memory is None else pin_memory
        self.names = {id(p): n for n, p in model.named_parameters()}
        self._index()
        params = [p for g in inner.param_groups for p in g["params"]]
        super().__init__(params, {})
        self.param_groups = inner.param_groups
        self.state = inner.state  # type: ignore[assignment]
        self.defaults = inner.defaults
        self._handles = []
        self._stepped: set[int] = set()
        self.nonfinite: list[str] = []
        """Parameters whose gradient was NaN/inf in the current step (in-backward: not updated)."""
        if in_backward:
            for p in params:
                self._handles.append(p.register_post_accumulate_grad_hook(self._hook))
        if offload:  # the state moves to host memory now, if the inner optimizer already has some
            for p in params:
                self._offload_state(p)

    def _index(self) -> None:
        """Map each parameter to its part and group. ``Optimizer.load_state_dict`` replaces the
        group dicts, so this runs again after a load."""
        self._where: dict[int, tuple[Optimizer, dict]] = {}
        for part in getattr(self.inner, "parts", {"": self.inner}).values():
            for group in part.param_groups:
                for p in group["params"]:
                    self._where[id(p)] = (part, group)

    # ------------------------------------------------------------------ behaviour flags
    @property
    def retry_safe(self) -> bool:
        """Whether a step that failed part-way (an OOM in backward) may be retried: not when
        parameters are updated during backward."""
        return not self.in_backward

    def remove_hooks(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    # ------------------------------------------------------------------ stepping
    def _hook(self, p: torch.Tensor) -> None:
        if not bool(torch.isfinite(p.grad).all()):
            # Never apply a non-finite gradient; the trainer sees the list and stops the run.
            self.nonfinite.append(self.names.get(id(p), "?"))
        else:
            self.step_param(p)
        self._stepped.add(id(p))
        p.grad = None

    @torch.no_grad()
    def step(self, closure=None):
        """Update every parameter with a gradient that backward has not updated already."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in list(group["params"]):
                if id(p) not in self._stepped and p.grad is not None:
                    self.step_param(p)
        self._stepped.clear()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.inner.zero_grad(set_to_none=set_to_none)
        self._stepped.clear()
        self.nonfinite.clear()

    def seed_master(self, p: torch.Tensor, value: torch.Tensor) -> None:
        """Start ``p``'s fp32 master copy (``bf16-master``) from ``value``, e.g. the fp32 weights
        before the model was converted to bf16 (host memory when offloading)."""
        part, _ = self._where[id(p)]
        part.state[p][MASTER] = value.detach().float()
        if self.offload:
            self._offload_state(p)

    @torch.no_grad()
    def step_param(self, p: torch.Tensor) -> None:
        """Update ``p`` alone, with its state brought to the device and put back as configured."""
        part, group = self._where[id(p)]
        state = part.state
        if self.offload and p in state:
            self._load_state(p)
        if self.weights is not None and p.dtype == torch.bfloat16:
            self._step_bf16(part, group, p)
        else:
            with _only(part, group, p, self.names.get(id(p))):
                part.step()
        if self.offload:
            self._offload_state(p)

    def _step_bf16(self, part: Optimizer, group: dict, p: torch.Tensor) -> None:
        """One fp32 update of a bf16 parameter on a working copy, written back by stochastic
        rounding or from the fp32 master. The inner optimizer sees the working copy, with the
        parameter's state re-keyed to it for the duration of the step."""
        state = part.state
        st = state.pop(p, {})
        master = st.pop(MASTER, None)
        work = nn.Parameter(master.to(p.device, torch.float32) if master is not None else p.float(),
                            requires_grad=p.requires_grad)
        work.grad = p.grad.float()
        if st:
            state[work] = st
        try:
            with _only(part, group, work, self.names.get(id(p))):
                part.step()
        finally:
            st = state.pop(work, {})
            state[p] = st
        if self.weights is WeightMode.BF16_MASTER:
            st[MASTER] = work.detach()
            p.copy_(work.detach())
        else:
            p.copy_(stochastic_round_to_bf16(work.detach()))
        del work

    # ------------------------------------------------------------------ offload
    def _offload_state(self, p: torch.Tensor) -> None:
        part, _ = self._where[id(p)]
        st = part.state.get(p)
        if not st:
            return
        hosts = self._hosts(p)
        for k, v in list(st.items()):
            # Only what lives with the parameter moves: e.g. torch.optim keeps its step counter
            # on the CPU whatever the parameter's device.
            if isinstance(v, torch.Tensor) and v is not hosts.get(k) and (k in hosts or v.device == p.device):
                hosts[k] = _to_host(v, hosts.get(k), self.pin)
                st[k] = hosts[k]

    def _load_state(self, p: torch.Tensor) -> None:
        part, _ = self._where[id(p)]
        st = part.state[p]
        hosts = self._hosts(p)
        for k, v in list(st.items()):
            if isinstance(v, torch.Tensor) and v is hosts.get(k):
                st[k] = v.to(p.device, non_blocking=self.pin, copy=True)

    def _hosts(self, p: torch.Tensor) -> dict:
        if not hasattr(self, "_host_buffers"):
            self._host_buffers: dict[int, dict] = {}
        return self._host_buffers.setdefault(id(p), {})

    # ------------------------------------------------------------------ delegation
    def state_dict(self) -> dict:
        return self.inner.state_dict()

    def load_state_dict(self, state_dict: dict) -> None:
        self.inner.load_state_dict(state_dict)
        self.param_groups = self.inner.param_groups
        self._index()
        if self.weights:
            self._restore_saved_dtypes(state_dict)
        if self.offload:
            for g in self.param_groups:
                for p in g["params"]:
                    self._offload_state(p)

    def _restore_saved_dtypes(self, state_dict: dict) -> None:
        """``Optimizer.load_state_dict`` casts floating state to its parameter's dtype; with bf16
        weights the state (and the fp32 master) was fp32 and must stay so."""
        parts = getattr(self.inner, "parts", None)
        pairs = [(state_dict[name], part) for name, part in parts.items()] if parts else [(state_dict, self.inner)]
        for sd, part in pairs:
            for g_sd, g in zip(sd["param_groups"], part.param_groups):
                for pid, p in zip(g_sd["params"], g["params"]):
                    saved = sd["state"].get(pid, {})
                    st = part.state.get(p)
                    if st is None:
                        continue
                    for k, v in saved.items():
                        if isinstance(v, torch.Tensor) and v.is_floating_point() and k in st and st[k].dtype != v.dtype:
                            st[k] = v.to(device=st[k].device)

    def set_state_dtype(self, state_dtype: str) -> None:
        self.inner.set_state_dtype(state_dtype)

    def set_ns_steps(self, ns_steps: int) -> None:
        if hasattr(self.inner, "set_ns_steps"):
            self.inner.set_ns_steps(ns_steps)

    @property
    def ns_telemetry(self) -> dict:
        return getattr(self.inner, "ns_telemetry", {})

    def add_param_group(self, param_group: dict) -> None:
        if getattr(self, "inner", None) is not None and hasattr(self, "_handles"):
            raise ValueError("add parameter groups to the inner optimizer before wrapping it")
        super().add_param_group(param_group)


@contextmanager
def _only(part: Optimizer, group: dict, p: torch.Tensor, name: str | None):
    """Mask ``part`` to the one parameter ``p`` while it steps: ``p``'s group holds only ``p``,
    and every other group of ``part`` is empty (``part.step()`` steps all its groups)."""
    saved = [(g, g["params"], g.get("param_names")) for g in part.param_groups]
    for g in part.param_groups:
        g["params"] = [p] if g is group else []
        if g.get("param_names") is not None:
            g["param_names"] = ([name if name is not None else group["param_names"][0]] if g is group else [])
    try:
        yield
    finally:
        for g, params, names in saved:
            g["params"] = params
            if names is not None:
                g["param_names"] = names


def rewrap(optimizer: Optimizer, model: nn.Module, *, in_backward: bool = False, offload: bool = False,
           weights: str | None = None) -> Optimizer:
    """``optimizer`` stepped as a new plan says (a runtime re-plan keeps the optimizer and its
    state): unwrap it, bring offloaded state back if the plan keeps it on the device, and wrap
    it again if the plan steps one parameter at a time."""
    inner = optimizer
    if isinstance(optimizer, PlanOptimizer):
        optimizer.remove_hooks()
        if optimizer.offload and not offload:
            for g in optimizer.param_groups:
                for p in g["params"]:
                    if p in optimizer.state:
                        optimizer._load_state(p)
        inner = optimizer.inner
    if not (in_backward or offload or weights):
        return inner
    return PlanOptimizer(inner, model, in_backward=in_backward, offload=offload, weights=weights)
