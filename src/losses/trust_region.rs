//! The trust-region shape `f` in the unified surrogate `l = −f(ρ)·A`: SAPO's soft gate, PPO's hard
//! clip ([`crate::HardClip`], in `clip.rs`), or none.
//!
//! Each shape has a tensor form (composed ops, autograd) and a scalar form ([`Shape`], what the
//! kernels run per token); the gate's formula itself lives in [`crate::gate`].

use candle_core::Tensor;

use crate::error::Result;
use crate::gate;
use crate::losses::clip::{self, HardClip};
use crate::losses::metrics::{GATE_VALUE, GATE_WEIGHT};
use crate::real::Real;

/// The trust-region shape `f` in `loss = −f(ρ)·A`.
///
/// ```
/// use sapo::{HardClip, TrustRegion};
/// let soft = TrustRegion::SoftGate { tau_pos: 1.0, tau_neg: 1.05 };
/// assert!(soft.validate().is_ok());
/// assert!(TrustRegion::HardClip(HardClip::new(0.2, -0.1)).validate().is_err());
/// ```
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum TrustRegion {
    /// SAPO's gate `f(ρ) = σ(τ(ρ−1))·4/τ`, `τ = τ_pos` if `A > 0` else `τ_neg`.
    SoftGate {
        /// Temperature for positive advantages (> 0).
        tau_pos: f64,
        /// Temperature for non-positive advantages (> 0).
        tau_neg: f64,
    },
    /// PPO's clip (GRPO, GSPO, DAPO, dual clip, two-sided δ).
    HardClip(HardClip),
    /// No trust region: `f(ρ) = ρ` (vanilla importance-weighted policy gradient).
    Unclipped,
}

impl TrustRegion {
    /// Checks the shape's parameters (τ finite and > 0 with `4/τ` finite in f32; the clip's
    /// bounds).
    ///
    /// ```
    /// let bad = sapo::TrustRegion::SoftGate { tau_pos: 1e-40, tau_neg: 1.0 };
    /// assert!(bad.validate().is_err());
    /// ```
    pub fn validate(&self) -> Result<()> {
        match self {
            Self::SoftGate { tau_pos, tau_neg } => {
                gate::check_tau("tau_pos", *tau_pos)?;
                gate::check_tau("tau_neg", *tau_neg)
            }
            Self::HardClip(clip) => clip.validate(),
            Self::Unclipped => Ok(()),
        }
    }

    /// The metric slots this shape defines.
    pub(crate) fn metric_slots(&self) -> &'static [usize] {
        match self {
            Self::SoftGate { .. } => <SoftGate<f32> as Shape<f32>>::SLOTS,
            Self::HardClip(_) => <clip::ClipBounds<f32> as Shape<f32>>::SLOTS,
            Self::Unclipped => <Unclipped as Shape<f32>>::SLOTS,
        }
    }

    /// `−f(ρ)·A` per token and the shape's metric indicators (tensor form).
    pub(crate) fn per_token(&self, ratio: &Tensor, advantages: &Tensor) -> Result<PerToken> {
        match self {
            Self::SoftGate { tau_pos, tau_neg } => {
                soft_gate_per_token(ratio, advantages, *tau_pos, *tau_neg)
            }
            Self::HardClip(c) => clip::per_token(c, ratio, advantages),
            Self::Unclipped => Ok(PerToken {
                loss: ratio.mul(advantages)?.neg()?,
                metrics: vec![],
            }),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Scalar form (the kernels').

/// What one token contributes, from the trust region.
#[derive(Clone, Copy)]
pub(crate) struct Eval<R> {
    /// `−f(ρ)·A`.
    pub value: R,
    /// `∂value/∂ρ`.
    pub slope: R,
    /// Per-token metric values, for the slots `Shape::SLOTS` (in that order).
    pub metrics: [R; 4],
}

/// The scalar form of a trust-region shape, evaluated token by token by the kernels.
pub(crate) trait Shape<R: Real>: Sync {
    /// The metric slots of `Eval::metrics`.
    const SLOTS: &'static [usize];
    /// `−f(ρ)·A`, its derivative in `ρ`, and the metric values at ratio `r`, advantage `a`.
    fn eval(&self, r: R, a: R) -> Eval<R>;
}

/// SAPO's gate with both temperatures in the compute type.
pub(crate) struct SoftGate<R> {
    pub tau_pos: R,
    pub tau_neg: R,
}

impl<R: Real> Shape<R> for SoftGate<R> {
    const SLOTS: &'static [usize] = &[GATE_WEIGHT, GATE_VALUE];

    #[inline(always)]
    fn eval(&self, r: R, a: R) -> Eval<R> {
        let tau = R::select(a > R::ZERO, self.tau_pos, self.tau_neg);
        let (value, weight) = gate::value_and_weight(r, tau);
        Eval {
            value: -(value * a),
            slope: -(a * weight),
            metrics: [weight, value, R::ZERO, R::ZERO],
        }
    }
}

/// `f(ρ) = ρ`.
pub(crate) struct Unclipped;

impl<R: Real> Shape<R> for Unclipped {
    const SLOTS: &'static [usize] = &[];

    #[inline(always)]
    fn eval(&self, r: R, a: R) -> Eval<R> {
        Eval {
            value: -(a * r),
            slope: -a,
            metrics: [R::ZERO; 4],
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Tensor form (the composed path's).

/// The per-token policy loss `−f(ρ)·A` and the per-token values of the shape's metrics.
pub(crate) struct PerToken {
    pub loss: Tensor,
    /// `(slot, [B,T] values)`, detached; masked and summed by the caller.
    pub metrics: Vec<(usize, Tensor)>,
}

fn soft_gate_per_token(
    ratio: &Tensor,
    advantages: &Tensor,
    tau_pos: f64,
    tau_neg: f64,
) -> Result<PerToken> {
    let ones = advantages.ones_like()?;
    let tau = advantages
        .gt(0.0)?
        .where_cond(&(&ones * tau_pos)?, &(&ones * tau_neg)?)?;
    let value = gate::value_per_element(ratio, &tau)?;
    let weight = gate::weight_per_element(&ratio.detach(), &tau)?;
    Ok(PerToken {
        loss: value.mul(advantages)?.neg()?,
        metrics: vec![(GATE_WEIGHT, weight), (GATE_VALUE, value.detach())],
    })
}
