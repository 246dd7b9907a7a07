"""The linen and NNX forms of the variants equal the functional core on the same state.

The modules add no math: each test builds the state by hand (perturbed away from
the init values, so that a swapped or ignored variable shows), runs the module, and
compares outputs and new state with :mod:`jaxnorm.variants` called on that state.
Everything runs under jit (eager JAX compiles every primitive on its own).
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxnorm
import jaxnorm.linen as jnn
import jaxnorm.variants_linen as vnn
import jaxnorm.variants_nnx as vnnx
from jaxnorm.variants import (
    PowerNormStats,
    batch_renorm,
    frozen_batch_norm,
    ghost_batch_norm,
    power_norm,
    renorm_schedule,
    update_power_norm_grad_stat,
)

EXACT = dict(atol=1e-6, rtol=1e-6)  # same core on the same numbers, maybe fused differently


def _normal(seed, shape, loc=0.0):
    return jnp.asarray(loc + np.random.default_rng(seed).standard_normal(shape), jnp.float32)


def _mask(seed, shape):
    return jnp.asarray(np.random.default_rng(seed).random(shape) < 0.7)


def _perturb(tree, seed=0):
    """Random values for every float leaf (ones/zeros at init hide swaps)."""
    rng = np.random.default_rng(seed)

    def new(path, leaf):
        name = str(getattr(path[-1], "key", path[-1]))
        if not jnp.issubdtype(leaf.dtype, jnp.floating):
            return jnp.asarray(7, leaf.dtype) if leaf.shape == () else leaf
        noise = rng.standard_normal(leaf.shape)
        value = 0.5 + np.abs(noise) if name in ("var", "mean_square") else 0.3 * noise
        if name == "scale":
            value = 1.0 + value
        return jnp.asarray(value, leaf.dtype)

    return jax.tree_util.tree_map_with_path(new, tree)


def _apply(module, variables, x, **kw):
    return jax.jit(lambda v, x: module.apply(v, x, **kw))(variables, x)


def _core(f, *args, **kw):
    return jax.jit(lambda *a: f(*a, **kw))(*args)


# ------------------------------------------------------------------------- linen


@pytest.mark.parametrize("warmup", [None, 5], ids=["fixed", "schedule"])
def test_linen_batch_renorm_is_the_core(warmup):
    x, mask = _normal(0, (6, 2, 3), loc=1.0), _mask(1, (6, 2, 3))
    layer = vnn.BatchRenorm(
        momentum=0.8, r_max=1.5, d_max=0.5, warmup_steps=warmup, r_relax_steps=4
    )
    v = _perturb(
        jax.jit(layer.init, static_argnames="use_running_average")(
            jax.random.key(0), x, use_running_average=False
        )
    )
    assert set(v["batch_stats"]) == {"mean", "var", "count"}
    y, upd = _apply(layer, v, x, use_running_average=False, mask=mask, mutable=["batch_stats"])
    bs, p = v["batch_stats"], v["params"]
    stats = jaxnorm.BatchStats(bs["mean"], bs["var"], bs["count"])
    limits = dict(r_max=1.5, d_max=0.5)
    if warmup is not None:  # count 7: 2 steps into a 4-step r ramp and a 20000-step d ramp
        r_max, d_max = renorm_schedule(7, warmup_steps=5, r_max=1.5, d_max=0.5, r_relax_steps=4)
        limits = dict(r_max=float(r_max), d_max=float(d_max))
    y_ref, new = _core(
        batch_renorm,
        x,
        stats,
        p["scale"],
        p["bias"],
        training=True,
        momentum=0.8,
        mask=mask,
        **limits,
    )
    chex.assert_trees_all_close(y, y_ref, **EXACT)
    chex.assert_trees_all_close(upd["batch_stats"], new._asdict(), **EXACT)
    y = _apply(layer, v, x, use_running_average=True)
    chex.assert_trees_all_close(
        y, _core(batch_renorm, x, stats, p["scale"], p["bias"], training=False)[0], **EXACT
    )


def test_linen_power_norm_is_the_core_including_the_grad_stat():
    x, mask, dy = _normal(2, (2, 4, 3)), _mask(3, (2, 4, 1)), _normal(4, (2, 4, 3))
    layer = vnn.PowerNorm(momentum=0.8)
    v = _perturb(jax.jit(layer.init, static_argnums=2)(jax.random.key(0), x, False))
    assert set(v["batch_stats"]) == {"mean_square", "grad_stat", "count"}
    params, batch_stats = v["params"], v["batch_stats"]

    def loss(params, batch_stats):
        y, upd = layer.apply(
            {"params": params, "batch_stats": batch_stats},
            x,
            use_running_average=False,
            mask=mask,
            mutable=["batch_stats"],
        )
        return jnp.sum(y * dy), upd["batch_stats"]

    @jax.jit
    def step(params, batch_stats):
        (g_params, g_stats), new = jax.grad(loss, argnums=(0, 1), has_aux=True, allow_int=True)(
            params, batch_stats
        )
        return g_params, vnn.update_grad_stats(new, g_stats)

    g_params, new_stats = step(params, batch_stats)

    def core_loss(scale, bias, stats):
        y, new = power_norm(x, stats, scale, bias, training=True, momentum=0.8, mask=mask)
        return jnp.sum(y * dy), new

    @jax.jit
    def core_step(scale, bias, stats):
        (g_scale, g_bias, g_stats), new = jax.grad(
            core_loss, argnums=(0, 1, 2), has_aux=True, allow_int=True
        )(scale, bias, stats)
        return {"scale": g_scale, "bias": g_bias}, update_power_norm_grad_stat(new, g_stats)

    stats = PowerNormStats(**batch_stats)
    g_ref, new_ref = core_step(params["scale"], params["bias"], stats)
    chex.assert_trees_all_close(g_params, g_ref, **EXACT)
    chex.assert_trees_all_close(new_stats, new_ref._asdict(), **EXACT)
    assert np.max(np.abs(np.asarray(new_stats["grad_stat"] - batch_stats["grad_stat"]))) > 1e-3
    y = _apply(layer, v, x, use_running_average=True)
    y_ref, _ = _core(power_norm, x, stats, params["scale"], params["bias"], training=False)
    chex.assert_trees_all_close(y, y_ref, **EXACT)


def test_linen_update_grad_stats_walks_nested_collections():
    stats = {"mean_square": jnp.ones(2), "grad_stat": jnp.zeros(2), "count": jnp.int32(1)}
    grads = {"mean_square": jnp.zeros(2), "grad_stat": jnp.array([0.5, -1.0]), "count": None}
    tree = {"Block_0": {"PowerNorm_0": stats, "BatchNorm_0": {"mean": jnp.ones(2)}}}
    grad_tree = {"Block_0": {"PowerNorm_0": grads, "BatchNorm_0": {"mean": jnp.zeros(2)}}}
    new = vnn.update_grad_stats(tree, grad_tree)
    np.testing.assert_array_equal(new["Block_0"]["PowerNorm_0"]["grad_stat"], [0.5, -1.0])
    np.testing.assert_array_equal(new["Block_0"]["BatchNorm_0"]["mean"], [1.0, 1.0])


def test_linen_ghost_batch_norm_is_the_core_with_batch_norm_variables():
    x, mask = _normal(5, (8, 3), loc=2.0), _mask(6, (8, 3))
    layer = vnn.GhostBatchNorm(4, momentum=0.8, use_running_average=False)
    v = _perturb(jax.jit(layer.init)(jax.random.key(0), x))
    bn_vars = jax.jit(jnn.BatchNorm(use_running_average=False).init)(jax.random.key(0), x)
    chex.assert_trees_all_equal_shapes_and_dtypes(v, bn_vars)
    y, upd = _apply(layer, v, x, mask=mask, mutable=["batch_stats"])
    p, bs = v["params"], v["batch_stats"]
    stats = jaxnorm.BatchStats(bs["mean"], bs["var"], jnp.int32(0))
    y_ref, new = _core(
        ghost_batch_norm,
        x,
        stats,
        p["scale"],
        p["bias"],
        virtual_batch_size=4,
        training=True,
        momentum=0.8,
        mask=mask,
    )
    chex.assert_trees_all_close(y, y_ref, **EXACT)
    chex.assert_trees_all_close(upd["batch_stats"], {"mean": new.mean, "var": new.var}, **EXACT)
    with pytest.raises(ValueError, match="GhostBatchNorm at '/'.*mutable=\\['batch_stats'\\]"):
        layer.apply(v, x)


def test_linen_frozen_batch_norm_loads_batch_norm_variables_and_never_updates():
    x = _normal(7, (5, 4, 3), loc=1.0)
    v = _perturb(jax.jit(jnn.BatchNorm(use_running_average=False).init)(jax.random.key(0), x))
    layer = vnn.FrozenBatchNorm()
    chex.assert_trees_all_equal_shapes_and_dtypes(jax.jit(layer.init)(jax.random.key(0), x), v)
    y = _apply(layer, v, x, use_running_average=False)  # no mutable needed
    stats = jaxnorm.BatchStats(v["batch_stats"]["mean"], v["batch_stats"]["var"], jnp.int32(0))
    y_ref, _ = _core(frozen_batch_norm, x, stats, v["params"]["scale"], v["params"]["bias"])
    chex.assert_trees_all_close(y, y_ref, **EXACT)
    _, upd = _apply(layer, v, x, mutable=["batch_stats"])
    chex.assert_trees_all_equal(upd["batch_stats"], v["batch_stats"])
    with pytest.raises(ValueError, match="FrozenBatchNorm at '/'.*no 'batch_stats'"):
        layer.apply({"params": v["params"]}, x)


# --------------------------------------------------------------------------- NNX


def _set_state(module, seed):
    """Perturb an NNX module's Params and BatchStats in place."""
    state = nnx.state(module, nnx.Any(nnx.Param, nnx.BatchStat))
    nnx.update(module, _perturb(state, seed))


@nnx.jit
def _nnx_call(module, x, mask):
    return module(x, mask=mask)


def test_nnx_batch_renorm_is_the_core_with_the_schedule():  # fixed limits: the linen test
    x, mask = _normal(8, (6, 3), loc=1.0), _mask(9, (6, 3))
    layer = vnnx.BatchRenorm(
        3,
        momentum=0.8,
        r_max=1.5,
        d_max=0.5,
        warmup_steps=5,
        r_relax_steps=4,
        rngs=nnx.Rngs(0),
    )
    _set_state(layer, 1)
    stats = jaxnorm.BatchStats(layer.mean[...], layer.var[...], layer.count[...])
    scale, bias = layer.scale[...], layer.bias[...]
    with pytest.raises(ValueError, match="mode is not set.*model.train\\(\\)"):
        layer(x)
    layer.train()
    y = _nnx_call(layer, x, mask)
    # count 7 (perturbed): 2 steps into the 4-step r ramp and the 20000-step d ramp.
    r_max, d_max = renorm_schedule(7, warmup_steps=5, r_max=1.5, d_max=0.5, r_relax_steps=4)
    limits = dict(r_max=float(r_max), d_max=float(d_max))
    y_ref, new = _core(
        batch_renorm, x, stats, scale, bias, training=True, momentum=0.8, mask=mask, **limits
    )
    chex.assert_trees_all_close(y, y_ref, **EXACT)
    chex.assert_trees_all_close(
        (layer.mean[...], layer.var[...], layer.count[...]), tuple(new), **EXACT
    )
    layer.eval()
    y = _nnx_call(layer, x, None)
    chex.assert_trees_all_close(
        y, _core(batch_renorm, x, new, scale, bias, training=False)[0], **EXACT
    )


def test_nnx_power_norm_is_the_core_including_the_grad_stat():
    x, mask, dy = _normal(10, (2, 4, 3)), _mask(11, (2, 4, 1)), _normal(12, (2, 4, 3))
    layer = vnnx.PowerNorm(3, momentum=0.8, rngs=nnx.Rngs(0))
    _set_state(layer, 2)
    assert isinstance(layer.grad_stat, nnx.BatchStat)
    stats = PowerNormStats(layer.mean_square[...], layer.grad_stat[...], layer.count[...])
    scale, bias = layer.scale[...], layer.bias[...]
    layer.train()

    def loss(model):
        return jnp.sum(model(x, mask=mask) * dy)

    diff = nnx.DiffState(0, nnx.Any(nnx.Param, vnnx.PowerNormGradStat))

    @nnx.jit
    def step(model):
        grads = nnx.grad(loss, argnums=diff)(model)
        vnnx.update_grad_stats(model, grads)
        return grads

    grads = step(layer)

    def core_loss(scale, bias, stats):
        y, new = power_norm(x, stats, scale, bias, training=True, momentum=0.8, mask=mask)
        return jnp.sum(y * dy), new

    @jax.jit
    def core_step(scale, bias, stats):
        (g_scale, g_bias, g_stats), new = jax.grad(
            core_loss, argnums=(0, 1, 2), has_aux=True, allow_int=True
        )(scale, bias, stats)
        return g_scale, g_bias, update_power_norm_grad_stat(new, g_stats)

    g_scale, g_bias, new = core_step(scale, bias, stats)
    chex.assert_trees_all_close(
        (grads["scale"][...], grads["bias"][...]), (g_scale, g_bias), **EXACT
    )
    got = (layer.mean_square[...], layer.grad_stat[...], layer.count[...])
    chex.assert_trees_all_close(got, tuple(new), **EXACT)
    layer.eval()
    chex.assert_trees_all_close(
        _nnx_call(layer, x, None),
        _core(power_norm, x, new, scale, bias, training=False)[0],
        **EXACT,
    )
    with pytest.raises(ValueError, match="grads holds no PowerNormGradStat"):
        vnnx.update_grad_stats(layer, nnx.State({}))


def test_nnx_ghost_batch_norm_is_the_core():
    x, mask = _normal(13, (8, 2, 3), loc=2.0), _mask(14, (8, 2, 3))
    layer = vnnx.GhostBatchNorm(3, 2, momentum=0.8, use_running_average=False, rngs=nnx.Rngs(0))
    _set_state(layer, 3)
    stats = jaxnorm.BatchStats(layer.mean[...], layer.var[...], jnp.int32(0))
    scale, bias = layer.scale[...], layer.bias[...]
    y = _nnx_call(layer, x, mask)
    y_ref, new = _core(
        ghost_batch_norm,
        x,
        stats,
        scale,
        bias,
        virtual_batch_size=2,
        training=True,
        momentum=0.8,
        mask=mask,
    )
    chex.assert_trees_all_close(y, y_ref, **EXACT)
    chex.assert_trees_all_close((layer.mean[...], layer.var[...]), (new.mean, new.var), **EXACT)
    with pytest.raises(ValueError, match="GhostBatchNorm: ghost_batch_norm: virtual_batch_size"):
        layer(x[:7])


def test_nnx_frozen_batch_norm_stays_frozen_in_training_mode():
    x = _normal(15, (5, 3), loc=1.0)
    layer = vnnx.FrozenBatchNorm(3, rngs=nnx.Rngs(0))
    _set_state(layer, 4)
    before = nnx.state(layer, nnx.BatchStat)
    stats = jaxnorm.BatchStats(layer.mean[...], layer.var[...], jnp.int32(0))
    scale, bias = layer.scale[...], layer.bias[...]
    layer.train()  # no use_running_average: nothing to switch

    @nnx.jit
    def grads_of(model):
        return nnx.grad(lambda m: jnp.sum(m(x) ** 2))(model)

    grads = grads_of(layer)
    y_ref_grads = jax.jit(
        jax.grad(
            lambda s, b: jnp.sum(jaxnorm.batch_norm(x, stats, s, b, training=False)[0] ** 2),
            argnums=(0, 1),
        )
    )(scale, bias)
    chex.assert_trees_all_close((grads["scale"][...], grads["bias"][...]), y_ref_grads, **EXACT)
    chex.assert_trees_all_close(
        _nnx_call(layer, x, None), _core(frozen_batch_norm, x, stats, scale, bias)[0], **EXACT
    )
    chex.assert_trees_all_equal(nnx.state(layer, nnx.BatchStat), before)
