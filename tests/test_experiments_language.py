"""Tests of the language experiments: a quick end-to-end run, causality, bpc, padding masks."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from experiments import __main__ as cli
from experiments.common import read_json
from experiments.lm_training import divergence_step, eval_windows, nats_to_bpc
from experiments.models_language import NORM_KINDS, TransformerClassifier, TransformerLM

VOCAB = 11


def _lm_with_running_stats(norm: str) -> tuple[TransformerLM, dict]:
    """A small LM whose BatchNorm running statistics were moved by one train-mode batch."""
    model = TransformerLM(VOCAB, norm, d_model=16, num_heads=2, num_layers=2, context=12)
    ids = jax.random.randint(jax.random.key(1), (4, 12), 0, VOCAB)
    variables = model.init(jax.random.key(0), ids, train=False)
    if "batch_stats" in variables:
        _, updates = model.apply(variables, ids, train=True, mutable=["batch_stats"])
        variables = {**variables, **updates}
        means = jax.tree.leaves(updates["batch_stats"])
        assert any(float(jnp.abs(m).max()) > 0 for m in means)  # statistics really moved
    return model, variables


def test_quick_run_writes_sane_metrics(tmp_path):
    assert cli.main(["charlm", "padding", "--quick", "--out", str(tmp_path), "--no-progress"]) == 0
    charlm = read_json(tmp_path / "charlm" / "metrics.json")
    for name in (
        "metrics.json",
        "charlm.csv",
        "stability.csv",
        "charlm_curves.png",
        "charlm_stability.png",
    ):
        assert (tmp_path / "charlm" / name).stat().st_size > 0, name
    vocab_bits = math.log2(charlm["data"]["vocab_size"])
    for norm, v in charlm["variants"].items():
        for key in ("eval_val_bpc", "eval_test_bpc", "eval_bs1_bpc"):
            values = np.asarray(v[key])
            assert np.all(np.isfinite(values)) and np.all(values > 0), (norm, key, values)
            assert np.all(values < 3 * vocab_bits), (norm, key, values)
    assert "trainmode_val_bpc" in charlm["variants"]["batchnorm"]
    # In eval mode BatchNorm is batch-independent: batch size 1 equals the batched result.
    bn = charlm["variants"]["batchnorm"]
    np.testing.assert_allclose(bn["eval_bs1_bpc"], bn["eval_batched_same_windows_bpc"], rtol=1e-4)
    assert charlm["samples"]["text"].startswith(charlm["config"]["sample_prompt"])
    assert {r["norm"] for r in charlm["stability"]["runs"]} == set(
        charlm["config"]["stability_norms"]
    )

    padding = read_json(tmp_path / "padding" / "metrics.json")
    for name in ("metrics.json", "padding.csv", "padding_accuracy.png", "padding_stats.png"):
        assert (tmp_path / "padding" / name).stat().st_size > 0, name
    for norm, v in padding["variants"].items():
        for key in ("eval_test_accuracy", "eval_test_balanced_accuracy", "eval_val_accuracy"):
            assert all(0.0 <= a <= 1.0 for a in v[key]), (norm, key, v[key])
    assert 0.5 < padding["baseline"]["test_accuracy"] <= 1.0  # the Old Testament is the majority
    assert padding["baseline"]["test_balanced_accuracy"] == pytest.approx(0.5)
    layer = next(iter(padding["padding_stats"]["batchnorm_masked"]["layers"].values()))
    assert all(s >= 0 for s in layer["padded_mean_shift"] + layer["masked_mean_shift"])

    report = (tmp_path / "REPORT.md").read_text()
    assert "bits per character" in report and "balanced accuracy" in report


@pytest.mark.parametrize("norm", NORM_KINDS)
def test_lm_is_causal_in_eval_mode(norm):
    model, variables = _lm_with_running_stats(norm)
    ids = jax.random.randint(jax.random.key(2), (3, 12), 2, VOCAB)
    t = 7
    changed = ids.at[:, t].set((ids[:, t] + 1) % VOCAB)
    before = model.apply(variables, ids, train=False)
    after = model.apply(variables, changed, train=False)
    np.testing.assert_allclose(before[:, :t], after[:, :t], rtol=0, atol=1e-6)
    assert float(jnp.abs(before[:, t:] - after[:, t:]).max()) > 1e-4  # the change is seen later


def test_batchnorm_lm_in_train_mode_sees_the_future():
    # Batch statistics over batch x time include later positions: the documented leak.
    model, variables = _lm_with_running_stats("batchnorm")
    ids = jax.random.randint(jax.random.key(2), (3, 12), 2, VOCAB)
    changed = ids.at[:, 11].set((ids[:, 11] + 1) % VOCAB)
    before, _ = model.apply(variables, ids, train=True, mutable=["batch_stats"])
    after, _ = model.apply(variables, changed, train=True, mutable=["batch_stats"])
    assert float(jnp.abs(before[:, :11] - after[:, :11]).max()) > 1e-6


def test_bpc_is_nats_over_ln2():
    # Uniform predictions over V characters cost ln V nats = log2 V bits per character.
    v = 64
    logits = jnp.zeros((5, v))
    nats = optax.softmax_cross_entropy_with_integer_labels(logits, jnp.arange(5)).mean()
    assert float(nats_to_bpc(nats)) == pytest.approx(6.0, rel=1e-6)
    assert nats_to_bpc(1.0) == pytest.approx(1.0 / math.log(2.0))
    assert nats_to_bpc(math.log(2.0)) == pytest.approx(1.0)


@pytest.mark.parametrize(
    "norm,invariant",
    [("layernorm", True), ("batchnorm_masked", True), ("none", True), ("batchnorm", False)],
)
def test_classifier_and_extra_padding(norm, invariant):
    """Only BatchNorm without the mask lets the amount of padding change the logits."""
    model = TransformerClassifier(VOCAB, 2, norm, d_model=16, num_heads=2, max_len=24)
    lengths = np.array([5, 9, 12])
    ids_short = np.zeros((3, 12), np.int32)
    for i, n in enumerate(lengths):
        ids_short[i, :n] = np.arange(n) % (VOCAB - 2) + 2
    mask_short = np.arange(12)[None] < lengths[:, None]
    ids_long = np.pad(ids_short, ((0, 0), (0, 12)))
    mask_long = np.pad(mask_short, ((0, 0), (0, 12)))
    variables = model.init(jax.random.key(0), ids_short, mask_short, train=False)
    short, _ = model.apply(variables, ids_short, mask_short, train=True, mutable=["batch_stats"])
    long, _ = model.apply(variables, ids_long, mask_long, train=True, mutable=["batch_stats"])
    diff = float(jnp.abs(short - long).max())
    if invariant:
        assert diff < 1e-5, diff
    else:
        assert diff > 1e-4, diff


def test_divergence_step():
    flat = np.linspace(4.0, 2.0, 50)
    assert divergence_step(flat, blowup_nats=1.0) is None
    with_nan = flat.copy()
    with_nan[30] = np.nan
    assert divergence_step(with_nan, blowup_nats=1.0) == 30
    blowup = np.concatenate([flat, np.full(20, 9.0)])
    step = divergence_step(blowup, blowup_nats=1.0)
    assert step is not None and 50 <= step < 55


def test_eval_windows_are_shifted_and_spread():
    ids = np.arange(1000, dtype=np.int32)
    x, y = eval_windows(ids, 10, limit=5)
    assert x.shape == y.shape == (5, 10)
    np.testing.assert_array_equal(y, x + 1)
    assert x[0, 0] == 0 and x[-1, 0] == 980  # first and last of the 99 windows
    with pytest.raises(ValueError, match="no window"):
        eval_windows(ids[:5], 10, limit=5)


def test_focus_ylim_shows_the_range_after_the_initial_drop():
    """The training-loss axis (charlm, powernorm_lm) spans where the curves spend their time:
    from the lowest value to the highest after the first 10% of points, padded by 5%."""
    from experiments.plotting import focus_ylim, pyplot

    steps = np.arange(100)
    fast = 2.3 + 3.0 * np.exp(-steps / 3.0)  # falls from 5.3 to 2.3 within the first steps
    slow = np.where(steps < 10, 6.0, 3.4 - 0.008 * (steps - 10))  # 3.4 at step 10, then down
    slow_with_nan = slow.copy()
    slow_with_nan[50] = np.nan  # a non-finite point is ignored
    plt = pyplot()
    fig, ax = plt.subplots()
    focus_ylim(ax, [fast, slow_with_nan])
    lo, hi = ax.get_ylim()
    plt.close(fig)
    want_lo = min(fast.min(), np.nanmin(slow))  # 2.3 + 3 e^(-99/3)
    want_hi = max(fast[10:].max(), slow[10:].max())  # 3.4
    span = want_hi - want_lo
    assert lo == pytest.approx(want_lo - 0.05 * span, abs=1e-12)
    assert hi == pytest.approx(want_hi + 0.05 * span, abs=1e-12)
    assert lo > 2.0 and hi < 3.6  # not from 0, not up to the first steps' 6.0
