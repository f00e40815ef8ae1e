//! The optimization passes: one before/after snapshot per pass and input
//! file (`tests/data/passes/<pass>/`), the equivalence of optimized and
//! unoptimized graphs on every example and test model (forward values,
//! gradients, updated params, statistics), a property test over generated
//! models, and provenance after fusion.

mod common;

use std::collections::BTreeMap;
use std::path::Path;

use gradc::autodiff;
use gradc::driver::compile_source;
use gradc::gradcheck::random_leaves;
use gradc::interp::{self, Context, Tensor};
use gradc::ir::{DType, Graph, Mode, Role, text, verify};
use gradc::lower::{LowerOptions, LoweredModel};
use gradc::passes::{self, fusion};
use gradc::random::Stream;
use gradc::step;

fn compile(name: &str, source: &str) -> Vec<LoweredModel> {
    let options = LowerOptions {
        float_dtype: Some(DType::F64),
    };
    let compilation = compile_source(name, source, options);
    assert!(
        !compilation.has_errors(),
        "{name}: {}",
        compilation.render_diagnostics()
    );
    compilation.models
}

/// The graph a pass test starts from: the joint graph of a model with a
/// loss, else its forward graph.
fn start(model: &LoweredModel) -> Graph {
    match model.train.loss() {
        Some(_) => autodiff::differentiate(&model.train).expect("differentiates"),
        None => model.train.clone(),
    }
}

#[test]
fn each_pass_before_and_after() {
    insta::glob!("data/passes/**/*.grad", |path| {
        let pass_name = path
            .parent()
            .and_then(Path::file_name)
            .and_then(|n| n.to_str())
            .expect("pass directory");
        let (_, pass) = passes::PASSES
            .iter()
            .find(|(name, _)| *name == pass_name)
            .expect("a pass of that name");
        let source = std::fs::read_to_string(path).expect("readable");
        let mut out = String::new();
        for model in compile(&path.display().to_string(), &source) {
            let mut graph = start(&model);
            out.push_str("# before\n");
            out.push_str(&text::to_text(&graph));
            let changed = pass(&mut graph);
            assert!(changed, "{pass_name} changed nothing in {}", path.display());
            verify::verify(&graph).expect("the pass keeps the graph valid");
            passes::dce::run(&mut graph);
            out.push_str(&format!("# after {pass_name} (then dce)\n"));
            out.push_str(&text::to_text(&graph));
        }
        insta::assert_snapshot!(out);
    });
}

/// Every value with a role, by a printable key.
fn results(graph: &Graph, leaves: &BTreeMap<String, Tensor>) -> BTreeMap<String, Tensor> {
    let evaluation =
        interp::evaluate(graph, leaves, Context { seed: 3, step: 1 }).expect("evaluates");
    let mut out = BTreeMap::new();
    for id in graph.ids() {
        let node = graph.node(id);
        if node.role != Role::Intermediate && !node.op.is_leaf() {
            out.insert(format!("{:?}", node.role), evaluation.values[&id].clone());
        }
    }
    out
}

fn assert_equivalent(name: &str, before: &Graph, after: &Graph, leaves: &BTreeMap<String, Tensor>) {
    let (a, b) = (results(before, leaves), results(after, leaves));
    assert_eq!(
        a.keys().collect::<Vec<_>>(),
        b.keys().collect::<Vec<_>>(),
        "{name}: results differ"
    );
    for (key, x) in &a {
        let y = &b[key];
        assert_eq!(x.shape, y.shape, "{name}: {key}");
        for (p, q) in x.data.iter().zip(&y.data) {
            let scale = p.abs().max(q.abs()).max(1.0);
            assert!(
                (p - q).abs() <= 1e-10 * scale || (p.is_nan() && q.is_nan()),
                "{name}: {key}: {p} vs {q}"
            );
        }
    }
}

/// Leaves for a step graph: random inputs and params, plus lr and step.
fn step_leaves(graph: &Graph, seed: u64) -> BTreeMap<String, Tensor> {
    let mut leaves = random_leaves(graph, seed, 3);
    for id in graph.ids() {
        let node = graph.node(id);
        if node.role == Role::OptimizerState {
            leaves.insert(
                node.name.clone().unwrap_or_default(),
                Tensor::zeros(node.dtype(), &leaves_shape(graph, id)),
            );
        }
    }
    leaves.insert(step::LR.into(), Tensor::scalar(DType::F64, 0.01));
    leaves.insert(step::STEP.into(), Tensor::scalar(DType::F64, 1.0));
    leaves
}

fn leaves_shape(graph: &Graph, id: gradc::ir::NodeId) -> Vec<usize> {
    graph
        .node(id)
        .shape()
        .0
        .iter()
        .map(|d| match d {
            gradc::ir::Dim::Fixed(n) => *n as usize,
            gradc::ir::Dim::Sym(_) => 3,
        })
        .collect()
}

fn check_model(name: &str, model: &LoweredModel) {
    let mut graphs = vec![(format!("{name} eval"), model.eval.clone())];
    if model.train.loss().is_some() {
        let config = model.train_config.clone().unwrap_or_default();
        graphs.push((
            format!("{name} step"),
            step::build(&model.train, &config).expect("step graph"),
        ));
    }
    for (label, before) in graphs {
        let mut after = before.clone();
        passes::optimize(&mut after, |_, _| {});
        verify::verify(&after).expect("optimized graph verifies");
        // Only `expand` adds nodes (a composite's primitives): the passes
        // after it never grow the graph.
        let mut expanded = before.clone();
        passes::patterns::run(&mut expanded);
        gradc::ir::expand::run(&mut expanded);
        assert!(
            after.len() <= expanded.len(),
            "{label}: the passes grew the graph"
        );
        let leaves = step_leaves(&before, 5);
        assert_equivalent(&label, &before, &after, &leaves);
        // Provenance survives fusion: every kernel op knows its source
        // position, and every backward op its grad_fn.
        let plan = fusion::plan(&after);
        for kernel in &plan.kernels {
            for &id in &kernel.nodes {
                let node = after.node(id);
                assert!(
                    node.origin.line > 0,
                    "{label}: {} lost its source line",
                    node.op.name()
                );
                if let Some(backward) = &node.backward {
                    assert!(
                        backward.grad_fn.ends_with("Backward")
                            || backward.grad_fn.ends_with("Grad")
                            || backward.grad_fn == "GradSeed",
                        "{label}: {}",
                        backward.grad_fn
                    );
                }
            }
        }
    }
}

#[test]
fn optimized_graphs_compute_what_unoptimized_ones_do() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    for dir in ["examples", "tests/data", "tests/data/functions"] {
        for entry in std::fs::read_dir(root.join(dir)).expect("dir") {
            let path = entry.expect("entry").path();
            if path.extension().is_none_or(|e| e != "grad") {
                continue;
            }
            let source = std::fs::read_to_string(&path).expect("readable");
            for model in compile(&path.display().to_string(), &source) {
                check_model(&path.display().to_string(), &model);
            }
        }
    }
}

/// A random model: a chain of random ops over a param, with constants,
/// transposes, broadcasting and reductions, ending in a scalar loss.
fn generated_model(seed: u64) -> String {
    let mut stream = Stream::new(seed);
    let mut lines = vec![
        "    input x: f64[B, 4]".to_string(),
        "    param w: f64[4, 4] = xavier_uniform".into(),
        "    param v: f64[4] = uniform(-1, 1)".into(),
        "    let h0 = x".into(),
    ];
    let count = 3 + stream.below(8) as usize;
    for i in 0..count {
        let h = format!("h{i}");
        let pick = stream.below(14);
        let expr = match pick {
            0 => format!("{h} @ w"),
            1 => format!("{h} @ transpose(w)"),
            2 => format!("tanh({h}) * 1 + 0"),
            3 => format!("{h} + v"),
            4 => format!("-(-{h})"),
            5 => format!("log(exp({h} * 0.5))"),
            6 => format!("{h} * {h} - {h} * {h} + {h}"),
            7 => format!("sigmoid({h}) * 2 + stop_gradient({h})"),
            8 => format!("{h} - max({h}, axis = 1, keepdims = true)"),
            9 => format!("log(softmax({h}, axis = -1))"),
            10 => format!("transpose(transpose({h})) / (1 + exp(1))"),
            11 => format!("relu({h}) + relu({h})"),
            12 => format!("{h} * sum({h}, axis = 0, keepdims = true)"),
            _ => format!("leaky_relu({h}, 0.1) - 0"),
        };
        lines.push(format!("    let h{} = {expr}", i + 1));
    }
    lines.push(format!("    loss mean(h{count} * h{count}) + sum(v * v)"));
    format!("model generated {{\n{}\n}}\n", lines.join("\n"))
}

#[test]
fn passes_preserve_results_on_generated_models() {
    for seed in 0..60 {
        let source = generated_model(seed);
        for model in compile(&format!("generated {seed}"), &source) {
            let mut joint = autodiff::differentiate(&model.train).expect("differentiates");
            let before = joint.clone();
            let mut rounds = 0;
            passes::optimize(&mut joint, |_, graph| {
                rounds += 1;
                verify::verify(graph).expect("every pass keeps the graph valid");
            });
            let leaves = random_leaves(&before, seed, 3);
            assert_equivalent(
                &format!("generated model {seed}:\n{source}"),
                &before,
                &joint,
                &leaves,
            );
            let _ = Mode::Train;
        }
    }
}

#[test]
fn snapshot_command_writes_checks_and_diffs() {
    let dir = std::env::temp_dir().join(format!("gradc-snapshots-{}", std::process::id()));
    let dir_text = dir.to_str().expect("utf-8").to_string();
    let (code, out, _) = common::run(&[
        "snapshot",
        "examples/digits_mlp.grad",
        "examples/regression.grad",
        "--dir",
        &dir_text,
    ]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("wrote 18 snapshot files"), "{out}");
    for stage in [
        "forward.train",
        "forward.eval",
        "backward.train",
        "backward.eval",
        "step.train",
        "optimized.train",
        "optimized.eval",
        "kernels.train",
        "kernels.eval",
    ] {
        assert!(
            dir.join(format!("digits_mlp.{stage}.txt")).exists(),
            "{stage}"
        );
    }
    let (code, out, _) = common::run(&[
        "snapshot",
        "examples/digits_mlp.grad",
        "--dir",
        &dir_text,
        "--check",
    ]);
    assert_eq!(code, 0, "{out}");
    let path = dir.join("digits_mlp.forward.train.txt");
    let saved = std::fs::read_to_string(&path).expect("saved");
    std::fs::write(&path, saved.replace("relu", "gelu")).expect("edit");
    let (code, out, _) = common::run(&[
        "snapshot",
        "examples/digits_mlp.grad",
        "--dir",
        &dir_text,
        "--check",
    ]);
    assert_eq!(code, 1);
    assert!(
        out.contains("-  %10 = gelu %9") && out.contains("+  %10 = relu %9"),
        "{out}"
    );
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn graph_stages_and_diff_modes() {
    let (code, out, _) = common::run(&["graph", "examples/bn_dropout.grad", "--diff-modes"]);
    assert_eq!(code, 0);
    assert!(
        out.contains("dropout: 1 in train mode, gone in eval mode"),
        "{out}"
    );
    assert!(out.contains("+  %12 = batch_norm.eval"), "{out}");
    let (code, out, _) = common::run(&["graph", "examples/digits_mlp.grad", "--stage", "kernels"]);
    assert_eq!(code, 0);
    assert!(
        out.contains("MatMul over [B, 128]") && out.contains("peak live"),
        "{out}"
    );
    let (code, out, _) = common::run(&[
        "graph",
        "examples/digits_mlp.grad",
        "--stage",
        "optimized",
        "--dump-after",
        "simplify",
    ]);
    assert_eq!(code, 0);
    assert!(
        out.starts_with("# after simplify (run 1)\ngraph digits_mlp (train)"),
        "{out}"
    );
    let (code, _, _) = common::run(&[
        "graph",
        "examples/digits_mlp.grad",
        "--dump-after",
        "nonsense",
    ]);
    assert_eq!(code, 2);
}

#[test]
fn subgraphs_of_frozen_params_run_once_per_run() {
    let (code, out, _) = common::run(&[
        "graph",
        "tests/data/frozen_invariant.grad",
        "--stage",
        "kernels",
    ]);
    assert_eq!(code, 0);
    let once: Vec<&str> = out.lines().filter(|l| l.contains("once per run")).collect();
    assert_eq!(once.len(), 1, "{out}");
    assert!(once[0].contains("Elementwise over [4, 4], 2 ops"), "{out}");
    // Nothing that reads an input or a trainable param is invariant.
    let source = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/data/frozen_invariant.grad"
    ))
    .expect("file");
    let model = &compile("frozen_invariant.grad", &source)[0];
    let invariant = fusion::step_invariant(&model.train);
    for id in invariant {
        let node = model.train.node(id);
        assert!(
            !matches!(node.role, Role::Input | Role::Param),
            "{} is not invariant",
            node.op.name()
        );
    }
}
