//! The off-policy diagnostics: KL estimates, perplexities, χ².

use std::collections::BTreeMap;

use super::batch::{max_of, mean, min_of, Batch};

impl Batch {
    /// The off-policy diagnostics (every row counts).
    pub(super) fn off_policy(&self, metrics: &mut BTreeMap<String, f64>) {
        let mut put = |k: &str, v: f64| metrics.insert(k.to_string(), v);
        let train = self.row_means(&self.old);
        let roll = self.row_means(&self.roll);
        put(
            "training_ppl",
            mean(&train.iter().map(|v| (-v).exp()).collect::<Vec<_>>()),
        );
        put("training_log_ppl", -mean(&train));
        let diff_tokens: Vec<f64> = self
            .roll
            .iter()
            .zip(&self.old)
            .map(|(r, o)| r - o)
            .collect();
        put("kl", self.masked_mean(&diff_tokens));
        let k3: Vec<f64> = self.d.iter().map(|&d| d.exp() - d - 1.0).collect();
        put("k3_kl", self.masked_mean(&k3));
        put(
            "rollout_ppl",
            mean(&roll.iter().map(|v| (-v).exp()).collect::<Vec<_>>()),
        );
        put("rollout_log_ppl", -mean(&roll));
        let diff: Vec<f64> = roll.iter().zip(&train).map(|(r, t)| r - t).collect();
        put("log_ppl_diff", mean(&diff));
        put(
            "log_ppl_abs_diff",
            mean(&diff.iter().map(|v| v.abs()).collect::<Vec<_>>()),
        );
        put("log_ppl_diff_max", max_of(&diff));
        put("log_ppl_diff_min", min_of(&diff));
        put(
            "ppl_ratio",
            mean(&diff.iter().map(|v| v.exp()).collect::<Vec<_>>()),
        );
        let rho2: Vec<f64> = self
            .d
            .iter()
            .map(|&d| (2.0 * self.clamped(d)).exp())
            .collect();
        put("chi2_token", self.masked_mean(&rho2) - 1.0);
        let seq2: Vec<f64> = self
            .sums
            .iter()
            .map(|&s| (2.0 * self.clamped(s)).exp())
            .collect();
        put("chi2_seq", mean(&seq2) - 1.0);
    }
}
