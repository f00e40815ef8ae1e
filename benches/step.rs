//! Benchmark of one training step (forward, backward, SGD update,
//! cross-entropy) on the reference interpreter and on the JIT's first
//! stage, for two MLPs: tiny
//! 64-32-10 at batch 32 and medium 64-256-256-10 at batch 128. Prints the
//! median and spread after a warm-up. The interpreter is the correctness
//! oracle, not the fast path: these numbers are the baseline the JIT is
//! measured against in `docs/performance.md`.

use std::time::{Duration, Instant};

use gradc::driver::compile_source;
use gradc::interp::Tensor;
use gradc::ir::DType;
use gradc::jit::Jit;
use gradc::lower::LowerOptions;
use gradc::random::Stream;
use gradc::train::{Backend, Interpreter, Session};

fn mlp(layers: &[usize]) -> String {
    let mut source = format!(
        "model mlp {{\n input x: f32[B, {}]\n input y: i32[B]\n let h0 = x\n",
        layers[0]
    );
    for i in 0..layers.len() - 1 {
        source.push_str(&format!(
            " param w{i}: f32[{}, {}] = kaiming_uniform\n param b{i}: f32[{}] = zeros\n",
            layers[i],
            layers[i + 1],
            layers[i + 1]
        ));
        let z = format!("h{i} @ w{i} + b{i}");
        if i + 2 < layers.len() {
            source.push_str(&format!(" let h{} = relu({z})\n", i + 1));
        } else {
            source.push_str(&format!(" loss cross_entropy({z}, y)\n"));
        }
    }
    source.push_str("}\ntrain mlp { optimizer sgd(lr = 0.01) }\n");
    source
}

fn bench(name: &str, layers: &[usize], batch: usize, steps: usize, jit: bool) {
    let compilation = compile_source("mlp.grad", &mlp(layers), LowerOptions::default());
    assert!(
        !compilation.has_errors(),
        "{}",
        compilation.render_diagnostics()
    );
    let model = &compilation.models[0];
    let mut session =
        Session::new(model, model.train_config.clone().unwrap_or_default(), &[]).expect("session");
    let mut stream = Stream::new(1);
    let x = Tensor::new(
        DType::F32,
        vec![batch, layers[0]],
        (0..batch * layers[0]).map(|_| stream.uniform()).collect(),
    );
    let classes = *layers.last().unwrap_or(&10) as u64;
    let y = Tensor::new(
        DType::I32,
        vec![batch],
        (0..batch).map(|_| stream.below(classes) as f64).collect(),
    );
    let mut interpreter = Interpreter;
    let mut compiled = Jit::new();
    let backend: &mut dyn Backend = if jit { &mut compiled } else { &mut interpreter };
    let mut run = || {
        let start = Instant::now();
        session
            .step(
                backend,
                vec![("x".into(), x.clone()), ("y".into(), y.clone())],
            )
            .expect("step");
        start.elapsed()
    };
    for _ in 0..3 {
        run();
    }
    let mut times: Vec<Duration> = (0..steps).map(|_| run()).collect();
    times.sort();
    let us = |d: Duration| d.as_secs_f64() * 1e6;
    println!(
        "{} step, {name} ({}), batch {batch}: median {:.0} us, min {:.0} us, max {:.0} us over {steps} steps",
        if jit { "jit" } else { "interpreter" },
        layers
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join("-"),
        us(times[steps / 2]),
        us(times[0]),
        us(times[steps - 1])
    );
}

fn main() {
    for jit in [false, true] {
        bench("tiny", &[64, 32, 10], 32, 200, jit);
        bench("medium", &[64, 256, 256, 10], 128, 30, jit);
    }
}
