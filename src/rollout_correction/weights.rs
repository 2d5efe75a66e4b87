//! The importance weights (token or sequence; truncated or masked; batch-normalized) and
//! their diagnostics.

use std::collections::BTreeMap;

use super::batch::{fraction, max_of, mean, min_of, sample_std, Batch};
use super::config::*;
use crate::aggregation::COUNT_GUARD;
use crate::error::{Error, Result};

type Metrics = BTreeMap<String, f64>;

fn put(metrics: &mut Metrics, key: &str, value: f64) {
    metrics.insert(key.to_string(), value);
}

/// `[r op bound]` as 0/1 per token.
fn indicator(raw: &[f64], pred: impl Fn(f64) -> bool) -> Vec<f64> {
    raw.iter().map(|&r| f64::from(u8::from(pred(r)))).collect()
}

impl Batch {
    /// The importance weights and their metrics.
    pub(super) fn weights(
        &self,
        config: &ImportanceWeights,
        metrics: &mut Metrics,
    ) -> Result<Vec<f64>> {
        let raw = self.raw_weights(config.level);
        let w: Vec<f64> = match config.mode {
            WeightMode::Truncate { upper } => raw.iter().map(|r| r.min(upper)).collect(),
            WeightMode::Mask { lower, upper } => raw
                .iter()
                .map(|&r| if r >= lower && r <= upper { r } else { 0.0 })
                .collect(),
        };
        put(metrics, "rollout_is_mean", self.masked_mean(&w));
        self.bound_metrics(config, &raw, &w, metrics);
        self.spread_metrics(config, &raw, &w, metrics)?;
        Ok(if config.batch_normalize {
            self.batch_normalized(config.level, w, metrics)
        } else {
            w
        })
    }

    /// `exp(d̃)·m` per token, or `exp(clamp(S_i))·m` per sequence.
    fn raw_weights(&self, level: WeightLevel) -> Vec<f64> {
        match level {
            WeightLevel::Token => self
                .d
                .iter()
                .zip(&self.m)
                .map(|(d, m)| self.clamped(*d).exp() * m)
                .collect(),
            WeightLevel::Sequence => (0..self.b * self.t)
                .map(|j| self.clamped(self.sums[j / self.t]).exp() * self.m[j])
                .collect(),
        }
    }

    /// The extremes and the fractions beyond the bounds, at the weights' level.
    fn bound_metrics(
        &self,
        config: &ImportanceWeights,
        raw: &[f64],
        w: &[f64],
        metrics: &mut Metrics,
    ) {
        let (upper, lower) = (config.mode.upper(), config.mode.metric_lower());
        match config.level {
            WeightLevel::Sequence => {
                put(
                    metrics,
                    "rollout_is_max",
                    max_of(&self.sums).min(self.clamp).exp(),
                );
                put(metrics, "rollout_is_min", min_of(&self.sums).exp());
                let high = fraction(&self.sums, |s| s > upper.ln());
                put(metrics, "rollout_is_ratio_fraction_high", high);
                let low = fraction(&self.sums, |s| s < lower.ln());
                put(metrics, "rollout_is_ratio_fraction_low", low);
            }
            WeightLevel::Token => {
                let high = self.masked_mean(&indicator(raw, |r| r > upper));
                put(metrics, "rollout_is_ratio_fraction_high", high);
                let low = self.masked_mean(&indicator(raw, |r| r < lower));
                put(metrics, "rollout_is_ratio_fraction_low", low);
                let max = self.unmasked(w).fold(f64::NEG_INFINITY, f64::max);
                put(metrics, "rollout_is_max", max);
                let min = self.unmasked(w).fold(f64::INFINITY, f64::min);
                put(metrics, "rollout_is_min", min);
            }
        }
    }

    /// The spread: standard deviation, effective sample size, the rows' means and the
    /// out-of-bounds share of the mask mode. Errors when every weight is 0.
    fn spread_metrics(
        &self,
        config: &ImportanceWeights,
        raw: &[f64],
        w: &[f64],
        metrics: &mut Metrics,
    ) -> Result<()> {
        let (upper, lower) = (config.mode.upper(), config.mode.metric_lower());
        put(metrics, "rollout_is_std", self.clamped_std(w, 0.0, upper));
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
        put(metrics, "rollout_is_eff_sample_size", 1.0 / second);
        let seq = self.row_means(w);
        put(metrics, "rollout_is_seq_mean", mean(&seq));
        put(metrics, "rollout_is_seq_std", sample_std(&seq));
        put(metrics, "rollout_is_seq_max", max_of(&seq));
        put(metrics, "rollout_is_seq_min", min_of(&seq));
        let deviation = seq
            .iter()
            .map(|v| (v - 1.0).abs())
            .fold(f64::NEG_INFINITY, f64::max);
        put(metrics, "rollout_is_seq_max_deviation", deviation);
        let raw_seq = self.row_means(raw);
        put(
            metrics,
            "rollout_is_seq_fraction_high",
            fraction(&raw_seq, |v| v > upper),
        );
        put(
            metrics,
            "rollout_is_seq_fraction_low",
            fraction(&raw_seq, |v| v < lower),
        );
        if let WeightMode::Mask { lower, upper } = config.mode {
            let out = self.masked_mean(&indicator(raw, |r| r < lower || r > upper));
            put(metrics, "rollout_is_oob_ratio", out);
        }
        Ok(())
    }

    /// `w/μ_w` (token: the mean over unmasked tokens; sequence: the mean of the row means), or
    /// `w` when `μ_w` is too small.
    fn batch_normalized(&self, level: WeightLevel, w: Vec<f64>, metrics: &mut Metrics) -> Vec<f64> {
        let mu = match level {
            WeightLevel::Token => self.masked_mean(&w),
            WeightLevel::Sequence => {
                let rows = self.valid_rows(&self.row_means(&w));
                rows.iter().sum::<f64>() / (rows.len() as f64).max(COUNT_GUARD)
            }
        };
        if mu > COUNT_GUARD {
            put(metrics, "rollout_is_batch_norm_factor", mu);
            w.iter().map(|v| v / mu).collect()
        } else {
            put(metrics, "rollout_is_batch_norm_factor", 1.0);
            w
        }
    }
}
