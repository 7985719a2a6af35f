"""Matrix-multiply speed of XLA (JAX) and torch on this device, side by side.

    python -m experiments.benchmark_matmul

The bound behind the model benchmark on CPU: a large square float32 matmul and an
attention-shaped batched matmul ([96, 128, 64] x [96, 64, 128]), alternating JAX and torch,
medians of the calls.
"""

from __future__ import annotations

import statistics
import time


def main() -> None:
    from funnel_jax.runtime import use_jemalloc

    use_jemalloc()
    import jax
    import jax.numpy as jnp
    import torch

    def timed(fn):
        start = time.perf_counter()
        fn()
        return time.perf_counter() - start

    n = 2048
    a = jax.random.normal(jax.random.PRNGKey(0), (n, n))
    square = jax.jit(lambda x: x @ x)
    square(a).block_until_ready()
    ta = torch.randn(n, n)
    js, ts = [], []
    for _ in range(7):
        js.append(timed(lambda: square(a).block_until_ready()))
        ts.append(timed(lambda: ta @ ta))
    flops = 2 * n**3
    print(
        f"{n}^3 float32: jax {flops / statistics.median(js) / 1e9:.0f} GFLOP/s, "
        f"torch {flops / statistics.median(ts) / 1e9:.0f} GFLOP/s"
    )
    q = jax.random.normal(jax.random.PRNGKey(1), (96, 128, 64))
    scores = jax.jit(lambda x: jnp.einsum("bsh,bth->bst", x, x))
    scores(q).block_until_ready()
    tq = torch.randn(96, 128, 64)
    js, ts = [], []
    for _ in range(20):
        js.append(timed(lambda: scores(q).block_until_ready()))
        ts.append(timed(lambda: torch.bmm(tq, tq.transpose(1, 2))))
    flops = 2 * 96 * 128 * 128 * 64
    print(
        f"batched [96,128,64]x[96,64,128]: jax {flops / statistics.median(js) / 1e9:.0f} GFLOP/s, "
        f"torch {flops / statistics.median(ts) / 1e9:.0f} GFLOP/s"
    )


if __name__ == "__main__":
    main()
