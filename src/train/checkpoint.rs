//! Checkpoints: params, buffers, optimizer state and the counters, as one
//! `.safetensors` file (loadable with `safetensors.torch.load_file` or
//! `safetensors.flax.load_file`), written atomically.
//!
//! Names: params and buffers by their declared names, optimizer state as
//! `adam.m.<param>`, `adam.v.<param>`, `sgd.momentum.<param>`, and the
//! counters `train.step`, `train.epoch`, `train.batch` (the next batch of
//! that epoch) and `train.epochs` (the run's length, which a
//! length-dependent schedule follows) as `I32` scalars.
//!
//! Nothing loaded is trusted: every tensor must fit the state it replaces,
//! be finite (a NaN names the tensor and its first bad index), and the
//! counters must be whole numbers in range. `gradc eval` needs every param
//! and buffer and refuses tensors the model does not have; `--init` loads
//! the params and buffers it finds and says which start from their
//! initializers.

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
    tensors.insert("train.epochs".into(), counter(session.config.epochs));
    tensor_file::write(path, &tensors)
        .map_err(|e| TrainError::Checkpoint(format!("cannot save the checkpoint: {e}")))
}

fn read(path: &Path) -> Result<BTreeMap<String, Tensor>, TrainError> {
    tensor_file::read(path)
        .map_err(|e| TrainError::Checkpoint(format!("cannot read the checkpoint: {e}")))
}

/// Checks that a loaded tensor fits the state it replaces and is finite.
fn fits(name: &str, loaded: &Tensor, current: &Tensor, path: &Path) -> Result<Tensor, TrainError> {
    if let Some(index) = loaded.data.iter().position(|v| !v.is_finite()) {
        return Err(TrainError::Checkpoint(format!(
            "{}: tensor `{name}` holds {} at index {index} (of shape {:?}); a checkpoint with non-finite values cannot be trained or evaluated on",
            path.display(),
            loaded.data[index],
            loaded.shape
        )));
    }
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
pub fn resume(session: &mut Session, path: &Path) -> Result<Resumed, TrainError> {
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
    let count = |name: &str, limit: u64| -> Result<u64, TrainError> {
        let value = loaded
            .get(name)
            .and_then(|t| t.data.first().copied())
            .ok_or_else(|| {
                TrainError::Checkpoint(format!("{}: no counter `{name}`", path.display()))
            })?;
        if value.fract() != 0.0 || value < 0.0 || value > limit as f64 {
            return Err(TrainError::Checkpoint(format!(
                "{}: counter `{name}` is {value}, not a whole number in 0..={limit}",
                path.display()
            )));
        }
        Ok(value as u64)
    };
    let steps = count("train.step", i32::MAX as u64)?;
    let epoch = count("train.epoch", i32::MAX as u64)?;
    let batch = count("train.batch", session.steps_per_epoch.saturating_sub(1))?;
    let epochs = match loaded.get("train.epochs") {
        Some(_) => Some(count("train.epochs", i32::MAX as u64)?),
        None => None,
    };
    session.steps_done = steps;
    session.epoch = epoch as usize;
    session.batch_index = batch as usize;
    *session.state_mut()? = state;
    Ok(Resumed { epochs })
}

/// What a resumed checkpoint says of the run that wrote it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Resumed {
    /// The epochs that run was set to (older checkpoints do not say).
    pub epochs: Option<u64>,
}

/// Whether a checkpoint tensor belongs to the model: a param or buffer of
/// it, optimizer state of one of its params, or a counter.
fn belongs(name: &str, state: &BTreeMap<String, Tensor>) -> bool {
    state.contains_key(name)
        || name.starts_with("train.")
        || name
            .rsplit_once('.')
            .is_some_and(|(prefix, param)| !prefix.is_empty() && state.contains_key(param))
}

/// The params and buffers of the model (not optimizer state).
fn weights(state: &BTreeMap<String, Tensor>) -> Vec<String> {
    state.keys().filter(|n| !n.contains('.')).cloned().collect()
}

/// What `--init` loaded and what starts from its initializer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Loaded {
    /// Params and buffers taken from the file.
    pub loaded: Vec<String>,
    /// Params and buffers the file does not have.
    pub initialized: Vec<String>,
}

/// Starts from pretrained params and buffers (`--init`, fine-tuning):
/// every tensor of the file whose name is a param or buffer of the model
/// replaces its initial value; the others start from their initializers.
/// Optimizer state and counters start fresh. At least one must load.
pub fn load_init(session: &mut Session, path: &Path) -> Result<Loaded, TrainError> {
    let loaded = read(path)?;
    let weights = weights(session.state()?);
    let mut result = Loaded {
        loaded: Vec::new(),
        initialized: Vec::new(),
    };
    for name in weights {
        match loaded.get(&name) {
            Some(tensor) => {
                let value = fits(&name, tensor, &session.state()?[&name], path)?;
                session.state_mut()?.insert(name.clone(), value);
                result.loaded.push(name);
            }
            None => result.initialized.push(name),
        }
    }
    if result.loaded.is_empty() {
        return Err(TrainError::Checkpoint(format!(
            "{}: no tensor is named like a param or buffer of the model",
            path.display()
        )));
    }
    Ok(result)
}

/// Loads the params and buffers to evaluate (`gradc eval`): every one must
/// be in the file, and the file must hold nothing the model does not have
/// (optimizer state of its params and the counters are fine).
pub fn load_for_eval(session: &mut Session, path: &Path) -> Result<(), TrainError> {
    let loaded = read(path)?;
    let state = session.state()?;
    let missing: Vec<String> = weights(state)
        .into_iter()
        .filter(|n| !loaded.contains_key(n))
        .collect();
    let extra: Vec<&String> = loaded.keys().filter(|n| !belongs(n, state)).collect();
    if !missing.is_empty() || !extra.is_empty() {
        let list = |names: Vec<String>| {
            names
                .iter()
                .map(|n| format!("`{n}`"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let mut problems = Vec::new();
        if !missing.is_empty() {
            problems.push(format!("it has no {}", list(missing)));
        }
        if !extra.is_empty() {
            problems.push(format!(
                "the model has no {}",
                list(extra.into_iter().cloned().collect())
            ));
        }
        return Err(TrainError::Checkpoint(format!(
            "{}: not a checkpoint of this model: {} (was it saved from another model?)",
            path.display(),
            problems.join("; ")
        )));
    }
    for name in weights(session.state()?) {
        let value = fits(&name, &loaded[&name], &session.state()?[&name], path)?;
        session.state_mut()?.insert(name, value);
    }
    Ok(())
}
