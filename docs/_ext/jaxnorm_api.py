"""What the API reference documents, shared by ``docs/conf.py`` and ``tests/test_docs.py``.

* :data:`PUBLIC_MODULES`: the public modules; each has a page ``docs/api/<module>.md``.
* :func:`public_names`: a module's ``__all__`` (or, without one, the public names it
  defines itself).
* :func:`data_doc`: the documentation of a module-level constant: its ``#:`` comment (or
  the string literal after it), looked up in the module that assigns it, following
  ``from ... import`` re-exports. Sphinx's autodoc only looks in the module named in the
  directive, so :func:`setup` feeds it these comments for re-exported constants.
* :func:`api_entries`: the autosummary entries of an API page, as full dotted names.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import re
from pathlib import Path
from types import ModuleType

PUBLIC_MODULES = (
    "jaxnorm",
    "jaxnorm.functional",
    "jaxnorm.stats",
    "jaxnorm.state",
    "jaxnorm.variants",
    "jaxnorm.linen",
    "jaxnorm.nnx",
    "jaxnorm.tools",
    "jaxnorm.checkpoint",
    "jaxnorm.interop.torch",
)


def public_names(module: ModuleType) -> list[str]:
    """``__all__``, or the public names the module defines itself (not imports)."""
    names = getattr(module, "__all__", None)
    if names is not None:
        return list(names)
    return [
        name
        for name, obj in vars(module).items()
        if not name.startswith("_")
        and not inspect.ismodule(obj)
        and getattr(obj, "__module__", None) == module.__name__
    ]


def _attr_docs(modname: str) -> dict[str, str]:
    from sphinx.pycode import ModuleAnalyzer

    try:
        analyzer = ModuleAnalyzer.for_module(modname)
        docs = analyzer.find_attr_docs()
    except Exception:  # a module without source (never in jaxnorm)
        return {}
    return {key[1]: "\n".join(lines).strip() for key, lines in docs.items() if key[0] == ""}


def _import_source(modname: str, name: str) -> tuple[str, str] | None:
    """Where ``modname`` imports ``name`` from: ``(module, original name)``, or None."""
    module = importlib.import_module(modname)
    source = inspect.getsource(module)
    package = modname if hasattr(module, "__path__") else modname.rpartition(".")[0]
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom):
            for alias in node.names:
                if (alias.asname or alias.name) == name:
                    base = node.module or ""
                    if node.level:
                        parts = package.split(".")
                        parent = ".".join(parts[: len(parts) - node.level + 1])
                        base = f"{parent}.{base}" if base else parent
                    return base, alias.name
    return None


def data_doc(modname: str, name: str, _depth: int = 0) -> str:
    """The ``#:`` documentation of constant ``name`` of ``modname`` ('' if none)."""
    doc = _attr_docs(modname).get(name, "")
    if doc or _depth > 5:
        return doc
    origin = _import_source(modname, name)
    if origin is None:
        return ""
    return data_doc(origin[0], origin[1], _depth + 1)


_DIRECTIVE = re.compile(
    r"^\.\.\s+(automodule|currentmodule|py:currentmodule|autosummary)::\s*(.*)$"
)


def api_entries(page: Path) -> dict[str, list[tuple[str, bool]]]:
    """The ``automodule`` and ``autosummary`` entries of an API page.

    The pages are MyST Markdown whose directives sit in ``{eval-rst}`` blocks (Sphinx's
    autosummary stub generator reads only reStructuredText syntax). Returns
    ``{"module": [(name, False)], "autosummary": [(full name, has_toctree)]}``, each
    autosummary item resolved against the current module, ``~`` prefixes dropped.
    """
    out: dict[str, list[tuple[str, bool]]] = {"module": [], "autosummary": []}
    current = ""
    lines = page.read_text(encoding="utf-8").splitlines()
    i = 0
    while i < len(lines):
        match = _DIRECTIVE.match(lines[i].strip())
        i += 1
        if not match:
            continue
        kind, argument = match.groups()
        if kind != "autosummary":
            current = argument.strip()
            out["module"].append((current, False))
            continue
        body = []
        while i < len(lines) and (not lines[i].strip() or lines[i].startswith(" ")):
            body.append(lines[i].strip())
            i += 1
        toctree = any(line.startswith(":toctree:") for line in body)
        for line in body:
            if not line or line.startswith(":"):
                continue
            name = line.lstrip("~")
            full = name if name.startswith("jaxnorm") else f"{current}.{name}"
            out["autosummary"].append((full, toctree))
    return out


def resolve(full_name: str):
    """The object ``a.b.c`` names: attribute ``c`` of module ``a.b``, else module ``a.b.c``.

    The attribute comes first, as for Python's ``from a.b import c``: ``jaxnorm.functional``
    exports the function ``dyt`` from its submodule ``jaxnorm.functional.dyt``.
    """
    modname, _, attr = full_name.rpartition(".")
    if modname:
        try:
            return getattr(importlib.import_module(modname), attr)
        except (ImportError, AttributeError):
            pass
    return importlib.import_module(full_name)


def _process_docstring(app, what, name, obj, options, lines):
    # A constant has no docstring of its own: autodoc falls back to its type's
    # (``str``'s, ``tuple``'s). Use the ``#:`` comment where the constant is assigned.
    if what != "data":
        return
    modname, _, attr = name.rpartition(".")
    lines[:] = data_doc(modname, attr).splitlines()


def _skip_data_members(app, what, name, obj, skip, options):
    # A class's data members (dataclass fields of the Flax modules, NamedTuple fields,
    # which document themselves as "Alias for field number N") are described by the
    # class docstring's "Attributes:" section, which napoleon turns into entries. A
    # field whose default is callable (``bias_init``, ``param_dtype``) is skipped too:
    # only methods jaxnorm defines are documented as members.
    if what != "class":
        return None
    if not callable(obj) and not isinstance(obj, property):
        return True
    module = getattr(obj, "__module__", None) or ""
    if not isinstance(obj, property) and not module.startswith("jaxnorm"):
        return True
    return None


def _constructor_signature(app, what, name, obj, options, signature, return_annotation):
    """An NNX layer's signature from its ``__init__``: flax's ``nnx.Module`` metaclass
    defines ``__call__(*args, **kwargs)``, which autodoc would otherwise show for every
    class. ``inspect.signature`` honours the ``__signature__`` of ``@extends`` variants."""
    if what != "class" or not inspect.isclass(obj):
        return None
    if type(obj).__call__ is type.__call__ or signature not in ("(*args, **kwargs)", None):
        return None
    from sphinx.util.inspect import stringify_signature

    init = inspect.signature(obj.__init__)
    params = list(init.parameters.values())[1:]  # without self
    shown = init.replace(parameters=params, return_annotation=inspect.Signature.empty)
    annotated = app.config.autodoc_typehints not in ("description", "none")
    return stringify_signature(shown, show_annotation=annotated), return_annotation


def setup(app):
    app.connect("autodoc-process-signature", _constructor_signature)
    app.connect("autodoc-process-docstring", _process_docstring)
    app.connect("autodoc-skip-member", _skip_data_members)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
