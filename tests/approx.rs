//! The JIT's polynomial `exp`, `sigmoid`, `tanh`, `log` and `softplus`
//! (`src/jit/approx.rs`) against the platform's functions (the
//! interpreter's, for `sigmoid` and `softplus`): the maximum error in ulps over wide
//! samples and the special values (zeros, infinities, NaN, the overflow and
//! underflow edges, subnormal inputs and results), in `f64`, through vector
//! loops and their scalar tails. `f32` results are compared with the
//! interpreter's, which round the same `f64` values.

use std::collections::BTreeMap;

use gradc::driver::compile_source;
use gradc::interp::{self, Context, Tensor};
use gradc::ir::DType;
use gradc::jit::Jit;
use gradc::lower::LowerOptions;
use gradc::random::Stream;
use gradc::train::Backend;

/// How many representable doubles lie between `a` and `b` (0 for equal
/// values, any NaN matching any NaN; infinite for a sign or class change).
fn ulps(a: f64, b: f64) -> u64 {
    if a.is_nan() && b.is_nan() || a == b {
        return 0;
    }
    if a.is_nan() || b.is_nan() || a.is_sign_negative() != b.is_sign_negative() {
        return u64::MAX;
    }
    (a.to_bits() as i64 - b.to_bits() as i64).unsigned_abs()
}

fn samples() -> Vec<f64> {
    let mut stream = Stream::new(7);
    let mut x = vec![
        0.0,
        -0.0,
        1.0,
        -1.0,
        f64::INFINITY,
        f64::NEG_INFINITY,
        f64::NAN,
        709.782712893384,
        709.79,
        710.0,
        1000.0,
        -708.39,
        -740.0,
        -745.1332191019411,
        -745.2,
        -746.0,
        -1000.0,
        1e-300,
        -1e-300,
        f64::MIN_POSITIVE,
        0.5 * std::f64::consts::LN_2,
        -0.5 * std::f64::consts::LN_2,
    ];
    for _ in 0..200_000 {
        x.push(stream.uniform() * 1455.0 - 745.0);
    }
    for _ in 0..200_000 {
        x.push(stream.uniform() * 2.0 - 1.0);
    }
    for _ in 0..100_000 {
        x.push((stream.uniform() * 80.0 - 40.0) * 1e-3);
    }
    x.push(3.0); // an odd count: the scalar tail runs too
    x
}

/// Positive samples for `log`: over the whole exponent range, near 1,
/// subnormal, and the special values.
fn positive_samples() -> Vec<f64> {
    let mut stream = Stream::new(8);
    let mut p = vec![
        0.0,
        -0.0,
        -1.0,
        f64::INFINITY,
        f64::NEG_INFINITY,
        f64::NAN,
        1.0,
        2.0,
        0.5,
        std::f64::consts::SQRT_2,
        std::f64::consts::E,
        f64::MAX,
        f64::MIN_POSITIVE,
        5e-324,
        1e-310,
        1.0 + f64::EPSILON,
        1.0 - f64::EPSILON / 2.0,
    ];
    for _ in 0..200_000 {
        p.push((stream.uniform() * 1418.0 - 709.0).exp());
    }
    for _ in 0..100_000 {
        p.push(1.0 + (stream.uniform() - 0.5) * 1e-3);
    }
    for _ in 0..50_000 {
        p.push(stream.uniform() * 1e-308);
    }
    p
}

#[test]
fn polynomial_functions_are_within_a_few_ulps() {
    let source = "model m {\n    input x: f64[N]\n    input p: f64[M]\n    output e = exp(x)\n    output s = sigmoid(x)\n    output t = tanh(x)\n    output l = log(p)\n    output f = softplus(x)\n}\n";
    let compilation = compile_source("m.grad", source, LowerOptions::default());
    let graph = &compilation.models[0].eval;
    let x = samples();
    let p = positive_samples();
    let mut leaves = BTreeMap::new();
    leaves.insert(
        "x".to_string(),
        Tensor::new(DType::F64, vec![x.len()], x.clone()),
    );
    leaves.insert(
        "p".to_string(),
        Tensor::new(DType::F64, vec![p.len()], p.clone()),
    );
    let context = Context { seed: 0, step: 0 };
    let got = Jit::new().run(graph, &leaves, context).expect("jit");
    // The interpreter's functions (Rust's `exp`, `tanh` and `ln`, and
    // `sigmoid` and `softplus` written on `exp` and `ln_1p`).
    let reference = interp::evaluate(graph, &leaves, context).expect("interpreter");
    let outputs: BTreeMap<String, _> = graph.outputs().into_iter().collect();
    let mut worst = BTreeMap::new();
    for (name, bound, input) in [
        ("e", 1, &x),
        ("s", 2, &x),
        ("t", 3, &x),
        ("l", 2, &p),
        ("f", 4, &x),
    ] {
        let values = &got.values[&outputs[name]].data;
        let wanted = &reference.values[&outputs[name]].data;
        let mut max = (0, 0.0);
        for ((&v, &y), &want) in input.iter().zip(values).zip(wanted) {
            let error = ulps(y, want);
            assert!(error <= bound, "{name}({v:e}) = {y:e}, expected {want:e}");
            if error > max.0 {
                max = (error, v);
            }
        }
        worst.insert(name, max);
    }
    // The largest errors, for docs/jit.md (`cargo test --test approx --
    // --nocapture` prints them).
    println!("max error in ulps (at x): {worst:?}");

    // In f32 the values round to what the interpreter gives.
    let compilation = compile_source(
        "m.grad",
        source,
        LowerOptions {
            float_dtype: Some(DType::F32),
        },
    );
    let graph = &compilation.models[0].eval;
    for (name, values) in [("x", &x), ("p", &p)] {
        let narrow: Vec<f64> = values.iter().map(|&v| f64::from(v as f32)).collect();
        leaves.insert(
            name.to_string(),
            Tensor::new(DType::F32, vec![values.len()], narrow),
        );
    }
    let got = Jit::new().run(graph, &leaves, context).expect("jit");
    let expected = interp::evaluate(graph, &leaves, context).expect("interpreter");
    for (name, id) in graph.outputs() {
        let (a, b) = (&expected.values[&id].data, &got.values[&id].data);
        let differ = a.iter().zip(b).filter(|(a, b)| ulps(**a, **b) != 0).count();
        assert_eq!(differ, 0, "{name}: {differ} f32 values differ");
    }
}

/// GELU and its derivative, whose `erf` is a piecewise rational fit over
/// the polynomial `exp` in the JIT (`approx::erf`) and `libm::erf` in the
/// interpreter: within 4 ulps in `f64` for `x >= 0`; for `x < 0`, where
/// `1 + erf` cancels and magnifies the last-place rounding of `erf` near
/// -1 in both, within `|x| eps` absolute; and the same `f32` values as the
/// interpreter.
#[test]
fn gelu_and_its_derivative_are_within_a_few_ulps() {
    use gradc::autodiff;
    use gradc::ir::Role;
    let mut stream = Stream::new(9);
    let mut x = vec![
        0.0,
        -0.0,
        1e-300,
        -1e-300,
        1e-9,
        f64::INFINITY,
        f64::NEG_INFINITY,
        f64::NAN,
        0.84375 * std::f64::consts::SQRT_2,
        1.25 * std::f64::consts::SQRT_2,
        6.0 * std::f64::consts::SQRT_2,
        -6.0 * std::f64::consts::SQRT_2,
        40.0,
        -40.0,
    ];
    for _ in 0..200_000 {
        x.push(stream.uniform() * 24.0 - 12.0);
    }
    for _ in 0..100_000 {
        x.push((stream.uniform() * 2.0 - 1.0) * 1e-4);
    }
    x.push(0.5); // an odd count: the scalar tail runs too
    let source = format!(
        "model m {{\n    param w: f64[{}] = zeros\n    output g = gelu(w)\n    loss sum(g)\n}}\n",
        x.len()
    );
    for dtype in [DType::F64, DType::F32] {
        let compilation = compile_source(
            "m.grad",
            &source,
            LowerOptions {
                float_dtype: Some(dtype),
            },
        );
        assert!(
            !compilation.has_errors(),
            "{}",
            compilation.render_diagnostics()
        );
        let joint = autodiff::differentiate(&compilation.models[0].train).expect("joint");
        let values: Vec<f64> = match dtype {
            DType::F32 => x.iter().map(|&v| f64::from(v as f32)).collect(),
            _ => x.clone(),
        };
        let mut leaves = BTreeMap::new();
        leaves.insert(
            "w".to_string(),
            Tensor::new(dtype, vec![values.len()], values.clone()),
        );
        let context = Context { seed: 0, step: 0 };
        let got = Jit::new().run(&joint, &leaves, context).expect("jit");
        let expected = interp::evaluate(&joint, &leaves, context).expect("interpreter");
        let find = |role: Role| {
            joint
                .ids()
                .into_iter()
                .find(|&id| joint.node(id).role == role)
                .expect("a node of that role")
        };
        let gelu = find(Role::Output("g".into()));
        let slope = find(Role::Gradient("w".into()));
        let mut worst = BTreeMap::new();
        for (name, id, reference) in [
            (
                "gelu",
                gelu,
                (|v: f64| 0.5 * v * (1.0 + libm::erf(v / std::f64::consts::SQRT_2)))
                    as fn(f64) -> f64,
            ),
            ("gelu'", slope, gelu_derivative as fn(f64) -> f64),
        ] {
            let (jit, interp) = (&got.values[&id].data, &expected.values[&id].data);
            let mut max = (0, 0.0);
            for ((&v, &y), &want) in values.iter().zip(jit).zip(interp) {
                if dtype == DType::F32 {
                    assert_eq!(
                        ulps(y, want),
                        0,
                        "{name}({v:e}) in f32 = {y:e}, expected {want:e}"
                    );
                    continue;
                }
                assert_eq!(ulps(want, reference(v)), 0, "the interpreter's {name}");
                let error = ulps(y, want);
                // Where `1 + erf` cancels (x < 0), an error of a few ulps
                // of `erf` near -1 is the bound: `|x| eps` absolute.
                let cancelled = v < 0.0;
                assert!(
                    error <= 4 || (cancelled && (y - want).abs() <= f64::EPSILON * v.abs()),
                    "{name}({v:e}) = {y:e}, expected {want:e} ({error} ulps)"
                );
                if !cancelled && error > max.0 {
                    max = (error, v);
                }
            }
            worst.insert(name, max);
        }
        // For docs/jit.md (`--nocapture` prints it).
        println!("{dtype:?}: max error in ulps (at x): {worst:?}");
    }
}

/// GELU's derivative, `Phi(x) + x phi(x)`, in the order of operations of
/// its derivative rule (`autodiff::rules`): the interpreter must give these
/// bits.
fn gelu_derivative(x: f64) -> f64 {
    let cdf = 0.5 * (1.0 + libm::erf(x / std::f64::consts::SQRT_2));
    let pdf = 0.398_942_280_401_432_7 * (-0.5 * x * x).exp();
    cdf + x * pdf
}
