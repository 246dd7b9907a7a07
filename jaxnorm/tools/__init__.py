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

Layout, one purpose per module:

* :mod:`~jaxnorm.tools.layer_moments`: moments of a batch-norm input, trees of them
  keyed like ``batch_stats``, their exact merge and the one update they make;
* :mod:`~jaxnorm.tools.recording`: :func:`with_batch_moments`, which records them
  from a linen model;
* :mod:`~jaxnorm.tools.accumulate`: :func:`accumulate_gradients`;
* :mod:`~jaxnorm.tools.precise_bn`: :func:`recompute_batch_stats`;
* :mod:`~jaxnorm.tools.folding`: :func:`fold_batch_norm` and its array-level kernel.
"""

from jaxnorm.tools.accumulate import AccumulatedStep, accumulate_gradients
from jaxnorm.tools.folding import fold_batch_norm, fold_batch_norm_kernel
from jaxnorm.tools.layer_moments import (
    accumulate_moments,
    apply_accumulated,
    batch_moments,
    empty_moments,
    empty_moments_like,
)
from jaxnorm.tools.precise_bn import recompute_batch_stats
from jaxnorm.tools.recording import with_batch_moments

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
