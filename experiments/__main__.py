"""``python -m experiments [name ...] [--quick]``: run experiments, plot, write the report.

With no name, runs every registered experiment (vision, then language) into ``results/``
and writes ``results/REPORT.md``; ``--quick`` runs reduced configurations instead, a smoke
test of the pipeline whose numbers mean nothing (tens of seconds per experiment on a
2-core CPU). ``--plot-only`` regenerates figures and the report from the metric files
already on disk. On a terminal, each run shows a progress bar with its rate and ETA on
stderr (off with ``--no-progress``); each experiment's total time is printed when it ends.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import time
from pathlib import Path

from experiments.common import Experiment, RunConfig

# One module per experiment, each defining EXPERIMENTS: list[Experiment]. This order is the
# run order; the report lists the vision group first, then language (stable within a group).
_MODULES = (
    "experiments.init_sweep",
    "experiments.lr_sweep",
    "experiments.overfit",
    "experiments.cnn_norms",
    "experiments.parallel",  # data_parallel
    "experiments.charlm",
    "experiments.padding",
    "experiments.small_batch",
    "experiments.powernorm_lm",
    "experiments.qk_norm",
    "experiments.dyt",
)


def registry() -> dict[str, Experiment]:
    """All experiments of the modules that exist, by name."""
    found: dict[str, Experiment] = {}
    for mod_name in _MODULES:
        try:
            mod = importlib.import_module(mod_name)
        except ModuleNotFoundError as err:
            if err.name == mod_name:
                continue
            raise
        exps = getattr(mod, "EXPERIMENTS", None)
        if exps is None:
            raise RuntimeError(
                f"{mod_name} defines no EXPERIMENTS list; every experiment module must "
                f"export EXPERIMENTS = [Experiment(...), ...] (see experiments/common.py)."
            )
        for exp in exps:
            found[exp.name] = exp
    return found


def write_report(out_dir: Path, experiments: list[Experiment]) -> Path:
    """Assemble REPORT.md from the sections of the experiments whose metrics exist."""
    parts = ["# jaxnorm experiments: what the BatchNorm/LayerNorm lesson's claims look like\n"]
    order = {"vision": 0, "language": 1}
    for exp in sorted(experiments, key=lambda e: order.get(e.group, 2)):
        folder = out_dir / exp.name
        if (folder / "metrics.json").exists():
            # Sections link figures from the repository root (results/<name>/...);
            # REPORT.md sits in the output folder, so its links start at <name>/.
            parts.append(exp.report(folder).rstrip().replace("](results/", "](") + "\n")
    path = out_dir / "REPORT.md"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(parts), encoding="utf-8")
    return path


def _is_lead_process() -> bool:
    import jax

    return jax.process_index() == 0


def main(argv: list[str] | None = None) -> int:
    reg = registry()
    parser = argparse.ArgumentParser(prog="python -m experiments", description=__doc__)
    parser.add_argument("names", nargs="*", help=f"experiments to run (default all): {list(reg)}")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="a reduced smoke run that checks the pipeline and measures nothing (tens of "
        "seconds per experiment on a 2-core CPU, several minutes for all)",
    )
    parser.add_argument("--out", default="results", help="output folder (default: results)")
    parser.add_argument("--data-dir", default=None, help="folder of MNIST-style IDX .gz files")
    parser.add_argument("--text-file", default=None, help="UTF-8 text file for the language runs")
    parser.add_argument("--seeds", type=int, default=None, help="number of seeds (override)")
    parser.add_argument("--devices", type=int, default=None, help="data-parallel devices")
    parser.add_argument(
        "--processes",
        type=int,
        default=None,
        help="data_parallel: launch N local jax.distributed processes (multi-host on one machine)",
    )
    parser.add_argument(
        "--distributed",
        action="store_true",
        help="data_parallel on a cluster: jax.distributed.initialize() autodetects SLURM/TPU/K8s",
    )
    parser.add_argument("--plot-only", action="store_true", help="re-plot from metric files")
    parser.add_argument(
        "--no-progress",
        action="store_true",
        help="no progress bars (they show only when stderr is a terminal anyway)",
    )
    args = parser.parse_args(argv)
    if args.seeds is not None and args.seeds < 1:
        parser.error(f"--seeds must be >= 1, got {args.seeds}")
    if args.processes is not None and args.processes < 1:
        parser.error(f"--processes must be >= 1, got {args.processes}")
    if args.distributed:
        # Before any JAX computation: joins the cluster's process group (one per host).
        import jax

        jax.distributed.initialize()
    unknown = [n for n in args.names if n not in reg]
    if unknown:
        parser.error(f"unknown experiment(s) {unknown}; choose from {list(reg)}")
    chosen = [reg[n] for n in (args.names or list(reg))]
    cfg = RunConfig(
        out_dir=Path(args.out),
        quick=args.quick,
        data_dir=args.data_dir,
        text_file=args.text_file,
        seeds=args.seeds,
        devices=args.devices,
        processes=args.processes,
        distributed=args.distributed,
        progress=not args.no_progress,
    )
    for exp in chosen:
        if args.plot_only:
            folder = cfg.out_dir / exp.name
            if not (folder / "metrics.json").exists():
                print(f"== {exp.name}: no {folder / 'metrics.json'}; run it first (skipped)")
                continue
        else:
            folder = cfg.dir_for(exp.name)
            print(f"== {exp.name}", flush=True)
            start = time.perf_counter()
            exp.run(cfg)
            print(f"== {exp.name}: done in {time.perf_counter() - start:.0f} s", flush=True)
        if args.distributed and not _is_lead_process():
            continue  # one process of a cluster writes figures and the report
        exp.plot(folder)
    if args.distributed and not _is_lead_process():
        return 0
    report = write_report(cfg.out_dir, list(reg.values()))
    print(f"report: {report}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
