"""Normalization functions: the only place in jaxnorm with normalization math.

Every function here is pure and jit-friendly. Statistics come from
:mod:`jaxnorm.stats` in ``promote(x.dtype, float32)``; the output has ``x``'s dtype
unless ``dtype`` says otherwise. All arguments are validated at trace time.

Axis conventions:

* ``batch_norm``: ``axis`` names the *feature* axes, which are kept; every other
  axis is reduced (flax's ``axis``; torch's channel axis 1 is ``axis=1``).
* ``layer_norm`` / ``rms_norm``: ``axis`` names the *reduced* axes (default the
  last); ``feature_axis`` names the axes that carry ``scale``/``bias`` (default
  the same). torch's ``normalized_shape`` of ``k`` dims is ``axis=(-k, ..., -1)``.
* ``group_norm`` / ``instance_norm``: ``axis`` names the channel axis (flax: -1,
  torch: 1); axis 0 is the batch axis.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from jaxnorm import _checks
from jaxnorm._checks import Axes
from jaxnorm.state import BatchStats, update_batch_stats
from jaxnorm.stats import AxisName, Moments, mean_square, moments, stat_dtype

__all__ = ["batch_norm", "layer_norm", "rms_norm", "group_norm", "instance_norm"]


def _out_dtype(fn: str, x: jax.Array, dtype: Any) -> jnp.dtype:
    if dtype is None:
        return jnp.result_type(x)
    out = jnp.dtype(dtype)
    if jnp.issubdtype(out, jnp.complexfloating) and jnp.iscomplexobj(x):
        return out
    if not jnp.issubdtype(out, jnp.floating):
        raise TypeError(
            f"{fn}: dtype must be floating (the output dtype; complex only for complex x); "
            f"got {out}. Pass e.g. dtype=jnp.float32, or dtype=None to keep x's dtype."
        )
    return out


def _broadcast_param(p: jax.Array | None, x_ndim: int, axes: tuple[int, ...], x_shape):
    if p is None:
        return None
    bshape = tuple(x_shape[a] if a in axes else 1 for a in range(x_ndim))
    return jnp.reshape(p, bshape)


def _normalize(
    x: jax.Array,
    mean: jax.Array | None,
    var: jax.Array,
    scale: jax.Array | None,
    bias: jax.Array | None,
    *,
    epsilon: float,
    out_dtype: jnp.dtype,
    mask: jax.Array | None = None,
) -> jax.Array:
    """``y = (x - mean) * rsqrt(var + epsilon) * scale + bias`` in >= f32, cast to out_dtype.

    ``mean``/``var``/``scale``/``bias`` are already broadcastable to ``x``;
    ``mean=None`` skips the centering (RMS normalization). With a ``mask``, see
    :func:`mask_safe`.
    """

    def affine(x, mean, var, scale, bias):
        sd = stat_dtype(x.dtype)
        real = _checks.real_dtype(sd)
        mul = lax.rsqrt(var.astype(real) + epsilon)  # the variance is real, also for complex x
        if scale is not None:
            mul = mul * scale.astype(jnp.promote_types(real, scale.dtype))
        y = x.astype(sd)
        if mean is not None:
            y = y - mean.astype(sd)
        y = y * mul
        if bias is not None:
            y = y + bias.astype(sd)
        return y.astype(out_dtype)

    return mask_safe(affine, x, mask, mean, var, scale, bias)


def mask_safe(apply: Any, x: jax.Array, mask: jax.Array | None, *params: Any) -> jax.Array:
    """``apply(x, *params)``, with masked-out elements unable to poison any gradient.

    Masked-out elements are still transformed (same values), but through a copy of
    ``apply`` whose ``params`` (statistics, scale, bias) are held constant, while the
    valid elements go through ``apply`` on an input whose masked-out entries are
    replaced by 0 (the "double where"). So padding that holds NaN or Inf yields NaN
    outputs only where it stands, and the gradients of valid elements, statistics and
    parameters stay finite. The price is a convention: masked-out outputs pass no
    gradient to the statistics or parameters (only to their own ``x``), which is exact
    whenever the loss ignores them, as it should ignore padding.

    Args:
      apply: ``apply(x, *params) -> y``, elementwise in ``x``.
      x: the input.
      mask: boolean, broadcastable to ``x``, or ``None`` (then just ``apply``).
      *params: arrays (or ``None``) broadcastable to ``x``.

    Returns:
      ``apply``'s output.
    """
    if mask is None:
        return apply(x, *params)
    m = jnp.broadcast_to(mask, x.shape)
    valid = apply(jnp.where(m, x, jnp.zeros_like(x)), *params)
    held = [None if p is None else lax.stop_gradient(p) for p in params]
    return jnp.where(m, valid, apply(x, *held))


def _can_fuse(x: jax.Array, mask: Any, axis_name: Any, epsilon: Any) -> bool:
    """The fused path covers the common case: real x, no mask, one device, static epsilon."""
    return (
        mask is None
        and axis_name is None
        and not jnp.iscomplexobj(x)
        and not isinstance(epsilon, jax.core.Tracer)
    )


def _reduced_mean(a: jax.Array, axes: tuple[int, ...], n: int) -> jax.Array:
    return jnp.sum(a, axis=axes, keepdims=True) / n


@functools.partial(jax.custom_jvp, nondiff_argnums=(3, 4, 5, 6))
def _fused_standardize(
    x: jax.Array,
    scale: jax.Array | None,
    bias: jax.Array | None,
    reduce_axes: tuple[int, ...],
    feature_axes: tuple[int, ...],
    epsilon: float,
    center: bool,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Unmasked, single-device normalization with a closed-form derivative.

    Returns ``(y, mean, var)`` in the statistics dtype: ``y`` not yet cast,
    ``mean``/``var`` with the reduced axes kept (for RMS, ``mean`` is 0 and ``var`` is
    the mean square). Same numbers as :func:`_normalize` over :func:`moments`; only
    the derivative rule differs (see :func:`_fused_standardize_jvp`).
    """
    (y, mean, var), _ = _fused_primal(x, scale, bias, reduce_axes, feature_axes, epsilon, center)
    return y, mean, var


def _fused_primal(x, scale, bias, reduce_axes, feature_axes, epsilon, center):
    """Statistics and output; returns ``((y, mean, var), (xs, mean, rstd, scale_b))``."""
    sd = stat_dtype(x.dtype)
    xs = x.astype(sd)
    if center:
        m = moments(x, reduce_axes)
        mean, var = m.mean, m.var
    else:
        _, var = mean_square(x, reduce_axes)
        mean = jnp.zeros_like(var)
    rstd = lax.rsqrt(var + epsilon)
    scale_b = _broadcast_param(scale, x.ndim, feature_axes, x.shape)
    bias_b = _broadcast_param(bias, x.ndim, feature_axes, x.shape)
    y = _normalize(x, mean if center else None, var, scale_b, bias_b, epsilon=epsilon, out_dtype=sd)
    return (y, mean, var), (xs, mean, rstd, scale_b)


@_fused_standardize.defjvp
def _fused_standardize_jvp(reduce_axes, feature_axes, epsilon, center, primals, tangents):
    r"""The closed-form linearization of normalization; its transpose is the fast backward.

    With ``r = (var + eps)**-1/2``, group means ``m1 = mean(dx)`` and
    ``m2 = mean((x - mu) * dx)`` over the reduced axes:

    .. math::

        \dot y = \gamma\,[\,r\,\dot x + (x - \mu)\,P + Q\,] + (x - \mu)\,r\,\dot\gamma
        + \dot\beta,\quad P = -r^3 m_2,\quad Q = -r\,m_1,
        \quad \dot\mu = m_1,\quad \dot{var} = 2\,m_2

    (RMS: ``mu = 0`` and ``Q = 0``.) Everything full-size is written in terms of the
    input ``x`` and small per-group or per-feature arrays, never a saved ``x_hat``: so the
    reverse pass that JAX derives by transposing this needs only reductions of ``dy`` and
    ``(x - mu) * dy`` and one elementwise pass for ``dx``, which XLA fuses without
    materializing intermediates (autodiff through the statistics writes several).
    """
    x, scale, bias = primals
    dx, dscale, dbias = tangents
    (y, mean, var), (xs, mean, rstd, scale_b) = _fused_primal(
        x, scale, bias, reduce_axes, feature_axes, epsilon, center
    )
    sd = y.dtype
    n = 1
    for a in reduce_axes:
        n *= x.shape[a]
    dxs = dx.astype(sd)
    xc = xs - mean if center else xs
    m2 = jnp.sum(xc * dxs, axis=reduce_axes, keepdims=True) / n
    m1 = jnp.sum(dxs, axis=reduce_axes, keepdims=True) / n if center else jnp.zeros_like(mean)
    p_coef = -(rstd**3) * m2  # coefficient of (x - mu), per group
    q_coef = -rstd * m1  # constant term, per group
    s_b = None if scale_b is None else scale_b.astype(sd)
    ds_b = None if scale is None else _broadcast_param(dscale, x.ndim, feature_axes, x.shape)
    db_b = None if bias is None else _broadcast_param(dbias, x.ndim, feature_axes, x.shape)
    if set(feature_axes).isdisjoint(reduce_axes):
        # Batch norm: features are the groups, so gamma, P, Q and d_gamma are all
        # per-group and the whole tangent is a*dx + (x - mu)*b + c with small a, b, c;
        # its transpose needs just sum(dy) and sum((x - mu) * dy).
        a = rstd if s_b is None else s_b * rstd
        b = p_coef if s_b is None else s_b * p_coef
        c = q_coef if s_b is None else s_b * q_coef
        if ds_b is not None:
            b = b + rstd * ds_b.astype(sd)
        if db_b is not None:
            c = c + db_b.astype(sd)
        dy = a * dxs + xc * b + c
    else:
        inner = rstd * dxs + xc * p_coef + q_coef
        dy = inner if s_b is None else s_b * inner
        if ds_b is not None:
            dy = dy + xc * (rstd * ds_b.astype(sd))
        if db_b is not None:
            dy = dy + db_b.astype(sd)
    return (y, mean, var), (dy, m1, 2.0 * m2)


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
            mean = jnp.where(has_data, mean, lax.stop_gradient(running_mean))
            var = jnp.where(has_data, var, lax.stop_gradient(running_var))
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


def _pass_through_empty(count, mean, var):
    """A group with no valid element (all masked out) gets mean 0 and variance 1.

    Its elements then pass through as ``x * scale + bias`` (up to ``1/sqrt(1 + eps)``)
    instead of being blown up by ``1/sqrt(epsilon)``.
    """
    empty = count == 0
    mean = None if mean is None else jnp.where(empty, 0.0, mean)
    return mean, jnp.where(empty, 1.0, var)


def _standardize(
    fn: str,
    x: jax.Array,
    scale: jax.Array | None,
    bias: jax.Array | None,
    *,
    reduce_axes: tuple[int, ...],
    feature_axes: tuple[int, ...],
    epsilon: float,
    mask: jax.Array | None,
    dtype: Any,
    axis_name: AxisName | None,
    axis_index_groups: Sequence[Sequence[int]] | None,
    center: bool,
    desc: str,
) -> jax.Array:
    """Shared body of the per-sample normalizations (layer, RMS, instance)."""
    _checks.check_nonempty(fn, x, reduce_axes)
    feature_shape = tuple(x.shape[a] for a in feature_axes)
    _checks.check_param_shape(fn, "scale", scale, feature_shape, desc, complex_ok=True)
    _checks.check_param_shape(fn, "bias", bias, feature_shape, desc, complex_ok=True)
    _checks.check_epsilon(fn, epsilon)
    _checks.check_mask(fn, mask, x.shape)
    out_dtype = _out_dtype(fn, x, dtype)
    if _can_fuse(x, mask, axis_name, epsilon):
        y, _, _ = _fused_standardize(
            x, scale, bias, reduce_axes, feature_axes, float(epsilon), center
        )
        return y.astype(out_dtype)
    scale_b = _broadcast_param(scale, x.ndim, feature_axes, x.shape)
    bias_b = _broadcast_param(bias, x.ndim, feature_axes, x.shape)
    if center:
        m = moments(
            x, reduce_axes, mask=mask, axis_name=axis_name, axis_index_groups=axis_index_groups
        )
        count, mean, var = m.count, m.mean, m.var
    else:
        count, var = mean_square(
            x, reduce_axes, mask=mask, axis_name=axis_name, axis_index_groups=axis_index_groups
        )
        mean = None
    mean, var = _pass_through_empty(count, mean, var)
    return _normalize(
        x, mean, var, scale_b, bias_b, epsilon=epsilon, out_dtype=out_dtype, mask=mask
    )


def layer_norm(
    x: jax.Array,
    scale: jax.Array | None = None,
    bias: jax.Array | None = None,
    *,
    axis: Axes = -1,
    feature_axis: Axes | None = None,
    epsilon: float = 1e-6,
    mask: jax.Array | None = None,
    dtype: Any = None,
    axis_name: AxisName | None = None,
    axis_index_groups: Sequence[Sequence[int]] | None = None,
) -> jax.Array:
    """Layer normalization: standardize each sample over ``axis``.

    .. math::

        y = \\frac{x - \\mathrm{E}_{axis}[x]}{\\sqrt{\\mathrm{Var}_{axis}[x] + \\epsilon}}
            \\,\\gamma + \\beta

    with the biased variance, computed in >= float32 by a method that stays exact
    for large means (see :mod:`jaxnorm.stats`).

    torch's ``nn.LayerNorm(normalized_shape)`` with ``k`` dims is
    ``axis=tuple(range(-k, 0))`` (torch's default ``eps`` is 1e-5, flax's 1e-6).

    Args:
      x: floating input.
      scale: optional ``gamma`` with the shape of ``x`` at ``feature_axis``.
      bias: optional ``beta`` with the same shape.
      axis: the reduced axis or axes (default the last).
      feature_axis: axes carrying ``scale``/``bias``; default ``axis``.
      epsilon: added to the variance, >= 0.
      mask: optional boolean array broadcastable to ``x``; ``False`` elements do not
        enter the statistics and may hold anything, NaN included (they are still
        normalized, but pass no gradient to the statistics or parameters; see
        :func:`mask_safe`). A group with no valid element passes through with mean 0
        and variance 1.
      dtype: output dtype; ``None`` keeps ``x.dtype``.
      axis_name: optional named axis to also reduce across (rarely needed).
      axis_index_groups: device groups for ``axis_name``.

    Returns:
      An array of ``x``'s shape.

    Raises:
      TypeError, ValueError: as :func:`batch_norm`, for the arguments it shares.

    Example:
      >>> import jax.numpy as jnp, jaxnorm
      >>> y = jaxnorm.layer_norm(jnp.array([[1.0, 2.0, 3.0]]))
      >>> [round(float(v), 4) for v in y[0]]
      [-1.2247, 0.0, 1.2247]

    References:
      Ba, Kiros & Hinton (2016), "Layer Normalization".
    """
    fn = "layer_norm"
    _checks.check_floating(fn, x, complex_ok=True)
    reduce_axes = _checks.canonical_axes(fn, "axis", axis, jnp.ndim(x))
    feature_axes = (
        reduce_axes
        if feature_axis is None
        else _checks.canonical_axes(fn, "feature_axis", feature_axis, x.ndim)
    )
    return _standardize(
        fn,
        x,
        scale,
        bias,
        reduce_axes=reduce_axes,
        feature_axes=feature_axes,
        epsilon=epsilon,
        mask=mask,
        dtype=dtype,
        axis_name=axis_name,
        axis_index_groups=axis_index_groups,
        center=True,
        desc=f"the feature axes {feature_axes} of x {tuple(x.shape)}",
    )


def rms_norm(
    x: jax.Array,
    scale: jax.Array | None = None,
    *,
    axis: Axes = -1,
    feature_axis: Axes | None = None,
    epsilon: float = 1e-6,
    mask: jax.Array | None = None,
    dtype: Any = None,
    axis_name: AxisName | None = None,
    axis_index_groups: Sequence[Sequence[int]] | None = None,
) -> jax.Array:
    """Root-mean-square normalization: rescale each sample, without centering.

    .. math::

        y = \\frac{x}{\\sqrt{\\mathrm{E}_{axis}[x^2] + \\epsilon}}\\,\\gamma

    torch's ``nn.RMSNorm`` defaults ``eps`` to ``finfo(float32).eps`` (float64's for
    float64 layers; half-precision layers compute in float32); flax uses 1e-6.

    Args:
      x: floating input.
      scale: optional ``gamma`` with the shape of ``x`` at ``feature_axis``.
      axis: the reduced axis or axes (default the last).
      feature_axis: axes carrying ``scale``; default ``axis``.
      epsilon: added to the mean square, >= 0.
      mask: optional boolean array broadcastable to ``x``.
      dtype: output dtype; ``None`` keeps ``x.dtype``.
      axis_name: optional named axis to also reduce across.
      axis_index_groups: device groups for ``axis_name``.

    Returns:
      An array of ``x``'s shape.

    Example:
      >>> import jax.numpy as jnp, jaxnorm
      >>> y = jaxnorm.rms_norm(jnp.array([[3.0, 4.0]]), epsilon=0.0)
      >>> [round(float(v), 4) for v in y[0]]
      [0.8485, 1.1314]

    References:
      Zhang & Sennrich (2019), "Root Mean Square Layer Normalization".
    """
    fn = "rms_norm"
    _checks.check_floating(fn, x, complex_ok=True)
    reduce_axes = _checks.canonical_axes(fn, "axis", axis, jnp.ndim(x))
    feature_axes = (
        reduce_axes
        if feature_axis is None
        else _checks.canonical_axes(fn, "feature_axis", feature_axis, x.ndim)
    )
    return _standardize(
        fn,
        x,
        scale,
        None,
        reduce_axes=reduce_axes,
        feature_axes=feature_axes,
        epsilon=epsilon,
        mask=mask,
        dtype=dtype,
        axis_name=axis_name,
        axis_index_groups=axis_index_groups,
        center=False,
        desc=f"the feature axes {feature_axes} of x {tuple(x.shape)}",
    )


def instance_norm(
    x: jax.Array,
    scale: jax.Array | None = None,
    bias: jax.Array | None = None,
    *,
    axis: Axes = -1,
    epsilon: float = 1e-6,
    mask: jax.Array | None = None,
    dtype: Any = None,
    axis_name: AxisName | None = None,
    axis_index_groups: Sequence[Sequence[int]] | None = None,
) -> jax.Array:
    """Instance normalization: standardize each (sample, channel) over the other axes.

    .. math::

        y_{n,\\dots,c} = \\frac{x_{n,\\dots,c} - \\mu_{n,c}}{\\sqrt{\\sigma^2_{n,c} +
        \\epsilon}}\\,\\gamma_c + \\beta_c

    with ``mu``/``sigma**2`` over every axis except the batch axis 0 and the channel
    ``axis``. torch's ``nn.InstanceNorm2d`` (channels at axis 1, ``eps=1e-5``,
    ``affine=False``) is ``instance_norm(x, axis=1, epsilon=1e-5)``.

    Args:
      x: floating input of rank >= 3, batch first.
      scale: optional per-channel ``gamma`` with the shape of ``x`` at ``axis``.
      bias: optional per-channel ``beta``, same shape.
      axis: the channel axis or axes (flax: -1, torch: 1); kept, like axis 0.
      epsilon: added to the variance, >= 0.
      mask: optional boolean array broadcastable to ``x``.
      dtype: output dtype; ``None`` keeps ``x.dtype``.
      axis_name: optional named axis to also reduce across (e.g. spatially sharded x).
      axis_index_groups: device groups for ``axis_name``.

    Returns:
      An array of ``x``'s shape.

    References:
      Ulyanov, Vedaldi & Lempitsky (2016), "Instance Normalization: The Missing
      Ingredient for Fast Stylization".
    """
    fn = "instance_norm"
    _checks.check_floating(fn, x, complex_ok=True)
    channels = _checks.canonical_axes(fn, "axis", axis, jnp.ndim(x))
    reduce_axes = tuple(a for a in range(1, x.ndim) if a not in channels)
    if 0 in channels or not reduce_axes:
        raise ValueError(
            f"{fn}: x must have rank >= 3 (a batch axis 0, a channel axis and at least one "
            f"other axis to reduce); got shape {tuple(x.shape)} with channel axis={axis!r}. "
            f"For (N, C) input use layer_norm or batch_norm instead."
        )
    return _standardize(
        fn,
        x,
        scale,
        bias,
        reduce_axes=reduce_axes,
        feature_axes=channels,
        epsilon=epsilon,
        mask=mask,
        dtype=dtype,
        axis_name=axis_name,
        axis_index_groups=axis_index_groups,
        center=True,
        desc=f"the channel axes axis={axis!r} of x {tuple(x.shape)}",
    )


def group_norm(
    x: jax.Array,
    scale: jax.Array | None = None,
    bias: jax.Array | None = None,
    *,
    num_groups: int | None = None,
    group_size: int | None = None,
    axis: int = -1,
    reduction_axes: Axes | None = None,
    epsilon: float = 1e-6,
    mask: jax.Array | None = None,
    dtype: Any = None,
    axis_name: AxisName | None = None,
    axis_index_groups: Sequence[Sequence[int]] | None = None,
) -> jax.Array:
    """Group normalization: split the channels into groups, standardize each group.

    .. math::

        y_{n,\\dots,c} = \\frac{x_{n,\\dots,c} - \\mu_{n,g(c)}}{\\sqrt{\\sigma^2_{n,g(c)}
        + \\epsilon}}\\,\\gamma_c + \\beta_c

    where group ``g(c) = c // group_size`` and the statistics run over the channels
    of the group and every axis of ``reduction_axes`` (default: all axes but the
    batch axis 0). ``num_groups=1`` is layer norm over all non-batch axes;
    ``group_size=1`` is instance norm. torch's ``nn.GroupNorm(G, C)`` on NCHW input is
    ``group_norm(x, num_groups=G, axis=1, epsilon=1e-5)``.

    Args:
      x: floating input, batch first.
      scale: optional per-channel ``gamma`` of shape ``(C,)``.
      bias: optional per-channel ``beta`` of shape ``(C,)``.
      num_groups: number of groups; give exactly one of this and ``group_size``.
      group_size: channels per group.
      axis: the channel axis (flax: -1, torch: 1).
      reduction_axes: axes reduced besides the within-group channels; must include
        the channel axis (as in flax). Default: every axis except 0.
      epsilon: added to the variance, >= 0.
      mask: optional boolean array broadcastable to ``x``.
      dtype: output dtype; ``None`` keeps ``x.dtype``.
      axis_name: optional named axis to also reduce across.
      axis_index_groups: device groups for ``axis_name``.

    Returns:
      An array of ``x``'s shape.

    Raises:
      ValueError: both or neither of ``num_groups``/``group_size``, a channel count
        they do not divide, or ``reduction_axes`` without the channel axis.

    References:
      Wu & He (2018), "Group Normalization".
    """
    fn = "group_norm"
    _checks.check_floating(fn, x, complex_ok=True)
    (channel,) = _checks.canonical_axes(fn, "axis", (axis,), jnp.ndim(x))
    num_channels = x.shape[channel]
    if (num_groups is None) == (group_size is None):
        raise ValueError(
            f"{fn}: give exactly one of num_groups and group_size; got num_groups="
            f"{num_groups!r}, group_size={group_size!r}. E.g. num_groups=32."
        )
    if num_groups is not None:
        if not isinstance(num_groups, int) or num_groups < 1 or num_channels % num_groups:
            raise ValueError(
                f"{fn}: num_groups must be a positive int dividing the {num_channels} "
                f"channels of x {tuple(x.shape)} (channel axis={axis!r}); got {num_groups!r}."
            )
        group_size = num_channels // num_groups
    else:
        if not isinstance(group_size, int) or group_size < 1 or num_channels % group_size:
            raise ValueError(
                f"{fn}: group_size must be a positive int dividing the {num_channels} "
                f"channels of x {tuple(x.shape)} (channel axis={axis!r}); got {group_size!r}."
            )
        num_groups = num_channels // group_size
    if reduction_axes is None:
        if x.ndim < 2 or channel == 0:
            raise ValueError(
                f"{fn}: x must be batch-first with the channel axis after axis 0; got shape "
                f"{tuple(x.shape)} with channel axis={axis!r}."
            )
        red = tuple(range(1, x.ndim))
    else:
        red = _checks.canonical_axes(fn, "reduction_axes", reduction_axes, x.ndim)
        if channel not in red:
            raise ValueError(
                f"{fn}: reduction_axes={reduction_axes!r} must include the channel axis "
                f"{channel} (the groups split it); add it."
            )
    desc = f"the {num_channels} channels of x {tuple(x.shape)}"
    _checks.check_nonempty(fn, x, red)
    _checks.check_param_shape(fn, "scale", scale, (num_channels,), desc, complex_ok=True)
    _checks.check_param_shape(fn, "bias", bias, (num_channels,), desc, complex_ok=True)
    _checks.check_epsilon(fn, epsilon)
    _checks.check_mask(fn, mask, x.shape)
    out_dtype = _out_dtype(fn, x, dtype)

    # Split the channel axis into (group, within-group) and reduce within groups.
    gshape = x.shape[:channel] + (num_groups, group_size) + x.shape[channel + 1 :]
    x_g = jnp.reshape(x, gshape)
    mask_g = None if mask is None else jnp.reshape(jnp.broadcast_to(mask, x.shape), gshape)
    red_g = tuple(
        sorted([a if a < channel else a + 1 for a in red if a != channel] + [channel + 1])
    )
    m = moments(x_g, red_g, mask=mask_g, axis_name=axis_name, axis_index_groups=axis_index_groups)

    # Expand the per-group statistics to per-channel ones, broadcastable to x.
    def per_channel(s: jax.Array) -> jax.Array:
        s = jnp.broadcast_to(s, s.shape[: channel + 1] + (group_size,) + s.shape[channel + 2 :])
        return jnp.reshape(s, s.shape[:channel] + (num_channels,) + s.shape[channel + 2 :])

    scale_b = _broadcast_param(scale, x.ndim, (channel,), x.shape)
    bias_b = _broadcast_param(bias, x.ndim, (channel,), x.shape)
    mean, var = _pass_through_empty(m.count, m.mean, m.var)
    return _normalize(
        x,
        per_channel(mean),
        per_channel(var),
        scale_b,
        bias_b,
        epsilon=epsilon,
        out_dtype=out_dtype,
        mask=mask,
    )
