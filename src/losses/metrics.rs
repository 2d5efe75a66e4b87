//! Training metrics of a policy loss, kept as sums and counts so that micro-batches and ranks
//! merge exactly.
//!
//! | metric | definition (over unmasked tokens) |
//! |---|---|
//! | `approx_kl` | mean of `−δ` (verl `ppo_kl`) |
//! | `clip_fraction` | fraction where the clipped term is active (verl `pg_clipfrac`) |
//! | `dual_clip_fraction` | fraction with `A < 0` and `max(−ρA, −clip(ρ)A) > −cA` (verl `pg_clipfrac_lower`) |
//! | `clip_ratio` | TRL's: `(ρ < 1−ε_low ∧ A < 0) ∨ (ρ > 1+ε_high ∧ A > 0)`, split into low/high |
//! | `kl_mean` | mean of the KL estimator's value (before β) |
//! | `gate_weight_mean`, `gate_value_mean` | SAPO's mean `4p(1−p)` and mean `f(ρ)` |
//! | `ratio_{min,mean,max}` | of the ratio the trust region sees (token or sequence) |
//!
//! [`PolicyMetrics`] holds the sums on the loss's device (computing the loss copies nothing to
//! the host); [`PolicyMetrics::read`] copies them into a [`MetricSums`]: fields are sums and
//! counts (`*_sum`, `*_count`), methods are means and fractions.

use candle_core::{DType, Tensor};

use crate::error::{Error, Result};

pub(crate) const TOKENS: usize = 0;
pub(crate) const NEG_LOG_RATIO: usize = 1;
/// `Σ (ρ − 1)`: the mean ratio without losing the digits of `ρ − 1`.
pub(crate) const RATIO_EXCESS: usize = 2;
pub(crate) const CLIPPED: usize = 3;
pub(crate) const DUAL_CLIPPED: usize = 4;
pub(crate) const CLIP_LOW: usize = 5;
pub(crate) const CLIP_HIGH: usize = 6;
pub(crate) const GATE_WEIGHT: usize = 7;
pub(crate) const GATE_VALUE: usize = 8;
pub(crate) const KL: usize = 9;
/// Tokens whose log-ratio the clip moved, with `A > 0` (GMPO's `clip_fraction_pos`).
pub(crate) const CLIPPED_POS: usize = 10;
/// Tokens whose log-ratio the clip moved, with `A < 0` (GMPO's `clip_fraction_neg`).
pub(crate) const CLIPPED_NEG: usize = 11;
/// Tokens inside DPPO's trust region whose ratio exceeds the cap `C`.
pub(crate) const TRUNCATED: usize = 12;
/// `Σ m·|ℓ − ℓold|` (KL-Cov's `mean_abs_log_ratio`).
pub(crate) const ABS_LOG_RATIO: usize = 13;
/// The KL term before `β`, with its own aggregation (verl `kl_loss`).
pub(crate) const KL_LOSS: usize = 14;
/// The entropy term before its coefficient, with its own aggregation (verl `entropy_loss`).
pub(crate) const ENTROPY_LOSS: usize = 15;
/// Number of metric slots.
pub(crate) const NUM_SLOTS: usize = 16;

/// Which metric slots an objective defines (a bit per slot).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct MetricKind(u32);

impl MetricKind {
    pub(crate) fn new(slots: &[usize], kl: bool, entropy: bool) -> Self {
        let mut bits = slots.iter().fold(0, |bits, s| bits | 1 << s);
        if kl {
            bits |= 1 << KL | 1 << KL_LOSS;
        }
        if entropy {
            bits |= 1 << ENTROPY_LOSS;
        }
        Self(bits)
    }
    fn has(self, slot: usize) -> bool {
        self.0 & (1 << slot) != 0
    }
    /// The metrics an objective keeps beyond the common ones, in words (for errors).
    fn describe(self) -> String {
        let names: Vec<&str> = SLOT_NAMES
            .iter()
            .filter(|(slot, _)| self.has(*slot))
            .map(|(_, name)| *name)
            .collect();
        if names.is_empty() {
            "no objective-specific metric".into()
        } else {
            format!("[{}]", names.join(", "))
        }
    }
}

/// The objective-specific slots, named as [`MetricSums`]' fields.
const SLOT_NAMES: [(usize, &str); 13] = [
    (CLIPPED, "clipped_count"),
    (DUAL_CLIPPED, "dual_clipped_count"),
    (CLIP_LOW, "clip_low_count"),
    (CLIP_HIGH, "clip_high_count"),
    (GATE_WEIGHT, "gate_weight_sum"),
    (GATE_VALUE, "gate_value_sum"),
    (KL, "kl_sum"),
    (CLIPPED_POS, "clipped_pos_count"),
    (CLIPPED_NEG, "clipped_neg_count"),
    (TRUNCATED, "truncated_count"),
    (ABS_LOG_RATIO, "abs_log_ratio_sum"),
    (KL_LOSS, "kl_loss"),
    (ENTROPY_LOSS, "entropy_loss"),
];

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
/// assert_eq!(both.token_count, 4.0);
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
    /// The GPU kernels' value checks, `[6]` counts (see [`PolicyMetrics::check`]); `None` where
    /// the inputs were checked before the loss was returned.
    checks: Option<Tensor>,
}

/// What the GPU kernels' own value checks count, in order (then come the counts of
/// `losses/checks.rs`, in the order of `ValueCheck::ALL`).
const KERNEL_CHECKED: [(&str, &str); 6] = [
    ("mask", "only 0 and 1"),
    ("log_probs", "finite values at unmasked positions"),
    ("old_log_probs", "finite values at unmasked positions"),
    ("advantages", "finite values at unmasked positions"),
    ("is_weights", "finite values at unmasked positions"),
    ("ref_log_probs", "finite values at unmasked positions"),
];

impl PolicyMetrics {
    pub(crate) fn new(sums: Tensor, extrema: Tensor, kind: MetricKind) -> Self {
        Self {
            sums,
            extrema,
            kind,
            checks: None,
        }
    }

    /// The metrics with the GPU kernels' value-check counts, read by [`PolicyMetrics::check`].
    pub(crate) fn with_checks(mut self, checks: Option<Tensor>) -> Self {
        self.checks = checks;
        self
    }

    /// The same metrics on `device` (an empty batch on a GPU is computed on the CPU).
    pub(crate) fn to_device(&self, device: &candle_core::Device) -> Result<Self> {
        Ok(Self {
            sums: self.sums.to_device(device)?,
            extrema: self.extrema.to_device(device)?,
            kind: self.kind,
            checks: self
                .checks
                .as_ref()
                .map(|c| c.to_device(device))
                .transpose()?,
        })
    }

    /// The input checks that the GPU kernels make on the device: `Err` names the first input
    /// with invalid values (a mask value other than 0/1, a non-finite value at an unmasked
    /// position), as the CPU path's error does.
    ///
    /// On the CPU every check has been made before [`crate::PolicyLoss::forward`] returns, and
    /// this is `Ok(())` without a read. The GPU kernels (CUDA, Metal) read nothing back to the host: their
    /// checks are counted on the device and surface here, or in [`PolicyMetrics::read`] (which
    /// calls this). Until then an invalid input may have made the loss and gradient NaN; read
    /// the metrics (or call this) before stepping the optimizer.
    ///
    /// ```
    /// # use candle_core::{Device, Tensor};
    /// # let lp = Tensor::new(&[[-1.0f32, -2.0]], &Device::Cpu)?;
    /// # let adv = Tensor::new(&[1.0f32], &Device::Cpu)?;
    /// # let mask = Tensor::new(&[[1u8, 1]], &Device::Cpu)?;
    /// let out = sapo::Grpo::default().build()?.forward(&sapo::PolicyInputs::new(&lp, &lp, &adv, &mask))?;
    /// out.metrics.check()?;
    /// # Ok::<(), sapo::Error>(())
    /// ```
    pub fn check(&self) -> Result<()> {
        let Some(checks) = &self.checks else {
            return Ok(());
        };
        let counts = checks.to_dtype(DType::F64)?.to_vec1::<f64>()?;
        let (kernel, value_checks) = counts.split_at(KERNEL_CHECKED.len().min(counts.len()));
        for (&count, (arg, expected)) in kernel.iter().zip(KERNEL_CHECKED) {
            if count > 0.0 {
                let actual = if arg == "mask" {
                    format!("{count} other values")
                } else {
                    format!("{count} non-finite")
                };
                return Err(Error::InvalidValue {
                    arg,
                    expected: expected.into(),
                    actual,
                });
            }
        }
        crate::error::first_violation(value_checks, 0)
    }

    /// Merges the metrics of two batches of the same objective (sums add, extrema combine), on
    /// the device.
    ///
    /// ```
    /// # use candle_core::{Device, Tensor};
    /// # let dev = Device::Cpu;
    /// # let lp = Tensor::new(&[[-1.0f32, -2.0]], &dev)?;
    /// # let adv = Tensor::new(&[1.0f32], &dev)?;
    /// # let mask = Tensor::new(&[[1u8, 0]], &dev)?;
    /// let loss = sapo::Sapo::default().build()?;
    /// let out = loss.forward(&sapo::PolicyInputs::new(&lp, &lp, &adv, &mask))?;
    /// let twice = out.metrics.merge(&out.metrics)?.read()?;
    /// assert_eq!(twice.token_count, 2.0);
    /// # Ok::<(), sapo::Error>(())
    /// ```
    pub fn merge(&self, other: &Self) -> Result<Self> {
        if self.kind != other.kind {
            return Err(Error::MetricsMismatch(format!(
                "the metrics of two objectives: one keeps {}, the other {}",
                self.kind.describe(),
                other.kind.describe()
            )));
        }
        if !self.sums.device().same_device(other.sums.device()) {
            return Err(Error::MetricsMismatch(format!(
                "metrics on two devices: {:?} and {:?}",
                self.sums.device().location(),
                other.sums.device().location()
            )));
        }
        // Batches of two dtypes (an f32 and an f64 loss): merged in the wider one.
        let dtype = if self.sums.dtype() == other.sums.dtype() {
            self.sums.dtype()
        } else {
            DType::F64
        };
        let (a, b) = (
            self.extrema.to_dtype(dtype)?,
            other.extrema.to_dtype(dtype)?,
        );
        let min = a.narrow(0, 0, 1)?.minimum(&b.narrow(0, 0, 1)?)?;
        let max = a.narrow(0, 1, 1)?.maximum(&b.narrow(0, 1, 1)?)?;
        let checks = match (&self.checks, &other.checks) {
            (Some(a), Some(b)) => Some((a.to_dtype(DType::F32)? + b.to_dtype(DType::F32)?)?),
            (a, b) => a.clone().or_else(|| b.clone()),
        };
        Ok(Self {
            sums: (self.sums.to_dtype(dtype)? + other.sums.to_dtype(dtype)?)?,
            extrema: Tensor::cat(&[min, max], 0)?,
            kind: self.kind,
            checks,
        })
    }

    /// Copies the sums to the host (the one device-to-host copy of the metrics).
    ///
    /// ```
    /// # use candle_core::{Device, Tensor};
    /// # let dev = Device::Cpu;
    /// # let lp = Tensor::new(&[[-1.0f32, -2.0]], &dev)?;
    /// # let adv = Tensor::new(&[1.0f32], &dev)?;
    /// # let mask = Tensor::new(&[[1u8, 1]], &dev)?;
    /// let out = sapo::Sapo::default().build()?.forward(&sapo::PolicyInputs::new(&lp, &lp, &adv, &mask))?;
    /// let m = out.metrics.read()?;
    /// assert_eq!(m.gate_weight_mean(), Some(1.0)); // on-policy: full weight
    /// # Ok::<(), sapo::Error>(())
    /// ```
    pub fn read(&self) -> Result<MetricSums> {
        self.check()?;
        let s = self.sums.to_dtype(DType::F64)?.to_vec1::<f64>()?;
        let e = self.extrema.to_dtype(DType::F64)?.to_vec1::<f64>()?;
        let opt = |slot: usize| self.kind.has(slot).then_some(s[slot]);
        Ok(MetricSums {
            token_count: s[TOKENS],
            neg_log_ratio_sum: s[NEG_LOG_RATIO],
            ratio_excess_sum: s[RATIO_EXCESS],
            lowest_ratio: e[0],
            highest_ratio: e[1],
            clipped_count: opt(CLIPPED),
            dual_clipped_count: opt(DUAL_CLIPPED),
            clip_low_count: opt(CLIP_LOW),
            clip_high_count: opt(CLIP_HIGH),
            gate_weight_sum: opt(GATE_WEIGHT),
            gate_value_sum: opt(GATE_VALUE),
            kl_sum: opt(KL),
            clipped_pos_count: opt(CLIPPED_POS),
            clipped_neg_count: opt(CLIPPED_NEG),
            truncated_count: opt(TRUNCATED),
            abs_log_ratio_sum: opt(ABS_LOG_RATIO),
            kl_loss: opt(KL_LOSS),
            entropy_loss: opt(ENTROPY_LOSS),
        })
    }
}

/// Metric sums on the host: add them across ranks with [`MetricSums::merge`], read means and
/// fractions with the methods. Fields are sums and counts; a metric the objective does not
/// define is `None`; every mean is `None` when no token was counted.
///
/// ```
/// let a = sapo::MetricSums { token_count: 2.0, neg_log_ratio_sum: 0.2, ratio_excess_sum: 0.0,
///     lowest_ratio: 0.9, highest_ratio: 1.1, clipped_count: Some(1.0),
///     dual_clipped_count: Some(0.0), clip_low_count: Some(0.0), clip_high_count: Some(1.0),
///     gate_weight_sum: None, gate_value_sum: None, kl_sum: None, ..Default::default() };
/// let ab = a.merge(&a).unwrap();
/// assert_eq!(ab.clip_fraction(), Some(0.5));
/// assert_eq!(ab.approx_kl(), Some(0.1));
/// assert_eq!(ab.ratio_mean(), Some(1.0));
/// ```
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MetricSums {
    /// Number of unmasked tokens.
    pub token_count: f64,
    /// `Σ −δ`.
    pub neg_log_ratio_sum: f64,
    /// `Σ (ρ − 1)` (the mean ratio is `1 + this / token_count`, with the digits of `ρ − 1`).
    pub ratio_excess_sum: f64,
    /// `min ρ` (`+inf` when no token).
    pub lowest_ratio: f64,
    /// `max ρ` (`−inf` when no token).
    pub highest_ratio: f64,
    /// Tokens whose clipped term is active (hard clip only).
    pub clipped_count: Option<f64>,
    /// Tokens cut by the dual clip (hard clip only; 0 when the dual clip is off).
    pub dual_clipped_count: Option<f64>,
    /// TRL's low clip count: `ρ < 1−ε_low ∧ A < 0`.
    pub clip_low_count: Option<f64>,
    /// TRL's high clip count: `ρ > 1+ε_high ∧ A > 0`.
    pub clip_high_count: Option<f64>,
    /// `Σ 4p(1−p)` (soft gate only).
    pub gate_weight_sum: Option<f64>,
    /// `Σ f(ρ)` (soft gate only).
    pub gate_value_sum: Option<f64>,
    /// `Σ k` of the KL estimator (KL penalty only; `Σ k·R` when importance-weighted).
    pub kl_sum: Option<f64>,
    /// Tokens whose log-ratio GMPO's clip moved, with `A > 0`.
    pub clipped_pos_count: Option<f64>,
    /// Tokens whose log-ratio GMPO's clip moved, with `A < 0`.
    pub clipped_neg_count: Option<f64>,
    /// DPPO: tokens inside the trust region whose ratio exceeds the cap `C`.
    pub truncated_count: Option<f64>,
    /// KL-Cov: `Σ |ℓ − ℓold|`.
    pub abs_log_ratio_sum: Option<f64>,
    /// The KL term before `β`, with its own aggregation (verl `kl_loss`). With a
    /// [`crate::Normalizer`] of world size `W` it is this shard's share of the global batch's
    /// value (the shard's term divided by `W`), so that merging the shards' sums gives the
    /// global batch's value.
    pub kl_loss: Option<f64>,
    /// The entropy term before its coefficient, with its own aggregation (verl
    /// `actor/entropy_loss`); a shard's share as for `kl_loss`, so that merged it is the global
    /// batch's entropy.
    pub entropy_loss: Option<f64>,
}

/// The empty sums, the identity of [`MetricSums::merge`]: no token, no metric, extrema `+inf` and
/// `−inf`, so that a fold can start from it.
///
/// ```
/// let m = sapo::MetricSums { token_count: 2.0, lowest_ratio: 0.9, highest_ratio: 1.2,
///     gate_weight_sum: Some(1.8), gate_value_sum: Some(4.0), ..Default::default() };
/// assert_eq!(sapo::MetricSums::default().merge(&m)?, m);
/// # Ok::<(), sapo::Error>(())
/// ```
impl Default for MetricSums {
    fn default() -> Self {
        Self {
            token_count: 0.0,
            neg_log_ratio_sum: 0.0,
            ratio_excess_sum: 0.0,
            lowest_ratio: f64::INFINITY,
            highest_ratio: f64::NEG_INFINITY,
            clipped_count: None,
            dual_clipped_count: None,
            clip_low_count: None,
            clip_high_count: None,
            gate_weight_sum: None,
            gate_value_sum: None,
            kl_sum: None,
            clipped_pos_count: None,
            clipped_neg_count: None,
            truncated_count: None,
            abs_log_ratio_sum: None,
            kl_loss: None,
            entropy_loss: None,
        }
    }
}

fn add(a: Option<f64>, b: Option<f64>) -> Option<f64> {
    Some(a? + b?)
}

impl MetricSums {
    /// Adds two sets of sums of the same objective.
    ///
    /// ```
    /// let mut a = sapo::MetricSums { token_count: 1.0, neg_log_ratio_sum: 0.0, ratio_excess_sum: 0.5,
    ///     lowest_ratio: 1.5, highest_ratio: 1.5, clipped_count: None, dual_clipped_count: None,
    ///     clip_low_count: None, clip_high_count: None, gate_weight_sum: Some(0.9),
    ///     gate_value_sum: Some(2.0), kl_sum: None, ..Default::default() };
    /// let b = sapo::MetricSums { ratio_excess_sum: -0.5, lowest_ratio: 0.5, highest_ratio: 0.5, ..a };
    /// let ab = a.merge(&b)?;
    /// assert_eq!((ab.ratio_min(), ab.ratio_mean(), ab.ratio_max()), (Some(0.5), Some(1.0), Some(1.5)));
    /// # Ok::<(), sapo::Error>(())
    /// ```
    pub fn merge(&self, other: &Self) -> Result<Self> {
        let shape = |m: &Self| {
            [
                m.clipped_count.is_some(),
                m.gate_weight_sum.is_some(),
                m.kl_sum.is_some(),
                m.clipped_pos_count.is_some(),
                m.truncated_count.is_some(),
                m.abs_log_ratio_sum.is_some(),
                m.entropy_loss.is_some(),
            ]
        };
        // The empty sums (`default()`) are the identity, whatever the objective.
        let empty = Self::default();
        if *self == empty {
            return Ok(*other);
        }
        if *other == empty {
            return Ok(*self);
        }
        if shape(self) != shape(other) {
            let names = |m: &Self| -> String {
                let keeps = [
                    "clip counts",
                    "gate sums",
                    "kl_sum",
                    "clipped_pos/neg counts",
                    "truncated_count",
                    "abs_log_ratio_sum",
                    "entropy_loss",
                ];
                let kept: Vec<&str> = shape(m)
                    .iter()
                    .zip(keeps)
                    .filter(|(on, _)| **on)
                    .map(|(_, name)| name)
                    .collect();
                format!("[{}]", kept.join(", "))
            };
            return Err(Error::MetricsMismatch(format!(
                "the sums of two objectives: one keeps {}, the other {}",
                names(self),
                names(other)
            )));
        }
        Ok(Self {
            token_count: self.token_count + other.token_count,
            neg_log_ratio_sum: self.neg_log_ratio_sum + other.neg_log_ratio_sum,
            ratio_excess_sum: self.ratio_excess_sum + other.ratio_excess_sum,
            lowest_ratio: self.lowest_ratio.min(other.lowest_ratio),
            highest_ratio: self.highest_ratio.max(other.highest_ratio),
            clipped_count: add(self.clipped_count, other.clipped_count),
            dual_clipped_count: add(self.dual_clipped_count, other.dual_clipped_count),
            clip_low_count: add(self.clip_low_count, other.clip_low_count),
            clip_high_count: add(self.clip_high_count, other.clip_high_count),
            gate_weight_sum: add(self.gate_weight_sum, other.gate_weight_sum),
            gate_value_sum: add(self.gate_value_sum, other.gate_value_sum),
            kl_sum: add(self.kl_sum, other.kl_sum),
            clipped_pos_count: add(self.clipped_pos_count, other.clipped_pos_count),
            clipped_neg_count: add(self.clipped_neg_count, other.clipped_neg_count),
            truncated_count: add(self.truncated_count, other.truncated_count),
            abs_log_ratio_sum: add(self.abs_log_ratio_sum, other.abs_log_ratio_sum),
            kl_loss: add(self.kl_loss, other.kl_loss),
            entropy_loss: add(self.entropy_loss, other.entropy_loss),
        })
    }

    fn mean(&self, sum: Option<f64>) -> Option<f64> {
        (self.token_count > 0.0).then_some(sum? / self.token_count)
    }
    /// Mean of `−δ` (verl `ppo_kl`).
    ///
    /// ```
    /// let m = sapo::MetricSums { token_count: 4.0, neg_log_ratio_sum: 0.2, ratio_excess_sum: -0.1,
    ///     lowest_ratio: 0.8, highest_ratio: 1.3, clipped_count: Some(1.0), dual_clipped_count: Some(0.0),
    ///     clip_low_count: Some(1.0), clip_high_count: Some(1.0), gate_weight_sum: None,
    ///     gate_value_sum: None, kl_sum: Some(0.4), ..Default::default() };
    /// assert_eq!(m.approx_kl(), Some(0.05));
    /// ```
    pub fn approx_kl(&self) -> Option<f64> {
        self.mean(Some(self.neg_log_ratio_sum))
    }
    /// Fraction of tokens whose clipped term is active (verl `pg_clipfrac`).
    ///
    /// ```
    /// let m = sapo::MetricSums { token_count: 4.0, neg_log_ratio_sum: 0.2, ratio_excess_sum: -0.1,
    ///     lowest_ratio: 0.8, highest_ratio: 1.3, clipped_count: Some(1.0), dual_clipped_count: Some(0.0),
    ///     clip_low_count: Some(1.0), clip_high_count: Some(1.0), gate_weight_sum: None,
    ///     gate_value_sum: None, kl_sum: Some(0.4), ..Default::default() };
    /// assert_eq!(m.clip_fraction(), Some(0.25));
    /// ```
    pub fn clip_fraction(&self) -> Option<f64> {
        self.mean(self.clipped_count)
    }
    /// Fraction of tokens cut by the dual clip (verl `pg_clipfrac_lower`).
    ///
    /// ```
    /// let m = sapo::MetricSums { token_count: 4.0, neg_log_ratio_sum: 0.2, ratio_excess_sum: -0.1,
    ///     lowest_ratio: 0.8, highest_ratio: 1.3, clipped_count: Some(1.0), dual_clipped_count: Some(0.0),
    ///     clip_low_count: Some(1.0), clip_high_count: Some(1.0), gate_weight_sum: None,
    ///     gate_value_sum: None, kl_sum: Some(0.4), ..Default::default() };
    /// assert_eq!(m.dual_clip_fraction(), Some(0.0));
    /// ```
    pub fn dual_clip_fraction(&self) -> Option<f64> {
        self.mean(self.dual_clipped_count)
    }
    /// TRL's `clip_ratio` (low + high).
    ///
    /// ```
    /// let m = sapo::MetricSums { token_count: 4.0, neg_log_ratio_sum: 0.2, ratio_excess_sum: -0.1,
    ///     lowest_ratio: 0.8, highest_ratio: 1.3, clipped_count: Some(1.0), dual_clipped_count: Some(0.0),
    ///     clip_low_count: Some(1.0), clip_high_count: Some(1.0), gate_weight_sum: None,
    ///     gate_value_sum: None, kl_sum: Some(0.4), ..Default::default() };
    /// assert_eq!(m.clip_ratio(), Some(0.5));
    /// ```
    pub fn clip_ratio(&self) -> Option<f64> {
        self.mean(add(self.clip_low_count, self.clip_high_count))
    }
    /// TRL's `clip_ratio/low_mean`.
    ///
    /// ```
    /// let m = sapo::MetricSums { token_count: 4.0, neg_log_ratio_sum: 0.2, ratio_excess_sum: -0.1,
    ///     lowest_ratio: 0.8, highest_ratio: 1.3, clipped_count: Some(1.0), dual_clipped_count: Some(0.0),
    ///     clip_low_count: Some(1.0), clip_high_count: Some(1.0), gate_weight_sum: None,
    ///     gate_value_sum: None, kl_sum: Some(0.4), ..Default::default() };
    /// assert_eq!(m.clip_ratio_low(), Some(0.25));
    /// ```
    pub fn clip_ratio_low(&self) -> Option<f64> {
        self.mean(self.clip_low_count)
    }
    /// TRL's `clip_ratio/high_mean`.
    ///
    /// ```
    /// let m = sapo::MetricSums { token_count: 4.0, neg_log_ratio_sum: 0.2, ratio_excess_sum: -0.1,
    ///     lowest_ratio: 0.8, highest_ratio: 1.3, clipped_count: Some(1.0), dual_clipped_count: Some(0.0),
    ///     clip_low_count: Some(1.0), clip_high_count: Some(1.0), gate_weight_sum: None,
    ///     gate_value_sum: None, kl_sum: Some(0.4), ..Default::default() };
    /// assert_eq!(m.clip_ratio_high(), Some(0.25));
    /// ```
    pub fn clip_ratio_high(&self) -> Option<f64> {
        self.mean(self.clip_high_count)
    }
    /// Mean KL estimate (before β).
    ///
    /// ```
    /// let m = sapo::MetricSums { token_count: 4.0, neg_log_ratio_sum: 0.2, ratio_excess_sum: -0.1,
    ///     lowest_ratio: 0.8, highest_ratio: 1.3, clipped_count: Some(1.0), dual_clipped_count: Some(0.0),
    ///     clip_low_count: Some(1.0), clip_high_count: Some(1.0), gate_weight_sum: None,
    ///     gate_value_sum: None, kl_sum: Some(0.4), ..Default::default() };
    /// assert_eq!(m.kl_mean(), Some(0.1));
    /// ```
    pub fn kl_mean(&self) -> Option<f64> {
        self.mean(self.kl_sum)
    }
    /// SAPO's mean gradient weight `4p(1−p)`: 1 on-policy, → 0 when the gate suppresses.
    ///
    /// ```
    /// let m = sapo::MetricSums { token_count: 4.0, neg_log_ratio_sum: 0.2, ratio_excess_sum: -0.1,
    ///     lowest_ratio: 0.8, highest_ratio: 1.3, clipped_count: Some(1.0), dual_clipped_count: Some(0.0),
    ///     clip_low_count: Some(1.0), clip_high_count: Some(1.0), gate_weight_sum: None,
    ///     gate_value_sum: None, kl_sum: Some(0.4), ..Default::default() };
    /// assert_eq!(m.gate_weight_mean(), None);
    /// ```
    pub fn gate_weight_mean(&self) -> Option<f64> {
        self.mean(self.gate_weight_sum)
    }
    /// SAPO's mean gate value `f(ρ)`.
    ///
    /// ```
    /// let m = sapo::MetricSums { token_count: 4.0, neg_log_ratio_sum: 0.2, ratio_excess_sum: -0.1,
    ///     lowest_ratio: 0.8, highest_ratio: 1.3, clipped_count: Some(1.0), dual_clipped_count: Some(0.0),
    ///     clip_low_count: Some(1.0), clip_high_count: Some(1.0), gate_weight_sum: None,
    ///     gate_value_sum: None, kl_sum: Some(0.4), ..Default::default() };
    /// assert_eq!(m.gate_value_mean(), None);
    /// ```
    pub fn gate_value_mean(&self) -> Option<f64> {
        self.mean(self.gate_value_sum)
    }
    /// GMPO's `clip_fraction_pos`: the fraction of tokens with `A > 0` whose log-ratio the clip
    /// moved (verl `pg_clipfrac`).
    ///
    /// ```
    /// let m = sapo::MetricSums { token_count: 4.0, clipped_pos_count: Some(1.0), ..Default::default() };
    /// assert_eq!(m.clip_fraction_pos(), Some(0.25));
    /// ```
    pub fn clip_fraction_pos(&self) -> Option<f64> {
        self.mean(self.clipped_pos_count)
    }
    /// GMPO's `clip_fraction_neg` (`A < 0`; verl `pg_clipfrac_lower`).
    ///
    /// ```
    /// let m = sapo::MetricSums { token_count: 4.0, clipped_neg_count: Some(2.0), ..Default::default() };
    /// assert_eq!(m.clip_fraction_neg(), Some(0.5));
    /// ```
    pub fn clip_fraction_neg(&self) -> Option<f64> {
        self.mean(self.clipped_neg_count)
    }
    /// DPPO's `truncated_fraction`: tokens inside the trust region with `ρ > C`.
    ///
    /// ```
    /// let m = sapo::MetricSums { token_count: 4.0, truncated_count: Some(1.0), ..Default::default() };
    /// assert_eq!(m.truncated_fraction(), Some(0.25));
    /// ```
    pub fn truncated_fraction(&self) -> Option<f64> {
        self.mean(self.truncated_count)
    }
    /// KL-Cov's `mean_abs_log_ratio`, the mean `|ℓ − ℓold|` (verl reports it as `ppo_kl`).
    ///
    /// ```
    /// let m = sapo::MetricSums { token_count: 4.0, abs_log_ratio_sum: Some(0.4), ..Default::default() };
    /// assert_eq!(m.mean_abs_log_ratio(), Some(0.1));
    /// ```
    pub fn mean_abs_log_ratio(&self) -> Option<f64> {
        self.mean(self.abs_log_ratio_sum)
    }
    /// Mean ratio, `1 + Σ(ρ − 1)/N`.
    ///
    /// ```
    /// let m = sapo::MetricSums { token_count: 4.0, neg_log_ratio_sum: 0.2, ratio_excess_sum: -0.1,
    ///     lowest_ratio: 0.8, highest_ratio: 1.3, clipped_count: Some(1.0), dual_clipped_count: Some(0.0),
    ///     clip_low_count: Some(1.0), clip_high_count: Some(1.0), gate_weight_sum: None,
    ///     gate_value_sum: None, kl_sum: Some(0.4), ..Default::default() };
    /// assert!((m.ratio_mean().unwrap() - 0.975).abs() < 1e-12);
    /// ```
    pub fn ratio_mean(&self) -> Option<f64> {
        self.mean(Some(self.ratio_excess_sum)).map(|x| 1.0 + x)
    }
    /// Smallest ratio.
    ///
    /// ```
    /// let m = sapo::MetricSums { token_count: 4.0, neg_log_ratio_sum: 0.2, ratio_excess_sum: -0.1,
    ///     lowest_ratio: 0.8, highest_ratio: 1.3, clipped_count: Some(1.0), dual_clipped_count: Some(0.0),
    ///     clip_low_count: Some(1.0), clip_high_count: Some(1.0), gate_weight_sum: None,
    ///     gate_value_sum: None, kl_sum: Some(0.4), ..Default::default() };
    /// assert_eq!(m.ratio_min(), Some(0.8));
    /// ```
    pub fn ratio_min(&self) -> Option<f64> {
        (self.token_count > 0.0).then_some(self.lowest_ratio)
    }
    /// Largest ratio.
    ///
    /// ```
    /// let m = sapo::MetricSums { token_count: 4.0, neg_log_ratio_sum: 0.2, ratio_excess_sum: -0.1,
    ///     lowest_ratio: 0.8, highest_ratio: 1.3, clipped_count: Some(1.0), dual_clipped_count: Some(0.0),
    ///     clip_low_count: Some(1.0), clip_high_count: Some(1.0), gate_weight_sum: None,
    ///     gate_value_sum: None, kl_sum: Some(0.4), ..Default::default() };
    /// assert_eq!(m.ratio_max(), Some(1.3));
    /// ```
    pub fn ratio_max(&self) -> Option<f64> {
        (self.token_count > 0.0).then_some(self.highest_ratio)
    }
}
