//! Diagnostics as data: a stable [`Code`], a severity, a primary span whose
//! label stands alone, secondary spans, notes and help.
//!
//! Every layer of the front end (lexer, parser, checker) pushes
//! [`Diagnostic`]s into a vector and carries on; only the driver decides to
//! stop. [`render`] is the one renderer: plain text (no colour) so that
//! snapshots and terminals show the same bytes. `docs/diagnostics.md` lists
//! every code with a failing example and its fix.

use std::fmt;

use codespan_reporting::diagnostic as cs;
use codespan_reporting::files::SimpleFile;
use codespan_reporting::term;

/// A half-open byte range `start..end` in the one source file of a compile.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Span {
    /// Offset of the first byte.
    pub start: u32,
    /// Offset one past the last byte.
    pub end: u32,
}

impl Span {
    /// A span from byte offsets; offsets past `u32::MAX` saturate (sources
    /// that large are rejected before lexing).
    pub fn new(start: usize, end: usize) -> Span {
        let clamp = |v: usize| u32::try_from(v).unwrap_or(u32::MAX);
        Span {
            start: clamp(start),
            end: clamp(end.max(start)),
        }
    }

    /// The smallest span covering both.
    pub fn to(self, other: Span) -> Span {
        Span {
            start: self.start.min(other.start),
            end: self.end.max(other.end),
        }
    }

    /// The byte range, for slicing the source.
    pub fn range(self) -> std::ops::Range<usize> {
        self.start as usize..self.end as usize
    }
}

/// How bad a diagnostic is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Severity {
    /// The file is still compiled; the user should look.
    Warning,
    /// The file is rejected.
    Error,
}

macro_rules! codes {
    ($($variant:ident = $text:literal, $summary:literal;)*) => {
        /// Every diagnostic gradc can emit, with its stable code. The list is
        /// closed: `docs/diagnostics.md` and `tests/ui/` cover each one.
        #[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
        pub enum Code {
            $(#[doc = $summary] $variant,)*
        }

        impl Code {
            /// All codes, in order.
            pub const ALL: &'static [Code] = &[$(Code::$variant,)*];

            /// The stable code, such as `E0101`.
            pub fn as_str(self) -> &'static str {
                match self { $(Code::$variant => $text,)* }
            }

            /// One line saying what the code means.
            pub fn summary(self) -> &'static str {
                match self { $(Code::$variant => $summary,)* }
            }
        }
    };
}

codes! {
    InvalidCharacter = "E0001", "a character that cannot start any token";
    UnexpectedToken = "E0002", "a token where the grammar expects something else";
    UnexpectedEof = "E0003", "the file ends in the middle of a construct";
    InvalidUtf8 = "E0004", "the file is not valid UTF-8";
    TooDeep = "E0005", "an expression nests deeper than the compiler's limit";
    BadLiteral = "E0006", "a number literal that does not fit its type";
    UnterminatedString = "E0007", "a string literal with no closing quote";
    TooManyNodes = "E0008", "a model whose inlined graph exceeds the compiler's node limit";
    UnknownName = "E0101", "a name that is not defined at this point";
    DuplicateName = "E0102", "a name defined twice in one scope (names are immutable, no shadowing)";
    UseBeforeDefinition = "E0103", "a name used above the line that defines it";
    UnknownFunction = "E0104", "a call of a function that is neither built in nor defined";
    RecursiveFunction = "E0105", "a function that calls itself, directly or through others";
    UnknownDimension = "E0106", "a symbolic dimension in a reshape that no input declares";
    WrongArity = "E0201", "a call with too many or too few arguments";
    UnknownArgument = "E0202", "a named argument the callee does not take";
    MissingArgument = "E0203", "a call that leaves a required argument out";
    DuplicateArgument = "E0204", "an argument given twice";
    ResultCount = "E0206", "a function's results bound to a different number of names, or several results where one value is wanted";
    WrongArgumentKind = "E0205", "an argument of the wrong kind (a tensor where a number is wanted, or the reverse)";
    DtypeMismatch = "E0301", "operands of different float types";
    NotInteger = "E0302", "labels and indices must be `i32`";
    NotFloat = "E0303", "arithmetic and layers need `f32` or `f64`, not `i32` or `bool`";
    UnknownDtype = "E0304", "an element type other than `f32`, `f64` and `i32`";
    ShapeMismatch = "E0401", "shapes that cannot be broadcast or must be equal";
    MatmulMismatch = "E0402", "matrix product operands whose inner dimensions differ";
    BadAxis = "E0403", "an axis outside the operand's rank";
    ReshapeCount = "E0404", "a reshape that changes the number of elements";
    Overflow = "E0405", "a shape whose element count overflows";
    WrongRank = "E0406", "an operand with the wrong number of dimensions";
    SymbolicParam = "E0407", "a param or buffer whose shape is not fixed, or a dimension below 1";
    GradTarget = "E0408", "a `grad(e, x)` whose `x` is not a named float value, or whose `e` is not a float scalar";
    IndexRange = "E0409", "an index or slice outside its axis, more indices than axes, or a symbolic axis indexed by position";
    ScanCarry = "E0410", "a `scan` whose step returns a carry of another type or shape than it takes, or fewer values than carries";
    StatementNotAllowed = "E0507", "a statement where it cannot stand (an `input` inside a function)";
    LossNotScalar = "E0501", "a `loss` whose value is not a scalar";
    SecondLoss = "E0502", "a model with more than one `loss`";
    DropoutProbability = "E0503", "a dropout probability outside [0, 1)";
    UnknownInitializer = "E0504", "an initializer that does not exist, or with wrong arguments";
    NotABuffer = "E0505", "batch-norm statistics that are not `buffer`s";
    RetainUnknown = "E0506", "`retain` of a name that is not a value of the model";
    ScanBody = "E0508", "a `scan` step that uses dropout, batch norm or `grad`, which a loop step cannot hold";
    UnknownModel = "E0601", "a `train` block naming no model or an unknown one";
    UnknownOptimizer = "E0602", "an optimizer that does not exist";
    UnknownTrainEntry = "E0603", "an entry the `train` block does not have";
    BadTrainValue = "E0604", "a `train` entry with a value it cannot take";
    DuplicateTrain = "E0605", "two `train` blocks for one model, or one entry given twice";
    UnknownSchedule = "E0606", "a learning-rate schedule that does not exist";
    TrainWithoutLoss = "E0607", "a `train` block for a model with no `loss`";
    UnusedValue = "W0001", "a value that nothing uses";
    NoGradient = "W0002", "a trainable param that no gradient from the loss can reach";
    ZeroGradient = "W0003", "a `grad(e, x)` that is zero everywhere: `e` does not depend on `x`";
}

/// A labelled span.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Label {
    /// Where.
    pub span: Span,
    /// What is wrong there; may be empty.
    pub message: String,
}

/// One finding about the source: what, where, and how to fix it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Diagnostic {
    /// Error or warning.
    pub severity: Severity,
    /// Stable code.
    pub code: Code,
    /// Lowercase headline, no final period, identifiers in backticks.
    pub message: String,
    /// The span the message is about.
    pub primary: Label,
    /// Related places (the call of an inlined function, the first definition).
    pub secondary: Vec<Label>,
    /// Extra facts.
    pub notes: Vec<String>,
    /// What would fit.
    pub help: Option<String>,
}

impl Diagnostic {
    /// An error with a primary span and its label.
    pub fn error(code: Code, span: Span, message: impl Into<String>) -> Diagnostic {
        Diagnostic {
            severity: Severity::Error,
            code,
            message: message.into(),
            primary: Label {
                span,
                message: String::new(),
            },
            secondary: Vec::new(),
            notes: Vec::new(),
            help: None,
        }
    }

    /// A warning with a primary span.
    pub fn warning(code: Code, span: Span, message: impl Into<String>) -> Diagnostic {
        Diagnostic {
            severity: Severity::Warning,
            ..Diagnostic::error(code, span, message)
        }
    }

    /// Sets the primary label's text.
    pub(crate) fn with_label(mut self, message: impl Into<String>) -> Diagnostic {
        self.primary.message = message.into();
        self
    }

    /// Adds a secondary labelled span.
    pub(crate) fn with_secondary(mut self, span: Span, message: impl Into<String>) -> Diagnostic {
        self.secondary.push(Label {
            span,
            message: message.into(),
        });
        self
    }

    /// Adds a note.
    pub(crate) fn with_note(mut self, note: impl Into<String>) -> Diagnostic {
        self.notes.push(note.into());
        self
    }

    /// Sets the help line.
    pub(crate) fn with_help(mut self, help: impl Into<String>) -> Diagnostic {
        self.help = Some(help.into());
        self
    }

    /// Whether this diagnostic rejects the file.
    pub(crate) fn is_error(&self) -> bool {
        self.severity == Severity::Error
    }
}

impl fmt::Display for Code {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Renders diagnostics as plain text in the rustc style, each naming
/// `file:line:col` and underlining its spans.
pub fn render(file_name: &str, source: &str, diagnostics: &[Diagnostic]) -> String {
    // Control characters (a NUL byte, say) would reach the terminal raw;
    // show them as `?`, which keeps every byte offset.
    let shown: String = source
        .chars()
        .map(|c| {
            if c.is_control() && !matches!(c, '\n' | '\t' | '\r') && c.len_utf8() == 1 {
                '?'
            } else {
                c
            }
        })
        .collect();
    let source = shown.as_str();
    let file = SimpleFile::new(file_name, source);
    let config = term::Config::default();
    let mut out = String::new();
    for diagnostic in diagnostics {
        let mut labels = vec![
            cs::Label::primary((), clamp(diagnostic.primary.span, source))
                .with_message(shorten_quotes(&diagnostic.primary.message)),
        ];
        for label in &diagnostic.secondary {
            labels.push(
                cs::Label::secondary((), clamp(label.span, source))
                    .with_message(shorten_quotes(&label.message)),
            );
        }
        let mut notes: Vec<String> = diagnostic.notes.iter().map(|n| shorten_quotes(n)).collect();
        if let Some(help) = &diagnostic.help {
            notes.push(shorten_quotes(&format!("help: {help}")));
        }
        let severity = match diagnostic.severity {
            Severity::Error => cs::Severity::Error,
            Severity::Warning => cs::Severity::Warning,
        };
        let rendered = cs::Diagnostic::new(severity)
            .with_code(diagnostic.code.as_str())
            .with_message(shorten_quotes(&diagnostic.message))
            .with_labels(labels)
            .with_notes(notes);
        // A label on a huge line (a 200 KB identifier, a minified file)
        // would print the whole line: name the place and leave it out.
        let spans = std::iter::once(&diagnostic.primary).chain(&diagnostic.secondary);
        let longest = spans
            .map(|label| line_length(source, label.span.start as usize))
            .max()
            .unwrap_or(0);
        if longest > MAX_SHOWN_LINE {
            let (line, col) = line_col(source, diagnostic.primary.span.start);
            out.push_str(&format!(
                "{}[{}]: {}\n  ┌─ {file_name}:{line}:{col}\n  = the line is {longest} bytes long, too long to show\n",
                severity_word(diagnostic.severity),
                diagnostic.code,
                shorten_quotes(&diagnostic.message)
            ));
            for note in &rendered.notes {
                out.push_str(&format!("  = {note}\n"));
            }
            out.push('\n');
            continue;
        }
        match term::emit_into_string(&config, &file, &rendered) {
            Ok(text) => out.push_str(&text),
            // A span that codespan cannot place (it never should: spans are
            // clamped) still gets its message out.
            Err(_) => out.push_str(&format!(
                "{}[{}]: {}\n",
                severity_word(diagnostic.severity),
                diagnostic.code,
                shorten_quotes(&diagnostic.message)
            )),
        }
    }
    out
}

/// The longest source line a diagnostic shows, in bytes.
const MAX_SHOWN_LINE: usize = 1000;

/// The length in bytes of the line holding byte `offset`.
fn line_length(source: &str, offset: usize) -> usize {
    let offset = floor_boundary(source, offset.min(source.len()));
    let start = source[..offset].rfind('\n').map_or(0, |i| i + 1);
    let end = source[offset..]
        .find('\n')
        .map_or(source.len(), |i| offset + i);
    end - start
}

fn severity_word(severity: Severity) -> &'static str {
    match severity {
        Severity::Error => "error",
        Severity::Warning => "warning",
    }
}

/// Keeps a span inside the source and on character boundaries, so the
/// renderer can always place it.
fn clamp(span: Span, source: &str) -> std::ops::Range<usize> {
    let mut start = (span.start as usize).min(source.len());
    let mut end = (span.end as usize).min(source.len()).max(start);
    while !source.is_char_boundary(start) {
        start -= 1;
    }
    while !source.is_char_boundary(end) {
        end += 1;
    }
    start..end
}

/// 1-based line and column (in characters) of a byte offset.
pub(crate) fn line_col(source: &str, offset: u32) -> (usize, usize) {
    let offset = (offset as usize).min(source.len());
    let before = &source[..floor_boundary(source, offset)];
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let col = before[line_start..].chars().count() + 1;
    (line, col)
}

fn floor_boundary(source: &str, mut offset: usize) -> usize {
    while !source.is_char_boundary(offset) {
        offset -= 1;
    }
    offset
}

/// The longest name "did you mean" looks for.
const MAX_SUGGESTED_LENGTH: usize = 256;

/// The most characters of a quoted name or literal a message shows.
pub(crate) const MAX_QUOTED: usize = 100;

/// `text`, or its first characters and how many were left out when it is
/// longer than `limit` characters: what a message echoes of user input.
pub(crate) fn shorten(text: &str, limit: usize) -> String {
    let count = text.chars().count();
    if count <= limit {
        return text.to_string();
    }
    let kept: String = text.chars().take(limit).collect();
    format!("{kept}... ({} more characters)", count - limit)
}

/// A message with every backticked part longer than [`MAX_QUOTED`]
/// characters shortened, so that a 200 KB identifier or literal does not
/// fill the terminal.
pub(crate) fn shorten_quotes(message: &str) -> String {
    let parts: Vec<&str> = message.split('`').collect();
    if parts.len() < 3 {
        return message.to_string();
    }
    let mut out = String::with_capacity(message.len().min(4096));
    for (index, part) in parts.iter().enumerate() {
        if index > 0 {
            out.push('`');
        }
        // Odd parts are inside backticks (when they are closed).
        let quoted = index % 2 == 1 && index + 1 < parts.len();
        if quoted {
            out.push_str(&shorten(part, MAX_QUOTED));
        } else {
            out.push_str(part);
        }
    }
    out
}

/// "Did you mean" support: the candidate closest to `name` by edit
/// distance, if it is close enough to be a plausible typo.
pub(crate) fn closest<'a>(
    name: &str,
    candidates: impl IntoIterator<Item = &'a str>,
) -> Option<&'a str> {
    // One-letter names are all one edit apart; only a case slip counts.
    let length = name.chars().count();
    // The distance costs the product of the lengths: names longer than any
    // plausible identifier get no suggestion.
    if length > MAX_SUGGESTED_LENGTH {
        return None;
    }
    let limit = if length == 1 { 0 } else { (length / 3).max(1) };
    let mut best: Option<(usize, &str)> = None;
    for candidate in candidates {
        // The distance is at least the difference in length.
        if candidate.chars().count().abs_diff(length) > limit {
            continue;
        }
        // A difference in case only is the likeliest typo of all.
        let distance = if candidate.eq_ignore_ascii_case(name) {
            0
        } else {
            edit_distance(name, candidate)
        };
        if distance <= limit && best.is_none_or(|(d, c)| (distance, candidate) < (d, c)) {
            best = Some((distance, candidate));
        }
    }
    best.map(|(_, c)| c)
}

fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut previous = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let substitute = previous + usize::from(ca != *cb);
            previous = row[j + 1];
            row[j + 1] = substitute.min(row[j] + 1).min(previous + 1);
        }
    }
    row[b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_quotes_are_cut_and_long_names_get_no_suggestion() {
        let name = "x".repeat(200_000);
        let message = format!("unknown name `{name}` here");
        let short = shorten_quotes(&message);
        assert!(short.len() < 160, "{short}");
        assert!(short.ends_with("more characters)` here"), "{short}");
        let started = std::time::Instant::now();
        assert_eq!(closest(&name, [name.as_str(), "x"]), None);
        assert!(started.elapsed().as_secs() < 1);
        assert_eq!(shorten_quotes("a `short` one"), "a `short` one");
    }

    #[test]
    fn closest_finds_typos_only() {
        assert_eq!(closest("relu", ["relu6", "gelu", "exp"]), Some("gelu"));
        assert_eq!(closest("w1", ["w2", "b1"]), Some("b1"));
        assert_eq!(closest("zzzzzz", ["relu"]), None);
        assert_eq!(closest("W", ["b", "w"]), Some("w"));
    }

    #[test]
    fn line_col_counts_characters() {
        let source = "ab\nçd";
        assert_eq!(line_col(source, 0), (1, 1));
        assert_eq!(line_col(source, 3), (2, 1));
        assert_eq!(line_col(source, 5), (2, 2));
        let index = LineIndex::new(source);
        assert_eq!(index.line_col(source, 0), (1, 1));
        assert_eq!(index.line_col(source, 2), (1, 3));
        assert_eq!(index.line_col(source, 3), (2, 1));
        assert_eq!(index.line_col(source, 5), (2, 2));
    }
}

/// Maps byte offsets to 1-based lines and columns quickly.
#[derive(Clone, Debug)]
pub(crate) struct LineIndex {
    starts: Vec<usize>,
}

impl LineIndex {
    /// Indexes the line starts of a source.
    pub fn new(source: &str) -> LineIndex {
        let mut starts = vec![0];
        starts.extend(source.match_indices('\n').map(|(i, _)| i + 1));
        LineIndex { starts }
    }

    /// 1-based line and column (in characters) of `offset` in `source`.
    pub(crate) fn line_col(&self, source: &str, offset: u32) -> (u32, u32) {
        let offset = floor_boundary(source, (offset as usize).min(source.len()));
        let line = self.starts.partition_point(|&s| s <= offset).max(1);
        let start = self.starts[line - 1].min(offset);
        let col = source[start..offset].chars().count() + 1;
        let clamp = |v: usize| u32::try_from(v).unwrap_or(u32::MAX);
        (clamp(line), clamp(col))
    }
}
