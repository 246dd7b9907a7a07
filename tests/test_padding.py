"""Padding may hold anything: NaN/Inf padding under grad and jvp, on every masked entry point.

For each masked entry point (functional and module forms of batch, layer, RMS, group and
instance norm and every variant, in training and in evaluation) the loss
``sum(where(mask, y, 0) * w)`` ignores padding, as a loss should. The reference is the
same computation with the padding replaced by zeros: with NaN, +Inf or -Inf padding the
loss, its gradients (reverse mode) and its directional derivatives (forward mode) must be
finite and equal to that reference, and the input gradient must be 0 at padding. A second,
independent reference pins the masked statistics themselves: the unmasked layer applied
to the valid tokens alone.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxnorm
import jaxnorm.linen as jnn
import jaxnorm.nnx as jnnx
from jaxnorm.variants import (
    batch_renorm,
    frozen_batch_norm,
    ghost_batch_norm,
    init_power_norm_stats,
    power_norm,
)

B, T, C = 4, 5, 4
LENGTHS = np.array([5, 3, 0, 4])  # the third sequence is all padding
MASK = (np.arange(T)[None, :] < LENGTHS[:, None])[..., None]  # (B, T, 1)
PADDINGS = [np.nan, np.inf, -np.inf]


def _inputs(seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(0.5, 2.0, (B, T, C)).astype(np.float32)
    w = rng.normal(size=(B, T, C)).astype(np.float32)
    tx = rng.normal(size=(B, T, C)).astype(np.float32)  # a tangent, finite everywhere
    return x, w, tx


def _stats():
    rng = np.random.default_rng(1)
    return jaxnorm.BatchStats(
        jnp.asarray(rng.normal(size=C), jnp.float32),
        jnp.asarray(rng.uniform(0.5, 2.0, C), jnp.float32),
        jnp.asarray(3, jnp.int32),
    )


def _power_stats():
    s = init_power_norm_stats(C)
    return s._replace(mean_square=jnp.linspace(0.5, 2.0, C))


# name -> y = f(x, scale, bias, mask); every one of them masks its statistics and output.
FUNCTIONAL = {
    "batch_norm/train": lambda x, s, b, m: jaxnorm.batch_norm(
        x, _stats(), s, b, training=True, mask=m
    )[0],
    "batch_norm/eval": lambda x, s, b, m: jaxnorm.batch_norm(
        x, _stats(), s, b, training=False, mask=m
    )[0],
    "layer_norm": lambda x, s, b, m: jaxnorm.layer_norm(x, s, b, mask=m),
    "rms_norm": lambda x, s, b, m: jaxnorm.rms_norm(x, s, mask=m) + b,
    "group_norm": lambda x, s, b, m: jaxnorm.group_norm(x, s, b, num_groups=2, mask=m),
    "instance_norm": lambda x, s, b, m: jaxnorm.instance_norm(x, s, b, mask=m),
    "batch_renorm/train": lambda x, s, b, m: batch_renorm(x, _stats(), s, b, training=True, mask=m)[
        0
    ],
    "batch_renorm/eval": lambda x, s, b, m: batch_renorm(x, _stats(), s, b, training=False, mask=m)[
        0
    ],
    "ghost_batch_norm/train": lambda x, s, b, m: ghost_batch_norm(
        x, _stats(), s, b, training=True, virtual_batch_size=2, mask=m
    )[0],
    "ghost_batch_norm/eval": lambda x, s, b, m: ghost_batch_norm(
        x, _stats(), s, b, training=False, virtual_batch_size=2, mask=m
    )[0],
    "frozen_batch_norm": lambda x, s, b, m: frozen_batch_norm(x, _stats(), s, b, mask=m)[0],
    "power_norm/train": lambda x, s, b, m: power_norm(
        x, _power_stats(), s, b, training=True, mask=m
    )[0],
    "power_norm/eval": lambda x, s, b, m: power_norm(
        x, _power_stats(), s, b, training=False, mask=m
    )[0],
}
# PowerNorm's training backward is the paper's approximate gradient (a custom_vjp); it has
# no forward-mode derivative, which must be refused clearly (tested below).
NO_FORWARD_MODE = {"power_norm/train"}


def _loss(f, w, mask):
    def loss(x, scale, bias):
        y = f(x, scale, bias, jnp.asarray(mask))
        return jnp.sum(jnp.where(mask, y, 0.0) * w)

    return loss


def _params():
    return jnp.linspace(0.5, 1.5, C), jnp.linspace(-0.3, 0.3, C)


def _padded(x, value):
    return np.where(np.broadcast_to(MASK, x.shape), x, np.float32(value)).astype(np.float32)


def _assert_same_finite(got, want, what):
    for g, r in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        g, r = np.asarray(g), np.asarray(r)
        assert np.all(np.isfinite(g)), f"{what}: non-finite values {g}"
        np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-5, err_msg=what)


@pytest.mark.parametrize("name", sorted(FUNCTIONAL))
def test_functional_gradients_ignore_nan_and_inf_padding(name):
    x, w, _ = _inputs()
    scale, bias = _params()
    grad = jax.jit(jax.value_and_grad(_loss(FUNCTIONAL[name], w, MASK), argnums=(0, 1, 2)))
    ref_value, ref_grads = grad(_padded(x, 0.0), scale, bias)
    assert np.any(np.asarray(ref_grads[1]) != 0.0), "the loss must reach scale"
    for value in PADDINGS:
        v, grads = grad(_padded(x, value), scale, bias)
        _assert_same_finite((v, grads), (ref_value, ref_grads), f"{name}, padding {value}")
        gx = np.asarray(grads[0])
        assert np.all(gx[~np.broadcast_to(MASK, gx.shape)] == 0.0)


@pytest.mark.parametrize("name", sorted(set(FUNCTIONAL) - NO_FORWARD_MODE))
def test_functional_forward_mode_ignores_nan_and_inf_padding(name):
    x, w, tx = _inputs()
    scale, bias = _params()
    loss = _loss(FUNCTIONAL[name], w, MASK)
    tangents = (tx, jnp.linspace(-1.0, 1.0, C), jnp.linspace(1.0, -1.0, C))
    jvp = jax.jit(lambda x, s, b: jax.jvp(loss, (x, s, b), tangents))
    ref = jvp(_padded(x, 0.0), scale, bias)
    assert float(ref[1]) != 0.0
    for value in PADDINGS:
        _assert_same_finite(jvp(_padded(x, value), scale, bias), ref, f"{name}, pad {value}")


def test_power_norm_training_refuses_forward_mode_clearly():
    x, w, tx = _inputs()
    scale, bias = _params()
    loss = _loss(FUNCTIONAL["power_norm/train"], w, MASK)
    with pytest.raises(TypeError, match="power_norm.*forward-mode.*jax.grad"):
        jax.jvp(loss, (x, scale, bias), (tx, scale, bias))


@pytest.mark.parametrize(
    "name, f, axis",
    [
        ("batch_norm", lambda x, m: jaxnorm.batch_norm(x, _stats(), training=True, mask=m)[0], 0),
        ("layer_norm", lambda x, m: jaxnorm.layer_norm(x, mask=m), None),
        ("rms_norm", lambda x, m: jaxnorm.rms_norm(x, mask=m), None),
    ],
)
def test_masked_output_equals_the_unmasked_layer_on_the_valid_tokens(name, f, axis):
    x, _, _ = _inputs()
    valid = np.broadcast_to(MASK, x.shape)[..., 0]
    y = np.asarray(jax.jit(f)(_padded(x, np.nan), MASK))
    y_ref = np.asarray(jax.jit(f)(x[valid], None))  # (n_valid, C): no padding at all
    np.testing.assert_allclose(y[valid], y_ref, rtol=1e-5, atol=1e-5, err_msg=name)


# ------------------------------------------------------------------ modules

LINEN = {
    "BatchNorm/train": (lambda: jnn.BatchNorm(use_running_average=False), True),
    "BatchNorm/eval": (lambda: jnn.BatchNorm(use_running_average=True), False),
    "LayerNorm": (lambda: jnn.LayerNorm(), False),
    "RMSNorm": (lambda: jnn.RMSNorm(), False),
    "GroupNorm": (lambda: jnn.GroupNorm(num_groups=2), False),
    "InstanceNorm": (lambda: jnn.InstanceNorm(), False),
    "BatchRenorm/train": (lambda: jnn.BatchRenorm(use_running_average=False), True),
    "BatchRenorm/eval": (lambda: jnn.BatchRenorm(use_running_average=True), False),
    "GhostBatchNorm/train": (
        lambda: jnn.GhostBatchNorm(virtual_batch_size=2, use_running_average=False),
        True,
    ),
    "GhostBatchNorm/eval": (
        lambda: jnn.GhostBatchNorm(virtual_batch_size=2, use_running_average=True),
        False,
    ),
    "FrozenBatchNorm": (lambda: jnn.FrozenBatchNorm(), False),
    "PowerNorm/eval": (lambda: jnn.PowerNorm(use_running_average=True), False),
}


@pytest.mark.parametrize("name", sorted(LINEN))
def test_linen_gradients_ignore_nan_and_inf_padding(name):
    make, training = LINEN[name]
    layer = make()
    x, w, tx = _inputs()
    variables = layer.init(jax.random.key(0), x, mask=MASK)
    params = variables["params"]
    rest = {k: v for k, v in variables.items() if k != "params"}

    def loss(p, x):
        out = layer.apply(
            {"params": p, **rest}, x, mask=MASK, mutable=["batch_stats"] if training else False
        )
        y = out[0] if training else out
        return jnp.sum(jnp.where(MASK, y, 0.0) * w)

    grad = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
    jvp = jax.jit(lambda p, x: jax.jvp(loss, (p, x), (jax.tree.map(jnp.ones_like, p), tx)))
    ref, ref_t = grad(params, _padded(x, 0.0)), jvp(params, _padded(x, 0.0))
    for value in PADDINGS:
        _assert_same_finite(grad(params, _padded(x, value)), ref, f"{name} grad, pad {value}")
        _assert_same_finite(jvp(params, _padded(x, value)), ref_t, f"{name} jvp, pad {value}")


NNX = {
    "BatchNorm/train": (lambda r: jnnx.BatchNorm(C, use_running_average=False, rngs=r)),
    "BatchNorm/eval": (lambda r: jnnx.BatchNorm(C, use_running_average=True, rngs=r)),
    "LayerNorm": (lambda r: jnnx.LayerNorm(C, rngs=r)),
    "RMSNorm": (lambda r: jnnx.RMSNorm(C, rngs=r)),
    "GroupNorm": (lambda r: jnnx.GroupNorm(C, num_groups=2, rngs=r)),
    "InstanceNorm": (lambda r: jnnx.InstanceNorm(C, rngs=r)),
    "BatchRenorm/train": (lambda r: jnnx.BatchRenorm(C, use_running_average=False, rngs=r)),
    "BatchRenorm/eval": (lambda r: jnnx.BatchRenorm(C, use_running_average=True, rngs=r)),
    "GhostBatchNorm/train": (
        lambda r: jnnx.GhostBatchNorm(C, 2, use_running_average=False, rngs=r)
    ),
    "GhostBatchNorm/eval": (lambda r: jnnx.GhostBatchNorm(C, 2, use_running_average=True, rngs=r)),
    "FrozenBatchNorm": (lambda r: jnnx.FrozenBatchNorm(C, rngs=r)),
    "PowerNorm/eval": (lambda r: jnnx.PowerNorm(C, use_running_average=True, rngs=r)),
}


@pytest.mark.parametrize("name", sorted(NNX))
def test_nnx_gradients_ignore_nan_and_inf_padding(name):
    model = NNX[name](nnx.Rngs(0))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    x, w, tx = _inputs()

    def loss(p, x, r):
        r = jax.tree.map(jnp.asarray, r)  # fresh variables at this trace level (they mutate)
        y = nnx.merge(graphdef, p, r)(x, mask=MASK)
        return jnp.sum(jnp.where(MASK, y, 0.0) * w)

    grad = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
    jvp = jax.jit(
        lambda p, x, r: jax.jvp(
            lambda p, x: loss(p, x, r), (p, x), (jax.tree.map(jnp.ones_like, p), tx)
        )
    )
    ref = grad(params, _padded(x, 0.0), rest)
    ref_t = jvp(params, _padded(x, 0.0), rest)
    for value in PADDINGS:
        got = grad(params, _padded(x, value), rest)
        _assert_same_finite(got, ref, f"{name} grad, pad {value}")
        got = jvp(params, _padded(x, value), rest)
        _assert_same_finite(got, ref_t, f"{name} jvp, pad {value}")


def test_linen_module_matches_flax_on_unpadded_input():
    """The sweep's layers are the real ones: unmasked, they agree with flax."""
    x, _, _ = _inputs()
    for ours, theirs in ((jnn.LayerNorm(), nn.LayerNorm()), (jnn.RMSNorm(), nn.RMSNorm())):
        v = theirs.init(jax.random.key(0), x)
        np.testing.assert_allclose(ours.apply(v, x), theirs.apply(v, x), atol=1e-5)
