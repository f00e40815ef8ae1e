#!/usr/bin/env python3
"""Cross-checks gradc's gradients against JAX's, op by op, in f64.

Each case is a small `.grad` model and the same function written in JAX.
The script draws random inputs and params, writes them to a safetensors
file, runs `gradc grad --dtype f64` on the model, on the reference
interpreter and on the JIT (`--backend`), and compares the loss and
every `grad.<param>` with `jax.grad` of the JAX function. Semantics follow
PyTorch's (mean-reduced losses, exact-erf GELU, biased batch variance,
softplus threshold 20), written out in JAX here so that the check does not
depend on any gradc code.

Usage: python3 tests/jax/check_gradients.py [path/to/gradc]
Exits 1 if any gradient differs by more than 1e-6 relative to its largest
element. `.ci/run` runs it after installing jax.
"""

import json
import os
import struct
import subprocess
import sys
import tempfile

import numpy as np

import jax

jax.config.update("jax_enable_x64", True)
import jax.numpy as jnp  # noqa: E402
from jax.scipy.special import erf, logsumexp  # noqa: E402

GRADC = sys.argv[1] if len(sys.argv) > 1 else os.path.join(os.path.dirname(__file__), "../../target/debug/gradc")
TOLERANCE = 1e-6
# Every case runs on both of gradc's backends.
BACKENDS = ("interp", "jit")


def write_safetensors(path, tensors):
    header, blobs, offset = {}, [], 0
    for name, array in tensors.items():
        array = np.ascontiguousarray(array)
        dtype = {np.float64: "F64", np.int32: "I32"}[array.dtype.type]
        data = array.tobytes()
        header[name] = {"dtype": dtype, "shape": list(array.shape), "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    encoded = json.dumps(header).encode()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(encoded)) + encoded + b"".join(blobs))


def read_safetensors(path):
    with open(path, "rb") as f:
        raw = f.read()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    body = raw[8 + n :]
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        start, end = info["data_offsets"]
        dtype = {"F64": np.float64, "F32": np.float32, "I32": np.int32}[info["dtype"]]
        out[name] = np.frombuffer(body[start:end], dtype=dtype).reshape(info["shape"])
    return out


def gelu(x):
    return 0.5 * x * (1 + erf(x / jnp.sqrt(2.0)))


def softplus(x):
    return jnp.where(x > 20, x, jnp.log1p(jnp.exp(jnp.minimum(x, 20))))


def cross_entropy(logits, labels):
    logp = jax.nn.log_softmax(logits, axis=1)
    return -jnp.mean(jnp.take_along_axis(logp, labels[:, None], axis=1))


def batch_norm_train(x, g, b, eps=1e-5):
    axes = tuple(i for i in range(x.ndim) if i != 1)
    mean = jnp.mean(x, axis=axes, keepdims=True)
    var = jnp.mean((x - mean) ** 2, axis=axes, keepdims=True)
    shape = [1] * x.ndim
    shape[1] = -1
    return (x - mean) / jnp.sqrt(var + eps) * g.reshape(shape) + b.reshape(shape)


def layer_norm(x, g, b, eps=1e-5):
    mean = jnp.mean(x, axis=-1, keepdims=True)
    var = jnp.mean((x - mean) ** 2, axis=-1, keepdims=True)
    return (x - mean) / jnp.sqrt(var + eps) * g + b


def bce_with_logits(x, t):
    return jnp.mean(jnp.maximum(x, 0) - x * t + jnp.log1p(jnp.exp(-jnp.abs(x))))


# (name, gradc model, inputs {name: (shape, kind)}, params {name: shape}, jax loss(p, i))
# kind: "f" uniform(-1, 1), "pos" uniform(0.5, 1.5), ("int", n) labels below n.
CASES = []


def case(name, model, inputs, params, loss, outputs=None):
    """`outputs` maps a model output's name to the JAX function of it."""
    CASES.append((name, model, inputs, params, loss, outputs or {}))


UNARY = {
    "neg": ("-p", lambda p: -p),
    "exp": ("exp(p)", jnp.exp),
    "log": ("log(p + 2)", lambda p: jnp.log(p + 2)),
    "sqrt": ("sqrt(p + 2)", lambda p: jnp.sqrt(p + 2)),
    "abs": ("abs(p)", jnp.abs),
    "tanh": ("tanh(p)", jnp.tanh),
    "sigmoid": ("sigmoid(p * 3)", lambda p: jax.nn.sigmoid(p * 3)),
    "relu": ("relu(p)", lambda p: jnp.maximum(p, 0)),
    "gelu": ("gelu(p * 2)", lambda p: gelu(p * 2)),
    "softplus": ("softplus(p * 30)", lambda p: softplus(p * 30)),
    "sin": ("sin(p)", jnp.sin),
    "cos": ("cos(p)", jnp.cos),
    "erf": ("erf(p * 2)", lambda p: erf(p * 2)),
    "leaky_relu": ("leaky_relu(p, 0.1)", lambda p: jnp.where(p > 0, p, 0.1 * p)),
    "clamp": ("clamp(p, -0.5, 0.5)", lambda p: jnp.clip(p, -0.5, 0.5)),
    "square": ("p ** 2", lambda p: p**2),
}
for name, (expr, f) in UNARY.items():
    case(
        name,
        f"model m {{ input c: f64[3, 4] param p: f64[3, 4] = zeros loss sum({expr} * c) }}",
        {"c": ((3, 4), "f")},
        {"p": (3, 4)},
        lambda P, I, f=f: jnp.sum(f(P["p"]) * I["c"]),
    )

BINARY = {
    "add": ("a + b", lambda a, b: a + b),
    "sub": ("a - b", lambda a, b: a - b),
    "mul": ("a * b", lambda a, b: a * b),
    "div": ("a / (b + 3)", lambda a, b: a / (b + 3)),
    "pow": ("(a + 2) ** b", lambda a, b: (a + 2) ** b),
    "maximum": ("maximum(a, b)", jnp.maximum),
    "minimum": ("minimum(a, b)", jnp.minimum),
}
for name, (expr, f) in BINARY.items():
    case(
        name + "_broadcast",
        f"model m {{ input c: f64[3, 4] param a: f64[3, 1] = zeros param b: f64[4] = zeros loss sum(({expr}) * c) }}",
        {"c": ((3, 4), "f")},
        {"a": (3, 1), "b": (4,)},
        lambda P, I, f=f: jnp.sum(f(P["a"], P["b"]) * I["c"]),
    )

case(
    "batched_matmul_transpose",
    "model m { input c: f64[2, 3, 5] param a: f64[2, 3, 4] = zeros param b: f64[5, 4] = zeros loss sum((a @ transpose(b)) * c) }",
    {"c": ((2, 3, 5), "f")},
    {"a": (2, 3, 4), "b": (5, 4)},
    lambda P, I: jnp.sum((P["a"] @ P["b"].T) * I["c"]),
)
case(
    "batch_matmul_broadcast",
    "model m { input c: f64[2, 3, 4, 5] param a: f64[2, 1, 4, 6] = zeros param b: f64[3, 6, 5] = zeros "
    "loss sum(sin(a @ b) * c) }",
    {"c": ((2, 3, 4, 5), "f")},
    {"a": (2, 1, 4, 6), "b": (3, 6, 5)},
    lambda P, I: jnp.sum(jnp.sin(P["a"] @ P["b"]) * I["c"]),
)
case(
    "permute_and_transpose_axes",
    "model m { input c: f64[4, 2, 5, 3] param x: f64[2, 3, 4, 5] = zeros "
    "loss sum(sin(permute(x, [2, 0, 3, 1])) * c) + sum(transpose(x, 0, -1) * transpose(x, 0, -1)) }",
    {"c": ((4, 2, 5, 3), "f")},
    {"x": (2, 3, 4, 5)},
    lambda P, I: jnp.sum(jnp.sin(jnp.transpose(P["x"], (2, 0, 3, 1))) * I["c"])
    + jnp.sum(jnp.swapaxes(P["x"], 0, 3) ** 2),
)


case(
    "indexing_and_slicing",
    "model m { input c: f64[2, 3] param x: f64[2, 4, 5] = zeros "
    "loss sum(sin(x[:, -1, 1:4]) * c) + sum(x[..., 0] * x[:, :, 2]) + sum(x[:, 1:3, ...][:, 0] ** 3) + sum(x[1, :2] ** 2) }",
    {"c": ((2, 3), "f")},
    {"x": (2, 4, 5)},
    lambda P, I: jnp.sum(jnp.sin(P["x"][:, -1, 1:4]) * I["c"])
    + jnp.sum(P["x"][..., 0] * P["x"][:, :, 2])
    + jnp.sum(P["x"][:, 1:3, ...][:, 0] ** 3)
    + jnp.sum(P["x"][1, :2] ** 2),
)


case(
    "stack",
    "model m { input c: f64[3, 2, 4] param a: f64[2, 4] = zeros param b: f64[2, 4] = zeros "
    "loss sum(stack([a, b * 2, sin(a)]) * c) + sum(stack([a, b], axis = -1) ** 3) }",
    {"c": ((3, 2, 4), "f")},
    {"a": (2, 4), "b": (2, 4)},
    lambda P, I: jnp.sum(jnp.stack([P["a"], P["b"] * 2, jnp.sin(P["a"])]) * I["c"])
    + jnp.sum(jnp.stack([P["a"], P["b"]], axis=-1) ** 3),
)


LSTM_CELL = (
    "fn cell(x_t, h, c, wx, wh, b) { let z = x_t @ wx + h @ wh + b "
    "let c_next = sigmoid(z[:, 4:8]) * c + sigmoid(z[:, 0:4]) * tanh(z[:, 8:12]) "
    "return sigmoid(z[:, 12:16]) * tanh(c_next), c_next } "
)


def lstm_cell(x_t, h, c, wx, wh, b):
    z = x_t @ wx + h @ wh + b
    c_next = jax.nn.sigmoid(z[:, 4:8]) * c + jax.nn.sigmoid(z[:, 0:4]) * jnp.tanh(z[:, 8:12])
    return jax.nn.sigmoid(z[:, 12:16]) * jnp.tanh(c_next), c_next


def lstm_loss(P, I):
    h = c = I["h0"]
    for t in range(3):
        h, c = lstm_cell(I["x"][:, t], h, c, P["wx"], P["wh"], P["b"])
    return jnp.sum(h * I["d"]) + jnp.sum(c * I["d"])


case(
    "lstm_cell_several_results",
    LSTM_CELL + "model m { input x: f64[2, 3, 5] input h0: f64[2, 4] input d: f64[2, 4] "
    "param wx: f64[5, 16] = zeros param wh: f64[4, 16] = zeros param b: f64[16] = zeros "
    "let h1, c1 = cell(x[:, 0], h0, h0, wx, wh, b) let h2, c2 = cell(x[:, 1], h1, c1, wx, wh, b) "
    "let h3, c3 = cell(x[:, 2], h2, c2, wx, wh, b) loss sum(h3 * d) + sum(c3 * d) }",
    {"x": ((2, 3, 5), "f"), "h0": ((2, 4), "f"), "d": ((2, 4), "f")},
    {"wx": (5, 16), "wh": (4, 16), "b": (16,)},
    lstm_loss,
)


case(
    "causal_mask_where_tril_triu",
    "model m { input x: f64[2, 4, 6] input c: f64[2, 4, 6] param wq: f64[6, 6] = zeros param wk: f64[6, 6] = zeros "
    "let s = (x @ wq) @ transpose(x @ wk) / 2 "
    "let a = softmax(where(tril(ones([4, 4])) == 1, s, -1e9)) @ x "
    "loss sum(where(a > 0.1, a, a * 0.5) * c) + sum(triu(s, 1) * triu(s, 1)) + sum(tril(s, -1) * full([4, 4], 0.5)) "
    "+ sum(where(s != 0, s, zeros([4, 4])) * 0.1) }",
    {"x": ((2, 4, 6), "f"), "c": ((2, 4, 6), "f")},
    {"wq": (6, 6), "wk": (6, 6)},
    lambda P, I: (
        lambda s: jnp.sum(
            jnp.where(
                (a := jax.nn.softmax(jnp.where(jnp.tril(jnp.ones((4, 4))) == 1, s, -1e9), axis=-1) @ I["x"]) > 0.1,
                a,
                a * 0.5,
            )
            * I["c"]
        )
        + jnp.sum(jnp.triu(s, 1) ** 2)
        + jnp.sum(jnp.tril(s, -1) * 0.5)
        + jnp.sum(jnp.where(s != 0, s, 0.0) * 0.1)
    )((I["x"] @ P["wq"]) @ jnp.swapaxes(I["x"] @ P["wk"], -1, -2) / 2),
)


case(
    "arange_mask",
    "model m { input x: f64[3, 4, 4] param w: f64[4] = zeros "
    "loss sum(softmax(where(reshape(arange(4), [1, 4]) <= reshape(arange(4), [4, 1]), x * w, -1e9)) * x) }",
    {"x": ((3, 4, 4), "f")},
    {"w": (4,)},
    lambda P, I: jnp.sum(
        jax.nn.softmax(jnp.where(jnp.arange(4)[None, :] <= jnp.arange(4)[:, None], I["x"] * P["w"], -1e9), axis=-1)
        * I["x"]
    ),
)


RNN_CELL = "fn cell(x_t, h, wx, wh, b) { return tanh(x_t @ wx + h @ wh + b) } "


def rnn_stacked(x, h0, wx, wh, b, reverse=False):
    """The stacked states of a tanh RNN over axis 1 of `x`, by `lax.scan`."""

    def step(h, x_t):
        h = jnp.tanh(x_t @ wx + h @ wh + b)
        return h, h

    _, hs = jax.lax.scan(step, h0, jnp.swapaxes(x, 0, 1), reverse=reverse)
    return jnp.swapaxes(hs, 0, 1)


case(
    "scan_rnn_symbolic_length",
    RNN_CELL + "model m { input x: f64[B, T, 3] input c: f64[B, T, 4] input h0: f64[B, 4] "
    "param wx: f64[3, 4] = zeros param wh: f64[4, 4] = zeros param b: f64[4] = zeros "
    "let hs = scan(cell, x, init = h0, with = [wx, wh, b]) loss sum(hs * c) + sum(hs[:, -1] ** 3) }",
    {"x": ((2, 6, 3), "f"), "c": ((2, 6, 4), "f"), "h0": ((2, 4), "f")},
    {"wx": (3, 4), "wh": (4, 4), "b": (4,)},
    lambda P, I: (
        lambda hs: jnp.sum(hs * I["c"]) + jnp.sum(hs[:, -1] ** 3)
    )(rnn_stacked(I["x"], I["h0"], P["wx"], P["wh"], P["b"])),
)


def lstm_scan_loss(P, I):
    def step(carry, x_t):
        h, c = lstm_cell(x_t, carry[0], carry[1], P["wx"], P["wh"], P["b"])
        return (h, c), (h, c, h * c)

    h0 = I["h0"] + P["h_init"]
    _, (hs, cs, ys) = jax.lax.scan(step, (h0, I["h0"]), jnp.swapaxes(I["x"], 0, 1), reverse=True)
    hs, cs, ys = (jnp.swapaxes(v, 0, 1) for v in (hs, cs, ys))
    return jnp.sum(hs * I["d"]) + jnp.sum(cs**2) + jnp.sum(jnp.sin(ys)) + jnp.sum(hs[:, 0] * cs[:, 0])


case(
    "scan_lstm_reverse_two_carries",
    "fn cell(x_t, h, c, wx, wh, b) { let z = x_t @ wx + h @ wh + b "
    "let c_next = sigmoid(z[:, 4:8]) * c + sigmoid(z[:, 0:4]) * tanh(z[:, 8:12]) "
    "let h_next = sigmoid(z[:, 12:16]) * tanh(c_next) return h_next, c_next, h_next * c_next } "
    "model m { input x: f64[2, 5, 3] input h0: f64[2, 4] input d: f64[2, 5, 4] "
    "param wx: f64[3, 16] = zeros param wh: f64[4, 16] = zeros param b: f64[16] = zeros param h_init: f64[4] = zeros "
    "let hs, cs, ys = scan(cell, x, init = (h0 + h_init, h0), with = [wx, wh, b], reverse = true) "
    "loss sum(hs * d) + sum(cs ** 2) + sum(sin(ys)) + sum(hs[:, 0] * cs[:, 0]) }",
    {"x": ((2, 5, 3), "f"), "h0": ((2, 4), "f"), "d": ((2, 5, 4), "f")},
    {"wx": (3, 16), "wh": (4, 16), "b": (16,), "h_init": (4,)},
    lstm_scan_loss,
)
case(
    "scan_map_two_sequences_axis0",
    "fn f(a_t, b_t, w) { return sin(a_t @ w) * b_t } "
    "model m { input a: f64[5, 2, 3] input b: f64[5, 2, 4] param w: f64[3, 4] = zeros "
    "let ys = scan(f, [a * 2, b], axis = 0, with = [w], checkpoint = true) loss sum(ys * ys) }",
    {"a": ((5, 2, 3), "f"), "b": ((5, 2, 4), "f")},
    {"w": (3, 4)},
    lambda P, I: jnp.sum(
        jax.lax.scan(lambda _, ab: (None, jnp.sin(ab[0] @ P["w"]) * ab[1]), None, (I["a"] * 2, I["b"]))[1] ** 2
    ),
)


def scan_second_order(P, I, reverse):
    def inner(wh):
        hs = rnn_stacked(I["x"], I["h0"], P["wx"], wh, P["b"], reverse)
        return jnp.sum(hs[:, -1] * hs[:, 2])

    e, gw = jax.value_and_grad(inner)(P["wh"])
    return e + jnp.sum(gw * gw)


for checkpoint in ("false", "true"):
    for reverse in ("false", "true"):
        case(
            f"scan_second_order_ckpt_{checkpoint}_rev_{reverse}",
            RNN_CELL + "model m { input x: f64[2, 5, 3] input h0: f64[2, 4] "
            "param wx: f64[3, 4] = zeros param wh: f64[4, 4] = zeros param b: f64[4] = zeros "
            f"let hs = scan(cell, x, init = h0, with = [wx, wh, b], checkpoint = {checkpoint}, reverse = {reverse}) "
            "let e = sum(hs[:, -1] * hs[:, 2]) let gw = grad(e, wh) loss e + sum(gw * gw) }",
            {"x": ((2, 5, 3), "f"), "h0": ((2, 4), "f")},
            {"wx": (3, 4), "wh": (4, 4), "b": (4,)},
            lambda P, I, reverse=(reverse == "true"): scan_second_order(P, I, reverse),
        )


def attention(x, wq, wk, wv, heads):
    """Multi-head self-attention of `x: [B, T, D]`, heads split from `D`."""
    b, t, d = x.shape
    split = lambda h: jnp.transpose(h.reshape(b, t, heads, d // heads), (0, 2, 1, 3))
    q, k, v = split(x @ wq), split(x @ wk), split(x @ wv)
    s = q @ jnp.swapaxes(k, -1, -2) / jnp.sqrt(d // heads)
    a = jax.nn.softmax(s, axis=-1) @ v
    return jnp.transpose(a, (0, 2, 1, 3)).reshape(b, t, d)


ATTENTION = (
    "let q = permute(reshape(x @ wq, [3, 5, 2, 4]), [0, 2, 1, 3]) "
    "let k = transpose(reshape(x @ wk, [3, 5, 2, 4]), 1, 2) "
    "let v = permute(reshape(x @ wv, [3, 5, 2, 4]), [0, 2, 1, 3]) "
    "let a = softmax(q @ transpose(k) / 2) @ v "
    "let o = reshape(permute(a, [0, 2, 1, 3]), [3, 5, 8]) "
)
case(
    "multi_head_attention",
    "model m { input x: f64[3, 5, 8] input c: f64[3, 5, 8] param wq: f64[8, 8] = zeros "
    "param wk: f64[8, 8] = zeros param wv: f64[8, 8] = zeros " + ATTENTION + "loss sum(o * c) }",
    {"x": ((3, 5, 8), "f"), "c": ((3, 5, 8), "f")},
    {"wq": (8, 8), "wk": (8, 8), "wv": (8, 8)},
    lambda P, I: jnp.sum(attention(I["x"], P["wq"], P["wk"], P["wv"], 2) * I["c"]),
)
case(
    "second_order_attention",
    "model m { input x: f64[3, 5, 8] input c: f64[3, 5, 8] input d: f64[8, 8] param wq: f64[8, 8] = zeros "
    "param wk: f64[8, 8] = zeros param wv: f64[8, 8] = zeros " + ATTENTION + "let e = sum(o * c) "
    "loss sum(grad(e, wq) * d) + sum(grad(e, wv) * grad(e, wk)) }",
    {"x": ((3, 5, 8), "f"), "c": ((3, 5, 8), "f"), "d": ((8, 8), "f")},
    {"wq": (8, 8), "wk": (8, 8), "wv": (8, 8)},
    lambda P, I: (
        lambda e: jnp.sum(jax.grad(e, 0)(P["wq"], P["wk"], P["wv"]) * I["d"])
        + jnp.sum(jax.grad(e, 2)(P["wq"], P["wk"], P["wv"]) * jax.grad(e, 1)(P["wq"], P["wk"], P["wv"]))
    )(lambda wq, wk, wv: jnp.sum(attention(I["x"], wq, wk, wv, 2) * I["c"])),
)
for func, jf in [("sum", jnp.sum), ("mean", jnp.mean), ("max", jnp.max), ("logsumexp", logsumexp)]:
    case(
        func + "_axes",
        f"model m {{ param x: f64[3, 4, 5] = zeros loss sum(sin({func}(x, axis = [0, -1], keepdims = true) * 2)) + {func}(x) }}",
        {},
        {"x": (3, 4, 5)},
        lambda P, I, jf=jf: jnp.sum(jnp.sin(jf(P["x"], axis=(0, 2), keepdims=True) * 2)) + jf(P["x"]),
    )
case(
    "softmax_log_softmax",
    "model m { input c: f64[3, 4] param x: f64[3, 4] = zeros loss sum(softmax(x, axis = 0) * c) + sum(log_softmax(x) * c) }",
    {"c": ((3, 4), "f")},
    {"x": (3, 4)},
    lambda P, I: jnp.sum(jax.nn.softmax(P["x"], axis=0) * I["c"]) + jnp.sum(jax.nn.log_softmax(P["x"], axis=-1) * I["c"]),
)
case(
    "reshape_concat",
    "model m { input c: f64[4, 5] param a: f64[2, 2, 2] = zeros param b: f64[4, 3] = zeros loss sum(concat([reshape(a, [4, -1]), b], axis = 1) * c) }",
    {"c": ((4, 5), "f")},
    {"a": (2, 2, 2), "b": (4, 3)},
    lambda P, I: jnp.sum(jnp.concatenate([P["a"].reshape(4, 2), P["b"]], axis=1) * I["c"]),
)
case(
    "batch_norm_train",
    "model m { input c: f64[5, 3, 2] param x: f64[5, 3, 2] = zeros param g: f64[3] = ones param b: f64[3] = zeros buffer mu: f64[3] = zeros buffer var: f64[3] = ones loss sum(batch_norm(x, g, b, mu, var) * c) }",
    {"c": ((5, 3, 2), "f"), "mu": ((3,), "f"), "var": ((3,), "pos")},
    {"x": (5, 3, 2), "g": (3,), "b": (3,)},
    lambda P, I: jnp.sum(batch_norm_train(P["x"], P["g"], P["b"]) * I["c"]),
)
case(
    "layer_norm",
    "model m { input c: f64[4, 6] param x: f64[4, 6] = zeros param g: f64[6] = ones param b: f64[6] = zeros loss sum(layer_norm(x, g, b) * c) }",
    {"c": ((4, 6), "f")},
    {"x": (4, 6), "g": (6,), "b": (6,)},
    lambda P, I: jnp.sum(layer_norm(P["x"], P["g"], P["b"]) * I["c"]),
)
case(
    "embedding",
    "model m { input ids: i32[4, 3] input c: f64[4, 3, 2] param t: f64[5, 2] = zeros loss sum(embedding(ids, t) * c) }",
    {"ids": ((4, 3), ("int", 5)), "c": ((4, 3, 2), "f")},
    {"t": (5, 2)},
    lambda P, I: jnp.sum(P["t"][I["ids"]] * I["c"]),
)
case(
    "losses",
    "model m { input y: i32[4] param l: f64[4, 3] = zeros param t: f64[4, 3] = zeros loss cross_entropy(l * 3, y) + mse(l, t) + bce_with_logits(l * 3, t) }",
    {"y": ((4,), ("int", 3))},
    {"l": (4, 3), "t": (4, 3)},
    lambda P, I: cross_entropy(P["l"] * 3, I["y"]) + jnp.mean((P["l"] - P["t"]) ** 2) + bce_with_logits(P["l"] * 3, P["t"]),
)
case(
    "digits_mlp_without_dropout",
    "model m { input x: f64[6, 64] input y: i32[6] param w1: f64[64, 16] = zeros param b1: f64[16] = zeros "
    "param w2: f64[16, 10] = zeros param b2: f64[10] = zeros let h = relu(x / 16 @ w1 + b1) retain h "
    "loss cross_entropy(h @ w2 + b2, y) }",
    {"x": ((6, 64), "f"), "y": ((6,), ("int", 10))},
    {"w1": (64, 16), "b1": (16,), "w2": (16, 10), "b2": (10,)},
    lambda P, I: cross_entropy(jnp.maximum(I["x"] / 16 @ P["w1"] + P["b1"], 0) @ P["w2"] + P["b2"], I["y"]),
)


# Second order: `grad(e, x)` in the loss, against `jax.grad` of a function
# that calls `jax.grad` (float64). One case per differentiable op family:
# the loss is d(sum(f(p) * c))/dp contracted with d, whose gradient with
# respect to p is the Hessian-vector product of f.
for name, (expr, f) in UNARY.items():
    case(
        "second_order_" + name,
        f"model m {{ input c: f64[3, 4] input d: f64[3, 4] param p: f64[3, 4] = zeros "
        f"let e = sum({expr} * c) loss sum(grad(e, p) * d) }}",
        {"c": ((3, 4), "f"), "d": ((3, 4), "f")},
        {"p": (3, 4)},
        lambda P, I, f=f: jnp.sum(jax.grad(lambda p: jnp.sum(f(p) * I["c"]))(P["p"]) * I["d"]),
    )
for name, (expr, f) in BINARY.items():
    case(
        "second_order_" + name,
        f"model m {{ input c: f64[3, 4] input d: f64[3, 1] input k: f64[4] param a: f64[3, 1] = zeros param b: f64[4] = zeros "
        f"let e = sum(({expr}) * c) loss sum(grad(e, a) * d) + sum(grad(e, b) * k) }}",
        {"c": ((3, 4), "f"), "d": ((3, 1), "f"), "k": ((4,), "f")},
        {"a": (3, 1), "b": (4,)},
        lambda P, I, f=f: jnp.sum(jax.grad(lambda a: jnp.sum(f(a, P["b"]) * I["c"]))(P["a"]) * I["d"])
        + jnp.sum(jax.grad(lambda b: jnp.sum(f(P["a"], b) * I["c"]))(P["b"]) * I["k"]),
    )
for func, jf in [("sum", jnp.sum), ("mean", jnp.mean), ("max", jnp.max), ("logsumexp", logsumexp)]:
    case(
        "second_order_" + func,
        f"model m {{ input d: f64[3, 4, 5] param x: f64[3, 4, 5] = zeros "
        f"let e = sum(sin({func}(x, axis = [0, -1], keepdims = true) * 2)) loss sum(grad(e, x) * d) }}",
        {"d": ((3, 4, 5), "f")},
        {"x": (3, 4, 5)},
        lambda P, I, jf=jf: jnp.sum(
            jax.grad(lambda x: jnp.sum(jnp.sin(jf(x, axis=(0, 2), keepdims=True) * 2)))(P["x"]) * I["d"]
        ),
    )
case(
    "second_order_matmul_transpose",
    "model m { input c: f64[3, 4] input d: f64[3, 4] param x: f64[3, 4] = zeros param w: f64[4, 4] = zeros "
    "let e = sum(sin((x @ transpose(w)) @ w) * c) loss sum(grad(e, x) * d) + sum(grad(e, w) * grad(e, w)) }",
    {"c": ((3, 4), "f"), "d": ((3, 4), "f")},
    {"x": (3, 4), "w": (4, 4)},
    lambda P, I: (
        lambda e: jnp.sum(jax.grad(e, 0)(P["x"], P["w"]) * I["d"]) + jnp.sum(jax.grad(e, 1)(P["x"], P["w"]) ** 2)
    )(lambda x, w: jnp.sum(jnp.sin((x @ w.T) @ w) * I["c"])),
)
case(
    "second_order_softmax_log_softmax",
    "model m { input c: f64[3, 4] input d: f64[3, 4] param x: f64[3, 4] = zeros "
    "let e = sum(softmax(x, axis = 0) * c) + sum(log_softmax(x) * c) loss sum(grad(e, x) * d) }",
    {"c": ((3, 4), "f"), "d": ((3, 4), "f")},
    {"x": (3, 4)},
    lambda P, I: jnp.sum(
        jax.grad(lambda x: jnp.sum(jax.nn.softmax(x, axis=0) * I["c"]) + jnp.sum(jax.nn.log_softmax(x, axis=-1) * I["c"]))(P["x"]) * I["d"]
    ),
)
case(
    "second_order_reshape_concat",
    "model m { input c: f64[4, 5] input d: f64[2, 2, 2] param a: f64[2, 2, 2] = zeros param b: f64[4, 3] = zeros "
    "let e = sum(sin(concat([reshape(a, [4, -1]), b], axis = 1)) * c) loss sum(grad(e, a) * d) }",
    {"c": ((4, 5), "f"), "d": ((2, 2, 2), "f")},
    {"a": (2, 2, 2), "b": (4, 3)},
    lambda P, I: jnp.sum(
        jax.grad(lambda a: jnp.sum(jnp.sin(jnp.concatenate([a.reshape(4, 2), P["b"]], axis=1)) * I["c"]))(P["a"]) * I["d"]
    ),
)
case(
    "second_order_layer_norm",
    "model m { input c: f64[4, 6] input d: f64[4, 6] param x: f64[4, 6] = zeros param g: f64[6] = ones param b: f64[6] = zeros "
    "let e = sum(layer_norm(x, g, b) * c) loss sum(grad(e, x) * d) + sum(grad(e, g) * grad(e, g)) }",
    {"c": ((4, 6), "f"), "d": ((4, 6), "f")},
    {"x": (4, 6), "g": (6,), "b": (6,)},
    lambda P, I: (
        lambda e: jnp.sum(jax.grad(e, 0)(P["x"], P["g"]) * I["d"]) + jnp.sum(jax.grad(e, 1)(P["x"], P["g"]) ** 2)
    )(lambda x, g: jnp.sum(layer_norm(x, g, P["b"]) * I["c"])),
)
case(
    "second_order_batch_norm_train",
    "model m { input c: f64[5, 3, 2] input d: f64[5, 3, 2] param x: f64[5, 3, 2] = zeros param g: f64[3] = ones param b: f64[3] = zeros "
    "buffer mu: f64[3] = zeros buffer var: f64[3] = ones let e = sum(batch_norm(x, g, b, mu, var) * c) loss sum(grad(e, x) * d) }",
    {"c": ((5, 3, 2), "f"), "d": ((5, 3, 2), "f"), "mu": ((3,), "f"), "var": ((3,), "pos")},
    {"x": (5, 3, 2), "g": (3,), "b": (3,)},
    lambda P, I: jnp.sum(jax.grad(lambda x: jnp.sum(batch_norm_train(x, P["g"], P["b"]) * I["c"]))(P["x"]) * I["d"]),
)
case(
    "second_order_embedding",
    "model m { input ids: i32[4, 3] input c: f64[4, 3, 2] input d: f64[5, 2] param t: f64[5, 2] = zeros "
    "let e = sum(sin(embedding(ids, t)) * c) loss sum(grad(e, t) * d) }",
    {"ids": ((4, 3), ("int", 5)), "c": ((4, 3, 2), "f"), "d": ((5, 2), "f")},
    {"t": (5, 2)},
    lambda P, I: jnp.sum(jax.grad(lambda t: jnp.sum(jnp.sin(t[I["ids"]]) * I["c"]))(P["t"]) * I["d"]),
)
case(
    "second_order_losses",
    "model m { input y: i32[4] input d: f64[4, 3] param l: f64[4, 3] = zeros param t: f64[4, 3] = zeros "
    "let e = cross_entropy(l * 3, y) + mse(l, t) + bce_with_logits(l * 3, t) loss sum(grad(e, l) * d) + sum(grad(e, t) * d) }",
    {"y": ((4,), ("int", 3)), "d": ((4, 3), "f")},
    {"l": (4, 3), "t": (4, 3)},
    lambda P, I: (
        lambda e: jnp.sum(jax.grad(e, 0)(P["l"], P["t"]) * I["d"]) + jnp.sum(jax.grad(e, 1)(P["l"], P["t"]) * I["d"])
    )(lambda l, t: cross_entropy(l * 3, I["y"]) + jnp.mean((l - t) ** 2) + bce_with_logits(l * 3, t)),
)


def mlp_ce(x, y, w1, b1, w2, act):
    return cross_entropy(act(x @ w1 + b1) @ w2, y)


# A gradient penalty on an MLP (the draft's `penalized` model), with its
# saliency output: the penalty's gradient is second order.
case(
    "gradient_penalty_mlp",
    "model m { input x: f64[6, 8] input y: i32[6] param w1: f64[8, 5] = zeros param b1: f64[5] = zeros param w2: f64[5, 4] = zeros "
    "let ce = cross_entropy(gelu(x @ w1 + b1) @ w2, y) let gx = grad(ce, x) output saliency = gx "
    "loss ce + 0.1 * mean(sum(gx * gx, axis = 1)) }",
    {"x": ((6, 8), "f"), "y": ((6,), ("int", 4))},
    {"w1": (8, 5), "b1": (5,), "w2": (5, 4)},
    lambda P, I: (
        lambda ce: ce(I["x"]) + 0.1 * jnp.mean(jnp.sum(jax.grad(ce)(I["x"]) ** 2, axis=1))
    )(lambda x: mlp_ce(x, I["y"], P["w1"], P["b1"], P["w2"], gelu)),
    {"saliency": lambda P, I: jax.grad(lambda x: mlp_ce(x, I["y"], P["w1"], P["b1"], P["w2"], gelu))(I["x"])},
)
# A Hessian-vector product through softmax cross-entropy: the loss is
# <grad(ce, w), v>, so its gradient with respect to w is H v.
case(
    "hessian_vector_product_cross_entropy",
    "model m { input x: f64[6, 8] input y: i32[6] input v: f64[8, 4] param w: f64[8, 4] = zeros "
    "let ce = cross_entropy(x @ w, y) loss sum(grad(ce, w) * v) }",
    {"x": ((6, 8), "f"), "y": ((6,), ("int", 4)), "v": ((8, 4), "f")},
    {"w": (8, 4)},
    lambda P, I: jnp.sum(jax.grad(lambda w: cross_entropy(I["x"] @ w, I["y"]))(P["w"]) * I["v"]),
)
# A third derivative: the gradient of a Hessian-vector product's norm.
case(
    "third_order_tanh",
    "model m { input c: f64[3, 4] input v: f64[3, 4] param p: f64[3, 4] = zeros "
    "let e = sum(tanh(p) * c) let hv = grad(sum(grad(e, p) * v), p) loss sum(hv * hv) }",
    {"c": ((3, 4), "f"), "v": ((3, 4), "f")},
    {"p": (3, 4)},
    lambda P, I: jnp.sum(
        jax.grad(lambda p: jnp.sum(jax.grad(lambda q: jnp.sum(jnp.tanh(q) * I["c"]))(p) * I["v"]))(P["p"]) ** 2
    ),
)


def draw(rng, shape, kind):
    if kind == "f":
        return rng.uniform(-1, 1, shape)
    if kind == "pos":
        return rng.uniform(0.5, 1.5, shape)
    return rng.integers(0, kind[1], shape).astype(np.int32)


def main():
    rng = np.random.default_rng(0)
    failures = 0
    with tempfile.TemporaryDirectory() as tmp:
        for (name, model, inputs, params, loss, outputs), backend in (
            (case, backend) for case in CASES for backend in BACKENDS
        ):
            I = {k: draw(rng, s, kind) for k, (s, kind) in inputs.items()}
            P = {k: rng.uniform(-1, 1, s) for k, s in params.items()}
            model_path = os.path.join(tmp, "m.grad")
            with open(model_path, "w") as f:
                f.write(model)
            write_safetensors(os.path.join(tmp, "in.safetensors"), {**I, **P})
            run = subprocess.run(
                [GRADC, "grad", model_path, "--tensors", os.path.join(tmp, "in.safetensors"), "--out", os.path.join(tmp, "out.safetensors"), "--dtype", "f64", "--backend", backend],
                capture_output=True,
                text=True,
            )
            name = f"{name} ({backend})"
            if run.returncode != 0:
                print(f"FAILED {name}: gradc exited {run.returncode}\n{run.stderr}")
                failures += 1
                continue
            out = read_safetensors(os.path.join(tmp, "out.safetensors"))
            expected_loss, expected = jax.value_and_grad(loss)({k: jnp.asarray(v) for k, v in P.items()}, {k: jnp.asarray(v) for k, v in I.items()})
            worst = abs(float(out["loss"]) - float(expected_loss)) / max(abs(float(expected_loss)), 1e-12)
            for k in P:
                got, want = out["grad." + k], np.asarray(expected[k])
                scale = max(np.max(np.abs(want)), np.max(np.abs(got)), 1e-12)
                worst = max(worst, float(np.max(np.abs(got - want))) / scale)
            for k, f in outputs.items():
                got, want = out[k], np.asarray(f({k: jnp.asarray(v) for k, v in P.items()}, {k: jnp.asarray(v) for k, v in I.items()}))
                scale = max(np.max(np.abs(want)), np.max(np.abs(got)), 1e-12)
                worst = max(worst, float(np.max(np.abs(got - want))) / scale)
            status = "ok" if worst < TOLERANCE else "FAILED"
            failures += status != "ok"
            print(f"{name:<44} worst relative error {worst:.2e}  {status}")
    print(f"{len(CASES) * len(BACKENDS) - failures} passed, {failures} failed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
