//! Kernels in passes over rows: the general fused reduction. A kernel
//! whose elementwise work reads its own reductions along the last axis
//! (`fusion::Kernel::passes`: a softmax's or a norm's gradient, `x -
//! mean(x, keepdims)`) runs as one loop over the rows of its loop shape
//! `[.., C]`, and over each row as passes over the columns: pass 0
//! computes what needs no reduction of the row and accumulates the
//! reductions that need nothing else; between passes, the values of one
//! element per row (`[.., 1]`: the finished reductions and what is
//! computed from them) are computed once per row; pass `p` computes what
//! reads the reductions of pass `p - 1`, recomputing the elementwise
//! values of earlier passes it needs rather than storing them. A kernel
//! `fn(ptrs, rows, cols, context)`.
//!
//! Every value is computed as the interpreter computes it: in `f64`, each
//! `f32` op rounded (`elementwise::emit`); a sum or mean adds the row's
//! elements in column order from `0.0` (a mean then divides by the row
//! length), a maximum takes them in order from `-inf` with NaN winning,
//! and an `f32` result is rounded once. So these kernels agree with the
//! interpreter bit for bit (but for the polynomial functions of
//! `approx`, as every kernel). Their column loops take pairs of columns
//! (`f64x2`); reductions add a pair's lanes one after the other.

use std::collections::{BTreeSet, HashMap};

use cranelift_codegen::ir::{InstBuilder, MemFlagsData, Value, types};
use cranelift_frontend::FunctionBuilder;
use cranelift_module::FuncId;

use crate::ir::{Graph, NodeId, Op, ReduceFn, Shape};
use crate::jit::clif::{Calls, CodegenError, Elem, counted_loop, element_at, load, store};
use crate::jit::elementwise::{Place, divides_by_count, emit, round, summand};
use crate::jit::rows::max_step;
use crate::passes::fusion::{RowForm, is_column_sum, is_row_reduction, is_single_sum, row_form};

/// A compiled kernel in passes over rows.
pub(crate) struct PassKernel {
    pub(super) func: FuncId,
    /// Values read, in argument order (before the outputs).
    pub inputs: Vec<NodeId>,
    /// Values written, in argument order (after the inputs).
    pub outputs: Vec<NodeId>,
    /// How each buffer is reached (inputs, then outputs): `Frame::push_passes`
    /// checks its length against the rows and columns.
    pub forms: Vec<RowForm>,
    /// How each buffer stores its elements (inputs, then outputs).
    pub elems: Vec<Elem>,
}

/// How a kernel in passes over the rows of `loop_shape` stores output
/// `id`: by its type, but a column sum, which accumulates in place, in
/// `f64`.
pub(super) fn output_elem(graph: &Graph, id: NodeId, loop_shape: &Shape) -> Elem {
    if is_column_sum(graph, id, loop_shape) {
        Elem::F64
    } else {
        Elem::of(graph.node(id).dtype())
    }
}

/// The pass of each node: the first in which all it reads is available.
/// A row reduction accumulates in its operand's pass and is available
/// from the next; everything else is available in its own pass.
fn passes_of(graph: &Graph, nodes: &[NodeId]) -> HashMap<NodeId, usize> {
    let mut pass = HashMap::new();
    let mut available: HashMap<NodeId, usize> = HashMap::new();
    for &id in nodes {
        let ready = crate::passes::fusion::reads(graph, id)
            .iter()
            .map(|o| available.get(o).copied().unwrap_or(0))
            .max()
            .unwrap_or(0);
        pass.insert(id, ready);
        let next = if is_row_reduction(graph, id) {
            ready + 1
        } else {
            ready
        };
        available.insert(id, next);
    }
    pass
}

/// How buffers and nodes relate to the loop: each node's form, its pass,
/// and the buffers.
struct Layout<'a> {
    graph: &'a Graph,
    nodes: &'a [NodeId],
    inputs: &'a [NodeId],
    outputs: &'a [NodeId],
    loop_shape: &'a Shape,
    pass: HashMap<NodeId, usize>,
    elems: Vec<Elem>,
}

impl Layout<'_> {
    fn form(&self, id: NodeId) -> Result<RowForm, CodegenError> {
        row_form(self.graph.node(id).shape(), self.loop_shape).ok_or_else(|| {
            CodegenError(format!(
                "value {id} is not read per row, column or element of {}",
                self.loop_shape
            ))
        })
    }

    /// Whether `id` sums the loop's values over the rows, per column
    /// (`fusion::is_column_sum`): accumulated in place, in `f64` slots.
    fn column_sum(&self, id: NodeId) -> bool {
        is_column_sum(self.graph, id, self.loop_shape)
    }

    /// Whether `id` sums the loop's values, or one value per row, to one
    /// element (`fusion::is_single_sum`): a running total through every
    /// row.
    fn single_sum(&self, id: NodeId) -> bool {
        is_single_sum(self.graph, id, self.loop_shape)
    }

    /// Whether a sum to one element adds one value per row (its operand's
    /// form), not one per element.
    fn per_row_sum(&self, id: NodeId) -> bool {
        self.form(self.graph.operands(id)[0]).ok() == Some(RowForm::PerRow)
    }

    /// Whether `id` is a value of the loop's shape this kernel stores in
    /// a pass before `p`: a later pass loads it back instead of computing
    /// it again.
    fn stored_before(&self, id: NodeId, p: usize) -> bool {
        self.outputs.contains(&id)
            && self.pass.get(&id).is_some_and(|&q| q < p)
            && !is_row_reduction(self.graph, id)
            && self.form(id).ok() == Some(RowForm::Full)
    }

    /// The nodes of the loop's shape that pass `p`'s column loop computes:
    /// those of pass `p`, and those of earlier passes they (or pass `p`'s
    /// reductions) read, in kernel order; but a value stored in an earlier
    /// pass is loaded back (`stored_before`), not computed.
    fn column_nodes(&self, p: usize) -> Result<Vec<NodeId>, CodegenError> {
        let mut wanted: BTreeSet<NodeId> = BTreeSet::new();
        for &id in self.nodes.iter().rev() {
            let here = self.pass[&id] == p;
            let full = !is_row_reduction(self.graph, id) && self.form(id)? == RowForm::Full;
            let computed = full && !self.stored_before(id, p);
            let sums =
                is_row_reduction(self.graph, id) || self.column_sum(id) || self.single_sum(id);
            if (here && (full || sums)) || (computed && wanted.contains(&id)) {
                wanted.insert(id);
                for o in crate::passes::fusion::reads(self.graph, id) {
                    if self.pass.contains_key(&o) {
                        wanted.insert(o);
                    }
                }
            }
        }
        Ok(self
            .nodes
            .iter()
            .copied()
            .filter(|id| {
                wanted.contains(id)
                    && !is_row_reduction(self.graph, *id)
                    && self.form(*id).ok() == Some(RowForm::Full)
            })
            .collect())
    }
}

/// The builder's state for one row.
struct Row {
    /// The row's index and its first element's.
    r: Value,
    start: Value,
    /// Values of one element per row (and single ones), by node.
    values: HashMap<NodeId, Value>,
    /// The running totals of the sums to one element
    /// (`Loaded::single_sums`), through the rows so far.
    sums: Vec<Value>,
}

/// What the kernel's code has loaded before its loops.
struct Loaded {
    /// Each buffer's address (inputs, then outputs).
    bases: Vec<Value>,
    /// How each buffer is read (inputs, then outputs).
    forms: Vec<RowForm>,
    /// The run's seed and step (dropout masks) and `0.0`.
    seed: Value,
    step: Value,
    zero: Value,
    /// The row length (at least 1), as `f64` (a mean divides by it).
    count: Value,
    /// The column sums among the outputs: buffer and node.
    column_sums: Vec<(usize, NodeId)>,
    /// The sums to one element among the outputs: buffer and node.
    single_sums: Vec<(usize, NodeId)>,
}

impl Loaded {
    /// The address of element `index` of buffer `j`.
    fn at(
        &self,
        b: &mut FunctionBuilder<'_>,
        layout: &Layout<'_>,
        j: usize,
        index: Value,
    ) -> Value {
        element_at(b, layout.elems[j], self.bases[j], index)
    }
}

/// Emits the body of a kernel in passes: `nodes` (every one fitting
/// passes, in order) reading `inputs` and writing `outputs`, stored as
/// `elems` says (inputs, then outputs), over the rows of `loop_shape`.
/// Returns how each buffer is read.
pub(super) fn emit_passes(
    b: &mut FunctionBuilder<'_>,
    calls: &mut Calls<'_>,
    graph: &Graph,
    (nodes, inputs, outputs): (&[NodeId], &[NodeId], &[NodeId]),
    loop_shape: &Shape,
    elems: Vec<Elem>,
    params: &[Value],
) -> Result<Vec<RowForm>, CodegenError> {
    let layout = Layout {
        graph,
        nodes,
        inputs,
        outputs,
        loop_shape,
        pass: passes_of(graph, nodes),
        elems,
    };
    let forms = inputs
        .iter()
        .chain(outputs)
        .map(|&id| layout.form(id))
        .collect::<Result<Vec<_>, _>>()?;
    let passes = layout.pass.values().copied().max().map_or(1, |p| p + 1);
    let (ptrs, rows, cols, context) = (params[0], params[1], params[2], params[3]);
    let flags = MemFlagsData::trusted();
    let bases: Vec<Value> = (0..forms.len())
        .map(|j| b.ins().load(types::I64, flags, ptrs, (8 * j) as i32))
        .collect();
    let seed = b.ins().load(types::I64, flags, context, 0);
    let step = b.ins().load(types::I64, flags, context, 8);
    let zero = b.ins().f64const(0.0);
    // (A mean of an empty row divides by 1, as the interpreter's.)
    let one = b.ins().iconst(types::I64, 1);
    let length = b.ins().umax(cols, one);
    let count = b.ins().fcvt_from_uint(types::F64, length);
    // The outputs that are such sums, with their buffers.
    let outputs_where = |holds: &dyn Fn(NodeId) -> bool| -> Vec<(usize, NodeId)> {
        let first = inputs.len();
        (0..outputs.len())
            .filter(|&o| holds(outputs[o]))
            .map(|o| (first + o, outputs[o]))
            .collect()
    };
    let column_sums = outputs_where(&|o| layout.column_sum(o));
    let single_sums = outputs_where(&|o| layout.single_sum(o));
    let loaded = Loaded {
        bases,
        forms,
        seed,
        step,
        zero,
        count,
        column_sums,
        single_sums,
    };
    // Single inputs once.
    let mut singles = HashMap::new();
    for (j, &input) in inputs.iter().enumerate() {
        if loaded.forms[j] == RowForm::Single {
            singles.insert(input, load(b, layout.elems[j], false, loaded.bases[j]));
        }
    }
    // Column sums accumulate in place, over every row: zeroed first.
    for &(j, _) in &loaded.column_sums {
        counted_loop(b, cols, &[], |b, c, _| {
            let address = element_at(b, Elem::F64, loaded.bases[j], c);
            b.ins().store(flags, zero, address, 0);
            Ok(vec![])
        })?;
    }
    // Sums to one element run through every row, in registers.
    let initial: Vec<Value> = loaded.single_sums.iter().map(|_| zero).collect();
    let totals = counted_loop(b, rows, &initial, |b, r, carried| {
        let start = b.ins().imul(r, cols);
        let mut row = Row {
            r,
            start,
            values: singles.clone(),
            sums: carried.to_vec(),
        };
        for (j, &input) in inputs.iter().enumerate() {
            if loaded.forms[j] == RowForm::PerRow {
                let address = loaded.at(b, &layout, j, r);
                row.values
                    .insert(input, load(b, layout.elems[j], false, address));
            }
        }
        for p in 0..passes {
            per_row_nodes(b, calls, &layout, &loaded, &mut row, p)?;
            column_pass(b, calls, &layout, &loaded, &mut row, (p, cols))?;
        }
        Ok(row.sums)
    })?;
    finish_single_sums(b, &layout, &loaded, (rows, cols), &totals);
    // An `f32` column sum is rounded once, at the end, as the
    // interpreter's (stored as `f64`).
    for &(j, id) in &loaded.column_sums {
        if graph.node(id).dtype() == crate::ir::DType::F32 {
            counted_loop(b, cols, &[], |b, c, _| {
                let address = element_at(b, Elem::F64, loaded.bases[j], c);
                let total = b.ins().load(types::F64, flags, address, 0);
                let total = round(b, graph, id, total);
                b.ins().store(flags, total, address, 0);
                Ok(vec![])
            })?;
        }
    }
    Ok(loaded.forms)
}

/// Pass `p`'s loop over the row's `cols` columns, if it has work: the
/// values of the loop's shape it needs (stored where they are outputs of
/// this pass), the row reductions of this pass (finished after the loop,
/// into the row's values, and stored where they are outputs), and the
/// column sums of this pass.
fn column_pass(
    b: &mut FunctionBuilder<'_>,
    calls: &mut Calls<'_>,
    layout: &Layout<'_>,
    loaded: &Loaded,
    row: &mut Row,
    (p, cols): (usize, Value),
) -> Result<(), CodegenError> {
    let (graph, outputs) = (layout.graph, layout.outputs);
    let reductions: Vec<NodeId> = layout
        .nodes
        .iter()
        .copied()
        .filter(|&id| is_row_reduction(graph, id) && layout.pass[&id] == p)
        .collect();
    let column_nodes = layout.column_nodes(p)?;
    let stores_here = outputs.iter().any(|&o| {
        layout.pass.get(&o) == Some(&p)
            && !is_row_reduction(graph, o)
            && matches!(layout.form(o), Ok(RowForm::Full | RowForm::Column))
    });
    // The sums to one element of elements this pass adds to (their places
    // in `row.sums`).
    let single: Vec<usize> = (0..loaded.single_sums.len())
        .filter(|&s| {
            let id = loaded.single_sums[s].1;
            layout.pass[&id] == p && !layout.per_row_sum(id)
        })
        .collect();
    if reductions.is_empty() && single.is_empty() && !stores_here {
        return Ok(());
    }
    let mut initial: Vec<Value> = reductions
        .iter()
        .map(|&id| {
            if is_max(graph, id) {
                b.ins().f64const(f64::NEG_INFINITY)
            } else {
                loaded.zero
            }
        })
        .collect();
    initial.extend(single.iter().map(|&s| row.sums[s]));
    // The row's values as pairs too, for the loop over pairs of columns.
    let pairs: HashMap<NodeId, Value> = row
        .values
        .iter()
        .map(|(&id, &v)| (id, b.ins().splat(types::F64X2, v)))
        .collect();
    let zero_pair = b.ins().splat(types::F64X2, loaded.zero);
    let step = Step {
        layout,
        loaded,
        p,
        reductions: &reductions,
        single: &single,
        column_nodes: &column_nodes,
        start: row.start,
    };
    // Two columns at a time, then the odd last one alone.
    let half = b.ins().ushr_imm_u(cols, 1);
    let totals = counted_loop(b, half, &initial, |b, i, carried| {
        let c = b.ins().ishl_imm_u(i, 1);
        step.at(b, calls, (c, &pairs, zero_pair), carried)
    })?;
    let odd = b.ins().band_imm_u(cols, 1);
    let totals = counted_loop(b, odd, &totals, |b, _, carried| {
        let last = b.ins().iadd_imm_s(cols, -1);
        step.at(b, calls, (last, &row.values, loaded.zero), carried)
    })?;
    for (&s, &total) in single.iter().zip(&totals[reductions.len()..]) {
        row.sums[s] = total;
    }
    for (&id, &total) in reductions.iter().zip(&totals) {
        let mean = matches!(
            graph.node(id).op,
            Op::Reduce {
                func: ReduceFn::Mean,
                ..
            }
        );
        let value = if mean {
            b.ins().fdiv(total, loaded.count)
        } else {
            total
        };
        let value = round(b, graph, id, value);
        row.values.insert(id, value);
        store_per_row(b, layout, loaded, row, id, value);
    }
    Ok(())
}

/// Whether a row reduction is a maximum (else a sum or mean).
fn is_max(graph: &Graph, id: NodeId) -> bool {
    matches!(
        graph.node(id).op,
        Op::Reduce {
            func: ReduceFn::Max,
            ..
        }
    )
}

/// One step of a pass's loop over a row's columns: what it computes.
struct Step<'s> {
    layout: &'s Layout<'s>,
    loaded: &'s Loaded,
    p: usize,
    /// The row reductions of the pass (their running values come first in
    /// the loop's carried values).
    reductions: &'s [NodeId],
    /// The sums to one element of elements the pass adds to (their places
    /// in `Row::sums`; their running totals come next).
    single: &'s [usize],
    /// The values of the loop's shape the pass computes or loads back.
    column_nodes: &'s [NodeId],
    /// Where the row starts.
    start: Value,
}

impl Step<'_> {
    /// The step at column `c`, over one column or a pair (the width of
    /// `zero`: `f64` or `f64x2`), given the row's values in that width;
    /// returns the next running values. Reductions and sums to one element
    /// take a pair's lanes one after the other, in column order, so every
    /// sum adds in the interpreter's order.
    fn at(
        &self,
        b: &mut FunctionBuilder<'_>,
        calls: &mut Calls<'_>,
        (c, row_values, zero): (Value, &HashMap<NodeId, Value>, Value),
        carried: &[Value],
    ) -> Result<Vec<Value>, CodegenError> {
        let (layout, loaded, p) = (self.layout, self.loaded, self.p);
        let (graph, inputs, outputs) = (layout.graph, layout.inputs, layout.outputs);
        let pair = b.func.dfg.value_type(zero) == types::F64X2;
        let index = b.ins().iadd(self.start, c);
        let mut values = row_values.clone();
        for (j, &input) in inputs.iter().enumerate() {
            let element = match loaded.forms[j] {
                RowForm::Full => index,
                RowForm::Column => c,
                _ => continue,
            };
            let address = loaded.at(b, layout, j, element);
            values.insert(input, load(b, layout.elems[j], pair, address));
        }
        let place = Place {
            index,
            seed: loaded.seed,
            step: loaded.step,
            zero,
        };
        for &id in self.column_nodes {
            let output = outputs.iter().position(|&out| out == id);
            if layout.stored_before(id, p) {
                let j = inputs.len() + output.unwrap_or(0);
                let address = loaded.at(b, layout, j, index);
                values.insert(id, load(b, layout.elems[j], pair, address));
                continue;
            }
            let value = emit(b, graph, id, &values, calls, place)?;
            values.insert(id, value);
            if let (true, Some(o)) = (layout.pass[&id] == p, output) {
                let j = inputs.len() + o;
                let address = loaded.at(b, layout, j, index);
                store(b, layout.elems[j], value, address);
            }
        }
        let operand = |id: NodeId| {
            values.get(&graph.operands(id)[0]).copied().ok_or_else(|| {
                CodegenError(format!("the operand of {id} is not computed in its pass"))
            })
        };
        for &(j, id) in &loaded.column_sums {
            if layout.pass[&id] == p {
                let value = operand(id)?;
                let address = element_at(b, Elem::F64, loaded.bases[j], c);
                let total = load(b, Elem::F64, pair, address);
                let total = b.ins().fadd(total, value);
                store(b, Elem::F64, total, address);
            }
        }
        // A pair's lanes, one after the other.
        let lanes = |b: &mut FunctionBuilder<'_>, value: Value| -> Vec<Value> {
            if pair {
                (0..2)
                    .map(|lane| b.ins().extractlane(value, lane))
                    .collect()
            } else {
                vec![value]
            }
        };
        let mut next = Vec::new();
        for (&id, &total) in self.reductions.iter().zip(carried) {
            let value = operand(id)?;
            let mut total = total;
            for lane in lanes(b, value) {
                total = if is_max(graph, id) {
                    max_step(b, total, lane)
                } else {
                    b.ins().fadd(total, lane)
                };
            }
            next.push(total);
        }
        for (&s, &total) in self.single.iter().zip(&carried[self.reductions.len()..]) {
            let id = loaded.single_sums[s].1;
            let value = summand(b, graph, id, &values, zero)?;
            let mut total = total;
            for lane in lanes(b, value) {
                total = b.ins().fadd(total, lane);
            }
            next.push(total);
        }
        Ok(next)
    }
}

/// The nodes of one element per row (not reductions) of pass `p`,
/// computed once per row before the pass's column loop (and stored if
/// they are outputs).
fn per_row_nodes(
    b: &mut FunctionBuilder<'_>,
    calls: &mut Calls<'_>,
    layout: &Layout<'_>,
    loaded: &Loaded,
    row: &mut Row,
    p: usize,
) -> Result<(), CodegenError> {
    for &id in layout.nodes {
        if layout.pass[&id] != p
            || is_row_reduction(layout.graph, id)
            || layout.form(id)? != RowForm::PerRow
        {
            continue;
        }
        let place = Place {
            index: row.r,
            seed: loaded.seed,
            step: loaded.step,
            zero: loaded.zero,
        };
        let value = emit(b, layout.graph, id, &row.values, calls, place)?;
        row.values.insert(id, value);
        store_per_row(b, layout, loaded, row, id, value);
    }
    // The sums to one element of values per row, once their operands are
    // known.
    for (s, &(_, id)) in loaded.single_sums.iter().enumerate() {
        if layout.pass[&id] == p && layout.per_row_sum(id) {
            let value = summand(b, layout.graph, id, &row.values, loaded.zero)?;
            row.sums[s] = b.ins().fadd(row.sums[s], value);
        }
    }
    Ok(())
}

/// Stores `value`, node `id`'s for this row, if it is an output.
fn store_per_row(
    b: &mut FunctionBuilder<'_>,
    layout: &Layout<'_>,
    loaded: &Loaded,
    row: &Row,
    id: NodeId,
    value: Value,
) {
    if let Some(o) = layout.outputs.iter().position(|&out| out == id) {
        let j = layout.inputs.len() + o;
        let address = loaded.at(b, layout, j, row.r);
        store(b, layout.elems[j], value, address);
    }
}

/// Finishes the sums to one element after the last row (`totals`, in
/// `Loaded::single_sums` order) as the interpreter does: a mean, a zero
/// fraction, `mse` and `bce_with_logits` divide by the count of what they
/// add (`rows * cols` elements, or `rows` values per row; at least 1); an
/// `f32` result is rounded once.
fn finish_single_sums(
    b: &mut FunctionBuilder<'_>,
    layout: &Layout<'_>,
    loaded: &Loaded,
    (rows, cols): (Value, Value),
    totals: &[Value],
) {
    let graph = layout.graph;
    for (&(j, id), &total) in loaded.single_sums.iter().zip(totals) {
        let value = if divides_by_count(&graph.node(id).op) {
            let n = if layout.per_row_sum(id) {
                rows
            } else {
                b.ins().imul(rows, cols)
            };
            let one = b.ins().iconst(types::I64, 1);
            let n = b.ins().umax(n, one);
            let n = b.ins().fcvt_from_uint(types::F64, n);
            b.ins().fdiv(total, n)
        } else {
            total
        };
        let value = round(b, graph, id, value);
        store(b, layout.elems[j], value, loaded.bases[j]);
    }
}
