//! The objectives the examples train (`digits`, `study`, `smollm`), each with the papers'
//! defaults from the crate's presets.

use sapo::{KlEstimator, KlPenalty, PolicyLoss, RatioLevel};

/// The objectives the examples train, with the papers' defaults from the crate's presets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Objective {
    Sapo,
    /// SAPO's gate on the sequence ratio (the paper's sequence-level variant).
    SapoSeq,
    Gspo,
    Grpo,
    Cispo,
    Gmpo,
    Dppo,
    Vespo,
}

impl Objective {
    pub const ALL: [Objective; 8] = [
        Self::Sapo,
        Self::SapoSeq,
        Self::Gspo,
        Self::Grpo,
        Self::Cispo,
        Self::Gmpo,
        Self::Dppo,
        Self::Vespo,
    ];
    pub fn name(self) -> &'static str {
        match self {
            Self::Sapo => "sapo",
            Self::SapoSeq => "sapo-seq",
            Self::Gspo => "gspo",
            Self::Grpo => "grpo",
            Self::Cispo => "cispo",
            Self::Gmpo => "gmpo",
            Self::Dppo => "dppo",
            Self::Vespo => "vespo",
        }
    }
    pub fn from_name(name: &str) -> Option<Objective> {
        Self::ALL.into_iter().find(|o| o.name() == name)
    }
    /// The loss: the preset's defaults, SAPO's temperatures from `sapo` (for both SAPO forms),
    /// and a k3 KL penalty to the initial policy when `kl_coef > 0`.
    pub fn loss(self, sapo: sapo::Sapo, kl_coef: f64) -> sapo::error::Result<PolicyLoss> {
        let config = match self {
            Self::Sapo => sapo.config(),
            Self::SapoSeq => sapo.config().with_ratio_level(RatioLevel::Sequence),
            Self::Gspo => sapo::Gspo::default().config(),
            Self::Grpo => sapo::Grpo::default().config(),
            Self::Cispo => sapo::Cispo::default().config(),
            Self::Gmpo => sapo::Gmpo::default().config(),
            Self::Dppo => sapo::Dppo::new(sapo::Divergence::BinaryTv, 0.15, 0.15, 3.0).config(),
            Self::Vespo => sapo::Vespo::default().config(),
        };
        let kl = (kl_coef > 0.0).then(|| KlPenalty::new(kl_coef, KlEstimator::K3));
        config.with_kl(kl).build()
    }
}
