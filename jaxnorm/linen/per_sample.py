"""The per-sample norms of ``jaxnorm.linen``: layer, RMS, group and instance norm.

Each is flax's fields (in flax's order), its functional call from
:mod:`jaxnorm._layer_calls`, and :class:`jaxnorm.linen._base._PerSampleNorm` (the call:
parameters of the feature shape, the error context).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.typing import Dtype, Initializer
from jax.nn import initializers

from jaxnorm import _checks
from jaxnorm._checks import Axes
from jaxnorm._layer_calls import (
    GroupNormCall,
    InstanceNormCall,
    LayerNormCall,
    RMSNormCall,
    scale_init_for,
)
from jaxnorm.functional.per_sample import CastOrder
from jaxnorm.linen._base import _PerSampleNorm


class _ZeroCentredScale:
    """``scale`` initialized for the layer's ``scale_offset`` (see
    :func:`jaxnorm._layer_calls.scale_init_for`: zeros for ``scale_offset=1.0``)."""

    @nn.nowrap
    def _param_of(self, name: str, init: Initializer, shape: tuple[int, ...]) -> jax.Array:
        if name == "scale":
            init = scale_init_for(init, self.scale_offset)
        return super()._param_of(name, init, shape)


class LayerNorm(LayerNormCall, _ZeroCentredScale, _PerSampleNorm):
    """Layer normalization; mirrors ``flax.linen.LayerNorm``, via :func:`jaxnorm.layer_norm`.

    .. math::

        y = \\frac{x - \\mathrm{E}[x]}{\\sqrt{\\mathrm{Var}[x] + \\epsilon}}\\,\\gamma + \\beta

    over ``reduction_axes`` of each sample; ``scale``/``bias`` have the shape of
    ``feature_axes``. Variables ``params/{scale, bias}`` as in flax.

    Differences from flax: exact variance for large means and under masks, output
    dtype ``dtype or x.dtype`` (flax promotes bf16 to f32).

    Attributes:
      epsilon: added to the variance.
      dtype: output dtype; ``None`` keeps the input's dtype.
      param_dtype: dtype of ``scale``/``bias``.
      use_bias: add a learned ``bias``.
      use_scale: multiply by a learned ``scale``.
      bias_init: initializer for ``bias``.
      scale_init: initializer for ``scale``; the default (ones) starts the multiplier
        ``scale_offset + scale`` at 1, so ``scale`` starts at zeros when
        ``scale_offset=1.0`` (TransformerEngine's ``zero_centered_gamma``).
      reduction_axes: axes the statistics run over (default the last).
      feature_axes: axes that carry ``scale``/``bias`` (default the last).
      axis_name: optional named axis to also reduce across.
      axis_index_groups: device groups for ``axis_name``.
      use_fast_variance: accepted for compatibility and ignored.
      force_float32_reductions: accepted for compatibility and ignored (always >= f32).
      scale_offset: constant added to ``scale`` in float32: the output is
        ``x_hat * (scale_offset + scale) + bias`` (``1.0``: the zero-centred ``1 + w``).

    Example:
      >>> import jax, jax.numpy as jnp, jaxnorm.linen as jnn
      >>> x = jnp.array([[1.0, 2.0, 3.0]])
      >>> ln = jnn.LayerNorm()
      >>> y = ln.apply(ln.init(jax.random.key(0), x), x)
      >>> [round(float(v), 4) for v in y[0]]
      [-1.2247, 0.0, 1.2247]
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
    axis_name: Any = None
    axis_index_groups: Any = None
    use_fast_variance: bool = True
    force_float32_reductions: bool = True
    scale_offset: float = 0.0


class RMSNorm(RMSNormCall, _ZeroCentredScale, _PerSampleNorm):
    """RMS normalization; mirrors ``flax.linen.RMSNorm``, via :func:`jaxnorm.rms_norm`.

    .. math::

        y = \\frac{x}{\\sqrt{\\mathrm{E}[x^2] + \\epsilon}}\\,\\gamma

    over ``reduction_axes`` of each sample. Variables ``params/scale`` as in flax.
    Difference from flax: output dtype ``dtype or x.dtype``.

    Gemma's RMSNorm is ``RMSNorm(scale_offset=1.0)`` (its ``scale`` starts at zeros);
    Llama's is ``RMSNorm(cast_order="cast_then_scale", param_dtype=jnp.bfloat16)`` for
    a bf16 model (see :func:`jaxnorm.rms_norm`).

    Attributes:
      epsilon: added to the mean square.
      dtype: output dtype; ``None`` keeps the input's dtype.
      param_dtype: dtype of ``scale``.
      use_scale: multiply by a learned ``scale``.
      scale_init: initializer for ``scale``; the default (ones) starts the multiplier
        ``scale_offset + scale`` at 1, so ``scale`` starts at zeros when
        ``scale_offset=1.0`` (as Gemma's ``GemmaRMSNorm``).
      reduction_axes: axes the statistic runs over (default the last).
      feature_axes: axes that carry ``scale`` (default the last).
      axis_name: optional named axis to also reduce across.
      axis_index_groups: device groups for ``axis_name``.
      use_fast_variance: accepted for compatibility and ignored.
      force_float32_reductions: accepted for compatibility and ignored (always >= f32).
      scale_offset: constant added to ``scale`` in float32 (``1.0``: Gemma's ``1 + w``).
      cast_order: ``"scale_then_cast"`` (Gemma's, flax's) or ``"cast_then_scale"``
        (Llama's: ``x_hat`` rounded to the output dtype before the scale).

    Example:
      >>> import jax, jax.numpy as jnp, jaxnorm.linen as jnn
      >>> gemma_norm = jnn.RMSNorm(scale_offset=1.0)
      >>> v = gemma_norm.init(jax.random.key(0), jnp.ones((1, 3)))
      >>> v["params"]["scale"].tolist()  # the multiplier 1 + scale starts at 1
      [0.0, 0.0, 0.0]
    """

    epsilon: float = 1e-6
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32
    use_scale: bool = True
    scale_init: Initializer = initializers.ones
    reduction_axes: Axes = -1
    feature_axes: Axes = -1
    axis_name: Any = None
    axis_index_groups: Any = None
    use_fast_variance: bool = True
    force_float32_reductions: bool = True
    scale_offset: float = 0.0
    cast_order: CastOrder = "scale_then_cast"


class GroupNorm(GroupNormCall, _PerSampleNorm):
    """Group normalization; mirrors ``flax.linen.GroupNorm``, via :func:`jaxnorm.group_norm`.

    The last axis holds the channels, split into ``num_groups`` groups (or groups of
    ``group_size``); each group is standardized over its channels and
    ``reduction_axes`` (default every axis but the batch axis 0). Variables
    ``params/{scale, bias}`` of shape ``(C,)`` as in flax.

    Differences from flax: exact statistics under masks, output dtype
    ``dtype or x.dtype``.

    Attributes:
      num_groups: number of groups (default 32); pass ``None`` to use ``group_size``.
      group_size: channels per group.
      epsilon: added to the variance.
      dtype: output dtype; ``None`` keeps the input's dtype.
      param_dtype: dtype of ``scale``/``bias``.
      use_bias: add a learned ``bias``.
      use_scale: multiply by a learned ``scale``.
      bias_init: initializer for ``bias``.
      scale_init: initializer for ``scale``.
      reduction_axes: axes reduced (must include the last); default all but axis 0.
      axis_name: optional named axis to also reduce across.
      axis_index_groups: device groups for ``axis_name``.
      use_fast_variance: accepted for compatibility and ignored.
      force_float32_reductions: accepted for compatibility and ignored (always >= f32).

    Raises (on call):
      ValueError: both or neither of ``num_groups``/``group_size`` (the default
        ``num_groups=32`` counts: pass ``num_groups=None`` with ``group_size``).
    """

    num_groups: int | None = 32
    group_size: int | None = None
    epsilon: float = 1e-6
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32
    use_bias: bool = True
    use_scale: bool = True
    bias_init: Initializer = initializers.zeros
    scale_init: Initializer = initializers.ones
    reduction_axes: Axes | None = None
    axis_name: Any = None
    axis_index_groups: Any = None
    use_fast_variance: bool = True
    force_float32_reductions: bool = True

    @nn.nowrap
    def _feature_shape(self, x: jax.Array) -> tuple[int, ...]:
        """``(C,)``, the last axis, once the grouping fields are consistent."""
        if self.num_groups is not None and self.group_size is not None:
            raise ValueError(
                f"{self._where()}: give exactly one of num_groups and "
                f"group_size; got num_groups={self.num_groups!r}, group_size="
                f"{self.group_size!r}. num_groups defaults to 32, so pass num_groups=None "
                f"together with group_size."
            )
        return (x.shape[-1],) if jnp.ndim(x) else ()


class InstanceNorm(InstanceNormCall, _PerSampleNorm):
    """Instance normalization; mirrors ``flax.linen.InstanceNorm``, numbers from the core.

    Each (sample, feature) is standardized over every axis except the batch axis 0
    and ``feature_axes``, by :func:`jaxnorm.instance_norm`. Variables ``params/{scale,
    bias}`` of the feature shape, as in flax.

    Differences from flax: exact statistics under masks, output dtype
    ``dtype or x.dtype``, and an input with nothing to reduce (e.g. ``(N, C)``) is
    refused instead of normalized to ``bias``.

    Attributes:
      epsilon: added to the variance.
      dtype: output dtype; ``None`` keeps the input's dtype.
      param_dtype: dtype of ``scale``/``bias``.
      use_bias: add a learned ``bias``.
      use_scale: multiply by a learned ``scale``.
      bias_init: initializer for ``bias``.
      scale_init: initializer for ``scale``.
      feature_axes: the channel axis or axes (not 0).
      axis_name: optional named axis to also reduce across.
      axis_index_groups: device groups for ``axis_name``.
      use_fast_variance: accepted for compatibility and ignored.
      force_float32_reductions: accepted for compatibility and ignored (always >= f32).

    Raises (on call):
      ValueError: ``feature_axes`` includes the batch axis 0, or leaves nothing to
        reduce.
    """

    epsilon: float = 1e-6
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32
    use_bias: bool = True
    use_scale: bool = True
    bias_init: Initializer = initializers.zeros
    scale_init: Initializer = initializers.ones
    feature_axes: Axes = -1
    axis_name: Any = None
    axis_index_groups: Any = None
    use_fast_variance: bool = True
    force_float32_reductions: bool = True

    @nn.nowrap
    def _feature_shape(self, x: jax.Array) -> tuple[int, ...]:
        """The shape at ``feature_axes``, once they leave out axis 0 and leave an axis
        to reduce."""
        with self._errors():
            axes = _checks.canonical_axes(
                "InstanceNorm", "feature_axes", self.feature_axes, jnp.ndim(x)
            )
        _checks.check_instance_axes(self._where(), self.feature_axes, axes, x.shape)
        return tuple(x.shape[a] for a in axes)
