//! Compiled code is freed with the programs that hold it: compiling and
//! dropping the digits model's step seventy times leaves the process's
//! resident memory where it was (each program's code took about 20 KB
//! that was never given back before). Alone in its own test binary, so
//! that no other test's allocations move the measurement.

mod common;

use gradc::driver::compile_source;
use gradc::interp::Context;
use gradc::ir::DType;
use gradc::jit::Jit;
use gradc::lower::LowerOptions;
use gradc::train::Backend;

/// The resident set size in KB (Linux), or `None` elsewhere.
fn resident_kb() -> Option<usize> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: usize = statm.split_whitespace().nth(1)?.parse().ok()?;
    Some(pages * 4)
}

#[test]
fn compiled_code_is_freed_with_its_programs() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/digits_mlp.grad");
    let source = std::fs::read_to_string(path).expect("example");
    let compilation = compile_source("digits_mlp.grad", &source, LowerOptions::default());
    let model = &compilation.models[0];
    let config = model.train_config.clone().expect("train block");
    let graph = gradc::step::build(&model.train, &config).expect("step");
    let leaves = common::leaves_for(&graph, DType::F32);
    let context = Context { seed: 1, step: 1 };
    let mut first = None;
    for round in 0..70 {
        let mut jit = Jit::new();
        jit.run(&graph, &leaves, context).expect("jit");
        drop(jit);
        // (The first rounds warm up the allocator.)
        if round == 9 {
            first = resident_kb();
        }
    }
    let (Some(first), Some(last)) = (first, resident_kb()) else {
        return;
    };
    // Sixty programs' code, had it stayed, would be about 1.2 MB.
    assert!(
        last < first + 400,
        "resident memory grew from {first} KB to {last} KB over 60 programs"
    );
}
