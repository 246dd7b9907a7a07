"""The edges an independent audit found: large means on every statistics path, running
averages at large step counts, complex inputs, and one value per feature.

References are float64 NumPy one-liners, a hand-written float64 recurrence, and flax's
own layers. (NaN/Inf padding under grad and jvp has its own module, test_padding.py.)
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import jaxnorm
from jaxnorm.stats import moments
from jaxnorm.variants import ghost_batch_norm

GOAL = 1e-5  # relative variance error allowed against float64, at any mean


def _data(mean: float, shape=(512, 6), seed=0):
    """float32 data with std 1 around ``mean``, and its float64 twin (same values)."""
    rng = np.random.default_rng(seed)
    x32 = rng.normal(mean, 1.0, shape).astype(np.float32)
    return x32, x32.astype(np.float64)


def _uneven_mask(n_rows: int, devices: int = 8, seed=1) -> np.ndarray:
    """A row mask, uneven across ``devices`` equal shards, the first shard all False."""
    rng = np.random.default_rng(seed)
    mask = rng.random(n_rows) < 0.6
    mask[: n_rows // devices] = False
    return mask[:, None]


def _ref_var(x64: np.ndarray, mask: np.ndarray | None, axis) -> np.ndarray:
    if mask is None:
        return x64.var(axis=axis)
    return np.nanvar(np.where(np.broadcast_to(mask, x64.shape), x64, np.nan), axis=axis)


def _rel(got, want) -> float:
    got = np.asarray(got, np.float64).reshape(np.shape(want))
    return float(np.max(np.abs(got - want) / np.abs(want)))


MEANS = [1e4, 1e6]


@pytest.mark.parametrize("mean", MEANS)
@pytest.mark.parametrize("masked", [False, True])
def test_batch_axis_statistics_are_exact_at_large_means(mean, masked):
    x32, x64 = _data(mean)
    mask = _uneven_mask(len(x32)) if masked else None
    m = jax.jit(lambda x, k: moments(x, (0,), mask=k))(x32, mask)
    assert _rel(m.m2 / m.count, _ref_var(x64, mask, 0)) < GOAL


@pytest.mark.parametrize("mean", MEANS)
@pytest.mark.parametrize("row", [64, 4096])  # two-pass rows, and the shifted single pass
def test_row_statistics_are_exact_at_large_means(mean, row):
    x32, x64 = _data(mean, shape=(4, row))
    mask = np.arange(row) < row - 7  # padding at the end of every row
    for k in (None, mask):
        m = jax.jit(lambda x, k: moments(x, (1,), mask=k))(x32, k)
        assert _rel(m.m2 / m.count, _ref_var(x64, k, 1)) < GOAL
        y = jax.jit(lambda x, k: jaxnorm.layer_norm(x, epsilon=0.0, mask=k))(x32, k)
        valid = np.broadcast_to(True if k is None else k, x64.shape)
        y_valid = np.where(valid, np.asarray(y, np.float64), np.nan)
        # The output has unit variance to float32 rounding. Its offset is bounded by the
        # float32 spacing of the mean itself (the mean is stored in float32).
        np.testing.assert_allclose(np.nanvar(y_valid, 1), 1.0, rtol=GOAL)
        assert np.all(np.abs(np.nanmean(y_valid, 1)) <= np.spacing(np.float32(mean)))


def _mesh(axis_type):
    if len(jax.devices()) < 8:
        pytest.fail("tests/conftest.py should provide 8 virtual CPU devices")
    return jax.make_mesh((8,), ("data",), axis_types=(axis_type,))


@pytest.mark.parametrize("mean", MEANS)
def test_shard_map_with_uneven_masks_and_an_empty_device_is_exact(mean):
    mesh = _mesh(AxisType.Explicit)
    x32, x64 = _data(mean)
    mask = np.broadcast_to(_uneven_mask(len(x32)), x32.shape)
    stats = jaxnorm.init_batch_stats(6)

    @functools.partial(jax.shard_map, mesh=mesh, in_specs=(P("data"), P("data")), out_specs=P())
    def update(x, m):
        _, s = jaxnorm.batch_norm(x, stats, training=True, axis_name="data", mask=m, momentum=0.0)
        return s

    sharding = NamedSharding(mesh, P("data"))
    s = jax.jit(update)(jax.device_put(x32, sharding), jax.device_put(mask, sharding))
    assert _rel(s.var, _ref_var(x64, mask, 0)) < GOAL
    valid_mean = np.nanmean(np.where(mask, x64, np.nan), 0)
    np.testing.assert_allclose(np.asarray(s.mean, np.float64), valid_mean, rtol=1e-7, atol=0)


@pytest.mark.parametrize("axis_type", [AxisType.Explicit, AxisType.Auto])
@pytest.mark.parametrize("masked", [False, True])
def test_jit_over_a_sharded_batch_is_exact_at_mean_1e6(axis_type, masked):
    mesh = _mesh(axis_type)
    x32, x64 = _data(1e6)
    mask = np.broadcast_to(_uneven_mask(len(x32)), x32.shape) if masked else None
    sharding = NamedSharding(mesh, P("data"))
    xs = jax.device_put(x32, sharding)
    ms = None if mask is None else jax.device_put(mask, sharding)
    stats = jaxnorm.init_batch_stats(6)
    _, s = jax.jit(lambda x, m: jaxnorm.batch_norm(x, stats, training=True, mask=m, momentum=0.0))(
        xs, ms
    )
    assert _rel(s.var, _ref_var(x64, mask, 0)) < GOAL


def test_ghost_batch_norm_running_statistics_are_exact_at_mean_1e6():
    x32, x64 = _data(1e6, shape=(64, 3))
    _, s = jax.jit(
        lambda x: ghost_batch_norm(
            x, jaxnorm.init_batch_stats(3), training=True, virtual_batch_size=4, momentum=0.0
        )
    )(x32)
    assert _rel(s.var, x64.var(0)) < GOAL


# ------------------------------------------------------------ running averages


def _cumulative_reference(count: int, old: float, batch: float) -> float:
    """torch's cumulative average, in float64: old + (batch - old) / (count + 1)."""
    return old + (batch - old) / (count + 1)


@pytest.mark.parametrize("count", [3_000_000, 2**24 + 5, 2**30])
def test_cumulative_average_keeps_averaging_at_large_counts(count):
    stats = jaxnorm.BatchStats(jnp.zeros(2), jnp.ones(2), jnp.asarray(count, jnp.int32))
    x = np.array([[1.0, 3.0], [3.0, 5.0]], np.float32)  # batch means 2, 4; variances 1, 1
    _, new = jaxnorm.batch_norm(x, stats, training=True, momentum=None)
    want = [_cumulative_reference(count, 0.0, b) for b in (2.0, 4.0)]
    np.testing.assert_allclose(np.asarray(new.mean, np.float64), want, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(new.var), [1.0, 1.0], rtol=0)
    assert int(new.count) == count + 1


def test_float64_statistics_average_in_float64():
    with jax.enable_x64(True):
        count = 10**9
        stats = jaxnorm.BatchStats(
            jnp.full(1, 0.1, jnp.float64), jnp.ones(1, jnp.float64), jnp.asarray(count, jnp.int32)
        )
        x = np.array([[1.0], [3.0]], np.float32)  # float32 activations, float64 stats
        _, new = jaxnorm.batch_norm(x, stats, training=True, momentum=None)
        assert new.mean.dtype == jnp.float64
        want = _cumulative_reference(count, 0.1, 2.0)
        np.testing.assert_allclose(float(new.mean[0]), want, rtol=1e-14)


# ------------------------------------------------------------ complex inputs


def _complex(shape, seed=3):
    rng = np.random.default_rng(seed)
    return (rng.normal(1.0, 2.0, shape) + 1j * rng.normal(-0.5, 1.0, shape)).astype(np.complex64)


def _np_complex_norm(z, axes, eps, scale=None, bias=None):
    z = z.astype(np.complex128)
    mu = z.mean(axis=axes, keepdims=True)
    var = (np.abs(z - mu) ** 2).mean(axis=axes, keepdims=True)
    y = (z - mu) / np.sqrt(var + eps)
    if scale is not None:
        y = y * scale
    if bias is not None:
        y = y + bias
    return y, mu, var


def test_complex_layer_and_batch_norm_match_numpy():
    z = _complex((6, 5))
    scale = np.linspace(0.5, 1.5, 5).astype(np.float32)
    bias = np.linspace(-1.0, 1.0, 5).astype(np.float32)
    y = jax.jit(lambda z: jaxnorm.layer_norm(z, scale, bias, epsilon=1e-6))(z)
    ref, _, _ = _np_complex_norm(z, (1,), 1e-6, scale, bias)
    assert y.dtype == jnp.complex64
    np.testing.assert_allclose(np.asarray(y), ref, atol=1e-5)

    stats = jaxnorm.init_batch_stats(5, dtype=jnp.complex64)
    assert stats.mean.dtype == jnp.complex64 and stats.var.dtype == jnp.float32
    y, new = jax.jit(
        lambda z: jaxnorm.batch_norm(z, stats, scale, bias, training=True, momentum=0.0)
    )(z)
    ref, mu, var = _np_complex_norm(z, (0,), 1e-5, scale, bias)
    np.testing.assert_allclose(np.asarray(y), ref, atol=1e-5)
    np.testing.assert_allclose(np.asarray(new.mean), mu[0], atol=1e-5)
    np.testing.assert_allclose(np.asarray(new.var), var[0], rtol=1e-5)
    y_eval, _ = jaxnorm.batch_norm(z, new, scale, bias, training=False)
    np.testing.assert_allclose(np.asarray(y_eval), ref, atol=1e-4)


def test_complex_rms_group_and_instance_norm_match_numpy():
    z = _complex((2, 3, 4))
    y = jaxnorm.rms_norm(z, epsilon=1e-6)
    ms = (np.abs(z.astype(np.complex128)) ** 2).mean(-1, keepdims=True)
    np.testing.assert_allclose(np.asarray(y), z / np.sqrt(ms + 1e-6), atol=1e-5)
    y = jaxnorm.instance_norm(z, epsilon=1e-6)
    np.testing.assert_allclose(np.asarray(y), _np_complex_norm(z, (1,), 1e-6)[0], atol=1e-5)
    y = jaxnorm.group_norm(z, num_groups=2, epsilon=1e-6)
    zg = z.reshape(2, 3, 2, 2)
    ref = _np_complex_norm(zg, (1, 3), 1e-6)[0].reshape(z.shape)
    np.testing.assert_allclose(np.asarray(y), ref, atol=1e-5)


@pytest.mark.parametrize("kind", ["BatchNorm", "LayerNorm", "RMSNorm"])
def test_complex_functional_matches_flax_linen(kind):
    z = _complex((8, 4), seed=4)
    layer = getattr(nn, kind)(**({"use_running_average": False} if kind == "BatchNorm" else {}))
    variables = layer.init(jax.random.key(0), z)
    out = layer.apply(variables, z, mutable=["batch_stats"])
    y_flax = out[0]
    if kind == "BatchNorm":
        stats = jaxnorm.init_batch_stats(4, dtype=jnp.complex64)
        y, new = jaxnorm.batch_norm(
            z, stats, jnp.ones(4), jnp.zeros(4), training=True, epsilon=1e-5
        )
        new_flax = out[1]["batch_stats"]
        np.testing.assert_allclose(np.asarray(new.mean), np.asarray(new_flax["mean"]), atol=1e-6)
        np.testing.assert_allclose(np.asarray(new.var), np.asarray(new_flax["var"]), atol=1e-6)
    elif kind == "LayerNorm":
        y = jaxnorm.layer_norm(z, jnp.ones(4), jnp.zeros(4))
    else:
        y = jaxnorm.rms_norm(z, jnp.ones(4))
    np.testing.assert_allclose(np.asarray(y), np.asarray(y_flax), atol=1e-5)


def test_complex_input_with_real_running_mean_is_refused():
    with pytest.raises(TypeError, match=r"init_batch_stats\(\(3,\), dtype=jnp.complex64\)"):
        jaxnorm.batch_norm(_complex((4, 3)), jaxnorm.init_batch_stats(3), training=True)


# ------------------------------------------------------------ one value per feature


@pytest.mark.parametrize("use_bias", [True, False])
def test_one_value_per_feature_follows_flax(use_bias):
    x = np.array([[1.0, -2.0, 3.0]], np.float32)
    layer = nn.BatchNorm(use_running_average=False, momentum=0.9, use_bias=use_bias)
    variables = layer.init(jax.random.key(0), x)
    if use_bias:
        variables = jax.tree.map(lambda a: a, variables)
        variables["params"]["bias"] = jnp.array([0.5, 0.25, -1.0])
    y_flax, upd = layer.apply(variables, x, mutable=["batch_stats"])
    bias = variables["params"]["bias"] if use_bias else None
    y, new = jaxnorm.batch_norm(
        x, jaxnorm.init_batch_stats(3), jnp.ones(3), bias, training=True, momentum=0.9
    )
    np.testing.assert_allclose(np.asarray(y), np.asarray(y_flax), atol=1e-6)
    np.testing.assert_allclose(np.asarray(new.mean), np.asarray(upd["batch_stats"]["mean"]))
    np.testing.assert_allclose(np.asarray(new.var), np.asarray(upd["batch_stats"]["var"]))


def test_one_value_per_feature_is_refused_under_torch_unbiased_variance():
    with pytest.raises(ValueError, match="n/\\(n-1\\) is undefined"):
        jaxnorm.batch_norm(
            jnp.ones((1, 3)), jaxnorm.init_batch_stats(3), training=True, unbiased_running_var=True
        )


# ------------------------------------------------------------ where flax is wrong


@pytest.mark.parametrize("api", ["functional", "nnx", "linen"])
def test_group_norm_with_reduction_axes_that_keep_a_spatial_axis(api):
    """GroupNorm(num_groups=2, reduction_axes=(2, 3)) on (N, H, W, C): statistics per
    (sample, row, group) over W and the group's channels. flax.nnx.GroupNorm repeats them
    along axis 1 instead of the channel axis (off by ~2 against float64 on this input;
    see the compatibility guide); jaxnorm must match the float64 formula."""
    x = np.asarray(jax.random.normal(jax.random.key(0), (2, 4, 4, 8)), np.float32)
    xg = x.astype(np.float64).reshape(2, 4, 4, 2, 4)
    mu = xg.mean(axis=(2, 4), keepdims=True)
    var = xg.var(axis=(2, 4), keepdims=True)
    ref = ((xg - mu) / np.sqrt(var + 1e-6)).reshape(x.shape)
    if api == "functional":
        y = jaxnorm.group_norm(x, num_groups=2, reduction_axes=(2, 3))
    elif api == "nnx":
        from flax import nnx

        import jaxnorm.nnx as jnnx

        y = jnnx.GroupNorm(8, num_groups=2, reduction_axes=(2, 3), rngs=nnx.Rngs(0))(x)
    else:
        import jaxnorm.linen as jnn

        layer = jnn.GroupNorm(num_groups=2, reduction_axes=(2, 3))
        y = layer.apply(layer.init(jax.random.key(0), x), x)
    np.testing.assert_allclose(np.asarray(y), ref, atol=1e-5)
