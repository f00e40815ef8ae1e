//! The JIT backend: runs a graph's kernel plan (`passes::fusion`) as one
//! compiled call per step; training and evaluation (`run_wanted`) run the
//! graph optimized by `passes::optimize`. Elementwise kernels (with their
//! closing sums and counts), row kernels (softmax, log-softmax,
//! cross-entropy, max and logsumexp over the last axis, layer
//! normalization) and column kernels (batch normalization) are compiled by
//! Cranelift (`codegen`, `rows`, with the polynomial functions of
//! `approx`); matrix products and their VJPs run on a tuned GEMM
//! (`codegen::gemm`, large ones on two threads); the few remaining kernels
//! run on the reference interpreter's kernels.
//!
//! For each set of sizes (the batch size, mostly) the JIT binds a *frame*:
//! a buffer per value (`f32` values as `f32`), allocated once, and a
//! compiled *step entry* that
//! calls every kernel in plan order, handing matrix products and
//! interpreted kernels back to Rust (`codegen::Host`). A step copies the
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

mod approx;
pub mod codegen;
mod patterns;
pub mod rows;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;

use crate::interp::{self, Context, Evaluation, InterpError, Tensor};
use crate::ir::{DType, Graph, IdBuildHasher, IdMap, NodeId, Op, Role, Shape};
use crate::passes::{
    self,
    fusion::{self, Plan},
};
use crate::train::{Backend, BackendError, Carried, Kept};
use codegen::{
    Buffers, ClifText, CodeCache, CompiledKernel, CopyBlock, Elem, Frame, Host, Mover, RowKernel,
};
use rows::RowOp;

/// A kernel's compiled form.
enum Compiled {
    /// What the interpreter (or, for a product, the GEMM) computes first
    /// (the matrix product of a matmul kernel, values it recomputes), then
    /// the compiled elementwise code.
    Elementwise {
        prologue: Vec<NodeId>,
        kernel: CompiledKernel,
    },
    /// A row kernel (a reduction or normalization along the last axis),
    /// after the cheap values it recomputes (on the interpreter).
    Rows {
        prologue: Vec<NodeId>,
        kernel: RowKernel,
    },
    /// Computed by the row kernel of an earlier kernel, fused with it
    /// (`fused_cross_entropy`).
    Within,
    /// A node that only moves elements (`mover_for`), by the kernel
    /// compiled for that (`codegen::Mover`) and the element type, after the
    /// cheap values it recomputes (on the interpreter).
    Mover {
        prologue: Vec<NodeId>,
        node: NodeId,
        func: (cranelift_module::FuncId, Mover, Elem),
    },
}

/// A graph prepared for running: the graph its kernels compute (the
/// caller's, or the caller's optimized), its kernel plan, compiled kernels,
/// and a bound frame per set of sizes.
struct Program {
    graph: Arc<Graph>,
    /// Where each value the caller may ask for lives in `graph`: every node
    /// with a role (which the passes may move to another node) and the
    /// values kept for the caller. Empty for an unoptimized program, whose
    /// ids are the caller's.
    ids: IdMap<NodeId>,
    plan: Plan,
    kernels: Vec<Option<Compiled>>,
    /// The shape each kernel loops over.
    loops: Vec<Shape>,
    clif: Vec<String>,
    /// The graph's topological order, and each node's place in it.
    order: Vec<NodeId>,
    /// The leaves, in that order (what a step's checks go through).
    leaves: Vec<NodeId>,
    position: HashMap<NodeId, usize>,
    /// How each value's buffer stores its elements, where that is not
    /// `Elem::of` its type (sums a compiled kernel accumulates in `f64`).
    storage: HashMap<NodeId, Elem>,
    frames: HashMap<BTreeMap<String, usize>, Bound, IdBuildHasher>,
    /// Holds the compiled code: it outlives `kernels` and `frames`.
    code: CodeCache,
}

/// A program's graph version and what it keeps: `None` for the graph as
/// given (every value can be read back), or the intermediate values a
/// caller reads besides the graph's results (the graph is optimized).
type ProgramKey = (u64, Option<Arc<[NodeId]>>);

/// How many frames (sets of sizes) a program keeps: a training run needs
/// its batch size, the last partial batch and the eval batch size.
const FRAMES: usize = 8;

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

/// Training state kept in a frame: the leaf buffers hold the values the
/// last step started from, the update buffers those it computed.
struct Resident {
    ticket: u64,
    /// Whether the update buffers hold computed values (false after a
    /// failed step).
    computed: bool,
    key: ProgramKey,
    dims: BTreeMap<String, usize>,
    /// Each state's name, its leaf and its update, as the program's ids.
    carried: Arc<[(String, NodeId, NodeId)]>,
}

/// Kept state moved out of its frame: the values its step computed, or
/// (after a failed step) those it started from. (A session fetches the
/// values a step started from right after that step, so the computed
/// values are all a later step needs.)
struct Evicted {
    values: BTreeMap<String, Tensor>,
    computed: bool,
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
            let program = compile(run, ids, self.keep_clif)
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
    fn bound(
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
        let new = !program.frames.contains_key(&dims);
        if new && self.resident.as_ref().is_some_and(|r| r.key == key) {
            self.evict();
        }
        self.program_at(&key)?.bound(&run, &dims)
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
            .and_then(|p| Some((p, p.frames.get(&resident.dims)?)));
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
        }
    }
}

/// The key of the program for a graph and the values a caller reads back.
fn program_key(graph: &Graph, wanted: Option<&[NodeId]>) -> ProgramKey {
    // Values with a role survive the passes anyway; the others are kept by
    // `retain`.
    let kept = wanted.map(|wanted| {
        let mut kept: Vec<NodeId> = wanted
            .iter()
            .copied()
            .filter(|&id| graph.contains(id) && graph.node(id).role == Role::Intermediate)
            .collect();
        kept.sort_unstable();
        kept.dedup();
        Arc::from(kept)
    });
    (graph.version(), kept)
}

/// The graph optimized by the passes, with the `kept` values retained
/// (so no pass removes them; their ids stay), and where every node with a
/// role and every kept value lives in it.
fn optimized(graph: &Graph, kept: &[NodeId]) -> (Graph, IdMap<NodeId>) {
    let mut run = graph.clone();
    for &id in kept {
        run.node_mut(id).retain = true;
    }
    passes::optimize(&mut run, |_, _| {});
    patterns::recognise(&mut run);
    // Roles held by one node each (a buffer two batch norms update is
    // held twice: those results are not found by role).
    let mut by_role: HashMap<&Role, Option<NodeId>> = HashMap::new();
    for id in run.ids() {
        let role = &run.node(id).role;
        if *role != Role::Intermediate {
            by_role
                .entry(role)
                .and_modify(|held| *held = None)
                .or_insert(Some(id));
        }
    }
    let mut ids = IdMap::default();
    for id in graph.ids() {
        let node = graph.node(id);
        let own = if node.op.is_leaf() || kept.contains(&id) {
            Some(id).filter(|&id| run.contains(id))
        } else if node.role != Role::Intermediate {
            by_role.get(&node.role).copied().flatten()
        } else {
            None
        };
        if let Some(own) = own {
            ids.insert(id, own);
        }
    }
    (run, ids)
}

/// Plans a graph and compiles every kernel the code generator supports
/// (keeping their CLIF text if asked).
fn compile(
    run: Graph,
    ids: IdMap<NodeId>,
    keep_clif: ClifText,
) -> Result<Program, codegen::CodegenError> {
    let graph = &run;
    let plan = fusion::plan(graph);
    let mut code = CodeCache::new(keep_clif)?;
    let mut kernels = Vec::new();
    let mut loops = Vec::new();
    let mut clif = Vec::new();
    let order = graph
        .topo_order()
        .ok_or_else(|| codegen::CodegenError("the graph has a cycle".into()))?;
    let position: HashMap<NodeId, usize> =
        order.iter().enumerate().map(|(i, &id)| (id, i)).collect();
    let mut storage: HashMap<NodeId, Elem> = HashMap::new();
    // Kernels computed within an earlier one: (the earlier, the later).
    let mut fused: Vec<(usize, usize)> = Vec::new();
    for (k, kernel) in plan.kernels.iter().enumerate() {
        let elems = |ids: &[NodeId], storage: &HashMap<NodeId, Elem>| -> Vec<Elem> {
            ids.iter().map(|id| elem(graph, storage, *id)).collect()
        };
        // A kernel that is only a sum loops over its operand.
        let loop_shape = match kernel.kind {
            fusion::Kind::Reduction => graph
                .node(graph.operands(kernel.nodes[0])[0])
                .shape()
                .clone(),
            _ => kernel.loop_shape.clone(),
        };
        // Elementwise over the loop shape (compiled in the kernel's loop,
        // perhaps closed by a sum).
        let over_loop =
            |id: NodeId| codegen::supported(graph, id) && graph.node(id).shape() == &loop_shape;
        // What the interpreter computes first (a matrix product and the
        // cheap values it reads), and what is compiled after it (the
        // epilogue, with the cheap values only it reads).
        let (prologue, body): (Vec<NodeId>, Vec<NodeId>) = match kernel.kind {
            fusion::Kind::MatMul => {
                let product = graph.operands(kernel.nodes[0]);
                let (mut first, later): (Vec<NodeId>, Vec<NodeId>) = kernel
                    .recompute
                    .iter()
                    .copied()
                    .partition(|&id| product.contains(&id) || !over_loop(id));
                first.push(kernel.nodes[0]);
                (
                    first,
                    later
                        .into_iter()
                        .chain(kernel.nodes[1..].iter().copied())
                        .collect(),
                )
            }
            _ => (
                Vec::new(),
                kernel
                    .recompute
                    .iter()
                    .copied()
                    .chain(kernel.nodes.iter().copied())
                    .collect(),
            ),
        };
        let closing_sum = |id: NodeId| {
            codegen::is_sum(graph, id)
                && graph
                    .operands(id)
                    .iter()
                    .all(|&o| graph.node(o).shape() == &loop_shape)
        };
        // Computed already, by a kernel fused with it.
        if let Some(&(first, _)) = fused.iter().find(|&&(_, later)| later == k) {
            clif.push(format!("; kernel k{k}: within k{first}\n"));
            kernels.push(Some(Compiled::Within));
            loops.push(loop_shape);
            continue;
        }
        // A single node that only moves elements.
        if let [node] = kernel.nodes.as_slice()
            && let Some((mover, elem)) = mover_for(graph, &storage, *node)
        {
            let (func, text) = code.compile_mover(mover, elem)?;
            let name = mover.name();
            let text = if text.is_empty() {
                format!("(the {name} kernel above)\n")
            } else {
                text
            };
            clif.push(format!("; kernel k{k}: {name}\n{text}"));
            if mover == Mover::Scatter {
                // (Summed in `f64`, rounded once: stored as `f64`.)
                record(&mut storage, graph, *node, Elem::F64);
            }
            let mut prologue: Vec<NodeId> = kernel.recompute.iter().copied().collect();
            prologue.sort_by_key(|id| position[id]);
            kernels.push(Some(Compiled::Mover {
                prologue,
                node: *node,
                func: (func, mover, elem),
            }));
            loops.push(loop_shape);
            continue;
        }
        // A single reduction or normalization along the last axis (with,
        // for a cross-entropy, its VJP if that can run with it).
        if let [node] = kernel.nodes.as_slice()
            && let Some(op) = RowOp::of(graph, *node)
        {
            let with_vjp = match op {
                RowOp::CrossEntropy => fused_cross_entropy(graph, &plan, k, *node),
                _ => None,
            };
            let (op, outputs) = match with_vjp {
                Some((later, vjp, g)) => {
                    fused.push((k, later));
                    (RowOp::CrossEntropyWithVjp { g }, vec![*node, vjp])
                }
                None => (op, vec![*node]),
            };
            let reads = op.reads(&graph.operands(*node));
            let (compiled, text) =
                code.compile_rows(graph, &outputs, op, &elems(&reads, &storage))?;
            for (&output, &e) in outputs.iter().zip(&compiled.elems[reads.len()..]) {
                record(&mut storage, graph, output, e);
            }
            clif.push(format!("; kernel k{k}\n{text}"));
            let mut prologue: Vec<NodeId> = kernel.recompute.iter().copied().collect();
            prologue.sort_by_key(|id| position[id]);
            kernels.push(Some(Compiled::Rows {
                prologue,
                kernel: compiled,
            }));
            loops.push(loop_shape);
            continue;
        }
        let compilable = kernel.kind != fusion::Kind::Other
            && !body.is_empty()
            && body.iter().all(|&id| over_loop(id) || closing_sum(id));
        if !compilable {
            let ops: Vec<String> = kernel
                .nodes
                .iter()
                .map(|&id| graph.node(id).op.name())
                .collect();
            // A product with no epilogue is one GEMM call (host work).
            let place = if kernel.kind == fusion::Kind::MatMul && body.is_empty() {
                "on the GEMM"
            } else {
                "on the interpreter"
            };
            clif.push(format!("; kernel k{k}: {place} ({})\n", ops.join(", ")));
            kernels.push(None);
            loops.push(loop_shape);
            continue;
        }
        let mut ordered = body;
        ordered.sort_by_key(|id| position[id]);
        // The compiled part reads what its nodes read from outside it.
        let inside: std::collections::BTreeSet<NodeId> = ordered.iter().copied().collect();
        let mut inputs: Vec<NodeId> = ordered
            .iter()
            .flat_map(|&id| fusion::reads(graph, id))
            .filter(|o| !inside.contains(o) && !matches!(graph.node(*o).op, Op::Constant(_)))
            .collect();
        inputs.sort_unstable();
        inputs.dedup();
        let outputs: Vec<NodeId> = plan
            .outputs(graph, k)
            .into_iter()
            .filter(|o| inside.contains(o))
            .collect();
        let input_elems = elems(&inputs, &storage);
        let (compiled, text) = code.compile(graph, &ordered, &inputs, &input_elems, &outputs)?;
        for (&output, &e) in outputs.iter().zip(&compiled.elems[inputs.len()..]) {
            record(&mut storage, graph, output, e);
        }
        clif.push(format!("; kernel k{k}\n{text}"));
        kernels.push(Some(Compiled::Elementwise {
            prologue,
            kernel: compiled,
        }));
        loops.push(loop_shape);
    }
    let leaves = order
        .iter()
        .copied()
        .filter(|&id| graph.node(id).op.is_leaf())
        .collect();
    Ok(Program {
        graph: Arc::new(run),
        ids,
        plan,
        kernels,
        loops,
        clif,
        leaves,
        order,
        position,
        storage,
        frames: HashMap::default(),
        code,
    })
}

/// The cross-entropy VJP that plan kernel `k`, the cross-entropy `node`,
/// can compute with it in one row kernel: a later kernel that is only the
/// VJP for the same logits and labels, with a constant `g`. Returns that
/// kernel's index, the VJP and `g` (as its buffer would hold it).
fn fused_cross_entropy(
    graph: &Graph,
    plan: &Plan,
    k: usize,
    node: NodeId,
) -> Option<(usize, NodeId, f64)> {
    let operands = graph.operands(node);
    plan.kernels
        .iter()
        .enumerate()
        .skip(k + 1)
        .find_map(|(later, kernel)| {
            let [vjp] = kernel.nodes.as_slice() else {
                return None;
            };
            if RowOp::of(graph, *vjp) != Some(RowOp::CrossEntropyVjp) {
                return None;
            }
            let vjp_operands = graph.operands(*vjp);
            let Op::Constant(g) = graph.node(vjp_operands[0]).op else {
                return None;
            };
            let g = match graph.node(vjp_operands[0]).dtype() {
                DType::F32 => f64::from(g as f32),
                _ => g,
            };
            (vjp_operands[1..3] == operands[..2]).then_some((later, *vjp, g))
        })
}

/// The kernel that moves a node's elements, and the element type it
/// moves, if the node only moves them (`moved_operands`, an `embedding`,
/// its VJP for the table) between buffers that store them alike (indices
/// as `f64`; a scatter's output is stored as `f64`).
fn mover_for(graph: &Graph, storage: &HashMap<NodeId, Elem>, id: NodeId) -> Option<(Mover, Elem)> {
    let operands = graph.operands(id);
    let stored = |o: NodeId| elem(graph, storage, o);
    let own = Elem::of(graph.node(id).dtype());
    match &graph.node(id).op {
        Op::Embedding => (stored(operands[0]) == Elem::F64 && stored(operands[1]) == own)
            .then_some((Mover::Gather, own)),
        Op::ScatterAdd => {
            (stored(operands[0]) == Elem::F64).then(|| (Mover::Scatter, stored(operands[1])))
        }
        _ => moved_operands(graph, id)?
            .iter()
            .all(|&o| stored(o) == own)
            .then_some((Mover::Copy, own)),
    }
}

/// What a mover's call moves for node `id` at these sizes, or `None` when
/// it cannot (the interpreter then runs the node).
fn moves(
    graph: &Graph,
    id: NodeId,
    mover: Mover,
    dims: &BTreeMap<String, usize>,
) -> Result<Option<Moves>, InterpError> {
    let operands = graph.operands(id);
    // An embedding's operands: the ids, the table; a scatter-add's: the
    // ids and the rows, into a table of its own shape.
    let (ids, rows, table) = match mover {
        Mover::Copy => return Ok(copy_blocks(graph, id, dims)?.map(Moves::Blocks)),
        Mover::Gather => (operands[0], operands[1], operands[1]),
        Mover::Scatter => (operands[0], operands[1], id),
    };
    let n: usize = interp::concrete(graph.node(ids).shape(), dims)?
        .iter()
        .product();
    Ok(
        match interp::concrete(graph.node(table).shape(), dims)?.as_slice() {
            &[v, d] => Some(Moves::Rows {
                ids,
                rows,
                sizes: [n, d, v],
            }),
            _ => None,
        },
    )
}

/// The operands whose elements a node only moves (a `reshape`, a
/// `transpose` of the last two axes, a `concat`, a `slice`), or `None`
/// for any other node.
fn moved_operands(graph: &Graph, id: NodeId) -> Option<Vec<NodeId>> {
    let operands = graph.operands(id);
    let rank = |n: NodeId| graph.node(n).shape().rank();
    match &graph.node(id).op {
        Op::Reshape => Some(vec![operands[0]]),
        Op::Transpose if rank(operands[0]) >= 2 => Some(vec![operands[0]]),
        Op::Concat { .. } => Some(operands),
        Op::Slice { .. } => Some(vec![operands[0]]),
        _ => None,
    }
}

/// How a node `moved_operands` accepts is its operands' elements moved, at
/// these sizes: the blocks to copy, each with the operand it copies from
/// (as the interpreter's `reshape`, `kernels::transpose`,
/// `kernels::concat` and `kernels::slice` order the elements).
fn copy_blocks(
    graph: &Graph,
    id: NodeId,
    dims: &BTreeMap<String, usize>,
) -> Result<Option<Vec<(NodeId, CopyBlock)>>, InterpError> {
    let operands = graph.operands(id);
    let shape_of = |n: NodeId| interp::concrete(graph.node(n).shape(), dims);
    let whole = |n: usize| CopyBlock {
        counts: [1, 1, n],
        from: (0, [0, 0, 1]),
        to: (0, [0, 0, 1]),
    };
    // `[.., r, c]` to `[.., c, r]`.
    let transposed = |shape: &[usize]| -> Option<CopyBlock> {
        let rank = shape.len();
        let (r, c) = (*shape.get(rank.checked_sub(2)?)?, shape[rank - 1]);
        let batch: usize = shape[..rank - 2].iter().product();
        Some(CopyBlock {
            counts: [batch, r, c],
            from: (0, [r * c, c, 1]),
            to: (0, [r * c, 1, r]),
        })
    };
    // Operand `j` of a concat of `parts` along `axis` into `shape`, as
    // (its block within each outer row, the whole row's length).
    let concat_part = |shape: &[usize], axis: usize, parts: &[Vec<usize>], j: usize| {
        let inner: usize = shape[axis + 1..].iter().product();
        let before: usize = parts[..j].iter().map(|p| p[axis]).sum();
        let outer: usize = shape[..axis].iter().product();
        (
            outer,
            before * inner,
            parts[j][axis] * inner,
            shape[axis] * inner,
        )
    };
    let node = graph.node(id);
    Ok(match &node.op {
        Op::Reshape => Some(vec![(operands[0], whole(shape_of(id)?.iter().product()))]),
        Op::Transpose => transposed(&shape_of(operands[0])?).map(|b| vec![(operands[0], b)]),
        Op::Concat { axis } => {
            let shape = shape_of(id)?;
            let parts = operands
                .iter()
                .map(|&o| shape_of(o))
                .collect::<Result<Vec<_>, _>>()?;
            let blocks = (0..operands.len())
                .map(|j| {
                    let (outer, start, width, row) = concat_part(&shape, *axis, &parts, j);
                    let block = CopyBlock {
                        counts: [outer, 1, width],
                        from: (0, [width, 0, 1]),
                        to: (start, [row, 0, 1]),
                    };
                    (operands[j], block)
                })
                .collect();
            Some(blocks)
        }
        Op::Slice { axis, start } => {
            let shape = shape_of(operands[0])?;
            let inner: usize = shape[axis + 1..].iter().product();
            let outer: usize = shape[..*axis].iter().product();
            let width = shape_of(id)?[*axis] * inner;
            let block = CopyBlock {
                counts: [outer, 1, width],
                from: (*start as usize * inner, [shape[*axis] * inner, 0, 1]),
                to: (0, [width, 0, 1]),
            };
            Some(vec![(operands[0], block)])
        }
        _ => None,
    })
}

/// Notes how a compiled kernel stores value `id`, where that is not
/// `Elem::of` its type.
fn record(storage: &mut HashMap<NodeId, Elem>, graph: &Graph, id: NodeId, elem: Elem) {
    if elem != Elem::of(graph.node(id).dtype()) {
        storage.insert(id, elem);
    }
}

/// How the buffer of value `id` stores its elements.
fn elem(graph: &Graph, storage: &HashMap<NodeId, Elem>, id: NodeId) -> Elem {
    storage
        .get(&id)
        .copied()
        .unwrap_or_else(|| Elem::of(graph.node(id).dtype()))
}

/// A frame bound to one set of sizes, with what its host work does.
struct Bound {
    frame: Frame,
    /// The buffer of every value the step materializes.
    slots: IdMap<usize>,
    /// Each buffer's node and concrete shape.
    values: Vec<(NodeId, Vec<usize>)>,
    /// Host work, by the index the entry passes.
    work: Vec<Work>,
    dims: BTreeMap<String, usize>,
    entry_clif: String,
    /// The values the last step asked for (`Backend::run_wanted`): a step
    /// asks for the same ones every time.
    wanted: Option<Wanted>,
}

/// The values a step asks for (`Bound::want`), and each one's buffer and
/// type.
struct Wanted {
    ids: Vec<NodeId>,
    outputs: Vec<(NodeId, usize, DType)>,
}

/// Host work of a step entry.
enum Work {
    /// Nodes evaluated in order: a matrix product on the GEMM, another on
    /// the interpreter.
    Interpret(Vec<HostNode>),
    /// The labels (or indices, `what`) in a buffer must lie in `0..cols`
    /// (the interpreter's check and error), before a kernel reads them.
    Labels {
        slot: usize,
        cols: usize,
        what: &'static str,
    },
}

/// A node of host work, as the frame's sizes make it.
enum HostNode {
    /// A matrix product, planned when the frame is bound.
    Product(Product),
    /// Another node, on the interpreter.
    Node(NodeId),
}

/// A matrix product on the GEMM, straight from the frame's buffers
/// (`plan_product`): `out = a @ b`, each operand a buffer read as a
/// `rows x cols` matrix, transposed or not.
struct Product {
    id: NodeId,
    dtype: DType,
    /// The buffers of `a`, `b` and the result.
    slots: [usize; 3],
    a: Matrix,
    b: Matrix,
}

/// A buffer as a matrix: its rows and columns as stored (`matrix_dims`),
/// and whether it is read transposed.
#[derive(Clone, Copy)]
struct Matrix {
    rows: usize,
    cols: usize,
    transposed: bool,
}

impl Matrix {
    /// The rows as read.
    fn read_rows(self) -> usize {
        if self.transposed {
            self.cols
        } else {
            self.rows
        }
    }

    /// The columns as read.
    fn read_cols(self) -> usize {
        if self.transposed {
            self.rows
        } else {
            self.cols
        }
    }
}

impl Program {
    /// The frame for these sizes, bound (and its entry compiled) on first
    /// use.
    fn bound(
        &mut self,
        graph: &Graph,
        dims: &BTreeMap<String, usize>,
    ) -> Result<&mut Bound, InterpError> {
        if !self.frames.contains_key(dims) {
            if self.frames.len() >= FRAMES {
                self.frames.clear();
            }
            let bound = bind(self, graph, dims)?;
            self.frames.insert(dims.clone(), bound);
        }
        self.frames
            .get_mut(dims)
            .ok_or_else(|| InterpError::Internal("the frame vanished".into()))
    }
}

/// Where a program computes the caller's value `id` (`Program::ids`;
/// the same id in a program of the graph as given).
fn own_id(ids: &IdMap<NodeId>, id: NodeId) -> Result<NodeId, InterpError> {
    let own = if ids.is_empty() {
        Some(id)
    } else {
        ids.get(&id).copied()
    };
    own.ok_or_else(|| InterpError::Internal(format!("{id} is not computed by the program")))
}

/// The buffer of a value, among a frame's `slots`.
fn slot_in(slots: &IdMap<usize>, id: NodeId) -> Result<usize, InterpError> {
    slots
        .get(&id)
        .copied()
        .ok_or_else(|| InterpError::Internal(format!("{id} has no buffer")))
}

fn internal(error: codegen::CodegenError) -> InterpError {
    InterpError::Internal(error.to_string())
}

/// Binds a program to sizes: gives every value the step materializes a
/// buffer, evaluates the constants, pushes each kernel's calls (checking
/// every buffer a compiled kernel reaches) and compiles the entry.
fn bind(
    program: &mut Program,
    graph: &Graph,
    dims: &BTreeMap<String, usize>,
) -> Result<Bound, InterpError> {
    // The values the step materializes, in a first pass over the plan;
    // every other value lives only inside a compiled kernel.
    let mut materialized: BTreeSet<NodeId> = program
        .order
        .iter()
        .copied()
        .filter(|&id| graph.node(id).op.is_leaf())
        .collect();
    let mut work = Vec::new();
    let mut calls: Vec<Call> = Vec::new();
    let mut done: BTreeSet<NodeId> = materialized.clone();
    let to = |shape: &Shape| interp::concrete(shape, dims);
    for (k, kernel) in program.plan.kernels.iter().enumerate() {
        // What a kernel on the interpreter evaluates: its recomputed
        // values (unless materialized already) and its nodes.
        let interpreted = |done: &BTreeSet<NodeId>| -> Vec<NodeId> {
            let mut nodes: Vec<NodeId> = kernel
                .recompute
                .iter()
                .copied()
                .filter(|id| !done.contains(id))
                .collect();
            nodes.sort_by_key(|id| program.position.get(id).copied());
            nodes.extend(kernel.nodes.iter().copied());
            nodes
        };
        // A compiled kernel's prologue, without what is materialized already.
        let unfinished = |prologue: &[NodeId], done: &BTreeSet<NodeId>| -> Vec<NodeId> {
            prologue
                .iter()
                .copied()
                .filter(|id| !done.contains(id))
                .collect()
        };
        let call = match &program.kernels[k] {
            Some(Compiled::Elementwise { prologue, kernel }) => {
                let to_shape = to(&program.loops[k])?;
                let n: usize = to_shape.iter().product();
                match kernel_factors(graph, kernel, &to_shape, dims)? {
                    Some((ks, ms)) => Call::Kernel {
                        prologue: unfinished(prologue, &done),
                        kernel,
                        ks,
                        ms,
                        n,
                    },
                    None => Call::Interpret(interpreted(&done)),
                }
            }
            Some(Compiled::Rows { prologue, kernel }) => {
                let shaped = kernel.inputs[kernel.op.shaped_by()];
                let shape = to(graph.node(shaped).shape())?;
                let cols = shape.last().copied().unwrap_or(0);
                match shape.iter().product::<usize>().checked_div(cols) {
                    Some(rows) if rows >= kernel.op.min_rows() => Call::Rows {
                        prologue: unfinished(prologue, &done),
                        kernel,
                        rows,
                        cols,
                    },
                    // (Too few rows: the interpreter's error.)
                    _ => Call::Interpret(interpreted(&done)),
                }
            }
            Some(Compiled::Mover {
                prologue,
                node,
                func,
            }) => match moves(graph, *node, func.1, dims)? {
                Some(moves) => Call::Mover {
                    prologue: unfinished(prologue, &done),
                    node: *node,
                    func: *func,
                    moves,
                },
                None => Call::Interpret(interpreted(&done)),
            },
            // (Nothing to do, unless that kernel fell back to the
            // interpreter.)
            Some(Compiled::Within) if kernel.nodes.iter().all(|id| done.contains(id)) => {
                Call::Interpret(Vec::new())
            }
            Some(Compiled::Within) => Call::Interpret(interpreted(&done)),
            None => Call::Interpret(interpreted(&done)),
        };
        let produced: Vec<NodeId> = match &call {
            Call::Kernel {
                prologue, kernel, ..
            } => prologue.iter().chain(&kernel.outputs).copied().collect(),
            Call::Rows {
                prologue, kernel, ..
            } => prologue.iter().chain(&kernel.outputs).copied().collect(),
            Call::Mover { prologue, node, .. } => prologue.iter().copied().chain([*node]).collect(),
            Call::Interpret(nodes) => nodes.clone(),
        };
        done.extend(produced.iter().copied());
        materialized.extend(produced);
        calls.push(call);
    }
    // A buffer per materialized value (a dead fraction keeps a slot per
    // unit while it counts).
    let mut slots = IdMap::default();
    let mut values = Vec::new();
    let mut lengths = Vec::new();
    for &id in &program.order {
        if !materialized.contains(&id) {
            continue;
        }
        let shape = to(graph.node(id).shape())?;
        let mut length: usize = shape.iter().product();
        if matches!(graph.node(id).op, Op::DeadFraction) {
            let operand = to(graph.node(graph.operands(id)[0]).shape())?;
            length = length.max(operand.iter().skip(1).product());
        }
        slots.insert(id, values.len());
        values.push((id, shape));
        lengths.push((length, elem(graph, &program.storage, id)));
    }
    let mut frame = Frame::new(&lengths).map_err(InterpError::Runtime)?;
    // Constants once.
    for &id in &program.order {
        if let Op::Constant(c) = graph.node(id).op {
            let value = Tensor::new(graph.node(id).dtype(), Vec::new(), vec![c]);
            let slot = slots[&id];
            frame
                .buffers()
                .write(slot, &vec![value.data[0]; lengths[slot].0])
                .map_err(internal)?;
        }
    }
    let slot_of = |id: &NodeId| slot_in(&slots, *id);
    // Host nodes: products planned here, once.
    let interpret = |nodes: Vec<NodeId>| {
        Work::Interpret(
            nodes
                .into_iter()
                .map(|id| match plan_product(graph, &slots, &values, id) {
                    Some(product) => HostNode::Product(product),
                    None => HostNode::Node(id),
                })
                .collect(),
        )
    };
    // Host work `w`, called from the entry at this point.
    let host = |frame: &mut Frame, work: &mut Vec<Work>, w: Work| {
        frame.push_host(work.len());
        work.push(w);
    };
    for call in calls {
        match call {
            Call::Kernel {
                prologue,
                kernel,
                ks,
                ms,
                n,
            } => {
                if !prologue.is_empty() {
                    host(&mut frame, &mut work, interpret(prologue));
                }
                let buffers = kernel
                    .inputs
                    .iter()
                    .chain(&kernel.outputs)
                    .map(slot_of)
                    .collect::<Result<Vec<usize>, _>>()?;
                frame
                    .push_kernel(kernel, buffers, ks, ms, n)
                    .map_err(internal)?;
            }
            Call::Rows {
                prologue,
                kernel,
                rows,
                cols,
            } => {
                if !prologue.is_empty() {
                    host(&mut frame, &mut work, interpret(prologue));
                }
                let buffers = kernel
                    .inputs
                    .iter()
                    .chain(&kernel.outputs)
                    .map(slot_of)
                    .collect::<Result<Vec<usize>, _>>()?;
                if let Some(labels) = kernel.op.labels() {
                    let labels = Work::Labels {
                        slot: buffers[labels],
                        cols,
                        what: "label",
                    };
                    host(&mut frame, &mut work, labels);
                }
                frame
                    .push_rows(kernel, buffers, rows, cols)
                    .map_err(internal)?;
            }
            Call::Mover {
                prologue,
                node,
                func: (func, mover, elem),
                moves,
            } => {
                if !prologue.is_empty() {
                    host(&mut frame, &mut work, interpret(prologue));
                }
                match moves {
                    Moves::Blocks(blocks) => {
                        let to = slot_of(&node)?;
                        for (from, block) in blocks {
                            frame
                                .push_copy((func, elem), [slot_of(&from)?, to], block)
                                .map_err(internal)?;
                        }
                    }
                    Moves::Rows { ids, rows, sizes } => {
                        let slots = [slot_of(&ids)?, slot_of(&rows)?, slot_of(&node)?];
                        let indices = Work::Labels {
                            slot: slots[0],
                            cols: sizes[2],
                            what: "embedding index",
                        };
                        host(&mut frame, &mut work, indices);
                        let f32 = graph.node(node).dtype() == DType::F32;
                        frame
                            .push_indexed((func, mover, elem), slots, sizes, f32)
                            .map_err(internal)?;
                    }
                }
            }
            Call::Interpret(nodes) if nodes.is_empty() => {}
            Call::Interpret(nodes) => host(&mut frame, &mut work, interpret(nodes)),
        }
    }
    let entry_clif = program.code.compile_entry(&mut frame).map_err(internal)?;
    Ok(Bound {
        frame,
        slots,
        values,
        work,
        dims: dims.clone(),
        entry_clif,
        wanted: None,
    })
}

/// One kernel's part of the entry, before buffers are assigned.
enum Call<'p> {
    Kernel {
        prologue: Vec<NodeId>,
        kernel: &'p CompiledKernel,
        ks: Vec<i64>,
        ms: Vec<i64>,
        n: usize,
    },
    Rows {
        prologue: Vec<NodeId>,
        kernel: &'p RowKernel,
        rows: usize,
        cols: usize,
    },
    Mover {
        prologue: Vec<NodeId>,
        node: NodeId,
        func: (cranelift_module::FuncId, Mover, Elem),
        moves: Moves,
    },
    Interpret(Vec<NodeId>),
}

/// What a mover's call moves at a frame's sizes.
enum Moves {
    /// A copy's blocks, each with the operand it copies from
    /// (`copy_blocks`).
    Blocks(Vec<(NodeId, CopyBlock)>),
    /// A gather's or a scatter's rows: the indices, the rows read (the
    /// table, or the gradient), and `[n, d, v]` (the number of indices,
    /// the row length, the table's rows).
    Rows {
        ids: NodeId,
        rows: NodeId,
        sizes: [usize; 3],
    },
}

/// The `ks` and `ms` of a compiled kernel's buffers.
type Factors = (Vec<i64>, Vec<i64>);

/// The broadcast factors of every buffer of a compiled kernel looping over
/// `to`: inputs by their shapes, a sum by its kept axes, a zero fraction
/// one slot, a dead fraction a slot per unit (every axis but the first);
/// `None` when some broadcasting is not one block (the kernel then runs on
/// the interpreter at these sizes).
fn kernel_factors(
    graph: &Graph,
    compiled: &CompiledKernel,
    to: &[usize],
    dims: &BTreeMap<String, usize>,
) -> Result<Option<Factors>, InterpError> {
    let n: usize = to.iter().product();
    let mut ks = Vec::new();
    let mut ms = Vec::new();
    for shape in &compiled.read_shapes {
        let shape = interp::concrete(shape, dims)?;
        let Some((k, m)) = factors(&shape, to) else {
            return Ok(None);
        };
        ks.push(k);
        ms.push(m);
    }
    for &output in &compiled.outputs {
        let node = graph.node(output);
        let kept: Option<Vec<usize>> = match &node.op {
            Op::Reduce { axes, .. } => Some(
                to.iter()
                    .enumerate()
                    .map(|(d, &size)| if axes.contains(&d) { 1 } else { size })
                    .collect(),
            ),
            Op::SumTo => Some(interp::concrete(node.shape(), dims)?),
            Op::ZeroFraction | Op::Mse | Op::BceWithLogits => Some(Vec::new()),
            Op::DeadFraction => {
                let mut kept = to.to_vec();
                if let Some(rows) = kept.first_mut() {
                    *rows = 1;
                }
                Some(kept)
            }
            _ => None,
        };
        let (k, m) = match kept {
            Some(kept) => match factors(&kept, to) {
                Some(f) => f,
                None => return Ok(None),
            },
            None => (1, i64::try_from(n).unwrap_or(i64::MAX)),
        };
        ks.push(k);
        ms.push(m);
    }
    Ok(Some((ks, ms)))
}

/// The broadcast factors `(k, m)` that read `operand` of shape `from` at
/// `(i / k) % m` for element `i` of `to`; `None` when broadcasting is not
/// one contiguous block of axes.
fn factors(from: &[usize], to: &[usize]) -> Option<(i64, i64)> {
    let offset = to.len().checked_sub(from.len())?;
    let kept: Vec<usize> = (0..to.len())
        .filter(|&d| d >= offset && from[d - offset] == to[d] && to[d] != 1)
        .collect();
    let broadcast = |d: usize| d < offset || from[d - offset] == 1;
    if !(0..to.len()).all(|d| kept.contains(&d) || broadcast(d) || to[d] == 1) {
        return None;
    }
    let (Some(&first), Some(&last)) = (kept.first(), kept.last()) else {
        return Some((1, 1));
    };
    if (first..=last).any(|d| !kept.contains(&d) && to[d] != 1) {
        return None;
    }
    let m: usize = to[first..=last].iter().product();
    let k: usize = to[last + 1..].iter().product();
    Some((i64::try_from(k.max(1)).ok()?, i64::try_from(m.max(1)).ok()?))
}

/// A JIT error as the [`Backend`] reports it (its own failures named
/// as the JIT's).
fn reported(error: InterpError) -> BackendError {
    BackendError::from_interp("the JIT", error)
}

impl Backend for Jit {
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

impl Jit {
    /// One step: checks and copies the leaves in, makes the entry's one
    /// call, and copies out every materialized value (or only `wanted`).
    /// With `carrying`, the carried state may stay in the frame
    /// (`Backend::run_carrying`).
    fn step(
        &mut self,
        graph: &Graph,
        leaves: &BTreeMap<String, Tensor>,
        context: Context,
        wanted: Option<&[NodeId]>,
        carrying: Option<(&[Carried], &mut Option<Kept>)>,
    ) -> Result<Evaluation, InterpError> {
        let key = self.compiled(graph, wanted)?;
        let program = self
            .programs
            .get(&key)
            .ok_or_else(|| InterpError::Internal("the program vanished".into()))?;
        // From here on, the graph the program runs (whose leaves are the
        // caller's, with the same ids).
        let run = Arc::clone(&program.graph);
        let own = |id: NodeId| own_id(&program.ids, id);
        // Every value to copy out is computed by the program (checked
        // before anything runs; copied out by `own` again at the end).
        let wanted_here: Option<Vec<NodeId>> = match wanted {
            Some(wanted) => Some(wanted.iter().map(|&id| own(id)).collect::<Result<_, _>>()?),
            None => None,
        };
        // Each carried state's name, leaf and update (the program's id):
        // the list the state kept in the frame has, if it is the same.
        let carried: Option<Arc<[(String, NodeId, NodeId)]>> = match &carrying {
            Some((carried, _)) => {
                let same = self.resident.as_ref().is_some_and(|r| {
                    r.carried.len() == carried.len()
                        && r.carried.iter().zip(carried.iter()).all(|(kept, c)| {
                            kept.0 == c.name
                                && kept.1 == c.leaf
                                && own(c.update).is_ok_and(|u| u == kept.2)
                        })
                });
                match &self.resident {
                    Some(r) if same => Some(Arc::clone(&r.carried)),
                    _ => Some(
                        carried
                            .iter()
                            .map(|c| Ok((c.name.clone(), c.leaf, own(c.update)?)))
                            .collect::<Result<Arc<[_]>, InterpError>>()?,
                    ),
                }
            }
            None => None,
        };
        let kept = carrying.map(|(_, kept)| kept);
        let carried_list: &[(String, NodeId, NodeId)] = carried.as_deref().unwrap_or(&[]);
        // The interpreter's checks of every leaf, binding the sizes.
        let mut dims = BTreeMap::new();
        let bound_leaves = interp::checked_leaves(&run, &program.leaves, leaves, &mut dims)?;
        let graph = &*run;
        // Where the state this step resumes is: in this frame, moved out
        // of its frame, or (a fresh start) in `leaves`.
        let resumed = kept.as_ref().and_then(|k| k.map(|k| k.ticket));
        let here = |r: &Resident| r.key == key && r.dims == dims;
        let in_frame = matches!(
            (&self.resident, resumed),
            (Some(r), Some(t)) if r.ticket == t && r.computed && here(r)
        );
        // (State that is gone: an error before anything moves.)
        if let Some(t) = resumed {
            let resident = self.resident.as_ref().is_some_and(|r| r.ticket == t);
            if !resident && !self.evicted.contains_key(&t) {
                return Err(InterpError::Internal(
                    "the state this step resumes is gone".into(),
                ));
            }
        }
        // Kept state that this step does not resume in place leaves its
        // frame first if this step will keep its own (one frame keeps
        // state at a time), uses its frame, or binds a new frame (which may
        // drop the others).
        let new_frame = !self
            .programs
            .get(&key)
            .is_some_and(|p| p.frames.contains_key(&dims));
        // (The copies this step resumes from are set aside meanwhile, so
        // that evicting cannot drop them as the oldest.)
        let held = resumed.and_then(|t| Some((t, self.evicted.remove(&t)?)));
        if !in_frame
            && self
                .resident
                .as_ref()
                .is_some_and(|r| kept.is_some() || here(r) || (new_frame && r.key == key))
        {
            self.evict();
        }
        if let Some((t, copies)) = held {
            self.evicted.insert(t, copies);
        }
        let from_evicted = match resumed {
            Some(t) if !in_frame => Some(
                self.evicted
                    .get(&t)
                    .filter(|e| e.computed)
                    .map(|e| e.values.clone())
                    .ok_or_else(|| {
                        InterpError::Internal("the state this step resumes is gone".into())
                    })?,
            ),
            _ => None,
        };
        // (The field, not `program_at`: the step goes on to update the
        // kept state while it holds the frame.)
        let program = self
            .programs
            .get_mut(&key)
            .ok_or_else(|| InterpError::Internal("the program vanished".into()))?;
        program.bound(graph, &dims)?;
        let Program { ids, frames, .. } = program;
        let bound = frames
            .get_mut(&dims)
            .ok_or_else(|| InterpError::Internal("the frame vanished".into()))?;
        let slot = |id: NodeId| slot_in(&bound.slots, id);
        let mut buffers = bound.frame.buffers();
        // The kept state becomes what this step starts from: each update's
        // buffer exchanged with its leaf's in the frame (this step's update
        // overwrites the leaf's old values), or the leaves written from
        // their copies; those leaves are not written from `leaves`.
        let skipped = |id: NodeId| {
            (in_frame || from_evicted.is_some()) && carried_list.iter().any(|c| c.1 == id)
        };
        if let Some(values) = &from_evicted {
            for (name, leaf, _) in carried_list {
                let value = values
                    .get(name)
                    .ok_or_else(|| InterpError::Internal(format!("no kept value for `{name}`")))?;
                buffers.write(slot(*leaf)?, &value.data).map_err(internal)?;
            }
        }
        // The leaves into their buffers, converted as the interpreter
        // converts them (an `f32` leaf rounded to `f32`).
        // (`checked_leaves` has matched their sizes to the shapes the
        // buffers were made for.)
        // A leaf nothing reads and nobody wants back (a frozen param the
        // model never uses) is not copied: it would cost its size every
        // step for nothing.
        let unread = |id: NodeId| {
            wanted_here.as_ref().is_some_and(|w| !w.contains(&id)) && graph.users(id).is_empty()
        };
        for (id, tensor) in bound_leaves {
            let Some(&slot) = bound.slots.get(&id) else {
                continue;
            };
            if skipped(id) || unread(id) {
                continue;
            }
            buffers.write(slot, &tensor.data).map_err(internal)?;
        }
        // (Exchanged last, once nothing can fail before the new ticket:
        // until then the kept state is where its ticket says.)
        if in_frame {
            for (_, leaf, update) in carried_list {
                let (from, to) = (slot(*update)?, slot(*leaf)?);
                if buffers.swap(from, to).is_err() {
                    // (Stored otherwise: copied, converted.)
                    let values = buffers.read(from, usize::MAX).into_owned();
                    buffers.write(to, &values).map_err(internal)?;
                }
            }
        }
        // From here on the frame holds what this step starts from.
        let ticket = if let (Some(kept), Some(carried)) = (kept, carried) {
            self.tickets += 1;
            if let Some(t) = resumed {
                self.evicted.remove(&t);
            }
            // (The kept sizes and key again if they are the same: no copy.)
            let (key, dims) = match self.resident.take() {
                Some(r) if r.key == key && r.dims == dims => (r.key, r.dims),
                _ => (key.clone(), dims.clone()),
            };
            self.resident = Some(Resident {
                ticket: self.tickets,
                computed: false,
                key,
                dims,
                carried,
            });
            *kept = Some(Kept {
                ticket: self.tickets,
                computed: false,
            });
            Some(kept)
        } else {
            None
        };
        let mut host = StepHost {
            graph,
            slots: &bound.slots,
            values: &bound.values,
            work: &bound.work,
            context,
            dims: &bound.dims,
            scratch: None,
            buffer_updates: BTreeMap::new(),
            narrow: (Vec::new(), Vec::new(), Vec::new()),
        };
        bound.frame.run(&mut host, context)?;
        let buffer_updates = host.buffer_updates;
        // Every materialized value out (or the wanted ones), as the
        // interpreter's tensors.
        // (Into the tensors of an evaluation handed back, `recycle`.)
        let mut evaluation = self.spare.take().unwrap_or_default();
        evaluation.dims = dims;
        evaluation.buffer_updates = buffer_updates;
        match wanted {
            Some(wanted) => {
                bound.want(graph, ids, wanted)?;
                let outputs = bound.wanted.as_ref().map_or(&[][..], |w| &w.outputs[..]);
                // (An evaluation handed back holds these values already.)
                let same = evaluation.values.len() == outputs.len()
                    && outputs.iter().all(|o| evaluation.values.contains_key(&o.0));
                if !same {
                    evaluation.values.retain(|id, _| wanted.contains(id));
                }
                for &(id, slot, dtype) in outputs {
                    let tensor = evaluation.values.entry(id).or_insert_with(|| Tensor {
                        dtype,
                        shape: Vec::new(),
                        data: Vec::new(),
                    });
                    bound.refill_slot(slot, dtype, tensor);
                }
            }
            None => {
                evaluation.values.clear();
                evaluation.values.reserve(bound.values.len());
                for (id, _) in &bound.values {
                    evaluation.values.insert(*id, bound.value(graph, *id)?);
                }
            }
        }
        if let Some(kept) = ticket {
            if let Some(resident) = &mut self.resident {
                resident.computed = true;
            }
            *kept = Some(Kept {
                ticket: self.tickets,
                computed: true,
            });
        }
        Ok(evaluation)
    }

    /// The kept state of a ticket, read from its frame or its copies.
    fn kept_values(
        &self,
        kept: &Kept,
        computed: bool,
    ) -> Result<BTreeMap<String, Tensor>, InterpError> {
        let missing = || InterpError::Internal("the kept state is gone".into());
        match &self.resident {
            Some(resident) if resident.ticket == kept.ticket => {
                if computed && !resident.computed {
                    return Err(missing());
                }
                let program = self.programs.get(&resident.key).ok_or_else(missing)?;
                let bound = program.frames.get(&resident.dims).ok_or_else(missing)?;
                resident
                    .carried
                    .iter()
                    .map(|(name, leaf, update)| {
                        let id = if computed { *update } else { *leaf };
                        Ok((name.clone(), bound.value(&program.graph, id)?))
                    })
                    .collect()
            }
            _ => {
                let evicted = self.evicted.get(&kept.ticket).ok_or_else(missing)?;
                if evicted.computed == computed {
                    Ok(evicted.values.clone())
                } else {
                    Err(missing())
                }
            }
        }
    }
}

impl Bound {
    /// A value copied out of its buffer, as the interpreter's tensor.
    fn value(&self, graph: &Graph, id: NodeId) -> Result<Tensor, InterpError> {
        let mut tensor = Tensor {
            dtype: graph.node(id).dtype(),
            shape: Vec::new(),
            data: Vec::new(),
        };
        self.refill(graph, id, &mut tensor)?;
        Ok(tensor)
    }

    /// `value` into a tensor of an earlier step (reusing its memory).
    fn refill(&self, graph: &Graph, id: NodeId, tensor: &mut Tensor) -> Result<(), InterpError> {
        let slot = slot_in(&self.slots, id)?;
        self.refill_slot(slot, graph.node(id).dtype(), tensor);
        Ok(())
    }

    /// `refill` from buffer `slot`, of a value of type `dtype`.
    fn refill_slot(&self, slot: usize, dtype: DType, tensor: &mut Tensor) {
        let shape = &self.values[slot].1;
        tensor.dtype = dtype;
        tensor.shape.clone_from(shape);
        self.frame
            .read_into(slot, shape.iter().product(), &mut tensor.data);
    }

    /// Sets `Bound::wanted` to the caller's `wanted` values, each with the
    /// buffer of the program's value (`ids`, `own_id`) and its type: worked
    /// out again only when `wanted` is not the last step's list.
    fn want(
        &mut self,
        graph: &Graph,
        ids: &IdMap<NodeId>,
        wanted: &[NodeId],
    ) -> Result<(), InterpError> {
        if self.wanted.as_ref().is_none_or(|w| w.ids != wanted) {
            let outputs = wanted
                .iter()
                .map(|&id| {
                    let own = own_id(ids, id)?;
                    Ok((id, slot_in(&self.slots, own)?, graph.node(own).dtype()))
                })
                .collect::<Result<Vec<_>, InterpError>>()?;
            self.wanted = Some(Wanted {
                ids: wanted.to_vec(),
                outputs,
            });
        }
        Ok(())
    }
}

/// The host work of one step: interpreted nodes and products read and
/// write the frame's buffers.
struct StepHost<'a> {
    graph: &'a Graph,
    slots: &'a IdMap<usize>,
    values: &'a [(NodeId, Vec<usize>)],
    work: &'a [Work],
    context: Context,
    /// The frame's sizes.
    dims: &'a BTreeMap<String, usize>,
    /// The interpreter's working values for one node (made by the first
    /// node interpreted).
    scratch: Option<Evaluation>,
    buffer_updates: BTreeMap<String, Tensor>,
    /// `f32` copies of a product's operands and its result, for an `f32`
    /// operand kept in an `f64` buffer.
    narrow: (Vec<f32>, Vec<f32>, Vec<f32>),
}

impl Host for StepHost<'_> {
    fn call(&mut self, index: usize, buffers: &mut Buffers<'_>) -> Result<(), InterpError> {
        match self.work.get(index) {
            Some(Work::Interpret(nodes)) => {
                for node in nodes {
                    let id = match node {
                        HostNode::Product(product) => {
                            if self.matrix_product(product, buffers)? {
                                continue;
                            }
                            product.id
                        }
                        HostNode::Node(id) => *id,
                    };
                    self.interpret(id, buffers)?;
                }
                Ok(())
            }
            Some(Work::Labels { slot, cols, what }) => {
                interp::kernels::check_indices(&buffers.read(*slot, usize::MAX), *cols, what)
            }
            None => Err(InterpError::Internal(format!("no host work {index}"))),
        }
    }
}

impl StepHost<'_> {
    /// Evaluates a node on the interpreter from copies of its operands
    /// (an operand its rule does not read, which no kernel materialized,
    /// is zeros), writing its buffer.
    fn interpret(&mut self, id: NodeId, buffers: &mut Buffers<'_>) -> Result<(), InterpError> {
        let graph = self.graph;
        let dims = self.dims;
        let scratch = self.scratch.get_or_insert_with(|| Evaluation {
            dims: dims.clone(),
            ..Evaluation::default()
        });
        scratch.values.clear();
        let needed = fusion::reads(graph, id);
        for operand in graph.operands(id) {
            let node = graph.node(operand);
            let value = match self.slots.get(&operand) {
                Some(&slot) => {
                    let shape = self.values[slot].1.clone();
                    let count = shape.iter().product::<usize>();
                    Tensor {
                        dtype: node.dtype(),
                        shape,
                        data: buffers.read(slot, count).into_owned(),
                    }
                }
                None if !needed.contains(&operand) => {
                    Tensor::zeros(node.dtype(), &interp::concrete(node.shape(), dims)?)
                }
                None => return Err(InterpError::Internal(format!("{operand} has no buffer"))),
            };
            scratch.values.insert(operand, value);
        }
        interp::evaluate_node(graph, id, scratch, self.context)?;
        let value = scratch
            .values
            .remove(&id)
            .ok_or_else(|| InterpError::Internal(format!("{id} was not evaluated")))?;
        self.buffer_updates.append(&mut scratch.buffer_updates);
        buffers
            .write(slot_in(self.slots, id)?, &value.data)
            .map_err(|e| InterpError::Internal(format!("{id}: {e}")))
    }

    /// Runs a planned matrix product (`plan_product`) on the tuned GEMM
    /// (`codegen::gemm`) straight from the buffers: an `f32` product on
    /// `sgemm` on the `f32` buffers (on `f32` copies if an operand is kept
    /// in `f64`), an `f64` one on `dgemm`. False, doing nothing, for
    /// buffers of other element types (the interpreter then runs it).
    fn matrix_product(
        &mut self,
        product: &Product,
        buffers: &mut Buffers<'_>,
    ) -> Result<bool, InterpError> {
        let [left, right, out] = product.slots;
        let (a, b) = (product.a, product.b);
        let elems = product.slots.map(|slot| buffers.elem(slot));
        match (product.dtype, elems) {
            // Straight from the buffers.
            (DType::F32, [Elem::F32, Elem::F32, Elem::F32]) => {
                product_in_place::<f32>(buffers, product.slots, a, b)
            }
            (DType::F64, [Elem::F64, Elem::F64, Elem::F64]) => {
                product_in_place::<f64>(buffers, product.slots, a, b)
            }
            // An `f32` operand kept in `f64` (a sum): through `f32` copies.
            (DType::F32, _) => {
                let (a32, b32, c32) = &mut self.narrow;
                let narrow = |to: &mut Vec<f32>, slot: usize, count: usize| {
                    to.clear();
                    to.extend(buffers.read(slot, count).iter().map(|&v| v as f32));
                };
                let count = a.read_rows() * b.read_cols();
                narrow(a32, left, a.rows * a.cols);
                narrow(b32, right, b.rows * b.cols);
                c32.clear();
                c32.resize(count, 0.0);
                let (Some(a), Some(b)) = (matrix_view(a32, a), matrix_view(b32, b)) else {
                    return Ok(false);
                };
                codegen::gemm_parallel(a, b, c32).map_err(internal)?;
                let wide: Vec<f64> = c32.iter().map(|&v| f64::from(v)).collect();
                buffers.write(out, &wide)
            }
            _ => return Ok(false),
        }
        .map_err(internal)?;
        Ok(true)
    }
}

/// Plans a matrix product on the GEMM for a frame (its buffers `slots`
/// and their shapes `values`): a `matmul` (plain, or with a transposed
/// right operand) and both of its VJPs. `None` for any other node or a
/// shape it does not handle (the interpreter then runs it).
///
/// A batched operand `[.., M, K]` is one `(B*M) x K` matrix, so each case
/// is a single GEMM: `A @ B`; `dA = g @ B^T`; and `dB = A^T @ g`, whose
/// inner size `B*M` also performs the sum over the batch. A transpose is a
/// view with swapped strides, never a copy.
fn plan_product(
    graph: &Graph,
    slots: &IdMap<usize>,
    values: &[(NodeId, Vec<usize>)],
    id: NodeId,
) -> Option<Product> {
    let node = graph.node(id);
    let operands = graph.operands(id);
    // (left operand, transposed?), (right operand, transposed?).
    let ((left, transpose_left), (right, transpose_right)) = match &node.op {
        Op::MatMul => ((operands[0], false), (operands[1], false)),
        Op::MatMulT {
            transpose_a: false,
            transpose_b,
        } => ((operands[0], false), (operands[1], *transpose_b)),
        // `a^T @ c`, with a batch of both summed: as matrices (leading
        // axes flattened into rows) that is one product.
        Op::MatMulT {
            transpose_a: true,
            transpose_b: false,
        } if graph.node(operands[0]).shape().rank() == graph.node(operands[1]).shape().rank() => {
            ((operands[0], true), (operands[1], false))
        }
        _ => return None,
    };
    let (&left, &right, &out) = (slots.get(&left)?, slots.get(&right)?, slots.get(&id)?);
    let matrix = |slot: usize, transposed: bool| {
        let (rows, cols) = matrix_dims(&values[slot].1)?;
        Some(Matrix {
            rows,
            cols,
            transposed,
        })
    };
    let (a, b) = (
        matrix(left, transpose_left)?,
        matrix(right, transpose_right)?,
    );
    let count: usize = values[out].1.iter().product();
    let fits = a.read_cols() == b.read_rows()
        && count == a.read_rows() * b.read_cols()
        && left != out
        && right != out;
    fits.then_some(Product {
        id,
        dtype: node.dtype(),
        slots: [left, right, out],
        a,
        b,
    })
}

/// `out = a @ b` on the GEMM, straight from buffers holding `T`s.
fn product_in_place<T: codegen::GemmElement + codegen::Stored + Send + Sync>(
    buffers: &mut Buffers<'_>,
    [left, right, out]: [usize; 3],
    a: Matrix,
    b: Matrix,
) -> Result<(), codegen::CodegenError> {
    buffers
        .compute::<T, _, 2>([left, right], out, |reads, c| {
            match (matrix_view(reads[0], a), matrix_view(reads[1], b)) {
                (Some(a), Some(b)) => {
                    let count = a.rows * b.cols;
                    match c.get_mut(..count) {
                        Some(c) => codegen::gemm_parallel(a, b, c),
                        None => Err(codegen::CodegenError("the product does not fit".into())),
                    }
                }
                _ => Err(codegen::CodegenError("an operand does not fit".into())),
            }
        })
        .and_then(|r| r)
}

/// A shape as a matrix: (leading axes flattened) x (last axis); `None`
/// below rank 2 or for an empty last axis.
fn matrix_dims(shape: &[usize]) -> Option<(usize, usize)> {
    let cols = *shape.last()?;
    if shape.len() < 2 || cols == 0 {
        return None;
    }
    Some((shape.iter().product::<usize>() / cols, cols))
}

/// A buffer as the matrix `m`, read transposed or not; `None` if `data` is
/// too short.
fn matrix_view<T>(data: &[T], m: Matrix) -> Option<codegen::MatrixView<'_, T>> {
    let view = codegen::MatrixView::row_major(data.get(..m.rows * m.cols)?, m.rows, m.cols);
    Some(if m.transposed {
        view.transposed()
    } else {
        view
    })
}

#[cfg(test)]
mod tests {
    use super::*;

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
    /// an odd last column, a stack row of 4 exponentials) refuses to bind
    /// to any other `cols`, odd or even; its own binds.
    #[test]
    fn a_row_kernel_for_a_static_row_length_refuses_others() {
        let compilation = crate::driver::compile_source(
            "m.grad",
            "model m {\n    input x: f64[B, 4]\n    output p = softmax(x)\n}\n",
            crate::lower::LowerOptions::default(),
        );
        let graph = &compilation.models[0].eval;
        let softmax = graph
            .ids()
            .into_iter()
            .find(|&id| matches!(graph.node(id).op, Op::Softmax { .. }))
            .expect("softmax");
        let x = graph.operands(softmax)[0];
        let mut code = CodeCache::new(ClifText::None).expect("code cache");
        let (kernel, _) = code
            .compile_rows(graph, &[softmax], RowOp::Softmax, &[Elem::F64])
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
