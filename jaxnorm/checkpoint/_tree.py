"""A stored tree against ``like``: refuse what does not fit, then convert into ``like``'s types.

Both formats (the orbax directories and the older msgpack files) describe what they hold
as a *stored tree*: nested dicts in ``flax.serialization.to_state_dict`` form whose leaves
are arrays or array descriptions (anything with ``.shape`` and ``.dtype``), PRNG key
entries ``{KEY_TAG: impl name, "data": uint32 array}``, Python scalars and ``None``. This
module compares such a tree with ``like`` (nothing is loaded before it fits) and turns
loaded values into ``like``'s leaf types and shardings.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import jax
import jax.numpy as jnp
import numpy as np
from flax import serialization

T = TypeVar("T")

KEY_TAG = "__prng_key__"  # a typed PRNG key is stored as {KEY_TAG: impl name, "data": uint32}
SCALAR_KINDS = {bool: "bool", int: "int", float: "float", complex: "complex"}


def is_key(leaf: Any) -> bool:
    """A typed PRNG key array (``jax.random.key``), as opposed to a raw ``uint32`` key."""
    return isinstance(leaf, jax.Array) and jnp.issubdtype(leaf.dtype, jax.dtypes.prng_key)


def is_scalar(x: Any) -> bool:
    """A leaf stored by value (not an array): Python scalars, ``str``, ``bytes``, ``None``."""
    return isinstance(x, (bool, int, float, complex, str, bytes)) or x is None


def is_stored_key(x: Any) -> bool:
    return isinstance(x, dict) and KEY_TAG in x


def state_dict(tree: Any) -> Any:
    """``flax.serialization.to_state_dict``: nested dicts with string keys."""
    return serialization.to_state_dict(tree)


def map_dict(fn: Callable[[Any, str], Any], state: Any, path: str = "") -> Any:
    """``fn(leaf, path)`` over a nested state dict, keeping key order (``jax.tree.map`` sorts).

    A stored PRNG key entry is one leaf.
    """
    if isinstance(state, dict) and not is_stored_key(state):
        return {k: map_dict(fn, v, f"{path}/{k}" if path else str(k)) for k, v in state.items()}
    return fn(state, path)


def flat_leaves(state: Any, *, stored: bool) -> list[Any]:
    """Leaves in sorted path order (``jax.tree.leaves``); keys and ``None`` are leaves."""
    if stored:
        return jax.tree.leaves(state, is_leaf=lambda x: is_stored_key(x) or x is None)
    return jax.tree.leaves(state, is_leaf=lambda x: is_key(x) or x is None)


def leaf_paths(state: Any) -> list[str]:
    """``a/b/c`` paths of the :func:`flat_leaves` of a stored tree, in the same order."""
    flat = jax.tree_util.tree_flatten_with_path(
        state, is_leaf=lambda x: is_stored_key(x) or x is None
    )[0]
    return ["/".join(str(getattr(k, "key", k)) for k in path) for path, _ in flat]


def spec(like: Any) -> Any:
    """``like``'s state dict with shape/dtype leaves (nothing is copied off device)."""

    def leaf(x: Any, _: str) -> Any:
        if is_key(x):
            data = jax.eval_shape(jax.random.key_data, x)
            return {KEY_TAG: str(jax.random.key_impl(x)), "data": data}
        if is_scalar(x):
            return x
        dtype = x.dtype if hasattr(x, "dtype") else np.result_type(x)
        return jax.ShapeDtypeStruct(np.shape(x), dtype)

    return map_dict(leaf, state_dict(like))


def describe(x: Any) -> str:
    if is_stored_key(x):
        return f"a PRNG key ({x[KEY_TAG]}) of shape {tuple(x['data'].shape)[:-1]}"
    if isinstance(x, dict):
        return f"a subtree with keys {sorted(x)}"
    if is_scalar(x):
        return f"a Python {type(x).__name__}"
    return f"an array {tuple(x.shape)} {np.dtype(x.dtype)}"


def mismatches(got: Any, want: Any, path: str = "") -> Iterator[str]:
    """Every difference between a stored tree and the :func:`spec` of ``like``.

    In sorted key order at every level (jax's flattening order), so "the first" does not
    depend on how ``like``'s dicts were built (``jit`` returns them with sorted keys).
    """
    where = path or "<root>"
    differ = f"{where}: checkpoint has {describe(got)}, model expects {describe(want)}"
    if isinstance(want, dict) and not is_stored_key(want):
        if not isinstance(got, dict) or is_stored_key(got):
            yield differ
            return
        for k in sorted(want):
            sub = f"{path}/{k}" if path else str(k)
            if k not in got:
                yield f"{sub}: missing from the checkpoint (model expects {describe(want[k])})"
            else:
                yield from mismatches(got[k], want[k], sub)
        for k in sorted(got):
            if k not in want:
                sub = f"{path}/{k}" if path else str(k)
                yield f"{sub}: in the checkpoint but not in the model ({describe(got[k])})"
    elif is_stored_key(want):
        if not is_stored_key(got) or got[KEY_TAG] != want[KEY_TAG]:
            yield differ
        elif tuple(got["data"].shape) != tuple(want["data"].shape):
            yield differ
        elif np.dtype(got["data"].dtype) != np.dtype(want["data"].dtype):
            yield differ
    elif is_scalar(want):
        if type(got) is not type(want) and not same_kind(want, got):
            yield differ
    elif is_scalar(got) and same_kind(got, want):
        if not fits(got, want.dtype):
            yield (
                f"{where}: checkpoint has the Python {type(got).__name__} {got!r}, which the "
                f"model's array () {np.dtype(want.dtype)} cannot hold"
            )
    elif isinstance(got, dict) or is_scalar(got) or not hasattr(got, "shape"):
        yield differ
    elif tuple(got.shape) != tuple(want.shape):
        yield f"{where}: checkpoint has {tuple(got.shape)}, model expects {tuple(want.shape)}"
    elif np.dtype(got.dtype) != np.dtype(want.dtype):
        yield (
            f"{where}: checkpoint has dtype {np.dtype(got.dtype)}, model expects "
            f"{np.dtype(want.dtype)} (shape {tuple(got.shape)})"
        )


def refuse_misfit(stored: Any, like: Any, file: str, step: int) -> None:
    """Raise the ``ValueError`` naming the first mismatch, if ``stored`` does not fit ``like``."""
    problems = list(mismatches(stored, spec(like)))
    if not problems:
        return
    more = ""
    if len(problems) > 1:
        shown = "; ".join(problems[1:4])
        more = f" ({len(problems) - 1} more: {shown}{'; ...' if len(problems) > 4 else ''})"
    raise ValueError(
        f"restore_checkpoint: {file!r} (step {step}) does not fit the model, nothing was "
        f"loaded. First mismatch: {problems[0]}{more}. Restore into a state built with the "
        f"same model configuration and optimizer."
    )


def dtype_kind(dtype: Any) -> str | None:
    if np.dtype(dtype) == np.bool_:
        return "bool"
    kinds = (("int", jnp.integer), ("float", jnp.floating), ("complex", jnp.complexfloating))
    return next((kind for kind, base in kinds if jnp.issubdtype(dtype, base)), None)


def same_kind(scalar: Any, array: Any) -> bool:
    """A Python ``bool``/``int``/``float``/``complex`` and a 0-d array of that kind."""
    kind = SCALAR_KINDS.get(type(scalar))
    return (
        kind is not None
        and hasattr(array, "dtype")
        and tuple(np.shape(array) if not hasattr(array, "shape") else array.shape) == ()
        and dtype_kind(array.dtype) == kind
    )


def fits(value: bool | int | float | complex, dtype: Any) -> bool:
    """Whether ``dtype`` holds the Python scalar ``value`` (ints exactly, finite floats finite)."""
    if dtype_kind(dtype) == "int":
        info = jnp.iinfo(dtype)
        return int(info.min) <= value <= int(info.max)
    if dtype_kind(dtype) in ("float", "complex"):
        with np.errstate(over="ignore"):
            cast = np.asarray(value, dtype)
        return bool(np.isfinite(cast)) or not np.isfinite(value)
    return True


def put(value: Any, sharding: jax.sharding.Sharding, dtype: Any) -> jax.Array:
    """``value`` as a ``jax.Array`` of ``dtype`` on ``sharding`` (any mesh, any process count).

    A ``jax.Array`` already there is returned as it is; host values are cut into the
    shards of ``sharding`` with ``jax.make_array_from_callback``, which also builds arrays
    whose devices span processes (each process supplies its own shards).
    """
    if isinstance(value, jax.Array):
        if value.sharding == sharding and value.dtype == dtype:
            return value
        return jax.device_put(value.astype(dtype), sharding)
    host = np.asarray(value, dtype)
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def fit(stored: Any, like: T) -> T:
    """The values of a stored tree (already checked by :func:`refuse_misfit`) in ``like``'s types.

    A leaf that is a ``jax.Array`` in ``like`` is put on ``like``'s sharding with ``like``'s
    dtype, a typed PRNG key is rebuilt as a key of ``like``'s implementation and sharding, a
    NumPy array or scalar stays NumPy, a Python scalar stays a Python scalar of ``like``'s
    type (a stored 0-d array becomes one).
    """

    def unpack(stored_leaf: Any, like_leaf: Any) -> Any:
        if is_key(like_leaf):
            sharding = jax.random.key_data(like_leaf).sharding
            data = put(stored_leaf["data"], sharding, np.uint32)
            key = jax.random.wrap_key_data(data, impl=jax.random.key_impl(like_leaf))
            return (
                key
                if key.sharding == like_leaf.sharding
                else put(key, like_leaf.sharding, key.dtype)
            )
        if isinstance(like_leaf, jax.Array):
            return put(stored_leaf, like_leaf.sharding, like_leaf.dtype)
        if isinstance(like_leaf, np.ndarray):
            return np.asarray(stored_leaf, like_leaf.dtype)
        if isinstance(like_leaf, np.generic):
            return np.asarray(stored_leaf, like_leaf.dtype)[()]
        if type(like_leaf) in SCALAR_KINDS and type(stored_leaf) is not type(like_leaf):
            return type(like_leaf)(np.asarray(stored_leaf)[()])  # a 0-d array of its kind
        return stored_leaf

    flat_like, treedef = jax.tree.flatten(
        state_dict(like), is_leaf=lambda x: is_key(x) or x is None
    )
    flat_stored = flat_leaves(stored, stored=True)
    values = [unpack(s, w) for s, w in zip(flat_stored, flat_like, strict=True)]
    return serialization.from_state_dict(like, jax.tree.unflatten(treedef, values))
