"""jaxnorm.tools: microbatch-exact running statistics, precise BN, folding.

References are independent of the code under test: one training step on the
concatenated batch (flax apply, and torch's BatchNorm), torch's
``swa_utils.update_bn``, NumPy statistics of layer inputs captured by torch
forward hooks, and the unfolded model.
"""

from __future__ import annotations

import copy
from typing import Any

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch

import jaxnorm
import jaxnorm.linen as jnn
from jaxnorm import tools
from jaxnorm.interop import torch as jt

TOL = dict(atol=1e-5, rtol=1e-5)
K = 4  # microbatches


def _n(t: torch.Tensor) -> np.ndarray:
    return t.detach().numpy()


class MLP(nn.Module):
    """Dense -> BatchNorm -> relu -> Dense; ``flax_bn`` swaps in flax's own BatchNorm."""

    bn: Any  # BatchNorm kwargs
    flax_bn: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        x = nn.Dense(6)(x)
        bn_cls = nn.BatchNorm if self.flax_bn else jnn.BatchNorm
        x = bn_cls(use_running_average=not train, **self.bn)(x)
        return nn.Dense(3)(nn.relu(x))


def _mlp_variables(*, count: bool) -> dict:
    """Variables for MLP, from a torch twin (cheaper than Flax's initializers on CPU)."""
    torch.manual_seed(0)
    tm = torch.nn.Sequential(
        torch.nn.Linear(4, 6), torch.nn.BatchNorm1d(6), torch.nn.ReLU(), torch.nn.Linear(6, 3)
    )
    _randomize_bn(tm)
    return jt.from_torch(tm, "compact", with_count=count)


def _randomize_bn(tm: torch.nn.Module) -> None:
    """Non-trivial BatchNorm affine parameters and running statistics."""
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for m in tm.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                for t in (m.weight, m.running_var):
                    t.copy_(torch.rand(t.shape, generator=g) + 0.5)
                for t in (m.bias, m.running_mean):
                    t.copy_(torch.randn(t.shape, generator=g))


def _loss_fn(model):
    def loss_fn(params, batch_stats, batch):
        x, y = batch
        logits, _ = model.apply(
            {"params": params, "batch_stats": batch_stats}, x, train=True, mutable=["batch_stats"]
        )
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    return loss_fn


@pytest.mark.parametrize(
    "bn, flax_bn, check_grads",
    [
        (dict(momentum=0.8), False, True),
        (jt.preset(torch.nn.BatchNorm1d(6, momentum=0.2)), False, False),  # unbiased, total n
        (dict(momentum=None, unbiased_running_var=True), False, False),  # count += 1
        (dict(momentum=0.8), True, False),  # flax.linen.BatchNorm layers work too
    ],
    ids=["flax_convention", "torch_preset", "cumulative", "flax_batchnorm"],
)
def test_accumulated_step_equals_one_step_on_the_concatenated_batch(bn, flax_bn, check_grads):
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(3.0, 2.0, (K * 5, 4)), jnp.float32)
    y = jnp.asarray(rng.integers(0, 3, K * 5))
    model = MLP(bn=bn, flax_bn=flax_bn)
    variables = _mlp_variables(count=bn.get("momentum", 0.99) is None)
    params, stats0 = variables["params"], variables["batch_stats"]
    micro = (x.reshape(K, 5, 4), y.reshape(K, 5))
    loss_fn = _loss_fn(model)

    step = jax.jit(lambda p, s, mb: tools.accumulate_gradients(loss_fn, p, s, mb))
    out = step(params, stats0, micro)

    # Reference: one training step on the concatenated batch.
    train_apply = jax.jit(lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"]))
    _, updates = train_apply(variables, x)
    chex.assert_trees_all_close(out.batch_stats, updates["batch_stats"], **TOL)
    if bn.get("momentum", 0.99) is None:
        assert int(out.batch_stats["BatchNorm_0"]["count"]) == 1
    if not check_grads:  # the rest does not depend on the BatchNorm's settings
        return
    # K momentum updates at 1/K of the batch are something else.
    stats_k = stats0
    for i in range(K):
        _, upd = train_apply({"params": params, "batch_stats": stats_k}, micro[0][i])
        stats_k = upd["batch_stats"]
    assert not np.allclose(stats_k["BatchNorm_0"]["var"], out.batch_stats["BatchNorm_0"]["var"])

    # Loss and gradients: the mean over microbatches, each normalized on its own.
    grad_fn = jax.jit(jax.value_and_grad(loss_fn))
    per_mb = [grad_fn(params, stats0, (micro[0][i], micro[1][i])) for i in range(K)]
    chex.assert_trees_all_close(out.loss, np.mean([loss for loss, _ in per_mb]), **TOL)
    mean_grads = jax.tree.map(lambda *g: sum(g) / K, *[g for _, g in per_mb])
    chex.assert_trees_all_close(out.grads, mean_grads, **TOL)


@pytest.mark.parametrize("jit", [True, False], ids=["jit", "nojit"])
def test_functional_accumulation_in_scan_matches_torch(jit):
    # NHWC microbatches; torch sees the concatenated batch in NCHW, one step.
    rng = np.random.default_rng(1)
    x = rng.normal(-2.0, 3.0, (K * 2, 3, 3, 5)).astype(np.float32)
    micro = jnp.asarray(x.reshape(K, 2, 3, 3, 5))
    scale = jnp.asarray(rng.normal(1.0, 0.2, 5), jnp.float32)

    def accumulated(stats, micro):
        def body(acc, mb):
            y, _ = jaxnorm.batch_norm(
                mb, stats, scale, None, training=True, momentum=0.9, unbiased_running_var=True
            )
            return tools.accumulate_moments(acc, tools.batch_moments(mb)), y

        acc, ys = jax.lax.scan(body, tools.empty_moments(5), micro)
        new = tools.apply_accumulated(stats, acc, momentum=0.9, unbiased_running_var=True)
        return new, ys

    stats0 = jaxnorm.init_batch_stats(5)
    new, ys = (jax.jit(accumulated) if jit else accumulated)(stats0, micro)
    bn = torch.nn.BatchNorm2d(5, momentum=0.1)
    bn.train()
    bn(torch.from_numpy(x.transpose(0, 3, 1, 2)))
    np.testing.assert_allclose(new.mean, _n(bn.running_mean), **TOL)
    np.testing.assert_allclose(new.var, _n(bn.running_var), **TOL)  # Bessel with n = 72
    assert int(new.count) == 1
    # Each microbatch is normalized with its own statistics.
    mb0 = np.asarray(micro[0])
    expected0 = (mb0 - mb0.mean((0, 1, 2))) / np.sqrt(mb0.var((0, 1, 2)) + 1e-5) * np.asarray(scale)
    np.testing.assert_allclose(ys[0], expected0, **TOL)


def test_batch_moments_with_mask_and_merge_identity():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(6, 4)).astype(np.float32)
    mask = rng.random((6, 1)) > 0.4
    m = tools.batch_moments(jnp.asarray(x), mask=jnp.asarray(mask))
    sel = x[mask[:, 0]]
    np.testing.assert_allclose(m.count, np.full(4, len(sel)))
    np.testing.assert_allclose(m.mean, sel.mean(0), **TOL)
    np.testing.assert_allclose(m.m2, ((sel - sel.mean(0)) ** 2).sum(0), **TOL)
    merged = tools.accumulate_moments(tools.empty_moments(4), m)
    chex.assert_trees_all_close(merged, m, **TOL)


# ----------------------------------------------------------------------------- precise BN


def _torch_cnn() -> torch.nn.Sequential:
    torch.manual_seed(0)
    nn_ = torch.nn
    return nn_.Sequential(
        nn_.Conv2d(3, 4, 3, padding=1),
        nn_.BatchNorm2d(4),
        nn_.ReLU(),
        nn_.Conv2d(4, 6, 3, padding=1),
        nn_.BatchNorm2d(6),
        nn_.ReLU(),
        nn_.AdaptiveAvgPool2d(1),
        nn_.Flatten(),
        nn_.Linear(6, 3),
    )


class CNN(nn.Module):
    """NHWC twin of ``_torch_cnn``; ``use_bn=False`` is the folded architecture."""

    bn: Any = None  # BatchNorm kwargs
    use_bn: bool = True

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        for features in (4, 6):
            x = nn.Conv(features, (3, 3), padding=1)(x)
            if self.use_bn:
                x = jnn.BatchNorm(use_running_average=not train, **self.bn)(x)
            x = nn.relu(x)
        return nn.Dense(3)(x.mean(axis=(1, 2)))


def _batches(sizes):
    g = torch.Generator().manual_seed(5)
    # Batches with different means, so between-batch spread is visible.
    return [torch.randn(n, 3, 5, 5, generator=g) + 0.5 * i for i, n in enumerate(sizes)]


def test_precise_bn_matches_torch_update_bn_and_pooled_reference():
    sizes = (6, 6, 3, 3)
    batches = _batches(sizes)
    tm = _torch_cnn()
    model = CNN(bn=jt.preset(tm[1]))
    variables = jt.from_torch(tm, "compact")

    def apply_fn(v, x):
        return model.apply(v, x, train=True, mutable=["batch_stats"])

    nhwc = [jnp.asarray(_n(b).transpose(0, 2, 3, 1)) for b in batches]
    cumulative = tools.recompute_batch_stats(apply_fn, variables, nhwc, estimator="cumulative")
    pooled = tools.recompute_batch_stats(apply_fn, variables, nhwc)
    chex.assert_trees_all_equal(cumulative["params"], variables["params"])

    # torch: momentum=None cumulative average of per-batch mean and unbiased var.
    reference = copy.deepcopy(tm)
    torch.optim.swa_utils.update_bn(batches, reference)
    assert int(reference[1].num_batches_tracked) == len(sizes)
    # Pooled reference: every BN input over all batches, captured in torch train mode.
    captured: dict[int, list[np.ndarray]] = {1: [], 4: []}
    hooked = copy.deepcopy(tm).train()
    for i in captured:
        hooked[i].register_forward_pre_hook(lambda m, a, i=i: captured[i].append(_n(a[0])))
    with torch.no_grad():
        for b in batches:
            hooked(b)

    for i, name in ((1, "BatchNorm_0"), (4, "BatchNorm_1")):
        got = cumulative["batch_stats"][name]
        np.testing.assert_allclose(got["mean"], _n(reference[i].running_mean), **TOL)
        np.testing.assert_allclose(got["var"], _n(reference[i].running_var), **TOL)
        values = np.concatenate(captured[i]).transpose(1, 0, 2, 3).reshape(len(got["mean"]), -1)
        got = pooled["batch_stats"][name]
        np.testing.assert_allclose(got["mean"], values.mean(1), **TOL)
        np.testing.assert_allclose(got["var"], values.var(1, ddof=1), **TOL)  # unbiased preset
        # The estimators differ: unequal batches, drifting means.
        assert not np.allclose(got["var"], _n(reference[i].running_var), rtol=1e-3)


def test_precise_bn_count_and_untrained_layers():
    model = MLP(bn=dict(momentum=None))
    x = jnp.asarray(np.random.default_rng(3).normal(size=(12, 4)), jnp.float32)
    variables = _mlp_variables(count=True)
    out = tools.recompute_batch_stats(
        lambda v, b: model.apply(v, b, train=True, mutable=["batch_stats"]),
        variables,
        [x[:4], x[4:8], x[8:]],
    )
    assert int(out["batch_stats"]["BatchNorm_0"]["count"]) == 3
    # An evaluation-mode apply trains no layer: statistics stay as they were.
    same = tools.recompute_batch_stats(lambda v, b: model.apply(v, b, train=False), variables, [x])
    chex.assert_trees_all_equal(same, variables)
    with pytest.raises(ValueError, match="estimator must be"):
        tools.recompute_batch_stats(lambda v, b: None, variables, [x], estimator="mean")
    with pytest.raises(ValueError, match="batches is empty"):
        tools.recompute_batch_stats(lambda v, b: None, variables, [])


# -------------------------------------------------------------------------------- folding


def test_folded_cnn_matches_unfolded():
    model = CNN(bn=dict(momentum=0.9, epsilon=1e-3))
    x = jnp.asarray(np.random.default_rng(1).normal(size=(3, 5, 5, 3)), jnp.float32)
    tm = _torch_cnn()
    _randomize_bn(tm)
    variables = jt.from_torch(tm, "compact")

    folded = tools.fold_batch_norm(
        variables, {"Conv_0": "BatchNorm_0", "Conv_1": "BatchNorm_1"}, epsilon=1e-3
    )
    assert sorted(folded) == ["Conv_0", "Conv_1", "Dense_0"]
    y_folded = jax.jit(lambda p, x: CNN(use_bn=False).apply({"params": p}, x, train=False))
    y = jax.jit(lambda v, x: model.apply(v, x, train=False))
    chex.assert_trees_all_close(y_folded(folded, x), y(variables, x), **TOL)
    assert "BatchNorm_0" in variables["params"]  # the input is not modified


def test_fold_kernel_without_bias_or_scale_matches_numpy():
    rng = np.random.default_rng(4)
    kernel = rng.normal(size=(5, 3)).astype(np.float32)
    mean, var = rng.normal(size=3).astype(np.float32), rng.random(3).astype(np.float32) + 0.1
    beta = rng.normal(size=3).astype(np.float32)
    x = rng.normal(size=(7, 5)).astype(np.float32)
    k2, b2 = tools.fold_batch_norm_kernel(kernel, None, mean, var, None, beta, epsilon=1e-5)
    expected = (x @ kernel - mean) / np.sqrt(var + 1e-5) + beta
    np.testing.assert_allclose(x @ np.asarray(k2) + np.asarray(b2), expected, **TOL)


def test_tool_errors_teach():
    stats = {"BatchNorm_0": {"mean": jnp.zeros(3), "var": jnp.ones(3)}}
    m = {"BatchNorm_0": tools.empty_moments(3)}
    with pytest.raises(ValueError, match="momentum=None .* needs the step count"):
        tools.apply_accumulated(stats, m, momentum=None)
    with pytest.raises(ValueError, match="'Other_0', which the batch_stats lack"):
        tools.apply_accumulated(stats, {"Other_0": tools.empty_moments(3)}, momentum=0.9)
    with pytest.raises(ValueError, match="running statistics of shape \\(3,\\) but moments"):
        tools.apply_accumulated(stats, {"BatchNorm_0": tools.empty_moments(4)}, momentum=0.9)
    with pytest.raises(ValueError, match="momentum must lie in"):
        tools.apply_accumulated(stats, m, momentum=90)
    with pytest.raises(ValueError, match="leading axis of size K >= 1"):
        tools.accumulate_gradients(
            lambda p, s, b: 0.0, {}, stats, (jnp.zeros((4, 2)), jnp.zeros((3,)))
        )
    with pytest.raises(ValueError, match="no kernel at 'Conv_9'"):
        tools.fold_batch_norm({"params": {}, "batch_stats": stats}, {"Conv_9": "BatchNorm_0"})
    with pytest.raises(ValueError, match="mean has shape \\(3,\\) but the output features"):
        tools.fold_batch_norm_kernel(
            jnp.ones((2, 4)), None, jnp.zeros(3), jnp.ones(3), epsilon=1e-5
        )


class Block(nn.Module):
    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        return jnn.BatchNorm(use_running_average=False, momentum=0.9)(x)


class Outer(nn.Module):
    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = Block()(x)
        return jnn.BatchNorm(use_running_average=True)(x)


def test_with_batch_moments_nests_like_batch_stats_and_skips_eval_layers():
    x = jnp.asarray(np.random.default_rng(6).normal(2.0, 1.0, (5, 3)), jnp.float32)
    model = Outer()
    variables = model.init(jax.random.key(0), x)
    (_, updates), m = tools.with_batch_moments(model.apply)(variables, x, mutable=["batch_stats"])
    # Only the training-mode layer reports, under its module path.
    assert jax.tree.structure(m, is_leaf=lambda t: isinstance(t, jaxnorm.Moments)) == (
        jax.tree.structure({"Block_0": {"BatchNorm_0": 0}})
    )
    np.testing.assert_allclose(m["Block_0"]["BatchNorm_0"].mean, np.asarray(x).mean(0), **TOL)
    # Applying the moments reproduces the layer's own update.
    new = tools.apply_accumulated(variables["batch_stats"], m, momentum=0.9)
    chex.assert_trees_all_close(new, updates["batch_stats"], **TOL)


def test_with_batch_moments_merges_across_axis_name():
    # Two "devices" (a vmapped axis) of 4 examples each: each layer reports the moments
    # of all 8, as its own statistics are merged across axis_name.
    x = jnp.asarray(np.random.default_rng(8).normal(1.0, 2.0, (2, 4, 3)), jnp.float32)
    bn = jnn.BatchNorm(use_running_average=False, axis_name="devices")
    variables = bn.init(jax.random.key(0), x[0])

    def moments_on_device(x_local):
        return tools.with_batch_moments(bn.apply)(variables, x_local, mutable=["batch_stats"])[1]

    m = jax.vmap(moments_on_device, axis_name="devices")(x)
    flat = np.asarray(x).reshape(8, 3)
    np.testing.assert_allclose(m.count, np.full((2, 3), 8.0))
    np.testing.assert_allclose(m.mean, np.broadcast_to(flat.mean(0), (2, 3)), **TOL)
    np.testing.assert_allclose(m.m2 / 8, np.broadcast_to(flat.var(0), (2, 3)), **TOL)


def test_variant_layers_in_training_are_refused_not_silently_skipped():
    import flax.linen as nn

    from jaxnorm import variants_linen

    class Net(nn.Module):
        @nn.compact
        def __call__(self, x, train: bool):
            return variants_linen.BatchRenorm(use_running_average=not train)(x)

    x = jnp.ones((4, 3)) * jnp.arange(4.0)[:, None]
    variables = Net().init(jax.random.key(0), x, False)
    with pytest.raises(NotImplementedError, match="BatchRenorm"):
        tools.recompute_batch_stats(
            lambda v, x: Net().apply(v, x, True, mutable=["batch_stats"]), variables, [x]
        )


# ------------------------------------------------ what gradient accumulation makes exact


class DeepMLP(nn.Module):
    """Dense -> BN -> relu -> Dense -> BN -> relu -> Dense: a BN downstream of another."""

    bn: Any  # BatchNorm kwargs

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        for features in (6, 5):
            x = nn.Dense(features)(x)
            x = jnn.BatchNorm(use_running_average=not train, **self.bn)(x)
            x = nn.relu(x)
        return nn.Dense(3)(x)


def _deep_setup(bn):
    rng = np.random.default_rng(11)
    x = jnp.asarray(rng.normal(1.0, 2.0, (K * 6, 4)), jnp.float32)
    y = jnp.asarray(rng.integers(0, 3, K * 6))
    model = DeepMLP(bn=bn)
    variables = model.init(jax.random.key(3), x[:2], train=False)
    # Non-trivial running statistics to start from.
    stats = jax.tree.map(lambda a: a, variables["batch_stats"])
    for i, name in enumerate(("BatchNorm_0", "BatchNorm_1")):
        n = stats[name]["mean"].shape[0]
        stats[name]["mean"] = jnp.linspace(-1.0, 1.0, n) * (i + 1)
        stats[name]["var"] = jnp.linspace(0.5, 2.0, n)
    return model, {"params": variables["params"], "batch_stats": stats}, x, y


def _bn_inputs(model, variables, x) -> dict[str, np.ndarray]:
    """Each BatchNorm's input in one training-mode forward pass: the preceding Dense's output.

    Read with flax's capture_intermediates, independently of jaxnorm.tools' recorder.
    """
    _, state = model.apply(
        variables, x, train=True, mutable=["batch_stats", "intermediates"],
        capture_intermediates=lambda mdl, method: isinstance(mdl, nn.Dense),
    )  # fmt: skip
    inter = state["intermediates"]
    return {
        "BatchNorm_0": np.asarray(inter["Dense_0"]["__call__"][0], np.float64),
        "BatchNorm_1": np.asarray(inter["Dense_1"]["__call__"][0], np.float64),
    }


def _expected_update(old, inputs: np.ndarray, *, momentum: float, unbiased: bool):
    """One running-average update from the float64 statistics of ``inputs`` (by hand)."""
    var = inputs.var(0, ddof=1 if unbiased else 0)
    return (
        momentum * np.asarray(old["mean"], np.float64) + (1 - momentum) * inputs.mean(0),
        momentum * np.asarray(old["var"], np.float64) + (1 - momentum) * var,
    )


@pytest.mark.parametrize(
    "bn",
    [dict(momentum=0.8), jt.preset(torch.nn.BatchNorm1d(6, momentum=0.3))],
    ids=["flax_convention", "torch_preset"],
)
def test_accumulation_is_exact_for_the_pooled_inputs_not_for_a_deeper_full_batch_step(bn):
    model, variables, x, y = _deep_setup(bn)
    momentum, unbiased = bn["momentum"], bn.get("unbiased_running_var", False)
    params, stats0 = variables["params"], variables["batch_stats"]
    micro = (x.reshape(K, -1, 4), y.reshape(K, -1))
    loss_fn = _loss_fn(model)
    out = jax.jit(lambda p, s, mb: tools.accumulate_gradients(loss_fn, p, s, mb))(
        params, stats0, micro
    )

    # (a) What holds exactly: one update from the pooled moments of what each layer saw
    # over the K microbatch forward passes (float64 NumPy on the recorded inputs).
    seen = [_bn_inputs(model, variables, micro[0][i]) for i in range(K)]
    for name in ("BatchNorm_0", "BatchNorm_1"):
        pooled = np.concatenate([s[name] for s in seen])
        mean, var = _expected_update(stats0[name], pooled, momentum=momentum, unbiased=unbiased)
        np.testing.assert_allclose(out.batch_stats[name]["mean"], mean, **TOL)
        np.testing.assert_allclose(out.batch_stats[name]["var"], var, **TOL)

    # (b) One training step on the concatenated batch: the first BN (nothing normalized
    # upstream) sees the same values and agrees; the second sees inputs normalized with
    # full-batch rather than microbatch statistics, and does not.
    full_inputs = _bn_inputs(model, variables, x)
    np.testing.assert_allclose(
        np.concatenate([s["BatchNorm_0"] for s in seen]), full_inputs["BatchNorm_0"], **TOL
    )
    _, full = model.apply(variables, x, train=True, mutable=["batch_stats"])
    acc_stats, full_stats = out.batch_stats, full["batch_stats"]
    chex.assert_trees_all_close(acc_stats["BatchNorm_0"], full_stats["BatchNorm_0"], **TOL)
    for field in ("mean", "var"):
        gap = np.abs(acc_stats["BatchNorm_1"][field] - full_stats["BatchNorm_1"][field])
        assert gap.max() > 1e-3, (field, gap)
    mean, var = _expected_update(
        stats0["BatchNorm_1"], full_inputs["BatchNorm_1"], momentum=momentum, unbiased=unbiased
    )
    np.testing.assert_allclose(full_stats["BatchNorm_1"]["mean"], mean, **TOL)
    np.testing.assert_allclose(full_stats["BatchNorm_1"]["var"], var, **TOL)

    # Gradients are those of K separately normalized microbatches, not of the big batch.
    full_grads = jax.grad(loss_fn)(params, stats0, (x, y))
    for layer in ("Dense_0", "Dense_1", "Dense_2"):
        gap = np.abs(out.grads[layer]["kernel"] - full_grads[layer]["kernel"]).max()
        assert gap > 1e-3 * np.abs(full_grads[layer]["kernel"]).max(), (layer, gap)


def test_accumulate_gradients_under_x64_accumulates_in_float64():
    """The scan carry takes the microbatch's dtypes (it was float32: a carry type error)."""
    rng = np.random.default_rng(12)
    x = rng.normal(1e3, 1.0, (K * 5, 3))  # float64, a large mean
    with jax.enable_x64(True):
        bn = jnn.BatchNorm(use_running_average=False, momentum=0.5, param_dtype=jnp.float64)
        variables = bn.init(jax.random.key(0), jnp.asarray(x[:2]))

        def loss_fn(params, batch_stats, mb):
            y, _ = bn.apply(
                {"params": params, "batch_stats": batch_stats}, mb, mutable=["batch_stats"]
            )
            return (y**2 * jnp.arange(3.0)).mean()

        step = jax.jit(lambda p, s, mb: tools.accumulate_gradients(loss_fn, p, s, mb))
        out = step(variables["params"], variables["batch_stats"], jnp.asarray(x).reshape(K, 5, 3))
        assert out.loss.dtype == jnp.float64
        assert jax.tree.map(lambda a: a.dtype, out.batch_stats) == jax.tree.map(
            lambda a: a.dtype, variables["batch_stats"]
        )
        stats = variables["batch_stats"]
        rtol = 1e-10 if stats["mean"].dtype == jnp.float64 else 1e-6
        np.testing.assert_allclose(
            out.batch_stats["mean"], 0.5 * np.asarray(stats["mean"]) + 0.5 * x.mean(0), rtol=rtol
        )
        np.testing.assert_allclose(
            out.batch_stats["var"], 0.5 * np.asarray(stats["var"]) + 0.5 * x.var(0), rtol=rtol
        )


def test_accumulate_moments_signature_is_only_its_arguments():
    import inspect

    assert list(inspect.signature(tools.accumulate_moments).parameters) == ["acc", "new"]
