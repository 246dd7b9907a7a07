"""The batch-norm variants' NNX layers, at their original import path.

They live in :mod:`jaxnorm.nnx.variants` (and are re-exported by
:mod:`jaxnorm.nnx`); ``import jaxnorm.variants_nnx as vnnx`` keeps working.
"""

from jaxnorm.nnx.variants import (
    BatchRenorm,
    FrozenBatchNorm,
    GhostBatchNorm,
    PowerNorm,
    PowerNormGradStat,
    update_grad_stats,
)

__all__ = [
    "BatchRenorm",
    "FrozenBatchNorm",
    "GhostBatchNorm",
    "PowerNorm",
    "PowerNormGradStat",
    "update_grad_stats",
]
