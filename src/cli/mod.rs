//! The command-line interface: argument parsing with `clap` and one
//! function per subcommand. Each returns an [`ExitStatus`]; `main` maps it
//! to the process exit code (0 success, 1 the input has errors, 2 usage or
//! I/O errors). Output to stdout is the command's result; diagnostics and
//! messages go to stderr.

use std::io::Write;
use std::path::{Path, PathBuf};

use clap::{Parser, Subcommand, ValueEnum};

mod commands;

use crate::driver::{self, Compilation};
use crate::ir::{DType, Mode, dot, text};
use crate::lower::LowerOptions;

/// How a command ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExitStatus {
    /// Done, exit 0.
    Success,
    /// The input has errors, exit 1.
    Failure,
    /// Usage or I/O error, exit 2.
    Error,
}

impl ExitStatus {
    /// The process exit code.
    pub fn code(self) -> i32 {
        match self {
            ExitStatus::Success => 0,
            ExitStatus::Failure => 1,
            ExitStatus::Error => 2,
        }
    }
}

/// gradc: a static computation-graph compiler for training neural models.
#[derive(Debug, Parser)]
#[command(name = "gradc", version, about, long_about = None)]
pub struct Cli {
    /// The command to run.
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Check a model file: parse, resolve, type and shape-check every model
    #[command(
        after_help = "Examples:\n  gradc check examples/digits_mlp.grad\n  gradc check model.grad --dtype f64\n\nExit status: 0 when the file is valid, 1 when it has errors, 2 for usage or I/O errors."
    )]
    Check {
        /// The `.grad` file.
        file: PathBuf,
        /// Compile every float value in this element type.
        #[arg(long, value_enum)]
        dtype: Option<FloatType>,
    },
    /// Print a model's graph as canonical text or Graphviz DOT
    #[command(
        after_help = "Examples:\n  gradc graph examples/digits_mlp.grad\n  gradc graph examples/bn_dropout.grad --mode eval\n  gradc graph examples/residual.grad --format dot | dot -Tsvg > residual.svg"
    )]
    Graph {
        /// The `.grad` file.
        file: PathBuf,
        /// The model to print (needed when the file has several).
        #[arg(long)]
        model: Option<String>,
        /// Train mode (dropout active, batch statistics) or eval mode.
        #[arg(long, value_enum, default_value_t = ModeArg::Train)]
        mode: ModeArg,
        /// Output format.
        #[arg(long, value_enum, default_value_t = Format::Text)]
        format: Format,
        /// Which stage of the pipeline to print.
        #[arg(long, value_enum, default_value_t = Stage::Forward)]
        stage: Stage,
        /// With `--stage optimized`: print the graph after each run of this
        /// pass (fold, simplify, cse, transpose, dce).
        #[arg(long, value_name = "PASS")]
        dump_after: Option<String>,
        /// Print what differs between the train and eval graphs instead.
        #[arg(long)]
        diff_modes: bool,
        /// Compile every float value in this element type.
        #[arg(long, value_enum)]
        dtype: Option<FloatType>,
    },
    /// Run one forward and backward pass on given tensors
    #[command(
        after_help = "Examples:\n  gradc grad examples/digits_mlp.grad --tensors in.safetensors --out grads.safetensors\n  gradc grad model.grad --tensors in.safetensors --out out.safetensors --dtype f64 --mode eval\n\nIN holds every input, param and buffer by its declared name (F32 or F64 floats, I32 or I64 labels).\nOUT gets `loss`, every output by name, `grad.<param>` for every trainable param and\n`grad.<name>` for every retained value; it is written atomically."
    )]
    Grad(GradArgs),
    /// Check every gradient against finite differences on random inputs
    #[command(
        after_help = "Examples:\n  gradc gradcheck examples/digits_mlp.grad\n  gradc gradcheck examples/bn_dropout.grad --mode eval --seed 3\n\nPrints the worst relative error of every param and retained gradient; exits 1 when one\nexceeds the tolerance (1e-6 in f64, 1e-4 in f32, where the finite differences still run in f64)."
    )]
    Gradcheck {
        /// The `.grad` file.
        file: PathBuf,
        /// The model (needed when the file has several).
        #[arg(long)]
        model: Option<String>,
        /// Train or eval mode.
        #[arg(long, value_enum, default_value_t = ModeArg::Train)]
        mode: ModeArg,
        /// Element type of every float value.
        #[arg(long, value_enum, default_value_t = FloatType::F64)]
        dtype: FloatType,
        /// Seed of the random inputs, params and dropout masks.
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Size given to every symbolic dimension.
        #[arg(long, default_value_t = 4)]
        batch: usize,
    },
    /// Write (or check) the text of every stage of every model, for review
    #[command(
        after_help = "Examples:\n  gradc snapshot examples/*.grad --dir snapshots\n  gradc snapshot examples/*.grad --dir snapshots --check\n\nOne file per model and stage: forward and backward (train, eval), step, optimized and kernels\n(train, eval). With --check nothing is written: a unified diff is printed for every change and\nthe exit status is 1 if anything changed."
    )]
    Snapshot {
        /// The `.grad` files.
        #[arg(required = true)]
        files: Vec<PathBuf>,
        /// Where the snapshot files live.
        #[arg(long, default_value = "gradc-snapshots")]
        dir: PathBuf,
        /// Compare instead of writing.
        #[arg(long)]
        check: bool,
        /// Keep source positions (`@12:18`) in the text; without them (the
        /// default) an edit that does not change a graph, such as a comment
        /// line above a model, changes no snapshot.
        #[arg(long)]
        positions: bool,
    },
    /// Train a model (the train block's settings, overridable by flags)
    #[command(
        after_help = "Examples:\n  gradc train examples/digits_mlp.grad\n  gradc train examples/digits_mlp.grad --epochs 5 --lr 0.01 --save digits.safetensors --metrics digits.csv --plot digits.svg\n  gradc train examples/frozen_features.grad --init digits.safetensors --freeze w1,b1 --lr 1e-3\n  gradc train examples/digits_mlp.grad --resume digits.safetensors --epochs 30\n\nWithout a `data` entry or --data, the model trains on the embedded digits data set.\nCtrl-C saves a checkpoint (to --save, or MODEL.interrupted.safetensors) and exits."
    )]
    Train(Box<TrainArgs>),
    /// Evaluate a checkpoint with the eval graph (dropout off, running statistics)
    #[command(
        after_help = "Examples:\n  gradc eval examples/digits_mlp.grad --checkpoint digits.safetensors\n  gradc eval examples/digits_mlp.grad --checkpoint digits.safetensors --data other.csv"
    )]
    Eval {
        /// The `.grad` file.
        file: PathBuf,
        /// Params and buffers to evaluate, from `gradc train --save`.
        #[arg(long)]
        checkpoint: PathBuf,
        /// Evaluate on every row of this file instead of the held-out rows.
        #[arg(long)]
        data: Option<PathBuf>,
        /// A `.npy` labels file for `--data FEATURES.npy`.
        #[arg(long, value_name = "LABELS.npy")]
        labels: Option<PathBuf>,
        /// The model (needed when the file has several).
        #[arg(long)]
        model: Option<String>,
        /// Run the eval graph on the JIT, or on the reference interpreter.
        #[arg(long, value_enum, default_value_t = BackendArg::Jit)]
        backend: BackendArg,
    },
    /// Explain which params get gradients, before anything runs
    #[command(
        after_help = "Examples:\n  gradc explain examples/frozen_features.grad\n  gradc explain tests/data/gradient_control.grad\n\nFor every param: trainable or frozen, whether a gradient reaches it from the loss and\nwhy not, and its grad_fn chain; what the frozen subgraphs save; what writes buffers."
    )]
    Explain {
        /// The `.grad` file.
        file: PathBuf,
        /// The model (needed when the file has several).
        #[arg(long)]
        model: Option<String>,
    },
}

/// `gradc grad`'s arguments.
#[derive(Debug, clap::Args)]
pub struct GradArgs {
    /// The `.grad` file.
    pub file: PathBuf,
    /// A safetensors file with every input, param and buffer by name.
    #[arg(long, value_name = "IN.safetensors")]
    pub tensors: PathBuf,
    /// Where to write the loss, outputs and gradients.
    #[arg(long, value_name = "OUT.safetensors")]
    pub out: PathBuf,
    /// The model (needed when the file has several).
    #[arg(long)]
    pub model: Option<String>,
    /// Train mode (dropout active, batch statistics) or eval mode.
    #[arg(long, value_enum, default_value_t = ModeArg::Train)]
    pub mode: ModeArg,
    /// Element type of every float value.
    #[arg(long, value_enum, default_value_t = FloatType::F32)]
    pub dtype: FloatType,
    /// Seed of the dropout masks.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Run the joint forward-and-backward graph on the JIT, or on the
    /// reference interpreter (the executable semantics).
    #[arg(long, value_enum, default_value_t = BackendArg::Jit)]
    pub backend: BackendArg,
}

/// `gradc train`'s flags.
#[derive(Debug, clap::Args)]
pub struct TrainArgs {
    /// The `.grad` file.
    pub file: PathBuf,
    /// The model (needed when the file has several).
    #[arg(long)]
    pub model: Option<String>,
    /// Number of epochs.
    #[arg(long)]
    pub epochs: Option<u64>,
    /// Batch size.
    #[arg(long)]
    pub batch: Option<u64>,
    /// Base learning rate.
    #[arg(long)]
    pub lr: Option<f64>,
    /// Optimizer, as in the train block: `sgd`, `adam`, `adamw` (their
    /// defaults) or a call such as `sgd(lr = 0.1, momentum = 0.9)`.
    #[arg(long, value_name = "OPTIMIZER")]
    pub optimizer: Option<String>,
    /// Learning-rate schedule, as in the train block: `constant`,
    /// `step(every = 5, gamma = 0.5)`, `cosine(warmup = 50)`,
    /// `linear_warmup(steps = 100)`.
    #[arg(long, value_name = "SCHEDULE")]
    pub schedule: Option<String>,
    /// Clip the global gradient norm to at most this.
    #[arg(long, value_name = "NORM", conflicts_with = "clip_grad_value")]
    pub clip_grad_norm: Option<f64>,
    /// Clamp every gradient element into [-VALUE, VALUE].
    #[arg(long, value_name = "VALUE")]
    pub clip_grad_value: Option<f64>,
    /// The fraction of rows held out for evaluation, in [0, 1).
    #[arg(long, value_name = "FRACTION")]
    pub test: Option<f64>,
    /// Where a CSV file's label column is (when its header does not name
    /// the inputs).
    #[arg(long, value_enum)]
    pub label: Option<LabelArg>,
    /// A `.npy` labels file for `--data FEATURES.npy`.
    #[arg(long, value_name = "LABELS.npy")]
    pub labels: Option<PathBuf>,
    /// Seed of initialization, the split, shuffling and dropout.
    #[arg(long)]
    pub seed: Option<u64>,
    /// Data file (CSV, .npy features or .safetensors) instead of the train block's.
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// Params to freeze, comma-separated.
    #[arg(long, value_delimiter = ',')]
    pub freeze: Vec<String>,
    /// Start from the params and buffers of a checkpoint (fine-tuning).
    #[arg(long, value_name = "CKPT")]
    pub init: Option<PathBuf>,
    /// Continue an interrupted run from its checkpoint.
    #[arg(long, value_name = "CKPT")]
    pub resume: Option<PathBuf>,
    /// Write params, buffers, optimizer state and counters here at the end.
    #[arg(long, value_name = "CKPT")]
    pub save: Option<PathBuf>,
    /// Write one CSV row per epoch.
    #[arg(long, value_name = "FILE.csv")]
    pub metrics: Option<PathBuf>,
    /// Draw the loss and accuracy curves.
    #[arg(long, value_name = "FILE.svg")]
    pub plot: Option<PathBuf>,
    /// Print a per-param gradient table each epoch.
    #[arg(long)]
    pub watch: bool,
    /// The most memory the run may need (such as 8G or 512M); by default
    /// what the machine has available. A model that needs more is refused
    /// before anything is allocated.
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    pub max_memory: Option<u64>,
    /// Element type of every float value.
    #[arg(long, value_enum)]
    pub dtype: Option<FloatType>,
    /// Run steps on the JIT (elementwise kernels compiled by Cranelift,
    /// matrix products on a tuned GEMM; agrees with the interpreter to
    /// rounding), or on the reference interpreter.
    #[arg(long, value_enum, default_value_t = BackendArg::Jit)]
    pub backend: BackendArg,
}

fn parse_size(text: &str) -> Result<u64, String> {
    crate::train::parse_bytes(text)
}

/// `--label`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum LabelArg {
    /// The first column.
    First,
    /// The last column.
    Last,
}

/// `--backend`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum BackendArg {
    /// The reference interpreter.
    Interp,
    /// JIT-compiled elementwise kernels, GEMM matrix products, the
    /// interpreter for the rest.
    Jit,
}

impl BackendArg {
    /// What makes the backend (`RunOptions::backend`).
    pub fn maker(self) -> fn() -> Box<dyn crate::train::Backend> {
        match self {
            BackendArg::Interp => || Box::new(crate::train::Interpreter),
            BackendArg::Jit => || Box::new(crate::jit::Jit::new()),
        }
    }
}

/// `--mode`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum ModeArg {
    /// Training graph.
    Train,
    /// Inference graph.
    Eval,
}

/// `--format`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Format {
    /// Canonical text IR.
    Text,
    /// Graphviz DOT.
    Dot,
}

/// `--stage`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Stage {
    /// The forward graph as lowered from the source.
    Forward,
    /// The joint forward and backward graph, with `grad_fn` names.
    Backward,
    /// The whole training step: forward, backward, clipping, optimizer
    /// updates, running statistics and monitor statistics (train mode).
    Step,
    /// The step graph (train) or eval graph after the optimization passes.
    Optimized,
    /// The kernel plan of the optimized graph, with its memory plan.
    Kernels,
    /// The Cranelift IR of the kernels the JIT compiles (those of the
    /// optimized step graph in train mode, of the eval graph in eval mode).
    Clif,
}

/// `--dtype`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum FloatType {
    /// 32-bit floats.
    F32,
    /// 64-bit floats.
    F64,
}

impl FloatType {
    pub(crate) fn options(dtype: Option<FloatType>) -> LowerOptions {
        LowerOptions {
            float_dtype: dtype.map(|d| match d {
                FloatType::F32 => DType::F32,
                FloatType::F64 => DType::F64,
            }),
        }
    }
}

/// Runs a parsed command line.
pub fn run(cli: Cli) -> ExitStatus {
    match cli.command {
        Command::Check { file, dtype } => check(&file, FloatType::options(dtype)),
        Command::Graph {
            file,
            model,
            mode,
            format,
            stage,
            dump_after,
            diff_modes,
            dtype,
        } => {
            let request = GraphRequest {
                model: model.as_deref(),
                mode,
                format,
                stage,
                dump_after: dump_after.as_deref(),
                diff_modes,
            };
            graph(&file, &request, FloatType::options(dtype))
        }
        Command::Snapshot {
            files,
            dir,
            check,
            positions,
        } => commands::snapshot(&files, &dir, check, positions),
        Command::Grad(args) => commands::grad(&args),
        Command::Gradcheck {
            file,
            model,
            mode,
            dtype,
            seed,
            batch,
        } => commands::gradcheck(&file, model.as_deref(), mode.into(), dtype, seed, batch),
        Command::Explain { file, model } => commands::explain(&file, model.as_deref()),
        Command::Train(args) => commands::train(&args),
        Command::Eval {
            file,
            checkpoint,
            data,
            labels,
            model,
            backend,
        } => commands::eval(&file, &checkpoint, data, labels, model.as_deref(), backend),
    }
}

impl From<ModeArg> for Mode {
    fn from(mode: ModeArg) -> Mode {
        match mode {
            ModeArg::Train => Mode::Train,
            ModeArg::Eval => Mode::Eval,
        }
    }
}

/// Compiles a file and prints its diagnostics to stderr; `None` on an I/O
/// error (already reported).
pub(crate) fn compile(file: &Path, options: LowerOptions) -> Option<Compilation> {
    match driver::compile_file(file, options) {
        Ok(compilation) => {
            if !compilation.diagnostics.is_empty() {
                eprint!("{}", compilation.render_diagnostics());
            }
            Some(compilation)
        }
        Err(error) => {
            eprintln!("error: cannot read {}: {error}", file.display());
            None
        }
    }
}

fn check(file: &Path, options: LowerOptions) -> ExitStatus {
    let Some(compilation) = compile(file, options) else {
        return ExitStatus::Error;
    };
    let errors = compilation
        .diagnostics
        .iter()
        .filter(|d| d.is_error())
        .count();
    if errors > 0 {
        eprintln!(
            "error: {} has {errors} error{}",
            file.display(),
            if errors == 1 { "" } else { "s" }
        );
        return ExitStatus::Failure;
    }
    let models: Vec<String> = compilation.models.iter().map(driver::summary).collect();
    let count = compilation.models.len();
    println!(
        "ok: {}: {count} model{}{}{}",
        file.display(),
        if count == 1 { "" } else { "s" },
        if count == 0 { "" } else { "; " },
        models.join("; ")
    );
    ExitStatus::Success
}

/// What `gradc graph` was asked for.
struct GraphRequest<'a> {
    model: Option<&'a str>,
    mode: ModeArg,
    format: Format,
    stage: Stage,
    dump_after: Option<&'a str>,
    diff_modes: bool,
}

fn graph(file: &Path, request: &GraphRequest<'_>, options: LowerOptions) -> ExitStatus {
    let Some(compilation) = compile(file, options) else {
        return ExitStatus::Error;
    };
    if compilation.has_errors() {
        return ExitStatus::Failure;
    }
    let lowered = match compilation.model(request.model) {
        Ok(lowered) => lowered,
        Err(message) => {
            eprintln!("error: {message}");
            return ExitStatus::Error;
        }
    };
    if request.diff_modes {
        return print_out(&crate::snapshot::diff_modes(lowered));
    }
    let mode: Mode = request.mode.into();
    if let Some(pass) = request.dump_after {
        if !crate::passes::names().contains(&pass) {
            eprintln!(
                "error: no pass `{pass}`; passes, in order: {}",
                crate::passes::names().join(", ")
            );
            return ExitStatus::Error;
        }
        let Ok(mut start) = crate::snapshot::stage_graph(lowered, "step", mode)
            .or_else(|_| Ok::<_, ()>(lowered.graph(mode).clone()))
        else {
            return ExitStatus::Error;
        };
        if mode == Mode::Eval || lowered.train.loss().is_none() {
            start = lowered.graph(mode).clone();
        }
        let mut out = String::new();
        let mut round = 0;
        crate::passes::optimize(&mut start, |name, graph| {
            if name == pass {
                round += 1;
                out.push_str(&format!("# after {name} (run {round})\n"));
                out.push_str(&match request.format {
                    Format::Text => text::to_text(graph),
                    Format::Dot => dot::to_dot(graph),
                });
            }
        });
        if round == 0 {
            out.push_str(&format!("# pass `{pass}` changed nothing\n"));
        }
        return print_out(&out);
    }
    let stage = match request.stage {
        Stage::Forward => "forward",
        Stage::Backward => "backward",
        Stage::Step => "step",
        Stage::Optimized => "optimized",
        Stage::Kernels => "kernels",
        Stage::Clif => "clif",
    };
    if stage == "clif" {
        let graph = match (mode, lowered.train.loss()) {
            (Mode::Train, Some(_)) => crate::snapshot::stage_graph(lowered, "step", mode),
            _ => Ok(lowered.graph(mode).clone()),
        };
        return match graph
            .map_err(|e| e.to_string())
            .and_then(|g| crate::jit::Jit::new().clif(&g).map_err(|e| e.to_string()))
        {
            Ok(text) => print_out(&text),
            Err(error) => {
                eprintln!("error: {error}");
                ExitStatus::Error
            }
        };
    }
    if stage == "step" && lowered.train.loss().is_none() {
        eprintln!(
            "error: model `{}` has no `loss`, so it has no training step",
            lowered.name
        );
        return ExitStatus::Error;
    }
    if stage == "kernels" {
        return match crate::snapshot::kernels(lowered, mode) {
            Ok(text) => print_out(&text),
            Err(error) => {
                eprintln!("error: {error}");
                ExitStatus::Error
            }
        };
    }
    match crate::snapshot::stage_graph(lowered, stage, mode) {
        Ok(graph) => print_out(&match request.format {
            Format::Text => text::to_text(&graph),
            Format::Dot => dot::to_dot(&graph),
        }),
        Err(error) => {
            eprintln!("error: {error}");
            ExitStatus::Error
        }
    }
}

/// Writes to stdout; a closed pipe is not an error worth a panic.
pub(crate) fn print_out(text: &str) -> ExitStatus {
    let mut stdout = std::io::stdout().lock();
    match stdout
        .write_all(text.as_bytes())
        .and_then(|()| stdout.flush())
    {
        Ok(()) => ExitStatus::Success,
        Err(error) if error.kind() == std::io::ErrorKind::BrokenPipe => ExitStatus::Success,
        Err(error) => {
            eprintln!("error: cannot write output: {error}");
            ExitStatus::Error
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn backend_of(args: &[&str]) -> BackendArg {
        match Cli::try_parse_from(args).expect("valid arguments").command {
            Command::Train(train) => train.backend,
            Command::Grad(grad) => grad.backend,
            Command::Eval { backend, .. } => backend,
            other => panic!("a command without a backend: {other:?}"),
        }
    }

    #[test]
    fn train_eval_and_grad_run_on_the_jit_unless_told_otherwise() {
        let io = ["--tensors", "in.safetensors", "--out", "out.safetensors"];
        for command in [
            vec!["gradc", "train", "m.grad"],
            vec!["gradc", "eval", "m.grad", "--checkpoint", "c.safetensors"],
            [&["gradc", "grad", "m.grad"][..], &io].concat(),
        ] {
            assert_eq!(backend_of(&command), BackendArg::Jit, "{command:?}");
            let interp = [&command[..], &["--backend", "interp"]].concat();
            assert_eq!(backend_of(&interp), BackendArg::Interp, "{command:?}");
        }
    }
}
