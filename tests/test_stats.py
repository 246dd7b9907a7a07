"""The moments core: exact merges, masks and invariances (hypothesis property tests)."""

from __future__ import annotations

import hypothesis.extra.numpy as hnp
import jax.numpy as jnp
import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

import jaxnorm

SETTINGS = settings(max_examples=40, deadline=None)


def _rows(draw, shape):
    x = draw(hnp.arrays(np.float32, shape, elements=st.floats(-10, 10, width=32)))
    # Keep every normalized group well-conditioned: add a distinct ramp.
    return x + np.linspace(-3, 3, shape[-1], dtype=np.float32)


@st.composite
def matrices(draw):
    rows = draw(st.integers(2, 6))
    cols = draw(st.integers(3, 12))
    return _rows(draw, (rows, cols))


@SETTINGS
@given(matrices(), st.floats(-1000, 1000), st.floats(0.1, 10))
def test_layer_norm_invariant_to_row_shift_and_positive_scale(x, shift, scale):
    shifts = shift * np.linspace(-1, 1, x.shape[0], dtype=np.float32)[:, None]
    y = jaxnorm.layer_norm(jnp.asarray(x), epsilon=0.0)
    y2 = jaxnorm.layer_norm(jnp.asarray(scale * x + shifts), epsilon=0.0)
    np.testing.assert_allclose(np.asarray(y2), np.asarray(y), atol=2e-3)


@SETTINGS
@given(matrices(), st.floats(-1000, 1000), st.floats(0.1, 10))
def test_batch_norm_invariant_to_feature_shift_and_positive_scale(x, shift, scale):
    x = x.T.copy()  # features on the last axis; add a per-feature ramp over the batch
    x = x + np.linspace(-2, 2, x.shape[0], dtype=np.float32)[:, None]
    shifts = shift * np.linspace(-1, 1, x.shape[1], dtype=np.float32)[None, :]
    stats = jaxnorm.init_batch_stats(x.shape[1])
    y, _ = jaxnorm.batch_norm(jnp.asarray(x), stats, training=True, epsilon=0.0)
    y2, _ = jaxnorm.batch_norm(jnp.asarray(scale * x + shifts), stats, training=True, epsilon=0.0)
    np.testing.assert_allclose(np.asarray(y2), np.asarray(y), atol=2e-3)


@SETTINGS
@given(
    hnp.arrays(np.float32, st.integers(2, 40), elements=st.floats(-100, 100, width=32)),
    st.data(),
)
def test_merge_moments_of_any_split_equals_numpy(x, data):
    cut = data.draw(st.integers(0, x.size))
    a = jaxnorm.moments(jnp.asarray(x[:cut]).reshape(-1, 1), (0,), keepdims=False) if cut else None
    b = (
        jaxnorm.moments(jnp.asarray(x[cut:]).reshape(-1, 1), (0,), keepdims=False)
        if cut < x.size
        else None
    )
    empty = jaxnorm.Moments(jnp.zeros(1), jnp.zeros(1), jnp.zeros(1))
    m = jaxnorm.merge_moments(a or empty, b or empty)
    x64 = x.astype(np.float64)
    assert float(m.count[0]) == x.size
    np.testing.assert_allclose(float(m.mean[0]), x64.mean(), atol=1e-3, rtol=1e-5)
    np.testing.assert_allclose(float(m.var[0]), x64.var(), atol=1e-2, rtol=1e-4)


def test_moments_masked_equals_unmasked_subset():
    rng = np.random.default_rng(0)
    x = rng.normal(5, 2, (7, 4, 3)).astype(np.float32)
    mask = rng.random((7, 4, 1)) < 0.5
    m = jaxnorm.moments(jnp.asarray(x), (0, 1), mask=jnp.asarray(mask), keepdims=False)
    for c in range(3):
        sel = x[..., c][mask[..., 0]].astype(np.float64)
        np.testing.assert_allclose(float(m.count[c]), sel.size)
        np.testing.assert_allclose(float(m.mean[c]), sel.mean(), rtol=1e-6)
        np.testing.assert_allclose(float(m.var[c]), sel.var(), rtol=1e-5)


def test_mean_square_matches_numpy():
    x = np.random.default_rng(1).normal(1, 3, (5, 6)).astype(np.float32)
    count, nu = jaxnorm.mean_square(jnp.asarray(x), (1,))
    np.testing.assert_allclose(np.asarray(nu)[:, 0], (x.astype(np.float64) ** 2).mean(1), rtol=1e-6)
    assert np.all(np.asarray(count) == 6)
