//! The critic's clipped value loss (verl `core_algos.compute_value_loss`, PPO's value clipping).
//! Every formula, with the peer it matches: [the formulas page](crate::formulas).
//!
//! ```text
//! v̂ = clip(v, v_old − c, v_old + c)
//! loss = ½ · agg( max((v − R)², (v̂ − R)²) )
//! ∂loss/∂v = ½ · agg'· 2(v − R) where (v − R)² > (v̂ − R)², 0 where the clipped term is larger, half of it at a tie
//! clip_fraction = masked mean of [(v̂ − R)² > (v − R)²],   vpred_mean = masked mean of v
//! ```
//!
//! Layer: api.

use candle_core::Tensor;

use crate::aggregation::COUNT_GUARD;
use crate::aggregation::{aggregate, Aggregation, Normalizer};
use crate::checks::{scrubbed_matrices, Scrubbed};
use crate::error::{check_config, Result};
use crate::real::accumulation_dtype;

/// The clipped value loss of a critic `v` (verl `critic.cliprange_value`, `loss_agg_mode`).
///
/// ```
/// use candle_core::{Device, Tensor, Var};
/// let dev = Device::Cpu;
/// let values_pred = Var::new(&[[0.5f32, 2.0]], &dev)?;
/// let old_values = Tensor::new(&[[0.4f32, 1.0]], &dev)?;
/// let returns = Tensor::new(&[[1.0f32, 1.0]], &dev)?;
/// let mask = Tensor::new(&[[1u8, 1]], &dev)?;
/// let out = sapo::ValueLoss::new(0.5).forward(values_pred.as_tensor(), &old_values, &returns, &mask)?;
/// // token 1: max(0.25, 0.01) = 0.25; token 2: max(1, 0.25) = 1 → ½·mean = 0.3125
/// assert!((out.loss.to_scalar::<f32>()? - 0.3125).abs() < 1e-6);
/// let grads = out.loss.backward()?;
/// assert!(grads.get(values_pred.as_tensor()).is_some());
/// # Ok::<(), sapo::Error>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ValueLoss {
    /// `c`: how far `v` may move from `v_old` before its clipped term can take over (finite,
    /// ≥ 0; verl's default 0.5).
    pub clip: f64,
    /// The aggregation (verl's critic `loss_agg_mode`; default `token-mean`).
    pub aggregation: Aggregation,
    /// Data-parallel and gradient-accumulation counts, as for the policy loss.
    pub normalizer: Normalizer,
}

/// What [`ValueLoss::forward`] returns: the loss and its metrics (detached scalars on the
/// inputs' device).
///
/// ```
/// use candle_core::{Device, Tensor};
/// let dev = Device::Cpu;
/// let values_pred = Tensor::new(&[[0.5f32, 2.0, 7.0]], &dev)?;
/// let old_values = Tensor::new(&[[0.4f32, 1.0, 0.0]], &dev)?;
/// let returns = Tensor::new(&[[1.0f32, 1.0, 0.0]], &dev)?;
/// let mask = Tensor::new(&[[1u8, 1, 0]], &dev)?;
/// let out = sapo::ValueLoss::new(0.5).forward(&values_pred, &old_values, &returns, &mask)?;
/// // token 2: v̂ = 1.5, (v̂ − R)² = 0.25 < (v − R)² = 1: not the clipped term; the masked
/// // token counts nowhere
/// assert_eq!(out.clip_fraction.to_scalar::<f32>()?, 0.0);
/// assert_eq!(out.vpred_mean.to_scalar::<f32>()?, 1.25);
/// # Ok::<(), sapo::Error>(())
/// ```
#[derive(Debug, Clone)]
pub struct ValueLossOutput {
    /// The scalar loss in the compute dtype (f32, f64 for f64 inputs), differentiable with
    /// respect to `values_pred`.
    pub loss: Tensor,
    /// verl's `critic/vf_clipfrac`: the masked share of tokens whose clipped term is larger.
    pub clip_fraction: Tensor,
    /// verl's `critic/vpred_mean`: the masked mean of `values_pred`.
    pub vpred_mean: Tensor,
}

impl ValueLoss {
    /// The loss with clip `c` and `token-mean` aggregation (checked when it runs).
    ///
    /// ```
    /// let l = sapo::ValueLoss::new(0.5);
    /// assert_eq!((l.clip, l.aggregation), (0.5, sapo::Aggregation::TokenMean));
    /// ```
    pub fn new(clip: f64) -> Self {
        Self {
            clip,
            aggregation: Aggregation::TokenMean,
            normalizer: Normalizer::default(),
        }
    }

    /// The same with another aggregation.
    ///
    /// ```
    /// let l = sapo::ValueLoss::new(0.2).with_aggregation(sapo::Aggregation::SeqMeanTokenMean);
    /// assert_eq!(l.aggregation, sapo::Aggregation::SeqMeanTokenMean);
    /// ```
    pub fn with_aggregation(mut self, aggregation: Aggregation) -> Self {
        self.aggregation = aggregation;
        self
    }

    /// The same with a normalizer (see [`crate::Normalizer`]).
    ///
    /// ```
    /// let n = sapo::Normalizer::default().with_global_tokens(1024.0).with_world_size(4);
    /// let l = sapo::ValueLoss::new(0.5).with_normalizer(n);
    /// assert_eq!(l.normalizer.world_size, 4);
    /// ```
    pub fn with_normalizer(mut self, normalizer: Normalizer) -> Self {
        self.normalizer = normalizer;
        self
    }

    /// Checks `c` finite and ≥ 0 and the aggregation.
    ///
    /// ```
    /// assert!(sapo::ValueLoss::new(-0.1).validate().is_err());
    /// ```
    pub fn validate(&self) -> Result<()> {
        check_config(
            self.clip.is_finite() && self.clip >= 0.0,
            "clip",
            "finite and >= 0",
            self.clip,
        )?;
        self.aggregation.validate()?;
        self.normalizer.validate_for(self.aggregation)
    }

    /// The loss of the predicted values `values_pred` `[B,T]` (carrying the gradient) against
    /// the `returns`, with the rollout's `old_values`, over the 0/1 `mask` (all `[B,T]`; masked
    /// positions may hold anything and get no gradient):
    /// `½ · agg(max((v − R)², (clip(v, v_old ± c) − R)²))`.
    ///
    /// ```
    /// use candle_core::{Device, Tensor, Var};
    /// let dev = Device::Cpu;
    /// let values_pred = Var::new(&[[3.0f32, f32::NAN]], &dev)?;
    /// let old_values = Tensor::new(&[[0.0f32, 0.0]], &dev)?;
    /// let returns = Tensor::new(&[[0.0f32, 0.0]], &dev)?;
    /// let mask = Tensor::new(&[[1u8, 0]], &dev)?;
    /// let out = sapo::ValueLoss::new(0.5).forward(values_pred.as_tensor(), &old_values, &returns, &mask)?;
    /// // (v − R)² = 9 > (0.5 − R)²: the unclipped term, ½·9; the masked NaN never reaches it
    /// assert_eq!(out.loss.to_scalar::<f32>()?, 4.5);
    /// let grads = out.loss.backward()?;
    /// let g = grads.get(values_pred.as_tensor()).unwrap().to_vec2::<f32>()?;
    /// assert_eq!(g, [[3.0, 0.0]]); // ½·2(v − R), 0 on the padding
    /// # Ok::<(), sapo::Error>(())
    /// ```
    pub fn forward(
        &self,
        values_pred: &Tensor,
        old_values: &Tensor,
        returns: &Tensor,
        mask: &Tensor,
    ) -> Result<ValueLossOutput> {
        self.validate()?;
        // Every value checked in one host read; padding zeroed (no value, no gradient).
        let Scrubbed { mask: m, values } = scrubbed_matrices(
            &[
                ("values_pred", values_pred),
                ("old_values", &old_values.detach()),
                ("returns", &returns.detach()),
            ],
            mask,
        )?;
        let (v, v_old, r) = (&values[0], &values[1], &values[2]);
        let dtype = m.dtype();
        // Inside [v_old − c, v_old + c] (bounds included, as torch.clamp's gradient) v̂ = v.
        let (lo, hi) = (
            v_old.affine(1.0, -self.clip)?,
            v_old.affine(1.0, self.clip)?,
        );
        let clipped = v
            .lt(&lo)?
            .where_cond(&lo, &v.gt(&hi)?.where_cond(&hi, v)?)?;
        let unclipped_term = v.sub(r)?.sqr()?;
        let clipped_term = clipped.sub(r)?.sqr()?;
        // candle's maximum splits the gradient at ties, as torch.max does.
        let per_token = unclipped_term.maximum(&clipped_term)?.affine(0.5, 0.0)?;
        let loss = aggregate(&per_token, &m, self.aggregation, &self.normalizer)?;
        let acc = accumulation_dtype(values_pred.device());
        let masked_mean = |x: &Tensor| -> Result<Tensor> {
            let x = x.detach().to_dtype(acc)?.mul(&m.to_dtype(acc)?)?;
            let count = m.to_dtype(acc)?.sum_all()?.affine(1.0, COUNT_GUARD)?;
            Ok(x.sum_all()?.div(&count)?.to_dtype(dtype)?)
        };
        let larger = clipped_term.gt(&unclipped_term)?.to_dtype(dtype)?;
        Ok(ValueLossOutput {
            loss,
            clip_fraction: masked_mean(&larger)?,
            vpred_mean: masked_mean(v)?,
        })
    }
}
