#![doc = include_str!("../README.md")]
#![warn(missing_docs)]

pub mod advantages;
pub mod aggregation;
pub mod config;
pub mod error;
pub mod gate;
mod inputs;
mod kernels;
pub mod kl;
pub mod logprobs;
pub mod metrics;
pub mod presets;
pub mod surrogate;

pub use advantages::{group_advantages, group_advantages_vec, AdvantageEstimator, Groups};
pub use aggregation::{aggregate, Aggregation, Normalizer};
pub use config::{HardClip, PolicyLossConfig, RatioLevel, TrustRegion};
pub use error::{Error, Result};
pub use inputs::PolicyInputs;
pub use kernels::Backend;
pub use kl::{kl_penalty, KlEstimator, KlPenalty};
pub use logprobs::{
    token_log_probs, token_log_probs_and_entropy, token_log_probs_and_entropy_with,
};
pub use metrics::{MetricSums, PolicyMetrics};
pub use presets::{Grpo, Gspo, Sapo};
pub use surrogate::{PolicyLoss, PolicyLossOutput};
