//! Fusion planning: partitions an optimized graph into kernels, the units
//! the JIT compiles, and prints the plan (`gradc graph --stage kernels`).
//!
//! Greedy, in topological order:
//!
//! - an elementwise op (including broadcasting operands, `select` and the
//!   comparisons) joins the kernel of its latest-computed operand when that kernel
//!   is still open and loops over the same shape, else the latest such
//!   kernel after it; otherwise it opens one;
//! - a matrix product opens a kernel whose epilogue (bias add, activation,
//!   clipping scale) the following elementwise ops join;
//! - a reduction joins such an open kernel over its operand's shape (a
//!   kernel may close several: a gradient's norm and its count of zeros,
//!   an update's norm and the new param's); otherwise it is a kernel of
//!   its own. Nothing that reads a reduction joins the kernel computing it
//!   (its value is complete only after the kernel's loop);
//! - every other op (softmax, normalizations, cross-entropy, gathers) is a
//!   kernel of its own.
//!
//! Because an op joins no kernel before its *latest* operand's, every
//! kernel's inputs are computed by earlier kernels: kernels run in order. The
//! optimizer update of a param joins the kernel that produces its (clipped)
//! gradient. Constants are immediates, not inputs. Every fused op keeps its
//! node, so its source position and `grad_fn` name stay known.

use std::collections::{BTreeSet, HashMap};
use std::fmt::Write;

use crate::ir::{BinaryFn, DType, Graph, KernelOp, NodeId, Op, ReduceFn, Role, Shape, UnaryFn};

/// What a kernel does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// A chain of elementwise ops and reductions of them.
    Elementwise,
    /// A matrix product and its elementwise epilogue.
    MatMul,
    /// A reduction of its own.
    Reduction,
    /// Any other op: softmax, normalization, loss, gather.
    Other,
}

/// One kernel of the plan.
#[derive(Clone, Debug, PartialEq)]
pub struct Kernel {
    /// What it does.
    pub kind: Kind,
    /// Its nodes, in execution order.
    pub nodes: Vec<NodeId>,
    /// The shape its loop runs over (its first node's output).
    pub loop_shape: Shape,
    /// Whether later ops may still join it.
    open: bool,
    /// Whether every op of the kernel depends only on constants and frozen
    /// params: its values are the same at every step, so it runs once per
    /// run (again only when new params are loaded).
    pub once: bool,
    /// Cheap values of other kernels this kernel recomputes from their
    /// operands instead of reading them from memory.
    pub recompute: BTreeSet<NodeId>,
    /// Whether the kernel reads its own row reductions (reductions along
    /// its loop shape's last axis): it then runs as passes over each row,
    /// the reductions of one pass read by the next (`jit::row_passes`).
    pub passes: bool,
}

/// How a loop over the rows of a shape (its last axis the columns) reads
/// a value of another shape.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum RowForm {
    /// The loop's own shape: one element per row and column.
    Full,
    /// The loop's shape with a last axis of 1: one element per row.
    PerRow,
    /// Only the last axis (the others 1 or absent): one element per column.
    Column,
    /// One element.
    Single,
}

/// How a loop over the rows of `loop_shape` reads a value of `shape`, if
/// it is one of the `RowForm`s (not, say, a broadcast over a middle axis).
pub(crate) fn row_form(shape: &Shape, loop_shape: &Shape) -> Option<RowForm> {
    let (dims, loop_dims) = (&shape.0, &loop_shape.0);
    let (Some((columns, rows)), Some(last)) = (loop_dims.split_last(), dims.last()) else {
        return dims.iter().all(|d| d.is_one()).then_some(RowForm::Single);
    };
    if shape == loop_shape {
        Some(RowForm::Full)
    } else if dims.iter().all(|d| d.is_one()) {
        Some(RowForm::Single)
    } else if dims.len() == loop_dims.len() && last.is_one() && &dims[..dims.len() - 1] == rows {
        Some(RowForm::PerRow)
    } else if last == columns
        && dims.len() <= loop_dims.len()
        && dims[..dims.len() - 1].iter().all(|d| d.is_one())
    {
        Some(RowForm::Column)
    } else {
        None
    }
}

/// Whether a node is a reduction along its operand's last axis that keeps
/// it: `sum`, `mean` or `max` with `keepdims`, or the `sum_to` of a
/// broadcast `[.., 1]` (its gradient). One value per row.
pub(crate) fn is_row_reduction(graph: &Graph, id: NodeId) -> bool {
    let node = graph.node(id);
    // (Ops without operands, `arange`, reduce nothing.)
    let Some(&first) = graph.operands(id).first() else {
        return false;
    };
    let operand = graph.node(first);
    let rank = operand.shape().rank();
    let along_last = match &node.op {
        Op::Reduce {
            func: ReduceFn::Sum | ReduceFn::Mean | ReduceFn::Max,
            axes,
            keepdims: true,
        } => rank >= 1 && axes.as_slice() == [rank - 1],
        Op::SumTo => row_form(node.shape(), operand.shape()) == Some(RowForm::PerRow),
        _ => false,
    };
    along_last && node.dtype() != DType::I32 && operand.dtype() != DType::I32
}

/// Whether a node sums a value of `loop_shape` over its rows to one value
/// per column (`sum` over the leading axes, or the `sum_to` of a
/// broadcast bias: its gradient): complete only after the last row.
pub(crate) fn is_column_sum(graph: &Graph, id: NodeId, loop_shape: &Shape) -> bool {
    let node = graph.node(id);
    let Some(&first) = graph.operands(id).first() else {
        return false;
    };
    let operand = graph.node(first);
    let sums = match &node.op {
        Op::SumTo => true,
        Op::Reduce {
            func: ReduceFn::Sum,
            axes,
            ..
        } => !axes.contains(&(operand.shape().rank().saturating_sub(1))),
        _ => false,
    };
    sums && operand.shape() == loop_shape
        && loop_shape.rank() >= 2
        && row_form(node.shape(), loop_shape) == Some(RowForm::Column)
        && node.dtype() != DType::I32
        && operand.dtype() != DType::I32
}

/// Whether an op adds up (or counts) its operand's elements into fewer: a
/// `sum` or `mean`, the `sum_to` of a broadcast, a monitor's
/// `zero_fraction` or `dead_fraction`, `mse` or `bce_with_logits`: the
/// sums that close a compiled kernel.
pub fn adds_elements(op: &Op) -> bool {
    matches!(
        op,
        Op::Reduce {
            func: ReduceFn::Sum | ReduceFn::Mean,
            ..
        } | Op::SumTo
            | Op::ZeroFraction
            | Op::DeadFraction
            | Op::Mse
            | Op::BceWithLogits
    )
}

/// Whether a node sums (or counts) a value of `loop_shape`, or one value
/// per row, to one element: a `sum` or `mean` over every axis, a `sum_to`
/// of a scalar, a monitor's `zero_fraction`, `mse` or `bce_with_logits`
/// (the gradient norms and counts that close a gradient's kernel).
pub(crate) fn is_single_sum(graph: &Graph, id: NodeId, loop_shape: &Shape) -> bool {
    let node = graph.node(id);
    let sums = adds_elements(&node.op) && node.op != Op::DeadFraction;
    let forms: Vec<Option<RowForm>> = graph
        .operands(id)
        .iter()
        .map(|&o| row_form(graph.node(o).shape(), loop_shape))
        .collect();
    let one_form = matches!(
        forms.first(),
        Some(Some(form @ (RowForm::Full | RowForm::PerRow)))
            if forms.iter().all(|f| f == &Some(*form))
    );
    sums && one_form
        && node.shape().0.iter().all(|d| d.is_one())
        && graph
            .operands(id)
            .iter()
            .all(|&o| graph.node(o).dtype() != DType::I32)
        && node.dtype() != DType::I32
}

/// Whether `id` can be computed in a loop of passes over the rows of
/// `loop_shape`: an elementwise op with the loop's shape or one value per
/// row, a row reduction or a column sum of a value of the loop's shape, or
/// a sum to one element of either, whose operands are all read in one of
/// the `RowForm`s.
fn fits_row_passes(graph: &Graph, id: NodeId, loop_shape: &Shape) -> bool {
    let node = graph.node(id);
    if node.dtype() == DType::I32 {
        return false;
    }
    let own = if is_row_reduction(graph, id) {
        row_form(graph.node(graph.operands(id)[0]).shape(), loop_shape) == Some(RowForm::Full)
    } else if is_column_sum(graph, id, loop_shape) || is_single_sum(graph, id, loop_shape) {
        true
    } else {
        is_elementwise(&node.op)
            && matches!(
                row_form(node.shape(), loop_shape),
                Some(RowForm::Full | RowForm::PerRow)
            )
    };
    own && reads(graph, id)
        .iter()
        .all(|&o| row_form(graph.node(o).shape(), loop_shape).is_some())
}

/// The kernels of a graph, in execution order.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Plan {
    /// The kernels.
    pub kernels: Vec<Kernel>,
    /// Which kernel computes each non-leaf node.
    pub kernel_of: HashMap<NodeId, usize>,
}

/// The values a node actually reads: all its operands, but the loss a
/// cross-entropy gradient kernel names only to be fused with it.
pub fn reads(graph: &Graph, id: NodeId) -> Vec<NodeId> {
    let mut operands = graph.operands(id);
    if graph.node(id).op == Op::Kernel(KernelOp::CrossEntropyGradient) {
        operands.truncate(3);
    }
    operands
}

impl Plan {
    /// Values a kernel reads from outside it (leaves and earlier kernels;
    /// constants are immediates).
    pub fn inputs(&self, graph: &Graph, k: usize) -> Vec<NodeId> {
        let kernel = &self.kernels[k];
        let mut inputs = BTreeSet::new();
        for &id in kernel.nodes.iter().chain(&kernel.recompute) {
            for operand in reads(graph, id) {
                let outside = self.kernel_of.get(&operand) != Some(&k)
                    && !kernel.recompute.contains(&operand);
                if outside && !matches!(graph.node(operand).op, Op::Constant(_)) {
                    inputs.insert(operand);
                }
            }
        }
        inputs.into_iter().collect()
    }

    /// The kernels (other than its own) that read a value from memory:
    /// those that need it and do not recompute it.
    pub(crate) fn reader_kernels(&self, graph: &Graph, id: NodeId) -> Vec<usize> {
        let home = self.kernel_of.get(&id).copied();
        let mut readers: Vec<usize> = graph
            .users(id)
            .into_iter()
            .filter(|&u| reads(graph, u).contains(&id))
            .filter_map(|u| self.kernel_of.get(&u).copied())
            .filter(|&k| Some(k) != home && !self.kernels[k].recompute.contains(&id))
            .collect();
        readers.sort_unstable();
        readers.dedup();
        readers
    }

    /// Values a kernel writes for later kernels or as results; and, in a
    /// kernel in passes, a costly value (`exp` of a softmax) that a row
    /// reduction and a later pass both read: stored in the pass that sums
    /// it and loaded back, not computed twice.
    pub fn outputs(&self, graph: &Graph, k: usize) -> Vec<NodeId> {
        let kernel = &self.kernels[k];
        kernel
            .nodes
            .iter()
            .copied()
            .filter(|&id| {
                graph.node(id).role != Role::Intermediate
                    || graph.node(id).retain
                    || !self.reader_kernels(graph, id).is_empty()
                    || (kernel.passes && read_again_after_its_sum(graph, kernel, id))
            })
            .collect()
    }
}

fn is_elementwise(op: &Op) -> bool {
    matches!(
        op,
        Op::Unary(_)
            | Op::LeakyRelu { .. }
            | Op::Clamp { .. }
            | Op::Binary(_)
            | Op::Dropout { .. }
            | Op::Identity
            | Op::Expand
            | Op::Select
            | Op::StopGradient
    )
}

fn is_reduction(op: &Op) -> bool {
    matches!(
        op,
        Op::Reduce { .. }
            | Op::SumTo
            | Op::ZeroFraction
            | Op::DeadFraction
            | Op::Mse
            | Op::BceWithLogits
    )
}

fn is_matmul(op: &Op) -> bool {
    matches!(op, Op::MatMul | Op::MatMulT { .. })
}

/// Partitions the graph into kernels.
pub fn plan(graph: &Graph) -> Plan {
    let invariant = step_invariant(graph);
    let mut plan = Plan::default();
    for id in graph.topo_order().unwrap_or_default() {
        let node = graph.node(id);
        if node.op.is_leaf() {
            continue;
        }
        // The latest kernel among the operands: the only one this node can
        // join without running before one of its inputs.
        let latest = reads(graph, id)
            .iter()
            .filter_map(|o| plan.kernel_of.get(o).copied())
            .max();
        // (A reduction's value is complete only after the kernel's loop:
        // nothing that reads it can join its kernel.)
        let reads_a_sum_of = |k: usize| {
            reads(graph, id)
                .iter()
                .any(|o| plan.kernel_of.get(o) == Some(&k) && is_reduction(&graph.node(*o).op))
        };
        // The latest operand's kernel if it is open over `shape` (the
        // values stay in registers), else the latest such kernel after it
        // (which runs after every operand is computed), reading no sum of
        // its own: so small loops (a norm's square root, a count over a
        // bias) share one kernel instead of each opening its own.
        let joinable = |plan: &Plan, shape: &Shape| -> Option<usize> {
            let latest = latest?;
            let fits = |k: usize| {
                let kernel = &plan.kernels[k];
                kernel.open
                    && matches!(kernel.kind, Kind::Elementwise | Kind::MatMul)
                    && &kernel.loop_shape == shape
                    && !reads_a_sum_of(k)
                    && (!kernel.passes || fits_row_passes(graph, id, &kernel.loop_shape))
            };
            std::iter::once(latest)
                .chain((latest + 1..plan.kernels.len()).rev())
                .find(|&k| fits(k))
        };
        // A node that reads a row reduction of the latest operand's kernel
        // (or one value per row of a kernel in passes already) joins it as
        // a later pass over each row, if everything in it fits passes.
        let as_pass = latest.filter(|&k| {
            let kernel = &plan.kernels[k];
            let reads_own_rows = reads(graph, id)
                .iter()
                .any(|o| plan.kernel_of.get(o) == Some(&k) && is_row_reduction(graph, *o));
            let reads_other_sums = reads(graph, id).iter().any(|o| {
                plan.kernel_of.get(o) == Some(&k)
                    && is_reduction(&graph.node(*o).op)
                    && !is_row_reduction(graph, *o)
            });
            kernel.open
                && matches!(kernel.kind, Kind::Elementwise | Kind::MatMul)
                && (kernel.passes || (reads_own_rows && !holds_costly_work(graph, kernel)))
                && !reads_other_sums
                && fits_row_passes(graph, id, &kernel.loop_shape)
                && kernel_fits_row_passes(graph, kernel)
        });
        let chosen = if let Some(k) = as_pass {
            plan.kernels[k].passes = true;
            Some(k)
        } else if is_elementwise(&node.op) {
            joinable(&plan, node.shape())
        } else if is_reduction(&node.op) {
            // (A row reduction sums in the interpreter's order, one row at
            // a time: costly work stays in its own kernel's vector loops.)
            let input_shape = graph.node(graph.operands(id)[0]).shape().clone();
            joinable(&plan, &input_shape).filter(|&k| {
                !is_row_reduction(graph, id) || !holds_costly_work(graph, &plan.kernels[k])
            })
        } else {
            None
        };
        let k = match chosen {
            Some(k) => {
                plan.kernels[k].nodes.push(id);
                k
            }
            None => {
                let (kind, open) = if is_matmul(&node.op) {
                    (Kind::MatMul, true)
                } else if is_elementwise(&node.op) {
                    (Kind::Elementwise, true)
                } else if is_reduction(&node.op) {
                    (Kind::Reduction, false)
                } else {
                    (Kind::Other, false)
                };
                plan.kernels.push(Kernel {
                    kind,
                    nodes: vec![id],
                    loop_shape: node.shape().clone(),
                    open,
                    once: true,
                    recompute: BTreeSet::new(),
                    passes: false,
                });
                plan.kernels.len() - 1
            }
        };
        plan.kernel_of.insert(id, k);
        if !invariant.contains(&id) {
            plan.kernels[k].once = false;
        }
    }
    recompute_cheap_values(graph, &mut plan);
    plan
}

/// Whether a kernel computes transcendental functions (or powers). Such
/// work (a residual block's GELU and its derivative, before a layer norm)
/// stays in its own kernel's vector loops: a row reduction (summed one
/// row at a time, in order) does not join it, nor does a kernel in passes
/// take it over (which would compute it again in each pass that reads
/// it, no buffer holding it).
fn holds_costly_work(graph: &Graph, kernel: &Kernel) -> bool {
    kernel.nodes.iter().any(|&id| is_costly(&graph.node(id).op))
}

/// Whether an elementwise op is costly to compute again: a transcendental
/// function or a power.
fn is_costly(op: &Op) -> bool {
    match op {
        Op::Unary(f) => !matches!(
            f,
            UnaryFn::Neg | UnaryFn::Abs | UnaryFn::Relu | UnaryFn::Sqrt
        ),
        Op::Binary(f) => *f == BinaryFn::Pow,
        _ => false,
    }
}

/// Whether `id`, a costly value of a kernel in passes with the kernel's
/// loop shape, is read both by one of the kernel's row reductions and by
/// another of its nodes (which runs in a later pass).
fn read_again_after_its_sum(graph: &Graph, kernel: &Kernel, id: NodeId) -> bool {
    if !is_costly(&graph.node(id).op) || *graph.node(id).shape() != kernel.loop_shape {
        return false;
    }
    let users: Vec<NodeId> = graph
        .users(id)
        .into_iter()
        .filter(|u| kernel.nodes.contains(u))
        .collect();
    users.iter().any(|&u| is_row_reduction(graph, u))
        && users.iter().any(|&u| !is_row_reduction(graph, u))
}

/// Whether every node of a kernel (after a matrix product's) fits passes
/// over the rows of its loop shape.
fn kernel_fits_row_passes(graph: &Graph, kernel: &Kernel) -> bool {
    let first = usize::from(kernel.kind == Kind::MatMul);
    kernel.nodes[first..]
        .iter()
        .all(|&id| fits_row_passes(graph, id, &kernel.loop_shape))
}

/// Cheap enough to recompute where it is read instead of storing it: one
/// elementwise arithmetic op whose operands are all leaves or constants
/// (`x / 16` of an input, say), with no role of its own.
fn recomputable(graph: &Graph, id: NodeId) -> bool {
    let node = graph.node(id);
    node.role == Role::Intermediate
        && !node.retain
        && matches!(
            node.op,
            Op::Binary(
                BinaryFn::Add
                    | BinaryFn::Sub
                    | BinaryFn::Mul
                    | BinaryFn::Div
                    | BinaryFn::Maximum
                    | BinaryFn::Minimum
            ) | Op::Unary(UnaryFn::Neg | UnaryFn::Abs | UnaryFn::Relu)
                | Op::LeakyRelu { .. }
                | Op::Clamp { .. }
        )
        && graph
            .operands(id)
            .iter()
            .all(|&o| graph.node(o).op.is_leaf())
}

/// Lets every kernel recompute the cheap values it reads from other
/// kernels (a matrix product applies them as it loads its operand; a
/// backward kernel re-derives the forward value), then drops kernels whose
/// values nobody reads any more. A stored tensor costs a write and a read
/// per step; recomputing one arithmetic op on values the kernel loads
/// anyway costs neither.
fn recompute_cheap_values(graph: &Graph, plan: &mut Plan) {
    for k in 0..plan.kernels.len() {
        let mut recompute = BTreeSet::new();
        for &id in &plan.kernels[k].nodes {
            for read in reads(graph, id) {
                if plan.kernel_of.get(&read).is_some_and(|&home| home != k)
                    && recomputable(graph, read)
                {
                    recompute.insert(read);
                }
            }
        }
        plan.kernels[k].recompute = recompute;
    }
    let dead: Vec<usize> = (0..plan.kernels.len())
        .filter(|&k| plan.outputs(graph, k).is_empty())
        .collect();
    if dead.is_empty() {
        return;
    }
    let mut kept = Vec::new();
    let mut renumber = HashMap::new();
    for (k, kernel) in std::mem::take(&mut plan.kernels).into_iter().enumerate() {
        if dead.contains(&k) {
            continue;
        }
        renumber.insert(k, kept.len());
        kept.push(kernel);
    }
    plan.kernels = kept;
    plan.kernel_of = plan
        .kernel_of
        .iter()
        .filter_map(|(&id, k)| renumber.get(k).map(|&new| (id, new)))
        .collect();
}

/// The nodes whose value is the same at every step: those that depend only
/// on constants and frozen params (frozen params never change during a
/// run; everything else, inputs, trainable params, buffers, optimizer
/// state and the runtime scalars, may).
pub fn step_invariant(graph: &Graph) -> BTreeSet<NodeId> {
    let mut invariant = BTreeSet::new();
    for id in graph.topo_order().unwrap_or_default() {
        let node = graph.node(id);
        let fixed = match node.op {
            Op::Constant(_) => true,
            Op::Param(_) => node.role == Role::FrozenParam,
            Op::Input | Op::Buffer(_) | Op::State | Op::Dropout { .. } => false,
            _ => graph.operands(id).iter().all(|o| invariant.contains(o)),
        };
        if fixed {
            invariant.insert(id);
        }
    }
    invariant
}

/// Describes a node for the plan: op, `grad_fn` for backward nodes, line.
pub(crate) fn describe(graph: &Graph, id: NodeId, number: &HashMap<NodeId, usize>) -> String {
    let node = graph.node(id);
    let mut text = format!("%{} {}", number[&id], node.op.name());
    if let Some(backward) = &node.backward {
        let _ = write!(text, " [{}]", backward.grad_fn);
    }
    let _ = write!(text, " @{}:{}", node.origin.line, node.origin.col);
    text
}

/// Renders the plan, with ids numbered as in the canonical text form
/// (`snapshot` adds the memory plan's summary).
pub fn render(graph: &Graph, plan: &Plan) -> String {
    let order = graph.topo_order().unwrap_or_else(|| graph.ids());
    let number: HashMap<NodeId, usize> = order.iter().enumerate().map(|(i, &id)| (id, i)).collect();
    let ids = |list: &[NodeId]| {
        list.iter()
            .map(|id| format!("%{}", number[id]))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let mut out = format!(
        "kernels of {} ({}): {} nodes, {} kernels\n",
        graph.model,
        graph.mode,
        graph.len(),
        plan.kernels.len()
    );
    for (k, kernel) in plan.kernels.iter().enumerate() {
        let backward = kernel
            .nodes
            .iter()
            .filter(|&&id| graph.node(id).backward.is_some())
            .count();
        let part = match (backward, kernel.nodes.len() - backward) {
            (0, _) => "forward or update",
            (_, 0) => "backward",
            _ => "forward+backward",
        };
        let _ = writeln!(
            out,
            "  k{k}: {:?}{} over {}, {} op{} ({part}){}",
            kernel.kind,
            if kernel.passes {
                " in passes per row"
            } else {
                ""
            },
            kernel.loop_shape,
            kernel.nodes.len(),
            if kernel.nodes.len() == 1 { "" } else { "s" },
            if kernel.once {
                ", once per run: depends only on frozen params and constants"
            } else {
                ""
            }
        );
        let ops: Vec<String> = kernel
            .nodes
            .iter()
            .map(|&id| describe(graph, id, &number))
            .collect();
        let _ = writeln!(out, "    ops: {}", ops.join(", "));
        if !kernel.recompute.is_empty() {
            let again: Vec<String> = kernel
                .recompute
                .iter()
                .map(|&id| describe(graph, id, &number))
                .collect();
            let _ = writeln!(out, "    recomputes: {}", again.join(", "));
        }
        let _ = writeln!(out, "    in: {}", ids(&plan.inputs(graph, k)));
        let _ = writeln!(out, "    out: {}", ids(&plan.outputs(graph, k)));
    }
    out
}
