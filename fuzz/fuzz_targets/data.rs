//! Fuzz target: data and checkpoint files. Arbitrary bytes as CSV text
//! (positional and with inputs named in the header), as a `.npy` file, as
//! an `.npz` archive and as a safetensors file, each parsed and then loaded
//! through `data::load` against a model (the checks against its inputs),
//! and the safetensors bytes as a checkpoint to resume, fine-tune and
//! evaluate from: every outcome must be data or an error, never a panic.
//! Run with `cargo fuzz run data`.
#![no_main]

use std::path::PathBuf;
use std::sync::OnceLock;

use gradc::driver::compile_source;
use gradc::lower::LowerOptions;
use gradc::lower::LoweredModel;
use gradc::lower::train::LabelColumn;
use gradc::train::{Session, checkpoint, data};
use libfuzzer_sys::fuzz_target;

fn model() -> &'static LoweredModel {
    static MODEL: OnceLock<LoweredModel> = OnceLock::new();
    MODEL.get_or_init(|| {
        let source = "model m { input x: f32[B, 3] input mask: f32[B, 3] input y: i32[B] param w: f32[3, 4] = zeros param b: f32[4] = zeros loss cross_entropy((x * mask) @ w + b, y) }";
        compile_source("m.grad", source, LowerOptions::default()).models.remove(0)
    })
}

fn scratch() -> PathBuf {
    let dir = std::env::temp_dir().join(format!("gradc-fuzz-{}", std::process::id()));
    let _ = std::fs::create_dir_all(&dir);
    dir
}

fuzz_target!(|bytes: &[u8]| {
    let model = model();
    let specs = data::input_specs(&model.train);
    if let Ok(text) = std::str::from_utf8(bytes) {
        let _ = data::parse_csv("fuzz.csv", text, LabelColumn::Last, &specs);
        let _ = data::parse_csv("fuzz.csv", text, LabelColumn::First, &specs[..2]);
    }
    let _ = data::parse_npy("fuzz.npy", bytes);
    let _ = data::parse_npz("fuzz.npz", bytes);
    let dir = scratch();
    for extension in ["csv", "npy", "npz", "safetensors"] {
        let path = dir.join(format!("d.{extension}"));
        if std::fs::write(&path, bytes).is_ok() {
            let source = data::Source::from_path(path, LabelColumn::Last, None);
            let _ = data::load(&source, &model.train);
        }
    }
    if let Ok(tensors) =
        gradc::tensor_file::parse(std::path::Path::new("fuzz.safetensors"), bytes)
    {
        let config = model.train_config.clone().unwrap_or_default();
        let path = dir.join("c.safetensors");
        if gradc::tensor_file::write(&path, &tensors).is_ok() {
            for load in [checkpoint::load_for_eval, |s: &mut Session, p: &std::path::Path| {
                checkpoint::load_init(s, p).map(|_| ())
            }] {
                let mut session = Session::new(model, config.clone(), &[]).expect("session");
                let _ = load(&mut session, &path);
            }
            let mut session = Session::new(model, config, &[]).expect("session");
            let _ = checkpoint::resume(&mut session, &path);
        }
    }
});
