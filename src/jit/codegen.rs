//! Cranelift code generation, and the one place in gradc that uses
//! `unsafe`: the step entry and its frame, the host trampoline, and the
//! `gemm` crate's GEMM behind a bounds-checked safe wrapper (`gemm`).
//!
//! An elementwise kernel is a function `fn(ptrs, ks, ms, n, context)` that
//! loops `i` over `0..n` (the kernel's loop shape, bound per frame). How it
//! reaches each buffer is fixed by the static shapes (`Access`): a full
//! operand at `i`, a single element at 0, a strided operand (NumPy
//! broadcasting of one block of axes: a bias row, a `[B, 1]` column) at
//! `(i / ks[j]) % ms[j]` by counters that wrap. Without strided buffers a
//! vector loop of `f64x2` runs first and the scalar loop finishes the tail.
//! Buffers of `f32` values hold `f32`s (`Elem`), half the bytes; kernels
//! widen what they load and compute in `f64` like the interpreter, and
//! every op of an `f32` node is rounded to `f32` as the interpreter does, so compiled
//! kernels give bit-identical results (but for `exp`, `sigmoid` and the
//! other polynomials from `approx`, within a few ulps, and sums added in
//! another order: lanes, `f32` blocks). Row kernels come from `rows`.
//!
//! A `Frame` binds a program to one set of sizes: its buffers (never
//! resized), its calls with every length checked when pushed, and a step
//! entry compiled for it (`CodeCache::compile_entry`) that makes the calls
//! in order, handing host work to Rust through `gradc_host`.
#![allow(
    unsafe_code,
    reason = "JIT-compiled code, its host trampoline and the raw-pointer GEMM; see the SAFETY comments"
)]

use std::cell::Cell;
use std::collections::{BTreeMap, HashMap};
use std::mem::ManuallyDrop;
use std::rc::Rc;

use cranelift_codegen::ir::condcodes::{CondCode, FloatCC, IntCC};
use cranelift_codegen::ir::{
    AbiParam, Block, BlockArg, Endianness, FuncRef, InstBuilder, MemFlagsData, Signature,
    StackSlotData, StackSlotKind, UserFuncName, Value, types,
};
use cranelift_codegen::isa::CallConv;
use cranelift_codegen::settings::{self, Configurable};
use cranelift_codegen::{Context, ir::Function};
use cranelift_frontend::{FunctionBuilder, FunctionBuilderContext};
use cranelift_jit::{JITBuilder, JITModule};
use cranelift_module::{FuncId, Linkage, Module, default_libcall_names};

use super::approx;
use super::rows::{self, RowOp};
use crate::interp::{InterpError, kernels};
use crate::ir::{BinaryFn, DType, Dim, Graph, NodeId, Op, ReduceFn, Shape, UnaryFn};

/// Why code could not be generated (a compiler bug or an unsupported host).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CodegenError(pub String);

impl std::fmt::Display for CodegenError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "code generation failed: {}", self.0)
    }
}

impl std::error::Error for CodegenError {}

/// Whether a node is a sum the code generator can end a kernel with:
/// `sum` or `mean` over some axes (the division by the count follows the
/// call, as in the interpreter), the `sum_to` of broadcasting, or a
/// monitor's count: `zero_fraction` (a count of zeros, divided after the
/// call) and `dead_fraction` (a count of nonzero rows per unit, turned into
/// the fraction of units with none after the call); or `mse`, a mean of
/// squared differences.
pub fn is_sum(graph: &Graph, id: NodeId) -> bool {
    matches!(
        graph.node(id).op,
        Op::Reduce {
            func: ReduceFn::Sum | ReduceFn::Mean,
            ..
        } | Op::SumTo
            | Op::ZeroFraction
            | Op::DeadFraction
            | Op::Mse
            | Op::BceWithLogits
    ) && graph.node(id).dtype() != DType::I32
        && graph.node(graph.operands(id)[0]).dtype() != DType::I32
}

/// What a closing sum adds for one element, from its operands' `values`.
/// (`zero` gives the lanes' type: a constant operand, such as a gradient
/// that folded to one, is made from it.)
fn summand(
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
pub fn supported(graph: &Graph, id: NodeId) -> bool {
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
extern "C" fn gradc_log(x: f64) -> f64 {
    kernels::unary(UnaryFn::Log, x)
}
extern "C" fn gradc_sin(x: f64) -> f64 {
    kernels::unary(UnaryFn::Sin, x)
}
extern "C" fn gradc_cos(x: f64) -> f64 {
    kernels::unary(UnaryFn::Cos, x)
}
extern "C" fn gradc_pow(a: f64, b: f64) -> f64 {
    kernels::binary(BinaryFn::Pow, a, b)
}

/// Dropout's scale of element `index`: 0 where it is dropped, else
/// `1 / (1 - p)`; the same counter-based draw as the interpreter's.
extern "C" fn gradc_dropout_scale(p: f64, key: i64, seed: i64, step: i64, index: i64) -> f64 {
    // The integers arrive as the bits of the interpreter's unsigned values.
    let draw = crate::random::uniform_at(seed as u64, step as u64, key as u32, index as u64);
    if draw < p { 0.0 } else { 1.0 / (1.0 - p) }
}

/// The functions compiled code may call: name, address, arity.
fn runtime_functions() -> Vec<(&'static str, *const u8, usize)> {
    vec![
        ("gradc_log", gradc_log as *const u8, 1),
        ("gradc_sin", gradc_sin as *const u8, 1),
        ("gradc_cos", gradc_cos as *const u8, 1),
        ("gradc_pow", gradc_pow as *const u8, 2),
    ]
}

/// Declares `gradc_dropout_scale(f64, i64, i64, i64, i64) -> f64`.
fn builder_free_dropout(
    module: &mut JITModule,
    imports: &mut BTreeMap<&'static str, FuncId>,
) -> Result<(), CodegenError> {
    let mut signature = Signature::new(CallConv::SystemV);
    signature.params.push(AbiParam::new(types::F64));
    for _ in 0..4 {
        signature.params.push(AbiParam::new(types::I64));
    }
    signature.returns.push(AbiParam::new(types::F64));
    let id = module
        .declare_function("gradc_dropout_scale", Linkage::Import, &signature)
        .map_err(|e| CodegenError(e.to_string()))?;
    imports.insert("gradc_dropout_scale", id);
    Ok(())
}

/// Where in the loop and run an element is: what a dropout mask depends on.
#[derive(Clone, Copy)]
struct Place {
    index: Value,
    seed: Value,
    step: Value,
    /// The constant `0.0`, made once per kernel.
    zero: Value,
}

/// Dropout's scale of the current element (of each lane's element, for a
/// vector of elements `index, index + 1`).
fn dropout_scale(
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

/// How many lanes a value has: 2 for `f64x2`, 4 for `f32x4`, else 1.
fn lanes(b: &FunctionBuilder<'_>, value: Value) -> u8 {
    b.func.dfg.value_type(value).lane_count() as u8
}

/// A constant with the type of `like`: `f64`, `f64x2`, or `f32x4` (only
/// in the `f32x4` loops of kernels whose constants are all exact in
/// `f32`, `f32_exact`).
pub(super) fn constant(b: &mut FunctionBuilder<'_>, like: Value, c: f64) -> Value {
    match b.func.dfg.value_type(like) {
        types::F32X4 => {
            let scalar = b.ins().f32const(c as f32);
            b.ins().splat(types::F32X4, scalar)
        }
        ty if ty.is_vector() => {
            let scalar = b.ins().f64const(c);
            b.ins().splat(types::F64X2, scalar)
        }
        _ => b.ins().f64const(c),
    }
}

/// A loop header's test: on to `body` while `test` (a comparison and its
/// operands) holds, else to `exit` with its arguments.
///
/// The exit is the branch's first successor on purpose. Cranelift's
/// elaboration (0.135) hoists loop-invariant values out of the loops on a
/// stack that it pops when it enters a block outside the innermost loop and
/// never restores when its walk of the dominator tree comes back; with the
/// body first, the walk entered a loop's exit before its body, the stack
/// was empty there, and nothing was hoisted (a division per element in the
/// cross-entropy gradient's loop; `tests/jit.rs` checks the hoisting).
pub(super) fn loop_branch(
    b: &mut FunctionBuilder<'_>,
    (condition, x, y): (IntCC, Value, Value),
    body: Block,
    (exit, exit_args): (Block, &[BlockArg]),
) {
    let finished = b.ins().icmp(condition.complement(), x, y);
    b.ins().brif(finished, exit, exit_args, body, &[]);
}

/// `x` where `condition` holds, else `y` (per lane for vectors, whose
/// comparison masks are all-ones or all-zeros per lane).
pub(super) fn pick(b: &mut FunctionBuilder<'_>, condition: Value, x: Value, y: Value) -> Value {
    let ty = b.func.dfg.value_type(x);
    if ty.is_vector() {
        let mask = b.ins().bitcast(ty, MemFlagsData::new(), condition);
        b.ins().bitselect(mask, x, y)
    } else {
        b.ins().select(condition, x, y)
    }
}

/// `x` where `condition` holds, else `zero` (`+0.0`): for vectors the lane
/// mask and'ed with `x` (one instruction, where `pick` takes three; `+0.0`
/// is all zero bits).
fn keep_where(b: &mut FunctionBuilder<'_>, condition: Value, x: Value, zero: Value) -> Value {
    let ty = b.func.dfg.value_type(x);
    if ty.is_vector() {
        let mask = b.ins().bitcast(ty, MemFlagsData::new(), condition);
        b.ins().band(mask, x)
    } else {
        b.ins().select(condition, x, zero)
    }
}

/// One value from per-lane scalars: the scalar itself, or an `f64x2`.
fn gather(b: &mut FunctionBuilder<'_>, scalars: &[Value]) -> Value {
    match scalars {
        [one] => *one,
        _ => {
            let mut vector = b.ins().scalar_to_vector(types::F64X2, scalars[0]);
            for (lane, &scalar) in scalars.iter().enumerate().skip(1) {
                vector = b.ins().insertlane(vector, scalar, lane as u8);
            }
            vector
        }
    }
}

/// The runtime functions one kernel calls, declared in it on first use (so
/// its CLIF lists only those).
pub(super) struct Calls<'a> {
    module: &'a mut JITModule,
    imports: &'a BTreeMap<&'static str, FuncId>,
    declared: HashMap<&'static str, FuncRef>,
}

/// Calls a runtime function and returns its result.
pub(super) fn call(
    b: &mut FunctionBuilder<'_>,
    calls: &mut Calls<'_>,
    name: &str,
    arguments: &[Value],
) -> Result<Value, CodegenError> {
    let (&name, &id) = calls
        .imports
        .get_key_value(name)
        .ok_or_else(|| CodegenError(format!("no runtime function `{name}`")))?;
    let function = match calls.declared.get(name) {
        Some(&function) => function,
        None => {
            let function = calls.module.declare_func_in_func(id, b.func);
            calls.declared.insert(name, function);
            function
        }
    };
    // A vector argument calls the scalar function once per lane.
    let width = arguments.iter().map(|&a| lanes(b, a)).max().unwrap_or(1);
    let mut results = Vec::new();
    for lane in 0..width {
        let scalars: Vec<Value> = arguments
            .iter()
            .map(|&a| {
                if lanes(b, a) > 1 {
                    b.ins().extractlane(a, lane)
                } else {
                    a
                }
            })
            .collect();
        let instruction = b.ins().call(function, &scalars);
        results.push(b.inst_results(instruction)[0]);
    }
    Ok(gather(b, &results))
}

/// A compiled kernel: its entry point and what to pass it.
pub struct CompiledKernel {
    func: FuncId,
    /// Values read, in argument order (before the outputs).
    pub inputs: Vec<NodeId>,
    /// Values written, in argument order (after the inputs).
    pub outputs: Vec<NodeId>,
    /// Which outputs are sums, accumulated at `(i / k) % m` (the others are
    /// written at `i`).
    pub sums: Vec<bool>,
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
pub enum Access {
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

/// A compiled row kernel (`jit::rows`): a loop over the rows of a
/// `rows x cols` operand.
pub struct RowKernel {
    func: FuncId,
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

/// A step entry: `fn(words, state, context) -> status` (see `Frame::run`).
type EntryFn = extern "C" fn(*const i64, *mut HostState<'static>, *const i64) -> i64;

/// How a buffer stores its elements: an `f32` value as `f32` (half the
/// bytes), everything else (`f64`, `i32` labels and indices) as `f64`. A
/// sum a kernel accumulates in place is `f64` whatever its type, so that it
/// sums in `f64` as the interpreter does and is rounded once at the end.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Elem {
    /// Four bytes per element.
    F32,
    /// Eight bytes per element.
    F64,
}

impl Elem {
    /// How a value of this type is stored when nothing else decides.
    pub fn of(dtype: DType) -> Elem {
        match dtype {
            DType::F32 => Elem::F32,
            DType::F64 | DType::I32 => Elem::F64,
        }
    }

    /// Bytes per element.
    pub fn bytes(self) -> i64 {
        match self {
            Elem::F32 => 4,
            Elem::F64 => 8,
        }
    }
}

/// The flags of a buffer access: in bounds (checked when the call was
/// pushed), and aligned to the element, but a pair of elements is aligned
/// only to one of them.
fn access_flags(vector: bool) -> MemFlagsData {
    if vector {
        MemFlagsData::new().with_notrap()
    } else {
        MemFlagsData::trusted()
    }
}

/// Loads one element at `at` as an `f64` (two, as an `f64x2`, when
/// `vector`); an `f32` element is widened exactly.
pub(super) fn load(b: &mut FunctionBuilder<'_>, elem: Elem, vector: bool, at: Value) -> Value {
    let flags = access_flags(vector);
    match (elem, vector) {
        (Elem::F64, false) => b.ins().load(types::F64, flags, at, 0),
        (Elem::F64, true) => b.ins().load(types::F64X2, flags, at, 0),
        (Elem::F32, false) => {
            let narrow = b.ins().load(types::F32, flags, at, 0);
            b.ins().fpromote(types::F64, narrow)
        }
        (Elem::F32, true) => {
            // Both f32s as one 64-bit word in lanes 0 and 1, then widened.
            let word = b.ins().load(types::I64, flags, at, 0);
            let words = b.ins().scalar_to_vector(types::I64X2, word);
            let little = MemFlagsData::new().with_endianness(Endianness::Little);
            let narrow = b.ins().bitcast(types::F32X4, little, words);
            b.ins().fvpromote_low(narrow)
        }
    }
}

/// Stores an `f64` (or an `f64x2`'s two lanes) at `at`; for an `f32`
/// buffer the value is narrowed (it holds an `f32` value already: the
/// kernels round every `f32` op).
pub(super) fn store(b: &mut FunctionBuilder<'_>, elem: Elem, value: Value, at: Value) {
    let vector = lanes(b, value) > 1;
    let flags = access_flags(vector);
    if b.func.dfg.value_type(value) == types::F32X4 {
        // Four `f32`s, as they are.
        b.ins().store(flags, value, at, 0);
        return;
    }
    // A value just widened from `f32` (an `f32` op's rounding) is stored
    // as the `f32` it was widened from: the same bits, two conversions
    // fewer.
    let widened_from = match b.func.dfg.value_def(value) {
        cranelift_codegen::ir::ValueDef::Result(inst, 0)
            if matches!(
                b.func.dfg.insts[inst].opcode(),
                cranelift_codegen::ir::Opcode::Fpromote
                    | cranelift_codegen::ir::Opcode::FvpromoteLow
            ) =>
        {
            b.func.dfg.inst_args(inst).first().copied()
        }
        _ => None,
    };
    match (elem, vector, widened_from) {
        (Elem::F32, false, Some(narrow)) => {
            b.ins().store(flags, narrow, at, 0);
            return;
        }
        (Elem::F32, true, Some(narrow)) => {
            let little = MemFlagsData::new().with_endianness(Endianness::Little);
            let words = b.ins().bitcast(types::I64X2, little, narrow);
            let word = b.ins().extractlane(words, 0);
            b.ins().store(flags, word, at, 0);
            return;
        }
        _ => {}
    }
    match (elem, vector) {
        (Elem::F64, _) => {
            b.ins().store(flags, value, at, 0);
        }
        (Elem::F32, false) => {
            let narrow = b.ins().fdemote(types::F32, value);
            b.ins().store(flags, narrow, at, 0);
        }
        (Elem::F32, true) => {
            // Narrowed into lanes 0 and 1, stored as one 64-bit word.
            let narrow = b.ins().fvdemote(value);
            let little = MemFlagsData::new().with_endianness(Endianness::Little);
            let words = b.ins().bitcast(types::I64X2, little, narrow);
            let word = b.ins().extractlane(words, 0);
            b.ins().store(flags, word, at, 0);
        }
    }
}

/// The address of element `index` of a buffer of `elem`s at `base`.
pub(super) fn element_at(
    b: &mut FunctionBuilder<'_>,
    elem: Elem,
    base: Value,
    index: Value,
) -> Value {
    // (A shift, not a multiply: Cranelift folds `base + (index << s)`
    // into the address of the load or store.)
    let shift = elem.bytes().trailing_zeros();
    let offset = b.ins().ishl_imm_u(index, i64::from(shift));
    b.ins().iadd(base, offset)
}

/// One buffer of a frame.
pub enum Storage {
    /// `f32` elements.
    F32(Vec<f32>),
    /// `f64` elements.
    F64(Vec<f64>),
}

impl Storage {
    /// Zeroed storage, or an error (not an abort) when the memory cannot
    /// be had.
    fn zeros(length: usize, elem: Elem) -> Result<Storage, std::collections::TryReserveError> {
        fn zeroed<T: Clone + Default>(
            length: usize,
        ) -> Result<Vec<T>, std::collections::TryReserveError> {
            let mut data = Vec::new();
            data.try_reserve_exact(length)?;
            data.resize(length, T::default());
            Ok(data)
        }
        Ok(match elem {
            Elem::F32 => Storage::F32(zeroed(length)?),
            Elem::F64 => Storage::F64(zeroed(length)?),
        })
    }

    fn len(&self) -> usize {
        match self {
            Storage::F32(data) => data.len(),
            Storage::F64(data) => data.len(),
        }
    }

    fn elem(&self) -> Elem {
        match self {
            Storage::F32(_) => Elem::F32,
            Storage::F64(_) => Elem::F64,
        }
    }

    fn as_ptr(&self) -> *const u8 {
        match self {
            Storage::F32(data) => data.as_ptr().cast(),
            Storage::F64(data) => data.as_ptr().cast(),
        }
    }

    /// The first `count` elements (at most all) as `f64`s: borrowed from
    /// an `f64` buffer, widened from an `f32` one.
    fn read(&self, count: usize) -> std::borrow::Cow<'_, [f64]> {
        match self {
            Storage::F64(data) => std::borrow::Cow::Borrowed(&data[..count.min(data.len())]),
            Storage::F32(data) => std::borrow::Cow::Owned(
                data[..count.min(data.len())]
                    .iter()
                    .map(|&v| f64::from(v))
                    .collect(),
            ),
        }
    }

    /// `read` into `out` (replacing what it held, reusing its memory).
    fn read_into(&self, count: usize, out: &mut Vec<f64>) {
        out.clear();
        match self {
            Storage::F64(data) => out.extend_from_slice(&data[..count.min(data.len())]),
            Storage::F32(data) => {
                let from = &data[..count.min(data.len())];
                out.resize(from.len(), 0.0);
                widen_elements(from, out);
            }
        }
    }

    /// Writes `values` into the first elements (narrowed to `f32` for an
    /// `f32` buffer); an error if they do not fit.
    fn write(&mut self, values: &[f64]) -> Result<(), CodegenError> {
        if values.len() > self.len() {
            return Err(CodegenError(format!(
                "{} values for a buffer of {}",
                values.len(),
                self.len()
            )));
        }
        match self {
            Storage::F64(data) => data[..values.len()].copy_from_slice(values),
            Storage::F32(data) => narrow_elements(values, &mut data[..values.len()]),
        }
        Ok(())
    }
}

/// Whether the host has AVX-512F (for the conversions below and
/// `small_products`).
fn avx512() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        static AVX512: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *AVX512.get_or_init(|| std::arch::is_x86_feature_detected!("avx512f"))
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// `to[i] = from[i] as f32` (rounded to nearest): the leaves copied into
/// `f32` buffers every step.
fn narrow_elements(from: &[f64], to: &mut [f32]) {
    convert(from, to, |v| v as f32);
}

/// `to[i] = f64::from(from[i])` (exact): values copied out of `f32`
/// buffers every step.
fn widen_elements(from: &[f32], to: &mut [f64]) {
    convert(from, to, f64::from);
}

/// `to[i] = convert(from[i])`, eight at a time where the host has AVX-512
/// (the same loop, compiled for it).
fn convert<A: Copy, B>(from: &[A], to: &mut [B], convert: impl Fn(A) -> B) {
    #[cfg(target_arch = "x86_64")]
    if avx512() {
        // SAFETY: AVX-512F is present; the function only converts, in
        // bounds (the slices' own iteration).
        unsafe { convert_avx512(from, to, convert) };
        return;
    }
    for (to, &from) in to.iter_mut().zip(from) {
        *to = convert(from);
    }
}

/// `convert`, compiled for AVX-512 (the compiler vectorizes the loop).
///
/// # Safety
/// AVX-512F must be present.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn convert_avx512<A: Copy, B>(from: &[A], to: &mut [B], convert: impl Fn(A) -> B) {
    for (to, &from) in to.iter_mut().zip(from) {
        *to = convert(from);
    }
}

/// An element type a frame's buffers can hold, for host work that reads
/// and writes them in place (the GEMM).
pub trait Stored: Sized {
    /// The buffer's elements, if it holds this type.
    fn elements(storage: &Storage) -> Option<&[Self]>;
    /// The buffer's elements, writable, if it holds this type.
    fn elements_mut(storage: &mut Storage) -> Option<&mut [Self]>;
}

impl Stored for f32 {
    fn elements(storage: &Storage) -> Option<&[f32]> {
        match storage {
            Storage::F32(data) => Some(data),
            Storage::F64(_) => None,
        }
    }
    fn elements_mut(storage: &mut Storage) -> Option<&mut [f32]> {
        match storage {
            Storage::F32(data) => Some(data),
            Storage::F64(_) => None,
        }
    }
}

impl Stored for f64 {
    fn elements(storage: &Storage) -> Option<&[f64]> {
        match storage {
            Storage::F64(data) => Some(data),
            Storage::F32(_) => None,
        }
    }
    fn elements_mut(storage: &mut Storage) -> Option<&mut [f64]> {
        match storage {
            Storage::F64(data) => Some(data),
            Storage::F32(_) => None,
        }
    }
}

/// Work the step entry hands back to Rust between compiled kernels: the
/// matrix products (on the GEMM), the kernels that are not compiled (on the
/// interpreter), the checks of labels. `index` is what `Frame::push_host`
/// was given.
pub trait Host {
    /// Does host work `index` on the frame's buffers.
    fn call(&mut self, index: usize, buffers: &mut Buffers<'_>) -> Result<(), InterpError>;
}

/// The frame's buffers as host work sees them: their elements can be read
/// and written, but no buffer can be resized or replaced, since compiled
/// code holds their addresses.
pub struct Buffers<'a>(&'a mut [Storage]);

impl Buffers<'_> {
    /// How buffer `slot` stores its elements.
    pub fn elem(&self, slot: usize) -> Elem {
        self.0[slot].elem()
    }

    /// The first `count` elements of buffer `slot` as `f64`s.
    pub fn read(&self, slot: usize, count: usize) -> std::borrow::Cow<'_, [f64]> {
        self.0[slot].read(count)
    }

    /// Writes `values` into the first elements of buffer `slot`.
    pub fn write(&mut self, slot: usize, values: &[f64]) -> Result<(), CodegenError> {
        self.0[slot].write(values)
    }

    /// Exchanges buffers `a` and `b`, which store their elements the same
    /// way and have the same length (a value carried to the next step
    /// becomes its leaf without a copy). Compiled code stays in bounds:
    /// every call was checked against the lengths, which do not change,
    /// and the entry takes the buffers' addresses afresh on every run.
    pub fn swap(&mut self, a: usize, b: usize) -> Result<(), CodegenError> {
        let fits = match (self.0.get(a), self.0.get(b)) {
            (Some(x), Some(y)) => x.len() == y.len() && x.elem() == y.elem(),
            _ => false,
        };
        if !fits {
            return Err(CodegenError(format!(
                "buffers {a} and {b} differ in length or element type"
            )));
        }
        self.0.swap(a, b);
        Ok(())
    }

    /// Buffer `slot`'s elements, if it holds `T`s.
    pub fn elements<T: Stored>(&self, slot: usize) -> Option<&[T]> {
        T::elements(&self.0[slot])
    }

    /// Calls `f` with the buffers `inputs` to read and the buffer `output`
    /// to write (which must not be among the inputs), all holding `T`s.
    pub fn compute<T: Stored, R, const N: usize>(
        &mut self,
        inputs: [usize; N],
        output: usize,
        f: impl FnOnce([&[T]; N], &mut [T]) -> R,
    ) -> Result<R, CodegenError> {
        if inputs.contains(&output) {
            return Err(CodegenError(format!("buffer {output} is read and written")));
        }
        let wrong = || CodegenError("a buffer holds another element type".into());
        // Moving the storage out keeps its heap allocation where it is.
        let mut out = std::mem::replace(&mut self.0[output], Storage::F64(Vec::new()));
        let result = (|| {
            let mut reads: [&[T]; N] = [&[]; N];
            for (read, &slot) in reads.iter_mut().zip(&inputs) {
                *read = T::elements(&self.0[slot]).ok_or_else(wrong)?;
            }
            let written = T::elements_mut(&mut out).ok_or_else(wrong)?;
            Ok(f(reads, written))
        })();
        self.0[output] = out;
        result
    }
}

/// What the trampoline `gradc_host` reaches through its state pointer.
struct HostState<'a> {
    host: &'a mut dyn Host,
    buffers: *mut [Storage],
    error: Option<InterpError>,
}

/// The one runtime function the step entry calls for host work: runs
/// `Host::call` and returns 0, or 1 with the error kept in the state (a
/// panic in host work becomes an error too: it must not unwind through
/// compiled code).
extern "C" fn gradc_host(state: *mut HostState<'static>, index: i64) -> i64 {
    // SAFETY: the entry passes on the state pointer `Frame::run` gave it,
    // which points at a live `HostState` on `run`'s stack for the whole
    // call; `run` holds no other reference to it while the entry runs.
    let state = unsafe { &mut *state };
    // SAFETY: `buffers` points at the frame's buffers, which `run` borrows
    // mutably for the whole call and does not touch while the entry runs;
    // compiled code is not running while host work does (calls are
    // sequential), so this is the only live reference.
    let buffers = unsafe { &mut *state.buffers };
    let host = &mut *state.host;
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        host.call(index as usize, &mut Buffers(buffers))
    }));
    match result {
        Ok(Ok(())) => 0,
        Ok(Err(error)) => {
            state.error = Some(error);
            1
        }
        Err(_) => {
            state.error = Some(InterpError::Internal(format!("host work {index} panicked")));
            1
        }
    }
}

/// One call of the step entry, with the buffers it is bound to.
enum BoundCall {
    /// A compiled elementwise kernel over `n` elements; `slots` are its
    /// inputs then outputs, read at `(i / k) % m` as `ks`, `ms` say.
    Kernel {
        func: FuncId,
        slots: Vec<usize>,
        ks: Vec<i64>,
        ms: Vec<i64>,
        n: i64,
    },
    /// A row kernel over `rows x cols`; `slots` are its inputs then output.
    Rows {
        func: FuncId,
        slots: Vec<usize>,
        rows: i64,
        cols: i64,
    },
    /// A kernel that moves elements (`Mover`): a copy (`slots` the source
    /// and the destination, `params` the counts, offsets and strides of
    /// `Frame::push_copy`), a gather or a scatter (`slots` the indices, the
    /// rows read and the output, `params` `[n, d, v]` and for a scatter
    /// whether to round to `f32`, `Frame::push_indexed`).
    Copy {
        func: FuncId,
        slots: Vec<usize>,
        params: Vec<i64>,
    },
    /// Host work `index`.
    Host(usize),
}

/// The counts, offsets and strides of a copy kernel's call
/// (`Frame::push_copy`): element `(a, b, c)` of the `counts[0] x counts[1]
/// x counts[2]` block goes from `from.0 + a from.1[0] + b from.1[1] + c
/// from.1[2]` in the source to the same place by `to` in the destination.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CopyBlock {
    /// The block's extent.
    pub counts: [usize; 3],
    /// The source's offset and strides.
    pub from: (usize, [usize; 3]),
    /// The destination's offset and strides.
    pub to: (usize, [usize; 3]),
}

/// A program bound to one set of sizes: a buffer per value, allocated once
/// and never resized, the entry's calls with their buffers (every length
/// checked when the call is pushed), and the compiled entry.
#[derive(Default)]
pub struct Frame {
    buffers: Vec<Storage>,
    calls: Vec<BoundCall>,
    entry: Option<EntryFn>,
    /// Scratch rebuilt by every run: the entry's words and each kernel's
    /// pointer array.
    words: Vec<i64>,
    pointers: Vec<Vec<*const u8>>,
    /// Keeps the entry's code (and the kernels it calls) in memory.
    lease: Option<Rc<CodeLease>>,
}

impl Frame {
    /// A frame with zeroed buffers of these lengths and element types, and
    /// no calls.
    /// An allocation that fails is an error naming the bytes asked for.
    pub fn new(buffers: &[(usize, Elem)]) -> Result<Frame, String> {
        let storage = buffers
            .iter()
            .map(|&(length, elem)| {
                Storage::zeros(length, elem).map_err(|_| {
                    let bytes = length as u64 * elem.bytes() as u64;
                    format!(
                        "cannot allocate a frame buffer of {} (the machine has too little memory free)",
                        crate::train::bytes_text(bytes)
                    )
                })
            })
            .collect::<Result<_, _>>()?;
        Ok(Frame {
            buffers: storage,
            ..Frame::default()
        })
    }

    /// The buffers, for binding leaves and reading results.
    pub fn buffers(&mut self) -> Buffers<'_> {
        Buffers(&mut self.buffers)
    }

    /// The first `count` elements of buffer `slot` as `f64`s.
    pub fn read(&self, slot: usize, count: usize) -> std::borrow::Cow<'_, [f64]> {
        self.buffers[slot].read(count)
    }

    /// `read` into `out` (replacing what it held, reusing its memory).
    pub fn read_into(&self, slot: usize, count: usize, out: &mut Vec<f64>) {
        self.buffers[slot].read_into(count, out);
    }

    /// The length and element type of buffer `slot`.
    fn buffer(&self, slot: usize) -> Result<(usize, Elem), CodegenError> {
        self.buffers
            .get(slot)
            .map(|b| (b.len(), b.elem()))
            .ok_or_else(|| CodegenError(format!("no buffer {slot}")))
    }

    /// Appends a call of `kernel` over `n` elements reading and writing
    /// the buffers `slots` (inputs, then outputs) at `(i / ks[j]) %
    /// ms[j]`. Checks, once, everything the kernel's accesses need: the
    /// counts, `k, m >= 1`, a full input holding `n` elements, a single one
    /// `m = 1`, a strided one `m` elements; a non-sum output holding `n`,
    /// a sum `m`; no output aliasing another buffer.
    pub fn push_kernel(
        &mut self,
        kernel: &CompiledKernel,
        slots: Vec<usize>,
        ks: Vec<i64>,
        ms: Vec<i64>,
        n: usize,
    ) -> Result<(), CodegenError> {
        let count = kernel.inputs.len() + kernel.outputs.len();
        if slots.len() != count || ks.len() != count || ms.len() != count {
            return Err(CodegenError("wrong number of buffers".into()));
        }
        for (j, &slot) in slots.iter().enumerate() {
            let (k, m) = (ks[j], ms[j]);
            if k < 1 || m < 1 {
                return Err(CodegenError(format!(
                    "buffer {j}: bad broadcast factors k={k} m={m}"
                )));
            }
            let access = kernel.access[j];
            if access == Access::Single && m != 1 {
                return Err(CodegenError(format!(
                    "buffer {j} is a single element, but m={m}"
                )));
            }
            // A row buffer is read at the column j < cols, in rows of
            // cols elements: its factors must say so.
            if access == Access::Row
                && (k != 1 || Some(m as usize) != kernel.cols || !n.is_multiple_of(m as usize))
            {
                return Err(CodegenError(format!(
                    "buffer {j} is a row of {:?}, but k={k} m={m} n={n}",
                    kernel.cols
                )));
            }
            let needs = match access {
                Access::Full => n,
                Access::Single | Access::Strided | Access::Row => m as usize,
            };
            let (length, elem) = self.buffer(slot)?;
            if elem != kernel.elems[j] {
                return Err(CodegenError(format!(
                    "buffer {j} holds {elem:?}, the kernel reads {:?}",
                    kernel.elems[j]
                )));
            }
            if needs > length {
                return Err(CodegenError(format!(
                    "buffer {j} has {length} elements, the kernel reaches {needs}"
                )));
            }
            let output = j >= kernel.inputs.len();
            if output && slots.iter().filter(|&&s| s == slot).count() > 1 {
                return Err(CodegenError(format!("output buffer {j} aliases another")));
            }
        }
        if kernel
            .multiple_of
            .is_some_and(|multiple| !n.is_multiple_of(multiple))
        {
            return Err(CodegenError(format!(
                "{n} elements, the kernel handles multiples of {:?} only",
                kernel.multiple_of
            )));
        }
        let n = i64::try_from(n).map_err(|_| CodegenError("too many elements".into()))?;
        self.calls.push(BoundCall::Kernel {
            func: kernel.func,
            slots,
            ks,
            ms,
            n,
        });
        Ok(())
    }

    /// Appends a call of a row kernel over `rows x cols` reading and
    /// writing `slots` (inputs, then the outputs), checking that every
    /// buffer holds what `RowOp::lengths` says (and no more is reached) and
    /// that each output is its own buffer. Labels must be checked by host
    /// work pushed before it (the kernel caps them at `cols - 1` anyway).
    pub fn push_rows(
        &mut self,
        kernel: &RowKernel,
        slots: Vec<usize>,
        rows: usize,
        cols: usize,
    ) -> Result<(), CodegenError> {
        let (lengths, outs) = kernel.op.lengths(rows, cols);
        let all = rows.checked_mul(cols).and_then(|n| i64::try_from(n).ok());
        if cols == 0
            || all.is_none()
            || slots.len() != lengths.len() + outs.len()
            || kernel.fixed_cols.is_some_and(|fixed| fixed != cols)
        {
            return Err(CodegenError(format!(
                "row kernel: bad sizes {rows} x {cols}"
            )));
        }
        for (j, &length) in lengths.iter().chain(&outs).enumerate() {
            let (has, elem) = self.buffer(slots[j])?;
            if elem != kernel.elems[j] {
                return Err(CodegenError(format!(
                    "row kernel: buffer {j} holds {elem:?}, the kernel reads {:?}",
                    kernel.elems[j]
                )));
            }
            if has < length {
                return Err(CodegenError(format!(
                    "row kernel: buffer {j} has {has} elements, expected {length}"
                )));
            }
        }
        for (j, output) in slots.iter().enumerate().skip(lengths.len()) {
            if slots[..j].contains(output) {
                return Err(CodegenError(
                    "row kernel: an output aliases another buffer".into(),
                ));
            }
        }
        self.calls.push(BoundCall::Rows {
            func: kernel.func,
            slots,
            rows: rows as i64,
            cols: cols as i64,
        });
        Ok(())
    }

    /// Appends a call of a copy kernel (`Mover::Copy`, for
    /// buffers storing `elem`) copying `block` from buffer `slots[0]` to
    /// buffer `slots[1]`, after checking that both store `elem`, are
    /// distinct, and hold every element the block reaches (an empty block
    /// is no call).
    pub fn push_copy(
        &mut self,
        (func, elem): (FuncId, Elem),
        slots: [usize; 2],
        block: CopyBlock,
    ) -> Result<(), CodegenError> {
        if slots[0] == slots[1] {
            return Err(CodegenError("copy: the source is the destination".into()));
        }
        if block.counts.contains(&0) {
            return Ok(());
        }
        // The last element reached, by checked arithmetic.
        let last = |(offset, strides): (usize, [usize; 3])| {
            block
                .counts
                .iter()
                .zip(strides)
                .try_fold(offset, |at, (&count, stride)| {
                    (count - 1).checked_mul(stride)?.checked_add(at)
                })
        };
        for (slot, reach) in slots.iter().zip([last(block.from), last(block.to)]) {
            let (has, stored) = self.buffer(*slot)?;
            if stored != elem {
                return Err(CodegenError(format!(
                    "copy: buffer {slot} holds {stored:?}, the kernel copies {elem:?}"
                )));
            }
            if reach.is_none_or(|last| last >= has) {
                return Err(CodegenError(format!(
                    "copy: a block reaches past buffer {slot} ({has} elements)"
                )));
            }
        }
        let params = block
            .counts
            .iter()
            .chain([&block.from.0])
            .chain(&block.from.1)
            .chain([&block.to.0])
            .chain(&block.to.1)
            .map(|&v| i64::try_from(v).map_err(|_| CodegenError("copy: too large".into())))
            .collect::<Result<Vec<i64>, _>>()?;
        self.calls.push(BoundCall::Copy {
            func,
            slots: slots.to_vec(),
            params,
        });
        Ok(())
    }

    /// Appends a call of a gather or scatter kernel (`Mover::Gather`,
    /// `Mover::Scatter`, for rows storing `elem`) over the `n` indices in
    /// buffer `slots[0]` (stored as `f64`), rows of `d` and a table of `v`
    /// rows: a gather picks rows of the table `slots[1]` into `slots[2]`
    /// (`n x d`); a scatter adds the `n x d` rows of `slots[1]` into the
    /// table `slots[2]` (stored as `f64`), rounding to `f32` at the end if
    /// `f32`. Checks the buffers' types and lengths and that the output is
    /// its own. The indices must be checked by host work pushed before it
    /// (the kernel caps them at `v - 1` anyway).
    pub fn push_indexed(
        &mut self,
        (func, mover, elem): (FuncId, Mover, Elem),
        slots: [usize; 3],
        [n, d, v]: [usize; 3],
        f32: bool,
    ) -> Result<(), CodegenError> {
        let name = mover.name();
        let (lengths, elems) = match mover {
            Mover::Gather => (
                [Some(n), v.checked_mul(d), n.checked_mul(d)],
                [Elem::F64, elem, elem],
            ),
            Mover::Scatter => (
                [Some(n), n.checked_mul(d), v.checked_mul(d)],
                [Elem::F64, elem, Elem::F64],
            ),
            Mover::Copy => return Err(CodegenError("a copy is bound by `push_copy`".into())),
        };
        for ((&slot, length), want) in slots.iter().zip(lengths).zip(elems) {
            let (has, stored) = self.buffer(slot)?;
            if stored != want {
                return Err(CodegenError(format!(
                    "{name}: buffer {slot} holds {stored:?}, expected {want:?}"
                )));
            }
            if length.is_none_or(|length| has < length) {
                return Err(CodegenError(format!(
                    "{name}: buffer {slot} has {has} elements, too few"
                )));
            }
        }
        if slots[2] == slots[0] || slots[2] == slots[1] {
            return Err(CodegenError(format!("{name}: the output aliases an input")));
        }
        // (A scatter zeroes its output even with no indices.)
        if mover == Mover::Gather && (n == 0 || d == 0) {
            return Ok(());
        }
        if v == 0 && n > 0 {
            return Err(CodegenError(format!("{name}: an empty table")));
        }
        let params = [n, d, v, usize::from(f32)][..mover.params()]
            .iter()
            .map(|&v| i64::try_from(v).map_err(|_| CodegenError(format!("{name}: too large"))))
            .collect::<Result<Vec<i64>, _>>()?;
        self.calls.push(BoundCall::Copy {
            func,
            slots: slots.to_vec(),
            params,
        });
        Ok(())
    }

    /// Appends host work `index` (`Host::call`).
    pub fn push_host(&mut self, index: usize) {
        self.calls.push(BoundCall::Host(index));
    }

    /// Runs the step entry once: every call in order. Host work gets the
    /// buffers through `host`; the first error stops the step.
    pub fn run(
        &mut self,
        host: &mut dyn Host,
        context: crate::interp::Context,
    ) -> Result<(), InterpError> {
        let entry = self
            .entry
            .ok_or_else(|| InterpError::Internal("the frame has no compiled entry".into()))?;
        // The addresses are taken afresh for every run (the buffers never
        // move, but this keeps every pointer derived from the current
        // borrow).
        self.words.clear();
        self.pointers.resize_with(self.calls.len(), Vec::new);
        for (c, call) in self.calls.iter().enumerate() {
            let pointers = &mut self.pointers[c];
            pointers.clear();
            match call {
                BoundCall::Kernel {
                    slots, ks, ms, n, ..
                } => {
                    pointers.extend(slots.iter().map(|&s| self.buffers[s].as_ptr()));
                    self.words.extend([
                        pointers.as_ptr() as i64,
                        ks.as_ptr() as i64,
                        ms.as_ptr() as i64,
                        *n,
                    ]);
                }
                BoundCall::Rows {
                    slots, rows, cols, ..
                } => {
                    pointers.extend(slots.iter().map(|&s| self.buffers[s].as_ptr()));
                    self.words.extend([pointers.as_ptr() as i64, *rows, *cols]);
                }
                BoundCall::Copy { slots, params, .. } => {
                    pointers.extend(slots.iter().map(|&s| self.buffers[s].as_ptr()));
                    self.words
                        .extend([pointers.as_ptr() as i64, params.as_ptr() as i64]);
                }
                BoundCall::Host(_) => {}
            }
        }
        let context: [i64; 2] = [context.seed as i64, context.step as i64];
        let mut state = HostState {
            host,
            buffers: self.buffers.as_mut_slice() as *mut [Storage],
            error: None,
        };
        let state_pointer = (&mut state as *mut HostState<'_>).cast::<HostState<'static>>();
        // SAFETY: `entry` was compiled by `compile_entry` for exactly
        // `self.calls`, and its code memory lives as long as the frame's
        // lease (`CodeLease`). Every call's buffers were checked when it
        // was pushed: a kernel reads and writes only inside the lengths
        // checked then (see `push_kernel`, `push_rows`, `push_copy` and
        // `push_indexed`, and the SAFETY reasoning of the access patterns
        // in `compile`), and the
        // buffers have not been resized since (nothing can: `Buffers` only
        // hands out slices). The words and pointer arrays were rebuilt
        // above from those buffers and live in `self` for the whole call;
        // `ks` and `ms` live in `self.calls`. Host work reaches the buffers
        // only through `state`, while no compiled code runs.
        let status = entry(self.words.as_ptr(), state_pointer, context.as_ptr());
        match (status, state.error) {
            (0, _) => Ok(()),
            (_, Some(error)) => Err(error),
            (status, None) => Err(InterpError::Internal(format!(
                "the step entry failed with status {status}"
            ))),
        }
    }
}

/// A JIT module holding compiled kernels; dropping it frees their code.
pub struct CodeCache {
    /// Taken out only when the cache is dropped (into `lease`).
    module: ManuallyDrop<JITModule>,
    /// Keeps the module's code memory until this cache and every frame
    /// whose entry it compiled are gone.
    lease: Rc<CodeLease>,
    /// The runtime functions, by name: a `BTreeMap`, so every kernel
    /// declares them in the same order and `--stage clif` is deterministic.
    imports: BTreeMap<&'static str, FuncId>,
    next: u32,
    /// The kernels that move elements, once compiled, by what they do
    /// and the element type.
    movers: Vec<((Mover, Elem), FuncId)>,
    /// Which CLIF text of each function to keep (`--stage clif`):
    /// printing it is a tenth of the compile time.
    keep_clif: ClifText,
}

impl Drop for CodeCache {
    fn drop(&mut self) {
        // SAFETY: `module` is not used again: this is the cache's last use
        // of it, and the field is not dropped on its own (`ManuallyDrop`).
        let module = unsafe { ManuallyDrop::take(&mut self.module) };
        // (Freed with the lease, now or when the last frame goes.)
        self.lease.0.set(Some(module));
    }
}

/// The code memory of a `CodeCache`'s module: the cache and every frame
/// whose entry it compiled hold the lease, and the last one to go frees
/// the memory (before, compiled code was never freed).
#[derive(Default)]
struct CodeLease(Cell<Option<JITModule>>);

impl Drop for CodeLease {
    fn drop(&mut self) {
        if let Some(module) = self.0.take() {
            // SAFETY: the only pointers into this memory that are ever
            // called are frames' entries (which call the kernels); each
            // frame holding one also holds this lease, so none is left,
            // and none is running (a running entry's frame is borrowed).
            unsafe { module.free_memory() }
        }
    }
}

/// Which CLIF text a `CodeCache` keeps of each function it compiles.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ClifText {
    /// None (the runtime's programs).
    #[default]
    None,
    /// As gradc built it (`--stage clif`, the snapshots).
    AsBuilt,
    /// As Cranelift's optimizer left it, before instruction selection:
    /// where each value ended up (`tests/jit.rs` checks the hoisting out
    /// of loops on it).
    Optimized,
}

impl CodeCache {
    /// A module for the host ISA (with its native features: FMA, AVX).
    pub fn new(keep_clif: ClifText) -> Result<CodeCache, CodegenError> {
        let mut flags = settings::builder();
        let set = |flags: &mut settings::Builder, k: &str, v: &str| {
            flags.set(k, v).map_err(|e| CodegenError(e.to_string()))
        };
        set(&mut flags, "use_colocated_libcalls", "false")?;
        set(&mut flags, "is_pic", "false")?;
        set(&mut flags, "opt_level", "speed")?;
        // Cranelift's IR verifier runs in debug builds (and so in the
        // tests); release builds skip it, which halves compile time.
        let verify = if cfg!(debug_assertions) {
            "true"
        } else {
            "false"
        };
        set(&mut flags, "enable_verifier", verify)?;
        let isa = cranelift_native::builder()
            .map_err(|e| CodegenError(e.to_string()))?
            .finish(settings::Flags::new(flags))
            .map_err(|e| CodegenError(e.to_string()))?;
        let mut builder = JITBuilder::with_isa(isa, default_libcall_names());
        for (name, address, _) in runtime_functions() {
            builder.symbol(name, address);
        }
        builder.symbol("gradc_dropout_scale", gradc_dropout_scale as *const u8);
        builder.symbol("gradc_host", gradc_host as *const u8);
        let mut module = JITModule::new(builder);
        let mut imports = BTreeMap::new();
        for (name, _, arity) in runtime_functions() {
            let mut signature = Signature::new(CallConv::SystemV);
            for _ in 0..arity {
                signature.params.push(AbiParam::new(types::F64));
            }
            signature.returns.push(AbiParam::new(types::F64));
            let id = module
                .declare_function(name, Linkage::Import, &signature)
                .map_err(|e| CodegenError(e.to_string()))?;
            imports.insert(name, id);
        }
        builder_free_dropout(&mut module, &mut imports)?;
        let mut signature = Signature::new(CallConv::SystemV);
        signature.params.push(AbiParam::new(types::I64));
        signature.params.push(AbiParam::new(types::I64));
        signature.returns.push(AbiParam::new(types::I64));
        let host = module
            .declare_function("gradc_host", Linkage::Import, &signature)
            .map_err(|e| CodegenError(e.to_string()))?;
        imports.insert("gradc_host", host);
        Ok(CodeCache {
            module: ManuallyDrop::new(module),
            lease: Rc::default(),
            imports,
            next: 0,
            movers: Vec::new(),
            keep_clif,
        })
    }

    /// Compiles the nodes of one elementwise kernel (all `supported`, in
    /// order, all of the kernel's loop shape) reading `inputs` and writing
    /// `outputs`; also returns the CLIF text for `--stage clif`.
    pub fn compile(
        &mut self,
        graph: &Graph,
        nodes: &[NodeId],
        inputs: &[NodeId],
        input_elems: &[Elem],
        outputs: &[NodeId],
    ) -> Result<(CompiledKernel, String), CodegenError> {
        // The loop's shape: that of any elementwise node, else of the
        // operand of the closing sum. Inputs of that shape are full.
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
        // When every broadcast buffer is a row of the loop's (static) last
        // axis, the kernel loops over rows and columns instead.
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
        // Inputs as the caller stores them; an output by its type, but a
        // sum accumulated in place in `f64`.
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
        let pointer = types::I64;
        let (id, mut context) = self.declare("kernel", 5, false)?;
        // (Set by `Body::flat` when the kernel relies on it.)
        let mut multiple_of = None;
        let mut builder_context = FunctionBuilderContext::new();
        {
            let mut b = FunctionBuilder::new(&mut context.func, &mut builder_context);
            let entry = b.create_block();
            b.append_block_params_for_function_params(entry);
            b.switch_to_block(entry);
            let params = b.block_params(entry).to_vec();
            let (ptrs, ks, ms, n, context) =
                (params[0], params[1], params[2], params[3], params[4]);
            let flags = MemFlagsData::trusted();
            // Loop-invariant loads, hoisted by hand: Cranelift does not.
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
            // The slots of a strided or row sum: m, or the static row size.
            let slots = |b: &mut FunctionBuilder<'_>, j: usize| match (access[j], cols) {
                (Access::Row, Some(cols)) => b.ins().iconst(pointer, cols as i64),
                _ => factors.iter().find(|f| f.0 == j).map_or(zero, |f| f.2),
            };
            // A strided or row sum accumulates into its slots: zero them
            // first.
            for j in inputs.len()..access.len() {
                if matches!(access[j], Access::Strided | Access::Row) {
                    let m = slots(&mut b, j);
                    rows::counted_loop(&mut b, m, &[], |b, slot, _| {
                        let at = element_at(b, Elem::F64, bases[j], slot);
                        b.ins().store(flags, zero_f64, at, 0);
                        Ok(vec![])
                    })?;
                }
            }
            // The running total of each sum to a single element is kept in
            // a register through the loops and stored after them, in the
            // same order.
            let single_sums: Vec<usize> = (inputs.len()..access.len())
                .filter(|&j| access[j] == Access::Single)
                .collect();
            let mut calls = Calls {
                module: &mut self.module,
                imports: &self.imports,
                declared: HashMap::new(),
            };
            // Whether the vector loops take four `f32`s at a time.
            let quad = f32_exact(graph, nodes, &elems[..inputs.len()], outputs);
            // A single-element input is loaded once, before the loops (no
            // kernel writes its inputs), as a scalar, a pair, and (for
            // `f32x4` loops) four `f32`s.
            let singles: Vec<Option<Single>> = (0..inputs.len())
                .map(|j| {
                    (access[j] == Access::Single).then(|| {
                        let scalar = load(&mut b, elems[j], false, bases[j]);
                        let pair = b.ins().splat(types::F64X2, scalar);
                        let quad = (quad && elems[j] == Elem::F32).then(|| {
                            let narrow = b.ins().fdemote(types::F32, scalar);
                            b.ins().splat(types::F32X4, narrow)
                        });
                        (scalar, pair, quad)
                    })
                })
                .collect();
            let body = Body {
                graph,
                nodes,
                inputs,
                outputs,
                access: &access,
                elems: &elems,
                bases: &bases,
                singles: &singles,
                quad,
                single_sums: &single_sums,
                seed,
                step,
                zero: zero_f64,
            };
            // Each running total is two `f64x2`s: a pair step adds its two
            // elements lane by lane into the first, a scalar step adds into
            // lane 0 of the first, an `f32x4` step adds its first pair into
            // the first and its second into the second (two chains of
            // additions, not one twice as long); the two are added, then
            // their lanes, after the loops.
            let start: Vec<Value> = single_sums
                .iter()
                .flat_map(|_| [(); 2])
                .map(|_| b.ins().splat(types::F64X2, zero_f64))
                .collect();
            let lanes = match cols {
                Some(cols) => body.rows_and_columns(&mut b, &mut calls, n, cols, &start)?,
                None => {
                    let static_count = loop_shape.and_then(|shape| {
                        shape.0.iter().try_fold(1u64, |count, d| match d {
                            Dim::Fixed(size) => count.checked_mul(*size),
                            Dim::Sym(_) => None,
                        })
                    });
                    // The product of the static axes: every count is a
                    // multiple of it.
                    let factor = loop_shape.map_or(1, |shape| {
                        shape.0.iter().fold(1u64, |product, d| match d {
                            Dim::Fixed(size) => product.saturating_mul(*size).max(1),
                            Dim::Sym(_) => product,
                        })
                    });
                    let (lanes, width) = body.flat(
                        &mut b,
                        &mut calls,
                        n,
                        &factors,
                        &start,
                        (static_count, factor),
                    )?;
                    multiple_of = width;
                    lanes
                }
            };
            let totals: Vec<Value> = lanes
                .chunks(2)
                .map(|halves| {
                    let total = match halves {
                        [first, second] => b.ins().fadd(*first, *second),
                        _ => halves[0],
                    };
                    let even = b.ins().extractlane(total, 0);
                    let odd = b.ins().extractlane(total, 1);
                    b.ins().fadd(even, odd)
                })
                .collect();
            // Finish every sum as the interpreter does: a mean divides by
            // its count, a zero fraction by n, a dead fraction counts the
            // units no row reached; an f32 result is rounded once.
            let sums = access[inputs.len()..].iter().any(|&a| a != Access::Full);
            let one = if sums {
                b.ins().iconst(pointer, 1)
            } else {
                zero
            };
            let count_per = |b: &mut FunctionBuilder<'_>, groups: Value| {
                let groups = b.ins().umax(groups, one);
                let count = b.ins().udiv(n, groups);
                let count = b.ins().umax(count, one);
                b.ins().fcvt_from_uint(types::F64, count)
            };
            for (o, &output) in outputs.iter().enumerate() {
                let j = inputs.len() + o;
                let op = &graph.node(output).op;
                let mean = matches!(
                    op,
                    Op::Reduce {
                        func: ReduceFn::Mean,
                        ..
                    } | Op::ZeroFraction
                        | Op::Mse
                        | Op::BceWithLogits
                );
                match access[j] {
                    Access::Full => {}
                    Access::Single => {
                        let slot = single_sums.iter().position(|&s| s == j).unwrap_or(0);
                        let mut value = totals[slot];
                        if mean {
                            let count = count_per(&mut b, one);
                            value = b.ins().fdiv(value, count);
                        }
                        let value = round(&mut b, graph, output, value);
                        store(&mut b, elems[j], value, bases[j]);
                    }
                    Access::Strided | Access::Row => {
                        let m = slots(&mut b, j);
                        if matches!(op, Op::DeadFraction) {
                            let units = b.ins().fcvt_from_uint(types::F64, m);
                            let one_f64 = b.ins().f64const(1.0);
                            let dead =
                                rows::counted_loop(&mut b, m, &[zero_f64], |b, slot, carried| {
                                    let at = element_at(b, Elem::F64, bases[j], slot);
                                    let reached = b.ins().load(types::F64, flags, at, 0);
                                    let none = b.ins().fcmp(FloatCC::Equal, reached, zero_f64);
                                    let add = b.ins().select(none, one_f64, zero_f64);
                                    Ok(vec![b.ins().fadd(carried[0], add)])
                                })?[0];
                            let fraction = b.ins().fdiv(dead, units);
                            let empty = b.ins().icmp(IntCC::Equal, n, zero);
                            let fraction = b.ins().select(empty, zero_f64, fraction);
                            let fraction = round(&mut b, graph, output, fraction);
                            b.ins().store(flags, fraction, bases[j], 0);
                        } else if mean || graph.node(output).dtype() == DType::F32 {
                            let count = count_per(&mut b, m);
                            rows::counted_loop(&mut b, m, &[], |b, slot, _| {
                                let at = element_at(b, Elem::F64, bases[j], slot);
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
            b.ins().return_(&[]);
            b.seal_all_blocks();
            b.finalize(self.module.target_config());
        }
        let clif = self.finish(id, context)?;
        Ok((
            CompiledKernel {
                func: id,
                inputs: inputs.to_vec(),
                outputs: outputs.to_vec(),
                sums: outputs.iter().map(|&o| is_sum(graph, o)).collect(),
                access,
                cols,
                read_shapes,
                elems,
                multiple_of,
            },
            clif,
        ))
    }

    /// Declares a new local function `{prefix}{n}` taking `params`
    /// pointer-sized arguments (and returning one if `returns`), and a
    /// context to build its body in.
    fn declare(
        &mut self,
        prefix: &str,
        params: usize,
        returns: bool,
    ) -> Result<(FuncId, Context), CodegenError> {
        let pointer = types::I64;
        let mut signature = Signature::new(CallConv::SystemV);
        for _ in 0..params {
            signature.params.push(AbiParam::new(pointer));
        }
        if returns {
            signature.returns.push(AbiParam::new(pointer));
        }
        let name = format!("{prefix}{}", self.next);
        self.next += 1;
        let id = self
            .module
            .declare_function(&name, Linkage::Local, &signature)
            .map_err(|e| CodegenError(e.to_string()))?;
        let mut context = Context::new();
        context.func = Function::with_name_signature(UserFuncName::user(0, id.as_u32()), signature);
        Ok((id, context))
    }

    /// Defines a built function and returns its CLIF text, if kept (the
    /// module is finalized when a step entry is compiled).
    fn finish(&mut self, id: FuncId, mut context: Context) -> Result<String, CodegenError> {
        let as_built =
            (self.keep_clif == ClifText::AsBuilt).then(|| context.func.display().to_string());
        self.module
            .define_function(id, &mut context)
            .map_err(|e| CodegenError(format!("{e:?}")))?;
        Ok(match self.keep_clif {
            ClifText::None => String::new(),
            ClifText::AsBuilt => as_built.unwrap_or_default(),
            ClifText::Optimized => context.func.display().to_string(),
        })
    }

    /// Compiles the step entry of a frame: one function that makes the
    /// frame's calls in order (compiled kernels directly, host work through
    /// `gradc_host`) and returns 0, or the status of the first host call
    /// that failed. Finalizes the module, so every kernel is callable, and
    /// returns the entry's CLIF text too.
    pub fn compile_entry(&mut self, frame: &mut Frame) -> Result<String, CodegenError> {
        let pointer = types::I64;
        let (id, mut context) = self.declare("entry", 3, true)?;
        let mut builder_context = FunctionBuilderContext::new();
        {
            let mut b = FunctionBuilder::new(&mut context.func, &mut builder_context);
            let entry = b.create_block();
            let failed = b.create_block();
            b.append_block_param(failed, pointer);
            b.append_block_params_for_function_params(entry);
            b.switch_to_block(entry);
            let params = b.block_params(entry).to_vec();
            let (words, state, run_context) = (params[0], params[1], params[2]);
            let flags = MemFlagsData::trusted();
            let host = self
                .imports
                .get("gradc_host")
                .copied()
                .ok_or_else(|| CodegenError("no runtime function `gradc_host`".into()))?;
            let host = self.module.declare_func_in_func(host, b.func);
            let mut declared: HashMap<FuncId, FuncRef> = HashMap::new();
            let mut word = 0;
            for call in &frame.calls {
                let mut load_word = |b: &mut FunctionBuilder<'_>| {
                    let value = b.ins().load(pointer, flags, words, 8 * word);
                    word += 1;
                    value
                };
                match call {
                    BoundCall::Kernel { func, .. } | BoundCall::Rows { func, .. } => {
                        let arguments: Vec<Value> = match call {
                            BoundCall::Kernel { .. } => {
                                let mut arguments: Vec<Value> =
                                    (0..4).map(|_| load_word(&mut b)).collect();
                                arguments.push(run_context);
                                arguments
                            }
                            _ => (0..3).map(|_| load_word(&mut b)).collect(),
                        };
                        let callee = *declared.entry(*func).or_insert_with(|| {
                            let callee = self.module.declare_func_in_func(*func, b.func);
                            // Kernels may lie anywhere in the address space
                            // (each finalization maps new memory): call
                            // them by absolute address, not by a 32-bit
                            // displacement that may not reach.
                            b.func.dfg.ext_funcs[callee].colocated = false;
                            callee
                        });
                        b.ins().call(callee, &arguments);
                    }
                    BoundCall::Copy { func, .. } => {
                        let arguments: Vec<Value> = (0..2).map(|_| load_word(&mut b)).collect();
                        let callee = *declared.entry(*func).or_insert_with(|| {
                            let callee = self.module.declare_func_in_func(*func, b.func);
                            b.func.dfg.ext_funcs[callee].colocated = false;
                            callee
                        });
                        b.ins().call(callee, &arguments);
                    }
                    BoundCall::Host(index) => {
                        let index = b.ins().iconst(pointer, *index as i64);
                        let call = b.ins().call(host, &[state, index]);
                        let status = b.inst_results(call)[0];
                        let next = b.create_block();
                        b.ins().brif(status, failed, &[status.into()], next, &[]);
                        b.switch_to_block(next);
                    }
                }
            }
            let ok = b.ins().iconst(pointer, 0);
            b.ins().return_(&[ok]);
            b.switch_to_block(failed);
            let status = b.block_params(failed)[0];
            b.ins().return_(&[status]);
            b.seal_all_blocks();
            b.finalize(self.module.target_config());
        }
        let clif = self.finish(id, context)?;
        self.module
            .finalize_definitions()
            .map_err(|e| CodegenError(e.to_string()))?;
        let code = self.module.get_finalized_function(id);
        // SAFETY: `code` is the finalized machine code of the function
        // declared above with three pointer-sized parameters and one
        // pointer-sized return, which matches this `extern "C"` type on the
        // host's System V ABI. The frame takes a lease on the code memory
        // (below), so the pointer stays valid as long as the frame, even if
        // the frame outlives this cache, and so do the kernels the entry
        // calls (`CodeLease`).
        frame.entry = Some(unsafe { std::mem::transmute::<*const u8, EntryFn>(code) });
        frame.lease = Some(Rc::clone(&self.lease));
        Ok(clif)
    }

    /// The kernel that moves elements as `mover` says, for buffers storing
    /// `elem` (compiled on first use): `fn(ptrs, params)`, with the
    /// buffers' addresses in `ptrs` and its sizes in `params`
    /// (`Mover::buffers`, `Mover::params`). Also returns the CLIF text
    /// (empty if compiled before).
    pub fn compile_mover(
        &mut self,
        mover: Mover,
        elem: Elem,
    ) -> Result<(FuncId, String), CodegenError> {
        if let Some(&(_, id)) = self.movers.iter().find(|(m, _)| *m == (mover, elem)) {
            return Ok((id, String::new()));
        }
        let (id, mut context) = self.declare(mover.name(), 2, false)?;
        let mut builder_context = FunctionBuilderContext::new();
        {
            let mut b = FunctionBuilder::new(&mut context.func, &mut builder_context);
            let entry = b.create_block();
            b.append_block_params_for_function_params(entry);
            b.switch_to_block(entry);
            let params = b.block_params(entry).to_vec();
            let words = |b: &mut FunctionBuilder<'_>, base: Value, count: usize| -> Vec<Value> {
                (0..count)
                    .map(|k| {
                        b.ins()
                            .load(types::I64, MemFlagsData::trusted(), base, 8 * k as i32)
                    })
                    .collect()
            };
            let buffers = words(&mut b, params[0], mover.buffers());
            let sizes = words(&mut b, params[1], mover.params());
            match mover {
                Mover::Copy => emit_copy(&mut b, elem, &buffers, &sizes)?,
                Mover::Gather => emit_gather(&mut b, elem, &buffers, &sizes)?,
                Mover::Scatter => emit_scatter(&mut b, elem, &buffers, &sizes)?,
            }
            b.ins().return_(&[]);
            b.seal_all_blocks();
            b.finalize(self.module.target_config());
        }
        let clif = self.finish(id, context)?;
        self.movers.push(((mover, elem), id));
        Ok((id, clif))
    }
    /// Compiles a row kernel (`jit::rows`) computing `outputs` (a node
    /// `RowOp::of` accepts, or the pair of `RowOp::CrossEntropyWithVjp`)
    /// from the first one's operands, whose inputs (`RowOp::reads`) are
    /// stored as `input_elems` say; also returns the CLIF text.
    pub fn compile_rows(
        &mut self,
        graph: &Graph,
        outputs: &[NodeId],
        op: RowOp,
        input_elems: &[Elem],
    ) -> Result<(RowKernel, String), CodegenError> {
        let node = *outputs
            .first()
            .ok_or_else(|| CodegenError("row kernel: no output".into()))?;
        let mut elems = input_elems.to_vec();
        elems.extend(
            outputs
                .iter()
                .map(|&output| Elem::of(graph.node(output).dtype())),
        );
        // Rows of a static length: the kernel is compiled for that length
        // (`RowKernel::fixed_cols`), and binding refuses any other.
        let inputs = op.reads(&graph.operands(node));
        let (lengths, _) = op.lengths(3, 5);
        let fixed_cols = inputs
            .iter()
            .zip(&lengths)
            .find(|&(_, &length)| length == 15)
            .and_then(|(&input, _)| graph.node(input).shape().0.last().cloned())
            .and_then(|last| match last {
                Dim::Fixed(c) if c > 0 && c <= i64::MAX as u64 => usize::try_from(c).ok(),
                _ => None,
            });
        let (id, mut context) = self.declare("kernel", 3, false)?;
        let mut builder_context = FunctionBuilderContext::new();
        {
            let mut b = FunctionBuilder::new(&mut context.func, &mut builder_context);
            let entry = b.create_block();
            b.append_block_params_for_function_params(entry);
            b.switch_to_block(entry);
            let params = b.block_params(entry).to_vec();
            let mut calls = Calls {
                module: &mut self.module,
                imports: &self.imports,
                declared: HashMap::new(),
            };
            let f32 = graph.node(node).dtype() == DType::F32;
            let cols = match fixed_cols {
                Some(c) => b.ins().iconst(types::I64, c as i64),
                None => params[2],
            };
            // A row's exponentials, kept for the second pass of a softmax
            // (`f64`s, so the values are the ones computed again before).
            // (Two such rows for a kernel that takes rows in pairs.)
            let kept_rows = if op.takes_row_pairs() { 2 } else { 1 };
            let (exps, second_exps) = match fixed_cols {
                Some(c) if op.takes_softmax() && kept_rows * c * 8 <= ROW_SCRATCH_BYTES => {
                    let slot = b.create_sized_stack_slot(StackSlotData::new(
                        StackSlotKind::ExplicitSlot,
                        (kept_rows * c * 8) as u32,
                        4,
                    ));
                    let first = b.ins().stack_addr(types::I64, slot, 0);
                    let second = (kept_rows == 2)
                        .then(|| b.ins().stack_addr(types::I64, slot, (c * 8) as i32));
                    (Some(first), second)
                }
                _ => (None, None),
            };
            let shape = rows::RowShape {
                rows: params[1],
                cols,
                even_cols: fixed_cols.is_some_and(|c| c.is_multiple_of(2)),
                exps,
                second_exps,
            };
            rows::emit(&mut b, &mut calls, op, f32, &elems, params[0], shape)?;
            b.ins().return_(&[]);
            b.seal_all_blocks();
            b.finalize(self.module.target_config());
        }
        let clif = self.finish(id, context)?;
        Ok((
            RowKernel {
                func: id,
                op,
                inputs,
                outputs: outputs.to_vec(),
                elems,
                fixed_cols,
            },
            clif,
        ))
    }
}

/// What a kernel that only moves elements does (`CodeCache::compile_mover`;
/// bound by `Frame::push_copy` and `push_indexed`, which check every
/// element it reaches).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mover {
    /// A three-level strided block (`CopyBlock`: counts, then the source's
    /// offset and strides, then the destination's: eleven `params`) from
    /// `buffers[0]` to `buffers[1]`, bit for bit: `reshape`, `transpose`,
    /// `concat` and `slice`.
    Copy,
    /// Row `ids[j]` of the `v x d` table `buffers[1]` to row `j` of
    /// `buffers[2]`, bit for bit, for the `n` indices in `buffers[0]`
    /// (stored as `f64`; `params` `[n, d, v]`): `embedding`.
    Gather,
    /// `scatter_add` (the gradient of `embedding`'s table): row `j` of the
    /// `n x d` rows `buffers[1]` added to row `ids[j]` of the zeroed `v x d`
    /// output `buffers[2]` (stored as `f64`), for `j` in order, in `f64` as
    /// `kernels::scatter_add` adds, then every sum rounded to `f32` once if the
    /// fourth of `params` `[n, d, v, f32]` is 1.
    Scatter,
}

impl Mover {
    /// The name of its function and of its kernels in `--stage clif`.
    pub fn name(self) -> &'static str {
        match self {
            Mover::Copy => "copy",
            Mover::Gather => "gather",
            Mover::Scatter => "scatter",
        }
    }

    /// How many buffers it reaches.
    fn buffers(self) -> usize {
        match self {
            Mover::Copy => 2,
            Mover::Gather | Mover::Scatter => 3,
        }
    }

    /// How many sizes it reads.
    fn params(self) -> usize {
        match self {
            Mover::Copy => 11,
            Mover::Gather => 3,
            Mover::Scatter => 4,
        }
    }
}

/// The integer type of an element's width: elements moved as bits.
fn bits_of(elem: Elem) -> types::Type {
    match elem {
        Elem::F32 => types::I32,
        Elem::F64 => types::I64,
    }
}

/// An index stored as `f64`, truncated like `as usize` and capped at
/// `last`, so no address leaves its table (the runtime has checked the
/// indices already).
fn capped_index(b: &mut FunctionBuilder<'_>, ids: Value, j: Value, last: Value) -> Value {
    let at = element_at(b, Elem::F64, ids, j);
    let index = b.ins().load(types::F64, MemFlagsData::trusted(), at, 0);
    let row = b.ins().fcvt_to_uint_sat(types::I64, index);
    b.ins().umin(row, last)
}

/// The body of `Mover::Copy`.
fn emit_copy(
    b: &mut FunctionBuilder<'_>,
    elem: Elem,
    buffers: &[Value],
    params: &[Value],
) -> Result<(), CodegenError> {
    let flags = MemFlagsData::trusted();
    let (counts, from, to) = (&params[0..3], &params[3..7], &params[7..11]);
    let step = |b: &mut FunctionBuilder<'_>, at: Value, i: Value, stride: Value| {
        let offset = b.ins().imul(i, stride);
        b.ins().iadd(at, offset)
    };
    rows::counted_loop(b, counts[0], &[], |b, i, _| {
        let from_i = step(b, from[0], i, from[1]);
        let to_i = step(b, to[0], i, to[1]);
        rows::counted_loop(b, counts[1], &[], |b, j, _| {
            let from_j = step(b, from_i, j, from[2]);
            let to_j = step(b, to_i, j, to[2]);
            rows::counted_loop(b, counts[2], &[], |b, k, _| {
                let from_k = step(b, from_j, k, from[3]);
                let to_k = step(b, to_j, k, to[3]);
                let source = element_at(b, elem, buffers[0], from_k);
                let value = b.ins().load(bits_of(elem), flags, source, 0);
                let target = element_at(b, elem, buffers[1], to_k);
                b.ins().store(flags, value, target, 0);
                Ok(vec![])
            })?;
            Ok(vec![])
        })?;
        Ok(vec![])
    })?;
    Ok(())
}

/// For each of the `n` indices `j` (in order) and each column `k < d`:
/// `each(b, j d + k, ids[j] d + k)`, the index capped at `v - 1`.
fn over_indexed_rows(
    b: &mut FunctionBuilder<'_>,
    ids: Value,
    [n, d, v]: [Value; 3],
    mut each: impl FnMut(&mut FunctionBuilder<'_>, Value, Value),
) -> Result<(), CodegenError> {
    let last = b.ins().iadd_imm_s(v, -1);
    rows::counted_loop(b, n, &[], |b, j, _| {
        let row = capped_index(b, ids, j, last);
        let at_row = b.ins().imul(row, d);
        let at_j = b.ins().imul(j, d);
        rows::counted_loop(b, d, &[], |b, k, _| {
            let at_j = b.ins().iadd(at_j, k);
            let at_row = b.ins().iadd(at_row, k);
            each(b, at_j, at_row);
            Ok(vec![])
        })?;
        Ok(vec![])
    })?;
    Ok(())
}

/// The body of `Mover::Gather`.
fn emit_gather(
    b: &mut FunctionBuilder<'_>,
    elem: Elem,
    buffers: &[Value],
    params: &[Value],
) -> Result<(), CodegenError> {
    let flags = MemFlagsData::trusted();
    let (ids, table, out) = (buffers[0], buffers[1], buffers[2]);
    over_indexed_rows(
        b,
        ids,
        [params[0], params[1], params[2]],
        |b, at_j, at_row| {
            let source = element_at(b, elem, table, at_row);
            let value = b.ins().load(bits_of(elem), flags, source, 0);
            let target = element_at(b, elem, out, at_j);
            b.ins().store(flags, value, target, 0);
        },
    )
}

/// The body of `Mover::Scatter`.
fn emit_scatter(
    b: &mut FunctionBuilder<'_>,
    elem: Elem,
    buffers: &[Value],
    params: &[Value],
) -> Result<(), CodegenError> {
    let flags = MemFlagsData::trusted();
    let (ids, g, out) = (buffers[0], buffers[1], buffers[2]);
    let (d, v, round) = (params[1], params[2], params[3]);
    let all = b.ins().imul(v, d);
    let zero = b.ins().f64const(0.0);
    rows::counted_loop(b, all, &[], |b, i, _| {
        let at = element_at(b, Elem::F64, out, i);
        b.ins().store(flags, zero, at, 0);
        Ok(vec![])
    })?;
    over_indexed_rows(b, ids, [params[0], d, v], |b, at_j, at_row| {
        let source = element_at(b, elem, g, at_j);
        let value = load(b, elem, false, source);
        let target = element_at(b, Elem::F64, out, at_row);
        let sum = b.ins().load(types::F64, flags, target, 0);
        let sum = b.ins().fadd(sum, value);
        b.ins().store(flags, sum, target, 0);
    })?;
    // The `f32` rounding, once.
    let rounding = b.create_block();
    let done = b.create_block();
    b.ins().brif(round, rounding, &[], done, &[]);
    b.switch_to_block(rounding);
    rows::counted_loop(b, all, &[], |b, i, _| {
        let at = element_at(b, Elem::F64, out, i);
        let sum = b.ins().load(types::F64, flags, at, 0);
        let narrow = b.ins().fdemote(types::F32, sum);
        let sum = b.ins().fpromote(types::F64, narrow);
        b.ins().store(flags, sum, at, 0);
        Ok(vec![])
    })?;
    b.ins().jump(done, &[]);
    b.switch_to_block(done);
    Ok(())
}

/// A single-element input as a scalar, a pair, and four `f32`s (if the
/// kernel has `f32x4` loops).
type Single = (Value, Value, Option<Value>);

/// What every step of a kernel's loops computes: the kernel's nodes over
/// its buffers.
struct Body<'k> {
    graph: &'k Graph,
    nodes: &'k [NodeId],
    inputs: &'k [NodeId],
    outputs: &'k [NodeId],
    access: &'k [Access],
    elems: &'k [Elem],
    bases: &'k [Value],
    /// Each single-element input, loaded before the loops.
    singles: &'k [Option<Single>],
    /// Whether the vector loops take four `f32`s at a time (`f32_exact`).
    quad: bool,
    single_sums: &'k [usize],
    seed: Value,
    step: Value,
    zero: Value,
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
    fn step(
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
    fn flat(
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
    fn rows_and_columns(
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
        rows::counted_loop(b, quads, &[], |b, q, _| {
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
        rows::counted_loop(b, quads, &[], |b, q, _| {
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
struct Scratch<'s> {
    base: Value,
    row_sums: &'s [usize],
    quad_cols: usize,
}

/// The fewest columns (of those taken four at a time) for which sums over
/// rows run in blocks of rows: on shorter rows the widening costs little
/// and the blocks' code only compile time.
const ROW_BLOCK_COLS: usize = 32;

/// The largest scratch row (`Scratch`) a kernel puts on the stack; a kernel
/// whose sums over rows need more adds every step into its `f64` slots.
const ROW_SCRATCH_BYTES: usize = 32 * 1024;

/// How many steps of four `f32`s a sum to one element adds in `f32` lanes
/// before it widens them into its `f64` total (`Body::blocked`): each lane
/// then holds at most 16 rounded additions (a relative error of at most
/// about `16 * 2^-24 = 1e-6` of the block's magnitude; counts stay exact).
const SUM_BLOCK: i64 = 16;

/// Four `f32`s as two `f64` pairs, in order.
fn widen(b: &mut FunctionBuilder<'_>, value: Value) -> [Value; 2] {
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
fn output_shape(graph: &Graph, id: NodeId, loop_shape: &Shape) -> Option<Vec<Dim>> {
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
fn is_row(shape: &[Dim], cols: usize) -> bool {
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
fn f32_exact(graph: &Graph, nodes: &[NodeId], input_elems: &[Elem], outputs: &[NodeId]) -> bool {
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
fn round(b: &mut FunctionBuilder<'_>, graph: &Graph, id: NodeId, value: Value) -> Value {
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
fn emit(
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

fn binary(
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
    })
}

/// A comparison as 1 or 0 (ordered: 0 where either operand is NaN, as in
/// the interpreter).
fn compare(b: &mut FunctionBuilder<'_>, cc: FloatCC, x: Value, y: Value) -> Value {
    let holds = b.ins().fcmp(cc, x, y);
    let one = constant(b, x, 1.0);
    let zero = constant(b, x, 0.0);
    pick(b, holds, one, zero)
}

fn unary(
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
fn clamp(b: &mut FunctionBuilder<'_>, x: Value, lo: f64, hi: f64) -> Value {
    let lo = constant(b, x, lo);
    let hi = constant(b, x, hi);
    let below = b.ins().fcmp(FloatCC::LessThan, x, lo);
    let raised = pick(b, below, lo, x);
    let above = b.ins().fcmp(FloatCC::GreaterThan, raised, hi);
    pick(b, above, hi, raised)
}

/// An element type the tuned GEMM handles: `f64` (`dgemm`) and `f32`
/// (`sgemm`, twice the SIMD width).
pub trait GemmElement: Copy + Default {
    /// Calls the GEMM: `c = a @ b` with the given strides.
    ///
    /// # Safety
    /// Every element the strides address in `a` (`m x k`) and `b`
    /// (`k x n`) must be readable, every element of `c` (`m x n`, row
    /// stride `ldc`, column stride 1) writable and not aliased by `a`, `b`
    /// or another thread.
    unsafe fn raw_gemm(
        m: usize,
        k: usize,
        n: usize,
        a: (*const Self, isize, isize),
        b: (*const Self, isize, isize),
        c: (*mut Self, isize),
    );

    /// Runs a small product without the `gemm` crate where that is faster
    /// (`small_sgemm` for `f32`); returns false, doing nothing, otherwise.
    ///
    /// # Safety
    /// The views must be checked as `gemm` checks them: `a` is `m x k`,
    /// `b` is `k x n`, every element they address lies inside their
    /// slices, and `c` holds exactly `m * n` elements.
    unsafe fn small_gemm(a: MatrixView<'_, Self>, b: MatrixView<'_, Self>, c: &mut [Self]) -> bool {
        let _ = (a, b, c);
        false
    }
}

/// Implements `GemmElement` for an element type by the `gemm` crate.
macro_rules! gemm_element {
    ($t:ty $(, $small:ident)?) => {
        impl GemmElement for $t {
            $(
                unsafe fn small_gemm(
                    a: MatrixView<'_, $t>,
                    b: MatrixView<'_, $t>,
                    c: &mut [$t],
                ) -> bool {
                    // SAFETY: the caller's guarantee is `$small`'s.
                    unsafe { $small(a, b, c) }
                }
            )?
            unsafe fn raw_gemm(
                m: usize,
                k: usize,
                n: usize,
                a: (*const $t, isize, isize),
                b: (*const $t, isize, isize),
                c: (*mut $t, isize),
            ) {
                // SAFETY: the caller guarantees the views are in bounds and
                // `c` is exclusive (the trait's contract, checked by
                // `gemm` and `gemm_parallel`); with `read_dst` false, `c`'s
                // old contents are not read. The crate takes column strides
                // before row strides, and computes `beta * a @ b` (beta 1).
                unsafe {
                    gemm::gemm(
                        m,
                        n,
                        k,
                        c.0,
                        1,
                        c.1,
                        false,
                        a.0,
                        a.2,
                        a.1,
                        b.0,
                        b.2,
                        b.1,
                        0.0,
                        1.0,
                        false,
                        false,
                        false,
                        gemm::Parallelism::None,
                    );
                }
            }
        }
    };
}

gemm_element!(f64);
gemm_element!(f32, small_sgemm);

/// A strided, read-only view of a `rows x cols` matrix: element `(r, c)`
/// is `data[r * row_stride + c * col_stride]`. A transposed operand is the
/// same storage with the strides swapped.
#[derive(Clone, Copy, Debug)]
pub struct MatrixView<'a, T = f64> {
    /// The storage; every element of the view lies inside it (checked by
    /// `gemm`).
    pub data: &'a [T],
    /// Number of rows.
    pub rows: usize,
    /// Number of columns.
    pub cols: usize,
    /// Distance between rows, in elements.
    pub row_stride: usize,
    /// Distance between columns, in elements.
    pub col_stride: usize,
}

impl<'a, T> MatrixView<'a, T> {
    /// `data` as a contiguous row-major `rows x cols` matrix.
    pub fn row_major(data: &'a [T], rows: usize, cols: usize) -> MatrixView<'a, T> {
        MatrixView {
            data,
            rows,
            cols,
            row_stride: cols,
            col_stride: 1,
        }
    }

    /// The transposed matrix: the same storage with rows and columns (and
    /// their strides) swapped; nothing is copied.
    pub fn transposed(self) -> MatrixView<'a, T> {
        MatrixView {
            rows: self.cols,
            cols: self.rows,
            row_stride: self.col_stride,
            col_stride: self.row_stride,
            ..self
        }
    }

    /// The same view over other storage of the same layout (the `f32`
    /// copy of an `f64` tensor).
    pub fn over<'b, U>(&self, data: &'b [U]) -> MatrixView<'b, U> {
        MatrixView {
            data,
            rows: self.rows,
            cols: self.cols,
            row_stride: self.row_stride,
            col_stride: self.col_stride,
        }
    }

    /// Whether every element of the view lies inside `data`.
    fn in_bounds(&self) -> bool {
        if self.rows == 0 || self.cols == 0 {
            return true;
        }
        let last = (self.rows - 1)
            .checked_mul(self.row_stride)
            .and_then(|r| (self.cols - 1).checked_mul(self.col_stride)?.checked_add(r));
        last.is_some_and(|last| last < self.data.len())
            && isize::try_from(self.row_stride).is_ok()
            && isize::try_from(self.col_stride).is_ok()
    }
}

/// `f32` products with at most this many multiply-adds, or at most
/// `SMALL_PRODUCT_COLUMNS` columns, and an inner size of at most
/// `SMALL_PRODUCT_DEPTH` run on `small_sgemm` where the host has AVX-512:
/// no packing, no allocation, no dispatch. The `gemm` crate's fixed cost
/// per call (its packing buffers, its thread-local storage, its dispatch)
/// is most of a small product's time, and its micro-kernel wastes most of
/// its width on 10 columns; it is faster from about `128 x 256 x 256` on
/// (measured: `docs/performance.md`).
pub const SMALL_PRODUCT: usize = 1 << 21;

/// Products this narrow take `small_sgemm` whatever their size (one block
/// of columns: each row of the right operand is loaded once per 8 rows).
pub const SMALL_PRODUCT_COLUMNS: usize = 32;

/// The largest inner size `small_sgemm` takes (the `gemm` crate sums an
/// inner size of at most 512 in one block, as `small_sgemm` always does).
pub const SMALL_PRODUCT_DEPTH: usize = 512;

/// Whether `small_sgemm` runs on this host: AVX-512F is there and
/// `GRADC_SMALL_GEMM` is not `0` (which keeps every product on the `gemm`
/// crate, for comparisons).
pub fn small_products() -> bool {
    static SMALL: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *SMALL.get_or_init(|| avx512() && std::env::var("GRADC_SMALL_GEMM").map_or(true, |v| v != "0"))
}

/// The largest right operand (`k * n` elements) that `small_sgemm` copies
/// into contiguous rows when its rows are not contiguous (`W^T` in
/// `dX = g W^T`): the copy costs about one store per element, the product
/// `m` multiply-adds per element, so the copy pays where `m` is not tiny,
/// and it stays in the L1 cache (measured: `docs/performance.md`).
pub const SMALL_PACKED_RIGHT: usize = 1 << 12;

thread_local! {
    /// The rows `small_sgemm` copies a right operand into (`SMALL_PACKED_RIGHT`
    /// elements at most), kept between calls so that no call allocates.
    static PACKED_RIGHT: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// `c = a @ b` for a small `f32` product on AVX-512 (`small_products`):
/// `c` row-major (`m x n`), 8 rows by 32 columns at a time in registers,
/// each output element one chain of fused multiply-adds over `p = 0..k`
/// from zero, as the `gemm` crate's micro-kernels sum it (tested bit for
/// bit against it). A right operand whose rows are not contiguous (read
/// transposed) is first copied into rows if it has at most
/// `SMALL_PACKED_RIGHT` elements. Returns false, doing nothing, where the
/// product is not small, is a matrix-vector or outer product, the right
/// operand is strided and larger, or the host lacks AVX-512.
///
/// # Safety
/// As `GemmElement::small_gemm`: the views checked by `gemm`.
unsafe fn small_sgemm(a: MatrixView<'_, f32>, b: MatrixView<'_, f32>, c: &mut [f32]) -> bool {
    let (m, k, n) = (a.rows, a.cols, b.cols);
    // Matrix-vector and outer products (`min(m, k, n) == 1`), inner sizes
    // of 2, and products of rows by columns that are both contiguous along
    // `k` with at most 256 outputs stay on the crate's own paths for them
    // (which sum otherwise: its `gevv` and its horizontal dot products).
    let horizontal = a.col_stride == 1 && b.row_stride == 1 && m.saturating_mul(n) <= 256;
    if k > SMALL_PRODUCT_DEPTH
        || m.min(n) < 2
        || k <= 2
        || horizontal
        || (m.saturating_mul(k).saturating_mul(n) > SMALL_PRODUCT && n > SMALL_PRODUCT_COLUMNS)
        || (b.col_stride != 1 && k.saturating_mul(n) > SMALL_PACKED_RIGHT)
        || !small_products()
    {
        return false;
    }
    if b.col_stride == 1 {
        // SAFETY: the caller's guarantee, and `b`'s rows are contiguous.
        unsafe { small_sgemm_rows(a, b, c) };
        return true;
    }
    PACKED_RIGHT.with_borrow_mut(|packed| {
        packed.resize(k * n, 0.0);
        // SAFETY: AVX-512F is present (`small_products`); `b` is in bounds
        // (the caller's guarantee) and `packed` holds `k * n` elements.
        unsafe { pack_rows(b, &mut packed[..k * n]) };
        let rows = MatrixView::row_major(&packed[..k * n], k, n);
        // SAFETY: `a` and `c` as the caller guarantees; `rows` is the
        // contiguous `k x n` copy of `b`.
        unsafe { small_sgemm_rows(a, rows, c) };
    });
    true
}

/// Copies the `k x n` view `b` into `packed` row by row (`packed[p * n +
/// j] = b(p, j)`): on AVX-512, 16 columns at a time by one gather per row
/// where the strides allow 32-bit offsets, else element by element.
///
/// # Safety
/// Every element `b` addresses lies inside `b.data`, `packed` holds
/// `b.rows * b.cols` elements, and (on x86-64) AVX-512F is present.
unsafe fn pack_rows(b: MatrixView<'_, f32>, packed: &mut [f32]) {
    let (k, n) = (b.rows, b.cols);
    #[cfg(target_arch = "x86_64")]
    {
        let fits = |stride: usize| {
            stride
                .checked_mul(16)
                .is_some_and(|s| i32::try_from(s).is_ok())
        };
        if fits(b.col_stride) {
            // SAFETY: as the caller guarantees; the offsets fit `i32`.
            unsafe { pack_rows_avx512(b, packed) };
            return;
        }
    }
    for (p, row) in packed.chunks_exact_mut(n).take(k).enumerate() {
        for (j, out) in row.iter_mut().enumerate() {
            *out = b.data[p * b.row_stride + j * b.col_stride];
        }
    }
}

/// `pack_rows` by gathers: for each block of 16 columns (masked at the
/// last), row `p` of `packed` is `b(p, j..j + 16)`, read at offsets
/// `j * col_stride` from `b(p, j)`.
///
/// # Safety
/// As `pack_rows`, with `16 * b.col_stride` within `i32`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn pack_rows_avx512(b: MatrixView<'_, f32>, packed: &mut [f32]) {
    use std::arch::x86_64::{
        _mm512_mask_i32gather_ps, _mm512_mask_storeu_ps, _mm512_mullo_epi32, _mm512_set1_epi32,
        _mm512_setr_epi32, _mm512_setzero_ps,
    };
    let (k, n) = (b.rows, b.cols);
    // (`col_stride * 15` fits `i32`: the caller's guarantee.)
    let offsets = _mm512_mullo_epi32(
        _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
        _mm512_set1_epi32(b.col_stride as i32),
    );
    let base = b.data.as_ptr();
    let out = packed.as_mut_ptr();
    let mut column = 0;
    while column < n {
        let mask = column_mask(n - column);
        for p in 0..k {
            // SAFETY: the masked lanes read `b(p, column + l)` for
            // `column + l < n`, which lie inside `b.data` (the caller's
            // guarantee); the store writes row `p < k` of `packed`,
            // columns below `n`.
            unsafe {
                let from = base.add(p * b.row_stride + column * b.col_stride);
                let values =
                    _mm512_mask_i32gather_ps::<4>(_mm512_setzero_ps(), mask, offsets, from.cast());
                _mm512_mask_storeu_ps(out.add(p * n + column), mask, values);
            }
        }
        column += 16;
    }
}

/// The lanes of a 16-lane register that hold the first `columns` columns
/// (all of them from 16 on).
#[cfg(target_arch = "x86_64")]
fn column_mask(columns: usize) -> std::arch::x86_64::__mmask16 {
    if columns >= 16 {
        0xffff
    } else {
        (1u16 << columns) - 1
    }
}

/// `small_sgemm` once the right operand's rows are contiguous.
///
/// # Safety
/// As `small_sgemm`, with `b.col_stride == 1` and AVX-512F on the host.
unsafe fn small_sgemm_rows(a: MatrixView<'_, f32>, b: MatrixView<'_, f32>, c: &mut [f32]) {
    let (m, k, n) = (a.rows, a.cols, b.cols);
    #[cfg(target_arch = "x86_64")]
    {
        // SAFETY: AVX-512F is present (`small_products`). Every element
        // read lies in its slice: `a` and `b` are in bounds (the caller's
        // guarantee; element (r, p) at `r * row_stride + p * col_stride`),
        // `b` holds `k` rows of `n` contiguous elements (column stride 1) a
        // row stride apart, and the kernel's masked loads and stores touch
        // only columns below `n`; `c` holds exactly `m * n` elements and is
        // an exclusive borrow.
        unsafe {
            small_sgemm_avx512(
                m,
                k,
                n,
                (a.data.as_ptr(), a.row_stride, a.col_stride),
                (b.data.as_ptr(), b.row_stride),
                c.as_mut_ptr(),
            );
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (m, k, n, a, b, c);
}

/// The AVX-512 loop of `small_sgemm`: blocks of up to 8 rows of `c`
/// (8, 4, 2, 1) by up to 32 columns (two `f32x16` registers, masked at the
/// last columns).
///
/// # Safety
/// AVX-512F must be available; `a` addresses `m x k` readable elements at
/// `(row stride, column stride)`, `b` `k` rows of `n` contiguous readable
/// elements a row stride apart, and `c` `m * n` writable elements that
/// nothing else reads or writes meanwhile.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn small_sgemm_avx512(
    m: usize,
    k: usize,
    n: usize,
    a: (*const f32, usize, usize),
    b: (*const f32, usize),
    c: *mut f32,
) {
    let mut row = 0;
    while row < m {
        let rows = match m - row {
            8.. => 8,
            4..=7 => 4,
            2..=3 => 2,
            _ => 1,
        };
        let mut column = 0;
        while column < n {
            let columns = (n - column).min(32);
            let masks = [
                column_mask(columns),
                column_mask(columns.saturating_sub(16)),
            ];
            // SAFETY: the block's rows `row..row + rows` are below `m`
            // and its columns `column..column + columns` below `n` (the
            // masks), so every address stays inside the caller's
            // guarantee; the offsets are in elements of those buffers.
            unsafe {
                let a_block = (a.0.add(row * a.1), a.1, a.2);
                let b_block = (b.0.add(column), b.1);
                let c_block = (c.add(row * n + column), n);
                match (rows, columns > 16) {
                    (8, true) => sgemm_block::<8, 2>(k, a_block, b_block, c_block, masks),
                    (8, false) => sgemm_block::<8, 1>(k, a_block, b_block, c_block, masks),
                    (4, true) => sgemm_block::<4, 2>(k, a_block, b_block, c_block, masks),
                    (4, false) => sgemm_block::<4, 1>(k, a_block, b_block, c_block, masks),
                    (2, true) => sgemm_block::<2, 2>(k, a_block, b_block, c_block, masks),
                    (2, false) => sgemm_block::<2, 1>(k, a_block, b_block, c_block, masks),
                    (_, true) => sgemm_block::<1, 2>(k, a_block, b_block, c_block, masks),
                    (_, false) => sgemm_block::<1, 1>(k, a_block, b_block, c_block, masks),
                }
            }
            column += 32;
        }
        row += rows;
    }
}

/// One block of `small_sgemm_avx512`: `R` rows by `V` registers of 16
/// columns (lanes past `masks` neither loaded nor stored), summed over
/// `p = 0..k` by one fused multiply-add per element and step.
///
/// # Safety
/// As `small_sgemm_avx512`, for the block's `R` rows and its masked columns.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn sgemm_block<const R: usize, const V: usize>(
    k: usize,
    a: (*const f32, usize, usize),
    b: (*const f32, usize),
    c: (*mut f32, usize),
    masks: [std::arch::x86_64::__mmask16; 2],
) {
    use std::arch::x86_64::{
        _mm512_fmadd_ps, _mm512_mask_storeu_ps, _mm512_maskz_loadu_ps, _mm512_set1_ps,
        _mm512_setzero_ps,
    };
    let mut sums = [[_mm512_setzero_ps(); V]; R];
    for p in 0..k {
        // SAFETY: row `p < k` of `b`, its masked columns; elements `(r, p)`
        // of `a` for `r < R` (the caller's guarantee).
        unsafe {
            let b_row = b.0.add(p * b.1);
            let right: [_; V] =
                std::array::from_fn(|v| _mm512_maskz_loadu_ps(masks[v], b_row.add(16 * v)));
            for (r, sum) in sums.iter_mut().enumerate() {
                let left = _mm512_set1_ps(*a.0.add(r * a.1 + p * a.2));
                for (v, lane) in sum.iter_mut().enumerate() {
                    *lane = _mm512_fmadd_ps(left, right[v], *lane);
                }
            }
        }
    }
    for (r, sum) in sums.iter().enumerate() {
        for (v, lane) in sum.iter().enumerate() {
            // SAFETY: row `r < R` of the block, its masked columns.
            unsafe { _mm512_mask_storeu_ps(c.0.add(r * c.1 + 16 * v), masks[v], *lane) };
        }
    }
}

/// Products with at least this many multiply-adds run on two threads;
/// smaller ones lose more to the thread than they gain (measured:
/// `docs/performance.md`).
pub const PARALLEL_PRODUCT: usize = 1 << 24;

/// How many threads products may use: `GRADC_THREADS` if set (at least 1),
/// else the machine's available parallelism, at most 2.
pub fn product_threads() -> usize {
    static THREADS: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *THREADS.get_or_init(|| {
        let available = std::thread::available_parallelism().map_or(1, usize::from);
        std::env::var("GRADC_THREADS")
            .ok()
            .and_then(|v| v.parse::<usize>().ok())
            .unwrap_or(available)
            .clamp(1, 2)
    })
}

/// `gemm` on two threads for a large product (at least
/// `PARALLEL_PRODUCT` multiply-adds, and two threads allowed), split in
/// halves along the larger side: with at least as many rows as columns,
/// the rows of `a` and `c`, each half its own GEMM call; with fewer, the
/// columns of `b` and `c` (so that neither half packs the whole of the
/// larger operand), each half written in place into its columns of `c`.
/// Every output element is still summed by one call in the same order, so
/// the result is the same as one call's, bit for bit.
pub fn gemm_parallel<T: GemmElement + Send + Sync>(
    a: MatrixView<'_, T>,
    b: MatrixView<'_, T>,
    c: &mut [T],
) -> Result<(), CodegenError> {
    let (m, k, n) = (a.rows, a.cols, b.cols);
    let work = m.saturating_mul(k).saturating_mul(n);
    let fits = b.rows == k
        && Some(c.len()) == m.checked_mul(n)
        && a.in_bounds()
        && b.in_bounds()
        && isize::try_from(n).is_ok();
    if product_threads() < 2 || work < PARALLEL_PRODUCT || !fits || m.min(n) < 2 {
        return gemm(a, b, c);
    }
    if m >= n {
        let half = m / 2;
        let Some(second_data) = half
            .checked_mul(a.row_stride)
            .and_then(|start| a.data.get(start..))
        else {
            return gemm(a, b, c);
        };
        let first = MatrixView { rows: half, ..a };
        let second = MatrixView {
            data: second_data,
            rows: m - half,
            ..a
        };
        let (c_first, c_second) = c.split_at_mut(half * n);
        return std::thread::scope(|scope| {
            let other = scope.spawn(|| gemm(second, b, c_second));
            let mine = gemm(first, b, c_first);
            let theirs = other
                .join()
                .unwrap_or_else(|_| Err(CodegenError("a GEMM thread panicked".into())));
            mine.and(theirs)
        });
    }
    let half = n / 2;
    let Some(second_data) = half
        .checked_mul(b.col_stride)
        .and_then(|start| b.data.get(start..))
    else {
        return gemm(a, b, c);
    };
    let first = MatrixView { cols: half, ..b };
    let second = MatrixView {
        data: second_data,
        cols: n - half,
        ..b
    };
    if !first.in_bounds() || !second.in_bounds() {
        return gemm(a, b, c);
    }
    /// The output's address, handed to the second thread.
    struct Output<T>(*mut T);
    // SAFETY: the pointer is only used for the columns `half..n` of `c`,
    // which the other thread never touches (see below).
    unsafe impl<T: Send> Send for Output<T> {}
    let base = c.as_mut_ptr();
    // SAFETY: `base.add(half)` stays inside `c` (half < n <= c.len()).
    let second_output = Output(unsafe { base.add(half) });
    fn raw<T>(view: &MatrixView<'_, T>) -> (*const T, isize, isize) {
        (
            view.data.as_ptr(),
            view.row_stride as isize,
            view.col_stride as isize,
        )
    }
    let ldc = n as isize;
    std::thread::scope(|scope| {
        let other = scope.spawn(move || {
            let output = second_output;
            let (a_raw, second_raw) = (raw(&a), raw(&second));
            // SAFETY: `a` (m x k) and the second half of `b` (k x (n -
            // half)) are in bounds (checked above); the output is the
            // columns `half..n` of the m x n row-major `c`, exclusively
            // borrowed for this scope, which this thread alone writes.
            unsafe { T::raw_gemm(m, k, n - half, a_raw, second_raw, (output.0, ldc)) }
        });
        // SAFETY: as above, for the columns `0..half`, which this thread
        // alone writes; `c` outlives the scope.
        unsafe { T::raw_gemm(m, k, half, raw(&a), raw(&first), (base, ldc)) };
        other
            .join()
            .map_err(|_| CodegenError("a GEMM thread panicked".into()))
    })
}

/// `c = a @ b` by the tuned GEMM of the `gemm` crate (cache
/// blocking and a vectorized micro-kernel), `c` row-major
/// `a.rows x b.cols`, in `f64` or `f32`. In `f64` only the order of the
/// sums differs from the interpreter's loop, so results agree to `f64`
/// rounding; in `f32` the sums are `f32` sums (as in PyTorch), within a few
/// `f32` roundings of the interpreter's `f64` sum rounded once. Small
/// `f32` products run on `small_sgemm` instead where the host has
/// AVX-512, with the same sums bit for bit.
pub fn gemm<T: GemmElement>(
    a: MatrixView<'_, T>,
    b: MatrixView<'_, T>,
    c: &mut [T],
) -> Result<(), CodegenError> {
    gemm_with(a, b, c, true)
}

/// `gemm` always on the `gemm` crate, small products too (what
/// `small_sgemm` is tested and measured against).
pub fn gemm_crate<T: GemmElement>(
    a: MatrixView<'_, T>,
    b: MatrixView<'_, T>,
    c: &mut [T],
) -> Result<(), CodegenError> {
    gemm_with(a, b, c, false)
}

/// `gemm`, with or without the small-product path.
fn gemm_with<T: GemmElement>(
    a: MatrixView<'_, T>,
    b: MatrixView<'_, T>,
    c: &mut [T],
    small: bool,
) -> Result<(), CodegenError> {
    let (m, k, n) = (a.rows, a.cols, b.cols);
    if b.rows != k
        || Some(c.len()) != m.checked_mul(n)
        || !a.in_bounds()
        || !b.in_bounds()
        || isize::try_from(n).is_err()
    {
        return Err(CodegenError(format!(
            "matrix product views do not fit: {m}x{k} @ {}x{n} into {} elements",
            b.rows,
            c.len()
        )));
    }
    if m == 0 || n == 0 {
        return Ok(());
    }
    if k == 0 {
        c.fill(T::default());
        return Ok(());
    }
    // SAFETY: the views and `c` were checked above, as `small_gemm`
    // requires.
    if small && unsafe { T::small_gemm(a, b, c) } {
        return Ok(());
    }
    // SAFETY: `a` is m x k and `b` is k x n, and every element they address
    // lies inside their slices (`in_bounds`, with strides that fit
    // `isize`); `c` holds exactly m * n elements, written row-major (row
    // stride n, column stride 1), and is an exclusive borrow, so it aliases
    // neither input.
    unsafe {
        T::raw_gemm(
            m,
            k,
            n,
            (
                a.data.as_ptr(),
                a.row_stride as isize,
                a.col_stride as isize,
            ),
            (
                b.data.as_ptr(),
                b.row_stride as isize,
                b.col_stride as isize,
            ),
            (c.as_mut_ptr(), n as isize),
        );
    }
    Ok(())
}
