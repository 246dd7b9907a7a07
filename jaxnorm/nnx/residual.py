"""Pre-norm residual blocks' fused add + norm for ``jaxnorm.nnx``.

``y, residual = norm(x, residual)``: each layer is its constructor (the unfused layer's
options less ``_NOT_FUSED``, plus ``residual_dtype``), its call from
:mod:`jaxnorm._layer_calls` (:func:`jaxnorm.add_rms_norm` or
:func:`jaxnorm.add_layer_norm`) and :class:`_AddNorm` (Params, settings, the error
context). They take no ``promote_dtype``: the op reads ``x``, the residual and the
parameters in their own dtypes and computes in float32, and promoting a bf16 ``x`` to
float32 first would only add a full-size copy.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
from flax import nnx
from flax.typing import Dtype, Initializer
from typing_extensions import TypedDict, Unpack

from jaxnorm._checks import Axes
from jaxnorm._layer_calls import AddLayerNormCall, AddRMSNormCall, scale_init_for
from jaxnorm._signatures import extends
from jaxnorm.functional.per_sample import CastOrder
from jaxnorm.nnx._base import _errors_at, _feature_shape, _fit, _Layer
from jaxnorm.nnx.per_sample import LayerNorm, RMSNorm

# RMSNorm's and LayerNorm's options that the fused layers do not take: the op reads its
# inputs in their own dtypes (no promote_dtype) and reduces on one device.
_NOT_FUSED = ("axis_name", "axis_index_groups", "use_fast_variance", "promote_dtype")


class _AddNormOptions(TypedDict, total=False):
    """The fused layers' keyword options (for ``Unpack``); defaults: the unfused layer's."""

    epsilon: float
    dtype: Dtype | None
    param_dtype: Dtype
    use_scale: bool
    scale_init: Initializer
    reduction_axes: Axes
    feature_axes: Axes
    scale_offset: float
    rngs: nnx.Rngs
    scale_metadata: Mapping[str, Any]


class _AddRMSNormOptions(_AddNormOptions, total=False):
    cast_order: CastOrder


class _AddLayerNormOptions(_AddNormOptions, total=False):
    use_bias: bool
    bias_init: Initializer
    bias_metadata: Mapping[str, Any]


class _AddNorm(_Layer):
    """The call of the fused add + norm layers; subclasses give the constructor and mixin."""

    def __call__(
        self, x: jax.Array, residual: jax.Array | None = None
    ) -> tuple[jax.Array, jax.Array]:
        """Add ``x`` to the residual stream and normalize the sum.

        Args:
          x: the block's output (e.g. attention or MLP), floating.
          residual: the residual stream, of ``x``'s shape; ``None`` for the first block.

        Returns:
          ``(y, new_residual)``: the normalized ``x + residual`` (dtype ``self.dtype or
          x.dtype``) and ``x + residual`` in ``self.residual_dtype`` (default: the
          promoted dtype of the two).

        Raises:
          ValueError, TypeError: an ``x`` without ``num_features`` features, and the
            refusals of the functional op, prefixed with the class name.
        """
        shape = _feature_shape(self, "feature_axes", self.feature_axes, x)
        params = [getattr(self, name, None) for name in ("scale", "bias")]
        scale, bias = (None if p is None else _fit(p[...], shape) for p in params)
        with _errors_at(self):
            return self._add_normalize(x, residual, scale, bias, dtype=self.dtype)

    def _add_normalize(self, x, residual, scale, bias, *, dtype):
        """The layer's functional call (a :mod:`jaxnorm._layer_calls` mixin)."""
        raise NotImplementedError


class AddRMSNorm(AddRMSNormCall, _AddNorm):
    """Fused residual add + RMS normalization, via :func:`jaxnorm.add_rms_norm`.

    The pre-norm block's ``h = x + residual; y = RMSNorm(d)(h)`` in one op whose
    backward saves only ``h``, the per-row float32 statistics and ``scale``. State: the
    ``scale`` Param of :class:`RMSNorm`.

    Args:
      num_features: number of features (product of the ``feature_axes`` sizes).
      epsilon: added to the mean square.
      dtype: dtype of ``y``; ``None`` keeps the input's dtype.
      param_dtype: dtype of ``scale``.
      use_scale: multiply by a learned ``scale``.
      scale_init: initializer for ``scale``; the default (ones) starts the multiplier
        ``scale_offset + scale`` at 1 (zeros when ``scale_offset=1.0``, as Gemma).
      reduction_axes: axes the statistic runs over (default the last).
      feature_axes: axes carrying ``scale`` (default the last).
      residual_dtype: dtype of the new residual; ``None`` is the promoted dtype of
        ``x`` and ``residual``; ``jnp.float32`` keeps a bf16 model's stream in float32
        (flash-attn's ``residual_in_fp32``).
      scale_offset: constant added to ``scale`` in float32 (``1.0``: Gemma's ``1 + w``).
      cast_order: ``"scale_then_cast"`` (Gemma's, flax's) or ``"cast_then_scale"``
        (Llama's), as in :func:`jaxnorm.rms_norm`.
      rngs: random generators for the parameter initializer.
      scale_metadata: extra metadata for the ``scale`` Param.

    Example:
      >>> import jax.numpy as jnp, jaxnorm.nnx as jnnx
      >>> from flax import nnx
      >>> norm = jnnx.AddRMSNorm(2, epsilon=0.0, rngs=nnx.Rngs(0))
      >>> y, r = norm(jnp.array([[1.0, 2.0]]), jnp.array([[2.0, 2.0]]))
      >>> r.tolist(), [round(float(v), 4) for v in y[0]]
      ([[3.0, 4.0]], [0.8485, 1.1314])
    """

    @extends(RMSNorm.__init__, omit=_NOT_FUSED)
    def __init__(
        self,
        num_features: int,
        *,
        residual_dtype: Any = None,
        **options: Unpack[_AddRMSNormOptions],
    ):
        options["scale_init"] = scale_init_for(options["scale_init"], options["scale_offset"])
        super().__init__(num_features=num_features, residual_dtype=residual_dtype, **options)


class AddLayerNorm(AddLayerNormCall, _AddNorm):
    """Fused residual add + layer normalization, via :func:`jaxnorm.add_layer_norm`.

    The pre-norm block's ``h = x + residual; y = LayerNorm(d)(h)`` in one op whose
    backward saves only ``h``, the per-row float32 statistics and the parameters.
    State: the ``scale``/``bias`` Params of :class:`LayerNorm`.

    Args:
      num_features: number of features (product of the ``feature_axes`` sizes).
      epsilon: added to the variance.
      dtype: dtype of ``y``; ``None`` keeps the input's dtype.
      param_dtype: dtype of ``scale``/``bias``.
      use_bias: add a learned ``bias``.
      use_scale: multiply by a learned ``scale``.
      bias_init: initializer for ``bias``.
      scale_init: initializer for ``scale``; the default (ones) starts the multiplier
        ``scale_offset + scale`` at 1 (zeros when ``scale_offset=1.0``).
      reduction_axes: axes the statistics run over (default the last).
      feature_axes: axes carrying ``scale``/``bias`` (default the last).
      residual_dtype: dtype of the new residual; ``None`` is the promoted dtype of
        ``x`` and ``residual`` (``jnp.float32``: flash-attn's ``residual_in_fp32``).
      scale_offset: constant added to ``scale`` in float32 (``1.0``: TransformerEngine's
        ``zero_centered_gamma``).
      rngs: random generators for the parameter initializers.
      bias_metadata: extra metadata for the ``bias`` Param.
      scale_metadata: extra metadata for the ``scale`` Param.
    """

    @extends(LayerNorm.__init__, omit=_NOT_FUSED)
    def __init__(
        self,
        num_features: int,
        *,
        residual_dtype: Any = None,
        **options: Unpack[_AddLayerNormOptions],
    ):
        options["scale_init"] = scale_init_for(options["scale_init"], options["scale_offset"])
        super().__init__(num_features=num_features, residual_dtype=residual_dtype, **options)
