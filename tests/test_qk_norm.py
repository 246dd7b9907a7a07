"""QK-norm: per-head normalization of queries and keys against float64 NumPy."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxnorm


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
