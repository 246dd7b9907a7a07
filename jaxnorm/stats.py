"""Moments as (count, mean, M2): axes, masks, cross-device merges, f32 accumulation.

Every normalization in jaxnorm gets its statistics from :func:`moments` (or
:func:`mean_square` for RMS-style layers). Statistics are carried as the triple
``(count, mean, M2)`` with ``M2 = sum((x - mean)**2)``, the form in which partial
statistics combine *exactly* (Chan et al., 1979):

.. math::

    n = n_a + n_b,\\quad
    \\mu = \\mu_a + (\\mu_b - \\mu_a)\\,n_b / n,\\quad
    M_2 = M_{2,a} + M_{2,b} + (\\mu_b - \\mu_a)^2\\,n_a n_b / n.

So masks, uneven shards and microbatches combine without approximation, and an empty
group has ``count == 0`` rather than NaN. (Merging *stored* moments is limited by the
float32 rounding of each part's mean: at a mean of 1e6 and std 1 a merged variance can be
off by ~1e-2. So :func:`moments` never merges rounded means: with ``axis_name`` it forms
the global sums from ``x`` itself, below.)

Numerics. Accumulation happens in ``promote(x.dtype, float32)`` (complex inputs: a
complex mean and a real ``M2 = sum(|x - mean|**2)``), by one of two methods that both
stay within 1e-5 relative variance error of float64 at a mean of 1e6 and std 1 (the
naive ``E[x**2] - E[x]**2``, flax's default, returns garbage for float32 rows with mean
1e4 and std 1):

* *Corrected two-pass* (Chan, Golub & LeVeque 1983): a rough mean ``m~ = sum(x)/n``,
  then with ``d = x - m~``: ``mean = m~ + sum(d)/n`` and
  ``M2 = sum(d**2) - sum(d)**2/n``. The correction term removes the error of ``m~``
  (which, rounded to float32 at a mean of 1e6, can be a tenth of a standard deviation
  off: the plain two-pass ``sum((x - m~)**2)`` was then 1% off). Used for rows of at
  most 2048 trailing elements (layer norm; XLA keeps the row in cache), groups of at
  most 16 elements, under a mask (masked-out values, even NaN, never enter a sum), with
  ``axis_name`` (both passes' sums are all-reduced, so the statistics are those of the
  global batch) and when a reduced axis is split by explicit sharding.
* Otherwise (batch norm's leading axes, longer rows): *shifted* single-pass sums, one
  read of ``x`` for both moments. With shifts ``a`` and ``b`` (the means of each group's
  first 8 and first 4 elements), ``mean = a + sum(x - a)/n`` and
  ``M2 = sum((x - b)**2) - n*(mean - b)**2``. Since ``(c - mean)**2 <= n*var`` for any
  sample mean ``c`` of the group, the relative error of ``M2`` is at most about
  ``n * eps`` whatever the mean, and far smaller when the first elements are typical.
  (Two shifts rather than one keep XLA from materializing a shared ``x - shift``.)

The shifts and ``m~`` are wrapped in ``stop_gradient``; this is exact, since ``mean``
and ``M2`` are invariant to them.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from jaxnorm import _checks, _sharding

__all__ = [
    "Moments",
    "abs_square",
    "mean_square",
    "merge_moments",
    "moments",
    "psum_moments",
    "reduce_moments",
    "stat_dtype",
]

AxisName = Hashable | tuple[Hashable, ...]


class Moments(NamedTuple):
    """Partial statistics of a group of values, in the form that merges exactly.

    All fields share one shape: the input's shape with the reduced axes kept as
    size 1 (so they broadcast against the input), or with them dropped.

    Attributes:
      count: the number of valid elements, float32 (>= the statistics' real dtype).
      mean: the mean of the valid elements (0 if none), float32 or complex64.
      m2: ``sum(|x - mean|**2)`` over the valid elements, real.
    """

    count: jax.Array  # shape=group shape, float32 (>= stat dtype): number of valid elements
    mean: jax.Array  # shape=group shape, float32: mean of the valid elements (0 if none)
    m2: jax.Array  # shape=group shape, float32: sum of squared deviations from ``mean``

    @property
    def var(self) -> jax.Array:
        """Biased (population) variance ``M2 / count``; 0 where ``count == 0``."""
        return self.m2 / jnp.maximum(self.count, 1.0)


def stat_dtype(dtype: Any) -> jnp.dtype:
    """The accumulation dtype for an input dtype: at least float32."""
    return jnp.promote_types(dtype, jnp.float32)


def _safe_div(a: jax.Array, n: jax.Array) -> jax.Array:
    return a / jnp.maximum(n, 1.0)


def _public_axes(fn: str, x: jax.Array, axes: Any, mask: Any) -> tuple[int, ...]:
    """Validate the public entry points' input; canonical axes (sorted, non-negative)."""
    _checks.check_floating(fn, x, complex_ok=True)
    _checks.check_mask(fn, mask, jnp.shape(x))
    return _checks.canonical_axes(fn, "axes", axes, jnp.ndim(x))


_SHIFT_SAMPLES = 8
# Rows up to this many elements (8 KiB in float32) are reduced two-pass: XLA keeps them in
# cache. Measured on 2 CPU cores, jaxnorm's layer_norm forward relative to flax's:
# rows of 128-2048 two-pass 0.98-1.00, shifted 1.13-1.30; rows of 4096 two-pass 1.25,
# shifted 1.09 (python -m benchmarks --op layer_norm).
_TWO_PASS_MAX_ROW = 2048


def _sample_shift(xs: jax.Array, axes: tuple[int, ...], k: int) -> jax.Array:
    """A per-group shift near the mean: the mean of the group's first ``k`` elements.

    The elements are taken along the first reduced axis (index 0 along the other reduced
    axes), so ``(c - mean)**2 <= n * var`` holds for the bound in the module docstring.
    """
    k = max(1, min(k, xs.shape[axes[0]]))
    index = tuple(
        slice(0, k) if a == axes[0] else slice(0, 1) if a in axes else slice(None)
        for a in range(xs.ndim)
    )
    return lax.stop_gradient(jnp.mean(xs[index], axis=axes[0], keepdims=True))


def moments(
    x: jax.Array,
    axes: tuple[int, ...],
    *,
    mask: jax.Array | None = None,
    axis_name: AxisName | None = None,
    axis_index_groups: Sequence[Sequence[int]] | None = None,
    keepdims: bool = True,
) -> Moments:
    """Count, mean and M2 of ``x`` over ``axes`` (and over devices), in >= float32.

    .. math::

        n = \\sum_i m_i,\\quad \\mu = \\frac{1}{n}\\sum_i m_i x_i,\\quad
        M_2 = \\sum_i m_i |x_i - \\mu|^2

    with ``m`` the mask (all ones when ``mask is None``), the sums running over
    ``axes`` and, when ``axis_name`` is given, over every device (or vmapped index)
    of that named axis. For complex ``x`` the mean is complex and ``M2`` real.

    Args:
      x: floating or complex input of any shape.
      axes: the axis or axes to reduce (negative values count from the end).
      mask: optional boolean array broadcastable to ``x``; ``False`` elements are
        ignored, whatever value (even NaN) they hold.
      axis_name: optional named axis (or tuple of names) of ``shard_map``/``pmap``/
        ``vmap`` to reduce across. The global sums are formed from ``x`` itself (a
        corrected two-pass over the global batch, two all-reduces), so uneven shards,
        masks and fully masked devices give the global statistics to float32 rounding,
        whatever the mean.
      axis_index_groups: optional device groups for the cross-device reduction, as in
        ``lax.psum``.
      keepdims: keep the reduced axes as size 1 (default) or drop them.

    Returns:
      A :class:`Moments` in ``promote(x.dtype, float32)`` (``m2`` and ``count`` real).

    Example:
      >>> import jax.numpy as jnp
      >>> m = moments(jnp.array([1e6 + 1.0, 1e6 + 3.0]), (0,), keepdims=False)
      >>> float(m.mean), float(m.var)
      (1000002.0, 1.0)
    """
    axes = _public_axes("moments", x, axes, mask)
    sd = stat_dtype(x.dtype)
    xs = x.astype(sd)
    n_local = 1
    for ax in axes:
        n_local *= x.shape[ax]
    if mask is None and axis_name is None:
        kept = tuple(1 if ax in axes else size for ax, size in enumerate(x.shape))
        count = jnp.full(kept, float(n_local), _real(sd))
        trailing = axes == tuple(range(x.ndim - len(axes), x.ndim))
        # Tiny groups take two passes too: when the sample shift covers the whole group,
        # XLA rewrites sum(x - mean(x)) into a cancelling form (relative M2 error 0.13
        # at mean 1e6 for groups of 5, measured under jit).
        tiny = n_local <= 2 * _SHIFT_SAMPLES
        if (trailing and n_local <= _TWO_PASS_MAX_ROW) or tiny or _sharded(x, axes):
            mean, m2 = _corrected_two_pass(xs, axes, None, count, None, None)
        else:
            mean, m2 = _shifted_single_pass(xs, axes, n_local)
        result = Moments(count, mean, m2)
    else:
        if mask is None:
            m = None
            kept = tuple(1 if ax in axes else size for ax, size in enumerate(x.shape))
            count = jnp.full(kept, float(n_local), _real(sd))
        else:
            m = jnp.broadcast_to(mask, x.shape)
            count = jnp.sum(m, axis=axes, keepdims=True, dtype=_real(sd))
        if axis_name is not None:
            count = lax.psum(count, axis_name, axis_index_groups=axis_index_groups)
        mean, m2 = _corrected_two_pass(xs, axes, m, count, axis_name, axis_index_groups)
        result = Moments(count, mean, m2)
    if not keepdims:
        result = Moments(*(jnp.squeeze(f, axis=axes) for f in result))
    return result


def _real(dtype: Any) -> jnp.dtype:
    """The real dtype of a (possibly complex) floating dtype."""
    return jnp.finfo(dtype).dtype


def abs_square(z: jax.Array) -> jax.Array:
    """``|z|**2`` as a real array (``z * z`` for real ``z``)."""
    if jnp.iscomplexobj(z):
        return jnp.square(z.real) + jnp.square(z.imag)
    return jnp.square(z)


def _sharded(x: jax.Array, axes: tuple[int, ...]) -> bool:
    """Whether a reduced axis of ``x`` is split over an explicit-sharding mesh axis.

    Slicing such an axis (the sample shift) is refused by explicit sharding unless the
    slice divides the mesh, so those inputs take the two-pass route.
    """
    try:
        spec = jax.typeof(x).sharding.spec
    except (AttributeError, TypeError, ValueError):
        return False
    return any(a < len(spec) and spec[a] is not None for a in axes)


def _corrected_two_pass(
    xs: jax.Array,
    axes: tuple[int, ...],
    mask: jax.Array | None,
    count: jax.Array,
    axis_name: AxisName | None,
    axis_index_groups: Sequence[Sequence[int]] | None,
) -> tuple[jax.Array, jax.Array]:
    """Mean and M2 by the corrected two-pass algorithm, over devices when asked.

    A first pass gives a rough mean ``m~`` (rounded to float32, so at a mean of 1e6 it
    can be off by a tenth of a standard deviation); the second sums ``d = x - m~``:

    .. math::

        \\mu = \\tilde m + \\frac{1}{n}\\sum d,\\qquad
        M_2 = \\sum |d|^2 - \\frac{1}{n}\\Big|\\sum d\\Big|^2

    which is exact for any ``m~`` and loses only ``O(eps * ((m~ - mu)/sigma)**2)``
    to rounding (Chan, Golub & LeVeque 1983). ``m~`` is held constant for autodiff; the
    formula's derivative is the exact one. Masked-out elements never enter an
    arithmetic operation that could reach a gradient (double ``where``). With
    ``axis_name`` both passes' sums are all-reduced: the global statistics come from
    the data, not from rounded per-device means.
    """

    def total(a: jax.Array) -> jax.Array:
        s = jnp.sum(a, axis=axes, keepdims=True)
        if axis_name is not None:
            s = lax.psum(s, axis_name, axis_index_groups=axis_index_groups)
        return s

    zero = jnp.zeros((), xs.dtype)
    first = xs if mask is None else _sharding.where(mask, xs, zero)
    rough = lax.stop_gradient(_safe_div(total(first), count))
    d = xs - rough
    if mask is not None:
        d = _sharding.where(mask, d, zero)
    s1 = total(d)
    s2 = total(abs_square(d))
    mean = rough + _safe_div(s1, count)
    m2 = jnp.maximum(s2 - _safe_div(abs_square(s1), count), 0.0)
    return mean, m2


def _shifted_single_pass(
    xs: jax.Array, axes: tuple[int, ...], n: int
) -> tuple[jax.Array, jax.Array]:
    """Mean and M2 in one read of ``xs`` (see the module docstring for the error bound)."""
    # Two shifts, so each reduction broadcasts its own small array: XLA fuses a
    # single-use broadcast into the reduction but materializes a shared ``x - shift``.
    shift_a = _sample_shift(xs, axes, _SHIFT_SAMPLES)
    shift_b = _sample_shift(xs, axes, _SHIFT_SAMPLES // 2)
    mean_a = jnp.sum(xs - shift_a, axis=axes, keepdims=True) / n
    s2 = jnp.sum(abs_square(xs - shift_b), axis=axes, keepdims=True)
    mean_b = (shift_a - shift_b) + mean_a  # mean - b, not rounded through the mean
    return shift_a + mean_a, jnp.maximum(s2 - n * abs_square(mean_b), 0.0)


def psum_moments(
    m: Moments,
    axis_name: AxisName,
    *,
    axis_index_groups: Sequence[Sequence[int]] | None = None,
) -> Moments:
    """Merge per-device moments into the global ones (Chan's merge).

    For moments you hold already. When ``x`` is at hand, prefer
    ``moments(x, axes, axis_name=...)``, which sums ``x`` itself across devices: merging
    float32-rounded means loses the variance at large ``|mean|/std`` (at mean 1e6,
    std 1: ~1e-2 relative).

    .. math::

        N = \\sum_d n_d,\\quad \\mu = \\frac{1}{N}\\sum_d n_d\\mu_d,\\quad
        M_2 = \\sum_d \\left(M_{2,d} + n_d(\\mu_d - \\mu)^2\\right)

    Two all-reduces; devices with ``n_d == 0`` contribute nothing.

    Args:
      m: this device's moments.
      axis_name: the named axis (or tuple of names) to reduce over.
      axis_index_groups: optional device groups, as in ``lax.psum``.

    Returns:
      The merged :class:`Moments`, identical on every device of a group.
    """
    count, weighted = lax.psum(
        (m.count, m.count * m.mean), axis_name, axis_index_groups=axis_index_groups
    )
    mean = _safe_div(weighted, count)
    m2 = lax.psum(
        m.m2 + m.count * jnp.square(m.mean - mean),
        axis_name,
        axis_index_groups=axis_index_groups,
    )
    return Moments(count, mean, m2)


def reduce_moments(m: Moments, axis: int) -> Moments:
    """Merge the moments of disjoint groups stacked along ``axis`` (exact, as Chan).

    .. math::

        N = \\sum_k n_k,\\quad \\mu = \\frac{1}{N}\\sum_k n_k\\mu_k,\\quad
        M_2 = \\sum_k \\left(M_{2,k} + n_k(\\mu_k - \\mu)^2\\right)

    Args:
      m: moments with the groups along ``axis``.
      axis: the axis to merge away.

    Returns:
      The merged :class:`Moments`, without ``axis``.
    """
    count = jnp.sum(m.count, axis=axis, keepdims=True)
    mean = _safe_div(jnp.sum(m.count * m.mean, axis=axis, keepdims=True), count)
    m2 = jnp.sum(m.m2 + m.count * jnp.square(m.mean - mean), axis=axis, keepdims=True)
    return Moments(*(jnp.squeeze(f, axis=axis) for f in (count, mean, m2)))


def merge_moments(a: Moments, b: Moments) -> Moments:
    """Merge the moments of two disjoint groups (Chan et al.'s pairwise update).

    .. math::

        \\delta = \\mu_b - \\mu_a,\\quad n = n_a + n_b,\\quad
        \\mu = \\mu_a + \\delta\\,n_b/n,\\quad M_2 = M_{2,a} + M_{2,b} + \\delta^2 n_a n_b/n

    Either side may be empty (``count == 0``); the result is then the other side.

    Args:
      a: moments of the first group.
      b: moments of the second group, same shape as ``a``.

    Returns:
      The moments of the union.

    References:
      Chan, Golub, LeVeque (1979), "Updating formulae and a pairwise algorithm for
      computing sample variances".
    """
    shapes = {
        name: jnp.shape(f)
        for m, side in ((a, "a"), (b, "b"))
        for name, f in ((f"{side}.{k}", getattr(m, k)) for k in ("count", "mean", "m2"))
    }
    if len(set(shapes.values())) != 1:
        raise ValueError(
            f"merge_moments: all fields of a and b must share one shape (the groups being "
            f"merged); got {shapes}. Compute both with the same axes and keepdims."
        )
    n = a.count + b.count
    delta = b.mean - a.mean
    frac_b = _safe_div(b.count, n)
    mean = a.mean + delta * frac_b
    m2 = a.m2 + b.m2 + jnp.square(delta) * a.count * frac_b
    return Moments(n, mean, m2)


def mean_square(
    x: jax.Array,
    axes: tuple[int, ...],
    *,
    mask: jax.Array | None = None,
    axis_name: AxisName | None = None,
    axis_index_groups: Sequence[Sequence[int]] | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Count and mean of ``|x|**2`` over ``axes`` (uncentered second moment), in >= f32.

    .. math::

        n = \\sum_i m_i,\\quad \\nu = \\frac{1}{n}\\sum_i m_i |x_i|^2

    Args:
      x: floating input.
      axes: the axis or axes to reduce (kept as size 1).
      mask: optional boolean array broadcastable to ``x``.
      axis_name: optional named axis to reduce across devices.
      axis_index_groups: optional device groups, as in ``lax.psum``.

    Returns:
      ``(count, nu)``, both with the reduced axes kept as size 1; ``nu`` is 0 where
      ``count == 0``.
    """
    axes = _public_axes("mean_square", x, axes, mask)
    sd = stat_dtype(x.dtype)
    xs = x.astype(sd)
    if mask is None:
        n_local = 1
        for a in axes:
            n_local *= x.shape[a]
        kept = tuple(1 if a in axes else s for a, s in enumerate(x.shape))
        count = jnp.full(kept, float(n_local), _real(sd))
        total = jnp.sum(abs_square(xs), axis=axes, keepdims=True)
    else:
        # Double where: masked-out values (NaN padding) must not reach the square,
        # whose derivative 2*x would turn a zero cotangent into NaN.
        m = jnp.broadcast_to(mask, x.shape)
        count = jnp.sum(m, axis=axes, keepdims=True, dtype=_real(sd))
        safe = _sharding.where(m, xs, jnp.zeros((), sd))
        total = jnp.sum(abs_square(safe), axis=axes, keepdims=True)
    if axis_name is not None:
        count, total = lax.psum((count, total), axis_name, axis_index_groups=axis_index_groups)
    return count, _safe_div(total, count)
