//! `scan`: a loop over the leading axis of some tensors with carried state,
//! as one IR node that holds its body graph (JAX's `lax.scan`, TF's
//! `while_loop`), never an unrolling: a 1,000-step loop is one node.
//!
//! The operands of an [`Op::Scan`](super::Op::Scan) node are, in order:
//! the `carries` initial carries, the `sequences` scanned tensors (their
//! axis 0 is the step), then the constants every step reads (`with = [...]`
//! in the language). The body is a graph of its own. Its leaves
//! ([`Scan::inputs`], `input` nodes in operand order) take, at step `t`,
//! the current carries, element `t` of each sequence and the constants.
//! Its [`Scan::results`] are the new carries (one per carry, of the
//! carry's type), then the per-step outputs.
//!
//! The node's results are the final carries, then each per-step output
//! stacked along a new leading axis of [`Scan::length`] steps, in step
//! order even when `reverse` runs the steps from the last to the first
//! (as `lax.scan`). The node's own value is result 0;
//! [`Op::ScanResult`](super::Op::ScanResult) reads any other.
//!
//! Reverse-mode differentiation (`autodiff::scan`) turns a scan into a
//! scan running the other way over the carries saved at every step.

use std::fmt;
use std::sync::Arc;

use super::graph::{Graph, NodeId};
use super::op::TypeError;
use super::types::{Dim, Shape, Type};

/// A loop over the leading axis of its sequences (see the module doc).
#[derive(Clone)]
pub struct Scan {
    /// The graph of one step.
    pub body: Arc<Graph>,
    /// The body's leaves, in the node's operand order: carries, sequence
    /// elements, constants.
    pub inputs: Vec<NodeId>,
    /// The body's results: the new carries, then the per-step outputs.
    pub results: Vec<NodeId>,
    /// How many carries lead the operands and the results.
    pub carries: usize,
    /// How many sequences follow the carries among the operands.
    pub sequences: usize,
    /// The number of steps: the size of every sequence's axis 0.
    pub length: Dim,
    /// Runs the steps from the last to the first.
    pub reverse: bool,
    /// Its derivative recomputes each step's values from the saved carries
    /// instead of saving them (less memory, more work).
    pub checkpoint: bool,
}

impl PartialEq for Scan {
    fn eq(&self, other: &Scan) -> bool {
        Arc::ptr_eq(&self.body, &other.body)
            && self.inputs == other.inputs
            && self.results == other.results
            && self.carries == other.carries
            && self.sequences == other.sequences
            && self.length == other.length
            && self.reverse == other.reverse
            && self.checkpoint == other.checkpoint
    }
}

impl fmt::Debug for Scan {
    // The body by address: two scans are the same op only when they share
    // one body (what common-subexpression elimination compares).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "Scan {{ body: {:p}, inputs: {:?}, results: {:?}, carries: {}, sequences: {}, length: {}, reverse: {}, checkpoint: {} }}",
            Arc::as_ptr(&self.body),
            self.inputs,
            self.results,
            self.carries,
            self.sequences,
            self.length,
            self.reverse,
            self.checkpoint
        )
    }
}

impl Scan {
    /// How many per-step outputs the body has.
    pub fn outputs(&self) -> usize {
        self.results.len() - self.carries
    }

    /// The range of operand positions holding sequences.
    pub fn sequence_positions(&self) -> std::ops::Range<usize> {
        self.carries..self.carries + self.sequences
    }

    /// The type of the node's result `index`: a final carry, or a per-step
    /// output with the steps as a new leading axis.
    pub fn result_type(&self, index: usize) -> Option<Type> {
        let ty = &self.body.node(*self.results.get(index)?).ty;
        if index < self.carries {
            return Some(ty.clone());
        }
        Some(Type::new(ty.dtype, self.stacked(&ty.shape)))
    }

    /// A per-step shape with the steps as a new leading axis.
    pub fn stacked(&self, step: &Shape) -> Shape {
        let mut dims = vec![self.length.clone()];
        dims.extend(step.0.iter().cloned());
        Shape(dims)
    }

    /// The type operand `position` must have.
    pub fn operand_type(&self, position: usize) -> Option<Type> {
        let ty = &self.body.node(*self.inputs.get(position)?).ty;
        if self.sequence_positions().contains(&position) {
            return Some(Type::new(ty.dtype, self.stacked(&ty.shape)));
        }
        Some(ty.clone())
    }

    /// The node's type (its result 0) for these operands, or why they do
    /// not fit.
    pub(crate) fn infer(&self, operands: &[&Type]) -> Result<Type, TypeError> {
        if operands.len() != self.inputs.len() {
            return Err(TypeError::Arity {
                expected: self.inputs.len(),
                found: operands.len(),
            });
        }
        for (position, found) in operands.iter().enumerate() {
            let expected = self.operand_type(position).ok_or(TypeError::Arity {
                expected: self.inputs.len(),
                found: operands.len(),
            })?;
            if **found != expected {
                return Err(TypeError::Shapes {
                    what: format!("{expected}, the type the body takes"),
                    operands: (position, position),
                });
            }
        }
        for carry in 0..self.carries {
            let taken = &self.body.node(self.inputs[carry]).ty;
            let returned = &self.body.node(self.results[carry]).ty;
            if taken != returned {
                return Err(TypeError::Shapes {
                    what: format!("carry {carry} returned as {taken}, the type it comes in"),
                    operands: (carry, carry),
                });
            }
        }
        self.result_type(0).ok_or(TypeError::Arity {
            expected: 1,
            found: 0,
        })
    }

    /// The text IR's attributes: the counts, the direction and the body.
    pub(crate) fn attributes(&self) -> String {
        let mut text = format!(
            "carries={} sequences={} length={}",
            self.carries, self.sequences, self.length
        );
        if self.reverse {
            text.push_str(" reverse");
        }
        if self.checkpoint {
            text.push_str(" checkpoint");
        }
        text
    }
}
