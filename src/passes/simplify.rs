//! Algebraic simplification: local rewrites, each an identity of real
//! arithmetic that also holds in IEEE floats for the values the graph can
//! carry (exceptions are named at the rule).
//!
//! Canonical form the rules rely on: for the commutative `add`, `mul`,
//! `maximum` and `minimum`, a constant operand is on the right
//! (`2 * x` becomes `x * 2`). A rewrite to an operand (`x * 1 == x`) only
//! happens when that operand already has the result's type, so
//! broadcasting never changes.
//!
//! Rules on concats: the sum of two concats along one axis whose non-zero
//! parts do not overlap is one concat (`concat(a, 0) + concat(0, b) ==
//! concat(a, b)`, each part plus zeros): what the gradients of several
//! slices of one value add up to.
//!
//! Rules that look tempting and are *not* applied: `x * 0 == 0` (false for
//! `x = inf` or NaN), `x - x == 0` for tensors (the same, and a zero tensor
//! has no op here; scalar `x - x` of a constant folds anyway), reassociating
//! sums (changes rounding), and the stable rewrites of `log(exp(x))` and
//! `log(softmax(x))`: they change results (an overflowed `exp` becomes
//! finite), so lowering does them, before differentiation, where the
//! forward and backward graphs and every backend see the same thing.

use super::replace;
use crate::ir::{BinaryFn, Graph, Node, NodeId, Op, Role, UnaryFn};

fn constant(graph: &Graph, id: NodeId) -> Option<f64> {
    match graph.node(id).op {
        Op::Constant(c) => Some(c),
        _ => None,
    }
}

/// Applies every rule once to every node; true if anything changed.
pub fn run(graph: &mut Graph) -> bool {
    let mut changed = false;
    for id in graph.topo_order().unwrap_or_default() {
        if graph.contains(id) && rewrite(graph, id) {
            changed = true;
        }
    }
    changed
}

/// Adds a node computing `op` of `operands`, typed like `like`, at its
/// source position.
fn add_like(graph: &mut Graph, like: NodeId, op: Op, operands: &[NodeId]) -> NodeId {
    let template = graph.node(like).clone();
    graph.add(
        Node {
            op,
            role: Role::Intermediate,
            name: None,
            retain: false,
            ..template
        },
        operands,
    )
}

fn rewrite(graph: &mut Graph, id: NodeId) -> bool {
    let node = graph.node(id).clone();
    let operands = graph.operands(id);
    let same_type = |graph: &Graph, other: NodeId| graph.node(other).ty == node.ty;
    let to = |graph: &mut Graph, new: NodeId| {
        replace(graph, id, new);
        true
    };
    match &node.op {
        Op::Binary(f) => {
            let (a, b) = (operands[0], operands[1]);
            let commutative = matches!(
                f,
                BinaryFn::Add | BinaryFn::Mul | BinaryFn::Maximum | BinaryFn::Minimum
            );
            // Canonical form: a constant operand of a commutative op goes right.
            if commutative && constant(graph, a).is_some() && constant(graph, b).is_none() {
                graph.set_operand(id, 0, b);
                graph.set_operand(id, 1, a);
                return true;
            }
            // concat(a, 0) + concat(0, b) == concat(a, b): the sum of a
            // slice's gradients (an LSTM's four gates) is one concat.
            if *f == BinaryFn::Add
                && let Some(merged) = disjoint_concats(graph, a, b)
            {
                let sum = merged_concat(graph, id, merged);
                return to(graph, sum);
            }
            match (f, constant(graph, b)) {
                // x + 0 == x, x - 0 == x
                (BinaryFn::Add | BinaryFn::Sub, Some(c)) if c == 0.0 && same_type(graph, a) => {
                    to(graph, a)
                }
                // x * 1 == x, x / 1 == x, x ** 1 == x
                (BinaryFn::Mul | BinaryFn::Div | BinaryFn::Pow, Some(c))
                    if c == 1.0 && same_type(graph, a) =>
                {
                    to(graph, a)
                }
                // x - neg(y) == x + y
                (BinaryFn::Sub, None) if graph.node(b).op == Op::Unary(UnaryFn::Neg) => {
                    let y = graph.operands(b)[0];
                    let sum = add_like(graph, id, Op::Binary(BinaryFn::Add), &[a, y]);
                    to(graph, sum)
                }
                // x + neg(y) == x - y
                (BinaryFn::Add, None) if graph.node(b).op == Op::Unary(UnaryFn::Neg) => {
                    let y = graph.operands(b)[0];
                    let difference = add_like(graph, id, Op::Binary(BinaryFn::Sub), &[a, y]);
                    to(graph, difference)
                }
                _ => false,
            }
        }
        Op::Unary(UnaryFn::Neg) => {
            let x = operands[0];
            // neg(neg(x)) == x
            match graph.node(x).op {
                Op::Unary(UnaryFn::Neg) => {
                    let inner = graph.operands(x)[0];
                    to(graph, inner)
                }
                _ => false,
            }
        }
        // transpose(transpose(x)) == x
        Op::Transpose if graph.node(operands[0]).op == Op::Transpose => {
            let inner = graph.operands(operands[0])[0];
            to(graph, inner)
        }
        // stop_gradient(x) == x once the backward graph exists: it only
        // ever told autodiff where to stop. identity(x) == x for a value
        // without a role of its own.
        Op::StopGradient => to(graph, operands[0]),
        Op::Identity if node.role == Role::Intermediate => to(graph, operands[0]),
        // sum_to(x) == x when nothing was broadcast.
        Op::SumTo if same_type(graph, operands[0]) => to(graph, operands[0]),
        _ => false,
    }
}

/// One part of a concat along its axis: where it starts, how long it is,
/// and its node (`None`: zeros).
type Part = (u64, u64, Option<NodeId>);

/// Whether `id` is zeros: `expand` of the constant 0.
fn is_zeros(graph: &Graph, id: NodeId) -> bool {
    graph.node(id).op == Op::Expand && constant(graph, graph.operands(id)[0]) == Some(0.0)
}

/// A concat's axis and parts, if every part has a fixed size along it.
fn concat_parts(graph: &Graph, id: NodeId) -> Option<(usize, Vec<Part>)> {
    let Op::Concat { axis } = graph.node(id).op else {
        return None;
    };
    let mut start = 0;
    let mut parts = Vec::new();
    for operand in graph.operands(id) {
        let crate::ir::Dim::Fixed(len) = graph.node(operand).shape().0.get(axis)?.clone() else {
            return None;
        };
        parts.push((start, len, (!is_zeros(graph, operand)).then_some(operand)));
        start += len;
    }
    Some((axis, parts))
}

/// The parts of `a + b` for two concats of one type along one axis whose
/// non-zero parts do not overlap and start and end where the other's
/// parts do: each piece between the cuts of both is the one non-zero
/// part over it, or zeros.
fn disjoint_concats(graph: &Graph, a: NodeId, b: NodeId) -> Option<(usize, Vec<Part>)> {
    let ((axis, left), (axis_b, right)) = (concat_parts(graph, a)?, concat_parts(graph, b)?);
    if axis != axis_b || graph.node(a).ty != graph.node(b).ty {
        return None;
    }
    let mut cuts: Vec<u64> = left
        .iter()
        .chain(&right)
        .flat_map(|&(start, len, _)| [start, start + len])
        .collect();
    cuts.sort_unstable();
    cuts.dedup();
    let covering = |parts: &[Part], start: u64, end: u64| -> Option<Option<NodeId>> {
        let &(s, len, node) = parts
            .iter()
            .find(|&&(s, len, _)| s <= start && end <= s + len)?;
        match node {
            // (A part is never split.)
            Some(node) if s == start && s + len == end => Some(Some(node)),
            Some(_) => None,
            None => Some(None),
        }
    };
    let mut merged: Vec<Part> = Vec::new();
    for pair in cuts.windows(2) {
        let (start, end) = (pair[0], pair[1]);
        let part = match (covering(&left, start, end)?, covering(&right, start, end)?) {
            (Some(_), Some(_)) => return None,
            (Some(node), None) | (None, Some(node)) => Some(node),
            (None, None) => None,
        };
        match (merged.last_mut(), part) {
            // (Neighbouring zeros are one part.)
            (Some(last), None) if last.2.is_none() => last.1 += end - start,
            _ => merged.push((start, end - start, part)),
        }
    }
    Some((axis, merged))
}

/// The concat of `merged` parts (zeros made by `expand` of 0), typed like
/// `like`.
fn merged_concat(graph: &mut Graph, like: NodeId, (axis, merged): (usize, Vec<Part>)) -> NodeId {
    let ty = graph.node(like).ty.clone();
    let mut operands = Vec::new();
    for (_, len, node) in merged {
        let part = match node {
            Some(node) => node,
            None => {
                let zero = add_like(graph, like, Op::Constant(0.0), &[]);
                graph.node_mut(zero).ty =
                    crate::ir::Type::new(ty.dtype, crate::ir::Shape::scalar());
                let expand = add_like(graph, like, Op::Expand, &[zero]);
                graph.node_mut(expand).ty.shape.0[axis] = crate::ir::Dim::Fixed(len);
                expand
            }
        };
        operands.push(part);
    }
    if let [only] = operands[..] {
        return only;
    }
    add_like(graph, like, Op::Concat { axis }, &operands)
}
