//! Training: every optimizer, clipping and schedule against values
//! computed by hand from PyTorch's formulas; resuming a run bit for bit;
//! frozen params unchanged; bad data files; the monitor; and short runs
//! end to end through the CLI.

use std::collections::BTreeMap;
mod common;

use common::{npy, run as gradc, scratch};

use gradc::driver::compile_source;
use gradc::interp::Tensor;
use gradc::ir::DType;
use gradc::lower::LowerOptions;
use gradc::train::run::{self, RunOptions};
use gradc::train::{Interpreter, Session, checkpoint, data};

fn session(train_block: &str) -> Session {
    let source = format!(
        "model m {{
            input c: f64[2]
            param p: f64[2] = ones
            loss sum(p * c)
        }}
        train m {{ {train_block} }}"
    );
    let compilation = compile_source("m.grad", &source, LowerOptions::default());
    assert!(
        !compilation.has_errors(),
        "{}",
        compilation.render_diagnostics()
    );
    let model = &compilation.models[0];
    Session::new(model, model.train_config.clone().expect("train block"), &[]).expect("session")
}

/// Runs steps with the gradient `c` (the loss is `sum(p * c)`), returning p.
fn steps(session: &mut Session, grads: &[[f64; 2]]) -> Vec<f64> {
    for g in grads {
        let batch = vec![(
            "c".to_string(),
            Tensor::new(DType::F64, vec![2], g.to_vec()),
        )];
        session.step(&mut Interpreter, batch).expect("step");
    }
    session.state().expect("synced")["p"].data.clone()
}

fn close(actual: &[f64], expected: &[f64]) {
    for (a, e) in actual.iter().zip(expected) {
        assert!((a - e).abs() < 1e-12, "{actual:?} vs {expected:?}");
    }
}

#[test]
fn sgd_plain_momentum_nesterov_and_weight_decay() {
    let c = [0.5, -2.0];
    let mut s = session("optimizer sgd(lr = 0.1)");
    close(&steps(&mut s, &[c]), &[1.0 - 0.05, 1.0 + 0.2]);
    // Momentum: buf1 = g, p1 = p0 - lr g; buf2 = 0.9 g + g.
    let mut s = session("optimizer sgd(lr = 0.1, momentum = 0.9)");
    let p = steps(&mut s, &[c, c]);
    close(
        &p,
        &[
            1.0 - 0.1 * 0.5 - 0.1 * 1.9 * 0.5,
            1.0 + 0.1 * 2.0 + 0.1 * 1.9 * 2.0,
        ],
    );
    // Nesterov: the step uses g + momentum buf = 1.9 g on the first step.
    let mut s = session("optimizer sgd(lr = 0.1, momentum = 0.9, nesterov = true)");
    close(
        &steps(&mut s, &[c]),
        &[1.0 - 0.1 * 1.9 * 0.5, 1.0 + 0.1 * 1.9 * 2.0],
    );
    // Weight decay adds wd p to the gradient.
    let mut s = session("optimizer sgd(lr = 0.1, weight_decay = 0.5)");
    close(
        &steps(&mut s, &[c]),
        &[1.0 - 0.1 * (0.5 + 0.5), 1.0 - 0.1 * (-2.0 + 0.5)],
    );
}

/// One Adam step from zero moments, in PyTorch's order of operations.
fn adam_step(p: f64, g: f64, t: i32, m: &mut f64, v: &mut f64, lr: f64) -> f64 {
    let (b1, b2, eps) = (0.9f64, 0.999f64, 1e-8);
    *m = b1 * *m + (1.0 - b1) * g;
    *v = b2 * *v + (1.0 - b2) * g * g;
    let c1 = 1.0 - b1.powi(t);
    let c2 = 1.0 - b2.powi(t);
    p - (lr / c1) * *m / ((*v).sqrt() / c2.sqrt() + eps)
}

#[test]
fn adam_and_adamw_match_pytorch_formulas() {
    let grads = [[0.5, -2.0], [0.25, 1.0], [-1.0, 0.125]];
    let mut s = session("optimizer adam(lr = 0.01)");
    let got = steps(&mut s, &grads);
    let mut expected = vec![];
    for k in 0..2 {
        let (mut p, mut m, mut v) = (1.0, 0.0, 0.0);
        for (t, g) in grads.iter().enumerate() {
            p = adam_step(p, g[k], t as i32 + 1, &mut m, &mut v, 0.01);
        }
        expected.push(p);
    }
    close(&got, &expected);
    // Adam's L2 decay adds wd p to the gradient; AdamW scales p by 1 - lr wd.
    let mut s = session("optimizer adam(lr = 0.01, weight_decay = 0.1)");
    let got = steps(&mut s, &grads[..1]);
    let (mut m, mut v) = (0.0, 0.0);
    close(
        &got[..1],
        &[adam_step(1.0, 0.5 + 0.1, 1, &mut m, &mut v, 0.01)],
    );
    let mut s = session("optimizer adamw(lr = 0.01, weight_decay = 0.1)");
    let got = steps(&mut s, &grads[..1]);
    let (mut m, mut v) = (0.0, 0.0);
    close(
        &got[..1],
        &[adam_step(
            1.0 * (1.0 - 0.01 * 0.1),
            0.5,
            1,
            &mut m,
            &mut v,
            0.01,
        )],
    );
    assert_eq!(
        s.state().expect("synced")["adam.m.p"].data.len(),
        2,
        "optimizer state is kept by name"
    );
}

#[test]
fn gradient_clipping_by_global_norm_and_by_value() {
    // |g| = 5: clipped to norm 1 gives g / (5 + 1e-6).
    let mut s = session("optimizer sgd(lr = 1.0) clip_grad_norm 1.0");
    let scale = 1.0 / (5.0 + 1e-6);
    close(
        &steps(&mut s, &[[3.0, 4.0]]),
        &[1.0 - 3.0 * scale, 1.0 - 4.0 * scale],
    );
    let mut s = session("optimizer sgd(lr = 1.0) clip_grad_value 0.5");
    close(&steps(&mut s, &[[3.0, -0.25]]), &[0.5, 1.25]);
    // A norm below the limit is left alone.
    let mut s = session("optimizer sgd(lr = 1.0) clip_grad_norm 10.0");
    close(&steps(&mut s, &[[3.0, 4.0]]), &[-2.0, -3.0]);
}

#[test]
fn schedules() {
    let mut s = session("optimizer sgd(lr = 0.1) schedule step(every = 2, gamma = 0.5) epochs 6");
    s.steps_per_epoch = 10;
    let lr: Vec<f64> = [1, 10, 11, 20, 21, 41]
        .iter()
        .map(|&t| s.learning_rate(t))
        .collect();
    close(&lr, &[0.1, 0.1, 0.1, 0.1, 0.05, 0.025]);
    let mut s = session("optimizer sgd(lr = 0.1) schedule linear_warmup(steps = 4)");
    s.steps_per_epoch = 10;
    close(
        &[
            s.learning_rate(1),
            s.learning_rate(2),
            s.learning_rate(4),
            s.learning_rate(9),
        ],
        &[0.025, 0.05, 0.1, 0.1],
    );
    let mut s = session("optimizer sgd(lr = 0.1) schedule cosine(warmup = 10) epochs 2");
    s.steps_per_epoch = 55;
    // Total 110 steps: warm-up to step 10, then half a cosine down to 0.
    close(
        &[
            s.learning_rate(5),
            s.learning_rate(10),
            s.learning_rate(60),
            s.learning_rate(110),
        ],
        &[0.05, 0.1, 0.05, 0.0],
    );
    let s = session("optimizer sgd(lr = 0.1)");
    close(&[s.learning_rate(1), s.learning_rate(1000)], &[0.1, 0.1]);
}

fn digits_session(epochs: u64) -> (Session, data::Dataset, data::Split) {
    let compilation = common::example("digits_mlp.grad");
    let model = &compilation.models[0];
    let mut config = model.train_config.clone().expect("train block");
    config.epochs = epochs;
    config.data = None;
    let mut session = Session::new(model, config, &[]).expect("session");
    let dataset = data::load(&data::Source::EmbeddedDigits, &session.forward).expect("digits");
    let split = data::split(dataset.rows, 0.2, session.config.seed);
    session.steps_per_epoch = split.train.len().div_ceil(64) as u64;
    (session, dataset, split)
}

/// Runs `count` steps from wherever the session is, as `gradc train` does.
fn advance(session: &mut Session, dataset: &data::Dataset, split: &data::Split, count: usize) {
    for _ in 0..count {
        let order = data::epoch_order(&split.train, session.config.seed, session.epoch);
        let batches: Vec<&[usize]> = order.chunks(64).collect();
        let batch = data::batch(dataset, batches[session.batch_index], &session.forward);
        session.step(&mut Interpreter, batch).expect("step");
        session.batch_index += 1;
        if session.batch_index == batches.len() {
            session.batch_index = 0;
            session.epoch += 1;
        }
    }
}

#[test]
fn an_interrupted_and_resumed_run_ends_bit_identical() {
    let (mut whole, dataset, split) = digits_session(2);
    advance(&mut whole, &dataset, &split, 30);
    let (mut first, _, _) = digits_session(2);
    advance(&mut first, &dataset, &split, 17);
    let path =
        std::env::temp_dir().join(format!("gradc-resume-{}.safetensors", std::process::id()));
    checkpoint::save(&first, &path).expect("save");
    let (mut resumed, _, _) = digits_session(2);
    checkpoint::resume(&mut resumed, &path).expect("resume");
    assert_eq!(
        (resumed.epoch, resumed.batch_index, resumed.steps_done),
        (0, 17, 17)
    );
    advance(&mut resumed, &dataset, &split, 13);
    std::fs::remove_file(&path).ok();
    assert_eq!(whole.steps_done, resumed.steps_done);
    for (name, tensor) in whole.state().expect("synced") {
        assert_eq!(
            tensor.data,
            resumed.state().expect("synced")[name].data,
            "{name} differs after resume"
        );
    }
}

#[test]
fn frozen_params_stay_bit_identical_and_freeze_flag_works() {
    let compilation = common::example("frozen_features.grad");
    let model = &compilation.models[0];
    let mut config = model.train_config.clone().expect("train block");
    config.epochs = 1;
    config.data = None;
    let options = RunOptions::default();
    let before = Session::new(model, config.clone(), &["w2".to_string()])
        .expect("session")
        .state()
        .expect("synced")
        .clone();
    let (after, _) = run::train(
        model,
        config,
        &RunOptions {
            freeze: vec!["w2".into()],
            ..options
        },
    )
    .expect("trains");
    let after = after.state().expect("synced");
    for name in ["w1", "b1", "w2"] {
        assert_eq!(before[name], after[name], "frozen `{name}` changed");
    }
    assert_ne!(
        before["b2"], after["b2"],
        "the trainable bias did not train"
    );
    assert!(
        !after.contains_key("sgd.momentum.w1"),
        "no optimizer state for frozen params"
    );
}

#[test]
fn bad_data_files_name_file_line_and_column_and_nothing_starts() {
    let dir = scratch("bad-data");
    let model = dir.join("m.grad");
    std::fs::write(
        &model,
        "model m { input x: f32[B, 2] input y: i32[B] param w: f32[2, 3] = zeros loss cross_entropy(x @ w, y) }
         train m { data \"d.csv\" epochs 1 }",
    )
    .expect("write");
    let cases = [
        (
            "1,2,0\n3,4\n",
            "d.csv:2: ragged row: 2 columns where the rows above have 3",
        ),
        (
            "a,b,label\n1,2,0\n1,oops,1\n",
            "d.csv:3:2: `oops` is not a number",
        ),
        (
            "1,2,0\n1,nan,1\n",
            "d.csv:2:2: `nan` is not a finite number",
        ),
        (
            "1,2,0\n1,2,3\n",
            "d.csv:2: label 3 of `y` is not a class in 0..3",
        ),
        (
            "1,2,0\n1,2,1.5\n",
            "d.csv:2: label 1.5 of `y` is not a class in 0..3",
        ),
        // The file line, not the data row: the header is line 1.
        (
            "a,b,label\n1,2,0\n1,2,3\n",
            "d.csv:3: label 3 of `y` is not a class in 0..3",
        ),
        // A byte-order mark before a headerless file: the first row is data.
        (
            "\u{feff}1,2,7\n1,2,0\n",
            "d.csv:1: label 7 of `y` is not a class in 0..3",
        ),
        (
            "1,2,5,0\n",
            "3 values per row for input `x`, but it is f32[B, 2] and wants 2",
        ),
        ("", "d.csv: the file has no rows"),
    ];
    for (text, message) in cases {
        std::fs::write(dir.join("d.csv"), text).expect("write");
        let (code, stdout, stderr) = gradc(&["train", model.to_str().expect("utf-8")]);
        assert_eq!(code, 1, "{text:?}: {stderr}");
        assert!(
            stderr.contains(message),
            "{text:?}: expected `{message}` in {stderr}"
        );
        assert!(
            !stdout.contains("epoch"),
            "training started on bad data: {stdout}"
        );
    }
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn train_eval_metrics_plot_and_checkpoint_end_to_end() {
    let dir = scratch("e2e");
    let save = dir.join("r.safetensors");
    let metrics = dir.join("r.csv");
    let plot = dir.join("r.svg");
    let (code, stdout, stderr) = gradc(&[
        "train",
        "examples/regression.grad",
        "--epochs",
        "3",
        "--save",
        save.to_str().expect("utf-8"),
        "--metrics",
        metrics.to_str().expect("utf-8"),
        "--plot",
        plot.to_str().expect("utf-8"),
        "--watch",
    ]);
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains("epoch   3/3  train loss"), "{stdout}");
    assert!(
        stdout.contains("grad norm   update/weight"),
        "--watch prints the table: {stdout}"
    );
    let csv = std::fs::read_to_string(&metrics).expect("metrics");
    assert_eq!(csv.lines().count(), 4, "{csv}");
    assert!(csv.starts_with(
        "epoch,train_loss,train_accuracy,test_loss,test_accuracy,lr,grad_norm,seconds\n"
    ));
    assert!(
        std::fs::read_to_string(&plot)
            .expect("plot")
            .starts_with("<svg")
    );
    let tensors = gradc::tensor_file::read(&save).expect("checkpoint");
    for name in [
        "w1",
        "b1",
        "w2",
        "b2",
        "sgd.momentum.w1",
        "train.step",
        "train.epoch",
    ] {
        assert!(tensors.contains_key(name), "checkpoint lacks {name}");
    }
    let (code, stdout, stderr) = gradc(&[
        "eval",
        "examples/regression.grad",
        "--checkpoint",
        save.to_str().expect("utf-8"),
    ]);
    assert_eq!(code, 0, "{stderr}");
    assert!(
        stdout.starts_with("regression: 102 rows, loss "),
        "{stdout}"
    );
    // The JIT (the default) and the interpreter report the same loss.
    let (code, reference, stderr) = gradc(&[
        "eval",
        "examples/regression.grad",
        "--checkpoint",
        save.to_str().expect("utf-8"),
        "--backend",
        "interp",
    ]);
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(stdout, reference);
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn divergence_stops_at_the_first_non_finite_value_and_names_the_op() {
    let dir = scratch("nan");
    let save = dir.join("last.safetensors");
    let (code, stdout, stderr) = gradc(&[
        "train",
        "examples/regression.grad",
        "--lr",
        "1e12",
        "--save",
        save.to_str().expect("utf-8"),
    ]);
    assert_eq!(code, 1, "{stdout}\n{stderr}");
    assert!(stderr.contains("the first non-finite value"), "{stderr}");
    assert!(stderr.contains("at line"), "{stderr}");
    assert!(stderr.contains("kept the last good state"), "{stderr}");
    let state = gradc::tensor_file::read(&save).expect("last good checkpoint");
    assert!(state["w1"].data.iter().all(|v| v.is_finite()));
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn the_monitor_reports_dead_relus_and_vanishing_gradients() {
    let dir = scratch("dead");
    let model = dir.join("dead.grad");
    std::fs::write(
        &model,
        "model dead {
            input x: f32[B, 64]
            input y: i32[B]
            param w1: f32[64, 32] = xavier_uniform
            param b1: f32[32] = constant(-1000)
            param w2: f32[32, 10] = xavier_uniform
            param b2: f32[10] = zeros
            let h = relu(x / 16 @ w1 + b1)
            loss cross_entropy(h @ w2 + b2, y)
        }
        train dead { epochs 1 optimizer sgd(lr = 0.1) }",
    )
    .expect("write");
    let (code, stdout, stderr) = gradc(&["train", model.to_str().expect("utf-8")]);
    assert_eq!(code, 0, "{stderr}");
    assert!(
        stdout.contains("every unit of ReLU `h` (line 8) was dead"),
        "{stdout}"
    );
    assert!(
        stdout.contains("gradients of `w1` (line 4) are vanishing"),
        "{stdout}"
    );
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn npy_and_safetensors_data() {
    let dir = scratch("formats");
    let rows = 40;
    let x: Vec<u8> = (0..rows * 4)
        .flat_map(|i| ((i % 7) as f32 / 7.0).to_le_bytes())
        .collect();
    let y: Vec<u8> = (0..rows)
        .flat_map(|i| ((i % 3) as i64).to_le_bytes())
        .collect();
    std::fs::write(dir.join("x.npy"), npy(&[rows, 4], "<f4", x)).expect("write");
    std::fs::write(dir.join("y.npy"), npy(&[rows], "<i8", y)).expect("write");
    let model = dir.join("m.grad");
    std::fs::write(
        &model,
        "model m { input x: f32[B, 4] input y: i32[B] param w: f32[4, 3] = zeros loss cross_entropy(x @ w, y) }
         train m { data \"x.npy\" labels = \"y.npy\" epochs 2 batch 8 }",
    )
    .expect("write");
    let (code, stdout, stderr) = gradc(&["train", model.to_str().expect("utf-8")]);
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains("epoch   2/2"), "{stdout}");
    let tensors: BTreeMap<String, Tensor> = [
        (
            "x".to_string(),
            Tensor::new(
                DType::F32,
                vec![rows, 4],
                (0..rows * 4).map(|i| (i % 5) as f64).collect(),
            ),
        ),
        (
            "y".to_string(),
            Tensor::new(
                DType::I32,
                vec![rows],
                (0..rows).map(|i| (i % 3) as f64).collect(),
            ),
        ),
    ]
    .into();
    gradc::tensor_file::write(&dir.join("d.safetensors"), &tensors).expect("write");
    let (code, stdout, stderr) = gradc(&[
        "train",
        model.to_str().expect("utf-8"),
        "--data",
        dir.join("d.safetensors").to_str().expect("utf-8"),
    ]);
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains("epoch   2/2"), "{stdout}");
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn fine_tuning_from_a_pretrained_checkpoint() {
    let dir = scratch("finetune");
    let pretrained = dir.join("digits.safetensors");
    let (code, _, stderr) = gradc(&[
        "train",
        "examples/digits_mlp.grad",
        "--epochs",
        "1",
        "--save",
        pretrained.to_str().expect("utf-8"),
    ]);
    assert_eq!(code, 0, "{stderr}");
    let (code, stdout, stderr) = gradc(&[
        "train",
        "examples/frozen_features.grad",
        "--init",
        pretrained.to_str().expect("utf-8"),
        "--epochs",
        "1",
        "--lr",
        "0.01",
    ]);
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains("loaded b1, b2, w1, w2 from"), "{stdout}");
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn ctrl_c_saves_a_checkpoint_that_resumes() {
    use std::io::{BufRead, BufReader};
    let dir = scratch("interrupt");
    let save = dir.join("i.safetensors");
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_gradc"))
        .args([
            "train",
            "examples/digits_mlp.grad",
            "--epochs",
            "1000",
            "--save",
            save.to_str().expect("utf-8"),
        ])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("gradc starts");
    let mut lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
    let first = lines.next().expect("an epoch line").expect("text");
    assert!(first.starts_with("epoch   1/1000"), "{first}");
    let status = std::process::Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .expect("kill runs");
    assert!(status.success());
    let rest: Vec<String> = lines.map_while(Result::ok).collect();
    let exit = child.wait().expect("gradc exits");
    assert_eq!(exit.code(), Some(1), "{rest:?}");
    let last = rest.last().expect("a closing line");
    assert!(last.starts_with("interrupted at epoch"), "{last}");
    let (code, out, err) = gradc(&[
        "train",
        "examples/digits_mlp.grad",
        "--epochs",
        "1",
        "--resume",
        save.to_str().expect("utf-8"),
    ]);
    assert_eq!(code, 0, "{err}");
    assert!(out.starts_with("resuming at epoch"), "{out}");
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn a_model_too_large_to_run_is_an_error_not_an_abort() {
    let dir = scratch("huge");
    let model = dir.join("huge.grad");
    std::fs::write(
        &model,
        "model huge { input x: f32[B, 100000] input y: i32[B] param w: f32[100000, 100000] = zeros loss cross_entropy(x @ w, y) }",
    )
    .expect("write");
    for command in ["train", "gradcheck"] {
        let (code, _, err) = gradc(&[command, model.to_str().expect("utf-8")]);
        assert_eq!(code, 2, "{command}: {err}");
        assert!(
            err.contains("has more than 268435456 elements"),
            "{command}: {err}"
        );
    }
    std::fs::remove_dir_all(&dir).ok();
}

/// A model whose every statement is broken still lowers (with errors) to a
/// graph with no nodes; building its step graph is an error, not a panic
/// (found by the `backends` fuzzer).
#[test]
fn the_step_graph_of_an_empty_model_is_an_error() {
    let source = "model m {\n    loss cross_e-\n}\ntrain m { optimizer sgd(lr = 0.1) }\n";
    let compilation =
        gradc::driver::compile_source("m.grad", source, gradc::lower::LowerOptions::default());
    assert!(compilation.has_errors());
    let model = compilation.models.first().expect("a model, with errors");
    assert!(model.train.ids().is_empty(), "{:?}", model.train.ids());
    let config = model.train_config.clone().expect("the train block");
    assert!(gradc::step::build(&model.train, &config).is_err());
}

#[test]
fn a_batch_that_names_an_input_twice_is_an_error_and_changes_nothing() {
    // The second tensor would displace the first, which would then be
    // put back into the state as if it were a param.
    let mut s = session("optimizer sgd(lr = 0.1)");
    let c = |v: f64| Tensor::new(DType::F64, vec![2], vec![v; 2]);
    let before = s.state().expect("synced").clone();
    let error = s
        .step(
            &mut Interpreter,
            vec![("c".to_string(), c(1.0)), ("c".to_string(), c(2.0))],
        )
        .expect_err("a repeated name");
    assert!(error.to_string().contains("`c` twice"), "{error}");
    assert_eq!(s.state().expect("synced"), &before);
    assert_eq!(s.steps_done, 0);
}
