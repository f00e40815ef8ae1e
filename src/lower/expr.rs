//! Lowering of expressions: operators, built-in calls, inlined user
//! functions and initializers, with the diagnostics each can raise.

use super::builtins::{self, Builtin, Fill, Kind};
use super::{Binding, BindingKind, Frame, Lowering, MAX_CALL_DEPTH, MAX_NODES, MAX_WORK, Value};
use crate::diagnostic::{Code, Diagnostic, Span, closest};
use crate::ir::{BinaryFn, Dim, Init, Mode, NodeId, Op, Role, Shape, Type, TypeError, UnaryFn};
use crate::syntax::ast::{Arg, BinaryOp, ExprId, ExprKind, Function, Ident, IndexItem, UnaryOp};

/// The help of `permute`'s axis errors.
const PERMUTE_HELP: &str = "`permute` lists every axis once, in its new place";

/// An operand ready for an op: its node, its source span and what the
/// user calls it in messages.
#[derive(Clone)]
struct Operand {
    value: Value,
    span: Span,
    name: &'static str,
}

impl Lowering<'_, '_> {
    /// Lowers one expression.
    pub(super) fn expr(&mut self, id: ExprId) -> Value {
        self.work += 1;
        let expr = self.ast().expr(id);
        let span = expr.span;
        match &expr.kind {
            ExprKind::Number { value, .. } => Value::Scalar(*value),
            ExprKind::Name(name) => self.lookup(name, span),
            ExprKind::Unary {
                op: UnaryOp::Neg,
                operand,
            } => {
                let operand = *operand;
                match self.expr(operand) {
                    Value::Scalar(v) => Value::Scalar(-v),
                    value => self.apply(
                        Op::Unary(UnaryFn::Neg),
                        "-",
                        vec![Operand {
                            value,
                            span: self.ast().expr(operand).span,
                            name: "operand",
                        }],
                        span,
                    ),
                }
            }
            ExprKind::Binary { op, lhs, rhs } => {
                let (op, lhs, rhs) = (*op, *lhs, *rhs);
                self.binary(op, lhs, rhs, span)
            }
            ExprKind::Call { callee, args } => self.call(callee, args, span),
            ExprKind::Index { base, items } => {
                let (base, items) = (*base, items.clone());
                self.index(base, &items, span)
            }
            ExprKind::Bool(_) | ExprKind::Str(_) | ExprKind::List(_) => {
                let what = match &expr.kind {
                    ExprKind::Bool(_) => "a boolean",
                    ExprKind::Str(_) => "a string",
                    _ => "a list",
                };
                self.report(
                    Diagnostic::error(Code::WrongArgumentKind, span, format!("{what} is not a tensor value"))
                        .with_label("a tensor is expected here")
                        .with_help("lists, strings and booleans only stand as arguments such as `axis = [0, 1]`"),
                );
                Value::Poison
            }
            ExprKind::Error => Value::Poison,
        }
    }

    /// `x[...]`, Python's indexing: an integer takes one position and
    /// drops its axis, `a:b` keeps the positions `a..b` (negative ones
    /// count from the end), `...` stands for every axis the other items
    /// leave, and trailing axes not indexed stay whole. Lowered to a
    /// `slice` per narrowed axis and a `reshape` that drops the indexed
    /// ones; every position is checked against the axis here.
    fn index(&mut self, base: ExprId, items: &[IndexItem], span: Span) -> Value {
        let value = self.expr(base);
        let Some(shape) = self.shape_of(value) else {
            return Value::Poison;
        };
        let base_span = self.ast().expr(base).span;
        let ellipses: Vec<Span> = items
            .iter()
            .filter_map(|item| match item {
                IndexItem::Ellipsis(at) => Some(*at),
                _ => None,
            })
            .collect();
        if let Some(&second) = ellipses.get(1) {
            self.report(
                Diagnostic::error(Code::IndexRange, second, "an index holds one `...` at most")
                    .with_label("a second `...`"),
            );
            return Value::Poison;
        }
        let rank = shape.rank();
        let named = items.len() - ellipses.len();
        if named > rank || items.is_empty() {
            self.report(
                Diagnostic::error(
                    Code::IndexRange,
                    span,
                    format!("{named} indices for `{shape}`, which has {rank} axes"),
                )
                .with_secondary(base_span, format!("rank {rank}"))
                .with_help("give one item per axis at most (`:` keeps an axis whole; `...` stands for the rest)"),
            );
            return Value::Poison;
        }
        let mut per_axis: Vec<Option<IndexItem>> = Vec::with_capacity(rank);
        for item in items {
            match item {
                IndexItem::Ellipsis(_) => per_axis.extend((0..rank - named).map(|_| None)),
                other => per_axis.push(Some(other.clone())),
            }
        }
        per_axis.resize(rank, None);
        let mut current = value;
        let mut current_shape = shape.clone();
        let mut kept = Vec::new();
        for (axis, item) in per_axis.iter().enumerate() {
            // (`:` keeps the axis whole, even a symbolic one.)
            let whole = IndexItem::Range {
                start: None,
                end: None,
            };
            let Some(item) = item.as_ref().filter(|&item| *item != whole) else {
                kept.push(shape.0[axis].clone());
                continue;
            };
            let Some((start, len, drop, from_end)) = self.index_item(item, &shape, axis) else {
                return Value::Poison;
            };
            if !drop {
                kept.push(Dim::Fixed(len));
            }
            if matches!(shape.0[axis], Dim::Fixed(n) if n == len) {
                continue;
            }
            current_shape.0[axis] = Dim::Fixed(len);
            let Value::Node(id) = current else {
                return Value::Poison;
            };
            let dtype = self.graph.node(id).dtype();
            let operand = Operand {
                value: current,
                span: base_span,
                name: "indexed value",
            };
            let ty = Type::new(dtype, current_shape.clone());
            current = self.apply_typed(
                Op::Slice {
                    axis,
                    start,
                    from_end,
                },
                "[]",
                vec![operand],
                span,
                Some(ty),
            );
        }
        if kept.len() == rank {
            return current;
        }
        let Value::Node(id) = current else {
            return Value::Poison;
        };
        let ty = Type::new(self.graph.node(id).dtype(), Shape(kept));
        let operand = Operand {
            value: current,
            span: base_span,
            name: "indexed value",
        };
        self.apply_typed(Op::Reshape, "[]", vec![operand], span, Some(ty))
    }

    /// One index item on `axis` of `shape`: the first position, the count
    /// of positions and whether the axis goes; `None` after reporting.
    fn index_item(
        &mut self,
        item: &IndexItem,
        shape: &Shape,
        axis: usize,
    ) -> Option<(u64, u64, bool, bool)> {
        let (item_span, exprs) = match item {
            IndexItem::At(e) => (self.ast().expr(*e).span, vec![Some(*e)]),
            IndexItem::Range { start, end } => {
                let spans: Vec<Span> = start
                    .iter()
                    .chain(end)
                    .map(|&e| self.ast().expr(e).span)
                    .collect();
                let (Some(first), Some(last)) = (spans.first(), spans.last()) else {
                    return None;
                };
                let span = Span {
                    start: first.start,
                    end: last.end,
                };
                (span, vec![*start, *end])
            }
            // (`index` expands `...` into whole axes before this.)
            IndexItem::Ellipsis(_) => return None,
        };
        if let (Dim::Sym(_), IndexItem::At(e)) = (&shape.0[axis], item) {
            // One position of a symbolic axis: checked when the model runs.
            let i = self.integer(*e, "an index")?;
            return Some(match i < 0 {
                true => ((!i) as u64, 1, true, true),
                false => (i as u64, 1, true, false),
            });
        }
        let Dim::Fixed(size) = shape.0[axis].clone() else {
            self.report(
                Diagnostic::error(
                    Code::IndexRange,
                    item_span,
                    format!("axis {axis} of `{shape}` has the symbolic size {}: a range along it has no size known before the model runs", shape.0[axis]),
                )
                .with_label("a range of positions")
                .with_help("a symbolic axis takes one position (`x[:, -1]`) or stays whole (`:`); give the axis a fixed size to slice it"),
            );
            return None;
        };
        let mut positions = Vec::new();
        for e in &exprs {
            let Some(e) = e else {
                positions.push(None);
                continue;
            };
            let i = self.integer(*e, "an index")?;
            let normalized = if i < 0 { i + size as i64 } else { i };
            let last = if matches!(item, IndexItem::At(_)) {
                size as i64 - 1
            } else {
                size as i64
            };
            if !(0..=last).contains(&normalized) {
                let span = self.ast().expr(*e).span;
                self.report(
                    Diagnostic::error(
                        Code::IndexRange,
                        span,
                        format!("index {i} is out of range for axis {axis} of `{shape}`"),
                    )
                    .with_label(format!("the axis has {size} positions"))
                    .with_help(format!(
                        "positions run from 0 to {} (or from -{size} to -1 from the end)",
                        size - 1
                    )),
                );
                return None;
            }
            positions.push(Some(normalized as u64));
        }
        match item {
            IndexItem::At(_) => Some((positions[0].unwrap_or(0), 1, true, false)),
            _ => {
                let (start, end) = (positions[0].unwrap_or(0), positions[1].unwrap_or(size));
                if start >= end {
                    self.report(
                        Diagnostic::error(
                            Code::IndexRange,
                            item_span,
                            format!("the slice {start}:{end} of axis {axis} of `{shape}` is empty"),
                        )
                        .with_label("no position in this range")
                        .with_help(
                            "a slice `a:b` takes the positions from `a` up to, not including, `b`",
                        ),
                    );
                    return None;
                }
                Some((start, end - start, false, false))
            }
        }
    }

    fn binary(&mut self, op: BinaryOp, lhs: ExprId, rhs: ExprId, span: Span) -> Value {
        let left = self.expr(lhs);
        let right = self.expr(rhs);
        if let (Value::Scalar(a), Value::Scalar(b)) = (left, right) {
            let folded = match op {
                BinaryOp::Add => Some(a + b),
                BinaryOp::Sub => Some(a - b),
                BinaryOp::Mul => Some(a * b),
                BinaryOp::Div => Some(a / b),
                BinaryOp::Pow => Some(a.powf(b)),
                BinaryOp::MatMul
                | BinaryOp::Lt
                | BinaryOp::Le
                | BinaryOp::Gt
                | BinaryOp::Ge
                | BinaryOp::Eq
                | BinaryOp::Ne => None,
            };
            if let Some(v) = folded {
                return Value::Scalar(v);
            }
        }
        let ir_op = match op {
            BinaryOp::Add => Op::Binary(BinaryFn::Add),
            BinaryOp::Sub => Op::Binary(BinaryFn::Sub),
            BinaryOp::Mul => Op::Binary(BinaryFn::Mul),
            BinaryOp::Div => Op::Binary(BinaryFn::Div),
            BinaryOp::Pow => Op::Binary(BinaryFn::Pow),
            BinaryOp::Lt => Op::Binary(BinaryFn::Less),
            BinaryOp::Le => Op::Binary(BinaryFn::LessEqual),
            BinaryOp::Gt => Op::Binary(BinaryFn::Greater),
            BinaryOp::Ge => Op::Binary(BinaryFn::GreaterEqual),
            BinaryOp::Eq => Op::Binary(BinaryFn::Equal),
            BinaryOp::Ne => Op::Binary(BinaryFn::NotEqual),
            // `[.., M, K] @ [K, N]` shares one right operand; two batched
            // operands (or more than one leading axis) broadcast theirs.
            BinaryOp::MatMul => {
                let rank = |value| self.shape_of(value).map(|s| s.rank());
                match (rank(left), rank(right)) {
                    (Some(a), Some(b)) if b >= 3 || (a > 3 && b >= 2) => Op::BatchMatMul {
                        transpose_a: false,
                        transpose_b: false,
                    },
                    _ => Op::MatMul,
                }
            }
        };
        let operands = vec![
            Operand {
                value: left,
                span: self.ast().expr(lhs).span,
                name: "left operand",
            },
            Operand {
                value: right,
                span: self.ast().expr(rhs).span,
                name: "right operand",
            },
        ];
        let comparison = matches!(&ir_op, Op::Binary(f) if f.is_comparison());
        let value = self.apply(ir_op, op.symbol(), operands, span);
        if comparison && let Value::Node(id) = value {
            self.bools.insert(id);
        }
        value
    }

    /// Whether an op takes `bool` operands: `where`'s condition, and the
    /// ops that only move or zero elements (whose result is then `bool`
    /// too).
    fn moves_elements(op: &Op) -> bool {
        matches!(
            op,
            Op::Reshape
                | Op::Slice { .. }
                | Op::Permute { .. }
                | Op::Transpose
                | Op::Concat { .. }
                | Op::Identity
                | Op::StopGradient
                | Op::Triangle { .. }
        )
    }

    /// Applies an op: gives weak scalars the dtype of the tensors they
    /// meet, types the result and reports a type error at the operands.
    /// `log(exp(x))` as `x` (an identity at the log's position) and
    /// `log(softmax(x))` as `log_softmax(x)`: the stable forms, which never
    /// take the log of an overflowed `exp` or an underflowed softmax. The
    /// rewrite happens here, before differentiation, so that the forward
    /// and the backward graphs, every backend and every pass see the same
    /// computation (a later rewrite of the forward graph alone left the
    /// backward dividing by the overflowed `exp`).
    fn stable_log(&mut self, x: &Operand, what: &str, span: Span) -> Option<Value> {
        let Value::Node(inner) = x.value else {
            return None;
        };
        let op = match self.graph.node(inner).op {
            Op::Unary(UnaryFn::Exp) => Op::Identity,
            Op::Softmax { axis } => Op::LogSoftmax { axis },
            _ => return None,
        };
        let operand = Operand {
            value: Value::Node(self.graph.operands(inner)[0]),
            span: x.span,
            name: x.name,
        };
        self.superseded.push(inner);
        Some(self.apply(op, what, vec![operand], span))
    }

    fn apply(&mut self, op: Op, what: &str, operands: Vec<Operand>, span: Span) -> Value {
        self.apply_typed(op, what, operands, span, None)
    }

    fn apply_typed(
        &mut self,
        op: Op,
        what: &str,
        operands: Vec<Operand>,
        span: Span,
        declared: Option<Type>,
    ) -> Value {
        let is_bool = |this: &Self, o: &Operand| matches!(o.value, Value::Node(id) if this.bools.contains(&id));
        let bools: Vec<usize> = (0..operands.len())
            .filter(|&i| is_bool(self, &operands[i]))
            .collect();
        let structural = Self::moves_elements(&op);
        let mask = op == Op::Select && bools == [0];
        if let Some(&i) = bools.first()
            && !structural
            && !mask
        {
            let o = &operands[i];
            let shape = self.shape_of(o.value).unwrap_or_default();
            self.report(
                Diagnostic::error(
                    Code::NotFloat,
                    o.span,
                    format!(
                        "`{what}` needs numbers, not the `bool` {} `bool{shape}`",
                        shown(o.name)
                    ),
                )
                .with_label("a comparison gives `bool`, which takes part in no arithmetic")
                .with_help("pick numbers with `where`, as `where(x > 0, 1.0, 0.0)`"),
            );
            return Value::Poison;
        }
        let all_bool = structural && !operands.is_empty() && bools.len() == operands.len();
        let value = self.apply_checked(op, what, operands, span, declared);
        if all_bool && let Value::Node(id) = value {
            self.bools.insert(id);
        }
        value
    }

    fn apply_checked(
        &mut self,
        op: Op,
        what: &str,
        operands: Vec<Operand>,
        span: Span,
        declared: Option<Type>,
    ) -> Value {
        if operands.iter().any(|o| o.value == Value::Poison) {
            return Value::Poison;
        }
        let tensor_dtype = operands
            .iter()
            .find_map(|o| match o.value {
                Value::Node(id) if self.graph.node(id).dtype().is_float() => {
                    Some(self.graph.node(id).dtype())
                }
                _ => None,
            })
            .unwrap_or(self.default_float);
        let mut ids = Vec::with_capacity(operands.len());
        for operand in &operands {
            ids.push(match operand.value {
                Value::Node(id) => id,
                Value::Scalar(v) => self.constant(v, tensor_dtype, operand.span),
                Value::Poison => return Value::Poison,
            });
        }
        let types: Vec<Type> = ids
            .iter()
            .map(|&id| self.graph.node(id).ty.clone())
            .collect();
        let refs: Vec<&Type> = types.iter().collect();
        let declared = declared.unwrap_or_else(|| Type::new(tensor_dtype, Shape::scalar()));
        match op.infer(&refs, &declared) {
            Ok(ty) => Value::Node(self.add_node(op, ty, &ids, span)),
            Err(error) => {
                self.type_error(error, &op, what, &operands, &types, span);
                Value::Poison
            }
        }
    }

    fn type_error(
        &mut self,
        error: TypeError,
        op: &Op,
        what: &str,
        operands: &[Operand],
        types: &[Type],
        span: Span,
    ) {
        let label = |i: usize| format!("{}: `{}`", shown(operands[i].name), types[i]);
        let diagnostic = match error {
            TypeError::Arity { expected, found } => Diagnostic::error(
                Code::WrongArity,
                span,
                format!("`{what}` takes {expected} operands but {found} were given"),
            ),
            TypeError::DtypeMismatch { first, operand, found } => Diagnostic::error(
                Code::DtypeMismatch,
                span,
                format!("mismatched element types in `{what}`: `{first}` and `{found}`"),
            )
            .with_secondary(operands[0].span, label(0))
            .with_secondary(operands[operand].span, label(operand))
            .with_help("declare both with the same element type, or compile the whole model with `--dtype f64`"),
            TypeError::NotFloat { operand } => Diagnostic::error(
                Code::NotFloat,
                operands[operand].span,
                format!("`{what}` needs a float {}, not `{}`", shown(operands[operand].name), types[operand]),
            )
            .with_label(label(operand))
            .with_help("`i32` values are labels and indices; declare data as `f32`"),
            TypeError::NotInteger { operand, found } => {
                let role = if *op == Op::Embedding { "indices" } else { "labels" };
                Diagnostic::error(
                    Code::NotInteger,
                    operands[operand].span,
                    format!("{role} of `{what}` must be `i32`, not `{found}`"),
                )
                .with_label(label(operand))
                .with_help(format!("declare the {role} as `i32`, for example `input y: i32[B]`"))
            }
            TypeError::Shapes { what: needed, operands: (a, b) } => Diagnostic::error(
                Code::ShapeMismatch,
                span,
                format!("shape mismatch in `{what}`: `{}` and `{}`", types[a].shape, types[b].shape),
            )
            .with_label(format!("needs {needed}"))
            .with_secondary(operands[a].span, label(a))
            .with_secondary(operands[b].span, label(b))
            .with_help(shape_help(op, &types[a].shape, &types[b].shape)),
            TypeError::Inner { left, right } => {
                let mut diagnostic = Diagnostic::error(
                    Code::MatmulMismatch,
                    span,
                    format!("matrix product of `{}` and `{}`: inner dimensions {left} and {right} differ", types[0].shape, types[1].shape),
                )
                .with_label(match op {
                    Op::BatchMatMul { .. } => "the left operand's last dimension must equal the right operand's second to last",
                    _ => "the left operand's last dimension must equal the right operand's first",
                })
                .with_secondary(operands[0].span, label(0))
                .with_secondary(operands[1].span, label(1));
                let b = &types[1].shape;
                if b.rank() >= 2 && b.0[b.rank() - 1] == left {
                    diagnostic = diagnostic.with_help("`transpose(...)` the right operand to make it fit");
                }
                diagnostic
            }
            TypeError::Rank { operand, expected, found } => Diagnostic::error(
                Code::WrongRank,
                operands[operand].span,
                format!("`{what}` needs {} of rank {expected}, not {found}", shown(operands[operand].name)),
            )
            .with_label(label(operand)),
            TypeError::Axis { axis, rank } => Diagnostic::error(
                Code::BadAxis,
                span,
                format!("axis {axis} is out of range for rank {rank}"),
            ),
            TypeError::Overflow => Diagnostic::error(Code::Overflow, span, "the element count of the result overflows")
                .with_label(format!("`{what}` makes a tensor too large to address")),
            TypeError::Count { from, to } => Diagnostic::error(
                Code::ReshapeCount,
                span,
                format!("cannot reshape `{from}` into `{to}`: the element counts differ"),
            )
            .with_label(format!("`{}` elements into `{}`", count_text(&from), count_text(&to)))
            .with_help("the product of the new dimensions must equal the old one; one dimension may be `-1`"),
        };
        self.report(diagnostic);
    }

    fn call(&mut self, callee: &Ident, args: &[Arg], span: Span) -> Value {
        let name = callee.name.as_str();
        if let Some(&function) = self.cx.functions.get(name) {
            return self.inline(function, args, span);
        }
        let Some(builtin) = Builtin::from_name(name) else {
            if self
                .reported
                .contains(&(Code::UnknownFunction, callee.span))
            {
                return Value::Poison;
            }
            let candidates = builtins::NAMES
                .iter()
                .copied()
                .chain(self.cx.functions.keys().copied());
            let mut diagnostic = Diagnostic::error(
                Code::UnknownFunction,
                callee.span,
                format!("unknown function `{name}`"),
            )
            .with_label("neither built in nor defined with `fn`");
            if let Some(near) = closest(name, candidates) {
                diagnostic = diagnostic.with_help(format!("did you mean `{near}`?"));
            }
            self.report(diagnostic);
            return Value::Poison;
        };
        let params = builtin.params();
        let slots = self.bind_args(name, params, args, span);
        let Some(slots) = slots else {
            return Value::Poison;
        };
        self.builtin(builtin, name, &slots, span)
    }

    /// Binds a call's arguments to `params` (`builtins::bind`), reporting
    /// every problem; `None` if any argument could not be placed.
    fn bind_args(
        &mut self,
        callee: &str,
        params: &[builtins::Param<'_>],
        args: &[Arg],
        span: Span,
    ) -> Option<Vec<Option<ExprId>>> {
        let mut found = Vec::new();
        let slots = builtins::bind(self.ast(), callee, params, args, span, &mut found);
        for diagnostic in found {
            self.report(diagnostic);
        }
        slots
    }

    /// A call of a user function where one value is wanted.
    fn inline(&mut self, function: &Function, args: &[Arg], span: Span) -> Value {
        if function.results.len() > 1 {
            let count = function.results.len();
            let names: Vec<String> = (0..count).map(|i| format!("r{i}")).collect();
            self.report(
                Diagnostic::error(
                    Code::ResultCount,
                    span,
                    format!(
                        "`{}` returns {count} values where one is wanted",
                        function.name.name
                    ),
                )
                .with_label("several results")
                .with_help(format!(
                    "bind them to names first: `let {} = {}(...)`",
                    names.join(", "),
                    function.name.name
                )),
            );
            return Value::Poison;
        }
        self.inline_all(function, args, span)
            .pop()
            .unwrap_or(Value::Poison)
    }

    /// Inlines a call of a user function: its results' values.
    fn inline_all(&mut self, function: &Function, args: &[Arg], span: Span) -> Vec<Value> {
        let poison = || vec![Value::Poison; function.results.len()];
        let name = function.name.name.clone();
        if self.cx.recursive.contains(&name) || self.too_many_nodes {
            return poison();
        }
        if self.graph.len() > MAX_NODES || self.work > MAX_WORK {
            self.too_many_nodes = true;
            self.report(
                Diagnostic::error(
                    Code::TooManyNodes,
                    span,
                    format!("inlining expands the model past the limit of {MAX_NODES} nodes or {MAX_WORK} expressions"),
                )
                .with_label("inlining stopped at this call")
                .with_help("functions are inlined at every call; a function that calls another twice doubles the graph at each level"),
            );
            return poison();
        }
        if self.calls.len() >= MAX_CALL_DEPTH {
            self.report(
                Diagnostic::error(
                    Code::TooDeep,
                    span,
                    format!("function calls nest deeper than {MAX_CALL_DEPTH} levels"),
                )
                .with_label("this call is too deep"),
            );
            return poison();
        }
        let params: Vec<builtins::Param> = function
            .params
            .iter()
            .map(|p| builtins::Param {
                name: p.name.as_str(),
                kind: Kind::Tensor,
                optional: false,
            })
            .collect();
        let slots = self.bind_args(&name, &params, args, span);
        let Some(slots) = slots else {
            return poison();
        };
        let values: Vec<Value> = slots
            .iter()
            .map(|slot| slot.map_or(Value::Poison, |e| self.expr(e)))
            .collect();
        self.inline_values(function, values, span)
    }

    /// Lowers a user function's body with its parameters bound to
    /// `values` (one per parameter): its results' values.
    pub(super) fn inline_values(
        &mut self,
        function: &Function,
        values: Vec<Value>,
        span: Span,
    ) -> Vec<Value> {
        let name = function.name.name.clone();
        let mut frame = Frame::default();
        super::collect_defined(&function.body, &mut frame.defined);
        for (param, value) in function.params.iter().zip(values) {
            frame.bindings.insert(
                param.name.clone(),
                Binding {
                    value,
                    span: param.span,
                    kind: BindingKind::FunctionParam,
                    used: true,
                },
            );
        }
        self.frames.push(frame);
        self.calls.push((span, name));
        self.stmts(&function.body, true);
        let results = function
            .results
            .iter()
            .map(|&result| self.expr_checked(result))
            .collect();
        self.calls.pop();
        self.frames.pop();
        results
    }

    /// The values of `let a, b = f(...)`: a call of a function with as many
    /// results as names (else an error, and poison for every name).
    pub(super) fn results_of(&mut self, value: ExprId, names: &[Ident]) -> Vec<Value> {
        let expr = self.ast().expr(value);
        let span = expr.span;
        let poison = vec![Value::Poison; names.len()];
        if let ExprKind::Call { callee, args } = &expr.kind
            && callee.name == "scan"
            && !self.cx.functions.contains_key("scan")
        {
            let params = Builtin::Scan.params();
            let slots = self.bind_args("scan", params, args, span);
            let Some(values) = slots.and_then(|slots| self.scan(&slots, span)) else {
                return poison;
            };
            if values.len() != names.len() {
                self.report(
                    Diagnostic::error(
                        Code::ResultCount,
                        span,
                        format!(
                            "this `scan` gives {} value{} but {} names are bound",
                            values.len(),
                            if values.len() == 1 { "" } else { "s" },
                            names.len()
                        ),
                    )
                    .with_label("one stacked value per value the step returns")
                    .with_help("bind one name per value the step function returns"),
                );
                return poison;
            }
            return values;
        }
        let function = match &expr.kind {
            ExprKind::Call { callee, args } => self
                .cx
                .functions
                .get(callee.name.as_str())
                .map(|&f| (f, args.clone())),
            _ => None,
        };
        let Some((function, args)) = function else {
            // (Lowered anyway, so its own errors are reported.)
            self.expr(value);
            self.report(
                Diagnostic::error(
                    Code::ResultCount,
                    span,
                    format!("{} names are bound to one value", names.len()),
                )
                .with_label("this gives one value")
                .with_help("several names take the results of a function that returns several values, as `let h, c = cell(x, h, c)` of `fn cell(...) { ... return h, c }`"),
            );
            return poison;
        };
        let count = function.results.len();
        if count != names.len() {
            let spans: Vec<Span> = function
                .results
                .iter()
                .map(|&r| self.ast().expr(r).span)
                .collect();
            let returned = spans.first().zip(spans.last()).map(|(a, b)| a.to(*b));
            let mut diagnostic = Diagnostic::error(
                Code::ResultCount,
                span,
                format!(
                    "`{}` returns {count} value{} but {} names are bound",
                    function.name.name,
                    if count == 1 { "" } else { "s" },
                    names.len()
                ),
            )
            .with_label(format!(
                "{count} result{}",
                if count == 1 { "" } else { "s" }
            ));
            if let Some(returned) = returned {
                diagnostic = diagnostic.with_secondary(returned, "returned here");
            }
            self.report(diagnostic.with_help("bind one name per returned value"));
            return poison;
        }
        self.inline_all(function, &args, span)
    }

    fn builtin(
        &mut self,
        builtin: Builtin,
        name: &str,
        slots: &[Option<ExprId>],
        span: Span,
    ) -> Value {
        let params = builtin.params();
        let tensor = |this: &mut Self, i: usize| -> Operand {
            let expr = slots[i].expect("bind fills required slots");
            Operand {
                value: this.expr(expr),
                span: this.ast().expr(expr).span,
                name: params[i].name,
            }
        };
        match builtin {
            Builtin::Scan => match self.scan(slots, span) {
                Some(values) if values.len() == 1 => values[0],
                Some(values) => {
                    let names: Vec<String> = (0..values.len()).map(|i| format!("r{i}")).collect();
                    self.report(
                        Diagnostic::error(
                            Code::ResultCount,
                            span,
                            format!(
                                "this `scan` gives {} values where one is wanted",
                                values.len()
                            ),
                        )
                        .with_label("one stacked value per value the step returns")
                        .with_help(format!(
                            "bind them to names first: `let {} = scan(...)`",
                            names.join(", ")
                        )),
                    );
                    Value::Poison
                }
                None => Value::Poison,
            },
            Builtin::Unary(f) => {
                let x = tensor(self, 0);
                if f == UnaryFn::Log
                    && let Some(stable) = self.stable_log(&x, name, span)
                {
                    return stable;
                }
                self.apply(Op::Unary(f), name, vec![x], span)
            }
            Builtin::Grad => {
                let e = slots[0].expect("bind fills required slots");
                let x = slots[1].expect("bind fills required slots");
                self.grad(e, x, span)
            }
            Builtin::StopGradient => {
                let x = tensor(self, 0);
                self.apply(Op::StopGradient, name, vec![x], span)
            }
            Builtin::Transpose => {
                let x = tensor(self, 0);
                if slots[1].is_none() && slots[2].is_none() {
                    return self.apply(Op::Transpose, name, vec![x], span);
                }
                let Some(shape) = self.shape_of(x.value) else {
                    return Value::Poison;
                };
                let (Some(a), Some(b)) = (slots[1], slots[2]) else {
                    self.report(
                        Diagnostic::error(
                            Code::MissingArgument,
                            span,
                            "`transpose` swaps two axes: give both or neither",
                        )
                        .with_label("one axis given")
                        .with_help("`transpose(x)` swaps the last two axes, `transpose(x, 1, 2)` axes 1 and 2"),
                    );
                    return Value::Poison;
                };
                let (Some(a), Some(b)) = (self.axis(a, &shape), self.axis(b, &shape)) else {
                    return Value::Poison;
                };
                let mut axes: Vec<usize> = (0..shape.rank()).collect();
                axes.swap(a, b);
                self.apply(Op::Permute { axes }, name, vec![x], span)
            }
            Builtin::Arange => {
                let slot = slots[0].expect("bind fills required slots");
                let at = self.ast().expr(slot).span;
                // A symbolic dimension (`arange(T)`): its size at run time.
                if let ExprKind::Name(dim) = &self.ast().expr(slot).kind
                    && self.symbols.contains(dim)
                {
                    let shape = Shape(vec![Dim::Sym(dim.clone())]);
                    let ty = Type::new(self.default_float, shape);
                    return self.apply_typed(Op::Iota, name, Vec::new(), span, Some(ty));
                }
                let n = self.number(slots[0], name, "n");
                let Some(n) = n else {
                    return Value::Poison;
                };
                if n.fract() != 0.0 || !(1.0..=1e9).contains(&n) {
                    self.report(
                        Diagnostic::error(
                            Code::WrongArgumentKind,
                            at,
                            format!("`arange` needs a whole count of at least 1, not {n}"),
                        )
                        .with_label("not a count")
                        .with_help("`arange(n)` is `0, 1, ..., n - 1`; `n` may be a symbolic dimension such as `T`"),
                    );
                    return Value::Poison;
                }
                let ty = Type::new(self.default_float, Shape(vec![Dim::Fixed(n as u64)]));
                self.apply_typed(Op::Iota, name, Vec::new(), span, Some(ty))
            }
            Builtin::Where | Builtin::MaskedFill => {
                // `masked_fill(x, mask, v)` is `where(mask, v, x)`.
                let fill = builtin == Builtin::MaskedFill;
                let c = tensor(self, usize::from(fill));
                let is_bool = matches!(c.value, Value::Node(id) if self.bools.contains(&id));
                if !is_bool && c.value != Value::Poison {
                    let shown_type = match c.value {
                        Value::Node(id) => self.graph.node(id).ty.to_string(),
                        _ => "a number".into(),
                    };
                    self.report(
                        Diagnostic::error(
                            Code::WrongArgumentKind,
                            c.span,
                            format!("the {} of `{name}` must be a `bool`, not `{shown_type}`", if fill { "mask" } else { "condition" }),
                        )
                        .with_label("not a comparison")
                        .with_help("compare to make a `bool`, as `where(x > 0, x, 0.0)` or `where(mask == 1, s, -1e9)`"),
                    );
                    return Value::Poison;
                }
                let (a, b) = if fill {
                    let Some(value) = self.number(slots[2], name, "value") else {
                        return Value::Poison;
                    };
                    let value = Operand {
                        value: Value::Scalar(value),
                        span: self
                            .ast()
                            .expr(slots[2].expect("bind fills required slots"))
                            .span,
                        name: "value",
                    };
                    (value, tensor(self, 0))
                } else {
                    (tensor(self, 1), tensor(self, 2))
                };
                self.apply(Op::Select, name, vec![c, a, b], span)
            }
            Builtin::Triangle(upper) => {
                let x = tensor(self, 0);
                let k = match slots[1] {
                    None => Some(0.0),
                    Some(_) => self.number(slots[1], name, "k"),
                };
                let Some(k) = k else {
                    return Value::Poison;
                };
                if k.fract() != 0.0 || k.abs() > 1e15 {
                    let at = self.ast().expr(slots[1].expect("given")).span;
                    self.report(
                        Diagnostic::error(
                            Code::WrongArgumentKind,
                            at,
                            format!("`k` of `{name}` must be an integer"),
                        )
                        .with_label("not an integer"),
                    );
                    return Value::Poison;
                }
                self.apply(Op::Triangle { k: k as i64, upper }, name, vec![x], span)
            }
            Builtin::Full(fill) => {
                let value = match fill {
                    Fill::Zeros => Some(0.0),
                    Fill::Ones => Some(1.0),
                    Fill::Given => self.number(slots[1], name, "value"),
                };
                let Some(value) = value else {
                    return Value::Poison;
                };
                let Some(shape) = self.dims(
                    slots[0].expect("bind fills required slots"),
                    &Shape::scalar(),
                    span,
                ) else {
                    return Value::Poison;
                };
                let constant = Operand {
                    value: Value::Scalar(value),
                    span,
                    name: "value",
                };
                let ty = Type::new(self.default_float, shape);
                self.apply_typed(Op::Expand, name, vec![constant], span, Some(ty))
            }
            Builtin::Permute => {
                let x = tensor(self, 0);
                let Some(shape) = self.shape_of(x.value) else {
                    return Value::Poison;
                };
                let Some(axes) =
                    self.permutation(slots[1].expect("bind fills required slots"), &shape, span)
                else {
                    return Value::Poison;
                };
                self.apply(Op::Permute { axes }, name, vec![x], span)
            }
            Builtin::LeakyRelu => {
                let x = tensor(self, 0);
                let Some(slope) = self.number_or(slots[1], 0.01, name, "slope") else {
                    return Value::Poison;
                };
                self.apply(Op::LeakyRelu { slope }, name, vec![x], span)
            }
            Builtin::Maximum | Builtin::Minimum => {
                let (a, b) = (tensor(self, 0), tensor(self, 1));
                let f = if builtin == Builtin::Maximum {
                    BinaryFn::Maximum
                } else {
                    BinaryFn::Minimum
                };
                self.apply(Op::Binary(f), name, vec![a, b], span)
            }
            Builtin::Clamp => {
                let x = tensor(self, 0);
                let lo = self.number(slots[1], name, "lo");
                let hi = self.number(slots[2], name, "hi");
                let (Some(lo), Some(hi)) = (lo, hi) else {
                    return Value::Poison;
                };
                if lo > hi {
                    self.report(
                        Diagnostic::error(
                            Code::WrongArgumentKind,
                            span,
                            format!("`clamp` bounds are reversed: {lo} > {hi}"),
                        )
                        .with_label("`lo` must not exceed `hi`"),
                    );
                    return Value::Poison;
                }
                self.apply(Op::Clamp { lo, hi }, name, vec![x], span)
            }
            Builtin::Reduce(func) => {
                let x = tensor(self, 0);
                let Some(shape) = self.shape_of(x.value) else {
                    return Value::Poison;
                };
                let axes = match slots[1] {
                    None => Some((0..shape.rank()).collect()),
                    Some(expr) => self.axes(expr, &shape),
                };
                let keepdims = match slots[2] {
                    None => Some(false),
                    Some(expr) => self.boolean(expr, name, "keepdims"),
                };
                let (Some(axes), Some(keepdims)) = (axes, keepdims) else {
                    return Value::Poison;
                };
                self.apply(
                    Op::Reduce {
                        func,
                        axes,
                        keepdims,
                    },
                    name,
                    vec![x],
                    span,
                )
            }
            Builtin::Softmax | Builtin::LogSoftmax => {
                let x = tensor(self, 0);
                let Some(shape) = self.shape_of(x.value) else {
                    return Value::Poison;
                };
                let axis = match slots[1] {
                    None if shape.rank() > 0 => Some(shape.rank() - 1),
                    None => {
                        self.report(
                            Diagnostic::error(
                                Code::WrongRank,
                                x.span,
                                format!("`{name}` needs at least one axis"),
                            )
                            .with_label("this is a scalar"),
                        );
                        None
                    }
                    Some(expr) => self.axis(expr, &shape),
                };
                let Some(axis) = axis else {
                    return Value::Poison;
                };
                let op = if builtin == Builtin::Softmax {
                    Op::Softmax { axis }
                } else {
                    Op::LogSoftmax { axis }
                };
                self.apply(op, name, vec![x], span)
            }
            Builtin::Reshape => {
                let x = tensor(self, 0);
                let Some(shape) = self.shape_of(x.value) else {
                    return Value::Poison;
                };
                let Some(target) =
                    self.dims(slots[1].expect("bind fills required slots"), &shape, span)
                else {
                    return Value::Poison;
                };
                let dtype = match x.value {
                    Value::Node(id) => self.graph.node(id).dtype(),
                    _ => self.default_float,
                };
                self.apply_typed(
                    Op::Reshape,
                    name,
                    vec![x],
                    span,
                    Some(Type::new(dtype, target)),
                )
            }
            Builtin::Concat | Builtin::Stack => {
                let list = slots[0].expect("bind fills required slots");
                let list_expr = self.ast().expr(list);
                let ExprKind::List(items) = &list_expr.kind else {
                    self.report(
                        Diagnostic::error(
                            Code::WrongArgumentKind,
                            list_expr.span,
                            format!("`{name}` takes a list of tensors"),
                        )
                        .with_label("not a list")
                        .with_help(format!("write `{name}([a, b], axis = 1)`")),
                    );
                    return Value::Poison;
                };
                if items.is_empty() {
                    self.report(
                        Diagnostic::error(
                            Code::WrongArgumentKind,
                            list_expr.span,
                            format!("`{name}` of an empty list"),
                        )
                        .with_label("needs at least one tensor"),
                    );
                    return Value::Poison;
                }
                let items = items.clone();
                let operands: Vec<Operand> = items
                    .iter()
                    .map(|&e| Operand {
                        value: self.expr(e),
                        span: self.ast().expr(e).span,
                        name: "operand",
                    })
                    .collect();
                let Some(mut shape) = self.shape_of(operands[0].value) else {
                    return Value::Poison;
                };
                // `stack` joins along a new axis: its axis counts in the
                // result's rank.
                let stacking = builtin == Builtin::Stack;
                if stacking {
                    shape.0.push(Dim::Fixed(1));
                }
                let axis = match slots[1] {
                    None if shape.rank() > 0 => Some(0),
                    None => None,
                    Some(expr) => self.axis(expr, &shape),
                };
                let Some(axis) = axis else {
                    if slots[1].is_none() {
                        self.report(
                            Diagnostic::error(
                                Code::WrongRank,
                                operands[0].span,
                                "`concat` needs tensors of rank 1 or more",
                            )
                            .with_label("this is a scalar"),
                        );
                    }
                    return Value::Poison;
                };
                let operands = match stacking {
                    false => operands,
                    true => operands
                        .into_iter()
                        .map(|o| {
                            let Value::Node(id) = o.value else {
                                return o;
                            };
                            let mut ty = self.graph.node(id).ty.clone();
                            ty.shape.0.insert(axis, Dim::Fixed(1));
                            let value = self.apply_typed(
                                Op::Reshape,
                                name,
                                vec![o.clone()],
                                o.span,
                                Some(ty),
                            );
                            Operand { value, ..o }
                        })
                        .collect(),
                };
                self.apply(Op::Concat { axis }, name, operands, span)
            }
            Builtin::Dropout => {
                let x = tensor(self, 0);
                let Some(p) = self.number(slots[1], name, "p") else {
                    return Value::Poison;
                };
                if !(0.0..1.0).contains(&p) {
                    let at = self.ast().expr(slots[1].expect("required")).span;
                    self.report(
                        Diagnostic::error(Code::DropoutProbability, at, format!("dropout probability {p} is outside [0, 1)"))
                            .with_label("must be at least 0 and below 1")
                            .with_help("`p` is the probability of zeroing an element, as in `torch.nn.Dropout(p)`"),
                    );
                    return Value::Poison;
                }
                match self.mode {
                    // Dropout is the identity in eval mode: no node at all.
                    Mode::Eval => x.value,
                    Mode::Train => {
                        let key = self.dropouts;
                        self.dropouts += 1;
                        self.apply(Op::Dropout { p, key }, name, vec![x], span)
                    }
                }
            }
            Builtin::BatchNorm => {
                let operands: Vec<Operand> = (0..5).map(|i| tensor(self, i)).collect();
                let eps = self.number_or(slots[5], 1e-5, name, "eps");
                let momentum = self.number_or(slots[6], 0.1, name, "momentum");
                let (Some(eps), Some(momentum)) = (eps, momentum) else {
                    return Value::Poison;
                };
                for operand in &operands[3..] {
                    if let Value::Node(id) = operand.value
                        && self.graph.node(id).role != Role::Buffer
                    {
                        let what = operand.name;
                        self.report(
                            Diagnostic::error(
                                Code::NotABuffer,
                                operand.span,
                                format!("`{what}` of `batch_norm` must be a `buffer`"),
                            )
                            .with_label("not a buffer")
                            .with_help(format!(
                                "declare it as `buffer {what}: f32[C] = {}`",
                                if what == "running_var" {
                                    "ones"
                                } else {
                                    "zeros"
                                }
                            )),
                        );
                        return Value::Poison;
                    }
                }
                let training = self.mode == Mode::Train;
                self.apply(
                    Op::BatchNorm {
                        eps,
                        momentum,
                        training,
                    },
                    name,
                    operands,
                    span,
                )
            }
            Builtin::LayerNorm => {
                let operands: Vec<Operand> = (0..3).map(|i| tensor(self, i)).collect();
                let Some(eps) = self.number_or(slots[3], 1e-5, name, "eps") else {
                    return Value::Poison;
                };
                self.apply(Op::LayerNorm { eps }, name, operands, span)
            }
            Builtin::Embedding | Builtin::CrossEntropy | Builtin::Mse | Builtin::BceWithLogits => {
                let operands = vec![tensor(self, 0), tensor(self, 1)];
                let op = match builtin {
                    Builtin::Embedding => Op::Embedding,
                    Builtin::CrossEntropy => Op::CrossEntropy,
                    Builtin::Mse => Op::Mse,
                    _ => Op::BceWithLogits,
                };
                self.apply(op, name, operands, span)
            }
        }
    }

    /// `grad(e, x)`: adds the nodes that compute d(e)/d(x) to the graph.
    /// Every derivative rule emits forward ops, so the loss (or another
    /// `grad`) can differentiate them again.
    fn grad(&mut self, e_expr: ExprId, x_expr: ExprId, span: Span) -> Value {
        let e = self.expr(e_expr);
        let e_span = self.ast().expr(e_expr).span;
        let x_span = self.ast().expr(x_expr).span;
        let ExprKind::Name(x_name) = &self.ast().expr(x_expr).kind else {
            self.expr(x_expr);
            self.report(
                Diagnostic::error(
                    Code::GradTarget,
                    x_span,
                    "`grad` differentiates with respect to a named value",
                )
                .with_label("an expression, not a name")
                .with_help("bind it first (`let h = ...`) and write `grad(e, h)`; `h` may be an input, a param or a `let` value"),
            );
            return Value::Poison;
        };
        let x = match self.lookup(x_name, x_span) {
            Value::Node(x) => x,
            Value::Poison => return Value::Poison,
            Value::Scalar(_) => {
                self.report(
                    Diagnostic::error(
                        Code::GradTarget,
                        x_span,
                        format!("`{x_name}` is a number, not a tensor value"),
                    )
                    .with_label("a constant has no gradient")
                    .with_help("differentiate with respect to an input, a param or a `let` value computed from them"),
                );
                return Value::Poison;
            }
        };
        let x_type = self.graph.node(x).ty.clone();
        if !x_type.dtype.is_float() {
            self.report(
                Diagnostic::error(
                    Code::GradTarget,
                    x_span,
                    format!("`{x_name}` is `{x_type}`: only float values have gradients"),
                )
                .with_label("integer values (labels, indices) are not differentiable")
                .with_help("differentiate with respect to a float value, such as the embedding table or the logits"),
            );
            return Value::Poison;
        }
        let e = match e {
            Value::Node(e) => e,
            Value::Poison => return Value::Poison,
            // A constant: its gradient is zero.
            Value::Scalar(_) => return self.zero_gradient(x, x_name, e_span, span),
        };
        let e_type = self.graph.node(e).ty.clone();
        if !e_type.dtype.is_float() || !e_type.shape.is_scalar() {
            self.report(
                Diagnostic::error(
                    Code::GradTarget,
                    e_span,
                    format!("`grad` needs a float scalar to differentiate, not `{e_type}`"),
                )
                .with_label("not a scalar")
                .with_help("reduce it first, as a loss is: `sum(...)` or `mean(...)`"),
            );
            return Value::Poison;
        }
        let before: std::collections::BTreeSet<NodeId> = self.graph.ids().into_iter().collect();
        let wanted = std::collections::BTreeSet::from([x]);
        let gradient = match crate::autodiff::gradients(&mut self.graph, e, &wanted) {
            Ok(map) => map.get(&x).copied(),
            Err(error) => {
                self.report(
                    Diagnostic::error(Code::GradTarget, span, format!("cannot build this gradient: {error}"))
                        .with_label("this gradient")
                        .with_help("every op has a derivative rule, so this is a compiler bug: please report it with this model"),
                );
                return Value::Poison;
            }
        };
        // The gradient is computed where `grad` stands: inside a `no_grad`
        // block it is a constant to the backward pass too.
        let no_grad = self.origin(span).no_grad;
        for id in self.graph.ids() {
            if !before.contains(&id) {
                self.graph.node_mut(id).origin.no_grad = no_grad;
            }
        }
        if self.graph.len() > MAX_NODES && !self.too_many_nodes {
            self.too_many_nodes = true;
            self.report(
                Diagnostic::error(
                    Code::TooManyNodes,
                    span,
                    format!("gradients expand the model past the limit of {MAX_NODES} nodes"),
                )
                .with_label("this gradient"),
            );
            return Value::Poison;
        }
        let value = match gradient {
            Some(gradient) => gradient,
            None => match self.zero_gradient(x, x_name, e_span, span) {
                Value::Node(zeros) => zeros,
                other => return other,
            },
        };
        let origin = self.origin(span);
        let text = &self.cx.source[span.start as usize..span.end as usize];
        let label = format!(
            "{} @{}:{}",
            crate::diagnostic::shorten(text, 60),
            origin.line,
            origin.col
        );
        self.graph.grad_calls.push(crate::ir::GradCall {
            value,
            of: e,
            wrt: x,
            label,
            span,
        });
        Value::Node(value)
    }

    /// The zeros a `grad(e, x)` is when `e` does not depend on `x` (as
    /// `jax.grad` returns them), with warning W0003.
    fn zero_gradient(&mut self, x: NodeId, x_name: &str, e_span: Span, span: Span) -> Value {
        self.report(
            Diagnostic::warning(
                Code::ZeroGradient,
                e_span,
                format!("this does not depend on `{x_name}`: its gradient is zero everywhere"),
            )
            .with_label(format!("no differentiable path from `{x_name}` to this value"))
            .with_help("`stop_gradient`, `no_grad` and integer values carry no gradient; check that this is the value you meant"),
        );
        let ty = self.graph.node(x).ty.clone();
        let zero = self.constant(0.0, ty.dtype, span);
        if ty.shape.is_scalar() {
            return Value::Node(zero);
        }
        Value::Node(self.add_node(Op::Expand, ty, &[zero], span))
    }

    fn shape_of(&self, value: Value) -> Option<Shape> {
        match value {
            Value::Node(id) => Some(self.graph.node(id).shape().clone()),
            Value::Scalar(_) => Some(Shape::scalar()),
            Value::Poison => None,
        }
    }

    /// A compile-time number for parameter `param` of `callee`.
    fn number(&mut self, slot: Option<ExprId>, callee: &str, param: &str) -> Option<f64> {
        let expr = slot?;
        let span = self.ast().expr(expr).span;
        match self.expr(expr) {
            Value::Scalar(v) => Some(v),
            Value::Poison => None,
            Value::Node(_) => {
                self.report(
                    Diagnostic::error(
                        Code::WrongArgumentKind,
                        span,
                        format!("`{param}` of `{callee}` must be a number"),
                    )
                    .with_label("this is a tensor")
                    .with_help("write a number literal here"),
                );
                None
            }
        }
    }

    fn number_or(
        &mut self,
        slot: Option<ExprId>,
        default: f64,
        callee: &str,
        param: &str,
    ) -> Option<f64> {
        match slot {
            None => Some(default),
            Some(_) => self.number(slot, callee, param),
        }
    }

    pub(super) fn boolean(&mut self, expr: ExprId, callee: &str, param: &str) -> Option<bool> {
        let e = self.ast().expr(expr);
        match e.kind {
            ExprKind::Bool(b) => Some(b),
            _ => {
                let span = e.span;
                self.report(
                    Diagnostic::error(
                        Code::WrongArgumentKind,
                        span,
                        format!("`{param}` of `{callee}` must be `true` or `false`"),
                    )
                    .with_label("not a boolean"),
                );
                None
            }
        }
    }

    /// An integer known at compile time.
    fn integer(&mut self, expr: ExprId, what: &str) -> Option<i64> {
        let span = self.ast().expr(expr).span;
        match self.expr(expr) {
            Value::Scalar(v) if v.fract() == 0.0 && v.abs() < 1e15 => Some(v as i64),
            Value::Poison => None,
            _ => {
                self.report(
                    Diagnostic::error(
                        Code::WrongArgumentKind,
                        span,
                        format!("{what} must be an integer"),
                    )
                    .with_label("not an integer"),
                );
                None
            }
        }
    }

    pub(super) fn axis(&mut self, expr: ExprId, shape: &Shape) -> Option<usize> {
        let span = self.ast().expr(expr).span;
        let axis = self.integer(expr, "an axis")?;
        match shape.axis(axis) {
            Some(axis) => Some(axis),
            None => {
                let rank = shape.rank();
                let help = if rank == 0 {
                    "a scalar has no axes".to_string()
                } else {
                    format!(
                        "axes of a rank-{rank} tensor run from {} to {}",
                        -(rank as i64),
                        rank - 1
                    )
                };
                self.report(
                    Diagnostic::error(
                        Code::BadAxis,
                        span,
                        format!("axis {axis} is out of range for `{shape}`"),
                    )
                    .with_label(format!("the operand has rank {rank}"))
                    .with_help(help),
                );
                None
            }
        }
    }

    /// A `permute`'s axes: every axis of `shape` once, in the new order.
    fn permutation(&mut self, expr: ExprId, shape: &Shape, call: Span) -> Option<Vec<usize>> {
        let e = self.ast().expr(expr);
        let span = e.span;
        let ExprKind::List(items) = &e.kind else {
            self.report(
                Diagnostic::error(
                    Code::WrongArgumentKind,
                    span,
                    "the axes of `permute` must be a list",
                )
                .with_label("not a list")
                .with_help("write the new order of every axis, as `permute(x, [0, 2, 1, 3])`"),
            );
            return None;
        };
        let items = items.clone();
        let axes = self.distinct_axes(&items, shape, Some(PERMUTE_HELP))?;
        if axes.len() != shape.rank() {
            let missing: Vec<String> = (0..shape.rank())
                .filter(|a| !axes.contains(a))
                .map(|a| a.to_string())
                .collect();
            self.report(
                Diagnostic::error(
                    Code::BadAxis,
                    call,
                    format!(
                        "`permute` of `{shape}` lists {} of its {} axes",
                        axes.len(),
                        shape.rank()
                    ),
                )
                .with_secondary(span, format!("axis {} missing", missing.join(", ")))
                .with_help(PERMUTE_HELP),
            );
            return None;
        }
        Some(axes)
    }

    fn axes(&mut self, expr: ExprId, shape: &Shape) -> Option<Vec<usize>> {
        let e = self.ast().expr(expr);
        let items = match &e.kind {
            ExprKind::List(items) => items.clone(),
            _ => vec![expr],
        };
        let mut axes = self.distinct_axes(&items, shape, None)?;
        axes.sort_unstable();
        Some(axes)
    }

    /// The axes `items` name, in order, each normalized against `shape`;
    /// one listed twice is an error (with `help`, if given).
    fn distinct_axes(
        &mut self,
        items: &[ExprId],
        shape: &Shape,
        help: Option<&str>,
    ) -> Option<Vec<usize>> {
        let mut axes = Vec::new();
        for &item in items {
            let axis = self.axis(item, shape)?;
            if axes.contains(&axis) {
                let span = self.ast().expr(item).span;
                let mut diagnostic =
                    Diagnostic::error(Code::BadAxis, span, format!("axis {axis} is listed twice"))
                        .with_label("repeated axis");
                if let Some(help) = help {
                    diagnostic = diagnostic.with_help(help);
                }
                self.report(diagnostic);
                return None;
            }
            axes.push(axis);
        }
        Some(axes)
    }

    /// The target shape of a reshape: integers, symbols and at most one
    /// `-1`, which is inferred from the element count of `from`.
    fn dims(&mut self, expr: ExprId, from: &Shape, call: Span) -> Option<Shape> {
        let e = self.ast().expr(expr);
        let ExprKind::List(items) = &e.kind else {
            let span = e.span;
            self.report(
                Diagnostic::error(
                    Code::WrongArgumentKind,
                    span,
                    "`shape` of `reshape` must be a list of dimensions",
                )
                .with_label("not a list")
                .with_help("write `reshape(x, [B, 8, 8])`"),
            );
            return None;
        };
        let items = items.clone();
        let mut dims: Vec<Option<Dim>> = Vec::new();
        let mut inferred: Option<Span> = None;
        for item in items {
            let e = self.ast().expr(item);
            let span = e.span;
            if let ExprKind::Name(name) = &e.kind {
                if self.symbols.contains(name) {
                    dims.push(Some(Dim::Sym(name.clone())));
                    continue;
                }
                let name = name.clone();
                let near =
                    closest(&name, self.symbols.iter().map(String::as_str)).map(str::to_string);
                let mut diagnostic = Diagnostic::error(
                    Code::UnknownDimension,
                    span,
                    format!("unknown dimension `{name}`"),
                )
                .with_label("no input declares this symbolic dimension");
                diagnostic = match near {
                    Some(near) => diagnostic.with_help(format!("did you mean `{near}`?")),
                    None => diagnostic.with_help(
                        "symbolic dimensions come from `input` declarations such as `f32[B, 64]`",
                    ),
                };
                self.report(diagnostic);
                return None;
            }
            let n = self.integer(item, "a dimension")?;
            match n {
                -1 if inferred.is_none() => {
                    inferred = Some(span);
                    dims.push(None);
                }
                -1 => {
                    self.report(
                        Diagnostic::error(
                            Code::ReshapeCount,
                            span,
                            "only one dimension can be `-1`",
                        )
                        .with_label("second `-1`")
                        .with_secondary(inferred.unwrap_or(span), "first `-1`"),
                    );
                    return None;
                }
                n if n >= 1 => dims.push(Some(Dim::Fixed(n as u64))),
                _ => {
                    self.report(
                        Diagnostic::error(
                            Code::ReshapeCount,
                            span,
                            format!("dimension {n} is not a size"),
                        )
                        .with_label("sizes are at least 1, or `-1` to infer one"),
                    );
                    return None;
                }
            }
        }
        let known = Shape(dims.iter().flatten().cloned().collect());
        let Some(known_count) = known.element_count() else {
            self.report(Diagnostic::error(
                Code::Overflow,
                call,
                "the element count of the reshape target overflows",
            ));
            return None;
        };
        let Some(position) = dims.iter().position(Option::is_none) else {
            return Some(known);
        };
        // Infer the `-1`: the input's symbols must include the target's,
        // and what is left over must be one symbol or a fixed factor.
        let (from_fixed, mut from_symbols) = from.element_count()?;
        for symbol in &known_count.1 {
            match from_symbols.iter().position(|s| s == symbol) {
                Some(i) => {
                    from_symbols.remove(i);
                }
                None => from_symbols.push(format!("?{symbol}")),
            }
        }
        let dim = match from_symbols.as_slice() {
            [] if known_count.0 > 0 && from_fixed % known_count.0 == 0 => {
                Some(Dim::Fixed(from_fixed / known_count.0))
            }
            [symbol] if !symbol.starts_with('?') && from_fixed == known_count.0 => {
                Some(Dim::Sym(symbol.clone()))
            }
            _ => None,
        };
        let Some(dim) = dim else {
            self.report(
                Diagnostic::error(
                    Code::ReshapeCount,
                    inferred.unwrap_or(call),
                    format!("cannot infer `-1` when reshaping `{from}`"),
                )
                .with_label(format!(
                    "`{}` elements do not divide into `{}` and one more dimension",
                    count_text(from),
                    count_text(&known)
                ))
                .with_help("write every dimension explicitly"),
            );
            return None;
        };
        dims[position] = Some(dim);
        Some(Shape(dims.into_iter().flatten().collect()))
    }

    /// Checks an initializer expression against the param's type.
    pub(super) fn initializer(&mut self, expr: ExprId, ty: &Type) -> Option<Init> {
        const INITS: &[&str] = &[
            "zeros",
            "ones",
            "constant",
            "normal",
            "uniform",
            "xavier_normal",
            "xavier_uniform",
            "kaiming_normal",
            "kaiming_uniform",
        ];
        let e = self.ast().expr(expr);
        let span = e.span;
        let (name, args): (String, Vec<Arg>) = match &e.kind {
            ExprKind::Name(name) => (name.clone(), Vec::new()),
            ExprKind::Call { callee, args } => (callee.name.clone(), args.clone()),
            ExprKind::Number { value, .. } => return Some(Init::Constant(*value)),
            _ => {
                self.report(
                    Diagnostic::error(Code::UnknownInitializer, span, "this is not an initializer")
                        .with_label("expected an initializer")
                        .with_help(format!("initializers are {}", INITS.join(", "))),
                );
                return None;
            }
        };
        use builtins::Kind::Number;
        let params: &[builtins::Param] = match name.as_str() {
            "zeros" | "ones" | "xavier_normal" | "xavier_uniform" | "kaiming_normal"
            | "kaiming_uniform" => &[],
            "constant" => &[builtins::Param {
                name: "value",
                kind: Number,
                optional: false,
            }],
            "normal" => &[
                builtins::Param {
                    name: "mean",
                    kind: Number,
                    optional: true,
                },
                builtins::Param {
                    name: "std",
                    kind: Number,
                    optional: true,
                },
            ],
            "uniform" => &[
                builtins::Param {
                    name: "lo",
                    kind: Number,
                    optional: true,
                },
                builtins::Param {
                    name: "hi",
                    kind: Number,
                    optional: true,
                },
            ],
            _ => {
                let mut diagnostic = Diagnostic::error(
                    Code::UnknownInitializer,
                    span,
                    format!("unknown initializer `{name}`"),
                )
                .with_label("not an initializer");
                diagnostic = match closest(&name, INITS.iter().copied()) {
                    Some(near) => diagnostic.with_help(format!("did you mean `{near}`?")),
                    None => diagnostic.with_help(format!("initializers are {}", INITS.join(", "))),
                };
                self.report(diagnostic);
                return None;
            }
        };
        let slots = self.bind_args(&name, params, &args, span);
        let slots = slots?;
        let mut numbers = Vec::new();
        for (slot, param) in slots.iter().zip(params) {
            numbers.push(match slot {
                Some(_) => self.number(*slot, &name, param.name)?,
                None => f64::NAN,
            });
        }
        let or = |v: f64, default: f64| if v.is_nan() { default } else { v };
        let init = match name.as_str() {
            "zeros" => Init::Zeros,
            "ones" => Init::Ones,
            "constant" => Init::Constant(numbers[0]),
            "normal" => Init::Normal {
                mean: or(numbers[0], 0.0),
                std: or(numbers[1], 1.0),
            },
            "uniform" => Init::Uniform {
                lo: or(numbers[0], 0.0),
                hi: or(numbers[1], 1.0),
            },
            "xavier_normal" => Init::XavierNormal,
            "xavier_uniform" => Init::XavierUniform,
            "kaiming_normal" => Init::KaimingNormal,
            _ => Init::KaimingUniform,
        };
        let bad = match init {
            Init::Normal { std, .. } if std < 0.0 => {
                Some("the standard deviation must not be negative".to_string())
            }
            Init::Uniform { lo, hi } if lo > hi => {
                Some(format!("the bounds are reversed: {lo} > {hi}"))
            }
            Init::XavierNormal
            | Init::XavierUniform
            | Init::KaimingNormal
            | Init::KaimingUniform
                if ty.shape.rank() < 2 =>
            {
                Some(format!(
                    "`{name}` needs a tensor of rank 2 or more to compute its fans, not `{}`",
                    ty.shape
                ))
            }
            _ => None,
        };
        if let Some(reason) = bad {
            self.report(
                Diagnostic::error(
                    Code::UnknownInitializer,
                    span,
                    format!("`{name}` cannot initialize this tensor"),
                )
                .with_label(reason)
                .with_help(
                    "use `zeros` or `normal(0, 0.02)` for vectors, as PyTorch does for biases",
                ),
            );
            return None;
        }
        Some(init)
    }
}

/// An operand's name for messages: parameter names in backticks, words
/// such as "left operand" as they are.
fn shown(name: &str) -> String {
    if name.contains(' ') || name == "operand" {
        name.to_string()
    } else {
        format!("`{name}`")
    }
}

fn count_text(shape: &Shape) -> String {
    match shape.element_count() {
        Some((fixed, symbols)) if symbols.is_empty() => fixed.to_string(),
        Some((1, symbols)) => symbols.join("*"),
        Some((fixed, symbols)) => format!("{}*{fixed}", symbols.join("*")),
        None => "too many".to_string(),
    }
}

fn shape_help(op: &Op, a: &Shape, b: &Shape) -> String {
    match op {
        Op::Mse | Op::BceWithLogits => {
            if a.rank() + 1 == b.rank() || b.rank() + 1 == a.rank() {
                "reshape one side so both shapes are equal; PyTorch would silently broadcast `[B]` against `[B, 1]` into `[B, B]`".into()
            } else {
                "the prediction and the target must have the same shape".into()
            }
        }
        Op::CrossEntropy => "logits are `[batch, classes]` and labels `[batch]`".into(),
        Op::Binary(_) => {
            "dimensions must be equal or 1, compared from the right (NumPy broadcasting)".into()
        }
        Op::BatchMatMul { .. } => "the axes before the last two are batch axes: each pair must be equal or one of them 1, compared from the right (NumPy's `matmul`)".into(),
        _ => "make the shapes agree".into(),
    }
}
