"""SHA-256 of saved shards, and the check that restored arrays hash to them.

On save, each process copies the shards it owns (``replica_id == 0``: every element of
every array is owned by exactly one process) to host memory and hashes each one's C-order
bytes; a NumPy leaf is hashed whole by process 0, which is the process orbax writes it
from. On restore, the arrays orbax returned (on ``like``'s shardings, any mesh) are cut
back into the saved boxes and hashed again. A box lies inside one restored shard, or
inside several held by one process (a finer mesh), and that process hashes it from host
copies; only a box that spans shards of several processes is first replicated with
``jax.device_put``. The processes then agree on the result, so all of them raise.
"""

from __future__ import annotations

import hashlib
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import jax
import numpy as np

from jaxnorm.checkpoint._manifest import Box

_PARALLEL_BYTES = 1 << 24  # below this, threads cost more than they save


def full_box(shape: tuple[int, ...]) -> Box:
    return tuple((0, n) for n in shape)


def box_of(index: tuple[slice, ...], shape: tuple[int, ...]) -> Box:
    """The ``[start, stop)`` per dimension of a shard index (a tuple of slices)."""
    out = []
    for s, n in zip(index, shape, strict=True):
        start, stop, _ = s.indices(n)
        out.append((start, max(start, stop)))
    return tuple(out)


def sha256(host: np.ndarray) -> str:
    """Hex SHA-256 of the C-order bytes of ``host`` (its dtype's native, little-endian layout)."""
    flat = np.ascontiguousarray(host).reshape(-1).view(np.uint8)
    return hashlib.sha256(flat).hexdigest()


def host_shards(value: Any, process: int) -> list[tuple[Box, np.ndarray]]:
    """Host copies of the shards of ``value`` this process owns, with their boxes.

    The copy is taken now, so the device arrays may be donated or deleted once the save
    call returns.
    """
    if isinstance(value, jax.Array):
        return [
            (box_of(shard.index, value.shape), np.array(shard.data))
            for shard in value.addressable_shards
            if shard.replica_id == 0
        ]
    return [(full_box(np.shape(value)), np.array(value))] if process == 0 else []


def tiles(boxes: list[Box], shape: tuple[int, ...]) -> bool:
    """Whether ``boxes`` are the cells of a grid that covers ``shape`` exactly once.

    Every sharding jax makes cuts each dimension into intervals and takes their product;
    checking that shape (instead of pairwise overlaps) costs ``O(k log k)`` for ``k`` boxes.
    """
    if len(set(boxes)) != len(boxes):
        return False
    count = 1
    for dim, n in enumerate(shape):
        cuts = sorted({box[dim] for box in boxes})
        ends = [0] + [stop for _, stop in cuts]
        if [start for start, _ in cuts] != ends[:-1] or ends[-1] != n:
            return False
        count *= len(cuts)
    return count == len(boxes)


def _volume(box: Box) -> int:
    return int(np.prod([stop - start for start, stop in box]))


def _intersect(a: Box, b: Box) -> Box | None:
    out = tuple((max(x0, y0), min(x1, y1)) for (x0, x1), (y0, y1) in zip(a, b, strict=True))
    return out if all(start < stop for start, stop in out) else None


def _slices(box: Box, origin: Box | None = None) -> tuple[slice, ...]:
    origin = origin or tuple((0, 0) for _ in box)
    return tuple(slice(a - o, b - o) for (a, b), (o, _) in zip(box, origin, strict=True))


def _replicated(value: jax.Array) -> jax.Array:
    devices = np.asarray(sorted(value.sharding.device_set, key=lambda d: d.id))
    mesh = jax.sharding.Mesh(devices, ("_jaxnorm_all",))
    return jax.device_put(value, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))


def _checks(value: Any, saved: list[tuple[Box, str]]) -> list[tuple[np.ndarray, str]]:
    """``(host values, saved digest)`` of the boxes this process checks (collective-safe)."""
    if not isinstance(value, jax.Array):  # NumPy: every process holds all of it
        return [(value[_slices(box)], digest) for box, digest in saved]
    me, shape = jax.process_index(), value.shape
    regions: dict[Box, list[jax.Device]] = {}
    for device, index in value.sharding.devices_indices_map(shape).items():
        regions.setdefault(box_of(index, shape), []).append(device)
    local = {shard.device: shard for shard in value.addressable_shards}
    hosts: dict[Box, np.ndarray] = {}
    replicated = None
    checks = []
    for box, digest in saved:
        if _volume(box) == 0:
            checks.append((np.zeros(0, np.uint8), digest))
            continue
        needed = [r for r in regions if _intersect(r, box) is not None]
        owners = set.intersection(*({d.process_index for d in regions[r]} for r in needed))
        if not owners:  # spans processes: every process takes part, process 0 hashes
            replicated = _replicated(value) if replicated is None else replicated
            if me == 0:
                checks.append((np.asarray(replicated.addressable_data(0))[_slices(box)], digest))
            continue
        if min(owners) != me:
            continue
        for region in needed:
            if region not in hosts:
                device = next(d for d in regions[region] if d in local)
                hosts[region] = np.asarray(local[device].data)
        if len(needed) == 1:  # inside one restored shard
            checks.append((hosts[needed[0]][_slices(box, needed[0])], digest))
            continue
        out = np.empty([stop - start for start, stop in box], value.dtype)
        for region in needed:
            part = _intersect(region, box)
            out[_slices(part, box)] = hosts[region][_slices(part, region)]
        checks.append((out, digest))
    return checks


def sha256_all(hosts: list[np.ndarray]) -> list[str]:
    """:func:`sha256` of each; in threads when there is enough to hash (hashlib drops the GIL)."""
    workers = min(len(hosts), os.cpu_count() or 1)
    if workers < 2 or sum(h.nbytes for h in hosts) < _PARALLEL_BYTES:
        return [sha256(h) for h in hosts]
    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(sha256, hosts))


def first_mismatch(values: list[Any], saved: list[list[tuple[Box, str]]]) -> int | None:
    """Position of the first value that does not hash to its saved digests, or ``None``.

    Every process checks its part of every value, then all agree (a collective when there
    are several processes), so the answer is the same everywhere.
    """
    first = len(values)
    for i, (value, boxes) in enumerate(zip(values, saved, strict=True)):
        checks = _checks(value, boxes)  # every value: the collectives must run everywhere
        got = sha256_all([host for host, _ in checks])
        if first == len(values) and got != [digest for _, digest in checks]:
            first = i
    first = agree_min(first)
    return first if first < len(values) else None


def agree_min(value: int) -> int:
    """The minimum of ``value`` over all processes (``value`` itself with one process)."""
    if jax.process_count() == 1:
        return value
    from jax.experimental import multihost_utils

    gathered = multihost_utils.process_allgather(np.asarray([value], np.int32))
    return int(np.min(gathered))
