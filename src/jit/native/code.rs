//! The JIT's code memory: a `CodeMemory` owns the Cranelift module, whose
//! code lives until it and every frame whose entry it installed are gone
//! (`CodeLease`), and turns a compiled step entry (built by
//! `CodeCache::compile_entry`) into a callable function, checking its
//! signature first.

use std::mem::ManuallyDrop;
use std::rc::Rc;

use cranelift_codegen::ir::{AbiParam, types};
use cranelift_codegen::isa::CallConv;
use cranelift_jit::JITModule;
use cranelift_module::{FuncId, Linkage, Module};

use crate::jit::clif::CodegenError;
use crate::jit::native::frame::{CodeLease, EntryFn, Frame};

/// A JIT module and its code memory: the memory lives until this and
/// every frame whose entry it installed are gone (`CodeLease`).
pub(in crate::jit) struct CodeMemory {
    /// Taken out only when this is dropped (into `lease`).
    module: ManuallyDrop<JITModule>,
    /// Keeps the module's code memory until this and every frame whose
    /// entry it installed are gone.
    lease: Rc<CodeLease>,
}

impl CodeMemory {
    /// Takes over a module.
    pub(in crate::jit) fn new(module: JITModule) -> CodeMemory {
        CodeMemory {
            module: ManuallyDrop::new(module),
            lease: Rc::default(),
        }
    }

    /// The module, to declare, define and finalize functions in.
    pub(in crate::jit) fn module(&mut self) -> &mut JITModule {
        &mut self.module
    }

    /// Finalizes the module and makes the function `id` the frame's step
    /// entry (`fn(words, state, context) -> status`, `Frame::run`), with a
    /// lease on the code memory. Refuses a function whose signature is not
    /// an entry's or that is not defined.
    pub(in crate::jit) fn install_entry(
        &mut self,
        id: FuncId,
        frame: &mut Frame,
    ) -> Result<(), CodegenError> {
        let declaration = self.module.declarations().get_function_decl(id);
        let pointer = AbiParam::new(types::I64);
        let signature = &declaration.signature;
        let fits = signature.call_conv == CallConv::SystemV
            && signature.params == [pointer; 3]
            && signature.returns == [pointer]
            && declaration.linkage == Linkage::Local;
        if !fits {
            return Err(CodegenError(format!("function {id} is not a step entry")));
        }
        self.module
            .finalize_definitions()
            .map_err(|e| CodegenError(e.to_string()))?;
        let code = self.module.get_finalized_function(id);
        // SAFETY: `code` is the finalized machine code of a function
        // defined in this module (a local function that was not defined
        // fails `finalize_definitions`) with three pointer-sized parameters
        // and one pointer-sized return on the System V ABI (checked above),
        // which matches the `extern "C"` type `EntryFn` on this host. The
        // frame takes a lease on the code memory (below), so the pointer
        // stays valid as long as the frame, even if the frame outlives this
        // module's cache, and so do the kernels the entry calls
        // (`CodeLease`). What the code does with its arguments is what the
        // code generators built, for the calls `Frame` checked when they
        // were pushed (`Frame::run`).
        frame.entry = Some(unsafe { std::mem::transmute::<*const u8, EntryFn>(code) });
        frame.lease = Some(Rc::clone(&self.lease));
        Ok(())
    }
}

impl Drop for CodeMemory {
    fn drop(&mut self) {
        // SAFETY: `module` is not used again: this is the last use of it,
        // and the field is not dropped on its own (`ManuallyDrop`).
        let module = unsafe { ManuallyDrop::take(&mut self.module) };
        // (Freed with the lease, now or when the last frame goes.)
        self.lease.set(module);
    }
}
