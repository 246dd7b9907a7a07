"""The normalization map shared by every norm: affine, masks, the fused derivative."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from jaxnorm import _checks, _sharding
from jaxnorm.stats import AxisName, mean_square, moments, stat_dtype


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
    valid = apply(_sharding.where(m, x, jnp.zeros_like(x)), *params)
    held = [None if p is None else lax.stop_gradient(p) for p in params]
    return _sharding.where(m, valid, apply(x, *held))


def _can_fuse(x: jax.Array, mask: Any, axis_name: Any, epsilon: Any) -> bool:
    """The fused path covers the common case: real x, no mask, one device, static epsilon."""
    return (
        mask is None
        and axis_name is None
        and not jnp.iscomplexobj(x)
        and not isinstance(epsilon, jax.core.Tracer)
    )


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


def _pass_through_empty(count, mean, var):
    """A group with no valid element (all masked out) gets mean 0 and variance 1.

    Its elements then pass through as ``x * scale + bias`` (up to ``1/sqrt(1 + eps)``)
    instead of being blown up by ``1/sqrt(epsilon)``.
    """
    empty = count == 0
    mean = None if mean is None else _sharding.where(empty, 0.0, mean)
    return mean, _sharding.where(empty, 1.0, var)


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
