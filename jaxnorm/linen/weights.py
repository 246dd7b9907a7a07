"""Weight-norm wrappers for linen: :class:`SpectralNorm` and :class:`WeightNorm`.

Each wraps a layer instance, as ``flax.linen.SpectralNorm``/``WeightNorm`` do, with
their fields, defaults, call signatures and variable trees: the wrapped layer's
params stay where they are, and the wrapper holds its own variables under names
built from the wrapped layer's name and the variable's path inside it
(``'Dense_1/kernel/u'``, ``'Dense_1/kernel/sigma'`` in ``batch_stats``;
``'Dense_1/kernel/scale'`` in ``params``). The normalized weights are a *view* the
wrapped layer computes with (``nn.map_variables``); they are never stored.

What differs from flax, on purpose:

* Only the wrapped layer's ``params`` are normalized (flax maps every collection, so
  it would also normalize, say, the ``u`` of a nested ``SpectralNorm``).
* flax's ``init`` stores the normalized kernel as the layer's param (its
  ``map_variables`` writes the view back, promoted to float32 for a bfloat16 kernel;
  so does an ``apply`` with ``params`` mutable). Ours keeps the initializer's kernel.
* The normalized weight has dtype ``dtype or`` the weight's dtype (flax promotes a
  bfloat16 kernel with float32 ``u`` or ``scale`` to float32), and the power
  iteration runs in at least float32; ``u`` and ``sigma`` keep their stored dtype.
* ``SpectralNorm(use_stored_sigma=True)`` evaluates (``update_stats=False``) by
  dividing by the stored ``sigma`` without power iteration: torch's eval mode, and
  what :func:`jaxnorm.interop.torch.from_torch` prepares for a torch
  ``spectral_norm`` layer. flax stores ``sigma`` but never reads it; with the
  default ``False`` evaluation runs ``n_steps`` iterations from the stored ``u``, as
  flax does.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Iterable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.typing import Dtype, Initializer
from jax.nn import initializers

from jaxnorm import _weight_calls
from jaxnorm._checks import Axes
from jaxnorm.functional.weights import weight_normalize
from jaxnorm.linen._base import _Layer


def _call_normalized(module: nn.Module, args, kwargs, transform: Callable) -> Any:
    """Call ``module.layer_instance`` with its ``params`` replaced by ``transform``'s view.

    At init the layer is first called as is, so its params are created (and stored)
    unnormalized; the view is then read-only (``mutable=False``), so nothing the
    layer computes with is written back.
    """
    if module.is_initializing():
        module.layer_instance(*args, **kwargs)

    def trans_in(variables):
        return {
            col: jax.tree_util.tree_map_with_path(transform, tree) if col == "params" else tree
            for col, tree in variables.items()
        }

    return nn.map_variables(
        lambda layer: layer(*args, **kwargs),
        mapped_collections="params",
        trans_in_fn=trans_in,
        init=False,
        mutable=False,
    )(module.layer_instance)


def _key_path(layer_name: str, path) -> str:
    """``'Dense_1/kernel'``: the wrapped layer's name, then the variable's path in it."""
    return layer_name + "/" + jax.tree_util.keystr(tuple(path), simple=True, separator="/")


class SpectralNorm(_Layer):
    """Spectral normalization of a wrapped layer's weights: ``W / sigma_max(W)``.

    Drop-in for ``flax.linen.SpectralNorm``. Every param of ``layer_instance`` of rank
    >= 2 is viewed as a matrix ``(-1, shape[-1])`` (output features last) and divided
    by its largest singular value, estimated by :func:`jaxnorm.spectral_normalize`
    (``n_steps`` power iterations from the stored ``u``); scalars and vectors pass
    unchanged. The state lives in ``collection_name``: ``'<layer>/<path>/u'``
    ``(1, shape[-1])`` (drawn from a standard normal at init) and
    ``'<layer>/<path>/sigma'`` ``()`` (1 at init), in ``param_dtype``.

    Usage: ``y = SpectralNorm(nn.Dense(4))(x, update_stats=train)``; while training
    pass ``update_stats=True`` and ``mutable=['batch_stats']`` so the power iteration
    continues from one step to the next.

    Attributes:
      layer_instance: the wrapped module.
      n_steps: power iterations per call; ``< 1`` leaves every weight unnormalized
        (as flax).
      epsilon: added to the squared norms in the power iteration.
      dtype: dtype of the normalized weights; ``None`` keeps each weight's dtype.
      param_dtype: dtype of ``u`` and ``sigma``.
      error_on_non_matrix: refuse weights of rank > 2 instead of flattening them.
      collection_name: the collection holding ``u`` and ``sigma``.
      use_stored_sigma: when not updating stats, divide by the stored ``sigma``
        without power iteration (torch's eval mode); ``False`` iterates (flax).

    Example:
      >>> import jax, jax.numpy as jnp, flax.linen as nn
      >>> import jaxnorm.linen as jnn
      >>> class Net(nn.Module):
      ...     @nn.compact
      ...     def __call__(self, x, train: bool):
      ...         return jnn.SpectralNorm(nn.Dense(4))(x, update_stats=train)
      >>> x = jnp.ones((2, 3))
      >>> variables = Net().init(jax.random.key(0), x, train=False)
      >>> jax.tree.map(jnp.shape, variables['batch_stats'])
      {'SpectralNorm_0': {'Dense_0/kernel/sigma': (), 'Dense_0/kernel/u': (1, 4)}}
      >>> y, updates = Net().apply(variables, x, train=True, mutable=['batch_stats'])

    References:
      Miyato, Kataoka, Koyama & Yoshida (2018), "Spectral Normalization for Generative
      Adversarial Networks".
    """

    layer_instance: nn.Module
    n_steps: int = 1
    epsilon: float = 1e-12
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32
    error_on_non_matrix: bool = False
    collection_name: str = "batch_stats"
    use_stored_sigma: bool = False

    @nn.compact
    def __call__(self, *args, update_stats: bool, **kwargs) -> Any:
        """Call the wrapped layer with spectrally normalized weights.

        Args:
          *args: positional arguments of the wrapped layer's call.
          update_stats: store the new ``u`` and ``sigma`` (needs
            ``mutable=[collection_name]``); ``False`` to evaluate.
          **kwargs: keyword arguments of the wrapped layer's call.

        Returns:
          The wrapped layer's output.

        Raises:
          TypeError: an ``update_stats`` that is not a bool.
          ValueError: ``update_stats=True`` with ``collection_name`` immutable; a
            weight of rank > 2 with ``error_on_non_matrix``.
        """
        where = self._where()
        _weight_calls.check_update_stats(where, update_stats)
        col = self.collection_name
        if update_stats and not self.is_initializing() and not self.is_mutable_collection(col):
            raise ValueError(
                f"{where}: update_stats=True writes the power-iteration state u and sigma to "
                f"the {col!r} collection, which is not mutable in this apply. Pass "
                f"mutable=[{col!r}] to apply (and keep the updated variables), or "
                f"update_stats=False to evaluate."
            )
        transform = functools.partial(self._spectral_normalize, update_stats=update_stats)
        return _call_normalized(self, args, kwargs, transform)

    @nn.nowrap
    def _spectral_normalize(self, path, value: jax.Array, *, update_stats: bool) -> jax.Array:
        key = _key_path(self.layer_instance.name, path)
        width = _weight_calls.spectral_width(
            f"{self._where()}: the weight {key!r}",
            jnp.shape(value),
            n_steps=self.n_steps,
            error_on_non_matrix=self.error_on_non_matrix,
        )
        if width is None:
            return value
        col = self.collection_name
        u_var = self.variable(
            col,
            key + "/u",
            jax.random.normal,
            self.make_rng("params") if not self.has_variable(col, key + "/u") else None,
            (1, width),
            self.param_dtype,
        )
        sigma_var = self.variable(col, key + "/sigma", jnp.ones, (), self.param_dtype)
        with self._errors():
            w_sn, u, sigma = _weight_calls.spectral_call(
                value,
                u_var.value,
                sigma_var.value,
                update_stats=update_stats,
                use_stored_sigma=self.use_stored_sigma,
                n_steps=self.n_steps,
                epsilon=self.epsilon,
                dtype=self.dtype,
            )
        if update_stats:
            u_var.value = u
            sigma_var.value = sigma
        return w_sn


class WeightNorm(_Layer):
    """Weight normalization of a wrapped layer's weights: ``g * v / ||v||`` per feature.

    Drop-in for ``flax.linen.WeightNorm``. Each param of ``layer_instance`` whose key
    path ``'<layer>/<path>'`` contains one of the strings in ``variable_filter`` (a
    substring test, as flax's: ``{'kernel'}`` by default, ``None`` for every param) is
    replaced by :func:`jaxnorm.weight_normalize` of it: divided by its l2 norm over the
    axes not in ``feature_axes`` and multiplied by the param ``'<layer>/<path>/scale'``
    (shape: the weight's shape at ``feature_axes``; created only with ``use_scale``).

    Attributes:
      layer_instance: the wrapped module.
      epsilon: added to the squared norms.
      dtype: dtype of the normalized weights; ``None`` keeps each weight's dtype.
      param_dtype: dtype of the ``scale`` params.
      use_scale: learn a ``scale`` (``g``) per feature; else the weights keep unit norm.
      scale_init: initializer of ``scale`` (ones).
      feature_axes: the axes kept (one norm and one ``g`` per index), default the last
        (the output features of a flax kernel); ``None`` normalizes the whole tensor.
      variable_filter: substrings selecting the params to normalize; ``None`` or empty
        selects all.

    Example:
      >>> import jax, jax.numpy as jnp, flax.linen as nn
      >>> import jaxnorm.linen as jnn
      >>> class Net(nn.Module):
      ...     @nn.compact
      ...     def __call__(self, x):
      ...         return jnn.WeightNorm(nn.Dense(4))(x)
      >>> variables = Net().init(jax.random.key(0), jnp.ones((2, 3)))
      >>> jax.tree.map(jnp.shape, variables['params'])
      {'Dense_0': {'bias': (4,), 'kernel': (3, 4)}, 'WeightNorm_0': {'Dense_0/kernel/scale': (4,)}}

    References:
      Salimans & Kingma (2016), "Weight Normalization: A Simple Reparameterization to
      Accelerate Training of Deep Neural Networks".
    """

    layer_instance: nn.Module
    epsilon: float = 1e-12
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32
    use_scale: bool = True
    scale_init: Initializer = initializers.ones
    feature_axes: Axes | None = -1
    variable_filter: Iterable | None = dataclasses.field(default_factory=lambda: {"kernel"})

    @nn.compact
    def __call__(self, *args, **kwargs) -> Any:
        """Call the wrapped layer with weight-normalized weights.

        Args:
          *args: positional arguments of the wrapped layer's call.
          **kwargs: keyword arguments of the wrapped layer's call.

        Returns:
          The wrapped layer's output.

        Raises:
          ValueError, TypeError: ``feature_axes`` that do not fit a selected weight, or a
            stored ``scale`` of the wrong shape, prefixed with this module's path.
        """
        return _call_normalized(self, args, kwargs, self._weight_normalize)

    @nn.nowrap
    def _weight_normalize(self, path, value: jax.Array) -> jax.Array:
        key = _key_path(self.layer_instance.name, path)
        if self.variable_filter and not any(name in key for name in self.variable_filter):
            return value
        with self._errors():
            shape = _weight_calls.scale_shape(
                f"the weight {key!r}", jnp.shape(value), self.feature_axes
            )
        scale = self._param_of(key + "/scale", self.scale_init, shape) if self.use_scale else None
        with self._errors():
            return weight_normalize(
                value,
                scale,
                feature_axes=self.feature_axes,
                epsilon=self.epsilon,
                dtype=self.dtype,
            )
