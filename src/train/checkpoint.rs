//! Checkpoints: params, buffers, optimizer state and the counters, as one
//! `.safetensors` file (loadable with `safetensors.torch.load_file` or
//! `safetensors.flax.load_file`), written atomically.
//!
//! Names: params and buffers by their declared names, optimizer state as
//! `adam.m.<param>`, `adam.v.<param>`, `sgd.momentum.<param>`, and the
//! counters `train.step`, `train.epoch`, `train.batch` (the next batch of
//! that epoch) as `I32` scalars.

use std::collections::BTreeMap;
use std::path::Path;

use super::{Session, TrainError};
use crate::interp::Tensor;
use crate::ir::DType;
use crate::tensor_file;

fn counter(value: u64) -> Tensor {
    Tensor::scalar(DType::I32, value.min(i32::MAX as u64) as f64)
}

/// Writes the session's state (an error if the backend keeps newer state:
/// `Session::sync` first).
pub fn save(session: &Session, path: &Path) -> Result<(), TrainError> {
    let mut tensors = session.state()?.clone();
    tensors.insert("train.step".into(), counter(session.steps_done));
    tensors.insert("train.epoch".into(), counter(session.epoch as u64));
    tensors.insert("train.batch".into(), counter(session.batch_index as u64));
    tensor_file::write(path, &tensors)
        .map_err(|e| TrainError::Checkpoint(format!("cannot save the checkpoint: {e}")))
}

fn read(path: &Path) -> Result<BTreeMap<String, Tensor>, TrainError> {
    tensor_file::read(path)
        .map_err(|e| TrainError::Checkpoint(format!("cannot read the checkpoint: {e}")))
}

/// Checks that a loaded tensor fits the state it replaces.
fn fits(name: &str, loaded: &Tensor, current: &Tensor, path: &Path) -> Result<Tensor, TrainError> {
    if loaded.shape != current.shape || loaded.dtype.is_float() != current.dtype.is_float() {
        return Err(TrainError::Checkpoint(format!(
            "{}: tensor `{name}` is {}{:?} but the model needs {}{:?}",
            path.display(),
            loaded.dtype,
            loaded.shape,
            current.dtype,
            current.shape
        )));
    }
    Ok(loaded.cast(current.dtype))
}

/// Continues an interrupted run: every param, buffer and optimizer state
/// and the counters must be in the file.
pub fn resume(session: &mut Session, path: &Path) -> Result<(), TrainError> {
    let loaded = read(path)?;
    let mut state = BTreeMap::new();
    for (name, current) in session.state()? {
        let tensor = loaded.get(name).ok_or_else(|| {
            TrainError::Checkpoint(format!(
                "{}: no tensor `{name}`; --resume needs a checkpoint that `gradc train --save` wrote for this model and optimizer",
                path.display()
            ))
        })?;
        state.insert(name.clone(), fits(name, tensor, current, path)?);
    }
    let count = |name: &str| -> Result<u64, TrainError> {
        loaded
            .get(name)
            .and_then(|t| t.data.first())
            .map(|&v| v.max(0.0) as u64)
            .ok_or_else(|| {
                TrainError::Checkpoint(format!("{}: no counter `{name}`", path.display()))
            })
    };
    session.steps_done = count("train.step")?;
    session.epoch = count("train.epoch")? as usize;
    session.batch_index = count("train.batch")? as usize;
    *session.state_mut()? = state;
    Ok(())
}

/// Starts from pretrained params and buffers: every tensor of the file
/// whose name is a param or buffer of the model replaces its initial value;
/// returns the names loaded. Optimizer state and counters start fresh.
pub fn load_init(session: &mut Session, path: &Path) -> Result<Vec<String>, TrainError> {
    let loaded = read(path)?;
    let mut names = Vec::new();
    for (name, tensor) in &loaded {
        let is_weight = !name.contains('.');
        if let (true, Some(current)) = (is_weight, session.state()?.get(name)) {
            let value = fits(name, tensor, current, path)?;
            session.state_mut()?.insert(name.clone(), value);
            names.push(name.clone());
        }
    }
    if names.is_empty() {
        return Err(TrainError::Checkpoint(format!(
            "{}: no tensor is named like a param or buffer of the model",
            path.display()
        )));
    }
    Ok(names)
}
