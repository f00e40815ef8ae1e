//! The gradient-health monitor: what `gradc train` watches in the per-step
//! statistics of the step graph, the warnings it gives (each naming the
//! param and its source line), the `--watch` table, and where a NaN came
//! from.

use super::StepStats;
use std::collections::BTreeMap;

use crate::autodiff::rules;
use crate::interp::Evaluation;
use crate::ir::{Graph, NodeId, Role};

/// Per-epoch accumulation of the step statistics.
#[derive(Clone, Debug, Default)]
pub(crate) struct Monitor {
    sums: BTreeMap<String, f64>,
    mins: BTreeMap<String, f64>,
    maxs: BTreeMap<String, f64>,
    steps: usize,
    /// Consecutive steps with each param's gradient norm below 1e-7.
    vanishing_run: BTreeMap<String, usize>,
    /// Mean gradient norm of each param in the previous epoch.
    previous: BTreeMap<String, f64>,
    /// Consecutive epochs with each weight matrix's updates above
    /// [`VIOLENT_UPDATE`] of its weights.
    violent_run: BTreeMap<String, usize>,
    /// Warnings already given, so each is said once.
    warned: std::collections::BTreeSet<String>,
}

/// The rank of every param: weight matrices have rank 2 or more.
pub(crate) fn ranks(graph: &Graph) -> BTreeMap<String, usize> {
    graph
        .with_role(&Role::Param)
        .into_iter()
        .filter_map(|id| {
            let node = graph.node(id);
            Some((node.name.clone()?, node.shape().0.len()))
        })
        .collect()
}

/// Where params and ReLUs are declared, for messages: name to line.
pub fn lines(graph: &Graph) -> BTreeMap<String, u32> {
    let mut lines = BTreeMap::new();
    for id in graph.ids() {
        let node = graph.node(id);
        if let Some(name) = &node.name {
            lines.entry(name.clone()).or_insert(node.origin.line);
        }
    }
    lines
}

/// Sets `map[name]` to `next` of its value (`start` if it has none),
/// copying `name` only when it is new.
fn update<V: Copy>(map: &mut BTreeMap<String, V>, name: &str, start: V, next: impl Fn(V) -> V) {
    match map.get_mut(name) {
        Some(value) => *value = next(*value),
        None => {
            map.insert(name.to_string(), next(start));
        }
    }
}

/// A weight matrix whose mean gradient norm is below this fraction of the
/// largest one's gets a vanishing-gradient warning.
const VANISHING_RATIO: f64 = 1e-3;

/// Updates below this fraction of the weights per step are too small to
/// learn in any reasonable time.
const TIMID_UPDATE: f64 = 1e-5;

/// Updates above this fraction of the weights per step, two epochs in a
/// row, are too large (a healthy run starting from small weights can
/// exceed 1e-1 in its first epochs).
const VIOLENT_UPDATE: f64 = 0.3;

/// Steps in a row with a vanishing gradient before it is reported.
const VANISHING_STEPS: usize = 20;

impl Monitor {
    /// Records one step's statistics (names are copied the first time
    /// they are seen only).
    pub fn record(&mut self, stats: &StepStats) {
        self.steps += 1;
        for (name, value) in stats.iter() {
            update(&mut self.sums, name, 0.0, |sum| sum + value);
            update(&mut self.mins, name, f64::INFINITY, |min| min.min(value));
            update(&mut self.maxs, name, f64::NEG_INFINITY, |max| {
                max.max(value)
            });
            if let Some(param) = name.strip_prefix("grad_norm.") {
                let vanishing = value < 1e-7;
                update(&mut self.vanishing_run, param, 0, |run| {
                    if vanishing { run + 1 } else { 0 }
                });
            }
        }
    }

    /// The names of the statistics with a prefix, without it (`grad_norm.`
    /// gives the params, `dead.` the ReLUs).
    fn names(&self, prefix: &str) -> Vec<String> {
        self.sums
            .keys()
            .filter_map(|k| k.strip_prefix(prefix).map(str::to_string))
            .collect()
    }

    /// The mean of every statistic over the epoch so far, by name.
    pub fn means(&self) -> BTreeMap<String, f64> {
        self.sums
            .iter()
            .map(|(name, sum)| (name.clone(), sum / self.steps.max(1) as f64))
            .collect()
    }

    /// The mean of a statistic over the epoch.
    pub fn mean(&self, name: &str) -> Option<f64> {
        self.sums.get(name).map(|s| s / self.steps.max(1) as f64)
    }

    /// Warnings for the epoch just ended; then starts the next epoch.
    pub(crate) fn end_epoch(
        &mut self,
        epoch: usize,
        lines: &BTreeMap<String, u32>,
        ranks: &BTreeMap<String, usize>,
        lr: f64,
    ) -> Vec<String> {
        let mut warnings = Vec::new();
        let at = |name: &str| {
            lines
                .get(name)
                .map_or(String::new(), |l| format!(" (line {l})"))
        };
        let params = self.names("grad_norm.");
        for param in &params {
            let norm = self.mean(&format!("grad_norm.{param}")).unwrap_or(0.0);
            let max = self
                .maxs
                .get(&format!("grad_norm.{param}"))
                .copied()
                .unwrap_or(0.0);
            if self.vanishing_run.get(param).copied().unwrap_or(0)
                >= VANISHING_STEPS.min(self.steps.max(1))
            {
                self.warn(&mut warnings, format!("vanishing:{param}"), format!(
                    "warning: gradients of `{param}`{} are vanishing: norm below 1e-7 for {} steps in a row",
                    at(param),
                    self.vanishing_run[param]
                ));
            }
            if max > 1e3 {
                self.warn(&mut warnings, format!("exploding:{param}"), format!(
                    "warning: gradients of `{param}`{} are exploding: norm {max:.3e} in epoch {} (above 1e3); remedies: a smaller learning rate, clip_grad_norm, normalization (batch_norm, layer_norm)",
                    at(param),
                    epoch + 1
                ));
            } else if let Some(&before) = self.previous.get(param)
                && before > 0.0
                && norm > 10.0 * before
            {
                self.warn(&mut warnings, format!("growing:{param}"), format!(
                    "warning: gradients of `{param}`{} grew {:.0}x in epoch {} (mean norm {before:.3e} -> {norm:.3e})",
                    at(param),
                    norm / before,
                    epoch + 1
                ));
            }
            let moved = self
                .maxs
                .get(&format!("update_ratio.{param}"))
                .copied()
                .unwrap_or(0.0);
            if norm > 0.0 && moved == 0.0 {
                self.warn(&mut warnings, format!("stuck:{param}"), format!(
                    "warning: `{param}`{} gets a gradient (mean norm {norm:.3e}) but its value did not change in epoch {}: the update (learning rate {lr:.3e}) is below the precision of the param",
                    at(param),
                    epoch + 1
                ));
            }
            self.previous.insert(param.clone(), norm);
        }
        self.judge_layers(&mut warnings, epoch, lines, ranks, lr);
        let relus = self.names("dead.");
        for relu in relus {
            if self
                .mins
                .get(&format!("dead.{relu}"))
                .copied()
                .unwrap_or(0.0)
                >= 1.0
            {
                self.warn(&mut warnings, format!("dead:{relu}"), format!(
                    "warning: every unit of ReLU `{relu}`{} was dead (zero for the whole batch) in every step of epoch {}: no gradient flows through it, the classic symptom of a learning rate that is too large",
                    at(&relu),
                    epoch + 1
                ));
            }
        }
        self.sums.clear();
        self.mins.clear();
        self.maxs.clear();
        self.steps = 0;
        warnings
    }

    /// Judges the weight matrices (params of rank 2 or more) against each
    /// other and against their own size, as the blog this project started
    /// from teaches: a layer whose gradient is a thousandth of the
    /// largest layer's or less is starved by vanishing gradients, and an
    /// update far from about 1e-3 of the weights per step is too timid or
    /// too violent.
    fn judge_layers(
        &mut self,
        warnings: &mut Vec<String>,
        epoch: usize,
        lines: &BTreeMap<String, u32>,
        ranks: &BTreeMap<String, usize>,
        lr: f64,
    ) {
        let at = |name: &str| {
            lines
                .get(name)
                .map_or(String::new(), |l| format!(" (line {l})"))
        };
        let matrices: Vec<(String, f64, f64)> = self
            .names("grad_norm.")
            .into_iter()
            .filter(|p| ranks.get(p).is_some_and(|&r| r >= 2))
            .filter_map(|p| {
                let norm = self.mean(&format!("grad_norm.{p}"))?;
                let ratio = self.mean(&format!("update_ratio.{p}")).unwrap_or(0.0);
                Some((p, norm, ratio))
            })
            .collect();
        let Some((largest, top, _)) = matrices
            .iter()
            .filter(|(_, norm, _)| norm.is_finite())
            .max_by(|a, b| a.1.total_cmp(&b.1))
            .cloned()
        else {
            return;
        };
        let starved: Vec<&(String, f64, f64)> = matrices
            .iter()
            .filter(|(_, norm, _)| *norm < top * VANISHING_RATIO)
            .collect();
        if let Some((first, norm, ratio)) = starved.first().copied() {
            let others: Vec<String> = starved[1..]
                .iter()
                .map(|(p, n, _)| format!("`{p}` ({n:.1e})"))
                .collect();
            let also = if others.is_empty() {
                String::new()
            } else {
                format!("; so do {}", others.join(", "))
            };
            let moves = if *ratio > 0.0 && *ratio < TIMID_UPDATE {
                format!(
                    ", and its updates are {ratio:.1e} of its weights per step (about 1e-3 is healthy)"
                )
            } else {
                String::new()
            };
            self.warn(warnings, format!("vanishing:{first}"), format!(
                "warning: vanishing gradients in epoch {}: `{first}`{} gets gradients {:.0}x smaller than `{largest}`{} (mean norm {norm:.1e} against {top:.1e}){moves}{also}. Gradients shrink on their way back through the layers, as they do through saturating sigmoid and tanh; remedies: relu or gelu instead of sigmoid/tanh, normalization (batch_norm, layer_norm), residual connections (`h + f(h)`)",
                epoch + 1,
                at(first),
                top / norm.max(f64::MIN_POSITIVE),
                at(&largest),
            ));
        }
        for (param, _, ratio) in &matrices {
            let violent = *ratio > VIOLENT_UPDATE;
            update(&mut self.violent_run, param, 0, |run| {
                if violent { run + 1 } else { 0 }
            });
            if self.violent_run[param] >= 2 {
                self.warn(warnings, format!("violent:{param}"), format!(
                    "warning: the updates of `{param}`{} were {ratio:.1e} of its weights per step in epoch {} and the one before (about 1e-3 is healthy): the learning rate ({lr:.1e}) is probably too large; lower it, or clip with clip_grad_norm",
                    at(param),
                    epoch + 1
                ));
            }
        }
    }

    fn warn(&mut self, warnings: &mut Vec<String>, key: String, message: String) {
        if self.warned.insert(key) {
            warnings.push(message);
        }
    }

    /// The `--watch` table of the epoch so far.
    pub fn table(&self) -> String {
        let mut out = String::from("    param            grad norm   update/weight   zero grads\n");
        let params = self.names("grad_norm.");
        for param in params {
            out.push_str(&format!(
                "    {:<16} {:>9.3e}   {:>13.3e}   {:>9.1}%\n",
                param,
                self.mean(&format!("grad_norm.{param}")).unwrap_or(0.0),
                self.mean(&format!("update_ratio.{param}")).unwrap_or(0.0),
                100.0 * self.mean(&format!("zero_grad.{param}")).unwrap_or(0.0),
            ));
        }
        for value in self.names("value_grad_norm.") {
            out.push_str(&format!(
                "    value {:<10} {:>9.3e}   (retained: the gradient of the value, not a param)\n",
                value,
                self.mean(&format!("value_grad_norm.{value}"))
                    .unwrap_or(0.0),
            ));
        }
        let relus = self.names("dead.");
        for relu in relus {
            out.push_str(&format!(
                "    relu {:<11} {:>5.1}% of units dead in a batch (mean)\n",
                relu,
                100.0 * self.mean(&format!("dead.{relu}")).unwrap_or(0.0)
            ));
        }
        out
    }
}

/// The role a value computes: its own, or else the first one found
/// downstream (a monitor statistic, an update, a gradient).
fn serving_role(graph: &Graph, id: NodeId) -> Option<Role> {
    let mut queue = std::collections::VecDeque::from([id]);
    let mut seen = std::collections::BTreeSet::from([id]);
    while let Some(current) = queue.pop_front() {
        let role = &graph.node(current).role;
        if matches!(role, Role::Stat(_) | Role::Update(_) | Role::Gradient(_)) {
            return Some(role.clone());
        }
        for user in graph.users(current) {
            if seen.insert(user) {
                queue.push_back(user);
            }
        }
    }
    None
}

/// Whether a value is part of the model's own forward or backward pass:
/// a backward node, or one that reaches the loss or an output.
fn serves_model(graph: &Graph, id: NodeId) -> bool {
    if graph.node(id).backward.is_some() {
        return true;
    }
    let mut stack = vec![id];
    let mut seen = std::collections::BTreeSet::from([id]);
    while let Some(current) = stack.pop() {
        if matches!(graph.node(current).role, Role::Loss | Role::Output(_)) {
            return true;
        }
        for user in graph.users(current) {
            if seen.insert(user) {
                stack.push(user);
            }
        }
    }
    false
}

/// A number for a message: plain when it reads well, in scientific
/// notation when it is huge or tiny.
pub fn number(value: f64) -> String {
    if value == 0.0 || !value.is_finite() || (1e-4..1e6).contains(&value.abs()) {
        format!("{value:.6}")
            .trim_end_matches('0')
            .trim_end_matches('.')
            .to_string()
    } else {
        format!("{value:.4e}")
    }
}

/// Says what in a step is not finite (the loss, or a gradient while the
/// loss is finite) and which op first produced a non-finite value, at its
/// source line (the evaluation should be the interpreter's, which runs
/// the ops as written).
pub(crate) fn first_non_finite(
    graph: &Graph,
    evaluation: &Evaluation,
    step: u64,
    loss: f64,
    grad_norm: Option<f64>,
) -> String {
    let what_diverged = if loss.is_finite() {
        match grad_norm {
            Some(norm) if !norm.is_finite() => format!(
                "step {step}: the loss is finite ({}) but the global gradient norm is {}",
                number(loss),
                number(norm)
            ),
            _ => format!(
                "step {step}: the loss is finite ({}) but a value the step computes is not",
                number(loss)
            ),
        }
    } else {
        format!("step {step}: the loss is {}", number(loss))
    };
    let order = graph.topo_order().unwrap_or_else(|| graph.ids());
    for id in order {
        let Some(value) = evaluation.values.get(&id) else {
            continue;
        };
        if value.data.iter().all(|v| v.is_finite()) {
            continue;
        }
        let node = graph.node(id);
        let what = match &node.backward {
            Some(backward) => {
                let forward = graph.node(backward.forward);
                format!(
                    "`{}` ({} of `{}`, in the backward pass)",
                    node.op.name(),
                    backward.grad_fn,
                    forward.op.name()
                )
            }
            None => format!(
                "`{}` ({})",
                node.op.name(),
                rules::grad_fn(&node.op).replace("Backward", " forward")
            ),
        };
        let model_node = serves_model(graph, id);
        let role_of = if model_node {
            Some(node.role.clone())
        } else {
            serving_role(graph, id)
        };
        let role = match role_of {
            Some(Role::Stat(name)) => format!(", computing the monitor statistic `{name}`"),
            Some(Role::Update(name)) => format!(", computing the update of `{name}`"),
            Some(Role::Gradient(name)) => format!(", computing the gradient of `{name}`"),
            _ => String::new(),
        };
        let what = if model_node {
            what
        } else {
            // A node the step added (optimizer, clipping, monitor) takes
            // the position of the value it works on.
            format!("`{}` of the training step", node.op.name())
        };
        let (index, bad) = value
            .data
            .iter()
            .enumerate()
            .find(|(_, v)| !v.is_finite())
            .map_or((0, f64::NAN), |(i, &v)| (i, v));
        return format!(
            "{what_diverged}; the first non-finite value ({bad}, element {index}) came from {what} at line {}:{}{role}",
            node.origin.line, node.origin.col
        );
    }
    what_diverged
}
