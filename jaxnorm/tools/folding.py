"""Folding inference-mode batch norms into the preceding ``Dense``/``Conv``."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from jaxnorm import _checks
from jaxnorm.tools.layer_moments import Path, _is_layer_stats


def fold_batch_norm_kernel(
    kernel: jax.Array,
    bias: jax.Array | None,
    mean: jax.Array,
    var: jax.Array,
    scale: jax.Array | None = None,
    beta: jax.Array | None = None,
    *,
    epsilon: float,
) -> tuple[jax.Array, jax.Array]:
    """Fold an inference-mode batch norm into the preceding layer's kernel and bias.

    For ``y = BN(x @ W + b)`` with running ``mean``/``var``, ``gamma = scale`` and
    ``beta``, on the output-feature (last) axis of ``W``:

    .. math::

        m = \\gamma / \\sqrt{\\mathrm{var} + \\epsilon},\\quad
        W' = W \\cdot m,\\quad b' = (b - \\mathrm{mean})\\,m + \\beta

    so ``x @ W' + b' == BN(x @ W + b)``. Works for any Flax kernel whose last axis
    is the output features (``Dense (I, O)``, ``Conv (*k, I/g, O)``). Computed in at
    least float32 and returned in the kernel's dtype.

    Args:
      kernel: the layer's kernel, output features last.
      bias: the layer's bias ``(O,)``, or ``None`` (``use_bias=False``: zero).
      mean: running mean ``(O,)``.
      var: running variance ``(O,)``.
      scale: ``gamma`` ``(O,)``, or ``None`` (``use_scale=False``: one).
      beta: the batch norm's bias ``(O,)``, or ``None`` (zero).
      epsilon: the batch norm's epsilon (must match the layer's).

    Returns:
      ``(kernel', bias')``.

    Raises:
      ValueError: statistics or affine parameters not of shape ``(O,)``.
    """
    fn = "fold_batch_norm_kernel"
    _checks.check_floating(fn, kernel, "kernel")
    _checks.check_epsilon(fn, epsilon)
    out = (jnp.shape(kernel)[-1],) if jnp.ndim(kernel) else ()
    hint = (
        f"the output features (last axis) of the kernel {tuple(jnp.shape(kernel))}; the "
        f"batch norm must normalize this layer's outputs on their last axis"
    )
    for name, value in (("bias", bias), ("mean", mean), ("var", var)):
        _checks.check_param_shape(fn, name, value, out, hint)
    _checks.check_param_shape(fn, "scale", scale, out, hint)
    _checks.check_param_shape(fn, "beta", beta, out, hint)
    sd = jnp.promote_types(jnp.result_type(kernel), jnp.float32)
    mul = lax.rsqrt(jnp.asarray(var, sd) + epsilon)
    if scale is not None:
        mul = mul * jnp.asarray(scale, sd)
    b = jnp.zeros(out, sd) if bias is None else jnp.asarray(bias, sd)
    new_bias = (b - jnp.asarray(mean, sd)) * mul
    if beta is not None:
        new_bias = new_bias + jnp.asarray(beta, sd)
    new_kernel = jnp.asarray(kernel, sd) * mul
    bias_dtype = jnp.result_type(kernel) if bias is None else jnp.result_type(bias)
    return new_kernel.astype(jnp.result_type(kernel)), new_bias.astype(bias_dtype)


def _split(path: str | Sequence[str]) -> Path:
    if isinstance(path, str):
        return tuple(p for p in path.split("/") if p)
    return tuple(str(p) for p in path)


def _lookup(tree: Any, path: Path) -> Any:
    for p in path:
        if not isinstance(tree, Mapping) or p not in tree:
            return None
        tree = tree[p]
    return tree


def _copy(tree: Any) -> Any:
    return {k: _copy(v) for k, v in tree.items()} if isinstance(tree, Mapping) else tree


def _delete(tree: dict, path: Path) -> None:
    """Delete ``path`` and any parents it leaves empty."""
    if len(path) == 1:
        tree.pop(path[0], None)
        return
    child = tree.get(path[0])
    if isinstance(child, dict):
        _delete(child, path[1:])
        if not child:
            del tree[path[0]]


def fold_batch_norm(
    variables: Mapping[str, Any],
    pairs: Mapping[str, str],
    *,
    epsilon: float | Mapping[str, float] = 1e-5,
) -> dict[str, Any]:
    """Params of the model with each inference-mode batch norm folded into its producer.

    For every ``{layer: batch_norm}`` pair -- a ``Dense``/``Conv`` whose output goes
    straight (no activation in between) into a batch norm over its last axis --
    the layer's kernel and bias become :func:`fold_batch_norm_kernel`'s
    ``W' = W m``, ``b' = (b - mean) m + beta`` with ``m = gamma/sqrt(var + eps)``, and
    the batch norm's ``params`` are dropped. The result is the ``params`` of the
    same architecture without those batch norms, every paired layer with a bias
    (``use_bias=True``); with ``@nn.compact`` auto-naming, removing the
    ``BatchNorm`` modules leaves the ``Conv_i``/``Dense_i`` names unchanged.

    Args:
      variables: ``{'params': ..., 'batch_stats': ...}`` of the trained model.
      pairs: ``{layer_path: batch_norm_path}``, paths like ``'Block_0/Conv_0'``.
      epsilon: the batch norms' epsilon; a float for all, or ``{batch_norm_path: eps}``.

    Returns:
      The folded ``params`` tree (the input is not modified).

    Raises:
      ValueError: a path that does not exist, a layer without a kernel, a batch norm
        without running statistics, or shapes that do not fit.

    Example:
      >>> import jax, jax.numpy as jnp, flax.linen as nn, jaxnorm.linen as jnn
      >>> from jaxnorm.tools import fold_batch_norm
      >>> class Net(nn.Module):
      ...     bn: bool = True
      ...     @nn.compact
      ...     def __call__(self, x):
      ...         x = nn.Dense(3)(x)
      ...         return jnn.BatchNorm(use_running_average=True)(x) if self.bn else x
      >>> x = jnp.ones((2, 4))
      >>> v = Net().init(jax.random.key(0), x)
      >>> folded = fold_batch_norm(v, {'Dense_0': 'BatchNorm_0'})
      >>> y = Net(bn=False).apply({'params': folded}, x)
      >>> bool(jnp.allclose(y, Net().apply(v, x), atol=1e-6))
      True
    """
    fn = "fold_batch_norm"
    params = _copy(variables.get("params", {}))
    stats = variables.get("batch_stats", {})
    for layer_path, bn_path in pairs.items():
        lp, bp = _split(layer_path), _split(bn_path)
        layer = _lookup(params, lp)
        if not isinstance(layer, Mapping) or "kernel" not in layer:
            raise ValueError(
                f"{fn}: params have no kernel at {layer_path!r}; pairs map a Dense/Conv path "
                f"(with a 'kernel') to the batch norm that follows it."
            )
        bn_stats = _lookup(stats, bp)
        if not _is_layer_stats(bn_stats):
            raise ValueError(
                f"{fn}: batch_stats have no running mean/var at {bn_path!r}; pairs map a "
                f"layer to a BatchNorm path, and variables must include 'batch_stats'."
            )
        bn_params = _lookup(variables.get("params", {}), bp) or {}
        eps = epsilon[bn_path] if isinstance(epsilon, Mapping) else epsilon
        kernel, bias = fold_batch_norm_kernel(
            layer["kernel"],
            layer.get("bias"),
            bn_stats["mean"],
            bn_stats["var"],
            bn_params.get("scale"),
            bn_params.get("bias"),
            epsilon=eps,
        )
        layer["kernel"], layer["bias"] = kernel, bias
        _delete(params, bp)
    return params
