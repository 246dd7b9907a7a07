"""Adaptive LayerNorm (DiT's adaLN / adaLN-Zero) and class-conditional BatchNorm.

References: a torch transcription of DiT's ``modulate`` and ``adaLN_modulation``
(facebookresearch/DiT, models.py), and float64 NumPy per-class batch norm.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import jaxnorm


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
