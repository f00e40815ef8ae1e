//! Fuzz target: the JIT against the reference interpreter. Arbitrary bytes
//! as a model file; every model that compiles (and is small enough to run
//! quickly) is run, eval graph and step graph, on both backends with the
//! same random leaves. Nothing may panic; both backends must succeed or
//! both fail; and where both succeed, every result (outputs, loss,
//! gradients, updates, statistics) must agree to a tolerance loose enough
//! for the GEMM's summation order and the polynomial functions on
//! arbitrary inputs; and two steps with the state kept in the JIT between
//! them agree with the interpreter fed its own updates. Run with `cargo fuzz run backends` (see
//! `docs/testing.md`).
#![no_main]

use std::collections::BTreeMap;

use gradc::driver::compile_bytes;
use gradc::interp::{self, Context, Tensor};
use gradc::ir::{DType, Dim, Graph, NodeId, Role};
use gradc::jit::Jit;
use gradc::lower::LowerOptions;
use gradc::train::{Backend, Carried};
use libfuzzer_sys::fuzz_target;

/// Symbolic dimensions are bound to this size.
const SIZE: usize = 3;
/// Graphs with a value larger than this, or more nodes, are skipped.
const MAX_ELEMENTS: usize = 20_000;
const MAX_NODES: usize = 400;

fn small(graph: &Graph) -> bool {
    graph.ids().len() <= MAX_NODES
        && graph.ids().iter().all(|&id| {
            graph
                .node(id)
                .shape()
                .0
                .iter()
                .try_fold(1usize, |count, d| {
                    let size = match d {
                        Dim::Fixed(n) => usize::try_from(*n).ok()?,
                        Dim::Sym(_) => SIZE,
                    };
                    count.checked_mul(size)
                })
                .is_some_and(|count| count <= MAX_ELEMENTS)
        })
}

fn leaves(graph: &Graph) -> BTreeMap<String, Tensor> {
    gradc::gradcheck::random_step_leaves(graph, 3, SIZE, 0.01, 1.0)
}

fn agree(a: &Tensor, b: &Tensor) -> bool {
    if a.shape != b.shape || a.data.len() != b.data.len() {
        return false;
    }
    let scale = a
        .data
        .iter()
        .filter(|v| v.is_finite())
        .fold(1.0f64, |m, v| m.max(v.abs()));
    let tolerance = if a.dtype == DType::F64 { 1e-6 } else { 1e-2 };
    a.data.iter().zip(&b.data).all(|(&x, &y)| {
        x == y
            || (x.is_nan() && y.is_nan())
            // Overflow may happen in one summation order and not the other.
            || !x.is_finite()
            || !y.is_finite()
            || (x - y).abs() <= tolerance * scale
    })
}

/// The interpreter against the JIT on the graph as given (`run`) and on
/// the optimized graph (`run_wanted` of the results, as training runs it).
fn compare(graph: &Graph) {
    let leaves = leaves(graph);
    let context = Context { seed: 5, step: 1 };
    let results: Vec<NodeId> = graph
        .ids()
        .into_iter()
        .filter(|&id| graph.node(id).role != Role::Intermediate && !graph.node(id).op.is_leaf())
        .collect();
    let mut jit = Jit::new();
    for optimized in [false, true] {
        let expected = interp::evaluate(graph, &leaves, context);
        let got = if optimized {
            jit.run_wanted(graph, &leaves, context, &results)
        } else {
            jit.run(graph, &leaves, context)
        };
        match (expected, got) {
            (Ok(expected), Ok(got)) => {
                for &id in &results {
                    let role = &graph.node(id).role;
                    let (Some(a), Some(b)) = (expected.values.get(&id), got.values.get(&id)) else {
                        panic!("{id:?} ({role:?}) has no value (optimized: {optimized})");
                    };
                    assert!(
                        agree(a, b),
                        "{id:?} {role:?} (optimized: {optimized}): {:?} vs {:?}",
                        a.data,
                        b.data
                    );
                }
            }
            (Err(_), Err(_)) => {}
            (expected, got) => panic!(
                "the backends disagree (optimized: {optimized}): {expected:?} vs {got:?}"
            ),
        }
    }
}

/// Two training steps with the state kept in the JIT's frame between
/// them (`run_carrying`, as `Session::step` runs it), against the
/// interpreter fed its own updates: the second step's results and the
/// state it computes must agree.
fn compare_carried(graph: &Graph) {
    let Ok(carried) = Carried::of(graph) else {
        return;
    };
    let wanted: Vec<NodeId> = graph
        .ids()
        .into_iter()
        .filter(|&id| matches!(graph.node(id).role, Role::Stat(_) | Role::Loss))
        .collect();
    let leaves = leaves(graph);
    let (first, second) = (Context { seed: 5, step: 1 }, Context { seed: 5, step: 2 });
    let Ok(once) = interp::evaluate(graph, &leaves, first) else {
        return;
    };
    let mut next = leaves.clone();
    for c in &carried {
        next.insert(c.name.clone(), once.values[&c.update].clone());
    }
    let expected = interp::evaluate(graph, &next, second);
    let mut jit = Jit::new();
    let mut kept = None;
    let Ok(_) = jit.run_carrying(graph, &leaves, first, &wanted, &carried, &mut kept) else {
        return;
    };
    // (The leaves still hold the first step's state: the JIT's own replace it.)
    let got = jit.run_carrying(graph, &leaves, second, &wanted, &carried, &mut kept);
    match (expected, got) {
        (Ok(expected), Ok(got)) => {
            for id in &wanted {
                assert!(agree(&expected.values[id], &got.values[id]), "{id:?} after a kept step");
            }
            let kept = kept.expect("the JIT keeps the state");
            let state = jit.fetch_kept(&kept, true).expect("the kept state");
            for c in &carried {
                assert!(
                    agree(&expected.values[&c.update], &state[&c.name]),
                    "kept `{}` after two steps",
                    c.name
                );
            }
        }
        (Err(_), Err(_)) => {}
        (expected, got) => panic!("the backends disagree on a kept step: {expected:?} vs {got:?}"),
    }
}

fuzz_target!(|data: &[u8]| {
    for dtype in [DType::F64, DType::F32] {
        let compilation = compile_bytes("fuzz.grad", data, LowerOptions { float_dtype: Some(dtype) });
        // Step graphs of any model, even an empty one, are built (or
        // refused) without a panic; only models without errors run.
        for model in &compilation.models {
            if let Some(config) = model.train_config.clone() {
                let _ = gradc::step::build(&model.train, &config);
            }
        }
        if compilation.has_errors() {
            continue;
        }
        for model in &compilation.models {
            if small(&model.eval) {
                compare(&model.eval);
            }
            let Some(config) = model.train_config.clone() else {
                continue;
            };
            if let Ok(step) = gradc::step::build(&model.train, &config)
                && small(&step)
            {
                compare(&step);
                compare_carried(&step);
            }
        }
    }
});
