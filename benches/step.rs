//! Benchmark of one training step (forward, backward, SGD update,
//! cross-entropy) on a hand-written Rust baseline, the reference
//! interpreter and the JIT's first stage, for three MLPs: tiny 64-32-10 at
//! batch 32, medium 64-256-256-10 at batch 128 and large 784-1024-1024-10 at
//! batch 256. Prints the median and spread after 3 warm-up steps, with the
//! matrix products' GFLOP/s at the median; and the time from source to a
//! compiled step for `examples/digits_mlp.grad`. Results and the machine:
//! `docs/performance.md`.

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
    // (The batch is made before the clock starts: a step is timed from
    // the tensors it is given, as a data loader would hand them over.)
    let mut run = || {
        let batch = vec![("x".into(), x.clone()), ("y".into(), y.clone())];
        let start = Instant::now();
        session.step(backend, batch).expect("step");
        start.elapsed()
    };
    for _ in 0..3 {
        run();
    }
    let mut times: Vec<Duration> = (0..steps).map(|_| run()).collect();
    let backend = if jit { "jit" } else { "interpreter" };
    report(backend, name, layers, batch, &mut times);
}

/// Matrix-product FLOPs of one step of an MLP: the forward products, and
/// in the backward pass `dW` for every layer and `dX` for all but the
/// first (the input needs no gradient).
fn step_flops(layers: &[usize], batch: usize) -> f64 {
    let products: Vec<f64> = layers
        .windows(2)
        .map(|w| 2.0 * (batch * w[0] * w[1]) as f64)
        .collect();
    3.0 * products.iter().sum::<f64>() - products[0]
}

/// A hand-written Rust MLP training step (ReLU hidden layers, mean
/// cross-entropy, plain SGD) in `f32`, with loops ordered for
/// auto-vectorization: what the compiled step is compared against.
struct Baseline {
    layers: Vec<usize>,
    weights: Vec<Vec<f32>>,
    biases: Vec<Vec<f32>>,
}

/// `c = a @ b` (`a`: m x k, `b`: k x n), row-major, i-p-j order.
fn matmul(a: &[f32], b: &[f32], c: &mut [f32], k: usize, n: usize) {
    c.fill(0.0);
    for (row, out) in a.chunks_exact(k).zip(c.chunks_exact_mut(n)) {
        for (&av, brow) in row.iter().zip(b.chunks_exact(n)) {
            for (o, &bv) in out.iter_mut().zip(brow) {
                *o += av * bv;
            }
        }
    }
}

impl Baseline {
    fn new(layers: &[usize]) -> Baseline {
        let mut stream = Stream::new(3);
        let weights = layers
            .windows(2)
            .map(|w| {
                let bound = (6.0 / w[0] as f64).sqrt();
                (0..w[0] * w[1])
                    .map(|_| ((stream.uniform() * 2.0 - 1.0) * bound) as f32)
                    .collect()
            })
            .collect();
        let biases = layers[1..].iter().map(|&n| vec![0.0; n]).collect();
        Baseline {
            layers: layers.to_vec(),
            weights,
            biases,
        }
    }

    fn step(&mut self, x: &[f32], y: &[usize], lr: f32) -> f32 {
        let batch = y.len();
        let depth = self.weights.len();
        let mut activations = vec![x.to_vec()];
        for l in 0..depth {
            let (k, n) = (self.layers[l], self.layers[l + 1]);
            let mut z = vec![0.0; batch * n];
            matmul(&activations[l], &self.weights[l], &mut z, k, n);
            for row in z.chunks_exact_mut(n) {
                for (v, b) in row.iter_mut().zip(&self.biases[l]) {
                    *v += b;
                    if l + 1 < depth {
                        *v = v.max(0.0);
                    }
                }
            }
            activations.push(z);
        }
        // Softmax cross-entropy, mean over the batch; g = dL/dlogits.
        let classes = self.layers[depth];
        let mut g = activations[depth].clone();
        let mut loss = 0.0;
        for (row, &label) in g.chunks_exact_mut(classes).zip(y) {
            let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let sum: f32 = row.iter().map(|v| (v - max).exp()).sum();
            loss += sum.ln() + max - row[label];
            for v in row.iter_mut() {
                *v = (*v - max).exp() / sum / batch as f32;
            }
            row[label] -= 1.0 / batch as f32;
        }
        for l in (0..depth).rev() {
            let (k, n) = (self.layers[l], self.layers[l + 1]);
            // dW = A^T g, db = sum of g's rows, dA = g W^T (masked by ReLU).
            let a = &activations[l];
            let mut dw = vec![0.0f32; k * n];
            for (arow, grow) in a.chunks_exact(k).zip(g.chunks_exact(n)) {
                for (&av, dwrow) in arow.iter().zip(dw.chunks_exact_mut(n)) {
                    for (d, &gv) in dwrow.iter_mut().zip(grow) {
                        *d += av * gv;
                    }
                }
            }
            let mut db = vec![0.0f32; n];
            for grow in g.chunks_exact(n) {
                for (d, &gv) in db.iter_mut().zip(grow) {
                    *d += gv;
                }
            }
            if l > 0 {
                let mut da = vec![0.0f32; batch * k];
                for (darow, grow) in da.chunks_exact_mut(k).zip(g.chunks_exact(n)) {
                    for (d, wrow) in darow.iter_mut().zip(self.weights[l].chunks_exact(n)) {
                        *d = wrow.iter().zip(grow).map(|(w, g)| w * g).sum();
                    }
                }
                for (d, &av) in da.iter_mut().zip(a) {
                    if av <= 0.0 {
                        *d = 0.0;
                    }
                }
                g = da;
            }
            for (w, d) in self.weights[l].iter_mut().zip(&dw) {
                *w -= lr * d;
            }
            for (b, d) in self.biases[l].iter_mut().zip(&db) {
                *b -= lr * d;
            }
        }
        loss / batch as f32
    }
}

fn bench_baseline(name: &str, layers: &[usize], batch: usize, steps: usize) {
    let mut stream = Stream::new(1);
    let x: Vec<f32> = (0..batch * layers[0])
        .map(|_| stream.uniform() as f32)
        .collect();
    let classes = *layers.last().unwrap_or(&10) as u64;
    let y: Vec<usize> = (0..batch).map(|_| stream.below(classes) as usize).collect();
    let mut model = Baseline::new(layers);
    let mut times: Vec<Duration> = (0..steps + 3)
        .map(|_| {
            let start = Instant::now();
            std::hint::black_box(model.step(&x, &y, 0.01));
            start.elapsed()
        })
        .skip(3)
        .collect();
    report("hand-written Rust", name, layers, batch, &mut times);
}

fn report(backend: &str, name: &str, layers: &[usize], batch: usize, times: &mut [Duration]) {
    times.sort();
    let steps = times.len();
    let us = |d: Duration| d.as_secs_f64() * 1e6;
    let median = times[steps / 2];
    println!(
        "{backend} step, {name} ({}), batch {batch}: median {:.1} us, min {:.1} us, max {:.0} us over {steps} steps; {:.2} matmul GFLOP/s at the median",
        layers
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join("-"),
        us(median),
        us(times[0]),
        us(times[steps - 1]),
        step_flops(layers, batch) / median.as_secs_f64() / 1e9,
    );
}

/// Source to a ready step for `examples/digits_mlp.grad`: parse, check,
/// lower, build the step graph, JIT-compile its kernels, and bind the frame
/// and compile the step entry for batches of 64.
fn bench_compile_time() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/digits_mlp.grad");
    let source = std::fs::read_to_string(path).expect("example");
    let mut times: Vec<Duration> = (0..23)
        .map(|_| {
            let start = Instant::now();
            let compilation = compile_source(path, &source, LowerOptions::default());
            let model = &compilation.models[0];
            let session = Session::new(model, model.train_config.clone().unwrap_or_default(), &[])
                .expect("session");
            // The kernels, then the frame and step entry for batches of 64
            // (what the first step of `gradc train` binds).
            let mut jit = Jit::new();
            let mut leaves = session.state().expect("fresh").clone();
            leaves.insert(
                "x".into(),
                Tensor::new(DType::F32, vec![64, 64], vec![0.0; 64 * 64]),
            );
            leaves.insert("y".into(), Tensor::new(DType::I32, vec![64], vec![0.0; 64]));
            leaves.insert(gradc::step::LR.into(), Tensor::scalar(DType::F32, 0.01));
            leaves.insert(gradc::step::STEP.into(), Tensor::scalar(DType::F32, 1.0));
            jit.prepare(&session.step_graph, &leaves).expect("binds");
            start.elapsed()
        })
        .skip(3)
        .collect();
    times.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    println!(
        "source to a compiled step, digits_mlp: median {:.1} ms, min {:.1} ms, max {:.1} ms over 20 runs",
        ms(times[10]),
        ms(times[0]),
        ms(times[19])
    );
}

/// The GEMM alone: `f32` and `f64` products of the large model's shapes,
/// GFLOP/s at the median of 20 runs, one call and (`f32`) split over two
/// threads.
fn bench_gemm() {
    use gradc::jit::CodegenError;
    use gradc::jit::gemm::{MatrixView, gemm, gemm_crate, gemm_parallel};
    for (m, k, n) in [
        (256, 784, 1024),
        (256, 1024, 1024),
        (1024, 256, 1024),
        (784, 256, 1024),
        (128, 256, 256),
        (256, 128, 256),
        // The medium step's narrow products and the tiny step's five
        // (`small_sgemm` where the host has AVX-512).
        (128, 256, 10),
        (256, 128, 10),
        (1024, 256, 10),
        (256, 10, 1024),
        (128, 10, 256),
        (64, 128, 256),
        (32, 64, 32),
        (32, 32, 10),
        (32, 10, 32),
        (64, 32, 32),
    ] {
        let a: Vec<f64> = (0..m * k).map(|i| (i % 17) as f64 / 17.0).collect();
        let b: Vec<f64> = (0..k * n).map(|i| (i % 13) as f64 / 13.0).collect();
        let (a32, b32): (Vec<f32>, Vec<f32>) = (
            a.iter().map(|&v| v as f32).collect(),
            b.iter().map(|&v| v as f32).collect(),
        );
        let flops = 2.0 * (m * k * n) as f64;
        // Small products are timed 200 calls at a time (a call takes about
        // a microsecond).
        let calls = if m * k * n <= 1 << 20 { 200 } else { 1 };
        let median = |run: &mut dyn FnMut()| {
            let mut times: Vec<f64> = (0..23)
                .map(|_| {
                    let start = Instant::now();
                    for _ in 0..calls {
                        run();
                    }
                    start.elapsed().as_secs_f64() / calls as f64
                })
                .skip(3)
                .collect();
            times.sort_by(f64::total_cmp);
            times[10]
        };
        let mut c32 = vec![0.0f32; m * n];
        // The plain product through another entry (the crate alone, two
        // threads).
        type Product =
            fn(MatrixView<'_, f32>, MatrixView<'_, f32>, &mut [f32]) -> Result<(), CodegenError>;
        let mut plain_time = |product: Product| {
            median(&mut || {
                product(
                    MatrixView::row_major(&a32, m, k),
                    MatrixView::row_major(&b32, k, n),
                    &mut c32,
                )
                .expect("fits")
            })
        };
        let crate_time = plain_time(gemm_crate);
        let parallel_time = plain_time(gemm_parallel);
        // One `f32` call on these views of `a` and `b`. The backward
        // products' layouts: `dW = A^T g` reads its left operand
        // transposed, `dX = g W^T` its right one.
        let mut one_call = |a: MatrixView<'_, f32>, b: MatrixView<'_, f32>, product: Product| {
            median(&mut || product(a, b, &mut c32).expect("fits"))
        };
        let f32_time = one_call(
            MatrixView::row_major(&a32, m, k),
            MatrixView::row_major(&b32, k, n),
            gemm,
        );
        let lhs_t_time = one_call(
            MatrixView::row_major(&a32, k, m).transposed(),
            MatrixView::row_major(&b32, k, n),
            gemm,
        );
        let [rhs_t_time, rhs_t_crate_time] = [gemm, gemm_crate].map(|product| {
            one_call(
                MatrixView::row_major(&a32, m, k),
                MatrixView::row_major(&b32, n, k).transposed(),
                product,
            )
        });
        let mut c64 = vec![0.0f64; m * n];
        let f64_time = median(&mut || {
            gemm(
                MatrixView::row_major(&a, m, k),
                MatrixView::row_major(&b, k, n),
                &mut c64,
            )
            .expect("fits")
        });
        println!(
            "gemm {m}x{k}x{n}: f32 {:.1} GFLOP/s (the gemm crate {:.1}; left transposed {:.1}, right transposed {:.1} (crate {:.1}); two threads: {:.1}), f64 {:.1} GFLOP/s",
            flops / f32_time / 1e9,
            flops / crate_time / 1e9,
            flops / lhs_t_time / 1e9,
            flops / rhs_t_time / 1e9,
            flops / rhs_t_crate_time / 1e9,
            flops / parallel_time / 1e9,
            flops / f64_time / 1e9
        );
    }
}

/// `cargo bench --bench step -- NAME...` runs only the named models
/// (`tiny`, `medium`, `large`) and backends (`hand`, `interp`, `jit`), the
/// GEMM alone (`gemm`) or the compile time (`compile`).
fn main() {
    let wanted: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect();
    if wanted.is_empty() || wanted.iter().any(|w| w == "compile") {
        bench_compile_time();
    }
    if wanted.is_empty() || wanted.iter().any(|w| w == "gemm") {
        bench_gemm();
    }
    let models: [(&str, &[usize], usize, usize); 3] = [
        ("tiny", &[64, 32, 10], 32, 1000),
        ("medium", &[64, 256, 256, 10], 128, 100),
        ("large", &[784, 1024, 1024, 10], 256, 10),
    ];
    // More steps for profilers (`perf record`, callgrind) to sample.
    let scale: usize = std::env::var("GRADC_BENCH_SCALE")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1);
    for (name, layers, batch, steps) in models {
        let steps = steps * scale;
        let models = ["tiny", "medium", "large"];
        let backends = ["hand", "interp", "jit"];
        let chosen = |names: &[&str], name: &str| {
            !wanted.iter().any(|w| names.contains(&w.as_str())) || wanted.iter().any(|w| w == name)
        };
        // Only `gemm` or `compile` asked for: no step benches.
        let steps_wanted = wanted.is_empty()
            || wanted
                .iter()
                .any(|w| models.contains(&w.as_str()) || backends.contains(&w.as_str()));
        if !steps_wanted || !chosen(&models, name) {
            continue;
        }
        if chosen(&backends, "hand") {
            bench_baseline(name, layers, batch, steps);
        }
        for (jit, backend) in [(false, "interp"), (true, "jit")] {
            if chosen(&backends, backend) {
                bench(name, layers, batch, steps, jit);
            }
        }
    }
}
