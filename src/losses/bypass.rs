//! verl's bypass mode (`bypass_mode`): `old_log_probs` are the rollout engine's, and the rollout
//! correction runs inside the loss, between the current policy (detached) and the engine.
//!
//! ```text
//! (w, m') = rollout_correction(ℓ (detached), ℓold, m)
//! reinforce: l = −w·A·ℓ on m'      (w = 1 without importance weights; approx_kl over m')
//! ppo_clip:  GRPO's clipped loss on m', without w
//! ```
//!
//! The correction's metrics come back in [`crate::PolicyLossOutput::rollout_correction`].

use crate::error::{check_config, Result};
use crate::losses::trust_region::TrustRegion;
use crate::rollout_correction::config::RolloutCorrection;

/// The loss bypass mode computes on the corrected batch (verl `loss_type`).
///
/// ```
/// assert_ne!(sapo::BypassLoss::Reinforce, sapo::BypassLoss::PpoClip);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BypassLoss {
    /// `l = −w·A·ℓ` ([`TrustRegion::PolicyGradient`]).
    Reinforce,
    /// PPO's clip on the token ratio ([`TrustRegion::HardClip`]), the weights unused.
    PpoClip,
}

/// Bypass mode: the rollout correction applied by the loss itself.
///
/// ```
/// use sapo::{Bypass, HardClip, ImportanceWeights, RolloutCorrection, WeightLevel, WeightMode};
/// let tis = RolloutCorrection::new()
///     .with_importance_weights(ImportanceWeights::new(WeightLevel::Token, WeightMode::Truncate { upper: 2.0 }));
/// let reinforce = Bypass::reinforce(tis).build()?;
/// let ppo = Bypass::ppo_clip(tis, HardClip::new(0.2, 0.28).with_dual_clip(3.0)).build()?;
/// # Ok::<(), sapo::Error>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Bypass {
    /// The correction between the current policy and the engine.
    pub correction: RolloutCorrection,
    /// REINFORCE or PPO-clip.
    pub loss: BypassLoss,
}

impl Bypass {
    /// Checks the correction and that the trust region is the loss's (`PolicyGradient` for
    /// REINFORCE, `HardClip` for PPO-clip).
    ///
    /// ```
    /// let bad = sapo::Sapo::default().config().with_bypass(Some(sapo::Bypass {
    ///     correction: sapo::RolloutCorrection::new(),
    ///     loss: sapo::BypassLoss::Reinforce,
    /// }));
    /// assert!(bad.validate().is_err());
    /// ```
    pub fn validate(&self, trust_region: &TrustRegion) -> Result<()> {
        self.correction.validate()?;
        let matches = match self.loss {
            BypassLoss::Reinforce => *trust_region == TrustRegion::PolicyGradient,
            BypassLoss::PpoClip => matches!(trust_region, TrustRegion::HardClip(_)),
        };
        check_config(
            matches,
            "bypass.loss",
            "Reinforce with TrustRegion::PolicyGradient, PpoClip with TrustRegion::HardClip",
            self.loss,
        )
    }
}
