//! The reference interpreter: a plain, readable evaluator of any graph
//! (forward or joint forward-backward, train or eval mode) in `f32` or
//! `f64`. It is the executable semantics of the IR: every faster path is
//! tested against it.
//!
//! [`evaluate`] binds the graph's leaves (inputs, params, buffers) to
//! tensors by name, binds the symbolic dimensions from their shapes, and
//! runs every node in topological order with the kernels of `kernels`.
//! Dropout masks come from a counter-based generator keyed by
//! `(seed, step, dropout key, element index)`, so any backend reproduces
//! them. A composite op (`softmax`, `layer_norm`, `cross_entropy`, ...)
//! has no kernel here: it runs as its expansion into primitives
//! (`ir::expand`), the one definition every backend follows.

pub(crate) mod kernels;
mod scan;
pub mod tensor;

use std::collections::{BTreeMap, HashMap};
use std::fmt;

use crate::ir::expand::{self, is_composite};
use crate::ir::{DType, Dim, Graph, IdMap, NodeId, Op, Shape};
pub use tensor::Tensor;

/// What the random parts of a step depend on.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Context {
    /// The run's seed.
    pub seed: u64,
    /// The step counter.
    pub step: u64,
}

/// Why a graph could not be evaluated.
#[derive(Clone, Debug, PartialEq)]
pub enum InterpError {
    /// A leaf has no tensor.
    Missing {
        /// The leaf's name.
        name: String,
        /// Its declared type.
        expected: String,
    },
    /// A tensor does not fit its leaf's declared type.
    Mismatch {
        /// The leaf's name.
        name: String,
        /// The declared type, with bound dimensions filled in.
        expected: String,
        /// What was given.
        found: String,
    },
    /// A value the data made invalid (a label out of range, say).
    Runtime(String),
    /// A compiler bug.
    Internal(String),
}

impl fmt::Display for InterpError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            InterpError::Missing { name, expected } => {
                write!(f, "no tensor for `{name}` (expected {expected})")
            }
            InterpError::Mismatch {
                name,
                expected,
                found,
            } => {
                write!(
                    f,
                    "tensor `{name}` is {found} but the model declares {expected}"
                )
            }
            InterpError::Runtime(message) => f.write_str(message),
            InterpError::Internal(message) => write!(f, "internal error: {message}"),
        }
    }
}

impl std::error::Error for InterpError {}

/// The values of an evaluated graph.
#[derive(Clone, Debug, Default)]
pub struct Evaluation {
    /// Every node's value.
    pub values: IdMap<Tensor>,
    /// The symbolic dimensions as bound by the leaves.
    pub dims: BTreeMap<String, usize>,
    /// Every result of each node with several (a `scan`), by node: what
    /// its `scan_result` nodes read.
    pub results: IdMap<Vec<Tensor>>,
}

/// Evaluates every node of `graph`, with the leaves bound by name.
pub fn evaluate(
    graph: &Graph,
    leaves: &BTreeMap<String, Tensor>,
    context: Context,
) -> Result<Evaluation, InterpError> {
    evaluate_with(graph, leaves, context, &HashMap::new())
}

/// Like [`evaluate`], with some nodes' values given instead of computed
/// (finite differences with respect to an intermediate value use this).
pub(crate) fn evaluate_with(
    graph: &Graph,
    leaves: &BTreeMap<String, Tensor>,
    context: Context,
    overrides: &HashMap<NodeId, Tensor>,
) -> Result<Evaluation, InterpError> {
    let order = graph
        .topo_order()
        .ok_or_else(|| InterpError::Internal("the graph has a cycle".into()))?;
    let mut evaluation = bind_leaves(graph, &order, leaves)?;
    for &id in &order {
        if evaluation.values.contains_key(&id) {
            continue;
        }
        if let Some(value) = overrides.get(&id) {
            evaluation.values.insert(id, value.clone());
            continue;
        }
        evaluate_node(graph, id, &mut evaluation, context)?;
    }
    Ok(evaluation)
}

/// Binds every input, param, buffer and state leaf of a graph to its
/// tensor, in `order`, so a dimension is bound by the first leaf that
/// declares it.
pub(crate) fn bind_leaves(
    graph: &Graph,
    order: &[NodeId],
    leaves: &BTreeMap<String, Tensor>,
) -> Result<Evaluation, InterpError> {
    let mut evaluation = Evaluation::default();
    for (id, tensor) in checked_leaves(graph, order, leaves, &mut evaluation.dims)? {
        let value = tensor.cast(graph.node(id).dtype());
        evaluation.values.insert(id, value);
    }
    Ok(evaluation)
}

/// Checks every leaf of a graph (in `order`) against its declaration as
/// [`bind_leaves`] does, binding the symbolic dimensions into `dims`, and
/// returns each leaf node with its tensor, without copying any.
pub(crate) fn checked_leaves<'a>(
    graph: &Graph,
    order: &[NodeId],
    leaves: &'a BTreeMap<String, Tensor>,
    dims: &mut BTreeMap<String, usize>,
) -> Result<Vec<(NodeId, &'a Tensor)>, InterpError> {
    let mut bound = Vec::new();
    for &id in order {
        let node = graph.node(id);
        if !matches!(
            node.op,
            Op::Input | Op::Param(_) | Op::Buffer(_) | Op::State
        ) {
            continue;
        }
        let name = node.name.as_deref().unwrap_or("");
        let Some(tensor) = leaves.get(name) else {
            return Err(InterpError::Missing {
                name: name.to_string(),
                expected: node.ty.to_string(),
            });
        };
        check_leaf(name, tensor, node.dtype(), node.shape(), dims)?;
        bound.push((id, tensor));
    }
    Ok(bound)
}

/// Evaluates one node whose operands are already in `evaluation`.
pub fn evaluate_node(
    graph: &Graph,
    id: NodeId,
    evaluation: &mut Evaluation,
    context: Context,
) -> Result<(), InterpError> {
    let node = graph.node(id);
    let operands = graph.operands(id);
    let inputs: Vec<&Tensor> = operands
        .iter()
        .map(|o| {
            evaluation
                .values
                .get(o)
                .ok_or_else(|| InterpError::Internal(format!("{o} has no value yet")))
        })
        .collect::<Result<_, _>>()?;
    let shape = concrete(node.shape(), &evaluation.dims)?;
    match &node.op {
        Op::Scan(body) => {
            let results = scan::run(body, &inputs, evaluation, context)?;
            let value = results
                .first()
                .cloned()
                .ok_or_else(|| InterpError::Internal("a scan without results".into()))?;
            evaluation.values.insert(id, value);
            evaluation.results.insert(id, results);
            return Ok(());
        }
        Op::ScanResult { index } => {
            let value = evaluation
                .results
                .get(&operands[0])
                .and_then(|results| results.get(*index))
                .cloned()
                .ok_or_else(|| InterpError::Internal(format!("{id}: no scan result {index}")))?;
            evaluation.values.insert(id, value);
            return Ok(());
        }
        _ => {}
    }
    let data = match is_composite(&node.op) {
        true => run_expansion(graph, id, evaluation, context)?,
        false => run(&node.op, &inputs, &shape, context)?,
    };
    if data.len() != shape.iter().product::<usize>() {
        return Err(InterpError::Internal(format!(
            "`{}` produced {} elements for shape {shape:?}",
            node.op.name(),
            data.len()
        )));
    }
    evaluation
        .values
        .insert(id, Tensor::new(node.dtype(), shape, data));
    Ok(())
}

/// A composite node's value: its expansion (`expand::standalone`) run on
/// its operands' values.
fn run_expansion(
    graph: &Graph,
    id: NodeId,
    evaluation: &Evaluation,
    context: Context,
) -> Result<Vec<f64>, InterpError> {
    if let Op::BatchNorm { training: true, .. } = graph.node(id).op {
        let x = &evaluation.values[&graph.operands(id)[0]];
        expand::check_statistics(&x.shape).map_err(InterpError::Runtime)?;
    }
    let (alone, placeholders, result) =
        expand::standalone(graph, id).map_err(InterpError::Internal)?;
    let mut inner = Evaluation {
        dims: evaluation.dims.clone(),
        ..Evaluation::default()
    };
    for (placeholder, operand) in placeholders.iter().zip(graph.operands(id)) {
        inner
            .values
            .insert(*placeholder, evaluation.values[&operand].clone());
    }
    let order = alone
        .topo_order()
        .ok_or_else(|| InterpError::Internal("an expansion has a cycle".into()))?;
    for node in order {
        if !inner.values.contains_key(&node) {
            evaluate_node(&alone, node, &mut inner, context)?;
        }
    }
    inner
        .values
        .remove(&result)
        .map(|t| t.data)
        .ok_or_else(|| InterpError::Internal("an expansion without its result".into()))
}

/// Checks a leaf tensor against its declaration (element type, shape, and
/// an element count that fits the shape), binding symbols.
fn check_leaf(
    name: &str,
    tensor: &Tensor,
    dtype: DType,
    shape: &Shape,
    dims: &mut BTreeMap<String, usize>,
) -> Result<(), InterpError> {
    let expected = |dims: &BTreeMap<String, usize>| {
        let dims: Vec<String> = shape
            .0
            .iter()
            .map(|d| match d {
                Dim::Sym(s) => dims.get(s).map_or(s.clone(), |n| format!("{s}={n}")),
                Dim::Fixed(n) => n.to_string(),
            })
            .collect();
        format!("{dtype}[{}]", dims.join(", "))
    };
    let mismatch = |expected: String| InterpError::Mismatch {
        name: name.to_string(),
        expected,
        found: format!("{}{:?}", tensor.dtype, tensor.shape),
    };
    if dtype.is_float() != tensor.dtype.is_float() || tensor.shape.len() != shape.rank() {
        return Err(mismatch(expected(dims)));
    }
    for (dim, &size) in shape.0.iter().zip(&tensor.shape) {
        match dim {
            Dim::Fixed(n) if *n as usize != size => return Err(mismatch(expected(dims))),
            Dim::Sym(s) => match dims.get(s) {
                Some(&bound) if bound != size => return Err(mismatch(expected(dims))),
                Some(_) => {}
                None if size == 0 => return Err(mismatch(expected(dims))),
                None => {
                    dims.insert(s.clone(), size);
                }
            },
            Dim::Fixed(_) => {}
        }
    }
    if tensor.shape.iter().product::<usize>() != tensor.data.len() {
        return Err(mismatch(expected(dims)));
    }
    Ok(())
}

/// A declared shape with its symbols replaced by their bound sizes.
pub(crate) fn concrete(
    shape: &Shape,
    dims: &BTreeMap<String, usize>,
) -> Result<Vec<usize>, InterpError> {
    let sizes: Vec<usize> = shape
        .0
        .iter()
        .map(|d| match d {
            Dim::Fixed(n) => Ok(*n as usize),
            Dim::Sym(s) => dims
                .get(s)
                .copied()
                .ok_or_else(|| InterpError::Internal(format!("dimension `{s}` is not bound"))),
        })
        .collect::<Result<_, _>>()?;
    check_size(&sizes)?;
    Ok(sizes)
}

/// The most elements one tensor may have when a graph runs (2 GiB of
/// `f64`): a larger model is an error, not an out-of-memory abort.
pub(crate) const MAX_RUN_ELEMENTS: usize = 1 << 28;

/// Refuses a tensor larger than [`MAX_RUN_ELEMENTS`].
pub(crate) fn check_size(shape: &[usize]) -> Result<(), InterpError> {
    let count = shape.iter().try_fold(1usize, |a, &b| a.checked_mul(b));
    match count {
        Some(n) if n <= MAX_RUN_ELEMENTS => Ok(()),
        _ => Err(InterpError::Runtime(format!(
            "a tensor of shape {shape:?} has more than {MAX_RUN_ELEMENTS} elements, more than gradc runs"
        ))),
    }
}

/// Runs one non-leaf op.
fn run(
    op: &Op,
    inputs: &[&Tensor],
    shape: &[usize],
    context: Context,
) -> Result<Vec<f64>, InterpError> {
    let x = || inputs[0];
    let data = match op {
        Op::Input | Op::Param(_) | Op::Buffer(_) => {
            return Err(InterpError::Internal("leaves are bound, not run".into()));
        }
        Op::Constant(c) => vec![*c],
        Op::Unary(f) => x().data.iter().map(|&v| kernels::unary(*f, v)).collect(),
        Op::LeakyRelu { slope } => x()
            .data
            .iter()
            .map(|&v| if v > 0.0 { v } else { v * slope })
            .collect(),
        Op::Clamp { lo, hi } => x()
            .data
            .iter()
            .map(|&v| if v.is_nan() { v } else { v.clamp(*lo, *hi) })
            .collect(),
        Op::Binary(f) => kernels::broadcast_binary(inputs[0], inputs[1], shape, |a, b| {
            kernels::binary(*f, a, b)
        }),
        Op::MatMulT {
            transpose_a,
            transpose_b,
        } => {
            let read = |t: &Tensor, swap: bool| -> (Vec<f64>, Vec<usize>) {
                if !swap {
                    return (t.data.clone(), t.shape.clone());
                }
                let mut shape = t.shape.clone();
                let n = shape.len();
                shape.swap(n - 1, n - 2);
                (kernels::transpose(&t.data, &t.shape), shape)
            };
            if *transpose_a && !*transpose_b && inputs[1].shape.len() >= 3 {
                return Ok(kernels::batch_summed_product(inputs[0], inputs[1]));
            }
            let (a, a_shape) = read(inputs[0], *transpose_a);
            let (b, b_shape) = read(inputs[1], *transpose_b);
            kernels::matmul(&a, &a_shape, &b, &b_shape)
        }
        Op::MatMul => kernels::matmul(
            &inputs[0].data,
            &inputs[0].shape,
            &inputs[1].data,
            &inputs[1].shape,
        ),
        Op::Transpose => kernels::transpose(&x().data, &x().shape),
        Op::BatchMatMul {
            transpose_a,
            transpose_b,
        } => {
            let read = |t: &Tensor, swapped: bool| match swapped {
                false => t.clone(),
                true => {
                    let mut shape = t.shape.clone();
                    let r = shape.len();
                    shape.swap(r - 1, r - 2);
                    Tensor::new(t.dtype, shape, kernels::transpose(&t.data, &t.shape))
                }
            };
            let (a, b) = (read(inputs[0], *transpose_a), read(inputs[1], *transpose_b));
            kernels::batch_matmul(&a, &b, shape)
        }
        Op::Permute { axes } => kernels::permute(x(), axes),
        Op::Triangle { k, upper } => kernels::triangle(x(), *k, *upper),
        Op::Iota => (0..shape[0]).map(|i| i as f64).collect(),
        Op::Reduce { func, axes, .. } => kernels::reduce(*func, x(), axes)?.0,
        Op::Reshape | Op::StopGradient | Op::Identity => x().data.clone(),
        Op::Concat { axis } => kernels::concat(inputs, *axis, shape),
        Op::Slice {
            axis,
            start,
            from_end,
        } => {
            let first = kernels::slice_start(x().shape[*axis], shape[*axis], *start, *from_end)
                .map_err(InterpError::Runtime)?;
            kernels::slice(x(), *axis, first, shape)
        }
        Op::ScatterAdd => kernels::scatter_add(inputs[0], inputs[1], shape)?,
        Op::Dropout { p, key } => {
            let scale = kernels::dropout_scale(*p, *key, x().len(), context.seed, context.step);
            x().data.iter().zip(scale).map(|(v, s)| v * s).collect()
        }
        Op::Embedding => kernels::embedding(inputs[0], inputs[1])?,
        Op::Mse => vec![kernels::mse(inputs[0], inputs[1])],
        Op::BceWithLogits => vec![kernels::bce_with_logits(inputs[0], inputs[1])],
        Op::SumTo => tensor::sum_to(&x().data, &x().shape, shape),
        Op::Select => kernels::select(inputs[0], inputs[1], inputs[2], shape),
        Op::Expand => tensor::broadcast_map(&x().shape, shape)
            .iter()
            .map(|&i| x().data[i])
            .collect(),
        Op::OneHot => kernels::one_hot(x(), shape)?,
        Op::Count { axes } => {
            let counted = x()
                .shape
                .iter()
                .enumerate()
                .filter(|(d, _)| axes.contains(d))
                .map(|(_, &n)| n)
                .product::<usize>();
            vec![counted as f64]
        }
        Op::State => return Err(InterpError::Internal("leaves are bound, not run".into())),
        Op::Scan(_) | Op::ScanResult { .. } => {
            return Err(InterpError::Internal(
                "a scan's results are evaluated together".into(),
            ));
        }
        Op::Softmax { .. }
        | Op::LogSoftmax { .. }
        | Op::LayerNorm { .. }
        | Op::BatchNorm { .. }
        | Op::RunningStat { .. }
        | Op::CrossEntropy
        | Op::Kernel(_) => {
            return Err(InterpError::Internal(format!(
                "`{}` is a composite: it runs as its expansion",
                op.name()
            )));
        }
        Op::ZeroFraction => {
            let zeros = x().data.iter().filter(|&&v| v == 0.0).count();
            vec![zeros as f64 / x().len().max(1) as f64]
        }
        Op::DeadFraction => {
            let rows = x().shape.first().copied().unwrap_or(1).max(1);
            let units = x().len() / rows;
            let dead = (0..units)
                .filter(|&u| (0..rows).all(|r| x().data[r * units + u] == 0.0))
                .count();
            vec![dead as f64 / units.max(1) as f64]
        }
    };
    Ok(data)
}
