//! The gradient-health monitor: what `gradc train` watches in the per-step
//! statistics of the step graph, the warnings it gives (each naming the
//! param and its source line), the `--watch` table, and where a NaN came
//! from.

use super::StepStats;
use std::collections::BTreeMap;

use crate::autodiff::rules;
use crate::interp::Evaluation;
use crate::ir::{Graph, Role};

/// Per-epoch accumulation of the step statistics.
#[derive(Clone, Debug, Default)]
pub struct Monitor {
    sums: BTreeMap<String, f64>,
    mins: BTreeMap<String, f64>,
    maxs: BTreeMap<String, f64>,
    steps: usize,
    /// Consecutive steps with each param's gradient norm below 1e-7.
    vanishing_run: BTreeMap<String, usize>,
    /// Mean gradient norm of each param in the previous epoch.
    previous: BTreeMap<String, f64>,
    /// Warnings already given, so each is said once.
    warned: std::collections::BTreeSet<String>,
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

    /// The mean of a statistic over the epoch.
    pub fn mean(&self, name: &str) -> Option<f64> {
        self.sums.get(name).map(|s| s / self.steps.max(1) as f64)
    }

    /// Warnings for the epoch just ended; then starts the next epoch.
    pub fn end_epoch(
        &mut self,
        epoch: usize,
        lines: &BTreeMap<String, u32>,
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
                    "warning: gradients of `{param}`{} are exploding: norm {max:.3e} in epoch {} (above 1e3); try a smaller learning rate or clip_grad_norm",
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

/// Says which op first produced a non-finite value in a step.
pub fn first_non_finite(graph: &Graph, evaluation: &Evaluation, step: u64, loss: f64) -> String {
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
                    "`{}` ({} of `{}`)",
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
        let role = match &node.role {
            Role::Stat(name) | Role::Update(name) | Role::Gradient(name) => {
                format!(", computing {name}")
            }
            _ => String::new(),
        };
        let bad = value
            .data
            .iter()
            .find(|v| !v.is_finite())
            .copied()
            .unwrap_or(f64::NAN);
        return format!(
            "step {step}: the loss is {loss}; the first non-finite value ({bad}) came from {what} at line {}:{}{role}",
            node.origin.line, node.origin.col
        );
    }
    format!("step {step}: the loss is {loss}")
}
