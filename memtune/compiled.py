"""``torch.compile`` support: find the module inside a compiled one, and count recompiles.

``torch.compile(model)`` returns an ``OptimizedModule`` that holds the model as ``_orig_mod``.
memtune profiles, plans and applies plans to that inner module: its FQNs are the model's (the
wrapper would prefix every name with ``_orig_mod.``), and its forwards are what Dynamo traces,
so a plan applied to it is compiled into the next graph. A plan change swaps unit forwards,
which fails Dynamo's guards once and compiles the new plan; :class:`RecompileCounter` counts
those compiles so that a runtime can cap how many distinct plans it compiles.
"""

from __future__ import annotations

import logging

import torch.nn as nn

log = logging.getLogger("memtune.compiled")


def is_compiled(model: nn.Module) -> bool:
    """Whether ``model`` is the wrapper ``torch.compile`` returns for a module."""
    return hasattr(model, "_orig_mod") and isinstance(getattr(model, "_orig_mod"), nn.Module) and \
        type(model).__name__ == "OptimizedModule"


def let_checkpoints_compile() -> None:
    """Opt in: let Dynamo compile a recomputed block whose forward has scoped Python side
    effects, instead of breaking the graph around it. This is faster, but the peak is less
    faithful to the plan.

    Hugging Face models set and reset a module-level variable in each hub-kernel layer's forward
    (``kernels``' ``CompileableContextVar``, e.g. in Llama's RMSNorm). Inside
    ``torch.utils.checkpoint``, Dynamo refuses that side effect ("Mutating a variable from outside
    the scope of this HOP") and breaks the graph. Every recomputed layer then runs eagerly between
    compiled pieces. This function sets ``torch._dynamo.config.skip_fwd_side_effects_in_bwd_under_checkpoint``,
    which keeps such a side effect in forward without replaying it during recomputation. That is
    exact for set/reset pairs. A block that counts its own calls would count the recomputation in
    eager but not when compiled.

    Measured on an HF Llama (4 layers, 3 recomputed) under inductor on a CPU
    (``benchmarks/compile_fidelity.py``, docs/integrations.md):

    - without the flag (the default): 104.5 MiB against 102.1 MiB predicted, 426–467 ms a step;
    - with the flag: 246–249 ms a step, but 116.2 MiB. The inductor-compiled recomputation keeps
      about 12% more than eager checkpointing, which memtune's profile does not model.

    memtune therefore leaves the flag at torch's default. Call this before the first compiled
    step if speed matters more than the first steps' peak. The runtime's closed loop
    (``RetuneConfig``) then tightens the plan once a step has measured the higher peak."""
    import torch._dynamo.config as dynamo_config

    if hasattr(dynamo_config, "skip_fwd_side_effects_in_bwd_under_checkpoint"):
        dynamo_config.skip_fwd_side_effects_in_bwd_under_checkpoint = True
        log.info("memtune: torch._dynamo.config.skip_fwd_side_effects_in_bwd_under_checkpoint = True")


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
