"""The reader of the msgpack files written by jaxnorm 0.1 (formats ``/1`` and ``/2``).

A ``jaxnorm.checkpoint/2`` file is a msgpack map ``{"format", "sha256", "payload"}``:
``payload`` is the msgpack of ``{"step": step, "target": state dict}`` (arrays as host
NumPy, typed PRNG keys as ``{KEY_TAG: impl, "data": uint32}``) and ``sha256`` its 32-byte
digest, checked before the payload is decoded. A ``jaxnorm.checkpoint/1`` file is
``{"format", "step", "target"}`` with no digest; it is read only by
:func:`~jaxnorm.checkpoint.upgrade_checkpoint`. Nothing here writes these formats any more.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import Any

import numpy as np
from flax import serialization

from jaxnorm.checkpoint._tree import KEY_TAG, is_scalar

#: jaxnorm 0.1's checksummed msgpack files: still restored.
FORMAT_2 = "jaxnorm.checkpoint/2"
#: jaxnorm 0.1's first msgpack files, without a checksum: refused (see upgrade_checkpoint).
FORMAT_1 = "jaxnorm.checkpoint/1"
SUFFIX = ".msgpack"
NAME = re.compile(rf"^checkpoint_(\d+){re.escape(SUFFIX)}$")
_FIELDS = ("format", "payload", "sha256")  # the keys of a /2 file's outer map, sorted
_UNREADABLE = object()  # what _unpack returns for bytes that do not decode


def unreadable(caller: str, p: Path, size: int, why: str) -> ValueError:
    return ValueError(
        f"{caller}: {str(p)!r} is not a readable checkpoint ({size} bytes; {why}). It may be "
        f"truncated, corrupted or not written by jaxnorm.checkpoint; use the previous one "
        f"(latest_checkpoint lists only complete checkpoints)."
    )


def _unpack(data: bytes) -> Any:
    """msgpack bytes → tree, or ``_UNREADABLE`` for anything msgpack or flax refuse."""
    try:
        return serialization.msgpack_restore(data)
    except Exception:  # msgpack, numpy and flax's chunk decoding raise many types
        return _UNREADABLE


def read(p: Path, caller: str) -> tuple[int, Any]:
    """``(step, stored state dict)`` of a verified ``/2`` file, or a ``ValueError`` naming it."""
    raw = p.read_bytes()
    outer = _unpack(raw)
    if outer is _UNREADABLE:
        raise unreadable(caller, p, len(raw), "not msgpack, or cut short")
    fmt = outer.get("format") if isinstance(outer, dict) else None
    if fmt == FORMAT_1:
        raise ValueError(
            f"{caller}: {str(p)!r} is a {FORMAT_1} checkpoint, written before checkpoints "
            f"carried a SHA-256 checksum, so its content cannot be verified and it is not "
            f"loaded. If you trust the file, convert it once with "
            f"jaxnorm.checkpoint.upgrade_checkpoint({str(p)!r}) and restore the result."
        )
    if fmt != FORMAT_2:
        found = f"format {fmt!r}" if isinstance(outer, dict) else type(outer).__name__
        raise ValueError(f"{caller}: {str(p)!r} is not a {FORMAT_2} file ({found}).")
    if sorted(map(str, outer)) != list(_FIELDS) or len(outer) != len(_FIELDS):
        raise unreadable(caller, p, len(raw), f"header keys {sorted(map(repr, outer))}")
    digest, payload = outer["sha256"], outer["payload"]
    if not isinstance(digest, bytes) or len(digest) != 32 or not isinstance(payload, bytes):
        raise unreadable(caller, p, len(raw), "malformed sha256 or payload field")
    if hashlib.sha256(payload).digest() != digest:
        raise ValueError(
            f"{caller}: {str(p)!r} is corrupted: the SHA-256 of its payload does not match "
            f"the checksum stored in the file, so nothing was loaded. Restore an earlier "
            f"checkpoint."
        )
    step, target, why = check_payload(_unpack(payload))
    if why:
        raise unreadable(caller, p, len(raw), why)
    return step, target


def read_format_1(p: Path, caller: str) -> tuple[int, Any] | None:
    """``(step, state dict)`` of a well-formed ``/1`` file, ``None`` if it is not one."""
    raw = p.read_bytes()
    old = _unpack(raw)
    if not isinstance(old, dict) or old.get("format") != FORMAT_1:
        return None
    step, target, why = check_payload({k: v for k, v in old.items() if k != "format"})
    if why:
        raise unreadable(caller, p, len(raw), why)
    return step, target


def check_payload(inner: Any) -> tuple[int, Any, str | None]:
    """``(step, target, None)``, or ``(0, None, what is wrong)`` for a malformed payload."""
    if not isinstance(inner, dict) or sorted(map(str, inner)) != ["step", "target"]:
        return 0, None, "the payload is not a map of step and target"
    step = inner.get("step")
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        return 0, None, f"step {step!r} is not a non-negative int"
    why = _malformed(inner["target"], "")
    return step, inner["target"], (f"target {why}" if why else None)


def _malformed(x: Any, path: str) -> str | None:
    """What makes a decoded state dict unlike anything jaxnorm 0.1 wrote."""
    where = path or "<root>"
    if isinstance(x, dict):
        if KEY_TAG in x:
            data = x.get("data")
            if (
                len(x) != 2
                or not isinstance(x[KEY_TAG], str)
                or not isinstance(data, np.ndarray)
                or data.dtype != np.uint32
                or data.ndim < 1
            ):
                return f"{where}: a malformed PRNG key entry"
            return None
        for k, v in x.items():
            if not isinstance(k, str):
                return f"{where}: a map key {k!r} of type {type(k).__name__}"
            found = _malformed(v, f"{path}/{k}" if path else k)
            if found:
                return found
        return None
    if isinstance(x, (np.ndarray, np.generic)) or is_scalar(x):
        return None
    return f"{where}: an unexpected {type(x).__name__}"
