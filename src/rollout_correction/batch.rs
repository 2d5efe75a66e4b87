//! A batch on the host (masked positions zeroed) and its row statistics, in f64.

use crate::aggregation::COUNT_GUARD;

/// A batch on the host (masked positions zeroed).
pub(super) struct Batch {
    /// `d = ℓold − ℓroll` (unclamped).
    pub(super) d: Vec<f64>,
    pub(super) old: Vec<f64>,
    pub(super) roll: Vec<f64>,
    pub(super) m: Vec<f64>,
    pub(super) b: usize,
    pub(super) t: usize,
    pub(super) clamp: f64,
    /// `n_i`.
    pub(super) n: Vec<f64>,
    /// `S_i = Σ_t m·d`.
    pub(super) sums: Vec<f64>,
}

pub(super) fn mean(x: &[f64]) -> f64 {
    x.iter().sum::<f64>() / x.len().max(1) as f64
}

/// Sample standard deviation (n − 1); 0 for fewer than two values.
pub(super) fn sample_std(x: &[f64]) -> f64 {
    if x.len() < 2 {
        return 0.0;
    }
    let mu = mean(x);
    (x.iter().map(|v| (v - mu) * (v - mu)).sum::<f64>() / (x.len() - 1) as f64).sqrt()
}

pub(super) fn max_of(x: &[f64]) -> f64 {
    x.iter().copied().fold(f64::NEG_INFINITY, f64::max)
}

pub(super) fn min_of(x: &[f64]) -> f64 {
    x.iter().copied().fold(f64::INFINITY, f64::min)
}

pub(super) fn fraction(x: &[f64], pred: impl Fn(f64) -> bool) -> f64 {
    x.iter().filter(|&&v| pred(v)).count() as f64 / x.len().max(1) as f64
}

impl Batch {
    pub(super) fn new(
        old: Vec<f64>,
        roll: Vec<f64>,
        m: Vec<f64>,
        b: usize,
        t: usize,
        clamp: f64,
    ) -> Self {
        let d: Vec<f64> = old.iter().zip(&roll).map(|(o, r)| o - r).collect();
        let mut batch = Self {
            d,
            old,
            roll,
            m,
            b,
            t,
            clamp,
            n: vec![],
            sums: vec![],
        };
        batch.n = (0..b)
            .map(|i| batch.row(i).map(|j| batch.m[j]).sum())
            .collect();
        batch.sums = batch.row_sums(&batch.d);
        batch
    }
    pub(super) fn row(&self, i: usize) -> std::ops::Range<usize> {
        i * self.t..(i + 1) * self.t
    }
    pub(super) fn clamped(&self, x: f64) -> f64 {
        x.clamp(-self.clamp, self.clamp)
    }
    pub(super) fn row_sums(&self, x: &[f64]) -> Vec<f64> {
        (0..self.b)
            .map(|i| self.row(i).map(|j| self.m[j] * x[j]).sum())
            .collect()
    }
    /// `r̄_i(x) = Σ_t m·x / (n_i + 1e-8)`, every row.
    pub(super) fn row_means(&self, x: &[f64]) -> Vec<f64> {
        self.row_sums(x)
            .iter()
            .zip(&self.n)
            .map(|(s, n)| s / (n + COUNT_GUARD))
            .collect()
    }
    /// `Σ m·x / (N + 1e-8)`.
    pub(super) fn masked_mean(&self, x: &[f64]) -> f64 {
        let total: f64 = x.iter().zip(&self.m).map(|(v, m)| v * m).sum();
        total / (self.m.iter().sum::<f64>() + COUNT_GUARD)
    }
    pub(super) fn tokens(&self) -> f64 {
        self.m.iter().sum()
    }
    pub(super) fn unmasked<'a>(&'a self, x: &'a [f64]) -> impl Iterator<Item = f64> + 'a {
        x.iter()
            .zip(&self.m)
            .filter(|(_, &m)| m != 0.0)
            .map(|(v, _)| *v)
    }
    /// The values of the non-empty rows.
    pub(super) fn valid_rows(&self, x: &[f64]) -> Vec<f64> {
        x.iter()
            .zip(&self.n)
            .filter(|(_, &n)| n > 0.0)
            .map(|(v, _)| *v)
            .collect()
    }
    /// `sqrt(max(mean_m(x̃²) − mean_m(x̃)², 0))`, `x̃ = clamp(x, lo, hi)`; 0 with ≤ 1 token.
    pub(super) fn clamped_std(&self, x: &[f64], lo: f64, hi: f64) -> f64 {
        if self.tokens() <= 1.0 {
            return 0.0;
        }
        let c: Vec<f64> = x.iter().map(|v| v.max(lo).min(hi)).collect();
        let sq: Vec<f64> = c.iter().map(|v| v * v).collect();
        let mu = self.masked_mean(&c);
        (self.masked_mean(&sq) - mu * mu).max(0.0).sqrt()
    }
}
