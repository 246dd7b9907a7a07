"""``python -m benchmarks``: jaxnorm against flax, torch, naive jnp and the memory floor.

Every column of a row is measured in the same process, interleaved: each repeat times
every column once, in turn, so a noisy machine slows all columns alike. The table shows
the median per column, the spread (interquartile range / median) and the ratios; the JSON
keeps every sample. The memory floor is the bytes that must move divided by the
bandwidth of a jitted ``x + 1`` copy of the same array, measured in the same repeats:
forward moves 2 passes over ``x`` (read x, write y), forward+backward 3 (read x and dy,
write dx).

Examples::

    python -m benchmarks                                   # the full table
    python -m benchmarks --op layer_norm --shape 8192,1024 --dtype float32 --direction fwd
    python -m benchmarks --models                          # whole-model train steps only
    python -m benchmarks --dyt                             # DyT vs LayerNorm rows only
    python -m benchmarks --sync                            # synchronized BN rows only
    python -m benchmarks --residual                        # fused add + norm rows only

The synchronization rows (:mod:`benchmarks.sync`: the data-parallel CNN step on 8 and 2 virtual
CPU devices with synchronized, jit-global and per-device BatchNorm, jaxnorm and flax) run
in a child process, since the device count is fixed when jax starts.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

import jax

from benchmarks.ops import OPS, SHAPES, progress_setting, row_progress, run_row
from benchmarks.report import format_rows, machine_info


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    parser.add_argument("--op", choices=sorted(OPS), action="append", help="only these ops")
    parser.add_argument("--shape", action="append", help="only this shape, e.g. 8192,1024")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], action="append")
    parser.add_argument("--direction", choices=["fwd", "fwd_bwd"], action="append")
    parser.add_argument("--repeats", type=int, default=21, help="interleaved repeats per row")
    parser.add_argument("--min-time", type=float, default=0.02, help="seconds per sample")
    parser.add_argument("--no-torch", action="store_true", help="skip the torch column")
    parser.add_argument("--models", action="store_true", help="whole-model rows only")
    parser.add_argument("--no-models", action="store_true", help="skip whole-model rows")
    parser.add_argument("--dyt", action="store_true", help="DyT vs LayerNorm rows only")
    parser.add_argument("--sync", action="store_true", help="synchronized BN rows only")
    parser.add_argument("--residual", action="store_true", help="fused add + norm rows only")
    parser.add_argument("--no-sync", action="store_true", help="skip synchronized BN rows")
    parser.add_argument("--out", default=None, help="JSON path (default benchmarks/results/)")
    parser.add_argument(
        "--no-progress", action="store_true", help="no progress bars (none off a terminal anyway)"
    )
    args = parser.parse_args(argv)
    with progress_setting(not args.no_progress):
        return _run(args, argv)


def _run(args: argparse.Namespace, argv: list[str] | None) -> int:
    """Runs and writes the rows that ``args`` select."""
    info = machine_info()
    filtered = bool(args.op or args.shape or args.dtype or args.direction)
    only = args.models or args.dyt or args.sync or args.residual
    rows = []
    grid = []  # (op, shape, dtype, direction) of every op row
    for op in [] if only else args.op or sorted(OPS):
        shapes = SHAPES[OPS[op].family]
        if args.shape:
            wanted = [tuple(int(s) for s in sh.split(",")) for sh in args.shape]
            # BN rows take NHWC shapes; LN/RMS rows take any other rank.
            shapes = [s for s in wanted if (len(s) == 4) == (OPS[op].family == "bn")]
        for shape in shapes:
            for dtype in args.dtype or ["float32", "bfloat16"]:
                for direction in args.direction or ["fwd", "fwd_bwd"]:
                    grid.append((op, shape, dtype, direction))
    if grid:
        with row_progress(len(grid), args.repeats, desc="op rows"):
            for op, shape, dtype, direction in grid:
                row = run_row(
                    op,
                    shape,
                    dtype,
                    direction,
                    repeats=args.repeats,
                    min_time=args.min_time,
                    with_torch=not args.no_torch,
                )
                rows.append(row)
                print(format_rows([row], header=len(rows) == 1), flush=True)
    dyt_rows = []
    if args.dyt or not (args.op or args.shape or args.dtype or args.direction or only):
        from benchmarks.dyt import run_dyt_rows

        shapes = [tuple(int(d) for d in sh.split(",")) for sh in args.shape or []]
        dyt_rows = run_dyt_rows(
            shapes=shapes or None,
            dtypes=args.dtype,
            directions=args.direction,
            repeats=args.repeats,
            min_time=args.min_time,
            with_torch=not args.no_torch,
        )
    model_rows = []
    if (
        not args.no_models
        and not args.dyt
        and not args.sync
        and not args.residual
        and not (args.op or args.shape or args.dtype or args.direction)
    ):
        from benchmarks.models import run_model_rows

        model_rows = run_model_rows(repeats=max(5, args.repeats // 2))
    residual_rows = []
    if args.residual or not (only or filtered):
        from benchmarks.residual import run_residual_rows

        shapes = [tuple(int(d) for d in sh.split(",")) for sh in args.shape or []]
        residual_rows = run_residual_rows(
            shapes=shapes or None,
            directions=args.direction,
            repeats=args.repeats,
            min_time=args.min_time,
        )
    sync_rows = []
    if args.sync or not (args.no_sync or only or filtered):
        from benchmarks.sync import run_sync_rows_subprocess

        sync_rows = run_sync_rows_subprocess(repeats=max(5, args.repeats // 2))
    backend = jax.default_backend()
    device = jax.devices()[0].device_kind.replace(" ", "_")
    suffix = "-dyt" if args.dyt else "-sync" if args.sync else ""
    suffix = "-residual" if args.residual else suffix
    name = f"{backend}-{device}{suffix}.json"
    out = Path(args.out) if args.out else Path("benchmarks/results") / name
    out.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "machine": info,
        "python": platform.python_version(),
        "argv": sys.argv[1:] if argv is None else argv,
        "rows": rows,
        "model_rows": model_rows,
        "dyt_rows": dyt_rows,
        "sync_rows": sync_rows,
        "residual_rows": residual_rows,
    }
    out.write_text(json.dumps(payload, indent=1) + "\n", encoding="utf-8")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
