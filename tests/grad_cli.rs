//! End-to-end tests of `gradc grad`, `gradc gradcheck`, `gradc explain` and
//! `gradc graph --stage backward` through the binary: gradients computed by
//! hand for tiny models (a tied weight, a param behind `stop_gradient`, a
//! frozen param, a retained value, huge logits), and bad tensor files.

use std::collections::BTreeMap;
mod common;

use common::{gradc, scratch};

use gradc::interp::Tensor;
use gradc::ir::DType;
use gradc::tensor_file;

fn tensor(dtype: DType, shape: &[usize], data: &[f64]) -> Tensor {
    Tensor::new(dtype, shape.to_vec(), data.to_vec())
}

/// Writes the model and inputs, runs `gradc grad` with `extra` flags and
/// returns the output tensors, stderr and exit code.
fn run_grad(
    name: &str,
    model: &str,
    inputs: &[(&str, Tensor)],
    extra: &[&str],
) -> (BTreeMap<String, Tensor>, String, i32) {
    let dir = scratch(name);
    let model_path = dir.join("model.grad");
    std::fs::write(&model_path, model).expect("write model");
    let input_path = dir.join("in.safetensors");
    let inputs: BTreeMap<String, Tensor> = inputs
        .iter()
        .map(|(n, t)| (n.to_string(), t.clone()))
        .collect();
    tensor_file::write(&input_path, &inputs).expect("write inputs");
    let out_path = dir.join("out.safetensors");
    let mut args = vec![
        "grad",
        model_path.to_str().expect("utf-8"),
        "--tensors",
        input_path.to_str().expect("utf-8"),
        "--out",
        out_path.to_str().expect("utf-8"),
    ];
    args.extend_from_slice(extra);
    let output = gradc(&args);
    let code = output.status.code().unwrap_or(-1);
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    let tensors = if code == 0 {
        tensor_file::read(&out_path).expect("output readable")
    } else {
        BTreeMap::new()
    };
    let leftovers: Vec<_> = std::fs::read_dir(&dir)
        .expect("dir")
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().ends_with(".tmp"))
        .collect();
    assert!(
        leftovers.is_empty(),
        "temporary files left behind: {leftovers:?}"
    );
    std::fs::remove_dir_all(&dir).ok();
    (tensors, stderr, code)
}

fn close(actual: &[f64], expected: &[f64]) {
    assert_eq!(actual.len(), expected.len(), "{actual:?} vs {expected:?}");
    for (a, e) in actual.iter().zip(expected) {
        assert!(
            (a - e).abs() <= 1e-9 * e.abs().max(1.0),
            "{actual:?} vs {expected:?}"
        );
    }
}

#[test]
fn tied_weight_accumulates_both_uses() {
    // loss = sum(x w w) = x w^2, so d/dw = 2 x w = 12 at x = 3, w = 2.
    let model = "model m {
        input x: f64[1, 1]
        param w: f64[1, 1] = ones
        loss sum(x @ w @ w)
    }";
    let (out, stderr, code) = run_grad(
        "tied",
        model,
        &[
            ("x", tensor(DType::F64, &[1, 1], &[3.0])),
            ("w", tensor(DType::F64, &[1, 1], &[2.0])),
        ],
        &["--dtype", "f64"],
    );
    assert_eq!(code, 0, "{stderr}");
    close(&out["loss"].data, &[12.0]);
    close(&out["grad.w"].data, &[12.0]);
    assert_eq!(out["grad.w"].dtype, DType::F64);
}

#[test]
fn stop_gradient_param_gets_zeros_and_a_warning() {
    let model = "model m {
        input x: f32[2]
        param a: f32[2] = ones
        param b: f32[2] = ones
        loss sum(x * a + stop_gradient(x * b))
    }";
    let x = tensor(DType::F32, &[2], &[1.5, -2.0]);
    let ones = tensor(DType::F32, &[2], &[1.0, 1.0]);
    let (out, stderr, code) = run_grad(
        "stop",
        model,
        &[("x", x), ("a", ones.clone()), ("b", ones)],
        &[],
    );
    assert_eq!(code, 0, "{stderr}");
    close(&out["grad.a"].data, &[1.5, -2.0]);
    close(&out["grad.b"].data, &[0.0, 0.0]);
    assert!(stderr.contains("no gradient reaches `b`"), "{stderr}");
    assert!(stderr.contains("W0002"), "{stderr}");
}

#[test]
fn frozen_params_get_no_gradient_entry_and_retained_values_do() {
    // h = x w (frozen), loss = sum(h * v): d/dv = h, d/dh = v.
    let model = "model m {
        input x: f32[1, 2]
        frozen param w: f32[2, 2] = ones
        param v: f32[1, 2] = ones
        let h = x @ w
        retain h
        output h2 = h * 2
        loss sum(h * v)
    }";
    let inputs = [
        ("x", tensor(DType::F32, &[1, 2], &[1.0, 2.0])),
        ("w", tensor(DType::F32, &[2, 2], &[1.0, 0.0, 0.0, 3.0])),
        ("v", tensor(DType::F32, &[1, 2], &[5.0, 7.0])),
    ];
    let (out, stderr, code) = run_grad("frozen", model, &inputs, &[]);
    assert_eq!(code, 0, "{stderr}");
    let names: Vec<&str> = out.keys().map(String::as_str).collect();
    assert_eq!(names, vec!["grad.h", "grad.v", "h2", "loss"]);
    close(&out["grad.v"].data, &[1.0, 6.0]);
    close(&out["grad.h"].data, &[5.0, 7.0]);
    close(&out["h2"].data, &[2.0, 12.0]);
    close(&out["loss"].data, &[47.0]);
}

#[test]
fn cross_entropy_is_stable_for_huge_logits() {
    let model = "model m {
        input y: i32[2]
        param logits: f32[2, 3] = zeros
        loss cross_entropy(logits, y)
    }";
    let logits = tensor(DType::F32, &[2, 3], &[1e4, 0.0, -1e4, 1e4, 0.0, -1e4]);
    let labels = tensor(DType::I32, &[2], &[0.0, 1.0]);
    let (out, stderr, code) = run_grad("huge", model, &[("logits", logits), ("y", labels)], &[]);
    assert_eq!(code, 0, "{stderr}");
    // Row 0 is certain and right (loss 0); row 1 is certain and wrong (1e4).
    close(&out["loss"].data, &[5000.0]);
    close(&out["grad.logits"].data, &[0.0, 0.0, 0.0, 0.5, -0.5, 0.0]);
}

#[test]
fn eval_mode_skips_dropout_and_i64_labels_are_read() {
    let model = "model m {
        input x: f64[2, 2]
        input y: i32[2]
        param w: f64[2, 2] = zeros
        loss cross_entropy(dropout(x @ w, 0.5), y)
    }";
    let inputs = [
        ("x", tensor(DType::F32, &[2, 2], &[1.0, 0.0, 0.0, 1.0])),
        ("w", tensor(DType::F64, &[2, 2], &[0.0; 4])),
    ];
    // Labels as I64, the way PyTorch stores them, written by hand.
    let dir = scratch("i64");
    let labels_path = dir.join("labels.safetensors");
    let header = br#"{"y":{"dtype":"I64","shape":[2],"data_offsets":[0,16]}}"#;
    let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(header);
    bytes.extend_from_slice(&0i64.to_le_bytes());
    bytes.extend_from_slice(&1i64.to_le_bytes());
    std::fs::write(&labels_path, &bytes).expect("write");
    let labels = tensor_file::read(&labels_path).expect("reads I64");
    assert_eq!(labels["y"].dtype, DType::I32);
    let mut all: Vec<(&str, Tensor)> = inputs.to_vec();
    all.push(("y", labels["y"].clone()));
    let (out, stderr, code) = run_grad("eval", model, &all, &["--mode", "eval", "--dtype", "f64"]);
    assert_eq!(code, 0, "{stderr}");
    // Uniform logits: loss ln 2, gradient (softmax - onehot) x / N.
    close(&out["loss"].data, &[std::f64::consts::LN_2]);
    close(&out["grad.w"].data, &[-0.25, 0.25, 0.25, -0.25]);
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn missing_and_misshaped_tensors_are_named() {
    let model = "model m {
        input x: f32[B, 3]
        param w: f32[3, 2] = zeros
        output y = x @ w
    }";
    let (_, stderr, code) = run_grad(
        "missing",
        model,
        &[("x", tensor(DType::F32, &[1, 3], &[0.0; 3]))],
        &[],
    );
    assert_eq!(code, 2);
    assert!(stderr.contains("no `w` (f32[3, 2])"), "{stderr}");
    let (_, stderr, code) = run_grad(
        "misshaped",
        model,
        &[
            ("x", tensor(DType::F32, &[1, 3], &[0.0; 3])),
            ("w", tensor(DType::F32, &[2, 3], &[0.0; 6])),
        ],
        &[],
    );
    assert_eq!(code, 2);
    assert!(
        stderr.contains("tensor `w` is f32[2, 3] but the model declares f32[3, 2]"),
        "{stderr}"
    );
    let (_, stderr, code) = run_grad(
        "labels",
        "model m { input y: i32[2] param l: f32[2, 3] = zeros loss cross_entropy(l, y) }",
        &[
            ("y", tensor(DType::I32, &[2], &[0.0, 7.0])),
            ("l", tensor(DType::F32, &[2, 3], &[0.0; 6])),
        ],
        &[],
    );
    assert_eq!(code, 2);
    assert!(
        stderr.contains("label 7 at position 1 is out of range 0..3"),
        "{stderr}"
    );
}

#[test]
fn a_corrupt_tensor_file_is_an_error() {
    let dir = scratch("corrupt");
    let path = dir.join("bad.safetensors");
    std::fs::write(&path, b"\xff\xff\xff\xff\xff\xff\xff\x7fnot a header").expect("write");
    let output = gradc(&[
        "grad",
        "examples/digits_mlp.grad",
        "--tensors",
        path.to_str().expect("utf-8"),
        "--out",
        dir.join("out.safetensors").to_str().expect("utf-8"),
    ]);
    assert_eq!(output.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&output.stderr).contains("not a valid safetensors file"));
    assert!(!dir.join("out.safetensors").exists());
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn gradcheck_passes_on_the_examples_and_reports_per_tensor() {
    for file in [
        "examples/digits_mlp.grad",
        "examples/residual.grad",
        "examples/bn_dropout.grad",
    ] {
        let output = gradc(&["gradcheck", file]);
        let stdout = String::from_utf8_lossy(&output.stdout);
        assert_eq!(output.status.code(), Some(0), "{file}: {stdout}");
        assert!(
            stdout.contains("grad.w1") || stdout.contains("grad.w_in"),
            "{stdout}"
        );
        assert!(stdout.contains(" 0 failed"), "{stdout}");
    }
    let output = gradc(&[
        "gradcheck",
        "examples/digits_mlp.grad",
        "--dtype",
        "f32",
        "--seed",
        "5",
    ]);
    assert_eq!(
        output.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&output.stdout)
    );
}

#[test]
fn explain_and_backward_graph() {
    let output = gradc(&["explain", "tests/data/gradient_control.grad"]);
    assert_eq!(output.status.code(), Some(0));
    let text = String::from_utf8_lossy(&output.stdout);
    assert!(text.contains("case 3, no gradient can reach it: its path to the loss goes through `stop_gradient` at 18:14"), "{text}");
    assert!(
        text.contains("it is only used inside `no_grad` at 19:5"),
        "{text}"
    );
    assert!(
        text.contains("case 2, on a gradient path but frozen"),
        "{text}"
    );
    let output = gradc(&["graph", "examples/digits_mlp.grad", "--stage", "backward"]);
    let text = String::from_utf8_lossy(&output.stdout);
    assert!(text.contains("grad w1  MatMulBackward of %8"), "{text}");
    let output = gradc(&[
        "graph",
        "examples/digits_mlp.grad",
        "--stage",
        "backward",
        "--format",
        "dot",
    ]);
    let text = String::from_utf8_lossy(&output.stdout);
    assert!(
        text.contains("style=dashed") && text.contains("CrossEntropyBackward"),
        "{text}"
    );
}

#[test]
fn grad_on_the_jit_and_on_the_interpreter_agree() {
    // A dense layer with a bias, GELU, dropout and a mean-reduced loss: the
    // JIT (the default) compiles the elementwise kernels and runs the
    // products on its GEMM; `--backend interp` is the reference.
    let model = "model m {
        input x: f64[3, 4]
        param w: f64[4, 5] = zeros
        param b: f64[5] = zeros
        loss mean(dropout(gelu(x @ w + b), 0.25) ** 2)
    }";
    let values = |n: usize, salt: usize| -> Vec<f64> {
        (0..n)
            .map(|i| (((i * 7 + salt) % 11) as f64 - 5.0) / 4.0)
            .collect()
    };
    let inputs = [
        ("x", tensor(DType::F64, &[3, 4], &values(12, 1))),
        ("w", tensor(DType::F64, &[4, 5], &values(20, 2))),
        ("b", tensor(DType::F64, &[5], &values(5, 3))),
    ];
    let flags = ["--dtype", "f64", "--seed", "5"];
    let (jit, stderr, code) = run_grad("backend_jit", model, &inputs, &flags);
    assert_eq!(code, 0, "{stderr}");
    let mut interp_flags = flags.to_vec();
    interp_flags.extend(["--backend", "interp"]);
    let (reference, stderr, code) = run_grad("backend_interp", model, &inputs, &interp_flags);
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(
        jit.keys().collect::<Vec<_>>(),
        ["grad.b", "grad.w", "loss"].iter().collect::<Vec<_>>()
    );
    for (name, value) in &reference {
        close(&jit[name].data, &value.data);
    }
}
