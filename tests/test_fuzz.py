"""Property tests: every normalization against a float64 NumPy reference written here.

Hypothesis draws shapes (rank 1-4, a few small shapes so compiled kernels are reused),
axes (ints, tuples, negative), dtypes (float32, bfloat16, float16), boolean masks of
broadcastable shapes (all-False groups included), momentum (including ``None``) and
running statistics, and compares jaxnorm's outputs and updated statistics with the
reference below, which shares no code with jaxnorm.

Tolerances (``atol`` and ``rtol`` alike, on ``|got - want| <= atol + rtol * |want|``):

* outputs: float32 ``1e-4``; float16 ``4e-3`` (outputs are rounded to 11 significant
  bits, 2**-11 ~ 4.9e-4 relative, plus float32 statistics); bfloat16 ``2e-2`` (8
  significant bits, 2**-8 ~ 3.9e-3 relative, so a few roundings of slack);
* running statistics: ``1e-4`` whatever the input dtype, since statistics are
  accumulated in float32 from inputs that are exact in float32.

The reference's conventions are the documented ones: biased variance; masked-out
elements never enter a statistic but are still normalized; an empty group has mean 0
and variance 1 in layer/RMS/group/instance norm (it passes through as
``x / sqrt(1 + eps) * scale + bias``), and batch norm normalizes an empty feature with
its running statistics and leaves them unchanged; the running average is
``momentum * old + (1 - momentum) * batch``, or ``old + (batch - old) / (count + 1)``
for ``momentum=None``.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import jaxnorm

SHAPES = [(6,), (5, 4), (2, 3), (3, 2, 4), (2, 3, 2, 4)]
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
OUT_TOL = {"float32": 1e-4, "float16": 4e-3, "bfloat16": 2e-2}
STATS_TOL = 1e-4
SETTINGS = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True)


# ------------------------------------------------------------------ float64 reference


def ref_moments(x, reduce_axes, mask):
    """(count, mean, var, M2) over ``reduce_axes`` (kept as size 1) of the valid elements.

    An empty group has mean 0 and M2 0 (batch norm's convention; see ``_empty_to_unit``).
    """
    m = np.ones(x.shape, bool) if mask is None else np.broadcast_to(mask, x.shape)
    n = m.sum(axis=reduce_axes, keepdims=True).astype(np.float64)
    mean = np.where(m, x, 0.0).sum(axis=reduce_axes, keepdims=True) / np.maximum(n, 1)
    m2 = np.where(m, (x - mean) ** 2, 0.0).sum(axis=reduce_axes, keepdims=True)
    return n, mean, m2 / np.maximum(n, 1), m2


def ref_batch_norm(x, mean0, var0, count0, scale, bias, *, feature_axes, training, momentum,
                   epsilon, mask, unbiased):  # fmt: skip
    """Returns ``(y, mean, var, count)`` in float64."""
    bshape = tuple(x.shape[a] if a in feature_axes else 1 for a in range(x.ndim))
    rm, rv = mean0.reshape(bshape), var0.reshape(bshape)
    s, b = scale.reshape(bshape), bias.reshape(bshape)
    if not training:
        return (x - rm) / np.sqrt(rv + epsilon) * s + b, mean0, var0, count0
    reduce_axes = tuple(a for a in range(x.ndim) if a not in feature_axes)
    n, mean, var, m2 = ref_moments(x, reduce_axes, mask)
    has = n > 0
    y = (x - np.where(has, mean, rm)) / np.sqrt(np.where(has, var, rv) + epsilon) * s + b
    batch_var = m2 / np.maximum(n - 1, 1) if unbiased else var
    alpha = count0 / (count0 + 1.0) if momentum is None else momentum
    new_mean = np.where(has, alpha * rm + (1 - alpha) * mean, rm).reshape(mean0.shape)
    new_var = np.where(has, alpha * rv + (1 - alpha) * batch_var, rv).reshape(var0.shape)
    return y, new_mean, new_var, count0 + int(has.any())


def _empty_to_unit(n, mean, var):
    """Per-sample norms: a group with no valid element gets mean 0 and variance 1."""
    return np.where(n > 0, mean, 0.0), np.where(n > 0, var, 1.0)


def ref_standardize(x, reduce_axes, feature_axes, scale, bias, *, epsilon, mask, center):
    bshape = tuple(x.shape[a] if a in feature_axes else 1 for a in range(x.ndim))
    if center:
        n, mean, var, _ = ref_moments(x, reduce_axes, mask)
    else:
        m = np.ones(x.shape, bool) if mask is None else np.broadcast_to(mask, x.shape)
        n = m.sum(axis=reduce_axes, keepdims=True)
        var = np.where(m, x**2, 0.0).sum(axis=reduce_axes, keepdims=True) / np.maximum(n, 1)
        mean = np.zeros_like(var)
    mean, var = _empty_to_unit(n, mean, var)
    y = (x - mean) / np.sqrt(var + epsilon) * scale.reshape(bshape)
    return y if bias is None else y + bias.reshape(bshape)


def ref_group_norm(x, scale, bias, *, num_groups, channel, epsilon, mask):
    c = x.shape[channel]
    gshape = x.shape[:channel] + (num_groups, c // num_groups) + x.shape[channel + 1 :]
    xg = x.reshape(gshape)
    mg = None if mask is None else np.broadcast_to(mask, x.shape).reshape(gshape)
    reduce_axes = tuple(a for a in range(1, xg.ndim) if a != channel)
    n, mean, var, _ = ref_moments(xg, reduce_axes, mg)
    mean, var = _empty_to_unit(n, mean, var)
    y = ((xg - mean) / np.sqrt(var + epsilon)).reshape(x.shape)
    bshape = tuple(c if a == channel else 1 for a in range(x.ndim))
    return y * scale.reshape(bshape) + bias.reshape(bshape)


# ------------------------------------------------------------------ jitted calls


@functools.cache
def _jitted(fn_name: str, static: tuple) -> Any:
    fn, kw = getattr(jaxnorm, fn_name), dict(static)
    return jax.jit(lambda *arrays, mask=None: fn(*arrays, mask=mask, **kw))


def _call(fn_name: str, *arrays: Any, mask: Any = None, **static: Any) -> Any:
    """``jaxnorm.<fn_name>`` under jit, one jitted function per static configuration.

    Compiling a whole call once costs far less than eager dispatch compiling each of its
    operations for every new shape, and repeated configurations hit jit's cache.
    """
    return _jitted(fn_name, tuple(sorted(static.items())))(*arrays, mask=mask)


# ------------------------------------------------------------------ strategies


@st.composite
def axes_of(draw, rank: int, *, min_size: int, max_size: int):
    """(canonical tuple, as passed: int or tuple, some negative)."""
    size = draw(st.integers(min_size, max_size))
    canon = tuple(sorted(draw(st.permutations(range(rank)))[:size]))
    passed = tuple(a - rank if draw(st.booleans()) else a for a in canon)
    if len(passed) == 1 and draw(st.booleans()):
        return canon, passed[0]
    return canon, tuple(draw(st.permutations(passed))) if passed else ()


@st.composite
def masks_for(draw, shape, rng):
    """None, or a boolean mask whose shape broadcasts to ``shape`` (maybe lower rank)."""
    if draw(st.booleans()):
        return None
    mshape = tuple(d if draw(st.booleans()) else 1 for d in shape)
    drop = draw(st.integers(0, len(shape) - 1))
    if all(d == 1 for d in mshape[:drop]):
        mshape = mshape[drop:]
    p = draw(st.sampled_from([0.0, 0.3, 0.7, 1.0]))  # 0.0: all False; 0.3: empty groups
    return rng.random(mshape) < p


def _inputs(draw, shape):
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    dtype = draw(st.sampled_from(list(DTYPES)))
    offset = draw(st.sampled_from([0.0, 3.0]))
    x = (rng.standard_normal(shape) * draw(st.sampled_from([0.5, 2.0])) + offset).astype(np.float32)
    x = np.asarray(jnp.asarray(x, DTYPES[dtype]).astype(jnp.float32))  # what jaxnorm sees
    return rng, dtype, x


def _check_out(got, want, dtype):
    assert got.dtype == jnp.dtype(DTYPES[dtype])
    tol = OUT_TOL[dtype]
    np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=tol, atol=tol)


def _params(rng, shape):
    scale = (1.0 + 0.3 * rng.standard_normal(shape)).astype(np.float32)
    bias = (0.3 * rng.standard_normal(shape)).astype(np.float32)
    return scale, bias


# ------------------------------------------------------------------ properties


@settings(max_examples=80, **SETTINGS)
@given(st.data())
def test_batch_norm_matches_reference(data):
    shape = data.draw(st.sampled_from(SHAPES), "shape")
    feature_axes, axis = data.draw(axes_of(len(shape), min_size=0, max_size=len(shape) - 1))
    reduce_n = math.prod(shape[a] for a in range(len(shape)) if a not in feature_axes)
    training = data.draw(st.booleans(), "training")
    rng, dtype, x = _inputs(data.draw, shape)
    mask = data.draw(masks_for(shape, rng), "mask")
    momentum = data.draw(st.sampled_from([None, 0.0, 0.5, 0.9, 1.0]), "momentum")
    # One value per feature under torch's unbiased variance is refused (test_validation.py).
    unbiased = data.draw(st.booleans(), "unbiased") and reduce_n > 1
    epsilon = data.draw(st.sampled_from([1e-5, 1e-3]), "epsilon")
    fshape = tuple(shape[a] for a in feature_axes)
    scale, bias = _params(rng, fshape)
    mean0 = (0.5 * rng.standard_normal(fshape)).astype(np.float32)
    var0 = (0.5 + rng.random(fshape)).astype(np.float32)
    count0 = int(rng.integers(0, 4))
    stats = jaxnorm.BatchStats(
        jnp.asarray(mean0), jnp.asarray(var0), jnp.asarray(count0, jnp.int32)
    )

    y, new = _call("batch_norm",
        jnp.asarray(x, DTYPES[dtype]), stats, jnp.asarray(scale), jnp.asarray(bias),
        training=training, axis=axis, momentum=momentum, epsilon=epsilon,
        mask=None if mask is None else jnp.asarray(mask), unbiased_running_var=unbiased,
    )  # fmt: skip
    y_ref, mean_ref, var_ref, count_ref = ref_batch_norm(
        x.astype(np.float64), mean0.astype(np.float64), var0.astype(np.float64), count0,
        scale.astype(np.float64), bias.astype(np.float64), feature_axes=feature_axes,
        training=training, momentum=momentum, epsilon=epsilon, mask=mask, unbiased=unbiased,
    )  # fmt: skip
    _check_out(y, y_ref, dtype)
    assert new.mean.dtype == jnp.float32 and new.mean.shape == fshape
    np.testing.assert_allclose(new.mean, mean_ref, rtol=STATS_TOL, atol=STATS_TOL)
    np.testing.assert_allclose(new.var, var_ref, rtol=STATS_TOL, atol=STATS_TOL)
    assert int(new.count) == count_ref


@settings(max_examples=40, **SETTINGS)
@given(st.data())
def test_layer_norm_matches_reference(data):
    shape = data.draw(st.sampled_from(SHAPES), "shape")
    reduce_axes, axis = data.draw(axes_of(len(shape), min_size=1, max_size=len(shape)))
    if data.draw(st.booleans(), "separate feature axes"):
        feature_axes, feature_axis = data.draw(axes_of(len(shape), min_size=1, max_size=1))
    else:
        feature_axes, feature_axis = reduce_axes, None
    rng, dtype, x = _inputs(data.draw, shape)
    mask = data.draw(masks_for(shape, rng), "mask")
    scale, bias = _params(rng, tuple(shape[a] for a in feature_axes))
    y = _call("layer_norm",
        jnp.asarray(x, DTYPES[dtype]), jnp.asarray(scale), jnp.asarray(bias), axis=axis,
        feature_axis=feature_axis, epsilon=1e-5, mask=None if mask is None else jnp.asarray(mask),
    )  # fmt: skip
    want = ref_standardize(x.astype(np.float64), reduce_axes, feature_axes, scale, bias,
                           epsilon=1e-5, mask=mask, center=True)  # fmt: skip
    _check_out(y, want, dtype)


@settings(max_examples=30, **SETTINGS)
@given(st.data())
def test_rms_norm_matches_reference(data):
    shape = data.draw(st.sampled_from(SHAPES), "shape")
    reduce_axes, axis = data.draw(axes_of(len(shape), min_size=1, max_size=len(shape)))
    rng, dtype, x = _inputs(data.draw, shape)
    mask = data.draw(masks_for(shape, rng), "mask")
    scale, _ = _params(rng, tuple(shape[a] for a in reduce_axes))
    y = _call("rms_norm",
        jnp.asarray(x, DTYPES[dtype]), jnp.asarray(scale), axis=axis, epsilon=1e-5,
        mask=None if mask is None else jnp.asarray(mask),
    )  # fmt: skip
    want = ref_standardize(x.astype(np.float64), reduce_axes, reduce_axes, scale, None,
                           epsilon=1e-5, mask=mask, center=False)  # fmt: skip
    _check_out(y, want, dtype)


GN_SHAPES = [(2, 4), (3, 6), (2, 3, 4), (2, 2, 3, 4)]


@settings(max_examples=30, **SETTINGS)
@given(st.data())
def test_group_norm_matches_reference(data):
    shape = data.draw(st.sampled_from(GN_SHAPES), "shape")
    channel = data.draw(st.sampled_from([1, len(shape) - 1]), "channel axis")
    c = shape[channel]
    num_groups = data.draw(st.sampled_from([g for g in range(1, c + 1) if c % g == 0]))
    by_size = data.draw(st.booleans(), "by group_size")
    rng, dtype, x = _inputs(data.draw, shape)
    mask = data.draw(masks_for(shape, rng), "mask")
    scale, bias = _params(rng, (c,))
    grouping = {"group_size": c // num_groups} if by_size else {"num_groups": num_groups}
    y = _call("group_norm",
        jnp.asarray(x, DTYPES[dtype]), jnp.asarray(scale), jnp.asarray(bias),
        axis=channel - len(shape) if data.draw(st.booleans()) else channel, epsilon=1e-5,
        mask=None if mask is None else jnp.asarray(mask), **grouping,
    )  # fmt: skip
    want = ref_group_norm(x.astype(np.float64), scale, bias, num_groups=num_groups,
                          channel=channel, epsilon=1e-5, mask=mask)  # fmt: skip
    _check_out(y, want, dtype)


@settings(max_examples=25, **SETTINGS)
@given(st.data())
def test_instance_norm_matches_reference(data):
    shape = data.draw(st.sampled_from([(3, 2, 4), (2, 3, 2, 4)]), "shape")
    channel = data.draw(st.sampled_from([1, len(shape) - 1]), "channel axis")
    rng, dtype, x = _inputs(data.draw, shape)
    mask = data.draw(masks_for(shape, rng), "mask")
    scale, bias = _params(rng, (shape[channel],))
    y = _call("instance_norm",
        jnp.asarray(x, DTYPES[dtype]), jnp.asarray(scale), jnp.asarray(bias),
        axis=channel - len(shape) if data.draw(st.booleans()) else channel, epsilon=1e-5,
        mask=None if mask is None else jnp.asarray(mask),
    )  # fmt: skip
    reduce_axes = tuple(a for a in range(1, len(shape)) if a != channel)
    want = ref_standardize(x.astype(np.float64), reduce_axes, (channel,), scale, bias,
                           epsilon=1e-5, mask=mask, center=True)  # fmt: skip
    _check_out(y, want, dtype)


def test_reference_is_not_vacuous():
    """The float64 reference itself: unit variance, and the masks it is given matter."""
    x = np.random.default_rng(1).standard_normal((5, 4))
    y = ref_standardize(x, (1,), (1,), np.ones(4), np.zeros(4), epsilon=0.0, mask=None,
                        center=True)  # fmt: skip
    np.testing.assert_allclose(y.std(axis=1), 1.0)
    mask = np.array([[True, True, False, False]])
    ym = ref_standardize(x, (1,), (1,), np.ones(4), np.zeros(4), epsilon=0.0, mask=mask,
                         center=True)  # fmt: skip
    np.testing.assert_allclose(ym[:, :2], np.sign(x[:, :2] - x[:, 1::-1]))


@settings(max_examples=40, **SETTINGS)
@given(st.data())
def test_large_means_keep_exact_statistics(data):
    """Mean 1e4 or 1e6, std 1, float32, masks of any shape: the running variance stays
    within 1e-5 of float64, and the output is standardized up to one shared offset, which
    the float32 spacing of the mean bounds (the mean itself is stored in float32)."""
    shape = data.draw(st.sampled_from(SHAPES), "shape")
    feature_axes, axis = data.draw(axes_of(len(shape), min_size=0, max_size=len(shape) - 1))
    offset = data.draw(st.sampled_from([1e4, 1e6]), "offset")
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    x = (rng.standard_normal(shape) + offset).astype(np.float32)
    mask = data.draw(masks_for(shape, rng), "mask")
    fshape = tuple(shape[a] for a in feature_axes)
    stats = jaxnorm.init_batch_stats(fshape)
    y, new = _call("batch_norm",
        jnp.asarray(x), stats, training=True, axis=axis, momentum=0.0, epsilon=1e-5,
        mask=None if mask is None else jnp.asarray(mask),
    )  # fmt: skip
    x64 = x.astype(np.float64)
    y_ref, mean_ref, var_ref, _ = ref_batch_norm(
        x64, np.zeros(fshape), np.ones(fshape), 0, np.ones(fshape), np.zeros(fshape),
        feature_axes=feature_axes, training=True, momentum=0.0, epsilon=1e-5, mask=mask,
        unbiased=False,
    )  # fmt: skip
    reduce_axes = tuple(a for a in range(len(shape)) if a not in feature_axes)
    n, _, _, _ = ref_moments(x64, reduce_axes, mask)
    seen = (n > 1).reshape(fshape) & (var_ref > 0)  # features with a variance to compare
    np.testing.assert_allclose(np.asarray(new.var)[seen], var_ref[seen], rtol=1e-5)
    np.testing.assert_allclose(np.asarray(new.mean), mean_ref, rtol=1e-7, atol=0)
    # The output: standardized, up to the float32 rounding of the mean (half a spacing of
    # the offset) divided by the feature's standard deviation.
    bshape = tuple(shape[a] if a in feature_axes else 1 for a in range(len(shape)))
    bound = np.spacing(np.float32(offset)) / np.sqrt(var_ref + 1e-5).reshape(bshape) + 1e-4
    check = np.broadcast_to(True if mask is None else mask, shape) & np.broadcast_to(
        seen.reshape(bshape), shape
    )
    err = np.abs(np.asarray(y, np.float64) - y_ref)
    assert np.all(err[check] <= np.broadcast_to(bound, shape)[check])
