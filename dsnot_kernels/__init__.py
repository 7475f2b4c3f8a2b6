"""dsnot_kernels: fast, exact DSnoT (Dynamic Sparse No Training) for pruned LLM linear layers.

    import dsnot_kernels as dk
    acc = dk.StatsAccumulator(layer.in_features); acc.update(x); stats = acc.finalize()
    res = dk.refine(layer, stats, dk.RefineConfig(sparsity=0.6))
    dk.apply_mask_(layer, res)

Importing this package needs only torch: no GPU, no triton, no compiled extension, and it
never imports transformers.
"""
from .api import apply_mask_, build_problem, refine, refine_many
from .backends import BACKENDS, available_backends
from .stats import StatsAccumulator
from .types import LayerStats, RefineConfig, RefineResult, parse_pattern

__version__ = "0.1.0"

__all__ = [
    "BACKENDS", "LayerStats", "RefineConfig", "RefineResult", "StatsAccumulator",
    "apply_mask_", "available_backends", "build_problem", "parse_pattern", "refine",
    "refine_many", "__version__",
]
