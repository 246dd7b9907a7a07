"""Flax linen normalization layers over the functional core: drop-in for ``flax.linen``.

Each class here has the field names, defaults, ``__call__`` signature and variable
tree of its ``flax.linen`` namesake, so ``import jaxnorm.linen as jnn`` and
``nn.BatchNorm`` -> ``jnn.BatchNorm`` is the whole migration, and variables created
by flax load unchanged (and the other way round). The modules only canonicalize
arguments, create or fetch variables and call :mod:`jaxnorm.functional`; every
number they produce comes from there.

What differs from flax, on purpose:

* Statistics are exact: masks and uneven device shards give the statistics of the
  global batch (flax averages per-device means), variance is computed by a method
  that survives large means, and a step whose mask selects nothing leaves the
  running statistics unchanged (flax writes NaN). Statistics are always
  accumulated in at least float32 by the robust method: ``use_fast_variance`` is
  accepted and ignored, and ``force_float32_reductions=False`` only changes what it
  changes in flax's variable tree (``BatchNorm`` stores ``batch_stats`` in
  ``param_dtype``).
* The output dtype is ``dtype`` if given, else the input's dtype (flax promotes
  a bfloat16 input with float32 parameters to a float32 output; we keep bfloat16).
* ``BatchNorm`` takes ``momentum=None`` (torch's cumulative average),
  ``unbiased_running_var`` (torch's Bessel-corrected running variance) and
  ``track_count``. The extra variable ``batch_stats/count`` (int32 scalar, torch's
  ``num_batches_tracked``) exists only when ``momentum is None`` or
  ``track_count=True``, so flax's ``{'mean', 'var'}`` trees load unchanged.
* Complex inputs are normalized as flax does (complex mean, real variance of
  ``|x - mean|**2``, real parameters; ``BatchNorm``'s running ``mean`` becomes complex
  at its first training step, as flax's update makes it).
* Errors name the fix: training without ``mutable=['batch_stats']``, evaluating
  before any ``batch_stats`` exist, and variables of the wrong shape (the core's
  message, prefixed with the module's path).

The batch-norm variants (:class:`BatchRenorm`, :class:`PowerNorm`,
:class:`GhostBatchNorm`, :class:`FrozenBatchNorm`, :func:`update_grad_stats`) live in
:mod:`jaxnorm.linen.variants` and are re-exported here and by
:mod:`jaxnorm.variants_linen`.

Layout: ``_base`` holds what the layers share (the batch-norm family's fields, mode,
variables and call; the per-sample norms' call; the error context), ``batch_norm``,
``per_sample`` and ``variants`` hold the layers, each its fields and one call of the
functional core.
"""

from jaxnorm.linen.adaptive import AdaLNZero, ConditionalBatchNorm
from jaxnorm.linen.batch_norm import BatchNorm
from jaxnorm.linen.dyt import DyT
from jaxnorm.linen.per_sample import GroupNorm, InstanceNorm, LayerNorm, RMSNorm
from jaxnorm.linen.qk import QKNorm, qk_norm_attention
from jaxnorm.linen.residual import AddLayerNorm, AddRMSNorm
from jaxnorm.linen.variants import (
    BatchRenorm,
    FrozenBatchNorm,
    GhostBatchNorm,
    PowerNorm,
    update_grad_stats,
)
from jaxnorm.linen.weights import SpectralNorm, WeightNorm

__all__ = [
    "AdaLNZero",
    "AddLayerNorm",
    "AddRMSNorm",
    "BatchNorm",
    "BatchRenorm",
    "ConditionalBatchNorm",
    "DyT",
    "FrozenBatchNorm",
    "GhostBatchNorm",
    "GroupNorm",
    "InstanceNorm",
    "LayerNorm",
    "PowerNorm",
    "QKNorm",
    "RMSNorm",
    "SpectralNorm",
    "WeightNorm",
    "qk_norm_attention",
    "update_grad_stats",
]
