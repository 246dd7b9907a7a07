"""Small Transformers with a pluggable norm from :mod:`jaxnorm.linen`, for the language runs.

Two models share one pre-norm block:

* `TransformerLM`: a decoder-only character language model (causal attention, learned
  positional embeddings) for ``charlm``.
* `TransformerClassifier`: a bidirectional encoder over padded verses that pools the real
  tokens into one label, for ``padding``.

A third, `CharTransformer` (``powernorm_lm``, ``qk_norm``, ``dyt``), is a decoder-only character
model whose norm is LayerNorm, BatchNorm, :class:`jaxnorm.variants_linen.PowerNorm`, RMSNorm,
Dynamic Tanh (:class:`jaxnorm.linen.DyT`) or none, with optional QK-norm
(:func:`jaxnorm.qk_norm`) in its attention.

Every normalization comes from `Norm`, which picks one of `NORM_KINDS`:

==================  ==============================================================
``layernorm``       ``jaxnorm.linen.LayerNorm`` over the features of each token
``rmsnorm``         ``jaxnorm.linen.RMSNorm`` over the features of each token
``batchnorm``       ``jaxnorm.linen.BatchNorm`` over batch x time per feature; padding
                    positions enter the statistics (the mask is ignored)
``batchnorm_masked`` ``jaxnorm.linen.BatchNorm`` with ``mask=``: only real tokens enter
``none``            identity
==================  ==============================================================

BatchNorm normalizes with batch statistics when ``train=True`` (and updates the running
statistics, so apply with ``mutable=['batch_stats']``) and with the running statistics when
``train=False``. Note that batch statistics over batch x time mix every position of the batch,
future ones included, so a BatchNorm LM in train mode is not strictly causal; in eval mode it
is a per-token affine map and the model is causal.
"""

from __future__ import annotations

import math
from typing import Literal

import flax.linen as nn
import jax
import jax.numpy as jnp

import jaxnorm
import jaxnorm.linen as jnn
import jaxnorm.variants_linen as vnn

NormKind = Literal["layernorm", "rmsnorm", "batchnorm", "batchnorm_masked", "none"]
NORM_KINDS: tuple[NormKind, ...] = ("layernorm", "rmsnorm", "batchnorm", "batchnorm_masked", "none")
CHAR_TRANSFORMER_NORMS = ("layernorm", "batchnorm", "powernorm")  # powernorm_lm's variants
# Every norm CharTransformer accepts.
CHAR_TRANSFORMER_ALL_NORMS = (*CHAR_TRANSFORMER_NORMS, "rmsnorm", "dyt", "none")
QK_NORM_KINDS = ("layer", "rms")  # CausalSelfAttention's qk_norm (None: no QK-norm)

# How figures and reports name and colour every norm of the language models.
NORM_LABELS = {
    "layernorm": "LayerNorm",
    "rmsnorm": "RMSNorm",
    "batchnorm": "BatchNorm",
    "batchnorm_masked": "BatchNorm + mask",
    "powernorm": "PowerNorm",
    "dyt": "DyT",
    "none": "no norm",
}
NORM_COLORS = {
    "layernorm": "tab:blue",
    "rmsnorm": "tab:green",
    "batchnorm": "tab:red",
    "batchnorm_masked": "tab:purple",
    "powernorm": "tab:green",
    "dyt": "tab:orange",
    "none": "tab:gray",
}


class Norm(nn.Module):
    """One normalization layer of the kind ``kind`` (see the module docstring).

    The input is recorded with ``sow('intermediates', 'norm_in', x)`` so experiments can
    measure the statistics a BatchNorm sees (apply with ``mutable=['intermediates']``).

    Attributes:
        kind: One of `NORM_KINDS`.
        momentum: BatchNorm running-average momentum (``new = m * old + (1 - m) * batch``).
    """

    kind: NormKind  # which normalization
    momentum: float = 0.99  # BatchNorm only: weight of the old running statistics

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool, mask: jax.Array | None = None) -> jax.Array:
        """Normalizes ``x`` of shape ``(batch, time, features)``.

        Args:
            x: Activations, shape ``(B, T, D)``.
            train: BatchNorm uses (and updates) batch statistics if True, running ones if False.
            mask: Optional bool ``(B, T)``, True on real tokens; only ``batchnorm_masked`` uses
                it (the per-token norms are unaffected by other positions anyway).

        Returns:
            The normalized activations, shape ``(B, T, D)``.

        Raises:
            ValueError: If ``kind`` is not one of `NORM_KINDS`.
        """
        self.sow("intermediates", "norm_in", x)
        if self.kind == "layernorm":
            return jnn.LayerNorm(epsilon=1e-5)(x)
        if self.kind == "rmsnorm":
            return jnn.RMSNorm(epsilon=1e-5)(x)
        if self.kind in ("batchnorm", "batchnorm_masked"):
            bn_mask = None
            if self.kind == "batchnorm_masked" and mask is not None:
                bn_mask = mask[..., None]  # (B, T, 1), broadcast over features
            return jnn.BatchNorm(use_running_average=not train, momentum=self.momentum)(
                x, mask=bn_mask
            )
        if self.kind == "none":
            return x
        raise ValueError(f"Norm: kind must be one of {NORM_KINDS}, got {self.kind!r}")


class Block(nn.Module):
    """A pre-norm Transformer block: ``x + attn(norm(x))``, then ``x + mlp(norm(x))``."""

    d_model: int  # width of the residual stream
    num_heads: int  # attention heads (d_model must be divisible by it)
    norm: NormKind  # normalization before attention and before the MLP
    mlp_ratio: int = 4  # hidden width of the MLP, in multiples of d_model
    momentum: float = 0.99  # BatchNorm running-average momentum

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        *,
        attn_mask: jax.Array,
        train: bool,
        token_mask: jax.Array | None = None,
    ) -> jax.Array:
        """Applies the block.

        Args:
            x: Residual stream, ``(B, T, D)``.
            attn_mask: Bool, broadcastable to ``(B, heads, T, T)``; True where a query may
                attend to a key.
            train: Train mode of the norms.
            token_mask: Optional bool ``(B, T)``, True on real tokens (for masked BatchNorm).

        Returns:
            The new residual stream, ``(B, T, D)``.
        """
        h = Norm(self.norm, self.momentum, name="norm_attn")(x, train=train, mask=token_mask)
        h = nn.MultiHeadDotProductAttention(
            num_heads=self.num_heads, qkv_features=self.d_model, deterministic=True, name="attn"
        )(h, mask=attn_mask)
        x = x + h
        h = Norm(self.norm, self.momentum, name="norm_mlp")(x, train=train, mask=token_mask)
        h = nn.Dense(self.mlp_ratio * self.d_model, name="mlp_in")(h)
        h = nn.gelu(h)
        h = nn.Dense(self.d_model, name="mlp_out")(h)
        return x + h


class TransformerLM(nn.Module):
    """Decoder-only character language model with a pluggable norm.

    Example:
        >>> model = TransformerLM(vocab_size=10, norm="layernorm", num_layers=1, context=8)
        >>> ids = jnp.zeros((2, 8), jnp.int32)
        >>> variables = model.init(jax.random.key(0), ids, train=False)
        >>> model.apply(variables, ids, train=False).shape
        (2, 8, 10)
    """

    vocab_size: int  # number of token ids (logits per position)
    norm: NormKind  # normalization used in every block and before the output head
    d_model: int = 128  # width of the residual stream
    num_heads: int = 4  # attention heads
    num_layers: int = 2  # Transformer blocks
    context: int = 128  # maximum sequence length (size of the positional table)
    momentum: float = 0.99  # BatchNorm running-average momentum

    @nn.compact
    def __call__(self, ids: jax.Array, *, train: bool) -> jax.Array:
        """Next-token logits.

        Args:
            ids: Int token ids, ``(B, T)`` with ``T <= context``.
            train: Train mode of the norms (BatchNorm batch vs running statistics).

        Returns:
            Logits ``(B, T, vocab_size)``; position ``t`` sees ``ids[:, :t + 1]`` only (in
            eval mode; see the module docstring for BatchNorm in train mode).
        """
        t = ids.shape[1]
        if t > self.context:
            raise ValueError(
                f"TransformerLM: sequence length {t} exceeds context {self.context}; "
                f"crop the input to the last {self.context} tokens"
            )
        x = nn.Embed(self.vocab_size, self.d_model, name="tok_embed")(ids)
        pos = self.param("pos_embed", nn.initializers.normal(0.02), (self.context, self.d_model))
        x = x + pos[None, :t]
        causal = nn.make_causal_mask(ids, dtype=jnp.bool_)  # (B, 1, T, T)
        for i in range(self.num_layers):
            x = Block(
                self.d_model, self.num_heads, self.norm, momentum=self.momentum, name=f"block{i}"
            )(x, attn_mask=causal, train=train)
        x = Norm(self.norm, self.momentum, name="norm_final")(x, train=train)
        return nn.Dense(self.vocab_size, name="head")(x)


class TransformerClassifier(nn.Module):
    """Bidirectional encoder over padded sequences; mean-pools real tokens into class logits.

    Attention never looks at padding keys and the pooling ignores padding, so padding can
    reach the real tokens only through the statistics of a BatchNorm that ignores the mask.

    Example:
        >>> model = TransformerClassifier(vocab_size=10, num_classes=2, norm="batchnorm_masked")
        >>> ids = jnp.ones((2, 5), jnp.int32)
        >>> mask = jnp.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], bool)
        >>> variables = model.init(jax.random.key(0), ids, mask, train=False)
        >>> model.apply(variables, ids, mask, train=False).shape
        (2, 2)
    """

    vocab_size: int  # number of token ids
    num_classes: int  # number of labels
    norm: NormKind  # normalization in every block and before pooling
    d_model: int = 64  # width of the residual stream
    num_heads: int = 4  # attention heads
    num_layers: int = 2  # Transformer blocks
    max_len: int = 256  # maximum (padded) sequence length
    momentum: float = 0.99  # BatchNorm running-average momentum

    @nn.compact
    def __call__(self, ids: jax.Array, mask: jax.Array, *, train: bool) -> jax.Array:
        """Class logits of each sequence.

        Args:
            ids: Int token ids, ``(B, T)`` with ``T <= max_len``; padding where ``mask`` is False.
            mask: Bool ``(B, T)``, True on real tokens.
            train: Train mode of the norms.

        Returns:
            Logits ``(B, num_classes)``.
        """
        t = ids.shape[1]
        x = nn.Embed(self.vocab_size, self.d_model, name="tok_embed")(ids)
        pos = self.param("pos_embed", nn.initializers.normal(0.02), (self.max_len, self.d_model))
        x = x + pos[None, :t]
        attn_mask = mask[:, None, None, :]  # (B, 1, 1, T): keys that are real tokens
        for i in range(self.num_layers):
            x = Block(
                self.d_model, self.num_heads, self.norm, momentum=self.momentum, name=f"block{i}"
            )(x, attn_mask=attn_mask, train=train, token_mask=mask)
        x = Norm(self.norm, self.momentum, name="norm_final")(x, train=train, mask=mask)
        weights = mask.astype(x.dtype)[..., None]
        pooled = (x * weights).sum(axis=1) / jnp.maximum(weights.sum(axis=1), 1.0)
        return nn.Dense(self.num_classes, name="head")(pooled)


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention over ``(batch, time, d_model)``, optionally QK-normed.

    With ``qk_norm`` set, queries and keys are normalized per head over ``head_dim`` by
    :func:`jaxnorm.qk_norm` (``"layer"``: LayerNorm, ``"rms"``: RMSNorm, each with a learnable
    ``(head_dim,)`` gain shared by the heads, initialized to 1) before
    ``logits = q . k / sqrt(head_dim)``. When the ``intermediates`` collection is mutable, the
    largest ``|logit|`` over the causal (query, key) pairs of the batch and every head is sown
    as ``attn_logit_max`` (a scalar); otherwise nothing extra is computed.
    """

    n_heads: int  # attention heads (d_model must be divisible by it)
    qk_norm: str | None = None  # None, or "layer"/"rms": normalize q and k per head (QK-norm)
    qk_epsilon: float = 1e-6  # QK-norm epsilon (flax's normalize_qk uses 1e-6)

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """Attend from each position to itself and the positions before it."""
        b, t, d = x.shape
        dh = d // self.n_heads
        qkv = nn.Dense(3 * d, use_bias=False)(x).reshape(b, t, 3, self.n_heads, dh)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        if self.qk_norm is not None:
            if self.qk_norm not in QK_NORM_KINDS:
                raise ValueError(
                    f"CausalSelfAttention: qk_norm must be None or one of {QK_NORM_KINDS}, "
                    f"got {self.qk_norm!r}"
                )
            q_scale = self.param("q_norm_scale", nn.initializers.ones, (dh,))
            k_scale = self.param("k_norm_scale", nn.initializers.ones, (dh,))
            q, k = jaxnorm.qk_norm(
                q, k, q_scale, k_scale, kind=self.qk_norm, epsilon=self.qk_epsilon
            )
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(dh)
        causal = jnp.tril(jnp.ones((t, t), bool))
        if self.is_mutable_collection("intermediates"):
            self.sow("intermediates", "attn_logit_max", jnp.max(jnp.where(causal, abs(logits), 0)))
        weights = jax.nn.softmax(jnp.where(causal, logits, -1e9), axis=-1)
        out = jnp.einsum("bhqk,bkhd->bqhd", weights, v).reshape(b, t, d)
        return nn.Dense(d, use_bias=False)(out)


class CharTransformer(nn.Module):
    """A pre-norm, decoder-only character Transformer with a choice of norm layer.

    Every norm (two per block and the final one) is the same kind: ``"layernorm"``
    (:class:`jaxnorm.linen.LayerNorm`), ``"batchnorm"`` (:class:`jaxnorm.linen.BatchNorm`
    over batch x time, running statistics in evaluation), ``"powernorm"``
    (:class:`jaxnorm.variants_linen.PowerNorm`), ``"rmsnorm"`` (:class:`jaxnorm.linen.RMSNorm`),
    ``"dyt"`` (:class:`jaxnorm.linen.DyT`, alpha initialized to ``dyt_alpha``) or ``"none"``
    (identity).
    ``qk_norm`` adds QK-norm to every attention layer (`CausalSelfAttention`).

    Attributes:
      vocab_size: number of token ids.
      context: maximum sequence length (learned position embeddings).
      d_model: residual width.
      n_layers: blocks.
      n_heads: attention heads.
      mlp_ratio: MLP hidden width / ``d_model``.
      norm: the norm kind, one of `CHAR_TRANSFORMER_ALL_NORMS`.
      bn_momentum: BatchNorm momentum.
      pn_momentum: PowerNorm momentum (forward and backward).
      qk_norm: None, or the QK-norm kind (``"layer"``/``"rms"``) of every attention layer.
      dyt_alpha: initial alpha of every DyT (``norm="dyt"`` only).
    """

    vocab_size: int
    context: int
    d_model: int
    n_layers: int
    n_heads: int
    mlp_ratio: int
    norm: str
    bn_momentum: float = 0.99
    pn_momentum: float = 0.9
    qk_norm: str | None = None
    dyt_alpha: float = 0.5

    def _norm(self, x: jax.Array, train: bool, name: str) -> jax.Array:
        if self.norm == "layernorm":
            return jnn.LayerNorm(name=name)(x)
        if self.norm == "batchnorm":
            return jnn.BatchNorm(momentum=self.bn_momentum, name=name)(
                x, use_running_average=not train
            )
        if self.norm == "powernorm":
            return vnn.PowerNorm(momentum=self.pn_momentum, name=name)(
                x, use_running_average=not train
            )
        if self.norm == "rmsnorm":
            return jnn.RMSNorm(name=name)(x)
        if self.norm == "dyt":
            return jnn.DyT(alpha_init=self.dyt_alpha, name=name)(x)
        if self.norm == "none":
            return x
        raise ValueError(
            f"CharTransformer: unknown norm {self.norm!r}; choose from {CHAR_TRANSFORMER_ALL_NORMS}"
        )

    @nn.compact
    def __call__(self, ids: jax.Array, train: bool) -> jax.Array:
        """Next-character logits ``(batch, time, vocab)`` of ``ids`` ``(batch, time)``."""
        t = ids.shape[1]
        pos = self.param("pos_embed", nn.initializers.normal(0.02), (self.context, self.d_model))
        x = nn.Embed(self.vocab_size, self.d_model)(ids) + pos[None, :t]
        for i in range(self.n_layers):
            x = x + CausalSelfAttention(self.n_heads, self.qk_norm, name=f"attn_{i}")(
                self._norm(x, train, f"norm_attn_{i}")
            )
            h = self._norm(x, train, f"norm_mlp_{i}")
            h = nn.Dense(self.mlp_ratio * self.d_model, name=f"mlp_in_{i}")(h)
            x = x + nn.Dense(self.d_model, name=f"mlp_out_{i}")(nn.gelu(h))
        return nn.Dense(self.vocab_size, name="head")(self._norm(x, train, "norm_final"))
