//! DRO (verl `dro`, Kimi-1.5's quadratic log-ratio penalty): a policy gradient on `ℓ` with a
//! squared penalty on the log-ratio, no clamp.
//!
//! ```text
//! l = −(A·ℓ − ½·β·(ℓ − ℓold)²)          ∂l/∂ℓ = −(A − β·(ℓ − ℓold))
//! ```

use crate::error::{check_config, Result};
use crate::losses::objective::{Eval, GpuShape, Objective, PerToken, Shape, Token, TokenTensors};
use crate::real::Real;

/// DRO's penalty coefficient `β > 0` (verl `policy_loss.dro_beta`).
///
/// ```
/// assert!(sapo::Dro { beta: 0.1 }.validate().is_ok());
/// assert!(sapo::Dro { beta: 0.0 }.validate().is_err());
/// ```
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Dro {
    /// `β`, finite and > 0.
    pub beta: f64,
}

impl Dro {
    /// Checks `β` finite and > 0.
    ///
    /// ```
    /// assert!(sapo::Dro { beta: f64::NAN }.validate().is_err());
    /// ```
    pub fn validate(&self) -> Result<()> {
        check_config(
            self.beta.is_finite() && self.beta > 0.0,
            "dro_beta",
            "finite and > 0",
            self.beta,
        )
    }
    pub(crate) fn shape<R: Real>(&self) -> DroShape<R> {
        DroShape {
            beta: R::from_f64(self.beta),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Scalar form (the kernels').

pub(crate) struct DroShape<R> {
    pub(crate) beta: R,
}

impl<R: Real> Shape<R> for DroShape<R> {
    const SLOTS: &'static [usize] = &[];

    #[inline(always)]
    fn eval(&self, t: &Token<R>) -> Eval<R> {
        let d = t.lp - t.old;
        let half = R::from_f64(0.5);
        Eval {
            value: -(t.a * t.lp - half * self.beta * d * d),
            slope: R::ZERO,
            direct: -(t.a - self.beta * d),
            metrics: [R::ZERO; 4],
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Tensor form (the composed path's).

pub(crate) fn per_token(dro: &Dro, x: &TokenTensors<'_>) -> Result<PerToken> {
    let d = (x.log_probs - x.old_log_probs)?;
    let penalty = d.sqr()?.affine(0.5 * dro.beta, 0.0)?;
    Ok(PerToken {
        loss: (x.advantages.mul(x.log_probs)? - penalty)?.neg()?,
        metrics: vec![],
    })
}

impl Objective for Dro {
    const NAME: &'static str = "dro";
    const ID: i32 = 5;
    const DEVICE: &'static str = include_str!("dro.h");
    const TOKEN_ONLY: bool = true;
    type Scalar<R: Real> = DroShape<R>;

    fn validate(&self) -> Result<()> {
        Dro::validate(self)
    }
    fn scalar<R: Real>(&self) -> DroShape<R> {
        self.shape()
    }
    fn per_token(&self, x: &TokenTensors<'_>) -> Result<PerToken> {
        per_token(self, x)
    }
    fn gpu(&self) -> GpuShape {
        GpuShape::new(&[self.shape::<f32>().beta])
    }
}
