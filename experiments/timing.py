"""Timing helpers shared by the experiments that measure speed, and the loss-spike count.

Timing is never part of a pass/fail test: these numbers go into metrics files and reports.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


def interleaved_medians(
    fns: dict[str, Callable[[], Any]], *, repeats: int, inner: int
) -> dict[str, dict[str, float]]:
    """Seconds per call of each ``fn`` (already compiled): medians and quartiles.

    Each repeat times ``inner`` calls of every function in turn, the order rotated from repeat
    to repeat, so that slow phases of a shared machine hit every function alike.
    """
    names = list(fns)
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(repeats):
        for n in names[r % len(names) :] + names[: r % len(names)]:
            t0 = time.perf_counter()
            for _ in range(inner):
                out = fns[n]()
            jax.block_until_ready(out)
            times[n].append((time.perf_counter() - t0) / inner)
    return {
        n: {
            "median_s": float(np.median(t)),
            "q25_s": float(np.percentile(t, 25)),
            "q75_s": float(np.percentile(t, 75)),
            "repeats": len(t),
        }
        for n, t in times.items()
    }


def loss_spikes(losses: Any, *, width: int, threshold: float) -> int:
    """Number of loss spikes of a training curve.

    A spike is a step ``t >= width`` whose loss exceeds the mean of the ``width`` losses before
    it, ``mean(losses[t - width : t])``, by more than ``threshold``. Only the finite prefix of
    the curve is searched (a divergence to NaN/Inf is reported by `divergence_step`).

    Args:
        losses: Per-step training losses, shape ``(steps,)``.
        width: Steps in the trailing mean.
        threshold: Rise above the trailing mean that counts as a spike (nats).

    Returns:
        The number of spike steps.
    """
    x = np.asarray(losses, dtype=np.float64)
    bad = np.flatnonzero(~np.isfinite(x))
    x = x[: bad[0]] if bad.size else x
    if x.size <= width:
        return 0
    c = np.concatenate([[0.0], np.cumsum(x)])
    t = np.arange(width, x.size)
    prev = (c[t] - c[t - width]) / width
    return int(np.sum(x[t] > prev + threshold))


def layer_fwd_bwd(layer: Any, x: jax.Array) -> tuple[Callable[..., Any], Any]:
    """``(jit(fb), params)``: ``fb(params, x, g)`` = gradients of ``sum(layer(x) * g)``."""
    if layer is None:

        def loss(p: Any, x: jax.Array, g: jax.Array) -> jax.Array:
            return jnp.sum(x * g)

        params: Any = {}
    else:
        params = layer.init(jax.random.key(1), x)

        def loss(p: Any, x: jax.Array, g: jax.Array) -> jax.Array:
            return jnp.sum(layer.apply(p, x) * g)

    return jax.jit(jax.grad(loss, argnums=(0, 1))), params
