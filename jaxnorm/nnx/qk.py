"""QK-norm for flax NNX attention: :class:`QKNorm` and :class:`QKNormAttention`."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from flax.typing import Dtype, Initializer

from jaxnorm._layer_calls import QKNormCall
from jaxnorm.functional.qk import check_qk_norm_kind
from jaxnorm.nnx._base import _NO_METADATA, _errors_at, _name, _optional_param, _value


class QKNorm(QKNormCall, nnx.Module):
    """Per-head normalization of queries and keys, via :func:`jaxnorm.qk_norm`.

    .. math::

        \\hat q = \\mathrm{norm}(q)\\,\\gamma_q, \\qquad \\hat k = \\mathrm{norm}(k)\\,\\gamma_k

    over ``head_dim`` (the last axis) of ``(..., heads, head_dim)`` inputs; ``norm``
    is RMSNorm (``kind="rms"``) or LayerNorm (``kind="layer"``). Params ``q_scale``
    and ``k_scale`` of shape ``(head_dim,)`` (and ``q_bias``/``k_bias`` with
    ``use_bias``, LayerNorm only), shared by the heads. ``kind="layer"`` without bias
    is flax's ``normalize_qk=True`` (``query_ln.scale``/``key_ln.scale`` are our
    ``q_scale``/``k_scale``). To put it into ``flax.nnx.MultiHeadAttention``, see
    :class:`QKNormAttention`.

    Args:
      head_dim: the size of the last axis of queries and keys.
      kind: ``"rms"`` (default; Gemma 3, Qwen3, OLMo-2) or ``"layer"`` (ViT-22B, flax).
      epsilon: added to the mean square / variance.
      dtype: output dtype; ``None`` keeps each input's dtype.
      param_dtype: dtype of the Params.
      use_scale: learn ``q_scale``/``k_scale``.
      use_bias: learn ``q_bias``/``k_bias`` (``kind="layer"`` only).
      scale_init: initializer for the scales.
      bias_init: initializer for the biases.
      rngs: random generators for the initializers.
      scale_metadata: extra metadata for the scale Params.
      bias_metadata: extra metadata for the bias Params.

    Raises:
      ValueError: an unknown ``kind``, or ``use_bias`` with ``kind="rms"``.

    Example:
      >>> import jax, jaxnorm.nnx as jnnx
      >>> from flax import nnx
      >>> qkn = jnnx.QKNorm(8, rngs=nnx.Rngs(0))
      >>> q = k = jax.random.normal(jax.random.key(0), (2, 5, 4, 8))  # (N, T, heads, dim)
      >>> qn, kn = qkn(q, k)
      >>> qn.shape, qkn.q_scale.shape
      ((2, 5, 4, 8), (8,))
    """

    def __init__(
        self,
        head_dim: int,
        *,
        kind: str = "rms",
        epsilon: float = 1e-6,
        dtype: Dtype | None = None,
        param_dtype: Dtype = jnp.float32,
        use_scale: bool = True,
        use_bias: bool = False,
        scale_init: Initializer = nnx.initializers.ones,
        bias_init: Initializer = nnx.initializers.zeros,
        rngs: nnx.Rngs,
        scale_metadata: Mapping[str, Any] = _NO_METADATA,
        bias_metadata: Mapping[str, Any] = _NO_METADATA,
    ):
        check_qk_norm_kind(_name(self), kind)
        if use_bias and kind == "rms":
            raise ValueError(
                f"{_name(self)}: kind='rms' has no bias (RMSNorm does not center); got "
                f"use_bias=True. Use kind='layer' for a bias, or use_bias=False."
            )
        scale = (use_scale, scale_init, rngs, head_dim, param_dtype, scale_metadata)
        bias = (use_bias, bias_init, rngs, head_dim, param_dtype, bias_metadata)
        self.q_scale = _optional_param(*scale)
        self.k_scale = _optional_param(*scale)
        self.q_bias = _optional_param(*bias)
        self.k_bias = _optional_param(*bias)
        self.head_dim = head_dim
        self.kind = kind
        self.epsilon = epsilon
        self.dtype = dtype
        self.param_dtype = param_dtype
        self.use_scale = use_scale
        self.use_bias = use_bias

    def __call__(self, q: jax.Array, k: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Normalize ``q`` (``(..., q_heads, head_dim)``) and ``k`` per head.

        Args:
          q: queries.
          k: keys.

        Returns:
          ``(q_normalized, k_normalized)``.

        Raises:
          ValueError, TypeError: the refusals of :func:`jaxnorm.qk_norm`, prefixed with
            the class name.
        """
        params = (self.q_scale, self.k_scale, self.q_bias, self.k_bias)
        with _errors_at(self):
            return self._normalize_qk(q, k, *(_value(p) for p in params), dtype=self.dtype)


class QKNormAttention(nnx.Module):
    """An ``attention_fn`` for ``flax.nnx.MultiHeadAttention`` that applies :class:`QKNorm`.

    ``nnx.MultiHeadAttention(..., attention_fn=QKNormAttention(head_dim, kind="layer",
    rngs=rngs))``: the module normalizes ``query`` and ``key`` with its ``qk_norm``
    (a :class:`QKNorm`, whose Params are part of the attention layer's state, at
    ``attention_fn.qk_norm``) and calls ``attention_fn`` with everything else
    unchanged. With ``decode=True``, flax caches the keys before this normalization
    (its own ``normalize_qk`` caches them after): the same outputs, with the cached
    keys re-normalized at each step.

    Args:
      head_dim: the size of the last axis of queries and keys.
      attention_fn: the attention to wrap (default flax's ``dot_product_attention``).
      kind: as :class:`QKNorm`.
      epsilon: as :class:`QKNorm`.
      dtype: as :class:`QKNorm`.
      param_dtype: as :class:`QKNorm`.
      use_scale: as :class:`QKNorm`.
      use_bias: as :class:`QKNorm`.
      rngs: random generators for the initializers.

    Example:
      >>> import jax.numpy as jnp, jaxnorm.nnx as jnnx
      >>> from flax import nnx
      >>> rngs = nnx.Rngs(0)
      >>> mha = nnx.MultiHeadAttention(
      ...     num_heads=2, in_features=8, decode=False, rngs=rngs,
      ...     attention_fn=jnnx.QKNormAttention(4, rngs=rngs))
      >>> mha(jnp.ones((1, 3, 8))).shape, mha.attention_fn.qk_norm.q_scale.shape
      ((1, 3, 8), (4,))
    """

    def __init__(
        self,
        head_dim: int,
        *,
        attention_fn: Callable[..., jax.Array] = nnx.dot_product_attention,
        kind: str = "rms",
        epsilon: float = 1e-6,
        dtype: Dtype | None = None,
        param_dtype: Dtype = jnp.float32,
        use_scale: bool = True,
        use_bias: bool = False,
        rngs: nnx.Rngs,
    ):
        self.qk_norm = QKNorm(
            head_dim,
            kind=kind,
            epsilon=epsilon,
            dtype=dtype,
            param_dtype=param_dtype,
            use_scale=use_scale,
            use_bias=use_bias,
            rngs=rngs,
        )
        self.attention_fn = attention_fn

    def __call__(
        self, query: jax.Array, key: jax.Array, value: jax.Array, *args: Any, **kwargs: Any
    ) -> jax.Array:
        """``attention_fn(*qk_norm(query, key), value, *args, **kwargs)``.

        Args:
          query: ``(..., length, heads, head_dim)``.
          key: ``(..., length, kv_heads, head_dim)``.
          value: as ``attention_fn``.
          *args: passed on to ``attention_fn``.
          **kwargs: passed on to ``attention_fn`` (mask, dropout, dtype, ...).

        Returns:
          ``attention_fn``'s output.
        """
        query, key = self.qk_norm(query, key)
        return self.attention_fn(query, key, value, *args, **kwargs)
