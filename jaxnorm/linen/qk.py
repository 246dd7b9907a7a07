"""QK-norm for flax linen attention: :class:`QKNorm` and :func:`qk_norm_attention`."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.typing import Dtype, Initializer
from jax.nn import initializers

from jaxnorm._layer_calls import QKNormCall
from jaxnorm.linen._base import _Layer


class QKNorm(QKNormCall, _Layer):
    """Per-head normalization of queries and keys, via :func:`jaxnorm.qk_norm`.

    .. math::

        \\hat q = \\mathrm{norm}(q)\\,\\gamma_q, \\qquad \\hat k = \\mathrm{norm}(k)\\,\\gamma_k

    over ``head_dim`` (the last axis) of ``(..., heads, head_dim)`` queries and keys;
    ``norm`` is RMSNorm (``kind="rms"``) or LayerNorm (``kind="layer"``). Variables:
    ``params/q_scale`` and ``params/k_scale`` of shape ``(head_dim,)`` (and
    ``q_bias``/``k_bias`` with ``use_bias``, LayerNorm only), one per layer, shared by
    the heads. To put it into ``flax.linen.MultiHeadDotProductAttention``, see
    :func:`qk_norm_attention`. ``kind="layer"`` without bias is flax's
    ``normalize_qk=True`` (whose ``query_ln/scale``/``key_ln/scale`` are our
    ``q_scale``/``k_scale``).

    Attributes:
      kind: ``"rms"`` (default; Gemma 3, Qwen3, OLMo-2) or ``"layer"`` (ViT-22B, flax).
      epsilon: added to the mean square / variance.
      dtype: output dtype; ``None`` keeps each input's dtype.
      param_dtype: dtype of the parameters.
      use_scale: learn ``q_scale``/``k_scale``.
      use_bias: learn ``q_bias``/``k_bias`` (``kind="layer"`` only).
      scale_init: initializer for the scales.
      bias_init: initializer for the biases.

    Example:
      >>> import jax, jax.numpy as jnp, jaxnorm.linen as jnn
      >>> q = k = jax.random.normal(jax.random.key(0), (2, 5, 4, 8))  # (N, T, heads, dim)
      >>> qkn = jnn.QKNorm()
      >>> variables = qkn.init(jax.random.key(1), q, k)
      >>> jax.tree.map(jnp.shape, variables["params"])
      {'k_scale': (8,), 'q_scale': (8,)}
    """

    kind: str = "rms"
    epsilon: float = 1e-6
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32
    use_scale: bool = True
    use_bias: bool = False
    scale_init: Initializer = initializers.ones
    bias_init: Initializer = initializers.zeros

    @nn.compact
    def __call__(self, q: jax.Array, k: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Normalize ``q`` and ``k`` per head.

        Args:
          q: queries ``(..., q_heads, head_dim)``.
          k: keys ``(..., kv_heads, head_dim)``.

        Returns:
          ``(q_normalized, k_normalized)``.

        Raises:
          ValueError, TypeError: the refusals of :func:`jaxnorm.qk_norm`, prefixed with
            this module's path.
        """
        shape = (jnp.shape(q)[-1],) if jnp.ndim(q) else ()
        params: dict[str, Any] = {}
        for name in ("q_scale", "k_scale"):
            params[name] = self._param_of(name, self.scale_init, shape) if self.use_scale else None
        for name in ("q_bias", "k_bias"):
            params[name] = self._param_of(name, self.bias_init, shape) if self.use_bias else None
        with self._errors():
            return self._normalize_qk(q, k, **params, dtype=self.dtype)


def qk_norm_attention(
    attention_fn: Callable[..., jax.Array] = nn.dot_product_attention,
    *,
    name: str = "qk_norm",
    **qk_norm_fields: Any,
) -> Callable[..., jax.Array]:
    """An ``attention_fn`` for ``flax.linen.MultiHeadDotProductAttention`` with QK-norm.

    The returned function normalizes ``query`` and ``key`` with a :class:`QKNorm`
    (created inside the attention layer, so its variables live under the layer, at
    ``params/<attention layer>/<name>/{q_scale, k_scale}``) and calls
    ``attention_fn`` with everything else unchanged. It has ``attention_fn``'s
    signature, so flax passes it the same keyword arguments (mask, dropout, ...).

    Differences from ``normalize_qk=True``: any :class:`QKNorm` (RMS, with bias,
    other ``epsilon``); with ``decode=True`` flax caches the keys *before* this
    normalization (flax's ``normalize_qk`` caches normalized keys), so each step
    re-normalizes the cached keys: the same outputs, since the normalization is per
    token, at some extra cost.

    Args:
      attention_fn: the attention to wrap (default flax's ``dot_product_attention``).
      name: the name of the :class:`QKNorm` submodule.
      **qk_norm_fields: :class:`QKNorm` fields, e.g. ``kind="layer"``.

    Returns:
      A function to pass as ``attention_fn=``.

    Example:
      >>> import jax, jax.numpy as jnp, flax.linen as nn, jaxnorm.linen as jnn
      >>> mha = nn.MultiHeadDotProductAttention(
      ...     num_heads=2, attention_fn=jnn.qk_norm_attention(kind="rms"))
      >>> x = jnp.ones((1, 3, 8))
      >>> params = mha.init(jax.random.key(0), x)["params"]
      >>> sorted(params["qk_norm"])
      ['k_scale', 'q_scale']
    """

    @functools.wraps(attention_fn)
    def attention(query: jax.Array, key: jax.Array, value: jax.Array, *args, **kwargs):
        query, key = QKNorm(name=name, **qk_norm_fields)(query, key)
        return attention_fn(query, key, value, *args, **kwargs)

    return attention
