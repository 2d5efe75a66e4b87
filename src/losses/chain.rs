//! The per-token chain of the unified surrogate, in the scalar form the CPU kernels run: the
//! log-ratio and its clamp, the objective's transform, the ratio the objective sees (token,
//! sequence or GSPO-token), the objective's evaluation, the rollout weight, the policy term's
//! gradient and the KL penalty's terms. The kernels (`kernels/policy_loss/cpu.rs`,
//! `kernels/linear_policy_loss/cpu.rs`) traverse rows and tiles and call this per token; the GPU
//! kernels restate it in `kernels/policy_loss/policy_loss.h`.
//!
//! Layer: objectives.

use crate::kl::{self, KlEstimator};
use crate::losses::objective::{Eval, Shape, Token};
use crate::losses::ratio::{self, RatioLevel};
use crate::real::Real;

/// Per-call constants in the compute type.
pub(crate) struct Params<R> {
    pub level: RatioLevel,
    /// The log-ratio clamp `c` (`+∞`: none).
    pub clamp: R,
    pub seq_max: Option<f64>,
    pub kl: Option<KlParams>,
}

/// The KL penalty's options.
#[derive(Clone, Copy)]
pub(crate) struct KlParams {
    pub estimator: KlEstimator,
    pub clamp: bool,
    /// `k̂ = k·R` (TRL's `use_bias_correction_kl`).
    pub importance_weighted: bool,
}

/// What a row's pre-pass gives: the sequence ratio `s`, `∂s/∂(mean y)`, `n·(s − 1)` in f64,
/// and the shape's row statistic.
#[derive(Clone, Copy)]
pub(crate) struct SequenceRatio<R> {
    pub s: R,
    pub ds: R,
    pub excess: f64,
    pub row: R,
}

impl<R: Real> SequenceRatio<R> {
    /// The token level's without a row statistic: no pre-pass.
    pub(crate) fn token_level() -> Self {
        Self {
            s: R::ONE,
            ds: R::ONE,
            excess: 0.0,
            row: R::ZERO,
        }
    }
}

/// The weight a shape's per-token loss is multiplied by: the rollout weight, or the mask alone
/// for the shapes that use the weights otherwise.
#[inline(always)]
pub(crate) fn effective_weight<R: Real, S: Shape<R>>(w: R, keep: R) -> R {
    if S::WEIGHTS_MULTIPLY {
        w
    } else {
        keep
    }
}

/// What one token contributes: its log-ratio `δ`, the ratio the trust region sees, the ratio's
/// derivative through the token's own `ℓ`, the shape's evaluation, and the policy term's gradient
/// `c·w·∂l/∂ℓ` (without the `Sequence` level's row-shared part, added once the row is done).
pub(crate) struct TokenTerms<R> {
    pub delta: R,
    pub r: R,
    pub dr: R,
    pub e: Eval<R>,
    pub g: R,
}

/// One token's constants besides `ℓ`.
#[derive(Clone, Copy)]
pub(crate) struct TokenInputs<R> {
    pub old: R,
    pub adv: R,
    /// The effective weight ([`effective_weight`]): 0 at masked positions.
    pub w: R,
    pub flag: R,
}

/// A token's ratio terms: `δ`, the ratio the shape sees, its derivative through the token's own
/// `ℓ`, and `∂y/∂ℓ` (the token's share of a row-level gradient).
#[derive(Clone, Copy)]
pub(crate) struct RatioTerms<R> {
    pub delta: R,
    pub r: R,
    pub dr: R,
    pub factor: R,
}

/// [`RatioTerms`] of a token with log-prob `lp`, old log-prob `old` and advantage `adv`.
#[inline(always)]
pub(crate) fn ratio_terms<R: Real, S: Shape<R>>(
    lp: R,
    old: R,
    adv: R,
    p: &Params<R>,
    shape: &S,
    seq: SequenceRatio<R>,
) -> RatioTerms<R> {
    let token = p.level == RatioLevel::Token;
    let seq_token = p.level == RatioLevel::SequenceToken;
    let (delta, ddelta) = ratio::log_ratio(lp - old, p.clamp);
    let (y, dy) = shape.log_ratio(delta, adv);
    let (rho, drho) = ratio::ratio(y);
    let factor = ddelta * dy;
    RatioTerms {
        delta,
        r: R::select(token, rho, seq.s),
        dr: R::select(token, drho * factor, R::select(seq_token, seq.ds, R::ZERO)),
        factor,
    }
}

/// [`TokenTerms`] of a token with log-prob `lp` (the one place the kernels chain ratio, shape
/// and aggregation per token).
#[inline(always)]
pub(crate) fn token_terms<R: Real, S: Shape<R>>(
    lp: R,
    x: TokenInputs<R>,
    p: &Params<R>,
    shape: &S,
    coef_policy: R,
    seq: SequenceRatio<R>,
) -> TokenTerms<R> {
    let RatioTerms { delta, r, dr, .. } = ratio_terms(lp, x.old, x.adv, p, shape, seq);
    let e = shape.eval(&Token {
        lp,
        old: x.old,
        delta,
        r,
        a: x.adv,
        row: seq.row,
        flag: x.flag,
    });
    TokenTerms {
        delta,
        r,
        dr,
        e,
        g: coef_policy * x.w * (e.slope * dr + e.direct),
    }
}

/// `(m·k̂, m·k, m·c_kl·∂k̂/∂ℓ)` of the KL penalty at a token with mask `keep`, where
/// `k̂ = k·R` when importance-weighted (`R = r`, `∂R/∂ℓ = dr` through the token's own `ℓ`) and
/// `k̂ = k` otherwise.
#[inline(always)]
pub(crate) fn kl_terms<R: Real>(
    kl: KlParams,
    keep: R,
    coef_kl: R,
    lp: R,
    reference: R,
    (r, dr): (R, R),
) -> (R, R, R) {
    let d = lp - reference;
    let (k, dk) = kl::value_and_slope(kl.estimator, kl.clamp, d);
    let (weight, dweight) = if kl.importance_weighted {
        (r, dr)
    } else {
        (R::ONE, R::ZERO)
    };
    let slope = kl::weighted_slope(kl.estimator, kl.clamp, d, (k, dk), (weight, dweight));
    (keep * k * weight, keep * k, keep * coef_kl * slope)
}
