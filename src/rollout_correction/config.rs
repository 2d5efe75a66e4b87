//! The configuration of a rollout correction: importance weights, rejection filters, clamp.
//!
//! Layer: objectives (a loss's [`crate::Bypass`] holds one). Imports the math layer only.

use crate::error::{check_config, Error, Result};

/// verl's `SAFETY_BOUND`: the clamp of the log-ratios (and their row sums) before `exp`.
///
/// ```
/// use sapo::rollout_correction::{RolloutCorrection, ROLLOUT_LOG_RATIO_CLAMP};
/// assert_eq!(RolloutCorrection::new().log_ratio_clamp, ROLLOUT_LOG_RATIO_CLAMP);
/// ```
pub const ROLLOUT_LOG_RATIO_CLAMP: f64 = 20.0;

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
    pub(super) fn metric_lower(&self) -> f64 {
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
    pub(super) fn value(&self, d: f64) -> f64 {
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
    pub(super) fn thresholds(&self) -> (f64, f64) {
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
