"""Ghost (virtual) batch norm (Hoffer et al., 2017): each sub-batch by its own statistics."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxnorm import _checks, _sharding
from jaxnorm._checks import Axes
from jaxnorm.functional import batch_norm, mask_safe
from jaxnorm.state import BatchStats, update_batch_stats
from jaxnorm.stats import AxisName, Moments, moments
from jaxnorm.variants._common import (
    _affine,
    _check_one_value,
    _running,
)

# -------------------------------------------------------------------- ghost BN


def ghost_batch_norm(
    x: jax.Array,
    stats: BatchStats,
    scale: jax.Array | None = None,
    bias: jax.Array | None = None,
    *,
    virtual_batch_size: int,
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
    """Ghost (virtual) batch norm: each sub-batch of axis 0 normalized by its own statistics.

    The batch axis 0 of size ``N`` is split into ``k = N / virtual_batch_size``
    consecutive virtual batches ``x[j*v:(j+1)*v]``; in training each is batch-normalized
    by its own (biased, mask-restricted) mean and variance over every axis but ``axis``:

    .. math::

        y_j = \\frac{x_j - \\mu_j}{\\sqrt{\\sigma_j^2 + \\epsilon}}\\,\\gamma + \\beta,
        \\qquad j = 1..k

    exactly what :func:`jaxnorm.batch_norm` computes on ``x[j*v:(j+1)*v]`` alone. The
    virtual batches never mix, on one device; ``axis_name`` does not merge them across
    devices either (it only merges the running-statistics update, below).

    **Running statistics.** Updated once per call, with the *exact merged* moments of
    all virtual batches: the ``(count, mean, M2)`` of the whole (valid) batch, merged
    by Chan's formula (and across ``axis_name``'s devices), then
    ``new = momentum * old + (1 - momentum) * batch`` as in batch norm. So the state is
    exactly what :func:`jaxnorm.batch_norm` would store for the same batch, whatever
    ``virtual_batch_size``, and masks weight each virtual batch by its valid count.
    Not chosen: averaging the ``k`` per-virtual-batch variances (it drops the variance
    between virtual batches and is biased low by ``(v - 1)/v`` for small ``v``, while
    evaluation should see the population's variance), and ``k`` successive momentum
    updates per call (that silently changes the effective momentum to
    ``momentum**k``). A virtual batch in which a feature has no valid element is
    normalized with the running statistics, as :func:`jaxnorm.batch_norm` does. In
    evaluation the running statistics are used, as in batch norm.

    Args:
      x: floating input, batch first, e.g. ``(N, C)`` or ``(N, H, W, C)``.
      stats: running statistics from :func:`jaxnorm.init_batch_stats`.
      scale: optional ``gamma`` of the feature shape.
      bias: optional ``beta`` of the feature shape.
      virtual_batch_size: examples per virtual batch, ``v``; must divide ``N``.
        ``v = N`` is plain batch norm.
      training: required. ``True``: virtual-batch statistics, updated stats;
        ``False``: running statistics, stats returned as is.
      axis: the feature axis or axes (kept; not 0, which is the batch axis).
      momentum: weight of the old running value in [0, 1]; ``None`` for the cumulative
        average. torch's ``momentum=0.1`` is our ``0.9``.
      epsilon: added to the variance, >= 0.
      axis_name: named axis across which the running-statistics update is merged
        (exactly, as batch norm's); the normalization stays per virtual batch.
      axis_index_groups: device groups for that merge.
      mask: optional boolean array broadcastable to ``x``; ``False`` elements do not
        enter the statistics (they are still normalized).
      unbiased_running_var: store the Bessel-corrected variance of the merged batch
        (torch's convention).
      skip_nonfinite: keep the running statistics of a feature whose merged batch
        statistics are NaN/Inf unchanged (as :func:`jaxnorm.batch_norm`).
      dtype: output dtype; ``None`` keeps ``x.dtype``.

    Returns:
      ``(y, new_stats)``; ``new_stats`` is ``stats`` itself when ``training`` is False.

    Raises:
      TypeError, ValueError: as :func:`jaxnorm.batch_norm`, and a ``virtual_batch_size``
        that is not a positive int dividing ``x.shape[0]``, a feature axis 0, or virtual
        batches with one value per feature.

    Example:
      >>> import jax.numpy as jnp, jaxnorm
      >>> from jaxnorm.variants import ghost_batch_norm
      >>> x = jnp.array([[0.0], [2.0], [10.0], [14.0]])
      >>> y, new = ghost_batch_norm(x, jaxnorm.init_batch_stats((1,)), training=True,
      ...                           virtual_batch_size=2, epsilon=0.0, momentum=0.0)
      >>> y[:, 0].tolist(), new.mean.tolist()  # each pair standardized; mean of all four
      ([-1.0, 1.0, -1.0, 1.0], [6.5])

    References:
      Hoffer, Hubara & Soudry (2017), "Train longer, generalize better: closing the
      generalization gap in large batch training of neural networks", Algorithm 1.
    """
    fn = "ghost_batch_norm"
    _checks.check_training_flag(fn, training)
    lay, sd, scale_b, bias_b, run_mean, run_var = _running(
        fn, x, stats, scale, bias, axis=axis, epsilon=epsilon, mask=mask, dtype=dtype,
        momentum=momentum,
    )  # fmt: skip

    if not training:
        return batch_norm(
            x,
            stats,
            scale,
            bias,
            training=False,
            axis=axis,
            epsilon=epsilon,
            mask=mask,
            dtype=dtype,
        )

    # The virtual-batch checks concern training only: evaluation and init batches of
    # any size are fine.
    if 0 in lay.feature_axes:
        raise ValueError(
            f"{fn}: axis={axis!r} makes axis 0 of x {tuple(x.shape)} a feature axis, but axis "
            f"0 is the batch axis that is split into virtual batches. Put the batch first "
            f"and pass the feature axes, e.g. axis=-1."
        )
    batch_size = x.shape[0]
    v = virtual_batch_size
    if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < 1 or batch_size % v != 0:
        divisors = [d for d in range(1, batch_size + 1) if batch_size % d == 0]
        raise ValueError(
            f"{fn}: virtual_batch_size must be a positive int dividing the batch size "
            f"{batch_size} (x.shape[0] of x {tuple(x.shape)}); got {v!r}. Valid sizes: "
            f"{divisors}; or pad/trim the batch to a multiple of {v!r}."
        )
    v = int(v)
    _check_one_value(
        fn, lay, lay.n // batch_size * v, axis, x.shape, "virtual batch", unbiased_running_var
    )
    k = batch_size // v
    gshape = (k, v) + tuple(x.shape[1:])
    x_g = jnp.reshape(x, gshape)
    mask_g = None if mask is None else jnp.reshape(jnp.broadcast_to(mask, x.shape), gshape)
    red_g = tuple(a + 1 for a in lay.reduce_axes)  # axis 0 -> the within-virtual-batch axis 1
    per = moments(x_g, red_g, mask=mask_g)  # shape (k, 1, ...): one group per virtual batch
    mean, var = per.mean, per.var
    if mask is not None:
        has_data = per.count > 0
        mean = _sharding.where(has_data, mean, lax.stop_gradient(run_mean))
        var = _sharding.where(has_data, var, lax.stop_gradient(run_var))
    mul = lax.rsqrt(var + epsilon)
    if scale_b is not None:
        mul = mul * scale_b
    y = jnp.reshape(
        mask_safe(
            lambda x, m, k, b: _affine(x, m, k, b, lay.out_dtype), x_g, mask_g, mean, mul, bias_b
        ),
        x.shape,
    )

    # The moments of the whole (valid) batch, from x itself rather than by merging the k
    # rounded per-virtual-batch means, which loses precision at large means.
    merged = moments(
        lax.stop_gradient(x),
        lay.reduce_axes,
        mask=mask,
        axis_name=axis_name,
        axis_index_groups=axis_index_groups,
        keepdims=False,
    )
    flat = Moments(*(jnp.reshape(f, lay.feature_shape) for f in merged))
    new_stats = update_batch_stats(
        stats,
        flat,
        momentum=momentum,
        unbiased_running_var=unbiased_running_var,
        skip_nonfinite=skip_nonfinite,
    )
    return y, new_stats
