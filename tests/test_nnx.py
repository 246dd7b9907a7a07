"""jaxnorm.nnx against flax.nnx and against jaxnorm.linen: signatures, state, numbers, modes.

Values are copied across (flax's module gets random parameters and statistics, which
are copied into ours), both modules run inside one jitted program, and outputs and
updated statistics must agree to 1e-5 on well-conditioned data (mean ~0, std ~1).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from flax.nnx.nn import dtypes as flax_dtypes

import jaxnorm.linen as jnn
import jaxnorm.nnx as jnnx

TOL = dict(atol=1e-5, rtol=1e-5)  # float32 agreement on N(0, 1) data
BF16_TOL = dict(atol=3e-2, rtol=3e-2)  # a bf16 rounding of O(1) outputs

PAIRS = [
    (jnnx.BatchNorm, nnx.BatchNorm),
    (jnnx.LayerNorm, nnx.LayerNorm),
    (jnnx.RMSNorm, nnx.RMSNorm),
    (jnnx.GroupNorm, nnx.GroupNorm),
    (jnnx.InstanceNorm, nnx.InstanceNorm),
]


def _normal(seed: int, shape, dtype=jnp.float32) -> jax.Array:
    """N(0, 1) data from NumPy (eager jax.random would compile once per shape)."""
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), dtype)


def _mask(seed: int, shape, p: float = 0.7) -> jax.Array:
    return jnp.asarray(np.random.default_rng(seed).random(shape) < p)


def _randomize(module: nnx.Module, seed: int = 7) -> None:
    """Random scale/bias/mean/var, so a swap or an ignored variable shows in the outputs."""
    rng = np.random.default_rng(seed)
    for name in ("scale", "bias", "mean", "var"):
        var = getattr(module, name, None)
        if var is None:
            continue
        noise = rng.standard_normal(var.shape)
        value = {
            "scale": 1.0 + 0.2 * noise,
            "var": 1.0 + 0.3 * np.abs(noise),
            "bias": 0.2 * noise,
            "mean": 0.2 * noise,
        }[name]
        var[...] = jnp.asarray(value, var.dtype)


def _twin(ours_cls: type, theirs: nnx.Module, *args, **kw) -> nnx.Module:
    """Our module with the same constructor arguments and a copy of ``theirs``' values."""
    ours = ours_cls(*args, rngs=nnx.Rngs(1), **kw)
    nnx.update(ours, nnx.clone(nnx.state(theirs)))
    return ours


def _pair(ours_cls: type, theirs_cls: type, *args, **kw) -> tuple[nnx.Module, nnx.Module]:
    theirs = theirs_cls(*args, rngs=nnx.Rngs(0), **kw)
    _randomize(theirs)
    return _twin(ours_cls, theirs, *args, **kw), theirs


def _run_both(fn: Callable, ours: nnx.Module, theirs: nnx.Module, *args):
    """``(fn(ours, *args), fn(theirs, *args))`` in one ``nnx.jit`` program (state updates kept)."""
    return nnx.jit(lambda a, b, *args: (fn(a, *args), fn(b, *args)))(ours, theirs, *args)


def _stats(module: nnx.Module) -> dict[str, jax.Array]:
    return {"mean": module.mean[...], "var": module.var[...]}


# ---------------------------------------------------------------------------- API


@pytest.mark.parametrize("ours, theirs", PAIRS, ids=lambda c: c.__name__)
def test_constructor_and_call_signatures_match_flax(ours, theirs):
    mine = inspect.signature(ours.__init__).parameters
    key = jax.random.key(0)
    for name, p in inspect.signature(theirs.__init__).parameters.items():
        assert name in mine, f"{ours.__name__} lacks flax argument {name}"
        assert mine[name].kind == p.kind, name
        if name.endswith("_init"):  # initializers: compare what they produce
            a = mine[name].default(key, (3,), jnp.float32)
            b = p.default(key, (3,), jnp.float32)
            np.testing.assert_array_equal(a, b)
        elif name == "use_running_average":
            assert (mine[name].default, p.default) == (None, False)  # the mode decision
        else:
            assert mine[name].default == p.default, name
    assert inspect.signature(ours.__call__).parameters.keys() == (
        inspect.signature(theirs.__call__).parameters.keys()
    )


@pytest.mark.parametrize(
    "ours, theirs, args",
    [(a, b, (6,)) for a, b in PAIRS[:3] + PAIRS[4:]] + [(*PAIRS[3], (6, 3))],
    ids=lambda c: getattr(c, "__name__", ""),
)
def test_state_tree_matches_flax(ours, theirs, args):
    chex.assert_trees_all_equal_shapes_and_dtypes(
        nnx.state(ours(*args, rngs=nnx.Rngs(0))), nnx.state(theirs(*args, rngs=nnx.Rngs(0)))
    )


# --------------------------------------------------------------------- BatchNorm


@pytest.mark.parametrize(
    "shape, axis, masked, dtype",
    [
        pytest.param((6, 4, 4, 3), -1, False, jnp.float32, id="NHWC"),
        pytest.param((6, 4, 4, 3), -1, True, jnp.float32, id="NHWC-mask"),
        pytest.param((6, 3, 4, 4), 1, False, jnp.float32, id="NCHW-axis1"),
        pytest.param((16, 5), -1, False, jnp.bfloat16, id="NC-bf16"),
    ],
)
def test_batch_norm_agrees_with_flax_nnx(shape, axis, masked, dtype):
    x = _normal(0, shape, dtype)
    mask = _mask(1, shape) if masked else None
    c = shape[axis]
    ours, theirs = _pair(jnnx.BatchNorm, nnx.BatchNorm, c, axis=axis, momentum=0.9)

    def train_then_eval(m, x):
        return m(x, use_running_average=False, mask=mask), m(x, use_running_average=True)

    got, want = _run_both(train_then_eval, ours, theirs, x)
    assert got[0].dtype == dtype  # flax promotes bf16 to f32; we keep the input's dtype
    tol = TOL if dtype == jnp.float32 else BF16_TOL
    chex.assert_trees_all_close(
        jax.tree.map(lambda a: a.astype(jnp.float32), got),
        jax.tree.map(lambda a: a.astype(jnp.float32), want),
        **tol,
    )
    chex.assert_trees_all_close(_stats(ours), _stats(theirs), **TOL)


def test_batch_norm_one_value_per_feature_in_training_follows_flax_nnx():
    """(1, C) in training: y = bias and the statistics are updated, as flax."""
    x = _normal(13, (1, 6)) * 3 + 1
    ours, theirs = _pair(jnnx.BatchNorm, nnx.BatchNorm, 6, momentum=0.8)
    got, want = _run_both(lambda m, x: m(x, use_running_average=False), ours, theirs, x)
    chex.assert_trees_all_close(got, want, **TOL)
    chex.assert_trees_all_close(_stats(ours), _stats(theirs), **TOL)


def _complex_normal(seed: int, shape) -> jax.Array:
    rng = np.random.default_rng(seed)
    z = rng.standard_normal(shape) + 1j * rng.standard_normal(shape) + (2.0 + 1.0j)
    return jnp.asarray(z, jnp.complex64)


@pytest.mark.parametrize(
    "ours, theirs", [(jnnx.LayerNorm, nnx.LayerNorm), (jnnx.RMSNorm, nnx.RMSNorm)]
)
def test_layer_and_rms_norm_complex_input_agree_with_flax_nnx(ours, theirs):
    ours, theirs = _pair(ours, theirs, 6)
    got, want = _run_both(lambda m, x: m(x), ours, theirs, _complex_normal(14, (4, 3, 6)))
    assert got.dtype == jnp.complex64
    chex.assert_trees_all_close(got, want, **TOL)


@pytest.mark.filterwarnings("ignore:scatter inputs have incompatible types")  # flax.nnx's
@pytest.mark.filterwarnings("ignore:Casting complex values to real")  # truncation, see below
def test_batch_norm_complex_input_agrees_with_flax():
    """Training: output and variance as flax.nnx. The running mean becomes complex, as
    flax.linen's update makes it (flax.nnx writes it into its float32 array, dropping
    the imaginary part with a ComplexWarning), so evaluation then matches flax.linen."""
    x = _complex_normal(15, (12, 3))
    ours, theirs = _pair(jnnx.BatchNorm, nnx.BatchNorm, 3, momentum=0.8)
    stats = _stats(theirs)
    y, y_ref = _run_both(lambda m, x: m(x, use_running_average=False), ours, theirs, x)
    chex.assert_trees_all_close(y, y_ref, **TOL)
    chex.assert_trees_all_close(ours.var[...], theirs.var[...], **TOL)
    assert ours.scale[...].dtype == jnp.float32  # params stay real
    lin = nn.BatchNorm(momentum=0.8)
    v = {"params": {"scale": ours.scale[...], "bias": ours.bias[...]}, "batch_stats": stats}
    y_lin, upd = lin.apply(v, x, use_running_average=False, mutable=["batch_stats"])
    assert ours.mean[...].dtype == upd["batch_stats"]["mean"].dtype == jnp.complex64
    chex.assert_trees_all_close(_stats(ours), upd["batch_stats"], **TOL)
    y_eval = nnx.jit(lambda m, x: m(x, use_running_average=True))(ours, x)
    want_eval = lin.apply({**v, **upd}, x, use_running_average=True)
    chex.assert_trees_all_close(y_eval, want_eval, **TOL)


def test_batch_norm_agrees_with_jaxnorm_linen():
    """Same numbers as the linen module on the same values, over two steps and an eval."""
    x = _normal(2, (8, 5))
    bn = jnnx.BatchNorm(5, momentum=None, unbiased_running_var=True, rngs=nnx.Rngs(0))
    _randomize(bn)
    lin = jnn.BatchNorm(momentum=None, unbiased_running_var=True)
    v = {
        "params": {"scale": bn.scale[...], "bias": bn.bias[...]},
        "batch_stats": {**_stats(bn), "count": bn.count[...]},
    }

    def linen_steps(v, x):
        y1, upd = lin.apply(v, x, use_running_average=False, mutable=["batch_stats"])
        v = {**v, **upd}
        y2, upd = lin.apply(v, 2 * x + 1, use_running_average=False, mutable=["batch_stats"])
        v = {**v, **upd}
        return (y1, y2, lin.apply(v, x, use_running_average=True)), v["batch_stats"]

    def nnx_steps(m, x):
        return m(x, False), m(2 * x + 1, False), m(x, True)

    want, want_stats = jax.jit(linen_steps)(v, x)
    got = nnx.jit(nnx_steps)(bn, x)
    chex.assert_trees_all_close(got, want, **TOL)
    chex.assert_trees_all_close({**_stats(bn), "count": bn.count[...]}, want_stats, **TOL)
    assert int(bn.count[...]) == 2


@pytest.mark.parametrize(
    "kw, has_count",
    [({}, False), ({"track_count": True}, True), ({"momentum": None}, True)],
)
def test_count_state_exists_only_when_needed(kw, has_count):
    bn = jnnx.BatchNorm(3, rngs=nnx.Rngs(0), **kw)
    assert ("count" in nnx.state(bn, nnx.BatchStat)) == has_count


# ------------------------------------------------------------------------- modes


def test_mode_not_set_raises_and_names_train_and_eval():
    bn = jnnx.BatchNorm(3, rngs=nnx.Rngs(0))
    assert bn.use_running_average is None
    with pytest.raises(ValueError, match=r"model\.train\(\).*model\.eval\(\)"):
        bn(_normal(3, (4, 3)))


def test_train_eval_view_and_call_argument_set_the_mode():
    class Net(nnx.Module):
        def __init__(self, rngs: nnx.Rngs):
            self.dense = nnx.Linear(2, 3, rngs=rngs)
            self.bn = jnnx.BatchNorm(3, momentum=0.5, rngs=rngs)
            self.drop = nnx.Dropout(0.5, rngs=rngs)

        def __call__(self, x):
            return self.drop(self.bn(self.dense(x)))

    net = Net(nnx.Rngs(0))
    x = _normal(4, (8, 2))
    forward = nnx.jit(lambda net, x: net(x))  # mode attributes are static: one trace per mode
    fresh = _stats(net.bn)
    net.eval()
    assert net.bn.use_running_average is True and net.drop.deterministic is True
    forward(net, x)
    chex.assert_trees_all_equal(_stats(net.bn), fresh)  # eval: statistics untouched
    net.train()
    assert net.bn.use_running_average is False and net.drop.deterministic is False
    forward(net, x)
    trained = _stats(net.bn)
    assert not np.allclose(trained["mean"], fresh["mean"])
    nnx.jit(lambda bn, x: bn(x, use_running_average=True))(net.bn, x @ np.ones((2, 3)))
    chex.assert_trees_all_equal(_stats(net.bn), trained)
    view = nnx.view(net, use_running_average=True, deterministic=True)
    assert view.bn.use_running_average is True and net.bn.use_running_average is False


# ----------------------------------------------------------------- other layers


@pytest.mark.parametrize(
    "ours_cls, theirs_cls, args, kw, shape",
    [
        pytest.param(jnnx.LayerNorm, nnx.LayerNorm, (6,), {}, (3, 4, 6), id="LN"),
        pytest.param(
            jnnx.LayerNorm, nnx.LayerNorm, (6,), dict(reduction_axes=(-2, -1)), (3, 4, 6),
            id="LN-red(-2,-1)",
        ),
        pytest.param(
            jnnx.LayerNorm, nnx.LayerNorm, (24,),
            dict(reduction_axes=(-2, -1), feature_axes=(-2, -1)), (3, 4, 6), id="LN-feat(-2,-1)",
        ),
        pytest.param(jnnx.RMSNorm, nnx.RMSNorm, (6,), {}, (3, 4, 6), id="RMS"),
        pytest.param(jnnx.GroupNorm, nnx.GroupNorm, (6, 3), {}, (3, 4, 4, 6), id="GN-G3"),
        pytest.param(
            jnnx.GroupNorm, nnx.GroupNorm, (6, None, 1), {}, (3, 4, 4, 6), id="GN-size1"
        ),
        pytest.param(jnnx.InstanceNorm, nnx.InstanceNorm, (6,), {}, (3, 4, 4, 6), id="IN"),
        pytest.param(
            jnnx.InstanceNorm, nnx.InstanceNorm, (4,), dict(feature_axes=1), (3, 4, 5, 6),
            id="IN-axis1",
        ),
    ],
)  # fmt: skip
def test_layers_agree_with_flax_nnx(ours_cls, theirs_cls, args, kw, shape):
    x = _normal(5, shape)
    mask = _mask(6, shape, 0.8)
    ours, theirs = _pair(ours_cls, theirs_cls, *args, **kw)
    got, want = _run_both(lambda m, x: (m(x), m(x, mask=mask)), ours, theirs, x)
    chex.assert_trees_all_close(got, want, **TOL)


@pytest.mark.parametrize(
    "nnx_module, linen_module",
    [
        (jnnx.LayerNorm(20, reduction_axes=(-2, -1), feature_axes=(-2, -1), rngs=nnx.Rngs(0)),
         jnn.LayerNorm(reduction_axes=(-2, -1), feature_axes=(-2, -1))),
        (jnnx.RMSNorm(4, rngs=nnx.Rngs(0)), jnn.RMSNorm()),
        (jnnx.GroupNorm(4, num_groups=2, rngs=nnx.Rngs(0)), jnn.GroupNorm(num_groups=2)),
        (jnnx.InstanceNorm(5, feature_axes=1, rngs=nnx.Rngs(0)),
         jnn.InstanceNorm(feature_axes=1)),
        (jnnx.InstanceNorm(20, feature_axes=(1, 2), rngs=nnx.Rngs(0)),
         jnn.InstanceNorm(feature_axes=(1, 2))),
    ],
    ids=["LN-feat(-2,-1)", "RMS", "GN", "IN-feat1", "IN-feat(1,2)"],
)  # fmt: skip
def test_layers_agree_with_jaxnorm_linen(nnx_module, linen_module):
    """Flat (num_features,) NNX params equal linen's feature-shaped ones, reshaped."""
    x = _normal(7, (3, 5, 4, 2) if isinstance(nnx_module, jnnx.InstanceNorm) else (3, 5, 4))
    _randomize(nnx_module)
    tree = jax.eval_shape(lambda x: linen_module.init(jax.random.key(0), x), x)
    params = {
        name: jnp.reshape(getattr(nnx_module, name)[...], leaf.shape)
        for name, leaf in tree["params"].items()
    }
    want = jax.jit(lambda p, x: linen_module.apply({"params": p}, x))(params, x)
    got = nnx.jit(lambda m, x: m(x))(nnx_module, x)
    chex.assert_trees_all_close(got, want, **TOL)


@pytest.mark.parametrize(
    "cls, args", [(c, (4,) if c is not jnnx.GroupNorm else (4, 2)) for c, _ in PAIRS]
)
def test_output_dtype_is_dtype_or_input_dtype(cls, args):
    x = _normal(8, (3, 2, 4), jnp.bfloat16)
    mode = {"use_running_average": False} if cls is jnnx.BatchNorm else {}
    default = cls(*args, rngs=nnx.Rngs(0), **mode)
    f32 = cls(*args, dtype=jnp.float32, rngs=nnx.Rngs(0), **mode)
    y_default, y_f32 = nnx.jit(lambda a, b, x: (a(x), b(x)))(default, f32, x)
    assert (y_default.dtype, y_f32.dtype) == (jnp.bfloat16, jnp.float32)


# ----------------------------------------------------------------- promote_dtype


def _recorder(calls: list):
    """A promote_dtype that records what it is given (shapes, dtypes, dtype=) and then
    does what flax's default does."""

    def promote(args, /, *, dtype=None, inexact=True):
        calls.append(
            (tuple(None if a is None else (a.shape, a.dtype) for a in args), dtype, inexact)
        )
        return flax_dtypes.promote_dtype(args, dtype=dtype, inexact=inexact)

    return promote


@pytest.mark.parametrize("dtype", [None, jnp.bfloat16])
@pytest.mark.parametrize(
    "ours, theirs, args, kw",
    [
        (jnnx.BatchNorm, nnx.BatchNorm, (6,), dict(use_running_average=False)),
        (jnnx.BatchNorm, nnx.BatchNorm, (6,), dict(use_running_average=True, use_bias=False)),
        (jnnx.LayerNorm, nnx.LayerNorm, (6,), {}),
        (jnnx.RMSNorm, nnx.RMSNorm, (6,), {}),
        (jnnx.GroupNorm, nnx.GroupNorm, (6, 3), {}),
        (jnnx.InstanceNorm, nnx.InstanceNorm, (6,), dict(use_scale=False)),
    ],
    ids=["BN-train", "BN-eval-no-bias", "LN", "RMS", "GN", "IN-no-scale"],
)
def test_promote_dtype_is_called_as_flax_calls_it(ours, theirs, args, kw, dtype):
    """Same tuple (input, statistics, parameters; None where absent) and dtype= as flax."""
    x = _normal(11, (4, 5, 6))
    got, want = [], []
    ours(*args, promote_dtype=_recorder(got), dtype=dtype, rngs=nnx.Rngs(0), **kw)(x)
    theirs(*args, promote_dtype=_recorder(want), dtype=dtype, rngs=nnx.Rngs(0), **kw)(x)
    assert got == want and len(got) == 1


def _to_bf16(args, /, *, dtype=None, inexact=True):
    """A custom promotion: everything to bfloat16 (e.g. to run a layer in bf16)."""
    del dtype, inexact
    return tuple(None if a is None else jnp.asarray(a, jnp.bfloat16) for a in args)


def _f64(a) -> np.ndarray:
    return np.asarray(jnp.asarray(a, jnp.float32), np.float64)


@pytest.mark.parametrize("kind", ["BatchNorm", "LayerNorm", "RMSNorm"])
def test_the_layer_normalizes_what_promote_dtype_returns(kind):
    """A custom promote_dtype's output is what gets normalized: the result equals float64
    NumPy on the bf16-rounded input and parameters, not on the f32 ones."""
    x = _normal(12, (16, 6)) * 3 + 1
    layer = getattr(jnnx, kind)(6, promote_dtype=_to_bf16, rngs=nnx.Rngs(0))
    _randomize(layer)
    y = layer(x, use_running_average=False) if kind == "BatchNorm" else layer(x)
    assert y.dtype == jnp.float32  # the output dtype rule: dtype or x.dtype

    def reference(x, scale, bias):
        if kind == "RMSNorm":
            return x / np.sqrt((x**2).mean(-1, keepdims=True) + 1e-6) * scale
        axis, eps = (0, 1e-5) if kind == "BatchNorm" else (-1, 1e-6)
        mu, var = x.mean(axis, keepdims=True), x.var(axis, keepdims=True)
        return (x - mu) / np.sqrt(var + eps) * scale + bias

    bias = getattr(layer, "bias", None)
    params = [layer.scale[...], 0.0 if bias is None else bias[...]]
    rounded = reference(*(_f64(jnp.asarray(a, jnp.bfloat16)) for a in [x, *params]))
    unrounded = reference(*(_f64(a) for a in [x, *params]))
    assert np.abs(rounded - unrounded).max() > 1e-3  # the test can tell the two apart
    np.testing.assert_allclose(y, rounded, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------ errors


def test_state_of_another_width_gets_the_core_message():
    # A layer built for 3 features whose state came from a 4-feature layer.
    bn = jnnx.BatchNorm(3, use_running_average=True, rngs=nnx.Rngs(0))
    bn.mean = nnx.BatchStat(jnp.zeros(4))
    with pytest.raises(ValueError, match=r"^jaxnorm\.nnx\.BatchNorm: batch_norm: stats\.mean"):
        bn(_normal(9, (5, 3)))
    ln = jnnx.LayerNorm(3, rngs=nnx.Rngs(0))
    ln.scale = nnx.Param(jnp.ones(4))
    with pytest.raises(ValueError, match=r"^jaxnorm\.nnx\.LayerNorm: layer_norm: scale has shape"):
        ln(_normal(9, (5, 3)))


def test_input_of_another_width_names_num_features():
    bn = jnnx.BatchNorm(4, use_running_average=True, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"num_features=4 but x \(5, 3\) has 3 features"):
        bn(_normal(9, (5, 3)))


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(group_size=2), r"exactly one of num_groups and group_size.*num_groups=None"),
        (dict(num_groups=None), r"exactly one"),
        (dict(num_groups=4), r"num_groups=4 must be a positive int dividing num_features=6"),
        (dict(num_groups=None, group_size=4), r"group_size=4 must be a positive int dividing"),
    ],
)
def test_group_norm_constructor_errors(kw, match):
    with pytest.raises(ValueError, match=match):
        jnnx.GroupNorm(6, rngs=nnx.Rngs(0), **kw)
