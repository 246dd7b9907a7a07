"""jaxnorm's Flax modules under transforms: nn.scan, nn.remat, nn.vmap, nnx.vmap, nnx.scan,
and cross-device statistics under jax.shard_map (8 virtual CPU devices, tests/conftest.py).

Each transformed computation is compared with the same computation written out
without the transform (a Python loop over layers, the un-vmapped global batch) or with
the functional core on the full batch.
"""

from __future__ import annotations

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

import jaxnorm
import jaxnorm.linen as jnn
import jaxnorm.nnx as jnnx

TOL = dict(atol=1e-5, rtol=1e-5)  # float32, same statistics computed in another order
LAYERS = 3
TRAIN = dict(mutable=["batch_stats"])


def _normal(seed: int, shape) -> jax.Array:
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


def _random_stats(tree, seed: int = 3):
    """Random running statistics (so a mixed-up layer index shows), params kept."""
    rng = np.random.default_rng(seed)

    def new(path, leaf):
        name = path[-1].key
        if name == "mean":
            return jnp.asarray(0.2 * rng.standard_normal(leaf.shape), leaf.dtype)
        if name == "var":
            return jnp.asarray(1.0 + 0.3 * rng.random(leaf.shape), leaf.dtype)
        return leaf

    return jax.tree_util.tree_map_with_path(new, tree)


# ------------------------------------------------------------------------ linen


class Block(nn.Module):
    """Dense -> BatchNorm -> relu, in the (carry, x) -> (carry, y) form nn.scan wants."""

    @nn.compact
    def __call__(self, x, _):
        x = nn.Dense(4)(x)
        x = jnn.BatchNorm(use_running_average=False, momentum=0.8)(x)
        return nn.relu(x), None


ScannedBlocks = nn.scan(
    Block,
    variable_axes={"params": 0, "batch_stats": 0},
    split_rngs={"params": True},
    length=LAYERS,
)


def test_linen_scan_over_layers_equals_a_loop():
    x = _normal(0, (6, 4))

    def both(x):
        stack = ScannedBlocks()
        v = _random_stats(stack.init(jax.random.key(0), x, None))
        (y, _), upd = stack.apply(v, x, None, **TRAIN)
        y_loop, upd_loop = x, []
        for i in range(LAYERS):
            v_i = jax.tree.map(lambda a, i=i: a[i], v)
            (y_loop, _), u = Block().apply(v_i, y_loop, None, **TRAIN)
            upd_loop.append(u)
        upd_loop = jax.tree.map(lambda *a: jnp.stack(a), *upd_loop)
        return (y, upd), (y_loop, upd_loop), v

    got, want, v = jax.jit(both)(x)
    stats_shapes = jax.tree.map(jnp.shape, got[1]["batch_stats"])
    assert stats_shapes == {"BatchNorm_0": {"mean": (LAYERS, 4), "var": (LAYERS, 4)}}
    chex.assert_trees_all_close(got, want, **TOL)
    new, old = got[1]["batch_stats"]["BatchNorm_0"], v["batch_stats"]["BatchNorm_0"]
    assert not np.allclose(new["mean"], old["mean"])


def test_linen_remat_equals_plain_in_values_statistics_and_gradients():
    x = _normal(1, (6, 4))
    plain, remat = Block(), nn.remat(Block)()

    def loss_and_stats(module, params, batch_stats, x):
        (y, _), upd = module.apply({"params": params, "batch_stats": batch_stats}, x, None, **TRAIN)
        return jnp.sum(jnp.sin(y)), upd

    def both(x):
        v = _random_stats(plain.init(jax.random.key(0), x, None))
        out = []
        for module in (plain, remat):
            grad_fn = jax.value_and_grad(loss_and_stats, argnums=1, has_aux=True)
            out.append(grad_fn(module, v["params"], v["batch_stats"], x))
        return out

    got, want = jax.jit(both)(x)
    chex.assert_trees_all_close(got, want, **TOL)


class _MaskedBN(nn.Module):
    """nn.vmap maps positional arguments; BatchNorm takes ``mask`` by keyword."""

    @nn.compact
    def __call__(self, x, mask):
        bn = jnn.BatchNorm(use_running_average=False, momentum=0.8, axis_name="batch", name="bn")
        return bn(x, mask=mask)


@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "uneven-mask"])
def test_linen_vmap_with_axis_name_equals_global_batch_norm(masked):
    """BatchNorm over a vmapped axis named by axis_name is BatchNorm of the whole batch."""
    x = _normal(2, (4, 5, 3))  # 4 vmapped groups of 5 examples
    lengths = np.array([5, 1, 3, 0])  # valid examples per group, one group empty
    mask = jnp.asarray(np.arange(5)[None, :, None] < lengths[:, None, None]) if masked else None
    vmapped = nn.vmap(
        _MaskedBN,
        in_axes=(0, 0 if masked else None),
        out_axes=0,
        variable_axes={"params": None, "batch_stats": None},
        split_rngs={"params": False},
        axis_name="batch",
    )()
    flat = jnn.BatchNorm(use_running_average=False, momentum=0.8)

    def both(x):
        v = _random_stats(flat.init(jax.random.key(0), x[0]))
        got = vmapped.apply({k: {"bn": c} for k, c in v.items()}, x, mask, **TRAIN)
        flat_mask = None if mask is None else mask.reshape(20, 1)
        y, upd = flat.apply(v, x.reshape(20, 3), mask=flat_mask, **TRAIN)
        return got, (y.reshape(4, 5, 3), {"batch_stats": {"bn": upd["batch_stats"]}})

    got, want = jax.jit(both)(x)
    chex.assert_trees_all_close(got, want, **TOL)


# -------------------------------------------------------------------------- NNX


def test_nnx_vmap_with_axis_name_equals_global_batch_norm():
    x = _normal(4, (4, 5, 3))
    bn = jnnx.BatchNorm(3, use_running_average=False, momentum=0.8, axis_name="batch",
                        rngs=nnx.Rngs(0))  # fmt: skip
    bn.mean[...] = _normal(5, (3,)) * 0.2
    flat = jnnx.BatchNorm(3, use_running_average=False, momentum=0.8, rngs=nnx.Rngs(0))
    nnx.update(flat, nnx.clone(nnx.state(bn)))

    @nnx.jit
    def both(bn, flat, x):
        y = nnx.vmap(lambda bn, x: bn(x), in_axes=(None, 0), out_axes=0, axis_name="batch")(bn, x)
        return y, flat(x.reshape(20, 3)).reshape(4, 5, 3)

    y, y_flat = both(bn, flat, x)
    chex.assert_trees_all_close(y, y_flat, **TOL)
    chex.assert_trees_all_close(nnx.state(bn), nnx.state(flat), **TOL)


def test_nnx_vmap_per_example_batch_norm_follows_flax():
    """A stack of Linear -> BatchNorm blocks, one per example, under nnx.vmap: each
    BatchNorm trains on a single value per feature (y = bias, statistics updated), as
    flax.nnx's own BatchNorm does in the same program."""

    class Block(nnx.Module):
        def __init__(self, norm: type, rngs: nnx.Rngs):
            self.linear = nnx.Linear(3, 3, rngs=rngs)
            self.bn = norm(3, use_running_average=False, momentum=0.8, rngs=rngs)

        def __call__(self, x):
            return self.bn(self.linear(x))

    def stack(norm: type) -> Block:
        @nnx.split_rngs(splits=4)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def create(rngs: nnx.Rngs) -> Block:
            return Block(norm, rngs)

        return create(nnx.Rngs(0))

    ours, theirs = stack(jnnx.BatchNorm), stack(nnx.BatchNorm)
    theirs.bn.mean[...] = _normal(8, (4, 3)) * 0.2
    theirs.bn.bias[...] = _normal(9, (4, 3)) * 0.2
    nnx.update(ours, nnx.clone(nnx.state(theirs)))
    x = _normal(10, (4, 3))

    @nnx.jit
    def both(ours, theirs, x):
        forward = nnx.vmap(lambda block, x: block(x), in_axes=(0, 0), out_axes=0)
        return forward(ours, x), forward(theirs, x)

    y, y_ref = both(ours, theirs, x)
    chex.assert_trees_all_close(y, y_ref, **TOL)
    chex.assert_trees_all_close(nnx.state(ours), nnx.state(theirs), **TOL)


class NNXBlock(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.linear = nnx.Linear(4, 4, rngs=rngs)
        self.bn = jnnx.BatchNorm(4, use_running_average=False, momentum=0.8, rngs=rngs)

    def __call__(self, x):
        return nnx.relu(self.bn(self.linear(x)))


def test_nnx_scan_over_layers_equals_a_loop():
    @nnx.split_rngs(splits=LAYERS)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def create(rngs: nnx.Rngs) -> NNXBlock:
        return NNXBlock(rngs)

    blocks = nnx.jit(create)(nnx.Rngs(0))  # one compile instead of eager init per op
    blocks.bn.mean[...] = _normal(6, (LAYERS, 4)) * 0.2
    initial_mean = np.asarray(blocks.bn.mean[...])
    graphdef, state = nnx.split(blocks)
    x = _normal(7, (6, 4))

    @nnx.jit
    def scanned(blocks, x):
        @nnx.scan(in_axes=(0, nnx.Carry), out_axes=nnx.Carry)
        def forward(block, x):
            return block(x)

        return forward(blocks, x)

    @jax.jit
    def loop(state, x):
        new_states = []
        for i in range(LAYERS):
            block = nnx.merge(graphdef, jax.tree.map(lambda a, i=i: a[i], state))
            x = block(x)
            new_states.append(nnx.state(block))
        return x, jax.tree.map(lambda *a: jnp.stack(a), *new_states)

    y_loop, state_loop = loop(state, x)
    y = scanned(blocks, x)
    chex.assert_trees_all_close(y, y_loop, **TOL)
    chex.assert_trees_all_close(nnx.state(blocks), state_loop, **TOL)
    assert not np.allclose(blocks.bn.mean[...], initial_mean)


# ------------------------------------------------------------------ shard_map


@pytest.fixture(scope="module")
def mesh():
    if jax.device_count() < 8:
        pytest.skip("needs 8 devices (XLA_FLAGS set in tests/conftest.py)")
    # Auto axes: shard_map's in_specs say how to split plain (unsharded) arrays.
    return jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))


def test_shard_map_batch_norm_equals_the_core_on_the_global_batch(mesh):
    """Uneven per-device masks (one device empty) give the exact global statistics."""
    per_device, c = 3, 2
    x = _normal(8, (8 * per_device, c)) * 2.0 + 1.0
    valid = np.array([3, 1, 0, 2, 3, 1, 2, 3])  # valid rows per device
    mask = jnp.asarray((np.arange(per_device)[None, :] < valid[:, None]).reshape(-1, 1))
    bn = jnn.BatchNorm(use_running_average=False, momentum=0.8, axis_name="data")
    v = _random_stats(jax.jit(lambda x: bn.init(jax.random.key(0), x))(x))

    @jax.jit
    @jax.shard_map(mesh=mesh, in_specs=(P(), P("data"), P("data")), out_specs=(P("data"), P()))
    def sharded(v, x, mask):
        return bn.apply(v, x, mask=mask, **TRAIN)

    y, upd = sharded(v, x, mask)

    s = v["batch_stats"]
    stats = jaxnorm.BatchStats(s["mean"], s["var"], jnp.zeros((), jnp.int32))
    y_ref, s_ref = jax.jit(
        lambda x: jaxnorm.batch_norm(
            x, stats, v["params"]["scale"], v["params"]["bias"],
            training=True, momentum=0.8, mask=mask,
        )
    )(x)  # fmt: skip
    chex.assert_trees_all_close(y, y_ref, **TOL)
    chex.assert_trees_all_close(upd["batch_stats"], {"mean": s_ref.mean, "var": s_ref.var}, **TOL)
    # ... and the global statistics are those of the valid rows, by NumPy.
    rows = np.asarray(x)[np.asarray(mask)[:, 0]]
    chex.assert_trees_all_close(
        upd["batch_stats"]["mean"], 0.8 * np.asarray(s["mean"]) + 0.2 * rows.mean(0), **TOL
    )


def test_shard_map_nnx_batch_norm_equals_single_device(mesh):
    x = _normal(9, (16, 3))
    bn = jnnx.BatchNorm(3, use_running_average=False, axis_name="data", rngs=nnx.Rngs(0))
    ref = jnnx.BatchNorm(3, use_running_average=False, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(bn)

    @jax.jit
    @jax.shard_map(mesh=mesh, in_specs=(P(), P("data")), out_specs=(P("data"), P()))
    def sharded(state, x):
        module = nnx.merge(graphdef, state)
        y = module(x)
        return y, nnx.state(module)

    y, new_state = sharded(state, x)
    y_ref = nnx.jit(lambda m, x: m(x))(ref, x)
    chex.assert_trees_all_close(y, y_ref, **TOL)
    chex.assert_trees_all_close(new_state, nnx.state(ref), **TOL)


def test_shard_map_layer_norm_over_sharded_features(mesh):
    """Features split across devices (tensor parallel): axis_name merges the statistics."""
    x = _normal(10, (3, 16))
    ln = jnn.LayerNorm(axis_name="data")
    params = {"scale": 1.0 + 0.1 * _normal(11, (16,)), "bias": 0.1 * _normal(12, (16,))}

    @jax.jit
    @jax.shard_map(mesh=mesh, in_specs=(P("data"), P(None, "data")), out_specs=P(None, "data"))
    def sharded(params, x):
        return ln.apply({"params": params}, x)

    y_ref = jax.jit(lambda p, x: nn.LayerNorm().apply({"params": p}, x))(params, x)
    chex.assert_trees_all_close(sharded(params, x), y_ref, **TOL)
