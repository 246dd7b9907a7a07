"""jaxnorm.checkpoint on orbax: several processes, other meshes, async saves, kills, corruption.

References: the NumPy values saved (tests/_checkpoint_training.py, ``sharded_values``),
an uninterrupted training run, and what orbax alone reads back from a tampered checkpoint.
The test process has 8 virtual CPU devices (tests/conftest.py); the multi-process test
runs 2 local ``jax.distributed`` processes of 2 devices each (tests/_multiprocess.py).
"""

from __future__ import annotations

import functools
import gc
import hashlib
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _checkpoint_training import (
    SAVE_LAYOUT,
    STEPS,
    comparable,
    init_state,
    put,
    sharded_values,
    state_on,
    train,
)
from _multiprocess import run_processes
from jax.sharding import PartitionSpec as P

from jaxnorm import checkpoint as ckpt
from jaxnorm.checkpoint import _integrity, _orbax

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent

needs_8 = pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 devices (conftest)")


def _assert_state_equals(back: dict, values: dict) -> None:
    for k in ("w", "b", "cols", "half", "host"):
        np.testing.assert_array_equal(np.asarray(back[k]), values[k], err_msg=k)
        assert np.asarray(back[k]).dtype == values[k].dtype, k
    np.testing.assert_array_equal(np.asarray(jax.random.key_data(back["rng"])), values["rng"])
    assert (back["step"], back["lr"]) == (3, 0.1)


# ------------------------------------------------------------------ several processes

_WORKER = textwrap.dedent(
    """
    import os, shutil, sys
    sys.path.insert(0, {tests!r})
    import _multiprocess
    _multiprocess.initialize()

    import jax
    import numpy as np
    from jax.experimental import multihost_utils
    from jax.sharding import NamedSharding, PartitionSpec as P
    import _checkpoint_training as t
    from jaxnorm import checkpoint as ckpt

    ckpt_dir, corrupt_dir = sys.argv[1], sys.argv[2]
    me = jax.process_index()
    assert jax.device_count() == 4 and jax.local_device_count() == 2
    values = t.sharded_values()
    plus_one = dict(values, **{{k: values[k] + 1 for k in ("w", "b", "cols", "half", "host")}})
    ckpt.save_checkpoint(ckpt_dir, t.state_on(values, *t.SAVE_LAYOUT), step=1)
    with ckpt.AsyncCheckpointer(ckpt_dir) as saver:  # each process writes its shards
        saver.save(t.state_on(plus_one, *t.SAVE_LAYOUT), step=2)
    print("saved", me, sorted(os.listdir(ckpt_dir)), flush=True)

    # Restored by both processes onto columns: each saved row block spans both processes.
    zeros = {{k: np.zeros_like(v) for k, v in values.items()}}
    like = t.state_on(zeros, (4,), ("data",), {{"w": P(None, "data")}})
    back = ckpt.restore_checkpoint(ckpt.checkpoint_path(ckpt_dir, 1), like)
    for k in ("w", "b", "cols", "half"):
        assert back[k].sharding == like[k].sharding, k
        for shard in back[k].addressable_shards:
            np.testing.assert_array_equal(np.asarray(shard.data), values[k][shard.index])
    print("restored", me, flush=True)

    # Step 1 with step 2's arrays: orbax reads them; each process checks its part, all refuse.
    if me == 0:
        shutil.copytree(ckpt.checkpoint_path(ckpt_dir, 1), corrupt_dir)
        shutil.rmtree(os.path.join(corrupt_dir, "state"))
        shutil.copytree(os.path.join(ckpt.checkpoint_path(ckpt_dir, 2), "state"),
                        os.path.join(corrupt_dir, "state"))
    multihost_utils.sync_global_devices("corrupted")
    try:
        ckpt.restore_checkpoint(corrupt_dir, like)
    except ValueError as err:
        print("refused", me, err, flush=True)
    """
)


@needs_8
def test_saved_by_two_processes_restores_on_8_devices_and_on_1(tmp_path):
    ckpt_dir, corrupt = tmp_path / "run", tmp_path / "checkpoint_00000001"
    outputs = run_processes(
        _WORKER.format(tests=str(TESTS)),
        num_processes=2,
        devices_per_process=2,
        timeout=90,
        args=(str(ckpt_dir), str(corrupt)),
    )
    for me, out in enumerate(outputs):
        assert f"saved {me} ['checkpoint_00000001', 'checkpoint_00000002']" in out, out
        assert f"restored {me}" in out, out
        assert f"refused {me} restore_checkpoint: {str(corrupt)!r} is corrupted" in out, out
        assert "the SHA-256 of b as read back does not match" in out, out
    item = ckpt.checkpoint_path(ckpt_dir, 1) / "jaxnorm"
    files = sorted(p.name for p in item.glob("*.json"))
    assert files == ["manifest.json", "sha256.process_0.json", "sha256.process_1.json"]
    shards = sorted(p.name for p in (ckpt.checkpoint_path(ckpt_dir, 1) / "state").iterdir())
    assert "ocdbt.process_0" in shards and "ocdbt.process_1" in shards  # each wrote its own

    values = sharded_values()
    plus_one = dict(values, **{k: values[k] + 1 for k in ("w", "b", "cols", "half", "host")})
    zeros = {k: np.zeros_like(v) for k, v in values.items()}
    on_8 = state_on(zeros, (8,), ("data",), {"w": P("data", None), "cols": P(None, "data")})
    back = ckpt.restore_checkpoint(ckpt.checkpoint_path(ckpt_dir, 1), on_8)
    _assert_state_equals(back, values)
    assert back["w"].sharding == on_8["w"].sharding and len(back["w"].sharding.device_set) == 8
    assert back["rng"].sharding == on_8["rng"].sharding

    on_1 = state_on(zeros, (1,), ("data",), {}, devices=jax.devices()[5:6])
    back = ckpt.restore_checkpoint(ckpt_dir, on_1)  # the latest: step 2
    _assert_state_equals(back, plus_one)
    assert back["w"].sharding.device_set == {jax.devices()[5]}
    assert ckpt.checkpoint_step(ckpt_dir) == 2


# ------------------------------------------------------------------ other meshes, one process

TARGETS = {
    # name: (mesh shape, axes, specs) for the restoring `like`
    "same_layout_other_devices": SAVE_LAYOUT,
    "8_devices_rows": ((8,), ("data",), {"w": P("data", None), "rng": P("data")}),
    "8_devices_columns": ((8,), ("data",), {"w": P(None, "data"), "cols": P(None, "data")}),
    "2x4_mesh": ((2, 4), ("x", "y"), {"w": P("x", "y"), "cols": P(None, ("x", "y"))}),
    "replicated": ((8,), ("data",), {}),
    "one_device": ((1,), ("data",), {}),
}


@needs_8
@pytest.mark.parametrize("target", sorted(TARGETS))
def test_restore_onto_another_mesh_or_device_count(tmp_path, target):
    values = sharded_values()
    ckpt.save_checkpoint(
        tmp_path, state_on(values, *SAVE_LAYOUT, devices=jax.devices()[4:]), step=1
    )
    mesh_shape, axes, specs = TARGETS[target]
    like = state_on({k: np.zeros_like(v) for k, v in values.items()}, mesh_shape, axes, specs)
    back = ckpt.restore_checkpoint(tmp_path, like)
    _assert_state_equals(back, values)
    for k in ("w", "b", "cols", "half", "rng"):
        assert back[k].sharding == like[k].sharding, k
    # Into NumPy and Python leaves, from jax arrays.
    host = ckpt.restore_checkpoint(tmp_path, {**like, "w": np.zeros((8, 8), np.float32)})
    assert isinstance(host["w"], np.ndarray)
    np.testing.assert_array_equal(host["w"], values["w"])


# ------------------------------------------------------------------ asynchronous saves


def test_an_async_save_returns_before_its_commit_and_restores_what_was_saved(tmp_path, monkeypatch):
    started, release = threading.Event(), threading.Event()
    write = _orbax._write_digests

    def held(*args):  # the background part of the save, held until the test releases it
        started.set()
        if not release.wait(120):
            raise TimeoutError("the test never released the save")
        write(*args)

    monkeypatch.setattr(_orbax, "_write_digests", held)
    cached = {id(x) for x in jax.tree.leaves(init_state(0))}
    state, _ = train(init_state(0), 0, 2)
    saved = comparable(state)
    with ckpt.AsyncCheckpointer(tmp_path) as saver:
        path = saver.save(state, step=2)  # returns while its background part is held
        assert started.wait(120)
        assert not path.exists() and ckpt.latest_checkpoint(tmp_path) is None  # not committed
        later, _ = train(state, 2, STEPS)  # training goes on meanwhile
        for leaf in jax.tree.leaves(state):  # and the saved device arrays may go
            if id(leaf) not in cached:
                leaf.delete()
        release.set()
        saver.wait_until_finished()
        assert path.is_dir() and ckpt.latest_checkpoint(tmp_path) == path
        saver.save(later, step=STEPS)
    assert ckpt.checkpoint_step(tmp_path) == STEPS  # close() waited for the second save
    back = ckpt.restore_checkpoint(path, like=init_state(7))
    chex.assert_trees_all_equal(comparable(back), saved)
    chex.assert_trees_all_equal(
        comparable(ckpt.restore_checkpoint(tmp_path, like=init_state(7))), comparable(later)
    )


def test_a_second_checkpointer_on_the_directory_waits_for_the_saves_of_the_first(
    tmp_path, monkeypatch
):
    """Orbax's start-up deletes unfinished temporary directories: not those of a live save."""
    release = threading.Event()
    write = _orbax._write_digests

    def held(*args):
        if not release.wait(120):
            raise TimeoutError("the test never released the save")
        write(*args)

    monkeypatch.setattr(_orbax, "_write_digests", held)
    with ckpt.AsyncCheckpointer(tmp_path) as saver:
        first = saver.save({"w": jnp.ones(3)}, step=1)
        timer = threading.Timer(1.0, release.set)  # released while save_checkpoint waits
        timer.start()
        second = ckpt.save_checkpoint(tmp_path, {"w": jnp.full(3, 2.0)}, step=2)
        timer.join()
    for path, value in ((first, 1.0), (second, 2.0)):
        back = ckpt.restore_checkpoint(path, {"w": jnp.zeros(3)})
        np.testing.assert_array_equal(back["w"], np.full(3, value))


# ------------------------------------------------------------------ a kill mid-save

KILL = 5  # the process is killed while the save of this step is being written

_KILLED_RUN = textwrap.dedent(
    """
    import os, signal, sys
    sys.path.insert(0, {tests!r})
    import _checkpoint_training as t
    from jaxnorm import checkpoint as ckpt
    from jaxnorm.checkpoint import _integrity, _orbax

    ckpt_dir, kill = sys.argv[1], int(sys.argv[2])
    write = _orbax._write_digests

    def write_or_die(directory, *args):
        if f"checkpoint_{{kill:08d}}" in str(directory):  # mid-save, in its background thread
            os.kill(os.getpid(), signal.SIGKILL)
        write(directory, *args)

    _orbax._write_digests = write_or_die
    saver = ckpt.AsyncCheckpointer(ckpt_dir)
    t.train(t.init_state(0), 0, t.STEPS, on_step=lambda state, step: saver.save(state, step=step))
    saver.close()
    sys.exit("not killed")
    """
)


def test_a_run_killed_mid_save_resumes_bit_identically(tmp_path):
    script = tmp_path / "killed_run.py"
    script.write_text(_KILLED_RUN.format(tests=str(TESTS)))
    run = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, str(script), str(run), str(KILL)],
        env=dict(os.environ, JAX_PLATFORMS="cpu"),
        cwd=ROOT,
        timeout=120,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stdout + proc.stderr
    names = sorted(p.name for p in run.iterdir())
    committed = [f"checkpoint_{s:08d}" for s in range(1, KILL)]
    assert names[: KILL - 1] == committed, names
    assert [n for n in names[KILL - 1 :] if not n.startswith(f"checkpoint_{KILL:08d}.")] == []
    assert len(names) == KILL, names  # the killed save's temporary directory
    assert ckpt.latest_checkpoint(run) == ckpt.checkpoint_path(run, KILL - 1)

    straight, losses = train(init_state(0), 0, STEPS)
    resumed = ckpt.restore_checkpoint(run, like=init_state(7))
    assert int(resumed["step"]) == KILL - 1
    resumed, losses_b = train(resumed, KILL - 1, STEPS)
    assert losses_b == losses[KILL - 1 :]
    chex.assert_trees_all_equal(comparable(resumed), comparable(straight))
    ckpt.save_checkpoint(run, resumed, step=STEPS)  # the leftover goes
    assert sorted(p.name for p in run.iterdir()) == committed + [f"checkpoint_{STEPS:08d}"]


# ------------------------------------------------------------------ corrupted checkpoints


def _small_state() -> dict:
    return state_on(sharded_values(), *SAVE_LAYOUT, devices=jax.devices()[:4])


def test_digests_in_threads_are_hashlibs():
    """Above 16 MiB the shards are hashed in threads; the digests must not change."""
    rng = np.random.default_rng(0)
    hosts = [rng.standard_normal((1024, 1024)).astype(np.float32) for _ in range(5)]
    hosts.append(np.asarray(hosts[0][::2], dtype=jnp.bfloat16))  # not contiguous, bf16
    want = [hashlib.sha256(np.ascontiguousarray(h).tobytes()).hexdigest() for h in hosts]
    assert _integrity.sha256_all(hosts) == want


def _orbax_alone(path: Path, count: int) -> list[np.ndarray]:
    """The arrays as orbax-checkpoint reads them, without jaxnorm's checks."""
    args = {str(i): _orbax.ocp.RestoreArgs(restore_type=np.ndarray) for i in range(count)}
    return list(_orbax._load_arrays(path / "state", args).values())


# Orbax abandons its read coroutines when a file is bad; Python reports them when collected.
def quiet_orbax(test):
    @functools.wraps(test)
    def collected(*args, **kwargs):
        try:
            return test(*args, **kwargs)
        finally:
            gc.collect()  # report them here, not in a later test

    unraisable = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
    unawaited = pytest.mark.filterwarnings("ignore:coroutine .* was never awaited:RuntimeWarning")
    return unraisable(unawaited(collected))


@needs_8
@quiet_orbax
def test_a_flipped_byte_in_any_file_is_refused_or_changes_nothing(tmp_path):
    """Flip bytes in every file; with a leaf big enough that orbax stores it out of line."""
    values = sharded_values()
    big = (np.arange(64 * 64, dtype=np.float32).reshape(64, 64) * 0.37) % 5
    state = _small_state()
    state["big"] = put(big, state["w"].sharding)
    path = ckpt.save_checkpoint(tmp_path, state, step=1)
    like = state_on({k: np.zeros_like(v) for k, v in values.items()}, (8,), ("data",), {})
    like["big"] = put(np.zeros_like(big), like["w"].sharding)
    caught_by_digest = []
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        data = file.read_bytes()
        for i in sorted({0, len(data) // 3, len(data) // 2, len(data) - 1} if data else ()):
            flipped = bytearray(data)
            flipped[i] ^= 0x01 if i % 2 else 0xFF
            file.write_bytes(bytes(flipped))
            try:
                back = ckpt.restore_checkpoint(path, like)
            except ValueError as err:
                assert str(path) in str(err) and "nothing was loaded" in str(err), str(err)
                if "the SHA-256 of big as read back does not match" in str(err):
                    args = {
                        str(i): _orbax.ocp.RestoreArgs(restore_type=np.ndarray) for i in range(7)
                    }
                    by_orbax = _orbax._load_arrays(path / "state", args)  # no error, wrong values
                    caught_by_digest.append(
                        not any(np.array_equal(a, big) for a in by_orbax.values())
                    )
            else:
                _assert_state_equals(back, values)
                np.testing.assert_array_equal(back["big"], big)
            finally:
                file.write_bytes(data)
    assert caught_by_digest and all(caught_by_digest), caught_by_digest


@needs_8
@quiet_orbax
def test_arrays_of_another_save_are_caught_by_the_digests(tmp_path):
    """Orbax alone would load them; the SHA-256 check refuses, naming the first path."""
    values = sharded_values()
    good = ckpt.save_checkpoint(tmp_path / "a", _small_state(), step=1)
    other = dict(values, w=values["w"] * 2)
    ckpt.save_checkpoint(tmp_path / "b", state_on(other, *SAVE_LAYOUT), step=1)
    shutil.rmtree(good / "state")
    shutil.copytree(ckpt.checkpoint_path(tmp_path / "b", 1) / "state", good / "state")
    like = state_on({k: np.zeros_like(v) for k, v in values.items()}, *SAVE_LAYOUT)
    assert any(np.array_equal(a, other["w"]) for a in _orbax_alone(good, 6))  # no error
    with pytest.raises(ValueError, match="the SHA-256 of w as read back does not match") as info:
        ckpt.restore_checkpoint(good, like)
    assert str(good) in str(info.value)


def _edit_json(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text, (old, text[:300])
    path.write_text(text.replace(old, new, 1))


TAMPERING = {
    # name: (edit of the step directory, words of the message)
    "digest_file_missing": (
        lambda d: (d / "jaxnorm" / "sha256.process_0.json").unlink(),
        "sha256.process_0.json is missing",
    ),
    "manifest_missing": (
        lambda d: (d / "jaxnorm" / "manifest.json").unlink(),
        "manifest.json is missing",
    ),
    "scalar_edited": (
        lambda d: _edit_json(d / "jaxnorm" / "manifest.json", '"0x1.999999999999ap-4"', '"0x1p-4"'),
        "the SHA-256 of manifest.json does not match",
    ),
    "digest_edited": (
        lambda d: _edit_json(d / "jaxnorm" / "sha256.process_0.json", '"sha256":"', '"sha256":"0'),
        "sha256.process_0.json",
    ),
    "manifest_cut_short": (
        lambda d: (d / "jaxnorm" / "manifest.json").write_text('{"format": "jaxnorm.checkpoint/3"'),
        "manifest.json is not JSON",
    ),
    "array_index_missing": (
        lambda d: shutil.rmtree(d / "state"),
        "orbax-checkpoint could not read state/",
    ),
    "plain_orbax_checkpoint": (
        lambda d: shutil.rmtree(d / "jaxnorm"),
        "has no jaxnorm/ item, so it is not a jaxnorm.checkpoint/3 checkpoint",
    ),
}


@needs_8
@quiet_orbax
@pytest.mark.parametrize("name", sorted(TAMPERING))
def test_a_tampered_checkpoint_is_refused_by_name(tmp_path, name):
    values = sharded_values()
    path = ckpt.save_checkpoint(tmp_path, _small_state(), step=1)
    edit, words = TAMPERING[name]
    edit(path)
    like = state_on({k: np.zeros_like(v) for k, v in values.items()}, *SAVE_LAYOUT)
    with pytest.raises(ValueError, match="nothing was loaded") as info:
        ckpt.restore_checkpoint(path, like)
    assert str(path) in str(info.value) and words in str(info.value), str(info.value)
