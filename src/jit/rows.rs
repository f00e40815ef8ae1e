//! Row kernels: the ops that reduce or normalize along the last axis
//! (`max` and `logsumexp` over it, `softmax`, `log_softmax`,
//! `cross_entropy`, the cross-entropy gradient kernel the JIT recognises
//! (`patterns`), `layer_norm`, and a cross-entropy together with its
//! gradient), compiled as a loop over rows with a few passes over each
//! row's contiguous elements; and column kernels, the same loops over the
//! columns of `[N, C]` (batch normalization and its running statistics).
//! Gradients are graphs of primitives (`autodiff::rules`): the JIT
//! compiles them like any forward op.
//!
//! Each follows its interpreter kernel operation for operation (the same
//! NaN-aware maximum, the same `f64` sums from the same starting value in
//! the same order, `log` by the interpreter's own function, one rounding
//! to `f32` at the end), but for `exp`: the polynomial of `approx` (within
//! 1 ulp), inline, two columns at a time as `f64x2` (the odd last column
//! alone), so a sum of exponentials adds two lanes and then the last one.
//! Those results are within a few ulps of the interpreter's (in `f32`,
//! nearly always the same value); the others are bit-identical. They stay
//! finite for huge logits because every exponent is taken of `x - max`.
//! (A call to the interpreter's `exp` per element had been kept for
//! bit-identity, and because the polynomial in a scalar loop is a latency
//! chain; in pairs it cut the tiny step's instructions by 10%.) `cache`
//! turns the CLIF built here into a callable `RowKernel` (the unsafe part
//! lives in `native`).

use cranelift_codegen::ir::condcodes::FloatCC;
use cranelift_codegen::ir::{BlockArg, InstBuilder, MemFlagsData, Value, types};
use cranelift_frontend::FunctionBuilder;
use cranelift_module::FuncId;

use super::approx;
use super::clif::{self, Calls, CodegenError, Elem, call, counted_loop};
use crate::ir::{DType, Graph, KernelOp, NodeId, Op, ReduceFn};

/// What a row kernel computes. Rows are the leading axes flattened, `cols`
/// the last axis.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum RowOp {
    /// `max` over the last axis (NaN wins). Reads `x`; writes one per row.
    Max,
    /// Mean cross-entropy of logits `[N, C]` and labels `[N]`. Reads
    /// logits, labels; writes one value.
    CrossEntropy,
    /// Its VJP for the logits: `(softmax(x) - onehot) * g / N`. Reads `g`
    /// (one value), logits, labels; writes `rows x cols`.
    CrossEntropyVjp,
    /// Both at once, for a VJP whose `g` is the constant `g` (the JIT
    /// fuses the two kernels when it finds them: `RowOp::of` never gives
    /// this): each row's maximum and exponentials are taken once. Reads
    /// logits, labels; writes the mean loss (one value), then the
    /// gradient (`rows x cols`), each as the two ops alone would.
    CrossEntropyWithVjp {
        /// The VJP's `g`.
        g: f64,
    },
}

impl RowOp {
    /// The row op a node is, if it is one along its operand's last axis.
    pub fn of(graph: &Graph, id: NodeId) -> Option<RowOp> {
        let node = graph.node(id);
        let operands = graph.operands(id);
        let rank = |operand: usize| Some(graph.node(*operands.get(operand)?).shape().rank());
        let last = |axis: usize, operand: usize| rank(operand) == Some(axis + 1);
        if node.dtype() == DType::I32 {
            return None;
        }
        match &node.op {
            Op::Reduce {
                func: ReduceFn::Max,
                axes,
                ..
            } if axes.len() == 1 && last(axes[0], 0) => Some(RowOp::Max),
            Op::Kernel(KernelOp::CrossEntropy) if rank(0) == Some(2) => Some(RowOp::CrossEntropy),
            Op::Kernel(KernelOp::CrossEntropyGradient) if rank(1) == Some(2) => {
                Some(RowOp::CrossEntropyVjp)
            }
            _ => None,
        }
    }

    /// The graph values the kernel reads, in argument order, from the
    /// node's operands (a VJP's are `[g, forward operands..., y]`).
    pub fn reads(self, operands: &[NodeId]) -> Vec<NodeId> {
        match self {
            RowOp::Max => vec![operands[0]],
            RowOp::CrossEntropy | RowOp::CrossEntropyWithVjp { .. } => {
                vec![operands[0], operands[1]]
            }
            RowOp::CrossEntropyVjp => vec![operands[0], operands[1], operands[2]],
        }
    }

    /// Which of the values read has the `rows x cols` shape.
    pub(crate) fn shaped_by(self) -> usize {
        match self {
            RowOp::CrossEntropyVjp => 1,
            _ => 0,
        }
    }

    /// Which of the values read holds labels, checked before the call.
    pub fn labels(self) -> Option<usize> {
        match self {
            RowOp::CrossEntropy | RowOp::CrossEntropyWithVjp { .. } => Some(1),
            RowOp::CrossEntropyVjp => Some(2),
            _ => None,
        }
    }

    /// How many elements each value read must hold, then each output's
    /// count (one output but for `CrossEntropyWithVjp`), for `rows x cols`.
    pub(crate) fn lengths(self, rows: usize, cols: usize) -> (Vec<usize>, Vec<usize>) {
        let all = rows * cols;
        let (reads, output) = match self {
            RowOp::CrossEntropyWithVjp { .. } => return (vec![all, rows], vec![1, all]),
            RowOp::Max => (vec![all], rows),
            RowOp::CrossEntropy => (vec![all, rows], 1),
            RowOp::CrossEntropyVjp => (vec![1, all, rows], all),
        };
        (reads, vec![output])
    }

    /// Whether the kernel writes a row's softmax (`write_softmax`), which
    /// reads each exponential twice.
    pub(crate) fn takes_softmax(self) -> bool {
        matches!(
            self,
            RowOp::CrossEntropyVjp | RowOp::CrossEntropyWithVjp { .. }
        )
    }

    /// Whether the kernel takes two rows at a time (`RowShape::second_exps`).
    pub(crate) fn takes_row_pairs(self) -> bool {
        matches!(self, RowOp::CrossEntropyWithVjp { .. })
    }
}

/// A row (or a whole buffer) in memory: where it starts and how it
/// stores its elements.
#[derive(Clone, Copy)]
struct Row {
    base: Value,
    elem: Elem,
}

impl Row {
    /// The address of element `j`.
    fn at(self, b: &mut FunctionBuilder<'_>, j: Value) -> Value {
        clif::element_at(b, self.elem, self.base, j)
    }
}

/// Element `j` of a row, as an `f64`.
fn load(b: &mut FunctionBuilder<'_>, row: Row, j: Value) -> Value {
    let at = row.at(b, j);
    clif::load(b, row.elem, false, at)
}

/// Element `j` of a row, or (`pair`) elements `j` and `j + 1` as an
/// `f64x2`.
fn load_lanes(b: &mut FunctionBuilder<'_>, row: Row, j: Value, pair: bool) -> Value {
    let at = row.at(b, j);
    clif::load(b, row.elem, pair, at)
}

/// Stores `value` as element `j` of a row.
fn store(b: &mut FunctionBuilder<'_>, value: Value, row: Row, j: Value) {
    let at = row.at(b, j);
    clif::store(b, row.elem, value, at);
}

/// Rounds to `f32` and back when the result is `f32`.
fn rounded(b: &mut FunctionBuilder<'_>, f32: bool, value: Value) -> Value {
    if !f32 {
        value
    } else if b.func.dfg.value_type(value).is_vector() {
        let narrow = b.ins().fvdemote(value);
        b.ins().fvpromote_low(narrow)
    } else {
        let narrow = b.ins().fdemote(types::F32, value);
        b.ins().fpromote(types::F64, narrow)
    }
}

/// The row's maximum as `kernels::group_max` takes it: from -inf, a value
/// replaces the maximum when it is NaN or larger, unless the maximum is
/// already NaN.
fn row_max(b: &mut FunctionBuilder<'_>, row: Row, cols: Value) -> Result<Value, CodegenError> {
    let start = b.ins().f64const(f64::NEG_INFINITY);
    let result = counted_loop(b, cols, &[start], |b, j, carried| {
        let v = load(b, row, j);
        Ok(vec![max_step(b, carried[0], v)])
    })?;
    Ok(result[0])
}

/// One step of `row_max` (lane by lane for pairs): `v` replaces `m` when
/// it is NaN or larger, unless `m` is already NaN.
pub(super) fn max_step(b: &mut FunctionBuilder<'_>, m: Value, v: Value) -> Value {
    let v_nan = b.ins().fcmp(FloatCC::Unordered, v, v);
    let larger = b.ins().fcmp(FloatCC::LessThan, m, v);
    let replace = b.ins().bor(v_nan, larger);
    let m_nan = b.ins().fcmp(FloatCC::Unordered, m, m);
    let candidate = clif::pick(b, m_nan, m, v);
    clif::pick(b, replace, candidate, m)
}

/// `row_max` of contiguous rows two columns at a time: the even and the
/// odd columns' maxima in the lanes of an `f64x2` (an odd last column in
/// the first lane, beside `-inf`), then the second lane's taken into the
/// first's by the same step. The same maximum as `row_max` (a larger
/// value, or a NaN, wins wherever it is), but for which of two NaNs or of
/// `0` and `-0` comes out when a row holds both. Several rows are taken
/// in one loop, each by its own chain (so that the chains overlap).
fn rows_max_paired(
    b: &mut FunctionBuilder<'_>,
    rows: &[Row],
    cols: (Value, bool),
) -> Result<Vec<Value>, CodegenError> {
    let lowest = b.ins().f64const(f64::NEG_INFINITY);
    let start = b.ins().splat(types::F64X2, lowest);
    let maxima = paired_loop(b, cols, &vec![start; rows.len()], |b, j, pair, carried| {
        rows.iter()
            .zip(carried)
            .map(|(&row, &m)| {
                let v = load_lanes(b, row, j, pair);
                let v = if pair {
                    v
                } else {
                    b.ins().insertlane(start, v, 0)
                };
                Ok(max_step(b, m, v))
            })
            .collect()
    })?;
    Ok(maxima
        .into_iter()
        .map(|m| {
            let first = b.ins().extractlane(m, 0);
            let second = b.ins().extractlane(m, 1);
            max_step(b, first, second)
        })
        .collect())
}

/// The maximum `m` of a row and the sum of `exp(x - m)`, each op rounded
/// to `f32` if `f32` as the expansion of a softmax rounds it: two columns
/// at a time in `f64x2` by the polynomial `exp` (`approx::exp`, within 1
/// ulp), the odd last one alone; the pair's lanes are added, then the
/// last one. Each `exp(x[j] - m)` is also stored at `kept[j]` (`f64`s) if
/// given.
fn row_exps(
    b: &mut FunctionBuilder<'_>,
    row: Row,
    cols: (Value, bool),
    f32: bool,
    kept: Option<Value>,
) -> Result<(Value, Value), CodegenError> {
    Ok(rows_exps(b, &[(row, kept)], cols, f32)?[0])
}

/// `row_exps` of several rows in the same loops, each row by its own
/// chains (the same operations, in the same order, as one row alone; the
/// rows' chains overlap).
fn rows_exps(
    b: &mut FunctionBuilder<'_>,
    rows: &[(Row, Option<Value>)],
    cols: (Value, bool),
    f32: bool,
) -> Result<Vec<(Value, Value)>, CodegenError> {
    let lines: Vec<Row> = rows.iter().map(|r| r.0).collect();
    let maxima = rows_max_paired(b, &lines, cols)?;
    let zero = b.ins().f64const(0.0);
    let start = b.ins().splat(types::F64X2, zero);
    let pair_maxima: Vec<Value> = maxima
        .iter()
        .map(|&m| b.ins().splat(types::F64X2, m))
        .collect();
    let totals = paired_loop(b, cols, &vec![start; rows.len()], |b, j, pair, carried| {
        let mut next = Vec::with_capacity(rows.len());
        for (i, &(row, kept)) in rows.iter().enumerate() {
            let m = if pair { pair_maxima[i] } else { maxima[i] };
            let e = row_exp(b, row, m, (j, pair), f32)?;
            if let Some(kept) = kept {
                let at = clif::element_at(b, Elem::F64, kept, j);
                clif::store(b, Elem::F64, e, at);
            }
            // (A single one as [e, 0.0].)
            let e = if pair {
                e
            } else {
                b.ins().scalar_to_vector(types::F64X2, e)
            };
            next.push(b.ins().fadd(carried[i], e));
        }
        Ok(next)
    })?;
    Ok(maxima
        .into_iter()
        .zip(totals)
        .map(|(m, total)| {
            let first = b.ins().extractlane(total, 0);
            let second = b.ins().extractlane(total, 1);
            let sum = b.ins().fadd(first, second);
            (m, rounded(b, f32, sum))
        })
        .collect())
}

/// Writes `then(p, j, pair)` of a row's softmax `p = exp(x - m) / sum`
/// to `out_row`, two columns at a time (`pair`: `p` is an `f64x2`), given
/// the row's maximum `m` and its sum of `exp(x - m)` (`row_exps`, which
/// has filled `kept` if given). The exponentials are read back from
/// `kept` (a row of `f64`s on the stack) if given, else taken again: the
/// same values either way.
fn write_softmax_of(
    b: &mut FunctionBuilder<'_>,
    (row, kept): (Row, Option<Value>),
    (m, sum): (Value, Value),
    out_row: Row,
    cols: (Value, bool),
    f32: bool,
    then: impl FnMut(&mut FunctionBuilder<'_>, Value, Value, bool) -> Value,
) -> Result<(), CodegenError> {
    let softmax = Softmax {
        row,
        kept,
        exps: (m, sum),
        out_row,
    };
    write_softmaxes(b, &[softmax], cols, f32, then)
}

/// A row's softmax to write (`write_softmaxes`): the row, where its
/// exponentials are kept, its maximum and sum of exponentials
/// (`rows_exps`), and the output row.
#[derive(Clone, Copy)]
struct Softmax {
    row: Row,
    kept: Option<Value>,
    exps: (Value, Value),
    out_row: Row,
}

/// `write_softmax_of` for several rows in one loop (each row's values as
/// alone).
fn write_softmaxes(
    b: &mut FunctionBuilder<'_>,
    rows: &[Softmax],
    cols: (Value, bool),
    f32: bool,
    mut then: impl FnMut(&mut FunctionBuilder<'_>, Value, Value, bool) -> Value,
) -> Result<(), CodegenError> {
    let pairs: Vec<(Value, Value)> = rows
        .iter()
        .map(|r| {
            (
                b.ins().splat(types::F64X2, r.exps.0),
                b.ins().splat(types::F64X2, r.exps.1),
            )
        })
        .collect();
    paired_loop(b, cols, &[], |b, j, pair, _| {
        for (r, &row_pairs) in rows.iter().zip(&pairs) {
            let (m, sum) = if pair { row_pairs } else { r.exps };
            let p = softmax_at(b, (r.row, r.kept), (m, sum), (j, pair), f32)?;
            let v = then(b, p, j, pair);
            let v = rounded(b, f32, v);
            let at = r.out_row.at(b, j);
            clif::store(b, r.out_row.elem, v, at);
        }
        Ok(vec![])
    })?;
    Ok(())
}

/// The softmax `exp(x - m) / sum` of a row at column `j` (or, `pair`,
/// `j` and `j + 1`; `m` and `sum` then pairs too), rounded to `f32` if
/// `f32`, the exponential read back from `kept` if given, else taken
/// again.
fn softmax_at(
    b: &mut FunctionBuilder<'_>,
    (row, kept): (Row, Option<Value>),
    (m, sum): (Value, Value),
    (j, pair): (Value, bool),
    f32: bool,
) -> Result<Value, CodegenError> {
    let e = match kept {
        Some(kept) => {
            let at = clif::element_at(b, Elem::F64, kept, j);
            clif::load(b, Elem::F64, pair, at)
        }
        None => row_exp(b, row, m, (j, pair), f32)?,
    };
    let p = b.ins().fdiv(e, sum);
    Ok(rounded(b, f32, p))
}

/// A row's `log_softmax` at its label, `(x - m) - log(sum)`, each op
/// rounded to `f32` if `f32`.
fn log_softmax_at(
    b: &mut FunctionBuilder<'_>,
    calls: &mut Calls<'_>,
    (row, label): (Row, Value),
    (m, sum): (Value, Value),
    f32: bool,
) -> Result<Value, CodegenError> {
    let v = load(b, row, label);
    let shifted = b.ins().fsub(v, m);
    let shifted = rounded(b, f32, shifted);
    let log = call(b, calls, "gradc_log", &[sum])?;
    let log = rounded(b, f32, log);
    let log_p = b.ins().fsub(shifted, log);
    Ok(rounded(b, f32, log_p))
}

/// A cross-entropy gradient's `g / N` (`N` the row count, at least 1),
/// rounded to `f32` if `f32`.
fn gradient_scale(b: &mut FunctionBuilder<'_>, g: Value, rows: Value, f32: bool) -> Value {
    let count = row_count(b, rows);
    let scale = b.ins().fdiv(g, count);
    rounded(b, f32, scale)
}

/// One column (or, `pair`, two) of the cross-entropy VJP's row from the
/// softmax `p` off the label: `(p - 0) * scale`, that is `p * scale`
/// (`scale` is `g / N`); the label's column is then overwritten by
/// `label_gradient`. (One store more per row instead of a one-hot
/// comparison per pair.)
fn cross_entropy_gradient(
    b: &mut FunctionBuilder<'_>,
    p: Value,
    pair: bool,
    scale: Value,
) -> Value {
    let scale = if pair {
        b.ins().splat(types::F64X2, scale)
    } else {
        scale
    };
    b.ins().fmul(p, scale)
}

/// Overwrites the label's column of a cross-entropy VJP row with
/// `(p - 1) * scale`, `p` being the softmax there (`exp(x - m) / sum`,
/// the exponential read back from `kept` if given): the value the one-hot
/// difference gives.
fn label_gradient(
    b: &mut FunctionBuilder<'_>,
    (row, kept): (Row, Option<Value>),
    (m, sum): (Value, Value),
    (out_row, label): (Row, Value),
    scale: Value,
    f32: bool,
) -> Result<(), CodegenError> {
    let p = softmax_at(b, (row, kept), (m, sum), (label, false), f32)?;
    let one = b.ins().f64const(1.0);
    let difference = b.ins().fsub(p, one);
    let difference = rounded(b, f32, difference);
    let value = b.ins().fmul(difference, scale);
    let value = rounded(b, f32, value);
    let at = out_row.at(b, label);
    clif::store(b, out_row.elem, value, at);
    Ok(())
}

/// The cross-entropy from the sum of the rows' `log_softmax` at their
/// labels: `-total / N` (`N` the row count, at least 1), `total` and the
/// quotient rounded to `f32` if `f32`, stored as `out`'s first element.
fn store_mean(b: &mut FunctionBuilder<'_>, total: Value, rows: Value, f32: bool, out: Row) {
    let count = row_count(b, rows);
    let total = rounded(b, f32, total);
    let negated = b.ins().fneg(total);
    let mean = b.ins().fdiv(negated, count);
    let mean = rounded(b, f32, mean);
    clif::store(b, out.elem, mean, out.base);
}

/// `max(rows, 1)` as an `f64`, the divisor of a mean over rows.
fn row_count(b: &mut FunctionBuilder<'_>, rows: Value) -> Value {
    let one = b.ins().iconst(types::I64, 1);
    let count = b.ins().umax(rows, one);
    b.ins().fcvt_from_uint(types::F64, count)
}

/// `exp(x[j] - m)` of a row, or of columns `j` and `j + 1` as a pair (`m`
/// then a pair too), by the polynomial `exp`; the difference and the
/// exponential rounded to `f32` if `f32`.
fn row_exp(
    b: &mut FunctionBuilder<'_>,
    row: Row,
    m: Value,
    (j, pair): (Value, bool),
    f32: bool,
) -> Result<Value, CodegenError> {
    let v = load_lanes(b, row, j, pair);
    let shifted = b.ins().fsub(v, m);
    let shifted = rounded(b, f32, shifted);
    // (`x - m` is at most 0, or NaN: `m` is the row's maximum.)
    Ok(if f32 {
        let e = approx::exp_of_nonpositive_for_f32(b, shifted);
        rounded(b, true, e)
    } else {
        approx::exp_of_nonpositive(b, shifted)
    })
}

/// A loop over `0..count` two at a time, `body(b, j, true, carried)` at
/// `j = 0, 2, 4, ...` while `j + 1 < count`, then `body(b, count - 1,
/// false, carried)` if `count` is odd (unless `even`: `count` is known to
/// be even, and that code is left out).
fn paired_loop(
    b: &mut FunctionBuilder<'_>,
    (count, even): (Value, bool),
    initial: &[Value],
    mut body: impl FnMut(
        &mut FunctionBuilder<'_>,
        Value,
        bool,
        &[Value],
    ) -> Result<Vec<Value>, CodegenError>,
) -> Result<Vec<Value>, CodegenError> {
    let pairs = b.ins().ushr_imm_u(count, 1);
    let after = counted_loop(b, pairs, initial, |b, i, carried| {
        let j = b.ins().ishl_imm_u(i, 1);
        body(b, j, true, carried)
    })?;
    if even {
        return Ok(after);
    }
    let tail = b.create_block();
    let exit = b.create_block();
    for &value in &after {
        let ty = b.func.dfg.value_type(value);
        b.append_block_param(exit, ty);
    }
    let odd = b.ins().band_imm_u(count, 1);
    let passed: Vec<BlockArg> = after.iter().copied().map(Into::into).collect();
    b.ins().brif(odd, tail, &[], exit, &passed);

    b.switch_to_block(tail);
    let last = b.ins().iadd_imm_s(count, -1);
    let next = body(b, last, false, &after)?;
    let next: Vec<BlockArg> = next.into_iter().map(Into::into).collect();
    b.ins().jump(exit, &next);

    b.switch_to_block(exit);
    Ok(b.block_params(exit).to_vec())
}

/// A label as a column index: truncated like `as usize` (NaN and negative
/// values give 0), and kept below `cols` so no address can leave the row
/// (the runtime has checked the labels already).
fn label_index(b: &mut FunctionBuilder<'_>, labels: Row, r: Value, cols: Value) -> Value {
    let label = load(b, labels, r);
    let index = b.ins().fcvt_to_uint_sat(types::I64, label);
    let last = b.ins().iadd_imm_s(cols, -1);
    b.ins().umin(index, last)
}

/// A row kernel's sizes: its `rows` parameter, its `cols` (a constant when
/// it is compiled for one row length, `RowKernel::fixed_cols`), whether
/// that length is even, and where a softmax row's exponentials are kept
/// (a stack row of `cols` `f64`s; without one they are taken again).
#[derive(Clone, Copy)]
pub(super) struct RowShape {
    pub rows: Value,
    pub cols: Value,
    pub even_cols: bool,
    pub exps: Option<Value>,
    /// A second such row, for kernels that take two rows at a time
    /// (`RowOp::CrossEntropyWithVjp`); without one they take one.
    pub second_exps: Option<Value>,
}

/// Emits the body of a row kernel `fn(ptrs, rows, cols)`: `ptrs` holds the
/// buffers `op.reads` lists, then the output, stored as `elems` says.
pub(super) fn emit(
    b: &mut FunctionBuilder<'_>,
    calls: &mut Calls<'_>,
    op: RowOp,
    f32: bool,
    elems: &[Elem],
    ptrs: Value,
    shape: RowShape,
) -> Result<(), CodegenError> {
    let RowShape {
        rows,
        cols,
        even_cols,
        exps,
        ..
    } = shape;
    let flags = MemFlagsData::trusted();
    let (reads, outputs) = op.lengths(1, 1);
    let buffers = reads.len() + outputs.len();
    if elems.len() != buffers {
        return Err(CodegenError(
            "row kernel: an element type per buffer expected".into(),
        ));
    }
    let bases: Vec<Row> = (0..buffers)
        .map(|j| Row {
            base: b.ins().load(types::I64, flags, ptrs, (8 * j) as i32),
            elem: elems[j],
        })
        .collect();
    let out = bases[reads.len()];
    let kernel = RowBuffers {
        bases,
        out,
        shape,
        f32,
    };
    let bases = kernel.bases.as_slice();
    match op {
        RowOp::Max => {
            counted_loop(b, rows, &[], |b, r, _| {
                let row = kernel.row_of(b, bases[0], r);
                let value = row_max(b, row, cols)?;
                let value = rounded(b, f32, value);
                store(b, value, out, r);
                Ok(vec![])
            })?;
        }
        RowOp::CrossEntropy => {
            // log_softmax at the label, summed from 0 in row order; the
            // mean of its negation.
            let start = b.ins().f64const(0.0);
            let total = counted_loop(b, rows, &[start], |b, r, carried| {
                let row = kernel.row_of(b, bases[0], r);
                let (m, sum) = row_exps(b, row, (cols, even_cols), f32, None)?;
                let label = label_index(b, bases[1], r, cols);
                let log_p = log_softmax_at(b, calls, (row, label), (m, sum), f32)?;
                Ok(vec![b.ins().fadd(carried[0], log_p)])
            })?[0];
            store_mean(b, total, rows, f32, out);
        }
        RowOp::CrossEntropyVjp => {
            let g = clif::load(b, bases[0].elem, false, bases[0].base);
            let scale = gradient_scale(b, g, rows, f32);
            counted_loop(b, rows, &[], |b, r, _| {
                let (row, out_row) = (kernel.row_of(b, bases[1], r), kernel.row_of(b, out, r));
                let label = label_index(b, bases[2], r, cols);
                let (m, sum) = row_exps(b, row, (cols, even_cols), f32, exps)?;
                write_softmax_of(
                    b,
                    (row, exps),
                    (m, sum),
                    out_row,
                    (cols, even_cols),
                    f32,
                    |b, p, _, pair| cross_entropy_gradient(b, p, pair, scale),
                )?;
                label_gradient(b, (row, exps), (m, sum), (out_row, label), scale, f32)?;
                Ok(vec![])
            })?;
        }
        RowOp::CrossEntropyWithVjp { g } => emit_cross_entropy_with_vjp(b, &kernel, calls, g)?,
    }
    Ok(())
}

/// A row kernel's buffers and sizes, as the code of its op sees them.
struct RowBuffers {
    /// The buffers `RowOp::reads` lists, then the outputs.
    bases: Vec<Row>,
    /// The first output.
    out: Row,
    shape: RowShape,
    /// Whether results are rounded to `f32`.
    f32: bool,
}

impl RowBuffers {
    /// Row `r` of a `rows x cols` buffer.
    fn row_of(&self, b: &mut FunctionBuilder<'_>, buffer: Row, r: Value) -> Row {
        let start = b.ins().imul(r, self.shape.cols);
        Row {
            base: clif::element_at(b, buffer.elem, buffer.base, start),
            elem: buffer.elem,
        }
    }
}

/// `RowOp::CrossEntropyWithVjp`: the cross-entropy and its gradient
/// kernels in one loop over rows, with the same values. Two rows at a
/// time where there are scratch rows for both (or none is kept), each by
/// its own chains, so that the chains of the one overlap the other's (the
/// exponentials, the `log` call and the row's softmax make a long chain);
/// the losses are added in row order.
fn emit_cross_entropy_with_vjp(
    b: &mut FunctionBuilder<'_>,
    kernel: &RowBuffers,
    calls: &mut Calls<'_>,
    g: f64,
) -> Result<(), CodegenError> {
    let (bases, out, f32) = (kernel.bases.as_slice(), kernel.out, kernel.f32);
    let RowShape {
        rows,
        cols,
        even_cols,
        exps,
        second_exps,
        ..
    } = kernel.shape;
    // The two kernels above in one loop over rows: the same values.
    // Two rows at a time where there are scratch rows for both (or
    // none is kept), each by its own chains, so that the chains of
    // the one overlap the other's (the exponentials, the `log` call
    // and the row's softmax make a long chain); the losses are
    // added in row order.
    let g = b.ins().f64const(g);
    let scale = gradient_scale(b, g, rows, f32);
    let gradient = bases[3];
    let start = b.ins().f64const(0.0);
    // Rows `r..r + kept.len()` into the running total.
    let mut body = |b: &mut FunctionBuilder<'_>,
                    first: Value,
                    kept: &[Option<Value>],
                    total: Value|
     -> Result<Value, CodegenError> {
        let indices: Vec<Value> = (0..kept.len())
            .map(|i| b.ins().iadd_imm_u(first, i as i64))
            .collect();
        let inputs: Vec<(Row, Option<Value>)> = indices
            .iter()
            .zip(kept)
            .map(|(&r, &kept)| (kernel.row_of(b, bases[0], r), kept))
            .collect();
        let exponentials = rows_exps(b, &inputs, (cols, even_cols), f32)?;
        let mut softmaxes = Vec::new();
        let mut labelled = Vec::new();
        for ((&r, &(row, kept)), &exps) in indices.iter().zip(&inputs).zip(&exponentials) {
            let label = label_index(b, bases[1], r, cols);
            let log_p = log_softmax_at(b, calls, (row, label), exps, f32)?;
            labelled.push((label, log_p));
            let out_row = kernel.row_of(b, gradient, r);
            softmaxes.push(Softmax {
                row,
                kept,
                exps,
                out_row,
            });
        }
        write_softmaxes(b, &softmaxes, (cols, even_cols), f32, |b, p, _, pair| {
            cross_entropy_gradient(b, p, pair, scale)
        })?;
        let mut total = total;
        for (softmax, (label, log_p)) in softmaxes.iter().zip(labelled) {
            label_gradient(
                b,
                (softmax.row, softmax.kept),
                softmax.exps,
                (softmax.out_row, label),
                scale,
                f32,
            )?;
            total = b.ins().fadd(total, log_p);
        }
        Ok(total)
    };
    let total = if exps.is_none() || second_exps.is_some() {
        paired_loop(b, (rows, false), &[start], |b, r, pair, carried| {
            let kept = if pair {
                vec![exps, second_exps]
            } else {
                vec![exps]
            };
            Ok(vec![body(b, r, &kept, carried[0])?])
        })?[0]
    } else {
        counted_loop(b, rows, &[start], |b, r, carried| {
            Ok(vec![body(b, r, &[exps], carried[0])?])
        })?[0]
    };
    store_mean(b, total, rows, f32, out);
    Ok(())
}

/// A compiled row kernel (`jit::rows`): a loop over the rows of a
/// `rows x cols` operand.
pub(crate) struct RowKernel {
    pub(super) func: FuncId,
    /// What it computes.
    pub op: RowOp,
    /// Values read, in argument order (`RowOp::reads`).
    pub inputs: Vec<NodeId>,
    /// The nodes it computes (one, but for `RowOp::CrossEntropyWithVjp`).
    pub outputs: Vec<NodeId>,
    /// How each buffer stores its elements (inputs, then the outputs).
    pub elems: Vec<Elem>,
    /// Compiled for this row length only (a static last axis): the
    /// kernel takes it as a constant, leaves out the odd last column when
    /// it is even, and keeps a softmax row's exponentials on the stack;
    /// `push_rows` refuses any other.
    pub fixed_cols: Option<usize>,
}
