"""Tests of the vision experiments (init_sweep, lr_sweep, overfit, cnn_norms) and models_vision.

Every vision experiment runs once in ``--quick`` mode through the real entry point
(``experiments.__main__.main``) into a temporary folder; the tests then check the metric
files, tables, figures and report sections it left there. The init-sweep program (jit + vmap
over init scales + scans) is compared with an independent reference: a plain Python loop of
SGD steps with a hand-written MLP and hand-written batch normalization; the chunked training
the experiments run (one jitted call per block, so a progress bar can advance) is compared
bit for bit with the one-scan program. The progress bar itself is checked on fake terminals.
"""

from __future__ import annotations

import csv
import functools
import gzip
import importlib.metadata
import io
import math
import os
import platform
import re
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import cnn_norms, common, init_sweep, lr_sweep, overfit
from experiments import models_vision as mv
from experiments.__main__ import main
from experiments.common import ProgressBar, RunConfig, progress, read_json, write_metrics
from experiments.mlp_training import merge_chunks, mlp_train_chunk
from experiments.plotting import legend_below, pyplot
from experiments.training import even_chunks

NAMES = ("init_sweep", "lr_sweep", "overfit", "cnn_norms")
EXPERIMENTS = [e for m in (init_sweep, lr_sweep, overfit, cnn_norms) for e in m.EXPERIMENTS]


@pytest.fixture(scope="module")
def quick_out(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One quick run of every vision experiment (shared: compiling dominates the cost)."""
    out = tmp_path_factory.mktemp("vision")
    assert main([*NAMES, "--quick", "--out", str(out), "--no-progress"]) == 0
    return out


def _in_unit_interval(values) -> bool:
    v = np.asarray(values, dtype=float)
    return bool(np.all((v >= 0) & (v <= 1)))


def test_registry_names() -> None:
    assert [e.name for e in EXPERIMENTS] == list(NAMES)
    assert {e.group for e in EXPERIMENTS} == {"vision"}


@pytest.mark.parametrize("name", NAMES)
def test_outputs_exist_and_report_states_claim(quick_out: Path, name: str) -> None:
    folder = quick_out / name
    assert (folder / "metrics.json").is_file()
    assert list(folder.glob("*.csv")), "a CSV table"
    pngs = list(folder.glob("*.png"))
    assert pngs and all(p.stat().st_size > 1000 for p in pngs)
    m = read_json(folder / "metrics.json")
    assert "config" in m and m["wall_s"] > 0
    section = EXPERIMENTS[NAMES.index(name)].report(folder)
    assert "**Claim.**" in section and "**Verdict" in section
    assert f"python -m experiments {name}" in section
    report = (quick_out / "REPORT.md").read_text(encoding="utf-8")
    assert section.splitlines()[0] in report


def _git(*args: str) -> subprocess.CompletedProcess:
    root = Path(__file__).resolve().parent.parent
    return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, check=False)


@pytest.mark.parametrize("name", NAMES)
def test_metrics_record_commit_versions_and_machine(quick_out: Path, name: str) -> None:
    prov = read_json(quick_out / name / "metrics.json")["provenance"]
    want = {p: importlib.metadata.version(p) for p in ("jax", "jaxlib", "flax", "numpy", "optax")}
    assert prov["packages"] == want
    assert prov["machine"]["cpu_count"] == os.cpu_count()
    assert prov["machine"]["platform"] == platform.platform()
    assert prov["python"] == platform.python_version()
    if _git("rev-parse", "HEAD").returncode != 0:
        pytest.skip("not a git checkout")
    # Others may commit while the tests run: the recorded commit must be HEAD or before it.
    assert re.fullmatch(r"[0-9a-f]{40}", prov["git_commit"])
    assert _git("merge-base", "--is-ancestor", prov["git_commit"], "HEAD").returncode == 0
    assert isinstance(prov["git_dirty"], bool)


def test_write_metrics_refuses_a_provenance_key_of_its_own(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="already hold a 'provenance' entry"):
        write_metrics(tmp_path, {"provenance": "mine"})
    path = write_metrics(tmp_path, {"config": {"a": 1}})
    assert read_json(path)["config"] == {"a": 1}


def test_init_sweep_outputs(quick_out: Path) -> None:
    folder = quick_out / "init_sweep"
    m = read_json(folder / "metrics.json")
    c = init_sweep.InitSweepConfig.quick()
    assert c == init_sweep.InitSweepConfig(**m["config"])
    np.testing.assert_allclose(m["stds"], c.stds(), rtol=1e-6)
    assert m["stds"][0] == pytest.approx(c.std_max) and m["stds"][-1] == pytest.approx(c.std_min)
    for variant in ("plain", "bn"):
        r = m[variant]
        assert np.shape(r["train_acc"]) == (c.n_stds, c.epochs)
        assert np.shape(r["train_loss"]) == (c.n_stds, c.epochs)
        assert np.shape(r["diverged"]) == (c.n_stds,)
        assert _in_unit_interval(r["train_acc"]) and _in_unit_interval(r["eval_acc"])
    assert m["n_runs"] == 2 * c.n_stds
    assert m["compile_s"] > 0 and m["run_s"] > 0
    assert m["sweep_s"] == pytest.approx(m["compile_s"] + m["run_s"])
    with open(folder / "final.csv", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == c.n_stds
    assert float(rows[0]["train_acc_bn"]) == pytest.approx(m["bn"]["train_acc"][0][-1])
    assert "Batch normalization makes training far less sensitive" in init_sweep.report(folder)


def test_lr_sweep_outputs(quick_out: Path) -> None:
    m = read_json(quick_out / "lr_sweep" / "metrics.json")
    c = lr_sweep.LRSweepConfig.quick()
    lrs = np.array(m["lrs"])
    assert len(lrs) == c.n_lrs and np.all(np.diff(lrs) > 0)
    assert lrs[0] == pytest.approx(c.lr_min) and lrs[-1] == pytest.approx(c.lr_max)
    for variant in ("plain", "bn"):
        r = m[variant]
        assert np.shape(r["train_acc"]) == (c.seeds, c.n_lrs)
        assert np.shape(r["diverged"]) == (c.seeds, c.n_lrs)
        assert _in_unit_interval(r["train_acc"]) and _in_unit_interval(r["eval_acc"])
        # A run without divergence has finite losses; a diverged one is flagged, not dropped.
        loss = np.array(r["train_loss"], dtype=float)
        assert np.all(np.isfinite(loss[~np.array(r["diverged"])]))
    with open(quick_out / "lr_sweep" / "runs.csv", encoding="utf-8") as f:
        assert len(list(csv.DictReader(f))) == 2 * c.seeds * c.n_lrs
    assert "larger learning rates" in lr_sweep.report(quick_out / "lr_sweep")


def test_overfit_outputs(quick_out: Path) -> None:
    m = read_json(quick_out / "overfit" / "metrics.json")
    c = overfit.OverfitConfig.quick()
    assert set(m["variants"]) == {"plain", "bn", "dropout"}
    assert m["eval_epochs"] == list(range(c.eval_every, c.epochs + 1, c.eval_every))
    for variant in m["variants"]:
        r = m[variant]
        assert np.shape(r["train_acc"]) == (c.seeds, c.epochs // c.eval_every)
        assert _in_unit_interval(r["train_acc"]) and _in_unit_interval(r["eval_acc"])
    section = overfit.report(quick_out / "overfit")
    assert "regularizes" in section and "gap" in section


def test_cnn_norms_outputs(quick_out: Path) -> None:
    m = read_json(quick_out / "cnn_norms" / "metrics.json")
    c = cnn_norms.CNNNormsConfig.quick()
    assert m["norms"] == list(mv.NORMS)
    r = m["datasets"]["mnist"]
    assert r["eval_steps"] == [c.steps // c.n_evals * (k + 1) for k in range(c.n_evals)]
    for norm in mv.NORMS:
        assert np.shape(r[norm]["eval_acc"]) == (c.seeds, c.n_evals)
        assert _in_unit_interval(r[norm]["eval_acc"])
        assert np.all(np.array(r[norm]["eval_loss"]) > 0)
    with open(quick_out / "cnn_norms" / "final.csv", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert [row["norm"] for row in rows] == list(mv.NORMS)
    assert (quick_out / "cnn_norms" / "cnn_norms_mnist.png").is_file()


def test_plot_only_rebuilds_figures_from_metrics(quick_out: Path) -> None:
    png = quick_out / "init_sweep" / "init_sweep.png"
    png.unlink()
    assert main(["init_sweep", "--plot-only", "--out", str(quick_out), "--no-progress"]) == 0
    assert png.is_file()


@pytest.mark.parametrize("seeds", ["0", "-2"])
def test_seeds_below_one_are_refused(tmp_path: Path, capsys, seeds: str) -> None:
    with pytest.raises(SystemExit):
        main(["init_sweep", "--plot-only", "--seeds", seeds, "--out", str(tmp_path)])
    assert f"--seeds must be >= 1, got {seeds}" in capsys.readouterr().err


def test_data_dir_reaches_the_loader(tmp_path: Path) -> None:
    """``--data-dir`` (RunConfig.data_dir) makes the experiments read IDX files from there."""
    rng = np.random.default_rng(0)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (30, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte": rng.integers(0, 10, (30,), dtype=np.uint8),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (7, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": rng.integers(0, 10, (7,), dtype=np.uint8),
    }
    for name, a in arrays.items():
        header = (0x0800 | a.ndim).to_bytes(4, "big")
        header += b"".join(d.to_bytes(4, "big") for d in a.shape)
        (tmp_path / f"{name}.gz").write_bytes(gzip.compress(header + a.tobytes()))
    images = RunConfig(out_dir=tmp_path, data_dir=str(tmp_path)).mnist()
    np.testing.assert_array_equal(images.x_train, arrays["train-images-idx3-ubyte"])
    np.testing.assert_array_equal(images.y_test, arrays["t10k-labels-idx1-ubyte"])


# ---------------------------------------------------------------------------------------------
# The vmapped init-sweep program against an independent, unvmapped reference
# ---------------------------------------------------------------------------------------------


def _reference_run(x, y, x_test, y_test, order, unit_params, std, *, use_bn, lr, momentum):
    """Plain-Python SGD on a hand-written MLP with hand-written BN (no vmap, no scan)."""
    ws = [np.asarray(layer["w"]) * std for layer in unit_params["dense"]]
    bs = [np.asarray(layer["b"]) for layer in unit_params["dense"]]
    n_hidden = len(ws) - 1
    params = {
        "w": [jnp.asarray(w) for w in ws],
        "b": [jnp.asarray(b) for b in bs],
        "g": [jnp.ones(w.shape[1]) for w in ws[:-1]],
        "beta": [jnp.zeros(w.shape[1]) for w in ws[:-1]],
    }
    run_mean = [np.zeros(w.shape[1], np.float32) for w in ws[:-1]]
    run_var = [np.ones(w.shape[1], np.float32) for w in ws[:-1]]

    def forward(p, xb, training, means=None, vars_=None):
        h, batch_moments = xb, []
        for i in range(n_hidden):
            h = h @ p["w"][i] + p["b"][i]
            if use_bn:
                if training:
                    mu, var = h.mean(0), ((h - h.mean(0)) ** 2).mean(0)
                    batch_moments.append((mu, var))
                else:
                    mu, var = means[i], vars_[i]
                h = (h - mu) / jnp.sqrt(var + 1e-5) * p["g"][i] + p["beta"][i]
            h = jnp.maximum(h, 0.0)
        return h @ p["w"][-1] + p["b"][-1], batch_moments

    def loss(p, xb, yb):
        logits, moments = forward(p, xb, True)
        logp = jax.nn.log_softmax(logits)
        return -jnp.mean(logp[jnp.arange(len(yb)), yb]), moments

    # jit only to keep the test fast: each step is still one separate, unvmapped call.
    grad_fn = jax.jit(jax.value_and_grad(loss, has_aux=True))
    eval_fn = jax.jit(lambda p, xs, means, vars_: forward(p, xs, False, means, vars_)[0])

    def accuracy(p, xs, ys):
        logits = eval_fn(p, xs, run_mean, run_var)
        return float(np.mean(np.argmax(np.asarray(logits), -1) == np.asarray(ys)))

    epoch_losses, train_acc, eval_acc = [], [], []
    for epoch_idx in order.reshape(order.shape[0], -1, order.shape[-1]):
        losses = []
        for idx in epoch_idx:
            (value, moments), grads = grad_fn(params, x[idx], y[idx])
            params = jax.tree.map(lambda a, g: a - lr * g, params, grads)
            for i, (mu, var) in enumerate(moments):
                run_mean[i] = momentum * run_mean[i] + (1 - momentum) * np.asarray(mu)
                run_var[i] = momentum * run_var[i] + (1 - momentum) * np.asarray(var)
            losses.append(float(value))
        epoch_losses.append(np.mean(losses))
        train_acc.append(accuracy(params, x, y))
        eval_acc.append(accuracy(params, x_test, y_test))
    return np.array(epoch_losses), np.array(train_acc), np.array(eval_acc)


@pytest.fixture(scope="module")
def sweep_case() -> dict:
    """A small init sweep (3 scales x {plain, BN}) on separable synthetic data, run once."""
    rng = np.random.default_rng(1)
    n, d = 96, 20
    centers = rng.normal(size=(4, d)).astype(np.float32)
    y = rng.integers(0, 4, n).astype(np.int32)
    x = (centers[y] + 0.7 * rng.normal(size=(n, d))).astype(np.float32)
    data = mv.ArrayData(jnp.asarray(x), jnp.asarray(y), jnp.asarray(x[:40]), jnp.asarray(y[:40]))
    spec = mv.MLPSpec(depth=3, hidden=16, num_classes=4, bn_momentum=0.9)
    lr, epochs = 0.1, 3
    order = mv.minibatch_order(0, n, epochs=epochs, batch_size=16)
    stds = jnp.asarray([1.0, 0.3, 0.05], jnp.float32)
    unit = mv.init_sweep_unit_inits(jax.random.key(0), d, spec)
    out = jax.jit(mv.make_init_sweep_program(spec, lr))(data, jnp.asarray(order), unit, stds)
    return {"x": x, "y": y, "order": order, "unit": unit, "stds": stds, "lr": lr, "out": out}


@pytest.mark.parametrize("variant", ["plain", "bn"])
def test_init_sweep_program_matches_unvmapped_reference(sweep_case: dict, variant: str) -> None:
    c = sweep_case
    x, y, n = c["x"], c["y"], len(c["y"])
    out = c["out"][variant]
    k = 1  # one scale, taken from the vmapped batch
    ref_loss, ref_train, ref_eval = _reference_run(
        x, y, x[:40], y[:40], c["order"], c["unit"][variant][0], float(c["stds"][k]),
        use_bn=variant == "bn", lr=c["lr"], momentum=0.9,
    )  # fmt: skip
    np.testing.assert_allclose(np.asarray(out["train_loss"][k]), ref_loss, rtol=2e-4, atol=1e-5)
    np.testing.assert_allclose(np.asarray(out["train_acc"][k]), ref_train, atol=1.5 / n)
    np.testing.assert_allclose(np.asarray(out["eval_acc"][k]), ref_eval, atol=1.5 / 40)
    assert not bool(out["diverged"][k])
    # The sweep really differs across scales (the vmapped axis is not broadcast by mistake).
    assert not math.isclose(float(out["train_loss"][0][-1]), float(out["train_loss"][2][-1]))


def test_minibatch_order_is_a_permutation_per_epoch() -> None:
    order = mv.minibatch_order(3, 50, epochs=4, batch_size=10, epochs_per_block=2)
    assert order.shape == (2, 2, 5, 10)
    for epoch in order.reshape(4, -1):
        assert sorted(epoch.tolist()) == list(range(50))
    with pytest.raises(ValueError, match="multiple"):
        mv.minibatch_order(3, 50, epochs=3, batch_size=10, epochs_per_block=2)


def test_scale_weights_keeps_biases_and_bn() -> None:
    spec = mv.MLPSpec(depth=2, hidden=4, use_bn=True)
    params, stats = mv.init_mlp(jax.random.key(0), 3, spec, 1.0)
    scaled = mv.scale_weights(params, 0.5)
    for a, b in zip(params["dense"], scaled["dense"], strict=True):
        np.testing.assert_allclose(b["w"], 0.5 * a["w"])
        np.testing.assert_array_equal(b["b"], a["b"])
    assert scaled["bn"] is params["bn"] and len(stats) == 2


# ---------------------------------------------------------------------------------------------
# Chunked training (a jitted call per block) against the one-scan program, bit for bit
# ---------------------------------------------------------------------------------------------


def _assert_identical(got: dict, want: dict) -> None:
    """Same keys, shapes, dtypes and bits (NaN equal to NaN)."""
    assert set(got) == set(want)
    for k in want:
        a, b = np.asarray(got[k]), np.asarray(want[k])
        assert a.shape == b.shape and a.dtype == b.dtype, (k, a.shape, b.shape, a.dtype, b.dtype)
        np.testing.assert_array_equal(a, b, err_msg=k)


def test_init_sweep_chunks_equal_the_one_scan_program(sweep_case: dict) -> None:
    """What ``init_sweep.run`` computes (one call per epoch) is the one-scan program's output."""
    c = sweep_case
    n = len(c["y"])
    data = mv.ArrayData(*(jnp.asarray(a) for a in (c["x"], c["y"], c["x"][:40], c["y"][:40])))
    spec = mv.MLPSpec(depth=3, hidden=16, num_classes=4, bn_momentum=0.9)
    order = jnp.asarray(c["order"])
    chunk = jax.jit(init_sweep.make_init_sweep_chunk(spec, c["lr"]))
    state = init_sweep.init_sweep_state(c["unit"], c["stds"])
    steps_per_block = order.shape[1] * order.shape[2]
    parts = []
    for k in range(order.shape[0]):
        count = jnp.asarray(k * steps_per_block, jnp.int32)
        state, metrics = chunk(data, state, count, order[k : k + 1])
        parts.append(jax.device_get(metrics))
    got = merge_chunks(parts)
    assert order.shape[0] == 3 and n == 96
    for variant in ("plain", "bn"):
        _assert_identical(got[variant], jax.device_get(c["out"][variant]))


@pytest.mark.parametrize("per", ["block", "epoch"])
def test_mlp_chunks_with_bn_and_dropout_equal_train_mlp(per: str) -> None:
    """Chunks of whole blocks, or of single epochs evaluated only where a block ends (as
    ``lr_sweep`` runs), give ``train_mlp``'s metrics bit for bit, dropout masks included."""
    rng = np.random.default_rng(2)
    n, d, seeds = 64, 12, 2
    x = rng.normal(size=(n, d)).astype(np.float32)
    y = rng.integers(0, 3, n).astype(np.int32)
    data = mv.ArrayData(jnp.asarray(x), jnp.asarray(y), jnp.asarray(x[:24]), jnp.asarray(y[:24]))
    spec = mv.MLPSpec(depth=2, hidden=8, use_bn=True, dropout=0.25, num_classes=3)
    blocks, epb = 2, 2
    orders = jnp.asarray(
        np.stack(
            [
                mv.minibatch_order(s, n, epochs=blocks * epb, batch_size=16, epochs_per_block=epb)
                for s in range(seeds)
            ]
        )
    )  # (seeds, blocks, epb, steps, batch)
    params, stats = mv.init_mlp_seeds(jax.random.split(jax.random.key(3), seeds), d, spec, None)
    keys = jax.random.split(jax.random.key(4), seeds)
    lr = 0.05

    def whole(order, params, stats, key):
        return mv.train_mlp(data, order, params, stats, lr, key, spec=spec)

    want = jax.device_get(jax.jit(jax.vmap(whole))(orders, params, stats, keys))

    def chunk(params, stats, count, order, key, *, evaluate):
        return mlp_train_chunk(
            data, params, stats, count, order, lr, key, spec=spec, evaluate=evaluate
        )

    runs = {
        evaluate: jax.jit(jax.vmap(functools.partial(chunk, evaluate=evaluate), (0, 0, None, 0, 0)))
        for evaluate in (False, True)
    }
    steps = orders.shape[3]
    if per == "block":
        slices = [(orders[:, k : k + 1], True) for k in range(blocks)]
        step_counts = [k * epb * steps for k in range(blocks)]
    else:
        flat = orders.reshape(seeds, blocks * epb, 1, *orders.shape[3:])
        slices = [(flat[:, e : e + 1], (e + 1) % epb == 0) for e in range(blocks * epb)]
        step_counts = [e * steps for e in range(blocks * epb)]
    parts = []
    for (order, evaluate), count in zip(slices, step_counts, strict=True):
        count = jnp.asarray(count, jnp.int32)
        params, stats, metrics = runs[evaluate](params, stats, count, order, keys)
        parts.append(jax.device_get(metrics))
    got = merge_chunks(parts)
    _assert_identical(got, want)
    # The dropout masks differ per step: a chunk that restarted the step count would not.
    assert not np.array_equal(want["train_loss"][:, 0], want["train_loss"][:, 1])


def test_merge_chunks_ors_divergence_over_chunks() -> None:
    no, yes = np.array([[False], [False]]), np.array([[False], [True]])
    parts = [
        {"v": {"train_loss": np.array([[1.0], [2.0]]), "nonfinite": no}},
        {"v": {"train_loss": np.array([[3.0], [np.nan]]), "nonfinite": yes}},
    ]
    got = merge_chunks(parts)["v"]
    np.testing.assert_array_equal(got["train_loss"], [[1.0, 3.0], [2.0, np.nan]])
    np.testing.assert_array_equal(got["diverged"], [False, True])
    assert set(got) == {"train_loss", "diverged"}


@pytest.mark.parametrize("total", [1, 2, 7, 12, 64, 97, 160, 10240])
def test_even_chunks_is_the_largest_divisor_up_to_the_limit(total: int) -> None:
    want = max(d for d in range(1, 21) if total % d == 0)  # brute force
    assert even_chunks(total, 20) == want
    with pytest.raises(ValueError, match="must both be >= 1"):
        even_chunks(0, 20)


# ---------------------------------------------------------------------------------------------
# Progress bars: nothing off a terminal or when disabled; count, rate and ETA on one
# ---------------------------------------------------------------------------------------------


class _Terminal(io.StringIO):
    """A stream that says it is a terminal."""

    def isatty(self) -> bool:
        return True


class _Clock:
    """A fake ``time.perf_counter`` that moves only when told."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_progress_writes_nothing_off_a_terminal_or_when_disabled(monkeypatch) -> None:
    for stream, enabled in ((io.StringIO(), True), (_Terminal(), False)):
        monkeypatch.setattr(sys, "stderr", stream)
        with ProgressBar(3, desc="x", enabled=enabled) as bar:
            bar.update(2)
            print("a line")
            bar.update(1)
        assert list(progress([1, 2, 3], desc="y", enabled=enabled)) == [1, 2, 3]
        assert stream.getvalue() == ""
        assert not isinstance(sys.stdout, common._BarAwareStdout)


def test_progress_bar_shows_count_rate_and_eta_on_a_terminal(monkeypatch) -> None:
    clock = _Clock()
    monkeypatch.setattr(common.time, "perf_counter", clock)
    out = _Terminal()
    bar = ProgressBar(10, desc="sweep", unit="epoch", stream=out, min_interval=0.0)
    clock.now += 30.0  # compiling: before the first update, left out of the rate
    bar.update(1)
    clock.now += 4.0
    bar.update(2)  # 2 epochs in 4 s since the first update: 0.5 epoch/s, 7 left -> 14 s
    line = out.getvalue().split("\r\033[K")[-1]
    assert line == "sweep  30%|######              | 3/10 epoch [0:34<0:14, 2 s/epoch]"
    clock.now += 14.0
    bar.update(7)  # reaching the total closes the bar and leaves its final line
    final = out.getvalue().split("\r\033[K")[-1]  # 9 epochs in 18 s since the first update
    assert final == "sweep 100%|####################| 10/10 epoch [0:48, 2 s/epoch]\n"
    written = out.getvalue()
    bar.close()  # a second close writes nothing more
    assert out.getvalue() == written


def test_print_during_a_bar_starts_on_a_clean_line(monkeypatch) -> None:
    err, out = _Terminal(), _Terminal()
    monkeypatch.setattr(sys, "stderr", err)
    monkeypatch.setattr(sys, "stdout", out)
    with ProgressBar(2, desc="bar", min_interval=0.0) as bar:
        bar.update(1)
        drawn = len(err.getvalue())
        print("row 1")
        # The bar's line was cleared before the text, and the bar drawn again after it.
        assert err.getvalue()[drawn:].startswith("\r\033[K")
        assert "bar  50%" in err.getvalue()[drawn:]
        bar.update(1)
    assert out.getvalue() == "row 1\n"
    assert sys.stdout is out  # restored when the bar closed


def test_progress_counts_an_item_when_the_next_is_asked_for(monkeypatch) -> None:
    clock = _Clock()
    monkeypatch.setattr(common.time, "perf_counter", clock)
    out = _Terminal()
    it = progress(range(3), desc="it", stream=out)
    assert "0/3" in out.getvalue()  # drawn as soon as it is made
    assert next(it) == 0 and "1/3" not in out.getvalue()
    clock.now += 1.0  # the work on item 0
    assert next(it) == 1 and "1/3" in out.getvalue()
    clock.now += 1.0
    assert list(it) == [2] and out.getvalue().endswith("\n") and "3/3" in out.getvalue()


def test_legend_below_covers_no_data() -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5, 4))
    for i in range(7):
        ax.plot(np.arange(10), np.arange(10) * (i + 1), label=f"curve {i}")
    legend = legend_below(ax)
    fig.tight_layout()
    fig.canvas.draw()
    box, axes_box = legend.get_window_extent(), ax.get_window_extent()
    plt.close(fig)
    assert box.y1 <= axes_box.y0  # entirely under the plotting area
    assert [t.get_text() for t in legend.get_texts()] == [f"curve {i}" for i in range(7)]
