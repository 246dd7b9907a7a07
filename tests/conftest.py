"""Test configuration: 8 virtual CPU devices for the multi-device tests; the slow marker.

XLA reads ``XLA_FLAGS`` once, when jax first initializes its backends, so it is set
here, before any test module imports jax.

``pytest -m "not slow"`` is the development loop (under 2 minutes on 2 cores with
``-n 2``): it leaves out the modules below, which train models, start several processes or
run property searches, and every test listed in ``slow_tests.txt``, those measured over a
time budget (``tests/update_slow_list.py`` rewrites it from a timed run). CI runs everything.
"""

import os
from pathlib import Path

import pytest

SLOW_MODULES = {
    "test_experiments_language.py",
    "test_experiments_transformer.py",
    "test_experiments_variants.py",
    "test_experiments_vision.py",
    "test_docs.py",
    "test_fuzz.py",
    "test_multiprocess.py",
    "test_checkpoint_orbax.py",
    "test_parallel.py",
}

_FLAG = "--xla_force_host_platform_device_count=8"
if _FLAG not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _FLAG).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")


_SLOW_LIST = Path(__file__).with_name("slow_tests.txt")
SLOW_TESTS = {
    line.strip()
    for line in _SLOW_LIST.read_text().splitlines()
    if line.strip() and not line.startswith("#")
}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if Path(str(item.fspath)).name in SLOW_MODULES or item.nodeid in SLOW_TESTS:
            item.add_marker(pytest.mark.slow)
