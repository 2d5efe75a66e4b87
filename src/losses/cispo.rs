//! CISPO (MiniMax-M1, arXiv 2506.13585): a clipped, detached importance weight times the
//! log-prob, in both peers' conventions.
//!
//! ```text
//! l = −sg[clip_w(ρ)]·A·ℓ          ∂l/∂ℓ = −clip_w(ρ)·A
//! verl:     clip_w(ρ) = clip(ρ, 1−ε_low, 1+ε_high)
//! TRL/Liger: clip_w(ρ) = min(ρ, ε_max)         (TRL's `epsilon_high` is ε_max)
//! ```
//!
//! Metrics: verl's `clip_fraction` (ρ outside the bounds, either side) and TRL's `clip_ratio`
//! (`ρ > ε_max ∧ A > 0`; with verl's bounds, `ρ < 1−ε_low ∧ A < 0` or `ρ > 1+ε_high ∧ A > 0`).

use crate::error::{check_config, Result};
use crate::losses::metrics::{CLIPPED, CLIP_HIGH, CLIP_LOW};
use crate::losses::objective::{
    indicator, Eval, GpuShape, Objective, PerToken, Shape, Token, TokenTensors,
};
use crate::piecewise::{self, clamp_scalar};
use crate::real::Real;

/// CISPO's clip of its detached importance weight.
///
/// ```
/// use sapo::IsWeightClip;
/// assert!(IsWeightClip::Bounds { eps_low: 0.2, eps_high: 0.28 }.validate().is_ok()); // verl
/// assert!(IsWeightClip::RatioMax(5.0).validate().is_ok()); // TRL epsilon_high = 5 (ScaleRL)
/// assert!(IsWeightClip::RatioMax(0.0).validate().is_err());
/// ```
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum IsWeightClip {
    /// verl's `clip(ρ, 1−ε_low, 1+ε_high)` (`clip_ratio_low`, `clip_ratio_high`).
    Bounds {
        /// `ε_low` in `[0, 1]`.
        eps_low: f64,
        /// `ε_high` ≥ 0.
        eps_high: f64,
    },
    /// TRL/Liger's `min(ρ, ε_max)`, no lower bound (`epsilon_high` is `ε_max` > 0).
    RatioMax(f64),
}

impl IsWeightClip {
    /// Checks `0 ≤ ε_low ≤ 1`, `ε_high ≥ 0`, `ε_max > 0`, all finite.
    ///
    /// ```
    /// assert!(sapo::IsWeightClip::Bounds { eps_low: 1.5, eps_high: 0.2 }.validate().is_err());
    /// ```
    pub fn validate(&self) -> Result<()> {
        match *self {
            Self::Bounds { eps_low, eps_high } => {
                check_config(
                    eps_low.is_finite() && (0.0..=1.0).contains(&eps_low),
                    "eps_low",
                    "finite, in [0, 1]",
                    eps_low,
                )?;
                check_config(
                    eps_high.is_finite() && eps_high >= 0.0,
                    "eps_high",
                    "finite and >= 0",
                    eps_high,
                )
            }
            Self::RatioMax(m) => {
                check_config(m.is_finite() && m > 0.0, "ratio_max", "finite and > 0", m)
            }
        }
    }

    /// `(low, high)` bounds of the weight (`low = −∞` for the cap).
    fn range(&self) -> (f64, f64) {
        match *self {
            Self::Bounds { eps_low, eps_high } => (1.0 - eps_low, 1.0 + eps_high),
            Self::RatioMax(m) => (f64::NEG_INFINITY, m),
        }
    }

    pub(crate) fn bounds<R: Real>(&self) -> CispoBounds<R> {
        let (low, high) = self.range();
        CispoBounds {
            low: R::from_f64(low),
            high: R::from_f64(high),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Scalar form (the kernels').

/// [`IsWeightClip`] in the compute type.
pub(crate) struct CispoBounds<R> {
    pub(crate) low: R,
    pub(crate) high: R,
}

impl<R: Real> Shape<R> for CispoBounds<R> {
    const SLOTS: &'static [usize] = &[CLIPPED, CLIP_LOW, CLIP_HIGH];

    #[inline(always)]
    fn eval(&self, t: &Token<R>) -> Eval<R> {
        let (r, a) = (t.r, t.a);
        let weight = clamp_scalar(r, self.low, self.high).0;
        let (below, above) = (r < self.low, r > self.high);
        Eval {
            value: -(weight * a * t.lp),
            slope: R::ZERO,
            direct: -(weight * a),
            metrics: [
                R::indicator(below || above),
                R::indicator(below && a < R::ZERO),
                R::indicator(above && a > R::ZERO),
                R::ZERO,
            ],
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Tensor form (the composed path's).

pub(crate) fn per_token(clip: &IsWeightClip, x: &TokenTensors<'_>) -> Result<PerToken> {
    let (low, high) = clip.range();
    let r = x.ratio.detach();
    let low_bound = low.is_finite().then_some(low);
    let weight = piecewise::clamp(&r, low_bound, Some(high))?;
    let loss = weight.mul(x.advantages)?.mul(x.log_probs)?.neg()?;
    let below = match low_bound {
        Some(low) => indicator(&r.lt(low)?, &r)?,
        None => r.zeros_like()?,
    };
    let above = indicator(&r.gt(high)?, &r)?;
    let negative = indicator(&x.advantages.lt(0.0)?, &r)?;
    let positive = indicator(&x.advantages.gt(0.0)?, &r)?;
    Ok(PerToken {
        loss,
        metrics: vec![
            (CLIPPED, (&below + &above)?),
            (CLIP_LOW, below.mul(&negative)?),
            (CLIP_HIGH, above.mul(&positive)?),
        ],
    })
}

impl Objective for IsWeightClip {
    const NAME: &'static str = "cispo";
    const ID: i32 = 4;
    const DEVICE: &'static str = include_str!("cispo.h");
    type Scalar<R: Real> = CispoBounds<R>;

    fn validate(&self) -> Result<()> {
        IsWeightClip::validate(self)
    }
    fn scalar<R: Real>(&self) -> CispoBounds<R> {
        self.bounds()
    }
    fn per_token(&self, x: &TokenTensors<'_>) -> Result<PerToken> {
        per_token(self, x)
    }
    fn gpu(&self) -> GpuShape {
        let b = self.bounds::<f32>();
        GpuShape::new(&[b.low, b.high])
    }
}
