//! Syntax: lexing and parsing a `.grad` file into an [`ast::Ast`].
//!
//! Parsing never fails: [`parse`] returns the tree it could build and the
//! diagnostics it found, so one run reports several errors. The grammar lives
//! in `grammar/model.lalrpop`; the lexer in [`lexer`]. Nothing here knows
//! about the graph IR. Read `lower` next.

pub mod ast;
pub mod lexer;

use lalrpop_util::{ErrorRecovery, ParseError, lalrpop_mod};

use crate::diagnostic::{Code, Diagnostic, Span};
use ast::{Ast, BinaryOp, ExprId, ExprKind};
use lexer::Tok;

lalrpop_mod!(
    #[allow(clippy::all, clippy::pedantic, missing_docs, unused_qualifications)]
    grammar,
    "/model.rs"
);

/// The parser's user-error type: the lexer reports its own errors as
/// diagnostics, so the parser never sees one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Never {}

/// State shared by the grammar's actions: the expression arena and the
/// syntax errors recovered so far.
#[derive(Default)]
pub(crate) struct Builder {
    ast: Ast,
    diagnostics: Vec<Diagnostic>,
}

impl Builder {
    /// Allocates an expression spanning `l..r`.
    pub fn expr(&mut self, kind: ExprKind, l: usize, r: usize) -> ExprId {
        self.ast.alloc(kind, Span::new(l, r))
    }

    /// The span `l..r`.
    pub fn span(&self, l: usize, r: usize) -> Span {
        Span::new(l, r)
    }

    /// Allocates a binary expression.
    pub fn binary(&mut self, op: BinaryOp, lhs: ExprId, rhs: ExprId, l: usize, r: usize) -> ExprId {
        self.expr(ExprKind::Binary { op, lhs, rhs }, l, r)
    }

    /// Converts a number literal, reporting one that does not fit an `f64`.
    pub fn number(&mut self, text: &str, is_int: bool, l: usize, r: usize) -> ExprId {
        let value = match text.parse::<f64>() {
            Ok(value) if value.is_finite() => value,
            _ => {
                self.diagnostics.push(
                    Diagnostic::error(
                        Code::BadLiteral,
                        Span::new(l, r),
                        "number literal out of range",
                    )
                    .with_label("this does not fit a 64-bit float")
                    .with_help("numbers must be finite and below about 1.8e308"),
                );
                0.0
            }
        };
        self.expr(ExprKind::Number { value, is_int }, l, r)
    }

    /// Records a recovered syntax error.
    pub(crate) fn recover(&mut self, recovery: ErrorRecovery<usize, Tok<'_>, Never>) {
        self.syntax_error(recovery.error);
    }

    fn syntax_error(&mut self, error: ParseError<usize, Tok<'_>, Never>) {
        let diagnostic = match error {
            ParseError::InvalidToken { location } => Diagnostic::error(
                Code::UnexpectedToken,
                Span::new(location, location + 1),
                "invalid token",
            ),
            ParseError::UnrecognizedEof { location, expected } => Diagnostic::error(
                Code::UnexpectedEof,
                Span::new(location, location),
                "unexpected end of file",
            )
            .with_label(format!("expected {}", describe_expected(&expected))),
            ParseError::UnrecognizedToken {
                token: (l, token, r),
                expected,
            } => Diagnostic::error(
                Code::UnexpectedToken,
                Span::new(l, r),
                format!("unexpected {token}"),
            )
            .with_label(format!("expected {}", describe_expected(&expected))),
            ParseError::ExtraToken {
                token: (l, token, r),
            } => Diagnostic::error(
                Code::UnexpectedToken,
                Span::new(l, r),
                format!("unexpected {token}"),
            )
            .with_label("expected the end of the file"),
            ParseError::User { error } => match error {},
        };
        // Error recovery can report the same place twice; keep the first.
        let repeated = self
            .diagnostics
            .last()
            .is_some_and(|d| d.primary.span.start == diagnostic.primary.span.start);
        if !repeated {
            self.diagnostics.push(diagnostic);
        }
    }
}

/// Turns lalrpop's list of expected terminals into words.
fn describe_expected(expected: &[String]) -> String {
    let has = |terminal: &str| expected.iter().any(|e| e == terminal);
    if has("\"let\"") && has("\"input\"") {
        return if has("\"}\"") {
            "a statement (`input`, `param`, `let`, `output`, `loss`, ...) or `}`".to_string()
        } else {
            "a statement (`input`, `param`, `let`, `output`, `loss`, ...)".to_string()
        };
    }
    if has("IDENT") && has("INT") && has("\"(\"") {
        return "an expression".to_string();
    }
    if has("\"model\"") && has("\"fn\"") {
        return "`model`, `fn` or `train`".to_string();
    }
    let mut words: Vec<String> = expected
        .iter()
        .map(|terminal| match terminal.as_str() {
            "IDENT" => "a name".to_string(),
            "INT" => "an integer".to_string(),
            "FLOAT" => "a number".to_string(),
            "STR" => "a string".to_string(),
            quoted => format!("`{}`", quoted.trim_matches('"')),
        })
        .collect();
    words.dedup();
    match words.len() {
        0 => "something else".to_string(),
        1 => words.remove(0),
        n if n <= 8 => {
            let last = words.pop().unwrap_or_default();
            format!("{} or {last}", words.join(", "))
        }
        _ => format!(
            "one of {} and {} more",
            words[..6].join(", "),
            words.len() - 6
        ),
    }
}

/// Lexes and parses a source file. Always returns a tree (possibly partial)
/// and every syntax diagnostic found.
pub fn parse(source: &str) -> (Ast, Vec<Diagnostic>) {
    let mut diagnostics = Vec::new();
    let tokens = lexer::lex(source, &mut diagnostics);
    if let Some(too_deep) = lexer::check_nesting(&tokens) {
        diagnostics.push(too_deep);
        return (Ast::default(), diagnostics);
    }
    let mut builder = Builder::default();
    let parser = grammar::FileParser::new();
    let result = parser.parse(&mut builder, tokens);
    let Builder {
        mut ast,
        diagnostics: mut syntax,
    } = builder;
    match result {
        Ok(items) => ast.items = items,
        Err(error) => {
            let mut late = Builder::default();
            late.syntax_error(error);
            syntax.extend(late.diagnostics);
        }
    }
    diagnostics.extend(syntax);
    diagnostics.sort_by_key(|d| d.primary.span.start);
    (ast, diagnostics)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_precedence_like_python() {
        let (ast, diagnostics) = parse("model m { let y = -x ** 2 + a * b @ c }");
        assert!(diagnostics.is_empty(), "{diagnostics:?}");
        // The last expression allocated is the whole `+`.
        let root = ast.exprs.last().map(|e| &e.kind);
        assert!(matches!(
            root,
            Some(ExprKind::Binary {
                op: BinaryOp::Add,
                ..
            })
        ));
    }

    #[test]
    fn recovers_and_reports_several_errors() {
        let (_, diagnostics) =
            parse("model m {\n let = 1\n let y = \n input x: f32[2]\n let z = )\n}");
        assert!(diagnostics.len() >= 2, "{diagnostics:?}");
    }

    #[test]
    fn deep_nesting_is_an_error_not_a_crash() {
        let source = format!(
            "model m {{ let y = {}x{} }}",
            "(".repeat(100_000),
            ")".repeat(100_000)
        );
        let (_, diagnostics) = parse(&source);
        assert_eq!(diagnostics[0].code, Code::TooDeep);
    }
}
