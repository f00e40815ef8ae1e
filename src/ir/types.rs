//! Element types, dimensions and shapes of IR values.
//!
//! A dimension is a fixed size or a symbol such as `B` that is bound when the
//! model runs; two symbols agree only when they have the same name. Shapes
//! broadcast as in NumPy, where a fixed `1` stretches to any size.

use std::fmt;

/// The element type of a tensor.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum DType {
    /// 32-bit float.
    F32,
    /// 64-bit float.
    F64,
    /// 32-bit signed integer (labels and indices).
    I32,
}

impl DType {
    /// Parses `f32`, `f64` or `i32`.
    pub(crate) fn from_name(name: &str) -> Option<DType> {
        match name {
            "f32" => Some(DType::F32),
            "f64" => Some(DType::F64),
            "i32" => Some(DType::I32),
            _ => None,
        }
    }

    /// Whether arithmetic and layers accept it.
    pub(crate) fn is_float(self) -> bool {
        matches!(self, DType::F32 | DType::F64)
    }

    /// Bytes per element.
    pub(crate) fn size_bytes(self) -> u64 {
        match self {
            DType::F32 | DType::I32 => 4,
            DType::F64 => 8,
        }
    }
}

impl fmt::Display for DType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            DType::F32 => "f32",
            DType::F64 => "f64",
            DType::I32 => "i32",
        })
    }
}

/// One dimension.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Dim {
    /// A size known at compile time (at least 1).
    Fixed(u64),
    /// A size bound when the model runs.
    Sym(String),
}

impl Dim {
    /// Whether this is the fixed size 1, which broadcasts.
    pub fn is_one(&self) -> bool {
        *self == Dim::Fixed(1)
    }

    /// The size if it is fixed, else 0 (callers know it is fixed).
    pub(crate) fn fixed_size(&self) -> u64 {
        match self {
            Dim::Fixed(n) => *n,
            Dim::Sym(_) => 0,
        }
    }
}

impl fmt::Display for Dim {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Dim::Fixed(n) => write!(f, "{n}"),
            Dim::Sym(s) => f.write_str(s),
        }
    }
}

/// The largest number of elements one tensor may have: its bytes in `f64`
/// must fit an `isize`.
pub const MAX_ELEMENTS: u64 = (i64::MAX as u64) / 8;

/// A list of dimensions; the empty list is a scalar.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Default)]
pub struct Shape(pub Vec<Dim>);

impl Shape {
    /// The scalar shape `[]`.
    pub fn scalar() -> Shape {
        Shape(Vec::new())
    }

    /// Number of dimensions.
    pub fn rank(&self) -> usize {
        self.0.len()
    }

    /// Whether it is a scalar.
    pub(crate) fn is_scalar(&self) -> bool {
        self.0.is_empty()
    }

    /// The shape with `axes` set to size 1: what a reduction over them
    /// keeps with `keepdims = true`.
    pub fn kept(&self, axes: &[usize]) -> Shape {
        Shape(
            self.0
                .iter()
                .enumerate()
                .map(|(d, dim)| {
                    if axes.contains(&d) {
                        Dim::Fixed(1)
                    } else {
                        dim.clone()
                    }
                })
                .collect(),
        )
    }

    /// The element count as a fixed factor and the sorted list of symbols
    /// it is multiplied by; `None` when the fixed factor overflows
    /// [`MAX_ELEMENTS`].
    pub(crate) fn element_count(&self) -> Option<(u64, Vec<String>)> {
        let mut fixed: u64 = 1;
        let mut symbols = Vec::new();
        for dim in &self.0 {
            match dim {
                Dim::Fixed(n) => fixed = fixed.checked_mul(*n).filter(|&v| v <= MAX_ELEMENTS)?,
                Dim::Sym(s) => symbols.push(s.clone()),
            }
        }
        symbols.sort();
        Some((fixed, symbols))
    }

    /// The element count when every dimension is fixed.
    pub(crate) fn fixed_count(&self) -> Option<u64> {
        match self.element_count() {
            Some((n, symbols)) if symbols.is_empty() => Some(n),
            _ => None,
        }
    }

    /// The element count with every symbolic dimension set to `size`
    /// (saturating), for estimates.
    pub(crate) fn count_with(&self, size: u64) -> u64 {
        self.0
            .iter()
            .map(|d| match d {
                Dim::Fixed(n) => *n,
                Dim::Sym(_) => size,
            })
            .fold(1u64, u64::saturating_mul)
    }

    /// NumPy broadcasting of two shapes; `None` when they do not broadcast.
    pub(crate) fn broadcast(&self, other: &Shape) -> Option<Shape> {
        let rank = self.rank().max(other.rank());
        let mut dims = Vec::with_capacity(rank);
        for i in 0..rank {
            let a = dim_from_right(self, rank - i);
            let b = dim_from_right(other, rank - i);
            let dim = match (a, b) {
                (None, Some(d)) | (Some(d), None) => d.clone(),
                (Some(a), Some(b)) if a == b => a.clone(),
                (Some(a), Some(b)) if a.is_one() => b.clone(),
                (Some(a), Some(b)) if b.is_one() => a.clone(),
                _ => return None,
            };
            dims.push(dim);
        }
        Some(Shape(dims))
    }

    /// Normalizes a possibly negative axis against the rank.
    pub fn axis(&self, axis: i64) -> Option<usize> {
        let rank = i64::try_from(self.rank()).ok()?;
        let normalized = if axis < 0 { axis + rank } else { axis };
        (0..rank)
            .contains(&normalized)
            .then_some(normalized as usize)
    }
}

/// The dimension `k` places from the right (1 = last), if the shape has it.
fn dim_from_right(shape: &Shape, k: usize) -> Option<&Dim> {
    shape.rank().checked_sub(k).map(|i| &shape.0[i])
}

impl fmt::Display for Shape {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[")?;
        for (i, dim) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            write!(f, "{dim}")?;
        }
        f.write_str("]")
    }
}

/// The type of an IR value: element type and shape.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Type {
    /// Element type.
    pub dtype: DType,
    /// Shape.
    pub shape: Shape,
}

impl Type {
    /// A type from its parts.
    pub fn new(dtype: DType, shape: Shape) -> Type {
        Type { dtype, shape }
    }
}

impl fmt::Display for Type {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}{}", self.dtype, self.shape)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shape(dims: &[&str]) -> Shape {
        Shape(
            dims.iter()
                .map(|d| {
                    d.parse()
                        .map_or_else(|_| Dim::Sym(d.to_string()), Dim::Fixed)
                })
                .collect(),
        )
    }

    #[test]
    fn broadcasting_follows_numpy() {
        assert_eq!(
            shape(&["B", "10"]).broadcast(&shape(&["10"])),
            Some(shape(&["B", "10"]))
        );
        assert_eq!(
            shape(&["B", "1"]).broadcast(&shape(&["1", "7"])),
            Some(shape(&["B", "7"]))
        );
        assert_eq!(shape(&["B", "10"]).broadcast(&shape(&["N", "10"])), None);
        assert_eq!(shape(&["3"]).broadcast(&shape(&["4"])), None);
        assert_eq!(
            Shape::scalar().broadcast(&shape(&["4"])),
            Some(shape(&["4"]))
        );
    }

    #[test]
    fn negative_axes_count_from_the_end() {
        let s = shape(&["B", "3", "4"]);
        assert_eq!(s.axis(-1), Some(2));
        assert_eq!(s.axis(-3), Some(0));
        assert_eq!(s.axis(3), None);
        assert_eq!(s.axis(-4), None);
    }

    #[test]
    fn element_counts_overflow_to_none() {
        assert_eq!(
            shape(&["B", "8", "8"]).element_count(),
            Some((64, vec!["B".into()]))
        );
        assert_eq!(shape(&["4294967296", "4294967296"]).element_count(), None);
    }
}
