//! The unified surrogate's configuration: ratio level × trust-region shape × aggregation, plus
//! the options every peer offers (log-ratio clamp, KL penalty).
//!
//! Every objective is `loss = agg(−f(ρ)·A) + β·agg(k)`, where `ρ` is chosen by [`RatioLevel`]
//! and `f` by [`TrustRegion`]. [`crate::Sapo`], [`crate::Gspo`] and [`crate::Grpo`] are presets of
//! this one configuration.

use crate::aggregation::Aggregation;
use crate::error::{check_config, Result};
use crate::kl::KlPenalty;
use crate::surrogate::PolicyLoss;

/// Which importance ratio the trust region sees.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum RatioLevel {
    /// `ρ_{i,t} = exp(δ_{i,t})`, `δ = clamp(ℓ − ℓold, −c, c)` — PPO, GRPO, SAPO.
    #[default]
    Token,
    /// `s_i = exp((1/n_i) Σ_t m·δ)`, shared by every token of row `i`, with gradient through every
    /// token — GSPO proper, TRL `importance_sampling_level="sequence"`.
    Sequence,
    /// `s_{i,t} = sg[s_i]·exp(ℓ − sg[ℓ])`: value `s_i`, gradient `s_i` on token `t` alone —
    /// GSPO-token, the form verl implements (allows per-token advantages).
    SequenceToken,
}

/// PPO-style hard clip on the ratio: `l = max(−min(ρ, δ)·A, −clip(ρ, 1−ε_low, 1+ε_high)·A)`,
/// then for `A < 0` with dual clip `c`: `l = min(l, −c·A)`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct HardClip {
    /// `ε_low`, in `[0, 1)`.
    pub eps_low: f64,
    /// `ε_high` ≥ 0 (DAPO's clip-higher: 0.28).
    pub eps_high: f64,
    /// Dual-clip `c > 1` (verl `clip_ratio_c`), or `None`.
    pub dual_clip: Option<f64>,
    /// Two-sided bound `δ > 1 + ε_high` on the unclipped ratio (TRL `delta`), or `None`.
    pub delta: Option<f64>,
}

impl HardClip {
    /// A symmetric-or-not clip with no dual clip and no δ.
    ///
    /// ```
    /// let clip = sapo::HardClip::new(0.2, 0.28);
    /// assert_eq!(clip.dual_clip, None);
    /// ```
    pub fn new(eps_low: f64, eps_high: f64) -> Self {
        Self {
            eps_low,
            eps_high,
            dual_clip: None,
            delta: None,
        }
    }
    /// Sets the dual clip `c`.
    pub fn with_dual_clip(mut self, c: f64) -> Self {
        self.dual_clip = Some(c);
        self
    }
    /// Sets the two-sided bound `δ`.
    pub fn with_delta(mut self, delta: f64) -> Self {
        self.delta = Some(delta);
        self
    }
    /// Checks `0 ≤ ε_low < 1`, `ε_high ≥ 0`, `c > 1`, `δ > 1 + ε_high`, all finite.
    pub fn validate(&self) -> Result<()> {
        check_config(
            self.eps_low.is_finite() && (0.0..1.0).contains(&self.eps_low),
            "eps_low",
            "finite, in [0, 1)",
            self.eps_low,
        )?;
        check_config(
            self.eps_high.is_finite() && self.eps_high >= 0.0,
            "eps_high",
            "finite and >= 0",
            self.eps_high,
        )?;
        if let Some(c) = self.dual_clip {
            check_config(c.is_finite() && c > 1.0, "dual_clip", "finite and > 1", c)?;
        }
        if let Some(delta) = self.delta {
            check_config(
                delta.is_finite() && delta > 1.0 + self.eps_high,
                "delta",
                "finite and > 1 + eps_high",
                delta,
            )?;
        }
        Ok(())
    }
}

/// The trust-region shape `f` in `loss = −f(ρ)·A`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum TrustRegion {
    /// SAPO's gate `f(ρ) = σ(τ(ρ−1))·4/τ`, `τ = τ_pos` if `A > 0` else `τ_neg`.
    SoftGate {
        /// Temperature for positive advantages (> 0).
        tau_pos: f64,
        /// Temperature for non-positive advantages (> 0).
        tau_neg: f64,
    },
    /// PPO's clip (GRPO, GSPO, DAPO, dual clip, two-sided δ).
    HardClip(HardClip),
    /// No trust region: `f(ρ) = ρ` (vanilla importance-weighted policy gradient).
    Unclipped,
}

impl TrustRegion {
    /// Checks the shape's parameters.
    pub fn validate(&self) -> Result<()> {
        match self {
            Self::SoftGate { tau_pos, tau_neg } => {
                check_config(
                    tau_pos.is_finite() && *tau_pos > 0.0,
                    "tau_pos",
                    "finite and > 0",
                    tau_pos,
                )?;
                check_config(
                    tau_neg.is_finite() && *tau_neg > 0.0,
                    "tau_neg",
                    "finite and > 0",
                    tau_neg,
                )
            }
            Self::HardClip(clip) => clip.validate(),
            Self::Unclipped => Ok(()),
        }
    }
}

/// Full configuration of the unified surrogate. Build it into a [`PolicyLoss`] with
/// [`PolicyLossConfig::build`], which rejects invalid values.
///
/// ```
/// use sapo::{Aggregation, HardClip, PolicyLossConfig, RatioLevel, TrustRegion};
/// // TRL `loss_type="dr_grpo"`, clip-higher, max completion length 1024:
/// let loss = PolicyLossConfig::new(RatioLevel::Token, TrustRegion::HardClip(HardClip::new(0.2, 0.28)))
///     .with_log_ratio_clamp(None)
///     .with_aggregation(Aggregation::SeqMeanTokenSumNorm { horizon: Some(1024) })
///     .build()?;
/// # Ok::<(), sapo::Error>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PolicyLossConfig {
    /// Token, sequence or sequence-token ratio.
    pub ratio_level: RatioLevel,
    /// Soft gate, hard clip or none.
    pub trust_region: TrustRegion,
    /// `c` in `δ = clamp(ℓ − ℓold, −c, c)` (verl: 20); `None` disables it (TRL).
    pub log_ratio_clamp: Option<f64>,
    /// Upper clamp on `log s` at the sequence levels (verl's GSPO: 10); `None`: none.
    pub seq_log_ratio_max: Option<f64>,
    /// How per-token policy losses become a scalar.
    pub aggregation: Aggregation,
    /// Optional KL penalty to a reference policy.
    pub kl: Option<KlPenalty>,
}

impl PolicyLossConfig {
    /// A configuration with verl's log-ratio clamp (20), no sequence clamp, `token-mean` and no
    /// KL penalty.
    pub fn new(ratio_level: RatioLevel, trust_region: TrustRegion) -> Self {
        Self {
            ratio_level,
            trust_region,
            log_ratio_clamp: Some(20.0),
            seq_log_ratio_max: None,
            aggregation: Aggregation::TokenMean,
            kl: None,
        }
    }
    /// Sets the ratio level.
    pub fn with_ratio_level(mut self, ratio_level: RatioLevel) -> Self {
        self.ratio_level = ratio_level;
        self
    }
    /// Sets (or with `None` disables) the token log-ratio clamp.
    pub fn with_log_ratio_clamp(mut self, clamp: Option<f64>) -> Self {
        self.log_ratio_clamp = clamp;
        self
    }
    /// Sets (or with `None` disables) the upper clamp on the sequence log-ratio.
    pub fn with_seq_log_ratio_max(mut self, max: Option<f64>) -> Self {
        self.seq_log_ratio_max = max;
        self
    }
    /// Sets the aggregation of the policy term.
    pub fn with_aggregation(mut self, aggregation: Aggregation) -> Self {
        self.aggregation = aggregation;
        self
    }
    /// Adds (or with `None` removes) a KL penalty.
    pub fn with_kl(mut self, kl: Option<KlPenalty>) -> Self {
        self.kl = kl;
        self
    }
    /// Checks every parameter; see [`crate::Error::InvalidConfig`].
    pub fn validate(&self) -> Result<()> {
        self.trust_region.validate()?;
        if let Some(c) = self.log_ratio_clamp {
            check_config(
                c.is_finite() && c > 0.0,
                "log_ratio_clamp",
                "finite and > 0",
                c,
            )?;
        }
        if let Some(m) = self.seq_log_ratio_max {
            check_config(m.is_finite(), "seq_log_ratio_max", "finite", m)?;
        }
        self.aggregation.validate()?;
        if let Some(kl) = &self.kl {
            kl.validate()?;
        }
        Ok(())
    }
    /// Validates the configuration and returns the loss.
    pub fn build(self) -> Result<PolicyLoss> {
        self.validate()?;
        Ok(PolicyLoss::from_validated(self))
    }
}
