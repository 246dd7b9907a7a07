"""Per-sample normalizations: layer, RMS, instance and group norm."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import jax
import jax.numpy as jnp

from jaxnorm import _checks
from jaxnorm._checks import Axes
from jaxnorm.functional._core import (
    _broadcast_param,
    _normalize,
    _out_dtype,
    _pass_through_empty,
    _standardize,
    mask_safe,
)
from jaxnorm.stats import AxisName, moments, stat_dtype

CastOrder = Literal["scale_then_cast", "cast_then_scale"]
_CAST_ORDERS = ("scale_then_cast", "cast_then_scale")


def check_scale_offset(fn: str, scale_offset: Any, scale: Any) -> float:
    """Refuse a ``scale_offset`` that is not a finite Python number, or one with no scale.

    Returns the offset as a float.
    """
    if isinstance(scale_offset, bool) or not isinstance(scale_offset, (int, float)):
        raise TypeError(
            f"{fn}: scale_offset must be a Python float (the constant added to scale, e.g. "
            f"1.0 for Gemma's (1 + w)); got {scale_offset!r}."
        )
    if scale_offset != scale_offset or abs(scale_offset) == float("inf"):
        raise ValueError(f"{fn}: scale_offset must be finite; got {scale_offset!r}.")
    if scale is None and scale_offset != 0:
        raise ValueError(
            f"{fn}: scale_offset={scale_offset!r} shifts a scale, but no scale was given, so "
            f"there is nothing to offset. Pass the (zero-centred) scale, e.g. jnp.zeros(d) "
            f"for a multiplier of {scale_offset!r}, or scale_offset=0.0."
        )
    return float(scale_offset)


def check_cast_order(fn: str, cast_order: Any) -> None:
    """Refuse an unknown ``cast_order``."""
    if cast_order not in _CAST_ORDERS:
        raise ValueError(
            f"{fn}: cast_order must be one of {_CAST_ORDERS}; got {cast_order!r}. "
            f"'scale_then_cast' is Gemma's and flax's order (all in float32, one cast at the "
            f"end); 'cast_then_scale' is Llama's (weight * x_hat.to(input_dtype))."
        )


def offset_scale(scale: jax.Array | None, scale_offset: float, x_dtype: Any) -> jax.Array | None:
    """The multiplier ``scale_offset + scale``, formed in at least float32 (as Gemma's
    ``1.0 + self.weight.float()``); ``scale`` unchanged when the offset is 0."""
    if scale is None or scale_offset == 0:
        return scale
    real = _checks.real_dtype(stat_dtype(x_dtype))
    return jnp.asarray(scale).astype(jnp.promote_types(real, jnp.result_type(scale))) + (
        scale_offset
    )


def layer_norm(
    x: jax.Array,
    scale: jax.Array | None = None,
    bias: jax.Array | None = None,
    *,
    axis: Axes = -1,
    feature_axis: Axes | None = None,
    epsilon: float = 1e-6,
    mask: jax.Array | None = None,
    dtype: Any = None,
    axis_name: AxisName | None = None,
    axis_index_groups: Sequence[Sequence[int]] | None = None,
    scale_offset: float = 0.0,
) -> jax.Array:
    """Layer normalization: standardize each sample over ``axis``.

    .. math::

        y = \\frac{x - \\mathrm{E}_{axis}[x]}{\\sqrt{\\mathrm{Var}_{axis}[x] + \\epsilon}}
            \\,(o + \\gamma) + \\beta

    with ``o = scale_offset`` (default 0) and the biased variance, computed in >= float32
    by a method that stays exact for large means (see :mod:`jaxnorm.stats`).

    torch's ``nn.LayerNorm(normalized_shape)`` with ``k`` dims is
    ``axis=tuple(range(-k, 0))`` (torch's default ``eps`` is 1e-5, flax's 1e-6).

    Args:
      x: floating input.
      scale: optional ``gamma`` with the shape of ``x`` at ``feature_axis``.
      bias: optional ``beta`` with the same shape.
      axis: the reduced axis or axes (default the last).
      feature_axis: axes carrying ``scale``/``bias``; default ``axis``.
      epsilon: added to the variance, >= 0.
      mask: optional boolean array broadcastable to ``x``; ``False`` elements do not
        enter the statistics and may hold anything, NaN included (they are still
        normalized, but pass no gradient to the statistics or parameters; see
        :func:`mask_safe`). A group with no valid element passes through with mean 0
        and variance 1.
      dtype: output dtype; ``None`` keeps ``x.dtype``.
      axis_name: optional named axis to also reduce across (rarely needed).
      axis_index_groups: device groups for ``axis_name``.
      scale_offset: a constant added to ``scale``, in float32: ``1.0`` is the
        zero-centred ``(1 + w)`` parametrization of TransformerEngine's
        ``zero_centered_gamma`` (whose weight decay pulls the multiplier towards 1, not
        0). Needs a ``scale``.

    Returns:
      An array of ``x``'s shape.

    Raises:
      TypeError, ValueError: as :func:`batch_norm`, for the arguments it shares; a
        ``scale_offset`` that is not a finite number, or is nonzero without a scale.

    Example:
      >>> import jax.numpy as jnp, jaxnorm
      >>> y = jaxnorm.layer_norm(jnp.array([[1.0, 2.0, 3.0]]))
      >>> [round(float(v), 4) for v in y[0]]
      [-1.2247, 0.0, 1.2247]

    References:
      Ba, Kiros & Hinton (2016), "Layer Normalization".
    """
    fn = "layer_norm"
    _checks.check_floating(fn, x, complex_ok=True)
    reduce_axes = _checks.canonical_axes(fn, "axis", axis, jnp.ndim(x))
    feature_axes = (
        reduce_axes
        if feature_axis is None
        else _checks.canonical_axes(fn, "feature_axis", feature_axis, x.ndim)
    )
    scale_offset = check_scale_offset(fn, scale_offset, scale)
    desc = f"the feature axes {feature_axes} of x {tuple(x.shape)}"
    feature_shape = tuple(x.shape[a] for a in feature_axes)
    _checks.check_param_shape(fn, "scale", scale, feature_shape, desc, complex_ok=True)
    devices = dict(axis_name=axis_name, axis_index_groups=axis_index_groups)
    return _standardize(
        fn,
        x,
        offset_scale(scale, scale_offset, jnp.result_type(x)),
        bias,
        reduce_axes=reduce_axes,
        feature_axes=feature_axes,
        epsilon=epsilon,
        mask=mask,
        dtype=dtype,
        center=True,
        desc=f"the feature axes {feature_axes} of x {tuple(x.shape)}",
        **devices,
    )


def rms_norm(
    x: jax.Array,
    scale: jax.Array | None = None,
    *,
    axis: Axes = -1,
    feature_axis: Axes | None = None,
    epsilon: float = 1e-6,
    mask: jax.Array | None = None,
    dtype: Any = None,
    axis_name: AxisName | None = None,
    axis_index_groups: Sequence[Sequence[int]] | None = None,
    scale_offset: float = 0.0,
    cast_order: CastOrder = "scale_then_cast",
) -> jax.Array:
    """Root-mean-square normalization: rescale each sample, without centering.

    .. math::

        y = \\frac{x}{\\sqrt{\\mathrm{E}_{axis}[x^2] + \\epsilon}}\\,(o + \\gamma)

    with ``o = scale_offset`` (default 0). torch's ``nn.RMSNorm`` defaults ``eps`` to
    ``finfo(float32).eps`` (float64's for float64 layers; half-precision layers compute
    in float32); flax uses 1e-6.

    Two conventions of today's models, which differ in the last bits of a bf16 output:

    * Gemma's zero-centred scale, ``scale_offset=1.0``: the multiplier is ``1 + w``
      (HF ``GemmaRMSNorm``: ``x_hat * (1.0 + self.weight.float())``, weights
      initialized to zeros; TransformerEngine's ``zero_centered_gamma``).
    * Where the cast to the output dtype happens (``cast_order``).
      ``"scale_then_cast"`` (default; Gemma, flax, ``torch.nn.RMSNorm``): ``x_hat``
      times the multiplier in float32, one rounding at the end.
      ``"cast_then_scale"`` (Llama, Mistral, Qwen2 in HF transformers:
      ``self.weight * hidden_states.to(input_dtype)``): ``x_hat`` is rounded to the
      output dtype first, then multiplied by the multiplier in the promoted dtype of
      the two, and the product cast to the output dtype (with Llama's bf16 weights:
      a bf16 product of two bf16 numbers, rounded twice in all).

    Args:
      x: floating input.
      scale: optional ``gamma`` with the shape of ``x`` at ``feature_axis``.
      axis: the reduced axis or axes (default the last).
      feature_axis: axes carrying ``scale``; default ``axis``.
      epsilon: added to the mean square, >= 0.
      mask: optional boolean array broadcastable to ``x``.
      dtype: output dtype; ``None`` keeps ``x.dtype``.
      axis_name: optional named axis to also reduce across.
      axis_index_groups: device groups for ``axis_name``.
      scale_offset: a constant added to ``scale`` in float32 (``1.0``: Gemma's
        ``(1 + w)``). Needs a ``scale``.
      cast_order: ``"scale_then_cast"`` or ``"cast_then_scale"``, above.

    Returns:
      An array of ``x``'s shape.

    Raises:
      TypeError, ValueError: as :func:`layer_norm`; an unknown ``cast_order``.

    Example:
      >>> import jax.numpy as jnp, jaxnorm
      >>> y = jaxnorm.rms_norm(jnp.array([[3.0, 4.0]]), epsilon=0.0)
      >>> [round(float(v), 4) for v in y[0]]
      [0.8485, 1.1314]
      >>> w = jnp.zeros(2)  # Gemma's zero-centred weight: a multiplier of 1
      >>> [round(float(v), 4) for v in jaxnorm.rms_norm(
      ...     jnp.array([[3.0, 4.0]]), w, epsilon=0.0, scale_offset=1.0)[0]]
      [0.8485, 1.1314]

    References:
      Zhang & Sennrich (2019), "Root Mean Square Layer Normalization". Gemma Team
      (2024), "Gemma: Open Models Based on Gemini Research and Technology".
    """
    fn = "rms_norm"
    _checks.check_floating(fn, x, complex_ok=True)
    reduce_axes = _checks.canonical_axes(fn, "axis", axis, jnp.ndim(x))
    feature_axes = (
        reduce_axes
        if feature_axis is None
        else _checks.canonical_axes(fn, "feature_axis", feature_axis, x.ndim)
    )
    scale_offset = check_scale_offset(fn, scale_offset, scale)
    check_cast_order(fn, cast_order)
    desc = f"the feature axes {feature_axes} of x {tuple(x.shape)}"
    feature_shape = tuple(x.shape[a] for a in feature_axes)
    _checks.check_param_shape(fn, "scale", scale, feature_shape, desc, complex_ok=True)
    multiplier = offset_scale(scale, scale_offset, jnp.result_type(x))
    late = cast_order == "cast_then_scale" and multiplier is not None
    out_dtype = _out_dtype(fn, x, dtype)
    y = _standardize(
        fn,
        x,
        None if late else multiplier,
        None,
        reduce_axes=reduce_axes,
        feature_axes=feature_axes,
        epsilon=epsilon,
        mask=mask,
        dtype=out_dtype,
        axis_name=axis_name,
        axis_index_groups=axis_index_groups,
        center=False,
        desc=desc,
    )
    if not late:
        return y
    # Llama's order: x_hat already rounded to the output dtype; now the scale.
    w = _broadcast_param(multiplier, x.ndim, feature_axes, x.shape)
    return mask_safe(lambda v, w: (v * w).astype(out_dtype), y, mask, w)


def instance_norm(
    x: jax.Array,
    scale: jax.Array | None = None,
    bias: jax.Array | None = None,
    *,
    axis: Axes = -1,
    epsilon: float = 1e-6,
    mask: jax.Array | None = None,
    dtype: Any = None,
    axis_name: AxisName | None = None,
    axis_index_groups: Sequence[Sequence[int]] | None = None,
) -> jax.Array:
    """Instance normalization: standardize each (sample, channel) over the other axes.

    .. math::

        y_{n,\\dots,c} = \\frac{x_{n,\\dots,c} - \\mu_{n,c}}{\\sqrt{\\sigma^2_{n,c} +
        \\epsilon}}\\,\\gamma_c + \\beta_c

    with ``mu``/``sigma**2`` over every axis except the batch axis 0 and the channel
    ``axis``. torch's ``nn.InstanceNorm2d`` (channels at axis 1, ``eps=1e-5``,
    ``affine=False``) is ``instance_norm(x, axis=1, epsilon=1e-5)``.

    Args:
      x: floating input of rank >= 3, batch first.
      scale: optional per-channel ``gamma`` with the shape of ``x`` at ``axis``.
      bias: optional per-channel ``beta``, same shape.
      axis: the channel axis or axes (flax: -1, torch: 1); kept, like axis 0.
      epsilon: added to the variance, >= 0.
      mask: optional boolean array broadcastable to ``x``.
      dtype: output dtype; ``None`` keeps ``x.dtype``.
      axis_name: optional named axis to also reduce across (e.g. spatially sharded x).
      axis_index_groups: device groups for ``axis_name``.

    Returns:
      An array of ``x``'s shape.

    References:
      Ulyanov, Vedaldi & Lempitsky (2016), "Instance Normalization: The Missing
      Ingredient for Fast Stylization".
    """
    fn = "instance_norm"
    _checks.check_floating(fn, x, complex_ok=True)
    channels = _checks.canonical_axes(fn, "axis", axis, jnp.ndim(x))
    reduce_axes = tuple(a for a in range(1, x.ndim) if a not in channels)
    if 0 in channels or not reduce_axes:
        raise ValueError(
            f"{fn}: x must have rank >= 3 (a batch axis 0, a channel axis and at least one "
            f"other axis to reduce); got shape {tuple(x.shape)} with channel axis={axis!r}. "
            f"For (N, C) input use layer_norm or batch_norm instead."
        )
    devices = dict(axis_name=axis_name, axis_index_groups=axis_index_groups)
    return _standardize(
        fn,
        x,
        scale,
        bias,
        reduce_axes=reduce_axes,
        feature_axes=channels,
        epsilon=epsilon,
        mask=mask,
        dtype=dtype,
        center=True,
        desc=f"the channel axes axis={axis!r} of x {tuple(x.shape)}",
        **devices,
    )


def group_norm(
    x: jax.Array,
    scale: jax.Array | None = None,
    bias: jax.Array | None = None,
    *,
    num_groups: int | None = None,
    group_size: int | None = None,
    axis: int = -1,
    reduction_axes: Axes | None = None,
    epsilon: float = 1e-6,
    mask: jax.Array | None = None,
    dtype: Any = None,
    axis_name: AxisName | None = None,
    axis_index_groups: Sequence[Sequence[int]] | None = None,
) -> jax.Array:
    """Group normalization: split the channels into groups, standardize each group.

    .. math::

        y_{n,\\dots,c} = \\frac{x_{n,\\dots,c} - \\mu_{n,g(c)}}{\\sqrt{\\sigma^2_{n,g(c)}
        + \\epsilon}}\\,\\gamma_c + \\beta_c

    where group ``g(c) = c // group_size`` and the statistics run over the channels
    of the group and every axis of ``reduction_axes`` (default: all axes but the
    batch axis 0). ``num_groups=1`` is layer norm over all non-batch axes;
    ``group_size=1`` is instance norm. torch's ``nn.GroupNorm(G, C)`` on NCHW input is
    ``group_norm(x, num_groups=G, axis=1, epsilon=1e-5)``.

    Args:
      x: floating input, batch first.
      scale: optional per-channel ``gamma`` of shape ``(C,)``.
      bias: optional per-channel ``beta`` of shape ``(C,)``.
      num_groups: number of groups; give exactly one of this and ``group_size``.
      group_size: channels per group.
      axis: the channel axis (flax: -1, torch: 1).
      reduction_axes: axes reduced besides the within-group channels; must include
        the channel axis (as in flax). Default: every axis except 0.
      epsilon: added to the variance, >= 0.
      mask: optional boolean array broadcastable to ``x``.
      dtype: output dtype; ``None`` keeps ``x.dtype``.
      axis_name: optional named axis to also reduce across.
      axis_index_groups: device groups for ``axis_name``.

    Returns:
      An array of ``x``'s shape.

    Raises:
      ValueError: both or neither of ``num_groups``/``group_size``, a channel count
        they do not divide, or ``reduction_axes`` without the channel axis.

    References:
      Wu & He (2018), "Group Normalization".
    """
    fn = "group_norm"
    _checks.check_floating(fn, x, complex_ok=True)
    (channel,) = _checks.canonical_axes(fn, "axis", (axis,), jnp.ndim(x))
    num_channels = x.shape[channel]
    if (num_groups is None) == (group_size is None):
        raise ValueError(
            f"{fn}: give exactly one of num_groups and group_size; got num_groups="
            f"{num_groups!r}, group_size={group_size!r}. E.g. num_groups=32."
        )
    if num_groups is not None:
        if not isinstance(num_groups, int) or num_groups < 1 or num_channels % num_groups:
            raise ValueError(
                f"{fn}: num_groups must be a positive int dividing the {num_channels} "
                f"channels of x {tuple(x.shape)} (channel axis={axis!r}); got {num_groups!r}."
            )
        group_size = num_channels // num_groups
    else:
        if not isinstance(group_size, int) or group_size < 1 or num_channels % group_size:
            raise ValueError(
                f"{fn}: group_size must be a positive int dividing the {num_channels} "
                f"channels of x {tuple(x.shape)} (channel axis={axis!r}); got {group_size!r}."
            )
        num_groups = num_channels // group_size
    if reduction_axes is None:
        if x.ndim < 2 or channel == 0:
            raise ValueError(
                f"{fn}: x must be batch-first with the channel axis after axis 0; got shape "
                f"{tuple(x.shape)} with channel axis={axis!r}."
            )
        red = tuple(range(1, x.ndim))
    else:
        red = _checks.canonical_axes(fn, "reduction_axes", reduction_axes, x.ndim)
        if channel not in red:
            raise ValueError(
                f"{fn}: reduction_axes={reduction_axes!r} must include the channel axis "
                f"{channel} (the groups split it); add it."
            )
    desc = f"the {num_channels} channels of x {tuple(x.shape)}"
    _checks.check_nonempty(fn, x, red)
    _checks.check_param_shape(fn, "scale", scale, (num_channels,), desc, complex_ok=True)
    _checks.check_param_shape(fn, "bias", bias, (num_channels,), desc, complex_ok=True)
    _checks.check_epsilon(fn, epsilon)
    _checks.check_mask(fn, mask, x.shape)
    out_dtype = _out_dtype(fn, x, dtype)

    # Split the channel axis into (group, within-group) and reduce within groups.
    gshape = x.shape[:channel] + (num_groups, group_size) + x.shape[channel + 1 :]
    x_g = jnp.reshape(x, gshape)
    mask_g = None if mask is None else jnp.reshape(jnp.broadcast_to(mask, x.shape), gshape)
    red_g = tuple(
        sorted([a if a < channel else a + 1 for a in red if a != channel] + [channel + 1])
    )
    m = moments(x_g, red_g, mask=mask_g, axis_name=axis_name, axis_index_groups=axis_index_groups)

    # Expand the per-group statistics to per-channel ones, broadcastable to x.
    def per_channel(s: jax.Array) -> jax.Array:
        s = jnp.broadcast_to(s, s.shape[: channel + 1] + (group_size,) + s.shape[channel + 2 :])
        return jnp.reshape(s, s.shape[:channel] + (num_channels,) + s.shape[channel + 2 :])

    scale_b = _broadcast_param(scale, x.ndim, (channel,), x.shape)
    bias_b = _broadcast_param(bias, x.ndim, (channel,), x.shape)
    mean, var = _pass_through_empty(m.count, m.mean, m.var)
    return _normalize(
        x,
        per_channel(mean),
        per_channel(var),
        scale_b,
        bias_b,
        epsilon=epsilon,
        out_dtype=out_dtype,
        mask=mask,
    )
