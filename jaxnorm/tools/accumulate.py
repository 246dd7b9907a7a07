"""Gradient accumulation over microbatches with one exact running-statistics update."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from jaxnorm.stats import Moments
from jaxnorm.tools.layer_moments import (
    Path,
    _apply_tree,
    accumulate_moments,
    empty_moments_like,
)
from jaxnorm.tools.recording import _recording


class AccumulatedStep(NamedTuple):
    """Result of :func:`accumulate_gradients` (a pytree, usable as a ``jit`` output).

    Attributes:
      loss: shape ``()``, the loss dtype promoted to at least float32: the mean of
        the ``K`` microbatch losses, :math:`\\frac{1}{K}\\sum_k L_k`.
      grads: shaped like ``params``: the mean of the ``K`` microbatch gradients,
        :math:`\\frac{1}{K}\\sum_k \\nabla L_k` (each microbatch normalized with its
        own batch statistics).
      batch_stats: shaped and typed like the ``batch_stats`` passed in: each
        training-mode batch norm updated once from the pooled moments of the inputs
        it saw over the ``K`` microbatches; other layers unchanged.
      aux: ``loss_fn``'s auxiliary output with a leading axis of size ``K`` (one
        entry per microbatch), or ``None`` without ``has_aux``.
    """

    loss: jax.Array  # shape=(), >= float32: mean of the K microbatch losses
    grads: Any  # params-shaped: mean of the K microbatch gradients
    batch_stats: Any  # batch_stats-shaped: one exact update from the merged moments
    aux: Any  # loss_fn's auxiliary output stacked over K (leading axis), or None


def accumulate_gradients(
    loss_fn: Callable[..., Any],
    params: Any,
    batch_stats: Any,
    microbatches: Any,
    *,
    has_aux: bool = False,
) -> AccumulatedStep:
    """Gradient accumulation over ``K`` microbatches with one exact running-stats update.

    A ``lax.scan`` over the leading axis of ``microbatches`` computes each
    microbatch's loss and gradient and merges every training-mode batch norm's input
    moments (:func:`with_batch_moments`, :func:`accumulate_moments`); afterwards each
    layer's running statistics get *one* update from the merged moments, with the
    layer's own ``momentum`` and ``unbiased_running_var``
    (:func:`apply_accumulated`):

    .. math::

        \\text{new}_\\ell = \\alpha\\,\\text{old}_\\ell + (1-\\alpha)\\,
        \\text{stat}\\Big(\\bigcup_{k=1}^{K} x_{\\ell,k}\\Big)

    where :math:`x_{\\ell,k}` is the input layer :math:`\\ell` saw in microbatch
    :math:`k`'s forward pass, instead of ``K`` updates at ``1/K`` of the batch size.
    This pooled statistic is exact (the Chan merge of ``(count, mean, M2)``). It is
    the update of one training step on the concatenated batch only for layers whose
    inputs do not depend on how the batch is split: a batch norm with no
    training-mode batch norm upstream (e.g. the first). A deeper batch norm's inputs
    were normalized upstream with each microbatch's statistics, not the full
    batch's, so its update differs from a full-batch step (but is exact for the
    values it saw). Likewise each microbatch is normalized with its own batch
    statistics, so the loss and gradients are the mean over ``K`` small batches
    (with a mean-reduced loss and equal microbatches, plain gradient accumulation),
    not those of one large batch.

    Args:
      loss_fn: ``loss_fn(params, batch_stats, microbatch) -> loss`` (or
        ``(loss, aux)`` with ``has_aux``): runs the model in training mode, e.g.
        ``model.apply({'params': params, 'batch_stats': batch_stats}, x, train=True,
        mutable=['batch_stats'])``, and discards the returned ``batch_stats`` updates.
      params: differentiated parameters.
      batch_stats: the model's ``batch_stats`` collection (constant during the scan).
      microbatches: a pytree whose leaves all have a leading axis of size ``K >= 1``
        (per-microbatch randomness, e.g. dropout keys, can ride along in it).
      has_aux: ``loss_fn`` returns ``(loss, aux)``; the ``aux`` are stacked.

    Returns:
      :class:`AccumulatedStep` ``(loss, grads, batch_stats, aux)``: mean loss, mean
      gradients, updated ``batch_stats``, stacked aux (or ``None``).

    Raises:
      ValueError: leaves of ``microbatches`` disagree on (or lack) the leading axis.
    """
    fn = "accumulate_gradients"
    leaves = jax.tree.leaves(microbatches)
    sizes = {jnp.shape(leaf)[0] if jnp.ndim(leaf) else None for leaf in leaves}
    if not leaves or len(sizes) != 1 or None in sizes or 0 in sizes:
        raise ValueError(
            f"{fn}: microbatches must be a pytree whose leaves share a leading axis of "
            f"size K >= 1 (the microbatch index); got leading sizes "
            f"{sorted(map(str, sizes))}. Reshape a batch of B examples with "
            f"x.reshape(K, B // K, *x.shape[1:])."
        )
    (k,) = sizes
    configs: dict[Path, tuple[float | None, bool]] = {}
    recorded = _recording(loss_fn, configs)

    def value(p: Any, mb: Any) -> tuple[jax.Array, tuple[Any, Any]]:
        out, batch = recorded(p, batch_stats, mb)
        loss, aux = out if has_aux else (out, None)
        return loss, (aux, batch)

    grad_fn = jax.value_and_grad(value, has_aux=True)

    def body(carry: Any, mb: Any) -> tuple[Any, Any]:
        loss_sum, grad_sum, acc = carry
        (loss, (aux, batch)), grads = grad_fn(params, mb)
        grad_sum = jax.tree.map(jnp.add, grad_sum, grads)
        return (loss_sum + loss, grad_sum, accumulate_moments(acc, batch)), aux

    # The carry takes the dtypes a microbatch produces (float64 moments and loss under
    # x64 with float64 data), found by tracing one abstractly: nothing is computed.
    loss_t, (_, moments_t), grads_t = _result_types(grad_fn, params, microbatches)
    init = (
        jnp.zeros((), jnp.promote_types(loss_t.dtype, jnp.float32)),
        jax.tree.map(lambda t: jnp.zeros(t.shape, t.dtype), grads_t),
        _empty_as(empty_moments_like(batch_stats), moments_t),
    )
    (loss_sum, grad_sum, acc), aux = lax.scan(body, init, microbatches)
    new_stats = _apply_tree(batch_stats, acc, configs.get)
    grads = jax.tree.map(lambda g: g / k, grad_sum)
    return AccumulatedStep(loss_sum / k, grads, new_stats, aux if has_aux else None)


def _result_types(grad_fn: Callable[..., Any], params: Any, microbatches: Any) -> Any:
    """``(loss, (aux, moments), grads)`` shapes and dtypes of the first microbatch."""

    def first(p: Any, mbs: Any) -> Any:
        (loss, aux_moments), grads = grad_fn(p, jax.tree.map(lambda leaf: leaf[0], mbs))
        return loss, aux_moments, grads

    return jax.eval_shape(first, params, microbatches)


def _empty_as(acc: Any, types: Any) -> Any:
    """Empty moments ``acc``, in the dtypes of the recorded ``types`` where it has them."""
    if isinstance(types, Moments) and isinstance(acc, Moments):
        return Moments(*(jnp.zeros(jnp.shape(a), t.dtype) for a, t in zip(acc, types, strict=True)))
    if isinstance(types, Mapping) and isinstance(acc, Mapping):
        return {k: _empty_as(v, types[k]) if k in types else v for k, v in acc.items()}
    return acc  # a mismatch: accumulate_moments names it
