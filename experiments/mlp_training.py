"""The functional MLP's SGD training in chunks of blocks, so sweeps can show progress.

``models_vision.train_mlp`` trains one MLP in a single ``lax.scan`` over blocks of epochs
(one jitted call for the whole run). `mlp_train_chunk` is the same training resumed from
any state: it runs some of the blocks and returns the state after them, so an experiment
can call one jitted chunk per block from Python and advance a progress bar in between. The
per-step arithmetic is that of ``train_mlp`` (the same step, epoch and block functions), so
the chunked run gives the same numbers bit for bit (tested in
``tests/test_experiments_vision.py``).

Chunk after chunk, the pieces fit together like this::

    state, count, parts = init_state, 0, []
    for k in range(blocks):
        state, metrics = chunk(state, count, order[k : k + 1])  # jitted, vmapped lanes
        parts.append(metrics)
        count += steps_per_block
    metrics = merge_chunks(parts)  # as train_mlp's, per lane

The step counter ``count`` (which step's dropout mask to draw) stays outside the vmapped
lanes, as inside ``train_mlp``, where it is the same for every lane.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import jaxnorm
from experiments.models_vision import ArrayData, MLPParams, MLPSpec, cross_entropy, mlp_forward


def _evaluate(
    params: MLPParams,
    stats: list[jaxnorm.BatchStats],
    x: jax.Array,
    y: jax.Array,
    spec: MLPSpec,
) -> tuple[jax.Array, jax.Array]:
    """Inference-mode ``(loss, accuracy)`` of the MLP on ``(x, y)``."""
    logits, _ = mlp_forward(params, stats, x, spec, training=False)
    return cross_entropy(logits, y), (logits.argmax(-1) == y).mean()


def mlp_train_chunk(
    data: ArrayData,
    params: MLPParams,
    stats: list[jaxnorm.BatchStats],
    count: jax.Array,
    order: jax.Array,
    lr: jax.Array | float,
    dropout_key: jax.Array,
    *,
    spec: MLPSpec,
    evaluate: bool = True,
) -> tuple[MLPParams, list[jaxnorm.BatchStats], dict[str, jax.Array]]:
    """Trains one MLP with plain SGD over the blocks of ``order``, from the given state.

    One call over all blocks from a fresh state equals ``models_vision.train_mlp``; several
    calls over consecutive blocks, each from the state the last one returned, equal it too.

    Args:
        data: Flattened standardized images and labels.
        params: Parameters at the start of the chunk (`models_vision.init_mlp` for the first).
        stats: Running statistics at the start of the chunk.
        count: ``int32`` scalar, the SGD steps taken before this chunk (the dropout mask of
            step ``t`` comes from ``fold_in(dropout_key, t)``).
        order: Minibatch indices of this chunk's blocks, shape
            ``(blocks, epochs_per_block, steps, batch)`` (a slice of
            `models_vision.minibatch_order`).
        lr: Learning rate.
        dropout_key: PRNG key of the dropout masks (unused without dropout).
        spec: The model structure (static).
        evaluate: Evaluate after each block (static); False for chunks that end inside a
            block of ``train_mlp`` (whose evaluation then comes with a later chunk).

    Returns:
        ``(params, stats, metrics)``: the state after the chunk, and ``train_loss`` and
        ``nonfinite`` (``blocks * epochs_per_block``,), each epoch's mean minibatch loss and
        whether any of its losses was not finite; with ``evaluate``, also ``train_acc``,
        ``train_eval_loss``, ``eval_acc`` and ``eval_loss`` (``blocks``,) as in ``train_mlp``.
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
        if not evaluate:
            return carry, (losses, bad)
        params, stats, _ = carry
        tr_loss, tr_acc = _evaluate(params, stats, data.x_train, data.y_train, spec)
        ev_loss, ev_acc = _evaluate(params, stats, data.x_test, data.y_test, spec)
        return carry, (losses, bad, tr_acc, tr_loss, ev_acc, ev_loss)

    (params, stats, _), out = jax.lax.scan(block, (params, stats, count), order)
    metrics = {"train_loss": out[0].reshape(-1), "nonfinite": out[1].reshape(-1)}
    if evaluate:
        metrics.update(train_acc=out[2], train_eval_loss=out[3], eval_acc=out[4], eval_loss=out[5])
    return params, stats, metrics


def merge_chunks(parts: list[Any]) -> Any:
    """Chunk metrics joined into whole-run metrics, as ``models_vision.train_mlp`` returns them.

    Args:
        parts: Each chunk's metrics in order: a pytree (e.g. ``{variant: metrics}``) whose
            metric dicts come from `mlp_train_chunk`, vmapped (leading lane axes).

    Returns:
        The same pytree with NumPy arrays: every metric concatenated along its last (block or
        epoch) axis, and ``nonfinite`` replaced by ``diverged`` (lanes,), True if any
        minibatch loss of the run was not finite. A metric only some chunks have (the
        evaluations of ``evaluate=False`` chunks) is joined over the chunks that have it.
    """

    def is_metrics(x: Any) -> bool:
        return isinstance(x, dict) and "nonfinite" in x

    first = parts[0]
    leaves_of = [jax.tree.leaves(p, is_leaf=is_metrics) for p in parts]
    merged = []
    for i in range(len(leaves_of[0])):
        chunks = [leaves[i] for leaves in leaves_of]
        keys = list(dict.fromkeys(k for c in chunks for k in c))
        whole = {
            k: np.concatenate([np.asarray(c[k]) for c in chunks if k in c], axis=-1)
            for k in keys
            if k != "nonfinite"
        }
        whole["diverged"] = np.concatenate(
            [np.asarray(c["nonfinite"]) for c in chunks], axis=-1
        ).any(axis=-1)
        merged.append(whole)
    return jax.tree.unflatten(jax.tree.structure(first, is_leaf=is_metrics), merged)
