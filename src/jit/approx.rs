//! Vectorizable polynomial approximations of `exp` and `sigmoid`, emitted
//! inline for a scalar `f64` or an `f64x2` (the same instructions either
//! way), so compiled kernels need no call per element for them.
//!
//! `exp` reduces `x = n ln 2 + r` with `|r| <= ln 2 / 2` (Cody and Waite:
//! `ln 2` split in two so that `n ln 2` is exact), evaluates the degree-13
//! Taylor polynomial of `e^r` by Horner's rule (its truncation error is
//! below `5e-18` relative), and scales by `2^n` as two exact powers of two
//! built from bits, so that overflow gives `inf`, deep underflow `0`, and
//! subnormal results round once. No float-to-integer conversion is needed:
//! `n` is rounded with the `1.5 * 2^52` shifter. `sigmoid` is the
//! interpreter's formula over this `exp`. The measured error against the
//! platform's `exp` (`tests/approx.rs`, `docs/jit.md`) is at most 1 ulp in
//! `f64`; `f32` results, rounded from these `f64` values, match the
//! interpreter's.

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
