//! The kernels the JIT keeps hand-written, recognised in the graph (the
//! optimization pass `patterns`, which runs before `expand`).
//!
//! Composites are defined once, by their expansion into primitives
//! (`ir::expand`), and derivative rules build gradients from ops
//! (`autodiff::rules::gradient`). Where a hand-written kernel computes one
//! of those graphs much faster, this pass replaces it by one kernel node
//! ([`Op::Kernel`]), which the JIT compiles as its row kernel and the
//! interpreter runs by running the same expansion.
//!
//! Two patterns, both for classifiers:
//! - `cross_entropy(logits, labels)` with `[N, C]` logits becomes
//!   `KernelOp::CrossEntropy` (one pass per row);
//! - its gradient `(softmax(logits) - one_hot(labels)) * (g /
//!   count(labels))` becomes `KernelOp::CrossEntropyGradient`, which the
//!   kernel plan then fuses with the loss's kernel (each row's maximum and
//!   exponentials taken once for both).

use super::{dce, replace};
use crate::ir::{BinaryFn, Graph, KernelOp, NodeId, Op};

/// Replaces every recognised graph by its kernel node; true if anything
/// changed.
pub fn run(graph: &mut Graph) -> bool {
    let mut changed = false;
    let order = graph.topo_order().unwrap_or_default();
    for &id in &order {
        if let Some((operands, op)) = cross_entropy_gradient(graph, id) {
            let mut node = graph.node(id).clone();
            node.op = op;
            let fused = graph.add(node, &operands);
            replace(graph, id, fused);
            changed = true;
        }
    }
    for &id in &order {
        if graph.contains(id) && graph.node(id).op == Op::CrossEntropy {
            graph.node_mut(id).op = Op::Kernel(KernelOp::CrossEntropy);
            changed = true;
        }
    }
    if changed {
        dce::run(graph);
    }
    changed
}

/// `mul(sub(softmax(l, axis = 1), one_hot(y)), div(g, count(y, [0])))` for
/// `[N, C]` logits `l` whose `cross_entropy(l, y)` the graph computes: the
/// operands `[g, l, y, loss]` and the op of the fused gradient.
fn cross_entropy_gradient(graph: &Graph, id: NodeId) -> Option<(Vec<NodeId>, Op)> {
    let binary = |id: NodeId, f: BinaryFn| -> Option<(NodeId, NodeId)> {
        let operands = graph.operands(id);
        (graph.node(id).op == Op::Binary(f)).then(|| (operands[0], operands[1]))
    };
    let only = |id: NodeId, op: &Op| -> Option<NodeId> {
        (graph.node(id).op == *op).then(|| graph.operands(id)[0])
    };
    let (difference, scale) = binary(id, BinaryFn::Mul)?;
    let (p, hot) = binary(difference, BinaryFn::Sub)?;
    let logits = only(p, &Op::Softmax { axis: 1 })?;
    let labels = only(hot, &Op::OneHot)?;
    let (g, count) = binary(scale, BinaryFn::Div)?;
    let counted = only(count, &Op::Count { axes: vec![0] })?;
    let fits = counted == labels
        && graph.node(logits).shape().rank() == 2
        && graph.node(g).shape().rank() == 0
        && graph.node(id).ty == graph.node(logits).ty;
    if !fits {
        return None;
    }
    let loss = graph.users(logits).into_iter().find(|&user| {
        let op = &graph.node(user).op;
        matches!(op, Op::CrossEntropy | Op::Kernel(KernelOp::CrossEntropy))
            && graph.operands(user) == [logits, labels]
    })?;
    let op = Op::Kernel(KernelOp::CrossEntropyGradient);
    Some((vec![g, logits, labels, loss], op))
}
