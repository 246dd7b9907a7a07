"""Weight-norm wrappers for NNX: :class:`SpectralNorm` and :class:`WeightNorm`.

Each wraps a layer instance with the constructor signature, attributes and state of
``flax.nnx.SpectralNorm``/``WeightNorm``: the wrapped layer stays at
``layer_instance``; ``SpectralNorm.batch_stats`` maps ``path + ('u',)`` and
``path + ('sigma',)`` to ``nnx.BatchStat``, ``WeightNorm.scales`` maps ``path`` to the
scale, for each normalized ``nnx.Param`` of the wrapped layer at ``path`` (e.g.
``('kernel',)``). So ``nnx.update(ours, nnx.state(theirs))`` loads flax's state, and
the other way round.

The difference that matters (flax #5576): flax's NNX wrappers *write the normalized
weights into the wrapped layer's params* at every call, so the next call normalizes
an already normalized weight and an optimizer updates ``W / sigma`` (or ``g v/||v||``)
instead of ``W`` (``v``): not the reparametrization of the papers, nor what linen
does. Ours never write a param: the wrapped layer is called as a copy
(``nnx.split``/``nnx.merge``) whose params are the normalized values, and any other
state the call changes (a ``BatchStat``, an RNG count) is copied back. Gradients
reach the raw params through the normalization.

Other differences from flax, on purpose:

* ``WeightNorm.scales`` are ``nnx.Param`` (flax stores plain arrays, which
  ``nnx.state(model, nnx.Param)``, ``nnx.grad`` and ``nnx.Optimizer`` skip, so they
  never train: flax #5577), created with ``param_dtype`` from ``rngs.params()``
  (flax passes the stream itself, so a random ``scale_init`` raises there, and
  ignores ``param_dtype``). Drawing keys advances ``rngs``'s ``params`` count by one
  per scale, so layers built after this one from the same ``rngs`` get other
  initial values than under flax.
* Only ``nnx.Param`` are normalized (flax's ``WeightNorm`` filters all of the
  layer's state at call time, and fails on a matching non-Param).
* Normalized weights keep their dtype unless ``dtype`` is given (flax promotes with
  ``u``/``scale``); the power iteration runs in at least float32.
* ``SpectralNorm(use_stored_sigma=True)``: see :mod:`jaxnorm.linen.weights`. The
  call takes keyword arguments for the wrapped layer after ``update_stats``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from flax.nnx.module import first_from
from flax.nnx.nn import dtypes, initializers
from flax.typing import Dtype, Initializer, PromoteDtypeFn

from jaxnorm import _weight_calls
from jaxnorm._checks import Axes
from jaxnorm.functional.weights import weight_normalize
from jaxnorm.nnx._base import _errors_at, _name

#: flax's default ``variable_filter``: params whose path contains ``'kernel'``.
_KERNELS = nnx.PathContains("kernel")


def _params(layer: nnx.Module) -> list[tuple[tuple, nnx.Variable]]:
    """``[(path, Param)]`` of ``layer``, in flax's order (``nnx.to_flat_state``)."""
    return list(nnx.to_flat_state(nnx.state(layer, nnx.Param)))


def _call_with(layer: nnx.Module, values: Mapping[tuple, jax.Array], *args, **kwargs) -> Any:
    """``layer(*args, **kwargs)`` with the params at ``values``' paths replaced, unwritten.

    The layer is called as a copy holding ``values``; whatever else the call changes in
    the copy (batch statistics, RNG counts) is written back to ``layer``.
    """
    graphdef, state = nnx.split(layer)
    flat = [(p, v.replace(values[p]) if p in values else v) for p, v in nnx.to_flat_state(state)]
    copy = nnx.merge(graphdef, nnx.from_flat_state(flat))
    out = copy(*args, **kwargs)
    changed = [(p, v) for p, v in nnx.to_flat_state(nnx.state(copy)) if p not in values]
    nnx.update(layer, nnx.from_flat_state(changed))
    return out


def _path_str(path: tuple) -> str:
    return "/".join(str(p) for p in path)


class SpectralNorm(nnx.Module):
    """Spectral normalization of a wrapped layer's weights: ``W / sigma_max(W)``.

    Drop-in for ``flax.nnx.SpectralNorm`` (see the module docstring for what differs).
    Every ``nnx.Param`` of ``layer_instance`` of rank >= 2 is viewed as a matrix
    ``(-1, shape[-1])`` and divided by its largest singular value, estimated by
    :func:`jaxnorm.spectral_normalize` from the stored ``u``; scalars and vectors
    pass unchanged. ``batch_stats[path + ('u',)]`` ``(1, shape[-1])`` starts from a
    normal draw (stddev 0.01, as flax NNX), ``batch_stats[path + ('sigma',)]`` at 1.

    ``update_stats`` (constructor default ``True``) sets ``use_running_average = not
    update_stats``, so ``model.train()``/``model.eval()`` switch it; a value passed to
    ``__call__`` takes precedence.

    Args:
      layer_instance: the wrapped module; its params must not change shape later.
      n_steps: power iterations per call; ``< 1`` leaves every weight unnormalized.
      epsilon: added to the squared norms in the power iteration.
      dtype: dtype of the normalized weights; ``None`` keeps each weight's dtype.
      param_dtype: dtype of ``u`` and ``sigma``.
      error_on_non_matrix: refuse weights of rank > 2 instead of flattening them.
      update_stats: store the new ``u`` and ``sigma`` at each call (training mode).
      use_stored_sigma: when not updating, divide by the stored ``sigma`` without
        power iteration (torch's eval mode); ``False`` iterates, as flax.
      rngs: random generators; ``rngs.params()`` draws each ``u``.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from flax import nnx
      >>> import jaxnorm.nnx as jnnx
      >>> rngs = nnx.Rngs(0)
      >>> layer = jnnx.SpectralNorm(nnx.Linear(3, 4, rngs=rngs), rngs=rngs)
      >>> kernel = layer.layer_instance.kernel[...]
      >>> y = layer(jnp.ones((2, 3)), update_stats=True)
      >>> bool((layer.layer_instance.kernel[...] == kernel).all())  # never written
      True
      >>> sorted(layer.batch_stats)
      [('kernel', 'sigma'), ('kernel', 'u')]
    """

    def __init__(
        self,
        layer_instance: nnx.Module,
        *,
        n_steps: int = 1,
        epsilon: float = 1e-12,
        dtype: Dtype | None = None,
        param_dtype: Dtype = jnp.float32,
        error_on_non_matrix: bool = False,
        update_stats: bool = True,
        use_stored_sigma: bool = False,
        rngs: nnx.Rngs,
    ):
        self.layer_instance = layer_instance
        self.n_steps = n_steps
        self.epsilon = epsilon
        self.dtype = dtype
        self.param_dtype = param_dtype
        self.error_on_non_matrix = error_on_non_matrix
        self.use_stored_sigma = use_stored_sigma
        self.use_running_average = not update_stats
        batch_stats: dict[tuple, nnx.BatchStat] = {}
        for path, param in _params(layer_instance):
            width = self._width(path, param)
            if width is None:
                continue
            key = rngs.params()
            u = initializers.normal()(key, (1, width), param_dtype)
            batch_stats[path + ("u",)] = nnx.BatchStat(u)
            batch_stats[path + ("sigma",)] = nnx.BatchStat(initializers.ones(key, (), param_dtype))
        self.batch_stats = nnx.data(batch_stats)

    def _width(self, path: tuple, param: nnx.Variable) -> int | None:
        return _weight_calls.spectral_width(
            f"{_name(self)}: the param {_path_str(path)!r} of layer_instance",
            tuple(param.shape),
            n_steps=self.n_steps,
            error_on_non_matrix=self.error_on_non_matrix,
        )

    def _stat(self, path: tuple, name: str) -> nnx.BatchStat:
        stat = self.batch_stats.get(path + (name,))
        if stat is None:
            raise ValueError(
                f"{_name(self)}: no batch_stats[{path + (name,)!r}] for the param "
                f"{_path_str(path)!r} of layer_instance; its params changed after the "
                f"wrapper was built (it has {sorted(self.batch_stats)}). Build the "
                f"SpectralNorm after the layer's final params exist."
            )
        return stat

    def __call__(self, x: Any, update_stats: bool | None = None, **kwargs: Any) -> Any:
        """Call the wrapped layer with spectrally normalized weights.

        Args:
          x: the wrapped layer's input.
          update_stats: store the new ``u`` and ``sigma``; ``None`` uses ``not
            self.use_running_average``.
          **kwargs: keyword arguments of the wrapped layer's call.

        Returns:
          The wrapped layer's output.

        Raises:
          TypeError: an ``update_stats`` that is not a bool.
          ValueError: a param with no stored state, or of rank > 2 with
            ``error_on_non_matrix``.
        """
        update_stats = first_from(
            update_stats,
            not self.use_running_average,
            error_msg=f"{_name(self)}: pass update_stats, or set use_running_average.",
        )
        _weight_calls.check_update_stats(_name(self), update_stats)
        values = {}
        for path, param in _params(self.layer_instance):
            if self._width(path, param) is None:
                continue
            u_stat, sigma_stat = self._stat(path, "u"), self._stat(path, "sigma")
            with _errors_at(self):
                w_sn, u, sigma = _weight_calls.spectral_call(
                    param[...],
                    u_stat[...],
                    sigma_stat[...],
                    update_stats=update_stats,
                    use_stored_sigma=self.use_stored_sigma,
                    n_steps=self.n_steps,
                    epsilon=self.epsilon,
                    dtype=self.dtype,
                )
            if update_stats:
                u_stat[...] = u
                sigma_stat[...] = sigma
            values[path] = w_sn
        return _call_with(self.layer_instance, values, x, **kwargs)


class WeightNorm(nnx.Module):
    """Weight normalization of a wrapped layer's weights: ``g * v / ||v||`` per feature.

    Drop-in for ``flax.nnx.WeightNorm`` (see the module docstring for what differs).
    Each ``nnx.Param`` of ``layer_instance`` selected by ``variable_filter`` (an NNX
    filter on ``(path, variable)``; default ``nnx.PathContains('kernel')``) is
    replaced by :func:`jaxnorm.weight_normalize` of it: divided by its l2 norm over
    the axes not in ``feature_axes``, times ``scales[path]`` (shape: the param's shape
    at ``feature_axes``; only with ``use_scale``).

    Args:
      layer_instance: the wrapped module; its params must not change shape later.
      feature_axes: the axes kept (one norm and one scale per index), default the
        last; ``None`` normalizes the whole tensor.
      use_scale: learn a scale ``g`` per feature; else the weights keep unit norm.
      scale_init: initializer of the scales (ones).
      epsilon: added to the squared norms.
      dtype: dtype of the normalized weights; ``None`` keeps each weight's dtype.
      param_dtype: dtype of the scales.
      variable_filter: which params to normalize.
      promote_dtype: accepted and kept, as flax's (which does not call it either).
      rngs: random generators; ``rngs.params()`` draws each scale's key.

    Example:
      >>> import jax.numpy as jnp, numpy as np
      >>> from flax import nnx
      >>> import jaxnorm.nnx as jnnx
      >>> rngs = nnx.Rngs(0)
      >>> layer = jnnx.WeightNorm(nnx.Linear(3, 4, rngs=rngs), rngs=rngs)
      >>> y = layer(jnp.ones((2, 3)))
      >>> type(layer.scales[('kernel',)]).__name__, layer.scales[('kernel',)].shape
      ('Param', (4,))
    """

    def __init__(
        self,
        layer_instance: nnx.Module,
        *,
        feature_axes: Axes | None = -1,
        use_scale: bool = True,
        scale_init: Initializer = initializers.ones,
        epsilon: float = 1e-12,
        dtype: Dtype | None = None,
        param_dtype: Dtype = jnp.float32,
        variable_filter: nnx.filterlib.Filter = _KERNELS,
        promote_dtype: PromoteDtypeFn = dtypes.promote_dtype,
        rngs: nnx.Rngs,
    ):
        self.layer_instance = layer_instance
        self.feature_axes = () if feature_axes is None else feature_axes
        self.use_scale = use_scale
        self.scale_init = scale_init
        self.epsilon = epsilon
        self.dtype = dtype
        self.param_dtype = param_dtype
        self.variable_filter = nnx.filterlib.to_predicate(variable_filter)
        self.promote_dtype = promote_dtype
        self.scales: dict | None = None
        if use_scale:
            scales = {}
            for path, param in self._selected():
                with _errors_at(self):
                    shape = _weight_calls.scale_shape(
                        f"the param {_path_str(path)!r}", tuple(param.shape), self.feature_axes
                    )
                scales[path] = nnx.Param(scale_init(rngs.params(), shape, param_dtype))
            self.scales = nnx.data(scales)

    def _selected(self) -> list[tuple[tuple, nnx.Variable]]:
        return [(p, v) for p, v in _params(self.layer_instance) if self.variable_filter(p, v)]

    def __call__(self, x: Any, *args: Any, **kwargs: Any) -> Any:
        """Call the wrapped layer with weight-normalized weights.

        Args:
          x: the wrapped layer's input.
          *args: further positional arguments of the wrapped layer's call.
          **kwargs: keyword arguments of the wrapped layer's call.

        Returns:
          The wrapped layer's output.

        Raises:
          ValueError: a selected param with no scale (the layer's params changed after
            the wrapper was built), or ``feature_axes`` that do not fit it.
        """
        values = {}
        for path, param in self._selected():
            scale = None
            if self.use_scale:
                scale = self.scales.get(path)
                if scale is None:
                    raise ValueError(
                        f"{_name(self)}: no scales[{path!r}] for the param "
                        f"{_path_str(path)!r} of layer_instance; its params changed after "
                        f"the wrapper was built (scales has {sorted(self.scales)}). Build "
                        f"the WeightNorm after the layer's final params exist."
                    )
                scale = scale[...]
            with _errors_at(self):
                values[path] = weight_normalize(
                    param[...],
                    scale,
                    feature_axes=self.feature_axes,
                    epsilon=self.epsilon,
                    dtype=self.dtype,
                )
        return _call_with(self.layer_instance, values, x, *args, **kwargs)
