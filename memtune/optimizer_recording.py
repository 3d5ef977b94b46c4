"""Record what each optimizer configuration a plan may choose costs, on fake parameters.

A plan may change the optimizer's state precision, its Newton-Schulz step count, or (when the
caller asks) the optimizer itself. Each such configuration is built with
:func:`memtune.optimizers.build_optimizer_for` (the function :func:`memtune.apply_plan`
uses), on the model's fake parameters with fake gradients. A few steps run to reach the
steady state, then one ``optimizer.step()`` runs under a
:class:`~memtune.recorder.StepRecorder`. The result (:class:`~memtune.profile.OptimizerStepProfile`)
is the state's bytes and the step's temporaries: dequantized copies, batched Newton-Schulz
stacks and workspaces, foreach lists, whatever the implementation allocates. The memory
model replays it; nothing about an optimizer is estimated from a formula.
"""

from __future__ import annotations

import dataclasses
import re
from collections import OrderedDict

import torch

from .optimizers import FAMILIES, build_optimizer_for, optimizer_parts, optimizer_split
from .plan import OptimizerPlan
from .profile import OptimizerStepProfile, StepEvent
from .recorder import StepRecorder
from .step_recording import RecordingSetup
from .variant import StepVariant

WARMUP_STEPS = 1
"""Steps before the measured one. The first creates the state and ends by writing it in its
own precision (e.g. int8 codes), so the measured step is already a steady-state step: it
reads that state and replaces it, as every later step does."""


def optimizer_state_tensors(opt, params=None) -> list[torch.Tensor]:
    """Every tensor in ``opt``'s state (none for ``None``), or in that of ``params`` only."""
    from torch.utils._pytree import tree_flatten

    if opt is None:
        return []
    states = opt.state.values() if params is None else (opt.state.get(p, {}) for p in params)
    leaves, _ = tree_flatten([dict(s) for s in states])
    return [t for t in leaves if isinstance(t, torch.Tensor)]


def unique_bytes(tensors, nbytes) -> int:
    seen, total = set(), 0
    for t in tensors:
        key = id(t.untyped_storage())
        if key not in seen:
            seen.add(key)
            total += nbytes(t)
    return total


def record_configuration(config: OptimizerPlan, setups: list[tuple[StepVariant, RecordingSetup]], *,
                         granularity: int, target: str, foreach: bool, with_grad: set[str],
                         profiled: bool = False) -> list[OptimizerStepProfile]:
    """:func:`record_optimizer_step` of ``config`` for each (optimizer variant, setup), in order.

    A setup stepped one parameter at a time anyway (bf16 weights) whose in-backward twin is
    also asked for is not recorded on its own: its whole step is the sequence of its
    per-parameter steps, so the twin's recording gives both (the step's temporaries are the
    largest parameter's). Offloaded state is always recorded on its own: its stream holds
    state fetched ahead across the updates, differently in backward and after it."""
    def per_parameter_key(setup: RecordingSetup):
        rest = {k: v for k, v in setup.stepping.items() if k != "in_backward"}
        if rest.get("offload"):
            return None  # the state stream holds different things between updates in and after backward
        return tuple(sorted(rest.items(), key=lambda kv: kv[0])) if rest else None

    twins = {per_parameter_key(s): (v, s) for v, s in setups if s.stepping.get("in_backward") and per_parameter_key(s)}
    done: dict[StepVariant, OptimizerStepProfile] = {}

    def record(variant: StepVariant, setup: RecordingSetup) -> OptimizerStepProfile:
        if variant not in done:
            done[variant] = record_optimizer_step(setup, config, variant=variant, granularity=granularity,
                                                  target=target, foreach=foreach, with_grad=with_grad,
                                                  profiled=profiled and variant.is_default)
        return done[variant]

    out = []
    for variant, setup in setups:
        twin = twins.get(per_parameter_key(setup)) if not setup.stepping.get("in_backward") else None
        if twin is None:
            out.append(record(variant, setup))
            continue
        per_param = record(*twin)
        out.append(dataclasses.replace(per_param, variant=variant, param_step_bytes=(), profiled=False,
                                       step_transient_bytes=max((b for _, b in per_param.param_step_bytes), default=0)))
    return out


_MEMO: OrderedDict[tuple, OptimizerStepProfile] = OrderedDict()
MEMO_SIZE = 256
"""Recordings kept per process. An optimizer step sees the parameters, never the batch, so a
model profiled again (a longer sequence, a larger batch, a sweep's next trial, the runtime's
re-profile) re-uses its optimizer recordings; on a 2-layer GPT they were 60% of a profile."""


def _memo_key(setup: RecordingSetup, config: OptimizerPlan, variant: StepVariant, **kw) -> tuple:
    """Everything a recording depends on: the module tree (names, types and which parameters
    each holds, shared ones included: the Muon²/AdamW split reads them), the recorded
    parameters' shapes, dtypes and ``requires_grad``, the configuration and the stepping."""
    ids: dict[int, int] = {}
    tree = tuple((name, type(m).__module__, type(m).__qualname__,
                  tuple((pn, ids.setdefault(id(p), len(ids)))
                        for pn, p in m.named_parameters(recurse=False, remove_duplicate=False)))
                 for name, m in setup.model.named_modules(remove_duplicate=False))
    params = tuple((n, tuple(p.shape), p.dtype, p.requires_grad) for n, p in setup.params.items())
    return (tree, params, repr(config), variant, repr(sorted(setup.stepping.items())), setup.order,
            tuple(sorted(setup.host_params)),
            tuple(sorted((k, repr(v)) for k, v in kw.items())))


def record_optimizer_step(setup: RecordingSetup, config: OptimizerPlan, *, variant: StepVariant, granularity: int,
                          target: str, foreach: bool, with_grad: set[str],
                          profiled: bool = False) -> OptimizerStepProfile:
    """:func:`_record_optimizer_step`, remembered per process (:data:`MEMO_SIZE` recordings) by
    everything it depends on (:func:`_memo_key`)."""
    key = _memo_key(setup, config, variant, granularity=granularity, target=target, foreach=foreach,
                    with_grad=sorted(with_grad))
    out = _MEMO.pop(key, None)
    if out is None:
        out = _record_optimizer_step(setup, config, variant=variant, granularity=granularity, target=target,
                                     foreach=foreach, with_grad=with_grad)
    _MEMO[key] = out  # the most recently used last
    while len(_MEMO) > MEMO_SIZE:
        _MEMO.popitem(last=False)
    return dataclasses.replace(out, profiled=profiled)


FOLD_REPEATS = True
"""Record a per-parameter step over identical blocks folded (:func:`folded_blocks`)."""
FOLD_KEEP = 2
"""Identical blocks kept at each end of a run when a per-parameter step is recorded folded."""
FOLD_SLACK = 2 << 20
"""Bytes added to a folded recording's step temporaries on a CUDA target (two unsplit
remainders of the caching allocator's large pool; measured differences: at most 1 MiB)."""


def _record_optimizer_step(setup: RecordingSetup, config: OptimizerPlan, **kw) -> OptimizerStepProfile:
    """:func:`_record_step`, folded over repeated blocks where the step is per parameter.

    A step taken one parameter at a time (in backward, with offloaded state, on bf16 weights)
    dispatches every op of every parameter; a 70B model's 80 identical blocks made that most
    of its profile. Such a step is recorded on the model with the middle of each run of
    identical blocks left out (:func:`folded_blocks`): every distinct parameter, in every
    context it is stepped in, is still stepped, and each left-out parameter takes the
    measured figures of its stand-in. Where the state stream's window reaches past the blocks
    kept, more are kept; where the figures would not carry over exactly (state shared between
    parameters), the whole model is recorded."""
    keep = FOLD_KEEP if FOLD_REPEATS and setup.stepping else None
    while keep is not None:
        out, need = _record_step(setup, config, keep=keep, **kw)
        if out is not None:
            return out
        keep = need if need is not None and need > keep else None
    out, _ = _record_step(setup, config, keep=None, **kw)
    return out


def _record_step(setup: RecordingSetup, config: OptimizerPlan, *, variant: StepVariant, granularity: int,
                 target: str, foreach: bool, with_grad: set[str],
                 keep: int | None) -> tuple[OptimizerStepProfile | None, int | None]:
    """Build ``config`` on ``setup.params`` (meta parameters) and record a steady-state step.
    ``with_grad``: FQNs of the parameters that received a gradient in the recorded training
    step (only those are stepped, as in training).

    ``setup.stepping`` selects per-parameter stepping (:class:`memtune.stepping.PlanOptimizer`);
    with ``in_backward`` each parameter is stepped alone, in ``setup.order`` (the order backward
    completes their gradients), and its temporaries recorded. Offloaded state lives in host
    memory: on a CUDA target it is not counted against the device (``host_state_bytes``); on a
    CPU target host memory *is* the device.

    ``keep``: fold repeated blocks, keeping that many at each end of a run (per-parameter
    stepping only). Returns ``(None, blocks needed)`` where the folded figures would not equal
    the whole model's; ``(profile, None)`` otherwise."""
    from .devices import round_allocation
    from .optimizers import as_on_target
    from .stepping import PlanOptimizer, observe_host_tensors

    fparams = setup.params
    view = ParamView(setup.model, fparams)
    stepping = dict(setup.stepping)
    in_backward = bool(stepping.pop("in_backward", False))
    inner = build_optimizer_for(view, config, foreach=foreach)
    if inner is not None:
        as_on_target(inner, target)
    opt = inner
    if inner is not None and (in_backward or stepping):
        # Stepped one parameter at a time by the class the runtime uses; the recording calls
        # step_param itself where backward's hooks would (no hooks on these tensors).
        opt = PlanOptimizer(inner, view, pin_memory=False, **stepping)
    if config.name in FAMILIES:
        muon, adamw = optimizer_split(view, inner)
    else:
        muon, adamw = (), tuple(n for n, p in fparams.items() if p.requires_grad)
    stepped = [(n, p) for n, p in fparams.items() if n in with_grad and p.requires_grad]
    fold: dict[str, str] = {}
    twins: dict[str, str] = {}
    if keep and isinstance(opt, PlanOptimizer):
        full = _stepping_sequence(opt, view, stepped, setup.order, in_backward)
        sig = _signatures(opt, stepped, setup.host_params)
        fold, twins = folded_blocks(full, sig, keep)
        if fold:
            _leave_out(opt, {id(fparams[n]) for n in fold})
            stepped = [(n, p) for n, p in stepped if n not in fold]
    elif keep:
        return None, None
    nbytes = lambda t: round_allocation(t.untyped_storage().nbytes(), granularity)  # noqa: E731
    per_param: list[tuple[str, int]] = []
    held = 0
    try:
        names = dict(stepped)
        order = [n for n in dict.fromkeys(setup.order or tuple(names)) if n in names]
        for _ in range(WARMUP_STEPS):
            for _, p in stepped:
                p.grad = torch.zeros_like(p)
            if opt is not None and in_backward:  # in backward's order, as the measured step (and training) runs
                for n in order:
                    opt.step_param(names[n])
                    names[n].grad = None
            if opt is not None:
                opt.step()
        # Parameters streamed from host memory (weight offload) step there, state and all: on a
        # device target their step is not the device's (they keep no gradient here), and their
        # state, parameters and gradients are host bytes. On a CPU target host memory is the device.
        on_host = [p for n, p in stepped if n in setup.host_params] if target != "cpu" else []
        for _, p in stepped:
            if p.grad is None:  # the in-backward warm-up freed them as it went
                p.grad = torch.zeros_like(p)
        for p in on_host:
            p.grad = None

        def host_tensors() -> list[torch.Tensor]:  # (the step replaces state tensors: read them anew)
            return _host_buffers(opt) + optimizer_state_tensors(opt, on_host)
        if fold and opt._stream is not None:
            # The stream's figures at a parameter depend on what is fetched around it: each
            # left-out parameter's stand-in must see the same parameters within the window.
            sizes = {n: 0 if id(p) in opt._resident else opt._stream._host_bytes(p) for n, p in stepped}
            sizes.update({d: sizes[r] for d, r in fold.items()})
            reduced = [n for n in full if n not in fold]
            if not contexts_agree(full, reduced, fold, sig, sizes, opt._stream.window):
                block = min(sum(sizes[n] for n in full if _block_of(n) == b) for b in {_block_of(r) for r in fold.values()})
                return None, (keep + 1 if not block else -(-opt._stream.window // block) + 2)
        hosts = host_tensors()
        host_ids = {id(t.untyped_storage()) for t in hosts}
        device_state = [t for t in optimizer_state_tensors(opt) if target == "cpu" or id(t.untyped_storage()) not in host_ids]
        rec = StepRecorder(granularity=granularity, target=target)
        observe = (lambda t: rec.exclude(t)) if target != "cpu" else (lambda t: None)

        with rec, observe_host_tensors(observe):
            if target != "cpu":
                # Host buffers made by the warm-up: each step writes its state back into them.
                rec.host_static(hosts)
            on_host_ids = {id(p) for p in on_host}
            rec.register_static([p for p in fparams.values() if id(p) not in on_host_ids],
                                [p.grad for _, p in stepped if p.grad is not None], device_state)
            # Hold no reference to the state: a step that replaces a state tensor must free the old one.
            del device_state, hosts
            if opt is None:
                rec.mark(StepEvent.OPTIM_START)
            elif in_backward:
                for n in order:
                    rec.mark(StepEvent.PARAM_STEP, n)
                    opt.step_param(names[n])
                    names[n].grad = None
                    # What the state stream holds while backward computes the next gradients.
                    held = max(held, round_allocation(opt.stream_bytes(), granularity))
                rec.mark(StepEvent.OPTIM_START)
                opt.finish_step()
            else:
                rec.mark(StepEvent.OPTIM_START)
                opt.step()
                if on_host:
                    _device_newton_schulz(opt, on_host)
            rec.mark(StepEvent.OPTIM_END)
        if in_backward:
            per_param = [(iv.unit, max(0, iv.peak_bytes - iv.live_bytes)) for iv in rec.intervals
                         if iv.name == StepEvent.PARAM_STEP]
            transient = max((b for _, b in per_param), default=0)
        else:
            iv = next(iv for iv in rec.intervals if iv.name == StepEvent.OPTIM_START)
            transient = max(0, iv.peak_bytes - iv.live_bytes)
        hosts = host_tensors()
        host_ids = {id(t.untyped_storage()) for t in hosts}
        all_state = optimizer_state_tensors(opt)
        # (A streamed parameter and its gradient: pinned host memory too.)
        host_bytes = unique_bytes(hosts, nbytes) + 2 * sum(nbytes(p) for p in on_host)
        device_bytes = unique_bytes([t for t in all_state if id(t.untyped_storage()) not in host_ids], nbytes)
        if fold:
            # Each left-out parameter holds what its stand-in holds, provided no state is shared
            # between parameters (then the parts add up to the whole).
            on_host_ids = {id(p) for p in on_host}
            split = {n: _param_bytes(opt, p, host_ids, nbytes, id(p) in on_host_ids) for n, p in stepped}
            if (sum(d for d, _ in split.values()), sum(h for _, h in split.values())) != (device_bytes, host_bytes):
                return None, None
            device_bytes += sum(split[r][0] for r in fold.values())
            host_bytes += sum(split[r][1] for r in fold.values())
            # On a CUDA target the caching allocator makes a step's temporaries depend a little
            # on which blocks earlier steps freed (a reused block keeps a remainder of up to
            # 1 MiB unsplit), so the same update measures a few MiB apart in different blocks,
            # and the folded step's history is not the whole one's. Every folded figure is
            # raised by FOLD_SLACK; a left-out parameter takes the larger of its stand-in's
            # figure and its twin's (the figures alternate between neighbouring blocks).
            slack = FOLD_SLACK if target != "cpu" else 0
            if in_backward:
                measured = dict(per_param)
                per_param = [(n, slack + (measured[n] if n not in fold else max(measured[fold[n]], measured[twins[n]])))
                             for n in full]
            transient += slack
        state = device_bytes + (host_bytes if target == "cpu" else 0)
    finally:
        for p in fparams.values():
            p.grad = None
    return OptimizerStepProfile(
        name=config.name, state_dtype=config.state_dtype, ns_steps=config.ns_steps, settings=config.settings,
        muon_params=muon, adamw_params=adamw, state_bytes=state, step_transient_bytes=transient,
        variant=variant.for_optimizer(), host_state_bytes=host_bytes, param_step_bytes=tuple(per_param),
        stream_bytes=held, profiled=False), None


# ----------------------------------------------------------------------------- folding repeats
_BLOCK = re.compile(r"^(.*?)\.(\d+)\.(.+)$")


def _block_of(name: str) -> tuple[str, int] | None:
    """(container, index) of the stacked block ``name`` lives in (its first numeric
    component: ``model.layers.12.mlp.up_proj.weight`` → ``("model.layers", 12)``), or None."""
    m = _BLOCK.match(name)
    return (m.group(1), int(m.group(2))) if m else None


def folded_blocks(sequence: list[str], sig: dict[str, tuple], keep: int) -> tuple[dict[str, str], dict[str, str]]:
    """The parameters a folded recording leaves out, each mapped to its stand-in, and to its twin.

    ``sequence``: the parameters in the order they are stepped; ``sig``: what a parameter's
    update depends on (relative name, shape, dtype, optimizer part and group, where its state
    lives). Blocks of one container (``layers.0``, ``layers.1``, ...) whose parameters have
    equal signatures, consecutive by index, form a run. Of a run longer than ``2 × keep``
    blocks, the first ``keep`` and the last ``keep`` in stepping order are kept; each
    parameter of a block in between is stood in for by the same parameter of the last block of
    the first ``keep``, stepped with ``keep - 1`` identical blocks before it and ``keep``
    after; its twin is the same parameter of the block stepped next (``keep`` before,
    ``keep - 1`` after). (Not :func:`memtune.units.repeated_blocks`, which finds units in the
    module tree: this works on parameter names, as the optimizer steps them.)"""
    blocks: dict[tuple[str, int], list[str]] = {}
    rel: dict[str, str] = {}
    first: dict[tuple[str, int], int] = {}
    for at, n in enumerate(sequence):
        m = _BLOCK.match(n)
        if m:
            b = (m.group(1), int(m.group(2)))
            blocks.setdefault(b, []).append(n)
            rel[n] = m.group(3)
            first.setdefault(b, at)
    rest = {b: tuple(sorted((rel[n], sig[n]) for n in ns)) for b, ns in blocks.items()}
    out: dict[str, str] = {}
    twins: dict[str, str] = {}
    by_container: dict[str, list[int]] = {}
    for c, i in sorted(blocks):
        by_container.setdefault(c, []).append(i)
    for c, idx in by_container.items():
        run = [idx[0]]
        for i in idx[1:] + [None]:
            if i is not None and i == run[-1] + 1 and rest[(c, i)] == rest[(c, run[0])]:
                run.append(i)
                continue
            if len(run) > 2 * keep:
                stepped = sorted(run, key=lambda j: first[(c, j)])
                stand_in = {rel[n]: n for n in blocks[(c, stepped[keep - 1])]}
                twin = {rel[n]: n for n in blocks[(c, stepped[-keep])]}
                for j in stepped[keep:-keep]:
                    for n in blocks[(c, j)]:
                        out[n], twins[n] = stand_in[rel[n]], twin[rel[n]]
            run = [i] if i is not None else []
    return out, twins


def contexts_agree(full: list[str], reduced: list[str], fold: dict[str, str], sig: dict[str, tuple],
                   sizes: dict[str, int], window: int) -> bool:
    """Whether every left-out parameter (``fold``) is stepped, in ``full``, among the same
    parameters as its stand-in in ``reduced``: the same signatures before and after it, as far
    as the state stream's ``window`` (bytes fetched ahead; ``sizes`` per parameter) reaches,
    one more each way."""
    def around(seq: list[str], i: int) -> tuple:
        def walk(names) -> list:
            out, held = [], 0
            for n in names:
                out.append(sig[n])
                held += sizes[n]
                if held > window:
                    break
            return out
        return tuple(walk(seq[i + 1:])), tuple(walk(reversed(seq[:i])))
    at_f = {n: i for i, n in enumerate(full)}
    at_r = {n: i for i, n in enumerate(reduced)}
    return all(around(full, at_f[d]) == around(reduced, at_r[r]) for d, r in fold.items())


def _stepping_sequence(opt, view, stepped, order, in_backward: bool) -> list[str]:
    """The stepped parameters in the order the recorded step updates them: backward's order
    in backward, the optimizer's groups' order after it (:meth:`PlanOptimizer.step`)."""
    names = {n for n, _ in stepped}
    if in_backward:
        return [n for n in dict.fromkeys(order or (n for n, _ in stepped)) if n in names]
    fqn = {id(p): n for n, p in view.named_parameters()}
    return [fqn[id(p)] for g in opt.param_groups for p in g["params"] if fqn.get(id(p)) in names]


def _signatures(opt, stepped, host_params) -> dict[str, tuple]:
    """What each stepped parameter's update depends on (:func:`folded_blocks`)."""
    parts = {id(part): i for i, part in enumerate(optimizer_parts(opt))}
    out = {}
    for n, p in stepped:
        part, group = opt._where[id(p)]
        m = _BLOCK.match(n)
        out[n] = (m.group(3) if m else n, tuple(p.shape), p.dtype, parts[id(part)], next(i for i, g in enumerate(part.param_groups) if g is group),
                  n in host_params, id(p) in opt._resident)
    return out


def _leave_out(opt, ids: set[int]) -> None:
    """Take the parameters ``ids`` out of ``opt`` (a :class:`PlanOptimizer` not yet stepped)."""
    for part in optimizer_parts(opt):
        for g in part.param_groups:
            keep = [i for i, p in enumerate(g["params"]) if id(p) not in ids]
            if g.get("param_names") is not None:
                g["param_names"] = [g["param_names"][i] for i in keep]
            g["params"] = [g["params"][i] for i in keep]
    opt._index()


def _param_bytes(opt, p, host_ids: set[int], nbytes, on_host: bool) -> tuple[int, int]:
    """(device, host) bytes ``p``'s optimizer state holds, as the whole-step count counts them."""
    state = optimizer_state_tensors(opt, [p])
    device = unique_bytes([t for t in state if id(t.untyped_storage()) not in host_ids], nbytes)
    hosts = list(getattr(opt, "_host_buffers", {}).get(id(p), {}).values()) + (state if on_host else [])
    return device, unique_bytes(hosts, nbytes) + (2 * nbytes(p) if on_host else 0)


def _device_newton_schulz(opt, on_host: list[torch.Tensor]) -> None:
    """The device's part of the host-resident matrices' step (weight offload on a GPU target,
    :meth:`memtune.optim.Muon2.run_ns_on`): one matrix at a time, its input arrives in the NS
    dtype, the iterations run and the result leaves. Run here on fake tensors, each distinct
    shape once, under the recorder of the step: the step's transient is the larger of this and
    the device parameters' update. Every such matrix is recorded as if it went to the device
    (the runtime keeps the smallest on the host when the host is priced faster: never more)."""
    from .optim.muon2 import Muon2, _as_matrix, orthogonalize

    mine = {id(p) for p in on_host}
    done = set()
    for part in optimizer_parts(opt):
        if not isinstance(part, Muon2):
            continue
        for g in part.param_groups:
            for p in g["params"]:
                shape = tuple(_as_matrix(p, g["matrix_view"]).shape)
                steps = part.state.get(p, {}).get("ns_steps", g["ns_steps"])
                key = (shape, steps, id(g))
                if id(p) not in mine or key in done:
                    continue
                done.add(key)
                arrived = torch.empty(shape, dtype=g["ns_dtype"], device=p.device)
                out, _ = orthogonalize(arrived, steps, traced=bool(g["adaptive_ns"]), coeffs=g["ns_coefficients"],
                                       eps=g["ns_eps"], dtype=g["ns_dtype"], normalize=g["ns_normalize"])
                del arrived, out


class ParamView(torch.nn.Module):
    """Exposes ``model``'s structure with other parameters (fake or meta), for optimizers that
    split parameters by module type (the Muon²/AdamW hybrid) and for :class:`PlanOptimizer`."""

    def __init__(self, model: torch.nn.Module, params: dict[str, torch.Tensor]):
        super().__init__()
        object.__setattr__(self, "_model", model)
        object.__setattr__(self, "_fparams", params)

    def named_parameters(self, prefix: str = "", recurse: bool = True, remove_duplicate: bool = True):
        yield from self._fparams.items()

    def parameters(self, recurse: bool = True):
        yield from self._fparams.values()

    def named_modules(self, *args, **kwargs):
        return self._model.named_modules(*args, **kwargs)

    def modules(self):
        return self._model.modules()


def _host_buffers(opt) -> list[torch.Tensor]:
    buffers = getattr(opt, "_host_buffers", None) or {}
    return [t for d in buffers.values() for t in d.values()]
