//! Composite ops and their one definition: the primitive graph each
//! expands into.
//!
//! `softmax`, `log_softmax`, `logsumexp`, `layer_norm`, `batch_norm`, the
//! running statistics, `cross_entropy` and the kernels the JIT recognises
//! ([`Op::Kernel`]) are written nowhere else as math. Autodiff sees them
//! whole (so their `grad_fn` names and derivative rules stay as PyTorch
//! shows them); the optimization pass `expand` then rewrites each into
//! reductions and elementwise ops before kernels are planned, and the
//! interpreter runs one by running its expansion ([`standalone`]). Every
//! backend therefore computes a composite the same way, op by op, each
//! `f32` op rounded where its primitive is.
//!
//! An expansion keeps the composite's node id for its last primitive, so
//! roles, names, `retain` and the uses of the value stay where they were;
//! the nodes it adds take the composite's source position and backward
//! marking.

use super::graph::{Graph, Node, NodeId};
use super::op::{BinaryFn, KernelOp, Op, ReduceFn, UnaryFn};
use super::types::{DType, Dim, Shape, Type};

/// Whether an op is a composite: defined by its expansion, run by no
/// backend as it is (but for the JIT's kernels, `Op::Kernel`).
pub fn is_composite(op: &Op) -> bool {
    matches!(
        op,
        Op::Softmax { .. }
            | Op::LogSoftmax { .. }
            | Op::Reduce {
                func: ReduceFn::LogSumExp,
                ..
            }
            | Op::LayerNorm { .. }
            | Op::BatchNorm { .. }
            | Op::RunningStat { .. }
            | Op::CrossEntropy
            | Op::Kernel(_)
    )
}

/// Expands every composite but the JIT's kernels; true if anything
/// changed. (The optimization pass `expand`.)
pub fn run(graph: &mut Graph) -> bool {
    let mut changed = false;
    for id in graph.topo_order().unwrap_or_default() {
        let op = &graph.node(id).op;
        if is_composite(op) && !matches!(op, Op::Kernel(_)) {
            // The expansions type-check by construction: a failure is a
            // compiler bug (the composite is then left to fail in a
            // backend with an internal error).
            match expand(graph, id) {
                Ok(()) => changed = true,
                Err(e) if cfg!(debug_assertions) => panic!("{e}"),
                Err(_) => {}
            }
        }
    }
    changed
}

/// The shapes whose sizes a composite needs checked when they are bound:
/// a train-mode batch norm's input, whose statistics must average more
/// than one value per channel (PyTorch's error; the expansion would give
/// a zero variance and a NaN running one).
pub fn checked_shapes(graph: &Graph) -> Vec<Shape> {
    graph
        .ids()
        .into_iter()
        .filter(|&id| matches!(graph.node(id).op, Op::BatchNorm { training: true, .. }))
        .filter_map(|id| {
            graph
                .operands(id)
                .first()
                .map(|&x| graph.node(x).shape().clone())
        })
        .collect()
}

/// Checks a train-mode batch norm's input size (`checked_shapes`).
pub fn check_statistics(input: &[usize]) -> Result<(), String> {
    let per_channel: usize = input
        .iter()
        .enumerate()
        .filter(|&(axis, _)| axis != 1)
        .map(|(_, &n)| n)
        .product();
    match per_channel {
        0 | 1 => Err(format!(
            "batch_norm in train mode needs more than 1 value per channel, got input shape {input:?}"
        )),
        _ => Ok(()),
    }
}

/// A composite node alone: a graph of `state` placeholders typed as its
/// operands, and its expansion. Returns the graph, the placeholders in
/// operand order and the node computing the composite's value.
pub fn standalone(graph: &Graph, id: NodeId) -> Result<(Graph, Vec<NodeId>, NodeId), String> {
    let mut alone = Graph::new(graph.model.clone(), graph.mode);
    let node = graph.node(id).clone();
    let placeholders: Vec<NodeId> = graph
        .operands(id)
        .into_iter()
        .map(|operand| {
            let ty = graph.node(operand).ty.clone();
            alone.add(Node::derived(Op::State, ty, node.origin, None), &[])
        })
        .collect();
    let result = alone.add(node, &placeholders);
    expand(&mut alone, result)?;
    Ok((alone, placeholders, result))
}

/// Rewrites composite node `id` into primitives, its last one in place.
pub fn expand(graph: &mut Graph, id: NodeId) -> Result<(), String> {
    let node = graph.node(id).clone();
    let operands = graph.operands(id);
    let x = *operands
        .first()
        .ok_or_else(|| format!("`{}` without operands", node.op.name()))?;
    let mut b = Builder {
        graph,
        like: node.clone(),
    };
    let (op, last) = match &node.op {
        Op::Softmax { axis } => {
            let (e, s) = exponentials(&mut b, x, &[*axis])?;
            (Op::Binary(BinaryFn::Div), vec![e, s])
        }
        Op::LogSoftmax { axis } => log_softmax(&mut b, x, *axis)?,
        Op::Reduce {
            func: ReduceFn::LogSumExp,
            axes,
            keepdims,
        } => logsumexp(&mut b, x, axes, *keepdims)?,
        Op::LayerNorm { eps } => {
            let last = b.ty(x).shape.rank().saturating_sub(1);
            normalize(&mut b, &operands, (&[last], false), None, *eps)?
        }
        Op::BatchNorm { eps, training, .. } => {
            let axes = all_but_channels(&b.ty(x).shape);
            let running = match training {
                true => None,
                false => Some((operand(&operands, 3)?, operand(&operands, 4)?)),
            };
            normalize(&mut b, &operands, (&axes, true), running, *eps)?
        }
        Op::RunningStat { momentum, variance } => {
            running_stat(&mut b, x, operand(&operands, 1)?, *momentum, *variance)?
        }
        Op::CrossEntropy | Op::Kernel(KernelOp::CrossEntropy) => {
            cross_entropy(&mut b, x, operand(&operands, 1)?)?
        }
        Op::Kernel(KernelOp::CrossEntropyGradient) => {
            let (g, logits, labels) = (x, operand(&operands, 1)?, operand(&operands, 2)?);
            let (e, s) = exponentials(&mut b, logits, &[1])?;
            let p = b.binary(BinaryFn::Div, e, s)?;
            let logits_type = b.ty(logits);
            let hot = b.op(Op::OneHot, &[labels], Some(logits_type))?;
            let difference = b.binary(BinaryFn::Sub, p, hot)?;
            let n = b.count(labels, vec![0])?;
            let scale = b.binary(BinaryFn::Div, g, n)?;
            (Op::Binary(BinaryFn::Mul), vec![difference, scale])
        }
        other => return Err(format!("`{}` is not a composite", other.name())),
    };
    b.finish(id, op, &last)
}

/// Operand `i` of a composite.
fn operand(operands: &[NodeId], i: usize) -> Result<NodeId, String> {
    operands
        .get(i)
        .copied()
        .ok_or_else(|| format!("a composite without operand {i}"))
}

/// Every axis of a `[N, C, ...]` shape but the channels' (1).
fn all_but_channels(shape: &Shape) -> Vec<usize> {
    (0..shape.rank()).filter(|&a| a != 1).collect()
}

/// `exp(x - max(x))` along `axes` and its sum there (kept as size 1):
/// the numerator and denominator of a softmax.
fn exponentials(
    b: &mut Builder<'_>,
    x: NodeId,
    axes: &[usize],
) -> Result<(NodeId, NodeId), String> {
    let m = b.reduce(ReduceFn::Max, x, axes, true)?;
    let (_, e, s) = shifted_exponentials(b, x, m, axes)?;
    Ok((e, s))
}

/// `d = x - shift`, `e = exp(d)` and `sum(e)` along `axes` (kept as size
/// 1): what softmax, log-softmax and logsumexp share.
fn shifted_exponentials(
    b: &mut Builder<'_>,
    x: NodeId,
    shift: NodeId,
    axes: &[usize],
) -> Result<(NodeId, NodeId, NodeId), String> {
    let d = b.binary(BinaryFn::Sub, x, shift)?;
    let e = b.unary(UnaryFn::Exp, d)?;
    let s = b.reduce(ReduceFn::Sum, e, axes, true)?;
    Ok((d, e, s))
}

/// `(x - max) - log(sum(exp(x - max)))` along `axis`, as PyTorch computes
/// it: the last op and its operands.
fn log_softmax(b: &mut Builder<'_>, x: NodeId, axis: usize) -> Result<(Op, Vec<NodeId>), String> {
    let m = b.reduce(ReduceFn::Max, x, &[axis], true)?;
    let (d, _, s) = shifted_exponentials(b, x, m, &[axis])?;
    let l = b.unary(UnaryFn::Log, s)?;
    Ok((Op::Binary(BinaryFn::Sub), vec![d, l]))
}

/// `m + log(sum(exp(x - m)))` over `axes`, `m` the maximum where it is
/// finite and 0 where not (so a slice of `-inf` gives `-inf`, one holding
/// `inf` gives `inf`, as in PyTorch).
fn logsumexp(
    b: &mut Builder<'_>,
    x: NodeId,
    axes: &[usize],
    keepdims: bool,
) -> Result<(Op, Vec<NodeId>), String> {
    let m = b.reduce(ReduceFn::Max, x, axes, true)?;
    let magnitude = b.unary(UnaryFn::Abs, m)?;
    let infinity = b.constant(f64::INFINITY)?;
    let finite = b.binary(BinaryFn::Less, magnitude, infinity)?;
    let zero = b.constant(0.0)?;
    let shift = b.op(Op::Select, &[finite, m, zero], None)?;
    let (_, _, s) = shifted_exponentials(b, x, shift, axes)?;
    let l = b.unary(UnaryFn::Log, s)?;
    if keepdims {
        return Ok((Op::Binary(BinaryFn::Add), vec![shift, l]));
    }
    let kept = b.binary(BinaryFn::Add, shift, l)?;
    Ok((Op::Reshape, vec![kept]))
}

/// `(x - mean) / sqrt(var + eps) * gamma + beta` with the statistics over
/// `axes` (the batch's mean and biased variance, or the `running` ones),
/// `gamma` and `beta` along the last axis or (`channels`) axis 1
/// (operands `x, gamma, beta, ...`).
fn normalize(
    b: &mut Builder<'_>,
    operands: &[NodeId],
    (axes, channels): (&[usize], bool),
    running: Option<(NodeId, NodeId)>,
    eps: f64,
) -> Result<(Op, Vec<NodeId>), String> {
    let x = operand(operands, 0)?;
    let x_type = b.ty(x);
    let kept = Type::new(x_type.dtype, x_type.shape.kept(axes));
    let (centred, var) = match running {
        None => {
            let (centred, square) = squared_deviations(b, x, axes)?;
            (centred, b.reduce(ReduceFn::Mean, square, axes, true)?)
        }
        Some((mean, var)) => {
            let mean = b.op(Op::Reshape, &[mean], Some(kept.clone()))?;
            let centred = b.binary(BinaryFn::Sub, x, mean)?;
            (centred, b.op(Op::Reshape, &[var], Some(kept.clone()))?)
        }
    };
    let eps = b.constant(eps)?;
    let shifted = b.binary(BinaryFn::Add, var, eps)?;
    let std = b.unary(UnaryFn::Sqrt, shifted)?;
    let normalized = b.binary(BinaryFn::Div, centred, std)?;
    // The affine params, shaped to broadcast along their axis: the last
    // (layer norm) or 1 (batch norm, `[C, 1, ..]` if more axes follow).
    let rank = x_type.shape.rank();
    let along = |b: &mut Builder<'_>, param: NodeId| -> Result<NodeId, String> {
        if !channels || rank <= 2 {
            return Ok(param);
        }
        let mut shape = vec![Dim::Fixed(1); rank - 1];
        shape[0] = x_type.shape.0[1].clone();
        let ty = Type::new(x_type.dtype, Shape(shape));
        b.op(Op::Reshape, &[param], Some(ty))
    };
    let gamma = along(b, operand(operands, 1)?)?;
    let beta = along(b, operand(operands, 2)?)?;
    let scaled = b.binary(BinaryFn::Mul, normalized, gamma)?;
    Ok((Op::Binary(BinaryFn::Add), vec![scaled, beta]))
}

/// `x - mean(x)` over `axes` (kept as size 1) and its square: the
/// deviations whose mean is the biased variance the norms use.
fn squared_deviations(
    b: &mut Builder<'_>,
    x: NodeId,
    axes: &[usize],
) -> Result<(NodeId, NodeId), String> {
    let mean = b.reduce(ReduceFn::Mean, x, axes, true)?;
    let centred = b.binary(BinaryFn::Sub, x, mean)?;
    let square = b.binary(BinaryFn::Mul, centred, centred)?;
    Ok((centred, square))
}

/// A batch norm's new running mean (or, `variance`, variance, of the
/// batch's unbiased variance): `(1 - momentum) * running + momentum *
/// batch`, the statistics over every axis of `x` but 1.
fn running_stat(
    b: &mut Builder<'_>,
    x: NodeId,
    running: NodeId,
    momentum: f64,
    variance: bool,
) -> Result<(Op, Vec<NodeId>), String> {
    let axes = all_but_channels(&b.ty(x).shape);
    let batch = if variance {
        let (_, square) = squared_deviations(b, x, &axes)?;
        let biased = b.reduce(ReduceFn::Mean, square, &axes, false)?;
        let n = b.count(x, axes)?;
        let one = b.constant(1.0)?;
        let less_one = b.binary(BinaryFn::Sub, n, one)?;
        let unbiased = b.binary(BinaryFn::Div, n, less_one)?;
        b.binary(BinaryFn::Mul, biased, unbiased)?
    } else {
        b.reduce(ReduceFn::Mean, x, &axes, false)?
    };
    let keep = b.constant(1.0 - momentum)?;
    let kept = b.binary(BinaryFn::Mul, keep, running)?;
    let weight = b.constant(momentum)?;
    let added = b.binary(BinaryFn::Mul, weight, batch)?;
    Ok((Op::Binary(BinaryFn::Add), vec![kept, added]))
}

/// The mean over rows of `-log_softmax(logits)` at each row's label:
/// `-sum(where(one_hot(labels), log_softmax(logits), 0)) / N`.
fn cross_entropy(
    b: &mut Builder<'_>,
    logits: NodeId,
    labels: NodeId,
) -> Result<(Op, Vec<NodeId>), String> {
    let (op, operands) = log_softmax(b, logits, 1)?;
    let log_p = b.op(op, &operands, None)?;
    let logits_type = b.ty(logits);
    let hot = b.op(Op::OneHot, &[labels], Some(logits_type))?;
    let zero = b.constant(0.0)?;
    let picked = b.op(Op::Select, &[hot, log_p, zero], None)?;
    let total = b.reduce(ReduceFn::Sum, picked, &[0, 1], false)?;
    let negated = b.unary(UnaryFn::Neg, total)?;
    let n = b.count(labels, vec![0])?;
    Ok((Op::Binary(BinaryFn::Div), vec![negated, n]))
}

/// Adds an expansion's nodes, typed by `Op::infer`, at the composite's
/// source position and backward marking.
struct Builder<'g> {
    graph: &'g mut Graph,
    like: Node,
}

impl Builder<'_> {
    fn ty(&self, id: NodeId) -> Type {
        self.graph.node(id).ty.clone()
    }

    /// The node's float type (a cross-entropy's labels are `i32`).
    fn dtype(&self) -> DType {
        self.like.dtype()
    }

    fn op(
        &mut self,
        op: Op,
        operands: &[NodeId],
        declared: Option<Type>,
    ) -> Result<NodeId, String> {
        let types: Vec<Type> = operands.iter().map(|&o| self.ty(o)).collect();
        let refs: Vec<&Type> = types.iter().collect();
        let declared = declared.unwrap_or_else(|| Type::new(self.dtype(), Shape::scalar()));
        let ty = op.infer(&refs, &declared).map_err(|e| {
            format!(
                "{} in the expansion of {}: {e:?}",
                op.name(),
                self.like.op.name()
            )
        })?;
        let node = Node::derived(op, ty, self.like.origin, self.like.backward.clone());
        let node = Node {
            origin: self.like.origin,
            ..node
        };
        Ok(self.graph.add(node, operands))
    }

    fn constant(&mut self, value: f64) -> Result<NodeId, String> {
        self.op(Op::Constant(value), &[], None)
    }

    fn unary(&mut self, f: UnaryFn, x: NodeId) -> Result<NodeId, String> {
        self.op(Op::Unary(f), &[x], None)
    }

    fn binary(&mut self, f: BinaryFn, a: NodeId, b: NodeId) -> Result<NodeId, String> {
        self.op(Op::Binary(f), &[a, b], None)
    }

    fn reduce(
        &mut self,
        func: ReduceFn,
        x: NodeId,
        axes: &[usize],
        keepdims: bool,
    ) -> Result<NodeId, String> {
        let op = Op::Reduce {
            func,
            axes: axes.to_vec(),
            keepdims,
        };
        self.op(op, &[x], None)
    }

    /// The number of elements of `of` along `axes`, a scalar.
    fn count(&mut self, of: NodeId, axes: Vec<usize>) -> Result<NodeId, String> {
        let ty = Type::new(self.dtype(), Shape::scalar());
        self.op(Op::Count { axes }, &[of], Some(ty))
    }

    /// Makes node `id` compute `op` of `operands`, checking that its type
    /// stays.
    fn finish(self, id: NodeId, op: Op, operands: &[NodeId]) -> Result<(), String> {
        let types: Vec<Type> = operands.iter().map(|&o| self.ty(o)).collect();
        let refs: Vec<&Type> = types.iter().collect();
        let ty = op.infer(&refs, &self.like.ty).map_err(|e| {
            format!(
                "{} ending the expansion of {}: {e:?}",
                op.name(),
                self.like.op.name()
            )
        })?;
        if ty != self.like.ty {
            return Err(format!(
                "the expansion of {} gives {ty:?}, not {:?}",
                self.like.op.name(),
                self.like.ty
            ));
        }
        self.graph.rewire(id, op, operands);
        Ok(())
    }
}
