//! The graph IR: what a model computes, as a closed set of ops over typed
//! values.
//!
//! # Semantics
//!
//! A [`Graph`] is a DAG of [`Node`]s. Each node applies its [`Op`] to its
//! operands (the nodes its incoming edges come from, in operand order) and
//! produces one tensor of its [`Type`]: an element type (`f32`, `f64`,
//! `i32`) and a [`Shape`] whose dimensions are fixed sizes or symbols such as
//! `B` bound per run. Elementwise binary ops broadcast as in NumPy. Leaves
//! (`input`, `param`, `buffer`, `constant`) have no operands. Each node has
//! a [`Role`]: the leaf roles, `Intermediate`, a named `Output`, or the one
//! `Loss`, a float scalar. A model is lowered once per [`Mode`]: in eval
//! graphs there is no dropout and batch-norm reads its running statistics.
//!
//! The per-op typing rules are `Op::infer`; the invariants the verifier
//! checks are listed in [`verify`]. `docs/language.md` says what each
//! built-in computes; the IR op of the same name computes the same.

pub mod dot;
pub mod expand;
pub mod graph;
pub mod op;
pub mod scan;
pub mod text;
pub mod types;
pub mod verify;

pub use graph::{
    Backward, GradCall, Graph, IdBuildHasher, IdHasher, IdMap, Loc, Mode, Node, NodeId, Origin,
    Role,
};
pub use op::{BinaryFn, Init, KernelOp, Op, ReduceFn, TypeError, UnaryFn};
pub use scan::Scan;
pub use types::{DType, Dim, Shape, Type};
