"""The public functions: name, find, save, restore and upgrade checkpoints of either format."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, TypeVar

import jax

from jaxnorm.checkpoint import _legacy, _orbax, _tree
from jaxnorm.checkpoint._orbax import AsyncCheckpointer

T = TypeVar("T")
PathLike = str | os.PathLike[str]

_STEP_DIR = re.compile(rf"^{_orbax.PREFIX}_(\d+)$")


def checkpoint_path(ckpt_dir: PathLike, step: int) -> Path:
    """The directory :func:`save_checkpoint` writes for ``step`` in ``ckpt_dir``."""
    return _orbax.step_dir(Path(ckpt_dir), step)


def _checkpoints(directory: Path) -> list[tuple[int, int, Path]]:
    """``(step, format rank, path)`` of the committed checkpoints, oldest first.

    A step directory outranks a ``.msgpack`` file of the same step (its upgrade).
    """
    found = []
    for p in directory.iterdir():
        if (m := _STEP_DIR.match(p.name)) and p.is_dir():
            found.append((int(m.group(1)), 1, p))
        elif (m := _legacy.NAME.match(p.name)) and p.is_file():
            found.append((int(m.group(1)), 0, p))
    return sorted(found)


def latest_checkpoint(ckpt_dir: PathLike) -> Path | None:
    """The checkpoint with the highest step in ``ckpt_dir``, or ``None``.

    Step directories count once committed (orbax renames them into place when a save
    has finished; the ``*.orbax-checkpoint-tmp-*`` directories of a save in flight or
    killed are ignored), and so do the ``checkpoint_<step>.msgpack`` files of jaxnorm 0.1.

    Args:
      ckpt_dir: the directory given to :func:`save_checkpoint`.

    Returns:
      A path, or ``None`` if the directory is missing or holds no checkpoint.
    """
    directory = Path(ckpt_dir)
    if not directory.is_dir():
        return None
    found = _checkpoints(directory)
    return found[-1][2] if found else None


def _resolve(path: PathLike, caller: str) -> Path:
    """A checkpoint (step directory or ``.msgpack`` file); a run directory gives its latest."""
    p = Path(path).absolute()  # orbax refuses relative paths
    if p.is_dir() and not _STEP_DIR.match(p.name) and not (p / _orbax.ITEM).is_dir():
        latest = latest_checkpoint(p)
        if latest is None:
            raise FileNotFoundError(f"{caller}: no checkpoint in directory {str(p)!r}.")
        return latest
    if not p.exists():
        raise FileNotFoundError(f"{caller}: no checkpoint at {str(p)!r}.")
    return p


def save_checkpoint(ckpt_dir: PathLike, target: Any, *, step: int, keep: int | None = None) -> Path:
    """Write ``target`` as ``ckpt_dir/checkpoint_<step>/`` and wait until it is committed.

    The same as ``with AsyncCheckpointer(ckpt_dir, keep=keep) as c: c.save(target,
    step=step)``: see :class:`AsyncCheckpointer` to let training continue while saving.
    With several processes, every process calls it with the same arguments; each writes
    the shards it owns.

    Args:
      ckpt_dir: directory of the run's checkpoints (created if missing).
      target: the pytree to save: arrays (jax, sharded on any mesh, or NumPy), typed or
        raw PRNG keys, Python scalars, ``str``, ``bytes`` and ``None``, in dicts, lists,
        tuples, ``flax.struct`` dataclasses and optax states.
      step: the training step, stored in the checkpoint and used in its name (>= 0).
      keep: if given, delete all but the ``keep`` newest step directories once this one
        is committed.

    Returns:
      The directory of the checkpoint.

    Raises:
      ValueError: a negative ``step``, ``keep < 1``, or a checkpoint of this step exists
        (checkpoints are never overwritten).
      TypeError: a leaf of another type, or an array of a non-numeric dtype.

    Example:
      >>> import tempfile, jax.numpy as jnp
      >>> d = tempfile.mkdtemp()
      >>> save_checkpoint(d, {"w": jnp.ones(2)}, step=3).name
      'checkpoint_00000003'
      >>> restore_checkpoint(latest_checkpoint(d), like={"w": jnp.zeros(2)})["w"].tolist()
      [1.0, 1.0]
    """
    _orbax.check_step(step, "save_checkpoint")
    with AsyncCheckpointer(ckpt_dir, keep=keep) as saver:
        return saver.save(target, step=step)


def restore_checkpoint(path: PathLike, like: T) -> T:
    """Load a checkpoint into the structure of ``like``, refusing anything that does not fit.

    ``like`` is a state of the model being resumed (e.g. freshly initialized): only its
    structure, shapes, dtypes and shardings are used, and its arrays may live on any mesh
    and any number of devices or processes, whatever the saving run used. The stored tree
    must match it exactly (same keys, shapes, dtypes, PRNG key implementation, Python
    scalar types) or nothing is loaded. One exception: a Python scalar and a 0-d array of
    the same kind (bool; int and an integer dtype; float and a floating dtype; complex and
    a complex dtype) fit each other, and the value takes ``like``'s type, so a flax
    ``TrainState`` saved after jitted steps (``step`` a 0-d ``int32`` array) restores into
    a fresh ``TrainState.create(...)`` (``step`` the Python int 0). With several
    processes, every process calls it; each reads the shards its devices need.

    Args:
      path: a checkpoint directory, a ``.msgpack`` file of jaxnorm 0.1, or the run's
        directory (its latest checkpoint is used).
      like: a pytree with the target structure.

    Returns:
      A tree of ``like``'s type holding the stored values. A leaf that is a
      ``jax.Array`` in ``like`` is put on ``like``'s sharding with ``like``'s dtype, a
      typed PRNG key is rebuilt as a key, a NumPy array or scalar stays NumPy, a Python
      scalar stays a Python scalar of ``like``'s type.

    Raises:
      FileNotFoundError: no such checkpoint, or a directory without checkpoints.
      ValueError: a checkpoint that is unreadable, corrupted (its arrays do not hash to
        the digests saved with them) or of format ``/1``, or a tree that does not match
        ``like``; the message names the checkpoint and, for a misfit, the first
        mismatching path (sorted path order), e.g. ``params/Dense_1/kernel: checkpoint
        has (64, 10), model expects (32, 10)``, and lists a few others.
    """
    p = _resolve(path, "restore_checkpoint")
    if p.is_dir():
        return _orbax.restore(p, like)
    step, stored = _legacy.read(p, "restore_checkpoint")
    _tree.refuse_misfit(stored, like, str(p), step)
    return _tree.fit(stored, like)


def checkpoint_step(path: PathLike) -> int:
    """The step stored in a checkpoint (or in the latest one of a run's directory).

    Reads the checksummed manifest only; the arrays are verified by
    :func:`restore_checkpoint`.

    Raises:
      FileNotFoundError: no such checkpoint, or a directory without checkpoints.
      ValueError: an unreadable or corrupted manifest (or ``.msgpack`` file).
    """
    p = _resolve(path, "checkpoint_step")
    if p.is_dir():
        return _orbax.read_manifest(p, "checkpoint_step")[0]
    return _legacy.read(p, "checkpoint_step")[0]


def upgrade_checkpoint(path: PathLike) -> Path:
    """Convert a ``.msgpack`` checkpoint of jaxnorm 0.1 into a step directory next to it.

    Reads a ``jaxnorm.checkpoint/2`` file (verified by its checksum) or a
    ``jaxnorm.checkpoint/1`` file (no checksum: :func:`restore_checkpoint` refuses it, and
    this checks only that it is well formed) and writes its step and state as
    ``checkpoint_<step>/`` in the same directory, with digests of its content as it is
    *now*: a ``/1`` file corrupted before the upgrade stays corrupted, so restore it once
    and check its values. The ``.msgpack`` file is left in place (delete it when you no
    longer need it); :func:`latest_checkpoint` prefers the directory. A step directory,
    or a file whose directory exists already, is verified and returned as it is. Run it
    in one process.

    Args:
      path: a checkpoint, or a run's directory (its latest checkpoint is upgraded).

    Returns:
      The step directory.

    Raises:
      FileNotFoundError: no such checkpoint, or a directory without checkpoints.
      ValueError: neither a well-formed ``/1`` file nor a verified ``/2`` file or step
        directory.
    """
    caller = "upgrade_checkpoint"
    p = _resolve(path, caller)
    if p.is_dir():
        _orbax.read_manifest(p, caller)
        return p
    old = _legacy.read_format_1(p, caller)
    step, stored = old if old is not None else _legacy.read(p, caller)
    target = checkpoint_path(p.parent, step)
    if target.exists():
        _orbax.read_manifest(target, caller)
        return target

    def leaf(x: Any, _: str) -> Any:
        if _tree.is_stored_key(x):
            return jax.random.wrap_key_data(x["data"], impl=x[_tree.KEY_TAG])
        return x

    return save_checkpoint(p.parent, _tree.map_dict(leaf, stored), step=step)
