//! The unified surrogate: `loss = agg(−f(ρ)·A·w) + β·agg(k(ℓ, ℓref))`.
//!
//! One core computes every objective: [`RatioLevel`] picks `ρ` (token ratio, sequence ratio or
//! GSPO-token), [`TrustRegion`] picks `f` (soft gate, hard clip, none). [`PolicyLoss::forward`]
//! is the one dispatch point: the fused kernel where one exists for the device
//! (`src/kernels/`), else the composed-candle-ops path below, whose gradient comes from candle's
//! autograd. Both give the same results.

use std::sync::Mutex;

use candle_core::{DType, Tensor, D};

use crate::aggregation::aggregate_masked;
use crate::config::{HardClip, PolicyLossConfig, RatioLevel, TrustRegion};
use crate::error::Result;
use crate::gate;
use crate::inputs::{check_mask_values, compute_dtype, PolicyInputs, Prepared};
use crate::kernels::cpu_policy::FusedPolicyLoss;
use crate::kernels::{from_kernel, Backend};
use crate::kl::kl_penalty;
use crate::metrics::{self, MetricKind, PolicyMetrics, NUM_SLOTS};

/// A validated policy-optimization objective. Build one from a preset ([`crate::Sapo`],
/// [`crate::Gspo`], [`crate::Grpo`]) or a [`PolicyLossConfig`].
///
/// ```
/// use candle_core::{Device, Tensor, Var};
/// let dev = Device::Cpu;
/// let log_probs = Var::new(&[[-1.0f32, -0.5, -2.0], [-0.3, -1.2, -0.7]], &dev)?;
/// let old = Tensor::new(&[[-1.1f32, -0.5, -1.9], [-0.3, -1.0, -0.7]], &dev)?;
/// let adv = Tensor::new(&[0.8f32, -0.4], &dev)?;
/// let mask = Tensor::new(&[[1u8, 1, 1], [1, 1, 0]], &dev)?;
/// let out = sapo::Sapo::default().build()?
///     .forward(&sapo::PolicyInputs::new(log_probs.as_tensor(), &old, &adv, &mask))?;
/// let grads = out.loss.backward()?;
/// assert!(grads.get(log_probs.as_tensor()).is_some());
/// println!("gate weight {:?}", out.metrics.read()?.gate_weight_mean());
/// # Ok::<(), sapo::Error>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PolicyLoss {
    config: PolicyLossConfig,
    backend: Backend,
}

/// What [`PolicyLoss::forward`] returns.
#[derive(Debug, Clone)]
pub struct PolicyLossOutput {
    /// The scalar loss; `backward()` reaches `log_probs`.
    pub loss: Tensor,
    /// Metric sums, still on the device.
    pub metrics: PolicyMetrics,
}

impl PolicyLoss {
    pub(crate) fn from_validated(config: PolicyLossConfig) -> Self {
        Self {
            config,
            backend: Backend::Auto,
        }
    }

    /// Chooses the implementation ([`Backend::Auto`] by default: fused on the CPU).
    pub fn with_backend(mut self, backend: Backend) -> Self {
        self.backend = backend;
        self
    }

    /// The implementation this loss runs.
    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// The configuration this loss was built from.
    pub fn config(&self) -> &PolicyLossConfig {
        &self.config
    }

    /// Computes the loss and its metrics.
    ///
    /// Errors: shapes, dtypes or devices that do not match, a mask with values other than 0/1,
    /// a non-finite value at an unmasked position, a missing (or unexpected) `ref_log_probs`.
    /// Values at masked positions never reach the loss, its gradient or the metrics; a batch with
    /// no unmasked token gives a loss of 0 and a zero gradient.
    pub fn forward(&self, inputs: &PolicyInputs<'_>) -> Result<PolicyLossOutput> {
        if self.backend.is_fused_on(inputs.log_probs.device()) {
            fused(&self.config, inputs)
        } else {
            let prepared = inputs.prepare(self.config.kl.is_some())?;
            composed(&self.config, &prepared)
        }
    }
}

/// `(δ, ρ)`: the token log-ratio and the ratio the trust region sees, both `[B,T]`.
fn ratios(config: &PolicyLossConfig, p: &Prepared) -> Result<(Tensor, Tensor)> {
    let log_ratio = (&p.log_probs - &p.old_log_probs)?;
    let log_ratio = match config.log_ratio_clamp {
        Some(c) => log_ratio.clamp(-c, c)?,
        None => log_ratio,
    };
    let clamp_seq = |log_s: Tensor| -> Result<Tensor> {
        Ok(match config.seq_log_ratio_max {
            Some(m) => log_s.minimum(m)?,
            None => log_s,
        })
    };
    let row_mean = |x: &Tensor| -> Result<Tensor> {
        Ok(x.sum_keepdim(D::Minus1)?
            .div(&p.counts.row_tokens.maximum(1.0)?.unsqueeze(1)?)?
            .broadcast_as(x.shape())?)
    };
    let ratio = match config.ratio_level {
        RatioLevel::Token => log_ratio.exp()?,
        RatioLevel::Sequence => clamp_seq(row_mean(&log_ratio)?)?.exp()?,
        RatioLevel::SequenceToken => {
            let seq = row_mean(&log_ratio.detach())?;
            let straight_through = (&p.log_probs - p.log_probs.detach())?;
            clamp_seq((straight_through + seq)?)?.exp()?
        }
    };
    Ok((log_ratio, ratio))
}

/// The per-token policy loss `−f(ρ)·A` and the metric sums it defines.
struct PerToken {
    loss: Tensor,
    metric_sums: Vec<(usize, Tensor)>,
}

fn masked_sum(x: &Tensor, mask: &Tensor) -> Result<Tensor> {
    Ok(x.to_dtype(mask.dtype())?.mul(mask)?.sum_all()?)
}

fn soft_gate(ratio: &Tensor, p: &Prepared, tau_pos: f64, tau_neg: f64) -> Result<PerToken> {
    let adv = &p.advantages;
    let ones = adv.ones_like()?;
    let tau = adv
        .gt(0.0)?
        .where_cond(&(&ones * tau_pos)?, &(&ones * tau_neg)?)?;
    let value = gate::value_per_element(ratio, &tau)?;
    let loss = value.mul(adv)?.neg()?;
    let weight = gate::weight_per_element(&ratio.detach(), &tau)?;
    Ok(PerToken {
        loss,
        metric_sums: vec![
            (metrics::GATE_WEIGHT, masked_sum(&weight, &p.mask)?),
            (metrics::GATE_VALUE, masked_sum(&value.detach(), &p.mask)?),
        ],
    })
}

fn hard_clip(ratio: &Tensor, p: &Prepared, clip: &HardClip) -> Result<PerToken> {
    let adv = &p.advantages;
    let (low, high) = (1.0 - clip.eps_low, 1.0 + clip.eps_high);
    let unclipped_ratio = match clip.delta {
        Some(delta) => ratio.minimum(delta)?,
        None => ratio.clone(),
    };
    let unclipped = unclipped_ratio.mul(adv)?.neg()?;
    let clipped = ratio.clamp(low, high)?.mul(adv)?.neg()?;
    let pessimistic = unclipped.maximum(&clipped)?;
    let negative = adv.lt(0.0)?;
    let (loss, dual_clipped) = match clip.dual_clip {
        Some(c) => {
            let floor = (adv * -c)?;
            let cut = negative
                .to_dtype(p.mask.dtype())?
                .mul(&pessimistic.gt(&floor)?.to_dtype(p.mask.dtype())?)?;
            let loss = negative.where_cond(&pessimistic.minimum(&floor)?, &pessimistic)?;
            (loss, masked_sum(&cut, &p.mask)?)
        }
        None => (pessimistic, p.counts.tokens.zeros_like()?),
    };
    let r = ratio.detach();
    let dtype = p.mask.dtype();
    let both = |a: Tensor, b: Tensor| -> Result<Tensor> {
        Ok(a.to_dtype(dtype)?.mul(&b.to_dtype(dtype)?)?)
    };
    let clip_low = both(r.lt(low)?, negative)?;
    let clip_high = both(r.gt(high)?, adv.gt(0.0)?)?;
    Ok(PerToken {
        loss,
        metric_sums: vec![
            (
                metrics::CLIPPED,
                masked_sum(&clipped.gt(&unclipped)?, &p.mask)?,
            ),
            (metrics::DUAL_CLIPPED, dual_clipped),
            (metrics::CLIP_LOW, masked_sum(&clip_low, &p.mask)?),
            (metrics::CLIP_HIGH, masked_sum(&clip_high, &p.mask)?),
        ],
    })
}

/// The composed-ops path: every objective through candle ops and autograd, on any device.
fn composed(config: &PolicyLossConfig, p: &Prepared) -> Result<PolicyLossOutput> {
    let (log_ratio, ratio) = ratios(config, p)?;
    let per_token = match &config.trust_region {
        TrustRegion::SoftGate { tau_pos, tau_neg } => soft_gate(&ratio, p, *tau_pos, *tau_neg)?,
        TrustRegion::HardClip(clip) => hard_clip(&ratio, p, clip)?,
        TrustRegion::Unclipped => PerToken {
            loss: ratio.mul(&p.advantages)?.neg()?,
            metric_sums: vec![],
        },
    };
    let mut loss_mat = per_token.loss;
    if let Some(w) = &p.is_weights {
        loss_mat = loss_mat.mul(w)?;
    }
    let masked = loss_mat.mul(&p.mask)?;
    let mut loss = aggregate_masked(&masked, &p.counts, config.aggregation, &p.normalizer)?;

    let mut metric_sums = per_token.metric_sums;
    if let (Some(kl), Some(ref_log_probs)) = (&config.kl, &p.ref_log_probs) {
        let k = kl_penalty(&p.log_probs, ref_log_probs, kl.estimator, kl.clamp)?.mul(&p.mask)?;
        let penalty = aggregate_masked(&k, &p.counts, kl.aggregation, &p.normalizer)?;
        loss = (loss + penalty.affine(kl.coef, 0.0)?)?;
        metric_sums.push((metrics::KL, k.detach().sum_all()?));
    }

    let zero = p.counts.tokens.zeros_like()?;
    let mut sums = vec![zero; metrics::NUM_SLOTS];
    sums[metrics::TOKENS] = p.counts.tokens.clone();
    sums[metrics::NEG_LOG_RATIO] = log_ratio.detach().sum_all()?.neg()?;
    let r = ratio.detach();
    sums[metrics::RATIO] = masked_sum(&r, &p.mask)?;
    for (slot, value) in metric_sums {
        sums[slot] = value;
    }
    let fill = |v: f64| -> Result<Tensor> { Ok((r.ones_like()? * v)?) };
    let (min, max) = if r.elem_count() == 0 {
        let none = |v: f64| p.counts.tokens.ones_like()?.affine(v, 0.0);
        (none(f64::INFINITY)?, none(f64::NEG_INFINITY)?)
    } else {
        (
            p.keep.where_cond(&r, &fill(f64::INFINITY)?)?.min_all()?,
            p.keep
                .where_cond(&r, &fill(f64::NEG_INFINITY)?)?
                .max_all()?,
        )
    };
    Ok(PolicyLossOutput {
        loss,
        metrics: PolicyMetrics::new(
            Tensor::stack(&sums, 0)?,
            Tensor::stack(&[min, max], 0)?,
            metric_kind(config),
        ),
    })
}

fn metric_kind(config: &PolicyLossConfig) -> MetricKind {
    MetricKind {
        clip: matches!(config.trust_region, TrustRegion::HardClip(_)),
        gate: matches!(config.trust_region, TrustRegion::SoftGate { .. }),
        kl: config.kl.is_some(),
    }
}

/// The fused path: one kernel computes the loss, the metric sums and the gradient, reading the
/// inputs in place (f16/bf16 included); values are checked inside the kernel.
fn fused(config: &PolicyLossConfig, inputs: &PolicyInputs<'_>) -> Result<PolicyLossOutput> {
    inputs.check(config.kl.is_some())?;
    // Inputs that share log_probs' dtype are read in place; mixed dtypes are all computed in
    // the compute dtype (f32, or f64), so no input loses precision.
    let floats = [
        Some(inputs.old_log_probs),
        Some(inputs.advantages),
        inputs.ref_log_probs,
        inputs.is_weights,
    ];
    let lp_dtype = inputs.log_probs.dtype();
    let dtype = if floats.iter().flatten().all(|x| x.dtype() == lp_dtype) {
        lp_dtype
    } else {
        compute_dtype(lp_dtype)
    };
    let log_probs = inputs.log_probs.to_dtype(dtype)?.contiguous()?;
    let same = |x: &Tensor| -> Result<Tensor> { Ok(x.to_dtype(dtype)?.contiguous()?) };
    let mask = if inputs.mask.dtype() == DType::U8 || inputs.mask.dtype() == dtype {
        inputs.mask.contiguous()?
    } else {
        // Other mask dtypes: checked in their own dtype (one host read), then read as u8.
        check_mask_values(inputs.mask)?;
        inputs.mask.ne(0.0)?.contiguous()?
    };
    let op = FusedPolicyLoss {
        config: *config,
        old_log_probs: same(inputs.old_log_probs)?,
        advantages: same(inputs.advantages)?,
        mask,
        ref_log_probs: inputs.ref_log_probs.map(same).transpose()?,
        is_weights: inputs.is_weights.map(same).transpose()?,
        normalizer: inputs.normalizer,
        grad: Mutex::new(None),
    };
    let out = log_probs.apply_op1(op).map_err(from_kernel)?;
    Ok(PolicyLossOutput {
        loss: out.narrow(0, 0, 1)?.squeeze(0)?,
        metrics: PolicyMetrics::new(
            out.narrow(0, 1, NUM_SLOTS)?.detach(),
            out.narrow(0, 1 + NUM_SLOTS, 2)?.detach(),
            metric_kind(config),
        ),
    })
}
