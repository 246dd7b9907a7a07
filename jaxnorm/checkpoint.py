"""Checkpoints of a training state: save, refuse what does not fit, restore exactly.

A training state is any pytree flax can serialize: a dict or ``flax.struct`` of
``params``, ``batch_stats`` (a linen collection or :class:`jaxnorm.BatchStats`), the
optax optimizer state, the step, a PRNG key (typed ``jax.random.key`` or raw
``uint32``), Python scalars. For NNX, save ``nnx.to_pure_dict(nnx.state(model))``
and restore into it, then ``nnx.replace_by_pure_dict``::

    state = {"params": params, "batch_stats": stats, "opt_state": opt_state,
             "step": step, "rng": key}
    save_checkpoint(ckpt_dir, state, step=step)  # ckpt_dir/checkpoint_00000100.msgpack
    ...
    path = latest_checkpoint(ckpt_dir)           # None when there is none yet
    state = restore_checkpoint(path, like=fresh_state)

Format choice. One msgpack file per step, written with
``flax.serialization.msgpack_serialize`` (a format header, the step and the state
dict), rather than orbax:

* The whole contract of this module — restore *exactly* into a given tree, refuse a
  mismatch naming the first path, and never clobber the last good checkpoint — is
  a few dozen lines over one bytes object, with no background threads or
  directory protocols to reason about. The file is written to a temporary name in
  the same directory, flushed, ``fsync``-ed and moved into place with ``os.replace``
  (atomic on POSIX and Windows), so a crash mid-save leaves the previous checkpoint
  intact and, at worst, a stray ``.tmp-*`` file that :func:`latest_checkpoint` ignores.
* It needs only flax, already a dependency; orbax-checkpoint is a large extra.
* Limits, stated: every array is copied to host memory, so this suits models that fit
  in one host's memory, on one host (arrays sharded over local devices are gathered
  on save and re-sharded like ``like`` on restore). For multi-host or very large
  sharded states use orbax-checkpoint, which writes shards in parallel.

Safety. :func:`restore_checkpoint` compares the stored tree with ``like`` leaf by
leaf (tree structure, shapes, dtypes, PRNG key implementation, Python scalar types)
and, before anything is loaded, raises a ``ValueError`` naming the first mismatching
path in sorted path order, the order of ``jax.tree.leaves`` (``params/Dense_1/kernel:
checkpoint has (64, 10), model expects (32, 10)``). A Python scalar and a 0-d array of
the same kind (``bool``; ``int`` and an integer dtype; ``float`` and a floating dtype;
``complex`` and a complex dtype) are compatible: the value is restored into the type
``like`` has, so a saved flax ``TrainState`` (whose ``step`` became a 0-d ``int32``
array in a jitted step) restores into a fresh ``TrainState.create(...)`` (whose
``step`` is the Python int 0), and back. A Python int that does not fit ``like``'s
integer dtype, or a finite float that would overflow its floating dtype, is refused.

Integrity. The file is a msgpack map ``{"format": FORMAT, "sha256": digest, "payload":
bytes}``; ``payload`` is the msgpack of ``{"step": step, "target": state dict}`` and
``digest`` is its 32-byte SHA-256. :func:`restore_checkpoint` (and
:func:`checkpoint_step`) verify the digest before decoding the payload, so a flipped
bit anywhere in the file — header, digest or data — is refused, never loaded as wrong
values. Every unreadable file — truncated, corrupted, random bytes, another program's
msgpack, a crafted file with the wrong structure or field types — raises
``ValueError`` naming the file; no ``KeyError``, ``TypeError`` or msgpack error escapes.

Older files. Checkpoints of the first format, ``"jaxnorm.checkpoint/1"`` (written by
jaxnorm 0.1.0 before checksums, ``{"format", "step", "target"}`` without a digest),
are refused by :func:`restore_checkpoint` with a message saying so, because their
content cannot be verified. :func:`upgrade_checkpoint` rewrites such a file in the
current format, in place and atomically, adding the digest of its content as it is
now: check that the upgraded checkpoint restores the values you expect.
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TypeVar

import jax
import jax.numpy as jnp
import numpy as np
from flax import serialization

__all__ = [
    "checkpoint_path",
    "checkpoint_step",
    "latest_checkpoint",
    "restore_checkpoint",
    "save_checkpoint",
    "upgrade_checkpoint",
]

T = TypeVar("T")

FORMAT = "jaxnorm.checkpoint/2"  # stored in every file; a different value is refused
_FORMAT_1 = "jaxnorm.checkpoint/1"  # no checksum: refused, see upgrade_checkpoint
_FIELDS = ("format", "payload", "sha256")  # the keys of a file's outer map, sorted
_PREFIX = "checkpoint_"
_SUFFIX = ".msgpack"
_NAME = re.compile(rf"^{_PREFIX}(\d+){re.escape(_SUFFIX)}$")
_KEY_TAG = "__prng_key__"  # a typed PRNG key is stored as {_KEY_TAG: impl name, "data": uint32}

PathLike = str | os.PathLike[str]


def checkpoint_path(ckpt_dir: PathLike, step: int) -> Path:
    """The file name :func:`save_checkpoint` uses for ``step`` in ``ckpt_dir``."""
    return Path(ckpt_dir) / f"{_PREFIX}{int(step):08d}{_SUFFIX}"


def _is_key(leaf: Any) -> bool:
    return isinstance(leaf, jax.Array) and jnp.issubdtype(leaf.dtype, jax.dtypes.prng_key)


def _to_host(tree: Any) -> Any:
    """State dict with host NumPy leaves; typed PRNG keys become tagged raw data."""

    def leaf(x: Any) -> Any:
        if _is_key(x):
            return {
                _KEY_TAG: str(jax.random.key_impl(x)),
                "data": np.asarray(jax.random.key_data(x)),
            }
        if _is_scalar(x):
            return x
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            raise ValueError(
                "save_checkpoint: an array is sharded across hosts (not fully addressable); "
                "this single-host format cannot gather it. Use orbax-checkpoint for "
                "multi-host states."
            )
        return np.asarray(x)

    state = serialization.to_state_dict(tree)
    return jax.tree.map(leaf, state, is_leaf=lambda x: _is_key(x) or x is None)


def _write_bytes(f: Any, data: bytes) -> None:
    """Write ``data`` to the open file ``f`` (a seam for the interrupted-save test)."""
    f.write(data)


def save_checkpoint(ckpt_dir: PathLike, target: Any, *, step: int, keep: int | None = None) -> Path:
    """Write ``target`` as ``ckpt_dir/checkpoint_<step>.msgpack``, atomically.

    The bytes go to a temporary file in ``ckpt_dir``, are flushed to disk and then
    renamed over the final name with ``os.replace``: readers see either the previous
    file or the complete new one, never a partial one, and a failure mid-save leaves
    earlier checkpoints untouched (the temporary file is removed).

    Args:
      ckpt_dir: directory of the run's checkpoints (created if missing).
      target: the pytree to save (see the module docstring for what it may hold).
      step: the training step, stored in the file and used in its name (>= 0).
      keep: if given, delete all but the ``keep`` newest checkpoints after a
        successful save.

    Returns:
      The path of the written checkpoint.

    Raises:
      ValueError: a negative ``step`` or ``keep < 1``, or an array sharded across hosts.

    Example:
      >>> import tempfile, jax.numpy as jnp
      >>> d = tempfile.mkdtemp()
      >>> save_checkpoint(d, {"w": jnp.ones(2)}, step=3).name
      'checkpoint_00000003.msgpack'
      >>> restore_checkpoint(latest_checkpoint(d), like={"w": jnp.zeros(2)})["w"].tolist()
      [1.0, 1.0]
    """
    if isinstance(step, bool) or not isinstance(step, (int, np.integer)) or step < 0:
        raise ValueError(f"save_checkpoint: step must be a non-negative int; got {step!r}.")
    if keep is not None and keep < 1:
        raise ValueError(f"save_checkpoint: keep must be >= 1 or None; got {keep!r}.")
    directory = Path(ckpt_dir)
    directory.mkdir(parents=True, exist_ok=True)
    final = checkpoint_path(directory, step)
    _write_atomic(final, _encode(int(step), _to_host(target)))
    if keep is not None:
        for old in list(_checkpoints(directory))[:-keep]:
            old[1].unlink(missing_ok=True)
    return final


def _encode(step: int, host_state: Any) -> bytes:
    """The bytes of a checkpoint file: the format, the payload and its SHA-256."""
    payload = serialization.msgpack_serialize({"step": step, "target": host_state})
    digest = hashlib.sha256(payload).digest()
    return serialization.msgpack_serialize({"format": FORMAT, "sha256": digest, "payload": payload})


def _write_atomic(final: Path, data: bytes) -> None:
    """Write ``data`` to a temporary file next to ``final``, fsync, rename over ``final``."""
    directory = final.parent
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=_SUFFIX, dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            _write_bytes(f, data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, final)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(directory)


def _fsync_dir(directory: Path) -> None:
    """Make the rename durable (POSIX); a no-op where directories cannot be opened."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # pragma: no cover - e.g. Windows
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def _checkpoints(directory: Path) -> Iterator[tuple[int, Path]]:
    """``(step, path)`` of the complete checkpoints in ``directory``, oldest first."""
    found = []
    for p in directory.iterdir():
        m = _NAME.match(p.name)
        if m and p.is_file():
            found.append((int(m.group(1)), p))
    return iter(sorted(found))


def latest_checkpoint(ckpt_dir: PathLike) -> Path | None:
    """The checkpoint with the highest step in ``ckpt_dir``, or ``None``.

    Only complete files named by :func:`save_checkpoint` count; temporary files of an
    interrupted save are ignored.

    Args:
      ckpt_dir: the directory given to :func:`save_checkpoint`.

    Returns:
      A path, or ``None`` if the directory is missing or holds no checkpoint.
    """
    directory = Path(ckpt_dir)
    if not directory.is_dir():
        return None
    found = list(_checkpoints(directory))
    return found[-1][1] if found else None


def _resolve(path: PathLike, caller: str) -> Path:
    p = Path(path)
    if p.is_dir():
        latest = latest_checkpoint(p)
        if latest is None:
            raise FileNotFoundError(f"{caller}: no checkpoint in directory {str(p)!r}.")
        p = latest
    return p


def _unreadable(caller: str, p: Path, size: int, why: str) -> ValueError:
    return ValueError(
        f"{caller}: {str(p)!r} is not a readable checkpoint ({size} bytes; {why}). It may be "
        f"truncated, corrupted or not written by jaxnorm.checkpoint; use the previous one "
        f"(latest_checkpoint lists only complete files)."
    )


_UNREADABLE = object()  # what _unpack returns for bytes that do not decode


def _unpack(data: bytes) -> Any:
    """msgpack bytes → tree, or ``_UNREADABLE`` for anything msgpack or flax refuse."""
    try:
        return serialization.msgpack_restore(data)
    except Exception:  # msgpack, numpy and flax's chunk decoding raise many types
        return _UNREADABLE


def _read(path: PathLike, caller: str = "restore_checkpoint") -> tuple[Path, int, Any]:
    """``(file, step, stored state dict)`` of a verified checkpoint, or a ``ValueError``."""
    p = _resolve(path, caller)
    raw = p.read_bytes()
    outer = _unpack(raw)
    if outer is _UNREADABLE:
        raise _unreadable(caller, p, len(raw), "not msgpack, or cut short")
    fmt = outer.get("format") if isinstance(outer, dict) else None
    if fmt == _FORMAT_1:
        raise ValueError(
            f"{caller}: {str(p)!r} is a {_FORMAT_1} checkpoint, written before checkpoints "
            f"carried a SHA-256 checksum, so its content cannot be verified and it is not "
            f"loaded. If you trust the file, convert it once with "
            f"jaxnorm.checkpoint.upgrade_checkpoint({str(p)!r}) and restore it again."
        )
    if fmt != FORMAT:
        found = f"format {fmt!r}" if isinstance(outer, dict) else type(outer).__name__
        raise ValueError(f"{caller}: {str(p)!r} is not a {FORMAT} file ({found}).")
    if sorted(map(str, outer)) != list(_FIELDS) or len(outer) != len(_FIELDS):
        raise _unreadable(caller, p, len(raw), f"header keys {sorted(map(repr, outer))}")
    digest, payload = outer["sha256"], outer["payload"]
    if not isinstance(digest, bytes) or len(digest) != 32 or not isinstance(payload, bytes):
        raise _unreadable(caller, p, len(raw), "malformed sha256 or payload field")
    if hashlib.sha256(payload).digest() != digest:
        raise ValueError(
            f"{caller}: {str(p)!r} is corrupted: the SHA-256 of its payload does not match "
            f"the checksum stored in the file, so nothing was loaded. Restore an earlier "
            f"checkpoint."
        )
    inner = _unpack(payload)
    step, target, why = _check_payload(inner)
    if why:
        raise _unreadable(caller, p, len(raw), why)
    return p, step, target


def _check_payload(inner: Any) -> tuple[int, Any, str | None]:
    """``(step, target, None)``, or ``(0, None, what is wrong)`` for a malformed payload."""
    if not isinstance(inner, dict) or sorted(map(str, inner)) != ["step", "target"]:
        return 0, None, "the payload is not a map of step and target"
    step = inner.get("step")
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        return 0, None, f"step {step!r} is not a non-negative int"
    why = _malformed(inner["target"], "")
    return step, inner["target"], (f"target {why}" if why else None)


def _malformed(x: Any, path: str) -> str | None:
    """What makes a decoded state dict unlike anything :func:`save_checkpoint` writes."""
    where = path or "<root>"
    if isinstance(x, dict):
        if _KEY_TAG in x:
            data = x.get("data")
            if (
                len(x) != 2
                or not isinstance(x[_KEY_TAG], str)
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
    if isinstance(x, (np.ndarray, np.generic)) or _is_scalar(x):
        return None
    return f"{where}: an unexpected {type(x).__name__}"


def checkpoint_step(path: PathLike) -> int:
    """The step stored in a checkpoint file (or the latest one of a directory).

    Raises:
      FileNotFoundError: no such file, or a directory without checkpoints.
      ValueError: the file is not a verified checkpoint (as :func:`restore_checkpoint`).
    """
    return _read(path, "checkpoint_step")[1]


def upgrade_checkpoint(path: PathLike) -> Path:
    """Rewrite a ``jaxnorm.checkpoint/1`` file in the current format, with a checksum.

    Files of the first format carry no checksum; :func:`restore_checkpoint` refuses
    them. This reads one, checks that it is well formed, and replaces it atomically
    with the same step and state plus the SHA-256 of that content. The checksum
    certifies the content as it is *now*: a file corrupted before the upgrade stays
    corrupted, so restore it once and check its values. A file already in the
    current format is verified and left as it is.

    Args:
      path: a checkpoint file, or a directory (its latest checkpoint is upgraded).

    Returns:
      The path of the upgraded file.

    Raises:
      FileNotFoundError: no such file, or a directory without checkpoints.
      ValueError: the file is neither a well-formed first-format checkpoint nor a
        verified current one.
    """
    p = _resolve(path, "upgrade_checkpoint")
    raw = p.read_bytes()
    old = _unpack(raw)
    if not isinstance(old, dict) or old.get("format") != _FORMAT_1:
        _read(p, "upgrade_checkpoint")  # a current file is verified, anything else refused
        return p
    rest = {k: v for k, v in old.items() if k != "format"}
    step, target, why = _check_payload(rest)
    if why:
        raise _unreadable("upgrade_checkpoint", p, len(raw), why)
    _write_atomic(p, _encode(step, target))
    return p


def _is_scalar(x: Any) -> bool:
    return isinstance(x, (bool, int, float, complex, str, bytes)) or x is None


def _is_stored_key(x: Any) -> bool:
    return isinstance(x, dict) and _KEY_TAG in x


def _spec(like: Any) -> Any:
    """``like``'s state dict with shape/dtype leaves (nothing is copied off device)."""

    def leaf(x: Any) -> Any:
        if _is_key(x):
            data = jax.eval_shape(jax.random.key_data, x)
            return {_KEY_TAG: str(jax.random.key_impl(x)), "data": data}
        if _is_scalar(x):
            return x
        dtype = x.dtype if hasattr(x, "dtype") else np.result_type(x)
        return jax.ShapeDtypeStruct(np.shape(x), dtype)

    return _map_dict(leaf, serialization.to_state_dict(like))


def _map_dict(fn: Any, state: Any) -> Any:
    """Apply ``fn`` to the leaves of a nested state dict, keeping key order (tree.map sorts)."""
    if isinstance(state, dict):
        return {k: _map_dict(fn, v) for k, v in state.items()}
    return fn(state)


def _describe(x: Any) -> str:
    if _is_stored_key(x):
        return f"a PRNG key ({x[_KEY_TAG]}) of shape {tuple(np.shape(x['data']))[:-1]}"
    if isinstance(x, dict):
        return f"a subtree with keys {sorted(x)}"
    if _is_scalar(x):
        return f"a Python {type(x).__name__}"
    return f"an array {tuple(np.shape(x))} {np.dtype(x.dtype)}"


def _mismatches(got: Any, want: Any, path: str) -> Iterator[str]:
    """Every difference between the stored state dict and the spec of ``like``.

    In sorted key order at every level (jax's flattening order), so "the first" does not
    depend on how ``like``'s dicts were built (``jit`` returns them with sorted keys).
    """
    where = path or "<root>"
    differ = f"{where}: checkpoint has {_describe(got)}, model expects {_describe(want)}"
    if isinstance(want, dict) and not _is_stored_key(want):
        if not isinstance(got, dict) or _is_stored_key(got):
            yield differ
            return
        for k in sorted(want):
            sub = f"{path}/{k}" if path else str(k)
            if k not in got:
                yield f"{sub}: missing from the checkpoint (model expects {_describe(want[k])})"
            else:
                yield from _mismatches(got[k], want[k], sub)
        for k in sorted(got):
            if k not in want:
                sub = f"{path}/{k}" if path else str(k)
                yield f"{sub}: in the checkpoint but not in the model ({_describe(got[k])})"
    elif _is_stored_key(want):
        if not _is_stored_key(got) or got[_KEY_TAG] != want[_KEY_TAG]:
            yield differ
        elif tuple(got["data"].shape) != tuple(want["data"].shape):
            yield differ
        elif got["data"].dtype != want["data"].dtype:
            yield differ
    elif _is_scalar(want):
        if type(got) is not type(want) and not _same_kind(want, got):
            yield differ
    elif _is_scalar(got) and _same_kind(got, want):
        if not _fits(got, want.dtype):
            yield (
                f"{where}: checkpoint has the Python {type(got).__name__} {got!r}, which the "
                f"model's array () {np.dtype(want.dtype)} cannot hold"
            )
    elif isinstance(got, dict) or _is_scalar(got) or not hasattr(got, "shape"):
        yield differ
    elif tuple(got.shape) != tuple(want.shape):
        yield f"{where}: checkpoint has {tuple(got.shape)}, model expects {tuple(want.shape)}"
    elif np.dtype(got.dtype) != np.dtype(want.dtype):
        yield (
            f"{where}: checkpoint has dtype {np.dtype(got.dtype)}, model expects "
            f"{np.dtype(want.dtype)} (shape {tuple(got.shape)})"
        )


_SCALAR_KINDS = {bool: "bool", int: "int", float: "float", complex: "complex"}


def _dtype_kind(dtype: Any) -> str | None:
    if np.dtype(dtype) == np.bool_:
        return "bool"
    kinds = (("int", jnp.integer), ("float", jnp.floating), ("complex", jnp.complexfloating))
    return next((kind for kind, base in kinds if jnp.issubdtype(dtype, base)), None)


def _same_kind(scalar: Any, array: Any) -> bool:
    """A Python ``bool``/``int``/``float``/``complex`` and a 0-d array of that kind."""
    kind = _SCALAR_KINDS.get(type(scalar))
    return (
        kind is not None
        and hasattr(array, "dtype")
        and tuple(np.shape(array)) == ()
        and _dtype_kind(array.dtype) == kind
    )


def _fits(value: bool | int | float | complex, dtype: Any) -> bool:
    """Whether ``dtype`` holds the Python scalar ``value`` (ints exactly, finite floats finite)."""
    if _dtype_kind(dtype) == "int":
        info = jnp.iinfo(dtype)
        return int(info.min) <= value <= int(info.max)
    if _dtype_kind(dtype) in ("float", "complex"):
        with np.errstate(over="ignore"):
            cast = np.asarray(value, dtype)
        return bool(np.isfinite(cast)) or not np.isfinite(value)
    return True


def restore_checkpoint(path: PathLike, like: T) -> T:
    """Load a checkpoint into the structure of ``like``, refusing anything that does not fit.

    ``like`` is a state of the model being resumed (e.g. freshly initialized): only its
    structure, shapes, dtypes and shardings are used. The stored tree must match it
    exactly (same keys, shapes, dtypes, PRNG key implementation, Python scalar types)
    or nothing is loaded. One exception: a Python scalar and a 0-d array of the same
    kind (bool; int and an integer dtype; float and a floating dtype; complex and a
    complex dtype) fit each other, and the value takes ``like``'s type, so a flax
    ``TrainState`` saved after jitted steps (``step`` a 0-d ``int32`` array) restores
    into a fresh ``TrainState.create(...)`` (``step`` the Python int 0).

    Args:
      path: a checkpoint file, or a directory (its latest checkpoint is used).
      like: a pytree with the target structure.

    Returns:
      A tree of ``like``'s type holding the stored values. A leaf that is a
      ``jax.Array`` in ``like`` is put on ``like``'s sharding with ``like``'s dtype, a
      typed PRNG key is rebuilt as a key, a NumPy array or scalar stays NumPy, a Python
      scalar stays a Python scalar of ``like``'s type.

    Raises:
      FileNotFoundError: no such file, or a directory without checkpoints.
      ValueError: an unreadable file, or a tree that does not match ``like``; the
        message names the first mismatching path (sorted path order), e.g. ``params/Dense_1/kernel:
        checkpoint has (64, 10), model expects (32, 10)``, and lists a few others.
    """
    file, step, stored = _read(path)
    problems = list(_mismatches(stored, _spec(like), ""))
    if problems:
        more = ""
        if len(problems) > 1:
            shown = "; ".join(problems[1:4])
            more = f" ({len(problems) - 1} more: {shown}{'; ...' if len(problems) > 4 else ''})"
        raise ValueError(
            f"restore_checkpoint: {str(file)!r} (step {step}) does not fit the "
            f"model, nothing was loaded. First mismatch: {problems[0]}{more}. Restore into "
            f"a state built with the same model configuration and optimizer."
        )

    def unpack(stored_leaf: Any, like_leaf: Any) -> Any:
        if _is_key(like_leaf):
            data = jnp.asarray(stored_leaf["data"])
            key = jax.random.wrap_key_data(data, impl=jax.random.key_impl(like_leaf))
            return jax.device_put(key, like_leaf.sharding)
        if isinstance(like_leaf, jax.Array):
            return jax.device_put(np.asarray(stored_leaf, like_leaf.dtype), like_leaf.sharding)
        if isinstance(like_leaf, np.ndarray):
            return np.asarray(stored_leaf, like_leaf.dtype)
        if isinstance(like_leaf, np.generic):
            return np.asarray(stored_leaf, like_leaf.dtype)[()]
        if type(like_leaf) in _SCALAR_KINDS and type(stored_leaf) is not type(like_leaf):
            return type(like_leaf)(np.asarray(stored_leaf)[()])  # a 0-d array of its kind
        return stored_leaf

    # Both trees flatten in sorted-key order; a stored key's {tag, data} dict is one leaf.
    flat_like, treedef = jax.tree.flatten(
        serialization.to_state_dict(like), is_leaf=lambda x: _is_key(x) or x is None
    )
    flat_stored = jax.tree.leaves(stored, is_leaf=lambda x: _is_stored_key(x) or x is None)
    values = [unpack(s, w) for s, w in zip(flat_stored, flat_like, strict=True)]
    return serialization.from_state_dict(like, jax.tree.unflatten(treedef, values))
