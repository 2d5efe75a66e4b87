//! Reducing a `[B,T]` per-token loss to a scalar (verl's `agg_loss` semantics), with global
//! normalizers for data parallelism and gradient accumulation.
//! Every formula, with the peer it matches: [the formulas page](crate::formulas).
//!
//! | mode | scalar |
//! |---|---|
//! | [`TokenMean`](Aggregation::TokenMean) | `Σ m·L / N_tok` |
//! | [`TokenSum`](Aggregation::TokenSum) | `Σ m·L` |
//! | [`SeqMeanTokenMean`](Aggregation::SeqMeanTokenMean) | `(1/B') Σ_{i: n_i>0} (Σ_t m·L)/n_i` |
//! | [`SeqMeanTokenSum`](Aggregation::SeqMeanTokenSum) | `(1/B') Σ_i Σ_t m·L` |
//! | [`SeqMeanTokenSumNorm`](Aggregation::SeqMeanTokenSumNorm) | `(1/B') Σ_i Σ_t m·L / H` |
//! | [`SeqMean`](Aggregation::SeqMean) | `(1/B) Σ_i (Σ_t m·L)/n_i`, every row counted (GMPO) |
//!
//! `N_tok` is the number of unmasked tokens and `B'` the number of non-empty rows, unless a
//! [`Normalizer`] gives the global ones; every mode is then multiplied by the world size `W`.

use candle_core::{DType, Tensor, D};

use crate::error::{
    check_config, check_device, check_float, check_shape, Error, Result, ValueCheck,
};
use crate::real::accumulation_dtype;

/// verl's `1e-8` in the counts of its masked means (`masked_mean`, the rollout correction's
/// statistics, the critic's metrics, the KL in the reward).
pub(crate) const COUNT_GUARD: f64 = 1e-8;

/// How per-token losses become one scalar. The names are verl's `loss_agg_mode`.
///
/// ```
/// let dr_grpo = sapo::Aggregation::SeqMeanTokenSumNorm { horizon: Some(1024) };
/// assert_eq!(dr_grpo.name(), "seq-mean-token-sum-norm");
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub enum Aggregation {
    /// `Σ m·L / N_tok` — verl `token-mean`, TRL `bnpo`/`dapo`.
    #[default]
    TokenMean,
    /// `Σ m·L` — verl `token-sum`.
    TokenSum,
    /// Mean over non-empty rows of each row's token mean — verl `seq-mean-token-mean`, TRL
    /// `grpo`/`sapo`.
    SeqMeanTokenMean,
    /// Mean over non-empty rows of each row's token sum — verl `seq-mean-token-sum`.
    SeqMeanTokenSum,
    /// `seq-mean-token-sum / H` — verl `seq-mean-token-sum-norm`, TRL `dr_grpo` with `H` the
    /// maximum completion length. `horizon: None` takes `H = T`.
    SeqMeanTokenSumNorm {
        /// The constant `H`; `Some(0)` is rejected.
        horizon: Option<usize>,
    },
    /// Mean over **all** `B` rows (empty ones count as 0) of each row's token mean — verl's GMPO
    /// (`geo_mean`, golden `seq-mean`): `(1/B) Σ_i −Ā_i·S_i` for a per-sequence loss spread over
    /// the row's tokens. The normalizer's `global_sequences` is then the global row count.
    SeqMean,
}

impl Aggregation {
    /// verl's name for the mode (`"token-mean"`, ...).
    ///
    /// ```
    /// assert_eq!(sapo::Aggregation::SeqMeanTokenMean.name(), "seq-mean-token-mean");
    /// ```
    pub fn name(&self) -> &'static str {
        match self {
            Self::TokenMean => "token-mean",
            Self::TokenSum => "token-sum",
            Self::SeqMeanTokenMean => "seq-mean-token-mean",
            Self::SeqMeanTokenSum => "seq-mean-token-sum",
            Self::SeqMeanTokenSumNorm { .. } => "seq-mean-token-sum-norm",
            Self::SeqMean => "seq-mean",
        }
    }

    /// Parses verl's name; `horizon` is used by `seq-mean-token-sum-norm` only.
    ///
    /// ```
    /// use sapo::Aggregation;
    /// assert_eq!(Aggregation::from_name("token-sum", None)?, Aggregation::TokenSum);
    /// assert!(Aggregation::from_name("mean", None).is_err());
    /// # Ok::<(), sapo::Error>(())
    /// ```
    pub fn from_name(name: &str, horizon: Option<usize>) -> Result<Self> {
        let agg = match name {
            "token-mean" => Self::TokenMean,
            "token-sum" => Self::TokenSum,
            "seq-mean-token-mean" => Self::SeqMeanTokenMean,
            "seq-mean-token-sum" => Self::SeqMeanTokenSum,
            "seq-mean-token-sum-norm" => Self::SeqMeanTokenSumNorm { horizon },
            "seq-mean" => Self::SeqMean,
            other => {
                return Err(Error::InvalidConfig {
                    name: "aggregation",
                    expected: "one of token-mean, token-sum, seq-mean-token-mean, \
                               seq-mean-token-sum, seq-mean-token-sum-norm, seq-mean",
                    actual: format!("{other:?}"),
                })
            }
        };
        agg.validate()?;
        Ok(agg)
    }

    /// Rejects a horizon of 0.
    ///
    /// ```
    /// assert!(sapo::Aggregation::SeqMeanTokenSumNorm { horizon: Some(0) }.validate().is_err());
    /// ```
    pub fn validate(&self) -> Result<()> {
        if let Self::SeqMeanTokenSumNorm { horizon } = self {
            check_config(horizon != &Some(0), "horizon", ">= 1", horizon)?;
        }
        Ok(())
    }

    /// The batch count the mode divides by.
    pub(crate) fn batch_count(&self) -> BatchCount {
        match self {
            Self::TokenMean => BatchCount::Tokens,
            Self::TokenSum => BatchCount::One,
            Self::SeqMeanTokenMean | Self::SeqMeanTokenSum | Self::SeqMeanTokenSumNorm { .. } => {
                BatchCount::Sequences
            }
            Self::SeqMean => BatchCount::Rows,
        }
    }
}

/// Global counts for data parallelism and gradient accumulation.
///
/// When a global batch is split over `W` ranks or micro-batches, pass the global number of
/// unmasked tokens (`global_tokens`, for `token-mean`), the global number of non-empty rows
/// (`global_sequences`, for the `seq-mean-*` modes) and `world_size = W`: each shard then returns
/// `W · (its sum / global count)`, and the mean of the shards' losses and gradients equals the
/// global batch's. `Normalizer::default()` is the local batch alone.
///
/// ```
/// let n = sapo::Normalizer::default().with_global_tokens(4096.0).with_world_size(8);
/// assert_eq!(n.world_size, 8);
/// ```
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Normalizer {
    /// Global unmasked-token count `N_tok` (`None`: this batch's).
    pub global_tokens: Option<f64>,
    /// Global non-empty-row count `B'` (`None`: this batch's).
    pub global_sequences: Option<f64>,
    /// Number of shards `W` whose losses are averaged (≥ 1).
    pub world_size: usize,
}

impl Default for Normalizer {
    fn default() -> Self {
        Self {
            global_tokens: None,
            global_sequences: None,
            world_size: 1,
        }
    }
}

impl Normalizer {
    /// Sets the global unmasked-token count `N_tok` (for `token-mean`).
    ///
    /// ```
    /// assert_eq!(sapo::Normalizer::default().with_global_tokens(512.0).global_tokens, Some(512.0));
    /// ```
    pub fn with_global_tokens(mut self, tokens: f64) -> Self {
        self.global_tokens = Some(tokens);
        self
    }
    /// Sets the global non-empty-row count `B'` (for the `seq-mean-*` modes).
    ///
    /// ```
    /// assert_eq!(sapo::Normalizer::default().with_global_sequences(64.0).global_sequences, Some(64.0));
    /// ```
    pub fn with_global_sequences(mut self, sequences: f64) -> Self {
        self.global_sequences = Some(sequences);
        self
    }
    /// Sets the number of shards `W` whose losses are averaged.
    ///
    /// ```
    /// assert_eq!(sapo::Normalizer::default().with_world_size(8).world_size, 8);
    /// ```
    pub fn with_world_size(mut self, world_size: usize) -> Self {
        self.world_size = world_size;
        self
    }
    /// The normalizer of one of `W` micro-batches (gradient accumulation) or of one rank's shard
    /// of a batch split evenly: the global counts taken from every micro-batch's `[B,T]` 0/1 mask
    /// (`global_tokens` = `Σ N_tok`, `global_sequences` = `Σ B'`, the non-empty rows — or `Σ B`,
    /// every row, for [`Aggregation::SeqMean`]) and `world_size = W`. Each micro-batch's loss is
    /// then its share of the global batch's loss times `W`: `backward()` on each loss divided by
    /// `W` (or the mean of the losses) accumulates the full batch's gradient. One host read per
    /// mask.
    ///
    /// Across ranks the counts must be summed over every rank's masks (an all-reduce of
    /// [`Normalizer::global_tokens`] and [`Normalizer::global_sequences`]), with `world_size` the
    /// number of ranks × micro-batches per rank.
    ///
    /// Errors: no mask, a mask that is not `[B,T]`, holds values other than 0/1.
    ///
    /// ```
    /// use candle_core::{Device, Tensor};
    /// use sapo::{Aggregation, Normalizer};
    /// let a = Tensor::new(&[[1u8, 1, 0], [0, 0, 0]], &Device::Cpu)?;
    /// let b = Tensor::new(&[[1u8, 1, 1]], &Device::Cpu)?;
    /// let n = Normalizer::for_micro_batches(&[&a, &b], Aggregation::SeqMeanTokenMean)?;
    /// assert_eq!((n.global_tokens, n.global_sequences, n.world_size), (Some(5.0), Some(2.0), 2));
    /// # Ok::<(), sapo::Error>(())
    /// ```
    pub fn for_micro_batches(masks: &[&Tensor], aggregation: Aggregation) -> Result<Self> {
        if masks.is_empty() {
            return Err(Error::InvalidValue {
                arg: "masks",
                expected: "at least one micro-batch's mask".into(),
                actual: "none".into(),
            });
        }
        let (mut tokens, mut sequences) = (0.0, 0.0);
        for mask in masks {
            if mask.rank() != 2 {
                return Err(Error::Shape {
                    arg: "masks",
                    expected: "[B, T] for every micro-batch".into(),
                    actual: mask.dims().to_vec(),
                });
            }
            let mask = crate::checks::checked_mask(mask, DType::F64)?;
            let row_tokens = mask.sum(D::Minus1)?.to_vec1::<f64>()?;
            tokens += row_tokens.iter().sum::<f64>();
            sequences += match aggregation.batch_count() {
                BatchCount::Rows => row_tokens.len() as f64,
                _ => row_tokens.iter().filter(|&&n| n > 0.0).count() as f64,
            };
        }
        Ok(Self {
            global_tokens: Some(tokens),
            global_sequences: Some(sequences),
            world_size: masks.len(),
        })
    }

    /// Checks the normalizer ([`Normalizer::validate`]) and that, with `world_size > 1`, it gives
    /// the global count `aggregation` divides by (`global_tokens` for `token-mean`,
    /// `global_sequences` for the `seq-mean*` modes): without it each shard would be divided by
    /// its own count and multiplied by `W`, `W` times the loss.
    ///
    /// ```
    /// use sapo::{Aggregation, Normalizer};
    /// let n = Normalizer::default().with_global_tokens(4096.0).with_world_size(4);
    /// assert!(n.validate_for(Aggregation::TokenMean).is_ok());
    /// assert!(n.validate_for(Aggregation::SeqMeanTokenMean).is_err()); // needs global_sequences
    /// ```
    pub fn validate_for(&self, aggregation: Aggregation) -> Result<()> {
        self.validate()?;
        if self.world_size == 1 {
            return Ok(());
        }
        let (name, given) = match aggregation.batch_count() {
            BatchCount::One => return Ok(()),
            BatchCount::Tokens => ("normalizer.global_tokens", self.global_tokens),
            BatchCount::Sequences | BatchCount::Rows => {
                ("normalizer.global_sequences", self.global_sequences)
            }
        };
        if given.is_none() {
            return Err(Error::InvalidConfig {
                name,
                expected: "a global count whenever world_size > 1 (the aggregation divides by it)",
                actual: format!(
                    "None with world_size {} and {}",
                    self.world_size,
                    aggregation.name()
                ),
            });
        }
        Ok(())
    }

    /// Rejects negative or non-finite counts and a world size of 0.
    ///
    /// ```
    /// assert!(sapo::Normalizer::default().with_world_size(0).validate().is_err());
    /// ```
    pub fn validate(&self) -> Result<()> {
        for (name, v) in [
            ("normalizer.global_tokens", self.global_tokens),
            ("normalizer.global_sequences", self.global_sequences),
        ] {
            if let Some(v) = v {
                check_config(v.is_finite() && v >= 0.0, name, "finite and >= 0", v)?;
            }
        }
        check_config(
            self.world_size >= 1,
            "normalizer.world_size",
            ">= 1",
            self.world_size,
        )
    }
}

/// Per-row and per-batch counts of a `[B,T]` 0/1 mask, kept on the mask's device.
#[derive(Debug, Clone)]
pub(crate) struct MaskCounts {
    /// `n_i`, `[B]`.
    pub row_tokens: Tensor,
    /// `N_tok`, scalar.
    pub tokens: Tensor,
    /// `B'`, scalar.
    pub sequences: Tensor,
    /// `B`, scalar.
    pub rows: Tensor,
}

impl MaskCounts {
    /// The counts in another dtype.
    pub fn to_dtype(&self, dtype: DType) -> Result<Self> {
        Ok(Self {
            row_tokens: self.row_tokens.to_dtype(dtype)?,
            tokens: self.tokens.to_dtype(dtype)?,
            sequences: self.sequences.to_dtype(dtype)?,
            rows: self.rows.to_dtype(dtype)?,
        })
    }

    /// `mask` is a `[B,T]` float 0/1 tensor.
    pub fn new(mask: &Tensor) -> Result<Self> {
        let row_tokens = mask.sum(D::Minus1)?;
        let tokens = row_tokens.sum_all()?;
        let sequences = row_tokens.gt(0.0)?.to_dtype(mask.dtype())?.sum_all()?;
        let rows = Tensor::new(mask.dim(0)? as f64, mask.device())?.to_dtype(mask.dtype())?;
        Ok(Self {
            row_tokens,
            tokens,
            sequences,
            rows,
        })
    }
}

/// `count` (a scalar tensor) clamped to ≥ 1, or the global count when given.
fn denominator(local: &Tensor, global: Option<f64>) -> Result<Tensor> {
    Ok(match global {
        Some(g) => Tensor::new(g.max(1.0), local.device())?.to_dtype(local.dtype())?,
        None => local.maximum(1.0)?,
    })
}

/// Which batch count divides an aggregation's coefficient.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum BatchCount {
    /// None (the sum).
    One,
    /// The unmasked tokens `N_tok`.
    Tokens,
    /// The rows with a token `B'`.
    Sequences,
    /// All rows `B`.
    Rows,
}

/// Which per-row count divides an aggregation's coefficient.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum RowDivisor {
    One,
    /// The row's unmasked tokens `n_i` (at least 1).
    Tokens,
    /// A constant (the horizon of `seq-mean-token-sum-norm`).
    Constant(f64),
}

/// An aggregation's coefficient `W / (max(count, 1) · row divisor)` taken apart, so that a device
/// kernel can apply it to counts it computes itself ([`CoefficientParts::apply`] is the formula).
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct CoefficientParts {
    pub world: f64,
    pub batch: BatchCount,
    /// The data-parallel count replacing the batch's own.
    pub global: Option<f64>,
    pub row: RowDivisor,
}

impl CoefficientParts {
    /// The parts of `aggregation` for rows of length `t`.
    pub(crate) fn new(aggregation: Aggregation, t: usize, normalizer: &Normalizer) -> Self {
        let (batch, global, row) = match aggregation {
            Aggregation::TokenMean => (
                BatchCount::Tokens,
                normalizer.global_tokens,
                RowDivisor::One,
            ),
            Aggregation::TokenSum => (BatchCount::One, None, RowDivisor::One),
            Aggregation::SeqMeanTokenMean => (
                BatchCount::Sequences,
                normalizer.global_sequences,
                RowDivisor::Tokens,
            ),
            Aggregation::SeqMeanTokenSum => (
                BatchCount::Sequences,
                normalizer.global_sequences,
                RowDivisor::One,
            ),
            Aggregation::SeqMeanTokenSumNorm { horizon } => (
                BatchCount::Sequences,
                normalizer.global_sequences,
                RowDivisor::Constant(horizon.unwrap_or(t) as f64),
            ),
            Aggregation::SeqMean => (
                BatchCount::Rows,
                normalizer.global_sequences,
                RowDivisor::Tokens,
            ),
        };
        Self {
            world: normalizer.world_size as f64,
            batch,
            global,
            row,
        }
    }

    /// The coefficient of a row of `row_tokens` unmasked tokens in a batch of `tokens` unmasked
    /// tokens, `sequences` non-empty rows and `rows` rows.
    pub(crate) fn apply(&self, row_tokens: f64, (tokens, sequences, rows): (f64, f64, f64)) -> f64 {
        let local = match self.batch {
            BatchCount::One => 1.0,
            BatchCount::Tokens => tokens,
            BatchCount::Sequences => sequences,
            BatchCount::Rows => rows,
        };
        let count = match self.batch {
            BatchCount::One => 1.0,
            _ => self.global.unwrap_or(local).max(1.0),
        };
        let row = match self.row {
            RowDivisor::One => 1.0,
            RowDivisor::Tokens => row_tokens.max(1.0),
            RowDivisor::Constant(c) => c,
        };
        self.world * (1.0 / (count * row))
    }
}

/// Coefficient of `m·L[i,t]` in the aggregated scalar for a row of `row_tokens` unmasked tokens,
/// given the batch's `tokens`, non-empty `sequences` and `rows`, and the row length `t` — the
/// scalar form of [`aggregate_masked`], used by the fused kernels.
pub(crate) fn row_coefficient(
    aggregation: Aggregation,
    row_tokens: f64,
    batch: (f64, f64, f64),
    t: usize,
    normalizer: &Normalizer,
) -> f64 {
    CoefficientParts::new(aggregation, t, normalizer).apply(row_tokens, batch)
}

/// Aggregates a masked per-token loss (zeros at masked positions, finite everywhere) — the
/// tensor form of [`row_coefficient`]. Sums accumulate in f64 (f32 on Metal, which has none);
/// the result has `masked`'s dtype.
pub(crate) fn aggregate_masked(
    masked: &Tensor,
    counts: &MaskCounts,
    aggregation: Aggregation,
    normalizer: &Normalizer,
) -> Result<Tensor> {
    let dtype = masked.dtype();
    let acc = accumulation_dtype(masked.device());
    let world = normalizer.world_size as f64;
    let counts = counts.to_dtype(acc)?;
    let masked = masked.to_dtype(acc)?;
    let seq_denominator = || denominator(&counts.sequences, normalizer.global_sequences);
    let scalar = match aggregation {
        Aggregation::TokenMean => masked
            .sum_all()?
            .div(&denominator(&counts.tokens, normalizer.global_tokens)?)?,
        Aggregation::TokenSum => masked.sum_all()?,
        Aggregation::SeqMeanTokenMean => masked
            .sum(D::Minus1)?
            .div(&counts.row_tokens.maximum(1.0)?)?
            .sum_all()?
            .div(&seq_denominator()?)?,
        Aggregation::SeqMeanTokenSum => masked.sum_all()?.div(&seq_denominator()?)?,
        Aggregation::SeqMeanTokenSumNorm { horizon } => {
            let horizon = horizon.unwrap_or(masked.dim(D::Minus1)?) as f64;
            masked
                .sum_all()?
                .div(&seq_denominator()?)?
                .affine(1.0 / horizon, 0.0)?
        }
        Aggregation::SeqMean => masked
            .sum(D::Minus1)?
            .div(&counts.row_tokens.maximum(1.0)?)?
            .sum_all()?
            .div(&denominator(&counts.rows, normalizer.global_sequences)?)?,
    };
    let scalar = if world == 1.0 {
        scalar
    } else {
        scalar.affine(world, 0.0)?
    };
    Ok(scalar.to_dtype(dtype)?)
}

/// Aggregates a `[B,T]` per-token loss `loss_mat` under a `[B,T]` 0/1 `mask` into a scalar.
///
/// Masked positions never reach the result (they may hold NaN or ±inf); a mask with no unmasked
/// token gives 0. The result is differentiable with respect to `loss_mat`.
///
/// ```
/// use candle_core::{Device, Tensor};
/// use sapo::{aggregate, Aggregation, Normalizer};
/// let loss = Tensor::new(&[[1f32, 2., 3.], [4., f32::NAN, 0.]], &Device::Cpu)?;
/// let mask = Tensor::new(&[[1f32, 1., 1.], [1., 0., 0.]], &Device::Cpu)?;
/// let v = aggregate(&loss, &mask, Aggregation::SeqMeanTokenMean, &Normalizer::default())?;
/// assert_eq!(v.to_scalar::<f32>()?, 3.0); // (2 + 4) / 2
/// let v = aggregate(&loss, &mask, Aggregation::TokenMean, &Normalizer::default())?;
/// assert_eq!(v.to_scalar::<f32>()?, 2.5);
/// # Ok::<(), sapo::Error>(())
/// ```
pub fn aggregate(
    loss_mat: &Tensor,
    mask: &Tensor,
    aggregation: Aggregation,
    normalizer: &Normalizer,
) -> Result<Tensor> {
    aggregation.validate()?;
    normalizer.validate_for(aggregation)?;
    check_float("loss_mat", loss_mat)?;
    crate::error::matrix_dims("loss_mat", loss_mat)?;
    let dims = loss_mat.dims();
    check_shape("mask", mask, dims)?;
    check_device("mask", mask, loss_mat)?;
    let dtype = if loss_mat.dtype() == DType::F64 {
        DType::F64
    } else {
        DType::F32
    };
    let mask = crate::checks::checked_mask(mask, dtype)?;
    let keep = mask.ne(0.0)?;
    let loss_mat = loss_mat.to_dtype(dtype)?;
    crate::checks::check_finite_where("loss_mat", &loss_mat, &mask)?;
    let every_row = aggregation.batch_count() == BatchCount::Rows;
    let excess = global_count_excess(&mask.to_dtype(DType::F32)?, every_row, normalizer)?
        .to_dtype(DType::F64)?
        .to_vec1::<f64>()?;
    for (check, count) in [ValueCheck::GlobalTokens, ValueCheck::GlobalSequences]
        .into_iter()
        .zip(excess)
    {
        if count > 0.0 {
            return Err(check.error(count));
        }
    }
    let masked = keep.where_cond(&loss_mat, &loss_mat.zeros_like()?)?;
    aggregate_masked(&masked, &MaskCounts::new(&mask)?, aggregation, normalizer)
}

/// The global-count rule's two counts as a `[2]` f32 tensor on `keep`'s device: this batch's
/// unmasked tokens where they exceed `normalizer.global_tokens`, and its counted rows (every row
/// when `every_row`, the `seq-mean` count; else the non-empty ones) where they exceed
/// `normalizer.global_sequences`; 0 where the rule holds or no global count is given. `keep` is
/// a `[B,T]` f32 0/1 mask. Shared by the policy loss's checks and [`aggregate`].
pub(crate) fn global_count_excess(
    keep: &Tensor,
    every_row: bool,
    normalizer: &Normalizer,
) -> Result<Tensor> {
    let device = keep.device();
    // A count above its global value: the count itself, else 0.
    let beyond = |count: Tensor, global: Option<f64>| -> Result<Tensor> {
        Ok(match global {
            Some(g) => count.gt(g)?.to_dtype(DType::F32)?.mul(&count)?,
            None => Tensor::zeros((), DType::F32, device)?,
        })
    };
    let tokens = keep.sum_all()?;
    let rows = if every_row {
        Tensor::new(keep.dim(0)? as f32, device)?
    } else {
        keep.sum(D::Minus1)?
            .gt(0.0)?
            .to_dtype(DType::F32)?
            .sum_all()?
    };
    Ok(Tensor::stack(
        &[
            beyond(tokens, normalizer.global_tokens)?,
            beyond(rows, normalizer.global_sequences)?,
        ],
        0,
    )?)
}
