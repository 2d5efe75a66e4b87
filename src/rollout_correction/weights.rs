//! The importance weights (token or sequence; truncated or masked; batch-normalized) and
//! their diagnostics.

use std::collections::BTreeMap;

use super::batch::{fraction, max_of, mean, min_of, sample_std, Batch};
use super::config::*;
use crate::error::{Error, Result};

impl Batch {
    /// The importance weights and their metrics.
    pub(super) fn weights(
        &self,
        config: &ImportanceWeights,
        metrics: &mut BTreeMap<String, f64>,
    ) -> Result<Vec<f64>> {
        let mut put = |k: &str, v: f64| metrics.insert(k.to_string(), v);
        let upper = config.mode.upper();
        let lower = config.mode.metric_lower();
        let raw: Vec<f64> = match config.level {
            WeightLevel::Token => self
                .d
                .iter()
                .zip(&self.m)
                .map(|(d, m)| self.clamped(*d).exp() * m)
                .collect(),
            WeightLevel::Sequence => (0..self.b * self.t)
                .map(|j| self.clamped(self.sums[j / self.t]).exp() * self.m[j])
                .collect(),
        };
        let w: Vec<f64> = match config.mode {
            WeightMode::Truncate { upper } => raw.iter().map(|r| r.min(upper)).collect(),
            WeightMode::Mask { lower, upper } => raw
                .iter()
                .map(|&r| if r >= lower && r <= upper { r } else { 0.0 })
                .collect(),
        };
        put("rollout_is_mean", self.masked_mean(&w));
        match config.level {
            WeightLevel::Sequence => {
                put("rollout_is_max", max_of(&self.sums).min(self.clamp).exp());
                put("rollout_is_min", min_of(&self.sums).exp());
                put(
                    "rollout_is_ratio_fraction_high",
                    fraction(&self.sums, |s| s > upper.ln()),
                );
                put(
                    "rollout_is_ratio_fraction_low",
                    fraction(&self.sums, |s| s < lower.ln()),
                );
            }
            WeightLevel::Token => {
                let above: Vec<f64> = raw
                    .iter()
                    .map(|&r| f64::from(u8::from(r > upper)))
                    .collect();
                let below: Vec<f64> = raw
                    .iter()
                    .map(|&r| f64::from(u8::from(r < lower)))
                    .collect();
                put("rollout_is_ratio_fraction_high", self.masked_mean(&above));
                put("rollout_is_ratio_fraction_low", self.masked_mean(&below));
                put(
                    "rollout_is_max",
                    self.unmasked(&w).fold(f64::NEG_INFINITY, f64::max),
                );
                put(
                    "rollout_is_min",
                    self.unmasked(&w).fold(f64::INFINITY, f64::min),
                );
            }
        }
        put("rollout_is_std", self.clamped_std(&w, 0.0, upper));
        let truncated: Vec<f64> = w.iter().map(|v| v.max(0.0).min(upper)).collect();
        let mu = self.masked_mean(&truncated);
        let normalized: Vec<f64> = truncated
            .iter()
            .map(|v| (v / (mu + COUNT_GUARD)).powi(2))
            .collect();
        let second = self.masked_mean(&normalized);
        if second <= 0.0 {
            return Err(Error::InvalidValue {
                arg: "old_log_probs",
                expected: "at least one non-zero importance weight (the effective sample size divides by their mean)".into(),
                actual: "every weight is 0 (the mask mode rejected every token)".into(),
            });
        }
        put("rollout_is_eff_sample_size", 1.0 / second);
        let seq = self.row_means(&w);
        put("rollout_is_seq_mean", mean(&seq));
        put("rollout_is_seq_std", sample_std(&seq));
        put("rollout_is_seq_max", max_of(&seq));
        put("rollout_is_seq_min", min_of(&seq));
        put(
            "rollout_is_seq_max_deviation",
            seq.iter()
                .map(|v| (v - 1.0).abs())
                .fold(f64::NEG_INFINITY, f64::max),
        );
        let raw_seq = self.row_means(&raw);
        put(
            "rollout_is_seq_fraction_high",
            fraction(&raw_seq, |v| v > upper),
        );
        put(
            "rollout_is_seq_fraction_low",
            fraction(&raw_seq, |v| v < lower),
        );
        if let WeightMode::Mask { lower, upper } = config.mode {
            let out: Vec<f64> = raw
                .iter()
                .map(|&r| f64::from(u8::from(r < lower || r > upper)))
                .collect();
            put("rollout_is_oob_ratio", self.masked_mean(&out));
        }
        if !config.batch_normalize {
            return Ok(w);
        }
        let mu = match config.level {
            WeightLevel::Token => self.masked_mean(&w),
            WeightLevel::Sequence => {
                let rows = self.valid_rows(&seq);
                rows.iter().sum::<f64>() / (rows.len() as f64).max(COUNT_GUARD)
            }
        };
        if mu > COUNT_GUARD {
            put("rollout_is_batch_norm_factor", mu);
            Ok(w.iter().map(|v| v / mu).collect())
        } else {
            put("rollout_is_batch_norm_factor", 1.0);
            Ok(w)
        }
    }
}
