"""What the NNX layers share, declared once; no numbers are computed here.

* :class:`_Layer`: the optional ``scale``/``bias`` Params (flat ``(num_features,)``,
  as flax NNX), the layer's settings as attributes, and the inputs of a call as flax
  prepares them (``promote_dtype``). A public constructor keeps
  its explicit signature and hands all of it over in one line,
  ``super().__init__(..., **_arguments(locals()))``.
* :class:`_PerSampleNorm`: the call of the stateless norms (layer, RMS, group,
  instance); a subclass adds its constructor and its :mod:`jaxnorm._layer_calls` mixin.
* :class:`_StatsLayer`: running statistics as ``nnx.BatchStat`` variables, read
  fitted to the feature shape and written back flat.
* :class:`_BatchNormBase`: the batch-norm family's mode and call; a subclass adds its
  constructor and its mixin from :mod:`jaxnorm._layer_calls` (the functional call).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from types import MappingProxyType
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx
from flax.typing import Dtype, Initializer

from jaxnorm import _checks
from jaxnorm._checks import Axes
from jaxnorm._layer_calls import stats_for_input
from jaxnorm.state import BatchStats

_NO_METADATA: Mapping[str, Any] = MappingProxyType({})


def _public_name(cls: type) -> str:
    """``jaxnorm.nnx.BatchNorm`` for a class defined in ``jaxnorm.nnx.batch_norm`` (the
    package re-exports it); any other class keeps its own module."""
    module = cls.__module__
    if module.startswith(__package__ + "."):
        module = __package__
    return f"{module}.{cls.__qualname__}"


def _name(module: nnx.Module) -> str:
    """``jaxnorm.nnx.BatchNorm`` (or ``jaxnorm.nnx.PowerNorm``), for messages."""
    return _public_name(type(module))


@contextmanager
def _errors_at(module: nnx.Module) -> Iterator[None]:
    """Prefix the core's ``ValueError``/``TypeError`` messages with the module's class."""
    try:
        yield
    except (ValueError, TypeError) as e:
        if e.args and isinstance(e.args[0], str):
            e.args = (f"{_name(module)}: {e.args[0]}",)
        raise


def _arguments(scope: Mapping[str, Any]) -> dict[str, Any]:
    """A constructor's arguments, from its ``locals()`` (without ``self``/``__class__``)."""
    return {k: v for k, v in scope.items() if k not in ("self", "__class__")}


def _value(variable: nnx.Variable | None) -> jax.Array | None:
    return None if variable is None else variable[...]


def _fit(a: jax.Array | None, feature_shape: tuple[int, ...]) -> jax.Array | None:
    """Reshape a flat ``(num_features,)`` variable to the feature shape when sizes agree.

    When they do not, the array passes unchanged and the core reports the misfit.
    """
    if a is None or a.ndim != 1 or a.shape == feature_shape:
        return a
    if a.size != math.prod(feature_shape):
        return a
    return jnp.reshape(a, feature_shape)


def _feature_shape(module: nnx.Module, name: str, axes: Axes, x: jax.Array) -> tuple[int, ...]:
    """The shape of ``x`` at ``axes``, refusing one that does not hold ``num_features``."""
    with _errors_at(module):
        canon = _checks.canonical_axes(type(module).__name__, name, axes, jnp.ndim(x))
    shape = tuple(x.shape[a] for a in canon)
    expected = module.num_features
    if math.prod(shape) != expected and math.prod(shape) != _local_features(module):
        raise ValueError(
            f"{_name(module)}: num_features={expected} but x {tuple(x.shape)} has "
            f"{math.prod(shape)} features on {name}={axes!r}. Construct the layer with "
            f"num_features={math.prod(shape)}, or pass x with {expected} features there."
        )
    return shape


def _local_features(module: nnx.Module) -> int | None:
    """The feature count the module's variables hold here: under ``shard_map`` a Param
    sharded over the feature axis holds this device's block, and ``x`` carries the same
    block (tensor parallelism), as flax's NNX layers accept."""
    for name in ("scale", "bias", "mean"):
        variable = getattr(module, name, None)
        if isinstance(variable, nnx.Variable):
            return math.prod(jnp.shape(variable[...]))
    return None


def _optional_param(
    use: bool,
    init: Initializer,
    rngs: nnx.Rngs,
    num_features: int,
    dtype: Dtype,
    metadata: Mapping[str, Any],
) -> nnx.Param | Any:
    """A ``(num_features,)`` ``nnx.Param`` when ``use``, else an empty attribute (``None``)."""
    if not use:
        return nnx.data(None)
    return nnx.Param(init(rngs.params(), (num_features,), dtype), **metadata)


class _Layer(nnx.Module):
    """``scale`` (and ``bias``, for layers that take ``use_bias``) and the settings."""

    def __init__(
        self,
        num_features: int,
        *,
        rngs: nnx.Rngs,
        param_dtype: Dtype,
        use_scale: bool,
        scale_init: Initializer,
        scale_metadata: Mapping[str, Any],
        use_bias: bool | None = None,
        bias_init: Initializer | None = None,
        bias_metadata: Mapping[str, Any] = _NO_METADATA,
        **settings: Any,
    ):
        """Create the Params (``scale`` first, as flax) and keep every setting.

        Args:
          num_features: the length of the flat Params.
          rngs: random generators for the initializers.
          param_dtype: dtype of the Params.
          use_scale: create ``scale``; ``scale_init``/``scale_metadata`` as in flax.
          use_bias: create ``bias``; ``None`` for a layer with no bias at all (RMSNorm).
          **settings: the rest of the constructor's arguments, kept as attributes.
        """
        self.scale = _optional_param(
            use_scale, scale_init, rngs, num_features, param_dtype, scale_metadata
        )
        if use_bias is not None:
            self.bias = _optional_param(
                use_bias, bias_init, rngs, num_features, param_dtype, bias_metadata
            )
            self.use_bias = use_bias
        self.num_features = num_features
        self.param_dtype = param_dtype
        self.use_scale = use_scale
        for name, value in settings.items():
            setattr(self, name, value)

    def _inputs(self, x: jax.Array, feature_shape: tuple[int, ...], *variables: jax.Array):
        """``(x, scale, bias, dtype)`` for the functional call, prepared as flax prepares them.

        ``self.promote_dtype`` is called as flax calls it, on ``(x, *variables, scale,
        bias)`` (``(x, *variables, scale)`` without a bias) with ``dtype=self.dtype``, and
        the layer normalizes the ``x``, ``scale`` and ``bias`` it returns, the parameters
        fitted to ``feature_shape``; running statistics are read as stored. The output
        dtype stays ``self.dtype``, else ``x``'s own (flax's default promotion turns a
        bf16 input with f32 parameters into an f32 output). An integer ``x`` is passed
        on as it is, for the core to refuse.
        """
        params = (self.scale, self.bias) if hasattr(self, "use_bias") else (self.scale,)
        params = tuple(_value(p) for p in params)
        dtype = self.dtype
        if jnp.issubdtype(jnp.result_type(x), jnp.inexact):
            dtype = jnp.result_type(x) if dtype is None else dtype
            x, *promoted = self.promote_dtype((x, *variables, *params), dtype=self.dtype)
            params = tuple(promoted[len(variables) :])
        scale, bias = (*(_fit(p, feature_shape) for p in params), None)[:2]
        return x, scale, bias, dtype


class _PerSampleNorm(_Layer):
    """The call of the stateless norms; subclasses give their constructor and mixin."""

    def __call__(self, x: jax.Array, *, mask: jax.Array | None = None) -> jax.Array:
        """Normalize ``x`` per sample (see the class docstring for the axes).

        Args:
          x: floating (or complex) input.
          mask: optional boolean array broadcastable to ``x``; ``False`` elements do
            not enter the statistics.

        Returns:
          The normalized ``x``, of dtype ``self.dtype or x.dtype``.

        Raises:
          ValueError, TypeError: an ``x`` without ``num_features`` features, and the
            refusals of the functional core, prefixed with the class name.
        """
        x, scale, bias, dtype = self._inputs(x, self._feature_shape(x))
        with _errors_at(self):
            return self._normalize(x, scale, bias, mask=mask, dtype=dtype)

    def _feature_shape(self, x: jax.Array) -> tuple[int, ...]:
        """The feature shape of ``x`` at ``feature_axes`` (it must hold ``num_features``)."""
        return _feature_shape(self, "feature_axes", self.feature_axes, x)

    def _normalize(self, x, scale, bias, *, mask, dtype):
        """The layer's functional call (a :mod:`jaxnorm._layer_calls` mixin): ``y``."""
        raise NotImplementedError


class _StatsLayer(_Layer):
    """Running statistics (fields of ``_stats_type``) as ``nnx.BatchStat`` variables."""

    _stats_type: type = BatchStats

    def __init__(self, fresh: NamedTuple, *, with_count: bool = True, **arguments: Any):
        """Store ``fresh`` (flat ``(num_features,)`` statistics) as BatchStats.

        Args:
          fresh: the initial statistics, a ``_stats_type``.
          with_count: keep the ``count`` field (else it is an empty attribute).
          **arguments: for :class:`_Layer`.
        """
        for name, value in zip(fresh._fields, fresh, strict=True):
            absent = name == "count" and not with_count
            setattr(self, name, nnx.data(None) if absent else nnx.BatchStat(value))
        super().__init__(**arguments)

    def _stats(self, feature_shape: tuple[int, ...]) -> NamedTuple:
        """The stored statistics, fitted to ``feature_shape``; an absent ``count`` reads 0."""
        values = (_value(getattr(self, name)) for name in self._stats_type._fields)
        return self._stats_type(
            *(jnp.zeros((), jnp.int32) if v is None else _fit(v, feature_shape) for v in values)
        )

    def _stat_arrays(self) -> tuple[jax.Array, ...]:
        """The stored floating statistics, flat: what flax hands ``promote_dtype``."""
        fields = (f for f in self._stats_type._fields if f != "count")
        return tuple(_value(getattr(self, f)) for f in fields)

    def _store(self, new: NamedTuple) -> None:
        """Write new statistics back (flat); absent variables are skipped.

        A value of another dtype replaces the variable's (a complex mean for complex
        input, which writing into the real array would truncate, as flax NNX does).
        """
        for name, value in zip(new._fields, new, strict=True):
            variable = getattr(self, name)
            if variable is None:
                continue
            value = jnp.reshape(value, variable.shape)
            if value.dtype == variable.dtype:
                variable[...] = value
            else:
                variable.set_value(value)


class _BatchNormBase(_StatsLayer):
    """The batch-norm family's mode and call; subclasses give their constructor and mixin.

    The mixin's ``_normalize(x, stats, scale, bias, *, training, mask, axis_name,
    axis_index_groups, dtype)`` returns ``(y, new_stats)``.
    """

    def __call__(
        self,
        x: jax.Array,
        use_running_average: bool | None = None,
        *,
        mask: jax.Array | None = None,
    ) -> jax.Array:
        """Normalize ``x``; in training mode also update the running statistics.

        Args:
          x: floating (or complex) input.
          use_running_average: overrides the attribute for this call when not ``None``.
          mask: optional boolean array broadcastable to ``x``; ``False`` elements do
            not enter the statistics.

        Returns:
          The normalized ``x``, of dtype ``self.dtype or x.dtype``.

        Raises:
          ValueError: the mode is not set (call ``model.train()``/``model.eval()``),
            or the variables do not fit ``x`` (the core's message).
        """
        return self._apply(x, use_running_average, mask)

    def _apply(
        self, x: jax.Array, use_running_average: bool | None, mask: jax.Array | None, **call: Any
    ) -> jax.Array:
        """The call: mode, fitted statistics and inputs, the functional call (given
        ``call``, e.g. a variant's per-call ``labels``), the store in training mode."""
        training = self._training(use_running_average)
        feature_shape = _feature_shape(self, "axis", self.axis, x)
        stats = stats_for_input(self._stats(feature_shape), x)
        x, scale, bias, dtype = self._inputs(x, feature_shape, *self._stat_arrays())
        with _errors_at(self):
            y, new = self._normalize(
                x,
                stats,
                scale,
                bias,
                training=training,
                mask=mask,
                axis_name=self.axis_name,
                axis_index_groups=self.axis_index_groups,
                dtype=dtype,
                **call,
            )
        if training:
            self._store(new)
        return y

    def _training(self, use_running_average: bool | None) -> bool:
        """Whether this call trains, refusing a module whose mode was never set."""
        mode = self.use_running_average if use_running_average is None else use_running_average
        if mode is None:
            raise ValueError(
                f"{_name(self)}: the mode is not set (use_running_average=None), so it is "
                f"unknown whether to train the running statistics or to use them. Call "
                f"model.train() before training steps and model.eval() before evaluation, "
                f"or pass use_running_average=False/True to the constructor or the call. "
                f"(Unlike flax.nnx, jaxnorm does not default to training mode, which "
                f"silently updates the statistics during what was meant as evaluation.)"
            )
        return not mode

    def set_view(self, use_running_average: bool | None = None) -> None:
        """Hook for ``nnx.view(model, use_running_average=...)`` (as flax).

        Args:
          use_running_average: the mode to set; ``None`` leaves it unchanged.
        """
        if use_running_average is not None:
            self.use_running_average = use_running_average

    def _normalize(self, x, stats, scale, bias, **call):
        """The layer's functional call (a :mod:`jaxnorm._layer_calls` mixin): ``(y, new)``."""
        raise NotImplementedError
