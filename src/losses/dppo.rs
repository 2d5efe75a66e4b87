//! DPPO (verl `dppo_tv`, `dppo_kl`, arXiv 2602.04879): a trust region on a divergence between the
//! sampled token's probabilities, with a truncated, detached ratio weight.
//!
//! ```text
//! p = e^ℓ, p_old = e^ℓold, ρ = exp(clamp(ℓ − ℓold, ±c))
//! binary TV:  valid = A > 0 ? p − p_old ≤ δ_high : p − p_old ≥ −δ_low
//! binary KL:  D = p_old·(ℓold − ℓ) + (1 − p_old)·ln((1 − p_old + 1e-8)/(1 − p + 1e-8))
//!             valid = A > 0 ? (D ≤ δ_high ∨ p ≤ p_old) : (D ≤ δ_low ∨ p ≥ p_old)
//! l = −A·sg[min(ρ, C)]·ℓ·valid          ∂l/∂ℓ = −A·min(ρ, C)·valid     (valid: a 0/1 constant)
//! ```
//!
//! Metrics: `clip_fraction` = mean(1 − valid), `truncated_fraction` = mean([ρ > C]·valid).

use crate::error::{check_config, Result};
use crate::losses::metrics::{CLIPPED, TRUNCATED};
use crate::losses::objective::{
    indicator, Eval, GpuShape, Objective, PerToken, Shape, Token, TokenTensors,
};
use crate::real::Real;

/// The divergence of DPPO's trust region.
///
/// ```
/// assert_ne!(sapo::Divergence::BinaryTv, sapo::Divergence::BinaryKl);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Divergence {
    /// `p − p_old` (verl `dppo_tv`).
    BinaryTv,
    /// The KL divergence between the Bernoulli distributions `p_old` and `p` (verl `dppo_kl`).
    BinaryKl,
}

/// DPPO's trust region and truncation.
///
/// ```
/// use sapo::{Divergence, Dppo};
/// let tv = Dppo::new(Divergence::BinaryTv, 0.15, 0.15, 3.0);
/// assert!(tv.validate().is_ok());
/// assert!(Dppo::new(Divergence::BinaryKl, -0.05, 0.05, 3.0).validate().is_err());
/// ```
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Dppo {
    /// Binary TV or binary KL.
    pub divergence: Divergence,
    /// `δ_low` ≥ 0 (verl `clip_ratio_low`).
    pub delta_low: f64,
    /// `δ_high` ≥ 0 (verl `clip_ratio_high`).
    pub delta_high: f64,
    /// The cap `C` > 0 on the detached ratio (verl `clip_ratio_c`; its actor default 3).
    pub ratio_max: f64,
}

impl Dppo {
    /// A DPPO trust region.
    ///
    /// ```
    /// let kl = sapo::Dppo::new(sapo::Divergence::BinaryKl, 0.05, 0.05, 10000.0);
    /// assert_eq!(kl.ratio_max, 10000.0);
    /// ```
    pub fn new(divergence: Divergence, delta_low: f64, delta_high: f64, ratio_max: f64) -> Self {
        Self {
            divergence,
            delta_low,
            delta_high,
            ratio_max,
        }
    }
    /// Checks `δ_low, δ_high ≥ 0` and `C > 0`, all finite.
    ///
    /// ```
    /// assert!(sapo::Dppo::new(sapo::Divergence::BinaryTv, 0.1, 0.1, 0.0).validate().is_err());
    /// ```
    pub fn validate(&self) -> Result<()> {
        let non_negative = |v: f64| v.is_finite() && v >= 0.0;
        check_config(
            non_negative(self.delta_low),
            "divergence_low",
            "finite and >= 0",
            self.delta_low,
        )?;
        check_config(
            non_negative(self.delta_high),
            "divergence_high",
            "finite and >= 0",
            self.delta_high,
        )?;
        check_config(
            self.ratio_max.is_finite() && self.ratio_max > 0.0,
            "ratio_max",
            "finite and > 0",
            self.ratio_max,
        )
    }
    pub(crate) fn shape<R: Real>(&self) -> DppoShape<R> {
        DppoShape {
            kl: self.divergence == Divergence::BinaryKl,
            low: R::from_f64(self.delta_low),
            high: R::from_f64(self.delta_high),
            cap: R::from_f64(self.ratio_max),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Scalar form (the kernels').

pub(crate) struct DppoShape<R> {
    pub(crate) kl: bool,
    pub(crate) low: R,
    pub(crate) high: R,
    pub(crate) cap: R,
}

/// `1e-8`, verl's guard in the binary KL's logarithm.
const GUARD: f64 = 1e-8;

impl<R: Real> DppoShape<R> {
    /// Whether the token lies inside the trust region.
    #[inline(always)]
    fn valid(&self, lp: R, old: R, a: R) -> bool {
        let (p, p_old) = (lp.exp(), old.exp());
        let positive = a > R::ZERO;
        if self.kl {
            let guard = R::from_f64(GUARD);
            let d = p_old * (old - lp)
                + (R::ONE - p_old) * ((R::ONE - p_old + guard) / (R::ONE - p + guard)).ln();
            if positive {
                d <= self.high || p <= p_old
            } else {
                d <= self.low || p >= p_old
            }
        } else if positive {
            p - p_old <= self.high
        } else {
            p - p_old >= -self.low
        }
    }
}

impl<R: Real> Shape<R> for DppoShape<R> {
    const SLOTS: &'static [usize] = &[CLIPPED, TRUNCATED];

    #[inline(always)]
    fn eval(&self, t: &Token<R>) -> Eval<R> {
        let valid = R::indicator(self.valid(t.lp, t.old, t.a));
        let weight = t.r.min_of(self.cap) * valid;
        Eval {
            value: -(t.a * weight * t.lp),
            slope: R::ZERO,
            direct: -(t.a * weight),
            metrics: [
                R::ONE - valid,
                R::indicator(t.r > self.cap) * valid,
                R::ZERO,
                R::ZERO,
            ],
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Tensor form (the composed path's).

pub(crate) fn per_token(dppo: &Dppo, x: &TokenTensors<'_>) -> Result<PerToken> {
    let lp = x.log_probs.detach();
    let old = x.old_log_probs;
    let (p, p_old) = (lp.exp()?, old.exp()?);
    let positive = x.advantages.gt(0.0)?;
    let valid = match dppo.divergence {
        Divergence::BinaryTv => {
            let diff = (&p - &p_old)?;
            positive.where_cond(&diff.le(dppo.delta_high)?, &diff.ge(-dppo.delta_low)?)?
        }
        Divergence::BinaryKl => {
            // `(1 − q) + 1e-8` in that order, as verl writes it: `1 + 1e-8` first would round to
            // 1 in f32 and lose the guard, and `p = 1` (a log-prob of exactly 0) would give `ln 0`.
            let one_minus = |q: &Tensor| q.affine(-1.0, 1.0)?.affine(1.0, GUARD);
            let log_term = (one_minus(&p_old)?.log()? - one_minus(&p)?.log()?)?;
            let d = (p_old.mul(&(old - &lp)?)? + p_old.affine(-1.0, 1.0)?.mul(&log_term)?)?;
            let pos = d.le(dppo.delta_high)?.maximum(&p.le(&p_old)?)?;
            let neg = d.le(dppo.delta_low)?.maximum(&p.ge(&p_old)?)?;
            positive.where_cond(&pos, &neg)?
        }
    };
    let r = x.ratio.detach();
    let valid = indicator(&valid, &r)?;
    let weight = r.minimum(dppo.ratio_max)?.mul(&valid)?;
    Ok(PerToken {
        loss: weight.mul(x.advantages)?.mul(x.log_probs)?.neg()?,
        metrics: vec![
            (CLIPPED, valid.affine(-1.0, 1.0)?),
            (
                TRUNCATED,
                indicator(&r.gt(dppo.ratio_max)?, &r)?.mul(&valid)?,
            ),
        ],
    })
}

use candle_core::Tensor;

impl Objective for Dppo {
    const NAME: &'static str = "dppo";
    const ID: i32 = 7;
    const DEVICE: &'static str = include_str!("dppo.h");
    const TOKEN_ONLY: bool = true;
    type Scalar<R: Real> = DppoShape<R>;

    fn validate(&self) -> Result<()> {
        Dppo::validate(self)
    }
    fn scalar<R: Real>(&self) -> DppoShape<R> {
        self.shape()
    }
    fn per_token(&self, x: &TokenTensors<'_>) -> Result<PerToken> {
        per_token(self, x)
    }
    fn gpu(&self) -> GpuShape {
        let b = self.shape::<f32>();
        GpuShape {
            flag: i32::from(b.kl),
            ..GpuShape::new(&[b.low, b.high, b.cap])
        }
    }
}
