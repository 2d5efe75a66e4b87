//! The unified surrogate's configuration: ratio level × trust-region shape × aggregation, plus
//! the options every peer offers (log-ratio clamp, KL penalty).
//!
//! Every objective is `loss = agg(−f(ρ)·A) + β·agg(k)`, where `ρ` is chosen by [`RatioLevel`]
//! and `f` by [`TrustRegion`]. [`crate::Sapo`], [`crate::Gspo`] and [`crate::Grpo`] are presets of
//! this one configuration.

use crate::aggregation::Aggregation;
use crate::entropy::EntropyBonus;
use crate::error::{check_config, Result};
use crate::kl::KlPenalty;
use crate::losses::bypass::Bypass;
use crate::losses::masks::PolicyMasks;
use crate::losses::ratio::{RatioLevel, DEFAULT_LOG_RATIO_CLAMP};
use crate::losses::trust_region::TrustRegion;

/// Full configuration of the unified surrogate. Build it into a [`PolicyLoss`](crate::PolicyLoss) with
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
    /// Upper clamp on `log s` at the sequence levels (verl's GSPO: 10), finite and > 0; `None`:
    /// none.
    pub seq_log_ratio_max: Option<f64>,
    /// How per-token policy losses become a scalar.
    pub aggregation: Aggregation,
    /// Optional KL penalty to a reference policy.
    pub kl: Option<KlPenalty>,
    /// Optional entropy bonus `− c·agg(H)`. With [`PolicyLoss::forward`](crate::PolicyLoss::forward) it needs the per-token
    /// entropy ([`crate::PolicyInputs::with_entropy`], e.g. from
    /// [`crate::token_log_probs_and_entropy`]); with [`PolicyLoss::forward_from_hidden`](crate::PolicyLoss::forward_from_hidden) leave
    /// `entropy` unset: it is computed from the hidden states with the log-probs (passing one
    /// is an error there).
    pub entropy: Option<EntropyBonus>,
    /// verl's bypass mode: the rollout correction run by the loss itself.
    pub bypass: Option<Bypass>,
    /// The masks inside the policy loss (OPSM, top-entropy tokens, M2PO); all off by default.
    pub masks: PolicyMasks,
}

impl PolicyLossConfig {
    /// A configuration with verl's log-ratio clamp (20), no sequence clamp, `token-mean` and no
    /// KL penalty.
    ///
    /// ```
    /// use sapo::{PolicyLossConfig, RatioLevel, TrustRegion};
    /// let cfg = PolicyLossConfig::new(RatioLevel::Token, TrustRegion::Unclipped);
    /// assert_eq!(cfg.log_ratio_clamp, Some(20.0));
    /// ```
    pub fn new(ratio_level: RatioLevel, trust_region: TrustRegion) -> Self {
        Self {
            ratio_level,
            trust_region,
            log_ratio_clamp: Some(DEFAULT_LOG_RATIO_CLAMP),
            seq_log_ratio_max: None,
            aggregation: Aggregation::TokenMean,
            kl: None,
            entropy: None,
            bypass: None,
            masks: PolicyMasks::default(),
        }
    }
    /// Sets the ratio level (token `ρ`, sequence `s`, GSPO-token).
    ///
    /// ```
    /// let cfg = sapo::Grpo::default().config().with_ratio_level(sapo::RatioLevel::Sequence);
    /// assert_eq!(cfg.ratio_level, sapo::RatioLevel::Sequence);
    /// ```
    pub fn with_ratio_level(mut self, ratio_level: RatioLevel) -> Self {
        self.ratio_level = ratio_level;
        self
    }
    /// Sets (or with `None` disables) the token log-ratio clamp `δ = clamp(ℓ − ℓold, −c, c)`.
    ///
    /// ```
    /// let trl = sapo::Sapo::default().config().with_log_ratio_clamp(None);
    /// assert_eq!(trl.log_ratio_clamp, None);
    /// ```
    pub fn with_log_ratio_clamp(mut self, clamp: Option<f64>) -> Self {
        self.log_ratio_clamp = clamp;
        self
    }
    /// Sets (or with `None` disables) the upper clamp `log s ≤ s_max` on the sequence log-ratio.
    ///
    /// ```
    /// let trl = sapo::Gspo::default().config().with_seq_log_ratio_max(None);
    /// assert_eq!(trl.seq_log_ratio_max, None);
    /// ```
    pub fn with_seq_log_ratio_max(mut self, max: Option<f64>) -> Self {
        self.seq_log_ratio_max = max;
        self
    }
    /// Sets the aggregation of the policy term.
    ///
    /// ```
    /// let dapo = sapo::Grpo::default().config().with_aggregation(sapo::Aggregation::TokenMean);
    /// assert_eq!(dapo.aggregation, sapo::Aggregation::TokenMean);
    /// ```
    pub fn with_aggregation(mut self, aggregation: Aggregation) -> Self {
        self.aggregation = aggregation;
        self
    }
    /// Adds (or with `None` removes) a KL penalty `β·agg(k(ℓ, ℓref))`.
    ///
    /// ```
    /// let kl = Some(sapo::KlPenalty::new(0.04, sapo::KlEstimator::K3));
    /// assert_eq!(sapo::Sapo::default().config().with_kl(kl).kl, kl);
    /// ```
    pub fn with_kl(mut self, kl: Option<KlPenalty>) -> Self {
        self.kl = kl;
        self
    }
    /// Adds (or with `None` removes) an entropy bonus `− c·agg(H)`.
    ///
    /// ```
    /// let bonus = Some(sapo::EntropyBonus::new(0.001));
    /// assert_eq!(sapo::Grpo::default().config().with_entropy(bonus).entropy, bonus);
    /// ```
    pub fn with_entropy(mut self, entropy: Option<EntropyBonus>) -> Self {
        self.entropy = entropy;
        self
    }
    /// Turns verl's bypass mode on (or with `None` off); see [`Bypass`].
    ///
    /// ```
    /// let cfg = sapo::Bypass::reinforce(sapo::RolloutCorrection::new());
    /// assert!(cfg.bypass.is_some());
    /// ```
    pub fn with_bypass(mut self, bypass: Option<Bypass>) -> Self {
        self.bypass = bypass;
        self
    }
    /// Sets the masks inside the policy loss (OPSM, top-entropy tokens, M2PO); see
    /// [`PolicyMasks`].
    ///
    /// ```
    /// let masks = sapo::PolicyMasks::default().with_m2_threshold(0.04);
    /// assert_eq!(sapo::Grpo::default().config().with_masks(masks).masks, masks);
    /// ```
    pub fn with_masks(mut self, masks: PolicyMasks) -> Self {
        self.masks = masks;
        self
    }
    /// Whether the loss reads `entropy` (the bonus or the top-entropy selection).
    pub(crate) fn reads_entropy(&self) -> bool {
        self.entropy.is_some() || self.masks.top_entropy_quantile.is_some()
    }
    /// Checks every parameter; see [`crate::Error::InvalidConfig`].
    ///
    /// ```
    /// let cfg = sapo::Sapo::default().config().with_log_ratio_clamp(Some(-1.0));
    /// assert!(cfg.validate().is_err());
    /// ```
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
            // s = 1 (on-policy) must pass the bound: a bound ≤ 0 would clip every sequence.
            check_config(
                m.is_finite() && m > 0.0,
                "seq_log_ratio_max",
                "finite and > 0",
                m,
            )?;
        }
        self.aggregation.validate()?;
        if let Some(kl) = &self.kl {
            kl.validate()?;
        }
        if let Some(entropy) = &self.entropy {
            entropy.validate()?;
        }
        if let Some(bypass) = &self.bypass {
            bypass.validate(&self.trust_region)?;
        }
        self.masks.validate()?;
        // OPSM's and the top-entropy selection's factor multiplies the rollout weights, which an
        // objective whose weights do not multiply its per-token loss (VESPO's enter its sequence
        // weight) cannot take.
        if self.masks.keeps() && !self.trust_region.objective().weights_multiply() {
            let (arg, value) = match self.masks.off_policy_threshold {
                Some(d) => ("off_policy_mask_threshold", d),
                None => (
                    "top_entropy_quantile",
                    self.masks.top_entropy_quantile.unwrap_or_default(),
                ),
            };
            check_config(
                false,
                arg,
                "None with VESPO (its rollout weights enter its sequence weight)",
                value,
            )?;
        }
        // The objectives whose formula is per token (they weigh ℓ by a token quantity).
        check_config(
            !self.trust_region.objective().token_only() || self.ratio_level == RatioLevel::Token,
            "ratio_level",
            "RatioLevel::Token for GPG, DRO, KL-Cov, DPPO, VESPO, TOPR and Clip-Cov",
            self.ratio_level,
        )?;
        Ok(())
    }
}
