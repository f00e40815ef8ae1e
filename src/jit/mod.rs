//! The JIT backend: runs a graph's kernel plan (`passes::fusion`) as one
//! compiled call per step; training and evaluation (`run_wanted`) run the
//! graph optimized by `passes::optimize`. Elementwise kernels (with their
//! closing sums and counts, `elementwise`), kernels in passes over rows
//! for elementwise work that reads its own row reductions (`row_passes`),
//! row kernels (softmax, log-softmax, cross-entropy, max and logsumexp
//! over the last axis, layer normalization) and column kernels (batch
//! normalization, `rows`) and the kernels that move elements (`movers`)
//! are compiled by Cranelift (`cache`, with the helpers of `clif` and the
//! polynomial functions of `approx`); matrix products run on a tuned GEMM
//! (`gemm`, large ones on two threads); the few remaining kernels run on
//! the reference interpreter's kernels. The module list below gives each
//! file's job; `native` is the only one allowed `unsafe`.
//!
//! For each set of sizes (the batch size, mostly) the JIT binds a *frame*:
//! a buffer per value (`f32` values as `f32`), allocated once, and a
//! compiled *step entry* that
//! calls every kernel in plan order, handing matrix products and
//! interpreted kernels back to Rust (`Host`). A step copies the
//! leaves into their buffers (after the interpreter's checks), makes the
//! one call, and copies the values out as an `Evaluation`. A training step
//! (`Backend::run_carrying`) keeps the params and optimizer state in the
//! frame for the next step instead (`Resident`; moved out to host copies,
//! `Evicted`, when other work needs the frame).
//!
//! Compiled kernels compute exactly what the interpreter computes (`f64`
//! arithmetic, one `f32` rounding per op), so they agree bit for bit, but
//! for three stated exceptions: the GEMM sums in another order (and an
//! `f32` product in `f32`), a sum to one element adds in two or four
//! lanes, and `exp`, `log`, `tanh`, `sigmoid`, `softplus` and GELU's `erf`
//! are polynomials within a few ulps (`tests/jit.rs` and `tests/approx.rs`
//! state the tolerances; the fuzzer and generated models compare the
//! backends).

// Cranelift helpers every code generator uses (a leaf: imports no
// sibling), then the polynomial functions built on them.
mod approx;
mod clif;
// From the optimized graph to a program of kernels, and its compilation.
mod cache;
mod elementwise;
mod movers;
mod program;
mod row_passes;
mod rows;
// Binding a program to sizes, the resident training state, host work.
mod bind;
mod host;
mod resident;
mod scan;
// The only module allowed `unsafe`.
mod native;

pub use clif::CodegenError;
pub use elementwise::is_sum;
pub use native::gemm;

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use crate::interp::{self, Context, Evaluation, InterpError, Tensor};
use crate::ir::{Graph, IdBuildHasher, IdMap, NodeId};
use crate::jit::bind::Bound;
use crate::jit::bind::Frames;
use crate::jit::cache::ClifText;
use crate::jit::program::Program;
use crate::jit::program::ProgramKey;
use crate::jit::program::compile;
use crate::jit::program::optimized;
use crate::jit::program::program_key;
use crate::jit::resident::Evicted;
use crate::jit::resident::Resident;
use crate::train::run::RunOptions;
use crate::train::{Backend, BackendError, Carried, Kept};

/// How many kept states moved out of their frames a JIT holds (one per
/// session that steps on it, at most); beyond, the oldest is dropped, and
/// its session's next step fails.
const EVICTED: usize = 4;

/// The JIT backend. Programs are cached per graph version
/// (`Graph::version`): the runtime runs the same step graph every step, and
/// any change to a graph gives it a new version.
#[derive(Default)]
pub struct Jit {
    programs: HashMap<ProgramKey, Program, IdBuildHasher>,
    /// The frames bound for each program, by sizes (`bind::FRAMES` at most).
    frames: HashMap<ProgramKey, Frames, IdBuildHasher>,
    /// Which CLIF text programs keep (set by the first call of `clif`,
    /// `entry_clif` or `optimized_clif`).
    keep_clif: ClifText,
    /// Training state kept in a frame between steps
    /// (`Backend::run_carrying`).
    resident: Option<Resident>,
    /// Kept state moved out of its frame (which other work needed, or
    /// which was dropped), by ticket, until a step resumes it.
    evicted: HashMap<u64, Evicted>,
    /// The last ticket given out.
    tickets: u64,
    /// An evaluation handed back (`Backend::recycle`), whose tensors the
    /// next step's values are copied into.
    spare: Option<Evaluation>,
    /// The key `compiled` gave last, for the graph version and the values
    /// wanted it was asked for (a run asks for the same every step).
    last_key: Option<(u64, Option<Vec<NodeId>>, ProgramKey)>,
}

impl Jit {
    /// A backend with an empty cache.
    pub fn new() -> Jit {
        Jit::default()
    }

    /// The program for a graph: as given when `wanted` is `None` (every
    /// value can be read back), else optimized (`passes::optimize`) with
    /// the wanted values kept.
    fn program(
        &mut self,
        graph: &Graph,
        wanted: Option<&[NodeId]>,
    ) -> Result<&mut Program, InterpError> {
        let key = self.compiled(graph, wanted)?;
        self.program_at(&key)
    }

    /// The program of a key `compiled` gave.
    fn program_at(&mut self, key: &ProgramKey) -> Result<&mut Program, InterpError> {
        self.programs
            .get_mut(key)
            .ok_or_else(|| InterpError::Internal("the program vanished".into()))
    }

    /// Compiles the program for a graph (as `program` says) unless it is
    /// cached, and returns its key.
    fn compiled(
        &mut self,
        graph: &Graph,
        wanted: Option<&[NodeId]>,
    ) -> Result<ProgramKey, InterpError> {
        let key = match &self.last_key {
            Some((version, last, key))
                if *version == graph.version() && last.as_deref() == wanted =>
            {
                key.clone()
            }
            _ => {
                let key = program_key(graph, wanted);
                self.last_key = Some((graph.version(), wanted.map(<[_]>::to_vec), key.clone()));
                key
            }
        };
        if !self.programs.contains_key(&key) {
            let (run, ids) = match (&key.1, wanted) {
                (Some(kept), Some(wanted)) => {
                    let (run, ids) = optimized(graph, kept);
                    // A result the optimized graph cannot be asked for (a
                    // role two nodes share, say): the graph as given.
                    if wanted.iter().all(|id| ids.contains_key(id)) {
                        (run, ids)
                    } else {
                        (graph.clone(), IdMap::default())
                    }
                }
                _ => (graph.clone(), IdMap::default()),
            };
            let checked = crate::ir::expand::checked_shapes(graph);
            let program = compile(run, ids, self.keep_clif, checked)
                .map_err(|e| InterpError::Internal(e.to_string()))?;
            self.programs.insert(key.clone(), program);
        }
        Ok(key)
    }

    /// How many kernels of a graph are compiled, out of how many.
    pub fn coverage(&mut self, graph: &Graph) -> Result<(usize, usize), InterpError> {
        let program = self.program(graph, Some(&[]))?;
        Ok((
            program.kernels.iter().filter(|k| k.is_some()).count(),
            program.kernels.len(),
        ))
    }

    /// The Cranelift IR of every compiled kernel of a graph, with a line
    /// for each kernel left on the interpreter.
    pub fn clif(&mut self, graph: &Graph) -> Result<String, InterpError> {
        self.keep_clif_text(ClifText::AsBuilt);
        Ok(self.program(graph, Some(&[]))?.clif.join("\n"))
    }

    /// `clif`, but each kernel as Cranelift's optimizer left it: where the
    /// values ended up (out of loops or not).
    pub fn optimized_clif(&mut self, graph: &Graph) -> Result<String, InterpError> {
        self.keep_clif_text(ClifText::Optimized);
        Ok(self.program(graph, Some(&[]))?.clif.join("\n"))
    }

    /// The Cranelift IR of the step entry bound for these leaves (binding
    /// it if needed).
    pub fn entry_clif(
        &mut self,
        graph: &Graph,
        leaves: &BTreeMap<String, Tensor>,
    ) -> Result<String, InterpError> {
        self.keep_clif_text(ClifText::AsBuilt);
        Ok(self.bound(graph, leaves)?.entry_clif.clone())
    }

    /// Makes a graph ready to run with leaves of these sizes: compiles its
    /// kernels and binds the frame and entry, as the first step does.
    pub fn prepare(
        &mut self,
        graph: &Graph,
        leaves: &BTreeMap<String, Tensor>,
    ) -> Result<(), InterpError> {
        self.bound(graph, leaves).map(|_| ())
    }

    /// The frame for these leaves' sizes (after the interpreter's checks of
    /// the leaves), compiling and binding as needed.
    pub(in crate::jit) fn bound(
        &mut self,
        graph: &Graph,
        leaves: &BTreeMap<String, Tensor>,
    ) -> Result<&mut Bound, InterpError> {
        let key = self.compiled(graph, Some(&[]))?;
        let program = self.program_at(&key)?;
        let run = Arc::clone(&program.graph);
        let mut dims = BTreeMap::new();
        interp::checked_leaves(&run, &program.leaves, leaves, &mut dims)?;
        // (A new frame may drop the others.)
        let new = !self.frames.get(&key).is_some_and(|f| f.contains_key(&dims));
        if new && self.resident.as_ref().is_some_and(|r| r.key == key) {
            self.evict();
        }
        let program = self
            .programs
            .get_mut(&key)
            .ok_or_else(|| InterpError::Internal("the program vanished".into()))?;
        bind::bound(program, self.frames.entry(key).or_default(), &run, &dims)
    }

    /// Moves the state kept in a frame out of it (into `evicted`), so that
    /// the frame can be used for other work or dropped.
    fn evict(&mut self) {
        let Some(resident) = self.resident.take() else {
            return;
        };
        let frame = self
            .programs
            .get(&resident.key)
            .and_then(|p| Some((p, self.frames.get(&resident.key)?.get(&resident.dims)?)));
        let Some((program, bound)) = frame else {
            return;
        };
        let values = |update: bool| -> Option<BTreeMap<String, Tensor>> {
            resident
                .carried
                .iter()
                .map(|(name, leaf, own)| {
                    let id = if update { *own } else { *leaf };
                    Some((name.clone(), bound.value(&program.graph, id).ok()?))
                })
                .collect()
        };
        if let Some(values) = values(resident.computed) {
            // (A session that forgot its ticket never asks again: the
            // oldest copies go.)
            while self.evicted.len() >= EVICTED {
                let oldest = self.evicted.keys().min().copied();
                oldest.and_then(|t| self.evicted.remove(&t));
            }
            let computed = resident.computed;
            self.evicted
                .insert(resident.ticket, Evicted { values, computed });
        }
    }

    /// From now on programs keep this CLIF text; those compiled with
    /// another are compiled again.
    fn keep_clif_text(&mut self, text: ClifText) {
        if self.keep_clif != text {
            self.keep_clif = text;
            self.evict();
            self.programs.clear();
            self.frames.clear();
        }
    }
}

/// A JIT error as the [`Backend`] reports it (its own failures named
/// as the JIT's).
fn reported(error: InterpError) -> BackendError {
    BackendError::from_interp("the JIT", error)
}

impl Backend for Jit {
    fn name(&self) -> &'static str {
        "the JIT"
    }

    fn run(
        &mut self,
        graph: &Graph,
        leaves: &BTreeMap<String, Tensor>,
        context: Context,
    ) -> Result<Evaluation, BackendError> {
        self.step(graph, leaves, context, None, None)
            .map_err(reported)
    }

    fn run_wanted(
        &mut self,
        graph: &Graph,
        leaves: &BTreeMap<String, Tensor>,
        context: Context,
        wanted: &[NodeId],
    ) -> Result<Evaluation, BackendError> {
        self.step(graph, leaves, context, Some(wanted), None)
            .map_err(reported)
    }

    fn run_carrying(
        &mut self,
        graph: &Graph,
        leaves: &BTreeMap<String, Tensor>,
        context: Context,
        wanted: &[NodeId],
        carried: &[Carried],
        kept: &mut Option<Kept>,
    ) -> Result<Evaluation, BackendError> {
        self.step(graph, leaves, context, Some(wanted), Some((carried, kept)))
            .map_err(reported)
    }

    fn fetch_kept(
        &mut self,
        kept: &Kept,
        computed: bool,
    ) -> Result<BTreeMap<String, Tensor>, BackendError> {
        self.kept_values(kept, computed).map_err(reported)
    }

    fn recycle(&mut self, evaluation: Evaluation) {
        self.spare = Some(evaluation);
    }
}

/// Training runs on the JIT unless its caller chooses otherwise.
impl Default for RunOptions {
    /// No files, quiet, on the JIT (as `gradc train` runs by default).
    fn default() -> RunOptions {
        RunOptions {
            model_file: None,
            base_dir: std::path::PathBuf::new(),
            data: None,
            labels: None,
            label: None,
            test: None,
            freeze: Vec::new(),
            init: None,
            resume: None,
            save: None,
            metrics: None,
            plot: None,
            watch: false,
            verbose: false,
            max_memory: None,
            backend: || Box::new(Jit::new()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ir::Op;
    use bind::factors;
    use cache::ClifText;
    use cache::CodeCache;
    use clif::Elem;
    use movers::Mover;
    use native::frame::{CopyBlock, Frame};
    use rows::RowOp;

    #[test]
    fn broadcast_factors() {
        assert_eq!(factors(&[2, 3], &[2, 3]), Some((1, 6)));
        assert_eq!(factors(&[3], &[2, 3]), Some((1, 3)));
        assert_eq!(factors(&[2, 1], &[2, 3]), Some((3, 2)));
        assert_eq!(factors(&[], &[2, 3]), Some((1, 1)));
        assert_eq!(factors(&[1, 1], &[2, 3]), Some((1, 1)));
        assert_eq!(factors(&[2, 1, 4], &[2, 3, 4]), None);
        assert_eq!(factors(&[3, 1], &[2, 3, 4]), Some((4, 3)));
    }

    /// An elementwise kernel over `[B, 4]` of `f32`s is only its `f32x4`
    /// loop (the count is a multiple of 4): it refuses to bind to a count
    /// that is not, and binds to one that is; over `[B, 3]` it keeps the
    /// narrower loops and takes any count.
    #[test]
    fn a_kernel_without_tails_refuses_other_counts() {
        for (cols, multiple) in [(4, Some(4)), (3, None)] {
            let compilation = crate::driver::compile_source(
                "m.grad",
                &format!(
                    "model m {{\n    input x: f32[B, {cols}]\n    output y = sqrt(x * x)\n}}\n"
                ),
                crate::lower::LowerOptions::default(),
            );
            let graph = &compilation.models[0].eval;
            let nodes: Vec<NodeId> = graph
                .ids()
                .into_iter()
                .filter(|&id| graph.node(id).op != Op::Input)
                .collect();
            let x = graph
                .ids()
                .into_iter()
                .find(|&id| graph.node(id).op == Op::Input)
                .expect("x");
            let last = *nodes.last().expect("nodes");
            let mut code = CodeCache::new(ClifText::None).expect("code cache");
            let (kernel, _) = code
                .compile(graph, &nodes, &[x], &[Elem::F32], &[last])
                .expect("kernel");
            assert_eq!(kernel.multiple_of, multiple);
            let mut frame = Frame::new(&[(12, Elem::F32), (12, Elem::F32)]).expect("a small frame");
            let bind = |frame: &mut Frame, n: usize| {
                frame.push_kernel(&kernel, vec![0, 1], vec![1, 1], vec![n as i64, n as i64], n)
            };
            let odd = bind(&mut frame, 6);
            if multiple.is_some() {
                let error = odd.expect_err("6 is no multiple of 4");
                assert!(error.to_string().contains("multiples of"), "{error}");
            } else {
                odd.expect("any count binds");
            }
            bind(&mut frame, 12).expect("12 binds");
        }
    }

    /// A copy kernel's call is bound only if every element its block
    /// reaches lies in its buffers, which store what it copies and are
    /// two: a block one element too long, a wrong element type, a stride
    /// that overflows or a copy onto its source is refused. The same for
    /// a gather's and a scatter's indices, rows and output.
    #[test]
    fn a_copy_reaches_only_inside_its_buffers() {
        let mut code = CodeCache::new(ClifText::None).expect("code cache");
        let (copy, _) = code
            .compile_mover(Mover::Copy, Elem::F32)
            .expect("copy kernel");
        let mut frame =
            Frame::new(&[(6, Elem::F32), (6, Elem::F32), (6, Elem::F64)]).expect("a small frame");
        let transpose = CopyBlock {
            counts: [1, 2, 3],
            from: (0, [6, 3, 1]),
            to: (0, [6, 1, 2]),
        };
        frame
            .push_copy((copy, Elem::F32), [0, 1], transpose)
            .expect("a 2 x 3 transpose fits");
        let too_long = CopyBlock {
            counts: [1, 1, 6],
            from: (1, [0, 0, 1]),
            to: (0, [0, 0, 1]),
        };
        let overflowing = CopyBlock {
            counts: [2, 1, 1],
            from: (0, [usize::MAX, 0, 1]),
            to: (0, [1, 0, 1]),
        };
        for (slots, block, says) in [
            ([0, 1], too_long, "reaches past"),
            ([0, 1], overflowing, "reaches past"),
            ([0, 2], transpose, "holds F64"),
            ([1, 1], transpose, "is the destination"),
        ] {
            let error = frame
                .push_copy((copy, Elem::F32), slots, block)
                .expect_err("refused");
            assert!(error.to_string().contains(says), "{error}");
        }
        let empty = CopyBlock {
            counts: [0, 1, 1],
            ..too_long
        };
        frame
            .push_copy((copy, Elem::F32), [0, 1], empty)
            .expect("an empty block is no call");
        // A gather: 3 indices (in the `f64` buffer) into a 2 x 3 table.
        let (gather, _) = code
            .compile_mover(Mover::Gather, Elem::F32)
            .expect("gather kernel");
        frame
            .push_indexed(
                (gather, Mover::Gather, Elem::F32),
                [2, 0, 1],
                [2, 3, 2],
                false,
            )
            .expect("2 indices, rows of 3, a table of 2 rows");
        for (slots, sizes, says) in [
            ([2, 0, 1], [3, 3, 2], "too few"),
            ([2, 0, 1], [2, 3, 3], "too few"),
            ([0, 1, 2], [2, 3, 2], "holds F32"),
            ([2, 0, 0], [2, 3, 2], "aliases"),
            ([2, 0, 1], [2, usize::MAX, 2], "too few"),
        ] {
            let error = frame
                .push_indexed((gather, Mover::Gather, Elem::F32), slots, sizes, false)
                .expect_err("refused");
            assert!(error.to_string().contains(says), "{error}");
        }
        // A scatter: 2 rows of 3 from the `f32` buffer into a 2 x 3 `f64`
        // one at 2 indices (in a buffer with room for more).
        let (scatter, _) = code
            .compile_mover(Mover::Scatter, Elem::F32)
            .expect("scatter kernel");
        let mut frame =
            Frame::new(&[(6, Elem::F64), (6, Elem::F32), (6, Elem::F64)]).expect("a small frame");
        frame
            .push_indexed(
                (scatter, Mover::Scatter, Elem::F32),
                [0, 1, 2],
                [2, 3, 2],
                true,
            )
            .expect("fits");
        for (slots, sizes, says) in [
            ([0, 1, 2], [2, 3, 3], "too few"),
            ([0, 1, 2], [3, 3, 2], "too few"),
            ([0, 2, 1], [2, 3, 2], "holds"),
            ([0, 1, 0], [2, 3, 2], "aliases"),
        ] {
            let error = frame
                .push_indexed((scatter, Mover::Scatter, Elem::F32), slots, sizes, true)
                .expect_err("refused");
            assert!(error.to_string().contains(says), "{error}");
        }
    }

    /// A row kernel compiled for a static row length (4 here: no code for
    /// an odd last column) refuses to bind to any other `cols`, odd or
    /// even; its own binds.
    #[test]
    fn a_row_kernel_for_a_static_row_length_refuses_others() {
        let compilation = crate::driver::compile_source(
            "m.grad",
            "model m {\n    input x: f64[B, 4]\n    output p = max(x, axis = 1)\n}\n",
            crate::lower::LowerOptions::default(),
        );
        let graph = &compilation.models[0].eval;
        let max = graph
            .ids()
            .into_iter()
            .find(|&id| RowOp::of(graph, id) == Some(RowOp::Max))
            .expect("max");
        let x = graph.operands(max)[0];
        let mut code = CodeCache::new(ClifText::None).expect("code cache");
        let (kernel, _) = code
            .compile_rows(graph, &[max], RowOp::Max, &[Elem::F64])
            .expect("row kernel");
        assert_eq!(kernel.fixed_cols, Some(4));
        assert_eq!(kernel.inputs, vec![x]);
        let mut frame = Frame::new(&[(12, Elem::F64), (12, Elem::F64)]).expect("a small frame");
        for (rows, cols) in [(4, 3), (2, 6)] {
            let error = frame
                .push_rows(&kernel, vec![0, 1], rows, cols)
                .expect_err("another row length");
            let bad = format!("bad sizes {rows} x {cols}");
            assert!(error.to_string().contains(&bad), "{error}");
        }
        frame
            .push_rows(&kernel, vec![0, 1], 3, 4)
            .expect("even columns bind");
    }
}
