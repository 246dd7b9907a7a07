"""``small_batch``: do Batch Renormalization or Ghost BN help at small batch sizes?

An MLP built from :mod:`jaxnorm.linen` / :mod:`jaxnorm.variants_linen` modules
(``models_vision.NormMLP``) on a few thousand MNIST images, trained at several batch sizes with
``BatchNorm``, ``BatchRenorm`` (warm-up schedule scaled to the run) and ``GhostBatchNorm``
(small virtual batches inside a large batch); precise BN
(:func:`jaxnorm.tools.recompute_batch_stats`) re-estimates the plain-BN models' statistics.
Seeds are ``jax.vmap``-ped into one jitted program per (variant, batch size).

``python -m experiments small_batch`` (``--quick`` for a smoke run) writes
``results/small_batch/metrics.json`` and ``results.csv``; `plot` and `report` read only the
metrics file.
"""

from __future__ import annotations

import time
from collections.abc import Callable
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
    read_json,
    write_csv,
    write_metrics,
)
from experiments.data_images import normalize_images, subset
from experiments.models_vision import NormMLP
from experiments.plotting import pyplot
from experiments.reporting import arr, command, diff_note, pm, quick_note
from experiments.training import epoch_batches, even_chunks, lane, stack_lanes
from jaxnorm.tools import recompute_batch_stats

NAME = "small_batch"


@dataclass(frozen=True)
class SmallBatchConfig:
    """Configuration of ``small_batch`` (defaults: the full run, about 3 CPU minutes)."""

    n_train: int = 4096  # MNIST training images (a fixed random subset)
    n_test: int | None = None  # MNIST test images (None: all 10,000)
    hidden: tuple[int, ...] = (256, 256)  # hidden widths; each Dense -> norm -> ReLU
    batch_sizes: tuple[int, ...] = (2, 4, 8, 32)  # batch sizes of the BatchNorm/BatchRenorm runs
    large_batch: int = 128  # batch of the Ghost BN runs (plain BN is also trained at it)
    virtual_batch_sizes: tuple[int, ...] = (2, 4, 8)  # Ghost BN virtual batch sizes (divide large)
    epochs: int = 5  # passes over the training subset (same examples seen at every batch size)
    lr: float = 1e-3  # Adam learning rate (the same at every batch size)
    momentum: float = 0.99  # running-statistics weight of the old value (all variants)
    r_max: float = 3.0  # BatchRenorm final r_max (the paper's)
    d_max: float = 5.0  # BatchRenorm final d_max (the paper's)
    renorm_warmup: float = 0.05  # BatchRenorm: fraction of the steps as plain BN
    renorm_relax: float = 0.25  # BatchRenorm: fraction of the steps of the r/d ramps
    precise_batches: int = 50  # precise BN: training batches run through the model
    precise_large_batch: int = 256  # precise BN also with batches of this size
    seeds: int = 3  # seeds (init, data order), vmapped
    data_seed: int = 0  # seed of the training/test subsets

    @classmethod
    def quick(cls) -> SmallBatchConfig:
        """Reduced smoke preset (tens of seconds on a 2-core CPU; the tests use it)."""
        return cls(
            n_train=256,
            n_test=256,
            hidden=(32,),
            batch_sizes=(4,),
            large_batch=16,
            virtual_batch_sizes=(4,),
            epochs=1,
            precise_batches=4,
            precise_large_batch=64,
            seeds=2,
        )


@dataclass(frozen=True)
class Arm:
    """One trained configuration of ``small_batch`` (a row of the results table)."""

    name: str  # key in metrics.json, e.g. "bn_b2", "renorm_b8", "ghost_b128_v8"
    norm: str  # "bn", "renorm" or "ghost"
    batch_size: int  # examples per optimizer step
    virtual: int | None = None  # Ghost BN virtual batch size (normalization batch)

    @property
    def norm_batch(self) -> int:
        """Examples per normalization group (the batch size BN's statistics see)."""
        return self.virtual or self.batch_size


def small_batch_arms(c: SmallBatchConfig) -> list[Arm]:
    """The trained configurations: BN and BatchRenorm at each batch size, BN and Ghost BN at
    the large batch."""
    arms = []
    for b in c.batch_sizes:
        arms.append(Arm(f"bn_b{b}", "bn", b))
        arms.append(Arm(f"renorm_b{b}", "renorm", b))
    if c.large_batch not in c.batch_sizes:
        arms.append(Arm(f"bn_b{c.large_batch}", "bn", c.large_batch))
    for v in c.virtual_batch_sizes:
        if c.large_batch % v:
            raise ValueError(
                f"small_batch: virtual batch size {v} does not divide large_batch="
                f"{c.large_batch}; pick divisors of it"
            )
        arms.append(Arm(f"ghost_b{c.large_batch}_v{v}", "ghost", c.large_batch, v))
    return arms


def _renorm_kwargs(c: SmallBatchConfig, steps: int) -> tuple[tuple[str, Any], ...]:
    """BatchRenorm limits with the paper's schedule shape scaled to ``steps`` training steps."""
    relax = max(1, round(c.renorm_relax * steps))
    return (
        ("r_max", c.r_max),
        ("d_max", c.d_max),
        ("warmup_steps", round(c.renorm_warmup * steps)),
        ("r_relax_steps", relax),
        ("d_relax_steps", relax),
    )


def _small_batch_model(c: SmallBatchConfig, arm: Arm, steps: int) -> NormMLP:
    return NormMLP(
        hidden=tuple(c.hidden),
        norm=arm.norm,
        momentum=c.momentum,
        virtual=arm.virtual,
        renorm=_renorm_kwargs(c, steps) if arm.norm == "renorm" else (),
    )


def _accuracy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    return jnp.mean(jnp.argmax(logits, -1) == labels)


def _eval_fns(model: NormMLP, batch_size: int):
    """``(eval_acc, trainmode_acc)``: accuracy with running statistics, and with the batch
    statistics of consecutive batches of ``batch_size`` (what the network computes in
    training; the remainder of the data that fills no batch is dropped)."""

    def eval_acc(variables: Any, x: jax.Array, y: jax.Array) -> jax.Array:
        return _accuracy(model.apply(variables, x, False), y)

    def trainmode_acc(variables: Any, x: jax.Array, y: jax.Array) -> jax.Array:
        n = (x.shape[0] // batch_size) * batch_size
        xb = x[:n].reshape(n // batch_size, batch_size, -1)

        def one(xi: jax.Array) -> jax.Array:
            logits, _ = model.apply(variables, xi, True, mutable=["batch_stats"])
            return logits

        logits = jax.vmap(one)(xb).reshape(n, -1)
        return _accuracy(logits, y[:n])

    return eval_acc, trainmode_acc


def make_small_batch_program(
    c: SmallBatchConfig, arm: Arm, x_train: jax.Array, y_train: jax.Array
) -> tuple[Callable[[Any], Any], Callable[[Any, jax.Array], tuple[Any, jax.Array]], NormMLP, int]:
    """The training of one arm, seeds vmapped, as a start and a jitted chunk of steps.

    Adam at ``c.lr`` over the minibatches ``x_train[order[step]]``, ``lax.scan``-ned.
    ``train`` runs the steps of the ``order`` it is given from the state it is given, so
    calling it on consecutive slices of the whole order, each from the state the last call
    returned, trains exactly as one call over all steps (same steps, same arithmetic), and a
    progress bar can advance in between. Initialization and minibatch order are made
    outside (:func:`small_batch_inputs`): XLA compiles a vmapped flax ``init`` far more
    slowly than it runs it eagerly.

    Returns:
      ``(start, train, model, steps)``: ``start(variables) -> state`` (eager) makes the
      training state ``(params, batch_stats, opt_state)`` from the initial variables;
      ``train(state, order) -> (state, losses)`` is jitted; ``variables``, ``state``,
      ``order`` (``(seeds, chunk_steps, batch)``) and ``losses`` (``(seeds, chunk_steps)``)
      carry a leading seed axis, except Adam's step count in ``state``, one scalar for all
      seeds; ``steps`` is the number of steps of the whole run.
    """
    steps = (x_train.shape[0] // arm.batch_size) * c.epochs
    model = _small_batch_model(c, arm, steps)
    tx = optax.adam(c.lr)

    # Adam's step count is the same in every lane: like inside one vmapped scan, it stays a
    # single (unbatched) scalar, vmap axis None; the moments have the parameters' shapes, one
    # per lane. (A per-lane copy of the count computes the bias correction differently, in
    # the last bits.) A parameter that is itself a scalar would be mapped to None too, and
    # vmap would then refuse its per-lane value rather than compute something else.
    one_lane = jax.eval_shape(
        lambda x: model.init(jax.random.key(0), x, False)["params"], x_train[: arm.batch_size]
    )
    opt_axes = jax.tree.map(lambda a: None if a.ndim == 0 else 0, jax.eval_shape(tx.init, one_lane))
    axes = (0, 0, opt_axes)

    def start(variables: Any) -> Any:
        params = variables["params"]
        return params, variables["batch_stats"], jax.vmap(tx.init, out_axes=opt_axes)(params)

    def train_one(state: Any, order: jax.Array) -> tuple[Any, jax.Array]:
        def step(carry, idx):
            params, stats, opt = carry

            def loss_fn(p):
                logits, upd = model.apply(
                    {"params": p, "batch_stats": stats}, x_train[idx], True, mutable=["batch_stats"]
                )
                loss = optax.softmax_cross_entropy_with_integer_labels(logits, y_train[idx])
                return jnp.mean(loss), upd["batch_stats"]

            (loss, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
            updates, opt = tx.update(grads, opt, params)
            return (optax.apply_updates(params, updates), stats, opt), loss

        return jax.lax.scan(step, state, order)

    return start, jax.jit(jax.vmap(train_one, in_axes=(axes, 0), out_axes=(axes, 0))), model, steps


def small_batch_inputs(
    c: SmallBatchConfig, arm: Arm, model: NormMLP, x_train: jax.Array, seed: int
) -> tuple[Any, np.ndarray]:
    """One seed's initial variables and minibatch order ``(steps, batch)``.

    The order is a fresh permutation each epoch (the remainder that fills no batch is
    dropped); seed ``s`` gives every arm the same initialization of the same shapes.
    """
    per_epoch = x_train.shape[0] // arm.batch_size
    order = epoch_batches(seed, x_train.shape[0], steps=per_epoch * c.epochs, batch=arm.batch_size)
    variables = model.init(jax.random.key(seed), x_train[: arm.batch_size], False)
    return variables, order


def _precise_batches(
    x_train: np.ndarray, batch_size: int, count: int, seed: int
) -> list[np.ndarray]:
    """``count`` training batches of ``batch_size`` (fresh permutations, cycled as needed)."""
    rng = np.random.default_rng(seed)
    need = batch_size * count
    rounds = -(-need // len(x_train))
    idx = np.concatenate([rng.permutation(len(x_train)) for _ in range(rounds)])[:need]
    return [x_train[i] for i in idx.reshape(count, batch_size)]


def run(run_cfg: RunConfig, config: SmallBatchConfig | None = None) -> dict[str, Any]:
    """Train every arm of ``small_batch`` and write its ``metrics.json`` and ``results.csv``.

    Args:
      run_cfg: the shared options (output folder, quick mode, seeds, data folder).
      config: overrides the default (or, with ``run_cfg.quick``, the quick) configuration.

    Returns:
      The metrics written.
    """
    c = config or (SmallBatchConfig.quick() if run_cfg.quick else SmallBatchConfig())
    c = replace(c, seeds=run_cfg.seeds_or(c.seeds))
    folder = run_cfg.dir_for(NAME)
    wall0, cpu0 = time.perf_counter(), time.process_time()
    data = subset(run_cfg.mnist(), c.n_train, c.data_seed, n_test=c.n_test)

    def flat(x: np.ndarray) -> np.ndarray:
        return normalize_images(x).reshape(len(x), -1)

    x_train_np, x_test_np = flat(data.x_train), flat(data.x_test)
    x_train, y_train = jnp.asarray(x_train_np), jnp.asarray(data.y_train)
    x_test, y_test = jnp.asarray(x_test_np), jnp.asarray(data.y_test)
    seed_ids = [1000 * (c.data_seed + 1) + s for s in range(c.seeds)]
    arms = small_batch_arms(c)
    results: dict[str, Any] = {}
    for i, arm in enumerate(arms):
        t0 = time.perf_counter()
        start, train, model, steps = make_small_batch_program(c, arm, x_train, y_train)
        inputs = [small_batch_inputs(c, arm, model, x_train, seed) for seed in seed_ids]
        state = start(stack_lanes([v for v, _ in inputs]))
        order = jnp.asarray(np.stack([o for _, o in inputs]))
        chunk = steps // even_chunks(steps, 20)
        losses = []
        desc = f"{NAME} {arm.name} ({i + 1}/{len(arms)})"
        with ProgressBar(steps, desc=desc, unit="step", enabled=run_cfg.progress) as bar:
            for k in range(0, steps, chunk):
                state, chunk_losses = train(state, order[:, k : k + chunk])
                losses.append(np.asarray(chunk_losses))
                bar.update(chunk)
        variables = {"params": state[0], "batch_stats": state[1]}
        losses = np.concatenate(losses, axis=1)
        train_s = time.perf_counter() - t0
        eval_acc, trainmode_acc = _eval_fns(model, arm.batch_size)
        ev = jax.jit(jax.vmap(eval_acc, in_axes=(0, None, None)))
        tm = jax.jit(jax.vmap(trainmode_acc, in_axes=(0, None, None)))
        tail = max(1, steps // 10)
        r: dict[str, Any] = {
            **asdict(arm),
            "steps": steps,
            "train_s": train_s,
            "train_loss_last10pct": losses[:, -tail:].mean(axis=1),
            "eval_acc": ev(variables, x_test, y_test),
            "eval_acc_trainmode": tm(variables, x_test, y_test),
            "train_acc": ev(variables, x_train, y_train),
        }
        if arm.norm == "bn":
            # Precise BN, one seed at a time (the recorder cannot run under vmap).
            def apply_train(v: Any, xb: jax.Array, model: NormMLP = model) -> Any:
                return model.apply(v, xb, True, mutable=["batch_stats"])

            for key, size in (
                ("precise", arm.batch_size),
                ("precise_large", c.precise_large_batch),
            ):
                new = []
                for s in range(c.seeds):
                    batches = _precise_batches(x_train_np, size, c.precise_batches, seed=100 + s)
                    new.append(recompute_batch_stats(apply_train, lane(variables, s), batches))
                stacked = stack_lanes(new)
                r[f"eval_acc_{key}"] = ev(stacked, x_test, y_test)
                r[f"train_acc_{key}"] = ev(stacked, x_train, y_train)
        results[arm.name] = jax.tree.map(
            lambda a: np.asarray(a).tolist() if hasattr(a, "shape") else a, r
        )
    wall_s, cpu_s = time.perf_counter() - wall0, time.process_time() - cpu0
    metrics = {
        "experiment": NAME,
        "quick": run_cfg.quick,
        "config": asdict(c),
        "arms": [a.name for a in arms],
        "results": results,
        "n_train": int(len(data.y_train)),
        "n_test": int(len(data.y_test)),
        "wall_s": wall_s,
        "cpu_s": cpu_s,
        "devices": [str(d) for d in jax.devices()],
    }
    write_metrics(folder, metrics)
    rows = []
    for name in metrics["arms"]:
        r = results[name]
        for s in range(c.seeds):
            rows.append(
                [
                    name,
                    r["norm"],
                    r["batch_size"],
                    r["virtual"] or "",
                    s,
                    r["eval_acc"][s],
                    r["eval_acc_trainmode"][s],
                    r["train_acc"][s],
                    r.get("eval_acc_precise", [""] * c.seeds)[s],
                    r.get("eval_acc_precise_large", [""] * c.seeds)[s],
                ]
            )
    write_csv(
        folder / "results.csv",
        [
            "arm",
            "norm",
            "batch_size",
            "virtual_batch_size",
            "seed",
            "eval_acc",
            "eval_acc_trainmode",
            "train_acc",
            "eval_acc_precise",
            "eval_acc_precise_large",
        ],
        rows,
    )
    print(f"small_batch: wall {wall_s:.1f} s, CPU {cpu_s:.1f} s -> {folder}", flush=True)
    return metrics


def _arm_label(r: dict[str, Any]) -> str:
    if r["norm"] == "ghost":
        return f"Ghost BN, batch {r['batch_size']} / virtual {r['virtual']}"
    label = "BatchNorm" if r["norm"] == "bn" else "BatchRenorm"
    return f"{label}, batch {r['batch_size']}"


def _series(m: dict[str, Any], norm: str, key: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(normalization batch sizes, means, stds)`` of metric ``key`` over the arms of ``norm``."""
    rows = [r for r in (m["results"][a] for a in m["arms"]) if r["norm"] == norm and key in r]
    rows.sort(key=lambda r: r["virtual"] or r["batch_size"])
    xs = np.array([r["virtual"] or r["batch_size"] for r in rows], dtype=float)
    vals = [arr(r[key]) for r in rows]
    return xs, np.array([v.mean() for v in vals]), np.array([v.std() for v in vals])


def plot(folder: Path) -> None:
    """``small_batch.png``: eval accuracy and train/eval-mode gap against the batch size."""
    m = read_json(Path(folder) / "metrics.json")
    c = m["config"]
    plt = pyplot()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    lines = [
        ("bn", "eval_acc", "BatchNorm (running stats)", "tab:red", "o-"),
        (
            "bn",
            "eval_acc_precise",
            "BatchNorm + precise BN (train-size batches)",
            "tab:orange",
            "s--",
        ),
        (
            "bn",
            "eval_acc_precise_large",
            f"BatchNorm + precise BN (batches of {c['precise_large_batch']})",
            "tab:purple",
            "v:",
        ),
        ("renorm", "eval_acc", "BatchRenorm", "tab:blue", "^-"),
        (
            "ghost",
            "eval_acc",
            f"Ghost BN (batch {c['large_batch']}; x = virtual)",
            "tab:green",
            "D",
        ),
    ]
    for norm, key, label, color, style in lines:
        xs, mean, std = _series(m, norm, key)
        if len(xs):
            ax1.errorbar(xs, mean, yerr=std, fmt=style, color=color, label=label, capsize=3)
    ax1.set_xscale("log", base=2)
    ax1.set_xlabel("normalization batch size (examples per BN statistic)")
    ax1.set_ylabel(f"test accuracy, inference mode ({m['n_test']} images)")
    ax1.set_title("Inference-mode accuracy (mean ± std over seeds)")
    ax1.legend(fontsize=7)
    ax1.grid(alpha=0.3)
    for norm, label, color, style in (
        ("bn", "BatchNorm", "tab:red", "o-"),
        ("renorm", "BatchRenorm", "tab:blue", "^-"),
        ("ghost", "Ghost BN", "tab:green", "D"),
    ):
        rows = [m["results"][a] for a in m["arms"] if m["results"][a]["norm"] == norm]
        rows.sort(key=lambda r: r["virtual"] or r["batch_size"])
        if not rows:
            continue
        xs = [r["virtual"] or r["batch_size"] for r in rows]
        gaps = [arr(r["eval_acc_trainmode"]) - arr(r["eval_acc"]) for r in rows]
        ax2.errorbar(
            xs,
            [g.mean() for g in gaps],
            yerr=[g.std() for g in gaps],
            fmt=style,
            color=color,
            label=label,
            capsize=3,
        )
    ax2.axhline(0.0, color="k", lw=0.8)
    ax2.set_xscale("log", base=2)
    ax2.set_xlabel("normalization batch size")
    ax2.set_ylabel("test acc: training mode − inference mode")
    ax2.set_title("Train/eval-mode gap (training-mode = batch statistics)")
    ax2.legend(fontsize=7)
    ax2.grid(alpha=0.3)
    fig.suptitle(
        f"small_batch: MLP {tuple(c['hidden'])} on {m['n_train']} MNIST images, "
        f"{c['epochs']} epochs, Adam {c['lr']}, {c['seeds']} seeds"
    )
    fig.tight_layout()
    fig.savefig(Path(folder) / "small_batch.png", dpi=120)
    plt.close(fig)


def report(folder: Path) -> str:
    """Markdown section of ``small_batch`` from its metrics file."""
    m = read_json(Path(folder) / "metrics.json")
    c = m["config"]
    res = m["results"]
    lines = [
        "## Batch-norm variants at small batch sizes (`small_batch`)",
        "",
        "**Question.** BatchNorm's statistics get noisy and biased when batches are small "
        "(the biased variance of n examples is (n−1)/n of the population's on average, and the "
        "network learns to expect batch-normalized inputs). Do Batch Renormalization "
        "(Ioffe, 2017) or Ghost BN (Hoffer et al., 2017) help, and what does precise BN "
        "(re-estimating the population statistics after training; Wu & Johnson, 2021) change?",
        "",
        f"**Setup.** MLP {tuple(c['hidden'])} (Dense → norm → ReLU) on {m['n_train']} MNIST "
        f"training images, tested on {m['n_test']} test images; Adam lr={c['lr']}, "
        f"{c['epochs']} epochs at every batch size (same examples seen, so smaller batches take "
        f"more steps), running-statistics momentum {c['momentum']}, {c['seeds']} seeds "
        f"(init and data order) vmapped into one program per row. BatchRenorm "
        f"(`jaxnorm.variants_linen.BatchRenorm`): plain BN for the first "
        f"{c['renorm_warmup']:.0%} of the steps, then r_max → {c['r_max']} and d_max → "
        f"{c['d_max']} over the next {c['renorm_relax']:.0%} (the paper's schedule shape, "
        f"scaled to the run). Ghost BN (`GhostBatchNorm`): batch {c['large_batch']} split into "
        f"virtual batches. Precise BN: `jaxnorm.tools.recompute_batch_stats` (pooled "
        f"estimator) on {c['precise_batches']} training batches, either of the training batch "
        f"size or of {c['precise_large_batch']}, applied to the BatchNorm models. "
        f"*Inference mode* normalizes with the running statistics; *training mode* with the "
        f"statistics of consecutive test batches of the training (virtual) batch size; "
        f"the gap is training − inference mode. Wall time {m['wall_s']:.0f} s, CPU time "
        f"{m['cpu_s']:.0f} s (2-core machine, shared).",
        "",
        *quick_note(m),
        "![small batch](results/small_batch/small_batch.png)",
        "",
        "| model | steps | test acc (inference) | + precise BN (train-size) | "
        f"+ precise BN ({c['precise_large_batch']}) | test acc (training mode) | gap | "
        "train acc (inference) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name in m["arms"]:
        r = res[name]
        gap = arr(r["eval_acc_trainmode"]) - arr(r["eval_acc"])
        lines.append(
            f"| {_arm_label(r)} | {r['steps']} | {pm(r['eval_acc'], 4)} | "
            f"{pm(r['eval_acc_precise'], 4) if 'eval_acc_precise' in r else '—'} | "
            f"{pm(r['eval_acc_precise_large'], 4) if 'eval_acc_precise_large' in r else '—'} | "
            f"{pm(r['eval_acc_trainmode'], 4)} | {pm(gap, 4)} | {pm(r['train_acc'], 4)} |"
        )
    lines += ["", "**Measured.**", ""]
    bn = {r["batch_size"]: r for r in res.values() if r["norm"] == "bn"}
    small, big = min(bn), max(bn)
    lines.append(
        f"- BatchNorm, inference mode: {pm(bn[small]['eval_acc'], 4)} at batch {small} vs "
        f"{pm(bn[big]['eval_acc'], 4)} at batch {big}; its training-mode − inference-mode gap "
        f"at batch {small} is "
        f"{pm(arr(bn[small]['eval_acc_trainmode']) - arr(bn[small]['eval_acc']), 4)}."
    )
    renorm_wins, renorm_notes = 0, []
    for b in sorted(r["batch_size"] for r in res.values() if r["norm"] == "renorm"):
        rr, br = res[f"renorm_b{b}"], bn.get(b)
        if br is None:
            continue
        a, z = arr(rr["eval_acc"]), arr(br["eval_acc"])
        renorm_wins += int(a.mean() - z.mean() > 2.0 * max(a.std(), z.std()))
        renorm_notes.append(f"batch {b}: {diff_note(a, z)}")
    lines.append("- BatchRenorm − BatchNorm (inference-mode test acc): " + "; ".join(renorm_notes))
    precise_notes, precise_large_notes = [], []
    for b in sorted(bn):
        z = arr(bn[b]["eval_acc"])
        precise_notes.append(f"batch {b}: {diff_note(arr(bn[b]['eval_acc_precise']), z)}")
        precise_large_notes.append(
            f"batch {b}: {diff_note(arr(bn[b]['eval_acc_precise_large']), z)}"
        )
    lines.append("- Precise BN (train-size batches) − BatchNorm: " + "; ".join(precise_notes))
    lines.append(
        f"- Precise BN (batches of {c['precise_large_batch']}) − BatchNorm: "
        + "; ".join(precise_large_notes)
    )
    ghosts = [r for r in res.values() if r["norm"] == "ghost"]
    ghost_notes = []
    for g in sorted(ghosts, key=lambda r: r["virtual"]):
        a = arr(g["eval_acc"])
        note = f"virtual {g['virtual']}: vs BN at batch {g['batch_size']} " + diff_note(
            a, arr(bn[g["batch_size"]]["eval_acc"])
        )
        if g["virtual"] in bn:
            note += f", vs BN at batch {g['virtual']} " + diff_note(
                a, arr(bn[g["virtual"]]["eval_acc"])
            )
        ghost_notes.append(note)
    if ghost_notes:
        lines.append("- Ghost BN (inference-mode test acc): " + "; ".join(ghost_notes) + ".")
    lines += ["", _verdict(m), "", f"Regenerate: {command(NAME)}.", ""]
    return "\n".join(lines)


def _beyond(a: np.ndarray, b: np.ndarray) -> int:
    """+1 / -1 if mean(a) is above / below mean(b) by more than 2 seed stds, else 0."""
    d = a.mean() - b.mean()
    return int(np.sign(d)) if abs(d) > 2.0 * max(a.std(), b.std()) else 0


def _by_sign(notes: dict[int, list[str]], verbs: tuple[str, str, str]) -> str:
    """``"helps at batch 2 (+0.128); hurts at batch 8 (-0.012); ..."`` from signed notes."""
    signs = (1, -1, 0)
    parts = [f"{verb} at {', '.join(notes[k])}" for k, verb in zip(signs, verbs, strict=True)]
    return "; ".join(p for k, p in zip(signs, parts, strict=True) if notes[k])


def _verdict(m: dict[str, Any]) -> str:
    """The verdict paragraph, worded from the numbers (differences count only beyond 2 seed
    standard deviations)."""
    c = m["config"]
    res = m["results"]
    bn = {r["batch_size"]: r for r in res.values() if r["norm"] == "bn"}
    small, big = min(bn), max(bn)

    def acc(r: dict[str, Any], key: str = "eval_acc") -> np.ndarray:
        return arr(r[key])

    parts = ["**Verdict.**"]
    drop = acc(bn[big]).mean() - acc(bn[small]).mean()
    hurt = {1: "do", -1: "do not"}.get(_beyond(acc(bn[big]), acc(bn[small])), "barely")
    parts.append(
        f"Small batches {hurt} hurt plain BatchNorm's inference-mode accuracy here (batch "
        f"{big} − batch {small}: {drop:+.4f})."
    )
    tm_small = acc(bn[small], "eval_acc_trainmode").mean()
    if tm_small < acc(bn[small]).mean():
        parts.append(
            f"At batch {small} the network is even worse in the mode it was trained in "
            f"({tm_small:.4f} with batch statistics vs {acc(bn[small]).mean():.4f} with running "
            f"ones): the damage is done by normalizing over {small} examples during training, "
            f"not by the running statistics."
        )
    notes: dict[int, list[str]] = {1: [], -1: [], 0: []}
    for b in sorted(bn):
        if f"renorm_b{b}" in res:
            a, z = acc(res[f"renorm_b{b}"]), acc(bn[b])
            notes[_beyond(a, z)].append(f"batch {b} ({a.mean() - z.mean():+.4f})")
    if any(notes.values()):
        parts.append(
            "BatchRenorm "
            + _by_sign(notes, ("helps", "hurts", "makes no difference beyond the seed spread"))
            + ". Its training-mode output equals the running-statistics output whenever r and d "
            "are not clipped, so after the warm-up it trains the network that inference uses "
            "(training − inference gap at batch "
            f"{small}: {_gap(res.get(f'renorm_b{small}', bn[small])):+.4f}, vs "
            f"{_gap(bn[small]):+.4f} for BatchNorm)."
        )
    notes = {1: [], -1: [], 0: []}
    for b in sorted(bn):
        best = max(
            ("eval_acc_precise", "eval_acc_precise_large"), key=lambda k: acc(bn[b], k).mean()
        )
        a, z = acc(bn[b], best), acc(bn[b])
        sign = _beyond(a, z)
        note = f"batch {b} ({a.mean() - z.mean():+.4f}"
        if sign > 0:  # the likely cause, from the config: how stale the running average is
            lag = c["momentum"] ** bn[b]["steps"]
            note += f"; after {bn[b]['steps']} steps {lag:.2g} of the initial statistics remain"
        notes[sign].append(note + ")")
    parts.append(
        "Precise BN (the better of its two batch sizes) "
        + _by_sign(notes, ("helps", "hurts", "makes no difference beyond the seed spread"))
        + ": it repairs stale or noisy running averages, not a network trained on tiny batches."
    )
    for g in sorted((r for r in res.values() if r["norm"] == "ghost"), key=lambda r: r["virtual"]):
        a = acc(g)
        d_big = a.mean() - acc(bn[g["batch_size"]]).mean()
        sentence = (
            f"Ghost BN {g['batch_size']}/{g['virtual']}: {d_big:+.4f} vs BatchNorm at batch "
            f"{g['batch_size']}"
        )
        if g["virtual"] in bn:
            sentence += (
                f" and {a.mean() - acc(bn[g['virtual']]).mean():+.4f} vs BatchNorm at batch "
                f"{g['virtual']} (the same normalization group, {bn[g['virtual']]['steps']} "
                f"instead of {g['steps']} steps)"
            )
        parts.append(sentence + ".")
    ghosts = [r for r in res.values() if r["norm"] == "ghost"]
    if ghosts:
        wins = [g for g in ghosts if _beyond(acc(g), acc(bn[g["batch_size"]])) > 0]
        parts.append(
            "Ghost BN follows the virtual batch size, not the step count: small virtual "
            "batches bring small-batch BN's problems into a large batch. It is meant as a "
            "regularizer for large batches, not a remedy for small ones"
            + (
                f", and it does help at virtual size {', '.join(str(g['virtual']) for g in wins)}."
                if wins
                else ", and here no virtual size beats plain BatchNorm at the large batch."
            )
        )
    return " ".join(parts)


def _gap(r: dict[str, Any]) -> float:
    """Mean training-mode − inference-mode test accuracy of an arm."""
    return float((arr(r["eval_acc_trainmode"]) - arr(r["eval_acc"])).mean())


EXPERIMENTS = [Experiment(NAME, "vision", run, plot, report)]
