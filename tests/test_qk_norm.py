"""QK-norm: per-head normalization of queries and keys against float64 NumPy."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

import jaxnorm
import jaxnorm.linen as jnn
import jaxnorm.nnx as jnnx


def _np_norm(x, kind, eps, scale=None, bias=None):
    x = np.asarray(x, np.float64)
    if kind == "rms":
        y = x / np.sqrt(np.mean(x**2, -1, keepdims=True) + eps)
    else:
        c = x - x.mean(-1, keepdims=True)
        y = c / np.sqrt(np.mean(c**2, -1, keepdims=True) + eps)
    if scale is not None:
        y = y * np.asarray(scale, np.float64)
    if bias is not None:
        y = y + np.asarray(bias, np.float64)
    return y


@pytest.mark.parametrize("kind", ["rms", "layer"])
@pytest.mark.parametrize("with_scale", [False, True])
def test_qk_norm_per_head_matches_numpy(kind, with_scale):
    rng = np.random.default_rng(0)
    # Grouped-query shapes: 4 query heads, 2 key heads, head_dim 16; offset means.
    q = (rng.normal(0, 2, (2, 5, 4, 16)) + 3).astype(np.float32)
    k = (rng.normal(0, 0.5, (2, 7, 2, 16)) - 1).astype(np.float32)
    qs = rng.normal(1, 0.2, 16).astype(np.float32) if with_scale else None
    ks = rng.normal(1, 0.2, 16).astype(np.float32) if with_scale else None
    qn, kn = jax.jit(jaxnorm.qk_norm, static_argnames="kind")(q, k, qs, ks, kind=kind)
    np.testing.assert_allclose(qn, _np_norm(q, kind, 1e-6, qs), rtol=2e-5, atol=2e-5)
    np.testing.assert_allclose(kn, _np_norm(k, kind, 1e-6, ks), rtol=2e-5, atol=2e-5)


def test_qk_norm_layer_bias_and_bf16():
    rng = np.random.default_rng(1)
    q = jnp.asarray(rng.normal(0, 2, (3, 2, 8)), jnp.bfloat16)
    k = jnp.asarray(rng.normal(0, 2, (3, 2, 8)), jnp.bfloat16)
    qb, kb = (jnp.asarray(rng.normal(0, 1, 8), jnp.float32) for _ in range(2))
    qn, kn = jaxnorm.qk_norm(q, k, kind="layer", q_bias=qb, k_bias=kb, epsilon=1e-5)
    assert qn.dtype == kn.dtype == jnp.bfloat16
    for out, x, b in ((qn, q, qb), (kn, k, kb)):
        ref = _np_norm(np.asarray(x, np.float64), "layer", 1e-5, None, np.asarray(b))
        np.testing.assert_allclose(np.asarray(out, np.float64), ref, rtol=1e-2, atol=1e-2)


def test_qk_norm_refuses_bad_arguments():
    q, k = jnp.ones((2, 4, 8)), jnp.ones((2, 4, 8))
    with pytest.raises(ValueError, match="kind must be one of"):
        jaxnorm.qk_norm(q, k, kind="l2")
    with pytest.raises(ValueError, match="share head_dim"):
        jaxnorm.qk_norm(q, jnp.ones((2, 4, 6)))
    with pytest.raises(ValueError, match="q_scale has shape \\(32,\\)"):
        jaxnorm.qk_norm(q, k, jnp.ones(32))
    with pytest.raises(ValueError, match="kind='rms' has no bias"):
        jaxnorm.qk_norm(q, k, q_bias=jnp.zeros(8))
    with pytest.raises(TypeError, match="k must have a floating dtype"):
        jaxnorm.qk_norm(q, jnp.ones((2, 4, 8), jnp.int32))


# --- modules --------------------------------------------------------------------------------


def _qk(seed=0, n=2, t=6, heads=4, head_dim=8):
    rng = np.random.default_rng(seed)
    q = (rng.normal(0, 2, (n, t, heads, head_dim)) + 1).astype(np.float32)
    k = rng.normal(0, 1, (n, t, heads, head_dim)).astype(np.float32)
    return rng, q, k


@pytest.mark.parametrize("kind", ["rms", "layer"])
def test_modules_match_torch_norm_per_head(kind):
    rng, q, k = _qk(1)
    qs, ks = rng.normal(1, 0.3, 8), rng.normal(1, 0.3, 8)
    tq, tk = torch.tensor(q, dtype=torch.float64), torch.tensor(k, dtype=torch.float64)
    if kind == "rms":
        norms = [torch.nn.RMSNorm(8, eps=1e-6).double() for _ in range(2)]
    else:
        norms = [torch.nn.LayerNorm(8, eps=1e-6, bias=False).double() for _ in range(2)]
    with torch.no_grad():
        norms[0].weight.copy_(torch.tensor(qs))
        norms[1].weight.copy_(torch.tensor(ks))
        ref_q, ref_k = norms[0](tq).numpy(), norms[1](tk).numpy()
    params = {"q_scale": jnp.asarray(qs, jnp.float32), "k_scale": jnp.asarray(ks, jnp.float32)}
    out_linen = jnn.QKNorm(kind=kind).apply({"params": params}, q, k)
    module = jnnx.QKNorm(8, kind=kind, rngs=nnx.Rngs(0))
    module.q_scale[...], module.k_scale[...] = params["q_scale"], params["k_scale"]
    for qn, kn in (out_linen, module(q, k)):
        np.testing.assert_allclose(qn, ref_q, rtol=2e-5, atol=2e-5)
        np.testing.assert_allclose(kn, ref_k, rtol=2e-5, atol=2e-5)


def _causal(t):
    return nn.make_causal_mask(jnp.ones((1, t)))


def test_linen_attention_with_qk_norm_matches_flax_normalize_qk():
    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.normal(0, 1, (2, 6, 16)), jnp.float32)
    mask = _causal(6)
    flax_mha = nn.MultiHeadDotProductAttention(num_heads=4, normalize_qk=True)
    ours = nn.MultiHeadDotProductAttention(
        num_heads=4, attention_fn=jnn.qk_norm_attention(kind="layer")
    )
    fp = flax_mha.init(jax.random.key(0), x, mask=mask)["params"]
    fp = jax.tree.map(lambda a: a * 0 + rng.normal(1, 0.5, a.shape).astype(np.float32), fp)
    op = ours.init(jax.random.key(0), x, mask=mask)["params"]
    assert jax.tree.map(jnp.shape, op["qk_norm"]) == {"k_scale": (4,), "q_scale": (4,)}
    op = {k: v for k, v in fp.items() if not k.endswith("_ln")}
    op["qk_norm"] = {"q_scale": fp["query_ln"]["scale"], "k_scale": fp["key_ln"]["scale"]}
    y_flax = flax_mha.apply({"params": fp}, x, mask=mask)
    y_ours = ours.apply({"params": op}, x, mask=mask)
    np.testing.assert_allclose(y_ours, y_flax, rtol=1e-5, atol=1e-5)
    # The mask reached the attention: without it the outputs differ.
    assert not np.allclose(ours.apply({"params": op}, x), y_ours, atol=1e-3)


def test_nnx_attention_with_qk_norm_matches_flax_normalize_qk_and_trains():
    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.normal(0, 1, (2, 6, 16)), jnp.float32)
    mask = _causal(6)
    kw = dict(num_heads=4, in_features=16, decode=False)
    flax_mha = nnx.MultiHeadAttention(**kw, normalize_qk=True, rngs=nnx.Rngs(0))
    ours = nnx.MultiHeadAttention(
        **kw,
        attention_fn=jnnx.QKNormAttention(4, kind="layer", rngs=nnx.Rngs(1)),
        rngs=nnx.Rngs(0),
    )
    for name in ("query", "key", "value", "out"):
        for p in ("kernel", "bias"):
            getattr(getattr(ours, name), p)[...] = getattr(getattr(flax_mha, name), p)[...]
    qs, ks = (jnp.asarray(rng.normal(1, 0.5, 4), jnp.float32) for _ in range(2))
    flax_mha.query_ln.scale[...], flax_mha.key_ln.scale[...] = qs, ks
    ours.attention_fn.qk_norm.q_scale[...], ours.attention_fn.qk_norm.k_scale[...] = qs, ks
    np.testing.assert_allclose(ours(x, mask=mask), flax_mha(x, mask=mask), rtol=1e-5, atol=1e-5)
    # The QK-norm scales are Params of the attention layer and get gradients.
    grads = nnx.grad(lambda m: jnp.sum(m(x, mask=mask) ** 2))(ours)
    g = grads["attention_fn"]["qk_norm"]["q_scale"][...]
    assert g.shape == (4,) and np.all(np.abs(np.asarray(g)) > 0)


def test_module_errors_name_the_module():
    with pytest.raises(ValueError, match="jaxnorm.nnx.QKNorm: kind='rms' has no bias"):
        jnnx.QKNorm(8, use_bias=True, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="jaxnorm.nnx.QKNorm: kind must be one of"):
        jnnx.QKNorm(8, kind="l2", rngs=nnx.Rngs(0))
    q = jnp.ones((1, 2, 2, 8))
    with pytest.raises(ValueError, match=r"jaxnorm.linen.QKNorm at '/': qk_norm: kind='rms'"):
        jnn.QKNorm(use_bias=True).init(jax.random.key(0), q, q)
