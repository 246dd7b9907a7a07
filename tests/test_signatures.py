"""Variants declared with ``@extends(base)``: their signatures are the base's, checked here.

A variant such as ``jaxnorm.nnx.GhostBatchNorm`` is written ``__init__(self, num_features,
virtual_batch_size, **options: Unpack[BatchNormOptions])``; ``help()`` and the API
reference must still show every keyword with the base's default, a misspelt keyword must
still raise, and the ``TypedDict`` that IDEs read must name exactly those keywords.
"""

from __future__ import annotations

import inspect

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxnorm
import jaxnorm.linen as jnn
import jaxnorm.nnx as jnnx
from jaxnorm._signatures import extends
from jaxnorm.functional.batch import _BatchNormKeywords
from jaxnorm.nnx import residual
from jaxnorm.nnx.batch_norm import BatchNormOptions
from jaxnorm.variants import ghost_batch_norm

KW = inspect.Parameter.KEYWORD_ONLY

# (variant, base, the TypedDict of its **options, the base's keywords it does not take)
CASES = [
    (jnnx.GhostBatchNorm.__init__, jnnx.BatchNorm.__init__, BatchNormOptions, ()),
    (jnnx.ConditionalBatchNorm.__init__, jnnx.BatchNorm.__init__, BatchNormOptions, ()),
    (
        jnnx.AddLayerNorm.__init__,
        jnnx.LayerNorm.__init__,
        residual._AddLayerNormOptions,
        residual._NOT_FUSED,
    ),
    (
        jnnx.AddRMSNorm.__init__,
        jnnx.RMSNorm.__init__,
        residual._AddRMSNormOptions,
        residual._NOT_FUSED,
    ),
    (jaxnorm.conditional_batch_norm, jaxnorm.batch_norm, _BatchNormKeywords, ()),
]
IDS = ["ghost", "conditional", "add_layer", "add_rms", "conditional_fn"]


def _keywords(fn):
    return {n: p for n, p in inspect.signature(fn).parameters.items() if p.kind is KW}


@pytest.mark.parametrize(("variant", "base", "options", "omit"), CASES, ids=IDS)
def test_a_variant_shows_every_keyword_of_its_base_with_the_base_default(
    variant, base, options, omit
):
    shown = _keywords(variant)
    for name, p in _keywords(base).items():
        if name in omit:
            assert name not in shown, name
            continue
        assert name in shown, f"{variant.__qualname__} lost {name}"
        assert shown[name].default is p.default, name
        assert shown[name].annotation == p.annotation, name
    assert all(
        p.kind is not inspect.Parameter.VAR_KEYWORD
        for p in inspect.signature(variant).parameters.values()
    )


@pytest.mark.parametrize(("variant", "base", "options", "omit"), CASES, ids=IDS)
def test_the_typeddict_that_ides_read_names_exactly_the_forwarded_keywords(
    variant, base, options, omit
):
    declared = set(inspect.signature(variant.__wrapped__).parameters)
    forwarded = {n for n in _keywords(base) if n not in omit} - declared
    assert set(options.__required_keys__ | options.__optional_keys__) == forwarded


def test_a_misspelt_or_missing_keyword_raises_as_python_would():
    with pytest.raises(
        TypeError,
        match=r"GhostBatchNorm.__init__\(\): .*'momentom' \(did you mean 'momentum'",
    ):
        jnnx.GhostBatchNorm(3, 2, momentom=0.9, rngs=nnx.Rngs(0))
    with pytest.raises(TypeError, match="missing a required argument: 'rngs'"):
        jnnx.ConditionalBatchNorm(3, 4)
    with pytest.raises(TypeError, match="unexpected keyword.*axis_name"):
        jnnx.AddRMSNorm(3, axis_name="batch", rngs=nnx.Rngs(0))
    with pytest.raises(TypeError, match="conditional_batch_norm.*unexpected keyword.*eps"):
        jaxnorm.conditional_batch_norm(
            jnp.ones((2, 1)),
            jaxnorm.init_batch_stats((1,)),
            jnp.array([0, 1]),
            training=True,
            eps=0.1,
        )


def test_extends_refuses_a_variant_without_options_and_unknown_omissions():
    def base(x, *, a=1):
        return x

    with pytest.raises(TypeError, match="needs a \\*\\*options"):
        extends(base)(lambda x, *, a=1: x)
    with pytest.raises(TypeError, match="not \\['b'\\]"):
        extends(base, omit=("b",))(lambda x, **options: x)


def test_options_reach_the_base_layer():
    """Settings given to a variant are what it stores and uses (not the base's defaults)."""
    bn = jnnx.GhostBatchNorm(3, 2, momentum=0.5, epsilon=0.25, use_bias=False, rngs=nnx.Rngs(0))
    assert (bn.momentum, bn.epsilon, bn.bias) == (0.5, 0.25, None)
    cbn = jnnx.ConditionalBatchNorm(
        3, 4, param_dtype=jnp.bfloat16, use_scale=False, rngs=nnx.Rngs(0)
    )
    assert cbn.scale is None and cbn.bias.shape == (4, 3) and cbn.bias.dtype == jnp.bfloat16
    norm = jnnx.AddRMSNorm(3, scale_offset=1.0, residual_dtype=jnp.float32, rngs=nnx.Rngs(0))
    np.testing.assert_array_equal(norm.scale[...], np.zeros(3))  # 1 + w starts at w = 0
    assert norm.residual_dtype == jnp.float32


@pytest.mark.parametrize("api", ["functional", "linen", "nnx"])
def test_ghost_batch_norm_skip_nonfinite_keeps_the_running_stats_of_a_nonfinite_feature(api):
    """Feature 1 has a NaN: its running statistics stay; feature 0's follow the recurrence."""
    x = np.array([[0.0, 1.0], [2.0, np.nan], [4.0, 2.0], [6.0, 3.0]], np.float32)
    old_mean, old_var, m = np.array([0.5, 0.5]), np.array([2.0, 2.0]), 0.75
    stats = jaxnorm.BatchStats(
        mean=jnp.asarray(old_mean, jnp.float32),
        var=jnp.asarray(old_var, jnp.float32),
        count=jnp.zeros((), jnp.int32),
    )
    if api == "functional":
        _, new = ghost_batch_norm(
            jnp.asarray(x),
            stats,
            virtual_batch_size=2,
            training=True,
            momentum=m,
            skip_nonfinite=True,
        )
        mean, var = np.asarray(new.mean), np.asarray(new.var)
    elif api == "linen":
        layer = jnn.GhostBatchNorm(2, use_running_average=False, momentum=m, skip_nonfinite=True)
        params = layer.init(jax.random.key(0), x)["params"]
        variables = {"params": params, "batch_stats": {"mean": stats.mean, "var": stats.var}}
        _, upd = layer.apply(variables, x, mutable=["batch_stats"])
        mean, var = np.asarray(upd["batch_stats"]["mean"]), np.asarray(upd["batch_stats"]["var"])
    else:
        layer = jnnx.GhostBatchNorm(
            2, 2, use_running_average=False, momentum=m, skip_nonfinite=True, rngs=nnx.Rngs(0)
        )
        layer.mean[...], layer.var[...] = stats.mean, stats.var
        layer(jnp.asarray(x))
        mean, var = np.asarray(layer.mean[...]), np.asarray(layer.var[...])
    col = x[:, 0].astype(np.float64)
    np.testing.assert_allclose(
        mean, [m * old_mean[0] + (1 - m) * col.mean(), old_mean[1]], rtol=1e-6
    )
    np.testing.assert_allclose(var, [m * old_var[0] + (1 - m) * col.var(), old_var[1]], rtol=1e-6)
