"""Checkpoints of a training state on orbax-checkpoint: strict, verified, atomic, sharded.

A training state is any pytree flax can serialize: a dict or ``flax.struct`` of
``params``, ``batch_stats`` (a linen collection or :class:`jaxnorm.BatchStats`), the
optax optimizer state, the step, a PRNG key (typed ``jax.random.key`` or raw
``uint32``), Python scalars. For NNX, save ``nnx.to_pure_dict(nnx.state(model))``
and restore into it, then ``nnx.replace_by_pure_dict``::

    state = {"params": params, "batch_stats": stats, "opt_state": opt_state,
             "step": step, "rng": key}
    save_checkpoint(ckpt_dir, state, step=step)  # ckpt_dir/checkpoint_00000100/
    ...
    path = latest_checkpoint(ckpt_dir)           # None when there is none yet
    state = restore_checkpoint(path, like=fresh_state)

    with AsyncCheckpointer(ckpt_dir, keep=3) as saver:  # training does not wait
        for step in ...:
            state = train_step(state, batch)
            saver.save(state, step=step)         # returns once copied to host memory

Format (``jaxnorm.checkpoint/3``). One orbax-checkpoint step directory per step, written
by an orbax ``CheckpointManager``: the arrays in an orbax PyTree item (OCDBT, each process
writing the shards it owns), and a ``jaxnorm`` item with a manifest (the tree, shapes,
dtypes, PRNG key implementations and Python scalar values) and per-process SHA-256 digests
of the saved shards. See :mod:`~jaxnorm.checkpoint._orbax` for the layout.

* **Multi-process.** With ``jax.distributed``, every process calls :func:`save_checkpoint`
  (or :meth:`AsyncCheckpointer.save`) with the same step and writes only the shards it
  owns; no array is gathered. :func:`restore_checkpoint` puts every array on ``like``'s
  sharding, whatever mesh, device count or process count saved it: a state saved by 2
  processes on 4 devices restores on 8 devices of one process, or on one device.
* **Asynchronous.** :class:`AsyncCheckpointer` returns from ``save`` once the arrays are
  copied to host memory; writing, hashing and the commit run in the background.
* **Atomic.** Orbax writes into ``checkpoint_<step>.orbax-checkpoint-tmp-<n>/`` and renames
  it into place once every process has finished, so a save killed at any point leaves the
  earlier checkpoints intact and no directory under a final name. :func:`latest_checkpoint`
  sees committed checkpoints only, and the next checkpointer removes the leftovers. A
  step is never overwritten: saving an existing step raises. ``keep`` deletes the oldest
  step directories only after a newer one is committed.

Safety. :func:`restore_checkpoint` compares the stored tree with ``like`` leaf by leaf
(tree structure, shapes, dtypes, PRNG key implementation, Python scalar types) and,
before anything is loaded, raises a ``ValueError`` naming the first mismatching path in
sorted path order, the order of ``jax.tree.leaves`` (``params/Dense_1/kernel:
checkpoint has (64, 10), model expects (32, 10)``). A Python scalar and a 0-d array of
the same kind (``bool``; ``int`` and an integer dtype; ``float`` and a floating dtype;
``complex`` and a complex dtype) are compatible: the value is restored into the type
``like`` has, so a saved flax ``TrainState`` (whose ``step`` became a 0-d ``int32``
array in a jitted step) restores into a fresh ``TrainState.create(...)`` (whose
``step`` is the Python int 0), and back. A Python int that does not fit ``like``'s
integer dtype, or a finite float that would overflow its floating dtype, is refused.

Integrity. Orbax does not checksum the data, and a changed byte in a data file can load
as a wrong value. So every process hashes (SHA-256) the C-order bytes of each shard it
saves, from its own host copy, and stores the digests with the box the shard covers; the
manifest and the digest files carry the SHA-256 of their own content.
:func:`restore_checkpoint` checks those first, then, after orbax has read the arrays onto
``like``'s shardings, hashes the restored values box by box and compares. What that buys
and costs:

* Robust: it checks what was *loaded*, not what is on disk, so a flipped bit in any data
  file, index, metadata or manifest, a truncated file, a missing process's files or an
  orbax read error is refused with a ``ValueError`` naming the checkpoint (and the first
  bad path), whatever the restoring mesh; nothing is returned.
* Cheap where it matters: digests are per shard, so each process hashes only what it
  saved, in the background of an asynchronous save, and on restore only the boxes it
  holds (a box that now spans several processes' devices is replicated for the check,
  the one case that moves data). The cost is one host copy and one SHA-256 pass over
  each process's part of the state, on save and on restore, in threads over the shards
  (SHA-256 runs at roughly 0.3-2 GB/s per core, depending on the CPU and its load).
  Digests of the files on disk would be cheaper to check but could not say which values
  were wrong, and would miss errors between the files and the devices.
  :func:`checkpoint_step` reads the manifest only.
* Not covered: a process that computes wrong values before saving them.

Older files. ``checkpoint_<step>.msgpack`` files of jaxnorm 0.1 in format
``"jaxnorm.checkpoint/2"`` (checksummed) still restore: :func:`restore_checkpoint` and
:func:`checkpoint_step` read them as before, and :func:`latest_checkpoint` lists them with
the step directories. Format ``"jaxnorm.checkpoint/1"`` files (no checksum) are refused
with a message that names :func:`upgrade_checkpoint`, which converts either kind into a
step directory. Nothing writes ``.msgpack`` files any more.
"""

from jaxnorm.checkpoint._api import (
    checkpoint_path,
    checkpoint_step,
    latest_checkpoint,
    restore_checkpoint,
    save_checkpoint,
    upgrade_checkpoint,
)
from jaxnorm.checkpoint._legacy import FORMAT_1, FORMAT_2
from jaxnorm.checkpoint._manifest import FORMAT
from jaxnorm.checkpoint._orbax import AsyncCheckpointer

__all__ = [
    "FORMAT",
    "FORMAT_1",
    "FORMAT_2",
    "AsyncCheckpointer",
    "checkpoint_path",
    "checkpoint_step",
    "latest_checkpoint",
    "restore_checkpoint",
    "save_checkpoint",
    "upgrade_checkpoint",
]
