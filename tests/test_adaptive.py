"""Adaptive LayerNorm (DiT's adaLN / adaLN-Zero) and class-conditional BatchNorm.

References: a torch transcription of DiT's ``modulate`` and ``adaLN_modulation``
(facebookresearch/DiT, models.py), and float64 NumPy per-class batch norm.
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


# --- DiT, transcribed (facebookresearch/DiT models.py) -----------------------------------
def dit_modulate(x, shift, scale):
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


def dit_norm(hidden_size):
    return torch.nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)


def _np_layer_norm(x, eps):
    x = np.asarray(x, np.float64)
    c = x - x.mean(-1, keepdims=True)
    return c / np.sqrt(np.mean(c**2, -1, keepdims=True) + eps)


# --- ada_layer_norm ------------------------------------------------------------------------
def test_ada_layer_norm_matches_dit_modulate_in_torch():
    rng = np.random.default_rng(0)
    n, t, c = 3, 5, 16
    x = rng.normal(2, 3, (n, t, c))
    shift, scale = rng.normal(0, 1, (n, c)), rng.normal(0, 0.5, (n, c))
    ref = dit_modulate(
        dit_norm(c).double()(torch.tensor(x)), torch.tensor(shift), torch.tensor(scale)
    ).numpy()
    args = [jnp.asarray(v, jnp.float32) for v in (x, shift, scale)]
    y = jax.jit(jaxnorm.ada_layer_norm)(*args)
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "mod_shape", [(16,), (3, 1, 16), (3, 5, 16)], ids=["per-channel", "n1c", "per-token"]
)
def test_ada_layer_norm_broadcast_forms_match_numpy(mod_shape):
    rng = np.random.default_rng(1)
    x = rng.normal(0, 1, (3, 5, 16)).astype(np.float32)
    shift, scale = (rng.normal(0, 1, mod_shape).astype(np.float32) for _ in range(2))
    ref = _np_layer_norm(x, 1e-6) * (1 + scale.astype(np.float64)) + shift
    np.testing.assert_allclose(jaxnorm.ada_layer_norm(x, shift, scale), ref, atol=2e-5)
    # None leaves that term out.
    np.testing.assert_allclose(
        jaxnorm.ada_layer_norm(x, None, scale), _np_layer_norm(x, 1e-6) * (1 + scale), atol=2e-5
    )


def test_ada_layer_norm_bf16_output_and_float32_modulation():
    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.normal(0, 4, (2, 3, 64)), jnp.bfloat16)
    shift = jnp.asarray(rng.normal(0, 1, (2, 64)), jnp.float32)
    scale = jnp.asarray(rng.normal(0, 1, (2, 64)), jnp.float32)
    y = jaxnorm.ada_layer_norm(x, shift, scale)
    assert y.dtype == jnp.bfloat16
    ref = _np_layer_norm(np.asarray(x, np.float64), 1e-6) * (1 + np.asarray(scale))[:, None]
    ref = ref + np.asarray(shift)[:, None]
    # One bf16 rounding of the output (relative 2**-8), nothing compounded.
    np.testing.assert_allclose(np.asarray(y, np.float64), ref, rtol=2**-8, atol=1e-5)


def test_ada_layer_norm_masked_padding_does_not_poison_gradients():
    rng = np.random.default_rng(3)
    x = rng.normal(0, 1, (2, 4, 8)).astype(np.float32)
    x[1, 3] = np.nan  # padding
    mask = np.ones((2, 4, 1), bool)
    mask[1, 3] = False
    shift, scale = (jnp.asarray(rng.normal(0, 1, (2, 8)), jnp.float32) for _ in range(2))

    def loss(shift, scale):
        y = jaxnorm.ada_layer_norm(x, shift, scale, mask=mask)
        return jnp.sum(jnp.where(mask, y, 0.0) ** 2)

    gs, gc = jax.grad(loss, argnums=(0, 1))(shift, scale)
    assert np.all(np.isfinite(gs)) and np.all(np.isfinite(gc))
    # The gradient equals the one of the valid tokens alone (float64 NumPy).
    xn = _np_layer_norm(np.nan_to_num(x), 1e-6)
    y = xn * (1 + np.asarray(scale, np.float64))[:, None] + np.asarray(shift, np.float64)[:, None]
    w = np.where(mask, 2 * y, 0.0)
    np.testing.assert_allclose(gs, w.sum(1), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(gc, (w * xn).sum(1), rtol=1e-4, atol=1e-4)


def test_ada_layer_norm_refuses_misfit_modulation():
    x = jnp.ones((3, 5, 16))
    with pytest.raises(ValueError, match=r"per example, \(N, C\) = \(3, 16\)"):
        jaxnorm.ada_layer_norm(x, jnp.ones((5, 16)), None)
    with pytest.raises(ValueError, match="scale has shape \\(7,\\)"):
        jaxnorm.ada_layer_norm(x, None, jnp.ones(7))
    with pytest.raises(TypeError, match="floating"):
        jaxnorm.ada_layer_norm(jnp.ones((3, 16), jnp.int32), None, None)


# --- conditional_batch_norm -------------------------------------------------------------------
def _np_conditional_bn(x, labels, gamma_table, beta_table, eps, feature_axis):
    x = np.asarray(x, np.float64)
    red = tuple(a for a in range(x.ndim) if a != feature_axis % x.ndim)
    mean, var = x.mean(red, keepdims=True), x.var(red, keepdims=True)
    xn = (x - mean) / np.sqrt(var + eps)
    shape = [1] * x.ndim
    shape[0], shape[feature_axis] = x.shape[0], x.shape[feature_axis]
    g = np.asarray(gamma_table, np.float64)[labels].reshape(shape)
    b = np.asarray(beta_table, np.float64)[labels].reshape(shape)
    return xn * g + b, mean.reshape(-1), var.reshape(-1)


@pytest.mark.parametrize("axis", [-1, 1], ids=["NHWC", "NCHW"])
def test_conditional_batch_norm_matches_per_class_numpy(axis):
    rng = np.random.default_rng(4)
    shape = (8, 4, 4, 6) if axis == -1 else (8, 6, 4, 4)
    x = rng.normal(3, 2, shape).astype(np.float32)
    labels = rng.integers(0, 5, 8)
    gt, bt = rng.normal(1, 0.5, (5, 6)), rng.normal(0, 0.5, (5, 6))
    stats = jaxnorm.init_batch_stats((6,))
    f = jax.jit(jaxnorm.conditional_batch_norm, static_argnames=("training", "axis", "momentum"))
    args = (x, stats, jnp.asarray(labels), jnp.asarray(gt, jnp.float32))
    y, new = f(*args, jnp.asarray(bt, jnp.float32), training=True, axis=axis, momentum=0.9)
    ref, mean, var = _np_conditional_bn(x, labels, gt, bt, 1e-5, axis)
    np.testing.assert_allclose(y, ref, rtol=1e-4, atol=1e-4)
    # Shared running statistics: exactly plain batch_norm's update.
    bn = jax.jit(jaxnorm.batch_norm, static_argnames=("training", "axis", "momentum"))
    _, plain = bn(x, stats, training=True, axis=axis, momentum=0.9)
    for a, b in zip(new, plain, strict=True):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_allclose(new.mean, 0.1 * mean, rtol=1e-5)
    np.testing.assert_allclose(new.var, 0.9 + 0.1 * var, rtol=1e-5)
    # Evaluation: the running statistics, the same class gathering.
    args = (x, new) + args[2:]
    y_eval, same = f(*args, jnp.asarray(bt, jnp.float32), training=False, axis=axis)
    for a, b in zip(same, new, strict=True):
        np.testing.assert_array_equal(a, b)
    bshape = [1] * x.ndim
    bshape[axis] = 6
    xn = (x - np.reshape(new.mean, bshape)) / np.sqrt(np.reshape(new.var, bshape) + 1e-5)
    g_shape = [1] * x.ndim
    g_shape[0], g_shape[axis] = 8, 6
    ref_eval = xn * gt[labels].reshape(g_shape) + bt[labels].reshape(g_shape)
    np.testing.assert_allclose(y_eval, ref_eval, rtol=1e-4, atol=1e-4)


def test_conditional_batch_norm_bad_label_gives_nan_only_in_its_row():
    x = jnp.asarray(np.random.default_rng(5).normal(size=(4, 3)), jnp.float32)
    table = jnp.ones((2, 3))
    y, _ = jaxnorm.conditional_batch_norm(
        x, jaxnorm.init_batch_stats((3,)), jnp.array([0, 2, 1, -1]), table, training=True
    )
    assert np.isnan(y[1]).all() and np.isnan(y[3]).all()
    assert np.isfinite(y[0]).all() and np.isfinite(y[2]).all()


def test_conditional_batch_norm_refuses_bad_arguments():
    x, st = jnp.ones((4, 3)), jaxnorm.init_batch_stats((3,))
    cbn = jaxnorm.conditional_batch_norm
    with pytest.raises(TypeError, match="labels must be integer"):
        cbn(x, st, jnp.zeros(4), training=True)
    with pytest.raises(ValueError, match=r"labels must have shape \(N,\) = \(4,\)"):
        cbn(x, st, jnp.zeros((4, 1), jnp.int32), training=True)
    with pytest.raises(ValueError, match=r"scale_table must have shape \(num_classes"):
        cbn(x, st, jnp.zeros(4, jnp.int32), jnp.ones(3), training=True)
    with pytest.raises(ValueError, match="2 classes but bias_table has 3"):
        cbn(x, st, jnp.zeros(4, jnp.int32), jnp.ones((2, 3)), jnp.ones((3, 3)), training=True)
    with pytest.raises(ValueError, match="includes axis 0"):
        cbn(x, jaxnorm.init_batch_stats((4,)), jnp.zeros(4, jnp.int32), training=True, axis=0)


# --- AdaLNZero against DiT's adaLN_modulation (torch) -------------------------------------------
def _torch_modulation(cond, hidden, chunks, rng):
    """DiT: adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(cond, chunks * hidden))."""
    m = torch.nn.Sequential(torch.nn.SiLU(), torch.nn.Linear(cond, chunks * hidden)).double()
    with torch.no_grad():  # random, not DiT's zeros, so that the order of chunks matters
        m[1].weight.copy_(torch.tensor(rng.normal(0, 0.3, (chunks * hidden, cond))))
        m[1].bias.copy_(torch.tensor(rng.normal(0, 0.3, chunks * hidden)))
    return m


def _ada_modules(tm, cond, hidden, num_modulations, use_gate):
    kernel = jnp.asarray(tm[1].weight.detach().numpy().T, jnp.float32)
    bias = jnp.asarray(tm[1].bias.detach().numpy(), jnp.float32)
    kw = dict(num_modulations=num_modulations, use_gate=use_gate)
    linen = jnn.AdaLNZero(hidden, **kw)
    variables = {"params": {"modulation": {"kernel": kernel, "bias": bias}}}
    module = jnnx.AdaLNZero(cond, hidden, **kw, rngs=nnx.Rngs(0))
    module.modulation.kernel[...], module.modulation.bias[...] = kernel, bias
    return [lambda c: linen.apply(variables, c), module]


@pytest.mark.parametrize("api", [0, 1], ids=["linen", "nnx"])
def test_ada_ln_zero_block_matches_dit_block_in_torch(api):
    """DiTBlock.forward with attention and MLP replaced by fixed linear maps."""
    rng = np.random.default_rng(6)
    n, t, d, cond = 2, 5, 8, 12
    x, c = rng.normal(0, 1, (n, t, d)), rng.normal(0, 1, (n, cond))
    tm = _torch_modulation(cond, d, 6, rng)
    w_attn, w_mlp = rng.normal(0, 0.4, (d, d)), rng.normal(0, 0.4, (d, d))
    tx, tc = torch.tensor(x), torch.tensor(c)
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = tm(tc).chunk(6, dim=1)
    norm = dit_norm(d).double()
    attn, mlp = (lambda h, w=w: h @ torch.tensor(w) for w in (w_attn, w_mlp))
    tx = tx + gate_msa.unsqueeze(1) * attn(dit_modulate(norm(tx), shift_msa, scale_msa))
    tx = tx + gate_mlp.unsqueeze(1) * mlp(dit_modulate(norm(tx), shift_mlp, scale_mlp))
    ref = tx.detach().numpy()

    ada = _ada_modules(tm, cond, d, 2, True)[api]
    xj, cj = jnp.asarray(x, jnp.float32), jnp.asarray(c, jnp.float32)
    m_attn, m_mlp = ada(cj)
    y = xj + m_attn.gate[:, None] * (
        jaxnorm.ada_layer_norm(xj, m_attn.shift, m_attn.scale) @ w_attn
    )
    y = y + m_mlp.gate[:, None] * (jaxnorm.ada_layer_norm(y, m_mlp.shift, m_mlp.scale) @ w_mlp)
    np.testing.assert_allclose(y, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("api", [0, 1], ids=["linen", "nnx"])
def test_ada_ln_final_layer_matches_dit_final_layer(api):
    """DiT's FinalLayer: shift, scale = adaLN_modulation(c).chunk(2, dim=1), no gate."""
    rng = np.random.default_rng(7)
    x, c = rng.normal(0, 1, (2, 5, 8)), rng.normal(0, 1, (2, 12))
    tm = _torch_modulation(12, 8, 2, rng)
    shift, scale = tm(torch.tensor(c)).chunk(2, dim=1)
    ref = dit_modulate(dit_norm(8).double()(torch.tensor(x)), shift, scale).detach().numpy()
    (m,) = _ada_modules(tm, 12, 8, 1, False)[api](jnp.asarray(c, jnp.float32))
    assert m.gate is None
    y = jaxnorm.ada_layer_norm(jnp.asarray(x, jnp.float32), m.shift, m.scale)
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5)


class _LinenDiTBlock(nn.Module):
    """A DiT block (adaLN-Zero) from flax's attention and a Dense MLP."""

    @nn.compact
    def __call__(self, x, c):
        m_attn, m_mlp = jnn.AdaLNZero(features=x.shape[-1])(c)
        h = jaxnorm.ada_layer_norm(x, m_attn.shift, m_attn.scale)
        x = x + m_attn.gate[:, None] * nn.MultiHeadDotProductAttention(num_heads=2)(h)
        h = jaxnorm.ada_layer_norm(x, m_mlp.shift, m_mlp.scale)
        h = nn.Dense(x.shape[-1])(nn.gelu(nn.Dense(4 * x.shape[-1])(h)))
        return x + m_mlp.gate[:, None] * h


class _NNXDiTBlock(nnx.Module):
    def __init__(self, d, cond, rngs):
        self.ada = jnnx.AdaLNZero(cond, d, rngs=rngs)
        self.attn = nnx.MultiHeadAttention(num_heads=2, in_features=d, decode=False, rngs=rngs)
        self.fc1, self.fc2 = nnx.Linear(d, 4 * d, rngs=rngs), nnx.Linear(4 * d, d, rngs=rngs)

    def __call__(self, x, c):
        m_attn, m_mlp = self.ada(c)
        h = jaxnorm.ada_layer_norm(x, m_attn.shift, m_attn.scale)
        x = x + m_attn.gate[:, None] * self.attn(h)
        h = self.fc2(nnx.gelu(self.fc1(jaxnorm.ada_layer_norm(x, m_mlp.shift, m_mlp.scale))))
        return x + m_mlp.gate[:, None] * h


def test_ada_ln_zero_block_is_the_identity_at_init_and_still_learns():
    rng = np.random.default_rng(8)
    x = jnp.asarray(rng.normal(0, 1, (2, 5, 8)), jnp.float32)
    c = jnp.asarray(rng.normal(0, 1, (2, 12)), jnp.float32)
    block = _LinenDiTBlock()
    params = block.init(jax.random.key(0), x, c)["params"]
    np.testing.assert_array_equal(block.apply({"params": params}, x, c), x)
    g = jax.grad(lambda p: jnp.sum(block.apply({"params": p}, x, c) ** 2))(params)
    # The zero-initialized projection gets a gradient (through the gates); the
    # branches behind a zero gate do not yet.
    assert np.abs(np.asarray(g["AdaLNZero_0"]["modulation"]["kernel"])).max() > 1e-3
    assert np.abs(np.asarray(g["Dense_1"]["kernel"])).max() == 0.0

    nblock = _NNXDiTBlock(8, 12, nnx.Rngs(0))
    np.testing.assert_array_equal(nblock(x, c), x)
    grads = nnx.grad(lambda m: jnp.sum(m(x, c) ** 2))(nblock)
    assert np.abs(np.asarray(grads["ada"]["modulation"]["kernel"][...])).max() > 1e-3


# --- ConditionalBatchNorm modules -------------------------------------------------------------
@pytest.mark.parametrize("axis", [-1, 1], ids=["NHWC", "NCHW"])
def test_conditional_batch_norm_modules_match_numpy_and_share_batch_norm_stats(axis):
    rng = np.random.default_rng(9)
    shape = (8, 3, 3, 6) if axis == -1 else (8, 6, 3, 3)
    x = jnp.asarray(rng.normal(2, 3, shape), jnp.float32)
    labels = jnp.asarray(rng.integers(0, 4, 8))
    gt = jnp.asarray(rng.normal(1, 0.5, (4, 6)), jnp.float32)
    bt = jnp.asarray(rng.normal(0, 0.5, (4, 6)), jnp.float32)
    ref, mean, var = _np_conditional_bn(x, np.asarray(labels), gt, bt, 1e-5, axis)

    # linen: training step, then evaluation with the updated statistics.
    cbn = jnn.ConditionalBatchNorm(4, axis=axis, momentum=0.9)
    variables = cbn.init(jax.random.key(0), x, labels, use_running_average=False)
    assert jax.tree.map(jnp.shape, variables["params"]) == {"bias": (4, 6), "scale": (4, 6)}
    variables = {"params": {"scale": gt, "bias": bt}, "batch_stats": variables["batch_stats"]}
    y, upd = cbn.apply(variables, x, labels, use_running_average=False, mutable=["batch_stats"])
    np.testing.assert_allclose(y, ref, rtol=1e-4, atol=1e-4)
    bn = jnn.BatchNorm(axis=axis, momentum=0.9)
    bn_vars = bn.init(jax.random.key(0), x, use_running_average=False)
    _, bn_upd = bn.apply(bn_vars, x, use_running_average=False, mutable=["batch_stats"])
    for name in ("mean", "var"):
        np.testing.assert_allclose(
            upd["batch_stats"][name], bn_upd["batch_stats"][name], rtol=1e-6, atol=1e-7
        )
    np.testing.assert_allclose(upd["batch_stats"]["var"], 0.9 + 0.1 * var, rtol=1e-5)
    y_eval = cbn.apply({**variables, **upd}, x, labels, use_running_average=True)
    g_shape = [1] * x.ndim
    g_shape[0], g_shape[axis] = 8, 6
    s_shape = [1] * x.ndim
    s_shape[axis] = 6
    m_run = np.reshape(upd["batch_stats"]["mean"], s_shape)
    v_run = np.reshape(upd["batch_stats"]["var"], s_shape)
    ref_eval = (np.asarray(x, np.float64) - m_run) / np.sqrt(v_run + 1e-5)
    ref_eval = ref_eval * np.asarray(gt)[labels].reshape(g_shape)
    ref_eval = ref_eval + np.asarray(bt)[labels].reshape(g_shape)
    np.testing.assert_allclose(y_eval, ref_eval, rtol=1e-4, atol=1e-4)

    # NNX: the same numbers.
    module = jnnx.ConditionalBatchNorm(6, 4, axis=axis, momentum=0.9, rngs=nnx.Rngs(0))
    assert module.scale.shape == module.bias.shape == (4, 6)
    module.scale[...], module.bias[...] = gt, bt
    module.train()
    np.testing.assert_allclose(module(x, labels), ref, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(module.var[...], upd["batch_stats"]["var"], rtol=1e-6)
    module.eval()
    np.testing.assert_allclose(module(x, labels), y_eval, rtol=1e-5, atol=1e-5)


def test_conditional_batch_norm_modules_refuse_with_their_name():
    x, labels = jnp.ones((4, 3)), jnp.zeros(4, jnp.int32)
    module = jnnx.ConditionalBatchNorm(3, 2, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="jaxnorm.nnx.ConditionalBatchNorm: the mode is not set"):
        module(x, labels)
    module.train()
    with pytest.raises(TypeError, match="ConditionalBatchNorm: conditional_batch_norm: labels"):
        module(x, jnp.zeros(4))
    cbn = jnn.ConditionalBatchNorm(2, use_running_average=False)
    with pytest.raises(ValueError, match=r"ConditionalBatchNorm at '/': conditional_batch_norm"):
        cbn.init(jax.random.key(0), x, jnp.zeros((4, 2), jnp.int32))
