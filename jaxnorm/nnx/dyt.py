"""``jaxnorm.nnx.DyT``: Dynamic Tanh, a statistics-free stand-in for LayerNorm."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from flax.nnx.nn import dtypes
from flax.typing import Dtype, Initializer, PromoteDtypeFn

from jaxnorm._checks import Axes
from jaxnorm._layer_calls import DyTCall
from jaxnorm.nnx._base import _NO_METADATA, _arguments, _PerSampleNorm


class DyT(DyTCall, _PerSampleNorm):
    """Dynamic Tanh, ``scale * tanh(alpha * x) + bias``, via :func:`jaxnorm.dyt`.

    .. math::

        y = \\gamma \\odot \\tanh(\\alpha x) + \\beta

    A drop-in for :class:`LayerNorm` in a Transformer (Zhu et al. 2025): the
    learnable scalar Param ``alpha`` (shape ``()``, initialized to ``alpha_init``) and
    per-channel ``scale`` (ones) and ``bias`` (zeros) of shape ``(num_features,)`` on
    ``feature_axes``, as the paper's ``DynamicTanh`` (whose ``alpha`` has shape
    ``(1,)``; its ``weight`` is our ``scale``). The paper keeps ``alpha_init=0.5`` for
    most models but tunes it for language models (smaller for wider models; a larger
    value in attention blocks than elsewhere), hence the argument. A ``mask`` is
    accepted and ignored: DyT has no statistics.

    Args:
      num_features: number of features (product of the ``feature_axes`` sizes).
      alpha_init: the initial ``alpha``.
      dtype: output dtype; ``None`` keeps the input's dtype.
      param_dtype: dtype of ``alpha``/``scale``/``bias``.
      use_bias: add a learned ``bias``.
      use_scale: multiply by a learned ``scale``.
      bias_init: initializer for ``bias``.
      scale_init: initializer for ``scale``.
      feature_axes: axes carrying ``scale``/``bias`` (default the last; 1 for NCHW).
      promote_dtype: as flax's norms, applied to ``(x, scale, bias)`` and ``dtype``.
      rngs: random generators for the initializers.
      bias_metadata: extra metadata for the ``bias`` Param.
      scale_metadata: extra metadata for the ``scale`` Param.

    Example:
      >>> import jax.numpy as jnp, jaxnorm.nnx as jnnx
      >>> from flax import nnx
      >>> layer = jnnx.DyT(3, rngs=nnx.Rngs(0))
      >>> [round(float(v), 4) for v in layer(jnp.array([[-2.0, 0.0, 2.0]]))[0]]
      [-0.7616, 0.0, 0.7616]

    References:
      Zhu, Chen, He, LeCun & Liu (2025), "Transformers without Normalization".
    """

    def __init__(
        self,
        num_features: int,
        *,
        alpha_init: float = 0.5,
        dtype: Dtype | None = None,
        param_dtype: Dtype = jnp.float32,
        use_bias: bool = True,
        use_scale: bool = True,
        bias_init: Initializer = nnx.initializers.zeros,
        scale_init: Initializer = nnx.initializers.ones,
        feature_axes: Axes = -1,
        promote_dtype: PromoteDtypeFn = dtypes.promote_dtype,
        rngs: nnx.Rngs,
        bias_metadata: Mapping[str, Any] = _NO_METADATA,
        scale_metadata: Mapping[str, Any] = _NO_METADATA,
    ):
        super().__init__(**_arguments(locals()))
        self.alpha = nnx.Param(jnp.full((), alpha_init, param_dtype))

    def _alpha(self) -> jax.Array:
        return self.alpha[...]
