//! KL-Cov (verl `kl_cov`, arXiv 2505.22617): an `|ℓ − ℓold|` penalty on the tokens whose
//! advantage and log-prob covary most.
//!
//! ```text
//! over the N unmasked tokens (row-major), ℓ detached:
//! c_j = (A_j − mean A)·(ℓ_j − mean ℓ);  k = max(1, ⌊N·ratio⌋);  S = the k largest c_j
//! l = −A·ρ + [t ∈ S]·κ·|ℓ − ℓold|          ∂l/∂ℓ = −A·ρ + [t ∈ S]·κ·sign(ℓ − ℓold)   (sign(0) = 0)
//! ```
//!
//! The selection depends on the whole batch the call sees (as verl's, one micro-batch); it is
//! computed once per call on the host ([`selection`]) and is a constant of both paths. Ties in
//! `c` are broken by position (the earlier token first), so the selection is deterministic.

use candle_core::{DType, Tensor};

use crate::error::{check_config, Result};
use crate::losses::metrics::ABS_LOG_RATIO;
use crate::losses::trust_region::{Eval, PerToken, Shape, Token, TokenTensors};
use crate::piecewise::{self, abs_scalar};
use crate::real::Real;

/// KL-Cov's selected fraction and penalty coefficient.
///
/// ```
/// let kl_cov = sapo::KlCov { ratio: 2e-4, coef: 1.0 };
/// assert!(kl_cov.validate().is_ok());
/// assert!(sapo::KlCov { ratio: 0.0, coef: 1.0 }.validate().is_err());
/// ```
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct KlCov {
    /// The fraction of unmasked tokens penalised, in `(0, 1]` (verl `kl_cov_ratio`, default 2e-4).
    pub ratio: f64,
    /// `κ` ≥ 0 (verl `ppo_kl_coef`; its config default 0.1, the function's fallback 1).
    pub coef: f64,
}

impl KlCov {
    /// Checks `0 < ratio ≤ 1` and `κ ≥ 0`, both finite.
    ///
    /// ```
    /// assert!(sapo::KlCov { ratio: 0.1, coef: -1.0 }.validate().is_err());
    /// ```
    pub fn validate(&self) -> Result<()> {
        check_config(
            self.ratio.is_finite() && self.ratio > 0.0 && self.ratio <= 1.0,
            "kl_cov_ratio",
            "finite, in (0, 1]",
            self.ratio,
        )?;
        check_config(
            self.coef.is_finite() && self.coef >= 0.0,
            "kl_cov_coef",
            "finite and >= 0",
            self.coef,
        )
    }
    pub(crate) fn shape<R: Real>(&self) -> KlCovShape<R> {
        KlCovShape {
            coef: R::from_f64(self.coef),
        }
    }
}

/// The selected tokens `S` as a `[B,T]` 0/1 tensor of `dtype` on `log_probs`' device.
///
/// Reads `log_probs` (detached), the `[B,T]` advantages and the mask on the host.
pub(crate) fn selection(
    kl_cov: &KlCov,
    log_probs: &Tensor,
    advantages: &Tensor,
    mask: &Tensor,
    dtype: DType,
) -> Result<Tensor> {
    let shape = log_probs.dims().to_vec();
    let read = |x: &Tensor| -> Result<Vec<f64>> {
        Ok(x.detach()
            .to_dtype(DType::F64)?
            .flatten_all()?
            .to_vec1::<f64>()?)
    };
    let advantages = advantages.broadcast_as(shape.as_slice())?;
    let (lp, adv, keep) = (read(log_probs)?, read(&advantages)?, read(&mask.ne(0.0)?)?);
    let tokens: Vec<usize> = (0..lp.len()).filter(|&j| keep[j] != 0.0).collect();
    let mut selected = vec![0f64; lp.len()];
    if !tokens.is_empty() {
        let n = tokens.len() as f64;
        let mean = |v: &[f64]| tokens.iter().map(|&j| v[j]).sum::<f64>() / n;
        let (mean_adv, mean_lp) = (mean(&adv), mean(&lp));
        let cov = |j: usize| (adv[j] - mean_adv) * (lp[j] - mean_lp);
        let k = ((n * kl_cov.ratio).floor() as usize).max(1);
        let mut order = tokens;
        // Largest first; equal covariances in token order (a stable sort).
        order.sort_by(|&i, &j| cov(j).total_cmp(&cov(i)));
        for &j in &order[..k] {
            selected[j] = 1.0;
        }
    }
    Ok(Tensor::from_vec(selected, shape, log_probs.device())?.to_dtype(dtype)?)
}

// ---------------------------------------------------------------------------------------------
// Scalar form (the kernels').

pub(crate) struct KlCovShape<R> {
    coef: R,
}

impl<R: Real> Shape<R> for KlCovShape<R> {
    const SLOTS: &'static [usize] = &[ABS_LOG_RATIO];

    #[inline(always)]
    fn eval(&self, t: &Token<R>) -> Eval<R> {
        let (abs, sign) = abs_scalar(t.lp - t.old);
        let penalty = t.flag * self.coef;
        Eval {
            value: -(t.a * t.r) + penalty * abs,
            slope: -t.a,
            direct: penalty * sign,
            metrics: [abs, R::ZERO, R::ZERO, R::ZERO],
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Tensor form (the composed path's).

pub(crate) fn per_token(kl_cov: &KlCov, x: &TokenTensors<'_>) -> Result<PerToken> {
    let abs = piecewise::abs(&(x.log_probs - x.old_log_probs)?)?;
    let mut loss = x.ratio.mul(x.advantages)?.neg()?;
    if let Some(flags) = x.flags {
        loss = (loss + abs.mul(flags)?.affine(kl_cov.coef, 0.0)?)?;
    }
    Ok(PerToken {
        loss,
        metrics: vec![(ABS_LOG_RATIO, abs.detach())],
    })
}
