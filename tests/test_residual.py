"""Fused residual add + norm against the unfused reference: float64 NumPy values,
float64 autodiff and finite differences for gradients, flax for the saved bytes, and
the linen and NNX modules against the functional op."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.test_util import check_grads

import jaxnorm
import jaxnorm.linen as jnn
import jaxnorm.nnx as jnnx

EPS = 1e-5
KINDS = ["rms", "layer"]


def np_add_norm(x, r, w, b, *, kind, offset=0.0, eps=EPS, axis=-1):
    """Float64 NumPy reference: ``h = x + r`` (exact), then the norm of ``h``."""
    h = np.asarray(x, np.float64) + (0.0 if r is None else np.asarray(r, np.float64))
    if kind == "layer":
        hc = h - h.mean(axis, keepdims=True)
    else:
        hc = h
    y = hc / np.sqrt((hc**2).mean(axis, keepdims=True) + eps)
    if w is not None:
        y = y * (offset + np.asarray(w, np.float64))
    if b is not None:
        y = y + np.asarray(b, np.float64)
    return y, h


def fused(kind, x, r, w=None, b=None, **kw):
    if kind == "rms":
        return jaxnorm.add_rms_norm(x, r, w, epsilon=EPS, **kw)
    return jaxnorm.add_layer_norm(x, r, w, b, epsilon=EPS, **kw)


def unfused_jnp(kind, x, r, w=None, b=None, *, offset=0.0, residual_dtype=None):
    """The unfused formula in plain jnp (autodiff reference): add, then normalize."""
    rdt = residual_dtype or jnp.promote_types(x.dtype, r.dtype)
    h = (x.astype(jnp.float64 if rdt == jnp.float64 else jnp.float32) + r).astype(rdt)
    hf = h.astype(jnp.promote_types(rdt, jnp.float32))
    hc = hf - hf.mean(-1, keepdims=True) if kind == "layer" else hf
    y = hc * jax.lax.rsqrt((hc * hc).mean(-1, keepdims=True) + EPS)
    if w is not None:
        y = y * (offset + w)
    if b is not None:
        y = y + b
    return y.astype(x.dtype), h


def _data(shape=(6, 5, 32), mean=0.5, seed=0, bias=True):
    rng = np.random.default_rng(seed)
    x = rng.normal(mean, 2.0, shape).astype(np.float32)
    r = rng.normal(-mean, 3.0, shape).astype(np.float32)
    w = rng.normal(1.0, 0.2, shape[-1]).astype(np.float32)
    b = rng.normal(0.0, 0.2, shape[-1]).astype(np.float32) if bias else None
    return x, r, w, b


def _params(kind, w, b):
    return (w,) if kind == "rms" else (w, b)


# ----------------------------------------------------------------------------- forward


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("offset", [0.0, 1.0])
def test_forward_matches_float64_reference(kind, offset):
    x, r, w, b = _data()
    w = w - offset  # the same multiplier either way
    y, h = fused(
        kind, jnp.asarray(x), jnp.asarray(r), jnp.asarray(w), jnp.asarray(b), scale_offset=offset
    )
    ref_y, ref_h = np_add_norm(x, r, w, None if kind == "rms" else b, kind=kind, offset=offset)
    assert y.dtype == h.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(h), x + r)  # NumPy's float32 add, bit for bit
    np.testing.assert_allclose(np.asarray(y), ref_y, atol=2e-5, rtol=2e-5)
    np.testing.assert_allclose(np.asarray(h), ref_h, rtol=1e-6)


@pytest.mark.parametrize("kind", KINDS)
def test_statistics_exact_at_large_means(kind):
    # Rows with mean 1e4 and std ~3 (x and r both large): E[h^2]-E[h]^2 would be garbage.
    x, r, w, b = _data(shape=(16, 512), mean=5e3, seed=1)
    r = r + 1e4
    y, _ = fused(kind, jnp.asarray(x), jnp.asarray(r), jnp.asarray(w), jnp.asarray(b))
    ref_y, _ = np_add_norm(x, r, w, None if kind == "rms" else b, kind=kind)
    np.testing.assert_allclose(np.asarray(y), ref_y, atol=3e-3 if kind == "layer" else 2e-5)
    if kind == "layer":
        std = np.std((np.asarray(y) - b) / w, axis=-1)
        np.testing.assert_allclose(std, 1.0, rtol=1e-3)


@pytest.mark.parametrize("kind", KINDS)
def test_bf16_stream_with_float32_residual(kind):
    x, r, w, b = _data(seed=2)
    xb = jnp.asarray(x, jnp.bfloat16)
    y, h = fused(
        kind, xb, jnp.asarray(r), jnp.asarray(w), jnp.asarray(b), residual_dtype=jnp.float32
    )
    assert y.dtype == jnp.bfloat16 and h.dtype == jnp.float32
    x_exact = np.asarray(xb.astype(jnp.float32))  # bf16 values are exact in float32
    np.testing.assert_array_equal(np.asarray(h), x_exact + r)
    ref_y, _ = np_add_norm(x_exact, r, w, None if kind == "rms" else b, kind=kind)
    # Only the output is rounded: within half a bf16 ulp of the float64 value (plus a hair).
    np.testing.assert_allclose(np.asarray(y, np.float64), ref_y, rtol=2**-8 + 1e-6, atol=1e-6)


@pytest.mark.parametrize("kind", KINDS)
def test_low_precision_stream_adds_in_wide_dtype_and_rounds_once(kind):
    x, r, w, b = _data(seed=3)
    xb, rb = jnp.asarray(x, jnp.bfloat16), jnp.asarray(r, jnp.bfloat16)
    # Default residual dtype: the promoted dtype, bf16; the sum rounded once from f32.
    y, h = fused(kind, xb, rb, jnp.asarray(w), jnp.asarray(b))
    assert h.dtype == y.dtype == jnp.bfloat16
    exact = np.asarray(xb, np.float32) + np.asarray(rb, np.float32)
    np.testing.assert_array_equal(
        np.asarray(h, np.float32), np.asarray(jnp.asarray(exact, jnp.bfloat16), np.float32)
    )
    # And a float32 stream from bf16 inputs keeps the exact sum.
    _, h32 = fused(kind, xb, rb, residual_dtype=jnp.float32)
    np.testing.assert_array_equal(np.asarray(h32), exact)


@pytest.mark.parametrize("kind", KINDS)
def test_first_block_without_residual_and_output_dtype(kind):
    x, _, w, b = _data(seed=4)
    y, h = fused(kind, jnp.asarray(x), None, jnp.asarray(w), jnp.asarray(b), dtype=jnp.bfloat16)
    assert y.dtype == jnp.bfloat16 and h.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(h), x)
    ref_y, _ = np_add_norm(x, None, w, None if kind == "rms" else b, kind=kind)
    np.testing.assert_allclose(np.asarray(y, np.float64), ref_y, rtol=2**-8 + 1e-6, atol=1e-6)


def test_axes_and_feature_axes():
    x, r, _, _ = _data(shape=(4, 3, 8), seed=5)
    w = np.random.default_rng(5).normal(1.0, 0.2, (3, 8)).astype(np.float32)
    y, _ = jaxnorm.add_layer_norm(
        jnp.asarray(x), jnp.asarray(r), jnp.asarray(w), axis=(1, 2), epsilon=EPS
    )
    ref_y, _ = np_add_norm(x, r, w, None, kind="layer", axis=(1, 2))
    np.testing.assert_allclose(np.asarray(y), ref_y, atol=2e-5)
    # Statistics over (1, 2), scale over the last axis only (flax's feature_axes=-1).
    w1 = w[0]
    y, _ = jaxnorm.add_rms_norm(
        jnp.asarray(x), jnp.asarray(r), jnp.asarray(w1), axis=(1, 2), feature_axis=-1, epsilon=EPS
    )
    ref_y, _ = np_add_norm(x, r, None, None, kind="rms", axis=(1, 2))
    np.testing.assert_allclose(np.asarray(y), ref_y * w1, atol=2e-5)


@pytest.mark.parametrize("order", ["scale_then_cast", "cast_then_scale"])
def test_same_numbers_as_add_then_rms_norm(order):
    """The fused op is ``rms_norm(x + r)`` with the same conventions, bit for bit."""
    x, r, w, _ = _data(seed=6)
    xb, wb = jnp.asarray(x, jnp.bfloat16), jnp.asarray(w, jnp.bfloat16)
    y, h = jaxnorm.add_rms_norm(
        xb, jnp.asarray(r), wb, epsilon=EPS, scale_offset=1.0, cast_order=order
    )
    ref = jaxnorm.rms_norm(
        h, wb, epsilon=EPS, scale_offset=1.0, cast_order=order, dtype=jnp.bfloat16
    )
    np.testing.assert_array_equal(np.asarray(y, np.float32), np.asarray(ref, np.float32))


# ----------------------------------------------------------------------------- gradients


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("offset", [0.0, 1.0])
def test_gradients_match_float64_autodiff_of_the_unfused_formula(kind, offset):
    x, r, w, b = _data(seed=7)
    rng = np.random.default_rng(8)
    dy = rng.normal(0, 1, x.shape).astype(np.float32)
    dh = rng.normal(0, 1, x.shape).astype(np.float32)  # the next block's gradient of h
    params = _params(kind, w, b)
    f = lambda x, r, *p: fused(kind, x, r, *p, scale_offset=offset)  # noqa: E731
    _, vjp = jax.vjp(f, *(jnp.asarray(a) for a in (x, r, *params)))
    got = vjp((jnp.asarray(dy), jnp.asarray(dh)))
    with jax.enable_x64(True):
        g = lambda x, r, *p: unfused_jnp(kind, x, r, *p, offset=offset)  # noqa: E731
        _, vjp64 = jax.vjp(g, *(jnp.asarray(a, jnp.float64) for a in (x, r, *params)))
        want = vjp64((jnp.asarray(dy, jnp.float64), jnp.asarray(dh, jnp.float64)))
        want = [np.asarray(a) for a in want]
    for name, a, c in zip(["dx", "dr", "dscale", "dbias"], got, want, strict=False):
        assert a.dtype == jnp.float32, name
        scale = np.abs(c).max()
        np.testing.assert_allclose(np.asarray(a), c, atol=2e-5 * scale, rtol=1e-4, err_msg=name)


@pytest.mark.parametrize(
    "kind, order",
    [("rms", "scale_then_cast"), ("rms", "cast_then_scale"), ("layer", None)],  # Llama's: RMS
)
def test_gradients_by_finite_differences_in_float64(kind, order):
    x, r, w, b = _data(shape=(3, 7), seed=9)
    kw = dict(cast_order=order) if kind == "rms" else {}
    with jax.enable_x64(True):
        args = tuple(jnp.asarray(a, jnp.float64) for a in (x, r, *_params(kind, w, b)))

        def f(*a):
            y, h = fused(kind, *a, scale_offset=1.0, **kw)
            return y, h * h  # both outputs carry a cotangent

        check_grads(f, args, order=1, modes=["rev"], atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("kind", KINDS)
def test_bf16_gradients_come_back_in_each_inputs_dtype(kind):
    x, r, w, b = _data(seed=10)
    xb = jnp.asarray(x, jnp.bfloat16)
    rf = jnp.asarray(r)
    params = tuple(jnp.asarray(p, jnp.bfloat16) for p in _params(kind, w, b))

    def loss(x, r, *p):
        y, h = fused(kind, x, r, *p, residual_dtype=jnp.float32)
        return jnp.sum(y.astype(jnp.float32) ** 2) + jnp.sum(jnp.sin(h))

    grads = jax.grad(loss, argnums=tuple(range(2 + len(params))))(xb, rf, *params)
    assert [g.dtype for g in grads] == [jnp.bfloat16, jnp.float32] + [jnp.bfloat16] * len(params)
    # dx and dr are the same gradient of h, in two dtypes.
    np.testing.assert_array_equal(
        np.asarray(grads[0], np.float32), np.asarray(grads[1].astype(jnp.bfloat16), np.float32)
    )
    with jax.enable_x64(True):
        want = jax.grad(
            lambda x, r, *p: (
                jnp.sum(unfused_jnp(kind, x, r, *p)[0] ** 2)
                + jnp.sum(jnp.sin(unfused_jnp(kind, x, r, *p)[1]))
            ),
            argnums=(1,),
        )(*(jnp.asarray(np.asarray(a, np.float32), jnp.float64) for a in (xb, rf, *params)))
    np.testing.assert_allclose(
        np.asarray(grads[1]), np.asarray(want[0]), atol=0.02 * np.abs(want[0]).max()
    )


def test_jit_grad_and_vmap_compose():
    x, r, w, _ = _data(seed=11)
    f = lambda x, r, w: jnp.sum(jaxnorm.add_rms_norm(x, r, w)[0] ** 2)  # noqa: E731
    a = jax.jit(jax.grad(f, argnums=(0, 2)))(jnp.asarray(x), jnp.asarray(r), jnp.asarray(w))
    per_row = jax.vmap(jax.grad(f, argnums=0), in_axes=(0, 0, None))(
        jnp.asarray(x), jnp.asarray(r), jnp.asarray(w)
    )
    np.testing.assert_allclose(np.asarray(a[0]), np.asarray(per_row), rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- saved bytes


def _saved(f, *args):
    """The arrays the backward keeps (the leaves of ``jax.vjp``'s closure) and the bytes a
    compiled forward writes for them (``memory_analysis().output_size_in_bytes``)."""
    leaves = jax.tree_util.tree_leaves(jax.vjp(f, *args)[1])
    res = jax.jit(lambda *a: jax.tree_util.tree_leaves(jax.vjp(f, *a)[1]))
    compiled = res.lower(*args).compile().memory_analysis().output_size_in_bytes
    return [(tuple(a.shape), jnp.dtype(a.dtype)) for a in leaves], compiled


def _flax_unfused(kind, residual_dtype):
    def f(x, r, w, *b):
        h = x.astype(residual_dtype) + r.astype(residual_dtype)
        if kind == "rms":
            y = nn.RMSNorm(epsilon=EPS, dtype=x.dtype).apply({"params": {"scale": w}}, h)
        else:
            p = {"scale": w, "bias": b[0]}
            y = nn.LayerNorm(epsilon=EPS, dtype=x.dtype).apply({"params": p}, h)
        return y, h

    return f


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("stream", ["bf16", "bf16+f32 residual", "f32"])
def test_backward_saves_only_h_row_statistics_and_params(kind, stream):
    rows, d = 256, 128
    xdt = jnp.float32 if stream == "f32" else jnp.bfloat16
    rdt = jnp.bfloat16 if stream == "bf16" else jnp.float32
    x = jnp.ones((rows, d), xdt)
    r = jnp.ones((rows, d), rdt)
    params = tuple(jnp.ones(d) for _ in range(1 if kind == "rms" else 2))
    f = lambda x, r, *p: fused(kind, x, r, *p)  # noqa: E731
    leaves, compiled = _saved(f, x, r, *params)
    f32 = jnp.dtype(jnp.float32)
    stats = [((rows, 1), f32)] * (1 if kind == "rms" else 2)  # rstd (and mean)
    assert sorted(leaves, key=str) == sorted(
        [((rows, d), jnp.dtype(rdt)), *stats, *[((d,), f32)] * len(params)], key=str
    )
    claimed = rows * d * jnp.dtype(rdt).itemsize + len(stats) * rows * 4 + len(params) * d * 4
    assert claimed <= compiled < claimed + 256  # + the output tuple's pointers
    # Autodiff of the unfused reference (plain jnp, and add + flax's module) keeps more.
    for ref in (lambda x, r, *p: unfused_jnp(kind, x, r, *p), _flax_unfused(kind, rdt)):
        ref_leaves, ref_compiled = _saved(ref, x, r, *params)
        assert ref_compiled > compiled + rows * d * 2, (ref_leaves, leaves)


# ----------------------------------------------------------------------------- refusals


def test_refusals_name_the_fix():
    x = jnp.ones((2, 4))
    with pytest.raises(ValueError, match="residual has shape"):
        jaxnorm.add_rms_norm(x, jnp.ones((1, 4)))
    with pytest.raises(TypeError, match="residual must have a floating dtype"):
        jaxnorm.add_layer_norm(x, jnp.ones((2, 4), jnp.int32))
    with pytest.raises(TypeError, match="x must have a floating dtype"):
        jaxnorm.add_rms_norm(jnp.ones((2, 4), jnp.complex64), x)
    with pytest.raises(TypeError, match="residual_dtype must be a floating dtype"):
        jaxnorm.add_rms_norm(x, x, residual_dtype=jnp.int32)
    with pytest.raises(ValueError, match="scale has shape"):
        jaxnorm.add_layer_norm(x, x, jnp.ones(3))
    with pytest.raises(ValueError, match="no scale was given"):
        jaxnorm.add_rms_norm(x, x, scale_offset=1.0)
    with pytest.raises(ValueError, match="cast_order must be one of"):
        jaxnorm.add_rms_norm(x, x, jnp.ones(4), cast_order="gemma")
    with pytest.raises(TypeError, match="epsilon must be a Python number"):
        jax.jit(lambda e: jaxnorm.add_rms_norm(x, x, epsilon=e))(1e-5)


# ----------------------------------------------------------------------------- modules


def _linen(kind, **kw):
    return (jnn.AddRMSNorm if kind == "rms" else jnn.AddLayerNorm)(epsilon=EPS, **kw)


def _nnx(kind, d, **kw):
    cls = jnnx.AddRMSNorm if kind == "rms" else jnnx.AddLayerNorm
    return cls(d, epsilon=EPS, rngs=nnx.Rngs(0), **kw)


def _nnx_params(module):
    names = ("scale",) if isinstance(module, jnnx.AddRMSNorm) else ("scale", "bias")
    return {n: getattr(module, n)[...] for n in names}


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("stream", ["f32", "bf16+f32 residual"])
def test_modules_equal_the_functional_op_and_the_float64_reference(kind, stream):
    x, r, w, b = _data(seed=20)
    x = jnp.asarray(x, jnp.bfloat16 if stream != "f32" else jnp.float32)
    r = jnp.asarray(r)
    kw = dict(residual_dtype=jnp.float32, scale_offset=1.0)
    params = {"scale": jnp.asarray(w - 1.0)}
    if kind == "layer":
        params["bias"] = jnp.asarray(b)
    want = fused(kind, x, r, *params.values(), **kw)
    lin = _linen(kind, **kw).apply({"params": params}, x, r)
    m = _nnx(kind, x.shape[-1], **kw)
    for name, value in params.items():
        getattr(m, name)[...] = value
    out = m(x, r)
    for got in (lin, out):
        assert [a.dtype for a in got] == [x.dtype, jnp.float32]
        for a, c in zip(got, want, strict=True):
            np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(c, np.float32))
    ref_y, ref_h = np_add_norm(
        np.asarray(x, np.float32), np.asarray(r), w, None if kind == "rms" else b, kind=kind
    )
    tol = 1e-5 if stream == "f32" else 2**-8
    np.testing.assert_allclose(np.asarray(lin[0], np.float64), ref_y, rtol=tol, atol=tol)
    np.testing.assert_allclose(np.asarray(lin[1]), ref_h, rtol=1e-6)


@pytest.mark.parametrize("kind", KINDS)
def test_module_variables_are_those_of_the_plain_norm(kind):
    """``AddRMSNorm``'s variables are ``RMSNorm``'s (likewise for layer norm): a plain
    norm applied to ``h`` with them gives ``y``; with scale_offset the scale starts at 0."""
    x, r, _, _ = _data(seed=21)
    x, r = jnp.asarray(x), jnp.asarray(r)
    add = _linen(kind)
    variables = add.init(jax.random.key(0), x, r)
    plain = (jnn.RMSNorm if kind == "rms" else jnn.LayerNorm)(epsilon=EPS)
    assert jax.tree.map(jnp.shape, variables) == jax.tree.map(
        jnp.shape, plain.init(jax.random.key(0), x)
    )
    y, h = add.apply(variables, x, r)
    np.testing.assert_array_equal(y, plain.apply(variables, h))
    zero = _linen(kind, scale_offset=1.0).init(jax.random.key(0), x, r)["params"]["scale"]
    np.testing.assert_array_equal(zero, np.zeros(x.shape[-1]))
    np.testing.assert_array_equal(_nnx(kind, x.shape[-1], scale_offset=1.0).scale[...], zero)
    # NNX state: the Params of the plain NNX norm.
    m = _nnx(kind, x.shape[-1])
    plain_nnx = (jnnx.RMSNorm if kind == "rms" else jnnx.LayerNorm)(
        x.shape[-1], epsilon=EPS, rngs=nnx.Rngs(0)
    )
    assert jax.tree.map(jnp.shape, nnx.state(m, nnx.Param)) == jax.tree.map(
        jnp.shape, nnx.state(plain_nnx, nnx.Param)
    )


@pytest.mark.parametrize("kind", KINDS)
def test_module_gradients_equal_the_functional_ops(kind):
    x, r, w, b = _data(seed=22)
    x, r = jnp.asarray(x), jnp.asarray(r)
    params = {"scale": jnp.asarray(w)}
    if kind == "layer":
        params["bias"] = jnp.asarray(b)

    def loss(y_h):
        y, h = y_h
        return jnp.sum(y**3) + jnp.sum(jnp.cos(h))

    add = _linen(kind)
    g_lin = jax.grad(lambda p, x, r: loss(add.apply({"params": p}, x, r)), argnums=(0, 1, 2))(
        params, x, r
    )
    m = _nnx(kind, x.shape[-1])
    for name, value in params.items():
        getattr(m, name)[...] = value
    g_nnx = nnx.grad(lambda m, x, r: loss(m(x, r)), argnums=(0, 1, 2))(m, x, r)
    g_fn = jax.grad(
        lambda p, x, r: loss(fused(kind, x, r, p["scale"], p.get("bias"))), argnums=(0, 1, 2)
    )(params, x, r)
    for name in params:
        np.testing.assert_array_equal(g_lin[0][name], g_fn[0][name])
        np.testing.assert_array_equal(g_nnx[0][name][...], g_fn[0][name])
    for i in (1, 2):
        np.testing.assert_array_equal(g_lin[i], g_fn[i])
        np.testing.assert_array_equal(g_nnx[i], g_fn[i])


def test_pre_norm_block_threads_the_residual_stream():
    """Two pre-norm sublayers: the stream carries x + f(norm(x)) + g(norm(...)), as the
    unfused block written with RMSNorm and explicit adds."""
    x, _, _, _ = _data(seed=23)
    x = jnp.asarray(x)

    class Fused(nn.Module):
        @nn.compact
        def __call__(self, x):
            y, r = jnn.AddRMSNorm(residual_dtype=jnp.float32)(x, None)
            y, r = jnn.AddRMSNorm(residual_dtype=jnp.float32)(jnp.tanh(y), r)
            return jnp.sin(y) + r

    class Unfused(nn.Module):
        @nn.compact
        def __call__(self, x):
            r = x
            y = nn.RMSNorm()(r)
            r = jnp.tanh(y) + r
            y = nn.RMSNorm()(r)
            return jnp.sin(y) + r

    v = Fused().init(jax.random.key(0), x)
    names = {"AddRMSNorm_0": "RMSNorm_0", "AddRMSNorm_1": "RMSNorm_1"}
    v_unfused = {"params": {names[k]: p for k, p in v["params"].items()}}
    np.testing.assert_allclose(
        Fused().apply(v, x), Unfused().apply(v_unfused, x), rtol=1e-5, atol=1e-5
    )


def test_module_refusals_carry_the_module_name():
    x = jnp.ones((2, 4))
    with pytest.raises(ValueError, match=r"jaxnorm\.linen\.AddRMSNorm at '/'.*residual has"):
        jnn.AddRMSNorm().init(jax.random.key(0), x, jnp.ones((1, 4)))
    with pytest.raises(ValueError, match=r"jaxnorm\.nnx\.AddLayerNorm: num_features=3"):
        jnnx.AddLayerNorm(3, rngs=nnx.Rngs(0))(x, x)
    with pytest.raises(ValueError, match=r"jaxnorm\.nnx\.AddRMSNorm.*no scale was given"):
        jnnx.AddRMSNorm(4, use_scale=False, scale_offset=1.0, rngs=nnx.Rngs(0))(x, x)


# ----------------------------------------------------------------------------- benchmark


def test_benchmark_row_records_columns_and_memory():
    """The harness runs (no timing is asserted); the saved bytes it reports are the
    deterministic claim: fewer for the fused op than for add + flax's norm."""
    from benchmarks.residual import COLUMNS, run_residual_row

    row = run_residual_row("rms", (64, 128), "bf16+f32", "fwd_bwd", repeats=2, min_time=0.0)
    assert set(row["timing"]) == set(COLUMNS)
    assert all(len(t["samples_s"]) == 2 and t["median_s"] > 0 for t in row["timing"].values())
    assert set(row["temp_bytes"]) == set(row["saved_bytes"]) == set(COLUMNS)
    # h (f32) + rstd (f32 per row) + scale: the fused op's whole memory from fwd to bwd.
    assert row["saved_bytes"]["fused"] == 64 * 128 * 4 + 64 * 4 + 128 * 4
    assert row["ratios"]["saved fused/flax"] < 1
