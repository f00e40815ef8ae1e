//! Gradient checking: the backward graph against central finite
//! differences of the forward graph, both run by the reference interpreter.
//!
//! [`random_leaves`] draws inputs, params and buffers for a graph (labels
//! and indices within the range their use needs). [`gradcheck`] evaluates
//! the joint graph once, then for every trainable param and retained value
//! perturbs elements by `±h` and `±2h` and compares the five-point central
//! difference `(8 (L(x+h) - L(x-h)) - (L(x+2h) - L(x-2h))) / 12h` with the
//! analytic gradient. Values the backward pass treats as constants
//! (`stop_gradient`, `no_grad`) are held at their unperturbed values. The
//! error of a tensor is the largest absolute
//! difference over its checked elements, relative to the largest magnitude
//! of either gradient over those elements.

use std::collections::{BTreeMap, HashMap};

use crate::autodiff::{self, AutodiffError};
use crate::interp::{self, Context, InterpError, Tensor};
use crate::ir::{DType, Dim, Graph, NodeId, Op, Role};
use crate::random::Stream;

/// Settings of a check.
#[derive(Clone, Copy, Debug)]
pub struct Options {
    /// Seed of the random leaves and of dropout.
    pub seed: u64,
    /// The size every symbolic dimension is bound to.
    pub dim_size: usize,
    /// At most this many elements of each tensor are perturbed.
    pub max_elements: usize,
    /// The finite-difference step.
    pub step: f64,
}

impl Default for Options {
    fn default() -> Options {
        Options {
            seed: 0,
            dim_size: 3,
            max_elements: 64,
            step: 1e-4,
        }
    }
}

/// The comparison for one tensor.
#[derive(Clone, Debug, PartialEq)]
pub struct Report {
    /// What was checked: `grad.<name>` for the loss's gradient with respect
    /// to a param or a retained value, or a `grad(e, x)` call of the source
    /// with its position.
    pub name: String,
    /// Whether it is a retained value rather than a param.
    pub retained: bool,
    /// Elements compared.
    pub checked: usize,
    /// Largest absolute difference relative to the largest gradient.
    pub relative_error: f64,
    /// Largest absolute difference.
    pub absolute_error: f64,
}

/// Why a check could not run.
#[derive(Clone, Debug, PartialEq)]
pub enum Error {
    /// The graph has no loss.
    NoLoss,
    /// Differentiation failed.
    Autodiff(AutodiffError),
    /// Evaluation failed.
    Interp(InterpError),
}

impl std::fmt::Display for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Error::NoLoss => f.write_str("the model has no `loss` to differentiate"),
            Error::Autodiff(e) => write!(f, "{e}"),
            Error::Interp(e) => write!(f, "{e}"),
        }
    }
}

impl std::error::Error for Error {}

/// Every leaf a step graph reads: random inputs, params and buffers
/// ([`random_leaves`]), zeroed optimizer state, and the learning rate and
/// step (`lr`, `step`) of the runtime inputs. Symbolic sizes are
/// `dim_size`.
pub fn random_step_leaves(
    graph: &Graph,
    seed: u64,
    dim_size: usize,
    lr: f64,
    step: f64,
) -> BTreeMap<String, Tensor> {
    let mut leaves = random_leaves(graph, seed, dim_size);
    for id in graph.ids() {
        let node = graph.node(id);
        if node.role == Role::OptimizerState {
            let shape = concrete_with(node.shape(), dim_size);
            leaves.insert(
                node.name.clone().unwrap_or_default(),
                Tensor::zeros(node.dtype(), &shape),
            );
        }
    }
    let dtype = graph
        .loss()
        .map_or(DType::F32, |loss| graph.node(loss).dtype());
    leaves.insert(crate::step::LR.into(), Tensor::scalar(dtype, lr));
    leaves.insert(crate::step::STEP.into(), Tensor::scalar(dtype, step));
    leaves
}

/// A shape with every symbolic size set to `dim_size`.
fn concrete_with(shape: &crate::ir::Shape, dim_size: usize) -> Vec<usize> {
    shape
        .0
        .iter()
        .map(|d| match d {
            Dim::Fixed(n) => *n as usize,
            Dim::Sym(_) => dim_size,
        })
        .collect()
}

/// Draws a value for every input, param and buffer of a graph.
pub fn random_leaves(graph: &Graph, seed: u64, dim_size: usize) -> BTreeMap<String, Tensor> {
    let mut stream = Stream::new(seed);
    let mut leaves = BTreeMap::new();
    for id in graph.ids() {
        let node = graph.node(id);
        if !matches!(node.op, Op::Input | Op::Param(_) | Op::Buffer(_)) {
            continue;
        }
        let shape = concrete_with(node.shape(), dim_size);
        let len: usize = shape.iter().product();
        let data: Vec<f64> = if node.dtype() == DType::I32 {
            let limit = index_limit(graph, id);
            (0..len)
                .map(|_| stream.below(limit as u64) as f64)
                .collect()
        } else if node.role == Role::Buffer {
            // Running variances must be positive; means may be anything.
            (0..len).map(|_| stream.uniform_in(0.5, 1.5)).collect()
        } else {
            (0..len).map(|_| stream.uniform_in(-1.0, 1.0)).collect()
        };
        leaves.insert(
            node.name.clone().unwrap_or_default(),
            Tensor::new(node.dtype(), shape, data),
        );
    }
    leaves
}

/// The range an integer leaf must stay within: the class count of the
/// `cross_entropy` it labels, the rows of the table it indexes, else 2.
fn index_limit(graph: &Graph, id: NodeId) -> usize {
    let mut limit = usize::MAX;
    for user in graph.users(id) {
        let node = graph.node(user);
        let operands = graph.operands(user);
        let fixed = |operand: NodeId, axis: usize| match graph.node(operand).shape().0.get(axis) {
            Some(Dim::Fixed(n)) => *n as usize,
            _ => 2,
        };
        match node.op {
            Op::CrossEntropy => limit = limit.min(fixed(operands[0], 1)),
            Op::Embedding => limit = limit.min(fixed(operands[1], 0)),
            _ => {}
        }
    }
    if limit == usize::MAX { 2 } else { limit.max(1) }
}

/// Checks every param and retained gradient of a forward graph compiled in
/// `f64` against finite differences of the same graph.
pub fn gradcheck(forward: &Graph, options: Options) -> Result<Vec<Report>, Error> {
    gradcheck_against(forward, forward, options)
}

/// Checks the gradients of `analytic` (the model compiled in any float
/// type, `f32` say) against finite differences of `forward`, the same model
/// compiled in `f64`: finite differences in `f32` would drown in rounding.
/// Both graphs see the same leaves, rounded to `analytic`'s types.
pub(crate) fn gradcheck_against(
    analytic: &Graph,
    forward: &Graph,
    options: Options,
) -> Result<Vec<Report>, Error> {
    let analytic_graph = analytic;
    let loss = forward.loss().ok_or(Error::NoLoss)?;
    let joint = autodiff::differentiate(analytic).map_err(Error::Autodiff)?;
    for id in analytic.ids() {
        let node = analytic.node(id);
        if node.op.is_leaf() {
            let shape: Vec<usize> = node
                .shape()
                .0
                .iter()
                .map(|d| match d {
                    Dim::Fixed(n) => *n as usize,
                    Dim::Sym(_) => options.dim_size,
                })
                .collect();
            interp::check_size(&shape).map_err(Error::Interp)?;
        }
    }
    let mut leaves = random_leaves(analytic, options.seed, options.dim_size);
    for tensor in leaves.values_mut() {
        if tensor.dtype.is_float() {
            *tensor = tensor.cast(DType::F64);
        }
    }
    let context = Context {
        seed: options.seed,
        step: 0,
    };
    let evaluation = interp::evaluate(&joint, &leaves, context).map_err(Error::Interp)?;
    let base = interp::evaluate(forward, &leaves, context).map_err(Error::Interp)?;
    // What the backward pass treats as constants (`stop_gradient`, values
    // computed under `no_grad`) stay at their base values while perturbing,
    // so the finite differences measure the same derivative.
    let constants: HashMap<NodeId, Tensor> = forward
        .ids()
        .into_iter()
        .filter(|&id| {
            let node = forward.node(id);
            node.op == Op::StopGradient || (node.origin.no_grad.is_some() && !node.op.is_leaf())
        })
        .map(|id| (id, base.values[&id].clone()))
        .collect();
    // The value of `of` with the leaves and overrides given.
    let value_at = |of: NodeId,
                    leaves: &BTreeMap<String, Tensor>,
                    changed: Option<(NodeId, Tensor)>|
     -> Result<f64, Error> {
        let mut overrides = constants.clone();
        overrides.extend(changed);
        let run =
            interp::evaluate_with(forward, leaves, context, &overrides).map_err(Error::Interp)?;
        Ok(run.values[&of].data[0])
    };
    let mut reports = Vec::new();
    let mut stream = Stream::new(options.seed ^ 0xC0FFEE);
    // d(of)/d(id) by finite differences against `analytic`.
    let mut check = |of: NodeId, id: NodeId, analytic: &Tensor, shown: String| {
        let node = forward.node(id);
        let name = node.name.clone().unwrap_or_default();
        let value = base.values[&id].clone();
        let elements = sample(value.len(), options.max_elements, &mut stream);
        let (mut worst_abs, mut scale) = (0.0f64, 0.0f64);
        for &i in &elements {
            let h = options.step;
            let perturbed = |delta: f64| -> Result<f64, Error> {
                let mut changed = value.clone();
                changed.data[i] += delta;
                if node.op.is_leaf() {
                    let mut leaves = leaves.clone();
                    leaves.insert(name.clone(), changed);
                    value_at(of, &leaves, None)
                } else {
                    value_at(of, &leaves, Some((id, changed)))
                }
            };
            // The five-point stencil: error O(h^4), so a larger step keeps
            // rounding noise far below the tolerance.
            let numeric = (8.0 * (perturbed(h)? - perturbed(-h)?)
                - (perturbed(2.0 * h)? - perturbed(-2.0 * h)?))
                / (12.0 * h);
            let exact = analytic.data[i];
            let difference = if numeric.is_finite() && exact.is_finite() {
                (numeric - exact).abs()
            } else {
                f64::INFINITY
            };
            worst_abs = worst_abs.max(difference);
            scale = scale.max(numeric.abs()).max(exact.abs());
        }
        let relative_error = if worst_abs == 0.0 {
            0.0
        } else {
            worst_abs / scale.max(1e-12)
        };
        Ok::<Report, Error>(Report {
            name: shown,
            retained: node.retain,
            checked: elements.len(),
            relative_error,
            absolute_error: worst_abs,
        })
    };
    for id in autodiff::wanted(forward) {
        let node = forward.node(id);
        let name = node.name.clone().unwrap_or_default();
        let analytic = joint
            .with_role(&Role::Gradient(name.clone()))
            .first()
            .map(|g| evaluation.values[g].cast(DType::F64))
            .unwrap_or_else(|| Tensor::zeros(node.dtype(), &base.values[&id].shape));
        reports.push(check(loss, id, &analytic, format!("grad.{name}"))?);
    }
    // Each `grad(e, x)` of the model (a first-order gradient that the loss
    // may differentiate again) against finite differences of `e`.
    if forward.grad_calls.len() == analytic_graph.grad_calls.len() {
        for (call, analytic_call) in forward.grad_calls.iter().zip(&analytic_graph.grad_calls) {
            let value = evaluation.values[&analytic_call.value].cast(DType::F64);
            reports.push(check(call.of, call.wrt, &value, call.label.clone())?);
        }
    }
    Ok(reports)
}

/// Up to `most` distinct indices below `len`, in order.
fn sample(len: usize, most: usize, stream: &mut Stream) -> Vec<usize> {
    if len <= most {
        return (0..len).collect();
    }
    let mut chosen = std::collections::BTreeSet::new();
    while chosen.len() < most {
        chosen.insert(stream.below(len as u64) as usize);
    }
    chosen.into_iter().collect()
}
