"""Smoke tests of ``experiments.small_batch`` and ``experiments.powernorm_lm``, end to end.

Each test runs ``run`` in quick mode into ``tmp_path``, then ``plot`` and ``report`` from the
metric files, and checks that the outputs exist and hold sane numbers. ``small_batch``'s
training in chunks of steps (so a progress bar can advance) is compared bit for bit with
one call over all its steps.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

pytest.importorskip("matplotlib")
pytest.importorskip("optax")

from experiments.common import RunConfig, read_json  # noqa: E402
from experiments.powernorm_lm import EXPERIMENTS as POWERNORM_LM_EXPERIMENTS  # noqa: E402
from experiments.powernorm_lm import plot as plot_powernorm_lm  # noqa: E402
from experiments.powernorm_lm import report as report_powernorm_lm  # noqa: E402
from experiments.powernorm_lm import run as run_powernorm_lm  # noqa: E402
from experiments.small_batch import EXPERIMENTS as SMALL_BATCH_EXPERIMENTS  # noqa: E402
from experiments.small_batch import (  # noqa: E402
    SmallBatchConfig,
    make_small_batch_program,
    small_batch_arms,
    small_batch_inputs,
)
from experiments.small_batch import plot as plot_small_batch  # noqa: E402
from experiments.small_batch import report as report_small_batch  # noqa: E402
from experiments.small_batch import run as run_small_batch  # noqa: E402
from experiments.training import stack_lanes  # noqa: E402

EXPERIMENTS = SMALL_BATCH_EXPERIMENTS + POWERNORM_LM_EXPERIMENTS


def _quick(tmp_path: Path) -> RunConfig:
    return RunConfig(out_dir=tmp_path, quick=True, progress=False)


def test_registry_entries():
    assert [(e.name, e.group) for e in EXPERIMENTS] == [
        ("small_batch", "vision"),
        ("powernorm_lm", "language"),
    ]


def test_small_batch_quick(tmp_path: Path):
    run_small_batch(_quick(tmp_path))
    folder = tmp_path / "small_batch"
    m = read_json(folder / "metrics.json")
    seeds = m["config"]["seeds"]
    assert m["quick"] is True and m["wall_s"] > 0
    norms = {m["results"][a]["norm"] for a in m["arms"]}
    assert norms == {"bn", "renorm", "ghost"}
    for name in m["arms"]:
        r = m["results"][name]
        keys = ["eval_acc", "eval_acc_trainmode", "train_acc"]
        if r["norm"] == "bn":
            keys += ["eval_acc_precise", "eval_acc_precise_large"]
        for key in keys:
            acc = np.asarray(r[key], dtype=float)
            assert acc.shape == (seeds,), (name, key)
            assert np.all((acc >= 0.0) & (acc <= 1.0)), (name, key, acc)
        assert np.all(np.isfinite(r["train_loss_last10pct"]))
    with open(folder / "results.csv", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(m["arms"]) * seeds

    plot_small_batch(folder)
    assert (folder / "small_batch.png").stat().st_size > 1000
    text = report_small_batch(folder)
    assert "`small_batch`" in text and "python -m experiments small_batch" in text
    assert "nan" not in text


@pytest.mark.parametrize("norm", ["bn", "renorm", "ghost"])
def test_small_batch_chunks_equal_one_scan_over_all_steps(norm: str):
    """Chunk after chunk from the returned state is the same training, bit for bit, as one
    vmapped ``lax.scan`` over every step with the optimizer state made inside it (how the
    experiment trained before it ran in chunks): BatchRenorm's r/d schedule and Adam's step
    count included."""
    c = SmallBatchConfig(hidden=(16,), epochs=2, seeds=2, batch_sizes=(4,), large_batch=8)
    arm = next(a for a in small_batch_arms(c) if a.norm == norm)
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(48, 10)).astype(np.float32))
    y = jnp.asarray(rng.integers(0, 10, 48).astype(np.int32))
    start, train, model, steps = make_small_batch_program(c, arm, x, y)
    inputs = [small_batch_inputs(c, arm, model, x, seed) for seed in (1, 2)]
    order = jnp.asarray(np.stack([o for _, o in inputs]))
    init = stack_lanes([v for v, _ in inputs])
    tx = optax.adam(c.lr)

    def one_scan(variables, order):
        def step(carry, idx):
            params, stats, opt = carry

            def loss_fn(p):
                logits, upd = model.apply(
                    {"params": p, "batch_stats": stats}, x[idx], True, mutable=["batch_stats"]
                )
                loss = optax.softmax_cross_entropy_with_integer_labels(logits, y[idx])
                return jnp.mean(loss), upd["batch_stats"]

            (loss, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
            updates, opt = tx.update(grads, opt, params)
            return (optax.apply_updates(params, updates), stats, opt), loss

        params = variables["params"]
        carry = (params, variables["batch_stats"], tx.init(params))
        (params, stats, _), losses = jax.lax.scan(step, carry, order)
        return (params, stats), losses

    (want_params, want_stats), want_losses = jax.jit(jax.vmap(one_scan))(init, order)
    state, losses, chunk = start(init), [], steps // 4
    assert steps % 4 == 0 and chunk > 1
    for k in range(0, steps, chunk):
        state, part = train(state, order[:, k : k + chunk])
        losses.append(np.asarray(part))
    np.testing.assert_array_equal(np.concatenate(losses, axis=1), np.asarray(want_losses))
    got = jax.tree.leaves((state[0], state[1]))
    want = jax.tree.leaves((want_params, want_stats))
    assert len(got) == len(want)
    for a, b in zip(got, want, strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_powernorm_lm_quick(tmp_path: Path):
    run_powernorm_lm(_quick(tmp_path))
    folder = tmp_path / "powernorm_lm"
    m = read_json(folder / "metrics.json")
    seeds = m["config"]["seeds"]
    assert set(m["results"]) == {"layernorm", "batchnorm", "powernorm"}
    for norm, r in m["results"].items():
        for key in ("eval_bpc", "eval_bpc_trainmode"):
            bpc = np.asarray(r[key], dtype=float)
            assert bpc.shape == (seeds,), (norm, key)
            assert np.all(np.isfinite(bpc)) and np.all(bpc > 0), (norm, key, bpc)
            # A char model that learned anything beats the uniform code over the vocabulary.
            assert np.all(bpc < math.log2(m["vocab_size"]) + 1.0), (norm, key, bpc)
        assert np.asarray(r["train_loss"], dtype=float).shape == (seeds, m["config"]["steps"])
        assert not any(r["diverged"])
    # PowerNorm's training forward pass uses the stored statistic, as inference does.
    pn = m["results"]["powernorm"]
    np.testing.assert_allclose(pn["eval_bpc"], pn["eval_bpc_trainmode"], rtol=1e-4)
    # The backward statistic was folded in each step (it stays exactly 0 otherwise).
    assert np.all(np.asarray(pn["abs_grad_stat"], dtype=float) > 0)
    assert "abs_grad_stat" not in m["results"]["batchnorm"]
    with open(folder / "final.csv", encoding="utf-8") as f:
        assert len(list(csv.DictReader(f))) == 3 * seeds

    plot_powernorm_lm(folder)
    assert (folder / "powernorm_lm.png").stat().st_size > 1000
    text = report_powernorm_lm(folder)
    assert "`powernorm_lm`" in text and "python -m experiments powernorm_lm" in text
