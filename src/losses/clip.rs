//! PPO's hard clip (GRPO, GSPO, DAPO's clip-higher, dual clip, two-sided δ): its configuration
//! and its formula, in the tensor form of the composed path and the scalar form of the kernels.
//!
//! ```text
//! l = max(−min(ρ, δ)·A, −clip(ρ, 1−ε_low, 1+ε_high)·A)      then, for A < 0 with dual clip c:
//! l = min(l, −c·A)
//! ```
//!
//! Kinks follow `piecewise.rs`: ties of `max`/`min` split the gradient equally, `clip` and
//! the δ bound have gradient 0 at their bounds.

use candle_core::Tensor;

use crate::error::{check_config, Result};
use crate::losses::metrics::{CLIPPED, CLIP_HIGH, CLIP_LOW, DUAL_CLIPPED};
use crate::losses::objective::{Eval, GpuShape, Objective, PerToken, Shape, Token, TokenTensors};
use crate::piecewise::{self, clamp_scalar};
use crate::real::Real;

/// PPO-style hard clip on the ratio: `l = max(−min(ρ, δ)·A, −clip(ρ, 1−ε_low, 1+ε_high)·A)`,
/// then for `A < 0` with dual clip `c`: `l = min(l, −c·A)`.
///
/// ```
/// let clip = sapo::HardClip::new(0.2, 0.28).with_dual_clip(3.0);
/// assert_eq!(clip.dual_clip, Some(3.0));
/// assert!(clip.validate().is_ok());
/// ```
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct HardClip {
    /// `ε_low`, in `[0, 1)`.
    pub eps_low: f64,
    /// `ε_high` ≥ 0 (DAPO's clip-higher: 0.28).
    pub eps_high: f64,
    /// Dual-clip `c > 1` (verl `clip_ratio_c`), or `None`.
    pub dual_clip: Option<f64>,
    /// Two-sided bound `δ > 1 + ε_high` on the unclipped ratio (TRL `delta`), or `None`.
    pub delta: Option<f64>,
}

impl HardClip {
    /// A clip with bounds `1 − ε_low`, `1 + ε_high`, no dual clip and no δ.
    ///
    /// ```
    /// let clip = sapo::HardClip::new(0.2, 0.28);
    /// assert_eq!(clip.dual_clip, None);
    /// ```
    pub fn new(eps_low: f64, eps_high: f64) -> Self {
        Self {
            eps_low,
            eps_high,
            dual_clip: None,
            delta: None,
        }
    }
    /// Sets the dual clip `c`: `l = min(l, −c·A)` for `A < 0`.
    ///
    /// ```
    /// assert_eq!(sapo::HardClip::new(0.2, 0.2).with_dual_clip(3.0).dual_clip, Some(3.0));
    /// ```
    pub fn with_dual_clip(mut self, c: f64) -> Self {
        self.dual_clip = Some(c);
        self
    }
    /// Sets the two-sided bound `δ`: the unclipped term uses `min(ρ, δ)`.
    ///
    /// ```
    /// assert_eq!(sapo::HardClip::new(0.2, 0.2).with_delta(1.5).delta, Some(1.5));
    /// ```
    pub fn with_delta(mut self, delta: f64) -> Self {
        self.delta = Some(delta);
        self
    }
    /// Checks `0 ≤ ε_low < 1`, `ε_high ≥ 0`, `c > 1`, `δ > 1 + ε_high`, all finite.
    ///
    /// ```
    /// assert!(sapo::HardClip::new(1.0, 0.2).validate().is_err());
    /// ```
    pub fn validate(&self) -> Result<()> {
        check_config(
            self.eps_low.is_finite() && (0.0..1.0).contains(&self.eps_low),
            "eps_low",
            "finite, in [0, 1)",
            self.eps_low,
        )?;
        check_config(
            self.eps_high.is_finite() && self.eps_high >= 0.0,
            "eps_high",
            "finite and >= 0",
            self.eps_high,
        )?;
        if let Some(c) = self.dual_clip {
            check_config(c.is_finite() && c > 1.0, "dual_clip", "finite and > 1", c)?;
        }
        if let Some(delta) = self.delta {
            check_config(
                delta.is_finite() && delta > 1.0 + self.eps_high,
                "delta",
                "finite and > 1 + eps_high",
                delta,
            )?;
        }
        Ok(())
    }

    /// The bounds in the compute type, for the scalar form.
    pub(crate) fn bounds<R: Real>(&self) -> ClipBounds<R> {
        ClipBounds {
            low: R::from_f64(1.0 - self.eps_low),
            high: R::from_f64(1.0 + self.eps_high),
            delta: self.delta.map_or(R::INFINITY, R::from_f64),
            dual_on: self.dual_clip.is_some(),
            dual: R::from_f64(self.dual_clip.unwrap_or(0.0)),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Scalar form (the kernels').

/// [`HardClip`] in the compute type.
pub(crate) struct ClipBounds<R> {
    pub(crate) low: R,
    pub(crate) high: R,
    /// `δ`, or `+∞`.
    pub(crate) delta: R,
    /// Whether the dual clip is on, and its `c` (0 when off): stored as a flag and a value so
    /// that the per-token function selects without a branch and the kernel's sweep vectorizes.
    pub(crate) dual_on: bool,
    pub(crate) dual: R,
}

impl<R: Real> Shape<R> for ClipBounds<R> {
    const SLOTS: &'static [usize] = &[CLIPPED, DUAL_CLIPPED, CLIP_LOW, CLIP_HIGH];

    #[inline(always)]
    fn eval(&self, t: &Token<R>) -> Eval<R> {
        let (r, a) = (t.r, t.a);
        let half = R::from_f64(0.5);
        let (u, du) = clamp_scalar(r, -R::INFINITY, self.delta);
        let (l1, d1) = (-(a * u), -(a * du));
        let (c, dc) = clamp_scalar(r, self.low, self.high);
        let (l2, d2) = (-(a * c), -(a * dc));
        let clipped = l2 > l1;
        let loss = R::select(clipped, l2, l1);
        let slope = R::select(l1 == l2, half * (d1 + d2), R::select(clipped, d2, d1));
        // Branch-free (the dual clip's switch a select), so that the kernel's sweep vectorizes.
        let floor = -(self.dual * a);
        let negative = self.dual_on & (a < R::ZERO);
        let cut = negative & (loss > floor);
        let tie = negative & (loss == floor);
        let loss = R::select(cut, floor, loss);
        let slope = R::select(cut, R::ZERO, R::select(tie, half * slope, slope));
        Eval::through_ratio(
            loss,
            slope,
            [
                R::indicator(clipped),
                R::indicator(cut),
                R::indicator((r < self.low) & (a < R::ZERO)),
                R::indicator((r > self.high) & (a > R::ZERO)),
            ],
        )
    }
}

// ---------------------------------------------------------------------------------------------
// Tensor form (the composed path's).

/// `−f(ρ)·A` of the hard clip and its metric indicators, `[B,T]`; `advantages` are constants.
pub(crate) fn per_token(clip: &HardClip, ratio: &Tensor, advantages: &Tensor) -> Result<PerToken> {
    let adv = advantages;
    let (low, high) = (1.0 - clip.eps_low, 1.0 + clip.eps_high);
    let unclipped = piecewise::clamp(ratio, None, clip.delta)?.mul(adv)?.neg()?;
    let clipped = piecewise::clamp(ratio, Some(low), Some(high))?
        .mul(adv)?
        .neg()?;
    // candle's maximum/minimum split the gradient at ties, as PyTorch does.
    let pessimistic = unclipped.maximum(&clipped)?;
    let dtype = ratio.dtype();
    let negative = adv.lt(0.0)?;
    let (loss, cut) = match clip.dual_clip {
        Some(c) => {
            let floor = (adv * -c)?;
            let cut = negative
                .to_dtype(dtype)?
                .mul(&pessimistic.detach().gt(&floor)?.to_dtype(dtype)?)?;
            let loss = negative.where_cond(&pessimistic.minimum(&floor)?, &pessimistic)?;
            (loss, cut)
        }
        None => (pessimistic.clone(), pessimistic.zeros_like()?),
    };
    let r = ratio.detach();
    let both = |a: Tensor, b: Tensor| -> Result<Tensor> {
        Ok(a.to_dtype(dtype)?.mul(&b.to_dtype(dtype)?)?)
    };
    Ok(PerToken {
        loss,
        metrics: vec![
            (
                CLIPPED,
                clipped.detach().gt(&unclipped.detach())?.to_dtype(dtype)?,
            ),
            (DUAL_CLIPPED, cut),
            (CLIP_LOW, both(r.lt(low)?, negative)?),
            (CLIP_HIGH, both(r.gt(high)?, adv.gt(0.0)?)?),
        ],
    })
}

impl Objective for HardClip {
    const NAME: &'static str = "clip";
    const ID: i32 = 1;
    const DEVICE: &'static str = include_str!("clip.h");
    type Scalar<R: Real> = ClipBounds<R>;

    fn validate(&self) -> Result<()> {
        HardClip::validate(self)
    }
    fn scalar<R: Real>(&self) -> ClipBounds<R> {
        self.bounds()
    }
    fn per_token(&self, x: &TokenTensors<'_>) -> Result<PerToken> {
        per_token(self, x.ratio, x.advantages)
    }
    fn gpu(&self) -> GpuShape {
        let b = self.bounds::<f32>();
        GpuShape {
            flag: i32::from(b.dual_on),
            ..GpuShape::new(&[b.low, b.high, b.delta, b.dual])
        }
    }
}
