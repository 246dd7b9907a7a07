"""Conventions of today's transformers: Gemma's zero-centred ``(1 + w)`` scale and the
cast order of Llama's and Gemma's RMSNorm, against torch code transcribed from HF
transformers and float64 NumPy."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import torch
from flax import nnx
from jax.test_util import check_grads

import jaxnorm
import jaxnorm.linen as jnn
import jaxnorm.nnx as jnnx

# ----------------------------------------------------------------------------- references


def llama_rms_norm_forward(hidden_states, weight, variance_epsilon):
    """``LlamaRMSNorm.forward``, transcribed from HF transformers
    ``src/transformers/models/llama/modeling_llama.py`` (Qwen2RMSNorm and
    MistralRMSNorm are the same code): normalize in float32, cast to the input dtype,
    then multiply by the weight in the weight's dtype."""
    input_dtype = hidden_states.dtype
    hidden_states = hidden_states.to(torch.float32)
    variance = hidden_states.pow(2).mean(-1, keepdim=True)
    hidden_states = hidden_states * torch.rsqrt(variance + variance_epsilon)
    return weight * hidden_states.to(input_dtype)


def gemma_rms_norm_forward(x, weight, eps):
    """``GemmaRMSNorm.forward`` (with its ``_norm``), transcribed from HF transformers
    ``src/transformers/models/gemma/modeling_gemma.py``: everything in float32,
    including ``1 + w``, then one cast ("Llama does x.to(float16) * w whilst Gemma is
    (x * w).to(float16)", HF PR #29402). Its weight is initialized to zeros."""

    def _norm(x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)

    output = _norm(x.float())
    output = output * (1.0 + weight.float())
    return output.type_as(x)


def np_layer_norm(x, w, b, offset, eps, axis=-1):
    x = np.asarray(x, np.float64)
    mean = x.mean(axis, keepdims=True)
    var = ((x - mean) ** 2).mean(axis, keepdims=True)
    y = (x - mean) / np.sqrt(var + eps) * (offset + np.asarray(w, np.float64))
    return y if b is None else y + np.asarray(b, np.float64)


def np_rms_norm(x, w, offset, eps):
    x = np.asarray(x, np.float64)
    y = x / np.sqrt((x**2).mean(-1, keepdims=True) + eps)
    return y * (offset + np.asarray(w, np.float64))


def bf16_ulps(a, b) -> np.ndarray:
    """Distance in bf16 units in the last place (for finite values of equal sign)."""
    bits = [
        np.asarray(v, np.float32).astype(ml_dtypes.bfloat16).view(np.int16).astype(np.int32)
        for v in (a, b)
    ]
    return np.abs(bits[0] - bits[1])


def _bf16_data(shape=(64, 512), seed=0):
    rng = np.random.default_rng(seed)
    x = torch.from_numpy(rng.normal(0.3, 2.0, shape).astype(np.float32)).to(torch.bfloat16)
    w = torch.from_numpy(rng.normal(0.2, 0.5, shape[-1]).astype(np.float32)).to(torch.bfloat16)
    as_jax = lambda t: jnp.asarray(t.float().numpy(), jnp.bfloat16)  # noqa: E731 (exact)
    return x, w, as_jax(x), as_jax(w)


# ----------------------------------------------------------------------------- torch parity


@pytest.mark.parametrize("jit", [False, True])
def test_cast_then_scale_reproduces_llama_in_bf16(jit):
    xt, wt, x, w = _bf16_data()
    ref = llama_rms_norm_forward(xt, wt, 1e-6)
    assert ref.dtype == torch.bfloat16
    f = lambda x, w: jaxnorm.rms_norm(x, w, epsilon=1e-6, cast_order="cast_then_scale")  # noqa: E731
    y = (jax.jit(f) if jit else f)(x, w)
    assert y.dtype == jnp.bfloat16
    ulps = bf16_ulps(y, ref.float().numpy())
    assert ulps.max() <= 1 and (ulps == 0).mean() > 0.99, (ulps.max(), (ulps == 0).mean())
    # The default order is Gemma's, not Llama's: the test tells the two apart.
    other = bf16_ulps(jaxnorm.rms_norm(x, w, epsilon=1e-6), ref.float().numpy())
    assert (other == 0).mean() < 0.9


@pytest.mark.parametrize("jit", [False, True])
def test_scale_offset_one_reproduces_gemma_in_bf16(jit):
    xt, wt, x, w = _bf16_data(seed=1)
    ref = gemma_rms_norm_forward(xt, wt, 1e-6)
    f = lambda x, w: jaxnorm.rms_norm(x, w, epsilon=1e-6, scale_offset=1.0)  # noqa: E731
    y = (jax.jit(f) if jit else f)(x, w)
    assert y.dtype == jnp.bfloat16
    ulps = bf16_ulps(y, ref.float().numpy())
    assert ulps.max() <= 1 and (ulps == 0).mean() > 0.99, (ulps.max(), (ulps == 0).mean())
    # Llama's order with the same (1 + w) is a different function in bf16.
    llama_order = jaxnorm.rms_norm(
        x, w, epsilon=1e-6, scale_offset=1.0, cast_order="cast_then_scale"
    )
    assert (bf16_ulps(llama_order, ref.float().numpy()) == 0).mean() < 0.9


def test_gemma_weights_start_as_the_identity_multiplier():
    xt, _, x, _ = _bf16_data(seed=2)
    zeros = torch.zeros(x.shape[-1], dtype=torch.bfloat16)  # GemmaRMSNorm's init
    ref = gemma_rms_norm_forward(xt, zeros, 1e-6)
    y = jaxnorm.rms_norm(x, jnp.zeros(x.shape[-1], jnp.bfloat16), epsilon=1e-6, scale_offset=1.0)
    assert bf16_ulps(y, ref.float().numpy()).max() <= 1


# ----------------------------------------------------------------------------- float64 formula


@pytest.mark.parametrize("offset", [0.0, 1.0, -0.5])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_scale_offset_matches_float64_formula(offset, dtype):
    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.normal(1.0, 3.0, (8, 5, 24)), dtype)
    w = jnp.asarray(rng.normal(0.0, 0.3, 24), jnp.float32)
    b = jnp.asarray(rng.normal(0.0, 0.3, 24), jnp.float32)
    x64 = np.asarray(x.astype(jnp.float32), np.float64)
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == jnp.float32 else dict(atol=2e-2, rtol=1e-2)
    ln = jaxnorm.layer_norm(x, w, b, epsilon=1e-5, scale_offset=offset)
    np.testing.assert_allclose(
        np.asarray(ln, np.float64), np_layer_norm(x64, w, b, offset, 1e-5), **tol
    )
    for order in ("scale_then_cast", "cast_then_scale"):
        rms = jaxnorm.rms_norm(x, w, epsilon=1e-5, scale_offset=offset, cast_order=order)
        assert rms.dtype == dtype
        np.testing.assert_allclose(
            np.asarray(rms, np.float64), np_rms_norm(x64, w, offset, 1e-5), **tol
        )


def test_scale_offset_zero_is_todays_behaviour_bit_for_bit():
    x = jax.random.normal(jax.random.key(4), (16, 64), jnp.bfloat16)
    w = jax.random.normal(jax.random.key(5), (64,))
    np.testing.assert_array_equal(jaxnorm.rms_norm(x, w, scale_offset=0.0), jaxnorm.rms_norm(x, w))
    np.testing.assert_array_equal(
        jaxnorm.layer_norm(x, w, w, scale_offset=0.0), jaxnorm.layer_norm(x, w, w)
    )


def test_offset_on_multi_axis_features_and_masks():
    rng = np.random.default_rng(6)
    x = rng.normal(0.5, 2.0, (4, 3, 6)).astype(np.float32)
    w = rng.normal(0.0, 0.2, (3, 6)).astype(np.float32)
    y = jaxnorm.layer_norm(jnp.asarray(x), jnp.asarray(w), axis=(1, 2), scale_offset=1.0)
    np.testing.assert_allclose(
        np.asarray(y), np_layer_norm(x, w, None, 1.0, 1e-6, axis=(1, 2)), atol=1e-5
    )
    # Masked rows (NaN padding) under the Llama order: valid outputs and the scale's
    # gradient stay finite, as for every masked norm.
    x = x.reshape(12, 6)
    x[3] = np.nan
    mask = np.ones((12, 1), bool)
    mask[3] = False

    def loss(w):
        y = jaxnorm.rms_norm(
            jnp.asarray(x),
            w,
            mask=jnp.asarray(mask),
            cast_order="cast_then_scale",
            scale_offset=1.0,
        )
        return jnp.sum(jnp.where(mask, y, 0.0) ** 2)

    g = jax.grad(loss)(jnp.asarray(w[0]))
    assert np.isfinite(np.asarray(g)).all()
    valid = np.delete(x, 3, axis=0)
    ref_g = jax.grad(
        lambda w: jnp.sum(
            jaxnorm.rms_norm(jnp.asarray(valid), w, cast_order="cast_then_scale", scale_offset=1.0)
            ** 2
        )
    )(jnp.asarray(w[0]))
    np.testing.assert_allclose(np.asarray(g), np.asarray(ref_g), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("order", ["scale_then_cast", "cast_then_scale"])
def test_gradients_through_the_offset_scale_by_finite_differences(order):
    rng = np.random.default_rng(7)
    with jax.enable_x64(True):
        x = jnp.asarray(rng.normal(0.5, 2.0, (5, 7)))
        w = jnp.asarray(rng.normal(0.0, 0.3, 7))
        b = jnp.asarray(rng.normal(0.0, 0.3, 7))
        check_grads(
            lambda x, w: jaxnorm.rms_norm(x, w, scale_offset=1.0, cast_order=order),
            (x, w),
            order=2,
            modes=["rev", "fwd"],
        )
        check_grads(
            lambda x, w, b: jaxnorm.layer_norm(x, w, b, scale_offset=1.0),
            (x, w, b),
            order=2,
            modes=["rev", "fwd"],
        )


# ----------------------------------------------------------------------------- refusals


def test_refusals_name_the_fix():
    x = jnp.ones((2, 4))
    with pytest.raises(ValueError, match="no scale was given"):
        jaxnorm.rms_norm(x, scale_offset=1.0)
    with pytest.raises(ValueError, match="no scale was given"):
        jaxnorm.layer_norm(x, scale_offset=1.0)
    with pytest.raises(TypeError, match="scale_offset must be a Python float"):
        jaxnorm.rms_norm(x, jnp.ones(4), scale_offset=jnp.ones(()))
    with pytest.raises(ValueError, match="finite"):
        jaxnorm.layer_norm(x, jnp.ones(4), scale_offset=float("nan"))
    with pytest.raises(ValueError, match="cast_order must be one of"):
        jaxnorm.rms_norm(x, jnp.ones(4), cast_order="llama")
    with pytest.raises(ValueError, match="scale has shape"):
        jaxnorm.rms_norm(x, jnp.ones(3), scale_offset=1.0)


# ----------------------------------------------------------------------------- modules


def _linen_apply(module, x, scale):
    return module.apply({"params": {"scale": scale}}, x)


def _nnx_with_scale(module, scale):
    module.scale[...] = scale
    return module


@pytest.mark.parametrize("api", ["linen", "nnx"])
def test_modules_with_offset_start_scale_at_zeros_as_gemma_and_te(api):
    x = jnp.ones((2, 6))
    if api == "linen":
        rms = jnn.RMSNorm(scale_offset=1.0).init(jax.random.key(0), x)["params"]["scale"]
        ln = jnn.LayerNorm(scale_offset=1.0).init(jax.random.key(0), x)["params"]
        plain = jnn.RMSNorm().init(jax.random.key(0), x)["params"]["scale"]
        half = jnn.RMSNorm(scale_offset=0.5).init(jax.random.key(0), x)["params"]["scale"]
        given = jnn.RMSNorm(scale_offset=1.0, scale_init=nn.initializers.constant(0.25))
        given = given.init(jax.random.key(0), x)["params"]["scale"]
    else:
        rms = jnnx.RMSNorm(6, scale_offset=1.0, rngs=nnx.Rngs(0)).scale[...]
        layer = jnnx.LayerNorm(6, scale_offset=1.0, rngs=nnx.Rngs(0))
        ln = {"scale": layer.scale[...], "bias": layer.bias[...]}
        plain = jnnx.RMSNorm(6, rngs=nnx.Rngs(0)).scale[...]
        half = jnnx.RMSNorm(6, scale_offset=0.5, rngs=nnx.Rngs(0)).scale[...]
        given = jnnx.RMSNorm(
            6, scale_offset=1.0, scale_init=nnx.initializers.constant(0.25), rngs=nnx.Rngs(0)
        ).scale[...]
    np.testing.assert_array_equal(rms, np.zeros(6))  # torch.zeros(dim), as GemmaRMSNorm
    np.testing.assert_array_equal(ln["scale"], np.zeros(6))  # TE's zero_centered_gamma
    np.testing.assert_array_equal(ln["bias"], np.zeros(6))
    np.testing.assert_array_equal(plain, np.ones(6))  # flax's default is unchanged
    np.testing.assert_array_equal(half, np.full(6, 0.5))  # the multiplier starts at 1
    np.testing.assert_array_equal(given, np.full(6, 0.25))  # an explicit init is kept


@pytest.mark.parametrize("api", ["linen", "nnx"])
def test_gemma_rms_norm_module_matches_torch_in_bf16(api):
    xt, wt, x, w = _bf16_data(seed=10)
    ref = gemma_rms_norm_forward(xt, wt, 1e-6).float().numpy()
    if api == "linen":
        y = _linen_apply(jnn.RMSNorm(scale_offset=1.0, param_dtype=jnp.bfloat16), x, w)
    else:
        m = jnnx.RMSNorm(x.shape[-1], scale_offset=1.0, param_dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
        y = _nnx_with_scale(m, w)(x)
    assert y.dtype == jnp.bfloat16
    ulps = bf16_ulps(y, ref)
    assert ulps.max() <= 1 and (ulps == 0).mean() > 0.99


@pytest.mark.parametrize("api", ["linen", "nnx"])
@pytest.mark.parametrize("param_dtype", [jnp.bfloat16, jnp.float32])
def test_llama_rms_norm_module_matches_torch_in_bf16(api, param_dtype):
    xt, wt, x, w = _bf16_data(seed=11)
    # With float32 weights torch's product is float32; our output keeps x's dtype, so
    # the reference is that product rounded to bf16 (with bf16 weights it is bf16 already).
    wt = wt.to(torch.float32) if param_dtype == jnp.float32 else wt
    ref = llama_rms_norm_forward(xt, wt, 1e-6).to(torch.bfloat16).float().numpy()
    w = w.astype(param_dtype)
    if api == "linen":
        module = jnn.RMSNorm(cast_order="cast_then_scale", param_dtype=param_dtype)
        y = _linen_apply(module, x, w)
    else:
        # flax's promote_dtype hands the layer a float32 x here; the cast still goes to
        # the output dtype, bf16.
        m = jnnx.RMSNorm(
            x.shape[-1], cast_order="cast_then_scale", param_dtype=param_dtype, rngs=nnx.Rngs(0)
        )
        y = _nnx_with_scale(m, w)(x)
    assert y.dtype == jnp.bfloat16
    ulps = bf16_ulps(y, ref)
    assert ulps.max() <= 1 and (ulps == 0).mean() > 0.99


@pytest.mark.parametrize("api", ["linen", "nnx"])
def test_modules_pass_offset_to_the_functional_op(api):
    rng = np.random.default_rng(12)
    x = jnp.asarray(rng.normal(0.5, 2.0, (4, 3, 8)), jnp.float32)
    w = jnp.asarray(rng.normal(0.0, 0.2, 8), jnp.float32)
    b = jnp.asarray(rng.normal(0.0, 0.2, 8), jnp.float32)
    if api == "linen":
        ln = jnn.LayerNorm(scale_offset=1.0).apply({"params": {"scale": w, "bias": b}}, x)
        rms = _linen_apply(jnn.RMSNorm(scale_offset=1.0, cast_order="cast_then_scale"), x, w)
    else:
        layer = jnnx.LayerNorm(8, scale_offset=1.0, rngs=nnx.Rngs(0))
        layer.scale[...], layer.bias[...] = w, b
        ln = layer(x)
        m = jnnx.RMSNorm(8, scale_offset=1.0, cast_order="cast_then_scale", rngs=nnx.Rngs(0))
        rms = _nnx_with_scale(m, w)(x)
    np.testing.assert_array_equal(ln, jaxnorm.layer_norm(x, w, b, scale_offset=1.0))
    np.testing.assert_allclose(np.asarray(ln), np_layer_norm(x, w, b, 1.0, 1e-6), atol=1e-5)
    np.testing.assert_allclose(np.asarray(rms), np_rms_norm(x, w, 1.0, 1e-6), atol=1e-5)


def test_module_refusals_carry_the_module_name():
    x = jnp.ones((2, 4))
    with pytest.raises(ValueError, match=r"jaxnorm\.linen\.RMSNorm.*no scale was given"):
        jnn.RMSNorm(use_scale=False, scale_offset=1.0).init(jax.random.key(0), x)
    with pytest.raises(ValueError, match=r"jaxnorm\.nnx\.LayerNorm.*no scale was given"):
        jnnx.LayerNorm(4, use_scale=False, scale_offset=1.0, rngs=nnx.Rngs(0))(x)
    with pytest.raises(ValueError, match=r"jaxnorm\.nnx\.RMSNorm.*cast_order must be one of"):
        jnnx.RMSNorm(4, cast_order="gemma", rngs=nnx.Rngs(0))(x)
