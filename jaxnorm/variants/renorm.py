"""Batch renormalization (Ioffe, 2017): batch statistics corrected towards the running ones."""

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
    _concrete_float,
    _running,
)

# ------------------------------------------------------------------ batch renorm


def _check_renorm_limits(fn: str, r_max: Any, d_max: Any) -> None:
    r = _concrete_float(r_max)
    d = _concrete_float(d_max)
    if r is not None and not r >= 1.0:
        raise ValueError(
            f"{fn}: r_max must be >= 1 (r is clipped to [1/r_max, r_max]); got {r_max!r}. "
            f"r_max=1 (with d_max=0) is plain batch norm; the paper relaxes it to 3."
        )
    if d is not None and not d >= 0.0:
        raise ValueError(
            f"{fn}: d_max must be >= 0 (d is clipped to [-d_max, d_max]); got {d_max!r}. "
            f"d_max=0 (with r_max=1) is plain batch norm; the paper relaxes it to 5."
        )


def renorm_schedule(
    step: Any,
    *,
    warmup_steps: int = 5000,
    r_max: float = 3.0,
    d_max: float = 5.0,
    r_relax_steps: int = 35_000,
    d_relax_steps: int = 20_000,
) -> tuple[jax.Array, jax.Array]:
    """The clipping limits ``(r_max, d_max)`` of batch renormalization at a training step.

    Plain batch norm (``r_max = 1``, ``d_max = 0``) for the first ``warmup_steps``, then
    a linear ramp to the final limits:

    .. math::

        t_r = \\mathrm{clip}\\Big(\\frac{s - s_0}{S_r}, 0, 1\\Big),\\quad
        r_{\\max}(s) = 1 + (r_{\\max} - 1)\\,t_r,\\qquad
        d_{\\max}(s) = d_{\\max}\\,\\mathrm{clip}\\Big(\\frac{s - s_0}{S_d}, 0, 1\\Big)

    The defaults are the paper's ImageNet schedule: batch norm for 5k steps, ``r_max``
    reaching 3 at 40k steps and ``d_max`` reaching 5 at 25k steps (the paper says
    "gradually relaxed"; the ramp's shape is ours). A relax length of 0 jumps to the
    final value right after the warm-up.

    Args:
      step: the training step, a Python int or an integer array (e.g. ``stats.count``,
        the number of updates so far); it may be traced.
      warmup_steps: steps of plain batch norm, ``s_0``.
      r_max: final ``r_max`` (>= 1).
      d_max: final ``d_max`` (>= 0).
      r_relax_steps: steps of the ``r_max`` ramp after the warm-up, ``S_r``.
      d_relax_steps: steps of the ``d_max`` ramp after the warm-up, ``S_d``.

    Returns:
      ``(r_max, d_max)`` at ``step``, float32 scalars, to pass to :func:`batch_renorm`.

    Raises:
      ValueError: negative step counts, ``r_max < 1`` or ``d_max < 0``.

    Example:
      >>> from jaxnorm.variants import renorm_schedule
      >>> [tuple(round(float(v), 2) for v in renorm_schedule(s)) for s in (0, 5000, 22500)]
      [(1.0, 0.0), (1.0, 0.0), (2.0, 4.38)]

    References:
      Ioffe (2017), "Batch Renormalization: Towards Reducing Minibatch Dependence in
      Batch-Normalized Models", section 4.
    """
    fn = "renorm_schedule"
    for name, value in (
        ("warmup_steps", warmup_steps),
        ("r_relax_steps", r_relax_steps),
        ("d_relax_steps", d_relax_steps),
    ):
        if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 0:
            raise ValueError(
                f"{fn}: {name} must be a non-negative int (a number of steps); got {value!r}."
            )
    _check_renorm_limits(fn, r_max, d_max)
    s = jnp.asarray(step, jnp.float32) - float(warmup_steps)

    def ramp(length: int) -> jax.Array:
        if length == 0:
            return (s > 0).astype(jnp.float32)
        return jnp.clip(s / float(length), 0.0, 1.0)

    r = 1.0 + (jnp.asarray(r_max, jnp.float32) - 1.0) * ramp(r_relax_steps)
    d = jnp.asarray(d_max, jnp.float32) * ramp(d_relax_steps)
    return r, d


def batch_renorm(
    x: jax.Array,
    stats: BatchStats,
    scale: jax.Array | None = None,
    bias: jax.Array | None = None,
    *,
    training: bool,
    axis: Axes = -1,
    momentum: float | None = 0.99,
    epsilon: float = 1e-5,
    r_max: Any = 3.0,
    d_max: Any = 5.0,
    axis_name: AxisName | None = None,
    axis_index_groups: Sequence[Sequence[int]] | None = None,
    mask: jax.Array | None = None,
    unbiased_running_var: bool = False,
    dtype: Any = None,
) -> tuple[jax.Array, BatchStats]:
    """Batch renormalization: batch statistics corrected towards the running ones.

    In training, with the batch statistics ``mu_B``, ``sigma_B = sqrt(var_B + eps)``
    and the running ones ``mu``, ``sigma = sqrt(var + eps)``:

    .. math::

        r = \\mathrm{sg}\\Big(\\mathrm{clip}\\big(\\tfrac{\\sigma_B}{\\sigma},
            \\tfrac{1}{r_{\\max}}, r_{\\max}\\big)\\Big),\\quad
        d = \\mathrm{sg}\\Big(\\mathrm{clip}\\big(\\tfrac{\\mu_B - \\mu}{\\sigma},
            -d_{\\max}, d_{\\max}\\big)\\Big),\\quad
        y = \\Big(\\frac{x - \\mu_B}{\\sigma_B}\\,r + d\\Big)\\gamma + \\beta

    where ``sg`` is ``stop_gradient``: gradients flow through ``mu_B`` and ``sigma_B``
    as in batch norm, with ``r`` and ``d`` treated as constants. Unclipped, the output
    is ``(x - mu)/sigma * gamma + beta``, what evaluation computes. ``r_max = 1`` and
    ``d_max = 0`` is exactly :func:`jaxnorm.batch_norm`. In evaluation,
    ``y = (x - mu)/sigma * gamma + beta``.

    Running statistics are updated exactly as by :func:`jaxnorm.batch_norm`:
    ``new = momentum * old + (1 - momentum) * batch`` on the mean and the *variance*.
    (The paper averages ``sigma`` itself; averaging the variance keeps the state a
    :class:`BatchStats` interchangeable with batch norm's and the ``r_max = 1``,
    ``d_max = 0`` case identical to it.) ``sigma`` above is ``sqrt(var + eps)`` of that
    running variance. A feature with no valid element under ``mask`` is normalized with
    its running statistics (``r = 1``, ``d = 0``) and keeps them.

    Use :func:`renorm_schedule` for the paper's warm-up (``r_max`` from 1 to 3,
    ``d_max`` from 0 to 5); ``r_max``/``d_max`` may be traced arrays, e.g.
    ``renorm_schedule(stats.count)``.

    Args:
      x: floating input, e.g. ``(N, C)`` or ``(N, H, W, C)``.
      stats: running statistics from :func:`jaxnorm.init_batch_stats`.
      scale: optional ``gamma`` of the feature shape.
      bias: optional ``beta`` of the feature shape.
      training: required. ``True``: renormalized batch statistics and updated stats;
        ``False``: running statistics, stats returned as is.
      axis: the feature axis or axes (kept); all others are reduced.
      momentum: weight of the old running value in [0, 1]; ``None`` for the cumulative
        average (torch's ``momentum=None``). torch's ``momentum=0.1`` is our ``0.9``.
      epsilon: added to both variances, >= 0.
      r_max: clip limit of ``r``, >= 1 (a number or a traced scalar).
      d_max: clip limit of ``d``, >= 0 (a number or a traced scalar).
      axis_name: named axis of ``shard_map``/``pmap``/``vmap`` across which the batch is
        split; batch statistics are merged exactly across it.
      axis_index_groups: device groups for the cross-device reduction.
      mask: optional boolean array broadcastable to ``x``; ``False`` elements do not
        enter the statistics (they are still normalized).
      unbiased_running_var: store the Bessel-corrected batch variance in the running
        average (torch's convention).
      dtype: output dtype; ``None`` keeps ``x.dtype``.

    Returns:
      ``(y, new_stats)``; ``new_stats`` is ``stats`` itself when ``training`` is False.

    Raises:
      TypeError, ValueError: as :func:`jaxnorm.batch_norm`, and ``r_max < 1`` or
        ``d_max < 0``.

    Example:
      >>> import jax.numpy as jnp, jaxnorm
      >>> from jaxnorm.variants import batch_renorm
      >>> x = jnp.array([[0.0], [2.0], [4.0]])
      >>> stats = jaxnorm.init_batch_stats((1,))._replace(mean=jnp.array([1.0]))
      >>> y, new = batch_renorm(x, stats, training=True, epsilon=0.0, d_max=0.5)
      >>> [round(float(v), 3) for v in y[:, 0]]  # r = 1.633 (unclipped), d = 0.5 (clipped)
      [-1.5, 0.5, 2.5]

    References:
      Ioffe (2017), "Batch Renormalization: Towards Reducing Minibatch Dependence in
      Batch-Normalized Models", Algorithm 1.
    """
    fn = "batch_renorm"
    _checks.check_training_flag(fn, training)
    lay, sd, scale_b, bias_b, run_mean, run_var = _running(
        fn, x, stats, scale, bias, axis=axis, epsilon=epsilon, mask=mask, dtype=dtype,
        momentum=momentum,
    )  # fmt: skip
    _check_renorm_limits(fn, r_max, d_max)

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

    if axis_name is None:
        _check_one_value(fn, lay, lay.n, axis, x.shape, "batch", unbiased_running_var)
    batch = moments(
        x, lay.reduce_axes, mask=mask, axis_name=axis_name, axis_index_groups=axis_index_groups
    )
    mean, var = batch.mean, batch.var
    if mask is not None:
        has_data = batch.count > 0
        mean = _sharding.where(has_data, mean, lax.stop_gradient(run_mean))
        var = _sharding.where(has_data, var, lax.stop_gradient(run_var))
    rstd_b = lax.rsqrt(var + epsilon)
    rstd = lax.rsqrt(lax.stop_gradient(run_var) + epsilon)
    r_max = jnp.asarray(r_max, sd)
    d_max = jnp.asarray(d_max, sd)
    r = lax.stop_gradient(jnp.clip(rstd / rstd_b, 1.0 / r_max, r_max))  # sigma_B / sigma
    d = lax.stop_gradient(jnp.clip((mean - run_mean) * rstd, -d_max, d_max))
    mul = rstd_b * r
    add = d
    if scale_b is not None:
        mul = mul * scale_b
        add = add * scale_b
    if bias_b is not None:
        add = add + bias_b
    y = mask_safe(lambda x, m, k, a: _affine(x, m, k, a, lay.out_dtype), x, mask, mean, mul, add)
    flat = Moments(*(jnp.reshape(lax.stop_gradient(f), lay.feature_shape) for f in batch))
    new_stats = update_batch_stats(
        stats, flat, momentum=momentum, unbiased_running_var=unbiased_running_var
    )
    return y, new_stats
