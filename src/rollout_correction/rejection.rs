//! The rejection filters and their diagnostics.

use std::collections::BTreeMap;

use super::batch::{fraction, max_of, mean, min_of, sample_std, Batch};
use super::config::*;

/// A filter's metrics, each under `rollout_rs_<filter>_<name>`.
struct Put<'a> {
    prefix: String,
    metrics: &'a mut BTreeMap<String, f64>,
}

impl Put<'_> {
    fn put(&mut self, name: &str, value: f64) {
        self.metrics
            .insert(format!("{}_{name}", self.prefix), value);
    }
}

/// `[pred(v)]` as 0/1 per value.
fn indicator(x: &[f64], pred: impl Fn(f64) -> bool) -> Vec<f64> {
    x.iter().map(|&v| f64::from(u8::from(pred(v)))).collect()
}

/// `f(x)`, or 0 for no value.
fn or_zero(x: &[f64], f: impl Fn(&[f64]) -> f64) -> f64 {
    if x.is_empty() {
        0.0
    } else {
        f(x)
    }
}

impl Batch {
    /// One rejection filter: multiplies `keep` by its decision and adds its metrics.
    pub(super) fn reject(
        &self,
        filter: &RejectionFilter,
        keep: &mut [f64],
        metrics: &mut BTreeMap<String, f64>,
    ) {
        let k1 = filter.divergence == FilterDivergence::K1;
        let (lo, hi) = filter.thresholds();
        let k: Vec<f64> = self
            .d
            .iter()
            .map(|&d| filter.divergence.value(self.clamped(d)))
            .collect();
        let row_stat = self.row_statistic(filter.statistic, &k);
        // The statistic each token is judged by: its own, or its row's.
        let z: Vec<f64> = match &row_stat {
            Some(v) => (0..self.b * self.t).map(|j| v[j / self.t]).collect(),
            None => k,
        };
        let own = indicator(&z, |v| if k1 { v >= lo && v <= hi } else { v <= hi });
        let mut out = Put {
            prefix: format!("rollout_rs_{}", filter.name()),
            metrics,
        };
        out.put("mean", self.masked_mean(&z));
        let seq = row_stat.clone().unwrap_or_else(|| self.row_means(&z));
        let valid = self.valid_rows(&seq);
        let low = |v: f64| k1 && v < lo;
        if row_stat.is_some() && !valid.is_empty() {
            out.put("max", max_of(&valid));
            out.put("min", min_of(&valid));
            out.put("fraction_high", fraction(&valid, |v| v > hi));
            out.put("fraction_low", fraction(&valid, low));
        } else {
            out.put("max", self.unmasked(&z).fold(f64::NEG_INFINITY, f64::max));
            out.put("min", self.unmasked(&z).fold(f64::INFINITY, f64::min));
            out.put(
                "fraction_high",
                self.masked_mean(&indicator(&z, |v| v > hi)),
            );
            out.put("fraction_low", self.masked_mean(&indicator(&z, low)));
        }
        out.put("std", self.clamped_std(&z, if k1 { lo } else { 0.0 }, hi));
        sequence_metrics(&mut out, &valid, (k1, lo, hi));
        self.rejection_metrics(&mut out, &own);
        for (k, o) in keep.iter_mut().zip(&own) {
            *k *= o;
        }
    }

    /// The row statistic of a sequence filter (`None` for a token filter); a row without a token
    /// has max 0.
    fn row_statistic(&self, statistic: FilterStatistic, k: &[f64]) -> Option<Vec<f64>> {
        match statistic {
            FilterStatistic::Token => None,
            FilterStatistic::SeqSum => Some(self.row_sums(k)),
            FilterStatistic::SeqMean => Some(self.row_means(k)),
            FilterStatistic::SeqMax => Some(
                (0..self.b)
                    .map(|i| {
                        let max = self
                            .row(i)
                            .filter(|&j| self.m[j] != 0.0)
                            .map(|j| k[j])
                            .fold(f64::NEG_INFINITY, f64::max);
                        if max == f64::NEG_INFINITY {
                            0.0
                        } else {
                            max
                        }
                    })
                    .collect(),
            ),
        }
    }

    /// The share of tokens and of non-empty rows the filter rejects (`own`: 1 kept, 0 rejected).
    fn rejection_metrics(&self, out: &mut Put<'_>, own: &[f64]) {
        let rejected: Vec<f64> = own.iter().map(|k| 1.0 - k).collect();
        out.put("masked_fraction", self.masked_mean(&rejected));
        let rows_hit = (0..self.b)
            .filter(|&i| self.n[i] > 0.0 && self.row(i).any(|j| self.m[j] != 0.0 && own[j] == 0.0))
            .count();
        let non_empty = self.n.iter().filter(|&&n| n > 0.0).count();
        let share = if non_empty > 0 {
            rows_hit as f64 / non_empty as f64
        } else {
            0.0
        };
        out.put("seq_masked_fraction", share);
    }
}

/// The rows' statistics (`valid`: the rows with a token): mean, spread, extremes and the
/// fractions beyond the thresholds.
fn sequence_metrics(out: &mut Put<'_>, valid: &[f64], (k1, lo, hi): (bool, f64, f64)) {
    out.put("seq_mean", mean(valid));
    out.put("seq_std", sample_std(valid));
    out.put("seq_max", or_zero(valid, max_of));
    out.put("seq_min", or_zero(valid, min_of));
    let deviation = or_zero(valid, |v| {
        v.iter().map(|v| v.abs()).fold(f64::NEG_INFINITY, f64::max)
    });
    out.put("seq_max_deviation", deviation);
    out.put("seq_fraction_high", fraction(valid, |v| v > hi));
    if k1 || valid.is_empty() {
        out.put("seq_fraction_low", fraction(valid, |v| v < lo));
    }
}
