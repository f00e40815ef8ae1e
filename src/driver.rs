//! The driver: runs the front end's stages in order on one source file and
//! keeps what each produced.
//!
//! Stages, in order: decode (UTF-8), `syntax::parse`, [`lower::lower`].
//! A stage's diagnostics never stop the next one unless it has nothing to
//! give it, so one run reports as much as it can. This is the library's
//! entry point; the CLI and the tests go through it.

use std::path::Path;

use crate::diagnostic::{Code, Diagnostic, Span, render};
use crate::format::thousands;
use crate::ir::{Graph, Mode, Role};
use crate::lower::{self, LowerOptions, LoweredModel};
use crate::syntax;

/// A compiled file: its source, its models and every diagnostic.
#[derive(Clone, Debug)]
pub struct Compilation {
    /// The name diagnostics show for the file.
    pub file_name: String,
    /// The source text (invalid UTF-8 replaced, for rendering).
    pub source: String,
    /// Models that lowered without errors.
    pub models: Vec<LoweredModel>,
    /// Every diagnostic, errors and warnings, in source order.
    pub diagnostics: Vec<Diagnostic>,
}

impl Compilation {
    /// Whether any diagnostic is an error.
    pub fn has_errors(&self) -> bool {
        self.diagnostics.iter().any(Diagnostic::is_error)
    }

    /// Renders every diagnostic as plain text.
    /// At most `MAX_RENDERED` of them, then how many more there are.
    pub fn render_diagnostics(&self) -> String {
        let shown = self.diagnostics.len().min(MAX_RENDERED);
        let mut out = render(&self.file_name, &self.source, &self.diagnostics[..shown]);
        let more = self.diagnostics.len() - shown;
        if more > 0 {
            let errors = self.diagnostics[shown..]
                .iter()
                .filter(|d| d.is_error())
                .count();
            out.push_str(&format!(
                "... and {more} more diagnostic{} ({errors} error{}) not shown\n",
                if more == 1 { "" } else { "s" },
                if errors == 1 { "" } else { "s" }
            ));
        }
        out
    }

    /// The model called `name`, or the only one when `name` is `None`.
    pub fn model(&self, name: Option<&str>) -> Result<&LoweredModel, String> {
        match name {
            Some(name) => self.models.iter().find(|m| m.name == name).ok_or_else(|| {
                let names: Vec<&str> = self.models.iter().map(|m| m.name.as_str()).collect();
                format!(
                    "no model `{name}` in {}; models: {}",
                    self.file_name,
                    names.join(", ")
                )
            }),
            None => match self.models.as_slice() {
                [one] => Ok(one),
                [] => Err(format!("{} defines no model", self.file_name)),
                many => {
                    let names: Vec<&str> = many.iter().map(|m| m.name.as_str()).collect();
                    Err(format!(
                        "{} defines several models ({}); choose one with --model",
                        self.file_name,
                        names.join(", ")
                    ))
                }
            },
        }
    }
}

/// Compiles source bytes; invalid UTF-8 is a diagnostic.
pub fn compile_bytes(file_name: &str, bytes: &[u8], options: LowerOptions) -> Compilation {
    match std::str::from_utf8(bytes) {
        Ok(source) => compile_source(file_name, source, options),
        Err(error) => {
            let valid = error.valid_up_to();
            let source = String::from_utf8_lossy(bytes).into_owned();
            let width = source[valid..].chars().next().map_or(0, char::len_utf8);
            let diagnostic = Diagnostic::error(
                Code::InvalidUtf8,
                Span::new(valid, valid + width),
                "the file is not valid UTF-8",
            )
            .with_label(format!(
                "invalid byte 0x{:02X} at offset {valid}",
                bytes[valid]
            ))
            .with_help("save the file as UTF-8");
            Compilation {
                file_name: file_name.to_string(),
                source,
                models: Vec::new(),
                diagnostics: vec![diagnostic],
            }
        }
    }
}

/// Compiles a source string.
pub fn compile_source(file_name: &str, source: &str, options: LowerOptions) -> Compilation {
    let (ast, mut diagnostics) = syntax::parse(source);
    let (models, lowered) = lower::lower(&ast, source, options);
    diagnostics.extend(lowered);
    for model in &models {
        diagnostics.extend(gradient_warnings(&model.train, &diagnostics));
    }
    // Unused-value warnings in a file that does not compile are mostly
    // echoes of its errors.
    if diagnostics.iter().any(Diagnostic::is_error) {
        diagnostics.retain(|d| d.code != Code::UnusedValue);
    }
    diagnostics.sort_by_key(|d| (d.primary.span.start, d.code));
    Compilation {
        file_name: file_name.to_string(),
        source: source.to_string(),
        models,
        diagnostics,
    }
}

/// The largest source file gradc reads, in bytes (64 MiB; a model file is
/// kilobytes, and spans are `u32` offsets).
pub(crate) const MAX_SOURCE_BYTES: u64 = 64 << 20;

/// W0002 for every trainable param of a model with a loss that no gradient
/// can reach, pointing at the declaration and at what blocks the gradient.
/// A param that nothing uses at all already has W0001.
fn gradient_warnings(graph: &Graph, earlier: &[Diagnostic]) -> Vec<Diagnostic> {
    if graph.loss().is_none() {
        return Vec::new();
    }
    let Ok(params) = crate::ledger::param_cases(graph, false) else {
        return Vec::new();
    };
    let mut warnings = Vec::new();
    for entry in &params {
        let crate::ledger::Case::Unreachable { blockers } = &entry.case else {
            continue;
        };
        // Unused on purpose (`_name`), or already reported as unused.
        let unused = earlier
            .iter()
            .any(|d| d.code == Code::UnusedValue && d.primary.span == entry.span);
        if unused || entry.name.starts_with('_') {
            continue;
        }
        let reasons: Vec<String> = blockers
            .iter()
            .map(crate::ledger::Blocker::describe)
            .collect();
        let mut warning = Diagnostic::warning(
            Code::NoGradient,
            entry.span,
            format!("param `{}` never gets a gradient", entry.name),
        )
        .with_label("trainable, but no gradient from the loss reaches it")
        .with_note(format!("{}, so training never changes it", reasons.join("; ")))
        .with_help(format!(
            "use `{}` on a differentiable path to the loss, or declare it `frozen param` if it is meant to stay fixed",
            entry.name
        ));
        for blocker in blockers {
            if let Some(at) = blocker.loc() {
                let label = match blocker {
                    crate::ledger::Blocker::StopGradient(_) => "the gradient stops here",
                    crate::ledger::Blocker::NoGrad(_) => "computed without gradient here",
                    _ => "not differentiable with respect to this operand",
                };
                warning = warning.with_secondary(at.span, label);
            }
        }
        warnings.push(warning);
    }
    warnings
}

/// Reads and compiles a file. Only I/O errors (and files too large to be a
/// model) are `Err`.
pub(crate) fn compile_file(path: &Path, options: LowerOptions) -> std::io::Result<Compilation> {
    // The size is checked on what is read, not on what the file system
    // says: `/dev/zero` or a FIFO has no size and never ends.
    let too_large = || {
        std::io::Error::other(format!(
            "the file has more than {MAX_SOURCE_BYTES} bytes ({} MiB), the most gradc reads of a model file",
            MAX_SOURCE_BYTES >> 20
        ))
    };
    if std::fs::metadata(path)?.len() > MAX_SOURCE_BYTES {
        return Err(too_large());
    }
    let mut bytes = Vec::new();
    use std::io::Read;
    std::fs::File::open(path)?
        .take(MAX_SOURCE_BYTES + 1)
        .read_to_end(&mut bytes)?;
    if bytes.len() as u64 > MAX_SOURCE_BYTES {
        return Err(too_large());
    }
    Ok(compile_bytes(&path.display().to_string(), &bytes, options))
}

/// The most diagnostics printed for one file: past that, a file is
/// rarely a model (random text gave 57,535), and the first ones say what
/// is wrong.
pub(crate) const MAX_RENDERED: usize = 100;

/// Parameter counts of a graph: (params, trainable elements, frozen
/// elements).
pub(crate) fn parameter_counts(graph: &Graph) -> (usize, u64, u64) {
    let mut params = 0;
    let mut trainable = 0;
    let mut frozen = 0;
    for id in graph.ids() {
        let node = graph.node(id);
        let count = node.shape().fixed_count().unwrap_or(0);
        match node.role {
            Role::Param => {
                params += 1;
                trainable += count;
            }
            Role::FrozenParam => {
                params += 1;
                frozen += count;
            }
            _ => {}
        }
    }
    (params, trainable, frozen)
}

/// A one-line summary of a model, as `gradc check` prints it.
pub fn summary(model: &LoweredModel) -> String {
    let graph = model.graph(Mode::Train);
    let (params, trainable, frozen) = parameter_counts(graph);
    let mut line = format!(
        "{}: {params} param{}, {} parameters",
        model.name,
        if params == 1 { "" } else { "s" },
        thousands(trainable + frozen)
    );
    if frozen > 0 {
        line.push_str(&format!(
            " ({} trainable, {} frozen)",
            thousands(trainable),
            thousands(frozen)
        ));
    }
    line.push_str(&format!(", {} nodes", graph.len()));
    if graph.loss().is_none() {
        line.push_str(", no loss");
    }
    line
}
