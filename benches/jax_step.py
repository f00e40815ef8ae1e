#!/usr/bin/env python3
"""The peer of `cargo bench --bench step`: the same three training steps in
JAX under `jax.jit`, on the CPU, for the ratio `docs/performance.md`
reports.

Each step is what gradc's step graph computes for `benches/step.rs`'s
MLPs: a ReLU MLP in f32, mean softmax cross-entropy, its gradient, and an
SGD update (lr 0.01), compiled once by `jax.jit` with the params donated,
timed with `block_until_ready` after 3 warm-up steps: tiny 64-32-10 at
batch 32 (1,000 steps), medium 64-256-256-10 at batch 128 (100 steps) and
large 784-1024-1024-10 at batch 256 (10 steps), the median and the
minimum. Run it right after the Rust bench on the same machine:

    pip install jax jaxlib numpy
    python3 benches/jax_step.py            # all three
    python3 benches/jax_step.py tiny       # some
"""

import os
import statistics
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

MODELS = {
    "tiny": ([64, 32, 10], 32, 1000),
    "medium": ([64, 256, 256, 10], 128, 100),
    "large": ([784, 1024, 1024, 10], 256, 10),
}


def init(layers, rng):
    params = []
    for fan_in, fan_out in zip(layers, layers[1:]):
        bound = np.sqrt(6.0 / fan_in)
        w = rng.uniform(-bound, bound, (fan_in, fan_out)).astype(np.float32)
        params.append((jnp.asarray(w), jnp.zeros(fan_out, jnp.float32)))
    return params


def loss(params, x, y):
    h = x
    for i, (w, b) in enumerate(params):
        h = h @ w + b
        if i + 1 < len(params):
            h = jax.nn.relu(h)
    log_p = jax.nn.log_softmax(h, axis=1)
    return -jnp.mean(jnp.take_along_axis(log_p, y[:, None], axis=1))


def step(params, x, y):
    value, grads = jax.value_and_grad(loss)(params, x, y)
    params = jax.tree_util.tree_map(lambda p, g: p - 0.01 * g, params, grads)
    return params, value


def bench(name):
    layers, batch, steps = MODELS[name]
    rng = np.random.default_rng(0)
    params = init(layers, rng)
    x = jnp.asarray(rng.uniform(0, 1, (batch, layers[0])).astype(np.float32))
    y = jnp.asarray(rng.integers(0, layers[-1], batch).astype(np.int32))
    compiled = jax.jit(step, donate_argnums=0)
    for _ in range(3):
        params, value = compiled(params, x, y)
    value.block_until_ready()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        params, value = compiled(params, x, y)
        value.block_until_ready()
        times.append(time.perf_counter() - start)
    median = statistics.median(times) * 1e6
    print(
        f"jax jit step, {name} ({'-'.join(map(str, layers))}), batch {batch}: "
        f"median {median:.1f} us, min {min(times) * 1e6:.1f} us over {steps} steps"
    )


def main():
    names = sys.argv[1:] or list(MODELS)
    print(f"jax {jax.__version__} on {jax.devices()[0].platform}")
    for name in names:
        bench(name)


if __name__ == "__main__":
    main()
