//! The real type that the scalar forms of the formulas, and the kernels that run them, compute
//! in: `f32` for f16, bf16 and f32 inputs, `f64` for f64 inputs.
//!
//! The scalar forms are written branch-free ([`Real::select`] instead of `if`), so that the
//! kernels' per-token loops vectorize; `f32`'s [`Real::exp`] is a branch-free polynomial
//! (≤ 2 ulp) for the same reason.

use std::ops::{Add, Div, Mul, Neg, Sub};

mod sealed {
    pub trait Sealed {}
    impl Sealed for f32 {}
    impl Sealed for f64 {}
}

/// `f32` or `f64`: the type the scalar forms (and the kernels) compute in.
///
/// ```
/// use sapo::real::Real;
/// fn double<R: Real>(x: R) -> R { x + x }
/// assert_eq!(double(1.5f32), 3.0);
/// assert_eq!(<f64 as Real>::select(true, 1.0, 2.0), 1.0);
/// ```
pub trait Real:
    Copy
    + PartialOrd
    + Add<Output = Self>
    + Sub<Output = Self>
    + Mul<Output = Self>
    + Div<Output = Self>
    + Neg<Output = Self>
    + Send
    + Sync
    + std::fmt::Debug
    + 'static
    + sealed::Sealed
{
    /// 0.
    const ZERO: Self;
    /// 1.
    const ONE: Self;
    /// +∞.
    const INFINITY: Self;
    /// Not a number.
    const NAN: Self;
    /// Where exponentials saturate: 88 in every dtype, where `e^x` is finite in f32 with room to
    /// spare. Ratios `e^δ` are computed as `e^{min(δ, MAX_EXP_ARG)}`, so that no ratio is `inf`
    /// and no gradient is `0·inf`; the same point in f64 keeps the results of every dtype alike
    /// (a ratio of `e^709` would overflow any sum it enters: f64 losses went `+inf` where f32
    /// ones saturated).
    const MAX_EXP_ARG: Self;
    /// Converts from `f64` (rounding for `f32`).
    fn from_f64(v: f64) -> Self;
    /// Converts to `f64` (exact).
    fn to_f64(self) -> f64;
    /// `e^x`.
    fn exp(self) -> Self;
    /// `ln x`.
    fn ln(self) -> Self;
    /// `erf x` (candle's f64-accurate error function; f32 through f64).
    fn erf(self) -> Self;
    /// `arctan x`.
    fn atan(self) -> Self;
    /// `|x| < ∞` (false for NaN).
    #[inline(always)]
    fn is_finite_value(self) -> bool {
        let a = if self < Self::ZERO { -self } else { self };
        a < Self::INFINITY
    }
    /// `a` if `cond`, else `b` (a select, not a branch).
    #[inline(always)]
    fn select(cond: bool, a: Self, b: Self) -> Self {
        if cond {
            a
        } else {
            b
        }
    }
    /// 1 if `cond`, else 0.
    #[inline(always)]
    fn indicator(cond: bool) -> Self {
        Self::select(cond, Self::ONE, Self::ZERO)
    }
    /// The smaller of the two (`self` on ties).
    #[inline(always)]
    fn min_of(self, other: Self) -> Self {
        Self::select(other < self, other, self)
    }
    /// The larger of the two (`self` on ties).
    #[inline(always)]
    fn max_of(self, other: Self) -> Self {
        Self::select(other > self, other, self)
    }
}

impl Real for f32 {
    const ZERO: Self = 0.0;
    const ONE: Self = 1.0;
    const INFINITY: Self = f32::INFINITY;
    const NAN: Self = f32::NAN;
    const MAX_EXP_ARG: Self = 88.0;
    #[inline(always)]
    fn from_f64(v: f64) -> Self {
        v as f32
    }
    #[inline(always)]
    fn to_f64(self) -> f64 {
        self as f64
    }
    #[inline(always)]
    fn exp(self) -> Self {
        exp_f32(self)
    }
    #[inline(always)]
    fn ln(self) -> Self {
        f32::ln(self)
    }
    #[inline(always)]
    fn erf(self) -> Self {
        candle_core::cpu::erf::erf_f64(f64::from(self)) as f32
    }
    #[inline(always)]
    fn atan(self) -> Self {
        f32::atan(self)
    }
}

impl Real for f64 {
    const ZERO: Self = 0.0;
    const ONE: Self = 1.0;
    const INFINITY: Self = f64::INFINITY;
    const NAN: Self = f64::NAN;
    const MAX_EXP_ARG: Self = 88.0;
    #[inline(always)]
    fn from_f64(v: f64) -> Self {
        v
    }
    #[inline(always)]
    fn to_f64(self) -> f64 {
        self
    }
    #[inline(always)]
    fn exp(self) -> Self {
        f64::exp(self)
    }
    #[inline(always)]
    fn ln(self) -> Self {
        f64::ln(self)
    }
    #[inline(always)]
    fn erf(self) -> Self {
        candle_core::cpu::erf::erf_f64(self)
    }
    #[inline(always)]
    fn atan(self) -> Self {
        f64::atan(self)
    }
}

/// `MAX_EXP_ARG` of the compute dtype that `dtype` is computed in (the same, 88, in every one).
pub(crate) fn max_exp_arg(dtype: candle_core::DType) -> f64 {
    if dtype == candle_core::DType::F64 {
        f64::MAX_EXP_ARG
    } else {
        f32::MAX_EXP_ARG as f64
    }
}

/// `ln(max)` of the float dtype `dtype`: the largest `x` whose `e^x` is finite in it (11.09 in
/// f16, 88.72 in bf16 and f32, 709.78 in f64).
pub(crate) fn ln_max(dtype: candle_core::DType) -> f64 {
    use candle_core::DType;
    match dtype {
        DType::F64 => f64::MAX.ln(),
        DType::F16 => half::f16::MAX.to_f64().ln(),
        DType::BF16 => half::bf16::MAX.to_f64().ln(),
        _ => f64::from(f32::MAX).ln(),
    }
}

/// The dtype that the composed path's sums over rows accumulate in: f64, except on devices that
/// have none (Metal).
pub(crate) fn accumulation_dtype(device: &candle_core::Device) -> candle_core::DType {
    if device.is_metal() {
        candle_core::DType::F32
    } else {
        candle_core::DType::F64
    }
}

/// `e^x` in f32 (Cephes' polynomial, ≤ 2 ulp), branch-free: +inf for x > 88.72, 0 below −103,
/// NaN for NaN.
#[inline(always)]
fn exp_f32(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // 1.5·2^23: adding and subtracting it rounds to the nearest integer without a libm call.
    const ROUND: f32 = 12_582_912.0;
    let x = x.clamp(-104.0, 88.8);
    // The integer n sits in the low mantissa bits of `biased`: reading them avoids a float-to-int
    // conversion (Rust's saturating `as` cast does not vectorize).
    let biased = x * LOG2E + ROUND;
    let n = biased - ROUND;
    let r = x - n * LN2_HI - n * LN2_LO;
    let mut p = 1.987_569_1e-4f32;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_5e-1;
    p = p * r + 0.5;
    let y = p * r * r + r + 1.0;
    // 2^n as two factors, so that n in [−150, 128] neither overflows nor underflows the exponent.
    let n = biased.to_bits() as i32 - ROUND.to_bits() as i32;
    let half = n >> 1;
    let s1 = f32::from_bits(((half + 127) as u32) << 23);
    let s2 = f32::from_bits(((n - half + 127) as u32) << 23);
    y * s1 * s2
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_f32_is_accurate_and_saturates() {
        let mut worst = 0f64;
        let mut x = -87.0f32;
        while x < 88.5 {
            let want = (x as f64).exp();
            let got = exp_f32(x) as f64;
            worst = worst.max(((got - want) / want).abs());
            x += 0.0137;
        }
        assert!(worst < 3e-7, "max relative error {worst}");
        assert_eq!(exp_f32(0.0), 1.0);
        assert_eq!(exp_f32(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp_f32(-200.0), 0.0);
        assert_eq!(exp_f32(89.0), f32::INFINITY);
        assert_eq!(exp_f32(f32::INFINITY), f32::INFINITY);
        assert!(exp_f32(f32::NAN).is_nan());
        assert!(exp_f32(f32::MAX_EXP_ARG).is_finite());
        assert!(f64::MAX_EXP_ARG.exp().is_finite());
    }
}
