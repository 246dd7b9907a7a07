"""Smoke test of an installed jaxnorm wheel: run it with the venv the wheel went into.

    python -m build && python -m venv /tmp/wheelvenv
    /tmp/wheelvenv/bin/pip install dist/jaxnorm-*.whl
    (cd /tmp && /tmp/wheelvenv/bin/python /path/to/repo/.ci/wheel_smoke.py)

Checks that the package imports from site-packages (not from a checkout), that every
module of the checkout's ``jaxnorm/`` is in the wheel, that ``jaxnorm.__version__`` is the installed
distribution's version, that the license and ``py.typed`` ship, and that a batch norm
and a layer norm give float64 NumPy's numbers.
"""

import importlib
import importlib.metadata as metadata
import sys
from pathlib import Path

import numpy as np

import jaxnorm

SOURCE = Path(__file__).resolve().parent.parent / "jaxnorm"


def source_modules() -> list[str]:
    """Every module of the checkout's ``jaxnorm/`` tree: each must ship in the wheel."""
    names = []
    for path in sorted(SOURCE.rglob("*.py")):
        parts = path.relative_to(SOURCE.parent).with_suffix("").parts
        names.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return names


def main() -> None:
    where = Path(jaxnorm.__file__).resolve()
    if "site-packages" not in where.parts:
        sys.exit(f"wheel smoke: jaxnorm imported from {where}, not from an installed wheel")
    modules = source_modules()
    if len(modules) < 20:
        sys.exit(f"wheel smoke: found only {len(modules)} modules under {SOURCE}")
    for name in modules:
        importlib.import_module(name)
    installed = metadata.version("jaxnorm")
    if jaxnorm.__version__ != installed:
        sys.exit(f"wheel smoke: jaxnorm.__version__ {jaxnorm.__version__} != wheel {installed}")
    files = {str(f) for f in metadata.files("jaxnorm") or ()}
    for needed in ("jaxnorm/py.typed",):
        if needed not in files:
            sys.exit(f"wheel smoke: {needed} is missing from the wheel")
    if not any(f.endswith("LICENSE") for f in files):
        sys.exit("wheel smoke: no LICENSE in the wheel's metadata")

    rng = np.random.default_rng(0)
    x = (3.0 * rng.standard_normal((64, 8)) + 1e4).astype(np.float32)
    x64 = x.astype(np.float64)
    y, stats = jaxnorm.batch_norm(x, jaxnorm.init_batch_stats(8), training=True, momentum=0.9)
    ref = (x64 - x64.mean(0)) / np.sqrt(x64.var(0) + 1e-5)
    np.testing.assert_allclose(np.asarray(y), ref, atol=2e-3)  # float32 spacing at 1e4
    np.testing.assert_allclose(np.asarray(stats.var), 0.9 + 0.1 * x64.var(0), rtol=1e-5)
    z = jaxnorm.layer_norm(x)
    ref = (x64 - x64.mean(-1, keepdims=True)) / np.sqrt(x64.var(-1, keepdims=True) + 1e-6)
    np.testing.assert_allclose(np.asarray(z), ref, atol=2e-3)
    print(f"wheel smoke: jaxnorm {installed} from {where.parent}: imports and numbers OK")


if __name__ == "__main__":
    main()
