//! gradc as a library, end to end: compile a model from a string, train it
//! on the embedded digits data, evaluate it, read and write params by name,
//! and save a checkpoint. Run with `cargo run --release --example train_api`.

use gradc::driver::compile_source;
use gradc::interp::Tensor;
use gradc::lower::LowerOptions;
use gradc::train::run::{self, RunOptions};
use gradc::train::{Interpreter, checkpoint, data};

const MODEL: &str = "
model tiny {
    input x: f32[B, 64]
    input y: i32[B]
    param w1: f32[64, 32] = kaiming_uniform
    param b1: f32[32]     = zeros
    param w2: f32[32, 10] = xavier_uniform
    param b2: f32[10]     = zeros
    let logits = relu(x / 16 @ w1 + b1) @ w2 + b2
    output logits
    loss cross_entropy(logits, y)
}

train tiny {
    optimizer adam(lr = 3e-3)
    batch  32
    epochs 5
    seed   1
}
";

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // Compile: diagnostics come back as data.
    let compilation = compile_source("tiny.grad", MODEL, LowerOptions::default());
    if compilation.has_errors() {
        eprint!("{}", compilation.render_diagnostics());
        return Err("the model does not compile".into());
    }
    let model = compilation.model(Some("tiny"))?;
    let config = model.train_config.clone().unwrap_or_default();

    // Train on the embedded digits (the train block names no data).
    let options = RunOptions {
        verbose: true,
        ..RunOptions::default()
    };
    let (mut session, summary) = run::train(model, config, &options)?;
    println!("trained {} epochs, {} steps", summary.epochs, summary.steps);

    // Evaluate on every row with the eval graph.
    let digits = data::load(&data::Source::EmbeddedDigits, &session.eval_graph)?;
    let rows: Vec<usize> = (0..digits.rows).collect();
    let metrics = session.evaluate(&mut Interpreter, &digits, &rows)?;
    println!(
        "all {} rows: loss {:.4}, accuracy {:.2}%",
        metrics.rows,
        metrics.loss,
        metrics.accuracy.unwrap_or(0.0) * 100.0
    );

    // Read and write params by name: zero the output bias and evaluate again.
    let b2 = &session.state()?["b2"];
    println!("b2 = {:?}", &b2.data[..3]);
    let zeros = Tensor::zeros(b2.dtype, &b2.shape);
    session.state_mut()?.insert("b2".into(), zeros);
    let metrics = session.evaluate(&mut Interpreter, &digits, &rows)?;
    println!(
        "with b2 = 0: accuracy {:.2}%",
        metrics.accuracy.unwrap_or(0.0) * 100.0
    );

    // Save params, buffers, optimizer state and counters as safetensors.
    let path = std::env::temp_dir().join("tiny.safetensors");
    checkpoint::save(&session, &path)?;
    println!("saved {}", path.display());
    Ok(())
}
