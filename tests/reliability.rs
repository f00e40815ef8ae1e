//! What a careful probe of the CLI found (issue "Reliability and a user's
//! first hour"), one test per defect: files a user owns are never
//! destroyed, checkpoints and data are checked before they are trusted,
//! divergence and the monitor say what is true, and what a user expects on
//! day one. Each test failed on the code before its fix.

mod common;

use std::collections::BTreeMap;
use std::path::Path;

use common::{npy, run as gradc, scratch};
use gradc::interp::{self, Context, Tensor};
use gradc::ir::DType;
use gradc::train::Backend;

fn text(path: &Path) -> &str {
    path.to_str().expect("utf-8 path")
}

/// Runs `gradc` with `args`, sends it `signal` (`TERM`, `INT`) after 1.5 s
/// and returns its exit code and standard output.
#[cfg(unix)]
fn interrupted(args: &[&str], signal: &str) -> (Option<i32>, String) {
    let child = std::process::Command::new(env!("CARGO_BIN_EXE_gradc"))
        .args(args)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn");
    std::thread::sleep(std::time::Duration::from_millis(1500));
    let status = std::process::Command::new("kill")
        .args([&format!("-{signal}"), &child.id().to_string()])
        .status()
        .expect("kill");
    assert!(status.success());
    let output = child.wait_with_output().expect("wait");
    (
        output.status.code(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
    )
}

/// A small classifier over `[B, 2]` rows with three classes, trained from
/// `d.csv` beside it.
fn small_model(dir: &Path) -> std::path::PathBuf {
    let model = dir.join("m.grad");
    std::fs::write(
        &model,
        "model m { input x: f32[B, 2] input y: i32[B] param w: f32[2, 3] = xavier_normal loss cross_entropy(x @ w, y) }
         train m { data \"d.csv\" epochs 2 batch 4 }",
    )
    .expect("write");
    let rows: String = (0..24)
        .map(|i| format!("{},{},{}\n", i % 5, i % 3, i % 3))
        .collect();
    std::fs::write(dir.join("d.csv"), rows).expect("write");
    model
}

/// Writes a model file into `dir`, beside the data of [`small_model`].
fn beside_the_data(dir: &Path, name: &str, source: &str) -> std::path::PathBuf {
    small_model(dir);
    let model = dir.join(name);
    std::fs::write(&model, source).expect("write");
    model
}

// ---------------------------------------------------------------------
// Files a user owns are never destroyed.

#[test]
fn an_output_that_is_an_input_is_refused_naming_both_roles() {
    let dir = scratch("overwrite-input");
    let model = small_model(&dir);
    let before = std::fs::read(&model).expect("read");
    let spelled = dir.join(".").join("m.grad");
    let (code, stdout, stderr) = gradc(&["train", text(&model), "--save", text(&spelled)]);
    assert_eq!(code, 2, "{stderr}");
    assert!(
        stderr.contains("--save") && stderr.contains("the model source"),
        "{stderr}"
    );
    assert!(!stdout.contains("epoch"), "nothing trains: {stdout}");
    assert_eq!(std::fs::read(&model).expect("read"), before);

    let data = dir.join("d.csv");
    let (code, _, stderr) = gradc(&["train", text(&model), "--metrics", text(&data)]);
    assert_eq!(code, 2);
    assert!(stderr.contains("the data file"), "{stderr}");

    let (code, _, stderr) = gradc(&[
        "train",
        text(&model),
        "--save",
        text(&dir.join("a.safetensors")),
        "--plot",
        text(&dir.join("a.safetensors")),
    ]);
    assert_eq!(code, 2);
    assert!(
        stderr.contains("--plot") && stderr.contains("--save"),
        "{stderr}"
    );

    let tensors = dir.join("in.safetensors");
    std::fs::write(&tensors, b"not really").expect("write");
    let (code, _, stderr) = gradc(&[
        "grad",
        text(&model),
        "--tensors",
        text(&tensors),
        "--out",
        text(&tensors),
    ]);
    assert_eq!(code, 2);
    assert!(
        stderr.contains("--out") && stderr.contains("--tensors"),
        "{stderr}"
    );
    assert_eq!(std::fs::read(&tensors).expect("read"), b"not really");
    std::fs::remove_dir_all(&dir).ok();
}

#[cfg(unix)]
#[test]
fn saving_keeps_links_modes_and_devices() {
    use std::os::unix::fs::{FileTypeExt, PermissionsExt};
    let dir = scratch("save-kinds");
    let model = small_model(&dir);
    let checkpoint = dir.join("ck.safetensors");
    std::fs::write(&checkpoint, b"old").expect("write");
    std::fs::set_permissions(&checkpoint, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    let link = dir.join("link.safetensors");
    std::os::unix::fs::symlink("ck.safetensors", &link).expect("symlink");
    let (code, _, stderr) = gradc(&[
        "train",
        text(&model),
        "--save",
        text(&link),
        "--metrics",
        "/dev/null",
    ]);
    assert_eq!(code, 0, "{stderr}");
    let link_kind = std::fs::symlink_metadata(&link).expect("lstat").file_type();
    assert!(link_kind.is_symlink(), "the link is still a link");
    let saved = std::fs::metadata(&checkpoint).expect("stat");
    assert_eq!(
        saved.permissions().mode() & 0o777,
        0o600,
        "the mode is kept"
    );
    assert!(saved.len() > 3, "written through the link");
    let null = std::fs::metadata("/dev/null").expect("stat");
    assert!(
        null.file_type().is_char_device(),
        "/dev/null is still a device"
    );
    std::fs::remove_dir_all(&dir).ok();
}

#[cfg(unix)]
#[test]
fn sigterm_saves_a_checkpoint_like_ctrl_c() {
    let dir = scratch("sigterm");
    let model = small_model(&dir);
    let checkpoint = dir.join("ck.safetensors");
    let (code, stdout) = interrupted(
        &[
            "train",
            text(&model),
            "--epochs",
            "100000",
            "--save",
            text(&checkpoint),
            "--backend",
            "interp",
        ],
        "TERM",
    );
    assert_eq!(code, Some(1), "{stdout}");
    assert!(stdout.contains("interrupted at epoch"), "{stdout}");
    assert!(checkpoint.exists(), "a checkpoint was saved");
    std::fs::remove_dir_all(&dir).ok();
}

// ---------------------------------------------------------------------
// Checkpoints and data are checked before they are trusted.

fn save_checkpoint(dir: &Path, model: &Path) -> std::path::PathBuf {
    let checkpoint = dir.join("ck.safetensors");
    let (code, _, stderr) = gradc(&[
        "train",
        text(model),
        "--epochs",
        "1",
        "--save",
        text(&checkpoint),
    ]);
    assert_eq!(code, 0, "{stderr}");
    checkpoint
}

#[test]
fn eval_refuses_a_checkpoint_of_another_model() {
    let dir = scratch("eval-other");
    let model = small_model(&dir);
    let checkpoint = save_checkpoint(&dir, &model);
    let mut tensors = gradc::tensor_file::read(&checkpoint).expect("read");
    tensors.remove("w");
    tensors.insert("w_other".into(), Tensor::zeros(DType::F32, &[2, 3]));
    let broken = dir.join("other.safetensors");
    gradc::tensor_file::write(&broken, &tensors).expect("write");
    let (code, stdout, stderr) = gradc(&["eval", text(&model), "--checkpoint", text(&broken)]);
    assert_eq!(code, 2, "{stdout}");
    assert!(
        stderr.contains("it has no `w`") && stderr.contains("the model has no `w_other`"),
        "{stderr}"
    );
    let (code, _, stderr) = gradc(&["eval", text(&model), "--checkpoint", text(&checkpoint)]);
    assert_eq!(code, 0, "{stderr}");
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn init_says_what_it_loaded_and_what_starts_from_initializers() {
    let dir = scratch("init-report");
    let model = small_model(&dir);
    let bigger = dir.join("big.grad");
    std::fs::write(
        &bigger,
        "model m { input x: f32[B, 2] input y: i32[B] param w: f32[2, 3] = xavier_normal param b: f32[3] = zeros loss cross_entropy(x @ w + b, y) }
         train m { data \"d.csv\" epochs 1 batch 4 }",
    )
    .expect("write");
    let checkpoint = save_checkpoint(&dir, &model);
    let (code, stdout, stderr) = gradc(&["train", text(&bigger), "--init", text(&checkpoint)]);
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains("loaded w from"), "{stdout}");
    assert!(
        stdout.contains("so starting from their initializers: b"),
        "{stdout}"
    );
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn non_finite_tensors_and_bad_counters_in_a_checkpoint_are_errors() {
    let dir = scratch("bad-checkpoint");
    let model = small_model(&dir);
    let checkpoint = save_checkpoint(&dir, &model);
    let good = gradc::tensor_file::read(&checkpoint).expect("read");
    type Change = Box<dyn Fn(&mut BTreeMap<String, Tensor>)>;
    let cases: Vec<(&str, Change, &str)> = vec![
        (
            "--resume",
            Box::new(|t| t.get_mut("w").expect("w").data[4] = f64::NAN),
            "tensor `w` holds NaN at index 4",
        ),
        (
            "--init",
            Box::new(|t| t.get_mut("w").expect("w").data[0] = f64::INFINITY),
            "tensor `w` holds inf at index 0",
        ),
        (
            "--resume",
            Box::new(|t| {
                t.get_mut("adam.v.w").expect("adam state").data[1] = f64::NAN;
            }),
            "tensor `adam.v.w` holds NaN at index 1",
        ),
        (
            "--resume",
            Box::new(|t| {
                t.insert("train.step".into(), Tensor::scalar(DType::I32, -5.0));
            }),
            "counter `train.step` is -5",
        ),
        (
            "--resume",
            Box::new(|t| {
                t.insert("train.batch".into(), Tensor::scalar(DType::I32, 999.0));
            }),
            "counter `train.batch` is 999",
        ),
    ];
    for (flag, change, message) in cases {
        let mut tensors = good.clone();
        change(&mut tensors);
        let bad = dir.join("bad.safetensors");
        gradc::tensor_file::write(&bad, &tensors).expect("write");
        let (code, stdout, stderr) = gradc(&["train", text(&model), flag, text(&bad)]);
        assert_eq!(code, 2, "{flag} {message}: {stdout}");
        assert!(
            stderr.contains(message),
            "{flag}: expected `{message}` in {stderr}"
        );
        assert!(!stdout.contains("epoch "), "nothing trains: {stdout}");
    }
    let mut tensors = good.clone();
    tensors.get_mut("w").expect("w").data[2] = f64::NAN;
    let bad = dir.join("bad.safetensors");
    gradc::tensor_file::write(&bad, &tensors).expect("write");
    let (code, _, stderr) = gradc(&["eval", text(&model), "--checkpoint", text(&bad)]);
    assert_eq!(code, 2);
    assert!(
        stderr.contains("tensor `w` holds NaN at index 2"),
        "{stderr}"
    );
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn a_position_beyond_a_symbolic_axis_is_an_error_on_both_backends() {
    // One position of a symbolic axis compiles (`x[:, 5]`, `x[:, -6]`) and
    // is checked when the model runs: with T = 3 neither backend reads out
    // of bounds, both say which index and how many positions there are.
    for index in ["5", "-6"] {
        let source = format!(
            "model m {{
                input x: f32[B, T, 4]
                output last = x[:, {index}] * 2
            }}"
        );
        let compilation = gradc::driver::compile_source(
            "index.grad",
            &source,
            gradc::lower::LowerOptions::default(),
        );
        assert!(
            !compilation.has_errors(),
            "{}",
            compilation.render_diagnostics()
        );
        let graph = &compilation.models[0].eval;
        let x = Tensor::new(DType::F32, vec![2, 3, 4], vec![1.0; 24]);
        let leaves: BTreeMap<String, Tensor> = [("x".to_string(), x)].into();
        let context = Context { seed: 0, step: 0 };
        let interpreted = interp::evaluate(graph, &leaves, context).map(|_| ());
        let compiled = gradc::jit::Jit::new()
            .run(graph, &leaves, context)
            .map(|_| ());
        for (backend, result) in [
            ("interp", interpreted.map_err(|e| e.to_string())),
            ("jit", compiled.map_err(|e| e.to_string())),
        ] {
            let message = result.expect_err(backend);
            assert!(
                message.contains(&format!(
                    "index {index} is out of range for an axis of 3 positions"
                )),
                "{backend}: {message}"
            );
        }
    }
}

#[test]
fn nan_propagates_through_relu_maximum_clamp_and_max_on_both_backends() {
    let source = "model m {
        input x: f32[B, 4]
        output r = relu(x)
        output m = maximum(x, 0.0 * x)
        output c = clamp(x, -1, 1)
        output s = max(x, axis = 1)
        output l = leaky_relu(x)
        output p = softmax(x)
    }";
    let compilation =
        gradc::driver::compile_source("nan.grad", source, gradc::lower::LowerOptions::default());
    assert!(
        !compilation.has_errors(),
        "{}",
        compilation.render_diagnostics()
    );
    let graph = &compilation.models[0].eval;
    let x = Tensor::new(
        DType::F32,
        vec![2, 4],
        vec![f64::NAN, -2.0, 0.5, 3.0, -1.0, -2.0, -3.0, -4.0],
    );
    let leaves: BTreeMap<String, Tensor> = [("x".to_string(), x)].into();
    let context = Context { seed: 0, step: 0 };
    let reference = interp::evaluate(graph, &leaves, context).expect("interpreter");
    let jit = gradc::jit::Jit::new()
        .run(graph, &leaves, context)
        .expect("jit");
    for (name, id) in graph.outputs() {
        for (backend, evaluation) in [("interp", &reference), ("jit", &jit)] {
            let value = &evaluation.values[&id].data;
            assert!(
                value[0].is_nan(),
                "{backend}: `{name}` of NaN is {} (PyTorch and JAX give NaN)",
                value[0]
            );
            let second_row = &value[value.len() / 2..];
            assert!(
                second_row.iter().all(|v| !v.is_nan()),
                "{backend}: `{name}` spread NaN to another row: {value:?}"
            );
        }
    }
}

#[test]
fn data_files_say_which_file_and_line() {
    let dir = scratch("data-lines");
    let model = small_model(&dir);
    let x: Vec<u8> = (0..8).flat_map(|i| (i as f32).to_le_bytes()).collect();
    let y: Vec<u8> = [0i64, 7, 1, 2]
        .iter()
        .flat_map(|v| v.to_le_bytes())
        .collect();
    std::fs::write(dir.join("x.npy"), npy(&[4, 2], "<f4", x)).expect("write");
    std::fs::write(dir.join("y.npy"), npy(&[4], "<i8", y)).expect("write");
    let (code, _, stderr) = gradc(&[
        "train",
        text(&model),
        "--data",
        text(&dir.join("x.npy")),
        "--labels",
        text(&dir.join("y.npy")),
    ]);
    assert_eq!(code, 1, "{stderr}");
    assert!(
        stderr.contains("y.npy:2: label 7 of `y` is not a class in 0..3"),
        "the labels file, not the features file: {stderr}"
    );
    std::fs::write(dir.join("empty.npy"), npy(&[0, 2], "<f4", Vec::new())).expect("write");
    let (code, stdout, stderr) = gradc(&[
        "train",
        text(&model),
        "--data",
        text(&dir.join("empty.npy")),
    ]);
    assert_eq!(code, 1, "{stdout}");
    assert!(
        stderr.contains("empty.npy: the file has no rows"),
        "{stderr}"
    );
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn a_model_with_three_inputs_is_fed_by_name() {
    let dir = scratch("by-name");
    let model = dir.join("m.grad");
    std::fs::write(
        &model,
        "model m {
            input x: f32[B, 2]
            input mask: f32[B, 2]
            input y: i32[B]
            param w: f32[2, 3] = xavier_normal
            loss cross_entropy((x * mask) @ w, y)
        }
        train m { epochs 1 batch 4 }",
    )
    .expect("write");
    let rows = 12;
    let mut csv = String::from("x.0,x.1,mask.0,mask.1,y\n");
    for i in 0..rows {
        csv.push_str(&format!("{},{},1,0,{}\n", i % 4, i % 3, i % 3));
    }
    std::fs::write(dir.join("named.csv"), &csv).expect("write");
    let (code, stdout, stderr) = gradc(&[
        "train",
        text(&model),
        "--data",
        text(&dir.join("named.csv")),
    ]);
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains("epoch   1/1"), "{stdout}");

    let unnamed: String = csv.lines().skip(1).map(|l| format!("{l}\n")).collect();
    std::fs::write(dir.join("unnamed.csv"), unnamed).expect("write");
    let (code, _, stderr) = gradc(&[
        "train",
        text(&model),
        "--data",
        text(&dir.join("unnamed.csv")),
    ]);
    assert_eq!(code, 1);
    assert!(stderr.contains("name each column"), "{stderr}");

    let tensor = |dtype, shape: Vec<usize>, f: &dyn Fn(usize) -> f64| {
        let count = shape.iter().product();
        Tensor::new(dtype, shape, (0..count).map(f).collect())
    };
    let tensors: BTreeMap<String, Tensor> = [
        (
            "x".to_string(),
            tensor(DType::F32, vec![rows, 2], &|i| (i % 5) as f64),
        ),
        (
            "mask".to_string(),
            tensor(DType::F32, vec![rows, 2], &|_| 1.0),
        ),
        (
            "y".to_string(),
            tensor(DType::I32, vec![rows], &|i| (i % 3) as f64),
        ),
    ]
    .into();
    let file = dir.join("d.safetensors");
    gradc::tensor_file::write(&file, &tensors).expect("write");
    let (code, stdout, stderr) = gradc(&["train", text(&model), "--data", text(&file)]);
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains("epoch   1/1"), "{stdout}");
    let mut partial = tensors.clone();
    partial.remove("mask");
    gradc::tensor_file::write(&file, &partial).expect("write");
    let (code, _, stderr) = gradc(&["train", text(&model), "--data", text(&file)]);
    assert_eq!(code, 1);
    assert!(stderr.contains("no array named `mask`"), "{stderr}");
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn an_npz_archive_feeds_inputs_by_name() {
    let dir = scratch("npz");
    let model = small_model(&dir);
    let rows = 12;
    let x: Vec<u8> = (0..rows * 2)
        .flat_map(|i| ((i % 7) as f64).to_le_bytes())
        .collect();
    let y: Vec<u8> = (0..rows)
        .flat_map(|i| ((i % 3) as i32).to_le_bytes())
        .collect();
    let file = std::fs::File::create(dir.join("d.npz")).expect("create");
    let mut zip = zip::ZipWriter::new(file);
    let stored =
        zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored);
    let deflated = zip::write::SimpleFileOptions::default()
        .compression_method(zip::CompressionMethod::Deflated);
    use std::io::Write;
    zip.start_file("x.npy", stored).expect("member");
    zip.write_all(&npy(&[rows, 2], "<f8", x)).expect("write");
    zip.start_file("y.npy", deflated).expect("member");
    zip.write_all(&npy(&[rows], "<i4", y)).expect("write");
    zip.finish().expect("finish");
    let (code, stdout, stderr) =
        gradc(&["train", text(&model), "--data", text(&dir.join("d.npz"))]);
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains("epoch   2/2"), "{stdout}");
    std::fs::remove_dir_all(&dir).ok();
}

#[cfg(unix)]
#[test]
fn reading_a_source_is_bounded() {
    let (code, _, stderr) = gradc(&["check", "/dev/zero"]);
    assert_eq!(code, 2);
    assert!(stderr.contains("64 MiB"), "{stderr}");
}

#[test]
fn huge_inputs_are_echoed_short_and_errors_are_capped() {
    let dir = scratch("echo");
    let name = "q".repeat(200_000);
    let model = dir.join("long.grad");
    std::fs::write(
        &model,
        format!("model m {{ input x: f32[B, 2] output y = x + {name} }}"),
    )
    .expect("write");
    let started = std::time::Instant::now();
    let (code, _, stderr) = gradc(&["check", text(&model)]);
    assert_eq!(code, 1);
    assert!(started.elapsed().as_secs() < 20, "no quadratic suggestion");
    let message = stderr.lines().next().unwrap_or_default();
    assert!(message.len() < 200, "{message}");
    assert!(message.contains("more characters"), "{message}");

    let noise: String = (0..20_000).map(|i| format!("${i} ")).collect();
    let noisy = dir.join("noise.grad");
    std::fs::write(&noisy, noise).expect("write");
    let (code, _, stderr) = gradc(&["check", text(&noisy)]);
    assert_eq!(code, 1);
    assert!(
        stderr.contains("more diagnostics"),
        "{}",
        &stderr[stderr.len().saturating_sub(300)..]
    );
    assert!(
        stderr.len() < 200_000,
        "{} bytes of diagnostics",
        stderr.len()
    );

    let cell = "7".repeat(50_000) + "x";
    std::fs::write(dir.join("d.csv"), format!("1,{cell},0\n")).expect("write");
    let data_model = small_model(&dir);
    std::fs::write(dir.join("d.csv"), format!("1,{cell},0\n")).expect("write");
    let (code, _, stderr) = gradc(&["train", text(&data_model)]);
    assert_eq!(code, 1);
    assert!(stderr.len() < 400, "{stderr}");
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn absurd_epoch_counts_are_refused_not_wrapped() {
    let dir = scratch("epochs");
    let model = small_model(&dir);
    let (code, stdout, stderr) = gradc(&["train", text(&model), "--epochs", "802032351030850071"]);
    assert_eq!(code, 2, "{stdout}");
    assert!(
        stderr.contains("`epochs` must be a whole number"),
        "{stderr}"
    );
    let (code, _, stderr) = gradc(&["train", text(&model), "--epochs", "4000000000"]);
    assert_eq!(code, 2);
    assert!(stderr.contains("choose fewer epochs"), "{stderr}");
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn a_run_with_every_param_frozen_says_so() {
    let dir = scratch("all-frozen");
    let model = small_model(&dir);
    let (code, _, stderr) = gradc(&["train", text(&model), "--freeze", "w"]);
    assert_eq!(code, 0, "{stderr}");
    assert!(stderr.contains("every param of `m` is frozen"), "{stderr}");
    std::fs::remove_dir_all(&dir).ok();
}

// ---------------------------------------------------------------------
// What a user expects on day one.

#[test]
fn every_train_entry_can_be_overridden_on_the_command_line() {
    let dir = scratch("overrides");
    let model = small_model(&dir);
    let metrics = dir.join("m.csv");
    let (code, stdout, stderr) = gradc(&[
        "train",
        text(&model),
        "--optimizer",
        "sgd(lr = 0.5, momentum = 0.9)",
        "--schedule",
        "step(every = 1, gamma = 0.5)",
        "--clip-grad-norm",
        "1.0",
        "--test",
        "0.25",
        "--epochs",
        "2",
        "--metrics",
        text(&metrics),
    ]);
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains("lr 5.00e-1"), "{stdout}");
    assert!(stdout.contains("lr 2.50e-1"), "{stdout}");
    let (code, _, stderr) = gradc(&["train", text(&model), "--schedule", "cosine(warmup = -1)"]);
    assert_eq!(code, 2);
    assert!(stderr.contains("--schedule"), "{stderr}");
    let (code, _, stderr) = gradc(&["train", text(&model), "--optimizer", "adamm"]);
    assert_eq!(code, 2);
    assert!(stderr.contains("did you mean `adam`"), "{stderr}");
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn the_library_trains_on_the_jit_by_default() {
    let options = gradc::train::run::RunOptions::default();
    assert_eq!((options.backend)().name(), "the JIT");
}

// ---------------------------------------------------------------------
// Divergence and the monitor say what is true.

#[test]
fn both_backends_blame_the_op_the_interpreter_blames() {
    let dir = scratch("blame");
    let model = beside_the_data(
        &dir,
        "div.grad",
        "model m {
    input x: f32[B, 2]
    input y: i32[B]
    param w: f32[2, 3] = xavier_normal
    param d: f32[3] = zeros
    let h = (x @ w) / d
    let z = h * 2 + 1
    loss cross_entropy(z, y)
}
train m { data \"d.csv\" epochs 1 batch 4 }
model big {
    input x: f32[B, 2]
    input y: i32[B]
    param w: f32[2, 1] = ones
    loss mean(x @ w) * 1e30
}
train big { data \"d.csv\" epochs 1 batch 4 }
",
    );
    let mut messages = Vec::new();
    let kept = dir.join("kept.safetensors");
    for backend in ["jit", "interp"] {
        let (code, _, stderr) = gradc(&[
            "train",
            text(&model),
            "--model",
            "m",
            "--backend",
            backend,
            "--save",
            text(&kept),
        ]);
        assert_eq!(code, 1, "{stderr}");
        assert!(
            stderr.contains("came from `div` (Div forward) at line 6:13"),
            "{backend}: {stderr}"
        );
        messages.push(stderr);
        let (code, _, stderr) = gradc(&[
            "train",
            text(&model),
            "--model",
            "big",
            "--backend",
            backend,
            "--save",
            text(&kept),
        ]);
        assert_eq!(code, 1, "{stderr}");
        assert!(
            stderr.contains("the loss is finite (")
                && stderr.contains("e30) but the global gradient norm is inf"),
            "{backend}: {stderr}"
        );
        assert!(
            stderr.contains("computing the monitor statistic `grad_norm.w`"),
            "{backend}: {stderr}"
        );
        messages.push(stderr);
    }
    assert_eq!(messages[0], messages[2], "the same op on both backends");
    assert_eq!(messages[1], messages[3], "the same op on both backends");
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn watch_flags_vanishing_gradients_in_a_deep_sigmoid_mlp() {
    let dir = scratch("deep-sigmoid");
    let mut lines = vec![
        "model deep {".to_string(),
        "    input x: f32[B, 64]".into(),
        "    input y: i32[B]".into(),
        "    param w1: f32[64, 32] = xavier_normal".into(),
        "    param b1: f32[32] = zeros".into(),
    ];
    for i in 2..=8 {
        lines.push(format!("    param w{i}: f32[32, 32] = xavier_normal"));
        lines.push(format!("    param b{i}: f32[32] = zeros"));
    }
    lines.push("    param wo: f32[32, 10] = xavier_normal".into());
    lines.push("    param bo: f32[10] = zeros".into());
    lines.push("    let h1 = sigmoid(x / 16 @ w1 + b1)".into());
    for i in 2..=8 {
        lines.push(format!("    let h{i} = sigmoid(h{} @ w{i} + b{i})", i - 1));
    }
    lines.push("    loss cross_entropy(h8 @ wo + bo, y)".into());
    lines.push("}".into());
    lines.push("train deep { epochs 2 optimizer sgd(lr = 0.01) }".into());
    let model = dir.join("deep.grad");
    std::fs::write(&model, lines.join("\n")).expect("write");
    let (code, stdout, stderr) = gradc(&["train", text(&model), "--watch"]);
    assert_eq!(code, 0, "{stderr}");
    assert!(
        stdout.contains("warning: vanishing gradients in epoch 1: `w1` (line 4)"),
        "{stdout}"
    );
    assert!(stdout.contains("than `wo` (line 20)"), "{stdout}");
    assert!(
        stdout.contains("relu or gelu instead of sigmoid/tanh"),
        "{stdout}"
    );
    // The examples train without a false alarm.
    let (code, stdout, _) = gradc(&["train", "examples/regression.grad"]);
    assert_eq!(code, 0);
    assert!(!stdout.contains("warning"), "{stdout}");
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn log_of_exp_is_stable_in_the_forward_and_the_backward_graph() {
    let dir = scratch("log-exp");
    let model = beside_the_data(
        &dir,
        "logexp.grad",
        "model m {
    input x: f32[B, 2]
    input y: i32[B]
    param w: f32[2, 3] = xavier_normal
    let z = x @ w
    loss mean(log(exp(z * 200))) + cross_entropy(z, y)
}
train m { data \"d.csv\" epochs 1 batch 4 }",
    );
    for backend in ["jit", "interp"] {
        let (code, stdout, stderr) = gradc(&["train", text(&model), "--backend", backend]);
        assert_eq!(code, 0, "{backend}: {stderr}");
        assert!(stdout.contains("epoch   1/1"), "{stdout}");
    }
    let (_, graph, _) = gradc(&["graph", text(&model), "--stage", "backward"]);
    assert!(!graph.contains("= exp "), "{graph}");
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn explain_lists_cut_uses_of_a_param_that_still_gets_a_gradient() {
    let dir = scratch("explain-cuts");
    let model = dir.join("cut.grad");
    std::fs::write(
        &model,
        "model distill {
    input x: f32[B, 4]
    input y: i32[B]
    param u: f32[4, 3] = xavier_normal
    param w: f32[4, 3] = xavier_normal
    let target = stop_gradient(tanh(x @ u))
    let pred = tanh(x @ w + x @ u)
    no_grad {
        let scale = sum(x @ u)
    }
    loss mse(pred, target) * scale + cross_entropy(pred, y)
}",
    )
    .expect("write");
    let (code, stdout, stderr) = gradc(&["explain", text(&model)]);
    assert_eq!(code, 0, "{stderr}");
    let u = stdout.split("  w: ").next().expect("u comes first");
    assert!(u.contains("case 1"), "{stdout}");
    assert!(
        u.contains("gradient cut: a use goes through `stop_gradient` at 6:18"),
        "{stdout}"
    );
    assert!(
        u.contains("gradient cut: a use is inside `no_grad` at 8:5"),
        "{stdout}"
    );
    let w = stdout.split("  w: ").nth(1).expect("w");
    assert!(!w.contains("gradient cut"), "{stdout}");
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn snapshots_survive_an_edit_that_does_not_change_the_graph() {
    let dir = scratch("snapshot-edit");
    let model = dir.join("m.grad");
    let source = std::fs::read_to_string("examples/digits_mlp.grad").expect("example");
    std::fs::write(&model, &source).expect("write");
    std::fs::create_dir_all(dir.join("data")).expect("mkdir");
    let snapshots = dir.join("snaps");
    let (code, _, stderr) = gradc(&["snapshot", text(&model), "--dir", text(&snapshots)]);
    assert_eq!(code, 0, "{stderr}");
    std::fs::write(&model, format!("# a comment above the model\n\n{source}")).expect("write");
    let (code, stdout, stderr) = gradc(&[
        "snapshot",
        text(&model),
        "--dir",
        text(&snapshots),
        "--check",
    ]);
    assert_eq!(code, 0, "{stdout}{stderr}");
    // A change of the graph still shows.
    std::fs::write(&model, source.replace("relu(", "gelu(")).expect("write");
    let (code, stdout, _) = gradc(&[
        "snapshot",
        text(&model),
        "--dir",
        text(&snapshots),
        "--check",
    ]);
    assert_eq!(code, 1);
    assert!(stdout.contains("gelu"), "{stdout}");
    // With --positions, positions are kept (and so a moved line shows).
    let (code, _, _) = gradc(&[
        "snapshot",
        text(&model),
        "--dir",
        text(&dir.join("with")),
        "--positions",
    ]);
    assert_eq!(code, 0);
    let forward = std::fs::read_to_string(dir.join("with").join("digits_mlp.forward.train.txt"))
        .expect("written");
    assert!(forward.contains(" @"), "{forward}");
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn a_model_larger_than_the_memory_is_refused_before_anything_is_allocated() {
    let dir = scratch("memory");
    let model = beside_the_data(
        &dir,
        "huge.grad",
        "model m {
    input x: f32[B, 2]
    input y: i32[B]
    param w: f32[2, 3] = xavier_normal
    buffer a: f32[16000, 16000] = zeros
    buffer b: f32[16000, 16000] = zeros
    loss cross_entropy(x @ w + sum(a) * sum(b), y)
}
train m { data \"d.csv\" epochs 1 batch 4 }",
    );
    let (code, _, stderr) = gradc(&["train", text(&model), "--max-memory", "1G"]);
    assert_eq!(code, 2, "{stderr}");
    assert!(
        stderr.contains("need 3.8 GiB but only 1.0 GiB is available"),
        "{stderr}"
    );
    assert!(!stderr.contains("memory allocation"), "{stderr}");
    let (code, _, stderr) = gradc(&["train", text(&model), "--max-memory", "lots"]);
    assert_eq!(code, 2);
    assert!(stderr.contains("not a size such as 8G"), "{stderr}");
    assert_eq!(gradc::train::parse_bytes("512M"), Ok(512 << 20));
    assert_eq!(gradc::train::parse_bytes("2GiB"), Ok(2 << 30));
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn a_frozen_param_nothing_reads_is_not_fed_to_the_step() {
    let source = "model m {
        input x: f32[B, 2]
        input y: i32[B]
        param w: f32[2, 3] = xavier_normal
        frozen param _big: f32[300, 300] = zeros
        loss cross_entropy(x @ w, y)
    }";
    let compilation =
        gradc::driver::compile_source("m.grad", source, gradc::lower::LowerOptions::default());
    let model = &compilation.models[0];
    let session = gradc::train::Session::new(model, Default::default(), &[]).expect("session");
    let named = |graph: &gradc::ir::Graph| {
        graph
            .ids()
            .into_iter()
            .any(|id| graph.node(id).name.as_deref() == Some("_big"))
    };
    assert!(!named(&session.step_graph), "the step does not read it");
    assert!(!named(&session.eval_graph), "nor does the eval graph");
    assert!(
        session.state().expect("state").contains_key("_big"),
        "the state (and so every checkpoint) keeps it"
    );
}

#[test]
fn plot_draws_the_training_dashboard() {
    let dir = scratch("dashboard");
    let plot = dir.join("d.svg");
    let (code, _, stderr) = gradc(&[
        "train",
        "examples/digits_mlp.grad",
        "--epochs",
        "3",
        "--plot",
        text(&plot),
    ]);
    assert_eq!(code, 0, "{stderr}");
    let svg = std::fs::read_to_string(&plot).expect("written");
    assert!(svg.starts_with("<svg"), "{}", &svg[..100.min(svg.len())]);
    assert!(svg.trim_end().ends_with("</svg>"));
    for caption in [
        "loss",
        "accuracy (%)",
        "learning rate",
        "gradient norm per weight matrix",
        "update / weight per step",
        "dead ReLU units (%)",
        "healthy 1e-3",
    ] {
        assert!(svg.contains(caption), "no `{caption}` in the dashboard");
    }
    let texts: Vec<&str> = svg.lines().map(str::trim).collect();
    for series in ["w1", "w2", "h", "train", "test"] {
        assert!(
            texts.contains(&series),
            "no {series} legend in the dashboard"
        );
    }
    std::fs::remove_dir_all(&dir).ok();
}

#[cfg(unix)]
#[test]
fn an_interrupt_at_an_epoch_boundary_resumes_cleanly_and_a_changed_length_is_said() {
    let dir = scratch("boundary");
    small_model(&dir);
    let model = dir.join("one_step.grad");
    // One batch per epoch: every interrupt lands on an epoch boundary.
    std::fs::write(
        &model,
        "model m { input x: f32[B, 2] input y: i32[B] param w: f32[2, 3] = xavier_normal loss cross_entropy(x @ w, y) }
         train m { data \"d.csv\" epochs 1000000 batch 64 schedule cosine(warmup = 0) optimizer sgd(lr = 0.1) }",
    )
    .expect("write");
    let checkpoint = dir.join("ck.safetensors");
    let (code, _) = interrupted(
        &[
            "train",
            text(&model),
            "--save",
            text(&checkpoint),
            "--backend",
            "interp",
        ],
        "INT",
    );
    assert_eq!(code, Some(1));
    let saved = gradc::tensor_file::read(&checkpoint).expect("a checkpoint");
    let epoch = saved["train.epoch"].data[0] as u64;
    assert_eq!(saved["train.batch"].data[0], 0.0, "saved at the boundary");
    let (code, stdout, stderr) = gradc(&[
        "train",
        text(&model),
        "--resume",
        text(&checkpoint),
        "--epochs",
        &(epoch + 2).to_string(),
    ]);
    assert_eq!(code, 0, "{stderr}");
    assert!(
        !stdout.contains("train loss 0.0000"),
        "no bogus epoch line: {stdout}"
    );
    assert_eq!(
        stdout.lines().filter(|l| l.starts_with("epoch ")).count(),
        2,
        "two epoch lines: {stdout}"
    );
    assert!(
        stderr.contains("was saved by a run of 1000000 epochs")
            && stderr.contains("the cosine schedule follows the run's length"),
        "{stderr}"
    );
    std::fs::remove_dir_all(&dir).ok();
}
