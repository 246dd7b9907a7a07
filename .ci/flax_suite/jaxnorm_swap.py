"""pytest plugin for run.py: put jaxnorm's modules in flax's place and record every outcome.

Loaded with ``-p jaxnorm_swap`` (this folder on ``PYTHONPATH``). Two environment variables
drive it:

* ``JAXNORM_FLAX_SWAP=1`` replaces ``flax.linen.{BatchNorm, LayerNorm, RMSNorm, GroupNorm,
  InstanceNorm}`` with ``jaxnorm.linen``'s and the same names in ``flax.nnx`` with
  ``jaxnorm.nnx``'s. It happens in ``pytest_configure``, before any test module is imported,
  so modules built at import time (e.g. inside ``@parameterized.parameters(...)``) are
  jaxnorm's too. Unset, flax runs as shipped (the baseline).
* ``JAXNORM_FLAX_RECORD=<path>`` appends one JSON line per failed, errored or passed test to
  ``<path>.<pid>`` (one file per process, so pytest-xdist workers do not interleave).

Only the public names are swapped; flax's internals keep their own classes.
"""

from __future__ import annotations

import json
import os
import traceback

import pytest

NORMS = ("BatchNorm", "LayerNorm", "RMSNorm", "GroupNorm", "InstanceNorm")


def swap() -> None:
    """Replace flax's public normalization classes with jaxnorm's (this process only)."""
    import flax.linen
    import flax.nnx

    import jaxnorm.linen
    import jaxnorm.nnx

    for name in NORMS:
        setattr(flax.linen, name, getattr(jaxnorm.linen, name))
        setattr(flax.nnx, name, getattr(jaxnorm.nnx, name))


def pytest_configure(config: pytest.Config) -> None:
    if os.environ.get("JAXNORM_FLAX_SWAP") == "1":
        swap()


def _first_line(exc: BaseException) -> str:
    for line in str(exc).splitlines():
        if line.strip():
            return line.strip()
    return ""


def _origin(excinfo: pytest.ExceptionInfo) -> str:
    """The innermost frame in jaxnorm, else the innermost frame in a flax test file."""
    frames = traceback.extract_tb(excinfo.tb)
    for want in ("/jaxnorm/", "_test.py"):
        for frame in reversed(frames):
            if want in frame.filename.replace(os.sep, "/"):
                path = frame.filename.replace(os.sep, "/")
                short = path[path.rindex("/jaxnorm/") + 1 :] if want == "/jaxnorm/" else path
                if want == "_test.py" and "/tests/" in short:
                    short = short[short.rindex("/tests/") + 1 :]
                return f"{short}:{frame.lineno} in {frame.name}"
    if frames:
        return f"{frames[-1].filename}:{frames[-1].lineno} in {frames[-1].name}"
    return ""


def _write(record: dict) -> None:
    path = os.environ.get("JAXNORM_FLAX_RECORD")
    if path:
        with open(f"{path}.{os.getpid()}", "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    outcome = yield
    report = outcome.get_result()
    if report.when != "call" and report.passed:
        return  # setup and teardown that went fine say nothing
    record = {"nodeid": item.nodeid, "outcome": report.outcome, "when": report.when}
    if report.when != "call" and report.failed:
        record["outcome"] = "error"
    if report.failed and call.excinfo is not None:
        record["type"] = call.excinfo.type.__name__
        record["message"] = _first_line(call.excinfo.value)
        record["origin"] = _origin(call.excinfo)
    _write(record)


def pytest_collectreport(report: pytest.CollectReport) -> None:
    if report.failed:
        text = str(report.longrepr)
        lines = [ln.strip() for ln in text.splitlines() if ln.strip().startswith("E ")]
        _write(
            {
                "nodeid": report.nodeid,
                "outcome": "failed",
                "when": "collect",
                "type": "CollectionError",
                "message": lines[-1][2:].strip() if lines else text.splitlines()[-1],
                "origin": report.nodeid,
            }
        )
