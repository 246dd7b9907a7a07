"""Adaptive and conditional norms for linen: AdaLNZero (DiT), ConditionalBatchNorm."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.typing import Dtype, Initializer
from jax.nn import initializers

from jaxnorm._layer_calls import ConditionalBatchNormCall
from jaxnorm.functional.adaptive import Modulation, split_modulation
from jaxnorm.linen.batch_norm import BatchNorm


class AdaLNZero(nn.Module):
    """DiT's adaLN(-Zero) modulation: conditioning ``c`` -> shift, scale (and gate) per branch.

    .. math::

        (b_1, s_1, g_1, \\dots, b_m, s_m, g_m) = W\\,\\mathrm{SiLU}(c) + w_0

    split in DiT's order (``adaLN_modulation = Sequential(SiLU(), Linear(D, 6 * D))``
    then ``.chunk(6, dim=1)``), returned as ``num_modulations`` :class:`Modulation`
    s. ``W`` and ``w_0`` start at zero (adaLN-**Zero**): every shift, scale and gate is
    0, so :func:`jaxnorm.ada_layer_norm` starts as a plain LayerNorm and a gated
    residual ``x + gate * branch(...)`` as the identity, while the gates still get
    gradients. A block uses one modulation per normalized branch::

        m_attn, m_mlp = AdaLNZero(features=D)(c)
        x = x + m_attn.gate[:, None] * attn(jaxnorm.ada_layer_norm(x, m_attn.shift, m_attn.scale))
        x = x + m_mlp.gate[:, None] * mlp(jaxnorm.ada_layer_norm(x, m_mlp.shift, m_mlp.scale))

    ``use_gate=False, num_modulations=1`` is DiT's final layer; a non-zero
    ``kernel_init`` gives the plain adaLN (the paper's "adaLN" baseline). Variables:
    ``params/modulation/{kernel, bias}`` (a ``flax.linen.Dense``), kernel of shape
    ``(cond_dim, num_modulations * (3 or 2) * features)``; torch's ``Linear.weight``
    is its transpose.

    Attributes:
      features: ``C``, the width of the normalized activations.
      num_modulations: normalized branches modulated (DiT block: 2, attention and MLP).
      use_gate: produce a gate per modulation (adaLN-Zero); ``False`` for shift/scale.
      activation: applied to ``c`` first (DiT: SiLU).
      use_bias: the projection has a bias.
      kernel_init: initializer of the projection's kernel (zeros: adaLN-Zero).
      bias_init: initializer of its bias (zeros).
      dtype: computation dtype of the projection (``None``: inferred, as ``Dense``).
      param_dtype: dtype of its parameters.
      precision: ``Dense``'s precision.

    Example:
      >>> import jax, jax.numpy as jnp, jaxnorm.linen as jnn
      >>> ada = jnn.AdaLNZero(features=4)
      >>> c = jnp.ones((2, 8))
      >>> m_attn, m_mlp = ada.apply(ada.init(jax.random.key(0), c), c)
      >>> m_attn.gate.shape, float(abs(m_attn.gate).max())  # zero at init
      ((2, 4), 0.0)

    References:
      Peebles & Xie (2023), "Scalable Diffusion Models with Transformers".
    """

    features: int
    num_modulations: int = 2
    use_gate: bool = True
    activation: Callable[[jax.Array], jax.Array] = nn.silu
    use_bias: bool = True
    kernel_init: Initializer = initializers.zeros
    bias_init: Initializer = initializers.zeros
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32
    precision: Any = None

    @nn.compact
    def __call__(self, c: jax.Array) -> tuple[Modulation, ...]:
        """Project the conditioning ``c`` (``(N, cond_dim)``) to the modulations.

        Args:
          c: the conditioning vector (DiT: timestep plus class embedding), ``(N, D_c)``.

        Returns:
          ``num_modulations`` :class:`Modulation` s, each field ``(N, features)``.
        """
        per = 3 if self.use_gate else 2
        h = nn.Dense(
            self.num_modulations * per * self.features,
            use_bias=self.use_bias,
            kernel_init=self.kernel_init,
            bias_init=self.bias_init,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            precision=self.precision,
            name="modulation",
        )(self.activation(c))
        return split_modulation(h, num_modulations=self.num_modulations, use_gate=self.use_gate)


class _NumClasses(nn.Module):
    """ConditionalBatchNorm's first, positional field (fields of a later base come first)."""

    num_classes: int


class ConditionalBatchNorm(ConditionalBatchNormCall, BatchNorm, _NumClasses):
    """Class-conditional BatchNorm, via :func:`jaxnorm.conditional_batch_norm`.

    .. math::

        y_n = \\frac{x_n - \\mu}{\\sqrt{\\sigma^2 + \\epsilon}}\\,\\gamma_{c_n} + \\beta_{c_n}

    :class:`BatchNorm`'s fields, running statistics (``batch_stats/{mean, var}``,
    shared by the classes) and modes, with ``params/scale`` and ``params/bias`` tables
    of shape ``(num_classes, *feature_shape)`` (BigGAN/SNGAN's class embeddings, ones
    and zeros at init) indexed by the integer ``labels`` of the batch (axis 0).

    Attributes:
      num_classes: rows of the ``scale``/``bias`` tables (the first, positional field).
      (the rest): as :class:`BatchNorm`.

    Example:
      >>> import jax, jax.numpy as jnp, jaxnorm.linen as jnn
      >>> cbn = jnn.ConditionalBatchNorm(10, use_running_average=False)
      >>> x, labels = jnp.ones((4, 3)), jnp.array([0, 3, 3, 9])
      >>> variables = cbn.init(jax.random.key(0), x, labels)
      >>> variables["params"]["scale"].shape, variables["batch_stats"]["mean"].shape
      ((10, 3), (3,))
      >>> y, updates = cbn.apply(variables, x, labels, mutable=["batch_stats"])
    """

    @nn.compact
    def __call__(  # type: ignore[override]
        self,
        x: jax.Array,
        labels: jax.Array,
        use_running_average: bool | None = None,
        *,
        mask: jax.Array | None = None,
    ) -> jax.Array:
        """Normalize ``x``, then scale and shift each example by its class's row.

        Args:
          x: floating input, batch axis 0.
          labels: integer class of each example, shape ``(N,)``.
          use_running_average: as :class:`BatchNorm`.
          mask: optional boolean array broadcastable to ``x``.

        Returns:
          The normalized ``x``, of dtype ``self.dtype or x.dtype``.

        Raises:
          ValueError: as :class:`BatchNorm`, and bad ``labels`` (the core's message).
        """
        return self._apply(x, use_running_average, mask, labels=labels)

    @nn.nowrap
    def _param_shape(self, feature_shape: tuple[int, ...]) -> tuple[int, ...]:
        """One row of ``scale``/``bias`` per class."""
        return (self.num_classes, *feature_shape)
