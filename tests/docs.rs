//! The documentation stays true: every model example in
//! `docs/language.md` compiles, `docs/diagnostics.md` lists every
//! diagnostic code, and every source file opens with a `//!` doc line.

use std::path::Path;

use gradc::diagnostic::Code;
use gradc::driver::compile_source;
use gradc::lower::LowerOptions;

fn read(relative: &str) -> String {
    std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join(relative))
        .expect("doc exists")
}

/// Every `.rs` file below the crate's folders `dirs`, with its text.
fn rust_files(dirs: &[&str]) -> Vec<(std::path::PathBuf, String)> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut stack: Vec<_> = dirs.iter().map(|d| root.join(d)).collect();
    let mut files = Vec::new();
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).expect("readable dir") {
            let path = entry.expect("entry").path();
            if path.is_dir() {
                stack.push(path);
            } else if path.extension().is_some_and(|e| e == "rs") {
                let text = std::fs::read_to_string(&path).expect("readable file");
                files.push((path, text));
            }
        }
    }
    files
}

/// The unlabelled fenced code blocks of a Markdown text.
fn code_blocks(markdown: &str) -> Vec<String> {
    let mut blocks = Vec::new();
    let mut current: Option<String> = None;
    for line in markdown.lines() {
        match (&mut current, line.trim_start().starts_with("```")) {
            (None, true) if line.trim() == "```" => current = Some(String::new()),
            (None, true) => current = Some("\u{0}skip".to_string()),
            (Some(block), true) => {
                if !block.starts_with('\u{0}') {
                    blocks.push(block.clone());
                }
                current = None;
            }
            (Some(block), false) => {
                block.push_str(line);
                block.push('\n');
            }
            (None, false) => {}
        }
    }
    blocks
}

#[test]
fn language_reference_examples_compile() {
    let mut checked = 0;
    for block in code_blocks(&read("docs/language.md")) {
        if !block.contains("model ") || block.contains("file      =") {
            continue;
        }
        let compilation = compile_source("docs/language.md", &block, LowerOptions::default());
        assert!(
            !compilation.has_errors(),
            "{block}\n{}",
            compilation.render_diagnostics()
        );
        checked += 1;
    }
    assert!(checked >= 6, "only {checked} examples found");
}

#[test]
fn diagnostics_reference_lists_every_code() {
    let doc = read("docs/diagnostics.md");
    for code in Code::ALL {
        assert!(
            doc.contains(&format!("## {}", code.as_str())),
            "docs/diagnostics.md has no section for {code}"
        );
    }
}

#[test]
fn every_source_file_starts_with_a_module_doc() {
    for (path, text) in rust_files(&["src", "tests", "benches"]) {
        assert!(
            text.starts_with("//!"),
            "{} does not start with `//!`",
            path.display()
        );
    }
}

/// `unsafe` lives in one folder: `src/jit/native/` allows it (the crate
/// denies it, `Cargo.toml`), and no other source file does.
#[test]
fn only_the_native_folder_allows_unsafe_code() {
    let manifest = read("Cargo.toml");
    assert!(manifest.contains("unsafe_code = \"deny\""));
    let native = Path::new(env!("CARGO_MANIFEST_DIR")).join("src/jit/native");
    let allowing: Vec<_> = rust_files(&["src"])
        .into_iter()
        .filter(|(_, text)| text.contains("unsafe_code"))
        .map(|(path, _)| path)
        .collect();
    assert!(
        !allowing.is_empty(),
        "the native folder allows `unsafe_code`"
    );
    for path in &allowing {
        assert!(
            path.starts_with(&native),
            "{} mentions `unsafe_code`: only `src/jit/native/` may allow it",
            path.display()
        );
    }
}

/// No function of the JIT is longer than 150 lines (from its `fn` line
/// to the closing brace at its indentation): each does one step of one
/// job (`docs/architecture.md`).
#[test]
fn jit_functions_stay_short() {
    let mut long = Vec::new();
    for (path, text) in rust_files(&["src/jit"]) {
        let lines: Vec<&str> = text.lines().collect();
        for (i, line) in lines.iter().enumerate() {
            let code = line.trim_start();
            let indent = &line[..line.len() - code.len()];
            let is_fn = [
                "fn ",
                "pub fn ",
                "pub(super) fn ",
                "pub(crate) fn ",
                "unsafe fn ",
                "pub(in crate::jit) fn ",
            ]
            .iter()
            .any(|start| code.starts_with(start));
            if !is_fn || code.ends_with(';') {
                continue;
            }
            let end = format!("{indent}}}");
            if let Some(length) = lines[i..].iter().position(|l| *l == end)
                && length + 1 > 150
            {
                long.push(format!(
                    "{}:{} ({} lines)",
                    path.display(),
                    i + 1,
                    length + 1
                ));
            }
        }
    }
    assert!(long.is_empty(), "functions over 150 lines: {long:?}");
}

/// The `grad_fn` names of the rule table, `"...Backward"` literals in
/// `src/autodiff/rules.rs`.
fn rule_table_names() -> std::collections::BTreeSet<String> {
    let source = read("src/autodiff/rules.rs");
    source
        .split('"')
        .skip(1)
        .step_by(2)
        .filter(|s| s.ends_with("Backward") && s.chars().all(char::is_alphanumeric))
        .map(str::to_string)
        .collect()
}

#[test]
fn autodiff_doc_lists_every_rule() {
    let doc = read("docs/autodiff.md");
    let names = rule_table_names();
    assert!(names.len() > 40, "found only {names:?}");
    let missing: Vec<&String> = names
        .iter()
        .filter(|name| *name != "NoBackward" && !doc.contains(name.as_str()))
        .collect();
    assert!(
        missing.is_empty(),
        "docs/autodiff.md's rule table lacks {missing:?}"
    );
    // And the table names no rule that does not exist.
    let table = doc
        .lines()
        .filter(|line| line.starts_with("| `"))
        .flat_map(|line| line.split('|').nth(2).unwrap_or("").split(','))
        .map(|name| name.trim().trim_matches(|c| c == '(' || c == ')'))
        .filter(|name| name.ends_with("Backward"));
    for name in table {
        assert!(
            names.contains(name),
            "docs/autodiff.md names `{name}`, no rule has it"
        );
    }
}
