"""Run flax 0.12.8's own tests with jaxnorm's modules in flax's place; summarize the failures.

    python .ci/flax_suite/run.py                  # every flax test file that builds a norm
    python .ci/flax_suite/run.py --suite core     # linen NormalizationTest + NNX normalization
    python .ci/flax_suite/run.py --summary-only   # categories only, no list of test ids

Steps: find flax 0.12.8's source distribution (``--sdist``, ``$FLAX_SDIST``, the cache, or
``pip download``), check its SHA-256, unpack its ``tests/`` into a scratch folder, run pytest
there with the ``jaxnorm_swap`` plugin (jaxnorm's BatchNorm, LayerNorm, RMSNorm, GroupNorm
and InstanceNorm in place of flax's, in both ``flax.linen`` and ``flax.nnx``), and group the
failures by exception type and first line of the message.

``--baseline`` adds a run without the swap (cached per flax/jax version and selection): it
separates failures that flax has on this machine anyway from those that jaxnorm causes. Categories
matching ``KNOWN`` are labeled with the difference they come from.

A developer tool: nothing here is collected by the project's pytest run.
"""

from __future__ import annotations

import argparse
import collections
import glob
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]

FLAX_VERSION = "0.12.8"
SDIST_NAME = f"flax-{FLAX_VERSION}.tar.gz"
# SHA-256 of flax-0.12.8.tar.gz as served by PyPI (pip verified it on download).
SDIST_SHA256 = "1bb438775b967a3f1f42b9c3d4ddf1d2883cd6406589f9cecdc244634036bdc4"
CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "jaxnorm_flax_suite"

# The normalization tests proper.
CORE = ["linen/linen_test.py::NormalizationTest", "nnx/nn/normalization_test.py"]
# Every test file of flax 0.12.8 that builds one of the five norms through its public name
# (``nn.``/``linen.``/``nnx.BatchNorm`` ...), whole: about 1,500 tests.
FULL = [
    "linen/linen_test.py",
    "linen/linen_module_test.py",
    "linen/linen_transforms_test.py",
    "linen/summary_test.py",
    "nnx/nn/normalization_test.py",
    "nnx/nn/linear_test.py",
    "nnx/bridge/wrappers_test.py",
    "nnx/graph_utils_test.py",
    "nnx/helpers_test.py",
    "nnx/integration_test.py",
    "nnx/module_test.py",
    "nnx/summary_test.py",
    "nnx/transforms_test.py",
]

# (regex on "Type: first line", label). A category whose key matches is labeled; the labels
# name the entries of the "Compatibility with flax" section or the item of issue #11.
KNOWN: list[tuple[str, str]] = [
    (r"OrderDependent", "order-dependent: state left by an earlier test in the same file"),
    (
        r"cannot include the leading dimension.*does not match",
        "deliberate: error wording (the test matches flax's exact message)",
    ),
    (
        r"leave at least one other axis to reduce",
        "deliberate: InstanceNorm refuses input with nothing to reduce",
    ),
    (
        r"Not equal to tolerance.*\[NormalizationTest\.test_instance_norm\]",
        "deliberate: more exact variance (the test's float32 reference is 1e-3 off float64)",
    ),
    (r"the mode is not set \(use_running_average=None\)", "deliberate: NNX BatchNorm needs a mode"),
    (r"No module named 'cloudpickle'", "environment: cloudpickle not installed"),
    (r"unexpected keyword argument 'promote_dtype'", "issue #11 item 8: promote_dtype"),
    (r"complex", "issue #11 item 9: complex dtypes"),
    (r"one value per (channel|feature)|more than 1 value per", "issue #11 item 10: one value"),
]

_NORM_NAMES = r"(BatchNorm|LayerNorm|RMSNorm|GroupNorm|InstanceNorm)"


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def find_sdist(explicit: str | None) -> Path:
    """A local flax-0.12.8.tar.gz with the pinned hash, downloading it only as a last resort."""
    candidates = [explicit, os.environ.get("FLAX_SDIST"), CACHE / SDIST_NAME]
    candidates.append(Path(tempfile.gettempdir()) / "flaxsdist" / SDIST_NAME)
    for c in candidates:
        if c and Path(c).is_file():
            path = Path(c)
            break
    else:
        CACHE.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "pip", "download", f"flax=={FLAX_VERSION}", "--no-deps"]
        cmd += ["--no-binary", ":all:", "-d", str(CACHE)]
        print("fetching the flax sdist:", " ".join(cmd), file=sys.stderr)
        if subprocess.run(cmd).returncode != 0:
            sys.exit(
                f"could not download {SDIST_NAME}. Offline, copy it from any machine "
                f"(pip download flax=={FLAX_VERSION} --no-deps --no-binary :all:) and pass "
                f"--sdist PATH or set FLAX_SDIST."
            )
        path = CACHE / SDIST_NAME
    digest = sha256(path)
    if digest != SDIST_SHA256:
        sys.exit(f"{path} has SHA-256 {digest}, expected {SDIST_SHA256} (flax {FLAX_VERSION}).")
    return path


def unpack_tests(sdist: Path, workdir: Path) -> Path:
    """Extract the sdist's tests/ (and LICENSE) into workdir; return the tests folder."""
    if workdir.exists():
        shutil.rmtree(workdir)
    workdir.mkdir(parents=True)
    prefix = f"flax-{FLAX_VERSION}/"
    with tarfile.open(sdist) as tar:
        members = [
            m
            for m in tar.getmembers()
            if (m.name.startswith(prefix + "tests/") or m.name == prefix + "LICENSE")
            and (m.isfile() or m.isdir())
        ]
        for m in members:
            m.name = m.name[len(prefix) :]
        tar.extractall(workdir, members=members, filter="data")
    tests = workdir / "tests"
    # An ini of our own stops pytest from picking up any config above the scratch folder.
    (tests / "pytest.ini").write_text("[pytest]\naddopts =\n")
    return tests


def run_pytest(tests: Path, targets, *, swap, workers, keyword, timeout, strict=True) -> list[dict]:
    """One pytest process per target, so a test that leaves flax's global state dirty
    (e.g. ``nnx.tabulate`` interrupted by an exception) cannot fail other files' tests."""
    label = "jaxnorm swapped in" if swap else "baseline (flax as shipped)"
    print(f"running {label}: {len(targets)} targets, one process each", file=sys.stderr)
    records = []
    for target in targets:
        record = tests.parent / ("swap" if swap else "baseline")
        for old in glob.glob(f"{record}.*"):
            os.remove(old)
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([str(HERE), str(REPO), env.get("PYTHONPATH", "")])
        env["JAXNORM_FLAX_RECORD"] = str(record)
        env["JAXNORM_FLAX_SWAP"] = "1" if swap else "0"
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"]
        cmd += ["-p", "jaxnorm_swap", "--rootdir", str(tests), "-c", str(tests / "pytest.ini")]
        cmd += ["--tb=no", "-rN", "-W", "ignore::DeprecationWarning"]
        cmd += ["--continue-on-collection-errors"]
        if workers:
            cmd += ["-n", str(workers)]
        if keyword:
            cmd += ["-k", keyword]
        cmd.append(target)
        try:
            proc = subprocess.run(cmd, cwd=tests, env=env, timeout=timeout, capture_output=True)
        except subprocess.TimeoutExpired:
            sys.exit(f"pytest ({label}) ran past --timeout {timeout}s on {target}")
        tail = proc.stdout.decode(errors="replace").strip().splitlines()[-1:]
        print(f"  {target}: {tail[0] if tail else '(no output)'}", file=sys.stderr, flush=True)
        found = []
        for part in sorted(glob.glob(f"{record}.*")):
            with open(part, encoding="utf-8") as f:
                found += [json.loads(line) for line in f if line.strip()]
        if strict and not found and proc.returncode not in (0, 5):  # 5: nothing selected by -k
            out = (proc.stdout + proc.stderr).decode(errors="replace")[-4000:]
            sys.exit(f"pytest ({label}) recorded nothing, exit status {proc.returncode}:\n{out}")
        records += found
    return records


def baseline_key(targets, keyword) -> str:
    import flax
    import jax

    text = json.dumps([SDIST_SHA256, flax.__version__, jax.__version__, list(targets), keyword])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def category(rec: dict) -> str:
    """Exception type and first line, with numbers and norm class names generalized.

    Assertion failures also keep the test's function name: the same numpy message from two
    tests says nothing about a shared cause.
    """
    msg = re.sub(r"-?\d+(\.\d+)?(e[-+]?\d+)?", "#", rec.get("message") or "")
    msg = re.sub(r"\(#(, #)*,?\)", "(#...)", msg)
    msg = re.sub(_NORM_NAMES, "<Norm>", msg)
    key = f"{rec.get('type', '?')}: {msg}"[:160]
    if rec.get("type") == "AssertionError":
        key += f"  [{function(rec['nodeid'])}]"
    return key


def function(nodeid: str) -> str:
    """``file::Class::test_x17 (params)`` -> ``Class.test_x`` (parameterized suffixes dropped)."""
    parts = nodeid.split("::")
    name = re.sub(r"[\d_]*(\s.*)?$", "", parts[-1].split("[")[0])
    name = re.sub(r"_$", "", name)
    return ".".join(parts[1:-1] + [name]) if len(parts) > 2 else name


def label(key: str) -> str:
    for pattern, text in KNOWN:
        if re.search(pattern, key):
            return text
    return ""


def recheck(records: list[dict], alone: list[dict]) -> set[str]:
    """Give each failure the cause it shows alone; return the ids that pass alone.

    A failure whose test passes alone is order-dependent: an earlier test left flax's
    global state dirty (``nnx.tabulate`` interrupted by an exception does). One that fails
    alone with another error is filed under that error, the first one kept as ``in_sequence``.
    """
    by_id = {r["nodeid"]: r for r in alone if r.get("when") in ("call", "setup", None)}
    passed = set()
    for r in records:
        a = by_id.get(r["nodeid"])
        if r["outcome"] not in ("failed", "error") or a is None:
            continue
        if a["outcome"] == "passed":
            passed.add(r["nodeid"])
            r["in_sequence"] = f"{r.get('type')}: {r.get('message')}"
            r["type"], r["message"] = "OrderDependent", "passes when run alone"
        elif a.get("type") and (a["type"], a.get("message")) != (r.get("type"), r.get("message")):
            r["in_sequence"] = f"{r.get('type')}: {r.get('message')}"
            r["type"], r["message"], r["origin"] = a["type"], a.get("message"), a.get("origin")
    return passed


def summarize(
    records, base_failed: set[str] | None, alone_passed: set[str] | None, summary_only: bool
) -> None:
    outcomes = collections.Counter(r["outcome"] for r in records)
    counts = ", ".join(f"{v} {k}" for k, v in outcomes.items())
    print(f"\n{sum(outcomes.values())} results: {counts}")
    failed = [r for r in records if r["outcome"] in ("failed", "error")]
    groups: dict[str, list[dict]] = collections.defaultdict(list)
    for r in failed:
        groups[category(r)].append(r)
    if base_failed is not None:
        also = sum(r["nodeid"] in base_failed for r in failed)
        print(f"{len(failed)} failed with jaxnorm; {also} of them also fail with flax as shipped")
    if alone_passed is not None:
        n = len(alone_passed)
        print(f"{n} of the {len(failed)} pass when run alone: another test left state behind")
    print(f"{len(groups)} categories\n")
    for i, (key, recs) in enumerate(sorted(groups.items(), key=lambda kv: -len(kv[1])), 1):
        tag = label(key)
        print(f"[{i}] {len(recs)} x {key}")
        if tag:
            print(f"    label: {tag}")
        if base_failed is not None:
            also = sum(r["nodeid"] in base_failed for r in recs)
            if also:
                print(f"    {also} of {len(recs)} also fail with flax as shipped")
        if alone_passed is not None:
            alone = sum(r["nodeid"] in alone_passed for r in recs)
            if alone:
                print(f"    {alone} of {len(recs)} pass when run alone (order-dependent)")
        print(f"    example: {recs[0]['nodeid']}")
        print(f"    origin:  {recs[0].get('origin', '')}")
        funcs = collections.Counter(function(r["nodeid"]) for r in recs)
        print("    tests:   " + ", ".join(f"{f} ({n})" for f, n in funcs.most_common(6)))
        if len(funcs) > 6:
            print(f"             ... and {len(funcs) - 6} more test functions")
        if not summary_only:
            for r in recs:
                print(f"      {r['nodeid']}")
        print()


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--suite", choices=["core", "full"], default="full")
    p.add_argument("--summary-only", action="store_true", help="no list of failing test ids")
    p.add_argument("--sdist", help=f"path to {SDIST_NAME} (offline use)")
    p.add_argument("--workdir", default=str(Path(tempfile.gettempdir()) / "jaxnorm_flax_suite"))
    p.add_argument("-k", dest="keyword", help="pytest -k expression")
    p.add_argument("-n", dest="workers", type=int, default=0, help="pytest-xdist workers")
    p.add_argument("--timeout", type=int, default=1800, help="seconds per pytest run")
    p.add_argument("--baseline", action="store_true", help="also run flax as shipped (cached)")
    p.add_argument("--refresh-baseline", action="store_true", help="rerun the cached baseline")
    p.add_argument(
        "--no-recheck", action="store_true", help="do not rerun each failure in a fresh process"
    )
    p.add_argument("--from-json", help="summarize (and recheck) a previous --json, no full run")
    p.add_argument("--json", help="write every recorded result (with the swap) to this file")
    args = p.parse_args(argv)

    targets = CORE if args.suite == "core" else FULL
    tests = unpack_tests(find_sdist(args.sdist), Path(args.workdir))

    base_failed = None
    if args.baseline or args.refresh_baseline:
        cached = CACHE / f"baseline-{baseline_key(targets, args.keyword)}.json"
        if cached.is_file() and not args.refresh_baseline:
            base = json.loads(cached.read_text())
            print(f"baseline from cache: {cached}", file=sys.stderr)
        else:
            base = run_pytest(
                tests,
                targets,
                swap=False,
                workers=args.workers,
                keyword=args.keyword,
                timeout=args.timeout,
            )
            CACHE.mkdir(parents=True, exist_ok=True)
            cached.write_text(json.dumps(base))
        base_failed = {r["nodeid"] for r in base if r["outcome"] in ("failed", "error")}
        print(f"baseline: {len(base_failed)} of {len(base)} fail with flax", file=sys.stderr)

    if args.from_json:
        records = json.loads(Path(args.from_json).read_text())
        for r in records:  # a previous recheck's remapping is redone below
            if "in_sequence" in r:
                r["type"], _, r["message"] = r.pop("in_sequence").partition(": ")
    else:
        records = run_pytest(
            tests,
            targets,
            swap=True,
            workers=args.workers,
            keyword=args.keyword,
            timeout=args.timeout,
        )
    if args.json:  # before the recheck too, so an interrupted recheck loses nothing
        Path(args.json).write_text(json.dumps(records, indent=1))
    alone_passed = None
    if not args.no_recheck:
        failed = [r["nodeid"] for r in records if r["outcome"] in ("failed", "error")]
        failed = [n for n in failed if "::" in n]  # collection errors cannot pass alone
        print("rechecking each failure alone, in a fresh process:", file=sys.stderr)
        alone = run_pytest(
            tests, failed, swap=True, workers=0, keyword=None, timeout=args.timeout, strict=False
        )
        alone_passed = recheck(records, alone)
    if args.json:
        Path(args.json).write_text(json.dumps(records, indent=1))
    summarize(records, base_failed, alone_passed, args.summary_only)


if __name__ == "__main__":
    main()
