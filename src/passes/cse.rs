//! Common-subexpression elimination: two nodes with the same op,
//! attributes, operands and type compute the same value, so the later one
//! is replaced by the earlier. Constants of equal value and type merge too.
//! This is what shares the forward values that backward rules re-derive.
//!
//! Leaves other than constants are never merged (two params with equal
//! declarations are still two params); dropout never is (two dropouts have
//! different mask keys, so they differ anyway).

use std::collections::HashMap;

use super::replace;
use crate::ir::{Graph, Op};

/// Merges duplicate nodes; true if any was merged.
pub fn run(graph: &mut Graph) -> bool {
    let mut seen: HashMap<String, crate::ir::NodeId> = HashMap::new();
    let mut changed = false;
    for id in graph.topo_order().unwrap_or_default() {
        if !graph.contains(id) {
            continue;
        }
        let node = graph.node(id);
        if node.op.is_leaf() && !matches!(node.op, Op::Constant(_)) {
            continue;
        }
        if node.op == Op::Identity && node.role != crate::ir::Role::Intermediate {
            continue;
        }
        let key = format!("{:?}|{}|{:?}", node.op, node.ty, graph.operands(id));
        match seen.get(&key) {
            Some(&earlier) => {
                replace(graph, id, earlier);
                changed = true;
            }
            None => {
                seen.insert(key, id);
            }
        }
    }
    changed
}
