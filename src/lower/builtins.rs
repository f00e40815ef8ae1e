//! The built-in functions: their signatures, and the binding of a call's
//! positional and named arguments to parameter slots.
//!
//! Binding is shared with user functions (whose parameters are all required
//! tensors), so arity, unknown, missing and repeated arguments get the same
//! diagnostics everywhere.

use crate::diagnostic::{Code, Diagnostic, Span, closest};
use crate::ir::{ReduceFn, UnaryFn};
use crate::syntax::ast::{Arg, Ast, ExprId};

/// A built-in function.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Builtin {
    /// `exp(x)` and the other one-argument elementwise functions.
    Unary(UnaryFn),
    /// `leaky_relu(x, slope = 0.01)`
    LeakyRelu,
    /// `maximum(a, b)`
    Maximum,
    /// `minimum(a, b)`
    Minimum,
    /// `clamp(x, lo, hi)`
    Clamp,
    /// `sum`, `mean`, `max`, `logsumexp` `(x, axis, keepdims = false)`
    Reduce(ReduceFn),
    /// `softmax(x, axis = -1)`
    Softmax,
    /// `log_softmax(x, axis = -1)`
    LogSoftmax,
    /// `transpose(x)`, `transpose(x, a, b)`
    Transpose,
    /// `permute(x, [axes])`
    Permute,
    /// `where(c, a, b)`
    Where,
    /// `masked_fill(x, mask, value)`: `where(mask, value, x)`
    MaskedFill,
    /// `arange(n)`
    Arange,
    /// `tril(x, k = 0)`, `triu(x, k = 0)`
    Triangle(bool),
    /// `zeros([dims])`, `ones([dims])`, `full([dims], v)`
    Full(Fill),
    /// `reshape(x, [dims])`
    Reshape,
    /// `concat([a, b], axis = 0)`
    Concat,
    /// `stack([a, b], axis = 0)`
    Stack,
    /// `dropout(x, p)`
    Dropout,
    /// `batch_norm(x, gamma, beta, running_mean, running_var, eps, momentum)`
    BatchNorm,
    /// `layer_norm(x, gamma, beta, eps)`
    LayerNorm,
    /// `embedding(ids, table)`
    Embedding,
    /// `cross_entropy(logits, labels)`
    CrossEntropy,
    /// `mse(pred, target)`
    Mse,
    /// `bce_with_logits(logits, target)`
    BceWithLogits,
    /// `stop_gradient(x)`, alias `detach(x)`
    StopGradient,
    /// `grad(e, x)`: the gradient of the scalar `e` with respect to `x`
    Grad,
    /// `scan(f, xs, init, axis = 1, with = [...], reverse = false,
    /// checkpoint = false)`: a loop of the user function `f`
    Scan,
}

/// The value a constructor fills its tensor with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Fill {
    /// `zeros`
    Zeros,
    /// `ones`
    Ones,
    /// `full`: its `value` argument
    Given,
}

/// What a parameter accepts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// A tensor value (a number literal becomes a constant).
    Tensor,
    /// A number known at compile time.
    Number,
    /// `true` or `false`.
    Bool,
    /// One axis (an integer, negative counts from the end).
    Axis,
    /// One axis or a list of axes.
    Axes,
    /// A list of dimensions: integers, symbols and at most one `-1`.
    Dims,
    /// A list of tensors.
    TensorList,
    /// A tensor, or a list of tensors.
    Tensors,
    /// The name of a function defined with `fn`.
    Function,
}

/// One parameter of a signature.
#[derive(Clone, Copy, Debug)]
pub struct Param<'a> {
    /// Its name, usable as a named argument.
    pub name: &'a str,
    /// What it accepts.
    pub kind: Kind,
    /// Whether a call may leave it out.
    pub optional: bool,
}

const fn req(name: &'static str, kind: Kind) -> Param<'static> {
    Param {
        name,
        kind,
        optional: false,
    }
}

const fn opt(name: &'static str, kind: Kind) -> Param<'static> {
    Param {
        name,
        kind,
        optional: true,
    }
}

/// Every built-in name, for "did you mean".
pub(crate) const NAMES: &[&str] = &[
    "exp",
    "log",
    "sqrt",
    "abs",
    "tanh",
    "sigmoid",
    "relu",
    "gelu",
    "softplus",
    "sin",
    "cos",
    "erf",
    "leaky_relu",
    "maximum",
    "minimum",
    "clamp",
    "sum",
    "mean",
    "max",
    "logsumexp",
    "softmax",
    "log_softmax",
    "transpose",
    "permute",
    "where",
    "masked_fill",
    "arange",
    "tril",
    "triu",
    "zeros",
    "ones",
    "full",
    "reshape",
    "concat",
    "stack",
    "dropout",
    "batch_norm",
    "layer_norm",
    "embedding",
    "cross_entropy",
    "mse",
    "bce_with_logits",
    "stop_gradient",
    "detach",
    "grad",
    "scan",
];

impl Builtin {
    /// The built-in called `name`.
    pub(crate) fn from_name(name: &str) -> Option<Builtin> {
        let unary = UnaryFn::ALL
            .iter()
            .find(|f| f.name() == name && **f != UnaryFn::Neg);
        if let Some(&f) = unary {
            return Some(Builtin::Unary(f));
        }
        Some(match name {
            "leaky_relu" => Builtin::LeakyRelu,
            "maximum" => Builtin::Maximum,
            "minimum" => Builtin::Minimum,
            "clamp" => Builtin::Clamp,
            "sum" => Builtin::Reduce(ReduceFn::Sum),
            "mean" => Builtin::Reduce(ReduceFn::Mean),
            "max" => Builtin::Reduce(ReduceFn::Max),
            "logsumexp" => Builtin::Reduce(ReduceFn::LogSumExp),
            "softmax" => Builtin::Softmax,
            "log_softmax" => Builtin::LogSoftmax,
            "transpose" => Builtin::Transpose,
            "permute" => Builtin::Permute,
            "where" => Builtin::Where,
            "masked_fill" => Builtin::MaskedFill,
            "arange" => Builtin::Arange,
            "tril" => Builtin::Triangle(false),
            "triu" => Builtin::Triangle(true),
            "zeros" => Builtin::Full(Fill::Zeros),
            "ones" => Builtin::Full(Fill::Ones),
            "full" => Builtin::Full(Fill::Given),
            "reshape" => Builtin::Reshape,
            "concat" => Builtin::Concat,
            "stack" => Builtin::Stack,
            "dropout" => Builtin::Dropout,
            "batch_norm" => Builtin::BatchNorm,
            "layer_norm" => Builtin::LayerNorm,
            "embedding" => Builtin::Embedding,
            "cross_entropy" => Builtin::CrossEntropy,
            "mse" => Builtin::Mse,
            "bce_with_logits" => Builtin::BceWithLogits,
            "stop_gradient" | "detach" => Builtin::StopGradient,
            "grad" => Builtin::Grad,
            "scan" => Builtin::Scan,
            _ => return None,
        })
    }

    /// The parameters, in positional order.
    pub fn params(self) -> &'static [Param<'static>] {
        use Kind::*;
        match self {
            Builtin::Unary(_) | Builtin::StopGradient => &const { [req("x", Tensor)] },
            Builtin::Transpose => &const { [req("x", Tensor), opt("a", Axis), opt("b", Axis)] },
            Builtin::Permute => &const { [req("x", Tensor), req("axes", Axes)] },
            Builtin::Arange => &const { [req("n", Number)] },
            Builtin::MaskedFill => {
                &const { [req("x", Tensor), req("mask", Tensor), req("value", Number)] }
            }
            Builtin::Where => &const { [req("c", Tensor), req("a", Tensor), req("b", Tensor)] },
            Builtin::Triangle(_) => &const { [req("x", Tensor), opt("k", Number)] },
            Builtin::Full(Fill::Given) => &const { [req("shape", Dims), req("value", Number)] },
            Builtin::Full(_) => &const { [req("shape", Dims)] },
            Builtin::LeakyRelu => &const { [req("x", Tensor), opt("slope", Number)] },
            Builtin::Maximum | Builtin::Minimum => &const { [req("a", Tensor), req("b", Tensor)] },
            Builtin::Clamp => &const { [req("x", Tensor), req("lo", Number), req("hi", Number)] },
            Builtin::Reduce(_) => {
                &const { [req("x", Tensor), opt("axis", Axes), opt("keepdims", Bool)] }
            }
            Builtin::Softmax | Builtin::LogSoftmax => {
                &const { [req("x", Tensor), opt("axis", Axis)] }
            }
            Builtin::Reshape => &const { [req("x", Tensor), req("shape", Dims)] },
            Builtin::Concat | Builtin::Stack => {
                &const { [req("tensors", TensorList), opt("axis", Axis)] }
            }
            Builtin::Dropout => &const { [req("x", Tensor), req("p", Number)] },
            Builtin::BatchNorm => {
                &const {
                    [
                        req("x", Tensor),
                        req("gamma", Tensor),
                        req("beta", Tensor),
                        req("running_mean", Tensor),
                        req("running_var", Tensor),
                        opt("eps", Number),
                        opt("momentum", Number),
                    ]
                }
            }
            Builtin::LayerNorm => {
                &const {
                    [
                        req("x", Tensor),
                        req("gamma", Tensor),
                        req("beta", Tensor),
                        opt("eps", Number),
                    ]
                }
            }
            Builtin::Embedding => &const { [req("ids", Tensor), req("table", Tensor)] },
            Builtin::CrossEntropy => &const { [req("logits", Tensor), req("labels", Tensor)] },
            Builtin::Mse => &const { [req("pred", Tensor), req("target", Tensor)] },
            Builtin::BceWithLogits => &const { [req("logits", Tensor), req("target", Tensor)] },
            Builtin::Grad => &const { [req("e", Tensor), req("x", Tensor)] },
            Builtin::Scan => {
                &const {
                    [
                        req("f", Function),
                        req("xs", Tensors),
                        opt("init", Tensors),
                        opt("axis", Axis),
                        opt("with", TensorList),
                        opt("reverse", Bool),
                        opt("checkpoint", Bool),
                    ]
                }
            }
        }
    }
}

/// Renders a signature such as `dropout(x, p)` for help lines.
pub(crate) fn signature(name: &str, params: &[Param<'_>]) -> String {
    let list: Vec<String> = params
        .iter()
        .map(|p| {
            let hint = match p.kind {
                Kind::Tensor => "",
                Kind::Number => ": number",
                Kind::Bool => ": true|false",
                Kind::Axis => ": axis",
                Kind::Axes => ": axis or [axes]",
                Kind::Dims => ": [dims]",
                Kind::TensorList => ": [tensors]",
                Kind::Tensors => ": tensor or [tensors]",
                Kind::Function => ": fn",
            };
            let optional = if p.optional { "?" } else { "" };
            format!("{}{optional}{hint}", p.name)
        })
        .collect();
    format!("{name}({})", list.join(", "))
}

/// Assigns arguments to parameter slots. Reports every problem; returns
/// `None` if any argument could not be placed or a required one is missing.
pub fn bind(
    ast: &Ast,
    callee: &str,
    params: &[Param<'_>],
    args: &[Arg],
    call: Span,
    diagnostics: &mut Vec<Diagnostic>,
) -> Option<Vec<Option<ExprId>>> {
    let mut slots: Vec<Option<ExprId>> = vec![None; params.len()];
    let mut ok = true;
    let mut positional = 0;
    let help = || format!("`{callee}` is called as `{}`", signature(callee, params));
    for arg in args {
        let span = ast.expr(arg.value).span;
        match &arg.name {
            None => {
                if positional >= params.len() {
                    let takes = params.len();
                    let given = args.iter().filter(|a| a.name.is_none()).count();
                    diagnostics.push(
                        Diagnostic::error(
                            Code::WrongArity,
                            span,
                            format!(
                                "`{callee}` takes {takes} argument{} but {given} were given",
                                if takes == 1 { "" } else { "s" }
                            ),
                        )
                        .with_label("this argument has no parameter")
                        .with_help(help()),
                    );
                    return None;
                }
                slots[positional] = Some(arg.value);
                positional += 1;
            }
            Some(name) => match params.iter().position(|p| p.name == name.name) {
                None => {
                    let mut diagnostic = Diagnostic::error(
                        Code::UnknownArgument,
                        name.span,
                        format!("`{callee}` has no parameter `{}`", name.name),
                    )
                    .with_label("unknown argument name");
                    diagnostic = match closest(&name.name, params.iter().map(|p| p.name)) {
                        Some(near) => {
                            diagnostic.with_help(format!("did you mean `{near}`? {}", help()))
                        }
                        None => diagnostic.with_help(help()),
                    };
                    diagnostics.push(diagnostic);
                    ok = false;
                }
                Some(i) if slots[i].is_some() => {
                    diagnostics.push(
                        Diagnostic::error(
                            Code::DuplicateArgument,
                            name.span,
                            format!("argument `{}` of `{callee}` is given twice", name.name),
                        )
                        .with_label("given again here")
                        .with_help(help()),
                    );
                    ok = false;
                }
                Some(i) => slots[i] = Some(arg.value),
            },
        }
    }
    for (param, slot) in params.iter().zip(&slots) {
        if slot.is_none() && !param.optional && ok {
            diagnostics.push(
                Diagnostic::error(
                    Code::MissingArgument,
                    call,
                    format!("missing argument `{}` of `{callee}`", param.name),
                )
                .with_label(format!("`{}` is required", param.name))
                .with_help(help()),
            );
            ok = false;
        }
    }
    ok.then_some(slots)
}
