//! The gradient ledger: for every param of a model, before anything runs,
//! whether a gradient can reach it from the loss, why not, and the chain of
//! `grad_fn`s it would arrive through (`gradc explain`).
//!
//! It sorts params into the four cases a PyTorch user meets when they print
//! gradients before and after `backward()` and params before and after
//! `optimizer.step()`:
//!
//! 1. gets a gradient and is updated;
//! 2. frozen but on a gradient path: gradient not computed, never updated;
//! 3. no gradient can reach it (and why: not used by the loss, behind
//!    `stop_gradient`, only under `no_grad`, only through a
//!    non-differentiable operand);
//! 4. changed outside the optimizer: buffers only, since the language has
//!    no assignment, written by train-mode batch-norm.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::fmt::Write;

use crate::autodiff::{self, AutodiffError, rules};
use crate::diagnostic::Span;
use crate::format::thousands;
use crate::ir::{Dim, Graph, Loc, NodeId, Op, Role};

/// Why no gradient reaches a param.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Blocker {
    /// The loss does not depend on it at all.
    NotUsed,
    /// A path goes through `stop_gradient` (or `detach`) here.
    StopGradient(Loc),
    /// A path goes through a value computed inside the `no_grad` block
    /// whose keyword is here.
    NoGrad(Loc),
    /// A path goes through an operand with no derivative (labels, indices,
    /// running statistics) of this op.
    NotDifferentiable(String, Loc),
}

impl Blocker {
    /// The blocker in words.
    pub(crate) fn describe(&self) -> String {
        match self {
            Blocker::NotUsed => "the loss does not use it at all".into(),
            Blocker::StopGradient(at) => {
                format!(
                    "its path to the loss goes through `stop_gradient` at {}:{}",
                    at.line, at.col
                )
            }
            Blocker::NoGrad(at) => {
                format!("it is only used inside `no_grad` at {}:{}", at.line, at.col)
            }
            Blocker::NotDifferentiable(op, at) => format!(
                "it only reaches the loss through a non-differentiable operand of `{op}` at {}:{}",
                at.line, at.col
            ),
        }
    }

    /// Where the blocker is, if anywhere.
    pub(crate) fn loc(&self) -> Option<Loc> {
        match self {
            Blocker::NotUsed => None,
            Blocker::StopGradient(at) | Blocker::NoGrad(at) | Blocker::NotDifferentiable(_, at) => {
                Some(*at)
            }
        }
    }
}

/// The four cases.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Case {
    /// Case 1: a trainable param on a gradient path.
    Updated {
        /// `grad_fn`s from the loss down to the param.
        chain: Vec<String>,
    },
    /// Case 2: a frozen param on a gradient path.
    FrozenOnPath {
        /// The chain its gradient would take.
        chain: Vec<String>,
    },
    /// A frozen param that no gradient could reach anyway.
    FrozenOffPath {
        /// Why.
        blockers: Vec<Blocker>,
    },
    /// Case 3: a trainable param no gradient can reach.
    Unreachable {
        /// Why.
        blockers: Vec<Blocker>,
    },
}

/// One param's line in the ledger.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ParamEntry {
    /// Its name.
    pub name: String,
    /// Its declared type, as text.
    pub ty: String,
    /// Element count.
    pub elements: u64,
    /// The declaration.
    pub span: Span,
    /// Its line.
    pub line: u32,
    /// Which case.
    pub case: Case,
    /// Uses whose gradient is cut on the way to the loss (`stop_gradient`,
    /// `no_grad`, a non-differentiable operand), also when other uses
    /// still carry one: the silent bug of a detached path. Filled for
    /// params a gradient reaches (for the others the case lists them),
    /// when the ledger is built with chains.
    pub cut_uses: Vec<Blocker>,
}

/// A buffer and what writes it (case 4).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BufferEntry {
    /// Its name.
    pub name: String,
    /// Its line.
    pub line: u32,
    /// The ops that update it in train mode: (op, line, col).
    pub written_by: Vec<(String, u32, u32)>,
}

/// What freezing saves.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Pruned {
    /// Frozen params.
    pub params: usize,
    /// Their elements, whose gradients are never computed.
    pub elements: u64,
    /// Backward nodes not built.
    pub nodes: usize,
    /// Their floating-point operations per step.
    pub flops: u64,
    /// The size symbolic dimensions were given for counting.
    pub batch: u64,
}

/// The ledger of one model.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Ledger {
    /// The model.
    pub model: String,
    /// Whether the model has a loss at all.
    pub has_loss: bool,
    /// Every param, in declaration order.
    pub params: Vec<ParamEntry>,
    /// Retained values: (name, line).
    pub retained: Vec<(String, u32)>,
    /// Every `grad(e, x)`: its label, its type, and whether the loss
    /// differentiates it again (a second-order backward pass).
    pub grad_calls: Vec<(String, String, bool)>,
    /// Every buffer.
    pub buffers: Vec<BufferEntry>,
    /// What freezing saves.
    pub pruned: Pruned,
}

/// Builds the ledger of a train-mode forward graph; `batch` sizes the
/// symbolic dimensions for the FLOP count.
pub fn ledger(graph: &Graph, batch: u64) -> Result<Ledger, AutodiffError> {
    let params = param_cases(graph, true)?;
    let retained = graph
        .ids()
        .into_iter()
        .filter(|&id| graph.node(id).retain)
        .map(|id| {
            (
                graph.node(id).name.clone().unwrap_or_default(),
                graph.node(id).origin.line,
            )
        })
        .collect();
    let reach = autodiff::reach(graph)?;
    let grad_calls = graph
        .grad_calls
        .iter()
        .map(|call| {
            let again = reach.gets_gradient(call.value);
            let ty = graph.node(call.value).ty.to_string();
            (call.label.clone(), ty, again)
        })
        .collect();
    let mut buffers = Vec::new();
    for id in graph.with_role(&Role::Buffer) {
        let written_by = graph
            .users(id)
            .into_iter()
            .filter(|&user| {
                let position = graph.operands(user).iter().position(|&o| o == id);
                matches!(graph.node(user).op, Op::BatchNorm { training: true, .. })
                    && position >= Some(3)
            })
            .map(|user| {
                let node = graph.node(user);
                (node.op.name(), node.origin.line, node.origin.col)
            })
            .collect();
        let node = graph.node(id);
        buffers.push(BufferEntry {
            name: node.name.clone().unwrap_or_default(),
            line: node.origin.line,
            written_by,
        });
    }
    Ok(Ledger {
        model: graph.model.clone(),
        has_loss: graph.loss().is_some(),
        params,
        retained,
        grad_calls,
        buffers,
        pruned: pruned(graph, batch)?,
    })
}

/// The case of every param, in declaration order. Without `chains` it is
/// cheap enough for every `gradc check`: one backward search from the loss,
/// plus a forward search from each param no gradient reaches, to say why.
/// With `chains`, each reached param also gets its `grad_fn` chain, whose
/// length is the model's depth.
pub(crate) fn param_cases(graph: &Graph, chains: bool) -> Result<Vec<ParamEntry>, AutodiffError> {
    let toward_loss = gradient_tree(graph);
    let mut feeds_loss: Option<BTreeSet<NodeId>> = None;
    let mut params = Vec::new();
    for id in graph.ids() {
        let node = graph.node(id);
        if !matches!(node.role, Role::Param | Role::FrozenParam) {
            continue;
        }
        let frozen = node.role == Role::FrozenParam;
        let reached = toward_loss.contains_key(&id);
        let path = match (reached, chains) {
            (true, true) => Ok(chain(graph, id, &toward_loss).unwrap_or_default()),
            (true, false) => Ok(Vec::new()),
            (false, _) => {
                if feeds_loss.is_none() {
                    feeds_loss = Some(autodiff::reach(graph)?.feeds_loss);
                }
                Err(blockers(
                    graph,
                    id,
                    feeds_loss.as_ref().expect("computed above"),
                ))
            }
        };
        let cut_uses = if reached && chains {
            if feeds_loss.is_none() {
                feeds_loss = Some(autodiff::reach(graph)?.feeds_loss);
            }
            cuts(graph, id, feeds_loss.as_ref().expect("computed above"))
        } else {
            Vec::new()
        };
        let case = match path {
            Ok(chain) if frozen => Case::FrozenOnPath { chain },
            Ok(chain) => Case::Updated { chain },
            Err(blockers) if frozen => Case::FrozenOffPath { blockers },
            Err(blockers) => Case::Unreachable { blockers },
        };
        params.push(ParamEntry {
            name: node.name.clone().unwrap_or_default(),
            ty: node.ty.to_string(),
            elements: node.shape().fixed_count().unwrap_or(0),
            span: node.origin.span,
            line: node.origin.line,
            case,
            cut_uses,
        });
    }
    Ok(params)
}

/// For every node a gradient from the loss can reach, the next node on a
/// shortest such path toward the loss (breadth-first from the loss, along
/// operand edges the gradient flows through).
fn gradient_tree(graph: &Graph) -> HashMap<NodeId, NodeId> {
    let mut toward = HashMap::new();
    let Some(loss) = graph.loss() else {
        return toward;
    };
    let mut queue = VecDeque::from([loss]);
    let mut seen = BTreeSet::from([loss]);
    while let Some(id) = queue.pop_front() {
        for (position, operand) in graph.operands(id).into_iter().enumerate() {
            if autodiff::flows(graph, id, position) && seen.insert(operand) {
                toward.insert(operand, id);
                queue.push_back(operand);
            }
        }
    }
    toward
}

/// The `grad_fn` chain from the loss down to `param`, if a gradient reaches
/// it.
fn chain(
    graph: &Graph,
    param: NodeId,
    toward_loss: &HashMap<NodeId, NodeId>,
) -> Option<Vec<String>> {
    let mut at = *toward_loss.get(&param)?;
    let mut chain = Vec::new();
    loop {
        let op = &graph.node(at).op;
        // (A `scan_result` is part of its scan: one ScanBackward.)
        if !matches!(op, Op::Identity | Op::ScanResult { .. }) {
            // A node of a `grad(...)` is itself a gradient: differentiating
            // it is a backward pass of one order more.
            chain.push(match &graph.node(at).backward {
                Some(b) => format!("{} (order {})", rules::grad_fn(op), b.order + 1),
                None => rules::grad_fn(op).to_string(),
            });
        }
        match toward_loss.get(&at) {
            Some(&next) => at = next,
            None => break,
        }
    }
    chain.reverse();
    Some(chain)
}

/// Everything that stops the gradient on the way from `param` to the loss
/// (it has none of its own: [`gradient_tree`] found no path).
fn blockers(graph: &Graph, param: NodeId, feeds_loss: &BTreeSet<NodeId>) -> Vec<Blocker> {
    if !feeds_loss.contains(&param) {
        return vec![Blocker::NotUsed];
    }
    cuts(graph, param, feeds_loss)
}

/// Every place where a path from `param` to the loss is cut: the paths
/// followed are those the gradient flows along, and each edge it does not
/// flow along (into a value that still feeds the loss) is a cut.
fn cuts(graph: &Graph, param: NodeId, feeds_loss: &BTreeSet<NodeId>) -> Vec<Blocker> {
    let mut queue = VecDeque::from([param]);
    let mut seen = BTreeSet::from([param]);
    let mut blockers = BTreeSet::new();
    while let Some(id) = queue.pop_front() {
        for user in graph.users(id) {
            if !feeds_loss.contains(&user) {
                continue;
            }
            let node = graph.node(user);
            for (position, &operand) in graph.operands(user).iter().enumerate() {
                if operand != id {
                    continue;
                }
                if autodiff::flows(graph, user, position) {
                    if seen.insert(user) {
                        queue.push_back(user);
                    }
                    continue;
                }
                let here = Loc {
                    span: node.origin.span,
                    line: node.origin.line,
                    col: node.origin.col,
                };
                blockers.insert(
                    match (node.origin.no_grad, rules::rule(&node.op, position)) {
                        (Some(block), _) => Blocker::NoGrad(block),
                        (None, rules::Rule::Stopped) => Blocker::StopGradient(here),
                        (None, _) => Blocker::NotDifferentiable(node.op.name(), here),
                    },
                );
            }
        }
    }
    blockers.into_iter().collect()
}

/// What the frozen params save: the backward nodes that differentiating
/// them too would add.
fn pruned(graph: &Graph, batch: u64) -> Result<Pruned, AutodiffError> {
    let frozen = graph.with_role(&Role::FrozenParam);
    let elements = frozen
        .iter()
        .map(|&id| graph.node(id).shape().fixed_count().unwrap_or(0))
        .sum();
    let actual = autodiff::differentiate(graph)?;
    let mut thawed = graph.clone();
    for &id in &frozen {
        thawed.node_mut(id).role = Role::Param;
    }
    let unpruned = autodiff::differentiate(&thawed)?;
    let backward_flops = |g: &Graph| -> (usize, u64) {
        let nodes: Vec<NodeId> = g
            .ids()
            .into_iter()
            .filter(|&id| g.node(id).backward.is_some())
            .collect();
        (
            nodes.len(),
            nodes.iter().map(|&id| flops(g, id, batch)).sum(),
        )
    };
    let (nodes_actual, flops_actual) = backward_flops(&actual);
    let (nodes_unpruned, flops_unpruned) = backward_flops(&unpruned);
    Ok(Pruned {
        params: frozen.len(),
        elements,
        nodes: nodes_unpruned.saturating_sub(nodes_actual),
        flops: flops_unpruned.saturating_sub(flops_actual),
        batch,
    })
}

/// Element count of a node with symbolic dimensions set to `batch`.
fn count(graph: &Graph, id: NodeId, batch: u64) -> u64 {
    graph.node(id).shape().count_with(batch)
}

/// An estimate of a node's floating-point operations: `2 m k n` for a
/// matrix product (a gradient's included), a few per element for
/// everything else.
pub fn flops(graph: &Graph, id: NodeId, batch: u64) -> u64 {
    let node = graph.node(id);
    let operands = graph.operands(id);
    match &node.op {
        Op::MatMul | Op::MatMulT { .. } => {
            // `2 k` per output element, `k` the length summed over: `a`'s
            // last axis, or for `a^T @ c` its rows (a batch's included).
            let a = operands[0];
            let last = match graph.node(a).shape().0.last() {
                Some(Dim::Fixed(k)) => *k,
                _ => batch,
            };
            let k = match &node.op {
                Op::MatMulT {
                    transpose_a: true, ..
                } => count(graph, a, batch) / last.max(1),
                _ => last,
            };
            count(graph, id, batch).saturating_mul(k).saturating_mul(2)
        }
        // `2 k` per output element, `k` the left operand's last axis.
        Op::BatchMatMul { transpose_a, .. } => {
            let shape = graph.node(operands[0]).shape();
            let inner = match transpose_a {
                false => shape.0.last(),
                true => shape.0.get(shape.rank().saturating_sub(2)),
            };
            let k = match inner {
                Some(Dim::Fixed(k)) => *k,
                _ => batch,
            };
            count(graph, id, batch).saturating_mul(k).saturating_mul(2)
        }
        // A loop: its body's work once per step.
        Op::Scan(scan) => {
            let steps = match &scan.length {
                Dim::Fixed(n) => *n,
                Dim::Sym(_) => batch,
            };
            let body: u64 = scan
                .body
                .ids()
                .into_iter()
                .map(|n| flops(&scan.body, n, batch))
                .fold(0, u64::saturating_add);
            body.saturating_mul(steps)
        }
        Op::Input
        | Op::Param(_)
        | Op::Buffer(_)
        | Op::Constant(_)
        | Op::Reshape
        | Op::Identity
        | Op::ScanResult { .. }
        | Op::StopGradient => 0,
        Op::Softmax { .. }
        | Op::LogSoftmax { .. }
        | Op::CrossEntropy
        | Op::BatchNorm { .. }
        | Op::LayerNorm { .. } => {
            let input = operands.first().copied().unwrap_or(id);
            count(graph, input, batch).saturating_mul(5)
        }
        _ => count(graph, id, batch).max(operands.first().map_or(0, |&o| count(graph, o, batch))),
    }
}

/// The cut uses of a param a gradient still reaches.
fn render_cuts(out: &mut String, entry: &ParamEntry) {
    for cut in &entry.cut_uses {
        let place = match cut {
            Blocker::NotUsed => continue,
            Blocker::StopGradient(at) => {
                format!(
                    "a use goes through `stop_gradient` at {}:{}",
                    at.line, at.col
                )
            }
            Blocker::NoGrad(at) => format!("a use is inside `no_grad` at {}:{}", at.line, at.col),
            Blocker::NotDifferentiable(op, at) => format!(
                "a use is a non-differentiable operand of `{op}` at {}:{}",
                at.line, at.col
            ),
        };
        let _ = writeln!(
            out,
            "    gradient cut: {place}; that path adds nothing to d(loss)/d({}), the others still do",
            entry.name
        );
    }
}

/// Renders the ledger as `gradc explain` prints it.
pub fn render(ledger: &Ledger) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "gradient ledger of `{}` (train mode), before anything runs",
        ledger.model
    );
    if !ledger.has_loss {
        let _ = writeln!(
            out,
            "\nthe model has no `loss`: nothing is differentiated and no param gets a gradient"
        );
    }
    let _ = writeln!(out, "\nparams");
    if ledger.params.is_empty() {
        let _ = writeln!(out, "  (none)");
    }
    for entry in &ledger.params {
        let frozen = matches!(
            entry.case,
            Case::FrozenOnPath { .. } | Case::FrozenOffPath { .. }
        );
        let _ = writeln!(
            out,
            "  {}: {}, {} elements, {} (line {})",
            entry.name,
            entry.ty,
            thousands(entry.elements),
            if frozen { "frozen" } else { "trainable" },
            entry.line
        );
        match &entry.case {
            Case::Updated { chain } => {
                let _ = writeln!(
                    out,
                    "    case 1, gets a gradient and is updated: every step computes d(loss)/d({}) and the optimizer applies it",
                    entry.name
                );
                let _ = writeln!(
                    out,
                    "    grad_fn chain: {} <- {}",
                    chain.join(" <- "),
                    entry.name
                );
                render_cuts(&mut out, entry);
            }
            Case::FrozenOnPath { chain } => {
                let _ = writeln!(
                    out,
                    "    case 2, on a gradient path but frozen: the gradient is not even computed (its backward subgraph is pruned) and the optimizer never updates it"
                );
                let _ = writeln!(
                    out,
                    "    the gradient would arrive through: {} <- {}",
                    chain.join(" <- "),
                    entry.name
                );
                render_cuts(&mut out, entry);
            }
            Case::FrozenOffPath { blockers } => {
                let _ = writeln!(
                    out,
                    "    frozen, and no gradient could reach it anyway: {}",
                    describe(blockers)
                );
            }
            Case::Unreachable { blockers } => {
                let _ = writeln!(
                    out,
                    "    case 3, no gradient can reach it: {}",
                    describe(blockers)
                );
                let _ = writeln!(
                    out,
                    "    its value never changes during training; warning W0002"
                );
            }
        }
    }
    if !ledger.retained.is_empty() {
        let _ = writeln!(out, "\nretained values (like `retain_grad()`)");
        for (name, line) in &ledger.retained {
            let _ = writeln!(
                out,
                "  {name} (line {line}): d(loss)/d({name}) is reported as grad.{name}"
            );
        }
    }
    if !ledger.grad_calls.is_empty() {
        let _ = writeln!(
            out,
            "\ngradients in the model (like `torch.autograd.grad(..., create_graph=True)`)"
        );
        for (label, ty, again) in &ledger.grad_calls {
            let use_ = if *again {
                "the loss differentiates it again: its nodes get a second-order backward pass (order 2 in `--stage backward`)"
            } else {
                "the loss does not differentiate it: no second-order pass"
            };
            let _ = writeln!(
                out,
                "  {label}: {ty}, computed in the forward pass from derivative rules; {use_}"
            );
        }
    }
    let pruned = &ledger.pruned;
    if pruned.params > 0 {
        let _ = writeln!(out, "\nfrozen subgraphs");
        let _ = writeln!(
            out,
            "  {} frozen param{} ({} parameters): gradients never computed; pruning saves {} backward node{} and {} FLOPs per step (symbolic dimensions = {})",
            pruned.params,
            if pruned.params == 1 { "" } else { "s" },
            thousands(pruned.elements),
            pruned.nodes,
            if pruned.nodes == 1 { "" } else { "s" },
            thousands(pruned.flops),
            pruned.batch
        );
    }
    let _ = writeln!(out, "\nwritten outside the optimizer (case 4)");
    for buffer in &ledger.buffers {
        if buffer.written_by.is_empty() {
            let _ = writeln!(
                out,
                "  buffer {} (line {}): read only, never written",
                buffer.name, buffer.line
            );
        }
        for (op, line, col) in &buffer.written_by {
            let _ = writeln!(
                out,
                "  buffer {} (line {}): no gradient, but updated by `{op}` at {line}:{col} in train mode (running statistics); unchanged in eval mode",
                buffer.name, buffer.line
            );
        }
    }
    let _ = writeln!(
        out,
        "  no param: the language has no assignment, so only the optimizer writes params"
    );
    let count = |f: fn(&Case) -> bool| ledger.params.iter().filter(|p| f(&p.case)).count();
    let _ = writeln!(
        out,
        "\nsummary: {} param{}: {} updated, {} frozen, {} unreachable",
        ledger.params.len(),
        if ledger.params.len() == 1 { "" } else { "s" },
        count(|c| matches!(c, Case::Updated { .. })),
        count(|c| matches!(c, Case::FrozenOnPath { .. } | Case::FrozenOffPath { .. })),
        count(|c| matches!(c, Case::Unreachable { .. })),
    );
    out
}

fn describe(blockers: &[Blocker]) -> String {
    let words: Vec<String> = blockers.iter().map(Blocker::describe).collect();
    words.join("; ")
}
