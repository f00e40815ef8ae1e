//! Data-driven snapshot tests, one `check` helper per boundary:
//!
//! - `ui`: every failing input under `tests/ui/` renders its diagnostics
//!   (plain text, no colour) to a blessed snapshot;
//! - `graphs`: every model in `examples/*.grad` and `tests/data/**/*.grad`
//!   prints its train and eval graphs, forward and joint forward-backward,
//!   in canonical text, each verified; and its gradient ledger.
//!
//! Re-bless with `INSTA_UPDATE=always cargo test` (or `cargo insta review`)
//! and read every changed `.snap` before committing; CI never writes them.

use std::collections::BTreeSet;
use std::path::Path;

use gradc::diagnostic::Code;
use gradc::driver::{Compilation, compile_bytes};
use gradc::ir::{Mode, text, verify};
use gradc::lower::LowerOptions;
use gradc::{autodiff, ledger};

/// Compiles a file under the repository root, naming it by its relative path.
fn compile(path: &Path) -> Compilation {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let relative = path.strip_prefix(root).unwrap_or(path);
    let bytes = std::fs::read(path).expect("test input is readable");
    compile_bytes(
        &relative.display().to_string(),
        &bytes,
        LowerOptions::default(),
    )
}

#[test]
fn ui() {
    insta::glob!("ui/*.grad", |path| {
        let compilation = compile(path);
        assert!(
            !compilation.diagnostics.is_empty(),
            "{} is a failing input but gets no diagnostic",
            path.display()
        );
        insta::assert_snapshot!(compilation.render_diagnostics());
    });
}

#[test]
fn ui_inputs_cover_every_code() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/ui");
    let mut seen = BTreeSet::new();
    for entry in std::fs::read_dir(dir).expect("tests/ui exists") {
        let path = entry.expect("readable entry").path();
        if path.extension().is_some_and(|e| e == "grad") {
            seen.extend(compile(&path).diagnostics.iter().map(|d| d.code));
        }
    }
    let missing: Vec<&Code> = Code::ALL.iter().filter(|c| !seen.contains(c)).collect();
    assert!(missing.is_empty(), "no tests/ui input produces {missing:?}");
}

/// Snapshots of every stage of every model of a file: the forward graphs of
/// both modes, the joint forward and backward graph of both modes, and the
/// gradient ledger.
fn check_graphs(snapshot: &str, path: &Path) {
    let compilation = compile(path);
    assert!(
        !compilation.has_errors(),
        "{}",
        compilation.render_diagnostics()
    );
    let mut out = String::new();
    for model in &compilation.models {
        for mode in [Mode::Train, Mode::Eval] {
            let graph = model.graph(mode);
            if let Err(errors) = verify::verify(graph) {
                panic!("{} ({mode}) fails the verifier: {errors:#?}", model.name);
            }
            out.push_str(&text::to_text(graph));
            out.push('\n');
        }
    }
    insta::assert_snapshot!(snapshot, out);
    let mut backward = String::new();
    let mut explained = String::new();
    for model in &compilation.models {
        for mode in [Mode::Train, Mode::Eval] {
            let joint =
                autodiff::differentiate(model.graph(mode)).expect("every model differentiates");
            if let Err(errors) = verify::verify(&joint) {
                panic!(
                    "{} ({mode}) backward graph fails the verifier: {errors:#?}",
                    model.name
                );
            }
            backward.push_str(&text::to_text(&joint));
            backward.push('\n');
        }
        let ledger = ledger::ledger(model.graph(Mode::Train), 32).expect("ledger");
        explained.push_str(&ledger::render(&ledger));
    }
    insta::assert_snapshot!(format!("{snapshot}_backward"), backward);
    insta::assert_snapshot!(format!("{snapshot}_explain"), explained);
}

#[test]
fn example_graphs() {
    insta::glob!("../examples", "*.grad", |path| check_graphs(
        "example", path
    ));
}

#[test]
fn test_data_graphs() {
    insta::glob!("data/**/*.grad", |path| check_graphs("test_data", path));
}
