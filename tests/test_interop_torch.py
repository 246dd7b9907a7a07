"""torch <-> jaxnorm/Flax conversion (jaxnorm.interop.torch).

The main check is behavioural: a small torch CNN is trained in torch, converted,
and the equivalent Flax model (NHWC, jaxnorm.linen.BatchNorm with the torch preset)
must give the same outputs, and keep giving them -- outputs, parameters and running
statistics -- through three more SGD steps taken independently on each side.

Tolerance 1e-5 (abs and rel), float32 throughout: torch and XLA sum the convolutions
in different orders (~1e-7 relative per op); six SGD steps of lr 0.1 on a
10-class cross-entropy do not amplify that past ~1e-6 here.
"""

from __future__ import annotations

from typing import Any

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch

import jaxnorm.linen as jnn
from jaxnorm.interop import torch as jt

TOL = dict(atol=1e-5, rtol=1e-5)
LR = 0.1


def _n(t: torch.Tensor) -> np.ndarray:
    return t.detach().numpy()


def _nhwc(x: torch.Tensor) -> jax.Array:
    return jnp.asarray(_n(x).transpose(0, 2, 3, 1))


def torch_cnn(momentum: float | None) -> torch.nn.Sequential:
    torch.manual_seed(0)
    nn_ = torch.nn
    return nn_.Sequential(
        nn_.Conv2d(3, 8, 3, padding=1),
        nn_.BatchNorm2d(8, momentum=momentum),
        nn_.ReLU(),
        nn_.Conv2d(8, 16, 3, padding=1),
        nn_.BatchNorm2d(16, momentum=momentum),
        nn_.ReLU(),
        nn_.AdaptiveAvgPool2d(1),
        nn_.Flatten(),
        nn_.Linear(16, 10),
    )


class FlaxCNN(nn.Module):
    """The torch CNN in NHWC: Conv -> BN -> ReLU, twice, global mean pool, Dense."""

    bn: Any  # jaxnorm.linen.BatchNorm kwargs, e.g. jt.preset(torch_layer)

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        for features in (8, 16):
            x = nn.Conv(features, (3, 3), padding=1)(x)
            x = jnn.BatchNorm(use_running_average=not train, **self.bn)(x)
            x = nn.relu(x)
        return nn.Dense(10)(x.mean(axis=(1, 2)))


def _shapes(model: nn.Module, *args: Any, **kwargs: Any) -> Any:
    """The variables' shapes and dtypes, without running Flax's initializers (slow on CPU)."""
    return jax.eval_shape(lambda: model.init(jax.random.key(0), *args, **kwargs))


def _data(seed: int = 0, steps: int = 6, batch: int = 8):
    g = torch.Generator().manual_seed(seed)
    xs = [torch.randn(batch, 3, 6, 6, generator=g) * 2.0 + 0.5 for _ in range(steps)]
    ys = [torch.randint(0, 10, (batch,), generator=g) for _ in range(steps)]
    return xs, ys


def _torch_train(model: torch.nn.Module, xs, ys) -> None:
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    model.train()
    for x, y in zip(xs, ys, strict=True):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()


def _flax_train(model: FlaxCNN, variables, xs, ys):
    tx = optax.sgd(LR)

    @jax.jit
    def step(params, batch_stats, opt_state, x, y):
        def loss_fn(p):
            logits, updates = model.apply(
                {"params": p, "batch_stats": batch_stats}, x, train=True, mutable=["batch_stats"]
            )
            loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
            return loss, updates["batch_stats"]

        (_, new_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), new_stats, opt_state

    params, batch_stats = variables["params"], variables["batch_stats"]
    opt_state = tx.init(params)
    for x, y in zip(xs, ys, strict=True):
        params, batch_stats, opt_state = step(
            params, batch_stats, opt_state, _nhwc(x), jnp.asarray(_n(y))
        )
    return {"params": params, "batch_stats": batch_stats}


@pytest.mark.parametrize("torch_momentum", [0.1, None], ids=["momentum", "cumulative"])
def test_trained_cnn_matches_torch_through_more_training(torch_momentum):
    xs, ys = _data()
    tm = torch_cnn(torch_momentum)
    _torch_train(tm, xs[:3], ys[:3])

    bn_kwargs = jt.preset(tm[1])
    assert bn_kwargs == jt.preset(tm[4])
    model = FlaxCNN(bn=bn_kwargs)
    like = _shapes(model, _nhwc(xs[0]), train=False)
    variables = jt.from_torch(tm, mapping="compact", like=like)
    # count exists exactly for the cumulative average, as num_batches_tracked.
    assert ("count" in variables["batch_stats"]["BatchNorm_0"]) == (torch_momentum is None)

    x_eval = torch.randn(5, 3, 6, 6, generator=torch.Generator().manual_seed(9))
    tm.eval()
    evaluate = jax.jit(lambda v, x: model.apply(v, x, train=False))
    chex.assert_trees_all_close(evaluate(variables, _nhwc(x_eval)), _n(tm(x_eval)), **TOL)

    # Three more steps, independently on each side, same batches and optimizer.
    _torch_train(tm, xs[3:], ys[3:])
    variables = _flax_train(model, variables, xs[3:], ys[3:])
    tm.eval()
    chex.assert_trees_all_close(evaluate(variables, _nhwc(x_eval)), _n(tm(x_eval)), **TOL)
    # Every parameter, running statistic and counter, compared in torch's layout.
    back = jt.to_torch(variables, "compact", template=tm)
    expected = tm.state_dict()
    assert list(back) == list(expected)
    for key, value in expected.items():
        assert back[key].dtype == value.dtype, key
        np.testing.assert_allclose(_n(back[key]), _n(value), err_msg=key, **TOL)
    if torch_momentum is None:
        assert int(back["1.num_batches_tracked"]) == 6

    # And back into a fresh torch model, strictly.
    tm2 = torch_cnn(torch_momentum)
    tm2.load_state_dict(back, strict=True)
    tm2.eval()
    np.testing.assert_allclose(_n(tm2(x_eval)), _n(tm(x_eval)), **TOL)


def test_state_dict_and_explicit_mapping_agree_with_module_source():
    tm = torch_cnn(0.1)
    mapping = {"0": "Conv_0", "1": "BatchNorm_0", "3": "Conv_1", "4": "BatchNorm_1", "8": "Dense_0"}
    assert jt.compact_mapping(tm) == mapping
    a = jt.from_torch(tm, mapping)
    b = jt.from_torch(tm.state_dict(), "compact")
    chex.assert_trees_all_equal(a, b)
    # Layout: OIHW -> HWIO and (out, in) -> (in, out).
    np.testing.assert_array_equal(
        a["params"]["Conv_1"]["kernel"], _n(tm[3].weight).transpose(2, 3, 1, 0)
    )
    np.testing.assert_array_equal(a["params"]["Dense_0"]["kernel"], _n(tm[8].weight).T)
    # kinds= resolves what a bare state_dict cannot show: a 2-D LayerNorm weight is no Linear.
    ln = torch.nn.LayerNorm((3, 4))
    with torch.no_grad():
        ln.weight.copy_(torch.arange(12.0).reshape(3, 4))
    v = jt.from_torch(
        {f"ln.{k}": t for k, t in ln.state_dict().items()}, kinds={"ln": "layer_norm"}
    )
    np.testing.assert_array_equal(v["params"]["ln"]["scale"], _n(ln.weight))
    assert jt.to_torch(v, kinds={"ln": "layer_norm"})["ln.weight"].shape == (3, 4)
    # Without a template the inverse still gives a strict-loadable state_dict.
    back = jt.to_torch(a, mapping)
    tm2 = torch_cnn(0.1)
    tm2.load_state_dict(back, strict=True)
    for key, value in tm.state_dict().items():
        np.testing.assert_array_equal(_n(tm2.state_dict()[key]), _n(value), err_msg=key)


class TorchNorms(torch.nn.Module):
    """Linear -> LayerNorm -> GroupNorm -> RMSNorm -> BatchNorm1d, torch defaults mostly."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(6, 8)
        self.ln = torch.nn.LayerNorm(8)
        self.gn = torch.nn.GroupNorm(2, 8, eps=1e-4)
        self.rms = torch.nn.RMSNorm(8)  # eps=None: finfo(float32).eps
        self.bn = torch.nn.BatchNorm1d(8, momentum=0.3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.rms(self.gn(self.ln(self.fc(x)))))


class FlaxNorms(nn.Module):
    """setup-style twin of TorchNorms: the same attribute names, so mapping=None."""

    presets: Any  # {name: preset kwargs}

    def setup(self) -> None:
        self.fc = nn.Dense(8)
        self.ln = jnn.LayerNorm(**self.presets["ln"])
        self.gn = jnn.GroupNorm(**self.presets["gn"])
        self.rms = jnn.RMSNorm(**self.presets["rms"])
        self.bn = jnn.BatchNorm(use_running_average=True, **self.presets["bn"])

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.bn(self.rms(self.gn(self.ln(self.fc(x)))))


def test_layer_group_rms_norms_by_name_round_trip():
    torch.manual_seed(1)
    tm = TorchNorms()
    with torch.no_grad():
        for tensor in tm.state_dict().values():
            if tensor.is_floating_point():
                tensor.copy_(torch.rand_like(tensor) + 0.5)  # positive: valid running var
    tm.eval()
    presets = {name: jt.preset(getattr(tm, name)) for name in ("ln", "gn", "rms", "bn")}
    assert presets["rms"]["epsilon"] == float(torch.finfo(torch.float32).eps)
    assert presets["gn"] == {"num_groups": 2, "epsilon": 1e-4}
    model = FlaxNorms(presets=presets)
    x = torch.randn(4, 6, generator=torch.Generator().manual_seed(3))
    like = _shapes(model, jnp.asarray(_n(x)))
    variables = jt.from_torch(tm, like=like)  # mapping=None: names kept
    chex.assert_trees_all_close(model.apply(variables, jnp.asarray(_n(x))), _n(tm(x)), **TOL)

    back = jt.to_torch(variables, template=tm)
    tm2 = TorchNorms()
    tm2.load_state_dict(back, strict=True)
    for key, value in tm.state_dict().items():
        np.testing.assert_array_equal(_n(tm2.state_dict()[key]), _n(value), err_msg=key)


def test_preset_conventions():
    assert jt.preset(torch.nn.BatchNorm2d(4, momentum=0.25, eps=1e-3)) == {
        "momentum": 0.75,
        "epsilon": 1e-3,
        "unbiased_running_var": True,
    }
    cumulative = jt.preset(
        torch.nn.BatchNorm1d(4, momentum=None, affine=False), channels_last=False
    )
    assert cumulative == {
        "momentum": None,
        "epsilon": 1e-5,
        "unbiased_running_var": True,
        "axis": 1,
        "use_scale": False,
        "use_bias": False,
    }
    ln2d = jt.preset(torch.nn.LayerNorm((3, 4), bias=False))
    assert ln2d["reduction_axes"] == ln2d["feature_axes"] == (-2, -1)
    assert ln2d["use_bias"] is False and ln2d["use_scale"] is True
    with pytest.raises(TypeError, match="expected a torch normalization layer"):
        jt.preset(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="track_running_stats=False"):
        jt.preset(torch.nn.BatchNorm2d(4, track_running_stats=False))


def test_errors_teach():
    with pytest.raises(TypeError, match=r"'1' is a torch.nn.*Embedding.*no Flax counterpart"):
        jt.from_torch(torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.Embedding(5, 3)))
    with pytest.raises(TypeError, match=r"'attn'.*in_proj_weight"):
        jt.from_torch({"attn.in_proj_weight": torch.zeros(6, 2)})
    tm = torch_cnn(0.1)
    with pytest.raises(ValueError, match=r"no entry for the torch layers \['3', '4', '8'\]"):
        jt.from_torch(tm, {"0": "Conv_0", "1": "BatchNorm_0"})
    with pytest.raises(ValueError, match="both '0' and '3'"):
        jt.from_torch(tm, {"0": "Conv_0", "1": "BN_0", "3": "Conv_0", "4": "BN_1", "8": "D"})
    with pytest.raises(ValueError, match="mapping='compact' needs each layer's class"):
        jt.from_torch({"ln.weight": torch.ones(4), "ln.bias": torch.zeros(4)}, "compact")

    model = FlaxCNN(bn=jt.preset(tm[1]))
    like = _shapes(model, jnp.zeros((1, 6, 6, 3)), train=False)
    like["params"]["Conv_1"]["kernel"] = jax.ShapeDtypeStruct((3, 3, 8, 32), jnp.float32)
    with pytest.raises(ValueError, match=r"'3.weight' \(conv\) became 'params/Conv_1/kernel'"):
        jt.from_torch(tm, "compact", like=like)

    variables = jt.from_torch(tm, "compact")
    variables["params"]["Dense_0"]["kernel"] = jnp.zeros((16, 7))
    with pytest.raises(ValueError, match=r"'8.weight' \(linear\) converts to shape \(7, 16\)"):
        jt.to_torch(variables, "compact", template=tm)
    with pytest.raises(ValueError, match="needs the torch layer order"):
        jt.to_torch(variables, "compact")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_preset_rmsnorm_default_eps_is_what_torch_uses(dtype):
    layer = torch.nn.RMSNorm(4).to(dtype)
    eps = jt.preset(layer)["epsilon"]
    # torch computes half-precision RMSNorm in float32, with float32's eps.
    x = torch.tensor([[1e-3, -1e-3, 2e-3, 0.0]], dtype=torch.float64)
    y = layer(x.to(dtype)).detach().double()
    ref = x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps)
    tol = 1e-12 if dtype == torch.float64 else 1e-2
    assert float((y - ref).abs().max()) < tol


# ------------------------------------------------------------------ complete layers only

_nn = torch.nn
# Every configuration of each kind, as torch builds it: their state_dict key sets are
# the reference for what a complete layer holds.
TORCH_CONFIGS = {
    "conv": [_nn.Conv2d(2, 3, 3), _nn.Conv1d(2, 3, 3, bias=False), _nn.Conv3d(2, 3, 1)],
    "linear": [_nn.Linear(2, 3), _nn.Linear(2, 3, bias=False)],
    "batch_norm": [
        _nn.BatchNorm1d(3),
        _nn.BatchNorm2d(3, affine=False),
        _nn.BatchNorm3d(3, track_running_stats=False),
        _nn.BatchNorm2d(3, momentum=None),
        _nn.SyncBatchNorm(3),
    ],
    "layer_norm": [
        _nn.LayerNorm(3),
        _nn.LayerNorm(3, bias=False),
        _nn.LayerNorm(3, elementwise_affine=False),
    ],
    "group_norm": [_nn.GroupNorm(1, 3), _nn.GroupNorm(1, 3, affine=False)],
    "rms_norm": [_nn.RMSNorm(3), _nn.RMSNorm(3, elementwise_affine=False)],
    "instance_norm": [_nn.InstanceNorm2d(3, affine=True), _nn.InstanceNorm1d(3)],
}
COMPLETE_SETS = {
    kind: {frozenset(m.state_dict()) for m in modules} for kind, modules in TORCH_CONFIGS.items()
}
# torch < 0.4.1 wrote no num_batches_tracked, and torch still loads such state_dicts.
COMPLETE_SETS["batch_norm"] |= {s - {"num_batches_tracked"} for s in COMPLETE_SETS["batch_norm"]}

DELETIONS = [
    (kind, i, key)
    for kind, modules in TORCH_CONFIGS.items()
    for i, module in enumerate(modules)
    for key in module.state_dict()
]


# A bare state_dict shows a conv/Linear by its weight's rank and a batch norm by its
# running statistics; any other 1-D weight/bias pair reads as "a norm", complete when
# it is what some torch norm writes.
_STATS = {"running_mean", "running_var", "num_batches_tracked"}
NORM_SETS = {s for sets in COMPLETE_SETS.values() for s in sets if s and s <= {"weight", "bias"}}


@pytest.mark.parametrize(
    "kind, index, key", DELETIONS, ids=[f"{k}{i}-{key}" for k, i, key in DELETIONS]
)
@pytest.mark.parametrize("with_kinds", [True, False], ids=["kinds", "inferred"])
def test_a_layer_missing_a_tensor_is_refused_naming_it(kind, index, key, with_kinds):
    """Delete each tensor of each real torch layer: convert only what torch itself writes."""
    state = {f"net.layer.{k}": v for k, v in TORCH_CONFIGS[kind][index].state_dict().items()}
    del state[f"net.layer.{key}"]
    left = frozenset(k.rpartition(".")[2] for k in state)
    if not left:  # torch's layer without tensors (e.g. elementwise_affine=False): nothing
        assert jax.tree.leaves(jt.from_torch(state)) == []
        return
    kinds = {"net.layer": kind} if with_kinds else None
    if with_kinds or kind in ("conv", "linear") or left & _STATS:
        complete = COMPLETE_SETS[kind]
    else:
        complete = NORM_SETS
    if left in complete:  # what torch writes for another configuration of the layer
        variables = jt.from_torch(state, kinds=kinds, with_count=True)
        count_added = "running_mean" in left and "num_batches_tracked" not in left
        assert len(jax.tree.leaves(variables)) == len(left) + count_added
        return
    with pytest.raises(ValueError, match="is incomplete") as info:
        jt.from_torch(state, kinds=kinds)
    assert f"'net.layer.{key}'" in str(info.value), str(info.value)


def test_batch_norm_without_running_var_is_refused_also_with_like():
    """The audit's case: it converted, then evaluated without a variance."""
    tm = torch_cnn(0.1)
    state = tm.state_dict()
    del state["4.running_var"]
    with pytest.raises(
        ValueError,
        match=r"'4' \(a 'batch_norm' layer\) is incomplete: \['4.running_var'\] is missing",
    ):
        jt.from_torch(state, "compact")
    like = _shapes(FlaxCNN(bn=jt.preset(tm[1])), jnp.zeros((1, 6, 6, 3)), train=False)
    with pytest.raises(ValueError, match=r"\['4.running_var'\] is missing") as info:
        jt.from_torch(state, "compact", like=like)
    assert "mapping" not in str(info.value)


def test_with_like_a_variable_torch_lacks_names_the_torch_key():
    """Complete torch layers without a bias or statistics vs. Flax layers with them."""

    class Twin(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = nn.Dense(4)(x)
            x = jnn.LayerNorm()(x)  # use_bias=True; torch's LayerNorm(4, bias=False) has none
            return jnn.BatchNorm(use_running_average=True)(x)

    tm = torch.nn.Sequential(
        torch.nn.Linear(3, 4), torch.nn.LayerNorm(4, bias=False), torch.nn.BatchNorm1d(4)
    )
    like = _shapes(Twin(), jnp.zeros((1, 3)))
    with pytest.raises(
        ValueError, match="'params/LayerNorm_0/bias', which comes from torch '1.bias'"
    ) as info:
        jt.from_torch(tm, "compact", like=like)
    assert "use_bias=False" in str(info.value) and "mapping" not in str(info.value)

    untracked = torch.nn.Sequential(torch.nn.BatchNorm1d(4, track_running_stats=False))
    like = _shapes(jnn.BatchNorm(use_running_average=True), jnp.zeros((1, 4)))
    with pytest.raises(
        ValueError, match="'batch_stats/mean', which comes from torch 'running_mean'"
    ):
        jt.from_torch(untracked[0], like=like)


def test_rms_norm_with_a_bias_is_refused():
    state = {"rms.weight": torch.ones(3), "rms.bias": torch.zeros(3)}
    with pytest.raises(TypeError, match=r"holds tensors \['bias'\] that a 'rms_norm' layer"):
        jt.from_torch(state, kinds={"rms": "rms_norm"})


def test_to_torch_refuses_a_flax_layer_torch_cannot_hold_and_round_trips_untracked_bn():
    variables = {
        "params": {"bn": {"scale": jnp.ones(3)}},  # use_bias=False: torch's affine has both
        "batch_stats": {"bn": {"mean": jnp.zeros(3), "var": jnp.ones(3)}},
    }
    with pytest.raises(
        ValueError, match=r"'bn' converts to an incomplete torch layer 'bn'.*\['bn.bias'\]"
    ):
        jt.to_torch(variables)
    # BatchNorm(track_running_stats=False) holds only weight and bias, and so does its inverse.
    tm = torch.nn.Sequential(torch.nn.BatchNorm1d(3, track_running_stats=False))
    with torch.no_grad():
        tm[0].weight.copy_(torch.tensor([1.0, 2.0, 3.0]))
    back = jt.to_torch(jt.from_torch(tm), template=tm)
    assert sorted(back) == ["0.bias", "0.weight"]
    fresh = torch.nn.Sequential(torch.nn.BatchNorm1d(3, track_running_stats=False))
    fresh.load_state_dict(back, strict=True)
    np.testing.assert_array_equal(_n(fresh[0].weight), [1.0, 2.0, 3.0])


# ------------------------------------------- weight_norm / spectral_norm (jaxnorm #14)

_P = torch.nn.utils.parametrizations


def _wn_sn_torch(api: str = "parametrizations", dim: int | None = 0) -> torch.nn.Sequential:
    """spectral_norm(Conv2d) -> ReLU -> Flatten -> weight_norm(Linear), seeded, g off ||v||."""
    torch.manual_seed(0)
    if api == "parametrizations":
        sn, wn = _P.spectral_norm, _P.weight_norm
    else:
        sn, wn = torch.nn.utils.spectral_norm, torch.nn.utils.weight_norm
    with pytest.warns(FutureWarning) if api == "hooks" else _no_warning():
        tm = torch.nn.Sequential(
            sn(torch.nn.Conv2d(3, 4, 3, padding=1), n_power_iterations=2),
            torch.nn.ReLU(),
            torch.nn.Flatten(),
            wn(torch.nn.Linear(4 * 5 * 5, 6), dim=dim),
        )
    g = tm[3].parametrizations.weight.original0 if api == "parametrizations" else tm[3].weight_g
    with torch.no_grad():
        g.mul_(3.0)
    return tm


class _no_warning:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


class FlaxWnSn(nn.Module):
    """The torch model above in NHWC, compact: Conv_0 in SpectralNorm_0, Dense_0 in
    WeightNorm_0; flattened as torch does (C, H, W)."""

    sn: Any  # jt.preset(torch layer) kwargs
    wn: Any

    @nn.compact
    def __call__(self, x: jax.Array, *, update_stats: bool = False) -> jax.Array:
        x = jnn.SpectralNorm(nn.Conv(4, (3, 3), padding=1), **self.sn)(x, update_stats=update_stats)
        x = nn.relu(x).transpose(0, 3, 1, 2).reshape(x.shape[0], -1)
        return jnn.WeightNorm(nn.Dense(6), **self.wn)(x)


def _x_wn(seed: int = 5) -> torch.Tensor:
    return torch.randn(2, 3, 5, 5, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("api", ["parametrizations", "hooks"])
@pytest.mark.parametrize("dim", [0, None])
def test_weight_and_spectral_norm_layers_give_torch_eval_outputs_and_round_trip(api, dim):
    tm = _wn_sn_torch(api, dim).eval()
    presets = dict(sn=jt.preset(tm[0]), wn=jt.preset(tm[3]))
    assert presets["sn"] == {"use_stored_sigma": True, "n_steps": 2, "epsilon": 1e-12}
    assert presets["wn"] == {"feature_axes": -1 if dim == 0 else None, "epsilon": 0.0}
    model = FlaxWnSn(**presets)
    x = _x_wn()
    like = _shapes(model, _nhwc(x))
    variables = jt.from_torch(tm, "compact", like=like)
    chex.assert_trees_all_equal(variables, jt.from_torch(tm.state_dict(), "compact"))
    chex.assert_trees_all_close(model.apply(variables, _nhwc(x)), _n(tm(x)), **TOL)
    # The jaxnorm variables go back into a fresh torch model, strictly, in its key style.
    back = jt.to_torch(variables, "compact", template=tm)
    assert sorted(back) == sorted(tm.state_dict())
    tm2 = _wn_sn_torch(api, dim)
    tm2.load_state_dict(back, strict=True)
    tm2.eval()
    for key, value in tm.state_dict().items():
        if key == "0.weight_v":  # the hooks' v is a half-step behind u: not recoverable
            w = _n(tm[0].weight_orig).astype(np.float64).reshape(4, -1)
            ref = w.T @ _n(tm[0].weight_u).astype(np.float64)
            np.testing.assert_allclose(_n(back[key]), ref / np.linalg.norm(ref), atol=1e-6)
            continue
        np.testing.assert_allclose(_n(tm2.state_dict()[key]), _n(value), atol=1e-6, err_msg=key)
    if api == "parametrizations":  # _v = normalize(W^T _u): what torch holds after a step
        np.testing.assert_allclose(_n(tm2(x)), _n(tm(x)), **TOL)


@pytest.mark.parametrize("api", ["parametrizations", "hooks"])
def test_spectral_norm_training_step_continues_torchs_power_iteration(api):
    """From torch's state our training step's new u is the one torch's training forward
    computes. The deprecated hooks iterate as flax (v, then u; sigma = u.Wv): the same
    sigma and output. torch's parametrization starts from _v (u, then v): its sigma is
    u_new.W v_new, ours u_new.W v_ours with v_ours one half-step earlier."""
    tm = _wn_sn_torch(api)
    hooks = api == "hooks"
    w_t = tm[0].weight_orig if hooks else tm[0].parametrizations.weight.original
    u_old = (tm[0].weight_u if hooks else tm[0].parametrizations.weight[0]._u).clone()
    model = FlaxWnSn(sn=jt.preset(tm[0]), wn=jt.preset(tm[3]))
    variables = jt.from_torch(tm, "compact")
    x = _x_wn()
    y, updates = model.apply(variables, _nhwc(x), update_stats=True, mutable=["batch_stats"])
    tm.train()
    y_torch = tm(x)  # n_power_iterations=2 steps
    u_new = tm[0].weight_u if hooks else tm[0].parametrizations.weight[0]._u
    ours = updates["batch_stats"]["SpectralNorm_0"]
    np.testing.assert_allclose(ours["Conv_0/kernel/u"][0], _n(u_new), atol=1e-6)
    w = _n(w_t).astype(np.float64).reshape(4, -1)
    if hooks:
        v_new = _n(tm[0].weight_v).astype(np.float64)
        np.testing.assert_allclose(ours["Conv_0/kernel/sigma"], _n(u_new) @ w @ v_new, rtol=1e-5)
        np.testing.assert_allclose(y, _n(y_torch), **TOL)
        return
    # Ours from u_old: v1 = N(W^T u_old) (torch's _v), u1, v2, u2 = torch's new _u.
    v_ours = w.T @ (w @ (w.T @ _n(u_old).astype(np.float64)))  # v2, unnormalized
    v_ours /= np.linalg.norm(v_ours)
    sigma = _n(u_new).astype(np.float64) @ w @ v_ours
    np.testing.assert_allclose(ours["Conv_0/kernel/sigma"], sigma, rtol=1e-5)


def test_weight_and_spectral_norm_setup_style_names_and_nnx():
    """mapping=None: torch's 'fc' is a setup-style wrapper 'fc' holding fc/layer_instance;
    and the same values drive the NNX wrappers."""

    class TorchNet(torch.nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(2)
            self.fc = _P.weight_norm(torch.nn.Linear(5, 4))
            self.out = _P.spectral_norm(torch.nn.Linear(4, 3))

        def forward(self, x):
            return self.out(torch.tanh(self.fc(x)))

    class FlaxNet(nn.Module):
        presets: Any

        def setup(self):
            self.fc = jnn.WeightNorm(nn.Dense(4), **self.presets["fc"])
            self.out = jnn.SpectralNorm(nn.Dense(3), **self.presets["out"])

        def __call__(self, x):
            return self.out(jnp.tanh(self.fc(x)), update_stats=False)

    tm = TorchNet().eval()
    presets = {"fc": jt.preset(tm.fc), "out": jt.preset(tm.out)}
    model = FlaxNet(presets=presets)
    x = torch.randn(3, 5, generator=torch.Generator().manual_seed(4))
    variables = jt.from_torch(tm, like=_shapes(model, jnp.asarray(_n(x))))
    assert sorted(variables["params"]["fc"]) == ["layer_instance", "layer_instance/kernel/scale"]
    chex.assert_trees_all_close(model.apply(variables, jnp.asarray(_n(x))), _n(tm(x)), **TOL)
    tm2 = TorchNet()
    tm2.load_state_dict(jt.to_torch(variables), strict=True)  # names alone give torch's keys
    np.testing.assert_allclose(_n(tm2.eval()(x)), _n(tm(x)), **TOL)

    from flax import nnx

    import jaxnorm.nnx as jnnx

    fc = jnnx.WeightNorm(nnx.Linear(5, 4, rngs=nnx.Rngs(0)), **presets["fc"], rngs=nnx.Rngs(0))
    out = jnnx.SpectralNorm(
        nnx.Linear(4, 3, rngs=nnx.Rngs(0)), **presets["out"], update_stats=False, rngs=nnx.Rngs(0)
    )
    for wrapper, name in ((fc, "fc"), (out, "out")):
        params = variables["params"][name]["layer_instance"]
        wrapper.layer_instance.kernel[...] = params["kernel"]
        wrapper.layer_instance.bias[...] = params["bias"]
    fc.scales[("kernel",)][...] = variables["params"]["fc"]["layer_instance/kernel/scale"]
    stats = variables["batch_stats"]["out"]
    out.batch_stats[("kernel", "u")][...] = stats["layer_instance/kernel/u"]
    out.batch_stats[("kernel", "sigma")][...] = stats["layer_instance/kernel/sigma"]
    y = out(jnp.tanh(fc(jnp.asarray(_n(x)))))
    np.testing.assert_allclose(np.asarray(y), _n(tm(x)), **TOL)


def test_weight_and_spectral_norm_conversion_errors_teach():
    lin = _P.orthogonal(torch.nn.Linear(3, 3))
    with pytest.raises(TypeError, match="parametrization other than a single weight_norm"):
        jt.from_torch(torch.nn.Sequential(lin))
    with pytest.raises(ValueError, match=r"spectral_norm over dim=1.*Use dim=0"):
        jt.from_torch(torch.nn.Sequential(_P.spectral_norm(torch.nn.Linear(3, 4), dim=1)))
    tm = _wn_sn_torch()
    with pytest.raises(ValueError, match=r"wrappers=\{'0': 'path/to/SpectralNorm_0'\}"):
        jt.from_torch(tm, {"0": "Conv_0", "3": "Dense_0"})
    v = jt.from_torch(tm, {"0": "Conv_0", "3": "Dense_0"}, wrappers={"0": "SN", "3": "WN"})
    assert set(v["batch_stats"]["SN"]) == {"Conv_0/kernel/u", "Conv_0/kernel/sigma"}
    assert set(v["params"]["WN"]) == {"Dense_0/kernel/scale"}
    incomplete = {k: t for k, t in tm.state_dict().items() if not k.endswith("_v")}
    with pytest.raises(ValueError, match=r"'0' holds .* not a complete weight_norm"):
        jt.from_torch(incomplete)
    v["params"]["WN"]["Dense_0/bias/scale"] = jnp.ones(6)  # variable_filter=None
    with pytest.raises(TypeError, match="reparametrize only a layer's weight"):
        jt.to_torch(v, {"0": "Conv_0", "3": "Dense_0"})
