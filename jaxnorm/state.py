"""Running statistics: the ``BatchStats`` state and its averaging rules.

Conventions (they differ between frameworks):

* ``momentum`` is the weight of the *old* value, as in flax and Keras:
  ``new = momentum * old + (1 - momentum) * batch``. torch's ``momentum=p`` weights
  the *batch*, so torch's default ``0.1`` is our ``0.9``.
* ``momentum=None`` is torch's cumulative moving average:
  ``new = old + (batch - old) / (count + 1)``, i.e. the plain mean of all batches so far.
* ``unbiased_running_var=True`` stores the Bessel-corrected batch variance
  ``var * n / (n - 1)`` in the running average, as torch does (the batch itself is
  still normalized with the biased variance, in torch and here).
* ``count`` is the number of training steps that updated the statistics (torch's
  ``num_batches_tracked``). A step whose mask selects nothing updates nothing.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp

from jaxnorm import _checks, _sharding
from jaxnorm.stats import Moments

__all__ = ["BatchStats", "init_batch_stats", "update_batch_stats"]


class BatchStats(NamedTuple):
    """Running statistics of a batch-normalization layer (a pytree).

    ``feature_shape`` is the shape of the kept (feature) axes, e.g. ``(C,)``.

    Attributes:
      mean: ``feature_shape``, float32 (complex64 for complex inputs): the running mean.
      var: ``feature_shape``, float32 (always real): the running variance.
      count: ``()``, int32: training steps that updated ``mean``/``var`` (torch's
        ``num_batches_tracked``).
    """

    mean: jax.Array  # shape=feature_shape, float32 (complex64 for complex inputs): running mean
    var: jax.Array  # shape=feature_shape, float32 (always real): running variance
    count: jax.Array  # shape=(), int32: training steps that updated mean/var


def init_batch_stats(
    feature_shape: int | Sequence[int], dtype: jnp.dtype = jnp.float32
) -> BatchStats:
    """Fresh running statistics: mean zeros, var ones, count 0.

    Args:
      feature_shape: shape of the feature axes (an int for one axis).
      dtype: dtype of ``mean`` and ``var`` (float32 by default; keep it at least f32).
        A complex dtype (for complex inputs) gives a complex ``mean`` and a ``var`` of
        the matching real dtype.

    Returns:
      A :class:`BatchStats`.

    Example:
      >>> import jaxnorm
      >>> s = jaxnorm.init_batch_stats((3,))
      >>> s.mean.tolist(), s.var.tolist(), int(s.count)
      ([0.0, 0.0, 0.0], [1.0, 1.0, 1.0], 0)
    """
    shape = _checks.feature_shape_tuple("init_batch_stats", feature_shape)
    if not jnp.issubdtype(dtype, jnp.inexact):
        raise TypeError(
            f"init_batch_stats: dtype must be floating (or complex, for complex inputs); got "
            f"{jnp.dtype(dtype)}. Pass dtype=jnp.float32."
        )
    return BatchStats(
        mean=jnp.zeros(shape, dtype),
        var=jnp.ones(shape, jnp.finfo(dtype).dtype),
        count=jnp.zeros((), jnp.int32),
    )


def update_batch_stats(
    stats: BatchStats,
    batch: Moments,
    *,
    momentum: float | None,
    unbiased_running_var: bool = False,
    skip_nonfinite: bool = False,
) -> BatchStats:
    """Fold one batch's moments into the running statistics.

    .. math::

        \\text{new} = \\text{momentum}\\,\\text{old} + (1 - \\text{momentum})\\,\\text{batch}
        \\quad\\text{or, with momentum None,}\\quad
        \\text{new} = \\text{old} + \\frac{\\text{batch} - \\text{old}}{\\text{count} + 1}

    where the batch variance is ``M2/n`` or, with ``unbiased_running_var``,
    ``M2/(n-1)``. Features whose batch count is 0 keep their old values, and
    ``count`` only advances if some feature saw data, so an empty mask never
    writes NaN. ``count`` is one scalar for all features: with ``momentum=None`` and
    a per-feature mask that empties some features on some steps, those features are
    averaged with the shared step count (keep per-feature masks for momentum decay).

    Args:
      stats: the running statistics.
      batch: the batch moments with the reduced axes dropped (shape ``feature_shape``).
      momentum: weight of the old value in [0, 1], or ``None`` for a cumulative average.
      unbiased_running_var: store the Bessel-corrected variance (torch's convention).
      skip_nonfinite: treat a feature whose batch mean or variance is NaN/Inf like an
        empty one: its running statistics stay as they were (and ``count`` does not
        advance if no feature updated). Off by default, as in torch and flax, where a
        non-finite batch poisons the running statistics.

    The average is computed in the wider of the stats' and the batch's dtypes, so
    float64 stats (under ``jax_enable_x64``) average in float64, as torch does.

    Returns:
      The new :class:`BatchStats` (same dtypes as ``stats``).
    """
    _checks.check_momentum("update_batch_stats", momentum)
    n = batch.count
    has_data = n > 0
    if skip_nonfinite:
        has_data = has_data & jnp.isfinite(batch.mean) & jnp.isfinite(batch.m2)
    if unbiased_running_var:
        batch_var = batch.m2 / jnp.maximum(n - 1.0, 1.0)
    else:
        batch_var = batch.var
    if jnp.iscomplexobj(batch.mean) and not jnp.iscomplexobj(stats.mean):
        raise TypeError(
            f"update_batch_stats: the batch mean is {batch.mean.dtype} but stats.mean is "
            f"{stats.mean.dtype}, which would drop its imaginary part. Create the stats with "
            f"jaxnorm.init_batch_stats(shape, dtype=jnp.{batch.mean.dtype})."
        )
    # Average in the wider of the stats' and the batch's dtypes (float64 stats stay float64).
    dt = jnp.promote_types(stats.mean.dtype, batch.mean.dtype)
    dt_var = jnp.promote_types(stats.var.dtype, batch_var.dtype)
    old_mean = stats.mean.astype(dt)
    old_var = stats.var.astype(dt_var)
    if momentum is None:
        # new = old + (batch - old) / (count + 1). The weight 1/(count + 1) keeps its
        # relative precision at any count, whereas alpha = count/(count + 1) rounds to 1
        # in float32 from 2**24 steps on (its complement is already 7% off at 3e6).
        weight = 1.0 / (stats.count.astype(dt_var) + 1.0)
        new_mean = old_mean + weight * (batch.mean.astype(dt) - old_mean)
        new_var = old_var + weight * (batch_var.astype(dt_var) - old_var)
    else:
        new_mean = momentum * old_mean + (1.0 - momentum) * batch.mean.astype(dt)
        new_var = momentum * old_var + (1.0 - momentum) * batch_var.astype(dt_var)
    new_mean = _sharding.where(has_data, new_mean, old_mean)
    new_var = _sharding.where(has_data, new_var, old_var)
    stepped = jnp.any(has_data)
    return BatchStats(
        mean=jax.lax.stop_gradient(new_mean.astype(stats.mean.dtype)),
        var=jax.lax.stop_gradient(new_var.astype(stats.var.dtype)),
        count=stats.count + stepped.astype(stats.count.dtype),
    )
