//! The one place in gradc allowed `unsafe` (a test, `tests/docs.rs`,
//! checks that no other file allows it): the frame of buffers and the
//! step entry that calls compiled code on them (`frame`, `code`), the
//! GEMM behind bounds-checked safe wrappers (`gemm`) and the leaf
//! conversions compiled for the host's vector width (`convert`). Each
//! `unsafe` block says why it is sound in a `SAFETY` comment.
#![allow(
    unsafe_code,
    reason = "JIT-compiled code, its host trampoline and the raw-pointer GEMM; see the SAFETY comments"
)]

pub(crate) mod code;
pub(crate) mod convert;
pub(crate) mod frame;
pub mod gemm;

/// The widest vectors the native kernels use on this host.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Vectors {
    /// AVX-512F: sixteen `f32`s a register.
    Avx512,
    /// AVX2 with FMA: eight `f32`s a register.
    Avx2,
    /// Neither: the `gemm` crate and the baseline target's loops.
    Baseline,
}

/// The widest `Vectors` the host has, or fewer if `GRADC_VECTORS` says so
/// (`avx2` or `baseline`: to compare the paths on one machine; a wider
/// value than the host has is ignored).
pub(crate) fn vectors() -> Vectors {
    static VECTORS: std::sync::OnceLock<Vectors> = std::sync::OnceLock::new();
    *VECTORS.get_or_init(|| {
        let host = host_vectors();
        let asked = match std::env::var("GRADC_VECTORS").as_deref() {
            Ok("avx2") => Vectors::Avx2,
            Ok("baseline") => Vectors::Baseline,
            _ => Vectors::Avx512,
        };
        // The enum is ordered from the widest: take the narrower.
        if (asked as u8) > (host as u8) {
            asked
        } else {
            host
        }
    })
}

/// What the host has.
fn host_vectors() -> Vectors {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f") {
            return Vectors::Avx512;
        }
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        {
            return Vectors::Avx2;
        }
    }
    Vectors::Baseline
}
