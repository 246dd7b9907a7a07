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
