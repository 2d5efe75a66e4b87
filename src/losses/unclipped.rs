//! No trust region: `f(ρ) = ρ`, `l = −ρ·A` (the vanilla importance-weighted policy gradient).

use crate::error::Result;
use crate::losses::objective::{Eval, Objective, PerToken, Shape, Token, TokenTensors};
use crate::real::Real;

/// [`crate::TrustRegion::Unclipped`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Unclipped;

impl Objective for Unclipped {
    const NAME: &'static str = "unclipped";
    const ID: i32 = 2;
    const DEVICE: &'static str = include_str!("unclipped.h");
    type Scalar<R: Real> = Unclipped;

    fn validate(&self) -> Result<()> {
        Ok(())
    }

    fn scalar<R: Real>(&self) -> Unclipped {
        Unclipped
    }

    fn per_token(&self, x: &TokenTensors<'_>) -> Result<PerToken> {
        Ok(PerToken {
            loss: x.ratio.mul(x.advantages)?.neg()?,
            metrics: vec![],
        })
    }
}

impl<R: Real> Shape<R> for Unclipped {
    const SLOTS: &'static [usize] = &[];

    #[inline(always)]
    fn eval(&self, t: &Token<R>) -> Eval<R> {
        Eval::through_ratio(-(t.a * t.r), -t.a, [R::ZERO; 4])
    }
}
