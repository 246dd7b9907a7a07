"""The batch-norm variants' linen layers, at their original import path.

They live in :mod:`jaxnorm.linen.variants` (and are re-exported by
:mod:`jaxnorm.linen`); ``import jaxnorm.variants_linen as vnn`` keeps working.
"""

from jaxnorm.linen.variants import (
    BatchRenorm,
    FrozenBatchNorm,
    GhostBatchNorm,
    PowerNorm,
    update_grad_stats,
)

__all__ = ["BatchRenorm", "FrozenBatchNorm", "GhostBatchNorm", "PowerNorm", "update_grad_stats"]
