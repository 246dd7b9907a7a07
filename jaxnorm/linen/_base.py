"""What the linen layers share, declared once; no numbers are computed here.

* :class:`_Layer` (no fields): the error context (messages start with the module's
  public name and path), ``scale``/``bias`` of a feature shape, feature shapes,
  ``batch_stats`` variables.
* :class:`_PerSampleNorm` (no fields): the call of the stateless norms (layer, RMS,
  group, instance). A subclass declares its fields; ``_normalize`` comes from its
  mixin in :mod:`jaxnorm._layer_calls`, shared with the NNX class.
* :class:`_BatchNormBase`: the twelve fields of the batch-norm family, in flax's
  order, and its call: the mode, the running statistics, the parameters, the
  functional call, the store. A subclass declares its own fields and its mixin.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.typing import Dtype, Initializer
from jax.nn import initializers

from jaxnorm import _checks
from jaxnorm._checks import Axes
from jaxnorm._layer_calls import stats_for_input
from jaxnorm.state import init_batch_stats


def _public_name(cls: type) -> str:
    """``jaxnorm.linen.BatchNorm`` for a class defined in ``jaxnorm.linen.batch_norm``
    (the package re-exports it); any other class keeps its own module."""
    module = cls.__module__
    if module.startswith(__package__ + "."):
        module = __package__
    return f"{module}.{cls.__qualname__}"


class _Layer(nn.Module):
    """Helpers of every jaxnorm linen layer. No fields: each layer declares its own."""

    @nn.nowrap
    def _where(self) -> str:
        """``jaxnorm.linen.BatchNorm at '/Block_0/BatchNorm_0'``, for messages."""
        path = "/" + "/".join(str(p) for p in self.scope.path)
        return f"{_public_name(type(self))} at {path!r}"

    @nn.nowrap
    @contextmanager
    def _errors(self) -> Iterator[None]:
        """Prefix the core's ``ValueError``/``TypeError`` messages with :meth:`_where`."""
        try:
            yield
        except (ValueError, TypeError) as e:
            if e.args and isinstance(e.args[0], str):
                e.args = (f"{self._where()}: {e.args[0]}",)
            raise

    @nn.nowrap
    def _axes_shape(self, x: jax.Array, field: str) -> tuple[int, ...]:
        """The shape of ``x`` at the axes held by the field ``field`` (e.g. ``"axis"``)."""
        with self._errors():
            axes = _checks.canonical_axes(
                type(self).__name__, field, getattr(self, field), jnp.ndim(x)
            )
        return tuple(x.shape[a] for a in axes)

    @nn.nowrap
    def _param_of(self, name: str, init: Initializer, shape: tuple[int, ...]) -> jax.Array:
        """``self.param`` without flax's shape check, so the core's message reports a misfit."""
        if self.has_variable("params", name):
            return nn.meta.unbox(self.get_variable("params", name))
        return self.param(name, init, shape, self.param_dtype)

    @nn.nowrap
    def _params(self, feature_shape: tuple[int, ...]) -> tuple[jax.Array | None, ...]:
        """``(scale, bias)`` of ``feature_shape``; ``None`` for one the layer does not use
        (a layer without a ``use_bias`` field, like RMSNorm, has no bias)."""
        scale = bias = None
        if self.use_scale:
            scale = self._param_of("scale", self.scale_init, feature_shape)
        if getattr(self, "use_bias", False):
            bias = self._param_of("bias", self.bias_init, feature_shape)
        return scale, bias

    @nn.nowrap
    def _batch_stats(self, fresh: NamedTuple, names: tuple[str, ...]):
        """The ``batch_stats`` variables ``names`` (created from ``fresh``) and their values.

        Returns ``(variables, stats)``: one variable or ``None`` per field of ``fresh``,
        and ``fresh``'s type holding the stored values (the fresh value where a field
        has no variable, e.g. a ``count`` that is not tracked).
        """
        variables = tuple(
            self.variable("batch_stats", name, lambda v=value: v) if name in names else None
            for name, value in zip(fresh._fields, fresh, strict=True)
        )
        values = (v.value if v is not None else f for v, f in zip(variables, fresh, strict=True))
        return variables, type(fresh)(*values)


class _PerSampleNorm(_Layer):
    """The call of the stateless norms; subclasses give their fields and ``_normalize``."""

    @nn.compact
    def __call__(self, x: jax.Array, *, mask: jax.Array | None = None) -> jax.Array:
        """Normalize ``x`` per sample (see the class docstring for the axes).

        Args:
          x: floating (or complex) input.
          mask: optional boolean array broadcastable to ``x``; ``False`` elements do
            not enter the statistics.

        Returns:
          The normalized ``x``, of dtype ``self.dtype or x.dtype``.

        Raises:
          ValueError, TypeError: bad axes, parameters that do not fit ``x``, and the
            other refusals of the functional core, prefixed with this module's path.
        """
        scale, bias = self._params(self._feature_shape(x))
        with self._errors():
            return self._normalize(x, scale, bias, mask=mask, dtype=self.dtype)

    @nn.nowrap
    def _feature_shape(self, x: jax.Array) -> tuple[int, ...]:
        """The shape of ``scale``/``bias`` for ``x``: ``x``'s shape at ``feature_axes``."""
        return self._axes_shape(x, "feature_axes")

    def _normalize(self, x, scale, bias, *, mask, dtype):
        """The layer's functional call (a :mod:`jaxnorm._layer_calls` mixin): ``y``."""
        raise NotImplementedError


class _BatchNormBase(_Layer):
    """The batch-norm family: shared fields (flax's, in flax's order) and the call.

    A subclass adds its own fields and a :mod:`jaxnorm._layer_calls` mixin, whose
    ``_normalize(x, stats, scale, bias, *, training, mask, axis_name, axis_index_groups,
    dtype) -> (y, new_stats)`` is its one call of the functional core; the hooks
    ``_fresh_stats``, ``_tracks_count`` and ``_init_trains`` have BatchNorm's defaults.
    """

    use_running_average: bool | None = None
    axis: Axes = -1
    momentum: float | None = 0.99
    epsilon: float = 1e-5
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32
    use_bias: bool = True
    use_scale: bool = True
    bias_init: Initializer = initializers.zeros
    scale_init: Initializer = initializers.ones
    axis_name: Any = None
    axis_index_groups: Any = None

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        use_running_average: bool | None = None,
        *,
        mask: jax.Array | None = None,
    ) -> jax.Array:
        """Normalize ``x`` with batch statistics (training) or the running ones (evaluation).

        Args:
          x: floating (or complex) input.
          use_running_average: ``True`` to use the running statistics; give it here
            or as the field, not both (as in flax).
          mask: optional boolean array broadcastable to ``x``; ``False`` elements do
            not enter the statistics.

        Returns:
          The normalized ``x``, of dtype ``self.dtype or x.dtype``.

        Raises:
          ValueError: training while ``batch_stats`` is immutable (pass
            ``mutable=['batch_stats']``), evaluating with no ``batch_stats``, or
            variables that do not fit ``x`` (the core's message, with this module's path).
        """
        return self._apply(x, use_running_average, mask)

    def _apply(
        self, x: jax.Array, use_running_average: bool | None, mask: jax.Array | None, **call: Any
    ) -> jax.Array:
        """The call: mode, statistics and Params (of ``_param_shape``), the functional
        call (given ``call``, e.g. a variant's per-call ``labels``), the store."""
        feature_shape = self._axes_shape(x, "axis")
        fresh = self._fresh_stats(feature_shape)
        training, initializing = self._mode(use_running_average, fresh._fields[0])
        names = tuple(f for f in fresh._fields if f != "count" or self._tracks_count())
        variables, stats = self._batch_stats(fresh, names)
        stats = stats_for_input(stats, x)
        scale, bias = self._params(self._param_shape(feature_shape))
        if initializing:  # as flax: init stores nothing and ignores axis_name
            training = training and self._init_trains(x, feature_shape)
        devices = self.axis_name, self.axis_index_groups
        axis_name, axis_index_groups = (None, None) if initializing else devices
        with self._errors():
            y, new = self._normalize(
                x,
                stats,
                scale,
                bias,
                training=training,
                mask=mask,
                axis_name=axis_name,
                axis_index_groups=axis_index_groups,
                dtype=self.dtype,
                **call,
            )
        if training and not initializing:
            for variable, value in zip(variables, new, strict=True):
                if variable is not None:
                    variable.value = value
        return y

    @nn.nowrap
    def _param_shape(self, feature_shape: tuple[int, ...]) -> tuple[int, ...]:
        """The shape of ``scale``/``bias``: the feature shape (a variant may add axes)."""
        return feature_shape

    @nn.nowrap
    def _mode(self, use_running_average: bool | None, stat: str) -> tuple[bool, bool]:
        """``(training, initializing)``, refusing a training call that cannot store its
        update and an evaluation call without statistics (``stat`` names one)."""
        use_running_average = nn.merge_param(
            "use_running_average", self.use_running_average, use_running_average
        )
        training = not use_running_average
        initializing = self.is_initializing()
        mutable = self.is_mutable_collection("batch_stats")
        if training and not initializing and not mutable:
            raise ValueError(
                f"{self._where()}: training (use_running_average=False) updates the running "
                f"statistics, but the 'batch_stats' collection is immutable. Pass "
                f"mutable=['batch_stats'] to apply and keep the returned updates: y, updates "
                f"= model.apply(variables, x, mutable=['batch_stats']). To evaluate instead, "
                f"pass use_running_average=True."
            )
        if not training and not mutable and not self.has_variable("batch_stats", stat):
            raise ValueError(
                f"{self._where()}: evaluation (use_running_average=True) needs running "
                f"statistics, but the variables hold no 'batch_stats' for this layer. Run "
                f"model.init(...) first and pass all of its variables, e.g. "
                f"model.apply({{'params': params, 'batch_stats': batch_stats}}, x)."
            )
        return training, initializing

    @nn.nowrap
    def _fresh_stats(self, feature_shape: tuple[int, ...]) -> NamedTuple:
        """The statistics a new layer starts from: float32 ``BatchStats``."""
        return init_batch_stats(feature_shape)

    @nn.nowrap
    def _tracks_count(self) -> bool:
        """Whether ``batch_stats/count`` exists (here: always)."""
        return True

    @nn.nowrap
    def _init_trains(self, x: jax.Array, feature_shape: tuple[int, ...]) -> bool:
        """Whether ``init``, asked to train, normalizes with batch statistics.

        flax's ``init`` does. Where the functional call refuses a batch with one value
        per feature (here: always), such an ``init`` batch, e.g. one example, uses the
        fresh statistics instead (init stores nothing either way).
        """
        return math.prod(x.shape) > math.prod(feature_shape)

    def _normalize(self, x, stats, scale, bias, **call):
        """The layer's functional call (a :mod:`jaxnorm._layer_calls` mixin): ``(y, new)``."""
        raise NotImplementedError
