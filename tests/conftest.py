"""Test configuration: 8 virtual CPU devices for the multi-device tests; the slow marker.

XLA reads ``XLA_FLAGS`` once, when jax first initializes its backends, so it is set
here, before any test module imports jax.

``pytest -m "not slow"`` is the development loop: it leaves out the modules below, which
train models, start several processes or run property searches (CI runs everything).
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


def pytest_collection_modifyitems(config, items):
    for item in items:
        if Path(str(item.fspath)).name in SLOW_MODULES:
            item.add_marker(pytest.mark.slow)
