//! The statistics of the study: means, standard deviations, percentile-bootstrap intervals, the
//! exact sign test, moving averages and the per-run summaries (final reward, area, first step to
//! 0.5, collapse).

pub use crate::series::{moving_average, quantile_sorted};
use crate::task::Rng;

/// Bootstrap resamples per interval.
pub const BOOTSTRAP_RESAMPLES: usize = 10_000;

pub fn mean(values: &[f64]) -> f64 {
    values.iter().sum::<f64>() / values.len() as f64
}

/// Sample standard deviation (n − 1); 0 for fewer than two values.
pub fn std(values: &[f64]) -> f64 {
    if values.len() < 2 {
        return 0.0;
    }
    let m = mean(values);
    let ss: f64 = values.iter().map(|v| (v - m).powi(2)).sum();
    (ss / (values.len() - 1) as f64).sqrt()
}

/// 95 % percentile-bootstrap interval of the mean, from a generator seeded by `seed` (the same
/// values and seed give the same interval).
pub fn bootstrap_ci(values: &[f64], seed: u64) -> (f64, f64) {
    let n = values.len();
    if n == 0 {
        return (f64::NAN, f64::NAN);
    }
    let mut rng = Rng::new(seed);
    let mut means: Vec<f64> = (0..BOOTSTRAP_RESAMPLES)
        .map(|_| (0..n).map(|_| values[rng.below(n)]).sum::<f64>() / n as f64)
        .collect();
    means.sort_by(f64::total_cmp);
    (
        quantile_sorted(&means, 0.025),
        quantile_sorted(&means, 0.975),
    )
}

/// The exact two-sided sign test of paired differences: `(positive, negative, p)`, ties dropped.
pub fn sign_test(differences: &[f64]) -> (usize, usize, f64) {
    let plus = differences.iter().filter(|d| **d > 0.0).count();
    let minus = differences.iter().filter(|d| **d < 0.0).count();
    let n = plus + minus;
    if n == 0 {
        return (0, 0, 1.0);
    }
    // P(X ≤ min(plus, minus)) for X ~ Binomial(n, 1/2), doubled.
    let k = plus.min(minus);
    let mut term = 0.5f64.powi(n as i32); // C(n, 0) / 2^n
    let mut tail = term;
    for i in 1..=k {
        term *= (n - i + 1) as f64 / i as f64;
        tail += term;
    }
    (plus, minus, (2.0 * tail).min(1.0))
}

/// The last 10 % of a run's steps (at least one).
pub fn tenth(steps: usize) -> usize {
    steps.div_ceil(10).max(1)
}

/// A run that lost this much reward from its best stretch has collapsed.
pub const COLLAPSE_DROP: f64 = 0.2;

/// What `runs.csv` says of one run's reward curve.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RunSummary {
    /// Mean reward over the last 10 % of steps.
    pub final_reward: f64,
    /// Mean reward over all steps: the area under the reward curve divided by the steps.
    pub area: f64,
    /// First step at which the 10-step trailing mean reward reaches 0.5.
    pub first_step_05: Option<usize>,
    /// Best 10 %-of-steps trailing mean reward.
    pub peak_reward: f64,
    /// `peak_reward − final_reward ≥ COLLAPSE_DROP`.
    pub collapsed: bool,
    /// Mean approx KL over the last 10 % of steps.
    pub final_approx_kl: f64,
}

pub fn summarize(rewards: &[f64], approx_kl: &[f64]) -> RunSummary {
    let last = tenth(rewards.len());
    let final_reward = mean(&rewards[rewards.len() - last..]);
    let peak_reward = moving_average(rewards, last)
        .into_iter()
        .fold(f64::NEG_INFINITY, f64::max);
    RunSummary {
        final_reward,
        area: mean(rewards),
        first_step_05: moving_average(rewards, 10).iter().position(|r| *r >= 0.5),
        peak_reward,
        collapsed: peak_reward - final_reward >= COLLAPSE_DROP,
        final_approx_kl: mean(&approx_kl[approx_kl.len() - last..]),
    }
}

/// Two-sided 95 % quantile of Student's t with `df` degrees of freedom (for the curves' bands).
pub fn t95(df: usize) -> f64 {
    const TABLE: [f64; 30] = [
        12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160,
        2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056,
        2.052, 2.048, 2.045, 2.042,
    ];
    match df {
        0 => f64::NAN,
        1..=30 => TABLE[df - 1],
        _ => 1.96,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sign_test_matches_the_binomial() {
        // 8 of 8 positive: p = 2 / 256.
        assert_eq!(sign_test(&[1.0; 8]), (8, 0, 2.0 / 256.0));
        // 6 of 8: p = 2·(1 + 8 + 28)/256.
        let d = [1.0, 1.0, 1.0, 1.0, 1.0, 1.0, -1.0, -1.0, 0.0];
        assert_eq!(sign_test(&d), (6, 2, 2.0 * 37.0 / 256.0));
        assert_eq!(sign_test(&[0.0, 0.0]), (0, 0, 1.0));
    }

    #[test]
    fn bootstrap_brackets_the_mean_and_is_reproducible() {
        let v = [0.1, 0.4, 0.35, 0.8, 0.55, 0.6, 0.2, 0.45];
        let (lo, hi) = bootstrap_ci(&v, 7);
        assert!(lo < mean(&v) && mean(&v) < hi, "{lo} {hi}");
        assert_eq!(bootstrap_ci(&v, 7), (lo, hi));
        assert_eq!(bootstrap_ci(&[0.3; 5], 1), (0.3, 0.3));
    }

    #[test]
    fn summaries_follow_their_rules() {
        let mut rewards = vec![0.0; 10];
        rewards.extend(vec![1.0; 80]);
        rewards.extend(vec![0.25; 10]);
        let s = summarize(&rewards, &[0.01; 100]);
        assert_eq!(s.final_reward, 0.25);
        assert_eq!(s.peak_reward, 1.0);
        assert!(s.collapsed);
        assert_eq!(s.first_step_05, Some(14)); // the 10-step mean is (5·0 + 5·1)/10 at step 14
        assert_eq!(s.area, (80.0 + 2.5) / 100.0);
        assert!(!summarize(&[0.5; 20], &[0.0; 20]).collapsed);
    }
}
