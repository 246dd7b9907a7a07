"""The benchmark harness runs and records every column (no timing is asserted); its progress
bars advance per timed repeat and draw only on a terminal, unless ``--no-progress``."""

from __future__ import annotations

import io
import json
import sys

from benchmarks import ops
from benchmarks.__main__ import main


def test_one_row_records_all_columns_and_ratios(tmp_path):
    out = tmp_path / "bench.json"
    main(
        [
            "--op", "batch_norm_train", "--shape", "4,3,3,8", "--dtype", "float32",
            "--direction", "fwd_bwd", "--repeats", "2", "--min-time", "0", "--out", str(out),
            "--no-progress",
        ]
    )  # fmt: skip
    assert ops.progress_enabled()  # --no-progress held for that run only
    rows = json.loads(out.read_text())["rows"]
    assert len(rows) == 1
    row = rows[0]
    assert set(row["timing"]) == {"jaxnorm", "flax", "naive", "torch", "copy"}
    assert all(len(t["samples_s"]) == 2 and t["median_s"] > 0 for t in row["timing"].values())
    assert {"jaxnorm/flax", "jaxnorm/torch", "jaxnorm/floor"} <= set(row["ratios"])
    # The floor for forward+backward is 3 passes, i.e. 1.5 copies (2 passes each).
    assert abs(row["floor_s"] - 1.5 * row["timing"]["copy"]["median_s"]) < 1e-12


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_each_timed_repeat_advances_the_row_bar(monkeypatch):
    err = _Terminal()
    monkeypatch.setattr(sys, "stderr", err)
    calls = []
    columns = {"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}
    with ops.row_progress(2, 3, desc="rows") as bar:
        ops.time_interleaved(columns, repeats=3, min_time=0.0)
        assert bar.n == 3  # one per repeat, each timing every column
        ops.time_interleaved(columns, repeats=3, min_time=0.0)
    assert bar.n == 6 and "rows 100%|" in err.getvalue() and "6/6 repeat" in err.getvalue()
    # Outside a row_progress block timing advances nothing and draws nothing.
    before = err.getvalue()
    ops.time_interleaved(columns, repeats=2, min_time=0.0)
    assert err.getvalue() == before


def test_no_progress_and_no_terminal_draw_nothing(monkeypatch):
    columns = {"a": lambda: None}
    for stream, enabled in ((_Terminal(), False), (io.StringIO(), True)):
        monkeypatch.setattr(sys, "stderr", stream)
        with ops.progress_setting(enabled), ops.row_progress(1, 2, desc="rows"):
            ops.time_interleaved(columns, repeats=2, min_time=0.0)
        assert stream.getvalue() == ""
    assert ops.progress_enabled()  # the setting before the block is back
