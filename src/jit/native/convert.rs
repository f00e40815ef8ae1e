//! The conversions of leaves between the interpreter's `f64` and the
//! frame's `f32` buffers, compiled for the widest vectors the host has
//! (AVX-512, else AVX2; `native::vectors`) and chosen at run time.

use super::{Vectors, vectors};

/// `to[i] = from[i] as f32` (rounded to nearest): the leaves copied into
/// `f32` buffers every step.
pub(in crate::jit) fn narrow_elements(from: &[f64], to: &mut [f32]) {
    convert(from, to, |v| v as f32);
}

/// `to[i] = f64::from(from[i])` (exact): values copied out of `f32`
/// buffers every step.
pub(in crate::jit) fn widen_elements(from: &[f32], to: &mut [f64]) {
    convert(from, to, f64::from);
}

/// `to[i] = convert(from[i])`: the same loop, compiled for AVX-512 or for
/// AVX2 where the host has them (the compiler vectorizes it, eight or
/// four `f64`s at a time), else for the baseline (two, SSE2).
fn convert<A: Copy, B>(from: &[A], to: &mut [B], convert: impl Fn(A) -> B) {
    match vectors() {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: AVX-512F is present (`vectors`); the loop only
        // converts, in bounds (the slices' own iteration).
        Vectors::Avx512 => unsafe { convert_avx512(from, to, convert) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: AVX2 and FMA are present (`vectors`); as above.
        Vectors::Avx2 => unsafe { convert_avx2(from, to, convert) },
        _ => convert_loop(from, to, convert),
    }
}

/// The loop itself; inlined into each compilation of `convert`.
#[inline(always)]
fn convert_loop<A: Copy, B>(from: &[A], to: &mut [B], convert: impl Fn(A) -> B) {
    for (to, &from) in to.iter_mut().zip(from) {
        *to = convert(from);
    }
}

/// `convert_loop` compiled for AVX-512.
///
/// # Safety
/// AVX-512F must be present.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn convert_avx512<A: Copy, B>(from: &[A], to: &mut [B], convert: impl Fn(A) -> B) {
    convert_loop(from, to, convert);
}

/// `convert_loop` compiled for AVX2.
///
/// # Safety
/// AVX2 and FMA must be present.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn convert_avx2<A: Copy, B>(from: &[A], to: &mut [B], convert: impl Fn(A) -> B) {
    convert_loop(from, to, convert);
}
