//! Reverse-mode automatic differentiation as a graph transform.
//!
//! [`differentiate`] takes a forward graph with a `loss` and returns the
//! joint graph: the forward nodes plus the backward nodes that compute
//! `d(loss)/d(p)` for every trainable param `p` and every retained value.
//! The sweep is tinygrad's: visit, in reverse topological order, only the
//! nodes between the loss and the wanted leaves; apply each op's rule
//! ([`rules::rule`]) to get one gradient per operand; accumulate with `+`
//! where a value fans out; sum back over broadcast axes (`sum_to`).
//!
//! What is a constant to the backward pass: `stop_gradient`, everything
//! computed inside `no_grad`, inputs, buffers, frozen params, labels and
//! indices. Frozen params are never wanted, so the backward subgraph that
//! would only serve them is never built (pruned, not computed and dropped).
//! Every backward node records its forward node and `grad_fn` name.

pub mod rules;
mod scan;

use std::collections::{BTreeSet, HashMap};
use std::fmt;

use crate::ir::{Backward, BinaryFn, Graph, Node, NodeId, Op, Role, Shape, Type};
use rules::Rule;

/// Why a graph could not be differentiated: always a compiler bug or a
/// missing rule, never a user error.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AutodiffError {
    /// An op on the gradient path has no derivative rule.
    MissingRule {
        /// The op's name.
        op: String,
        /// Its 1-based source line.
        line: u32,
    },
    /// The forward graph has a cycle or fails typing.
    InvalidGraph(String),
}

impl fmt::Display for AutodiffError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AutodiffError::MissingRule { op, line } => {
                write!(
                    f,
                    "no derivative rule for `{op}` (line {line}) on the gradient path"
                )
            }
            AutodiffError::InvalidGraph(why) => {
                write!(f, "cannot differentiate an invalid graph: {why}")
            }
        }
    }
}

impl std::error::Error for AutodiffError {}

/// Which nodes the backward pass touches.
#[derive(Clone, Debug, Default)]
pub struct Reach {
    /// Nodes whose value depends differentiably on a wanted leaf (a
    /// trainable param or a retained value).
    pub depends: BTreeSet<NodeId>,
    /// Nodes the loss depends on (the loss included), through any edge.
    pub feeds_loss: BTreeSet<NodeId>,
}

impl Reach {
    /// Whether a gradient from the loss reaches `id`.
    pub(crate) fn gets_gradient(&self, id: NodeId) -> bool {
        self.depends.contains(&id) && self.feeds_loss.contains(&id)
    }
}

/// Whether gradient can flow from `user` back into its operand at
/// `position`.
pub(crate) fn flows(graph: &Graph, user: NodeId, position: usize) -> bool {
    let node = graph.node(user);
    // An op without a rule (`Missing`) still passes dependence on: the
    // sweep must stop with an error there, never treat it as a constant.
    node.origin.no_grad.is_none()
        && !matches!(
            rules::rule(&node.op, position),
            Rule::Stopped | Rule::NotDifferentiable
        )
}

/// The leaves and values whose gradients the backward pass computes:
/// trainable params and retained values.
pub fn wanted(graph: &Graph) -> BTreeSet<NodeId> {
    graph
        .ids()
        .into_iter()
        .filter(|&id| {
            let node = graph.node(id);
            node.role == Role::Param || node.retain
        })
        .collect()
}

/// Computes [`Reach`] for a forward graph: from its loss to its
/// [`wanted`] values.
pub fn reach(graph: &Graph) -> Result<Reach, AutodiffError> {
    reach_between(graph, graph.loss().as_slice(), &wanted(graph))
}

/// Computes [`Reach`] from the `roots` to the `wanted` values.
fn reach_between(
    graph: &Graph,
    roots: &[NodeId],
    wanted: &BTreeSet<NodeId>,
) -> Result<Reach, AutodiffError> {
    let order = graph
        .topo_order()
        .ok_or_else(|| AutodiffError::InvalidGraph("it has a cycle".into()))?;
    let mut reach = Reach::default();
    for &id in &order {
        let differentiable_input = graph
            .operands(id)
            .iter()
            .enumerate()
            .any(|(i, operand)| reach.depends.contains(operand) && flows(graph, id, i));
        if wanted.contains(&id) || differentiable_input {
            reach.depends.insert(id);
        }
    }
    let mut stack = roots.to_vec();
    while let Some(id) = stack.pop() {
        if reach.feeds_loss.insert(id) {
            stack.extend(graph.operands(id));
        }
    }
    Ok(reach)
}

/// Builds the joint forward and backward graph. A graph without a loss
/// comes back unchanged.
pub fn differentiate(forward: &Graph) -> Result<Graph, AutodiffError> {
    let mut graph = forward.clone();
    let Some(loss) = graph.loss() else {
        return Ok(graph);
    };
    let grads = gradients(&mut graph, loss, &wanted(forward))?;
    // Mark the gradients the backward graph exists to compute.
    for id in wanted(&graph) {
        let Some(&grad) = grads.get(&id) else {
            continue;
        };
        let name = graph.node(id).name.clone().unwrap_or_default();
        let target = if graph.node(grad).role == Role::Intermediate {
            grad
        } else {
            let ty = graph.node(grad).ty.clone();
            let copy = backward_node(&graph, id, Op::Identity, ty, "AccumulateGrad");
            graph.add(copy, &[grad])
        };
        graph.node_mut(target).role = Role::Gradient(name);
    }
    Ok(graph)
}

/// Adds to `graph` the nodes that compute the gradient of the scalar `root`
/// with respect to each of the `wanted` values (`torch.autograd.grad` with
/// `create_graph=True`): the nodes are ordinary ops, so a later sweep can
/// differentiate them again. Returns the gradient node of every wanted
/// value that a gradient reaches; the others are zero.
pub fn gradients(
    graph: &mut Graph,
    root: NodeId,
    wanted: &BTreeSet<NodeId>,
) -> Result<HashMap<NodeId, NodeId>, AutodiffError> {
    let seed = backward_node(
        graph,
        root,
        Op::Constant(1.0),
        Type::new(graph.node(root).dtype(), Shape::scalar()),
        "GradSeed",
    );
    let seed = graph.add(seed, &[]);
    let grads = vector_jacobian(graph, &[(root, seed)], wanted)?;
    if grads.is_empty() && graph.users(seed).is_empty() {
        graph.remove(seed);
    }
    Ok(grads)
}

/// Adds to `graph` the nodes that compute the vector-Jacobian product of
/// the `seeds` (value, its cotangent) with respect to each of the
/// `wanted` values: the gradient of `sum(value * cotangent)` over the
/// seeds. What [`gradients`] and a scan's derivative build on.
pub(crate) fn vector_jacobian(
    graph: &mut Graph,
    seeds: &[(NodeId, NodeId)],
    wanted: &BTreeSet<NodeId>,
) -> Result<HashMap<NodeId, NodeId>, AutodiffError> {
    let roots: Vec<NodeId> = seeds.iter().map(|&(value, _)| value).collect();
    let reach = reach_between(graph, &roots, wanted)?;
    let order = graph
        .topo_order()
        .ok_or_else(|| AutodiffError::InvalidGraph("it has a cycle".into()))?;
    let mut grads: HashMap<NodeId, NodeId> = HashMap::new();
    for &(value, cotangent) in seeds {
        if reach.gets_gradient(value) {
            accumulate(graph, &mut grads, value, cotangent);
        }
    }
    // Cotangents of the results of scans other than result 0, by (scan,
    // result): a scan is differentiated whole, from all of them at once.
    let mut scan_cotangents: HashMap<(NodeId, usize), NodeId> = HashMap::new();
    for &id in order.iter().rev() {
        let node = graph.node(id).clone();
        if node.origin.no_grad.is_some() {
            continue;
        }
        if let Op::Scan(scan) = &node.op {
            let mut cotangents = vec![grads.get(&id).copied()];
            for index in 1..scan.results.len() {
                cotangents.push(scan_cotangents.remove(&(id, index)));
            }
            if cotangents.iter().all(Option::is_none) {
                continue;
            }
            let operands = graph.operands(id);
            let wanted: Vec<bool> = operands
                .iter()
                .enumerate()
                .map(|(i, &o)| reach.gets_gradient(o) && rules::rule(&node.op, i) == Rule::Graph)
                .collect();
            if !wanted.contains(&true) {
                continue;
            }
            for (position, contribution) in scan::vjp(graph, id, &cotangents, &wanted)? {
                accumulate(graph, &mut grads, operands[position], contribution);
            }
            continue;
        }
        let Some(&upstream) = grads.get(&id) else {
            continue;
        };
        let operands = graph.operands(id);
        if let Op::ScanResult { index } = node.op {
            let key = (operands[0], index);
            let total = match scan_cotangents.get(&key) {
                None => upstream,
                Some(&previous) => add_gradients(graph, operands[0], previous, upstream),
            };
            scan_cotangents.insert(key, total);
            continue;
        }
        for (position, &operand) in operands.iter().enumerate() {
            if !reach.gets_gradient(operand) {
                continue;
            }
            let contribution = match rules::rule(&node.op, position) {
                Rule::Graph => graph_rule(graph, id, &node, position, upstream, &operands)?,
                Rule::PassThrough => upstream,
                Rule::Stopped | Rule::NotDifferentiable => continue,
                Rule::Missing => {
                    return Err(AutodiffError::MissingRule {
                        op: node.op.name(),
                        line: node.origin.line,
                    });
                }
            };
            accumulate(graph, &mut grads, operand, contribution);
        }
    }
    grads.retain(|id, _| wanted.contains(id));
    Ok(grads)
}

/// Adds `contribution` to the gradient of `operand` collected so far.
fn accumulate(
    graph: &mut Graph,
    grads: &mut HashMap<NodeId, NodeId>,
    operand: NodeId,
    contribution: NodeId,
) {
    let total = match grads.get(&operand) {
        None => contribution,
        Some(&previous) => add_gradients(graph, operand, previous, contribution),
    };
    grads.insert(operand, total);
}

/// `a + b`, two gradients of the value `of`.
fn add_gradients(graph: &mut Graph, of: NodeId, a: NodeId, b: NodeId) -> NodeId {
    let ty = graph.node(a).ty.clone();
    let sum = backward_node(graph, of, Op::Binary(BinaryFn::Add), ty, "AccumulateGrad");
    graph.add(sum, &[a, b])
}

/// Emits a graph rule's nodes into the joint graph, each marked as part of
/// the backward pass of `forward`.
struct Emitter<'g> {
    graph: &'g mut Graph,
    forward: NodeId,
    grad_fn: &'static str,
    dtype: crate::ir::DType,
    /// The first typing failure (a compiler bug in a rule).
    error: Option<String>,
}

impl rules::Emit for Emitter<'_> {
    fn op(&mut self, op: Op, operands: &[NodeId], declared: Option<Type>) -> NodeId {
        let types: Vec<Type> = operands
            .iter()
            .map(|&o| self.graph.node(o).ty.clone())
            .collect();
        let refs: Vec<&Type> = types.iter().collect();
        let declared = declared.unwrap_or_else(|| Type::new(self.dtype, Shape::scalar()));
        let ty = match op.infer(&refs, &declared) {
            Ok(ty) => ty,
            Err(e) => {
                self.error
                    .get_or_insert_with(|| format!("{} in a gradient: {e:?}", op.name()));
                declared
            }
        };
        let node = backward_node(self.graph, self.forward, op, ty, self.grad_fn);
        self.graph.add(node, operands)
    }

    fn type_of(&self, id: NodeId) -> Type {
        self.graph.node(id).ty.clone()
    }

    fn constant(&mut self, value: f64) -> NodeId {
        let ty = Type::new(self.dtype, Shape::scalar());
        let node = backward_node(
            self.graph,
            self.forward,
            Op::Constant(value),
            ty,
            self.grad_fn,
        );
        self.graph.add(node, &[])
    }
}

/// The gradient of operand `position` of `id` built from forward ops
/// ([`rules::gradient`]), followed by a `sum_to` when broadcasting
/// stretched the operand.
fn graph_rule(
    graph: &mut Graph,
    id: NodeId,
    node: &Node,
    position: usize,
    upstream: NodeId,
    operands: &[NodeId],
) -> Result<NodeId, AutodiffError> {
    let grad_fn = rules::grad_fn(&node.op);
    let operand_type = graph.node(operands[position]).ty.clone();
    let mut emitter = Emitter {
        graph,
        forward: id,
        grad_fn,
        dtype: operand_type.dtype,
        error: None,
    };
    let gradient = rules::gradient(&mut emitter, &node.op, position, upstream, operands, id)
        .ok_or_else(|| AutodiffError::MissingRule {
            op: node.op.name(),
            line: node.origin.line,
        })?;
    if let Some(error) = emitter.error {
        return Err(AutodiffError::InvalidGraph(error));
    }
    if graph.node(gradient).ty.shape == operand_type.shape {
        return Ok(gradient);
    }
    let reduce = backward_node(graph, id, Op::SumTo, operand_type, grad_fn);
    Ok(graph.add(reduce, &[gradient]))
}

/// A node of the backward pass of `forward`: one order above `forward`
/// itself (a gradient of a gradient is of order 2).
fn backward_node(graph: &Graph, forward: NodeId, op: Op, ty: Type, grad_fn: &'static str) -> Node {
    let order = graph.node(forward).backward.as_ref().map_or(0, |b| b.order) + 1;
    Node::derived(
        op,
        ty,
        graph.node(forward).origin,
        Some(Backward {
            forward,
            grad_fn,
            order,
        }),
    )
}
