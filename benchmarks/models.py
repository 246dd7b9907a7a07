"""Whole-model rows: a jitted train step with jaxnorm's norms against flax's, same model.

The models are stand-ins with the experiments' shapes (a small MNIST CNN with batch norm,
a 2-layer pre-norm character Transformer with layer norm), defined here so that the
benchmark does not move when the experiments change. Each row reports the median step
time (interleaved repeats), the compile time, and XLA's compiled peak temporary memory.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

import jaxnorm.linen as jnn
from benchmarks.ops import row_progress, time_interleaved


class CNN(nn.Module):
    """Conv(16)-BN-ReLU-pool, Conv(32)-BN-ReLU-pool, Conv(64)-BN-ReLU, global pool, Dense."""

    bn: Callable[..., nn.Module]  # flax.linen.BatchNorm or jaxnorm.linen.BatchNorm

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        for i, width in enumerate((16, 32, 64)):
            x = nn.Conv(width, (3, 3), use_bias=False)(x)
            x = self.bn(use_running_average=not train, momentum=0.9)(x)
            x = nn.relu(x)
            if i < 2:
                x = nn.avg_pool(x, (2, 2), strides=(2, 2))
        return nn.Dense(10)(x.mean(axis=(1, 2)))


class Block(nn.Module):
    """Pre-norm Transformer block: LN-attention-residual, LN-MLP-residual."""

    ln: Callable[..., nn.Module]
    d_model: int = 128
    heads: int = 4

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        mask = nn.make_causal_mask(jnp.ones(x.shape[:2]))
        h = self.ln()(x)
        x = x + nn.MultiHeadDotProductAttention(num_heads=self.heads)(h, h, mask=mask)
        h = self.ln()(x)
        h = nn.Dense(4 * self.d_model)(h)
        return x + nn.Dense(self.d_model)(nn.gelu(h))


class CharTransformer(nn.Module):
    """Decoder-only: embeddings + learned positions, 2 blocks, final LN, logits."""

    ln: Callable[..., nn.Module]
    vocab: int = 67
    d_model: int = 128
    layers: int = 2

    @nn.compact
    def __call__(self, tokens: jax.Array, train: bool) -> jax.Array:
        del train
        x = nn.Embed(self.vocab, self.d_model)(tokens)
        pos = self.param("pos", nn.initializers.normal(0.02), (tokens.shape[1], self.d_model))
        x = x + pos
        for _ in range(self.layers):
            x = Block(self.ln, self.d_model)(x)
        return nn.Dense(self.vocab)(self.ln()(x))


def _train_step(model: nn.Module, tx: optax.GradientTransformation) -> Callable:
    def step(params, batch_stats, opt_state, x, y):
        def loss_fn(p):
            variables = {"params": p}
            if batch_stats:
                variables["batch_stats"] = batch_stats
                logits, upd = model.apply(variables, x, True, mutable=["batch_stats"])
                new_stats = upd["batch_stats"]
            else:
                logits, new_stats = model.apply(variables, x, True), batch_stats
            loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
            return loss, new_stats

        (loss, new_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), new_stats, opt_state, loss

    return step


def _setup(name: str, impl: str) -> tuple[Callable, tuple[Any, ...]]:
    key = jax.random.key(0)
    if name == "cnn_mnist_bn":
        bn = jnn.BatchNorm if impl == "jaxnorm" else nn.BatchNorm
        model = CNN(bn)
        x = jax.random.normal(key, (128, 28, 28, 1))
        y = jax.random.randint(key, (128,), 0, 10)
    else:
        ln = jnn.LayerNorm if impl == "jaxnorm" else nn.LayerNorm
        model = CharTransformer(ln)
        x = jax.random.randint(key, (32, 128), 0, 67)
        y = jax.random.randint(jax.random.key(1), (32, 128), 0, 67)
    variables = model.init(key, x, False)
    tx = optax.adamw(1e-3)
    params = variables["params"]
    args = (params, variables.get("batch_stats", {}), tx.init(params), x, y)
    return _train_step(model, tx), args


def run_model_rows(repeats: int = 9) -> list[dict]:
    """Time both models with jaxnorm and flax norms; print and return the rows."""
    rows = []
    names = ("cnn_mnist_bn", "transformer_char_ln")
    with row_progress(len(names), repeats, desc="model rows"):
        for name in names:
            rows.append(_model_row(name, repeats))
            print(format_model_row(rows[-1]), flush=True)
    return rows


def _model_row(name: str, repeats: int) -> dict:
    """One model's row: both implementations compiled, then timed interleaved."""
    compiled, info = {}, {}
    for impl in ("jaxnorm", "flax"):
        step, args = _setup(name, impl)
        t0 = time.perf_counter()
        exe = jax.jit(step).lower(*args).compile()
        compile_s = time.perf_counter() - t0
        mem = exe.memory_analysis()
        temp = getattr(mem, "temp_size_in_bytes", None) if mem is not None else None
        compiled[impl] = lambda exe=exe, args=args: exe(*args)
        info[impl] = {"compile_s": compile_s, "temp_bytes": temp}
    timing = time_interleaved(compiled, repeats, min_time=0.05)
    row = {
        "model": name,
        "timing": timing,
        "info": info,
        "step_ratio_jaxnorm/flax": timing["jaxnorm"]["median_s"] / timing["flax"]["median_s"],
    }
    if info["jaxnorm"]["temp_bytes"] and info["flax"]["temp_bytes"]:
        row["temp_ratio_jaxnorm/flax"] = info["jaxnorm"]["temp_bytes"] / info["flax"]["temp_bytes"]
    return row


def format_model_row(row: dict) -> str:
    """One line: step ms, ratio, compile s, temp MiB for each implementation."""
    t, i = row["timing"], row["info"]

    def mib(b):
        return "?" if b is None else f"{b / 2**20:.1f}"

    return (
        f"{row['model']:<22} step ms jaxnorm {t['jaxnorm']['median_s'] * 1e3:.1f} "
        f"flax {t['flax']['median_s'] * 1e3:.1f} (ratio {row['step_ratio_jaxnorm/flax']:.2f}) "
        f"| compile s {i['jaxnorm']['compile_s']:.1f} / {i['flax']['compile_s']:.1f} "
        f"| temp MiB {mib(i['jaxnorm']['temp_bytes'])} / {mib(i['flax']['temp_bytes'])}"
    )
