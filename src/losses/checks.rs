//! The policy loss's value checks that need the data and are made with tensor ops, the same on
//! every path (composed, fused CPU, GPU kernels), beside the per-input finiteness checks each path
//! makes while it reads its inputs.
//!
//! | check | rule |
//! |---|---|
//! | `is_weights` | `w ≥ 0` at unmasked positions (a negative weight flips the token's sign) |
//! | `ref_log_probs` | unclamped k3 (and k3+): `ℓref − ℓ ≤ ln(max)` of the compute dtype (88.72 in f32, 709.78 in f64) at unmasked positions, so that `e^{ℓref−ℓ}` is finite |
//! | `normalizer.global_tokens` | at least this batch's unmasked tokens |
//! | `normalizer.global_sequences` | at least this batch's non-empty rows (all its rows when an aggregation is `seq-mean`) |
//! | `loss` | the loss is finite (what no input rule above foresaw: sums that overflow the dtype) |
//!
//! Off the GPU the counts are read at once (one host read) and the first violation is the
//! error. The GPU kernels read nothing back: their counts join the kernels' own and surface in
//! [`crate::PolicyMetrics::check`].

use candle_core::{DType, Tensor};

use crate::aggregation::{global_count_excess, Aggregation, BatchCount};
use crate::checks::compute_dtype;
use crate::error::{Result, ValueCheck};
use crate::kl::KlEstimator;
use crate::losses::config::PolicyLossConfig;
use crate::losses::inputs::PolicyInputs;

/// The checks made before the loss (`[PRE_CHECKS]` counts); the loss's comes after them.
pub(crate) const PRE_CHECKS: usize = 4;

/// Whether the config's KL penalty exponentiates `ℓref − ℓ` without verl's clamps.
fn unclamped_k3(config: &PolicyLossConfig) -> bool {
    config
        .kl
        .is_some_and(|k| !k.clamp && matches!(k.estimator, KlEstimator::K3 | KlEstimator::K3Plus))
}

/// The aggregations a config applies (the policy term's, the KL's, the entropy bonus's).
pub(crate) fn aggregations(config: &PolicyLossConfig) -> Vec<Aggregation> {
    let mut all = vec![config.aggregation];
    all.extend(config.kl.map(|k| k.aggregation));
    all.extend(config.entropy.map(|e| e.aggregation));
    all
}

/// Checks that `W > 1` comes with every global count the config's aggregations divide by
/// (without it each shard is divided by its own count and multiplied by `W`: `W` times the
/// loss).
pub(crate) fn check_normalizer(
    config: &PolicyLossConfig,
    inputs_normalizer: &crate::aggregation::Normalizer,
) -> Result<()> {
    for aggregation in aggregations(config) {
        inputs_normalizer.validate_for(aggregation)?;
    }
    Ok(())
}

/// The `[PRE_CHECKS]` counts of `inputs` (rows of `t` tokens), or `None` when no check applies.
/// `log_probs` is `ℓ` where it exists before the loss (not on the fused lm_head path).
pub(crate) fn pre_checks<L>(
    config: &PolicyLossConfig,
    inputs: &PolicyInputs<'_, L>,
    log_probs: Option<&Tensor>,
    t: usize,
) -> Result<Option<Tensor>> {
    let normalizer = &inputs.normalizer;
    let k3 = unclamped_k3(config) && log_probs.is_some();
    if inputs.is_weights.is_none()
        && !k3
        && normalizer.global_tokens.is_none()
        && normalizer.global_sequences.is_none()
    {
        return Ok(None);
    }
    let mask = inputs.mask;
    let keep = mask.ne(0.0)?.to_dtype(DType::F32)?;
    let zero = || -> Result<Tensor> { Ok(Tensor::zeros((), DType::F32, mask.device())?) };
    let masked_count = |flags: Tensor| -> Result<Tensor> {
        Ok(flags.to_dtype(DType::F32)?.mul(&keep)?.sum_all()?)
    };
    let negative = match inputs.is_weights(t)? {
        Some(w) => masked_count(w.lt(0.0)?)?,
        None => zero()?,
    };
    let above = match (k3, log_probs, inputs.ref_log_probs) {
        (true, Some(lp), Some(reference)) => {
            let dtype = compute_dtype(lp.dtype());
            let d = (reference.detach().to_dtype(dtype)? - lp.detach().to_dtype(dtype)?)?;
            masked_count(d.gt(crate::real::ln_max(dtype))?)?
        }
        _ => zero()?,
    };
    let every_row = aggregations(config)
        .into_iter()
        .any(|a| a.batch_count() == BatchCount::Rows);
    let excess = global_count_excess(&keep, every_row, normalizer)?;
    let counts = [negative, above, excess.get(0)?, excess.get(1)?];
    Ok(Some(Tensor::stack(&counts, 0)?))
}

/// Off the GPU: reads the pre-checks' counts and returns the first violation.
pub(crate) fn check_now(pre: Option<&Tensor>) -> Result<()> {
    match pre {
        Some(counts) => {
            crate::error::first_violation(&counts.to_dtype(DType::F64)?.to_vec1::<f64>()?, 0)
        }
        None => Ok(()),
    }
}

/// Off the GPU: errors when the loss is not finite (one scalar read).
pub(crate) fn check_loss_now(loss: &Tensor) -> Result<()> {
    let value = loss.to_dtype(DType::F64)?.to_scalar::<f64>()?;
    if value.is_finite() {
        Ok(())
    } else {
        Err(ValueCheck::Loss.error(1.0))
    }
}

/// On the GPU: every count of this module as a `[PRE_CHECKS + 1]` tensor on the device (the
/// pre-checks', zeros where none applied, then the loss's), to be read with the kernels' own.
pub(crate) fn deferred(pre: Option<Tensor>, loss: &Tensor) -> Result<Tensor> {
    let device = loss.device();
    let pre = match pre {
        Some(p) => p,
        None => Tensor::zeros(PRE_CHECKS, DType::F32, device)?,
    };
    let finite = loss.abs()?.lt(f64::INFINITY)?.to_dtype(DType::F32)?;
    let not_finite = (1.0 - finite)?.reshape(1)?;
    Ok(Tensor::cat(&[pre, not_finite], 0)?)
}
