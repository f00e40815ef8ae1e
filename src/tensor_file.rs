//! Reading and writing tensors as `.safetensors` files, the format PyTorch
//! (`safetensors.torch`) and JAX users load directly.
//!
//! Reading accepts `F32`, `F64`, `I32` and `I64` tensors and rejects
//! anything else with an error naming the tensor. Writing goes through
//! `files::write`: atomic, through symlinks, keeping the mode.

use std::collections::BTreeMap;
use std::path::Path;

use safetensors::tensor::{Dtype, SafeTensors, TensorView};

use crate::interp::Tensor;
use crate::ir::DType;

/// Why a tensor file could not be read or written.
#[derive(Debug)]
pub enum FileError {
    /// The file system said no.
    Io(std::path::PathBuf, std::io::Error),
    /// The bytes are not a valid safetensors file.
    Format(std::path::PathBuf, String),
    /// A tensor of a type gradc does not read.
    Dtype(String, String),
}

impl std::fmt::Display for FileError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            FileError::Io(path, e) => write!(f, "{}: {e}", path.display()),
            FileError::Format(path, e) => {
                write!(f, "{}: not a valid safetensors file: {e}", path.display())
            }
            FileError::Dtype(name, dtype) => {
                write!(
                    f,
                    "tensor `{name}` has type {dtype}; gradc reads F32, F64, I32 and I64"
                )
            }
        }
    }
}

impl std::error::Error for FileError {}

/// Reads every tensor of a file. Floats keep their width; `I64` becomes
/// `I32` when every value fits.
pub fn read(path: &Path) -> Result<BTreeMap<String, Tensor>, FileError> {
    let bytes = std::fs::read(path).map_err(|e| FileError::Io(path.to_path_buf(), e))?;
    parse(path, &bytes)
}

/// Parses the bytes of a safetensors file; `path` names it in messages.
pub fn parse(path: &Path, bytes: &[u8]) -> Result<BTreeMap<String, Tensor>, FileError> {
    let file = SafeTensors::deserialize(bytes)
        .map_err(|e| FileError::Format(path.to_path_buf(), e.to_string()))?;
    let mut tensors = BTreeMap::new();
    for (name, view) in file.tensors() {
        let data = view.data();
        let (dtype, values): (DType, Vec<f64>) = match view.dtype() {
            Dtype::F32 => (
                DType::F32,
                data.chunks_exact(4)
                    .map(|c| f64::from(f32::from_le_bytes([c[0], c[1], c[2], c[3]])))
                    .collect(),
            ),
            Dtype::F64 => (
                DType::F64,
                data.chunks_exact(8)
                    .map(|c| f64::from_le_bytes(c.try_into().unwrap_or([0; 8])))
                    .collect(),
            ),
            Dtype::I32 => (
                DType::I32,
                data.chunks_exact(4)
                    .map(|c| f64::from(i32::from_le_bytes([c[0], c[1], c[2], c[3]])))
                    .collect(),
            ),
            Dtype::I64 => {
                let values: Vec<i64> = data
                    .chunks_exact(8)
                    .map(|c| i64::from_le_bytes(c.try_into().unwrap_or([0; 8])))
                    .collect();
                if values.iter().any(|&v| i32::try_from(v).is_err()) {
                    return Err(FileError::Dtype(
                        name,
                        "I64 with values outside the i32 range".into(),
                    ));
                }
                (DType::I32, values.into_iter().map(|v| v as f64).collect())
            }
            other => return Err(FileError::Dtype(name, format!("{other:?}"))),
        };
        let shape = view.shape().to_vec();
        if shape.iter().product::<usize>() != values.len() {
            return Err(FileError::Format(
                path.to_path_buf(),
                format!("tensor `{name}` has the wrong number of bytes"),
            ));
        }
        tensors.insert(
            name,
            Tensor {
                dtype,
                shape,
                data: values,
            },
        );
    }
    Ok(tensors)
}

/// Writes tensors atomically.
pub fn write(path: &Path, tensors: &BTreeMap<String, Tensor>) -> Result<(), FileError> {
    let io = |e: std::io::Error| FileError::Io(path.to_path_buf(), e);
    let encoded: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> = tensors
        .iter()
        .map(|(name, t)| {
            let (dtype, bytes) = match t.dtype {
                DType::F32 => (
                    Dtype::F32,
                    t.data
                        .iter()
                        .flat_map(|&v| (v as f32).to_le_bytes())
                        .collect(),
                ),
                DType::F64 => (
                    Dtype::F64,
                    t.data.iter().flat_map(|&v| v.to_le_bytes()).collect(),
                ),
                DType::I32 => (
                    Dtype::I32,
                    t.data
                        .iter()
                        .flat_map(|&v| (v as i32).to_le_bytes())
                        .collect(),
                ),
            };
            (name.clone(), dtype, t.shape.clone(), bytes)
        })
        .collect();
    let mut views = Vec::new();
    for (name, dtype, shape, bytes) in &encoded {
        let view = TensorView::new(*dtype, shape.clone(), bytes)
            .map_err(|e| FileError::Format(path.to_path_buf(), e.to_string()))?;
        views.push((name.as_str(), view));
    }
    let bytes = safetensors::serialize(views, None)
        .map_err(|e| FileError::Format(path.to_path_buf(), e.to_string()))?;
    crate::files::write(path, &bytes).map_err(io)
}
