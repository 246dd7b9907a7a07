"""DyT (Dynamic Tanh): the function against float64 NumPy and the paper's torch module."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxnorm


def _np_dyt(x, alpha, scale=None, bias=None, feature_axis=-1):
    x = np.asarray(x, np.float64)
    y = np.tanh(np.float64(np.asarray(alpha, np.float64)) * x)
    shape = [1] * x.ndim
    shape[feature_axis] = x.shape[feature_axis]
    if scale is not None:
        y = y * np.asarray(scale, np.float64).reshape(shape)
    if bias is not None:
        y = y + np.asarray(bias, np.float64).reshape(shape)
    return y


@pytest.mark.parametrize("with_affine", [False, True])
@pytest.mark.parametrize("alpha", [0.5, 2.0, np.array([0.8], np.float32)])
def test_dyt_matches_numpy_float64(with_affine, alpha):
    rng = np.random.default_rng(0)
    x = rng.normal(0, 3, (4, 5, 16)).astype(np.float32)
    scale = rng.normal(1, 0.5, 16).astype(np.float32) if with_affine else None
    bias = rng.normal(0, 0.5, 16).astype(np.float32) if with_affine else None
    y = jax.jit(jaxnorm.dyt)(x, alpha, scale, bias)
    np.testing.assert_allclose(
        np.asarray(y), _np_dyt(x, np.ravel(alpha)[0], scale, bias), rtol=1e-6, atol=1e-6
    )
    assert y.dtype == jnp.float32


def test_dyt_channels_first_feature_axis():
    rng = np.random.default_rng(1)
    x = rng.normal(0, 2, (2, 6, 3, 3)).astype(np.float32)
    scale, bias = rng.normal(1, 0.3, 6), rng.normal(0, 0.3, 6)
    y = jaxnorm.dyt(x, 0.7, scale.astype(np.float32), bias.astype(np.float32), feature_axis=1)
    np.testing.assert_allclose(y, _np_dyt(x, 0.7, scale, bias, feature_axis=1), atol=2e-6)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_dyt_low_precision_computes_in_float32(dtype):
    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.normal(0, 3, (8, 32)), dtype)
    scale = jnp.asarray(rng.normal(1, 0.5, 32), dtype)
    y = jaxnorm.dyt(x, 0.37, scale)
    assert y.dtype == dtype
    ref = _np_dyt(np.asarray(x, np.float64), np.float32(0.37), np.asarray(scale, np.float64))
    # One rounding of the f32 result to the output dtype, nothing more.
    expected = np.asarray(jnp.asarray(ref.astype(np.float32)).astype(dtype), np.float64)
    np.testing.assert_array_equal(np.asarray(y, np.float64), expected)


def test_dyt_gradients_match_closed_form():
    rng = np.random.default_rng(3)
    x = rng.normal(0, 2, (5, 8))
    scale, bias, alpha = rng.normal(1, 0.3, 8), rng.normal(0, 0.3, 8), 0.6
    g = rng.normal(size=(5, 8))
    f = lambda x, a, s, b: jnp.sum(jaxnorm.dyt(x, a, s, b) * g)  # noqa: E731
    args = [jnp.asarray(v, jnp.float32) for v in (x, alpha, scale, bias)]
    dx, da, ds, db = jax.grad(f, argnums=(0, 1, 2, 3))(*args)
    t = np.tanh(alpha * x)
    sech2 = 1 - t**2
    np.testing.assert_allclose(dx, g * scale * sech2 * alpha, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(da, np.sum(g * scale * sech2 * x), rtol=1e-4)
    np.testing.assert_allclose(ds, np.sum(g * t, 0), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(db, np.sum(g, 0), rtol=1e-5, atol=1e-5)


def test_dyt_refuses_bad_inputs():
    x = jnp.ones((2, 4))
    with pytest.raises(TypeError, match="dyt: x must have a floating dtype"):
        jaxnorm.dyt(jnp.ones((2, 4), jnp.int32), 0.5)
    with pytest.raises(TypeError, match="floating"):
        jaxnorm.dyt(x + 0j, 0.5)
    with pytest.raises(ValueError, match="alpha has shape \\(3,\\)"):
        jaxnorm.dyt(x, jnp.ones(3))
    with pytest.raises(ValueError, match="scale has shape \\(3,\\)"):
        jaxnorm.dyt(x, 0.5, jnp.ones(3))
    with pytest.raises(TypeError, match="alpha"):
        jaxnorm.dyt(x, True)
