"""Reading torch layers for :mod:`jaxnorm.interop.torch`: kinds, completeness, mappings.

The half of the torch bridge that looks only at torch: which layers of a module or
``state_dict`` own tensors, what kind each is (:data:`KINDS`), whether it holds what
torch's own ``state_dict`` holds for that kind, and which Flax path each goes to
(``mapping``). Plus the small nested-dict helpers both directions share.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

from jaxnorm.interop._torch_weights import split_parametrizations

#: The layer kinds :func:`~jaxnorm.interop.torch.from_torch`, ``to_torch`` and ``compact_mapping``
#: understand, as accepted by their ``kinds={torch_prefix: kind}`` overrides: ``"conv"``
#: (``Conv1d/2d/3d``), ``"linear"`` (``Linear``), ``"batch_norm"`` (``BatchNorm1d/2d/3d``,
#: ``SyncBatchNorm``), ``"layer_norm"``, ``"group_norm"``, ``"rms_norm"`` and
#: ``"instance_norm"`` (``InstanceNorm1d/2d/3d``). The tensors each kind holds are listed
#: in the docstring of :mod:`jaxnorm.interop.torch`.
KINDS = (
    "conv",
    "linear",
    "batch_norm",
    "layer_norm",
    "group_norm",
    "rms_norm",
    "instance_norm",
)
_NORM_KINDS = ("batch_norm", "layer_norm", "group_norm", "rms_norm", "instance_norm")
# "norm": a 1-D weight/bias pair read from a bare state_dict (LayerNorm, GroupNorm,
# RMSNorm and InstanceNorm look alike there); it converts like them.
_GENERIC_NORM = "norm"
_FLAX_CLASS = {
    "conv": "Conv",
    "linear": "Dense",
    "batch_norm": "BatchNorm",
    "layer_norm": "LayerNorm",
    "group_norm": "GroupNorm",
    "rms_norm": "RMSNorm",
    "instance_norm": "InstanceNorm",
}
_TORCH_NAMES = {
    "conv": ("weight", "bias"),
    "linear": ("weight", "bias"),
    "batch_norm": ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"),
    "rms_norm": ("weight",),
}
# What a complete layer of each kind holds, as torch's state_dict has it: if a layer
# holds any of `present`, it must hold all of `needs` (see the module docstring).
_AFFINE = "affine=True stores weight and bias together"
_COMPLETE: dict[str, tuple[tuple[tuple[str, ...], tuple[str, ...], str], ...]] = {
    "conv": ((("bias",), ("weight",), "a conv always has a weight; bias=False drops the bias"),),
    "linear": (
        (("bias",), ("weight",), "a Linear always has a weight; bias=False drops the bias"),
    ),
    "batch_norm": (
        (("weight", "bias"), ("weight", "bias"), _AFFINE),
        (
            ("running_mean", "running_var", "num_batches_tracked"),
            ("running_mean", "running_var"),
            "track_running_stats=True stores running_mean and running_var together (and "
            "num_batches_tracked, which only state_dicts older than torch 0.4.1 lack)",
        ),
    ),
    "layer_norm": (
        (
            ("bias",),
            ("weight",),
            "a LayerNorm's bias comes with its weight (bias=False drops "
            "only the bias, elementwise_affine=False both)",
        ),
    ),
    "group_norm": ((("weight", "bias"), ("weight", "bias"), _AFFINE),),
    "instance_norm": ((("weight", "bias"), ("weight", "bias"), _AFFINE),),
    "rms_norm": (),
    _GENERIC_NORM: (
        (("bias",), ("weight",), "every supported norm with a bias also has a weight"),
    ),
}
_STAT_NAMES = {"running_mean": "mean", "running_var": "var", "num_batches_tracked": "count"}
_SUPPORTED = (
    "torch.nn.Conv1d/Conv2d/Conv3d, Linear, BatchNorm1d/2d/3d (and SyncBatchNorm), "
    "LayerNorm, GroupNorm, RMSNorm, InstanceNorm1d/2d/3d (affine, without running stats); "
    "Conv/Linear weights may carry one weight_norm or spectral_norm"
)

Mapping_ = None | str | Mapping[str, str | Sequence[str]]


def _import_torch() -> Any:
    try:
        import torch
    except ImportError as e:  # pragma: no cover - torch is a test dependency
        raise ImportError(
            "jaxnorm.interop.torch needs torch, which is not installed; "
            "pip install torch (the CPU build is enough)."
        ) from e
    return torch


@dataclasses.dataclass
class _Layer:
    """One torch layer that owns tensors: its prefix, kind, tensors and module.

    ``param``: the layer's weight_norm/spectral_norm, if any (its ``weight`` in
    ``tensors`` is then the raw ``v``/``W``; see :mod:`._torch_weights`).
    """

    prefix: str
    kind: str
    tensors: dict[str, Any]
    module: Any = None
    param: Any = None


def _module_kind(torch: Any, module: Any) -> str | None:
    nn = torch.nn
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        return "batch_norm"
    if isinstance(module, nn.modules.instancenorm._InstanceNorm):
        return "instance_norm"
    if isinstance(module, nn.LayerNorm):
        return "layer_norm"
    if isinstance(module, nn.GroupNorm):
        return "group_norm"
    if isinstance(module, nn.RMSNorm):
        return "rms_norm"
    if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        return "conv"
    if isinstance(module, nn.Linear):
        return "linear"
    return None


def _allowed_names(kind: str) -> tuple[str, ...]:
    return _TORCH_NAMES.get(kind, ("weight", "bias"))


def _infer_kind(fn: str, prefix: str, tensors: Mapping[str, Any]) -> str:
    """Kind of a layer seen only through its state_dict entries."""
    names = set(tensors)
    unknown = sorted(names - set(_TORCH_NAMES["batch_norm"]))
    if not unknown and names == {"bias"}:
        _check_complete(fn, prefix, _GENERIC_NORM, names)
    if unknown or "weight" not in names and not names & set(_STAT_NAMES):
        what = f"holds {unknown}, which" if unknown else f"holds only {sorted(names)}:"
        raise TypeError(
            f"{fn}: the torch layer {prefix!r} {what} no supported layer has. "
            f"Supported: {_SUPPORTED}. Convert that layer yourself and drop its entries "
            f"from the state_dict (or pass the nn.Module, whose layer types are exact)."
        )
    if names & set(_STAT_NAMES):
        return "batch_norm"
    ndim = len(tuple(tensors["weight"].shape))
    if ndim >= 3:
        return "conv"
    if ndim == 2:
        return "linear"
    if ndim == 1:
        return _GENERIC_NORM
    raise TypeError(
        f"{fn}: {prefix!r}.weight is a scalar, which no supported layer has. "
        f"Supported: {_SUPPORTED}."
    )


def _layers(fn: str, source: Any, kinds: Mapping[str, str] | None) -> list[_Layer]:
    """The tensor-owning layers of a torch module or state_dict, in state_dict order."""
    torch = _import_torch()
    kinds = dict(kinds or {})
    for prefix, kind in kinds.items():
        if kind not in KINDS:
            raise ValueError(
                f"{fn}: kinds[{prefix!r}] = {kind!r} is not a known layer kind; use one of {KINDS}."
            )
    if isinstance(source, torch.nn.Module):
        state = source.state_dict()
        modules = dict(source.named_modules())
    elif isinstance(source, Mapping):
        state, modules = source, {}
    else:
        raise TypeError(
            f"{fn}: expected a torch.nn.Module or a state_dict (a mapping of names to "
            f"tensors); got {type(source).__name__}."
        )
    state, params = split_parametrizations(fn, state, modules)
    groups: dict[str, dict[str, Any]] = {}
    for key, value in state.items():
        prefix, _, name = str(key).rpartition(".")
        groups.setdefault(prefix, {})[name] = value
    unknown_kinds = sorted(set(kinds) - set(groups))
    if unknown_kinds:
        raise ValueError(
            f"{fn}: kinds names {unknown_kinds}, which own no tensors in the torch model; "
            f"its layers are {sorted(groups)}."
        )
    layers = []
    for prefix, tensors in groups.items():
        module = modules.get(prefix)
        if prefix in kinds:
            kind = kinds[prefix]
        elif module is not None:
            kind = _module_kind(torch, module)
            if kind is None:
                raise TypeError(
                    f"{fn}: layer {prefix!r} is a {type(module).__module__}."
                    f"{type(module).__qualname__}, which has no Flax counterpart here. "
                    f"Supported: {_SUPPORTED}. Convert that layer yourself and drop its "
                    f"entries: from_torch({{k: v for k, v in model.state_dict().items() "
                    f"if not k.startswith({prefix + '.'!r})}}, ...)."
                )
        else:
            kind = _infer_kind(fn, prefix, tensors)
        if kind == "instance_norm" and ("running_mean" in tensors or "running_var" in tensors):
            raise TypeError(
                f"{fn}: layer {prefix!r} is an InstanceNorm with track_running_stats=True; "
                f"jaxnorm's instance norm keeps no running statistics. Use "
                f"track_running_stats=False in torch (the default)."
            )
        extra = sorted(set(tensors) - set(_allowed_names(kind)))
        if extra:
            raise TypeError(
                f"{fn}: layer {prefix!r} (read as {kind!r}) holds tensors {extra} that a "
                f"{kind!r} layer does not have; its tensors are {sorted(tensors)}. "
                f"Supported: {_SUPPORTED}. If the kind is wrong, pass kinds={{{prefix!r}: ...}}."
            )
        _check_complete(fn, prefix, kind, set(tensors))
        if prefix in params and kind not in ("conv", "linear"):
            raise TypeError(
                f"{fn}: layer {prefix!r} ({kind}) carries a {params[prefix].kind}; jaxnorm's "
                f"WeightNorm/SpectralNorm conversion covers Conv and Linear weights."
            )
        layers.append(_Layer(prefix, kind, tensors, module, params.get(prefix)))
    return layers


def _check_complete(
    fn: str, prefix: str, kind: str, names: set[str], *, flax_path: str | None = None
) -> None:
    """Refuse a layer that lacks a tensor every torch layer of its kind has (by key).

    ``flax_path``: the layer is being produced by :func:`to_torch` from that Flax layer.
    """
    dot = f"{prefix}." if prefix else ""
    for present, needs, rule in _COMPLETE[kind]:
        missing = [n for n in needs if n not in names]
        if not names & set(present) or not missing:
            continue
        keys = [dot + n for n in missing]
        held = sorted(dot + n for n in names)
        label = "a norm" if kind == _GENERIC_NORM else f"a {kind!r} layer"
        if flax_path is not None:
            raise ValueError(
                f"{fn}: the Flax layer {flax_path!r} converts to an incomplete torch layer "
                f"{prefix!r} ({label}): {keys} would be missing next to {held}, and torch "
                f"{rule}. Build the Flax layer with the matching variables (use_scale and "
                f"use_bias both on or both off, like torch's affine)."
            )
        raise ValueError(
            f"{fn}: torch layer {prefix!r} ({label}) is incomplete: {keys} "
            f"{'is' if len(keys) == 1 else 'are'} missing; it holds {held}, and {rule}. "
            f"Convert the complete state_dict (model.state_dict()), or drop the layer's "
            f"other entries if the layer really has none of them."
        )


def _split(path: str | Sequence[str]) -> tuple[str, ...]:
    if isinstance(path, str):
        return tuple(p for p in path.split("/") if p)
    return tuple(str(p) for p in path)


def _compact_names(fn: str, layers: Sequence[_Layer]) -> dict[str, str]:
    counters: dict[str, int] = {}
    names = {}
    for layer in layers:
        if layer.kind == _GENERIC_NORM:
            raise ValueError(
                f"{fn}: mapping='compact' needs each layer's class, but {layer.prefix!r} is a "
                f"1-D weight/bias pair that a bare state_dict cannot tell apart (LayerNorm, "
                f"GroupNorm, RMSNorm, InstanceNorm). Pass the nn.Module instead of its "
                f"state_dict, or kinds={{{layer.prefix!r}: 'layer_norm'}}."
            )
        cls = _FLAX_CLASS[layer.kind]
        i = counters.get(cls, 0)
        counters[cls] = i + 1
        names[layer.prefix] = f"{cls}_{i}"
    return names


def _resolve(fn: str, prefixes: Sequence[str], mapping: Any, layers: Sequence[_Layer]):
    """``{torch_prefix: flax_path_tuple}`` for every prefix, from any mapping form."""
    if mapping is None:  # a wrapped layer is its (setup-style) wrapper's layer_instance
        wrapped = {la.prefix for la in layers if la.param is not None}
        return {
            p: (tuple(p.split(".")) if p else ()) + (("layer_instance",) if p in wrapped else ())
            for p in prefixes
        }
    if isinstance(mapping, str):
        if mapping != "compact":
            raise ValueError(
                f"{fn}: mapping must be None (keep torch's names), 'compact' (Flax "
                f"auto-names by order) or a dict {{torch_prefix: flax_path}}; got {mapping!r}."
            )
        return {p: _split(v) for p, v in _compact_names(fn, layers).items()}
    if not isinstance(mapping, Mapping):
        raise TypeError(
            f"{fn}: mapping must be None, 'compact' or a dict {{torch_prefix: flax_path}}; "
            f"got {type(mapping).__name__}."
        )
    missing = [p for p in prefixes if p not in mapping]
    if missing:
        suggestion = ", ".join(f"{p!r}: ..." for p in missing)
        raise ValueError(
            f"{fn}: mapping has no entry for the torch layers {missing}; every layer that "
            f"owns tensors needs one. Add {{{suggestion}}} (Flax paths like "
            f"'Block_0/BatchNorm_0'), or start from compact_mapping(model)."
        )
    extra = [p for p in mapping if p not in prefixes]
    if extra:
        raise ValueError(
            f"{fn}: mapping names {extra}, which are not layers with tensors in the torch "
            f"model; its layers are {list(prefixes)}."
        )
    resolved = {p: _split(mapping[p]) for p in prefixes}
    seen: dict[tuple[str, ...], str] = {}
    for p, path in resolved.items():
        if path in seen:
            raise ValueError(
                f"{fn}: mapping sends both {seen[path]!r} and {p!r} to the Flax path "
                f"{'/'.join(path)!r}; give each torch layer its own Flax module."
            )
        seen[path] = p
    return resolved


def _set(tree: dict, path: tuple[str, ...], value: Any) -> None:
    for p in path[:-1]:
        tree = tree.setdefault(p, {})
    tree[path[-1]] = value


def _get(tree: Mapping, path: tuple[str, ...]) -> Any:
    for p in path:
        if not isinstance(tree, Mapping) or p not in tree:
            return None
        tree = tree[p]
    return tree


def _leaves(tree: Any, path: tuple[str, ...] = ()) -> dict[tuple[str, ...], Any]:
    """Flatten nested mappings to ``{path: leaf}``."""
    if isinstance(tree, Mapping):
        out = {}
        for k, v in tree.items():
            out.update(_leaves(v, path + (str(k),)))
        return out
    return {path: tree}
