//! The importance ratio the trust region sees: token, sequence or GSPO-token.
//!
//! ```text
//! δ = clamp(ℓ − ℓold, −c, c)                          token log-ratio (c = 20 in verl, none in TRL)
//! ρ = e^δ                                             token ratio
//! log s_i = min((1/n_i) Σ_t m·δ, s_max)               sequence log-ratio (sums in f64)
//! s_{i,t} = sg[s_i]·e^{ℓ − sg[ℓ]}                      GSPO-token: value s_i, gradient on token t
//! ```
//!
//! Every exponential saturates at [`Real::MAX_EXP_ARG`] (88 in f32): a ratio is never `inf`, so
//! where the trust region cuts the gradient it is exactly 0, never `0·inf = NaN`. Both forms live
//! here side by side: the tensor form of the composed path and the scalar form of the kernels.

use candle_core::{Tensor, D};

use crate::error::Result;
use crate::losses::inputs::Prepared;
use crate::losses::trust_region::TrustRegion;
use crate::piecewise::{self, clamp_scalar};
use crate::real::{accumulation_dtype, max_exp_arg, Real};

/// verl's clamp of the token log-ratio (`SAFETY_BOUND`): `δ = clamp(ℓ − ℓold, −20, 20)`, the
/// default of [`crate::PolicyLossConfig::log_ratio_clamp`].
///
/// ```
/// assert_eq!(sapo::Grpo::default().config().log_ratio_clamp, Some(sapo::losses::DEFAULT_LOG_RATIO_CLAMP));
/// ```
pub const DEFAULT_LOG_RATIO_CLAMP: f64 = 20.0;

/// verl's upper bound on GSPO's sequence log-ratio, `log s ≤ 10`, the default of the
/// [`crate::Gspo`] preset.
///
/// ```
/// assert_eq!(sapo::Gspo::default().config().seq_log_ratio_max, Some(sapo::losses::GSPO_SEQ_LOG_RATIO_MAX));
/// ```
pub const GSPO_SEQ_LOG_RATIO_MAX: f64 = 10.0;

/// Which importance ratio the trust region sees.
///
/// ```
/// use sapo::{Gspo, RatioLevel};
/// let cfg = Gspo::default().config().with_ratio_level(RatioLevel::SequenceToken);
/// assert_eq!(cfg.ratio_level, RatioLevel::SequenceToken);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum RatioLevel {
    /// `ρ_{i,t} = exp(δ_{i,t})`, `δ = clamp(ℓ − ℓold, −c, c)` — PPO, GRPO, SAPO.
    #[default]
    Token,
    /// `s_i = exp((1/n_i) Σ_t m·δ)`, shared by every token of row `i`, with gradient through every
    /// token — GSPO proper, TRL `importance_sampling_level="sequence"`.
    Sequence,
    /// `s_{i,t} = sg[s_i]·exp(ℓ − sg[ℓ])`: value `s_i`, gradient `s_i` on token `t` alone —
    /// GSPO-token, the form verl implements (allows per-token advantages).
    SequenceToken,
}

// ---------------------------------------------------------------------------------------------
// Scalar form (the kernels').

/// `(δ, ∂δ/∂ℓ)` of the token log-ratio `clamp(ℓ − ℓold, −c, c)` (`c = ∞`: no clamp).
#[inline(always)]
pub(crate) fn log_ratio<R: Real>(raw: R, clamp: R) -> (R, R) {
    clamp_scalar(raw, -clamp, clamp)
}

/// `(e^x, ∂e^x/∂x)`, saturating at [`Real::MAX_EXP_ARG`] (where the derivative becomes 0).
#[inline(always)]
pub(crate) fn ratio<R: Real>(x: R) -> (R, R) {
    let (x, dx) = clamp_scalar(x, -R::INFINITY, R::MAX_EXP_ARG);
    let r = x.exp();
    (r, r * dx)
}

/// `(log s, ∂log s/∂(mean δ))` of a row from `Σ m·δ` (accumulated in f64) and `n`, with the
/// upper bound `s_max` (`None`: none).
pub(crate) fn sequence_log_ratio(sum: f64, n: f64, seq_max: Option<f64>) -> (f64, f64) {
    clamp_scalar(
        sum / n.max(1.0),
        f64::NEG_INFINITY,
        seq_max.unwrap_or(f64::INFINITY),
    )
}

// ---------------------------------------------------------------------------------------------
// Tensor form (the composed path's).

/// The ratios of a batch.
pub(crate) struct Ratios {
    /// `δ`, `[B,T]` (0 at masked positions).
    pub log_ratio: Tensor,
    /// The ratio the trust region sees, `[B,T]`.
    pub ratio: Tensor,
    /// `Σ m·(ratio − 1)`, a scalar in the compute dtype: at the sequence levels taken from the
    /// f64 log-ratio, so that `ratio_mean − 1` keeps its digits.
    pub excess_sum: Tensor,
}

/// The exponent of the ratio, `min(x, MAX_EXP_ARG)` (the ratio is its `e^·`, as [`ratio`]'s).
fn saturated(x: &Tensor) -> Result<Tensor> {
    piecewise::clamp(x, None, Some(max_exp_arg(x.dtype())))
}

/// A batch's ratio as its exponent: the ratio is `e^exponent`.
struct Exponent {
    /// `δ`, `[B,T]`.
    log_ratio: Tensor,
    /// `L`, `[B,T]`: the ratio's saturated log (differentiable in the log-probs it was given).
    exponent: Tensor,
    /// The rows' sequence log-ratio `log s_i`, `[B]` in the accumulation dtype, at the
    /// sequence levels.
    log_s: Option<Tensor>,
}

/// `δ` and the exponent of the ratio of `level` at the log-probs `log_probs` (differentiable;
/// `p.log_probs` or a copy of it) against `p`'s other (detached) inputs: of the trust region's
/// log-ratio `y` (`δ` itself but for GMPO's clip).
fn exponent(
    level: RatioLevel,
    (clamp, seq_max): (Option<f64>, Option<f64>),
    trust_region: &TrustRegion,
    log_probs: &Tensor,
    p: &Prepared,
) -> Result<Exponent> {
    let dtype = log_probs.dtype();
    let acc = accumulation_dtype(log_probs.device());
    let log_ratio = piecewise::clamp(&(log_probs - &p.old_log_probs)?, clamp.map(|c| -c), clamp)?;
    let y = trust_region
        .objective()
        .log_ratio(&log_ratio, &p.advantages)?;
    if level == RatioLevel::Token {
        return Ok(Exponent {
            exponent: saturated(&y)?,
            log_ratio,
            log_s: None,
        });
    }
    // Σ_t m·δ in f64, then the row mean and its bound.
    let n = p.counts.row_tokens.to_dtype(acc)?.maximum(1.0)?;
    let mean = y.mul(&p.mask)?.to_dtype(acc)?.sum(D::Minus1)?.div(&n)?;
    let log_s = piecewise::clamp(&mean, None, seq_max)?;
    let row = log_s.to_dtype(dtype)?.unsqueeze(1)?;
    let shape = log_probs.shape();
    let row = match level {
        RatioLevel::Sequence => row.broadcast_as(shape)?,
        // Value log s_i, gradient 1 on each token's own ℓ.
        _ => {
            let straight_through = (log_probs - log_probs.detach())?;
            let log_s_t = straight_through.broadcast_add(&row.detach())?;
            piecewise::clamp(&log_s_t, None, seq_max)?
        }
    };
    Ok(Exponent {
        log_ratio,
        exponent: saturated(&row)?,
        log_s: Some(log_s),
    })
}

/// `δ` and the ratio of `level` for prepared (scrubbed, detached) inputs: the ratio of the
/// trust region's log-ratio `y` (`δ` itself but for GMPO's clip).
pub(crate) fn ratios(
    level: RatioLevel,
    clamps: (Option<f64>, Option<f64>),
    trust_region: &TrustRegion,
    p: &Prepared,
) -> Result<Ratios> {
    let dtype = p.log_probs.dtype();
    let acc = accumulation_dtype(p.log_probs.device());
    let Exponent {
        log_ratio,
        exponent,
        log_s,
    } = exponent(level, clamps, trust_region, &p.log_probs, p)?;
    let ratio = exponent.exp()?;
    let excess_sum = match log_s {
        None => ((ratio.detach() - 1.0)?.mul(&p.mask)?)
            .to_dtype(acc)?
            .sum_all()?
            .to_dtype(dtype)?,
        // From the f64 log-ratio, saturating as the ratio does.
        Some(log_s) => (saturated(&log_s.detach())?.exp()? - 1.0)?
            .mul(&p.counts.row_tokens.to_dtype(acc)?)?
            .sum_all()?
            .to_dtype(dtype)?,
    };
    Ok(Ratios {
        log_ratio,
        ratio,
        excess_sum,
    })
}

/// The exponent `L` of [`ratios`]' ratio computed again at `log_probs` (a copy of
/// `p.log_probs`): the same values, with a graph of its own back to `log_probs`.
pub(crate) fn ratio_exponent_at(
    level: RatioLevel,
    clamps: (Option<f64>, Option<f64>),
    trust_region: &TrustRegion,
    log_probs: &Tensor,
    p: &Prepared,
) -> Result<Tensor> {
    Ok(exponent(level, clamps, trust_region, log_probs, p)?.exponent)
}
