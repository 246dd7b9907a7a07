"""Smoke tests of ``experiments.small_batch`` and ``experiments.powernorm_lm``, end to end.

Each test runs ``run`` in quick mode into ``tmp_path``, then ``plot`` and ``report`` from the
metric files, and checks that the outputs exist and hold sane numbers.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("matplotlib")
pytest.importorskip("optax")

from experiments.common import RunConfig, read_json  # noqa: E402
from experiments.powernorm_lm import EXPERIMENTS as POWERNORM_LM_EXPERIMENTS  # noqa: E402
from experiments.powernorm_lm import plot as plot_powernorm_lm  # noqa: E402
from experiments.powernorm_lm import report as report_powernorm_lm  # noqa: E402
from experiments.powernorm_lm import run as run_powernorm_lm  # noqa: E402
from experiments.small_batch import EXPERIMENTS as SMALL_BATCH_EXPERIMENTS  # noqa: E402
from experiments.small_batch import plot as plot_small_batch  # noqa: E402
from experiments.small_batch import report as report_small_batch  # noqa: E402
from experiments.small_batch import run as run_small_batch  # noqa: E402

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
