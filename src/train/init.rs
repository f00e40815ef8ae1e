//! Initial values of params and buffers, seeded.
//!
//! Each param draws from its own stream, seeded by the run's seed and the
//! param's name, so adding a param to a model leaves the others' values
//! unchanged. Fans follow the `x @ w` layout (`docs/language.md`):
//! `fan_in` is the product of every dimension but the last, `fan_out` the
//! last dimension; the formulas are PyTorch's `torch.nn.init` with its
//! default gains (`xavier_*`: gain 1; `kaiming_*`: ReLU gain `sqrt(2)`,
//! `fan_in` mode).

use crate::interp::Tensor;
use crate::ir::{DType, Init};
use crate::random::{Stream, mix};

/// A stable 64-bit hash of a name (FNV-1a).
fn name_hash(name: &str) -> u64 {
    name.bytes().fold(0xCBF2_9CE4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01B3)
    })
}

/// The fans of a shape in the `x @ w` layout.
pub(crate) fn fans(shape: &[usize]) -> (f64, f64) {
    match shape.split_last() {
        Some((&out, rest)) if !rest.is_empty() => {
            (rest.iter().product::<usize>() as f64, out as f64)
        }
        Some((&n, _)) => (n as f64, n as f64),
        None => (1.0, 1.0),
    }
}

/// The initial value of the param or buffer `name`.
pub(crate) fn initialize(
    init: Init,
    name: &str,
    dtype: DType,
    shape: &[usize],
    seed: u64,
) -> Tensor {
    let len: usize = shape.iter().product();
    let mut stream = Stream::new(mix(seed ^ name_hash(name)));
    let (fan_in, fan_out) = fans(shape);
    let mut normal = |std: f64, mean: f64| -> Vec<f64> {
        (0..len).map(|_| mean + std * stream.normal()).collect()
    };
    let data = match init {
        Init::Zeros => vec![0.0; len],
        Init::Ones => vec![1.0; len],
        Init::Constant(c) => vec![c; len],
        Init::Normal { mean, std } => normal(std, mean),
        Init::XavierNormal => normal((2.0 / (fan_in + fan_out)).sqrt(), 0.0),
        Init::KaimingNormal => normal((2.0 / fan_in).sqrt(), 0.0),
        Init::Uniform { lo, hi } => (0..len).map(|_| stream.uniform_in(lo, hi)).collect(),
        Init::XavierUniform => {
            let bound = (6.0 / (fan_in + fan_out)).sqrt();
            (0..len).map(|_| stream.uniform_in(-bound, bound)).collect()
        }
        Init::KaimingUniform => {
            let bound = (6.0 / fan_in).sqrt();
            (0..len).map(|_| stream.uniform_in(-bound, bound)).collect()
        }
    };
    Tensor::new(dtype, shape.to_vec(), data)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn moments(t: &Tensor) -> (f64, f64) {
        let n = t.len() as f64;
        let mean = t.data.iter().sum::<f64>() / n;
        let var = t.data.iter().map(|v| (v - mean) * (v - mean)).sum::<f64>() / n;
        (mean, var.sqrt())
    }

    #[test]
    fn fan_based_initializers_have_pytorch_statistics() {
        // A [256, 512] weight is nn.Linear(256, 512): fan_in 256, fan_out 512.
        let shape = [256, 512];
        let (_, std) = moments(&initialize(Init::KaimingNormal, "w", DType::F64, &shape, 1));
        assert!((std - (2.0f64 / 256.0).sqrt()).abs() < 0.002, "{std}");
        let (_, std) = moments(&initialize(Init::XavierNormal, "w", DType::F64, &shape, 1));
        assert!((std - (2.0f64 / 768.0).sqrt()).abs() < 0.002, "{std}");
        let t = initialize(Init::XavierUniform, "w", DType::F64, &shape, 1);
        let bound = (6.0f64 / 768.0).sqrt();
        assert!(t.data.iter().all(|v| v.abs() <= bound));
        let (_, std) = moments(&t);
        assert!((std - bound / 3f64.sqrt()).abs() < 0.002, "{std}");
        let t = initialize(Init::KaimingUniform, "w", DType::F64, &shape, 1);
        assert!(t.data.iter().all(|v| v.abs() <= (6.0f64 / 256.0).sqrt()));
    }

    #[test]
    fn seeds_and_names_decide_the_values() {
        let normal = |name: &str, seed: u64| {
            let init = Init::Normal {
                mean: 0.0,
                std: 1.0,
            };
            initialize(init, name, DType::F32, &[8], seed)
        };
        let a = normal("a", 3);
        assert_eq!(a, normal("a", 3));
        assert_ne!(a, normal("b", 3));
        assert_ne!(a, normal("a", 4));
        assert_eq!(
            initialize(Init::Constant(0.5), "c", DType::F32, &[2], 0).data,
            vec![0.5, 0.5]
        );
    }
}
