"""Formatting benchmark rows: ratios first, then medians and spreads."""

from __future__ import annotations

import os
import platform

import jax


def machine_info() -> dict:
    """What the numbers were measured on."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {
        "backend": jax.default_backend(),
        "device": jax.devices()[0].device_kind,
        "cpu": cpu,
        "cores": os.cpu_count(),
        "jax": jax.__version__,
    }


def _fmt_ratio(v: float | None) -> str:
    return "—" if v is None else f"{v:.2f}"


def format_rows(rows: list[dict], header: bool = True) -> str:
    """A fixed-width table: ratios (jaxnorm/flax, jaxnorm/torch, each/floor), then times."""
    cols = (
        f"{'op':<17}{'shape':<18}{'dtype':<9}{'dir':<8}"
        f"{'jn/flax':>8}{'jn/torch':>9}{'jn/floor':>9}{'flax/fl':>8}{'torch/fl':>9}"
        f"{'naive/fl':>9}{'jaxnorm ms':>11}{'iqr%':>6}{'GB/s':>7}"
    )
    lines = [cols] if header else []
    for r in rows:
        q = r["ratios"]
        t = r["timing"]
        lines.append(
            f"{r['op']:<17}{'x'.join(map(str, r['shape'])):<18}{r['dtype']:<9}"
            f"{r['direction']:<8}"
            f"{_fmt_ratio(q.get('jaxnorm/flax')):>8}{_fmt_ratio(q.get('jaxnorm/torch')):>9}"
            f"{_fmt_ratio(q.get('jaxnorm/floor')):>9}{_fmt_ratio(q.get('flax/floor')):>8}"
            f"{_fmt_ratio(q.get('torch/floor')):>9}{_fmt_ratio(q.get('naive/floor')):>9}"
            f"{t['jaxnorm']['median_s'] * 1e3:>11.2f}{t['jaxnorm']['iqr_rel'] * 100:>6.0f}"
            f"{r['copy_GBps']:>7.1f}"
        )
    return "\n".join(lines)


def markdown_table(rows: list[dict]) -> str:
    """The README table: ratios first (lower is better), medians of interleaved repeats."""
    out = [
        "| op | shape | dtype | direction | jaxnorm/flax | jaxnorm/torch | jaxnorm/floor "
        "| flax/floor | torch/floor | jaxnorm ms |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        q = r["ratios"]
        out.append(
            f"| {r['op']} | {'×'.join(map(str, r['shape']))} | {r['dtype']} | "
            f"{r['direction']} | {_fmt_ratio(q.get('jaxnorm/flax'))} | "
            f"{_fmt_ratio(q.get('jaxnorm/torch'))} | {_fmt_ratio(q.get('jaxnorm/floor'))} | "
            f"{_fmt_ratio(q.get('flax/floor'))} | {_fmt_ratio(q.get('torch/floor'))} | "
            f"{r['timing']['jaxnorm']['median_s'] * 1e3:.2f} |"
        )
    return "\n".join(out)


def markdown_model_table(rows: list[dict]) -> str:
    """The README table of whole-model train steps."""
    out = [
        "| model | step ms jaxnorm | step ms flax | jaxnorm/flax | compile s jaxnorm / flax "
        "| temp MiB jaxnorm / flax |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        t, i = r["timing"], r["info"]
        mib = [
            "?" if i[k]["temp_bytes"] is None else f"{i[k]['temp_bytes'] / 2**20:.1f}"
            for k in ("jaxnorm", "flax")
        ]
        out.append(
            f"| {r['model']} | {t['jaxnorm']['median_s'] * 1e3:.1f} | "
            f"{t['flax']['median_s'] * 1e3:.1f} | {r['step_ratio_jaxnorm/flax']:.2f} | "
            f"{i['jaxnorm']['compile_s']:.1f} / {i['flax']['compile_s']:.1f} | "
            f"{mib[0]} / {mib[1]} |"
        )
    return "\n".join(out)


def markdown_sync_table(rows: list[dict]) -> str:
    """The README table of synchronization costs: ratios first, then median step times."""
    out = [
        "| devices | global batch | jaxnorm sync/local | jaxnorm jit/local | flax sync/local "
        "| sync jaxnorm/flax | jit jaxnorm/flax | step ms jaxnorm jit / sync / local "
        "| step ms flax jit / sync / local |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        q, t = r["ratios"], r["timing"]

        def ms(impl: str, t=t) -> str:
            return " / ".join(
                f"{t[f'{impl}_{how}']['median_s'] * 1e3:.1f}" for how in ("jit", "sync", "local")
            )

        out.append(
            f"| {r['devices']} | {r['global_batch']} | {q['jaxnorm sync/local']:.2f} | "
            f"{q['jaxnorm jit/local']:.2f} | {q['flax sync/local']:.2f} | "
            f"{q['sync jaxnorm/flax']:.2f} | {q['jit jaxnorm/flax']:.2f} | {ms('jaxnorm')} | "
            f"{ms('flax')} |"
        )
    return "\n".join(out)


if __name__ == "__main__":  # python -m benchmarks.report benchmarks/results/cpu-cpu.json
    import json
    import sys

    data = json.loads(open(sys.argv[1], encoding="utf-8").read())
    print(f"Machine: {data['machine']}\n")
    print(markdown_table(data["rows"]))
    if data.get("model_rows"):
        print()
        print(markdown_model_table(data["model_rows"]))
    if data.get("sync_rows"):
        print()
        print(markdown_sync_table(data["sync_rows"]))
