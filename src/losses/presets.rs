//! The papers' objectives as presets of the unified surrogate.
//!
//! | preset | ratio | trust region | aggregation | defaults |
//! |---|---|---|---|---|
//! | [`Sapo`] | token | soft gate | seq-mean-token-mean | τ_pos 1.0, τ_neg 1.05, clamp 20 |
//! | [`Gspo`] | sequence | hard clip | seq-mean-token-mean | ε 3e-4 / 4e-4, log s ≤ 10 |
//! | [`Grpo`] | token | hard clip | seq-mean-token-mean | ε 0.2 / 0.2, clamp 20 |
//!
//! Each converts into a [`PolicyLossConfig`] (to change the aggregation, add a KL penalty, ...)
//! or builds a [`PolicyLoss`] directly.

use crate::aggregation::Aggregation;
use crate::error::Result;
use crate::losses::clip::HardClip;
use crate::losses::config::PolicyLossConfig;
use crate::losses::policy_loss::PolicyLoss;
use crate::losses::ratio::{RatioLevel, GSPO_SEQ_LOG_RATIO_MAX};
use crate::losses::trust_region::TrustRegion;

/// `config()` and `build()` of a preset that converts into a [`PolicyLossConfig`].
macro_rules! preset_methods {
    ($preset:ident) => {
        impl $preset {
            /// The full configuration, to adjust further.
            ///
            /// ```
            #[doc = concat!("let cfg = sapo::", stringify!($preset), "::default().config();")]
            /// assert!(cfg.validate().is_ok());
            /// ```
            pub fn config(self) -> PolicyLossConfig {
                self.into()
            }
            /// Validates and builds the loss.
            ///
            /// ```
            #[doc = concat!("let loss = sapo::", stringify!($preset), "::default().build()?;")]
            /// # Ok::<(), sapo::Error>(())
            /// ```
            pub fn build(self) -> Result<PolicyLoss> {
                self.config().build()
            }
        }
    };
}

/// SAPO (Gao et al. 2025): token ratio, soft gate `σ(τ(ρ−1))·4/τ`, `seq-mean-token-mean`.
///
/// ```
/// let loss = sapo::Sapo::default().build()?;
/// assert_eq!(sapo::Sapo::default().tau_neg, 1.05);
/// # Ok::<(), sapo::Error>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sapo {
    /// Temperature for `A > 0` (paper: 1.0).
    pub tau_pos: f64,
    /// Temperature for `A ≤ 0` (paper: 1.05; `τ_neg > τ_pos` is the stable choice).
    pub tau_neg: f64,
}

impl Default for Sapo {
    fn default() -> Self {
        Self {
            tau_pos: 1.0,
            tau_neg: 1.05,
        }
    }
}

preset_methods!(Sapo);

impl From<Sapo> for PolicyLossConfig {
    fn from(s: Sapo) -> Self {
        PolicyLossConfig::new(
            RatioLevel::Token,
            TrustRegion::SoftGate {
                tau_pos: s.tau_pos,
                tau_neg: s.tau_neg,
            },
        )
        .with_aggregation(Aggregation::SeqMeanTokenMean)
    }
}

/// GSPO (Zheng et al. 2025): sequence ratio `s_i`, hard clip with ε 3e-4 / 4e-4,
/// `seq-mean-token-mean`, `log s ≤ 10` (verl's guard), no token clamp.
///
/// ```
/// let loss = sapo::Gspo::default().build()?;
/// // verl's GSPO-token form, for per-token advantages:
/// let token_form = sapo::Gspo::default().config().with_ratio_level(sapo::RatioLevel::SequenceToken).build()?;
/// # Ok::<(), sapo::Error>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Gspo {
    /// `ε_low` (paper: 3e-4).
    pub eps_low: f64,
    /// `ε_high` (paper: 4e-4).
    pub eps_high: f64,
}

impl Default for Gspo {
    fn default() -> Self {
        Self {
            eps_low: 3e-4,
            eps_high: 4e-4,
        }
    }
}

preset_methods!(Gspo);

impl From<Gspo> for PolicyLossConfig {
    fn from(g: Gspo) -> Self {
        PolicyLossConfig::new(
            RatioLevel::Sequence,
            TrustRegion::HardClip(HardClip::new(g.eps_low, g.eps_high)),
        )
        .with_log_ratio_clamp(None)
        .with_seq_log_ratio_max(Some(GSPO_SEQ_LOG_RATIO_MAX))
        .with_aggregation(Aggregation::SeqMeanTokenMean)
    }
}

/// GRPO (Shao et al. 2024): token ratio, PPO clip ε 0.2 / 0.2, `seq-mean-token-mean`, log-ratio
/// clamp 20. Clip-higher, dual clip and two-sided δ are fields.
///
/// ```
/// // DAPO: clip-higher and token-mean.
/// let dapo = sapo::Grpo { eps_high: 0.28, ..Default::default() }
///     .config()
///     .with_aggregation(sapo::Aggregation::TokenMean)
///     .build()?;
/// # Ok::<(), sapo::Error>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Grpo {
    /// `ε_low` (0.2).
    pub eps_low: f64,
    /// `ε_high` (0.2; DAPO's clip-higher 0.28).
    pub eps_high: f64,
    /// Dual clip `c` (verl's `clip_ratio_c = 3.0`), off by default as in TRL.
    pub dual_clip: Option<f64>,
    /// Two-sided bound δ (TRL `delta`), off by default.
    pub delta: Option<f64>,
}

impl Default for Grpo {
    fn default() -> Self {
        Self {
            eps_low: 0.2,
            eps_high: 0.2,
            dual_clip: None,
            delta: None,
        }
    }
}

preset_methods!(Grpo);

impl From<Grpo> for PolicyLossConfig {
    fn from(g: Grpo) -> Self {
        PolicyLossConfig::new(
            RatioLevel::Token,
            TrustRegion::HardClip(HardClip {
                eps_low: g.eps_low,
                eps_high: g.eps_high,
                dual_clip: g.dual_clip,
                delta: g.delta,
            }),
        )
        .with_aggregation(Aggregation::SeqMeanTokenMean)
    }
}
