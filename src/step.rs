//! The train-step graph: one graph that runs a whole training step.
//!
//! [`build`] takes a model's train-mode forward graph and its train
//! configuration and returns the forward graph, its backward graph
//! (`autodiff`), gradient clipping, the update of every trainable param and
//! of the optimizer state (PyTorch's formulas, written with ordinary IR
//! ops), the new batch-norm running statistics, and the monitor statistics,
//! as one graph. The learning rate and the step counter are runtime inputs
//! (`optimizer.lr`, `optimizer.step`), so a schedule never rebuilds it.
//!
//! Results are roles: `update <name>` for every param, buffer and state the
//! step changes, `stat <name>` for the monitor, plus the loss and outputs.

use std::collections::BTreeMap;

use crate::autodiff::{self, AutodiffError};
use crate::ir::{BinaryFn, DType, Graph, Node, NodeId, Op, ReduceFn, Role, Shape, Type, UnaryFn};
use crate::lower::train::{Clip, Optimizer, TrainConfig};

/// The runtime input holding the learning rate.
pub const LR: &str = "optimizer.lr";
/// The runtime input holding the step counter (1 for the first step).
pub const STEP: &str = "optimizer.step";

/// Builds the step graph of a train-mode forward graph.
pub fn build(forward: &Graph, config: &TrainConfig) -> Result<Graph, AutodiffError> {
    let joint = autodiff::differentiate(forward)?;
    let mut b = Builder {
        graph: joint,
        dtype: forward
            .loss()
            .map_or(DType::F32, |loss| forward.node(loss).dtype()),
    };
    let Some(anchor) = b.graph.loss().or_else(|| b.graph.ids().first().copied()) else {
        return Err(AutodiffError::InvalidGraph("the graph is empty".into()));
    };
    let lr = b.leaf(Op::Input, LR, Role::Input, anchor);
    let step = b.leaf(Op::Input, STEP, Role::Input, anchor);

    // Params with a gradient, in declaration order.
    let mut params: Vec<(String, NodeId, NodeId)> = Vec::new();
    for id in b.graph.with_role(&Role::Param) {
        let name = b.graph.node(id).name.clone().unwrap_or_default();
        if let Some(&grad) = b.graph.with_role(&Role::Gradient(name.clone())).first() {
            params.push((name, id, grad));
        }
    }

    // Monitor: gradient norms and zero fractions, before clipping.
    let mut squares = Vec::new();
    for (name, _, grad) in &params {
        let square = b.op(Op::Binary(BinaryFn::Mul), &[*grad, *grad], *grad);
        let sum = b.reduce_all(square, *grad);
        squares.push(sum);
        let norm = b.op(Op::Unary(UnaryFn::Sqrt), &[sum], *grad);
        b.stat(norm, &format!("grad_norm.{name}"));
        let zeros = b.op(Op::ZeroFraction, &[*grad], *grad);
        b.stat(zeros, &format!("zero_grad.{name}"));
    }
    // Monitor: the gradient norm of every retained value (`retain`), such
    // as one step's input to a recurrence.
    let mut retained: Vec<(String, NodeId)> = Vec::new();
    for id in b.graph.ids() {
        if let Role::Gradient(name) = &b.graph.node(id).role
            && !params.iter().any(|(param, _, _)| param == name)
        {
            retained.push((name.clone(), id));
        }
    }
    retained.sort();
    for (name, grad) in retained {
        let square = b.op(Op::Binary(BinaryFn::Mul), &[grad, grad], grad);
        let sum = b.reduce_all(square, grad);
        let norm = b.op(Op::Unary(UnaryFn::Sqrt), &[sum], grad);
        b.stat(norm, &format!("value_grad_norm.{name}"));
    }
    let total = squares
        .iter()
        .copied()
        .reduce(|a, c| b.op(Op::Binary(BinaryFn::Add), &[a, c], anchor));
    let total_norm = total.map(|t| b.op(Op::Unary(UnaryFn::Sqrt), &[t], anchor));
    if let Some(norm) = total_norm {
        b.stat(norm, "grad_norm");
    }

    // Clipping, as torch.nn.utils.clip_grad_norm_ / clip_grad_value_.
    let mut grads: BTreeMap<String, NodeId> =
        params.iter().map(|(n, _, g)| (n.clone(), *g)).collect();
    match (config.clip, total_norm) {
        (Some(Clip::Norm(max_norm)), Some(norm)) => {
            let eps = b.constant(1e-6, anchor);
            let denominator = b.op(Op::Binary(BinaryFn::Add), &[norm, eps], anchor);
            let max_norm = b.constant(max_norm, anchor);
            let coefficient = b.op(Op::Binary(BinaryFn::Div), &[max_norm, denominator], anchor);
            let one = b.constant(1.0, anchor);
            let clamped = b.op(Op::Binary(BinaryFn::Minimum), &[coefficient, one], anchor);
            for grad in grads.values_mut() {
                *grad = b.op(Op::Binary(BinaryFn::Mul), &[*grad, clamped], *grad);
            }
        }
        (Some(Clip::Value(v)), _) => {
            for grad in grads.values_mut() {
                *grad = b.op(Op::Clamp { lo: -v, hi: v }, &[*grad], *grad);
            }
        }
        _ => {}
    }

    for (name, param, _) in &params {
        let grad = grads[name];
        let new = match &config.optimizer {
            Optimizer::Sgd {
                momentum,
                nesterov,
                weight_decay,
                ..
            } => b.sgd(name, *param, grad, lr, *momentum, *nesterov, *weight_decay),
            Optimizer::Adam {
                betas,
                eps,
                weight_decay,
                decoupled,
                ..
            } => b.adam(
                name,
                *param,
                grad,
                lr,
                step,
                *betas,
                *eps,
                *weight_decay,
                *decoupled,
            ),
        };
        // Monitor: how far the step moved the param, relative to its size
        // (`update/weight`).
        let delta = b.op(Op::Binary(BinaryFn::Sub), &[new, *param], *param);
        let delta_norm = b.norm(delta, *param);
        // Relative to the new value, so a param that starts at zero reads 1.
        let param_norm = b.norm(new, *param);
        let tiny = b.constant(1e-12, *param);
        let denominator = b.op(Op::Binary(BinaryFn::Add), &[param_norm, tiny], *param);
        let ratio = b.op(
            Op::Binary(BinaryFn::Div),
            &[delta_norm, denominator],
            *param,
        );
        b.stat(ratio, &format!("update_ratio.{name}"));
        b.update(new, name);
    }

    // Batch-norm running statistics, and dead ReLU units.
    for id in forward.ids() {
        let node = forward.node(id).clone();
        match node.op {
            Op::BatchNorm {
                momentum,
                training: true,
                ..
            } => {
                let operands = forward.operands(id);
                for (position, variance) in [(3, false), (4, true)] {
                    let buffer = operands[position];
                    let name = forward.node(buffer).name.clone().unwrap_or_default();
                    let new = b.op(
                        Op::RunningStat { momentum, variance },
                        &[operands[0], buffer],
                        id,
                    );
                    b.update(new, &name);
                }
            }
            Op::Unary(UnaryFn::Relu) if node.shape().rank() >= 2 => {
                let dead = b.op(Op::DeadFraction, &[id], id);
                let label = node
                    .name
                    .clone()
                    .unwrap_or_else(|| format!("relu@{}:{}", node.origin.line, node.origin.col));
                b.stat(dead, &format!("dead.{label}"));
            }
            _ => {}
        }
    }
    Ok(b.graph)
}

/// Adds nodes with their types inferred, each taking the source position of
/// an existing node (`like`).
struct Builder {
    graph: Graph,
    dtype: DType,
}

impl Builder {
    fn node(&self, op: Op, ty: Type, like: NodeId) -> Node {
        Node::derived(op, ty, self.graph.node(like).origin, None)
    }

    fn op(&mut self, op: Op, operands: &[NodeId], like: NodeId) -> NodeId {
        let types: Vec<Type> = operands
            .iter()
            .map(|&o| self.graph.node(o).ty.clone())
            .collect();
        let refs: Vec<&Type> = types.iter().collect();
        let declared = Type::new(self.dtype, Shape::scalar());
        let ty = op
            .infer(&refs, &declared)
            .unwrap_or_else(|e| panic!("step graph: {} rejects {types:?}: {e:?}", op.name()));
        let node = self.node(op, ty, like);
        self.graph.add(node, operands)
    }

    fn leaf(&mut self, op: Op, name: &str, role: Role, like: NodeId) -> NodeId {
        let mut node = self.node(op, Type::new(self.dtype, Shape::scalar()), like);
        node.role = role;
        node.name = Some(name.to_string());
        self.graph.add(node, &[])
    }

    fn state(&mut self, name: &str, like: NodeId) -> NodeId {
        let mut node = self.node(Op::State, self.graph.node(like).ty.clone(), like);
        node.role = Role::OptimizerState;
        node.name = Some(name.to_string());
        self.graph.add(node, &[])
    }

    fn constant(&mut self, value: f64, like: NodeId) -> NodeId {
        let node = self.node(
            Op::Constant(value),
            Type::new(self.dtype, Shape::scalar()),
            like,
        );
        self.graph.add(node, &[])
    }

    /// Multiplies by a constant.
    fn scale(&mut self, x: NodeId, factor: f64) -> NodeId {
        let c = self.constant(factor, x);
        self.op(Op::Binary(BinaryFn::Mul), &[c, x], x)
    }

    fn add(&mut self, a: NodeId, c: NodeId) -> NodeId {
        self.op(Op::Binary(BinaryFn::Add), &[a, c], a)
    }

    fn reduce_all(&mut self, x: NodeId, like: NodeId) -> NodeId {
        let axes = (0..self.graph.node(x).shape().rank()).collect();
        self.op(
            Op::Reduce {
                func: ReduceFn::Sum,
                axes,
                keepdims: false,
            },
            &[x],
            like,
        )
    }

    fn norm(&mut self, x: NodeId, like: NodeId) -> NodeId {
        let square = self.op(Op::Binary(BinaryFn::Mul), &[x, x], like);
        let sum = self.reduce_all(square, like);
        self.op(Op::Unary(UnaryFn::Sqrt), &[sum], like)
    }

    /// Gives a node a role, through an identity if it already has one.
    fn role(&mut self, id: NodeId, role: Role) {
        let target = if self.graph.node(id).role == Role::Intermediate {
            id
        } else {
            let ty = self.graph.node(id).ty.clone();
            let node = self.node(Op::Identity, ty, id);
            self.graph.add(node, &[id])
        };
        self.graph.node_mut(target).role = role;
    }

    fn stat(&mut self, id: NodeId, name: &str) {
        self.role(id, Role::Stat(name.to_string()));
    }

    fn update(&mut self, id: NodeId, name: &str) {
        self.role(id, Role::Update(name.to_string()));
    }

    /// `torch.optim.SGD`: `g += wd p; buf = momentum buf + g; g = g +
    /// momentum buf (Nesterov) or buf; p -= lr g`.
    fn sgd(
        &mut self,
        name: &str,
        param: NodeId,
        grad: NodeId,
        lr: NodeId,
        momentum: f64,
        nesterov: bool,
        weight_decay: f64,
    ) -> NodeId {
        let mut g = grad;
        if weight_decay != 0.0 {
            let decay = self.scale(param, weight_decay);
            g = self.add(g, decay);
        }
        if momentum != 0.0 {
            let buffer = self.state(&format!("sgd.momentum.{name}"), param);
            let kept = self.scale(buffer, momentum);
            let new_buffer = self.add(kept, g);
            self.update(new_buffer, &format!("sgd.momentum.{name}"));
            g = if nesterov {
                let ahead = self.scale(new_buffer, momentum);
                self.add(g, ahead)
            } else {
                new_buffer
            };
        }
        let step = self.op(Op::Binary(BinaryFn::Mul), &[lr, g], param);
        self.op(Op::Binary(BinaryFn::Sub), &[param, step], param)
    }

    /// `torch.optim.Adam` and `AdamW` (decoupled decay), in PyTorch's order
    /// of operations: `m = b1 m + (1 - b1) g; v = b2 v + (1 - b2) g^2;
    /// p -= (lr / (1 - b1^t)) m / (sqrt(v) / sqrt(1 - b2^t) + eps)`.
    fn adam(
        &mut self,
        name: &str,
        param: NodeId,
        grad: NodeId,
        lr: NodeId,
        step: NodeId,
        (beta1, beta2): (f64, f64),
        eps: f64,
        weight_decay: f64,
        decoupled: bool,
    ) -> NodeId {
        let mut g = grad;
        let mut p = param;
        if weight_decay != 0.0 && !decoupled {
            let decay = self.scale(param, weight_decay);
            g = self.add(g, decay);
        }
        if weight_decay != 0.0 && decoupled {
            // p *= 1 - lr wd
            let lr_decay = self.scale(lr, weight_decay);
            let one = self.constant(1.0, param);
            let keep = self.op(Op::Binary(BinaryFn::Sub), &[one, lr_decay], param);
            p = self.op(Op::Binary(BinaryFn::Mul), &[param, keep], param);
        }
        let m = self.state(&format!("adam.m.{name}"), param);
        let v = self.state(&format!("adam.v.{name}"), param);
        let m_kept = self.scale(m, beta1);
        let g_part = self.scale(g, 1.0 - beta1);
        let new_m = self.add(m_kept, g_part);
        let v_kept = self.scale(v, beta2);
        let g_squared = self.op(Op::Binary(BinaryFn::Mul), &[g, g], param);
        let g2_part = self.scale(g_squared, 1.0 - beta2);
        let new_v = self.add(v_kept, g2_part);
        self.update(new_m, &format!("adam.m.{name}"));
        self.update(new_v, &format!("adam.v.{name}"));
        let one = self.constant(1.0, param);
        let b1 = self.constant(beta1, param);
        let b1_t = self.op(Op::Binary(BinaryFn::Pow), &[b1, step], param);
        let correction1 = self.op(Op::Binary(BinaryFn::Sub), &[one, b1_t], param);
        let b2 = self.constant(beta2, param);
        let b2_t = self.op(Op::Binary(BinaryFn::Pow), &[b2, step], param);
        let correction2 = self.op(Op::Binary(BinaryFn::Sub), &[one, b2_t], param);
        let step_size = self.op(Op::Binary(BinaryFn::Div), &[lr, correction1], param);
        let root_v = self.op(Op::Unary(UnaryFn::Sqrt), &[new_v], param);
        let root_c2 = self.op(Op::Unary(UnaryFn::Sqrt), &[correction2], param);
        let scaled = self.op(Op::Binary(BinaryFn::Div), &[root_v, root_c2], param);
        let eps = self.constant(eps, param);
        let denominator = self.add(scaled, eps);
        let direction = self.op(Op::Binary(BinaryFn::Div), &[new_m, denominator], param);
        let step = self.op(Op::Binary(BinaryFn::Mul), &[step_size, direction], param);
        self.op(Op::Binary(BinaryFn::Sub), &[p, step], param)
    }
}
