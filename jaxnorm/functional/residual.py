"""Fused residual add + normalization, the pre-norm transformer's ``h = x + r; norm(h)``.

One op returns both the normalized output and the new residual stream; its
``custom_vjp`` saves only the new residual (which the next block holds anyway), the
per-row float32 statistics and the parameters, never the normalized output, and takes
cotangents for both outputs.
"""

from __future__ import annotations

import functools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from jaxnorm import _checks
from jaxnorm._checks import Axes
from jaxnorm.functional._core import _broadcast_param, _out_dtype
from jaxnorm.functional.per_sample import (
    CastOrder,
    check_cast_order,
    check_scale_offset,
    offset_scale,
)
from jaxnorm.stats import mean_square, moments


class _Config(NamedTuple):
    """The static settings of one fused call (hashable: a ``nondiff_argnums`` entry)."""

    reduce_axes: tuple[int, ...]  # the axes the statistics run over
    feature_axes: tuple[int, ...]  # the axes that carry scale/bias
    epsilon: float
    scale_offset: float
    center: bool  # layer norm (True) or RMS norm (False)
    cast_then_scale: bool  # Llama's order: x_hat rounded to out_dtype before the scale
    residual_dtype: jnp.dtype  # dtype of the new residual h = x + residual
    out_dtype: jnp.dtype  # dtype of y
    x_dtype: jnp.dtype  # dtype of x, for dx
    residual_in_dtype: jnp.dtype | None  # dtype of the residual passed in (None: absent)


def add_rms_norm(
    x: jax.Array,
    residual: jax.Array | None,
    scale: jax.Array | None = None,
    *,
    axis: Axes = -1,
    feature_axis: Axes | None = None,
    epsilon: float = 1e-6,
    residual_dtype: Any = None,
    dtype: Any = None,
    scale_offset: float = 0.0,
    cast_order: CastOrder = "scale_then_cast",
) -> tuple[jax.Array, jax.Array]:
    """Residual add and RMS normalization in one op: ``h = x + residual``, ``y = rms(h)``.

    .. math::

        h = x + r \\ \\text{(in residual\\_dtype)},\\qquad
        y = \\frac{h}{\\sqrt{\\mathrm{E}_{axis}[h^2] + \\epsilon}}\\,(o + \\gamma)

    The same numbers as ``h = (x + residual).astype(residual_dtype)`` followed by
    :func:`rms_norm` ``(h, scale, dtype=dtype or x.dtype, ...)`` (the sum is formed in
    the promoted dtype of ``x``, ``residual`` and ``residual_dtype``, and rounded once).
    The backward is closed-form and saves only ``h``, the per-row float32 ``rstd`` and
    ``scale``; it takes cotangents for both ``y`` and ``h`` and returns ``dx`` and
    ``dresidual`` in their own dtypes. Reverse mode only (``jax.grad``/``jax.vjp``);
    for forward-mode derivatives use the unfused ``x + residual`` and :func:`rms_norm`.

    Args:
      x: floating input of the block (e.g. the attention or MLP output).
      residual: the residual stream, of ``x``'s shape; ``None`` for the first block
        (then ``h`` is ``x`` in ``residual_dtype``).
      scale: optional ``gamma`` with the shape of ``x`` at ``feature_axis``.
      axis: the reduced axis or axes (default the last).
      feature_axis: axes carrying ``scale``; default ``axis``.
      epsilon: added to the mean square, >= 0; a Python number.
      residual_dtype: dtype of the new residual ``h``; ``None`` is the promoted dtype
        of ``x`` and ``residual``. ``jnp.float32`` for a bf16 model keeps the stream in
        float32 (flash-attn's ``residual_in_fp32``).
      dtype: dtype of ``y``; ``None`` keeps ``x.dtype``.
      scale_offset: constant added to ``scale`` in float32 (``1.0``: Gemma's ``1 + w``).
      cast_order: ``"scale_then_cast"`` or ``"cast_then_scale"`` (Llama's), as in
        :func:`rms_norm`.

    Returns:
      ``(y, h)``: the normalized output and the new residual stream.

    Raises:
      TypeError, ValueError: a non-floating or complex ``x``/``residual``, shapes that
        differ, a traced ``epsilon``, and the refusals of :func:`rms_norm`.

    Example:
      >>> import jax.numpy as jnp, jaxnorm
      >>> y, h = jaxnorm.add_rms_norm(jnp.array([[1.0, 2.0]]), jnp.array([[2.0, 2.0]]),
      ...                             epsilon=0.0)
      >>> h.tolist(), [round(float(v), 4) for v in y[0]]
      ([[3.0, 4.0]], [0.8485, 1.1314])

    References:
      Zhang & Sennrich (2019), "Root Mean Square Layer Normalization"; the fused
      add + norm of flash-attn (``layer_norm_fn(..., residual, prenorm=True)``) and
      Apex/TransformerEngine.
    """
    fn = "add_rms_norm"
    check_cast_order(fn, cast_order)
    return _add_norm(
        fn,
        x,
        residual,
        scale,
        None,
        axis=axis,
        feature_axis=feature_axis,
        epsilon=epsilon,
        residual_dtype=residual_dtype,
        dtype=dtype,
        scale_offset=scale_offset,
        center=False,
        cast_then_scale=cast_order == "cast_then_scale",
    )


def add_layer_norm(
    x: jax.Array,
    residual: jax.Array | None,
    scale: jax.Array | None = None,
    bias: jax.Array | None = None,
    *,
    axis: Axes = -1,
    feature_axis: Axes | None = None,
    epsilon: float = 1e-6,
    residual_dtype: Any = None,
    dtype: Any = None,
    scale_offset: float = 0.0,
) -> tuple[jax.Array, jax.Array]:
    """Residual add and layer normalization in one op: ``h = x + residual``, ``y = ln(h)``.

    .. math::

        h = x + r \\ \\text{(in residual\\_dtype)},\\qquad
        y = \\frac{h - \\mathrm{E}_{axis}[h]}{\\sqrt{\\mathrm{Var}_{axis}[h] + \\epsilon}}
            \\,(o + \\gamma) + \\beta

    The same numbers as ``h = (x + residual).astype(residual_dtype)`` followed by
    :func:`layer_norm` ``(h, scale, bias, dtype=dtype or x.dtype, ...)``, the variance
    exact at large means (:func:`jaxnorm.moments`). The backward is closed-form and
    saves only ``h``, the per-row float32 ``mean`` and ``rstd``, ``scale`` and
    ``bias``; it takes cotangents for both outputs. Reverse mode only.

    Args:
      x: floating input of the block.
      residual: the residual stream, of ``x``'s shape, or ``None`` (first block).
      scale: optional ``gamma`` with the shape of ``x`` at ``feature_axis``.
      bias: optional ``beta``, same shape.
      axis: the reduced axis or axes (default the last).
      feature_axis: axes carrying ``scale``/``bias``; default ``axis``.
      epsilon: added to the variance, >= 0; a Python number.
      residual_dtype: dtype of ``h``; ``None`` is the promoted dtype of ``x`` and
        ``residual`` (``jnp.float32``: flash-attn's ``residual_in_fp32``).
      dtype: dtype of ``y``; ``None`` keeps ``x.dtype``.
      scale_offset: constant added to ``scale`` in float32 (``1.0``: TransformerEngine's
        ``zero_centered_gamma``).

    Returns:
      ``(y, h)``: the normalized output and the new residual stream.

    Raises:
      TypeError, ValueError: as :func:`add_rms_norm`.

    Example:
      >>> import jax.numpy as jnp, jaxnorm
      >>> y, h = jaxnorm.add_layer_norm(jnp.array([[1.0, 2.0, 3.0]]), None, epsilon=0.0)
      >>> [round(float(v), 4) for v in y[0]]
      [-1.2247, 0.0, 1.2247]

    References:
      Ba, Kiros & Hinton (2016), "Layer Normalization"; Xiong et al. (2020), "On Layer
      Normalization in the Transformer Architecture" (pre-norm).
    """
    return _add_norm(
        "add_layer_norm",
        x,
        residual,
        scale,
        bias,
        axis=axis,
        feature_axis=feature_axis,
        epsilon=epsilon,
        residual_dtype=residual_dtype,
        dtype=dtype,
        scale_offset=scale_offset,
        center=True,
        cast_then_scale=False,
    )


def _add_norm(
    fn: str,
    x: Any,
    residual: Any,
    scale: Any,
    bias: Any,
    *,
    axis: Axes,
    feature_axis: Axes | None,
    epsilon: float,
    residual_dtype: Any,
    dtype: Any,
    scale_offset: float,
    center: bool,
    cast_then_scale: bool,
) -> tuple[jax.Array, jax.Array]:
    """Check the arguments, settle the static config, run the fused op."""
    _checks.check_floating(fn, x)
    x = jnp.asarray(x)
    if residual is not None:
        _checks.check_floating(fn, residual, "residual")
        residual = jnp.asarray(residual)
        if residual.shape != x.shape:
            raise ValueError(
                f"{fn}: residual has shape {residual.shape} but x has {x.shape}; the residual "
                f"stream and the block output must have one shape (no broadcasting). Pass "
                f"residual=None for the first block."
            )
    if residual_dtype is None:
        rdt = x.dtype if residual is None else jnp.promote_types(x.dtype, residual.dtype)
    else:
        rdt = jnp.dtype(residual_dtype)
        if not jnp.issubdtype(rdt, jnp.floating):
            raise TypeError(
                f"{fn}: residual_dtype must be a floating dtype; got {rdt}. Pass e.g. "
                f"residual_dtype=jnp.float32 to keep the stream in float32, or None."
            )
    out_dtype = _out_dtype(fn, x, dtype)
    if jnp.issubdtype(out_dtype, jnp.complexfloating):
        raise TypeError(f"{fn}: dtype must be a real floating dtype; got {out_dtype}.")
    reduce_axes = _checks.canonical_axes(fn, "axis", axis, x.ndim)
    feature_axes = (
        reduce_axes
        if feature_axis is None
        else _checks.canonical_axes(fn, "feature_axis", feature_axis, x.ndim)
    )
    _checks.check_nonempty(fn, x, reduce_axes)
    desc = f"the feature axes {feature_axes} of x {tuple(x.shape)}"
    feature_shape = tuple(x.shape[a] for a in feature_axes)
    _checks.check_param_shape(fn, "scale", scale, feature_shape, desc)
    _checks.check_param_shape(fn, "bias", bias, feature_shape, desc)
    _checks.check_epsilon(fn, epsilon)
    if isinstance(epsilon, jax.core.Tracer):
        raise TypeError(
            f"{fn}: epsilon must be a Python number (the fused op compiles it in); got a "
            f"traced value. Pass epsilon as a static float."
        )
    cfg = _Config(
        reduce_axes=reduce_axes,
        feature_axes=feature_axes,
        epsilon=float(epsilon),
        scale_offset=check_scale_offset(fn, scale_offset, scale),
        center=center,
        cast_then_scale=cast_then_scale,
        residual_dtype=rdt,
        out_dtype=jnp.dtype(out_dtype),
        x_dtype=x.dtype,
        residual_in_dtype=None if residual is None else residual.dtype,
    )
    scale = None if scale is None else jnp.asarray(scale)
    bias = None if bias is None else jnp.asarray(bias)
    return _fused_add_norm(x, residual, scale, bias, cfg)


def _add(x: jax.Array, residual: jax.Array | None, rdt: jnp.dtype) -> jax.Array:
    """``x + residual`` formed in the promoted dtype of all three, rounded once to ``rdt``."""
    if residual is None:
        return x.astype(rdt)
    wide = jnp.promote_types(jnp.promote_types(x.dtype, residual.dtype), rdt)
    return (x.astype(wide) + residual.astype(wide)).astype(rdt)


def _statistics(h: jax.Array, cfg: _Config) -> tuple[jax.Array | None, jax.Array]:
    """Per-group ``mean`` (``None`` for RMS) and ``rstd``, in >= float32, axes kept."""
    if cfg.center:
        m = moments(h, cfg.reduce_axes)
        mean, var = m.mean, m.var
    else:
        _, var = mean_square(h, cfg.reduce_axes)
        mean = None
    return mean, lax.rsqrt(var + cfg.epsilon)


def _x_hat(h: jax.Array, mean: jax.Array | None, rstd: jax.Array) -> jax.Array:
    hs = h.astype(rstd.dtype)
    return (hs if mean is None else hs - mean) * rstd


def _multiplier(scale: jax.Array | None, cfg: _Config, h: jax.Array) -> jax.Array | None:
    """``scale_offset + scale``, broadcastable to ``h`` (``None`` without a scale)."""
    w = offset_scale(scale, cfg.scale_offset, h.dtype)
    return _broadcast_param(w, h.ndim, cfg.feature_axes, h.shape)


def _output(h, mean, rstd, scale, bias, cfg: _Config) -> jax.Array:
    """``y`` from ``h`` and its statistics, in the order :func:`rms_norm`/``layer_norm``
    use (``(h - mean) * (rstd * w) + b`` in float32, one cast; or Llama's)."""
    w = _multiplier(scale, cfg, h)
    sd = rstd.dtype
    if cfg.cast_then_scale and w is not None:
        x_hat = _x_hat(h, mean, rstd).astype(cfg.out_dtype)
        return (x_hat * w).astype(cfg.out_dtype)
    mul = rstd if w is None else rstd * w.astype(sd)
    hs = h.astype(sd)
    y = (hs if mean is None else hs - mean) * mul
    if bias is not None:
        y = y + _broadcast_param(bias, h.ndim, cfg.feature_axes, h.shape).astype(sd)
    return y.astype(cfg.out_dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _fused_add_norm(x, residual, scale, bias, cfg: _Config):
    """``(y, h)``; differentiated by :func:`_fused_add_norm_bwd`."""
    (y, h), _ = _fused_add_norm_fwd(x, residual, scale, bias, cfg)
    return y, h


def _fused_add_norm_fwd(x, residual, scale, bias, cfg: _Config):
    h = _add(x, residual, cfg.residual_dtype)
    mean, rstd = _statistics(h, cfg)
    y = _output(h, mean, rstd, scale, bias, cfg)
    # All the backward needs: h (an output, which the next block holds anyway), the
    # per-group statistics and the parameters.
    return (y, h), (h, mean, rstd, scale, bias)


def _fused_add_norm_bwd(cfg: _Config, saved, cotangents):
    r"""The closed-form backward of ``y = norm(h)`` plus the cotangent of ``h`` itself.

    With ``x_hat = (h - mu) * r``, ``g = dy * w`` and group means over the reduced axes:

    .. math::

        dh = r\,(g - \mathrm{mean}(g) - \hat x\,\mathrm{mean}(g\,\hat x)) + d\tilde h,
        \qquad d\gamma = \textstyle\sum dy\,\hat x,\qquad d\beta = \sum dy

    (RMS: ``mu = 0`` and no ``mean(g)`` term; Llama's order uses the rounded ``x_hat``
    for ``d gamma``). ``dx`` and ``dresidual`` are ``dh`` in their own dtypes.
    """
    h, mean, rstd, scale, bias = saved
    dy, dh_direct = cotangents
    sd = rstd.dtype
    n = math.prod(h.shape[a] for a in cfg.reduce_axes)
    x_hat = _x_hat(h, mean, rstd)
    dys = dy.astype(sd)
    w = _multiplier(scale, cfg, h)
    g = dys if w is None else dys * w.astype(sd)
    c2 = jnp.sum(g * x_hat, axis=cfg.reduce_axes, keepdims=True) / n
    inner = g - x_hat * c2
    if cfg.center:
        inner = inner - jnp.sum(g, axis=cfg.reduce_axes, keepdims=True) / n
    dh = rstd * inner + dh_direct.astype(sd)
    dx = dh.astype(cfg.x_dtype)
    dres = None if cfg.residual_in_dtype is None else dh.astype(cfg.residual_in_dtype)
    others = tuple(a for a in range(h.ndim) if a not in cfg.feature_axes)
    dscale = dbias = None
    if scale is not None:
        used = x_hat.astype(cfg.out_dtype).astype(sd) if cfg.cast_then_scale else x_hat
        dscale = jnp.sum(dys * used, axis=others).reshape(scale.shape).astype(scale.dtype)
    if bias is not None:
        dbias = jnp.sum(dys, axis=others).reshape(bias.shape).astype(bias.dtype)
    return dx, dres, dscale, dbias


_fused_add_norm.defvjp(_fused_add_norm_fwd, _fused_add_norm_bwd)
