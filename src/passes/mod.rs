//! Graph optimization: the passes that turn a step (or eval) graph into the
//! kernel plan the JIT compiles.
//!
//! The passes are plain functions `fn(&mut Graph) -> bool` (true when they
//! changed something), listed in order in [`PASSES`]. [`optimize`] runs the
//! list in that order, repeatedly until nothing changes (at most
//! `MAX_ROUNDS` rounds), with the verifier after every pass in tests and
//! debug builds. Then [`fusion::plan`] partitions the optimized graph into
//! kernels and [`memory::plan`] assigns their buffers.
//!
//! The passes preserve what the graph computes (the equivalence tests
//! evaluate both with the reference interpreter), its interface (every
//! leaf stays, so the runtime feeds the same names) and its results (every
//! node with a role keeps computing the same value under that role).

pub mod cse;
pub mod dce;
pub mod fold;
pub mod fusion;
pub mod memory;
pub mod patterns;
pub mod simplify;
pub mod transpose;

use crate::ir::{Graph, Node, NodeId, Op, Role, verify};

/// A pass: changes the graph in place, says whether it changed anything.
pub(crate) type Pass = fn(&mut Graph) -> bool;

/// The passes, in the order they run.
pub const PASSES: &[(&str, Pass)] = &[
    ("patterns", patterns::run),
    ("expand", crate::ir::expand::run),
    ("fold", fold::run),
    ("simplify", simplify::run),
    ("cse", cse::run),
    ("transpose", transpose::run),
    ("dce", dce::run),
];

/// Rounds of the whole list before giving up on a fixed point.
pub(crate) const MAX_ROUNDS: usize = 8;

/// The names of the passes, for `--dump-after`.
pub fn names() -> Vec<&'static str> {
    PASSES.iter().map(|(name, _)| *name).collect()
}

/// Runs every pass in order until nothing changes. `after` is called with
/// the pass name and the graph after each pass that changed it.
pub fn optimize(graph: &mut Graph, mut after: impl FnMut(&str, &Graph)) {
    for _ in 0..MAX_ROUNDS {
        let mut changed = false;
        for (name, pass) in PASSES {
            if pass(graph) {
                changed = true;
                if cfg!(debug_assertions)
                    && let Err(errors) = verify::verify(graph)
                {
                    panic!("pass `{name}` broke the graph: {errors:#?}");
                }
                after(name, graph);
            }
        }
        if !changed {
            break;
        }
    }
}

/// Makes every use of `old` read `new`, and moves `old`'s role, name and
/// `retain` to `new` so the graph's results are unchanged. When `new`
/// already has a role, `old` stays as an `identity` of `new` carrying its
/// own role.
pub fn replace(graph: &mut Graph, old: NodeId, new: NodeId) {
    if old == new {
        return;
    }
    graph.redirect_uses(old, new);
    let role = graph.node(old).role.clone();
    if role == Role::Intermediate {
        let name = graph.node(old).name.clone();
        let target = graph.node_mut(new);
        if target.name.is_none() && !target.op.is_leaf() {
            target.name = name;
        }
        return;
    }
    if graph.node(new).role == Role::Intermediate && !graph.node(new).op.is_leaf() {
        let old_node = graph.node(old).clone();
        let target = graph.node_mut(new);
        target.role = role;
        target.name = old_node.name.or(target.name.take());
        target.retain |= old_node.retain;
        graph.node_mut(old).role = Role::Intermediate;
        return;
    }
    // An identity of `new` takes over `old`'s role; `old` becomes dead.
    let keep = graph.node(old).clone();
    let identity = Node {
        op: Op::Identity,
        ..keep
    };
    graph.add(identity, &[new]);
    let old = graph.node_mut(old);
    old.role = Role::Intermediate;
    old.retain = false;
}

/// Whether a node's value is a result of the graph (it has a role other
/// than intermediate) or a leaf, which no pass may remove.
pub(crate) fn is_root(graph: &Graph, id: NodeId) -> bool {
    let node = graph.node(id);
    node.role != Role::Intermediate || (node.op.is_leaf() && !matches!(node.op, Op::Constant(_)))
}
