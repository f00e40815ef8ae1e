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
//!
//! ```
//! use gradc::driver::compile_source;
//! use gradc::ir::{Mode, text};
//! use gradc::lower::LowerOptions;
//!
//! let source = "model m {
//!     input x: f32[B, 3]
//!     param w: f32[3, 2] = xavier_uniform
//!     output y = relu(x @ w)
//! }";
//! let compilation = compile_source("m.grad", source, LowerOptions::default());
//! assert!(!compilation.has_errors(), "{}", compilation.render_diagnostics());
//! let graph = compilation.models[0].graph(Mode::Train);
//! assert!(text::to_text(graph).contains("relu"));
//!
//! // A shape error is a diagnostic naming the line and column.
//! let bad = compile_source("bad.grad", "model m { input x: f32[2] output y = x @ x }", LowerOptions::default());
//! assert!(bad.render_diagnostics().contains("bad.grad:1:38"));
//! ```

pub mod autodiff;
pub mod cli;
pub mod diagnostic;
pub mod driver;
pub mod files;
pub mod format;
pub mod gradcheck;
pub mod interp;
pub mod ir;
pub mod jit;
pub mod ledger;
pub mod lower;
pub mod passes;
pub mod random;
pub mod snapshot;
pub mod step;
pub mod syntax;
pub mod tensor_file;
pub mod train;
