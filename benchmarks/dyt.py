"""Benchmark rows for DyT: ``jaxnorm.dyt`` against ``jaxnorm.layer_norm`` and flax's LayerNorm.

DyT's claim to speed is that it needs no reduction: one element-wise pass instead of
statistics and a normalization. Each row times, interleaved in the same repeats (so a
noisy machine slows every column alike), ``jaxnorm.dyt``, ``jaxnorm.layer_norm``,
``flax.linen.LayerNorm``, torch's DyT (the paper's ``DynamicTanh`` as one expression)
and ``F.layer_norm`` when torch is installed, and a jitted ``x + 1`` copy that sets the
memory floor (forward: 2 passes over ``x``; forward+backward: 3). Forward+backward
differentiates with respect to ``x`` and every parameter (``alpha``, ``scale``,
``bias`` for DyT; ``scale``, ``bias`` for LayerNorm). Medians, spreads and ratios.

Run with ``python -m benchmarks --dyt`` (DyT rows only) or as part of the full run.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

import jaxnorm
from benchmarks.ops import SHAPES, row_progress, time_interleaved

EPS = 1e-5
COLUMNS = ("dyt", "layer_norm", "flax_ln", "torch_dyt", "torch_ln")


def _jax_forward(impl: str) -> Callable:
    if impl == "dyt":
        return lambda x, p: jaxnorm.dyt(x, p["alpha"], p["scale"], p["bias"])
    if impl == "layer_norm":
        return lambda x, p: jaxnorm.layer_norm(x, p["scale"], p["bias"], epsilon=EPS)
    if impl == "flax_ln":
        return lambda x, p: nn.LayerNorm(epsilon=EPS, dtype=x.dtype).apply({"params": p}, x)
    raise ValueError(impl)


def _jax_callable(impl: str, direction: str, x, params, dy) -> Callable:
    fwd = _jax_forward(impl)
    if impl != "dyt":
        params = {k: v for k, v in params.items() if k != "alpha"}
    if direction == "fwd":
        f = jax.jit(fwd)
        return lambda: f(x, params)

    def fwd_bwd(x, p, dy):
        _, vjp = jax.vjp(fwd, x, p)
        return vjp(dy)

    g = jax.jit(fwd_bwd)
    return lambda: g(x, params, dy)


def _torch_callables(direction: str, x_np, params_np, dtype: str) -> dict[str, Callable]:
    try:
        import torch
        import torch.nn.functional as F
    except ImportError:  # pragma: no cover - torch is in the test extra
        return {}
    tdt = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
    grad = direction == "fwd_bwd"

    def tensor(a):
        return torch.from_numpy(np.asarray(a, np.float32)).to(tdt).requires_grad_(grad)

    x = tensor(x_np)
    p = {k: tensor(np.reshape(v, (1,)) if k == "alpha" else v) for k, v in params_np.items()}
    forwards = {
        # DynamicTanh.forward (channels_last), as in the paper's code.
        "torch_dyt": (lambda: torch.tanh(p["alpha"] * x) * p["scale"] + p["bias"], list(p)),
        "torch_ln": (
            lambda: F.layer_norm(x, (x.shape[-1],), p["scale"], p["bias"], EPS),
            ["scale", "bias"],
        ),
    }
    out = {}
    for name, (fwd, names) in forwards.items():
        if direction == "fwd":

            def run(fwd=fwd):
                with torch.no_grad():
                    return fwd()

            out[name] = run
        else:
            dy = torch.full(tuple(x.shape), 0.5, dtype=tdt)
            inputs = [x, *(p[n] for n in names)]
            out[name] = lambda fwd=fwd, inputs=inputs, dy=dy: torch.autograd.grad(fwd(), inputs, dy)
    return out


def run_dyt_row(
    shape: tuple[int, ...],
    dtype: str,
    direction: str,
    *,
    repeats: int,
    min_time: float,
    with_torch: bool = True,
) -> dict:
    """Time one row: every column and the copy floor, interleaved; ratios between them."""
    jdt = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[dtype]
    rng = np.random.default_rng(0)
    x_np = rng.normal(0.5, 2.0, shape).astype(np.float32)
    feat = shape[-1]
    params_np = {
        "alpha": np.float32(0.5),
        "scale": rng.normal(1, 0.1, feat).astype(np.float32),
        "bias": rng.normal(0, 0.1, feat).astype(np.float32),
    }
    x = jnp.asarray(x_np, jdt)
    params = {k: jnp.asarray(v) for k, v in params_np.items()}
    dy = jnp.full(shape, 0.5, jdt)
    columns = {
        impl: _jax_callable(impl, direction, x, params, dy)
        for impl in ("dyt", "layer_norm", "flax_ln")
    }
    if with_torch:
        columns.update(_torch_callables(direction, x_np, params_np, dtype))
    copy = jax.jit(lambda x: x + 1)
    columns["copy"] = lambda: copy(x)
    timing = time_interleaved(columns, repeats, min_time)
    med = {k: v["median_s"] for k, v in timing.items()}
    floor = med["copy"] * (2 if direction == "fwd" else 3) / 2
    ratios = {f"{k}/floor": med[k] / floor for k in med if k != "copy"}
    for a, b in (("dyt", "layer_norm"), ("dyt", "flax_ln"), ("layer_norm", "flax_ln")):
        ratios[f"{a}/{b}"] = med[a] / med[b]
    if "torch_dyt" in med and "torch_ln" in med:
        ratios["torch_dyt/torch_ln"] = med["torch_dyt"] / med["torch_ln"]
    return {
        "op": "dyt",
        "shape": list(shape),
        "dtype": dtype,
        "direction": direction,
        "floor_s": floor,
        "timing": timing,
        "ratios": ratios,
    }


def run_dyt_rows(
    *,
    shapes: list[tuple[int, ...]] | None = None,
    dtypes: list[str] | None = None,
    directions: list[str] | None = None,
    repeats: int = 21,
    min_time: float = 0.02,
    with_torch: bool = True,
) -> list[dict]:
    """Every DyT row (LN shapes × dtypes × directions), each printed as it finishes."""
    rows: list[dict] = []
    grid = list(
        itertools.product(
            shapes or SHAPES["per_sample"],
            dtypes or ["float32", "bfloat16"],
            directions or ["fwd", "fwd_bwd"],
        )
    )
    with row_progress(len(grid), repeats, desc="dyt rows"):
        for shape, dtype, direction in grid:
            row = run_dyt_row(
                shape,
                dtype,
                direction,
                repeats=repeats,
                min_time=min_time,
                with_torch=with_torch,
            )
            rows.append(row)
            print(format_dyt_rows([row], header=len(rows) == 1), flush=True)
    return rows


def _r(q: dict, key: str) -> str:
    return "—" if key not in q else f"{q[key]:.2f}"


def format_dyt_rows(rows: list[dict], header: bool = True) -> str:
    """Fixed width: DyT's ratios to LayerNorm, each against the floor, DyT's ms."""
    keys = (
        "dyt/layer_norm",
        "dyt/flax_ln",
        "layer_norm/flax_ln",
        "dyt/floor",
        "layer_norm/floor",
        "flax_ln/floor",
        "torch_dyt/torch_ln",
    )
    names = ("dyt/ln", "dyt/flax", "ln/flax", "dyt/fl", "ln/fl", "flax/fl", "t.dyt/ln")
    lines = []
    if header:
        lines.append(
            f"{'shape':<12}{'dtype':<9}{'dir':<8}"
            + "".join(f"{n:>9}" for n in names)
            + f"{'dyt ms':>9}{'ln ms':>9}{'iqr%':>6}"
        )
    for r in rows:
        q, t = r["ratios"], r["timing"]
        lines.append(
            f"{'x'.join(map(str, r['shape'])):<12}{r['dtype']:<9}{r['direction']:<8}"
            + "".join(f"{_r(q, k):>9}" for k in keys)
            + f"{t['dyt']['median_s'] * 1e3:>9.2f}{t['layer_norm']['median_s'] * 1e3:>9.2f}"
            + f"{max(v['iqr_rel'] for v in t.values()) * 100:>6.0f}"
        )
    return "\n".join(lines)
