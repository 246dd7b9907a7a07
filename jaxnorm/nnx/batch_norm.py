"""``jaxnorm.nnx.BatchNorm``: flax's constructor over the family's base, and its call."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
from flax import nnx
from flax.nnx.nn import dtypes
from flax.typing import Dtype, Initializer, PromoteDtypeFn
from typing_extensions import TypedDict

from jaxnorm._checks import Axes
from jaxnorm._layer_calls import BatchNormCall
from jaxnorm.nnx._base import _NO_METADATA, _arguments, _BatchNormBase
from jaxnorm.state import init_batch_stats


class BatchNormOptions(TypedDict, total=False):
    """:class:`BatchNorm`'s keyword options, for ``Unpack`` in the constructors of its
    variants (:class:`~jaxnorm.nnx.GhostBatchNorm`, :class:`~jaxnorm.nnx.ConditionalBatchNorm`);
    their defaults are :class:`BatchNorm`'s. A test keeps it equal to the signature."""

    use_running_average: bool | None
    axis: Axes
    momentum: float | None
    epsilon: float
    dtype: Dtype | None
    param_dtype: Dtype
    use_bias: bool
    use_scale: bool
    bias_init: Initializer
    scale_init: Initializer
    axis_name: Any
    axis_index_groups: Any
    use_fast_variance: bool
    promote_dtype: PromoteDtypeFn
    unbiased_running_var: bool
    track_count: bool
    skip_nonfinite: bool
    rngs: nnx.Rngs
    bias_metadata: Mapping[str, Any]
    scale_metadata: Mapping[str, Any]


class BatchNorm(BatchNormCall, _BatchNormBase):
    """Batch normalization; mirrors ``flax.nnx.BatchNorm``, numbers from :func:`jaxnorm.batch_norm`.

    .. math::

        y = \\frac{x - \\mu}{\\sqrt{\\sigma^2 + \\epsilon}}\\,\\gamma + \\beta

    In training mode the batch statistics normalize ``x`` and update the running
    ones, ``new = momentum * old + (1 - momentum) * batch`` (torch's ``momentum=0.1``
    is our ``0.9``); in evaluation mode the running statistics are used.

    **Mode.** Unlike flax (default ``False``), ``use_running_average`` defaults to
    ``None`` and a call in that state raises: put the model in a mode with
    ``model.train()`` / ``model.eval()`` (which set this attribute, as in flax), or
    pass ``use_running_average`` to the constructor or the call.

    Args:
      num_features: size of the feature axis (the product of sizes for several axes).
      use_running_average: ``False`` train, ``True`` evaluate, ``None`` not set (error
        on call until ``train()``/``eval()``).
      axis: the feature axis or axes (kept); all others are reduced.
      momentum: weight of the old running value in [0, 1]; ``None`` for torch's
        cumulative average (adds the ``count`` BatchStat).
      epsilon: added to the variance.
      dtype: output dtype; ``None`` keeps the input's dtype.
      param_dtype: dtype of ``scale``/``bias``.
      use_bias: add a learned ``bias``.
      use_scale: multiply by a learned ``scale``.
      bias_init: initializer for ``bias``.
      scale_init: initializer for ``scale``.
      axis_name: named axis of ``shard_map``/``pmap``/``vmap`` over which the batch is
        split; statistics are merged exactly across it.
      axis_index_groups: device groups for the cross-device reduction.
      use_fast_variance: accepted for compatibility and ignored: the core's variance
        stays correct for large means either way.
      promote_dtype: as flax, applied to ``(x, mean, var, scale, bias)`` and ``dtype`` first.
      unbiased_running_var: store the Bessel-corrected batch variance in the running
        average (torch's convention), refusing a training batch with one value per
        feature as torch does; by default such a batch (e.g. one example under
        ``nnx.vmap``) has variance 0 (``y = bias``) and updates the statistics, as flax.
      track_count: keep the ``count`` BatchStat even with a numeric ``momentum``.
      skip_nonfinite: leave the running statistics of a feature whose batch statistics
        are NaN/Inf unchanged (NaN/Inf still propagate to the output).
      rngs: random generators for the parameter initializers.
      bias_metadata: extra metadata for the ``bias`` Param (as flax).
      scale_metadata: extra metadata for the ``scale`` Param (as flax).

    Example:
      >>> import jax, jaxnorm.nnx as jnnx
      >>> from flax import nnx
      >>> bn = jnnx.BatchNorm(3, momentum=0.9, rngs=nnx.Rngs(0))
      >>> x = jax.random.normal(jax.random.key(0), (8, 3))
      >>> bn.train()
      >>> y = bn(x)  # updates bn.mean, bn.var
      >>> bn.eval()
      >>> y = bn(x)  # uses them
    """

    def __init__(
        self,
        num_features: int,
        *,
        use_running_average: bool | None = None,
        axis: Axes = -1,
        momentum: float | None = 0.99,
        epsilon: float = 1e-5,
        dtype: Dtype | None = None,
        param_dtype: Dtype = jnp.float32,
        use_bias: bool = True,
        use_scale: bool = True,
        bias_init: Initializer = nnx.initializers.zeros,
        scale_init: Initializer = nnx.initializers.ones,
        axis_name: Any = None,
        axis_index_groups: Any = None,
        use_fast_variance: bool = True,
        promote_dtype: PromoteDtypeFn = dtypes.promote_dtype,
        unbiased_running_var: bool = False,
        track_count: bool = False,
        skip_nonfinite: bool = False,
        rngs: nnx.Rngs,
        bias_metadata: Mapping[str, Any] = _NO_METADATA,
        scale_metadata: Mapping[str, Any] = _NO_METADATA,
    ):
        super().__init__(
            init_batch_stats((num_features,)),
            with_count=momentum is None or track_count,
            **_arguments(locals()),
        )
