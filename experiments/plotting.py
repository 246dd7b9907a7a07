"""Plotting helpers shared by the experiments' figures (which read only ``metrics.json``)."""

from __future__ import annotations

from typing import Any

import numpy as np


def pyplot() -> Any:
    """``matplotlib.pyplot`` on the non-interactive Agg backend (files only, no display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def trailing_mean(x: Any, width: int) -> np.ndarray:
    """Trailing moving average along the last axis (shorter windows at the start).

    ``out[..., t] = mean(x[..., max(0, t + 1 - width) : t + 1])``, in float64.
    """
    x = np.asarray(x, dtype=np.float64)
    c = np.cumsum(np.concatenate([np.zeros(x.shape[:-1] + (1,)), x], axis=-1), axis=-1)
    idx = np.arange(1, x.shape[-1] + 1)
    lo = np.maximum(idx - width, 0)
    return (c[..., idx] - c[..., lo]) / (idx - lo)


def legend_below(ax: Any, *, ncol: int = 2, fontsize: float = 7, **kwargs: Any) -> Any:
    """The axes' legend under its x-axis label, where it cannot cover any data.

    Call ``fig.tight_layout()`` (or save with ``bbox_inches="tight"``) afterwards so the
    figure makes room for it.
    """
    return ax.legend(
        loc="upper center",
        bbox_to_anchor=(0.5, -0.2),
        ncol=ncol,
        fontsize=fontsize,
        frameon=False,
        **kwargs,
    )


def focus_ylim(ax: Any, curves: Any, *, skip_frac: float = 0.1, pad: float = 0.05) -> None:
    """Limits the y-axis to where ``curves`` spend their time after an initial transient.

    A training loss falls fast at first and then slowly; autoscaling to its first value
    squashes the part worth reading. The range here runs from the lowest value of any curve
    to the highest value any curve takes after its first ``skip_frac`` of points, padded by
    ``pad`` of that span on each side. Earlier points run off the top of the axis.

    Args:
        ax: The matplotlib axes.
        curves: Sequence of 1-D arrays (one per curve, any lengths; NaN/Inf ignored).
        skip_frac: Fraction of each curve's leading points left out of the upper limit.
        pad: Margin as a fraction of the span.
    """
    lows, highs = [], []
    for c in curves:
        c = np.asarray(c, dtype=np.float64).ravel()
        tail = c[int(len(c) * skip_frac) :]
        if np.isfinite(c).any():
            lows.append(np.nanmin(np.where(np.isfinite(c), c, np.nan)))
        if np.isfinite(tail).any():
            highs.append(np.nanmax(np.where(np.isfinite(tail), tail, np.nan)))
    if not lows or not highs:
        return
    lo, hi = min(lows), max(highs)
    span = max(hi - lo, 1e-12)
    ax.set_ylim(lo - pad * span, hi + pad * span)


def seed_band(
    ax: Any, x: Any, values: Any, *, color: Any = None, label: str | None = None, **kwargs: Any
) -> Any:
    """A mean line with a shaded ± 1 standard deviation band over seeds (the first axis).

    Args:
        ax: The matplotlib axes.
        x: The x values, shape ``(points,)``.
        values: Shape ``(seeds, points)``.
        color: Line and band colour (matplotlib's next colour if None).
        label: Legend label of the line.
        **kwargs: Passed to ``ax.plot`` for the mean line (e.g. ``ls``, ``marker``).

    Returns:
        The mean line.
    """
    v = np.asarray(values, dtype=np.float64)
    mean, std = v.mean(0), v.std(0)
    (line,) = ax.plot(x, mean, color=color, label=label, **kwargs)
    ax.fill_between(x, mean - std, mean + std, color=line.get_color(), alpha=0.2, lw=0)
    return line
