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
  running statistics unchanged (flax writes NaN). ``use_fast_variance`` and
  ``force_float32_reductions`` are accepted for compatibility and ignored:
  statistics are always accumulated in at least float32 by the robust method.
* The output dtype is ``dtype`` if given, else the input's dtype (flax promotes
  a bfloat16 input with float32 parameters to a float32 output; we keep bfloat16).
* ``BatchNorm`` takes ``momentum=None`` (torch's cumulative average),
  ``unbiased_running_var`` (torch's Bessel-corrected running variance) and
  ``track_count``. The extra variable ``batch_stats/count`` (int32 scalar, torch's
  ``num_batches_tracked``) exists only when ``momentum is None`` or
  ``track_count=True``, so flax's ``{'mean', 'var'}`` trees load unchanged.
* Errors name the fix: training without ``mutable=['batch_stats']``, evaluating
  before any ``batch_stats`` exist, and variables of the wrong shape (the core's
  message, prefixed with the module's path).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.typing import Dtype, Initializer
from jax.nn import initializers

from jaxnorm import _checks
from jaxnorm._checks import Axes
from jaxnorm.functional import batch_norm, group_norm, instance_norm, layer_norm, rms_norm
from jaxnorm.state import BatchStats, init_batch_stats

__all__ = ["BatchNorm", "LayerNorm", "RMSNorm", "GroupNorm", "InstanceNorm"]


def _where(module: nn.Module) -> str:
    """``jaxnorm.linen.BatchNorm at '/Block_0/BatchNorm_0'``, for messages."""
    path = "/" + "/".join(str(p) for p in module.scope.path)
    return f"{type(module).__module__}.{type(module).__name__} at {path!r}"


@contextmanager
def _errors_at(module: nn.Module) -> Iterator[None]:
    """Prefix the core's ``ValueError``/``TypeError`` messages with the module's path."""
    try:
        yield
    except (ValueError, TypeError) as e:
        if e.args and isinstance(e.args[0], str):
            e.args = (f"{_where(module)}: {e.args[0]}",)
        raise


def _fetch_param(
    module: nn.Module, name: str, init: Initializer, shape: tuple[int, ...], dtype: Dtype
) -> jax.Array:
    """``module.param`` without flax's shape check, so the core's message reports a misfit."""
    if module.has_variable("params", name):
        return nn.meta.unbox(module.get_variable("params", name))
    return module.param(name, init, shape, dtype)


def _scale_and_bias(
    module: nn.Module, feature_shape: tuple[int, ...], *, use_bias: bool = True
) -> tuple[jax.Array | None, jax.Array | None]:
    scale = bias = None
    if module.use_scale:
        scale = _fetch_param(module, "scale", module.scale_init, feature_shape, module.param_dtype)
    if use_bias and module.use_bias:
        bias = _fetch_param(module, "bias", module.bias_init, feature_shape, module.param_dtype)
    return scale, bias


def _feature_shape(module: nn.Module, x: jax.Array, name: str = "axis") -> tuple[int, ...]:
    """The shape of ``x`` at the module's feature axes (the field ``name``)."""
    with _errors_at(module):
        axes = _checks.canonical_axes(
            type(module).__name__, name, getattr(module, name), jnp.ndim(x)
        )
    return tuple(x.shape[a] for a in axes)


def _mode(
    module: nn.Module, use_running_average: bool | None, stat: str = "mean"
) -> tuple[bool, bool]:
    """``(training, initializing)``, refusing a training call that cannot store its update
    and an evaluation call without statistics (``stat`` is a ``batch_stats`` entry)."""
    use_running_average = nn.merge_param(
        "use_running_average", module.use_running_average, use_running_average
    )
    training = not use_running_average
    initializing = module.is_initializing()
    mutable = module.is_mutable_collection("batch_stats")
    if training and not initializing and not mutable:
        raise ValueError(
            f"{_where(module)}: training (use_running_average=False) updates the running "
            f"statistics, but the 'batch_stats' collection is immutable. Pass "
            f"mutable=['batch_stats'] to apply and keep the returned updates: y, updates = "
            f"model.apply(variables, x, mutable=['batch_stats']). To evaluate instead, pass "
            f"use_running_average=True."
        )
    if not training and not mutable and not module.has_variable("batch_stats", stat):
        raise ValueError(
            f"{_where(module)}: evaluation (use_running_average=True) needs running "
            f"statistics, but the variables hold no 'batch_stats' for this layer. Run "
            f"model.init(...) first and pass all of its variables, e.g. "
            f"model.apply({{'params': params, 'batch_stats': batch_stats}}, x)."
        )
    return training, initializing


def _batch_stats(module: nn.Module, feature_shape: tuple[int, ...], with_count: bool):
    """The ``batch_stats/{mean, var[, count]}`` variables and the BatchStats they hold."""
    fresh = init_batch_stats(feature_shape)
    mean = module.variable("batch_stats", "mean", lambda: fresh.mean)
    var = module.variable("batch_stats", "var", lambda: fresh.var)
    count = module.variable("batch_stats", "count", lambda: fresh.count) if with_count else None
    stats = BatchStats(
        mean.value, var.value, count.value if count is not None else jnp.zeros((), jnp.int32)
    )
    return (mean, var, count), stats


def _store(variables, new: tuple) -> None:
    """Write new values into the variables that exist (``None`` entries are skipped)."""
    for variable, value in zip(variables, new, strict=True):
        if variable is not None:
            variable.value = value


def _init_training(training: bool, x: jax.Array, feature_shape: tuple[int, ...]) -> bool:
    """Whether ``init`` normalizes with batch statistics.

    flax runs ``init`` without ``axis_name`` (the named axis may not exist yet); a
    one-example init batch then has one value per feature, which the core refuses in
    training, so such an ``init`` normalizes with the fresh statistics instead.
    """
    return training and math.prod(x.shape) > math.prod(feature_shape)


class BatchNorm(nn.Module):
    """Batch normalization; mirrors ``flax.linen.BatchNorm``, statistics from the core.

    .. math::

        y = \\frac{x - \\mu}{\\sqrt{\\sigma^2 + \\epsilon}}\\,\\gamma + \\beta

    In training (``use_running_average=False``) ``mu``/``sigma**2`` are the biased
    batch statistics over every axis but ``axis`` (and over ``axis_name``'s devices),
    and the running statistics are updated as
    ``new = momentum * old + (1 - momentum) * batch`` (torch's ``momentum=0.1`` is
    our ``0.9``). In evaluation the running statistics are used. All of it is
    :func:`jaxnorm.batch_norm`.

    Variables: ``params/{scale, bias}`` and ``batch_stats/{mean, var}`` (float32),
    each of the feature shape, exactly as flax; plus ``batch_stats/count`` (int32
    scalar) only when ``momentum is None`` or ``track_count=True``. As in flax,
    ``init`` does not update the running statistics and ignores ``axis_name``.

    Differences from flax: exact statistics under masks and device shards (flax
    averages per-device moments), an empty mask updates nothing (flax writes NaN),
    output dtype ``dtype or x.dtype`` (flax promotes bf16 to f32), and the extra
    fields below.

    Attributes:
      use_running_average: ``True`` to normalize with the stored statistics; may
        instead be passed to ``__call__`` (exactly one of the two, as in flax).
      axis: the feature axis or axes (kept); all others are reduced.
      momentum: weight of the old running value in [0, 1]; ``None`` for torch's
        cumulative average of all batches (adds ``batch_stats/count``).
      epsilon: added to the variance.
      dtype: output dtype; ``None`` keeps the input's dtype.
      param_dtype: dtype of ``scale``/``bias``.
      use_bias: add a learned ``bias`` (beta).
      use_scale: multiply by a learned ``scale`` (gamma).
      bias_init: initializer for ``bias``.
      scale_init: initializer for ``scale``.
      axis_name: named axis of ``shard_map``/``pmap``/``vmap`` over which the batch
        is split; statistics are merged exactly across it.
      axis_index_groups: device groups for the cross-device reduction.
      use_fast_variance: accepted for compatibility and ignored: the core's variance
        stays correct for large means either way.
      force_float32_reductions: accepted for compatibility and ignored (statistics
        are always at least float32, and ``batch_stats`` are always float32).
      unbiased_running_var: store the Bessel-corrected batch variance in the running
        average (torch's convention); the batch itself uses the biased variance.
      track_count: keep ``batch_stats/count`` even with a numeric ``momentum``.
      skip_nonfinite: leave the running statistics of a feature whose batch statistics
        are NaN/Inf unchanged (NaN/Inf still propagate to the output).

    Example:
      >>> import jax, jax.numpy as jnp, jaxnorm.linen as jnn
      >>> bn = jnn.BatchNorm(momentum=0.9)
      >>> x = jax.random.normal(jax.random.key(0), (8, 3))
      >>> variables = bn.init(jax.random.key(1), x, use_running_average=False)
      >>> y, updates = bn.apply(variables, x, use_running_average=False,
      ...                       mutable=['batch_stats'])
      >>> sorted(updates['batch_stats'])
      ['mean', 'var']
    """

    use_running_average: bool | None = None
    axis: Axes = -1
    momentum: float | None = 0.99
    epsilon: float = 1e-5
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32
    use_bias: bool = True
    use_scale: bool = True
    bias_init: Initializer = initializers.zeros
    scale_init: Initializer = initializers.ones
    axis_name: Any = None
    axis_index_groups: Any = None
    use_fast_variance: bool = True
    force_float32_reductions: bool = True
    unbiased_running_var: bool = False
    track_count: bool = False
    skip_nonfinite: bool = False

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        use_running_average: bool | None = None,
        *,
        mask: jax.Array | None = None,
    ) -> jax.Array:
        """Normalize ``x`` with batch statistics (training) or running ones (evaluation).

        Args:
          x: floating input.
          use_running_average: ``True`` to use the running statistics; give it here
            or as the field, not both (as in flax).
          mask: optional boolean array broadcastable to ``x``; ``False`` elements do
            not enter the statistics.

        Returns:
          The normalized ``x``, of dtype ``self.dtype or x.dtype``.

        Raises:
          ValueError: training while ``batch_stats`` is immutable (pass
            ``mutable=['batch_stats']``), evaluating with no ``batch_stats``, or
            variables that do not fit ``x`` (the core's message, with this module's path).
        """
        training, initializing = _mode(self, use_running_average)
        feature_shape = _feature_shape(self, x)
        variables, stats = _batch_stats(
            self, feature_shape, with_count=self.momentum is None or self.track_count
        )
        scale, bias = _scale_and_bias(self, feature_shape)
        with _errors_at(self):
            y, new_stats = batch_norm(
                x,
                stats,
                scale,
                bias,
                training=_init_training(training, x, feature_shape) if initializing else training,
                axis=self.axis,
                momentum=self.momentum,
                epsilon=self.epsilon,
                axis_name=None if initializing else self.axis_name,
                axis_index_groups=None if initializing else self.axis_index_groups,
                mask=mask,
                unbiased_running_var=self.unbiased_running_var,
                skip_nonfinite=self.skip_nonfinite,
                dtype=self.dtype,
            )
        if training and not initializing:
            _store(variables, new_stats)
        return y


class LayerNorm(nn.Module):
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
      scale_init: initializer for ``scale``.
      reduction_axes: axes the statistics run over (default the last).
      feature_axes: axes that carry ``scale``/``bias`` (default the last).
      axis_name: optional named axis to also reduce across.
      axis_index_groups: device groups for ``axis_name``.
      use_fast_variance: accepted for compatibility and ignored.
      force_float32_reductions: accepted for compatibility and ignored (always >= f32).

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

    @nn.compact
    def __call__(self, x: jax.Array, *, mask: jax.Array | None = None) -> jax.Array:
        """Normalize each sample of ``x`` over ``reduction_axes``.

        Args:
          x: floating input.
          mask: optional boolean array broadcastable to ``x``.

        Returns:
          The normalized ``x``, of dtype ``self.dtype or x.dtype``.
        """
        scale, bias = _scale_and_bias(self, _feature_shape(self, x, "feature_axes"))
        with _errors_at(self):
            return layer_norm(
                x,
                scale,
                bias,
                axis=self.reduction_axes,
                feature_axis=self.feature_axes,
                epsilon=self.epsilon,
                mask=mask,
                dtype=self.dtype,
                axis_name=self.axis_name,
                axis_index_groups=self.axis_index_groups,
            )


class RMSNorm(nn.Module):
    """RMS normalization; mirrors ``flax.linen.RMSNorm``, via :func:`jaxnorm.rms_norm`.

    .. math::

        y = \\frac{x}{\\sqrt{\\mathrm{E}[x^2] + \\epsilon}}\\,\\gamma

    over ``reduction_axes`` of each sample. Variables ``params/scale`` as in flax.
    Difference from flax: output dtype ``dtype or x.dtype``.

    Attributes:
      epsilon: added to the mean square.
      dtype: output dtype; ``None`` keeps the input's dtype.
      param_dtype: dtype of ``scale``.
      use_scale: multiply by a learned ``scale``.
      scale_init: initializer for ``scale``.
      reduction_axes: axes the statistic runs over (default the last).
      feature_axes: axes that carry ``scale`` (default the last).
      axis_name: optional named axis to also reduce across.
      axis_index_groups: device groups for ``axis_name``.
      use_fast_variance: accepted for compatibility and ignored.
      force_float32_reductions: accepted for compatibility and ignored (always >= f32).
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

    @nn.compact
    def __call__(self, x: jax.Array, *, mask: jax.Array | None = None) -> jax.Array:
        """Rescale each sample of ``x`` by its root mean square over ``reduction_axes``.

        Args:
          x: floating input.
          mask: optional boolean array broadcastable to ``x``.

        Returns:
          The normalized ``x``, of dtype ``self.dtype or x.dtype``.
        """
        scale, _ = _scale_and_bias(self, _feature_shape(self, x, "feature_axes"), use_bias=False)
        with _errors_at(self):
            return rms_norm(
                x,
                scale,
                axis=self.reduction_axes,
                feature_axis=self.feature_axes,
                epsilon=self.epsilon,
                mask=mask,
                dtype=self.dtype,
                axis_name=self.axis_name,
                axis_index_groups=self.axis_index_groups,
            )


class GroupNorm(nn.Module):
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

    @nn.compact
    def __call__(self, x: jax.Array, *, mask: jax.Array | None = None) -> jax.Array:
        """Normalize ``x`` per sample and channel group.

        Args:
          x: floating input, batch first, channels last.
          mask: optional boolean array broadcastable to ``x``.

        Returns:
          The normalized ``x``, of dtype ``self.dtype or x.dtype``.

        Raises:
          ValueError: both or neither of ``num_groups``/``group_size`` (the default
            ``num_groups=32`` counts: pass ``num_groups=None`` with ``group_size``).
        """
        if self.num_groups is not None and self.group_size is not None:
            raise ValueError(
                f"{_where(self)}: give exactly one of num_groups and "
                f"group_size; got num_groups={self.num_groups!r}, group_size="
                f"{self.group_size!r}. num_groups defaults to 32, so pass num_groups=None "
                f"together with group_size."
            )
        scale, bias = _scale_and_bias(self, (x.shape[-1],) if jnp.ndim(x) else ())
        with _errors_at(self):
            return group_norm(
                x,
                scale,
                bias,
                num_groups=self.num_groups,
                group_size=self.group_size,
                axis=-1,
                reduction_axes=self.reduction_axes,
                epsilon=self.epsilon,
                mask=mask,
                dtype=self.dtype,
                axis_name=self.axis_name,
                axis_index_groups=self.axis_index_groups,
            )


class InstanceNorm(nn.Module):
    """Instance normalization; mirrors ``flax.linen.InstanceNorm``, numbers from the core.

    Each (sample, feature) is standardized over every axis except the batch axis 0
    and ``feature_axes``, by :func:`jaxnorm.instance_norm`. Variables ``params/{scale, bias}`` of
    the feature shape, as in flax.

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

    @nn.compact
    def __call__(self, x: jax.Array, *, mask: jax.Array | None = None) -> jax.Array:
        """Normalize each sample and feature of ``x`` over the remaining axes.

        Args:
          x: floating input, batch first.
          mask: optional boolean array broadcastable to ``x``.

        Returns:
          The normalized ``x``, of dtype ``self.dtype or x.dtype``.

        Raises:
          ValueError: ``feature_axes`` includes the batch axis 0, or leaves nothing
            to reduce.
        """
        with _errors_at(self):
            feature_axes = _checks.canonical_axes(
                "InstanceNorm", "feature_axes", self.feature_axes, jnp.ndim(x)
            )
        reduction_axes = tuple(a for a in range(1, x.ndim) if a not in feature_axes)
        if 0 in feature_axes or not reduction_axes:
            raise ValueError(
                f"{_where(self)}: feature_axes={self.feature_axes!r} "
                f"on x {tuple(x.shape)} must leave out the batch axis 0 and leave at least one "
                f"other axis to reduce. Pass e.g. feature_axes=-1 for (N, H, W, C) input."
            )
        scale, bias = _scale_and_bias(self, _feature_shape(self, x, "feature_axes"))
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
