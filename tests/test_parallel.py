"""experiments/parallel.py: data-parallel training with synchronized BatchNorm.

On the 8 virtual CPU devices of tests/conftest.py: the 8-device run follows the
1-device run on the same global batches, with and without uneven per-device masks,
to float32 rounding (tolerance: 1e-5 relative on every step's loss, 1e-5 absolute on
the final parameters); and one sharded step equals an independent reference, flax's
own BatchNorm on the valid examples alone, on one device.
"""

from __future__ import annotations

import csv
from pathlib import Path

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from experiments import parallel
from experiments.__main__ import _MODULES
from experiments.common import RunConfig, read_json

DEVICES = 8
REL_TOL = 1e-5  # per-step loss, relative: float32 sums in another order

pytestmark = pytest.mark.skipif(
    jax.device_count() < DEVICES, reason="needs 8 devices (XLA_FLAGS in tests/conftest.py)"
)


@pytest.fixture(scope="module")
def quick_out(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One quick run, then its plot (compiling dominates the cost).

    The registry entry's functions are called directly: ``experiments.__main__.main``
    imports every registered module, and this test should not depend on the others.
    """
    out = tmp_path_factory.mktemp("parallel")
    (exp,) = parallel.EXPERIMENTS
    exp.run(RunConfig(out_dir=out, quick=True, devices=DEVICES, progress=False))
    exp.plot(out / parallel.NAME)
    return out


def _metrics(out: Path) -> dict:
    return read_json(out / parallel.NAME / "metrics.json")


def test_registered_with_the_experiments_cli():
    assert "experiments.parallel" in _MODULES
    assert [e.name for e in parallel.EXPERIMENTS] == ["data_parallel"]


@pytest.mark.parametrize("kind", ["sync", "masked"])
def test_eight_devices_follow_one_device_on_the_same_global_batches(quick_out, kind):
    m = _metrics(quick_out)
    assert m["devices"] == DEVICES
    got = np.asarray(m["runs"][f"{kind}_{DEVICES}"]["train_loss"])
    want = np.asarray(m["runs"][f"{kind}_1"]["train_loss"])
    assert got.shape == want.shape == (parallel.DataParallelConfig.quick().steps,)
    np.testing.assert_allclose(got, want, rtol=REL_TOL, atol=0)
    assert want[-1] < want[0]  # it trains
    cmp = m["comparisons"][f"{kind}_{DEVICES}"]
    assert cmp["max_rel_loss_diff"] <= REL_TOL
    assert cmp["max_abs_param_diff"] <= 1e-5
    assert cmp["max_abs_batch_stats_diff"] <= 1e-4  # running var ~ O(10) in layer 1


def test_masks_are_uneven_and_change_the_run(quick_out):
    m = _metrics(quick_out)
    assert m["masked_valid_per_device"] == [8, 7, 6, 5, 4, 3, 2, 1]
    masked, full = (np.asarray(m["runs"][k]["train_loss"]) for k in ("masked_1", "sync_1"))
    assert np.max(np.abs(masked - full)) > 1e-3


def test_per_device_batch_norm_is_a_different_model(quick_out):
    """The control: without axis_name each device normalizes by its own 8 examples."""
    cmp = _metrics(quick_out)["comparisons"][f"local_{DEVICES}"]
    assert cmp["max_rel_loss_diff"] > 1e-2


def test_files_plot_and_report(quick_out):
    folder = quick_out / parallel.NAME
    png = folder / "data_parallel.png"
    assert png.is_file() and png.stat().st_size > 1000
    with open(folder / "losses.csv", encoding="utf-8") as f:
        rows = list(csv.reader(f))
    assert rows[0][:3] == ["step", "sync_1", "masked_1"]
    assert len(rows) == 1 + parallel.DataParallelConfig.quick().steps
    section = parallel.report(folder)
    assert "**Claim.**" in section and "**Verdict.** Confirmed" in section
    assert "python -m experiments data_parallel --devices 8" in section
    assert "masked_8 | 8 |" in section and "(reference)" in section


def test_one_sharded_step_equals_flax_batch_norm_on_the_valid_examples():
    """Independent reference: flax.linen.BatchNorm, one device, masked-out rows removed."""
    config = parallel.DataParallelConfig.quick()
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((64, 12)) * 2 + 1, jnp.float32)
    y = jnp.asarray(rng.integers(0, 10, 64), jnp.int32)
    valid = parallel.uneven_mask(64, DEVICES)
    model = parallel.MLP((16, 8), config.bn_momentum, parallel.AXIS)
    tx = optax.sgd(0.1, momentum=0.9)
    v = model.init(jax.random.key(0), x[:2], train=False)
    state = {
        "params": v["params"],
        "batch_stats": v["batch_stats"],
        "opt_state": tx.init(v["params"]),
    }
    chunk = parallel.make_train_chunk(model, tx, DEVICES)
    idx = jnp.arange(64)[None]
    new, loss = chunk(state, x, y, idx, jnp.asarray(valid)[None])

    class FlaxMLP(nn.Module):
        @nn.compact
        def __call__(self, x):
            for w in (16, 8):
                x = nn.relu(nn.BatchNorm(use_running_average=False, momentum=0.9)(nn.Dense(w)(x)))
            return nn.Dense(10)(x)

    xv, yv = x[valid], y[valid]

    def ref_loss(params):
        logits, upd = FlaxMLP().apply(
            {"params": params, "batch_stats": v["batch_stats"]}, xv, mutable=["batch_stats"]
        )
        return optax.softmax_cross_entropy_with_integer_labels(logits, yv).mean(), upd

    @jax.jit  # eager dispatch would compile every operation separately
    def ref_step(params, opt_state):
        (ref, upd), grads = jax.value_and_grad(ref_loss, has_aux=True)(params)
        updates, _ = tx.update(grads, opt_state, params)
        return ref, upd, optax.apply_updates(params, updates)

    ref, upd, ref_params = ref_step(v["params"], state["opt_state"])
    tol = dict(atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(loss[0], ref, **tol)
    chex.assert_trees_all_close(new["params"], ref_params, **tol)
    chex.assert_trees_all_close(new["batch_stats"], upd["batch_stats"], **tol)


def test_uneven_mask_counts():
    mask = parallel.uneven_mask(32, 4)
    assert mask.reshape(4, 8).sum(1).tolist() == [8, 7, 6, 5]
    assert parallel.uneven_mask(8, 8).all()  # one example per device: nothing to drop


def test_devices_must_divide_the_global_batch(tmp_path):
    cfg = RunConfig(out_dir=tmp_path, quick=True, devices=3, progress=False)
    with pytest.raises(ValueError, match="global batch of 64 examples does not split over 3"):
        parallel.run(cfg)


def test_processes_launch_a_jax_distributed_group_that_follows_one_device(tmp_path):
    """``--processes 2 --devices 4``: 2 local processes of 2 CPU devices each, joined by
    jax.distributed; the 4-device runs span both and follow the 1-device runs."""
    cfg = RunConfig(out_dir=tmp_path, quick=True, devices=4, processes=2, progress=False)
    parallel.run(cfg)
    m = read_json(tmp_path / parallel.NAME / "metrics.json")
    assert m["processes"] == 2 and m["devices"] == 4
    for kind in ("sync", "masked"):
        c = m["comparisons"][f"{kind}_4"]
        assert c["max_rel_loss_diff_early"] <= REL_TOL, (kind, c)
    # Control: per-device BatchNorm across the processes is a different model.
    assert m["comparisons"]["local_4"]["max_rel_loss_diff_early"] > 1e-3


def test_processes_must_split_the_devices(tmp_path):
    cfg = RunConfig(out_dir=tmp_path, quick=True, devices=5, processes=2, progress=False)
    with pytest.raises(ValueError, match="split evenly over --processes 2"):
        parallel.run(cfg)
