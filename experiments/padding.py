"""``padding``: BatchNorm and padding in a Transformer that classifies variable-length verses.

The lesson's claim under test: *"BatchNorm breaks on variable-length sequences because padding
enters its statistics; LayerNorm, per token, does not care."* Old vs New Testament
classification of single KJV verses in padded batches, comparing LayerNorm, BatchNorm that
ignores padding, BatchNorm with the padding mask and no norm, three seeds vmapped; measures how
padding shifts BatchNorm's batch statistics and what masking recovers.

``python -m experiments padding`` (``--quick`` for a reduced smoke run) writes
``results/padding/metrics.json`` and ``padding.csv``; `plot` and `report` read only the metrics
file. The model is ``models_language.TransformerClassifier``, trained by the shared trainer
(``experiments.training``).
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from experiments.common import (
    Experiment,
    ProgressBar,
    RunConfig,
    Timer,
    read_json,
    write_csv_dicts,
    write_metrics,
)
from experiments.data_text import VerseData, load_verse_splits
from experiments.models_language import NORM_COLORS, NORM_LABELS, NormKind, TransformerClassifier
from experiments.plotting import pyplot, seed_band
from experiments.reporting import arr, command, mean, ordered_variants, pm_or_diverged
from experiments.training import (
    ApplyLoss,
    Lanes,
    flax_variables,
    init_lanes,
    lane,
    make_train_chunk,
    unit_adamw,
)

NAME = "padding"


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

    @classmethod
    def quick(cls) -> PaddingConfig:
        """Reduced smoke run of every code path (tens of seconds on a 2-core CPU); its numbers
        mean nothing."""
        return cls(
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
                flax_variables(params, batch_stats), ids, mask, train=True, mutable=["batch_stats"]
            )
            new_stats = updates.get("batch_stats", batch_stats)
        else:
            logits = model.apply(flax_variables(params, batch_stats), ids, mask, train=False)
            new_stats = batch_stats
        w = weights_c[y]
        loss = (optax.softmax_cross_entropy_with_integer_labels(logits, y) * w).sum() / w.sum()
        return loss, new_stats

    return apply_loss


def _predict(model: TransformerClassifier) -> Callable[..., jax.Array]:
    def predict(params, stats, ids, mask):
        return model.apply(flax_variables(params, stats), ids, mask, train=False).argmax(-1)

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
            flax_variables(params, stats),
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


def run(run_cfg: RunConfig) -> None:
    """Trains each padding variant (seeds vmapped), measures padding statistics; writes metrics."""
    cfg = PaddingConfig.quick() if run_cfg.quick else PaddingConfig()
    cfg = dataclasses.replace(cfg, seeds=run_cfg.seeds_or(cfg.seeds))
    out = run_cfg.dir_for(NAME)
    wall_start, cpu_start = time.perf_counter(), time.process_time()
    splits, vocab, info = load_verse_splits(
        label=cfg.label,
        split=cfg.split,
        split_seed=cfg.split_seed,
        max_len=cfg.max_len,
        limit=cfg.verse_limit,
    )
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
            bar = ProgressBar(
                cfg.steps, desc=f"padding {norm}", unit="step", enabled=run_cfg.progress
            )
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
                preds = _predict_all(predict, lanes, ckpt_val)
                ckpt_steps.append(done)
                ckpt_bacc.append(
                    [balanced_accuracy(ckpt_val.labels, p, num_classes) for p in preds]
                )
                bar.update(k)
            bar.close()
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
    write_metrics(out, metrics)
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
    write_csv_dicts(out / "padding.csv", rows)


def plot(folder: Path) -> None:
    """Writes ``padding_accuracy.png`` and ``padding_stats.png`` from ``metrics.json``."""
    m = read_json(Path(folder) / "metrics.json")
    plt = pyplot()
    fig, (ax_bar, ax_curve) = plt.subplots(1, 2, figsize=(11, 4))
    names = list(ordered_variants(m))
    for i, norm in enumerate(names):
        v = m["variants"][norm]
        bacc = arr(v["eval_test_balanced_accuracy"])
        color = NORM_COLORS.get(norm)
        ax_bar.bar(i, bacc.mean(), color=color, alpha=0.7)
        ax_bar.plot(np.full(len(bacc), i), bacc, "k.", ms=6)
        ck = arr(v["checkpoint_val_balanced_accuracy"])  # (checkpoints, seeds)
        seed_band(
            ax_curve,
            v["checkpoint_step"],
            ck.T,
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
    ax_curve.set(
        xlabel="step",
        ylabel="val balanced accuracy (subset)",
        title="Validation (mean ± std over seeds)",
    )
    ax_curve.legend(fontsize=7, loc="lower right")
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
        # Bars: mean over the measured batches; error bars: ± 1 std over them (for the
        # variance ratio, geometric: exp(mean ± std) of the log ratio).
        shift = [arr(src["layers"][n][f"{key}_mean_shift"]) for n in layer_names]
        log_ratio = [np.log(arr(src["layers"][n][f"{key}_var_ratio"])) for n in layer_names]
        shifts = np.array([v.mean() for v in shift])
        ratios = np.exp([v.mean() for v in log_ratio])
        ratio_err = np.array(
            [[r - np.exp(v.mean() - v.std()), np.exp(v.mean() + v.std()) - r]
             for r, v in zip(ratios, log_ratio, strict=True)]
        ).T  # fmt: skip
        bar = {"color": color, "label": label, "capsize": 2, "error_kw": {"lw": 0.8}}
        ax_shift.bar(x + (j - 1.5) * 0.2, shifts, 0.2, yerr=[v.std() for v in shift], **bar)
        ax_var.bar(x + (j - 1.5) * 0.2, ratios, 0.2, yerr=ratio_err, **bar)
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
    n_batches = len(src["pad_fraction"])
    ax_shift.set(
        ylabel=r"mean over features of $|\mu - \mu_{true}|\,/\,\sigma_{true}$",
        title=f"Mean shift from real-token statistics ({n_batches} batches, ± std)",
    )
    ax_var.axhline(1.0, color="k", lw=0.8)
    ax_var.set(
        ylabel=r"geometric mean over features of $\sigma^2 / \sigma^2_{true}$",
        title="Variance ratio (1 = true)",
    )
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


def report(folder: Path) -> str:
    """The padding section of the report, from ``metrics.json``."""
    m = read_json(Path(folder) / "metrics.json")
    cfg, data, var, base = m["config"], m["data"], ordered_variants(m), m["baseline"]
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
            f"| {NORM_LABELS.get(norm, norm)} | {pm_or_diverged(v['eval_test_accuracy'])} | "
            f"{pm_or_diverged(v['eval_test_balanced_accuracy'])} | "
            f"{pm_or_diverged(v['eval_val_balanced_accuracy'])} |"
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
                f"| {name} | {mean(layer['padded_mean_shift']):.2f} | "
                f"{mean(layer['masked_mean_shift']):.2f} | "
                f"{np.exp(np.mean(np.log(arr(layer['padded_var_ratio'])))):.2f} | "
                f"{np.exp(np.mean(np.log(arr(layer['masked_var_ratio'])))):.2f} | {run} |"
            )
        pad_shift = np.mean([mean(v["padded_mean_shift"]) for v in src["layers"].values()])
        real_shift = np.mean([mean(v["masked_mean_shift"]) for v in src["layers"].values()])
        pad_var = np.mean(
            [np.exp(np.mean(np.log(arr(v["padded_var_ratio"])))) for v in src["layers"].values()]
        )
        moved = pad_shift > 2 * real_shift
        verdict.append(
            f"Padding {'moves' if moved else 'barely moves'} the batch statistics: averaged over "
            f"layers, the batch mean including padding is {pad_shift:.2f} true standard "
            f"deviations off the real-token mean (variance ratio {pad_var:.2f}), versus "
            f"{real_shift:.2f} for the real tokens of the same batch (sampling noise)."
        )
        first = next(iter(src["layers"].values()))
        pf = arr(src["pad_fraction"])
        if len(pf) > 2 and np.std(pf) > 0:
            r = float(np.corrcoef(pf, arr(first["padded_mean_shift"]))[0, 1])
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
    bacc = {n: mean(v["eval_test_balanced_accuracy"]) for n, v in var.items()}
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
    acc = {n: mean(v["eval_test_accuracy"]) for n, v in var.items()}
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
        f"regenerate with {command(NAME, quick=m.get('quick', False))} (or `--plot-only`).",
        "",
        "![padding accuracy](padding/padding_accuracy.png)",
        "![padding statistics](padding/padding_stats.png)",
    ]
    return "\n".join(lines) + "\n"


EXPERIMENTS = [Experiment(NAME, "language", run, plot, report)]
