//! Transposes folded into matrix products: `a @ transpose(b)` becomes one
//! `matmul` that reads `b` transposed (`transpose_b`), and likewise for a
//! 2-D left operand, so no transposed copy is ever materialized.

use super::replace;
use crate::ir::{Graph, Node, Op, Role};

/// Folds transposes into matmul operand flags; true if any was folded.
pub fn run(graph: &mut Graph) -> bool {
    let mut changed = false;
    for id in graph.topo_order().unwrap_or_default() {
        if !graph.contains(id) {
            continue;
        }
        let node = graph.node(id).clone();
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
        let product = graph.add(
            Node {
                op: Op::MatMulT {
                    transpose_a: transpose_a ^ fold_a,
                    transpose_b: transpose_b ^ fold_b,
                },
                role: Role::Intermediate,
                name: None,
                retain: false,
                ..node
            },
            &[a, b],
        );
        replace(graph, id, product);
        changed = true;
    }
    changed
}
