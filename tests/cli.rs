//! End-to-end tests of the `gradc` binary: exit codes (0 valid, 1 errors,
//! 2 usage or I/O), what goes to stdout and stderr, and input that must
//! never crash it.

mod common;

use std::path::Path;

use common::{gradc, stderr, stdout};

#[test]
fn check_accepts_every_example_with_a_summary() {
    for entry in
        std::fs::read_dir(Path::new(env!("CARGO_MANIFEST_DIR")).join("examples")).expect("examples")
    {
        let path = entry.expect("entry").path();
        if path.extension().is_none_or(|e| e != "grad") {
            continue;
        }
        let output = gradc(&["check", path.to_str().expect("utf-8 path")]);
        assert_eq!(
            output.status.code(),
            Some(0),
            "{}: {}",
            path.display(),
            stderr(&output)
        );
        assert!(stdout(&output).starts_with("ok: "), "{}", stdout(&output));
    }
    let output = gradc(&["check", "examples/digits_mlp.grad"]);
    assert_eq!(
        stdout(&output),
        "ok: examples/digits_mlp.grad: 1 model; digits_mlp: 4 params, 9,610 parameters, 15 nodes\n"
    );
}

#[test]
fn check_reports_errors_with_exit_1() {
    let output = gradc(&["check", "tests/ui/matmul_mismatch.grad"]);
    assert_eq!(output.status.code(), Some(1));
    let err = stderr(&output);
    assert!(err.contains("error[E0402]"), "{err}");
    assert!(err.contains("tests/ui/matmul_mismatch.grad:5:16"), "{err}");
    assert!(err.contains("has 1 error"), "{err}");
    assert!(stdout(&output).is_empty());
}

#[test]
fn warnings_do_not_fail_check() {
    let output = gradc(&["check", "tests/ui/unused_value.grad"]);
    assert_eq!(output.status.code(), Some(0));
    assert!(stderr(&output).contains("warning[W0001]"));
}

#[test]
fn usage_and_io_errors_exit_2() {
    assert_eq!(
        gradc(&["check", "no/such/file.grad"]).status.code(),
        Some(2)
    );
    assert!(
        stderr(&gradc(&["check", "no/such/file.grad"])).contains("cannot read no/such/file.grad")
    );
    assert_eq!(gradc(&["check"]).status.code(), Some(2));
    assert_eq!(gradc(&["frobnicate"]).status.code(), Some(2));
    assert_eq!(
        gradc(&["graph", "examples/digits_mlp.grad", "--mode", "test"])
            .status
            .code(),
        Some(2)
    );
    // A directory is an I/O error, not a crash.
    assert_eq!(gradc(&["check", "examples"]).status.code(), Some(2));
    // A model name that is not in the file.
    let output = gradc(&["graph", "examples/digits_mlp.grad", "--model", "nope"]);
    assert_eq!(output.status.code(), Some(2));
    assert!(stderr(&output).contains("no model `nope`"));
}

#[test]
fn help_shows_examples_for_every_command() {
    let output = gradc(&["--help"]);
    assert_eq!(output.status.code(), Some(0));
    assert!(stdout(&output).contains("check"));
    for command in [
        "check",
        "graph",
        "grad",
        "gradcheck",
        "explain",
        "train",
        "eval",
        "snapshot",
    ] {
        let output = gradc(&[command, "--help"]);
        assert_eq!(output.status.code(), Some(0));
        assert!(
            stdout(&output).contains("Examples:"),
            "{command}: {}",
            stdout(&output)
        );
    }
}

#[test]
fn graph_prints_train_and_eval_text() {
    let train = stdout(&gradc(&["graph", "examples/bn_dropout.grad"]));
    let eval = stdout(&gradc(&[
        "graph",
        "examples/bn_dropout.grad",
        "--mode",
        "eval",
    ]));
    assert!(train.starts_with("graph bn_dropout (train)\n"));
    assert!(train.contains(" = dropout ") && train.contains("batch_norm.train"));
    assert!(eval.starts_with("graph bn_dropout (eval)\n"));
    assert!(!eval.contains(" = dropout ") && eval.contains("batch_norm.eval"));
}

#[test]
fn graph_prints_dot_with_roles_marked() {
    let output = gradc(&["graph", "examples/frozen_features.grad", "--format", "dot"]);
    assert_eq!(output.status.code(), Some(0));
    let dot = stdout(&output);
    assert!(dot.starts_with("digraph \"frozen_features (train)\" {"));
    assert!(
        dot.contains("\\nfrozen\""),
        "frozen params are marked: {dot}"
    );
    assert!(dot.contains("shape=doubleoctagon"), "the loss is marked");
    assert!(
        dot.contains("fillcolor=\"#ffd966\""),
        "trainable params are marked"
    );
    assert!(dot.contains("line 13"), "nodes carry their source line");
    assert!(dot.trim_end().ends_with('}'));
}

#[test]
fn graph_of_a_file_with_errors_exits_1() {
    let output = gradc(&["graph", "tests/ui/unknown_name.grad"]);
    assert_eq!(output.status.code(), Some(1));
    assert!(stdout(&output).is_empty());
}

#[test]
fn hostile_files_get_errors_not_crashes() {
    let dir = std::env::temp_dir().join(format!("gradc-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("empty.grad", Vec::new()),
        ("binary.grad", (0..=255u8).cycle().take(4096).collect()),
        (
            "parens.grad",
            format!(
                "model m {{ let y = {}x{} }}",
                "(".repeat(100_000),
                ")".repeat(100_000)
            )
            .into_bytes(),
        ),
        ("terms.grad", {
            let mut s = String::from("model m {\n input x: f32[2]\n output y = x");
            for _ in 0..200_000 {
                s.push_str(" + x");
            }
            s.push_str("\n}\n");
            s.into_bytes()
        }),
        ("braces.grad", "model m {".repeat(50_000).into_bytes()),
        ("unclosed.grad", b"model m { let y = relu(".to_vec()),
    ];
    for (name, bytes) in cases {
        let path = dir.join(name);
        std::fs::write(&path, &bytes).expect("write case");
        let output = gradc(&["check", path.to_str().expect("utf-8 path")]);
        let code = output.status.code();
        assert!(
            matches!(code, Some(0 | 1)),
            "{name}: exit {code:?}\n{}",
            stderr(&output)
        );
        assert!(
            !stderr(&output).contains("panicked"),
            "{name}: {}",
            stderr(&output)
        );
    }
    std::fs::remove_dir_all(&dir).ok();
}
