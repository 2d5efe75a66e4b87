//! Rollout correction between the inference engine and the trainer (verl's
//! `rollout_corr_helper.py`): importance weights, rejection filters and their diagnostics.
//! Every formula, with the peer it matches: [the formulas page](crate::formulas).
//!
//! With `d = ℓold − ℓroll` (the log of π_train/π_rollout), `d̃ = clamp(d, ±20)`, `S_i = Σ_t m·d`:
//!
//! ```text
//! weights  token:    raw = exp(d̃)·m          sequence: raw = exp(clamp(S_i, ±20))·m
//!          truncate: w = min(raw, U)          mask (IcePop): w = raw if L ≤ raw ≤ U else 0
//!          batch_normalize: w ← w/μ_w (token: mean over unmasked tokens; sequence: mean of row means)
//! filters  k1 = −d̃, k2 = ½d̃², k3 = e^{d̃} − 1 − d̃ per token; token_kX, seq_sum_kX, seq_mean_kX,
//!          seq_max_k2/3 keep a token (or row) when ln(lower) ≤ stat ≤ ln(upper) (k1) or stat ≤ upper
//! mask'    m·Π keep
//! ```
//!
//! Every metric verl reports is returned under its own name (without verl's `rollout_corr/`
//! prefix); their definitions are in the formulas page and in [`rollout_correction()`]. Nothing
//! here carries gradient. The statistics are computed on the host in f64, once per batch.
//!
//! ```
//! use candle_core::{Device, Tensor};
//! use sapo::rollout_correction::*;
//! let trainer = Tensor::new(&[[-1.0f32, -0.5]], &Device::Cpu)?;
//! let engine = Tensor::new(&[[-1.2f32, -0.5]], &Device::Cpu)?;
//! let mask = Tensor::new(&[[1u8, 1]], &Device::Cpu)?;
//! let rs = RolloutCorrection::new()
//!     .with_rejection(RejectionFilter::new(FilterStatistic::Token, FilterDivergence::K2, None, 0.01));
//! let out = rollout_correction(&trainer, &engine, &mask, &rs)?;
//! assert_eq!(out.mask.to_vec2::<u8>()?, vec![vec![0, 1]]); // ½·0.2² = 0.02 > 0.01
//! # Ok::<(), sapo::Error>(())
//! ```

use std::collections::BTreeMap;

use candle_core::{DType, Tensor};

use crate::error::{check_config, check_device, check_float, check_shape, Error, Result};

/// verl's `SAFETY_BOUND`: the clamp of the log-ratios (and their row sums) before `exp`.
///
/// ```
/// use sapo::rollout_correction::{RolloutCorrection, ROLLOUT_LOG_RATIO_CLAMP};
/// assert_eq!(RolloutCorrection::new().log_ratio_clamp, ROLLOUT_LOG_RATIO_CLAMP);
/// ```
pub const ROLLOUT_LOG_RATIO_CLAMP: f64 = 20.0;
/// verl's `+1e-8` in the counts of its masked means.
const COUNT_GUARD: f64 = 1e-8;

/// The level of the importance weights.
///
/// ```
/// assert_ne!(sapo::WeightLevel::Token, sapo::WeightLevel::Sequence);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WeightLevel {
    /// One weight per token, `exp(d̃)` (biased, low variance).
    Token,
    /// One weight per row, the product of its token ratios (unbiased, high variance).
    Sequence,
}

/// What happens to weights outside the bounds.
///
/// ```
/// let icepop = sapo::WeightMode::Mask { lower: 0.5, upper: 2.0 };
/// assert_eq!(icepop.upper(), 2.0);
/// ```
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum WeightMode {
    /// TIS: `w = min(raw, upper)` (verl threshold `"U"`).
    Truncate {
        /// `U` > 0.
        upper: f64,
    },
    /// IcePop: `w = raw` inside `[lower, upper]`, else 0 (verl threshold `"L_U"`).
    Mask {
        /// `L` ≥ 0.
        lower: f64,
        /// `U` > `L`.
        upper: f64,
    },
}

impl WeightMode {
    /// The upper bound `U`.
    ///
    /// ```
    /// assert_eq!(sapo::WeightMode::Truncate { upper: 2.0 }.upper(), 2.0);
    /// ```
    pub fn upper(&self) -> f64 {
        match *self {
            Self::Truncate { upper } | Self::Mask { upper, .. } => upper,
        }
    }
    /// The lower bound used by the metrics: `L` (mask) or `1/U` (truncate).
    fn metric_lower(&self) -> f64 {
        match *self {
            Self::Truncate { upper } => 1.0 / upper,
            Self::Mask { lower, .. } => lower,
        }
    }
}

/// The importance weights of a rollout correction.
///
/// ```
/// use sapo::{ImportanceWeights, WeightLevel, WeightMode};
/// let tis = ImportanceWeights::new(WeightLevel::Token, WeightMode::Truncate { upper: 2.0 });
/// assert!(!tis.batch_normalize);
/// ```
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ImportanceWeights {
    /// Token or sequence weights.
    pub level: WeightLevel,
    /// Truncate (TIS) or mask (IcePop).
    pub mode: WeightMode,
    /// Normalise the weights to mean 1 over the batch.
    pub batch_normalize: bool,
}

impl ImportanceWeights {
    /// Weights of `level` and `mode`, not normalised.
    ///
    /// ```
    /// let w = sapo::ImportanceWeights::new(sapo::WeightLevel::Sequence, sapo::WeightMode::Truncate { upper: 5.0 });
    /// assert_eq!(w.level, sapo::WeightLevel::Sequence);
    /// ```
    pub fn new(level: WeightLevel, mode: WeightMode) -> Self {
        Self {
            level,
            mode,
            batch_normalize: false,
        }
    }
    /// Normalises the weights to mean 1 over the batch (verl `rollout_is_batch_normalize`).
    ///
    /// ```
    /// let w = sapo::ImportanceWeights::new(sapo::WeightLevel::Token, sapo::WeightMode::Truncate { upper: 2.0 })
    ///     .with_batch_normalize(true);
    /// assert!(w.batch_normalize);
    /// ```
    pub fn with_batch_normalize(mut self, on: bool) -> Self {
        self.batch_normalize = on;
        self
    }
}

/// Which statistic a rejection filter tests.
///
/// ```
/// assert_eq!(sapo::FilterStatistic::SeqMean.name(), "seq_mean");
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FilterStatistic {
    /// Each token's own divergence; rejects tokens.
    Token,
    /// The row's sum; rejects rows.
    SeqSum,
    /// The row's mean; rejects rows.
    SeqMean,
    /// The row's maximum (k2, k3 only); rejects rows.
    SeqMax,
}

impl FilterStatistic {
    /// verl's prefix (`token`, `seq_sum`, `seq_mean`, `seq_max`).
    ///
    /// ```
    /// assert_eq!(sapo::FilterStatistic::Token.name(), "token");
    /// ```
    pub fn name(&self) -> &'static str {
        match self {
            Self::Token => "token",
            Self::SeqSum => "seq_sum",
            Self::SeqMean => "seq_mean",
            Self::SeqMax => "seq_max",
        }
    }
}

/// The per-token divergence a filter uses (`d̃ = clamp(ℓold − ℓroll, ±20)`).
///
/// ```
/// assert_eq!(sapo::FilterDivergence::K3.name(), "k3");
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FilterDivergence {
    /// `−d̃` (ln π_rollout/π_train); bounded below and above.
    K1,
    /// `½d̃²`.
    K2,
    /// `e^{d̃} − 1 − d̃`.
    K3,
}

impl FilterDivergence {
    /// `k1`, `k2` or `k3`.
    ///
    /// ```
    /// assert_eq!(sapo::FilterDivergence::K1.name(), "k1");
    /// ```
    pub fn name(&self) -> &'static str {
        match self {
            Self::K1 => "k1",
            Self::K2 => "k2",
            Self::K3 => "k3",
        }
    }
    fn value(&self, d: f64) -> f64 {
        match self {
            Self::K1 => -d,
            Self::K2 => 0.5 * d * d,
            Self::K3 => d.exp() - 1.0 - d,
        }
    }
}

/// One rejection filter: keeps `ln(lower) ≤ stat ≤ ln(upper)` for k1 (`lower`, `upper` bound
/// π_rollout/π_train), `stat ≤ upper` for k2 and k3.
///
/// ```
/// use sapo::{FilterDivergence, FilterStatistic, RejectionFilter};
/// let f = RejectionFilter::new(FilterStatistic::Token, FilterDivergence::K1, Some(0.5), 2.0);
/// assert_eq!(f.name(), "token_k1");
/// assert!(f.validate().is_ok());
/// assert!(RejectionFilter::new(FilterStatistic::SeqMax, FilterDivergence::K1, Some(0.5), 2.0).validate().is_err());
/// ```
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RejectionFilter {
    /// The statistic.
    pub statistic: FilterStatistic,
    /// The divergence.
    pub divergence: FilterDivergence,
    /// The lower bound (k1 only, > 0).
    pub lower: Option<f64>,
    /// The upper bound (> 0; for k1 > `lower`).
    pub upper: f64,
}

impl RejectionFilter {
    /// A filter.
    ///
    /// ```
    /// let f = sapo::RejectionFilter::new(sapo::FilterStatistic::SeqMean, sapo::FilterDivergence::K3, None, 0.02);
    /// assert_eq!(f.name(), "seq_mean_k3");
    /// ```
    pub fn new(
        statistic: FilterStatistic,
        divergence: FilterDivergence,
        lower: Option<f64>,
        upper: f64,
    ) -> Self {
        Self {
            statistic,
            divergence,
            lower,
            upper,
        }
    }
    /// Parses verl's option name (`token_k1`, `seq_sum_k2`, `seq_max_k3`, ...).
    ///
    /// ```
    /// let f = sapo::RejectionFilter::from_name("seq_max_k2", None, 0.05)?;
    /// assert_eq!(f.statistic, sapo::FilterStatistic::SeqMax);
    /// # Ok::<(), sapo::Error>(())
    /// ```
    pub fn from_name(name: &str, lower: Option<f64>, upper: f64) -> Result<Self> {
        let (statistic, divergence) = name.rsplit_once('_').unwrap_or((name, ""));
        let statistic = match statistic {
            "token" => FilterStatistic::Token,
            "seq_sum" => FilterStatistic::SeqSum,
            "seq_mean" => FilterStatistic::SeqMean,
            "seq_max" => FilterStatistic::SeqMax,
            _ => return Err(bad_filter(name)),
        };
        let divergence = match divergence {
            "k1" => FilterDivergence::K1,
            "k2" => FilterDivergence::K2,
            "k3" => FilterDivergence::K3,
            _ => return Err(bad_filter(name)),
        };
        let filter = Self::new(statistic, divergence, lower, upper);
        filter.validate()?;
        Ok(filter)
    }
    /// verl's name of the filter.
    ///
    /// ```
    /// let f = sapo::RejectionFilter::new(sapo::FilterStatistic::SeqSum, sapo::FilterDivergence::K2, None, 0.1);
    /// assert_eq!(f.name(), "seq_sum_k2");
    /// ```
    pub fn name(&self) -> String {
        format!("{}_{}", self.statistic.name(), self.divergence.name())
    }
    /// Checks the bounds (k1: `0 < lower < upper`; k2/k3: no lower, `upper > 0`) and that
    /// `seq_max` uses k2 or k3.
    ///
    /// ```
    /// let f = sapo::RejectionFilter::new(sapo::FilterStatistic::Token, sapo::FilterDivergence::K2, None, -1.0);
    /// assert!(f.validate().is_err());
    /// ```
    pub fn validate(&self) -> Result<()> {
        check_config(
            self.upper.is_finite() && self.upper > 0.0,
            "rejection.upper",
            "finite and > 0",
            self.upper,
        )?;
        if self.divergence == FilterDivergence::K1 {
            check_config(
                self.statistic != FilterStatistic::SeqMax,
                "rejection.filter",
                "seq_max with k2 or k3",
                self.name(),
            )?;
            let lower = self.lower.unwrap_or(f64::NAN);
            check_config(
                lower.is_finite() && lower > 0.0 && lower < self.upper,
                "rejection.lower",
                "finite, > 0 and < upper (k1 filters)",
                self.lower,
            )
        } else {
            check_config(
                self.lower.is_none(),
                "rejection.lower",
                "None (k2 and k3 filters have an upper bound only)",
                self.lower,
            )
        }
    }
    /// `(lo, hi)` thresholds of the statistic.
    fn thresholds(&self) -> (f64, f64) {
        match self.divergence {
            FilterDivergence::K1 => (self.lower.unwrap_or(f64::NAN).ln(), self.upper.ln()),
            _ => (0.0, self.upper),
        }
    }
}

fn bad_filter(name: &str) -> Error {
    Error::InvalidConfig {
        name: "rejection.filter",
        expected: "token_k1..3, seq_sum_k1..3, seq_mean_k1..3, seq_max_k2, seq_max_k3",
        actual: format!("{name:?}"),
    }
}

/// The most filters a correction holds: one of each kind.
const MAX_FILTERS: usize = 11;

/// A rollout correction: optional importance weights, rejection filters (a token survives only
/// if every filter keeps it; a filter given twice replaces the first), and the log-ratio clamp.
///
/// ```
/// use sapo::{FilterDivergence, FilterStatistic, ImportanceWeights, RejectionFilter, RolloutCorrection, WeightLevel, WeightMode};
/// let rc = RolloutCorrection::new()
///     .with_importance_weights(ImportanceWeights::new(WeightLevel::Token, WeightMode::Truncate { upper: 2.0 }))
///     .with_rejection(RejectionFilter::new(FilterStatistic::SeqMax, FilterDivergence::K3, None, 0.1));
/// assert_eq!(rc.rejection().len(), 1);
/// assert!(rc.validate().is_ok());
/// ```
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RolloutCorrection {
    /// The importance weights, or `None`.
    pub importance_weights: Option<ImportanceWeights>,
    filters: [Option<RejectionFilter>; MAX_FILTERS],
    /// verl's `SAFETY_BOUND` (20).
    pub log_ratio_clamp: f64,
}

impl Default for RolloutCorrection {
    fn default() -> Self {
        Self::new()
    }
}

impl RolloutCorrection {
    /// No weights, no filters, clamp 20.
    ///
    /// ```
    /// assert!(sapo::RolloutCorrection::new().importance_weights.is_none());
    /// ```
    pub fn new() -> Self {
        Self {
            importance_weights: None,
            filters: [None; MAX_FILTERS],
            log_ratio_clamp: ROLLOUT_LOG_RATIO_CLAMP,
        }
    }
    /// Sets the importance weights.
    ///
    /// ```
    /// let rc = sapo::RolloutCorrection::new().with_importance_weights(
    ///     sapo::ImportanceWeights::new(sapo::WeightLevel::Token, sapo::WeightMode::Mask { lower: 0.5, upper: 2.0 }));
    /// assert!(rc.importance_weights.is_some());
    /// ```
    pub fn with_importance_weights(mut self, weights: ImportanceWeights) -> Self {
        self.importance_weights = Some(weights);
        self
    }
    /// Adds a rejection filter (replacing one of the same name).
    ///
    /// ```
    /// use sapo::{FilterDivergence as D, FilterStatistic as S, RejectionFilter as F};
    /// let rc = sapo::RolloutCorrection::new()
    ///     .with_rejection(F::new(S::Token, D::K2, None, 0.02))
    ///     .with_rejection(F::new(S::Token, D::K2, None, 0.05));
    /// assert_eq!(rc.rejection(), vec![F::new(S::Token, D::K2, None, 0.05)]);
    /// ```
    pub fn with_rejection(mut self, filter: RejectionFilter) -> Self {
        let same = |f: &Option<RejectionFilter>| {
            f.is_some_and(|f| f.statistic == filter.statistic && f.divergence == filter.divergence)
        };
        if let Some(slot) = self.filters.iter_mut().find(|f| same(f)) {
            *slot = Some(filter);
        } else if let Some(slot) = self.filters.iter_mut().find(|f| f.is_none()) {
            *slot = Some(filter);
        }
        self
    }
    /// Sets the clamp of the log-ratios before `exp` (verl: 20).
    ///
    /// ```
    /// assert_eq!(sapo::RolloutCorrection::new().with_log_ratio_clamp(10.0).log_ratio_clamp, 10.0);
    /// ```
    pub fn with_log_ratio_clamp(mut self, clamp: f64) -> Self {
        self.log_ratio_clamp = clamp;
        self
    }
    /// The filters, in the order they were added.
    ///
    /// ```
    /// assert!(sapo::RolloutCorrection::new().rejection().is_empty());
    /// ```
    pub fn rejection(&self) -> Vec<RejectionFilter> {
        self.filters.iter().flatten().copied().collect()
    }
    /// Checks the bounds of the weights and of every filter, and the clamp.
    ///
    /// ```
    /// let rc = sapo::RolloutCorrection::new().with_importance_weights(
    ///     sapo::ImportanceWeights::new(sapo::WeightLevel::Token, sapo::WeightMode::Mask { lower: 3.0, upper: 2.0 }));
    /// assert!(rc.validate().is_err());
    /// ```
    pub fn validate(&self) -> Result<()> {
        check_config(
            self.log_ratio_clamp.is_finite() && self.log_ratio_clamp > 0.0,
            "rollout_correction.log_ratio_clamp",
            "finite and > 0",
            self.log_ratio_clamp,
        )?;
        if let Some(w) = &self.importance_weights {
            let upper = w.mode.upper();
            check_config(
                upper.is_finite() && upper > 0.0,
                "importance_weights.upper",
                "finite and > 0",
                upper,
            )?;
            if let WeightMode::Mask { lower, .. } = w.mode {
                check_config(
                    lower.is_finite() && lower >= 0.0 && lower < upper,
                    "importance_weights.lower",
                    "finite, >= 0 and < upper",
                    lower,
                )?;
            }
        }
        self.rejection()
            .iter()
            .try_for_each(RejectionFilter::validate)
    }
}

/// What [`rollout_correction`] returns.
///
/// ```
/// # use candle_core::{Device, Tensor};
/// # let old = Tensor::new(&[[-1.0f32, -2.0]], &Device::Cpu)?;
/// let out: sapo::RolloutCorrectionOutput =
///     sapo::rollout_correction(&old, &old, &old.ones_like()?, &sapo::RolloutCorrection::new())?;
/// assert_eq!(out.metrics["kl"], 0.0);
/// # Ok::<(), sapo::Error>(())
/// ```
#[derive(Debug, Clone)]
pub struct RolloutCorrectionOutput {
    /// `[B,T]` weights (0 at masked positions), in `old_log_probs`' dtype, when configured.
    pub weights: Option<Tensor>,
    /// `[B,T]`: the input mask with the rejected tokens set to 0, in the mask's dtype.
    pub mask: Tensor,
    /// Every metric verl reports, under its name without the `rollout_corr/` prefix.
    pub metrics: BTreeMap<String, f64>,
}

/// Every diagnostic is finite, or the log-probs that make it overflow f64 are named: the
/// perplexities exponentiate row means of `−ℓ`, `k3_kl` and `ppl_ratio` exponentiate log-ratios,
/// so `|ℓold − ℓrollout|` (or `−ℓ`) beyond about 709 has no finite value.
fn check_metrics_finite(metrics: &BTreeMap<String, f64>) -> Result<()> {
    match metrics.iter().find(|(_, v)| !v.is_finite()) {
        None => Ok(()),
        Some((name, value)) => Err(Error::InvalidValue {
            arg: if name.starts_with("training") {
                "old_log_probs"
            } else {
                "rollout_log_probs"
            },
            expected: "log-probs and log-ratios whose diagnostics are finite in f64 (|log-ratio| \
                       and -log-prob row means below about 709)"
                .into(),
            actual: format!("{name} = {value}"),
        }),
    }
}

/// Computes the rollout correction of a batch: importance weights, the rejection-filtered mask and
/// verl's diagnostics, from the trainer's `old_log_probs`, the engine's `rollout_log_probs` and
/// the `[B,T]` 0/1 `mask`.
///
/// Errors: shapes, dtypes or devices that do not match, a mask with values other than 0/1, a
/// non-finite log-prob at an unmasked position, a mask with no unmasked token, and (mask mode) a
/// batch whose every weight is 0 (verl divides by zero in its effective sample size there).
///
/// ```
/// use candle_core::{Device, Tensor};
/// use sapo::{ImportanceWeights, RolloutCorrection, WeightLevel, WeightMode};
/// let dev = Device::Cpu;
/// let trainer = Tensor::new(&[[-1.0f32, -0.5, -2.0], [-0.3, -1.2, -0.7]], &dev)?;
/// let engine = Tensor::new(&[[-1.1f32, -0.4, -2.0], [-0.3, -1.0, -0.9]], &dev)?;
/// let mask = Tensor::new(&[[1u8, 1, 1], [1, 1, 0]], &dev)?;
/// let tis = RolloutCorrection::new()
///     .with_importance_weights(ImportanceWeights::new(WeightLevel::Token, WeightMode::Truncate { upper: 2.0 }));
/// let out = sapo::rollout_correction(&trainer, &engine, &mask, &tis)?;
/// let w = out.weights.unwrap().to_vec2::<f32>()?;
/// assert!((w[0][0] - 0.1f32.exp()).abs() < 1e-6 && w[1][2] == 0.0);
/// assert!(out.metrics.contains_key("rollout_is_eff_sample_size"));
/// # Ok::<(), sapo::Error>(())
/// ```
pub fn rollout_correction(
    old_log_probs: &Tensor,
    rollout_log_probs: &Tensor,
    mask: &Tensor,
    config: &RolloutCorrection,
) -> Result<RolloutCorrectionOutput> {
    config.validate()?;
    check_float("old_log_probs", old_log_probs)?;
    let dims = old_log_probs.dims().to_vec();
    let [b, t] = dims[..] else {
        return Err(Error::Shape {
            arg: "old_log_probs",
            expected: "[B, T]".into(),
            actual: dims,
        });
    };
    check_float("rollout_log_probs", rollout_log_probs)?;
    check_shape("rollout_log_probs", rollout_log_probs, &dims)?;
    check_device("rollout_log_probs", rollout_log_probs, old_log_probs)?;
    check_shape("mask", mask, &dims)?;
    check_device("mask", mask, old_log_probs)?;
    let read = |x: &Tensor| -> Result<Vec<f64>> {
        Ok(x.detach()
            .to_dtype(DType::F64)?
            .flatten_all()?
            .to_vec1::<f64>()?)
    };
    let m = read(mask)?;
    let bad = m.iter().filter(|&&v| v != 0.0 && v != 1.0).count();
    if bad > 0 {
        return Err(crate::losses::inputs::mask_error(bad as f64));
    }
    let (old, roll) = (read(old_log_probs)?, read(rollout_log_probs)?);
    for (arg, x) in [("old_log_probs", &old), ("rollout_log_probs", &roll)] {
        let bad = x
            .iter()
            .zip(&m)
            .filter(|(v, &k)| k != 0.0 && !v.is_finite())
            .count();
        if bad > 0 {
            return Err(Error::InvalidValue {
                arg,
                expected: "finite values at unmasked positions".into(),
                actual: format!("{bad} non-finite"),
            });
        }
    }
    if !m.contains(&1.0) {
        return Err(Error::InvalidValue {
            arg: "mask",
            expected: "at least one unmasked token".into(),
            actual: "none".into(),
        });
    }
    // Masked positions hold garbage: they are zeroed before any arithmetic.
    let scrub = |x: &[f64]| -> Vec<f64> {
        x.iter()
            .zip(&m)
            .map(|(v, &k)| if k != 0.0 { *v } else { 0.0 })
            .collect()
    };
    let batch = Batch::new(scrub(&old), scrub(&roll), m, b, t, config.log_ratio_clamp);
    let mut metrics = BTreeMap::new();
    let weights = match &config.importance_weights {
        Some(w) => Some(batch.weights(w, &mut metrics)?),
        None => None,
    };
    let mut keep = vec![1.0; b * t];
    let filters = config.rejection();
    for filter in &filters {
        batch.reject(filter, &mut keep, &mut metrics);
    }
    if !filters.is_empty() {
        let rejected: Vec<f64> = keep.iter().map(|k| 1.0 - k).collect();
        metrics.insert(
            "rollout_rs_masked_fraction".into(),
            batch.masked_mean(&rejected),
        );
        let rows_hit = (0..b)
            .filter(|&i| batch.row(i).any(|j| batch.m[j] != 0.0 && keep[j] <= 0.5))
            .count();
        metrics.insert(
            "rollout_rs_seq_masked_fraction".into(),
            rows_hit as f64 / b as f64,
        );
    }
    batch.off_policy(&mut metrics);
    check_metrics_finite(&metrics)?;
    let device = old_log_probs.device();
    let new_mask: Vec<f64> = batch.m.iter().zip(&keep).map(|(m, k)| m * k).collect();
    Ok(RolloutCorrectionOutput {
        weights: weights
            .map(|w| Tensor::from_vec(w, (b, t), device)?.to_dtype(old_log_probs.dtype()))
            .transpose()?,
        mask: Tensor::from_vec(new_mask, (b, t), device)?.to_dtype(mask.dtype())?,
        metrics,
    })
}

/// A batch on the host (masked positions zeroed).
struct Batch {
    /// `d = ℓold − ℓroll` (unclamped).
    d: Vec<f64>,
    old: Vec<f64>,
    roll: Vec<f64>,
    m: Vec<f64>,
    b: usize,
    t: usize,
    clamp: f64,
    /// `n_i`.
    n: Vec<f64>,
    /// `S_i = Σ_t m·d`.
    sums: Vec<f64>,
}

fn mean(x: &[f64]) -> f64 {
    x.iter().sum::<f64>() / x.len().max(1) as f64
}

/// Sample standard deviation (n − 1); 0 for fewer than two values.
fn sample_std(x: &[f64]) -> f64 {
    if x.len() < 2 {
        return 0.0;
    }
    let mu = mean(x);
    (x.iter().map(|v| (v - mu) * (v - mu)).sum::<f64>() / (x.len() - 1) as f64).sqrt()
}

fn max_of(x: &[f64]) -> f64 {
    x.iter().copied().fold(f64::NEG_INFINITY, f64::max)
}

fn min_of(x: &[f64]) -> f64 {
    x.iter().copied().fold(f64::INFINITY, f64::min)
}

fn fraction(x: &[f64], pred: impl Fn(f64) -> bool) -> f64 {
    x.iter().filter(|&&v| pred(v)).count() as f64 / x.len().max(1) as f64
}

impl Batch {
    fn new(old: Vec<f64>, roll: Vec<f64>, m: Vec<f64>, b: usize, t: usize, clamp: f64) -> Self {
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
    fn row(&self, i: usize) -> std::ops::Range<usize> {
        i * self.t..(i + 1) * self.t
    }
    fn clamped(&self, x: f64) -> f64 {
        x.clamp(-self.clamp, self.clamp)
    }
    fn row_sums(&self, x: &[f64]) -> Vec<f64> {
        (0..self.b)
            .map(|i| self.row(i).map(|j| self.m[j] * x[j]).sum())
            .collect()
    }
    /// `r̄_i(x) = Σ_t m·x / (n_i + 1e-8)`, every row.
    fn row_means(&self, x: &[f64]) -> Vec<f64> {
        self.row_sums(x)
            .iter()
            .zip(&self.n)
            .map(|(s, n)| s / (n + COUNT_GUARD))
            .collect()
    }
    /// `Σ m·x / (N + 1e-8)`.
    fn masked_mean(&self, x: &[f64]) -> f64 {
        let total: f64 = x.iter().zip(&self.m).map(|(v, m)| v * m).sum();
        total / (self.m.iter().sum::<f64>() + COUNT_GUARD)
    }
    fn tokens(&self) -> f64 {
        self.m.iter().sum()
    }
    fn unmasked<'a>(&'a self, x: &'a [f64]) -> impl Iterator<Item = f64> + 'a {
        x.iter()
            .zip(&self.m)
            .filter(|(_, &m)| m != 0.0)
            .map(|(v, _)| *v)
    }
    /// The values of the non-empty rows.
    fn valid_rows(&self, x: &[f64]) -> Vec<f64> {
        x.iter()
            .zip(&self.n)
            .filter(|(_, &n)| n > 0.0)
            .map(|(v, _)| *v)
            .collect()
    }
    /// `sqrt(max(mean_m(x̃²) − mean_m(x̃)², 0))`, `x̃ = clamp(x, lo, hi)`; 0 with ≤ 1 token.
    fn clamped_std(&self, x: &[f64], lo: f64, hi: f64) -> f64 {
        if self.tokens() <= 1.0 {
            return 0.0;
        }
        let c: Vec<f64> = x.iter().map(|v| v.max(lo).min(hi)).collect();
        let sq: Vec<f64> = c.iter().map(|v| v * v).collect();
        let mu = self.masked_mean(&c);
        (self.masked_mean(&sq) - mu * mu).max(0.0).sqrt()
    }

    /// The importance weights and their metrics.
    fn weights(
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

    /// One rejection filter: multiplies `keep` by its decision and adds its metrics.
    fn reject(
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

    /// The off-policy diagnostics (every row counts).
    fn off_policy(&self, metrics: &mut BTreeMap<String, f64>) {
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
