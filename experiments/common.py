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
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence, Sized
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Generic, TextIO, TypeVar

if TYPE_CHECKING:
    from experiments.data_images import ImageData

T = TypeVar("T")


@dataclass(frozen=True)
class RunConfig:
    """Options shared by every experiment (set from the command line)."""

    out_dir: Path  # root of all results; each experiment writes into out_dir / name
    quick: bool = False  # reduced smoke run, tens of seconds each (the tests use it); else full
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

    ``git_dirty`` is True when tracked code differed from that commit (the numbers may then
    come from uncommitted code); the committed results under ``results/`` do not count, since
    a run of several experiments rewrites them as it goes. git fields are None outside a git
    checkout. A package that is not installed has version None.
    """
    commit = _git("rev-parse", "HEAD")
    code = ("--", ".", ":(exclude)results")
    status = _git("status", "--porcelain", "--untracked-files=no", *code) if commit else None
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


def _clock(seconds: float) -> str:
    """``m:ss``, or ``h:mm:ss`` from an hour on."""
    s = int(round(seconds))
    h, m = divmod(s // 60, 60)
    return f"{h}:{m:02d}:{s % 60:02d}" if h else f"{m}:{s % 60:02d}"


def _is_terminal(stream: TextIO) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


_live: ProgressBar | None = None  # the bar drawn on the terminal's current line, if any
_stdout_hooks = 0  # bars that have routed sys.stdout through _BarAwareStdout


class _BarAwareStdout:
    """``sys.stdout`` while a bar is drawn on the same terminal: each write first clears the
    bar's line, and the bar is drawn again under every completed line, so prints during a run
    never end up glued to the bar."""

    def __init__(self, target: TextIO) -> None:
        self.target = target
        self.hidden: ProgressBar | None = None  # the bar cleared for a line not yet ended

    def write(self, text: str) -> int:
        if _live is not None:
            self.hidden = _live
            _live._erase()
        n = self.target.write(text)
        if self.hidden is not None and text.endswith("\n"):
            self.target.flush()
            bar, self.hidden = self.hidden, None
            bar._draw()
        return n

    def flush(self) -> None:
        self.target.flush()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.target, name)


class ProgressBar:
    """A one-line text progress bar: count, percent, elapsed time, rate and ETA.

    Draws on ``stream`` (``sys.stderr`` by default) only when ``enabled`` and the stream is a
    terminal; otherwise it writes nothing at all, so logs and pipes stay clean. The line
    reads ``desc  45%|#########           | 9/20 epoch [0:08<0:09, 1.12 epoch/s]``; the rate
    counts from the first `update` on (the work before it usually includes compiling), and
    the ETA is the remaining count over that rate. On `close` (or when the count reaches
    ``total``) the final line stays on screen with the total time. While a bar is drawn,
    ``print`` to the same terminal clears it first and the bar reappears below the printed
    line.

    Use it around a loop of chunks::

        with ProgressBar(total=steps, desc="cnn_norms", unit="step", enabled=cfg.progress) as bar:
            for chunk in chunks:
                ...
                bar.update(len(chunk))
    """

    width = 20  # characters of the bar itself

    def __init__(
        self,
        total: int,
        *,
        desc: str,
        unit: str = "it",
        enabled: bool = True,
        stream: TextIO | None = None,
        min_interval: float = 0.1,
    ) -> None:
        self.total = max(0, int(total))
        self.desc = desc
        self.unit = unit
        self.stream = sys.stderr if stream is None else stream
        self.active = enabled and _is_terminal(self.stream)
        self.min_interval = min_interval  # seconds between redraws (the last one always draws)
        self.n = 0
        self.start = time.perf_counter()
        self._first: tuple[float, int] | None = None  # (time, count) of the first update
        self._drawn_at = -math.inf
        self._closed = False
        self._hooked = False
        if self.active:
            self._hook_stdout()
            self._draw()

    def _hook_stdout(self) -> None:
        global _stdout_hooks
        if _is_terminal(sys.stdout) or isinstance(sys.stdout, _BarAwareStdout):
            if not isinstance(sys.stdout, _BarAwareStdout):
                sys.stdout = _BarAwareStdout(sys.stdout)
            _stdout_hooks += 1
            self._hooked = True

    def _unhook_stdout(self) -> None:
        global _stdout_hooks
        if self._hooked:
            self._hooked = False
            _stdout_hooks -= 1
            if _stdout_hooks == 0 and isinstance(sys.stdout, _BarAwareStdout):
                sys.stdout = sys.stdout.target

    def rate(self) -> float | None:
        """Units per second since the first update (from the start if that is all there is)."""
        now = time.perf_counter()
        if self._first is not None and self.n > self._first[1] and now > self._first[0]:
            return (self.n - self._first[1]) / (now - self._first[0])
        if self.n > 0 and now > self.start:
            return self.n / (now - self.start)
        return None

    def line(self) -> str:
        """The text of the bar as it stands."""
        elapsed = time.perf_counter() - self.start
        frac = min(1.0, self.n / self.total) if self.total else 1.0
        filled = int(frac * self.width)
        bar = "#" * filled + " " * (self.width - filled)
        rate = self.rate()
        if self.n >= self.total:
            eta = ""
        elif rate:
            eta = f"<{_clock((self.total - self.n) / rate)}"
        else:
            eta = "<?"
        if rate is None:
            speed = f"? {self.unit}/s"
        elif rate >= 100:
            speed = f"{rate:,.0f} {self.unit}/s"
        elif rate >= 1:
            speed = f"{rate:.3g} {self.unit}/s"
        else:
            speed = f"{1 / rate:.3g} s/{self.unit}"
        return (
            f"{self.desc} {frac * 100:3.0f}%|{bar}| {self.n}/{self.total} {self.unit} "
            f"[{_clock(elapsed)}{eta}, {speed}]"
        )

    def _erase(self) -> None:
        global _live
        if _live is self:
            self.stream.write("\r\033[K")
            self.stream.flush()
            _live = None

    def _draw(self) -> None:
        global _live
        if not self.active or self._closed:
            return
        if _live is not None and _live is not self:
            _live._erase()
        columns = shutil.get_terminal_size((100, 24)).columns
        self.stream.write("\r\033[K" + self.line()[: max(10, columns - 1)])
        self.stream.flush()
        self._drawn_at = time.perf_counter()
        _live = self

    def update(self, n: int = 1) -> None:
        """Advances the count by ``n``; redraws at most every ``min_interval`` seconds."""
        if self._first is None:
            self._first = (time.perf_counter(), self.n + n)
        self.n += n
        if self.n >= self.total:
            self.close()
        elif self.active and time.perf_counter() - self._drawn_at >= self.min_interval:
            self._draw()

    def close(self) -> None:
        """Draws the final line and leaves it on screen (once; later calls do nothing)."""
        global _live
        if self._closed:
            return
        if self.active:
            self._draw()
            self.stream.write("\n")
            self.stream.flush()
            if _live is self:
                _live = None
            self._unhook_stdout()
        self._closed = True

    def __enter__(self) -> ProgressBar:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        if not getattr(self, "_closed", True):
            self.close()


class _ProgressIter(Generic[T]):
    """The iterator of `progress`: counts an item when the next one is asked for."""

    def __init__(self, items: Iterable[T], bar: ProgressBar) -> None:
        self._it = iter(items)
        self._bar = bar
        self._started = False

    def __iter__(self) -> _ProgressIter[T]:
        return self

    def __next__(self) -> T:
        if self._started:
            self._bar.update(1)
        self._started = True
        try:
            return next(self._it)
        except StopIteration:
            self._bar.close()
            raise


def progress(
    items: Iterable[T],
    *,
    desc: str,
    total: int | None = None,
    unit: str = "it",
    enabled: bool = True,
    stream: TextIO | None = None,
) -> Iterator[T]:
    """``items`` with a `ProgressBar`: an item counts as done when the next one is asked for.

    The bar starts when ``progress`` is called and draws only on a terminal and when
    ``enabled`` (see `ProgressBar`). ``total`` defaults to ``len(items)``.
    """
    if total is None:
        total = len(items) if isinstance(items, Sized) else 0
    bar = ProgressBar(total, desc=desc, unit=unit, enabled=enabled, stream=stream)
    return _ProgressIter(items, bar)


class Timer:
    """``with Timer() as t: ...; t.seconds`` — wall-clock seconds of a block."""

    def __enter__(self) -> Timer:
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.seconds = time.perf_counter() - self.start
