//! The unified surrogate: `loss = agg(−f(ρ)·A·w) + β·agg(k(ℓ, ℓref))`.
//!
//! One core computes every objective: [`RatioLevel`](crate::RatioLevel) picks `ρ` (token ratio,
//! sequence ratio or GSPO-token), [`TrustRegion`](crate::TrustRegion) picks `f` (soft gate, hard
//! clip, none). [`PolicyLoss::forward`] is the one dispatch point: the fused kernel where one
//! exists for the device (`src/kernels/`), else the composed-candle-ops path below, whose
//! gradient comes from candle's autograd. Both give the same results.

use std::collections::BTreeMap;

use candle_core::{DType, Device, Tensor};

use crate::aggregation::aggregate_masked;
use crate::aggregation::MaskCounts;
use crate::checks::{check_finite_where, checked_mask, compute_dtype};
use crate::entropy::EntropyBonus;
use crate::error::{Error, Result};
use crate::kernels::linear_policy_loss::FusedLinearPolicyLoss;
use crate::kernels::{empty_on_gpu, policy_loss::FusedPolicyLoss, Backend, Path};
use crate::kl::{kl_values, weighted_k3, weighting_cancels};
use crate::linear_logprobs::{linear_log_probs_and_entropy_with, LmHead};
use crate::losses::bypass::{Bypass, BypassLoss};
use crate::losses::checks;
use crate::losses::config::PolicyLossConfig;
use crate::losses::inputs::{fused_input_dtype, PolicyInputs, Prepared};
use crate::losses::masks;
use crate::losses::metrics::{self, MetricKind, PolicyMetrics};
use crate::losses::objective::{Batch, TokenTensors};
use crate::losses::ratio::RatioLevel;
use crate::losses::ratio::{ratio_exponent_at, ratios};
use crate::real::accumulation_dtype;
use crate::rollout_correction::rollout_correction;

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

impl PolicyLossConfig {
    /// Validates the configuration and returns the loss.
    ///
    /// ```
    /// let loss = sapo::Grpo::default().config().build()?;
    /// # Ok::<(), sapo::Error>(())
    /// ```
    pub fn build(self) -> Result<PolicyLoss> {
        self.validate()?;
        Ok(PolicyLoss::from_validated(self))
    }
}

/// Where [`PolicyLoss::forward`] takes the log-probs `ℓ` from: a `&Tensor` or a `&Var` (the
/// policy's trainable log-probs, as a test or a toy model holds them).
///
/// ```
/// use candle_core::{Device, Tensor, Var};
/// let lp = Var::new(&[[-1.0f32, -2.0]], &Device::Cpu)?;
/// let (old, adv, mask) = (lp.detach(), Tensor::new(&[1f32], &Device::Cpu)?, lp.ones_like()?);
/// let out = sapo::Grpo::default().build()?.forward(&sapo::PolicyInputs::new(&lp, &old, &adv, &mask))?;
/// assert!(out.loss.backward()?.get(lp.as_tensor()).is_some());
/// # Ok::<(), sapo::Error>(())
/// ```
pub trait LogProbsSource<'a>: Copy {
    /// The log-probs tensor.
    fn log_probs(self) -> &'a Tensor;
}

impl<'a> LogProbsSource<'a> for &'a Tensor {
    fn log_probs(self) -> &'a Tensor {
        self
    }
}

impl<'a> LogProbsSource<'a> for &'a candle_core::Var {
    fn log_probs(self) -> &'a Tensor {
        self.as_tensor()
    }
}

/// What [`PolicyLoss::forward`] returns (the bypass mode's correction metrics included).
///
/// ```
/// # use candle_core::{Device, Tensor};
/// # let lp = Tensor::new(&[[-1.0f32]], &Device::Cpu)?;
/// # let adv = Tensor::new(&[1.0f32], &Device::Cpu)?;
/// let out: sapo::PolicyLossOutput = sapo::Grpo::default().build()?
///     .forward(&sapo::PolicyInputs::new(&lp, &lp, &adv, &lp.ones_like()?))?;
/// assert_eq!(out.loss.dims(), &[] as &[usize]);
/// # Ok::<(), sapo::Error>(())
/// ```
#[derive(Debug, Clone)]
pub struct PolicyLossOutput {
    /// The scalar loss; `backward()` reaches `log_probs`.
    pub loss: Tensor,
    /// Metric sums, still on the device.
    pub metrics: PolicyMetrics,
    /// Bypass mode: the rollout correction's metrics, under verl's names without the
    /// `rollout_corr/` prefix (see [`crate::rollout_correction()`]); `None` otherwise.
    pub rollout_correction: Option<BTreeMap<String, f64>>,
}

impl PolicyLoss {
    pub(crate) fn from_validated(config: PolicyLossConfig) -> Self {
        Self {
            config,
            backend: Backend::Auto,
        }
    }

    /// Chooses the implementation ([`Backend::Auto`] by default: fused on the CPU).
    ///
    /// ```
    /// let loss = sapo::Sapo::default().build()?.with_backend(sapo::Backend::Composed);
    /// assert_eq!(loss.backend(), sapo::Backend::Composed);
    /// # Ok::<(), sapo::Error>(())
    /// ```
    pub fn with_backend(mut self, backend: Backend) -> Self {
        self.backend = backend;
        self
    }

    /// The implementation this loss runs.
    ///
    /// ```
    /// assert_eq!(sapo::Sapo::default().build()?.backend(), sapo::Backend::Auto);
    /// # Ok::<(), sapo::Error>(())
    /// ```
    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// The same loss with the entropy bonus's coefficient set to `coef` (the config's bonus, or a
    /// `token-mean` one if it had none): what [`crate::AdaptiveEntropy::update`] returns each
    /// step, without rebuilding the loss from its config.
    ///
    /// Errors: a non-finite `coef`.
    ///
    /// ```
    /// let mut adaptive = sapo::AdaptiveEntropy::new(0.01)?;
    /// let mut loss = sapo::Grpo::default().config().with_entropy(Some(adaptive.bonus(sapo::Aggregation::TokenMean))).build()?;
    /// // ... after a step whose mean entropy was 0.05:
    /// loss = loss.with_entropy_coef(adaptive.update(0.05)?)?;
    /// assert_eq!(loss.config().entropy.unwrap().coef, adaptive.coef);
    /// # Ok::<(), sapo::Error>(())
    /// ```
    pub fn with_entropy_coef(mut self, coef: f64) -> Result<Self> {
        let bonus = match self.config.entropy {
            Some(bonus) => EntropyBonus { coef, ..bonus },
            None => EntropyBonus::new(coef),
        };
        bonus.validate()?;
        self.config.entropy = Some(bonus);
        Ok(self)
    }

    /// The configuration this loss was built from.
    ///
    /// ```
    /// let loss = sapo::Gspo::default().build()?;
    /// assert_eq!(loss.config().ratio_level, sapo::RatioLevel::Sequence);
    /// # Ok::<(), sapo::Error>(())
    /// ```
    pub fn config(&self) -> &PolicyLossConfig {
        &self.config
    }

    /// Computes the loss and its metrics.
    ///
    /// Errors: shapes, dtypes or devices that do not match, a mask with values other than 0/1,
    /// a non-finite value at an unmasked position, a missing (or unexpected) `ref_log_probs` or
    /// `entropy`; a negative `is_weights` value at an unmasked position; with k3 or k3+ unclamped,
    /// `ℓref − ℓ` beyond `ln(max)` of the compute dtype (88.72 in f32), where `e^{ℓref−ℓ}`
    /// overflows; a [`crate::Normalizer`] with `world_size > 1` but without the global count an
    /// aggregation divides by, or with a global count below this batch's; and, as a last guard, a
    /// loss that is not finite (`arg: "loss"`). In bypass mode, caller-given `is_weights` and the
    /// rollout correction's errors ([`crate::rollout_correction()`]). The same inputs give the
    /// same error on every path (see [the formulas page](crate::formulas), §12).
    ///
    /// Values at masked positions never reach the loss, its gradient or the metrics; a batch with
    /// no unmasked token gives a loss of 0 and a zero gradient. Only `log_probs` (and `entropy`,
    /// for the bonus) is differentiated.
    ///
    /// With the GPU kernels ([`Backend::Fused`] on a CUDA or Metal device) nothing is read back
    /// to the host: mask values other than 0/1, non-finite values at unmasked positions and the
    /// value checks above (all but the normalizer's missing count, a configuration error) are
    /// counted on the device and returned as the same typed error by [`PolicyMetrics::check`]
    /// (and [`PolicyMetrics::read`]), not by this call.
    ///
    /// Some objectives derive constants from the whole batch before the kernel runs: KL-Cov's
    /// selection (one host read of `ℓ`, `A` and the mask), GMPO's geometric-mean weights, and in
    /// bypass mode the rollout correction (on the host, once per call).
    ///
    /// ```
    /// # use candle_core::{Device, Tensor};
    /// # let lp = Tensor::new(&[[-1.0f32, -2.0]], &Device::Cpu)?;
    /// # let adv = Tensor::new(&[1.0f32], &Device::Cpu)?;
    /// let mask = Tensor::new(&[[1u8, 0]], &Device::Cpu)?;
    /// let out = sapo::Grpo::default().build()?.forward(&sapo::PolicyInputs::new(&lp, &lp, &adv, &mask))?;
    /// assert_eq!(out.loss.to_scalar::<f32>()?, -1.0); // −ρ·A at ρ = 1
    /// # Ok::<(), sapo::Error>(())
    /// ```
    pub fn forward<'a, L: LogProbsSource<'a>>(
        &self,
        inputs: &PolicyInputs<'a, L>,
    ) -> Result<PolicyLossOutput> {
        self.forward_tensors(&inputs.with_log_probs(inputs.log_probs.log_probs()))
    }

    /// [`PolicyLoss::forward`] on log-probs given as a tensor.
    fn forward_tensors(&self, inputs: &PolicyInputs<'_>) -> Result<PolicyLossOutput> {
        let config = &self.config;
        let (_, t) = inputs.check(config.kl.is_some(), config.reads_entropy())?;
        if empty_on_gpu(inputs.log_probs) {
            return self.forward_on_cpu(inputs);
        }
        masks::check_inputs(&config.masks, inputs)?;
        check_scores(config, inputs)?;
        checks::check_normalizer(config, &inputs.normalizer)?;
        if let Some(bypass) = &config.bypass {
            return self.forward_bypass(bypass, inputs, t);
        }
        // M2PO's reduced mask replaces the mask everywhere below.
        let m2po_mask = masks::m2po_mask(&config.masks, inputs)?;
        let inputs = &PolicyInputs {
            mask: m2po_mask.as_ref().unwrap_or(inputs.mask),
            ..*inputs
        };
        // The fused kernels' input dtype, decided once (the pre-pass below keeps the weights'
        // dtype).
        let fused_dtype = fused_input_dtype(inputs);
        let path = self
            .backend
            .path(inputs.log_probs.device(), fused_dtype, true);
        let pre_checks = checks::pre_checks(config, inputs, Some(inputs.log_probs), t)?;
        if path.gpu().is_none() {
            checks::check_now(pre_checks.as_ref())?;
        }
        // The GPU kernels check the mask on the device: no host read for it here.
        let mask_as = |dtype| -> Result<Tensor> {
            if path.gpu().is_some() {
                Ok(inputs.mask.to_dtype(dtype)?)
            } else {
                checked_mask(inputs.mask, dtype)
            }
        };
        // Constants the objective derives from the batch (GMPO's geometric-mean weights, KL-Cov's
        // selection): the same tensors for every path.
        let prepass = config.trust_region.objective().prepass(&Batch {
            inputs,
            t,
            log_ratio_clamp: config.log_ratio_clamp,
            mask_as: &mask_as,
        })?;
        // OPSM's and the top-entropy selection's 0/1 factor, multiplied into the weights; the
        // CPU kernel applies their decisions itself, while it loads a tile.
        let objective_weights = prepass.is_weights.as_ref().or(inputs.is_weights);
        let (weights, keep_rule) = if path == Path::Cpu {
            (
                objective_weights.cloned(),
                masks::keep_rule(&config.masks, inputs, t)?,
            )
        } else {
            (
                masks::keep_weights(&config.masks, inputs, objective_weights, t)?,
                None,
            )
        };
        let inputs = &PolicyInputs {
            is_weights: weights.as_ref(),
            ..*inputs
        };
        let flags = prepass.flags;
        let (mut loss, mut sums, extrema, kernel_checks) = match path {
            Path::Composed => {
                let (loss, sums, extrema) = composed(
                    config,
                    &inputs.prepare(config.kl.is_some(), config.reads_entropy())?,
                    flags.as_ref(),
                )?;
                (loss, sums, extrema, None)
            }
            path => FusedPolicyLoss::forward(
                config,
                inputs,
                (t, fused_dtype),
                flags.as_ref(),
                keep_rule,
                path.gpu(),
            )?,
        };
        if let (Some(bonus), Some(entropy)) = (&config.entropy, inputs.entropy) {
            let value = entropy_term(bonus, entropy, inputs)?;
            let bonus_term = value.affine(bonus.coef, 0.0)?.to_dtype(loss.dtype())?;
            loss = (loss - bonus_term)?;
            sums = set_slot(&sums, metrics::ENTROPY_LOSS, &value.detach())?;
        }
        // The GPU kernels' counts, then this module's: read by `PolicyMetrics::check`.
        let deferred_checks = match kernel_checks {
            Some(kernel) => Some(Tensor::cat(
                &[
                    kernel.to_dtype(DType::F32)?,
                    checks::deferred(pre_checks, &loss)?,
                ],
                0,
            )?),
            None => {
                checks::check_loss_now(&loss)?;
                None
            }
        };
        Ok(PolicyLossOutput {
            loss,
            metrics: self
                .metrics(sums, extrema, inputs.normalizer.world_size)?
                .with_checks(deferred_checks),
            rollout_correction: None,
        })
    }

    /// Bypass mode: the rollout correction between the current policy (detached) and the
    /// engine's `old_log_probs`, then the loss on the corrected mask (REINFORCE with the weights,
    /// PPO-clip without).
    fn forward_bypass(
        &self,
        bypass: &Bypass,
        inputs: &PolicyInputs<'_>,
        t: usize,
    ) -> Result<PolicyLossOutput> {
        if inputs.is_weights.is_some() {
            return Err(Error::InvalidValue {
                arg: "is_weights",
                expected: "None (bypass mode computes its own weights)".into(),
                actual: "a tensor".into(),
            });
        }
        let correction = rollout_correction(
            &inputs.log_probs.detach(),
            inputs.old_log_probs,
            inputs.mask,
            &bypass.correction,
        )?;
        let weights = match bypass.loss {
            BypassLoss::Reinforce => correction.weights.clone(),
            BypassLoss::PpoClip => None,
        };
        debug_assert_eq!(correction.mask.dim(1)?, t);
        let inner = Self {
            config: PolicyLossConfig {
                bypass: None,
                ..self.config
            },
            backend: self.backend,
        };
        let corrected = PolicyInputs {
            mask: &correction.mask,
            is_weights: weights.as_ref(),
            ..*inputs
        };
        let mut out = inner.forward(&corrected)?;
        out.rollout_correction = Some(correction.metrics);
        Ok(out)
    }
}

impl PolicyLoss {
    /// Computes the loss (and its metrics) straight from the hidden states through the lm_head,
    /// without the `[B,T,V]` logits: the same results as
    /// [`crate::linear_log_probs_and_entropy`] followed by [`PolicyLoss::forward`].
    ///
    /// On the CPU, token-level objectives run as one fused sweep that computes the objective's
    /// gradient inside the same pass (three gemms per block of tokens instead of four: the
    /// backward recomputes no logits); the sequence levels need whole rows before any gradient
    /// and compose the fused linear log-probs with the loss, as does every other device or
    /// [`Backend::Composed`]. The gradient reaches `hidden`, `weight` and `bias`.
    ///
    /// ```
    /// use candle_core::{DType, Device, Tensor, Var};
    /// use sapo::{LmHead, PolicyInputs, Sapo};
    /// let dev = Device::Cpu;
    /// let hidden = Var::randn(0f32, 1.0, (2, 3, 8), &dev)?;
    /// let weight = Var::randn(0f32, 0.3, (40, 8), &dev)?;
    /// let targets = Tensor::new(&[[1u32, 2, 3], [4, 5, 6]], &dev)?;
    /// let head = LmHead::new(hidden.as_tensor(), weight.as_tensor(), &targets);
    /// let (old, _) = sapo::linear_log_probs_and_entropy(hidden.as_tensor(), weight.as_tensor(), None, &targets, 1.0)?;
    /// let adv = Tensor::new(&[1f32, -0.5], &dev)?;
    /// let mask = Tensor::ones((2, 3), DType::U8, &dev)?;
    /// let out = Sapo::default().build()?.forward_from_hidden(&PolicyInputs::new(head, &old.detach(), &adv, &mask))?;
    /// let grads = out.loss.backward()?;
    /// assert!(grads.get(weight.as_tensor()).is_some());
    /// # Ok::<(), sapo::Error>(())
    /// ```
    pub fn forward_from_hidden(
        &self,
        inputs: &PolicyInputs<'_, LmHead<'_>>,
    ) -> Result<PolicyLossOutput> {
        // Target ids at masked positions are padding (Hugging Face's −100, ids past the
        // vocabulary): they are replaced by 0 before anything reads them, so only unmasked ids
        // are checked and looked up.
        let padded_targets = inputs.log_probs.targets;
        let targets = if empty_on_gpu(padded_targets) {
            // No token: nothing to replace (candle cannot select on an empty GPU tensor).
            padded_targets.clone()
        } else if inputs.mask.dims() == padded_targets.dims()
            && inputs.mask.device().same_device(padded_targets.device())
        {
            inputs
                .mask
                .ne(0.0)?
                .where_cond(padded_targets, &padded_targets.zeros_like()?)?
        } else {
            // Shapes or devices that do not match: reported by the checks below.
            padded_targets.clone()
        };
        let inputs = &inputs.with_log_probs(LmHead {
            targets: &targets,
            ..inputs.log_probs
        });
        let head = inputs.log_probs;
        let gpu_path = self
            .backend
            .path(
                head.hidden.device(),
                compute_dtype(head.hidden.dtype()),
                true,
            )
            .gpu()
            .is_some();
        let (n, _, _) = head.check(!gpu_path)?;
        let dims = match (head.hidden.rank(), head.targets.dims()) {
            (3, &[b, t]) => (b, t),
            _ => {
                return Err(Error::Shape {
                    arg: "hidden",
                    expected: "[B, T, H] (with targets [B, T])".into(),
                    actual: head.hidden.dims().to_vec(),
                })
            }
        };
        if inputs.entropy.is_some() {
            return Err(Error::InvalidValue {
                arg: "entropy",
                expected:
                    "None (from the hidden states the entropy is computed with the log-probs)"
                        .into(),
                actual: "a tensor".into(),
            });
        }
        inputs.check_constants(
            &[dims.0, dims.1],
            head.hidden,
            self.config.kl.is_some(),
            false,
        )?;
        checks::check_normalizer(&self.config, &inputs.normalizer)?;
        masks::check_inputs(&self.config.masks, inputs)?;
        check_scores(&self.config, inputs)?;
        let config = &self.config;
        // The one pass needs neither a row pre-pass nor batch-level constants; OPSM and the
        // top-entropy selection read the current policy's `ℓ` and `H` of the whole batch before
        // any gradient, as the sequence levels do, and take the route below (M2PO reads only
        // constants and runs in the one pass).
        let one_pass = self
            .backend
            .path(head.hidden.device(), head.hidden.dtype(), false)
            == Path::Cpu
            && config.ratio_level == RatioLevel::Token
            && config.entropy.is_none()
            && config.bypass.is_none()
            && !config.masks.keeps()
            && !config.trust_region.objective().batch_prepass()
            && n > 0;
        if !one_pass {
            let (log_probs, entropy) = linear_log_probs_and_entropy_with(
                head.hidden,
                head.weight,
                head.bias,
                head.targets,
                head.temperature,
                self.backend,
            )?;
            let mut composed = inputs.with_log_probs(&log_probs);
            if config.reads_entropy() {
                composed.entropy = Some(&entropy);
            }
            return self.forward(&composed);
        }
        let dtype = compute_dtype(head.hidden.dtype());
        let m2po_mask = masks::m2po_mask(&config.masks, inputs)?;
        let inputs = &PolicyInputs {
            mask: m2po_mask.as_ref().unwrap_or(inputs.mask),
            ..*inputs
        };
        checks::check_now(checks::pre_checks(config, inputs, None, dims.1)?.as_ref())?;
        let (loss, sums, extrema) =
            FusedLinearPolicyLoss::forward(&self.config, inputs, dims, dtype)?;
        checks::check_loss_now(&loss)?;
        Ok(PolicyLossOutput {
            loss,
            metrics: self.metrics(sums, extrema, inputs.normalizer.world_size)?,
            rollout_correction: None,
        })
    }

    /// A batch of no token on a GPU, computed on the CPU (see `empty_on_gpu`): every input is
    /// moved there (`to_device` keeps the graph: the gradient reaches the GPU's `log_probs` and
    /// `entropy`), the loss and the metrics are moved back.
    fn forward_on_cpu(&self, inputs: &PolicyInputs<'_>) -> Result<PolicyLossOutput> {
        let (cpu, device) = (&Device::Cpu, inputs.log_probs.device());
        let to_cpu = |x: &Tensor| x.to_device(cpu);
        let optional = |x: Option<&Tensor>| x.map(to_cpu).transpose();
        let log_probs = to_cpu(inputs.log_probs)?;
        let old_log_probs = to_cpu(inputs.old_log_probs)?;
        let advantages = to_cpu(inputs.advantages)?;
        let mask = to_cpu(inputs.mask)?;
        let ref_log_probs = optional(inputs.ref_log_probs)?;
        let is_weights = optional(inputs.is_weights)?;
        let entropy = optional(inputs.entropy)?;
        let rollout_log_probs = optional(inputs.rollout_log_probs)?;
        let scores = optional(inputs.scores)?;
        let out = self.forward_tensors(&PolicyInputs {
            log_probs: &log_probs,
            old_log_probs: &old_log_probs,
            advantages: &advantages,
            mask: &mask,
            ref_log_probs: ref_log_probs.as_ref(),
            is_weights: is_weights.as_ref(),
            entropy: entropy.as_ref(),
            rollout_log_probs: rollout_log_probs.as_ref(),
            scores: scores.as_ref(),
            normalizer: inputs.normalizer,
        })?;
        Ok(PolicyLossOutput {
            loss: out.loss.to_device(device)?,
            metrics: out.metrics.to_device(device)?,
            rollout_correction: out.rollout_correction,
        })
    }

    /// The metrics of sums and extrema from any path. The `kl_loss` and `entropy_loss` slots hold
    /// aggregated values, which every path multiplies by the world size `W` as it does the loss;
    /// as metrics they are kept as this shard's share of the global batch's value (divided by
    /// `W`), so that merging the shards' metrics (a sum) gives the global batch's value.
    fn metrics(&self, sums: Tensor, extrema: Tensor, world_size: usize) -> Result<PolicyMetrics> {
        let sums = if world_size > 1 {
            let mut share = vec![1f64; metrics::NUM_SLOTS];
            share[metrics::KL_LOSS] = 1.0 / world_size as f64;
            share[metrics::ENTROPY_LOSS] = 1.0 / world_size as f64;
            let share = Tensor::new(share, sums.device())?.to_dtype(sums.dtype())?;
            sums.mul(&share)?
        } else {
            sums
        };
        let kind = MetricKind::new(
            self.config.trust_region.objective().metric_slots(),
            self.config.kl.is_some(),
            self.config.entropy.is_some(),
        );
        Ok(PolicyMetrics::new(sums, extrema, kind))
    }
}

/// `scores` are given exactly when the objective reads them (TOPR).
fn check_scores<L>(config: &PolicyLossConfig, inputs: &PolicyInputs<'_, L>) -> Result<()> {
    match (
        config.trust_region.objective().reads_scores(),
        inputs.scores,
    ) {
        (true, None) => Err(Error::InvalidValue {
            arg: "scores",
            expected: "a [B] tensor (TOPR's branch is the row's reward score)".into(),
            actual: "None".into(),
        }),
        (false, Some(_)) => Err(Error::InvalidValue {
            arg: "scores",
            expected: "None (only TOPR reads the reward scores)".into(),
            actual: "a tensor".into(),
        }),
        _ => Ok(()),
    }
}

/// `agg(H)` of the entropy bonus (differentiable with respect to `entropy`), after checking the
/// entropy's values at unmasked positions; masked positions never reach it.
fn entropy_term(
    bonus: &EntropyBonus,
    entropy: &Tensor,
    inputs: &PolicyInputs<'_>,
) -> Result<Tensor> {
    let dtype = compute_dtype(entropy.dtype());
    let mask = checked_mask(inputs.mask, dtype)?;
    let keep = mask.ne(0.0)?;
    let entropy = entropy.to_dtype(dtype)?;
    check_finite_where("entropy", &entropy, &mask)?;
    let scrubbed = keep.where_cond(&entropy, &entropy.zeros_like()?)?;
    aggregate_masked(
        &scrubbed,
        &MaskCounts::new(&mask)?,
        bonus.aggregation,
        &inputs.normalizer,
    )
}

/// `sums` with slot `slot` replaced by the scalar `value`.
fn set_slot(sums: &Tensor, slot: usize, value: &Tensor) -> Result<Tensor> {
    let value = value.to_dtype(sums.dtype())?.reshape(1)?;
    let n = sums.dim(0)?;
    let mut parts = vec![];
    if slot > 0 {
        parts.push(sums.narrow(0, 0, slot)?);
    }
    parts.push(value);
    if slot + 1 < n {
        parts.push(sums.narrow(0, slot + 1, n - slot - 1)?);
    }
    Ok(Tensor::cat(&parts, 0)?)
}

/// `Σ m·x` of a detached `[B,T]` tensor, accumulated in f64 where the device has it.
fn masked_sum(x: &Tensor, mask: &Tensor) -> Result<Tensor> {
    let acc = accumulation_dtype(x.device());
    Ok(x.detach()
        .to_dtype(acc)?
        .mul(&mask.to_dtype(acc)?)?
        .sum_all()?
        .to_dtype(mask.dtype())?)
}

/// The composed-ops path: every objective through candle ops and autograd, on any device.
/// Returns the loss, the metric sums `[NUM_SLOTS]` and the ratio's extrema `[2]`.
fn composed(
    config: &PolicyLossConfig,
    p: &Prepared,
    flags: Option<&Tensor>,
) -> Result<(Tensor, Tensor, Tensor)> {
    let ratios = ratios(
        config.ratio_level,
        (config.log_ratio_clamp, config.seq_log_ratio_max),
        &config.trust_region,
        p,
    )?;
    let flags = flags.map(|f| f.to_dtype(p.mask.dtype())).transpose()?;
    let objective = config.trust_region.objective();
    let per_token = objective.per_token(&TokenTensors {
        log_probs: &p.log_probs,
        old_log_probs: &p.old_log_probs,
        log_ratio: &ratios.log_ratio,
        ratio: &ratios.ratio,
        advantages: &p.advantages,
        mask: &p.mask,
        is_weights: p.is_weights.as_ref(),
        flags: flags.as_ref(),
    })?;
    let mut loss_mat = per_token.loss;
    if let (Some(w), true) = (&p.is_weights, objective.weights_multiply()) {
        loss_mat = loss_mat.mul(w)?;
    }
    let masked = loss_mat.mul(&p.mask)?;
    let mut loss = aggregate_masked(&masked, &p.counts, config.aggregation, &p.normalizer)?;

    let zero = p.counts.tokens.zeros_like()?;
    let mut sums = vec![zero; metrics::NUM_SLOTS];
    for (slot, values) in per_token.metrics {
        sums[slot] = masked_sum(&values, &p.mask)?;
    }
    if let (Some(kl), Some(ref_log_probs)) = (&config.kl, &p.ref_log_probs) {
        let k = if kl.importance_weighted && weighting_cancels(kl.estimator, kl.clamp) {
            // The ratio's exponent again, at a copy of ℓ of its own (see `weighted_k3`).
            let copy = p.log_probs.copy()?;
            let exponent = ratio_exponent_at(
                config.ratio_level,
                (config.log_ratio_clamp, config.seq_log_ratio_max),
                &config.trust_region,
                &copy,
                p,
            )?;
            weighted_k3(
                &exponent,
                &(&copy - ref_log_probs)?,
                &(&p.log_probs - ref_log_probs)?,
                &ratios.ratio,
            )?
        } else {
            let k = kl_values(&p.log_probs, ref_log_probs, kl.estimator, kl.clamp)?;
            if kl.importance_weighted {
                k.mul(&ratios.ratio)?
            } else {
                k
            }
        };
        let k = k.mul(&p.mask)?;
        let penalty = aggregate_masked(&k, &p.counts, kl.aggregation, &p.normalizer)?;
        loss = (loss + penalty.affine(kl.coef, 0.0)?)?;
        sums[metrics::KL] = masked_sum(&k, &p.mask)?;
        sums[metrics::KL_LOSS] = penalty.detach();
    }
    sums[metrics::TOKENS] = p.counts.tokens.clone();
    sums[metrics::NEG_LOG_RATIO] = masked_sum(&ratios.log_ratio.neg()?, &p.mask)?;
    sums[metrics::RATIO_EXCESS] = ratios.excess_sum;

    let r = ratios.ratio.detach();
    let extremum = |fill: f64, max: bool| -> Result<Tensor> {
        if r.elem_count() == 0 {
            return Ok(p.counts.tokens.ones_like()?.affine(fill, 0.0)?);
        }
        let masked = p.keep.where_cond(&r, &(r.ones_like()? * fill)?)?;
        Ok(if max {
            masked.max_all()?
        } else {
            masked.min_all()?
        })
    };
    let extrema = Tensor::stack(
        &[
            extremum(f64::INFINITY, false)?,
            extremum(f64::NEG_INFINITY, true)?,
        ],
        0,
    )?;
    Ok((loss, Tensor::stack(&sums, 0)?, extrema))
}
