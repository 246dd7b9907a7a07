"""jaxnorm: normalization layers for JAX and Flax.

Pure functions with explicit running statistics::

    stats = jaxnorm.init_batch_stats((64,))
    y, stats = jaxnorm.batch_norm(x, stats, scale, bias, training=True)

Flax wrappers live in :mod:`jaxnorm.linen` and :mod:`jaxnorm.nnx`.
"""

from jaxnorm.functional import batch_norm, group_norm, instance_norm, layer_norm, rms_norm
from jaxnorm.state import BatchStats, init_batch_stats, update_batch_stats
from jaxnorm.stats import Moments, mean_square, merge_moments, moments, psum_moments

__version__ = "0.1.0"

__all__ = [
    "BatchStats",
    "Moments",
    "batch_norm",
    "group_norm",
    "init_batch_stats",
    "instance_norm",
    "layer_norm",
    "mean_square",
    "merge_moments",
    "moments",
    "psum_moments",
    "rms_norm",
    "update_batch_stats",
]
