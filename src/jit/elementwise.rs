//! Elementwise kernels: a function `fn(ptrs, ks, ms, n, context)` that
//! loops `i` over `0..n` (the kernel's loop shape, bound per frame) and
//! computes a fused chain of elementwise ops, closing with the sums and
//! counts that reduce it. How it reaches each buffer is fixed by the
//! static shapes (`Access`): a full operand at `i`, a single element at 0,
//! a strided operand (NumPy broadcasting of one block of axes: a bias row,
//! a `[B, 1]` column) at `(i / ks[j]) % ms[j]` by counters that wrap, a
//! row of the last axis in a loop over rows and columns. Without strided
//! buffers a vector loop of `f64x2` (or `f32x4` where that is exact) runs
//! first and narrower loops finish the tail.
//!
//! Buffers of `f32` values hold `f32`s (`Elem`), half the bytes; kernels
//! widen what they load and compute in `f64` like the interpreter, and
//! every op of an `f32` node is rounded to `f32` as the interpreter does,
//! so compiled kernels give bit-identical results (but for `exp`,
//! `sigmoid` and the other polynomials from `approx`, within a few ulps,
//! and sums added in another order: lanes, `f32` blocks).

use std::collections::HashMap;

use cranelift_codegen::ir::condcodes::{FloatCC, IntCC};
use cranelift_codegen::ir::{
    BlockArg, Endianness, InstBuilder, MemFlagsData, StackSlotData, StackSlotKind, Value, types,
};
use cranelift_frontend::FunctionBuilder;
use cranelift_module::FuncId;

use super::approx;
use crate::interp::kernels;
use crate::ir::{BinaryFn, DType, Dim, Graph, NodeId, Op, ReduceFn, Shape, UnaryFn};
use crate::jit::clif::Calls;
use crate::jit::clif::CodegenError;
use crate::jit::clif::Elem;
use crate::jit::clif::access_flags;
use crate::jit::clif::call;
use crate::jit::clif::constant;
use crate::jit::clif::counted_loop;
use crate::jit::clif::element_at;
use crate::jit::clif::gather;
use crate::jit::clif::keep_where;
use crate::jit::clif::lanes;
use crate::jit::clif::loop_branch;
use crate::jit::clif::pick;
use crate::jit::clif::{load, store};

/// Whether a node is a sum the code generator can end a kernel with:
/// `sum` or `mean` over some axes (the division by the count follows the
/// call, as in the interpreter), the `sum_to` of broadcasting, or a
/// monitor's count: `zero_fraction` (a count of zeros, divided after the
/// call) and `dead_fraction` (a count of nonzero rows per unit, turned into
/// the fraction of units with none after the call); or `mse`, a mean of
/// squared differences.
pub fn is_sum(graph: &Graph, id: NodeId) -> bool {
    crate::passes::fusion::adds_elements(&graph.node(id).op)
        && graph.node(id).dtype() != DType::I32
        && graph.node(graph.operands(id)[0]).dtype() != DType::I32
}

/// Whether a closing sum is finished by dividing by the count of what it
/// added: a mean, a zero fraction, `mse` and `bce_with_logits`.
pub(super) fn divides_by_count(op: &Op) -> bool {
    matches!(
        op,
        Op::Reduce {
            func: ReduceFn::Mean,
            ..
        } | Op::ZeroFraction
            | Op::Mse
            | Op::BceWithLogits
    )
}

/// What a closing sum adds for one element, from its operands' `values`.
/// (`zero` gives the lanes' type: a constant operand, such as a gradient
/// that folded to one, is made from it.)
pub(super) fn summand(
    b: &mut FunctionBuilder<'_>,
    graph: &Graph,
    id: NodeId,
    values: &HashMap<NodeId, Value>,
    zero: Value,
) -> Result<Value, CodegenError> {
    let operands = graph.operands(id);
    let mut value_of = |operand: Option<&NodeId>| match operand {
        Some(&o) => match (values.get(&o), &graph.node(o).op) {
            (Some(&v), _) => Ok(v),
            (None, Op::Constant(c)) if graph.node(o).dtype() == DType::F32 => {
                Ok(constant(b, zero, f64::from(*c as f32)))
            }
            (None, Op::Constant(c)) => Ok(constant(b, zero, *c)),
            (None, _) => Err(CodegenError(format!(
                "the operands of {id} are not computed"
            ))),
        },
        None => Err(CodegenError(format!("{id} has no operands"))),
    };
    let value = value_of(operands.first())?;
    // 1 where `value cc 0`, else 0.
    let counted = |b: &mut FunctionBuilder<'_>, cc: FloatCC| {
        let zero = constant(b, value, 0.0);
        let one = constant(b, value, 1.0);
        let hit = b.ins().fcmp(cc, value, zero);
        keep_where(b, hit, one, zero)
    };
    Ok(match graph.node(id).op {
        // 1 for a zero.
        Op::ZeroFraction => counted(b, FloatCC::Equal),
        // 1 for anything but zero (NaN included, as in the interpreter).
        Op::DeadFraction => counted(b, FloatCC::NotEqual),
        // (p - t)^2, unrounded (the interpreter sums in f64).
        Op::Mse => {
            let target = value_of(operands.get(1))?;
            let difference = b.ins().fsub(value, target);
            b.ins().fmul(difference, difference)
        }
        // max(x, 0) - x t + ln(1 + e^-|x|), in that order, as
        // `kernels::bce_with_logits` (whose `max` gives 0 for NaN too).
        Op::BceWithLogits => {
            let target = value_of(operands.get(1))?;
            let zero = constant(b, value, 0.0);
            let positive = b.ins().fcmp(FloatCC::GreaterThan, value, zero);
            let hinge = pick(b, positive, value, zero);
            let product = b.ins().fmul(value, target);
            let difference = b.ins().fsub(hinge, product);
            let magnitude = b.ins().fabs(value);
            let negated = b.ins().fneg(magnitude);
            let tail = approx::softplus(b, negated);
            b.ins().fadd(difference, tail)
        }
        _ => value,
    })
}

/// Whether the code generator can compile a node as an elementwise op.
pub(crate) fn supported(graph: &Graph, id: NodeId) -> bool {
    let node = graph.node(id);
    if node.dtype() == DType::I32 {
        return false;
    }
    matches!(
        &node.op,
        Op::Binary(_)
            | Op::Unary(_)
            | Op::LeakyRelu { .. }
            | Op::Clamp { .. }
            | Op::Identity
            | Op::StopGradient
            | Op::Expand
            | Op::Select
            | Op::Dropout { .. }
    )
}

// The transcendental functions compiled code calls: the interpreter's own
// scalar functions, so results stay bit-identical (`log` once per row of
// a row kernel; `exp` everywhere, and `log`, `tanh`, `sigmoid` and
// `softplus` in elementwise kernels, are the polynomials of `approx`).
pub(super) extern "C" fn gradc_log(x: f64) -> f64 {
    kernels::unary(UnaryFn::Log, x)
}
pub(super) extern "C" fn gradc_sin(x: f64) -> f64 {
    kernels::unary(UnaryFn::Sin, x)
}
pub(super) extern "C" fn gradc_cos(x: f64) -> f64 {
    kernels::unary(UnaryFn::Cos, x)
}
pub(super) extern "C" fn gradc_pow(a: f64, b: f64) -> f64 {
    kernels::binary(BinaryFn::Pow, a, b)
}

/// Dropout's scale of element `index`: 0 where it is dropped, else
/// `1 / (1 - p)`; the same counter-based draw as the interpreter's.
extern "C" fn gradc_dropout_scale(p: f64, key: i64, seed: i64, step: i64, index: i64) -> f64 {
    // The integers arrive as the bits of the interpreter's unsigned values.
    let draw = crate::random::uniform_at(seed as u64, step as u64, key as u32, index as u64);
    if draw < p { 0.0 } else { 1.0 / (1.0 - p) }
}

/// The functions elementwise code may call: name, address, and parameter
/// types (each returns an `f64`).
pub(super) fn runtime_functions() -> Vec<(&'static str, *const u8, Vec<types::Type>)> {
    let (f64, i64) = (types::F64, types::I64);
    vec![
        ("gradc_log", gradc_log as *const u8, vec![f64]),
        ("gradc_sin", gradc_sin as *const u8, vec![f64]),
        ("gradc_cos", gradc_cos as *const u8, vec![f64]),
        ("gradc_pow", gradc_pow as *const u8, vec![f64, f64]),
        (
            "gradc_dropout_scale",
            gradc_dropout_scale as *const u8,
            vec![f64, i64, i64, i64, i64],
        ),
    ]
}

/// Where in the loop and run an element is: what a dropout mask depends on.
#[derive(Clone, Copy)]
pub(super) struct Place {
    pub(super) index: Value,
    pub(super) seed: Value,
    pub(super) step: Value,
    /// The constant `0.0`, made once per kernel.
    pub(super) zero: Value,
}

/// Dropout's scale of the current element (of each lane's element, for a
/// vector of elements `index, index + 1`).
pub(super) fn dropout_scale(
    b: &mut FunctionBuilder<'_>,
    calls: &mut Calls<'_>,
    p: f64,
    key: u32,
    place: Place,
) -> Result<Value, CodegenError> {
    let p = b.ins().f64const(p);
    let key = b.ins().iconst(types::I64, i64::from(key));
    let mut scales = Vec::new();
    for lane in 0..lanes(b, place.zero) {
        let index = b.ins().iadd_imm_u(place.index, lane as i64);
        scales.push(call(
            b,
            calls,
            "gradc_dropout_scale",
            &[p, key, place.seed, place.step, index],
        )?);
    }
    Ok(gather(b, &scales))
}

/// A compiled kernel: its entry point and what to pass it.
pub(crate) struct CompiledKernel {
    pub(super) func: FuncId,
    /// Values read, in argument order (before the outputs).
    pub inputs: Vec<NodeId>,
    /// Values written, in argument order (after the inputs).
    pub outputs: Vec<NodeId>,
    /// How the loop reaches each buffer (inputs, then outputs).
    pub access: Vec<Access>,
    /// The static size of the last axis when the kernel loops over rows
    /// and columns (it has `Row` buffers).
    pub cols: Option<usize>,
    /// The shape each input is read as (`read_shape`), for its broadcast
    /// factors.
    pub read_shapes: Vec<Shape>,
    /// How each buffer stores its elements (inputs, then outputs).
    pub elems: Vec<Elem>,
    /// A number the element count is always a multiple of (the product of
    /// the loop shape's static axes), when the kernel relies on it: its
    /// vector loop then covers every element, and the narrower loops after
    /// it are left out (`Body::flat`). `push_kernel` refuses other counts.
    pub multiple_of: Option<usize>,
}

/// How a kernel's loop reaches one of its buffers, decided from the static
/// shapes when it is compiled.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Access {
    /// The loop's own shape: element `i` (an input, or a non-sum output).
    Full,
    /// One element (every axis of size 1): element 0, read once per
    /// element or, for a sum, written once after the loop.
    Single,
    /// Broadcasting: element `(i / k) % m`, by counters that wrap.
    Strided,
    /// A row of the loop's last axis (a bias, its gradient): element `j`
    /// of the row the loop is in (`k = 1`, `m` = the last axis' static
    /// size), in a loop over rows and columns that vectorizes.
    Row,
}

/// A single-element input as a scalar, a pair, and four `f32`s (if the
/// kernel has `f32x4` loops).
pub(super) type Single = (Value, Value, Option<Value>);

/// What every step of a kernel's loops computes: the kernel's nodes over
/// its buffers.
pub(super) struct Body<'k> {
    pub(super) graph: &'k Graph,
    pub(super) nodes: &'k [NodeId],
    pub(super) inputs: &'k [NodeId],
    pub(super) outputs: &'k [NodeId],
    pub(super) access: &'k [Access],
    pub(super) elems: &'k [Elem],
    pub(super) bases: &'k [Value],
    /// Each single-element input, loaded before the loops.
    pub(super) singles: &'k [Option<Single>],
    /// Whether the vector loops take four `f32`s at a time (`f32_exact`).
    pub(super) quad: bool,
    pub(super) single_sums: &'k [usize],
    pub(super) seed: Value,
    pub(super) step: Value,
    pub(super) zero: Value,
}

impl Body<'_> {
    /// One step at element `index`, over `width` elements: one (`f64`),
    /// two (`f64x2`) or four (`f32x4`, only in `f32_exact` kernels). Loads
    /// the inputs at `address(j)`, computes the nodes, and stores or
    /// accumulates the outputs. Returns the next running totals of the
    /// single sums (`f64x2`: a pair adds lane by lane, one element into
    /// lane 0, four elements as two pairs; or, when `in_blocks`, one
    /// `f32x4` per sum, four `f32`s added lane by lane: see `blocked`).
    #[allow(clippy::too_many_arguments, reason = "the step's parts, spelled out")]
    pub(super) fn step(
        &self,
        b: &mut FunctionBuilder<'_>,
        calls: &mut Calls<'_>,
        index: Value,
        width: u8,
        address: &dyn Fn(&mut FunctionBuilder<'_>, usize) -> Value,
        totals: &[Value],
        in_blocks: bool,
    ) -> Result<Vec<Value>, CodegenError> {
        let (graph, access, elems) = (self.graph, self.access, self.elems);
        let zero = match width {
            1 => self.zero,
            2 => b.ins().splat(types::F64X2, self.zero),
            _ => {
                let scalar = b.ins().f32const(0.0);
                b.ins().splat(types::F32X4, scalar)
            }
        };
        let mut values: HashMap<NodeId, Value> = HashMap::new();
        for (j, &input) in self.inputs.iter().enumerate() {
            let value = if let Some((scalar, pair, quad)) = self.singles[j] {
                match width {
                    1 => scalar,
                    2 => pair,
                    _ => quad.ok_or_else(|| CodegenError("no f32 single input".into()))?,
                }
            } else {
                let at = address(b, j);
                if width == 4 {
                    b.ins().load(types::F32X4, access_flags(true), at, 0)
                } else {
                    load(b, elems[j], width == 2, at)
                }
            };
            values.insert(input, value);
        }
        for &id in self.nodes {
            if is_sum(graph, id) {
                continue;
            }
            let place = Place {
                index,
                seed: self.seed,
                step: self.step,
                zero,
            };
            let value = emit(b, graph, id, &values, calls, place)?;
            values.insert(id, value);
        }
        let mut next = Vec::new();
        for (o, &output) in self.outputs.iter().enumerate() {
            let j = self.inputs.len() + o;
            let value = if is_sum(graph, output) {
                summand(b, graph, output, &values, zero)?
            } else {
                *values.get(&output).ok_or_else(|| {
                    CodegenError(format!("output {output} is not computed by the kernel"))
                })?
            };
            // What a sum adds, as `f64` pairs: four `f32`s widened as two
            // pairs, in order.
            let pairs = |b: &mut FunctionBuilder<'_>| match width {
                4 => widen(b, value).to_vec(),
                // [value, 0.0]
                1 => vec![b.ins().scalar_to_vector(types::F64X2, value)],
                _ => vec![value],
            };
            match access[j] {
                // A sum to one element: total += value, in a register.
                Access::Single if in_blocks => {
                    let slot = self.single_sums.iter().position(|&s| s == j).unwrap_or(0);
                    next.push(b.ins().fadd(totals[slot], value));
                }
                Access::Single => {
                    let slot = self.single_sums.iter().position(|&s| s == j).unwrap_or(0);
                    let mut halves = [totals[2 * slot], totals[2 * slot + 1]];
                    for (half, pair) in pairs(b).into_iter().enumerate() {
                        halves[half] = b.ins().fadd(halves[half], pair);
                    }
                    next.extend(halves);
                }
                // A sum over rows in a block of rows: into the scratch row,
                // four `f32`s lane by lane (`rows_and_columns`).
                Access::Row if width == 4 && in_blocks => {
                    let at = address(b, j);
                    let flags = access_flags(true);
                    let total = b.ins().load(types::F32X4, flags, at, 0);
                    let total = b.ins().fadd(total, value);
                    b.ins().store(flags, total, at, 0);
                }
                // out[slot] += value, in the interpreter's order (each
                // lane of a vector is its own slot; the slots are `f64`).
                Access::Strided | Access::Row if width == 4 => {
                    let at = address(b, j);
                    for (p, pair) in pairs(b).into_iter().enumerate() {
                        let at = b.ins().iadd_imm_u(at, 16 * p as i64);
                        let total = load(b, elems[j], true, at);
                        let total = b.ins().fadd(total, pair);
                        store(b, elems[j], total, at);
                    }
                }
                Access::Strided | Access::Row => {
                    let at = address(b, j);
                    let total = load(b, elems[j], width == 2, at);
                    let total = b.ins().fadd(total, value);
                    store(b, elems[j], total, at);
                }
                Access::Full => {
                    let at = address(b, j);
                    store(b, elems[j], value, at);
                }
            }
        }
        Ok(next)
    }

    /// The loops over `i` in `0..n`: with no strided buffer (and `vector`),
    /// a vector loop over pairs first; then the scalar loop, which reads strided buffers
    /// by counters that wrap at `k` and `m` (no division). Returns the
    /// final totals (the builder continues after the loops) and, when the
    /// loops rely on it, the number `n` is always a multiple of.
    ///
    /// `n` is always a multiple of `factor` (the product of the loop
    /// shape's static axes). When that is a multiple of the widest loop's
    /// width (four `f32`s, or a pair without them), that loop covers every
    /// element and the narrower loops after it are not emitted: less code
    /// to compile, and no tail to test at run time.
    pub(super) fn flat(
        &self,
        b: &mut FunctionBuilder<'_>,
        calls: &mut Calls<'_>,
        n: Value,
        factors: &[(usize, Value, Value)],
        totals: &[Value],
        (static_count, factor): (Option<u64>, u64),
    ) -> Result<(Vec<Value>, Option<usize>), CodegenError> {
        // A loop statically over fewer than two elements (a norm, a
        // clipping coefficient) gets no vector loop, and one over less
        // than a block no blocks (their code would only cost compile time).
        let vector = static_count.is_none_or(|count| count >= 2);
        let whole_block = static_count.is_none_or(|count| count >= 4 * SUM_BLOCK as u64);
        let pointer = types::I64;
        let zero = b.ins().iconst(pointer, 0);
        let done = b.create_block();
        for _ in totals {
            b.append_block_param(done, types::F64X2);
        }
        let header = b.create_block();
        let inside = b.create_block();
        b.append_block_param(header, pointer);
        for _ in factors {
            b.append_block_param(header, pointer);
            b.append_block_param(header, pointer);
        }
        for _ in totals {
            b.append_block_param(header, types::F64X2);
        }
        let counters_start: Vec<Value> = factors.iter().flat_map(|_| [zero, zero]).collect();
        if factors.is_empty() && vector {
            // Four `f32`s at a time (in `f32_exact` kernels), then pairs,
            // then the scalar loop for the rest.
            let with_params = |b: &mut FunctionBuilder<'_>| {
                let block = b.create_block();
                b.append_block_param(block, pointer);
                for _ in totals {
                    b.append_block_param(block, types::F64X2);
                }
                block
            };
            let pairs = with_params(b);
            // With sums to one element, whole blocks of four `f32`s
            // (`blocked`), the rest in pairs: one copy of the `f32x4` body,
            // not two (compile time).
            let blocks =
                (self.quad && !self.single_sums.is_empty() && whole_block).then(|| with_params(b));
            let quads = (self.quad && blocks.is_none()).then(|| with_params(b));
            let start: Vec<BlockArg> = std::iter::once(zero)
                .chain(totals.iter().copied())
                .map(Into::into)
                .collect();
            let index = |_: &mut FunctionBuilder<'_>, i: Value| i;
            let address = |b: &mut FunctionBuilder<'_>, i: Value, j: usize| match self.access[j] {
                Access::Full => element_at(b, self.elems[j], self.bases[j], i),
                _ => self.bases[j],
            };
            // The widest loop covers every element: no narrower ones.
            let whole = match (blocks, quads) {
                (None, Some(quads)) if factor.is_multiple_of(4) => Some((quads, 4)),
                (None, None) if factor.is_multiple_of(2) => Some((pairs, 2)),
                _ => None,
            };
            if let Some((first, width)) = whole {
                b.ins().jump(first, &start);
                // (`pairs` becomes the exit: it drops the counter.)
                let exit = if width == 4 { pairs } else { with_params(b) };
                self.vector_loop(b, calls, n, width, (first, exit), &index, &address, false)?;
                b.switch_to_block(exit);
                let finished: Vec<BlockArg> = b.block_params(exit)[1..]
                    .iter()
                    .map(|&v| v.into())
                    .collect();
                b.ins().jump(done, &finished);
                b.switch_to_block(done);
                return Ok((b.block_params(done).to_vec(), Some(width as usize)));
            }
            b.ins().jump(blocks.or(quads).unwrap_or(pairs), &start);
            if let Some(blocks) = blocks {
                self.blocked(b, calls, n, (blocks, pairs), &index, &address)?;
            }
            if let Some(quads) = quads {
                self.vector_loop(b, calls, n, 4, (quads, pairs), &index, &address, false)?;
            }
            self.vector_loop(b, calls, n, 2, (pairs, header), &index, &address, false)?;
        } else {
            let start: Vec<BlockArg> = std::iter::once(zero)
                .chain(counters_start)
                .chain(totals.iter().copied())
                .map(Into::into)
                .collect();
            b.ins().jump(header, &start);
        }

        b.switch_to_block(header);
        let state = b.block_params(header).to_vec();
        let i = state[0];
        let counters: Vec<(Value, Value)> = (0..factors.len())
            .map(|c| (state[1 + 2 * c], state[2 + 2 * c]))
            .collect();
        let running = state[1 + 2 * factors.len()..].to_vec();
        let finished: Vec<BlockArg> = running.iter().map(|&v| v.into()).collect();
        loop_branch(b, (IntCC::SignedLessThan, i, n), inside, (done, &finished));

        b.switch_to_block(inside);
        let address = |b: &mut FunctionBuilder<'_>, j: usize| match self.access[j] {
            Access::Full => element_at(b, self.elems[j], self.bases[j], i),
            Access::Single => self.bases[j],
            Access::Strided | Access::Row => {
                let c = factors.iter().position(|f| f.0 == j).unwrap_or(0);
                element_at(b, self.elems[j], self.bases[j], counters[c].1)
            }
        };
        let next_totals = self.step(b, calls, i, 1, &address, &running, false)?;
        let mut next: Vec<Value> = vec![b.ins().iadd_imm_u(i, 1)];
        for (c, &(_, k, m)) in factors.iter().enumerate() {
            let (within, index) = counters[c];
            let within = b.ins().iadd_imm_u(within, 1);
            let wrapped = b.ins().icmp(IntCC::Equal, within, k);
            let within = b.ins().select(wrapped, zero, within);
            let advanced = b.ins().iadd_imm_u(index, 1);
            let index = b.ins().select(wrapped, advanced, index);
            let wrapped = b.ins().icmp(IntCC::Equal, index, m);
            let index = b.ins().select(wrapped, zero, index);
            next.extend([within, index]);
        }
        next.extend(next_totals);
        let next: Vec<BlockArg> = next.into_iter().map(Into::into).collect();
        b.ins().jump(header, &next);

        b.switch_to_block(done);
        Ok((b.block_params(done).to_vec(), None))
    }

    /// Fills `header` (parameters: a counter, then the totals) with the
    /// loop `while counter + width <= bound { step; counter += width }`,
    /// leaving to `exit` with the same parameters. Each step is at element
    /// `index(counter)`, buffer `j` at `address(counter, j)`.
    #[allow(clippy::too_many_arguments, reason = "the loop's parts, spelled out")]
    fn vector_loop(
        &self,
        b: &mut FunctionBuilder<'_>,
        calls: &mut Calls<'_>,
        bound: Value,
        width: u8,
        (header, exit): (cranelift_codegen::ir::Block, cranelift_codegen::ir::Block),
        index: &dyn Fn(&mut FunctionBuilder<'_>, Value) -> Value,
        address: &dyn Fn(&mut FunctionBuilder<'_>, Value, usize) -> Value,
        in_blocks: bool,
    ) -> Result<(), CodegenError> {
        let body = b.create_block();
        b.switch_to_block(header);
        let state = b.block_params(header).to_vec();
        let (counter, running) = (state[0], &state[1..]);
        let end = b.ins().iadd_imm_u(counter, i64::from(width));
        let leave: Vec<BlockArg> = state.iter().map(|&v| v.into()).collect();
        loop_branch(
            b,
            (IntCC::SignedLessThanOrEqual, end, bound),
            body,
            (exit, &leave),
        );

        b.switch_to_block(body);
        let at = index(b, counter);
        let address = |b: &mut FunctionBuilder<'_>, j| address(b, counter, j);
        let next = self.step(b, calls, at, width, &address, running, in_blocks)?;
        let next: Vec<BlockArg> = std::iter::once(end).chain(next).map(Into::into).collect();
        b.ins().jump(header, &next);
        Ok(())
    }

    /// Fills `header` (parameters: a counter, then the totals as pairs)
    /// with the loop over whole blocks of `SUM_BLOCK` steps of four `f32`s,
    /// leaving to `exit` with the same parameters. Within a block each sum
    /// to one element runs in one `f32x4` (lane by lane, in `f32`); at the
    /// block's end its lanes are widened and added to the `f64` pairs,
    /// which wait in a stack slot meanwhile (in registers they crowd the
    /// block's own sums out). Widening every step's summand instead costs
    /// two conversions and a shuffle per sum, which bound the loop.
    fn blocked(
        &self,
        b: &mut FunctionBuilder<'_>,
        calls: &mut Calls<'_>,
        bound: Value,
        (header, exit): (cranelift_codegen::ir::Block, cranelift_codegen::ir::Block),
        index: &dyn Fn(&mut FunctionBuilder<'_>, Value) -> Value,
        address: &dyn Fn(&mut FunctionBuilder<'_>, Value, usize) -> Value,
    ) -> Result<(), CodegenError> {
        let pointer = types::I64;
        let sums = self.single_sums.len();
        let slot = b.create_sized_stack_slot(StackSlotData::new(
            StackSlotKind::ExplicitSlot,
            32 * sums as u32,
            4,
        ));
        let loop_header = b.create_block();
        let start = b.create_block();
        let inner = b.create_block();
        let flush = b.create_block();
        let leave = b.create_block();
        b.append_block_param(loop_header, pointer);
        for block in [inner, flush] {
            b.append_block_param(block, pointer);
            for _ in 0..sums {
                b.append_block_param(block, types::F32X4);
            }
        }
        b.append_block_param(leave, pointer);

        b.switch_to_block(header);
        let state = b.block_params(header).to_vec();
        for (k, &total) in state[1..].iter().enumerate() {
            b.ins().stack_store(pointer, total, slot, 16 * k as i32);
        }
        b.ins().jump(loop_header, &[state[0].into()]);

        b.switch_to_block(loop_header);
        let counter = b.block_params(loop_header)[0];
        let end = b.ins().iadd_imm_u(counter, 4 * SUM_BLOCK);
        loop_branch(
            b,
            (IntCC::SignedLessThanOrEqual, end, bound),
            start,
            (leave, &[counter.into()]),
        );

        b.switch_to_block(start);
        let scalar = b.ins().f32const(0.0);
        let zero = b.ins().splat(types::F32X4, scalar);
        let first: Vec<BlockArg> = std::iter::once(counter)
            .chain((0..sums).map(|_| zero))
            .map(Into::into)
            .collect();
        b.ins().jump(inner, &first);
        self.vector_loop(b, calls, end, 4, (inner, flush), index, address, true)?;

        b.switch_to_block(flush);
        let block_sums = b.block_params(flush)[1..].to_vec();
        for (s, &sum) in block_sums.iter().enumerate() {
            for (half, pair) in widen(b, sum).into_iter().enumerate() {
                let at = 16 * (2 * s + half) as i32;
                let total = b.ins().stack_load(pointer, types::F64X2, slot, at);
                let total = b.ins().fadd(total, pair);
                b.ins().stack_store(pointer, total, slot, at);
            }
        }
        b.ins().jump(loop_header, &[end.into()]);

        b.switch_to_block(leave);
        let counter = b.block_params(leave)[0];
        let mut out: Vec<BlockArg> = vec![counter.into()];
        for k in 0..2 * sums {
            let total = b
                .ins()
                .stack_load(pointer, types::F64X2, slot, 16 * k as i32);
            out.push(total.into());
        }
        b.ins().jump(exit, &out);
        Ok(())
    }

    /// The loops over rows and columns when every broadcast buffer is a
    /// row of the last axis (`cols` elements, a static size): for each row
    /// start `r` (a multiple of `cols` below `n`), vector loops over the
    /// columns `j` (four `f32`s in `f32_exact` kernels, then pairs), then a
    /// scalar loop over the rest; a full buffer is at `r + j`, a row buffer
    /// at `j`. Returns the final totals.
    ///
    /// In an `f32x4` kernel whose sums are all sums over rows (a bias
    /// gradient, a dead-unit count), the rows run in blocks of `SUM_BLOCK`:
    /// within a block the four-column steps add into a row of `f32`s on the
    /// stack (no conversions), which is then widened and added to the
    /// `f64` slots, as `blocked` does for sums to one element.
    pub(super) fn rows_and_columns(
        &self,
        b: &mut FunctionBuilder<'_>,
        calls: &mut Calls<'_>,
        n: Value,
        cols: usize,
        totals: &[Value],
    ) -> Result<Vec<Value>, CodegenError> {
        let pointer = types::I64;
        let row_sums: Vec<usize> = (self.inputs.len()..self.access.len())
            .filter(|&j| self.access[j] == Access::Row)
            .collect();
        let quad_cols = cols / 4 * 4;
        let scratch_bytes = row_sums.len() * quad_cols * 4;
        let blocked = self.quad
            && totals.is_empty()
            && quad_cols >= ROW_BLOCK_COLS
            && !row_sums.is_empty()
            && row_sums.iter().all(|&j| self.elems[j] == Elem::F64)
            && scratch_bytes <= ROW_SCRATCH_BYTES;
        if !blocked {
            let zero = b.ins().iconst(pointer, 0);
            return self.rows(b, calls, (zero, n), cols, totals, None);
        }
        let slot = b.create_sized_stack_slot(StackSlotData::new(
            StackSlotKind::ExplicitSlot,
            scratch_bytes as u32,
            4,
        ));
        let scratch = b.ins().stack_addr(pointer, slot, 0);
        let header = b.create_block();
        let body = b.create_block();
        let done = b.create_block();
        b.append_block_param(header, pointer);
        let zero = b.ins().iconst(pointer, 0);
        b.ins().jump(header, &[zero.into()]);

        b.switch_to_block(header);
        let start = b.block_params(header)[0];
        loop_branch(b, (IntCC::SignedLessThan, start, n), body, (done, &[]));

        b.switch_to_block(body);
        let flags = MemFlagsData::trusted();
        let quads = b.ins().iconst(pointer, (scratch_bytes / 16) as i64);
        counted_loop(b, quads, &[], |b, q, _| {
            let scalar = b.ins().f32const(0.0);
            let zeros = b.ins().splat(types::F32X4, scalar);
            let offset = b.ins().imul_imm_u(q, 16);
            let at = b.ins().iadd(scratch, offset);
            b.ins().store(flags, zeros, at, 0);
            Ok(vec![])
        })?;
        let end = b.ins().iadd_imm_u(start, SUM_BLOCK * cols as i64);
        let within = b.ins().icmp(IntCC::SignedLessThan, end, n);
        let end = b.ins().select(within, end, n);
        let rows = Scratch {
            base: scratch,
            row_sums: &row_sums,
            quad_cols,
        };
        self.rows(b, calls, (start, end), cols, &[], Some(rows))?;
        let quads = b.ins().iconst(pointer, (quad_cols / 4) as i64);
        counted_loop(b, quads, &[], |b, q, _| {
            for (r, &j) in row_sums.iter().enumerate() {
                let offset = b.ins().imul_imm_u(q, 16);
                let at = b.ins().iadd(scratch, offset);
                let sum = b
                    .ins()
                    .load(types::F32X4, flags, at, (r * quad_cols * 4) as i32);
                let offset = b.ins().imul_imm_u(q, 32);
                let slots = b.ins().iadd(self.bases[j], offset);
                for (half, pair) in widen(b, sum).into_iter().enumerate() {
                    let at = b.ins().iadd_imm_u(slots, 16 * half as i64);
                    let total = load(b, Elem::F64, true, at);
                    let total = b.ins().fadd(total, pair);
                    store(b, Elem::F64, total, at);
                }
            }
            Ok(vec![])
        })?;
        b.ins().jump(header, &[end.into()]);

        b.switch_to_block(done);
        Ok(vec![])
    }

    /// The rows from `first` (a row start) to `end` of `rows_and_columns`,
    /// with the four-column steps of sums over rows adding into `scratch`
    /// if given.
    fn rows(
        &self,
        b: &mut FunctionBuilder<'_>,
        calls: &mut Calls<'_>,
        (first, n): (Value, Value),
        cols: usize,
        totals: &[Value],
        scratch: Option<Scratch<'_>>,
    ) -> Result<Vec<Value>, CodegenError> {
        let pointer = types::I64;
        let zero = b.ins().iconst(pointer, 0);
        let width = b.ins().iconst(pointer, cols as i64);
        let with_totals = |b: &mut FunctionBuilder<'_>, block, counter: bool| {
            if counter {
                b.append_block_param(block, pointer);
            }
            for _ in totals {
                b.append_block_param(block, types::F64X2);
            }
        };
        let outer = b.create_block();
        let outer_body = b.create_block();
        let pairs = b.create_block();
        let tail = b.create_block();
        let single = b.create_block();
        let next_row = b.create_block();
        let done = b.create_block();
        with_totals(b, outer, true);
        with_totals(b, pairs, true);
        with_totals(b, tail, true);
        with_totals(b, next_row, false);
        with_totals(b, done, false);
        let arguments = |first: Value, rest: &[Value]| -> Vec<BlockArg> {
            std::iter::once(first)
                .chain(rest.iter().copied())
                .map(Into::into)
                .collect()
        };
        b.ins().jump(outer, &arguments(first, totals));

        b.switch_to_block(outer);
        let state = b.block_params(outer).to_vec();
        let (row, running) = (state[0], state[1..].to_vec());
        let finished: Vec<BlockArg> = running.iter().map(|&v| v.into()).collect();
        loop_branch(
            b,
            (IntCC::SignedLessThan, row, n),
            outer_body,
            (done, &finished),
        );

        b.switch_to_block(outer_body);
        // Four `f32` columns at a time (`f32_exact` kernels), then pairs,
        // then the tail.
        let quads = self.quad.then(|| {
            let block = b.create_block();
            with_totals(b, block, true);
            block
        });
        b.ins()
            .jump(quads.unwrap_or(pairs), &arguments(zero, &running));
        // Element `row + column`; a full buffer there, a row buffer at the
        // column.
        let index = |b: &mut FunctionBuilder<'_>, column: Value| b.ins().iadd(row, column);
        let address = |b: &mut FunctionBuilder<'_>, column: Value, j: usize| match self.access[j] {
            Access::Full => {
                let element = b.ins().iadd(row, column);
                element_at(b, self.elems[j], self.bases[j], element)
            }
            Access::Row => element_at(b, self.elems[j], self.bases[j], column),
            Access::Single | Access::Strided => self.bases[j],
        };
        if let Some(quads) = quads {
            // A sum over rows in blocks: its four columns in the scratch row.
            let in_scratch = |b: &mut FunctionBuilder<'_>, column: Value, j: usize| match scratch
                .and_then(|s| Some((s, s.row_sums.iter().position(|&r| r == j)?)))
            {
                Some((s, r)) => {
                    let at = element_at(b, Elem::F32, s.base, column);
                    b.ins().iadd_imm_u(at, (r * s.quad_cols * 4) as i64)
                }
                None => address(b, column, j),
            };
            let in_blocks = scratch.is_some();
            self.vector_loop(
                b,
                calls,
                width,
                4,
                (quads, pairs),
                &index,
                &in_scratch,
                in_blocks,
            )?;
        }
        self.vector_loop(b, calls, width, 2, (pairs, tail), &index, &address, false)?;

        b.switch_to_block(tail);
        let state = b.block_params(tail).to_vec();
        let (column, running) = (state[0], state[1..].to_vec());
        let row_done: Vec<BlockArg> = running.iter().map(|&v| v.into()).collect();
        loop_branch(
            b,
            (IntCC::SignedLessThan, column, width),
            single,
            (next_row, &row_done),
        );

        b.switch_to_block(single);
        let at = index(b, column);
        let next = self.step(
            b,
            calls,
            at,
            1,
            &|b, j| address(b, column, j),
            &running,
            false,
        )?;
        let after = b.ins().iadd_imm_u(column, 1);
        b.ins().jump(tail, &arguments(after, &next));

        b.switch_to_block(next_row);
        let running = b.block_params(next_row).to_vec();
        let following = b.ins().iadd(row, width);
        b.ins().jump(outer, &arguments(following, &running));

        b.switch_to_block(done);
        Ok(b.block_params(done).to_vec())
    }
}

/// The row of `f32`s on the stack that the sums over rows of a block of
/// rows add into (`Body::rows_and_columns`): `quad_cols` for each sum over
/// rows, in the order of `row_sums`.
#[derive(Clone, Copy)]
pub(super) struct Scratch<'s> {
    base: Value,
    row_sums: &'s [usize],
    quad_cols: usize,
}

/// The fewest columns (of those taken four at a time) for which sums over
/// rows run in blocks of rows: on shorter rows the widening costs little
/// and the blocks' code only compile time.
pub(super) const ROW_BLOCK_COLS: usize = 32;

/// The largest scratch row (`Scratch`) a kernel puts on the stack; a kernel
/// whose sums over rows need more adds every step into its `f64` slots.
pub(super) const ROW_SCRATCH_BYTES: usize = 32 * 1024;

/// How many steps of four `f32`s a sum to one element adds in `f32` lanes
/// before it widens them into its `f64` total (`Body::blocked`): each lane
/// then holds at most 16 rounded additions (a relative error of at most
/// about `16 * 2^-24 = 1e-6` of the block's magnitude; counts stay exact).
pub(super) const SUM_BLOCK: i64 = 16;

/// Four `f32`s as two `f64` pairs, in order.
pub(super) fn widen(b: &mut FunctionBuilder<'_>, value: Value) -> [Value; 2] {
    let low = b.ins().fvpromote_low(value);
    // The upper two lanes moved down by one shuffle (not through a general
    // register).
    let little = MemFlagsData::new().with_endianness(Endianness::Little);
    let bytes = b.ins().bitcast(types::I8X16, little, value);
    let mask: Vec<u8> = (8..16).chain(8..16).collect();
    let mask = b.func.dfg.immediates.push(mask.into());
    let upper = b.ins().shuffle(bytes, bytes, mask);
    let upper = b.ins().bitcast(types::F32X4, little, upper);
    [low, b.ins().fvpromote_low(upper)]
}

/// The static shape a kernel's output is accumulated into, right-aligned
/// against the loop shape: a sum's kept axes (size 1 where it sums), a
/// dead-unit count's `[1, ...]` (inputs are read as their `read_shape`).
pub(super) fn output_shape(graph: &Graph, id: NodeId, loop_shape: &Shape) -> Option<Vec<Dim>> {
    let node = graph.node(id);
    match &node.op {
        Op::Reduce { axes, .. } => Some(loop_shape.kept(axes).0),
        Op::SumTo => Some(node.shape().0.clone()),
        Op::DeadFraction => {
            let mut kept = loop_shape.0.clone();
            *kept.first_mut()? = Dim::Fixed(1);
            Some(kept)
        }
        _ => None,
    }
}

/// Whether a broadcast shape is one row of `cols`: its last axis is `cols`
/// and every other axis is 1.
pub(super) fn is_row(shape: &[Dim], cols: usize) -> bool {
    match shape.split_last() {
        Some((Dim::Fixed(last), rest)) => {
            usize::try_from(*last) == Ok(cols) && rest.iter().all(Dim::is_one)
        }
        _ => false,
    }
}

/// Whether `f32x4` arithmetic computes a kernel bit for bit as the
/// interpreter does (`f64` per op, rounded to `f32`): every node is `f32`
/// and a single correctly rounded IEEE operation (`+ - * /`, `sqrt`) or an
/// exact one (negation, `abs`, comparisons and selections, `max`, `min`)
/// with constants exact in `f32`, for which rounding the `f64` result of
/// `f32` operands to `f32` gives the `f32` result (53 >= 2 * 24 + 2 bits);
/// every input is stored as `f32`; and every output is stored as `f32` or
/// is a sum of the values themselves or of counts (added in `f64`).
pub(super) fn f32_exact(
    graph: &Graph,
    nodes: &[NodeId],
    input_elems: &[Elem],
    outputs: &[NodeId],
) -> bool {
    let exact = |c: f64| f64::from(c as f32) == c || c.is_nan();
    let single_op = |node: &crate::ir::Node| match &node.op {
        Op::Binary(f) => !matches!(f, BinaryFn::Pow),
        Op::Unary(f) => matches!(
            f,
            UnaryFn::Neg | UnaryFn::Abs | UnaryFn::Sqrt | UnaryFn::Relu
        ),
        Op::LeakyRelu { slope } => exact(*slope),
        Op::Clamp { lo, hi } => exact(*lo) && exact(*hi),
        Op::Identity | Op::StopGradient | Op::Expand | Op::Select => true,
        _ => false,
    };
    input_elems.iter().all(|&e| e == Elem::F32)
        && nodes.iter().all(|&id| {
            let node = graph.node(id);
            let constants_exact = graph.operands(id).iter().all(|&o| match graph.node(o).op {
                Op::Constant(c) => graph.node(o).dtype() == DType::F32 || exact(c),
                _ => true,
            });
            node.dtype() == DType::F32
                && constants_exact
                && if is_sum(graph, id) {
                    // Sums of the values or of counts (`mse` squares a
                    // difference first; `bce_with_logits` takes `exp`).
                    !matches!(node.op, Op::Mse | Op::BceWithLogits)
                } else {
                    single_op(node)
                }
        })
        && outputs
            .iter()
            .all(|&o| graph.node(o).dtype() == DType::F32 && nodes.contains(&o))
}

/// Rounds an `f64` value to `f32` and back, as the interpreter rounds the
/// result of every `f32` op.
pub(super) fn round(b: &mut FunctionBuilder<'_>, graph: &Graph, id: NodeId, value: Value) -> Value {
    match (graph.node(id).dtype(), lanes(b, value)) {
        // Computed in `f32` already.
        (_, 4) => value,
        (DType::F32, 1) => {
            let narrow = b.ins().fdemote(types::F32, value);
            b.ins().fpromote(types::F64, narrow)
        }
        (DType::F32, _) => {
            let narrow = b.ins().fvdemote(value);
            b.ins().fvpromote_low(narrow)
        }
        _ => value,
    }
}

/// Emits one node, computing in `f64` as the interpreter's kernels do.
pub(super) fn emit(
    b: &mut FunctionBuilder<'_>,
    graph: &Graph,
    id: NodeId,
    values: &HashMap<NodeId, Value>,
    calls: &mut Calls<'_>,
    place: Place,
) -> Result<Value, CodegenError> {
    let node = graph.node(id);
    // A kernel node reads only some operands (`fusion::reads`); the others
    // get a placeholder.
    let needed = crate::passes::fusion::reads(graph, id);
    let mut operands = Vec::new();
    for operand in graph.operands(id) {
        let value = match (values.get(&operand), &graph.node(operand).op) {
            (Some(&v), _) => v,
            // A constant holds its value rounded to its type, as in the
            // interpreter.
            (None, Op::Constant(c)) if graph.node(operand).dtype() == DType::F32 => {
                constant(b, place.zero, f64::from(*c as f32))
            }
            (None, Op::Constant(c)) => constant(b, place.zero, *c),
            (None, _) if !needed.contains(&operand) => place.zero,
            (None, _) => {
                return Err(CodegenError(format!(
                    "operand {operand} of {id} is not available"
                )));
            }
        };
        operands.push(value);
    }
    let zero = place.zero;
    let raw = match &node.op {
        Op::Binary(f) => binary(b, *f, operands[0], operands[1], calls)?,
        Op::Unary(f) => unary(b, *f, operands[0], zero, calls)?,
        Op::LeakyRelu { slope } => {
            let scaled = constant(b, place.zero, *slope);
            let negative = b.ins().fmul(operands[0], scaled);
            let positive = b.ins().fcmp(FloatCC::GreaterThan, operands[0], zero);
            pick(b, positive, operands[0], negative)
        }
        Op::Clamp { lo, hi } => clamp(b, operands[0], *lo, *hi),
        // (An expanded operand is read broadcast, as a binary op's is.)
        Op::Identity | Op::StopGradient | Op::Expand => operands[0],
        // `a` where the mask is not 0 (NaN included, as in the interpreter).
        Op::Select => {
            let chosen = b.ins().fcmp(FloatCC::NotEqual, operands[0], zero);
            pick(b, chosen, operands[1], operands[2])
        }
        Op::Dropout { p, key } => {
            let scale = dropout_scale(b, calls, *p, *key, place)?;
            b.ins().fmul(operands[0], scale)
        }
        other => return Err(CodegenError(format!("`{}` is not supported", other.name()))),
    };
    Ok(round(b, graph, id, raw))
}

pub(super) fn binary(
    b: &mut FunctionBuilder<'_>,
    f: BinaryFn,
    x: Value,
    y: Value,
    calls: &mut Calls<'_>,
) -> Result<Value, CodegenError> {
    Ok(match f {
        BinaryFn::Add => b.ins().fadd(x, y),
        BinaryFn::Sub => b.ins().fsub(x, y),
        BinaryFn::Mul => b.ins().fmul(x, y),
        BinaryFn::Div => b.ins().fdiv(x, y),
        // Cranelift's fmax and fmin return NaN when either operand is NaN,
        // as the interpreter does.
        BinaryFn::Maximum => b.ins().fmax(x, y),
        BinaryFn::Minimum => b.ins().fmin(x, y),
        BinaryFn::Pow => call(b, calls, "gradc_pow", &[x, y])?,
        BinaryFn::Greater => compare(b, FloatCC::GreaterThan, x, y),
        BinaryFn::GreaterEqual => compare(b, FloatCC::GreaterThanOrEqual, x, y),
        BinaryFn::Less => compare(b, FloatCC::LessThan, x, y),
        BinaryFn::LessEqual => compare(b, FloatCC::LessThanOrEqual, x, y),
        BinaryFn::Equal => compare(b, FloatCC::Equal, x, y),
        BinaryFn::NotEqual => compare(b, FloatCC::NotEqual, x, y),
    })
}

/// A comparison as 1 or 0 (ordered: 0 where either operand is NaN, as in
/// the interpreter).
pub(super) fn compare(b: &mut FunctionBuilder<'_>, cc: FloatCC, x: Value, y: Value) -> Value {
    let holds = b.ins().fcmp(cc, x, y);
    let one = constant(b, x, 1.0);
    let zero = constant(b, x, 0.0);
    pick(b, holds, one, zero)
}

pub(super) fn unary(
    b: &mut FunctionBuilder<'_>,
    f: UnaryFn,
    x: Value,
    zero: Value,
    calls: &mut Calls<'_>,
) -> Result<Value, CodegenError> {
    Ok(match f {
        UnaryFn::Neg => b.ins().fneg(x),
        UnaryFn::Abs => b.ins().fabs(x),
        UnaryFn::Sqrt => b.ins().sqrt(x),
        // relu(x) = x if x > 0 or x is NaN, else 0 (NaN stays NaN, as in
        // the interpreter, PyTorch and JAX).
        UnaryFn::Relu => {
            let kept = b.ins().fcmp(FloatCC::UnorderedOrGreaterThan, x, zero);
            keep_where(b, kept, x, zero)
        }
        UnaryFn::Exp => approx::exp(b, x),
        UnaryFn::Log => approx::log(b, x),
        UnaryFn::Tanh => approx::tanh(b, x),
        UnaryFn::Sigmoid => approx::sigmoid(b, x),
        UnaryFn::Gelu => approx::gelu(b, x),
        UnaryFn::Erf => approx::erf(b, x),
        UnaryFn::Softplus => approx::softplus(b, x),
        UnaryFn::Sin => call(b, calls, "gradc_sin", &[x])?,
        UnaryFn::Cos => call(b, calls, "gradc_cos", &[x])?,
    })
}

/// `min(max(x, lo), hi)` keeping NaN, as `f64::clamp` does.
pub(super) fn clamp(b: &mut FunctionBuilder<'_>, x: Value, lo: f64, hi: f64) -> Value {
    let lo = constant(b, x, lo);
    let hi = constant(b, x, hi);
    let below = b.ins().fcmp(FloatCC::LessThan, x, lo);
    let raised = pick(b, below, lo, x);
    let above = b.ins().fcmp(FloatCC::GreaterThan, raised, hi);
    pick(b, above, hi, raised)
}

/// How an elementwise kernel reaches its buffers, decided from the static
/// shapes (`layout`).
pub(super) struct Layout {
    /// The loop's shape: that of any elementwise node, else of the operand
    /// of the closing sum.
    pub(super) loop_shape: Option<Shape>,
    /// How the loop reaches each buffer (inputs, then outputs).
    pub(super) access: Vec<Access>,
    /// The static last axis, when the kernel loops over rows and columns.
    pub(super) cols: Option<usize>,
    /// The shape each input is read as.
    pub(super) read_shapes: Vec<Shape>,
    /// How each buffer stores its elements (inputs, then outputs).
    pub(super) elems: Vec<Elem>,
}

/// The layout of an elementwise kernel computing `nodes`, reading
/// `inputs` (stored as `input_elems`) and writing `outputs`: inputs of the
/// loop's shape are full, one-element ones single, others strided; a sum
/// output single or strided, the others full. When every broadcast buffer
/// is a row of the loop's static last axis, the kernel loops over rows
/// and columns instead (`Access::Row`). Outputs are stored by their type,
/// but a sum accumulated in place in `f64`.
pub(super) fn layout(
    graph: &Graph,
    nodes: &[NodeId],
    inputs: &[NodeId],
    input_elems: &[Elem],
    outputs: &[NodeId],
) -> Result<Layout, CodegenError> {
    let loop_shape = nodes
        .iter()
        .find(|&&id| !is_sum(graph, id))
        .map(|&id| graph.node(id).shape())
        .or_else(|| {
            let sum = nodes.first()?;
            Some(graph.node(*graph.operands(*sum).first()?).shape())
        });
    let single = |id: NodeId| graph.node(id).shape().0.iter().all(|d| d.is_one());
    let read_shapes: Vec<Shape> = inputs
        .iter()
        .map(|&i| graph.node(i).shape().clone())
        .collect();
    let mut access: Vec<Access> = Vec::new();
    for shape in &read_shapes {
        access.push(if Some(shape) == loop_shape {
            Access::Full
        } else if shape.0.iter().all(|d| d.is_one()) {
            Access::Single
        } else {
            Access::Strided
        });
    }
    for &output in outputs {
        let per_unit = matches!(graph.node(output).op, Op::DeadFraction);
        access.push(match (is_sum(graph, output), single(output) && !per_unit) {
            (false, _) => Access::Full,
            (true, true) => Access::Single,
            (true, false) => Access::Strided,
        });
    }
    let cols = loop_shape.and_then(|shape| match shape.0.last() {
        Some(Dim::Fixed(c)) if shape.rank() >= 2 => usize::try_from(*c).ok(),
        _ => None,
    });
    let buffers: Vec<NodeId> = inputs.iter().chain(outputs).copied().collect();
    let row_like = |j: usize| {
        let (Some(shape), Some(cols)) = (loop_shape, cols) else {
            return false;
        };
        let broadcast = match read_shapes.get(j) {
            Some(read) => Some(read.0.clone()),
            None => output_shape(graph, buffers[j], shape),
        };
        broadcast.is_some_and(|b| is_row(&b, cols))
    };
    let rows_and_cols = cols.is_some()
        && access
            .iter()
            .enumerate()
            .all(|(j, &a)| a != Access::Strided || row_like(j))
        && access.contains(&Access::Strided);
    if rows_and_cols {
        for a in &mut access {
            if *a == Access::Strided {
                *a = Access::Row;
            }
        }
    }
    let cols = if rows_and_cols { cols } else { None };
    if input_elems.len() != inputs.len() {
        return Err(CodegenError("an element type per input expected".into()));
    }
    let mut elems = input_elems.to_vec();
    for (o, &output) in outputs.iter().enumerate() {
        elems.push(match access[inputs.len() + o] {
            Access::Full | Access::Single => Elem::of(graph.node(output).dtype()),
            Access::Strided | Access::Row => Elem::F64,
        });
    }
    Ok(Layout {
        loop_shape: loop_shape.cloned(),
        access,
        cols,
        read_shapes,
        elems,
    })
}

/// The element count of a loop shape if all its axes are static, and the
/// product of its static axes (every count is a multiple of it).
pub(super) fn static_counts(loop_shape: Option<&Shape>) -> (Option<u64>, u64) {
    let static_count = loop_shape.and_then(|shape| {
        shape.0.iter().try_fold(1u64, |count, d| match d {
            Dim::Fixed(size) => count.checked_mul(*size),
            Dim::Sym(_) => None,
        })
    });
    let factor = loop_shape.map_or(1, |shape| {
        shape.0.iter().fold(1u64, |product, d| match d {
            Dim::Fixed(size) => product.saturating_mul(*size).max(1),
            Dim::Sym(_) => product,
        })
    });
    (static_count, factor)
}

/// What an elementwise kernel loads before its loops: each buffer's
/// address, the broadcast factors of its strided buffers, the run's seed
/// and step, and the zeros.
pub(super) struct Prelude {
    pub(super) bases: Vec<Value>,
    /// Each strided buffer's index and its `k` and `m`.
    pub(super) factors: Vec<(usize, Value, Value)>,
    pub(super) seed: Value,
    pub(super) step: Value,
    /// The integer and `f64` zeros.
    pub(super) zero: Value,
    pub(super) zero_f64: Value,
}

impl Prelude {
    /// Emits the loads (loop-invariant, hoisted by hand: Cranelift does
    /// not) from the kernel's parameters `ptrs`, `ks`, `ms` and `context`.
    pub(super) fn load(
        b: &mut FunctionBuilder<'_>,
        access: &[Access],
        (ptrs, ks, ms, context): (Value, Value, Value, Value),
    ) -> Prelude {
        let pointer = types::I64;
        let flags = MemFlagsData::trusted();
        let mut bases = Vec::new();
        for j in 0..access.len() {
            bases.push(b.ins().load(pointer, flags, ptrs, (8 * j) as i32));
        }
        // A strided buffer is read at (i / k) % m without dividing: two
        // counters, `within` (i % k) and `index` ((i / k) % m), are
        // carried around the loop and wrap at k and m.
        let mut factors = Vec::new();
        for (j, &a) in access.iter().enumerate() {
            if a == Access::Strided {
                let k = b.ins().load(pointer, flags, ks, (8 * j) as i32);
                let m = b.ins().load(pointer, flags, ms, (8 * j) as i32);
                factors.push((j, k, m));
            }
        }
        // The run's seed and step, for dropout masks.
        let seed = b.ins().load(pointer, flags, context, 0);
        let step = b.ins().load(pointer, flags, context, 8);
        let zero = b.ins().iconst(pointer, 0);
        let zero_f64 = b.ins().f64const(0.0);
        Prelude {
            bases,
            factors,
            seed,
            step,
            zero,
            zero_f64,
        }
    }

    /// The slots of buffer `j`, a strided or row sum: `m`, or the static
    /// row size `cols`.
    fn sum_slots(
        &self,
        b: &mut FunctionBuilder<'_>,
        access: &[Access],
        cols: Option<usize>,
        j: usize,
    ) -> Value {
        match (access[j], cols) {
            (Access::Row, Some(cols)) => b.ins().iconst(types::I64, cols as i64),
            _ => self
                .factors
                .iter()
                .find(|f| f.0 == j)
                .map_or(self.zero, |f| f.2),
        }
    }

    /// Zeroes the slots of every strided or row sum (among the outputs,
    /// from buffer `first_output` on), which the loops accumulate into.
    pub(super) fn zero_sums(
        &self,
        b: &mut FunctionBuilder<'_>,
        access: &[Access],
        first_output: usize,
        cols: Option<usize>,
    ) -> Result<(), CodegenError> {
        let flags = MemFlagsData::trusted();
        for j in first_output..access.len() {
            if matches!(access[j], Access::Strided | Access::Row) {
                let m = self.sum_slots(b, access, cols, j);
                counted_loop(b, m, &[], |b, slot, _| {
                    let at = element_at(b, Elem::F64, self.bases[j], slot);
                    b.ins().store(flags, self.zero_f64, at, 0);
                    Ok(vec![])
                })?;
            }
        }
        Ok(())
    }
}

impl Body<'_> {
    /// Finishes every sum after the loops as the interpreter does (`n` the
    /// element count, `totals` the single sums' running totals): a mean
    /// divides by its count, a zero fraction by `n`, a dead fraction
    /// counts the units no row reached; an `f32` result is rounded once.
    pub(super) fn finish_sums(
        &self,
        b: &mut FunctionBuilder<'_>,
        prelude: &Prelude,
        (n, cols): (Value, Option<usize>),
        totals: &[Value],
    ) -> Result<(), CodegenError> {
        let (graph, access, inputs) = (self.graph, self.access, self.inputs);
        let (zero, zero_f64) = (prelude.zero, prelude.zero_f64);
        let flags = MemFlagsData::trusted();
        let sums = access[inputs.len()..].iter().any(|&a| a != Access::Full);
        let one = if sums {
            b.ins().iconst(types::I64, 1)
        } else {
            zero
        };
        let count_per = |b: &mut FunctionBuilder<'_>, groups: Value| {
            let groups = b.ins().umax(groups, one);
            let count = b.ins().udiv(n, groups);
            let count = b.ins().umax(count, one);
            b.ins().fcvt_from_uint(types::F64, count)
        };
        for (o, &output) in self.outputs.iter().enumerate() {
            let j = inputs.len() + o;
            let op = &graph.node(output).op;
            let mean = divides_by_count(op);
            let base = self.bases[j];
            match access[j] {
                Access::Full => {}
                Access::Single => {
                    let slot = self.single_sums.iter().position(|&s| s == j).unwrap_or(0);
                    let mut value = totals[slot];
                    if mean {
                        let count = count_per(b, one);
                        value = b.ins().fdiv(value, count);
                    }
                    let value = round(b, graph, output, value);
                    store(b, self.elems[j], value, base);
                }
                Access::Strided | Access::Row => {
                    let m = prelude.sum_slots(b, access, cols, j);
                    if matches!(op, Op::DeadFraction) {
                        let units = b.ins().fcvt_from_uint(types::F64, m);
                        let one_f64 = b.ins().f64const(1.0);
                        let dead = counted_loop(b, m, &[zero_f64], |b, slot, carried| {
                            let at = element_at(b, Elem::F64, base, slot);
                            let reached = b.ins().load(types::F64, flags, at, 0);
                            let none = b.ins().fcmp(FloatCC::Equal, reached, zero_f64);
                            let add = b.ins().select(none, one_f64, zero_f64);
                            Ok(vec![b.ins().fadd(carried[0], add)])
                        })?[0];
                        let fraction = b.ins().fdiv(dead, units);
                        let empty = b.ins().icmp(IntCC::Equal, n, zero);
                        let fraction = b.ins().select(empty, zero_f64, fraction);
                        let fraction = round(b, graph, output, fraction);
                        b.ins().store(flags, fraction, base, 0);
                    } else if mean || graph.node(output).dtype() == DType::F32 {
                        let count = count_per(b, m);
                        counted_loop(b, m, &[], |b, slot, _| {
                            let at = element_at(b, Elem::F64, base, slot);
                            let mut value = b.ins().load(types::F64, flags, at, 0);
                            if mean {
                                value = b.ins().fdiv(value, count);
                            }
                            let value = round(b, graph, output, value);
                            b.ins().store(flags, value, at, 0);
                            Ok(vec![])
                        })?;
                    }
                }
            }
        }
        Ok(())
    }
}
