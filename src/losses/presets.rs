//! The papers' objectives as presets of the unified surrogate.
//!
//! | preset | ratio | trust region | aggregation | defaults |
//! |---|---|---|---|---|
//! | [`Sapo`] | token | soft gate | seq-mean-token-mean | τ_pos 1.0, τ_neg 1.05, clamp 20 |
//! | [`Gspo`] | sequence | hard clip | seq-mean-token-mean | ε 3e-4 / 4e-4, log s ≤ 10 |
//! | [`Grpo`] | token | hard clip | seq-mean-token-mean | ε 0.2 / 0.2, clamp 20 |
//! | [`Cispo`] | token | CISPO's detached clipped weight × `ℓ` | token-mean | TRL: `min(ρ, 5)`, no clamp |
//! | [`Gmpo`] | sequence (geometric mean) | sign-aware log clip | seq-mean (all rows) | ε 0.4 / 0.4, no clamp |
//! | [`Gpg`] | — | none, `−A·ℓ` | token-mean | |
//! | [`Dro`] | — | `−(A·ℓ − ½β(ℓ−ℓold)²)` | token-mean | β (required) |
//! | [`KlCov`] | token | none + `κ·|ℓ−ℓold|` on the top-covariance tokens | token-mean | ratio 2e-4, κ 0.1, no clamp |
//! | [`Dppo`] | token | binary TV / KL region, `−A·sg[min(ρ,C)]·ℓ` | token-mean | clamp 20 |
//! | [`Vespo`] | token | gamma sequence weight × `ℓ` | token-mean | (k, λ) (2, 3) / (3, 2), clamp 20 |
//! | [`Luspo`] | sequence | hard clip | seq-mean-token-sum | ε 3e-4 / 4e-4, no clamp |
//! | [`ClipCov`] | token | hard clip, the loss of a seeded draw of high-covariance tokens × 0 | token-mean | ε 0.2 / 0.2, ratio 2e-4, band (1, 5), no clamp |
//! | [`Topr`] | token | `−w·A·ℓ`, `w = w₊` on rows with score > 0, else `w₋·sg[min(ρ,1)]` | seq-mean-token-sum | w₊ = w₋ = 1, no clamp |
//!
//! verl's bypass mode is built by [`crate::Bypass::reinforce`] and [`crate::Bypass::ppo_clip`].
//!
//! Each converts into a [`PolicyLossConfig`] (to change the aggregation, add a KL penalty, ...)
//! or builds a [`PolicyLoss`] directly.

use crate::aggregation::Aggregation;
use crate::error::Result;
use crate::gate::GateFunction;
use crate::losses::bypass::{Bypass, BypassLoss};
use crate::losses::cispo::IsWeightClip;
use crate::losses::clip::HardClip;
use crate::losses::clip_cov::ClipCov;
use crate::losses::config::PolicyLossConfig;
use crate::losses::dppo::Dppo;
use crate::losses::dro::Dro;
use crate::losses::gmpo::GeometricClip;
use crate::losses::kl_cov::KlCov;
use crate::losses::policy_loss::PolicyLoss;
use crate::losses::ratio::DEFAULT_LOG_RATIO_CLAMP;
use crate::losses::ratio::{RatioLevel, GSPO_SEQ_LOG_RATIO_MAX};
use crate::losses::topr::Topr;
use crate::losses::trust_region::TrustRegion;
use crate::losses::vespo::Vespo;
use crate::rollout_correction::RolloutCorrection;

/// `config()` and `build()` of a preset that converts into a [`PolicyLossConfig`].
macro_rules! preset_methods {
    ($preset:ident) => {
        preset_methods!(
            $preset,
            concat!("sapo::", stringify!($preset), "::default()")
        );
    };
    ($preset:ident, $example:expr) => {
        impl $preset {
            /// The full configuration, to adjust further.
            ///
            /// ```
            #[doc = concat!("let cfg = ", $example, ".config();")]
            /// assert!(cfg.validate().is_ok());
            /// ```
            pub fn config(self) -> PolicyLossConfig {
                self.into()
            }
            /// Validates and builds the loss.
            ///
            /// ```
            #[doc = concat!("let loss = ", $example, ".build()?;")]
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
    /// The gate function (the paper's sigmoid; [`GateFunction`]).
    pub gate: GateFunction,
}

impl Default for Sapo {
    fn default() -> Self {
        Self {
            tau_pos: 1.0,
            tau_neg: 1.05,
            gate: GateFunction::Sigmoid,
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
                gate: s.gate,
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

/// CISPO (MiniMax-M1): `l = −sg[clip_w(ρ)]·A·ℓ`, `token-mean`. The default is TRL/Liger's
/// `min(ρ, ε_max)` with ScaleRL's `ε_max = 5` and no log-ratio clamp; verl's convention is
/// [`IsWeightClip::Bounds`] (its preset sets verl's clamp of 20).
///
/// ```
/// let trl = sapo::Cispo::default().build()?;
/// let verl = sapo::Cispo { clip: sapo::IsWeightClip::Bounds { eps_low: 0.2, eps_high: 0.28 } }.config();
/// assert_eq!(verl.log_ratio_clamp, Some(20.0));
/// # Ok::<(), sapo::Error>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Cispo {
    /// The clip of the detached weight.
    pub clip: IsWeightClip,
}

impl Default for Cispo {
    fn default() -> Self {
        Self {
            clip: IsWeightClip::RatioMax(5.0),
        }
    }
}

preset_methods!(Cispo);

impl From<Cispo> for PolicyLossConfig {
    fn from(c: Cispo) -> Self {
        let clamp = match c.clip {
            IsWeightClip::Bounds { .. } => Some(DEFAULT_LOG_RATIO_CLAMP),
            IsWeightClip::RatioMax(_) => None,
        };
        PolicyLossConfig::new(RatioLevel::Token, TrustRegion::Cispo(c.clip))
            .with_log_ratio_clamp(clamp)
    }
}

/// GMPO (verl `geo_mean`): the geometric mean of sign-aware clipped token ratios, one per
/// sequence, averaged over all rows (`seq-mean`); ε 0.4 / 0.4 (the paper's), no clamp.
///
/// ```
/// let loss = sapo::Gmpo::default().build()?;
/// assert_eq!(loss.config().aggregation, sapo::Aggregation::SeqMean);
/// # Ok::<(), sapo::Error>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Gmpo {
    /// The log-space clip.
    pub clip: GeometricClip,
}

impl Default for Gmpo {
    fn default() -> Self {
        Self {
            clip: GeometricClip {
                log_clip_low: 0.4,
                log_clip_high: 0.4,
            },
        }
    }
}

preset_methods!(Gmpo);

impl From<Gmpo> for PolicyLossConfig {
    fn from(g: Gmpo) -> Self {
        PolicyLossConfig::new(RatioLevel::Sequence, TrustRegion::GeometricClip(g.clip))
            .with_log_ratio_clamp(None)
            .with_aggregation(Aggregation::SeqMean)
    }
}

/// GPG (verl `gpg`): the plain policy gradient `l = −A·ℓ`, `token-mean`.
///
/// ```
/// let loss = sapo::Gpg.build()?;
/// # Ok::<(), sapo::Error>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Gpg;

preset_methods!(Gpg);

impl From<Gpg> for PolicyLossConfig {
    fn from(_: Gpg) -> Self {
        PolicyLossConfig::new(RatioLevel::Token, TrustRegion::PolicyGradient)
            .with_log_ratio_clamp(None)
    }
}

preset_methods!(Dro, "sapo::Dro { beta: 0.1 }");

impl From<Dro> for PolicyLossConfig {
    /// DRO (verl `dro`): `token-mean`, no clamp; `β` has no default (verl requires it).
    fn from(d: Dro) -> Self {
        PolicyLossConfig::new(RatioLevel::Token, TrustRegion::Dro(d)).with_log_ratio_clamp(None)
    }
}

impl Default for KlCov {
    /// verl's actor defaults: `kl_cov_ratio` 2e-4, `ppo_kl_coef` 0.1.
    fn default() -> Self {
        Self {
            ratio: 2e-4,
            coef: 0.1,
        }
    }
}

preset_methods!(KlCov);

impl From<KlCov> for PolicyLossConfig {
    /// KL-Cov (verl `kl_cov`): `token-mean`, no clamp.
    fn from(k: KlCov) -> Self {
        PolicyLossConfig::new(RatioLevel::Token, TrustRegion::KlCov(k)).with_log_ratio_clamp(None)
    }
}

preset_methods!(
    Dppo,
    "sapo::Dppo::new(sapo::Divergence::BinaryTv, 0.15, 0.15, 3.0)"
);

impl From<Dppo> for PolicyLossConfig {
    /// DPPO (verl `dppo_tv`/`dppo_kl`): `token-mean`, clamp 20 (the recipe's δ: 0.15 for TV,
    /// 0.05 for KL; `C` = verl's `clip_ratio_c`, 3 in its actor config, 10000 in the recipe).
    fn from(d: Dppo) -> Self {
        PolicyLossConfig::new(RatioLevel::Token, TrustRegion::Dppo(d))
    }
}

preset_methods!(Vespo);

impl From<Vespo> for PolicyLossConfig {
    /// VESPO (TRL `vespo`): `token-mean`, clamp 20.
    fn from(v: Vespo) -> Self {
        PolicyLossConfig::new(RatioLevel::Token, TrustRegion::Vespo(v))
    }
}

/// LUSPO (TRL `luspo`): GSPO's sequence loss weighted by the row's length, i.e. sequence ratio,
/// hard clip, `seq-mean-token-sum`, no clamp.
///
/// ```
/// let loss = sapo::Luspo::default().build()?;
/// assert_eq!(loss.config().aggregation, sapo::Aggregation::SeqMeanTokenSum);
/// # Ok::<(), sapo::Error>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Luspo {
    /// `ε_low` (3e-4).
    pub eps_low: f64,
    /// `ε_high` (4e-4).
    pub eps_high: f64,
}

impl Default for Luspo {
    fn default() -> Self {
        Self {
            eps_low: 3e-4,
            eps_high: 4e-4,
        }
    }
}

preset_methods!(Luspo);

impl From<Luspo> for PolicyLossConfig {
    fn from(l: Luspo) -> Self {
        PolicyLossConfig::new(
            RatioLevel::Sequence,
            TrustRegion::HardClip(HardClip::new(l.eps_low, l.eps_high)),
        )
        .with_log_ratio_clamp(None)
        .with_aggregation(Aggregation::SeqMeanTokenSum)
    }
}

preset_methods!(ClipCov);

impl From<ClipCov> for PolicyLossConfig {
    /// Clip-Cov (verl `clip_cov`): `token-mean`, no clamp.
    fn from(c: ClipCov) -> Self {
        PolicyLossConfig::new(RatioLevel::Token, TrustRegion::ClipCov(c)).with_log_ratio_clamp(None)
    }
}

impl Default for Topr {
    /// ROLL's defaults: both weights 1.
    fn default() -> Self {
        Self {
            positive_weight: 1.0,
            negative_weight: 1.0,
        }
    }
}

preset_methods!(Topr);

impl From<Topr> for PolicyLossConfig {
    /// TOPR (ROLL `pg_variant: topr`): token level, no clamp, `seq-mean-token-sum` (ROLL's TOPR
    /// example's `loss_agg_mode`).
    fn from(t: Topr) -> Self {
        PolicyLossConfig::new(RatioLevel::Token, TrustRegion::Topr(t))
            .with_log_ratio_clamp(None)
            .with_aggregation(Aggregation::SeqMeanTokenSum)
    }
}

/// The bypass mode's two losses as configurations (verl's `bypass_mode`).
impl Bypass {
    /// REINFORCE with the correction's weights and mask, `token-mean` (verl's actor default), no
    /// log-ratio clamp (its `approx_kl` is of the raw `ℓ − ℓold`).
    ///
    /// ```
    /// let cfg = sapo::Bypass::reinforce(sapo::RolloutCorrection::new());
    /// assert_eq!(cfg.trust_region, sapo::TrustRegion::PolicyGradient);
    /// ```
    pub fn reinforce(correction: RolloutCorrection) -> PolicyLossConfig {
        PolicyLossConfig::new(RatioLevel::Token, TrustRegion::PolicyGradient)
            .with_log_ratio_clamp(None)
            .with_bypass(Some(Self {
                correction,
                loss: BypassLoss::Reinforce,
            }))
    }
    /// PPO-clip on the correction's mask, `token-mean`, log-ratio clamp 20.
    ///
    /// ```
    /// let cfg = sapo::Bypass::ppo_clip(sapo::RolloutCorrection::new(), sapo::HardClip::new(0.2, 0.2));
    /// assert!(cfg.validate().is_ok());
    /// ```
    pub fn ppo_clip(correction: RolloutCorrection, clip: HardClip) -> PolicyLossConfig {
        PolicyLossConfig::new(RatioLevel::Token, TrustRegion::HardClip(clip))
            .with_aggregation(Aggregation::TokenMean)
            .with_bypass(Some(Self {
                correction,
                loss: BypassLoss::PpoClip,
            }))
    }
}
