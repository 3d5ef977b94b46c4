"""``torch.compile`` support: find the module inside a compiled one, and count recompiles.

``torch.compile(model)`` returns an ``OptimizedModule`` that holds the model as ``_orig_mod``.
memtune profiles, plans and applies plans to that inner module: its FQNs are the model's (the
wrapper would prefix every name with ``_orig_mod.``), and its forwards are what Dynamo traces,
so a plan applied to it is compiled into the next graph. A plan change swaps unit forwards,
which fails Dynamo's guards once and compiles the new plan; :class:`RecompileCounter` counts
those compiles so that a runtime can cap how many distinct plans it compiles.
"""

from __future__ import annotations

import torch.nn as nn


def is_compiled(model: nn.Module) -> bool:
    """Whether ``model`` is the wrapper ``torch.compile`` returns for a module."""
    return hasattr(model, "_orig_mod") and isinstance(getattr(model, "_orig_mod"), nn.Module) and \
        type(model).__name__ == "OptimizedModule"


def unwrap(model: nn.Module) -> nn.Module:
    """The module a (possibly nested) ``torch.compile`` wrapper runs; ``model`` itself otherwise."""
    while is_compiled(model):
        model = model._orig_mod
    return model


class RecompileCounter:
    """Graphs Dynamo compiled since this counter was made (``torch._dynamo.utils.counters``:
    ``stats/unique_graphs`` counts every frame compiled to a new graph, recompiles included)."""

    def __init__(self) -> None:
        self._start = self._now()

    @staticmethod
    def _now() -> int:
        from torch._dynamo.utils import counters

        return int(counters["stats"]["unique_graphs"])

    @property
    def graphs(self) -> int:
        return self._now() - self._start
