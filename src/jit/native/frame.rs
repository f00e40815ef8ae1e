//! A frame: a program bound to one set of sizes. Its buffers are
//! allocated once and never resized (compiled code holds their
//! addresses); every call is pushed with its buffers and every length it
//! can reach checked then (`push_kernel`, `push_rows`, `push_copy`,
//! `push_indexed`); `run` calls the compiled step entry, which hands host
//! work to Rust through the trampoline `gradc_host`.

use std::cell::Cell;
use std::rc::Rc;

use cranelift_jit::JITModule;

use cranelift_module::FuncId;

use crate::interp::InterpError;
use crate::jit::clif::CodegenError;
use crate::jit::clif::Elem;
use crate::jit::elementwise::Access;
use crate::jit::elementwise::CompiledKernel;
use crate::jit::movers::Mover;
use crate::jit::native::convert::narrow_elements;
use crate::jit::native::convert::widen_elements;
use crate::jit::row_passes::PassKernel;
use crate::jit::rows::RowKernel;
use crate::passes::fusion::RowForm;

/// A step entry: `fn(words, state, context) -> status` (see `Frame::run`).
pub(in crate::jit) type EntryFn =
    extern "C" fn(*const i64, *mut HostState<'static>, *const i64) -> i64;

/// One buffer of a frame.
pub(crate) enum Storage {
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

/// An element type a frame's buffers can hold, for host work that reads
/// and writes them in place (the GEMM).
pub trait Stored: Sized {
    /// The buffer's elements, if it holds this type.
    fn elements(storage: &Storage) -> Option<&[Self]>;
    /// The buffer's elements, writable, if it holds this type.
    fn elements_mut(storage: &mut Storage) -> Option<&mut [Self]>;
}

/// `Stored` for an element type and the `Storage` variant holding it.
macro_rules! stored {
    ($t:ty, $variant:ident) => {
        impl Stored for $t {
            fn elements(storage: &Storage) -> Option<&[$t]> {
                match storage {
                    Storage::$variant(data) => Some(data),
                    _ => None,
                }
            }
            fn elements_mut(storage: &mut Storage) -> Option<&mut [$t]> {
                match storage {
                    Storage::$variant(data) => Some(data),
                    _ => None,
                }
            }
        }
    };
}

stored!(f32, F32);
stored!(f64, F64);

/// Work the step entry hands back to Rust between compiled kernels: the
/// matrix products (on the GEMM), the kernels that are not compiled (on the
/// interpreter), the checks of labels. `index` is what `Frame::push_host`
/// was given.
pub(crate) trait Host {
    /// Does host work `index` on the frame's buffers.
    fn call(&mut self, index: usize, buffers: &mut Buffers<'_>) -> Result<(), InterpError>;
}

/// The frame's buffers as host work sees them: their elements can be read
/// and written, but no buffer can be resized or replaced, since compiled
/// code holds their addresses.
pub(crate) struct Buffers<'a>(&'a mut [Storage]);

impl Buffers<'_> {
    /// How buffer `slot` stores its elements.
    pub(crate) fn elem(&self, slot: usize) -> Elem {
        self.0[slot].elem()
    }

    /// The first `count` elements of buffer `slot` as `f64`s.
    pub fn read(&self, slot: usize, count: usize) -> std::borrow::Cow<'_, [f64]> {
        self.0[slot].read(count)
    }

    /// Copies elements `from_range` of buffer `from_slot` of `source` into
    /// buffer `slot` from element `at`: a `memcpy` between buffers of one
    /// element type, converted between `f32` and `f64` ones; an error if a
    /// range does not fit its buffer.
    pub(crate) fn copy_from(
        &mut self,
        (slot, at): (usize, usize),
        source: &Buffers<'_>,
        (from_slot, from_range): (usize, std::ops::Range<usize>),
    ) -> Result<(), CodegenError> {
        let count = from_range.len();
        let short = || {
            CodegenError(format!(
                "copying {count} elements into buffer {slot} at {at}"
            ))
        };
        let to = at..at.checked_add(count).ok_or_else(short)?;
        let (Some(target), Some(from)) = (self.0.get_mut(slot), source.0.get(from_slot)) else {
            return Err(short());
        };
        match (target, from) {
            (Storage::F32(t), Storage::F32(f)) => t
                .get_mut(to)
                .zip(f.get(from_range))
                .map(|(t, f)| t.copy_from_slice(f)),
            (Storage::F64(t), Storage::F64(f)) => t
                .get_mut(to)
                .zip(f.get(from_range))
                .map(|(t, f)| t.copy_from_slice(f)),
            (Storage::F32(t), Storage::F64(f)) => t
                .get_mut(to)
                .zip(f.get(from_range))
                .map(|(t, f)| narrow_elements(f, t)),
            (Storage::F64(t), Storage::F32(f)) => t
                .get_mut(to)
                .zip(f.get(from_range))
                .map(|(t, f)| widen_elements(f, t)),
        }
        .ok_or_else(short)
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
    pub(crate) fn swap(&mut self, a: usize, b: usize) -> Result<(), CodegenError> {
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
pub(in crate::jit) struct HostState<'a> {
    host: &'a mut dyn Host,
    buffers: *mut [Storage],
    error: Option<InterpError>,
}

/// The one runtime function the step entry calls for host work: runs
/// `Host::call` and returns 0, or 1 with the error kept in the state (a
/// panic in host work becomes an error too: it must not unwind through
/// compiled code).
pub(in crate::jit) extern "C" fn gradc_host(state: *mut HostState<'static>, index: i64) -> i64 {
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
pub(in crate::jit) enum BoundCall {
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
    /// A kernel in passes over `rows x cols`; `slots` are its inputs then
    /// outputs.
    Passes {
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
pub(crate) struct CopyBlock {
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
pub(crate) struct Frame {
    buffers: Vec<Storage>,
    pub(in crate::jit) calls: Vec<BoundCall>,
    pub(in crate::jit) entry: Option<EntryFn>,
    /// Scratch rebuilt by every run: the entry's words and each kernel's
    /// pointer array.
    words: Vec<i64>,
    pointers: Vec<Vec<*const u8>>,
    /// Keeps the entry's code (and the kernels it calls) in memory.
    pub(in crate::jit) lease: Option<Rc<CodeLease>>,
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

    /// The first `count` elements of buffer `slot` as `f64`s, into `out` (replacing what it held, reusing its memory).
    pub(crate) fn read_into(&self, slot: usize, count: usize, out: &mut Vec<f64>) {
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
    pub(crate) fn push_kernel(
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
    pub(crate) fn push_rows(
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
        let reached: Vec<usize> = lengths.iter().chain(&outs).copied().collect();
        self.check_buffers(
            "row kernel",
            &slots,
            (&reached, &kernel.elems),
            lengths.len(),
        )?;
        self.calls.push(BoundCall::Rows {
            func: kernel.func,
            slots,
            rows: rows as i64,
            cols: cols as i64,
        });
        Ok(())
    }

    /// Checks the buffers `slots` of a `what` call: each stores its element
    /// as the kernel reads it and holds at least the elements the kernel
    /// reaches (`reached`, `elems`), and each output (from `first_output`
    /// on) is its own buffer.
    fn check_buffers(
        &self,
        what: &str,
        slots: &[usize],
        (reached, elems): (&[usize], &[Elem]),
        first_output: usize,
    ) -> Result<(), CodegenError> {
        if slots.len() != reached.len() || slots.len() != elems.len() {
            return Err(CodegenError(format!(
                "{what}: a buffer per argument expected"
            )));
        }
        for (j, (&length, &expected)) in reached.iter().zip(elems).enumerate() {
            let (has, elem) = self.buffer(slots[j])?;
            if elem != expected {
                return Err(CodegenError(format!(
                    "{what}: buffer {j} holds {elem:?}, the kernel reads {expected:?}"
                )));
            }
            if has < length {
                return Err(CodegenError(format!(
                    "{what}: buffer {j} has {has} elements, expected {length}"
                )));
            }
        }
        for (j, output) in slots.iter().enumerate().skip(first_output) {
            if slots[..j].contains(output) {
                return Err(CodegenError(format!(
                    "{what}: an output aliases another buffer"
                )));
            }
        }
        Ok(())
    }

    /// Appends a call of a kernel in passes over `rows x cols` (`row_passes`)
    /// reading and writing `slots` (inputs, then outputs), checking that
    /// every buffer stores what the kernel reads and holds what its form
    /// reaches (a full one `rows * cols` elements, one per row `rows`, one
    /// per column `cols`, a single one 1), and that each output is its own
    /// buffer.
    pub(crate) fn push_passes(
        &mut self,
        kernel: &PassKernel,
        slots: Vec<usize>,
        rows: usize,
        cols: usize,
    ) -> Result<(), CodegenError> {
        let Some(all) = rows.checked_mul(cols).filter(|&n| i64::try_from(n).is_ok()) else {
            return Err(CodegenError(format!(
                "kernel in passes: bad sizes {rows} x {cols}"
            )));
        };
        let reached: Vec<usize> = kernel
            .forms
            .iter()
            .map(|form| match form {
                RowForm::Full => all,
                RowForm::PerRow => rows,
                RowForm::Column => cols,
                RowForm::Single => 1,
            })
            .collect();
        self.check_buffers(
            "kernel in passes",
            &slots,
            (&reached, &kernel.elems),
            kernel.inputs.len(),
        )?;
        self.calls.push(BoundCall::Passes {
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
    pub(crate) fn push_copy(
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
    pub(crate) fn push_indexed(
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
    pub(crate) fn push_host(&mut self, index: usize) {
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
                }
                | BoundCall::Passes {
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

/// The code memory of a `CodeMemory`'s module: the cache and every frame
/// whose entry it compiled hold the lease, and the last one to go frees
/// the memory (before, compiled code was never freed).
#[derive(Default)]
pub(in crate::jit) struct CodeLease(Cell<Option<JITModule>>);

impl CodeLease {
    /// Takes the module whose code memory this lease keeps, to free it
    /// when the lease goes.
    pub(in crate::jit) fn set(&self, module: JITModule) {
        self.0.set(Some(module));
    }
}

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
