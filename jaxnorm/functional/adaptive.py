"""Adaptive and conditional norms: DiT's adaLN modulation and class-conditional BatchNorm."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from typing_extensions import Unpack

from jaxnorm import _checks
from jaxnorm._checks import Axes
from jaxnorm._signatures import extends
from jaxnorm.functional._core import _out_dtype, mask_safe
from jaxnorm.functional.batch import _BatchNormKeywords, batch_norm
from jaxnorm.functional.per_sample import layer_norm
from jaxnorm.state import BatchStats
from jaxnorm.stats import stat_dtype


def _per_example(fn: str, name: str, value: Any, x_shape: tuple[int, ...]) -> jax.Array | None:
    """``value`` broadcastable to ``x``: a ``(N, C)`` per-example array gets size-1 axes
    between its two axes for an ``x`` of rank > 2 (DiT's ``unsqueeze(1)``)."""
    if value is None:
        return None
    _checks.check_floating(fn, value, name)
    shape = tuple(jnp.shape(value))
    ndim = len(x_shape)
    if len(shape) == 2 and ndim > 2:
        if shape != (x_shape[0], x_shape[-1]):
            raise ValueError(
                f"{fn}: a 2-D {name} is per example, (N, C) = {(x_shape[0], x_shape[-1])} for "
                f"x {x_shape}; got {shape}. Pass one row per example, or an array that "
                f"broadcasts to x's shape (e.g. {name}[:, None, :])."
            )
        return jnp.reshape(value, (shape[0],) + (1,) * (ndim - 2) + (shape[1],))
    try:
        out = np.broadcast_shapes(shape, x_shape)
    except ValueError:
        out = None
    if out != x_shape:
        raise ValueError(
            f"{fn}: {name} has shape {shape}, which fits neither x {x_shape} by broadcasting "
            f"nor the per-example form (N, C) = {(x_shape[0], x_shape[-1])}. Pass a (C,), "
            f"(N, C) or broadcastable {name}."
        )
    return jnp.asarray(value)


class Modulation(NamedTuple):
    """One adaLN modulation: what a conditioning vector sets for one normalized branch."""

    shift: jax.Array  # shape=(N, C): the additive term of ada_layer_norm
    scale: jax.Array  # shape=(N, C): the multiplicative term, applied as (1 + scale)
    gate: jax.Array | None  # shape=(N, C) or None: the residual gate, x + gate * branch(...)


def split_modulation(
    h: jax.Array, *, num_modulations: int, use_gate: bool = True
) -> tuple[Modulation, ...]:
    """Split a ``(N, num_modulations * k * C)`` projection into :class:`Modulation` s.

    ``k`` is 3 (shift, scale, gate) with ``use_gate``, else 2 (shift, scale), in DiT's
    order: ``shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp =
    adaLN_modulation(c).chunk(6, dim=1)`` is ``split_modulation(h, num_modulations=2)``
    and the final layer's ``shift, scale = ....chunk(2, dim=1)`` is
    ``split_modulation(h, num_modulations=1, use_gate=False)``.

    Args:
      h: the projected conditioning, ``(..., num_modulations * k * C)``.
      num_modulations: how many normalized branches it modulates (>= 1).
      use_gate: whether each modulation carries a gate.

    Returns:
      ``num_modulations`` :class:`Modulation` s of shape ``(..., C)`` each
      (``gate=None`` without ``use_gate``).

    Raises:
      ValueError: a last axis that does not split into that many equal chunks.

    Example:
      >>> import jax.numpy as jnp
      >>> from jaxnorm.functional.adaptive import split_modulation
      >>> (m,) = split_modulation(jnp.arange(6.0)[None], num_modulations=1)
      >>> m.shift.tolist(), m.scale.tolist(), m.gate.tolist()
      ([[0.0, 1.0]], [[2.0, 3.0]], [[4.0, 5.0]])
    """
    k = 3 if use_gate else 2
    if not isinstance(num_modulations, int) or num_modulations < 1:
        raise ValueError(
            f"split_modulation: num_modulations must be a positive int; got {num_modulations!r}."
        )
    width = jnp.shape(h)[-1] if jnp.ndim(h) else 0
    if width == 0 or width % (k * num_modulations):
        raise ValueError(
            f"split_modulation: the last axis of h {tuple(jnp.shape(h))} must split into "
            f"num_modulations * {k} = {k * num_modulations} equal chunks "
            f"({'shift, scale, gate' if use_gate else 'shift, scale'} per modulation); "
            f"project to num_modulations * {k} * features."
        )
    parts = jnp.split(h, k * num_modulations, axis=-1)
    return tuple(
        Modulation(parts[k * i], parts[k * i + 1], parts[k * i + 2] if use_gate else None)
        for i in range(num_modulations)
    )


def ada_layer_norm(
    x: jax.Array,
    shift: jax.Array | None,
    scale: jax.Array | None,
    *,
    epsilon: float = 1e-6,
    mask: jax.Array | None = None,
    dtype: Any = None,
) -> jax.Array:
    """Adaptive LayerNorm: LayerNorm without parameters, modulated by ``shift``/``scale``.

    .. math::

        y = \\frac{x - \\mathrm{E}[x]}{\\sqrt{\\mathrm{Var}[x] + \\epsilon}}
            \\,(1 + s) + b

    over the last axis (the channels), with ``s = scale`` and ``b = shift`` computed
    from a conditioning vector (DiT's ``modulate(norm(x), shift, scale)``, norm being
    ``nn.LayerNorm(C, elementwise_affine=False, eps=1e-6)``). The ``1 + scale`` form
    makes ``shift = scale = 0`` the plain normalization, which is what adaLN-Zero's
    zero-initialized modulation starts from (see :class:`jaxnorm.linen.AdaLNZero`).
    Statistics and the modulation are computed in ``promote(x.dtype, float32)``; the
    output has ``x``'s dtype unless ``dtype`` says otherwise.

    ``shift``/``scale`` may be per example, ``(N, C)`` for ``x`` of shape
    ``(N, ..., C)`` (size-1 axes are inserted, as DiT's ``unsqueeze(1)``), or any
    shape that broadcasts to ``x`` (``(C,)``, ``(N, 1, C)``, per token ``(N, T, C)``).

    Args:
      x: floating input ``(N, ..., C)``.
      shift: the additive modulation ``b``, or ``None`` for none.
      scale: the multiplicative modulation ``s`` (applied as ``1 + s``), or ``None``.
      epsilon: added to the variance, >= 0 (DiT: 1e-6).
      mask: optional boolean array broadcastable to ``x``, as :func:`jaxnorm.layer_norm`
        (masked-out elements pass no gradient to the statistics, ``shift`` or ``scale``).
      dtype: output dtype; ``None`` keeps ``x.dtype``.

    Returns:
      An array of ``x``'s shape.

    Raises:
      ValueError: a ``shift``/``scale`` that fits ``x`` in neither form.
      TypeError: non-floating inputs.

    Example:
      >>> import jax.numpy as jnp, jaxnorm
      >>> x = jnp.array([[1.0, 2.0, 3.0]])
      >>> y = jaxnorm.ada_layer_norm(x, jnp.full((1, 3), 10.0), jnp.ones((1, 3)), epsilon=0.0)
      >>> [round(float(v), 4) for v in y[0]]  # 2 * layer_norm(x) + 10
      [7.5505, 10.0, 12.4495]

    References:
      Peebles & Xie (2023), "Scalable Diffusion Models with Transformers" (DiT).
      Perez et al. (2018), "FiLM: Visual Reasoning with a General Conditioning Layer".
    """
    fn = "ada_layer_norm"
    _checks.check_floating(fn, x)
    if jnp.ndim(x) < 1:
        raise ValueError(f"{fn}: x must have a channel axis (shape (N, ..., C)); got a scalar.")
    x_shape = tuple(x.shape)
    shift_b = _per_example(fn, "shift", shift, x_shape)
    scale_b = _per_example(fn, "scale", scale, x_shape)
    out_dtype = _out_dtype(fn, x, dtype)
    sd = stat_dtype(x.dtype)
    y = layer_norm(x, axis=-1, epsilon=epsilon, mask=mask, dtype=sd)
    return mask_safe(_affine(sd, out_dtype, offset=1.0), y, mask, scale_b, shift_b)


def _affine(sd: Any, out_dtype: Any, *, offset: float):
    """``y * (offset + gain) + bias`` in ``sd``, cast to ``out_dtype``; a ``None`` term is
    left out (for :func:`mask_safe`: masked-out elements pass no gradient to the terms)."""

    def apply(y: jax.Array, gain: jax.Array | None, bias: jax.Array | None) -> jax.Array:
        if gain is not None:
            y = y * (offset + gain.astype(sd))
        if bias is not None:
            y = y + bias.astype(sd)
        return y.astype(out_dtype)

    return apply


def _class_params(
    fn: str, name: str, table: Any, labels: jax.Array, bshape: tuple[int, ...], fshape, desc
) -> jax.Array | None:
    """``table[labels]`` reshaped to ``bshape``; NaN rows for labels outside the table."""
    if table is None:
        return None
    _checks.check_floating(fn, table, name)
    shape = tuple(jnp.shape(table))
    if len(shape) != 1 + len(fshape) or shape[1:] != tuple(fshape) or shape[0] < 1:
        raise ValueError(
            f"{fn}: {name} must have shape (num_classes, *feature_shape) = (K, "
            f"{', '.join(map(str, fshape))}) for {desc}; got {shape}. One row per class."
        )
    num_classes = shape[0]
    valid = (labels >= 0) & (labels < num_classes)
    rows = jnp.take(jnp.asarray(table), jnp.clip(labels, 0, num_classes - 1), axis=0)
    nan = jnp.asarray(jnp.nan, rows.dtype)
    rows = jnp.where(jnp.reshape(valid, (-1,) + (1,) * len(fshape)), rows, nan)
    return jnp.reshape(rows, bshape)


@extends(batch_norm)
def conditional_batch_norm(
    x: jax.Array,
    stats: BatchStats,
    labels: jax.Array,
    scale_table: jax.Array | None = None,
    bias_table: jax.Array | None = None,
    *,
    training: bool,
    axis: Axes = -1,
    dtype: Any = None,
    **options: Unpack[_BatchNormKeywords],
) -> tuple[jax.Array, BatchStats]:
    """Class-conditional batch normalization: shared statistics, per-class ``gamma``/``beta``.

    .. math::

        y_n = \\frac{x_n - \\mu}{\\sqrt{\\sigma^2 + \\epsilon}}\\,\\gamma_{c_n} +
        \\beta_{c_n}

    ``mu``/``sigma**2`` (and the running statistics) are exactly those of
    :func:`jaxnorm.batch_norm` without parameters, shared by all classes; example
    ``n`` of class ``c_n = labels[n]`` is then scaled and shifted by row ``c_n`` of
    ``scale_table``/``bias_table`` (embedding tables, as in BigGAN and SNGAN's
    conditional BatchNorm). Axis 0 is the batch axis that ``labels`` index.
    A label outside ``[0, num_classes)`` gives NaN outputs for its example (an
    embedding lookup in torch would raise; under ``jit`` that check cannot run).

    Args:
      x: floating input ``(N, ..., C)`` (``axis`` selects the feature axes).
      stats: running statistics from :func:`jaxnorm.init_batch_stats`.
      labels: integer class of each example, shape ``(N,)``.
      scale_table: optional ``(num_classes, *feature_shape)`` gains (torch: ones).
      bias_table: optional ``(num_classes, *feature_shape)`` biases (torch: zeros).
      training: required; as :func:`jaxnorm.batch_norm`.
      axis: the feature axis or axes (kept); must not include the batch axis 0.
      dtype: output dtype; ``None`` keeps ``x.dtype``.
      momentum: weight of the old running value (torch's 0.1 is our 0.9).
      epsilon: added to the variance.
      axis_name: named device axis to merge statistics across.
      axis_index_groups: device groups for ``axis_name``.
      mask: optional boolean array broadcastable to ``x``; as :func:`jaxnorm.batch_norm`
        (masked-out elements pass no gradient to the statistics or tables).
      unbiased_running_var: torch's Bessel-corrected running variance.
      skip_nonfinite: keep running statistics of non-finite batches unchanged.

    Returns:
      ``(y, new_stats)`` as :func:`jaxnorm.batch_norm`.

    Raises:
      TypeError: non-integer ``labels``, and the refusals of :func:`jaxnorm.batch_norm`.
      ValueError: ``labels`` not of shape ``(N,)``, tables of the wrong shape or with
        different class counts, ``axis`` containing 0.

    Example:
      >>> import jax.numpy as jnp, jaxnorm
      >>> x = jnp.array([[0.0], [2.0]])
      >>> stats = jaxnorm.init_batch_stats((1,))
      >>> y, stats = jaxnorm.conditional_batch_norm(
      ...     x, stats, jnp.array([0, 1]), jnp.array([[1.0], [3.0]]), training=True,
      ...     epsilon=0.0)
      >>> [float(v) for v in y[:, 0]]  # batch-normalized [-1, 1], class gains 1 and 3
      [-1.0, 3.0]

    References:
      de Vries et al. (2017), "Modulating early visual processing by language";
      Dumoulin, Shlens & Kudlur (2017), "A Learned Representation for Artistic Style".
    """
    fn = "conditional_batch_norm"
    _checks.check_floating(fn, x)
    feature_axes = _checks.canonical_axes(fn, "axis", axis, jnp.ndim(x))
    if 0 in feature_axes:
        raise ValueError(
            f"{fn}: axis={axis!r} includes axis 0, the batch axis that labels index; the "
            f"feature axes must come after it (e.g. axis=-1 for (N, ..., C), axis=1 for NCHW)."
        )
    label_dtype = jnp.result_type(labels)
    if not jnp.issubdtype(label_dtype, jnp.integer):
        raise TypeError(
            f"{fn}: labels must be integer class indices; got dtype {label_dtype}. Pass "
            f"e.g. labels.astype(jnp.int32)."
        )
    if tuple(jnp.shape(labels)) != (x.shape[0],):
        raise ValueError(
            f"{fn}: labels must have shape (N,) = ({x.shape[0]},), one class per example of "
            f"x {tuple(x.shape)} (batch axis 0); got {tuple(jnp.shape(labels))}."
        )
    fshape = tuple(x.shape[a] for a in feature_axes)
    bshape = tuple(x.shape[a] if a == 0 or a in feature_axes else 1 for a in range(jnp.ndim(x)))
    desc = f"the feature axes axis={axis!r} of x {tuple(x.shape)}"
    gamma = _class_params(fn, "scale_table", scale_table, labels, bshape, fshape, desc)
    beta = _class_params(fn, "bias_table", bias_table, labels, bshape, fshape, desc)
    if scale_table is not None and bias_table is not None:
        if jnp.shape(scale_table)[0] != jnp.shape(bias_table)[0]:
            raise ValueError(
                f"{fn}: scale_table has {jnp.shape(scale_table)[0]} classes but bias_table "
                f"has {jnp.shape(bias_table)[0]}; both need one row per class."
            )
    out_dtype = _out_dtype(fn, x, dtype)
    sd = stat_dtype(x.dtype)
    y, new_stats = batch_norm(x, stats, training=training, axis=axis, dtype=sd, **options)
    mask = options["mask"]
    return mask_safe(_affine(sd, out_dtype, offset=0.0), y, mask, gamma, beta), new_stats
