"""Batch-norm input moments as trees, merged exactly and applied as one update.

The microbatch-statistics half of :mod:`jaxnorm.tools`: :func:`batch_moments` is what
a batch-norm layer folds into its running statistics; :func:`empty_moments_like`,
:func:`accumulate_moments` and :func:`apply_accumulated` carry such moments for every
layer of a ``batch_stats`` tree (keyed like it) through ``K`` microbatches and make
the one running-statistics update per optimizer step.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from jaxnorm import _checks
from jaxnorm._checks import Axes
from jaxnorm.state import BatchStats, update_batch_stats
from jaxnorm.stats import AxisName, Moments, merge_moments, moments

Path = tuple[str, ...]  # a layer's module path, as in the batch_stats tree


def batch_moments(
    x: jax.Array,
    *,
    axis: Axes = -1,
    mask: jax.Array | None = None,
    axis_name: AxisName | None = None,
    axis_index_groups: Sequence[Sequence[int]] | None = None,
) -> Moments:
    """The batch moments a batch-norm layer with feature ``axis`` computes from ``x``.

    ``(count, mean, M2)`` over every axis but ``axis`` (and over the devices of
    ``axis_name``), restricted to ``mask``, with the reduced axes dropped: exactly
    what :func:`jaxnorm.batch_norm` folds into its running statistics in training.
    Gradients are stopped (running statistics are not differentiated).

    Args:
      x: floating input of the batch-norm layer.
      axis: the feature axis or axes (kept), as in :func:`jaxnorm.batch_norm`.
      mask: optional boolean array broadcastable to ``x``.
      axis_name: optional named axis to merge the moments across.
      axis_index_groups: device groups for ``axis_name``.

    Returns:
      A :class:`jaxnorm.Moments` of the feature shape, in ``promote(x.dtype, f32)``.

    Example:
      >>> import jax.numpy as jnp
      >>> from jaxnorm.tools import batch_moments
      >>> m = batch_moments(jnp.array([[1.0, 0.0], [3.0, 0.0]]))
      >>> m.count.tolist(), m.mean.tolist(), m.m2.tolist()
      ([2.0, 2.0], [2.0, 0.0], [2.0, 0.0])
    """
    fn = "batch_moments"
    _checks.check_floating(fn, x)
    feature_axes = _checks.canonical_axes(fn, "axis", axis, jnp.ndim(x))
    reduce_axes = tuple(a for a in range(x.ndim) if a not in feature_axes)
    _checks.check_nonempty(fn, x, reduce_axes)
    _checks.check_mask(fn, mask, x.shape)
    m = moments(
        lax.stop_gradient(x),
        reduce_axes,
        mask=mask,
        axis_name=axis_name,
        axis_index_groups=axis_index_groups,
        keepdims=False,
    )
    return Moments(*(lax.stop_gradient(f) for f in m))


def empty_moments(feature_shape: int | Sequence[int], dtype: Any = jnp.float32) -> Moments:
    """Moments of no data: ``count = mean = M2 = 0``, the identity of :func:`merge_moments`.

    Args:
      feature_shape: shape of the feature axes.
      dtype: floating dtype (float32 by default).

    Returns:
      A :class:`jaxnorm.Moments` of zeros.
    """
    zeros = jnp.zeros(_checks.feature_shape_tuple("empty_moments", feature_shape), dtype)
    return Moments(zeros, zeros, zeros)


def _is_layer_stats(tree: Any) -> bool:
    return isinstance(tree, Mapping) and "mean" in tree and "var" in tree


def empty_moments_like(batch_stats: Any) -> Any:
    """A tree of :func:`empty_moments`, one per layer of a Flax ``batch_stats`` tree.

    Args:
      batch_stats: a ``batch_stats`` collection (nested dicts whose layers hold
        ``mean``/``var``), or a :class:`jaxnorm.BatchStats`.

    Returns:
      The same nesting with each layer's dict replaced by empty moments shaped like
      its ``mean``: the starting value of an accumulation.
    """
    if isinstance(batch_stats, BatchStats):
        return empty_moments(jnp.shape(batch_stats.mean))
    if _is_layer_stats(batch_stats):
        return empty_moments(jnp.shape(batch_stats["mean"]))
    if isinstance(batch_stats, Mapping):
        return {k: empty_moments_like(v) for k, v in batch_stats.items() if isinstance(v, Mapping)}
    raise TypeError(
        f"empty_moments_like: expected a batch_stats tree (nested dicts with 'mean' and "
        f"'var' per layer) or a jaxnorm.BatchStats; got {type(batch_stats).__name__}."
    )


def _path_str(path: Path) -> str:
    return "/".join(path) or "<root>"


def accumulate_moments(acc: Any, new: Any) -> Any:
    """Merge new batch moments into accumulated ones, layer by layer (exact).

    .. math::

        n = n_a + n_b,\\quad \\mu = \\mu_a + (\\mu_b - \\mu_a)\\,n_b/n,\\quad
        M_2 = M_{2,a} + M_{2,b} + (\\mu_b - \\mu_a)^2 n_a n_b / n

    (:func:`jaxnorm.merge_moments`). ``new`` may hold a subset of ``acc``'s layers
    (layers not run in training report nothing); those keep their accumulation.

    Args:
      acc: a :class:`jaxnorm.Moments` or a tree of them (e.g. from
        :func:`empty_moments_like`).
      new: moments of the next microbatch, same form (e.g. from
        :func:`with_batch_moments`).

    Returns:
      The merged moments, with ``acc``'s structure.

    Raises:
      ValueError: ``new`` has a layer that ``acc`` lacks, or shapes differ.
    """
    return _accumulate(acc, new, ())


def _accumulate(acc: Any, new: Any, path: Path) -> Any:
    """:func:`accumulate_moments` at ``path`` (named in its errors)."""
    if isinstance(new, Moments):
        if not isinstance(acc, Moments):
            raise ValueError(
                f"accumulate_moments: layer {_path_str(path)!r} has new moments but the "
                f"accumulator holds {type(acc).__name__} there; start from "
                f"empty_moments_like(batch_stats)."
            )
        if jnp.shape(acc.mean) != jnp.shape(new.mean):
            raise ValueError(
                f"accumulate_moments: layer {_path_str(path)!r} accumulates moments of "
                f"shape {jnp.shape(acc.mean)} but got {jnp.shape(new.mean)}; each layer's "
                f"feature shape must stay the same across microbatches."
            )
        return merge_moments(acc, new)
    if not isinstance(acc, Mapping) or not isinstance(new, Mapping):
        raise TypeError(
            f"accumulate_moments: expected Moments or nested dicts of them at "
            f"{_path_str(path)!r}; got {type(acc).__name__} and {type(new).__name__}."
        )
    out = dict(acc)
    for k, v in new.items():
        if k not in acc:
            raise ValueError(
                f"accumulate_moments: the new moments have layer "
                f"{_path_str(path + (k,))!r}, which the accumulator lacks (it has "
                f"{sorted(acc)}); start from empty_moments_like(batch_stats)."
            )
        out[k] = _accumulate(acc[k], v, path + (k,))
    return out


def _apply_layer(
    stats: Mapping[str, Any],
    batch: Moments,
    path: Path,
    *,
    momentum: float | None,
    unbiased_running_var: bool,
) -> dict[str, Any]:
    fn = "apply_accumulated"
    if jnp.shape(stats["mean"]) != jnp.shape(batch.mean):
        raise ValueError(
            f"{fn}: layer {_path_str(path)!r} has running statistics of shape "
            f"{jnp.shape(stats['mean'])} but moments of shape {jnp.shape(batch.mean)}; the "
            f"moments must come from this layer's input (batch_moments with its axis)."
        )
    if momentum is None and "count" not in stats:
        raise ValueError(
            f"{fn}: momentum=None (cumulative average) needs the step count, but layer "
            f"{_path_str(path)!r} has no batch_stats 'count'; build the layer with "
            f"momentum=None or track_count=True (jaxnorm.linen.BatchNorm)."
        )
    current = BatchStats(
        mean=stats["mean"], var=stats["var"], count=stats.get("count", jnp.zeros((), jnp.int32))
    )
    new = update_batch_stats(
        current, batch, momentum=momentum, unbiased_running_var=unbiased_running_var
    )
    out = dict(stats)
    out["mean"], out["var"] = new.mean, new.var
    if "count" in stats:
        out["count"] = new.count
    return out


def _apply_tree(stats: Any, batch: Any, config: Callable[[Path], Any], path: Path = ()) -> Any:
    """Apply each layer's moments to its running statistics; layers without moments keep."""
    if isinstance(batch, Moments):
        if not _is_layer_stats(stats):
            raise ValueError(
                f"apply_accumulated: moments for layer {_path_str(path)!r}, but the "
                f"batch_stats there are not a layer's {{'mean', 'var'}}; pass the model's "
                f"whole batch_stats collection."
            )
        cfg = config(path)
        if cfg is None:
            return stats
        momentum, unbiased = cfg
        return _apply_layer(stats, batch, path, momentum=momentum, unbiased_running_var=unbiased)
    if not isinstance(stats, Mapping):
        raise ValueError(
            f"apply_accumulated: moments for {_path_str(path)!r} but no batch_stats there."
        )
    out = dict(stats)
    for k, v in batch.items():
        if k not in stats:
            raise ValueError(
                f"apply_accumulated: moments for layer {_path_str(path + (k,))!r}, which the "
                f"batch_stats lack (they have {sorted(stats)} at {_path_str(path)!r})."
            )
        out[k] = _apply_tree(stats[k], v, config, path + (k,))
    return out


def apply_accumulated(
    stats: Any,
    batch: Any,
    *,
    momentum: float | None,
    unbiased_running_var: bool = False,
) -> Any:
    """One running-statistics update from accumulated moments (one optimizer step).

    .. math::

        \\text{new} = \\alpha\\,\\text{old} + (1 - \\alpha)\\,\\text{batch},\\qquad
        \\text{batch var} = M_2 / n \\;\\text{or}\\; M_2 / (n - 1)

    with ``n``, ``mean``, ``M2`` the moments merged over ``K`` microbatches, so the
    result is the update one training step would make from a batch holding all the
    values those moments summarize -- including ``unbiased_running_var`` (Bessel with
    the *total* ``n``, torch's convention) and ``momentum=None`` (``count`` advances
    by one per call, not by ``K``). That is a full-batch step's update exactly when
    the moments are of the inputs the full batch would give the layer (see
    :func:`accumulate_gradients`).
    ``alpha`` is ``momentum``, or ``count/(count+1)`` when it is ``None``
    (:func:`jaxnorm.update_batch_stats`).

    Args:
      stats: a :class:`jaxnorm.BatchStats`, or a Flax ``batch_stats`` tree.
      batch: the accumulated :class:`jaxnorm.Moments` (feature shape), or a tree of
        them with the same nesting (layers absent from it are left unchanged).
      momentum: weight of the old value, or ``None`` for the cumulative average;
        applied to every layer (torch's ``p`` is ``1 - p``).
      unbiased_running_var: store the Bessel-corrected variance (torch).

    Returns:
      Updated statistics of the same form as ``stats``.

    Raises:
      ValueError: moments for a layer the tree lacks, mismatched shapes, or
        ``momentum=None`` for a layer without ``count``.

    Example:
      >>> import jax.numpy as jnp, jaxnorm
      >>> from jaxnorm.tools import batch_moments, accumulate_moments, apply_accumulated
      >>> x = jnp.arange(8.0).reshape(4, 2)
      >>> acc = accumulate_moments(batch_moments(x[:2]), batch_moments(x[2:]))
      >>> s = apply_accumulated(jaxnorm.init_batch_stats(2), acc, momentum=0.0)
      >>> s.mean.tolist(), s.var.tolist()
      ([3.0, 4.0], [5.0, 5.0])
    """
    fn = "apply_accumulated"
    _checks.check_momentum(fn, momentum)
    if isinstance(stats, BatchStats):
        if not isinstance(batch, Moments):
            raise TypeError(
                f"{fn}: stats is a BatchStats, so batch must be one Moments; got "
                f"{type(batch).__name__}."
            )
        _checks.check_stats(fn, stats, jnp.shape(batch.mean), "the moments' feature shape")
        return update_batch_stats(
            stats, batch, momentum=momentum, unbiased_running_var=unbiased_running_var
        )
    return _apply_tree(stats, batch, lambda _: (momentum, unbiased_running_var))
