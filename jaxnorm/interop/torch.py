"""torch <-> jaxnorm/Flax: variable trees and the conventions that come with them.

:func:`from_torch` turns a torch ``nn.Module`` (or its ``state_dict``) into the Flax
variables ``{'params': ..., 'batch_stats': ...}`` of an equivalent model built from
``flax.linen.Conv``/``Dense`` and :mod:`jaxnorm.linen` norms; :func:`to_torch` goes
back to a ``state_dict`` that ``load_state_dict(..., strict=True)`` accepts;
:func:`preset` gives the jaxnorm module arguments that reproduce a torch layer's
numerics. torch is imported inside the functions, so importing this module never
needs it.

Tensor conventions (torch -> Flax):

* ``Conv1d/2d/3d``: ``weight (O, I/groups, *k)`` -> ``params/kernel (*k, I/groups, O)``;
  ``bias`` -> ``params/bias``.
* ``Linear``: ``weight (O, I)`` -> ``params/kernel (I, O)``; ``bias`` -> ``params/bias``.
* ``BatchNorm1d/2d/3d``: ``weight`` -> ``params/scale``, ``bias`` -> ``params/bias``,
  ``running_mean``/``running_var`` -> ``batch_stats/mean``/``var``, and
  ``num_batches_tracked`` (int64) -> ``batch_stats/count`` (int32) where a count is kept.
* ``LayerNorm``, ``GroupNorm``, ``RMSNorm``, ``InstanceNorm*d``: ``weight`` ->
  ``params/scale``, ``bias`` -> ``params/bias``.
* a ``Linear``/``Conv*d`` under ``weight_norm``/``spectral_norm`` (the
  ``parametrizations`` API or the deprecated hooks): the raw weight (``v``, ``W``) is
  the layer's ``kernel``; ``g`` becomes the ``scale`` of a ``jaxnorm.linen.WeightNorm``,
  ``_u`` and torch's eval sigma the ``u``/``sigma`` of a ``jaxnorm.linen.SpectralNorm``
  (``wrappers=`` says where; :func:`preset` gives the wrapper's arguments). Details in
  :mod:`jaxnorm.interop._torch_weights`.

Layer kinds and completeness. :data:`KINDS` names the kinds understood here; a
``torch.nn.Module`` gives each layer's kind exactly, a bare ``state_dict`` lets it be
inferred (or set with ``kinds=``). Each converted layer must hold what torch's own
``state_dict`` holds for its kind, or a ``ValueError`` names the missing key:

=====================  ==============================================================
kind                   tensors in torch's ``state_dict``
=====================  ==============================================================
``conv``/``linear``    ``weight``, plus ``bias`` unless ``bias=False``
``batch_norm``         ``weight`` and ``bias`` together (``affine``); ``running_mean`` and
                       ``running_var`` together (``track_running_stats``), with
                       ``num_batches_tracked`` (optional: state_dicts older than torch
                       0.4.1 lack it, and torch fills it in on load)
``layer_norm``         ``weight`` (``elementwise_affine``), plus ``bias`` unless ``bias=False``
``group_norm``         ``weight`` and ``bias`` together (``affine``)
``rms_norm``           ``weight`` (``elementwise_affine``); never a bias
``instance_norm``      ``weight`` and ``bias`` together (``affine``); running statistics
                       (``track_running_stats=True``) are refused, jaxnorm keeps none
=====================  ==============================================================

So a ``BatchNorm`` state_dict without ``running_var`` is refused (``'bn.running_var' is
missing``) rather than converted into a layer that evaluates without a variance.
:func:`to_torch` refuses a Flax layer that would give an incomplete torch layer (a
batch norm with ``scale`` but no ``bias``, say), which torch could not load.

Numerical conventions (:func:`preset` returns them as module arguments):

* momentum: torch's ``momentum=p`` weights the *batch*; ours weights the old value,
  so ``p`` becomes ``1 - p`` (torch's 0.1 is our 0.9) and ``None`` (cumulative
  average, driven by ``num_batches_tracked``) stays ``None`` (driven by ``count``).
* running variance: torch stores the Bessel-corrected ``n/(n-1) * var`` of each
  batch; ``unbiased_running_var=True`` does the same, so running statistics can be
  copied verbatim either way.
* eps: copied; torch's ``RMSNorm(eps=None)`` means ``finfo(float32).eps`` (float64's
  for a float64 layer), also for half-precision layers, which torch computes in float32.
* layout: torch is channels-first (NCHW), Flax channels-last (NHWC). Kernels are
  transposed for that; a model that *flattens* feature maps before a ``Linear``
  flattens C,H,W in torch but H,W,C in Flax, which the shapes cannot reveal: pool
  globally, or permute that ``Linear``'s input rows yourself. Padding is not part
  of the variables: torch's ``padding=1`` is Flax's ``padding=1`` (or
  ``((1, 1), (1, 1))``); ``'SAME'`` differs from torch for even kernels/strides.

Which torch layer becomes which Flax module is the ``mapping``:

* ``None`` (default): names are kept, dots become nesting:
  ``'layer1.0.bn1'`` -> ``params['layer1']['0']['bn1']``. Fits a ``setup``-style
  Flax model whose attributes carry the torch names.
* ``'compact'``: names by creation order, as ``@nn.compact`` auto-names them at one
  level: the i-th conv becomes ``Conv_i``, linear ``Dense_i``, batch norm
  ``BatchNorm_i``, and ``LayerNorm_i``/``GroupNorm_i``/``RMSNorm_i``/``InstanceNorm_i``.
  :func:`compact_mapping` shows (and lets you edit) what it produces.
* a ``dict`` from torch prefix to Flax path, ``{'0': 'Conv_0', 'block.bn': 'Block_0/BatchNorm_0'}``:
  explicit; every torch layer with tensors must appear, and nothing else.

Example:
  >>> import torch, jax, jax.numpy as jnp, flax.linen as nn
  >>> import jaxnorm.linen as jnn
  >>> from jaxnorm.interop import torch as jt
  >>> tm = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4)).eval()
  >>> class Net(nn.Module):
  ...     @nn.compact
  ...     def __call__(self, x):
  ...         x = nn.Dense(4)(x)
  ...         return jnn.BatchNorm(use_running_average=True, **jt.preset(tm[1]))(x)
  >>> variables = jt.from_torch(tm, mapping="compact")
  >>> sorted(variables['params']), sorted(variables['batch_stats']['BatchNorm_0'])
  (['BatchNorm_0', 'Dense_0'], ['mean', 'var'])
  >>> x = torch.randn(2, 3)
  >>> y = Net().apply(variables, jnp.asarray(x.numpy()))
  >>> bool(jnp.allclose(y, tm(x).detach().numpy(), atol=1e-5))
  True
  >>> _ = tm.load_state_dict(jt.to_torch(variables, "compact", template=tm), strict=True)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax.numpy as jnp
import numpy as np

from jaxnorm.interop import _torch_weights
from jaxnorm.interop._torch_layers import (
    _GENERIC_NORM,
    _NORM_KINDS,
    _STAT_NAMES,
    _SUPPORTED,
    KINDS,
    Mapping_,
    _check_complete,
    _compact_names,
    _get,
    _import_torch,
    _Layer,
    _layers,
    _leaves,
    _module_kind,
    _resolve,
    _set,
)

__all__ = ["from_torch", "to_torch", "preset", "compact_mapping", "KINDS"]


def compact_mapping(source: Any, *, kinds: Mapping[str, str] | None = None) -> dict[str, str]:
    """The torch-prefix -> Flax-name mapping that ``mapping='compact'`` uses.

    Layers are numbered per Flax class in ``state_dict`` order, the way
    ``@nn.compact`` auto-names submodules created in that order at one level:
    ``Conv_i`` (``Conv1d/2d/3d``), ``Dense_i`` (``Linear``), ``BatchNorm_i``,
    ``LayerNorm_i``, ``GroupNorm_i``, ``RMSNorm_i``, ``InstanceNorm_i``. Nested torch
    modules are flattened; edit the returned dict for a nested Flax model.

    Args:
      source: a ``torch.nn.Module`` or its ``state_dict``.
      kinds: optional ``{prefix: kind}`` overrides (see :data:`KINDS`); needed for
        1-D norm layers of a bare state_dict.

    Returns:
      ``{torch_prefix: flax_name}`` in ``state_dict`` order.

    Raises:
      TypeError: a layer type with no Flax counterpart.
      ValueError: a state_dict layer whose class cannot be inferred.

    Example:
      >>> import torch
      >>> from jaxnorm.interop.torch import compact_mapping
      >>> compact_mapping(torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(),
      ...                                     torch.nn.BatchNorm2d(4), torch.nn.Linear(4, 2)))
      {'0': 'Conv_0', '2': 'BatchNorm_0', '3': 'Dense_0'}
    """
    fn = "compact_mapping"
    return _compact_names(fn, _layers(fn, source, kinds))


def _to_jax(t: Any) -> jnp.ndarray:
    torch = _import_torch()
    t = t.detach().cpu()
    if t.dtype == torch.bfloat16:
        return jnp.asarray(t.float().numpy()).astype(jnp.bfloat16)
    return jnp.asarray(t.numpy())


def _conv_to_kernel(w: jnp.ndarray) -> jnp.ndarray:
    """``(O, I/groups, *k)`` -> ``(*k, I/groups, O)``."""
    n = w.ndim
    return jnp.transpose(w, tuple(range(2, n)) + (1, 0))


def _kernel_to_conv(k: np.ndarray) -> np.ndarray:
    """``(*k, I/groups, O)`` -> ``(O, I/groups, *k)``."""
    n = k.ndim
    return np.transpose(k, (n - 1, n - 2) + tuple(range(n - 2)))


_HINTS = {
    "conv": "torch conv weights (O, I/groups, *k) become Flax kernels (*k, I/groups, O); "
    "check that the mapping pairs the right layers and that the Flax Conv has the same "
    "features, kernel_size and feature_group_count",
    "linear": "torch Linear weights (O, I) become Flax kernels (I, O); check the mapping and "
    "the Dense features",
}


def from_torch(
    source: Any,
    mapping: Mapping_ = None,
    *,
    kinds: Mapping[str, str] | None = None,
    with_count: bool | None = None,
    like: Mapping[str, Any] | None = None,
    wrappers: Mapping[str, str | Sequence[str]] | None = None,
) -> dict[str, dict]:
    """Flax variables ``{'params', 'batch_stats'}`` from a torch module or state_dict.

    Each torch layer becomes the Flax module its ``mapping`` names (see the module
    docstring): conv weights ``(O, I/g, *k) -> (*k, I/g, O)``, linear weights
    ``(O, I) -> (I, O)``, norm ``weight -> scale``, ``bias -> bias``, and batch-norm
    ``running_mean -> mean``, ``running_var -> var`` (both copied as stored: torch's
    running variance is Bessel-corrected, which a jaxnorm ``BatchNorm`` with
    ``unbiased_running_var=True`` -- :func:`preset` -- also stores), and
    ``num_batches_tracked -> count`` when a count is kept.

    Args:
      source: a ``torch.nn.Module`` (layer kinds read from the modules: exact) or a
        ``state_dict`` (kinds inferred from the tensors: running statistics mean batch
        norm, a weight of rank >= 3 a conv, rank 2 a ``Linear`` -- so pass the module,
        or ``kinds``, for ``Embedding``-like or 2-D ``LayerNorm`` weights).
      mapping: ``None`` (torch names, dots -> nesting), ``'compact'`` (Flax auto-names
        by order, :func:`compact_mapping`) or ``{torch_prefix: flax_path}`` with Flax
        paths like ``'Block_0/BatchNorm_0'``.
      kinds: optional ``{torch_prefix: kind}`` overrides, kinds from :data:`KINDS`.
      with_count: keep ``batch_stats/.../count`` (int32, from ``num_batches_tracked``).
        ``None``: as ``like`` has it if given, else for modules with
        ``momentum=None`` (jaxnorm's ``BatchNorm`` has ``count`` only when
        ``momentum is None`` or ``track_count=True``), else not.
      like: optional Flax variables of the target model, or just their shapes
        (``jax.eval_shape(model.init, ...)``, which costs no computation); every
        converted variable must exist there with the same shape, and every
        ``params``/``batch_stats`` variable there must be produced. Values are cast
        to ``like``'s dtypes.
      wrappers: ``{torch_prefix: flax_path}`` of the ``jaxnorm.linen.WeightNorm``/
        ``SpectralNorm`` wrapping each torch layer under ``weight_norm``/``spectral_norm``
        (see :mod:`jaxnorm.interop._torch_weights`). Default: the parent of a layer
        mapped to ``.../layer_instance`` (``mapping=None`` maps such a layer ``fc`` to
        ``fc/layer_instance``: ``self.fc = WeightNorm(nn.Dense(...))`` in ``setup``),
        else with ``'compact'`` the sibling ``WeightNorm_j``/``SpectralNorm_j``.

    Returns:
      ``{'params': {...}, 'batch_stats': {...}}`` as nested dicts of ``jax.Array``
      (``batch_stats`` only when some layer has running statistics).

    Raises:
      TypeError: a layer type with no Flax counterpart, or tensors a layer kind does
        not have.
      ValueError: a mapping that misses, repeats or invents layers; a shape (or a
        variable) that differs from ``like``.
    """
    fn = "from_torch"
    layers = _layers(fn, source, kinds)
    paths = _resolve(fn, [layer.prefix for layer in layers], mapping, layers)
    wrapper_at = _torch_weights.wrapper_paths(fn, layers, paths, mapping, wrappers)
    out: dict[str, dict] = {"params": {}, "batch_stats": {}}
    origin: dict[tuple[str, ...], tuple[str, str]] = {}
    for layer in layers:
        path = paths[layer.prefix]
        for name, tensor in layer.tensors.items():
            key = f"{layer.prefix}.{name}" if layer.prefix else name
            value = _to_jax(tensor)
            if name in _STAT_NAMES:
                collection, flax_name = "batch_stats", _STAT_NAMES[name]
                if name == "num_batches_tracked":
                    if not _keep_count(layer, path, with_count, like):
                        continue
                    value = value.astype(jnp.int32)
            elif name == "weight":
                collection = "params"
                if layer.kind == "conv":
                    flax_name, value = "kernel", _conv_to_kernel(value)
                elif layer.kind == "linear":
                    flax_name, value = "kernel", value.T
                else:
                    flax_name = "scale"
            else:
                collection, flax_name = "params", name
            _set(out[collection], path + (flax_name,), value)
            origin[(collection,) + path + (flax_name,)] = (key, layer.kind)
        if layer.param is not None:  # the wrapper's variables, named after the layer
            for collection, name, value, key in _torch_weights.wrapper_entries(layer):
                full = wrapper_at[layer.prefix] + (f"{path[-1]}/{name}",)
                _set(out[collection], full, jnp.asarray(value))
                origin[(collection,) + full] = (key, layer.kind)
        if layer.kind == "batch_norm" and "num_batches_tracked" not in layer.tensors:
            if with_count or (like is not None and _like_has_count(like, path)):
                _set(out["batch_stats"], path + ("count",), jnp.zeros((), jnp.int32))
                origin[("batch_stats",) + path + ("count",)] = (f"{layer.prefix}", layer.kind)
    if not out["batch_stats"]:
        del out["batch_stats"]
    if like is not None:
        out = _match_like(fn, out, like, origin, {paths[la.prefix]: la for la in layers})
    return out


def _like_has_count(like: Mapping[str, Any], path: tuple[str, ...]) -> bool:
    return _get(like, ("batch_stats",) + path + ("count",)) is not None


def _keep_count(layer: _Layer, path: tuple[str, ...], with_count: bool | None, like: Any) -> bool:
    if with_count is not None:
        return bool(with_count)
    if like is not None:
        return _like_has_count(like, path)
    return layer.module is not None and getattr(layer.module, "momentum", 0.1) is None


# Which torch tensor a Flax variable comes from, and the Flax switch that drops it.
_FROM_TORCH = {
    ("params", "kernel"): ("weight", "a conv/Linear always has a weight"),
    ("params", "scale"): ("weight", "build the Flax layer with use_scale=False"),
    ("params", "bias"): ("bias", "build the Flax layer with use_bias=False"),
    ("batch_stats", "mean"): ("running_mean", "track_running_stats=False keeps no statistics"),
    ("batch_stats", "var"): ("running_var", "track_running_stats=False keeps no statistics"),
}


def _missing_from_torch(fn: str, path: tuple[str, ...], layer: _Layer) -> str:
    """The message for a ``like`` variable whose torch layer lacks the tensor behind it."""
    name, fix = _FROM_TORCH.get((path[0], path[-1]), (path[-1], "check the Flax layer"))
    key = f"{layer.prefix}.{name}" if layer.prefix else name
    held = sorted(f"{layer.prefix}.{n}" if layer.prefix else n for n in layer.tensors)
    return (
        f"{fn}: `like` has {'/'.join(path)!r}, which comes from torch {key!r}, and the torch "
        f"layer {layer.prefix!r} ({layer.kind}) has no {key!r} (it holds {held}). If the "
        f"torch layer really lacks it, {fix} to match; otherwise convert a state_dict that "
        f"has {key!r}."
    )


def _match_like(
    fn: str,
    out: dict,
    like: Mapping[str, Any],
    origin: dict,
    layer_at: Mapping[tuple[str, ...], _Layer],
) -> dict:
    got = _leaves(out)
    want = {p: v for p, v in _leaves(like).items() if p and p[0] in ("params", "batch_stats")}
    for path, value in got.items():
        key, kind = origin[path]
        if path not in want:
            layer_paths = sorted({"/".join(p[1:-1]) for p in want})
            raise ValueError(
                f"{fn}: torch {key!r} became {'/'.join(path)!r}, which `like` does not have; "
                f"its layers are {layer_paths}. Fix the mapping (or the Flax model: e.g. "
                f"use_bias/use_scale must match torch's bias/affine)."
            )
        shape, expected = tuple(value.shape), tuple(np.shape(want[path]))
        if shape != expected:
            hint = _HINTS.get(kind, f"check that the mapping pairs {key!r} with the right layer")
            raise ValueError(
                f"{fn}: torch {key!r} ({kind}) became {'/'.join(path)!r} with shape {shape}, "
                f"but `like` has shape {expected} there; {hint}."
            )
    for path in sorted(p for p in want if p not in got):
        if path[1:-1] in layer_at:  # the layer is mapped; the tensor is what is missing
            raise ValueError(_missing_from_torch(fn, path, layer_at[path[1:-1]]))
    missing = sorted("/".join(p) for p in want if p not in got)
    if missing:
        raise ValueError(
            f"{fn}: `like` has {missing}, which no torch tensor maps to. Add the torch layers "
            f"to the mapping, or build the Flax layers without them (e.g. use_bias=False "
            f"for torch's bias=False)."
        )
    converted: dict[str, dict] = {}
    for path, value in got.items():
        _set(converted, path, jnp.asarray(value, want[path].dtype))
    return converted


def _flax_layers(variables: Mapping[str, Any]) -> dict[tuple[str, ...], dict[str, Any]]:
    """``{flax_path: {name: array}}`` with ``batch_stats`` names prefixed ``stats:``."""
    layers: dict[tuple[str, ...], dict[str, Any]] = {}
    for collection, prefix in (("params", ""), ("batch_stats", "stats:")):
        for path, value in _leaves(variables.get(collection, {})).items():
            layers.setdefault(path[:-1], {})[prefix + path[-1]] = value
    return layers


def _infer_flax_kind(fn: str, path: tuple[str, ...], arrays: Mapping[str, Any]) -> str:
    names = set(arrays)
    where = "/".join(path) or "<root>"
    allowed = {"kernel", "bias", "scale", "stats:mean", "stats:var", "stats:count"}
    if names - allowed:
        raise TypeError(
            f"{fn}: the Flax layer {where!r} holds {sorted(names - allowed)}, which no "
            f"supported layer has (supported: {_SUPPORTED}). Convert it yourself and leave "
            f"it out of `variables`."
        )
    if "kernel" in names:
        return "linear" if np.ndim(arrays["kernel"]) == 2 else "conv"
    if "stats:mean" in names or "stats:var" in names:
        return "batch_norm"
    return _GENERIC_NORM


def to_torch(
    variables: Mapping[str, Any],
    mapping: Mapping_ = None,
    *,
    template: Any = None,
    kinds: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """A torch ``state_dict`` from Flax variables: the inverse of :func:`from_torch`.

    Kernels go back to torch's layout (``(*k, I/g, O) -> (O, I/g, *k)``,
    ``(I, O) -> (O, I)``), ``scale -> weight``, ``mean/var -> running_mean/var``
    (copied: with ``unbiased_running_var=True`` both sides store the Bessel-corrected
    variance) and ``count -> num_batches_tracked`` (int64). A batch norm without
    ``count`` gets ``num_batches_tracked`` from ``template`` if given, else 0; torch
    reads it only when ``momentum=None``.

    Args:
      variables: ``{'params': ..., 'batch_stats': ...}`` (other collections ignored).
      mapping: the same ``{torch_prefix: flax_path}`` / ``None`` / ``'compact'`` as
        :func:`from_torch` (``'compact'`` needs ``template`` for torch's order).
      template: optional ``torch.nn.Module`` or ``state_dict`` to fill. The result
        then has exactly its keys, in its order, dtypes and shapes -- ready for
        ``load_state_dict(..., strict=True)`` -- and layer kinds come from it.
      kinds: optional ``{torch_prefix: kind}`` overrides (see :data:`KINDS`).

    Returns:
      ``{name: torch.Tensor}``.

    Raises:
      TypeError: a Flax layer with variables no supported layer has.
      ValueError: a mapping that misses or invents layers, ``'compact'`` without a
        template, or keys/shapes that differ from ``template``.
    """
    fn = "to_torch"
    torch = _import_torch()
    flax_layers = _flax_layers(variables)
    wrapped = _torch_weights.take_wrappers(fn, flax_layers)
    template_layers = _layers(fn, template, kinds) if template is not None else None
    if template_layers is not None:
        prefixes = [layer.prefix for layer in template_layers]
        to_flax = _resolve(fn, prefixes, mapping, template_layers)
        kind_of = {layer.prefix: layer.kind for layer in template_layers}
    elif isinstance(mapping, str):
        _resolve(fn, [], mapping, [])  # refuses unknown strings
        raise ValueError(
            f"{fn}: mapping='compact' needs the torch layer order: pass template=model "
            f"(or its state_dict), or an explicit dict {{torch_prefix: flax_path}}."
        )
    elif mapping is None:
        to_flax = {_torch_weights.torch_prefix(path, wrapped): path for path in flax_layers}
        kind_of = {}
    else:
        to_flax = _resolve(fn, list(mapping), mapping, [])
        kind_of = {}
    unmapped = sorted("/".join(p) or "<root>" for p in set(flax_layers) - set(to_flax.values()))
    if unmapped:
        raise ValueError(
            f"{fn}: the Flax layers {unmapped} are not in the mapping (it covers "
            f"{sorted('/'.join(p) for p in to_flax.values())}). Add them, or drop them from "
            f"`variables` if torch has no such layer."
        )
    kind_of.update(kinds or {})
    template_of = {layer.prefix: layer for layer in template_layers or ()}
    state: dict[str, Any] = {}
    for prefix, path in to_flax.items():
        arrays = flax_layers.get(path)
        if arrays is None:
            raise ValueError(
                f"{fn}: torch layer {prefix!r} maps to the Flax path {'/'.join(path)!r}, which "
                f"`variables` does not have; its layers are "
                f"{sorted('/'.join(p) for p in flax_layers)}."
            )
        kind = kind_of.get(prefix) or _infer_flax_kind(fn, path, arrays)
        dot = f"{prefix}." if prefix else ""
        for name, value in arrays.items():
            value = np.asarray(jnp.asarray(value, jnp.float32 if name != "stats:count" else None))
            if name == "kernel":
                if kind == "conv":
                    value = _kernel_to_conv(value)
                elif kind == "linear":
                    value = value.T
                else:
                    raise TypeError(
                        f"{fn}: Flax layer {'/'.join(path)!r} has a kernel, but torch layer "
                        f"{prefix!r} is a {kind!r} layer; fix the mapping."
                    )
                key = "weight"
            elif name == "scale":
                key = "weight"
            elif name == "bias":
                key = "bias"
            else:
                key = {"stats:mean": "running_mean", "stats:var": "running_var"}.get(
                    name, "num_batches_tracked"
                )
            tensor = torch.from_numpy(np.array(value))  # a writable copy
            if key == "num_batches_tracked":
                tensor = tensor.to(torch.int64)
            state[dot + key] = tensor
        names = {k[len(dot) :] for k in state if k.startswith(dot) and "." not in k[len(dot) :]}
        nbt = f"{dot}num_batches_tracked"
        if kind == "batch_norm" and names & {"running_mean", "running_var"} and nbt not in state:
            tpl = template_of.get(prefix)
            if tpl is None:
                state[nbt] = torch.zeros((), dtype=torch.int64)
            elif "num_batches_tracked" in tpl.tensors:  # absent only in pre-0.4.1 state_dicts
                state[nbt] = tpl.tensors["num_batches_tracked"].clone()
        _check_complete(fn, prefix, kind, names, flax_path="/".join(path) or "<root>")
        if path in wrapped:
            _torch_weights.parametrize(
                fn, state, dot, wrapped[path], torch, template_of.get(prefix)
            )
    if template_layers is None:
        return state
    return _match_template(fn, state, template_layers)


def _match_template(fn: str, state: dict[str, Any], layers: Sequence[_Layer]) -> dict[str, Any]:
    expected = {}
    for layer in layers:
        for name, tensor in _torch_weights.torch_tensors(layer).items():
            expected[f"{layer.prefix}.{name}" if layer.prefix else name] = (tensor, layer.kind)
    missing = [k for k in expected if k not in state]
    extra = [k for k in state if k not in expected]
    if missing or extra:
        raise ValueError(
            f"{fn}: the converted keys differ from the template's: missing {missing}, "
            f"unexpected {extra}. Check the mapping, and that use_bias/use_scale in Flax "
            f"match torch's bias/affine."
        )
    out = {}
    for key, (tensor, kind) in expected.items():
        value = state[key]
        if tuple(value.shape) != tuple(tensor.shape):
            hint = _HINTS.get(kind, "check that the mapping pairs the right layers")
            raise ValueError(
                f"{fn}: {key!r} ({kind}) converts to shape {tuple(value.shape)}, but the "
                f"template has {tuple(tensor.shape)}; {hint}."
            )
        out[key] = value.to(tensor.dtype)
    return out


def preset(layer: Any, *, channels_last: bool = True) -> dict[str, Any]:
    """jaxnorm module arguments that reproduce a torch norm layer's numerics.

    ``jaxnorm.linen.BatchNorm(**preset(torch_bn))`` (or ``jaxnorm.nnx``'s) then
    normalizes, updates and stores running statistics as ``torch_bn`` does:

    * ``BatchNorm*d(momentum=p, eps)`` -> ``dict(momentum=1 - p, epsilon=eps,
      unbiased_running_var=True)`` (``p=None`` -> ``momentum=None``, cumulative, with
      ``count`` as ``num_batches_tracked``), plus ``use_scale=use_bias=False`` when
      ``affine=False`` and ``axis=1`` when ``channels_last=False``.
    * ``LayerNorm(shape, eps)`` -> ``epsilon``, ``reduction_axes``/``feature_axes``
      of the last ``len(shape)`` axes, ``use_scale``/``use_bias``.
    * ``GroupNorm(G, C, eps)`` -> ``num_groups=G, epsilon=eps`` (+ affine flags).
    * ``RMSNorm(shape, eps)`` -> ``epsilon`` (``eps=None`` is torch's
      ``finfo(float32).eps``, or float64's for a float64 layer).
    * ``InstanceNorm*d(eps, affine)`` -> ``epsilon`` (+ affine flags).
    * a ``Linear``/``Conv*d`` under ``weight_norm(dim=d)`` -> the
      ``jaxnorm.linen.WeightNorm``/``jaxnorm.nnx.WeightNorm`` arguments
      ``feature_axes`` (``d`` in the kernel's layout; -1 for ``d=0``) and
      ``epsilon=0.0``; under ``spectral_norm`` -> ``SpectralNorm``'s
      ``use_stored_sigma=True`` (evaluation divides by the sigma torch's eval uses),
      ``n_steps=n_power_iterations`` and ``epsilon=eps``.

    Args:
      layer: a torch norm module.
      channels_last: whether the Flax model is channels-last (NHWC, Flax's habit);
        ``False`` adds ``axis=1`` for batch norm (jaxnorm's linen ``GroupNorm`` is
        channels-last only).

    Returns:
      Keyword arguments for the matching :mod:`jaxnorm.linen` module.

    Raises:
      TypeError: ``layer`` is not a supported torch norm layer.
      ValueError: a ``BatchNorm`` with ``track_running_stats=False`` (it always
        normalizes with batch statistics: use ``use_running_average=False`` always).

    Example:
      >>> import torch
      >>> from jaxnorm.interop.torch import preset
      >>> preset(torch.nn.BatchNorm2d(8))
      {'momentum': 0.9, 'epsilon': 1e-05, 'unbiased_running_var': True}
    """
    fn = "preset"
    torch = _import_torch()
    if isinstance(layer, torch.nn.Module):
        state, modules = layer.state_dict(), dict(layer.named_modules())
        found = _torch_weights.split_parametrizations(fn, state, modules)[1].get("")
        if found is not None:
            return _torch_weights.wrapper_preset(fn, found, _module_kind(torch, layer))
    kind = _module_kind(torch, layer) if isinstance(layer, torch.nn.Module) else None
    if kind not in _NORM_KINDS:
        raise TypeError(
            f"{fn}: expected a torch normalization layer (BatchNorm*d, LayerNorm, GroupNorm, "
            f"RMSNorm, InstanceNorm*d); got {type(layer).__name__}."
        )
    out: dict[str, Any] = {}
    if kind == "batch_norm":
        if not layer.track_running_stats:
            raise ValueError(
                f"{fn}: {type(layer).__name__} with track_running_stats=False always "
                f"normalizes with batch statistics and has no running ones; jaxnorm has no "
                f"switch for that: call the layer with use_running_average=False in "
                f"evaluation too."
            )
        momentum = layer.momentum
        out["momentum"] = None if momentum is None else 1.0 - float(momentum)
        out["epsilon"] = float(layer.eps)
        out["unbiased_running_var"] = True
        affine = layer.affine
        if not channels_last:
            out["axis"] = 1
    elif kind in ("layer_norm", "rms_norm"):
        eps = layer.eps
        if eps is None:
            # torch computes RMSNorm in float32 for half types, with float32's eps
            # (float64's only for float64 layers).
            weight = getattr(layer, "weight", None)
            dtype = weight.dtype if weight is not None else torch.get_default_dtype()
            eps = torch.finfo(torch.float64 if dtype == torch.float64 else torch.float32).eps
        out["epsilon"] = float(eps)
        k = len(layer.normalized_shape)
        axes = -1 if k == 1 else tuple(range(-k, 0))
        out["reduction_axes"] = axes
        out["feature_axes"] = axes
        affine = layer.elementwise_affine
        if kind == "layer_norm":
            out["use_bias"] = affine and layer.bias is not None
        out["use_scale"] = affine
        return out
    elif kind == "group_norm":
        out["num_groups"] = int(layer.num_groups)
        out["epsilon"] = float(layer.eps)
        affine = layer.affine
    else:
        out["epsilon"] = float(layer.eps)
        affine = layer.affine
        if not channels_last:
            out["feature_axes"] = 1
    if not affine:
        out["use_scale"] = False
        out["use_bias"] = False
    return out
