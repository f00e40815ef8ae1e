//! The IR verifier. It checks, for a whole [`Graph`]:
//!
//! 1. the graph is acyclic;
//! 2. every node's operand positions are exactly `0..n`, one edge each;
//! 3. every node's type is what `Op::infer` computes from its operands
//!    (arity, dtypes and shapes included);
//! 4. leaf ops and leaf roles go together: `input` nodes have role `Input`,
//!    `param` nodes `Param` or `FrozenParam`, `buffer` nodes `Buffer`,
//!    constants are scalars, and no other op has a leaf role;
//! 5. leaves other than constants have names, and no two leaves share one;
//! 6. output names are distinct;
//! 7. at most one node is the loss, and it is a float scalar;
//! 8. the mode agrees with the ops: a train graph's batch-norms use batch
//!    statistics; an eval graph has no dropout and only running statistics;
//! 9. the running statistics of a batch-norm (operands 3 and 4) are buffers;
//! 10. a scan's body passes all of these checks, its inputs are distinct
//!     `input` leaves of the body and its results body nodes, and a
//!     `scan_result` has the type of the result of the scan it reads.
//!
//! A violation is a compiler bug, never a user error: lowering reports user
//! errors as diagnostics before building anything invalid. The verifier runs
//! after lowering in debug builds and in every test.

use std::collections::BTreeSet;

use super::graph::{Graph, Mode, NodeId, Role};
use super::op::Op;

/// Checks every invariant listed in the module doc; returns each violation.
pub fn verify(graph: &Graph) -> Result<(), Vec<String>> {
    let mut errors = Vec::new();
    if graph.topo_order().is_none() {
        errors.push("the graph has a cycle".to_string());
    }
    let mut leaf_names = BTreeSet::new();
    let mut output_names = BTreeSet::new();
    let mut losses = 0;
    for id in graph.ids() {
        let node = graph.node(id);
        let operands = graph.operands(id);
        let positions = graph.operand_positions(id);
        let expected: Vec<u32> = (0..u32::try_from(positions.len()).unwrap_or(u32::MAX)).collect();
        if positions != expected {
            errors.push(format!(
                "{id}: operand positions {positions:?} are not 0..{}",
                positions.len()
            ));
        }
        let types: Vec<_> = operands.iter().map(|&o| &graph.node(o).ty).collect();
        match node.op.infer(&types, &node.ty) {
            Ok(ty) if ty == node.ty => {}
            Ok(ty) => errors.push(format!(
                "{id}: type {} but {} computes {ty}",
                node.ty,
                node.op.name()
            )),
            Err(e) => errors.push(format!(
                "{id}: {} rejects its operands: {e:?}",
                node.op.name()
            )),
        }
        check_role(graph, id, &mut errors);
        if node.op.is_leaf() && !matches!(node.op, Op::Constant(_)) {
            match &node.name {
                Some(name) if !leaf_names.insert(name.clone()) => {
                    errors.push(format!("{id}: a second leaf named `{name}`"))
                }
                Some(_) => {}
                None => errors.push(format!("{id}: a leaf without a name")),
            }
        }
        match &node.role {
            Role::Output(name) if !output_names.insert(name.clone()) => {
                errors.push(format!("{id}: a second output named `{name}`"))
            }
            Role::Loss => {
                losses += 1;
                if !node.ty.shape.is_scalar() || !node.ty.dtype.is_float() {
                    errors.push(format!("{id}: the loss has type {}", node.ty));
                }
            }
            _ => {}
        }
        match (&node.op, graph.mode) {
            (Op::Dropout { .. }, Mode::Eval) => {
                errors.push(format!("{id}: dropout in an eval graph"))
            }
            (Op::BatchNorm { training, .. }, mode) if *training != (mode == Mode::Train) => errors
                .push(format!(
                    "{id}: batch-norm statistics do not match {mode} mode"
                )),
            (Op::BatchNorm { .. }, _) => {
                for &stat in operands.iter().skip(3) {
                    if graph.node(stat).role != Role::Buffer {
                        errors.push(format!("{id}: running statistic {stat} is not a buffer"));
                    }
                }
            }
            _ => {}
        }
        check_scan(graph, id, &mut errors);
    }
    if losses > 1 {
        errors.push(format!("{losses} nodes are the loss"));
    }
    if errors.is_empty() {
        Ok(())
    } else {
        Err(errors)
    }
}

/// A scan's body is a valid graph whose inputs are its `input` leaves,
/// each once, and whose results it holds; a `scan_result` reads a result
/// its scan has, with that result's type.
fn check_scan(graph: &Graph, id: NodeId, errors: &mut Vec<String>) {
    match &graph.node(id).op {
        Op::Scan(scan) => {
            let body = &scan.body;
            if let Err(inner) = verify(body) {
                errors.extend(inner.into_iter().map(|e| format!("{id}: in the body: {e}")));
            }
            let distinct: BTreeSet<NodeId> = scan.inputs.iter().copied().collect();
            let inputs_fit = distinct.len() == scan.inputs.len()
                && scan
                    .inputs
                    .iter()
                    .all(|&i| body.contains(i) && body.node(i).op == Op::Input);
            if !inputs_fit {
                errors.push(format!(
                    "{id}: the scan's inputs are not distinct body inputs"
                ));
            }
            if scan.results.len() < scan.carries || !scan.results.iter().all(|&r| body.contains(r))
            {
                errors.push(format!("{id}: the scan's results are not body nodes"));
            }
        }
        Op::ScanResult { index } => {
            let operands = graph.operands(id);
            let expected = operands.first().and_then(|&s| match &graph.node(s).op {
                Op::Scan(scan) => scan.result_type(*index),
                _ => None,
            });
            if expected.as_ref() != Some(&graph.node(id).ty) {
                errors.push(format!(
                    "{id}: not result {index} of a scan, or not of its type"
                ));
            }
        }
        _ => {}
    }
}

fn check_role(graph: &Graph, id: NodeId, errors: &mut Vec<String>) {
    let node = graph.node(id);
    let fits = match &node.op {
        Op::Input => node.role == Role::Input,
        Op::Param(_) => matches!(node.role, Role::Param | Role::FrozenParam),
        Op::Buffer(_) => node.role == Role::Buffer,
        Op::State => node.role == Role::OptimizerState,
        Op::Constant(_) => node.ty.shape.is_scalar() && !is_leaf_role(&node.role),
        _ => !is_leaf_role(&node.role),
    };
    if !fits {
        errors.push(format!(
            "{id}: op {} cannot have role {:?}",
            node.op.name(),
            node.role
        ));
    }
}

fn is_leaf_role(role: &Role) -> bool {
    matches!(
        role,
        Role::Input | Role::Param | Role::FrozenParam | Role::Buffer | Role::OptimizerState
    )
}
