//! GPG / REINFORCE (verl `gpg`; bypass mode's `reinforce`): `l = −A·ℓ`, `∂l/∂ℓ = −A`.

use crate::error::Result;
use crate::losses::objective::{Eval, Objective, PerToken, Shape, Token, TokenTensors};
use crate::real::Real;

/// [`crate::TrustRegion::PolicyGradient`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct PolicyGradient;

impl Objective for PolicyGradient {
    const NAME: &'static str = "policy_gradient";
    const ID: i32 = 3;
    const DEVICE: &'static str = include_str!("policy_gradient.h");
    const TOKEN_ONLY: bool = true;
    type Scalar<R: Real> = PolicyGradient;

    fn validate(&self) -> Result<()> {
        Ok(())
    }

    fn scalar<R: Real>(&self) -> PolicyGradient {
        PolicyGradient
    }

    fn per_token(&self, x: &TokenTensors<'_>) -> Result<PerToken> {
        Ok(PerToken {
            loss: x.log_probs.mul(x.advantages)?.neg()?,
            metrics: vec![],
        })
    }
}

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
