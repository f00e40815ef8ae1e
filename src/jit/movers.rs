//! Kernels that move elements without arithmetic: strided copies (concat,
//! slice, transpose, broadcast, reshape), gathers (embedding) and
//! scatter-adds (its gradient), each compiled once per element type
//! (`Mover`) and bound to its sizes when a frame is (`Frame::push_copy`,
//! `Frame::push_indexed` check every address they can reach).

use cranelift_codegen::ir::{InstBuilder, MemFlagsData, Value, types};
use cranelift_frontend::FunctionBuilder;

use crate::jit::clif::CodegenError;
use crate::jit::clif::Elem;
use crate::jit::clif::counted_loop;
use crate::jit::clif::element_at;
use crate::jit::clif::load;

/// What a kernel that only moves elements does (`CodeCache::compile_mover`;
/// bound by `Frame::push_copy` and `push_indexed`, which check every
/// element it reaches).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Mover {
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
    pub(super) fn buffers(self) -> usize {
        match self {
            Mover::Copy => 2,
            Mover::Gather | Mover::Scatter => 3,
        }
    }

    /// How many sizes it reads.
    pub(super) fn params(self) -> usize {
        match self {
            Mover::Copy => 11,
            Mover::Gather => 3,
            Mover::Scatter => 4,
        }
    }
}

/// The integer type of an element's width: elements moved as bits.
pub(super) fn bits_of(elem: Elem) -> types::Type {
    match elem {
        Elem::F32 => types::I32,
        Elem::F64 => types::I64,
    }
}

/// An index stored as `f64`, truncated like `as usize` and capped at
/// `last`, so no address leaves its table (the runtime has checked the
/// indices already).
pub(super) fn capped_index(
    b: &mut FunctionBuilder<'_>,
    ids: Value,
    j: Value,
    last: Value,
) -> Value {
    let at = element_at(b, Elem::F64, ids, j);
    let index = b.ins().load(types::F64, MemFlagsData::trusted(), at, 0);
    let row = b.ins().fcvt_to_uint_sat(types::I64, index);
    b.ins().umin(row, last)
}

/// The body of `Mover::Copy`.
pub(super) fn emit_copy(
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
    counted_loop(b, counts[0], &[], |b, i, _| {
        let from_i = step(b, from[0], i, from[1]);
        let to_i = step(b, to[0], i, to[1]);
        counted_loop(b, counts[1], &[], |b, j, _| {
            let from_j = step(b, from_i, j, from[2]);
            let to_j = step(b, to_i, j, to[2]);
            counted_loop(b, counts[2], &[], |b, k, _| {
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
pub(super) fn over_indexed_rows(
    b: &mut FunctionBuilder<'_>,
    ids: Value,
    [n, d, v]: [Value; 3],
    mut each: impl FnMut(&mut FunctionBuilder<'_>, Value, Value),
) -> Result<(), CodegenError> {
    let last = b.ins().iadd_imm_s(v, -1);
    counted_loop(b, n, &[], |b, j, _| {
        let row = capped_index(b, ids, j, last);
        let at_row = b.ins().imul(row, d);
        let at_j = b.ins().imul(j, d);
        counted_loop(b, d, &[], |b, k, _| {
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
pub(super) fn emit_gather(
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
pub(super) fn emit_scatter(
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
    counted_loop(b, all, &[], |b, i, _| {
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
    counted_loop(b, all, &[], |b, i, _| {
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
