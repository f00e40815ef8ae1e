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
