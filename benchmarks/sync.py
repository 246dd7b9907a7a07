"""Synchronization rows: what synchronized BatchNorm costs in a data-parallel train step.

The step is the whole-model CNN of :mod:`benchmarks.models` (three Conv-BN-ReLU blocks,
MNIST-shaped batch) with the global batch split over ``devices`` devices (rows for 8 and
for 2 virtual CPU devices by default), one column per way of running it, all timed
interleaved in one run:

* ``jaxnorm_jit`` / ``flax_jit``: plain ``jax.jit`` over the batch sharded on a mesh; the
  batch statistics are global because XLA inserts the reduction (no ``axis_name``);
* ``jaxnorm_sync`` / ``flax_sync``: per-device code under ``jax.shard_map`` with
  ``BatchNorm(axis_name="data")`` (jaxnorm merges exact sums across devices; flax
  averages per-device moments);
* ``jaxnorm_local`` / ``flax_local``: the same ``shard_map`` step with per-device BatchNorm
  (each device normalizes by its own shard: no synchronization, a different model).

Every step averages the gradients over the devices (``lax.pmean`` under ``shard_map``,
XLA's reduction under ``jit``), so the columns differ only in the BatchNorm. The ratios
``sync/local`` and ``jit/local`` are the price of synchronization; ``jaxnorm/flax`` the
price of jaxnorm's exact merge against flax's average. The same step is timed from the
same state each call (as in :mod:`benchmarks.models`).

On a CPU host with fewer devices than asked, ``python -m benchmarks.sync`` re-launches
itself with ``XLA_FLAGS=--xla_force_host_platform_device_count=N`` (the flag must be set
before jax starts). Virtual devices share the host's cores, so on CPU these ratios
measure the work and collectives that synchronization adds to the program, not a network;
and with more virtual devices than cores they also measure thread scheduling (on 2 cores,
8 devices that never wait for each other in the forward pass ran slower than 8 that
synchronize at every BatchNorm), which is why a row with as many devices as cores comes
with it.

Examples::

    python -m benchmarks.sync                         # 8 and 2 devices, global batch 128
    python -m benchmarks.sync --devices 8 --batch 512 --repeats 11
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import numpy as np
import optax
from jax import lax
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import jaxnorm.linen as jnn
from benchmarks.models import CNN, _train_step
from benchmarks.ops import progress_enabled, progress_setting, row_progress, time_interleaved
from benchmarks.report import machine_info

DEVICES = 8
DEVICE_ROWS = (8, 2)  # one row per device count; the process makes max(...) devices
COLUMNS = (
    "jaxnorm_jit",
    "jaxnorm_sync",
    "jaxnorm_local",
    "flax_jit",
    "flax_sync",
    "flax_local",
)
RATIOS = {  # name: (numerator, denominator)
    "jaxnorm sync/local": ("jaxnorm_sync", "jaxnorm_local"),
    "jaxnorm jit/local": ("jaxnorm_jit", "jaxnorm_local"),
    "flax sync/local": ("flax_sync", "flax_local"),
    "flax jit/local": ("flax_jit", "flax_local"),
    "sync jaxnorm/flax": ("jaxnorm_sync", "flax_sync"),
    "jit jaxnorm/flax": ("jaxnorm_jit", "flax_jit"),
}


def _batch_norm(column: str) -> Callable[..., nn.Module]:
    impl, how = column.split("_")
    bn = jnn.BatchNorm if impl == "jaxnorm" else nn.BatchNorm
    return functools.partial(bn, axis_name="data") if how == "sync" else bn


def _shard_map_step(model: nn.Module, tx: optax.GradientTransformation, mesh) -> Callable:
    """One data-parallel step written per device; gradients and loss averaged by pmean.

    ``check_vma=False`` (pmap's semantics): each device's gradient is its own until the
    ``pmean``; the global gradient of the mean loss over equal shards.
    """

    def local(params, batch_stats, opt_state, x, y):
        def loss_fn(p):
            logits, upd = model.apply(
                {"params": p, "batch_stats": batch_stats}, x, True, mutable=["batch_stats"]
            )
            loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
            return loss, upd["batch_stats"]

        (loss, new_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        grads = lax.pmean(grads, "data")
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), new_stats, opt_state, lax.pmean(loss, "data")

    rep, rows = P(), P("data")
    return jax.shard_map(
        local,
        mesh=mesh,
        in_specs=(rep, rep, rep, rows, rows),
        out_specs=rep,
        check_vma=False,
    )


def build_steps(
    devices: int = DEVICES,
    batch: int = 128,
    image: int = 28,
    columns: tuple[str, ...] = COLUMNS,
) -> dict[str, tuple[Callable, tuple[Any, ...]]]:
    """``{column: (jitted step, args)}``: the same model, data and initial state for all.

    The initial variables are the jaxnorm model's (flax's BatchNorm has the same
    ``params``/``batch_stats`` tree), replicated; ``x``/``y`` are sharded over ``data``.
    """
    if jax.device_count() < devices:
        raise ValueError(
            f"build_steps: devices={devices} but jax sees {jax.device_count()}. Run "
            f"python -m benchmarks.sync (it re-launches itself with "
            f"XLA_FLAGS=--xla_force_host_platform_device_count={devices}), or pass fewer."
        )
    if batch % devices:
        raise ValueError(
            f"build_steps: the global batch {batch} does not split over {devices} devices; "
            f"pass a multiple of {devices}."
        )
    mesh = jax.make_mesh(
        (devices,), ("data",), axis_types=(AxisType.Auto,), devices=jax.devices()[:devices]
    )
    rep, rows = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
    rng = np.random.default_rng(0)
    x_host = rng.normal(0.5, 1.0, (batch, image, image, 1)).astype(np.float32)
    x = jax.device_put(x_host, rows)
    y = jax.device_put(rng.integers(0, 10, batch).astype(np.int32), rows)
    tx = optax.adamw(1e-3)
    variables = _numpy_variables(CNN(jnn.BatchNorm), x_host[: batch // devices])
    params = jax.device_put(variables["params"], rep)
    batch_stats = jax.device_put(variables["batch_stats"], rep)
    opt_state = jax.device_put(tx.init(variables["params"]), rep)
    args = (params, batch_stats, opt_state, x, y)
    steps = {}
    for column in columns:
        model = CNN(_batch_norm(column))
        if column.endswith("_jit"):
            step = jax.jit(_train_step(model, tx))
        else:
            step = jax.jit(_shard_map_step(model, tx, mesh))
        steps[column] = (step, args)
    return steps


def _numpy_variables(model: nn.Module, x: np.ndarray) -> dict:
    """Initial variables drawn by NumPy: kernels ~ N(0, 1/fan_in), scale and var 1, the
    rest 0. (``jax.jit(model.init)`` compiles its random initializers for seconds.)"""
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), x, False))
    rng = np.random.default_rng(1)

    def fill(path, leaf):
        name = path[-1].key
        if name in ("scale", "var"):
            return np.ones(leaf.shape, leaf.dtype)
        if name == "kernel":
            fan_in = np.prod(leaf.shape[:-1])
            return rng.normal(0.0, fan_in**-0.5, leaf.shape).astype(leaf.dtype)
        return np.zeros(leaf.shape, leaf.dtype)

    return jax.tree_util.tree_map_with_path(fill, shapes)


def run_sync_rows(
    repeats: int = 9,
    min_time: float = 0.05,
    device_rows: tuple[int, ...] = DEVICE_ROWS,
    batches: tuple[int, ...] = (128,),
) -> list[dict]:
    """Time every column for each device count and global batch; print and return the rows."""
    rows = []
    grid = [(n, b) for n in device_rows for b in batches]
    with row_progress(len(grid), repeats, desc="sync rows"):
        for devices, batch in grid:
            steps = build_steps(devices, batch)
            compiled, compile_s = {}, {}
            for column, (step, args) in steps.items():
                t0 = time.perf_counter()
                exe = step.lower(*args).compile()
                compile_s[column] = time.perf_counter() - t0
                compiled[column] = lambda exe=exe, args=args: exe(*args)
            timing = time_interleaved(compiled, repeats, min_time=min_time)
            row = {
                "model": "cnn_mnist_bn",
                "devices": devices,
                "global_batch": batch,
                "timing": timing,
                "compile_s": compile_s,
                "ratios": {
                    name: timing[a]["median_s"] / timing[b]["median_s"]
                    for name, (a, b) in RATIOS.items()
                },
            }
            rows.append(row)
            print(format_sync_row(row), flush=True)
    return rows


def run_sync_rows_subprocess(
    repeats: int = 9,
    min_time: float = 0.05,
    device_rows: tuple[int, ...] = DEVICE_ROWS,
    batches: tuple[int, ...] = (128,),
) -> list[dict]:
    """:func:`run_sync_rows` in a fresh process with ``max(device_rows)`` CPU devices.

    For callers whose jax has already started with fewer devices (``python -m
    benchmarks``); the child prints its rows as it goes.
    """
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "sync.json"
        cmd = [
            sys.executable, "-m", "benchmarks.sync", "--repeats", str(repeats),
            "--min-time", str(min_time), "--out", str(out),
            *(a for n in device_rows for a in ("--devices", str(n))),
            *(a for b in batches for a in ("--batch", str(b))),
            *([] if progress_enabled() else ["--no-progress"]),
        ]  # fmt: skip
        subprocess.run(cmd, check=True, env=_cpu_env(max(device_rows)))
        return json.loads(out.read_text(encoding="utf-8"))["sync_rows"]


def _cpu_env(devices: int) -> dict[str, str]:
    flag = f"--xla_force_host_platform_device_count={devices}"
    flags = " ".join(
        f
        for f in os.environ.get("XLA_FLAGS", "").split()
        if not f.startswith("--xla_force_host_platform_device_count")
    )
    return {**os.environ, "XLA_FLAGS": f"{flags} {flag}".strip(), "JAX_PLATFORMS": "cpu"}


def format_sync_row(row: dict) -> str:
    """Two lines: the ratios, then each column's median step time."""
    t = row["timing"]
    ratios = "  ".join(f"{k} {v:.2f}" for k, v in row["ratios"].items())
    times = "  ".join(
        f"{c} {t[c]['median_s'] * 1e3:.1f} ms (iqr {t[c]['iqr_rel'] * 100:.0f}%)" for c in t
    )
    head = f"{row['model']} x{row['devices']} devices, global batch {row['global_batch']}"
    return f"{head}: {ratios}\n    {times}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.sync", description=__doc__)
    parser.add_argument(
        "--devices", type=int, action="append", help="devices of a row (repeatable; 8 and 2)"
    )
    parser.add_argument("--batch", type=int, action="append", help="global batch (repeatable)")
    parser.add_argument("--repeats", type=int, default=9, help="interleaved repeats per row")
    parser.add_argument("--min-time", type=float, default=0.05, help="seconds per sample")
    parser.add_argument("--out", default=None, help="JSON path (default: print only)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    batches = tuple(args.batch or (128,))
    device_rows = tuple(args.devices or DEVICE_ROWS)
    need = max(device_rows)
    if jax.device_count() < need:
        if _cpu_env(need)["XLA_FLAGS"] == os.environ.get("XLA_FLAGS"):
            raise SystemExit(f"{need} virtual CPU devices were asked for but not made")
        print(
            f"jax sees {jax.device_count()} device(s); re-running with {need} virtual CPU devices",
            flush=True,
        )
        cmd = [sys.executable, "-m", "benchmarks.sync", *(sys.argv[1:] if argv is None else argv)]
        return subprocess.run(cmd, env=_cpu_env(need)).returncode
    with progress_setting(not args.no_progress):
        rows = run_sync_rows(args.repeats, args.min_time, device_rows, batches)
    if args.out:
        payload = {"machine": machine_info(), "sync_rows": rows}
        Path(args.out).write_text(json.dumps(payload, indent=1) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
