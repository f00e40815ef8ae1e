//! A graph's program: the optimized graph (`passes::optimize`, then the
//! derivative patterns of `patterns`), its kernel plan
//! (`passes::fusion`), and for each kernel its compiled form (`Compiled`),
//! or none where the interpreter's kernel runs it. Sizes are not known
//! yet: `bind` fixes them per frame.

use std::collections::HashMap;
use std::sync::Arc;

use crate::ir::{DType, Graph, IdMap, NodeId, Op, Role, Shape};
use crate::jit::cache::ClifText;
use crate::jit::cache::CodeCache;
use crate::jit::clif::CodegenError;
use crate::jit::clif::Elem;
use crate::jit::elementwise::CompiledKernel;
use crate::jit::elementwise::is_sum;
use crate::jit::elementwise::supported;
use crate::jit::movers::Mover;
use crate::jit::row_passes::PassKernel;
use crate::jit::rows::RowKernel;
use crate::jit::rows::RowOp;
use crate::passes::{
    self,
    fusion::{self, Plan},
};

/// A kernel's compiled form.
pub(super) enum Compiled {
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
    /// A kernel in passes over rows (`row_passes`), after what the
    /// interpreter (or the GEMM) computes first.
    Passes {
        prologue: Vec<NodeId>,
        kernel: PassKernel,
    },
    /// Computed by the row kernel of an earlier kernel, fused with it
    /// (`fused_cross_entropy`).
    Within,
    /// A node that only moves elements (`mover_for`), by the kernel
    /// compiled for that (`Mover`) and the element type, after the
    /// cheap values it recomputes (on the interpreter).
    Mover {
        prologue: Vec<NodeId>,
        node: NodeId,
        func: (cranelift_module::FuncId, Mover, Elem),
    },
}

/// A graph prepared for running: the graph its kernels compute (the
/// caller's, or the caller's optimized), its kernel plan, compiled kernels,
/// (its frames are bound per set of sizes by `bind`).
pub(super) struct Program {
    pub(super) graph: Arc<Graph>,
    /// Where each value the caller may ask for lives in `graph`: every node
    /// with a role (which the passes may move to another node) and the
    /// values kept for the caller. Empty for an unoptimized program, whose
    /// ids are the caller's.
    pub(super) ids: IdMap<NodeId>,
    pub(super) plan: Plan,
    pub(super) kernels: Vec<Option<Compiled>>,
    /// The shape each kernel loops over.
    pub(super) loops: Vec<Shape>,
    pub(super) clif: Vec<String>,
    /// The graph's topological order, and each node's place in it.
    pub(super) order: Vec<NodeId>,
    /// The leaves, in that order (what a step's checks go through).
    pub(super) leaves: Vec<NodeId>,
    pub(super) position: HashMap<NodeId, usize>,
    /// How each value's buffer stores its elements, where that is not
    /// `Elem::of` its type (sums a compiled kernel accumulates in `f64`).
    pub(super) storage: HashMap<NodeId, Elem>,
    /// Holds the compiled code: it outlives `kernels` and `frames`.
    pub(super) code: CodeCache,
    /// The shapes whose bound sizes the given graph's composites need
    /// checked (`expand::checked_shapes`: train-mode batch norms), which
    /// the expanded graph no longer shows.
    pub(super) checked_shapes: Vec<Shape>,
}

/// A program's graph version and what it keeps: `None` for the graph as
/// given (every value can be read back), or the intermediate values a
/// caller reads besides the graph's results (the graph is optimized).
pub(super) type ProgramKey = (u64, Option<Arc<[NodeId]>>);

/// The key of the program for a graph and the values a caller reads back.
pub(super) fn program_key(graph: &Graph, wanted: Option<&[NodeId]>) -> ProgramKey {
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
pub(super) fn optimized(graph: &Graph, kept: &[NodeId]) -> (Graph, IdMap<NodeId>) {
    let mut run = graph.clone();
    for &id in kept {
        run.node_mut(id).retain = true;
    }
    passes::optimize(&mut run, |_, _| {});
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
pub(super) fn compile(
    run: Graph,
    ids: IdMap<NodeId>,
    keep_clif: ClifText,
    checked_shapes: Vec<Shape>,
) -> Result<Program, CodegenError> {
    let plan = fusion::plan(&run);
    let order = run
        .topo_order()
        .ok_or_else(|| CodegenError("the graph has a cycle".into()))?;
    let mut compiling = Compiling {
        graph: &run,
        plan: &plan,
        code: CodeCache::new(keep_clif)?,
        position: order.iter().enumerate().map(|(i, &id)| (id, i)).collect(),
        storage: HashMap::new(),
        fused: Vec::new(),
    };
    let (mut kernels, mut loops, mut clif) = (Vec::new(), Vec::new(), Vec::new());
    for k in 0..plan.kernels.len() {
        let loop_shape = compiling.loop_shape(k);
        let (compiled, text) = compiling.kernel(k, &loop_shape)?;
        kernels.push(compiled);
        loops.push(loop_shape);
        clif.push(text);
    }
    let Compiling {
        code,
        position,
        storage,
        ..
    } = compiling;
    let leaves = order
        .iter()
        .copied()
        .filter(|&id| run.node(id).op.is_leaf())
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
        code,
        checked_shapes,
    })
}

/// The compilation of a program's kernels, in plan order.
struct Compiling<'g> {
    graph: &'g Graph,
    plan: &'g Plan,
    code: CodeCache,
    /// Each node's place in the graph's topological order.
    position: HashMap<NodeId, usize>,
    /// How each value compiled so far is stored, where that is not
    /// `Elem::of` its type.
    storage: HashMap<NodeId, Elem>,
    /// Kernels computed within an earlier one: (the earlier, the later).
    fused: Vec<(usize, usize)>,
}

impl Compiling<'_> {
    /// The shape kernel `k` loops over: a kernel that is only a sum loops
    /// over its operand.
    fn loop_shape(&self, k: usize) -> Shape {
        let (graph, kernel) = (self.graph, &self.plan.kernels[k]);
        match kernel.kind {
            fusion::Kind::Reduction => graph
                .node(graph.operands(kernel.nodes[0])[0])
                .shape()
                .clone(),
            _ => kernel.loop_shape.clone(),
        }
    }

    /// Kernel `k`'s compiled form (none: the interpreter or the GEMM runs
    /// it) and its CLIF text.
    fn kernel(
        &mut self,
        k: usize,
        loop_shape: &Shape,
    ) -> Result<(Option<Compiled>, String), CodegenError> {
        // Computed already, by a kernel fused with it.
        if let Some(&(first, _)) = self.fused.iter().find(|&&(_, later)| later == k) {
            return Ok((
                Some(Compiled::Within),
                format!("; kernel k{k}: within k{first}\n"),
            ));
        }
        let plan = self.plan;
        if let [node] = plan.kernels[k].nodes.as_slice() {
            // A single node that only moves elements.
            if let Some((mover, elem)) = mover_for(self.graph, &self.storage, *node) {
                return self.mover(k, *node, mover, elem);
            }
            // A single reduction or normalization along the last axis.
            if let Some(op) = RowOp::of(self.graph, *node) {
                return self.rows(k, *node, op);
            }
        }
        self.elementwise(k, loop_shape)
    }

    /// The cheap values kernel `k` recomputes, in graph order.
    fn recomputed(&self, k: usize) -> Vec<NodeId> {
        let mut prologue: Vec<NodeId> = self.plan.kernels[k].recompute.iter().copied().collect();
        prologue.sort_by_key(|id| self.position[id]);
        prologue
    }

    /// How the values `ids` are stored.
    fn elems(&self, ids: &[NodeId]) -> Vec<Elem> {
        ids.iter()
            .map(|id| elem(self.graph, &self.storage, *id))
            .collect()
    }

    /// Kernel `k`, the single `node` that moves elements as `mover` says.
    fn mover(
        &mut self,
        k: usize,
        node: NodeId,
        mover: Mover,
        elem: Elem,
    ) -> Result<(Option<Compiled>, String), CodegenError> {
        let (func, text) = self.code.compile_mover(mover, elem)?;
        let name = mover.name();
        let text = if text.is_empty() {
            format!("(the {name} kernel above)\n")
        } else {
            text
        };
        if mover == Mover::Scatter {
            // (Summed in `f64`, rounded once: stored as `f64`.)
            record(&mut self.storage, self.graph, node, Elem::F64);
        }
        let compiled = Compiled::Mover {
            prologue: self.recomputed(k),
            node,
            func: (func, mover, elem),
        };
        Ok((Some(compiled), format!("; kernel k{k}: {name}\n{text}")))
    }

    /// Kernel `k`, the single reduction or normalization `node` along the
    /// last axis (with, for a cross-entropy, its VJP if that can run with
    /// it).
    fn rows(
        &mut self,
        k: usize,
        node: NodeId,
        op: RowOp,
    ) -> Result<(Option<Compiled>, String), CodegenError> {
        let graph = self.graph;
        let with_vjp = match op {
            RowOp::CrossEntropy => fused_cross_entropy(graph, self.plan, k, node),
            _ => None,
        };
        let (op, outputs) = match with_vjp {
            Some((later, vjp, g)) => {
                self.fused.push((k, later));
                (RowOp::CrossEntropyWithVjp { g }, vec![node, vjp])
            }
            None => (op, vec![node]),
        };
        let reads = op.reads(&graph.operands(node));
        let (compiled, text) = self
            .code
            .compile_rows(graph, &outputs, op, &self.elems(&reads))?;
        for (&output, &e) in outputs.iter().zip(&compiled.elems[reads.len()..]) {
            record(&mut self.storage, graph, output, e);
        }
        let compiled = Compiled::Rows {
            prologue: self.recomputed(k),
            kernel: compiled,
        };
        Ok((Some(compiled), format!("; kernel k{k}\n{text}")))
    }

    /// Kernel `k` as an elementwise kernel over `loop_shape` (after the
    /// matrix product of a `MatMul` kernel), or none if it has other ops.
    fn elementwise(
        &mut self,
        k: usize,
        loop_shape: &Shape,
    ) -> Result<(Option<Compiled>, String), CodegenError> {
        let (graph, plan) = (self.graph, self.plan);
        let kernel = &plan.kernels[k];
        // Elementwise over the loop shape (compiled in the kernel's loop,
        // perhaps closed by a sum).
        let over_loop = |id: NodeId| supported(graph, id) && graph.node(id).shape() == loop_shape;
        let closing_sum = |id: NodeId| {
            is_sum(graph, id)
                && graph
                    .operands(id)
                    .iter()
                    .all(|&o| graph.node(o).shape() == loop_shape)
        };
        let (prologue, mut body) = split_prologue(graph, kernel, over_loop);
        if kernel.passes {
            return self.passes(k, prologue, body);
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
            let first = kernel.nodes.first().map(|&id| &graph.node(id).op);
            let place = match first {
                _ if kernel.kind == fusion::Kind::MatMul && body.is_empty() => "on the GEMM",
                // (Host work too, but not the interpreter's.)
                Some(Op::BatchMatMul { .. }) => "on the GEMM, one call per matrix",
                Some(Op::Scan(_)) => "a loop of its compiled body",
                Some(Op::ScanResult { .. }) => "written by its loop",
                _ => "on the interpreter",
            };
            return Ok((
                None,
                format!("; kernel k{k}: {place} ({})\n", ops.join(", ")),
            ));
        }
        body.sort_by_key(|id| self.position[id]);
        let (inputs, outputs) = self.boundary(k, &body);
        let input_elems = self.elems(&inputs);
        let (compiled, text) = self
            .code
            .compile(graph, &body, &inputs, &input_elems, &outputs)?;
        for (&output, &e) in outputs.iter().zip(&compiled.elems[inputs.len()..]) {
            record(&mut self.storage, graph, output, e);
        }
        let compiled = Compiled::Elementwise {
            prologue,
            kernel: compiled,
        };
        Ok((Some(compiled), format!("; kernel k{k}\n{text}")))
    }
}

impl Compiling<'_> {
    /// What the compiled part `body` of kernel `k` reads from outside it
    /// (constants are immediates), and what of it other kernels read or
    /// the caller wants.
    fn boundary(&self, k: usize, body: &[NodeId]) -> (Vec<NodeId>, Vec<NodeId>) {
        let graph = self.graph;
        let inside: std::collections::BTreeSet<NodeId> = body.iter().copied().collect();
        let mut inputs: Vec<NodeId> = body
            .iter()
            .flat_map(|&id| fusion::reads(graph, id))
            .filter(|o| !inside.contains(o) && !matches!(graph.node(*o).op, Op::Constant(_)))
            .collect();
        inputs.sort_unstable();
        inputs.dedup();
        let outputs = self
            .plan
            .outputs(graph, k)
            .into_iter()
            .filter(|o| inside.contains(o))
            .collect();
        (inputs, outputs)
    }

    /// Kernel `k` in passes over the rows of its loop shape: `body` after
    /// `prologue` (the values the planner recomputes that do not fit
    /// passes join the prologue, on the interpreter).
    fn passes(
        &mut self,
        k: usize,
        mut prologue: Vec<NodeId>,
        body: Vec<NodeId>,
    ) -> Result<(Option<Compiled>, String), CodegenError> {
        let (graph, plan) = (self.graph, self.plan);
        let loop_shape = &plan.kernels[k].loop_shape;
        let (mut body, first): (Vec<NodeId>, Vec<NodeId>) = body.into_iter().partition(|&id| {
            !plan.kernels[k].recompute.contains(&id)
                || fusion::row_form(graph.node(id).shape(), loop_shape)
                    == Some(fusion::RowForm::Full)
        });
        prologue.extend(first);
        body.sort_by_key(|id| self.position[id]);
        let (inputs, outputs) = self.boundary(k, &body);
        let input_elems = self.elems(&inputs);
        let (compiled, text) = self.code.compile_passes(
            graph,
            &body,
            (&inputs, &input_elems),
            &outputs,
            loop_shape,
        )?;
        for (&output, &e) in outputs.iter().zip(&compiled.elems[inputs.len()..]) {
            record(&mut self.storage, graph, output, e);
        }
        let compiled = Compiled::Passes {
            prologue,
            kernel: compiled,
        };
        Ok((
            Some(compiled),
            format!("; kernel k{k}: in passes per row\n{text}"),
        ))
    }
}

/// What the interpreter computes first in a kernel (a matrix product and
/// the cheap values it reads), and what is compiled after it (the
/// epilogue, with the cheap values only it reads; the whole kernel if it
/// has no product).
fn split_prologue(
    graph: &Graph,
    kernel: &fusion::Kernel,
    over_loop: impl Fn(NodeId) -> bool,
) -> (Vec<NodeId>, Vec<NodeId>) {
    if kernel.kind != fusion::Kind::MatMul {
        let body = kernel
            .recompute
            .iter()
            .copied()
            .chain(kernel.nodes.iter().copied())
            .collect();
        return (Vec::new(), body);
    }
    let product = graph.operands(kernel.nodes[0]);
    let (mut first, later): (Vec<NodeId>, Vec<NodeId>) = kernel
        .recompute
        .iter()
        .copied()
        .partition(|&id| product.contains(&id) || !over_loop(id));
    first.push(kernel.nodes[0]);
    let body = later
        .into_iter()
        .chain(kernel.nodes[1..].iter().copied())
        .collect();
    (first, body)
}

/// The cross-entropy VJP that plan kernel `k`, the cross-entropy `node`,
/// can compute with it in one row kernel: a later kernel that is only the
/// VJP for the same logits and labels, with a constant `g`. Returns that
/// kernel's index, the VJP and `g` (as its buffer would hold it).
pub(super) fn fused_cross_entropy(
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
pub(super) fn mover_for(
    graph: &Graph,
    storage: &HashMap<NodeId, Elem>,
    id: NodeId,
) -> Option<(Mover, Elem)> {
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

/// The operands whose elements a node only moves (a `reshape`, a
/// `transpose` of the last two axes, a `concat`, a `slice`), or `None`
/// for any other node.
pub(super) fn moved_operands(graph: &Graph, id: NodeId) -> Option<Vec<NodeId>> {
    let operands = graph.operands(id);
    let rank = |n: NodeId| graph.node(n).shape().rank();
    match &graph.node(id).op {
        Op::Reshape => Some(vec![operands[0]]),
        Op::Transpose if rank(operands[0]) >= 2 => Some(vec![operands[0]]),
        Op::Concat { .. } => Some(operands),
        Op::Slice { .. } | Op::Permute { .. } => Some(vec![operands[0]]),
        _ => None,
    }
}

/// Notes how a compiled kernel stores value `id`, where that is not
/// `Elem::of` its type.
pub(super) fn record(storage: &mut HashMap<NodeId, Elem>, graph: &Graph, id: NodeId, elem: Elem) {
    if elem != Elem::of(graph.node(id).dtype()) {
        storage.insert(id, elem);
    }
}

/// How the buffer of value `id` stores its elements.
pub(super) fn elem(graph: &Graph, storage: &HashMap<NodeId, Elem>, id: NodeId) -> Elem {
    storage
        .get(&id)
        .copied()
        .unwrap_or_else(|| Elem::of(graph.node(id).dtype()))
}
