//! The abstract syntax tree of a `.grad` file.
//!
//! Expressions live in one arena ([`Ast::exprs`]) and refer to each other by
//! [`ExprId`], so a very long or deeply nested expression is a flat vector:
//! dropping it never recurses. Each expression records its nesting depth so
//! that later recursive walks can refuse input that would overflow the stack.
//! The tree is what the user wrote, with spans; names are not resolved here
//! (that is `lower`'s job).

use crate::diagnostic::Span;

/// An index into [`Ast::exprs`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ExprId(pub u32);

/// A parsed file: items in source order plus the expression arena.
#[derive(Clone, Debug, Default)]
pub struct Ast {
    /// Models, functions and train blocks, in source order.
    pub items: Vec<Item>,
    /// Every expression of the file.
    pub exprs: Vec<Expr>,
}

impl Ast {
    /// The expression behind an id.
    pub fn expr(&self, id: ExprId) -> &Expr {
        &self.exprs[id.0 as usize]
    }

    /// Adds an expression, computing its depth from its children.
    pub fn alloc(&mut self, kind: ExprKind, span: Span) -> ExprId {
        let child_depth = |id: &ExprId| self.exprs[id.0 as usize].depth;
        let depth = match &kind {
            ExprKind::Unary { operand, .. } => child_depth(operand),
            ExprKind::Binary { lhs, rhs, .. } => child_depth(lhs).max(child_depth(rhs)),
            ExprKind::Call { args, .. } => args
                .iter()
                .map(|a| child_depth(&a.value))
                .max()
                .unwrap_or(0),
            ExprKind::List(items) => items.iter().map(child_depth).max().unwrap_or(0),
            ExprKind::Index { base, items } => items
                .iter()
                .flat_map(|item| match item {
                    IndexItem::At(e) => vec![*e],
                    IndexItem::Range { start, end } => start.iter().chain(end).copied().collect(),
                    IndexItem::Ellipsis(_) => vec![],
                })
                .map(|e| child_depth(&e))
                .max()
                .unwrap_or(0)
                .max(child_depth(base)),
            ExprKind::Number { .. }
            | ExprKind::Bool(_)
            | ExprKind::Str(_)
            | ExprKind::Name(_)
            | ExprKind::Error => 0,
        }
        .saturating_add(1);
        let id = ExprId(u32::try_from(self.exprs.len()).unwrap_or(u32::MAX));
        self.exprs.push(Expr { kind, span, depth });
        id
    }
}

/// A name with the place it was written.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Ident {
    /// The text.
    pub name: String,
    /// Where.
    pub span: Span,
}

/// A top-level item.
#[derive(Clone, Debug)]
pub enum Item {
    /// `model name { ... }`
    Model(Model),
    /// `fn name(params) = expr` or `fn name(params) { ... return expr }`
    Function(Function),
    /// `train name { ... }`
    Train(Train),
}

/// A `model` block.
#[derive(Clone, Debug)]
pub struct Model {
    /// The model's name.
    pub name: Ident,
    /// Its statements in order.
    pub body: Vec<Stmt>,
    /// The whole block.
    pub span: Span,
}

/// A user function, inlined at every call.
#[derive(Clone, Debug)]
pub struct Function {
    /// The function's name.
    pub name: Ident,
    /// Parameter names; shapes come from the call.
    pub params: Vec<Ident>,
    /// `let` statements before the result.
    pub body: Vec<Stmt>,
    /// The returned expressions (`return h, c` gives two), at least one.
    pub results: Vec<ExprId>,
    /// The whole definition.
    pub span: Span,
}

/// A `train` block: a flat list of items grouped into entries by
/// `lower::train`.
#[derive(Clone, Debug)]
pub struct Train {
    /// The model it trains (absent when the user forgot it).
    pub model: Option<Ident>,
    /// Its items in order.
    pub items: Vec<TrainItem>,
    /// The `train` keyword, for errors about the block as a whole.
    pub keyword: Span,
    /// The whole block.
    pub span: Span,
}

/// One word, value or `key = value` pair of a train block.
#[derive(Clone, Debug)]
pub enum TrainItem {
    /// A bare name: an entry key or a value such as `constant`.
    Word(Ident),
    /// A value: number, string or call such as `adam(lr = 1e-3)`.
    Value(ExprId),
    /// `key = value`
    Named(Ident, ExprId),
}

/// A declared type such as `f32[B, 64]`.
#[derive(Clone, Debug)]
pub struct TypeExpr {
    /// The element type's name (`f32`, `f64`, `i32`).
    pub dtype: Ident,
    /// The dimensions.
    pub dims: Vec<DimExpr>,
    /// The whole type.
    pub span: Span,
}

/// One dimension of a declared shape.
#[derive(Clone, Debug)]
pub enum DimExpr {
    /// A literal size (its text, converted by the checker).
    Size(String, Span),
    /// A symbolic size such as `B`.
    Symbol(Ident),
}

/// A statement of a model or function body.
#[derive(Clone, Debug)]
pub enum Stmt {
    /// `input x: f32[B, 64]`
    Input {
        /// Name.
        name: Ident,
        /// Declared type.
        ty: TypeExpr,
    },
    /// `param w: ... = init` or `frozen param w: ... = init`
    Param {
        /// Name.
        name: Ident,
        /// Declared type.
        ty: TypeExpr,
        /// Initializer expression.
        init: Option<ExprId>,
        /// The `frozen` keyword's span when present.
        frozen: Option<Span>,
    },
    /// `buffer m: f32[128] = zeros`
    Buffer {
        /// Name.
        name: Ident,
        /// Declared type.
        ty: TypeExpr,
        /// Initializer expression.
        init: Option<ExprId>,
    },
    /// `let h = expr`
    Let {
        /// Name.
        name: Ident,
        /// Value.
        value: ExprId,
    },
    /// `let h, c = cell(...)`: a function's results, one name each.
    LetMany {
        /// The names, at least two.
        names: Vec<Ident>,
        /// The call.
        value: ExprId,
    },
    /// `retain h, g`
    Retain(Vec<Ident>),
    /// `no_grad { ... }`
    NoGrad {
        /// Statements inside.
        body: Vec<Stmt>,
        /// The `no_grad` keyword.
        keyword: Span,
    },
    /// `output name` or `output name = expr`
    Output {
        /// The output's name.
        name: Ident,
        /// Its value; `None` means the value bound to `name`.
        value: Option<ExprId>,
    },
    /// `loss expr`
    Loss {
        /// The `loss` keyword.
        keyword: Span,
        /// The scalar to differentiate.
        value: ExprId,
    },
    /// A statement the parser could not read; already reported.
    Error,
}

/// An expression node in the arena.
#[derive(Clone, Debug)]
pub struct Expr {
    /// What it is.
    pub kind: ExprKind,
    /// Where.
    pub span: Span,
    /// 1 for a leaf, 1 + the deepest child otherwise.
    pub depth: u32,
}

/// The expression forms.
#[derive(Clone, Debug)]
pub enum ExprKind {
    /// A number; `is_int` when written without `.` or exponent.
    Number {
        /// The value.
        value: f64,
        /// Written as an integer.
        is_int: bool,
    },
    /// `true` or `false`
    Bool(bool),
    /// A string literal without its quotes.
    Str(String),
    /// A name.
    Name(String),
    /// `-x`
    Unary {
        /// The operator.
        op: UnaryOp,
        /// The operand.
        operand: ExprId,
    },
    /// `a + b` and friends.
    Binary {
        /// The operator.
        op: BinaryOp,
        /// Left operand.
        lhs: ExprId,
        /// Right operand.
        rhs: ExprId,
    },
    /// `f(a, b = c)`
    Call {
        /// The function's name.
        callee: Ident,
        /// Arguments in order.
        args: Vec<Arg>,
    },
    /// `[a, b]` or a tuple `(a, b)`
    List(Vec<ExprId>),
    /// `x[i, a:b, ...]`: indexing and slicing.
    Index {
        /// The indexed value.
        base: ExprId,
        /// One item per axis (but for `...`, which stands for the rest).
        items: Vec<IndexItem>,
    },
    /// An expression the parser could not read; already reported.
    Error,
}

/// One item of an index.
#[derive(Clone, Debug, PartialEq)]
pub enum IndexItem {
    /// `i`: one position; the axis goes.
    At(ExprId),
    /// `a:b`, `a:`, `:b` or `:`: a range of positions; the axis stays.
    Range {
        /// The first position, from 0 if absent.
        start: Option<ExprId>,
        /// One past the last, to the end if absent.
        end: Option<ExprId>,
    },
    /// `...`: every axis the other items do not index.
    Ellipsis(Span),
}

/// Unary operators.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UnaryOp {
    /// `-x`
    Neg,
}

/// Binary operators.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BinaryOp {
    /// `+`
    Add,
    /// `-`
    Sub,
    /// `*`
    Mul,
    /// `/`
    Div,
    /// `**`
    Pow,
    /// `@`
    MatMul,
    /// `<`
    Lt,
    /// `<=`
    Le,
    /// `>`
    Gt,
    /// `>=`
    Ge,
    /// `==`
    Eq,
    /// `!=`
    Ne,
}

impl BinaryOp {
    /// The operator as written.
    pub(crate) fn symbol(self) -> &'static str {
        match self {
            BinaryOp::Add => "+",
            BinaryOp::Sub => "-",
            BinaryOp::Mul => "*",
            BinaryOp::Div => "/",
            BinaryOp::Pow => "**",
            BinaryOp::MatMul => "@",
            BinaryOp::Lt => "<",
            BinaryOp::Le => "<=",
            BinaryOp::Gt => ">",
            BinaryOp::Ge => ">=",
            BinaryOp::Eq => "==",
            BinaryOp::Ne => "!=",
        }
    }
}

/// A call argument, positional or named.
#[derive(Clone, Debug, PartialEq)]
pub struct Arg {
    /// The name in `name = value`.
    pub name: Option<Ident>,
    /// The value.
    pub value: ExprId,
}
