//! Every stage of the pipeline as canonical text, for review: the strings
//! `gradc snapshot` writes and checks (one file per model and stage), and
//! that insta users can snapshot from Rust.
//!
//! Stages: `forward` and `backward` (train and eval mode), `step` (the
//! training step), `optimized` (the step graph, or the eval graph, after
//! the passes of `passes`) and `kernels` (the fusion and memory plan).
//!
//! By default the text leaves out source positions (`@12:18`, `(inlined at
//! 25:18)`), so that an edit that does not change the graph (a comment
//! line above a model) changes no snapshot: a snapshot diff means the graph
//! changed. `gradc snapshot --positions` keeps them.

use std::path::{Path, PathBuf};

use crate::autodiff::{self, AutodiffError};
use crate::ir::{Graph, Mode, text};
use crate::lower::LoweredModel;
use crate::passes::{self, fusion, memory};
use crate::step;

/// The graph a stage prints: the forward graph, the joint graph, the step
/// graph, or the optimized step (train) or eval graph.
pub(crate) fn stage_graph(
    model: &LoweredModel,
    stage: &str,
    mode: Mode,
) -> Result<Graph, AutodiffError> {
    let forward = model.graph(mode);
    Ok(match stage {
        "forward" => forward.clone(),
        "backward" => autodiff::differentiate(forward)?,
        "step" => step::build(
            &model.train,
            &model.train_config.clone().unwrap_or_default(),
        )?,
        _ => {
            let mut graph = match (mode, model.train.loss()) {
                (Mode::Train, Some(_)) => step::build(
                    &model.train,
                    &model.train_config.clone().unwrap_or_default(),
                )?,
                _ => forward.clone(),
            };
            passes::optimize(&mut graph, |_, _| {});
            graph
        }
    })
}

/// The kernel plan of a model in a mode, rendered.
pub fn kernels(model: &LoweredModel, mode: Mode) -> Result<String, AutodiffError> {
    let graph = stage_graph(model, "optimized", mode)?;
    let plan = fusion::plan(&graph);
    let batch = model.train_config.as_ref().map_or(32, |c| c.batch);
    let memory = memory::plan(&graph, &plan, batch);
    Ok(fusion::render(&graph, &plan) + &memory::render(&memory))
}

/// `text` without source positions: every ` @LINE:COL` and ` (inlined at
/// LINE:COL)`.
pub(crate) fn strip_positions(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for line in text.lines() {
        let mut kept = String::with_capacity(line.len());
        let mut rest = line;
        while let Some(c) = rest.chars().next() {
            let skip = if let Some(tail) = rest.strip_prefix(" (inlined at ") {
                position_len(tail)
                    .filter(|&n| tail[n..].starts_with(')'))
                    .map(|n| " (inlined at ".len() + n + 1)
            } else if let Some(tail) = rest.strip_prefix(" @") {
                position_len(tail).map(|n| 2 + n)
            } else {
                None
            };
            match skip {
                Some(n) => rest = &rest[n..],
                None => {
                    kept.push(c);
                    rest = &rest[c.len_utf8()..];
                }
            }
        }
        out.push_str(kept.trim_end());
        out.push('\n');
    }
    out
}

/// The length of a `LINE:COL` at the start of `text`, if there is one.
fn position_len(text: &str) -> Option<usize> {
    let digits = |s: &str| s.bytes().take_while(u8::is_ascii_digit).count();
    let line = digits(text);
    if line == 0 || !text[line..].starts_with(':') {
        return None;
    }
    let col = digits(&text[line + 1..]);
    (col > 0).then_some(line + 1 + col)
}

/// Every stage of a model: (file name, text), with source positions or
/// without ([`strip_positions`]).
pub(crate) fn stages(
    model: &LoweredModel,
    positions: bool,
) -> Result<Vec<(String, String)>, AutodiffError> {
    let mut out = stages_with_positions(model)?;
    if !positions {
        for (_, text) in &mut out {
            *text = strip_positions(text);
        }
    }
    Ok(out)
}

fn stages_with_positions(model: &LoweredModel) -> Result<Vec<(String, String)>, AutodiffError> {
    let mut out = Vec::new();
    let has_loss = model.train.loss().is_some();
    for mode in [Mode::Train, Mode::Eval] {
        out.push((
            format!("{}.forward.{mode}.txt", model.name),
            text::to_text(model.graph(mode)),
        ));
        if has_loss {
            let backward = stage_graph(model, "backward", mode)?;
            out.push((
                format!("{}.backward.{mode}.txt", model.name),
                text::to_text(&backward),
            ));
        }
    }
    if has_loss {
        out.push((
            format!("{}.step.train.txt", model.name),
            text::to_text(&stage_graph(model, "step", Mode::Train)?),
        ));
    }
    for mode in [Mode::Train, Mode::Eval] {
        let optimized = stage_graph(model, "optimized", mode)?;
        out.push((
            format!("{}.optimized.{mode}.txt", model.name),
            text::to_text(&optimized),
        ));
        out.push((
            format!("{}.kernels.{mode}.txt", model.name),
            kernels(model, mode)?,
        ));
    }
    Ok(out)
}

/// One file's comparison.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Check {
    /// Unchanged.
    Same,
    /// No file yet.
    Missing(PathBuf),
    /// Changed: the unified diff.
    Changed(PathBuf, String),
}

/// Compares a stage's text with the file in `dir`.
pub fn check(dir: &Path, name: &str, text: &str) -> Check {
    let path = dir.join(name);
    match std::fs::read_to_string(&path) {
        Err(_) => Check::Missing(path),
        Ok(old) if old == text => Check::Same,
        Ok(old) => {
            let diff = unified_diff(&old, text, &path.display().to_string());
            Check::Changed(path, diff)
        }
    }
}

/// A unified diff of two texts (whole-file context of 3 lines), computed
/// with a longest-common-subsequence table; inputs are graph dumps of at
/// most a few thousand lines.
pub(crate) fn unified_diff(old: &str, new: &str, name: &str) -> String {
    unified_diff_labelled(
        old,
        new,
        &format!("{name} (saved)"),
        &format!("{name} (now)"),
    )
}

/// [`unified_diff`] with the two sides named.
pub(crate) fn unified_diff_labelled(
    old: &str,
    new: &str,
    old_label: &str,
    new_label: &str,
) -> String {
    let a: Vec<&str> = old.lines().collect();
    let b: Vec<&str> = new.lines().collect();
    let (n, m) = (a.len(), b.len());
    // lcs[i][j]: LCS length of a[i..] and b[j..].
    let mut lcs = vec![vec![0u32; m + 1]; n + 1];
    for i in (0..n).rev() {
        for j in (0..m).rev() {
            lcs[i][j] = if a[i] == b[j] {
                lcs[i + 1][j + 1] + 1
            } else {
                lcs[i + 1][j].max(lcs[i][j + 1])
            };
        }
    }
    // Edit script: (tag, line) with ' ', '-', '+'.
    let mut script = Vec::new();
    let (mut i, mut j) = (0, 0);
    while i < n || j < m {
        if i < n && j < m && a[i] == b[j] {
            script.push((' ', a[i]));
            i += 1;
            j += 1;
        } else if i < n && (j == m || lcs[i + 1][j] >= lcs[i][j + 1]) {
            script.push(('-', a[i]));
            i += 1;
        } else {
            script.push(('+', b[j]));
            j += 1;
        }
    }
    let mut out = format!("--- {old_label}\n+++ {new_label}\n");
    let changed: Vec<usize> = script
        .iter()
        .enumerate()
        .filter(|(_, (t, _))| *t != ' ')
        .map(|(k, _)| k)
        .collect();
    let mut k = 0;
    while k < changed.len() {
        let start = changed[k].saturating_sub(3);
        let mut end = changed[k];
        while k + 1 < changed.len() && changed[k + 1] <= end + 7 {
            k += 1;
            end = changed[k];
        }
        let end = (end + 4).min(script.len());
        let old_start = script[..start].iter().filter(|(t, _)| *t != '+').count() + 1;
        let new_start = script[..start].iter().filter(|(t, _)| *t != '-').count() + 1;
        let old_len = script[start..end].iter().filter(|(t, _)| *t != '+').count();
        let new_len = script[start..end].iter().filter(|(t, _)| *t != '-').count();
        out.push_str(&format!(
            "@@ -{old_start},{old_len} +{new_start},{new_len} @@\n"
        ));
        for (tag, line) in &script[start..end] {
            out.push(*tag);
            out.push_str(line);
            out.push('\n');
        }
        k += 1;
    }
    out
}

/// What differs between a model's train and eval graphs, in words, then as
/// a unified diff of their canonical texts.
pub(crate) fn diff_modes(model: &LoweredModel) -> String {
    use crate::ir::Op;
    let count = |g: &Graph, f: &dyn Fn(&Op) -> bool| {
        g.ids().into_iter().filter(|&id| f(&g.node(id).op)).count()
    };
    let mut out = format!("train and eval graphs of `{}`\n", model.name);
    let dropouts = count(&model.train, &|op| matches!(op, Op::Dropout { .. }));
    let norms = count(&model.train, &|op| matches!(op, Op::BatchNorm { .. }));
    out.push_str(&format!(
        "  dropout: {dropouts} in train mode, gone in eval mode (the identity)\n"
    ));
    out.push_str(&format!(
        "  batch_norm: {norms} on batch statistics in train mode, on the running statistics in eval mode\n"
    ));
    out.push_str("  updates: the train step updates params, optimizer state and running statistics; eval mode updates nothing\n");
    let train = text::to_text(&model.train).replace(" (train)", "");
    let eval = text::to_text(&model.eval).replace(" (eval)", "");
    out.push_str(&unified_diff_labelled(&train, &eval, "train", "eval"));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positions_are_stripped_and_nothing_else() {
        let text = "  %9 = add %7, %3 : f32[B, 64]  @3:21 (inlined at 25:18)  let h\n    ops: %8 matmul @12:23, %9 add @12:23\n  stat dead.relu@4:5\n";
        assert_eq!(
            strip_positions(text),
            "  %9 = add %7, %3 : f32[B, 64]   let h\n    ops: %8 matmul, %9 add\n  stat dead.relu@4:5\n"
        );
        assert_eq!(strip_positions("a @ b\n"), "a @ b\n");
    }

    #[test]
    fn unified_diff_shows_changed_lines_with_context() {
        let diff = unified_diff("a\nb\nc\nd\n", "a\nB\nc\nd\ne\n", "f");
        assert!(diff.contains("-b\n+B\n"), "{diff}");
        assert!(diff.contains("+e\n"), "{diff}");
        assert!(
            diff.starts_with("--- f (saved)\n+++ f (now)\n@@ -1,4 +1,5 @@\n"),
            "{diff}"
        );
        let diff = unified_diff("x\ny\n", "x\nz\n", "g");
        assert!(diff.contains("-y\n+z\n"), "{diff}");
    }
}
