//! Cranelift helpers every code generator of the JIT uses, and nothing
//! else: how a buffer stores its elements (`Elem`), loads and stores of
//! them, addresses, counted loops, constants and selects of any lane
//! width, and calls of the runtime functions. A leaf: it imports no other
//! module of the JIT.

use std::collections::{BTreeMap, HashMap};

use cranelift_codegen::ir::condcodes::{CondCode, IntCC};
use cranelift_codegen::ir::{
    Block, BlockArg, Endianness, FuncRef, InstBuilder, MemFlagsData, Value, types,
};
use cranelift_frontend::FunctionBuilder;
use cranelift_jit::JITModule;
use cranelift_module::{FuncId, Module};

use crate::ir::DType;

/// Why code could not be generated (a compiler bug or an unsupported host).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CodegenError(pub String);

impl std::fmt::Display for CodegenError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "code generation failed: {}", self.0)
    }
}

impl std::error::Error for CodegenError {}

/// How many lanes a value has: 2 for `f64x2`, 4 for `f32x4`, else 1.
pub(super) fn lanes(b: &FunctionBuilder<'_>, value: Value) -> u8 {
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
pub(super) fn keep_where(
    b: &mut FunctionBuilder<'_>,
    condition: Value,
    x: Value,
    zero: Value,
) -> Value {
    let ty = b.func.dfg.value_type(x);
    if ty.is_vector() {
        let mask = b.ins().bitcast(ty, MemFlagsData::new(), condition);
        b.ins().band(mask, x)
    } else {
        b.ins().select(condition, x, zero)
    }
}

/// One value from per-lane scalars: the scalar itself, or an `f64x2`.
pub(super) fn gather(b: &mut FunctionBuilder<'_>, scalars: &[Value]) -> Value {
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
    pub(super) module: &'a mut JITModule,
    pub(super) imports: &'a BTreeMap<&'static str, FuncId>,
    pub(super) declared: HashMap<&'static str, FuncRef>,
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

/// How a buffer stores its elements: an `f32` value as `f32` (half the
/// bytes), everything else (`f64`, `i32` labels and indices) as `f64`. A
/// sum a kernel accumulates in place is `f64` whatever its type, so that it
/// sums in `f64` as the interpreter does and is rounded once at the end.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Elem {
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
pub(super) fn access_flags(vector: bool) -> MemFlagsData {
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

/// Emits `for j in 0..count { carried = body(j, carried) }` and returns the
/// carried values after the loop; the builder continues after it.
pub(super) fn counted_loop(
    b: &mut FunctionBuilder<'_>,
    count: Value,
    initial: &[Value],
    mut body: impl FnMut(&mut FunctionBuilder<'_>, Value, &[Value]) -> Result<Vec<Value>, CodegenError>,
) -> Result<Vec<Value>, CodegenError> {
    let header = b.create_block();
    let inside = b.create_block();
    let exit = b.create_block();
    b.append_block_param(header, types::I64);
    for &value in initial {
        let ty = b.func.dfg.value_type(value);
        b.append_block_param(header, ty);
        b.append_block_param(exit, ty);
    }
    let zero = b.ins().iconst(types::I64, 0);
    let arguments: Vec<BlockArg> = std::iter::once(zero)
        .chain(initial.iter().copied())
        .map(Into::into)
        .collect();
    b.ins().jump(header, &arguments);

    b.switch_to_block(header);
    let params = b.block_params(header).to_vec();
    let (j, carried) = (params[0], &params[1..]);
    let done: Vec<BlockArg> = carried.iter().copied().map(Into::into).collect();
    loop_branch(b, (IntCC::SignedLessThan, j, count), inside, (exit, &done));

    b.switch_to_block(inside);
    let next = body(b, j, carried)?;
    let j = b.ins().iadd_imm_u(j, 1);
    let arguments: Vec<BlockArg> = std::iter::once(j).chain(next).map(Into::into).collect();
    b.ins().jump(header, &arguments);

    b.switch_to_block(exit);
    Ok(b.block_params(exit).to_vec())
}
