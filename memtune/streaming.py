"""Weight streaming: each unit's parameters live in host memory and visit the device only while
the unit runs, as FSDP2 does with ``CPUOffloadPolicy`` or ZeRO-Infinity with parameter offload,
on one device.

At rest a streamed parameter is the model's own ``nn.Parameter``, in (pinned) host memory: the
optimizer steps it there, ``state_dict()`` reads it there. Around its unit's forward, and again
around the unit's backward, a device copy takes its place in the module:

* **forward**: the unit's forward pre-hook copies the parameters in (the next unit's copy is
  started on a side stream on CUDA, so it overlaps this unit's compute) and registers the
  copies; the forward hook puts the host parameters back and frees the copies' storage.
  Autograd keeps *views* of the copies (a linear saves ``W.t()``), so the copies are freed
  by resizing their storage to zero, as FSDP2 does, not by dropping them; the saved views
  see the data again when backward grows the storage back.
* **backward**: a hook on the unit's output gradients (which fire before the unit's backward)
  copies the parameters in again and registers them, so a recomputed unit recomputes with them;
  each copy's gradient goes to host memory as soon as autograd completes it (added to what a
  previous micro-batch left there), and once the unit's backward is done its copies are freed.

So the device holds the weights of the running unit (and of the one prefetched) and one unit's
gradients at a time. What the profiler needs to count this is reported through
:class:`StreamObserver` (the recorder adjusts its live bytes on each resize and excludes the
host tensors on a CUDA target); nothing is estimated.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.autograd.graph import get_gradient_edge
from torch.utils._pytree import tree_flatten


class StreamObserver:
    """Told of what the stream does; the profiler's recorder listens (no-ops by default)."""

    def created(self, copy: torch.Tensor) -> None:
        """``copy``, a device copy of a parameter, was just allocated."""

    def resized(self, copy: torch.Tensor, nbytes: int) -> None:
        """``copy``'s storage now holds ``nbytes`` (0: freed; else fetched again)."""

    def host_grad(self, grad: torch.Tensor) -> None:
        """``grad``, a parameter's gradient, was just allocated in host memory."""


_OBSERVERS: list[StreamObserver] = []
"""Observers of every stream (the runtime's CPU memory guard, which a storage resize bypasses)."""


def register_observer(observer: StreamObserver) -> Callable[[], None]:
    """Tell ``observer`` what every stream does from now on; returns the function that stops it."""
    _OBSERVERS.append(observer)
    return lambda: _OBSERVERS.remove(observer)


@dataclass(eq=False)
class _Slot:
    module: nn.Module
    name: str
    fqn: str
    copy: torch.Tensor | None = None
    """The device copy (an ``nn.Parameter``), its storage empty at rest."""
    host: torch.Tensor | None = None
    """What the module holds at rest (the model's parameter, or the profiler's fake one)."""
    restore: torch.Tensor | None = None
    """What the module held before the copy was registered (put back after)."""
    copy_of: torch.Tensor | None = None
    """The host parameter ``copy`` was made for (a recording brings new fake parameters)."""
    grad_node: Any = None
    """``copy``'s gradient accumulator, taken while its storage is allocated (asking a resized
    fake tensor for it re-allocates the storage)."""
    unit: Any = None


@dataclass(eq=False)
class _Unit:
    name: str
    slots: list[_Slot]
    pending: int = 0
    """Gradients (and the unit's backward end) still to come before its copies are freed."""
    in_backward: bool = False
    resident: bool = False
    index: int = 0
    """Its place in forward order."""
    ready: Any = None
    """A CUDA event the side stream records once a prefetch has landed."""


def owned_parameters(model: nn.Module, units: list[tuple[str, list[nn.Module]]]) -> dict[str, list[tuple[nn.Module, str, str]]]:
    """Per unit, ``(module, attribute, FQN)`` of every parameter only that unit's modules hold:
    a parameter shared with another unit or with the rest of the model (tied embeddings) stays
    on the device."""
    holders: dict[int, set[str]] = {}
    unit_of_module = {}
    for unit, mods in units:
        for m in mods:
            for sub in m.modules():
                unit_of_module.setdefault(id(sub), unit)
    for mod_name, mod in model.named_modules(remove_duplicate=False):
        for _, p in mod.named_parameters(recurse=False, remove_duplicate=False):
            holders.setdefault(id(p), set()).add(unit_of_module.get(id(mod), ""))
    fqns = {id(p): n for n, p in model.named_parameters()}
    out: dict[str, list[tuple[nn.Module, str, str]]] = {}
    for unit, mods in units:
        seen: set[int] = set()
        slots = []
        for m in mods:
            for sub in m.modules():
                for pname, p in sub.named_parameters(recurse=False):
                    if id(p) in seen or holders.get(id(p)) != {unit}:
                        continue
                    seen.add(id(p))
                    slots.append((sub, pname, fqns.get(id(p), pname)))
        out[unit] = slots
    return out


class WeightStream:
    """Streams the parameters of ``units`` (name -> modules, in forward order) through
    ``device``. :meth:`install` adds the hooks (returns their handles); the parameters must
    already be where they rest (:func:`to_host`)."""

    def __init__(self, model: nn.Module, units: list[tuple[str, list[nn.Module]]], device: torch.device | None, *,
                 observer: StreamObserver | None = None):
        self.device = None if device is None else torch.device(device)
        self.observer = observer or StreamObserver()
        owned = owned_parameters(model, units)
        self.units = [_Unit(name, [_Slot(m, a, f) for m, a, f in owned[name]]) for name, _ in units]
        for i, unit in enumerate(self.units):
            unit.index = i
            for slot in unit.slots:
                slot.unit = unit
        self._by_name = {u.name: u for u in self.units}
        cuda = self.device is not None and self.device.type == "cuda"
        self._stream = torch.cuda.Stream(self.device) if cuda else None
        """Host-to-device copies ahead of the unit that needs them."""
        self._d2h = torch.cuda.Stream(self.device) if cuda else None
        """Gradients to host memory."""
        self._end_queued = False

    def _notify(self, event: str, *args) -> None:
        for observer in (self.observer, *_OBSERVERS):
            getattr(observer, event)(*args)

    @property
    def streamed(self) -> list[str]:
        return [s.fqn for u in self.units for s in u.slots]

    # ------------------------------------------------------------------ copies
    def _copy_for(self, slot: _Slot) -> torch.Tensor:
        """``slot``'s device copy with its storage allocated (on the current stream)."""
        host = slot.host
        if slot.copy is None or slot.copy_of is not host:
            with torch.no_grad():
                copy = nn.Parameter(torch.empty_like(host, device=self.device or host.device),
                                    requires_grad=host.requires_grad)
            slot.copy, slot.copy_of = copy, host
            self._notify("created", copy)
            if host.requires_grad:
                copy.register_post_accumulate_grad_hook(lambda q, slot=slot: self._grad_done(slot, q))
                slot.grad_node = get_gradient_edge(copy).node
            return copy
        st = slot.copy.untyped_storage()
        if st.nbytes() == 0:
            need = slot.copy.numel() * slot.copy.element_size()
            st.resize_(need)
            self._notify("resized", slot.copy, need)
        return slot.copy

    def fetch(self, unit: _Unit, *, prefetch: bool = False, read_host: bool = False) -> None:
        """Copy ``unit``'s parameters to the device: now, or (``prefetch``, CUDA) on the side
        stream, which first waits for the work queued so far (the storage is allocated on the
        compute stream, so freeing it later is ordered with the compute that used it).
        ``read_host`` (in forward): the parameters the modules hold now are the host ones."""
        if unit.resident:
            return
        if read_host:
            for slot in unit.slots:
                slot.host = slot.module._parameters[slot.name]
        copies = [self._copy_for(slot) for slot in unit.slots]
        stream = self._stream if prefetch else None
        if stream is not None:
            stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.no_grad(), (torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext()):
            for slot, copy in zip(unit.slots, copies):
                # Backward's saved views of the copy check its version: refilling it with the
                # same values is not a modification (FSDP2 does the same).
                with torch.autograd._unsafe_preserve_version_counter(copy):
                    copy.copy_(slot.host, non_blocking=stream is not None)
            if stream is not None:
                unit.ready = torch.cuda.Event()
                unit.ready.record(stream)
        unit.resident = True

    def _register(self, unit: _Unit, copies: bool) -> None:
        """Put the device copies in the modules, or put back what they held before."""
        for slot in unit.slots:
            if copies:
                if slot.module._parameters[slot.name] is not slot.copy:
                    slot.restore = slot.module._parameters[slot.name]
                    slot.module._parameters[slot.name] = slot.copy
            elif slot.restore is not None:
                slot.module._parameters[slot.name] = slot.restore
                slot.restore = None

    def release(self, unit: _Unit) -> None:
        """Free ``unit``'s device copies (their storage; saved views keep the storage object)."""
        for slot in unit.slots:
            if slot.copy is not None and slot.copy.untyped_storage().nbytes():
                slot.copy.untyped_storage().resize_(0)
                self._notify("resized", slot.copy, 0)
        unit.resident = False

    def _wait(self, unit: _Unit) -> None:
        if unit.ready is not None:
            torch.cuda.current_stream(self.device).wait_event(unit.ready)
            unit.ready = None

    def _next(self, unit: _Unit, step: int) -> _Unit | None:
        i = unit.index + step
        return self.units[i] if 0 <= i < len(self.units) else None

    # ------------------------------------------------------------------ hooks
    def _pre_forward(self, unit: _Unit):
        def hook(mod, args, kwargs):
            if unit.in_backward:  # a recomputation inside the unit's own backward
                return
            self.fetch(unit, read_host=True)
            self._wait(unit)
            self._register(unit, copies=True)
            nxt = self._next(unit, 1)
            if nxt is not None and self._stream is not None:
                self.fetch(nxt, prefetch=True, read_host=True)
        return hook

    def _post_forward(self, unit: _Unit):
        def hook(mod, args, kwargs, output):
            if unit.in_backward:
                return
            self._register(unit, copies=False)
            outs = [t for t in tree_flatten(output)[0] if isinstance(t, torch.Tensor) and t.requires_grad]
            ins = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor) and t.requires_grad]
            self.release(unit)
            if not outs or not torch.is_grad_enabled():
                return
            trainable = sum(1 for s in unit.slots if s.copy is not None and s.copy.requires_grad)
            unit.pending = trainable + (1 if ins else 0)
            torch.autograd.graph.register_multi_grad_hook(outs, lambda grads: self._pre_backward(unit), mode="any")
            if ins:
                torch.autograd.graph.register_multi_grad_hook(ins, lambda grads: self._one_done(unit), mode="all")
        return hook

    def _pre_backward(self, unit: _Unit) -> None:
        if not self._end_queued:  # once per backward pass: where it ends, everything is put back
            self._end_queued = True
            torch.autograd.Variable._execution_engine.queue_callback(self._backward_done)
        # A copy that takes no part in this backward (an expert no token was routed to) gets no
        # gradient: its unit does not wait for one.
        unit.pending -= sum(1 for s in unit.slots if s.grad_node is not None
                            and not torch._C._will_engine_execute_node(s.grad_node))
        unit.in_backward = True
        self.fetch(unit)
        self._wait(unit)
        self._register(unit, copies=True)
        nxt = self._next(unit, -1)
        if nxt is not None and self._stream is not None and nxt.pending:
            self.fetch(nxt, prefetch=True)
        if unit.pending <= 0:
            self._finish_backward(unit)

    def _grad_done(self, slot: _Slot, q: torch.Tensor) -> None:
        """``q``'s gradient is complete: add it to the host parameter's (a previous micro-batch's)
        or move it there, and free it on the device."""
        g, q.grad = q.grad, None
        host = slot.host
        with torch.no_grad():
            if host.grad is None:
                h = torch.empty(host.shape, dtype=host.dtype, device=host.device,
                                pin_memory=self._d2h is not None)
                self._notify("host_grad", h)
                if self._d2h is None:
                    h.copy_(g)
                else:  # on the device-to-host engine, behind the rest of backward
                    self._d2h.wait_stream(torch.cuda.current_stream(self.device))
                    with torch.cuda.stream(self._d2h):
                        h.copy_(g, non_blocking=True)
                    g.record_stream(self._d2h)
                host.grad = h
            else:  # a later micro-batch: added on the host once the earlier copies have landed
                if self._d2h is not None:
                    self._d2h.synchronize()
                host.grad.add_(g.to(host.grad.device))
        del g
        self._one_done(slot.unit)

    def _backward_done(self) -> None:
        """The end of a backward pass: every gradient copy has landed (the optimizer and the
        gradient checks read them next), and every unit's parameters are back in their modules,
        also those of a unit one of whose parameters received no gradient."""
        self._end_queued = False
        if self._d2h is not None:
            self._d2h.synchronize()
        for unit in self.units:
            if unit.in_backward:
                self._finish_backward(unit)

    def _one_done(self, unit: _Unit) -> None:
        unit.pending -= 1
        if unit.pending <= 0 and unit.in_backward:
            self._finish_backward(unit)

    def _finish_backward(self, unit: _Unit) -> None:
        self._register(unit, copies=False)
        self.release(unit)
        unit.in_backward = False

    def install(self, hook_units: Callable[..., list]) -> list:
        """Add the forward hooks through ``hook_units(pre_hook_of, post_hook_of)`` (the same
        unit boundaries the profiler's recorder uses); returns the handles."""
        return hook_units(lambda name: self._pre_forward(self._by_name[name]),
                          lambda name: self._post_forward(self._by_name[name]))

    def drop(self) -> None:
        """Put every host parameter back and free every copy (a failed step, or removal)."""
        self._end_queued = False
        for unit in self.units:
            unit.in_backward = False
            unit.pending = 0
            self._register(unit, copies=False)
            self.release(unit)
            for s in unit.slots:
                s.copy = s.copy_of = s.host = s.grad_node = None


def to_host(params: list[nn.Parameter], *, pin: bool) -> None:
    """Move ``params`` to host memory (pinned with ``pin``), in place: the same Parameter objects."""
    for p in params:
        if p.device.type != "cpu" or pin and not p.is_pinned():
            host = torch.empty(p.shape, dtype=p.dtype, device="cpu", pin_memory=pin)
            host.copy_(p.detach())
            p.data = host


def to_device(params: list[nn.Parameter], device: torch.device) -> None:
    for p in params:
        if p.device != device:
            p.data = p.data.to(device)
            if p.grad is not None:
                p.grad = p.grad.to(device)


def move_model(model: nn.Module, device: torch.device) -> None:
    """``model.to(device)``, but for the parameters an applied weight offload keeps in host memory."""
    from memtune.apply import applied_levers

    keep = {id(p) for a in applied_levers(model).values() for p in a.host_params}
    for mod in model.modules():
        for name, p in mod._parameters.items():
            if p is not None and id(p) not in keep and p.device != device:
                p.data = p.data.to(device)
        for name, b in mod._buffers.items():
            if b is not None and b.device != device:
                mod._buffers[name] = b.to(device)
