//! SAPO's soft trust region with another gate of its family ([`GateFunction`]: erf, arctan,
//! softsign; arXiv 2602.19345): `l = −f(ρ)·A`, `τ = τ_pos` if `A > 0` else `τ_neg`, the gates'
//! formulas in [`crate::gate`]. [`crate::TrustRegion::SoftGate`] dispatches here for every gate
//! but the sigmoid, whose objective (`soft_gate.rs`) keeps its branch-free, vectorized scalar
//! form. Metrics: the gate weight `f'(ρ)` and the gate value `f(ρ)`.

use crate::error::Result;
use crate::gate::{self, GateFunction};
use crate::losses::metrics::{GATE_VALUE, GATE_WEIGHT};
use crate::losses::objective::{Eval, GpuShape, Objective, PerToken, Shape, Token, TokenTensors};
use crate::real::Real;

/// [`crate::TrustRegion::SoftGate`]'s temperatures.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct GateFamily {
    pub(crate) tau_pos: f64,
    pub(crate) tau_neg: f64,
    pub(crate) gate: GateFunction,
}

impl Objective for GateFamily {
    const NAME: &'static str = "gate_family";
    const ID: i32 = 12;
    const DEVICE: &'static str = include_str!("gate_family.h");
    type Scalar<R: Real> = FamilyTemperatures<R>;

    fn validate(&self) -> Result<()> {
        gate::check_tau("tau_pos", self.tau_pos)?;
        gate::check_tau("tau_neg", self.tau_neg)
    }

    fn scalar<R: Real>(&self) -> FamilyTemperatures<R> {
        FamilyTemperatures {
            tau_pos: R::from_f64(self.tau_pos),
            tau_neg: R::from_f64(self.tau_neg),
            gate: self.gate,
        }
    }

    fn per_token(&self, x: &TokenTensors<'_>) -> Result<PerToken> {
        let (ratio, advantages) = (x.ratio, x.advantages);
        let ones = advantages.ones_like()?;
        let tau = advantages
            .gt(0.0)?
            .where_cond(&(&ones * self.tau_pos)?, &(&ones * self.tau_neg)?)?;
        let value = gate::gate_value_per_element(self.gate, ratio, &tau)?;
        let weight = gate::gate_weight_per_element(self.gate, &ratio.detach(), &tau)?;
        Ok(PerToken {
            loss: value.mul(advantages)?.neg()?,
            metrics: vec![(GATE_WEIGHT, weight), (GATE_VALUE, value.detach())],
        })
    }

    fn gpu(&self) -> GpuShape {
        GpuShape {
            flag: self.gate.id(),
            ..GpuShape::new(&[self.tau_pos as f32, self.tau_neg as f32])
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Scalar form (the kernels').

/// Both temperatures in the compute type.
pub(crate) struct FamilyTemperatures<R> {
    pub(crate) tau_pos: R,
    pub(crate) tau_neg: R,
    pub(crate) gate: GateFunction,
}

impl<R: Real> Shape<R> for FamilyTemperatures<R> {
    const SLOTS: &'static [usize] = &[GATE_WEIGHT, GATE_VALUE];

    #[inline(always)]
    fn eval(&self, t: &Token<R>) -> Eval<R> {
        let a = t.a;
        let tau = R::select(a > R::ZERO, self.tau_pos, self.tau_neg);
        let (value, weight) = self.gate.value_and_weight(t.r, tau);
        Eval::through_ratio(
            -(value * a),
            -(a * weight),
            [weight, value, R::ZERO, R::ZERO],
        )
    }
}
