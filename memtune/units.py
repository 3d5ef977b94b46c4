"""Which modules are the checkpointable units.

By default: the repeated blocks, i.e. structurally identical children of a ``ModuleList``
or ``Sequential`` (transformer blocks, residual stages). Structure is the module type plus
the names, shapes and dtypes of its parameters. When containers nest, the outermost repeated
level wins. A ``ModuleList`` of one composite block (a one-layer config of a model family) has
that block as its unit. With nothing of the kind, the model's children that hold parameters
are the units, less its output head. A user can override with FQNs, module types, or a
predicate.

Two more kinds of unit come from how the model runs rather than from its module tree:

* **Calls of a shared module.** A composite module the forward calls several times (ALBERT's
  one layer, applied ``num_hidden_layers`` times) is a unit per call, named ``"<fqn>@<k>"``
  (call *k*, counted from 0 in each forward). The profiler counts the calls on a fake forward
  (:func:`resolve_units` with ``calls``); each call is recorded, planned and applied on its own.
* **Segments of a plain ``nn.Sequential``.** A chain of leaf layers (``Linear, ReLU, Linear, ...``)
  has no repeated block, and checkpointing one ``Linear`` frees nothing (the next activation
  saves the same tensor). Its children are cut into contiguous segments, each a unit named
  ``"<fqn>[<start>:<stop>]"`` (child indices, ``stop`` excluded; ``"[0:6]"`` for the model
  itself). Recomputing a segment keeps only its input.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from typing import Callable, Iterable, Mapping, Sequence, Union

import torch.nn as nn

from .errors import MemtuneError

UnitSpec = Union[None, Sequence[Union[str, type]], Callable[[str, nn.Module], bool]]

MIN_SEGMENTED_LAYERS = 4
"""A plain ``Sequential`` is cut into segments when at least this many of its children hold parameters."""

_CALL = re.compile(r"(.*)@(\d+)")
_SPAN = re.compile(r"(.*)\[(\d+):(\d+)\]")


def call_unit(fqn: str, k: int) -> str:
    """The name of call ``k`` of module ``fqn`` as a unit."""
    return f"{fqn}@{k}"


def segment_unit(fqn: str, start: int, stop: int) -> str:
    """The name of children ``start:stop`` of the ``Sequential`` at ``fqn`` as a unit."""
    return f"{fqn}[{start}:{stop}]"


def split_unit(name: str) -> tuple[str, int | None, tuple[int, int] | None]:
    """(module FQN, call index or ``None``, (start, stop) child span or ``None``) of a unit name."""
    m = _CALL.fullmatch(name)
    if m:
        return m[1], int(m[2]), None
    m = _SPAN.fullmatch(name)
    if m:
        return m[1], None, (int(m[2]), int(m[3]))
    return name, None, None


def is_plain_sequential(m: nn.Module) -> bool:
    """An ``nn.Sequential`` whose forward is the plain chain (a segment of it may run alone)."""
    return isinstance(m, nn.Sequential) and type(m).forward is nn.Sequential.forward


def unit_problem(modules: Mapping[str, nn.Module], name: str) -> str | None:
    """Why ``name`` is not a unit of the model whose ``named_modules()`` is ``modules`` (``None``: it is)."""
    fqn, _, span = split_unit(name)
    m = modules.get(fqn)
    if m is None or (fqn == "" and span is None):
        return f"{fqn!r} is not a submodule FQN"
    if span is not None:
        if not is_plain_sequential(m):
            return f"{fqn!r} is a {type(m).__name__}, not a plain nn.Sequential, so it has no segments"
        if not 0 <= span[0] < span[1] <= len(m):
            return f"segment {span[0]}:{span[1]} is outside the {len(m)} children of {fqn or 'the model'}"
    return None


def unit_module_type(modules: Mapping[str, nn.Module], name: str) -> str:
    """The type name a profile gives unit ``name``: its module's, or ``"Sequential[a:b]"``."""
    fqn, _, span = split_unit(name)
    kind = type(modules[fqn]).__name__
    return kind if span is None else f"{kind}[{span[0]}:{span[1]}]"


def unit_param_prefixes(modules: Mapping[str, nn.Module], name: str) -> tuple[str, ...]:
    """Module FQNs whose parameters unit ``name`` owns. A shared module's parameters belong to
    its first call (they are stored once)."""
    fqn, call, span = split_unit(name)
    if call:
        return ()
    if span is None:
        return (fqn,)
    prefix = f"{fqn}." if fqn else ""
    return tuple(prefix + c for c in list(modules[fqn]._modules)[span[0]:span[1]])


def inside_unit(unit: str, fqn: str) -> bool:
    """Whether the parameter or buffer ``fqn`` lies inside ``unit``: its module (every call of a
    shared module), or one of the children its segment spans."""
    base, _, span = split_unit(unit)
    prefix = f"{base}." if base else ""
    if not fqn.startswith(prefix):
        return False
    if span is None:
        return True
    child = fqn[len(prefix):].split(".", 1)[0]
    return child.isdigit() and span[0] <= int(child) < span[1]


def owns(prefixes: Iterable[str], param_fqn: str) -> bool:
    return any(param_fqn == p or param_fqn.startswith(p + ".") for p in prefixes)


def _signature(m: nn.Module) -> tuple:
    params = tuple((n, tuple(p.shape), p.dtype) for n, p in m.named_parameters())
    return type(m), params


def _is_block(m: nn.Module) -> bool:
    """A composite module that holds parameters (not a bare Linear, norm or activation)."""
    return any(True for _ in m.children()) and any(True for _ in m.parameters())


def _inside(name: str, others: Iterable[str]) -> bool:
    return any(name != g and (g == "" or name.startswith(g + ".")) for g in others)


def repeated_blocks(model: nn.Module) -> list[str]:
    """FQNs of the repeated blocks, in registration order."""
    found: list[str] = []
    for name, mod in model.named_modules():
        if not isinstance(mod, (nn.ModuleList, nn.Sequential)) or not len(mod):
            continue
        if any(name == f or name.startswith(f + ".") for f in found):
            continue  # inside a block we already took
        if len(mod) == 1:
            # A stack of one (a one-layer config of a model family): its block is still the unit.
            child, c = next(iter(mod.named_children()))
            if isinstance(mod, nn.ModuleList) and _is_block(c):
                found.append(f"{name}.{child}" if name else child)
            continue
        counts = Counter(_signature(c) for c in mod.children())
        sig, n = counts.most_common(1)[0]
        key = _signature
        if n < 2 or not sig[1]:
            # Blocks of one type whose parameters differ slightly (T5's first block alone holds
            # the relative position bias) still repeat: match composite modules by type.
            by_type = Counter(type(c) for c in mod.children() if _is_block(c))
            if not by_type:
                continue
            sig, n = by_type.most_common(1)[0]
            key = type
            if n < 2:
                continue  # nothing repeats, or the repeated children hold no parameters
        chosen = [(child, c) for child, c in mod.named_children() if key(c) == sig and (key is _signature or _is_block(c))]
        if is_plain_sequential(mod) and not any(_is_block(c) for _, c in chosen):
            continue  # bare layers of a chain free nothing when recomputed: cut it into segments instead
        prefix = f"{name}." if name else ""
        found += [prefix + child for child, _ in chosen]
    # Drop containers that sit inside another found block (outermost level wins).
    return [f for f in found if not any(f != g and f.startswith(g + ".") for g in found)]


def shared_modules(model: nn.Module, calls: Mapping[str, int]) -> list[str]:
    """FQNs of the outermost composite modules that hold parameters and that one forward calls
    more than once (``calls``: module FQN -> calls in one forward), in registration order."""
    found: list[str] = []
    for name, mod in model.named_modules():
        if name and calls.get(name, 0) > 1 and _is_block(mod) and not _inside(name, found):
            found.append(name)
    return found


def sequential_segments(model: nn.Module) -> list[str]:
    """Segment units of the outermost plain ``Sequential`` chains with at least
    :data:`MIN_SEGMENTED_LAYERS` children that hold parameters.

    Each child that holds parameters starts a layer (parameter-free children, such as the
    activation after a ``Linear``, join the layer before them); about ``sqrt(layers)``
    consecutive layers form a segment. Recomputing every segment then keeps one input per
    segment and one segment's activations at a time, the sqrt(n) schedule of Chen et al.,
    "Training Deep Nets with Sublinear Memory Cost" (2016)."""
    found: list[str] = []
    for name, mod in model.named_modules():
        if not is_plain_sequential(mod) or _inside(name, [f for f, _ in found]) or \
                any(name == f for f, _ in found):
            continue
        starts = [i for i, c in enumerate(mod.children()) if any(True for _ in c.parameters())]
        if len(starts) < MIN_SEGMENTED_LAYERS:
            continue
        starts[0] = 0  # leading parameter-free children join the first layer
        per_segment = max(2, round(math.sqrt(len(starts))))
        cuts = starts[::per_segment] + [len(mod)]
        found.append((name, [segment_unit(name, a, b) for a, b in zip(cuts, cuts[1:])]))
    return [u for _, segs in found for u in segs]


def resolve_units(model: nn.Module, units: UnitSpec = None, *, calls: Mapping[str, int] | None = None) -> list[str]:
    """Unit names for ``units``: None (discovered, see the module docstring), a list of FQNs,
    unit names and/or module types, or a ``(fqn, module) -> bool`` predicate.

    ``calls`` (module FQN -> calls in one forward, as the profiler counts them) lets discovery
    find shared modules, and names the calls of a unit the forward calls several times apart
    (discovered or given); without it units are found from the module tree alone."""
    modules = dict(model.named_modules())
    if units is None:
        fqns = repeated_blocks(model)
        if calls:
            fqns += [s for s in shared_modules(model, calls) if s not in fqns and not _inside(s, fqns) and
                     not any(_inside(f, [s]) for f in fqns)]
            order = {n: i for i, n in enumerate(modules)}
            fqns = _per_call(sorted(fqns, key=order.__getitem__), calls)
        if not fqns:
            fqns = sequential_segments(model)
        if not fqns:
            # The output head is no unit: recomputing a lone Linear frees nothing, and the chunked
            # loss (memtune.loss_chunking) runs it without calling the module.
            try:
                head = getattr(model, "get_output_embeddings", lambda: None)()
            except (NotImplementedError, AttributeError):
                head = None
            fqns = [n for n, c in model.named_children() if any(True for _ in c.parameters()) and c is not head]
        return fqns
    if callable(units) and not isinstance(units, (list, tuple)):
        fqns = [n for n, m in modules.items() if n and units(n, m)]
    else:
        fqns = []
        for spec in units:
            if isinstance(spec, str):
                problem = unit_problem(modules, spec)
                if problem is not None:
                    raise MemtuneError(f"unit {spec!r}: {problem} of {type(model).__name__}; "
                                       f"examples of valid names: {_examples(modules)}")
                fqns.append(spec)
            elif isinstance(spec, type) and issubclass(spec, nn.Module):
                hits = [n for n, m in modules.items() if n and type(m) is spec]
                if not hits:
                    raise MemtuneError(f"no submodule of type {spec.__name__} in {type(model).__name__}")
                fqns += hits
            else:
                raise MemtuneError(f"unit spec {spec!r} must be a module FQN (str) or an nn.Module subclass")
    fqns = list(dict.fromkeys(fqns))
    nested = [f for f in fqns if any(f != g and f.startswith(g + ".") for g in fqns)]
    if nested:
        raise MemtuneError(f"units may not nest: {nested[0]!r} lies inside another unit; pick one level")
    return _per_call(fqns, calls or {})


def _per_call(fqns: list[str], calls: Mapping[str, int]) -> list[str]:
    """``fqns`` with each module the forward calls several times replaced by a unit per call:
    such a module is recorded and planned per call."""
    return [call_unit(f, k) if calls.get(f, 0) > 1 else f for f in fqns for k in range(max(1, calls.get(f, 0)))]


def _examples(modules: Iterable[str]) -> str:
    names = [n for n in modules if n][:6]
    return ", ".join(repr(n) for n in names)
