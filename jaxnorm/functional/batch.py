"""Batch normalization with explicit running statistics."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from typing_extensions import TypedDict

from jaxnorm import _checks, _sharding
from jaxnorm._checks import Axes
from jaxnorm.functional._core import (
    _broadcast_param,
    _can_fuse,
    _fused_standardize,
    _normalize,
    _out_dtype,
)
from jaxnorm.state import BatchStats, update_batch_stats
from jaxnorm.stats import AxisName, Moments, moments


class _BatchNormKeywords(TypedDict, total=False):
    """:func:`batch_norm`'s keywords that its variants pass through unchanged (for
    ``Unpack`` in a variant's ``**options``; a test keeps it equal to the signature)."""

    momentum: float | None
    epsilon: float
    axis_name: AxisName | None
    axis_index_groups: Sequence[Sequence[int]] | None
    mask: jax.Array | None
    unbiased_running_var: bool
    skip_nonfinite: bool


def batch_norm(
    x: jax.Array,
    stats: BatchStats,
    scale: jax.Array | None = None,
    bias: jax.Array | None = None,
    *,
    training: bool,
    axis: Axes = -1,
    momentum: float | None = 0.99,
    epsilon: float = 1e-5,
    axis_name: AxisName | None = None,
    axis_index_groups: Sequence[Sequence[int]] | None = None,
    mask: jax.Array | None = None,
    unbiased_running_var: bool = False,
    skip_nonfinite: bool = False,
    dtype: Any = None,
) -> tuple[jax.Array, BatchStats]:
    """Batch normalization with explicit running statistics.

    .. math::

        y = \\frac{x - \\mu}{\\sqrt{\\sigma^2 + \\epsilon}}\\,\\gamma + \\beta

    In training, ``mu`` and ``sigma**2`` are the (biased) mean and variance of ``x``
    over every axis except ``axis`` (and over devices of ``axis_name``), restricted
    to ``mask``; the running statistics are updated as
    ``new = momentum * old + (1 - momentum) * batch``. In evaluation, the running
    statistics are used and returned unchanged.

    Conventions: ``momentum`` weights the *old* value (flax); torch's
    ``momentum=p`` is our ``1 - p`` (torch's 0.1 is our 0.9), and torch's
    ``momentum=None`` (a cumulative average) is our ``momentum=None``. torch stores
    the unbiased variance ``n/(n-1) * var`` in its running average: pass
    ``unbiased_running_var=True`` (torch also uses ``epsilon=1e-5``, our default).

    Args:
      x: floating input, e.g. ``(N, C)`` or ``(N, H, W, C)``.
      stats: running statistics from :func:`jaxnorm.init_batch_stats` with the shape
        of the feature axes.
      scale: optional ``gamma`` of the feature shape.
      bias: optional ``beta`` of the feature shape.
      training: required. ``True`` normalizes with batch statistics and returns
        updated stats; ``False`` uses the running statistics and returns them as is.
      axis: the feature axis or axes (kept); all others are reduced.
      momentum: weight of the old running value, in [0, 1]; ``None`` for the
        cumulative average of all batches (torch's ``momentum=None``).
      epsilon: added to the variance, >= 0.
      axis_name: named axis (or tuple) of ``shard_map``/``pmap``/``vmap`` over which
        the batch is split; statistics are merged exactly across it.
      axis_index_groups: device groups for the cross-device reduction (``lax.psum``).
      mask: optional boolean array broadcastable to ``x``; ``False`` elements do not
        enter the statistics and may hold anything, NaN included (they are still
        normalized, but pass no gradient to the statistics or parameters; see
        :func:`mask_safe`). A feature with no valid element in the batch is normalized
        with its running statistics, which it leaves unchanged; a batch with none at
        all leaves ``stats`` untouched.
      unbiased_running_var: store the Bessel-corrected batch variance in the running
        average (torch's convention).
      skip_nonfinite: keep the running statistics of a feature whose batch statistics
        are NaN/Inf unchanged. NaN/Inf in ``x`` always propagate to ``y`` (they are never
        hidden); by default they also reach the running statistics, as in torch and
        flax, which poisons them for good: turn this on to guard long runs.
      dtype: output dtype; ``None`` keeps ``x.dtype``. Statistics are >= float32.

    Returns:
      ``(y, new_stats)``: ``y`` has ``x``'s shape; ``new_stats`` is ``stats`` itself
      when ``training`` is ``False``.

    Raises:
      TypeError: ``x`` is not floating, ``training`` is not a bool, ``stats`` is not a
        ``BatchStats``, or ``mask`` is not boolean.
      ValueError: bad axes, shapes of ``stats``/``scale``/``bias``/``mask`` that do
        not fit, ``epsilon < 0``, ``momentum`` outside [0, 1], an empty ``x``, or a
        training batch with one value per feature, no ``axis_name`` and
        ``unbiased_running_var=True`` (torch's refusal; by default, as in flax, such a
        batch has variance 0, so ``y = bias``, and the running statistics are updated).

    Example:
      >>> import jax.numpy as jnp, jaxnorm
      >>> x = jnp.arange(12.0).reshape(4, 3)
      >>> stats = jaxnorm.init_batch_stats((3,))
      >>> y, stats = jaxnorm.batch_norm(x, stats, training=True, momentum=0.9)
      >>> [round(float(v), 3) for v in y.mean(0)], [round(float(v), 4) for v in stats.mean]
      ([0.0, 0.0, 0.0], [0.45, 0.55, 0.65])

    References:
      Ioffe & Szegedy (2015), "Batch Normalization: Accelerating Deep Network Training
      by Reducing Internal Covariate Shift".
    """
    fn = "batch_norm"
    _checks.check_floating(fn, x, complex_ok=True)
    _checks.check_training_flag(fn, training)
    feature_axes = _checks.canonical_axes(fn, "axis", axis, jnp.ndim(x))
    reduce_axes = tuple(a for a in range(x.ndim) if a not in feature_axes)
    n = _checks.check_nonempty(fn, x, reduce_axes)
    feature_shape = tuple(x.shape[a] for a in feature_axes)
    desc = f"the feature axes axis={axis!r} of x {tuple(x.shape)}"
    _checks.check_stats(fn, stats, feature_shape, desc, x_dtype=jnp.result_type(x))
    _checks.check_param_shape(fn, "scale", scale, feature_shape, desc, complex_ok=True)
    _checks.check_param_shape(fn, "bias", bias, feature_shape, desc, complex_ok=True)
    _checks.check_epsilon(fn, epsilon)
    _checks.check_momentum(fn, momentum)
    _checks.check_mask(fn, mask, x.shape)
    out_dtype = _out_dtype(fn, x, dtype)
    bshape = tuple(x.shape[a] if a in feature_axes else 1 for a in range(x.ndim))
    scale_b = _broadcast_param(scale, x.ndim, feature_axes, x.shape)
    bias_b = _broadcast_param(bias, x.ndim, feature_axes, x.shape)
    running_mean = jnp.reshape(stats.mean, bshape)
    running_var = jnp.reshape(stats.var, bshape)

    if not training:
        y = _normalize(
            x,
            running_mean,
            running_var,
            scale_b,
            bias_b,
            epsilon=epsilon,
            out_dtype=out_dtype,
            mask=mask,
        )
        return y, stats

    if n == 1 and axis_name is None and unbiased_running_var:
        raise ValueError(
            f"{fn}: unbiased_running_var=True (torch's convention) needs more than one value "
            f"per feature in training, since n/(n-1) is undefined at n=1, but x "
            f"{tuple(x.shape)} with feature axes axis={axis!r} has exactly 1 value for each "
            f"of the {feature_shape} features (torch: 'Expected more than 1 value per channel "
            f"when training'). Use a batch larger than 1, training=False for inference, "
            f"axis_name=... if the batch is split across devices, or unbiased_running_var="
            f"False (flax's convention: variance 0, so y = bias)."
        )
    if _can_fuse(x, mask, axis_name, epsilon):
        y, mean, var = _fused_standardize(
            x, scale, bias, reduce_axes, feature_axes, float(epsilon), True
        )
        y = y.astype(out_dtype)
        batch = Moments(jnp.full_like(var, float(n)), mean, var * n)
    else:
        batch = moments(
            x, reduce_axes, mask=mask, axis_name=axis_name, axis_index_groups=axis_index_groups
        )
        mean, var = batch.mean, batch.var
        if mask is not None:
            has_data = batch.count > 0
            mean = _sharding.where(has_data, mean, lax.stop_gradient(running_mean))
            var = _sharding.where(has_data, var, lax.stop_gradient(running_var))
        y = _normalize(
            x, mean, var, scale_b, bias_b, epsilon=epsilon, out_dtype=out_dtype, mask=mask
        )
    batch_flat = Moments(*(jnp.reshape(lax.stop_gradient(f), feature_shape) for f in batch))
    new_stats = update_batch_stats(
        stats,
        batch_flat,
        momentum=momentum,
        unbiased_running_var=unbiased_running_var,
        skip_nonfinite=skip_nonfinite,
    )
    return y, new_stats
