//! gradc: a static computation-graph compiler for training neural models.
//!
//! The pipeline, one module per stage:
//!
//! 1. [`syntax`] lexes and parses a `.grad` file into an AST, with error
//!    recovery;
//! 2. [`lower`] resolves names, inlines functions, checks dtypes and shapes
//!    and builds one [`ir::Graph`] per model and mode (train or eval);
//! 3. [`ir`] holds the graph, its verifier and its text and DOT forms.
//!
//! [`driver`] runs the stages in order; `docs/architecture.md` is the map.

pub mod cli;
pub mod diagnostic;
pub mod driver;
pub mod ir;
pub mod lower;
pub mod syntax;
