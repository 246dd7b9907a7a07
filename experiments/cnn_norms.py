"""``cnn_norms``: BatchNorm, LayerNorm, GroupNorm, RMSNorm or no norm in a small CNN.

A small conv net built from the :mod:`jaxnorm.linen` modules (``models_vision.SmallCNN``) on
full MNIST (and Fashion-MNIST when its IDX files are installed), trained with Adam for the same
steps, seeds and minibatches with every norm; the seeds are vmapped.

``python -m experiments cnn_norms`` (``--quick`` for a smoke run) writes
``results/cnn_norms/metrics.json`` and ``final.csv``; `plot` and `report` read only the
metrics file.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, replace
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
    write_csv,
    write_metrics,
)
from experiments.data_images import (
    FASHION_MNIST_DIR,
    FASHION_MNIST_MEAN,
    FASHION_MNIST_STD,
    MNIST_MEAN,
    MNIST_STD,
    ImageData,
    available_fashion_mnist_dir,
    load_fashion_mnist,
    subset,
)
from experiments.models_vision import (
    NORM_LABELS,
    NORMS,
    SmallCNN,
    image_arrays,
    make_cnn_program,
)
from experiments.plotting import pyplot
from experiments.reporting import command, pm
from experiments.training import epoch_batches

NAME = "cnn_norms"


@dataclass(frozen=True)
class CNNNormsConfig:
    """Configuration of ``cnn_norms``."""

    n_train: int | None = None  # training images (None: all 60,000)
    n_test: int | None = None  # test images (None: all 10,000)
    widths: tuple[int, ...] = (8, 16, 32)  # conv channels, each conv 3x3 stride 2
    num_groups: int = 4  # GroupNorm groups
    batch_size: int = 64  # examples per Adam step
    lr: float = 3e-3  # Adam learning rate
    steps: int = 1200  # training steps per run (same for every norm and seed)
    n_evals: int = 6  # evaluations on the test set, evenly spaced (must divide steps)
    eval_batch: int = 1000  # test images per forward pass (must divide n_test)
    seeds: int = 3  # seeds (initialization and minibatch order), vmapped
    bn_momentum: float = 0.9  # BatchNorm running-average weight of the old value
    fashion: bool = True  # also run Fashion-MNIST when its IDX files are installed

    @classmethod
    def quick(cls) -> CNNNormsConfig:
        """A reduced smoke configuration (tens of seconds on a 2-core CPU); its numbers mean
        nothing."""
        return cls(
            n_train=512,
            n_test=200,
            widths=(8,),
            num_groups=2,
            batch_size=32,
            steps=8,
            n_evals=2,
            eval_batch=100,
            seeds=2,
            fashion=False,
        )


def _run_dataset(
    config: CNNNormsConfig,
    images: ImageData,
    mean: float,
    std: float,
    cfg: RunConfig,
    label: str,
) -> dict[str, Any]:
    """Trains the CNN with every norm on one data set, seeds vmapped; returns its curves.

    Args:
        config: The experiment's configuration.
        images: The data set (uint8 images).
        mean: Pixel mean for standardization (on the [0, 1] scale).
        std: Pixel standard deviation for standardization.
        cfg: The run options (progress bars).
        label: Data set name for the progress bar.

    Returns:
        ``{norm: {"train_loss", "eval_loss", "eval_acc": (seeds, n_evals) lists, "compile_s",
        "run_s"}, "eval_steps": [...], "n_train": int, "n_test": int}``; ``compile_s`` includes
        the eager initialization.
    """
    n_train = config.n_train or images.y_train.shape[0]
    n_test = config.n_test or images.y_test.shape[0]
    if n_train < images.y_train.shape[0] or n_test < images.y_test.shape[0]:
        images = subset(images, n_train, 0, n_test=n_test)
    data = image_arrays(images, mean=mean, std=std)
    chunk_steps = config.steps // config.n_evals
    idx = np.stack(
        [
            epoch_batches(3000 + s, n_train, steps=config.steps, batch=config.batch_size)
            for s in range(config.seeds)
        ]
    ).reshape(config.seeds, config.n_evals, chunk_steps, config.batch_size)
    # rbg keys: the initializers run eagerly and rbg is fast to compile (threefry is not).
    keys = [jax.random.key(3000 + s, impl="rbg") for s in range(config.seeds)]
    optimizer = optax.adam(config.lr)
    results: dict[str, Any] = {}
    bar = ProgressBar(
        len(NORMS) * config.n_evals * chunk_steps,
        desc=f"cnn_norms {label}",
        unit="step",
        enabled=cfg.progress,
    )
    state = chunk = None
    curves: dict[str, list[Any]] = {}
    times: dict[str, dict[str, float]] = {}
    for norm, k in [(n, k) for n in NORMS for k in range(config.n_evals)]:
        if k == 0:
            model = SmallCNN(
                norm=norm,
                widths=config.widths,
                num_groups=config.num_groups,
                bn_momentum=config.bn_momentum,
            )
            init, chunk_fn = make_cnn_program(model, optimizer, config.eval_batch)
            start = time.perf_counter()
            state = init(keys, data.x_train[:2])
            chunk = jax.jit(chunk_fn).lower(state, data, jnp.asarray(idx[:, 0])).compile()
            times[norm] = {"compile_s": time.perf_counter() - start, "run_s": 0.0}
            curves[norm] = []
        start = time.perf_counter()
        state, metrics = chunk(state, data, jnp.asarray(idx[:, k]))
        curves[norm].append(jax.block_until_ready(metrics))
        times[norm]["run_s"] += time.perf_counter() - start
        bar.update(chunk_steps)
    bar.close()
    for norm in NORMS:
        stacked = {
            key: np.stack([np.asarray(c[key]) for c in curves[norm]], axis=1)
            for key in curves[norm][0]
        }  # each (seeds, n_evals)
        results[norm] = {
            "train_loss": stacked["train_loss"].tolist(),
            "eval_loss": stacked["eval_loss"].tolist(),
            "eval_acc": stacked["eval_acc"].tolist(),
            **times[norm],
        }
    results["eval_steps"] = [chunk_steps * (k + 1) for k in range(config.n_evals)]
    results["n_train"], results["n_test"] = int(n_train), int(n_test)
    return results


def run(cfg: RunConfig) -> None:
    """Trains the CNN with each jaxnorm.linen norm (seeds vmapped) on MNIST [+ Fashion-MNIST]."""
    config = CNNNormsConfig.quick() if cfg.quick else CNNNormsConfig()
    config = replace(config, seeds=cfg.seeds_or(config.seeds))
    if config.steps % config.n_evals:
        raise ValueError(f"cnn_norms: steps={config.steps} must be a multiple of n_evals")
    out = cfg.dir_for(NAME)
    datasets: dict[str, Any] = {}
    fashion_dir = available_fashion_mnist_dir() if config.fashion else None
    cpu_start = time.process_time()
    with Timer() as wall:
        datasets["mnist"] = _run_dataset(config, cfg.mnist(), MNIST_MEAN, MNIST_STD, cfg, "mnist")
        if fashion_dir is not None:
            datasets["fashion_mnist"] = _run_dataset(
                config,
                load_fashion_mnist(fashion_dir),
                FASHION_MNIST_MEAN,
                FASHION_MNIST_STD,
                cfg,
                "fashion_mnist",
            )
    print(
        f"cnn_norms: wall {wall.seconds:.1f} s, CPU {time.process_time() - cpu_start:.1f} s",
        flush=True,
    )
    metrics = {
        "config": asdict(config),
        "norms": list(NORMS),
        "datasets": datasets,
        "fashion_mnist": (
            "run"
            if fashion_dir
            else "skipped: no IDX files in "
            + FASHION_MNIST_DIR
            + (" (disabled in config)" if not config.fashion else "")
        ),
        "wall_s": wall.seconds,
        "cpu_s": time.process_time() - cpu_start,  # user + system, all threads
    }
    write_metrics(out, metrics)
    rows = []
    for ds, r in datasets.items():
        for norm in NORMS:
            acc = np.array(r[norm]["eval_acc"])[:, -1]
            loss = np.array(r[norm]["eval_loss"])[:, -1]
            rows.append([ds, norm, acc.mean(), acc.std(), loss.mean(), loss.std(), len(acc)])
    write_csv(
        out / "final.csv",
        [
            "dataset",
            "norm",
            "eval_acc_mean",
            "eval_acc_std",
            "eval_loss_mean",
            "eval_loss_std",
            "seeds",
        ],
        rows,
    )


def plot(folder: Path) -> None:
    """``cnn_norms_<dataset>.png``: test accuracy and loss per step, mean ± std over seeds."""
    m = read_json(folder / "metrics.json")
    plt = pyplot()
    for ds, r in m["datasets"].items():
        steps = r["eval_steps"]
        fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
        for norm in m["norms"]:
            for ax, key in ((axes[0], "eval_acc"), (axes[1], "eval_loss")):
                v = np.array(r[norm][key], dtype=float)
                (line,) = ax.plot(steps, v.mean(0), label=NORM_LABELS.get(norm, norm))
                ax.fill_between(
                    steps,
                    v.mean(0) - v.std(0),
                    v.mean(0) + v.std(0),
                    color=line.get_color(),
                    alpha=0.2,
                )
        axes[0].set_ylabel("test accuracy")
        axes[1].set_ylabel("test loss (cross-entropy, nats)")
        axes[1].set_yscale("log")
        for ax in axes:
            ax.set_xlabel("training step")
            ax.grid(alpha=0.3)
        axes[0].legend(fontsize=7)
        name = {"mnist": "MNIST", "fashion_mnist": "Fashion-MNIST"}.get(ds, ds)
        n_seeds = len(r[m["norms"][0]]["eval_acc"])
        fig.suptitle(f"small CNN on {name}, mean ± std over {n_seeds} seeds", fontsize=10)
        fig.tight_layout()
        fig.savefig(folder / f"cnn_norms_{ds}.png", dpi=110)
        plt.close(fig)


def report(folder: Path) -> str:
    """Markdown section of ``cnn_norms`` from its metrics file."""
    m = read_json(folder / "metrics.json")
    c = m["config"]
    lines = [
        "## Normalization layers in a CNN (`cnn_norms`)",
        "",
        "**Claim.** Normalization speeds up and stabilizes CNN training; BatchNorm is the "
        "default for convnets, and the batch-independent alternatives (LayerNorm, GroupNorm, "
        "RMSNorm) come close.",
        "",
        f"**Setup.** Conv 3x3 stride 2 with widths {tuple(c['widths'])}, each followed by the "
        f"norm and ReLU, then flatten and dense; all norms are `jaxnorm.linen` modules "
        f"(LayerNorm/RMSNorm over each sample's (H, W, C), GroupNorm with {c['num_groups']} "
        f"groups, BatchNorm momentum {c['bn_momentum']}). Adam lr={c['lr']}, batch "
        f"{c['batch_size']}, {c['steps']} steps, {c['seeds']} seeds vmapped; the same steps, "
        f"seeds and minibatches for every norm. Fashion-MNIST: {m['fashion_mnist']}. "
        f"Total wall time {m['wall_s']:.0f} s"
        + (f", CPU time {m['cpu_s']:.0f} s (2-core machine)." if "cpu_s" in m else "."),
        "",
    ]
    for ds, r in m["datasets"].items():
        lines += [
            f"![cnn norms on {ds}](results/cnn_norms/cnn_norms_{ds}.png)",
            "",
            f"**{ds}** ({r['n_train']} train / {r['n_test']} test images), after "
            f"{r['eval_steps'][-1]} steps:",
            "",
            "| norm | test accuracy | test loss | test acc at step "
            f"{r['eval_steps'][0]} | compile + run (s) |",
            "|---|---:|---:|---:|---:|",
        ]
        finals = {}
        for norm in m["norms"]:
            acc = np.array(r[norm]["eval_acc"], dtype=float)
            loss = np.array(r[norm]["eval_loss"], dtype=float)
            finals[norm] = acc[:, -1]
            lines.append(
                f"| {NORM_LABELS.get(norm, norm)} | {pm(acc[:, -1], 4)} | "
                f"{pm(loss[:, -1], 4)} | {pm(acc[:, 0], 3)} | "
                f"{r[norm]['compile_s']:.0f} + {r[norm]['run_s']:.0f} |"
            )
        ranked = sorted(finals, key=lambda n: -finals[n].mean())
        best = ranked[0]
        none_acc = finals["none"].mean()
        spread = max(float(v.std()) for v in finals.values())
        lines += [
            "",
            "Ranking by mean final test accuracy: "
            + " > ".join(f"{NORM_LABELS[n]} ({finals[n].mean():.4f})" for n in ranked)
            + f". Largest seed std: {spread:.4f}.",
            "",
        ]
        worse_than_none = [
            NORM_LABELS[n] for n in m["norms"] if n != "none" and finals[n].mean() < none_acc
        ]
        verdict = (
            f"**Verdict ({ds}).** Best: {NORM_LABELS[best]}, "
            f"{finals[best].mean() - none_acc:+.4f} over no norm"
            + (
                f", within two seed stds ({2 * spread:.4f}): at this budget normalization "
                f"barely changes the final accuracy."
                if finals[best].mean() - none_acc <= 2 * spread
                else f", more than two seed stds ({2 * spread:.4f})."
            )
        )
        bn_gap = finals["batch"].mean() - max(
            finals[n].mean() for n in m["norms"] if n not in ("batch", "none")
        )
        verdict += f" BatchNorm vs. the best batch-independent norm: {bn_gap:+.4f}" + (
            " (within the seed spread)." if abs(bn_gap) <= 2 * spread else "."
        )
        early = {n: float(np.mean(np.array(r[n]["eval_acc"], dtype=float)[:, 0])) for n in finals}
        ahead = [NORM_LABELS[n] for n in finals if n != "none" and early[n] > early["none"]]
        verdict += (
            f" Early in training (step {r['eval_steps'][0]}) "
            + (f"{', '.join(ahead)} lead the un-normalized net" if ahead else "no norm leads")
            + f" ({early['none']:.3f} without a norm)."
        )
        if worse_than_none:
            verdict += (
                f" Not every norm helps: {', '.join(worse_than_none)} end below the "
                f"un-normalized net."
            )
        lines += [verdict, ""]
    lines += [f"Regenerate: {command(NAME)}.", ""]
    return "\n".join(lines)


EXPERIMENTS = [Experiment(NAME, "vision", run, plot, report)]
