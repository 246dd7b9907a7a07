"""Linen layers for the batch-norm variants of :mod:`jaxnorm.variants`.

Each is :class:`jaxnorm.linen._base._BatchNormBase` (BatchNorm's fields, mode,
variables, errors and store) plus its own fields and its call of :mod:`jaxnorm.variants`
(from :mod:`jaxnorm._layer_calls`), where every number comes from. The variable trees follow
``jaxnorm.linen.BatchNorm`` (and flax's): ``params/{scale, bias}`` of the feature shape
and float32 ``batch_stats/{...}``.

* :class:`BatchRenorm` — :func:`jaxnorm.variants.batch_renorm`; ``batch_stats/{mean,
  var, count}`` (``count`` drives the optional warm-up schedule).
* :class:`PowerNorm` — :func:`jaxnorm.variants.power_norm`; ``batch_stats/{mean_square,
  grad_stat, count}``. ``grad_stat`` is updated from the *gradient* with respect to
  ``batch_stats``: see :func:`update_grad_stats`.
* :class:`GhostBatchNorm` — :func:`jaxnorm.variants.ghost_batch_norm`; the variables
  of ``BatchNorm`` (``batch_stats/{mean, var}``), so checkpoints move between the two.
* :class:`FrozenBatchNorm` — :func:`jaxnorm.variants.frozen_batch_norm`; the variables
  of ``BatchNorm``, never updated, no ``mutable`` needed.

As in ``jaxnorm.linen.BatchNorm``: ``use_running_average`` is a field or a call
argument (exactly one), ``init`` does not update the statistics, training without
``mutable=['batch_stats']`` and evaluating without ``batch_stats`` raise errors that
say what to pass, and the core's errors are prefixed with the module's path.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.typing import Dtype, Initializer
from jax.nn import initializers

from jaxnorm._checks import Axes
from jaxnorm._layer_calls import (
    BatchRenormCall,
    FrozenBatchNormCall,
    GhostBatchNormCall,
    PowerNormCall,
    stats_for_input,
)
from jaxnorm.linen._base import _BatchNormBase, _Layer
from jaxnorm.state import init_batch_stats
from jaxnorm.variants import PowerNormStats, init_power_norm_stats, update_power_norm_grad_stat

__all__ = ["BatchRenorm", "FrozenBatchNorm", "GhostBatchNorm", "PowerNorm", "update_grad_stats"]


class BatchRenorm(BatchRenormCall, _BatchNormBase):
    """Batch renormalization (Ioffe, 2017); numbers from :func:`jaxnorm.variants.batch_renorm`.

    .. math::

        y = \\Big(\\frac{x - \\mu_B}{\\sigma_B}\\,r + d\\Big)\\gamma + \\beta,\\quad
        r = \\mathrm{sg}(\\mathrm{clip}(\\sigma_B/\\sigma, 1/r_{\\max}, r_{\\max})),\\quad
        d = \\mathrm{sg}(\\mathrm{clip}((\\mu_B - \\mu)/\\sigma, -d_{\\max}, d_{\\max}))

    in training; ``(x - mu)/sigma * gamma + beta`` in evaluation. With
    ``warmup_steps`` set, the limits follow :func:`jaxnorm.variants.renorm_schedule`
    at step ``batch_stats/count`` (the number of training updates so far).

    Variables: ``params/{scale, bias}``, ``batch_stats/{mean, var}`` (float32, feature
    shape, as ``BatchNorm``) and ``batch_stats/count`` (int32 scalar).

    Attributes:
      use_running_average: ``True`` to normalize with the stored statistics; may
        instead be passed to ``__call__`` (exactly one of the two, as in flax).
      axis: the feature axis or axes (kept); all others are reduced.
      momentum: weight of the old running value in [0, 1] (torch's 0.1 is our 0.9).
      epsilon: added to the variance.
      dtype: output dtype; ``None`` keeps the input's dtype.
      param_dtype: dtype of ``scale``/``bias``.
      use_bias: add a learned ``bias`` (beta).
      use_scale: multiply by a learned ``scale`` (gamma).
      bias_init: initializer for ``bias``.
      scale_init: initializer for ``scale``.
      axis_name: named axis of ``shard_map``/``pmap``/``vmap`` over which the batch
        is split.
      axis_index_groups: device groups for the cross-device reduction.
      r_max: clip limit of ``r`` (>= 1), or its final value under the schedule.
      d_max: clip limit of ``d`` (>= 0), or its final value under the schedule.
      warmup_steps: ``None`` for fixed limits; else steps of plain batch norm before
        the ramp of :func:`jaxnorm.variants.renorm_schedule`.
      r_relax_steps: length of the ``r_max`` ramp (with ``warmup_steps``).
      d_relax_steps: length of the ``d_max`` ramp (with ``warmup_steps``).
      unbiased_running_var: store the Bessel-corrected batch variance (torch's).

    Example:
      >>> import jax, jaxnorm.variants_linen as vnn
      >>> x = jax.random.normal(jax.random.key(0), (8, 3))
      >>> layer = vnn.BatchRenorm(use_running_average=False, warmup_steps=100)
      >>> variables = layer.init(jax.random.key(1), x)
      >>> y, updates = layer.apply(variables, x, mutable=["batch_stats"])
      >>> sorted(updates["batch_stats"]), int(updates["batch_stats"]["count"])
      (['count', 'mean', 'var'], 1)
    """

    momentum: float = 0.99  # no None (torch's cumulative average) here
    r_max: float = 3.0
    d_max: float = 5.0
    warmup_steps: int | None = None
    r_relax_steps: int = 35_000
    d_relax_steps: int = 20_000
    unbiased_running_var: bool = False


class PowerNorm(PowerNormCall, _BatchNormBase):
    """PowerNorm (Shen et al., 2020); numbers from :func:`jaxnorm.variants.power_norm`.

    .. math::

        y = \\gamma\\,\\frac{x}{\\sqrt{\\psi^2 + \\epsilon}} + \\beta

    with ``psi**2`` the *running* quadratic mean (the previous step's in training,
    updated after use), and the paper's approximate backward pass in training.

    Variables: ``params/{scale, bias}`` and ``batch_stats/{mean_square, grad_stat,
    count}`` (float32 feature shape; int32 scalar). ``mean_square`` and ``count`` come
    back in the ``mutable=['batch_stats']`` updates as usual. ``grad_stat`` (the
    paper's ``nu``) can only be computed in the backward pass: it arrives as the
    gradient with respect to ``batch_stats``, which :func:`update_grad_stats` adds::

        def loss_fn(params, batch_stats):
            y, updates = model.apply({"params": params, "batch_stats": batch_stats}, x,
                                     mutable=["batch_stats"])
            return loss(y), updates["batch_stats"]

        (g_params, g_stats), new_stats = jax.grad(
            loss_fn, argnums=(0, 1), has_aux=True, allow_int=True)(params, batch_stats)
        batch_stats = update_grad_stats(new_stats, g_stats)

    Without that, ``grad_stat`` stays 0 and the backward pass is ``dL/dx_hat / psi``.

    Attributes:
      use_running_average: ``True`` to normalize with the stored statistics; may
        instead be passed to ``__call__`` (exactly one of the two, as in flax).
      axis: the feature axis or axes (kept); all others are reduced.
      momentum: weight of the old ``mean_square`` in [0, 1] (the paper's ``alpha``).
      epsilon: added to ``psi**2``.
      dtype: output dtype; ``None`` keeps the input's dtype.
      param_dtype: dtype of ``scale``/``bias``.
      use_bias: add a learned ``bias`` (beta).
      use_scale: multiply by a learned ``scale`` (gamma).
      bias_init: initializer for ``bias``.
      scale_init: initializer for ``scale``.
      axis_name: named axis of ``shard_map``/``pmap``/``vmap`` over which the batch
        is split.
      axis_index_groups: device groups for the cross-device reduction.
      grad_momentum: momentum of the ``grad_stat`` update; ``None``: ``momentum``.

    Example:
      >>> import jax, jaxnorm.variants_linen as vnn
      >>> x = jax.random.normal(jax.random.key(0), (2, 5, 3))
      >>> layer = vnn.PowerNorm(use_running_average=False)
      >>> variables = layer.init(jax.random.key(1), x)
      >>> sorted(variables["batch_stats"])
      ['count', 'grad_stat', 'mean_square']
    """

    momentum: float = 0.9
    grad_momentum: float | None = None

    @nn.nowrap
    def _fresh_stats(self, feature_shape: tuple[int, ...]) -> PowerNormStats:
        return init_power_norm_stats(feature_shape)

    @nn.nowrap
    def _init_trains(self, x: jax.Array, feature_shape: tuple[int, ...]) -> bool:
        return True  # training normalizes with the running statistics: any batch will do


def update_grad_stats(batch_stats: Mapping[str, Any], batch_stats_grads: Mapping[str, Any]):
    """Add the backward pass's ``grad_stat`` increments to every PowerNorm's statistics.

    Walks the (nested) ``batch_stats`` collection; wherever a layer holds
    ``{mean_square, grad_stat, count}``, its ``grad_stat`` becomes
    :func:`jaxnorm.variants.update_power_norm_grad_stat` of the matching gradient.
    Everything else is returned unchanged.

    Args:
      batch_stats: the ``batch_stats`` collection after the step (the ``mutable``
        updates returned by ``apply``).
      batch_stats_grads: the gradient of the loss with respect to the ``batch_stats``
        passed to ``apply`` (same tree; e.g. ``jax.grad(..., allow_int=True)``).

    Returns:
      The new ``batch_stats`` collection (a plain dict tree).
    """
    if set(PowerNormStats._fields) <= set(batch_stats):
        stats = PowerNormStats(*(batch_stats[f] for f in PowerNormStats._fields))
        new = update_power_norm_grad_stat(stats, batch_stats_grads["grad_stat"])
        return {**batch_stats, "grad_stat": new.grad_stat}
    return {
        key: update_grad_stats(value, batch_stats_grads[key])
        if isinstance(value, Mapping)
        else value
        for key, value in batch_stats.items()
    }


class _VirtualBatchSize(nn.Module):
    """GhostBatchNorm's first, positional field (dataclass fields of a later base come
    first, so ``GhostBatchNorm(4, ...)`` keeps meaning ``virtual_batch_size=4``)."""

    virtual_batch_size: int


class GhostBatchNorm(GhostBatchNormCall, _BatchNormBase, _VirtualBatchSize):
    """Ghost batch norm (Hoffer et al., 2017); via :func:`jaxnorm.variants.ghost_batch_norm`.

    In training, each block of ``virtual_batch_size`` consecutive examples (axis 0) is
    batch-normalized by its own statistics; the running statistics are updated once
    per call with the exact moments of the whole batch, so they are what
    ``BatchNorm`` would store. Evaluation is ``BatchNorm``'s.

    Variables: exactly ``jaxnorm.linen.BatchNorm``'s (``params/{scale, bias}``,
    ``batch_stats/{mean, var}``, plus ``batch_stats/count`` only when ``momentum is
    None`` or ``track_count``), so checkpoints move between the two.

    Attributes:
      virtual_batch_size: examples per virtual batch; must divide the batch size.
      use_running_average: ``True`` to normalize with the stored statistics; may
        instead be passed to ``__call__`` (exactly one of the two, as in flax).
      axis: the feature axis or axes (kept); all others are reduced.
      momentum: weight of the old running value in [0, 1] (torch's 0.1 is our 0.9).
      epsilon: added to the variance.
      dtype: output dtype; ``None`` keeps the input's dtype.
      param_dtype: dtype of ``scale``/``bias``.
      use_bias: add a learned ``bias`` (beta).
      use_scale: multiply by a learned ``scale`` (gamma).
      bias_init: initializer for ``bias``.
      scale_init: initializer for ``scale``.
      axis_name: named axis across which the running-statistics update is merged
        (the normalization stays per virtual batch).
      axis_index_groups: device groups for that merge.
      unbiased_running_var: store the Bessel-corrected variance (torch's convention).
      track_count: keep ``batch_stats/count`` even with a numeric ``momentum``.
      skip_nonfinite: leave the running statistics of a feature whose batch statistics
        are NaN/Inf unchanged (NaN/Inf still propagate to the output).

    Example:
      >>> import jax, jaxnorm.variants_linen as vnn
      >>> x = jax.random.normal(jax.random.key(0), (8, 3))
      >>> layer = vnn.GhostBatchNorm(4, use_running_average=False)
      >>> variables = layer.init(jax.random.key(1), x)
      >>> y, updates = layer.apply(variables, x, mutable=["batch_stats"])
      >>> y.shape
      (8, 3)
    """

    unbiased_running_var: bool = False
    track_count: bool = False
    skip_nonfinite: bool = False

    @nn.nowrap
    def _tracks_count(self) -> bool:
        return self.momentum is None or self.track_count

    @nn.nowrap
    def _init_trains(self, x: jax.Array, feature_shape: tuple[int, ...]) -> bool:
        return False  # init only creates variables: no virtual-batch checks on its x


class FrozenBatchNorm(FrozenBatchNormCall, _Layer):
    """Batch norm with frozen statistics; via :func:`jaxnorm.variants.frozen_batch_norm`.

    ``y = (x - mean) / sqrt(var + epsilon) * scale + bias`` with the stored running
    statistics in every mode: for fine-tuning, where ``scale``/``bias`` (and the
    layers around) train but the statistics stay. Variables are exactly
    ``jaxnorm.linen.BatchNorm``'s (``params/{scale, bias}``, ``batch_stats/{mean,
    var}``), so a trained BatchNorm's variables load unchanged; ``batch_stats`` is
    never written, so no ``mutable`` is needed. ``use_running_average`` and ``mask``
    are accepted, so that it replaces a ``BatchNorm`` call unchanged, and ignored.

    Attributes:
      axis: the feature axis or axes (kept).
      epsilon: added to the variance.
      dtype: output dtype; ``None`` keeps the input's dtype.
      param_dtype: dtype of ``scale``/``bias``.
      use_bias: add a learned ``bias``.
      use_scale: multiply by a learned ``scale``.
      bias_init: initializer for ``bias``.
      scale_init: initializer for ``scale``.

    Example:
      >>> import jax, jax.numpy as jnp, jaxnorm.variants_linen as vnn
      >>> x = jnp.array([[3.0], [5.0]])
      >>> layer = vnn.FrozenBatchNorm(epsilon=0.0)
      >>> variables = layer.init(jax.random.key(0), x)  # mean 0, var 1
      >>> layer.apply(variables, x)[:, 0].tolist()
      [3.0, 5.0]
    """

    axis: Axes = -1
    epsilon: float = 1e-5
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32
    use_bias: bool = True
    use_scale: bool = True
    bias_init: Initializer = initializers.zeros
    scale_init: Initializer = initializers.ones

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        use_running_average: bool | None = None,
        *,
        mask: jax.Array | None = None,
    ) -> jax.Array:
        """Normalize ``x`` with the stored statistics.

        Args:
          x: floating input.
          use_running_average: ignored: the stored statistics are used in every mode, and
            ``batch_stats`` is never written (no ``mutable`` needed).
          mask: optional boolean array broadcastable to ``x``; padding (``False``, which
            may hold NaN) passes no gradient to ``scale``/``bias``.

        Returns:
          The normalized ``x``, of dtype ``self.dtype or x.dtype``.
        """
        del use_running_average
        if not self.is_initializing() and not self.has_variable("batch_stats", "mean"):
            raise ValueError(
                f"{self._where()}: needs the frozen statistics, but the variables hold no "
                f"'batch_stats' for this layer. Pass them, e.g. model.apply({{'params': "
                f"params, 'batch_stats': batch_stats}}, x)."
            )
        feature_shape = self._axes_shape(x, "axis")
        _, stats = self._batch_stats(init_batch_stats(feature_shape), ("mean", "var"))
        stats = stats_for_input(stats, x)
        scale, bias = self._params(feature_shape)
        with self._errors():
            y, _ = self._normalize(x, stats, scale, bias, mask=mask, dtype=self.dtype)
        return y
