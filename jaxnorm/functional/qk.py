"""QK-norm: normalize attention queries and keys per head before the dot product."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from jaxnorm import _checks
from jaxnorm.functional.per_sample import layer_norm, rms_norm

QK_NORM_KINDS = ("rms", "layer")


def check_qk_norm_kind(fn: str, kind: Any) -> None:
    """Refuse a ``kind`` other than ``"rms"`` or ``"layer"``."""
    if not isinstance(kind, str) or kind not in QK_NORM_KINDS:
        raise ValueError(
            f"{fn}: kind must be one of {QK_NORM_KINDS} (RMSNorm as in Gemma 3/Qwen3/OLMo-2, "
            f"LayerNorm as in ViT-22B and flax's normalize_qk); got {kind!r}."
        )


def qk_norm(
    q: jax.Array,
    k: jax.Array,
    q_scale: jax.Array | None = None,
    k_scale: jax.Array | None = None,
    *,
    kind: str = "rms",
    epsilon: float = 1e-6,
    q_bias: jax.Array | None = None,
    k_bias: jax.Array | None = None,
    dtype: Any = None,
) -> tuple[jax.Array, jax.Array]:
    """Normalize queries and keys per head, over ``head_dim`` (the last axis).

    .. math::

        \\hat q_{\\dots h} = \\mathrm{norm}(q_{\\dots h,:})\\,\\gamma_q, \\qquad
        \\hat k_{\\dots h} = \\mathrm{norm}(k_{\\dots h,:})\\,\\gamma_k

    where ``norm`` is :func:`~jaxnorm.rms_norm` (``kind="rms"``:
    ``x / sqrt(mean(x**2) + eps)``) or :func:`~jaxnorm.layer_norm` (``kind="layer"``:
    ``(x - mean) / sqrt(var + eps)``, plus the optional biases) over the last axis of
    ``(..., heads, head_dim)`` inputs. Each head is normalized on its own and one
    ``(head_dim,)`` scale is shared by all heads, as in ViT-22B, flax's
    ``normalize_qk=True`` (LayerNorm without bias), Gemma 3, Qwen3 and OLMo-2's
    per-head variant. Statistics are float32 or wider; outputs keep the input dtypes.
    ``q`` and ``k`` may have different head counts (grouped-query attention).

    Normalizing over a whole ``(..., heads * head_dim)`` projection before splitting
    heads (OLMo-2's variant) is this function on the unsplit arrays with
    ``(heads * head_dim,)`` scales.

    Args:
      q: queries, ``(..., q_heads, head_dim)``.
      k: keys, ``(..., kv_heads, head_dim)``.
      q_scale: optional ``(head_dim,)`` gain for the queries.
      k_scale: optional ``(head_dim,)`` gain for the keys.
      kind: ``"rms"`` (default) or ``"layer"``.
      epsilon: added to the mean square / variance, >= 0. flax's ``normalize_qk``
        uses 1e-6; torch's ``nn.RMSNorm`` defaults to float32's machine epsilon.
      q_bias: optional ``(head_dim,)`` bias for the queries; ``kind="layer"`` only.
      k_bias: optional ``(head_dim,)`` bias for the keys; ``kind="layer"`` only.
      dtype: output dtype for both; ``None`` keeps each input's dtype.

    Returns:
      ``(q_normalized, k_normalized)`` with the shapes of ``q`` and ``k``.

    Raises:
      ValueError: an unknown ``kind``, biases with ``kind="rms"``, scalar inputs,
        ``q`` and ``k`` with different ``head_dim``, or a scale/bias of the wrong shape.
      TypeError: non-floating inputs.

    Example:
      >>> import jax.numpy as jnp, jaxnorm
      >>> q = jnp.array([[[3.0, 4.0]]])  # (tokens, heads, head_dim)
      >>> qn, kn = jaxnorm.qk_norm(q, 2 * q, epsilon=0.0)
      >>> [round(float(v), 4) for v in qn[0, 0]], bool(jnp.allclose(qn, kn))
      ([0.8485, 1.1314], True)

    References:
      Dehghani et al. (2023), "Scaling Vision Transformers to 22 Billion Parameters".
      Wortsman et al. (2023), "Small-scale proxies for large-scale Transformer training
      instabilities".
    """
    fn = "qk_norm"
    check_qk_norm_kind(fn, kind)
    _checks.check_floating(fn, q, "q")
    _checks.check_floating(fn, k, "k")
    for name, arr in (("q", q), ("k", k)):
        if jnp.ndim(arr) < 1:
            raise ValueError(
                f"{fn}: {name} must have a head_dim axis (shape (..., heads, head_dim)); "
                f"got a scalar. Split the projection into heads first."
            )
    if q.shape[-1] != k.shape[-1]:
        raise ValueError(
            f"{fn}: q and k must share head_dim (their last axis) for the q.k dot product; got "
            f"q {tuple(q.shape)} and k {tuple(k.shape)}. Check the head split of both projections."
        )
    if kind == "rms" and (q_bias is not None or k_bias is not None):
        raise ValueError(
            f"{fn}: kind='rms' has no bias (RMSNorm does not center); got q_bias/k_bias. "
            f"Use kind='layer' for a bias, or drop the biases."
        )
    head_dim = q.shape[-1]
    desc = f"head_dim {head_dim} of q {tuple(q.shape)} / k {tuple(k.shape)}"
    for name, p in (("q_scale", q_scale), ("k_scale", k_scale)):
        _checks.check_param_shape(fn, name, p, (head_dim,), desc)
    for name, p in (("q_bias", q_bias), ("k_bias", k_bias)):
        _checks.check_param_shape(fn, name, p, (head_dim,), desc)
    if kind == "rms":
        q_n = rms_norm(q, q_scale, axis=-1, epsilon=epsilon, dtype=dtype)
        k_n = rms_norm(k, k_scale, axis=-1, epsilon=epsilon, dtype=dtype)
    else:
        q_n = layer_norm(q, q_scale, q_bias, axis=-1, epsilon=epsilon, dtype=dtype)
        k_n = layer_norm(k, k_scale, k_bias, axis=-1, epsilon=epsilon, dtype=dtype)
    return q_n, k_n
