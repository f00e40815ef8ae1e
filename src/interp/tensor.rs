//! The interpreter's tensor: an element type, a shape of concrete sizes and
//! the elements in row-major order, held as `f64`.
//!
//! `f32` tensors hold values that are exactly representable in `f32`: every
//! kernel computes in `f64` and rounds its result with [`Tensor::rounded`],
//! so an `f32` graph sees one `f32` rounding per op. `i32` tensors hold
//! integers. Index helpers for broadcasting and reductions live here too.

use crate::ir::DType;

/// A dense tensor.
#[derive(Clone, Debug, PartialEq)]
pub struct Tensor {
    /// Element type.
    pub dtype: DType,
    /// Concrete sizes.
    pub shape: Vec<usize>,
    /// Elements, row-major.
    pub data: Vec<f64>,
}

impl Tensor {
    /// A tensor from parts; `data` must have the shape's element count.
    pub fn new(dtype: DType, shape: Vec<usize>, data: Vec<f64>) -> Tensor {
        debug_assert_eq!(shape.iter().product::<usize>(), data.len());
        Tensor { dtype, shape, data }.rounded()
    }

    /// All zeros.
    pub fn zeros(dtype: DType, shape: &[usize]) -> Tensor {
        Tensor {
            dtype,
            shape: shape.to_vec(),
            data: vec![0.0; shape.iter().product()],
        }
    }

    /// A scalar.
    pub fn scalar(dtype: DType, value: f64) -> Tensor {
        Tensor::new(dtype, Vec::new(), vec![value])
    }

    /// Number of elements.
    pub fn len(&self) -> usize {
        self.data.len()
    }

    /// Whether it has no elements.
    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }

    /// The same values rounded to the element type.
    pub fn rounded(mut self) -> Tensor {
        if self.dtype == DType::F32 {
            for v in &mut self.data {
                *v = f64::from(*v as f32);
            }
        }
        self
    }

    /// Maps every element.
    pub fn map(&self, f: impl Fn(f64) -> f64) -> Tensor {
        Tensor::new(
            self.dtype,
            self.shape.clone(),
            self.data.iter().map(|&v| f(v)).collect(),
        )
    }

    /// Converts to another element type (rounding to `f32` if asked).
    pub fn cast(&self, dtype: DType) -> Tensor {
        Tensor::new(dtype, self.shape.clone(), self.data.clone())
    }
}

/// Row-major strides of a shape.
pub fn strides(shape: &[usize]) -> Vec<usize> {
    let mut strides = vec![1; shape.len()];
    for i in (0..shape.len().saturating_sub(1)).rev() {
        strides[i] = strides[i + 1] * shape[i + 1];
    }
    strides
}

/// For each element of `out_shape`, the index of the element of `in_shape`
/// that broadcasting maps onto it.
pub(crate) fn broadcast_map(in_shape: &[usize], out_shape: &[usize]) -> Vec<usize> {
    let count: usize = out_shape.iter().product();
    if in_shape == out_shape {
        return (0..count).collect();
    }
    let rank = out_shape.len();
    let offset = rank - in_shape.len();
    let in_strides = strides(in_shape);
    // Stride 0 along axes the input lacks or stretches.
    let step: Vec<usize> = (0..rank)
        .map(|d| {
            if d < offset || in_shape[d - offset] == 1 {
                0
            } else {
                in_strides[d - offset]
            }
        })
        .collect();
    let mut map = Vec::with_capacity(count);
    let mut index = vec![0usize; rank];
    let mut position = 0usize;
    for _ in 0..count {
        map.push(position);
        for d in (0..rank).rev() {
            index[d] += 1;
            position += step[d];
            if index[d] < out_shape[d] {
                break;
            }
            position -= step[d] * index[d];
            index[d] = 0;
        }
    }
    map
}

/// For each element of a tensor of `shape`, the index of the element of
/// its reduction over `axes` (kept as size 1) that it falls into; and that
/// reduced shape.
pub(crate) fn reduce_map(shape: &[usize], axes: &[usize]) -> (Vec<usize>, Vec<usize>) {
    let kept: Vec<usize> = shape
        .iter()
        .enumerate()
        .map(|(d, &n)| if axes.contains(&d) { 1 } else { n })
        .collect();
    (broadcast_map(&kept, shape), kept)
}

/// Sums `data` of `shape` down to `target` (which broadcasts to `shape`).
pub(crate) fn sum_to(data: &[f64], shape: &[usize], target: &[usize]) -> Vec<f64> {
    let map = broadcast_map(target, shape);
    let mut out = vec![0.0; target.iter().product()];
    for (i, &v) in data.iter().enumerate() {
        out[map[i]] += v;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn broadcast_map_repeats_rows_and_columns() {
        assert_eq!(broadcast_map(&[3], &[2, 3]), vec![0, 1, 2, 0, 1, 2]);
        assert_eq!(broadcast_map(&[2, 1], &[2, 3]), vec![0, 0, 0, 1, 1, 1]);
        assert_eq!(broadcast_map(&[], &[2]), vec![0, 0]);
    }

    #[test]
    fn reduce_map_groups_by_kept_axes() {
        let (map, kept) = reduce_map(&[2, 3], &[1]);
        assert_eq!(kept, vec![2, 1]);
        assert_eq!(map, vec![0, 0, 0, 1, 1, 1]);
        assert_eq!(
            sum_to(&[1.0, 2.0, 3.0, 4.0, 5.0, 6.0], &[2, 3], &[3]),
            vec![5.0, 7.0, 9.0]
        );
    }
}
