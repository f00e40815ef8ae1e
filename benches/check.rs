//! Benchmark of `gradc check` on a generated 10,000-line model: lexing,
//! parsing, name resolution, type and shape checking and graph building of
//! both modes. Run with `cargo bench --bench check`; prints the median and
//! the spread of repeated runs after a warm-up. Results go in
//! `docs/performance.md` with the machine they ran on.

use std::time::{Duration, Instant};

use gradc::driver::compile_source;
use gradc::lower::LowerOptions;

/// A deep MLP: each block is four lines (a param, a bias, a matmul-add and
/// an activation), so `lines / 4` blocks make the model.
fn generated_model(lines: usize) -> String {
    let mut source =
        String::from("model big {\n    input x: f32[B, 32]\n    input y: i32[B]\n    let h0 = x\n");
    let blocks = lines / 4;
    for i in 0..blocks {
        let act = ["relu", "tanh", "gelu", "sigmoid"][i % 4];
        source.push_str(&format!("    param w{i}: f32[32, 32] = xavier_uniform\n"));
        source.push_str(&format!("    param b{i}: f32[32] = zeros\n"));
        source.push_str(&format!("    let z{i} = h{i} @ w{i} + b{i}\n"));
        source.push_str(&format!("    let h{} = {act}(z{i}) # block {i}\n", i + 1));
    }
    source.push_str("    param wo: f32[32, 10] = xavier_uniform\n");
    source.push_str(&format!("    loss cross_entropy(h{blocks} @ wo, y)\n}}\n"));
    source
}

fn main() {
    let source = generated_model(10_000);
    let lines = source.lines().count();
    let run = || {
        let compilation = compile_source("big.grad", &source, LowerOptions::default());
        assert!(
            !compilation.has_errors(),
            "{}",
            compilation.render_diagnostics()
        );
        compilation.models.len()
    };
    for _ in 0..3 {
        run();
    }
    let mut times: Vec<Duration> = (0..20)
        .map(|_| {
            let start = Instant::now();
            std::hint::black_box(run());
            start.elapsed()
        })
        .collect();
    times.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    println!(
        "check {lines}-line model: median {:.2} ms, min {:.2} ms, max {:.2} ms over {} runs",
        ms(times[times.len() / 2]),
        ms(times[0]),
        ms(times[times.len() - 1]),
        times.len()
    );
}
