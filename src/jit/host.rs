//! Host work: what the step entry hands back to Rust between compiled
//! kernels. Matrix products (planned once per frame, run on the GEMM of
//! `native::gemm` in the buffers' own element type), kernels the JIT does
//! not compile (on the interpreter's kernels), and the checks of labels.

use std::collections::BTreeMap;

use crate::interp::{self, Context, Evaluation, InterpError, Tensor};
use crate::ir::{DType, Graph, IdMap, NodeId, Op};
use crate::jit::bind::HostNode;
use crate::jit::bind::Matrix;
use crate::jit::bind::Product;
use crate::jit::bind::Work;
use crate::jit::bind::internal;
use crate::jit::bind::slot_in;
use crate::jit::clif::CodegenError;
use crate::jit::clif::Elem;
use crate::jit::native::frame::Buffers;
use crate::jit::native::frame::Host;
use crate::jit::native::frame::Stored;
use crate::jit::native::gemm::GemmElement;
use crate::jit::native::gemm::MatrixView;
use crate::jit::native::gemm::gemm_parallel;
use crate::jit::native::gemm::{PARALLEL_PRODUCT, gemm, product_threads};
use crate::jit::scan::LoopBody;
use crate::passes::fusion::{self};

/// The host work of one step: interpreted nodes and products read and
/// write the frame's buffers.
pub(super) struct StepHost<'a> {
    pub(super) graph: &'a Graph,
    pub(super) slots: &'a IdMap<usize>,
    pub(super) values: &'a [(NodeId, Vec<usize>)],
    pub(super) work: &'a [Work],
    pub(super) context: Context,
    /// The frame's sizes.
    pub(super) dims: &'a BTreeMap<String, usize>,
    /// The interpreter's working values for one node (made by the first
    /// node interpreted).
    pub(super) scratch: Option<Evaluation>,
    /// `f32` copies of a product's operands and its result, for an `f32`
    /// operand kept in an `f64` buffer.
    pub(super) narrow: (Vec<f32>, Vec<f32>, Vec<f32>),
    /// The compiled bodies of the step's scans (`jit::scan`), by node.
    pub(super) loops: &'a mut IdMap<LoopBody>,
}

impl<'a> StepHost<'a> {
    /// The host work of one step of `bound` (a frame of a program running
    /// `graph`), and the frame to run it on.
    pub(super) fn of(
        graph: &'a Graph,
        bound: &'a mut crate::jit::bind::Bound,
        context: Context,
    ) -> (StepHost<'a>, &'a mut crate::jit::native::frame::Frame) {
        let host = StepHost {
            graph,
            slots: &bound.slots,
            values: &bound.values,
            work: &bound.work,
            context,
            dims: &bound.dims,
            scratch: None,
            narrow: (Vec::new(), Vec::new(), Vec::new()),
            loops: &mut bound.loops,
        };
        (host, &mut bound.frame)
    }
}

impl Host for StepHost<'_> {
    fn call(&mut self, index: usize, buffers: &mut Buffers<'_>) -> Result<(), InterpError> {
        match self.work.get(index) {
            Some(Work::Interpret(nodes)) => {
                for node in nodes {
                    let id = match node {
                        HostNode::Product(product) => {
                            if self.matrix_product(product, buffers)? {
                                continue;
                            }
                            product.id
                        }
                        HostNode::Node(id) => *id,
                    };
                    self.interpret(id, buffers)?;
                }
                Ok(())
            }
            Some(Work::Labels { slot, cols, what }) => {
                interp::kernels::check_indices(&buffers.read(*slot, usize::MAX), *cols, what)
            }
            None => Err(InterpError::Internal(format!("no host work {index}"))),
        }
    }
}

impl StepHost<'_> {
    /// Evaluates a node on the interpreter from copies of its operands
    /// (an operand its rule does not read, which no kernel materialized,
    /// is zeros), writing its buffer.
    fn interpret(&mut self, id: NodeId, buffers: &mut Buffers<'_>) -> Result<(), InterpError> {
        let graph = self.graph;
        let dims = self.dims;
        let scratch = self.scratch.get_or_insert_with(|| Evaluation {
            dims: dims.clone(),
            ..Evaluation::default()
        });
        scratch.values.clear();
        match &graph.node(id).op {
            // The loop writes every result where it is kept: nothing to do.
            Op::ScanResult { .. } => return Ok(()),
            Op::Scan(scan) => return self.run_loop(id, scan, buffers),
            _ => {}
        }
        let needed = fusion::reads(graph, id);
        // (A `count` reads only its operand's shape: no copy of its values.)
        let shape_only = matches!(graph.node(id).op, Op::Count { .. });
        for operand in graph.operands(id) {
            let node = graph.node(operand);
            let value = match self.slots.get(&operand) {
                Some(&slot) if shape_only => Tensor {
                    dtype: node.dtype(),
                    shape: self.values[slot].1.clone(),
                    data: Vec::new(),
                },
                Some(&slot) => {
                    let shape = self.values[slot].1.clone();
                    let count = shape.iter().product::<usize>();
                    Tensor {
                        dtype: node.dtype(),
                        shape,
                        data: buffers.read(slot, count).into_owned(),
                    }
                }
                None if !needed.contains(&operand) => {
                    Tensor::zeros(node.dtype(), &interp::concrete(node.shape(), dims)?)
                }
                None => return Err(InterpError::Internal(format!("{operand} has no buffer"))),
            };
            scratch.values.insert(operand, value);
        }
        interp::evaluate_node(graph, id, scratch, self.context)?;
        let value = scratch
            .values
            .remove(&id)
            .ok_or_else(|| InterpError::Internal(format!("{id} was not evaluated")))?;
        buffers
            .write(slot_in(self.slots, id)?, &value.data)
            .map_err(|e| InterpError::Internal(format!("{id}: {e}")))
    }

    /// Runs a `scan` on its compiled body (`jit::scan`), from its
    /// operands' buffers into the buffers of its results: the scan node's
    /// (result 0) and those of the `scan_result` nodes reading the others.
    fn run_loop(
        &mut self,
        id: NodeId,
        scan: &crate::ir::Scan,
        buffers: &mut Buffers<'_>,
    ) -> Result<(), InterpError> {
        let graph = self.graph;
        let operands: Vec<usize> = graph
            .operands(id)
            .iter()
            .map(|&o| slot_in(self.slots, o))
            .collect::<Result<_, _>>()?;
        let mut results: Vec<Vec<usize>> = vec![Vec::new(); scan.results.len()];
        results[0].push(slot_in(self.slots, id)?);
        for user in graph.users(id) {
            if let Op::ScanResult { index } = graph.node(user).op
                && let (Some(targets), Some(&slot)) =
                    (results.get_mut(index), self.slots.get(&user))
            {
                targets.push(slot);
            }
        }
        let loop_body = match self.loops.entry(id) {
            std::collections::hash_map::Entry::Occupied(entry) => entry.into_mut(),
            std::collections::hash_map::Entry::Vacant(entry) => entry.insert(LoopBody::new(scan)?),
        };
        loop_body.run(
            scan,
            buffers,
            (&operands, &results),
            self.dims,
            self.context,
        )
    }

    /// Runs a planned matrix product (`plan_product`) on the tuned GEMM
    /// (`gemm`) straight from the buffers: an `f32` product on
    /// `sgemm` on the `f32` buffers (on `f32` copies if an operand is kept
    /// in `f64`), an `f64` one on `dgemm`. False, doing nothing, for
    /// buffers of other element types (the interpreter then runs it).
    fn matrix_product(
        &mut self,
        product: &Product,
        buffers: &mut Buffers<'_>,
    ) -> Result<bool, InterpError> {
        let [left, right, out] = product.slots;
        let (a, b) = (product.a, product.b);
        let elems = product.slots.map(|slot| buffers.elem(slot));
        if !product.batches.is_empty() {
            return match (product.dtype, elems) {
                (DType::F32, [Elem::F32, Elem::F32, Elem::F32]) => {
                    batch_product_in_place::<f32>(buffers, product)
                }
                (DType::F64, [Elem::F64, Elem::F64, Elem::F64]) => {
                    batch_product_in_place::<f64>(buffers, product)
                }
                // (Another storage: the interpreter runs it.)
                _ => return Ok(false),
            }
            .map(|()| true)
            .map_err(internal);
        }
        match (product.dtype, elems) {
            // Straight from the buffers.
            (DType::F32, [Elem::F32, Elem::F32, Elem::F32]) => {
                product_in_place::<f32>(buffers, product.slots, a, b)
            }
            (DType::F64, [Elem::F64, Elem::F64, Elem::F64]) => {
                product_in_place::<f64>(buffers, product.slots, a, b)
            }
            // An `f32` operand kept in `f64` (a sum): through `f32` copies.
            (DType::F32, _) => {
                let (a32, b32, c32) = &mut self.narrow;
                let narrow = |to: &mut Vec<f32>, slot: usize, count: usize| {
                    to.clear();
                    to.extend(buffers.read(slot, count).iter().map(|&v| v as f32));
                };
                let count = a.read_rows() * b.read_cols();
                narrow(a32, left, a.rows * a.cols);
                narrow(b32, right, b.rows * b.cols);
                c32.clear();
                c32.resize(count, 0.0);
                let (Some(a), Some(b)) = (matrix_view(a32, a), matrix_view(b32, b)) else {
                    return Ok(false);
                };
                gemm_parallel(a, b, c32).map_err(internal)?;
                let wide: Vec<f64> = c32.iter().map(|&v| f64::from(v)).collect();
                buffers.write(out, &wide)
            }
            _ => return Ok(false),
        }
        .map_err(internal)?;
        Ok(true)
    }
}

/// `out = a @ b` on the GEMM, straight from buffers holding `T`s.
pub(super) fn product_in_place<T: GemmElement + Stored + Send + Sync>(
    buffers: &mut Buffers<'_>,
    [left, right, out]: [usize; 3],
    a: Matrix,
    b: Matrix,
) -> Result<(), CodegenError> {
    buffers
        .compute::<T, _, 2>([left, right], out, |reads, c| {
            match (matrix_view(reads[0], a), matrix_view(reads[1], b)) {
                (Some(a), Some(b)) => {
                    let count = a.rows * b.cols;
                    match c.get_mut(..count) {
                        Some(c) => gemm_parallel(a, b, c),
                        None => Err(CodegenError("the product does not fit".into())),
                    }
                }
                _ => Err(CodegenError("an operand does not fit".into())),
            }
        })
        .and_then(|r| r)
}

/// A batched product (`product.batches`) straight from buffers holding
/// `T`s: one GEMM per matrix of the result, the batches split between
/// two threads when the whole product is large enough to gain from them.
fn batch_product_in_place<T: GemmElement + Stored + Send + Sync>(
    buffers: &mut Buffers<'_>,
    product: &Product,
) -> Result<(), CodegenError> {
    let [left, right, out] = product.slots;
    let (a, b) = (product.a, product.b);
    let size = a.read_rows() * b.read_cols();
    let run = |reads: [&[T]; 2], c: &mut [T], batches: &[(usize, usize)]| {
        for (&(a_at, b_at), c) in batches.iter().zip(c.chunks_exact_mut(size.max(1))) {
            let (Some(a_data), Some(b_data)) = (
                reads[0].get(a_at..a_at + a.rows * a.cols),
                reads[1].get(b_at..b_at + b.rows * b.cols),
            ) else {
                return Err(CodegenError("a batch of the product does not fit".into()));
            };
            let (Some(a_view), Some(b_view)) = (matrix_view(a_data, a), matrix_view(b_data, b))
            else {
                return Err(CodegenError("an operand does not fit".into()));
            };
            gemm(a_view, b_view, c)?;
        }
        Ok(())
    };
    buffers
        .compute::<T, _, 2>([left, right], out, |reads, c| {
            let batches = &product.batches;
            let Some(c) = c.get_mut(..batches.len() * size) else {
                return Err(CodegenError("the product does not fit".into()));
            };
            let work = batches.len() * a.rows * a.cols * b.read_cols();
            if product_threads() < 2 || work < PARALLEL_PRODUCT / 16 || batches.len() < 2 {
                return run(reads, c, batches);
            }
            let half = batches.len() / 2;
            let (c_first, c_second) = c.split_at_mut(half * size);
            let (first, second) = batches.split_at(half);
            std::thread::scope(|scope| {
                let other = scope.spawn(|| run(reads, c_second, second));
                let mine = run(reads, c_first, first);
                other
                    .join()
                    .unwrap_or_else(|_| Err(CodegenError("a product thread panicked".into())))
                    .and(mine)
            })
        })
        .and_then(|r| r)
}

/// A buffer as the matrix `m`, read transposed or not; `None` if `data` is
/// too short.
pub(super) fn matrix_view<T>(data: &[T], m: Matrix) -> Option<MatrixView<'_, T>> {
    let view = MatrixView::row_major(data.get(..m.rows * m.cols)?, m.rows, m.cols);
    Some(if m.transposed {
        view.transposed()
    } else {
        view
    })
}
