//! The trust-region shape `f` in the unified surrogate `l = −f(ρ)·A`: SAPO's soft gate, PPO's hard
//! clip ([`crate::HardClip`], in `clip.rs`), none, and the shapes of the later objectives, each in
//! its own file (`cispo.rs`, `dppo.rs`, `dro.rs`, `gmpo.rs`, `kl_cov.rs`, `vespo.rs`).
//!
//! Some shapes read the log-prob `ℓ` itself, not only the ratio (CISPO, GPG, DRO, DPPO, VESPO
//! weigh `ℓ` by a detached factor). A shape therefore sees the whole token ([`Token`]): `ℓ`,
//! `ℓold`, the log-ratio, the ratio, the advantage, and where it needs them a row statistic
//! (VESPO) or a per-token selection (KL-Cov); it returns the value, its slope in the ratio and its
//! direct slope in `ℓ`.
//!
//! Each shape has a tensor form (composed ops, autograd) and a scalar form ([`Shape`], what the
//! kernels run per token); the gate's formula itself lives in [`crate::gate`].

use candle_core::Tensor;

use crate::error::Result;
use crate::gate;
use crate::losses::cispo::{self, IsWeightClip};
use crate::losses::clip::{self, HardClip};
use crate::losses::dppo::{self, Dppo};
use crate::losses::dro::{self, Dro};
use crate::losses::gmpo::{self, GeometricClip};
use crate::losses::kl_cov::{self, KlCov};
use crate::losses::metrics::{GATE_VALUE, GATE_WEIGHT};
use crate::losses::vespo::{self, Vespo};
use crate::real::Real;

/// The trust-region shape `f` in `loss = −f(ρ)·A`, or the per-token objective that replaces it.
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
    /// CISPO: `l = −sg[clip_w(ρ)]·A·ℓ` (verl's bounds or TRL's cap, [`IsWeightClip`]).
    Cispo(IsWeightClip),
    /// GPG / REINFORCE: `l = −A·ℓ` (verl `gpg`; bypass mode's `reinforce`).
    PolicyGradient,
    /// DRO: `l = −(A·ℓ − ½β(ℓ − ℓold)²)`.
    Dro(Dro),
    /// KL-Cov: `l = −A·ρ + [t ∈ S]·κ·|ℓ − ℓold|` on the highest-covariance tokens `S`.
    KlCov(KlCov),
    /// DPPO: `l = −A·sg[min(ρ, C)]·ℓ·valid` inside a binary TV or KL trust region.
    Dppo(Dppo),
    /// VESPO: `l = −sg[φ_i]·A·ℓ` with a gamma-shaped sequence weight `φ_i`.
    Vespo(Vespo),
    /// GMPO's sign-aware clip of the log-ratio, `y = sgn(A)·min(sgn(A)·x, sgn(A)·clamp(x))`,
    /// then `f = e^y` (with [`crate::RatioLevel::Sequence`]: the geometric mean of the clipped
    /// token ratios).
    GeometricClip(GeometricClip),
}

impl TrustRegion {
    /// Checks the shape's parameters (τ finite and > 0 with `4/τ` finite in f32; the clip's
    /// bounds; every new objective's ranges).
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
            Self::Unclipped | Self::PolicyGradient => Ok(()),
            Self::Cispo(c) => c.validate(),
            Self::Dro(d) => d.validate(),
            Self::KlCov(k) => k.validate(),
            Self::Dppo(d) => d.validate(),
            Self::Vespo(v) => v.validate(),
            Self::GeometricClip(g) => g.validate(),
        }
    }

    /// The metric slots this shape defines.
    pub(crate) fn metric_slots(&self) -> &'static [usize] {
        match self {
            Self::SoftGate { .. } => <SoftGate<f32> as Shape<f32>>::SLOTS,
            Self::HardClip(_) => <clip::ClipBounds<f32> as Shape<f32>>::SLOTS,
            Self::Unclipped => <Unclipped as Shape<f32>>::SLOTS,
            Self::PolicyGradient => <PolicyGradient as Shape<f32>>::SLOTS,
            Self::Cispo(_) => <cispo::CispoBounds<f32> as Shape<f32>>::SLOTS,
            Self::Dro(_) => <dro::DroShape<f32> as Shape<f32>>::SLOTS,
            Self::KlCov(_) => <kl_cov::KlCovShape<f32> as Shape<f32>>::SLOTS,
            Self::Dppo(_) => <dppo::DppoShape<f32> as Shape<f32>>::SLOTS,
            Self::Vespo(_) => <vespo::VespoShape<f32> as Shape<f32>>::SLOTS,
            Self::GeometricClip(_) => <gmpo::LogClip<f32> as Shape<f32>>::SLOTS,
        }
    }

    /// Whether the rollout weights `w` multiply the per-token loss (VESPO folds them into its
    /// sequence weight; GMPO takes their geometric mean per row).
    pub(crate) fn weights_multiply(&self) -> bool {
        !matches!(self, Self::Vespo(_))
    }

    /// `−f(ρ)·A` (or the objective's per-token loss) and the shape's metric indicators (tensor
    /// form).
    pub(crate) fn per_token(&self, x: &TokenTensors<'_>) -> Result<PerToken> {
        let (ratio, advantages) = (x.ratio, x.advantages);
        match self {
            Self::SoftGate { tau_pos, tau_neg } => {
                soft_gate_per_token(ratio, advantages, *tau_pos, *tau_neg)
            }
            Self::HardClip(c) => clip::per_token(c, ratio, advantages),
            Self::Unclipped | Self::GeometricClip(_) => {
                let mut out = PerToken {
                    loss: ratio.mul(advantages)?.neg()?,
                    metrics: vec![],
                };
                if let Self::GeometricClip(g) = self {
                    out.metrics = gmpo::metrics(g, x)?;
                }
                Ok(out)
            }
            Self::PolicyGradient => Ok(PerToken {
                loss: x.log_probs.mul(advantages)?.neg()?,
                metrics: vec![],
            }),
            Self::Cispo(c) => cispo::per_token(c, x),
            Self::Dro(d) => dro::per_token(d, x),
            Self::KlCov(k) => kl_cov::per_token(k, x),
            Self::Dppo(d) => dppo::per_token(d, x),
            Self::Vespo(v) => vespo::per_token(v, x),
        }
    }

    /// The log-ratio transform before the ratio (tensor form): GMPO's sign-aware clip, else
    /// the identity.
    pub(crate) fn log_ratio(&self, log_ratio: &Tensor, advantages: &Tensor) -> Result<Tensor> {
        match self {
            Self::GeometricClip(g) => gmpo::log_ratio(g, log_ratio, advantages),
            _ => Ok(log_ratio.clone()),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Scalar form (the kernels').

/// One token as a shape sees it (all in the compute type; 0 at masked positions).
#[derive(Clone, Copy)]
pub(crate) struct Token<R> {
    /// `ℓ`.
    pub lp: R,
    /// `ℓold`.
    pub old: R,
    /// The log-ratio `δ = clamp(ℓ − ℓold, ±c)` (before the shape's own transform).
    pub delta: R,
    /// The ratio the shape sees (token `ρ` or sequence `s`).
    pub r: R,
    /// The advantage.
    pub a: R,
    /// The row statistic `Σ_t m·row_term` (shapes with `ROW_STATISTIC`), else 0.
    pub row: R,
    /// The per-token selection (KL-Cov), else 0.
    pub flag: R,
}

/// What one token contributes, from the trust region.
#[derive(Clone, Copy)]
pub(crate) struct Eval<R> {
    /// `−f(ρ)·A` (or the objective's per-token loss).
    pub value: R,
    /// `∂value/∂ρ` (through the ratio).
    pub slope: R,
    /// `∂value/∂ℓ` at a fixed ratio (the shapes that read `ℓ` itself).
    pub direct: R,
    /// Per-token metric values, for the slots `Shape::SLOTS` (in that order).
    pub metrics: [R; 4],
}

impl<R: Real> Eval<R> {
    /// An evaluation through the ratio only.
    #[inline(always)]
    pub(crate) fn through_ratio(value: R, slope: R, metrics: [R; 4]) -> Self {
        Self {
            value,
            slope,
            direct: R::ZERO,
            metrics,
        }
    }
}

/// The scalar form of a trust-region shape, evaluated token by token by the kernels.
pub(crate) trait Shape<R: Real>: Sync {
    /// The metric slots of `Eval::metrics`.
    const SLOTS: &'static [usize];
    /// Whether the rollout weights multiply the per-token loss.
    const WEIGHTS_MULTIPLY: bool = true;
    /// Whether [`Shape::eval`] reads [`Token::row`], the row sum of [`Shape::row_term`].
    const ROW_STATISTIC: bool = false;
    /// The per-token term summed over the row (masked) into `Token::row`.
    #[inline(always)]
    fn row_term(&self, _delta: R, _w: R) -> R {
        R::ZERO
    }
    /// The log-ratio the ratio is taken of, and its derivative in `δ` (identity but for GMPO).
    #[inline(always)]
    fn log_ratio(&self, delta: R, _a: R) -> (R, R) {
        (delta, R::ONE)
    }
    /// The token's loss, its slopes and its metric values.
    fn eval(&self, t: &Token<R>) -> Eval<R>;
}

/// SAPO's gate with both temperatures in the compute type.
pub(crate) struct SoftGate<R> {
    pub tau_pos: R,
    pub tau_neg: R,
}

impl<R: Real> Shape<R> for SoftGate<R> {
    const SLOTS: &'static [usize] = &[GATE_WEIGHT, GATE_VALUE];

    #[inline(always)]
    fn eval(&self, t: &Token<R>) -> Eval<R> {
        let a = t.a;
        let tau = R::select(a > R::ZERO, self.tau_pos, self.tau_neg);
        let (value, weight) = gate::value_and_weight(t.r, tau);
        Eval::through_ratio(
            -(value * a),
            -(a * weight),
            [weight, value, R::ZERO, R::ZERO],
        )
    }
}

/// `f(ρ) = ρ`.
pub(crate) struct Unclipped;

impl<R: Real> Shape<R> for Unclipped {
    const SLOTS: &'static [usize] = &[];

    #[inline(always)]
    fn eval(&self, t: &Token<R>) -> Eval<R> {
        Eval::through_ratio(-(t.a * t.r), -t.a, [R::ZERO; 4])
    }
}

/// GPG: `l = −A·ℓ`, `∂l/∂ℓ = −A`.
pub(crate) struct PolicyGradient;

impl<R: Real> Shape<R> for PolicyGradient {
    const SLOTS: &'static [usize] = &[];

    #[inline(always)]
    fn eval(&self, t: &Token<R>) -> Eval<R> {
        Eval {
            value: -(t.a * t.lp),
            slope: R::ZERO,
            direct: -t.a,
            metrics: [R::ZERO; 4],
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Tensor form (the composed path's).

/// The tensors a shape's tensor form reads (scrubbed: 0 at masked positions).
pub(crate) struct TokenTensors<'a> {
    /// `ℓ`, carrying the gradient.
    pub log_probs: &'a Tensor,
    /// `ℓold`.
    pub old_log_probs: &'a Tensor,
    /// `δ`, carrying the gradient (before the shape's transform).
    pub log_ratio: &'a Tensor,
    /// The ratio the shape sees, carrying the gradient.
    pub ratio: &'a Tensor,
    /// `[B,T]` advantages.
    pub advantages: &'a Tensor,
    /// `[B,T]` 0/1 mask in the compute dtype.
    pub mask: &'a Tensor,
    /// `[B,T]` rollout weights, if any.
    pub is_weights: Option<&'a Tensor>,
    /// `[B,T]` KL-Cov selection, if any.
    pub flags: Option<&'a Tensor>,
}

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

/// `[cond]` as a 0/1 tensor of `like`'s dtype.
pub(crate) fn indicator(cond: &Tensor, like: &Tensor) -> Result<Tensor> {
    Ok(cond.to_dtype(like.dtype())?)
}
