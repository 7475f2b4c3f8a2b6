"""dsnot_prune: the layer-wise DSnoT driver for transformers causal LMs (``dsnot-prune``).

    from dsnot_prune import PruneArgs, run, summary
    report = run(PruneArgs(model="smollm2", sparsity=0.6))
    print(summary(report))

Uses only the public ``dsnot_kernels`` API; transformers is imported only when a model is loaded.
"""
from .models import DriverError
from .pipeline import DEFAULT_PRESET, PruneArgs, run, summary

__all__ = ["DEFAULT_PRESET", "DriverError", "PruneArgs", "run", "summary"]
