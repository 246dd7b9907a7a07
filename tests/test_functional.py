"""The functional core against NumPy float64 references, flax's math, and JAX transforms."""

from __future__ import annotations

import functools

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

import jaxnorm

TOL = dict(atol=1e-5, rtol=1e-5)


def np_standardize(x, axes, mask=None, eps=0.0):
    """Float64 NumPy reference: (x - mean) / sqrt(var + eps) over axes, mask-restricted."""
    x = np.asarray(x, np.float64)
    m = np.ones_like(x) if mask is None else np.broadcast_to(mask, x.shape).astype(np.float64)
    xm = np.where(m > 0, x, 0.0)
    n = m.sum(axis=axes, keepdims=True)
    mean = xm.sum(axis=axes, keepdims=True) / n
    var = (np.where(m > 0, x - mean, 0.0) ** 2).sum(axis=axes, keepdims=True) / n
    return (x - mean) / np.sqrt(var + eps), mean, var


# ----------------------------------------------------------------------------- numerics


@pytest.mark.parametrize("fn", ["layer_norm", "batch_norm", "group_norm", "instance_norm"])
def test_large_mean_output_std_is_one_in_float32(fn):
    x = 1e4 + jax.random.normal(jax.random.key(0), (64, 8, 32), jnp.float32)
    if fn == "layer_norm":
        y = jaxnorm.layer_norm(x)
        std = jnp.std(y, axis=-1)
    elif fn == "batch_norm":
        y, _ = jaxnorm.batch_norm(x, jaxnorm.init_batch_stats((32,)), training=True)
        std = jnp.std(y, axis=(0, 1))
    elif fn == "group_norm":
        y = jaxnorm.group_norm(x, num_groups=4)
        std = jnp.std(y.reshape(64, 8, 4, 8), axis=(1, 3))
    else:
        y = jaxnorm.instance_norm(x)
        std = jnp.std(y, axis=1)
    np.testing.assert_allclose(np.asarray(std), 1.0, rtol=0.01)


@pytest.mark.parametrize("row", [2048, 4096])  # the two-pass / shifted boundary for rows
def test_large_mean_long_rows(row):
    x = 1e4 + jax.random.normal(jax.random.key(5), (4, row), jnp.float32)
    y = jaxnorm.layer_norm(x)
    np.testing.assert_allclose(np.asarray(jnp.std(y, axis=-1)), 1.0, rtol=0.01)
    ref, _, _ = np_standardize(np.asarray(x), (1,), eps=1e-6)
    np.testing.assert_allclose(np.asarray(y), ref, atol=2e-3)


def test_large_mean_beats_naive_formula():
    # The naive E[x^2] - E[x]^2 (flax's default) fails on this input; ours does not.
    x = 1e4 + jax.random.normal(jax.random.key(1), (16, 512), jnp.float32)
    naive_var = jnp.mean(x * x, -1) - jnp.mean(x, -1) ** 2
    true_var = np.var(np.asarray(x, np.float64), axis=-1)
    assert np.max(np.abs(np.asarray(naive_var) / true_var - 1)) > 0.5  # the trap is real
    m = jaxnorm.moments(x, (1,), keepdims=False)
    np.testing.assert_allclose(np.asarray(m.var), true_var, rtol=1e-3)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_low_precision_in_low_precision_out_with_f32_statistics(dtype):
    x32 = 100.0 + 3.0 * jax.random.normal(jax.random.key(2), (32, 16), jnp.float32)
    x = x32.astype(dtype)
    stats = jaxnorm.init_batch_stats((16,))
    y, new = jaxnorm.batch_norm(x, stats, training=True)
    assert y.dtype == dtype
    assert new.mean.dtype == jnp.float32 and new.var.dtype == jnp.float32
    ref, mean, var = np_standardize(np.asarray(x.astype(jnp.float32)), (0,), eps=1e-5)
    # Statistics are exact in f32 (of the rounded input); only the output is rounded.
    np.testing.assert_allclose(np.asarray(new.mean), 0.01 * mean[0], rtol=1e-5)
    np.testing.assert_allclose(np.asarray(y.astype(jnp.float32)), ref, atol=2e-2, rtol=2e-2)
    for f in (jaxnorm.layer_norm, jaxnorm.rms_norm):
        assert f(x).dtype == dtype
        assert f(x, dtype=jnp.float32).dtype == jnp.float32
    assert jaxnorm.group_norm(x[:, None, :], num_groups=4).dtype == dtype


# ----------------------------------------------------------------------------- masks


@pytest.mark.parametrize("mask_shape", [(32, 1), (32, 6), (1, 6)])
def test_batch_norm_mask_statistics_match_numpy(mask_shape):
    rng = np.random.default_rng(0)
    x = rng.normal(2.0, 3.0, (32, 6)).astype(np.float32)
    mask = rng.random(mask_shape) < 0.6
    mask.flat[0] = True
    x_garbage = np.where(np.broadcast_to(mask, x.shape), x, np.nan)  # masked-out = NaN
    y, stats = jaxnorm.batch_norm(
        jnp.asarray(x_garbage),
        jaxnorm.init_batch_stats((6,)),
        training=True,
        mask=mask,
        momentum=0.0,
        epsilon=0.0,
    )
    valid = np.broadcast_to(mask, x.shape)
    has_data = valid.any(axis=0)
    with np.errstate(invalid="ignore"):
        ref, mean, var = np_standardize(x, (0,), mask=mask)
    np.testing.assert_allclose(np.asarray(y)[valid], ref[valid], **TOL)
    # Features without a valid element keep their old statistics (mean 0, var 1).
    np.testing.assert_allclose(np.asarray(stats.mean), np.where(has_data, mean[0], 0.0), **TOL)
    np.testing.assert_allclose(np.asarray(stats.var), np.where(has_data, var[0], 1.0), **TOL)


def test_empty_mask_leaves_stats_unchanged_and_output_finite():
    x = jax.random.normal(jax.random.key(3), (8, 4))
    stats = jaxnorm.BatchStats(jnp.arange(4.0), jnp.full((4,), 2.0), jnp.array(3, jnp.int32))
    mask = jnp.zeros((8, 1), bool)
    y, new = jax.jit(
        lambda x, s, m: jaxnorm.batch_norm(x, s, training=True, mask=m, momentum=None)
    )(x, stats, mask)
    chex.assert_trees_all_equal(new, stats)
    assert np.all(np.isfinite(np.asarray(y)))
    # A feature with no valid element is normalized with its running statistics.
    np.testing.assert_allclose(
        np.asarray(y), (np.asarray(x) - np.arange(4.0)) / np.sqrt(2.0 + 1e-5), **TOL
    )


def test_per_feature_empty_mask_updates_only_features_with_data():
    x = jax.random.normal(jax.random.key(4), (8, 3)) + 5.0
    mask = jnp.array([[True, False, True]] * 8)
    stats = jaxnorm.init_batch_stats((3,))
    _, new = jaxnorm.batch_norm(x, stats, training=True, mask=mask, momentum=0.5)
    assert float(new.mean[1]) == 0.0 and float(new.var[1]) == 1.0
    np.testing.assert_allclose(
        np.asarray(new.mean)[[0, 2]], 0.5 * np.asarray(x).mean(0)[[0, 2]], **TOL
    )
    assert int(new.count) == 1


@pytest.mark.parametrize("fn", ["layer_norm", "rms_norm"])
def test_per_sample_norms_with_mask_match_numpy(fn):
    rng = np.random.default_rng(5)
    x = rng.normal(1.0, 2.0, (4, 10)).astype(np.float32)
    mask = np.arange(10)[None, :] < np.array([[10], [7], [3], [1]])
    if fn == "layer_norm":
        y = jaxnorm.layer_norm(jnp.asarray(x), mask=mask, epsilon=1e-6)
        ref, _, _ = np_standardize(x, (1,), mask=mask, eps=1e-6)
    else:
        y = jaxnorm.rms_norm(jnp.asarray(x), mask=mask, epsilon=1e-6)
        ms = (np.where(mask, x.astype(np.float64), 0) ** 2).sum(1, keepdims=True) / mask.sum(
            1, keepdims=True
        )
        ref = x / np.sqrt(ms + 1e-6)
    np.testing.assert_allclose(np.asarray(y)[mask], ref[mask], atol=1e-4, rtol=1e-5)


# ----------------------------------------------------------------------------- flax's math


@pytest.mark.parametrize("axis", [-1, 1, (1, 3)])
def test_batch_norm_matches_flax_linen_math(axis):
    rng = np.random.default_rng(6)
    x = jnp.asarray(rng.normal(0.5, 1.5, (4, 3, 5, 6)).astype(np.float32))
    mod = nn.BatchNorm(use_running_average=False, axis=axis, momentum=0.8)
    variables = mod.init(jax.random.key(0), x)
    variables = jax.tree_util.tree_map(
        lambda v: v + jnp.asarray(rng.normal(0, 0.2, v.shape), v.dtype), variables
    )
    y_ref, upd = mod.apply(variables, x, mutable=["batch_stats"])
    stats = jaxnorm.BatchStats(
        variables["batch_stats"]["mean"], variables["batch_stats"]["var"], jnp.array(0)
    )
    p = variables["params"]
    y, new = jaxnorm.batch_norm(
        x, stats, p["scale"], p["bias"], training=True, axis=axis, momentum=0.8
    )
    np.testing.assert_allclose(np.asarray(y), np.asarray(y_ref), **TOL)
    np.testing.assert_allclose(np.asarray(new.mean), np.asarray(upd["batch_stats"]["mean"]), **TOL)
    np.testing.assert_allclose(np.asarray(new.var), np.asarray(upd["batch_stats"]["var"]), **TOL)
    y_eval = nn.BatchNorm(use_running_average=True, axis=axis).apply(variables, x)
    y2, same = jaxnorm.batch_norm(x, stats, p["scale"], p["bias"], training=False, axis=axis)
    np.testing.assert_allclose(np.asarray(y2), np.asarray(y_eval), **TOL)
    assert same is stats


@pytest.mark.parametrize(
    "flax_layer, ours",
    [
        (nn.LayerNorm(), lambda x, p: jaxnorm.layer_norm(x, p["scale"], p["bias"])),
        (
            nn.LayerNorm(reduction_axes=(-2, -1), feature_axes=-1),
            lambda x, p: jaxnorm.layer_norm(
                x, p["scale"], p["bias"], axis=(-2, -1), feature_axis=-1
            ),
        ),
        (nn.RMSNorm(), lambda x, p: jaxnorm.rms_norm(x, p["scale"])),
        (
            nn.GroupNorm(num_groups=3),
            lambda x, p: jaxnorm.group_norm(x, p["scale"], p["bias"], num_groups=3),
        ),
        (
            nn.GroupNorm(num_groups=None, group_size=2),
            lambda x, p: jaxnorm.group_norm(x, p["scale"], p["bias"], group_size=2),
        ),
    ],
    ids=["ln", "ln_two_axes", "rms", "gn_groups", "gn_group_size"],
)
def test_per_sample_norms_match_flax_linen_math(flax_layer, ours):
    rng = np.random.default_rng(7)
    x = jnp.asarray(rng.normal(0.3, 1.2, (2, 5, 4, 6)).astype(np.float32))
    variables = flax_layer.init(jax.random.key(0), x)
    variables = jax.tree_util.tree_map(
        lambda v: v + jnp.asarray(rng.normal(0, 0.2, v.shape), v.dtype), variables
    )
    np.testing.assert_allclose(
        np.asarray(ours(x, variables["params"])),
        np.asarray(flax_layer.apply(variables, x)),
        **TOL,
    )


# ----------------------------------------------------------------------------- running averages


def test_running_average_recurrences_by_hand():
    rng = np.random.default_rng(8)
    batches = [rng.normal(i, 1.0 + i, (10, 3)).astype(np.float32) for i in range(4)]
    for momentum in (0.9, None):
        stats = jaxnorm.init_batch_stats(3)
        mean_ref, var_ref = np.zeros(3), np.ones(3)
        for k, b in enumerate(batches):
            _, stats = jaxnorm.batch_norm(
                jnp.asarray(b), stats, training=True, momentum=momentum, unbiased_running_var=True
            )
            a = momentum if momentum is not None else k / (k + 1)
            mean_ref = a * mean_ref + (1 - a) * b.mean(0)
            var_ref = a * var_ref + (1 - a) * b.var(0, ddof=1)
        np.testing.assert_allclose(np.asarray(stats.mean), mean_ref, **TOL)
        np.testing.assert_allclose(np.asarray(stats.var), var_ref, **TOL)
        assert int(stats.count) == 4
    # Cumulative average == plain mean of the per-batch statistics.
    np.testing.assert_allclose(mean_ref, np.mean([b.mean(0) for b in batches], 0), **TOL)


def test_eval_mode_returns_stats_untouched():
    stats = jaxnorm.BatchStats(jnp.ones(3), jnp.full(3, 4.0), jnp.array(7, jnp.int32))
    x = jax.random.normal(jax.random.key(9), (5, 3))
    y, out = jax.jit(lambda x, s: jaxnorm.batch_norm(x, s, training=False))(x, stats)
    chex.assert_trees_all_equal(out, stats)
    np.testing.assert_allclose(np.asarray(y), (np.asarray(x) - 1) / np.sqrt(4 + 1e-5), **TOL)


# ----------------------------------------------------------------------------- transforms


def test_jit_does_not_retrace_on_same_shapes():
    @jax.jit
    @chex.assert_max_traces(n=1)
    def step(x, stats, scale, bias):
        return jaxnorm.batch_norm(x, stats, scale, bias, training=True)

    stats = jaxnorm.init_batch_stats(4)
    for i in range(3):
        x = jax.random.normal(jax.random.key(i), (6, 4))
        _, stats = step(x, stats, jnp.ones(4), jnp.zeros(4))
    assert int(stats.count) == 3

    @jax.jit
    @chex.assert_max_traces(n=1)
    def ln(x):
        return jaxnorm.layer_norm(x) + jaxnorm.rms_norm(x) + jaxnorm.group_norm(x, num_groups=2)

    for i in range(3):
        ln(jax.random.normal(jax.random.key(i), (3, 4)))


@pytest.mark.parametrize(
    "f",
    [
        lambda x, s, b: jaxnorm.batch_norm(x, jaxnorm.init_batch_stats(3), s, b, training=True)[0],
        # Masked-out rows pass no gradient to the statistics (mask_safe): differentiate
        # the valid rows, the only ones a loss should read.
        lambda x, s, b: jaxnorm.batch_norm(
            x, jaxnorm.init_batch_stats(3), s, b, training=True, mask=jnp.arange(4)[:, None] < 3
        )[0][:3],
        lambda x, s, b: jaxnorm.layer_norm(x, s, b),
        lambda x, s, b: jaxnorm.rms_norm(x, s) + b,
        lambda x, s, b: jaxnorm.group_norm(x[None], s, b, num_groups=3)[0],
    ],
    ids=["bn", "bn_mask", "ln", "rms", "gn"],
)
def test_gradients_match_finite_differences(f):
    with jax.enable_x64():
        x = jax.random.normal(jax.random.key(10), (4, 3), jnp.float64) * 2 + 1
        s = jnp.array([1.0, 0.5, 2.0], jnp.float64)
        b = jnp.array([0.1, -0.2, 0.3], jnp.float64)
        check_grads(f, (x, s, b), order=2, modes=["rev", "fwd"], atol=1e-4, rtol=1e-4)


def test_vmap_per_example_with_axis_name_equals_batch_norm():
    x = jax.random.normal(jax.random.key(11), (8, 5)) * 3 + 2
    stats = jaxnorm.init_batch_stats(5)

    def per_example(xi):
        y, s = jaxnorm.batch_norm(xi, stats, training=True, axis_name="batch", axis=0)
        return y, s

    y_v, s_v = jax.vmap(per_example, axis_name="batch")(x)
    y_ref, s_ref = jaxnorm.batch_norm(x, stats, training=True)
    np.testing.assert_allclose(np.asarray(y_v), np.asarray(y_ref), **TOL)
    np.testing.assert_allclose(np.asarray(s_v.mean[0]), np.asarray(s_ref.mean), **TOL)
    np.testing.assert_allclose(np.asarray(s_v.var[3]), np.asarray(s_ref.var), **TOL)


def test_vmap_over_independent_batches():
    xs = jax.random.normal(jax.random.key(12), (3, 6, 4))
    stats = jaxnorm.init_batch_stats(4)
    ys, ss = jax.vmap(lambda x: jaxnorm.batch_norm(x, stats, training=True))(xs)
    for i in range(3):
        y, s = jaxnorm.batch_norm(xs[i], stats, training=True)
        np.testing.assert_allclose(np.asarray(ys[i]), np.asarray(y), **TOL)
        np.testing.assert_allclose(np.asarray(ss.var[i]), np.asarray(s.var), **TOL)


def test_shard_map_uneven_masks_equal_global_statistics():
    devices = jax.devices()
    if len(devices) < 8:
        pytest.fail("tests/conftest.py should provide 8 virtual CPU devices")
    mesh = jax.make_mesh((8,), ("data",))
    rng = np.random.default_rng(13)
    x = jnp.asarray(rng.normal(3.0, 2.0, (32, 5)).astype(np.float32))
    # Uneven: device d keeps d of its 4 rows (device 0 keeps none).
    mask = jnp.asarray((np.arange(32) % 4) < (np.arange(32) // 4))[:, None] & jnp.ones((1, 5), bool)
    stats = jaxnorm.init_batch_stats(5)
    spec = jax.sharding.PartitionSpec("data")

    @functools.partial(
        jax.shard_map,
        mesh=mesh,
        in_specs=(spec, spec),
        out_specs=(spec, jax.sharding.PartitionSpec()),
    )
    def sharded(x, m):
        y, s = jaxnorm.batch_norm(x, stats, training=True, axis_name="data", mask=m, momentum=0.0)
        return y, s

    sharding = jax.sharding.NamedSharding(mesh, spec)
    y, s = jax.jit(sharded)(jax.device_put(x, sharding), jax.device_put(mask, sharding))
    y_ref, s_ref = jaxnorm.batch_norm(x, stats, training=True, mask=mask, momentum=0.0)
    np.testing.assert_allclose(np.asarray(y), np.asarray(y_ref), atol=1e-5)
    chex.assert_trees_all_close(s, s_ref, atol=1e-5)
    _, mean, var = np_standardize(np.asarray(x), (0,), mask=np.asarray(mask))
    np.testing.assert_allclose(np.asarray(s.mean), mean[0], atol=1e-5)
    np.testing.assert_allclose(np.asarray(s.var), var[0], atol=1e-5)


def test_scan_and_checkpoint():
    xs = jax.random.normal(jax.random.key(14), (5, 6, 3)) + jnp.arange(5.0)[:, None, None]

    def body(stats, x):
        y, stats = jax.checkpoint(
            lambda x, s: jaxnorm.batch_norm(x, s, training=True, momentum=0.5)
        )(x, stats)
        return stats, y

    final, ys = jax.lax.scan(body, jaxnorm.init_batch_stats(3), xs)
    stats = jaxnorm.init_batch_stats(3)
    for i in range(5):
        y, stats = jaxnorm.batch_norm(xs[i], stats, training=True, momentum=0.5)
        np.testing.assert_allclose(np.asarray(ys[i]), np.asarray(y), **TOL)
    chex.assert_trees_all_close(final, stats, atol=1e-6)

    def loss(x):
        return jnp.sum(jax.lax.scan(body, jaxnorm.init_batch_stats(3), x)[1] ** 3)

    g = jax.grad(loss)(xs)
    g_ref = jax.grad(
        lambda x: sum(
            jnp.sum(jaxnorm.batch_norm(x[i], jaxnorm.init_batch_stats(3), training=True)[0] ** 3)
            for i in range(5)
        )
    )(xs)
    np.testing.assert_allclose(np.asarray(g), np.asarray(g_ref), atol=1e-4)


# ----------------------------------------------------------------------------- fast path
# Without a mask, on one device, the norms take a fused path with a closed-form derivative
# rule. An all-True mask takes the reference path (two-pass moments, plain autodiff): the
# two must agree in value, gradient (reverse and forward mode) and second derivatives.

ALL = jnp.ones((), bool)


def _bn_outputs(out):
    y, stats = out
    return y, stats.mean, stats.var  # the differentiable outputs (count is an int)


FAST_VS_REFERENCE = {
    "ln": lambda x, s, b, m: jaxnorm.layer_norm(x, s, b, mask=m),
    "ln_two_axes_feature_last": lambda x, s, b, m: jaxnorm.layer_norm(
        x, s, b, axis=(1, 2), feature_axis=2, mask=m
    ),
    "rms": lambda x, s, b, m: jaxnorm.rms_norm(x, s, mask=m) + b,
    "bn": lambda x, s, b, m: _bn_outputs(
        jaxnorm.batch_norm(x, jaxnorm.init_batch_stats(x.shape[-1]), s, b, training=True, mask=m)
    ),
    "bn_no_affine": lambda x, s, b, m: (
        jaxnorm.batch_norm(x, jaxnorm.init_batch_stats(x.shape[-1]), training=True, mask=m)[0] * s
    ),
    "instance": lambda x, s, b, m: jaxnorm.instance_norm(x, s, b, mask=m),
}


@pytest.mark.parametrize("name", sorted(FAST_VS_REFERENCE))
def test_fast_path_equals_reference_path(name):
    f = FAST_VS_REFERENCE[name]
    rng = np.random.default_rng(20)
    x = jnp.asarray(rng.normal(3.0, 2.0, (4, 5, 6)).astype(np.float32))
    s = jnp.asarray(rng.normal(1.0, 0.3, 6).astype(np.float32))
    b = jnp.asarray(rng.normal(0.0, 0.3, 6).astype(np.float32))
    fast = functools.partial(f, m=None)
    ref = functools.partial(f, m=ALL)
    chex.assert_trees_all_close(fast(x, s, b), ref(x, s, b), atol=1e-5, rtol=1e-5)

    def loss(g):
        return lambda x, s, b: jnp.sum(jnp.sin(jax.tree_util.tree_leaves(g(x, s, b))[0]))

    chex.assert_trees_all_close(
        jax.grad(loss(fast), (0, 1, 2))(x, s, b),
        jax.grad(loss(ref), (0, 1, 2))(x, s, b),
        atol=1e-4,
        rtol=1e-4,
    )
    t = jax.tree_util.tree_map(jnp.ones_like, (x, s, b))
    chex.assert_trees_all_close(
        jax.jvp(fast, (x, s, b), t)[1], jax.jvp(ref, (x, s, b), t)[1], atol=1e-4, rtol=1e-4
    )
    hvp_fast = jax.jvp(jax.grad(loss(fast)), (x, s, b), t)[1]
    hvp_ref = jax.jvp(jax.grad(loss(ref)), (x, s, b), t)[1]
    chex.assert_trees_all_close(hvp_fast, hvp_ref, atol=1e-3, rtol=1e-3)


def test_fast_path_bfloat16_gradients_match_f32_reference():
    x = jax.random.normal(jax.random.key(21), (16, 32)) * 2 + 1
    s = jnp.linspace(0.5, 1.5, 32)
    g_bf16 = jax.grad(lambda x: jnp.sum(jaxnorm.layer_norm(x, s).astype(jnp.float32) ** 2))(
        x.astype(jnp.bfloat16)
    )
    g_ref = jax.grad(lambda x: jnp.sum(jaxnorm.layer_norm(x, s, mask=ALL) ** 2))(
        x.astype(jnp.bfloat16).astype(jnp.float32)
    )
    assert g_bf16.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(g_bf16, np.float32), np.asarray(g_ref), atol=0.05)


# ----------------------------------------------------------------------------- non-finite input


def test_nonfinite_batch_poisons_stats_by_default_and_skip_nonfinite_guards_them():
    x = np.random.default_rng(30).normal(size=(8, 3)).astype(np.float32)
    x[2, 1] = np.nan
    x[5, 2] = np.inf
    stats = jaxnorm.init_batch_stats(3)
    y, poisoned = jaxnorm.batch_norm(jnp.asarray(x), stats, training=True)
    # NaN/Inf propagate to the output of their feature; they are never hidden.
    assert np.isnan(np.asarray(y)[:, 1]).all() and np.isfinite(np.asarray(y)[:, 0]).all()
    assert not np.isfinite(np.asarray(poisoned.var)[1:]).any()  # as torch and flax do
    y2, guarded = jaxnorm.batch_norm(jnp.asarray(x), stats, training=True, skip_nonfinite=True)
    np.testing.assert_array_equal(np.asarray(y2), np.asarray(y))
    np.testing.assert_allclose(
        np.asarray(guarded.mean), [0.01 * x[:, 0].mean(), 0.0, 0.0], rtol=1e-5, atol=1e-7
    )
    np.testing.assert_allclose(np.asarray(guarded.var)[1:], 1.0)
    assert int(guarded.count) == 1  # feature 0 still updated
    _, untouched = jaxnorm.batch_norm(
        jnp.full((4, 3), jnp.nan), stats, training=True, skip_nonfinite=True
    )
    chex.assert_trees_all_equal(untouched, stats)


def test_instance_norm_several_channel_axes_equals_layer_norm_over_the_rest():
    x = jax.random.normal(jax.random.key(31), (2, 3, 4, 5)) * 2 + 1
    s = jnp.linspace(0.5, 1.5, 15).reshape(3, 5)
    y = jaxnorm.instance_norm(x, s, axis=(1, 3))
    ref, _, _ = np_standardize(np.asarray(x), (2,), eps=1e-6)
    np.testing.assert_allclose(np.asarray(y), ref * np.asarray(s)[None, :, None, :], **TOL)


@pytest.mark.parametrize("fn", ["batch_norm", "layer_norm", "rms_norm", "group_norm"])
def test_nan_padding_never_poisons_gradients_of_valid_elements(fn):
    rng = np.random.default_rng(40)
    x = rng.normal(1.0, 2.0, (6, 8)).astype(np.float32)
    mask = np.ones((6, 8), bool)
    mask[4:, :] = False  # two padding rows
    if fn != "batch_norm":
        mask[1, 5:] = False  # and a padded tail inside a row
    x_pad = jnp.asarray(np.where(mask, x, np.nan))
    scale, bias = jnp.linspace(0.5, 1.5, 8), jnp.linspace(-0.2, 0.2, 8)

    def f(x, scale, bias):
        if fn == "batch_norm":
            return jaxnorm.batch_norm(
                x, jaxnorm.init_batch_stats(8), scale, bias, training=True, mask=mask
            )[0]
        if fn == "layer_norm":
            return jaxnorm.layer_norm(x, scale, bias, mask=mask)
        if fn == "rms_norm":
            return jaxnorm.rms_norm(x, scale, mask=mask) + bias
        return jaxnorm.group_norm(x, scale, bias, num_groups=2, mask=mask)

    def loss(x, scale, bias):
        # Select before any nonlinearity, so the loss itself is NaN-safe.
        return jnp.sum(jnp.sin(jnp.where(mask, f(x, scale, bias), 0.0)))

    grads = jax.grad(loss, (0, 1, 2))(x_pad, scale, bias)
    assert all(
        np.isfinite(np.asarray(g)[mask] if g.shape == mask.shape else g).all() for g in grads
    )
    # Same gradients as with finite padding: padding values do not matter.
    ref = jax.grad(loss, (0, 1, 2))(jnp.asarray(np.where(mask, x, 123.0)), scale, bias)
    np.testing.assert_allclose(np.asarray(grads[0])[mask], np.asarray(ref[0])[mask], atol=1e-5)
    np.testing.assert_allclose(np.asarray(grads[1]), np.asarray(ref[1]), atol=1e-5)
    np.testing.assert_allclose(np.asarray(grads[2]), np.asarray(ref[2]), atol=1e-5)
    # The valid outputs equal those computed on the valid elements alone.
    y = np.asarray(f(x_pad, scale, bias))
    assert np.isfinite(y[mask]).all()


def test_fully_masked_group_passes_through_instead_of_blowing_up():
    x = jnp.array([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    mask = jnp.array([[True, True, True], [False, False, False]])
    y = jaxnorm.layer_norm(x, mask=mask, epsilon=0.0)
    np.testing.assert_allclose(np.asarray(y[1]), [4.0, 5.0, 6.0], rtol=1e-6)
    y = jaxnorm.rms_norm(x, mask=mask, epsilon=0.0)
    np.testing.assert_allclose(np.asarray(y[1]), [4.0, 5.0, 6.0], rtol=1e-6)
