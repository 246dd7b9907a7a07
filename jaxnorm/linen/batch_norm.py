"""``jaxnorm.linen.BatchNorm``: the family's base, flax's extra fields and its call."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxnorm._layer_calls import BatchNormCall
from jaxnorm.linen._base import _BatchNormBase
from jaxnorm.state import BatchStats, init_batch_stats


class BatchNorm(BatchNormCall, _BatchNormBase):
    """Batch normalization; mirrors ``flax.linen.BatchNorm``, statistics from the core.

    .. math::

        y = \\frac{x - \\mu}{\\sqrt{\\sigma^2 + \\epsilon}}\\,\\gamma + \\beta

    In training (``use_running_average=False``) ``mu``/``sigma**2`` are the biased
    batch statistics over every axis but ``axis`` (and over ``axis_name``'s devices),
    and the running statistics are updated as
    ``new = momentum * old + (1 - momentum) * batch`` (torch's ``momentum=0.1`` is
    our ``0.9``). In evaluation the running statistics are used. All of it is
    :func:`jaxnorm.batch_norm`.

    Variables: ``params/{scale, bias}`` and ``batch_stats/{mean, var}``, each of the
    feature shape, exactly as flax, dtypes included: the statistics are stored in
    float32, or in ``param_dtype`` with ``force_float32_reductions=False`` (they are
    computed in float32 either way and rounded to the stored dtype); plus
    ``batch_stats/count`` (int32 scalar) only when ``momentum is None`` or
    ``track_count=True``. As in flax,
    ``init`` does not update the running statistics and ignores ``axis_name``.

    Differences from flax: exact statistics under masks and device shards (flax
    averages per-device moments), an empty mask updates nothing (flax writes NaN),
    output dtype ``dtype or x.dtype`` (flax promotes bf16 to f32), and the extra
    fields below.

    Attributes:
      use_running_average: ``True`` to normalize with the stored statistics; may
        instead be passed to ``__call__`` (exactly one of the two, as in flax).
      axis: the feature axis or axes (kept); all others are reduced.
      momentum: weight of the old running value in [0, 1]; ``None`` for torch's
        cumulative average of all batches (adds ``batch_stats/count``).
      epsilon: added to the variance.
      dtype: output dtype; ``None`` keeps the input's dtype.
      param_dtype: dtype of ``scale``/``bias``.
      use_bias: add a learned ``bias`` (beta).
      use_scale: multiply by a learned ``scale`` (gamma).
      bias_init: initializer for ``bias``.
      scale_init: initializer for ``scale``.
      axis_name: named axis of ``shard_map``/``pmap``/``vmap`` over which the batch
        is split; statistics are merged exactly across it.
      axis_index_groups: device groups for the cross-device reduction.
      use_fast_variance: accepted for compatibility and ignored: the core's variance
        stays correct for large means either way.
      force_float32_reductions: ``False`` stores ``batch_stats`` in ``param_dtype``, as
        flax. Unlike flax, the batch statistics are still computed in float32.
      unbiased_running_var: store the Bessel-corrected batch variance in the running
        average (torch's convention); the batch itself uses the biased variance. A
        training batch with one value per feature (one example) is then refused, as
        torch does; by default it has variance 0 (``y = bias``) and updates the
        statistics, as flax.
      track_count: keep ``batch_stats/count`` even with a numeric ``momentum``.
      skip_nonfinite: leave the running statistics of a feature whose batch statistics
        are NaN/Inf unchanged (NaN/Inf still propagate to the output).

    Example:
      >>> import jax, jax.numpy as jnp, jaxnorm.linen as jnn
      >>> bn = jnn.BatchNorm(momentum=0.9)
      >>> x = jax.random.normal(jax.random.key(0), (8, 3))
      >>> variables = bn.init(jax.random.key(1), x, use_running_average=False)
      >>> y, updates = bn.apply(variables, x, use_running_average=False,
      ...                       mutable=['batch_stats'])
      >>> sorted(updates['batch_stats'])
      ['mean', 'var']
    """

    use_fast_variance: bool = True
    force_float32_reductions: bool = True
    unbiased_running_var: bool = False
    track_count: bool = False
    skip_nonfinite: bool = False

    @nn.nowrap
    def _fresh_stats(self, feature_shape: tuple[int, ...]) -> BatchStats:
        """flax's dtype rule: float32, or ``param_dtype`` without ``force_float32_reductions``."""
        dtype = jnp.float32 if self.force_float32_reductions else self.param_dtype
        return init_batch_stats(feature_shape, dtype)

    @nn.nowrap
    def _init_trains(self, x: jax.Array, feature_shape: tuple[int, ...]) -> bool:
        """As flax: one value per feature is a batch (variance 0, ``y = bias``), except
        under torch's ``unbiased_running_var``, which refuses it."""
        return not self.unbiased_running_var or super()._init_trains(x, feature_shape)

    @nn.nowrap
    def _tracks_count(self) -> bool:
        return self.momentum is None or self.track_count
