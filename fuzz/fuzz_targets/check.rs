//! Fuzz target: lex, parse, check and lower arbitrary bytes, render the
//! diagnostics and print every graph. Nothing may panic, hang or overflow
//! the stack. Run with `cargo fuzz run check` (see `docs/testing.md`).
#![no_main]

use gradc::driver::compile_bytes;
use gradc::ir::{Mode, dot, text, verify};
use gradc::lower::LowerOptions;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let compilation = compile_bytes("fuzz.grad", data, LowerOptions::default());
    let _ = compilation.render_diagnostics();
    for model in &compilation.models {
        for mode in [Mode::Train, Mode::Eval] {
            let graph = model.graph(mode);
            assert_eq!(verify::verify(graph), Ok(()));
            let _ = text::to_text(graph);
            let _ = dot::to_dot(graph);
        }
    }
});
