//! Training metrics of a policy loss, kept as sums and counts so that micro-batches and ranks
//! merge exactly.
//!
//! | metric | definition (over unmasked tokens) |
//! |---|---|
//! | `approx_kl` | mean of `−δ` (verl `ppo_kl`) |
//! | `clip_fraction` | fraction where the clipped term is active (verl `pg_clipfrac`) |
//! | `dual_clip_fraction` | fraction with `A < 0` and `max(−ρA, −clip(ρ)A) > −cA` (verl `pg_clipfrac_lower`) |
//! | `clip_ratio` | TRL's: `(ρ < 1−ε_low ∧ A < 0) ∨ (ρ > 1+ε_high ∧ A > 0)`, split into low/high |
//! | `kl` | mean of the KL estimator's value (before β) |
//! | `gate_weight_mean`, `gate_value_mean` | SAPO's mean `4p(1−p)` and mean `f(ρ)` |
//! | `ratio_{min,mean,max}` | of the ratio the trust region sees (token or sequence) |
//!
//! [`PolicyMetrics`] holds the sums on the loss's device (computing the loss copies nothing to
//! the host); [`PolicyMetrics::read`] copies them into a [`MetricSums`].

use candle_core::{DType, Tensor};

use crate::error::{Error, Result};

pub(crate) const TOKENS: usize = 0;
pub(crate) const NEG_LOG_RATIO: usize = 1;
pub(crate) const RATIO: usize = 2;
pub(crate) const CLIPPED: usize = 3;
pub(crate) const DUAL_CLIPPED: usize = 4;
pub(crate) const CLIP_LOW: usize = 5;
pub(crate) const CLIP_HIGH: usize = 6;
pub(crate) const GATE_WEIGHT: usize = 7;
pub(crate) const GATE_VALUE: usize = 8;
pub(crate) const KL: usize = 9;
pub(crate) const NUM_SLOTS: usize = 10;

/// Which metrics an objective defines.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct MetricKind {
    pub clip: bool,
    pub gate: bool,
    pub kl: bool,
}

/// Metric sums of one or more batches, on the loss's device.
///
/// ```
/// # use candle_core::{Device, Tensor};
/// # let dev = Device::Cpu;
/// # let lp = Tensor::new(&[[-1.0f32, -2.0]], &dev)?;
/// # let old = Tensor::new(&[[-1.1f32, -1.9]], &dev)?;
/// # let adv = Tensor::new(&[1.0f32], &dev)?;
/// # let mask = Tensor::new(&[[1u8, 1]], &dev)?;
/// let loss = sapo::Grpo::default().build()?;
/// let a = loss.forward(&sapo::PolicyInputs::new(&lp, &old, &adv, &mask))?;
/// let b = loss.forward(&sapo::PolicyInputs::new(&lp, &old, &adv, &mask))?;
/// let both = a.metrics.merge(&b.metrics)?.read()?;
/// assert_eq!(both.tokens, 4.0);
/// assert!(both.clip_fraction().is_some());
/// # Ok::<(), sapo::Error>(())
/// ```
#[derive(Debug, Clone)]
pub struct PolicyMetrics {
    /// `[NUM_SLOTS]` sums.
    sums: Tensor,
    /// `[2]`: min and max of the ratio (`+inf`, `−inf` when no token).
    extrema: Tensor,
    kind: MetricKind,
}

impl PolicyMetrics {
    pub(crate) fn new(sums: Tensor, extrema: Tensor, kind: MetricKind) -> Self {
        Self {
            sums,
            extrema,
            kind,
        }
    }

    /// Merges the metrics of two batches of the same objective (sums add, extrema combine), on
    /// the device.
    pub fn merge(&self, other: &Self) -> Result<Self> {
        if self.kind != other.kind {
            return Err(Error::MetricsMismatch(format!(
                "{:?} vs {:?}",
                self.kind, other.kind
            )));
        }
        let (a, b) = (&self.extrema, &other.extrema);
        let min = a.narrow(0, 0, 1)?.minimum(&b.narrow(0, 0, 1)?)?;
        let max = a.narrow(0, 1, 1)?.maximum(&b.narrow(0, 1, 1)?)?;
        Ok(Self {
            sums: (&self.sums + &other.sums)?,
            extrema: Tensor::cat(&[min, max], 0)?,
            kind: self.kind,
        })
    }

    /// Copies the sums to the host.
    pub fn read(&self) -> Result<MetricSums> {
        let s = self.sums.to_dtype(DType::F64)?.to_vec1::<f64>()?;
        let e = self.extrema.to_dtype(DType::F64)?.to_vec1::<f64>()?;
        let opt = |on: bool, slot: usize| on.then_some(s[slot]);
        Ok(MetricSums {
            tokens: s[TOKENS],
            neg_log_ratio: s[NEG_LOG_RATIO],
            ratio: s[RATIO],
            ratio_min: e[0],
            ratio_max: e[1],
            clipped: opt(self.kind.clip, CLIPPED),
            dual_clipped: opt(self.kind.clip, DUAL_CLIPPED),
            clip_low: opt(self.kind.clip, CLIP_LOW),
            clip_high: opt(self.kind.clip, CLIP_HIGH),
            gate_weight: opt(self.kind.gate, GATE_WEIGHT),
            gate_value: opt(self.kind.gate, GATE_VALUE),
            kl: opt(self.kind.kl, KL),
        })
    }
}

/// Metric sums on the host: add them across ranks with [`MetricSums::merge`], read means with
/// the methods. A metric the objective does not define is `None`; every mean is `None` when no
/// token was counted.
///
/// ```
/// let a = sapo::MetricSums { tokens: 2.0, neg_log_ratio: 0.2, ratio: 2.0, ratio_min: 0.9,
///     ratio_max: 1.1, clipped: Some(1.0), dual_clipped: Some(0.0), clip_low: Some(0.0),
///     clip_high: Some(1.0), gate_weight: None, gate_value: None, kl: None };
/// let ab = a.merge(&a).unwrap();
/// assert_eq!(ab.clip_fraction(), Some(0.5));
/// assert_eq!(ab.approx_kl(), Some(0.1));
/// ```
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MetricSums {
    /// Number of unmasked tokens.
    pub tokens: f64,
    /// `Σ −δ`.
    pub neg_log_ratio: f64,
    /// `Σ ρ`.
    pub ratio: f64,
    /// `min ρ` (`+inf` when no token).
    pub ratio_min: f64,
    /// `max ρ` (`−inf` when no token).
    pub ratio_max: f64,
    /// Tokens whose clipped term is active (hard clip only).
    pub clipped: Option<f64>,
    /// Tokens cut by the dual clip (hard clip only; 0 when the dual clip is off).
    pub dual_clipped: Option<f64>,
    /// TRL's low clip count: `ρ < 1−ε_low ∧ A < 0`.
    pub clip_low: Option<f64>,
    /// TRL's high clip count: `ρ > 1+ε_high ∧ A > 0`.
    pub clip_high: Option<f64>,
    /// `Σ 4p(1−p)` (soft gate only).
    pub gate_weight: Option<f64>,
    /// `Σ f(ρ)` (soft gate only).
    pub gate_value: Option<f64>,
    /// `Σ k` of the KL estimator (KL penalty only).
    pub kl: Option<f64>,
}

fn add(a: Option<f64>, b: Option<f64>) -> Option<f64> {
    Some(a? + b?)
}

impl MetricSums {
    /// Adds two sets of sums of the same objective.
    pub fn merge(&self, other: &Self) -> Result<Self> {
        let shape = |m: &Self| [m.clipped.is_some(), m.gate_weight.is_some(), m.kl.is_some()];
        if shape(self) != shape(other) {
            return Err(Error::MetricsMismatch(
                "metric sums of different objectives".into(),
            ));
        }
        Ok(Self {
            tokens: self.tokens + other.tokens,
            neg_log_ratio: self.neg_log_ratio + other.neg_log_ratio,
            ratio: self.ratio + other.ratio,
            ratio_min: self.ratio_min.min(other.ratio_min),
            ratio_max: self.ratio_max.max(other.ratio_max),
            clipped: add(self.clipped, other.clipped),
            dual_clipped: add(self.dual_clipped, other.dual_clipped),
            clip_low: add(self.clip_low, other.clip_low),
            clip_high: add(self.clip_high, other.clip_high),
            gate_weight: add(self.gate_weight, other.gate_weight),
            gate_value: add(self.gate_value, other.gate_value),
            kl: add(self.kl, other.kl),
        })
    }

    fn mean(&self, sum: Option<f64>) -> Option<f64> {
        (self.tokens > 0.0).then_some(sum? / self.tokens)
    }
    /// Mean of `−δ` (verl `ppo_kl`).
    pub fn approx_kl(&self) -> Option<f64> {
        self.mean(Some(self.neg_log_ratio))
    }
    /// verl's `pg_clipfrac`.
    pub fn clip_fraction(&self) -> Option<f64> {
        self.mean(self.clipped)
    }
    /// verl's `pg_clipfrac_lower`.
    pub fn dual_clip_fraction(&self) -> Option<f64> {
        self.mean(self.dual_clipped)
    }
    /// TRL's `clip_ratio` (low + high).
    pub fn clip_ratio(&self) -> Option<f64> {
        self.mean(add(self.clip_low, self.clip_high))
    }
    /// TRL's `clip_ratio/low_mean`.
    pub fn clip_ratio_low(&self) -> Option<f64> {
        self.mean(self.clip_low)
    }
    /// TRL's `clip_ratio/high_mean`.
    pub fn clip_ratio_high(&self) -> Option<f64> {
        self.mean(self.clip_high)
    }
    /// Mean KL estimate (before β).
    pub fn kl(&self) -> Option<f64> {
        self.mean(self.kl)
    }
    /// SAPO's mean gradient weight `4p(1−p)`: 1 on-policy, → 0 when the gate suppresses.
    pub fn gate_weight_mean(&self) -> Option<f64> {
        self.mean(self.gate_weight)
    }
    /// SAPO's mean gate value `f(ρ)`.
    pub fn gate_value_mean(&self) -> Option<f64> {
        self.mean(self.gate_value)
    }
    /// Mean ratio.
    pub fn ratio_mean(&self) -> Option<f64> {
        self.mean(Some(self.ratio))
    }
    /// Smallest ratio.
    pub fn ratio_min(&self) -> Option<f64> {
        (self.tokens > 0.0).then_some(self.ratio_min)
    }
    /// Largest ratio.
    pub fn ratio_max(&self) -> Option<f64> {
        (self.tokens > 0.0).then_some(self.ratio_max)
    }
}
