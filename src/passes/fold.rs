//! Constant folding: a node whose operands are all constants becomes the
//! constant it computes, evaluated by the reference interpreter's kernels
//! (so `f32` rounding is the same as at run time).
//!
//! Constants are scalars, so only scalar-valued nodes fold; `stop_gradient`
//! and `identity` of a constant fold too. Frozen params and values computed
//! under `no_grad` are constants to the backward pass but their values are
//! only known at run time, so they are not folded here.

use std::collections::BTreeMap;

use super::replace;
use crate::interp::{self, Context, Tensor};
use crate::ir::{Graph, Node, Op, Role};

/// Folds constant subexpressions; true if any was folded.
pub fn run(graph: &mut Graph) -> bool {
    let mut changed = false;
    let order = graph.topo_order().unwrap_or_default();
    for id in order {
        if !graph.contains(id) {
            continue;
        }
        let node = graph.node(id).clone();
        let operands = graph.operands(id);
        let foldable = !node.op.is_leaf()
            && node.shape().is_scalar()
            && !operands.is_empty()
            && operands.iter().all(|&o| matches!(graph.node(o).op, Op::Constant(_)))
            && !matches!(node.op, Op::Dropout { .. } | Op::Kernel(_) | Op::ZeroFraction | Op::DeadFraction)
            // An identity that carries a role is how a folded result keeps it.
            && (node.op != Op::Identity || node.role == Role::Intermediate);
        if !foldable {
            continue;
        }
        // Evaluate the node alone on its constant operands.
        let mut scratch = Graph::new("fold", graph.mode);
        let inputs: Vec<_> = operands
            .iter()
            .map(|&o| {
                let constant = graph.node(o).clone();
                scratch.add(
                    Node {
                        role: Role::Intermediate,
                        ..constant
                    },
                    &[],
                )
            })
            .collect();
        let copy = scratch.add(
            Node {
                role: Role::Intermediate,
                ..node.clone()
            },
            &inputs,
        );
        let Ok(evaluation) = interp::evaluate(&scratch, &BTreeMap::new(), Context::default())
        else {
            continue;
        };
        let value: &Tensor = &evaluation.values[&copy];
        let constant = graph.add(
            Node {
                op: Op::Constant(value.data[0]),
                role: Role::Intermediate,
                name: None,
                retain: false,
                backward: node.backward.clone(),
                ..node.clone()
            },
            &[],
        );
        replace(graph, id, constant);
        changed = true;
    }
    changed
}
