"""jit over sharded batches: XLA's reductions give the global statistics, no ``axis_name``.

On the 8 virtual CPU devices of tests/conftest.py, in both of jax's sharding modes
(``AxisType.Auto``: sharded arrays under plain ``jax.jit``; ``AxisType.Explicit``: the
same with ``jax.set_mesh``, where every array's sharding is part of its type):

* the functional ``batch_norm``/``layer_norm``/``rms_norm`` and the linen/NNX modules,
  over a batch split on a 1-D ``data`` mesh, equal float64 NumPy on the global batch at
  mean 1e4, with uneven masks and one device whose examples are all masked out; the
  running statistics come out replicated; gradients equal the closed-form float64 ones
  and the single-device ones;
* a 2-D ``data x model`` mesh with the feature axis split over ``model`` (tensor
  parallelism): under jit no code is needed; under ``jax.shard_map`` the per-sample
  norms take ``axis_name="model"``;
* parameters annotated for sharding (linen's logical partitioning, NNX's
  ``out_sharding`` metadata) carry the same annotations as flax's own layers, are
  placed accordingly, and the layers compute the same numbers on them.

Tolerances at mean 1e4 (float32 spacing 2**-10 ~ 1e-3 there): means to 2e-3, variances
to 1e-5 relative, outputs to 2e-3 (the float32 rounding of ``x - mean`` over a standard
deviation >= 1), gradients to 2e-3 (the same rounding through the backward formula).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import jaxnorm
import jaxnorm.linen as jnn
import jaxnorm.nnx as jnnx

DEVICES = 8
MEAN = 1e4
EPS_BN = 1e-5
EPS_LN = 1e-6
MOMENTUM = 0.9
MEAN_ATOL = 2e-3
VAR_RTOL = 1e-5
Y_ATOL = 2e-3
GRAD_ATOL = 2e-3
XHAT_ERR = 2**-10

pytestmark = pytest.mark.skipif(
    jax.device_count() < DEVICES, reason="needs 8 devices (XLA_FLAGS in tests/conftest.py)"
)

MODES = {"auto": AxisType.Auto, "explicit": AxisType.Explicit}


def mesh_1d(mode: str) -> jax.sharding.Mesh:
    return jax.make_mesh((DEVICES,), ("data",), axis_types=(MODES[mode],))


def mesh_2d(mode: str) -> jax.sharding.Mesh:
    return jax.make_mesh((4, 2), ("data", "model"), axis_types=(MODES[mode],) * 2)


@contextlib.contextmanager
def on(mesh: jax.sharding.Mesh) -> Iterator[None]:
    """Explicit mode sets the mesh (as it must); Auto mode runs plain ``jax.jit``."""
    if all(t == AxisType.Explicit for t in mesh.axis_types):
        with jax.set_mesh(mesh):
            yield
    else:
        yield


def put(a: np.ndarray, mesh: jax.sharding.Mesh, *spec) -> jax.Array:
    return jax.device_put(a, NamedSharding(mesh, P(*spec)))


def one_device(a: np.ndarray) -> jax.Array:
    return jax.device_put(a, jax.devices()[0])


def replicated(a: jax.Array) -> bool:
    return a.sharding.is_fully_replicated


# --------------------------------------------------------------------------- data


def rows_mask(rows_per_device: int, valid: list[int]) -> np.ndarray:
    """Per-device valid counts: device ``d`` keeps the first ``valid[d]`` of its rows."""
    m = np.zeros((DEVICES * rows_per_device,), bool)
    for d, k in enumerate(valid):
        m[d * rows_per_device : d * rows_per_device + k] = True
    return m


# 4 rows per device; device 2 keeps none of its rows.
VALID_2D = [4, 3, 0, 2, 4, 1, 4, 3]
# 2 images per device; device 5 keeps none.
VALID_4D = [2, 1, 2, 2, 1, 0, 2, 1]


def features(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """float32 data at mean ~1e4, a different mean and standard deviation per feature."""
    c = shape[-1]
    loc = MEAN + rng.uniform(-50, 50, c)
    sd = rng.uniform(1.0, 3.0, c)
    return (loc + sd * rng.standard_normal(shape)).astype(np.float32)


@pytest.fixture(scope="module")
def data() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(13)
    x2 = features(rng, (32, 6))
    x4 = features(rng, (16, 3, 3, 4))
    return {
        "x2": x2,
        "m2": rows_mask(4, VALID_2D)[:, None],
        "x4": x4,
        "m4": rows_mask(2, VALID_4D)[:, None, None, None],
        "x4big": features(rng, (64, 8, 8, 4)),  # 4096 values per feature
        "s6": rng.normal(1.0, 0.2, 6).astype(np.float32),
        "b6": rng.normal(0.0, 0.2, 6).astype(np.float32),
        "s4": rng.normal(1.0, 0.2, 4).astype(np.float32),
        "b4": rng.normal(0.0, 0.2, 4).astype(np.float32),
        "w2": rng.standard_normal((32, 6)).astype(np.float32),
        "w4": rng.standard_normal((16, 3, 3, 4)).astype(np.float32),
    }


# ---------------------------------------------------------------- float64 references


def bn_reference(x, mask, scale, bias, w):
    """Batch norm over every axis but the last, on the valid elements, in float64.

    Returns ``y``, the batch mean and (biased) variance, and the gradients of
    ``sum(w * mask * y)`` with respect to ``x``, ``scale`` and ``bias``.
    """
    x = x.astype(np.float64)
    m = np.ones(x.shape) if mask is None else np.broadcast_to(mask, x.shape).astype(np.float64)
    red = tuple(range(x.ndim - 1))
    n = m.sum(red)
    mu = (x * m).sum(red) / n
    var = (m * (x - mu) ** 2).sum(red) / n
    r = 1.0 / np.sqrt(var + EPS_BN)
    xhat = (x - mu) * r
    y = xhat * scale + bias
    dxhat = w * m * scale
    mean_d = (dxhat * m).sum(red) / n
    mean_dx = (dxhat * xhat * m).sum(red) / n
    dx = m * r * (dxhat - mean_d - xhat * mean_dx)
    return y, mu, var, (dx, (w * m * xhat).sum(red), (w * m).sum(red))


def per_sample_reference(x, mask, scale, bias, w, *, center: bool):
    """Layer norm (``center``) or RMS norm over the last axis, valid elements only, float64.

    A row with no valid element passes through with mean 0 and variance 1 (jaxnorm's
    documented rule). Returns ``y`` and the gradients of ``sum(w * mask * y)``.
    """
    x = x.astype(np.float64)
    m = np.ones(x.shape) if mask is None else np.broadcast_to(mask, x.shape).astype(np.float64)
    n = m.sum(-1, keepdims=True)
    safe = np.maximum(n, 1)
    mu = (x * m).sum(-1, keepdims=True) / safe if center else np.zeros_like(n)
    var = (m * (x - mu) ** 2).sum(-1, keepdims=True) / safe
    mu = np.where(n > 0, mu, 0.0)
    var = np.where(n > 0, var, 1.0)
    r = 1.0 / np.sqrt(var + EPS_LN)
    xhat = (x - mu) * r
    y = xhat * scale + (0.0 if bias is None else bias)
    dxhat = w * m * scale
    mean_d = (dxhat * m).sum(-1, keepdims=True) / safe if center else 0.0
    mean_dx = (dxhat * xhat * m).sum(-1, keepdims=True) / safe
    dx = m * r * (dxhat - mean_d - xhat * mean_dx)
    red = tuple(range(x.ndim - 1))
    return y, (dx, (w * m * xhat).sum(red), (w * m).sum(red))


def assert_close(got, want, atol, rtol=0.0, what=""):
    np.testing.assert_allclose(
        np.asarray(got, np.float64), want, rtol=rtol, atol=atol, err_msg=what
    )


def grad_tolerances(x, mask, w, reduce_axes):
    """Bounds for ``(dx, dscale, dbias)`` from the float32 rounding of the mean at 1e4.

    ``x - mean`` is off by up to one float32 spacing of the mean (2**-10 at 1e4), i.e.
    ``xhat`` by ``XHAT_ERR`` for a standard deviation >= 1; ``dscale = sum(w * xhat)``
    then by ``XHAT_ERR * sum|w|`` over the reduced axes, ``dx`` by ``GRAD_ATOL``, and
    ``dbias = sum(w)`` only by float32 summation.
    """
    m = 1.0 if mask is None else np.broadcast_to(mask, x.shape)
    return GRAD_ATOL, XHAT_ERR * np.sum(np.abs(w) * m, axis=reduce_axes), 1e-5


def assert_grads(got, want, tols, names=("dx", "dscale", "dbias")):
    for g, ref, tol, name in zip(got, want, tols, names, strict=False):
        err = np.abs(np.asarray(g, np.float64) - np.asarray(ref, np.float64))
        assert np.all(err <= tol), f"{name}: max error {err.max():.3g} over tolerance {tol}"


# ------------------------------------------------------------ functional, 1-D mesh


def bn_loss(x, stats, scale, bias, mask, w):
    y, new = jaxnorm.batch_norm(
        x, stats, scale, bias, training=True, momentum=MOMENTUM, epsilon=EPS_BN, mask=mask
    )
    valid = 1.0 if mask is None else mask
    return jnp.sum(w * valid * y), (y, new)


bn_step = jax.jit(jax.value_and_grad(bn_loss, argnums=(0, 2, 3), has_aux=True))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", ["rows_masked", "images_masked", "images_unmasked"])
def test_batch_norm_under_jit_is_global(data, mode, case):
    """Statistics, output and gradients of the global batch; the stats come out replicated."""
    x, mask, w = {
        "rows_masked": (data["x2"], data["m2"], data["w2"]),
        "images_masked": (data["x4"], data["m4"], data["w4"]),
        "images_unmasked": (data["x4"], None, data["w4"]),
    }[case]
    c = x.shape[-1]
    scale, bias = (data["s6"], data["b6"]) if c == 6 else (data["s4"], data["b4"])
    y_ref, mu, var, grads_ref = bn_reference(x, mask, scale, bias, w)
    mesh = mesh_1d(mode)
    stats = jaxnorm.init_batch_stats((c,))
    with on(mesh):
        sharded = (put(x, mesh, "data"), None if mask is None else put(mask, mesh, "data"))
        (_, (y, new)), grads = bn_step(
            sharded[0], stats, scale, bias, sharded[1], put(w, mesh, "data")
        )
    assert_close(new.mean, MOMENTUM * 0 + (1 - MOMENTUM) * mu, MEAN_ATOL * 0.1, what="mean")
    assert_close(new.var, MOMENTUM * 1 + (1 - MOMENTUM) * var, 0, VAR_RTOL, what="var")
    assert int(new.count) == 1
    assert all(replicated(a) for a in new), [a.sharding for a in new]
    assert_close(y, y_ref, Y_ATOL, what="y")
    assert y.sharding.is_equivalent_to(NamedSharding(mesh, P("data")), x.ndim)
    tols = grad_tolerances(x, mask, w, tuple(range(x.ndim - 1)))
    assert_grads(grads, grads_ref, tols)
    # The same step on one device: the sharded gradients are the single-device ones.
    m1 = None if mask is None else one_device(mask)
    (_, (_, new1)), grads1 = bn_step(one_device(x), stats, scale, bias, m1, one_device(w))
    assert_grads(grads, grads1, tols)
    np.testing.assert_allclose(np.asarray(new.var), np.asarray(new1.var), rtol=VAR_RTOL)


@pytest.mark.parametrize("mode", MODES)
def test_batch_norm_long_reductions_under_jit(data, mode):
    """4096 values per feature (the single-pass path on one device), sharded over 8 devices."""
    x = data["x4big"]
    _, mu, var, _ = bn_reference(x, None, 1.0, 0.0, np.zeros_like(x))
    mesh = mesh_1d(mode)
    with on(mesh):
        _, new = jax.jit(lambda x, s: jaxnorm.batch_norm(x, s, training=True, momentum=0.0))(
            put(x, mesh, "data"), jaxnorm.init_batch_stats((4,))
        )
    assert_close(new.mean, mu, MEAN_ATOL, what="mean")
    assert_close(new.var, var, 0, VAR_RTOL, what="var")
    assert replicated(new.mean) and replicated(new.var)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("center", [True, False], ids=["layer_norm", "rms_norm"])
def test_per_sample_norms_under_jit(data, mode, center):
    """Rows split over devices, per-element masks, one device fully masked."""
    x, w, scale = data["x2"], data["w2"], data["s6"]
    bias = data["b6"] if center else None
    rng = np.random.default_rng(1)
    mask = (rng.uniform(size=x.shape) < 0.7) & data["m2"]  # uneven rows, device 2 empty
    mask[0, :] = True
    y_ref, grads_ref = per_sample_reference(x, mask, scale, bias, w, center=center)

    def loss(x, scale, bias, mask, w):
        if center:
            y = jaxnorm.layer_norm(x, scale, bias, epsilon=EPS_LN, mask=mask)
        else:
            y = jaxnorm.rms_norm(x, scale, epsilon=EPS_LN, mask=mask)
        return jnp.sum(w * mask * y), y

    step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True), donate_argnums=())
    mesh = mesh_1d(mode)
    with on(mesh):
        (_, y), grads = step(put(x, mesh, "data"), scale, bias, put(mask, mesh, "data"), w)
    assert_close(y, y_ref, Y_ATOL, 1e-6, what="y")  # rows with no valid element keep ~1e4
    n = 3 if center else 2
    assert_grads(grads[:n], grads_ref[:n], grad_tolerances(x, mask, w, (0,)))


# --------------------------------------------------------------- modules, 1-D mesh


class Layer:
    """One norm layer behind one interface: ``apply(params, stats, x, mask) -> (y, stats)``.

    ``params``/``stats`` are the framework's own pytrees (linen dicts, NNX States);
    :meth:`as_dict` turns either into ``{"scale": ..., "bias": ..., "mean": ...}``.
    """

    def __init__(self, api: str, kind: str, scale: np.ndarray, bias: np.ndarray | None):
        c = scale.shape[0]
        self.api, self.kind = api, kind
        self.has_stats = kind == "BatchNorm"
        kw = {"epsilon": EPS_BN if self.has_stats else EPS_LN}
        if self.has_stats:
            kw["momentum"] = MOMENTUM
        if api == "linen":
            self.module = getattr(jnn, kind)(**kw)
            probe = jnp.zeros((2, c))
            train = {"use_running_average": False} if self.has_stats else {}
            variables = self.module.init(jax.random.key(0), probe, **train)
            params = {"scale": jnp.asarray(scale)}
            if bias is not None:
                params["bias"] = jnp.asarray(bias)
            assert jax.tree.map(jnp.shape, params) == jax.tree.map(jnp.shape, variables["params"])
            self.params, self.stats = params, variables.get("batch_stats", {})
        else:
            if self.has_stats:
                kw["use_running_average"] = False
            model = getattr(jnnx, kind)(c, rngs=nnx.Rngs(0), **kw)
            model.scale[...] = scale
            if bias is not None:
                model.bias[...] = bias
            self.graphdef, self.params, self.stats = nnx.split(model, nnx.Param, nnx.BatchStat)

    def apply(self, params, stats, x, mask):
        if self.api == "linen":
            variables = {"params": params}
            if self.has_stats:
                variables["batch_stats"] = stats
                y, upd = self.module.apply(
                    variables, x, use_running_average=False, mask=mask, mutable=["batch_stats"]
                )
                return y, upd["batch_stats"]
            return self.module.apply(variables, x, mask=mask), stats
        # copy=True: Variables of this trace, which the layer may update (flax's rule).
        model = nnx.merge(self.graphdef, params, stats, copy=True)
        y = model(x, mask=mask)
        return y, nnx.state(model, nnx.BatchStat)

    def as_dict(self, tree) -> dict:
        return dict(tree) if self.api == "linen" else nnx.to_pure_dict(tree)

    def step(self):
        """jitted ``(params, stats, x, mask, w) -> ((loss, (y, stats)), dparams)``."""

        def loss(params, stats, x, mask, w):
            y, new = self.apply(params, stats, x, mask)
            return jnp.sum(w * mask * y), (y, new)

        return jax.jit(jax.value_and_grad(loss, has_aux=True))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("api", ["linen", "nnx"])
def test_batch_norm_modules_under_jit(data, api, mode):
    """Global statistics, replicated running statistics, global parameter gradients."""
    x, mask, w, scale, bias = data["x4"], data["m4"], data["w4"], data["s4"], data["b4"]
    layer = Layer(api, "BatchNorm", scale, bias)
    y_ref, mu, var, (_, dscale, dbias) = bn_reference(x, mask, scale, bias, w)
    step = layer.step()
    mesh = mesh_1d(mode)
    with on(mesh):
        args = (put(x, mesh, "data"), put(mask, mesh, "data"), put(w, mesh, "data"))
        (_, (y, new)), grads = step(layer.params, layer.stats, *args)
    stats = layer.as_dict(new)
    assert all(replicated(a) for a in jax.tree.leaves(new))
    assert_close(stats["mean"], (1 - MOMENTUM) * mu, MEAN_ATOL * (1 - MOMENTUM), what="mean")
    assert_close(stats["var"], MOMENTUM + (1 - MOMENTUM) * var, 0, VAR_RTOL, what="var")
    assert_close(y, y_ref, Y_ATOL, what="y")
    grads = layer.as_dict(grads)
    tols = grad_tolerances(x, mask, w, (0, 1, 2))[1:]
    assert_grads([grads["scale"], grads["bias"]], [dscale, dbias], tols, ("dscale", "dbias"))
    (_, (_, new1)), grads1 = step(
        layer.params, layer.stats, one_device(x), one_device(mask), one_device(w)
    )
    grads1 = layer.as_dict(grads1)
    assert_grads([grads["scale"], grads["bias"]], [grads1["scale"], grads1["bias"]], tols)
    np.testing.assert_allclose(stats["var"], layer.as_dict(new1)["var"], rtol=VAR_RTOL)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("kind", ["LayerNorm", "RMSNorm"])
@pytest.mark.parametrize("api", ["linen", "nnx"])
def test_per_sample_modules_under_jit(data, api, kind, mode):
    x, w, scale = data["x2"], data["w2"], data["s6"]
    center = kind == "LayerNorm"
    bias = data["b6"] if center else None
    mask = np.broadcast_to(data["m2"], x.shape).copy()
    mask[1::3, 2] = False  # some elements too, not only whole rows
    layer = Layer(api, kind, scale, bias)
    y_ref, (_, dscale, dbias) = per_sample_reference(x, mask, scale, bias, w, center=center)
    mesh = mesh_1d(mode)
    with on(mesh):
        args = (put(x, mesh, "data"), put(mask, mesh, "data"), put(w, mesh, "data"))
        (_, (y, _)), grads = layer.step()(layer.params, layer.stats, *args)
    assert_close(y, y_ref, Y_ATOL, 1e-6, what="y")
    grads = layer.as_dict(grads)
    tols = grad_tolerances(x, mask, w, (0,))[1:]
    assert_grads([grads["scale"]], [dscale], tols, ("dscale",))
    if center:
        assert_grads([grads["bias"]], [dbias], tols[1:], ("dbias",))


# ------------------------------------------------ 2-D mesh: features split over "model"


def replicated_over(a: jax.Array, axis: str) -> bool:
    """Whether devices that differ only in their ``axis`` coordinate hold the same block."""
    mesh = a.sharding.mesh
    names = mesh.axis_names
    blocks = a.sharding.devices_indices_map(a.shape)
    seen: dict[tuple, tuple] = {}
    for coords, device in np.ndenumerate(mesh.devices):
        others = tuple(c for c, n in zip(coords, names, strict=True) if n != axis)
        block = tuple((s.start, s.stop) for s in blocks[device])
        if seen.setdefault(others, block) != block:
            return False
    return True


def per_sample_fn(center: bool, **kw):
    if center:
        return lambda x, s, b, m: jaxnorm.layer_norm(x, s, b, epsilon=EPS_LN, mask=m, **kw)
    return lambda x, s, b, m: jaxnorm.rms_norm(x, s, epsilon=EPS_LN, mask=m, **kw)


def tp_data(data, center: bool):
    """Rows over ``data``, the 6 features over ``model``; elements masked unevenly."""
    x, w, scale = data["x2"], data["w2"], data["s6"]
    bias = data["b6"] if center else None
    rng = np.random.default_rng(2)
    mask = (rng.uniform(size=x.shape) < 0.7) & data["m2"]
    mask[:, 3:] &= mask[:, :3]  # rows 8..11 (data device 2) fully masked; others uneven
    y_ref, grads_ref = per_sample_reference(x, mask, scale, bias, w, center=center)
    return x, w, scale, bias, mask, y_ref, grads_ref


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("center", [True, False], ids=["layer_norm", "rms_norm"])
def test_tensor_parallel_per_sample_norms_under_jit(data, mode, center):
    """Under jit the feature reduction over ``model`` shards needs no code at all."""
    x, w, scale, bias, mask, y_ref, grads_ref = tp_data(data, center)
    norm = per_sample_fn(center)

    def loss(x, s, b, m, w):
        y = norm(x, s, b, m)
        return jnp.sum(w * m * y), y

    mesh = mesh_2d(mode)
    with on(mesh):
        xs, ms, ws = (put(a, mesh, "data", "model") for a in (x, mask, w))
        ss = put(scale, mesh, "model")
        bs = None if bias is None else put(bias, mesh, "model")
        step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))
        (_, y), grads = step(xs, ss, bs, ms, ws)
    assert_close(y, y_ref, Y_ATOL, 1e-6, what="y")
    assert y.sharding.is_equivalent_to(NamedSharding(mesh, P("data", "model")), 2)
    n = 3 if center else 2
    assert_grads(grads[:n], grads_ref[:n], grad_tolerances(x, mask, w, (0,)))
    assert grads[1].sharding.is_equivalent_to(NamedSharding(mesh, P("model")), 1)


# jax 0.10's explicit mode refuses ``jnp.where``/``lax.select`` whose operands carry
# different (even compatible) shardings (jax-ml/jax#37853), where arithmetic takes the
# finer one; jaxnorm selects between x-, mask- and running-stat-sharded arrays, through
# jaxnorm._sharding.where. The minimal cases are in TestExplicitModeSelects below.
MODES_2D_BN = ["auto", "explicit"]


@pytest.mark.parametrize("mode", MODES_2D_BN)
def test_batch_norm_on_a_2d_mesh_under_jit(data, mode):
    """Batch over ``data``, channels over ``model``: each channel's statistics are global
    over ``data`` and the running statistics are replicated over ``data``."""
    x, mask, w = data["x4"], data["m4"], data["w4"]
    x, mask, w = (np.repeat(a, 2, axis=-1) if a.shape[-1] == 4 else a for a in (x, mask, w))
    scale, bias = np.repeat(data["s4"], 2), np.repeat(data["b4"], 2)
    y_ref, mu, var, grads_ref = bn_reference(x, mask, scale, bias, w)
    mesh = mesh_2d(mode)
    with on(mesh):
        stats = jaxnorm.init_batch_stats((8,))
        (_, (y, new)), grads = bn_step(
            put(x, mesh, "data", None, None, "model"),
            stats,
            put(scale, mesh, "model"),
            put(bias, mesh, "model"),
            put(mask, mesh, "data"),
            put(w, mesh, "data", None, None, "model"),
        )
    assert_close(new.mean, (1 - MOMENTUM) * mu, MEAN_ATOL * (1 - MOMENTUM), what="mean")
    assert_close(new.var, MOMENTUM + (1 - MOMENTUM) * var, 0, VAR_RTOL, what="var")
    assert replicated_over(new.mean, "data") and replicated_over(new.var, "data")
    assert_close(y, y_ref, Y_ATOL, what="y")
    assert_grads(grads, grads_ref, grad_tolerances(x, mask, w, (0, 1, 2)))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("center", [True, False], ids=["layer_norm", "rms_norm"])
def test_tensor_parallel_per_sample_norms_under_shard_map(data, mode, center):
    """Per-device code sees 3 of the 6 features: ``axis_name="model"`` makes the
    statistics those of the whole row, values and gradients; without it they are not."""
    x, w, scale, bias, mask, y_ref, grads_ref = tp_data(data, center)
    mesh = mesh_2d(mode)
    row, feat = P("data", "model"), P("model")

    def run(norm):
        def local_loss(x, s, b, m, w):
            y = norm(x, s, b, m)
            return jax.lax.psum(jnp.sum(w * m * y), ("data", "model")), y

        f = jax.shard_map(
            local_loss,
            mesh=mesh,
            in_specs=(row, feat, None if bias is None else feat, row, row),
            out_specs=(P(), row),
        )
        step = jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2), has_aux=True))
        with on(mesh):
            args = (put(x, mesh, *row), put(scale, mesh, *feat))
            args += (None if bias is None else put(bias, mesh, *feat),)
            return step(*args, put(mask, mesh, *row), put(w, mesh, *row))

    (_, y), grads = run(per_sample_fn(center, axis_name="model"))
    assert_close(y, y_ref, Y_ATOL, 1e-6, what="y")
    n = 3 if center else 2
    assert_grads(grads[:n], grads_ref[:n], grad_tolerances(x, mask, w, (0,)))
    (_, y_local), _ = run(per_sample_fn(center))
    assert np.max(np.abs(np.asarray(y_local) - y_ref)) > 0.1  # half-rows: another model


@pytest.mark.parametrize("kind", ["LayerNorm", "RMSNorm"])
def test_tensor_parallel_linen_modules_under_shard_map(data, kind):
    center = kind == "LayerNorm"
    x, _, scale, bias, mask, y_ref, _ = tp_data(data, center)
    mesh = mesh_2d("explicit")
    model = getattr(jnn, kind)(epsilon=EPS_LN, axis_name="model")
    params = {"scale": scale} if bias is None else {"scale": scale, "bias": bias}
    row = P("data", "model")
    f = jax.shard_map(
        lambda p, x, m: model.apply({"params": p}, x, mask=m),
        mesh=mesh,
        in_specs=(P("model"), row, row),
        out_specs=row,
    )
    with on(mesh):
        p = jax.tree.map(lambda a: put(a, mesh, "model"), params)
        y = jax.jit(f)(p, put(x, mesh, *row), put(mask, mesh, *row))
    assert_close(y, y_ref, Y_ATOL, 1e-6, what="y")


@pytest.mark.parametrize("mode", MODES)
def test_batch_norm_under_shard_map_on_a_2d_mesh(data, mode):
    """Per-device code: ``axis_name="data"`` over the batch, channels split over ``model``."""
    x, mask, w = data["x4"], data["m4"], data["w4"]
    x, w = np.repeat(x, 2, axis=-1), np.repeat(w, 2, axis=-1)
    scale, bias = np.repeat(data["s4"], 2), np.repeat(data["b4"], 2)
    y_ref, mu, var, _ = bn_reference(x, mask, scale, bias, w)
    mesh = mesh_2d(mode)
    img, ch = P("data", None, None, "model"), P("model")
    stats_spec = jaxnorm.BatchStats(ch, ch, P())

    def local(x, stats, s, b, m):
        return jaxnorm.batch_norm(
            x, stats, s, b, training=True, momentum=MOMENTUM, epsilon=EPS_BN, mask=m,
            axis_name="data",
        )  # fmt: skip

    f = jax.shard_map(
        local,
        mesh=mesh,
        in_specs=(img, stats_spec, ch, ch, P("data")),
        out_specs=(img, stats_spec),
    )
    with on(mesh):
        stats = jaxnorm.init_batch_stats((8,))
        stats = jax.tree.map(lambda a, sp: put(np.asarray(a), mesh, *sp), stats, stats_spec)
        y, new = jax.jit(f)(
            put(x, mesh, *img), stats, put(scale, mesh, *ch), put(bias, mesh, *ch),
            put(mask, mesh, "data"),
        )  # fmt: skip
    assert_close(new.mean, (1 - MOMENTUM) * mu, MEAN_ATOL * (1 - MOMENTUM), what="mean")
    assert_close(new.var, MOMENTUM + (1 - MOMENTUM) * var, 0, VAR_RTOL, what="var")
    assert_close(y, y_ref, Y_ATOL, what="y")


class TestExplicitModeSelects:
    """Minimal cases of the explicit-mode select rule: each failed inside jaxnorm with
    ``ShardingTypeError`` in Explicit mode before jaxnorm._sharding.where (flax's own
    BatchNorm passes them); Auto mode is the control."""

    @pytest.fixture
    def x(self):
        rng = np.random.default_rng(3)
        return (MEAN + rng.standard_normal((8, 4))).astype(np.float32)

    @pytest.mark.parametrize("mode", ["auto", "explicit"])
    def test_token_mask_with_features_over_model(self, x, mode):
        """A per-row (padding) mask ``(N, 1)``, x's features split over ``model``:
        ``mask_safe``'s ``jnp.where(mask, x, 0)`` (jaxnorm/functional/_core.py:97)."""
        mask = np.ones((8, 1), bool)
        mask[0] = False
        y_ref, _ = per_sample_reference(x, mask, 1.0, 0.0, np.zeros_like(x), center=True)
        mesh = mesh_2d(mode)
        with on(mesh):
            y = jax.jit(lambda x, m: jaxnorm.layer_norm(x, mask=m, epsilon=EPS_LN))(
                put(x, mesh, "data", "model"), put(mask, mesh, "data")
            )
        assert_close(y, y_ref, Y_ATOL, 1e-6)

    @pytest.mark.parametrize("mode", ["auto", "explicit"])
    def test_fresh_running_stats_with_channels_over_model(self, x, mode):
        """``init_batch_stats`` (replicated), channels split over ``model``, no mask:
        ``jnp.where(has_data, new_mean, old_mean)`` (jaxnorm/state.py:142)."""
        _, mu, var, _ = bn_reference(x, None, 1.0, 0.0, np.zeros_like(x))
        mesh = mesh_2d(mode)
        with on(mesh):
            _, new = jax.jit(lambda x, s: jaxnorm.batch_norm(x, s, training=True, momentum=0.0))(
                put(x, mesh, "data", "model"), jaxnorm.init_batch_stats((4,))
            )
        assert_close(new.mean, mu, MEAN_ATOL)
        assert_close(new.var, var, 0, VAR_RTOL)

    @pytest.mark.parametrize("mode", ["auto", "explicit"])
    def test_example_mask_with_channels_over_model(self, x, mode):
        """Stats sharded like the channels, a per-example mask: ``jnp.where(has_data,
        mean, running_mean)`` (jaxnorm/functional/batch.py:171) and ``moments``'
        ``jnp.where(mask, xs, 0)`` (jaxnorm/stats.py:253)."""
        mask = np.ones((8, 1), bool)
        mask[:2] = False
        _, mu, var, _ = bn_reference(x, mask, 1.0, 0.0, np.zeros_like(x))
        mesh = mesh_2d(mode)
        with on(mesh):
            stats = jaxnorm.init_batch_stats((4,))
            stats = stats._replace(
                mean=put(np.asarray(stats.mean), mesh, "model"),
                var=put(np.asarray(stats.var), mesh, "model"),
            )
            _, new = jax.jit(
                lambda x, s, m: jaxnorm.batch_norm(x, s, training=True, momentum=0.0, mask=m)
            )(put(x, mesh, "data", "model"), stats, put(mask, mesh, "data"))
        assert_close(new.mean, mu, MEAN_ATOL)
        assert_close(new.var, var, 0, VAR_RTOL)


# ------------------------------------------------------ parameters annotated for sharding

RULES = (("batch", "data"), ("embed", "model"))


def linen_kwargs(kind: str) -> dict:
    """flax's logical partitioning on ``scale`` (and ``bias``): the ``embed`` axis."""
    kw = {"scale_init": nn.with_logical_partitioning(nn.initializers.ones, ("embed",))}
    if kind != "RMSNorm":
        kw["bias_init"] = nn.with_logical_partitioning(nn.initializers.zeros, ("embed",))
    return kw


KINDS_MODES = [(kind, mode) for kind in ("LayerNorm", "RMSNorm", "BatchNorm") for mode in MODES]


@pytest.mark.parametrize(("kind", "mode"), KINDS_MODES)
def test_linen_logical_partitioning(data, kind, mode):
    """The same boxed variables and specs as flax's layer; placed on ``model``; correct."""
    x = data["x2"]
    train = {"use_running_average": False} if kind == "BatchNorm" else {}
    ours, theirs = (getattr(api, kind)(**linen_kwargs(kind)) for api in (jnn, nn))

    def init(model):
        return model.init(jax.random.key(0), jnp.zeros((2, 6)), **train)

    specs = nn.get_partition_spec(jax.eval_shape(lambda: init(ours)))
    assert specs == nn.get_partition_spec(jax.eval_shape(lambda: init(theirs)))
    assert specs["params"]["scale"] == P("embed")
    mesh = mesh_2d(mode)
    with on(mesh):
        # init places the Params through out_shardings. (Inside logical_axis_rules, an
        # Explicit-mode init fails for flax's own layers too, nn.Dense included: the
        # constraint on the fresh, unsharded Param acts as an assert.)
        shardings = nn.logical_to_mesh_sharding(specs, mesh, RULES)
        variables = jax.jit(lambda: init(ours), out_shardings=shardings)()
        scale = nn.meta.unbox(variables)["params"]["scale"]
        assert scale.sharding.is_equivalent_to(NamedSharding(mesh, P("model")), 1)
    with on(mesh), nn.logical_axis_rules(RULES):
        x_sharded = put(x, mesh, "data", "model")
        if kind == "BatchNorm":
            y, upd = jax.jit(lambda v, x: ours.apply(v, x, mutable=["batch_stats"], **train))(
                variables, x_sharded
            )
            y_ref, mu, _, _ = bn_reference(x, None, 1.0, 0.0, np.zeros_like(x))
            assert_close(upd["batch_stats"]["mean"], 0.01 * mu, MEAN_ATOL * 0.01)
        else:
            y = jax.jit(ours.apply)(variables, x_sharded)
            y_ref, _ = per_sample_reference(
                x, None, 1.0, 0.0, np.zeros_like(x), center=kind == "LayerNorm"
            )
    assert_close(y, y_ref, Y_ATOL, 1e-6)


@pytest.mark.parametrize(("kind", "mode"), KINDS_MODES)
def test_nnx_sharding_metadata(data, kind, mode):
    """``scale_metadata``/``bias_metadata`` as flax.nnx: same Param metadata and partition
    specs, the Params placed on ``model`` under a mesh, correct outputs under jit."""
    x = data["x2"]
    meta = {"out_sharding": ("model",)}
    kw = {"scale_metadata": meta}
    if kind != "RMSNorm":
        kw["bias_metadata"] = meta
    if kind == "BatchNorm":
        kw["use_running_average"] = False
    mesh = mesh_2d(mode)
    with jax.set_mesh(mesh):  # flax places annotated Params on the current mesh
        ours, theirs = (getattr(api, kind)(6, rngs=nnx.Rngs(0), **kw) for api in (jnnx, nnx))
        spec_ours = nnx.get_partition_spec(nnx.state(ours, nnx.Param))
        spec_theirs = nnx.get_partition_spec(nnx.state(theirs, nnx.Param))
        assert nnx.to_pure_dict(spec_ours) == nnx.to_pure_dict(spec_theirs)
        assert ours.scale.get_metadata("out_sharding") == ("model",)
        assert ours.scale[...].sharding.is_equivalent_to(NamedSharding(mesh, P("model")), 1)
        assert ours.scale[...].sharding == theirs.scale[...].sharding
    with on(mesh):
        y = nnx.jit(lambda m, x: m(x))(ours, put(x, mesh, "data", "model"))
    if kind == "BatchNorm":
        y_ref, mu, _, _ = bn_reference(x, None, 1.0, 0.0, np.zeros_like(x))
        assert_close(ours.mean[...], 0.01 * mu, MEAN_ATOL * 0.01)
    else:
        center = kind == "LayerNorm"
        y_ref, _ = per_sample_reference(x, None, 1.0, 0.0, np.zeros_like(x), center=center)
    assert_close(y, y_ref, Y_ATOL, 1e-6)


@pytest.mark.parametrize("kind", ["LayerNorm", "RMSNorm"])
def test_nnx_tensor_parallel_modules_under_shard_map(data, kind):
    """NNX Params sharded over ``model`` enter shard_map as their local halves, as in flax."""
    center = kind == "LayerNorm"
    x, _, scale, bias, mask, y_ref, _ = tp_data(data, center)
    mesh = mesh_2d("explicit")
    meta = {"out_sharding": ("model",)}
    kw = {"scale_metadata": meta} | ({"bias_metadata": meta} if center else {})
    row = P("data", "model")
    with jax.set_mesh(mesh):
        model = getattr(jnnx, kind)(6, epsilon=EPS_LN, axis_name="model", rngs=nnx.Rngs(0), **kw)
        model.scale[...] = put(scale, mesh, "model")
        if center:
            model.bias[...] = put(bias, mesh, "model")
        graphdef, state = nnx.split(model)
        f = jax.shard_map(
            lambda state, x, m: nnx.merge(graphdef, state)(x, mask=m),
            mesh=mesh,
            in_specs=(nnx.get_partition_spec(state), row, row),
            out_specs=row,
        )
        y = jax.jit(f)(state, put(x, mesh, *row), put(mask, mesh, *row))
    assert_close(y, y_ref, Y_ATOL, 1e-6)


# ------------------------------------------------- the synchronization benchmark's columns


def test_sync_benchmark_columns_run_the_same_step():
    """benchmarks/sync.py times like with like: its jit and ``axis_name`` columns take
    the same train step as flax's BatchNorm with ``axis_name`` (data near mean 0, where
    flax's variance is exact); its per-device column takes another."""
    from benchmarks.sync import build_steps

    columns = ("flax_sync", "jaxnorm_jit", "jaxnorm_sync", "jaxnorm_local")
    steps = build_steps(devices=DEVICES, batch=2 * DEVICES, image=8, columns=columns)
    outs = {column: step(*args) for column, (step, args) in steps.items()}
    params, stats, _, loss = outs["flax_sync"]  # the outside reference: flax's BatchNorm
    for column in ("jaxnorm_jit", "jaxnorm_sync"):
        p, s, _, l_ = outs[column]
        np.testing.assert_allclose(float(l_), float(loss), rtol=1e-5, err_msg=column)
        for got, want in zip(
            jax.tree.leaves((p, s)), jax.tree.leaves((params, stats)), strict=True
        ):
            np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-4, atol=1e-5)
    assert abs(float(outs["jaxnorm_local"][3]) - float(loss)) > 1e-3  # another model
