"""Weight reparametrizations: spectral normalization and weight normalization.

These normalize a layer's *weights* rather than its activations. Both are pure: the
power-iteration state of spectral normalization (``u``, and the ``sigma`` it gives)
goes in and comes out explicitly, so the same function serves flax linen, flax NNX and
hand-written models.

Layouts. Flax kernels keep the output features last: ``Dense`` ``(in, out)``, ``Conv``
``(*window, in/groups, out)``. torch keeps them first: ``Linear`` ``(out, in)``,
``Conv*d`` ``(out, in/groups, *window)``, ``ConvTranspose*d`` ``(in, out/groups,
*window)``. Both functions take the output-feature axis as an argument (``axis`` /
``feature_axes``), with flax's default ``-1``; torch's weights use ``0`` (``1`` for a
transposed convolution).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxnorm import _checks
from jaxnorm._checks import Axes
from jaxnorm.functional._core import _out_dtype


class SpectralNormalized(NamedTuple):
    """What :func:`spectral_normalize` returns: the weight and the updated state.

    Attributes:
      weight: ``w / sigma``, of ``w``'s shape and dtype (``dtype`` if given).
      u: the next power-iteration vector, of ``u``'s shape and dtype, unit norm.
      sigma: ``()``, ``u``'s dtype: the estimate of ``w``'s largest singular value.
    """

    weight: jax.Array  # w / sigma: w's shape, dtype `dtype or w.dtype`
    u: jax.Array  # the next power-iteration vector: u's shape and dtype, unit norm
    sigma: jax.Array  # shape=(), u's dtype: the estimate of the largest singular value


def _l2_normalize(x: jax.Array, epsilon: float, axis: Any = None) -> jax.Array:
    """``x / sqrt(sum(x**2) + epsilon)`` over ``axis`` (flax's ``_l2_normalize``)."""
    return x * lax.rsqrt(jnp.sum(x * x, axis=axis, keepdims=True) + epsilon)


def _check_n_steps(fn: str, n_steps: Any) -> None:
    if not isinstance(n_steps, (int, np.integer)) or isinstance(n_steps, bool):
        raise TypeError(
            f"{fn}: n_steps must be a Python int (the number of power iterations, unrolled "
            f"at trace time); got {n_steps!r} of type {type(n_steps).__name__}. Pass e.g. "
            f"n_steps=1."
        )
    if n_steps < 1:
        raise ValueError(
            f"{fn}: n_steps must be >= 1 (each step refines u; sigma needs at least one); got "
            f"{n_steps}. To leave a weight unnormalized, do not call spectral_normalize on it "
            f"(flax's SpectralNorm modules skip every weight when n_steps < 1)."
        )


def spectral_normalize(
    w: jax.Array,
    u: jax.Array,
    *,
    n_steps: int = 1,
    epsilon: float = 1e-12,
    axis: int = -1,
    dtype: Any = None,
) -> SpectralNormalized:
    """Divide ``w`` by its largest singular value, estimated by power iteration.

    ``w`` is viewed as the matrix ``W`` of shape ``(m, n)`` whose columns are indexed by
    ``axis`` (``n = w.shape[axis]``) and whose rows run over every other axis, in order
    (``jnp.moveaxis(w, axis, -1).reshape(-1, n)``; for flax kernels, ``axis=-1``, this is
    flax's ``reshape(-1, out)``). Starting from the stored ``u`` (length ``n``), each of
    the ``n_steps`` steps computes

    .. math::

        v \\leftarrow \\frac{W u}{\\sqrt{\\lVert W u\\rVert^2 + \\epsilon}}, \\qquad
        u \\leftarrow \\frac{W^\\top v}{\\sqrt{\\lVert W^\\top v\\rVert^2 + \\epsilon}},

    then :math:`\\sigma = v^\\top W u` and the result is :math:`W / \\sigma` (``W``
    unchanged where :math:`\\sigma = 0`). ``u`` and ``v`` are held constant under
    differentiation; :math:`\\sigma` is not, so gradients flow through it to ``w``,
    as in the paper, flax and torch. This is flax's ``SpectralNorm`` step exactly.

    torch's ``torch.nn.utils.parametrizations.spectral_norm(m, n_power_iterations=1,
    eps=1e-12, dim=0)`` works on ``weight.flatten(1)`` after moving ``dim`` first, the
    transpose of our matrix for ``axis=dim``; its ``_u`` (length ``weight.shape[dim]``)
    is our ``u``. Three details differ: a training step starts from its stored ``_v``
    (``u = normalize(W_t v)``, then ``v = normalize(W_tᵀ u)``, :math:`\\sigma = u^\\top
    W_t v`), so its :math:`\\sigma` is half a step from ours; it normalizes by
    ``max(‖x‖, eps)`` instead of ``sqrt(‖x‖² + eps)``; and its eval mode runs no
    iteration, dividing by :math:`\\sigma = u^\\top W_t v` of the stored vectors (see
    :func:`divide_by_sigma`). The deprecated ``torch.nn.utils.spectral_norm``
    (``weight_orig``, ``weight_u``, ``weight_v``) iterates in our order: its training
    step is this function, up to the ``eps`` formula. All converge to the top singular
    pair.

    Args:
      w: floating weight of rank >= 2 (a Dense or Conv kernel, a torch weight).
      u: the stored right singular vector estimate, shape ``(n,)`` or ``(1, n)`` (flax
        stores ``(1, n)``), floating. Any non-zero start works; flax draws it from a
        normal distribution.
      n_steps: power iterations, >= 1 (unrolled at trace time).
      epsilon: added to the squared norms, >= 0.
      axis: the axis of ``w`` that indexes the matrix's columns: the output features
        (flax: -1; torch ``Linear``/``Conv``: 0, ``ConvTranspose``: 1).
      dtype: dtype of the normalized weight; ``None`` keeps ``w.dtype``.

    Returns:
      :class:`SpectralNormalized` ``(weight, u, sigma)``: the normalized weight, the
      next ``u`` (``u``'s shape and dtype) and :math:`\\sigma` (scalar, ``u``'s
      dtype). The iteration runs in ``promote(w.dtype, u.dtype, float32)``.

    Raises:
      TypeError: non-floating ``w``/``u``, or an ``n_steps`` that is not an int.
      ValueError: ``w`` of rank < 2, ``u`` of the wrong length, ``n_steps < 1``, a
        negative ``epsilon``, an ``axis`` out of range.

    Example:
      >>> import jax.numpy as jnp, jaxnorm
      >>> w = jnp.array([[3.0, 0.0], [0.0, 1.0]])
      >>> w_sn, u, sigma = jaxnorm.spectral_normalize(w, jnp.array([[1.0, 1.0]]), n_steps=20)
      >>> round(float(sigma), 4), [round(float(a), 4) for a in w_sn.ravel()]
      (3.0, [1.0, 0.0, 0.0, 0.3333])

    References:
      Miyato, Kataoka, Koyama & Yoshida (2018), "Spectral Normalization for Generative
      Adversarial Networks".
    """
    fn = "spectral_normalize"
    _checks.check_floating(fn, w, "w")
    _checks.check_floating(fn, u, "u")
    _checks.check_epsilon(fn, epsilon)
    _check_n_steps(fn, n_steps)
    if jnp.ndim(w) < 2:
        raise ValueError(
            f"{fn}: w has shape {jnp.shape(w)}, but spectral normalization needs a matrix "
            f"(rank >= 2; higher ranks are flattened around `axis`). A vector's largest "
            f"singular value is its l2 norm: use weight_normalize(w, feature_axes=None)."
        )
    (ax,) = _checks.canonical_axes(fn, "axis", axis, w.ndim)
    n = w.shape[ax]
    if tuple(u.shape) not in ((n,), (1, n)):
        raise ValueError(
            f"{fn}: u has shape {tuple(u.shape)}, but w {tuple(w.shape)} has {n} columns at "
            f"axis={axis} (the output features), so u needs shape ({n},) or (1, {n}). Start "
            f"from e.g. jax.random.normal(key, (1, {n})), or fix `axis` (torch weights: 0)."
        )
    out_dtype = _out_dtype(fn, w, dtype)
    compute = jnp.promote_types(jnp.promote_types(w.dtype, u.dtype), jnp.float32)
    w_mat = jnp.moveaxis(w, ax, -1).reshape(-1, n).astype(compute)
    u_row = u.reshape(1, n).astype(compute)
    for _ in range(n_steps):
        v_row = _l2_normalize(u_row @ w_mat.T, epsilon)
        u_row = _l2_normalize(v_row @ w_mat, epsilon)
    u_row = lax.stop_gradient(u_row)
    v_row = lax.stop_gradient(v_row)
    sigma = (v_row @ w_mat @ u_row.T)[0, 0]
    w_sn = divide_by_sigma(w, sigma, dtype=out_dtype)
    return SpectralNormalized(w_sn, u_row.reshape(u.shape).astype(u.dtype), sigma.astype(u.dtype))


def divide_by_sigma(w: jax.Array, sigma: jax.Array, *, dtype: Any = None) -> jax.Array:
    """``w / sigma`` for a known spectral norm estimate ``sigma`` (``w`` where it is 0).

    This is spectral normalization without power iteration: torch's eval mode, which
    divides by :math:`\\sigma = u^\\top W v` from its stored vectors, and the jaxnorm
    modules' ``use_stored_sigma=True`` evaluation, which divides by the ``sigma`` the
    last training step stored.

    Args:
      w: floating weight, any shape.
      sigma: scalar estimate of the largest singular value.
      dtype: output dtype; ``None`` keeps ``w.dtype``.

    Returns:
      ``w / sigma`` computed in ``promote(w.dtype, float32)``, of dtype ``dtype or w.dtype``.

    Raises:
      TypeError: non-floating ``w`` or ``sigma``.
      ValueError: a ``sigma`` that is not a scalar.

    Example:
      >>> import jax.numpy as jnp, jaxnorm
      >>> jaxnorm.divide_by_sigma(jnp.array([2.0, -4.0]), jnp.array(2.0)).tolist()
      [1.0, -2.0]
    """
    fn = "divide_by_sigma"
    _checks.check_floating(fn, w, "w")
    _checks.check_floating(fn, sigma, "sigma")
    if jnp.ndim(sigma) != 0:
        raise ValueError(
            f"{fn}: sigma must be a scalar (one spectral norm per weight); got shape "
            f"{jnp.shape(sigma)}."
        )
    out_dtype = _out_dtype(fn, w, dtype)
    compute = jnp.promote_types(w.dtype, jnp.float32)
    sigma = jnp.asarray(sigma).astype(compute)
    return (w.astype(compute) / jnp.where(sigma != 0, sigma, 1)).astype(out_dtype)


def weight_normalize(
    w: jax.Array,
    scale: jax.Array | None = None,
    *,
    feature_axes: Axes | None = -1,
    epsilon: float = 1e-12,
    dtype: Any = None,
) -> jax.Array:
    """Weight normalization: each feature's weights divided by their l2 norm, then scaled.

    .. math::

        \\bar w = g \\cdot \\frac{w}{\\sqrt{\\sum_{r} w^2 + \\epsilon}}

    where the sum runs over every axis *not* in ``feature_axes`` (one norm per feature,
    held by ``scale`` = ``g``, of shape ``w.shape`` at ``feature_axes``), or over all
    axes when ``feature_axes`` is ``None`` (``g`` a scalar). This is flax's
    ``WeightNorm`` (linen and NNX) for one variable: with a flax kernel, whose output
    features are last, the default ``feature_axes=-1`` gives every output unit a
    weight vector of unit norm times its ``g``.

    torch's ``torch.nn.utils.parametrizations.weight_norm(m, dim=0)`` keeps ``dim``
    instead, and torch weights put the output features first, so its default is the
    same reparametrization: ``original0`` (``g``, shape ``(out, 1, ...)``) is our
    ``scale`` flattened, ``original1`` (``v``) our ``w`` in torch's layout with
    ``feature_axes=0``, or transposed to flax's kernel layout with ``-1``;
    ``dim=None`` is ``feature_axes=None``. torch divides by the plain norm
    (``epsilon=0``).

    Args:
      w: floating weight (``v`` in the paper), rank >= 1; a vector with
        ``feature_axes=-1`` keeps only its signs (each element is its own norm), as in
        flax.
      scale: optional ``g``, of shape ``w.shape`` at ``feature_axes`` (``()`` for
        ``None``); ``None`` leaves the weights of unit norm.
      feature_axes: the axes that are kept, one norm per index; ``None`` (or ``()``)
        normalizes the whole tensor.
      epsilon: added to the squared norm, >= 0.
      dtype: output dtype; ``None`` keeps ``w.dtype``.

    Returns:
      The normalized weight, ``w``'s shape, computed in ``promote(w.dtype, float32)``,
      of dtype ``dtype or w.dtype``.

    Raises:
      TypeError: non-floating ``w``/``scale``, axes that are not ints.
      ValueError: axes out of range, a ``scale`` of the wrong shape, a negative
        ``epsilon``.

    Example:
      >>> import jax.numpy as jnp, jaxnorm
      >>> w = jnp.array([[3.0, 0.0], [4.0, 2.0]])  # (in, out): columns are the outputs
      >>> jaxnorm.weight_normalize(w, jnp.array([10.0, 1.0])).tolist()
      [[6.0, 0.0], [8.0, 1.0]]

    References:
      Salimans & Kingma (2016), "Weight Normalization: A Simple Reparameterization to
      Accelerate Training of Deep Neural Networks".
    """
    fn = "weight_normalize"
    _checks.check_floating(fn, w, "w")
    _checks.check_epsilon(fn, epsilon)
    ndim = jnp.ndim(w)
    axes = (
        ()
        if feature_axes is None
        else _checks.canonical_axes(fn, "feature_axes", feature_axes, ndim)
    )
    feature_shape = tuple(w.shape[a] for a in axes)
    _checks.check_param_shape(
        fn, "scale", scale, feature_shape, f"the feature axes {axes} of w {tuple(w.shape)}"
    )
    out_dtype = _out_dtype(fn, w, dtype)
    compute = jnp.promote_types(w.dtype, jnp.float32)
    reduce_axes = tuple(i for i in range(ndim) if i not in axes)
    w_bar = _l2_normalize(w.astype(compute), epsilon, axis=reduce_axes)
    if scale is not None:
        bshape = tuple(w.shape[i] if i in axes else 1 for i in range(ndim))
        w_bar = w_bar * jnp.reshape(scale, bshape).astype(jnp.promote_types(compute, scale.dtype))
    return w_bar.astype(out_dtype)
