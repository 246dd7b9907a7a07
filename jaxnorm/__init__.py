"""jaxnorm: normalization layers for JAX and Flax.

Pure functions with explicit running statistics::

    stats = jaxnorm.init_batch_stats((64,))
    y, stats = jaxnorm.batch_norm(x, stats, scale, bias, training=True)

Flax wrappers live in :mod:`jaxnorm.linen` and :mod:`jaxnorm.nnx`; batch-norm variants
in :mod:`jaxnorm.variants`; training and deployment helpers (microbatch-exact
statistics, precise BN, folding) in :mod:`jaxnorm.tools`; checkpoints in
:mod:`jaxnorm.checkpoint`; torch conversion in :mod:`jaxnorm.interop.torch`.
"""

from jaxnorm import tools, variants
from jaxnorm.functional import batch_norm, group_norm, instance_norm, layer_norm, rms_norm
from jaxnorm.functional.adaptive import ada_layer_norm, conditional_batch_norm
from jaxnorm.functional.dyt import dyt
from jaxnorm.functional.qk import qk_norm
from jaxnorm.functional.residual import add_layer_norm, add_rms_norm
from jaxnorm.functional.weights import (
    SpectralNormalized,
    divide_by_sigma,
    spectral_normalize,
    weight_normalize,
)
from jaxnorm.state import BatchStats, init_batch_stats, update_batch_stats
from jaxnorm.stats import Moments, mean_square, merge_moments, moments, psum_moments
from jaxnorm.variants import (
    PowerNormStats,
    batch_renorm,
    frozen_batch_norm,
    ghost_batch_norm,
    init_power_norm_stats,
    power_norm,
    renorm_schedule,
    update_power_norm_grad_stat,
)

__version__ = "0.1.0"

__all__ = [
    "BatchStats",
    "Moments",
    "PowerNormStats",
    "SpectralNormalized",
    "ada_layer_norm",
    "add_layer_norm",
    "add_rms_norm",
    "batch_norm",
    "batch_renorm",
    "conditional_batch_norm",
    "divide_by_sigma",
    "dyt",
    "frozen_batch_norm",
    "ghost_batch_norm",
    "group_norm",
    "init_batch_stats",
    "init_power_norm_stats",
    "instance_norm",
    "layer_norm",
    "mean_square",
    "merge_moments",
    "moments",
    "power_norm",
    "psum_moments",
    "qk_norm",
    "renorm_schedule",
    "rms_norm",
    "spectral_normalize",
    "tools",
    "update_batch_stats",
    "update_power_norm_grad_stat",
    "variants",
    "weight_normalize",
]
