//! The closed set of IR operations and their typing rules.
//!
//! Every pass, printer and (later) derivative rule is an exhaustive `match`
//! over [`Op`], so adding an op makes the compiler list every place to
//! update. `Op::infer` is the one typing and shape rule per op: lowering
//! uses it to type new nodes and the verifier uses it to re-check them.

use std::fmt;

use super::scan::Scan;
use super::types::{DType, Dim, Shape, Type};

/// An elementwise function of one float tensor.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum UnaryFn {
    /// `-x`
    Neg,
    /// `exp(x)`
    Exp,
    /// natural `log(x)`
    Log,
    /// `sqrt(x)`
    Sqrt,
    /// `abs(x)`
    Abs,
    /// `tanh(x)`
    Tanh,
    /// `1 / (1 + exp(-x))`
    Sigmoid,
    /// `max(x, 0)`
    Relu,
    /// exact GELU, `x * (1 + erf(x / sqrt(2))) / 2`
    Gelu,
    /// `log(1 + exp(x))`
    Softplus,
    /// `sin(x)`
    Sin,
    /// `cos(x)`
    Cos,
    /// the error function `erf(x)` (GELU's derivative is built from it)
    Erf,
}

impl UnaryFn {
    /// Every unary function, in order.
    pub const ALL: &'static [UnaryFn] = &[
        UnaryFn::Neg,
        UnaryFn::Exp,
        UnaryFn::Log,
        UnaryFn::Sqrt,
        UnaryFn::Abs,
        UnaryFn::Tanh,
        UnaryFn::Sigmoid,
        UnaryFn::Relu,
        UnaryFn::Gelu,
        UnaryFn::Softplus,
        UnaryFn::Sin,
        UnaryFn::Cos,
        UnaryFn::Erf,
    ];

    /// The name used in the language and the text IR.
    pub fn name(self) -> &'static str {
        match self {
            UnaryFn::Neg => "neg",
            UnaryFn::Exp => "exp",
            UnaryFn::Log => "log",
            UnaryFn::Sqrt => "sqrt",
            UnaryFn::Abs => "abs",
            UnaryFn::Tanh => "tanh",
            UnaryFn::Sigmoid => "sigmoid",
            UnaryFn::Relu => "relu",
            UnaryFn::Gelu => "gelu",
            UnaryFn::Softplus => "softplus",
            UnaryFn::Sin => "sin",
            UnaryFn::Cos => "cos",
            UnaryFn::Erf => "erf",
        }
    }
}

/// An elementwise function of two float tensors, with broadcasting.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum BinaryFn {
    /// `a + b`
    Add,
    /// `a - b`
    Sub,
    /// `a * b`
    Mul,
    /// `a / b`
    Div,
    /// `a ** b`
    Pow,
    /// `maximum(a, b)`
    Maximum,
    /// `minimum(a, b)`
    Minimum,
    /// `a > b` as 1 or 0 (0 where either is NaN), in the operands' float
    /// type: the masks derivative rules select with.
    Greater,
    /// `a >= b` as 1 or 0.
    GreaterEqual,
    /// `a < b` as 1 or 0.
    Less,
    /// `a <= b` as 1 or 0.
    LessEqual,
    /// `a == b` as 1 or 0.
    Equal,
    /// `a != b` as 1 or 0 (1 where either is NaN).
    NotEqual,
}

impl BinaryFn {
    /// The name used in the text IR.
    pub fn name(self) -> &'static str {
        match self {
            BinaryFn::Add => "add",
            BinaryFn::Sub => "sub",
            BinaryFn::Mul => "mul",
            BinaryFn::Div => "div",
            BinaryFn::Pow => "pow",
            BinaryFn::Maximum => "maximum",
            BinaryFn::Minimum => "minimum",
            BinaryFn::Greater => "gt",
            BinaryFn::GreaterEqual => "ge",
            BinaryFn::Less => "lt",
            BinaryFn::LessEqual => "le",
            BinaryFn::Equal => "eq",
            BinaryFn::NotEqual => "ne",
        }
    }

    /// Whether the function is a comparison (a mask of 1 and 0).
    pub(crate) fn is_comparison(self) -> bool {
        matches!(
            self,
            BinaryFn::Greater
                | BinaryFn::GreaterEqual
                | BinaryFn::Less
                | BinaryFn::LessEqual
                | BinaryFn::Equal
                | BinaryFn::NotEqual
        )
    }
}

/// A reduction over some axes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ReduceFn {
    /// Sum.
    Sum,
    /// Arithmetic mean.
    Mean,
    /// Maximum.
    Max,
    /// `log(sum(exp(x)))`, computed stably.
    LogSumExp,
}

impl ReduceFn {
    /// The name used in the language and the text IR.
    pub fn name(self) -> &'static str {
        match self {
            ReduceFn::Sum => "sum",
            ReduceFn::Mean => "mean",
            ReduceFn::Max => "max",
            ReduceFn::LogSumExp => "logsumexp",
        }
    }
}

/// How a param or buffer gets its first value.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Init {
    /// All zeros.
    Zeros,
    /// All ones.
    Ones,
    /// Every element `c`.
    Constant(f64),
    /// Normal with mean and standard deviation.
    Normal {
        /// Mean.
        mean: f64,
        /// Standard deviation.
        std: f64,
    },
    /// Uniform on `[lo, hi)`.
    Uniform {
        /// Lower bound.
        lo: f64,
        /// Upper bound.
        hi: f64,
    },
    /// Glorot normal, `std = sqrt(2 / (fan_in + fan_out))`. Fans follow the
    /// `x @ w` layout: `fan_in` is the product of every dimension but the
    /// last, `fan_out` the last (see `docs/language.md`).
    XavierNormal,
    /// Glorot uniform, bound `sqrt(6 / (fan_in + fan_out))`.
    XavierUniform,
    /// He normal, `std = sqrt(2 / fan_in)`.
    KaimingNormal,
    /// He uniform, bound `sqrt(6 / fan_in)`.
    KaimingUniform,
}

impl fmt::Display for Init {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Init::Zeros => f.write_str("zeros"),
            Init::Ones => f.write_str("ones"),
            Init::Constant(c) => write!(f, "constant({c:?})"),
            Init::Normal { mean, std } => write!(f, "normal({mean:?}, {std:?})"),
            Init::Uniform { lo, hi } => write!(f, "uniform({lo:?}, {hi:?})"),
            Init::XavierNormal => f.write_str("xavier_normal"),
            Init::XavierUniform => f.write_str("xavier_uniform"),
            Init::KaimingNormal => f.write_str("kaiming_normal"),
            Init::KaimingUniform => f.write_str("kaiming_uniform"),
        }
    }
}

/// One IR operation. Operands are the node's inputs, in order; the arity
/// of each op is fixed except for `Concat`.
#[derive(Clone, Debug, PartialEq)]
pub enum Op {
    /// Data fed each step. No operands.
    Input,
    /// A param (trainable or frozen: the node's role says). No operands.
    Param(Init),
    /// Model state updated in train mode. No operands.
    Buffer(Init),
    /// A loop over the leading axis of its sequences with carried state,
    /// its body a graph of its own (`ir::scan`). The node's value is its
    /// result 0 (the first final carry, else the first stacked output).
    Scan(Box<Scan>),
    /// Result `index` of the `scan` node that is its one operand; its type
    /// is the node's (`Scan::result_type`).
    ScanResult {
        /// Which result: the final carries, then the stacked outputs.
        index: usize,
    },
    /// A scalar constant of the node's dtype. No operands.
    Constant(f64),
    /// `f(x)` elementwise.
    Unary(UnaryFn),
    /// `x if x > 0 else slope * x`.
    LeakyRelu {
        /// Slope for negative inputs.
        slope: f64,
    },
    /// `min(max(x, lo), hi)`.
    Clamp {
        /// Lower bound.
        lo: f64,
        /// Upper bound.
        hi: f64,
    },
    /// `f(a, b)` elementwise with broadcasting.
    Binary(BinaryFn),
    /// `a @ b`: `[M, K] @ [K, N]` or batched `[B, M, K] @ [K, N]`.
    MatMul,
    /// A matrix product with operands read transposed (their last two axes
    /// swapped): what the `transpose` pass folds `a @ transpose(b)` into,
    /// and what derivative rules make of a product's gradients. With
    /// `transpose_a` and a batched right operand (`[..., M, K]` and
    /// `[..., M, N]`, the same leading axes) the product also sums over
    /// the batch: `sum_b a[b]^T @ c[b]`, `[K, N]` (a weight's gradient).
    MatMulT {
        /// Read the left operand transposed.
        transpose_a: bool,
        /// Read the right operand transposed.
        transpose_b: bool,
    },
    /// Swaps the last two axes.
    Transpose,
    /// `a @ b` of two batched operands, `[..., M, K] @ [..., K, N]`, the
    /// leading axes broadcast as NumPy's `matmul` broadcasts them (either
    /// operand may have none): attention's `Q @ K^T`. An operand with its
    /// flag set is read with its last two axes swapped (what the
    /// `transpose` pass folds `transpose(k)` into).
    BatchMatMul {
        /// Read the left operand transposed.
        transpose_a: bool,
        /// Read the right operand transposed.
        transpose_b: bool,
    },
    /// `0, 1, ..., n - 1` in the node's float type, `n` its one
    /// dimension (`arange(n)`). No operands.
    Iota,
    /// The lower (or upper) triangle of the last two axes: element `(i, j)`
    /// kept where `j - i <= k` (`upper`: `j - i >= k`), else 0 (`tril`,
    /// `triu`).
    Triangle {
        /// The diagonal: 0 the main one, above it positive.
        k: i64,
        /// `triu` (else `tril`).
        upper: bool,
    },
    /// The operand's axes in a new order: axis `i` of the result is axis
    /// `axes[i]` of the operand.
    Permute {
        /// A permutation of `0..rank`.
        axes: Vec<usize>,
    },
    /// A reduction over sorted, distinct axes.
    Reduce {
        /// Which reduction.
        func: ReduceFn,
        /// Axes reduced, sorted, distinct, within the rank.
        axes: Vec<usize>,
        /// Whether reduced axes stay as size 1.
        keepdims: bool,
    },
    /// `exp(x) / sum(exp(x))` along an axis.
    Softmax {
        /// The axis.
        axis: usize,
    },
    /// `x - logsumexp(x)` along an axis.
    LogSoftmax {
        /// The axis.
        axis: usize,
    },
    /// Same elements, the node's shape.
    Reshape,
    /// Joins operands along an axis.
    Concat {
        /// The axis.
        axis: usize,
    },
    /// The elements `start..start + n` along `axis`, `n` the node's size
    /// along it (the gradient of a `concat`, for one of its operands); with
    /// `from_end`, the `n` elements that end `start` elements before the
    /// end (`x[:, -1]` of a symbolic axis). Along a symbolic axis `n` is
    /// 1 and the position is checked when the graph runs.
    Slice {
        /// The axis.
        axis: usize,
        /// The first element taken along the axis (`from_end`: the
        /// elements left after the last one taken).
        start: u64,
        /// Counts `start` from the end of the axis.
        from_end: bool,
    },
    /// Zeroes each element with probability `p` and scales the rest by
    /// `1 / (1 - p)`. Only in train-mode graphs.
    Dropout {
        /// Drop probability in `[0, 1)`.
        p: f64,
        /// Which dropout of the model this is (0, 1, ... in source order):
        /// part of the key of its random mask, so that every backend draws
        /// the same mask for the same (seed, step, key, element).
        key: u32,
    },
    /// Operands `x, gamma, beta, running_mean, running_var`; normalizes over
    /// every axis but 1. Train mode uses the batch statistics (biased
    /// variance); eval mode the running ones.
    BatchNorm {
        /// Added to the variance.
        eps: f64,
        /// Weight of the new statistics in the running update.
        momentum: f64,
        /// Train-mode statistics.
        training: bool,
    },
    /// Operands `x, gamma, beta`; normalizes over the last axis.
    LayerNorm {
        /// Added to the variance.
        eps: f64,
    },
    /// Operands `ids` (i32) and `table` `[V, D]`: rows of the table.
    Embedding,
    /// Operands `ids` (i32) and `rows` (the ids' shape and `[D]`): a
    /// `[V, D]` table (the node's shape) of zeros with each row added
    /// at its id (the gradient of an `embedding`'s table).
    ScatterAdd,
    /// Operands `logits [N, C]`, `labels i32 [N]`: mean negative
    /// log-likelihood of log-softmax.
    CrossEntropy,
    /// Mean squared error of two equal shapes.
    Mse,
    /// Mean binary cross-entropy of logits and targets of equal shapes.
    BceWithLogits,
    /// The operand, as a constant to the backward pass.
    StopGradient,
    /// The operand unchanged; carries a second role for one value.
    Identity,
    /// A hand-written kernel the JIT puts in place of the graph it
    /// computes (the pass `passes::patterns`), after differentiation:
    /// never built by the compiler's front end, never differentiated; the
    /// interpreter runs its expansion (`ir::expand`).
    Kernel(KernelOp),
    /// Operands `mask, a, b` (broadcast together): `a` where the mask is
    /// not 0, else `b` (`torch.where`). Derivative rules select with it, so
    /// that a gradient of 0 stays 0 even where the other branch is not
    /// finite.
    Select,
    /// Sums the operand over the axes broadcasting added or stretched, down
    /// to the node's shape (which must broadcast to the operand's).
    SumTo,
    /// Broadcasts the operand to the node's shape (to which it must
    /// broadcast): the adjoint of `SumTo`, made by derivative rules.
    Expand,
    /// Operand: `i32` labels; the node: one more axis of `classes`
    /// elements, 1 at the label and 0 elsewhere, in the node's float type.
    /// A label outside `0..classes` is an error.
    OneHot,
    /// The number of elements of the operand along `axes`, as a scalar of the node's float type: a mean's divisor when
    /// the batch size is only known at run time.
    Count {
        /// The axes counted, sorted, distinct, within the rank.
        axes: Vec<usize>,
    },
    /// Optimizer state (a moment estimate, a momentum buffer), zero at the
    /// start. A leaf of the step graph.
    State,
    /// The new running statistic of a train-mode batch-norm: operands `x`
    /// and the running mean (or variance); `(1 - momentum) * running +
    /// momentum * batch_statistic`, the variance unbiased, as PyTorch.
    RunningStat {
        /// Weight of the batch statistic.
        momentum: f64,
        /// The variance (else the mean).
        variance: bool,
    },
    /// The fraction of exactly-zero elements of the operand: a monitor
    /// statistic (scalar).
    ZeroFraction,
    /// The fraction of units (elements of every axis but the first) that are
    /// zero for every row of the batch: dead ReLU units (scalar).
    DeadFraction,
}

/// Why an op cannot take its operands. `operand` indexes the offending
/// operand so that the caller can point at its source.
#[derive(Clone, Debug, PartialEq)]
pub enum TypeError {
    /// Wrong number of operands (a compiler bug if lowering made it).
    Arity {
        /// Operands expected.
        expected: usize,
        /// Operands given.
        found: usize,
    },
    /// Float operands of different widths.
    DtypeMismatch {
        /// The first operand's type.
        first: DType,
        /// The offending operand.
        operand: usize,
        /// Its type.
        found: DType,
    },
    /// An integer operand where a float is needed.
    NotFloat {
        /// The offending operand.
        operand: usize,
    },
    /// A float operand where labels or indices are needed.
    NotInteger {
        /// The offending operand.
        operand: usize,
        /// Its type.
        found: DType,
    },
    /// Shapes that neither broadcast nor match where they must.
    Shapes {
        /// What the rule needed, in words.
        what: String,
        /// The two operands involved.
        operands: (usize, usize),
    },
    /// Matrix product inner dimensions differ.
    Inner {
        /// The left operand's last dim.
        left: Dim,
        /// The right operand's first dim.
        right: Dim,
    },
    /// An operand has the wrong rank.
    Rank {
        /// The offending operand.
        operand: usize,
        /// Ranks accepted, in words.
        expected: &'static str,
        /// Its rank.
        found: usize,
    },
    /// An axis out of range.
    Axis {
        /// The axis.
        axis: usize,
        /// The operand's rank.
        rank: usize,
    },
    /// The result would have too many elements.
    Overflow,
    /// A reshape that changes the element count.
    Count {
        /// Elements before.
        from: Shape,
        /// Shape after.
        to: Shape,
    },
}

/// The hand-written kernels the JIT recognises ([`Op::Kernel`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KernelOp {
    /// Operands `logits [N, C], labels [N]`: the mean cross-entropy (a
    /// `cross_entropy` the JIT computes in one pass per row, beside its
    /// gradient's kernel when there is one).
    CrossEntropy,
    /// Operands `g, logits [N, C], labels [N], loss`: cross-entropy's
    /// gradient `(softmax(logits) - one_hot(labels)) * (g / N)` in one
    /// pass per row.
    CrossEntropyGradient,
}

impl Op {
    /// The op's name in the text IR.
    pub fn name(&self) -> String {
        match self {
            Op::Input => "input".into(),
            Op::Param(_) => "param".into(),
            Op::Buffer(_) => "buffer".into(),
            Op::Scan(_) => "scan".into(),
            Op::ScanResult { .. } => "scan_result".into(),
            Op::Constant(_) => "constant".into(),
            Op::Unary(f) => f.name().into(),
            Op::LeakyRelu { .. } => "leaky_relu".into(),
            Op::Clamp { .. } => "clamp".into(),
            Op::Binary(f) => f.name().into(),
            Op::MatMul | Op::MatMulT { .. } => "matmul".into(),
            Op::Transpose => "transpose".into(),
            Op::BatchMatMul { .. } => "batch_matmul".into(),
            Op::Permute { .. } => "permute".into(),
            Op::Iota => "arange".into(),
            Op::Triangle { upper: false, .. } => "tril".into(),
            Op::Triangle { upper: true, .. } => "triu".into(),
            Op::Reduce { func, .. } => func.name().into(),
            Op::Softmax { .. } => "softmax".into(),
            Op::LogSoftmax { .. } => "log_softmax".into(),
            Op::Reshape => "reshape".into(),
            Op::Concat { .. } => "concat".into(),
            Op::Slice { .. } => "slice".into(),
            Op::ScatterAdd => "scatter_add".into(),
            Op::Dropout { .. } => "dropout".into(),
            Op::BatchNorm { training: true, .. } => "batch_norm.train".into(),
            Op::BatchNorm {
                training: false, ..
            } => "batch_norm.eval".into(),
            Op::LayerNorm { .. } => "layer_norm".into(),
            Op::Embedding => "embedding".into(),
            Op::CrossEntropy => "cross_entropy".into(),
            Op::Mse => "mse".into(),
            Op::BceWithLogits => "bce_with_logits".into(),
            Op::StopGradient => "stop_gradient".into(),
            Op::Identity => "identity".into(),
            Op::Kernel(KernelOp::CrossEntropy) => "kernel.cross_entropy".into(),
            Op::Kernel(KernelOp::CrossEntropyGradient) => "kernel.cross_entropy_gradient".into(),
            Op::SumTo => "sum_to".into(),
            Op::Select => "select".into(),
            Op::Expand => "expand".into(),
            Op::OneHot => "one_hot".into(),
            Op::Count { .. } => "count".into(),
            Op::State => "state".into(),
            Op::RunningStat {
                variance: false, ..
            } => "running_mean".into(),
            Op::RunningStat { variance: true, .. } => "running_var".into(),
            Op::ZeroFraction => "zero_fraction".into(),
            Op::DeadFraction => "dead_fraction".into(),
        }
    }

    /// Attributes printed after the name, such as `axis=1`.
    pub(crate) fn attributes(&self) -> String {
        match self {
            Op::Param(init) | Op::Buffer(init) => format!("init={init}"),
            Op::Scan(scan) => scan.attributes(),
            Op::ScanResult { index } => format!("index={index}"),
            Op::Constant(c) => format!("{c:?}"),
            Op::LeakyRelu { slope } => format!("slope={slope:?}"),
            Op::Clamp { lo, hi } => format!("lo={lo:?} hi={hi:?}"),
            Op::Reduce { axes, keepdims, .. } => {
                let axes: Vec<String> = axes.iter().map(ToString::to_string).collect();
                format!("axes=[{}] keepdims={keepdims}", axes.join(", "))
            }
            Op::Count { axes } | Op::Permute { axes } => {
                let axes: Vec<String> = axes.iter().map(ToString::to_string).collect();
                format!("axes=[{}]", axes.join(", "))
            }
            Op::Softmax { axis } | Op::LogSoftmax { axis } | Op::Concat { axis } => {
                format!("axis={axis}")
            }
            Op::Dropout { p, key } => format!("p={p:?} key={key}"),
            Op::Slice {
                axis,
                start,
                from_end: false,
            } => format!("axis={axis} start={start}"),
            Op::Slice {
                axis,
                start,
                from_end: true,
            } => format!("axis={axis} start=-{}", start + 1),
            Op::Triangle { k, .. } => format!("k={k}"),
            Op::BatchNorm { eps, momentum, .. } => format!("eps={eps:?} momentum={momentum:?}"),
            Op::LayerNorm { eps } => format!("eps={eps:?}"),
            Op::Input
            | Op::Unary(_)
            | Op::Binary(_)
            | Op::MatMul
            | Op::Iota
            | Op::Transpose
            | Op::Reshape
            | Op::Embedding
            | Op::ScatterAdd
            | Op::Kernel(_)
            | Op::CrossEntropy
            | Op::Mse
            | Op::BceWithLogits
            | Op::StopGradient
            | Op::Identity
            | Op::SumTo
            | Op::Select
            | Op::Expand
            | Op::OneHot
            | Op::State
            | Op::ZeroFraction
            | Op::DeadFraction => String::new(),
            Op::RunningStat { momentum, .. } => format!("momentum={momentum:?}"),
            Op::MatMulT {
                transpose_a,
                transpose_b,
            }
            | Op::BatchMatMul {
                transpose_a,
                transpose_b,
            } => match (transpose_a, transpose_b) {
                (true, true) => "transpose_a transpose_b".into(),
                (true, false) => "transpose_a".into(),
                (false, true) => "transpose_b".into(),
                (false, false) => String::new(),
            },
        }
    }

    /// Whether the op is a leaf (takes no operands).
    pub fn is_leaf(&self) -> bool {
        matches!(
            self,
            Op::Input | Op::Param(_) | Op::Buffer(_) | Op::Constant(_) | Op::State
        )
    }

    /// The result type of the op applied to operands of these types.
    /// Leaves, `Reshape` and `SumTo` take their type from the node
    /// (`declared`); for the others `declared` is ignored.
    pub(crate) fn infer(&self, operands: &[&Type], declared: &Type) -> Result<Type, TypeError> {
        match self {
            Op::Input | Op::Param(_) | Op::Buffer(_) | Op::Constant(_) | Op::State => {
                arity(operands, 0)?;
                Ok(declared.clone())
            }
            Op::Scan(scan) => scan.infer(operands),
            Op::ScanResult { .. } => {
                arity(operands, 1)?;
                Ok(declared.clone())
            }
            Op::RunningStat { .. } => {
                arity(operands, 2)?;
                let dtype = same_float(operands)?;
                let x = &operands[0].shape;
                rank_in(x, 0, 2, usize::MAX, "at least 2")?;
                let channels = Shape(vec![x.0[1].clone()]);
                if operands[1].shape != channels {
                    return Err(TypeError::Shapes {
                        what: format!("shape {channels} (the channel axis 1 of the input)"),
                        operands: (0, 1),
                    });
                }
                Ok(Type::new(dtype, channels))
            }
            Op::ZeroFraction | Op::DeadFraction => {
                arity(operands, 1)?;
                float(operands, 0)?;
                Ok(Type::new(operands[0].dtype, Shape::scalar()))
            }
            Op::Unary(_) | Op::LeakyRelu { .. } | Op::Clamp { .. } | Op::Dropout { .. } => {
                arity(operands, 1)?;
                float(operands, 0)?;
                Ok(operands[0].clone())
            }
            Op::StopGradient | Op::Identity => {
                arity(operands, 1)?;
                Ok(operands[0].clone())
            }
            Op::Binary(_) => {
                arity(operands, 2)?;
                let dtype = same_float(operands)?;
                let shape = operands[0]
                    .shape
                    .broadcast(&operands[1].shape)
                    .ok_or_else(|| TypeError::Shapes {
                        what: "shapes that broadcast".into(),
                        operands: (0, 1),
                    })?;
                Ok(Type::new(dtype, shape))
            }
            Op::Select => {
                arity(operands, 3)?;
                let dtype = same_float(operands)?;
                let broadcast = |a: &Shape, b: &Shape, pair| {
                    a.broadcast(b).ok_or_else(|| TypeError::Shapes {
                        what: "shapes that broadcast".into(),
                        operands: pair,
                    })
                };
                let shape = broadcast(&operands[0].shape, &operands[1].shape, (0, 1))?;
                let shape = broadcast(&shape, &operands[2].shape, (1, 2))?;
                Ok(Type::new(dtype, shape))
            }
            Op::MatMul => {
                arity(operands, 2)?;
                let dtype = same_float(operands)?;
                let (a, b) = (&operands[0].shape, &operands[1].shape);
                rank_in(a, 0, 2, 3, "2 or 3")?;
                rank_in(b, 1, 2, 2, "2")?;
                let k_left = &a.0[a.rank() - 1];
                let k_right = &b.0[0];
                if k_left != k_right {
                    return Err(TypeError::Inner {
                        left: k_left.clone(),
                        right: k_right.clone(),
                    });
                }
                let mut dims = a.0[..a.rank() - 1].to_vec();
                dims.push(b.0[1].clone());
                Ok(Type::new(dtype, Shape(dims)))
            }
            Op::MatMulT {
                transpose_a,
                transpose_b,
            } => {
                arity(operands, 2)?;
                let swap = |t: &Type, yes: bool| -> Result<Type, TypeError> {
                    if !yes {
                        return Ok(t.clone());
                    }
                    Op::Transpose.infer(&[t], t)
                };
                if *transpose_a && !*transpose_b && operands[1].shape.rank() >= 3 {
                    return batch_summed_product(operands);
                }
                let (a, b) = (
                    swap(operands[0], *transpose_a)?,
                    swap(operands[1], *transpose_b)?,
                );
                Op::MatMul.infer(&[&a, &b], declared)
            }
            Op::BatchMatMul {
                transpose_a,
                transpose_b,
            } => {
                arity(operands, 2)?;
                let dtype = same_float(operands)?;
                rank_in(&operands[0].shape, 0, 2, usize::MAX, "at least 2")?;
                rank_in(&operands[1].shape, 1, 2, usize::MAX, "at least 2")?;
                let read = |s: &Shape, swapped: bool| {
                    let mut s = s.clone();
                    let r = s.rank();
                    if swapped {
                        s.0.swap(r - 1, r - 2);
                    }
                    s
                };
                let a = &read(&operands[0].shape, *transpose_a);
                let b = &read(&operands[1].shape, *transpose_b);
                let (k_left, k_right) = (&a.0[a.rank() - 1], &b.0[b.rank() - 2]);
                if k_left != k_right {
                    return Err(TypeError::Inner {
                        left: k_left.clone(),
                        right: k_right.clone(),
                    });
                }
                let leading = |s: &Shape| Shape(s.0[..s.rank() - 2].to_vec());
                let Some(batch) = leading(a).broadcast(&leading(b)) else {
                    return Err(TypeError::Shapes {
                        what: "leading (batch) axes that broadcast together".into(),
                        operands: (0, 1),
                    });
                };
                let mut dims = batch.0;
                dims.push(a.0[a.rank() - 2].clone());
                dims.push(b.0[b.rank() - 1].clone());
                let shape = Shape(dims);
                shape.element_count().ok_or(TypeError::Overflow)?;
                Ok(Type::new(dtype, shape))
            }
            Op::Iota => {
                arity(operands, 0)?;
                if declared.shape.rank() != 1 || !declared.dtype.is_float() {
                    return Err(TypeError::Shapes {
                        what: "one float axis".into(),
                        operands: (0, 0),
                    });
                }
                Ok(declared.clone())
            }
            Op::Triangle { .. } => {
                arity(operands, 1)?;
                float(operands, 0)?;
                rank_in(&operands[0].shape, 0, 2, usize::MAX, "at least 2")?;
                Ok(operands[0].clone())
            }
            Op::Permute { axes } => {
                arity(operands, 1)?;
                let shape = &operands[0].shape;
                let mut seen = axes.clone();
                seen.sort_unstable();
                if seen != (0..shape.rank()).collect::<Vec<_>>() {
                    return Err(TypeError::Shapes {
                        what: format!("a permutation of its {} axes", shape.rank()),
                        operands: (0, 0),
                    });
                }
                let dims = axes.iter().map(|&a| shape.0[a].clone()).collect();
                Ok(Type::new(operands[0].dtype, Shape(dims)))
            }
            Op::Transpose => {
                arity(operands, 1)?;
                let shape = &operands[0].shape;
                if shape.rank() < 2 {
                    return Err(TypeError::Rank {
                        operand: 0,
                        expected: "at least 2",
                        found: shape.rank(),
                    });
                }
                let mut dims = shape.0.clone();
                let n = dims.len();
                dims.swap(n - 1, n - 2);
                Ok(Type::new(operands[0].dtype, Shape(dims)))
            }
            Op::Reduce { axes, keepdims, .. } => {
                arity(operands, 1)?;
                float(operands, 0)?;
                let shape = &operands[0].shape;
                for &axis in axes {
                    check_axis(axis, shape)?;
                }
                let dims = shape
                    .0
                    .iter()
                    .enumerate()
                    .filter_map(|(i, d)| match (axes.contains(&i), keepdims) {
                        (false, _) => Some(d.clone()),
                        (true, true) => Some(Dim::Fixed(1)),
                        (true, false) => None,
                    })
                    .collect();
                Ok(Type::new(operands[0].dtype, Shape(dims)))
            }
            Op::Softmax { axis } | Op::LogSoftmax { axis } => {
                arity(operands, 1)?;
                float(operands, 0)?;
                check_axis(*axis, &operands[0].shape)?;
                Ok(operands[0].clone())
            }
            Op::Reshape => {
                arity(operands, 1)?;
                let from = &operands[0].shape;
                let counts = (from.element_count(), declared.shape.element_count());
                match counts {
                    (Some(a), Some(b)) if a == b => {
                        Ok(Type::new(operands[0].dtype, declared.shape.clone()))
                    }
                    (_, None) => Err(TypeError::Overflow),
                    _ => Err(TypeError::Count {
                        from: from.clone(),
                        to: declared.shape.clone(),
                    }),
                }
            }
            Op::Concat { axis } => {
                if operands.is_empty() {
                    return Err(TypeError::Arity {
                        expected: 1,
                        found: 0,
                    });
                }
                let first = operands[0];
                check_axis(*axis, &first.shape)?;
                let mut total = 0u64;
                for (i, operand) in operands.iter().enumerate() {
                    if operand.dtype != first.dtype {
                        return Err(TypeError::DtypeMismatch {
                            first: first.dtype,
                            operand: i,
                            found: operand.dtype,
                        });
                    }
                    let same_rank = operand.shape.rank() == first.shape.rank();
                    let others_agree = same_rank
                        && (0..first.shape.rank())
                            .all(|d| d == *axis || operand.shape.0[d] == first.shape.0[d]);
                    if !others_agree {
                        return Err(TypeError::Shapes {
                            what: format!("equal shapes except along axis {axis}"),
                            operands: (0, i),
                        });
                    }
                    match &operand.shape.0[*axis] {
                        Dim::Fixed(n) => {
                            total = total.checked_add(*n).ok_or(TypeError::Overflow)?
                        }
                        Dim::Sym(_) => {
                            return Err(TypeError::Shapes {
                                what: format!("a fixed size along the concatenated axis {axis}"),
                                operands: (0, i),
                            });
                        }
                    }
                }
                let mut dims = first.shape.0.clone();
                dims[*axis] = Dim::Fixed(total);
                let shape = Shape(dims);
                shape.element_count().ok_or(TypeError::Overflow)?;
                Ok(Type::new(first.dtype, shape))
            }
            Op::Slice { axis, start, .. } => {
                arity(operands, 1)?;
                let from = &operands[0].shape;
                check_axis(*axis, from)?;
                let fits = declared.shape.rank() == from.rank()
                    && (0..from.rank()).all(|d| d == *axis || declared.shape.0[d] == from.0[d])
                    && match (&from.0[*axis], &declared.shape.0[*axis]) {
                        (Dim::Fixed(total), Dim::Fixed(n)) => {
                            start.checked_add(*n).is_some_and(|end| end <= *total)
                        }
                        // One position of a symbolic axis, checked at run time.
                        (Dim::Sym(_), Dim::Fixed(1)) => true,
                        _ => false,
                    };
                if !fits {
                    return Err(TypeError::Shapes {
                        what: format!(
                            "a fixed size along axis {axis} of which {} from {start} fits",
                            declared.shape
                        ),
                        operands: (0, 0),
                    });
                }
                Ok(Type::new(operands[0].dtype, declared.shape.clone()))
            }
            Op::ScatterAdd => {
                arity(operands, 2)?;
                integer(operands, 0)?;
                float(operands, 1)?;
                let (ids, rows) = (&operands[0].shape, &operands[1].shape);
                let table = &declared.shape;
                let fits = table.rank() == 2
                    && rows.rank() == ids.rank() + 1
                    && rows.0[..ids.rank()] == ids.0[..]
                    && rows.0.last() == table.0.last()
                    && matches!(table.0[0], Dim::Fixed(_));
                if !fits {
                    return Err(TypeError::Shapes {
                        what: format!("rows of the ids' shape and a [V, D] table, not {table}"),
                        operands: (0, 1),
                    });
                }
                Ok(Type::new(operands[1].dtype, table.clone()))
            }
            Op::BatchNorm { .. } => {
                arity(operands, 5)?;
                let dtype = same_float(operands)?;
                let x = &operands[0].shape;
                rank_in(x, 0, 2, usize::MAX, "at least 2")?;
                let channels = Shape(vec![x.0[1].clone()]);
                for (i, operand) in operands.iter().enumerate().skip(1) {
                    if operand.shape != channels {
                        return Err(TypeError::Shapes {
                            what: format!("shape {channels} (the channel axis 1 of the input)"),
                            operands: (0, i),
                        });
                    }
                }
                Ok(Type::new(dtype, x.clone()))
            }
            Op::LayerNorm { .. } => {
                arity(operands, 3)?;
                let dtype = same_float(operands)?;
                let x = &operands[0].shape;
                rank_in(x, 0, 1, usize::MAX, "at least 1")?;
                let features = Shape(vec![x.0[x.rank() - 1].clone()]);
                for (i, operand) in operands.iter().enumerate().skip(1) {
                    if operand.shape != features {
                        return Err(TypeError::Shapes {
                            what: format!("shape {features} (the last axis of the input)"),
                            operands: (0, i),
                        });
                    }
                }
                Ok(Type::new(dtype, x.clone()))
            }
            Op::Embedding => {
                arity(operands, 2)?;
                integer(operands, 0)?;
                float(operands, 1)?;
                let table = &operands[1].shape;
                rank_in(table, 1, 2, 2, "2")?;
                let mut dims = operands[0].shape.0.clone();
                dims.push(table.0[1].clone());
                let shape = Shape(dims);
                shape.element_count().ok_or(TypeError::Overflow)?;
                Ok(Type::new(operands[1].dtype, shape))
            }
            Op::CrossEntropy | Op::Kernel(KernelOp::CrossEntropy) => {
                arity(operands, 2)?;
                float(operands, 0)?;
                integer(operands, 1)?;
                let (logits, labels) = (&operands[0].shape, &operands[1].shape);
                rank_in(logits, 0, 2, 2, "2 ([batch, classes])")?;
                rank_in(labels, 1, 1, 1, "1 ([batch])")?;
                if logits.0[0] != labels.0[0] {
                    return Err(TypeError::Shapes {
                        what: "the same batch size".into(),
                        operands: (0, 1),
                    });
                }
                Ok(Type::new(operands[0].dtype, Shape::scalar()))
            }
            Op::Kernel(KernelOp::CrossEntropyGradient) => {
                arity(operands, 4)?;
                Ok(operands[1].clone())
            }
            Op::SumTo => {
                arity(operands, 1)?;
                match declared.shape.broadcast(&operands[0].shape) {
                    Some(shape) if shape == operands[0].shape => {
                        Ok(Type::new(operands[0].dtype, declared.shape.clone()))
                    }
                    _ => Err(TypeError::Shapes {
                        what: format!("a shape that broadcasts to it, not {}", declared.shape),
                        operands: (0, 0),
                    }),
                }
            }
            Op::Expand => {
                arity(operands, 1)?;
                match operands[0].shape.broadcast(&declared.shape) {
                    Some(shape) if shape == declared.shape => {
                        Ok(Type::new(operands[0].dtype, declared.shape.clone()))
                    }
                    _ => Err(TypeError::Shapes {
                        what: format!("a shape that broadcasts to {}", declared.shape),
                        operands: (0, 0),
                    }),
                }
            }
            Op::OneHot => {
                arity(operands, 1)?;
                integer(operands, 0)?;
                let labels = &operands[0].shape;
                let fits = declared.dtype.is_float()
                    && declared.shape.rank() == labels.rank() + 1
                    && declared.shape.0[..labels.rank()] == labels.0[..];
                if !fits {
                    return Err(TypeError::Shapes {
                        what: format!("the labels' shape {labels} and a class axis"),
                        operands: (0, 0),
                    });
                }
                Ok(declared.clone())
            }
            Op::Count { axes } => {
                arity(operands, 1)?;
                for &axis in axes {
                    check_axis(axis, &operands[0].shape)?;
                }
                if !declared.dtype.is_float() {
                    return Err(TypeError::NotFloat { operand: 0 });
                }
                Ok(Type::new(declared.dtype, Shape::scalar()))
            }
            Op::Mse | Op::BceWithLogits => {
                arity(operands, 2)?;
                let dtype = same_float(operands)?;
                if operands[0].shape != operands[1].shape {
                    return Err(TypeError::Shapes {
                        what: "equal shapes (no broadcasting in losses)".into(),
                        operands: (0, 1),
                    });
                }
                Ok(Type::new(dtype, Shape::scalar()))
            }
        }
    }
}

/// `sum_b a[b]^T @ c[b]` for `a: [..., M, K]` and `c: [..., M, N]` with the
/// same leading axes: `[K, N]`.
fn batch_summed_product(operands: &[&Type]) -> Result<Type, TypeError> {
    let dtype = same_float(operands)?;
    let (a, c) = (&operands[0].shape, &operands[1].shape);
    rank_in(a, 0, c.rank(), c.rank(), "the right operand's")?;
    let rank = a.rank();
    if a.0[..rank - 1] != c.0[..rank - 1] {
        return Err(TypeError::Shapes {
            what: "the same leading axes and rows".into(),
            operands: (0, 1),
        });
    }
    Ok(Type::new(
        dtype,
        Shape(vec![a.0[rank - 1].clone(), c.0[rank - 1].clone()]),
    ))
}

fn arity(operands: &[&Type], expected: usize) -> Result<(), TypeError> {
    if operands.len() == expected {
        Ok(())
    } else {
        Err(TypeError::Arity {
            expected,
            found: operands.len(),
        })
    }
}

fn float(operands: &[&Type], i: usize) -> Result<(), TypeError> {
    if operands[i].dtype.is_float() {
        Ok(())
    } else {
        Err(TypeError::NotFloat { operand: i })
    }
}

fn integer(operands: &[&Type], i: usize) -> Result<(), TypeError> {
    if operands[i].dtype == DType::I32 {
        Ok(())
    } else {
        Err(TypeError::NotInteger {
            operand: i,
            found: operands[i].dtype,
        })
    }
}

/// All operands float and of one width; returns it.
fn same_float(operands: &[&Type]) -> Result<DType, TypeError> {
    for i in 0..operands.len() {
        float(operands, i)?;
    }
    let first = operands[0].dtype;
    match operands.iter().position(|t| t.dtype != first) {
        Some(i) => Err(TypeError::DtypeMismatch {
            first,
            operand: i,
            found: operands[i].dtype,
        }),
        None => Ok(first),
    }
}

fn rank_in(
    shape: &Shape,
    operand: usize,
    lo: usize,
    hi: usize,
    expected: &'static str,
) -> Result<(), TypeError> {
    if (lo..=hi).contains(&shape.rank()) {
        Ok(())
    } else {
        Err(TypeError::Rank {
            operand,
            expected,
            found: shape.rank(),
        })
    }
}

fn check_axis(axis: usize, shape: &Shape) -> Result<(), TypeError> {
    if axis < shape.rank() {
        Ok(())
    } else {
        Err(TypeError::Axis {
            axis,
            rank: shape.rank(),
        })
    }
}
