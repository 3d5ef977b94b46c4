"""Independent reference measurements on real tensors, for the fidelity tests.

``measure_step`` runs real training steps on the CPU and measures the second one with
PyTorch's own ``MemTracker``; ``saved_bytes_per_unit`` captures what autograd saves per
unit with ``saved_tensors_hooks`` on real tensors, deduplicated by storage pointer.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from torch.distributed._tools.mem_tracker import MemTracker

from memtune.batching import loss_from_output, split_batch, split_micro_batches


def train_step(model, batch, loss_fn, opt, autocast: bool = False) -> torch.Tensor:
    args, kwargs, target = split_batch(batch, loss_fn)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = model(*args, **kwargs)
        loss = loss_from_output(out, batch, target, loss_fn)
    del out
    loss.backward()
    if opt is not None:
        opt.step()
        opt.zero_grad(set_to_none=True)
    return loss.detach()


def measure_step(model: nn.Module, batch, *, loss_fn=None, opt=None, warmup: int = 1, autocast: bool = False) -> int:
    """Peak bytes of one steady-state step (after ``warmup`` steps), measured by MemTracker.
    ``autocast`` runs forward and loss under CPU bf16 autocast (bf16-mixed)."""
    for _ in range(warmup):
        train_step(model, batch, loss_fn, opt, autocast)
    mt = AccumulatingMemTracker()  # (MemTracker that accepts frozen parameters)
    tensors = [t for t in (batch.values() if isinstance(batch, dict) else batch if isinstance(batch, (tuple, list)) else [batch])]
    mt.track_external(model, *( [opt] if opt is not None else []), *tensors)
    with mt:
        train_step(model, batch, loss_fn, opt, autocast)
    snap = mt.get_tracker_snapshot("peak")
    return int(snap[torch.device("cpu")]["Total"])


def saved_bytes_per_unit(model: nn.Module, batch, unit_fqns, *, loss_fn=None) -> dict[str, int]:
    """Bytes of distinct activation storages saved for backward inside each unit's forward."""
    modules = dict(model.named_modules())
    static = {p.untyped_storage().data_ptr() for p in model.parameters()}
    static |= {b.untyped_storage().data_ptr() for b in model.buffers()}
    stack: list[str] = []
    seen: dict[str, dict[int, int]] = {u: {} for u in unit_fqns}
    handles = []
    for u in unit_fqns:
        handles.append(modules[u].register_forward_pre_hook(lambda m, a, u=u: (stack.append(u), None)[1]))
        handles.append(modules[u].register_forward_hook(lambda m, a, o: (stack.pop(), None)[1]))

    def pack(t):
        st = t.untyped_storage()
        if stack and st.data_ptr() not in static:
            seen[stack[-1]][st.data_ptr()] = st.nbytes()
        return t

    args, kwargs, target = split_batch(batch, loss_fn)
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = model(*args, **kwargs)
            loss = loss_from_output(out, batch, target, loss_fn)
        loss.backward()
    finally:
        for h in handles:
            h.remove()
    return {u: sum(v.values()) for u, v in seen.items()}


class _NoHook:
    def remove(self) -> None:
        pass


_NO_HOOK = _NoHook()


class AccumulatingMemTracker(MemTracker):
    """MemTracker for steps that run the model once per micro-batch. MemTracker refuses a root
    module called a second time in one step (it takes that for the next iteration); here the
    per-module statistics are reset at that point instead, and the device-wide peak, which is
    what the fidelity tests read, keeps accumulating.

    Module tracking is also limited to the modules of the tracked models, so that the tracker does
    not change the step it measures. MemTracker's ModTracker hooks every ``nn.Module`` call, and
    its backward hook is a multi-grad hook in ``"all"`` mode on the call's inputs: it holds each
    input's gradient until all have arrived, and its closure over the inputs' ``grad_fn``s forms a
    reference cycle. transformers 5 calls its kernel functions through ``nn.Module`` wrappers
    outside the model (``use_kernelized_func``): Mamba's ``mamba_inner_fn`` receives six
    parameters and ``A``. Hooked, AccumulateGrad copies those parameters' gradients instead of
    taking them, and the ``A`` that never reaches the loss keeps its saved ``exp`` output to the
    garbage collector: +12,544 B at the peak of the zoo's Mamba step, which an unobserved step
    (and memtune's own meter) does not allocate."""

    def __init__(self) -> None:
        super().__init__()
        self._tracked_modules: set[nn.Module] = set()

    def track_external(self, *external) -> None:
        super().track_external(*external)
        for obj in external:
            if isinstance(obj, nn.Module):
                self._tracked_modules.update(obj.modules())

    def __enter__(self):
        tracked = self._tracked_modules
        if tracked and self._depth == 0:  # (no model given: every module call is tracked, as MemTracker does)
            mods = self._mod_tracker
            pre, post = type(mods)._fw_pre_hook, type(mods)._fw_post_hook
            mods._fw_pre_hook = lambda mod, inputs: pre(mods, mod, inputs) if mod in tracked else None
            mods._fw_post_hook = lambda mod, inputs, out: post(mods, mod, inputs, out) if mod in tracked else None
        return super().__enter__()

    def _pre_fw_hook(self, module: nn.Module, inputs) -> None:
        if module in self.memory_tracking and not self._mod_tracker.is_bw:
            parents = set(self._mod_tracker.parents) - {self._mod_tracker.get_known_fqn(module)}
            if parents == {"Global"}:
                self.reset_mod_stats()
        # MemTracker (torch 2.13) registers a gradient hook on every parameter, which torch refuses
        # for a frozen one: mark frozen parameters as hooked already (they get no gradient).
        for p in module.parameters():
            if not p.requires_grad and p not in self._param_to_grad_hook_handles:
                self._param_to_grad_hook_handles[p] = (_NO_HOOK, _NO_HOOK)
        super()._pre_fw_hook(module, inputs)


def planned_step(model, batch, plan, opt, *, loss_fn=None, autocast: bool = False) -> float:
    """One optimizer step as memtune's runtime takes it under ``plan``: the plan's micro-batches
    (cut by memtune.batching.split_micro_batches), each loss scaled by its share before backward,
    then one optimizer step."""
    total = 0.0
    autocast = autocast or plan.weights is not None  # bf16 weights compute under bf16 autocast, as the runtime does
    parts = split_micro_batches(batch, plan.micro_batch_size if plan.grad_accum_steps > 1 else None)
    for part, weight in parts:
        args, kwargs, target = split_batch(part, loss_fn)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = model(*args, **kwargs)
            loss = loss_from_output(out, part, target, loss_fn)
        del out
        (loss if weight == 1.0 else loss * weight).backward()
        total += float(loss.detach()) * weight
        del loss
    if opt is not None:
        opt.step()
        opt.zero_grad(set_to_none=True)
    return total


def measure_planned_step(model, batch, plan, opt, *, loss_fn=None, warmup: int = 1, autocast: bool = False) -> int:
    """Peak bytes of one steady-state :func:`planned_step`, measured by (accumulating) MemTracker."""
    for _ in range(warmup):
        planned_step(model, batch, plan, opt, loss_fn=loss_fn, autocast=autocast)
    mt = AccumulatingMemTracker()
    leaves = [t for t in (batch.values() if isinstance(batch, dict) else batch if isinstance(batch, (tuple, list))
                          else [batch])]
    mt.track_external(model, *([opt] if opt is not None else []), *leaves)
    with mt:
        planned_step(model, batch, plan, opt, loss_fn=loss_fn, autocast=autocast)
    return int(mt.get_tracker_snapshot("peak")[torch.device("cpu")]["Total"])
