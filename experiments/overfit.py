"""``overfit``: does batch normalization regularize (shrink the train/test gap)?

A 5x100 ReLU MLP on 1000 MNIST images trained for 100 epochs with no regularizer, with
:func:`jaxnorm.batch_norm` and with dropout; variants x seeds are one jitted, vmapped program
that evaluates train and test accuracy every few epochs, called once per evaluation so a
progress bar can follow it (`experiments.mlp_training`; the numbers are those of one call for
the whole run, bit for bit).

``python -m experiments overfit`` (``--quick`` for a smoke run) writes
``results/overfit/metrics.json`` and ``final.csv``; `plot` and `report` read only the metrics
file.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from experiments.common import (
    Experiment,
    ProgressBar,
    RunConfig,
    Timer,
    read_json,
    to_lists,
    write_csv,
    write_metrics,
)
from experiments.data_images import (
    MNIST_MEAN,
    MNIST_STD,
    subset,
)
from experiments.mlp_training import merge_chunks, mlp_train_chunk
from experiments.models_vision import (
    MLPSpec,
    flat_arrays,
    init_mlp_seeds,
    minibatch_order,
)
from experiments.plotting import pyplot, seed_band
from experiments.reporting import command, pm

NAME = "overfit"


OVERFIT_VARIANTS = {  # name -> (use_bn, dropout rate, label)
    "plain": (False, 0.0, "no regularizer"),
    "bn": (True, 0.0, "BN"),
    "dropout": (False, 0.2, "dropout 0.2"),
}


@dataclass(frozen=True)
class OverfitConfig:
    """Configuration of ``overfit``."""

    n_train: int = 1000  # MNIST training images (a fixed random subset): small, to overfit
    n_test: int | None = None  # test images (None: the full 10,000)
    depth: int = 5  # hidden layers
    hidden: int = 100  # units per hidden layer
    batch_size: int = 100  # examples per SGD step
    lr: float = 0.05  # plain SGD learning rate (the same for every variant)
    epochs: int = 100  # passes over the training subset
    eval_every: int = 5  # epochs between evaluations
    seeds: int = 3  # seeds (initialization, dropout and minibatch order), vmapped
    bn_momentum: float = 0.9  # BN running-average weight of the old value
    data_seed: int = 0  # seed of the training subset

    @classmethod
    def quick(cls) -> OverfitConfig:
        """A reduced smoke configuration (tens of seconds on a 2-core CPU); its numbers mean
        nothing."""
        return cls(
            n_train=200,
            n_test=200,
            depth=2,
            hidden=32,
            batch_size=50,
            epochs=4,
            eval_every=2,
            seeds=2,
        )


def run(cfg: RunConfig) -> None:
    """Trains {none, BN, dropout} x seeds MLPs in one jitted program, tracking train/test."""
    config = OverfitConfig.quick() if cfg.quick else OverfitConfig()
    config = replace(config, seeds=cfg.seeds_or(config.seeds))
    out = cfg.dir_for(NAME)
    cpu_start = time.process_time()
    with Timer() as wall:
        split = subset(cfg.mnist(), config.n_train, config.data_seed, n_test=config.n_test)
        data = flat_arrays(split, mean=MNIST_MEAN, std=MNIST_STD)
        orders = jnp.stack(
            [
                jnp.asarray(
                    minibatch_order(
                        2000 + s,
                        config.n_train,
                        epochs=config.epochs,
                        batch_size=config.batch_size,
                        epochs_per_block=config.eval_every,
                    )
                )
                for s in range(config.seeds)
            ]
        )
        init_keys = jax.random.split(jax.random.key(2), config.seeds)
        dropout_keys = jax.random.split(jax.random.key(20), config.seeds)
        specs = {
            name: MLPSpec(config.depth, config.hidden, use_bn, drop, config.bn_momentum)
            for name, (use_bn, drop, _) in OVERFIT_VARIANTS.items()
        }
        in_dim = data.x_train.shape[1]
        # The same initial dense weights for every variant (BN adds its own scale/bias).
        inits = {
            name: init_mlp_seeds(init_keys, in_dim, spec, None) for name, spec in specs.items()
        }

        def program(data, state, count, orders, dropout_keys):
            new_state, result = {}, {}
            for name, spec in specs.items():

                def one(params, stats, order, key, spec=spec):
                    return mlp_train_chunk(
                        data, params, stats, count, order, config.lr, key, spec=spec
                    )

                params, stats, result[name] = jax.vmap(one)(*state[name], orders, dropout_keys)
                new_state[name] = (params, stats)
            return new_state, result

        # One call per evaluation block (eval_every epochs) of orders (seeds, blocks, ...).
        blocks, steps_per_block = orders.shape[1], orders.shape[2] * orders.shape[3]
        counts = [jnp.asarray(k * steps_per_block, jnp.int32) for k in range(blocks)]
        state = inits
        with Timer() as t_compile:
            example = (data, state, counts[0], orders[:, :1], dropout_keys)
            compiled = jax.jit(program).lower(*example).compile()
        parts = []
        bar = ProgressBar(config.epochs, desc=NAME, unit="epoch", enabled=cfg.progress)
        with Timer() as t_run, bar:
            for k in range(blocks):
                state, metrics = compiled(
                    data, state, counts[k], orders[:, k : k + 1], dropout_keys
                )
                parts.append(jax.device_get(metrics))
                bar.update(config.eval_every)
        result = merge_chunks(parts)
    print(
        f"overfit: {len(specs) * config.seeds} runs: compile {t_compile.seconds:.1f} s, "
        f"run {t_run.seconds:.1f} s",
        flush=True,
    )
    metrics: dict[str, Any] = {
        "config": asdict(config),
        "variants": {
            k: {"use_bn": v[0], "dropout": v[1], "label": v[2]} for k, v in OVERFIT_VARIANTS.items()
        },
        "eval_epochs": list(range(config.eval_every, config.epochs + 1, config.eval_every)),
        "n_test": int(data.y_test.shape[0]),
        "compile_s": t_compile.seconds,
        "run_s": t_run.seconds,
        "wall_s": wall.seconds,
        "cpu_s": time.process_time() - cpu_start,  # user + system, all threads
    }
    rows = []
    for name in specs:
        r = to_lists(result[name])
        metrics[name] = r
        for s in range(config.seeds):
            tr, ev = r["train_acc"][s][-1], r["eval_acc"][s][-1]
            rows.append([name, s, tr, ev, tr - ev, r["diverged"][s]])
    write_metrics(out, metrics)
    write_csv(
        out / "final.csv", ["variant", "seed", "train_acc", "eval_acc", "gap", "diverged"], rows
    )


def plot(folder: Path) -> None:
    """``overfit.png``: train and test accuracy per evaluation, mean ± std over seeds."""
    m = read_json(folder / "metrics.json")
    plt = pyplot()
    epochs = m["eval_epochs"]
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    colors = {"plain": "tab:gray", "bn": "tab:blue", "dropout": "tab:orange"}
    for name in [n for n in OVERFIT_VARIANTS if n in m["variants"]]:
        info = m["variants"][name]
        tr = np.array(m[name]["train_acc"], dtype=float)
        ev = np.array(m[name]["eval_acc"], dtype=float)
        c = colors.get(name)
        seed_band(axes[0], epochs, tr, color=c, ls="--", label=f"{info['label']} train")
        seed_band(axes[0], epochs, ev, color=c, label=f"{info['label']} test")
        seed_band(axes[1], epochs, tr - ev, color=c, label=info["label"])
    n_seeds = len(m[next(iter(m["variants"]))]["train_acc"])
    fig.suptitle(f"mean ± std over {n_seeds} seeds", fontsize=9)
    axes[0].set_ylabel("accuracy")
    axes[0].set_ylim(0.5, 1.01)
    axes[1].set_ylabel("train − test accuracy")
    for ax in axes:
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(folder / "overfit.png", dpi=110)
    plt.close(fig)


def report(folder: Path) -> str:
    """Markdown section of ``overfit`` from its metrics file."""
    m = read_json(folder / "metrics.json")
    c = m["config"]
    lines = [
        "## Regularization (`overfit`)",
        "",
        "**Claim.** Batch normalization also regularizes: the noise of batch statistics acts "
        "somewhat like dropout, so the train/test gap shrinks (the literature calls the effect "
        "modest).",
        "",
        f"**Setup.** {c['depth']}x{c['hidden']} ReLU MLP (He init) on {c['n_train']} MNIST "
        f"training images, test on {m['n_test']}; plain SGD lr={c['lr']}, batch "
        f"{c['batch_size']}, {c['epochs']} epochs, {c['seeds']} seeds; variants: "
        + ", ".join(m["variants"][n]["label"] for n in OVERFIT_VARIANTS if n in m["variants"])
        + f" (dropout after each hidden ReLU). One vmapped program, run {m['run_s']:.1f} s.",
        "",
        "![overfit](results/overfit/overfit.png)",
        "",
        "| variant | final train acc | final test acc | gap (train − test) | diverged |",
        "|---|---:|---:|---:|---:|",
    ]
    final = {}
    names = [n for n in OVERFIT_VARIANTS if n in m["variants"]]
    for name in names:
        info = m["variants"][name]
        tr = np.array([row[-1] for row in m[name]["train_acc"]], dtype=float)
        ev = np.array([row[-1] for row in m[name]["eval_acc"]], dtype=float)
        final[name] = (tr, ev, tr - ev)
        lines.append(
            f"| {info['label']} | {pm(tr)} | {pm(ev)} | {pm(tr - ev)} | "
            f"{int(np.sum(m[name]['diverged']))}/{c['seeds']} |"
        )
    gp, gb, gd = (final[k][2].mean() for k in ("plain", "bn", "dropout"))
    ep, eb, ed = (final[k][1].mean() for k in ("plain", "bn", "dropout"))
    sd = float(np.max([final[k][2].std() for k in final]))
    lines += [
        "",
        f"**Measured.** Gap without a regularizer {gp:.3f}; with BN {gb:.3f} "
        f"({gb - gp:+.3f}); with dropout {gd:.3f} ({gd - gp:+.3f}). Test accuracy: "
        f"{ep:.3f} / {eb:.3f} / {ed:.3f}. Largest seed std of a gap: {sd:.3f}.",
        "",
    ]
    if gb < gp - 2 * sd:
        verdict = f"BN shrinks the gap by {gp - gb:.3f}, more than twice the seed spread"
    elif gb < gp:
        verdict = (
            f"BN shrinks the gap by only {gp - gb:.3f}, within about two seed stds "
            f"({sd:.3f}): a modest effect at best"
        )
    else:
        verdict = f"BN does **not** shrink the gap here ({gb - gp:+.3f})"
    verdict += (
        f"; dropout changes it by {gd - gp:+.3f}. "
        f"BN's test accuracy is {eb - ep:+.3f} vs. no regularizer "
        f"(dropout {ed - ep:+.3f})."
    )
    train_final = min(float(final[k][0].mean()) for k in final)
    if train_final > 0.99:
        verdict += (
            f" Every variant fits the {c['n_train']} training images (final train accuracy "
            f"≥ {train_final:.3f}), so the gap is essentially the test error."
        )
    lines += [f"**Verdict.** {verdict}", "", f"Regenerate: {command(NAME)}.", ""]
    return "\n".join(lines)


EXPERIMENTS = [Experiment(NAME, "vision", run, plot, report)]
