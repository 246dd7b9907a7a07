"""torch ``weight_norm``/``spectral_norm`` layers <-> jaxnorm ``WeightNorm``/``SpectralNorm``.

The part of :mod:`jaxnorm.interop.torch` that handles torch's reparametrized
weights. A torch ``Linear``/``Conv*d`` under one of them stores its weight in pieces:

==============================================  ==============================================
torch                                           state_dict entries of layer ``P``
==============================================  ==============================================
``parametrizations.weight_norm(m, dim=0)``      ``P.parametrizations.weight.original0`` (``g``),
                                                ``P.parametrizations.weight.original1`` (``v``)
``parametrizations.spectral_norm(m, n_power_    ``P.parametrizations.weight.original`` (``W``),
iterations=1, eps=1e-12, dim=0)``               ``P.parametrizations.weight.0._u``,
                                                ``P.parametrizations.weight.0._v``
``utils.weight_norm`` (deprecated hooks)        ``P.weight_g``, ``P.weight_v``
``utils.spectral_norm`` (deprecated hooks)      ``P.weight_orig``, ``P.weight_u``, ``P.weight_v``
==============================================  ==============================================

On the jaxnorm/Flax side the layer holds its raw weight (``v``, or ``W``) as its
``kernel``, in Flax's layout, and a linen wrapper (``jaxnorm.linen.WeightNorm`` /
``SpectralNorm``) holds, under ``'<layer name>/kernel/...'``:

* weight norm: ``params/.../scale`` = ``g`` flattened; torch's ``dim`` (the kept axis
  of torch's layout) becomes ``feature_axes`` in the kernel's layout (``dim=0``, the
  output features, is ``-1``: flax's default); ``dim=None`` is ``feature_axes=None``
  and a scalar ``g``. Beware torch's ``dim=-1``: it means the whole tensor, as
  ``None`` does, not the last axis.
* spectral norm: ``batch_stats/.../u`` = ``_u`` as ``(1, out)`` -- the same vector
  space as flax's ``u``, so our next iteration continues torch's (its new ``u`` is the
  ``_u`` torch's next training step computes) -- and ``batch_stats/.../sigma`` =
  ``_u · W _v``, the sigma torch's eval mode divides by. ``SpectralNorm(
  use_stored_sigma=True)`` (see :func:`~jaxnorm.interop.torch.preset`) then evaluates
  exactly as torch does. torch's training step estimates sigma one half-step apart
  from flax's (see :func:`jaxnorm.spectral_normalize`), and only ``dim=0`` (the output
  axis, torch's default for ``Linear``/``Conv``) views the same matrix as flax.

The deprecated ``torch.nn.utils.spectral_norm`` hooks iterate in flax's order (``v``,
then ``u``; sigma ``= u · W v``), so from a converted state our training step is
theirs exactly; the ``parametrizations`` API starts from ``_v`` (``u``, then ``v``),
so its new ``_u`` is ours and its sigma estimate one half-step apart.

Back to torch, ``_v`` is recomputed as ``normalize(Wᵀ _u)``: what the
``parametrizations`` API holds right after a training step (a checkpoint whose
weight changed after its last training forward, by an optimizer step, held ``_v`` of
the old weight, so its eval output moves by that difference). The hooks hold a
``weight_v`` half a step *behind* ``weight_u`` (``u = normalize(W v)``), which cannot be
recomputed from ``u``: they get ``normalize(Wᵀ u)`` too, so their eval divides by
``‖Wᵀ u‖`` instead of the stored sigma.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

# role -> state_dict suffix, for each (kind, style) torch writes.
_KEYS = {
    ("weight_norm", "parametrizations"): {
        "g": "parametrizations.weight.original0",
        "v": "parametrizations.weight.original1",
    },
    ("weight_norm", "hooks"): {"g": "weight_g", "v": "weight_v"},
    ("spectral_norm", "parametrizations"): {
        "w": "parametrizations.weight.original",
        "u": "parametrizations.weight.0._u",
        "v": "parametrizations.weight.0._v",
    },
    ("spectral_norm", "hooks"): {"w": "weight_orig", "u": "weight_u", "v": "weight_v"},
}
_SUFFIXES = sorted({s for keys in _KEYS.values() for s in keys.values()}, key=len, reverse=True)
_WRAPPER = {"weight_norm": "WeightNorm", "spectral_norm": "SpectralNorm"}


@dataclasses.dataclass
class _Parametrization:
    """A torch weight_norm/spectral_norm on one layer's ``weight``."""

    kind: str  # "weight_norm" | "spectral_norm"
    style: str  # "parametrizations" | "hooks" (the deprecated torch.nn.utils API)
    tensors: dict[str, Any]  # by role: g, v (weight norm); w, u, v (spectral norm)
    dim: int | None  # torch's dim; None: the whole tensor (weight norm)
    eps: float | None = None  # spectral norm, when read from the module
    n_power_iterations: int | None = None

    def keys(self) -> dict[str, str]:
        return _KEYS[(self.kind, self.style)]


def _suffix(key: str) -> str | None:
    for s in _SUFFIXES:
        if key == s or key.endswith("." + s):
            return s
    return None


def split_parametrizations(
    fn: str, state: Mapping[str, Any], modules: Mapping[str, Any]
) -> tuple[dict[str, Any], dict[str, _Parametrization]]:
    """``(state, {prefix: parametrization})``: each reparametrized weight as ``P.weight``.

    The raw weight (``v`` or ``W``) takes the place of the first of its entries, so the
    layer order is kept.
    """
    plain: dict[str, Any] = {}
    found: dict[str, dict[str, Any]] = {}
    for key, value in state.items():
        key = str(key)
        suffix = _suffix(key)
        if suffix is None:
            if "parametrizations." in key:
                raise TypeError(
                    f"{fn}: {key!r} belongs to a torch parametrization other than a single "
                    f"weight_norm or spectral_norm on `weight`, which jaxnorm has no "
                    f"counterpart for. Remove it (torch.nn.utils.parametrize."
                    f"remove_parametrizations(module, name)) before converting."
                )
            plain[key] = value
            continue
        prefix = key[: -len(suffix) - 1] if key != suffix else ""
        if prefix not in found:
            found[prefix] = {}
            plain[f"{prefix}.weight" if prefix else "weight"] = None  # keeps the order
        found[prefix][suffix] = value
    params = {}
    for prefix, tensors in found.items():
        params[prefix] = _read(fn, prefix, tensors, modules)
        role = "v" if params[prefix].kind == "weight_norm" else "w"
        plain[f"{prefix}.weight" if prefix else "weight"] = params[prefix].tensors[role]
    return plain, params


def _read(fn: str, prefix: str, tensors: dict[str, Any], modules: Mapping[str, Any]):
    found = [ks for ks, keys in _KEYS.items() if set(tensors) == set(keys.values())]
    if not found:
        dot = f"{prefix}." if prefix else ""
        raise ValueError(
            f"{fn}: torch layer {prefix!r} holds {sorted(dot + k for k in tensors)}, which is "
            f"not a complete weight_norm (original0 and original1; or weight_g and weight_v) "
            f"or spectral_norm (original, 0._u and 0._v; or weight_orig, weight_u and "
            f"weight_v). Convert the complete state_dict (model.state_dict())."
        )
    (kind, style), keys = found[0], _KEYS[found[0]]
    by_role = {role: tensors[key] for role, key in keys.items()}
    p = _Parametrization(kind, style, by_role, None)
    torch_p = _torch_object(prefix, style, modules)
    if kind == "weight_norm":
        if torch_p is not None:
            p.dim = None if torch_p.dim == -1 else int(torch_p.dim)  # torch: -1 is "all"
        else:
            p.dim = _weight_norm_dim(by_role["g"], by_role["v"])
    else:
        if torch_p is not None:
            p.dim, p.eps, p.n_power_iterations = (
                int(torch_p.dim),
                float(torch_p.eps),
                int(torch_p.n_power_iterations),
            )
        else:
            p.dim = 0 if by_role["u"].shape[0] == by_role["w"].shape[0] else None
        if p.dim != 0:
            raise ValueError(
                f"{fn}: torch layer {prefix!r} has a spectral_norm over dim="
                f"{p.dim if p.dim is not None else '?'} (_u of length {by_role['u'].shape[0]}"
                f" for a weight of shape {tuple(by_role['w'].shape)}). Flax's SpectralNorm "
                f"views a kernel as (-1, out), which is torch's dim=0 (the default for Linear "
                f"and Conv); other dims normalize another matrix. Use dim=0 in torch."
            )
    return p


def _torch_object(prefix: str, style: str, modules: Mapping[str, Any]) -> Any:
    """torch's ``_WeightNorm``/``_SpectralNorm`` (or hook) object, when modules are known."""
    if style == "parametrizations":
        plist = modules.get(
            f"{prefix}.parametrizations.weight" if prefix else "parametrizations.weight"
        )
        return plist[0] if plist is not None and len(plist) == 1 else None
    module = modules.get(prefix)
    if module is None:
        return None
    for hook in module._forward_pre_hooks.values():
        if getattr(hook, "name", None) == "weight" and hasattr(hook, "dim"):
            return hook
    return None


def _weight_norm_dim(g: Any, v: Any) -> int | None:
    shape, vshape = tuple(g.shape), tuple(v.shape)
    if len(shape) == 0:
        return None
    kept = [a for a, n in enumerate(shape) if n != 1]
    if kept:
        return kept[0]
    return next(a for a, n in enumerate(vshape) if n == 1)  # any size-1 axis: same norm


def _flax_axis(layer_kind: str, ndim: int, dim: int) -> int:
    """torch's axis ``dim`` of a weight in the Flax kernel's layout, counted from the end."""
    if layer_kind == "linear":
        axis = 1 - dim
    else:  # conv: (O, I, *k) -> (*k, I, O)
        axis = {0: ndim - 1, 1: ndim - 2}.get(dim, dim - 2)
    return axis - ndim


def wrapper_preset(fn: str, p: _Parametrization, layer_kind: str) -> dict[str, Any]:
    """The jaxnorm wrapper arguments that reproduce torch's reparametrization."""
    if p.kind == "weight_norm":
        ndim = len(tuple(p.tensors["v"].shape))
        axes = None if p.dim is None else _flax_axis(layer_kind, ndim, p.dim)
        return {"feature_axes": axes, "epsilon": 0.0}
    out: dict[str, Any] = {"use_stored_sigma": True}
    if p.n_power_iterations is not None:
        out.update(n_steps=p.n_power_iterations, epsilon=p.eps)
    return out


def _np(t: Any) -> np.ndarray:
    return t.detach().cpu().double().numpy()


def wrapper_entries(layer: Any) -> list[tuple[str, str, np.ndarray, str]]:
    """``[(collection, 'kernel/...', value, torch key)]`` of a reparametrized layer."""
    p: _Parametrization = layer.param
    dot = f"{layer.prefix}." if layer.prefix else ""
    keys = p.keys()
    if p.kind == "weight_norm":
        g = _np(p.tensors["g"]).reshape(-1)
        scale = g.reshape(()) if p.dim is None else g
        return [("params", "kernel/scale", scale.astype(np.float32), dot + keys["g"])]
    w, u, v = (_np(p.tensors[r]) for r in ("w", "u", "v"))
    sigma = u @ (w.reshape(w.shape[0], -1) @ v)  # torch's eval-mode sigma
    return [
        ("batch_stats", "kernel/u", u[None, :].astype(np.float32), dot + keys["u"]),
        ("batch_stats", "kernel/sigma", np.asarray(sigma, np.float32), dot + keys["v"]),
    ]


def wrapper_paths(
    fn: str,
    layers: Sequence[Any],
    paths: Mapping[str, tuple[str, ...]],
    mapping: Any,
    wrappers: Mapping[str, Any] | None,
) -> dict[str, tuple[str, ...]]:
    """The Flax path of each reparametrized layer's wrapper.

    ``wrappers[prefix]`` if given; else the parent of a layer mapped to
    ``.../layer_instance`` (setup style: ``self.fc = WeightNorm(nn.Dense(4))``); else,
    with ``mapping='compact'``, the sibling ``WeightNorm_j``/``SpectralNorm_j``
    numbered by order, as ``@nn.compact`` names them.
    """
    wrappers = dict(wrappers or {})
    wrapped = [la for la in layers if la.param is not None]
    extra = sorted(set(wrappers) - {la.prefix for la in wrapped})
    if extra:
        raise ValueError(
            f"{fn}: wrappers names {extra}, which are not weight_norm/spectral_norm layers of "
            f"the torch model; those are {[la.prefix for la in wrapped]}."
        )
    out, counters = {}, {}
    for layer in wrapped:
        path, cls = paths[layer.prefix], _WRAPPER[layer.param.kind]
        j = counters.get(cls, 0)
        counters[cls] = j + 1
        if layer.prefix in wrappers:
            given = wrappers[layer.prefix]
            out[layer.prefix] = tuple(given.split("/") if isinstance(given, str) else given)
        elif path and path[-1] == "layer_instance":
            out[layer.prefix] = path[:-1]
        elif mapping == "compact":
            out[layer.prefix] = path[:-1] + (f"{cls}_{j}",)
        else:
            raise ValueError(
                f"{fn}: torch layer {layer.prefix!r} has a {layer.param.kind}, whose Flax "
                f"wrapper ({cls}) holds its variables; say where it is: "
                f"wrappers={{{layer.prefix!r}: 'path/to/{cls}_0'}}, or map the layer to "
                f"'<wrapper path>/layer_instance' (a wrapper created in setup)."
            )
    return out


@dataclasses.dataclass
class _Wrapped:
    """A Flax layer's wrapper variables, read back for :func:`to_torch`."""

    kind: str
    arrays: dict[str, Any]  # "scale" | "u" | "sigma"
    wrapper: tuple[str, ...]


def take_wrappers(fn: str, flax_layers: dict[tuple[str, ...], dict[str, Any]]):
    """Remove the wrappers from ``flax_layers``; ``{wrapped layer path: _Wrapped}``."""
    out: dict[tuple[str, ...], _Wrapped] = {}
    for path in [p for p, arrays in flax_layers.items() if any("/" in n for n in arrays)]:
        by_layer: dict[str, dict[str, Any]] = {}
        for name, value in flax_layers.pop(path).items():
            bare = name.removeprefix("stats:")
            lname, _, rest = bare.partition("/")
            if rest not in ("kernel/scale", "kernel/u", "kernel/sigma"):
                raise TypeError(
                    f"{fn}: the Flax variable {'/'.join(path)}/{bare!r} has no torch "
                    f"counterpart: torch's weight_norm/spectral_norm reparametrize only a "
                    f"layer's weight (its kernel); build the wrapper with the default "
                    f"variable_filter={{'kernel'}}."
                )
            by_layer.setdefault(lname, {})[rest.removeprefix("kernel/")] = value
        for lname, arrays in by_layer.items():
            child, sibling = path + (lname,), path[:-1] + (lname,)
            target = child if child in flax_layers else sibling
            if target not in flax_layers:
                raise ValueError(
                    f"{fn}: the wrapper {'/'.join(path)!r} refers to a layer {lname!r} found "
                    f"neither inside it nor next to it; pass the variables of the whole model."
                )
            kind = "weight_norm" if "scale" in arrays else "spectral_norm"
            out[target] = _Wrapped(kind, arrays, path)
    return out


def torch_prefix(path: tuple[str, ...], wrapped: Mapping[tuple[str, ...], _Wrapped]) -> str:
    """The torch name of a Flax layer for ``mapping=None``: a setup-style wrapped layer
    ``fc/layer_instance`` is torch's ``fc``."""
    if path in wrapped and path[-1] == "layer_instance" and wrapped[path].wrapper == path[:-1]:
        path = path[:-1]
    return ".".join(path)


def parametrize(
    fn: str, state: dict[str, Any], dot: str, wrapped: _Wrapped, torch: Any, template: Any
) -> None:
    """Replace ``state[dot + 'weight']`` by the torch entries of ``wrapped``'s kind.

    The key style and ``g``'s shape come from ``template`` (the torch layer's
    :class:`_Layer`) when it has this parametrization; else the current API's keys and
    ``g`` of shape ``(out, 1, ...)`` (or ``()`` for a scalar scale).
    """
    weight = state.pop(dot + "weight")
    tp = template.param if template is not None else None
    style = tp.style if tp is not None and tp.kind == wrapped.kind else "parametrizations"
    keys = _KEYS[(wrapped.kind, style)]
    w = weight.numpy().astype(np.float64)
    if wrapped.kind == "weight_norm":
        scale = np.asarray(wrapped.arrays["scale"], np.float64)
        if tp is not None and tp.kind == "weight_norm":
            shape = tuple(tp.tensors["g"].shape)
        elif scale.ndim == 0:
            shape = ()
        elif scale.shape == (w.shape[0],):
            shape = (w.shape[0],) + (1,) * (w.ndim - 1)
        else:
            raise ValueError(
                f"{fn}: torch layer {dot[:-1]!r}: a weight-norm scale of shape {scale.shape} "
                f"is not per output feature ({w.shape[0]}), so torch's dim is ambiguous; pass "
                f"template= (the torch model) to give it."
            )
        state[dot + keys["g"]] = torch.from_numpy(scale.reshape(shape).astype(np.float32))
        state[dot + keys["v"]] = weight
        return
    eps = tp.eps if tp is not None and tp.eps is not None else 1e-12
    u = np.asarray(wrapped.arrays["u"], np.float64).reshape(-1)
    v = w.reshape(w.shape[0], -1).T @ u
    v = v / max(np.linalg.norm(v), eps)  # torch's F.normalize
    state[dot + keys["w"]] = weight
    state[dot + keys["u"]] = torch.from_numpy(u.astype(np.float32))
    state[dot + keys["v"]] = torch.from_numpy(v.astype(np.float32))


def torch_tensors(layer: Any) -> dict[str, Any]:
    """A torch layer's ``state_dict`` entries by name under its prefix, as torch has them."""
    if layer.param is None:
        return dict(layer.tensors)
    out = {n: t for n, t in layer.tensors.items() if n != "weight"}
    for role, key in layer.param.keys().items():
        out[key] = layer.param.tensors[role]
    return out
