//! VESPO (TRL/Liger `loss_type="vespo"`): a gamma-shaped, detached sequence weight times the
//! log-prob.
//!
//! ```text
//! u_i = Σ_t m·δ + Σ_t m·clamp(ln w, ln 1e-8, 20)       (δ = clamp(ℓ − ℓold, ±20); second sum with is_weights)
//! v_i = clamp(u_i, log_w_min, log_w_max)
//! (k, λ) = (k_pos, λ_pos) if A ≥ 0 else (k_neg, λ_neg);   λ ← max(λ, 1e-4)
//! φ = exp(λ + k·v − λ·e^v)   (φ(v = 0) = 1; a non-finite φ is 0)
//! l = −sg[φ]·A·ℓ                                        ∂l/∂ℓ = −φ·A
//! ```
//!
//! The rollout weights `w` enter only through `φ` (they do not multiply `l`). As in TRL and Liger,
//! the log-weights are summed over the weight tensor's own last axis: every unmasked token of a
//! `[B,T]` tensor, the one value of a `[B,1]` tensor ([`spread_row_weights`] turns the latter
//! into an equivalent `[B,T]` one).

use candle_core::{Tensor, D};

use crate::error::{check_config, Result};
use crate::losses::objective::{
    Batch, Eval, GpuShape, Objective, PerToken, Prepass, Shape, Token, TokenTensors,
};
use crate::piecewise;
use crate::real::Real;

/// `ln 1e-8`: VESPO's lower clamp of the log-weights (TRL's).
///
/// ```
/// assert_eq!(sapo::Vespo::default().log_w_min, sapo::losses::VESPO_LOG_W_MIN);
/// assert!((sapo::losses::VESPO_LOG_W_MIN - 1e-8f64.ln()).abs() < 1e-12);
/// ```
pub const VESPO_LOG_W_MIN: f64 = -18.420_680_743_952_367;
/// VESPO's upper clamp of the log-weights (TRL's).
///
/// ```
/// assert_eq!(sapo::Vespo::default().log_w_max, sapo::losses::VESPO_LOG_W_MAX);
/// ```
pub const VESPO_LOG_W_MAX: f64 = 20.0;
/// `λ ← max(λ, 1e-4)`.
const LAMBDA_FLOOR: f64 = 1e-4;

/// VESPO's gamma shapes and rates, and its clamp of the sequence log-weight.
///
/// ```
/// let v = sapo::Vespo::default(); // TRL's (k, λ): (2, 3) for A ≥ 0, (3, 2) for A < 0
/// assert_eq!((v.k_pos, v.lambda_pos, v.k_neg, v.lambda_neg), (2.0, 3.0, 3.0, 2.0));
/// assert!(v.validate().is_ok());
/// ```
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Vespo {
    /// Shape `k` for `A ≥ 0` (finite, ≥ 0).
    pub k_pos: f64,
    /// Rate `λ` for `A ≥ 0` (finite, ≥ 0; floored at 1e-4).
    pub lambda_pos: f64,
    /// Shape `k` for `A < 0`.
    pub k_neg: f64,
    /// Rate `λ` for `A < 0`.
    pub lambda_neg: f64,
    /// Lower clamp of the sequence log-weight (`ln 1e-8`).
    pub log_w_min: f64,
    /// Upper clamp of the sequence log-weight (20).
    pub log_w_max: f64,
}

impl Default for Vespo {
    fn default() -> Self {
        Self {
            k_pos: 2.0,
            lambda_pos: 3.0,
            k_neg: 3.0,
            lambda_neg: 2.0,
            log_w_min: VESPO_LOG_W_MIN,
            log_w_max: VESPO_LOG_W_MAX,
        }
    }
}

impl Vespo {
    /// Checks every parameter finite, `k, λ ≥ 0`, `log_w_min < log_w_max`.
    ///
    /// ```
    /// assert!(sapo::Vespo { k_pos: -1.0, ..Default::default() }.validate().is_err());
    /// ```
    pub fn validate(&self) -> Result<()> {
        for (name, v) in [
            ("k_pos", self.k_pos),
            ("lambda_pos", self.lambda_pos),
            ("k_neg", self.k_neg),
            ("lambda_neg", self.lambda_neg),
        ] {
            check_config(v.is_finite() && v >= 0.0, name, "finite and >= 0", v)?;
        }
        check_config(
            self.log_w_min.is_finite(),
            "log_w_min",
            "finite",
            self.log_w_min,
        )?;
        check_config(
            self.log_w_max.is_finite() && self.log_w_max > self.log_w_min,
            "log_w_max",
            "finite and > log_w_min",
            self.log_w_max,
        )
    }
    pub(crate) fn shape<R: Real>(&self) -> VespoShape<R> {
        VespoShape {
            k_pos: R::from_f64(self.k_pos),
            lambda_pos: R::from_f64(self.lambda_pos.max(LAMBDA_FLOOR)),
            k_neg: R::from_f64(self.k_neg),
            lambda_neg: R::from_f64(self.lambda_neg.max(LAMBDA_FLOOR)),
            min: R::from_f64(self.log_w_min),
            max: R::from_f64(self.log_w_max),
        }
    }
}

/// A `[B,1]` weight tensor as the `[B,T]` one whose row sum of clamped log-weights is the row's
/// single `clamp(ln w_i)`: `exp(clamp(ln w_i)/n_i)` on each of the row's `n_i` unmasked tokens.
/// `mask` is a 0/1 float tensor of `w`'s dtype.
pub(crate) fn spread_row_weights(w: &Tensor, mask: &Tensor) -> Result<Tensor> {
    let log_w = piecewise::clamp(&w.log()?, Some(VESPO_LOG_W_MIN), Some(VESPO_LOG_W_MAX))?;
    let n = mask.sum_keepdim(D::Minus1)?.maximum(1.0)?;
    Ok(log_w
        .div(&n)?
        .exp()?
        .broadcast_as(mask.shape())?
        .contiguous()?)
}

// ---------------------------------------------------------------------------------------------
// Scalar form (the kernels').

pub(crate) struct VespoShape<R> {
    pub(crate) k_pos: R,
    pub(crate) lambda_pos: R,
    pub(crate) k_neg: R,
    pub(crate) lambda_neg: R,
    pub(crate) min: R,
    pub(crate) max: R,
}

impl<R: Real> VespoShape<R> {
    /// `φ` at row statistic `u` and advantage `a`.
    #[inline(always)]
    fn weight(&self, u: R, a: R) -> R {
        let v = piecewise::clamp_scalar(u, self.min, self.max).0;
        let positive = a >= R::ZERO;
        let k = R::select(positive, self.k_pos, self.k_neg);
        let lambda = R::select(positive, self.lambda_pos, self.lambda_neg);
        let arg = lambda + k * v - lambda * v.exp();
        R::select(arg < R::MAX_EXP_ARG, arg.exp(), R::ZERO)
    }
}

/// `clamp(ln w, ln 1e-8, 20)` (`ln 0` → `ln 1e-8`).
#[inline(always)]
fn log_weight<R: Real>(w: R) -> R {
    piecewise::clamp_scalar(
        w.ln(),
        R::from_f64(VESPO_LOG_W_MIN),
        R::from_f64(VESPO_LOG_W_MAX),
    )
    .0
}

impl<R: Real> Shape<R> for VespoShape<R> {
    const SLOTS: &'static [usize] = &[];
    const WEIGHTS_MULTIPLY: bool = false;
    const ROW_STATISTIC: bool = true;

    #[inline(always)]
    fn row_term(&self, delta: R, w: R) -> R {
        delta + log_weight(w)
    }

    #[inline(always)]
    fn eval(&self, t: &Token<R>) -> Eval<R> {
        let phi = self.weight(t.row, t.a);
        Eval {
            value: -(phi * t.a * t.lp),
            slope: R::ZERO,
            direct: -(phi * t.a),
            metrics: [R::ZERO; 4],
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Tensor form (the composed path's).

/// `u_i`, `[B,1]` (detached): `Σ_t m·(δ + clamp(ln w))`.
fn row_statistic(x: &TokenTensors<'_>) -> Result<Tensor> {
    let mut terms = x.log_ratio.detach();
    if let Some(w) = x.is_weights {
        let log_w = piecewise::clamp(&w.log()?, Some(VESPO_LOG_W_MIN), Some(VESPO_LOG_W_MAX))?;
        terms = (terms + log_w)?;
    }
    Ok(terms.mul(x.mask)?.sum_keepdim(D::Minus1)?)
}

pub(crate) fn per_token(vespo: &Vespo, x: &TokenTensors<'_>) -> Result<PerToken> {
    let v = piecewise::clamp(
        &row_statistic(x)?,
        Some(vespo.log_w_min),
        Some(vespo.log_w_max),
    )?
    .broadcast_as(x.advantages.shape())?;
    let positive = x.advantages.ge(0.0)?;
    let ones = x.advantages.ones_like()?;
    let pick = |p: f64, n: f64| positive.where_cond(&(&ones * p)?, &(&ones * n)?);
    let k = pick(vespo.k_pos, vespo.k_neg)?;
    let lambda = pick(
        vespo.lambda_pos.max(LAMBDA_FLOOR),
        vespo.lambda_neg.max(LAMBDA_FLOOR),
    )?;
    let arg = ((&lambda + k.mul(&v)?)? - lambda.mul(&v.exp()?)?)?;
    let max_arg = crate::real::max_exp_arg(arg.dtype());
    let phi = arg
        .lt(max_arg)?
        .where_cond(&arg.minimum(max_arg)?.exp()?, &arg.zeros_like()?)?;
    Ok(PerToken {
        loss: phi.mul(x.advantages)?.mul(x.log_probs)?.neg()?,
        metrics: vec![],
    })
}

impl Objective for Vespo {
    const NAME: &'static str = "vespo";
    const ID: i32 = 8;
    const DEVICE: &'static str = include_str!("vespo.h");
    const TOKEN_ONLY: bool = true;
    const BATCH_PREPASS: bool = true;
    type Scalar<R: Real> = VespoShape<R>;

    fn validate(&self) -> Result<()> {
        Vespo::validate(self)
    }
    fn scalar<R: Real>(&self) -> VespoShape<R> {
        self.shape()
    }
    fn per_token(&self, x: &TokenTensors<'_>) -> Result<PerToken> {
        per_token(self, x)
    }
    fn gpu(&self) -> GpuShape {
        let b = self.shape::<f32>();
        GpuShape::new(&[
            b.k_pos,
            b.lambda_pos,
            b.k_neg,
            b.lambda_neg,
            b.min,
            b.max,
            VESPO_LOG_W_MIN as f32,
            VESPO_LOG_W_MAX as f32,
        ])
    }
    /// Per-sequence weights `[B,1]` spread over their rows (`[B,T]` weights stay as they are).
    fn prepass(&self, batch: &Batch<'_>) -> Result<Prepass> {
        let is_weights = match batch.inputs.is_weights {
            Some(w) if w.dims() == [w.dim(0)?, 1] && batch.t != 1 => {
                let mask = (batch.mask_as)(w.dtype())?;
                Some(spread_row_weights(&w.detach(), &mask)?)
            }
            _ => None,
        };
        Ok(Prepass {
            is_weights,
            flags: None,
        })
    }
}
