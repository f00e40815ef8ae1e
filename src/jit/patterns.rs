//! Derivative kernels the JIT recognises from primitives.
//!
//! Derivative rules build gradients from forward ops
//! (`autodiff::rules::gradient`), which every backend runs. Where a
//! hand-written kernel computes one of those primitive graphs much faster,
//! the JIT finds the graph after the passes and replaces it by one
//! kernel node ([`Op::Kernel`]) before planning kernels; the interpreter
//! runs it only where the JIT hands a node back to it.
//!
//! Today one pattern: cross-entropy's gradient `(softmax(logits) -
//! one_hot(labels)) * (g / count(labels))` becomes the one-pass row kernel
//! (`rows::RowOp::CrossEntropyVjp`), which the plan then fuses with the
//! loss's own row kernel. It computes the same values in the same order:
//! `(p - hot) * (g / n)`.

use crate::ir::{BinaryFn, Graph, KernelOp, NodeId, Op};
use crate::passes::{dce, replace};

/// Replaces every recognised primitive graph by its kernel node; true if
/// anything changed.
pub(crate) fn recognise(graph: &mut Graph) -> bool {
    let mut changed = false;
    for id in graph.topo_order().unwrap_or_default() {
        if let Some((operands, op)) = cross_entropy_gradient(graph, id) {
            let mut node = graph.node(id).clone();
            node.op = op;
            let fused = graph.add(node, &operands);
            replace(graph, id, fused);
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
        graph.node(user).op == Op::CrossEntropy && graph.operands(user) == [logits, labels]
    })?;
    let op = Op::Kernel(KernelOp::CrossEntropyGradient);
    Some((vec![g, logits, labels, loss], op))
}
