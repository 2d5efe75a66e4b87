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

use candle_core::{DType, Tensor, WithDType};

use crate::aggregation::{global_count_excess, Aggregation, BatchCount};
use crate::checks::{compute_dtype, with_host, MaskValue};
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
    // On the CPU with only the weights to check: one pass over the host values (the tensor ops
    // below cost more than the fused loss itself at 64×4096).
    if let (true, false, None, None, Some(w)) = (
        mask.device().is_cpu(),
        k3,
        normalizer.global_tokens,
        normalizer.global_sequences,
        inputs.is_weights,
    ) {
        let negative = match w.dtype() {
            DType::F64 => negative_weights::<f64>(w, mask, t)?,
            _ => negative_weights::<f32>(w, mask, t)?,
        };
        return Ok(Some(Tensor::new(
            &[negative as f32, 0.0, 0.0, 0.0],
            mask.device(),
        )?));
    }
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

/// The number of negative weights `w` (`[B,T]`, or `[B,1]` one per row, read as `W`: f64 stays
/// f64, so no negative value rounds to zero) at unmasked positions, from the host values.
fn negative_weights<W: WithDType>(w: &Tensor, mask: &Tensor, t: usize) -> Result<usize> {
    fn count<W: WithDType, M: MaskValue>(w: &[W], mask: &[M], t: usize) -> usize {
        let per_row = w.len() != mask.len();
        mask.iter()
            .enumerate()
            .filter(|&(j, m)| m.on() && w[if per_row { j / t.max(1) } else { j }].to_f64() < 0.0)
            .count()
    }
    with_host::<W, _>(w, |w| match mask.dtype() {
        DType::U8 => with_host::<u8, _>(mask, |m| Ok(count(w, m, t))),
        DType::F64 => with_host::<f64, _>(mask, |m| Ok(count(w, m, t))),
        _ => with_host::<f32, _>(mask, |m| Ok(count(w, m, t))),
    })
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

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;
    use proptest::prelude::*;

    /// The tensor form of the count: `Σ m·[w < 0]` with `w` broadcast over the row.
    fn negative_weights_slow(w: &Tensor, mask: &Tensor) -> usize {
        let w = w.broadcast_as(mask.shape()).unwrap();
        let keep = mask.ne(0.0).unwrap().to_dtype(DType::F32).unwrap();
        let negative = w.lt(0.0).unwrap().to_dtype(DType::F32).unwrap();
        let count = negative.mul(&keep).unwrap().sum_all().unwrap();
        count.to_scalar::<f32>().unwrap() as usize
    }

    proptest! {
        /// The host count equals the tensor count for every weight dtype (f64 weights too small
        /// for f32 stay negative), per-token and per-row weights, u8, f32, bf16 and f64 masks.
        #[test]
        fn host_count_of_negative_weights_equals_the_tensor_count(
            (b, t, signs, bits, per_row, weight_dtype, mask_dtype) in (1usize..5, 1usize..7)
                .prop_flat_map(|(b, t)| (
                    Just(b), Just(t),
                    prop::collection::vec(-2i8..=2, b * t),
                    prop::collection::vec(any::<bool>(), b * t),
                    any::<bool>(), 0usize..3, 0usize..4,
                ))
        ) {
            let dev = Device::Cpu;
            let rows = if per_row { b } else { b * t };
            // Magnitudes include 1e-300: negative in f64, zero once rounded to f32.
            let values: Vec<f64> = signs[..rows]
                .iter()
                .map(|&s| f64::from(s) * if s.abs() == 2 { 1e-300 } else { 0.5 })
                .collect();
            let shape = if per_row { (b, 1) } else { (b, t) };
            let weight_dtype = [DType::F64, DType::F32, DType::BF16][weight_dtype];
            let w = Tensor::from_vec(values, shape, &dev).unwrap().to_dtype(weight_dtype).unwrap();
            let mask_values: Vec<f64> = bits.iter().map(|&k| f64::from(u8::from(k))).collect();
            let mask_dtype = [DType::U8, DType::F32, DType::BF16, DType::F64][mask_dtype];
            let mask = Tensor::from_vec(mask_values, (b, t), &dev)
                .unwrap()
                .to_dtype(mask_dtype)
                .unwrap();
            let fast = match w.dtype() {
                DType::F64 => negative_weights::<f64>(&w, &mask, t).unwrap(),
                _ => negative_weights::<f32>(&w, &mask, t).unwrap(),
            };
            prop_assert_eq!(fast, negative_weights_slow(&w, &mask));
        }
    }
}
