"""``where`` that works under explicit sharding whatever its operands' shardings.

Under ``jax.sharding.AxisType.Explicit`` meshes (``jax.make_mesh``'s default in jax 0.10),
``jnp.where`` refuses operands whose shardings differ after broadcasting (jax-ml/jax#37853):
a padding mask ``(N, 1)`` sharded over ``data`` against activations ``(N, C)`` sharded over
``(data, model)``, or replicated running statistics against channel-sharded batch
statistics. Arithmetic broadcasting has no such rule, so :func:`where` tries ``jnp.where``
and, if explicit sharding refuses it, reshards every operand to the sharding that their
broadcast sum gets, then selects. Outside explicit sharding it is ``jnp.where``.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

try:  # no public alias in jax 0.10
    from jax._src.core import ShardingTypeError
except ImportError:  # pragma: no cover - a later jax may move it
    ShardingTypeError = TypeError  # type: ignore[assignment,misc]


def where(condition: Any, a: Any, b: Any) -> jax.Array:
    """``jnp.where(condition, a, b)``, resharding the operands if explicit sharding asks."""
    try:
        return jnp.where(condition, a, b)
    except ShardingTypeError:
        pass
    a, b = jnp.asarray(a), jnp.asarray(b)
    condition = jnp.asarray(condition)
    out_dtype = jnp.result_type(a, b)
    # The sharding a broadcast elementwise sum of the three would get.
    probe = (
        jnp.zeros_like(condition, out_dtype)
        + jnp.zeros_like(a, out_dtype)
        + jnp.zeros_like(b, out_dtype)
    )
    spec = jax.typeof(probe).sharding.spec
    shape = probe.shape

    def fit(v):
        return jax.sharding.reshard(jnp.broadcast_to(v, shape), spec)

    return jnp.where(fit(condition), fit(a.astype(out_dtype)), fit(b.astype(out_dtype)))
