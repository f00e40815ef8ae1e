//! The `train` block: grouping its items into entries and checking each.
//!
//! The grammar reads a train block as a flat list of words, values and
//! `key = value` pairs, since newlines do not end entries. An entry starts
//! at a word that names one (`ENTRIES`); the values and pairs after it
//! belong to it. The checked result is a [`TrainConfig`], which training
//! uses later; every entry can be overridden from the command line.

use std::collections::HashMap;

use crate::diagnostic::{Code, Diagnostic, Span, closest};
use crate::syntax::ast::{Arg, Ast, ExprId, ExprKind, Ident, Item, Train, TrainItem, UnaryOp};

/// The entries a train block may hold.
pub(crate) const ENTRIES: &[&str] = &[
    "data",
    "optimizer",
    "schedule",
    "clip_grad_norm",
    "clip_grad_value",
    "batch",
    "epochs",
    "seed",
];

/// Where the label column of a CSV file is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LabelColumn {
    /// The first column.
    First,
    /// The last column (the default).
    Last,
}

/// The `data` entry.
#[derive(Clone, Debug, PartialEq)]
pub struct DataSpec {
    /// The path as written, relative to the `.grad` file.
    pub path: String,
    /// Label column of a CSV file.
    pub label: LabelColumn,
    /// Fraction of rows held out for evaluation.
    pub test: f64,
    /// The labels file of a `.npy` pair (`labels = "y.npy"`).
    pub labels: Option<String>,
}

/// An optimizer with PyTorch's parameters.
#[derive(Clone, Debug, PartialEq)]
pub enum Optimizer {
    /// `torch.optim.SGD`.
    Sgd {
        /// Learning rate.
        lr: f64,
        /// Momentum factor.
        momentum: f64,
        /// Nesterov momentum.
        nesterov: bool,
        /// L2 penalty added to the gradient.
        weight_decay: f64,
    },
    /// `torch.optim.Adam` (`decoupled = false`) or `AdamW` (`true`).
    Adam {
        /// Learning rate.
        lr: f64,
        /// Decay rates of the moment estimates.
        betas: (f64, f64),
        /// Added to the denominator.
        eps: f64,
        /// Weight decay.
        weight_decay: f64,
        /// AdamW's decoupled decay.
        decoupled: bool,
    },
}

/// A learning-rate schedule.
#[derive(Clone, Debug, PartialEq)]
pub enum Schedule {
    /// The base rate throughout.
    Constant,
    /// Multiply by `gamma` every `every` epochs.
    Step {
        /// Epochs between decays.
        every: u64,
        /// Decay factor.
        gamma: f64,
    },
    /// Linear warm-up for `warmup` steps, then cosine decay to zero.
    Cosine {
        /// Warm-up steps.
        warmup: u64,
    },
    /// Linear warm-up for `steps` steps, then constant.
    LinearWarmup {
        /// Warm-up steps.
        steps: u64,
    },
}

impl Schedule {
    /// Whether the rate at a step depends on the run's total length (so
    /// that resuming with other `epochs` changes it).
    pub(crate) fn depends_on_length(&self) -> bool {
        matches!(self, Schedule::Cosine { .. })
    }

    /// The schedule's name in the train block.
    pub fn name(&self) -> &'static str {
        match self {
            Schedule::Constant => "constant",
            Schedule::Step { .. } => "step",
            Schedule::Cosine { .. } => "cosine",
            Schedule::LinearWarmup { .. } => "linear_warmup",
        }
    }
}

/// Gradient clipping.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Clip {
    /// Scale all gradients so their global L2 norm is at most this.
    Norm(f64),
    /// Clamp every gradient element into `[-v, v]`.
    Value(f64),
}

/// A checked train block, with defaults for what it leaves out.
#[derive(Clone, Debug, PartialEq)]
pub struct TrainConfig {
    /// Where the data comes from; `None` means the embedded digits set.
    pub data: Option<DataSpec>,
    /// The optimizer.
    pub optimizer: Optimizer,
    /// The schedule.
    pub schedule: Schedule,
    /// Gradient clipping.
    pub clip: Option<Clip>,
    /// Batch size.
    pub batch: u64,
    /// Number of epochs.
    pub epochs: u64,
    /// Seed of initialization, shuffling and dropout.
    pub seed: u64,
}

impl Default for TrainConfig {
    fn default() -> TrainConfig {
        TrainConfig {
            data: None,
            optimizer: Optimizer::Adam {
                lr: 1e-3,
                betas: (0.9, 0.999),
                eps: 1e-8,
                weight_decay: 0.0,
                decoupled: false,
            },
            schedule: Schedule::Constant,
            clip: None,
            batch: 32,
            epochs: 10,
            seed: 0,
        }
    }
}

/// A compile-time value of a train item.
#[derive(Clone, Debug, PartialEq)]
enum Const {
    Number(f64, bool),
    Str(String),
    Word(String),
    Bool(bool),
    List(Vec<Const>),
    Call(Ident, Vec<Arg>),
}

fn constant(ast: &Ast, id: ExprId) -> Option<Const> {
    let expr = ast.expr(id);
    Some(match &expr.kind {
        ExprKind::Number { value, is_int } => Const::Number(*value, *is_int),
        ExprKind::Unary {
            op: UnaryOp::Neg,
            operand,
        } => match ast.expr(*operand).kind {
            ExprKind::Number { value, is_int } => Const::Number(-value, is_int),
            _ => return None,
        },
        ExprKind::Str(s) => Const::Str(s.clone()),
        ExprKind::Name(n) => Const::Word(n.clone()),
        ExprKind::Bool(b) => Const::Bool(*b),
        ExprKind::List(items) => Const::List(
            items
                .iter()
                .map(|&i| constant(ast, i))
                .collect::<Option<_>>()?,
        ),
        ExprKind::Call { callee, args } => Const::Call(callee.clone(), args.clone()),
        _ => return None,
    })
}

/// One entry: its key, positional values and options.
struct Entry {
    key: Ident,
    values: Vec<(Const, Span)>,
    options: Vec<(Ident, Const, Span)>,
}

/// Checks every train block; returns the configurations by model name.
pub(crate) fn check_train_blocks(
    ast: &Ast,
    models: &HashMap<&str, Span>,
    has_loss: &HashMap<String, bool>,
    diagnostics: &mut Vec<Diagnostic>,
) -> Vec<(String, TrainConfig)> {
    let mut seen: HashMap<String, Span> = HashMap::new();
    let mut configs = Vec::new();
    for item in &ast.items {
        let Item::Train(train) = item else { continue };
        let Some(model) = &train.model else {
            diagnostics.push(
                Diagnostic::error(
                    Code::UnknownModel,
                    train.keyword,
                    "`train` block names no model",
                )
                .with_label("expected a model name after `train`")
                .with_help(match models.keys().min() {
                    Some(name) => format!("write `train {name} {{ ... }}`"),
                    None => "define a `model` and name it here".to_string(),
                }),
            );
            continue;
        };
        if !models.contains_key(model.name.as_str()) {
            let mut diagnostic = Diagnostic::error(
                Code::UnknownModel,
                model.span,
                format!("unknown model `{}`", model.name),
            )
            .with_label("no model of this name in the file");
            if let Some(near) = closest(&model.name, models.keys().copied()) {
                diagnostic = diagnostic.with_help(format!("did you mean `{near}`?"));
            }
            diagnostics.push(diagnostic);
            continue;
        }
        if let Some(first) = seen.insert(model.name.clone(), model.span) {
            diagnostics.push(
                Diagnostic::error(
                    Code::DuplicateTrain,
                    model.span,
                    format!("model `{}` has two `train` blocks", model.name),
                )
                .with_label("second block")
                .with_secondary(first, "first block")
                .with_help("merge them into one"),
            );
            continue;
        }
        if has_loss.get(&model.name) == Some(&false) {
            diagnostics.push(
                Diagnostic::error(
                    Code::TrainWithoutLoss,
                    model.span,
                    format!("model `{}` has no `loss` to train", model.name),
                )
                .with_label("this model is trained here")
                .with_secondary(models[model.name.as_str()], "but it declares no `loss`")
                .with_help("add `loss cross_entropy(logits, y)` (or another scalar) to the model"),
            );
        }
        let before = diagnostics.len();
        let config = check_block(ast, train, diagnostics);
        if diagnostics.len() == before {
            configs.push((model.name.clone(), config));
        }
    }
    configs
}

/// Applies command-line overrides, each a train-block entry as it would
/// be written in the block (`optimizer sgd(lr = 0.1, momentum = 0.9)`,
/// `schedule cosine(warmup = 50)`, `clip_grad_norm 1.0`), checked by the
/// same rules as the block. An error is the rendered diagnostics, naming
/// the flag as the file.
pub(crate) fn apply_overrides(
    config: &mut TrainConfig,
    overrides: &[(String, String)],
) -> Result<(), String> {
    for (flag, entry) in overrides {
        let source = format!("train m {{ {entry} }}");
        let (ast, mut diagnostics) = crate::syntax::parse(&source);
        let train = ast.items.iter().find_map(|item| match item {
            Item::Train(train) => Some(train),
            _ => None,
        });
        let checked = train.map(|train| check_block(&ast, train, &mut diagnostics));
        let errors: Vec<Diagnostic> = diagnostics.into_iter().filter(|d| d.is_error()).collect();
        let (Some(checked), true) = (checked, errors.is_empty()) else {
            let rendered = crate::diagnostic::render(flag, &source, &errors);
            return Err(if rendered.is_empty() {
                format!("{flag}: `{entry}` is not a train-block entry")
            } else {
                rendered
            });
        };
        let key = entry.split_whitespace().next().unwrap_or_default();
        match key {
            "data" => {
                return Err(format!(
                    "{flag}: the data is chosen with --data, --labels, --label and --test"
                ));
            }
            "optimizer" => config.optimizer = checked.optimizer,
            "schedule" => config.schedule = checked.schedule,
            "clip_grad_norm" | "clip_grad_value" => config.clip = checked.clip,
            "batch" => config.batch = checked.batch,
            "epochs" => config.epochs = checked.epochs,
            "seed" => config.seed = checked.seed,
            other => return Err(format!("{flag}: `{other}` is not a train-block entry")),
        }
    }
    Ok(())
}

fn check_block(ast: &Ast, train: &Train, diagnostics: &mut Vec<Diagnostic>) -> TrainConfig {
    let mut entries: Vec<Entry> = Vec::new();
    // After an unknown entry name, its values are skipped rather than
    // reported again.
    let mut skipping = false;
    for item in &train.items {
        if skipping && !matches!(item, TrainItem::Word(w) if ENTRIES.contains(&w.name.as_str())) {
            continue;
        }
        skipping = false;
        let (span, value) = match item {
            TrainItem::Word(word) if ENTRIES.contains(&word.name.as_str()) => {
                entries.push(Entry {
                    key: word.clone(),
                    values: Vec::new(),
                    options: Vec::new(),
                });
                continue;
            }
            TrainItem::Word(word) => (word.span, Some(Const::Word(word.name.clone()))),
            TrainItem::Value(id) => (ast.expr(*id).span, constant(ast, *id)),
            TrainItem::Named(key, id) => {
                let span = key.span.to(ast.expr(*id).span);
                match (entries.last_mut(), constant(ast, *id)) {
                    (Some(entry), Some(value)) => entry.options.push((key.clone(), value, span)),
                    (None, _) => diagnostics.push(unknown_entry(&key.name, key.span)),
                    (Some(_), None) => {
                        diagnostics.push(bad_value(span, "this value must be a constant"))
                    }
                }
                continue;
            }
        };
        match (entries.last_mut(), value) {
            (None, Some(Const::Word(word))) => {
                diagnostics.push(unknown_entry(&word, span));
                skipping = true;
            }
            (None, _) => diagnostics.push(
                Diagnostic::error(
                    Code::UnknownTrainEntry,
                    span,
                    "a value with no entry name before it",
                )
                .with_label("which entry is this for?")
                .with_help(format!("entries are {}", ENTRIES.join(", "))),
            ),
            (Some(entry), Some(value)) => entry.values.push((value, span)),
            (Some(_), None) => diagnostics.push(bad_value(span, "this value must be a constant")),
        }
    }
    let mut config = TrainConfig::default();
    let mut given: HashMap<&str, Span> = HashMap::new();
    for entry in &entries {
        let key = entry.key.name.as_str();
        if let Some(first) = given.insert(key, entry.key.span) {
            diagnostics.push(
                Diagnostic::error(
                    Code::DuplicateTrain,
                    entry.key.span,
                    format!("`{key}` is given twice"),
                )
                .with_label("second time")
                .with_secondary(first, "first time"),
            );
            continue;
        }
        let mut check = EntryCheck { entry, diagnostics };
        match key {
            "data" => config.data = check.data(),
            "optimizer" => {
                if let Some(optimizer) = check.optimizer(ast) {
                    config.optimizer = optimizer;
                }
            }
            "schedule" => {
                if let Some(schedule) = check.schedule(ast) {
                    config.schedule = schedule;
                }
            }
            "clip_grad_norm" => config.clip = check.single_positive().map(Clip::Norm),
            "clip_grad_value" => config.clip = check.single_positive().map(Clip::Value),
            "batch" => config.batch = check.single_count(1).unwrap_or(config.batch),
            "epochs" => config.epochs = check.single_count(1).unwrap_or(config.epochs),
            _ => config.seed = check.single_count(0).unwrap_or(0),
        }
    }
    if let (Some(norm), Some(value)) = (given.get("clip_grad_norm"), given.get("clip_grad_value")) {
        diagnostics.push(
            Diagnostic::error(
                Code::DuplicateTrain,
                *value,
                "`clip_grad_norm` and `clip_grad_value` both given",
            )
            .with_label("second kind of clipping")
            .with_secondary(*norm, "first kind")
            .with_help("choose one"),
        );
    }
    config
}

fn unknown_entry(word: &str, span: Span) -> Diagnostic {
    let mut diagnostic = Diagnostic::error(
        Code::UnknownTrainEntry,
        span,
        format!("unknown train entry `{word}`"),
    )
    .with_label("not an entry of a `train` block");
    diagnostic = match closest(word, ENTRIES.iter().copied()) {
        Some(near) => diagnostic.with_help(format!("did you mean `{near}`?")),
        None => diagnostic.with_help(format!("entries are {}", ENTRIES.join(", "))),
    };
    diagnostic
}

fn bad_value(span: Span, label: impl Into<String>) -> Diagnostic {
    Diagnostic::error(Code::BadTrainValue, span, "invalid value in `train` block").with_label(label)
}

struct EntryCheck<'e, 'd> {
    entry: &'e Entry,
    diagnostics: &'d mut Vec<Diagnostic>,
}

impl EntryCheck<'_, '_> {
    fn key(&self) -> &str {
        &self.entry.key.name
    }

    /// The single positional value; options are rejected.
    fn single(&mut self) -> Option<(Const, Span)> {
        let key = self.key().to_string();
        for (name, _, span) in &self.entry.options {
            self.diagnostics.push(
                Diagnostic::error(
                    Code::BadTrainValue,
                    *span,
                    format!("`{key}` has no option `{}`", name.name),
                )
                .with_label("unknown option"),
            );
        }
        match self.entry.values.as_slice() {
            [one] => Some(one.clone()),
            [] => {
                self.diagnostics.push(
                    Diagnostic::error(
                        Code::BadTrainValue,
                        self.entry.key.span,
                        format!("`{key}` needs a value"),
                    )
                    .with_label("nothing follows"),
                );
                None
            }
            [_, extra, ..] => {
                self.diagnostics.push(
                    Diagnostic::error(
                        Code::BadTrainValue,
                        extra.1,
                        format!("`{key}` takes one value"),
                    )
                    .with_label("extra value")
                    .with_help("is an entry name misspelled?"),
                );
                None
            }
        }
    }

    fn single_positive(&mut self) -> Option<f64> {
        let (value, span) = self.single()?;
        match value {
            Const::Number(v, _) if v > 0.0 => Some(v),
            _ => {
                let key = self.key().to_string();
                self.diagnostics.push(bad_value(
                    span,
                    format!("`{key}` must be a positive number"),
                ));
                None
            }
        }
    }

    fn single_count(&mut self, min: u64) -> Option<u64> {
        let (value, span) = self.single()?;
        match value {
            Const::Number(v, true) if v >= min as f64 && v <= u32::MAX as f64 => Some(v as u64),
            _ => {
                let key = self.key().to_string();
                self.diagnostics.push(bad_value(
                    span,
                    format!("`{key}` must be a whole number from {min} to {}", u32::MAX),
                ));
                None
            }
        }
    }

    fn data(&mut self) -> Option<DataSpec> {
        let path = match self.entry.values.as_slice() {
            [(Const::Str(path), _)] => path.clone(),
            _ => {
                self.diagnostics.push(
                    Diagnostic::error(
                        Code::BadTrainValue,
                        self.entry.key.span,
                        "`data` needs one path string",
                    )
                    .with_label("for example `data \"data/digits.csv\" label = last test = 0.2`"),
                );
                return None;
            }
        };
        let mut spec = DataSpec {
            path,
            label: LabelColumn::Last,
            test: 0.2,
            labels: None,
        };
        for (name, value, span) in &self.entry.options {
            match (name.name.as_str(), value) {
                ("label", Const::Word(w)) if w == "first" => spec.label = LabelColumn::First,
                ("label", Const::Word(w)) if w == "last" => spec.label = LabelColumn::Last,
                ("label", _) => self
                    .diagnostics
                    .push(bad_value(*span, "`label` is `first` or `last`")),
                ("test", Const::Number(v, _)) if (0.0..1.0).contains(v) => spec.test = *v,
                ("labels", Const::Str(path)) => spec.labels = Some(path.clone()),
                ("labels", _) => self.diagnostics.push(bad_value(
                    *span,
                    "`labels` is the path of a `.npy` labels file",
                )),
                ("test", _) => self.diagnostics.push(bad_value(
                    *span,
                    "`test` is the held-out fraction, in [0, 1)",
                )),
                (other, _) => self.diagnostics.push(
                    Diagnostic::error(
                        Code::BadTrainValue,
                        name.span,
                        format!("`data` has no option `{other}`"),
                    )
                    .with_label("unknown option")
                    .with_help("`data` takes `label = first|last` and `test = fraction`"),
                ),
            }
        }
        Some(spec)
    }

    /// The entry's single value as a call or word: `(name, args)`.
    fn call(&mut self) -> Option<(Ident, Vec<Arg>)> {
        let (value, span) = self.single()?;
        match value {
            Const::Call(callee, args) => Some((callee, args)),
            Const::Word(word) => Some((Ident { name: word, span }, Vec::new())),
            _ => {
                let key = self.key().to_string();
                self.diagnostics.push(bad_value(
                    span,
                    format!("`{key}` takes a name such as `adam(lr = 1e-3)`"),
                ));
                None
            }
        }
    }

    /// Binds `name(args)` against `(param, default)` pairs, checking each
    /// number with `valid`.
    fn numbers(
        &mut self,
        ast: &Ast,
        callee: &Ident,
        args: &[Arg],
        params: &[(&str, Const)],
    ) -> Option<HashMap<String, Const>> {
        let mut values: HashMap<String, Const> = params
            .iter()
            .map(|(n, d)| (n.to_string(), d.clone()))
            .collect();
        let mut ok = true;
        for (i, arg) in args.iter().enumerate() {
            let span = ast.expr(arg.value).span;
            let name = match &arg.name {
                Some(name) => name.name.clone(),
                None => match params.get(i) {
                    Some((name, _)) => name.to_string(),
                    None => {
                        self.diagnostics.push(
                            Diagnostic::error(
                                Code::WrongArity,
                                span,
                                format!(
                                    "`{}` takes at most {} arguments",
                                    callee.name,
                                    params.len()
                                ),
                            )
                            .with_label("extra argument"),
                        );
                        ok = false;
                        continue;
                    }
                },
            };
            if !values.contains_key(&name) {
                let names: Vec<&str> = params.iter().map(|p| p.0).collect();
                let mut diagnostic = Diagnostic::error(
                    Code::UnknownArgument,
                    arg.name.as_ref().map_or(span, |n| n.span),
                    format!("`{}` has no parameter `{name}`", callee.name),
                )
                .with_label("unknown argument name");
                diagnostic = match closest(&name, names.iter().copied()) {
                    Some(near) => diagnostic.with_help(format!("did you mean `{near}`?")),
                    None => diagnostic.with_help(format!("parameters are {}", names.join(", "))),
                };
                self.diagnostics.push(diagnostic);
                ok = false;
                continue;
            }
            match constant(ast, arg.value) {
                Some(value) => {
                    values.insert(name, value);
                }
                None => {
                    self.diagnostics.push(bad_value(span, "must be a constant"));
                    ok = false;
                }
            }
        }
        ok.then_some(values)
    }

    fn optimizer(&mut self, ast: &Ast) -> Option<Optimizer> {
        let (callee, args) = self.call()?;
        let params: Vec<(&str, Const)> = match callee.name.as_str() {
            "sgd" => vec![
                ("lr", Const::Number(0.01, false)),
                ("momentum", Const::Number(0.0, false)),
                ("nesterov", Const::Bool(false)),
                ("weight_decay", Const::Number(0.0, false)),
            ],
            "adam" | "adamw" => vec![
                ("lr", Const::Number(1e-3, false)),
                (
                    "betas",
                    Const::List(vec![Const::Number(0.9, false), Const::Number(0.999, false)]),
                ),
                ("eps", Const::Number(1e-8, false)),
                (
                    "weight_decay",
                    Const::Number(if callee.name == "adamw" { 0.01 } else { 0.0 }, false),
                ),
            ],
            other => {
                let mut diagnostic = Diagnostic::error(
                    Code::UnknownOptimizer,
                    callee.span,
                    format!("unknown optimizer `{other}`"),
                )
                .with_label("not an optimizer");
                diagnostic = match closest(other, ["sgd", "adam", "adamw"]) {
                    Some(near) => diagnostic.with_help(format!("did you mean `{near}`?")),
                    None => diagnostic.with_help("optimizers are `sgd`, `adam` and `adamw`"),
                };
                self.diagnostics.push(diagnostic);
                return None;
            }
        };
        let values = self.numbers(ast, &callee, &args, &params)?;
        let span = callee.span;
        let number =
            |this: &mut Self, name: &str, valid: fn(f64) -> bool, rule: &str| -> Option<f64> {
                match values.get(name) {
                    Some(Const::Number(v, _)) if valid(*v) => Some(*v),
                    _ => {
                        this.diagnostics.push(bad_value(
                            span,
                            format!("`{name}` of `{}` must be {rule}", callee.name),
                        ));
                        None
                    }
                }
            };
        let lr = number(
            self,
            "lr",
            |v| v > 0.0 && v.is_finite(),
            "a positive number",
        );
        let weight_decay = number(
            self,
            "weight_decay",
            |v| v >= 0.0 && v.is_finite(),
            "at least 0",
        );
        if callee.name == "sgd" {
            let momentum = number(self, "momentum", |v| (0.0..1.0).contains(&v), "in [0, 1)");
            let nesterov = match values.get("nesterov") {
                Some(Const::Bool(b)) => Some(*b),
                _ => {
                    self.diagnostics
                        .push(bad_value(span, "`nesterov` must be `true` or `false`"));
                    None
                }
            };
            let (lr, momentum, nesterov, weight_decay) = (lr?, momentum?, nesterov?, weight_decay?);
            if nesterov && momentum == 0.0 {
                self.diagnostics.push(
                    bad_value(span, "Nesterov momentum needs `momentum` above 0")
                        .with_help("add `momentum = 0.9`, as PyTorch requires"),
                );
                return None;
            }
            return Some(Optimizer::Sgd {
                lr,
                momentum,
                nesterov,
                weight_decay,
            });
        }
        let eps = number(
            self,
            "eps",
            |v| v > 0.0 && v.is_finite(),
            "a positive number",
        );
        let betas = match values.get("betas") {
            Some(Const::List(items)) => match items.as_slice() {
                [Const::Number(a, _), Const::Number(b, _)]
                    if (0.0..1.0).contains(a) && (0.0..1.0).contains(b) =>
                {
                    Some((*a, *b))
                }
                _ => None,
            },
            _ => None,
        };
        if betas.is_none() {
            self.diagnostics.push(
                bad_value(span, "`betas` must be two numbers in [0, 1)")
                    .with_help("for example `betas = (0.9, 0.999)`"),
            );
        }
        Some(Optimizer::Adam {
            lr: lr?,
            betas: betas?,
            eps: eps?,
            weight_decay: weight_decay?,
            decoupled: callee.name == "adamw",
        })
    }

    fn schedule(&mut self, ast: &Ast) -> Option<Schedule> {
        let (callee, args) = self.call()?;
        let params: Vec<(&str, Const)> = match callee.name.as_str() {
            "constant" => vec![],
            "step" => vec![
                ("every", Const::Number(f64::NAN, true)),
                ("gamma", Const::Number(0.1, false)),
            ],
            "cosine" => vec![("warmup", Const::Number(0.0, true))],
            "linear_warmup" => vec![("steps", Const::Number(f64::NAN, true))],
            other => {
                let mut diagnostic = Diagnostic::error(
                    Code::UnknownSchedule,
                    callee.span,
                    format!("unknown schedule `{other}`"),
                )
                .with_label("not a schedule");
                diagnostic = match closest(other, ["constant", "step", "cosine", "linear_warmup"]) {
                    Some(near) => diagnostic.with_help(format!("did you mean `{near}`?")),
                    None => diagnostic.with_help("schedules are `constant`, `step(every, gamma)`, `cosine(warmup)` and `linear_warmup(steps)`"),
                };
                self.diagnostics.push(diagnostic);
                return None;
            }
        };
        let values = self.numbers(ast, &callee, &args, &params)?;
        let span = callee.span;
        let count = |this: &mut Self, name: &str, min: f64| -> Option<u64> {
            match values.get(name) {
                Some(Const::Number(v, true)) if *v >= min && *v <= u32::MAX as f64 => {
                    Some(*v as u64)
                }
                _ => {
                    this.diagnostics.push(bad_value(
                        span,
                        format!(
                            "`{name}` of `{}` must be a whole number of at least {min}",
                            callee.name
                        ),
                    ));
                    None
                }
            }
        };
        Some(match callee.name.as_str() {
            "constant" => Schedule::Constant,
            "step" => {
                let every = count(self, "every", 1.0);
                let gamma = match values.get("gamma") {
                    Some(Const::Number(g, _)) if *g > 0.0 && *g <= 1.0 => Some(*g),
                    _ => {
                        self.diagnostics
                            .push(bad_value(span, "`gamma` of `step` must be in (0, 1]"));
                        None
                    }
                };
                Schedule::Step {
                    every: every?,
                    gamma: gamma?,
                }
            }
            "cosine" => Schedule::Cosine {
                warmup: count(self, "warmup", 0.0)?,
            },
            _ => Schedule::LinearWarmup {
                steps: count(self, "steps", 1.0)?,
            },
        })
    }
}
