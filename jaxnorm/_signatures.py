"""A variant's signature made from its base's: the keyword parameters are declared once.

A variant that takes everything its base takes, plus a few parameters of its own, is
written ``def variant(own..., **options: Unpack[BaseOptions])`` and decorated with
``@extends(base)``. The decorator

* sets ``variant.__signature__`` to the variant's own parameters followed by the base's
  keyword-only ones, with the base's defaults, so ``help()``, :func:`inspect.signature`
  and the API reference show the whole explicit signature;
* binds every call against that signature, so a misspelt or missing keyword raises
  Python's own ``TypeError`` (naming the variant), and hands the variant its options
  with the base's defaults filled in.

The ``TypedDict`` in ``Unpack[...]`` gives static checkers and IDEs the same keywords;
a test compares it with the base's signature.
"""

from __future__ import annotations

import difflib
import functools
import inspect
from collections.abc import Callable, Collection
from typing import Any, TypeVar

F = TypeVar("F", bound=Callable[..., Any])

_KEYWORD_ONLY = inspect.Parameter.KEYWORD_ONLY
_VAR_KEYWORD = inspect.Parameter.VAR_KEYWORD


def extends(base: Callable[..., Any], *, omit: Collection[str] = ()) -> Callable[[F], F]:
    """Decorate ``fn(own..., **options)`` to take ``base``'s keyword-only parameters.

    Args:
      base: the function (or ``__init__``) whose keyword-only parameters, defaults and
        order the variant takes over.
      omit: names of ``base``'s keyword-only parameters the variant does not take.

    Returns:
      A decorator; the function it returns has the full ``__signature__`` and is called
      with every parameter bound (``options`` hold all of ``base``'s, defaults filled).
    """
    base_parameters = inspect.signature(base).parameters

    def decorate(fn: F) -> F:
        own = inspect.signature(fn)
        declared = [p for p in own.parameters.values() if p.kind is not _VAR_KEYWORD]
        names = {p.name for p in declared}
        unknown = set(omit) - set(base_parameters)
        if unknown or len(declared) == len(own.parameters):
            raise TypeError(
                f"extends({base.__qualname__}) on {fn.__qualname__}: it needs a **options "
                f"parameter, and omit may only name the base's parameters (not {sorted(unknown)})."
            )
        taken = [
            p
            for p in base_parameters.values()
            if p.kind is _KEYWORD_ONLY and p.name not in names and p.name not in omit
        ]
        signature = own.replace(parameters=declared + taken)

        @functools.wraps(fn)
        def variant(*args: Any, **kwargs: Any) -> Any:
            try:
                bound = signature.bind(*args, **kwargs)
            except TypeError as e:
                raise TypeError(f"{fn.__qualname__}(): {e}{_hint(kwargs)}") from None
            bound.apply_defaults()
            return fn(*bound.args, **bound.kwargs)

        variant.__signature__ = signature  # type: ignore[attr-defined]  # before __wrapped__

        def _hint(kwargs: dict[str, Any]) -> str:
            """``" (did you mean 'momentum'?)"`` for a keyword close to an accepted one."""
            accepted = list(signature.parameters)
            for name in kwargs:
                if name not in signature.parameters:
                    close = difflib.get_close_matches(name, accepted, n=1)
                    if close:
                        return f" (did you mean {close[0]!r}?)"
            return ""

        return variant  # type: ignore[return-value]

    return decorate
