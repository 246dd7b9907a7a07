"""Benchmark rows: one op × shape × dtype × direction, every column timed interleaved."""

from __future__ import annotations

import contextlib
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

import jaxnorm
from experiments.common import ProgressBar

SHAPES = {
    "per_sample": [(8192, 1024), (65536, 128), (2048, 4096)],
    "bn": [(128, 32, 32, 64), (256, 8, 8, 512), (32, 56, 56, 128)],
}
EPS = 1e-5


@dataclass(frozen=True)
class Op:
    family: str  # which SHAPES list applies
    params: tuple[str, ...]  # differentiable parameters besides x


OPS = {
    "layer_norm": Op("per_sample", ("scale", "bias")),
    "rms_norm": Op("per_sample", ("scale",)),
    "batch_norm_train": Op("bn", ("scale", "bias")),
    "batch_norm_eval": Op("bn", ("scale", "bias")),
}


def _block(tree):
    for leaf in jax.tree_util.tree_leaves(tree):
        if hasattr(leaf, "block_until_ready"):
            leaf.block_until_ready()
    return tree


# ----------------------------------------------------------------------------- JAX columns


def _jax_forward(op: str, impl: str) -> Callable:
    """f(x, params, stats) -> output pytree, for impl in jaxnorm / flax / naive."""
    if impl == "jaxnorm":
        if op == "layer_norm":
            return lambda x, p, s: jaxnorm.layer_norm(x, p["scale"], p["bias"], epsilon=EPS)
        if op == "rms_norm":
            return lambda x, p, s: jaxnorm.rms_norm(x, p["scale"], epsilon=EPS)
        train = op == "batch_norm_train"
        return lambda x, p, s: jaxnorm.batch_norm(
            x, s, p["scale"], p["bias"], training=train, epsilon=EPS
        )
    if impl == "flax":
        if op == "layer_norm":
            return lambda x, p, s: nn.LayerNorm(epsilon=EPS, dtype=x.dtype).apply({"params": p}, x)
        if op == "rms_norm":
            return lambda x, p, s: nn.RMSNorm(epsilon=EPS, dtype=x.dtype).apply({"params": p}, x)
        train = op == "batch_norm_train"

        def flax_bn(x, p, s):
            mod = nn.BatchNorm(use_running_average=not train, epsilon=EPS, dtype=x.dtype)
            variables = {"params": p, "batch_stats": {"mean": s.mean, "var": s.var}}
            if train:
                y, upd = mod.apply(variables, x, mutable=["batch_stats"])
                return y, upd
            return mod.apply(variables, x), s

        return flax_bn
    if impl == "naive":

        def naive(x, p, s):
            xf = x.astype(jnp.float32)
            if op in ("layer_norm", "rms_norm"):
                if op == "layer_norm":
                    mean = xf.mean(-1, keepdims=True)
                    xc = xf - mean
                else:
                    xc = xf
                var = (xc * xc).mean(-1, keepdims=True)
                y = xc * jax.lax.rsqrt(var + EPS) * p["scale"]
                if "bias" in p:
                    y = y + p["bias"]
                return y.astype(x.dtype)
            if op == "batch_norm_train":
                mean = xf.mean((0, 1, 2))
                var = ((xf - mean) ** 2).mean((0, 1, 2))
                new = (0.99 * s.mean + 0.01 * mean, 0.99 * s.var + 0.01 * var)
                new = jax.lax.stop_gradient(new)
            else:
                mean, var, new = s.mean, s.var, (s.mean, s.var)
            y = (xf - mean) * jax.lax.rsqrt(var + EPS) * p["scale"] + p["bias"]
            return y.astype(x.dtype), new

        return naive
    raise ValueError(impl)


def _jax_callable(op: str, impl: str, direction: str, x, params, stats, dy) -> Callable:
    fwd = _jax_forward(op, impl)
    has_aux = op.startswith("batch_norm")
    if direction == "fwd":
        f = jax.jit(fwd)
        return lambda: f(x, params, stats)

    def fwd_bwd(x, p, s, dy):
        if has_aux:
            _, vjp, aux = jax.vjp(lambda x, p: fwd(x, p, s), x, p, has_aux=True)
            return vjp(dy), aux
        _, vjp = jax.vjp(lambda x, p: fwd(x, p, s), x, p)
        return vjp(dy)

    f = jax.jit(fwd_bwd)
    return lambda: f(x, params, stats, dy)


# ----------------------------------------------------------------------------- torch column


def _torch_callable(op: str, direction: str, x_np, params_np, dtype: str) -> Callable | None:
    try:
        import torch
        import torch.nn.functional as F
    except ImportError:  # pragma: no cover - torch is in the test extra
        return None
    tdt = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]

    def tensor(a, grad=False):
        t = torch.from_numpy(np.asarray(a, np.float32)).to(tdt)
        return t.requires_grad_(grad)

    need_grad = direction == "fwd_bwd"
    x = tensor(x_np, need_grad)
    p = {k: tensor(v, need_grad) for k, v in params_np.items()}
    if op.startswith("batch_norm"):
        # NHWC memory viewed as NCHW: torch's channels_last layout, no copy.
        x = x.detach().permute(0, 3, 1, 2).requires_grad_(need_grad)
        c = x.shape[1]
        running_mean = torch.zeros(c, dtype=tdt)
        running_var = torch.ones(c, dtype=tdt)
        train = op == "batch_norm_train"

        def fwd():
            return F.batch_norm(
                x, running_mean, running_var, p["scale"], p["bias"], train, 0.01, EPS
            )
    elif op == "layer_norm":

        def fwd():
            return F.layer_norm(x, (x.shape[-1],), p["scale"], p["bias"], EPS)
    else:

        def fwd():
            return F.rms_norm(x, (x.shape[-1],), p["scale"], EPS)

    if direction == "fwd":

        def run():
            with torch.no_grad():
                return fwd()

        return run
    dy = torch.ones_like(fwd()).mul_(0.5)
    inputs = [x, *p.values()]
    return lambda: torch.autograd.grad(fwd(), inputs, dy)


# ----------------------------------------------------------------------------- timing


def _calibrate(fn: Callable, min_time: float) -> int:
    _block(fn())  # compile / warm up
    _block(fn())
    n = 1
    while True:
        t0 = time.perf_counter()
        for _ in range(n):
            out = fn()
        _block(out)
        if time.perf_counter() - t0 >= min_time or n >= 1024:
            return n
        n *= 2


def _sample(fn: Callable, n: int) -> float:
    t0 = time.perf_counter()
    for _ in range(n):
        out = fn()
    _block(out)
    return (time.perf_counter() - t0) / n


_progress = {"enabled": True}  # python -m benchmarks --no-progress turns the bars off
_bars: list[ProgressBar] = []  # open row_progress bars; time_interleaved advances the last


@contextlib.contextmanager
def progress_setting(enabled: bool) -> Iterator[None]:
    """Within the block, `row_progress` bars are drawn (on a terminal) only if ``enabled``;
    the setting before it comes back afterwards."""
    before = _progress["enabled"]
    _progress["enabled"] = enabled
    try:
        yield
    finally:
        _progress["enabled"] = before


def progress_enabled() -> bool:
    """Whether `row_progress` bars are drawn (on a terminal)."""
    return _progress["enabled"]


@contextlib.contextmanager
def row_progress(rows: int, repeats: int, *, desc: str) -> Iterator[ProgressBar]:
    """A progress bar over ``rows`` rows of ``repeats`` repeats each.

    Every repeat that `time_interleaved` runs inside the block advances it by one (a
    repeat times each column once for about ``min_time``, so repeats take similar times
    across rows and the ETA holds). Draws only on a terminal and when `progress_enabled`.
    """
    bar = ProgressBar(rows * repeats, desc=desc, unit="repeat", enabled=_progress["enabled"])
    _bars.append(bar)
    try:
        yield bar
    finally:
        _bars.remove(bar)
        bar.close()


def time_interleaved(columns: dict[str, Callable], repeats: int, min_time: float) -> dict:
    """Median seconds per call of each column, sampled round-robin ``repeats`` times.

    Inside `row_progress`, each repeat advances its bar.
    """
    counts = {k: _calibrate(f, min_time) for k, f in columns.items()}
    samples: dict[str, list[float]] = {k: [] for k in columns}
    for _ in range(repeats):
        for k, f in columns.items():
            samples[k].append(_sample(f, counts[k]))
        if _bars:
            _bars[-1].update(1)
    out = {}
    for k, s in samples.items():
        q = statistics.quantiles(s, n=4) if len(s) >= 2 else [s[0]] * 3
        med = statistics.median(s)
        out[k] = {"median_s": med, "iqr_rel": (q[2] - q[0]) / med, "samples_s": s}
    return out


def run_row(
    op: str,
    shape: tuple[int, ...],
    dtype: str,
    direction: str,
    *,
    repeats: int,
    min_time: float,
    with_torch: bool = True,
) -> dict:
    """Time one row: jaxnorm, flax, torch, naive jnp and the copy, interleaved."""
    jdt = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[dtype]
    rng = np.random.default_rng(0)
    x_np = rng.normal(0.5, 2.0, shape).astype(np.float32)
    feat = shape[-1]
    params_np = {"scale": rng.normal(1, 0.1, feat).astype(np.float32)}
    if "bias" in OPS[op].params:
        params_np["bias"] = rng.normal(0, 0.1, feat).astype(np.float32)
    x = jnp.asarray(x_np, jdt)
    params = {k: jnp.asarray(v) for k, v in params_np.items()}
    stats = jaxnorm.init_batch_stats((feat,))
    dy = jnp.full(shape, 0.5, jdt)
    columns = {
        impl: _jax_callable(op, impl, direction, x, params, stats, dy)
        for impl in ("jaxnorm", "flax", "naive")
    }
    if with_torch:
        torch_fn = _torch_callable(op, direction, x_np, params_np, dtype)
        if torch_fn is not None:
            columns["torch"] = torch_fn
    copy = jax.jit(lambda x: x + 1)
    columns["copy"] = lambda: copy(x)
    timing = time_interleaved(columns, repeats, min_time)
    passes = 2 if direction == "fwd" else 3
    floor = timing["copy"]["median_s"] * passes / 2
    nbytes = x.size * x.dtype.itemsize
    row = {
        "op": op,
        "shape": list(shape),
        "dtype": dtype,
        "direction": direction,
        "floor_s": floor,
        "copy_GBps": 2 * nbytes / timing["copy"]["median_s"] / 1e9,
        "timing": timing,
    }
    med = {k: v["median_s"] for k, v in timing.items()}
    row["ratios"] = {f"{k}/floor": med[k] / floor for k in med if k != "copy"}
    for other in ("flax", "torch", "naive"):
        if other in med:
            row["ratios"][f"jaxnorm/{other}"] = med["jaxnorm"] / med[other]
    return row
