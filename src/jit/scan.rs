//! A `scan` on the JIT: its body compiled once into a program of its own
//! (optimized by the passes, with the body's results kept), bound to a
//! frame for the sizes of the run, and called once per step. The carries
//! stay in the body frame's buffers from step to step: each step writes
//! only the sequences' elements and the new carries, and copies the
//! per-step outputs into their places in the stacked results. The
//! constants are written once per loop.

use std::collections::BTreeMap;
use std::sync::Arc;

use crate::interp::{Context, InterpError, Tensor, concrete};
use crate::ir::{NodeId, Scan, Shape, expand};
use crate::jit::bind::{self, Frames, internal, own_id, slot_in};
use crate::jit::cache::ClifText;
use crate::jit::host::StepHost;
use crate::jit::program::{Program, compile, optimized};

/// A scan's body, compiled, with its frames.
pub(super) struct LoopBody {
    program: Program,
    /// Its frames by sizes; each keeps the loops of the scans inside the
    /// body (`Bound::loops`).
    frames: Frames,
}

impl LoopBody {
    /// Compiles the body of `scan`.
    pub(super) fn new(scan: &Scan) -> Result<LoopBody, InterpError> {
        let body = &*scan.body;
        let (run, ids) = optimized(body, &scan.results);
        let checked = expand::checked_shapes(body);
        let program = compile(run, ids, ClifText::None, checked)
            .map_err(|e| InterpError::Internal(e.to_string()))?;
        Ok(LoopBody {
            program,
            frames: Frames::default(),
        })
    }

    /// Every result of the loop (the final carries, then the stacked
    /// outputs) for these operand values, the outer sizes `dims`.
    pub(super) fn run(
        &mut self,
        scan: &Scan,
        operands: &[Tensor],
        dims: &BTreeMap<String, usize>,
        context: Context,
    ) -> Result<Vec<Tensor>, InterpError> {
        let graph = Arc::clone(&self.program.graph);
        let own = |id: NodeId| own_id(&self.program.ids, id);
        let inputs: Vec<NodeId> = scan
            .inputs
            .iter()
            .map(|&id| own(id))
            .collect::<Result<_, _>>()?;
        let results: Vec<NodeId> = scan
            .results
            .iter()
            .map(|&id| own(id))
            .collect::<Result<_, _>>()?;
        let length = concrete(&scan.stacked(&Shape::scalar()), dims)?[0];
        let bound = bind::bound(&mut self.program, &mut self.frames, &graph, dims)?;
        for shape in &self.program.checked_shapes {
            expand::check_statistics(&concrete(shape, dims)?).map_err(InterpError::Runtime)?;
        }
        // (A leaf the optimized body does not read has no buffer.)
        let input_slots: Vec<Option<usize>> = inputs
            .iter()
            .map(|id| bound.slots.get(id).copied())
            .collect();
        let result_slots: Vec<usize> = results
            .iter()
            .map(|&id| slot_in(&bound.slots, id))
            .collect::<Result<_, _>>()?;
        let sizes: Vec<usize> = results
            .iter()
            .map(|&id| Ok(concrete(graph.node(id).shape(), dims)?.iter().product()))
            .collect::<Result<_, InterpError>>()?;
        {
            let mut buffers = bound.frame.buffers();
            let constants = scan.carries + scan.sequences..scan.inputs.len();
            for position in (0..scan.carries).chain(constants) {
                if let Some(slot) = input_slots[position] {
                    buffers
                        .write(slot, &operands[position].data)
                        .map_err(internal)?;
                }
            }
        }
        let mut stacked: Vec<Vec<f64>> = sizes[scan.carries..]
            .iter()
            .map(|&size| vec![0.0; size * length])
            .collect();
        // The new carries become the next step's by exchanging buffers,
        // when each carry's result has a buffer of its own; else copied.
        let carry_slots: Vec<Option<usize>> = input_slots[..scan.carries].to_vec();
        let exchange = {
            let mut seen = std::collections::BTreeSet::new();
            (0..scan.carries).all(|c| {
                let result = result_slots[c];
                carry_slots[c].is_some()
                    && seen.insert(result)
                    && !carry_slots.contains(&Some(result))
            })
        };
        let mut carried: Vec<Vec<f64>> = vec![Vec::new(); scan.carries];
        for step in 0..length {
            let t = if scan.reverse {
                length - 1 - step
            } else {
                step
            };
            {
                let mut buffers = bound.frame.buffers();
                for position in scan.sequence_positions() {
                    let Some(slot) = input_slots[position] else {
                        continue;
                    };
                    let sequence = &operands[position].data;
                    let width = sequence.len() / length.max(1);
                    buffers
                        .write(slot, &sequence[t * width..(t + 1) * width])
                        .map_err(internal)?;
                }
            }
            let (mut host, frame) = StepHost::of(&graph, bound, context);
            frame.run(&mut host, context)?;
            let mut buffers = bound.frame.buffers();
            for (output, (&slot, &size)) in stacked.iter_mut().zip(
                result_slots[scan.carries..]
                    .iter()
                    .zip(&sizes[scan.carries..]),
            ) {
                buffers
                    .read_to(slot, &mut output[t * size..(t + 1) * size])
                    .map_err(internal)?;
            }
            if exchange {
                for (c, leaf) in carry_slots.iter().enumerate() {
                    if let Some(leaf) = *leaf {
                        buffers.swap(result_slots[c], leaf).map_err(internal)?;
                    }
                }
                continue;
            }
            // The new carries into the carries' buffers, for the next step.
            for (carry, value) in carried.iter_mut().enumerate() {
                value.clear();
                value.extend_from_slice(&buffers.read(result_slots[carry], sizes[carry]));
            }
            for (carry, value) in carried.iter().enumerate() {
                if let Some(slot) = carry_slots[carry] {
                    buffers.write(slot, value).map_err(internal)?;
                }
            }
        }
        if exchange && length > 0 {
            // (The final carries are in the carries' buffers now.)
            let buffers = bound.frame.buffers();
            for (c, value) in carried.iter_mut().enumerate() {
                let leaf = carry_slots[c]
                    .ok_or_else(|| InterpError::Internal("a carry without a buffer".into()))?;
                value.clear();
                value.extend_from_slice(&buffers.read(leaf, sizes[c]));
            }
        }
        loop_results(scan, operands, carried, stacked, dims)
    }
}

/// The loop's results as tensors: the final carries (the initial ones for
/// a loop of no steps), then the stacked outputs. (Values read from the
/// body's buffers are of their element type already: no rounding pass.)
fn loop_results(
    scan: &Scan,
    operands: &[Tensor],
    carried: Vec<Vec<f64>>,
    stacked: Vec<Vec<f64>>,
    dims: &BTreeMap<String, usize>,
) -> Result<Vec<Tensor>, InterpError> {
    let mut out = Vec::with_capacity(scan.results.len());
    for (carry, value) in carried.into_iter().enumerate() {
        let node = scan.body.node(scan.results[carry]);
        let data = match value.is_empty() {
            true => operands[carry].data.clone(),
            false => value,
        };
        let shape = concrete(node.shape(), dims)?;
        out.push(Tensor {
            dtype: node.dtype(),
            shape,
            data,
        });
    }
    for (j, data) in stacked.into_iter().enumerate() {
        let node = scan.body.node(scan.results[scan.carries + j]);
        let shape = concrete(&scan.stacked(node.shape()), dims)?;
        out.push(Tensor {
            dtype: node.dtype(),
            shape,
            data,
        });
    }
    Ok(out)
}
