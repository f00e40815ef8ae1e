//! `gradc train` and `gradc eval`: the loop around [`Session::step`] with
//! data, epochs, metrics, checkpoints, the monitor and Ctrl-C.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use super::data::{self, Dataset, Source};
use super::monitor::{self, Monitor};
use super::plot::{self, EpochRow};
use super::{Backend, Metrics, Session, TrainError, checkpoint};
use crate::lower::LoweredModel;
use crate::lower::train::{LabelColumn, TrainConfig};

/// Everything `gradc train` takes beyond the train block.
#[derive(Clone, Debug)]
pub struct RunOptions {
    /// The `.grad` file, so that no output overwrites it.
    pub model_file: Option<PathBuf>,
    /// The directory train-block paths are relative to (the `.grad` file's).
    pub base_dir: PathBuf,
    /// `--data`: replaces the train block's data (relative to the current
    /// directory).
    pub data: Option<PathBuf>,
    /// `--labels`: the labels file of `--data FEATURES.npy`.
    pub labels: Option<PathBuf>,
    /// `--label`: where a CSV's label column is.
    pub label: Option<LabelColumn>,
    /// `--test`: the held-out fraction.
    pub test: Option<f64>,
    /// `--freeze`: params to freeze.
    pub freeze: Vec<String>,
    /// `--init`: pretrained params and buffers.
    pub init: Option<PathBuf>,
    /// `--resume`: a checkpoint to continue from.
    pub resume: Option<PathBuf>,
    /// `--save`: where to write the final (or interrupted) checkpoint.
    pub save: Option<PathBuf>,
    /// `--metrics`: a CSV with one row per epoch.
    pub metrics: Option<PathBuf>,
    /// `--plot`: an SVG of the curves.
    pub plot: Option<PathBuf>,
    /// `--watch`: print the per-param table each epoch.
    pub watch: bool,
    /// Print progress and per-epoch lines (the library can run quietly).
    pub verbose: bool,
    /// `--max-memory`: the most bytes a run may need; by default the
    /// memory available (`super::available_memory`).
    pub max_memory: Option<u64>,
    /// Makes the backend the step and eval graphs run on (`--backend`):
    /// the runtime only knows the `Backend` trait, its caller chooses.
    /// `RunOptions::default()` chooses the JIT (that `impl` lives in
    /// `jit`, which depends on the runtime, not the reverse).
    pub backend: fn() -> Box<dyn Backend>,
}

impl RunOptions {
    /// The backend these options ask for.
    fn backend(&self) -> Box<dyn Backend> {
        (self.backend)()
    }
}

/// How a run ended.
#[derive(Clone, Debug, PartialEq)]
pub struct Summary {
    /// Epochs completed.
    pub epochs: usize,
    /// Steps taken.
    pub steps: u64,
    /// The last epoch's numbers.
    pub last: Option<EpochRow>,
    /// Whether Ctrl-C stopped it.
    pub interrupted: bool,
}

/// The data source of a configuration and options.
pub fn source(config: &TrainConfig, options: &RunOptions) -> Source {
    let label = options
        .label
        .or(config.data.as_ref().map(|d| d.label))
        .unwrap_or(LabelColumn::Last);
    if let Some(path) = &options.data {
        return Source::from_path(path.clone(), label, options.labels.clone());
    }
    match &config.data {
        None => Source::EmbeddedDigits,
        Some(spec) => Source::from_path(
            options.base_dir.join(&spec.path),
            label,
            options
                .labels
                .clone()
                .or_else(|| spec.labels.as_ref().map(|l| options.base_dir.join(l))),
        ),
    }
}

/// The fraction of rows held out: `--test`, the data entry's, or 0.2.
fn test_fraction(config: &TrainConfig, options: &RunOptions) -> f64 {
    options
        .test
        .or(config.data.as_ref().map(|d| d.test))
        .unwrap_or(0.2)
}

/// Refuses a run whose `--save`, `--metrics` or `--plot` is one of its
/// inputs (the model source, the data, `--init`, `--resume`) or another of
/// its outputs.
fn refuse_overlaps(options: &RunOptions, source: &Source) -> Result<(), TrainError> {
    let mut inputs: Vec<(&str, &Path)> = Vec::new();
    inputs.extend(
        options
            .model_file
            .as_deref()
            .map(|p| ("the model source", p)),
    );
    inputs.extend(source.paths());
    inputs.extend(options.init.as_deref().map(|p| ("--init", p)));
    inputs.extend(options.resume.as_deref().map(|p| ("--resume", p)));
    let mut outputs: Vec<(&str, &Path)> = Vec::new();
    outputs.extend(options.save.as_deref().map(|p| ("--save", p)));
    outputs.extend(options.metrics.as_deref().map(|p| ("--metrics", p)));
    outputs.extend(options.plot.as_deref().map(|p| ("--plot", p)));
    crate::files::refuse_overlaps(&inputs, &outputs).map_err(TrainError::Setup)
}

fn interrupted_flag() -> Arc<AtomicBool> {
    static FLAG: std::sync::OnceLock<Arc<AtomicBool>> = std::sync::OnceLock::new();
    FLAG.get_or_init(|| {
        let flag = Arc::new(AtomicBool::new(false));
        let handler_flag = flag.clone();
        // Without a handler (another one is installed) Ctrl-C just ends the
        // process, which leaves no half-written file either.
        let _ = ctrlc::set_handler(move || handler_flag.store(true, Ordering::SeqCst));
        flag
    })
    .clone()
}

/// The most steps a run may take: the step counter is saved as an `I32`.
pub(crate) const MAX_STEPS: u64 = i32::MAX as u64;

/// Trains a model. Prints per-epoch lines when `options.verbose`.
pub fn train(
    model: &LoweredModel,
    config: TrainConfig,
    options: &RunOptions,
) -> Result<(Session, Summary), TrainError> {
    let mut backend = options.backend();
    let backend = backend.as_mut();
    let limit = options.max_memory.or_else(super::available_memory);
    let mut session = Session::with_memory_limit(model, config, &options.freeze, limit)?;
    let source = source(&session.config, options);
    refuse_overlaps(options, &source)?;
    let dataset = data::load(&source, &session.forward).map_err(TrainError::Data)?;
    let split = data::split(
        dataset.rows,
        test_fraction(&session.config, options),
        session.config.seed,
    );
    let batch = (session.config.batch as usize).max(1);
    session.steps_per_epoch = split.train.len().div_ceil(batch).max(1) as u64;
    let total_steps = session
        .config
        .epochs
        .checked_mul(session.steps_per_epoch)
        .filter(|&total| total <= MAX_STEPS);
    if total_steps.is_none() {
        return Err(TrainError::Setup(format!(
            "{} epochs of {} steps is more than {MAX_STEPS} steps; choose fewer epochs",
            session.config.epochs, session.steps_per_epoch
        )));
    }
    let needed = super::step_bytes(&session.step_graph, batch as u64);
    if let Some(limit) = limit
        && needed > limit
    {
        return Err(TrainError::Setup(format!(
            "a training step of `{}` with batch {batch} may need up to {} but only {} is available; use a smaller batch (--batch) or model, or raise the limit with --max-memory",
            model.name,
            super::bytes_text(needed),
            super::bytes_text(limit)
        )));
    }
    if session.trainable().is_empty() {
        eprintln!(
            "warning: every param of `{}` is frozen: training will change no param (only buffers such as running statistics)",
            model.name
        );
    }
    if let Some(path) = &options.init {
        let loaded = checkpoint::load_init(&mut session, path)?;
        if options.verbose {
            println!(
                "loaded {} from {}",
                loaded.loaded.join(", "),
                path.display()
            );
            if !loaded.initialized.is_empty() {
                println!(
                    "not in {}, so starting from their initializers: {}",
                    path.display(),
                    loaded.initialized.join(", ")
                );
            }
        }
    }
    if let Some(path) = &options.resume {
        let resumed = checkpoint::resume(&mut session, path)?;
        if let Some(before) = resumed.epochs
            && before != session.config.epochs
            && session.config.schedule.depends_on_length()
        {
            eprintln!(
                "warning: {} was saved by a run of {before} epochs and this one has {}: the {} schedule follows the run's length, so the learning rate from here on differs from the interrupted run's",
                path.display(),
                session.config.epochs,
                session.config.schedule.name()
            );
        }
        if options.verbose {
            println!(
                "resuming at epoch {}, batch {} (step {}) from {}",
                session.epoch + 1,
                session.batch_index,
                session.steps_done,
                path.display()
            );
        }
    }
    let interrupted = interrupted_flag();
    interrupted.store(false, Ordering::SeqCst);
    let lines = monitor::lines(&session.forward);
    let ranks = monitor::ranks(&session.forward);
    let mut monitor = Monitor::default();
    let mut rows: Vec<EpochRow> = Vec::new();
    // The monitor's means of each epoch, for the dashboard.
    let mut epoch_stats = Vec::new();
    let epochs = session.config.epochs as usize;
    let started = Instant::now();
    while session.epoch < epochs {
        let epoch = session.epoch;
        let epoch_start = Instant::now();
        let order = data::epoch_order(&split.train, session.config.seed, epoch);
        let batches: Vec<&[usize]> = order.chunks(batch).collect();
        let progress = progress_bar(options.verbose, batches.len() as u64, epoch, epochs);
        let (mut loss_sum, mut correct, mut seen, mut any_correct) = (0.0, 0usize, 0usize, false);
        let mut lr = 0.0;
        while session.batch_index < batches.len() {
            let rows_of_batch = batches[session.batch_index];
            let tensors = data::batch(&dataset, rows_of_batch, &session.forward);
            let result = match session.step(backend, tensors) {
                Ok(result) => result,
                Err(error) => {
                    progress.finish_and_clear();
                    if let TrainError::NonFinite(_) = &error {
                        // The step was not applied: the session still holds
                        // the last good state.
                        let path = options.save.clone().unwrap_or_else(|| {
                            PathBuf::from(format!("{}.last-good.safetensors", model.name))
                        });
                        session.sync(backend)?;
                        checkpoint::save(&session, &path)?;
                        eprintln!("kept the last good state in {}", path.display());
                    }
                    return Err(error);
                }
            };
            session.batch_index += 1;
            loss_sum += result.loss * result.rows as f64;
            seen += result.rows;
            if let Some(c) = result.correct {
                correct += c;
                any_correct = true;
            }
            lr = result.lr;
            monitor.record(&result.stats);
            progress.set_message(format!("loss {:.4}", loss_sum / seen.max(1) as f64));
            progress.inc(1);
            // (After an epoch's last batch the epoch is finished first, so
            // that a resumed run starts with the next one.)
            if interrupted.load(Ordering::SeqCst) && session.batch_index < batches.len() {
                progress.finish_and_clear();
                return stop_interrupted(model, options, session, backend, &rows, epoch);
            }
        }
        progress.finish_and_clear();
        let grad_norm = monitor.mean("grad_norm").unwrap_or(0.0);
        epoch_stats.push(monitor.means());
        let table = monitor.table();
        let warnings = monitor.end_epoch(epoch, &lines, &ranks, lr);
        let test = if split.test.is_empty() {
            None
        } else {
            Some(session.evaluate(backend, &dataset, &split.test)?)
        };
        let row = EpochRow {
            epoch: epoch + 1,
            train_loss: loss_sum / seen.max(1) as f64,
            train_accuracy: any_correct.then_some(correct as f64 / seen.max(1) as f64),
            test_loss: test.map(|t| t.loss),
            test_accuracy: test.and_then(|t| t.accuracy),
            lr,
            grad_norm,
            seconds: epoch_start.elapsed().as_secs_f64(),
        };
        rows.push(row);
        session.epoch += 1;
        session.batch_index = 0;
        if options.verbose {
            println!("{}", epoch_line(&row, epochs));
            if options.watch {
                print!("{table}");
            }
            for warning in &warnings {
                println!("{warning}");
            }
        }
        if let Some(path) = &options.metrics {
            write_metrics(path, &rows)?;
        }
        if interrupted.load(Ordering::SeqCst) && session.epoch < epochs {
            let done = session.epoch;
            return stop_interrupted(model, options, session, backend, &rows, done);
        }
    }
    if let Some(path) = &options.plot {
        let title = format!("{} ({} epochs)", model.name, rows.len());
        let layers: Vec<String> = ranks
            .iter()
            .filter(|&(_, &rank)| rank >= 2)
            .map(|(name, _)| name.clone())
            .collect();
        let svg = plot::svg(&title, &rows, &epoch_stats, &layers)
            .map_err(|e| TrainError::Checkpoint(format!("cannot draw {}: {e}", path.display())))?;
        crate::files::write(path, svg.as_bytes())
            .map_err(|e| TrainError::Checkpoint(format!("cannot write {}: {e}", path.display())))?;
    }
    // (The backend goes away with this function.)
    session.release(backend)?;
    if let Some(path) = &options.save {
        checkpoint::save(&session, path)?;
    }
    if options.verbose {
        let last = rows.last();
        let test = match last.and_then(|r| r.test_loss) {
            Some(loss) => format!(
                "; test loss {loss:.4}{}",
                last.and_then(|r| r.test_accuracy)
                    .map_or(String::new(), |a| format!(", accuracy {:.2}%", a * 100.0))
            ),
            None => String::new(),
        };
        println!(
            "trained `{}` for {} epochs ({} steps) in {:.2} s{test}",
            model.name,
            rows.len(),
            session.steps_done,
            started.elapsed().as_secs_f64()
        );
        if let Some(path) = &options.save {
            println!(
                "saved params, buffers and optimizer state to {}",
                path.display()
            );
        }
    }
    let summary = Summary {
        epochs: rows.len(),
        steps: session.steps_done,
        last: rows.last().copied(),
        interrupted: false,
    };
    Ok((session, summary))
}

/// Saves the state after Ctrl-C or SIGTERM and says how to continue.
fn stop_interrupted(
    model: &LoweredModel,
    options: &RunOptions,
    mut session: Session,
    backend: &mut dyn Backend,
    rows: &[EpochRow],
    epochs_done: usize,
) -> Result<(Session, Summary), TrainError> {
    let path = options
        .save
        .clone()
        .unwrap_or_else(|| PathBuf::from(format!("{}.interrupted.safetensors", model.name)));
    session.release(backend)?;
    checkpoint::save(&session, &path)?;
    if options.verbose {
        println!(
            "interrupted at epoch {}, batch {}: saved to {} (continue with --resume {})",
            session.epoch + 1,
            session.batch_index,
            path.display(),
            path.display()
        );
    }
    Ok((
        session,
        Summary {
            epochs: epochs_done,
            steps: 0,
            last: rows.last().copied(),
            interrupted: true,
        },
    ))
}

fn progress_bar(verbose: bool, len: u64, epoch: usize, epochs: usize) -> indicatif::ProgressBar {
    if !verbose {
        return indicatif::ProgressBar::hidden();
    }
    let bar = indicatif::ProgressBar::new(len);
    let style =
        indicatif::ProgressStyle::with_template("epoch {prefix} [{bar:30}] {pos}/{len} {msg}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
            .progress_chars("=> ");
    bar.set_style(style);
    bar.set_prefix(format!("{}/{epochs}", epoch + 1));
    bar
}

fn percent(value: Option<f64>) -> String {
    value.map_or(String::new(), |a| format!(" acc {:5.2}%", a * 100.0))
}

fn epoch_line(row: &EpochRow, epochs: usize) -> String {
    let (lr, grad_norm, seconds) = (row.lr, row.grad_norm, row.seconds);
    let test = match row.test_loss {
        Some(loss) => format!("  test loss {loss:.4}{}", percent(row.test_accuracy)),
        None => String::new(),
    };
    format!(
        "epoch {:>3}/{epochs}  train loss {:.4}{}{test}  lr {lr:.2e}  grad norm {grad_norm:.3}  {seconds:.2}s",
        row.epoch,
        row.train_loss,
        percent(row.train_accuracy)
    )
}

fn write_metrics(path: &Path, rows: &[EpochRow]) -> Result<(), TrainError> {
    let mut csv = String::from(
        "epoch,train_loss,train_accuracy,test_loss,test_accuracy,lr,grad_norm,seconds\n",
    );
    let cell = |v: Option<f64>| v.map_or(String::new(), |v| format!("{v}"));
    for row in rows {
        csv.push_str(&format!(
            "{},{},{},{},{},{},{},{:.4}\n",
            row.epoch,
            row.train_loss,
            cell(row.train_accuracy),
            cell(row.test_loss),
            cell(row.test_accuracy),
            row.lr,
            row.grad_norm,
            row.seconds
        ));
    }
    crate::files::write(path, csv.as_bytes())
        .map_err(|e| TrainError::Checkpoint(format!("cannot write {}: {e}", path.display())))
}

/// `gradc eval`: the eval graph with a checkpoint's params and buffers, on
/// the held-out rows of the train block's data (or every row of `--data`).
pub fn evaluate(
    model: &LoweredModel,
    config: TrainConfig,
    options: &RunOptions,
    checkpoint_path: &Path,
) -> Result<Metrics, TrainError> {
    let limit = options.max_memory.or_else(super::available_memory);
    let mut session = Session::with_memory_limit(model, config, &[], limit)?;
    checkpoint::load_for_eval(&mut session, checkpoint_path)?;
    let dataset: Dataset = data::load(&source(&session.config, options), &session.eval_graph)
        .map_err(TrainError::Data)?;
    let rows: Vec<usize> = if options.data.is_some() {
        (0..dataset.rows).collect()
    } else {
        let test = test_fraction(&session.config, options);
        let split = data::split(dataset.rows, test, session.config.seed);
        if split.test.is_empty() {
            split.train
        } else {
            split.test
        }
    };
    session.evaluate(options.backend().as_mut(), &dataset, &rows)
}
