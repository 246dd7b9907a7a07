"""The per-variable calls of the weight-norm wrappers, written once for linen and NNX.

flax's ``SpectralNorm`` and ``WeightNorm`` (linen and NNX) decide per variable of the
wrapped layer whether it is normalized and what state it needs; those rules live here,
the math in :mod:`jaxnorm.functional.weights`, and the variable plumbing in
``jaxnorm/linen/weights.py`` and ``jaxnorm/nnx/weights.py``.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from jaxnorm import _checks
from jaxnorm._checks import Axes
from jaxnorm.functional.weights import divide_by_sigma, spectral_normalize


def spectral_width(
    where: str, shape: tuple[int, ...], *, n_steps: int, error_on_non_matrix: bool
) -> int | None:
    """The length of a weight's ``u``, or ``None`` where flax leaves the weight alone.

    flax skips scalars and vectors (biases) and every weight when ``n_steps < 1``, and
    flattens a weight of rank > 2 to ``(-1, shape[-1])`` unless ``error_on_non_matrix``.
    """
    if len(shape) <= 1 or n_steps < 1:
        return None
    if len(shape) > 2 and error_on_non_matrix:
        raise ValueError(
            f"{where} has shape {tuple(shape)} (rank {len(shape)}), and error_on_non_matrix=True "
            f"refuses weights of rank > 2. Set error_on_non_matrix=False to flatten it to "
            f"(-1, {shape[-1]}) as flax does, or wrap only layers with matrix weights."
        )
    return int(shape[-1])


def spectral_call(
    w: jax.Array,
    u: jax.Array,
    sigma: jax.Array,
    *,
    update_stats: bool,
    use_stored_sigma: bool,
    n_steps: int,
    epsilon: float,
    dtype: Any,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``(w_sn, new_u, new_sigma)`` of one weight, new state in the stored dtypes.

    Power iteration from the stored ``u`` (flax), unless ``use_stored_sigma`` and not
    ``update_stats``: then ``w / sigma`` with the stored ``sigma`` and the state as is.
    """
    if use_stored_sigma and not update_stats:
        return divide_by_sigma(w, sigma, dtype=dtype), u, sigma
    w_sn, new_u, new_sigma = spectral_normalize(
        w, u, n_steps=n_steps, epsilon=epsilon, axis=-1, dtype=dtype
    )
    return w_sn, new_u, new_sigma.astype(jnp.result_type(sigma))


def scale_shape(where: str, shape: tuple[int, ...], feature_axes: Axes | None) -> tuple[int, ...]:
    """The shape of a weight's ``scale``: ``shape`` at ``feature_axes`` (``()`` for None)."""
    if feature_axes is None:
        return ()
    axes = _checks.canonical_axes(where, "feature_axes", feature_axes, len(shape))
    return tuple(shape[a] for a in axes)


def check_update_stats(where: str, update_stats: Any) -> None:
    """Refuse an ``update_stats`` that is not a Python bool (it selects code at trace time)."""
    if not isinstance(update_stats, bool):
        raise TypeError(
            f"{where}: update_stats must be a Python bool (it decides at trace time whether "
            f"u and sigma are written); got {update_stats!r} of type "
            f"{type(update_stats).__name__}. Pass update_stats=True while training, False "
            f"to evaluate."
        )
