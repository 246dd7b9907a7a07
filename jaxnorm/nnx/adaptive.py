"""Adaptive and conditional norms for NNX: AdaLNZero (DiT), ConditionalBatchNorm."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from flax.typing import Dtype, Initializer
from typing_extensions import Unpack

from jaxnorm._layer_calls import ConditionalBatchNormCall
from jaxnorm._signatures import extends
from jaxnorm.functional.adaptive import Modulation, split_modulation
from jaxnorm.nnx._base import (
    _BatchNormBase,
)
from jaxnorm.nnx.batch_norm import BatchNorm, BatchNormOptions
from jaxnorm.state import init_batch_stats


class AdaLNZero(nnx.Module):
    """DiT's adaLN(-Zero) modulation: conditioning ``c`` -> shift, scale (and gate) per branch.

    ``SiLU`` then a zero-initialized ``nnx.Linear(in_features, num_modulations * 3 *
    features)`` (``self.modulation``), split in DiT's order into ``num_modulations``
    :class:`~jaxnorm.functional.adaptive.Modulation` s; see
    :class:`jaxnorm.linen.AdaLNZero` for the formula and the block that uses it. At
    init every shift, scale and gate is 0: :func:`jaxnorm.ada_layer_norm` is a plain
    LayerNorm and a gated residual is the identity.

    Args:
      in_features: width of the conditioning vector ``c``.
      features: ``C``, the width of the normalized activations.
      num_modulations: normalized branches modulated (DiT block: 2).
      use_gate: produce a gate per modulation; ``False`` for shift/scale only.
      activation: applied to ``c`` first (DiT: SiLU).
      use_bias: the projection has a bias.
      kernel_init: initializer of the projection's kernel (zeros: adaLN-Zero).
      bias_init: initializer of its bias (zeros).
      dtype: computation dtype of the projection.
      param_dtype: dtype of its Params.
      precision: ``nnx.Linear``'s precision.
      rngs: random generators for the initializers.

    Example:
      >>> import jax.numpy as jnp, jaxnorm.nnx as jnnx
      >>> from flax import nnx
      >>> ada = jnnx.AdaLNZero(8, 4, rngs=nnx.Rngs(0))
      >>> m_attn, m_mlp = ada(jnp.ones((2, 8)))
      >>> m_mlp.scale.shape, float(abs(m_mlp.gate).max())
      ((2, 4), 0.0)

    References:
      Peebles & Xie (2023), "Scalable Diffusion Models with Transformers".
    """

    def __init__(
        self,
        in_features: int,
        features: int,
        *,
        num_modulations: int = 2,
        use_gate: bool = True,
        activation: Callable[[jax.Array], jax.Array] = nnx.silu,
        use_bias: bool = True,
        kernel_init: Initializer = nnx.initializers.zeros,
        bias_init: Initializer = nnx.initializers.zeros,
        dtype: Dtype | None = None,
        param_dtype: Dtype = jnp.float32,
        precision: Any = None,
        rngs: nnx.Rngs,
    ):
        per = 3 if use_gate else 2
        self.modulation = nnx.Linear(
            in_features,
            num_modulations * per * features,
            use_bias=use_bias,
            kernel_init=kernel_init,
            bias_init=bias_init,
            dtype=dtype,
            param_dtype=param_dtype,
            precision=precision,
            rngs=rngs,
        )
        self.features = features
        self.num_modulations = num_modulations
        self.use_gate = use_gate
        self.activation = activation

    def __call__(self, c: jax.Array) -> tuple[Modulation, ...]:
        """Project the conditioning ``c`` (``(N, in_features)``) to the modulations.

        Args:
          c: the conditioning vector.

        Returns:
          ``num_modulations`` :class:`~jaxnorm.functional.adaptive.Modulation` s, each
          field ``(N, features)``.
        """
        h = self.modulation(self.activation(c))
        return split_modulation(h, num_modulations=self.num_modulations, use_gate=self.use_gate)


class ConditionalBatchNorm(ConditionalBatchNormCall, _BatchNormBase):
    """Class-conditional BatchNorm, via :func:`jaxnorm.conditional_batch_norm`.

    :class:`BatchNorm`'s constructor, BatchStats ``mean``/``var`` (shared by the
    classes) and modes, with Params ``scale`` and ``bias`` of shape
    ``(num_classes, num_features)`` (class embeddings; ones and zeros at init) indexed
    by the integer ``labels`` of the batch (axis 0):
    ``y_n = (x_n - mu) / sqrt(var + eps) * scale[labels[n]] + bias[labels[n]]``.

    Args:
      num_features: size of the feature axis (the product of sizes for several axes).
      num_classes: rows of the ``scale``/``bias`` tables.
      (the rest): as :class:`BatchNorm`.

    Example:
      >>> import jax.numpy as jnp, jaxnorm.nnx as jnnx
      >>> from flax import nnx
      >>> cbn = jnnx.ConditionalBatchNorm(3, 10, use_running_average=False, rngs=nnx.Rngs(0))
      >>> y = cbn(jnp.ones((4, 3)), jnp.array([0, 3, 3, 9]))
      >>> cbn.scale.shape, cbn.mean.shape
      ((10, 3), (3,))
    """

    @extends(BatchNorm.__init__)
    def __init__(self, num_features: int, num_classes: int, **options: Unpack[BatchNormOptions]):
        # The base makes (num_features,) Params; the tables are made here instead.
        super().__init__(
            init_batch_stats((num_features,)),
            with_count=options["momentum"] is None or options["track_count"],
            num_features=num_features,
            num_classes=num_classes,
            **{**options, "use_scale": False, "use_bias": False},
        )
        shape = (num_classes, num_features)
        for name in ("scale", "bias"):
            use, init = options[f"use_{name}"], options[f"{name}_init"]
            param = nnx.Param(init(options["rngs"].params(), shape, options["param_dtype"]),
                              **options[f"{name}_metadata"])  # fmt: skip
            setattr(self, name, param if use else nnx.data(None))
            setattr(self, f"use_{name}", use)

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
          use_running_average: overrides the attribute for this call when not ``None``.
          mask: optional boolean array broadcastable to ``x``.

        Returns:
          The normalized ``x``, of dtype ``self.dtype or x.dtype``.

        Raises:
          ValueError: the mode is not set, or the core's refusals (bad ``labels``, ...).
        """
        return self._apply(x, use_running_average, mask, labels=labels)

    def _inputs(self, x: jax.Array, feature_shape: tuple[int, ...], *variables: jax.Array):
        """As the base, with the ``(num_classes, num_features)`` tables fitted to
        ``(num_classes, *feature_shape)``."""
        x, scale, bias, dtype = super()._inputs(x, feature_shape, *variables)
        scale, bias = (
            None if t is None else jnp.reshape(t, (-1, *feature_shape)) for t in (scale, bias)
        )
        return x, scale, bias, dtype
