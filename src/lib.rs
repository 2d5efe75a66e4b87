#![doc = include_str!("../README.md")]
#![warn(missing_docs)]

pub mod advantages;
pub mod aggregation;
mod checks;
pub mod entropy;
pub mod error;
#[doc = include_str!("../docs/formulas.md")]
pub mod formulas {}
pub mod gate;
pub use gate::GateFunction;
mod kernels;
pub mod kl;
pub mod linear_logprobs;
mod lm_head;
pub mod logprobs;
pub mod losses;
mod order_statistics;
mod piecewise;
mod pool;
pub mod real;
pub mod reward;
pub mod rollout_correction;
#[cfg(feature = "gpu-sim")]
#[doc(hidden)]
pub mod simulation;
mod softmax;
pub mod value_loss;
mod vectorize;

pub use advantages::{
    group_advantages, group_advantages_vec, token_advantages, AdvantageEstimator, Groups,
    TokenAdvantageInputs, TokenAdvantages, TokenEstimator,
};
pub use aggregation::{aggregate, Aggregation, Normalizer};
pub use entropy::{AdaptiveEntropy, EntropyBonus};
// `Result` stays in `sapo::error`: a glob import (`use sapo::*`, as the README's examples do)
// must not shadow the prelude's `Result`.
pub use error::Error;
pub use kernels::Backend;
pub use kl::{kl_penalty, KlEstimator, KlPenalty};
pub use linear_logprobs::{
    linear_log_probs_and_entropy, linear_log_probs_and_entropy_with, LmHead,
};
pub use logprobs::{
    token_log_probs, token_log_probs_and_entropy, token_log_probs_and_entropy_with,
};
// Every public item of `losses` (an objective's config type is re-exported once, in
// `losses/mod.rs`).
pub use losses::*;
pub use rollout_correction::{
    rollout_correction, FilterDivergence, FilterStatistic, ImportanceWeights, RejectionFilter,
    RolloutCorrection, RolloutCorrectionOutput, WeightLevel, WeightMode,
};
pub use value_loss::{ValueLoss, ValueLossOutput};
