"""Batch-norm variants: batch renormalization, PowerNorm, ghost and frozen batch norm.

Pure functions with explicit state, like :func:`jaxnorm.batch_norm`: every one takes
its running statistics and returns new ones, hyperparameters are keyword-only, and
``training`` has no default. Statistics come from :mod:`jaxnorm.stats` in
``promote(x.dtype, float32)``; outputs have ``x``'s dtype unless ``dtype`` says
otherwise. ``axis`` names the kept *feature* axes, as in :func:`jaxnorm.batch_norm`;
every other axis is reduced.

* :func:`batch_renorm` (Ioffe, 2017) corrects the batch statistics towards the
  running ones by the stop-gradient factors ``r`` and ``d``; state :class:`BatchStats`.
* :func:`power_norm` (Shen et al., 2020) divides by a *running* quadratic mean, with an
  approximate backward pass that carries a running gradient statistic; state
  :class:`PowerNormStats`.
* :func:`ghost_batch_norm` (Hoffer et al., 2017) normalizes each virtual sub-batch of
  the batch axis by its own statistics; state :class:`BatchStats`.
* :func:`frozen_batch_norm` normalizes with the running statistics whatever the mode
  (fine-tuning with frozen statistics); state :class:`BatchStats`, returned unchanged.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxnorm import _checks
from jaxnorm._checks import Axes
from jaxnorm.functional import batch_norm, mask_safe
from jaxnorm.state import BatchStats, update_batch_stats
from jaxnorm.stats import (
    AxisName,
    Moments,
    mean_square,
    moments,
    stat_dtype,
)

__all__ = [
    "PowerNormStats",
    "batch_renorm",
    "frozen_batch_norm",
    "ghost_batch_norm",
    "init_power_norm_stats",
    "power_norm",
    "renorm_schedule",
    "update_power_norm_grad_stat",
]


# ------------------------------------------------------------------------- helpers


class _Layout(NamedTuple):
    """Static facts about ``x`` and its feature axes, shared by every variant."""

    feature_axes: tuple[int, ...]
    reduce_axes: tuple[int, ...]
    feature_shape: tuple[int, ...]
    bshape: tuple[int, ...]  # feature shape with size-1 reduced axes: broadcasts to x
    n: int  # elements per feature in one call (before masks)
    desc: str  # "the feature axes axis=-1 of x (8, 3)", for messages
    out_dtype: Any


def _layout(
    fn: str,
    x: jax.Array,
    scale: Any,
    bias: Any,
    *,
    axis: Axes,
    epsilon: Any,
    mask: Any,
    dtype: Any,
) -> _Layout:
    """Validate the arguments every variant shares and canonicalize the axes."""
    _checks.check_floating(fn, x)
    feature_axes = _checks.canonical_axes(fn, "axis", axis, jnp.ndim(x))
    reduce_axes = tuple(a for a in range(x.ndim) if a not in feature_axes)
    n = _checks.check_nonempty(fn, x, reduce_axes)
    feature_shape = tuple(x.shape[a] for a in feature_axes)
    desc = f"the feature axes axis={axis!r} of x {tuple(x.shape)}"
    _checks.check_param_shape(fn, "scale", scale, feature_shape, desc)
    _checks.check_param_shape(fn, "bias", bias, feature_shape, desc)
    _checks.check_epsilon(fn, epsilon)
    _checks.check_mask(fn, mask, x.shape)
    if dtype is None:
        out_dtype = jnp.result_type(x)
    else:
        out_dtype = jnp.dtype(dtype)
        if not jnp.issubdtype(out_dtype, jnp.floating):
            raise TypeError(
                f"{fn}: dtype must be floating (the output dtype); got {out_dtype}. Pass e.g. "
                f"dtype=jnp.float32, or dtype=None to keep x's dtype."
            )
    bshape = tuple(x.shape[a] if a in feature_axes else 1 for a in range(x.ndim))
    return _Layout(feature_axes, reduce_axes, feature_shape, bshape, n, desc, out_dtype)


def _feature(p: jax.Array | None, bshape: tuple[int, ...], sd: Any) -> jax.Array | None:
    """A feature-shaped array (scale, bias, a statistic) reshaped to broadcast to x."""
    return None if p is None else jnp.reshape(p, bshape).astype(sd)


def _affine(
    x: jax.Array,
    shift: jax.Array | None,
    mul: jax.Array,
    add: jax.Array | None,
    out_dtype: Any,
) -> jax.Array:
    """``(x - shift) * mul + add`` in ``mul``'s (>= f32) dtype, cast to ``out_dtype``."""
    y = x.astype(mul.dtype)
    if shift is not None:
        y = y - shift
    y = y * mul
    if add is not None:
        y = y + add
    return y.astype(out_dtype)


def _check_one_value(
    fn: str, lay: _Layout, n: int, axis: Axes, x_shape, what: str, unbiased: bool
) -> None:
    """Refuse one value per feature only under torch's unbiased running variance.

    As in :func:`jaxnorm.batch_norm` (and flax), such a batch otherwise has variance 0;
    ``n / (n - 1)`` is undefined at ``n = 1``.
    """
    if n == 1 and unbiased:
        raise ValueError(
            f"{fn}: unbiased_running_var=True needs more than one value per feature in each "
            f"{what} (n/(n-1) is undefined at n=1), but x {tuple(x_shape)} with feature axes "
            f"axis={axis!r} has exactly 1 value for each of the {lay.feature_shape} "
            f"features. Use a larger batch, training=False, or unbiased_running_var=False."
        )


def _concrete_float(value: Any) -> float | None:
    """``float(value)`` for a Python/NumPy number or concrete array; None when traced."""
    if isinstance(value, jax.core.Tracer):
        return None
    try:
        return float(value)
    except TypeError:
        return None


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
    lay = _layout(fn, x, scale, bias, axis=axis, epsilon=epsilon, mask=mask, dtype=dtype)
    _checks.check_stats(fn, stats, lay.feature_shape, lay.desc)
    _checks.check_momentum(fn, momentum)
    _check_renorm_limits(fn, r_max, d_max)
    sd = stat_dtype(x.dtype)
    scale_b = _feature(scale, lay.bshape, sd)
    bias_b = _feature(bias, lay.bshape, sd)
    run_mean = _feature(stats.mean, lay.bshape, sd)
    run_var = _feature(stats.var, lay.bshape, sd)

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
        mean = jnp.where(has_data, mean, lax.stop_gradient(run_mean))
        var = jnp.where(has_data, var, lax.stop_gradient(run_var))
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


# -------------------------------------------------------------------- power norm


class PowerNormStats(NamedTuple):
    """Running statistics of :func:`power_norm` (a pytree).

    ``feature_shape`` is the shape of the kept (feature) axes, e.g. ``(C,)``.
    """

    mean_square: jax.Array  # shape=feature_shape, float32: running quadratic mean psi^2 (init 1)
    grad_stat: jax.Array  # shape=feature_shape, float32: running backward statistic nu (init 0)
    count: jax.Array  # shape=(), int32: training steps that updated mean_square


def init_power_norm_stats(
    feature_shape: int | Sequence[int], dtype: Any = jnp.float32
) -> PowerNormStats:
    """Fresh PowerNorm statistics: ``mean_square`` ones, ``grad_stat`` zeros, count 0.

    Args:
      feature_shape: shape of the feature axes (an int for one axis).
      dtype: floating dtype of ``mean_square`` and ``grad_stat`` (keep it >= float32).

    Returns:
      A :class:`PowerNormStats`.

    Raises:
      TypeError: a non-floating ``dtype``.

    Example:
      >>> from jaxnorm.variants import init_power_norm_stats
      >>> s = init_power_norm_stats(2)
      >>> s.mean_square.tolist(), s.grad_stat.tolist(), int(s.count)
      ([1.0, 1.0], [0.0, 0.0], 0)
    """
    shape = _checks.feature_shape_tuple("init_power_norm_stats", feature_shape)
    if not jnp.issubdtype(dtype, jnp.floating):
        raise TypeError(
            f"init_power_norm_stats: dtype must be floating; got {jnp.dtype(dtype)}. Pass "
            f"dtype=jnp.float32."
        )
    return PowerNormStats(
        mean_square=jnp.ones(shape, dtype),
        grad_stat=jnp.zeros(shape, dtype),
        count=jnp.zeros((), jnp.int32),
    )


def _check_power_norm_stats(fn: str, stats: Any, feature_shape: tuple[int, ...], desc: str):
    fix = f"create it with jaxnorm.variants.init_power_norm_stats({feature_shape})"
    if not all(hasattr(stats, f) for f in PowerNormStats._fields):
        hint = " (a BatchStats belongs to batch_norm)" if hasattr(stats, "var") else ""
        raise TypeError(
            f"{fn}: stats must be a PowerNormStats (fields mean_square, grad_stat, count); "
            f"got {type(stats).__name__}{hint}; {fix}."
        )
    for field in ("mean_square", "grad_stat"):
        value = getattr(stats, field)
        shape = tuple(jnp.shape(value))
        if shape != feature_shape:
            raise ValueError(
                f"{fn}: stats.{field} has shape {shape} but {desc} need {feature_shape}; "
                f"{fix} (stats from another layer, or a different axis, do not fit)."
            )
        if not jnp.issubdtype(jnp.result_type(value), jnp.floating):
            raise TypeError(
                f"{fn}: stats.{field} must be floating; got {jnp.result_type(value)}; {fix}."
            )
    if tuple(jnp.shape(stats.count)) != ():
        raise ValueError(
            f"{fn}: stats.count must be a scalar step counter; got shape "
            f"{tuple(jnp.shape(stats.count))}; {fix}."
        )


class _PowerNormConfig(NamedTuple):
    """Static arguments of the PowerNorm custom VJP (hashable)."""

    reduce_axes: tuple[int, ...]
    grad_momentum: float
    axis_name: Any
    axis_index_groups: Any
    out_dtype: Any


def _power_norm_forward(x, scale_b, bias_b, rstd, out_dtype):
    x_hat = x.astype(rstd.dtype) * rstd
    y = x_hat if scale_b is None else x_hat * scale_b
    if bias_b is not None:
        y = y + bias_b
    return y.astype(out_dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _power_norm_train(cfg, x, scale_b, bias_b, rstd, grad_stat, weight):
    """``x / psi_{t-1} * gamma + beta`` with Algorithm 1's approximate backward pass.

    ``rstd = 1/sqrt(psi_{t-1}^2 + eps)``, ``grad_stat = nu_{t-1}`` and ``weight`` (1 for
    elements in the statistics, 0 for masked ones) broadcast to ``x``. The cotangent
    returned for ``grad_stat`` is the increment ``nu_t - nu_{t-1}``.
    """
    del grad_stat, weight
    return _power_norm_forward(x, scale_b, bias_b, rstd, cfg.out_dtype)


def _power_norm_train_fwd(cfg, x, scale_b, bias_b, rstd, grad_stat, weight):
    y = _power_norm_forward(x, scale_b, bias_b, rstd, cfg.out_dtype)
    return y, (x, scale_b, bias_b, rstd, grad_stat, weight)


def _power_norm_train_bwd(cfg, res, dy):
    x, scale_b, bias_b, rstd, nu, weight = res
    axes = cfg.reduce_axes
    dy = dy.astype(rstd.dtype)
    x_hat = x.astype(rstd.dtype) * rstd
    g = dy if scale_b is None else dy * scale_b  # dL/dx_hat
    w = jnp.broadcast_to(weight, x.shape)
    valid = w > 0
    # Selections, not products with w: masked-out padding may hold NaN/Inf.
    x_hat = jnp.where(valid, x_hat, 0.0)
    n = jnp.sum(w, axis=axes, keepdims=True)
    s_gamma = jnp.sum(x_hat * x_hat, axis=axes, keepdims=True)
    s_lambda = jnp.sum(jnp.where(valid, g, 0.0) * x_hat, axis=axes, keepdims=True)
    if cfg.axis_name is not None:
        n, s_gamma, s_lambda = lax.psum(
            (n, s_gamma, s_lambda), cfg.axis_name, axis_index_groups=cfg.axis_index_groups
        )
    big_gamma = s_gamma / jnp.maximum(n, 1.0)  # mean of x_hat^2 over valid elements
    big_lambda = s_lambda / jnp.maximum(n, 1.0)  # mean of dL/dx_hat * x_hat
    increment = (1.0 - cfg.grad_momentum) * (big_lambda - nu * big_gamma)
    increment = jnp.where(n > 0, increment, 0.0).astype(nu.dtype)
    x_tilde = g - nu * x_hat  # the intermediate estimated gradient (x_hat is 0 off-mask)
    dx = (x_tilde * rstd).astype(x.dtype)
    dscale = dbias = None
    dy_valid = jnp.where(valid, dy, 0.0)
    if scale_b is not None:
        dscale = jnp.sum(dy_valid * x_hat, axis=axes, keepdims=True).astype(scale_b.dtype)
    if bias_b is not None:
        dbias = jnp.sum(dy_valid, axis=axes, keepdims=True).astype(bias_b.dtype)
    return dx, dscale, dbias, jnp.zeros_like(rstd), increment, jnp.zeros_like(weight)


_power_norm_train.defvjp(_power_norm_train_fwd, _power_norm_train_bwd)


def power_norm(
    x: jax.Array,
    stats: PowerNormStats,
    scale: jax.Array | None = None,
    bias: jax.Array | None = None,
    *,
    training: bool,
    axis: Axes = -1,
    momentum: float = 0.9,
    grad_momentum: float | None = None,
    epsilon: float = 1e-5,
    axis_name: AxisName | None = None,
    axis_index_groups: Sequence[Sequence[int]] | None = None,
    mask: jax.Array | None = None,
    dtype: Any = None,
) -> tuple[jax.Array, PowerNormStats]:
    """Power normalization: divide by the *running* quadratic mean, no centering.

    Algorithm 1 of Shen et al. (2020), per feature, with ``alpha = momentum``,
    ``psi_{t-1}^2 = stats.mean_square`` and ``nu_{t-1} = stats.grad_stat``:

    .. math::

        \\text{forward:}\\quad
        \\hat x = \\frac{x}{\\sqrt{\\psi_{t-1}^2 + \\epsilon}},\\quad
        y = \\gamma \\hat x + \\beta,\\quad
        \\psi_B^2 = \\tfrac{1}{B}\\textstyle\\sum_i x_i^2,\\quad
        \\psi_t^2 = \\alpha\\,\\psi_{t-1}^2 + (1 - \\alpha)\\,\\psi_B^2

    .. math::

        \\text{backward:}\\quad
        \\tilde x' = \\frac{\\partial L}{\\partial \\hat x} - \\nu_{t-1}\\hat x,\\quad
        \\frac{\\partial L}{\\partial x} = \\frac{\\tilde x'}{\\sqrt{\\psi_{t-1}^2 +
        \\epsilon}},\\quad
        \\nu_t = \\nu_{t-1}\\big(1 - (1 - \\alpha)\\Gamma\\big) + (1 - \\alpha)\\Lambda

    with ``Gamma = mean(x_hat**2)`` and ``Lambda = mean(dL/dx_hat * x_hat)`` over the
    batch (the means run over every axis but ``axis``, over the valid elements of
    ``mask``, and over the devices of ``axis_name``). The forward pass uses only the
    running statistic, so the exact gradient would be ``dL/dx_hat / psi_{t-1}``; the
    term ``-nu * x_hat`` approximates the effect of the batch on the statistic, as the
    paper's backward pass does. Gradients of ``gamma``/``beta`` are the exact ones.
    In evaluation, ``y = gamma * x / sqrt(psi_t^2 + eps) + beta`` (plain autodiff).

    **Where nu_t comes from.** ``nu_t`` needs the incoming gradient, which exists
    only in the backward pass, so it is returned *as the gradient of the loss with
    respect to* ``stats.grad_stat``: that cotangent is the increment
    ``nu_t - nu_{t-1}``. Differentiate with respect to the stats as well and add it
    with :func:`update_power_norm_grad_stat`; ``count`` is an integer, hence
    ``allow_int=True``::

        def loss_fn(params, stats, x):
            y, new_stats = power_norm(x, stats, params["scale"], params["bias"],
                                      training=True)
            return jnp.mean((y - target) ** 2), new_stats

        grads, new_stats = jax.grad(loss_fn, argnums=(0, 1), has_aux=True,
                                    allow_int=True)(params, stats, x)
        params_grad, stats_grad = grads
        stats = update_power_norm_grad_stat(new_stats, stats_grad)

    A loss that is not differentiated with respect to the stats leaves ``nu`` at its
    value (0 from :func:`init_power_norm_stats`), which reduces the backward pass to
    ``dL/dx_hat / psi``. The increment scales with the loss (it is linear in the
    incoming gradient), and under ``axis_name`` it is the same on every device:
    average it across devices, do not sum it.

    Conventions and deviations. ``momentum`` weights the old value (the paper's
    ``alpha``; the authors' code defaults to 0.9 for both passes, as here).
    ``grad_momentum`` (default ``momentum``) is the ``alpha`` of the backward update.
    ``epsilon`` is added to ``psi^2`` (the paper writes ``x / psi``; the code adds it).
    Masked-out elements are normalized and receive ``dL/dx_hat / psi`` without the
    ``-nu x_hat`` term, since they do not enter the statistics. The authors' released
    code differs from Algorithm 1 in ways not followed here: it first rescales each
    token by its own root mean square (``GroupScaling1D``), normalizes by the *batch*
    statistics during a warm-up, divides the backward by the batch ``psi_B`` and
    averages the backward statistics over padding too.

    Args:
      x: floating input, e.g. ``(B, T, C)`` with ``axis=-1``.
      stats: from :func:`init_power_norm_stats` with the feature shape.
      scale: optional ``gamma`` of the feature shape.
      bias: optional ``beta`` of the feature shape.
      training: required. ``True``: normalize by ``psi_{t-1}``, update ``psi^2`` and
        ``count``, approximate backward; ``False``: normalize by ``psi_t``, nothing
        updated.
      axis: the feature axis or axes (kept); all others are reduced.
      momentum: ``alpha`` of the ``psi^2`` update, in [0, 1].
      grad_momentum: ``alpha`` of the ``nu`` update, in [0, 1]; ``None``: ``momentum``.
      epsilon: added to ``psi^2``, >= 0.
      axis_name: named axis across which the batch is split; ``psi_B^2``, ``Gamma`` and
        ``Lambda`` are global means across it.
      axis_index_groups: device groups for the cross-device reduction.
      mask: optional boolean array broadcastable to ``x`` (e.g. ``~padding[..., None]``);
        ``False`` elements do not enter ``psi_B^2``, ``Gamma`` or ``Lambda``.
      dtype: output dtype; ``None`` keeps ``x.dtype``.

    Returns:
      ``(y, new_stats)``: in training ``new_stats`` carries ``psi_t^2`` and the next
      ``count`` and the *old* ``grad_stat`` (see above); ``stats`` itself in evaluation.
      A feature with no valid element keeps its ``mean_square``; a batch with none at
      all leaves ``count`` unchanged.

    Raises:
      TypeError: ``x`` not floating, ``training`` not a bool, ``stats`` not a
        :class:`PowerNormStats`, ``mask`` not boolean.
      ValueError: bad axes, shapes that do not fit, ``epsilon < 0``, a momentum outside
        [0, 1].

    Example:
      >>> import jax.numpy as jnp
      >>> from jaxnorm.variants import init_power_norm_stats, power_norm
      >>> x = jnp.array([[1.0], [3.0]])
      >>> y, s = power_norm(x, init_power_norm_stats(1), training=True, epsilon=0.0)
      >>> y[:, 0].tolist(), s.mean_square.tolist()  # y = x / 1; psi^2 = 0.9 + 0.1 * 5
      ([1.0, 3.0], [1.399999976158142])

    References:
      Shen, Yao, Gholami, Mahoney & Keutzer (2020), "PowerNorm: Rethinking Batch
      Normalization in Transformers", Algorithm 1; code: github.com/sIncerass/powernorm.
    """
    fn = "power_norm"
    _checks.check_training_flag(fn, training)
    lay = _layout(fn, x, scale, bias, axis=axis, epsilon=epsilon, mask=mask, dtype=dtype)
    _check_power_norm_stats(fn, stats, lay.feature_shape, lay.desc)
    _checks.check_momentum(fn, momentum, allow_none=False)
    if grad_momentum is None:
        grad_momentum = momentum
    _checks.check_momentum(fn, grad_momentum, allow_none=False)
    if isinstance(grad_momentum, jax.core.Tracer):
        raise TypeError(
            f"{fn}: grad_momentum must be a Python number (the backward pass is built at "
            f"trace time); got a traced value. Pass e.g. grad_momentum=0.9."
        )
    sd = stat_dtype(x.dtype)
    scale_b = _feature(scale, lay.bshape, sd)
    bias_b = _feature(bias, lay.bshape, sd)
    rstd = lax.rsqrt(lax.stop_gradient(_feature(stats.mean_square, lay.bshape, sd)) + epsilon)

    if not training:
        y = mask_safe(
            lambda x, s, b, r: _power_norm_forward(x, s, b, r, lay.out_dtype),
            x,
            mask,
            scale_b,
            bias_b,
            rstd,
        )
        return y, stats

    groups = None
    if axis_index_groups is not None:
        groups = tuple(tuple(int(i) for i in g) for g in axis_index_groups)
    cfg = _PowerNormConfig(lay.reduce_axes, float(grad_momentum), axis_name, groups, lay.out_dtype)
    weight = jnp.ones((1,) * x.ndim, sd) if mask is None else jnp.asarray(mask, sd)
    nu = _feature(stats.grad_stat, lay.bshape, sd)
    try:
        y = _power_norm_train(cfg, x, scale_b, bias_b, rstd, nu, weight)
    except TypeError as err:
        if "forward-mode" not in str(err):
            raise
        raise TypeError(
            f"{fn}: training mode has no forward-mode derivative (jax.jvp, jax.jacfwd, "
            f"jax.linearize of a forward-mode program): its backward pass is the paper's "
            f"approximate gradient, defined only in reverse mode (a custom_vjp). Use "
            f"reverse mode (jax.grad, jax.vjp, jax.jacrev), or training=False, whose "
            f"forward-mode derivative is exact."
        ) from None

    count, psi_b2 = mean_square(
        x, lay.reduce_axes, mask=mask, axis_name=axis_name, axis_index_groups=axis_index_groups
    )
    count = jnp.reshape(count, lay.feature_shape)
    psi_b2 = jnp.reshape(lax.stop_gradient(psi_b2), lay.feature_shape)
    old = stats.mean_square.astype(sd)
    new = momentum * old + (1.0 - momentum) * psi_b2
    new = jnp.where(count > 0, new, old)
    stepped = jnp.any(count > 0).astype(stats.count.dtype)
    new_stats = PowerNormStats(
        mean_square=lax.stop_gradient(new.astype(stats.mean_square.dtype)),
        grad_stat=lax.stop_gradient(stats.grad_stat),
        count=stats.count + stepped,
    )
    return y, new_stats


def update_power_norm_grad_stat(stats: PowerNormStats, stats_grad: Any) -> PowerNormStats:
    """Fold the backward pass's gradient statistic into PowerNorm's state.

    .. math::

        \\nu_t = \\nu_{t-1} + \\frac{\\partial L}{\\partial\\,\\texttt{stats.grad\\_stat}}

    where the gradient, by :func:`power_norm`'s definition, is the increment
    ``(1 - alpha) * (Lambda - nu_{t-1} * Gamma)`` of the paper's update.

    Args:
      stats: the state to update, usually the ``new_stats`` returned by the forward
        pass (its ``grad_stat`` is still ``nu_{t-1}``).
      stats_grad: the gradient of the loss with respect to the ``stats`` passed to
        :func:`power_norm` (a :class:`PowerNormStats` of cotangents, e.g. from
        ``jax.grad(..., allow_int=True)``), or just its ``grad_stat`` array.

    Returns:
      ``stats`` with ``grad_stat = nu_t``; the other fields unchanged.
    """
    increment = getattr(stats_grad, "grad_stat", stats_grad)
    new = stats.grad_stat + jnp.asarray(increment).astype(stats.grad_stat.dtype)
    return stats._replace(grad_stat=new)


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
    lay = _layout(fn, x, scale, bias, axis=axis, epsilon=epsilon, mask=mask, dtype=dtype)
    _checks.check_stats(fn, stats, lay.feature_shape, lay.desc)
    _checks.check_momentum(fn, momentum)
    sd = stat_dtype(x.dtype)
    scale_b = _feature(scale, lay.bshape, sd)
    bias_b = _feature(bias, lay.bshape, sd)
    run_mean = _feature(stats.mean, lay.bshape, sd)
    run_var = _feature(stats.var, lay.bshape, sd)

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
        mean = jnp.where(has_data, mean, lax.stop_gradient(run_mean))
        var = jnp.where(has_data, var, lax.stop_gradient(run_var))
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
        stats, flat, momentum=momentum, unbiased_running_var=unbiased_running_var
    )
    return y, new_stats


# ------------------------------------------------------------------- frozen BN


def frozen_batch_norm(
    x: jax.Array,
    stats: BatchStats,
    scale: jax.Array | None = None,
    bias: jax.Array | None = None,
    *,
    axis: Axes = -1,
    epsilon: float = 1e-5,
    mask: jax.Array | None = None,
    dtype: Any = None,
) -> tuple[jax.Array, BatchStats]:
    """Batch norm with frozen statistics: the running ones, in training as in evaluation.

    .. math::

        y = \\frac{x - \\mu}{\\sqrt{\\sigma^2 + \\epsilon}}\\,\\gamma + \\beta

    with ``mu``, ``sigma**2`` the running statistics, which are never updated: the
    usual way to fine-tune a batch-normalized network on small batches (detection and
    segmentation backbones, torchvision's ``FrozenBatchNorm2d``, ``.eval()`` on the BN
    layers in torch). Gradients flow to ``x``, ``scale`` and ``bias`` (and ``stats``,
    if differentiated), exactly as through ``batch_norm(..., training=False)``, which
    computes the numbers. There is no ``training`` flag because both modes are the
    same; the stats are returned so that it replaces :func:`jaxnorm.batch_norm` at a
    call site ``y, stats = ...`` unchanged.

    Args:
      x: floating input.
      stats: the frozen running statistics (a :class:`BatchStats`).
      scale: optional ``gamma`` of the feature shape (trainable).
      bias: optional ``beta`` of the feature shape (trainable).
      axis: the feature axis or axes (kept).
      epsilon: added to the variance, >= 0.
      mask: optional boolean array broadcastable to ``x``: ``False`` elements (padding,
        which may hold NaN) pass no gradient to ``scale``/``bias``, as in
        :func:`jaxnorm.batch_norm`.
      dtype: output dtype; ``None`` keeps ``x.dtype``.

    Returns:
      ``(y, stats)``, ``stats`` returned as is.

    Raises:
      TypeError, ValueError: as :func:`jaxnorm.batch_norm`.

    Example:
      >>> import jax.numpy as jnp, jaxnorm
      >>> from jaxnorm.variants import frozen_batch_norm
      >>> stats = jaxnorm.BatchStats(jnp.array([1.0]), jnp.array([4.0]), jnp.array(7))
      >>> y, same = frozen_batch_norm(jnp.array([[3.0], [5.0]]), stats, epsilon=0.0)
      >>> y[:, 0].tolist(), same is stats
      ([1.0, 2.0], True)
    """
    fn = "frozen_batch_norm"
    lay = _layout(fn, x, scale, bias, axis=axis, epsilon=epsilon, mask=mask, dtype=dtype)
    _checks.check_stats(fn, stats, lay.feature_shape, lay.desc)
    y, _ = batch_norm(
        x, stats, scale, bias, training=False, axis=axis, epsilon=epsilon, mask=mask, dtype=dtype
    )
    return y, stats
