//! The canonical text form of a graph: one line per node in topological
//! order, ids renumbered from `%0`, so the same model always prints the same
//! bytes. Snapshot tests store this text.
//!
//! ```text
//! graph digits_mlp (train)
//!   %0 = input x : f32[B, 64]  @3:5
//!   %8 = relu %7 : f32[B, 128]  @12:18  let h  retain
//!   %9 = add %7, %3 : f32[B, 64]  @3:21 (inlined at 25:18)
//!   %13 = cross_entropy %12, %1 : f32[]  @17:10  loss
//!   %15 = softmax %12 axis=1 : f32[B, 10]  @17:10  CrossEntropyBackward of %13
//! ```
//!
//! A `scan` node's body follows its line, indented, its nodes numbered
//! from `%0`, with the body nodes its inputs and results are.
//!
//! Backward nodes (`gradc graph --stage backward`) carry their forward
//! node's source position and name the `grad_fn` that produced them.

use std::collections::HashMap;
use std::fmt::Write;

use super::graph::{Graph, NodeId, Role};
use super::op::Op;

/// Renders the canonical text form.
pub fn to_text(graph: &Graph) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "graph {} ({})", graph.model, graph.mode);
    nodes(graph, "  ", &mut out);
    out
}

/// One line per node of `graph`, each after `indent`; a scan's body
/// follows its line, indented further and numbered from `%0` again.
fn nodes(graph: &Graph, indent: &str, out: &mut String) {
    let order = graph.topo_order().unwrap_or_else(|| graph.ids());
    let number: HashMap<NodeId, usize> = order.iter().enumerate().map(|(i, &id)| (id, i)).collect();
    for &id in &order {
        let node = graph.node(id);
        let mut line = format!("{indent}%{} = ", number[&id]);
        line.push_str(&node.op.name());
        if let (true, Some(name)) = (node.op.is_leaf(), &node.name) {
            let _ = write!(line, " {name}");
        }
        let operands: Vec<String> = graph
            .operands(id)
            .iter()
            .map(|o| format!("%{}", number[o]))
            .collect();
        if !operands.is_empty() {
            let _ = write!(line, " {}", operands.join(", "));
        }
        let attributes = node.op.attributes();
        if !attributes.is_empty() {
            let _ = write!(line, " {attributes}");
        }
        let _ = write!(
            line,
            " : {}  @{}:{}",
            node.ty, node.origin.line, node.origin.col
        );
        if let Some(call) = node.origin.call_site {
            let _ = write!(line, " (inlined at {}:{})", call.line, call.col);
        }
        match &node.role {
            Role::FrozenParam => line.push_str("  frozen"),
            Role::Output(name) => {
                let _ = write!(line, "  output {name}");
            }
            Role::Loss => line.push_str("  loss"),
            Role::Gradient(name) => {
                let _ = write!(line, "  grad {name}");
            }
            Role::Update(name) => {
                let _ = write!(line, "  update {name}");
            }
            Role::Stat(name) => {
                let _ = write!(line, "  stat {name}");
            }
            Role::Input
            | Role::Param
            | Role::Buffer
            | Role::Intermediate
            | Role::OptimizerState => {}
        }
        if let (false, Some(name)) = (node.op.is_leaf(), &node.name) {
            let _ = write!(line, "  let {name}");
        }
        if node.retain {
            line.push_str("  retain");
        }
        if node.origin.no_grad.is_some() {
            line.push_str("  no_grad");
        }
        if let Some(backward) = &node.backward {
            let of = number
                .get(&backward.forward)
                .map_or("?".to_string(), |n| format!("%{n}"));
            let _ = write!(line, "  {} of {of}", backward.grad_fn);
            if backward.order > 1 {
                let _ = write!(line, " (order {})", backward.order);
            }
        }
        out.push_str(&line);
        out.push('\n');
        if let Op::Scan(scan) = &node.op {
            let body_order = scan.body.topo_order().unwrap_or_else(|| scan.body.ids());
            let numbered = |ids: &[NodeId]| {
                let list: Vec<String> = ids
                    .iter()
                    .map(|id| match body_order.iter().position(|b| b == id) {
                        Some(n) => format!("%{n}"),
                        None => "?".into(),
                    })
                    .collect();
                list.join(", ")
            };
            let _ = writeln!(
                out,
                "{indent}  body (inputs {}; results {}):",
                numbered(&scan.inputs),
                numbered(&scan.results)
            );
            nodes(&scan.body, &format!("{indent}    "), out);
        }
    }
}
