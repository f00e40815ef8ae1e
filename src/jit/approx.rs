//! Vectorizable polynomial approximations of `exp`, `log`, `tanh`,
//! `sigmoid`, `softplus` and `erf` (for GELU and its derivative), emitted inline for a scalar `f64` or an
//! `f64x2` (the same instructions either way), so compiled kernels need no
//! call per element for them.
//!
//! `exp` reduces `x = n ln 2 + r` with `|r| <= ln 2 / 2` (Cody and Waite:
//! `ln 2` split in two so that `n ln 2` is exact), evaluates the degree-13
//! Taylor polynomial of `e^r` (its truncation error is below `5e-18`
//! relative) as `1 + (r + r^2 P(r))` with the tail `P` by Estrin's scheme
//! (a short chain: `exp_series`), and scales by `2^n` as two exact powers of two
//! built from bits, so that overflow gives `inf`, deep underflow `0`, and
//! subnormal results round once. No float-to-integer conversion is needed:
//! `n` is rounded with the `1.5 * 2^52` shifter. `log` follows fdlibm's
//! evaluation, `tanh` is a Taylor series near 0 and `exp` beyond, `sigmoid`
//! and `softplus` the interpreter's formulas over `exp` and `log`. The
//! errors measured against the platform (`tests/approx.rs`, `docs/jit.md`):
//! at most 1, 1, 3, 2 and 3 ulps in `f64`; `f32` results, rounded from
//! these `f64` values, match the interpreter's. `erf` is fdlibm's
//! piecewise rational method (the interpreter's `libm::erf`) with every
//! piece computed and one picked per lane; GELU and its derivative come
//! within 1 ulp of the interpreter's for `x >= 0` and within `|x| eps`
//! where `1 + erf` cancels (`x < 0`), with identical `f32` results.

use crate::jit::clif::constant;
use crate::jit::clif::pick;
use cranelift_codegen::ir::condcodes::FloatCC;
use cranelift_codegen::ir::{InstBuilder, MemFlagsData, Value, types};
use cranelift_frontend::FunctionBuilder;

/// `1.5 * 2^52`: adding and subtracting it rounds to an integer.
const SHIFTER: f64 = 6_755_399_441_055_744.0;
/// `2^52`: added to a small non-negative integer, the integer's bits.
const TWO_52: f64 = 4_503_599_627_370_496.0;
/// `ln 2` split as in fdlibm: `LN2_HI` has 32 trailing zero bits, so
/// `n * LN2_HI` is exact for `|n| < 2^11`.
const LN2_HI: f64 = f64::from_bits(0x3fe6_2e42_fee0_0000);
const LN2_LO: f64 = f64::from_bits(0x3dea_39ef_3579_3c76);

/// `round(v)` to an integer-valued float (ties to even), for `|v| < 2^51`.
fn round_integer(b: &mut FunctionBuilder<'_>, v: Value) -> Value {
    let shifter = constant(b, v, SHIFTER);
    let shifted = b.ins().fadd(v, shifter);
    b.ins().fsub(shifted, shifter)
}

/// `2^n` for an integer-valued float `n` in `[-1022, 1023]`, from bits:
/// `n + 1023 + 2^52` holds `n + 1023` in its low mantissa bits, and shifting
/// them into the exponent field gives the power of two.
fn power_of_two(b: &mut FunctionBuilder<'_>, n: Value) -> Value {
    let vector = b.func.dfg.value_type(n).is_vector();
    let (float, int) = if vector {
        (types::F64X2, types::I64X2)
    } else {
        (types::F64, types::I64)
    };
    let bias = constant(b, n, 1023.0 + TWO_52);
    let biased = b.ins().fadd(n, bias);
    let bits = b.ins().bitcast(int, MemFlagsData::new(), biased);
    let exponent = b.ins().ishl_imm_u(bits, 52);
    b.ins().bitcast(float, MemFlagsData::new(), exponent)
}

/// Whether the host has fused multiply-add (as `cranelift-native` finds
/// it); without it Cranelift would lower `fma` to a call.
fn has_fma() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("fma")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        true
    }
}

/// `e^x`, to within 1 ulp, for `f64` or `f64x2`.
pub(super) fn exp(b: &mut FunctionBuilder<'_>, x: Value) -> Value {
    // Beyond these bounds e^x is inf or 0 anyway; the clamp keeps n in
    // range. NaN passes through.
    let high = constant(b, x, 710.0);
    let clamped = clamp(b, x, high, FloatCC::GreaterThan);
    exp_of_nonpositive(b, clamped)
}

/// `x`, or `bound` where `x` is beyond it (`beyond`: `GreaterThan` for an
/// upper bound, `LessThan` for a lower one); NaN passes. For vectors a
/// comparison and a selection (as `minpd`/`maxpd` pick), where `fmin` and
/// `fmax`, which must also make NaN of a NaN `bound`, take seven
/// instructions; for scalars `fmin`/`fmax`, the same values.
fn clamp(b: &mut FunctionBuilder<'_>, x: Value, bound: Value, beyond: FloatCC) -> Value {
    if b.func.dfg.value_type(x).is_vector() {
        let outside = b.ins().fcmp(beyond, x, bound);
        pick(b, outside, bound, x)
    } else if beyond == FloatCC::GreaterThan {
        b.ins().fmin(x, bound)
    } else {
        b.ins().fmax(x, bound)
    }
}

/// `exp` without the upper clamp, for an `x` at most 710 or NaN: `exp`
/// itself after that clamp, and the row kernels, whose `x - max(x)` is at
/// most 0 (the same values, a clamp fewer).
pub(super) fn exp_of_nonpositive(b: &mut FunctionBuilder<'_>, x: Value) -> Value {
    let (n, p) = exp_above(b, x, -746.0);
    // 2^n as 2^n1 * 2^n2, each a normal power of two, so the product
    // overflows to inf or underflows (rounding once) like e^x.
    let half = constant(b, x, 0.5);
    let halved = b.ins().fmul(n, half);
    let n1 = round_integer(b, halved);
    let n2 = b.ins().fsub(n, n1);
    let first = power_of_two(b, n1);
    let second = power_of_two(b, n2);
    let p = b.ins().fmul(p, first);
    b.ins().fmul(p, second)
}

/// `exp_of_nonpositive` where the result is only used rounded to `f32`
/// and relative to a sum of at least 1 (a row kernel's exponentials,
/// shifted by the row's maximum): `x` is clamped at -708 instead, so that
/// `2^n` is one normal power of two and one product. Only results below
/// `e^-708` (about `3e-308`) differ, and they, like the exact ones, are 0
/// once rounded to `f32` (or divided by a sum of at least 1 and rounded),
/// and add nothing to such a sum: the `f32` results are the same.
pub(super) fn exp_of_nonpositive_for_f32(b: &mut FunctionBuilder<'_>, x: Value) -> Value {
    let (n, p) = exp_above(b, x, -708.0);
    // (n >= -1022: 2^n is normal.)
    let scale = power_of_two(b, n);
    b.ins().fmul(p, scale)
}

/// `x` clamped at `low` (NaN passes) as `n ln 2 + r`: `(n, e^r)`, the
/// power of two left to the caller.
fn exp_above(b: &mut FunctionBuilder<'_>, x: Value, low: f64) -> (Value, Value) {
    let low = constant(b, x, low);
    let clamped = clamp(b, x, low, FloatCC::LessThan);
    let (n, r) = reduced(b, clamped);
    (n, exp_series(b, x, r))
}

/// `x = n ln 2 + r` with `n` an integer-valued float and `|r| <= ln 2 /
/// 2` (Cody and Waite), for `|x| <= 746`: `(n, r)`.
fn reduced(b: &mut FunctionBuilder<'_>, x: Value) -> (Value, Value) {
    let log2e = constant(b, x, std::f64::consts::LOG2_E);
    let scaled = b.ins().fmul(x, log2e);
    let n = round_integer(b, scaled);
    let ln2_hi = constant(b, x, LN2_HI);
    let ln2_lo = constant(b, x, LN2_LO);
    let high_part = b.ins().fmul(n, ln2_hi);
    let r = b.ins().fsub(x, high_part);
    let low_part = b.ins().fmul(n, ln2_lo);
    (n, b.ins().fsub(r, low_part))
}

/// `e^r = sum r^k / k!` for `k = 0..=13` and `|r| <= ln 2 / 2`, as
/// `1 + (r + r^2 P(r))`: the tail `P(r) = sum r^(k-2) / k!` (`k >= 2`) by
/// Estrin's scheme (pairs of terms, then pairs of pairs over `r^2`, `r^4`
/// and `r^8`: a chain of 4 fused multiply-adds where Horner's rule has
/// 11), and the two leading terms added last, so the result is rounded
/// about once (`|r + r^2 P| < 0.42`). A row kernel's exponentials are one
/// such chain each, and the chain's latency is what bounds it: the tiny
/// step took 0.3 us less than by Horner's rule (`docs/performance.md`).
fn exp_series(b: &mut FunctionBuilder<'_>, x: Value, r: Value) -> Value {
    let mut factorial = 1.0f64;
    let coefficients: Vec<f64> = (0..=13)
        .map(|k| {
            if k > 0 {
                factorial *= f64::from(k);
            }
            1.0 / factorial
        })
        .collect();
    let fused = has_fma();
    // `a * m + c`, fused where the host has it.
    let madd = |b: &mut FunctionBuilder<'_>, a: Value, m: Value, c: Value| {
        if fused {
            b.ins().fma(a, m, c)
        } else {
            let product = b.ins().fmul(a, m);
            b.ins().fadd(product, c)
        }
    };
    let r2 = b.ins().fmul(r, r);
    let r4 = b.ins().fmul(r2, r2);
    let r8 = b.ins().fmul(r4, r4);
    // The tail's pairs `c[k] + c[k+1] r` for k = 2, 4, ..., 12.
    let pairs: Vec<Value> = coefficients[2..]
        .chunks_exact(2)
        .map(|c| {
            let (low, high) = (constant(b, x, c[0]), constant(b, x, c[1]));
            madd(b, high, r, low)
        })
        .collect();
    let quads: Vec<Value> = pairs
        .chunks_exact(2)
        .map(|q| madd(b, q[1], r2, q[0]))
        .collect();
    let low = madd(b, quads[1], r4, quads[0]);
    let tail = madd(b, quads[2], r8, low);
    let linear = madd(b, r2, tail, r);
    let one = constant(b, x, 1.0);
    b.ins().fadd(one, linear)
}

/// The logistic function as the interpreter computes it: `1 / (1 + e^-x)`
/// for `x >= 0`, `e^x / (1 + e^x)` below (NaN gives NaN), over `exp`.
pub(super) fn sigmoid(b: &mut FunctionBuilder<'_>, x: Value) -> Value {
    let magnitude = b.ins().fabs(x);
    let negated = b.ins().fneg(magnitude);
    let e = exp(b, negated);
    let one = constant(b, x, 1.0);
    let denominator = b.ins().fadd(one, e);
    let positive = b.ins().fdiv(one, denominator);
    let negative = b.ins().fdiv(e, denominator);
    let zero = constant(b, x, 0.0);
    let nonnegative = b.ins().fcmp(FloatCC::GreaterThanOrEqual, x, zero);
    pick(b, nonnegative, positive, negative)
}

/// `x` converted to a vector of `i64` bits (or a scalar `i64`).
fn bits_of(b: &mut FunctionBuilder<'_>, x: Value) -> Value {
    let int = if b.func.dfg.value_type(x).is_vector() {
        types::I64X2
    } else {
        types::I64
    };
    b.ins().bitcast(int, MemFlagsData::new(), x)
}

/// The float whose bits are `bits` (the lanes of `like`).
fn float_of(b: &mut FunctionBuilder<'_>, like: Value, bits: Value) -> Value {
    let float = if b.func.dfg.value_type(like).is_vector() {
        types::F64X2
    } else {
        types::F64
    };
    b.ins().bitcast(float, MemFlagsData::new(), bits)
}

/// An `i64` constant with the lanes of `like`.
fn integer(b: &mut FunctionBuilder<'_>, like: Value, value: i64) -> Value {
    let scalar = b.ins().iconst(types::I64, value);
    if b.func.dfg.value_type(like).is_vector() {
        b.ins().splat(types::I64X2, scalar)
    } else {
        scalar
    }
}

/// Evaluates the polynomial with these coefficients (lowest first, given
/// as bits) at `z` by Horner's rule.
fn horner(b: &mut FunctionBuilder<'_>, z: Value, coefficients: &[u64]) -> Value {
    let mut p = constant(b, z, f64::from_bits(coefficients[coefficients.len() - 1]));
    for &c in coefficients[..coefficients.len() - 1].iter().rev() {
        let product = b.ins().fmul(p, z);
        let c = constant(b, z, f64::from_bits(c));
        p = b.ins().fadd(product, c);
    }
    p
}

/// `2 / (2k + 1)` for `k = 1..=12`: `R(z) = 2z/3 + 2z^2/5 + ...`, the
/// tail of `ln(1 + f) = 2s + s R(z)` with `s = f / (2 + f)`, `z = s^2 <=
/// 0.0295` (so the next term is below `1e-20`).
const LOG_SERIES: [u64; 12] = [
    0x3fe5_5555_5555_5555,
    0x3fd9_9999_9999_999a,
    0x3fd2_4924_9249_2492,
    0x3fcc_71c7_1c71_c71c,
    0x3fc7_45d1_745d_1746,
    0x3fc3_b13b_13b1_3b14,
    0x3fc1_1111_1111_1111,
    0x3fbe_1e1e_1e1e_1e1e,
    0x3fba_f286_bca1_af28,
    0x3fb8_6186_1861_8618,
    0x3fb6_42c8_590b_2164,
    0x3fb4_7ae1_47ae_147b,
];

/// `ln x` for `f64` or `f64x2`: `x = 2^e m` with `m` in `[sqrt(1/2),
/// sqrt(2))` (subnormal `x` scaled by `2^54` first), `ln m = ln(1 + f)` as
/// fdlibm evaluates it (the exact `f` plus small corrections, with the
/// series in `s = f / (2 + f)`), and `e ln 2` with `ln 2` split so `e *
/// LN2_HI` is exact. `ln 0 = -inf`, `ln` of a negative is
/// NaN, `ln inf = inf`, NaN stays NaN.
pub(super) fn log(b: &mut FunctionBuilder<'_>, x: Value) -> Value {
    let smallest_normal = constant(b, x, f64::MIN_POSITIVE);
    let tiny = b.ins().fcmp(FloatCC::LessThan, x, smallest_normal);
    let two_54 = constant(b, x, 18_014_398_509_481_984.0);
    let scaled = b.ins().fmul(x, two_54);
    let x_normal = pick(b, tiny, scaled, x);
    let minus_54 = constant(b, x, -54.0);
    let zero = constant(b, x, 0.0);
    let adjust = pick(b, tiny, minus_54, zero);
    let bits = bits_of(b, x_normal);
    // The biased exponent as a float: its bits in the mantissa of 2^52.
    let field = b.ins().ushr_imm_u(bits, 52);
    let two_52_bits = integer(b, x, TWO_52.to_bits() as i64);
    let field = b.ins().bor(field, two_52_bits);
    let field = float_of(b, x, field);
    let unbias = constant(b, x, TWO_52 + 1023.0);
    let e = b.ins().fsub(field, unbias);
    let e = b.ins().fadd(e, adjust);
    // The mantissa as a float in [1, 2), then in [sqrt(1/2), sqrt(2)).
    let mask = integer(b, x, 0x000f_ffff_ffff_ffff);
    let one_bits = integer(b, x, 1.0f64.to_bits() as i64);
    let mantissa = b.ins().band(bits, mask);
    let mantissa = b.ins().bor(mantissa, one_bits);
    let m = float_of(b, x, mantissa);
    let sqrt2 = constant(b, x, std::f64::consts::SQRT_2);
    let big = b.ins().fcmp(FloatCC::GreaterThan, m, sqrt2);
    let half = constant(b, x, 0.5);
    let halved = b.ins().fmul(m, half);
    let m = pick(b, big, halved, m);
    let one = constant(b, x, 1.0);
    let raised = b.ins().fadd(e, one);
    let e = pick(b, big, raised, e);
    // fdlibm's evaluation: f = m - 1 is exact, and
    // ln x = e LN2_HI - ((f^2/2 - (s (f^2/2 + R) + e LN2_LO)) - f).
    let f = b.ins().fsub(m, one);
    let two = constant(b, x, 2.0);
    let denominator = b.ins().fadd(two, f);
    let s = b.ins().fdiv(f, denominator);
    let z = b.ins().fmul(s, s);
    let series = horner(b, z, &LOG_SERIES);
    let r = b.ins().fmul(z, series);
    let square = b.ins().fmul(f, f);
    let hfsq = b.ins().fmul(half, square);
    let inner = b.ins().fadd(hfsq, r);
    let inner = b.ins().fmul(s, inner);
    let ln2_lo = constant(b, x, LN2_LO);
    let low = b.ins().fmul(e, ln2_lo);
    let inner = b.ins().fadd(inner, low);
    let inner = b.ins().fsub(hfsq, inner);
    let inner = b.ins().fsub(inner, f);
    let ln2_hi = constant(b, x, LN2_HI);
    let high = b.ins().fmul(e, ln2_hi);
    let result = b.ins().fsub(high, inner);
    // The special values.
    let infinity = constant(b, x, f64::INFINITY);
    let is_infinite = b.ins().fcmp(FloatCC::Equal, x, infinity);
    let result = pick(b, is_infinite, infinity, result);
    let minus_infinity = constant(b, x, f64::NEG_INFINITY);
    let is_zero = b.ins().fcmp(FloatCC::Equal, x, zero);
    let result = pick(b, is_zero, minus_infinity, result);
    let nan = constant(b, x, f64::NAN);
    let negative = b.ins().fcmp(FloatCC::LessThan, x, zero);
    let result = pick(b, negative, nan, result);
    let is_nan = b.ins().fcmp(FloatCC::Unordered, x, x);
    pick(b, is_nan, x, result)
}

/// The Taylor coefficients of `tanh` (of `x^1, x^3, ..., x^25`), used for
/// `|x| < 0.3`, where the next term is below `2e-19` relative.
const TANH_SERIES: [u64; 13] = [
    0x3ff0_0000_0000_0000,
    0xbfd5_5555_5555_5555,
    0x3fc1_1111_1111_1111,
    0xbfab_a1ba_1ba1_ba1c,
    0x3f96_64f4_882c_10fa,
    0xbf82_26e3_55e6_c23d,
    0x3f6d_6d3d_0e15_7de0,
    0xbf57_da36_452b_75e3,
    0x3f43_5582_4803_6744,
    0xbf2f_57d7_734d_1664,
    0x3f19_67e1_8afc_afad,
    0xbf04_97d8_eea2_5259,
    0x3ef0_b132_d39a_6050,
];

/// `tanh x` for `f64` or `f64x2`: the odd Taylor series below `|x| = 0.3`,
/// else `(1 - t) / (1 + t)` with `t = e^(-2|x|)` (where `1 - t` is exact
/// for `t >= 1/2`) and the sign of `x`. `tanh(±inf) = ±1`, `-0` stays
/// `-0`, NaN stays NaN.
pub(super) fn tanh(b: &mut FunctionBuilder<'_>, x: Value) -> Value {
    let z = b.ins().fmul(x, x);
    let p = horner(b, z, &TANH_SERIES);
    let small = b.ins().fmul(x, p);
    let a = b.ins().fabs(x);
    let twice = b.ins().fadd(a, a);
    let minus = b.ins().fneg(twice);
    let t = exp(b, minus);
    let one = constant(b, x, 1.0);
    let numerator = b.ins().fsub(one, t);
    let denominator = b.ins().fadd(one, t);
    let large = b.ins().fdiv(numerator, denominator);
    let large = copysign(b, large, x);
    let threshold = constant(b, x, 0.3);
    let below = b.ins().fcmp(FloatCC::LessThan, a, threshold);
    pick(b, below, small, large)
}

/// `magnitude` with the sign bit of `sign`, by bit masks (Cranelift has no
/// vector `fcopysign` on x86-64).
fn copysign(b: &mut FunctionBuilder<'_>, magnitude: Value, sign: Value) -> Value {
    let sign_bit = integer(b, sign, i64::MIN);
    let rest = integer(b, sign, i64::MAX);
    let magnitude_bits = bits_of(b, magnitude);
    let magnitude_bits = b.ins().band(magnitude_bits, rest);
    let sign_bits = bits_of(b, sign);
    let sign_bits = b.ins().band(sign_bits, sign_bit);
    let bits = b.ins().bor(magnitude_bits, sign_bits);
    float_of(b, sign, bits)
}

/// PyTorch's `softplus` as the interpreter computes it: `x` above 20, else
/// `ln(1 + e^x)`, with `ln(1 + u)` as `ln(w) u / (w - 1)` for `w = 1 + u`
/// (Goldberg's correction for the rounding of `1 + u`; `u` itself where `w`
/// rounds to 1), over `exp` and `log`.
pub(super) fn softplus(b: &mut FunctionBuilder<'_>, x: Value) -> Value {
    let u = exp(b, x);
    let one = constant(b, x, 1.0);
    let w = b.ins().fadd(one, u);
    let log_w = log(b, w);
    let scaled = b.ins().fmul(log_w, u);
    let rounded = b.ins().fsub(w, one);
    let corrected = b.ins().fdiv(scaled, rounded);
    let exact_one = b.ins().fcmp(FloatCC::Equal, w, one);
    let log1p = pick(b, exact_one, u, corrected);
    // `w` is infinite only above the threshold, where `x` is taken.
    let threshold = constant(b, x, 20.0);
    let above = b.ins().fcmp(FloatCC::GreaterThan, x, threshold);
    pick(b, above, x, log1p)
}

/// The coefficients of fdlibm's `erf` (`s_erf.c`, as the `libm` crate the
/// interpreter calls has them), lowest first.
/// `erf(x) = x + x P/Q(x^2)` on `[0, 0.84375)`.
#[allow(
    clippy::excessive_precision,
    reason = "fdlibm's coefficients as published"
)]
const ERF_PP: [f64; 5] = [
    1.283_791_670_955_125_585_61e-1,
    -3.250_421_072_470_014_993_70e-1,
    -2.848_174_957_559_851_047_66e-2,
    -5.770_270_296_489_441_591_57e-3,
    -2.376_301_665_665_016_260_84e-5,
];
#[allow(
    clippy::excessive_precision,
    reason = "fdlibm's coefficients as published"
)]
const ERF_QQ: [f64; 6] = [
    1.0,
    3.979_172_239_591_553_528_19e-1,
    6.502_224_998_876_729_444_85e-2,
    5.081_306_281_875_765_627_76e-3,
    1.324_947_380_043_216_445_26e-4,
    -3.960_228_278_775_368_123_20e-6,
];
/// `8 (2 / sqrt(pi) - 1)`: `erf x = x + x EFX8 / 8` below `2^-28`.
#[allow(
    clippy::excessive_precision,
    reason = "fdlibm's coefficients as published"
)]
const ERF_EFX8: f64 = 1.027_033_336_764_100_690_53;
/// `erf(1 + s) = ERX + P/Q(s)` on `[0.84375, 1.25)`.
#[allow(
    clippy::excessive_precision,
    reason = "fdlibm's coefficients as published"
)]
const ERF_ERX: f64 = 8.450_629_115_104_675_292_97e-1;
#[allow(
    clippy::excessive_precision,
    reason = "fdlibm's coefficients as published"
)]
const ERF_PA: [f64; 7] = [
    -2.362_118_560_752_659_440_77e-3,
    4.148_561_186_837_483_316_66e-1,
    -3.722_078_760_357_013_238_47e-1,
    3.183_466_199_011_617_536_74e-1,
    -1.108_946_942_823_966_774_76e-1,
    3.547_830_432_561_823_593_71e-2,
    -2.166_375_594_868_790_843_00e-3,
];
#[allow(
    clippy::excessive_precision,
    reason = "fdlibm's coefficients as published"
)]
const ERF_QA: [f64; 7] = [
    1.0,
    1.064_208_804_008_442_282_86e-1,
    5.403_979_177_021_710_489_37e-1,
    7.182_865_441_419_626_628_68e-2,
    1.261_712_198_087_616_421_12e-1,
    1.363_708_391_202_905_073_62e-2,
    1.198_449_984_679_910_741_70e-2,
];
/// `erfc(x) = exp(-x^2 - 0.5625 + R/S(1/x^2)) / x` on `[1.25, 1/0.35)`.
#[allow(
    clippy::excessive_precision,
    reason = "fdlibm's coefficients as published"
)]
const ERF_RA: [f64; 8] = [
    -9.864_944_034_847_148_227_05e-3,
    -6.938_585_727_071_817_643_72e-1,
    -1.055_862_622_532_329_098_14e1,
    -6.237_533_245_032_600_603_96e1,
    -1.623_966_694_625_734_703_55e2,
    -1.846_050_929_067_110_359_94e2,
    -8.128_743_550_630_659_342_46e1,
    -9.814_329_344_169_145_485_92,
];
#[allow(
    clippy::excessive_precision,
    reason = "fdlibm's coefficients as published"
)]
const ERF_SA: [f64; 9] = [
    1.0,
    1.965_127_166_743_925_712_92e1,
    1.376_577_541_435_190_426_00e2,
    4.345_658_774_752_292_288_21e2,
    6.453_872_717_332_678_803_36e2,
    4.290_081_400_275_678_333_86e2,
    1.086_350_055_417_794_351_34e2,
    6.570_249_770_319_281_701_35,
    -6.042_441_521_485_809_874_38e-2,
];
/// The same on `[1/0.35, 6)`.
#[allow(
    clippy::excessive_precision,
    reason = "fdlibm's coefficients as published"
)]
const ERF_RB: [f64; 7] = [
    -9.864_942_924_700_099_285_97e-3,
    -7.992_832_376_805_230_065_74e-1,
    -1.775_795_491_775_475_198_89e1,
    -1.606_363_848_558_219_160_62e2,
    -6.375_664_433_683_896_277_22e2,
    -1.025_095_131_611_077_249_54e3,
    -4.835_191_916_086_513_970_19e2,
];
#[allow(
    clippy::excessive_precision,
    reason = "fdlibm's coefficients as published"
)]
const ERF_SB: [f64; 8] = [
    1.0,
    3.033_806_074_348_245_829_24e1,
    3.257_925_129_965_739_188_26e2,
    1.536_729_586_084_436_959_94e3,
    3.199_858_219_508_595_539_08e3,
    2.553_050_406_433_164_425_83e3,
    4.745_285_412_069_553_672_15e2,
    -2.244_095_244_658_581_833_62e1,
];

/// A polynomial with `f64` coefficients (lowest first) at `z`, by Horner's
/// rule in fdlibm's order (`c0 + z * (c1 + z * ...)`).
fn polynomial(b: &mut FunctionBuilder<'_>, z: Value, coefficients: &[f64]) -> Value {
    let bits: Vec<u64> = coefficients.iter().map(|c| c.to_bits()).collect();
    horner(b, z, &bits)
}

/// `erf x` for `f64` or `f64x2`: fdlibm's piecewise method with every piece
/// evaluated and the right one picked per lane (no branches), operation for
/// operation as the `libm` crate computes it, but over the polynomial
/// `exp`: a rational function near 0 (`x` itself below `2^-28`, as fdlibm
/// scales it), one around 1, `1 - erfc` from two rational fits in `1/x^2`
/// and two `exp`s up to 6, and `±1` beyond. NaN stays NaN.
pub(super) fn erf(b: &mut FunctionBuilder<'_>, x: Value) -> Value {
    let a = b.ins().fabs(x);
    let one = constant(b, x, 1.0);
    let below = |b: &mut FunctionBuilder<'_>, bound: f64| {
        let bound = constant(b, x, bound);
        b.ins().fcmp(FloatCC::LessThan, a, bound)
    };
    // |x| < 0.84375: x + x P/Q(x^2); below 2^-28, (8x + EFX8 x) / 8.
    let z = b.ins().fmul(x, x);
    let r = polynomial(b, z, &ERF_PP);
    let s = polynomial(b, z, &ERF_QQ);
    let y = b.ins().fdiv(r, s);
    let xy = b.ins().fmul(x, y);
    let near_zero = b.ins().fadd(x, xy);
    let eight = constant(b, x, 8.0);
    let efx8 = constant(b, x, ERF_EFX8);
    let eight_x = b.ins().fmul(eight, x);
    let efx8_x = b.ins().fmul(efx8, x);
    let sum = b.ins().fadd(eight_x, efx8_x);
    let eighth = constant(b, x, 0.125);
    let tiny = b.ins().fmul(eighth, sum);
    let is_tiny = below(b, f64::from_bits(0x3e30_0000_0000_0000));
    let near_zero = pick(b, is_tiny, tiny, near_zero);
    // 0.84375 <= |x| < 1.25: erfc = (1 - ERX) - P/Q(|x| - 1).
    let s1 = b.ins().fsub(a, one);
    let p = polynomial(b, s1, &ERF_PA);
    let q = polynomial(b, s1, &ERF_QA);
    let ratio = b.ins().fdiv(p, q);
    let one_minus_erx = constant(b, x, 1.0 - ERF_ERX);
    let erfc_near_one = b.ins().fsub(one_minus_erx, ratio);
    // 1.25 <= |x| < 6: erfc = exp(-z^2 - 0.5625) exp((z - |x|)(z + |x|) +
    // R/S) / |x|, with z = |x| with its low 32 bits cleared.
    let squared = b.ins().fmul(a, a);
    let inverse = b.ins().fdiv(one, squared);
    let ra = polynomial(b, inverse, &ERF_RA);
    let sa = polynomial(b, inverse, &ERF_SA);
    let rb = polynomial(b, inverse, &ERF_RB);
    let sb = polynomial(b, inverse, &ERF_SB);
    let below_2_857 = below(b, f64::from_bits(0x4006_db6d_0000_0000));
    let r = pick(b, below_2_857, ra, rb);
    let s = pick(b, below_2_857, sa, sb);
    let high = integer(b, x, -0x1_0000_0000);
    let a_bits = bits_of(b, a);
    let z_bits = b.ins().band(a_bits, high);
    let z = float_of(b, x, z_bits);
    let minus_z = b.ins().fneg(z);
    let z_squared = b.ins().fmul(minus_z, z);
    let offset = constant(b, x, 0.5625);
    let first = b.ins().fsub(z_squared, offset);
    let first = exp(b, first);
    let difference = b.ins().fsub(z, a);
    let total = b.ins().fadd(z, a);
    let product = b.ins().fmul(difference, total);
    let fit = b.ins().fdiv(r, s);
    let second = b.ins().fadd(product, fit);
    let second = exp(b, second);
    let both = b.ins().fmul(first, second);
    let erfc_tail = b.ins().fdiv(both, a);
    let is_near_one = below(b, 1.25);
    let erfc = pick(b, is_near_one, erfc_near_one, erfc_tail);
    let magnitude = b.ins().fsub(one, erfc);
    // |x| >= 6 (and infinite): 1.
    let is_finite_part = below(b, 6.0);
    let magnitude = pick(b, is_finite_part, magnitude, one);
    let away = copysign(b, magnitude, x);
    let is_small = below(b, 0.84375);
    let result = pick(b, is_small, near_zero, away);
    // NaN fails every comparison above: keep it.
    let is_nan = b.ins().fcmp(FloatCC::Unordered, x, x);
    pick(b, is_nan, x, result)
}

/// GELU with `erf` as the interpreter computes it: `0.5 x (1 + erf(x /
/// sqrt 2))`.
pub(super) fn gelu(b: &mut FunctionBuilder<'_>, x: Value) -> Value {
    let half = constant(b, x, 0.5);
    let one = constant(b, x, 1.0);
    let root = constant(b, x, std::f64::consts::SQRT_2);
    let scaled = b.ins().fdiv(x, root);
    let e = erf(b, scaled);
    let cdf = b.ins().fadd(one, e);
    let half_x = b.ins().fmul(half, x);
    b.ins().fmul(half_x, cdf)
}
