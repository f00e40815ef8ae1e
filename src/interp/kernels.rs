//! Forward kernels of the reference interpreter: one plain function per op,
//! written for clarity, not speed. Each computes in `f64`; the caller rounds
//! to the node's element type. The semantics are PyTorch's (see
//! `docs/language.md`). There are no derivative kernels: gradients are
//! graphs of these ops (`autodiff::rules`).

use super::InterpError;
use super::tensor::{Tensor, broadcast_map, reduce_map};
use crate::ir::{BinaryFn, ReduceFn, UnaryFn};
use crate::random::uniform_at;

/// A unary function's value.
pub fn unary(f: UnaryFn, x: f64) -> f64 {
    match f {
        UnaryFn::Neg => -x,
        UnaryFn::Exp => x.exp(),
        UnaryFn::Log => x.ln(),
        UnaryFn::Sqrt => x.sqrt(),
        UnaryFn::Abs => x.abs(),
        UnaryFn::Tanh => x.tanh(),
        UnaryFn::Sigmoid => sigmoid(x),
        // NaN stays NaN (as in PyTorch and JAX), so divergence is seen.
        UnaryFn::Relu => {
            if x > 0.0 || x.is_nan() {
                x
            } else {
                0.0
            }
        }
        UnaryFn::Gelu => 0.5 * x * (1.0 + libm::erf(x / std::f64::consts::SQRT_2)),
        UnaryFn::Erf => libm::erf(x),
        UnaryFn::Softplus => softplus(x),
        UnaryFn::Sin => x.sin(),
        UnaryFn::Cos => x.cos(),
    }
}

/// The logistic function, stable for large `|x|`.
pub fn sigmoid(x: f64) -> f64 {
    if x >= 0.0 {
        1.0 / (1.0 + (-x).exp())
    } else {
        let e = x.exp();
        e / (1.0 + e)
    }
}

/// PyTorch's `softplus` with `beta = 1, threshold = 20`: the identity above
/// the threshold.
pub fn softplus(x: f64) -> f64 {
    if x > 20.0 { x } else { x.exp().ln_1p() }
}

/// A binary function's value.
pub fn binary(f: BinaryFn, a: f64, b: f64) -> f64 {
    match f {
        BinaryFn::Add => a + b,
        BinaryFn::Sub => a - b,
        BinaryFn::Mul => a * b,
        BinaryFn::Div => a / b,
        BinaryFn::Pow => a.powf(b),
        BinaryFn::Maximum => {
            if a.is_nan() || b.is_nan() {
                f64::NAN
            } else {
                a.max(b)
            }
        }
        BinaryFn::Minimum => {
            if a.is_nan() || b.is_nan() {
                f64::NAN
            } else {
                a.min(b)
            }
        }
        BinaryFn::Greater => mask(a > b),
        BinaryFn::GreaterEqual => mask(a >= b),
        BinaryFn::Less => mask(a < b),
        BinaryFn::LessEqual => mask(a <= b),
        BinaryFn::Equal => mask(a == b),
        BinaryFn::NotEqual => mask(a != b),
    }
}

/// A comparison's value: 1 or 0.
fn mask(holds: bool) -> f64 {
    if holds { 1.0 } else { 0.0 }
}

/// `select(mask, a, b)` with the three broadcast to `shape`.
pub(crate) fn select(mask: &Tensor, a: &Tensor, b: &Tensor, shape: &[usize]) -> Vec<f64> {
    let (mm, ma, mb) = (
        broadcast_map(&mask.shape, shape),
        broadcast_map(&a.shape, shape),
        broadcast_map(&b.shape, shape),
    );
    (0..mm.len())
        .map(|i| {
            if mask.data[mm[i]] != 0.0 {
                a.data[ma[i]]
            } else {
                b.data[mb[i]]
            }
        })
        .collect()
}

/// Applies an elementwise binary function with broadcasting.
pub(crate) fn broadcast_binary(
    a: &Tensor,
    b: &Tensor,
    out_shape: &[usize],
    f: impl Fn(f64, f64) -> f64,
) -> Vec<f64> {
    let ma = broadcast_map(&a.shape, out_shape);
    let mb = broadcast_map(&b.shape, out_shape);
    ma.iter()
        .zip(&mb)
        .map(|(&i, &j)| f(a.data[i], b.data[j]))
        .collect()
}

/// `a @ b`: `[M, K] @ [K, N]` or `[B, M, K] @ [K, N]`.
pub fn matmul(a: &[f64], a_shape: &[usize], b: &[f64], b_shape: &[usize]) -> Vec<f64> {
    let (m, k) = (a_shape[a_shape.len() - 2], a_shape[a_shape.len() - 1]);
    let n = b_shape[1];
    let batch: usize = a_shape[..a_shape.len() - 2].iter().product();
    let mut out = vec![0.0; batch * m * n];
    for t in 0..batch {
        for i in 0..m {
            let row = &a[(t * m + i) * k..(t * m + i + 1) * k];
            let target = &mut out[(t * m + i) * n..(t * m + i + 1) * n];
            for (p, &av) in row.iter().enumerate() {
                let brow = &b[p * n..(p + 1) * n];
                for (o, &bv) in target.iter_mut().zip(brow) {
                    *o += av * bv;
                }
            }
        }
    }
    out
}

/// `a @ b` of `[..., M, K]` and `[..., K, N]` with the leading axes
/// broadcast to `out_shape`'s: each product summed in order from 0, as
/// `matmul` sums.
pub(crate) fn batch_matmul(a: &Tensor, b: &Tensor, out_shape: &[usize]) -> Vec<f64> {
    let rank = out_shape.len();
    let (m, n) = (out_shape[rank - 2], out_shape[rank - 1]);
    let k = a.shape[a.shape.len() - 1];
    let leading = |s: &[usize]| s[..s.len() - 2].to_vec();
    let batch = leading(out_shape);
    let a_of = broadcast_map(&leading(&a.shape), &batch);
    let b_of = broadcast_map(&leading(&b.shape), &batch);
    let mut out = Vec::with_capacity(out_shape.iter().product());
    for (&ta, &tb) in a_of.iter().zip(&b_of) {
        let (a, b) = (
            &a.data[ta * m * k..(ta + 1) * m * k],
            &b.data[tb * k * n..(tb + 1) * k * n],
        );
        out.extend(matmul(a, &[m, k], b, &[k, n]));
    }
    out
}

/// `tril` (or, `upper`, `triu`) of the last two axes: element `(i, j)`
/// kept where `j - i <= k` (`j - i >= k`), else 0.
pub(crate) fn triangle(x: &Tensor, k: i64, upper: bool) -> Vec<f64> {
    let rank = x.shape.len();
    let (rows, cols) = (x.shape[rank - 2], x.shape[rank - 1]);
    x.data
        .iter()
        .enumerate()
        .map(|(at, &v)| {
            let (i, j) = ((at / cols) % rows.max(1), at % cols.max(1));
            let offset = j as i64 - i as i64;
            let kept = if upper { offset >= k } else { offset <= k };
            if kept { v } else { 0.0 }
        })
        .collect()
}

/// The operand's axes in the order `axes` lists (axis `i` of the result is
/// axis `axes[i]` of `x`).
pub(crate) fn permute(x: &Tensor, axes: &[usize]) -> Vec<f64> {
    let strides = super::tensor::strides(&x.shape);
    let shape: Vec<usize> = axes.iter().map(|&a| x.shape[a]).collect();
    let count: usize = shape.iter().product();
    let mut index = vec![0usize; shape.len()];
    let mut out = Vec::with_capacity(count);
    for _ in 0..count {
        let at: usize = index.iter().zip(axes).map(|(&i, &a)| i * strides[a]).sum();
        out.push(x.data[at]);
        for d in (0..shape.len()).rev() {
            index[d] += 1;
            if index[d] < shape[d] {
                break;
            }
            index[d] = 0;
        }
    }
    out
}

/// `sum_b a[b]^T @ c[b]` for `a: [..., M, K]` and `c: [..., M, N]`: the
/// leading axes and rows flattened, `[K, N]`, summed in row order.
pub(crate) fn batch_summed_product(a: &Tensor, c: &Tensor) -> Vec<f64> {
    let k = a.shape[a.shape.len() - 1];
    let n = c.shape[c.shape.len() - 1];
    let rows = a.len() / k.max(1);
    let mut out = vec![0.0; k * n];
    for (i, o) in out.iter_mut().enumerate() {
        let (p, q) = (i / n, i % n);
        for r in 0..rows {
            *o += a.data[r * k + p] * c.data[r * n + q];
        }
    }
    out
}

/// Rows of `0` with a `1` at each label: `shape` is the labels' with the
/// class axis last.
pub(crate) fn one_hot(labels: &Tensor, shape: &[usize]) -> Result<Vec<f64>, InterpError> {
    let classes = shape.last().copied().unwrap_or(0);
    check_indices(&labels.data, classes, "label")?;
    let mut out = vec![0.0; labels.len() * classes];
    for (row, &label) in labels.data.iter().enumerate() {
        out[row * classes + label as usize] = 1.0;
    }
    Ok(out)
}

/// Swaps the last two axes.
pub fn transpose(x: &[f64], shape: &[usize]) -> Vec<f64> {
    let rank = shape.len();
    let (r, c) = (shape[rank - 2], shape[rank - 1]);
    let batch: usize = shape[..rank - 2].iter().product();
    let mut out = vec![0.0; x.len()];
    for t in 0..batch {
        let base = t * r * c;
        for i in 0..r {
            for j in 0..c {
                out[base + j * r + i] = x[base + i * c + j];
            }
        }
    }
    out
}

/// A reduction; the result has the reduced axes as size 1 (the caller
/// reshapes for `keepdims = false`).
pub(crate) fn reduce(
    func: ReduceFn,
    x: &Tensor,
    axes: &[usize],
) -> Result<(Vec<f64>, Vec<usize>), InterpError> {
    let (map, kept) = reduce_map(&x.shape, axes);
    let groups: usize = kept.iter().product();
    let count = (x.len() / groups.max(1)).max(1) as f64;
    let out = match func {
        ReduceFn::Sum | ReduceFn::Mean => {
            let mut out = vec![0.0; groups];
            for (i, &v) in x.data.iter().enumerate() {
                out[map[i]] += v;
            }
            if func == ReduceFn::Mean {
                for v in &mut out {
                    *v /= count;
                }
            }
            out
        }
        ReduceFn::Max => group_max(&x.data, &map, groups),
        ReduceFn::LogSumExp => {
            return Err(InterpError::Internal(
                "`logsumexp` is a composite: it runs as its expansion".into(),
            ));
        }
    };
    Ok((out, kept))
}

/// The maximum of each group (NaN wins, as in PyTorch).
pub(crate) fn group_max(data: &[f64], map: &[usize], groups: usize) -> Vec<f64> {
    let mut out = vec![f64::NEG_INFINITY; groups];
    for (i, &v) in data.iter().enumerate() {
        let m = &mut out[map[i]];
        if v.is_nan() || *m < v {
            *m = if m.is_nan() { *m } else { v };
        }
    }
    out
}

/// Joins tensors along an axis.
pub fn concat(inputs: &[&Tensor], axis: usize, out_shape: &[usize]) -> Vec<f64> {
    let outer: usize = out_shape[..axis].iter().product();
    let inner: usize = out_shape[axis + 1..].iter().product();
    let mut out = Vec::with_capacity(out_shape.iter().product());
    for o in 0..outer {
        for input in inputs {
            let block = input.shape[axis] * inner;
            out.extend_from_slice(&input.data[o * block..(o + 1) * block]);
        }
    }
    out
}

/// The elements `start..start + out_shape[axis]` of `x` along `axis`.
/// Where a slice of `taken` elements starts along an axis of `size`
/// (`from_end`: `start` elements before the end), or why it does not fit.
pub(crate) fn slice_start(
    size: usize,
    taken: usize,
    start: u64,
    from_end: bool,
) -> Result<usize, String> {
    let start = usize::try_from(start).unwrap_or(usize::MAX);
    let first = match from_end {
        false => Some(start),
        true => size
            .checked_sub(start)
            .and_then(|end| end.checked_sub(taken)),
    };
    match first {
        Some(first) if first.checked_add(taken).is_some_and(|end| end <= size) => Ok(first),
        _ => {
            let shown = if from_end {
                format!("-{}", start.saturating_add(1))
            } else {
                start.to_string()
            };
            Err(format!(
                "index {shown} is out of range for an axis of {size} positions"
            ))
        }
    }
}

pub(crate) fn slice(x: &Tensor, axis: usize, start: usize, out_shape: &[usize]) -> Vec<f64> {
    let outer: usize = out_shape[..axis].iter().product();
    let inner: usize = out_shape[axis + 1..].iter().product();
    let (total, width) = (x.shape[axis] * inner, out_shape[axis] * inner);
    let mut out = Vec::with_capacity(outer * width);
    for o in 0..outer {
        let from = o * total + start * inner;
        out.extend_from_slice(&x.data[from..from + width]);
    }
    out
}

/// The dropout keep-mask scale of each element: `1 / (1 - p)` where kept,
/// 0 where dropped. Element `i` is dropped when
/// `uniform_at(seed, step, key, i) < p`.
pub(crate) fn dropout_scale(p: f64, key: u32, len: usize, seed: u64, step: u64) -> Vec<f64> {
    let scale = 1.0 / (1.0 - p);
    (0..len)
        .map(|i| {
            if uniform_at(seed, step, key, i as u64) < p {
                0.0
            } else {
                scale
            }
        })
        .collect()
}

/// Checks that every index is in `0..limit`.
pub(crate) fn check_indices(values: &[f64], limit: usize, what: &str) -> Result<(), InterpError> {
    match values.iter().position(|&v| v < 0.0 || v >= limit as f64) {
        Some(i) => Err(InterpError::Runtime(format!(
            "{what} {} at position {i} is out of range 0..{limit}",
            values[i]
        ))),
        None => Ok(()),
    }
}

/// Rows of `table: [V, D]` picked by `ids`.
pub fn embedding(ids: &Tensor, table: &Tensor) -> Result<Vec<f64>, InterpError> {
    let (v, d) = (table.shape[0], table.shape[1]);
    check_indices(&ids.data, v, "embedding index")?;
    let mut out = Vec::with_capacity(ids.len() * d);
    for &id in &ids.data {
        let row = id as usize;
        out.extend_from_slice(&table.data[row * d..(row + 1) * d]);
    }
    Ok(out)
}

/// A `[V, D]` table of zeros with each row of `rows` (`[..., D]`) added at
/// its id, in order.
pub(crate) fn scatter_add(
    ids: &Tensor,
    rows: &Tensor,
    table_shape: &[usize],
) -> Result<Vec<f64>, InterpError> {
    let (v, d) = (table_shape[0], table_shape[1]);
    check_indices(&ids.data, v, "embedding index")?;
    let mut out = vec![0.0; v * d];
    for (j, &id) in ids.data.iter().enumerate() {
        let row = id as usize;
        for k in 0..d {
            out[row * d + k] += rows.data[j * d + k];
        }
    }
    Ok(out)
}

/// Mean squared error.
pub fn mse(pred: &Tensor, target: &Tensor) -> f64 {
    let n = pred.len().max(1) as f64;
    pred.data
        .iter()
        .zip(&target.data)
        .map(|(p, t)| (p - t) * (p - t))
        .sum::<f64>()
        / n
}

/// Mean binary cross-entropy with logits, stable for large `|x|`.
pub fn bce_with_logits(logits: &Tensor, target: &Tensor) -> f64 {
    let n = logits.len().max(1) as f64;
    logits
        .data
        .iter()
        .zip(&target.data)
        .map(|(&x, &t)| x.max(0.0) - x * t + (-x.abs()).exp().ln_1p())
        .sum::<f64>()
        / n
}
