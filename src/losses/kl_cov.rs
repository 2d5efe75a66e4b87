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

use std::cmp::Ordering;
use std::collections::BinaryHeap;

use candle_core::{DType, Tensor};

use crate::checks::compute_dtype;
use crate::error::{check_config, Result};
use crate::losses::metrics::ABS_LOG_RATIO;
use crate::losses::objective::{
    Batch, Eval, GpuShape, Objective, PerToken, Prepass, Shape, Token, TokenTensors,
};
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

/// A token ranked by covariance; the greatest is the worst (smallest covariance, then latest).
struct Ranked {
    cov: f64,
    token: usize,
}

impl Ord for Ranked {
    fn cmp(&self, other: &Self) -> Ordering {
        other
            .cov
            .total_cmp(&self.cov)
            .then(self.token.cmp(&other.token))
    }
}

impl PartialOrd for Ranked {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl PartialEq for Ranked {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}

impl Eq for Ranked {}

/// A tensor's values on the host as f64, row-major (one copy, no candle conversion pass for
/// the common dtypes).
fn host(x: &Tensor) -> Result<Vec<f64>> {
    let x = x.detach().flatten_all()?;
    Ok(match x.dtype() {
        DType::F64 => x.to_vec1::<f64>()?,
        DType::F32 => x.to_vec1::<f32>()?.into_iter().map(f64::from).collect(),
        DType::U8 => x.to_vec1::<u8>()?.into_iter().map(f64::from).collect(),
        _ => x
            .to_dtype(DType::F32)?
            .to_vec1::<f32>()?
            .into_iter()
            .map(f64::from)
            .collect(),
    })
}

/// The selected tokens `S` as a `[B,T]` 0/1 tensor of `dtype` on `log_probs`' device.
///
/// Reads `log_probs` (detached), the advantages (`[B]`, `[B,1]` or `[B,T]`) and the mask on the
/// host; a non-zero mask value counts as unmasked (the loss checks the mask itself).
pub(crate) fn selection(
    kl_cov: &KlCov,
    log_probs: &Tensor,
    advantages: &Tensor,
    mask: &Tensor,
    dtype: DType,
) -> Result<Tensor> {
    let shape = log_probs.dims().to_vec();
    let (b, t) = (shape[0], shape[1]);
    let per_token = advantages.elem_count() == log_probs.elem_count();
    let (lp, adv, keep) = (host(log_probs)?, host(advantages)?, host(mask)?);
    let advantage = |j: usize| adv[if per_token { j } else { j / t.max(1) }];
    let unmasked = || (0..b * t).filter(|&j| keep[j] != 0.0);
    let mut selected = vec![0f64; lp.len()];
    let n = unmasked().count();
    if n > 0 {
        let mean_adv = unmasked().map(advantage).sum::<f64>() / n as f64;
        let mean_lp = unmasked().map(|j| lp[j]).sum::<f64>() / n as f64;
        let k = ((n as f64 * kl_cov.ratio).floor() as usize).clamp(1, n);
        // The k best under a total order (largest covariance first, equal ones in token order),
        // kept in a heap whose top is the worst of them: one set whatever the traversal.
        let mut best = BinaryHeap::with_capacity(k + 1);
        for j in unmasked() {
            // `+ 0.0` makes −0 and +0 one value (they tie, as in PyTorch).
            let cov = (advantage(j) - mean_adv) * (lp[j] - mean_lp) + 0.0;
            let candidate = Ranked { cov, token: j };
            if best.len() < k {
                best.push(candidate);
            } else if best.peek().is_some_and(|worst| candidate < *worst) {
                best.pop();
                best.push(candidate);
            }
        }
        for r in best {
            selected[r.token] = 1.0;
        }
    }
    Ok(Tensor::from_vec(selected, shape, log_probs.device())?.to_dtype(dtype)?)
}

// ---------------------------------------------------------------------------------------------
// Scalar form (the kernels').

pub(crate) struct KlCovShape<R> {
    pub(crate) coef: R,
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

impl Objective for KlCov {
    const NAME: &'static str = "kl_cov";
    const ID: i32 = 6;
    const DEVICE: &'static str = include_str!("kl_cov.h");
    const TOKEN_ONLY: bool = true;
    const BATCH_PREPASS: bool = true;
    type Scalar<R: Real> = KlCovShape<R>;

    fn validate(&self) -> Result<()> {
        KlCov::validate(self)
    }
    fn scalar<R: Real>(&self) -> KlCovShape<R> {
        self.shape()
    }
    fn per_token(&self, x: &TokenTensors<'_>) -> Result<PerToken> {
        per_token(self, x)
    }
    fn gpu(&self) -> GpuShape {
        GpuShape::new(&[self.shape::<f32>().coef])
    }
    /// The selected tokens, as flags.
    fn prepass(&self, batch: &Batch<'_>) -> Result<Prepass> {
        let inputs = batch.inputs;
        let advantages = inputs.advantages(batch.t)?;
        let dtype = compute_dtype(inputs.log_probs.dtype());
        Ok(Prepass {
            is_weights: None,
            flags: Some(selection(
                self,
                inputs.log_probs,
                &advantages,
                inputs.mask,
                dtype,
            )?),
        })
    }
}
