"""Benchmark rows for the fused residual add + norm against an unfused add and flax's norm.

Each row is one kind (``rms``: :func:`jaxnorm.add_rms_norm` against ``h = x + r`` then
``flax.linen.RMSNorm``; ``layer``: :func:`jaxnorm.add_layer_norm` against ``h = x + r``
then ``flax.linen.LayerNorm``), one shape, one stream (``float32``; ``bfloat16``; ``bf16+f32``:
a bf16 ``x`` with a float32 residual stream, flash-attn's ``residual_in_fp32``) and one
direction (``fwd``: ``(y, h)``; ``fwd_bwd``: the VJP with cotangents for both ``y`` and
``h``, gradients of ``x``, the residual and the parameters). Columns, timed interleaved
in the same repeats (so a noisy machine slows every column alike): ``fused``,
``flax`` (the unfused add + flax's module) and ``unfused`` (the add + ``jaxnorm.rms_norm``
or ``layer_norm``). Memory, which is deterministic: the compiled program's temporary
bytes (``memory_analysis().temp_size_in_bytes``), and for ``fwd_bwd`` the bytes the
backward keeps from the forward (the leaves of ``jax.vjp``'s closure). Medians, spreads
and ratios against flax.

Run with ``python -m benchmarks --residual`` (these rows only) or as part of the full run.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

import jaxnorm
from benchmarks.ops import row_progress, time_interleaved

EPS = 1e-5
SHAPES = [(8192, 1024), (2048, 4096)]
KINDS = ("rms", "layer")
STREAMS = {  # name: (x dtype, residual dtype, residual_dtype argument)
    "float32": (jnp.float32, jnp.float32, None),
    "bfloat16": (jnp.bfloat16, jnp.bfloat16, None),
    "bf16+f32": (jnp.bfloat16, jnp.float32, jnp.float32),
}
COLUMNS = ("fused", "flax", "unfused")


def _forward(kind: str, impl: str, residual_dtype) -> Callable:
    """``f(x, r, params) -> (y, h)`` for one column."""
    if impl == "fused":
        if kind == "rms":
            return lambda x, r, p: jaxnorm.add_rms_norm(
                x, r, p["scale"], epsilon=EPS, residual_dtype=residual_dtype
            )
        return lambda x, r, p: jaxnorm.add_layer_norm(
            x, r, p["scale"], p["bias"], epsilon=EPS, residual_dtype=residual_dtype
        )

    def unfused(x, r, p):
        rdt = residual_dtype or jnp.promote_types(x.dtype, r.dtype)
        h = x.astype(rdt) + r.astype(rdt)
        if impl == "flax":
            module = (nn.RMSNorm if kind == "rms" else nn.LayerNorm)(epsilon=EPS, dtype=x.dtype)
            return module.apply({"params": p}, h), h
        if kind == "rms":
            return jaxnorm.rms_norm(h, p["scale"], epsilon=EPS, dtype=x.dtype), h
        return jaxnorm.layer_norm(h, p["scale"], p["bias"], epsilon=EPS, dtype=x.dtype), h

    return unfused


def _jitted(kind: str, impl: str, direction: str, residual_dtype) -> Callable:
    fwd = _forward(kind, impl, residual_dtype)
    if direction == "fwd":
        return jax.jit(fwd)

    def fwd_bwd(x, r, p, dy, dh):
        _, vjp = jax.vjp(fwd, x, r, p)
        return vjp((dy, dh))

    return jax.jit(fwd_bwd)


def saved_bytes(kind: str, impl: str, residual_dtype, x, r, params) -> int:
    """Bytes the backward keeps from the forward: the leaves of ``jax.vjp``'s closure."""
    fwd = _forward(kind, impl, residual_dtype)
    leaves = jax.tree_util.tree_leaves(jax.vjp(fwd, x, r, params)[1])
    return int(sum(a.size * jnp.dtype(a.dtype).itemsize for a in leaves))


def run_residual_row(
    kind: str,
    shape: tuple[int, ...],
    stream: str,
    direction: str,
    *,
    repeats: int,
    min_time: float,
) -> dict:
    """Time one row (every column interleaved) and record each column's memory."""
    xdt, rdt, residual_dtype = STREAMS[stream]
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(0.0, 1.0, shape), xdt)
    r = jnp.asarray(rng.normal(0.5, 2.0, shape), rdt)
    feat = shape[-1]
    params = {"scale": jnp.asarray(rng.normal(1, 0.1, feat), jnp.float32)}
    if kind == "layer":
        params["bias"] = jnp.asarray(rng.normal(0, 0.1, feat), jnp.float32)
    hdt = residual_dtype or jnp.promote_types(xdt, rdt)
    args = (x, r, params)
    if direction == "fwd_bwd":
        args += (jnp.full(shape, 0.5, xdt), jnp.full(shape, 0.25, hdt))
    columns, temp, saved = {}, {}, {}
    for impl in COLUMNS:
        f = _jitted(kind, impl, direction, residual_dtype)
        temp[impl] = int(f.lower(*args).compile().memory_analysis().temp_size_in_bytes)
        if direction == "fwd_bwd":
            saved[impl] = saved_bytes(kind, impl, residual_dtype, x, r, params)
        columns[impl] = lambda f=f: f(*args)
    timing = time_interleaved(columns, repeats, min_time)
    med = {k: v["median_s"] for k, v in timing.items()}
    ratios = {f"{k}/flax": med[k] / med["flax"] for k in ("fused", "unfused")}
    ratios["temp fused/flax"] = temp["fused"] / max(temp["flax"], 1)
    if saved:
        ratios["saved fused/flax"] = saved["fused"] / saved["flax"]
    return {
        "op": f"add_{kind}_norm",
        "shape": list(shape),
        "stream": stream,
        "direction": direction,
        "timing": timing,
        "temp_bytes": temp,
        "saved_bytes": saved,
        "ratios": ratios,
    }


def run_residual_rows(
    *,
    kinds: list[str] | None = None,
    shapes: list[tuple[int, ...]] | None = None,
    streams: list[str] | None = None,
    directions: list[str] | None = None,
    repeats: int = 21,
    min_time: float = 0.02,
) -> list[dict]:
    """Every row (kinds × shapes × streams × directions), each printed as it finishes."""
    rows: list[dict] = []
    grid = list(
        itertools.product(
            kinds or KINDS,
            shapes or SHAPES,
            streams or list(STREAMS),
            directions or ["fwd", "fwd_bwd"],
        )
    )
    with row_progress(len(grid), repeats, desc="residual rows"):
        for kind, shape, stream, direction in grid:
            row = run_residual_row(
                kind, shape, stream, direction, repeats=repeats, min_time=min_time
            )
            rows.append(row)
            print(format_residual_rows([row], header=len(rows) == 1), flush=True)
    return rows


def _mib(n: int | None) -> str:
    return "—" if n is None else f"{n / 2**20:.1f}"


def format_residual_rows(rows: list[dict], header: bool = True) -> str:
    """Fixed width: time ratios to flax, medians, temp and saved MiB per column."""
    lines = []
    if header:
        lines.append(
            f"{'op':<15}{'shape':<11}{'stream':<10}{'dir':<8}{'fused/flax':>11}"
            f"{'unfus/flax':>11}{'fused ms':>9}{'flax ms':>9}{'iqr%':>6}"
            f"{'temp MiB fused/flax':>20}{'saved MiB fused/flax':>21}"
        )
    for r in rows:
        q, t, temp, saved = r["ratios"], r["timing"], r["temp_bytes"], r["saved_bytes"]
        lines.append(
            f"{r['op']:<15}{'x'.join(map(str, r['shape'])):<11}{r['stream']:<10}"
            f"{r['direction']:<8}{q['fused/flax']:>11.2f}{q['unfused/flax']:>11.2f}"
            f"{t['fused']['median_s'] * 1e3:>9.2f}{t['flax']['median_s'] * 1e3:>9.2f}"
            f"{max(v['iqr_rel'] for v in t.values()) * 100:>6.0f}"
            f"{_mib(temp['fused']) + ' / ' + _mib(temp['flax']):>20}"
            f"{_mib(saved.get('fused')) + ' / ' + _mib(saved.get('flax')):>21}"
        )
    return "\n".join(lines)


def markdown_residual_table(rows: list[dict]) -> str:
    """The README table: ratios to flax first (lower is better), then the numbers."""
    out = [
        "| op | shape | stream | direction | fused/flax time | unfused/flax time | fused ms "
        "| temp MiB fused / flax | saved MiB fused / flax |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        q, t, temp, saved = r["ratios"], r["timing"], r["temp_bytes"], r["saved_bytes"]
        out.append(
            f"| {r['op']} | {'×'.join(map(str, r['shape']))} | {r['stream']} | "
            f"{r['direction']} | {q['fused/flax']:.2f} | {q['unfused/flax']:.2f} | "
            f"{t['fused']['median_s'] * 1e3:.2f} | {_mib(temp['fused'])} / "
            f"{_mib(temp['flax'])} | {_mib(saved.get('fused'))} / {_mib(saved.get('flax'))} |"
        )
    return "\n".join(out)
