//! The JIT's code memory and the step entry: a `CodeCache` owns the
//! Cranelift module, whose code lives until the cache and every frame
//! whose entry it compiled are gone (`CodeLease`); `compile_entry` builds
//! a frame's entry (its calls in order, host work through `gradc_host`)
//! and turns the finalized code into a callable function.

use std::cell::Cell;
use std::collections::{BTreeMap, HashMap};
use std::mem::ManuallyDrop;
use std::rc::Rc;

use cranelift_codegen::ir::{FuncRef, InstBuilder, MemFlagsData, Value, types};
use cranelift_frontend::{FunctionBuilder, FunctionBuilderContext};
use cranelift_jit::JITModule;
use cranelift_module::{FuncId, Module};

use crate::jit::cache::ClifText;
use crate::jit::clif::CodegenError;
use crate::jit::clif::Elem;
use crate::jit::movers::Mover;
use crate::jit::native::frame::BoundCall;
use crate::jit::native::frame::EntryFn;
use crate::jit::native::frame::Frame;

/// A JIT module holding compiled kernels; dropping it frees their code.
pub struct CodeCache {
    /// Taken out only when the cache is dropped (into `lease`).
    pub(in crate::jit) module: ManuallyDrop<JITModule>,
    /// Keeps the module's code memory until this cache and every frame
    /// whose entry it compiled are gone.
    pub(in crate::jit) lease: Rc<CodeLease>,
    /// The runtime functions, by name: a `BTreeMap`, so every kernel
    /// declares them in the same order and `--stage clif` is deterministic.
    pub(in crate::jit) imports: BTreeMap<&'static str, FuncId>,
    pub(in crate::jit) next: u32,
    /// The kernels that move elements, once compiled, by what they do
    /// and the element type.
    pub(in crate::jit) movers: Vec<((Mover, Elem), FuncId)>,
    /// Which CLIF text of each function to keep (`--stage clif`):
    /// printing it is a tenth of the compile time.
    pub(in crate::jit) keep_clif: ClifText,
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
pub(in crate::jit) struct CodeLease(Cell<Option<JITModule>>);

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

impl CodeCache {
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
}
