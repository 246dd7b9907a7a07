"""PowerNorm (Shen et al., 2020): divide by a running quadratic mean; approximate backward."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from jaxnorm import _checks, _sharding
from jaxnorm._checks import Axes
from jaxnorm.functional import mask_safe
from jaxnorm.stats import AxisName, mean_square, stat_dtype
from jaxnorm.variants._common import (
    _feature,
    _layout,
)

# -------------------------------------------------------------------- power norm


class PowerNormStats(NamedTuple):
    """Running statistics of :func:`power_norm` (a pytree).

    ``feature_shape`` is the shape of the kept (feature) axes, e.g. ``(C,)``.

    Attributes:
      mean_square: ``feature_shape``, float32: the running quadratic mean ``psi**2``
        (initially 1).
      grad_stat: ``feature_shape``, float32: the running backward statistic ``nu``
        (initially 0).
      count: ``()``, int32: training steps that updated ``mean_square``.
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
    x_hat = _sharding.where(valid, x_hat, 0.0)
    n = jnp.sum(w, axis=axes, keepdims=True)
    s_gamma = jnp.sum(x_hat * x_hat, axis=axes, keepdims=True)
    s_lambda = jnp.sum(_sharding.where(valid, g, 0.0) * x_hat, axis=axes, keepdims=True)
    if cfg.axis_name is not None:
        n, s_gamma, s_lambda = lax.psum(
            (n, s_gamma, s_lambda), cfg.axis_name, axis_index_groups=cfg.axis_index_groups
        )
    big_gamma = s_gamma / jnp.maximum(n, 1.0)  # mean of x_hat^2 over valid elements
    big_lambda = s_lambda / jnp.maximum(n, 1.0)  # mean of dL/dx_hat * x_hat
    increment = (1.0 - cfg.grad_momentum) * (big_lambda - nu * big_gamma)
    increment = _sharding.where(n > 0, increment, 0.0).astype(nu.dtype)
    x_tilde = g - nu * x_hat  # the intermediate estimated gradient (x_hat is 0 off-mask)
    dx = (x_tilde * rstd).astype(x.dtype)
    dscale = dbias = None
    dy_valid = _sharding.where(valid, dy, 0.0)
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
    new = _sharding.where(count > 0, new, old)
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
