//! The derivative rule table: for every [`Op`] and operand, how the
//! gradient flows back, and the `grad_fn` name PyTorch gives the rule.
//!
//! This is only the *shape* of each rule (which operands get a gradient and
//! through what). What each vector-Jacobian product computes is written
//! beside the forward kernels of the reference interpreter
//! (`interp::vjp`), one arm per op, and `docs/autodiff.md` lists the
//! formulas. Both are exhaustive `match`es: a new op does not compile until
//! it has a rule here and a kernel there.

use crate::ir::{BinaryFn, Op, ReduceFn, UnaryFn};

/// How the gradient of one operand of an op is obtained.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Rule {
    /// A `Vjp` node computes it.
    Vjp,
    /// The upstream gradient itself (`identity`).
    PassThrough,
    /// `stop_gradient`: the operand is a constant to the backward pass.
    Stopped,
    /// The operand has no derivative (labels, indices, running statistics).
    NotDifferentiable,
    /// No rule exists: differentiating through this op is a compiler error.
    Missing,
}

/// The rule for operand `operand` of `op`.
pub fn rule(op: &Op, operand: usize) -> Rule {
    match op {
        Op::Input | Op::Param(_) | Op::Buffer(_) | Op::Constant(_) => Rule::Missing,
        Op::Unary(_)
        | Op::LeakyRelu { .. }
        | Op::Clamp { .. }
        | Op::Binary(_)
        | Op::MatMul
        | Op::Transpose
        | Op::Reduce { .. }
        | Op::Softmax { .. }
        | Op::LogSoftmax { .. }
        | Op::Reshape
        | Op::Concat { .. }
        | Op::Dropout { .. }
        | Op::LayerNorm { .. }
        | Op::Mse
        | Op::BceWithLogits => Rule::Vjp,
        // Running mean and variance (operands 3 and 4) are state, not inputs
        // of the function being differentiated.
        Op::BatchNorm { .. } if operand < 3 => Rule::Vjp,
        Op::BatchNorm { .. } => Rule::NotDifferentiable,
        Op::Embedding if operand == 0 => Rule::NotDifferentiable,
        Op::Embedding => Rule::Vjp,
        Op::CrossEntropy if operand == 1 => Rule::NotDifferentiable,
        Op::CrossEntropy => Rule::Vjp,
        Op::StopGradient => Rule::Stopped,
        Op::Identity => Rule::PassThrough,
        // The backward graph is not differentiated again.
        Op::Vjp { .. } | Op::SumTo | Op::MatMulT { .. } => Rule::Missing,
        // Step-graph and monitor ops come after differentiation.
        Op::State | Op::RunningStat { .. } | Op::ZeroFraction | Op::DeadFraction => {
            Rule::NotDifferentiable
        }
    }
}

/// The `grad_fn` name of the rule that differentiates `op`, as PyTorch
/// prints it (`MatMulBackward`, `ReluBackward`, ...).
pub fn grad_fn(op: &Op) -> &'static str {
    match op {
        Op::Input | Op::Param(_) | Op::Buffer(_) | Op::Constant(_) => "AccumulateGrad",
        Op::Unary(f) => match f {
            UnaryFn::Neg => "NegBackward",
            UnaryFn::Exp => "ExpBackward",
            UnaryFn::Log => "LogBackward",
            UnaryFn::Sqrt => "SqrtBackward",
            UnaryFn::Abs => "AbsBackward",
            UnaryFn::Tanh => "TanhBackward",
            UnaryFn::Sigmoid => "SigmoidBackward",
            UnaryFn::Relu => "ReluBackward",
            UnaryFn::Gelu => "GeluBackward",
            UnaryFn::Softplus => "SoftplusBackward",
            UnaryFn::Sin => "SinBackward",
            UnaryFn::Cos => "CosBackward",
        },
        Op::LeakyRelu { .. } => "LeakyReluBackward",
        Op::Clamp { .. } => "ClampBackward",
        Op::Binary(f) => match f {
            BinaryFn::Add => "AddBackward",
            BinaryFn::Sub => "SubBackward",
            BinaryFn::Mul => "MulBackward",
            BinaryFn::Div => "DivBackward",
            BinaryFn::Pow => "PowBackward",
            BinaryFn::Maximum => "MaximumBackward",
            BinaryFn::Minimum => "MinimumBackward",
        },
        Op::MatMul => "MatMulBackward",
        Op::Transpose => "TransposeBackward",
        Op::Reduce { func, .. } => match func {
            ReduceFn::Sum => "SumBackward",
            ReduceFn::Mean => "MeanBackward",
            ReduceFn::Max => "AmaxBackward",
            ReduceFn::LogSumExp => "LogsumexpBackward",
        },
        Op::Softmax { .. } => "SoftmaxBackward",
        Op::LogSoftmax { .. } => "LogSoftmaxBackward",
        Op::Reshape => "ReshapeBackward",
        Op::Concat { .. } => "CatBackward",
        Op::Dropout { .. } => "DropoutBackward",
        Op::BatchNorm { .. } => "BatchNormBackward",
        Op::LayerNorm { .. } => "LayerNormBackward",
        Op::Embedding => "EmbeddingBackward",
        Op::CrossEntropy => "CrossEntropyBackward",
        Op::Mse => "MseLossBackward",
        Op::BceWithLogits => "BinaryCrossEntropyWithLogitsBackward",
        Op::StopGradient => "DetachBackward",
        Op::Identity => "IdentityBackward",
        Op::Vjp { .. }
        | Op::SumTo
        | Op::MatMulT { .. }
        | Op::State
        | Op::RunningStat { .. }
        | Op::ZeroFraction
        | Op::DeadFraction => "NoBackward",
    }
}

/// Which values a vector-Jacobian product reads: PyTorch's "saved
/// tensors". Positions index the `Vjp` node's operands: 0 is the upstream
/// gradient, `1..=n` the forward operands, `n + 1` the forward output.
pub fn saved(op: &Op, operand: usize, arity: usize) -> Vec<usize> {
    let output = arity + 1;
    let input = |i: usize| i + 1;
    let mut reads = vec![0];
    match op {
        Op::Unary(f) => reads.push(match f {
            UnaryFn::Neg => return reads,
            UnaryFn::Exp | UnaryFn::Sqrt | UnaryFn::Tanh | UnaryFn::Sigmoid | UnaryFn::Relu => {
                output
            }
            _ => input(0),
        }),
        Op::LeakyRelu { .. } | Op::Clamp { .. } => reads.push(input(0)),
        Op::Binary(BinaryFn::Add | BinaryFn::Sub)
        | Op::Identity
        | Op::Reshape
        | Op::Transpose
        | Op::Dropout { .. } => {}
        Op::Binary(BinaryFn::Mul) => reads.push(input(1 - operand.min(1))),
        Op::Binary(BinaryFn::Div) if operand == 0 => reads.push(input(1)),
        Op::Binary(BinaryFn::Pow) if operand == 1 => reads.extend([input(0), input(1), output]),
        Op::Binary(_) => reads.extend([input(0), input(1)]),
        Op::MatMul => reads.push(input(1 - operand.min(1))),
        Op::Reduce {
            func: ReduceFn::Sum | ReduceFn::Mean,
            ..
        } => reads.push(input(0)),
        Op::Reduce { .. } => reads.extend([input(0), output]),
        Op::Softmax { .. } | Op::LogSoftmax { .. } => reads.extend([input(0), output]),
        Op::Concat { .. } => reads.extend((0..arity).map(input)),
        Op::BatchNorm { .. } => reads.extend((0..arity).map(input)),
        Op::LayerNorm { .. } => reads.extend([input(0), input(1)]),
        Op::Embedding | Op::CrossEntropy | Op::Mse | Op::BceWithLogits => {
            reads.extend([input(0), input(1)])
        }
        _ => reads.extend((1..=output).collect::<Vec<_>>()),
    }
    reads
}
