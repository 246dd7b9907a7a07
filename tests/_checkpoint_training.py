"""A small training run for the checkpoint tests, importable by their subprocesses.

The state is a linen MLP with jaxnorm BatchNorm and dropout, an optax Adam state, the
step and a typed PRNG key: everything a resumed run needs to continue bit for bit.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import jaxnorm.linen as jnn

STEPS, SPLIT = 6, 4  # train STEPS straight vs. SPLIT, save, restore, STEPS - SPLIT


class MLP(nn.Module):
    hidden: int = 32

    @nn.compact
    def __call__(self, x, *, train: bool):
        x = nn.Dense(self.hidden)(x)
        x = jnn.BatchNorm(use_running_average=not train, momentum=0.9)(x)
        x = nn.Dropout(0.2, deterministic=not train)(nn.relu(x))
        return nn.Dense(10)(x)


TX = optax.adam(1e-2)


def batches():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((STEPS, 16, 8)).astype(np.float32)
    y = rng.integers(0, 10, (STEPS, 16)).astype(np.int32)
    return jnp.asarray(x), jnp.asarray(y)


@functools.partial(jax.jit, static_argnums=1)
def _init(seed, hidden: int) -> dict:
    v = MLP(hidden).init(jax.random.key(seed), jnp.zeros((2, 8)), train=False)
    return {
        "params": v["params"],
        "batch_stats": v["batch_stats"],
        "opt_state": TX.init(v["params"]),
        "step": jnp.zeros((), jnp.int32),
        "rng": jax.random.key(seed + 100),
    }


@functools.cache
def init_state(seed: int, hidden: int = 32) -> dict:
    """A fresh training state (cached: callers build new containers, never mutate it).

    One compiled init per ``hidden``; the seed is an argument of it.
    """
    return _init(jnp.asarray(seed, jnp.int32), hidden)


@jax.jit
def train_step(state, x, y):
    rng, drop = jax.random.split(state["rng"])

    def loss_fn(params):
        logits, upd = MLP().apply(
            {"params": params, "batch_stats": state["batch_stats"]},
            x,
            train=True,
            rngs={"dropout": drop},
            mutable=["batch_stats"],
        )
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), upd

    (loss, upd), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
    updates, opt_state = TX.update(grads, state["opt_state"], state["params"])
    new = {
        "params": optax.apply_updates(state["params"], updates),
        "batch_stats": upd["batch_stats"],
        "opt_state": opt_state,
        "step": state["step"] + 1,
        "rng": rng,
    }
    return new, loss


def train(state, start: int, stop: int, on_step=None):
    """Steps ``start..stop-1``; ``on_step(state, step_done)`` after each (e.g. a save)."""
    xs, ys = batches()
    losses = []
    for i in range(start, stop):
        state, loss = train_step(state, xs[i], ys[i])
        losses.append(float(loss))
        if on_step is not None:
            on_step(state, i + 1)
    return state, losses


def comparable(state):
    """Host copies; typed keys compare by their data."""
    return jax.tree.map(
        lambda a: (
            np.asarray(jax.random.key_data(a))
            if isinstance(a, jax.Array) and jnp.issubdtype(a.dtype, jax.dtypes.prng_key)
            else np.asarray(a)
        ),
        state,
    )


def sharded_values() -> dict[str, np.ndarray]:
    """Global arrays for the tests that save on one mesh and restore on another.

    Shapes divide by 4 and 8 where they are sharded; the values are distinct everywhere,
    so a shard restored into the wrong place shows.
    """
    return {
        "w": (np.arange(64, dtype=np.float32).reshape(8, 8) - 20.5) / 3,
        "b": np.linspace(-1, 1, 8, dtype=np.float32),
        "cols": np.arange(24, dtype=np.int32).reshape(3, 8) * 7 - 50,
        "half": (np.arange(8, dtype=np.float32) / 8).astype(jnp.bfloat16),
        "rng": np.asarray(jax.random.key_data(jax.random.split(jax.random.key(0), 8))),
        "host": np.arange(5, dtype=np.int64) ** 3,
    }


# Layouts as (mesh shape, mesh axes, {leaf: spec}); every leaf not named is replicated.
SAVE_LAYOUT = ((4,), ("data",), {"w": P("data", None), "cols": P(None, "data"), "rng": P("data")})


def put(host: np.ndarray, sharding) -> jax.Array:
    """A global array from host values (each process supplies its own shards)."""
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def state_on(values: dict, mesh_shape, axes, specs, devices=None) -> dict:
    """:func:`sharded_values` as a state: sharded arrays, a typed key array, host leaves."""
    kw = {} if devices is None else {"devices": devices}
    mesh = jax.make_mesh(mesh_shape, axes, **kw)

    def on(name):
        return NamedSharding(mesh, specs.get(name, P()))

    state = {k: put(values[k], on(k)) for k in ("w", "b", "cols", "half")}
    rng = jax.random.wrap_key_data(put(values["rng"], on("rng")))
    return {**state, "rng": rng, "host": values["host"], "step": 3, "lr": 0.1}
