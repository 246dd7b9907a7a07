"""``jaxnorm.linen.DyT``: Dynamic Tanh, a statistics-free stand-in for LayerNorm."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.typing import Dtype, Initializer
from jax.nn import initializers

from jaxnorm._checks import Axes
from jaxnorm._layer_calls import DyTCall
from jaxnorm.linen._base import _PerSampleNorm


class DyT(DyTCall, _PerSampleNorm):
    """Dynamic Tanh, ``scale * tanh(alpha * x) + bias``, via :func:`jaxnorm.dyt`.

    .. math::

        y = \\gamma \\odot \\tanh(\\alpha x) + \\beta

    A drop-in for :class:`LayerNorm` in a Transformer (Zhu et al. 2025): the learnable
    scalar ``alpha`` (``params/alpha``, shape ``()``, initialized to ``alpha_init``)
    and the per-channel ``scale`` (ones) and ``bias`` (zeros) on ``feature_axes``, as
    the paper's ``DynamicTanh`` (whose ``alpha`` has shape ``(1,)``, ``weight`` is our
    ``scale``). The paper keeps ``alpha_init=0.5`` for most models but tunes it for
    language models (smaller for wider models; a larger value for the DyT layers in
    attention blocks than for the others), hence the field. A ``mask`` is accepted
    and ignored: DyT has no statistics.

    Attributes:
      alpha_init: the initial ``alpha``.
      dtype: output dtype; ``None`` keeps the input's dtype.
      param_dtype: dtype of ``alpha``/``scale``/``bias``.
      use_bias: add a learned ``bias``.
      use_scale: multiply by a learned ``scale``.
      bias_init: initializer for ``bias``.
      scale_init: initializer for ``scale``.
      feature_axes: axes that carry ``scale``/``bias`` (default the last; 1 for NCHW).

    Example:
      >>> import jax, jax.numpy as jnp, jaxnorm.linen as jnn
      >>> x = jnp.array([[-2.0, 0.0, 2.0]])
      >>> layer = jnn.DyT()
      >>> y = layer.apply(layer.init(jax.random.key(0), x), x)  # tanh(0.5 x) at init
      >>> [round(float(v), 4) for v in y[0]]
      [-0.7616, 0.0, 0.7616]

    References:
      Zhu, Chen, He, LeCun & Liu (2025), "Transformers without Normalization".
    """

    alpha_init: float = 0.5
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32
    use_bias: bool = True
    use_scale: bool = True
    bias_init: Initializer = initializers.zeros
    scale_init: Initializer = initializers.ones
    feature_axes: Axes = -1

    @nn.nowrap
    def _alpha(self) -> jax.Array:
        return self._param_of("alpha", initializers.constant(self.alpha_init), ())
