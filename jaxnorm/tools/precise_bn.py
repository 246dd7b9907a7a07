"""Precise BN: re-estimate every batch norm's population statistics from data."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import jax
import jax.numpy as jnp

from jaxnorm.state import init_batch_stats
from jaxnorm.tools.layer_moments import (
    Path,
    _apply_tree,
    _is_layer_stats,
    accumulate_moments,
    empty_moments_like,
)
from jaxnorm.tools.recording import _recording


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
