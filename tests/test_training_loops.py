"""End-to-end training with jaxnorm's Flax modules: linen + TrainState, NNX + nnx.Optimizer.

The task is learnable and made up: 8x8 one-channel images of noise with one bright
quadrant; the label is the quadrant. A small CNN (Conv -> BatchNorm -> relu -> pool ->
Dense) must bring the loss down clearly in 20 steps, change its running statistics,
and classify held-out images in evaluation mode (running statistics) well above
chance. The model and step code here is the code of the README section
``docs_snippets/modules.md``.
"""

from __future__ import annotations

from typing import Any

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from flax.training import train_state

import jaxnorm.linen as jnn
import jaxnorm.nnx as jnnx

STEPS = 20
BATCH = 32


def _quadrant_data(seed: int, n: int) -> tuple[jax.Array, jax.Array]:
    """``n`` images (n, 8, 8, 1): N(0, 1) noise plus 2.0 on the quadrant named by the label."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 4, n)
    images = rng.standard_normal((n, 8, 8, 1)).astype(np.float32)
    for i, k in enumerate(labels):
        r, c = divmod(int(k), 2)
        images[i, 4 * r : 4 * r + 4, 4 * c : 4 * c + 4] += 2.0
    return jnp.asarray(images), jnp.asarray(labels)


def _batches(seed: int):
    x, y = _quadrant_data(seed, STEPS * BATCH)
    return [(x[i * BATCH : (i + 1) * BATCH], y[i * BATCH : (i + 1) * BATCH]) for i in range(STEPS)]


def _clearly_down(losses: list[float]) -> None:
    first, last = losses[0], float(np.mean(losses[-3:]))
    assert last < 0.5 * first, f"loss did not go down clearly: {first:.3f} -> {last:.3f}"


# ------------------------------------------------------------------- linen


class CNN(nn.Module):
    """Conv -> jaxnorm BatchNorm -> relu -> pool -> Dense."""

    num_classes: int = 4

    @nn.compact
    def __call__(self, x, train: bool):
        x = nn.Conv(8, (3, 3))(x)
        x = jnn.BatchNorm(use_running_average=not train, momentum=0.9)(x)
        x = nn.relu(x)
        x = nn.avg_pool(x, (2, 2), strides=(2, 2))
        x = x.reshape((x.shape[0], -1))
        return nn.Dense(self.num_classes)(x)


class TrainState(train_state.TrainState):
    batch_stats: Any


def create_state(rng, x) -> TrainState:
    model = CNN()
    variables = jax.jit(model.init, static_argnames="train")(rng, x, train=False)
    return TrainState.create(
        apply_fn=model.apply,
        params=variables["params"],
        batch_stats=variables["batch_stats"],
        tx=optax.adam(1e-2),
    )


def train_step(state: TrainState, x, y):
    def loss_fn(params):
        logits, updates = state.apply_fn(
            {"params": params, "batch_stats": state.batch_stats},
            x,
            train=True,
            mutable=["batch_stats"],
        )
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
        return loss, updates

    (loss, updates), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    state = state.apply_gradients(grads=grads)
    state = state.replace(batch_stats=updates["batch_stats"])
    return state, loss


def eval_step(state: TrainState, x):
    variables = {"params": state.params, "batch_stats": state.batch_stats}
    return state.apply_fn(variables, x, train=False)


def test_linen_cnn_trains_with_train_state():
    batches = _batches(0)
    state = create_state(jax.random.key(0), batches[0][0])
    initial_stats = state.batch_stats
    step = jax.jit(chex.assert_max_traces(train_step, n=1))  # one trace for all 20 steps
    losses = []
    for x, y in batches:
        state, loss = step(state, x, y)
        losses.append(float(loss))
    _clearly_down(losses)
    assert int(state.step) == STEPS
    moved = jax.tree.map(
        lambda a, b: float(jnp.max(jnp.abs(a - b))), state.batch_stats, initial_stats
    )
    assert all(m > 1e-2 for m in jax.tree.leaves(moved)), moved

    x_test, y_test = _quadrant_data(1, 128)
    logits = jax.jit(eval_step)(state, x_test)
    accuracy = float(jnp.mean(jnp.argmax(logits, -1) == y_test))
    assert accuracy > 0.8, accuracy  # chance is 0.25
    # Evaluation uses the running statistics: a single example gives the same logits.
    one = jax.jit(eval_step)(state, x_test[:1])
    chex.assert_trees_all_close(one, logits[:1], atol=1e-5)


# --------------------------------------------------------------------- NNX


class NNXCNN(nnx.Module):
    """Conv -> jaxnorm BatchNorm -> relu -> pool -> Linear."""

    def __init__(self, num_classes: int = 4, *, rngs: nnx.Rngs):
        self.conv = nnx.Conv(1, 8, (3, 3), rngs=rngs)
        self.bn = jnnx.BatchNorm(8, momentum=0.9, rngs=rngs)
        self.linear = nnx.Linear(4 * 4 * 8, num_classes, rngs=rngs)

    def __call__(self, x):
        x = nnx.relu(self.bn(self.conv(x)))
        x = nnx.avg_pool(x, (2, 2), strides=(2, 2))
        return self.linear(x.reshape((x.shape[0], -1)))


@nnx.jit
def nnx_train_step(model: NNXCNN, optimizer: nnx.Optimizer, x, y):
    def loss_fn(model):
        logits = model(x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    loss, grads = nnx.value_and_grad(loss_fn)(model)  # grads of the nnx.Param only
    optimizer.update(model, grads)  # batch statistics were updated in place by the call
    return loss


@nnx.jit
def nnx_eval_step(model: NNXCNN, x):
    return model(x)


def test_nnx_cnn_trains_with_nnx_optimizer():
    model = NNXCNN(rngs=nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)
    initial_stats = nnx.clone(nnx.state(model, nnx.BatchStat))
    model.train()  # jaxnorm.nnx.BatchNorm has no default mode: set it
    losses = [float(nnx_train_step(model, optimizer, x, y)) for x, y in _batches(0)]
    _clearly_down(losses)
    assert int(optimizer.step[...]) == STEPS
    moved = jax.tree.map(
        lambda a, b: float(jnp.max(jnp.abs(a - b))),
        nnx.state(model, nnx.BatchStat),
        initial_stats,
    )
    assert all(m > 1e-2 for m in jax.tree.leaves(moved)), moved

    model.eval()
    trained_stats = nnx.clone(nnx.state(model, nnx.BatchStat))
    x_test, y_test = _quadrant_data(1, 128)
    logits = nnx_eval_step(model, x_test)
    accuracy = float(jnp.mean(jnp.argmax(logits, -1) == y_test))
    assert accuracy > 0.8, accuracy  # chance is 0.25
    chex.assert_trees_all_equal(nnx.state(model, nnx.BatchStat), trained_stats)
    chex.assert_trees_all_close(nnx_eval_step(model, x_test[:1]), logits[:1], atol=1e-5)
