//! Benchmark of one training step of two sequence models on the JIT (and,
//! with `interp`, the reference interpreter): an LSTM (batch 64, 8 steps of
//! 32 features, hidden 128, a `scan` of an LSTM cell, classified from the
//! last step) and a multi-head self-attention block (batch 32, 64 tokens of
//! 128 features, 4 heads, a residual, mean squared error). Each step is
//! forward, backward and an SGD update, timed from the tensors it is given
//! after 3 warm-up steps; prints the median and the spread.
//! `benches/jax_sequence.py` times the same models under `jax.jit`; the
//! ratio and the machine are in `docs/performance.md`.
//!
//!     cargo bench --bench sequence            # both, on the JIT
//!     cargo bench --bench sequence -- lstm    # one
//!     cargo bench --bench sequence -- interp  # on the interpreter too

use std::time::{Duration, Instant};

use gradc::driver::compile_source;
use gradc::interp::Tensor;
use gradc::ir::DType;
use gradc::jit::Jit;
use gradc::lower::LowerOptions;
use gradc::random::Stream;
use gradc::train::{Backend, Interpreter, Session};

/// The LSTM: PyTorch's gate order, the carries `(h, c)` over `scan`.
const LSTM: &str = "
fn cell(x_t, h, c, w_x, w_h, b) {
    let z = x_t @ w_x + h @ w_h + b
    let i = sigmoid(z[:, 0:128])
    let f = sigmoid(z[:, 128:256])
    let g = tanh(z[:, 256:384])
    let o = sigmoid(z[:, 384:512])
    let c_next = f * c + i * g
    return o * tanh(c_next), c_next
}
model lstm {
    input x: f32[B, 8, 32]
    input y: i32[B]
    param w_x: f32[32, 512] = xavier_uniform
    param w_h: f32[128, 512] = xavier_uniform
    param b: f32[512] = zeros
    param w_out: f32[128, 10] = xavier_uniform
    param b_out: f32[10] = zeros
    let h0 = zeros([B, 128])
    let hs, _cs = scan(cell, x, init = (h0, h0), with = [w_x, w_h, b])
    loss cross_entropy(hs[:, -1] @ w_out + b_out, y)
}
train lstm { optimizer sgd(lr = 0.01) }
";

/// Multi-head self-attention with a residual: 4 heads of 32 features.
const ATTENTION: &str = "
model attention {
    input x: f32[B, 64, 128]
    input y: f32[B, 64, 128]
    param wq: f32[128, 128] = xavier_uniform
    param wk: f32[128, 128] = xavier_uniform
    param wv: f32[128, 128] = xavier_uniform
    param wo: f32[128, 128] = xavier_uniform
    let q = permute(reshape(x @ wq, [B, 64, 4, 32]), [0, 2, 1, 3])
    let k = permute(reshape(x @ wk, [B, 64, 4, 32]), [0, 2, 1, 3])
    let v = permute(reshape(x @ wv, [B, 64, 4, 32]), [0, 2, 1, 3])
    let weights = softmax(q @ transpose(k) / 5.656854)
    let mixed = reshape(permute(weights @ v, [0, 2, 1, 3]), [B, 64, 128])
    loss mse(x + mixed @ wo, y)
}
train attention { optimizer sgd(lr = 0.01) }
";

fn bench(name: &str, source: &str, batch: Vec<(String, Tensor)>, steps: usize, jit: bool) {
    let compilation = compile_source(&format!("{name}.grad"), source, LowerOptions::default());
    assert!(
        !compilation.has_errors(),
        "{}",
        compilation.render_diagnostics()
    );
    let model = &compilation.models[0];
    let mut session =
        Session::new(model, model.train_config.clone().unwrap_or_default(), &[]).expect("session");
    let mut interpreter = Interpreter;
    let mut compiled = Jit::new();
    let backend: &mut dyn Backend = if jit { &mut compiled } else { &mut interpreter };
    let mut run = || {
        let batch = batch.clone();
        let start = Instant::now();
        session.step(backend, batch).expect("step");
        start.elapsed()
    };
    for _ in 0..3 {
        run();
    }
    let mut times: Vec<Duration> = (0..steps).map(|_| run()).collect();
    times.sort();
    let us = |d: Duration| d.as_secs_f64() * 1e6;
    println!(
        "{} step, {name}: median {:.1} us, min {:.1} us, max {:.1} us over {steps} steps",
        if jit { "jit" } else { "interpreter" },
        us(times[times.len() / 2]),
        us(times[0]),
        us(times[times.len() - 1]),
    );
}

fn uniform(stream: &mut Stream, dtype: DType, shape: Vec<usize>) -> Tensor {
    let count = shape.iter().product();
    let data = (0..count).map(|_| stream.uniform() * 2.0 - 1.0).collect();
    Tensor::new(dtype, shape, data)
}

fn main() {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    let wants = |name: &str| {
        !args.iter().any(|a| a == "lstm" || a == "attention") || args.iter().any(|a| a == name)
    };
    let backends: &[bool] = if args.iter().any(|a| a == "interp") {
        &[true, false]
    } else {
        &[true]
    };
    let mut stream = Stream::new(7);
    for &jit in backends {
        if wants("lstm") {
            let x = uniform(&mut stream, DType::F32, vec![64, 8, 32]);
            let y = (0..64).map(|_| stream.below(10) as f64).collect();
            let batch = vec![
                ("x".to_string(), x),
                ("y".to_string(), Tensor::new(DType::I32, vec![64], y)),
            ];
            bench(
                "lstm (batch 64, 8 steps, hidden 128)",
                LSTM,
                batch,
                if jit { 200 } else { 5 },
                jit,
            );
        }
        if wants("attention") {
            let x = uniform(&mut stream, DType::F32, vec![32, 64, 128]);
            let y = uniform(&mut stream, DType::F32, vec![32, 64, 128]);
            let batch = vec![("x".to_string(), x), ("y".to_string(), y)];
            bench(
                "attention (batch 32, T 64, D 128, 4 heads)",
                ATTENTION,
                batch,
                if jit { 50 } else { 3 },
                jit,
            );
        }
    }
}
