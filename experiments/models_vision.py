"""Models and training programs of the vision experiments (init_sweep, lr_sweep, overfit,
cnn_norms, small_batch), with the device arrays they train on.

Three model families, all with their normalization from jaxnorm:

* A functional MLP (``init_mlp``/``mlp_forward``) whose optional batch normalization is
  :func:`jaxnorm.batch_norm` with explicit running statistics, trained by plain SGD in
  ``train_mlp`` — one pure function of its hyperparameters, so a sweep over init scales,
  learning rates or seeds is ``jax.vmap`` of it inside one ``jax.jit``.
* A small conv net (``SmallCNN``) built from the Flax linen modules of :mod:`jaxnorm.linen`
  (``BatchNorm``, ``LayerNorm``, ``GroupNorm``, ``RMSNorm`` or none), trained with Adam by
  ``make_cnn_program`` with the seeds vmapped.
* An MLP (``NormMLP``) whose norm is :class:`jaxnorm.linen.BatchNorm` or one of the batch-norm
  variants of :mod:`jaxnorm.variants_linen` (``BatchRenorm``, ``GhostBatchNorm``).

Shapes: images are ``float32`` of shape ``(n, 28, 28)`` (standardized pixels), labels
``int32`` of shape ``(n,)``. A minibatch order is an ``int32`` array of shape
``(blocks, epochs_per_block, steps_per_epoch, batch)`` of training-example indices.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import jaxnorm
import jaxnorm.linen as jnn
import jaxnorm.variants_linen as vnn
from experiments.data_images import ImageData, normalize_images
from experiments.training import epoch_batches

# ---------------------------------------------------------------------------------------------
# Data on the device
# ---------------------------------------------------------------------------------------------


class ArrayData(NamedTuple):
    """Standardized images flattened or not, with labels, as device arrays."""

    x_train: jax.Array  # shape=(n_train, ...), float32
    y_train: jax.Array  # shape=(n_train,), int32
    x_test: jax.Array  # shape=(n_test, ...), float32
    y_test: jax.Array  # shape=(n_test,), int32


def minibatch_order(
    seed: int, n_train: int, *, epochs: int, batch_size: int, epochs_per_block: int = 1
) -> np.ndarray:
    """Shuffled minibatch indices, a fresh permutation per epoch (the last partial batch dropped).

    Args:
        seed: Seed of the NumPy generator.
        n_train: Number of training examples.
        epochs: Total number of epochs; must be a multiple of ``epochs_per_block``.
        batch_size: Examples per step.
        epochs_per_block: Epochs between two evaluations.

    Returns:
        ``int32`` of shape ``(epochs // epochs_per_block, epochs_per_block, steps, batch_size)``
        with ``steps = n_train // batch_size``.

    Raises:
        ValueError: If the epochs do not split into blocks or a batch is larger than the data.
    """
    if epochs % epochs_per_block:
        raise ValueError(
            f"minibatch_order: epochs={epochs} is not a multiple of "
            f"epochs_per_block={epochs_per_block}"
        )
    steps = n_train // batch_size
    if steps < 1:
        raise ValueError(f"minibatch_order: batch_size={batch_size} > n_train={n_train}")
    order = epoch_batches(seed, n_train, steps=epochs * steps, batch=batch_size)
    return order.reshape(epochs // epochs_per_block, epochs_per_block, steps, batch_size)


def flat_arrays(images: ImageData, *, mean: float, std: float) -> ArrayData:
    """Standardized, flattened ``(n, height * width)`` device arrays of a split."""

    def flat(x: np.ndarray) -> jax.Array:
        return jnp.asarray(normalize_images(x, mean=mean, std=std).reshape(len(x), -1))

    return ArrayData(
        flat(images.x_train),
        jnp.asarray(images.y_train),
        flat(images.x_test),
        jnp.asarray(images.y_test),
    )


def image_arrays(images: ImageData, *, mean: float, std: float) -> ArrayData:
    """Standardized ``(n, height, width, 1)`` device arrays of a split."""

    def img(x: np.ndarray) -> jax.Array:
        return jnp.asarray(normalize_images(x, mean=mean, std=std)[..., None])

    return ArrayData(
        img(images.x_train),
        jnp.asarray(images.y_train),
        img(images.x_test),
        jnp.asarray(images.y_test),
    )


# ---------------------------------------------------------------------------------------------
# Functional MLP with jaxnorm.batch_norm
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MLPSpec:
    """Static structure of the MLP (hashable: a ``jax.jit`` static argument)."""

    depth: int = 5  # number of hidden layers
    hidden: int = 100  # units per hidden layer
    use_bn: bool = False  # jaxnorm.batch_norm after each hidden affine layer, before ReLU
    dropout: float = 0.0  # dropout rate after each hidden ReLU (training only)
    bn_momentum: float = 0.9  # weight of the old running statistic (torch's 0.1)
    num_classes: int = 10  # output units


MLPParams = dict[str, list[dict[str, jax.Array]]]  # {"dense": [{w, b}], "bn": [{scale, bias}]}


def init_mlp(
    key: jax.Array, in_dim: int, spec: MLPSpec, init_std: jax.Array | float | None
) -> tuple[MLPParams, list[jaxnorm.BatchStats]]:
    """Gaussian weights, zero biases, unit BN scales; fresh running statistics.

    Args:
        key: PRNG key; the same key gives the same standard-normal draws at every ``init_std``,
            so an init-scale sweep changes only the scale.
        in_dim: Input features (784 for MNIST).
        spec: The model structure.
        init_std: Standard deviation of every weight (may be a traced scalar, e.g. under
            ``vmap``), or ``None`` for He initialization ``sqrt(2 / fan_in)`` per layer.

    Returns:
        ``(params, stats)``: ``params["dense"]`` holds ``depth + 1`` layers ``{w, b}``,
        ``params["bn"]`` holds ``depth`` layers ``{scale, bias}`` (empty without BN), and
        ``stats`` one ``BatchStats`` of shape ``(hidden,)`` per hidden layer (empty without BN).
    """
    sizes = [in_dim] + [spec.hidden] * spec.depth + [spec.num_classes]
    keys = jax.random.split(key, len(sizes) - 1)
    dense = []
    for k, fan_in, fan_out in zip(keys, sizes[:-1], sizes[1:], strict=True):
        std = jnp.sqrt(2.0 / fan_in) if init_std is None else init_std
        w = std * jax.random.normal(k, (fan_in, fan_out), jnp.float32)
        dense.append({"w": w, "b": jnp.zeros((fan_out,), jnp.float32)})
    bn, stats = [], []
    if spec.use_bn:
        for _ in range(spec.depth):
            bn.append(
                {"scale": jnp.ones((spec.hidden,), jnp.float32), "bias": jnp.zeros((spec.hidden,))}
            )
            stats.append(jaxnorm.init_batch_stats((spec.hidden,)))
    return {"dense": dense, "bn": bn}, stats


def mlp_forward(
    params: MLPParams,
    stats: list[jaxnorm.BatchStats],
    x: jax.Array,
    spec: MLPSpec,
    *,
    training: bool,
    dropout_key: jax.Array | None = None,
) -> tuple[jax.Array, list[jaxnorm.BatchStats]]:
    """Logits of the MLP: ``[affine -> (batch_norm) -> ReLU -> (dropout)] x depth -> affine``.

    Args:
        params: From `init_mlp`.
        stats: Running statistics, one per hidden layer (empty without BN).
        x: Inputs of shape ``(n, in_dim)``.
        spec: The model structure.
        training: Batch statistics (and dropout) if True, running statistics otherwise.
        dropout_key: PRNG key for dropout; required when training with ``spec.dropout > 0``.

    Returns:
        ``(logits, new_stats)``: logits of shape ``(n, num_classes)``; ``new_stats`` equals
        ``stats`` when not training.
    """
    h = x
    new_stats = []
    for i in range(spec.depth):
        h = h @ params["dense"][i]["w"] + params["dense"][i]["b"]
        if spec.use_bn:
            bn = params["bn"][i]
            h, s = jaxnorm.batch_norm(
                h, stats[i], bn["scale"], bn["bias"], training=training, momentum=spec.bn_momentum
            )
            new_stats.append(s)
        h = jax.nn.relu(h)
        if training and spec.dropout > 0:
            keep = jax.random.bernoulli(
                jax.random.fold_in(dropout_key, i), 1 - spec.dropout, h.shape
            )
            h = jnp.where(keep, h / (1 - spec.dropout), 0.0)
    logits = h @ params["dense"][-1]["w"] + params["dense"][-1]["b"]
    return logits, new_stats


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Mean softmax cross-entropy of integer labels."""
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def _evaluate_mlp(
    params: MLPParams,
    stats: list[jaxnorm.BatchStats],
    x: jax.Array,
    y: jax.Array,
    spec: MLPSpec,
) -> tuple[jax.Array, jax.Array]:
    """Inference-mode ``(loss, accuracy)`` of the MLP on ``(x, y)``."""
    logits, _ = mlp_forward(params, stats, x, spec, training=False)
    return cross_entropy(logits, y), (logits.argmax(-1) == y).mean()


def scale_weights(params: MLPParams, std: jax.Array | float) -> MLPParams:
    """``params`` with every dense weight multiplied by ``std`` (biases and BN untouched).

    With weights drawn at ``init_std=1.0`` this gives the initialization at ``init_std=std``
    from the same normal draws.
    """
    dense = [{"w": layer["w"] * std, "b": layer["b"]} for layer in params["dense"]]
    return {"dense": dense, "bn": params["bn"]}


def train_mlp(
    data: ArrayData,
    order: jax.Array,
    params: MLPParams,
    stats: list[jaxnorm.BatchStats],
    lr: jax.Array | float,
    dropout_key: jax.Array,
    *,
    spec: MLPSpec,
) -> dict[str, jax.Array]:
    """Trains one MLP with plain SGD; pure in its arguments, so it vmaps over any of them.

    After each block of epochs the model is evaluated in inference mode (running statistics,
    no dropout) on the whole training set and on the test set. The initialization is an
    argument (made outside, e.g. eagerly by `init_mlp`), which keeps the PRNG out of the
    compiled program except for dropout.

    Args:
        data: Flattened standardized images and labels.
        order: Minibatch indices from `minibatch_order`,
            shape ``(blocks, epochs_per_block, steps, batch)``.
        params: Initial parameters from `init_mlp` (with BN entries iff ``spec.use_bn``).
        stats: Initial running statistics from `init_mlp`.
        lr: Learning rate.
        dropout_key: PRNG key of the dropout masks (unused without dropout).
        spec: The model structure (static).

    Returns:
        A dict of arrays: ``train_loss`` (blocks * epochs_per_block,), the mean minibatch loss of
        each epoch (training mode); ``train_acc``, ``train_eval_loss``, ``eval_acc``,
        ``eval_loss`` (blocks,), inference-mode metrics after each block; ``diverged`` (),
        True if any minibatch loss was not finite.
    """

    def loss_fn(params, stats, idx, step_key):
        logits, new_stats = mlp_forward(
            params, stats, data.x_train[idx], spec, training=True, dropout_key=step_key
        )
        return cross_entropy(logits, data.y_train[idx]), new_stats

    def step(carry, idx):
        params, stats, count = carry
        step_key = jax.random.fold_in(dropout_key, count) if spec.dropout > 0 else None
        (loss, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            params, stats, idx, step_key
        )
        params = jax.tree.map(lambda p, g: p - lr * g, params, grads)
        return (params, stats, count + 1), loss

    def epoch(carry, idx_epoch):
        carry, losses = jax.lax.scan(step, carry, idx_epoch)
        return carry, (losses.mean(), ~jnp.all(jnp.isfinite(losses)))

    def block(carry, idx_block):
        carry, (losses, bad) = jax.lax.scan(epoch, carry, idx_block)
        params, stats, _ = carry
        tr_loss, tr_acc = _evaluate_mlp(params, stats, data.x_train, data.y_train, spec)
        ev_loss, ev_acc = _evaluate_mlp(params, stats, data.x_test, data.y_test, spec)
        return carry, (losses, bad, tr_acc, tr_loss, ev_acc, ev_loss)

    carry = (params, stats, jnp.zeros((), jnp.int32))
    _, (losses, bad, tr_acc, tr_loss, ev_acc, ev_loss) = jax.lax.scan(block, carry, order)
    return {
        "train_loss": losses.reshape(-1),
        "train_acc": tr_acc,
        "train_eval_loss": tr_loss,
        "eval_acc": ev_acc,
        "eval_loss": ev_loss,
        "diverged": jnp.any(bad),
    }


def init_mlp_seeds(
    keys: jax.Array, in_dim: int, spec: MLPSpec, init_std: float | None
) -> tuple[MLPParams, list[jaxnorm.BatchStats]]:
    """`init_mlp` for each key, eagerly, stacked along a new leading (seed) axis."""
    inits = [init_mlp(k, in_dim, spec, init_std) for k in keys]
    return jax.tree.map(lambda *a: jnp.stack(a), *inits)


def make_init_sweep_program(
    spec: MLPSpec, lr: float
) -> Callable[..., dict[str, dict[str, jax.Array]]]:
    """The init sweep as one function to jit: vmap over stds, the two variants side by side.

    Args:
        spec: The MLP structure; ``use_bn`` is overridden per variant.
        lr: The SGD learning rate.

    Returns:
        ``program(data, order, unit_inits, stds) -> {"plain": metrics, "bn": metrics}``:
        ``unit_inits`` maps each variant to its ``(params, stats)`` drawn at ``init_std=1``
        (see `init_sweep_unit_inits`); each metric of `train_mlp` gains a leading axis of
        length ``len(stds)``. Every run uses the same normal draws, only rescaled, and the same
        minibatch order, so the only differences are the init scale and BN.
    """
    variants = sweep_variants(spec)

    def program(data: ArrayData, order: jax.Array, unit_inits: dict[str, Any], stds: jax.Array):
        out = {}
        for name, variant in variants.items():
            params, stats = unit_inits[name]

            def one(std, variant=variant, params=params, stats=stats):
                scaled = scale_weights(params, std)
                key = jax.random.key(0)  # unused: no dropout
                return train_mlp(data, order, scaled, stats, lr, key, spec=variant)

            out[name] = jax.vmap(one)(stds)
        return out

    return program


def sweep_variants(spec: MLPSpec) -> dict[str, MLPSpec]:
    """``{"plain": spec without BN, "bn": spec with BN}``."""
    return {"plain": replace(spec, use_bn=False), "bn": replace(spec, use_bn=True)}


def init_sweep_unit_inits(
    key: jax.Array, in_dim: int, spec: MLPSpec
) -> dict[str, tuple[MLPParams, list[jaxnorm.BatchStats]]]:
    """Each variant's initialization at ``init_std=1`` from ``key`` (same dense draws)."""
    return {name: init_mlp(key, in_dim, v, 1.0) for name, v in sweep_variants(spec).items()}


# ---------------------------------------------------------------------------------------------
# Small CNN with the jaxnorm linen modules
# ---------------------------------------------------------------------------------------------

NORMS = ("batch", "layer", "group", "rms", "none")  # the cnn_norms variants, table order
NORM_LABELS = {
    "batch": "BatchNorm",
    "layer": "LayerNorm",
    "group": "GroupNorm",
    "rms": "RMSNorm",
    "none": "no norm",
}


class SmallCNN(nn.Module):
    """``[conv3x3 stride 2 -> norm -> ReLU] x len(widths) -> flatten -> dense``.

    Norms come from :mod:`jaxnorm.linen`. ``LayerNorm``/``RMSNorm`` reduce over each sample's
    whole ``(H, W, C)`` activation (Ba et al.'s convolutional layer norm) with per-channel
    parameters; ``GroupNorm`` uses ``num_groups`` groups; ``BatchNorm`` reduces over
    ``(N, H, W)`` per channel.
    """

    norm: str  # one of NORMS
    widths: tuple[int, ...] = (16, 32, 64)  # output channels of each conv layer
    num_groups: int = 4  # GroupNorm groups (must divide every width)
    bn_momentum: float = 0.9  # BatchNorm: weight of the old running statistic
    num_classes: int = 10  # output units

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        """Logits of shape ``(n, num_classes)`` for images ``x`` of shape ``(n, 28, 28, 1)``."""
        for width in self.widths:
            x = nn.Conv(width, (3, 3), strides=(2, 2), use_bias=self.norm in ("none", "rms"))(x)
            if self.norm == "batch":
                x = jnn.BatchNorm(use_running_average=not train, momentum=self.bn_momentum)(x)
            elif self.norm == "layer":
                x = jnn.LayerNorm(reduction_axes=(1, 2, 3), feature_axes=-1)(x)
            elif self.norm == "group":
                x = jnn.GroupNorm(num_groups=self.num_groups)(x)
            elif self.norm == "rms":
                x = jnn.RMSNorm(reduction_axes=(1, 2, 3), feature_axes=-1)(x)
            elif self.norm != "none":
                raise ValueError(f"SmallCNN: norm must be one of {NORMS}, got {self.norm!r}")
            x = nn.relu(x)
        x = x.reshape((x.shape[0], -1))
        return nn.Dense(self.num_classes)(x)


class CNNState(NamedTuple):
    """Training state of one CNN (a pytree; vmapped over seeds it gains a leading axis)."""

    params: Any  # the model's "params" collection
    batch_stats: Any  # the "batch_stats" collection ({} without BatchNorm)
    opt_state: Any  # optax state of the optimizer


def make_cnn_program(
    model: SmallCNN, optimizer: optax.GradientTransformation, eval_batch: int
) -> tuple[Callable[..., CNNState], Callable[..., tuple[CNNState, dict[str, jax.Array]]]]:
    """Init and train-chunk functions for ``model``, vmapped over seeds (jit them).

    Args:
        model: The network.
        optimizer: The optax optimizer.
        eval_batch: Test images per forward pass in evaluation (must divide the test set).

    Returns:
        ``(init, chunk)``: ``init(keys, x_example) -> CNNState`` with one state per key (run
        it eagerly; use ``impl="rbg"`` keys for a fast start), and
        ``chunk(state, data, idx) -> (state, metrics)`` running ``idx.shape[1]`` steps (``idx``
        of shape ``(seeds, steps, batch)``) and then evaluating on the test set, with metrics
        ``train_loss`` (seeds,) the mean minibatch loss of the chunk, ``eval_loss`` and
        ``eval_acc`` (seeds,) in inference mode.
    """

    def init_one(key: jax.Array, x: jax.Array) -> CNNState:
        variables = model.init(key, x, train=False)
        params = variables["params"]
        return CNNState(params, variables.get("batch_stats", {}), optimizer.init(params))

    def loss_fn(params, batch_stats, x, y):
        logits, updates = model.apply(
            {"params": params, "batch_stats": batch_stats}, x, train=True, mutable=["batch_stats"]
        )
        return cross_entropy(logits, y), updates.get("batch_stats", {})

    def step(state: CNNState, xy):
        x, y = xy
        (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            state.params, state.batch_stats, x, y
        )
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        return CNNState(params, batch_stats, opt_state), loss

    def evaluate(state: CNNState, x_test, y_test):
        xs = x_test.reshape((-1, eval_batch) + x_test.shape[1:])
        ys = y_test.reshape((-1, eval_batch))

        def one(xy):
            logits = model.apply(
                {"params": state.params, "batch_stats": state.batch_stats}, xy[0], train=False
            )
            return (
                optax.softmax_cross_entropy_with_integer_labels(logits, xy[1]).sum(),
                (logits.argmax(-1) == xy[1]).sum(),
            )

        loss_sum, correct = jax.lax.map(one, (xs, ys))
        n = y_test.shape[0]
        return loss_sum.sum() / n, correct.sum() / n

    def chunk_one(state: CNNState, data: ArrayData, idx: jax.Array):
        xy = (data.x_train[idx], data.y_train[idx])
        state, losses = jax.lax.scan(step, state, xy)
        ev_loss, ev_acc = evaluate(state, data.x_test, data.y_test)
        return state, {"train_loss": losses.mean(), "eval_loss": ev_loss, "eval_acc": ev_acc}

    def init(keys: jax.Array, x: jax.Array) -> CNNState:
        # Eagerly, one seed at a time: jit-compiling the initializers' PRNG code costs more
        # than running it (seconds per model on CPU); eager ops are compiled once and cached.
        return jax.tree.map(lambda *a: jnp.stack(a), *[init_one(k, x) for k in keys])

    def chunk(state: CNNState, data: ArrayData, idx: jax.Array):
        return jax.vmap(chunk_one, in_axes=(0, None, 0))(state, data, idx)

    return init, chunk


# ---------------------------------------------------------------------------------------------
# MLP with BatchNorm or a batch-norm variant from jaxnorm.variants_linen
# ---------------------------------------------------------------------------------------------


class NormMLP(nn.Module):
    """``Dense -> norm -> ReLU`` per hidden layer, then a ``Dense`` classifier.

    Attributes:
      hidden: hidden widths.
      norm: ``"bn"`` (:class:`jaxnorm.linen.BatchNorm`), ``"renorm"``
        (:class:`jaxnorm.variants_linen.BatchRenorm`) or ``"ghost"``
        (:class:`jaxnorm.variants_linen.GhostBatchNorm`).
      momentum: running-statistics momentum of every norm layer.
      virtual: Ghost BN virtual batch size.
      renorm: BatchRenorm keyword arguments (limits and schedule).
      num_classes: output classes.
    """

    hidden: tuple[int, ...]
    norm: str
    momentum: float = 0.99
    virtual: int | None = None
    renorm: tuple[tuple[str, Any], ...] = ()
    num_classes: int = 10

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        """Logits of ``x`` (``(n, features)``); ``train`` normalizes with batch statistics."""
        for width in self.hidden:
            x = nn.Dense(width, use_bias=False)(x)
            if self.norm == "bn":
                layer = jnn.BatchNorm(momentum=self.momentum)
            elif self.norm == "renorm":
                layer = vnn.BatchRenorm(momentum=self.momentum, **dict(self.renorm))
            elif self.norm == "ghost":
                layer = vnn.GhostBatchNorm(self.virtual, momentum=self.momentum)
            else:
                raise ValueError(f"NormMLP: unknown norm {self.norm!r}")
            x = nn.relu(layer(x, use_running_average=not train))
        return nn.Dense(self.num_classes)(x)
