"""Bad input to the Flax modules gets a clear error naming the argument and the module.

The functional API has its own matrix (tests/test_validation.py); this one covers what
only the modules can get wrong (variables from another layer, eval before init,
immutable batch_stats, NNX mode never set, construction-time group checks) and checks
that the core's errors reach the user through both wrappers with the module's name.
Each case asserts the error type and words of the message, among them the argument.

Also here: NaN/Inf in the input at module level. They always propagate to the output;
by default they reach the running statistics (as torch and flax); with
``skip_nonfinite=True`` the affected feature's running statistics stay unchanged.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxnorm.linen as jnn
import jaxnorm.nnx as jnnx

KEY = jax.random.key(0)
X = jnp.ones((4, 3))
X4 = jnp.ones((2, 3, 3, 4))
LINEN_BN = "jaxnorm.linen.BatchNorm at '/'"


def train_bn(**kw) -> jnn.BatchNorm:
    return jnn.BatchNorm(use_running_average=False, **kw)


def linen_train(module, x, variables=None, **kw):
    variables = module.init(KEY, x) if variables is None else variables
    return module.apply(variables, x, mutable=["batch_stats"], **kw)


def nnx_bn(num_features: int = 3, **kw) -> jnnx.BatchNorm:
    kw.setdefault("use_running_average", False)
    return jnnx.BatchNorm(num_features, rngs=nnx.Rngs(0), **kw)


def _nnx_state_from_another_layer():
    bn = nnx_bn(3)
    nnx.update(bn, nnx.state(nnx_bn(5)))  # e.g. a checkpoint of a wider layer
    return bn(X)


CASES = [
    # (id, call, error type, words the message must contain)
    # ---------------------------------------------------------------- linen BatchNorm
    (
        "linen_bn_axis_out_of_range",
        lambda: train_bn(axis=2).init(KEY, X),
        ValueError,
        [LINEN_BN, "axis=2", "out of range", "rank 2"],
    ),
    (
        "linen_bn_integer_input",
        lambda: train_bn().init(KEY, jnp.ones((4, 3), jnp.int32)),
        TypeError,
        [LINEN_BN, "x must have a floating dtype", "int32"],
    ),
    (
        "linen_bn_negative_epsilon",
        lambda: linen_train(train_bn(epsilon=-1.0), X),
        ValueError,
        [LINEN_BN, "epsilon must be >= 0", "-1.0"],
    ),
    (
        "linen_bn_momentum_above_one",
        lambda: linen_train(train_bn(momentum=1.5), X),
        ValueError,
        [LINEN_BN, "momentum must lie in [0, 1]", "1.5"],
    ),
    (
        "linen_bn_mask_shape",
        lambda: linen_train(train_bn(), X, mask=jnp.ones((3, 3), bool)),
        ValueError,
        [LINEN_BN, "mask has shape (3, 3)", "broadcast"],
    ),
    (
        "linen_bn_mask_dtype",
        lambda: linen_train(train_bn(), X, mask=jnp.ones((4, 3))),
        TypeError,
        [LINEN_BN, "mask must be a boolean array", "float32"],
    ),
    (
        "linen_bn_empty_input",
        lambda: train_bn().init(KEY, jnp.ones((0, 3))),
        ValueError,
        [LINEN_BN, "x has shape (0, 3)", "no elements"],
    ),
    (  # torch's refusal, kept only with torch's unbiased running variance (else flax's y = bias)
        "linen_bn_one_value_per_feature_with_unbiased_running_var",
        lambda: linen_train(
            train_bn(unbiased_running_var=True), jnp.ones((1, 3)), train_bn().init(KEY, X)
        ),
        ValueError,
        [LINEN_BN, "unbiased_running_var=True", "more than one value per feature", "x (1, 3)"],
    ),
    (
        "linen_bn_stats_from_another_layer",
        lambda: linen_train(train_bn(), X, train_bn().init(KEY, jnp.ones((4, 5)))),
        ValueError,
        [LINEN_BN, "stats.mean has shape (5,)", "need (3,)", "stats from another layer"],
    ),
    (
        "linen_bn_scale_shape",
        lambda: linen_train(
            train_bn(),
            X,
            {
                "params": {"scale": jnp.ones(5), "bias": jnp.zeros(3)},
                "batch_stats": train_bn().init(KEY, X)["batch_stats"],
            },
        ),
        ValueError,
        [LINEN_BN, "scale has shape (5,)", "need (3,)"],
    ),
    (
        "linen_bn_integer_stats",
        lambda: linen_train(
            train_bn(),
            X,
            {
                "params": train_bn().init(KEY, X)["params"],
                "batch_stats": {"mean": jnp.zeros(3, jnp.int32), "var": jnp.ones(3)},
            },
        ),
        TypeError,
        [LINEN_BN, "stats.mean must be floating", "int32"],
    ),
    (
        "linen_bn_eval_before_init",
        lambda: jnn.BatchNorm(use_running_average=True).apply(
            {"params": train_bn().init(KEY, X)["params"]}, X
        ),
        ValueError,
        [LINEN_BN, "use_running_average=True", "no 'batch_stats'", "model.init"],
    ),
    (
        "linen_bn_batch_stats_not_mutable",
        lambda: train_bn().apply(train_bn().init(KEY, X), X),
        ValueError,
        [LINEN_BN, "'batch_stats' collection is immutable", "mutable=['batch_stats']"],
    ),
    (
        "linen_bn_mode_given_twice",
        lambda: train_bn().apply(train_bn().init(KEY, X), X, use_running_average=True),
        ValueError,
        ["use_running_average", "passed to the constructor and at call time"],
    ),
    (
        "linen_bn_mode_never_given",
        lambda: jnn.BatchNorm().init(KEY, X),
        ValueError,
        ["use_running_average", "must be passed"],
    ),
    (
        "linen_bn_integer_output_dtype",
        lambda: train_bn(dtype=jnp.int8).init(KEY, X),
        TypeError,
        [LINEN_BN, "dtype must be floating", "int8"],
    ),
    # ---------------------------------------------------------------- other linen modules
    (
        "linen_ln_reduction_axes_out_of_range",
        lambda: jnn.LayerNorm(reduction_axes=3).init(KEY, X),
        ValueError,
        ["jaxnorm.linen.LayerNorm", "axis=3", "out of range"],  # see the report: says "axis"
    ),
    (
        "linen_ln_feature_axes_out_of_range",
        lambda: jnn.LayerNorm(feature_axes=5).init(KEY, X),
        ValueError,
        ["jaxnorm.linen.LayerNorm", "feature_axes=5", "out of range"],
    ),
    (
        "linen_ln_integer_input",
        lambda: jnn.LayerNorm().init(KEY, jnp.ones((4, 3), jnp.int8)),
        TypeError,
        ["jaxnorm.linen.LayerNorm", "x must have a floating dtype", "int8"],
    ),
    (
        "linen_ln_params_from_another_layer",
        lambda: jnn.LayerNorm().apply(jnn.LayerNorm().init(KEY, jnp.ones((4, 5))), X),
        ValueError,
        ["jaxnorm.linen.LayerNorm", "scale has shape (5,)", "need (3,)"],
    ),
    (
        "linen_rms_negative_epsilon",
        lambda: jnn.RMSNorm(epsilon=-1e-6).init(KEY, X),
        ValueError,
        ["jaxnorm.linen.RMSNorm", "epsilon must be >= 0"],
    ),
    (
        "linen_rms_mask_shape",
        lambda: jnn.RMSNorm().init(KEY, X, mask=jnp.ones((5,), bool)),
        ValueError,
        ["jaxnorm.linen.RMSNorm", "mask has shape (5,)"],
    ),
    (
        "linen_gn_groups_not_dividing",
        lambda: jnn.GroupNorm(num_groups=3).init(KEY, X4),
        ValueError,
        ["jaxnorm.linen.GroupNorm", "num_groups must be a positive int dividing the 4", "got 3"],
    ),
    (
        "linen_gn_zero_groups",
        lambda: jnn.GroupNorm(num_groups=0).init(KEY, X4),
        ValueError,
        ["jaxnorm.linen.GroupNorm", "num_groups", "got 0"],
    ),
    (
        "linen_gn_both_groupings",
        lambda: jnn.GroupNorm(num_groups=2, group_size=2).init(KEY, X4),
        ValueError,
        ["jaxnorm.linen.GroupNorm", "exactly one of num_groups and group_size"],
    ),
    (
        "linen_gn_rank_one",
        lambda: jnn.GroupNorm(num_groups=1).init(KEY, jnp.ones((4,))),
        ValueError,
        ["jaxnorm.linen.GroupNorm", "batch-first", "shape (4,)"],
    ),
    (
        "linen_gn_reduction_axes_without_channels",
        lambda: jnn.GroupNorm(num_groups=2, reduction_axes=(1,)).init(KEY, X4),
        ValueError,
        ["jaxnorm.linen.GroupNorm", "reduction_axes=(1,)", "channel axis"],
    ),
    (
        "linen_in_rank_two",
        lambda: jnn.InstanceNorm().init(KEY, X),
        ValueError,
        ["jaxnorm.linen.InstanceNorm", "feature_axes=-1", "x (4, 3)", "reduce"],
    ),
    (
        "linen_in_feature_axes_batch",
        lambda: jnn.InstanceNorm(feature_axes=0).init(KEY, X4),
        ValueError,
        ["jaxnorm.linen.InstanceNorm", "feature_axes=0", "batch axis 0"],
    ),
    (
        "linen_in_mask_shape",
        lambda: jnn.InstanceNorm().init(KEY, X4, mask=jnp.ones((2, 3), bool)),
        ValueError,
        ["jaxnorm.linen.InstanceNorm", "mask has shape (2, 3)"],
    ),
    # ---------------------------------------------------------------- NNX
    (
        "nnx_bn_mode_never_set",
        lambda: jnnx.BatchNorm(3, rngs=nnx.Rngs(0))(X),
        ValueError,
        ["jaxnorm.nnx.BatchNorm", "use_running_average=None", "model.train()", "model.eval()"],
    ),
    (
        "nnx_bn_num_features_mismatch_training",
        lambda: nnx_bn(5)(X),
        ValueError,
        ["jaxnorm.nnx.BatchNorm", "num_features=5", "has 3 features", "num_features=3"],
    ),
    (
        "nnx_bn_num_features_mismatch_eval",
        lambda: nnx_bn(5, use_running_average=True)(X),
        ValueError,
        ["jaxnorm.nnx.BatchNorm", "num_features=5", "has 3 features"],
    ),
    (
        "nnx_bn_state_from_another_layer",
        _nnx_state_from_another_layer,
        ValueError,
        ["jaxnorm.nnx.BatchNorm", "stats.mean has shape (5,)", "stats from another layer"],
    ),
    (
        "nnx_bn_integer_input",
        lambda: nnx_bn()(jnp.ones((4, 3), jnp.int32)),
        TypeError,
        ["jaxnorm.nnx.BatchNorm", "x must have a floating dtype", "int32"],
    ),
    (
        "nnx_bn_negative_momentum",
        lambda: nnx_bn(momentum=-0.5)(X),
        ValueError,
        ["jaxnorm.nnx.BatchNorm", "momentum must lie in [0, 1]", "-0.5"],
    ),
    (
        "nnx_bn_negative_epsilon_in_eval",
        lambda: nnx_bn(epsilon=-1.0, use_running_average=True)(X),
        ValueError,
        ["jaxnorm.nnx.BatchNorm", "epsilon must be >= 0"],
    ),
    (
        "nnx_bn_one_value_per_feature_with_unbiased_running_var",
        lambda: nnx_bn(unbiased_running_var=True)(jnp.ones((1, 3))),
        ValueError,
        ["jaxnorm.nnx.BatchNorm", "unbiased_running_var=True", "more than one value per feature"],
    ),
    (
        "nnx_bn_axis_out_of_range",
        lambda: nnx_bn(axis=-3)(X),
        ValueError,
        ["jaxnorm.nnx.BatchNorm", "axis=-3", "out of range"],
    ),
    (
        "nnx_bn_mask_shape",
        lambda: nnx_bn()(X, mask=jnp.ones((4, 2), bool)),
        ValueError,
        ["jaxnorm.nnx.BatchNorm", "mask has shape (4, 2)"],
    ),
    (
        "nnx_bn_empty_input",
        lambda: nnx_bn()(jnp.ones((0, 3))),
        ValueError,
        ["jaxnorm.nnx.BatchNorm", "x has shape (0, 3)", "no elements"],
    ),
    (
        "nnx_ln_num_features_mismatch",
        lambda: jnnx.LayerNorm(5, rngs=nnx.Rngs(0))(X),
        ValueError,
        ["jaxnorm.nnx.LayerNorm", "num_features=5", "has 3 features"],
    ),
    (
        "nnx_ln_reduction_axes_twice",
        lambda: jnnx.LayerNorm(3, reduction_axes=(0, 0), rngs=nnx.Rngs(0))(X),
        ValueError,
        ["jaxnorm.nnx.LayerNorm", "(0, 0)", "same axis twice"],
    ),
    (
        "nnx_rms_integer_input",
        lambda: jnnx.RMSNorm(3, rngs=nnx.Rngs(0))(jnp.ones((4, 3), jnp.int32)),
        TypeError,
        ["jaxnorm.nnx.RMSNorm", "x must have a floating dtype"],
    ),
    (
        "nnx_gn_groups_not_dividing_at_construction",
        lambda: jnnx.GroupNorm(4, num_groups=3, rngs=nnx.Rngs(0)),
        ValueError,
        ["jaxnorm.nnx.GroupNorm", "num_groups=3", "dividing num_features=4"],
    ),
    (
        "nnx_gn_both_groupings_at_construction",
        lambda: jnnx.GroupNorm(4, num_groups=2, group_size=2, rngs=nnx.Rngs(0)),
        ValueError,
        ["jaxnorm.nnx.GroupNorm", "exactly one of num_groups and group_size"],
    ),
    (
        "nnx_gn_num_features_mismatch",
        lambda: jnnx.GroupNorm(6, num_groups=2, rngs=nnx.Rngs(0))(X4),
        ValueError,
        ["jaxnorm.nnx.GroupNorm", "scale has shape (6,)", "4 channels"],
    ),
    (
        "nnx_in_rank_two",
        lambda: jnnx.InstanceNorm(3, rngs=nnx.Rngs(0))(X),
        ValueError,
        ["jaxnorm.nnx.InstanceNorm", "feature_axes=-1", "reduce"],
    ),
    (
        "nnx_in_negative_epsilon",
        lambda: jnnx.InstanceNorm(4, epsilon=-1, rngs=nnx.Rngs(0))(X4),
        ValueError,
        ["jaxnorm.nnx.InstanceNorm", "epsilon must be >= 0"],
    ),
]


@pytest.mark.parametrize("call, error, words", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_to_a_module_is_refused_with_a_teaching_message(call, error, words):
    with pytest.raises(error) as info:
        call()
    message = str(info.value)
    for word in words:
        assert word in message, f"{word!r} missing from: {message}"


def test_matrix_size():
    assert len(CASES) >= 25
    assert len({c[0] for c in CASES}) == len(CASES)


def test_module_errors_fire_at_trace_time_under_jit():
    bn = train_bn()
    variables = bn.init(KEY, jnp.ones((4, 5)))
    with pytest.raises(ValueError, match="stats.mean has shape"):
        jax.jit(lambda v, x: bn.apply(v, x, mutable=["batch_stats"]))(variables, X)


# ---------------------------------------------------------------- NaN / Inf


def _bad_input() -> jax.Array:
    """Feature 0 holds a NaN, feature 1 an Inf, feature 2 is finite."""
    x = np.random.default_rng(0).standard_normal((6, 3)).astype(np.float32)
    x[2, 0], x[4, 1] = np.nan, np.inf
    return jnp.asarray(x)


def _linen_step(skip_nonfinite: bool | None):
    kw = {} if skip_nonfinite is None else {"skip_nonfinite": skip_nonfinite}
    bn = train_bn(momentum=0.5, **kw)
    x = _bad_input()
    variables = bn.init(KEY, x)
    y, upd = bn.apply(variables, x, mutable=["batch_stats"])
    return y, upd["batch_stats"]["mean"], upd["batch_stats"]["var"]


def _nnx_step(skip_nonfinite: bool | None):
    kw = {} if skip_nonfinite is None else {"skip_nonfinite": skip_nonfinite}
    bn = nnx_bn(3, momentum=0.5, **kw)
    y = bn(_bad_input())
    return y, bn.mean[...], bn.var[...]


STEPS = {"linen": _linen_step, "nnx": _nnx_step}


@pytest.mark.parametrize("api", list(STEPS))
def test_nonfinite_input_propagates_to_output_and_by_default_to_running_stats(api):
    y, mean, var = STEPS[api](None)
    y = np.asarray(y)
    assert np.isnan(y[:, 0]).all() and np.isnan(y[:, 1]).all()  # never hidden
    assert np.isfinite(y[:, 2]).all()  # other features unaffected
    assert np.isnan(mean[0]) and not np.isfinite(mean[1]) and np.isfinite(mean[2])
    assert np.isnan(var[0]) and np.isnan(var[1]) and np.isfinite(var[2])


def _has_skip_nonfinite(api: str) -> bool:
    if api == "linen":
        return "skip_nonfinite" in jnn.BatchNorm.__dataclass_fields__
    import inspect

    return "skip_nonfinite" in inspect.signature(jnnx.BatchNorm.__init__).parameters


@pytest.mark.parametrize("api", list(STEPS))
def test_skip_nonfinite_keeps_the_running_stats_of_nonfinite_features(api):
    if not _has_skip_nonfinite(api):
        pytest.skip(f"jaxnorm.{api}.BatchNorm has no skip_nonfinite (reported as missing)")
    y, mean, var = STEPS[api](True)
    assert np.isnan(np.asarray(y)[:, :2]).all()  # the output still shows the problem
    np.testing.assert_array_equal(mean[:2], [0.0, 0.0])  # untouched: the init values
    np.testing.assert_array_equal(var[:2], [1.0, 1.0])
    x2 = np.asarray(_bad_input())[:, 2]
    np.testing.assert_allclose(mean[2], 0.5 * x2.mean(), rtol=1e-6)
    np.testing.assert_allclose(var[2], 0.5 + 0.5 * x2.var(), rtol=1e-6)
