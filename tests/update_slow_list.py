"""Rewrite ``tests/slow_tests.txt`` from a timed run: every test above a time budget.

``pytest -m "not slow"`` is the development loop. Besides the modules in
``conftest.SLOW_MODULES``, it leaves out each test listed in ``slow_tests.txt``: those
that took longer than ``--seconds`` (setup, call and teardown) in a measured run of the
whole suite. Regenerate the list after adding slow tests::

    python -m pytest -n 2 --junitxml=/tmp/all.xml
    python tests/update_slow_list.py /tmp/all.xml --seconds 1.5

With several files (say a full run and a run of the loop), a test over the budget in any
of them is listed.

A test missing from the list runs in the loop, so a new test is never silently skipped.
"""

from __future__ import annotations

import argparse
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LIST = Path(__file__).resolve().parent / "slow_tests.txt"


def node_id(classname: str, name: str) -> str:
    """pytest's node id for a junit ``(classname, name)``: ``tests.test_x.TestY`` is the
    file ``tests/test_x.py`` and the class ``TestY``; a doctest's classname is its module."""
    parts = classname.split(".")
    for k in range(len(parts), 0, -1):
        path = "/".join(parts[:k]) + ".py"
        if (ROOT / path).is_file():
            return "::".join([path, *parts[k:], name])
    raise ValueError(f"no test file for junit classname {classname!r}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("junit", nargs="+", help="pytest --junitxml files of timed runs")
    parser.add_argument("--seconds", type=float, default=1.0, help="budget per test")
    args = parser.parse_args()
    slow = []
    for junit in args.junit:
        for case in ET.parse(junit).iter("testcase"):
            if float(case.get("time", 0.0)) > args.seconds:
                slow.append(node_id(case.get("classname", ""), case.get("name", "")))
    header = (
        f"# Tests over {args.seconds:g} s in a measured run (tests/update_slow_list.py);\n"
        f"# `pytest -m 'not slow'` leaves them out. One pytest node id per line.\n"
    )
    LIST.write_text(header + "".join(f"{n}\n" for n in sorted(set(slow))))
    print(f"{len(set(slow))} slow tests written to {LIST}")


if __name__ == "__main__":
    main()
