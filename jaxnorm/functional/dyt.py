"""Dynamic Tanh (DyT): an element-wise replacement for normalization layers."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxnorm import _checks
from jaxnorm._checks import Axes
from jaxnorm.functional._core import _broadcast_param, _out_dtype
from jaxnorm.stats import stat_dtype


def _check_alpha(fn: str, alpha: Any, x_shape: tuple[int, ...]) -> None:
    if isinstance(alpha, (bool, np.bool_)):
        raise TypeError(f"{fn}: alpha must be a number or a floating array; got {alpha!r}.")
    if isinstance(alpha, (int, float)):
        return
    _checks.check_floating(fn, alpha, "alpha")
    shape = tuple(jnp.shape(alpha))
    try:
        out = np.broadcast_shapes(shape, tuple(x_shape))
    except ValueError:
        out = None
    if out != tuple(x_shape):
        raise ValueError(
            f"{fn}: alpha has shape {shape}, which does not broadcast to x's shape "
            f"{tuple(x_shape)}. DyT's alpha is a scalar (shape () or (1,)); pass one, or an "
            f"array with x's trailing shape."
        )


def dyt(
    x: jax.Array,
    alpha: jax.Array | float,
    scale: jax.Array | None = None,
    bias: jax.Array | None = None,
    *,
    feature_axis: Axes = -1,
    dtype: Any = None,
) -> jax.Array:
    """Dynamic Tanh: ``scale * tanh(alpha * x) + bias``, element-wise.

    .. math::

        y = \\gamma \\odot \\tanh(\\alpha x) + \\beta

    DyT replaces LayerNorm/RMSNorm in Transformers with no statistics at all: the
    learnable scalar ``alpha`` squashes extreme activations as a norm does, and
    ``gamma``/``beta`` are the usual per-channel affine. The product and ``tanh`` are
    computed in ``promote(x.dtype, float32)`` (bfloat16/float16 inputs in float32); the
    output has ``x``'s dtype unless ``dtype`` says otherwise.

    The paper's code keeps ``alpha`` as a ``(1,)`` parameter (also accepted here) and
    ``weight``/``bias`` of shape ``(C,)`` on the last axis (``channels_last``) or, for
    ConvNets, on axis 1: ``feature_axis=1``.

    Args:
      x: floating input.
      alpha: the scalar ``alpha`` (a number, or an array broadcastable to ``x``).
      scale: optional ``gamma`` with the shape of ``x`` at ``feature_axis``.
      bias: optional ``beta`` with the same shape.
      feature_axis: axes carrying ``scale``/``bias`` (default the last).
      dtype: output dtype; ``None`` keeps ``x.dtype``.

    Returns:
      An array of ``x``'s shape.

    Raises:
      TypeError: non-floating ``x``/``alpha``/``scale``/``bias`` (complex included).
      ValueError: an ``alpha`` that does not broadcast to ``x``, or a scale/bias
        of the wrong shape.

    Example:
      >>> import jax.numpy as jnp, jaxnorm
      >>> y = jaxnorm.dyt(jnp.array([-2.0, 0.0, 2.0]), 0.5)
      >>> [round(float(v), 4) for v in y]
      [-0.7616, 0.0, 0.7616]

    References:
      Zhu, Chen, He, LeCun & Liu (2025), "Transformers without Normalization".
    """
    fn = "dyt"
    _checks.check_floating(fn, x)
    _check_alpha(fn, alpha, tuple(jnp.shape(x)))
    feature_axes = _checks.canonical_axes(fn, "feature_axis", feature_axis, jnp.ndim(x))
    feature_shape = tuple(x.shape[a] for a in feature_axes)
    desc = f"the feature axes {feature_axes} of x {tuple(x.shape)}"
    _checks.check_param_shape(fn, "scale", scale, feature_shape, desc)
    _checks.check_param_shape(fn, "bias", bias, feature_shape, desc)
    out_dtype = _out_dtype(fn, x, dtype)
    cd = stat_dtype(x.dtype)
    y = jnp.tanh(jnp.asarray(alpha).astype(cd) * x.astype(cd))
    if scale is not None:
        y = y * _broadcast_param(scale, x.ndim, feature_axes, x.shape).astype(cd)
    if bias is not None:
        y = y + _broadcast_param(bias, x.ndim, feature_axes, x.shape).astype(cd)
    return y.astype(out_dtype)
