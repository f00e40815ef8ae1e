//! gradc: a static computation-graph compiler for training neural models.
//!
//! The pipeline, one module per stage:
//!
//! 1. `syntax` lexes and parses a `.grad` file into an AST, with error
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
//!
//! Public is what a library user (`examples/train_api.rs`), the CLI
//! (`src/main.rs`), the benchmarks, the fuzz targets and the integration
//! tests reach, and the types those signatures show: the graph and its
//! stages, the interpreter, the JIT (`jit::Jit`, and its GEMM for the
//! benchmarks), training. Everything else is `pub(crate)`: the front
//! end's internals (`syntax`), the file writing (`files`), the number
//! formatting (`format`), the snapshot renderer (`snapshot`), and the
//! helpers inside every module; inside the JIT only `Jit`, `gemm`,
//! `is_sum` and `CodegenError` leave it.

pub mod autodiff;
pub mod cli;
pub mod diagnostic;
pub mod driver;
pub(crate) mod files;
pub(crate) mod format;
pub mod gradcheck;
pub mod interp;
pub mod ir;
pub mod jit;
pub mod ledger;
pub mod lower;
pub mod passes;
pub mod random;
pub(crate) mod snapshot;
pub mod step;
pub(crate) mod syntax;
pub mod tensor_file;
pub mod train;
