"""Argument validation shared by every public entry point.

Every check runs at trace time on static information (shapes, dtypes, Python
numbers) and raises ``TypeError``/``ValueError`` with a message that names the
rule, the value that arrived and the fix. Nothing here touches array values.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

Axes = int | Sequence[int]

_FLOAT_NAMES = "float16, bfloat16, float32 or float64"


def canonical_axes(fn: str, name: str, axes: Axes, ndim: int) -> tuple[int, ...]:
    """Turn ``axes`` into a sorted tuple of non-negative ints, refusing bad input.

    Args:
      fn: the public function name, for the message.
      name: the argument name, for the message.
      axes: an int or a sequence of ints, negative values counting from the end.
      ndim: the rank of the array the axes refer to.

    Returns:
      ``tuple(sorted(...))`` of axes in ``[0, ndim)``.

    Raises:
      TypeError: ``axes`` is not an int or a sequence of ints.
      ValueError: an axis is out of range, or named twice.
    """
    if isinstance(axes, (int, np.integer)) and not isinstance(axes, bool):
        raw = (int(axes),)
    elif isinstance(axes, Sequence) and not isinstance(axes, str):
        raw = tuple(axes)
        for a in raw:
            if not isinstance(a, (int, np.integer)) or isinstance(a, bool):
                raise TypeError(
                    f"{fn}: {name} must be an int or a tuple of ints; got {axes!r} "
                    f"(element {a!r} of type {type(a).__name__}). Pass e.g. {name}=-1 "
                    f"or {name}=(1, 2)."
                )
        raw = tuple(int(a) for a in raw)
    else:
        raise TypeError(
            f"{fn}: {name} must be an int or a tuple of ints; got {axes!r} of type "
            f"{type(axes).__name__}. Pass e.g. {name}=-1 or {name}=(1, 2)."
        )
    out = []
    for a in raw:
        if not -ndim <= a < ndim:
            raise ValueError(
                f"{fn}: {name}={axes!r} names axis {a}, which is out of range for an input "
                f"of rank {ndim} (valid axes are {-ndim}..{ndim - 1}). Pick axes that exist, "
                f"e.g. {name}=-1 for the last one."
            )
        out.append(a % ndim)
    if len(set(out)) != len(out):
        raise ValueError(
            f"{fn}: {name}={axes!r} names the same axis twice for an input of rank {ndim} "
            f"(canonical form {tuple(out)}). List each axis once."
        )
    return tuple(sorted(out))


def real_dtype(dtype: Any) -> jnp.dtype:
    """The real dtype of a floating or complex dtype (complex64 -> float32)."""
    return jnp.finfo(dtype).dtype


def check_floating(fn: str, x: Any, name: str = "x", *, complex_ok: bool = False) -> None:
    """Refuse non-floating inputs: normalizing integers silently truncates.

    With ``complex_ok`` complex dtypes are accepted too (the core norms support them,
    as flax does: complex mean, real variance of ``|x - mean|**2``).
    """
    dtype = jnp.result_type(x)
    if jnp.issubdtype(dtype, jnp.floating):
        return
    if complex_ok and jnp.issubdtype(dtype, jnp.complexfloating):
        return
    kinds = _FLOAT_NAMES + (" (or complex64/complex128)" if complex_ok else "")
    extra = (
        ""
        if complex_ok or not jnp.issubdtype(dtype, jnp.complexfloating)
        else " Complex input is supported by batch_norm, layer_norm, rms_norm, group_norm "
        "and instance_norm (and their modules), not here."
    )
    raise TypeError(
        f"{fn}: {name} must have a floating dtype ({kinds}); got {dtype} with "
        f"shape {jnp.shape(x)}. Cast it first, e.g. {name}.astype(jnp.float32).{extra}"
    )


def check_nonempty(fn: str, x: Any, reduce_axes: tuple[int, ...]) -> int:
    """Refuse empty inputs and return the number of elements in each reduced group."""
    shape = jnp.shape(x)
    if 0 in shape:
        raise ValueError(
            f"{fn}: x has shape {shape}, which holds no elements; statistics of an empty "
            f"array are undefined. Pass a non-empty batch."
        )
    return int(np.prod([shape[a] for a in reduce_axes], dtype=np.int64))


def check_epsilon(fn: str, epsilon: Any) -> None:
    """Refuse a negative epsilon (a traced epsilon is accepted unchecked)."""
    if isinstance(epsilon, jax.core.Tracer):
        return
    try:
        value = float(epsilon)
    except TypeError:
        raise TypeError(
            f"{fn}: epsilon must be a non-negative number; got {epsilon!r}. Pass e.g. epsilon=1e-5."
        ) from None
    if not value >= 0.0:
        raise ValueError(
            f"{fn}: epsilon must be >= 0 (it keeps 1/sqrt(var + epsilon) finite); got "
            f"{epsilon!r}. Pass e.g. epsilon=1e-5."
        )


def check_momentum(fn: str, momentum: Any, *, allow_none: bool = True) -> None:
    """Refuse a momentum outside [0, 1]; ``None`` means a cumulative average."""
    if momentum is None:
        if allow_none:
            return
        raise TypeError(f"{fn}: momentum must be a number in [0, 1]; got None.")
    if isinstance(momentum, jax.core.Tracer):
        return
    try:
        value = float(momentum)
    except TypeError:
        raise TypeError(
            f"{fn}: momentum must be a number in [0, 1] or None; got {momentum!r}."
        ) from None
    if not 0.0 <= value <= 1.0:
        hint = ""
        if 1.0 < value <= 100.0:
            hint = " (percentages are not accepted)"
        raise ValueError(
            f"{fn}: momentum must lie in [0, 1] (new = momentum*old + (1-momentum)*batch); "
            f"got {momentum!r}{hint}. torch's momentum=0.1 is our momentum=0.9; pass "
            f"momentum=None for torch's cumulative average."
        )


def check_param_shape(
    fn: str,
    name: str,
    value: Any,
    expected: tuple[int, ...],
    hint: str,
    *,
    complex_ok: bool = False,
) -> None:
    """Refuse a scale/bias whose shape differs from the feature shape."""
    if value is None:
        return
    check_floating(fn, value, name, complex_ok=complex_ok)
    shape = tuple(jnp.shape(value))
    if shape != tuple(expected):
        raise ValueError(
            f"{fn}: {name} has shape {shape} but {hint} need {tuple(expected)}; pass a "
            f"{name} of shape {tuple(expected)}."
        )


def check_mask(fn: str, mask: Any, x_shape: tuple[int, ...]) -> None:
    """Refuse a mask that is not boolean or does not broadcast to ``x``."""
    if mask is None:
        return
    dtype = jnp.result_type(mask)
    if dtype != jnp.bool_:
        raise TypeError(
            f"{fn}: mask must be a boolean array (True = use this element); got dtype {dtype}. "
            f"Pass e.g. mask=lengths_mask.astype(bool)."
        )
    mshape = tuple(jnp.shape(mask))
    try:
        out = np.broadcast_shapes(mshape, tuple(x_shape))
    except ValueError:
        out = None
    if out != tuple(x_shape):
        raise ValueError(
            f"{fn}: mask has shape {mshape}, which does not broadcast to x's shape "
            f"{tuple(x_shape)}. Give the mask x's shape, or keep size-1 axes where it should "
            f"broadcast (e.g. mask[..., None] for a per-token mask)."
        )


def check_training_flag(fn: str, training: Any) -> None:
    """Refuse a training flag that is not a Python bool."""
    if not isinstance(training, (bool, np.bool_)):
        raise TypeError(
            f"{fn}: training must be a Python bool (True: batch statistics and an update; "
            f"False: running statistics, no update); got {training!r} of type "
            f"{type(training).__name__}. It selects the program at trace time, so pass a "
            f"static bool (mark it static under jit: jax.jit(f, static_argnames='training'))."
        )


def check_stats(
    fn: str, stats: Any, feature_shape: tuple[int, ...], desc: str, x_dtype: Any = None
) -> None:
    """Refuse running statistics whose shapes do not fit, or real stats for complex x."""
    for field in ("mean", "var", "count"):
        if not hasattr(stats, field):
            raise TypeError(
                f"{fn}: stats must be a jaxnorm.BatchStats (fields mean, var, count); got "
                f"{type(stats).__name__}. Create it with "
                f"jaxnorm.init_batch_stats({tuple(feature_shape)})."
            )
    for field in ("mean", "var"):
        shape = tuple(jnp.shape(getattr(stats, field)))
        if shape != tuple(feature_shape):
            raise ValueError(
                f"{fn}: stats.{field} has shape {shape} but {desc} need "
                f"{tuple(feature_shape)}; create the stats with "
                f"jaxnorm.init_batch_stats({tuple(feature_shape)}) (stats from another layer, "
                f"or a different axis choice, do not fit)."
            )
        dtype = jnp.result_type(getattr(stats, field))
        if not jnp.issubdtype(dtype, jnp.floating) and not (
            field == "mean" and jnp.issubdtype(dtype, jnp.complexfloating)
        ):
            raise TypeError(
                f"{fn}: stats.{field} must be floating; got {dtype}. Create the stats with "
                f"jaxnorm.init_batch_stats({tuple(feature_shape)})."
            )
    if (
        x_dtype is not None
        and jnp.issubdtype(x_dtype, jnp.complexfloating)
        and not jnp.issubdtype(jnp.result_type(stats.mean), jnp.complexfloating)
    ):
        raise TypeError(
            f"{fn}: x is {jnp.dtype(x_dtype)} but stats.mean is "
            f"{jnp.result_type(stats.mean)}; a complex input has a complex running mean, "
            f"which a real one would silently truncate. Create the stats with "
            f"jaxnorm.init_batch_stats({tuple(feature_shape)}, dtype=jnp.{jnp.dtype(x_dtype)})."
        )
    if tuple(jnp.shape(stats.count)) != ():
        raise ValueError(
            f"{fn}: stats.count must be a scalar step counter; got shape "
            f"{tuple(jnp.shape(stats.count))}. Create the stats with "
            f"jaxnorm.init_batch_stats({tuple(feature_shape)})."
        )


def feature_shape_tuple(fn: str, feature_shape: Any) -> tuple[int, ...]:
    """An int or a sequence of ints (NumPy ints too) as a shape tuple, or a clear error."""
    if isinstance(feature_shape, (int, np.integer)) and not isinstance(feature_shape, bool):
        feature_shape = (feature_shape,)
    try:
        shape = tuple(int(s) for s in feature_shape)
        ok = all(s >= 0 for s in shape) and not any(isinstance(s, bool) for s in feature_shape)
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise TypeError(
            f"{fn}: feature_shape must be an int or a tuple of non-negative ints; got "
            f"{feature_shape!r}. Pass e.g. (64,) for 64 channels."
        )
    return shape


def check_instance_axes(where: str, feature_axes: Any, axes: tuple[int, ...], x_shape) -> None:
    """InstanceNorm's channel axes: not the batch axis 0, and something left to reduce."""
    shape = tuple(x_shape)
    if 0 in axes:
        raise ValueError(
            f"{where}: The channel axes cannot include the leading dimension as this is "
            f"assumed to be the batch axis. Got feature_axes={feature_axes!r} on x {shape}, "
            f"which names the batch axis 0; pass the channel axes only, e.g. feature_axes=-1 "
            f"for (N, H, W, C) input."
        )
    if not [a for a in range(1, len(shape)) if a not in axes]:
        raise ValueError(
            f"{where}: feature_axes={feature_axes!r} on x {shape} leave no axis to reduce "
            f"besides the batch axis 0, so each output would be just the bias (flax returns "
            f"that silently). Instance norm needs an axis beyond batch and channels, e.g. "
            f"(N, H, W, C); for (N, C) input use LayerNorm or BatchNorm."
        )
