//! Lowering of `scan(f, xs, init = ..., axis = 1, with = [...], reverse =
//! false, checkpoint = false)`: the user function `f` is lowered once, into
//! a body graph of its own whose leaves are one element of each sequence,
//! the carries and the `with` values, and the loop becomes one
//! `Op::Scan` node (`ir::scan`). Every value `f` returns comes back
//! stacked along `axis`; the first ones, as many as `init` has values, are
//! also the carries of the next step.

use std::sync::Arc;

use super::{Lowering, Value};
use crate::diagnostic::{Code, Diagnostic, Span};
use crate::ir::{Graph, NodeId, Op, Role, Scan, Shape, Type};
use crate::syntax::ast::{ExprId, ExprKind, Function};

/// The default scanned axis: a batch-first sequence `[B, T, ...]`.
const DEFAULT_AXIS: usize = 1;

/// One operand of the loop: its node and where the source writes it.
#[derive(Clone, Copy)]
struct Given {
    id: NodeId,
    span: Span,
}

impl<'a> Lowering<'a, '_> {
    /// The values of a `scan` call whose arguments are bound to `slots`
    /// (`f, xs, init, axis, with, reverse, checkpoint`): what `f` returns,
    /// each value stacked along the axis. `None` after an error.
    pub(super) fn scan(&mut self, slots: &[Option<ExprId>], span: Span) -> Option<Vec<Value>> {
        let [Some(f), Some(xs), init, axis, with, reverse, checkpoint] = *slots else {
            return None;
        };
        let function = self.scanned_function(f)?;
        let list = |lowering: &Self, expr: ExprId| match &lowering.ast().expr(expr).kind {
            ExprKind::List(items) => items.clone(),
            _ => vec![expr],
        };
        let sequences = list(self, xs);
        let carries = init.map_or_else(Vec::new, |e| list(self, e));
        let constants = match with {
            None => Vec::new(),
            Some(e) => match &self.ast().expr(e).kind {
                ExprKind::List(items) => items.clone(),
                _ => {
                    self.report(
                        Diagnostic::error(
                            Code::WrongArgumentKind,
                            self.ast().expr(e).span,
                            "`with` takes a list of tensors",
                        )
                        .with_label("not a list")
                        .with_help("write `with = [w, b]`"),
                    );
                    return None;
                }
            },
        };
        let reverse = match reverse {
            Some(e) => self.boolean(e, "scan", "reverse")?,
            None => false,
        };
        let checkpoint = match checkpoint {
            Some(e) => self.boolean(e, "scan", "checkpoint")?,
            None => false,
        };
        if sequences.is_empty() {
            self.report(
                Diagnostic::error(
                    Code::WrongArgumentKind,
                    self.ast().expr(xs).span,
                    "`scan` of an empty list",
                )
                .with_label("needs at least one tensor to loop over"),
            );
            return None;
        }
        let sequences = self.scan_operands(&sequences)?;
        let carries = self.scan_operands(&carries)?;
        let constants = self.scan_operands(&constants)?;
        for carry in &carries {
            let dtype = self.graph.node(carry.id).dtype();
            if !dtype.is_float() || self.bools.contains(&carry.id) {
                let ty = self.type_name(carry.id);
                self.report(
                    Diagnostic::error(Code::NotFloat, carry.span, format!("a carry of type `{ty}`"))
                        .with_label("a carry must be a float tensor")
                        .with_help("the loop differentiates through its carries; keep labels and masks in `xs` or `with`"),
                );
                return None;
            }
        }

        // The scanned axis, moved to the front of every sequence.
        let first = self.graph.node(sequences[0].id).shape().clone();
        let axis = match axis {
            Some(e) => self.axis(e, &first)?,
            None if first.rank() > DEFAULT_AXIS => DEFAULT_AXIS,
            None => {
                self.report(
                    Diagnostic::error(
                        Code::BadAxis,
                        sequences[0].span,
                        format!("`scan` loops over axis {DEFAULT_AXIS} by default, but this sequence has rank {}", first.rank()),
                    )
                    .with_label(format!("shape {first}"))
                    .with_help("pass the axis to loop over, as `axis = 0`"),
                );
                return None;
            }
        };
        let length = first.0[axis].clone();
        let mut moved = Vec::new();
        for sequence in &sequences {
            let shape = self.graph.node(sequence.id).shape().clone();
            if shape.rank() <= axis {
                self.report(
                    Diagnostic::error(
                        Code::BadAxis,
                        sequence.span,
                        format!("`scan` loops over axis {axis}, which this sequence of shape {shape} does not have"),
                    )
                    .with_label(format!("rank {}", shape.rank()))
                    .with_help("every sequence needs the scanned axis"),
                );
                return None;
            }
            if shape.0[axis] != length {
                self.report(
                    Diagnostic::error(
                        Code::ShapeMismatch,
                        sequence.span,
                        format!("sequences of different lengths: {} and {length} steps along axis {axis}", shape.0[axis]),
                    )
                    .with_label(format!("{} steps", shape.0[axis]))
                    .with_secondary(sequences[0].span, format!("{length} steps"))
                    .with_help("every sequence of one `scan` has the same number of steps"),
                );
                return None;
            }
            moved.push(self.move_axis(sequence.id, axis, 0, span));
        }

        // The function's parameters: an element of each sequence, each
        // carry, each `with` value.
        let expected = sequences.len() + carries.len() + constants.len();
        if function.params.len() != expected {
            self.report(
                Diagnostic::error(
                    Code::WrongArity,
                    self.ast().expr(f).span,
                    format!(
                        "`{}` takes {} parameter{} but `scan` passes {expected}",
                        function.name.name,
                        function.params.len(),
                        if function.params.len() == 1 { "" } else { "s" },
                    ),
                )
                .with_label(format!(
                    "{} sequence element{}, {} carr{}, {} `with` value{}",
                    sequences.len(),
                    if sequences.len() == 1 { "" } else { "s" },
                    carries.len(),
                    if carries.len() == 1 { "y" } else { "ies" },
                    constants.len(),
                    if constants.len() == 1 { "" } else { "s" },
                ))
                .with_secondary(function.name.span, "defined here")
                .with_help("`scan` calls `f(x_t..., carries..., with...)`: one element of each sequence, then the carries, then the `with` values"),
            );
            return None;
        }
        if self.cx.recursive.contains(&function.name.name) {
            return None;
        }

        let (body, inputs, returned) =
            self.scan_body(function, &moved, &carries, &constants, span)?;
        if returned.len() < carries.len() {
            self.report(
                Diagnostic::error(
                    Code::ScanCarry,
                    span,
                    format!(
                        "`{}` returns {} value{} but `init` gives {} carries",
                        function.name.name,
                        returned.len(),
                        if returned.len() == 1 { "" } else { "s" },
                        carries.len()
                    ),
                )
                .with_label("each step returns the next carries first")
                .with_secondary(function.name.span, "defined here")
                .with_help("return every carry, as `return h, c`, then any other per-step values"),
            );
            return None;
        }
        for (i, carry) in carries.iter().enumerate() {
            let taken = self.graph.node(carry.id).ty.clone();
            let given = body.node(returned[i].0).ty.clone();
            if taken != given {
                self.report(
                    Diagnostic::error(
                        Code::ScanCarry,
                        carry.span,
                        format!("carry {i} enters the loop as `{taken}` but `{}` returns it as `{given}`", function.name.name),
                    )
                    .with_label(format!("`{taken}` here"))
                    .with_secondary(returned[i].1, format!("`{given}` returned here"))
                    .with_help("a carry keeps its type and shape from step to step"),
                );
                return None;
            }
        }

        let mut operands: Vec<NodeId> = carries.iter().map(|c| c.id).collect();
        operands.extend(&moved);
        operands.extend(constants.iter().map(|c| c.id));
        let mut results: Vec<NodeId> = returned[..carries.len()].iter().map(|r| r.0).collect();
        results.extend(returned.iter().map(|r| r.0));
        let bool_outputs: Vec<bool> = returned.iter().map(|r| r.2).collect();
        let scan = Scan {
            body: Arc::new(body),
            inputs,
            results,
            carries: carries.len(),
            sequences: moved.len(),
            length,
            reverse,
            checkpoint,
        };
        let ty = scan.result_type(0)?;
        let k = scan.carries;
        let types: Vec<Type> = (0..returned.len())
            .map(|j| scan.result_type(k + j))
            .collect::<Option<_>>()?;
        let node = self.add_node(Op::Scan(Box::new(scan)), ty, &operands, span);
        let mut values = Vec::new();
        for (j, ty) in types.into_iter().enumerate() {
            let rank = ty.shape.rank();
            let stacked = if k + j == 0 {
                node
            } else {
                self.add_node(Op::ScanResult { index: k + j }, ty, &[node], span)
            };
            let value = self.move_axis(stacked, 0, axis.min(rank - 1), span);
            if bool_outputs[j] {
                self.bools.insert(value);
            }
            values.push(Value::Node(value));
        }
        Some(values)
    }

    /// The function a `scan` loops, named by its first argument.
    fn scanned_function(&mut self, f: ExprId) -> Option<&'a Function> {
        let expr = self.ast().expr(f);
        let found = match &expr.kind {
            ExprKind::Name(name) => self.cx.functions.get(name.as_str()).copied(),
            _ => None,
        };
        if found.is_none() {
            self.report(
                Diagnostic::error(
                    Code::WrongArgumentKind,
                    expr.span,
                    "`scan` loops a function defined with `fn`, named by its first argument",
                )
                .with_label("not the name of a `fn`")
                .with_help("define the step as `fn cell(x_t, h, w) { ... return h2 }` and write `scan(cell, x, init = h0, with = [w])`"),
            );
        }
        found
    }

    /// Lowers the operands of one group (sequences, carries or constants);
    /// a number becomes a scalar constant. `None` if any failed.
    fn scan_operands(&mut self, exprs: &[ExprId]) -> Option<Vec<Given>> {
        let mut given = Vec::new();
        let mut failed = false;
        for &expr in exprs {
            let span = self.ast().expr(expr).span;
            let value = self.expr(expr);
            match self.node_of(value, span) {
                Some(id) => given.push(Given { id, span }),
                None => failed = true,
            }
        }
        (!failed).then_some(given)
    }

    /// Lowers `function` into a body graph of its own: its leaves (in the
    /// scan's operand order: carries, sequence elements, constants) and
    /// each returned node with the span of its `return` expression and
    /// whether it is a `bool`.
    #[allow(clippy::type_complexity)]
    fn scan_body(
        &mut self,
        function: &Function,
        sequences: &[NodeId],
        carries: &[Given],
        constants: &[Given],
        span: Span,
    ) -> Option<(Graph, Vec<NodeId>, Vec<(NodeId, Span, bool)>)> {
        let body = Graph::new(self.graph.model.clone(), self.mode);
        let outer = std::mem::replace(&mut self.graph, body);
        let outer_bools = std::mem::take(&mut self.bools);
        let outer_superseded = std::mem::take(&mut self.superseded);
        let outer_no_grad = self.no_grad.take();

        let leaf = |lowering: &mut Self, outer: &Graph, id: NodeId, name: String, shape: Shape| {
            let ty = Type::new(outer.node(id).dtype(), shape);
            let leaf = lowering.leaf(Op::Input, ty, Role::Input, &name, span);
            if outer_bools.contains(&id) {
                lowering.bools.insert(leaf);
            }
            leaf
        };
        // (Carries and constants: the whole value every step.)
        let whole = |lowering: &mut Self, givens: &[Given], prefix: &str| -> Vec<NodeId> {
            givens
                .iter()
                .enumerate()
                .map(|(i, g)| {
                    let shape = outer.node(g.id).shape().clone();
                    leaf(lowering, &outer, g.id, format!("{prefix}{i}"), shape)
                })
                .collect()
        };
        let carry_leaves = whole(self, carries, "carry");
        let sequence_leaves: Vec<NodeId> = sequences
            .iter()
            .enumerate()
            .map(|(j, &s)| {
                let element = Shape(outer.node(s).shape().0[1..].to_vec());
                leaf(self, &outer, s, format!("x{j}"), element)
            })
            .collect();
        let constant_leaves = whole(self, constants, "with");
        let mut arguments: Vec<Value> = sequence_leaves.iter().map(|&id| Value::Node(id)).collect();
        arguments.extend(carry_leaves.iter().map(|&id| Value::Node(id)));
        arguments.extend(constant_leaves.iter().map(|&id| Value::Node(id)));
        let values = self.inline_values(function, arguments, span);

        let mut returned = Vec::new();
        let mut failed = false;
        for (value, &expr) in values.into_iter().zip(&function.results) {
            let at = self.ast().expr(expr).span;
            match self.node_of(value, at) {
                Some(id) => returned.push((id, at, self.bools.contains(&id))),
                None => failed = true,
            }
        }
        let disallowed = self.graph.ids().into_iter().find(|&id| {
            matches!(
                self.graph.node(id).op,
                Op::Dropout { .. } | Op::BatchNorm { .. } | Op::RunningStat { .. }
            )
        });
        let grad_call = self.graph.grad_calls.first().map(|g| g.span);
        let kept: Vec<NodeId> = returned.iter().map(|r| r.0).collect();
        self.remove_superseded(&kept);
        let body = std::mem::replace(&mut self.graph, outer);
        self.bools = outer_bools;
        self.superseded = outer_superseded;
        self.no_grad = outer_no_grad;

        let forbidden = match (disallowed, grad_call) {
            (Some(id), _) => Some((body.node(id).origin.span, body.node(id).op.name())),
            (None, Some(at)) => Some((at, "grad".to_string())),
            (None, None) => None,
        };
        if let Some((at, what)) = forbidden {
            self.report(
                Diagnostic::error(
                    Code::ScanBody,
                    span,
                    format!("`{}` cannot be the step of a `scan`: it uses `{what}`", function.name.name),
                )
                .with_label("the loop")
                .with_secondary(at, format!("`{what}` here"))
                .with_help("a loop step is a pure function of its inputs: apply dropout, batch norm and `grad` outside the `scan`"),
            );
            return None;
        }
        if failed {
            return None;
        }
        let mut inputs = carry_leaves;
        inputs.extend(sequence_leaves);
        inputs.extend(constant_leaves);
        Some((body, inputs, returned))
    }

    /// Moves axis `from` of `id` to position `to` (nothing if they are
    /// equal): a `permute`.
    fn move_axis(&mut self, id: NodeId, from: usize, to: usize, span: Span) -> NodeId {
        if from == to {
            return id;
        }
        let ty = self.graph.node(id).ty.clone();
        let mut axes: Vec<usize> = (0..ty.shape.rank()).filter(|&a| a != from).collect();
        axes.insert(to, from);
        let shape = Shape(axes.iter().map(|&a| ty.shape.0[a].clone()).collect());
        let moved = self.add_node(
            Op::Permute { axes },
            Type::new(ty.dtype, shape),
            &[id],
            span,
        );
        if self.bools.contains(&id) {
            self.bools.insert(moved);
        }
        moved
    }

    /// A node's type as the language writes it (`bool` for masks).
    fn type_name(&self, id: NodeId) -> String {
        let ty = &self.graph.node(id).ty;
        if self.bools.contains(&id) {
            return format!("bool{}", ty.shape);
        }
        ty.to_string()
    }
}
