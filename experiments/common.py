"""What every experiment shares: run options, the registry entry, metric files, progress bars.

Data flows one way: an experiment's ``run`` trains and writes metric files
(``<out_dir>/<name>/metrics.json`` through `write_metrics`, which adds the git commit, package
versions and machine; plus CSV where tables help); its ``plot`` reads only those files and
writes PNGs beside them; its ``report`` reads only those files and returns
a markdown section (the lesson's claim, what we measured, the verdict, and the command that
regenerates each figure). ``python -m experiments`` assembles the sections into
``<out_dir>/REPORT.md``.
"""

from __future__ import annotations

import csv
import datetime
import importlib.metadata
import json
import math
import os
import platform
import subprocess
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    from experiments.data_images import ImageData

T = TypeVar("T")


@dataclass(frozen=True)
class RunConfig:
    """Options shared by every experiment (set from the command line)."""

    out_dir: Path  # root of all results; each experiment writes into out_dir / name
    quick: bool = False  # a seconds-long smoke run (used by the tests); full run otherwise
    data_dir: str | None = None  # IDX directory for MNIST/Fashion-MNIST instead of the package
    text_file: str | None = None  # a UTF-8 text file instead of the packaged KJV Bible
    seeds: int | None = None  # override the number of seeds (None: the experiment's default)
    devices: int | None = None  # data-parallel devices (None: the experiment's default)
    processes: int | None = None  # data_parallel: launch this many local jax processes
    distributed: bool = False  # data_parallel: this process is one of a cluster's (autodetect)
    progress: bool = True  # show progress bars

    def dir_for(self, name: str) -> Path:
        """The output folder of experiment ``name`` (created)."""
        path = Path(self.out_dir) / name
        path.mkdir(parents=True, exist_ok=True)
        return path

    def seeds_or(self, default: int) -> int:
        """The number of seeds: ``--seeds`` if given, else the experiment's ``default``."""
        return self.seeds if self.seeds is not None else default

    def mnist(self) -> ImageData:
        """MNIST from the ``--data-dir`` IDX files if given, else from the pinned PyPI package."""
        from experiments.data_images import load_mnist

        return load_mnist(self.data_dir)


@dataclass(frozen=True)
class Experiment:
    """A registry entry: ``python -m experiments <name>`` runs ``run``, ``plot``, ``report``."""

    name: str  # command-line name, e.g. "init_sweep"
    group: str  # "vision" or "language": report section order
    run: Callable[[RunConfig], None]  # train; write out_dir/name/metrics.json (+ CSV)
    plot: Callable[[Path], None]  # read metrics from the folder; write PNGs there
    report: Callable[[Path], str]  # read metrics from the folder; return a markdown section


def _clean(obj: Any) -> Any:
    """JSON cannot hold NaN/Inf: store them as strings so a diverged run stays visible."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    if hasattr(obj, "tolist"):
        return _clean(obj.tolist())
    return obj


def write_json(path: Path, obj: Any) -> None:
    """Write ``obj`` as JSON atomically (temporary file, then rename)."""
    path = Path(path)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(_clean(obj), indent=1, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(tmp, path)


PROVENANCE_PACKAGES = ("jax", "jaxlib", "flax", "numpy", "optax")  # versions in every metrics file


def _git(*args: str) -> str | None:
    """Output of a git command in this repository, or None (no git, not a checkout, an error)."""
    root = Path(__file__).resolve().parent.parent
    try:
        done = subprocess.run(
            ["git", *args], cwd=root, capture_output=True, text=True, timeout=30, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def provenance() -> dict[str, Any]:
    """Where a run's numbers came from: the code's git commit, package versions, the machine.

    ``git_dirty`` is True when tracked files differed from that commit (the numbers may then
    come from uncommitted code); git fields are None outside a git checkout. A package that is
    not installed has version None.
    """
    commit = _git("rev-parse", "HEAD")
    status = _git("status", "--porcelain", "--untracked-files=no") if commit else None
    packages = {}
    for name in PROVENANCE_PACKAGES:
        try:
            packages[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            packages[name] = None
    return {
        "git_commit": commit,
        "git_dirty": None if status is None else bool(status),
        "packages": packages,
        "python": platform.python_version(),
        "machine": {
            "platform": platform.platform(),
            "architecture": platform.machine(),
            "cpu_count": os.cpu_count(),
        },
        "written_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def write_metrics(folder: Path, metrics: dict[str, Any]) -> Path:
    """Write ``folder/metrics.json``: ``metrics`` plus a ``"provenance"`` entry (`provenance`).

    Every experiment's run writes its metrics through here, so each file says which commit,
    which package versions and which machine produced it. Figures and reports ignore the entry.

    Returns:
        The path written.
    """
    if "provenance" in metrics:
        raise ValueError(
            "write_metrics: metrics already hold a 'provenance' entry; the writer adds it, "
            "so rename the experiment's own key"
        )
    path = Path(folder) / "metrics.json"
    write_json(path, {**metrics, "provenance": provenance()})
    return path


def read_json(path: Path) -> Any:
    """Read a metrics file; NaN/Inf stored as strings come back as floats."""

    def restore(v: Any) -> Any:
        if isinstance(v, str) and v in ("nan", "inf", "-inf"):
            return float(v)
        if isinstance(v, dict):
            return {k: restore(x) for k, x in v.items()}
        if isinstance(v, list):
            return [restore(x) for x in v]
        return v

    return restore(json.loads(Path(path).read_text(encoding="utf-8")))


def write_csv(path: Path, header: Sequence[str], rows: Iterable[Sequence[Any]]) -> None:
    """Write a CSV table: one header row, then ``rows``."""
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(list(header))
        writer.writerows(rows)


def write_csv_dicts(path: Path, rows: Sequence[dict[str, Any]]) -> None:
    """Write dicts as a CSV table, columns in the first row's key order (nothing if empty)."""
    if not rows:
        return
    keys = list(rows[0])
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: row.get(k) for k in keys})


def to_lists(tree: Any) -> Any:
    """A pytree of arrays as nested Python lists (floats, bools) for JSON."""
    import jax
    import numpy as np

    return jax.tree.map(lambda a: np.asarray(a).tolist(), tree)


def progress(
    items: Iterable[T], *, desc: str, total: int | None = None, enabled: bool = True
) -> Iterator[T]:
    """A tqdm progress bar when tqdm is installed and ``enabled``; the bare iterable otherwise."""
    if enabled:
        try:
            from tqdm.auto import tqdm
        except ImportError:  # pragma: no cover - tqdm is in the experiments extra
            pass
        else:
            yield from tqdm(items, desc=desc, total=total, leave=False)
            return
    yield from items


class Timer:
    """``with Timer() as t: ...; t.seconds`` — wall-clock seconds of a block."""

    def __enter__(self) -> Timer:
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.seconds = time.perf_counter() - self.start
