//! Training: the runtime around one compiled step.
//!
//! A [`Session`] holds a model's step graph (`step::build`), its eval graph
//! and the training state (params, buffers, optimizer state, counters). Each
//! [`Session::step`] feeds one batch, the learning rate and the step
//! counter to the step graph through a [`Backend`] and takes back the new
//! state (or leaves it with a backend that keeps it between steps, as the
//! JIT does: [`Session::sync`] fetches it), the loss and the monitor
//! statistics. Nothing here is specific to the interpreter: the JIT plugs
//! in as another `Backend`.
//!
//! [`run`] is `gradc train`: data, epochs, schedules, metrics, checkpoints,
//! the gradient-health monitor, Ctrl-C.

pub mod checkpoint;
pub mod data;
pub mod init;
pub mod monitor;
pub mod plot;
pub mod run;

use std::collections::BTreeMap;
use std::sync::Arc;

use crate::interp::{self, Context, Evaluation, InterpError, Tensor};
use crate::ir::{Dim, Graph, NodeId, Op, Role};
use crate::lower::LoweredModel;
use crate::lower::train::{Optimizer, Schedule, TrainConfig};
use crate::step;

/// Why a backend could not run a graph.
#[derive(Clone, Debug, PartialEq)]
pub enum BackendError {
    /// The graph cannot run on these values (a missing or misfitting leaf,
    /// a label out of range): the interpreter's errors, which every backend
    /// reports alike.
    Run(InterpError),
    /// The backend itself failed (compiling, binding its buffers, state it
    /// should have kept): a compiler bug, with the backend's name.
    Internal {
        /// Where: `the interpreter`, `the JIT`, `the training session`.
        backend: &'static str,
        /// What went wrong.
        message: String,
    },
}

impl BackendError {
    /// An interpreter error raised inside `backend`: `Internal` ones are
    /// that backend's failures, the others are about the values.
    pub(crate) fn from_interp(backend: &'static str, error: InterpError) -> BackendError {
        match error {
            InterpError::Internal(message) => BackendError::internal(backend, message),
            other => BackendError::Run(other),
        }
    }

    /// A failure of `backend` itself.
    pub fn internal(backend: &'static str, message: impl Into<String>) -> BackendError {
        BackendError::Internal {
            backend,
            message: message.into(),
        }
    }
}

impl From<InterpError> for BackendError {
    fn from(error: InterpError) -> BackendError {
        BackendError::from_interp("the interpreter", error)
    }
}

impl std::fmt::Display for BackendError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            BackendError::Run(e) => write!(f, "{e}"),
            BackendError::Internal { backend, message } => {
                write!(f, "internal error in {backend} (a compiler bug): {message}")
            }
        }
    }
}

impl std::error::Error for BackendError {}

/// Runs graphs: the reference interpreter and the JIT.
pub trait Backend {
    /// The backend as messages name it: `the interpreter`, `the JIT`.
    fn name(&self) -> &'static str;

    /// Evaluates `graph` with its leaves bound by name.
    fn run(
        &mut self,
        graph: &Graph,
        leaves: &BTreeMap<String, Tensor>,
        context: Context,
    ) -> Result<Evaluation, BackendError>;

    /// Like [`Backend::run`], for a caller that reads only the values of
    /// `wanted` (and the leaves it passed): a backend may leave the other
    /// values out of the evaluation (the JIT then copies only these out of
    /// its buffers). By default, everything.
    fn run_wanted(
        &mut self,
        graph: &Graph,
        leaves: &BTreeMap<String, Tensor>,
        context: Context,
        wanted: &[NodeId],
    ) -> Result<Evaluation, BackendError> {
        let _ = wanted;
        self.run(graph, leaves, context)
    }

    /// Runs a training step whose `carried` state (each a leaf and the
    /// node computing its next value) the backend may keep between steps
    /// instead of handing it back: the state stays where the step reads it
    /// (the JIT's frame), as a model's params stay on the device in
    /// PyTorch.
    ///
    /// On entry, `kept` names the state the backend keeps for this caller
    /// (the values its previous step computed): they replace the carried
    /// leaves of `leaves`, which may be out of date. On return, `kept`
    /// names what the backend keeps now: after a successful step, this
    /// step's computed values, which the evaluation then leaves out; after
    /// an error, the values the step started from. By default nothing is
    /// kept: the evaluation holds the carried values, as `run_wanted`.
    fn run_carrying(
        &mut self,
        graph: &Graph,
        leaves: &BTreeMap<String, Tensor>,
        context: Context,
        wanted: &[NodeId],
        carried: &[Carried],
        kept: &mut Option<Kept>,
    ) -> Result<Evaluation, BackendError> {
        if kept.is_some() {
            return Err(BackendError::internal(
                self.name(),
                "this backend keeps no state between steps",
            ));
        }
        let mut wanted = wanted.to_vec();
        wanted.extend(carried.iter().map(|c| c.update));
        self.run_wanted(graph, leaves, context, &wanted)
    }

    /// Hands back an evaluation the caller has finished reading, whose
    /// tensors the backend may fill again next time instead of allocating
    /// new ones (the JIT does; by default it is dropped).
    fn recycle(&mut self, evaluation: Evaluation) {
        drop(evaluation);
    }

    /// The values of kept state, by name: those its step started from, or
    /// those it computed (`Kept::computed`).
    fn fetch_kept(
        &mut self,
        kept: &Kept,
        computed: bool,
    ) -> Result<BTreeMap<String, Tensor>, BackendError> {
        let _ = (kept, computed);
        Err(BackendError::internal(
            self.name(),
            "this backend keeps no state between steps",
        ))
    }
}

/// A state value a training step carries to the next: its name, its leaf
/// (a param, buffer or optimizer state) and the node computing its next
/// value (the `Role::Update` of that name).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Carried {
    /// The state's name.
    pub name: String,
    /// The leaf the step reads.
    pub leaf: NodeId,
    /// The value the step computes for the next step.
    pub update: NodeId,
}

impl Carried {
    /// The state a step graph carries: every `Role::Update` with the leaf
    /// of its name.
    pub fn of(graph: &Graph) -> Result<Vec<Carried>, InterpError> {
        let leaves: BTreeMap<&str, NodeId> = graph
            .ids()
            .into_iter()
            .filter(|&id| graph.node(id).op.is_leaf())
            .filter_map(|id| Some((graph.node(id).name.as_deref()?, id)))
            .collect();
        let mut carried = Vec::new();
        for id in graph.ids() {
            if let Role::Update(name) = &graph.node(id).role {
                let leaf = leaves.get(name.as_str()).copied().ok_or_else(|| {
                    InterpError::Internal(format!("update `{name}` has no state leaf"))
                })?;
                carried.push(Carried {
                    name: name.clone(),
                    leaf,
                    update: id,
                });
            }
        }
        Ok(carried)
    }
}

/// A backend's receipt for training state it keeps (`run_carrying`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Kept {
    /// Tells kept states apart (unique per backend).
    pub ticket: u64,
    /// Whether the step computed its values (false after an error: only
    /// the values it started from are there).
    pub computed: bool,
}

/// The reference interpreter as a backend.
#[derive(Clone, Copy, Debug, Default)]
pub struct Interpreter;

impl Backend for Interpreter {
    fn name(&self) -> &'static str {
        "the interpreter"
    }

    fn run(
        &mut self,
        graph: &Graph,
        leaves: &BTreeMap<String, Tensor>,
        context: Context,
    ) -> Result<Evaluation, BackendError> {
        Ok(interp::evaluate(graph, leaves, context)?)
    }
}

/// Why training could not go on.
#[derive(Debug)]
pub enum TrainError {
    /// The model or its configuration cannot be trained.
    Setup(String),
    /// Bad data.
    Data(data::DataError),
    /// A checkpoint could not be read or written, or does not fit.
    Checkpoint(String),
    /// A graph could not be evaluated.
    Run(BackendError),
    /// The loss or a gradient became NaN or infinite.
    NonFinite(String),
}

impl std::fmt::Display for TrainError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TrainError::Setup(m) | TrainError::Checkpoint(m) | TrainError::NonFinite(m) => {
                f.write_str(m)
            }
            TrainError::Data(e) => write!(f, "{e}"),
            TrainError::Run(e) => write!(f, "{e}"),
        }
    }
}

impl std::error::Error for TrainError {}

/// What one step returned.
#[derive(Clone, Debug, PartialEq)]
pub struct StepResult {
    /// The batch loss.
    pub loss: f64,
    /// Correct predictions in the batch, when the loss is a cross-entropy.
    pub correct: Option<usize>,
    /// Rows in the batch.
    pub rows: usize,
    /// The learning rate used.
    pub lr: f64,
    /// Monitor statistics by name (`grad_norm.w1`, `dead.h`, ...), in the
    /// step graph's order.
    pub stats: StepStats,
}

/// A step's monitor statistics: the names, shared with the session (one
/// reference counted per step, not one per name), and the values in the
/// same order.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct StepStats {
    /// The statistics' names.
    pub names: Arc<[Arc<str>]>,
    /// Their values, one per name.
    pub values: Vec<f64>,
}

impl StepStats {
    /// Each statistic as (name, value).
    pub fn iter(&self) -> impl Iterator<Item = (&str, f64)> {
        self.names
            .iter()
            .map(|name| &**name)
            .zip(self.values.iter().copied())
    }
}

/// Loss and accuracy over some rows.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Metrics {
    /// Mean loss per row.
    pub loss: f64,
    /// Fraction correct, when the loss is a cross-entropy.
    pub accuracy: Option<f64>,
    /// Rows evaluated.
    pub rows: usize,
}

/// A model being trained.
pub struct Session {
    /// The train-mode forward graph (with `--freeze` applied).
    pub forward: Graph,
    /// The step graph.
    pub step_graph: Graph,
    /// The eval-mode forward graph.
    pub eval_graph: Graph,
    /// The configuration (with command-line overrides applied).
    pub config: TrainConfig,
    /// Params, buffers and optimizer state by name, as of the last `sync`
    /// (`state`, `state_mut`).
    state: BTreeMap<String, Tensor>,
    /// The state the backend keeps (`Backend::run_carrying`): the current
    /// one, computed by the last step.
    kept: Option<Kept>,
    /// Whether `state` holds the kept values too.
    synced: bool,
    /// Steps taken so far.
    pub steps_done: u64,
    /// The epoch in progress (0-based).
    pub epoch: usize,
    /// The next batch of that epoch.
    pub batch_index: usize,
    /// Steps per epoch, for schedules (set by the caller that knows the data).
    pub steps_per_epoch: u64,
    /// What a step reads back, worked out once per step-graph version.
    reads: Option<StepReads>,
}

/// The values a step reads back from the step graph (of one version):
/// the loss, the statistics by name, the updates, and the logits and
/// labels for the accuracy; all of them in `wanted`.
struct StepReads {
    version: u64,
    loss: NodeId,
    /// The statistics' names and, in the same order, their values' ids.
    stat_names: Arc<[Arc<str>]>,
    stat_ids: Vec<NodeId>,
    carried: Vec<Carried>,
    /// The cross-entropy whose logits and labels give the accuracy.
    cross_entropy: Option<NodeId>,
    wanted: Vec<NodeId>,
}

impl StepReads {
    fn of(graph: &Graph) -> Result<StepReads, TrainError> {
        let loss = graph
            .loss()
            .ok_or_else(|| TrainError::Setup("the step graph has no loss".into()))?;
        let mut wanted = vec![loss];
        let mut stat_names = Vec::new();
        let mut stat_ids = Vec::new();
        for id in graph.ids() {
            if let Role::Stat(name) = &graph.node(id).role {
                stat_names.push(Arc::from(name.as_str()));
                stat_ids.push(id);
                wanted.push(id);
            }
        }
        let carried = Carried::of(graph).map_err(|e| TrainError::Run(e.into()))?;
        let cross_entropy = cross_entropy_node(graph);
        wanted.extend(cross_entropy.map_or_else(Vec::new, |n| graph.operands(n)));
        Ok(StepReads {
            version: graph.version(),
            loss,
            stat_names: stat_names.into(),
            stat_ids,
            carried,
            cross_entropy,
            wanted,
        })
    }
}

impl Session {
    /// Builds the graphs and initializes the state from the initializers,
    /// refusing state larger than the memory available
    /// (`available_memory`).
    pub fn new(
        model: &LoweredModel,
        config: TrainConfig,
        freeze: &[String],
    ) -> Result<Session, TrainError> {
        Session::with_memory_limit(model, config, freeze, available_memory())
    }

    /// [`Session::new`] with a memory limit in bytes (`--max-memory`), or
    /// none.
    pub(crate) fn with_memory_limit(
        model: &LoweredModel,
        config: TrainConfig,
        freeze: &[String],
        limit: Option<u64>,
    ) -> Result<Session, TrainError> {
        let mut forward = model.train.clone();
        for name in freeze {
            let found = forward.ids().into_iter().find(|&id| {
                forward.node(id).name.as_deref() == Some(name)
                    && matches!(forward.node(id).role, Role::Param | Role::FrozenParam)
            });
            match found {
                Some(id) => forward.node_mut(id).role = Role::FrozenParam,
                None => {
                    let params: Vec<String> = forward
                        .with_role(&Role::Param)
                        .into_iter()
                        .chain(forward.with_role(&Role::FrozenParam))
                        .filter_map(|id| forward.node(id).name.clone())
                        .collect();
                    return Err(TrainError::Setup(format!(
                        "--freeze {name}: the model has no param `{name}` (params: {})",
                        params.join(", ")
                    )));
                }
            }
        }
        if forward.loss().is_none() {
            return Err(TrainError::Setup(format!(
                "model `{}` has no `loss` to train",
                model.name
            )));
        }
        let step_graph =
            step::build(&forward, &config).map_err(|e| TrainError::Setup(e.to_string()))?;
        let mut session = Session {
            forward,
            step_graph,
            eval_graph: model.eval.clone(),
            config,
            state: BTreeMap::new(),
            kept: None,
            synced: true,
            steps_done: 0,
            epoch: 0,
            batch_index: 0,
            steps_per_epoch: 1,
            reads: None,
        };
        for id in session.step_graph.ids() {
            let node = session.step_graph.node(id);
            if matches!(node.op, Op::Param(_) | Op::Buffer(_) | Op::State) {
                interp::check_size(&fixed_shape(node.shape())).map_err(|e| {
                    TrainError::Setup(format!(
                        "`{}` is too large to train: {e}",
                        node.name.clone().unwrap_or_default()
                    ))
                })?;
            }
        }
        // The state is allocated next, and a failed allocation aborts the
        // process: refuse what cannot fit first.
        let state = state_bytes(&session.step_graph);
        if let Some(limit) = limit
            && state > limit
        {
            return Err(TrainError::Setup(format!(
                "the params, buffers and optimizer state of `{}` need {} but only {} is available; make the model smaller (or raise the limit with --max-memory)",
                model.name,
                bytes_text(state),
                bytes_text(limit)
            )));
        }
        session.initialize();
        // Leaves the step never reads (a frozen param the model does not
        // use) leave the step and eval graphs once the state has them: a backend
        // would copy them in at every step for nothing. They stay in the
        // state, so checkpoints keep them.
        for graph in [&mut session.step_graph, &mut session.eval_graph] {
            let unread: Vec<NodeId> = graph
                .ids()
                .into_iter()
                .filter(|&id| {
                    let node = graph.node(id);
                    matches!(node.op, Op::Param(_) | Op::Buffer(_))
                        && matches!(node.role, Role::Param | Role::FrozenParam | Role::Buffer)
                        && graph.users(id).is_empty()
                })
                .collect();
            for id in unread {
                graph.remove(id);
            }
        }
        Ok(session)
    }

    /// Sets every param and buffer from its initializer and the optimizer
    /// state to zero.
    pub(crate) fn initialize(&mut self) {
        self.kept = None;
        self.synced = true;
        let seed = self.config.seed;
        for id in self.step_graph.ids() {
            let node = self.step_graph.node(id);
            let name = node.name.clone().unwrap_or_default();
            let shape = fixed_shape(node.shape());
            let value = match node.op {
                Op::Param(init) | Op::Buffer(init) => {
                    init::initialize(init, &name, node.dtype(), &shape, seed)
                }
                Op::State => Tensor::zeros(node.dtype(), &shape),
                _ => continue,
            };
            self.state.insert(name, value);
        }
    }

    /// Brings the state up to date with what the backend keeps (after
    /// steps on a backend that keeps it, such as the JIT). The backend
    /// keeps it still, so the next step does not copy it in again.
    pub fn sync(&mut self, backend: &mut dyn Backend) -> Result<(), TrainError> {
        if let (Some(kept), false) = (self.kept, self.synced) {
            let values = backend.fetch_kept(&kept, true).map_err(|error| {
                TrainError::Run(BackendError::internal(
                    "the training session",
                    format!("cannot fetch the state the backend keeps: {error}"),
                ))
            })?;
            self.state.extend(values);
            self.synced = true;
        }
        Ok(())
    }

    /// Takes the state back from the backend (`sync`) and forgets the
    /// backend's copy, so that the next step copies it in again: for
    /// stepping on another backend after this one.
    pub fn release(&mut self, backend: &mut dyn Backend) -> Result<(), TrainError> {
        self.sync(backend)?;
        self.kept = None;
        Ok(())
    }

    /// Params, buffers and optimizer state by name: an error if the
    /// backend keeps newer values (call `sync` first).
    pub fn state(&self) -> Result<&BTreeMap<String, Tensor>, TrainError> {
        if self.synced {
            Ok(&self.state)
        } else {
            Err(TrainError::Setup(
                "the backend keeps newer state: `Session::sync` fetches it".into(),
            ))
        }
    }

    /// The state, to change: the backend's copy is forgotten, so the next
    /// step copies the state in again. An error if the backend keeps newer
    /// values (call `sync` first).
    pub fn state_mut(&mut self) -> Result<&mut BTreeMap<String, Tensor>, TrainError> {
        self.state()?;
        self.kept = None;
        Ok(&mut self.state)
    }

    /// Names of the trainable params that the step updates.
    pub fn trainable(&self) -> Vec<String> {
        self.step_graph
            .with_role(&Role::Param)
            .into_iter()
            .filter_map(|id| self.step_graph.node(id).name.clone())
            .collect()
    }

    /// The learning rate of step `t` (1-based).
    pub fn learning_rate(&self, t: u64) -> f64 {
        let base = match self.config.optimizer {
            Optimizer::Sgd { lr, .. } | Optimizer::Adam { lr, .. } => lr,
        };
        let total = self
            .config
            .epochs
            .saturating_mul(self.steps_per_epoch)
            .max(1);
        let epoch = (t.saturating_sub(1)) / self.steps_per_epoch.max(1);
        match self.config.schedule {
            Schedule::Constant => base,
            Schedule::Step { every, gamma } => base * gamma.powi((epoch / every.max(1)) as i32),
            Schedule::LinearWarmup { steps } => base * (t as f64 / steps.max(1) as f64).min(1.0),
            Schedule::Cosine { warmup } => {
                if t <= warmup {
                    base * t as f64 / warmup.max(1) as f64
                } else {
                    let progress =
                        (t - warmup) as f64 / (total.saturating_sub(warmup)).max(1) as f64;
                    base * 0.5 * (1.0 + (std::f64::consts::PI * progress.min(1.0)).cos())
                }
            }
        }
    }

    /// Runs one training step on a batch (the input tensors by name).
    /// The state changes only if the loss and every gradient are finite.
    pub fn step(
        &mut self,
        backend: &mut dyn Backend,
        batch: Vec<(String, Tensor)>,
    ) -> Result<StepResult, TrainError> {
        // (A name given twice would displace the batch's own tensor, which
        // would then go back into the state as if it were a param.)
        if let Some((name, _)) = batch
            .iter()
            .enumerate()
            .find_map(|(i, (name, _))| batch[..i].iter().find(|(n, _)| n == name))
        {
            return Err(TrainError::Setup(format!("the batch names `{name}` twice")));
        }
        let t = self.steps_done + 1;
        let lr = self.learning_rate(t);
        let dtype = self
            .forward
            .node(self.forward.loss().expect("checked in new"))
            .dtype();
        let rows = batch
            .first()
            .map_or(0, |(_, tensor)| tensor.shape.first().copied().unwrap_or(0));
        // The batch, the learning rate and the step join the state for the
        // call and leave it after (whatever happens), so the state, which
        // holds every param, is never copied.
        let mut leaves = std::mem::take(&mut self.state);
        let mut added = Vec::new();
        let mut displaced = Vec::new();
        let extra = batch.into_iter().chain([
            (step::LR.to_string(), Tensor::scalar(dtype, lr)),
            (step::STEP.to_string(), Tensor::scalar(dtype, t as f64)),
        ]);
        for (name, tensor) in extra {
            match leaves.insert(name.clone(), tensor) {
                Some(old) => displaced.push((name, old)),
                None => added.push(name),
            }
        }
        let context = Context {
            seed: self.config.seed,
            step: t,
        };
        // What this step reads back (worked out again only when the step
        // graph changed).
        let graph = &self.step_graph;
        if self
            .reads
            .as_ref()
            .is_none_or(|r| r.version != graph.version())
        {
            match StepReads::of(graph) {
                Ok(reads) => self.reads = Some(reads),
                Err(error) => {
                    self.state = restore(leaves, added, displaced);
                    return Err(error);
                }
            }
        }
        let reads = self.reads.as_ref().expect("just set");
        let loss_id = reads.loss;
        let result = backend.run_carrying(
            graph,
            &leaves,
            context,
            &reads.wanted,
            &reads.carried,
            &mut self.kept,
        );
        let read = |evaluation: &Evaluation| {
            let loss = evaluation.values[&loss_id].data[0];
            let stats = StepStats {
                names: Arc::clone(&reads.stat_names),
                values: reads
                    .stat_ids
                    .iter()
                    .map(|id| evaluation.values[id].data[0])
                    .collect(),
            };
            let finite = loss.is_finite()
                && stats
                    .iter()
                    .all(|(name, value)| name != "grad_norm" || value.is_finite());
            (loss, stats, finite)
        };
        let summary = result.as_ref().ok().map(read);
        let finite = summary.as_ref().is_some_and(|s| s.2);
        // A failed or non-finite step is not applied: the state is the one
        // it started from, which the backend may keep (then it comes back
        // here).
        let mut lost = None;
        if !finite && let Some(kept) = self.kept.take() {
            // (A step that failed before it began leaves the kept state
            // it would have started from as it was.)
            let computed = result.is_err() && kept.computed;
            match backend.fetch_kept(&kept, computed) {
                Ok(started) => {
                    leaves.extend(started);
                    self.synced = true;
                }
                Err(error) => lost = Some(error),
            }
        }
        if let Some(error) = lost {
            self.state = restore(leaves, added, displaced);
            let failure = match &result {
                Err(failure) => format!("the step failed ({failure}) and "),
                Ok(_) => "the step diverged and ".into(),
            };
            return Err(TrainError::Run(BackendError::internal(
                "the training session",
                format!("{failure}the state the backend kept is lost: {error}"),
            )));
        }
        // A non-finite step is run again in full on the reference
        // interpreter (same leaves, same context), node by node as the
        // source wrote them, to find the first non-finite value: fused or
        // reordered kernels would blame a later op (as JAX's `debug_nans`
        // re-runs de-optimized).
        let diagnosis = match &result {
            Ok(_) if !finite => Some(interp::evaluate(graph, &leaves, context)),
            _ => None,
        };
        self.state = restore(leaves, added, displaced);
        let mut evaluation = result.map_err(TrainError::Run)?;
        let graph = &self.step_graph;
        let (loss, stats, finite) = summary.unwrap_or_else(|| read(&evaluation));
        if !finite {
            let full = match diagnosis {
                Some(Ok(full)) => full,
                _ => evaluation,
            };
            let grad_norm = stats
                .iter()
                .find_map(|(name, value)| (name == "grad_norm").then_some(value));
            return Err(TrainError::NonFinite(monitor::first_non_finite(
                graph, &full, t, loss, grad_norm,
            )));
        }
        let correct = reads
            .cross_entropy
            .and_then(|ce| correct(graph, ce, &evaluation));
        if self.kept.is_some() {
            // The backend keeps the new state; `sync` fetches it.
            self.synced = false;
        } else {
            // The new state is moved out of the evaluation, not copied, and
            // replaces the old one only once every value is there.
            let mut updates = Vec::new();
            for carried in &reads.carried {
                let value = evaluation.values.remove(&carried.update).ok_or_else(|| {
                    TrainError::Run(BackendError::internal(
                        "the training session",
                        format!("no value for update `{}`", carried.name),
                    ))
                })?;
                updates.push((carried.name.clone(), value));
            }
            self.state.extend(updates);
            self.synced = true;
        }
        self.steps_done = t;
        backend.recycle(evaluation);
        Ok(StepResult {
            loss,
            correct,
            rows,
            lr,
            stats,
        })
    }

    /// Loss and accuracy of the eval graph over some rows, in batches.
    pub fn evaluate(
        &mut self,
        backend: &mut dyn Backend,
        data: &data::Dataset,
        rows: &[usize],
    ) -> Result<Metrics, TrainError> {
        self.sync(backend)?;
        // The batch joins the state for each call and leaves it after, so
        // that the params are never copied (as in `step`).
        let mut leaves = std::mem::take(&mut self.state);
        let result = self.evaluate_chunks(backend, data, rows, &mut leaves);
        self.state = leaves;
        result
    }

    fn evaluate_chunks(
        &self,
        backend: &mut dyn Backend,
        data: &data::Dataset,
        rows: &[usize],
        leaves: &mut BTreeMap<String, Tensor>,
    ) -> Result<Metrics, TrainError> {
        let ce = cross_entropy_node(&self.eval_graph);
        let mut total_loss = 0.0;
        let mut total_correct = 0;
        let mut any_correct = false;
        let batch_size = (self.config.batch as usize).max(1);
        for chunk in rows.chunks(batch_size) {
            let batch = data::batch(data, chunk, &self.eval_graph);
            let mut displaced = Vec::new();
            let names: Vec<String> = batch.iter().map(|(name, _)| name.clone()).collect();
            for (name, tensor) in batch {
                if let Some(old) = leaves.insert(name.clone(), tensor) {
                    displaced.push((name, old));
                }
            }
            let result = self.evaluate_chunk(backend, chunk.len(), ce, leaves);
            for name in &names {
                leaves.remove(name);
            }
            leaves.extend(displaced);
            let (loss, correct) = result?;
            total_loss += loss;
            if let Some(c) = correct {
                total_correct += c;
                any_correct = true;
            }
        }
        let n = rows.len().max(1) as f64;
        Ok(Metrics {
            loss: total_loss / n,
            accuracy: any_correct.then_some(total_correct as f64 / n),
            rows: rows.len(),
        })
    }

    /// One chunk's summed loss and correct count.
    fn evaluate_chunk(
        &self,
        backend: &mut dyn Backend,
        rows: usize,
        ce: Option<NodeId>,
        leaves: &BTreeMap<String, Tensor>,
    ) -> Result<(f64, Option<usize>), TrainError> {
        let context = Context {
            seed: self.config.seed,
            step: 0,
        };
        // Only the loss and the accuracy's logits and labels are read.
        let graph = &self.eval_graph;
        let mut wanted: Vec<NodeId> = graph.loss().into_iter().collect();
        wanted.extend(ce.map_or_else(Vec::new, |n| graph.operands(n)));
        let evaluation = backend
            .run_wanted(graph, leaves, context, &wanted)
            .map_err(TrainError::Run)?;
        let loss = graph
            .loss()
            .map_or(0.0, |loss| evaluation.values[&loss].data[0] * rows as f64);
        let correct = ce.and_then(|ce| correct(graph, ce, &evaluation));
        Ok((loss, correct))
    }
}

/// The state back out of a step's leaves: without the names the step
/// added, with the values it displaced.
fn restore(
    mut leaves: BTreeMap<String, Tensor>,
    added: Vec<String>,
    displaced: Vec<(String, Tensor)>,
) -> BTreeMap<String, Tensor> {
    for name in added {
        leaves.remove(&name);
    }
    leaves.extend(displaced);
    leaves
}

/// A declared shape with every dimension fixed (params, buffers, state).
/// The bytes the state of a step graph takes (params, buffers and
/// optimizer state, stored as `f64`).
pub(crate) fn state_bytes(graph: &Graph) -> u64 {
    graph
        .ids()
        .into_iter()
        .filter(|&id| matches!(graph.node(id).op, Op::Param(_) | Op::Buffer(_) | Op::State))
        .map(|id| node_bytes(graph, id, 1))
        .fold(0, u64::saturating_add)
}

/// The bytes every value of a step graph takes at once with `batch` for
/// its symbolic dimensions (stored as `f64`): an upper bound of what a
/// step holds (the reference interpreter keeps every value; the JIT
/// reuses buffers and stores `f32` in four bytes).
pub(crate) fn step_bytes(graph: &Graph, batch: u64) -> u64 {
    graph
        .ids()
        .into_iter()
        .map(|id| node_bytes(graph, id, batch))
        .fold(0, u64::saturating_add)
}

fn node_bytes(graph: &Graph, id: NodeId, batch: u64) -> u64 {
    graph.node(id).shape().count_with(batch).saturating_mul(8)
}

/// The memory available to this process: Linux's `MemAvailable` (what
/// can be allocated without swapping), or none where it is not known.
pub(crate) fn available_memory() -> Option<u64> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = info.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    kib.checked_mul(1024)
}

/// A byte count for messages (`1.9 GiB`).
pub(crate) fn bytes_text(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["bytes", "KiB", "MiB", "GiB", "TiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} bytes")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

/// Parses a memory size: a number of bytes with an optional unit `K`, `M`,
/// `G` or `T` (powers of 1024; `KiB`, `MB` and the like are read the same).
pub fn parse_bytes(text: &str) -> Result<u64, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let number: f64 = number
        .parse()
        .map_err(|_| format!("`{text}` is not a size such as 8G or 512M"))?;
    let shift = match unit
        .trim()
        .to_ascii_uppercase()
        .trim_end_matches(['B', 'I'])
    {
        "" => 0,
        "K" => 10,
        "M" => 20,
        "G" => 30,
        "T" => 40,
        _ => return Err(format!("`{text}` is not a size such as 8G or 512M")),
    };
    let bytes = number * (1u64 << shift) as f64;
    if !(bytes.is_finite() && bytes >= 1.0 && bytes < u64::MAX as f64) {
        return Err(format!("`{text}` is not a size such as 8G or 512M"));
    }
    Ok(bytes as u64)
}

fn fixed_shape(shape: &crate::ir::Shape) -> Vec<usize> {
    shape
        .0
        .iter()
        .map(|d| match d {
            Dim::Fixed(n) => *n as usize,
            Dim::Sym(_) => 1,
        })
        .collect()
}

/// The first `cross_entropy` node, if the loss uses one.
pub(crate) fn cross_entropy_node(graph: &Graph) -> Option<NodeId> {
    graph
        .ids()
        .into_iter()
        .find(|&id| graph.node(id).op == Op::CrossEntropy)
}

/// How many rows' largest logit is their label.
fn correct(graph: &Graph, node: NodeId, evaluation: &Evaluation) -> Option<usize> {
    let operands = graph.operands(node);
    let logits = &evaluation.values[&operands[0]];
    let labels = &evaluation.values[&operands[1]];
    let classes = *logits.shape.get(1)?;
    let rows = logits.shape[0];
    Some(
        (0..rows)
            .filter(|&r| {
                let row = &logits.data[r * classes..(r + 1) * classes];
                let best = row
                    .iter()
                    .enumerate()
                    .fold((0, f64::NEG_INFINITY), |(bi, bv), (i, &v)| {
                        if v > bv { (i, v) } else { (bi, bv) }
                    })
                    .0;
                best as f64 == labels.data[r]
            })
            .count(),
    )
}

#[cfg(test)]
mod backend_error_tests {
    use super::BackendError;
    use crate::interp::InterpError;

    #[test]
    fn interpreter_errors_keep_their_kind() {
        let data = InterpError::Runtime("label 12 at position 3 is out of range 0..10".into());
        assert_eq!(
            BackendError::from(data.clone()),
            BackendError::Run(data.clone())
        );
        let bug = BackendError::from(InterpError::Internal("no buffer".into()));
        assert_eq!(bug, BackendError::internal("the interpreter", "no buffer"));
        assert_eq!(
            bug.to_string(),
            "internal error in the interpreter (a compiler bug): no buffer"
        );
        assert_eq!(
            BackendError::Run(data).to_string(),
            "label 12 at position 3 is out of range 0..10"
        );
    }
}
