//! The lexer: source text to tokens, with `logos`.
//!
//! Lexing never fails: a character that starts no token and a string with no
//! closing quote become diagnostics and are skipped, so the parser still sees
//! the rest of the file. Comments start with `#` and run to the end of the
//! line; whitespace and newlines only separate tokens.

use std::fmt;

use logos::Logos;

use crate::diagnostic::{Code, Diagnostic, Span};

/// One token. Literals keep their source text; the parser converts them.
#[derive(Logos, Clone, Copy, Debug, PartialEq, Eq)]
#[logos(skip r"[ \t\r\n\f]+")]
#[logos(skip(r"#[^\n]*", allow_greedy = true))]
pub(crate) enum Tok<'input> {
    /// `model`
    #[token("model")]
    Model,
    /// `fn`
    #[token("fn")]
    Fn,
    /// `train`
    #[token("train")]
    Train,
    /// `input`
    #[token("input")]
    Input,
    /// `param`
    #[token("param")]
    Param,
    /// `frozen`
    #[token("frozen")]
    Frozen,
    /// `buffer`
    #[token("buffer")]
    Buffer,
    /// `let`
    #[token("let")]
    Let,
    /// `retain`
    #[token("retain")]
    Retain,
    /// `no_grad`
    #[token("no_grad")]
    NoGrad,
    /// `output`
    #[token("output")]
    Output,
    /// `loss`
    #[token("loss")]
    Loss,
    /// `return`
    #[token("return")]
    Return,
    /// `true`
    #[token("true")]
    True,
    /// `false`
    #[token("false")]
    False,
    /// A name: `[A-Za-z_][A-Za-z0-9_]*`.
    #[regex(r"[A-Za-z_][A-Za-z0-9_]*", |lex| lex.slice())]
    Ident(&'input str),
    /// An integer literal such as `64`.
    #[regex(r"[0-9]+", |lex| lex.slice())]
    Int(&'input str),
    /// A float literal such as `0.5` or `1e-3`.
    #[regex(r"[0-9]+\.[0-9]+([eE][+-]?[0-9]+)?", |lex| lex.slice())]
    #[regex(r"[0-9]+[eE][+-]?[0-9]+", |lex| lex.slice())]
    Float(&'input str),
    /// A string literal, quotes included: `"data/digits.csv"`.
    #[regex(r#""[^"\n]*""#, |lex| lex.slice())]
    Str(&'input str),
    /// A string literal that reaches the end of its line; reported, then
    /// skipped.
    #[regex(r#""[^"\n]*"#, allow_greedy = true)]
    UnterminatedStr,
    /// `{`
    #[token("{")]
    LBrace,
    /// `}`
    #[token("}")]
    RBrace,
    /// `(`
    #[token("(")]
    LParen,
    /// `)`
    #[token(")")]
    RParen,
    /// `[`
    #[token("[")]
    LBracket,
    /// `]`
    #[token("]")]
    RBracket,
    /// `,`
    #[token(",")]
    Comma,
    /// `:`
    #[token(":")]
    Colon,
    /// `=`
    #[token("=")]
    Eq,
    /// `+`
    #[token("+")]
    Plus,
    /// `-`
    #[token("-")]
    Minus,
    /// `*`
    #[token("*")]
    Star,
    /// `**`
    #[token("**")]
    StarStar,
    /// `/`
    #[token("/")]
    Slash,
    /// `@`
    #[token("@")]
    At,
    /// `<`
    #[token("<")]
    Less,
    /// `<=`
    #[token("<=")]
    LessEqual,
    /// `>`
    #[token(">")]
    Greater,
    /// `>=`
    #[token(">=")]
    GreaterEqual,
    /// `==`
    #[token("==")]
    EqualEqual,
    /// `!=`
    #[token("!=")]
    NotEqual,
    /// `...` (every axis not indexed otherwise)
    #[token("...")]
    Ellipsis,
}

impl fmt::Display for Tok<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let text = match self {
            Tok::Model => "`model`",
            Tok::Fn => "`fn`",
            Tok::Train => "`train`",
            Tok::Input => "`input`",
            Tok::Param => "`param`",
            Tok::Frozen => "`frozen`",
            Tok::Buffer => "`buffer`",
            Tok::Let => "`let`",
            Tok::Retain => "`retain`",
            Tok::NoGrad => "`no_grad`",
            Tok::Output => "`output`",
            Tok::Loss => "`loss`",
            Tok::Return => "`return`",
            Tok::True => "`true`",
            Tok::False => "`false`",
            Tok::Ident(name) => return write!(f, "name `{name}`"),
            Tok::Int(text) | Tok::Float(text) => return write!(f, "number `{text}`"),
            Tok::Str(text) => return write!(f, "string {text}"),
            Tok::UnterminatedStr => "unterminated string",
            Tok::LBrace => "`{`",
            Tok::RBrace => "`}`",
            Tok::LParen => "`(`",
            Tok::RParen => "`)`",
            Tok::LBracket => "`[`",
            Tok::RBracket => "`]`",
            Tok::Comma => "`,`",
            Tok::Colon => "`:`",
            Tok::Eq => "`=`",
            Tok::Plus => "`+`",
            Tok::Minus => "`-`",
            Tok::Star => "`*`",
            Tok::StarStar => "`**`",
            Tok::Slash => "`/`",
            Tok::At => "`@`",
            Tok::Ellipsis => "`...`",
            Tok::Less => "`<`",
            Tok::LessEqual => "`<=`",
            Tok::Greater => "`>`",
            Tok::GreaterEqual => "`>=`",
            Tok::EqualEqual => "`==`",
            Tok::NotEqual => "`!=`",
        };
        f.write_str(text)
    }
}

/// A token with its byte range, as the parser takes it.
pub(crate) type Spanned<'input> = (usize, Tok<'input>, usize);

/// The deepest nesting of brackets the parser accepts. Deeper input is
/// rejected before parsing so that no later recursive walk can overflow the
/// stack.
pub(crate) const MAX_NESTING: usize = 256;

/// Lexes the whole source. Bad characters and unterminated strings are
/// reported and left out of the token list.
pub fn lex<'input>(source: &'input str, diagnostics: &mut Vec<Diagnostic>) -> Vec<Spanned<'input>> {
    let mut tokens = Vec::new();
    let mut lexer = Tok::lexer(source);
    while let Some(result) = lexer.next() {
        let range = lexer.span();
        let span = Span::new(range.start, range.end);
        match result {
            Ok(Tok::UnterminatedStr) => diagnostics.push(
                Diagnostic::error(Code::UnterminatedString, span, "unterminated string")
                    .with_label("this string has no closing `\"` on its line")
                    .with_help("close the string with `\"` before the end of the line"),
            ),
            Ok(token) => tokens.push((range.start, token, range.end)),
            Err(()) => {
                // Report a run of bad characters once.
                let bad = &source[range.clone()];
                let shown = match bad.chars().next() {
                    Some('\0') => "NUL byte".to_string(),
                    Some(c) if c.is_control() => format!("control character U+{:04X}", c as u32),
                    Some(c) => format!("character `{c}`"),
                    None => "input".to_string(),
                };
                let merged = diagnostics.last_mut().filter(|d| {
                    d.code == Code::InvalidCharacter && d.primary.span.end as usize == range.start
                });
                match merged {
                    Some(previous) => previous.primary.span.end = span.end,
                    None => diagnostics.push(
                        Diagnostic::error(
                            Code::InvalidCharacter,
                            span,
                            format!("unexpected {shown}"),
                        )
                        .with_label("no token starts here")
                        .with_help(
                            "names are ASCII letters, digits and `_`; comments start with `#`",
                        ),
                    ),
                }
            }
        }
    }
    tokens
}

/// Finds the first bracket that nests deeper than [`MAX_NESTING`].
pub(crate) fn check_nesting(tokens: &[Spanned<'_>]) -> Option<Diagnostic> {
    let mut depth = 0usize;
    for &(start, token, end) in tokens {
        match token {
            Tok::LParen | Tok::LBracket | Tok::LBrace => {
                depth += 1;
                if depth > MAX_NESTING {
                    return Some(
                        Diagnostic::error(
                            Code::TooDeep,
                            Span::new(start, end),
                            format!("brackets nest deeper than {MAX_NESTING} levels"),
                        )
                        .with_label("this bracket is too deep")
                        .with_help("split the expression with `let` bindings"),
                    );
                }
            }
            Tok::RParen | Tok::RBracket | Tok::RBrace => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lexes_a_declaration() {
        let mut diagnostics = Vec::new();
        let tokens: Vec<Tok<'_>> = lex("param w: f32[64, 10] = zeros # c", &mut diagnostics)
            .into_iter()
            .map(|(_, t, _)| t)
            .collect();
        assert!(diagnostics.is_empty());
        assert_eq!(
            tokens,
            vec![
                Tok::Param,
                Tok::Ident("w"),
                Tok::Colon,
                Tok::Ident("f32"),
                Tok::LBracket,
                Tok::Int("64"),
                Tok::Comma,
                Tok::Int("10"),
                Tok::RBracket,
                Tok::Eq,
                Tok::Ident("zeros"),
            ]
        );
    }

    #[test]
    fn bad_characters_are_reported_once_per_run() {
        let mut diagnostics = Vec::new();
        let tokens = lex("a $$$ b \0", &mut diagnostics);
        assert_eq!(tokens.len(), 2);
        assert_eq!(diagnostics.len(), 2);
        assert_eq!(diagnostics[0].primary.span, Span::new(2, 5));
    }

    #[test]
    fn numbers_split_into_ints_and_floats() {
        let mut diagnostics = Vec::new();
        let tokens: Vec<Tok<'_>> = lex("1 0.5 1e-3 2E4", &mut diagnostics)
            .into_iter()
            .map(|(_, t, _)| t)
            .collect();
        assert_eq!(
            tokens,
            vec![
                Tok::Int("1"),
                Tok::Float("0.5"),
                Tok::Float("1e-3"),
                Tok::Float("2E4")
            ]
        );
    }
}
