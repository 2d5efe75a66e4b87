//! The policy-optimization objectives: one surrogate `loss = −f(ρ)·Â`, parametrized by the ratio
//! level ([`RatioLevel`]) and the trust-region shape ([`TrustRegion`]), with [`Sapo`], [`Gspo`]
//! and [`Grpo`] as presets carrying the papers' defaults.
//! Every formula, with the peer it matches: [the formulas page](crate::formulas).
//!
//! | file | what |
//! |---|---|
//! | `policy_loss.rs` | [`PolicyLoss`]: the one dispatch point (fused kernel or composed ops) and the composed path |
//! | `config.rs` | [`PolicyLossConfig`]: ratio level × trust region × aggregation × KL |
//! | `ratio.rs` | [`RatioLevel`] and the ratio formulas (token, sequence, GSPO-token) |
//! | `objective.rs` | the `Objective` trait every objective implements, and the token it sees |
//! | `trust_region.rs` | [`TrustRegion`]: the enum a user configures and the one dispatch to its objective |
//! | `soft_gate.rs`, `clip.rs`, `unclipped.rs`, `policy_gradient.rs`, `cispo.rs`, `dro.rs`, `kl_cov.rs`, `dppo.rs`, `vespo.rs`, `gmpo.rs`, `topr.rs`, `clip_cov.rs`, `gate_family.rs` | one objective each, its device function in `<name>.h` beside it |
//! | `chain.rs` | the per-token chain the CPU kernels run (ratio, objective, weight, gradient, KL) |
//! | `bypass.rs` | verl's bypass mode ([`Bypass`]) |
//! | `masks.rs` | the masks inside the policy loss ([`PolicyMasks`]: OPSM, top-entropy tokens, M2PO), one host pre-pass |
//! | `presets.rs` | [`Sapo`], [`Gspo`], [`Grpo`], [`Cispo`], [`Gmpo`], [`Gpg`], [`Luspo`] (and the shapes that are presets themselves) |
//! | `inputs.rs` | [`PolicyInputs`] and their checks |
//! | `metrics.rs` | [`PolicyMetrics`] (on the device), [`MetricSums`] (on the host) |
//!
//! Each formula has a tensor form (the composed path) and a scalar form (what the kernels run)
//! side by side in its concept's file. Adding an objective: `docs/adding-an-objective.md` (the
//! layers and the five files it touches).
//!
//! ```
//! use sapo::losses::{PolicyLossConfig, RatioLevel, TrustRegion};
//! // Sequence-level SAPO (the paper's bridge to GSPO):
//! let loss = sapo::losses::Sapo::default().config().with_ratio_level(RatioLevel::Sequence).build()?;
//! # Ok::<(), sapo::Error>(())
//! ```

pub(crate) mod bypass;
pub(crate) mod chain;
pub(crate) mod checks;
pub(crate) mod cispo;
pub(crate) mod clip;
pub(crate) mod clip_cov;
pub(crate) mod config;
pub(crate) mod dppo;
pub(crate) mod dro;
pub(crate) mod gate_family;
pub(crate) mod gmpo;
pub(crate) mod gradient_weights;
pub(crate) mod inputs;
pub(crate) mod kl_cov;
pub(crate) mod masks;
pub(crate) mod metrics;
pub(crate) mod objective;
pub(crate) mod policy_gradient;
pub(crate) mod policy_loss;
pub(crate) mod presets;
pub(crate) mod ratio;
pub(crate) mod soft_gate;
pub(crate) mod topr;
pub(crate) mod trust_region;
pub(crate) mod unclipped;
pub(crate) mod vespo;

pub use bypass::{Bypass, BypassLoss};
pub use cispo::IsWeightClip;
pub use clip::HardClip;
pub use clip_cov::ClipCov;
pub use config::PolicyLossConfig;
pub use dppo::{Divergence, Dppo};
pub use dro::Dro;
pub use gmpo::GeometricClip;
pub use gradient_weights::{
    GradientWeightSummary, GradientWeights, ACTIVE_WEIGHT, SILENCED_WEIGHT,
};
pub use inputs::PolicyInputs;
pub use kl_cov::KlCov;
pub use masks::{m2po_reduced_mask, PolicyMasks};
pub use metrics::{MetricSums, PolicyMetrics};
pub use policy_loss::{LogProbsSource, PolicyLoss, PolicyLossOutput};
pub use presets::{Cispo, Gmpo, Gpg, Grpo, Gspo, Luspo, Sapo};
pub use ratio::{RatioLevel, DEFAULT_LOG_RATIO_CLAMP, GSPO_SEQ_LOG_RATIO_MAX};
pub use topr::Topr;
pub use trust_region::TrustRegion;
pub use vespo::{Vespo, VESPO_LOG_W_MAX, VESPO_LOG_W_MIN};
