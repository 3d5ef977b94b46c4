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
    """Let Dynamo compile a recomputed block whose forward has scoped Python side effects, instead
    of breaking the graph around it.

    Hugging Face models set and reset a module-level variable in each hub-kernel layer's forward
    (``kernels``' ``CompileableContextVar``, e.g. in Llama's RMSNorm). Inside
    ``torch.utils.checkpoint`` Dynamo refuses that side effect ("Mutating a variable from outside
    the scope of this HOP"), breaks the graph, and runs every recomputed layer eagerly. Measured
    on an HF Llama under inductor, two recomputed layers of four cost 366 ms a step this way,
    against 241 ms with the flag set (``benchmarks/compile_fidelity.py``). The flag makes Dynamo
    keep such a side effect in forward without replaying it during recomputation. That is exact
    for scoped set/reset pairs. A block that counts its own calls in a Python attribute would
    count the recomputation in eager but not when compiled.

    Set by :func:`memtune.apply_plan` when a plan recomputes anything. It changes nothing for
    eager runs. ``torch._dynamo.config.skip_fwd_side_effects_in_bwd_under_checkpoint = False``
    after ``apply_plan`` restores torch's default."""
    global _checkpoint_flag_set
    if _checkpoint_flag_set:
        return
    _checkpoint_flag_set = True
    import torch._dynamo.config as dynamo_config

    if hasattr(dynamo_config, "skip_fwd_side_effects_in_bwd_under_checkpoint") and \
            not dynamo_config.skip_fwd_side_effects_in_bwd_under_checkpoint:
        dynamo_config.skip_fwd_side_effects_in_bwd_under_checkpoint = True
        log.info("memtune: torch._dynamo.config.skip_fwd_side_effects_in_bwd_under_checkpoint = True, so that "
                 "recomputed blocks compile (memtune.compiled.let_checkpoints_compile)")


_checkpoint_flag_set = False


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
