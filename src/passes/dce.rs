//! Dead-code elimination: removes every node that no result needs.
//!
//! Results are the nodes with a role (outputs, the loss, gradients, updates,
//! monitor statistics) and the retained values; leaves other than constants
//! are the graph's interface and always stay. Everything else survives only
//! if a result depends on it.

use std::collections::BTreeSet;

use super::is_root;
use crate::ir::Graph;

/// Removes dead nodes; true if any was removed.
pub fn run(graph: &mut Graph) -> bool {
    let mut live = BTreeSet::new();
    let mut stack: Vec<_> = graph
        .ids()
        .into_iter()
        .filter(|&id| is_root(graph, id) || graph.node(id).retain)
        .collect();
    while let Some(id) = stack.pop() {
        if live.insert(id) {
            stack.extend(graph.operands(id));
        }
    }
    let dead: Vec<_> = graph
        .ids()
        .into_iter()
        .filter(|id| !live.contains(id))
        .collect();
    for &id in &dead {
        graph.remove(id);
    }
    !dead.is_empty()
}
