"""The shared trainer: several runs (seeds, or learning rates) vmapped into one jitted program.

A *lane* is one training run; lanes differ in their initialization key, their data order and
their peak learning rate, never in shapes, so a whole sweep is ``jax.vmap`` of one step inside
``lax.scan``, compiled once. The pieces:

* `Lanes`: the stacked training state (params, BatchNorm running statistics, optimizer state);
  `init_lanes` makes it eagerly, one model per key.
* `unit_adamw` + `make_train_chunk`: ``K`` steps of every lane per call, the AdamW update of
  each lane scaled by its own peak learning rate.
* `stack_lanes` / `lane`: between a list of per-run pytrees and one stacked pytree.
* `epoch_batches`: minibatch indices drawn the same way by every vision experiment.
* `even_chunks`: how many equal chunks to cut a run's steps into, so a progress bar can
  advance between jitted calls without a second compilation for a shorter last chunk.

Experiments whose update is not this one (the functional MLP of ``models_vision``, PowerNorm's
backward statistic in ``powernorm_lm``, the sharded step of ``parallel``) keep their own step
function and still use `stack_lanes`, `lane` and `epoch_batches`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax


class Lanes(NamedTuple):
    """Training state of several runs stacked on a leading "lane" axis (seeds or lrs)."""

    params: Any  # pytree, each leaf (lanes, ...)
    batch_stats: Any  # pytree of BatchNorm running statistics, (lanes, ...); {} without BN
    opt_state: Any  # optax state, (lanes, ...)


# apply_loss(params, batch_stats, batch, train) -> (mean loss, new batch_stats)
ApplyLoss = Callable[[Any, Any, tuple[jax.Array, ...], bool], tuple[jax.Array, Any]]


def flax_variables(params: Any, batch_stats: Any) -> dict[str, Any]:
    """The flax variables dict of a model, without an empty ``batch_stats`` collection."""
    return {"params": params, "batch_stats": batch_stats} if batch_stats else {"params": params}


def unit_adamw(
    steps: int, *, warmup_frac: float, end_lr_frac: float, weight_decay: float
) -> optax.GradientTransformation:
    """AdamW whose learning-rate schedule peaks at 1; updates are scaled by each lane's peak lr.

    Equal to ``optax.adamw(peak_lr * schedule)`` once the updates are multiplied by ``peak_lr``,
    which lets one program train lanes with different peak learning rates.
    """
    warmup = max(1, int(round(warmup_frac * steps)))
    schedule = optax.warmup_cosine_decay_schedule(
        0.0, 1.0, warmup, max(steps, warmup + 1), end_value=end_lr_frac
    )

    def decay_mask(params: Any) -> Any:
        return jax.tree.map(lambda p: p.ndim >= 2, params)

    return optax.chain(
        optax.scale_by_adam(b1=0.9, b2=0.99),
        optax.add_decayed_weights(weight_decay, mask=decay_mask),
        optax.scale_by_schedule(schedule),
        optax.scale(-1.0),
    )


def make_train_chunk(
    apply_loss: ApplyLoss, tx: optax.GradientTransformation
) -> Callable[[Lanes, tuple[jax.Array, ...], jax.Array], tuple[Lanes, jax.Array]]:
    """A jitted ``(lanes, batches, peak_lr) -> (lanes, losses)`` that runs ``K`` steps.

    ``batches`` are arrays of shape ``(K, lanes, ...)``; ``peak_lr`` has shape ``(lanes,)``;
    ``losses`` has shape ``(K, lanes)``.
    """

    def lane_step(state: Lanes, batch: tuple[jax.Array, ...], lr: jax.Array):
        def loss_fn(params: Any) -> tuple[jax.Array, Any]:
            return apply_loss(params, state.batch_stats, batch, True)

        (loss, new_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        updates = jax.tree.map(lambda u: lr * u, updates)
        params = optax.apply_updates(state.params, updates)
        return Lanes(params, new_stats, opt_state), loss

    vstep = jax.vmap(lane_step)

    @jax.jit
    def chunk(lanes: Lanes, batches: tuple[jax.Array, ...], peak_lr: jax.Array):
        def body(state: Lanes, batch: tuple[jax.Array, ...]):
            return vstep(state, batch, peak_lr)

        return jax.lax.scan(body, lanes, batches)

    return chunk


def init_lanes(
    model: Any, example: tuple[jax.Array, ...], keys: jax.Array, tx: optax.GradientTransformation
) -> Lanes:
    """Initializes one model per key (vmapped) and its optimizer state.

    Runs eagerly: compiling ``init`` costs seconds of CPU, more than running it op by op.
    """

    def init_one(key: jax.Array) -> Lanes:
        variables = model.init(key, *example, train=False)
        params = variables["params"]
        return Lanes(params, variables.get("batch_stats", {}), tx.init(params))

    return jax.vmap(init_one)(keys)


def stack_lanes(trees: Sequence[Any]) -> Any:
    """Per-run pytrees of equal structure stacked along a new leading (lane) axis."""
    return jax.tree.map(lambda *xs: jnp.stack(xs), *trees)


def lane(tree: Any, i: int) -> Any:
    """Lane ``i`` of a stacked pytree."""
    return jax.tree.map(lambda a: a[i], tree)


def epoch_batches(seed: int, n_train: int, *, steps: int, batch: int) -> np.ndarray:
    """``(steps, batch)`` int32 training indices: consecutive epochs of fresh permutations.

    Each epoch is ``np.random.default_rng(seed).permutation(n_train)`` (one generator, drawn
    again per epoch) cut to ``n_train // batch`` full batches; the remainder is dropped.

    Raises:
        ValueError: If ``batch`` is larger than ``n_train``.
    """
    per_epoch = n_train // batch
    if per_epoch < 1:
        raise ValueError(f"epoch_batches: batch={batch} > n_train={n_train}")
    rng = np.random.default_rng(seed)
    epochs = -(-steps // per_epoch)
    perms = [rng.permutation(n_train)[: per_epoch * batch] for _ in range(epochs)]
    return np.concatenate(perms).reshape(-1, batch)[:steps].astype(np.int32)


def even_chunks(total: int, max_chunks: int) -> int:
    """The number of equal chunks to cut ``total`` steps into: the largest divisor of ``total``
    that is at most ``max_chunks``.

    Every chunk then has the same length, so a jitted chunk of steps compiles once; calling
    it chunk after chunk (carrying the state) runs the same steps as one call over all of
    them. A prime ``total`` above ``max_chunks`` gives 1 (one call, no intermediate progress).

    Raises:
        ValueError: If ``total`` or ``max_chunks`` is below 1.
    """
    if total < 1 or max_chunks < 1:
        raise ValueError(
            f"even_chunks: total={total} and max_chunks={max_chunks} must both be >= 1"
        )
    return max(d for d in range(1, min(total, max_chunks) + 1) if total % d == 0)
