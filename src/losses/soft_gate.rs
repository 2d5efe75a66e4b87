//! SAPO's soft gate (Qwen, arXiv 2511.20347): `l = −f(ρ)·A` with `f(ρ) = σ(τ(ρ−1))·4/τ`,
//! `τ = τ_pos` if `A > 0` else `τ_neg`. The gate's formula and weight live in [`crate::gate`];
//! this file is the objective. Metrics: the gate weight `4p(1−p)` and the gate value.

use crate::error::Result;
use crate::gate;
use crate::losses::metrics::{GATE_VALUE, GATE_WEIGHT};
use crate::losses::objective::{Eval, GpuShape, Objective, PerToken, Shape, Token, TokenTensors};
use crate::real::Real;

/// [`crate::TrustRegion::SoftGate`]'s temperatures.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct SoftGate {
    pub(crate) tau_pos: f64,
    pub(crate) tau_neg: f64,
}

impl Objective for SoftGate {
    const NAME: &'static str = "soft_gate";
    const ID: i32 = 0;
    const DEVICE: &'static str = include_str!("soft_gate.h");
    type Scalar<R: Real> = Temperatures<R>;

    fn validate(&self) -> Result<()> {
        gate::check_tau("tau_pos", self.tau_pos)?;
        gate::check_tau("tau_neg", self.tau_neg)
    }

    fn scalar<R: Real>(&self) -> Temperatures<R> {
        Temperatures {
            tau_pos: R::from_f64(self.tau_pos),
            tau_neg: R::from_f64(self.tau_neg),
        }
    }

    fn per_token(&self, x: &TokenTensors<'_>) -> Result<PerToken> {
        let (ratio, advantages) = (x.ratio, x.advantages);
        let ones = advantages.ones_like()?;
        let tau = advantages
            .gt(0.0)?
            .where_cond(&(&ones * self.tau_pos)?, &(&ones * self.tau_neg)?)?;
        let value = gate::value_per_element(ratio, &tau)?;
        let weight = gate::weight_per_element(&ratio.detach(), &tau)?;
        Ok(PerToken {
            loss: value.mul(advantages)?.neg()?,
            metrics: vec![(GATE_WEIGHT, weight), (GATE_VALUE, value.detach())],
        })
    }

    fn gpu(&self) -> GpuShape {
        GpuShape::new(&[self.tau_pos as f32, self.tau_neg as f32])
    }
}

// ---------------------------------------------------------------------------------------------
// Scalar form (the kernels').

/// Both temperatures in the compute type.
pub(crate) struct Temperatures<R> {
    pub(crate) tau_pos: R,
    pub(crate) tau_neg: R,
}

impl<R: Real> Shape<R> for Temperatures<R> {
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
