"""NNX layers for the batch-norm variants of :mod:`jaxnorm.variants`.

Each is :class:`jaxnorm.nnx._base._BatchNormBase` (Params, BatchStats, mode, fitting,
errors, store) with its own constructor and its call of :mod:`jaxnorm.variants` (from
:mod:`jaxnorm._layer_calls`), where every number comes from. State follows
``jaxnorm.nnx.BatchNorm`` (and flax's): ``nnx.Param`` ``scale``/``bias`` and
``nnx.BatchStat`` statistics, flat ``(num_features,)`` (reshaped to the feature shape
for the core when ``axis`` names several axes).

* :class:`BatchRenorm` — ``mean``, ``var``, ``count`` (the step of the optional
  warm-up schedule).
* :class:`PowerNorm` — ``mean_square``, ``grad_stat`` (a :class:`PowerNormGradStat`, a
  ``BatchStat`` subclass, so that it can be differentiated on its own), ``count``.
  ``grad_stat`` is updated from the gradient: see :func:`update_grad_stats`.
* :class:`GhostBatchNorm` — ``BatchNorm``'s state (``mean``, ``var``).
* :class:`FrozenBatchNorm` — ``BatchNorm``'s state, never written, in every mode.

Modes as in ``jaxnorm.nnx.BatchNorm``: ``use_running_average`` defaults to ``None``
("not set") and a call in that state raises; ``model.train()``/``model.eval()`` set
it, and a value passed to ``__call__`` takes precedence.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from flax.nnx.nn import dtypes
from flax.typing import Dtype, Initializer, PromoteDtypeFn
from typing_extensions import Unpack

from jaxnorm._checks import Axes
from jaxnorm._layer_calls import (
    BatchRenormCall,
    FrozenBatchNormCall,
    GhostBatchNormCall,
    PowerNormCall,
    stats_for_input,
)
from jaxnorm._signatures import extends
from jaxnorm.nnx._base import (
    _NO_METADATA,
    _arguments,
    _BatchNormBase,
    _errors_at,
    _feature_shape,
    _StatsLayer,
)
from jaxnorm.nnx.batch_norm import BatchNorm, BatchNormOptions
from jaxnorm.state import init_batch_stats
from jaxnorm.variants import PowerNormStats, init_power_norm_stats

__all__ = [
    "BatchRenorm",
    "FrozenBatchNorm",
    "GhostBatchNorm",
    "PowerNorm",
    "PowerNormGradStat",
    "update_grad_stats",
]


class PowerNormGradStat(nnx.BatchStat):
    """PowerNorm's running gradient statistic ``nu``: a ``BatchStat`` that is updated
    from its gradient (:func:`update_grad_stats`), hence a type of its own to filter on."""


class BatchRenorm(BatchRenormCall, _BatchNormBase):
    """Batch renormalization (Ioffe, 2017); numbers from :func:`jaxnorm.variants.batch_renorm`.

    .. math::

        y = \\Big(\\frac{x - \\mu_B}{\\sigma_B}\\,r + d\\Big)\\gamma + \\beta,\\quad
        r = \\mathrm{sg}(\\mathrm{clip}(\\sigma_B/\\sigma, 1/r_{\\max}, r_{\\max})),\\quad
        d = \\mathrm{sg}(\\mathrm{clip}((\\mu_B - \\mu)/\\sigma, -d_{\\max}, d_{\\max}))

    in training; ``(x - mu)/sigma * gamma + beta`` in evaluation. With
    ``warmup_steps`` set, the limits follow :func:`jaxnorm.variants.renorm_schedule`
    at step ``count`` (the number of training updates so far).

    Args:
      num_features: size of the feature axis (product of sizes for several axes).
      use_running_average: ``False`` train, ``True`` evaluate, ``None`` not set.
      axis: the feature axis or axes (kept).
      momentum: weight of the old running value in [0, 1].
      epsilon: added to the variances.
      r_max: clip limit of ``r`` (>= 1), or its final value under the schedule.
      d_max: clip limit of ``d`` (>= 0), or its final value under the schedule.
      warmup_steps: ``None`` for fixed limits; else steps of plain batch norm first.
      r_relax_steps: length of the ``r_max`` ramp (with ``warmup_steps``).
      d_relax_steps: length of the ``d_max`` ramp (with ``warmup_steps``).
      dtype: output dtype; ``None`` keeps the input's dtype.
      param_dtype: dtype of ``scale``/``bias``.
      use_bias: add a learned ``bias``.
      use_scale: multiply by a learned ``scale``.
      bias_init: initializer for ``bias``.
      scale_init: initializer for ``scale``.
      axis_name: named axis across which the batch is split.
      axis_index_groups: device groups for the cross-device reduction.
      promote_dtype: as flax, applied to ``(x, mean, var, scale, bias)`` and ``dtype`` first.
      unbiased_running_var: store the Bessel-corrected batch variance (torch's).
      rngs: random generators for the parameter initializers.
      bias_metadata: extra metadata for the ``bias`` Param.
      scale_metadata: extra metadata for the ``scale`` Param.

    Example:
      >>> import jax, jaxnorm.variants_nnx as vnnx
      >>> from flax import nnx
      >>> layer = vnnx.BatchRenorm(3, warmup_steps=100, rngs=nnx.Rngs(0))
      >>> layer.train()
      >>> y = layer(jax.random.normal(jax.random.key(0), (8, 3)))
      >>> int(layer.count[...])
      1
    """

    def __init__(
        self,
        num_features: int,
        *,
        use_running_average: bool | None = None,
        axis: Axes = -1,
        momentum: float = 0.99,
        epsilon: float = 1e-5,
        r_max: float = 3.0,
        d_max: float = 5.0,
        warmup_steps: int | None = None,
        r_relax_steps: int = 35_000,
        d_relax_steps: int = 20_000,
        dtype: Dtype | None = None,
        param_dtype: Dtype = jnp.float32,
        use_bias: bool = True,
        use_scale: bool = True,
        bias_init: Initializer = nnx.initializers.zeros,
        scale_init: Initializer = nnx.initializers.ones,
        axis_name: Any = None,
        axis_index_groups: Any = None,
        promote_dtype: PromoteDtypeFn = dtypes.promote_dtype,
        unbiased_running_var: bool = False,
        rngs: nnx.Rngs,
        bias_metadata: Mapping[str, Any] = _NO_METADATA,
        scale_metadata: Mapping[str, Any] = _NO_METADATA,
    ):
        super().__init__(init_batch_stats((num_features,)), **_arguments(locals()))


class PowerNorm(PowerNormCall, _BatchNormBase):
    """PowerNorm (Shen et al., 2020); numbers from :func:`jaxnorm.variants.power_norm`.

    .. math::

        y = \\gamma\\,\\frac{x}{\\sqrt{\\psi^2 + \\epsilon}} + \\beta

    with ``psi**2`` the *running* quadratic mean (the previous step's in training,
    updated after use) and the paper's approximate backward pass in training.

    The running gradient statistic ``grad_stat`` (the paper's ``nu``) is computed in
    the backward pass and arrives as the gradient with respect to it; differentiate
    with respect to :class:`PowerNormGradStat` as well and call
    :func:`update_grad_stats`::

        diff = nnx.DiffState(0, nnx.Any(nnx.Param, PowerNormGradStat))
        grads = nnx.grad(loss_fn, argnums=diff)(model, x)
        update_grad_stats(model, grads)  # before the optimizer, which ignores them
        optimizer.update(model, nnx.filter_state(grads, nnx.Param))

    Without that, ``grad_stat`` stays 0 and the backward pass is ``dL/dx_hat / psi``.

    Args:
      num_features: size of the feature axis (product of sizes for several axes).
      use_running_average: ``False`` train, ``True`` evaluate, ``None`` not set.
      axis: the feature axis or axes (kept); all others are reduced.
      momentum: weight of the old ``mean_square`` in [0, 1] (the paper's ``alpha``).
      grad_momentum: the same for ``grad_stat``; ``None``: ``momentum``.
      epsilon: added to ``psi**2``.
      dtype: output dtype; ``None`` keeps the input's dtype.
      param_dtype: dtype of ``scale``/``bias``.
      use_bias: add a learned ``bias``.
      use_scale: multiply by a learned ``scale``.
      bias_init: initializer for ``bias``.
      scale_init: initializer for ``scale``.
      axis_name: named axis across which the batch is split.
      axis_index_groups: device groups for the cross-device reduction.
      promote_dtype: as flax, applied to ``(x, mean_square, grad_stat, scale, bias)``
        and ``dtype`` first.
      rngs: random generators for the parameter initializers.
      bias_metadata: extra metadata for the ``bias`` Param.
      scale_metadata: extra metadata for the ``scale`` Param.
    """

    _stats_type = PowerNormStats

    def __init__(
        self,
        num_features: int,
        *,
        use_running_average: bool | None = None,
        axis: Axes = -1,
        momentum: float = 0.9,
        grad_momentum: float | None = None,
        epsilon: float = 1e-5,
        dtype: Dtype | None = None,
        param_dtype: Dtype = jnp.float32,
        use_bias: bool = True,
        use_scale: bool = True,
        bias_init: Initializer = nnx.initializers.zeros,
        scale_init: Initializer = nnx.initializers.ones,
        axis_name: Any = None,
        axis_index_groups: Any = None,
        promote_dtype: PromoteDtypeFn = dtypes.promote_dtype,
        rngs: nnx.Rngs,
        bias_metadata: Mapping[str, Any] = _NO_METADATA,
        scale_metadata: Mapping[str, Any] = _NO_METADATA,
    ):
        super().__init__(init_power_norm_stats((num_features,)), **_arguments(locals()))
        self.grad_stat = PowerNormGradStat(self.grad_stat[...])  # a type to filter on


def update_grad_stats(model: nnx.Module, grads: nnx.State) -> None:
    """Add the backward pass's increments to every :class:`PowerNorm`'s ``grad_stat``.

    ``nu_t = nu_{t-1} + dL/d(grad_stat)``, the rule of
    :func:`jaxnorm.variants.update_power_norm_grad_stat`, for every
    :class:`PowerNormGradStat` in ``model``, in place.

    Args:
      model: the model (or any graph node) holding PowerNorm layers.
      grads: gradients from ``nnx.grad`` with an ``argnums``/``DiffState`` filter that
        includes :class:`PowerNormGradStat` (other entries are ignored).

    Raises:
      ValueError: ``grads`` holds no :class:`PowerNormGradStat` while ``model`` does
        (the filter left them out, so nothing would be learned).
    """
    current = nnx.state(model, PowerNormGradStat)
    increments = nnx.filter_state(grads, PowerNormGradStat)
    if jax.tree.leaves(current) and not jax.tree.leaves(increments):
        raise ValueError(
            "jaxnorm.nnx.update_grad_stats: grads holds no PowerNormGradStat, so there is "
            "nothing to add. Differentiate with respect to them too: "
            "nnx.grad(loss_fn, argnums=nnx.DiffState(0, nnx.Any(nnx.Param, "
            "PowerNormGradStat)))."
        )
    nnx.update(model, jax.tree.map(lambda nu, inc: nu + inc.astype(nu.dtype), current, increments))


class GhostBatchNorm(GhostBatchNormCall, _BatchNormBase):
    """Ghost batch norm (Hoffer et al., 2017); via :func:`jaxnorm.variants.ghost_batch_norm`.

    In training mode, each block of ``virtual_batch_size`` consecutive examples
    (axis 0) is batch-normalized by its own statistics; the running statistics are
    updated once per call with the exact moments of the whole batch (what
    ``BatchNorm`` would store). Evaluation is ``BatchNorm``'s. State: ``BatchNorm``'s
    (``mean``, ``var``; ``count`` when ``momentum is None`` or ``track_count``).

    Args:
      num_features: size of the feature axis (product of sizes for several axes).
      virtual_batch_size: examples per virtual batch; must divide the batch size.
      use_running_average: ``False`` train, ``True`` evaluate, ``None`` not set.
      axis: the feature axis or axes (kept; not 0).
      momentum: weight of the old running value in [0, 1]; ``None``: cumulative.
      epsilon: added to the variance.
      dtype: output dtype; ``None`` keeps the input's dtype.
      param_dtype: dtype of ``scale``/``bias``.
      use_bias: add a learned ``bias``.
      use_scale: multiply by a learned ``scale``.
      bias_init: initializer for ``bias``.
      scale_init: initializer for ``scale``.
      axis_name: named axis across which the running-statistics update is merged.
      axis_index_groups: device groups for that merge.
      use_fast_variance: accepted for compatibility (as :class:`BatchNorm`) and ignored.
      promote_dtype: as flax, applied to ``(x, mean, var, scale, bias)`` and ``dtype`` first.
      unbiased_running_var: store the Bessel-corrected variance (torch's).
      track_count: keep the ``count`` BatchStat even with a numeric ``momentum``.
      skip_nonfinite: leave the running statistics of a feature whose batch statistics
        are NaN/Inf unchanged.
      rngs: random generators for the parameter initializers.
      bias_metadata: extra metadata for the ``bias`` Param.
      scale_metadata: extra metadata for the ``scale`` Param.
    """

    @extends(BatchNorm.__init__)
    def __init__(
        self,
        num_features: int,
        virtual_batch_size: int,
        **options: Unpack[BatchNormOptions],
    ):
        with_count = options["momentum"] is None or options["track_count"]
        super().__init__(
            init_batch_stats((num_features,)),
            with_count=with_count,
            num_features=num_features,
            virtual_batch_size=virtual_batch_size,
            **options,
        )


class FrozenBatchNorm(FrozenBatchNormCall, _StatsLayer):
    """Batch norm with frozen statistics; via :func:`jaxnorm.variants.frozen_batch_norm`.

    ``y = (x - mean) / sqrt(var + epsilon) * scale + bias`` with the stored ``mean``/
    ``var`` in every mode (it has no ``use_running_average``, so ``model.train()``
    leaves it frozen): for fine-tuning with frozen statistics. State: ``BatchNorm``'s
    ``mean``/``var`` BatchStats and ``scale``/``bias`` Params, so a trained BatchNorm's
    state can be copied in. ``use_running_average`` and ``mask`` are accepted by the
    call, so that it replaces a ``BatchNorm`` call unchanged, and ignored.

    Args:
      num_features: size of the feature axis (product of sizes for several axes).
      axis: the feature axis or axes (kept).
      epsilon: added to the variance.
      dtype: output dtype; ``None`` keeps the input's dtype.
      param_dtype: dtype of ``scale``/``bias``.
      use_bias: add a learned ``bias``.
      use_scale: multiply by a learned ``scale``.
      bias_init: initializer for ``bias``.
      scale_init: initializer for ``scale``.
      promote_dtype: as flax, applied to ``(x, mean, var, scale, bias)`` and ``dtype`` first.
      rngs: random generators for the parameter initializers.
      bias_metadata: extra metadata for the ``bias`` Param.
      scale_metadata: extra metadata for the ``scale`` Param.
    """

    def __init__(
        self,
        num_features: int,
        *,
        axis: Axes = -1,
        epsilon: float = 1e-5,
        dtype: Dtype | None = None,
        param_dtype: Dtype = jnp.float32,
        use_bias: bool = True,
        use_scale: bool = True,
        bias_init: Initializer = nnx.initializers.zeros,
        scale_init: Initializer = nnx.initializers.ones,
        promote_dtype: PromoteDtypeFn = dtypes.promote_dtype,
        rngs: nnx.Rngs,
        bias_metadata: Mapping[str, Any] = _NO_METADATA,
        scale_metadata: Mapping[str, Any] = _NO_METADATA,
    ):
        super().__init__(
            init_batch_stats((num_features,)), with_count=False, **_arguments(locals())
        )

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
          use_running_average: ignored: the stored statistics are used in every mode
            (``model.train()`` and ``nnx.view`` leave them frozen).
          mask: optional boolean array broadcastable to ``x``; padding (``False``, which
            may hold NaN) passes no gradient to ``scale``/``bias``.

        Returns:
          The normalized ``x``, of dtype ``self.dtype or x.dtype``.
        """
        del use_running_average
        feature_shape = _feature_shape(self, "axis", self.axis, x)
        stats = stats_for_input(self._stats(feature_shape), x)
        x, scale, bias, dtype = self._inputs(x, feature_shape, *self._stat_arrays())
        with _errors_at(self):
            y, _ = self._normalize(x, stats, scale, bias, mask=mask, dtype=dtype)
        return y
