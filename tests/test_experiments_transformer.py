"""Tests of the ``qk_norm`` and ``dyt`` experiments: quick runs, LR sensitivity, QK-norm's bound,
DyT, loss spikes, and that figures and report sections read only the metrics files."""

from __future__ import annotations

import csv
import json
import math
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxnorm.linen as jnn
from experiments import __main__ as cli
from experiments import dyt as dyt_exp
from experiments import qk_norm as qk_exp
from experiments.common import read_json
from experiments.models_language import CharTransformer

VOCAB = 13


@pytest.fixture(scope="module")
def quick_out(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``python -m experiments qk_norm dyt --quick`` once for the module."""
    out = tmp_path_factory.mktemp("results")
    assert cli.main(["qk_norm", "dyt", "--quick", "--out", str(out), "--no-progress"]) == 0
    return out


def test_registered():
    reg = cli.registry()
    assert reg["qk_norm"].group == "language" and reg["dyt"].group == "language"


def test_qk_norm_quick_run(quick_out: Path):
    folder = quick_out / "qk_norm"
    for name in ("metrics.json", "lr_sweep.csv", "qk_norm_lr.png", "qk_norm_logits.png"):
        assert (folder / name).stat().st_size > 0, name
    m = read_json(folder / "metrics.json")
    c = qk_exp.QKNormConfig.quick()
    assert m["quick"] and m["provenance"]["packages"]["jax"] == jax.__version__
    n_lr = len(c.lrs)
    for v in c.variants:
        r = m["results"][v]
        final = np.asarray(r["final_eval_nats"], float)
        assert final.shape == (n_lr, c.seeds)
        assert np.all(np.isfinite(final)) and np.all(final > 0)
        init = np.asarray(r["init_eval_nats"], float)
        # A fresh model predicts close to uniformly over the vocabulary.
        assert np.all(np.abs(init - math.log(m["vocab_size"])) < 1.0)
        assert np.asarray(r["attn_logit_max"], float).shape == (n_lr, c.seeds, c.steps)
        assert np.asarray(r["train_loss"], float).shape == (n_lr, c.seeds, c.steps)
        # The stored LR sensitivity is the formula applied to the stored losses, per seed.
        capped = np.minimum(final, init[None, :])
        np.testing.assert_allclose(
            r["lr_sensitivity"], capped.mean(0) - capped.min(0), rtol=1e-12, atol=1e-12
        )
    # QK-layernorm keeps the logits near sqrt(head_dim) times the product of its gains (1 at
    # init); without it they are unbounded. Loose bound: a quick run moves the gains little.
    bound = math.sqrt(m["head_dim"])
    qk_max = np.asarray(m["results"]["layer"]["attn_logit_max"], float)
    assert qk_max[:, :, 0].max() <= bound + 1e-4
    with open(folder / "lr_sweep.csv", encoding="utf-8") as f:
        assert len(list(csv.DictReader(f))) == len(c.variants) * n_lr * c.seeds
    report = (quick_out / "REPORT.md").read_text()
    assert "`qk_norm`" in report and "LR sensitivity" in report


def test_dyt_quick_run(quick_out: Path):
    folder = quick_out / "dyt"
    for name in (
        "metrics.json",
        "final.csv",
        "speed.csv",
        "dyt_curves.png",
        "dyt_stability.png",
        "dyt_speed.png",
    ):
        assert (folder / name).stat().st_size > 0, name
    m = read_json(folder / "metrics.json")
    c = dyt_exp.DyTConfig.quick()
    for v in c.variants:
        r = m["results"][v]
        bpc = np.asarray(r["eval_bpc"], float)
        assert bpc.shape == (c.seeds,) and np.all(np.isfinite(bpc)) and np.all(bpc > 0)
        assert np.asarray(r["train_loss"], float).shape == (c.seeds, c.steps)
        assert len(r["divergence_step"]) == c.seeds + len(c.stability_lrs)
        assert m["step_speed"][v]["median_s"] > 0
        for per in m["norm_speed"].values():
            assert per[v]["q25_s"] <= per[v]["median_s"] <= per[v]["q75_s"]
    # Only DyT has alphas; they start at the variant's alpha_0 and are recorded per layer.
    assert m["results"]["layernorm"]["final_alpha"] == {}
    alphas = m["results"]["dyt:0.5"]["final_alpha"]
    assert len(alphas) == 2 * c.n_layers + 1  # two norms per block and the final one
    assert "`dyt`" in (quick_out / "REPORT.md").read_text()


def test_plots_and_reports_read_only_metrics(quick_out: Path, tmp_path: Path, monkeypatch):
    """With nothing but metrics.json on disk and training disabled, ``--plot-only`` rebuilds
    the figures and the same report sections; an edited number shows up in the report."""

    def no_training(*args, **kwargs):
        raise AssertionError("plot/report must not train")

    monkeypatch.setattr(qk_exp, "_train_variant", no_training)
    monkeypatch.setattr(dyt_exp, "train_interleaved", no_training)
    monkeypatch.setattr(dyt_exp, "time_norms", no_training)
    for name in ("qk_norm", "dyt"):
        (tmp_path / name).mkdir()
        shutil.copy(quick_out / name / "metrics.json", tmp_path / name / "metrics.json")
    assert cli.main(["qk_norm", "dyt", "--plot-only", "--out", str(tmp_path)]) == 0
    for name, pngs in (
        ("qk_norm", ("qk_norm_lr.png", "qk_norm_logits.png")),
        ("dyt", ("dyt_curves.png", "dyt_stability.png", "dyt_speed.png")),
    ):
        assert sorted(p.name for p in (tmp_path / name).iterdir()) == sorted(
            ["metrics.json", *pngs]
        )
    assert qk_exp.report(tmp_path / "qk_norm") == qk_exp.report(quick_out / "qk_norm")
    assert dyt_exp.report(tmp_path / "dyt") == dyt_exp.report(quick_out / "dyt")

    path = tmp_path / "qk_norm" / "metrics.json"
    m = json.loads(path.read_text())
    m["results"]["none"]["lr_sensitivity"] = [9.8765, 9.8765]
    path.write_text(json.dumps(m))
    assert "9.877 ± 0.000" in qk_exp.report(tmp_path / "qk_norm")


def test_lr_sensitivity_by_hand():
    # Capped at l_0 = 4: [3, 2, 4 (nan), 4 (5 > l_0)] -> mean 3.25, best 2.
    assert qk_exp.lr_sensitivity([3.0, 2.0, float("nan"), 5.0], 4.0) == pytest.approx(1.25)
    # +inf diverged as well; a sweep that is flat has sensitivity 0.
    assert qk_exp.lr_sensitivity([1.0, float("inf")], 3.0) == pytest.approx(1.0)
    assert qk_exp.lr_sensitivity([2.5, 2.5, 2.5], 4.0) == 0.0
    # Every rate diverged: all count as l_0, nothing to be sensitive about.
    assert qk_exp.lr_sensitivity([float("nan")] * 3, 4.0) == 0.0
    # Seven log-spaced rates, a U-shaped curve: (1.2 + 0.9 + 0.7 + 0.7 + 1.1 + 2 * 4.6) / 7 - 0.7.
    losses = [1.2, 0.9, 0.7, 0.7, 1.1, 7.0, float("nan")]
    assert qk_exp.lr_sensitivity(losses, 4.6) == pytest.approx(13.8 / 7 - 0.7)
    with pytest.raises(ValueError, match="lr_sensitivity"):
        qk_exp.lr_sensitivity([], 4.0)
    with pytest.raises(ValueError, match="lr_sensitivity"):
        qk_exp.lr_sensitivity([1.0], float("nan"))


def _np_layer_norm(x: np.ndarray, eps: float = 1e-6) -> np.ndarray:
    mu = x.mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(((x - mu) ** 2).mean(-1, keepdims=True) + eps)


def _np_attn_logit_max(variables: dict, ids: np.ndarray, heads: int, qk: bool) -> float:
    """Largest causal |q.k|/sqrt(head_dim) of block 0, in float64 NumPy (norms at init)."""
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), variables["params"])
    t = ids.shape[1]
    x = p["Embed_0"]["embedding"][ids] + p["pos_embed"][None, :t]
    h = _np_layer_norm(x)  # norm_attn_0 with its initial unit scale and zero bias
    qkv = h @ p["attn_0"]["Dense_0"]["kernel"]
    b, _, d3 = qkv.shape
    dh = d3 // 3 // heads
    qkv = qkv.reshape(b, t, 3, heads, dh)
    q, k = qkv[:, :, 0], qkv[:, :, 1]
    if qk:
        q = _np_layer_norm(q) * p["attn_0"]["q_norm_scale"]
        k = _np_layer_norm(k) * p["attn_0"]["k_norm_scale"]
    logits = np.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(dh)
    causal = np.tril(np.ones((t, t), bool))
    return float(np.abs(np.where(causal, logits, 0.0)).max())


@pytest.mark.parametrize("qk", [None, "layer"])
def test_attention_logits_bounded_only_with_qk_norm(qk):
    """Growing the q/k projection 100x multiplies the logits by 1e4 without QK-norm; with
    QK-layernorm they stay below sqrt(head_dim) (unit gains) and barely move."""
    heads, d = 2, 16
    model = CharTransformer(
        vocab_size=VOCAB, context=10, d_model=d, n_layers=1, n_heads=heads, mlp_ratio=2,
        norm="layernorm", qk_norm=qk,
    )  # fmt: skip
    ids = np.asarray(jax.random.randint(jax.random.key(3), (3, 10), 0, VOCAB))
    variables = model.init(jax.random.key(0), ids, False)

    def sown_max(v):
        _, inter = model.apply(v, ids, False, mutable=["intermediates"])
        return float(inter["intermediates"]["attn_0"]["attn_logit_max"][0])

    grown = jax.tree_util.tree_map_with_path(
        lambda path, a: a * 100.0 if "attn_0" in jax.tree_util.keystr(path) and a.ndim == 2 else a,
        variables,
    )
    before, after = sown_max(variables), sown_max(grown)
    for v, got in ((variables, before), (grown, after)):
        want = _np_attn_logit_max(v, ids, heads, qk is not None)
        assert got == pytest.approx(want, rel=1e-4)
    bound = math.sqrt(d // heads)
    if qk is None:
        assert after == pytest.approx(1e4 * before, rel=1e-4)
        assert after > 100 * bound
    else:
        assert before <= bound * (1 + 1e-5) and after <= bound * (1 + 1e-5)
        assert after == pytest.approx(before, rel=1e-3)


def test_sow_is_inert_unless_requested():
    """Without a mutable ``intermediates`` collection the attention output is the same and
    nothing is recorded (the committed ``powernorm_lm`` results use this model)."""
    model = CharTransformer(
        vocab_size=VOCAB, context=8, d_model=8, n_layers=1, n_heads=2, mlp_ratio=2, norm="none"
    )
    ids = jnp.ones((2, 8), jnp.int32)
    v = model.init(jax.random.key(0), ids, False)
    assert set(v) == {"params"}
    y0 = model.apply(v, ids, False)
    y1, inter = model.apply(v, ids, False, mutable=["intermediates"])
    np.testing.assert_array_equal(y0, y1)
    assert "attn_logit_max" in inter["intermediates"]["attn_0"]


def test_dyt_layer_is_the_formula():
    x = np.asarray(jax.random.normal(jax.random.key(0), (2, 5, 6)), np.float32) * 3
    layer = jnn.DyT(alpha_init=0.7)  # the model's DyT
    v = layer.init(jax.random.key(1), x)
    assert float(v["params"]["alpha"]) == pytest.approx(0.7)
    scale = np.linspace(0.5, 2.0, 6).astype(np.float32)
    bias = np.linspace(-1.0, 1.0, 6).astype(np.float32)
    v = {"params": {"alpha": jnp.float32(0.7), "scale": scale, "bias": bias}}
    want = scale * np.tanh(0.7 * x.astype(np.float64)) + bias
    np.testing.assert_allclose(layer.apply(v, x), want, rtol=1e-5, atol=1e-6)


def test_char_transformer_dyt_alpha_init():
    model = CharTransformer(
        vocab_size=VOCAB, context=8, d_model=8, n_layers=2, n_heads=2, mlp_ratio=2, norm="dyt",
        dyt_alpha=0.2,
    )  # fmt: skip
    params = model.init(jax.random.key(0), jnp.ones((1, 8), jnp.int32), False)["params"]
    alphas = [
        float(a)
        for path, a in jax.tree_util.tree_leaves_with_path(params)
        if path[-1].key == "alpha"
    ]
    assert alphas == pytest.approx([0.2] * 5)  # 2 per block + final


def test_loss_spikes_by_hand():
    # Width 4: step 4 (3.0 > mean 1.0 + 0.5) spikes; step 5 (1.0 vs mean 1.5) and 6 do not;
    # the search stops at the NaN of step 7.
    losses = [1.0, 1.0, 1.0, 1.0, 3.0, 1.0, 1.0, float("nan"), 9.0]
    assert dyt_exp.loss_spikes(losses, width=4, threshold=0.5) == 1
    assert dyt_exp.loss_spikes(losses, width=4, threshold=2.5) == 0
    assert dyt_exp.loss_spikes([5.0, 1.0], width=4, threshold=0.5) == 0


def test_variant_names():
    assert dyt_exp.parse_variant("dyt:0.5") == ("dyt", 0.5)
    assert dyt_exp.parse_variant("none") == ("none", None)
    assert dyt_exp.variant_label("dyt:1.0") == "DyT (α₀ = 1)"
    for bad in ("dyt", "dyt:x", "batchnorm", "LayerNorm"):
        with pytest.raises(ValueError, match="unknown variant"):
            dyt_exp.parse_variant(bad)
