"""Flax NNX normalization layers over the functional core: drop-in for ``flax.nnx``.

Each class has the constructor signature, attributes and state (``nnx.Param``
``scale``/``bias``, ``nnx.BatchStat`` ``mean``/``var``) of its ``flax.nnx`` namesake,
works with ``model.train()``/``model.eval()`` and ``nnx.view``, and only
canonicalizes arguments, reads and writes its variables and calls
:mod:`jaxnorm.functional`, where every number comes from.

The mode decision. ``flax.nnx.BatchNorm`` defaults to ``use_running_average=False``,
so a model that was never put in a mode keeps *training* its statistics while its
user evaluates it, silently. Ours defaults to ``use_running_average=None``, "mode
not set", and calling it in that state raises an error that says to call
``model.train()`` or ``model.eval()`` (or to pass ``use_running_average``).
Everything else about modes is as in flax: ``train()`` sets
``use_running_average=False``, ``eval()`` sets ``True``, and a value passed to
``__call__`` takes precedence over the attribute.

The other differences from flax are those of :mod:`jaxnorm.linen`: exact statistics
under masks and device shards, an empty mask updates nothing, output dtype
``dtype or x.dtype`` (flax promotes bf16 to f32), ``use_fast_variance`` accepted and
ignored, and the BatchNorm extras ``momentum=None``,
``unbiased_running_var`` and ``track_count``, with a ``count`` ``BatchStat`` (int32
scalar) only when ``momentum is None`` or ``track_count=True``.

``promote_dtype`` is taken, with flax's default, by every layer (the variants too) and
called as flax calls it, on the input, the running statistics and the parameters with
``dtype=dtype``; the layer normalizes the input and parameters it returns (running
statistics are read as stored, at least float32), and only the output dtype keeps the
rule above.

Complex inputs are normalized as flax does (complex mean, real variance of
``|x - mean|**2``, real parameters). A BatchNorm's running ``mean`` becomes complex at
its first training step on complex input, as in flax linen (flax NNX writes the
complex mean into its float32 array, dropping the imaginary part).

For features spread over several axes (e.g. ``feature_axes=(-2, -1)``) the
variables are flat, ``(num_features,)`` with ``num_features`` the product of the
feature sizes, as in flax NNX; they are reshaped to the feature shape for the core.

The batch-norm variants (:class:`BatchRenorm`, :class:`PowerNorm`,
:class:`GhostBatchNorm`, :class:`FrozenBatchNorm`, :class:`PowerNormGradStat`,
:func:`update_grad_stats`) live in :mod:`jaxnorm.nnx.variants` and are re-exported
here and by :mod:`jaxnorm.variants_nnx`.

Layout: ``_base`` holds what the layers share (Params and settings, BatchStats and
their fitting, the batch-norm family's mode and call, the per-sample norms' call, the
error context); ``batch_norm``, ``per_sample`` and ``variants`` hold the layers, each
its explicit constructor and one call of the functional core.
"""

from jaxnorm.nnx.adaptive import AdaLNZero, ConditionalBatchNorm
from jaxnorm.nnx.batch_norm import BatchNorm
from jaxnorm.nnx.dyt import DyT
from jaxnorm.nnx.per_sample import GroupNorm, InstanceNorm, LayerNorm, RMSNorm
from jaxnorm.nnx.qk import QKNorm, QKNormAttention
from jaxnorm.nnx.residual import AddLayerNorm, AddRMSNorm
from jaxnorm.nnx.variants import (
    BatchRenorm,
    FrozenBatchNorm,
    GhostBatchNorm,
    PowerNorm,
    PowerNormGradStat,
    update_grad_stats,
)
from jaxnorm.nnx.weights import SpectralNorm, WeightNorm

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
    "PowerNormGradStat",
    "QKNorm",
    "QKNormAttention",
    "RMSNorm",
    "SpectralNorm",
    "WeightNorm",
    "update_grad_stats",
]
