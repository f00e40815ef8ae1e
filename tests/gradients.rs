//! Every derivative rule against central finite differences in `f64`.
//!
//! Each case is a small model whose loss runs one op (or one feature of an
//! op: broadcasting, `keepdims`, a negative axis); its sizes are drawn at
//! random (`{M}`, `{N}`, `{K}` in the template) for several seeds. The
//! reference interpreter evaluates the backward graph and the finite
//! differences; every param and retained gradient must agree to a relative
//! error below 1e-6.

mod common;

use gradc::driver::compile_source;
use gradc::gradcheck::{Options, gradcheck};
use gradc::ir::{DType, Mode};
use gradc::lower::LowerOptions;
use gradc::random::Stream;

const TOLERANCE: f64 = 1e-6;

/// Compiles `template` with random sizes and checks its gradients, in
/// train and eval mode.
fn check(name: &str, template: &str) {
    for seed in 0..3u64 {
        let mut stream = Stream::new(seed * 7919 + name.len() as u64);
        let mut size = || (2 + stream.below(4)).to_string();
        let source = template
            .replace("[B,", "[{B},")
            .replace("[B]", "[{B}]")
            .replace("{M}", &size())
            .replace("{N}", &size())
            .replace("{K}", &size())
            .replace("{B}", &size());
        let options = LowerOptions {
            float_dtype: Some(DType::F64),
        };
        let compilation = compile_source(name, &source, options);
        assert!(
            !compilation.has_errors(),
            "{name}:\n{source}\n{}",
            compilation.render_diagnostics()
        );
        for mode in [Mode::Train, Mode::Eval] {
            let graph = compilation.models[0].graph(mode);
            let reports = gradcheck(
                graph,
                Options {
                    seed,
                    max_elements: 1000,
                    ..Options::default()
                },
            )
            .unwrap_or_else(|e| panic!("{name} ({mode}): {e}\n{source}"));
            assert!(!reports.is_empty(), "{name}: nothing was checked");
            for report in reports {
                assert!(
                    report.relative_error < TOLERANCE,
                    "{name} ({mode}, seed {seed}): grad.{} has relative error {:e} (absolute {:e})\n{source}",
                    report.name,
                    report.relative_error,
                    report.absolute_error
                );
            }
        }
    }
}

/// A model with `x: [B, M]`, a param `p: [B?..]` fed through `body`, and the
/// loss `sum(out * c)` with a fixed random weighting `c` (an input), so
/// every output element matters.
fn unary_case(name: &str, expr: &str) {
    check(
        name,
        &format!(
            "model m {{
                input c: f64[B, {{M}}]
                param p: f64[B, {{M}}] = zeros
                let out = {expr}
                loss sum(out * c)
            }}"
        ),
    );
}

#[test]
fn unary_functions() {
    unary_case("neg", "-p");
    unary_case("exp", "exp(p)");
    unary_case("log", "log(p + 2)");
    unary_case("sqrt", "sqrt(p + 2)");
    unary_case("abs", "abs(p)");
    unary_case("tanh", "tanh(p)");
    unary_case("sigmoid", "sigmoid(p * 3)");
    unary_case("relu", "relu(p)");
    unary_case("gelu", "gelu(p * 2)");
    unary_case("softplus", "softplus(p * 4)");
    unary_case("sin", "sin(p)");
    unary_case("cos", "cos(p)");
    unary_case("leaky_relu", "leaky_relu(p, slope = 0.1)");
    unary_case("clamp", "clamp(p, -0.5, 0.5)");
}

#[test]
fn binary_functions_with_broadcasting() {
    for (name, op) in [
        ("add", "a + b"),
        ("sub", "a - b"),
        ("mul", "a * b"),
        ("div", "a / (b + 3)"),
        ("pow", "(a + 2) ** b"),
        ("maximum", "maximum(a, b)"),
        ("minimum", "minimum(a, b)"),
    ] {
        // Same shapes, a row vector, a column, and a scalar against a matrix.
        for (shape_a, shape_b) in [
            ("[{M}, {N}]", "[{M}, {N}]"),
            ("[{M}, {N}]", "[{N}]"),
            ("[{M}, 1]", "[1, {N}]"),
            ("[]", "[{M}, {N}]"),
        ] {
            check(
                name,
                &format!(
                    "model m {{
                        input c: f64[{{M}}, {{N}}]
                        param a: f64{shape_a} = zeros
                        param b: f64{shape_b} = zeros
                        loss sum(({op}) * c)
                    }}"
                ),
            );
        }
    }
    // A constant exponent, as in `x ** 2`.
    unary_case("square", "p ** 2");
}

#[test]
fn matrix_products() {
    check(
        "matmul",
        "model m {
            input c: f64[{M}, {N}]
            param a: f64[{M}, {K}] = zeros
            param b: f64[{K}, {N}] = zeros
            loss sum((a @ b) * c)
        }",
    );
    check(
        "batched_matmul",
        "model m {
            input c: f64[B, {M}, {N}]
            param a: f64[B, {M}, {K}] = zeros
            param b: f64[{K}, {N}] = zeros
            loss sum((a @ b) * c)
        }",
    );
    check(
        "transpose",
        "model m {
            input c: f64[{N}, {M}]
            param a: f64[{M}, {N}] = zeros
            loss sum(transpose(a) * c)
        }",
    );
}

#[test]
fn reductions_with_keepdims_and_negative_axes() {
    for func in ["sum", "mean", "max", "logsumexp"] {
        for args in [
            "",
            ", axis = 0",
            ", axis = -1",
            ", axis = 1, keepdims = true",
            ", axis = [0, 2]",
            ", axis = -2, keepdims = true",
        ] {
            // `sin` makes every element of the result matter differently.
            check(
                func,
                &format!(
                    "model m {{
                        param x: f64[{{M}}, {{M}}, {{N}}] = zeros
                        loss sum(sin({func}(x{args}) * 2))
                    }}"
                ),
            );
        }
    }
}

#[test]
fn softmax_and_log_softmax() {
    for func in ["softmax", "log_softmax"] {
        for axis in ["", ", axis = 0", ", axis = -1"] {
            check(
                func,
                &format!(
                    "model m {{
                        input c: f64[{{M}}, {{N}}]
                        param x: f64[{{M}}, {{N}}] = zeros
                        loss sum({func}(x{axis}) * c)
                    }}"
                ),
            );
        }
    }
}

#[test]
fn shape_ops() {
    check(
        "reshape",
        "model m {
            input c: f64[{N}, {M}, 2]
            param x: f64[{M}, {N}, 2] = zeros
            loss sum(reshape(x, [{N}, -1, 2]) * c)
        }",
    );
    check(
        "concat",
        "model m {
            input c: f64[{M}, 5]
            param a: f64[{M}, 2] = zeros
            param b: f64[{M}, 3] = zeros
            loss sum(concat([a, b], axis = -1) * c)
        }",
    );
    check(
        "concat_axis0",
        "model m {
            input c: f64[4, {N}]
            param a: f64[1, {N}] = zeros
            param b: f64[3, {N}] = zeros
            loss sum(concat([a, b]) * c)
        }",
    );
}

#[test]
fn layers() {
    check(
        "dropout",
        "model m {
            input c: f64[B, {M}]
            param x: f64[B, {M}] = zeros
            loss sum(dropout(x, 0.4) * c)
        }",
    );
    check(
        "batch_norm",
        "model m {
            input c: f64[B, {M}]
            param x: f64[B, {M}] = zeros
            param g: f64[{M}] = ones
            param b: f64[{M}] = zeros
            buffer mu: f64[{M}] = zeros
            buffer var: f64[{M}] = ones
            loss sum(batch_norm(x, g, b, mu, var) * c)
        }",
    );
    check(
        "batch_norm_3d",
        "model m {
            input c: f64[B, {M}, {N}]
            param x: f64[B, {M}, {N}] = zeros
            param g: f64[{M}] = ones
            param b: f64[{M}] = zeros
            buffer mu: f64[{M}] = zeros
            buffer var: f64[{M}] = ones
            loss sum(batch_norm(x, g, b, mu, var, eps = 0.001) * c)
        }",
    );
    check(
        "layer_norm",
        "model m {
            input c: f64[B, {M}, {N}]
            param x: f64[B, {M}, {N}] = zeros
            param g: f64[{N}] = ones
            param b: f64[{N}] = zeros
            loss sum(layer_norm(x, g, b) * c)
        }",
    );
    check(
        "embedding",
        "model m {
            input ids: i32[B, {K}]
            input c: f64[B, {K}, {N}]
            param table: f64[{M}, {N}] = zeros
            loss sum(embedding(ids, table) * c)
        }",
    );
}

#[test]
fn losses() {
    check(
        "cross_entropy",
        "model m {
            input y: i32[B]
            param logits: f64[B, {M}] = zeros
            loss cross_entropy(logits * 3, y)
        }",
    );
    check(
        "mse",
        "model m {
            param pred: f64[B, {M}] = zeros
            param target: f64[B, {M}] = zeros
            loss mse(pred, target)
        }",
    );
    check(
        "bce_with_logits",
        "model m {
            param logits: f64[B, {M}] = zeros
            param target: f64[B, {M}] = zeros
            loss bce_with_logits(logits * 3, target)
        }",
    );
}

#[test]
fn gradient_plumbing() {
    // Fan-out accumulation, a tied weight, identity, retained values,
    // stop_gradient and no_grad in one model.
    check(
        "plumbing",
        "model m {
            input x: f64[B, {M}]
            input y: i32[B]
            param w: f64[{M}, {M}] = zeros
            param v: f64[{M}, {N}] = zeros
            let h = tanh(x @ w)
            let h2 = tanh(h @ w) + h
            let s = stop_gradient(h2 * 2)
            no_grad {
                let t = h2 @ v
            }
            let logits = h2 @ v + s @ v + t
            retain h, h2, logits
            output logits
            loss cross_entropy(logits, y) + mean(h * h)
        }",
    );
}

#[test]
fn every_example_and_test_model_passes_gradcheck() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    for dir in ["examples", "tests/data"] {
        for entry in std::fs::read_dir(root.join(dir)).expect("directory") {
            let path = entry.expect("entry").path();
            if path.extension().is_none_or(|e| e != "grad")
                || common::chaotic_under_random_params(&path)
            {
                continue;
            }
            let source = std::fs::read_to_string(&path).expect("readable");
            let options = LowerOptions {
                float_dtype: Some(DType::F64),
            };
            let compilation = compile_source(&path.display().to_string(), &source, options);
            for model in &compilation.models {
                for mode in [Mode::Train, Mode::Eval] {
                    let graph = model.graph(mode);
                    if graph.loss().is_none() {
                        continue;
                    }
                    let reports = gradcheck(graph, Options::default()).expect("gradcheck runs");
                    for report in reports {
                        assert!(
                            report.relative_error < TOLERANCE,
                            "{} ({mode}): grad.{} relative error {:e}",
                            path.display(),
                            report.name,
                            report.relative_error
                        );
                    }
                }
            }
        }
    }
}
