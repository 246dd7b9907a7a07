"""Normalization functions: the only place in jaxnorm with normalization math.

Every function here is pure and jit-friendly. Statistics come from
:mod:`jaxnorm.stats` in ``promote(x.dtype, float32)``; the output has ``x``'s dtype
unless ``dtype`` says otherwise. All arguments are validated at trace time.

Axis conventions:

* ``batch_norm``: ``axis`` names the *feature* axes, which are kept; every other
  axis is reduced (flax's ``axis``; torch's channel axis 1 is ``axis=1``).
* ``layer_norm`` / ``rms_norm``: ``axis`` names the *reduced* axes (default the
  last); ``feature_axis`` names the axes that carry ``scale``/``bias`` (default
  the same). torch's ``normalized_shape`` of ``k`` dims is ``axis=(-k, ..., -1)``.
* ``group_norm`` / ``instance_norm``: ``axis`` names the channel axis (flax: -1,
  torch: 1); axis 0 is the batch axis.
"""

from jaxnorm.functional._core import mask_safe
from jaxnorm.functional.adaptive import ada_layer_norm, conditional_batch_norm
from jaxnorm.functional.batch import batch_norm
from jaxnorm.functional.dyt import dyt
from jaxnorm.functional.per_sample import group_norm, instance_norm, layer_norm, rms_norm
from jaxnorm.functional.qk import qk_norm
from jaxnorm.functional.residual import add_layer_norm, add_rms_norm
from jaxnorm.functional.weights import (
    SpectralNormalized,
    divide_by_sigma,
    spectral_normalize,
    weight_normalize,
)

__all__ = [
    "batch_norm",
    "layer_norm",
    "rms_norm",
    "group_norm",
    "instance_norm",
    "mask_safe",
    "qk_norm",
    "dyt",
    "ada_layer_norm",
    "conditional_batch_norm",
    "SpectralNormalized",
    "divide_by_sigma",
    "spectral_normalize",
    "weight_normalize",
    "add_layer_norm",
    "add_rms_norm",
]
