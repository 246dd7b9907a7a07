"""Each layer's one functional call, written once for its linen and its NNX class.

A layer class is the API's base (variables, mode, errors: ``jaxnorm/linen/_base.py``,
``jaxnorm/nnx/_base.py``), its public fields or constructor, and one of these mixins.
Both APIs keep the settings under flax's names (``self.axis``, ``self.epsilon``, ...),
so the call reads them the same way in both; the base passes what is decided per call
(``training``, ``mask``, the device axis, the output ``dtype``) as keyword arguments.

Batch-norm family: ``_normalize(x, stats, scale, bias, **call) -> (y, new_stats)``,
``stats`` read by :func:`stats_for_input`. Per-sample norms:
``_normalize(x, scale, bias, *, mask, dtype) -> y``. Fused residual add + norm:
``_add_normalize(x, residual, scale, bias, *, dtype) -> (y, new_residual)``.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.nn import initializers

from jaxnorm.functional import batch_norm, group_norm, instance_norm, layer_norm, rms_norm
from jaxnorm.functional.adaptive import conditional_batch_norm
from jaxnorm.functional.dyt import dyt
from jaxnorm.functional.qk import qk_norm
from jaxnorm.functional.residual import add_layer_norm, add_rms_norm
from jaxnorm.variants import (
    batch_renorm,
    frozen_batch_norm,
    ghost_batch_norm,
    power_norm,
    renorm_schedule,
)


def stats_for_input(stats: NamedTuple, x: jax.Array) -> NamedTuple:
    """The stored running statistics as the functional call needs them for ``x``.

    A complex ``x`` has a complex running mean: a real stored ``mean`` (as every layer
    creates it, like flax) is handed over as complex, so the update comes back complex
    and is stored so, as flax linen's update does (the variance stays real). Other
    statistics pass unchanged.
    """
    mean = getattr(stats, "mean", None)
    if mean is None or not jnp.iscomplexobj(x) or jnp.iscomplexobj(mean):
        return stats
    return stats._replace(mean=mean.astype(jnp.result_type(mean.dtype, x.dtype)))


def _settings(layer: Any, *names: str) -> dict[str, Any]:
    """``{name: layer.name}``: settings passed on under the function's own argument names."""
    return {name: getattr(layer, name) for name in names}


_BN = ("axis", "momentum", "epsilon")  # the batch-norm family's settings, same names


def _devices(layer: Any) -> dict[str, Any]:
    """The named axis a per-sample norm also reduces across, and its device groups."""
    return _settings(layer, "axis_name", "axis_index_groups")


class BatchNormCall:
    """:func:`jaxnorm.batch_norm`."""

    def _normalize(self, x, stats, scale, bias, **call: Any):
        own = _settings(self, "unbiased_running_var", "skip_nonfinite")
        return batch_norm(x, stats, scale, bias, **_settings(self, *_BN), **own, **call)


class BatchRenormCall:
    """:func:`jaxnorm.variants.batch_renorm`, its limits from the schedule when set."""

    def _normalize(self, x, stats, scale, bias, **call: Any):
        r_max, d_max = self.r_max, self.d_max
        if self.warmup_steps is not None:
            steps = _settings(self, "warmup_steps", "r_relax_steps", "d_relax_steps")
            r_max, d_max = renorm_schedule(stats.count, r_max=r_max, d_max=d_max, **steps)
        own = _settings(self, "unbiased_running_var")
        return batch_renorm(
            x, stats, scale, bias, r_max=r_max, d_max=d_max, **_settings(self, *_BN), **own, **call
        )


class PowerNormCall:
    """:func:`jaxnorm.variants.power_norm`."""

    def _normalize(self, x, stats, scale, bias, **call: Any):
        own = _settings(self, "grad_momentum")
        return power_norm(x, stats, scale, bias, **_settings(self, *_BN), **own, **call)


class GhostBatchNormCall:
    """:func:`jaxnorm.variants.ghost_batch_norm`."""

    def _normalize(self, x, stats, scale, bias, **call: Any):
        own = _settings(self, "virtual_batch_size", "unbiased_running_var", "skip_nonfinite")
        return ghost_batch_norm(x, stats, scale, bias, **_settings(self, *_BN), **own, **call)


class FrozenBatchNormCall:
    """:func:`jaxnorm.variants.frozen_batch_norm` (no training, no devices)."""

    def _normalize(self, x, stats, scale, bias, *, mask, dtype):
        settings = _settings(self, "axis", "epsilon")
        return frozen_batch_norm(x, stats, scale, bias, mask=mask, dtype=dtype, **settings)


def scale_init_for(scale_init: Any, scale_offset: Any) -> Any:
    """The initializer a layer with ``scale_offset`` uses for ``scale``.

    flax's default (``initializers.ones``) is read as "the multiplier
    ``scale_offset + scale`` starts at 1", so with ``scale_offset=1.0`` ``scale``
    starts at zeros, as Gemma's ``GemmaRMSNorm`` and TransformerEngine's
    ``zero_centered_gamma`` do (generally ``constant(1 - scale_offset)``). Any other
    initializer is used as given (pass ``initializers.constant(1.0)`` for ones).
    """
    offset_is_number = isinstance(scale_offset, (int, float)) and not isinstance(scale_offset, bool)
    if not offset_is_number or scale_offset == 0 or scale_init is not initializers.ones:
        return scale_init  # a bad offset is refused by the functional call
    return initializers.zeros if scale_offset == 1 else initializers.constant(1.0 - scale_offset)


class LayerNormCall:
    """:func:`jaxnorm.layer_norm` over ``reduction_axes``, params on ``feature_axes``."""

    def _normalize(self, x, scale, bias, *, mask, dtype) -> jax.Array:
        axes = dict(axis=self.reduction_axes, feature_axis=self.feature_axes)
        own = _settings(self, "epsilon", "scale_offset")
        return layer_norm(x, scale, bias, mask=mask, dtype=dtype, **own, **axes, **_devices(self))


class RMSNormCall:
    """:func:`jaxnorm.rms_norm` (the layer has no bias: it is always ``None``)."""

    def _normalize(self, x, scale, bias, *, mask, dtype) -> jax.Array:
        del bias
        axes = dict(axis=self.reduction_axes, feature_axis=self.feature_axes)
        own = _settings(self, "epsilon", "scale_offset", "cast_order")
        return rms_norm(x, scale, mask=mask, dtype=dtype, **own, **axes, **_devices(self))


class GroupNormCall:
    """:func:`jaxnorm.group_norm` over the channel groups of the last axis."""

    def _normalize(self, x, scale, bias, *, mask, dtype) -> jax.Array:
        # NNX keeps both counts (one computed); linen has exactly one (checked on call).
        group_size = self.group_size if self.num_groups is None else None
        return group_norm(
            x,
            scale,
            bias,
            num_groups=self.num_groups,
            group_size=group_size,
            axis=-1,
            reduction_axes=self.reduction_axes,
            epsilon=self.epsilon,
            mask=mask,
            dtype=dtype,
            **_devices(self),
        )


class InstanceNormCall:
    """:func:`jaxnorm.instance_norm`, per sample and ``feature_axes`` entry."""

    def _normalize(self, x, scale, bias, *, mask, dtype) -> jax.Array:
        return instance_norm(
            x,
            scale,
            bias,
            axis=self.feature_axes,
            epsilon=self.epsilon,
            mask=mask,
            dtype=dtype,
            **_devices(self),
        )


class ConditionalBatchNormCall:
    """:func:`jaxnorm.conditional_batch_norm`: ``scale``/``bias`` are the class tables."""

    def _normalize(self, x, stats, scale, bias, *, labels, **call: Any):
        own = _settings(self, "unbiased_running_var", "skip_nonfinite")
        return conditional_batch_norm(
            x, stats, labels, scale, bias, **_settings(self, *_BN), **own, **call
        )


class DyTCall:
    """:func:`jaxnorm.dyt` with the layer's ``alpha`` (``self._alpha()``, per API).

    DyT has no statistics, so a ``mask`` has nothing to exclude: it is accepted (DyT
    stands in for a norm that takes one) and ignored.
    """

    def _normalize(self, x, scale, bias, *, mask, dtype) -> jax.Array:
        del mask
        return dyt(x, self._alpha(), scale, bias, feature_axis=self.feature_axes, dtype=dtype)


class QKNormCall:
    """:func:`jaxnorm.qk_norm`; parameters the layer does not use are ``None``."""

    def _normalize_qk(self, q, k, q_scale, k_scale, q_bias, k_bias, *, dtype):
        return qk_norm(
            q,
            k,
            q_scale,
            k_scale,
            kind=self.kind,
            epsilon=self.epsilon,
            q_bias=q_bias,
            k_bias=k_bias,
            dtype=dtype,
        )


_ADD = ("epsilon", "residual_dtype", "scale_offset")  # the fused add + norm settings


class AddLayerNormCall:
    """:func:`jaxnorm.add_layer_norm`: ``(y, new_residual)``."""

    def _add_normalize(self, x, residual, scale, bias, *, dtype):
        axes = dict(axis=self.reduction_axes, feature_axis=self.feature_axes)
        return add_layer_norm(
            x, residual, scale, bias, dtype=dtype, **_settings(self, *_ADD), **axes
        )


class AddRMSNormCall:
    """:func:`jaxnorm.add_rms_norm`: ``(y, new_residual)`` (no bias: always ``None``)."""

    def _add_normalize(self, x, residual, scale, bias, *, dtype):
        del bias
        axes = dict(axis=self.reduction_axes, feature_axis=self.feature_axes)
        own = _settings(self, *_ADD, "cast_order")
        return add_rms_norm(x, residual, scale, dtype=dtype, **own, **axes)
