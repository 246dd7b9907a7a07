"""``lr_sweep``: does batch normalization let a network train at larger learning rates?

Final train/test accuracy against the SGD learning rate of a 5x100 ReLU MLP on 5000 MNIST
images, with and without :func:`jaxnorm.batch_norm`; seeds x rates x variants are one jitted,
vmapped program, called once per epoch so a progress bar can follow it
(`experiments.mlp_training`; the numbers are those of one call for the whole run, bit for
bit). A divergence (non-finite loss) is recorded, not hidden.

``python -m experiments lr_sweep`` (``--quick`` for a smoke run) writes
``results/lr_sweep/metrics.json`` and ``runs.csv``; `plot` and `report` read only the metrics
file.
"""

from __future__ import annotations

import math
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
    sweep_variants,
)
from experiments.plotting import pyplot
from experiments.reporting import command

NAME = "lr_sweep"


@dataclass(frozen=True)
class LRSweepConfig:
    """Configuration of ``lr_sweep``."""

    n_train: int = 5000  # MNIST training images (a fixed random subset)
    n_test: int | None = None  # test images (None: the full 10,000)
    depth: int = 5  # hidden layers
    hidden: int = 100  # units per hidden layer
    batch_size: int = 100  # examples per SGD step
    epochs: int = 10  # passes over the training subset
    n_lrs: int = 10  # number of learning rates, log-spaced
    lr_min: float = 1e-3  # smallest learning rate
    lr_max: float = 3.0  # largest learning rate
    seeds: int = 3  # seeds (initialization and minibatch order), vmapped
    bn_momentum: float = 0.9  # BN running-average weight of the old value
    data_seed: int = 0  # seed of the training subset

    @classmethod
    def quick(cls) -> LRSweepConfig:
        """A reduced smoke configuration (tens of seconds on a 2-core CPU); its numbers mean
        nothing."""
        return cls(
            n_train=200, n_test=200, depth=2, hidden=32, batch_size=50, epochs=2, n_lrs=3, seeds=2
        )

    def lrs(self) -> np.ndarray:
        """The learning rates, ascending, ``float32``."""
        return np.logspace(
            math.log10(self.lr_min), math.log10(self.lr_max), self.n_lrs, dtype=np.float32
        )


def run(cfg: RunConfig) -> None:
    """Trains seeds x rates x {no BN, BN} MLPs in one jitted program (a call per epoch)."""
    config = LRSweepConfig.quick() if cfg.quick else LRSweepConfig()
    config = replace(config, seeds=cfg.seeds_or(config.seeds))
    out = cfg.dir_for(NAME)
    cpu_start = time.process_time()
    with Timer() as wall:
        split = subset(cfg.mnist(), config.n_train, config.data_seed, n_test=config.n_test)
        data = flat_arrays(split, mean=MNIST_MEAN, std=MNIST_STD)
        # One evaluation, after the last epoch: each seed's order is a single block of all
        # epochs, run here as one chunk per epoch, shape (seeds, epochs, 1, steps, batch).
        orders = jnp.stack(
            [
                jnp.asarray(
                    minibatch_order(
                        1000 + s,
                        config.n_train,
                        epochs=config.epochs,
                        batch_size=config.batch_size,
                        epochs_per_block=config.epochs,
                    )
                )
                for s in range(config.seeds)
            ]
        )
        orders = orders.reshape(config.seeds, config.epochs, 1, *orders.shape[-2:])
        keys = jax.random.split(jax.random.key(1), config.seeds)
        lrs = jnp.asarray(config.lrs())
        specs = sweep_variants(MLPSpec(config.depth, config.hidden, bn_momentum=config.bn_momentum))
        in_dim = data.x_train.shape[1]
        inits = {name: init_mlp_seeds(keys, in_dim, spec, None) for name, spec in specs.items()}
        # Every (seed, lr) lane starts from its seed's initialization: shape (seeds, lrs, ...).
        state = jax.tree.map(
            lambda a: jnp.broadcast_to(a[:, None], (a.shape[0], len(lrs), *a.shape[1:])), inits
        )

        def program(data, state, count, orders, lrs, *, evaluate):
            new_state, result = {}, {}
            for name, spec in specs.items():

                def one(params, stats, order, lr, spec=spec):
                    return mlp_train_chunk(
                        data, params, stats, count, order, lr, keys[0], spec=spec, evaluate=evaluate
                    )

                over_lrs = jax.vmap(one, in_axes=(0, 0, None, 0))
                params, stats, result[name] = jax.vmap(over_lrs, in_axes=(0, 0, 0, None))(
                    *state[name], orders, lrs
                )
                new_state[name] = (params, stats)
            return new_state, result

        steps = orders.shape[-2]
        counts = [jnp.asarray(k * steps, jnp.int32) for k in range(config.epochs)]
        with Timer() as t_compile:
            program = jax.jit(program, static_argnames="evaluate")
            example = (data, state, counts[0], orders[:, :1], lrs)
            compiled = {
                evaluate: program.lower(*example, evaluate=evaluate).compile()
                for evaluate in {config.epochs == 1, True}
            }
        parts = []
        bar = ProgressBar(config.epochs, desc=NAME, unit="epoch", enabled=cfg.progress)
        with Timer() as t_run, bar:
            for k in range(config.epochs):
                chunk = compiled[k == config.epochs - 1]
                state, metrics = chunk(data, state, counts[k], orders[:, k : k + 1], lrs)
                parts.append(jax.device_get(metrics))
                bar.update(1)
        result = merge_chunks(parts)
    print(
        f"lr_sweep: {2 * config.seeds * config.n_lrs} runs: compile {t_compile.seconds:.1f} s, "
        f"run {t_run.seconds:.1f} s",
        flush=True,
    )
    metrics: dict[str, Any] = {
        "config": asdict(config),
        "lrs": config.lrs().tolist(),
        "n_test": int(data.y_test.shape[0]),
        "compile_s": t_compile.seconds,
        "run_s": t_run.seconds,
        "wall_s": wall.seconds,
        "cpu_s": time.process_time() - cpu_start,  # user + system, all threads
    }
    rows = []
    for name in ("plain", "bn"):
        r = result[name]
        # Arrays are (seeds, lrs, blocks=1); keep the final values.
        metrics[name] = {
            "train_acc": np.asarray(r["train_acc"])[..., -1].tolist(),
            "eval_acc": np.asarray(r["eval_acc"])[..., -1].tolist(),
            "train_loss": np.asarray(r["train_loss"])[..., -1].tolist(),
            "eval_loss": np.asarray(r["eval_loss"])[..., -1].tolist(),
            "train_loss_curve": np.asarray(r["train_loss"]).tolist(),
            "diverged": np.asarray(r["diverged"]).tolist(),
        }
        for j, lr in enumerate(metrics["lrs"]):
            for s in range(config.seeds):
                mm = metrics[name]
                rows.append(
                    [name, lr, s, mm["train_acc"][s][j], mm["eval_acc"][s][j]]
                    + [mm["train_loss"][s][j], mm["diverged"][s][j]]
                )
    write_metrics(out, metrics)
    write_csv(
        out / "runs.csv",
        ["variant", "lr", "seed", "train_acc", "eval_acc", "final_epoch_train_loss", "diverged"],
        rows,
    )


def _summary(m: dict[str, Any], name: str) -> dict[str, np.ndarray]:
    """Per-rate diverged-seed counts and mean/std accuracies of variant ``name``."""
    r = m[name]
    div = np.array(r["diverged"], dtype=bool)  # (seeds, lrs)
    tr = np.array(r["train_acc"], dtype=float)
    ev = np.array(r["eval_acc"], dtype=float)
    return {
        "diverged": div.sum(0),
        "train_mean": tr.mean(0),
        "train_std": tr.std(0),
        "eval_mean": ev.mean(0),
        "eval_std": ev.std(0),
    }


def plot(folder: Path) -> None:
    """``lr_sweep.png``: final train and test accuracy against the learning rate."""
    m = read_json(folder / "metrics.json")
    plt = pyplot()
    lrs = np.array(m["lrs"])
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4), sharey=True)
    for ax, key, title in ((axes[0], "train", "train"), (axes[1], "eval", "test")):
        for name, color, label in (("plain", "tab:gray", "no BN"), ("bn", "tab:blue", "BN")):
            s = _summary(m, name)
            mean, std = s[f"{key}_mean"], s[f"{key}_std"]
            ax.errorbar(lrs, mean, yerr=std, fmt="o-", color=color, label=label, capsize=2)
            div = s["diverged"] > 0
            if div.any():
                ax.scatter(
                    lrs[div],
                    mean[div],
                    marker="x",
                    s=80,
                    color="red",
                    zorder=5,
                    label=f"diverged ({label})",
                )
        ax.set_xscale("log")
        ax.set_xlabel("SGD learning rate")
        ax.set_title(f"final {title} accuracy (mean ± std over seeds)", fontsize=9)
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("accuracy")
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(folder / "lr_sweep.png", dpi=110)
    plt.close(fig)


def report(folder: Path) -> str:
    """Markdown section of ``lr_sweep`` from its metrics file."""
    m = read_json(folder / "metrics.json")
    c = m["config"]
    lrs = np.array(m["lrs"])
    plain, bn = _summary(m, "plain"), _summary(m, "bn")
    lines = [
        "## Learning-rate sweep (`lr_sweep`)",
        "",
        "**Claim.** Batch normalization lets a network train at much larger learning rates.",
        "",
        f"**Setup.** The same {c['depth']}x{c['hidden']} ReLU MLP (He init) on {c['n_train']} "
        f"MNIST training images, tested on {m['n_test']} test images; plain SGD, batch "
        f"{c['batch_size']}, {c['epochs']} epochs, {len(lrs)} rates on logspace("
        f"{c['lr_min']:g}, {c['lr_max']:g}), {c['seeds']} seeds (init and data order), all "
        f"{2 * c['seeds'] * len(lrs)} runs one vmapped program (run {m['run_s']:.1f} s). A run "
        f"*diverged* if any minibatch loss was NaN/inf; its accuracy is reported as measured "
        f"(NaN logits predict class 0).",
        "",
        "![lr sweep](results/lr_sweep/lr_sweep.png)",
        "",
        "| lr | train acc, no BN | test acc, no BN | diverged | train acc, BN | test acc, BN "
        "| diverged |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for j, lr in enumerate(lrs):
        lines.append(
            f"| {lr:.3g} | {plain['train_mean'][j]:.3f} ± {plain['train_std'][j]:.3f} | "
            f"{plain['eval_mean'][j]:.3f} ± {plain['eval_std'][j]:.3f} | "
            f"{plain['diverged'][j]}/{c['seeds']} | "
            f"{bn['train_mean'][j]:.3f} ± {bn['train_std'][j]:.3f} | "
            f"{bn['eval_mean'][j]:.3f} ± {bn['eval_std'][j]:.3f} | "
            f"{bn['diverged'][j]}/{c['seeds']} |"
        )

    def usable(s: dict[str, np.ndarray]) -> np.ndarray:
        """Rates where no seed diverged and mean test acc is within 0.02 of the best."""
        best = np.nanmax(s["eval_mean"])
        return (s["diverged"] == 0) & (s["eval_mean"] >= best - 0.02)

    up, ub = usable(plain), usable(bn)
    p_best, b_best = int(np.nanargmax(plain["eval_mean"])), int(np.nanargmax(bn["eval_mean"]))
    p_div = lrs[plain["diverged"] > 0]
    b_div = lrs[bn["diverged"] > 0]

    def rng(mask: np.ndarray) -> str:
        return "none" if not mask.any() else f"{lrs[mask].min():.3g} … {lrs[mask].max():.3g}"

    lines += [
        "",
        f"**Measured.** Best mean test accuracy: no BN {plain['eval_mean'][p_best]:.3f} at "
        f"lr={lrs[p_best]:.3g}; BN {bn['eval_mean'][b_best]:.3f} at lr={lrs[b_best]:.3g}. "
        f"Rates within 0.02 of each variant's best with no diverged seed: no BN {rng(up)}; "
        f"BN {rng(ub)}. Diverged (NaN) runs: no BN {int(plain['diverged'].sum())} "
        f"(at lr {', '.join(f'{v:.3g}' for v in p_div) or 'none'}), BN "
        f"{int(bn['diverged'].sum())} (at lr {', '.join(f'{v:.3g}' for v in b_div) or 'none'}).",
        "",
    ]
    p_max = lrs[up].max() if up.any() else 0.0
    b_max = lrs[ub].max() if ub.any() else 0.0
    if b_max > p_max:
        verdict = (
            f"**Verdict.** Holds: BN keeps near-best accuracy up to lr={b_max:.3g}, "
            f"{b_max / p_max:.3g}x the largest good rate without BN ({p_max:.3g})."
        )
    elif b_max == p_max:
        verdict = (
            f"**Verdict.** Not shown here: both variants' usable ranges end at lr={b_max:.3g}."
        )
    else:
        verdict = (
            f"**Verdict.** Does not hold here: BN's usable range ends at lr={b_max:.3g}, "
            f"below the plain net's {p_max:.3g}."
        )
    if len(b_div):
        verdict += (
            f" BN does not prevent divergence everywhere: it diverged at lr {b_div.max():.3g}."
        )
    noise = 2 * np.maximum(plain["eval_std"], bn["eval_std"])
    small = lrs[plain["eval_mean"] - bn["eval_mean"] > noise]
    if len(small):
        verdict += (
            " BN is not better everywhere: without it the test accuracy is higher, by more "
            "than two seed stds, at lr "
            + ", ".join(f"{v:.3g}" for v in small)
            + " (at small rates BN learns more slowly here)."
        )
    lines += [verdict, "", f"Regenerate: {command(NAME)}.", ""]
    return "\n".join(lines)


EXPERIMENTS = [Experiment(NAME, "vision", run, plot, report)]
