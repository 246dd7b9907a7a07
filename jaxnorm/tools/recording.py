"""Recording each training-mode batch norm's input moments from a Flax linen model.

:func:`with_batch_moments` wraps any function that applies a linen model; with
``flax.linen.intercept_methods`` every :class:`jaxnorm.linen.BatchNorm` or
``flax.linen.BatchNorm`` called in training mode reports the moments of its input,
keyed by its module path like the ``batch_stats`` tree. Nothing in the model changes.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn

from jaxnorm import linen as jnn
from jaxnorm import variants_linen
from jaxnorm.stats import Moments, merge_moments
from jaxnorm.tools.layer_moments import Path, batch_moments


def _nest(flat: Mapping[Path, Any]) -> Any:
    if () in flat:
        return flat[()]
    out: dict[str, Any] = {}
    for path, value in flat.items():
        node = out
        for p in path[:-1]:
            node = node.setdefault(p, {})
        node[path[-1]] = value
    return out


_UNSUPPORTED = (
    variants_linen.BatchRenorm,
    variants_linen.GhostBatchNorm,
    variants_linen.PowerNorm,
)


def _trains(module: Any, args: tuple, kwargs: dict) -> bool:
    call_ura = args[1] if len(args) > 1 else kwargs.get("use_running_average")
    mode = module.use_running_average if call_ura is None else call_ura
    return mode is not None and not mode


class _Recorder:
    """A method interceptor that records each training-mode batch norm's input moments."""

    def __init__(self, configs: dict[Path, tuple[float | None, bool]]):
        self.moments: dict[Path, Moments] = {}
        self.configs = configs
        self.types = (jnn.BatchNorm, nn.BatchNorm)

    def __call__(self, next_fun: Callable, args: tuple, kwargs: dict, context: Any) -> Any:
        module = context.module
        if context.method_name == "__call__" and isinstance(module, self.types):
            self._record(module, args, kwargs)
        elif context.method_name == "__call__" and isinstance(module, _UNSUPPORTED):
            if not module.is_initializing() and _trains(module, args, kwargs):
                raise NotImplementedError(
                    f"jaxnorm.tools: {type(module).__name__} at "
                    f"'/{'/'.join(str(p) for p in module.scope.path)}' trains in this call, "
                    f"but microbatch accumulation and recompute_batch_stats only handle "
                    f"BatchNorm layers, so its running statistics would silently not update. "
                    f"Use BatchNorm there, or update this layer outside these helpers."
                )
        return next_fun(*args, **kwargs)

    def _record(self, module: Any, args: tuple, kwargs: dict) -> None:
        if module.is_initializing():
            return
        x = args[0] if args else kwargs.get("x")
        call_ura = args[1] if len(args) > 1 else kwargs.get("use_running_average")
        if (module.use_running_average is None) == (call_ura is None):
            return  # the module itself refuses this call with flax's message
        use_running_average = module.use_running_average if call_ura is None else call_ura
        if use_running_average:
            return
        m = batch_moments(
            x,
            axis=module.axis,
            mask=kwargs.get("mask"),
            axis_name=module.axis_name,
            axis_index_groups=module.axis_index_groups,
        )
        path = tuple(str(p) for p in module.scope.path)
        if path in self.moments:  # a shared layer called twice: its stats see both inputs
            m = merge_moments(self.moments[path], m)
        self.moments[path] = m
        self.configs[path] = (module.momentum, bool(getattr(module, "unbiased_running_var", False)))


def _recording(fn: Callable, configs: dict[Path, tuple[float | None, bool]]) -> Callable:
    def wrapped(*args: Any, **kwargs: Any) -> tuple[Any, Any]:
        recorder = _Recorder(configs)
        with nn.intercept_methods(recorder):
            out = fn(*args, **kwargs)
        return out, _nest(recorder.moments)

    return wrapped


def with_batch_moments(fn: Callable[..., Any]) -> Callable[..., tuple[Any, Any]]:
    """Wrap ``fn`` so it also returns the batch moments of every batch norm it trains.

    ``fn`` is any function that calls a Flax linen model (``model.apply``) with its
    :class:`jaxnorm.linen.BatchNorm` or ``flax.linen.BatchNorm`` layers in training
    mode (``use_running_average=False``, ``mutable=['batch_stats']``). Each such
    layer's input moments (:func:`batch_moments` with the layer's ``axis``, ``mask``
    and ``axis_name``) are recorded under the layer's module path, so the moments
    tree nests like ``batch_stats``. A layer called twice reports both inputs merged;
    layers in evaluation mode report nothing. Works under ``jit``, ``grad``
    (as auxiliary output) and ``lax.scan``.

    Args:
      fn: the function to wrap.

    Returns:
      ``wrapped(*args, **kwargs) -> (fn(*args, **kwargs), moments_tree)``.

    Example:
      >>> import jax, jax.numpy as jnp, jaxnorm.linen as jnn
      >>> from jaxnorm.tools import with_batch_moments
      >>> bn = jnn.BatchNorm(use_running_average=False)
      >>> x = jnp.arange(6.0).reshape(3, 2)
      >>> v = bn.init(jax.random.key(0), x)
      >>> (_, _), m = with_batch_moments(bn.apply)(v, x, mutable=['batch_stats'])
      >>> m.mean.tolist()
      [2.0, 3.0]
    """
    return _recording(fn, {})
