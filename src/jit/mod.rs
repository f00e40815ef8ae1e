//! The JIT backend (first stage): runs a graph's kernel plan
//! (`passes::fusion`), with the elementwise kernels compiled to machine code
//! by Cranelift (`codegen`), matrix products and their VJPs on a tuned GEMM
//! (`codegen::gemm`, the `matrixmultiply` crate), and every other kernel on
//! the reference interpreter's kernels.
//!
//! Compiled kernels compute exactly what the interpreter computes (`f64`
//! arithmetic, one `f32` rounding per op), so they agree bit for bit; the
//! GEMM only sums in another order, so products agree to `f64` rounding
//! (`tests/jit.rs` states the tolerances and also compares the backends on
//! generated models). What issue 6 adds later:
//! vectorized code, transcendentals, reductions in compiled code, and one
//! entry function per training step.

pub mod codegen;
pub mod rows;

use std::collections::{BTreeMap, HashMap};

use crate::interp::{self, Context, Evaluation, InterpError, Tensor};
use crate::ir::{DType, Graph, NodeId, Op, ReduceFn, Shape};
use crate::passes::fusion::{self, Plan};
use crate::train::Backend;
use codegen::{CodeCache, CompiledKernel, RowKernel};
use rows::RowOp;

/// A kernel's compiled form.
enum Compiled {
    /// What the interpreter (or, for a product, the GEMM) computes first
    /// (the matrix product of a matmul kernel, values it recomputes), then
    /// the compiled elementwise code.
    Elementwise {
        prologue: Vec<NodeId>,
        kernel: CompiledKernel,
    },
    /// A row kernel (a reduction or normalization along the last axis),
    /// after the cheap values it recomputes (on the interpreter).
    Rows {
        prologue: Vec<NodeId>,
        kernel: RowKernel,
    },
}

/// A graph prepared for running: its kernel plan and compiled kernels.
struct Program {
    plan: Plan,
    kernels: Vec<Option<Compiled>>,
    /// The shape each compiled kernel loops over.
    loops: Vec<Shape>,
    clif: Vec<String>,
    /// Keeps the compiled code alive as long as `kernels`.
    _code: CodeCache,
}

/// The JIT backend. Programs are cached per graph version
/// (`Graph::version`): the runtime runs the same step graph every step, and
/// any change to a graph gives it a new version.
#[derive(Default)]
pub struct Jit {
    programs: HashMap<u64, Program>,
}

impl Jit {
    /// A backend with an empty cache.
    pub fn new() -> Jit {
        Jit::default()
    }

    fn program(&mut self, graph: &Graph) -> Result<&Program, InterpError> {
        let key = graph.version();
        if let std::collections::hash_map::Entry::Vacant(slot) = self.programs.entry(key) {
            slot.insert(compile(graph).map_err(|e| InterpError::Internal(e.to_string()))?);
        }
        Ok(&self.programs[&key])
    }

    /// How many kernels of a graph are compiled, out of how many.
    pub fn coverage(&mut self, graph: &Graph) -> Result<(usize, usize), InterpError> {
        let program = self.program(graph)?;
        Ok((
            program.kernels.iter().filter(|k| k.is_some()).count(),
            program.kernels.len(),
        ))
    }

    /// The Cranelift IR of every compiled kernel of a graph.
    pub fn clif(&mut self, graph: &Graph) -> Result<String, InterpError> {
        Ok(self.program(graph)?.clif.join("\n"))
    }
}

/// Plans a graph and compiles every kernel the code generator supports.
fn compile(graph: &Graph) -> Result<Program, codegen::CodegenError> {
    let plan = fusion::plan(graph);
    let mut code = CodeCache::new()?;
    let mut kernels = Vec::new();
    let mut loops = Vec::new();
    let mut clif = Vec::new();
    let position: HashMap<NodeId, usize> = graph
        .topo_order()
        .unwrap_or_default()
        .into_iter()
        .enumerate()
        .map(|(i, id)| (id, i))
        .collect();
    for (k, kernel) in plan.kernels.iter().enumerate() {
        // A kernel that is only a sum loops over its operand.
        let loop_shape = match kernel.kind {
            fusion::Kind::Reduction => graph
                .node(graph.operands(kernel.nodes[0])[0])
                .shape()
                .clone(),
            _ => kernel.loop_shape.clone(),
        };
        // What the interpreter computes first (a matrix product and the
        // cheap values it recomputes), and what is compiled after it.
        let (prologue, body): (Vec<NodeId>, Vec<NodeId>) = match kernel.kind {
            fusion::Kind::MatMul => {
                let mut first: Vec<NodeId> = kernel.recompute.iter().copied().collect();
                first.push(kernel.nodes[0]);
                (first, kernel.nodes[1..].to_vec())
            }
            _ => (
                Vec::new(),
                kernel
                    .recompute
                    .iter()
                    .copied()
                    .chain(kernel.nodes.iter().copied())
                    .collect(),
            ),
        };
        // Elementwise ops over the loop shape, perhaps closed by a sum.
        let elementwise =
            |id: NodeId| codegen::supported(graph, id) && graph.node(id).shape() == &loop_shape;
        let closing_sum = |id: NodeId| {
            codegen::is_sum(graph, id) && graph.node(graph.operands(id)[0]).shape() == &loop_shape
        };
        // A single reduction or normalization along the last axis.
        if let [node] = kernel.nodes.as_slice()
            && let Some(op) = RowOp::of(graph, *node)
        {
            let (compiled, text) = code.compile_rows(graph, *node, op)?;
            clif.push(format!("; kernel k{k}\n{text}"));
            let mut prologue: Vec<NodeId> = kernel.recompute.iter().copied().collect();
            prologue.sort_by_key(|id| position[id]);
            kernels.push(Some(Compiled::Rows {
                prologue,
                kernel: compiled,
            }));
            loops.push(loop_shape);
            continue;
        }
        let last = kernel.nodes.last().copied();
        let compilable = kernel.kind != fusion::Kind::Other
            && !body.is_empty()
            && body
                .iter()
                .all(|&id| elementwise(id) || (Some(id) == last && closing_sum(id)));
        if !compilable {
            let ops: Vec<String> = kernel
                .nodes
                .iter()
                .map(|&id| graph.node(id).op.name())
                .collect();
            clif.push(format!(
                "; kernel k{k}: on the interpreter ({})\n",
                ops.join(", ")
            ));
            kernels.push(None);
            loops.push(loop_shape);
            continue;
        }
        let mut ordered = body;
        ordered.sort_by_key(|id| position[id]);
        // The compiled part reads what its nodes read from outside it.
        let inside: std::collections::BTreeSet<NodeId> = ordered.iter().copied().collect();
        let mut inputs: Vec<NodeId> = ordered
            .iter()
            .flat_map(|&id| fusion::reads(graph, id))
            .filter(|o| !inside.contains(o) && !matches!(graph.node(*o).op, Op::Constant(_)))
            .collect();
        inputs.sort_unstable();
        inputs.dedup();
        let outputs: Vec<NodeId> = plan
            .outputs(graph, k)
            .into_iter()
            .filter(|o| inside.contains(o))
            .collect();
        let (compiled, text) = code.compile(graph, &ordered, &inputs, &outputs)?;
        clif.push(format!("; kernel k{k}\n{text}"));
        kernels.push(Some(Compiled::Elementwise {
            prologue,
            kernel: compiled,
        }));
        loops.push(loop_shape);
    }
    Ok(Program {
        plan,
        kernels,
        loops,
        clif,
        _code: code,
    })
}

/// The broadcast factors `(k, m)` that read `operand` of shape `from` at
/// `(i / k) % m` for element `i` of `to`; `None` when broadcasting is not
/// one contiguous block of axes.
fn factors(from: &[usize], to: &[usize]) -> Option<(i64, i64)> {
    let offset = to.len().checked_sub(from.len())?;
    let kept: Vec<usize> = (0..to.len())
        .filter(|&d| d >= offset && from[d - offset] == to[d] && to[d] != 1)
        .collect();
    let broadcast = |d: usize| d < offset || from[d - offset] == 1;
    if !(0..to.len()).all(|d| kept.contains(&d) || broadcast(d) || to[d] == 1) {
        return None;
    }
    let (Some(&first), Some(&last)) = (kept.first(), kept.last()) else {
        return Some((1, 1));
    };
    if (first..=last).any(|d| !kept.contains(&d) && to[d] != 1) {
        return None;
    }
    let m: usize = to[first..=last].iter().product();
    let k: usize = to[last + 1..].iter().product();
    Some((i64::try_from(k.max(1)).ok()?, i64::try_from(m.max(1)).ok()?))
}

impl Backend for Jit {
    fn run(
        &mut self,
        graph: &Graph,
        leaves: &BTreeMap<String, Tensor>,
        context: Context,
    ) -> Result<Evaluation, InterpError> {
        let order = graph
            .topo_order()
            .ok_or_else(|| InterpError::Internal("the graph has a cycle".into()))?;
        let mut evaluation = interp::bind_leaves(graph, &order, leaves)?;
        let program = self.program(graph)?;
        for (k, kernel) in program.plan.kernels.iter().enumerate() {
            let done = match program.kernels[k].as_ref() {
                Some(Compiled::Elementwise { prologue, kernel }) => {
                    for &id in prologue {
                        interpret(graph, id, &mut evaluation, context)?;
                    }
                    run_compiled(graph, kernel, &program.loops[k], &mut evaluation, context)?
                }
                Some(Compiled::Rows { prologue, kernel }) => {
                    for &id in prologue {
                        interpret(graph, id, &mut evaluation, context)?;
                    }
                    run_rows(graph, kernel, &mut evaluation)?
                }
                None => false,
            };
            if done {
                continue;
            }
            // The interpreter runs this kernel: recomputed values first.
            for &id in kernel.recompute.iter().chain(&kernel.nodes) {
                interpret(graph, id, &mut evaluation, context)?;
            }
        }
        // Constants and anything no kernel produced (never needed by a
        // result, but kept complete for callers that inspect values).
        for &id in &order {
            if !evaluation.values.contains_key(&id) && graph.node(id).op.is_leaf() {
                interp::evaluate_node(graph, id, &mut evaluation, context)?;
            }
        }
        Ok(evaluation)
    }
}

/// Evaluates a node on the interpreter unless it has a value, first the
/// constants among its operands (constants are immediates in compiled code,
/// so no kernel produces them).
fn interpret(
    graph: &Graph,
    id: NodeId,
    evaluation: &mut Evaluation,
    context: Context,
) -> Result<(), InterpError> {
    if evaluation.values.contains_key(&id) {
        return Ok(());
    }
    for operand in graph.operands(id) {
        if !evaluation.values.contains_key(&operand) {
            interp::evaluate_node(graph, operand, evaluation, context)?;
        }
    }
    if matrix_product(graph, id, evaluation)? {
        return Ok(());
    }
    interp::evaluate_node(graph, id, evaluation, context)
}

/// Computes a matrix product with the tuned GEMM (`codegen::gemm`) instead
/// of the interpreter's loop: a `matmul` (plain, or with a transposed right
/// operand) and both of its VJPs. False for any other node or a shape it
/// does not handle (the interpreter then runs it).
///
/// A batched operand `[.., M, K]` is one `(B*M) x K` matrix, so each case
/// is a single GEMM: `A @ B`; `dA = g @ B^T`; and `dB = A^T @ g`, whose
/// inner size `B*M` also performs the sum over the batch. A transpose is a
/// view with swapped strides, never a copy.
fn matrix_product(
    graph: &Graph,
    id: NodeId,
    evaluation: &mut Evaluation,
) -> Result<bool, InterpError> {
    let node = graph.node(id);
    let operands = graph.operands(id);
    // (left operand, transposed?), (right operand, transposed?).
    let ((left, transpose_left), (right, transpose_right)) = match &node.op {
        Op::MatMul => ((operands[0], false), (operands[1], false)),
        Op::MatMulT {
            transpose_a: false,
            transpose_b,
        } => ((operands[0], false), (operands[1], *transpose_b)),
        Op::Vjp { forward, operand } if **forward == Op::MatMul => {
            // Operands: the output gradient, A, B, the forward output.
            let (g, a, b) = (operands[0], operands[1], operands[2]);
            if *operand == 0 {
                ((g, false), (b, true))
            } else {
                ((a, true), (g, false))
            }
        }
        _ => return Ok(false),
    };
    let (Some(left), Some(right)) = (evaluation.values.get(&left), evaluation.values.get(&right))
    else {
        return Ok(false);
    };
    let (Some(left), Some(right)) = (
        matrix_view(left, transpose_left),
        matrix_view(right, transpose_right),
    ) else {
        return Ok(false);
    };
    let shape = interp::concrete(node.shape(), &evaluation.dims)?;
    if left.cols != right.rows || shape.iter().product::<usize>() != left.rows * right.cols {
        return Ok(false);
    }
    let failed = |e: codegen::CodegenError| InterpError::Internal(e.to_string());
    let out = if node.dtype() == DType::F32 {
        // An `f32` product runs on `sgemm` (twice the SIMD width) over
        // `f32` copies of the operands, which hold `f32` values already.
        let narrow = |view: &codegen::MatrixView<'_>| -> Vec<f32> {
            view.data.iter().map(|&v| v as f32).collect()
        };
        let (a, b) = (narrow(&left), narrow(&right));
        let mut out = vec![0.0f32; left.rows * right.cols];
        codegen::gemm(left.over(&a), right.over(&b), &mut out).map_err(failed)?;
        out.into_iter().map(f64::from).collect()
    } else {
        let mut out = vec![0.0; left.rows * right.cols];
        codegen::gemm(left, right, &mut out).map_err(failed)?;
        out
    };
    evaluation
        .values
        .insert(id, Tensor::new(node.dtype(), shape, out));
    Ok(true)
}

/// A tensor as the matrix (leading axes flattened) x (last axis), read
/// transposed or not; `None` below rank 2 or for an empty last axis.
fn matrix_view(t: &Tensor, transposed: bool) -> Option<codegen::MatrixView<'_>> {
    let cols = *t.shape.last()?;
    if t.shape.len() < 2 || cols == 0 {
        return None;
    }
    let view = codegen::MatrixView::row_major(&t.data, t.data.len() / cols, cols);
    Some(if transposed { view.transposed() } else { view })
}

/// Runs a row kernel; false when an operand is missing or its last axis
/// is empty (the interpreter runs it then).
fn run_rows(
    graph: &Graph,
    kernel: &RowKernel,
    evaluation: &mut Evaluation,
) -> Result<bool, InterpError> {
    let mut inputs = Vec::new();
    for id in &kernel.inputs {
        match evaluation.values.get(id) {
            Some(value) => inputs.push(value),
            None => return Ok(false),
        }
    }
    let shaped = inputs[kernel.op.shaped_by()];
    let cols = shaped.shape.last().copied().unwrap_or(0);
    if cols == 0 {
        return Ok(false);
    }
    let rows = shaped.len() / cols;
    let data: Vec<&[f64]> = inputs.iter().map(|t| t.data.as_slice()).collect();
    let mut out = Vec::new();
    kernel.run(&data, rows, cols, &mut out)?;
    let node = graph.node(kernel.output);
    let shape = interp::concrete(node.shape(), &evaluation.dims)?;
    evaluation
        .values
        .insert(kernel.output, Tensor::new(node.dtype(), shape, out));
    Ok(true)
}

/// Runs a compiled kernel; false if its operands' broadcasting does not fit
/// the compiled access pattern at these sizes (the interpreter runs it).
fn run_compiled(
    graph: &Graph,
    compiled: &CompiledKernel,
    loop_shape: &Shape,
    evaluation: &mut Evaluation,
    context: Context,
) -> Result<bool, InterpError> {
    let to = interp::concrete(loop_shape, &evaluation.dims)?;
    let n: usize = to.iter().product();
    let mut ks = Vec::new();
    let mut ms = Vec::new();
    for &input in &compiled.inputs {
        let Some(value) = evaluation.values.get(&input) else {
            return Ok(false);
        };
        let Some((k, m)) = factors(&value.shape, &to) else {
            return Ok(false);
        };
        ks.push(k);
        ms.push(m);
    }
    // Outputs: a sum accumulates at (i / k) % m of its kept shape, any
    // other output is written at every i.
    for &output in &compiled.outputs {
        let node = graph.node(output);
        let (k, m) = match &node.op {
            Op::Reduce { axes, .. } => {
                let kept: Vec<usize> = to
                    .iter()
                    .enumerate()
                    .map(|(d, &size)| if axes.contains(&d) { 1 } else { size })
                    .collect();
                match factors(&kept, &to) {
                    Some(f) => f,
                    None => return Ok(false),
                }
            }
            Op::SumTo => match factors(&interp::concrete(node.shape(), &evaluation.dims)?, &to) {
                Some(f) => f,
                None => return Ok(false),
            },
            Op::ZeroFraction => (1, 1),
            // Counted per unit: every axis but the first (the rows).
            Op::DeadFraction => {
                let mut kept = to.clone();
                if let Some(rows) = kept.first_mut() {
                    *rows = 1;
                }
                match factors(&kept, &to) {
                    Some(f) => f,
                    None => return Ok(false),
                }
            }
            _ => (1, i64::try_from(n).unwrap_or(i64::MAX)),
        };
        ks.push(k);
        ms.push(m);
    }
    let inputs: Vec<&[f64]> = compiled
        .inputs
        .iter()
        .map(|id| evaluation.values[id].data.as_slice())
        .collect();
    let mut outputs = vec![Vec::new(); compiled.outputs.len()];
    compiled
        .run(&inputs, &ks, &ms, &mut outputs, n, context)
        .map_err(|e| InterpError::Internal(e.to_string()))?;
    for (&id, mut data) in compiled.outputs.iter().zip(outputs) {
        let node = graph.node(id);
        let shape = interp::concrete(node.shape(), &evaluation.dims)?;
        match node.op {
            Op::Reduce {
                func: ReduceFn::Mean,
                ..
            } => {
                // The interpreter sums, then divides by the count per group.
                let count = (n / data.len().max(1)).max(1) as f64;
                for value in &mut data {
                    *value /= count;
                }
            }
            // The count of zeros over the element count.
            Op::ZeroFraction => data = vec![data[0] / n.max(1) as f64],
            // The units whose rows are all zero, over the unit count.
            Op::DeadFraction => {
                let rows = to.first().copied().unwrap_or(1).max(1);
                let units = n / rows;
                let dead = if units == 0 {
                    0
                } else {
                    data.iter().filter(|&&v| v == 0.0).count()
                };
                data = vec![dead as f64 / units.max(1) as f64];
            }
            _ => {}
        }
        // Tensor::new rounds a sum accumulated in f64 to the node's type,
        // as the interpreter does.
        evaluation
            .values
            .insert(id, Tensor::new(node.dtype(), shape, data));
    }
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn broadcast_factors() {
        assert_eq!(factors(&[2, 3], &[2, 3]), Some((1, 6)));
        assert_eq!(factors(&[3], &[2, 3]), Some((1, 3)));
        assert_eq!(factors(&[2, 1], &[2, 3]), Some((3, 2)));
        assert_eq!(factors(&[], &[2, 3]), Some((1, 1)));
        assert_eq!(factors(&[1, 1], &[2, 3]), Some((1, 1)));
        assert_eq!(factors(&[2, 1, 4], &[2, 3, 4]), None);
        assert_eq!(factors(&[3, 1], &[2, 3, 4]), Some((4, 3)));
    }
}
