#!/usr/bin/env python3
"""The peer of `cargo bench --bench sequence`: the same two training steps
in JAX under `jax.jit`, on the CPU, for the ratio `docs/performance.md`
reports.

- lstm: batch 64, 8 steps of 32 features, hidden 128, an LSTM cell
  (PyTorch's gate order) over `jax.lax.scan`, cross-entropy of the last
  step's state through a 128x10 layer;
- attention: batch 32, 64 tokens of 128 features, 4 heads of 32, a
  residual, mean squared error against a target.

Each step is the loss, its gradient and an SGD update (lr 0.01) in f32,
compiled once by `jax.jit` with the params donated, timed with
`block_until_ready` after 3 warm-up steps; prints the median and the
minimum. Run it right after the Rust bench on the same machine:

    pip install jax jaxlib numpy
    python3 benches/jax_sequence.py              # both
    python3 benches/jax_sequence.py lstm         # one
"""

import os
import statistics
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402


def xavier(rng, fan_in, fan_out):
    bound = np.sqrt(6.0 / (fan_in + fan_out))
    return jnp.asarray(rng.uniform(-bound, bound, (fan_in, fan_out)).astype(np.float32))


def lstm_loss(p, x, y):
    def cell(carry, x_t):
        h, c = carry
        z = x_t @ p["w_x"] + h @ p["w_h"] + p["b"]
        i = jax.nn.sigmoid(z[:, 0:128])
        f = jax.nn.sigmoid(z[:, 128:256])
        g = jnp.tanh(z[:, 256:384])
        o = jax.nn.sigmoid(z[:, 384:512])
        c = f * c + i * g
        h = o * jnp.tanh(c)
        return (h, c), h

    h0 = jnp.zeros((x.shape[0], 128), jnp.float32)
    (h, _), _ = jax.lax.scan(cell, (h0, h0), jnp.swapaxes(x, 0, 1))
    logits = h @ p["w_out"] + p["b_out"]
    log_p = jax.nn.log_softmax(logits, axis=1)
    return -jnp.mean(jnp.take_along_axis(log_p, y[:, None], axis=1))


def attention_loss(p, x, y):
    b, t, d = x.shape
    split = lambda h: jnp.transpose(h.reshape(b, t, 4, 32), (0, 2, 1, 3))
    q, k, v = split(x @ p["wq"]), split(x @ p["wk"]), split(x @ p["wv"])
    weights = jax.nn.softmax(q @ jnp.swapaxes(k, -1, -2) / 5.656854, axis=-1)
    mixed = jnp.transpose(weights @ v, (0, 2, 1, 3)).reshape(b, t, d)
    return jnp.mean((x + mixed @ p["wo"] - y) ** 2)


def setup(name, rng):
    if name == "lstm":
        params = {
            "w_x": xavier(rng, 32, 512),
            "w_h": xavier(rng, 128, 512),
            "b": jnp.zeros(512, jnp.float32),
            "w_out": xavier(rng, 128, 10),
            "b_out": jnp.zeros(10, jnp.float32),
        }
        x = jnp.asarray(rng.uniform(-1, 1, (64, 8, 32)).astype(np.float32))
        y = jnp.asarray(rng.integers(0, 10, 64).astype(np.int32))
        return lstm_loss, params, x, y, 200, "lstm (batch 64, 8 steps, hidden 128)"
    params = {k: xavier(rng, 128, 128) for k in ("wq", "wk", "wv", "wo")}
    x = jnp.asarray(rng.uniform(-1, 1, (32, 64, 128)).astype(np.float32))
    y = jnp.asarray(rng.uniform(-1, 1, (32, 64, 128)).astype(np.float32))
    return attention_loss, params, x, y, 50, "attention (batch 32, T 64, D 128, 4 heads)"


def bench(name):
    loss, params, x, y, steps, label = setup(name, np.random.default_rng(0))

    def step(params, x, y):
        value, grads = jax.value_and_grad(loss)(params, x, y)
        return jax.tree_util.tree_map(lambda p, g: p - 0.01 * g, params, grads), value

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
    print(
        f"jax jit step, {label}: median {statistics.median(times) * 1e6:.1f} us, "
        f"min {min(times) * 1e6:.1f} us over {steps} steps"
    )


def main():
    names = sys.argv[1:] or ["lstm", "attention"]
    print(f"jax {jax.__version__} on {jax.devices()[0].platform}")
    for name in names:
        bench(name)


if __name__ == "__main__":
    main()
