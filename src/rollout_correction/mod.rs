//! Rollout correction between the inference engine and the trainer (verl's
//! `rollout_corr_helper.py`): importance weights, rejection filters and their diagnostics.
//! Every formula, with the peer it matches: [the formulas page](crate::formulas).
//!
//! With `d = ℓold − ℓroll` (the log of π_train/π_rollout), `d̃ = clamp(d, ±20)`, `S_i = Σ_t m·d`:
//!
//! ```text
//! weights  token:    raw = exp(d̃)·m          sequence: raw = exp(clamp(S_i, ±20))·m
//!          truncate: w = min(raw, U)          mask (IcePop): w = raw if L ≤ raw ≤ U else 0
//!          batch_normalize: w ← w/μ_w (token: mean over unmasked tokens; sequence: mean of row means)
//! filters  k1 = −d̃, k2 = ½d̃², k3 = e^{d̃} − 1 − d̃ per token; token_kX, seq_sum_kX, seq_mean_kX,
//!          seq_max_k2/3 keep a token (or row) when ln(lower) ≤ stat ≤ ln(upper) (k1) or stat ≤ upper
//! mask'    m·Π keep
//! ```
//!
//! Every metric verl reports is returned under its own name (without verl's `rollout_corr/`
//! prefix); their definitions are in the formulas page and in [`rollout_correction()`]. Nothing
//! here carries gradient. The statistics are computed on the host in f64, once per batch.
//!
//! ```
//! use candle_core::{Device, Tensor};
//! use sapo::rollout_correction::*;
//! let trainer = Tensor::new(&[[-1.0f32, -0.5]], &Device::Cpu)?;
//! let engine = Tensor::new(&[[-1.2f32, -0.5]], &Device::Cpu)?;
//! let mask = Tensor::new(&[[1u8, 1]], &Device::Cpu)?;
//! let rs = RolloutCorrection::new()
//!     .with_rejection(RejectionFilter::new(FilterStatistic::Token, FilterDivergence::K2, None, 0.01));
//! let out = rollout_correction(&trainer, &engine, &mask, &rs)?;
//! assert_eq!(out.mask.to_vec2::<u8>()?, vec![vec![0, 1]]); // ½·0.2² = 0.02 > 0.01
//! # Ok::<(), sapo::Error>(())
//! ```
//!
//! | file | what |
//! |---|---|
//! | `config.rs` | the configuration: [`RolloutCorrection`], [`ImportanceWeights`], [`RejectionFilter`] |
//! | `batch.rs` | the batch on the host and its row statistics |
//! | `weights.rs` | the importance weights and their diagnostics |
//! | `rejection.rs` | the rejection filters and their diagnostics |
//! | `off_policy.rs` | the off-policy diagnostics (KL, perplexities, χ²) |
//!
//! Layer: the configuration is the objectives' (a loss's bypass mode holds one); the rest is the
//! public API.

mod batch;
pub(crate) mod config;
mod off_policy;
mod rejection;
mod weights;

use std::collections::BTreeMap;

use candle_core::{DType, Tensor};

use crate::error::{check_device, check_float, check_shape, Error, Result};
use batch::Batch;
pub use config::*;

/// What [`rollout_correction`] returns.
///
/// ```
/// # use candle_core::{Device, Tensor};
/// # let old = Tensor::new(&[[-1.0f32, -2.0]], &Device::Cpu)?;
/// let out: sapo::RolloutCorrectionOutput =
///     sapo::rollout_correction(&old, &old, &old.ones_like()?, &sapo::RolloutCorrection::new())?;
/// assert_eq!(out.metrics["kl"], 0.0);
/// # Ok::<(), sapo::Error>(())
/// ```
#[derive(Debug, Clone)]
pub struct RolloutCorrectionOutput {
    /// `[B,T]` weights (0 at masked positions), in `old_log_probs`' dtype, when configured.
    pub weights: Option<Tensor>,
    /// `[B,T]`: the input mask with the rejected tokens set to 0, in the mask's dtype.
    pub mask: Tensor,
    /// Every metric verl reports, under its name without the `rollout_corr/` prefix.
    pub metrics: BTreeMap<String, f64>,
}

/// Every diagnostic is finite, or the log-probs that make it overflow f64 are named: the
/// perplexities exponentiate row means of `−ℓ`, `k3_kl` and `ppl_ratio` exponentiate log-ratios,
/// so `|ℓold − ℓrollout|` (or `−ℓ`) beyond about 709 has no finite value.
fn check_metrics_finite(metrics: &BTreeMap<String, f64>) -> Result<()> {
    match metrics.iter().find(|(_, v)| !v.is_finite()) {
        None => Ok(()),
        Some((name, value)) => Err(Error::InvalidValue {
            arg: if name.starts_with("training") {
                "old_log_probs"
            } else {
                "rollout_log_probs"
            },
            expected: "log-probs and log-ratios whose diagnostics are finite in f64 (|log-ratio| \
                       and -log-prob row means below about 709)"
                .into(),
            actual: format!("{name} = {value}"),
        }),
    }
}

/// Computes the rollout correction of a batch: importance weights, the rejection-filtered mask and
/// verl's diagnostics, from the trainer's `old_log_probs`, the engine's `rollout_log_probs` and
/// the `[B,T]` 0/1 `mask`.
///
/// Errors: shapes, dtypes or devices that do not match, a mask with values other than 0/1, a
/// non-finite log-prob at an unmasked position, a mask with no unmasked token, and (mask mode) a
/// batch whose every weight is 0 (verl divides by zero in its effective sample size there).
///
/// ```
/// use candle_core::{Device, Tensor};
/// use sapo::{ImportanceWeights, RolloutCorrection, WeightLevel, WeightMode};
/// let dev = Device::Cpu;
/// let trainer = Tensor::new(&[[-1.0f32, -0.5, -2.0], [-0.3, -1.2, -0.7]], &dev)?;
/// let engine = Tensor::new(&[[-1.1f32, -0.4, -2.0], [-0.3, -1.0, -0.9]], &dev)?;
/// let mask = Tensor::new(&[[1u8, 1, 1], [1, 1, 0]], &dev)?;
/// let tis = RolloutCorrection::new()
///     .with_importance_weights(ImportanceWeights::new(WeightLevel::Token, WeightMode::Truncate { upper: 2.0 }));
/// let out = sapo::rollout_correction(&trainer, &engine, &mask, &tis)?;
/// let w = out.weights.unwrap().to_vec2::<f32>()?;
/// assert!((w[0][0] - 0.1f32.exp()).abs() < 1e-6 && w[1][2] == 0.0);
/// assert!(out.metrics.contains_key("rollout_is_eff_sample_size"));
/// # Ok::<(), sapo::Error>(())
/// ```
pub fn rollout_correction(
    old_log_probs: &Tensor,
    rollout_log_probs: &Tensor,
    mask: &Tensor,
    config: &RolloutCorrection,
) -> Result<RolloutCorrectionOutput> {
    config.validate()?;
    check_float("old_log_probs", old_log_probs)?;
    let (b, t) = crate::error::matrix_dims("old_log_probs", old_log_probs)?;
    let dims = [b, t];
    check_float("rollout_log_probs", rollout_log_probs)?;
    check_shape("rollout_log_probs", rollout_log_probs, &dims)?;
    check_device("rollout_log_probs", rollout_log_probs, old_log_probs)?;
    check_shape("mask", mask, &dims)?;
    check_device("mask", mask, old_log_probs)?;
    let read = |x: &Tensor| -> Result<Vec<f64>> {
        Ok(x.detach()
            .to_dtype(DType::F64)?
            .flatten_all()?
            .to_vec1::<f64>()?)
    };
    let m = read(mask)?;
    crate::checks::check_host_mask_values(&m)?;
    let (old, roll) = (read(old_log_probs)?, read(rollout_log_probs)?);
    for (arg, x) in [("old_log_probs", &old), ("rollout_log_probs", &roll)] {
        let bad = x
            .iter()
            .zip(&m)
            .filter(|(v, &k)| k != 0.0 && !v.is_finite())
            .count();
        if bad > 0 {
            return Err(Error::InvalidValue {
                arg,
                expected: "finite values at unmasked positions".into(),
                actual: format!("{bad} non-finite"),
            });
        }
    }
    if !m.contains(&1.0) {
        return Err(Error::InvalidValue {
            arg: "mask",
            expected: "at least one unmasked token".into(),
            actual: "none".into(),
        });
    }
    // Masked positions hold garbage: they are zeroed before any arithmetic.
    let scrub = |x: &[f64]| -> Vec<f64> {
        x.iter()
            .zip(&m)
            .map(|(v, &k)| if k != 0.0 { *v } else { 0.0 })
            .collect()
    };
    let batch = Batch::new(scrub(&old), scrub(&roll), m, b, t, config.log_ratio_clamp);
    let mut metrics = BTreeMap::new();
    let weights = match &config.importance_weights {
        Some(w) => Some(batch.weights(w, &mut metrics)?),
        None => None,
    };
    let mut keep = vec![1.0; b * t];
    let filters = config.rejection();
    for filter in &filters {
        batch.reject(filter, &mut keep, &mut metrics);
    }
    if !filters.is_empty() {
        let rejected: Vec<f64> = keep.iter().map(|k| 1.0 - k).collect();
        metrics.insert(
            "rollout_rs_masked_fraction".into(),
            batch.masked_mean(&rejected),
        );
        let rows_hit = (0..b)
            .filter(|&i| batch.row(i).any(|j| batch.m[j] != 0.0 && keep[j] <= 0.5))
            .count();
        metrics.insert(
            "rollout_rs_seq_masked_fraction".into(),
            rows_hit as f64 / b as f64,
        );
    }
    batch.off_policy(&mut metrics);
    check_metrics_finite(&metrics)?;
    let device = old_log_probs.device();
    let new_mask: Vec<f64> = batch.m.iter().zip(&keep).map(|(m, k)| m * k).collect();
    Ok(RolloutCorrectionOutput {
        weights: weights
            .map(|w| Tensor::from_vec(w, (b, t), device)?.to_dtype(old_log_probs.dtype()))
            .transpose()?,
        mask: Tensor::from_vec(new_mask, (b, t), device)?.to_dtype(mask.dtype())?,
        metrics,
    })
}
