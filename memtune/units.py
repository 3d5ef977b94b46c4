"""Which modules are the checkpointable units.

By default: the repeated blocks, i.e. structurally identical children of a ``ModuleList``
or ``Sequential`` (transformer blocks, residual stages). Structure is the module type plus
the names, shapes and dtypes of its parameters. When containers nest, the outermost repeated
level wins. A user can override with FQNs, module types, or a predicate.
"""

from __future__ import annotations

from collections import Counter
from typing import Callable, Iterable, Sequence, Union

import torch.nn as nn

from .errors import MemtuneError

UnitSpec = Union[None, Sequence[Union[str, type]], Callable[[str, nn.Module], bool]]


def _signature(m: nn.Module) -> tuple:
    params = tuple((n, tuple(p.shape), p.dtype) for n, p in m.named_parameters())
    return type(m), params


def _is_block(m: nn.Module) -> bool:
    """A composite module that holds parameters (not a bare Linear, norm or activation)."""
    return any(True for _ in m.children()) and any(True for _ in m.parameters())


def repeated_blocks(model: nn.Module) -> list[str]:
    """FQNs of the repeated blocks, in registration order."""
    found: list[str] = []
    for name, mod in model.named_modules():
        if not isinstance(mod, (nn.ModuleList, nn.Sequential)) or len(mod) < 2:
            continue
        if any(name == f or name.startswith(f + ".") for f in found):
            continue  # inside a block we already took
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
        prefix = f"{name}." if name else ""
        found += [prefix + child for child, c in mod.named_children() if key(c) == sig and (key is _signature or _is_block(c))]
    # Drop containers that sit inside another found block (outermost level wins).
    return [f for f in found if not any(f != g and f.startswith(g + ".") for g in found)]


def resolve_units(model: nn.Module, units: UnitSpec = None) -> list[str]:
    """Unit FQNs for ``units``: None (repeated blocks, else the top-level children that own
    parameters), a list of FQNs and/or module types, or a ``(fqn, module) -> bool`` predicate."""
    modules = dict(model.named_modules())
    if units is None:
        fqns = repeated_blocks(model)
        if not fqns:
            fqns = [n for n, c in model.named_children() if any(True for _ in c.parameters())]
        return fqns
    if callable(units) and not isinstance(units, (list, tuple)):
        fqns = [n for n, m in modules.items() if n and units(n, m)]
    else:
        fqns = []
        for spec in units:
            if isinstance(spec, str):
                if spec not in modules or spec == "":
                    raise MemtuneError(
                        f"unit {spec!r} is not a submodule FQN of {type(model).__name__}; "
                        f"examples of valid names: {_examples(modules)}"
                    )
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
    return fqns


def _examples(modules: Iterable[str]) -> str:
    names = [n for n in modules if n][:6]
    return ", ".join(repr(n) for n in names)
