"""Pre-norm residual blocks' fused add + norm for ``jaxnorm.linen``.

``y, residual = norm(x, residual)``: each layer is its fields, its call from
:mod:`jaxnorm._layer_calls` (:func:`jaxnorm.add_rms_norm` or
:func:`jaxnorm.add_layer_norm`) and :class:`_AddNorm` (parameters of the feature shape,
the error context).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.typing import Dtype, Initializer
from jax.nn import initializers

from jaxnorm._checks import Axes
from jaxnorm._layer_calls import AddLayerNormCall, AddRMSNormCall
from jaxnorm.functional.per_sample import CastOrder
from jaxnorm.linen._base import _Layer
from jaxnorm.linen.per_sample import _ZeroCentredScale


class _AddNorm(_ZeroCentredScale, _Layer):
    """The call of the fused add + norm layers; subclasses give fields and the mixin."""

    @nn.compact
    def __call__(
        self, x: jax.Array, residual: jax.Array | None = None
    ) -> tuple[jax.Array, jax.Array]:
        """Add ``x`` to the residual stream and normalize the sum.

        Args:
          x: the block's output (e.g. attention or MLP), floating.
          residual: the residual stream, of ``x``'s shape; ``None`` for the first block.

        Returns:
          ``(y, new_residual)``: the normalized ``x + residual`` (dtype ``self.dtype or
          x.dtype``), the input of the next sublayer, and ``x + residual`` in
          ``self.residual_dtype`` (default: the promoted dtype of the two).

        Raises:
          ValueError, TypeError: the refusals of the functional op, prefixed with this
            module's path.
        """
        scale, bias = self._params(self._axes_shape(x, "feature_axes"))
        with self._errors():
            return self._add_normalize(x, residual, scale, bias, dtype=self.dtype)

    def _add_normalize(self, x, residual, scale, bias, *, dtype):
        """The layer's functional call (a :mod:`jaxnorm._layer_calls` mixin)."""
        raise NotImplementedError


class AddRMSNorm(AddRMSNormCall, _AddNorm):
    """Fused residual add + RMS normalization, via :func:`jaxnorm.add_rms_norm`.

    .. math::

        h = x + r,\\qquad y = \\frac{h}{\\sqrt{\\mathrm{E}[h^2] + \\epsilon}}\\,(o + \\gamma)

    The pre-norm block's ``h = x + residual; y = RMSNorm()(h)`` in one op whose
    backward saves only ``h``, the per-row float32 statistics and ``scale``. Variables
    ``params/scale``, as :class:`RMSNorm` (so the two load each other's variables).

    Attributes:
      epsilon: added to the mean square.
      dtype: dtype of ``y``; ``None`` keeps the input's dtype.
      param_dtype: dtype of ``scale``.
      use_scale: multiply by a learned ``scale``.
      scale_init: initializer for ``scale``; the default (ones) starts the multiplier
        ``scale_offset + scale`` at 1 (zeros when ``scale_offset=1.0``).
      reduction_axes: axes the statistic runs over (default the last).
      feature_axes: axes that carry ``scale`` (default the last).
      residual_dtype: dtype of the new residual; ``None`` is the promoted dtype of
        ``x`` and ``residual``; ``jnp.float32`` keeps a bf16 model's stream in float32
        (flash-attn's ``residual_in_fp32``).
      scale_offset: constant added to ``scale`` in float32 (``1.0``: Gemma's ``1 + w``).
      cast_order: ``"scale_then_cast"`` (Gemma's, flax's) or ``"cast_then_scale"``
        (Llama's), as in :func:`jaxnorm.rms_norm`.

    Example:
      >>> import jax, jax.numpy as jnp, jaxnorm.linen as jnn
      >>> norm = jnn.AddRMSNorm(epsilon=0.0)
      >>> x, r = jnp.array([[1.0, 2.0]]), jnp.array([[2.0, 2.0]])
      >>> y, r = norm.apply(norm.init(jax.random.key(0), x, r), x, r)
      >>> r.tolist(), [round(float(v), 4) for v in y[0]]
      ([[3.0, 4.0]], [0.8485, 1.1314])
    """

    epsilon: float = 1e-6
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32
    use_scale: bool = True
    scale_init: Initializer = initializers.ones
    reduction_axes: Axes = -1
    feature_axes: Axes = -1
    residual_dtype: Any = None
    scale_offset: float = 0.0
    cast_order: CastOrder = "scale_then_cast"


class AddLayerNorm(AddLayerNormCall, _AddNorm):
    """Fused residual add + layer normalization, via :func:`jaxnorm.add_layer_norm`.

    .. math::

        h = x + r,\\qquad
        y = \\frac{h - \\mathrm{E}[h]}{\\sqrt{\\mathrm{Var}[h] + \\epsilon}}\\,(o + \\gamma)
            + \\beta

    The pre-norm block's ``h = x + residual; y = LayerNorm()(h)`` in one op whose
    backward saves only ``h``, the per-row float32 statistics and the parameters.
    Variables ``params/{scale, bias}``, as :class:`LayerNorm`.

    Attributes:
      epsilon: added to the variance.
      dtype: dtype of ``y``; ``None`` keeps the input's dtype.
      param_dtype: dtype of ``scale``/``bias``.
      use_bias: add a learned ``bias``.
      use_scale: multiply by a learned ``scale``.
      bias_init: initializer for ``bias``.
      scale_init: initializer for ``scale``; the default (ones) starts the multiplier
        ``scale_offset + scale`` at 1 (zeros when ``scale_offset=1.0``).
      reduction_axes: axes the statistics run over (default the last).
      feature_axes: axes that carry ``scale``/``bias`` (default the last).
      residual_dtype: dtype of the new residual; ``None`` is the promoted dtype of
        ``x`` and ``residual`` (``jnp.float32``: flash-attn's ``residual_in_fp32``).
      scale_offset: constant added to ``scale`` in float32 (``1.0``: TransformerEngine's
        ``zero_centered_gamma``).
    """

    epsilon: float = 1e-6
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32
    use_bias: bool = True
    use_scale: bool = True
    bias_init: Initializer = initializers.zeros
    scale_init: Initializer = initializers.ones
    reduction_axes: Axes = -1
    feature_axes: Axes = -1
    residual_dtype: Any = None
    scale_offset: float = 0.0
