//! Derivative kernels of the reference interpreter: for each op and
//! operand, the vector-Jacobian product `g -> g . d(out)/d(operand)`,
//! beside the forward kernels in [`super::kernels`]. `docs/autodiff.md`
//! lists the formulas; every one is checked against central finite
//! differences in `f64` by `tests/gradients.rs`.
//!
//! For elementwise binary ops the result has the broadcast shape; the
//! graph's `sum_to` node then sums it back over the broadcast axes.

use super::InterpError;
use super::kernels::{channels, group_moments, rows};
use super::tensor::Tensor;
use crate::ir::Op;

/// The gradient of operand `operand` of `op`, given the upstream gradient
/// `g`, the forward operands and the forward output.
pub fn vjp(
    op: &Op,
    operand: usize,
    g: &Tensor,
    inputs: &[&Tensor],
) -> Result<Vec<f64>, InterpError> {
    let x = inputs[0];
    Ok(match op {
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
        _ => return Err(graph_rule(op)),
    })
}

/// The error for an op whose gradient is a graph rule
/// (`autodiff::rules::gradient`): it never has a VJP node.
fn graph_rule(op: &Op) -> InterpError {
    InterpError::Internal(format!(
        "`{}` is differentiated by a graph rule, not a VJP",
        op.name()
    ))
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
