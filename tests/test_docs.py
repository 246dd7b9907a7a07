"""The documentation: API coverage, docstrings, public signatures, and every guide example.

* Every name in each public module's ``__all__`` has a docstring (constants: a ``#:``
  comment where they are assigned; NamedTuples: every field described) and an entry on
  that module's API page ``docs/api/<module>.md``, and every entry there is public.
* No public function, class or method takes a private (underscore) parameter.
* Every Python code block of the guides (``docs/*.md``) and of ``README.md`` is a doctest
  (``>>>`` prompts) and passes; the blocks of one page share a namespace, top to bottom.

The HTML build itself (``python -m sphinx -W -b html docs docs/_build/html``) runs in
``.ci/run``.
"""

from __future__ import annotations

import doctest
import importlib
import inspect
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
sys.path.insert(0, str(DOCS / "_ext"))

from jaxnorm_api import (  # noqa: E402
    PUBLIC_MODULES,
    api_entries,
    data_doc,
    public_names,
    resolve,
)

# Control characters a docstring never means to hold: a non-raw docstring turns the TeX
# of ``\frac``, ``\beta``, ``\tau``, ``\alpha`` or ``\v`` into them.
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\t]")


def _is_data(obj) -> bool:
    return not (inspect.ismodule(obj) or inspect.isclass(obj) or callable(obj))


def _own_doc(obj) -> str:
    """The object's own docstring ('' for a NamedTuple's generated one)."""
    doc = obj.__doc__ or ""
    if inspect.isclass(obj) and hasattr(obj, "_fields"):
        generated = f"{obj.__name__}({', '.join(obj._fields)})"
        if doc.strip() == generated:
            return ""
    return doc


def _attributes_section(doc: str) -> set[str]:
    """Names described in a Google-style ``Attributes:`` section."""
    names, inside, indent = set(), False, None
    for line in inspect.cleandoc(doc).splitlines():
        if line.strip() == "Attributes:":
            inside, indent = True, None
            continue
        if not inside or not line.strip():
            continue
        width = len(line) - len(line.lstrip())
        if width == 0:
            break
        indent = width if indent is None else indent
        match = re.match(r"\s*(\w+)\s*(\(.*\))?:", line)
        if width == indent and match:
            names.add(match.group(1))
    return names


def _public_objects():
    for modname in PUBLIC_MODULES:
        module = importlib.import_module(modname)
        for name in public_names(module):
            yield modname, name, getattr(module, name)


@pytest.mark.parametrize("modname", PUBLIC_MODULES)
def test_every_public_name_has_a_docstring(modname):
    module = importlib.import_module(modname)
    assert (module.__doc__ or "").strip(), f"{modname} has no module docstring"
    missing = []
    for name in public_names(module):
        obj = getattr(module, name)
        where = f"{modname}.{name}"
        if _is_data(obj):
            doc = data_doc(modname, name)
            if not doc:
                missing.append(f"{where}: a constant with no '#:' comment where it is assigned")
            continue
        doc = _own_doc(obj)
        if not doc.strip():
            missing.append(f"{where}: no docstring")
            continue
        if _CONTROL.search(doc):
            bad = sorted({repr(c) for c in _CONTROL.findall(doc)})
            missing.append(
                f"{where}: control characters {bad} in the docstring (a backslash escape "
                'in a non-raw docstring; use r""" or a double backslash)'
            )
        fields = getattr(obj, "_fields", None) if inspect.isclass(obj) else None
        if fields:
            described = _attributes_section(doc)
            absent = [f for f in fields if f not in described]
            if absent:
                missing.append(
                    f"{where}: NamedTuple fields {absent} not described in an 'Attributes:' "
                    "section of its docstring"
                )
    assert not missing, "\n".join(missing)


def _pages():
    return {p.stem: api_entries(p) for p in (DOCS / "api").glob("jaxnorm*.md")}


@pytest.mark.parametrize("modname", PUBLIC_MODULES)
def test_every_public_name_has_an_api_entry(modname):
    page = DOCS / "api" / f"{modname}.md"
    assert page.exists(), f"no API page {page.relative_to(ROOT)} for {modname}"
    entries = api_entries(page)
    assert (modname, False) in entries["module"], f"{page.name} does not automodule {modname}"
    listed = {}
    for full, _ in entries["autosummary"]:
        obj = resolve(full)  # an entry that no longer imports fails here, by name
        listed.setdefault(id(obj), full)
    module = importlib.import_module(modname)
    names = public_names(module)
    absent = [n for n in names if id(getattr(module, n)) not in listed]
    assert not absent, f"{page.name} has no autosummary entry for {absent}"
    allowed = {id(getattr(module, n)) for n in names}
    stale = [full for full, _ in entries["autosummary"] if id(resolve(full)) not in allowed]
    assert not stale, f"{page.name} lists names not in {modname}'s public names: {stale}"


def test_every_documented_object_has_a_page_of_its_own():
    """Each public object gets a generated page (a ``:toctree:`` entry) somewhere."""
    with_page = {
        id(resolve(full))
        for entries in _pages().values()
        for full, toctree in entries["autosummary"]
        if toctree
    }
    modules = set(PUBLIC_MODULES)
    lacking = [
        f"{m}.{n}"
        for m, n, obj in _public_objects()
        if id(obj) not in with_page and not (inspect.ismodule(obj) and obj.__name__ in modules)
    ]
    assert not lacking, f"no generated API page for {lacking}"


def test_api_index_lists_every_module_page():
    index = (DOCS / "api" / "index.md").read_text(encoding="utf-8")
    toctree = re.search(r"```\{toctree\}(.*?)```", index, re.S).group(1).split()
    assert [m for m in PUBLIC_MODULES if m not in toctree] == []


def _signature_owners():
    """(label, callable) for public functions, classes, and methods jaxnorm defines."""
    seen = set()
    for modname, name, obj in _public_objects():
        if _is_data(obj) or inspect.ismodule(obj) or id(obj) in seen:
            continue
        seen.add(id(obj))
        yield f"{modname}.{name}", obj
        if inspect.isclass(obj):
            for attr, member in vars(obj).items():
                if (attr.startswith("_") and attr != "__call__") or not callable(member):
                    continue
                if getattr(member, "__module__", "").startswith("jaxnorm"):
                    yield f"{modname}.{name}.{attr}", member


def test_no_private_parameters_in_public_signatures():
    offenders = []
    for label, fn in _signature_owners():
        try:
            signature = inspect.signature(fn)
        except (TypeError, ValueError):  # builtins without a signature (none today)
            continue
        private = [p for p in signature.parameters if p.startswith("_")]
        if private:
            offenders.append(f"{label}{signature}: {private}")
    assert not offenders, "\n".join(offenders)


# ---------------------------------------------------------------------------------------
# Guide examples


_FENCE = re.compile(r"^(\s*)(`{3,}|~{3,})\s*([\w{}.-]*)(.*)$")
_PYTHON_INFOS = {"python", "py", "pycon", "python3", "{code-block}", "{code}"}


def _code_blocks(path: Path):
    """(first line number, info string, text) of every fenced block of a Markdown file."""
    lines = path.read_text(encoding="utf-8").splitlines()
    i = 0
    while i < len(lines):
        match = _FENCE.match(lines[i])
        if not match:
            i += 1
            continue
        indent, fence, info, rest = match.groups()
        start, body = i + 1, []
        i += 1
        while i < len(lines) and not lines[i].strip().startswith(fence):
            body.append(lines[i][len(indent) :])
            i += 1
        i += 1
        yield start + 1, (info + " " + rest.strip()).strip(), "\n".join(body)


def _is_python(info: str) -> bool:
    head = info.split()[0] if info else ""
    if head in ("{code-block}", "{code}"):
        return "python" in info
    return head in _PYTHON_INFOS


_GUIDES = sorted(p for p in DOCS.glob("*.md")) + [ROOT / "README.md"]


@pytest.mark.parametrize("path", _GUIDES, ids=lambda p: str(p.relative_to(ROOT)))
def test_guide_examples_run(path, tmp_path, monkeypatch):
    blocks = [(line, text) for line, info, text in _code_blocks(path) if _is_python(info)]
    not_doctests = [line for line, text in blocks if not text.lstrip().startswith(">>>")]
    assert not not_doctests, (
        f"{path.name}: Python blocks at lines {not_doctests} are not doctests; write them "
        "with >>> prompts so the test suite runs them"
    )
    if not blocks:
        pytest.skip(f"{path.name} has no Python examples")
    monkeypatch.chdir(tmp_path)  # examples that write files write them here
    parser = doctest.DocTestParser()
    runner = doctest.DocTestRunner(
        optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE, verbose=False
    )
    globs = {"__name__": f"docs_{path.stem}"}
    report = []
    for line, text in blocks:
        test = parser.get_doctest(text, globs, f"{path.name}:{line}", str(path), line - 1)
        runner.run(test, out=report.append, clear_globs=False)
        globs = test.globs  # DocTest copies its globals: carry them to the next block
    results = runner.summarize(verbose=False)
    assert results.failed == 0, "".join(report)


def test_readme_links_and_images_exist():
    """Every relative link and image of the README names a file of the repository."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    targets = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text)
    relative = [t for t in targets if not re.match(r"[a-z]+://", t)]
    assert relative, "the README links into the docs"
    missing = [t for t in relative if not (ROOT / t).exists()]
    assert not missing, f"README links to missing files: {missing}"
