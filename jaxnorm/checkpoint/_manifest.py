"""The ``jaxnorm`` item of a checkpoint: the manifest and each process's shard digests.

Two kinds of small JSON files, each ``{"format", "sha256", "content"}`` where ``sha256`` is
the hex SHA-256 of ``content`` in canonical JSON (sorted keys, no spaces), so a changed
byte anywhere in them is refused:

* ``manifest.json`` (written by process 0): the step, the number of processes that saved,
  and the tree: nested ``{"dict": {name: node}}`` nodes whose leaves are
  ``{"array": {"index", "shape", "dtype", "numpy"}}`` (the array ``index`` of the orbax
  item), ``{"key": {"impl", "index", "shape"}}`` (a typed PRNG key; its ``uint32`` key
  data is array ``index``, of ``shape``) or ``{"scalar": [type, value]}`` (Python scalars,
  ``str``, ``bytes`` and ``None``, stored here by value; floats as ``float.hex``, exact).
* ``sha256.process_<i>.json`` (written by process ``i``): ``{"process": i, "shards":
  [{"leaf": index, "box": [[start, stop], ...], "sha256": hex}, ...]}``, the digests of
  the shards that process saved.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxnorm.checkpoint._tree import KEY_TAG, dtype_kind, is_key, is_scalar

#: The format written today: orbax-checkpoint step directories with a ``jaxnorm`` item.
FORMAT = "jaxnorm.checkpoint/3"
ITEM = "jaxnorm"  # the orbax item holding these files
MANIFEST = "manifest.json"

Box = tuple[tuple[int, int], ...]  # per dimension, the half-open [start, stop) of a shard


def digests_name(process: int) -> str:
    return f"sha256.process_{process}.json"


@dataclasses.dataclass(frozen=True)
class StoredArray:
    """An array leaf as the manifest describes it (``shape`` and ``dtype`` as an array has).

    Not a pytree node (a ``NamedTuple`` would be), so it is one leaf of a stored tree.
    """

    index: int  # its name in the orbax item is str(index)
    shape: tuple[int, ...]
    dtype: np.dtype
    numpy: bool  # saved from a NumPy array (restored as NumPy first)


class Corrupt(Exception):
    """A file of the jaxnorm item is unreadable; the message says what is wrong."""


# ------------------------------------------------------------------ files


def _canonical(content: Any) -> str:
    return json.dumps(content, sort_keys=True, separators=(",", ":"), allow_nan=False)


def write_json(path: Any, content: dict) -> None:
    """Write ``content`` with its format and checksum (``path`` may be an ``epath.Path``)."""
    digest = hashlib.sha256(_canonical(content).encode()).hexdigest()
    path.write_text(_canonical({"format": FORMAT, "sha256": digest, "content": content}))


def read_json(path: Path) -> dict:
    """The verified ``content`` of a file written by :func:`write_json`, or :class:`Corrupt`."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise Corrupt(f"{path.name} is missing") from None
    try:
        outer = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise Corrupt(f"{path.name} is not JSON (cut short or corrupted)") from None
    if not isinstance(outer, dict) or sorted(outer) != ["content", "format", "sha256"]:
        raise Corrupt(f"{path.name} is not a {FORMAT} file")
    if outer["format"] != FORMAT:
        raise Corrupt(f"{path.name} has format {outer['format']!r}, expected {FORMAT!r}")
    content = outer["content"]
    if not isinstance(content, dict):
        raise Corrupt(f"{path.name} holds no content map")
    if hashlib.sha256(_canonical(content).encode()).hexdigest() != outer["sha256"]:
        raise Corrupt(f"the SHA-256 of {path.name} does not match the checksum it stores")
    return content


# ------------------------------------------------------------------ the tree


def encode(state: Any) -> tuple[dict, list[tuple[str, Any]]]:
    """``(manifest node, [(path, array), ...])`` of a state dict; arrays in index order.

    Raises:
      TypeError: a leaf that is not an array, a PRNG key, a Python scalar, ``str``,
        ``bytes`` or ``None``, an array of a non-numeric dtype, or a non-string key.
    """
    arrays: list[tuple[str, Any]] = []

    def add(path: str, value: Any) -> int:
        kind = dtype_kind(value.dtype)
        if kind is None:
            raise TypeError(
                f"save_checkpoint: {path or '<root>'} is an array of dtype "
                f"{np.dtype(value.dtype)}; a checkpoint holds bool, integer, floating and "
                f"complex arrays. Convert it, or keep it out of the saved state."
            )
        arrays.append((path, value))
        return len(arrays) - 1

    def node(x: Any, path: str) -> dict:
        if isinstance(x, dict):
            for k in x:
                if not isinstance(k, str):
                    raise TypeError(
                        f"save_checkpoint: {path or '<root>'} has the key {k!r} of type "
                        f"{type(k).__name__}; a saved state has string keys."
                    )
            return {"dict": {k: node(v, f"{path}/{k}" if path else k) for k, v in x.items()}}
        if is_key(x):
            data = jax.random.key_data(x)
            impl = str(jax.random.key_impl(x))
            return {"key": {"impl": impl, "index": add(path, data), "shape": list(data.shape)}}
        if is_scalar(x):
            return {"scalar": _scalar(x)}
        if isinstance(x, (np.ndarray, np.generic)):
            x = np.asarray(x)
            numpy = True
        elif isinstance(x, jax.Array):
            numpy = False
        else:
            raise TypeError(
                f"save_checkpoint: {path or '<root>'} is a {type(x).__name__}; a checkpoint "
                f"holds arrays (jax or NumPy), PRNG keys, Python scalars, str, bytes and None."
            )
        return {
            "array": {
                "index": add(path, x),
                "shape": list(x.shape),
                "dtype": np.dtype(x.dtype).name,
                "numpy": numpy,
            }
        }

    return node(state, ""), arrays


def _scalar(x: Any) -> list:
    if x is None:
        return ["none", None]
    if isinstance(x, bool):
        return ["bool", x]
    if isinstance(x, int):
        return ["int", str(x)]
    if isinstance(x, float):
        return ["float", x.hex()]
    if isinstance(x, complex):
        return ["complex", [x.real.hex(), x.imag.hex()]]
    if isinstance(x, str):
        return ["str", x]
    return ["bytes", bytes(x).hex()]


def decode(node: Any, num_arrays: list[int]) -> Any:
    """The stored tree of a manifest node: dicts, :class:`StoredArray`, key entries, scalars.

    ``num_arrays`` is a one-element counter of the array leaves met. Raises
    :class:`Corrupt` for anything :func:`encode` does not write.
    """
    if not isinstance(node, dict) or len(node) != 1:
        raise Corrupt("manifest.json has a malformed tree node")
    ((kind, body),) = node.items()
    if kind == "dict" and isinstance(body, dict):
        return {k: decode(v, num_arrays) for k, v in body.items()}
    if kind == "scalar" and isinstance(body, list) and len(body) == 2:
        return _decode_scalar(*body)
    if (
        kind == "array"
        and isinstance(body, dict)
        and sorted(body)
        == [
            "dtype",
            "index",
            "numpy",
            "shape",
        ]
    ):
        dtype = _dtype(body["dtype"])
        if not isinstance(body["numpy"], bool):
            raise Corrupt("manifest.json has a malformed array entry")
        num_arrays[0] += 1
        return StoredArray(_index(body["index"]), _shape(body["shape"]), dtype, body["numpy"])
    if kind == "key" and isinstance(body, dict) and sorted(body) == ["impl", "index", "shape"]:
        shape = _shape(body["shape"])
        if not isinstance(body["impl"], str) or not shape:
            raise Corrupt("manifest.json has a malformed PRNG key entry")
        num_arrays[0] += 1
        data = StoredArray(_index(body["index"]), shape, np.dtype(np.uint32), False)
        return {KEY_TAG: body["impl"], "data": data}
    raise Corrupt(f"manifest.json has a tree node of unknown kind {kind!r}")


def _index(x: Any) -> int:
    if isinstance(x, bool) or not isinstance(x, int) or x < 0:
        raise Corrupt("manifest.json has a malformed array index")
    return x


def _shape(x: Any) -> tuple[int, ...]:
    if not isinstance(x, list) or not all(
        isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in x
    ):
        raise Corrupt("manifest.json has a malformed shape")
    return tuple(x)


def _dtype(name: Any) -> np.dtype:
    try:
        dtype = jnp.dtype(name) if isinstance(name, str) else None
    except TypeError:
        dtype = None
    if dtype is None or dtype_kind(dtype) is None:
        raise Corrupt(f"manifest.json has an unknown dtype {name!r}")
    return dtype


def _decode_scalar(kind: Any, value: Any) -> Any:
    try:
        if kind == "none" and value is None:
            return None
        if kind == "bool" and isinstance(value, bool):
            return value
        if kind == "int" and isinstance(value, str):
            return int(value)
        if kind == "float" and isinstance(value, str):
            return float.fromhex(value)
        if kind == "complex" and isinstance(value, list) and len(value) == 2:
            return complex(float.fromhex(value[0]), float.fromhex(value[1]))
        if kind == "str" and isinstance(value, str):
            return value
        if kind == "bytes" and isinstance(value, str):
            return bytes.fromhex(value)
    except (TypeError, ValueError):
        pass
    raise Corrupt(f"manifest.json has a malformed {kind!r} scalar")


def read_manifest(item_dir: Path) -> tuple[int, int, Any, int]:
    """``(step, saving processes, stored tree, number of arrays)``, or :class:`Corrupt`."""
    content = read_json(item_dir / MANIFEST)
    if sorted(content) != ["num_processes", "step", "tree"]:
        raise Corrupt("manifest.json does not hold step, num_processes and tree")
    step, processes = content["step"], content["num_processes"]
    for value in (step, processes):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise Corrupt("manifest.json has a malformed step or process count")
    count = [0]
    stored = decode(content["tree"], count)
    return step, max(processes, 1), stored, count[0]


def read_digests(item_dir: Path, num_processes: int, shapes: list[tuple[int, ...]]) -> list[list]:
    """Per array index, the ``[(box, hex digest), ...]`` of its saved shards (all processes)."""
    found: list[list[tuple[Box, str]]] = [[] for _ in shapes]
    for process in range(num_processes):
        content = read_json(item_dir / digests_name(process))
        shards = content.get("shards")
        if content.get("process") != process or not isinstance(shards, list):
            raise Corrupt(f"{digests_name(process)} is not the digest list of process {process}")
        for entry in shards:
            if not isinstance(entry, dict) or sorted(entry) != ["box", "leaf", "sha256"]:
                raise Corrupt(f"{digests_name(process)} has a malformed entry")
            index, box, digest = entry["leaf"], entry["box"], entry["sha256"]
            if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < len(found):
                raise Corrupt(f"{digests_name(process)} names an unknown array {index!r}")
            if not isinstance(digest, str) or len(digest) != 64:
                raise Corrupt(f"{digests_name(process)} has a malformed digest")
            found[index].append((_box(box, shapes[index], process), digest))
    return found


def _box(x: Any, shape: tuple[int, ...], process: int) -> Box:
    ok = isinstance(x, list) and len(x) == len(shape)
    box = []
    for dim, n in zip(x if ok else [], shape, strict=False):
        ok = ok and isinstance(dim, list) and len(dim) == 2
        ok = ok and all(isinstance(v, int) and not isinstance(v, bool) for v in dim)
        ok = ok and 0 <= dim[0] <= dim[1] <= n
        if not ok:
            break
        box.append((dim[0], dim[1]))
    if not ok:
        raise Corrupt(f"{digests_name(process)} has a shard box {x!r} outside shape {shape}")
    return tuple(box)
