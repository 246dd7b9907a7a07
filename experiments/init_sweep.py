"""``init_sweep``: does batch normalization make training insensitive to the init scale?

A 5x100 ReLU MLP on 1000 MNIST images, 16 weight-init scales, with and without
:func:`jaxnorm.batch_norm`: all 32 runs are one jitted, vmapped program
(`make_init_sweep_chunk`, the program of ``models_vision.make_init_sweep_program`` cut into
one call per epoch so a progress bar can follow it; the numbers are the same bit for bit).
Every run uses the same normal draws, rescaled, and the same minibatch order.

``python -m experiments init_sweep`` (``--quick`` for a smoke run) writes
``results/init_sweep/metrics.json`` (config, wall time, raw curves) and ``final.csv``; `plot`
and `report` read only the metrics file.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
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
    ImageData,
    subset,
)
from experiments.mlp_training import merge_chunks, mlp_train_chunk
from experiments.models_vision import (
    ArrayData,
    MLPSpec,
    flat_arrays,
    init_sweep_unit_inits,
    minibatch_order,
    scale_weights,
    sweep_variants,
)
from experiments.plotting import pyplot
from experiments.reporting import command

NAME = "init_sweep"


@dataclass(frozen=True)
class InitSweepConfig:
    """Configuration of ``init_sweep`` (defaults: the lesson's setting)."""

    n_train: int = 1000  # MNIST training images used (a fixed random subset)
    n_test: int = 1000  # MNIST test images evaluated after each epoch (a fixed random subset)
    depth: int = 5  # hidden layers
    hidden: int = 100  # units per hidden layer
    batch_size: int = 100  # examples per SGD step
    lr: float = 0.01  # plain SGD learning rate
    epochs: int = 20  # passes over the training subset
    n_stds: int = 16  # number of weight-init standard deviations
    std_max: float = 1.0  # largest init std (np.logspace(log10(std_max), log10(std_min)))
    std_min: float = 1e-4  # smallest init std
    bn_momentum: float = 0.9  # BN running-average weight of the old value (torch's 0.1)
    seed: int = 0  # seed of the subset, the minibatch order and the initialization

    @classmethod
    def quick(cls) -> InitSweepConfig:
        """A reduced smoke configuration (tens of seconds on a 2-core CPU); its numbers mean
        nothing."""
        return cls(n_train=200, n_test=200, depth=2, hidden=32, batch_size=50, epochs=3, n_stds=4)

    def stds(self) -> np.ndarray:
        """The init stds, largest first, ``float32``."""
        return np.logspace(
            math.log10(self.std_max), math.log10(self.std_min), self.n_stds, dtype=np.float32
        )

    def spec(self) -> MLPSpec:
        """The MLP structure (BN is switched per variant by the program)."""
        return MLPSpec(depth=self.depth, hidden=self.hidden, bn_momentum=self.bn_momentum)


def init_sweep_inputs(
    config: InitSweepConfig, images: ImageData
) -> tuple[ArrayData, jax.Array, dict[str, Any], jax.Array]:
    """The program's inputs ``(data, order, unit_inits, stds)``, see `make_init_sweep_program`."""
    split = subset(images, config.n_train, config.seed, n_test=config.n_test)
    data = flat_arrays(split, mean=MNIST_MEAN, std=MNIST_STD)
    order = minibatch_order(
        config.seed, config.n_train, epochs=config.epochs, batch_size=config.batch_size
    )
    unit_inits = init_sweep_unit_inits(
        jax.random.key(config.seed), data.x_train.shape[1], config.spec()
    )
    return data, jnp.asarray(order), unit_inits, jnp.asarray(config.stds())


def init_sweep_state(unit_inits: dict[str, Any], stds: jax.Array) -> dict[str, Any]:
    """Each variant's ``(params, stats)`` at every init std, stacked on a leading std axis.

    The weights are ``unit_inits``' draws times the std (`models_vision.scale_weights`); BN
    parameters and running statistics are the same for every std.
    """
    return {
        name: jax.vmap(lambda std, p=params, s=stats: (scale_weights(p, std), s))(stds)
        for name, (params, stats) in unit_inits.items()
    }


def make_init_sweep_chunk(spec: MLPSpec, lr: float) -> Any:
    """The init sweep's program for some of its epochs: vmap over stds, both variants.

    Returns:
        ``chunk(data, state, count, order) -> (state, {"plain": metrics, "bn": metrics})``
        (jit it): trains every lane of `init_sweep_state` over the blocks of ``order``
        (``(blocks, 1, steps, batch)``, a slice of the minibatch order shared by all runs)
        from step ``count`` on, with `experiments.mlp_training.mlp_train_chunk`. Chained
        over all blocks and joined with `experiments.mlp_training.merge_chunks`, the metrics
        equal those of ``models_vision.make_init_sweep_program`` bit for bit.
    """
    variants = sweep_variants(spec)

    def chunk(data: ArrayData, state: dict[str, Any], count: jax.Array, order: jax.Array):
        new_state, metrics = {}, {}
        for name, variant in variants.items():

            def one(params, stats, variant=variant):
                key = jax.random.key(0)  # unused: no dropout
                return mlp_train_chunk(data, params, stats, count, order, lr, key, spec=variant)

            params, stats, metrics[name] = jax.vmap(one)(*state[name])
            new_state[name] = (params, stats)
        return new_state, metrics

    return chunk


def run(cfg: RunConfig) -> None:
    """Trains all ``2 * n_stds`` MLPs in one jitted program (a call per epoch); writes
    metrics.json and a CSV."""
    config = InitSweepConfig.quick() if cfg.quick else InitSweepConfig()
    out = cfg.dir_for(NAME)
    cpu_start = time.process_time()
    with Timer() as wall:
        images = cfg.mnist()
        data, order, unit_inits, stds = init_sweep_inputs(config, images)
        state = init_sweep_state(unit_inits, stds)
        program = jax.jit(make_init_sweep_chunk(config.spec(), config.lr))
        blocks, steps_per_block = order.shape[0], order.shape[1] * order.shape[2]
        counts = [jnp.asarray(k * steps_per_block, jnp.int32) for k in range(blocks)]
        with Timer() as t_compile:
            compiled = program.lower(data, state, counts[0], order[:1]).compile()
        parts = []
        bar = ProgressBar(config.epochs, desc=NAME, unit="epoch", enabled=cfg.progress)
        with Timer() as t_run, bar:
            for k in range(blocks):
                state, metrics = compiled(data, state, counts[k], order[k : k + 1])
                parts.append(jax.device_get(metrics))
                bar.update(order.shape[1])
        result = merge_chunks(parts)
    n_runs = 2 * config.n_stds
    print(
        f"init_sweep: {n_runs} runs in one program: compile {t_compile.seconds:.1f} s, "
        f"run {t_run.seconds:.1f} s, total {t_compile.seconds + t_run.seconds:.1f} s "
        f"(wall incl. data {wall.seconds:.1f} s)",
        flush=True,
    )
    metrics = {
        "config": asdict(config),
        "stds": config.stds().tolist(),
        "epochs": list(range(1, config.epochs + 1)),
        "variants": {"plain": "no normalization", "bn": "jaxnorm.batch_norm before each ReLU"},
        "plain": to_lists(result["plain"]),
        "bn": to_lists(result["bn"]),
        "n_runs": n_runs,
        "compile_s": t_compile.seconds,
        "run_s": t_run.seconds,
        "sweep_s": t_compile.seconds + t_run.seconds,
        "wall_s": wall.seconds,
        "cpu_s": time.process_time() - cpu_start,  # user + system, all threads
        "devices": [str(d) for d in jax.devices()],
    }
    write_metrics(out, metrics)
    rows = []
    for i, std in enumerate(metrics["stds"]):
        p, b = metrics["plain"], metrics["bn"]
        rows.append(
            [std, p["train_acc"][i][-1], b["train_acc"][i][-1], p["eval_acc"][i][-1]]
            + [b["eval_acc"][i][-1], p["diverged"][i], b["diverged"][i]]
        )
    write_csv(
        out / "final.csv",
        ["init_std", "train_acc_plain", "train_acc_bn", "eval_acc_plain", "eval_acc_bn"]
        + ["diverged_plain", "diverged_bn"],
        rows,
    )


def _summary(m: dict[str, Any]) -> dict[str, Any]:
    """Who wins at each scale, from the final-epoch train accuracy (NaN counts as a loss)."""
    plain = np.array([row[-1] for row in m["plain"]["train_acc"]], dtype=float)
    bn = np.array([row[-1] for row in m["bn"]["train_acc"]], dtype=float)
    plain_div = np.array(m["plain"]["diverged"], dtype=bool)
    bn_div = np.array(m["bn"]["diverged"], dtype=bool)
    # A diverged run's accuracy is that of NaN logits (argmax 0); score it as measured.
    diff = bn - plain
    return {
        "plain": plain,
        "bn": bn,
        "diff": diff,
        "bn_wins": int(np.sum(diff > 0)),
        "plain_wins": int(np.sum(diff < 0)),
        "ties": int(np.sum(diff == 0)),
        "plain_diverged": int(plain_div.sum()),
        "bn_diverged": int(bn_div.sum()),
    }


def plot(folder: Path) -> None:
    """``init_sweep.png`` (grid of per-scale curves) and ``init_sweep_final.png``."""
    m = read_json(folder / "metrics.json")
    plt = pyplot()
    stds, epochs = m["stds"], m["epochs"]
    k = len(stds)
    cols = math.ceil(math.sqrt(k))
    rows = math.ceil(k / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(2.4 * cols, 2.0 * rows), sharex=True, sharey=True)
    axes = np.atleast_1d(axes).reshape(-1)
    for i, ax in enumerate(axes):
        if i >= k:
            ax.axis("off")
            continue
        ax.plot(epochs, m["plain"]["train_acc"][i], color="tab:gray", label="no BN")
        ax.plot(epochs, m["bn"]["train_acc"][i], color="tab:blue", label="BN")
        note = " (NaN)" if m["plain"]["diverged"][i] else ""
        ax.set_title(f"std={stds[i]:.1e}{note}", fontsize=8)
        ax.set_ylim(0, 1.02)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="upper right", ncol=2, fontsize=8, frameon=False)
    fig.supxlabel("epoch")
    fig.supylabel("train accuracy (inference mode)")
    c = m["config"]
    fig.suptitle(
        f"{c['depth']}x{c['hidden']} ReLU MLP, {c['n_train']} MNIST images, SGD lr={c['lr']}, "
        f"one seed; panel title: weight init std",
        fontsize=10,
        x=0.02,
        ha="left",
    )
    fig.tight_layout()
    fig.savefig(folder / "init_sweep.png", dpi=110)
    plt.close(fig)

    s = _summary(m)
    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.semilogx(stds, s["plain"], "o-", color="tab:gray", label="no BN")
    ax.semilogx(stds, s["bn"], "o-", color="tab:blue", label="BN")
    ax.set_title("one seed per point", fontsize=9)
    ax.set_xlabel("weight init std")
    ax.set_ylabel(f"train accuracy after {len(epochs)} epochs")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(folder / "init_sweep_final.png", dpi=110)
    plt.close(fig)


def report(folder: Path) -> str:
    """Markdown section of ``init_sweep`` from its metrics file."""
    m = read_json(folder / "metrics.json")
    c = m["config"]
    s = _summary(m)
    stds = np.array(m["stds"])
    lines = [
        "## Initialization sweep (`init_sweep`)",
        "",
        "**Claim.** Batch normalization makes training far less sensitive to the scale of the "
        "weight initialization: without it, deep nets train only in a narrow band of init "
        "scales; with it, almost any scale works.",
        "",
        f"**Setup.** {c['depth']} hidden layers x {c['hidden']} ReLU units on {c['n_train']} "
        f"MNIST training images; batch {c['batch_size']}, plain SGD lr={c['lr']}, "
        f"{c['epochs']} epochs; {len(stds)} init stds on logspace({math.log10(c['std_max']):g}, "
        f"{math.log10(c['std_min']):g}); every weight ~ N(0, std^2), the same draws rescaled. "
        f"BN = `jaxnorm.batch_norm` after each hidden affine layer, before the ReLU "
        f"(momentum {c['bn_momentum']}). Train accuracy is measured in inference mode "
        f"(running statistics) on all {c['n_train']} images after each epoch. All "
        f"{m['n_runs']} runs are one jitted, vmapped XLA program: compile "
        f"{m['compile_s']:.1f} s + run {m['run_s']:.1f} s = **{m['sweep_s']:.1f} s** "
        f"on {len(m['devices'])} CPU device(s).",
        "",
        "![init sweep: train accuracy per epoch, with and without BN, one panel per init std]"
        "(results/init_sweep/init_sweep.png)",
        "",
        "| init std | final train acc, no BN | final train acc, BN | BN − no BN |",
        "|---:|---:|---:|---:|",
    ]
    for i, std in enumerate(stds):
        note = " (diverged: NaN loss)" if m["plain"]["diverged"][i] else ""
        note_bn = " (diverged: NaN loss)" if m["bn"]["diverged"][i] else ""
        lines.append(
            f"| {std:.2e} | {s['plain'][i]:.3f}{note} | {s['bn'][i]:.3f}{note_bn} | "
            f"{s['diff'][i]:+.3f} |"
        )
    wins = s["diff"] > 0
    mean_margin = float(s["diff"][wins].mean()) if wins.any() else 0.0
    lines += [
        "",
        f"**Measured.** BN reaches the higher final train accuracy at **{s['bn_wins']} of "
        f"{len(stds)}** scales (no BN at {s['plain_wins']}, ties at {s['ties']}); where BN wins, "
        f"by {mean_margin:+.3f} on average (largest {float(s['diff'].max()):+.3f}). "
        f"Without BN, {s['plain_diverged']} run(s) diverged to a NaN loss; with BN, "
        f"{s['bn_diverged']}.",
    ]
    plain_ok = stds[s["plain"] >= 0.9]
    bn_ok = stds[s["bn"] >= 0.9]

    def band(x: np.ndarray) -> str:
        return "none" if len(x) == 0 else f"{len(x)} scales, std {x.min():.1e} … {x.max():.1e}"

    lines += [
        f"Scales that reach ≥ 0.90 train accuracy: no BN {band(plain_ok)}; BN {band(bn_ok)}.",
        "",
    ]
    verdict = (
        "**Verdict.** "
        + (
            "The claim holds over most of the range: "
            if s["bn_wins"] > len(stds) / 2
            else "The claim holds only partly here: "
        )
        + f"BN wins at {s['bn_wins']}/{len(stds)} scales and trains where the plain net is "
        "stuck at chance."
    )
    bn_low = stds[(s["bn"] < 0.9)]
    if len(bn_low):
        # Scale at which a hidden pre-activation's variance (fan_in * std^2 * E[relu(z)^2],
        # z ~ N(0, 1) after BN, so E = 1/2) equals BN's epsilon.
        eps = 1e-5
        std_eps = math.sqrt(2 * eps / c["hidden"])
        verdict += (
            f" It does **not** make every scale work: within {c['epochs']} epochs BN stays "
            f"below 0.90 train accuracy at {len(bn_low)} of {len(stds)} scales "
            f"({', '.join(f'{v:.1e}' for v in bn_low)}). Two likely causes, not isolated "
            f"here: BN makes each layer invariant to its weight scale, so the effective step "
            f"on the weights' direction shrinks like lr/std² (large stds learn slowly, tiny "
            f"ones take huge, noisy steps); and below std ≈ {std_eps:.1e} the variance of "
            f"the pre-activations of hidden layers 2–{c['depth']} "
            f"({c['hidden']}·std²/2) falls under BN's epsilon ({eps:g}), so BN no longer "
            f"restores unit scale."
        )
    lines += [verdict, "", f"Regenerate: {command(NAME)}.", ""]
    return "\n".join(lines)


EXPERIMENTS = [Experiment(NAME, "vision", run, plot, report)]
