//! Memory planning: the buffers a kernel plan needs, when each is live, and
//! which buffers can share storage.
//!
//! A value gets a buffer when a kernel writes it for a later kernel or as a
//! result; values used only inside their kernel stay in registers. A buffer
//! is live from the kernel that writes it to the last kernel that reads it
//! (results stay live to the end). Buffers are assigned to slots in kernel
//! order, reusing the smallest free slot that is large enough (best fit).
//! Leaves (inputs, params, buffers, optimizer state) live outside the plan
//! and are counted apart. Sizes bind every symbolic dimension to one batch
//! size.

use std::fmt::Write;

use super::fusion::Plan;
use crate::format::thousands;
use crate::ir::{Dim, Graph, NodeId, Role};

/// The memory plan.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MemoryPlan {
    /// The size symbolic dimensions were given.
    pub batch: u64,
    /// Buffers: (value, bytes, first kernel, last kernel, slot).
    pub buffers: Vec<(NodeId, u64, usize, usize, usize)>,
    /// Bytes of each slot.
    pub slots: Vec<u64>,
    /// The most bytes live at once.
    pub peak_bytes: u64,
    /// Bytes of the leaves.
    pub leaf_bytes: u64,
}

fn bytes(graph: &Graph, id: NodeId, batch: u64) -> u64 {
    let node = graph.node(id);
    let count = node.shape().0.iter().fold(1u64, |acc, d| {
        acc.saturating_mul(match d {
            Dim::Fixed(n) => *n,
            Dim::Sym(_) => batch,
        })
    });
    count.saturating_mul(node.dtype().size_bytes())
}

/// Plans the buffers of a kernel plan.
pub fn plan(graph: &Graph, kernels: &Plan, batch: u64) -> MemoryPlan {
    let last_kernel = kernels.kernels.len().saturating_sub(1);
    let mut buffers = Vec::new();
    for k in 0..kernels.kernels.len() {
        for id in kernels.outputs(graph, k) {
            let last_use = if graph.node(id).role != Role::Intermediate {
                last_kernel
            } else {
                kernels
                    .reader_kernels(graph, id)
                    .into_iter()
                    .max()
                    .unwrap_or(k)
            };
            buffers.push((id, bytes(graph, id, batch), k, last_use, 0));
        }
    }
    // Best-fit slot assignment in order of first use.
    let mut slots: Vec<u64> = Vec::new();
    let mut free_after: Vec<usize> = Vec::new();
    for buffer in &mut buffers {
        let (_, size, first, last, _) = *buffer;
        let candidate = (0..slots.len())
            .filter(|&s| free_after[s] < first && slots[s] >= size)
            .min_by_key(|&s| slots[s]);
        let slot = match candidate {
            Some(s) => s,
            None => {
                slots.push(size);
                free_after.push(0);
                slots.len() - 1
            }
        };
        free_after[slot] = last;
        buffer.4 = slot;
    }
    let peak_bytes = (0..kernels.kernels.len())
        .map(|k| {
            buffers
                .iter()
                .filter(|b| b.2 <= k && k <= b.3)
                .map(|b| b.1)
                .sum::<u64>()
        })
        .max()
        .unwrap_or(0);
    let leaf_bytes = graph
        .ids()
        .into_iter()
        .filter(|&id| {
            graph.node(id).op.is_leaf() && !matches!(graph.node(id).op, crate::ir::Op::Constant(_))
        })
        .map(|id| bytes(graph, id, batch))
        .sum();
    MemoryPlan {
        batch,
        buffers,
        slots,
        peak_bytes,
        leaf_bytes,
    }
}

/// Renders the memory plan's summary.
pub fn render(memory: &MemoryPlan) -> String {
    let mut out = String::new();
    let total: u64 = memory.slots.iter().sum();
    let unshared: u64 = memory.buffers.iter().map(|b| b.1).sum();
    let _ = writeln!(
        out,
        "memory (symbolic dimensions = {}): {} buffers in {} slots, {} bytes allocated ({} without reuse); peak live {} bytes; leaves {} bytes",
        memory.batch,
        memory.buffers.len(),
        memory.slots.len(),
        thousands(total),
        thousands(unshared),
        thousands(memory.peak_bytes),
        thousands(memory.leaf_bytes)
    );
    out
}
