"""Batch-norm variants: batch renormalization, PowerNorm, ghost and frozen batch norm.

Pure functions with explicit state, like :func:`jaxnorm.batch_norm`: every one takes
its running statistics and returns new ones, hyperparameters are keyword-only, and
``training`` has no default. Statistics come from :mod:`jaxnorm.stats` in
``promote(x.dtype, float32)``; outputs have ``x``'s dtype unless ``dtype`` says
otherwise. ``axis`` names the kept *feature* axes, as in :func:`jaxnorm.batch_norm`;
every other axis is reduced.

* :func:`batch_renorm` (Ioffe, 2017) corrects the batch statistics towards the
  running ones by the stop-gradient factors ``r`` and ``d``; state :class:`BatchStats`.
* :func:`power_norm` (Shen et al., 2020) divides by a *running* quadratic mean, with an
  approximate backward pass that carries a running gradient statistic; state
  :class:`PowerNormStats`.
* :func:`ghost_batch_norm` (Hoffer et al., 2017) normalizes each virtual sub-batch of
  the batch axis by its own statistics; state :class:`BatchStats`.
* :func:`frozen_batch_norm` normalizes with the running statistics whatever the mode
  (fine-tuning with frozen statistics); state :class:`BatchStats`, returned unchanged.
"""

from jaxnorm.variants.frozen import frozen_batch_norm
from jaxnorm.variants.ghost import ghost_batch_norm
from jaxnorm.variants.power import (
    PowerNormStats,
    init_power_norm_stats,
    power_norm,
    update_power_norm_grad_stat,
)
from jaxnorm.variants.renorm import batch_renorm, renorm_schedule

__all__ = [
    "PowerNormStats",
    "batch_renorm",
    "frozen_batch_norm",
    "ghost_batch_norm",
    "init_power_norm_stats",
    "power_norm",
    "renorm_schedule",
    "update_power_norm_grad_stat",
]
