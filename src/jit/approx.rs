//! Vectorizable polynomial approximations of `exp`, `log`, `tanh`,
//! `sigmoid` and `softplus`, emitted inline for a scalar `f64` or an
//! `f64x2` (the same instructions either way), so compiled kernels need no
//! call per element for them.
//!
//! `exp` reduces `x = n ln 2 + r` with `|r| <= ln 2 / 2` (Cody and Waite:
//! `ln 2` split in two so that `n ln 2` is exact), evaluates the degree-13
//! Taylor polynomial of `e^r` by Horner's rule (its truncation error is
//! below `5e-18` relative), and scales by `2^n` as two exact powers of two
//! built from bits, so that overflow gives `inf`, deep underflow `0`, and
//! subnormal results round once. No float-to-integer conversion is needed:
//! `n` is rounded with the `1.5 * 2^52` shifter. `log` follows fdlibm's
//! evaluation, `tanh` is a Taylor series near 0 and `exp` beyond, `sigmoid`
//! and `softplus` the interpreter's formulas over `exp` and `log`. The
//! errors measured against the platform (`tests/approx.rs`, `docs/jit.md`):
//! at most 1, 1, 3, 2 and 3 ulps in `f64`; `f32` results, rounded from
//! these `f64` values, match the interpreter's.

use cranelift_codegen::ir::condcodes::FloatCC;
use cranelift_codegen::ir::{InstBuilder, MemFlagsData, Value, types};
use cranelift_frontend::FunctionBuilder;

use super::codegen::{constant, pick};

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

/// `e^x`, to within 1 ulp, for `f64` or `f64x2`.
pub(super) fn exp(b: &mut FunctionBuilder<'_>, x: Value) -> Value {
    // Beyond these bounds e^x is inf or 0 anyway; the clamp keeps n in
    // range. NaN passes through (fmin and fmax propagate it).
    let high = constant(b, x, 710.0);
    let low = constant(b, x, -746.0);
    let clamped = b.ins().fmin(x, high);
    let clamped = b.ins().fmax(clamped, low);
    let log2e = constant(b, x, std::f64::consts::LOG2_E);
    let scaled = b.ins().fmul(clamped, log2e);
    let n = round_integer(b, scaled);
    let ln2_hi = constant(b, x, LN2_HI);
    let ln2_lo = constant(b, x, LN2_LO);
    let high_part = b.ins().fmul(n, ln2_hi);
    let r = b.ins().fsub(clamped, high_part);
    let low_part = b.ins().fmul(n, ln2_lo);
    let r = b.ins().fsub(r, low_part);
    // e^r = sum r^k / k!, k = 0..=13, by Horner's rule.
    let mut factorial = 1.0f64;
    let coefficients: Vec<f64> = (0..=13)
        .map(|k| {
            if k > 0 {
                factorial *= f64::from(k);
            }
            1.0 / factorial
        })
        .collect();
    let mut p = constant(b, x, coefficients[13]);
    for &c in coefficients[..13].iter().rev() {
        let product = b.ins().fmul(p, r);
        let c = constant(b, x, c);
        p = b.ins().fadd(product, c);
    }
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
