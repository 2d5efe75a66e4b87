//! GMPO (verl `geo_mean`, arXiv 2507.20673): the geometric mean of sign-aware clipped token
//! ratios, one ratio and one advantage per sequence.
//!
//! ```text
//! x = ℓ − ℓold (no clamp),  x̃ = clamp(x, −ε_low, ε_high)
//! y = sgn(A)·min(sgn(A)·x, sgn(A)·x̃)        (A > 0: min(x, x̃); A < 0: max(x, x̃); A = 0: 0)
//! S_i = exp(Σ_t m·y / n_i),   Ā_i = Σ_t m·A / n_i,   W_i = exp(Σ_t m·ln(w + 1e-10) / n_i)
//! loss = (1/B) Σ_i −Ā_i·S_i·W_i
//! ```
//!
//! In the unified surrogate this is the [`crate::RatioLevel::Sequence`] ratio of the clipped
//! log-ratio `y` ([`GeometricClip`] is the shape's transform), `f(S) = S`, the rollout weights'
//! geometric mean per row ([`row_weights`]) and the [`crate::Aggregation::SeqMean`] mode:
//! `(1/B) Σ_i (1/n_i) Σ_t −S_i·A_t·W_i = (1/B) Σ_i −Ā_i·S_i·W_i`. Metrics: `clip_fraction_pos`
//! and `clip_fraction_neg` (`x ≠ x̃` with `A > 0`, resp. `A < 0`).

use candle_core::{Tensor, D};

use crate::error::{check_config, Result};
use crate::losses::metrics::{CLIPPED_NEG, CLIPPED_POS};
use crate::losses::objective::{
    indicator, Batch, Eval, GpuShape, Objective, PerToken, Prepass, Shape, Token, TokenTensors,
};
use crate::piecewise::{self, clamp_scalar};
use crate::real::Real;

/// GMPO's clip of the log-ratio to `[−ε_low, ε_high]` (verl `clip_ratio_low/high` for
/// `geo_mean`; the paper's 0.4, 0.4).
///
/// ```
/// assert!(sapo::GeometricClip { log_clip_low: 0.4, log_clip_high: 0.4 }.validate().is_ok());
/// assert!(sapo::GeometricClip { log_clip_low: -0.1, log_clip_high: 0.4 }.validate().is_err());
/// ```
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GeometricClip {
    /// `ε_low` ≥ 0.
    pub log_clip_low: f64,
    /// `ε_high` ≥ 0.
    pub log_clip_high: f64,
}

impl GeometricClip {
    /// Checks both bounds finite and ≥ 0.
    ///
    /// ```
    /// assert!(sapo::GeometricClip { log_clip_low: 0.2, log_clip_high: f64::INFINITY }.validate().is_err());
    /// ```
    pub fn validate(&self) -> Result<()> {
        for (name, v) in [
            ("log_clip_low", self.log_clip_low),
            ("log_clip_high", self.log_clip_high),
        ] {
            check_config(v.is_finite() && v >= 0.0, name, "finite and >= 0", v)?;
        }
        Ok(())
    }
    pub(crate) fn shape<R: Real>(&self) -> LogClip<R> {
        LogClip {
            low: R::from_f64(-self.log_clip_low),
            high: R::from_f64(self.log_clip_high),
        }
    }
}

/// `1e-10`, verl's guard in `ln(w + 1e-10)`.
const WEIGHT_GUARD: f64 = 1e-10;

/// The rows' geometric-mean rollout weights `W_i = exp(Σ_t m·ln(w + 1e-10) / n_i)`, broadcast
/// to `[B,T]` (constants; `mask` is a 0/1 float mask of `w`'s dtype, `w` finite where unmasked).
pub(crate) fn row_weights(w: &Tensor, mask: &Tensor) -> Result<Tensor> {
    let keep = mask.ne(0.0)?;
    let log_w = keep.where_cond(&w.affine(1.0, WEIGHT_GUARD)?.log()?, &w.zeros_like()?)?;
    let n = mask.sum_keepdim(D::Minus1)?.maximum(1.0)?;
    Ok(log_w
        .sum_keepdim(D::Minus1)?
        .div(&n)?
        .exp()?
        .broadcast_as(w.shape())?
        .contiguous()?)
}

// ---------------------------------------------------------------------------------------------
// Scalar form (the kernels').

pub(crate) struct LogClip<R> {
    /// `−ε_low`.
    pub(crate) low: R,
    pub(crate) high: R,
}

impl<R: Real> Shape<R> for LogClip<R> {
    const SLOTS: &'static [usize] = &[CLIPPED_POS, CLIPPED_NEG];
    const TRANSFORMS_LOG_RATIO: bool = true;

    /// `y` and `∂y/∂x`: the clamp's value where it is the pessimistic one, ties split.
    #[inline(always)]
    fn log_ratio(&self, x: R, a: R) -> (R, R) {
        let (c, dc) = clamp_scalar(x, self.low, self.high);
        let half = R::from_f64(0.5);
        let tie = (x == c, half * (R::ONE + dc));
        // A > 0: min(x, x̃); A < 0: max(x, x̃).
        let take_clamp = R::select(a > R::ZERO, R::indicator(c < x), R::indicator(c > x));
        let (y, dy) = if tie.0 {
            (x, tie.1)
        } else if take_clamp != R::ZERO {
            (c, dc)
        } else {
            (x, R::ONE)
        };
        let zero = a == R::ZERO;
        (R::select(zero, R::ZERO, y), R::select(zero, R::ZERO, dy))
    }

    #[inline(always)]
    fn eval(&self, t: &Token<R>) -> Eval<R> {
        let clipped = t.delta < self.low || t.delta > self.high;
        Eval::through_ratio(
            -(t.a * t.r),
            -t.a,
            [
                R::indicator(clipped && t.a > R::ZERO),
                R::indicator(clipped && t.a < R::ZERO),
                R::ZERO,
                R::ZERO,
            ],
        )
    }
}

// ---------------------------------------------------------------------------------------------
// Tensor form (the composed path's).

/// `y` of a `[B,T]` log-ratio `x` (differentiable) under advantages `A`.
fn log_ratio_tensor(clip: &GeometricClip, x: &Tensor, advantages: &Tensor) -> Result<Tensor> {
    let clamped = piecewise::clamp(x, Some(-clip.log_clip_low), Some(clip.log_clip_high))?;
    // candle's minimum/maximum split the gradient at ties, as PyTorch's do.
    let pos = x.minimum(&clamped)?;
    let neg = x.maximum(&clamped)?;
    let zero = x.zeros_like()?;
    Ok(advantages
        .gt(0.0)?
        .where_cond(&pos, &advantages.lt(0.0)?.where_cond(&neg, &zero)?)?)
}

/// The clip counts per token (detached).
fn metrics(clip: &GeometricClip, x: &TokenTensors<'_>) -> Result<Vec<(usize, Tensor)>> {
    let d = x.log_ratio.detach();
    let clipped = indicator(
        &d.lt(-clip.log_clip_low)?
            .maximum(&d.gt(clip.log_clip_high)?)?,
        &d,
    )?;
    let sign = |cond: Tensor| -> Result<Tensor> { Ok(clipped.mul(&indicator(&cond, &d)?)?) };
    Ok(vec![
        (CLIPPED_POS, sign(x.advantages.gt(0.0)?)?),
        (CLIPPED_NEG, sign(x.advantages.lt(0.0)?)?),
    ])
}

impl Objective for GeometricClip {
    const NAME: &'static str = "gmpo";
    const ID: i32 = 9;
    const DEVICE: &'static str = include_str!("gmpo.h");
    const BATCH_PREPASS: bool = true;
    type Scalar<R: Real> = LogClip<R>;

    fn validate(&self) -> Result<()> {
        GeometricClip::validate(self)
    }
    fn scalar<R: Real>(&self) -> LogClip<R> {
        self.shape()
    }
    /// `f(S) = S` of the clipped log-ratio (its transform is [`Objective::log_ratio`]).
    fn per_token(&self, x: &TokenTensors<'_>) -> Result<PerToken> {
        Ok(PerToken {
            loss: x.ratio.mul(x.advantages)?.neg()?,
            metrics: metrics(self, x)?,
        })
    }
    fn log_ratio(&self, log_ratio: &Tensor, advantages: &Tensor) -> Result<Tensor> {
        log_ratio_tensor(self, log_ratio, advantages)
    }
    fn gpu(&self) -> GpuShape {
        let b = self.shape::<f32>();
        GpuShape::new(&[b.low, b.high])
    }
    /// The rows' geometric-mean rollout weights.
    fn prepass(&self, batch: &Batch<'_>) -> Result<Prepass> {
        let is_weights = match batch.inputs.is_weights(batch.t)? {
            Some(w) => Some(row_weights(&w, &(batch.mask_as)(w.dtype())?)?),
            None => None,
        };
        Ok(Prepass {
            is_weights,
            flags: None,
        })
    }
}
