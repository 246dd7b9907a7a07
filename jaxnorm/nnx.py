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
``dtype or x.dtype`` (flax promotes bf16 to f32; no ``promote_dtype`` argument),
``use_fast_variance`` accepted and ignored, and the BatchNorm extras ``momentum=None``,
``unbiased_running_var`` and ``track_count``, with a ``count`` ``BatchStat`` (int32
scalar) only when ``momentum is None`` or ``track_count=True``.

For features spread over several axes (e.g. ``feature_axes=(-2, -1)``) the
variables are flat, ``(num_features,)`` with ``num_features`` the product of the
feature sizes, as in flax NNX; they are reshaped to the feature shape for the core.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from types import MappingProxyType
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from flax.typing import Dtype, Initializer

from jaxnorm import _checks
from jaxnorm._checks import Axes
from jaxnorm.functional import batch_norm, group_norm, instance_norm, layer_norm, rms_norm
from jaxnorm.state import BatchStats, init_batch_stats

__all__ = ["BatchNorm", "LayerNorm", "RMSNorm", "GroupNorm", "InstanceNorm"]


_NO_METADATA: Mapping[str, Any] = MappingProxyType({})


def _name(module: nnx.Module) -> str:
    """``jaxnorm.nnx.BatchNorm`` (or ``jaxnorm.variants_nnx.PowerNorm``), for messages."""
    return f"{type(module).__module__}.{type(module).__name__}"


@contextmanager
def _errors_at(module: nnx.Module) -> Iterator[None]:
    """Prefix the core's ``ValueError``/``TypeError`` messages with the module's class."""
    try:
        yield
    except (ValueError, TypeError) as e:
        if e.args and isinstance(e.args[0], str):
            e.args = (f"{_name(module)}: {e.args[0]}",)
        raise


def _optional_param(
    use: bool,
    init: Initializer,
    rngs: nnx.Rngs,
    num_features: int,
    dtype: Dtype,
    metadata: Mapping[str, Any],
) -> nnx.Param | Any:
    """A ``(num_features,)`` ``nnx.Param`` when ``use``, else an empty attribute (``None``)."""
    if not use:
        return nnx.data(None)
    return nnx.Param(init(rngs.params(), (num_features,), dtype), **metadata)


def _value(variable: nnx.Variable | None) -> jax.Array | None:
    return None if variable is None else variable[...]


def _fit(a: jax.Array | None, feature_shape: tuple[int, ...]) -> jax.Array | None:
    """Reshape a flat ``(num_features,)`` variable to the feature shape when sizes agree.

    When they do not, the array passes unchanged and the core reports the misfit.
    """
    if a is None or a.ndim != 1 or a.shape == feature_shape:
        return a
    if a.size != math.prod(feature_shape):
        return a
    return jnp.reshape(a, feature_shape)


def _feature_shape(module: nnx.Module, name: str, axes: Axes, x: jax.Array) -> tuple[int, ...]:
    """The shape of ``x`` at ``axes``, refusing one that does not hold ``num_features``."""
    with _errors_at(module):
        canon = _checks.canonical_axes(type(module).__name__, name, axes, jnp.ndim(x))
    shape = tuple(x.shape[a] for a in canon)
    expected = getattr(module, "num_features", None)
    if expected is not None and math.prod(shape) != expected:
        raise ValueError(
            f"{_name(module)}: num_features={expected} but x {tuple(x.shape)} has "
            f"{math.prod(shape)} features on {name}={axes!r}. Construct the layer with "
            f"num_features={math.prod(shape)}, or pass x with {expected} features there."
        )
    return shape


def _training(module: nnx.Module, use_running_average: bool | None) -> bool:
    """Whether this call trains, refusing a module whose mode was never set."""
    mode = module.use_running_average if use_running_average is None else use_running_average
    if mode is None:
        raise ValueError(
            f"{_name(module)}: the mode is not set (use_running_average=None), so it is "
            f"unknown whether to train the running statistics or to use them. Call "
            f"model.train() before training steps and model.eval() before evaluation, or "
            f"pass use_running_average=False/True to the constructor or the call. (Unlike "
            f"flax.nnx, jaxnorm does not default to training mode, which silently updates "
            f"the statistics during what was meant as evaluation.)"
        )
    return not mode


def _write(variable: nnx.Variable | None, value: jax.Array) -> None:
    """Store a new value into a (possibly flat) variable, if the module has it."""
    if variable is not None:
        variable[...] = jnp.reshape(value, variable.shape)


class _Moded(nnx.Module):
    """The ``set_view`` hook shared by the layers with a train/eval mode."""

    def set_view(self, use_running_average: bool | None = None) -> None:
        """Hook for ``nnx.view(model, use_running_average=...)`` (as flax).

        Args:
          use_running_average: the mode to set; ``None`` leaves it unchanged.
        """
        if use_running_average is not None:
            self.use_running_average = use_running_average


class BatchNorm(_Moded):
    """Batch normalization; mirrors ``flax.nnx.BatchNorm``, numbers from :func:`jaxnorm.batch_norm`.

    .. math::

        y = \\frac{x - \\mu}{\\sqrt{\\sigma^2 + \\epsilon}}\\,\\gamma + \\beta

    In training mode the batch statistics normalize ``x`` and update the running
    ones, ``new = momentum * old + (1 - momentum) * batch`` (torch's ``momentum=0.1``
    is our ``0.9``); in evaluation mode the running statistics are used.

    **Mode.** Unlike flax (default ``False``), ``use_running_average`` defaults to
    ``None`` and a call in that state raises: put the model in a mode with
    ``model.train()`` / ``model.eval()`` (which set this attribute, as in flax), or
    pass ``use_running_average`` to the constructor or the call.

    Args:
      num_features: size of the feature axis (the product of sizes for several axes).
      use_running_average: ``False`` train, ``True`` evaluate, ``None`` not set (error
        on call until ``train()``/``eval()``).
      axis: the feature axis or axes (kept); all others are reduced.
      momentum: weight of the old running value in [0, 1]; ``None`` for torch's
        cumulative average (adds the ``count`` BatchStat).
      epsilon: added to the variance.
      dtype: output dtype; ``None`` keeps the input's dtype.
      param_dtype: dtype of ``scale``/``bias``.
      use_bias: add a learned ``bias``.
      use_scale: multiply by a learned ``scale``.
      bias_init: initializer for ``bias``.
      scale_init: initializer for ``scale``.
      axis_name: named axis of ``shard_map``/``pmap``/``vmap`` over which the batch is
        split; statistics are merged exactly across it.
      axis_index_groups: device groups for the cross-device reduction.
      use_fast_variance: accepted for compatibility and ignored: the core's variance
        stays correct for large means either way.
      unbiased_running_var: store the Bessel-corrected batch variance in the running
        average (torch's convention).
      track_count: keep the ``count`` BatchStat even with a numeric ``momentum``.
      skip_nonfinite: leave the running statistics of a feature whose batch statistics
        are NaN/Inf unchanged (NaN/Inf still propagate to the output).
      rngs: random generators for the parameter initializers.
      bias_metadata: extra metadata for the ``bias`` Param (as flax).
      scale_metadata: extra metadata for the ``scale`` Param (as flax).

    Example:
      >>> import jax, jaxnorm.nnx as jnnx
      >>> from flax import nnx
      >>> bn = jnnx.BatchNorm(3, momentum=0.9, rngs=nnx.Rngs(0))
      >>> x = jax.random.normal(jax.random.key(0), (8, 3))
      >>> bn.train()
      >>> y = bn(x)  # updates bn.mean, bn.var
      >>> bn.eval()
      >>> y = bn(x)  # uses them
    """

    def __init__(
        self,
        num_features: int,
        *,
        use_running_average: bool | None = None,
        axis: Axes = -1,
        momentum: float | None = 0.99,
        epsilon: float = 1e-5,
        dtype: Dtype | None = None,
        param_dtype: Dtype = jnp.float32,
        use_bias: bool = True,
        use_scale: bool = True,
        bias_init: Initializer = nnx.initializers.zeros,
        scale_init: Initializer = nnx.initializers.ones,
        axis_name: Any = None,
        axis_index_groups: Any = None,
        use_fast_variance: bool = True,
        unbiased_running_var: bool = False,
        track_count: bool = False,
        skip_nonfinite: bool = False,
        rngs: nnx.Rngs,
        bias_metadata: Mapping[str, Any] = _NO_METADATA,
        scale_metadata: Mapping[str, Any] = _NO_METADATA,
    ):
        stats = init_batch_stats((num_features,))
        self.mean = nnx.BatchStat(stats.mean)
        self.var = nnx.BatchStat(stats.var)
        tracks_count = momentum is None or track_count
        self.count = nnx.BatchStat(stats.count) if tracks_count else nnx.data(None)
        self.scale = _optional_param(
            use_scale, scale_init, rngs, num_features, param_dtype, scale_metadata
        )
        self.bias = _optional_param(
            use_bias, bias_init, rngs, num_features, param_dtype, bias_metadata
        )
        self.num_features = num_features
        self.use_running_average = use_running_average
        self.axis = axis
        self.momentum = momentum
        self.epsilon = epsilon
        self.dtype = dtype
        self.param_dtype = param_dtype
        self.use_bias = use_bias
        self.use_scale = use_scale
        self.axis_name = axis_name
        self.axis_index_groups = axis_index_groups
        self.use_fast_variance = use_fast_variance
        self.unbiased_running_var = unbiased_running_var
        self.track_count = track_count
        self.skip_nonfinite = skip_nonfinite

    def __call__(
        self,
        x: jax.Array,
        use_running_average: bool | None = None,
        *,
        mask: jax.Array | None = None,
    ) -> jax.Array:
        """Normalize ``x``; in training mode also update ``mean``/``var`` (and ``count``).

        Args:
          x: floating input.
          use_running_average: overrides the attribute for this call when not ``None``.
          mask: optional boolean array broadcastable to ``x``; ``False`` elements do
            not enter the statistics.

        Returns:
          The normalized ``x``, of dtype ``self.dtype or x.dtype``.

        Raises:
          ValueError: the mode is not set (call ``model.train()``/``model.eval()``),
            or the variables do not fit ``x`` (the core's message).
        """
        training = _training(self, use_running_average)
        feature_shape = _feature_shape(self, "axis", self.axis, x)
        count = _value(self.count)
        stats = BatchStats(
            mean=_fit(self.mean[...], feature_shape),
            var=_fit(self.var[...], feature_shape),
            count=jnp.zeros((), jnp.int32) if count is None else count,
        )
        with _errors_at(self):
            y, new_stats = batch_norm(
                x,
                stats,
                _fit(_value(self.scale), feature_shape),
                _fit(_value(self.bias), feature_shape),
                training=training,
                axis=self.axis,
                momentum=self.momentum,
                epsilon=self.epsilon,
                axis_name=self.axis_name,
                axis_index_groups=self.axis_index_groups,
                mask=mask,
                unbiased_running_var=self.unbiased_running_var,
                skip_nonfinite=self.skip_nonfinite,
                dtype=self.dtype,
            )
        if training:
            _write(self.mean, new_stats.mean)
            _write(self.var, new_stats.var)
            _write(self.count, new_stats.count)
        return y


class LayerNorm(nnx.Module):
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
      scale_init: initializer for ``scale``.
      reduction_axes: axes the statistics run over (default the last).
      feature_axes: axes carrying ``scale``/``bias`` (default the last).
      axis_name: optional named axis to also reduce across.
      axis_index_groups: device groups for ``axis_name``.
      use_fast_variance: accepted for compatibility and ignored.
      rngs: random generators for the parameter initializers.
      bias_metadata: extra metadata for the ``bias`` Param.
      scale_metadata: extra metadata for the ``scale`` Param.
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
        rngs: nnx.Rngs,
        bias_metadata: Mapping[str, Any] = _NO_METADATA,
        scale_metadata: Mapping[str, Any] = _NO_METADATA,
    ):
        self.scale = _optional_param(
            use_scale, scale_init, rngs, num_features, param_dtype, scale_metadata
        )
        self.bias = _optional_param(
            use_bias, bias_init, rngs, num_features, param_dtype, bias_metadata
        )
        self.num_features = num_features
        self.epsilon = epsilon
        self.dtype = dtype
        self.param_dtype = param_dtype
        self.use_bias = use_bias
        self.use_scale = use_scale
        self.reduction_axes = reduction_axes
        self.feature_axes = feature_axes
        self.axis_name = axis_name
        self.axis_index_groups = axis_index_groups
        self.use_fast_variance = use_fast_variance

    def __call__(self, x: jax.Array, *, mask: jax.Array | None = None) -> jax.Array:
        """Normalize each sample of ``x`` over ``reduction_axes``.

        Args:
          x: floating input.
          mask: optional boolean array broadcastable to ``x``.

        Returns:
          The normalized ``x``, of dtype ``self.dtype or x.dtype``.
        """
        feature_shape = _feature_shape(self, "feature_axes", self.feature_axes, x)
        with _errors_at(self):
            return layer_norm(
                x,
                _fit(_value(self.scale), feature_shape),
                _fit(_value(self.bias), feature_shape),
                axis=self.reduction_axes,
                feature_axis=self.feature_axes,
                epsilon=self.epsilon,
                mask=mask,
                dtype=self.dtype,
                axis_name=self.axis_name,
                axis_index_groups=self.axis_index_groups,
            )


class RMSNorm(nnx.Module):
    """RMS normalization; mirrors ``flax.nnx.RMSNorm``, via :func:`jaxnorm.rms_norm`.

    Each sample is divided by its root mean square over ``reduction_axes`` and
    multiplied by ``scale`` on ``feature_axes``. Difference from flax: output dtype
    ``dtype or x.dtype``.

    Args:
      num_features: number of features (product of the ``feature_axes`` sizes).
      epsilon: added to the mean square.
      dtype: output dtype; ``None`` keeps the input's dtype.
      param_dtype: dtype of ``scale``.
      use_scale: multiply by a learned ``scale``.
      scale_init: initializer for ``scale``.
      reduction_axes: axes the statistic runs over (default the last).
      feature_axes: axes carrying ``scale`` (default the last).
      axis_name: optional named axis to also reduce across.
      axis_index_groups: device groups for ``axis_name``.
      use_fast_variance: accepted for compatibility and ignored.
      rngs: random generators for the parameter initializer.
      scale_metadata: extra metadata for the ``scale`` Param.
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
        rngs: nnx.Rngs,
        scale_metadata: Mapping[str, Any] = _NO_METADATA,
    ):
        self.scale = _optional_param(
            use_scale, scale_init, rngs, num_features, param_dtype, scale_metadata
        )
        self.num_features = num_features
        self.epsilon = epsilon
        self.dtype = dtype
        self.param_dtype = param_dtype
        self.use_scale = use_scale
        self.reduction_axes = reduction_axes
        self.feature_axes = feature_axes
        self.axis_name = axis_name
        self.axis_index_groups = axis_index_groups
        self.use_fast_variance = use_fast_variance

    def __call__(self, x: jax.Array, mask: jax.Array | None = None) -> jax.Array:
        """Rescale each sample of ``x`` by its root mean square (``mask`` positional as flax).

        Args:
          x: floating input.
          mask: optional boolean array broadcastable to ``x``.

        Returns:
          The normalized ``x``, of dtype ``self.dtype or x.dtype``.
        """
        feature_shape = _feature_shape(self, "feature_axes", self.feature_axes, x)
        with _errors_at(self):
            return rms_norm(
                x,
                _fit(_value(self.scale), feature_shape),
                axis=self.reduction_axes,
                feature_axis=self.feature_axes,
                epsilon=self.epsilon,
                mask=mask,
                dtype=self.dtype,
                axis_name=self.axis_name,
                axis_index_groups=self.axis_index_groups,
            )


class GroupNorm(nnx.Module):
    """Group normalization; mirrors ``flax.nnx.GroupNorm``, via :func:`jaxnorm.group_norm`.

    Channels (last axis) are split into ``num_groups`` groups, or groups of
    ``group_size``; each group is standardized per sample over its channels and
    ``reduction_axes`` (default all but axis 0). As in flax, the group arguments are
    checked at construction. Differences from flax: exact statistics under masks,
    output dtype ``dtype or x.dtype``.

    Args:
      num_features: number of channels.
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
      rngs: random generators for the parameter initializers.
      bias_metadata: extra metadata for the ``bias`` Param.
      scale_metadata: extra metadata for the ``scale`` Param.

    Raises:
      ValueError: both or neither of ``num_groups``/``group_size``, or a group count
        that does not divide ``num_features``.
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
        rngs: nnx.Rngs,
        bias_metadata: Mapping[str, Any] = _NO_METADATA,
        scale_metadata: Mapping[str, Any] = _NO_METADATA,
    ):
        if (num_groups is None) == (group_size is None):
            raise ValueError(
                f"jaxnorm.nnx.GroupNorm: give exactly one of num_groups and group_size; got "
                f"num_groups={num_groups!r}, group_size={group_size!r}. num_groups defaults "
                f"to 32, so pass num_groups=None together with group_size."
            )
        divisor = group_size if num_groups is None else num_groups
        if not isinstance(divisor, int) or divisor < 1 or num_features % divisor:
            which = "group_size" if num_groups is None else "num_groups"
            raise ValueError(
                f"jaxnorm.nnx.GroupNorm: {which}={divisor!r} must be a positive int dividing "
                f"num_features={num_features}."
            )
        self.num_groups = num_features // group_size if num_groups is None else num_groups
        self.group_size = num_features // self.num_groups
        self.feature_axis = -1
        self.scale = _optional_param(
            use_scale, scale_init, rngs, num_features, param_dtype, scale_metadata
        )
        self.bias = _optional_param(
            use_bias, bias_init, rngs, num_features, param_dtype, bias_metadata
        )
        self.num_features = num_features
        self.epsilon = epsilon
        self.dtype = dtype
        self.param_dtype = param_dtype
        self.use_bias = use_bias
        self.use_scale = use_scale
        self.reduction_axes = reduction_axes
        self.axis_name = axis_name
        self.axis_index_groups = axis_index_groups
        self.use_fast_variance = use_fast_variance

    def __call__(self, x: jax.Array, *, mask: jax.Array | None = None) -> jax.Array:
        """Normalize ``x`` per sample and channel group.

        Args:
          x: floating input, batch first, channels last.
          mask: optional boolean array broadcastable to ``x``.

        Returns:
          The normalized ``x``, of dtype ``self.dtype or x.dtype``.
        """
        with _errors_at(self):
            return group_norm(
                x,
                _value(self.scale),
                _value(self.bias),
                num_groups=self.num_groups,
                axis=self.feature_axis,
                reduction_axes=self.reduction_axes,
                epsilon=self.epsilon,
                mask=mask,
                dtype=self.dtype,
                axis_name=self.axis_name,
                axis_index_groups=self.axis_index_groups,
            )


class InstanceNorm(nnx.Module):
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
      rngs: random generators for the parameter initializers.
      bias_metadata: extra metadata for the ``bias`` Param.
      scale_metadata: extra metadata for the ``scale`` Param.
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
        rngs: nnx.Rngs,
        bias_metadata: Mapping[str, Any] = _NO_METADATA,
        scale_metadata: Mapping[str, Any] = _NO_METADATA,
    ):
        self.scale = _optional_param(
            use_scale, scale_init, rngs, num_features, param_dtype, scale_metadata
        )
        self.bias = _optional_param(
            use_bias, bias_init, rngs, num_features, param_dtype, bias_metadata
        )
        self.num_features = num_features
        self.epsilon = epsilon
        self.dtype = dtype
        self.param_dtype = param_dtype
        self.use_bias = use_bias
        self.use_scale = use_scale
        self.feature_axes = feature_axes
        self.axis_name = axis_name
        self.axis_index_groups = axis_index_groups
        self.use_fast_variance = use_fast_variance

    def __call__(self, x: jax.Array, *, mask: jax.Array | None = None) -> jax.Array:
        """Normalize each sample and feature of ``x`` over the remaining axes.

        Args:
          x: floating input, batch first.
          mask: optional boolean array broadcastable to ``x``.

        Returns:
          The normalized ``x``, of dtype ``self.dtype or x.dtype``.

        Raises:
          ValueError: ``feature_axes`` includes axis 0 or leaves nothing to reduce.
        """
        with _errors_at(self):
            feature_axes = _checks.canonical_axes(
                "InstanceNorm", "feature_axes", self.feature_axes, jnp.ndim(x)
            )
        reduction_axes = tuple(a for a in range(1, x.ndim) if a not in feature_axes)
        if 0 in feature_axes or not reduction_axes:
            raise ValueError(
                f"jaxnorm.nnx.InstanceNorm: feature_axes={self.feature_axes!r} on x "
                f"{tuple(x.shape)} must leave out the batch axis 0 and leave at least one "
                f"other axis to reduce. Pass e.g. feature_axes=-1 for (N, H, W, C) input."
            )
        feature_shape = tuple(x.shape[a] for a in feature_axes)
        scale = _fit(_value(self.scale), feature_shape)
        bias = _fit(_value(self.bias), feature_shape)
        with _errors_at(self):
            return instance_norm(
                x,
                scale,
                bias,
                axis=feature_axes,
                epsilon=self.epsilon,
                mask=mask,
                dtype=self.dtype,
                axis_name=self.axis_name,
                axis_index_groups=self.axis_index_groups,
            )
