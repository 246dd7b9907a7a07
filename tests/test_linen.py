"""jaxnorm.linen against flax.linen: fields, variable trees, numbers, errors.

The reference is flax's own layers. "Variables load both ways" is checked in two
parts: ``init`` of the two libraries gives the same tree (names, shapes, dtypes), and
the two modules applied to the *same* random variables agree to 1e-5 in training and
evaluation on well-conditioned data (mean ~0, std ~1, where flax's single-pass
variance is accurate). Each test runs both libraries inside one jitted program: on a
2-core CI machine compiling once is far cheaper than eager op-by-op dispatch.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Sequence
from typing import Any

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import jaxnorm
import jaxnorm.linen as jnn

TOL = dict(atol=1e-5, rtol=1e-5)  # float32 agreement with flax on N(0, 1) data
BF16_TOL = dict(atol=3e-2, rtol=3e-2)  # a bf16 rounding of O(1) outputs on either side

PAIRS = [
    (jnn.BatchNorm, nn.BatchNorm),
    (jnn.LayerNorm, nn.LayerNorm),
    (jnn.RMSNorm, nn.RMSNorm),
    (jnn.GroupNorm, nn.GroupNorm),
    (jnn.InstanceNorm, nn.InstanceNorm),
]
TRAIN = dict(use_running_average=False, mutable=["batch_stats"])
EVAL = dict(use_running_average=True)


def _normal(seed: int, shape, dtype=jnp.float32) -> jax.Array:
    """N(0, 1) data from NumPy (eager jax.random would compile once per shape)."""
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), dtype)


def _mask(seed: int, shape, p: float = 0.7) -> jax.Array:
    return jnp.asarray(np.random.default_rng(seed).random(shape) < p)


def _random_like(tree, seed: int = 7):
    """Random values for a variable tree (arrays or ShapeDtypeStructs), by leaf name,
    so that a swap of scale/bias or mean/var, or an ignored variable, shows."""
    rng = np.random.default_rng(seed)

    def new(path, leaf):
        noise = rng.standard_normal(leaf.shape)
        value = {
            "scale": 1.0 + 0.2 * noise,
            "var": 1.0 + 0.3 * np.abs(noise),
            "bias": 0.2 * noise,
            "mean": 0.2 * noise,
        }.get(path[-1].key, np.zeros(leaf.shape))
        return jnp.asarray(value, leaf.dtype)

    return jax.tree_util.tree_map_with_path(new, tree)


def _init_shapes(module: nn.Module, x: jax.Array, **kw):
    """The variable tree ``module.init`` would create, as ShapeDtypeStructs (no compile)."""
    return jax.eval_shape(lambda x: module.init(jax.random.key(0), x, **kw), x)


def _same_tree_random_values(ours: nn.Module, theirs: nn.Module, x: jax.Array, **kw):
    """Assert both libraries create the same variable tree; return random values for it."""
    tree = _init_shapes(theirs, x, **kw)
    chex.assert_trees_all_equal_shapes_and_dtypes(tree, _init_shapes(ours, x, **kw))
    return _random_like(tree)


def _run_both(
    ours: nn.Module, theirs: nn.Module, variables, x: jax.Array, calls: Sequence[dict[str, Any]]
):
    """``[[m.apply(variables, x, **kw) for kw in calls] for m in (ours, theirs)]``, one jit."""
    return jax.jit(lambda v, x: [[m.apply(v, x, **kw) for kw in calls] for m in (ours, theirs)])(
        variables, x
    )


# ---------------------------------------------------------------------------- API


@pytest.mark.parametrize("ours, theirs", PAIRS, ids=lambda c: c.__name__)
def test_fields_and_call_signature_match_flax(ours, theirs):
    ours_fields = {f.name: f for f in dataclasses.fields(ours)}
    for f in dataclasses.fields(theirs):
        if f.name in ("parent", "name"):
            continue
        assert f.name in ours_fields, f"{ours.__name__} lacks flax field {f.name}"
        assert ours_fields[f.name].default == f.default, f.name
    assert inspect.signature(ours.__call__).parameters.keys() == (
        inspect.signature(theirs.__call__).parameters.keys()
    )
    # flax's positional field order is kept (extras are appended at the end).
    flax_order = [f.name for f in dataclasses.fields(theirs)]
    assert [f.name for f in dataclasses.fields(ours) if f.name in flax_order] == flax_order


@pytest.mark.parametrize("ours, theirs", PAIRS, ids=lambda c: c.__name__)
def test_variables_from_either_init_load_into_the_other(ours, theirs):
    """Literally both ways: each library's ``init`` output is applied by the other."""
    kw = dict(num_groups=2) if ours is jnn.GroupNorm else {}
    call = dict(use_running_average=True) if ours is jnn.BatchNorm else {}
    ours, theirs = ours(**kw), theirs(**kw)
    x = _normal(23, (4, 3, 6))

    def both_ways(x):
        out = []
        for made_by in (ours, theirs):
            v = made_by.init(jax.random.key(0), x, **call)
            out.append((ours.apply(v, x, **call), theirs.apply(v, x, **call)))
        return out

    for got, want in jax.jit(both_ways)(x):
        chex.assert_trees_all_close(got, want, **TOL)


# --------------------------------------------------------------------- BatchNorm


@pytest.mark.parametrize(
    "shape, axis, masked",
    [
        pytest.param((6, 4, 4, 3), -1, False, id="NHWC-axis-1"),
        pytest.param((6, 4, 4, 3), -1, True, id="NHWC-axis-1-mask"),
        pytest.param((6, 3, 4, 4), 1, False, id="NCHW-axis1"),
        pytest.param((6, 4, 5, 3), (1, 3), True, id="axis(1,3)-mask"),
        pytest.param((16, 5), -1, False, id="NC"),
    ],
)
def test_batch_norm_agrees_with_flax_on_the_same_variables(shape, axis, masked):
    x = _normal(0, shape)
    mask = _mask(1, shape) if masked else None
    ours, theirs = jnn.BatchNorm(axis=axis, momentum=0.9), nn.BatchNorm(axis=axis, momentum=0.9)
    v = _same_tree_random_values(ours, theirs, x, use_running_average=False)
    got, want = _run_both(ours, theirs, v, x, [dict(TRAIN, mask=mask), EVAL])
    chex.assert_trees_all_close(got, want, **TOL)
    (_, updates), y_eval = got
    assert set(updates["batch_stats"]) == {"mean", "var"}
    assert not np.allclose(updates["batch_stats"]["mean"], v["batch_stats"]["mean"])


@pytest.mark.parametrize(
    "x_dtype, dtype, param_dtype",
    [
        (jnp.bfloat16, None, jnp.float32),
        (jnp.bfloat16, jnp.float32, jnp.float32),
        (jnp.float32, jnp.bfloat16, jnp.float32),
        (jnp.float32, None, jnp.bfloat16),
    ],
)
def test_batch_norm_dtypes(x_dtype, dtype, param_dtype):
    x = _normal(4, (8, 2, 2, 3), x_dtype)
    kw = dict(momentum=0.9, dtype=dtype, param_dtype=param_dtype)
    ours, theirs = jnn.BatchNorm(**kw), nn.BatchNorm(**kw)
    v = _same_tree_random_values(ours, theirs, x, use_running_average=False)
    got, want = _run_both(ours, theirs, v, x, [TRAIN, dict(EVAL, mutable=["batch_stats"])])
    for (y, updates), (y_ref, updates_ref) in zip(got, want, strict=True):
        # Ours: dtype, else the input's dtype (flax promotes a bf16 input to f32).
        assert y.dtype == (dtype or x_dtype)
        all_f32 = jnp.float32 == x_dtype == y.dtype == y_ref.dtype
        tol = TOL if all_f32 and param_dtype == jnp.float32 else BF16_TOL
        chex.assert_trees_all_close(y.astype(jnp.float32), y_ref.astype(jnp.float32), **tol)
        chex.assert_trees_all_equal_dtypes(updates, updates_ref)  # batch_stats stay float32
        chex.assert_trees_all_close(updates, updates_ref, **TOL)


@pytest.mark.parametrize("force_float32_reductions", [True, False])
@pytest.mark.parametrize("param_dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
def test_batch_stats_dtypes_follow_flax(param_dtype, force_float32_reductions):
    """flax's rule for the stored statistics (float32, or param_dtype without
    force_float32_reductions): the same tree and dtypes at init and after a training step
    on input of param_dtype, values equal up to that dtype's rounding (jaxnorm computes
    the batch statistics in float32 in every case)."""
    x = _normal(30, (16, 5), param_dtype) * 2 + 1
    kw = dict(param_dtype=param_dtype, force_float32_reductions=force_float32_reductions)
    ours, theirs = jnn.BatchNorm(**kw), nn.BatchNorm(**kw)
    v = _same_tree_random_values(ours, theirs, x, use_running_average=False)
    stored = jnp.float32 if force_float32_reductions else param_dtype
    assert {a.dtype for a in jax.tree.leaves(v["batch_stats"])} == {jnp.dtype(stored)}
    got, want = _run_both(ours, theirs, v, x, [TRAIN, EVAL])
    (_, updates), y_eval = got
    (_, updates_ref), y_eval_ref = want
    chex.assert_trees_all_equal_dtypes(updates, updates_ref)
    tol = TOL if stored == jnp.float32 else BF16_TOL
    chex.assert_trees_all_close(updates, updates_ref, **tol)
    chex.assert_trees_all_close(y_eval.astype(jnp.float32), y_eval_ref.astype(jnp.float32), **tol)


def test_batch_stats_keep_their_stored_dtype_where_flax_promotes_them():
    """bf16 statistics (force_float32_reductions=False) and float32 input: flax's update
    turns batch_stats into float32; jaxnorm keeps the stored bf16 (a deliberate
    difference: a carried state keeps its dtype), with flax's values rounded to bf16."""
    x = _normal(31, (16, 5)) * 2 + 1
    kw = dict(param_dtype=jnp.bfloat16, force_float32_reductions=False)
    ours, theirs = jnn.BatchNorm(**kw), nn.BatchNorm(**kw)
    v = _same_tree_random_values(ours, theirs, x, use_running_average=False)
    ((_, updates),), ((_, updates_ref),) = _run_both(ours, theirs, v, x, [TRAIN])
    assert {a.dtype for a in jax.tree.leaves(updates)} == {jnp.dtype(jnp.bfloat16)}
    assert {a.dtype for a in jax.tree.leaves(updates_ref)} == {jnp.dtype(jnp.float32)}
    want = jax.tree.map(lambda a: a.astype(jnp.bfloat16), updates_ref)
    chex.assert_trees_all_close(updates, want, atol=1e-2, rtol=1e-2)


def test_batch_norm_init_keeps_fresh_statistics_and_takes_one_example():
    kw = dict(use_running_average=False)
    x1, x9 = _normal(5, (1, 7)), _normal(6, (9, 7))  # (1, 7): one value per feature
    init = jax.jit(
        lambda x1, x9: [
            m.init(jax.random.key(0), x, **kw)
            for m in (jnn.BatchNorm(axis_name="data"), nn.BatchNorm(axis_name="data"))
            for x in (x1, x9)
        ]
    )  # no 'data' axis exists at init: flax and jaxnorm ignore axis_name there
    got_1, got_9, want_1, want_9 = init(x1, x9)
    fresh = {
        "params": {"scale": jnp.ones(7), "bias": jnp.zeros(7)},
        "batch_stats": {"mean": jnp.zeros(7), "var": jnp.ones(7)},
    }
    chex.assert_trees_all_equal(got_1, got_9, want_1, want_9, fresh)


@pytest.mark.parametrize(
    "shape, axis", [((1, 7), -1), ((1, 3, 1, 1), 1)], ids=["(1,C)", "(1,C,1,1)-axis1"]
)
def test_batch_norm_one_value_per_feature_in_training_follows_flax(shape, axis):
    """One value per feature in training (one example): variance 0, so y = bias, and the
    running statistics are updated, as flax (torch refuses; jaxnorm only with
    unbiased_running_var). Also init on one example: same output and variables."""
    x = _normal(32, shape) * 3 + 1
    ours, theirs = jnn.BatchNorm(axis=axis, momentum=0.8), nn.BatchNorm(axis=axis, momentum=0.8)
    v = _same_tree_random_values(ours, theirs, x, use_running_average=False)
    got, want = _run_both(ours, theirs, v, x, [TRAIN])
    chex.assert_trees_all_close(got, want, **TOL)
    init = jax.jit(
        lambda x: [
            m.init_with_output(jax.random.key(0), x, use_running_average=False)
            for m in (ours, theirs)
        ]
    )
    chex.assert_trees_all_close(*init(x), **TOL)


def _complex_normal(seed: int, shape) -> jax.Array:
    """Complex N(0, 1) + N(0, 1)i data off a complex offset (so the mean matters)."""
    rng = np.random.default_rng(seed)
    z = rng.standard_normal(shape) + 1j * rng.standard_normal(shape) + (2.0 + 1.0j)
    return jnp.asarray(z, jnp.complex64)


def test_batch_norm_complex_input_agrees_with_flax_and_numpy():
    """Complex x: complex mean, real variance of |x - mean|**2; real params; the updated
    running mean is complex, the variance real, as flax (values and dtypes)."""
    x = _complex_normal(33, (12, 3))
    ours, theirs = jnn.BatchNorm(momentum=0.8), nn.BatchNorm(momentum=0.8)
    v = _same_tree_random_values(ours, theirs, x, use_running_average=False)
    assert {a.dtype for a in jax.tree.leaves(v)} == {jnp.dtype(jnp.float32)}  # real, as flax
    got, want = _run_both(ours, theirs, v, x, [TRAIN])
    ((y, updates),), ((_, updates_ref),) = got, want
    chex.assert_trees_all_equal_dtypes(updates, updates_ref)
    chex.assert_trees_all_close(got, want, **TOL)
    evals = _run_both(ours, theirs, {**v, **updates}, x, [EVAL])
    chex.assert_trees_all_close(*evals, **TOL)
    z = np.asarray(x, np.complex128)
    mu = z.mean(0)
    var = (np.abs(z - mu) ** 2).mean(0)
    scale, bias = (np.asarray(v["params"][k], np.float64) for k in ("scale", "bias"))
    np.testing.assert_allclose(y, (z - mu) / np.sqrt(var + 1e-5) * scale + bias, atol=1e-5)
    np.testing.assert_allclose(updates["batch_stats"]["mean"], 0.2 * mu + 0.8 * np.asarray(
        v["batch_stats"]["mean"], np.float64), atol=1e-6)  # fmt: skip


@pytest.mark.parametrize("ours, theirs", [(jnn.LayerNorm, nn.LayerNorm), (jnn.RMSNorm, nn.RMSNorm)])
def test_layer_and_rms_norm_complex_input_agree_with_flax(ours, theirs):
    x = _complex_normal(34, (4, 3, 6))
    ours, theirs = ours(), theirs()
    v = _same_tree_random_values(ours, theirs, x)
    got, want = _run_both(ours, theirs, v, x, [{}])
    assert got[0].dtype == jnp.complex64
    chex.assert_trees_all_close(got, want, **TOL)


def test_batch_norm_without_scale_and_bias():
    x = _normal(7, (10, 4))
    kw = dict(use_bias=False, use_scale=False)
    ours, theirs = jnn.BatchNorm(**kw), nn.BatchNorm(**kw)
    v = _same_tree_random_values(ours, theirs, x, use_running_average=False)
    assert "params" not in v
    got, want = _run_both(ours, theirs, v, x, [TRAIN, EVAL])
    chex.assert_trees_all_close(got, want, **TOL)


def test_batch_norm_torch_cumulative_average_and_unbiased_var():
    """momentum=None + unbiased_running_var=True is torch's BatchNorm1d(momentum=None)."""
    c = 4
    bn = jnn.BatchNorm(momentum=None, unbiased_running_var=True, epsilon=1e-5)
    ref = torch.nn.BatchNorm1d(c, momentum=None, eps=1e-5).double()
    xs = [np.asarray(_normal(10 + i, (6, c))) * (1 + i) + i for i in range(3)]
    v = jax.jit(lambda x: bn.init(jax.random.key(0), x, use_running_average=False))(xs[0])
    assert v["batch_stats"]["count"].dtype == jnp.int32
    step = jax.jit(lambda v, x: bn.apply(v, x, **TRAIN))
    for x in xs:
        y, updates = step(v, jnp.asarray(x))
        v = {**v, **updates}
        y_ref = ref.train()(torch.from_numpy(x.astype(np.float64))).detach().numpy()
        chex.assert_trees_all_close(y, y_ref.astype(np.float32), **TOL)
    want = {
        "mean": ref.running_mean.numpy().astype(np.float32),
        "var": ref.running_var.numpy().astype(np.float32),
        "count": np.int32(ref.num_batches_tracked),
    }
    chex.assert_trees_all_close(v["batch_stats"], want, **TOL)
    assert int(v["batch_stats"]["count"]) == 3
    y_eval = jax.jit(lambda v, x: bn.apply(v, x, **EVAL))(v, jnp.asarray(xs[0]))
    y_ref = ref.eval()(torch.from_numpy(xs[0].astype(np.float64))).detach().numpy()
    chex.assert_trees_all_close(y_eval, y_ref.astype(np.float32), **TOL)


@pytest.mark.parametrize(
    "kw, has_count",
    [({}, False), ({"track_count": True}, True), ({"momentum": None}, True)],
)
def test_count_exists_only_when_needed(kw, has_count):
    x = _normal(8, (5, 3))
    tree = _init_shapes(jnn.BatchNorm(**kw), x, use_running_average=False)
    assert ("count" in tree["batch_stats"]) == has_count
    if has_count:
        assert tree["batch_stats"]["count"] == jax.ShapeDtypeStruct((), jnp.int32)


def test_track_count_counts_steps_and_keeps_flax_momentum():
    x = _normal(8, (5, 3))
    ours, theirs = jnn.BatchNorm(track_count=True, momentum=0.8), nn.BatchNorm(momentum=0.8)
    v = _random_like(_init_shapes(ours, x, use_running_average=False))

    def two_steps(m, v, x):
        _, upd = m.apply(v, x, **TRAIN)
        _, upd = m.apply({**v, **upd}, 2 * x, **TRAIN)
        return upd["batch_stats"]

    flax_vars = {**v, "batch_stats": {k: v["batch_stats"][k] for k in ("mean", "var")}}
    got, want = jax.jit(lambda v, fv, x: (two_steps(ours, v, x), two_steps(theirs, fv, x)))(
        v, flax_vars, x
    )
    assert int(got.pop("count")) == 2
    chex.assert_trees_all_close(got, want, **TOL)


def test_empty_mask_updates_nothing():
    x = _normal(9, (6, 3))
    bn = jnn.BatchNorm()
    v = _random_like(_init_shapes(bn, x, use_running_average=False))
    y, updates = jax.jit(lambda v, x: bn.apply(v, x, mask=jnp.zeros((6, 1), bool), **TRAIN))(v, x)
    chex.assert_trees_all_equal(updates["batch_stats"], v["batch_stats"])
    chex.assert_tree_all_finite(y)


def test_module_adds_no_math_of_its_own():
    """The linen module equals the core called on the same variables, bit for bit."""
    x = _normal(17, (6, 3, 4))
    bn = jnn.BatchNorm(axis=1, momentum=0.7)
    v = _random_like(_init_shapes(bn, x, use_running_average=False))

    def both(v, x):
        y, updates = bn.apply(v, x, **TRAIN)
        s = v["batch_stats"]
        stats = jaxnorm.BatchStats(s["mean"], s["var"], jnp.zeros((), jnp.int32))
        p = v["params"]
        y_core, s_core = jaxnorm.batch_norm(
            x, stats, p["scale"], p["bias"], training=True, axis=1, momentum=0.7
        )
        return (y, updates["batch_stats"]), (y_core, {"mean": s_core.mean, "var": s_core.var})

    got, want = jax.jit(both)(v, x)
    chex.assert_trees_all_equal(got, want)


# ------------------------------------------------------------------ other layers


@pytest.mark.parametrize(
    "reduction_axes, feature_axes",
    [
        pytest.param(-1, -1, id="red-1_feat-1"),
        pytest.param((-2, -1), -1, id="red(-2,-1)_feat-1"),
        pytest.param((-2, -1), (-2, -1), id="red(-2,-1)_feat(-2,-1)"),
        pytest.param((1, 2, 3), 1, id="red(1,2,3)_feat1"),
    ],
)
@pytest.mark.parametrize("ours, theirs", PAIRS[1:3], ids=["LayerNorm", "RMSNorm"])
def test_layer_and_rms_norm_agree_with_flax(ours, theirs, reduction_axes, feature_axes):
    x = _normal(11, (3, 4, 5, 6))
    mask = _mask(12, x.shape, 0.8)
    kw = dict(reduction_axes=reduction_axes, feature_axes=feature_axes)
    ours, theirs = ours(**kw), theirs(**kw)
    v = _same_tree_random_values(ours, theirs, x)
    got, want = _run_both(ours, theirs, v, x, [{}, dict(mask=mask)])
    chex.assert_trees_all_close(got, want, **TOL)


@pytest.mark.parametrize(
    "kw, shape",
    [
        pytest.param(dict(num_groups=2), (3, 4, 4, 6), id="G2"),
        pytest.param(dict(num_groups=None, group_size=1), (3, 4, 4, 6), id="size1"),
        pytest.param(dict(num_groups=1), (3, 5, 6), id="G1-3d"),
        pytest.param(dict(num_groups=3, reduction_axes=(2, 3)), (3, 4, 4, 6), id="red23"),
    ],
)
def test_group_norm_agrees_with_flax(kw, shape):
    x = _normal(13, shape)
    mask = _mask(14, shape, 0.8)
    ours, theirs = jnn.GroupNorm(**kw), nn.GroupNorm(**kw)
    v = _same_tree_random_values(ours, theirs, x)
    got, want = _run_both(ours, theirs, v, x, [{}, dict(mask=mask)])
    chex.assert_trees_all_close(got, want, **TOL)


@pytest.mark.parametrize("feature_axes", [-1, 1, (-2, -1)])
def test_instance_norm_agrees_with_flax(feature_axes):
    x = _normal(15, (3, 4, 5, 6))
    ours, theirs = (
        jnn.InstanceNorm(feature_axes=feature_axes),
        nn.InstanceNorm(feature_axes=feature_axes),
    )
    v = _same_tree_random_values(ours, theirs, x)
    got, want = _run_both(ours, theirs, v, x, [{}])
    chex.assert_trees_all_close(got, want, **TOL)


@pytest.mark.parametrize("ours, theirs", PAIRS[1:], ids=lambda c: c.__name__)
def test_output_dtype_is_dtype_or_input_dtype(ours, theirs):
    kw = dict(num_groups=2) if ours is jnn.GroupNorm else {}
    x = _normal(16, (2, 3, 4), jnp.bfloat16)
    v = _same_tree_random_values(ours(**kw), theirs(**kw), x)
    y_default, y_f32, y_ref = jax.jit(
        lambda v, x: (
            ours(**kw).apply(v, x),
            ours(dtype=jnp.float32, **kw).apply(v, x),
            theirs(**kw).apply(v, x),
        )
    )(v, x)
    assert y_default.dtype == jnp.bfloat16  # the input's dtype
    assert y_f32.dtype == jnp.float32  # dtype when given
    assert y_ref.dtype == jnp.float32  # flax promotes a bf16 input with f32 params
    chex.assert_trees_all_close(y_default.astype(jnp.float32), y_ref, **BF16_TOL)
    chex.assert_trees_all_close(y_f32, y_ref, **TOL)


# ------------------------------------------------------------------------ errors


class _Net(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool):
        x = nn.Dense(4, name="dense")(x)
        return jnn.BatchNorm(use_running_average=not train, name="bn")(x)


def test_training_with_immutable_batch_stats_names_mutable():
    x = _normal(18, (5, 3))
    v = _random_like(_init_shapes(_Net(), x, train=True))
    with pytest.raises(ValueError, match=r"mutable=\['batch_stats'\]") as info:
        _Net().apply(v, x, train=True)
    assert str(info.value).startswith("jaxnorm.linen.BatchNorm at '/bn': training")


def test_evaluating_without_batch_stats_names_init():
    x = _normal(19, (5, 3))
    v = _random_like(_init_shapes(_Net(), x, train=False))
    with pytest.raises(ValueError, match=r"no 'batch_stats'.*model\.init\(") as info:
        _Net().apply({"params": v["params"]}, x, train=False)
    assert str(info.value).startswith("jaxnorm.linen.BatchNorm at '/bn': evaluation")


def test_variables_of_another_layer_get_the_core_message_with_the_path():
    x = _normal(20, (5, 3))
    v = _random_like(_init_shapes(_Net(), x, train=True))
    other = _random_like(_init_shapes(jnn.BatchNorm(), x[:, :2], use_running_average=False))
    swapped = {
        "params": {**v["params"], "bn": other["params"]},
        "batch_stats": {"bn": other["batch_stats"]},
    }
    for train in (True, False):
        with pytest.raises(ValueError, match=r"init_batch_stats\(\(4,\)\)") as info:
            _Net().apply(swapped, x, train=train, mutable=["batch_stats"])
        assert str(info.value).startswith("jaxnorm.linen.BatchNorm at '/bn': batch_norm:")
    # Only the params misfit: the core names scale.
    swapped = {**v, "params": {**v["params"], "bn": other["params"]}}
    with pytest.raises(ValueError, match=r"at '/bn': batch_norm: scale has shape \(2,\)"):
        _Net().apply(swapped, x, train=False)


def test_layer_norm_params_of_another_width():
    v = _random_like(_init_shapes(jnn.LayerNorm(), _normal(0, (2, 4))))
    with pytest.raises(ValueError, match=r"LayerNorm at '/': layer_norm: scale has shape \(4,\)"):
        jnn.LayerNorm().apply(v, _normal(21, (2, 3, 5)))


@pytest.mark.parametrize(
    "module, x_shape, match",
    [
        (jnn.GroupNorm(group_size=2), (2, 3, 4), r"group_size=2.*pass num_groups=None"),
        (jnn.GroupNorm(num_groups=3), (2, 3, 4), r"num_groups must be a positive int dividing"),
        (jnn.InstanceNorm(), (2, 4), r"InstanceNorm at '/'.*feature_axes=-1"),
        (jnn.BatchNorm(axis=2), (2, 4), r"BatchNorm at '/'.*axis=2.*out of range"),
    ],
)
def test_bad_configuration_errors_name_the_fix(module, x_shape, match):
    with pytest.raises(ValueError, match=match):
        _init_shapes(module, _normal(22, x_shape), **(
            {"use_running_average": True} if isinstance(module, jnn.BatchNorm) else {}
        ))  # fmt: skip
