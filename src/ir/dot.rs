//! Graphviz DOT export: each node labelled with its op, type and source
//! line; params, frozen params, buffers, inputs, outputs and the loss drawn
//! apart, and backward nodes (pink, with their `grad_fn`) and gradients
//! (green) apart from the forward ones; edges into backward nodes are
//! dashed. Node names follow the canonical numbering of [`super::text`].

use std::collections::HashMap;
use std::fmt::Write;

use super::graph::{Graph, NodeId, Role};

/// Renders the graph in DOT.
pub fn to_dot(graph: &Graph) -> String {
    let order = graph.topo_order().unwrap_or_else(|| graph.ids());
    let number: HashMap<NodeId, usize> = order.iter().enumerate().map(|(i, &id)| (id, i)).collect();
    let mut out = String::new();
    let _ = writeln!(
        out,
        "digraph \"{} ({})\" {{",
        escape(&graph.model),
        graph.mode
    );
    out.push_str("  rankdir=TB;\n  node [shape=box, fontname=\"monospace\", fontsize=10];\n");
    for &id in &order {
        let node = graph.node(id);
        let mut title = node.op.name();
        if let Some(name) = &node.name {
            let _ = write!(title, " {name}");
        }
        let mut label = format!(
            "%{}: {}\\n{}\\nline {}",
            number[&id],
            escape(&title),
            node.ty,
            node.origin.line
        );
        let style = match &node.role {
            Role::Input => "shape=ellipse, style=filled, fillcolor=\"#dbe9f6\"",
            Role::Param => "shape=box, style=\"filled,bold\", fillcolor=\"#ffd966\"",
            Role::FrozenParam => {
                label.push_str("\\nfrozen");
                "shape=box, style=\"filled,dashed\", fillcolor=\"#d9d9d9\""
            }
            Role::Buffer => "shape=box, style=\"filled,rounded\", fillcolor=\"#e2f0d9\"",
            Role::Output(name) => {
                let _ = write!(label, "\\noutput {}", escape(name));
                "shape=box, style=filled, fillcolor=\"#c9daf8\""
            }
            Role::Loss => {
                label.push_str("\\nloss");
                "shape=doubleoctagon, style=filled, fillcolor=\"#f4cccc\""
            }
            Role::Gradient(name) => {
                let _ = write!(label, "\\ngrad {}", escape(name));
                "shape=box, style=\"filled,bold\", fillcolor=\"#d9ead3\""
            }
            Role::OptimizerState => "shape=box, style=\"filled,rounded\", fillcolor=\"#fce5cd\"",
            Role::Update(name) => {
                let _ = write!(label, "\\nupdate {}", escape(name));
                "shape=box, style=\"filled,bold\", fillcolor=\"#fff2cc\""
            }
            Role::Stat(name) => {
                let _ = write!(label, "\\nstat {}", escape(name));
                "shape=note, style=filled, fillcolor=\"#eeeeee\""
            }
            Role::Intermediate if node.backward.is_some() => {
                "shape=box, style=filled, fillcolor=\"#ead1dc\""
            }
            Role::Intermediate => "shape=box",
        };
        if let Some(backward) = &node.backward {
            let of = number
                .get(&backward.forward)
                .map_or("?".to_string(), |n| format!("%{n}"));
            let _ = write!(label, "\\n{} of {of}", backward.grad_fn);
        }
        let _ = writeln!(out, "  n{} [label=\"{label}\", {style}];", number[&id]);
    }
    for &id in &order {
        let style = if graph.node(id).backward.is_some() {
            ", style=dashed"
        } else {
            ""
        };
        for (position, operand) in graph.operands(id).iter().enumerate() {
            let _ = writeln!(
                out,
                "  n{} -> n{} [label=\"{position}\"{style}];",
                number[operand], number[&id]
            );
        }
    }
    out.push_str("}\n");
    out
}

fn escape(text: &str) -> String {
    text.replace('\\', "\\\\").replace('"', "\\\"")
}
