//! The derivative of a `scan` (`ir::scan`): a scan running the other way.
//!
//! At every step, read in reverse, the backward body takes the step's
//! saved carries, its sequence elements and the constants, recomputes the
//! forward step from them, and differentiates it (the sweep of
//! `autodiff::vector_jacobian` run on the body) against the cotangents that
//! reach the step: the carries' cotangents (the backward scan's own
//! carries, starting from the final carries' cotangents) and the step's
//! share of each stacked output's cotangent. Its new carries are the
//! cotangents of the step's carries and the constants' gradients summed
//! so far; its per-step outputs the sequences' gradients. The forward scan
//! saves the carries each step starts from as extra stacked outputs.
//!
//! The backward scan is an ordinary scan, so it can be differentiated
//! again: gradients of gradients through a loop need nothing more.

use std::collections::BTreeSet;
use std::sync::Arc;

use super::{AutodiffError, backward_node, vector_jacobian};
use crate::ir::{BinaryFn, Graph, Node, NodeId, Op, Origin, Role, Scan, Shape, Type};

/// The `grad_fn` of every node a scan's derivative adds.
const GRAD_FN: &str = "ScanBackward";

/// The gradients of the operands of scan node `id` marked in `wanted`,
/// from the cotangents of its results (`None`: no gradient reaches that
/// result). Returns (operand position, gradient node) pairs.
pub(super) fn vjp(
    graph: &mut Graph,
    id: NodeId,
    cotangents: &[Option<NodeId>],
    wanted: &[bool],
) -> Result<Vec<(usize, NodeId)>, AutodiffError> {
    let Op::Scan(forward) = &graph.node(id).op else {
        return Err(AutodiffError::InvalidGraph(format!("{id} is not a scan")));
    };
    let mut forward = (**forward).clone();
    let operands = graph.operands(id);
    let (carries, sequences) = (forward.carries, forward.sequences);
    let constants = forward.inputs.len() - carries - sequences;
    let origin = graph.node(id).origin;
    let invalid = |why: &str| AutodiffError::InvalidGraph(format!("scan {id}: {why}"));

    // The backward step: the forward body, its cotangent leaves, and the
    // nodes of its derivative.
    let mut body = (*forward.body).clone();
    let leaf_type = |body: &Graph, leaf: NodeId| body.node(leaf).ty.clone();
    let carry_cotangents: Vec<NodeId> = (0..carries)
        .map(|i| {
            let ty = leaf_type(&body, forward.inputs[i]);
            add_leaf(&mut body, format!("scan.cotangent.carry{i}"), ty, origin)
        })
        .collect();
    let wanted_constants: Vec<usize> = (0..constants)
        .filter(|&c| wanted[carries + sequences + c])
        .collect();
    let accumulators: Vec<NodeId> = wanted_constants
        .iter()
        .map(|&c| {
            let ty = leaf_type(&body, forward.inputs[carries + sequences + c]);
            add_leaf(&mut body, format!("scan.gradient.with{c}"), ty, origin)
        })
        .collect();
    let outputs_reached: Vec<usize> = (0..forward.outputs())
        .filter(|&j| cotangents.get(carries + j).copied().flatten().is_some())
        .collect();
    let output_cotangents: Vec<NodeId> = outputs_reached
        .iter()
        .map(|&j| {
            let ty = leaf_type(&body, forward.results[carries + j]);
            add_leaf(&mut body, format!("scan.cotangent.output{j}"), ty, origin)
        })
        .collect();

    // The step's vector-Jacobian product: every result against its
    // cotangent.
    let mut seeds: Vec<(NodeId, NodeId)> = (0..carries)
        .map(|i| (forward.results[i], carry_cotangents[i]))
        .collect();
    for (&j, &cotangent) in outputs_reached.iter().zip(&output_cotangents) {
        seeds.push((forward.results[carries + j], cotangent));
    }
    let wanted_sequences: Vec<usize> = (0..sequences).filter(|&j| wanted[carries + j]).collect();
    let mut differentiated: BTreeSet<NodeId> = forward.inputs[..carries].iter().copied().collect();
    differentiated.extend(
        wanted_sequences
            .iter()
            .map(|&j| forward.inputs[carries + j]),
    );
    differentiated.extend(
        wanted_constants
            .iter()
            .map(|&c| forward.inputs[carries + sequences + c]),
    );
    let grads = vector_jacobian(&mut body, &seeds, &differentiated)?;
    let gradient_of = |body: &mut Graph, leaf: NodeId| match grads.get(&leaf) {
        Some(&g) => Ok::<_, AutodiffError>(g),
        None => Ok(zeros(body, leaf_type(body, leaf), origin)),
    };

    let mut results = Vec::new();
    for i in 0..carries {
        results.push(gradient_of(&mut body, forward.inputs[i])?);
    }
    for (&c, &accumulator) in wanted_constants.iter().zip(&accumulators) {
        let g = gradient_of(&mut body, forward.inputs[carries + sequences + c])?;
        // (The accumulator and the gradient have the constant's type.)
        let ty = body.node(accumulator).ty.clone();
        let sum = Node::derived(Op::Binary(BinaryFn::Add), ty, origin, None);
        results.push(body.add(sum, &[accumulator, g]));
    }
    for &j in &wanted_sequences {
        results.push(gradient_of(&mut body, forward.inputs[carries + j])?);
    }
    // Without `checkpoint`, the forward values the derivative reads are
    // saved at every step instead of recomputed from the saved carries.
    let mut residuals = Vec::new();
    if !forward.checkpoint {
        // (A loop inside the step is recomputed in the backward step: its
        // other results, which its own derivative reads, are not values
        // of the forward body.)
        let is_forward = |id: NodeId| {
            forward.body.contains(id)
                && !matches!(
                    body.node(id).op,
                    Op::Input | Op::Scan(_) | Op::ScanResult { .. }
                )
        };
        let mut read = BTreeSet::new();
        for user in body.ids() {
            if forward.body.contains(user) {
                continue;
            }
            read.extend(body.operands(user).into_iter().filter(|&o| is_forward(o)));
        }
        for (n, value) in read.into_iter().enumerate() {
            let ty = body.node(value).ty.clone();
            let leaf = add_leaf(&mut body, format!("scan.saved{n}"), ty, origin);
            for user in body.users(value) {
                if forward.body.contains(user) {
                    continue;
                }
                for (position, operand) in body.operands(user).into_iter().enumerate() {
                    if operand == value {
                        body.set_operand(user, position, leaf);
                    }
                }
            }
            for result in &mut results {
                if *result == value {
                    *result = leaf;
                }
            }
            residuals.push((value, leaf));
        }
    }
    prune(&mut body, &results);

    // What each step reads: the cotangents of the stacked outputs, the
    // carries the forward step started from, the saved residuals and the
    // sequences' elements; then the constants. A leaf the pruned body
    // does not read is left out.
    enum Source {
        Outer(NodeId),
        Saved(NodeId),
    }
    let mut stepped: Vec<(NodeId, Source)> = Vec::new();
    for (&j, &leaf) in outputs_reached.iter().zip(&output_cotangents) {
        let cotangent = cotangents[carries + j].ok_or_else(|| invalid("cotangent"))?;
        stepped.push((leaf, Source::Outer(cotangent)));
    }
    for &leaf in &forward.inputs[..carries] {
        stepped.push((leaf, Source::Saved(leaf)));
    }
    for &(value, leaf) in &residuals {
        stepped.push((leaf, Source::Saved(value)));
    }
    for j in 0..sequences {
        stepped.push((
            forward.inputs[carries + j],
            Source::Outer(operands[carries + j]),
        ));
    }
    let used = |body: &Graph, leaf: NodeId| !body.users(leaf).is_empty() || results.contains(&leaf);
    stepped.retain(|(leaf, _)| used(&body, *leaf));
    let read_constants: Vec<usize> = (0..constants)
        .filter(|&c| used(&body, forward.inputs[carries + sequences + c]))
        .collect();

    // The forward scan outputs every value saved at each step.
    let mut stepped_operands = Vec::new();
    for (_, source) in &stepped {
        let operand = match *source {
            Source::Outer(node) => node,
            Source::Saved(value) => {
                let output = match forward.results[carries..].iter().position(|&r| r == value) {
                    Some(output) => output,
                    None => {
                        forward.results.push(value);
                        forward.outputs() - 1
                    }
                };
                graph.node_mut(id).op = Op::Scan(Box::new(forward.clone()));
                result_node(graph, (id, id), &forward, carries + output)?
            }
        };
        stepped_operands.push(operand);
    }

    // The backward scan's operands.
    let mut backward_operands = Vec::new();
    for i in 0..carries {
        let value = match cotangents.get(i).copied().flatten() {
            Some(cotangent) => cotangent,
            None => {
                let ty = forward
                    .operand_type(i)
                    .ok_or_else(|| invalid("carry type"))?;
                outer_zeros(graph, id, ty)
            }
        };
        backward_operands.push(value);
    }
    for &c in &wanted_constants {
        let ty = graph.node(operands[carries + sequences + c]).ty.clone();
        backward_operands.push(outer_zeros(graph, id, ty));
    }
    backward_operands.extend(stepped_operands);
    backward_operands.extend(
        read_constants
            .iter()
            .map(|&c| operands[carries + sequences + c]),
    );

    let mut inputs = carry_cotangents.clone();
    inputs.extend(&accumulators);
    inputs.extend(stepped.iter().map(|(leaf, _)| *leaf));
    inputs.extend(
        read_constants
            .iter()
            .map(|&c| forward.inputs[carries + sequences + c]),
    );
    for leaf in body.ids() {
        if body.node(leaf).op == Op::Input && !inputs.contains(&leaf) {
            body.remove(leaf);
        }
    }
    let backward = Scan {
        body: Arc::new(body),
        inputs,
        results,
        carries: carries + accumulators.len(),
        sequences: stepped.len(),
        length: forward.length.clone(),
        reverse: !forward.reverse,
        checkpoint: forward.checkpoint,
    };
    let ty = backward
        .result_type(0)
        .ok_or_else(|| invalid("no result"))?;
    let node = backward_node(graph, id, Op::Scan(Box::new(backward.clone())), ty, GRAD_FN);
    let backward_id = graph.add(node, &backward_operands);

    let mut contributions = Vec::new();
    for i in (0..carries).filter(|&i| wanted[i]) {
        contributions.push((i, result_node(graph, (backward_id, id), &backward, i)?));
    }
    for (n, &c) in wanted_constants.iter().enumerate() {
        let g = result_node(graph, (backward_id, id), &backward, carries + n)?;
        contributions.push((carries + sequences + c, g));
    }
    for (n, &j) in wanted_sequences.iter().enumerate() {
        let index = backward.carries + n;
        contributions.push((
            carries + j,
            result_node(graph, (backward_id, id), &backward, index)?,
        ));
    }
    Ok(contributions)
}

/// Result `index` of the scan node `id`: the node itself for result 0,
/// else a `scan_result` of it, part of the backward pass of `of`.
fn result_node(
    graph: &mut Graph,
    (id, of): (NodeId, NodeId),
    scan: &Scan,
    index: usize,
) -> Result<NodeId, AutodiffError> {
    if index == 0 {
        return Ok(id);
    }
    let ty = scan
        .result_type(index)
        .ok_or_else(|| AutodiffError::InvalidGraph(format!("scan {id} has no result {index}")))?;
    let node = backward_node(graph, of, Op::ScanResult { index }, ty, GRAD_FN);
    Ok(graph.add(node, &[id]))
}

/// Zeros of type `ty` in the joint graph, part of the backward pass of `id`.
fn outer_zeros(graph: &mut Graph, id: NodeId, ty: Type) -> NodeId {
    let scalar = Type::new(ty.dtype, Shape::scalar());
    let zero = backward_node(graph, id, Op::Constant(0.0), scalar, GRAD_FN);
    let zero = graph.add(zero, &[]);
    let expand = backward_node(graph, id, Op::Expand, ty, GRAD_FN);
    graph.add(expand, &[zero])
}

/// Zeros of type `ty` in a body graph.
fn zeros(body: &mut Graph, ty: Type, origin: Origin) -> NodeId {
    let scalar = Type::new(ty.dtype, Shape::scalar());
    let zero = body.add(Node::derived(Op::Constant(0.0), scalar, origin, None), &[]);
    body.add(Node::derived(Op::Expand, ty, origin, None), &[zero])
}

/// A body leaf: an input of the scan, named `name` (with a number after
/// it if a leaf has that name already: a derivative's derivative).
fn add_leaf(body: &mut Graph, name: String, ty: Type, origin: Origin) -> NodeId {
    let taken: BTreeSet<String> = body
        .ids()
        .into_iter()
        .filter_map(|id| body.node(id).name.clone())
        .collect();
    let name = (1..)
        .map(|n| match n {
            1 => name.clone(),
            n => format!("{name}.{n}"),
        })
        .find(|candidate| !taken.contains(candidate))
        .unwrap_or(name);
    let node = Node {
        op: Op::Input,
        ty,
        role: Role::Input,
        name: Some(name),
        retain: false,
        origin,
        backward: None,
    };
    body.add(node, &[])
}

/// Removes the body nodes no result needs, but for the leaves (every leaf
/// is an operand of the scan).
fn prune(body: &mut Graph, results: &[NodeId]) {
    let mut live = BTreeSet::new();
    let mut stack = results.to_vec();
    while let Some(id) = stack.pop() {
        if live.insert(id) {
            stack.extend(body.operands(id));
        }
    }
    for id in body.ids() {
        if !live.contains(&id) && body.node(id).op != Op::Input {
            body.remove(id);
        }
    }
}
