"""The per-sample norms of ``jaxnorm.nnx``: layer, RMS, group and instance norm.

Each is flax's constructor signature, its functional call from
:mod:`jaxnorm._layer_calls`, and :class:`jaxnorm.nnx._base._PerSampleNorm` (Params,
settings, feature-shape fitting, the error context).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from flax.nnx.nn import dtypes
from flax.typing import Dtype, Initializer, PromoteDtypeFn

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
from jaxnorm.nnx._base import _NO_METADATA, _arguments, _errors_at, _name, _PerSampleNorm


class LayerNorm(LayerNormCall, _PerSampleNorm):
    """Layer normalization; mirrors ``flax.nnx.LayerNorm``, via :func:`jaxnorm.layer_norm`.

    Each sample is standardized over ``reduction_axes``; ``scale``/``bias`` (shape
    ``(num_features,)``) act on ``feature_axes``. Differences from flax: exact variance
    for large means and under masks, output dtype ``dtype or x.dtype``.

    Args:
      num_features: number of features (product of the ``feature_axes`` sizes).
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
      feature_axes: axes carrying ``scale``/``bias`` (default the last).
      axis_name: optional named axis to also reduce across.
      axis_index_groups: device groups for ``axis_name``.
      use_fast_variance: accepted for compatibility and ignored.
      promote_dtype: as flax, applied to ``(x, scale, bias)`` and ``dtype`` first.
      rngs: random generators for the parameter initializers.
      bias_metadata: extra metadata for the ``bias`` Param.
      scale_metadata: extra metadata for the ``scale`` Param.
      scale_offset: constant added to ``scale`` in float32: the output is
        ``x_hat * (scale_offset + scale) + bias`` (``1.0``: the zero-centred ``1 + w``).

    Example:
      >>> import jax.numpy as jnp, jaxnorm.nnx as jnnx
      >>> from flax import nnx
      >>> ln = jnnx.LayerNorm(3, rngs=nnx.Rngs(0))
      >>> [round(float(v), 4) for v in ln(jnp.array([[1.0, 2.0, 3.0]]))[0]]
      [-1.2247, 0.0, 1.2247]
    """

    def __init__(
        self,
        num_features: int,
        *,
        epsilon: float = 1e-6,
        dtype: Dtype | None = None,
        param_dtype: Dtype = jnp.float32,
        use_bias: bool = True,
        use_scale: bool = True,
        bias_init: Initializer = nnx.initializers.zeros,
        scale_init: Initializer = nnx.initializers.ones,
        reduction_axes: Axes = -1,
        feature_axes: Axes = -1,
        axis_name: Any = None,
        axis_index_groups: Any = None,
        use_fast_variance: bool = True,
        promote_dtype: PromoteDtypeFn = dtypes.promote_dtype,
        rngs: nnx.Rngs,
        bias_metadata: Mapping[str, Any] = _NO_METADATA,
        scale_metadata: Mapping[str, Any] = _NO_METADATA,
        scale_offset: float = 0.0,
    ):
        scale_init = scale_init_for(scale_init, scale_offset)
        super().__init__(**_arguments(locals()))


class RMSNorm(RMSNormCall, _PerSampleNorm):
    """RMS normalization; mirrors ``flax.nnx.RMSNorm``, via :func:`jaxnorm.rms_norm`.

    Each sample is divided by its root mean square over ``reduction_axes`` and
    multiplied by ``scale`` on ``feature_axes``. Difference from flax: output dtype
    ``dtype or x.dtype``.

    Gemma's RMSNorm is ``RMSNorm(d, scale_offset=1.0)`` (its ``scale`` starts at
    zeros); Llama's is ``RMSNorm(d, cast_order="cast_then_scale")``, which rounds
    ``x_hat`` to the output dtype (``dtype or`` the input's, taken before
    ``promote_dtype``) before the scale (see :func:`jaxnorm.rms_norm`).

    Args:
      num_features: number of features (product of the ``feature_axes`` sizes).
      epsilon: added to the mean square.
      dtype: output dtype; ``None`` keeps the input's dtype.
      param_dtype: dtype of ``scale``.
      use_scale: multiply by a learned ``scale``.
      scale_init: initializer for ``scale``; the default (ones) starts the multiplier
        ``scale_offset + scale`` at 1, so ``scale`` starts at zeros when
        ``scale_offset=1.0`` (as Gemma's ``GemmaRMSNorm``).
      reduction_axes: axes the statistic runs over (default the last).
      feature_axes: axes carrying ``scale`` (default the last).
      axis_name: optional named axis to also reduce across.
      axis_index_groups: device groups for ``axis_name``.
      use_fast_variance: accepted for compatibility and ignored.
      promote_dtype: as flax, applied to ``(x, scale)`` and ``dtype`` first.
      rngs: random generators for the parameter initializer.
      scale_metadata: extra metadata for the ``scale`` Param.
      scale_offset: constant added to ``scale`` in float32 (``1.0``: Gemma's ``1 + w``).
      cast_order: ``"scale_then_cast"`` (Gemma's, flax's) or ``"cast_then_scale"``
        (Llama's).

    Example:
      >>> import jax.numpy as jnp, jaxnorm.nnx as jnnx
      >>> from flax import nnx
      >>> rms = jnnx.RMSNorm(2, epsilon=0.0, rngs=nnx.Rngs(0))
      >>> [round(float(v), 4) for v in rms(jnp.array([[3.0, 4.0]]))[0]]  # / sqrt(12.5)
      [0.8485, 1.1314]
    """

    def __init__(
        self,
        num_features: int,
        *,
        epsilon: float = 1e-6,
        dtype: Dtype | None = None,
        param_dtype: Dtype = jnp.float32,
        use_scale: bool = True,
        scale_init: Initializer = nnx.initializers.ones,
        reduction_axes: Axes = -1,
        feature_axes: Axes = -1,
        axis_name: Any = None,
        axis_index_groups: Any = None,
        use_fast_variance: bool = True,
        promote_dtype: PromoteDtypeFn = dtypes.promote_dtype,
        rngs: nnx.Rngs,
        scale_metadata: Mapping[str, Any] = _NO_METADATA,
        scale_offset: float = 0.0,
        cast_order: CastOrder = "scale_then_cast",
    ):
        scale_init = scale_init_for(scale_init, scale_offset)
        super().__init__(**_arguments(locals()))

    def __call__(self, x: jax.Array, mask: jax.Array | None = None) -> jax.Array:
        """Rescale each sample of ``x`` by its root mean square (``mask`` positional as flax).

        Args:
          x: floating input.
          mask: optional boolean array broadcastable to ``x``.

        Returns:
          The normalized ``x``, of dtype ``self.dtype or x.dtype``.
        """
        return super().__call__(x, mask=mask)


class GroupNorm(GroupNormCall, _PerSampleNorm):
    """Group normalization; mirrors ``flax.nnx.GroupNorm``, via :func:`jaxnorm.group_norm`.

    Channels (last axis) are split into ``num_groups`` groups, or groups of
    ``group_size``; each group is standardized per sample over its channels and
    ``reduction_axes`` (default all but axis 0). As in flax, the group arguments are
    checked at construction. Differences from flax: exact statistics under masks,
    output dtype ``dtype or x.dtype``.

    Args:
      num_features: number of channels.
      num_groups: number of groups (default 32); pass ``None`` to use ``group_size``.
      group_size: channels per group. Both are kept as attributes, the one not given
        computed from ``num_features`` (as flax).
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
      promote_dtype: as flax, applied to ``(x, scale, bias)`` and ``dtype`` first.
      rngs: random generators for the parameter initializers.
      bias_metadata: extra metadata for the ``bias`` Param.
      scale_metadata: extra metadata for the ``scale`` Param.

    Raises:
      ValueError: both or neither of ``num_groups``/``group_size``, or a group count
        that does not divide ``num_features``.

    Example:
      >>> import jax, jaxnorm.nnx as jnnx
      >>> from flax import nnx
      >>> gn = jnnx.GroupNorm(6, num_groups=None, group_size=2, rngs=nnx.Rngs(0))
      >>> gn.num_groups, gn(jax.random.normal(jax.random.key(0), (2, 5, 6))).shape
      (3, (2, 5, 6))
    """

    def __init__(
        self,
        num_features: int,
        num_groups: int | None = 32,
        group_size: int | None = None,
        *,
        epsilon: float = 1e-6,
        dtype: Dtype | None = None,
        param_dtype: Dtype = jnp.float32,
        use_bias: bool = True,
        use_scale: bool = True,
        bias_init: Initializer = nnx.initializers.zeros,
        scale_init: Initializer = nnx.initializers.ones,
        reduction_axes: Axes | None = None,
        axis_name: Any = None,
        axis_index_groups: Any = None,
        use_fast_variance: bool = True,
        promote_dtype: PromoteDtypeFn = dtypes.promote_dtype,
        rngs: nnx.Rngs,
        bias_metadata: Mapping[str, Any] = _NO_METADATA,
        scale_metadata: Mapping[str, Any] = _NO_METADATA,
    ):
        arguments = _arguments(locals())
        if (num_groups is None) == (group_size is None):
            raise ValueError(
                f"{_name(self)}: give exactly one of num_groups and group_size; got "
                f"num_groups={num_groups!r}, group_size={group_size!r}. num_groups defaults "
                f"to 32, so pass num_groups=None together with group_size."
            )
        divisor = group_size if num_groups is None else num_groups
        if not isinstance(divisor, int) or divisor < 1 or num_features % divisor:
            which = "group_size" if num_groups is None else "num_groups"
            raise ValueError(
                f"{_name(self)}: {which}={divisor!r} must be a positive int dividing "
                f"num_features={num_features}."
            )
        super().__init__(**arguments)
        self.num_groups = num_features // group_size if num_groups is None else num_groups
        self.group_size = num_features // self.num_groups
        self.feature_axis = -1

    def _feature_shape(self, x: jax.Array) -> tuple[int, ...]:
        return tuple(jnp.shape(x)[-1:])  # the channels; the core reports a misfit


class InstanceNorm(InstanceNormCall, _PerSampleNorm):
    """Instance normalization; mirrors ``flax.nnx.InstanceNorm``, numbers from the core.

    Each (sample, feature) is standardized over every axis except the batch axis 0
    and ``feature_axes``, by :func:`jaxnorm.instance_norm`. Differences from
    flax: exact statistics under masks, output dtype ``dtype or x.dtype``, an input
    with nothing to reduce is refused.

    Args:
      num_features: number of features (product of the ``feature_axes`` sizes).
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
      promote_dtype: as flax, applied to ``(x, scale, bias)`` and ``dtype`` first.
      rngs: random generators for the parameter initializers.
      bias_metadata: extra metadata for the ``bias`` Param.
      scale_metadata: extra metadata for the ``scale`` Param.

    Example:
      >>> import jax.numpy as jnp, jaxnorm.nnx as jnnx
      >>> from flax import nnx
      >>> inorm = jnnx.InstanceNorm(1, epsilon=0.0, rngs=nnx.Rngs(0))
      >>> inorm(jnp.array([[[1.0], [3.0]]]))[0, :, 0].tolist()  # (N, L, C): over L
      [-1.0, 1.0]
    """

    def __init__(
        self,
        num_features: int,
        *,
        epsilon: float = 1e-6,
        dtype: Dtype | None = None,
        param_dtype: Dtype = jnp.float32,
        use_bias: bool = True,
        use_scale: bool = True,
        bias_init: Initializer = nnx.initializers.zeros,
        scale_init: Initializer = nnx.initializers.ones,
        feature_axes: Axes = -1,
        axis_name: Any = None,
        axis_index_groups: Any = None,
        use_fast_variance: bool = True,
        promote_dtype: PromoteDtypeFn = dtypes.promote_dtype,
        rngs: nnx.Rngs,
        bias_metadata: Mapping[str, Any] = _NO_METADATA,
        scale_metadata: Mapping[str, Any] = _NO_METADATA,
    ):
        super().__init__(**_arguments(locals()))

    def _feature_shape(self, x: jax.Array) -> tuple[int, ...]:
        """The shape at ``feature_axes``, once they leave out axis 0 and leave an axis
        to reduce (a misfit with ``num_features`` is the core's to report)."""
        with _errors_at(self):
            axes = _checks.canonical_axes(
                "InstanceNorm", "feature_axes", self.feature_axes, jnp.ndim(x)
            )
        _checks.check_instance_axes(_name(self), self.feature_axes, axes, x.shape)
        return tuple(x.shape[a] for a in axes)
