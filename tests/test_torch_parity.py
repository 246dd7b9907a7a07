"""Parity of the functional core with torch 2.13's normalization layers (to 1e-5).

torch is the outside reference here: its layers are run on the same data, and our
outputs and running statistics must match them, with and without jit.
"""

from __future__ import annotations

import chex
import jax.numpy as jnp
import numpy as np
import torch
from absl.testing import parameterized

import jaxnorm

TOL = dict(atol=1e-5, rtol=1e-5)


def _t(a) -> torch.Tensor:
    return torch.tensor(np.asarray(a, np.float32))


def _n(t: torch.Tensor) -> np.ndarray:
    return t.detach().numpy()


class BatchNormTorchTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.named_parameters(
        ("bn1d_nc", torch.nn.BatchNorm1d, (8, 5), 0.1),
        ("bn1d_ncl", torch.nn.BatchNorm1d, (4, 5, 7), 0.1),
        ("bn2d", torch.nn.BatchNorm2d, (4, 3, 5, 6), 0.1),
        ("bn3d", torch.nn.BatchNorm3d, (2, 3, 4, 3, 5), 0.1),
        ("bn2d_cumulative", torch.nn.BatchNorm2d, (4, 3, 5, 6), None),
        ("bn1d_momentum_03", torch.nn.BatchNorm1d, (6, 4), 0.3),
    )
    def test_train_five_steps_then_eval(self, cls, shape, torch_momentum):
        channels = shape[1]
        rng = np.random.default_rng(0)
        bn = cls(channels, momentum=torch_momentum, eps=1e-5)
        with torch.no_grad():
            bn.weight.copy_(_t(rng.normal(1.0, 0.3, channels)))
            bn.bias.copy_(_t(rng.normal(0.0, 0.3, channels)))
        scale = jnp.asarray(_n(bn.weight))
        bias = jnp.asarray(_n(bn.bias))
        ours_momentum = None if torch_momentum is None else 1.0 - torch_momentum

        def train(x, stats):
            return jaxnorm.batch_norm(
                x,
                stats,
                scale,
                bias,
                training=True,
                axis=1,
                momentum=ours_momentum,
                epsilon=1e-5,
                unbiased_running_var=True,
            )

        def evaluate(x, stats):
            return jaxnorm.batch_norm(x, stats, scale, bias, training=False, axis=1)[0]

        train, evaluate = self.variant(train), self.variant(evaluate)
        stats = jaxnorm.init_batch_stats((channels,))
        bn.train()
        for step in range(5):
            x = rng.normal(2.0 * step, 1.0 + step, shape).astype(np.float32)
            y_ref = _n(bn(_t(x)))
            y, stats = train(jnp.asarray(x), stats)
            np.testing.assert_allclose(np.asarray(y), y_ref, **TOL, err_msg=f"step {step}")
        np.testing.assert_allclose(np.asarray(stats.mean), _n(bn.running_mean), **TOL)
        np.testing.assert_allclose(np.asarray(stats.var), _n(bn.running_var), **TOL)
        self.assertEqual(int(stats.count), int(bn.num_batches_tracked))
        self.assertEqual(int(stats.count), 5)

        bn.eval()
        x = rng.normal(3.0, 2.0, shape).astype(np.float32)
        np.testing.assert_allclose(
            np.asarray(evaluate(jnp.asarray(x), stats)), _n(bn(_t(x))), **TOL
        )


class PerSampleNormTorchTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.named_parameters(("one_axis", (5,)), ("two_axes", (4, 5)))
    def test_layer_norm(self, normalized_shape):
        rng = np.random.default_rng(1)
        x = rng.normal(3.0, 2.0, (3, 4, 5)).astype(np.float32)
        ln = torch.nn.LayerNorm(normalized_shape, eps=1e-5)
        with torch.no_grad():
            ln.weight.copy_(_t(rng.normal(1.0, 0.3, normalized_shape)))
            ln.bias.copy_(_t(rng.normal(0.0, 0.3, normalized_shape)))
        axes = tuple(range(-len(normalized_shape), 0))
        f = self.variant(lambda x, w, b: jaxnorm.layer_norm(x, w, b, axis=axes, epsilon=1e-5))
        y = f(jnp.asarray(x), jnp.asarray(_n(ln.weight)), jnp.asarray(_n(ln.bias)))
        np.testing.assert_allclose(np.asarray(y), _n(ln(_t(x))), **TOL)

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.named_parameters(("one_axis", (6,)), ("two_axes", (3, 6)))
    def test_rms_norm(self, normalized_shape):
        rng = np.random.default_rng(2)
        x = rng.normal(1.0, 2.0, (2, 3, 6)).astype(np.float32)
        rms = torch.nn.RMSNorm(normalized_shape, eps=1e-6)
        with torch.no_grad():
            rms.weight.copy_(_t(rng.normal(1.0, 0.3, normalized_shape)))
        axes = tuple(range(-len(normalized_shape), 0))
        f = self.variant(lambda x, w: jaxnorm.rms_norm(x, w, axis=axes, epsilon=1e-6))
        y = f(jnp.asarray(x), jnp.asarray(_n(rms.weight)))
        np.testing.assert_allclose(np.asarray(y), _n(rms(_t(x))), **TOL)

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.named_parameters(
        ("groups_2", 2, (3, 6, 4, 5)), ("groups_1", 1, (2, 4, 3, 3)), ("groups_c", 4, (2, 4, 7))
    )
    def test_group_norm(self, groups, shape):
        rng = np.random.default_rng(3)
        x = rng.normal(-2.0, 3.0, shape).astype(np.float32)
        gn = torch.nn.GroupNorm(groups, shape[1], eps=1e-5)
        with torch.no_grad():
            gn.weight.copy_(_t(rng.normal(1.0, 0.3, shape[1])))
            gn.bias.copy_(_t(rng.normal(0.0, 0.3, shape[1])))
        f = self.variant(
            lambda x, w, b: jaxnorm.group_norm(x, w, b, num_groups=groups, axis=1, epsilon=1e-5)
        )
        y = f(jnp.asarray(x), jnp.asarray(_n(gn.weight)), jnp.asarray(_n(gn.bias)))
        np.testing.assert_allclose(np.asarray(y), _n(gn(_t(x))), **TOL)

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.named_parameters(("affine", True), ("plain", False))
    def test_instance_norm_2d(self, affine):
        rng = np.random.default_rng(4)
        x = rng.normal(5.0, 2.0, (3, 4, 6, 5)).astype(np.float32)
        inorm = torch.nn.InstanceNorm2d(4, eps=1e-5, affine=affine)
        w = b = None
        if affine:
            with torch.no_grad():
                inorm.weight.copy_(_t(rng.normal(1.0, 0.3, 4)))
                inorm.bias.copy_(_t(rng.normal(0.0, 0.3, 4)))
            w, b = jnp.asarray(_n(inorm.weight)), jnp.asarray(_n(inorm.bias))
        f = self.variant(lambda x: jaxnorm.instance_norm(x, w, b, axis=1, epsilon=1e-5))
        np.testing.assert_allclose(np.asarray(f(jnp.asarray(x))), _n(inorm(_t(x))), **TOL)


# The lesson's 3x3x3 tensor: (batch=3, channels=3, length=3).
LESSON = np.array(
    [
        [[1, 2, 5], [2, 5, 8.5], [3, 3, 3]],
        [[2, 8, 4], [1, 3, 9], [2, 6, 4]],
        [[1, 1, 1], [1, 3, 5], [0.5, 6, 0.2]],
    ],
    np.float32,
)


def test_lesson_tensor_batch_norm_matches_batchnorm1d():
    stats = jaxnorm.init_batch_stats((3,))
    y, _ = jaxnorm.batch_norm(jnp.asarray(LESSON), stats, training=True, axis=1)
    np.testing.assert_allclose(np.asarray(y), _n(torch.nn.BatchNorm1d(3)(_t(LESSON))), **TOL)
    # Each channel (over batch and length) has mean 0 and variance 1 (up to epsilon):
    # the lesson's own check summed instead of averaging.
    y = np.asarray(y, np.float64)
    var = LESSON.astype(np.float64).transpose(1, 0, 2).reshape(3, -1).var(axis=1)
    np.testing.assert_allclose(y.mean(axis=(0, 2)), 0.0, atol=1e-6)
    np.testing.assert_allclose(y.var(axis=(0, 2)), var / (var + 1e-5), rtol=1e-6)


def test_lesson_tensor_layer_norm_matches_layernorm3():
    y = jaxnorm.layer_norm(jnp.asarray(LESSON), axis=-1, epsilon=1e-5)
    np.testing.assert_allclose(np.asarray(y), _n(torch.nn.LayerNorm(3)(_t(LESSON))), **TOL)
    y = np.asarray(y, np.float64)
    np.testing.assert_allclose(y.mean(axis=-1), 0.0, atol=1e-6)
    # The row [3, 3, 3] has variance 0, so it normalizes to 0, not to variance 1.
    var = LESSON.astype(np.float64).var(axis=-1)
    np.testing.assert_allclose(y.var(axis=-1), var / (var + 1e-5), rtol=1e-5, atol=1e-6)
