"""Checkpoints as orbax-checkpoint step directories: the writer and the reader.

``ckpt_dir/checkpoint_<step:08d>/`` is an orbax ``CheckpointManager`` step with two items:

* ``state/``: the arrays of the state (PRNG keys as their ``uint32`` key data), as a flat
  dict ``{"0": array, "1": ...}`` saved by orbax's ``PyTreeCheckpointHandler`` (OCDBT:
  each process writes the shards it owns into its own ``ocdbt.process_<i>/``);
* ``jaxnorm/``: the manifest (tree, shapes, dtypes, key implementations, Python scalars)
  and each process's shard digests (:mod:`~jaxnorm.checkpoint._manifest`).

Orbax writes both into ``checkpoint_<step>.orbax-checkpoint-tmp-<n>`` and renames it
to the final name once every process has finished (the commit), so a step directory
under its final name is complete.
"""

from __future__ import annotations

import asyncio
import dataclasses
import weakref
from pathlib import Path
from typing import Any, TypeVar

import jax
import numpy as np
import orbax.checkpoint as ocp

from jaxnorm.checkpoint import _integrity, _manifest, _tree
from jaxnorm.checkpoint._manifest import ITEM, MANIFEST, Corrupt, StoredArray

T = TypeVar("T")

# The open checkpointers of this process by directory: a new one first waits for the saves
# of an older one, because orbax's start-up removes unfinished saves' temporary directories.
_OPEN: weakref.WeakValueDictionary[Path, AsyncCheckpointer] = weakref.WeakValueDictionary()

ARRAYS = "state"  # the orbax item holding the arrays
PREFIX = "checkpoint"  # step directories are PREFIX_<step:08d>
DIGITS = 8


def step_dir(ckpt_dir: Path, step: int) -> Path:
    return Path(ckpt_dir) / f"{PREFIX}_{int(step):0{DIGITS}d}"


# ------------------------------------------------------------------ the jaxnorm item


@dataclasses.dataclass
class _IntegritySave(ocp.args.CheckpointArgs):
    manifest: dict  # the content of manifest.json
    arrays: list[Any]  # the arrays of the state item, by index


@dataclasses.dataclass
class _IntegrityRestore(ocp.args.CheckpointArgs):
    pass


def _write_digests(directory: Any, process: int, shards: list) -> None:
    """Hash the host copies and write this process's digest file (in the background)."""
    digests = _integrity.sha256_all([host for _, _, host in shards])
    entries = [
        {"leaf": index, "box": [list(d) for d in box], "sha256": digest}
        for (index, box, _), digest in zip(shards, digests, strict=True)
    ]
    _manifest.write_json(
        directory / _manifest.digests_name(process), {"process": process, "shards": entries}
    )


class _IntegrityHandler(ocp.handlers.AsyncCheckpointHandler):
    """Writes ``manifest.json`` (process 0) and ``sha256.process_<i>.json`` (every process).

    ``async_save`` copies this process's shards to host memory before it returns; the
    hashing and the writes run in orbax's background commit, like the array writes.
    """

    async def async_save(self, directory: Any, args: _IntegritySave) -> list[Any]:
        process = jax.process_index()
        shards = [
            (index, box, host)
            for index, value in enumerate(args.arrays)
            for box, host in _integrity.host_shards(value, process)
        ]
        manifest = args.manifest if process == 0 else None

        async def write() -> None:
            _write_digests(directory, process, shards)
            if manifest is not None:
                _manifest.write_json(directory / MANIFEST, manifest)

        return [ocp.future.CommitFutureAwaitingContractedSignals(write(), name="jaxnorm_sha256")]

    def save(self, directory: Any, args: _IntegritySave) -> None:
        async def run() -> None:
            for f in await self.async_save(directory, args):
                f.result()

        asyncio.run(run())

    def restore(self, directory: Any, args: _IntegrityRestore | None = None) -> dict:
        return _manifest.read_json(Path(directory) / MANIFEST)


ocp.args.register_with_handler(_IntegrityHandler, for_save=True)(_IntegritySave)
ocp.args.register_with_handler(_IntegrityHandler, for_restore=True)(_IntegrityRestore)


# ------------------------------------------------------------------ writer


def check_step(step: Any, caller: str) -> int:
    if isinstance(step, bool) or not isinstance(step, (int, np.integer)) or step < 0:
        raise ValueError(f"{caller}: step must be a non-negative int; got {step!r}.")
    return int(step)


class AsyncCheckpointer:
    """Saves checkpoints in the background: training continues while they are written.

    :meth:`save` returns once this process's arrays are copied to host memory (so the
    state may then be donated, deleted or updated); orbax writes the copies, the jaxnorm
    item hashes them, and the step directory is committed by a rename, all in background
    threads. A save waits for the previous one to finish first. Call
    :meth:`wait_until_finished` before reading the checkpoint in the same program, and
    :meth:`close` (or use ``with``) at the end; an error of a background save is raised by
    the next :meth:`save`, :meth:`wait_until_finished` or :meth:`close`. With several
    processes, every process creates the checkpointer and calls :meth:`save` with the same
    step, and each writes only the shards it owns.

    Memory: while a save is in flight, each process holds two host copies of its shards
    (orbax's, to write, and jaxnorm's, to hash).

    Use one open checkpointer per directory. A second one in the same process (or
    :func:`save_checkpoint`) first waits for the saves of the first: orbax's start-up
    deletes the temporary directories of unfinished saves, which must not be live ones.

    Args:
      ckpt_dir: directory of the run's checkpoints (created if missing).
      keep: if given, after each committed save delete all but the ``keep`` newest
        checkpoints written in this format (older ``.msgpack`` files are never deleted).

    Example:
      >>> import tempfile, jax.numpy as jnp
      >>> d = tempfile.mkdtemp()
      >>> with AsyncCheckpointer(d, keep=2) as saver:
      ...     for step in range(3):
      ...         _ = saver.save({"w": jnp.full(2, step)}, step=step)  # returns at once
      >>> sorted(p.name for p in Path(d).iterdir())
      ['checkpoint_00000001', 'checkpoint_00000002']
    """

    def __init__(self, ckpt_dir: str | Path, *, keep: int | None = None) -> None:
        if keep is not None and (isinstance(keep, bool) or not isinstance(keep, int) or keep < 1):
            raise ValueError(f"AsyncCheckpointer: keep must be >= 1 or None; got {keep!r}.")
        self.directory = Path(ckpt_dir).absolute()
        older = _OPEN.get(self.directory)
        if older is not None:
            older.wait_until_finished()
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep,
            step_prefix=PREFIX,
            step_format_fixed_length=DIGITS,
            create=True,
            cleanup_tmp_directories=True,  # what a killed save left behind
            enable_async_checkpointing=True,
        )
        self._manager = ocp.CheckpointManager(
            self.directory,
            options=options,
            item_names=(ARRAYS, ITEM),
            item_handlers={ARRAYS: ocp.PyTreeCheckpointHandler(), ITEM: _IntegrityHandler()},
        )
        _OPEN[self.directory] = self

    def save(self, target: Any, *, step: int) -> Path:
        """Start saving ``target`` as step ``step``; returns the directory it will have.

        Raises:
          ValueError: a negative ``step``, or a checkpoint of this step already exists
            (a checkpoint is never overwritten).
          TypeError: a leaf that cannot be saved (see :func:`save_checkpoint`).
        """
        step = check_step(step, "save_checkpoint")
        final = step_dir(self.directory, step)
        if final.exists():
            raise ValueError(
                f"save_checkpoint: {str(final)!r} already exists, and a checkpoint is never "
                f"overwritten. Save under another step, or delete it first."
            )
        tree, arrays = _manifest.encode(_tree.state_dict(target))
        manifest = {"step": step, "num_processes": jax.process_count(), "tree": tree}
        values = [value for _, value in arrays]
        items: dict[str, Any] = {}  # orbax waits on the items' writes in this order
        if values:
            items[ARRAYS] = ocp.args.PyTreeSave({str(i): v for i, v in enumerate(values)})
        items[ITEM] = _IntegritySave(manifest, values)
        self._manager.save(step, args=ocp.args.Composite(**items), force=True)
        return final

    def wait_until_finished(self) -> None:
        """Block until every save started so far is committed (or raise its error)."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        """Wait for the saves in flight, then release orbax's threads."""
        try:
            self._manager.close()
        finally:
            if _OPEN.get(self.directory) is self:
                del _OPEN[self.directory]

    def __enter__(self) -> AsyncCheckpointer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ------------------------------------------------------------------ reader


def _refused(caller: str, path: Path, why: str) -> ValueError:
    return ValueError(
        f"{caller}: {str(path)!r} is corrupted or incomplete ({why}), so nothing was loaded. "
        f"Restore an earlier checkpoint (latest_checkpoint lists only committed ones)."
    )


def read_manifest(path: Path, caller: str) -> tuple[int, int, Any, int]:
    """``(step, saving processes, stored tree, number of arrays)`` of a step directory."""
    if not (path / ITEM).is_dir():
        raise ValueError(
            f"{caller}: {str(path)!r} has no {ITEM}/ item, so it is not a "
            f"{_manifest.FORMAT} checkpoint (a plain orbax checkpoint?); nothing was loaded."
        )
    try:
        return _manifest.read_manifest(path / ITEM)
    except Corrupt as err:
        raise _refused(caller, path, str(err)) from None


def _restore_args(stored: StoredArray, like_leaf: Any) -> Any:
    """Orbax's restore arguments: onto ``like``'s sharding, or as host NumPy."""
    if _tree.is_key(like_leaf):
        sharding = jax.random.key_data(like_leaf).sharding
    elif isinstance(like_leaf, jax.Array) and not stored.numpy:
        sharding = like_leaf.sharding
    else:
        return ocp.RestoreArgs(restore_type=np.ndarray, dtype=stored.dtype)
    return ocp.ArrayRestoreArgs(sharding=sharding, global_shape=stored.shape, dtype=stored.dtype)


def restore(path: Path, like: T) -> T:
    """Restore the step directory ``path`` into ``like`` (checked, loaded, verified)."""
    caller = "restore_checkpoint"
    step, processes, stored, count = read_manifest(path, caller)
    _tree.refuse_misfit(stored, like, str(path), step)
    flat_stored = _tree.flat_leaves(stored, stored=True)
    flat_like = _tree.flat_leaves(_tree.state_dict(like), stored=False)
    paths = _tree.leaf_paths(stored)
    wanted: list[tuple[str, StoredArray, Any]] = []  # (path, description, restore args)
    for p, s, w in zip(paths, flat_stored, flat_like, strict=True):
        desc = s["data"] if _tree.is_stored_key(s) else s
        if isinstance(desc, StoredArray):
            wanted.append((p, desc, _restore_args(desc, w)))
    if sorted(d.index for _, d, _ in wanted) != list(range(count)):
        raise _refused(caller, path, "manifest.json numbers its arrays wrongly")
    loaded: dict[str, Any] = {}
    why = None
    if wanted:
        try:
            loaded = _load_arrays(path / ARRAYS, {str(d.index): a for _, d, a in wanted})
        except Exception as err:  # orbax and tensorstore raise many types on bad files
            why = f"orbax-checkpoint could not read {ARRAYS}/: {type(err).__name__}: {err}"
    if _integrity.agree_min(0 if why else 1) == 0:
        raise _refused(caller, path, why or "another process could not read its arrays")
    try:
        shapes = [d.shape for _, d, _ in sorted(wanted, key=lambda w: w[1].index)]
        saved = _manifest.read_digests(path / ITEM, processes, shapes)
    except Corrupt as err:
        raise _refused(caller, path, str(err)) from None
    saved_by_leaf = [saved[d.index] for _, d, _ in wanted]
    for (p, d, _), boxes in zip(wanted, saved_by_leaf, strict=True):
        if not _integrity.tiles([b for b, _ in boxes], d.shape):
            raise _refused(caller, path, f"the saved shards of {p} do not cover it exactly once")
    values = [loaded[str(d.index)] for _, d, _ in wanted]
    bad = _integrity.first_mismatch(values, saved_by_leaf)
    if bad is not None:
        raise _refused(
            caller,
            path,
            f"the SHA-256 of {wanted[bad][0]} as read back does not match the digest saved with it",
        )

    def value(leaf: Any, _: str) -> Any:
        if _tree.is_stored_key(leaf):
            return {**leaf, "data": loaded[str(leaf["data"].index)]}
        return loaded[str(leaf.index)] if isinstance(leaf, StoredArray) else leaf

    return _tree.fit(_tree.map_dict(value, stored), like)


def _load_arrays(directory: Path, restore_args: dict[str, Any]) -> dict[str, Any]:
    handler = ocp.PyTreeCheckpointHandler()
    try:
        return handler.restore(directory, args=ocp.args.PyTreeRestore(restore_args=restore_args))
    finally:
        handler.close()
