//! Binding a program to one set of sizes: a frame with a buffer per
//! value, each kernel's call with its broadcast factors, row counts and
//! copy blocks (checked against the buffers when pushed), the host work
//! for matrix products and interpreted kernels, and the compiled step
//! entry that makes the calls in order.

use std::collections::{BTreeMap, BTreeSet};

use crate::interp::{self, InterpError, Tensor};
use crate::ir::{DType, Graph, IdMap, NodeId, Op, Shape};
use crate::jit::clif::CodegenError;
use crate::jit::clif::Elem;
use crate::jit::elementwise::CompiledKernel;
use crate::jit::movers::Mover;
use crate::jit::native::frame::CopyBlock;
use crate::jit::native::frame::Frame;
use crate::jit::program::Compiled;
use crate::jit::program::Program;
use crate::jit::program::elem;
use crate::jit::row_passes::PassKernel;
use crate::jit::rows::RowKernel;

/// A frame bound to one set of sizes, with what its host work does.
pub(super) struct Bound {
    pub(super) frame: Frame,
    /// The buffer of every value the step materializes.
    pub(super) slots: IdMap<usize>,
    /// Each buffer's node and concrete shape.
    pub(super) values: Vec<(NodeId, Vec<usize>)>,
    /// Host work, by the index the entry passes.
    pub(super) work: Vec<Work>,
    pub(super) dims: BTreeMap<String, usize>,
    pub(super) entry_clif: String,
    /// The values the last step asked for (`Backend::run_wanted`): a step
    /// asks for the same ones every time.
    pub(super) wanted: Option<Wanted>,
    /// The compiled bodies of the scans the step runs, by node.
    pub(super) loops: IdMap<crate::jit::scan::LoopBody>,
}

/// The values a step asks for (`Bound::want`), and each one's buffer and
/// type.
pub(super) struct Wanted {
    ids: Vec<NodeId>,
    pub(super) outputs: Vec<(NodeId, usize, DType)>,
}

/// Host work of a step entry.
pub(super) enum Work {
    /// Nodes evaluated in order: a matrix product on the GEMM, another on
    /// the interpreter.
    Interpret(Vec<HostNode>),
    /// The labels (or indices, `what`) in a buffer must lie in `0..cols`
    /// (the interpreter's check and error), before a kernel reads them.
    Labels {
        slot: usize,
        cols: usize,
        what: &'static str,
    },
}

/// A node of host work, as the frame's sizes make it.
pub(super) enum HostNode {
    /// A matrix product, planned when the frame is bound.
    Product(Product),
    /// Another node, on the interpreter.
    Node(NodeId),
}

/// A matrix product on the GEMM, straight from the frame's buffers
/// (`plan_product`): `out = a @ b`, each operand a buffer read as a
/// `rows x cols` matrix, transposed or not.
pub(super) struct Product {
    pub(super) id: NodeId,
    pub(super) dtype: DType,
    /// The buffers of `a`, `b` and the result.
    pub(super) slots: [usize; 3],
    pub(super) a: Matrix,
    pub(super) b: Matrix,
    /// For a batched product (`batch_matmul`), where each product's `a`
    /// and `b` start in their buffers, one pair per matrix of the result
    /// (in order: result `i` starts at `i` times its size); leading axes
    /// broadcast by repeating offsets. Empty for one product.
    pub(super) batches: Vec<(usize, usize)>,
}

/// A buffer as a matrix: its rows and columns as stored (`matrix_dims`),
/// and whether it is read transposed.
#[derive(Clone, Copy)]
pub(super) struct Matrix {
    pub(super) rows: usize,
    pub(super) cols: usize,
    pub(super) transposed: bool,
}

impl Matrix {
    /// The rows as read.
    pub(super) fn read_rows(self) -> usize {
        if self.transposed {
            self.cols
        } else {
            self.rows
        }
    }

    /// The columns as read.
    pub(super) fn read_cols(self) -> usize {
        if self.transposed {
            self.rows
        } else {
            self.cols
        }
    }
}

/// How many frames (sets of sizes) a program keeps: a training run needs
/// its batch size, the last partial batch and the eval batch size.
const FRAMES: usize = 8;

/// A program's frames, by the sizes they are bound to.
pub(super) type Frames =
    std::collections::HashMap<BTreeMap<String, usize>, Bound, crate::ir::IdBuildHasher>;

/// The frame of `program` for these sizes, bound (and its entry compiled)
/// on first use; binding one more than `FRAMES` drops the others.
pub(super) fn bound<'f>(
    program: &mut Program,
    frames: &'f mut Frames,
    graph: &Graph,
    dims: &BTreeMap<String, usize>,
) -> Result<&'f mut Bound, InterpError> {
    if !frames.contains_key(dims) {
        if frames.len() >= FRAMES {
            frames.clear();
        }
        let bound = bind(program, graph, dims)?;
        frames.insert(dims.clone(), bound);
    }
    frames
        .get_mut(dims)
        .ok_or_else(|| InterpError::Internal("the frame vanished".into()))
}

/// Where a program computes the caller's value `id` (`Program::ids`;
/// the same id in a program of the graph as given).
pub(super) fn own_id(ids: &IdMap<NodeId>, id: NodeId) -> Result<NodeId, InterpError> {
    let own = if ids.is_empty() {
        Some(id)
    } else {
        ids.get(&id).copied()
    };
    own.ok_or_else(|| InterpError::Internal(format!("{id} is not computed by the program")))
}

/// The buffer of a value, among a frame's `slots`.
pub(super) fn slot_in(slots: &IdMap<usize>, id: NodeId) -> Result<usize, InterpError> {
    slots
        .get(&id)
        .copied()
        .ok_or_else(|| InterpError::Internal(format!("{id} has no buffer")))
}

pub(super) fn internal(error: CodegenError) -> InterpError {
    InterpError::Internal(error.to_string())
}

/// Binds a program to sizes: gives every value the step materializes a
/// buffer, evaluates the constants, pushes each kernel's calls (checking
/// every buffer a compiled kernel reaches) and compiles the entry.
pub(super) fn bind(
    program: &mut Program,
    graph: &Graph,
    dims: &BTreeMap<String, usize>,
) -> Result<Bound, InterpError> {
    let (calls, materialized) = plan_calls(program, graph, dims)?;
    let (mut frame, slots, values) = allocate(program, graph, dims, &materialized)?;
    let work = push_calls(&mut frame, graph, (&slots, &values), calls)?;
    let entry_clif = program.code.compile_entry(&mut frame).map_err(internal)?;
    Ok(Bound {
        frame,
        slots,
        values,
        work,
        dims: dims.clone(),
        entry_clif,
        wanted: None,
        loops: IdMap::default(),
    })
}

/// Each kernel's call for these sizes (a compiled kernel the sizes do not
/// suit goes to the interpreter), and the values the step materializes:
/// every other value lives only inside a compiled kernel.
fn plan_calls<'p>(
    program: &'p Program,
    graph: &Graph,
    dims: &BTreeMap<String, usize>,
) -> Result<(Vec<Call<'p>>, BTreeSet<NodeId>), InterpError> {
    let mut materialized: BTreeSet<NodeId> = program
        .order
        .iter()
        .copied()
        .filter(|&id| graph.node(id).op.is_leaf())
        .collect();
    let mut calls: Vec<Call> = Vec::new();
    let mut done: BTreeSet<NodeId> = materialized.clone();
    for k in 0..program.plan.kernels.len() {
        let call = call_for(program, graph, dims, k, &done)?;
        let produced: Vec<NodeId> = match &call {
            Call::Kernel {
                prologue, kernel, ..
            } => prologue.iter().chain(&kernel.outputs).copied().collect(),
            Call::Rows {
                prologue, kernel, ..
            } => prologue.iter().chain(&kernel.outputs).copied().collect(),
            Call::Mover { prologue, node, .. } => prologue.iter().copied().chain([*node]).collect(),
            Call::Passes {
                prologue, kernel, ..
            } => prologue.iter().chain(&kernel.outputs).copied().collect(),
            Call::Interpret(nodes) => nodes.clone(),
        };
        done.extend(produced.iter().copied());
        materialized.extend(produced);
        calls.push(call);
    }
    Ok((calls, materialized))
}

/// The call of kernel `k` for these sizes, `done` the values computed by
/// the calls before it.
fn call_for<'p>(
    program: &'p Program,
    graph: &Graph,
    dims: &BTreeMap<String, usize>,
    k: usize,
    done: &BTreeSet<NodeId>,
) -> Result<Call<'p>, InterpError> {
    let kernel = &program.plan.kernels[k];
    // What a kernel on the interpreter evaluates: its recomputed values
    // (unless materialized already) and its nodes.
    let interpreted = || -> Call<'p> {
        let mut nodes: Vec<NodeId> = kernel
            .recompute
            .iter()
            .copied()
            .filter(|id| !done.contains(id))
            .collect();
        nodes.sort_by_key(|id| program.position.get(id).copied());
        nodes.extend(kernel.nodes.iter().copied());
        Call::Interpret(nodes)
    };
    // A compiled kernel's prologue, without what is materialized already.
    let unfinished = |prologue: &[NodeId]| -> Vec<NodeId> {
        prologue
            .iter()
            .copied()
            .filter(|id| !done.contains(id))
            .collect()
    };
    let to = |shape: &Shape| interp::concrete(shape, dims);
    Ok(match &program.kernels[k] {
        Some(Compiled::Elementwise { prologue, kernel }) => {
            let to_shape = to(&program.loops[k])?;
            let n: usize = to_shape.iter().product();
            match kernel_factors(graph, kernel, &to_shape, dims)? {
                Some((ks, ms)) => Call::Kernel {
                    prologue: unfinished(prologue),
                    kernel,
                    ks,
                    ms,
                    n,
                },
                None => interpreted(),
            }
        }
        Some(Compiled::Rows { prologue, kernel }) => {
            let shaped = kernel.inputs[kernel.op.shaped_by()];
            let shape = to(graph.node(shaped).shape())?;
            let cols = shape.last().copied().unwrap_or(0);
            match shape.iter().product::<usize>().checked_div(cols) {
                Some(rows) => Call::Rows {
                    prologue: unfinished(prologue),
                    kernel,
                    rows,
                    cols,
                },
                // (Rows of no columns: the interpreter runs them.)
                None => interpreted(),
            }
        }
        Some(Compiled::Mover {
            prologue,
            node,
            func,
        }) => match moves(graph, *node, func.1, dims)? {
            Some(moves) => Call::Mover {
                prologue: unfinished(prologue),
                node: *node,
                func: *func,
                moves,
            },
            None => interpreted(),
        },
        Some(Compiled::Passes { prologue, kernel }) => {
            let shape = to(&program.loops[k])?;
            let cols = shape.last().copied().unwrap_or(1);
            let rows = shape[..shape.len().saturating_sub(1)].iter().product();
            Call::Passes {
                prologue: unfinished(prologue),
                kernel,
                rows,
                cols,
            }
        }
        // (Nothing to do, unless that kernel fell back to the interpreter.)
        Some(Compiled::Within) if kernel.nodes.iter().all(|id| done.contains(id)) => {
            Call::Interpret(Vec::new())
        }
        Some(Compiled::Within) | None => interpreted(),
    })
}

/// A frame with a buffer per materialized value (a dead fraction keeps a
/// slot per unit while it counts), the constants written once; each
/// value's buffer and its concrete shape.
#[allow(
    clippy::type_complexity,
    reason = "the three parts of a frame's layout"
)]
fn allocate(
    program: &Program,
    graph: &Graph,
    dims: &BTreeMap<String, usize>,
    materialized: &BTreeSet<NodeId>,
) -> Result<(Frame, IdMap<usize>, Vec<(NodeId, Vec<usize>)>), InterpError> {
    let to = |shape: &Shape| interp::concrete(shape, dims);
    let mut slots = IdMap::default();
    let mut values = Vec::new();
    let mut lengths = Vec::new();
    for &id in &program.order {
        if !materialized.contains(&id) {
            continue;
        }
        let shape = to(graph.node(id).shape())?;
        let mut length: usize = shape.iter().product();
        if matches!(graph.node(id).op, Op::DeadFraction) {
            let operand = to(graph.node(graph.operands(id)[0]).shape())?;
            length = length.max(operand.iter().skip(1).product());
        }
        slots.insert(id, values.len());
        values.push((id, shape));
        lengths.push((length, elem(graph, &program.storage, id)));
    }
    let mut frame = Frame::new(&lengths).map_err(InterpError::Runtime)?;
    for &id in &program.order {
        if let Op::Constant(c) = graph.node(id).op {
            let value = Tensor::new(graph.node(id).dtype(), Vec::new(), vec![c]);
            let slot = slots[&id];
            frame
                .buffers()
                .write(slot, &vec![value.data[0]; lengths[slot].0])
                .map_err(internal)?;
        }
    }
    Ok((frame, slots, values))
}

/// Pushes the calls onto the frame with their buffers (`slots`; `values`
/// the concrete shapes), host work between them where the interpreter or
/// the GEMM runs a kernel or its prologue, or labels are checked; returns
/// the host work, in the order the entry calls it.
fn push_calls(
    frame: &mut Frame,
    graph: &Graph,
    (slots, values): (&IdMap<usize>, &[(NodeId, Vec<usize>)]),
    calls: Vec<Call<'_>>,
) -> Result<Vec<Work>, InterpError> {
    let mut work = Vec::new();
    let slot_of = |id: &NodeId| slot_in(slots, *id);
    // Host nodes: products planned here, once.
    let interpret = |nodes: Vec<NodeId>| {
        Work::Interpret(
            nodes
                .into_iter()
                .map(|id| match plan_product(graph, slots, values, id) {
                    Some(product) => HostNode::Product(product),
                    None => HostNode::Node(id),
                })
                .collect(),
        )
    };
    // Host work `w`, called from the entry at this point.
    let host = |frame: &mut Frame, work: &mut Vec<Work>, w: Work| {
        frame.push_host(work.len());
        work.push(w);
    };
    let buffers_of = |inputs: &[NodeId], outputs: &[NodeId]| {
        inputs
            .iter()
            .chain(outputs)
            .map(slot_of)
            .collect::<Result<Vec<usize>, _>>()
    };
    for call in calls {
        let prologue = match &call {
            Call::Kernel { prologue, .. }
            | Call::Rows { prologue, .. }
            | Call::Mover { prologue, .. }
            | Call::Passes { prologue, .. } => prologue.clone(),
            Call::Interpret(_) => Vec::new(),
        };
        if !prologue.is_empty() {
            host(frame, &mut work, interpret(prologue));
        }
        match call {
            Call::Kernel {
                kernel, ks, ms, n, ..
            } => {
                let buffers = buffers_of(&kernel.inputs, &kernel.outputs)?;
                frame
                    .push_kernel(kernel, buffers, ks, ms, n)
                    .map_err(internal)?;
            }
            Call::Rows {
                kernel, rows, cols, ..
            } => {
                let buffers = buffers_of(&kernel.inputs, &kernel.outputs)?;
                if let Some(labels) = kernel.op.labels() {
                    let labels = Work::Labels {
                        slot: buffers[labels],
                        cols,
                        what: "label",
                    };
                    host(frame, &mut work, labels);
                }
                frame
                    .push_rows(kernel, buffers, rows, cols)
                    .map_err(internal)?;
            }
            Call::Mover {
                node,
                func: (func, _, elem),
                moves: Moves::Blocks(blocks),
                ..
            } => {
                let to = slot_of(&node)?;
                for (from, block) in blocks {
                    frame
                        .push_copy((func, elem), [slot_of(&from)?, to], block)
                        .map_err(internal)?;
                }
            }
            Call::Mover {
                node,
                func: (func, mover, elem),
                moves: Moves::Rows { ids, rows, sizes },
                ..
            } => {
                let slots = [slot_of(&ids)?, slot_of(&rows)?, slot_of(&node)?];
                let indices = Work::Labels {
                    slot: slots[0],
                    cols: sizes[2],
                    what: "embedding index",
                };
                host(frame, &mut work, indices);
                let f32 = graph.node(node).dtype() == DType::F32;
                frame
                    .push_indexed((func, mover, elem), slots, sizes, f32)
                    .map_err(internal)?;
            }
            Call::Passes {
                kernel, rows, cols, ..
            } => {
                let buffers = buffers_of(&kernel.inputs, &kernel.outputs)?;
                frame
                    .push_passes(kernel, buffers, rows, cols)
                    .map_err(internal)?;
            }
            Call::Interpret(nodes) if nodes.is_empty() => {}
            Call::Interpret(nodes) => host(frame, &mut work, interpret(nodes)),
        }
    }
    Ok(work)
}

/// One kernel's part of the entry, before buffers are assigned.
pub(super) enum Call<'p> {
    Kernel {
        prologue: Vec<NodeId>,
        kernel: &'p CompiledKernel,
        ks: Vec<i64>,
        ms: Vec<i64>,
        n: usize,
    },
    Rows {
        prologue: Vec<NodeId>,
        kernel: &'p RowKernel,
        rows: usize,
        cols: usize,
    },
    Mover {
        prologue: Vec<NodeId>,
        node: NodeId,
        func: (cranelift_module::FuncId, Mover, Elem),
        moves: Moves,
    },
    Passes {
        prologue: Vec<NodeId>,
        kernel: &'p PassKernel,
        rows: usize,
        cols: usize,
    },
    Interpret(Vec<NodeId>),
}

/// What a mover's call moves at a frame's sizes.
pub(super) enum Moves {
    /// A copy's blocks, each with the operand it copies from
    /// (`copy_blocks`).
    Blocks(Vec<(NodeId, CopyBlock)>),
    /// A gather's or a scatter's rows: the indices, the rows read (the
    /// table, or the gradient), and `[n, d, v]` (the number of indices,
    /// the row length, the table's rows).
    Rows {
        ids: NodeId,
        rows: NodeId,
        sizes: [usize; 3],
    },
}

/// The `ks` and `ms` of a compiled kernel's buffers.
pub(super) type Factors = (Vec<i64>, Vec<i64>);

/// The broadcast factors of every buffer of a compiled kernel looping over
/// `to`: inputs by their shapes, a sum by its kept axes, a zero fraction
/// one slot, a dead fraction a slot per unit (every axis but the first);
/// `None` when some broadcasting is not one block (the kernel then runs on
/// the interpreter at these sizes).
pub(super) fn kernel_factors(
    graph: &Graph,
    compiled: &CompiledKernel,
    to: &[usize],
    dims: &BTreeMap<String, usize>,
) -> Result<Option<Factors>, InterpError> {
    let n: usize = to.iter().product();
    let mut ks = Vec::new();
    let mut ms = Vec::new();
    for shape in &compiled.read_shapes {
        let shape = interp::concrete(shape, dims)?;
        let Some((k, m)) = factors(&shape, to) else {
            return Ok(None);
        };
        ks.push(k);
        ms.push(m);
    }
    for &output in &compiled.outputs {
        let node = graph.node(output);
        let kept: Option<Vec<usize>> = match &node.op {
            Op::Reduce { axes, .. } => Some(
                to.iter()
                    .enumerate()
                    .map(|(d, &size)| if axes.contains(&d) { 1 } else { size })
                    .collect(),
            ),
            Op::SumTo => Some(interp::concrete(node.shape(), dims)?),
            Op::ZeroFraction | Op::Mse | Op::BceWithLogits => Some(Vec::new()),
            Op::DeadFraction => {
                let mut kept = to.to_vec();
                if let Some(rows) = kept.first_mut() {
                    *rows = 1;
                }
                Some(kept)
            }
            _ => None,
        };
        let (k, m) = match kept {
            Some(kept) => match factors(&kept, to) {
                Some(f) => f,
                None => return Ok(None),
            },
            None => (1, i64::try_from(n).unwrap_or(i64::MAX)),
        };
        ks.push(k);
        ms.push(m);
    }
    Ok(Some((ks, ms)))
}

/// The broadcast factors `(k, m)` that read `operand` of shape `from` at
/// `(i / k) % m` for element `i` of `to`; `None` when broadcasting is not
/// one contiguous block of axes.
pub(super) fn factors(from: &[usize], to: &[usize]) -> Option<(i64, i64)> {
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

impl Bound {
    /// A value copied out of its buffer, as the interpreter's tensor.
    pub(super) fn value(&self, graph: &Graph, id: NodeId) -> Result<Tensor, InterpError> {
        let mut tensor = Tensor {
            dtype: graph.node(id).dtype(),
            shape: Vec::new(),
            data: Vec::new(),
        };
        self.refill(graph, id, &mut tensor)?;
        Ok(tensor)
    }

    /// `value` into a tensor of an earlier step (reusing its memory).
    fn refill(&self, graph: &Graph, id: NodeId, tensor: &mut Tensor) -> Result<(), InterpError> {
        let slot = slot_in(&self.slots, id)?;
        self.refill_slot(slot, graph.node(id).dtype(), tensor);
        Ok(())
    }

    /// `refill` from buffer `slot`, of a value of type `dtype`.
    pub(super) fn refill_slot(&self, slot: usize, dtype: DType, tensor: &mut Tensor) {
        let shape = &self.values[slot].1;
        tensor.dtype = dtype;
        tensor.shape.clone_from(shape);
        self.frame
            .read_into(slot, shape.iter().product(), &mut tensor.data);
    }

    /// Sets `Bound::wanted` to the caller's `wanted` values, each with the
    /// buffer of the program's value (`ids`, `own_id`) and its type: worked
    /// out again only when `wanted` is not the last step's list.
    pub(super) fn want(
        &mut self,
        graph: &Graph,
        ids: &IdMap<NodeId>,
        wanted: &[NodeId],
    ) -> Result<(), InterpError> {
        if self.wanted.as_ref().is_none_or(|w| w.ids != wanted) {
            let outputs = wanted
                .iter()
                .map(|&id| {
                    let own = own_id(ids, id)?;
                    Ok((id, slot_in(&self.slots, own)?, graph.node(own).dtype()))
                })
                .collect::<Result<Vec<_>, InterpError>>()?;
            self.wanted = Some(Wanted {
                ids: wanted.to_vec(),
                outputs,
            });
        }
        Ok(())
    }
}

/// Plans a matrix product on the GEMM for a frame (its buffers `slots`
/// and their shapes `values`): a `matmul` (plain, or with a transposed
/// right operand) and both of its VJPs. `None` for any other node or a
/// shape it does not handle (the interpreter then runs it).
///
/// A batched operand `[.., M, K]` is one `(B*M) x K` matrix, so each case
/// is a single GEMM: `A @ B`; `dA = g @ B^T`; and `dB = A^T @ g`, whose
/// inner size `B*M` also performs the sum over the batch. A transpose is a
/// view with swapped strides, never a copy.
pub(super) fn plan_product(
    graph: &Graph,
    slots: &IdMap<usize>,
    values: &[(NodeId, Vec<usize>)],
    id: NodeId,
) -> Option<Product> {
    let node = graph.node(id);
    let operands = graph.operands(id);
    // (left operand, transposed?), (right operand, transposed?).
    let ((left, transpose_left), (right, transpose_right)) = match &node.op {
        Op::MatMul => ((operands[0], false), (operands[1], false)),
        Op::MatMulT {
            transpose_a: false,
            transpose_b,
        } => ((operands[0], false), (operands[1], *transpose_b)),
        // `a^T @ c`, with a batch of both summed: as matrices (leading
        // axes flattened into rows) that is one product.
        Op::MatMulT {
            transpose_a: true,
            transpose_b: false,
        } if graph.node(operands[0]).shape().rank() == graph.node(operands[1]).shape().rank() => {
            ((operands[0], true), (operands[1], false))
        }
        Op::BatchMatMul {
            transpose_a,
            transpose_b,
        } => return plan_batch_product(graph, slots, values, id, (*transpose_a, *transpose_b)),
        _ => return None,
    };
    let (&left, &right, &out) = (slots.get(&left)?, slots.get(&right)?, slots.get(&id)?);
    let matrix = |slot: usize, transposed: bool| {
        let (rows, cols) = matrix_dims(&values[slot].1)?;
        Some(Matrix {
            rows,
            cols,
            transposed,
        })
    };
    let (a, b) = (
        matrix(left, transpose_left)?,
        matrix(right, transpose_right)?,
    );
    let count: usize = values[out].1.iter().product();
    let fits = a.read_cols() == b.read_rows()
        && count == a.read_rows() * b.read_cols()
        && left != out
        && right != out;
    fits.then_some(Product {
        id,
        dtype: node.dtype(),
        slots: [left, right, out],
        a,
        b,
        batches: Vec::new(),
    })
}

/// Plans a batched product `[..., M, K] @ [..., K, N]` as one GEMM per
/// matrix of the result, each operand's matrix found by NumPy's
/// broadcasting of the leading axes.
fn plan_batch_product(
    graph: &Graph,
    slots: &IdMap<usize>,
    values: &[(NodeId, Vec<usize>)],
    id: NodeId,
    (transpose_a, transpose_b): (bool, bool),
) -> Option<Product> {
    let operands = graph.operands(id);
    let (&left, &right, &out) = (
        slots.get(&operands[0])?,
        slots.get(&operands[1])?,
        slots.get(&id)?,
    );
    let (a_shape, b_shape, c_shape) = (&values[left].1, &values[right].1, &values[out].1);
    let (ra, rb, rc) = (a_shape.len(), b_shape.len(), c_shape.len());
    if ra < 2 || rb < 2 || rc < 2 || left == out || right == out {
        return None;
    }
    // Each operand's last two axes as stored, and as read.
    let stored = |s: &[usize]| (s[s.len() - 2], s[s.len() - 1]);
    let read = |(r, c): (usize, usize), swapped: bool| if swapped { (c, r) } else { (r, c) };
    let ((m, k), (k_b, n)) = (
        read(stored(a_shape), transpose_a),
        read(stored(b_shape), transpose_b),
    );
    if k_b != k || c_shape[rc - 2] != m || c_shape[rc - 1] != n {
        return None;
    }
    let lead = &c_shape[..rc - 2];
    let count: usize = lead.iter().product();
    // Each operand's leading axes, aligned to the result's from the right.
    let offset = |shape: &[usize], index: &[usize], size: usize| -> Option<usize> {
        let own = &shape[..shape.len() - 2];
        let skip = lead.len().checked_sub(own.len())?;
        let mut flat = 0;
        for (d, &extent) in own.iter().enumerate() {
            let at = if extent == 1 { 0 } else { index[skip + d] };
            flat = flat * extent + at;
        }
        Some(flat * size)
    };
    let mut batches = Vec::with_capacity(count);
    let mut index = vec![0; lead.len()];
    for _ in 0..count {
        batches.push((
            offset(a_shape, &index, m * k)?,
            offset(b_shape, &index, k * n)?,
        ));
        for d in (0..lead.len()).rev() {
            index[d] += 1;
            if index[d] < lead[d] {
                break;
            }
            index[d] = 0;
        }
    }
    let matrix = |(rows, cols): (usize, usize), transposed| Matrix {
        rows,
        cols,
        transposed,
    };
    Some(Product {
        id,
        dtype: graph.node(id).dtype(),
        slots: [left, right, out],
        a: matrix(stored(a_shape), transpose_a),
        b: matrix(stored(b_shape), transpose_b),
        batches,
    })
}

/// A shape as a matrix: (leading axes flattened) x (last axis); `None`
/// below rank 2 or for an empty last axis.
pub(super) fn matrix_dims(shape: &[usize]) -> Option<(usize, usize)> {
    let cols = *shape.last()?;
    if shape.len() < 2 || cols == 0 {
        return None;
    }
    Some((shape.iter().product::<usize>() / cols, cols))
}

/// What a mover's call moves for node `id` at these sizes, or `None` when
/// it cannot (the interpreter then runs the node).
pub(super) fn moves(
    graph: &Graph,
    id: NodeId,
    mover: Mover,
    dims: &BTreeMap<String, usize>,
) -> Result<Option<Moves>, InterpError> {
    let operands = graph.operands(id);
    // An embedding's operands: the ids, the table; a scatter-add's: the
    // ids and the rows, into a table of its own shape.
    let (ids, rows, table) = match mover {
        Mover::Copy => return Ok(copy_blocks(graph, id, dims)?.map(Moves::Blocks)),
        Mover::Gather => (operands[0], operands[1], operands[1]),
        Mover::Scatter => (operands[0], operands[1], id),
    };
    let n: usize = interp::concrete(graph.node(ids).shape(), dims)?
        .iter()
        .product();
    Ok(
        match interp::concrete(graph.node(table).shape(), dims)?.as_slice() {
            &[v, d] => Some(Moves::Rows {
                ids,
                rows,
                sizes: [n, d, v],
            }),
            _ => None,
        },
    )
}

/// The most copy blocks a permutation is split into; beyond, the
/// interpreter moves its elements.
const PERMUTE_BLOCKS: usize = 4096;

/// The copy blocks of a permutation of an operand of `shape` (axis `i` of
/// the result is axis `axes[i]`): its axes as levels of (size, stride read,
/// stride written), size-1 axes dropped and neighbours that stay
/// neighbours merged; the innermost three levels make a block, one block
/// per index of the levels outside them. Empty when that is more than
/// [`PERMUTE_BLOCKS`] blocks.
fn permute_blocks(shape: &[usize], axes: &[usize]) -> Vec<CopyBlock> {
    let strides = crate::interp::tensor::strides(shape);
    let sizes: Vec<usize> = axes.iter().map(|&a| shape[a]).collect();
    let written = crate::interp::tensor::strides(&sizes);
    let mut levels: Vec<(usize, usize, usize)> = Vec::new();
    for (i, &a) in axes.iter().enumerate() {
        if shape[a] == 1 {
            continue;
        }
        let level = (shape[a], strides[a], written[i]);
        match levels.last_mut() {
            Some(last) if last.1 == level.1 * level.0 && last.2 == level.2 * level.0 => {
                *last = (last.0 * level.0, level.1, level.2);
            }
            _ => levels.push(level),
        }
    }
    while levels.len() < 3 {
        levels.insert(0, (1, 0, 0));
    }
    let (outer, inner) = levels.split_at(levels.len() - 3);
    let count: usize = outer.iter().map(|l| l.0).product();
    if count > PERMUTE_BLOCKS {
        return Vec::new();
    }
    let mut blocks = Vec::with_capacity(count);
    let mut index = vec![0; outer.len()];
    for _ in 0..count {
        let from: usize = index.iter().zip(outer).map(|(i, l)| i * l.1).sum();
        let to: usize = index.iter().zip(outer).map(|(i, l)| i * l.2).sum();
        blocks.push(CopyBlock {
            counts: [inner[0].0, inner[1].0, inner[2].0],
            from: (from, [inner[0].1, inner[1].1, inner[2].1]),
            to: (to, [inner[0].2, inner[1].2, inner[2].2]),
        });
        for d in (0..outer.len()).rev() {
            index[d] += 1;
            if index[d] < outer[d].0 {
                break;
            }
            index[d] = 0;
        }
    }
    blocks
}

/// How a node `moved_operands` accepts is its operands' elements moved, at
/// these sizes: the blocks to copy, each with the operand it copies from
/// (as the interpreter's `reshape`, `kernels::transpose`,
/// `kernels::concat` and `kernels::slice` order the elements).
pub(super) fn copy_blocks(
    graph: &Graph,
    id: NodeId,
    dims: &BTreeMap<String, usize>,
) -> Result<Option<Vec<(NodeId, CopyBlock)>>, InterpError> {
    let operands = graph.operands(id);
    let shape_of = |n: NodeId| interp::concrete(graph.node(n).shape(), dims);
    let whole = |n: usize| CopyBlock {
        counts: [1, 1, n],
        from: (0, [0, 0, 1]),
        to: (0, [0, 0, 1]),
    };
    // `[.., r, c]` to `[.., c, r]`.
    let transposed = |shape: &[usize]| -> Option<CopyBlock> {
        let rank = shape.len();
        let (r, c) = (*shape.get(rank.checked_sub(2)?)?, shape[rank - 1]);
        let batch: usize = shape[..rank - 2].iter().product();
        Some(CopyBlock {
            counts: [batch, r, c],
            from: (0, [r * c, c, 1]),
            to: (0, [r * c, 1, r]),
        })
    };
    // Operand `j` of a concat of `parts` along `axis` into `shape`, as
    // (its block within each outer row, the whole row's length).
    let concat_part = |shape: &[usize], axis: usize, parts: &[Vec<usize>], j: usize| {
        let inner: usize = shape[axis + 1..].iter().product();
        let before: usize = parts[..j].iter().map(|p| p[axis]).sum();
        let outer: usize = shape[..axis].iter().product();
        (
            outer,
            before * inner,
            parts[j][axis] * inner,
            shape[axis] * inner,
        )
    };
    let node = graph.node(id);
    Ok(match &node.op {
        Op::Reshape => Some(vec![(operands[0], whole(shape_of(id)?.iter().product()))]),
        Op::Transpose => transposed(&shape_of(operands[0])?).map(|b| vec![(operands[0], b)]),
        Op::Concat { axis } => {
            let shape = shape_of(id)?;
            let parts = operands
                .iter()
                .map(|&o| shape_of(o))
                .collect::<Result<Vec<_>, _>>()?;
            let blocks = (0..operands.len())
                .map(|j| {
                    let (outer, start, width, row) = concat_part(&shape, *axis, &parts, j);
                    let block = CopyBlock {
                        counts: [outer, 1, width],
                        from: (0, [width, 0, 1]),
                        to: (start, [row, 0, 1]),
                    };
                    (operands[j], block)
                })
                .collect();
            Some(blocks)
        }
        Op::Permute { axes } => {
            let shape = shape_of(operands[0])?;
            Some(
                permute_blocks(&shape, axes)
                    .into_iter()
                    .map(|b| (operands[0], b))
                    .collect(),
            )
            .filter(|blocks: &Vec<_>| !blocks.is_empty())
        }
        Op::Slice {
            axis,
            start,
            from_end,
        } => {
            let shape = shape_of(operands[0])?;
            let inner: usize = shape[axis + 1..].iter().product();
            let outer: usize = shape[..*axis].iter().product();
            let taken = shape_of(id)?[*axis];
            let first = crate::interp::kernels::slice_start(shape[*axis], taken, *start, *from_end)
                .map_err(InterpError::Runtime)?;
            let width = taken * inner;
            let block = CopyBlock {
                counts: [outer, 1, width],
                from: (first * inner, [shape[*axis] * inner, 0, 1]),
                to: (0, [width, 0, 1]),
            };
            Some(vec![(operands[0], block)])
        }
        _ => None,
    })
}
