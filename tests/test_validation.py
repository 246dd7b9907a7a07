"""Bad input gets a clear error at trace time: the rule, what arrived and the fix."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxnorm

X = jnp.ones((4, 3))
STATS = jaxnorm.init_batch_stats((3,))


def bn(**kw):
    args = dict(training=True)
    args.update(kw)
    x = args.pop("x", X)
    stats = args.pop("stats", STATS)
    return jaxnorm.batch_norm(x, stats, **args)


CASES = [
    # (id, call, error type, words the message must contain)
    ("axis_out_of_range", lambda: bn(axis=2), ValueError, ["axis", "out of range", "rank 2"]),
    ("axis_twice", lambda: bn(axis=(1, -1)), ValueError, ["axis", "twice"]),
    ("axis_not_int", lambda: bn(axis="c"), TypeError, ["axis", "int"]),
    (
        "stats_wrong_shape",
        lambda: bn(stats=jaxnorm.init_batch_stats((32,))),
        ValueError,
        ["stats.mean", "(32,)", "(3,)", "init_batch_stats((3,))"],
    ),
    (
        "stats_not_batchstats",
        lambda: bn(stats=(1, 2)),
        TypeError,
        ["BatchStats", "init_batch_stats"],
    ),
    ("scale_wrong_shape", lambda: bn(scale=jnp.ones(4)), ValueError, ["scale", "(4,)", "(3,)"]),
    ("bias_wrong_shape", lambda: bn(bias=jnp.ones((1, 3))), ValueError, ["bias", "(1, 3)"]),
    ("negative_epsilon", lambda: bn(epsilon=-1e-5), ValueError, ["epsilon", ">= 0", "-1e-05"]),
    ("momentum_above_one", lambda: bn(momentum=1.5), ValueError, ["momentum", "[0, 1]", "0.9"]),
    ("momentum_negative", lambda: bn(momentum=-0.1), ValueError, ["momentum", "[0, 1]"]),
    (
        "integer_x",
        lambda: bn(x=jnp.ones((4, 3), jnp.int32)),
        TypeError,
        ["floating", "int32", "astype"],
    ),
    (
        "mask_not_broadcastable",
        lambda: bn(mask=jnp.ones((3, 3), bool)),
        ValueError,
        ["mask", "(3, 3)", "broadcast"],
    ),
    ("mask_not_bool", lambda: bn(mask=jnp.ones((4, 3))), TypeError, ["mask", "boolean", "float32"]),
    (
        "one_value_per_feature",
        lambda: bn(x=jnp.ones((1, 3)), unbiased_running_var=True),
        ValueError,
        ["more than one value per feature", "batch larger than 1", "n/(n-1)"],
    ),
    ("training_missing", lambda: jaxnorm.batch_norm(X, STATS), TypeError, ["training"]),
    ("training_not_bool", lambda: bn(training=None), TypeError, ["training", "bool"]),
    ("empty_x", lambda: bn(x=jnp.ones((0, 3))), ValueError, ["no elements", "(0, 3)"]),
    ("dtype_not_float", lambda: bn(dtype=jnp.int8), TypeError, ["dtype", "floating"]),
    ("ln_axis_out_of_range", lambda: jaxnorm.layer_norm(X, axis=-3), ValueError, ["axis", "-3"]),
    ("ln_scale_shape", lambda: jaxnorm.layer_norm(X, jnp.ones(4)), ValueError, ["scale", "(3,)"]),
    ("ln_integer", lambda: jaxnorm.layer_norm(jnp.ones(3, jnp.int8)), TypeError, ["floating"]),
    ("rms_negative_eps", lambda: jaxnorm.rms_norm(X, epsilon=-1.0), ValueError, ["epsilon"]),
    (
        "gn_both_groupings",
        lambda: jaxnorm.group_norm(X, num_groups=3, group_size=1),
        ValueError,
        ["exactly one of num_groups and group_size"],
    ),
    (
        "gn_not_dividing",
        lambda: jaxnorm.group_norm(X, num_groups=2),
        ValueError,
        ["num_groups", "dividing", "3 channels"],
    ),
    (
        "gn_reduction_without_channel",
        lambda: jaxnorm.group_norm(jnp.ones((2, 4, 3)), num_groups=3, reduction_axes=(1,)),
        ValueError,
        ["reduction_axes", "channel axis"],
    ),
    ("in_rank_too_small", lambda: jaxnorm.instance_norm(X), ValueError, ["instance_norm", "rank"]),
    (
        "init_stats_int_dtype",
        lambda: jaxnorm.init_batch_stats(3, jnp.int32),
        TypeError,
        ["floating"],
    ),
    ("init_stats_bad_shape", lambda: jaxnorm.init_batch_stats("c"), TypeError, ["feature_shape"]),
    ("integer_scale", lambda: bn(scale=jnp.ones(3, jnp.int32)), TypeError, ["scale", "floating"]),
    ("moments_axis_out_of_range", lambda: jaxnorm.moments(X, (2,)), ValueError, ["axes", "rank 2"]),
    (
        "update_stats_momentum",
        lambda: jaxnorm.update_batch_stats(
            STATS, jaxnorm.moments(X, 0, keepdims=False), momentum=1.5
        ),
        ValueError,
        ["momentum"],
    ),
    (
        "merge_mismatched",
        lambda: jaxnorm.merge_moments(jaxnorm.moments(X, 0), jaxnorm.moments(X, 1)),
        ValueError,
        ["merge_moments", "shape"],
    ),
]


@pytest.mark.parametrize("call, error, words", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_refused_with_a_teaching_message(call, error, words):
    with pytest.raises(error) as info:
        call()
    message = str(info.value)
    for word in words:
        assert word in message, f"{word!r} missing from: {message}"


def test_errors_fire_at_trace_time_under_jit():
    with pytest.raises(ValueError, match="init_batch_stats"):
        jax.jit(lambda x, s: jaxnorm.batch_norm(x, s, training=True))(
            X, jaxnorm.init_batch_stats((5,))
        )


def test_one_value_per_feature_allowed_with_axis_name():
    # Under vmap with axis_name the global batch has 4 values per feature.
    out = jax.vmap(
        lambda x: jaxnorm.batch_norm(x, STATS, training=True, axis=0, axis_name="b")[0],
        axis_name="b",
    )(jnp.arange(12.0).reshape(4, 3))
    assert out.shape == (4, 3)


def test_public_moments_accept_negative_and_int_axes():
    x = jnp.arange(12.0).reshape(3, 4)
    m = jaxnorm.moments(x, -1)
    assert m.count.shape == m.mean.shape == m.m2.shape == (3, 1)
    count, nu = jaxnorm.mean_square(x, (-1,))
    assert count.shape == nu.shape == (3, 1)
    np.testing.assert_allclose(np.asarray(nu)[:, 0], (np.arange(12.0).reshape(3, 4) ** 2).mean(1))
    assert jaxnorm.init_batch_stats(np.int64(3)).mean.shape == (3,)
