//! Helpers shared by the tests that run the `gradc` binary.

#![allow(dead_code, reason = "each test binary uses some of the helpers")]

use std::path::PathBuf;
use std::process::{Command, Output};

/// Runs `gradc` with arguments, in the repository root.
pub fn gradc(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_gradc"))
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("gradc runs")
}

/// Runs `gradc` and returns the exit code, stdout and stderr.
pub fn run(args: &[&str]) -> (i32, String, String) {
    let output = gradc(args);
    (
        output.status.code().unwrap_or(-1),
        stdout(&output),
        stderr(&output),
    )
}

/// The standard output as text.
pub fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// The standard error as text.
pub fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// The bytes of a `.npy` file (version 1, C order) of `shape` with
/// element type `descr` (`<f4`, `<i8`, ...) and the raw little-endian
/// `data`.
pub fn npy(shape: &[usize], descr: &str, data: Vec<u8>) -> Vec<u8> {
    let dims: Vec<String> = shape.iter().map(|d| d.to_string()).collect();
    let mut header = format!(
        "{{'descr': '{descr}', 'fortran_order': False, 'shape': ({},), }}",
        dims.join(", ")
    );
    while (header.len() + 11) % 64 != 0 {
        header.push(' ');
    }
    header.push('\n');
    let mut bytes = b"\x93NUMPY\x01\x00".to_vec();
    bytes.extend_from_slice(&(header.len() as u16).to_le_bytes());
    bytes.extend_from_slice(header.as_bytes());
    bytes.extend(data);
    bytes
}

/// A fresh scratch directory for one test.
pub fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("gradc-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("scratch dir");
    dir
}

/// Compiles a file of `examples/` with the default options.
pub fn example(name: &str) -> gradc::driver::Compilation {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("examples")
        .join(name);
    let source = std::fs::read_to_string(&path).expect("the example exists");
    gradc::driver::compile_source(name, &source, gradc::lower::LowerOptions::default())
}

/// Random leaves for a graph (`gradcheck::random_step_leaves`: symbols
/// bound to 5, zeroed optimizer state, learning rate 0.01, step 3), in the
/// float type `dtype` for the learning rate and step.
pub fn leaves_for(
    graph: &gradc::ir::Graph,
    dtype: gradc::ir::DType,
) -> std::collections::BTreeMap<String, gradc::interp::Tensor> {
    let mut leaves = gradc::gradcheck::random_step_leaves(graph, 11, 5, 0.01, 3.0);
    for name in [gradc::step::LR, gradc::step::STEP] {
        if let Some(value) = leaves.get(name).map(|t| t.data[0]) {
            leaves.insert(name.into(), gradc::interp::Tensor::scalar(dtype, value));
        }
    }
    leaves
}

/// Files whose models the harnesses of random params skip: a 50-step
/// recurrence whose 32x32 recurrent weight drawn from U(-1, 1) has a
/// spectral radius near 3, so that its values and gradients grow as 3^50
/// and neither finite differences nor two orders of `f32` rounding can be
/// compared. `tests/jit.rs` checks these models from their own
/// initialization and data instead.
pub const CHAOTIC_UNDER_RANDOM_PARAMS: &[&str] = &["remember_first.grad"];

/// Whether `path` is one of [`CHAOTIC_UNDER_RANDOM_PARAMS`].
pub fn chaotic_under_random_params(path: &std::path::Path) -> bool {
    path.file_name()
        .and_then(|name| name.to_str())
        .is_some_and(|name| CHAOTIC_UNDER_RANDOM_PARAMS.contains(&name))
}

/// Every model of the `.grad` files in these folders (relative to the
/// repository root, in name order), lowered in `f32` and in `f64`: its eval
/// graph and, if it has a loss, its step graph, each with a label naming
/// the file, dtype and mode.
pub fn model_graphs(dirs: &[&str]) -> Vec<(String, gradc::ir::DType, gradc::ir::Graph)> {
    use gradc::ir::DType;
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut graphs = Vec::new();
    for dir in dirs {
        let mut paths: Vec<PathBuf> = std::fs::read_dir(root.join(dir))
            .expect("a test folder")
            .map(|entry| entry.expect("entry").path())
            .filter(|path| path.extension().is_some_and(|e| e == "grad"))
            .collect();
        paths.sort();
        paths.retain(|path| !chaotic_under_random_params(path));
        for path in paths {
            let source = std::fs::read_to_string(&path).expect("readable");
            for dtype in [DType::F32, DType::F64] {
                let options = gradc::lower::LowerOptions {
                    float_dtype: Some(dtype),
                };
                let name = path.display().to_string();
                let compilation = gradc::driver::compile_source(&name, &source, options);
                for model in &compilation.models {
                    let mut both = vec![model.eval.clone()];
                    if model.train.loss().is_some() {
                        let config = model.train_config.clone().unwrap_or_default();
                        both.push(gradc::step::build(&model.train, &config).expect("step"));
                    }
                    for graph in both {
                        graphs.push((format!("{name} ({dtype}, {})", graph.mode), dtype, graph));
                    }
                }
            }
        }
    }
    graphs
}
