"""Batch-norm tools: microbatch-exact running statistics, precise BN, folding.

Three jobs around a trained (or training) batch-norm model, for
:class:`jaxnorm.linen.BatchNorm` and ``flax.linen.BatchNorm`` layers:

* **Gradient accumulation with exact running statistics.** Accumulating gradients
  over ``K`` microbatches and running each through the model in training mode
  gives ``K`` momentum updates of statistics from ``1/K`` of the batch. Here each
  layer's ``(count, mean, M2)`` over the microbatches is merged exactly (Chan et
  al.) and applied once per optimizer step (:func:`accumulate_gradients`, or by
  hand with :func:`with_batch_moments`, :func:`accumulate_moments` and
  :func:`apply_accumulated`). What is exact: each layer's update is the one a
  single step would make from the pooled statistics of *all the inputs that layer
  saw* in the ``K`` microbatch passes. For a batch norm with no training-mode batch
  norm upstream (the first one, say) these are the inputs the concatenated batch
  would give it, so its update equals one step on the concatenated batch; a deeper
  one sees inputs normalized with microbatch statistics, so its update differs
  from a full-batch step. Each microbatch is *normalized* with its own statistics,
  so outputs and gradients are those of ``K`` separate small batches, not of one
  big batch.
* **Precise BN** (:func:`recompute_batch_stats`): re-estimate every layer's
  population statistics from ``K`` batches run in training mode, with an exact
  count-weighted (pooled) estimator, or the equal-weight cumulative one that
  ``torch.optim.swa_utils.update_bn`` computes.
* **Folding** (:func:`fold_batch_norm`): absorb inference-mode batch norms into
  the preceding ``Dense``/``Conv``.

Batch moments are recorded with ``flax.linen.intercept_methods``: every batch-norm
layer called in training mode reports the moments of its input, keyed by its
module path like the ``batch_stats`` tree. Nothing in the model changes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from jaxnorm import _checks, variants_linen
from jaxnorm import linen as jnn
from jaxnorm._checks import Axes
from jaxnorm.state import BatchStats, init_batch_stats, update_batch_stats
from jaxnorm.stats import AxisName, Moments, merge_moments, moments

__all__ = [
    "AccumulatedStep",
    "accumulate_gradients",
    "accumulate_moments",
    "apply_accumulated",
    "batch_moments",
    "empty_moments",
    "empty_moments_like",
    "fold_batch_norm",
    "fold_batch_norm_kernel",
    "recompute_batch_stats",
    "with_batch_moments",
]

Path = tuple[str, ...]


# --------------------------------------------------------------------------------------
# Moments of a batch-norm layer, and trees of them
# --------------------------------------------------------------------------------------


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


def accumulate_moments(acc: Any, new: Any, _path: Path = ()) -> Any:
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
    if isinstance(new, Moments):
        if not isinstance(acc, Moments):
            raise ValueError(
                f"accumulate_moments: layer {_path_str(_path)!r} has new moments but the "
                f"accumulator holds {type(acc).__name__} there; start from "
                f"empty_moments_like(batch_stats)."
            )
        if jnp.shape(acc.mean) != jnp.shape(new.mean):
            raise ValueError(
                f"accumulate_moments: layer {_path_str(_path)!r} accumulates moments of "
                f"shape {jnp.shape(acc.mean)} but got {jnp.shape(new.mean)}; each layer's "
                f"feature shape must stay the same across microbatches."
            )
        return merge_moments(acc, new)
    if not isinstance(acc, Mapping) or not isinstance(new, Mapping):
        raise TypeError(
            f"accumulate_moments: expected Moments or nested dicts of them at "
            f"{_path_str(_path)!r}; got {type(acc).__name__} and {type(new).__name__}."
        )
    out = dict(acc)
    for k, v in new.items():
        if k not in acc:
            raise ValueError(
                f"accumulate_moments: the new moments have layer "
                f"{_path_str(_path + (k,))!r}, which the accumulator lacks (it has "
                f"{sorted(acc)}); start from empty_moments_like(batch_stats)."
            )
        out[k] = accumulate_moments(acc[k], v, _path + (k,))
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


# --------------------------------------------------------------------------------------
# Recording batch moments from a Flax linen model
# --------------------------------------------------------------------------------------


def _nest(flat: Mapping[Path, Any]) -> Any:
    if () in flat:
        return flat[()]
    out: dict[str, Any] = {}
    for path, value in flat.items():
        node = out
        for p in path[:-1]:
            node = node.setdefault(p, {})
        node[path[-1]] = value
    return out


_UNSUPPORTED = (
    variants_linen.BatchRenorm,
    variants_linen.GhostBatchNorm,
    variants_linen.PowerNorm,
)


def _trains(module: Any, args: tuple, kwargs: dict) -> bool:
    call_ura = args[1] if len(args) > 1 else kwargs.get("use_running_average")
    mode = module.use_running_average if call_ura is None else call_ura
    return mode is not None and not mode


class _Recorder:
    """A method interceptor that records each training-mode batch norm's input moments."""

    def __init__(self, configs: dict[Path, tuple[float | None, bool]]):
        self.moments: dict[Path, Moments] = {}
        self.configs = configs
        self.types = (jnn.BatchNorm, nn.BatchNorm)

    def __call__(self, next_fun: Callable, args: tuple, kwargs: dict, context: Any) -> Any:
        module = context.module
        if context.method_name == "__call__" and isinstance(module, self.types):
            self._record(module, args, kwargs)
        elif context.method_name == "__call__" and isinstance(module, _UNSUPPORTED):
            if not module.is_initializing() and _trains(module, args, kwargs):
                raise NotImplementedError(
                    f"jaxnorm.tools: {type(module).__name__} at "
                    f"'/{'/'.join(str(p) for p in module.scope.path)}' trains in this call, "
                    f"but microbatch accumulation and recompute_batch_stats only handle "
                    f"BatchNorm layers, so its running statistics would silently not update. "
                    f"Use BatchNorm there, or update this layer outside these helpers."
                )
        return next_fun(*args, **kwargs)

    def _record(self, module: Any, args: tuple, kwargs: dict) -> None:
        if module.is_initializing():
            return
        x = args[0] if args else kwargs.get("x")
        call_ura = args[1] if len(args) > 1 else kwargs.get("use_running_average")
        if (module.use_running_average is None) == (call_ura is None):
            return  # the module itself refuses this call with flax's message
        use_running_average = module.use_running_average if call_ura is None else call_ura
        if use_running_average:
            return
        m = batch_moments(
            x,
            axis=module.axis,
            mask=kwargs.get("mask"),
            axis_name=module.axis_name,
            axis_index_groups=module.axis_index_groups,
        )
        path = tuple(str(p) for p in module.scope.path)
        if path in self.moments:  # a shared layer called twice: its stats see both inputs
            m = merge_moments(self.moments[path], m)
        self.moments[path] = m
        self.configs[path] = (module.momentum, bool(getattr(module, "unbiased_running_var", False)))


def _recording(fn: Callable, configs: dict[Path, tuple[float | None, bool]]) -> Callable:
    def wrapped(*args: Any, **kwargs: Any) -> tuple[Any, Any]:
        recorder = _Recorder(configs)
        with nn.intercept_methods(recorder):
            out = fn(*args, **kwargs)
        return out, _nest(recorder.moments)

    return wrapped


def with_batch_moments(fn: Callable[..., Any]) -> Callable[..., tuple[Any, Any]]:
    """Wrap ``fn`` so it also returns the batch moments of every batch norm it trains.

    ``fn`` is any function that calls a Flax linen model (``model.apply``) with its
    :class:`jaxnorm.linen.BatchNorm` or ``flax.linen.BatchNorm`` layers in training
    mode (``use_running_average=False``, ``mutable=['batch_stats']``). Each such
    layer's input moments (:func:`batch_moments` with the layer's ``axis``, ``mask``
    and ``axis_name``) are recorded under the layer's module path, so the moments
    tree nests like ``batch_stats``. A layer called twice reports both inputs merged;
    layers in evaluation mode report nothing. Works under ``jit``, ``grad``
    (as auxiliary output) and ``lax.scan``.

    Args:
      fn: the function to wrap.

    Returns:
      ``wrapped(*args, **kwargs) -> (fn(*args, **kwargs), moments_tree)``.

    Example:
      >>> import jax, jax.numpy as jnp, jaxnorm.linen as jnn
      >>> from jaxnorm.tools import with_batch_moments
      >>> bn = jnn.BatchNorm(use_running_average=False)
      >>> x = jnp.arange(6.0).reshape(3, 2)
      >>> v = bn.init(jax.random.key(0), x)
      >>> (_, _), m = with_batch_moments(bn.apply)(v, x, mutable=['batch_stats'])
      >>> m.mean.tolist()
      [2.0, 3.0]
    """
    return _recording(fn, {})


class AccumulatedStep(NamedTuple):
    """Result of :func:`accumulate_gradients` (a pytree)."""

    loss: jax.Array  # shape=(), float: mean of the K microbatch losses
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

    init = (
        jnp.zeros((), jnp.float32),
        jax.tree.map(jnp.zeros_like, params),
        empty_moments_like(batch_stats),
    )
    (loss_sum, grad_sum, acc), aux = lax.scan(body, init, microbatches)
    new_stats = _apply_tree(batch_stats, acc, configs.get)
    grads = jax.tree.map(lambda g: g / k, grad_sum)
    return AccumulatedStep(loss_sum / k, grads, new_stats, aux if has_aux else None)


# --------------------------------------------------------------------------------------
# Precise BN
# --------------------------------------------------------------------------------------


def _fresh_like(batch_stats: Any) -> Any:
    if _is_layer_stats(batch_stats):
        s = init_batch_stats(jnp.shape(batch_stats["mean"]))
        return {"mean": s.mean, "var": s.var, "count": s.count}
    return {k: _fresh_like(v) for k, v in batch_stats.items() if isinstance(v, Mapping)}


def _write_back(old: Any, new: Any, recorded: set[Path], path: Path = ()) -> Any:
    if _is_layer_stats(old):
        if path not in recorded:
            return old
        out = dict(old)
        out["mean"] = new["mean"].astype(jnp.result_type(old["mean"]))
        out["var"] = new["var"].astype(jnp.result_type(old["var"]))
        if "count" in old:
            out["count"] = new["count"].astype(jnp.result_type(old["count"]))
        return out
    return {
        k: _write_back(v, new[k], recorded, path + (k,)) if isinstance(v, Mapping) else v
        for k, v in old.items()
    }


def recompute_batch_stats(
    apply_fn: Callable[[Any, Any], Any],
    variables: Mapping[str, Any],
    batches: Iterable[Any],
    *,
    estimator: str = "pooled",
) -> dict[str, Any]:
    """Precise BN: re-estimate every batch norm's population statistics from data.

    Each batch goes through ``apply_fn`` in training mode (so every layer sees the
    inputs it sees in training, upstream layers normalized with batch statistics);
    each batch-norm layer's input moments ``(n_k, mu_k, M2_k)`` are recorded
    (:func:`with_batch_moments`) and, over the ``K`` batches, combined by

    * ``estimator='pooled'`` (default): the exact statistics of all
      ``N = sum_k n_k`` values the layer saw, count-weighted (Chan merge):

      .. math::

          \\mu = \\frac{1}{N}\\sum_k n_k\\mu_k,\\quad
          M_2 = \\sum_k \\big(M_{2,k} + n_k(\\mu_k-\\mu)^2\\big),\\quad
          \\sigma^2 = M_2/N \\;\\text{or}\\; M_2/(N-1)

      (``N - 1`` for layers with ``unbiased_running_var``).
    * ``estimator='cumulative'``: the equal-weight average of per-batch statistics,
      which ``momentum=None`` training steps from fresh statistics give and which
      ``torch.optim.swa_utils.update_bn`` computes (for the torch preset,
      ``unbiased_running_var=True``):

      .. math::

          \\mu = \\frac{1}{K}\\sum_k \\mu_k,\\quad
          \\sigma^2 = \\frac{1}{K}\\sum_k \\frac{M_{2,k}}{n_k - 1}
          \\;\\text{(or } M_{2,k}/n_k\\text{)}.

    With equal batch sizes the means agree; the variances differ by the spread of
    the batch means: pooled ``M2/N`` = mean of the biased batch variances + variance
    of the batch means, whereas the cumulative estimate replaces that between-batch
    term by the Bessel factor ``n/(n-1)``. Both are about unbiased for i.i.d.
    batches; the pooled one also counts real drift between batches, and weights
    each value (not each batch) equally when sizes differ.

    ``count`` (where the layer keeps one) becomes ``K``, as torch's
    ``num_batches_tracked`` after ``update_bn``. Layers that no batch trained keep
    their statistics; ``params`` are untouched.

    Args:
      apply_fn: ``apply_fn(variables, batch)`` running the model in training mode,
        e.g. ``lambda v, x: model.apply(v, x, train=True, mutable=['batch_stats'])``
        (its outputs and updates are discarded). It is jitted here.
      variables: the model's variables, with a ``batch_stats`` collection.
      batches: an iterable of batches (any pytrees ``apply_fn`` takes); each shape
        traces once.
      estimator: ``'pooled'`` or ``'cumulative'`` (see above).

    Returns:
      ``variables`` with ``batch_stats`` replaced by the re-estimated statistics.

    Raises:
      ValueError: an unknown ``estimator``, no ``batch_stats``, or no batches.

    References:
      Wu & Johnson (2021), "Rethinking 'Batch' in BatchNorm" (precise BN);
      Izmailov et al. (2018), "Averaging Weights Leads to Wider Optima and Better
      Generalization" (``update_bn``).
    """
    fn = "recompute_batch_stats"
    if estimator not in ("pooled", "cumulative"):
        raise ValueError(
            f"{fn}: estimator must be 'pooled' (exact statistics of all values) or "
            f"'cumulative' (equal-weight average of batches, torch's update_bn); got "
            f"{estimator!r}."
        )
    if "batch_stats" not in variables:
        raise ValueError(
            f"{fn}: variables have no 'batch_stats' collection (they have "
            f"{sorted(variables)}); pass the full variables of a model with BatchNorm."
        )
    old = variables["batch_stats"]
    configs: dict[Path, tuple[float | None, bool]] = {}
    recorded = _recording(apply_fn, configs)

    @jax.jit
    def step(state: Any, v: Any, batch: Any) -> Any:
        pooled, cumulative = state
        _, m = recorded(v, batch)
        pooled = accumulate_moments(pooled, m)
        cumulative = _apply_tree(
            cumulative, m, lambda p: None if p not in configs else (None, configs[p][1])
        )
        return pooled, cumulative

    state = (empty_moments_like(old), _fresh_like(old))
    num_batches = 0
    for batch in batches:
        state = step(state, variables, batch)
        num_batches += 1
    if num_batches == 0:
        raise ValueError(f"{fn}: batches is empty; pass at least one batch.")
    pooled, cumulative = state
    if estimator == "pooled":
        count = jnp.asarray(num_batches, jnp.int32)

        def finish(p: Path) -> tuple[float, bool] | None:
            return None if p not in configs else (0.0, configs[p][1])

        new = _set_counts(_apply_tree(_fresh_like(old), pooled, finish), count)
    else:
        new = cumulative
    out = dict(variables)
    out["batch_stats"] = _write_back(old, new, set(configs))
    return out


def _set_counts(tree: Any, count: jax.Array) -> Any:
    if _is_layer_stats(tree):
        return {**tree, "count": count}
    return {k: _set_counts(v, count) for k, v in tree.items()}


# --------------------------------------------------------------------------------------
# Folding
# --------------------------------------------------------------------------------------


def fold_batch_norm_kernel(
    kernel: jax.Array,
    bias: jax.Array | None,
    mean: jax.Array,
    var: jax.Array,
    scale: jax.Array | None = None,
    beta: jax.Array | None = None,
    *,
    epsilon: float,
) -> tuple[jax.Array, jax.Array]:
    """Fold an inference-mode batch norm into the preceding layer's kernel and bias.

    For ``y = BN(x @ W + b)`` with running ``mean``/``var``, ``gamma = scale`` and
    ``beta``, on the output-feature (last) axis of ``W``:

    .. math::

        m = \\gamma / \\sqrt{\\mathrm{var} + \\epsilon},\\quad
        W' = W \\cdot m,\\quad b' = (b - \\mathrm{mean})\\,m + \\beta

    so ``x @ W' + b' == BN(x @ W + b)``. Works for any Flax kernel whose last axis
    is the output features (``Dense (I, O)``, ``Conv (*k, I/g, O)``). Computed in at
    least float32 and returned in the kernel's dtype.

    Args:
      kernel: the layer's kernel, output features last.
      bias: the layer's bias ``(O,)``, or ``None`` (``use_bias=False``: zero).
      mean: running mean ``(O,)``.
      var: running variance ``(O,)``.
      scale: ``gamma`` ``(O,)``, or ``None`` (``use_scale=False``: one).
      beta: the batch norm's bias ``(O,)``, or ``None`` (zero).
      epsilon: the batch norm's epsilon (must match the layer's).

    Returns:
      ``(kernel', bias')``.

    Raises:
      ValueError: statistics or affine parameters not of shape ``(O,)``.
    """
    fn = "fold_batch_norm_kernel"
    _checks.check_floating(fn, kernel, "kernel")
    _checks.check_epsilon(fn, epsilon)
    out = (jnp.shape(kernel)[-1],) if jnp.ndim(kernel) else ()
    hint = (
        f"the output features (last axis) of the kernel {tuple(jnp.shape(kernel))}; the "
        f"batch norm must normalize this layer's outputs on their last axis"
    )
    for name, value in (("bias", bias), ("mean", mean), ("var", var)):
        _checks.check_param_shape(fn, name, value, out, hint)
    _checks.check_param_shape(fn, "scale", scale, out, hint)
    _checks.check_param_shape(fn, "beta", beta, out, hint)
    sd = jnp.promote_types(jnp.result_type(kernel), jnp.float32)
    mul = lax.rsqrt(jnp.asarray(var, sd) + epsilon)
    if scale is not None:
        mul = mul * jnp.asarray(scale, sd)
    b = jnp.zeros(out, sd) if bias is None else jnp.asarray(bias, sd)
    new_bias = (b - jnp.asarray(mean, sd)) * mul
    if beta is not None:
        new_bias = new_bias + jnp.asarray(beta, sd)
    new_kernel = jnp.asarray(kernel, sd) * mul
    bias_dtype = jnp.result_type(kernel) if bias is None else jnp.result_type(bias)
    return new_kernel.astype(jnp.result_type(kernel)), new_bias.astype(bias_dtype)


def _split(path: str | Sequence[str]) -> Path:
    if isinstance(path, str):
        return tuple(p for p in path.split("/") if p)
    return tuple(str(p) for p in path)


def _lookup(tree: Any, path: Path) -> Any:
    for p in path:
        if not isinstance(tree, Mapping) or p not in tree:
            return None
        tree = tree[p]
    return tree


def _copy(tree: Any) -> Any:
    return {k: _copy(v) for k, v in tree.items()} if isinstance(tree, Mapping) else tree


def _delete(tree: dict, path: Path) -> None:
    """Delete ``path`` and any parents it leaves empty."""
    if len(path) == 1:
        tree.pop(path[0], None)
        return
    child = tree.get(path[0])
    if isinstance(child, dict):
        _delete(child, path[1:])
        if not child:
            del tree[path[0]]


def fold_batch_norm(
    variables: Mapping[str, Any],
    pairs: Mapping[str, str],
    *,
    epsilon: float | Mapping[str, float] = 1e-5,
) -> dict[str, Any]:
    """Params of the model with each inference-mode batch norm folded into its producer.

    For every ``{layer: batch_norm}`` pair -- a ``Dense``/``Conv`` whose output goes
    straight (no activation in between) into a batch norm over its last axis --
    the layer's kernel and bias become :func:`fold_batch_norm_kernel`'s
    ``W' = W m``, ``b' = (b - mean) m + beta`` with ``m = gamma/sqrt(var + eps)``, and
    the batch norm's ``params`` are dropped. The result is the ``params`` of the
    same architecture without those batch norms, every paired layer with a bias
    (``use_bias=True``); with ``@nn.compact`` auto-naming, removing the
    ``BatchNorm`` modules leaves the ``Conv_i``/``Dense_i`` names unchanged.

    Args:
      variables: ``{'params': ..., 'batch_stats': ...}`` of the trained model.
      pairs: ``{layer_path: batch_norm_path}``, paths like ``'Block_0/Conv_0'``.
      epsilon: the batch norms' epsilon; a float for all, or ``{batch_norm_path: eps}``.

    Returns:
      The folded ``params`` tree (the input is not modified).

    Raises:
      ValueError: a path that does not exist, a layer without a kernel, a batch norm
        without running statistics, or shapes that do not fit.

    Example:
      >>> import jax, jax.numpy as jnp, flax.linen as nn, jaxnorm.linen as jnn
      >>> from jaxnorm.tools import fold_batch_norm
      >>> class Net(nn.Module):
      ...     bn: bool = True
      ...     @nn.compact
      ...     def __call__(self, x):
      ...         x = nn.Dense(3)(x)
      ...         return jnn.BatchNorm(use_running_average=True)(x) if self.bn else x
      >>> x = jnp.ones((2, 4))
      >>> v = Net().init(jax.random.key(0), x)
      >>> folded = fold_batch_norm(v, {'Dense_0': 'BatchNorm_0'})
      >>> y = Net(bn=False).apply({'params': folded}, x)
      >>> bool(jnp.allclose(y, Net().apply(v, x), atol=1e-6))
      True
    """
    fn = "fold_batch_norm"
    params = _copy(variables.get("params", {}))
    stats = variables.get("batch_stats", {})
    for layer_path, bn_path in pairs.items():
        lp, bp = _split(layer_path), _split(bn_path)
        layer = _lookup(params, lp)
        if not isinstance(layer, Mapping) or "kernel" not in layer:
            raise ValueError(
                f"{fn}: params have no kernel at {layer_path!r}; pairs map a Dense/Conv path "
                f"(with a 'kernel') to the batch norm that follows it."
            )
        bn_stats = _lookup(stats, bp)
        if not _is_layer_stats(bn_stats):
            raise ValueError(
                f"{fn}: batch_stats have no running mean/var at {bn_path!r}; pairs map a "
                f"layer to a BatchNorm path, and variables must include 'batch_stats'."
            )
        bn_params = _lookup(variables.get("params", {}), bp) or {}
        eps = epsilon[bn_path] if isinstance(epsilon, Mapping) else epsilon
        kernel, bias = fold_batch_norm_kernel(
            layer["kernel"],
            layer.get("bias"),
            bn_stats["mean"],
            bn_stats["var"],
            bn_params.get("scale"),
            bn_params.get("bias"),
            epsilon=eps,
        )
        layer["kernel"], layer["bias"] = kernel, bias
        _delete(params, bp)
    return params
