//! The tensors a policy loss reads, their checks, and their preparation (dtype, broadcasting,
//! scrubbing of padded positions).

use candle_core::{DType, Tensor};

use crate::aggregation::{MaskCounts, Normalizer};
use crate::checks::{check_matrix, check_values, compute_dtype};
use crate::error::{check_device, check_float, check_shape, Error, Result};

/// The inputs of [`crate::PolicyLoss::forward`].
///
/// | field | shape | notes |
/// |---|---|---|
/// | `log_probs` | `[B,T]` | `ℓ`, current policy; the only input that gets a gradient |
/// | `old_log_probs` | `[B,T]` | `ℓold`, the sampling policy (constant) |
/// | `advantages` | `[B]`, `[B,1]` or `[B,T]` | `A`; `[B]` and `[B,1]` (TRL's) are broadcast over the row's tokens |
/// | `mask` | `[B,T]` | 0/1 in any dtype; masked positions may hold anything (NaN, ±inf) |
/// | `ref_log_probs` | `[B,T]` | `ℓref`, required exactly when the config has a KL penalty |
/// | `is_weights` | `[B,T]` or `[B,1]` | rollout-correction weights `w ≥ 0` multiplying the per-token policy loss; `[B,1]` (one per sequence) is broadcast over the row |
/// | `entropy` | `[B,T]` | per-token entropy `H`, required exactly when the config has an entropy bonus or a top-entropy selection ([`crate::PolicyLoss::forward`] only: [`crate::PolicyLoss::forward_from_hidden`] computes it) |
/// | `rollout_log_probs` | `[B,T]` | `ℓroll`, the inference engine's (behaviour policy's) log-probs: M2PO's (required), OPSM's sampling policy (else `old_log_probs`); given only with those masks ([`crate::PolicyMasks`]) |
/// | `scores` | `[B]` | the responses' reward scores, required exactly by TOPR ([`crate::TrustRegion::Topr`]), whose branch they pick |
/// | `normalizer` | — | global counts for data parallelism and gradient accumulation ([`Normalizer::for_micro_batches`]); default: this batch alone |
///
/// Floats may be f16, bf16, f32 or f64; the loss is computed in f32 (f64 stays f64). Every tensor
/// lives on `log_probs`' device. Only `log_probs` is differentiated: the crate detaches every other
/// input, as every peer treats them as constants.
///
/// ```
/// use candle_core::{Device, Tensor};
/// let dev = Device::Cpu;
/// let lp = Tensor::zeros((2, 3), candle_core::DType::F32, &dev)?;
/// let adv = Tensor::new(&[1f32, -1.], &dev)?;
/// let mask = Tensor::ones((2, 3), candle_core::DType::U8, &dev)?;
/// let inputs = sapo::PolicyInputs::new(&lp, &lp, &adv, &mask);
/// # Ok::<(), candle_core::Error>(())
/// ```
///
/// The policy's log-probs may also come straight from the hidden states and the lm_head: with
/// `L` = [`crate::LmHead`], [`crate::PolicyLoss::forward_from_hidden`] computes the loss without
/// the logits.
#[derive(Debug, Clone, Copy)]
pub struct PolicyInputs<'a, L = &'a Tensor> {
    /// `ℓ`, `[B,T]` (or the [`crate::LmHead`] that produces them).
    pub log_probs: L,
    /// `ℓold`, `[B,T]`.
    pub old_log_probs: &'a Tensor,
    /// `A`, `[B]`, `[B,1]` or `[B,T]`.
    pub advantages: &'a Tensor,
    /// `m`, `[B,T]`, 0/1.
    pub mask: &'a Tensor,
    /// `ℓref`, `[B,T]`, for the KL penalty.
    pub ref_log_probs: Option<&'a Tensor>,
    /// `w`, `[B,T]` or `[B,1]` (one per sequence), rollout-correction weights.
    pub is_weights: Option<&'a Tensor>,
    /// `[B,T]` per-token entropy for the entropy bonus (differentiable: its gradient flows back
    /// to whatever produced it), when the config has one.
    pub entropy: Option<&'a Tensor>,
    /// `ℓroll`, `[B,T]`, the behaviour policy's log-probs (M2PO, OPSM).
    pub rollout_log_probs: Option<&'a Tensor>,
    /// `[B]` reward scores (TOPR).
    pub scores: Option<&'a Tensor>,
    /// Global counts for data parallelism / gradient accumulation.
    pub normalizer: Normalizer,
}

impl<'a, L> PolicyInputs<'a, L> {
    /// The four required inputs, no KL reference, no weights, local normalization.
    ///
    /// ```
    /// # use candle_core::{Device, Tensor, DType};
    /// # let lp = Tensor::zeros((2, 3), DType::F32, &Device::Cpu)?;
    /// # let mask = Tensor::ones((2, 3), DType::U8, &Device::Cpu)?;
    /// let adv = Tensor::new(&[[1f32], [-1.]], &Device::Cpu)?; // TRL's [B, 1]
    /// let inputs = sapo::PolicyInputs::new(&lp, &lp, &adv, &mask);
    /// # Ok::<(), candle_core::Error>(())
    /// ```
    pub fn new(
        log_probs: L,
        old_log_probs: &'a Tensor,
        advantages: &'a Tensor,
        mask: &'a Tensor,
    ) -> Self {
        Self {
            log_probs,
            old_log_probs,
            advantages,
            mask,
            ref_log_probs: None,
            is_weights: None,
            entropy: None,
            rollout_log_probs: None,
            scores: None,
            normalizer: Normalizer::default(),
        }
    }
    /// Adds the reference policy's log-probs (for the KL penalty).
    ///
    /// ```
    /// # use candle_core::{Device, Tensor, DType};
    /// # let lp = Tensor::zeros((1, 2), DType::F32, &Device::Cpu)?;
    /// # let adv = Tensor::zeros(1, DType::F32, &Device::Cpu)?;
    /// let inputs = sapo::PolicyInputs::new(&lp, &lp, &adv, &lp).with_ref_log_probs(&lp);
    /// assert!(inputs.ref_log_probs.is_some());
    /// # Ok::<(), candle_core::Error>(())
    /// ```
    pub fn with_ref_log_probs(mut self, ref_log_probs: &'a Tensor) -> Self {
        self.ref_log_probs = Some(ref_log_probs);
        self
    }
    /// Adds rollout-correction weights `w` (constants): the per-token policy loss becomes `w·l`.
    ///
    /// ```
    /// # use candle_core::{Device, Tensor, DType};
    /// # let lp = Tensor::zeros((1, 2), DType::F32, &Device::Cpu)?;
    /// # let adv = Tensor::zeros(1, DType::F32, &Device::Cpu)?;
    /// let w = Tensor::new(&[[0.5f32, 2.0]], &Device::Cpu)?;
    /// let inputs = sapo::PolicyInputs::new(&lp, &lp, &adv, &lp).with_is_weights(&w);
    /// # Ok::<(), candle_core::Error>(())
    /// ```
    pub fn with_is_weights(mut self, is_weights: &'a Tensor) -> Self {
        self.is_weights = Some(is_weights);
        self
    }
    /// Adds the per-token entropy `H` `[B,T]` for the config's entropy bonus `− c·agg(H)`; the
    /// bonus's gradient flows back through it (to the logits, when it comes from
    /// [`crate::token_log_probs_and_entropy`]).
    ///
    /// ```
    /// # use candle_core::{Device, Tensor, DType};
    /// # let lp = Tensor::zeros((1, 2), DType::F32, &Device::Cpu)?;
    /// # let adv = Tensor::zeros(1, DType::F32, &Device::Cpu)?;
    /// let entropy = Tensor::new(&[[1.5f32, 0.7]], &Device::Cpu)?;
    /// let inputs = sapo::PolicyInputs::new(&lp, &lp, &adv, &lp).with_entropy(&entropy);
    /// # Ok::<(), candle_core::Error>(())
    /// ```
    pub fn with_entropy(mut self, entropy: &'a Tensor) -> Self {
        self.entropy = Some(entropy);
        self
    }
    /// Adds the behaviour policy's log-probs `ℓroll` `[B,T]` (the inference engine's): what M2PO
    /// compares with `old_log_probs`, and OPSM's sampling policy ([`crate::PolicyMasks`]).
    ///
    /// ```
    /// # use candle_core::{Device, Tensor, DType};
    /// # let lp = Tensor::zeros((1, 2), DType::F32, &Device::Cpu)?;
    /// # let adv = Tensor::zeros(1, DType::F32, &Device::Cpu)?;
    /// let rollout = Tensor::new(&[[-0.1f32, -2.0]], &Device::Cpu)?;
    /// let inputs = sapo::PolicyInputs::new(&lp, &lp, &adv, &lp).with_rollout_log_probs(&rollout);
    /// assert!(inputs.rollout_log_probs.is_some());
    /// # Ok::<(), candle_core::Error>(())
    /// ```
    pub fn with_rollout_log_probs(mut self, rollout_log_probs: &'a Tensor) -> Self {
        self.rollout_log_probs = Some(rollout_log_probs);
        self
    }
    /// Adds the responses' reward scores `[B]`, which pick TOPR's branch (`> 0`: positive).
    ///
    /// ```
    /// # use candle_core::{Device, Tensor, DType};
    /// # let lp = Tensor::zeros((2, 2), DType::F32, &Device::Cpu)?;
    /// # let adv = Tensor::zeros(2, DType::F32, &Device::Cpu)?;
    /// let scores = Tensor::new(&[1f32, 0.0], &Device::Cpu)?;
    /// let inputs = sapo::PolicyInputs::new(&lp, &lp, &adv, &lp).with_scores(&scores);
    /// assert!(inputs.scores.is_some());
    /// # Ok::<(), candle_core::Error>(())
    /// ```
    pub fn with_scores(mut self, scores: &'a Tensor) -> Self {
        self.scores = Some(scores);
        self
    }
    /// Sets the global normalizer (data parallelism, gradient accumulation).
    ///
    /// ```
    /// # use candle_core::{Device, Tensor, DType};
    /// # let lp = Tensor::zeros((1, 2), DType::F32, &Device::Cpu)?;
    /// # let adv = Tensor::zeros(1, DType::F32, &Device::Cpu)?;
    /// let norm = sapo::Normalizer::default().with_global_tokens(64.0).with_world_size(4);
    /// let inputs = sapo::PolicyInputs::new(&lp, &lp, &adv, &lp).with_normalizer(norm);
    /// # Ok::<(), candle_core::Error>(())
    /// ```
    pub fn with_normalizer(mut self, normalizer: Normalizer) -> Self {
        self.normalizer = normalizer;
        self
    }
}

/// Inputs checked, converted to the compute dtype, broadcast to `[B,T]`, and zeroed at masked
/// positions (so no garbage can reach a value or a gradient).
#[derive(Debug, Clone)]
pub(crate) struct Prepared {
    pub log_probs: Tensor,
    pub old_log_probs: Tensor,
    pub advantages: Tensor,
    /// Float 0/1.
    pub mask: Tensor,
    /// `u8` 0/1, for `where_cond`.
    pub keep: Tensor,
    pub ref_log_probs: Option<Tensor>,
    pub is_weights: Option<Tensor>,
    pub counts: MaskCounts,
    pub normalizer: Normalizer,
}

impl<'a, L> PolicyInputs<'a, L> {
    /// The same constants with another source of log-probs.
    pub(crate) fn with_log_probs<'b, M>(&self, log_probs: M) -> PolicyInputs<'b, M>
    where
        'a: 'b,
    {
        PolicyInputs {
            log_probs,
            old_log_probs: self.old_log_probs,
            advantages: self.advantages,
            mask: self.mask,
            ref_log_probs: self.ref_log_probs,
            is_weights: self.is_weights,
            entropy: self.entropy,
            rollout_log_probs: self.rollout_log_probs,
            scores: self.scores,
            normalizer: self.normalizer,
        }
    }

    /// Checks the constants' shapes, dtypes and devices against the log-probs' `[B,T]` shape
    /// and `device`'s device, and the normalizer (no data is read).
    pub(crate) fn check_constants(
        &self,
        shape: &[usize],
        device: &Tensor,
        needs_ref: bool,
        needs_entropy: bool,
    ) -> Result<()> {
        self.normalizer.validate()?;
        let b = shape[0];
        check_matrix("old_log_probs", self.old_log_probs, shape, device)?;
        check_device("advantages", self.advantages, device)?;
        check_float("advantages", self.advantages)?;
        let adv_dims = self.advantages.dims();
        if adv_dims != [b] && adv_dims != [b, 1] && adv_dims != shape {
            return Err(Error::Shape {
                arg: "advantages",
                expected: format!("[B] = [{b}], [B, 1] = [{b}, 1] or [B, T] = {shape:?}"),
                actual: adv_dims.to_vec(),
            });
        }
        check_device("mask", self.mask, device)?;
        check_shape("mask", self.mask, shape)?;
        match (needs_ref, self.ref_log_probs) {
            (true, None) => {
                return Err(Error::InvalidValue {
                    arg: "ref_log_probs",
                    expected: "a [B, T] tensor (the config has a KL penalty)".into(),
                    actual: "None".into(),
                })
            }
            (false, Some(_)) => {
                return Err(Error::InvalidValue {
                    arg: "ref_log_probs",
                    expected: "None (the config has no KL penalty)".into(),
                    actual: "a tensor".into(),
                })
            }
            (_, Some(r)) => check_matrix("ref_log_probs", r, shape, device)?,
            _ => {}
        }
        if let Some(w) = self.is_weights {
            if w.dims() == [b, 1] {
                check_device("is_weights", w, device)?;
                check_float("is_weights", w)?;
            } else {
                check_matrix("is_weights", w, shape, device)?;
            }
        }
        match (needs_entropy, self.entropy) {
            (true, None) => Err(Error::InvalidValue {
                arg: "entropy",
                expected:
                    "a [B, T] tensor (the config has an entropy bonus or top_entropy_quantile)"
                        .into(),
                actual: "None".into(),
            }),
            (false, Some(_)) => Err(Error::InvalidValue {
                arg: "entropy",
                expected: "None (the config has no entropy bonus and no top_entropy_quantile)"
                    .into(),
                actual: "a tensor".into(),
            }),
            (_, Some(h)) => check_matrix("entropy", h, shape, device),
            _ => Ok(()),
        }?;
        if let Some(r) = self.rollout_log_probs {
            check_matrix("rollout_log_probs", r, shape, device)?;
        }
        if let Some(scores) = self.scores {
            check_device("scores", scores, device)?;
            check_float("scores", scores)?;
            check_shape("scores", scores, &[b])?;
        }
        Ok(())
    }

    /// The rollout weights as a detached `[B,T]` tensor (a `[B,1]` one broadcast over the row).
    pub(crate) fn is_weights(&self, t: usize) -> Result<Option<Tensor>> {
        self.is_weights
            .map(|w| -> Result<Tensor> {
                let w = w.detach();
                let b = w.dim(0)?;
                Ok(if w.dims() == [b, 1] && t != 1 {
                    w.broadcast_as((b, t))?.contiguous()?
                } else {
                    w
                })
            })
            .transpose()
    }

    /// The advantages as `[B]` (one per row; from `[B]` or `[B,1]`) or `[B,T]`, detached, for
    /// rows of `t` tokens.
    pub(crate) fn advantages(&self, t: usize) -> Result<Tensor> {
        let adv = self.advantages.detach();
        Ok(if adv.dims() == [adv.dim(0)?, 1] && t != 1 {
            adv.squeeze(1)?
        } else {
            adv
        })
    }
}

impl PolicyInputs<'_> {
    /// Checks shapes, dtypes, devices and the normalizer (no data is read). Returns `(B, T)`.
    pub(crate) fn check(&self, needs_ref: bool, needs_entropy: bool) -> Result<(usize, usize)> {
        let log_probs = self.log_probs;
        check_float("log_probs", log_probs)?;
        let (b, t) = crate::error::matrix_dims("log_probs", log_probs)?;
        self.check_constants(&[b, t], log_probs, needs_ref, needs_entropy)?;
        Ok((b, t))
    }

    /// Checks every input (one host read for the values) and prepares the tensors of the
    /// composed path. `needs_ref` says whether the config has a KL penalty.
    pub(crate) fn prepare(&self, needs_ref: bool, needs_entropy: bool) -> Result<Prepared> {
        self.check(needs_ref, needs_entropy)?;
        let log_probs = self.log_probs;
        let shape = log_probs.dims().to_vec();
        let dtype = compute_dtype(log_probs.dtype());
        let mask = self.mask.to_dtype(dtype)?;
        let keep = mask.ne(0.0)?;
        let advantages = self.advantages(shape[1])?.to_dtype(dtype)?;
        let advantages = if advantages.rank() == 1 {
            advantages.unsqueeze(1)?.broadcast_as(shape.as_slice())?
        } else {
            advantages
        };
        // Only log_probs carries gradient: every other input is a constant.
        let convert = |x: &Tensor| x.detach().to_dtype(dtype);
        let log_probs_c = log_probs.to_dtype(dtype)?;
        let old_log_probs = convert(self.old_log_probs)?;
        let ref_log_probs = self.ref_log_probs.map(convert).transpose()?;
        let is_weights = self
            .is_weights(shape[1])?
            .as_ref()
            .map(convert)
            .transpose()?;

        let mut checked: Vec<(&'static str, &Tensor)> = vec![
            ("log_probs", &log_probs_c),
            ("old_log_probs", &old_log_probs),
            ("advantages", &advantages),
        ];
        if let Some(r) = &ref_log_probs {
            checked.push(("ref_log_probs", r));
        }
        if let Some(w) = &is_weights {
            checked.push(("is_weights", w));
        }

        // One host read for every value check.
        check_values(self.mask, &keep.to_dtype(dtype)?, &checked)?;

        let zeros = Tensor::zeros(shape.as_slice(), dtype, log_probs.device())?;
        let scrub = |x: &Tensor| keep.where_cond(x, &zeros);
        Ok(Prepared {
            log_probs: scrub(&log_probs_c)?,
            old_log_probs: scrub(&old_log_probs)?,
            advantages: scrub(&advantages)?,
            ref_log_probs: ref_log_probs.as_ref().map(scrub).transpose()?,
            is_weights: is_weights.as_ref().map(scrub).transpose()?,
            counts: MaskCounts::new(&mask)?,
            mask,
            keep,
            normalizer: self.normalizer,
        })
    }
}

/// The dtype of the fused kernel's inputs: `log_probs`' when every float input shares it, else
/// the compute dtype (so that no input loses precision).
pub(crate) fn fused_input_dtype(inputs: &PolicyInputs<'_>) -> DType {
    let floats = [
        Some(inputs.old_log_probs),
        Some(inputs.advantages),
        inputs.ref_log_probs,
        inputs.is_weights,
    ];
    let lp_dtype = inputs.log_probs.dtype();
    if floats.iter().flatten().all(|x| x.dtype() == lp_dtype) {
        lp_dtype
    } else {
        compute_dtype(lp_dtype)
    }
}
