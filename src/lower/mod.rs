//! Lowering: from the AST to one checked [`Graph`] per model and mode.
//!
//! This is the checker. It resolves names (no shadowing, no use before
//! definition), inlines user functions at each call, binds call arguments,
//! types every value with `Op::infer` and turns each rule it breaks into a
//! [`Diagnostic`] pointing at the source (and, inside an inlined function,
//! at the call too). A value whose computation failed becomes
//! `Value::Poison`, which silences follow-on errors. Lowering never stops
//! at the first error and never panics on user input.
//!
//! Recursive walks are bounded: expressions deeper than `MAX_EXPR_DEPTH`
//! and function calls nested deeper than `MAX_CALL_DEPTH` are reported
//! instead of followed. The `train` block is checked by [`train`].

mod builtins;
mod expr;
mod scan;
pub mod train;

use std::collections::{BTreeSet, HashMap};

use crate::diagnostic::{Code, Diagnostic, LineIndex, Span, closest};
use crate::ir::{
    DType, Dim, Graph, Init, Loc, Mode, Node, NodeId, Op, Origin, Role, Shape, Type, verify,
};
use crate::syntax::ast::{Ast, DimExpr, ExprId, ExprKind, Function, Item, Model, Stmt, TypeExpr};
use train::TrainConfig;

/// Deepest expression tree that lowering follows.
pub(crate) const MAX_EXPR_DEPTH: u32 = 256;
/// Deepest chain of inlined function calls.
pub(crate) const MAX_CALL_DEPTH: usize = 32;
/// Most nodes one model's graph may have. Functions that call each other
/// twice per level would otherwise expand exponentially.
pub const MAX_NODES: usize = 1 << 18;
/// Most expressions lowering may visit while inlining one model. Calls whose
/// arguments are numbers or poisoned values build no nodes, so the node
/// limit alone would not stop exponential inlining.
pub(crate) const MAX_WORK: usize = 1 << 20;

/// Options that change how a file lowers.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LowerOptions {
    /// Compile every float value in this type (`f64` for gradient checks).
    pub float_dtype: Option<DType>,
}

/// One model, lowered for both modes.
#[derive(Clone, Debug)]
pub struct LoweredModel {
    /// The model's name.
    pub name: String,
    /// The `model` block.
    pub span: Span,
    /// The train-mode graph.
    pub train: Graph,
    /// The eval-mode graph.
    pub eval: Graph,
    /// Its `train` block, checked.
    pub train_config: Option<TrainConfig>,
}

impl LoweredModel {
    /// The graph of a mode.
    pub fn graph(&self, mode: Mode) -> &Graph {
        match mode {
            Mode::Train => &self.train,
            Mode::Eval => &self.eval,
        }
    }
}

/// Lowers every model of a parsed file. Models with errors are left out;
/// every diagnostic is returned.
pub fn lower(
    ast: &Ast,
    source: &str,
    options: LowerOptions,
) -> (Vec<LoweredModel>, Vec<Diagnostic>) {
    let mut diagnostics = Vec::new();
    let lines = LineIndex::new(source);
    let functions = collect_functions(ast, &mut diagnostics);
    let recursive = find_recursion(ast, &functions, &mut diagnostics);
    let mut models: Vec<LoweredModel> = Vec::new();
    let mut model_spans: HashMap<&str, Span> = HashMap::new();
    let mut losses: HashMap<String, bool> = HashMap::new();
    for item in &ast.items {
        let Item::Model(model) = item else { continue };
        if let Some(first) = model_spans.get(model.name.name.as_str()) {
            diagnostics.push(duplicate(
                &model.name.name,
                "model",
                model.name.span,
                *first,
            ));
            continue;
        }
        model_spans.insert(&model.name.name, model.name.span);
        let before = diagnostics.len();
        let context = Context {
            ast,
            source,
            lines: &lines,
            functions: &functions,
            recursive: &recursive,
            float_dtype: options.float_dtype,
        };
        let train = lower_model(&context, model, Mode::Train, &mut diagnostics);
        losses.insert(model.name.name.clone(), train.loss().is_some());
        if diagnostics[before..].iter().any(Diagnostic::is_error) {
            continue;
        }
        let eval = lower_model(&context, model, Mode::Eval, &mut Vec::new());
        debug_assert_eq!(
            verify::verify(&train),
            Ok(()),
            "lowering built an invalid train graph"
        );
        debug_assert_eq!(
            verify::verify(&eval),
            Ok(()),
            "lowering built an invalid eval graph"
        );
        models.push(LoweredModel {
            name: model.name.name.clone(),
            span: model.span,
            train,
            eval,
            train_config: None,
        });
    }
    let configs = train::check_train_blocks(ast, &model_spans, &losses, &mut diagnostics);
    for (name, config) in configs {
        if let Some(model) = models.iter_mut().find(|m| m.name == name) {
            model.train_config = Some(config);
        }
    }
    diagnostics.sort_by_key(|d| (d.primary.span.start, d.code));
    (models, diagnostics)
}

fn duplicate(name: &str, what: &str, span: Span, first: Span) -> Diagnostic {
    Diagnostic::error(
        Code::DuplicateName,
        span,
        format!("{what} `{name}` is defined twice"),
    )
    .with_label("second definition")
    .with_secondary(first, "first defined here")
    .with_help("names are immutable and cannot be shadowed; pick another name")
}

fn collect_functions<'a>(
    ast: &'a Ast,
    diagnostics: &mut Vec<Diagnostic>,
) -> HashMap<&'a str, &'a Function> {
    let mut functions: HashMap<&str, &Function> = HashMap::new();
    for item in &ast.items {
        let Item::Function(function) = item else {
            continue;
        };
        let name = function.name.name.as_str();
        if builtins::Builtin::from_name(name).is_some() {
            diagnostics.push(
                Diagnostic::error(
                    Code::DuplicateName,
                    function.name.span,
                    format!("function `{name}` shadows the built-in `{name}`"),
                )
                .with_label("a built-in has this name")
                .with_help("pick another name for the function"),
            );
            continue;
        }
        if let Some(first) = functions.get(name) {
            diagnostics.push(duplicate(
                name,
                "function",
                function.name.span,
                first.name.span,
            ));
            continue;
        }
        let mut seen: HashMap<&str, Span> = HashMap::new();
        for param in &function.params {
            if let Some(first) = seen.insert(&param.name, param.span) {
                diagnostics.push(duplicate(&param.name, "parameter", param.span, first));
            }
        }
        functions.insert(name, function);
    }
    functions
}

/// Reports every function that can reach itself through calls; returns
/// their names. Calls are found by span: an expression belongs to the
/// function whose definition encloses it.
fn find_recursion(
    ast: &Ast,
    functions: &HashMap<&str, &Function>,
    diagnostics: &mut Vec<Diagnostic>,
) -> BTreeSet<String> {
    let mut by_start: Vec<&Function> = functions.values().copied().collect();
    by_start.sort_by_key(|f| f.span.start);
    let mut calls: HashMap<&str, Vec<(&str, Span)>> = HashMap::new();
    for expr in &ast.exprs {
        let ExprKind::Call { callee, .. } = &expr.kind else {
            continue;
        };
        if !functions.contains_key(callee.name.as_str()) {
            continue;
        }
        let i = by_start.partition_point(|f| f.span.start <= expr.span.start);
        if let Some(owner) = i.checked_sub(1).map(|i| by_start[i])
            && expr.span.end <= owner.span.end
        {
            calls
                .entry(owner.name.name.as_str())
                .or_default()
                .push((callee.name.as_str(), callee.span));
        }
    }
    let mut recursive = BTreeSet::new();
    for function in &by_start {
        let start = function.name.name.as_str();
        // Depth-first search with an explicit stack: which callee path leads
        // back to `start`?
        let mut stack: Vec<(&str, Vec<&str>)> = vec![(start, vec![start])];
        let mut visited: BTreeSet<&str> = BTreeSet::new();
        let mut cycle: Option<Vec<&str>> = None;
        while let Some((current, path)) = stack.pop() {
            for &(callee, _) in calls.get(current).map(Vec::as_slice).unwrap_or(&[]) {
                if callee == start {
                    cycle = Some(path.clone());
                    break;
                }
                if visited.insert(callee) {
                    let mut next = path.clone();
                    next.push(callee);
                    stack.push((callee, next));
                }
            }
            if cycle.is_some() {
                break;
            }
        }
        if let Some(path) = cycle {
            let first_call = calls[start][0].1;
            let call_span = calls[start]
                .iter()
                .find(|(callee, _)| path.get(1).copied().unwrap_or(start) == *callee)
                .map_or(first_call, |c| c.1);
            let mut chain: Vec<String> = path.iter().map(|f| format!("`{f}`")).collect();
            chain.push(format!("`{start}`"));
            diagnostics.push(
                Diagnostic::error(
                    Code::RecursiveFunction,
                    function.name.span,
                    format!("function `{start}` is recursive"),
                )
                .with_label("this function calls itself")
                .with_secondary(call_span, "the cycle starts with this call")
                .with_note(format!("call chain: {}", chain.join(" -> ")))
                .with_help(
                    "functions are inlined, so they cannot recurse; unroll the recursion by hand",
                ),
            );
            recursive.insert(start.to_string());
        }
    }
    recursive
}

/// What a name is bound to.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) enum Value {
    /// A graph node.
    Node(NodeId),
    /// A number not yet given a dtype (weakly typed, as in JAX): it takes
    /// the dtype of the tensor it meets.
    Scalar(f64),
    /// A value whose computation failed; already reported.
    Poison,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum BindingKind {
    Input,
    Param,
    Buffer,
    Let,
    FunctionParam,
}

#[derive(Clone, Debug)]
struct Binding {
    value: Value,
    span: Span,
    kind: BindingKind,
    used: bool,
}

/// One scope: the model body, or one inlined function call.
#[derive(Default)]
struct Frame {
    bindings: HashMap<String, Binding>,
    /// Every name the scope defines anywhere, for "used before definition".
    defined: HashMap<String, Span>,
    /// Binding order, for deterministic warnings.
    order: Vec<String>,
}

/// What stays fixed while a file lowers.
struct Context<'a> {
    ast: &'a Ast,
    source: &'a str,
    lines: &'a LineIndex,
    functions: &'a HashMap<&'a str, &'a Function>,
    recursive: &'a BTreeSet<String>,
    float_dtype: Option<DType>,
}

/// The state of lowering one model in one mode.
struct Lowering<'a, 'd> {
    cx: &'a Context<'a>,
    mode: Mode,
    graph: Graph,
    frames: Vec<Frame>,
    symbols: BTreeSet<String>,
    /// The default float type for numbers that meet no tensor.
    default_float: DType,
    no_grad: Option<Span>,
    /// Calls being inlined, outermost first: (call span, function name).
    calls: Vec<(Span, String)>,
    depth_reported: bool,
    too_many_nodes: bool,
    /// Expressions visited so far, for [`MAX_WORK`].
    work: usize,
    /// Dropouts lowered so far: the next one's mask key.
    dropouts: u32,
    /// Diagnostics already reported, by code and primary span.
    reported: std::collections::HashSet<(Code, Span)>,
    loss: Option<Span>,
    outputs: HashMap<String, Span>,
    /// Nodes a stable rewrite replaced (the `exp` of `log(exp(x))`),
    /// removed at the end if nothing else uses them.
    superseded: Vec<NodeId>,
    /// Values of element type `bool` (comparisons, and what indexing or
    /// reshaping makes of them): 0/1 masks in the IR, which only `where`
    /// and the ops that move elements accept.
    bools: std::collections::HashSet<NodeId>,
    diagnostics: &'d mut Vec<Diagnostic>,
}

fn lower_model(
    cx: &Context<'_>,
    model: &Model,
    mode: Mode,
    diagnostics: &mut Vec<Diagnostic>,
) -> Graph {
    let mut frame = Frame::default();
    collect_defined(&model.body, &mut frame.defined);
    let mut lowering = Lowering {
        cx,
        mode,
        graph: Graph::new(model.name.name.clone(), mode),
        frames: vec![frame],
        symbols: BTreeSet::new(),
        default_float: cx.float_dtype.unwrap_or(first_float(&model.body)),
        no_grad: None,
        calls: Vec::new(),
        depth_reported: false,
        too_many_nodes: false,
        work: 0,
        dropouts: 0,
        reported: std::collections::HashSet::new(),
        loss: None,
        outputs: HashMap::new(),
        superseded: Vec::new(),
        bools: std::collections::HashSet::new(),
        diagnostics,
    };
    let before = lowering.diagnostics.len();
    lowering.stmts(&model.body, false);
    let clean = !lowering.diagnostics[before..]
        .iter()
        .any(Diagnostic::is_error);
    if mode == Mode::Train && clean {
        lowering.warn_unused();
    }
    lowering.remove_superseded(&[]);
    lowering.graph
}

/// The first float element type declared in a body, else `f32`.
fn first_float(body: &[Stmt]) -> DType {
    for stmt in body {
        let ty = match stmt {
            Stmt::Input { ty, .. } | Stmt::Param { ty, .. } | Stmt::Buffer { ty, .. } => ty,
            Stmt::NoGrad { body, .. } => {
                let inner = first_float(body);
                if inner != DType::F32 {
                    return inner;
                }
                continue;
            }
            _ => continue,
        };
        if let Some(dtype) = DType::from_name(&ty.dtype.name).filter(|d| d.is_float()) {
            return dtype;
        }
    }
    DType::F32
}

fn collect_defined(body: &[Stmt], defined: &mut HashMap<String, Span>) {
    for stmt in body {
        match stmt {
            Stmt::Input { name, .. }
            | Stmt::Param { name, .. }
            | Stmt::Buffer { name, .. }
            | Stmt::Let { name, .. }
            | Stmt::Output {
                name,
                value: Some(_),
            } => {
                defined.entry(name.name.clone()).or_insert(name.span);
            }
            Stmt::LetMany { names, .. } => {
                for name in names {
                    defined.entry(name.name.clone()).or_insert(name.span);
                }
            }
            Stmt::NoGrad { body, .. } => collect_defined(body, defined),
            Stmt::Output { value: None, .. }
            | Stmt::Retain(_)
            | Stmt::Loss { .. }
            | Stmt::Error => {}
        }
    }
}

impl<'a> Lowering<'a, '_> {
    fn ast(&self) -> &'a Ast {
        self.cx.ast
    }

    /// Records a diagnostic, adding the calls it sits in when it comes from
    /// inside an inlined function.
    fn report(&mut self, mut diagnostic: Diagnostic) {
        // A function inlined many times would repeat its errors: report each
        // (code, place) once.
        let key = (diagnostic.code, diagnostic.primary.span);
        if !self.reported.insert(key) {
            return;
        }
        // The innermost calls are the useful ones; a long chain is counted.
        const SHOWN: usize = 4;
        for (span, name) in self.calls.iter().rev().take(SHOWN) {
            diagnostic = diagnostic.with_secondary(*span, format!("in this call of `{name}`"));
        }
        if self.calls.len() > SHOWN {
            let (span, name) = &self.calls[0];
            diagnostic = diagnostic
                .with_secondary(*span, format!("in this call of `{name}`, the outermost"))
                .with_note(format!("inlined through {} nested calls", self.calls.len()));
        }
        self.diagnostics.push(diagnostic);
    }

    fn origin(&self, span: Span) -> Origin {
        let (line, col) = self.cx.lines.line_col(self.cx.source, span.start);
        let loc = |span: Span| {
            let (line, col) = self.cx.lines.line_col(self.cx.source, span.start);
            Loc { span, line, col }
        };
        let call_site = self.calls.first().map(|&(call, _)| loc(call));
        Origin {
            span,
            line,
            col,
            call_site,
            no_grad: self.no_grad.map(loc),
        }
    }

    /// Adds a node whose type is already known to be right.
    fn add_node(&mut self, op: Op, ty: Type, operands: &[NodeId], span: Span) -> NodeId {
        let node = Node {
            op,
            ty,
            role: Role::Intermediate,
            name: None,
            retain: false,
            origin: self.origin(span),
            backward: None,
        };
        self.graph.add(node, operands)
    }

    fn frame(&mut self) -> &mut Frame {
        self.frames.last_mut().expect("lowering always has a frame")
    }

    fn stmts(&mut self, body: &[Stmt], in_function: bool) {
        for stmt in body {
            self.stmt(stmt, in_function);
        }
    }

    fn stmt(&mut self, stmt: &Stmt, in_function: bool) {
        if in_function
            && !matches!(
                stmt,
                Stmt::Let { .. } | Stmt::LetMany { .. } | Stmt::NoGrad { .. } | Stmt::Error
            )
        {
            let span = stmt_span(self.ast(), stmt);
            self.report(
                Diagnostic::error(Code::StatementNotAllowed, span, "this statement cannot stand inside a function")
                    .with_label("not allowed in a function body")
                    .with_help("a function body holds `let` statements and ends with `return`; declare inputs, params and outputs in the model"),
            );
            return;
        }
        match stmt {
            Stmt::Input { name, ty } => {
                let Some(ty) = self.declared_type(ty, Role::Input) else {
                    return self.bind(
                        name.name.clone(),
                        name.span,
                        Value::Poison,
                        BindingKind::Input,
                    );
                };
                let id = self.leaf(Op::Input, ty, Role::Input, &name.name, name.span);
                self.bind(
                    name.name.clone(),
                    name.span,
                    Value::Node(id),
                    BindingKind::Input,
                );
            }
            Stmt::Param {
                name,
                ty,
                init,
                frozen,
            } => {
                let role = if frozen.is_some() {
                    Role::FrozenParam
                } else {
                    Role::Param
                };
                let ty = self.declared_type(ty, role.clone());
                let init = match (&ty, init) {
                    (Some(ty), Some(init)) => self.initializer(*init, ty),
                    (Some(_), None) => {
                        self.report(
                            Diagnostic::error(
                                Code::UnknownInitializer,
                                name.span,
                                format!("param `{}` has no initializer", name.name),
                            )
                            .with_label("no `= ...` after the type")
                            .with_help("add one, for example `= xavier_uniform` for weights or `= zeros` for biases"),
                        );
                        None
                    }
                    (None, _) => None,
                };
                let value = match (ty, init) {
                    (Some(ty), Some(init)) => {
                        Value::Node(self.leaf(Op::Param(init), ty, role, &name.name, name.span))
                    }
                    _ => Value::Poison,
                };
                self.bind(name.name.clone(), name.span, value, BindingKind::Param);
            }
            Stmt::Buffer { name, ty, init } => {
                let ty = self.declared_type(ty, Role::Buffer);
                let init = match (&ty, init) {
                    (Some(ty), Some(init)) => self.initializer(*init, ty),
                    (Some(_), None) => Some(Init::Zeros),
                    (None, _) => None,
                };
                let value = match (ty, init) {
                    (Some(ty), Some(init)) => Value::Node(self.leaf(
                        Op::Buffer(init),
                        ty,
                        Role::Buffer,
                        &name.name,
                        name.span,
                    )),
                    _ => Value::Poison,
                };
                self.bind(name.name.clone(), name.span, value, BindingKind::Buffer);
            }
            Stmt::Let { name, value } => {
                let value = self.expr_checked(*value);
                if let Value::Node(id) = value {
                    let node = self.graph.node_mut(id);
                    if node.name.is_none() && !node.op.is_leaf() {
                        node.name = Some(name.name.clone());
                    }
                }
                self.bind(name.name.clone(), name.span, value, BindingKind::Let);
            }
            Stmt::LetMany { names, value } => {
                let values = self.results_of(*value, names);
                for (name, value) in names.iter().zip(values) {
                    if let Value::Node(id) = value {
                        let node = self.graph.node_mut(id);
                        if node.name.is_none() && !node.op.is_leaf() {
                            node.name = Some(name.name.clone());
                        }
                    }
                    self.bind(name.name.clone(), name.span, value, BindingKind::Let);
                }
            }
            Stmt::Retain(names) => {
                for name in names {
                    self.retain(&name.name, name.span);
                }
            }
            Stmt::NoGrad { body, keyword } => {
                let outer = self.no_grad;
                self.no_grad = outer.or(Some(*keyword));
                self.stmts(body, in_function);
                self.no_grad = outer;
            }
            Stmt::Output { name, value } => self.output(&name.name, name.span, *value),
            Stmt::Loss { keyword, value } => self.loss(*keyword, *value),
            Stmt::Error => {}
        }
    }

    fn bind(&mut self, name: String, span: Span, value: Value, kind: BindingKind) {
        if let Some(previous) = self.frame().bindings.get(&name) {
            let first = previous.span;
            let what = match previous.kind {
                BindingKind::Input => "input",
                BindingKind::Param => "param",
                BindingKind::Buffer => "buffer",
                BindingKind::Let => "value",
                BindingKind::FunctionParam => "function parameter",
            };
            self.report(duplicate(&name, what, span, first));
            return;
        }
        let frame = self.frame();
        frame.order.push(name.clone());
        frame.bindings.insert(
            name,
            Binding {
                value,
                span,
                kind,
                used: false,
            },
        );
    }

    /// Looks a name up in the innermost scope, reporting unknown names and
    /// uses before the definition.
    fn lookup(&mut self, name: &str, span: Span) -> Value {
        if let Some(binding) = self.frame().bindings.get_mut(name) {
            binding.used = true;
            return binding.value;
        }
        // Inside a function inlined many times, the same error comes back
        // at every call: skip building it again.
        if self.reported.contains(&(Code::UnknownName, span))
            || self.reported.contains(&(Code::UseBeforeDefinition, span))
        {
            return Value::Poison;
        }
        if let Some(&defined) = self.frame().defined.get(name) {
            self.report(
                Diagnostic::error(
                    Code::UseBeforeDefinition,
                    span,
                    format!("`{name}` is used before its definition"),
                )
                .with_label("used here")
                .with_secondary(defined, "defined later here")
                .with_help(format!("move the definition of `{name}` above this line")),
            );
            return Value::Poison;
        }
        let frame = self.frames.last().expect("lowering always has a frame");
        let near = closest(name, frame.bindings.keys().map(String::as_str)).map(str::to_string);
        let mut diagnostic =
            Diagnostic::error(Code::UnknownName, span, format!("unknown name `{name}`"))
                .with_label("not defined in this scope");
        let in_model = self.frames.len() > 1 && self.frames[0].bindings.contains_key(name);
        if in_model {
            diagnostic = diagnostic.with_help(format!(
                "a function sees only its parameters and its own `let`s; pass `{name}` as an argument"
            ));
        } else if let Some(near) = near {
            diagnostic = diagnostic.with_help(format!("did you mean `{near}`?"));
        }
        self.report(diagnostic);
        Value::Poison
    }

    fn leaf(&mut self, op: Op, ty: Type, role: Role, name: &str, span: Span) -> NodeId {
        let id = self.add_node(op, ty, &[], span);
        let node = self.graph.node_mut(id);
        node.role = role;
        node.name = Some(name.to_string());
        id
    }

    /// Checks a declared type; params and buffers also need float elements
    /// and fixed sizes.
    fn declared_type(&mut self, ty: &TypeExpr, role: Role) -> Option<Type> {
        let mut dtype = match DType::from_name(&ty.dtype.name) {
            Some(dtype) => dtype,
            None => {
                let near = closest(&ty.dtype.name, ["f32", "f64", "i32"]);
                let help = match near {
                    Some(near) => {
                        format!("did you mean `{near}`? element types are `f32`, `f64` and `i32`")
                    }
                    None => "element types are `f32`, `f64` and `i32`".to_string(),
                };
                self.report(
                    Diagnostic::error(
                        Code::UnknownDtype,
                        ty.dtype.span,
                        format!("unknown element type `{}`", ty.dtype.name),
                    )
                    .with_label("not an element type")
                    .with_help(help),
                );
                return None;
            }
        };
        let is_state = matches!(role, Role::Param | Role::FrozenParam | Role::Buffer);
        if is_state && !dtype.is_float() {
            let what = if role == Role::Buffer {
                "buffers"
            } else {
                "params"
            };
            self.report(
                Diagnostic::error(
                    Code::NotFloat,
                    ty.dtype.span,
                    format!("{what} must be `f32` or `f64`"),
                )
                .with_label(format!("`{dtype}` cannot be trained or normalized"))
                .with_help("declare it as `f32`; integer labels and indices are `input`s"),
            );
            return None;
        }
        if let (Some(float), true) = (self.cx.float_dtype, dtype.is_float()) {
            dtype = float;
        }
        let mut dims = Vec::new();
        let mut ok = true;
        for dim in &ty.dims {
            match dim {
                DimExpr::Size(text, span) => match text.parse::<u64>() {
                    Ok(n) if n >= 1 => dims.push(Dim::Fixed(n)),
                    Ok(_) => {
                        self.report(
                            Diagnostic::error(
                                Code::SymbolicParam,
                                *span,
                                "a dimension must be at least 1",
                            )
                            .with_label("size 0")
                            .with_help("empty tensors are not supported"),
                        );
                        ok = false;
                    }
                    Err(_) => {
                        self.report(
                            Diagnostic::error(Code::Overflow, *span, "dimension too large")
                                .with_label("does not fit in 64 bits"),
                        );
                        ok = false;
                    }
                },
                DimExpr::Symbol(name) => {
                    if is_state {
                        self.report(
                            Diagnostic::error(
                                Code::SymbolicParam,
                                name.span,
                                format!("symbolic dimension `{}` in the shape of a {}", name.name, role_word(&role)),
                            )
                            .with_label("params and buffers need fixed sizes")
                            .with_help("write the size as an integer; only inputs have symbolic dimensions"),
                        );
                        ok = false;
                    } else {
                        self.symbols.insert(name.name.clone());
                        dims.push(Dim::Sym(name.name.clone()));
                    }
                }
            }
        }
        if !ok {
            return None;
        }
        let shape = Shape(dims);
        if shape.element_count().is_none() {
            self.report(
                Diagnostic::error(
                    Code::Overflow,
                    ty.span,
                    format!("the element count of `{shape}` overflows"),
                )
                .with_label("too many elements")
                .with_help(format!(
                    "a tensor holds at most {} elements",
                    crate::ir::types::MAX_ELEMENTS
                )),
            );
            return None;
        }
        Some(Type::new(dtype, shape))
    }

    fn retain(&mut self, name: &str, span: Span) {
        let binding = self.frame().bindings.get(name).cloned();
        let Some(binding) = binding else {
            let near = {
                let frame = self.frames.last().expect("lowering always has a frame");
                closest(name, frame.bindings.keys().map(String::as_str)).map(str::to_string)
            };
            let later = self.frame().defined.get(name).copied();
            let mut diagnostic = Diagnostic::error(
                Code::RetainUnknown,
                span,
                format!("cannot retain unknown name `{name}`"),
            )
            .with_label("no value of this name is defined above");
            if let Some(later) = later {
                diagnostic = diagnostic
                    .with_secondary(later, "defined later here")
                    .with_help("move `retain` below the definition");
            } else if let Some(near) = near {
                diagnostic = diagnostic.with_help(format!("did you mean `{near}`?"));
            }
            self.report(diagnostic);
            return;
        };
        let reason = match binding.kind {
            BindingKind::Let => None,
            BindingKind::Param => {
                Some("params always report their gradient; `retain` is for intermediate values")
            }
            BindingKind::Input => Some("inputs never get a gradient"),
            BindingKind::Buffer => Some("buffers never get a gradient"),
            BindingKind::FunctionParam => Some("function parameters are not values of the model"),
        };
        if let Some(reason) = reason {
            self.report(
                Diagnostic::error(
                    Code::RetainUnknown,
                    span,
                    format!("`{name}` is not an intermediate value"),
                )
                .with_label("cannot be retained")
                .with_secondary(binding.span, "declared here")
                .with_note(reason),
            );
            return;
        }
        if let Some(b) = self.frame().bindings.get_mut(name) {
            b.used = true;
        }
        let id = match binding.value {
            Value::Node(id) => id,
            Value::Scalar(v) => self.constant(v, self.default_float, binding.span),
            Value::Poison => return,
        };
        let id = match self.graph.node(id).role {
            Role::Intermediate | Role::Output(_) | Role::Loss => id,
            _ => self.identity(id, binding.span),
        };
        self.graph.node_mut(id).retain = true;
    }

    fn identity(&mut self, id: NodeId, span: Span) -> NodeId {
        let ty = self.graph.node(id).ty.clone();
        self.add_node(Op::Identity, ty, &[id], span)
    }

    fn constant(&mut self, value: f64, dtype: DType, span: Span) -> NodeId {
        self.add_node(
            Op::Constant(value),
            Type::new(dtype, Shape::scalar()),
            &[],
            span,
        )
    }

    /// The node of a value: a number becomes a constant of the default
    /// float type; `None` for poison.
    fn node_of(&mut self, value: Value, span: Span) -> Option<NodeId> {
        match value {
            Value::Node(id) => Some(id),
            Value::Scalar(v) => Some(self.constant(v, self.default_float, span)),
            Value::Poison => None,
        }
    }

    /// Removes the nodes a stable rewrite replaced (`superseded`) that
    /// nothing uses, names or keeps (`keep`).
    fn remove_superseded(&mut self, keep: &[NodeId]) {
        for id in std::mem::take(&mut self.superseded) {
            let node = self.graph.node(id);
            let unused = node.name.is_none()
                && node.role == Role::Intermediate
                && !node.retain
                && self.graph.users(id).is_empty()
                && !keep.contains(&id);
            if unused {
                self.graph.remove(id);
            }
        }
    }

    /// A node to give a new role: the value itself if it has none yet, else
    /// an identity of it.
    fn node_for_role(&mut self, value: Value, span: Span) -> Option<NodeId> {
        let id = self.node_of(value, span)?;
        Some(match self.graph.node(id).role {
            Role::Intermediate => id,
            _ => self.identity(id, span),
        })
    }

    fn output(&mut self, name: &str, span: Span, value: Option<ExprId>) {
        if let Some(&first) = self.outputs.get(name) {
            self.report(duplicate(name, "output", span, first));
            return;
        }
        self.outputs.insert(name.to_string(), span);
        let (value, value_span) = match value {
            Some(expr) => {
                let v = self.expr_checked(expr);
                self.bind(name.to_string(), span, v, BindingKind::Let);
                if let Some(b) = self.frame().bindings.get_mut(name) {
                    b.used = true;
                }
                (v, self.ast().expr(expr).span)
            }
            None => (self.lookup(name, span), span),
        };
        if let Some(id) = self.node_for_role(value, value_span) {
            self.graph.node_mut(id).role = Role::Output(name.to_string());
        }
    }

    fn loss(&mut self, keyword: Span, value: ExprId) {
        let span = self.ast().expr(value).span;
        if let Some(first) = self.loss {
            self.report(
                Diagnostic::error(Code::SecondLoss, keyword, "a model has one `loss`")
                    .with_label("second `loss`")
                    .with_secondary(first, "first `loss` here")
                    .with_help("add the terms into one scalar: `loss a + b`"),
            );
            return;
        }
        self.loss = Some(keyword);
        let value = self.expr_checked(value);
        let Some(id) = self.node_for_role(value, span) else {
            return;
        };
        let ty = self.graph.node(id).ty.clone();
        if !ty.shape.is_scalar() || !ty.dtype.is_float() {
            self.report(
                Diagnostic::error(Code::LossNotScalar, span, "the loss must be a float scalar")
                    .with_label(format!("this is `{ty}`"))
                    .with_help("reduce it to a scalar, for example `loss mean(...)`"),
            );
            return;
        }
        self.graph.node_mut(id).role = Role::Loss;
    }

    fn warn_unused(&mut self) {
        let frame = self.frames.first().expect("the model frame");
        let mut warnings = Vec::new();
        for name in &frame.order {
            let binding = &frame.bindings[name];
            if binding.used || name.starts_with('_') {
                continue;
            }
            let what = match binding.kind {
                BindingKind::Let => "value",
                BindingKind::Param => "param",
                _ => continue,
            };
            warnings.push(
                Diagnostic::warning(
                    Code::UnusedValue,
                    binding.span,
                    format!("{what} `{name}` is never used"),
                )
                .with_label("nothing reads this")
                .with_help(format!(
                    "remove it, use it, or start its name with `_` (`_{name}`)"
                )),
            );
        }
        self.diagnostics.extend(warnings);
    }

    /// Lowers an expression after checking its depth.
    fn expr_checked(&mut self, id: ExprId) -> Value {
        let expr = self.ast().expr(id);
        if expr.depth > MAX_EXPR_DEPTH {
            if !self.depth_reported {
                self.depth_reported = true;
                let span = expr.span;
                let depth = expr.depth;
                self.report(
                    Diagnostic::error(
                        Code::TooDeep,
                        Span::new(span.start as usize, span.start as usize + 1),
                        format!(
                            "expression nests {depth} levels deep; the limit is {MAX_EXPR_DEPTH}"
                        ),
                    )
                    .with_label("this expression is too deep")
                    .with_help("split it into several `let` bindings"),
                );
            }
            return Value::Poison;
        }
        self.expr(id)
    }
}

fn role_word(role: &Role) -> &'static str {
    match role {
        Role::Buffer => "buffer",
        Role::Param | Role::FrozenParam => "param",
        _ => "value",
    }
}

/// A span for a whole statement, for errors about the statement itself.
fn stmt_span(ast: &Ast, stmt: &Stmt) -> Span {
    match stmt {
        Stmt::Input { name, ty } => name.span.to(ty.span),
        Stmt::Param { name, ty, .. } | Stmt::Buffer { name, ty, .. } => name.span.to(ty.span),
        Stmt::Let { name, value } => name.span.to(ast.expr(*value).span),
        Stmt::LetMany { names, value } => names
            .first()
            .map_or(Span::default(), |n| n.span.to(ast.expr(*value).span)),
        Stmt::Retain(names) => names.first().map_or(Span::default(), |n| n.span),
        Stmt::NoGrad { keyword, .. } => *keyword,
        Stmt::Output { name, .. } => name.span,
        Stmt::Loss { keyword, .. } => *keyword,
        Stmt::Error => Span::default(),
    }
}
