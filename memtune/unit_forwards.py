"""Run a unit's forward through a wrapper: a module, one call of a shared module, or a segment.

:func:`memtune.apply.apply_plan` (checkpoint, offload) and :mod:`memtune.recompute_safety`
change how units run. A unit named by a module FQN is wrapped by replacing the module's
*instance* ``forward``. The other unit kinds of :mod:`memtune.units` are wrapped the same way
on the module that runs them:

* call *k* of a shared module (``"<fqn>@<k>"``): the module's forward counts its calls, modulo
  the number of calls a forward makes, and sends call *k* through its wrapper. A forward
  pre-hook on the model also restarts the count at every forward of the model, so a forward
  that failed halfway (an OOM retry) does not shift the next one; the modulo keeps the count
  right when a loop calls a submodule rather than the model (a ``training_step`` calling
  ``self.model``);
* a segment (``"<fqn>[a:b]"``): the ``Sequential``'s forward runs its children in order, each
  wrapped segment as one function of its input.

Only instance attributes change, so parameter FQNs and ``state_dict`` keys stay the same.
"""

from __future__ import annotations

import functools
from typing import Callable, Iterable

import torch.nn as nn

from .units import split_unit

Wrapper = Callable[[Callable], Callable]
"""Takes a unit's forward (a function of the unit's inputs) and returns what runs instead."""

ORIGINAL = "_memtune_original_forward"
"""Attribute holding what ``module.__dict__['forward']`` was before memtune (``None``: the class's)."""
RESET = "_memtune_call_count_reset"
"""Attribute of the model holding the hook that restarts the call counts."""
UNITS = "_memtune_wrapped_units"
"""Attribute of a module holding the names of the units wrapped on it."""


_KEYS = (ORIGINAL, UNITS, "forward")


def install(model: nn.Module, wrappers: dict[str, Wrapper], units: Iterable[str] = ()) -> Callable[[], None]:
    """Make each unit of ``wrappers`` (unit name -> wrapper) run through its wrapper; ``units``
    lists every unit of the plan, wrapped or not (it says how many calls of a shared module a
    forward makes). Returns a function that undoes exactly this (what was installed before
    stays); :func:`uninstall` undoes every installation."""
    modules = dict(model.named_modules())
    n_calls: dict[str, int] = {}
    for name in [*units, *wrappers]:
        fqn, call, _ = split_unit(name)
        if call is not None:
            n_calls[fqn] = max(n_calls.get(fqn, 0), call + 1)
    touched = {id(m): m for n, m in modules.items()
               if any(split_unit(u)[0] == n for u in wrappers)}
    before = [(m, {k: m.__dict__[k] for k in _KEYS if k in m.__dict__}) for m in touched.values()]
    had_reset = RESET in model.__dict__

    def undo() -> None:
        for m, saved in before:
            for k in _KEYS:
                m.__dict__.pop(k, None)
            m.__dict__.update(saved)
        if not had_reset and RESET in model.__dict__:
            model.__dict__.pop(RESET)[0].remove()
    calls: dict[str, dict[int, Wrapper]] = {}
    spans: dict[str, list[tuple[int, int, Wrapper]]] = {}
    for name, wrapper in wrappers.items():
        fqn, call, span = split_unit(name)
        if call is not None:
            calls.setdefault(fqn, {})[call] = wrapper
        elif span is not None:
            spans.setdefault(fqn, []).append((span[0], span[1], wrapper))
        else:
            _replace_forward(modules[fqn], wrapper(_forward_of(modules[fqn])), [name])
    for fqn, by_call in calls.items():
        _replace_forward(modules[fqn], _dispatch_calls(model, _forward_of(modules[fqn]), by_call, n_calls[fqn]),
                         [f"{fqn}@{k}" for k in by_call])
    for fqn, segments in spans.items():
        _replace_forward(modules[fqn], _run_segments(modules[fqn], sorted(segments, key=lambda s: s[0])),
                         [f"{fqn}[{a}:{b}]" for a, b, _ in segments])
    return undo


def uninstall(model: nn.Module) -> None:
    """Every module runs its own forward again."""
    handle = model.__dict__.pop(RESET, None)
    if handle is not None:
        handle[0].remove()
    for m in model.modules():
        if ORIGINAL in m.__dict__:
            original = m.__dict__.pop(ORIGINAL)
            m.__dict__.pop(UNITS, None)
            if original is None:
                m.__dict__.pop("forward", None)
            else:
                m.__dict__["forward"] = original


def wrapped_units(model: nn.Module) -> dict[str, nn.Module]:
    """Unit name -> the module wrapped to run it, for every unit :func:`install` wrapped."""
    return {u: m for m in model.modules() for u in m.__dict__.get(UNITS, ())}


def _forward_of(module: nn.Module) -> Callable:
    original = module.__dict__.get("forward")
    return original if original is not None else module.forward  # bound class method


def _replace_forward(module: nn.Module, forward: Callable, names: list[str]) -> None:
    module.__dict__[ORIGINAL] = module.__dict__.get("forward")
    module.__dict__[UNITS] = tuple(names)
    module.__dict__["forward"] = forward


def _dispatch_calls(model: nn.Module, forward: Callable, by_call: dict[int, Wrapper], n_calls: int) -> Callable:
    wrapped = {k: w(forward) for k, w in by_call.items()}
    count = [0]
    counters = model.__dict__.get(RESET)
    if counters is None:
        counters = [None, []]

        def restart(*_):
            for c in counters[1]:
                c[0] = 0
        counters[0] = model.register_forward_pre_hook(restart)
        model.__dict__[RESET] = counters
    counters[1].append(count)

    @functools.wraps(forward)
    def dispatch(*args, **kwargs):
        k = count[0]
        count[0] = (k + 1) % n_calls
        return wrapped.get(k, forward)(*args, **kwargs)
    return dispatch


def _run_segments(seq: nn.Sequential, segments: list[tuple[int, int, Wrapper]]) -> Callable:
    children = list(seq)

    def chain(a: int, b: int) -> Callable:
        def run(x):
            for m in children[a:b]:
                x = m(x)
            return x
        return run

    steps, at = [], 0
    for a, b, wrapper in segments:
        if a > at:
            steps.append(chain(at, a))
        steps.append(wrapper(chain(a, b)))
        at = b
    if at < len(children):
        steps.append(chain(at, len(children)))

    def forward(input):
        for step in steps:
            input = step(input)
        return input
    return forward
