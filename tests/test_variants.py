"""jaxnorm.variants against independent references.

* batch renorm: ``jaxnorm.batch_norm`` (r_max=1, d_max=0), a hand-built function with r
  and d as constants (the stop-gradient), and a float64 NumPy transcription of the
  paper's Algorithm 1;
* PowerNorm: a float64 NumPy transcription of Algorithm 1, forward, running statistics
  and backward, over several steps;
* ghost batch norm: a Python loop of ``jaxnorm.batch_norm`` over the virtual batches;
* frozen batch norm: ``jaxnorm.batch_norm(..., training=False)``.
"""

from __future__ import annotations

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxnorm
from jaxnorm.variants import (
    PowerNormStats,
    batch_renorm,
    frozen_batch_norm,
    ghost_batch_norm,
    init_power_norm_stats,
    power_norm,
    renorm_schedule,
    update_power_norm_grad_stat,
)

TOL = dict(atol=1e-5, rtol=1e-5)  # float32 against float64 references on O(1) data


# Test data comes from NumPy and every JAX computation runs under jit: eager JAX
# compiles each primitive separately, which dominates the runtime on a 2-core CPU.


def _normal(seed, shape, loc=0.0, std=1.0):
    return jnp.asarray(loc + std * np.random.default_rng(seed).standard_normal(shape), jnp.float32)


def _mask(seed, shape, p=0.7):
    return jnp.asarray(np.random.default_rng(seed).random(shape) < p)


def _stats(seed, c):
    """Running statistics away from the (0, 1) init, so that r and d matter."""
    rng = np.random.default_rng(seed)
    mean = jnp.asarray(0.5 * rng.standard_normal(c), jnp.float32)
    var = jnp.asarray(0.5 + rng.random(c), jnp.float32)
    return jaxnorm.BatchStats(mean, var, jnp.asarray(3, jnp.int32))


def _params(seed, c):
    rng = np.random.default_rng(seed)
    scale = jnp.asarray(1.0 + 0.3 * rng.standard_normal(c), jnp.float32)
    return scale, jnp.asarray(0.3 * rng.standard_normal(c), jnp.float32)


def _run(f, *args, **kw):
    """``f(*args, **kw)`` under jit (keyword arguments are closed over)."""
    return jax.jit(functools.partial(f, **kw))(*args)


def _loss_grads(f, x, scale, bias, dy):
    """y, new_stats and the gradients of sum(y * dy) with respect to x, scale, bias."""

    def loss(x, scale, bias):
        y, new = f(x, scale, bias)
        return jnp.sum(y * dy), (y, new)

    (_, (y, new)), grads = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(x, scale, bias)
    return y, new, grads


# ------------------------------------------------------------------ batch renorm


def np_batch_renorm_step(x, mean, var, gamma, beta, *, r_max, d_max, eps, momentum, mask=None):
    """Ioffe (2017), Algorithm 1, for (N, C) input, in float64; the running *variance*
    is averaged (jaxnorm's documented convention), sigma = sqrt(var + eps)."""
    x = np.asarray(x, np.float64)
    m = np.ones_like(x) if mask is None else np.asarray(mask, np.float64)
    n = m.sum(0)
    mu_b = (m * x).sum(0) / n
    var_b = (m * (x - mu_b) ** 2).sum(0) / n
    sigma_b = np.sqrt(var_b + eps)
    sigma = np.sqrt(var + eps)
    r = np.clip(sigma_b / sigma, 1.0 / r_max, r_max)
    d = np.clip((mu_b - mean) / sigma, -d_max, d_max)
    x_hat = (x - mu_b) / sigma_b * r + d
    y = gamma * x_hat + beta
    new_mean = momentum * mean + (1 - momentum) * mu_b
    new_var = momentum * var + (1 - momentum) * var_b
    return y, new_mean, new_var, r, d


@pytest.mark.parametrize(
    "shape, axis, masked", [((8, 3), -1, False), ((4, 3, 5), 1, True)], ids=["NC", "NCL-axis1-mask"]
)
def test_batch_renorm_with_r1_d0_is_batch_norm(shape, axis, masked):
    x = _normal(0, shape, loc=1.0, std=2.0)
    c = shape[axis]
    stats, (scale, bias) = _stats(1, c), _params(2, c)
    mask = _mask(3, shape) if masked else None
    dy = _normal(4, shape)
    kw = dict(training=True, axis=axis, momentum=0.8, mask=mask)

    got = _loss_grads(
        lambda x, s, b: batch_renorm(x, stats, s, b, r_max=1.0, d_max=0.0, **kw),
        x,
        scale,
        bias,
        dy,
    )
    want = _loss_grads(lambda x, s, b: jaxnorm.batch_norm(x, stats, s, b, **kw), x, scale, bias, dy)
    chex.assert_trees_all_close(got, want, **TOL)
    # The running stats are far from the batch's, so the default limits do change y.
    y_default, _ = _run(batch_renorm, x, stats, scale, bias, **kw)
    assert np.max(np.abs(np.asarray(y_default - want[0]))) > 0.1


def test_batch_renorm_gradients_stop_at_r_and_d():
    x = _normal(5, (6, 4), loc=0.5, std=1.5)
    stats, (scale, bias) = _stats(6, 4), _params(7, 4)
    dy = _normal(8, (6, 4))
    r_max, d_max, eps = 1.5, 0.3, 1e-3

    # r and d computed by hand, in NumPy, then used as constants.
    xn = np.asarray(x, np.float64)
    sigma = np.sqrt(np.asarray(stats.var, np.float64) + eps)
    sigma_b = np.sqrt(xn.var(0) + eps)
    r = np.clip(sigma_b / sigma, 1 / r_max, r_max)
    d = np.clip((xn.mean(0) - np.asarray(stats.mean)) / sigma, -d_max, d_max)
    assert np.any(r == r_max) or np.any(r == 1 / r_max)  # some clipped, some not
    assert np.any((r > 1 / r_max) & (r < r_max))
    assert np.any(np.abs(d) == d_max) and np.any(np.abs(d) < d_max)
    r_c, d_c = jnp.asarray(r, jnp.float32), jnp.asarray(d, jnp.float32)

    def by_hand(x, scale, bias, r, d):
        mu_b = jnp.mean(x, 0)
        sigma_b = jnp.sqrt(jnp.mean((x - mu_b) ** 2, 0) + eps)
        return jnp.sum((((x - mu_b) / sigma_b * r + d) * scale + bias) * dy)

    def ours(x, scale, bias):
        y, _ = batch_renorm(
            x, stats, scale, bias, training=True, r_max=r_max, d_max=d_max, epsilon=eps
        )
        return jnp.sum(y * dy)

    got = jax.jit(jax.grad(ours, argnums=(0, 1, 2)))(x, scale, bias)
    want = jax.jit(jax.grad(by_hand, argnums=(0, 1, 2)))(x, scale, bias, r_c, d_c)
    chex.assert_trees_all_close(got, want, **TOL)

    # Letting gradients through r and d (functions of x) gives different gradients.
    def no_stop(x):
        sigma_b = jnp.sqrt(jnp.var(x, 0) + eps)
        r = jnp.clip(sigma_b / jnp.asarray(sigma, jnp.float32), 1 / r_max, r_max)
        d = jnp.clip((jnp.mean(x, 0) - stats.mean) / jnp.asarray(sigma, jnp.float32), -d_max, d_max)
        return by_hand(x, scale, bias, r, d)

    assert np.max(np.abs(np.asarray(jax.jit(jax.grad(no_stop))(x) - got[0]))) > 1e-2


@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "mask"])
def test_batch_renorm_follows_the_paper_over_steps(masked):
    c, eps, momentum, r_max, d_max = 3, 1e-3, 0.6, 2.0, 1.0
    stats = jaxnorm.init_batch_stats((c,))
    scale, bias = _params(9, c)

    chex.clear_trace_counter()  # the counter is keyed by code, shared by parametrizations

    @jax.jit
    @chex.assert_max_traces(n=1)
    def step(x, stats, scale, bias, mask):
        return batch_renorm(
            x,
            stats,
            scale,
            bias,
            training=True,
            epsilon=eps,
            momentum=momentum,
            r_max=r_max,
            d_max=d_max,
            mask=mask,
        )

    mean, var = np.zeros(c), np.ones(c)
    saw_clip = False
    for t in range(4):
        # Shifting, widening batches: r and d leave their clip ranges at times.
        x = _normal(10 + t, (10, c), loc=1.5 * t, std=0.5 + t)
        mask = _mask(20 + t, (10, c)) if masked else None
        y, stats = step(x, stats, scale, bias, mask)
        y_ref, mean, var, r, d = np_batch_renorm_step(
            x,
            mean,
            var,
            np.asarray(scale, np.float64),
            np.asarray(bias, np.float64),
            r_max=r_max,
            d_max=d_max,
            eps=eps,
            momentum=momentum,
            mask=mask,
        )
        saw_clip |= bool(np.any(r == r_max) or np.any(np.abs(d) == d_max))
        np.testing.assert_allclose(np.asarray(y), y_ref, atol=1e-4, rtol=1e-4)
        np.testing.assert_allclose(np.asarray(stats.mean), mean, atol=1e-5, rtol=1e-5)
        np.testing.assert_allclose(np.asarray(stats.var), var, atol=1e-5, rtol=1e-5)
    assert saw_clip
    assert int(stats.count) == 4
    # Inference: y = (x - mu) / sigma * gamma + beta with the running statistics.
    y, same = _run(batch_renorm, x, stats, scale, bias, training=False, epsilon=eps)
    y_ref = (np.asarray(x) - mean) / np.sqrt(var + eps) * np.asarray(scale) + np.asarray(bias)
    np.testing.assert_allclose(np.asarray(y), y_ref, atol=1e-4, rtol=1e-4)
    chex.assert_trees_all_equal(same, stats)


def test_renorm_schedule_is_the_papers_ramp():
    # r_max: 1 until 5k, 3 from 40k; d_max: 0 until 5k, 5 from 25k; linear between.
    cases = {
        0: (1, 0),
        5000: (1, 0),
        12_500: (1 + 2 * 7.5 / 35, 5 * 7.5 / 20),
        25_000: (
            1 + 2 * 20 / 35,
            5,
        ),
        40_000: (3, 5),
        10**6: (3, 5),
    }
    for s, (r, d) in cases.items():
        got = renorm_schedule(s)
        np.testing.assert_allclose(np.asarray(got), (r, d), rtol=1e-6, err_msg=str(s))
    traced = jax.jit(lambda s: renorm_schedule(s, warmup_steps=2, r_relax_steps=0))
    np.testing.assert_allclose(np.asarray(traced(jnp.int32(2))), (1.0, 0.0))
    np.testing.assert_allclose(np.asarray(traced(jnp.int32(3))), (3.0, 5 / 20_000))


def test_batch_renorm_takes_the_schedule_traced():
    x = _normal(30, (6, 2), loc=2.0)
    stats = _stats(31, 2)

    @jax.jit
    def f(x, stats):
        r_max, d_max = renorm_schedule(stats.count, warmup_steps=10)
        return batch_renorm(x, stats, training=True, r_max=r_max, d_max=d_max)

    chex.assert_trees_all_close(
        f(x, stats), _run(jaxnorm.batch_norm, x, stats, training=True), **TOL
    )


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(r_max=0.5), "r_max must be >= 1"),
        (dict(d_max=-1.0), "d_max must be >= 0"),
        (dict(momentum=10), "percentages"),
    ],
)
def test_batch_renorm_errors(kw, match):
    with pytest.raises(ValueError, match=match):
        batch_renorm(np.ones((4, 2), np.float32), jaxnorm.init_batch_stats(2), training=True, **kw)
    with pytest.raises(TypeError, match="training must be a Python bool"):
        batch_renorm(np.ones((4, 2), np.float32), jaxnorm.init_batch_stats(2), training=None)
    with pytest.raises(ValueError, match="non-negative int"):
        renorm_schedule(0, warmup_steps=-1)


# -------------------------------------------------------------------- power norm


def np_power_norm_step(x, dy, psi2, nu, gamma, beta, *, alpha, eps, mask=None):
    """Shen et al. (2020), Algorithm 1, for (..., C) input, in float64.

    Forward with the running psi_{t-1}, update of psi^2; backward with the running
    gradient statistic nu; mask-restricted batch means (masked elements get no
    -nu*x_hat term)."""
    x = np.asarray(x, np.float64)
    dy = np.asarray(dy, np.float64)
    axes = tuple(range(x.ndim - 1))
    m = np.ones_like(x) if mask is None else np.broadcast_to(mask, x.shape).astype(np.float64)
    n = m.sum(axes)
    psi = np.sqrt(psi2 + eps)
    # Forward.
    psi_b2 = (m * x**2).sum(axes) / n
    x_hat = x / psi
    y = gamma * x_hat + beta
    psi2_new = alpha * psi2 + (1 - alpha) * psi_b2
    # Backward.
    g = gamma * dy  # dL/dx_hat
    x_tilde = g - m * nu * x_hat
    dx = x_tilde / psi
    big_gamma = (m * x_hat * x_hat).sum(axes) / n
    big_lambda = (m * g * x_hat).sum(axes) / n
    nu_new = nu * (1 - (1 - alpha) * big_gamma) + (1 - alpha) * big_lambda
    # jaxnorm's mask convention (functional.mask_safe): masked-out outputs pass no
    # gradient to the parameters; padding is not part of the loss.
    dgamma = (m * dy * x_hat).sum(axes)
    dbeta = (m * dy).sum(axes)
    return y, psi2_new, nu_new, dx, dgamma, dbeta


def _power_norm_train_step(x, dy, stats, scale, bias, *, mask=None, momentum=0.8, eps=1e-3):
    """One training step: forward, grads of sum(y*dy) w.r.t. x/scale/bias/stats, nu update."""

    def loss(x, scale, bias, stats):
        y, new = power_norm(
            x, stats, scale, bias, training=True, momentum=momentum, epsilon=eps, mask=mask
        )
        return jnp.sum(y * dy), (y, new)

    grad_fn = jax.grad(loss, argnums=(0, 1, 2, 3), has_aux=True, allow_int=True)
    grads, (y, new) = grad_fn(x, scale, bias, stats)
    dx, dscale, dbias, dstats = grads
    return y, update_power_norm_grad_stat(new, dstats), dx, dscale, dbias


@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "mask"])
def test_power_norm_follows_algorithm_1_over_steps(masked):
    b, t, c, alpha, eps = 3, 4, 5, 0.8, 1e-3
    stats = init_power_norm_stats(c)
    scale, bias = _params(40, c)

    chex.clear_trace_counter()  # the counter is keyed by code, shared by parametrizations

    @jax.jit
    @chex.assert_max_traces(n=1)
    def step(x, dy, stats, scale, bias, mask):
        return _power_norm_train_step(x, dy, stats, scale, bias, mask=mask, momentum=alpha, eps=eps)

    psi2, nu = np.ones(c), np.zeros(c)
    gamma, beta = np.asarray(scale, np.float64), np.asarray(bias, np.float64)
    for s in range(4):
        x = _normal(41 + s, (b, t, c), loc=0.3 * s, std=1.0 + 0.5 * s)
        dy = _normal(51 + s, (b, t, c), loc=0.2)
        # A per-token padding mask, broadcast over features.
        mask = _mask(61 + s, (b, t, 1)) if masked else None
        y, stats, dx, dscale, dbias = step(x, dy, stats, scale, bias, mask)
        y_ref, psi2, nu, dx_ref, dgamma, dbeta = np_power_norm_step(
            x, dy, psi2, nu, gamma, beta, alpha=alpha, eps=eps, mask=mask
        )
        np.testing.assert_allclose(np.asarray(y), y_ref, **TOL)
        np.testing.assert_allclose(np.asarray(stats.mean_square), psi2, **TOL)
        np.testing.assert_allclose(np.asarray(stats.grad_stat), nu, atol=1e-5, rtol=1e-4)
        np.testing.assert_allclose(np.asarray(dx), dx_ref, atol=1e-5, rtol=1e-4)
        np.testing.assert_allclose(np.asarray(dscale), dgamma, atol=1e-4, rtol=1e-5)
        np.testing.assert_allclose(np.asarray(dbias), dbeta, atol=1e-4, rtol=1e-5)
    assert int(stats.count) == 4
    assert np.all(np.abs(nu) > 1e-3)  # the backward statistic really moved
    # Inference divides by the latest running statistic psi_t.
    y, same = _run(power_norm, x, stats, scale, bias, training=False, epsilon=eps)
    np.testing.assert_allclose(
        np.asarray(y), np.asarray(x) / np.sqrt(psi2 + eps) * gamma + beta, **TOL
    )
    chex.assert_trees_all_equal(same, stats)


def test_power_norm_backward_is_the_approximation_not_autodiff():
    # With nu = 0 the approximate gradient is dL/dx_hat / psi; with nu != 0 it is not
    # the exact gradient of the forward (which ignores the batch statistic).
    x, dy = _normal(70, (6, 3)), _normal(71, (6, 3))
    stats = init_power_norm_stats(3)._replace(
        mean_square=jnp.array([0.5, 2.0, 4.0]), grad_stat=jnp.array([0.3, -0.2, 0.1])
    )
    _, _, dx, _, _ = _run(_power_norm_train_step, x, dy, stats, None, None, eps=0.0)
    exact = np.asarray(dy) / np.sqrt(np.asarray(stats.mean_square))
    correction = -np.asarray(stats.grad_stat) * np.asarray(x) / np.asarray(stats.mean_square)
    np.testing.assert_allclose(np.asarray(dx), exact + correction, **TOL)


def test_power_norm_empty_mask_updates_nothing():
    x = _normal(72, (4, 2))
    stats = init_power_norm_stats(2)._replace(grad_stat=jnp.array([0.1, 0.2]))
    y, new, dx, _, _ = _run(
        _power_norm_train_step,
        x,
        _normal(73, (4, 2)),
        stats,
        None,
        None,
        mask=np.zeros((4, 1), bool),
    )
    chex.assert_trees_all_close(new, stats, atol=0)
    assert np.all(np.isfinite(np.asarray(y))) and np.all(np.isfinite(np.asarray(dx)))


def test_power_norm_across_devices_equals_one_batch():
    """vmap with axis_name over two shards: the same psi, nu and gradients as one batch."""
    x, dy = _normal(74, (2, 3, 4)), _normal(75, (2, 3, 4))
    mask = _mask(76, (2, 3, 1))
    stats = init_power_norm_stats(4)._replace(grad_stat=jnp.full((4,), 0.2))

    def shard(x, dy, mask, stats):
        def loss(x, stats):
            y, new = power_norm(
                x, stats, training=True, axis_name="d", mask=mask, momentum=0.8, epsilon=1e-3
            )
            return jnp.sum(y * dy), new

        (dx, dstats), new = jax.grad(loss, argnums=(0, 1), has_aux=True, allow_int=True)(x, stats)
        return dx, update_power_norm_grad_stat(new, dstats)

    dx, new = jax.jit(jax.vmap(shard, in_axes=(0, 0, 0, None), axis_name="d"))(x, dy, mask, stats)
    _, new_one, dx_one, _, _ = _run(_power_norm_train_step, x, dy, stats, None, None, mask=mask)
    chex.assert_trees_all_close(dx, dx_one, **TOL)
    for device in (0, 1):  # identical on every device, and equal to the one-batch state
        on_device = PowerNormStats(*(np.asarray(field)[device] for field in new))
        chex.assert_trees_all_close(on_device, new_one, **TOL)


def test_power_norm_errors():
    with pytest.raises(TypeError, match="PowerNormStats.*a BatchStats belongs to batch_norm"):
        power_norm(np.ones((4, 2), np.float32), jaxnorm.init_batch_stats(2), training=True)
    with pytest.raises(ValueError, match=r"stats.mean_square has shape \(3,\).*need \(2,\)"):
        power_norm(np.ones((4, 2), np.float32), init_power_norm_stats(3), training=True)
    with pytest.raises(TypeError, match="training must be a Python bool"):
        power_norm(np.ones((4, 2), np.float32), init_power_norm_stats(2), training="yes")
    with pytest.raises(TypeError, match="must be floating"):
        init_power_norm_stats(2, jnp.int32)
    assert isinstance(init_power_norm_stats((2, 3)), PowerNormStats)


# --------------------------------------------------------------------- ghost BN


def _ghost_by_loop(x, stats, scale, bias, v, mask, **kw):
    """The reference: batch_norm on each virtual batch, outputs concatenated."""
    ys = []
    for j in range(x.shape[0] // v):
        sl = slice(j * v, (j + 1) * v)
        m = None if mask is None else jnp.broadcast_to(mask, x.shape)[sl]
        y, _ = jaxnorm.batch_norm(x[sl], stats, scale, bias, training=True, mask=m, **kw)
        ys.append(y)
    return jnp.concatenate(ys)


@pytest.mark.parametrize(
    "shape, axis, v, masked",
    [((8, 3), -1, 2, False), ((6, 2, 3), -1, 3, True), ((4, 3, 2), 1, 2, True)],
)
def test_ghost_batch_norm_is_a_loop_of_batch_norms(shape, axis, v, masked):
    x = _normal(80, shape, loc=1.0, std=2.0)
    c = shape[axis]
    stats, (scale, bias) = _stats(81, c), _params(82, c)
    dy = _normal(83, shape)
    mask = None
    if masked:
        mask = _mask(84, shape)
        # One virtual batch without any valid element for feature 0: running stats.
        empty = np.ones(shape, bool)
        if axis == -1:
            empty[:v, ..., 0] = False
        else:
            empty[:v, 0] = False
        mask = mask & jnp.asarray(empty)
    kw = dict(axis=axis, momentum=0.7)

    got = _loss_grads(
        lambda x, s, b: ghost_batch_norm(
            x, stats, s, b, virtual_batch_size=v, training=True, mask=mask, **kw
        ),
        x,
        scale,
        bias,
        dy,
    )
    want = _loss_grads(
        lambda x, s, b: (_ghost_by_loop(x, stats, s, b, v, mask, **kw), None),
        x,
        scale,
        bias,
        dy,
    )
    chex.assert_trees_all_close(got[0], want[0], **TOL)
    chex.assert_trees_all_close(got[2], want[2], **TOL)
    # Running stats: those batch_norm stores for the whole batch (exact merge).
    y_whole, whole = _run(jaxnorm.batch_norm, x, stats, scale, bias, training=True, mask=mask, **kw)
    chex.assert_trees_all_close(got[1], whole, **TOL)
    # And the virtual batches really differ from one batch.
    assert np.max(np.abs(np.asarray(y_whole - got[0]))) > 1e-2


def test_ghost_batch_norm_edge_cases():
    x = _normal(85, (6, 2))
    stats, (scale, bias) = _stats(86, 2), _params(87, 2)
    # One virtual batch is batch norm; evaluation is batch norm's evaluation.
    for training in (True, False):
        chex.assert_trees_all_close(
            _run(ghost_batch_norm, x, stats, scale, bias, virtual_batch_size=6, training=training),
            _run(jaxnorm.batch_norm, x, stats, scale, bias, training=training),
            **TOL,
        )
    with pytest.raises(ValueError, match=r"dividing the batch size 6.*Valid sizes: \[1, 2, 3, 6\]"):
        ghost_batch_norm(x, stats, virtual_batch_size=4, training=True)
    with pytest.raises(ValueError, match="positive int"):
        ghost_batch_norm(x, stats, virtual_batch_size=0, training=True)
    with pytest.raises(ValueError, match="axis 0 is the batch axis"):
        ghost_batch_norm(
            x, jaxnorm.init_batch_stats(6), virtual_batch_size=2, training=True, axis=0
        )
    # One value per feature in a virtual batch: flax's rule (variance 0, so y = bias),
    # refused only under torch's unbiased running variance, where n/(n-1) is undefined.
    y, _ = ghost_batch_norm(x, stats, scale, bias, virtual_batch_size=1, training=True)
    np.testing.assert_allclose(np.asarray(y), np.broadcast_to(bias, x.shape), atol=1e-6)
    with pytest.raises(ValueError, match="more than one value per feature"):
        ghost_batch_norm(x, stats, virtual_batch_size=1, training=True, unbiased_running_var=True)


def test_ghost_batch_norm_merges_running_stats_across_devices():
    x = _normal(88, (2, 4, 3), loc=1.0)
    stats = _stats(89, 3)
    f = functools.partial(
        ghost_batch_norm, virtual_batch_size=2, training=True, axis_name="d", momentum=0.5
    )
    y, new = jax.jit(jax.vmap(f, in_axes=(0, None), axis_name="d"))(x, stats)
    y_one, new_one = _run(
        ghost_batch_norm, x.reshape(8, 3), stats, virtual_batch_size=2, training=True, momentum=0.5
    )
    chex.assert_trees_all_close(y.reshape(8, 3), y_one, **TOL)
    chex.assert_trees_all_close(jax.tree.map(lambda a: np.asarray(a)[1], new), new_one, **TOL)


# -------------------------------------------------------------------- frozen BN


@pytest.mark.parametrize("shape, axis", [((5, 3), -1), ((4, 3, 2), 1)])
def test_frozen_batch_norm_is_eval_batch_norm_with_gradients(shape, axis):
    x = _normal(90, shape, loc=2.0)
    c = shape[axis]
    stats, (scale, bias) = _stats(91, c), _params(92, c)
    dy = _normal(93, shape)
    got = _loss_grads(
        lambda x, s, b: frozen_batch_norm(x, stats, s, b, axis=axis), x, scale, bias, dy
    )
    want = _loss_grads(
        lambda x, s, b: jaxnorm.batch_norm(x, stats, s, b, training=False, axis=axis),
        x,
        scale,
        bias,
        dy,
    )
    chex.assert_trees_all_close(got, want, atol=0)
    chex.assert_trees_all_equal(got[1], stats)  # unchanged
    assert frozen_batch_norm(x, stats, scale, bias, axis=axis)[1] is stats
    assert all(float(jnp.max(jnp.abs(g))) > 0 for g in got[2])  # gradients do flow
    with pytest.raises(ValueError, match="frozen_batch_norm: stats.mean has shape"):
        frozen_batch_norm(x, jaxnorm.init_batch_stats(c + 1), axis=axis)


# ------------------------------------------------------------------------ dtypes


def test_low_precision_in_low_precision_out_with_f32_statistics():
    x = _normal(95, (4, 3), loc=1.0).astype(jnp.bfloat16)
    bstats, pstats = _stats(96, 3), init_power_norm_stats(3)

    @jax.jit
    def run(x):
        return (
            batch_renorm(x, bstats, training=True),
            ghost_batch_norm(x, bstats, virtual_batch_size=2, training=True),
            power_norm(x, pstats, training=True),
            frozen_batch_norm(x, bstats),
            power_norm(x, pstats, training=True, dtype=jnp.float32)[0],
        )

    *outs, y32 = run(x)
    for y, new in outs:
        assert y.dtype == jnp.bfloat16
        assert all(f.dtype == jnp.float32 for f in new[:2])
    assert y32.dtype == jnp.float32
    # Statistics are those of the bf16 values, computed in f32.
    _, new = outs[0]
    ref = 0.01 * np.asarray(x, np.float32).mean(0) + 0.99 * np.asarray(bstats.mean)
    np.testing.assert_allclose(np.asarray(new.mean), ref, rtol=1e-5, atol=1e-6)


def test_ghost_batch_norm_evaluates_batches_of_any_size():
    stats = jaxnorm.BatchStats(jnp.full(3, 1.0), jnp.full(3, 4.0), jnp.array(2, jnp.int32))
    x = jnp.arange(9.0).reshape(3, 3)  # 3 is not a multiple of the virtual size 2
    y, same = ghost_batch_norm(x, stats, virtual_batch_size=2, training=False)
    np.testing.assert_allclose(
        np.asarray(y), (np.arange(9.0).reshape(3, 3) - 1) / np.sqrt(4 + 1e-5), rtol=1e-6
    )
    assert same is stats
    with pytest.raises(ValueError, match="Valid sizes"):
        ghost_batch_norm(x, stats, virtual_batch_size=2, training=True)
