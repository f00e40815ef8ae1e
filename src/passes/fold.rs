//! Constant folding: a node whose operands are all constants becomes the
//! constant it computes, evaluated by the reference interpreter's kernels
//! (so `f32` rounding is the same as at run time).
//!
//! A `count` of elements along axes of fixed size folds to its number.
//! Constants are scalars, so only scalar-valued nodes fold; `stop_gradient`
//! and `identity` of a constant fold too. Frozen params and values computed
//! under `no_grad` are constants to the backward pass but their values are
//! only known at run time, so they are not folded here.

use std::collections::BTreeMap;

use super::replace;
use crate::interp::{self, Context, Tensor};
use crate::ir::{Dim, Graph, Node, NodeId, Op, Role};

/// Replaces `id` (whose node is `node`) by the constant `value`, keeping
/// its type, source position and backward provenance.
fn replace_by_constant(graph: &mut Graph, id: NodeId, node: &Node, value: f64) {
    let constant = graph.add(
        Node {
            op: Op::Constant(value),
            role: Role::Intermediate,
            name: None,
            retain: false,
            ..node.clone()
        },
        &[],
    );
    replace(graph, id, constant);
}

/// The number of elements of `of` along `axes`, if those sizes are fixed.
fn fixed_count(graph: &Graph, of: NodeId, axes: &[usize]) -> Option<u64> {
    let shape = graph.node(of).shape();
    axes.iter()
        .try_fold(1u64, |total, &axis| match shape.0.get(axis)? {
            Dim::Fixed(n) => total.checked_mul(*n),
            Dim::Sym(_) => None,
        })
}

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
        // A count along fixed axes is known whatever the operand holds.
        if let Op::Count { axes } = &node.op
            && node.role == Role::Intermediate
            && let Some(count) = fixed_count(graph, operands[0], axes)
        {
            replace_by_constant(graph, id, &node, count as f64);
            changed = true;
            continue;
        }
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
        replace_by_constant(graph, id, &node, value.data[0]);
        changed = true;
    }
    changed
}

#[cfg(test)]
mod tests {
    use super::run;
    use crate::ir::{DType, Dim, Graph, Mode, Node, Op, Origin, Shape, Type};

    /// `count` along a fixed axis folds to its number; along a symbolic
    /// one it stays (the batch size is known only at run time).
    #[test]
    fn counts_along_fixed_axes_fold() {
        let mut graph = Graph::new("m", Mode::Train);
        let shape = Shape(vec![Dim::Sym("B".into()), Dim::Fixed(4)]);
        let x = graph.add(
            Node::derived(
                Op::Input,
                Type::new(DType::F32, shape),
                Origin::default(),
                None,
            ),
            &[],
        );
        let scalar = Type::new(DType::F32, Shape::scalar());
        let count = |axes: Vec<usize>| {
            Node::derived(Op::Count { axes }, scalar.clone(), Origin::default(), None)
        };
        let fixed = graph.add(count(vec![1]), &[x]);
        let symbolic = graph.add(count(vec![0]), &[x]);
        let users: Vec<_> = [fixed, symbolic]
            .iter()
            .map(|&c| {
                let node = Node::derived(Op::Identity, scalar.clone(), Origin::default(), None);
                graph.add(node, &[c])
            })
            .collect();
        assert!(run(&mut graph));
        let operand = |user| graph.node(graph.operands(user)[0]).op.clone();
        assert_eq!(operand(users[0]), Op::Constant(4.0));
        assert_eq!(operand(users[1]), Op::Count { axes: vec![0] });
    }
}
