"""memtune's optimizers: Muon² (Muon with second-moment preconditioning before Newton-Schulz),
a hybrid Muon²/AdamW builder, low-precision optimizer state, and the cost functions the
planner prices them with. See docs/muon2.md."""

from memtune.optim.adamw import AdamW
from memtune.optim.hybrid import HybridOptimizer, ParamSplit, build_optimizer, split_parameters
from memtune.optim.muon2 import Muon2
from memtune.optim.newton_schulz import (newton_schulz, newton_schulz_traced, ns_flops, ns_workspace_bytes,
                                         orthogonality_error)
from memtune.optim.quant import BLOCK_SIZE, dequantize_blockwise, quantize_blockwise, state_bytes
from memtune.optim.settings import AdaptiveNS, OptimizerConfigError, OptimizerSettings

__all__ = [
    "AdamW", "AdaptiveNS", "BLOCK_SIZE", "HybridOptimizer", "Muon2", "OptimizerConfigError", "OptimizerSettings",
    "ParamSplit", "build_optimizer", "dequantize_blockwise", "newton_schulz", "newton_schulz_traced", "ns_flops",
    "ns_workspace_bytes", "orthogonality_error", "quantize_blockwise", "split_parameters", "state_bytes",
]
