//! The JIT module and the compilation of every kind of kernel into it:
//! elementwise kernels (`elementwise`), row kernels (`rows`) and movers
//! (`movers`), each declared, built and defined here, with the CLIF text
//! `--stage clif` prints. The module's memory and the step entry live in
//! `native::code`.

use std::collections::{BTreeMap, HashMap};

use cranelift_codegen::ir::{
    AbiParam, FuncRef, InstBuilder, MemFlagsData, Signature, StackSlotData, StackSlotKind,
    UserFuncName, Value, types,
};
use cranelift_codegen::isa::CallConv;
use cranelift_codegen::settings::{self, Configurable};
use cranelift_codegen::{Context, ir::Function};
use cranelift_frontend::{FunctionBuilder, FunctionBuilderContext};
use cranelift_jit::{JITBuilder, JITModule};
use cranelift_module::{FuncId, Linkage, Module, default_libcall_names};

use crate::ir::{DType, Dim, Graph, NodeId};
use crate::jit::clif::Calls;
use crate::jit::clif::CodegenError;
use crate::jit::clif::Elem;
use crate::jit::clif::load;
use crate::jit::elementwise::Access;
use crate::jit::elementwise::CompiledKernel;
use crate::jit::elementwise::ROW_SCRATCH_BYTES;
use crate::jit::elementwise::Single;
use crate::jit::elementwise::f32_exact;
use crate::jit::elementwise::runtime_functions;
use crate::jit::elementwise::{Body, Layout, Prelude, layout, static_counts};
use crate::jit::movers::Mover;
use crate::jit::movers::emit_copy;
use crate::jit::movers::emit_gather;
use crate::jit::movers::emit_scatter;
use crate::jit::native::code::CodeMemory;
use crate::jit::native::frame::gradc_host;
use crate::jit::native::frame::{BoundCall, Frame};
use crate::jit::row_passes::{PassKernel, emit_passes, output_elem};
use crate::jit::rows;
use crate::jit::rows::RowKernel;
use crate::jit::rows::RowOp;

/// Which CLIF text a `CodeCache` keeps of each function it compiles.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) enum ClifText {
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

/// A JIT module holding compiled kernels; dropping it frees their code.
pub(crate) struct CodeCache {
    /// The module and its code memory.
    memory: CodeMemory,
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
        // The runtime functions: elementwise code's, and the step entry's
        // trampoline for host work.
        let mut functions: Vec<(&'static str, *const u8, Vec<types::Type>, types::Type)> =
            runtime_functions()
                .into_iter()
                .map(|(name, address, params)| (name, address, params, types::F64))
                .collect();
        functions.push((
            "gradc_host",
            gradc_host as *const u8,
            vec![types::I64, types::I64],
            types::I64,
        ));
        let mut builder = JITBuilder::with_isa(isa, default_libcall_names());
        for &(name, address, ..) in &functions {
            builder.symbol(name, address);
        }
        let mut module = JITModule::new(builder);
        let mut imports = BTreeMap::new();
        for (name, _, params, result) in functions {
            let mut signature = Signature::new(CallConv::SystemV);
            signature
                .params
                .extend(params.into_iter().map(AbiParam::new));
            signature.returns.push(AbiParam::new(result));
            let id = module
                .declare_function(name, Linkage::Import, &signature)
                .map_err(|e| CodegenError(e.to_string()))?;
            imports.insert(name, id);
        }
        Ok(CodeCache {
            memory: CodeMemory::new(module),
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
        let Layout {
            loop_shape,
            access,
            cols,
            read_shapes,
            elems,
        } = layout(graph, nodes, inputs, input_elems, outputs)?;
        let loop_shape = loop_shape.as_ref();
        // (Set by `Body::flat` when the kernel relies on it.)
        let (id, multiple_of, clif) = self.build(5, |b, calls, params| {
            let mut multiple_of = None;
            let (ptrs, ks, ms, n, context) =
                (params[0], params[1], params[2], params[3], params[4]);
            let prelude = Prelude::load(b, &access, (ptrs, ks, ms, context));
            prelude.zero_sums(b, &access, inputs.len(), cols)?;
            // The running total of each sum to a single element is kept in
            // a register through the loops and stored after them, in the
            // same order.
            let single_sums: Vec<usize> = (inputs.len()..access.len())
                .filter(|&j| access[j] == Access::Single)
                .collect();
            // Whether the vector loops take four `f32`s at a time.
            let quad = f32_exact(graph, nodes, &elems[..inputs.len()], outputs);
            // A single-element input is loaded once, before the loops (no
            // kernel writes its inputs), as a scalar, a pair, and (for
            // `f32x4` loops) four `f32`s.
            let singles: Vec<Option<Single>> = (0..inputs.len())
                .map(|j| {
                    (access[j] == Access::Single).then(|| {
                        let scalar = load(b, elems[j], false, prelude.bases[j]);
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
                bases: &prelude.bases,
                singles: &singles,
                quad,
                single_sums: &single_sums,
                seed: prelude.seed,
                step: prelude.step,
                zero: prelude.zero_f64,
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
                .map(|_| b.ins().splat(types::F64X2, prelude.zero_f64))
                .collect();
            let lanes = match cols {
                Some(cols) => body.rows_and_columns(b, calls, n, cols, &start)?,
                None => {
                    let (lanes, width) = body.flat(
                        b,
                        calls,
                        n,
                        &prelude.factors,
                        &start,
                        static_counts(loop_shape),
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
            body.finish_sums(b, &prelude, (n, cols), &totals)?;
            Ok(multiple_of)
        })?;
        Ok((
            CompiledKernel {
                func: id,
                inputs: inputs.to_vec(),
                outputs: outputs.to_vec(),
                access,
                cols,
                read_shapes,
                elems,
                multiple_of,
            },
            clif,
        ))
    }

    /// Compiles a kernel in passes over the rows of `loop_shape`
    /// (`row_passes`): `nodes` in order, reading `inputs` (stored as
    /// `input_elems`) and writing `outputs` (by their types); also returns
    /// the CLIF text.
    pub(crate) fn compile_passes(
        &mut self,
        graph: &Graph,
        nodes: &[NodeId],
        (inputs, input_elems): (&[NodeId], &[Elem]),
        outputs: &[NodeId],
        loop_shape: &crate::ir::Shape,
    ) -> Result<(PassKernel, String), CodegenError> {
        let mut elems = input_elems.to_vec();
        elems.extend(outputs.iter().map(|&o| output_elem(graph, o, loop_shape)));
        let (id, forms, clif) = self.build(4, |b, calls, params| {
            emit_passes(
                b,
                calls,
                graph,
                (nodes, inputs, outputs),
                loop_shape,
                elems.clone(),
                params,
            )
        })?;
        Ok((
            PassKernel {
                func: id,
                inputs: inputs.to_vec(),
                outputs: outputs.to_vec(),
                forms,
                elems,
            },
            clif,
        ))
    }

    /// Declares a kernel taking `params` pointer-sized arguments and builds
    /// its body by `body` (given the builder at the entry block, the
    /// runtime calls and the parameters; the return is added after it).
    /// Returns the function, what `body` returned, and its CLIF text.
    fn build<R>(
        &mut self,
        params: usize,
        body: impl FnOnce(&mut FunctionBuilder<'_>, &mut Calls<'_>, &[Value]) -> Result<R, CodegenError>,
    ) -> Result<(FuncId, R, String), CodegenError> {
        let (id, mut context) = self.declare("kernel", params, false)?;
        let mut builder_context = FunctionBuilderContext::new();
        let result = {
            let mut b = FunctionBuilder::new(&mut context.func, &mut builder_context);
            let entry = b.create_block();
            b.append_block_params_for_function_params(entry);
            b.switch_to_block(entry);
            let params = b.block_params(entry).to_vec();
            let mut calls = Calls {
                module: self.memory.module(),
                imports: &self.imports,
                declared: HashMap::new(),
            };
            let result = body(&mut b, &mut calls, &params)?;
            b.ins().return_(&[]);
            b.seal_all_blocks();
            b.finalize(self.memory.module().target_config());
            result
        };
        let clif = self.finish(id, context)?;
        Ok((id, result, clif))
    }

    /// Declares a new local function `{prefix}{n}` taking `params`
    /// pointer-sized arguments (and returning one if `returns`), and a
    /// context to build its body in.
    pub(super) fn declare(
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
            .memory
            .module()
            .declare_function(&name, Linkage::Local, &signature)
            .map_err(|e| CodegenError(e.to_string()))?;
        let mut context = Context::new();
        context.func = Function::with_name_signature(UserFuncName::user(0, id.as_u32()), signature);
        Ok((id, context))
    }

    /// Defines a built function and returns its CLIF text, if kept (the
    /// module is finalized when a step entry is compiled).
    pub(super) fn finish(
        &mut self,
        id: FuncId,
        mut context: Context,
    ) -> Result<String, CodegenError> {
        let as_built =
            (self.keep_clif == ClifText::AsBuilt).then(|| context.func.display().to_string());
        self.memory
            .module()
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
    pub(crate) fn compile_entry(&mut self, frame: &mut Frame) -> Result<String, CodegenError> {
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
            let host = self.memory.module().declare_func_in_func(host, b.func);
            let mut declared: HashMap<FuncId, FuncRef> = HashMap::new();
            let mut word = 0;
            for call in &frame.calls {
                let mut load_word = |b: &mut FunctionBuilder<'_>| {
                    let value = b.ins().load(pointer, flags, words, 8 * word);
                    word += 1;
                    value
                };
                match call {
                    BoundCall::Kernel { func, .. }
                    | BoundCall::Rows { func, .. }
                    | BoundCall::Passes { func, .. } => {
                        // A kernel's words, and the run's context where it
                        // takes one (its dropout masks).
                        let (words, context) = match call {
                            BoundCall::Kernel { .. } => (4, true),
                            BoundCall::Passes { .. } => (3, true),
                            _ => (3, false),
                        };
                        let mut arguments: Vec<Value> =
                            (0..words).map(|_| load_word(&mut b)).collect();
                        if context {
                            arguments.push(run_context);
                        }
                        let callee = *declared.entry(*func).or_insert_with(|| {
                            let callee = self.memory.module().declare_func_in_func(*func, b.func);
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
                            let callee = self.memory.module().declare_func_in_func(*func, b.func);
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
            b.finalize(self.memory.module().target_config());
        }
        let clif = self.finish(id, context)?;
        self.memory.install_entry(id, frame)?;
        Ok(clif)
    }

    /// The kernel that moves elements as `mover` says, for buffers storing
    /// `elem` (compiled on first use): `fn(ptrs, params)`, with the
    /// buffers' addresses in `ptrs` and its sizes in `params`
    /// (`Mover::buffers`, `Mover::params`). Also returns the CLIF text
    /// (empty if compiled before).
    pub(crate) fn compile_mover(
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
            b.finalize(self.memory.module().target_config());
        }
        let clif = self.finish(id, context)?;
        self.movers.push(((mover, elem), id));
        Ok((id, clif))
    }
    /// Compiles a row kernel (`jit::rows`) computing `outputs` (a node
    /// `RowOp::of` accepts, or the pair of `RowOp::CrossEntropyWithVjp`)
    /// from the first one's operands, whose inputs (`RowOp::reads`) are
    /// stored as `input_elems` say; also returns the CLIF text.
    pub(crate) fn compile_rows(
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
        let (id, (), clif) = self.build(3, |b, calls, params| {
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
            rows::emit(b, calls, op, f32, &elems, params[0], shape)
        })?;
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
