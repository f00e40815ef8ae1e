//! Fuzz target: data and checkpoint files. Arbitrary bytes as CSV text, as a
//! `.npy` file and as a safetensors file (then as a checkpoint to resume the
//! digits model from): every outcome must be data or an error, never a
//! panic. Run with `cargo fuzz run data`.
#![no_main]

use std::sync::OnceLock;

use gradc::driver::compile_source;
use gradc::lower::LowerOptions;
use gradc::lower::LoweredModel;
use gradc::lower::train::LabelColumn;
use gradc::train::{Session, data};
use libfuzzer_sys::fuzz_target;

fn model() -> &'static LoweredModel {
    static MODEL: OnceLock<LoweredModel> = OnceLock::new();
    MODEL.get_or_init(|| {
        let source = "model m { input x: f32[B, 3] input y: i32[B] param w: f32[3, 4] = zeros param b: f32[4] = zeros loss cross_entropy(x @ w + b, y) }";
        compile_source("m.grad", source, LowerOptions::default()).models.remove(0)
    })
}

fuzz_target!(|bytes: &[u8]| {
    if let Ok(text) = std::str::from_utf8(bytes) {
        let _ = data::parse_csv("fuzz.csv", text, LabelColumn::Last);
        let _ = data::parse_csv("fuzz.csv", text, LabelColumn::First);
    }
    let _ = data::parse_npy("fuzz.npy", bytes);
    if let Ok(tensors) = gradc::tensor_file::parse(std::path::Path::new("fuzz.safetensors"), bytes) {
        let model = model();
        let mut session = Session::new(model, model.train_config.clone().unwrap_or_default(), &[]).expect("session");
        let dir = std::env::temp_dir().join(format!("gradc-fuzz-{}", std::process::id()));
        let _ = std::fs::create_dir_all(&dir);
        let path = dir.join("c.safetensors");
        if gradc::tensor_file::write(&path, &tensors).is_ok() {
            let _ = gradc::train::checkpoint::resume(&mut session, &path);
            let _ = gradc::train::checkpoint::load_init(&mut session, &path);
        }
    }
});
