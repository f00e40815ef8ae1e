//! A `scan` on the JIT: its body compiled once into a program of its own
//! (optimized by the passes, with the body's results kept), bound to a
//! frame for the sizes of the run, and called once per step. The carries
//! stay in the body frame's buffers from step to step: each step writes
//! only the sequences' elements and the new carries, and copies the
//! per-step outputs into their places in the stacked results. The
//! constants are written once per loop.

use std::collections::BTreeMap;
use std::sync::Arc;

use crate::interp::{Context, InterpError, concrete};
use crate::ir::{NodeId, Scan, Shape, expand};
use crate::jit::bind::{self, Frames, internal, own_id, slot_in};
use crate::jit::cache::ClifText;
use crate::jit::host::StepHost;
use crate::jit::native::frame::Buffers;
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

    /// Runs the loop on the outer frame's buffers: the operands are read
    /// from `operands` (their buffers), and each result (the final
    /// carries, then the stacked outputs) is written into every buffer
    /// `results` lists for it; `dims` are the outer sizes.
    pub(super) fn run(
        &mut self,
        scan: &Scan,
        outer: &mut Buffers<'_>,
        (operands, results): (&[usize], &[Vec<usize>]),
        dims: &BTreeMap<String, usize>,
        context: Context,
    ) -> Result<(), InterpError> {
        let graph = Arc::clone(&self.program.graph);
        let own = |id: NodeId| own_id(&self.program.ids, id);
        let inputs: Vec<NodeId> = scan
            .inputs
            .iter()
            .map(|&id| own(id))
            .collect::<Result<_, _>>()?;
        let body_results: Vec<NodeId> = scan
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
        let result_slots: Vec<usize> = body_results
            .iter()
            .map(|&id| slot_in(&bound.slots, id))
            .collect::<Result<_, _>>()?;
        let size = |id: NodeId| -> Result<usize, InterpError> {
            Ok(concrete(graph.node(id).shape(), dims)?.iter().product())
        };
        let input_sizes: Vec<usize> = inputs
            .iter()
            .map(|&id| size(id))
            .collect::<Result<_, _>>()?;
        let sizes: Vec<usize> = body_results
            .iter()
            .map(|&id| size(id))
            .collect::<Result<_, _>>()?;
        // The carries' first values and the constants, once.
        {
            let mut buffers = bound.frame.buffers();
            let constants = scan.carries + scan.sequences..scan.inputs.len();
            for position in (0..scan.carries).chain(constants) {
                if let Some(slot) = input_slots[position] {
                    let whole = 0..input_sizes[position];
                    buffers
                        .copy_from((slot, 0), outer, (operands[position], whole))
                        .map_err(internal)?;
                }
            }
        }
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
        let mut carried = Vec::new();
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
                    let width = input_sizes[position];
                    buffers
                        .copy_from(
                            (slot, 0),
                            outer,
                            (operands[position], t * width..(t + 1) * width),
                        )
                        .map_err(internal)?;
                }
            }
            let (mut host, frame) = StepHost::of(&graph, bound, context);
            frame.run(&mut host, context)?;
            let mut buffers = bound.frame.buffers();
            for (j, targets) in results[scan.carries..].iter().enumerate() {
                let (slot, width) = (result_slots[scan.carries + j], sizes[scan.carries + j]);
                for &target in targets {
                    outer
                        .copy_from((target, t * width), &buffers, (slot, 0..width))
                        .map_err(internal)?;
                }
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
            for c in 0..scan.carries {
                if let Some(leaf) = carry_slots[c] {
                    carried.clear();
                    carried.extend_from_slice(&buffers.read(result_slots[c], sizes[c]));
                    buffers.write(leaf, &carried).map_err(internal)?;
                }
            }
        }
        // The final carries: in the carries' buffers after an exchange,
        // else still in the results' (the first values for no steps).
        let buffers = bound.frame.buffers();
        for (c, targets) in results[..scan.carries].iter().enumerate() {
            let from = match (length, exchange) {
                (0, _) => None,
                (_, true) => carry_slots[c],
                (_, false) => Some(result_slots[c]),
            };
            for &target in targets {
                match from {
                    Some(slot) => outer.copy_from((target, 0), &buffers, (slot, 0..sizes[c])),
                    None => {
                        let first = outer.read(operands[c], sizes[c]).into_owned();
                        outer.write(target, &first)
                    }
                }
                .map_err(internal)?;
            }
        }
        Ok(())
    }
}
