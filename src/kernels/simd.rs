//! Scalar building blocks of the fused CPU kernels, written so that LLVM vectorizes them: a
//! branch-free `exp`, a compute-type trait (`f32`, `f64`), loads from the storage dtypes, and
//! lane arrays (`LANES` independent accumulators, so that sums vectorize without reassociating
//! floating-point additions — which also keeps the results bit-identical on every machine).

use std::ops::{Add, Div, Mul, Neg, Sub};

use half::{bf16, f16};

/// Independent accumulators per row: one AVX2 register of f32.
pub(crate) const LANES: usize = 8;

/// `e^x` in f32 (Cephes' polynomial, ≤ 2 ulp), branch-free: +inf for x > 88.72, 0 below −103,
/// NaN for NaN.
#[inline(always)]
pub(crate) fn exp_f32(x: f32) -> f32 {
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

/// The type a kernel computes in: f32 for f16/bf16/f32 inputs, f64 for f64.
pub(crate) trait Real:
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
{
    const ZERO: Self;
    const ONE: Self;
    const INFINITY: Self;
    fn from_f64(v: f64) -> Self;
    fn to_f64(self) -> f64;
    fn exp(self) -> Self;
    fn ln(self) -> Self;
    /// `|x| < ∞` (false for NaN).
    #[inline(always)]
    fn is_finite_value(self) -> bool {
        let a = if self < Self::ZERO { -self } else { self };
        a < Self::INFINITY
    }
    #[inline(always)]
    fn select(cond: bool, a: Self, b: Self) -> Self {
        if cond {
            a
        } else {
            b
        }
    }
    #[inline(always)]
    fn indicator(cond: bool) -> Self {
        Self::select(cond, Self::ONE, Self::ZERO)
    }
    #[inline(always)]
    fn min_of(self, other: Self) -> Self {
        Self::select(other < self, other, self)
    }
    #[inline(always)]
    fn max_of(self, other: Self) -> Self {
        Self::select(other > self, other, self)
    }
}

impl Real for f32 {
    const ZERO: Self = 0.0;
    const ONE: Self = 1.0;
    const INFINITY: Self = f32::INFINITY;
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
}

impl Real for f64 {
    const ZERO: Self = 0.0;
    const ONE: Self = 1.0;
    const INFINITY: Self = f64::INFINITY;
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
}

/// A storage element read as the compute type `R`.
pub(crate) trait Load<R>: Copy + Send + Sync {
    fn load(self) -> R;
}

/// A compute-type value written back as a storage element.
pub(crate) trait Store<R>: Copy + Send + Sync {
    fn store(value: R) -> Self;
}

macro_rules! load_store {
    ($elem:ty, $real:ty, |$x:ident| $load:expr, |$v:ident| $store:expr) => {
        impl Load<$real> for $elem {
            #[inline(always)]
            fn load(self) -> $real {
                let $x = self;
                $load
            }
        }
        impl Store<$real> for $elem {
            #[inline(always)]
            fn store($v: $real) -> Self {
                $store
            }
        }
    };
}
load_store!(f32, f32, |x| x, |v| v);
load_store!(f64, f64, |x| x, |v| v);
load_store!(f16, f32, |x| x.to_f32(), |v| f16::from_f32(v));
load_store!(bf16, f32, |x| x.to_f32(), |v| bf16::from_f32(v));

impl Load<f32> for u8 {
    #[inline(always)]
    fn load(self) -> f32 {
        self as f32
    }
}
impl Load<f64> for u8 {
    #[inline(always)]
    fn load(self) -> f64 {
        self as f64
    }
}

/// Whether the kernels' AVX-512 builds can run here (see [`has_avx2`]).
pub(crate) fn has_avx512() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        static DETECTED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *DETECTED.get_or_init(|| {
            has_avx2()
                && std::arch::is_x86_feature_detected!("avx512f")
                && std::arch::is_x86_feature_detected!("avx512vl")
        })
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Whether the kernels' AVX2 + FMA builds can run here. Every build performs the same
/// operations in the same order (nothing is contracted into FMA without fast-math, and the
/// reductions run in fixed lanes), so their results are identical; the wider builds only use
/// wider and more registers.
pub(crate) fn has_avx2() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        static DETECTED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *DETECTED.get_or_init(|| {
            std::arch::is_x86_feature_detected!("avx2")
                && std::arch::is_x86_feature_detected!("fma")
        })
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Defines `$name`, which runs the `#[inline(always)]` function `$generic` compiled for AVX-512,
/// or AVX2 and FMA, when the CPU has them, and the portable build otherwise.
macro_rules! multiversion {
    ($vis:vis fn $name:ident<$($g:ident: $($b:path)|+),*>($($arg:ident: $ty:ty),* $(,)?) -> $ret:ty = $generic:ident) => {
        $vis fn $name<$($g: $($b+)+),*>($($arg: $ty),*) -> $ret {
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx512vl,avx2,fma")]
                unsafe fn avx512<$($g: $($b+)+),*>($($arg: $ty),*) -> $ret {
                    $generic::<$($g),*>($($arg),*)
                }
                #[target_feature(enable = "avx2,fma")]
                unsafe fn avx2<$($g: $($b+)+),*>($($arg: $ty),*) -> $ret {
                    $generic::<$($g),*>($($arg),*)
                }
                if $crate::kernels::simd::has_avx512() {
                    // SAFETY: the CPU supports the features `avx512` is compiled for.
                    return unsafe { avx512::<$($g),*>($($arg),*) };
                }
                if $crate::kernels::simd::has_avx2() {
                    // SAFETY: the CPU supports the features `avx2` is compiled for.
                    return unsafe { avx2::<$($g),*>($($arg),*) };
                }
            }
            $generic::<$($g),*>($($arg),*)
        }
    };
}
pub(crate) use multiversion;

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
        assert!(exp_f32(88.7).is_finite());
    }
}
