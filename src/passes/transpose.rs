//! Transposes folded into matrix products: `a @ transpose(b)` becomes one
//! `matmul` that reads `b` transposed (`transpose_b`), and likewise for a
//! 2-D left operand, so no transposed copy is ever materialized; a batched
//! product (`batch_matmul`) folds a transposed operand of any rank.

use super::replace;
use crate::ir::{Graph, Node, NodeId, Op, Role};

/// Folds transposes into matmul operand flags; true if any was folded.
pub fn run(graph: &mut Graph) -> bool {
    let mut changed = false;
    for id in graph.topo_order().unwrap_or_default() {
        if !graph.contains(id) {
            continue;
        }
        let node = graph.node(id).clone();
        if let Op::BatchMatMul {
            transpose_a,
            transpose_b,
        } = node.op
        {
            changed |= fold_batched(graph, id, node, (transpose_a, transpose_b));
            continue;
        }
        let (transpose_a, transpose_b) = match node.op {
            Op::MatMul => (false, false),
            Op::MatMulT {
                transpose_a,
                transpose_b,
            } => (transpose_a, transpose_b),
            _ => continue,
        };
        let operands = graph.operands(id);
        let is_transpose_2d = |graph: &Graph, o| {
            graph.node(o).op == Op::Transpose && graph.node(o).shape().rank() == 2
        };
        let fold_a =
            is_transpose_2d(graph, operands[0]) && graph.node(operands[0]).shape().rank() == 2;
        let fold_b = is_transpose_2d(graph, operands[1]);
        if !fold_a && !fold_b {
            continue;
        }
        let a = if fold_a {
            graph.operands(operands[0])[0]
        } else {
            operands[0]
        };
        let b = if fold_b {
            graph.operands(operands[1])[0]
        } else {
            operands[1]
        };
        let op = Op::MatMulT {
            transpose_a: transpose_a ^ fold_a,
            transpose_b: transpose_b ^ fold_b,
        };
        replace_product(graph, id, node, op, [a, b]);
        changed = true;
    }
    changed
}

/// Folds `transpose` operands (the last two axes swapped) of a batched
/// product into its flags; true if any was folded.
fn fold_batched(graph: &mut Graph, id: NodeId, node: Node, flags: (bool, bool)) -> bool {
    let operands = graph.operands(id);
    let folds = |o: NodeId| graph.node(o).op == Op::Transpose && graph.node(o).shape().rank() >= 2;
    let (fold_a, fold_b) = (folds(operands[0]), folds(operands[1]));
    if !fold_a && !fold_b {
        return false;
    }
    let read = |o: NodeId, fold: bool| if fold { graph.operands(o)[0] } else { o };
    let (a, b) = (read(operands[0], fold_a), read(operands[1], fold_b));
    let op = Op::BatchMatMul {
        transpose_a: flags.0 ^ fold_a,
        transpose_b: flags.1 ^ fold_b,
    };
    replace_product(graph, id, node, op, [a, b]);
    true
}

/// Puts a product `op` of `operands` (at `node`'s source position) in
/// place of the product `id`.
fn replace_product(graph: &mut Graph, id: NodeId, node: Node, op: Op, operands: [NodeId; 2]) {
    let product = graph.add(
        Node {
            op,
            role: Role::Intermediate,
            name: None,
            retain: false,
            ..node
        },
        &operands,
    );
    replace(graph, id, product);
}
