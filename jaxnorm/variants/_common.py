"""What every batch-norm variant shares: argument checks, layout, the affine map."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from jaxnorm import _checks
from jaxnorm._checks import Axes
from jaxnorm.stats import stat_dtype

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


class _Running(NamedTuple):
    """A batch-stats variant's checked layout, and its parameters and running statistics
    in the statistics dtype, shaped to broadcast against ``x``."""

    lay: _Layout
    sd: Any  # the statistics dtype, >= float32
    scale: jax.Array | None
    bias: jax.Array | None
    mean: jax.Array
    var: jax.Array


def _running(fn, x, stats, scale, bias, *, axis, epsilon, mask, dtype, momentum) -> _Running:
    """Validate the arguments of a variant that keeps :class:`jaxnorm.BatchStats`."""
    lay = _layout(fn, x, scale, bias, axis=axis, epsilon=epsilon, mask=mask, dtype=dtype)
    _checks.check_stats(fn, stats, lay.feature_shape, lay.desc)
    _checks.check_momentum(fn, momentum)
    sd = stat_dtype(x.dtype)
    return _Running(
        lay,
        sd,
        _feature(scale, lay.bshape, sd),
        _feature(bias, lay.bshape, sd),
        _feature(stats.mean, lay.bshape, sd),
        _feature(stats.var, lay.bshape, sd),
    )
