//! TOPR, tapered off-policy REINFORCE (ROLL `pg_variant: topr`, arXiv 2503.14286): REINFORCE on
//! the responses with a positive reward score, REINFORCE with a truncated detached ratio on the
//! others. The branch is the row's reward score `S_i` (input `scores`), not the advantage's sign.
//!
//! ```text
//! S_i > 0:  l = −w₊·A·ℓ                      ∂l/∂ℓ = −w₊·A
//! S_i ≤ 0:  l = −w₋·sg[min(ρ, 1)]·A·ℓ        ∂l/∂ℓ = −w₋·min(ρ, 1)·A
//! ```
//!
//! Metric: `truncated_fraction` = mean(`[S_i ≤ 0]·[ρ > 1]`), the tokens whose weight the taper
//! cut. The pre-pass spreads `[S_i > 0]` over the row as the per-token flags every path reads.

use crate::checks::compute_dtype;
use crate::error::{check_config, Error, Result};
use crate::losses::metrics::TRUNCATED;
use crate::losses::objective::{
    indicator, Batch, Eval, GpuShape, Objective, PerToken, Prepass, Shape, Token, TokenTensors,
};
use crate::real::Real;

/// TOPR's weights of the positive (`S > 0`) and negative (`S ≤ 0`) sets (ROLL's defaults: 1, 1).
/// Needs the rows' reward scores ([`crate::PolicyInputs::with_scores`]).
///
/// ```
/// let topr = sapo::Topr::default();
/// assert_eq!((topr.positive_weight, topr.negative_weight), (1.0, 1.0));
/// assert!(sapo::Topr { positive_weight: -1.0, negative_weight: 1.0 }.validate().is_err());
/// ```
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Topr {
    /// `w₊` ≥ 0, finite (ROLL `topr_positive_weight`).
    pub positive_weight: f64,
    /// `w₋` ≥ 0, finite (ROLL `topr_negative_weight`).
    pub negative_weight: f64,
}

impl Topr {
    /// Checks both weights (finite and ≥ 0).
    ///
    /// ```
    /// assert!(sapo::Topr::default().validate().is_ok());
    /// ```
    pub fn validate(&self) -> Result<()> {
        for (arg, w) in [
            ("topr_positive_weight", self.positive_weight),
            ("topr_negative_weight", self.negative_weight),
        ] {
            check_config(w.is_finite() && w >= 0.0, arg, "finite and >= 0", w)?;
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// Scalar form (the kernels').

pub(crate) struct ToprShape<R> {
    positive: R,
    negative: R,
}

impl<R: Real> Shape<R> for ToprShape<R> {
    const SLOTS: &'static [usize] = &[TRUNCATED];

    #[inline(always)]
    fn eval(&self, t: &Token<R>) -> Eval<R> {
        let positive = t.flag != R::ZERO;
        let taper = R::select(t.r > R::ONE, R::ONE, t.r);
        let weight = R::select(positive, self.positive, self.negative * taper);
        Eval {
            value: -(weight * t.a * t.lp),
            slope: R::ZERO,
            direct: -(weight * t.a),
            metrics: [
                R::indicator(!positive && t.r > R::ONE),
                R::ZERO,
                R::ZERO,
                R::ZERO,
            ],
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Tensor form (the composed path's).

pub(crate) fn per_token(topr: &Topr, x: &TokenTensors<'_>) -> Result<PerToken> {
    let positive = x.flags.ok_or(Error::InvalidValue {
        arg: "scores",
        expected: "TOPR's row flags from the scores".into(),
        actual: "None".into(),
    })?;
    let ratio = x.ratio.detach();
    let taper = ratio.minimum(1.0)?;
    let negative = (1.0 - positive)?;
    let weight = ((positive * topr.positive_weight)?
        + negative.mul(&taper)?.affine(topr.negative_weight, 0.0)?)?;
    Ok(PerToken {
        loss: weight.mul(x.advantages)?.mul(x.log_probs)?.neg()?,
        metrics: vec![(
            TRUNCATED,
            negative.mul(&indicator(&ratio.gt(1.0)?, &ratio)?)?,
        )],
    })
}

impl Objective for Topr {
    const NAME: &'static str = "topr";
    const ID: i32 = 10;
    const DEVICE: &'static str = include_str!("topr.h");
    const TOKEN_ONLY: bool = true;
    const BATCH_PREPASS: bool = true;
    const READS_SCORES: bool = true;
    type Scalar<R: Real> = ToprShape<R>;

    fn validate(&self) -> Result<()> {
        Topr::validate(self)
    }
    fn scalar<R: Real>(&self) -> ToprShape<R> {
        ToprShape {
            positive: R::from_f64(self.positive_weight),
            negative: R::from_f64(self.negative_weight),
        }
    }
    fn per_token(&self, x: &TokenTensors<'_>) -> Result<PerToken> {
        per_token(self, x)
    }
    fn gpu(&self) -> GpuShape {
        GpuShape::new(&[self.positive_weight as f32, self.negative_weight as f32])
    }
    /// `[S_i > 0]` spread over the row, as flags.
    fn prepass(&self, batch: &Batch<'_>) -> Result<Prepass> {
        let inputs = batch.inputs;
        let scores = inputs.scores.ok_or_else(|| Error::InvalidValue {
            arg: "scores",
            expected: "a [B] tensor (TOPR's branch is the row's reward score)".into(),
            actual: "None".into(),
        })?;
        let dtype = compute_dtype(inputs.log_probs.dtype());
        let scores = scores.detach().to_dtype(dtype)?;
        crate::checks::check_finite("scores", &scores)?;
        let b = scores.dim(0)?;
        let flags = scores
            .gt(0.0)?
            .to_dtype(dtype)?
            .reshape((b, 1))?
            .broadcast_as((b, batch.t))?
            .contiguous()?;
        Ok(Prepass {
            is_weights: None,
            flags: Some(flags),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The scalar form at both branches and the taper's kink.
    #[test]
    fn scalar_form_by_hand() {
        let shape = Topr {
            positive_weight: 1.0,
            negative_weight: 0.5,
        }
        .scalar::<f64>();
        let token = |flag: f64, r: f64| Token {
            lp: -2.0,
            old: -2.0 - r.ln(),
            delta: r.ln(),
            r,
            a: 3.0,
            row: 0.0,
            flag,
        };
        let e = shape.eval(&token(1.0, 1.7));
        assert_eq!((e.value, e.slope, e.direct), (6.0, 0.0, -3.0));
        let e = shape.eval(&token(0.0, 1.7));
        assert_eq!((e.value, e.direct, e.metrics[0]), (3.0, -1.5, 1.0));
        let e = shape.eval(&token(0.0, 0.4));
        assert!((e.direct + 0.5 * 0.4 * 3.0).abs() < 1e-15);
        assert_eq!(e.metrics[0], 0.0);
    }
}
