"""Step an optimizer one parameter at a time: in backward, from host memory, on bf16 weights.

Three plan dimensions change *when* and *where* a parameter is updated, not *how*:

* **optimizer step in backward** (``Plan.optimizer_in_backward``): each parameter is updated
  in its ``register_post_accumulate_grad_hook`` as soon as its gradient is complete, and the
  gradient is freed at once, so full gradients never coexist;
* **optimizer-state offload** (the ``state_offload`` lever): the state (all of it, or a share:
  :func:`resident_names` keeps the rest on the device) lives in (pinned) host memory and streams
  through the device one parameter at a time, pipelined (:class:`_Stream`):
  while a parameter updates, the next one's state is on its way in and the previous one's on
  its way out, on two side streams (host-to-device and device-to-host copies run on separate
  copy engines). The device holds the updating parameter's state, a window fetched ahead and
  the last one's;
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


def resident_names(params: list[tuple[str, int]], offloaded_share: float | bool) -> set[str]:
    """Of ``params`` ((name, elements) in registration order), those whose optimizer state stays
    on the device when ``offloaded_share`` of it (by elements) lives in host memory: the ones
    updated first in backward (the last registered), up to the ``1 - share`` that stays. The
    runtime (:class:`PlanOptimizer`) and the price (:func:`memtune.cost_model.state_stream_seconds`)
    both use this rule."""
    if offloaded_share is True or not offloaded_share:
        return set()
    total = sum(n for _, n in params)
    keep = (1.0 - float(offloaded_share)) * total
    out, held = set(), 0
    for name, n in reversed(params):
        if held + n > keep:
            break
        out.add(name)
        held += n
    return out


class PlanOptimizer(Optimizer):
    """The plan's optimizer, stepped one parameter at a time (see the module docstring).

    ``param_groups`` and ``state`` are the inner optimizer's own objects, so LR schedulers,
    ``set_state_dtype``/``set_ns_steps`` and checkpoints act on it directly."""

    def __init__(self, inner: Optimizer, model: nn.Module, *, in_backward: bool = False, offload: bool | float = False,
                 weights: str | None = None, pin_memory: bool | None = None, host_buffers: dict | None = None):
        if weights not in WEIGHTS:
            raise ValueError(f"weights={weights!r}: use one of {[str(w) for w in WEIGHTS]}")
        weights = WeightMode(weights) if weights is not None else None
        self.inner = inner
        self.in_backward = in_backward
        self.offload = offload
        self.weights = weights
        self.pin = torch.cuda.is_available() if pin_memory is None else pin_memory
        self.names = {id(p): n for n, p in model.named_parameters()}
        resident = resident_names([(n, p.numel()) for n, p in model.named_parameters()], offload)
        self._resident = {id(p) for n, p in model.named_parameters() if n in resident}
        """Parameters whose state stays on the device under a partial offload (``offload`` a share)."""
        self._index()
        params = [p for g in inner.param_groups for p in g["params"]]
        super().__init__(params, {})
        self.param_groups = inner.param_groups
        self.state = inner.state  # type: ignore[assignment]
        self.defaults = inner.defaults
        self._handles = []
        self._stream = _Stream(self) if offload else None
        self._stepped: set[int] = set()
        self.nonfinite: list[str] = []
        """Parameters whose gradient was NaN/inf in the current step (in-backward: not updated)."""
        if in_backward:
            for p in params:
                self._handles.append(p.register_post_accumulate_grad_hook(self._hook))
        if host_buffers:  # a re-wrap: the state already in host memory stays there
            self._host_buffers = host_buffers
        if offload:
            for p in params:
                # The state moves to host memory now, if the inner optimizer already has some; on a
                # re-wrap, state in host memory that this plan keeps on the device comes back.
                self._offload_state(p)
                if id(p) in self._resident:
                    self._load_state(p)

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
        self.finish_step()
        return loss

    def finish_step(self) -> None:
        """End the step's state stream: wait for the last copies back to host memory and drop
        any state fetched ahead that the step did not use. :meth:`step` calls it."""
        if self._stream is not None:
            self._stream.finish()

    def stream_bytes(self) -> int:
        """Device bytes the state stream holds now (state fetched ahead, copies still going out)."""
        return self._stream.held_bytes() if self._stream is not None else 0

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.inner.zero_grad(set_to_none=set_to_none)
        self._stepped.clear()
        self.nonfinite.clear()
        self.finish_step()

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
        if self._stream is not None:
            self._stream.before(p)
        if self.weights is not None and p.dtype == torch.bfloat16:
            self._step_bf16(part, group, p)
        else:
            with _only(part, group, p, self.names.get(id(p))):
                part.step()
        if self._stream is not None:
            self._stream.after(p)

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
    def _offload_state(self, p: torch.Tensor) -> dict[str, torch.Tensor]:
        """Move ``p``'s state to its host buffers; the device tensors it replaced, by key."""
        if id(p) in self._resident:
            return {}  # its state stays on the device
        part, _ = self._where[id(p)]
        st = part.state.get(p)
        if not st:
            return {}
        hosts = self._hosts(p)
        moved = {}
        for k, v in list(st.items()):
            # Only what lives with the parameter moves: e.g. torch.optim keeps its step counter
            # on the CPU whatever the parameter's device.
            if isinstance(v, torch.Tensor) and v is not hosts.get(k) and (k in hosts or v.device == p.device):
                hosts[k] = _to_host(v, hosts.get(k), self.pin)
                st[k] = hosts[k]
                moved[k] = v
        return moved

    def _load_state(self, p: torch.Tensor) -> None:
        part, _ = self._where[id(p)]
        st = part.state.get(p)
        if not st:
            return
        hosts = self._hosts(p)
        for k, v in list(st.items()):
            if isinstance(v, torch.Tensor) and v is hosts.get(k):
                st[k] = v.to(p.device, non_blocking=self.pin, copy=True)

    def _device_state(self, p: torch.Tensor) -> dict[str, torch.Tensor]:
        """Device copies of ``p``'s host-resident state tensors, by state key (not yet installed)."""
        part, _ = self._where[id(p)]
        st = part.state.get(p) or {}
        hosts = self._hosts(p)
        return {k: v.to(p.device, non_blocking=self.pin, copy=True) for k, v in st.items()
                if isinstance(v, torch.Tensor) and v is hosts.get(k)}

    def _hosts(self, p: torch.Tensor) -> dict:
        if not hasattr(self, "_host_buffers"):
            self._host_buffers: dict[int, dict] = {}
        return self._host_buffers.setdefault(id(p), {})

    # ------------------------------------------------------------------ delegation
    def state_dict(self) -> dict:
        self.finish_step()  # host copies complete
        return self.inner.state_dict()

    def load_state_dict(self, state_dict: dict) -> None:
        self.finish_step()
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


class _Stream:
    """The pipeline that streams offloaded state through the device, one parameter at a time,
    in the order the previous step updated them (backward's order for a step in backward):

    * ``before(p)``: install ``p``'s state on the device (fetched ahead, or now), then fetch
      ahead the parameters that follow, as long as what is fetched ahead stays within a window
      of twice the largest parameter's state (at least one parameter);
    * ``after(p)``: start copying ``p``'s state back to its pinned host buffers, and release the
      device copies of the parameter before it.

    On CUDA the fetches run on one side stream and the write-backs on another (separate copy
    engines, so both directions move at once), ordered against the updates by events. Elsewhere
    the copies are plain copies, but the device tensors are held and released at the very same
    points, so a recording under fake tensors measures the memory the CUDA pipeline holds: the
    updating parameter's state, the window fetched ahead and the previous one's state.
    :func:`memtune.cost_model.state_stream_seconds` prices this same pipeline."""

    WINDOW = 2
    """What may be fetched ahead, in multiples of the largest parameter's state."""

    def __init__(self, opt: PlanOptimizer):
        self.opt = opt
        self.order: dict[int, torch.Tensor] = {}   # id -> the parameter after it, from the last step
        self._this_step: list[torch.Tensor] = []
        self.ahead: dict[int, tuple[dict, object]] = {}   # id -> (device state, fetched event), in order
        self.going: list[dict] = []                       # device state being written back
        self.written: dict[int, object] = {}              # id -> event: its host copy is complete
        self._streams: dict[torch.device, tuple] = {}
        self.window = 0

    def _cuda(self, device: torch.device):
        if device.type != "cuda":
            return None
        if device not in self._streams:
            self._streams[device] = (torch.cuda.Stream(device), torch.cuda.Stream(device))
        return self._streams[device]

    def _host_bytes(self, p: torch.Tensor) -> int:
        return sum(t.untyped_storage().nbytes() for t in self.opt._hosts(p).values())

    def _measure_window(self) -> int:
        largest = max((sum(t.untyped_storage().nbytes() for t in h.values())
                       for h in getattr(self.opt, "_host_buffers", {}).values()), default=0)
        return self.WINDOW * largest

    def _fetch(self, p: torch.Tensor, streams) -> None:
        fetched = None
        if streams is not None:
            if id(p) in self.written:  # its host buffers hold its last update
                streams[0].wait_event(self.written[id(p)])
            with torch.cuda.stream(streams[0]):
                dev = self.opt._device_state(p)
                fetched = torch.cuda.Event()
                fetched.record(streams[0])
        else:
            dev = self.opt._device_state(p)
        self.ahead[id(p)] = (dev, fetched)

    def before(self, p: torch.Tensor) -> None:
        opt = self.opt
        part, _ = opt._where[id(p)]
        st = part.state.get(p) if id(p) not in opt._resident else None
        streams = self._cuda(p.device)
        if st:
            if id(p) in self.ahead:
                dev, fetched = self.ahead.pop(id(p))
                if streams is not None:
                    torch.cuda.current_stream(p.device).wait_event(fetched)
                    for t in dev.values():
                        t.record_stream(torch.cuda.current_stream(p.device))
            else:
                self.ahead.clear()  # fetched for another order: the host copies are intact
                dev = opt._device_state(p)
            st.update(dev)
        self._this_step.append(p)
        # Fetch ahead, within the window (measured at the end of the step that learnt the order).
        window = self.window
        held = sum(sum(t.untyped_storage().nbytes() for t in dev.values()) for dev, _ in self.ahead.values())
        nxt, seen = self.order.get(id(p)), {id(p)}
        while nxt is not None and id(nxt) not in seen:
            seen.add(id(nxt))
            if id(nxt) not in self.ahead and id(nxt) not in opt._resident and opt._where[id(nxt)][0].state.get(nxt):
                size = self._host_bytes(nxt)
                if self.ahead and held + size > window:
                    break
                self._fetch(nxt, streams)
                held += size
            nxt = self.order.get(id(nxt))

    def after(self, p: torch.Tensor) -> None:
        opt = self.opt
        if id(p) in opt._resident:
            return  # its state stays on the device: nothing goes out
        streams = self._cuda(p.device)
        if streams is not None:
            streams[1].wait_stream(torch.cuda.current_stream(p.device))  # the update is done
            with torch.cuda.stream(streams[1]):
                dev = opt._offload_state(p)
                written = torch.cuda.Event()
                written.record(streams[1])
            for t in dev.values():
                t.record_stream(streams[1])  # the allocator reuses them only once the copy is done
            self.written[id(p)] = written
        else:
            dev = opt._offload_state(p)
        self._release()
        self.going.append(dev)  # held until the next update, as the copy out is on CUDA

    def _release(self) -> None:
        for dev in self.going:
            dev.clear()
        self.going = []

    def held_bytes(self) -> int:
        held = [t for dev in self.going for t in dev.values()]
        held += [t for dev, _ in self.ahead.values() for t in dev.values()]
        return sum(t.untyped_storage().nbytes() for t in held)

    def finish(self) -> None:
        self._release()
        self.ahead.clear()
        for written in self.written.values():
            written.synchronize()  # the host buffers are complete (a checkpoint may read them)
        self.written = {}
        if len(self._this_step) > 1:
            self.order = {id(a): b for a, b in zip(self._this_step, self._this_step[1:])}
            self.window = self._measure_window()  # the host buffers exist once a step has stepped
        self._this_step = []


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
    hosts = None
    if isinstance(optimizer, PlanOptimizer):
        optimizer.remove_hooks()
        optimizer.finish_step()
        if optimizer.offload and not offload:
            for g in optimizer.param_groups:
                for p in g["params"]:
                    if p in optimizer.state:
                        optimizer._load_state(p)
        hosts = getattr(optimizer, "_host_buffers", None) if offload else None
        inner = optimizer.inner
    if not (in_backward or offload or weights):
        return inner
    return PlanOptimizer(inner, model, in_backward=in_backward, offload=offload, weights=weights, host_buffers=hosts)
