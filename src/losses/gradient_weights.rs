//! How much of its on-policy gradient each token keeps: the diagnostic behind the SAPO paper's
//! claim that "GSPO suppresses all gradients for [a sequence with a few highly off-policy
//! tokens], whereas SAPO selectively down-weights only the offending tokens".
//!
//! For a token `t` of row `i`, with `L` the whole loss (policy term, KL penalty, entropy bonus):
//!
//! ```text
//! w_{i,t} = |∂L/∂ℓ_{i,t}|  /  |∂L/∂ℓ_{i,t}| at ℓ = ℓold        (same advantages, mask, weights)
//! ```
//!
//! the token's gradient weight relative to the same token on-policy. It is `1` for every objective
//! on-policy, `ρ·f'(ρ)` for a token-level shape (SAPO: `ρ·4p(1−p)`, `p = σ(τ(ρ−1))`; GRPO: `ρ`
//! inside the clip and `0` where the clip holds), and the same value for every token of a row under
//! GSPO's sequence clip (`s_i` inside it, `0` outside). It is defined where the on-policy gradient
//! is not zero: unmasked tokens whose advantage (or KL or entropy term) moves the loss.

use candle_core::{DType, Tensor, Var};

use crate::error::Result;
use crate::losses::inputs::PolicyInputs;
use crate::losses::policy_loss::PolicyLoss;

/// A token keeps "most" of its on-policy gradient at this relative weight or above
/// ([`GradientWeightSummary::active_token_share`]).
///
/// ```
/// # use candle_core::{Device, Tensor};
/// # let lp = Tensor::new(&[[-1.0f32, -1.0]], &Device::Cpu)?;
/// # let adv = Tensor::new(&[1.0f32], &Device::Cpu)?;
/// # let mask = Tensor::new(&[[1u8, 1]], &Device::Cpu)?;
/// let weights = sapo::Sapo::default().build()?
///     .gradient_weights(&sapo::PolicyInputs::new(&lp, &lp, &adv, &mask))?;
/// // on-policy every weight is 1 ≥ ACTIVE_WEIGHT
/// assert!(weights.relative.to_vec2::<f32>()?[0].iter().all(|&w| f64::from(w) >= sapo::ACTIVE_WEIGHT));
/// # Ok::<(), sapo::Error>(())
/// ```
pub const ACTIVE_WEIGHT: f64 = 0.5;

/// A token whose relative weight is below this gets no gradient to speak of
/// ([`GradientWeightSummary::silenced_token_share`] and
/// [`GradientWeightSummary::silenced_sequence_share`]): `1e-3`, a thousandth of its on-policy
/// weight (hard clips give exactly 0; soft gates never do).
///
/// ```
/// # use candle_core::{Device, Tensor};
/// let dev = Device::Cpu;
/// let log_probs = Tensor::new(&[[-0.2f32, -1.0]], &dev)?;
/// let old = Tensor::new(&[[-1.0f32, -1.0]], &dev)?;
/// let adv = Tensor::new(&[1.0f32], &dev)?;
/// let mask = Tensor::new(&[[1u8, 1]], &dev)?;
/// let inputs = sapo::PolicyInputs::new(&log_probs, &old, &adv, &mask);
/// // ρ = e^0.8: GRPO's clip silences the token, SAPO's gate only down-weights it
/// let grpo = sapo::Grpo::default().build()?.gradient_weights(&inputs)?.summary()?;
/// let sapo = sapo::Sapo::default().build()?.gradient_weights(&inputs)?.summary()?;
/// assert_eq!((grpo.silenced_token_share, sapo.silenced_token_share), (0.5, 0.0));
/// # Ok::<(), sapo::Error>(())
/// ```
pub const SILENCED_WEIGHT: f64 = 1e-3;

/// Per-token gradient weights relative to on-policy ([`PolicyLoss::gradient_weights`]):
///
/// ```text
/// w_{i,t} = |∂L/∂ℓ_{i,t}|  /  |∂L/∂ℓ_{i,t}| at ℓ = ℓold        (same advantages, mask, weights)
/// ```
///
/// with `L` the whole loss. `w = 1` on-policy for every objective; `ρ·f'(ρ)` for a token-level
/// shape (SAPO `ρ·4p(1−p)`, GRPO `ρ` inside the clip, 0 where it holds); one value for all the
/// tokens of a row under GSPO's sequence clip (`s_i` or 0). The SAPO paper's claim — GSPO
/// silences a whole sequence for a few off-policy tokens, SAPO down-weights only those — is a
/// statement about these weights.
#[derive(Debug, Clone)]
pub struct GradientWeights {
    /// `[B,T]` f32: `w_{i,t}` where defined, 0 elsewhere.
    pub relative: Tensor,
    /// `[B,T]` f32 0/1: 1 where the on-policy gradient is not zero (unmasked tokens with a
    /// learning signal), the tokens `relative` describes.
    pub defined: Tensor,
}

/// Shares of tokens and sequences by relative gradient weight, over the defined tokens
/// ([`GradientWeights::summary`]).
///
/// ```
/// # use candle_core::{Device, Tensor};
/// let dev = Device::Cpu;
/// let log_probs = Tensor::new(&[[-0.2f32, -1.0], [-1.0, -1.0]], &dev)?;
/// let old = Tensor::new(&[[-1.0f32, -1.0], [-1.0, -1.0]], &dev)?;
/// let adv = Tensor::new(&[1.0f32, 0.0], &dev)?;
/// let mask = Tensor::new(&[[1u8, 1], [1, 1]], &dev)?;
/// let inputs = sapo::PolicyInputs::new(&log_probs, &old, &adv, &mask);
/// let s = sapo::Grpo::default().build()?.gradient_weights(&inputs)?.summary()?;
/// // the second row has A = 0: no on-policy gradient, so no defined weight
/// assert_eq!((s.tokens, s.sequences), (2, 1));
/// assert_eq!((s.mean_weight, s.active_token_share, s.silenced_sequence_share), (0.5, 0.5, 0.0));
/// # Ok::<(), sapo::Error>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GradientWeightSummary {
    /// Tokens with a defined weight.
    pub tokens: usize,
    /// Rows with at least one such token.
    pub sequences: usize,
    /// Mean relative weight over those tokens (0 when there are none).
    pub mean_weight: f64,
    /// Share of those tokens with `w ≥` [`ACTIVE_WEIGHT`].
    pub active_token_share: f64,
    /// Share of those tokens with `w <` [`SILENCED_WEIGHT`].
    pub silenced_token_share: f64,
    /// Share of those rows in which every such token has `w <` [`SILENCED_WEIGHT`]: sequences that
    /// get no gradient at all.
    pub silenced_sequence_share: f64,
}

impl PolicyLoss {
    /// Each token's gradient weight relative to the same token on-policy:
    /// `w = |∂L/∂ℓ| / |∂L/∂ℓ|_{ℓ=ℓold}` (see [`GradientWeights`]).
    ///
    /// Runs the loss twice on detached copies of the inputs (at `ℓ` and at `ℓ = ℓold`) and
    /// differentiates each with respect to `ℓ` alone: nothing reaches the caller's graph. It
    /// takes the path [`PolicyLoss::forward`] takes and returns its errors, the GPU's deferred
    /// value checks included (read back here).
    ///
    /// ```
    /// use candle_core::{Device, Tensor};
    /// let dev = Device::Cpu;
    /// let log_probs = Tensor::new(&[[-1.0f32, -0.2], [-0.5, -0.5]], &dev)?;
    /// let old = Tensor::new(&[[-1.0f32, -1.0], [-0.5, -0.5]], &dev)?;
    /// let adv = Tensor::new(&[1.0f32, -1.0], &dev)?;
    /// let mask = Tensor::ones((2, 2), candle_core::DType::U8, &dev)?;
    /// let inputs = sapo::PolicyInputs::new(&log_probs, &old, &adv, &mask);
    /// let weights = sapo::Grpo::default().build()?.gradient_weights(&inputs)?;
    /// // ρ = e^0.8 ≈ 2.2 > 1 + ε with A > 0: the clip holds, the token gets no gradient.
    /// let w = weights.relative.to_vec2::<f32>()?;
    /// assert_eq!(w[0], [1.0, 0.0]);
    /// assert_eq!(weights.summary()?.silenced_token_share, 0.25);
    /// # Ok::<(), sapo::Error>(())
    /// ```
    pub fn gradient_weights(&self, inputs: &PolicyInputs<'_>) -> Result<GradientWeights> {
        let current = self.log_prob_gradient(inputs, inputs.log_probs)?.abs()?;
        let on_policy = self
            .log_prob_gradient(inputs, inputs.old_log_probs)?
            .abs()?;
        let defined = on_policy.gt(0.0)?;
        let zeros = on_policy.zeros_like()?;
        let denominator = defined.where_cond(&on_policy, &on_policy.ones_like()?)?;
        let relative = defined.where_cond(&current.div(&denominator)?, &zeros)?;
        Ok(GradientWeights {
            relative,
            defined: defined.to_dtype(DType::F32)?,
        })
    }

    /// `∂L/∂ℓ` in f32 at `log_probs` (which replaces `ℓ`), every other input detached.
    fn log_prob_gradient(&self, inputs: &PolicyInputs<'_>, log_probs: &Tensor) -> Result<Tensor> {
        let var = Var::from_tensor(&log_probs.detach())?;
        let entropy = inputs.entropy.map(Tensor::detach);
        let inputs = PolicyInputs {
            entropy: entropy.as_ref(),
            ..inputs.with_log_probs(var.as_tensor())
        };
        let output = self.forward(&inputs)?;
        output.metrics.check()?;
        let grads = output.loss.backward()?;
        let gradient = match grads.get(var.as_tensor()) {
            Some(g) => g.clone(),
            None => var.as_tensor().zeros_like()?,
        };
        Ok(gradient.to_dtype(DType::F32)?)
    }
}

impl GradientWeights {
    /// The shares of [`GradientWeightSummary`], read to the host.
    ///
    /// ```
    /// # use candle_core::{Device, Tensor};
    /// # let lp = Tensor::new(&[[-1.0f32, -1.0]], &Device::Cpu)?;
    /// # let adv = Tensor::new(&[1.0f32], &Device::Cpu)?;
    /// # let mask = Tensor::new(&[[1u8, 1]], &Device::Cpu)?;
    /// let weights = sapo::Sapo::default().build()?
    ///     .gradient_weights(&sapo::PolicyInputs::new(&lp, &lp, &adv, &mask))?;
    /// let summary = weights.summary()?; // on-policy: every token keeps its whole weight
    /// assert_eq!((summary.active_token_share, summary.silenced_sequence_share), (1.0, 0.0));
    /// # Ok::<(), sapo::Error>(())
    /// ```
    pub fn summary(&self) -> Result<GradientWeightSummary> {
        let relative = self.relative.to_vec2::<f32>()?;
        let defined = self.defined.to_vec2::<f32>()?;
        let mut s = GradientWeightSummary {
            tokens: 0,
            sequences: 0,
            mean_weight: 0.0,
            active_token_share: 0.0,
            silenced_token_share: 0.0,
            silenced_sequence_share: 0.0,
        };
        for (weights, defined) in relative.iter().zip(&defined) {
            let row: Vec<f64> = weights
                .iter()
                .zip(defined)
                .filter(|(_, d)| **d > 0.0)
                .map(|(w, _)| *w as f64)
                .collect();
            if row.is_empty() {
                continue;
            }
            s.sequences += 1;
            s.tokens += row.len();
            s.mean_weight += row.iter().sum::<f64>();
            s.active_token_share += row.iter().filter(|w| **w >= ACTIVE_WEIGHT).count() as f64;
            let silenced = row.iter().filter(|w| **w < SILENCED_WEIGHT).count();
            s.silenced_token_share += silenced as f64;
            if silenced == row.len() {
                s.silenced_sequence_share += 1.0;
            }
        }
        if s.tokens > 0 {
            let tokens = s.tokens as f64;
            s.mean_weight /= tokens;
            s.active_token_share /= tokens;
            s.silenced_token_share /= tokens;
            s.silenced_sequence_share /= s.sequences as f64;
        }
        Ok(s)
    }
}
