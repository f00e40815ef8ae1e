//! The commands that run graphs: `grad` (one forward and backward pass on
//! given tensors), `gradcheck` (gradients against finite differences) and
//! `explain` (the gradient ledger).

use std::collections::BTreeMap;
use std::path::Path;

use super::{ExitStatus, FloatType, compile, print_out};
use crate::autodiff;
use crate::driver::Compilation;
use crate::gradcheck::{self, Options};
use crate::interp::{self, Context, Tensor};
use crate::ir::{Graph, Mode, Op, Role};
use crate::ledger;
use crate::lower::train::{LabelColumn, Optimizer, TrainConfig};
use crate::lower::{LowerOptions, LoweredModel};
use crate::tensor_file;
use crate::train::run::{self, RunOptions};
use crate::train::{Backend, TrainError};

/// Compiles and picks the model; prints why not and returns the status.
fn compiled(file: &Path, dtype: Option<FloatType>) -> Result<Compilation, ExitStatus> {
    let options: LowerOptions = FloatType::options(dtype);
    let compilation = compile(file, options).ok_or(ExitStatus::Error)?;
    if compilation.has_errors() {
        return Err(ExitStatus::Failure);
    }
    Ok(compilation)
}

fn pick<'c>(
    compilation: &'c Compilation,
    model: Option<&str>,
) -> Result<&'c LoweredModel, ExitStatus> {
    compilation.model(model).map_err(|message| {
        eprintln!("error: {message}");
        ExitStatus::Error
    })
}

/// `gradc grad`.
pub fn grad(args: &super::GradArgs) -> ExitStatus {
    run_grad(args).unwrap_or_else(|status| status)
}

fn run_grad(args: &super::GradArgs) -> Result<ExitStatus, ExitStatus> {
    let super::GradArgs {
        file,
        tensors,
        out,
        model,
        mode,
        dtype,
        seed,
        backend,
    } = args;
    let (model, mode, seed) = (model.as_deref(), Mode::from(*mode), *seed);
    crate::files::refuse_overlaps(
        &[("the model source", file), ("--tensors", tensors)],
        &[("--out", out)],
    )
    .map_err(|message| {
        eprintln!("error: {message}");
        ExitStatus::Error
    })?;
    let compilation = compiled(file, Some(*dtype))?;
    let lowered = pick(&compilation, model)?;
    let forward = lowered.graph(mode);
    let joint = autodiff::differentiate(forward).map_err(|e| {
        eprintln!("error: {e}");
        ExitStatus::Error
    })?;
    let given = tensor_file::read(tensors).map_err(|e| {
        eprintln!("error: {e}");
        ExitStatus::Error
    })?;
    let leaves = leaves_for(forward, &given)?;
    let context = Context { seed, step: 0 };
    let evaluation = match backend {
        super::BackendArg::Jit => crate::jit::Jit::new().run(&joint, &leaves, context),
        super::BackendArg::Interp => interp::evaluate(&joint, &leaves, context).map_err(Into::into),
    }
    .map_err(|e| {
        eprintln!("error: {e}");
        ExitStatus::Error
    })?;
    let mut result: BTreeMap<String, Tensor> = BTreeMap::new();
    let loss = joint.loss();
    if let Some(loss) = loss {
        result.insert("loss".into(), evaluation.values[&loss].clone());
    }
    for (name, id) in joint.outputs() {
        result.insert(name, evaluation.values[&id].clone());
    }
    for id in autodiff::wanted(forward) {
        let node = forward.node(id);
        let name = node.name.clone().unwrap_or_default();
        let gradient = joint
            .with_role(&Role::Gradient(name.clone()))
            .first()
            .map(|g| evaluation.values[g].clone());
        let value = match gradient {
            Some(value) => value,
            None => {
                if loss.is_some() {
                    eprintln!(
                        "warning: no gradient reaches `{name}` (line {}); grad.{name} is all zeros (see `gradc explain`)",
                        node.origin.line
                    );
                }
                Tensor::zeros(node.dtype(), &evaluation.values[&id].shape)
            }
        };
        result.insert(format!("grad.{name}"), value);
    }
    tensor_file::write(out, &result).map_err(|e| {
        eprintln!("error: {e}");
        ExitStatus::Error
    })?;
    let loss_text = result
        .get("loss")
        .map_or("no loss".to_string(), |l| format!("loss {}", l.data[0]));
    println!(
        "{}: {loss_text}; wrote {} tensors to {}",
        lowered.name,
        result.len(),
        out.display()
    );
    Ok(ExitStatus::Success)
}

/// The leaf tensors a graph needs, from what the file gave: every input,
/// param and buffer by name, converted to the model's float width. A
/// missing tensor or a wrong element kind is an error naming it; extra
/// tensors get a warning. Shapes are checked when the graph is evaluated.
fn leaves_for(
    graph: &Graph,
    given: &BTreeMap<String, Tensor>,
) -> Result<BTreeMap<String, Tensor>, ExitStatus> {
    let mut leaves = BTreeMap::new();
    let mut missing = Vec::new();
    for id in graph.ids() {
        let node = graph.node(id);
        if !matches!(node.op, Op::Input | Op::Param(_) | Op::Buffer(_)) {
            continue;
        }
        let name = node.name.clone().unwrap_or_default();
        match given.get(&name) {
            None => missing.push(format!("`{name}` ({})", node.ty)),
            Some(tensor) if tensor.dtype.is_float() != node.dtype().is_float() => {
                eprintln!(
                    "error: tensor `{name}` is {}{:?} but the model declares {}",
                    tensor.dtype, tensor.shape, node.ty
                );
                return Err(ExitStatus::Error);
            }
            Some(tensor) => {
                leaves.insert(name, tensor.cast(node.dtype()));
            }
        }
    }
    if !missing.is_empty() {
        eprintln!("error: the tensors file has no {}", missing.join(", no "));
        return Err(ExitStatus::Error);
    }
    for name in given.keys() {
        if !leaves.contains_key(name) {
            eprintln!(
                "warning: ignoring tensor `{name}`: the model has no input, param or buffer of that name"
            );
        }
    }
    Ok(leaves)
}

/// `gradc gradcheck`.
pub fn gradcheck(
    file: &Path,
    model: Option<&str>,
    mode: Mode,
    dtype: FloatType,
    seed: u64,
    batch: usize,
) -> ExitStatus {
    // Finite differences always run on the model compiled in f64; the
    // gradients checked are those of the chosen type.
    let (compilation, reference) = match (
        compiled(file, Some(dtype)),
        compiled(file, Some(FloatType::F64)),
    ) {
        (Ok(compilation), Ok(reference)) => (compilation, reference),
        (Err(status), _) | (_, Err(status)) => return status,
    };
    let (lowered, reference) = match (pick(&compilation, model), pick(&reference, model)) {
        (Ok(lowered), Ok(reference)) => (lowered, reference),
        (Err(status), _) | (_, Err(status)) => return status,
    };
    let tolerance = match dtype {
        FloatType::F64 => 1e-6,
        FloatType::F32 => 1e-4,
    };
    let step = 1e-4;
    let options = Options {
        seed,
        dim_size: batch.max(1),
        max_elements: 64,
        step,
    };
    let reports =
        match gradcheck::gradcheck_against(lowered.graph(mode), reference.graph(mode), options) {
            Ok(reports) => reports,
            Err(error) => {
                eprintln!("error: {error}");
                return ExitStatus::Error;
            }
        };
    let mut out = format!(
        "gradcheck of `{}` ({mode} mode, {}, seed {seed}, symbolic dimensions = {}): tolerance {tolerance:e}\n",
        lowered.name,
        match dtype {
            FloatType::F32 => "f32",
            FloatType::F64 => "f64",
        },
        options.dim_size
    );
    let width = reports.iter().map(|r| r.name.len()).max().unwrap_or(0);
    let mut failed = 0;
    for report in &reports {
        let ok = report.relative_error <= tolerance;
        failed += usize::from(!ok);
        out.push_str(&format!(
            "  {:<width$} {:>4} elements  worst relative error {:.2e}  {}\n",
            report.name,
            report.checked,
            report.relative_error,
            if ok { "ok" } else { "FAILED" }
        ));
    }
    if reports.is_empty() {
        out.push_str("  no trainable param or retained value to check\n");
    }
    out.push_str(&format!(
        "{} passed, {failed} failed\n",
        reports.len() - failed
    ));
    let printed = print_out(&out);
    if failed > 0 {
        ExitStatus::Failure
    } else {
        printed
    }
}

/// `gradc explain`.
pub fn explain(file: &Path, model: Option<&str>) -> ExitStatus {
    let compilation = match compiled(file, None) {
        Ok(compilation) => compilation,
        Err(status) => return status,
    };
    let lowered = match pick(&compilation, model) {
        Ok(lowered) => lowered,
        Err(status) => return status,
    };
    let batch = lowered.train_config.as_ref().map_or(32, |c| c.batch);
    match ledger::ledger(lowered.graph(Mode::Train), batch) {
        Ok(ledger) => print_out(&ledger::render(&ledger)),
        Err(error) => {
            eprintln!("error: {error}");
            ExitStatus::Error
        }
    }
}

/// The train configuration with the command line's overrides, each
/// checked by the train block's rules.
fn configure(lowered: &LoweredModel, args: &super::TrainArgs) -> Result<TrainConfig, ExitStatus> {
    let mut config = lowered.train_config.clone().unwrap_or_default();
    let mut overrides: Vec<(String, String)> = Vec::new();
    let mut entry = |flag: &str, text: String| overrides.push((flag.to_string(), text));
    if let Some(optimizer) = &args.optimizer {
        entry("--optimizer", format!("optimizer {optimizer}"));
    }
    if let Some(schedule) = &args.schedule {
        entry("--schedule", format!("schedule {schedule}"));
    }
    if let Some(norm) = args.clip_grad_norm {
        entry("--clip-grad-norm", format!("clip_grad_norm {norm:?}"));
    }
    if let Some(value) = args.clip_grad_value {
        entry("--clip-grad-value", format!("clip_grad_value {value:?}"));
    }
    if let Some(epochs) = args.epochs {
        entry("--epochs", format!("epochs {epochs}"));
    }
    if let Some(batch) = args.batch {
        entry("--batch", format!("batch {batch}"));
    }
    if let Some(seed) = args.seed {
        entry("--seed", format!("seed {seed}"));
    }
    crate::lower::train::apply_overrides(&mut config, &overrides).map_err(|message| {
        eprint!("{}", message.trim_end_matches('\n'));
        eprintln!();
        ExitStatus::Error
    })?;
    if let Some(lr) = args.lr {
        if !(lr > 0.0 && lr.is_finite()) {
            eprintln!("error: --lr must be a positive number, not {lr}");
            return Err(ExitStatus::Error);
        }
        match &mut config.optimizer {
            Optimizer::Sgd { lr: base, .. } | Optimizer::Adam { lr: base, .. } => *base = lr,
        }
    }
    if let Some(test) = args.test
        && !(0.0..1.0).contains(&test)
    {
        eprintln!("error: --test is the held-out fraction, in [0, 1), not {test}");
        return Err(ExitStatus::Error);
    }
    Ok(config)
}

/// `gradc train`.
pub fn train(args: &super::TrainArgs) -> ExitStatus {
    let compilation = match compiled(&args.file, args.dtype) {
        Ok(compilation) => compilation,
        Err(status) => return status,
    };
    let lowered = match pick(&compilation, args.model.as_deref()) {
        Ok(lowered) => lowered,
        Err(status) => return status,
    };
    let config = match configure(lowered, args) {
        Ok(config) => config,
        Err(status) => return status,
    };
    let options = RunOptions {
        model_file: Some(args.file.clone()),
        base_dir: args
            .file
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_default(),
        data: args.data.clone(),
        labels: args.labels.clone(),
        label: args.label.map(|l| match l {
            super::LabelArg::First => LabelColumn::First,
            super::LabelArg::Last => LabelColumn::Last,
        }),
        test: args.test,
        freeze: args.freeze.clone(),
        init: args.init.clone(),
        resume: args.resume.clone(),
        save: args.save.clone(),
        metrics: args.metrics.clone(),
        plot: args.plot.clone(),
        watch: args.watch,
        max_memory: args.max_memory,
        verbose: true,
        backend: args.backend.maker(),
    };
    match run::train(lowered, config, &options) {
        Ok((_, summary)) if summary.interrupted => ExitStatus::Failure,
        Ok(_) => ExitStatus::Success,
        Err(error) => {
            eprintln!("error: {error}");
            match error {
                TrainError::Data(_) | TrainError::NonFinite(_) => ExitStatus::Failure,
                _ => ExitStatus::Error,
            }
        }
    }
}

/// `gradc eval`.
pub fn eval(
    file: &Path,
    checkpoint: &Path,
    data: Option<std::path::PathBuf>,
    labels: Option<std::path::PathBuf>,
    model: Option<&str>,
    backend: super::BackendArg,
) -> ExitStatus {
    let compilation = match compiled(file, None) {
        Ok(compilation) => compilation,
        Err(status) => return status,
    };
    let lowered = match pick(&compilation, model) {
        Ok(lowered) => lowered,
        Err(status) => return status,
    };
    let options = RunOptions {
        model_file: Some(file.to_path_buf()),
        base_dir: file.parent().map(Path::to_path_buf).unwrap_or_default(),
        data,
        labels,
        backend: backend.maker(),
        ..RunOptions::default()
    };
    let config = lowered.train_config.clone().unwrap_or_default();
    match run::evaluate(lowered, config, &options, checkpoint) {
        Ok(metrics) => {
            let accuracy = metrics
                .accuracy
                .map_or(String::new(), |a| format!(", accuracy {:.2}%", a * 100.0));
            print_out(&format!(
                "{}: {} rows, loss {:.4}{accuracy}\n",
                lowered.name, metrics.rows, metrics.loss
            ))
        }
        Err(error) => {
            eprintln!("error: {error}");
            match error {
                TrainError::Data(_) => ExitStatus::Failure,
                _ => ExitStatus::Error,
            }
        }
    }
}

/// `gradc snapshot`.
pub fn snapshot(
    files: &[std::path::PathBuf],
    dir: &Path,
    check: bool,
    positions: bool,
) -> ExitStatus {
    let mut changed = 0;
    let mut written = 0;
    for file in files {
        let compilation = match compiled(file, None) {
            Ok(compilation) => compilation,
            Err(status) => return status,
        };
        for model in &compilation.models {
            let stages = match crate::snapshot::stages(model, positions) {
                Ok(stages) => stages,
                Err(error) => {
                    eprintln!("error: {error}");
                    return ExitStatus::Error;
                }
            };
            for (name, text) in stages {
                let inputs: Vec<(&str, &Path)> = files
                    .iter()
                    .map(|f| ("the model source", f.as_path()))
                    .collect();
                if let Err(message) =
                    crate::files::refuse_overlaps(&inputs, &[("a snapshot", &dir.join(&name))])
                {
                    eprintln!("error: {message}");
                    return ExitStatus::Error;
                }
                if check {
                    match crate::snapshot::check(dir, &name, &text) {
                        crate::snapshot::Check::Same => {}
                        crate::snapshot::Check::Missing(path) => {
                            changed += 1;
                            println!(
                                "missing: {} (run without --check to write it)",
                                path.display()
                            );
                        }
                        crate::snapshot::Check::Changed(_, diff) => {
                            changed += 1;
                            print!("{diff}");
                        }
                    }
                    continue;
                }
                if let Err(error) = std::fs::create_dir_all(dir)
                    .and_then(|()| crate::files::write(&dir.join(&name), text.as_bytes()))
                {
                    eprintln!("error: cannot write {}: {error}", dir.join(&name).display());
                    return ExitStatus::Error;
                }
                written += 1;
            }
        }
    }
    if check {
        if changed > 0 {
            eprintln!(
                "{changed} snapshot file{} changed",
                if changed == 1 { "" } else { "s" }
            );
            return ExitStatus::Failure;
        }
        println!("snapshots in {} are up to date", dir.display());
    } else {
        println!("wrote {written} snapshot files to {}", dir.display());
    }
    ExitStatus::Success
}
