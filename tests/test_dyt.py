"""DyT (Dynamic Tanh): the function against float64 NumPy and the paper's torch module."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

import jaxnorm
import jaxnorm.linen as jnn
import jaxnorm.nnx as jnnx


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


# --- modules against the paper's torch module ----------------------------------------------
class DynamicTanh(torch.nn.Module):
    """Transcribed from the paper's code (jiachenzhu/DyT, dynamic_tanh.py)."""

    def __init__(self, normalized_shape, channels_last, alpha_init_value=0.5):
        super().__init__()
        self.normalized_shape = normalized_shape
        self.alpha_init_value = alpha_init_value
        self.channels_last = channels_last
        self.alpha = torch.nn.Parameter(torch.ones(1) * alpha_init_value)
        self.weight = torch.nn.Parameter(torch.ones(normalized_shape))
        self.bias = torch.nn.Parameter(torch.zeros(normalized_shape))

    def forward(self, x):
        x = torch.tanh(self.alpha * x)
        if self.channels_last:
            x = x * self.weight + self.bias
        else:
            x = x * self.weight[:, None, None] + self.bias[:, None, None]
        return x


def _torch_dyt(c, channels_last, rng):
    m = DynamicTanh(c, channels_last, alpha_init_value=0.5).double()
    with torch.no_grad():
        m.alpha.copy_(torch.tensor([rng.uniform(0.2, 1.5)]))
        m.weight.copy_(torch.tensor(rng.normal(1, 0.3, c)))
        m.bias.copy_(torch.tensor(rng.normal(0, 0.3, c)))
    return m


def _ours(api, c, feature_axes, tm):
    alpha, scale, bias = (
        jnp.asarray(p.detach().numpy(), jnp.float32) for p in (tm.alpha, tm.weight, tm.bias)
    )
    alpha = alpha.reshape(())
    if api == "linen":
        variables = {"params": {"alpha": alpha, "scale": scale, "bias": bias}}
        layer = jnn.DyT(feature_axes=feature_axes)
        return lambda x, v=variables: layer.apply(v, x), variables
    layer = jnnx.DyT(c, feature_axes=feature_axes, rngs=nnx.Rngs(0))
    layer.alpha[...], layer.scale[...], layer.bias[...] = alpha, scale, bias
    return layer, layer


@pytest.mark.parametrize("api", ["linen", "nnx"])
@pytest.mark.parametrize("channels_last", [True, False])
def test_dyt_modules_match_paper_torch_module(api, channels_last):
    rng = np.random.default_rng(10)
    c = 6
    shape = (2, 4, 4, c) if channels_last else (2, c, 4, 4)
    x = rng.normal(0, 3, shape)
    tm = _torch_dyt(c, channels_last, rng)
    tx = torch.tensor(x, requires_grad=True)
    ty = tm(tx)
    g = rng.normal(size=shape)
    (ty * torch.tensor(g)).sum().backward()
    layer, _ = _ours(api, c, -1 if channels_last else 1, tm)
    xj = jnp.asarray(x, jnp.float32)
    np.testing.assert_allclose(layer(xj), ty.detach().numpy(), rtol=1e-5, atol=1e-5)
    # Gradients of x and of alpha/scale/bias, as torch's autograd gives them.
    if api == "linen":
        layer_fn = jnn.DyT(feature_axes=-1 if channels_last else 1)
        _, variables = _ours(api, c, -1 if channels_last else 1, tm)

        def loss(params, x):
            return jnp.sum(layer_fn.apply({"params": params}, x) * g)

        gp, gx = jax.grad(loss, argnums=(0, 1))(variables["params"], xj)
        galpha, gscale, gbias = gp["alpha"], gp["scale"], gp["bias"]
    else:
        gx = jax.grad(lambda x: jnp.sum(layer(x) * g))(xj)
        grads = nnx.grad(lambda m: jnp.sum(m(xj) * g))(layer)
        galpha, gscale, gbias = (grads[n][...] for n in ("alpha", "scale", "bias"))
    np.testing.assert_allclose(gx, tx.grad.numpy(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(galpha, tm.alpha.grad.numpy()[0], rtol=1e-4)
    np.testing.assert_allclose(gscale, tm.weight.grad.numpy(), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(gbias, tm.bias.grad.numpy(), rtol=1e-4, atol=1e-4)


def test_dyt_modules_init_alpha_and_variables():
    x = jnp.asarray(np.random.default_rng(11).normal(0, 2, (3, 5)), jnp.float32)
    for alpha_init in (0.5, 0.05):
        ref = np.tanh(alpha_init * np.asarray(x, np.float64))  # scale ones, bias zeros
        layer = jnn.DyT(alpha_init=alpha_init)
        variables = layer.init(jax.random.key(0), x)
        shapes = jax.tree.map(jnp.shape, variables["params"])
        assert shapes == {"alpha": (), "bias": (5,), "scale": (5,)}
        np.testing.assert_allclose(layer.apply(variables, x), ref, rtol=1e-6, atol=1e-6)
        module = jnnx.DyT(5, alpha_init=alpha_init, rngs=nnx.Rngs(0))
        assert module.alpha.shape == () and float(module.alpha[...]) == np.float32(alpha_init)
        np.testing.assert_allclose(module(x), ref, rtol=1e-6, atol=1e-6)


def test_dyt_modules_accept_and_ignore_a_mask_and_keep_bf16():
    x = jnp.asarray(np.random.default_rng(12).normal(0, 2, (2, 3, 8)), jnp.bfloat16)
    mask = jnp.asarray(np.random.default_rng(13).random((2, 3, 1)) > 0.5)
    module = jnnx.DyT(8, rngs=nnx.Rngs(0))
    y = module(x, mask=mask)
    assert y.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(y, np.float32), np.asarray(module(x), np.float32))
    ref = np.tanh(0.5 * np.asarray(x, np.float64)).astype(np.float32)
    np.testing.assert_array_equal(
        np.asarray(y, np.float32), np.asarray(jnp.asarray(ref).astype(jnp.bfloat16), np.float32)
    )
    layer = jnn.DyT()
    variables = layer.init(jax.random.key(0), x)
    np.testing.assert_array_equal(
        np.asarray(layer.apply(variables, x, mask=mask), np.float32), np.asarray(y, np.float32)
    )


def test_dyt_benchmark_row_records_every_column_and_ratio(tmp_path):
    """The registration in python -m benchmarks (structure only: no timing is asserted)."""
    import json

    from benchmarks.__main__ import main

    out = tmp_path / "dyt.json"
    argv = ["--dyt", "--shape", "64,32", "--dtype", "float32", "--direction", "fwd_bwd"]
    main([*argv, "--repeats", "2", "--min-time", "0.001", "--out", str(out)])
    payload = json.loads(out.read_text())
    assert payload["rows"] == [] and payload["model_rows"] == []
    (row,) = payload["dyt_rows"]
    assert (row["shape"], row["dtype"], row["direction"]) == ([64, 32], "float32", "fwd_bwd")
    assert set(row["timing"]) == {"dyt", "layer_norm", "flax_ln", "torch_dyt", "torch_ln", "copy"}
    for key in ("dyt/layer_norm", "dyt/flax_ln", "layer_norm/flax_ln", "torch_dyt/torch_ln"):
        assert row["ratios"][key] > 0
