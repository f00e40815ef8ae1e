//! Deterministic random numbers.
//!
//! Two kinds: [`Stream`], a seeded sequence (initializers, shuffles, test
//! data), and `uniform_at`, a counter-based generator: a pure function of
//! its key `(seed, step, key, index)`, so that any backend, in any order,
//! draws the same dropout mask for the same element. Both are SplitMix64
//! (Steele, Lea and Flood, 2014), whose finalizer is a good 64-bit mixer.

/// SplitMix64's finalizer: a bijective mix of 64 bits.
pub(crate) fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

const GOLDEN: u64 = 0x9E37_79B9_7F4A_7C15;

/// A uniform number in `[0, 1)` that depends only on its key.
pub(crate) fn uniform_at(seed: u64, step: u64, key: u32, index: u64) -> f64 {
    let mut h = mix(seed.wrapping_add(GOLDEN));
    h = mix(h ^ step.wrapping_mul(GOLDEN));
    h = mix(h ^ u64::from(key)
        .wrapping_add(1)
        .wrapping_mul(0xD6E8_FEB8_6659_FD93));
    h = mix(h ^ index.wrapping_mul(0xA076_1D64_78BD_642F));
    unit(h)
}

/// The top 53 bits of `bits` as a float in `[0, 1)`.
fn unit(bits: u64) -> f64 {
    (bits >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
}

/// A seeded stream of random numbers.
#[derive(Clone, Debug)]
pub struct Stream {
    state: u64,
    spare: Option<f64>,
}

impl Stream {
    /// A stream from a seed.
    pub fn new(seed: u64) -> Stream {
        Stream {
            state: mix(seed ^ 0x5DEE_CE66_D1CE_5EED),
            spare: None,
        }
    }

    /// The next 64 random bits.
    pub(crate) fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(GOLDEN);
        mix(self.state)
    }

    /// Uniform in `[0, 1)`.
    pub fn uniform(&mut self) -> f64 {
        unit(self.next_u64())
    }

    /// Uniform in `[lo, hi)`.
    pub(crate) fn uniform_in(&mut self, lo: f64, hi: f64) -> f64 {
        lo + (hi - lo) * self.uniform()
    }

    /// A standard normal number (Box-Muller).
    pub(crate) fn normal(&mut self) -> f64 {
        if let Some(spare) = self.spare.take() {
            return spare;
        }
        let u1 = 1.0 - self.uniform();
        let u2 = self.uniform();
        let radius = (-2.0 * u1.ln()).sqrt();
        let angle = std::f64::consts::TAU * u2;
        self.spare = Some(radius * angle.sin());
        radius * angle.cos()
    }

    /// Uniform integer in `0..n` (`n > 0`), without modulo bias.
    pub fn below(&mut self, n: u64) -> u64 {
        let n = n.max(1);
        let zone = u64::MAX - u64::MAX % n;
        loop {
            let v = self.next_u64();
            if v < zone {
                return v % n;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counter_based_draws_depend_only_on_the_key() {
        let a = uniform_at(7, 3, 1, 99);
        assert_eq!(a, uniform_at(7, 3, 1, 99));
        assert_ne!(a, uniform_at(7, 3, 2, 99));
        assert_ne!(a, uniform_at(7, 4, 1, 99));
        assert_ne!(a, uniform_at(8, 3, 1, 99));
        assert!((0.0..1.0).contains(&a));
    }

    #[test]
    fn uniform_draws_have_the_right_mean() {
        let n = 100_000;
        let mean: f64 = (0..n).map(|i| uniform_at(1, 0, 0, i)).sum::<f64>() / n as f64;
        assert!((mean - 0.5).abs() < 0.01, "{mean}");
        let mut stream = Stream::new(3);
        let normal_mean: f64 = (0..n).map(|_| stream.normal()).sum::<f64>() / n as f64;
        assert!(normal_mean.abs() < 0.02, "{normal_mean}");
    }
}
