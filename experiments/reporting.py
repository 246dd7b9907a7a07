"""Formatting helpers shared by the experiments' report sections (which read only metrics files).

A section states the claim, the setup, what was measured and a verdict worded from the numbers;
these helpers give every section the same way of writing a seed spread or a command line.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np


def arr(values: Any) -> np.ndarray:
    """``values`` (lists from JSON) as a float64 array."""
    return np.asarray(values, dtype=np.float64)


def mean(values: Sequence[float]) -> float:
    """The mean of ``values`` as a Python float."""
    return float(np.mean(arr(values)))


def pm(values: Any, digits: int = 3) -> str:
    """``mean ± std`` over seeds (population std), or ``nan`` if any value is not finite."""
    v = arr(values)
    if v.size == 0 or not np.all(np.isfinite(v)):
        return "nan"
    return f"{v.mean():.{digits}f} ± {v.std():.{digits}f}"


def pm_or_diverged(values: Sequence[float], digits: int = 3) -> str:
    """``mean ± std`` over seeds, the value alone for one seed, or "diverged (non-finite)"."""
    a = arr(values)
    if not np.all(np.isfinite(a)):
        return "diverged (non-finite)"
    return f"{a.mean():.{digits}f} ± {a.std():.{digits}f}" if len(a) > 1 else f"{a[0]:.{digits}f}"


def diff_note(a: np.ndarray, b: np.ndarray) -> str:
    """``+0.0120 (beyond / within 2 seed stds)`` for mean(a) − mean(b)."""
    d = a.mean() - b.mean()
    spread = 2.0 * max(a.std(), b.std())
    return f"{d:+.4f} ({'beyond' if abs(d) > spread else 'within'} 2 seed stds)"


def command(name: str, *, quick: bool = False) -> str:
    """The command that regenerates an experiment, as inline markdown code."""
    return f"`python -m experiments {name}{' --quick' if quick else ''}`"


def quick_note(m: dict[str, Any]) -> list[str]:
    """A warning paragraph for metrics from a ``--quick`` smoke run (nothing otherwise)."""
    if not m.get("quick"):
        return []
    return [
        "*These numbers come from a `--quick` smoke run; they say nothing about the claim.*",
        "",
    ]


def ordered_variants(m: dict[str, Any]) -> dict[str, Any]:
    """``m["variants"]`` in config order (metrics.json stores them with sorted keys)."""
    order = [n for n in m["config"]["norms"] if n in m["variants"]]
    order += [n for n in m["variants"] if n not in order]
    return {n: m["variants"][n] for n in order}
