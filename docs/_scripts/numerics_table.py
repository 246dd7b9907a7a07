"""The table of docs/numerics.md: E[x²]−E[x]² against jaxnorm and flax, float32, large means.

Run: ``python docs/_scripts/numerics_table.py`` (a few seconds on CPU). Every number is
measured against float64 NumPy on the same float32 values.
"""

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

import jaxnorm


def main() -> None:
    rng = np.random.default_rng(0)
    print(f"jax {jax.__version__}, flax {flax.__version__}, {jax.default_backend()}")
    print(
        "| mean | E[x²]−E[x]² var rel. error | jaxnorm.moments var rel. error "
        "| flax LayerNorm std | jaxnorm layer_norm std | jaxnorm LN error after offset "
        "| flax BatchNorm std | jaxnorm batch_norm std |"
    )
    for mean in [1e2, 1e3, 1e4, 1e5, 1e6]:
        x = jnp.asarray(mean + rng.standard_normal((64, 1024)), jnp.float32)
        x64 = np.asarray(x, np.float64)
        true_var = x64.var(axis=-1)

        def rel(v, true_var=true_var):
            return float(np.max(np.abs(np.asarray(v, np.float64).ravel() - true_var) / true_var))

        naive = jnp.mean(x * x, -1) - jnp.mean(x, -1) ** 2
        ours = jaxnorm.moments(x, (1,)).var
        y_flax = np.asarray(nn.LayerNorm(use_scale=False, use_bias=False).apply({}, x))
        y_ours = np.asarray(jaxnorm.layer_norm(x), np.float64)
        ref = (x64 - x64.mean(-1, keepdims=True)) / np.sqrt(true_var[:, None] + 1e-6)
        err = y_ours - ref
        err -= err.mean(-1, keepdims=True)  # the shared offset of a float32 mean
        xb = jnp.asarray(mean + rng.standard_normal((4096, 16)), jnp.float32)
        bn = nn.BatchNorm(use_running_average=False, use_scale=False, use_bias=False)
        yb_flax, _ = bn.apply(bn.init(jax.random.key(0), xb), xb, mutable=["batch_stats"])
        yb_ours, _ = jaxnorm.batch_norm(xb, jaxnorm.init_batch_stats(16), training=True)
        print(
            f"| {mean:.0e} | {rel(naive):.2g} | {rel(ours):.1e} | {y_flax.std(-1).max():.4g} "
            f"| {y_ours.std(-1).max():.6f} | {np.abs(err).max():.1e} "
            f"| {np.asarray(yb_flax).std(0).max():.4g} | {np.asarray(yb_ours).std(0).max():.6f} |"
        )


if __name__ == "__main__":
    main()
