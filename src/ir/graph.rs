//! The graph: nodes owned by one `petgraph::StableGraph`, addressed by
//! [`NodeId`].
//!
//! Edges carry the operand index, so a node's operands are its incoming
//! edges sorted by that index; nothing else stores them. Roles (input,
//! param, frozen param, buffer, output, loss) live on the nodes, so passes
//! never have to remap handles held outside the graph. `NodeIndex` never
//! leaves this module: everything else speaks [`NodeId`].

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::fmt;

use petgraph::Direction;
use petgraph::stable_graph::{NodeIndex, StableGraph};
use petgraph::visit::EdgeRef;

use super::op::Op;
use super::types::{DType, Shape, Type};
use crate::diagnostic::Span;

/// A node's id. Stable across removals of other nodes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NodeId(u32);

/// A map keyed by node id, hashed by one multiplication (`IdHasher`)
/// instead of SipHash: the JIT looks ids up in such maps many times per
/// step, and ids are not attacker-chosen keys.
pub type IdMap<V> = std::collections::HashMap<NodeId, V, IdBuildHasher>;

/// `IdHasher` for any map of gradc's own keys (the JIT's programs and
/// frames, looked up every step).
pub type IdBuildHasher = std::hash::BuildHasherDefault<IdHasher>;

/// The hasher of `IdMap`: Fx hashing (a multiply by an odd constant per
/// word), which puts the id's entropy in the high bits the table uses.
#[derive(Clone, Copy, Debug, Default)]
pub struct IdHasher(u64);

impl std::hash::Hasher for IdHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        // Eight bytes a word (names in the JIT's frame keys), then the rest.
        let mut words = bytes.chunks_exact(8);
        for chunk in &mut words {
            let mut word = [0; 8];
            word.copy_from_slice(chunk);
            self.write_u64(u64::from_le_bytes(word));
        }
        for &byte in words.remainder() {
            self.write_u64(u64::from(byte));
        }
    }

    fn write_u32(&mut self, word: u32) {
        self.write_u64(u64::from(word));
    }

    fn write_u64(&mut self, word: u64) {
        self.0 = (self.0.rotate_left(5) ^ word).wrapping_mul(0x51_7c_c1_b7_27_22_0a_95);
    }
}

impl NodeId {
    fn index(self) -> NodeIndex {
        NodeIndex::new(self.0 as usize)
    }

    fn from_index(index: NodeIndex) -> NodeId {
        NodeId(u32::try_from(index.index()).unwrap_or(u32::MAX))
    }
}

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "%{}", self.0)
    }
}

/// Which graph a model was lowered to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Mode {
    /// Dropout active, batch-norm on batch statistics.
    Train,
    /// Dropout is the identity, batch-norm on running statistics.
    Eval,
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Mode::Train => "train",
            Mode::Eval => "eval",
        })
    }
}

/// What a node is to the model.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Role {
    /// Data fed each step (`input`).
    Input,
    /// A trainable leaf (`param`).
    Param,
    /// A leaf that gets neither a gradient nor an update (`frozen param`).
    FrozenParam,
    /// Model state (`buffer`).
    Buffer,
    /// Any other value.
    Intermediate,
    /// A named result of the forward pass.
    Output(String),
    /// The scalar the backward pass differentiates.
    Loss,
    /// `d(loss)/d(name)` for a trainable param or a retained value.
    Gradient(String),
    /// Optimizer state (step graphs only), named like `adam.m.w1`.
    OptimizerState,
    /// The new value of the param, buffer or optimizer state `name` after a
    /// training step.
    Update(String),
    /// A monitor statistic of a training step, such as `grad_norm.w1`.
    Stat(String),
}

/// What a backward node differentiates.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Backward {
    /// The forward node whose derivative rule produced this node.
    pub forward: NodeId,
    /// PyTorch's `grad_fn` name for that rule, such as `MatMulBackward`.
    pub grad_fn: &'static str,
    /// 1 for the gradient of a forward value, 2 for the gradient of a
    /// gradient (a `grad(...)` that the loss differentiates again), and so
    /// on.
    pub order: u32,
}

/// A place in the source with its line and column, resolved once.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default, PartialOrd, Ord)]
pub struct Loc {
    /// The span.
    pub span: Span,
    /// Its 1-based line.
    pub line: u32,
    /// Its 1-based column.
    pub col: u32,
}

/// Where a node came from in the source.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct Origin {
    /// The expression or declaration (inside a function when inlined).
    pub span: Span,
    /// Its 1-based line.
    pub line: u32,
    /// Its 1-based column.
    pub col: u32,
    /// The outermost call that inlined it, when it comes from a function.
    pub call_site: Option<Loc>,
    /// The `no_grad` keyword of the block it was computed in, if any.
    pub no_grad: Option<Loc>,
}

/// One value of the graph.
#[derive(Clone, Debug, PartialEq)]
pub struct Node {
    /// The operation.
    pub op: Op,
    /// Element type and shape.
    pub ty: Type,
    /// Role in the model.
    pub role: Role,
    /// The declared or `let` name, if any.
    pub name: Option<String>,
    /// Whether `retain` asks for its gradient.
    pub retain: bool,
    /// Provenance. A backward node carries its forward node's origin.
    pub origin: Origin,
    /// Set on the nodes of the backward pass.
    pub backward: Option<Backward>,
}

impl Node {
    /// A node the compiler adds (a backward or optimizer node): an
    /// intermediate value at the source position of an existing node,
    /// outside any `no_grad` block.
    pub(crate) fn derived(op: Op, ty: Type, origin: Origin, backward: Option<Backward>) -> Node {
        Node {
            op,
            ty,
            role: Role::Intermediate,
            name: None,
            retain: false,
            origin: Origin {
                no_grad: None,
                ..origin
            },
            backward,
        }
    }

    /// The element type.
    pub fn dtype(&self) -> DType {
        self.ty.dtype
    }

    /// The shape.
    pub fn shape(&self) -> &Shape {
        &self.ty.shape
    }
}

/// One `grad(e, x)` of the source: the node of its value and of the
/// values it differentiates.
#[derive(Clone, Debug, PartialEq)]
pub struct GradCall {
    /// The gradient's value, shaped like `x`.
    pub value: NodeId,
    /// `e`, the scalar differentiated.
    pub of: NodeId,
    /// `x`, what it is differentiated with respect to.
    pub wrt: NodeId,
    /// The call as written (cut to a readable length), with its line and
    /// column: `grad(ce, x) @8:14`.
    pub label: String,
    /// The call's span.
    pub span: Span,
}

/// A computation graph of one model in one mode.
#[derive(Debug)]
pub struct Graph {
    /// The model's name.
    pub model: String,
    /// Train or eval.
    pub mode: Mode,
    inner: StableGraph<Node, u32>,
    /// The `grad(e, x)` expressions of the model, for `gradc gradcheck`
    /// (which checks each against finite differences of `e`).
    pub grad_calls: Vec<GradCall>,
    /// A number no other graph, and no earlier state of this one, has:
    /// renewed by every change and every clone, so a backend can cache what
    /// it compiled for a graph by it.
    version: u64,
}

/// The next graph version.
fn fresh_version() -> u64 {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
    NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
}

impl Clone for Graph {
    fn clone(&self) -> Graph {
        Graph {
            model: self.model.clone(),
            mode: self.mode,
            inner: self.inner.clone(),
            grad_calls: self.grad_calls.clone(),
            version: fresh_version(),
        }
    }
}

impl Graph {
    /// This graph's version: equal versions mean the same graph, unchanged.
    pub fn version(&self) -> u64 {
        self.version
    }

    /// An empty graph.
    pub fn new(model: impl Into<String>, mode: Mode) -> Graph {
        Graph {
            model: model.into(),
            mode,
            inner: StableGraph::new(),
            grad_calls: Vec::new(),
            version: fresh_version(),
        }
    }

    /// Adds a node with its operands in order.
    pub fn add(&mut self, node: Node, operands: &[NodeId]) -> NodeId {
        self.version = fresh_version();
        let index = self.inner.add_node(node);
        for (i, operand) in operands.iter().enumerate() {
            let position = u32::try_from(i).unwrap_or(u32::MAX);
            self.inner.add_edge(operand.index(), index, position);
        }
        NodeId::from_index(index)
    }

    /// The node behind an id. Panics on a removed id, which is a compiler
    /// bug, never a user error.
    pub fn node(&self, id: NodeId) -> &Node {
        &self.inner[id.index()]
    }

    /// Mutable access to a node.
    pub(crate) fn node_mut(&mut self, id: NodeId) -> &mut Node {
        self.version = fresh_version();
        &mut self.inner[id.index()]
    }

    /// Whether the id names a live node.
    pub fn contains(&self, id: NodeId) -> bool {
        self.inner.contains_node(id.index())
    }

    /// Number of live nodes.
    pub fn len(&self) -> usize {
        self.inner.node_count()
    }

    /// Whether the graph has no nodes.
    pub fn is_empty(&self) -> bool {
        self.inner.node_count() == 0
    }

    /// Live node ids in creation order.
    pub fn ids(&self) -> Vec<NodeId> {
        self.inner.node_indices().map(NodeId::from_index).collect()
    }

    /// A node's operands, ordered by operand position.
    pub fn operands(&self, id: NodeId) -> Vec<NodeId> {
        let mut edges: Vec<(u32, NodeId)> = self
            .inner
            .edges_directed(id.index(), Direction::Incoming)
            .map(|e| (*e.weight(), NodeId::from_index(e.source())))
            .collect();
        edges.sort();
        edges.into_iter().map(|(_, n)| n).collect()
    }

    /// The operand positions recorded on a node's incoming edges, sorted.
    pub(crate) fn operand_positions(&self, id: NodeId) -> Vec<u32> {
        let mut positions: Vec<u32> = self
            .inner
            .edges_directed(id.index(), Direction::Incoming)
            .map(|e| *e.weight())
            .collect();
        positions.sort_unstable();
        positions
    }

    /// The nodes that use a node, sorted by id, once each.
    pub(crate) fn users(&self, id: NodeId) -> Vec<NodeId> {
        let mut users: Vec<NodeId> = self
            .inner
            .neighbors_directed(id.index(), Direction::Outgoing)
            .map(NodeId::from_index)
            .collect();
        users.sort();
        users.dedup();
        users
    }

    /// Makes every user of `old` read `new` instead, at the same operand
    /// positions. `old` keeps its own operands (dead-code elimination
    /// removes it if nothing else needs it).
    pub(crate) fn redirect_uses(&mut self, old: NodeId, new: NodeId) {
        self.version = fresh_version();
        let edges: Vec<(NodeIndex, u32, petgraph::stable_graph::EdgeIndex)> = self
            .inner
            .edges_directed(old.index(), Direction::Outgoing)
            .map(|e| (e.target(), *e.weight(), e.id()))
            .collect();
        for (user, position, edge) in edges {
            self.inner.remove_edge(edge);
            self.inner.add_edge(new.index(), user, position);
        }
    }

    /// Replaces an operand edge of `user` at `position` with one from `new`.
    pub(crate) fn set_operand(&mut self, user: NodeId, position: usize, new: NodeId) {
        self.version = fresh_version();
        let edge = self
            .inner
            .edges_directed(user.index(), Direction::Incoming)
            .find(|e| *e.weight() as usize == position)
            .map(|e| e.id());
        if let Some(edge) = edge {
            self.inner.remove_edge(edge);
        }
        let position = u32::try_from(position).unwrap_or(u32::MAX);
        self.inner.add_edge(new.index(), user.index(), position);
    }

    /// Makes node `id` compute `op` of `operands` (its type, role and
    /// uses unchanged): how an expansion ends in the composite's place.
    pub(crate) fn rewire(&mut self, id: NodeId, op: Op, operands: &[NodeId]) {
        self.version = fresh_version();
        let edges: Vec<petgraph::stable_graph::EdgeIndex> = self
            .inner
            .edges_directed(id.index(), Direction::Incoming)
            .map(|e| e.id())
            .collect();
        for edge in edges {
            self.inner.remove_edge(edge);
        }
        for (i, operand) in operands.iter().enumerate() {
            let position = u32::try_from(i).unwrap_or(u32::MAX);
            self.inner.add_edge(operand.index(), id.index(), position);
        }
        self.inner[id.index()].op = op;
    }

    /// Removes a node and its edges.
    pub fn remove(&mut self, id: NodeId) -> Option<Node> {
        self.version = fresh_version();
        self.inner.remove_node(id.index())
    }

    /// Nodes in topological order, ties broken by creation order, so the
    /// order is deterministic. `None` if the graph has a cycle.
    pub fn topo_order(&self) -> Option<Vec<NodeId>> {
        let mut pending: std::collections::HashMap<NodeId, usize> =
            std::collections::HashMap::new();
        let mut ready = BinaryHeap::new();
        for id in self.ids() {
            let count = self
                .inner
                .edges_directed(id.index(), Direction::Incoming)
                .count();
            if count == 0 {
                ready.push(Reverse(id));
            } else {
                pending.insert(id, count);
            }
        }
        let mut order = Vec::with_capacity(self.len());
        while let Some(Reverse(id)) = ready.pop() {
            order.push(id);
            for edge in self.inner.edges_directed(id.index(), Direction::Outgoing) {
                let user = NodeId::from_index(edge.target());
                if let Some(count) = pending.get_mut(&user) {
                    *count -= 1;
                    if *count == 0 {
                        pending.remove(&user);
                        ready.push(Reverse(user));
                    }
                }
            }
        }
        (order.len() == self.len()).then_some(order)
    }

    /// The node with role [`Role::Loss`], if any.
    pub fn loss(&self) -> Option<NodeId> {
        self.ids()
            .into_iter()
            .find(|&id| self.node(id).role == Role::Loss)
    }

    /// Output nodes with their names, in creation order.
    pub fn outputs(&self) -> Vec<(String, NodeId)> {
        self.ids()
            .into_iter()
            .filter_map(|id| match &self.node(id).role {
                Role::Output(name) => Some((name.clone(), id)),
                _ => None,
            })
            .collect()
    }

    /// Nodes with a given role, in creation order.
    pub(crate) fn with_role(&self, role: &Role) -> Vec<NodeId> {
        self.ids()
            .into_iter()
            .filter(|&id| &self.node(id).role == role)
            .collect()
    }
}
