"""The benchmark harness runs and records every column (no timing is asserted)."""

from __future__ import annotations

import json

from benchmarks.__main__ import main


def test_one_row_records_all_columns_and_ratios(tmp_path):
    out = tmp_path / "bench.json"
    main(
        [
            "--op", "batch_norm_train", "--shape", "4,3,3,8", "--dtype", "float32",
            "--direction", "fwd_bwd", "--repeats", "2", "--min-time", "0", "--out", str(out),
        ]
    )  # fmt: skip
    rows = json.loads(out.read_text())["rows"]
    assert len(rows) == 1
    row = rows[0]
    assert set(row["timing"]) == {"jaxnorm", "flax", "naive", "torch", "copy"}
    assert all(len(t["samples_s"]) == 2 and t["median_s"] > 0 for t in row["timing"].values())
    assert {"jaxnorm/flax", "jaxnorm/torch", "jaxnorm/floor"} <= set(row["ratios"])
    # The floor for forward+backward is 3 passes, i.e. 1.5 copies (2 passes each).
    assert abs(row["floor_s"] - 1.5 * row["timing"]["copy"]["median_s"]) < 1e-12
