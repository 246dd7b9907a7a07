"""Frozen batch norm: the running statistics in every mode."""

from __future__ import annotations

from typing import Any

import jax

from jaxnorm import _checks
from jaxnorm._checks import Axes
from jaxnorm.functional import batch_norm
from jaxnorm.state import BatchStats
from jaxnorm.variants._common import (
    _layout,
)

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
