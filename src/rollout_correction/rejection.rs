//! The rejection filters and their diagnostics.

use std::collections::BTreeMap;

use super::batch::{fraction, max_of, mean, min_of, sample_std, Batch};
use super::config::*;

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
        let row_stat: Option<Vec<f64>> = match filter.statistic {
            FilterStatistic::Token => None,
            FilterStatistic::SeqSum => Some(self.row_sums(&k)),
            FilterStatistic::SeqMean => Some(self.row_means(&k)),
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
        };
        let kept = |v: f64| if k1 { v >= lo && v <= hi } else { v <= hi };
        let z: Vec<f64> = match &row_stat {
            Some(v) => (0..self.b * self.t).map(|j| v[j / self.t]).collect(),
            None => k,
        };
        let own: Vec<f64> = z.iter().map(|&v| f64::from(u8::from(kept(v)))).collect();
        let prefix = format!("rollout_rs_{}", filter.name());
        let mut put = |name: &str, v: f64| metrics.insert(format!("{prefix}_{name}"), v);
        put("mean", self.masked_mean(&z));
        let seq = row_stat.clone().unwrap_or_else(|| self.row_means(&z));
        let valid = self.valid_rows(&seq);
        let indicator = |x: &[f64], pred: &dyn Fn(f64) -> bool| -> Vec<f64> {
            x.iter().map(|&v| f64::from(u8::from(pred(v)))).collect()
        };
        if row_stat.is_some() && !valid.is_empty() {
            put("max", max_of(&valid));
            put("min", min_of(&valid));
            put("fraction_high", fraction(&valid, |v| v > hi));
            put(
                "fraction_low",
                if k1 {
                    fraction(&valid, |v| v < lo)
                } else {
                    0.0
                },
            );
        } else {
            put("max", self.unmasked(&z).fold(f64::NEG_INFINITY, f64::max));
            put("min", self.unmasked(&z).fold(f64::INFINITY, f64::min));
            put(
                "fraction_high",
                self.masked_mean(&indicator(&z, &|v| v > hi)),
            );
            put(
                "fraction_low",
                if k1 {
                    self.masked_mean(&indicator(&z, &|v| v < lo))
                } else {
                    0.0
                },
            );
        }
        put("std", self.clamped_std(&z, if k1 { lo } else { 0.0 }, hi));
        put("seq_mean", mean(&valid));
        put("seq_std", sample_std(&valid));
        put(
            "seq_max",
            if valid.is_empty() {
                0.0
            } else {
                max_of(&valid)
            },
        );
        put(
            "seq_min",
            if valid.is_empty() {
                0.0
            } else {
                min_of(&valid)
            },
        );
        put(
            "seq_max_deviation",
            if valid.is_empty() {
                0.0
            } else {
                valid
                    .iter()
                    .map(|v| v.abs())
                    .fold(f64::NEG_INFINITY, f64::max)
            },
        );
        put("seq_fraction_high", fraction(&valid, |v| v > hi));
        if k1 || valid.is_empty() {
            put("seq_fraction_low", fraction(&valid, |v| v < lo));
        }
        let rejected: Vec<f64> = own.iter().map(|k| 1.0 - k).collect();
        put("masked_fraction", self.masked_mean(&rejected));
        let rows_hit = (0..self.b)
            .filter(|&i| self.n[i] > 0.0 && self.row(i).any(|j| self.m[j] != 0.0 && own[j] == 0.0))
            .count();
        let non_empty = self.n.iter().filter(|&&n| n > 0.0).count();
        put(
            "seq_masked_fraction",
            if non_empty > 0 {
                rows_hit as f64 / non_empty as f64
            } else {
                0.0
            },
        );
        for (k, o) in keep.iter_mut().zip(&own) {
            *k *= o;
        }
    }
}
