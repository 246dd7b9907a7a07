"""Character language models in vmapped lanes: train, evaluate, sample (used by ``charlm``).

Built on the shared trainer (`experiments.training`): `train_lm_lanes` trains one
:class:`experiments.models_language.TransformerLM` per lane on random windows of the train ids,
checkpointing validation losses; `LMEvaluator` scores stacked lanes on fixed windows in eval
mode (running statistics) or train mode (batch statistics); `sample_text` draws from one lane.
Also here: bits per character, evaluation windows and the divergence test of a loss curve.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from experiments.common import progress
from experiments.data_text import PAD_ID, UNK_ID, CharVocab
from experiments.models_language import TransformerLM
from experiments.plotting import trailing_mean
from experiments.training import (
    ApplyLoss,
    Lanes,
    flax_variables,
    init_lanes,
    make_train_chunk,
)

LN2 = math.log(2.0)


def nats_to_bpc(nats: Any) -> np.ndarray:
    """Converts mean cross-entropies in nats per character to bits per character (``/ ln 2``).

    The result is float64 whatever arrives (float32 losses are widened first), so a report
    shows the same digits whether the losses came from the device or from a metrics file.
    """
    return np.asarray(nats, dtype=np.float64) / LN2


def divergence_step(losses: np.ndarray, *, blowup_nats: float, width: int = 10) -> int | None:
    """The first step at which a loss curve diverged, or None.

    Diverged means a non-finite loss, or a smoothed loss (trailing mean over ``width`` steps)
    more than ``blowup_nats`` above the lowest smoothed loss reached before.

    Args:
        losses: Per-step training losses, shape ``(steps,)``.
        blowup_nats: Allowed rise above the running minimum, in nats.
        width: Smoothing window in steps.

    Returns:
        The 0-based step index, or None if the run never diverged.
    """
    losses = np.asarray(losses, dtype=np.float64)
    bad = np.flatnonzero(~np.isfinite(losses))
    first_bad = int(bad[0]) if bad.size else None
    finite = losses[: first_bad if first_bad is not None else len(losses)]
    if finite.size:
        sm = trailing_mean(finite, width)
        running_min = np.minimum.accumulate(sm)
        blown = np.flatnonzero(sm > running_min + blowup_nats)
        if blown.size:
            return int(blown[0])
    return first_bad


def eval_windows(ids: np.ndarray, context: int, limit: int) -> tuple[np.ndarray, np.ndarray]:
    """Non-overlapping ``(inputs, targets)`` windows of ``ids``, at most ``limit`` evenly spread.

    Returns:
        Two int32 arrays of shape ``(n, context)``; targets are inputs shifted by one.

    Raises:
        ValueError: If ``ids`` is shorter than one window.
    """
    n = (len(ids) - 1) // context
    if n < 1:
        raise ValueError(
            f"eval_windows: a split of {len(ids)} characters holds no window of {context + 1}; "
            f"use a longer text or a smaller context"
        )
    starts = np.arange(n) * context
    if n > limit:
        starts = starts[np.linspace(0, n - 1, limit).round().astype(int)]
    idx = starts[:, None] + np.arange(context + 1)
    windows = ids[idx]
    return windows[:, :-1].astype(np.int32), windows[:, 1:].astype(np.int32)


def lm_apply_loss(model: TransformerLM) -> ApplyLoss:
    """The trainer's ``apply_loss`` of a language model: mean next-character cross-entropy."""

    def apply_loss(params, batch_stats, batch, train):
        x, y = batch
        if train:
            logits, updates = model.apply(
                flax_variables(params, batch_stats), x, train=True, mutable=["batch_stats"]
            )
            new_stats = updates.get("batch_stats", batch_stats)
        else:
            logits, new_stats = (
                model.apply(flax_variables(params, batch_stats), x, train=False),
                batch_stats,
            )
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
        return loss, new_stats

    return apply_loss


class LMEvaluator:
    """Mean nats per character of stacked LM lanes on fixed windows, in eval or train mode."""

    def __init__(self, model: TransformerLM) -> None:
        apply_loss = lm_apply_loss(model)

        def nats(params, stats, x, y, train):
            return apply_loss(params, stats, (x, y), train)[0]

        self._eval = jax.jit(
            jax.vmap(lambda p, s, x, y: nats(p, s, x, y, False), (0, 0, None, None))
        )
        self._train = jax.jit(
            jax.vmap(lambda p, s, x, y: nats(p, s, x, y, True), (0, 0, None, None))
        )

    def __call__(
        self, lanes: Lanes, x: np.ndarray, y: np.ndarray, *, batch: int, train: bool = False
    ) -> np.ndarray:
        """Mean loss per lane over all windows, evaluated ``batch`` windows at a time.

        ``train=True`` normalizes each batch with its own statistics (BatchNorm's train mode,
        running statistics untouched); the windows are cut to a multiple of ``batch``.
        """
        fn = self._train if train else self._eval
        n = (len(x) // batch) * batch
        if n == 0:
            raise ValueError(f"LMEvaluator: {len(x)} windows hold no batch of {batch}")
        total = np.zeros(jax.tree.leaves(lanes.params)[0].shape[0])
        for i in range(0, n, batch):
            total += np.asarray(
                fn(lanes.params, lanes.batch_stats, x[i : i + batch], y[i : i + batch])
            )
        return total / (n // batch)


def sample_text(
    model: TransformerLM,
    variables: dict[str, Any],
    vocab: CharVocab,
    *,
    prompt: str,
    num_chars: int,
    temperature: float,
    seed: int,
) -> str:
    """Samples ``num_chars`` characters after ``prompt`` (eval mode, sliding context window)."""
    fwd = jax.jit(lambda v, ids: model.apply(v, ids, train=False))
    ids = [int(i) for i in vocab.encode(prompt)]
    key = jax.random.key(seed)
    buf = np.zeros((1, model.context), np.int32)
    banned = jnp.zeros((vocab.size,)).at[jnp.array([PAD_ID, UNK_ID])].set(-jnp.inf)
    for _ in range(num_chars):
        window = ids[-model.context :]
        buf[:] = PAD_ID
        buf[0, : len(window)] = window
        logits = fwd(variables, jnp.asarray(buf))[0, len(window) - 1]
        key, sub = jax.random.split(key)
        ids.append(int(jax.random.categorical(sub, logits / temperature + banned)))
    return vocab.decode(np.asarray(ids))


def _lm_batches(
    train_ids: np.ndarray, rngs: list[np.random.Generator], steps: int, batch: int, context: int
) -> tuple[np.ndarray, np.ndarray]:
    """Random training windows, shape ``(steps, lanes, batch, context)`` for inputs and targets."""
    starts = np.stack(
        [r.integers(0, len(train_ids) - context - 1, size=(steps, batch)) for r in rngs], 1
    )
    windows = train_ids[starts[..., None] + np.arange(context + 1)]
    return windows[..., :-1], windows[..., 1:]


def train_lm_lanes(
    model: TransformerLM,
    tx: optax.GradientTransformation,
    train_ids: np.ndarray,
    *,
    batch_size: int,
    steps: int,
    peak_lrs: np.ndarray,
    seeds: Sequence[int],
    evaluator_windows: tuple[np.ndarray, np.ndarray] | None,
    eval_every: int,
    desc: str,
    show_progress: bool,
) -> tuple[Lanes, dict[str, Any], LMEvaluator]:
    """Trains one LM per lane (``seeds[i]`` with peak lr ``peak_lrs[i]``), vmapped.

    Lane ``i`` is initialized from ``jax.random.key(seeds[i])`` and draws its windows of
    ``model.context + 1`` characters from ``np.random.default_rng([seeds[i], 1])``.

    Args:
        model: The language model.
        tx: Its optimizer, from `experiments.training.unit_adamw` (peak lr 1).
        train_ids: The encoded training text.
        batch_size: Windows per step.
        steps: Optimizer steps.
        peak_lrs: Each lane's peak learning rate, shape ``(lanes,)``.
        seeds: Each lane's seed.
        evaluator_windows: Validation ``(inputs, targets)`` scored every ``eval_every`` steps,
            or None.
        eval_every: Steps per jitted chunk (and between checkpoints).
        desc: Progress-bar label.
        show_progress: Show the progress bar.

    Returns:
        ``(lanes, log, evaluator)``; ``log`` holds ``train_loss`` ``(lanes, steps)`` and, when
        ``evaluator_windows`` is given, checkpoint losses in eval and train mode.
    """
    context = model.context
    example = (jnp.zeros((batch_size, context), jnp.int32),)
    keys = jnp.stack([jax.random.key(int(s)) for s in seeds])
    lanes = init_lanes(model, example, keys, tx)
    chunk = make_train_chunk(lm_apply_loss(model), tx)
    evaluator = LMEvaluator(model)
    rngs = [np.random.default_rng([int(s), 1]) for s in seeds]
    lr = jnp.asarray(peak_lrs, jnp.float32)
    losses: list[np.ndarray] = []
    ckpt: dict[str, list[Any]] = {"step": [], "eval_val_nats": [], "trainmode_val_nats": []}
    has_bn = bool(jax.tree.leaves(lanes.batch_stats))

    def checkpoint(step: int) -> None:
        if evaluator_windows is None:
            return
        x, y = evaluator_windows
        ckpt["step"].append(step)
        ckpt["eval_val_nats"].append(evaluator(lanes, x, y, batch=batch_size).tolist())
        if has_bn:
            tm = evaluator(lanes, x, y, batch=batch_size, train=True)
            ckpt["trainmode_val_nats"].append(tm.tolist())

    done = 0
    bar = progress(range(steps), desc=desc, enabled=show_progress)
    bar_iter = iter(bar)
    while done < steps:
        k = min(eval_every, steps - done)
        xb, yb = _lm_batches(train_ids, rngs, k, batch_size, context)
        lanes, chunk_losses = chunk(lanes, (jnp.asarray(xb), jnp.asarray(yb)), lr)
        losses.append(np.asarray(chunk_losses))
        done += k
        for _ in range(k):
            next(bar_iter, None)
        checkpoint(done)
    for _ in bar_iter:
        pass
    log = {"train_loss": np.concatenate(losses, 0).T, **ckpt}
    return lanes, log, evaluator
