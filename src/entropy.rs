//! The entropy bonus `− c·agg(H)` of a policy loss, and TRL's adaptive coefficient.
//! Every formula, with the peer it matches: [the formulas page](crate::formulas).
//!
//! ```text
//! loss = pg_loss − c·agg(H) + β·agg(k)          ∂loss/∂H = −c·∂agg(H)/∂H
//! ```
//!
//! `H` is the per-token entropy from [`crate::token_log_probs_and_entropy`] (or the hidden-states
//! path), so the bonus's gradient reaches the logits through it. verl aggregates the bonus with
//! the actor's `loss_agg_mode` (give the same [`Aggregation`] as the policy's for that); TRL's
//! `entropy_coef` takes `token-mean`.
//!
//! ```
//! use candle_core::{Device, Tensor, Var};
//! use sapo::{EntropyBonus, Grpo, PolicyInputs};
//! let logits = Var::new(&[[[0.5f32, -1.0, 2.0], [0.0, 0.3, -0.2]]], &Device::Cpu)?;
//! let targets = Tensor::new(&[[2u32, 1]], &Device::Cpu)?;
//! let (lp, h) = sapo::token_log_probs_and_entropy(logits.as_tensor(), &targets, 1.0)?;
//! let (old, adv, mask) = (lp.detach(), Tensor::new(&[1f32], &Device::Cpu)?, lp.ones_like()?);
//! let loss = Grpo::default().config().with_entropy(Some(EntropyBonus::new(0.01))).build()?;
//! let out = loss.forward(&PolicyInputs::new(&lp, &old, &adv, &mask).with_entropy(&h))?;
//! let grads = out.loss.backward()?; // through ℓ and H to the logits
//! assert!(grads.get(logits.as_tensor()).is_some());
//! # Ok::<(), sapo::Error>(())
//! ```

use crate::aggregation::Aggregation;
use crate::error::{check_config, Result};

/// An entropy bonus `− coef·agg(H)` (verl `entropy_coeff`, TRL `entropy_coef`).
///
/// ```
/// use sapo::{Aggregation, EntropyBonus};
/// let bonus = EntropyBonus::new(0.001).with_aggregation(Aggregation::SeqMeanTokenMean);
/// assert!(bonus.validate().is_ok());
/// assert!(EntropyBonus::new(f64::NAN).validate().is_err());
/// ```
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct EntropyBonus {
    /// The coefficient `c` (finite; negative values penalise entropy).
    pub coef: f64,
    /// How the per-token entropy is reduced (default `token-mean`).
    pub aggregation: Aggregation,
}

impl EntropyBonus {
    /// A bonus with coefficient `coef` and `token-mean` aggregation.
    ///
    /// ```
    /// assert_eq!(sapo::EntropyBonus::new(0.01).aggregation, sapo::Aggregation::TokenMean);
    /// ```
    pub fn new(coef: f64) -> Self {
        Self {
            coef,
            aggregation: Aggregation::TokenMean,
        }
    }
    /// Sets the aggregation of the bonus.
    ///
    /// ```
    /// let b = sapo::EntropyBonus::new(0.01).with_aggregation(sapo::Aggregation::TokenSum);
    /// assert_eq!(b.aggregation, sapo::Aggregation::TokenSum);
    /// ```
    pub fn with_aggregation(mut self, aggregation: Aggregation) -> Self {
        self.aggregation = aggregation;
        self
    }
    /// Rejects a non-finite coefficient and a bad aggregation.
    ///
    /// ```
    /// assert!(sapo::EntropyBonus::new(f64::INFINITY).validate().is_err());
    /// ```
    pub fn validate(&self) -> Result<()> {
        check_config(self.coef.is_finite(), "entropy.coef", "finite", self.coef)?;
        self.aggregation.validate()
    }
}

/// TRL's adaptive entropy coefficient (`use_adaptive_entropy`): after each step the coefficient
/// moves by `delta` toward keeping the entropy at `target` — up when the measured entropy is below
/// it, down otherwise — and stays in `[min, max]`.
///
/// The state is the public field `coef`: store and restore it with the rest of the training
/// state. The defaults are TRL's (`entropy_coef_min` 0, `entropy_coef_max` 1,
/// `entropy_coef_delta` 0.005, `entropy_target` 0.2).
///
/// ```
/// let mut adaptive = sapo::AdaptiveEntropy::new(0.01)?;
/// let next = adaptive.update(0.05)?; // entropy below target: coefficient goes up
/// assert!((next - 0.015).abs() < 1e-12);
/// let bonus = adaptive.bonus(sapo::Aggregation::TokenMean);
/// assert_eq!(bonus.coef, next);
/// # Ok::<(), sapo::Error>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdaptiveEntropy {
    /// The current coefficient (the state).
    pub coef: f64,
    /// The entropy the coefficient steers toward.
    pub target: f64,
    /// The step per update (> 0).
    pub delta: f64,
    /// Lower bound of the coefficient.
    pub min: f64,
    /// Upper bound of the coefficient (≥ `min`).
    pub max: f64,
}

impl AdaptiveEntropy {
    /// TRL's defaults starting at `coef` (checked against them).
    ///
    /// ```
    /// assert!(sapo::AdaptiveEntropy::new(2.0).is_err()); // above TRL's max of 1
    /// ```
    pub fn new(coef: f64) -> Result<Self> {
        let adaptive = Self {
            coef,
            target: 0.2,
            delta: 0.005,
            min: 0.0,
            max: 1.0,
        };
        adaptive.validate()?;
        Ok(adaptive)
    }
    /// Checks every field finite, `delta > 0`, `min ≤ coef ≤ max`.
    ///
    /// ```
    /// let a = sapo::AdaptiveEntropy { delta: 0.0, ..sapo::AdaptiveEntropy::new(0.1)? };
    /// assert!(a.validate().is_err());
    /// # Ok::<(), sapo::Error>(())
    /// ```
    pub fn validate(&self) -> Result<()> {
        check_config(
            self.target.is_finite(),
            "entropy_target",
            "finite",
            self.target,
        )?;
        check_config(
            self.delta.is_finite() && self.delta > 0.0,
            "entropy_coef_delta",
            "finite and > 0",
            self.delta,
        )?;
        check_config(self.min.is_finite(), "entropy_coef_min", "finite", self.min)?;
        check_config(
            self.max.is_finite() && self.max >= self.min,
            "entropy_coef_max",
            "finite and >= entropy_coef_min",
            self.max,
        )?;
        check_config(
            self.coef.is_finite() && self.coef >= self.min && self.coef <= self.max,
            "entropy_coef",
            "finite, in [entropy_coef_min, entropy_coef_max]",
            self.coef,
        )
    }
    /// Moves the coefficient after a step whose mean entropy was `entropy`; returns the new one.
    ///
    /// ```
    /// let mut a = sapo::AdaptiveEntropy::new(0.0)?;
    /// assert_eq!(a.update(0.9)?, 0.0); // above target, already at the minimum
    /// # Ok::<(), sapo::Error>(())
    /// ```
    pub fn update(&mut self, entropy: f64) -> Result<f64> {
        self.validate()?;
        // An entropy is ≥ 0: a negative one is a caller's bug (a sign or a merged sum gone wrong).
        check_config(
            entropy.is_finite() && entropy >= 0.0,
            "entropy",
            "finite and >= 0",
            entropy,
        )?;
        let step = if entropy < self.target {
            self.delta
        } else {
            -self.delta
        };
        self.coef = (self.coef + step).clamp(self.min, self.max);
        Ok(self.coef)
    }
    /// The bonus with the current coefficient.
    ///
    /// ```
    /// let b = sapo::AdaptiveEntropy::new(0.02)?.bonus(sapo::Aggregation::TokenMean);
    /// assert_eq!(b.coef, 0.02);
    /// # Ok::<(), sapo::Error>(())
    /// ```
    pub fn bonus(&self, aggregation: Aggregation) -> EntropyBonus {
        EntropyBonus::new(self.coef).with_aggregation(aggregation)
    }
}
