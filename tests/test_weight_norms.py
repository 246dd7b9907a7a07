"""SpectralNorm and WeightNorm: the pure functions and the linen/NNX wrappers.

References, all from outside jaxnorm:

* the pure functions against float64 NumPy (flax's power-iteration recurrence written
  out, SVD, the closed-form gradient of ``W / sigma``, ``g v / ||v||``) and torch's
  ``weight_norm`` parametrization;
* the linen wrappers against ``flax.linen.SpectralNorm``/``WeightNorm`` on the same
  variables, loaded both ways: outputs, updated ``u``/``sigma`` and gradients, for
  ``Dense`` and ``Conv``, and the variable trees (names, shapes, init values);
* the NNX wrappers against ``flax.nnx`` (same init, first call, state loaded both ways)
  and, over several training calls, against flax *linen* on the same values: flax's
  NNX wrappers write the normalized weights into the params (flax #5576), so from
  their second call on they no longer compute the paper's reparametrization.
"""

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

TOL = dict(atol=1e-5, rtol=1e-5)
F64 = dict(atol=1e-5, rtol=1e-5)  # float32 computation against a float64 reference


def _normal(seed, shape, scale=1.0):
    return np.asarray(scale * np.random.default_rng(seed).standard_normal(shape), np.float32)


def _jit(f, **static):
    """``f`` with ``static`` keyword arguments bound, jitted (eager flax compiles per op)."""
    return jax.jit(lambda *args: f(*args, **static))


def _close(a, b, tol=TOL):
    jax.tree.map(lambda p, q: np.testing.assert_allclose(np.asarray(p), np.asarray(q), **tol), a, b)


# ---------------------------------------------------------------- pure functions


def _np_l2n(x, eps):
    return x / np.sqrt(np.sum(x * x) + eps)


def _np_spectral(w, u, n_steps, eps, axis):
    """flax's power iteration in float64 NumPy: (w / sigma, u, sigma, v)."""
    w = np.asarray(w, np.float64)
    n = w.shape[axis]
    mat = np.moveaxis(w, axis, -1).reshape(-1, n)
    u = np.asarray(u, np.float64).reshape(n)
    for _ in range(n_steps):
        v = _np_l2n(mat @ u, eps)
        u = _np_l2n(mat.T @ v, eps)
    sigma = v @ mat @ u
    return w / sigma, u, sigma, v


@pytest.mark.parametrize(
    "shape,axis", [((3, 4), -1), ((5, 2), -1), ((2, 2, 3, 5), -1), ((6, 3, 2, 2), 0), ((4, 6), 0)]
)
@pytest.mark.parametrize("n_steps", [1, 3])
@pytest.mark.parametrize("u_rank", [1, 2])
def test_spectral_normalize_is_the_power_iteration_in_float64(shape, axis, n_steps, u_rank):
    w = _normal(0, shape)
    n = shape[axis]
    u = _normal(1, (n,) if u_rank == 1 else (1, n))
    w_sn, new_u, sigma = jax.jit(
        lambda w, u: jaxnorm.spectral_normalize(w, u, n_steps=n_steps, axis=axis)
    )(w, u)
    ref_w, ref_u, ref_sigma, _ = _np_spectral(w, u, n_steps, 1e-12, axis)
    assert new_u.shape == u.shape and new_u.dtype == jnp.float32
    assert w_sn.shape == w.shape and sigma.shape == ()
    np.testing.assert_allclose(w_sn, ref_w, **F64)
    np.testing.assert_allclose(new_u.reshape(-1), ref_u, **F64)
    np.testing.assert_allclose(sigma, ref_sigma, **F64)


def test_spectral_normalize_converges_to_the_largest_singular_value():
    rng = np.random.default_rng(0)
    q1, _ = np.linalg.qr(rng.standard_normal((6, 6)))
    q2, _ = np.linalg.qr(rng.standard_normal((4, 4)))
    w = (q1[:, :4] * np.array([3.0, 1.0, 0.5, 0.1])) @ q2.T  # singular values 3, 1, .5, .1
    w_sn, _, sigma = jaxnorm.spectral_normalize(
        jnp.asarray(w, jnp.float32), jnp.asarray(_normal(1, (1, 4))), n_steps=30
    )
    np.testing.assert_allclose(sigma, np.linalg.svd(w, compute_uv=False)[0], rtol=1e-5)
    np.testing.assert_allclose(np.linalg.svd(np.asarray(w_sn), compute_uv=False)[0], 1.0, rtol=1e-5)


@pytest.mark.parametrize("shape,axis", [((5, 3), -1), ((4, 3, 2, 2), 0)])
def test_spectral_normalize_gradient_is_the_closed_form(shape, axis):
    """d/dW sum(G * W/sigma) with u, v held: G/sigma - sum(G*W)/sigma^2 * v u^T."""
    w, g = _normal(0, shape), _normal(1, shape)
    u = _normal(2, (1, shape[axis]))
    grad = jax.grad(lambda w: jnp.sum(g * jaxnorm.spectral_normalize(w, u, axis=axis).weight))(w)
    _, ref_u, sigma, ref_v = _np_spectral(w, u, 1, 1e-12, axis)
    w64, g64 = np.asarray(w, np.float64), np.asarray(g, np.float64)
    dmat = np.outer(ref_v, ref_u)  # d sigma / d W in the matrix view
    dsigma = np.moveaxis(dmat.reshape(np.moveaxis(w64, axis, -1).shape), -1, axis)
    ref = g64 / sigma - np.sum(g64 * w64) / sigma**2 * dsigma
    np.testing.assert_allclose(grad, ref, **F64)


def test_spectral_normalize_bf16_weight_keeps_its_dtype_and_iterates_in_f32():
    w = jnp.asarray(_normal(0, (8, 6)), jnp.bfloat16)
    u = jnp.asarray(_normal(1, (1, 6)))
    w_sn, new_u, sigma = jaxnorm.spectral_normalize(w, u)
    assert w_sn.dtype == jnp.bfloat16 and new_u.dtype == jnp.float32
    ref_w, ref_u, ref_sigma, _ = _np_spectral(np.asarray(w, np.float32), u, 1, 1e-12, -1)
    np.testing.assert_allclose(sigma, ref_sigma, rtol=1e-6)  # f32 on the bf16 values
    np.testing.assert_allclose(new_u[0], ref_u, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(w_sn, np.float32), ref_w, rtol=1e-2, atol=1e-2)


def test_divide_by_sigma():
    w = _normal(0, (3, 2))
    np.testing.assert_allclose(jaxnorm.divide_by_sigma(w, jnp.float32(4.0)), w / 4.0)
    np.testing.assert_array_equal(jaxnorm.divide_by_sigma(w, jnp.float32(0.0)), w)


def _np_weight_norm(v, g, feature_axes, eps=1e-12):
    v = np.asarray(v, np.float64)
    keep = () if feature_axes is None else tuple(a % v.ndim for a in np.atleast_1d(feature_axes))
    red = tuple(i for i in range(v.ndim) if i not in keep)
    out = v / np.sqrt(np.sum(v * v, axis=red, keepdims=True) + eps)
    if g is not None:
        out = out * np.reshape(g, [v.shape[i] if i in keep else 1 for i in range(v.ndim)])
    return out


@pytest.mark.parametrize(
    "shape,feature_axes",
    [((3, 4), -1), ((3, 4), 0), ((3, 3, 2, 5), -1), ((3, 3, 2, 5), (0, 3)), ((4, 5), None)],
)
@pytest.mark.parametrize("use_scale", [True, False])
def test_weight_normalize_matches_float64(shape, feature_axes, use_scale):
    v = _normal(0, shape)
    keep = (
        () if feature_axes is None else tuple(a % len(shape) for a in np.atleast_1d(feature_axes))
    )
    g = _normal(1, tuple(shape[a] for a in sorted(keep))) if use_scale else None
    out = jax.jit(lambda v, g: jaxnorm.weight_normalize(v, g, feature_axes=feature_axes))(v, g)
    np.testing.assert_allclose(out, _np_weight_norm(v, g, feature_axes), **F64)


@pytest.mark.parametrize("dim", [0, 1, None])
def test_weight_normalize_is_torch_weight_norm(dim):
    torch.manual_seed(0)
    conv = torch.nn.utils.parametrizations.weight_norm(torch.nn.Conv2d(3, 4, 2), dim=dim)
    with torch.no_grad():  # a g far from ||v||, so the scale shows
        conv.parametrizations.weight.original0.mul_(2.5)
    g = conv.parametrizations.weight.original0.detach().numpy()
    v = conv.parametrizations.weight.original1.detach().numpy()
    scale = g.reshape(-1)[0] if dim is None else g.reshape(-1)
    ours = jaxnorm.weight_normalize(v, jnp.asarray(scale), feature_axes=dim, epsilon=0.0)
    np.testing.assert_allclose(ours, conv.weight.detach().numpy(), **TOL)


def test_functions_refuse_bad_input_with_the_fix():
    w, u = jnp.ones((3, 4)), jnp.ones((1, 4))
    cases = [
        (lambda: jaxnorm.spectral_normalize(jnp.ones(4), u), ValueError, "weight_normalize"),
        (lambda: jaxnorm.spectral_normalize(w, jnp.ones((1, 3))), ValueError, r"\(1, 4\)"),
        (lambda: jaxnorm.spectral_normalize(w, u, n_steps=0), ValueError, "n_steps < 1"),
        (lambda: jaxnorm.spectral_normalize(w, u, n_steps=1.0), TypeError, "Python int"),
        (lambda: jaxnorm.spectral_normalize(w, u, epsilon=-1.0), ValueError, "epsilon"),
        (lambda: jaxnorm.spectral_normalize(w.astype(int), u), TypeError, "astype"),
        (lambda: jaxnorm.spectral_normalize(w, u, axis=2), ValueError, "out of range"),
        (lambda: jaxnorm.weight_normalize(w, jnp.ones(3)), ValueError, r"need \(4,\)"),
        (lambda: jaxnorm.divide_by_sigma(w, jnp.ones(2)), ValueError, "scalar"),
    ]
    for call, error, match in cases:
        with pytest.raises(error, match=match):
            call()


# ---------------------------------------------------------------- linen against flax


def _linen_model(wrapper, layer_fn, **kw):
    """Dense -> wrapper(layer) -> Dense, all compact, so names are auto-assigned."""

    class Net(nn.Module):
        @nn.compact
        def __call__(self, x, train: bool = False):
            x = nn.Dense(6)(x)
            if wrapper in (nn.SpectralNorm, jnn.SpectralNorm):
                return wrapper(layer_fn(), **kw)(x, update_stats=train)
            return wrapper(layer_fn(), **kw)(x)

    return Net()


LAYERS = {
    "dense": (lambda: nn.Dense(5), (3, 4)),
    "conv": (lambda: nn.Conv(5, (3, 3)), (2, 5, 5, 4)),
}


def _spectral_pair(layer, **kw):
    return (
        _linen_model(nn.SpectralNorm, LAYERS[layer][0], **kw),
        _linen_model(jnn.SpectralNorm, LAYERS[layer][0], **kw),
    )


def _perturbed(variables, seed=3):
    """Random params (a zero bias or a ones scale would hide swaps)."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda a: jnp.asarray(rng.standard_normal(a.shape), a.dtype), variables)


@pytest.mark.parametrize("layer", ["dense", "conv"])
@pytest.mark.parametrize("n_steps,source", [(1, "flax"), (2, "jaxnorm")])
def test_linen_spectral_norm_matches_flax_through_training_steps(layer, n_steps, source):
    """Variables created by ``source``'s init, loaded into both (so both directions)."""
    theirs, ours = _spectral_pair(layer, n_steps=n_steps)
    x = jnp.asarray(_normal(0, LAYERS[layer][1]))
    init = (theirs if source == "flax" else ours).init(jax.random.key(0), x)
    variables = {"params": _perturbed(init["params"]), "batch_stats": init["batch_stats"]}
    vt = vo = variables
    train_t, train_o = (_jit(m.apply, train=True, mutable=["batch_stats"]) for m in (theirs, ours))
    for step in range(3):
        xs = x + step
        (yt, ut), (yo, uo) = train_t(vt, xs), train_o(vo, xs)
        _close(yo, yt)
        _close(uo, ut)
        vt, vo = {**vt, **ut}, {**vo, **uo}
    _close(_jit(ours.apply, train=False)(vo, x), _jit(theirs.apply, train=False)(vt, x))
    grads = [
        jax.jit(
            jax.grad(lambda p, m=m, v=v: jnp.sum(m.apply({**v, "params": p}, x, train=False) ** 2))
        )(v["params"])
        for m, v in ((theirs, vt), (ours, vo))
    ]
    _close(grads[1], grads[0], dict(atol=1e-4, rtol=1e-5))


@pytest.mark.parametrize("layer", ["dense", "conv"])
def test_linen_spectral_norm_tree_and_init_as_flax_but_the_kernel_is_never_normalized(layer):
    theirs, ours = _spectral_pair(layer)
    x = jnp.asarray(_normal(0, LAYERS[layer][1]))
    vt, vo = theirs.init(jax.random.key(0), x), ours.init(jax.random.key(0), x)
    assert jax.tree.map(jnp.shape, vo) == jax.tree.map(jnp.shape, vt)
    _close(vo["batch_stats"], vt["batch_stats"], dict(atol=0, rtol=0))  # same u draw
    plain = _linen_model(lambda m, **kw: m, LAYERS[layer][0]).init(jax.random.key(0), x)
    _close(vo["params"], plain["params"], dict(atol=0, rtol=0))  # the initializer's kernel
    # flax stores the kernel divided by its sigma estimate at init:
    name = "Dense_1" if layer == "dense" else "Conv_0"
    assert not np.allclose(vt["params"][name]["kernel"], plain["params"][name]["kernel"])


def test_linen_spectral_norm_use_stored_sigma_divides_by_the_stored_sigma():
    _, ours = _spectral_pair("dense", use_stored_sigma=True)
    x = jnp.asarray(_normal(0, (3, 4)))
    v = ours.init(jax.random.key(0), x)
    v = {"params": _perturbed(v["params"]), "batch_stats": v["batch_stats"]}
    v["batch_stats"]["SpectralNorm_0"]["Dense_1/kernel/sigma"] = jnp.float32(2.5)
    p = v["params"]
    h = np.asarray(x) @ np.asarray(p["Dense_0"]["kernel"]) + np.asarray(p["Dense_0"]["bias"])
    ref = h @ (np.asarray(p["Dense_1"]["kernel"]) / 2.5) + np.asarray(p["Dense_1"]["bias"])
    np.testing.assert_allclose(ours.apply(v, x, train=False), ref, **TOL)
    y, upd = ours.apply(v, x, train=True, mutable=["batch_stats"])  # training iterates
    sigma = upd["batch_stats"]["SpectralNorm_0"]["Dense_1/kernel/sigma"]
    u0 = v["batch_stats"]["SpectralNorm_0"]["Dense_1/kernel/u"]
    np.testing.assert_allclose(sigma, _np_spectral(p["Dense_1"]["kernel"], u0, 1, 1e-12, -1)[2])


class _Setup(nn.Module):
    wrapper: type

    def setup(self):
        self.fc = self.wrapper(nn.Dense(4))

    def __call__(self, x):
        return self.fc(x)


class _Bar(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(3)(nn.Dense(2, name="Baz_0")(x))


@pytest.mark.parametrize(
    "layer_fn,kw,source",
    [
        (LAYERS["dense"][0], {}, "flax"),
        (LAYERS["dense"][0], {}, "jaxnorm"),
        (LAYERS["conv"][0], {}, "flax"),
        (LAYERS["conv"][0], {}, "jaxnorm"),
        (LAYERS["conv"][0], dict(variable_filter=None), "flax"),  # the bias too (signs only)
        (LAYERS["conv"][0], dict(feature_axes=None), "jaxnorm"),
        (LAYERS["conv"][0], dict(feature_axes=(-2, -1)), "flax"),
        (LAYERS["dense"][0], dict(use_scale=False), "jaxnorm"),
        (lambda: _Bar(), dict(variable_filter={"Baz"}), "flax"),  # substring match, as flax
        (lambda: _Bar(), dict(scale_init=nn.initializers.normal(1.0)), "jaxnorm"),
    ],
)
def test_linen_weight_norm_matches_flax(layer_fn, kw, source):
    """Same tree and init draws; variables created by ``source``'s init run in both."""
    theirs = _linen_model(nn.WeightNorm, layer_fn, **kw)
    ours = _linen_model(jnn.WeightNorm, layer_fn, **kw)
    shape = LAYERS["conv"][1] if layer_fn is LAYERS["conv"][0] else (3, 4)
    x = jnp.asarray(_normal(0, shape))
    vt, vo = theirs.init(jax.random.key(0), x), ours.init(jax.random.key(0), x)
    assert jax.tree.map(jnp.shape, vo) == jax.tree.map(jnp.shape, vt)
    wrapper_t = {k: v for k, v in vt["params"].items() if k.startswith("WeightNorm")}
    wrapper_o = {k: v for k, v in vo["params"].items() if k.startswith("WeightNorm")}
    _close(wrapper_o, wrapper_t, dict(atol=0, rtol=0))  # same scale_init draws
    variables = _perturbed(vt if source == "flax" else vo)
    _close(_jit(ours.apply)(variables, x), _jit(theirs.apply)(variables, x))
    grads = [
        jax.jit(jax.grad(lambda v, m=m: jnp.sum(m.apply(v, x) ** 2)))(variables)
        for m in (theirs, ours)
    ]
    _close(grads[1], grads[0], dict(atol=1e-4, rtol=1e-5))


@pytest.mark.parametrize("ours,theirs", [(jnn.WeightNorm, nn.WeightNorm)])
def test_linen_setup_style_names_as_flax(ours, theirs):
    x = jnp.asarray(_normal(0, (2, 3)))
    vo = _Setup(ours).init(jax.random.key(0), x)
    vt = _Setup(theirs).init(jax.random.key(0), x)
    assert jax.tree.map(jnp.shape, vo) == jax.tree.map(jnp.shape, vt)
    assert "layer_instance/kernel/scale" in vo["params"]["fc"]
    _close(_Setup(ours).apply(vt, x), _Setup(theirs).apply(vt, x))


def test_linen_errors_teach():
    _, ours = _spectral_pair("dense")
    x = jnp.ones((3, 4))
    v = ours.init(jax.random.key(0), x)
    with pytest.raises(ValueError, match=r"mutable=\['batch_stats'\]"):
        ours.apply(v, x, train=True)
    with pytest.raises(TypeError, match="Python bool"):
        ours.apply(v, x, train=jnp.array(True))
    _, conv = _spectral_pair("conv", error_on_non_matrix=True)
    with pytest.raises(ValueError, match=r"SpectralNorm at '/SpectralNorm_0'.*Conv_0/kernel"):
        conv.init(jax.random.key(0), jnp.ones(LAYERS["conv"][1]))
    bad = _linen_model(jnn.WeightNorm, LAYERS["dense"][0], feature_axes=2)
    with pytest.raises(ValueError, match=r"WeightNorm at '/WeightNorm_0'.*out of range"):
        bad.init(jax.random.key(0), x)


# ---------------------------------------------------------------- NNX against flax

NNX_LAYERS = {
    "dense": (lambda r: nnx.Linear(6, 5, rngs=r), lambda: nn.Dense(5), (3, 6)),
    "conv": (lambda r: nnx.Conv(4, 5, (3, 3), rngs=r), lambda: nn.Conv(5, (3, 3)), (2, 5, 5, 4)),
}


class _Linen1(nn.Module):
    """Just the wrapper around one layer: the linen reference for an NNX wrapper."""

    wrapper: type
    layer_fn: object
    kw: dict

    @nn.compact
    def __call__(self, x, update_stats=None):
        layer = self.wrapper(self.layer_fn(), **self.kw)
        return layer(x) if update_stats is None else layer(x, update_stats=update_stats)


def _linen_spectral_vars(m, name):
    li = m.layer_instance
    return {
        "params": {name: {"kernel": li.kernel[...], "bias": li.bias[...]}},
        "batch_stats": {
            "SpectralNorm_0": {
                f"{name}/kernel/u": m.batch_stats[("kernel", "u")][...],
                f"{name}/kernel/sigma": m.batch_stats[("kernel", "sigma")][...],
            }
        },
    }


@pytest.mark.parametrize("layer", ["dense", "conv"])
def test_nnx_spectral_norm_matches_flax_and_never_writes_the_params(layer):
    make, linen_layer, shape = NNX_LAYERS[layer]
    ours = jnnx.SpectralNorm(make(nnx.Rngs(0)), rngs=nnx.Rngs(1))
    theirs = nnx.SpectralNorm(make(nnx.Rngs(0)), rngs=nnx.Rngs(1))
    _close(nnx.state(ours), nnx.state(theirs), dict(atol=0, rtol=0))  # same tree, same draws
    nnx.update(ours, _perturbed(nnx.state(ours, nnx.Param)))
    nnx.update(theirs, nnx.state(ours))  # and loaded both ways
    x = jnp.asarray(_normal(0, shape))
    kernel = ours.layer_instance.kernel[...]
    train = nnx.jit(lambda m, x: m(x, update_stats=True))
    _close(train(ours, x), train(theirs, x))  # the first call agrees
    _close(nnx.state(ours, nnx.BatchStat), nnx.state(theirs, nnx.BatchStat))
    np.testing.assert_array_equal(ours.layer_instance.kernel[...], kernel)  # never written
    assert not np.allclose(theirs.layer_instance.kernel[...], kernel)  # flax #5576: written
    # Over several steps ours is linen's SpectralNorm (the paper's W / sigma(W)):
    ours = jnnx.SpectralNorm(make(nnx.Rngs(0)), rngs=nnx.Rngs(1))
    nnx.update(ours, _perturbed(nnx.state(ours, nnx.Param)))
    name = "Dense_0" if layer == "dense" else "Conv_0"
    ref, v = _Linen1(nn.SpectralNorm, linen_layer, {}), _linen_spectral_vars(ours, name)
    ref_train = _jit(ref.apply, update_stats=True, mutable=["batch_stats"])
    for i in range(3):
        yr, upd = ref_train(v, x + i)
        v = {**v, **upd}
        _close(train(ours, x + i), yr)
        _close(_linen_spectral_vars(ours, name), v)


def test_nnx_spectral_norm_modes_gradients_and_wrapped_state():
    seq = nnx.Sequential(nnx.Linear(6, 5, rngs=nnx.Rngs(0)), nnx.BatchNorm(5, rngs=nnx.Rngs(0)))
    ours = jnnx.SpectralNorm(seq, rngs=nnx.Rngs(1))
    assert sorted(ours.batch_stats) == [
        ("layers", 0, "kernel", "sigma"),
        ("layers", 0, "kernel", "u"),
    ]
    x = jnp.asarray(_normal(0, (8, 6)))
    kernel = seq.layers[0].kernel[...]
    grads = nnx.jit(nnx.grad(lambda m: jnp.sum(m(x) ** 2)))(ours)
    # The wrapped BatchNorm's statistics were updated (copied back from the call):
    w_sn = np.asarray(kernel) / float(ours.batch_stats[("layers", 0, "kernel", "sigma")][...])
    h = np.asarray(x) @ w_sn + np.asarray(seq.layers[0].bias[...])
    np.testing.assert_allclose(seq.layers[1].mean[...], 0.01 * h.mean(0), **TOL)
    np.testing.assert_array_equal(seq.layers[0].kernel[...], kernel)
    assert np.abs(grads["layer_instance"]["layers"][0]["kernel"][...]).sum() > 0
    ours.eval()
    stats = jax.tree.map(np.asarray, nnx.state(ours, nnx.BatchStat))
    ours(x)
    _close(nnx.state(ours, nnx.BatchStat), stats, dict(atol=0, rtol=0))  # eval: no update


def _flat_shapes(module):
    return {p: tuple(v.shape) for p, v in nnx.to_flat_state(nnx.state(module))}


@pytest.mark.parametrize("layer", ["dense", "conv"])
@pytest.mark.parametrize("kw", [{}, dict(feature_axes=None), dict(variable_filter=...)])
def test_nnx_weight_norm_matches_flax_and_linen_with_trainable_scales(layer, kw):
    make, linen_layer, shape = NNX_LAYERS[layer]
    ours = jnnx.WeightNorm(make(nnx.Rngs(0)), rngs=nnx.Rngs(1), **kw)
    theirs = nnx.WeightNorm(make(nnx.Rngs(0)), rngs=nnx.Rngs(1), **kw)
    assert _flat_shapes(ours) == _flat_shapes(theirs)
    nnx.update(theirs, _perturbed(nnx.state(theirs)))
    nnx.update(ours, nnx.state(theirs))  # flax's state loads into ours
    x = jnp.asarray(_normal(0, shape))
    kernel = ours.layer_instance.kernel[...]
    call = nnx.jit(lambda m, x: m(x))
    _close(call(ours, x), call(theirs, x))
    np.testing.assert_array_equal(ours.layer_instance.kernel[...], kernel)
    assert not np.allclose(theirs.layer_instance.kernel[...], kernel)  # flax #5576
    # Scales are Params (flax #5577: plain arrays there, never trained):
    assert ("scales", ("kernel",)) in [
        p[:2] for p, _ in nnx.to_flat_state(nnx.state(ours, nnx.Param))
    ]
    assert not any(p[0] == "scales" for p, _ in nnx.to_flat_state(nnx.state(theirs, nnx.Param)))
    # Gradients w.r.t. v and g are linen flax's on the same values:
    name = "Dense_0" if layer == "dense" else "Conv_0"
    lkw = {"feature_axes": kw.get("feature_axes", -1)}
    lkw["variable_filter"] = None if "variable_filter" in kw else {"kernel"}
    params = {
        name: {"kernel": kernel, "bias": ours.layer_instance.bias[...]},
        "WeightNorm_0": {f"{name}/{p[0]}/scale": s[...] for p, s in ours.scales.items()},
    }
    ref = _Linen1(nn.WeightNorm, linen_layer, lkw)
    g_ref = jax.jit(jax.grad(lambda p: jnp.sum(ref.apply({"params": p}, x) ** 2)))(params)
    g = nnx.jit(nnx.grad(lambda m: jnp.sum(m(x) ** 2)))(ours)
    _close(g["layer_instance"]["kernel"][...], g_ref[name]["kernel"], dict(atol=1e-4, rtol=1e-5))
    for p, s in g["scales"].items():
        _close(s[...], g_ref["WeightNorm_0"][f"{name}/{p[0]}/scale"], dict(atol=1e-4, rtol=1e-5))


def test_nnx_errors_teach():
    lin = nnx.Conv(3, 4, (2, 2), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"jaxnorm.nnx.SpectralNorm: the param 'kernel'"):
        jnnx.SpectralNorm(lin, error_on_non_matrix=True, rngs=nnx.Rngs(0))
    sn = jnnx.SpectralNorm(nnx.Linear(3, 4, rngs=nnx.Rngs(0)), rngs=nnx.Rngs(0))
    with pytest.raises(TypeError, match="Python bool"):
        sn(jnp.ones((1, 3)), update_stats=jnp.array(True))
    sn.layer_instance.extra = nnx.Param(jnp.ones((3, 3)))
    with pytest.raises(ValueError, match=r"no batch_stats\[\('extra', 'u'\)\]"):
        sn(jnp.ones((1, 3)))
    with pytest.raises(ValueError, match="WeightNorm.*out of range"):
        jnnx.WeightNorm(nnx.Linear(3, 4, rngs=nnx.Rngs(0)), feature_axes=3, rngs=nnx.Rngs(0))


@pytest.mark.parametrize("wrapper", ["spectral", "weight"])
def test_bf16_weights_stay_bf16_where_flax_promotes_them(wrapper):
    """A deliberate difference: the normalized weight keeps the param's dtype (flax
    promotes a bf16 kernel with its f32 u/scale, so a Dense with dtype=None computes
    in f32); the numbers agree to bf16 precision."""
    pair = (
        (nn.SpectralNorm, jnn.SpectralNorm)
        if wrapper == "spectral"
        else (nn.WeightNorm, jnn.WeightNorm)
    )
    layer = lambda: nn.Dense(5, param_dtype=jnp.bfloat16)  # noqa: E731
    update = dict(update_stats=False) if wrapper == "spectral" else {}
    theirs, ours = (_Linen1(w, layer, {}) for w in pair)
    x = jnp.asarray(_normal(0, (3, 4)), jnp.bfloat16)
    variables = ours.init(jax.random.key(0), x, **update)  # flax's stores an f32 kernel
    yt, yo = theirs.apply(variables, x, **update), ours.apply(variables, x, **update)
    assert yt.dtype == jnp.float32 and yo.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(yo, np.float32), yt, rtol=2e-2, atol=2e-2)
