"""jaxnorm.checkpoint: exact resume, refusal of misfits by path, atomic saves, older files.

The training state (tests/_checkpoint_training.py) is a linen MLP with jaxnorm BatchNorm
and dropout, an optax Adam state, the step and a typed PRNG key: everything a resumed
run needs to continue bit for bit. The references are the uninterrupted run, the values
saved, and two files written by jaxnorm 0.1.0 itself (tests/data/checkpoints_0.1).
What is particular to orbax (several processes, asynchronous saves, other meshes,
corrupted data files, a kill mid-save) is in tests/test_checkpoint_orbax.py.
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path
from typing import Any

import chex
import jax
import jax.numpy as jnp
import msgpack
import numpy as np
import optax
import pytest
from _checkpoint_training import (
    MLP,
    SPLIT,
    STEPS,
    TX,
    batches,
    comparable,
    init_state,
    train,
)
from flax import nnx, serialization
from flax.training import train_state

import jaxnorm
import jaxnorm.nnx as jnnx
from jaxnorm import checkpoint as ckpt
from jaxnorm.checkpoint import _orbax

# ------------------------------------------------------------------ exact resume


def test_resume_reproduces_the_uninterrupted_run_exactly(tmp_path):
    straight, losses_straight = train(init_state(0), 0, STEPS)

    first, losses_a = train(init_state(0), 0, SPLIT)
    ckpt.save_checkpoint(tmp_path, first, step=SPLIT)
    del first  # the "killed" run: nothing but the file survives
    fresh = init_state(7)  # a new process builds its state from another seed
    path = ckpt.latest_checkpoint(tmp_path)
    assert ckpt.checkpoint_step(path) == SPLIT
    resumed = ckpt.restore_checkpoint(path, like=fresh)
    assert isinstance(resumed["opt_state"][0], optax.ScaleByAdamState)
    resumed, losses_b = train(resumed, SPLIT, STEPS)

    # Same compiled step, same inputs, same dropout keys: bit-identical.
    assert losses_a + losses_b == losses_straight
    chex.assert_trees_all_equal(comparable(resumed), comparable(straight))
    assert not np.allclose(straight["batch_stats"]["BatchNorm_0"]["mean"], 0.0)


def test_round_trip_keeps_types_dtypes_and_keys(tmp_path):
    state = {
        "stats": jaxnorm.init_batch_stats((3,))._replace(count=jnp.asarray(4, jnp.int32)),
        "half": jnp.arange(4, dtype=jnp.bfloat16),
        "key": jax.random.key(1, impl="rbg"),
        "raw_key": jax.random.PRNGKey(2),
        "step": 12,
        "lr": 0.5,
        "host": np.arange(3, dtype=np.int16),
        "nothing": None,
        "layers": [jnp.ones(2), jnp.zeros((1, 2))],
    }
    path = ckpt.save_checkpoint(tmp_path, state, step=12)
    like = jax.tree.map(
        lambda a: (
            a
            if isinstance(a, jax.Array) and jnp.issubdtype(a.dtype, jax.dtypes.prng_key)
            else np.zeros_like(a)
            if isinstance(a, np.ndarray)
            else a * 0
        ),
        state,
    )
    like["key"] = jax.random.key(9, impl="rbg")
    back = ckpt.restore_checkpoint(path, like)
    assert isinstance(back["stats"], jaxnorm.BatchStats) and int(back["stats"].count) == 4
    assert back["half"].dtype == jnp.bfloat16 and isinstance(back["half"], jax.Array)
    assert jax.random.key_impl(back["key"]) == jax.random.key_impl(state["key"])
    np.testing.assert_array_equal(
        jax.random.key_data(back["key"]), jax.random.key_data(state["key"])
    )
    assert back["step"] == 12 and isinstance(back["step"], int) and back["lr"] == 0.5
    assert isinstance(back["host"], np.ndarray) and back["host"].dtype == np.int16
    assert back["nothing"] is None and isinstance(back["layers"], list)
    chex.assert_trees_all_equal(comparable(back), comparable(state))


def test_restore_keeps_the_sharding_of_the_target(tmp_path):
    if jax.device_count() < 8:
        pytest.skip("needs 8 devices (tests/conftest.py)")
    mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
    w = jax.device_put(jnp.arange(16.0), sharding)
    ckpt.save_checkpoint(tmp_path, {"w": w}, step=0)
    back = ckpt.restore_checkpoint(tmp_path, {"w": jax.device_put(jnp.zeros(16), sharding)})
    assert back["w"].sharding == sharding
    np.testing.assert_array_equal(back["w"], np.arange(16.0))


def test_nnx_model_state_round_trip(tmp_path):
    model = jnnx.BatchNorm(3, momentum=0.5, rngs=nnx.Rngs(0))
    model.train()
    model(jnp.arange(12.0).reshape(4, 3))
    ckpt.save_checkpoint(tmp_path, nnx.to_pure_dict(nnx.state(model)), step=1)
    fresh = jnnx.BatchNorm(3, momentum=0.5, rngs=nnx.Rngs(5))
    state = nnx.state(fresh)
    nnx.replace_by_pure_dict(state, ckpt.restore_checkpoint(tmp_path, nnx.to_pure_dict(state)))
    nnx.update(fresh, state)
    np.testing.assert_array_equal(fresh.mean[...], model.mean[...])
    assert not np.allclose(fresh.mean[...], 0.0)


# ------------------------------------------------------------------ Python scalars vs 0-d arrays

SCALAR_PAIRS = [
    # (id, saved value, like value, expected restored value)
    ("int_from_int32", jnp.asarray(5, jnp.int32), 0, 5),
    ("int_from_uint32", np.asarray(7, np.uint32), 0, 7),
    ("int32_from_int", 5, jnp.zeros((), jnp.int32), np.int32(5)),
    ("int8_from_int", -128, np.zeros((), np.int8), np.int8(-128)),
    ("float_from_float32", jnp.asarray(0.1, jnp.float32), 1.0, float(np.float32(0.1))),
    ("float_from_bfloat16", jnp.asarray(1.5, jnp.bfloat16), 0.0, 1.5),
    ("float32_from_float", 0.1, jnp.zeros((), jnp.float32), np.float32(0.1)),
    ("bfloat16_from_float", 0.1, jnp.zeros((), jnp.bfloat16), np.asarray(0.1, jnp.bfloat16)),
    ("float32_from_inf", float("inf"), jnp.zeros((), jnp.float32), np.float32(np.inf)),
    ("bool_from_bool_array", jnp.asarray(True), False, True),
    ("bool_array_from_bool", True, jnp.zeros((), bool), np.bool_(True)),
    ("complex_from_complex64", np.asarray(1 + 2j, np.complex64), 0j, 1 + 2j),
    ("np_float32_scalar_from_float", 0.5, np.float32(0.0), np.float32(0.5)),
]


@pytest.mark.parametrize(
    "saved, like, want", [c[1:] for c in SCALAR_PAIRS], ids=[c[0] for c in SCALAR_PAIRS]
)
def test_a_python_scalar_and_a_0d_array_of_the_same_kind_restore_into_likes_type(
    tmp_path, saved, like, want
):
    ckpt.save_checkpoint(tmp_path, {"v": saved}, step=1)
    back = ckpt.restore_checkpoint(tmp_path, {"v": like})["v"]
    assert type(back) is type(like), (type(back), type(like))
    if isinstance(like, (jax.Array, np.ndarray, np.generic)):
        assert back.dtype == like.dtype and np.shape(back) == ()
        if isinstance(like, jax.Array):
            assert back.sharding == like.sharding
    np.testing.assert_array_equal(np.asarray(back), np.asarray(want))


SCALAR_REFUSALS = [
    # (id, saved, like, the message after "v: checkpoint has ")
    ("int_vs_float32", jnp.asarray(1.0), 0, "an array () float32, model expects a Python int"),
    ("float_vs_int32", jnp.asarray(1), 0.0, "an array () int32, model expects a Python float"),
    ("bool_vs_int32", jnp.asarray(1), False, "an array () int32, model expects a Python bool"),
    ("int_vs_bool", jnp.asarray(True), 0, "an array () bool, model expects a Python int"),
    ("int_vs_1d", jnp.asarray([1]), 0, "an array (1,) int32, model expects a Python int"),
    (
        "int32_vs_float",
        1.5,
        jnp.zeros((), jnp.int32),
        "a Python float, model expects an array () int32",
    ),
    (
        "int8_overflow",
        128,
        np.zeros((), np.int8),
        "the Python int 128, which the model's array () int8 cannot hold",
    ),
    (
        "uint8_negative",
        -1,
        np.zeros((), np.uint8),
        "the Python int -1, which the model's array () uint8 cannot hold",
    ),
    (
        "float16_overflow",
        1e5,
        np.zeros((), np.float16),
        "the Python float 100000.0, which the model's array () float16 cannot hold",
    ),
    (
        "float32_vs_complex",
        1j,
        jnp.zeros((), jnp.float32),
        "a Python complex, model expects an array () float32",
    ),
]


@pytest.mark.parametrize(
    "saved, like, words", [c[1:] for c in SCALAR_REFUSALS], ids=[c[0] for c in SCALAR_REFUSALS]
)
def test_a_scalar_of_another_kind_or_out_of_range_is_refused(tmp_path, saved, like, words):
    path = ckpt.save_checkpoint(tmp_path, {"v": saved}, step=1)
    with pytest.raises(ValueError, match="nothing was loaded") as info:
        ckpt.restore_checkpoint(path, {"v": like})
    assert f"v: checkpoint has {words}" in str(info.value), str(info.value)


class _TrainState(train_state.TrainState):
    """flax's recommended TrainState with BatchNorm statistics."""

    batch_stats: Any


def _create_train_state(seed: int) -> _TrainState:
    """What a new process runs: ``TrainState.create``, whose ``step`` is the Python int 0."""
    v = MLP().init(jax.random.key(seed), jnp.zeros((2, 8)), train=False)
    return _TrainState.create(
        apply_fn=MLP().apply, params=v["params"], tx=TX, batch_stats=v["batch_stats"]
    )


@jax.jit
def _train_state_step(state: _TrainState, x, y, key):
    def loss_fn(params):
        logits, upd = state.apply_fn(
            {"params": params, "batch_stats": state.batch_stats},
            x,
            train=True,
            rngs={"dropout": key},
            mutable=["batch_stats"],
        )
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), upd

    (loss, upd), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    return state.apply_gradients(grads=grads, batch_stats=upd["batch_stats"]), loss


def _run_train_state(state, start, stop):
    xs, ys = batches()
    losses = []
    for i in range(start, stop):
        state, loss = _train_state_step(state, xs[i], ys[i], jax.random.key(1000 + i))
        losses.append(float(loss))
    return state, losses


def test_readme_resume_recipe_with_a_fresh_flax_train_state(tmp_path):
    """README: build a fresh state of the same model, then ``restore_checkpoint(..., like=)``."""
    straight, losses_straight = _run_train_state(_create_train_state(0), 0, STEPS)
    first, losses_a = _run_train_state(_create_train_state(0), 0, SPLIT)
    assert isinstance(first.step, jax.Array) and first.step.dtype == jnp.int32
    ckpt.save_checkpoint(tmp_path, first, step=int(first.step))

    fresh = _create_train_state(7)
    assert fresh.step == 0 and type(fresh.step) is int
    path = ckpt.latest_checkpoint(tmp_path)
    resumed = ckpt.restore_checkpoint(path, like=fresh)
    assert type(resumed.step) is int and resumed.step == SPLIT
    assert resumed.tx is TX and resumed.apply_fn is not None
    resumed, losses_b = _run_train_state(resumed, SPLIT, STEPS)
    assert losses_a + losses_b == losses_straight
    chex.assert_trees_all_equal(
        (resumed.params, resumed.batch_stats, resumed.opt_state, int(resumed.step)),
        (straight.params, straight.batch_stats, straight.opt_state, int(straight.step)),
    )

    # The other way round: a state saved with a Python int step restores into an array one.
    ckpt.save_checkpoint(tmp_path, _create_train_state(0), step=0)
    back = ckpt.restore_checkpoint(
        ckpt.checkpoint_path(tmp_path, 0), like=first.replace(step=jnp.asarray(9, jnp.int32))
    )
    assert isinstance(back.step, jax.Array) and back.step.dtype == jnp.int32 and back.step == 0


class _NNXNet(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.dense_0 = nnx.Linear(8, 32, rngs=rngs)
        self.bn = jnnx.BatchNorm(32, momentum=0.9, rngs=rngs)
        self.dense_1 = nnx.Linear(32, 10, rngs=rngs)

    def __call__(self, x):
        return self.dense_1(nnx.relu(self.bn(self.dense_0(x))))


@nnx.jit
def _nnx_step(model, optimizer, x, y):
    def loss_fn(model):
        return optax.softmax_cross_entropy_with_integer_labels(model(x), y).mean()

    loss, grads = nnx.value_and_grad(loss_fn)(model)
    optimizer.update(model, grads)
    return loss


def _fresh_nnx(seed: int):
    model = _NNXNet(nnx.Rngs(seed))
    model.train()
    return model, nnx.Optimizer(model, TX, wrt=nnx.Param)


def _run_nnx(model, optimizer, start, stop):
    xs, ys = batches()
    return [float(_nnx_step(model, optimizer, xs[i], ys[i])) for i in range(start, stop)]


def test_readme_resume_recipe_with_a_fresh_nnx_state(tmp_path):
    straight_model, straight_opt = _fresh_nnx(0)
    losses_straight = _run_nnx(straight_model, straight_opt, 0, STEPS)

    model, optimizer = _fresh_nnx(0)
    losses_a = _run_nnx(model, optimizer, 0, SPLIT)
    pure = {
        "model": nnx.to_pure_dict(nnx.state(model)),
        "optimizer": nnx.to_pure_dict(nnx.state(optimizer)),
    }
    ckpt.save_checkpoint(tmp_path, pure, step=SPLIT)
    del model, optimizer

    model, optimizer = _fresh_nnx(7)  # the new process
    states = {"model": nnx.state(model), "optimizer": nnx.state(optimizer)}
    like = {k: nnx.to_pure_dict(v) for k, v in states.items()}
    restored = ckpt.restore_checkpoint(ckpt.latest_checkpoint(tmp_path), like=like)
    for name, target in (("model", model), ("optimizer", optimizer)):
        nnx.replace_by_pure_dict(states[name], restored[name])
        nnx.update(target, states[name])
    assert int(optimizer.step[...]) == SPLIT
    losses_b = _run_nnx(model, optimizer, SPLIT, STEPS)
    assert losses_a + losses_b == losses_straight
    chex.assert_trees_all_equal(
        nnx.to_pure_dict(nnx.state(model)), nnx.to_pure_dict(nnx.state(straight_model))
    )
    assert not np.allclose(model.bn.mean[...], 0.0)


# ------------------------------------------------------------------ refusals


def _saved_state(tmp_path, state=None):
    state = init_state(0) if state is None else state
    return ckpt.save_checkpoint(tmp_path, state, step=3), state


def _with(state, path: str, value):
    """A copy of ``state`` with the leaf at ``a/b/c`` replaced (or deleted if value is ...)."""
    state = jax.tree.map(lambda a: a, state)  # fresh containers
    *parents, last = path.split("/")
    node = state
    for p in parents:
        node = node[int(p)] if isinstance(node, tuple) else node[p]
    if value is Ellipsis:
        del node[last]
    else:
        node[last] = value
    return state


MISFITS = [
    # (id, change to the *model's* state, words the message must contain)
    (
        "kernel_shape",
        lambda s: {**s, "params": init_state(0, hidden=64)["params"]},
        [
            "First mismatch: params/BatchNorm_0/bias: checkpoint has (32,), model expects (64,)",
            "params/Dense_0/kernel: checkpoint has (8, 32), model expects (8, 64)",
        ],
    ),
    (
        "stats_dtype",
        lambda s: _with(s, "batch_stats/BatchNorm_0/mean", jnp.zeros(32, jnp.bfloat16)),
        ["batch_stats/BatchNorm_0/mean: checkpoint has dtype float32, model expects bfloat16"],
    ),
    (
        "missing_in_checkpoint",
        lambda s: _with(s, "batch_stats/BatchNorm_0/count", jnp.zeros((), jnp.int32)),
        ["batch_stats/BatchNorm_0/count: missing from the checkpoint"],
    ),
    (
        "extra_in_checkpoint",
        lambda s: _with(s, "batch_stats/BatchNorm_0/var", ...),
        ["batch_stats/BatchNorm_0/var: in the checkpoint but not in the model"],
    ),
    (
        "leaf_vs_subtree",
        lambda s: _with(s, "params/Dense_1", jnp.zeros(3)),
        ["params/Dense_1: checkpoint has a subtree with keys ['bias', 'kernel']"],
    ),
    (
        "optimizer_changed",
        lambda s: {**s, "opt_state": optax.sgd(0.1, momentum=0.9).init(s["params"])},
        ["opt_state/0/", "mu", "missing from the checkpoint"],
    ),
    (
        "key_impl",
        lambda s: {**s, "rng": jax.random.key(0, impl="rbg")},
        ["rng: checkpoint has a PRNG key (threefry2x32)", "model expects a PRNG key (rbg)"],
    ),
    (
        "key_vs_raw",
        lambda s: {**s, "rng": jax.random.PRNGKey(0)},
        ["rng: checkpoint has a PRNG key", "model expects an array (2,) uint32"],
    ),
    (
        "scalar_of_another_kind",
        lambda s: {**s, "step": 0.0},
        ["step: checkpoint has an array () int32, model expects a Python float"],
    ),
    (
        "one_element_array_vs_scalar",
        lambda s: {**s, "step": jnp.zeros((1,), jnp.int32)},
        ["step: checkpoint has (), model expects (1,)"],
    ),
]


@pytest.mark.parametrize("change, words", [m[1:] for m in MISFITS], ids=[m[0] for m in MISFITS])
def test_a_misfit_is_refused_naming_the_first_mismatching_path(tmp_path, change, words):
    path, state = _saved_state(tmp_path)
    like = change(state)
    with pytest.raises(ValueError, match="nothing was loaded") as info:
        ckpt.restore_checkpoint(path, like)
    for word in words:
        assert word in str(info.value), f"{word!r} missing from: {info.value}"


def test_the_first_mismatch_is_in_sorted_path_order_and_others_are_counted(tmp_path):
    path, state = _saved_state(tmp_path)
    big = init_state(0, hidden=64)
    # Insertion order puts params first; sorted (jax's flattening) order does not.
    like = {"params": big["params"], "batch_stats": big["batch_stats"]}
    like.update({k: v for k, v in state.items() if k not in like})
    with pytest.raises(ValueError) as info:
        ckpt.restore_checkpoint(path, like)
    msg = str(info.value)
    assert "First mismatch: batch_stats/BatchNorm_0/mean: checkpoint has (32,)" in msg
    assert "(6 more: batch_stats/BatchNorm_0/var: checkpoint has (32,), model expects" in msg


@pytest.mark.parametrize("step, keep", [(-1, None), (1.5, None), (True, None), (1, 0)])
def test_bad_step_or_keep_is_refused(tmp_path, step, keep):
    with pytest.raises(ValueError, match="step|keep"):
        ckpt.save_checkpoint(tmp_path, {"w": jnp.ones(1)}, step=step, keep=keep)


# ------------------------------------------------------------------ saving


def test_an_existing_step_is_never_overwritten(tmp_path):
    path = ckpt.save_checkpoint(tmp_path, {"w": jnp.ones(3)}, step=5)
    assert path == ckpt.checkpoint_path(tmp_path, 5) and path.is_dir()
    with pytest.raises(ValueError, match="already exists, and a checkpoint is never overwritten"):
        ckpt.save_checkpoint(tmp_path, {"w": jnp.zeros(3)}, step=5)
    np.testing.assert_array_equal(ckpt.restore_checkpoint(path, {"w": jnp.zeros(3)})["w"], 1.0)


@pytest.mark.parametrize(
    "leaf, words",
    [
        (object(), "layers/0 is a object; a checkpoint holds arrays"),
        (np.array(["a"]), "layers/0 is an array of dtype <U1"),
        (np.array([None]), "layers/0 is an array of dtype object"),
    ],
    ids=["object", "str_array", "object_array"],
)
def test_a_leaf_that_cannot_be_saved_is_refused_by_path(tmp_path, leaf, words):
    with pytest.raises(TypeError, match="save_checkpoint") as info:
        ckpt.save_checkpoint(tmp_path, {"layers": [leaf], "w": jnp.ones(2)}, step=1)
    assert words in str(info.value), str(info.value)
    assert ckpt.latest_checkpoint(tmp_path) is None


# ------------------------------------------------------------------ atomic saves, retention


def test_a_failed_save_never_clobbers_the_last_good_checkpoint(tmp_path, monkeypatch):
    good = ckpt.save_checkpoint(tmp_path, {"w": jnp.ones(1000)}, step=5)

    def die(*args):
        raise OSError("disk full (simulated) while writing the digests")

    monkeypatch.setattr(_orbax, "_write_digests", die)
    with pytest.raises(Exception, match="disk full"):  # raised when the save is waited on
        ckpt.save_checkpoint(tmp_path, {"w": jnp.full(1000, 2.0)}, step=6)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names[0] == good.name and len(names) == 2, names
    assert names[1].startswith("checkpoint_00000006.orbax-checkpoint-tmp"), names  # uncommitted
    assert ckpt.latest_checkpoint(tmp_path) == good
    back = ckpt.restore_checkpoint(tmp_path, {"w": jnp.zeros(1000)})
    np.testing.assert_array_equal(back["w"], np.ones(1000))

    monkeypatch.undo()  # the next save removes the leftover and commits
    ckpt.save_checkpoint(tmp_path, {"w": jnp.full(1000, 2.0)}, step=6)
    assert sorted(p.name for p in tmp_path.iterdir()) == [good.name, "checkpoint_00000006"]
    np.testing.assert_array_equal(
        ckpt.restore_checkpoint(tmp_path, {"w": jnp.zeros(1000)})["w"], 2.0
    )


def test_latest_checkpoint_ignores_temporary_and_foreign_entries_and_keep_prunes(tmp_path):
    assert ckpt.latest_checkpoint(tmp_path / "missing") is None
    assert ckpt.latest_checkpoint(tmp_path) is None
    for step in (2, 10, 7):
        ckpt.save_checkpoint(tmp_path, {"s": step}, step=step)
    (tmp_path / "checkpoint_00000099.orbax-checkpoint-tmp-123").mkdir()  # a killed save
    (tmp_path / "checkpoint_00000098.bak").mkdir()
    (tmp_path / "checkpoint_00000097.msgpack.bak").write_bytes(b"x")
    assert ckpt.latest_checkpoint(tmp_path).name == "checkpoint_00000010"
    assert ckpt.checkpoint_step(tmp_path) == 10
    assert ckpt.restore_checkpoint(tmp_path, {"s": 0}) == {"s": 10}
    ckpt.save_checkpoint(tmp_path, {"s": 11}, step=11, keep=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "checkpoint_00000010",
        "checkpoint_00000011",
        "checkpoint_00000097.msgpack.bak",
        "checkpoint_00000098.bak",
    ]


# ------------------------------------------------------------------ jaxnorm 0.1 .msgpack files

FIXTURES = Path(__file__).parent / "data" / "checkpoints_0.1"


def _fixture_state() -> dict:
    """The state tests/data/checkpoints_0.1/format_{1,2}.msgpack hold, at step 7.

    Written by ``jaxnorm.checkpoint.save_checkpoint(d, _fixture_state(), step=7)`` of
    jaxnorm 0.1.0 at commits 80399fa (format /1) and bf8e3f5 (format /2).
    """
    return {
        "w": jnp.arange(6.0, dtype=jnp.float32).reshape(2, 3),
        "half": jnp.arange(4, dtype=jnp.bfloat16) / 4,
        "stats": jaxnorm.init_batch_stats((3,))._replace(count=jnp.asarray(2, jnp.int32)),
        "rng": jax.random.key(3),
        "host": np.arange(3, dtype=np.int16),
        "lr": 0.25,
        "step": 7,
    }


def _fixture_like() -> dict:
    return {
        "w": jnp.zeros((2, 3)),
        "half": jnp.zeros(4, jnp.bfloat16),
        "stats": jaxnorm.init_batch_stats((3,)),
        "rng": jax.random.key(0),
        "host": np.zeros(3, np.int16),
        "lr": 0.0,
        "step": 0,
    }


def _msgpack_path(directory: Path, step: int) -> Path:
    return directory / f"checkpoint_{step:08d}.msgpack"


def _copy_fixture(name: str, directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = _msgpack_path(directory, 7)
    shutil.copy(FIXTURES / f"{name}.msgpack", path)
    return path


def _assert_fixture_values(back: dict) -> None:
    assert isinstance(back["stats"], jaxnorm.BatchStats)
    assert back["half"].dtype == jnp.bfloat16 and back["host"].dtype == np.int16
    assert type(back["step"]) is int and type(back["lr"]) is float
    chex.assert_trees_all_equal(comparable(back), comparable(_fixture_state()))


def test_a_format_2_file_of_jaxnorm_0_1_still_restores(tmp_path):
    path = _copy_fixture("format_2", tmp_path)
    assert ckpt.latest_checkpoint(tmp_path) == path
    assert ckpt.checkpoint_step(path) == 7
    _assert_fixture_values(ckpt.restore_checkpoint(tmp_path, _fixture_like()))
    # The run goes on in the new format; the newest step of either format is the latest.
    ckpt.save_checkpoint(tmp_path, _fixture_state(), step=6)
    assert ckpt.latest_checkpoint(tmp_path) == path
    newer = ckpt.save_checkpoint(tmp_path, _fixture_state(), step=8, keep=1)
    assert ckpt.latest_checkpoint(tmp_path) == newer
    assert path.exists()  # keep deletes step directories only, never the old files


def test_a_format_1_file_is_refused_with_the_way_to_convert_it(tmp_path):
    path = _copy_fixture("format_1", tmp_path)
    for read in (
        lambda: ckpt.restore_checkpoint(path, _fixture_like()),
        lambda: ckpt.checkpoint_step(path),
    ):
        with pytest.raises(ValueError, match="jaxnorm.checkpoint/1.*checksum") as info:
            read()
        assert f"upgrade_checkpoint({str(path)!r})" in str(info.value)
    upgraded = ckpt.upgrade_checkpoint(tmp_path)
    assert upgraded == ckpt.checkpoint_path(tmp_path, 7) and path.exists()
    assert ckpt.latest_checkpoint(tmp_path) == upgraded  # preferred over the file
    assert ckpt.checkpoint_step(upgraded) == 7
    _assert_fixture_values(ckpt.restore_checkpoint(tmp_path, _fixture_like()))
    assert ckpt.upgrade_checkpoint(path) == upgraded  # done already: no-op
    assert ckpt.upgrade_checkpoint(upgraded) == upgraded


def test_upgrade_converts_a_format_2_file_and_refuses_a_corrupted_one(tmp_path):
    path = _copy_fixture("format_2", tmp_path / "good")
    upgraded = ckpt.upgrade_checkpoint(path)
    _assert_fixture_values(ckpt.restore_checkpoint(upgraded, _fixture_like()))
    bad = _copy_fixture("format_2", tmp_path / "bad")
    flipped = bytearray(bad.read_bytes())
    flipped[-3] ^= 0x01
    bad.write_bytes(bytes(flipped))
    with pytest.raises(ValueError, match="corrupted"):
        ckpt.upgrade_checkpoint(bad)
    assert not ckpt.checkpoint_path(tmp_path / "bad", 7).exists()


def test_every_flipped_byte_of_a_msgpack_file_is_refused_naming_it(tmp_path):
    """The audit's attack on the old format: flip single bytes; none may load wrong values."""
    path = _copy_fixture("format_2", tmp_path)
    data = path.read_bytes()
    want = comparable(_fixture_state())
    refused = loaded = 0
    for i in range(len(data)):
        for mask in (0x01, 0x10, 0x80, 0xFF):  # lowest bit, a middle bit, top bit, all bits
            flipped = bytearray(data)
            flipped[i] ^= mask
            path.write_bytes(bytes(flipped))
            try:
                back = ckpt.restore_checkpoint(path, _fixture_like())
            except ValueError as err:
                assert str(path) in str(err), f"byte {i} ^ {mask:#x}: {err}"
                refused += 1
            else:  # only acceptable if nothing changed (impossible with a checksum)
                chex.assert_trees_all_equal(comparable(back), want)
                loaded += 1
    assert refused + loaded == 4 * len(data) and refused > 0


def test_truncated_and_foreign_msgpack_files_are_refused(tmp_path):
    path = _copy_fixture("format_2", tmp_path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="not a readable checkpoint.*truncated"):
        ckpt.restore_checkpoint(path, _fixture_like())
    path.write_bytes(serialization.msgpack_serialize({"params": {}}))
    with pytest.raises(ValueError, match="not a jaxnorm.checkpoint/2 file"):
        ckpt.restore_checkpoint(path, _fixture_like())
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no checkpoint in directory"):
        ckpt.restore_checkpoint(tmp_path / "empty", _fixture_like())
    with pytest.raises(FileNotFoundError, match="no checkpoint at"):
        ckpt.restore_checkpoint(tmp_path / "missing.msgpack", _fixture_like())


def _file(payload, *, fmt=ckpt.FORMAT_2, digest=None, **extra) -> bytes:
    """A file of the current layout around ``payload`` (bytes, or a tree to serialize)."""
    if not isinstance(payload, bytes):
        payload = msgpack.packb(payload, default=serialization._msgpack_ext_pack)
    digest = hashlib.sha256(payload).digest() if digest is None else digest
    return msgpack.packb({"format": fmt, "sha256": digest, "payload": payload, **extra})


_W = np.zeros(3, np.float32)
_KEY = np.asarray(jax.random.key_data(jax.random.key(0)))
_GOOD_TARGET = {"w": _W, "rng": {"__prng_key__": "threefry2x32", "data": _KEY}}
_RANDOM = np.random.default_rng(0).bytes(300)


def _bad_ndarray(shape, dtype_name, buffer) -> msgpack.ExtType:
    return msgpack.ExtType(1, msgpack.packb((shape, dtype_name, buffer)))


CRAFTED = {
    "empty": b"",
    "random_bytes": _RANDOM,
    "truncated_header": _file({"step": 1, "target": _GOOD_TARGET})[:20],
    "truncated_last_byte": _file({"step": 1, "target": _GOOD_TARGET})[:-1],
    "trailing_garbage": _file({"step": 1, "target": _GOOD_TARGET}) + b"\x00",
    "msgpack_list": msgpack.packb([1, 2, 3]),
    "msgpack_int": msgpack.packb(5),
    "msgpack_str": msgpack.packb(ckpt.FORMAT_2),
    "foreign_dict": msgpack.packb({"params": {}}),
    "format_not_str": msgpack.packb({"format": 2, "sha256": b"", "payload": b""}),
    "int_map_keys": msgpack.packb({1: 2, "format": ckpt.FORMAT_2}),
    "no_checksum": msgpack.packb({"format": ckpt.FORMAT_2, "payload": b"x"}),
    "extra_header_field": _file({"step": 1, "target": _GOOD_TARGET}, note="x"),
    "checksum_as_hex_str": _file(b"\x80", digest=hashlib.sha256(b"\x80").hexdigest()),
    "checksum_too_short": _file(b"\x80", digest=b"\x00" * 31),
    "checksum_wrong": _file(b"\x80", digest=b"\x00" * 32),
    "payload_not_bytes": msgpack.packb(
        {"format": ckpt.FORMAT_2, "sha256": b"\x00" * 32, "payload": "text"}
    ),
    "payload_not_msgpack": _file(b"\xc1"),
    "payload_cut_short": _file(msgpack.packb({"step": 1, "target": {}})[:-1]),
    "payload_a_list": _file([1, "step"]),
    "payload_without_step": _file({"target": _GOOD_TARGET}),
    "payload_extra_field": _file({"step": 1, "target": _GOOD_TARGET, "x": 1}),
    "step_a_str": _file({"step": "1", "target": _GOOD_TARGET}),
    "step_negative": _file({"step": -1, "target": _GOOD_TARGET}),
    "step_a_bool": _file({"step": True, "target": _GOOD_TARGET}),
    "step_a_float": _file({"step": 1.0, "target": _GOOD_TARGET}),
    "target_a_list": _file({"step": 1, "target": [_W]}),
    "target_int_keys": _file({"step": 1, "target": {1: _W, "rng": _GOOD_TARGET["rng"]}}),
    "target_mixed_key_types": _file({"step": 1, "target": {**_GOOD_TARGET, b"w": _W}}),
    "leaf_a_list": _file({"step": 1, "target": {**_GOOD_TARGET, "w": [0.0, 0.0, 0.0]}}),
    "leaf_unknown_ext": _file(
        {"step": 1, "target": {**_GOOD_TARGET, "w": msgpack.ExtType(42, b"x")}}
    ),
    "ndarray_bad_buffer": _file(
        {"step": 1, "target": {**_GOOD_TARGET, "w": _bad_ndarray((3,), b"float32", b"\0" * 5)}}
    ),
    "ndarray_object_dtype": _file(
        {"step": 1, "target": {**_GOOD_TARGET, "w": _bad_ndarray((1,), b"O", b"\0" * 8)}}
    ),
    "ndarray_bad_dtype_name": _file(
        {"step": 1, "target": {**_GOOD_TARGET, "w": _bad_ndarray((1,), b"nope", b"\0" * 8)}}
    ),
    "ndarray_garbage_ext": _file(
        {"step": 1, "target": {**_GOOD_TARGET, "w": msgpack.ExtType(1, b"\xc1")}}
    ),
    "chunked_array_malformed": _file(
        {"step": 1, "target": {**_GOOD_TARGET, "w": {"__msgpack_chunked_array__": True}}}
    ),
    "key_without_data": _file({"step": 1, "target": {"w": _W, "rng": {"__prng_key__": "x"}}}),
    "key_tag_not_str": _file(
        {"step": 1, "target": {"w": _W, "rng": {"__prng_key__": 3, "data": _KEY}}}
    ),
    "key_data_float": _file(
        {
            "step": 1,
            "target": {
                "w": _W,
                "rng": {"__prng_key__": "threefry2x32", "data": _KEY.astype(np.float32)},
            },
        }
    ),
    "key_data_wrong_shape": _file(
        {"step": 1, "target": {"w": _W, "rng": {"__prng_key__": "threefry2x32", "data": _KEY[:1]}}}
    ),
    "key_data_int32": _file(
        {
            "step": 1,
            "target": {
                "w": _W,
                "rng": {"__prng_key__": "threefry2x32", "data": _KEY.astype(np.int32)},
            },
        }
    ),
    "key_data_a_scalar": _file(
        {"step": 1, "target": {"w": _W, "rng": {"__prng_key__": "threefry2x32", "data": 7}}}
    ),
    "leaf_wrong_dtype": _file({"step": 1, "target": {**_GOOD_TARGET, "w": _W.astype(np.int32)}}),
    "leaf_a_str": _file({"step": 1, "target": {**_GOOD_TARGET, "w": "zeros"}}),
    "leaf_a_subtree": _file({"step": 1, "target": {**_GOOD_TARGET, "w": {"a": _W}}}),
}


@pytest.mark.parametrize("name", sorted(CRAFTED))
def test_a_crafted_or_corrupted_file_raises_the_documented_value_error(tmp_path, name):
    path = _msgpack_path(tmp_path, 1)
    path.write_bytes(CRAFTED[name])
    like = {"w": jnp.zeros(3), "rng": jax.random.key(1)}
    with pytest.raises(ValueError) as info:
        ckpt.restore_checkpoint(path, like)
    assert str(path) in str(info.value)
    if name.startswith(("leaf_", "key_data_wrong", "key_data_int32")):
        return  # well-formed files that do not fit `like`: checkpoint_step reads them
    with pytest.raises(ValueError) as info:
        ckpt.checkpoint_step(path)
    assert str(path) in str(info.value)


def test_the_crafting_helper_makes_files_that_restore(tmp_path):
    """Guards the crafted cases above: their only defect is the one each names."""
    path = _msgpack_path(tmp_path, 1)
    path.write_bytes(_file({"step": 1, "target": _GOOD_TARGET}))
    back = ckpt.restore_checkpoint(path, {"w": jnp.ones(3), "rng": jax.random.key(1)})
    np.testing.assert_array_equal(back["w"], _W)
    np.testing.assert_array_equal(jax.random.key_data(back["rng"]), _KEY)
    assert ckpt.checkpoint_step(path) == 1


def test_upgrade_refuses_a_malformed_format_1_file(tmp_path):
    path = _msgpack_path(tmp_path, 1)
    path.write_bytes(serialization.msgpack_serialize({"format": "jaxnorm.checkpoint/1"}))
    with pytest.raises(ValueError, match="not a map of step and target") as info:
        ckpt.upgrade_checkpoint(path)
    assert str(path) in str(info.value)
