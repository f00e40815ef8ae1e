//! Derivative kernels of the reference interpreter: for each op and
//! operand, the vector-Jacobian product `g -> g . d(out)/d(operand)`,
//! beside the forward kernels in [`super::kernels`]. `docs/autodiff.md`
//! lists the formulas; every one is checked against central finite
//! differences in `f64` by `tests/gradients.rs`.
//!
//! For elementwise binary ops the result has the broadcast shape; the
//! graph's `sum_to` node then sums it back over the broadcast axes.

use super::InterpError;
use super::kernels::{self, channels, group_moments, rows, sigmoid};
use super::tensor::{Tensor, broadcast_map, reduce_map};
use crate::ir::{BinaryFn, Op, ReduceFn, UnaryFn};

/// The gradient of operand `operand` of `op`, given the upstream gradient
/// `g`, the forward operands and the forward output.
pub fn vjp(
    op: &Op,
    operand: usize,
    g: &Tensor,
    inputs: &[&Tensor],
    output: &Tensor,
    out_shape: &[usize],
) -> Result<Vec<f64>, InterpError> {
    let x = inputs[0];
    let elementwise = |f: &dyn Fn(f64, f64, f64) -> f64| -> Vec<f64> {
        g.data
            .iter()
            .zip(&x.data)
            .zip(&output.data)
            .map(|((&g, &x), &y)| f(g, x, y))
            .collect()
    };
    Ok(match op {
        Op::Unary(f) => match f {
            UnaryFn::Abs => elementwise(&|g, x, _| g * sign(x)),
            // y > 0 exactly when x > 0: reading the output lets the forward
            // pre-activation go (PyTorch's threshold_backward does the same).
            UnaryFn::Relu => elementwise(&|g, _, y| if y > 0.0 { g } else { 0.0 }),
            UnaryFn::Gelu => elementwise(&|g, x, _| g * kernels::gelu_derivative(x)),
            UnaryFn::Softplus => elementwise(&|g, x, _| if x > 20.0 { g } else { g * sigmoid(x) }),
            UnaryFn::Neg
            | UnaryFn::Exp
            | UnaryFn::Log
            | UnaryFn::Sqrt
            | UnaryFn::Tanh
            | UnaryFn::Sigmoid
            | UnaryFn::Sin
            | UnaryFn::Cos => return Err(graph_rule(op)),
        },
        Op::LeakyRelu { slope } => elementwise(&|g, x, _| if x > 0.0 { g } else { g * slope }),
        // PyTorch passes the gradient where `lo <= x <= hi`, bounds included.
        Op::Clamp { lo, hi } => elementwise(&|g, x, _| if x >= *lo && x <= *hi { g } else { 0.0 }),
        Op::Binary(BinaryFn::Add | BinaryFn::Sub | BinaryFn::Mul | BinaryFn::Div)
        | Op::Transpose
        | Op::Reshape
        | Op::MatMul
        | Op::Reduce {
            func: ReduceFn::Sum | ReduceFn::Mean | ReduceFn::LogSumExp,
            ..
        }
        | Op::Softmax { .. }
        | Op::LogSoftmax { .. }
        | Op::Dropout { .. }
        | Op::CrossEntropy
        | Op::Mse
        | Op::BceWithLogits => return Err(graph_rule(op)),
        Op::Binary(f) => binary(*f, operand, g, inputs[0], inputs[1], output, out_shape)?,
        Op::Reduce {
            func: ReduceFn::Max,
            axes,
            ..
        } => {
            let (map, kept) = reduce_map(&x.shape, axes);
            let groups: usize = kept.iter().product();
            // Like `torch.amax`: ties share the gradient evenly. `output`
            // and `g` have one element per group, whatever keepdims.
            let mut ties = vec![0.0; groups];
            for (i, &v) in x.data.iter().enumerate() {
                if v == output.data[map[i]] {
                    ties[map[i]] += 1.0;
                }
            }
            x.data
                .iter()
                .enumerate()
                .map(|(i, &v)| {
                    if v == output.data[map[i]] {
                        g.data[map[i]] / ties[map[i]]
                    } else {
                        0.0
                    }
                })
                .collect()
        }
        Op::Identity => g.data.clone(),
        Op::Concat { axis } => {
            let outer: usize = g.shape[..*axis].iter().product();
            let inner: usize = g.shape[axis + 1..].iter().product();
            let before: usize = inputs[..operand].iter().map(|t| t.shape[*axis]).sum();
            let width = inputs[operand].shape[*axis];
            let total = g.shape[*axis];
            let mut out = Vec::with_capacity(inputs[operand].len());
            for o in 0..outer {
                let start = (o * total + before) * inner;
                out.extend_from_slice(&g.data[start..start + width * inner]);
            }
            out
        }
        Op::BatchNorm { eps, training, .. } => {
            let (channel, c, per) = channels(&x.shape);
            let (gamma, mean, var) = (inputs[1], inputs[3], inputs[4]);
            let (mean, var) = if *training {
                group_moments(&x.data, &channel, c)
            } else {
                (mean.data.clone(), var.data.clone())
            };
            normalization_vjp(
                operand,
                g,
                x,
                gamma,
                &channel,
                c,
                per,
                &mean,
                &var,
                *eps,
                *training,
                |i| channel[i],
            )
        }
        Op::LayerNorm { eps } => {
            let (row, n, d) = rows(&x.shape);
            let (mean, var) = group_moments(&x.data, &row, n);
            // Statistics per row, affine per feature: gamma's index is i % d.
            normalization_vjp(
                operand,
                g,
                x,
                inputs[1],
                &row,
                n,
                d,
                &mean,
                &var,
                *eps,
                true,
                |i| i % d,
            )
        }
        Op::Embedding => {
            let table = inputs[1];
            let d = table.shape[1];
            let mut out = vec![0.0; table.len()];
            for (j, &id) in x.data.iter().enumerate() {
                let row = id as usize;
                for k in 0..d {
                    out[row * d + k] += g.data[j * d + k];
                }
            }
            out
        }
        Op::Input
        | Op::Param(_)
        | Op::Buffer(_)
        | Op::Constant(_)
        | Op::StopGradient
        | Op::Vjp { .. }
        | Op::MatMulT { .. }
        | Op::SumTo
        | Op::Expand
        | Op::OneHot
        | Op::Count { .. }
        | Op::State
        | Op::RunningStat { .. }
        | Op::ZeroFraction
        | Op::DeadFraction => {
            return Err(InterpError::Internal(format!(
                "no derivative kernel for `{}`",
                op.name()
            )));
        }
    })
}

fn sign(x: f64) -> f64 {
    if x > 0.0 {
        1.0
    } else if x < 0.0 {
        -1.0
    } else {
        0.0
    }
}

/// Elementwise binary VJPs, in the broadcast output shape.
fn binary(
    f: BinaryFn,
    operand: usize,
    g: &Tensor,
    a: &Tensor,
    b: &Tensor,
    y: &Tensor,
    out_shape: &[usize],
) -> Result<Vec<f64>, InterpError> {
    if matches!(
        f,
        BinaryFn::Add | BinaryFn::Sub | BinaryFn::Mul | BinaryFn::Div
    ) {
        return Err(graph_rule(&Op::Binary(f)));
    }
    let ma = broadcast_map(&a.shape, out_shape);
    let mb = broadcast_map(&b.shape, out_shape);
    Ok((0..g.len())
        .map(|i| {
            let (g, a, b, y) = (g.data[i], a.data[ma[i]], b.data[mb[i]], y.data[i]);
            match (f, operand) {
                // (Checked above: graph rules.)
                (BinaryFn::Add | BinaryFn::Sub | BinaryFn::Mul | BinaryFn::Div, _) => f64::NAN,
                // d(a^b)/da = b a^(b-1); PyTorch gives 0 where b == 0.
                (BinaryFn::Pow, 0) => {
                    if b == 0.0 {
                        0.0
                    } else {
                        g * b * a.powf(b - 1.0)
                    }
                }
                // d(a^b)/db = a^b ln a; PyTorch gives 0 where a == 0 and b >= 0.
                (BinaryFn::Pow, _) => {
                    if a == 0.0 && b >= 0.0 {
                        0.0
                    } else {
                        g * y * a.ln()
                    }
                }
                // Ties share the gradient evenly, as in PyTorch.
                (BinaryFn::Maximum, 0) | (BinaryFn::Minimum, 1) => share(g, a, b),
                (BinaryFn::Maximum, _) | (BinaryFn::Minimum, _) => share(g, b, a),
            }
        })
        .collect())
}

/// The error for an op whose gradient is a graph rule
/// (`autodiff::rules::gradient`): it never has a VJP node.
fn graph_rule(op: &Op) -> InterpError {
    InterpError::Internal(format!(
        "`{}` is differentiated by a graph rule, not a VJP",
        op.name()
    ))
}

/// The gradient of `max(mine, other)` (or `min` with the roles swapped)
/// with respect to `mine`.
fn share(g: f64, mine: f64, other: f64) -> f64 {
    if mine > other {
        g
    } else if mine == other {
        g / 2.0
    } else {
        0.0
    }
}

/// The VJPs of a normalization `y = (x - mean) / sqrt(var + eps) * gamma +
/// beta` with statistics per group (`group[i]`, `groups` of `count`
/// elements) and the affine parameters indexed by `affine(i)`.
/// `batch_stats` says whether the statistics are computed from `x` (train
/// batch-norm, layer-norm) or constants (eval batch-norm).
fn normalization_vjp(
    operand: usize,
    g: &Tensor,
    x: &Tensor,
    gamma: &Tensor,
    group: &[usize],
    groups: usize,
    count: usize,
    mean: &[f64],
    var: &[f64],
    eps: f64,
    batch_stats: bool,
    affine: impl Fn(usize) -> usize,
) -> Vec<f64> {
    let rstd: Vec<f64> = var.iter().map(|v| 1.0 / (v + eps).sqrt()).collect();
    let xhat: Vec<f64> = x
        .data
        .iter()
        .enumerate()
        .map(|(i, &v)| (v - mean[group[i]]) * rstd[group[i]])
        .collect();
    match operand {
        0 => {
            let dxhat: Vec<f64> = g
                .data
                .iter()
                .enumerate()
                .map(|(i, &g)| g * gamma.data[affine(i)])
                .collect();
            if !batch_stats {
                return dxhat
                    .iter()
                    .enumerate()
                    .map(|(i, &d)| d * rstd[group[i]])
                    .collect();
            }
            let mut sum = vec![0.0; groups];
            let mut dot = vec![0.0; groups];
            for (i, &d) in dxhat.iter().enumerate() {
                sum[group[i]] += d;
                dot[group[i]] += d * xhat[i];
            }
            let n = count as f64;
            dxhat
                .iter()
                .enumerate()
                .map(|(i, &d)| {
                    let k = group[i];
                    rstd[k] / n * (n * d - sum[k] - xhat[i] * dot[k])
                })
                .collect()
        }
        1 | 2 => {
            let mut out = vec![0.0; gamma.len()];
            for (i, &gi) in g.data.iter().enumerate() {
                out[affine(i)] += if operand == 1 { gi * xhat[i] } else { gi };
            }
            out
        }
        _ => vec![0.0; x.len()],
    }
}
