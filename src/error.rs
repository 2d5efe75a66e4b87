//! The crate's one error type.
//!
//! Every bad input is reported with the name of the argument, what was expected and what was
//! found. Errors raised by candle itself are wrapped in [`Error::Candle`].

use candle_core::{DType, Tensor};

/// Errors returned by `sapo`.
///
/// ```
/// use sapo::{Error, Sapo};
/// let err = Sapo { tau_pos: 0.0, ..Sapo::default() }.build().unwrap_err();
/// assert!(matches!(err, Error::InvalidConfig { name: "tau_pos", .. }));
/// assert!(err.to_string().contains("tau_pos"));
/// ```
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A tensor argument has the wrong shape or rank.
    #[error("`{arg}`: expected shape {expected}, got {actual:?}")]
    Shape {
        /// The argument's name.
        arg: &'static str,
        /// The expected shape, e.g. `[B, T] = [4, 16]`.
        expected: String,
        /// The shape that was passed.
        actual: Vec<usize>,
    },
    /// A tensor argument has a dtype that is not accepted.
    #[error("`{arg}`: expected dtype {expected}, got {actual:?}")]
    DType {
        /// The argument's name.
        arg: &'static str,
        /// The accepted dtypes.
        expected: &'static str,
        /// The dtype that was passed.
        actual: DType,
    },
    /// A tensor argument lives on another device than `log_probs`.
    #[error("`{arg}`: expected device {expected}, got {actual}")]
    Device {
        /// The argument's name.
        arg: &'static str,
        /// The device of the reference argument.
        expected: String,
        /// The device of this argument.
        actual: String,
    },
    /// A tensor argument holds a value outside its domain (a mask value other than 0/1, a target
    /// id ≥ V, a non-finite log-prob at an unmasked position, ...).
    #[error("`{arg}`: expected {expected}, got {actual}")]
    InvalidValue {
        /// The argument's name.
        arg: &'static str,
        /// What the values must satisfy.
        expected: String,
        /// What was found.
        actual: String,
    },
    /// A configuration parameter is out of range; raised when the configuration is built.
    #[error("invalid config `{name}`: expected {expected}, got {actual}")]
    InvalidConfig {
        /// The parameter's name.
        name: &'static str,
        /// The valid range.
        expected: &'static str,
        /// The value that was given.
        actual: String,
    },
    /// Two metric accumulators of different objectives were merged.
    #[error("cannot merge metrics: {0}")]
    MetricsMismatch(String),
    /// An error from candle.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

/// `Result` with [`Error`].
///
/// ```
/// fn build() -> sapo::error::Result<sapo::PolicyLoss> { sapo::Sapo::default().build() }
/// assert!(build().is_ok());
/// ```
pub type Result<T> = std::result::Result<T, Error>;

impl From<Error> for candle_core::Error {
    fn from(err: Error) -> Self {
        match err {
            Error::Candle(inner) => inner,
            other => candle_core::Error::wrap(other),
        }
    }
}

/// Checks that `value` is in range, or returns [`Error::InvalidConfig`].
pub(crate) fn check_config(
    ok: bool,
    name: &'static str,
    expected: &'static str,
    value: impl std::fmt::Debug,
) -> Result<()> {
    if ok {
        Ok(())
    } else {
        Err(Error::InvalidConfig {
            name,
            expected,
            actual: format!("{value:?}"),
        })
    }
}

/// The value checks that need the data beyond finiteness, made the same way on every path (see
/// `losses/checks.rs`), in the order their counts are kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ValueCheck {
    /// `is_weights < 0` at unmasked positions.
    NegativeWeights,
    /// Unclamped k3: `ℓref − ℓ` beyond `ln(max)` of the compute dtype.
    K3Overflow,
    /// This batch's unmasked tokens above `normalizer.global_tokens`.
    GlobalTokens,
    /// This batch's counted rows above `normalizer.global_sequences`.
    GlobalSequences,
    /// A non-finite loss.
    Loss,
}

impl ValueCheck {
    /// Every check, in the order of the counts.
    pub(crate) const ALL: [Self; 5] = [
        Self::NegativeWeights,
        Self::K3Overflow,
        Self::GlobalTokens,
        Self::GlobalSequences,
        Self::Loss,
    ];

    /// The error of this check for a count `count` (> 0).
    pub(crate) fn error(self, count: f64) -> Error {
        let (arg, expected, what) = match self {
            Self::NegativeWeights => ("is_weights", ">= 0 at unmasked positions", "negative"),
            Self::K3Overflow => (
                "ref_log_probs",
                "ℓref − ℓ <= ln(max) of the dtype it is computed in (88.72 in f32, 709.78 in \
                 f64; 11.09 in f16) at unmasked positions, so that the unclamped k3's \
                 e^(ℓref − ℓ) is finite (clamp it with KlPenalty::with_clamp(true), or compute \
                 in f64)",
                "above the bound",
            ),
            Self::GlobalTokens => (
                "normalizer.global_tokens",
                "at least this batch's unmasked-token count",
                "unmasked tokens in this batch, more than the global count",
            ),
            Self::GlobalSequences => (
                "normalizer.global_sequences",
                "at least this batch's non-empty rows (all its rows for seq-mean)",
                "rows in this batch, more than the global count",
            ),
            Self::Loss => (
                "loss",
                "finite (the inputs overflow the compute dtype)",
                "non-finite",
            ),
        };
        Error::InvalidValue {
            arg,
            expected: expected.into(),
            actual: format!("{count} {what}"),
        }
    }
}

/// Checks that a scalar argument's value is in its domain, or returns [`Error::InvalidValue`].
pub(crate) fn check_value(
    ok: bool,
    arg: &'static str,
    expected: &str,
    value: impl std::fmt::Debug,
) -> Result<()> {
    if ok {
        Ok(())
    } else {
        Err(Error::InvalidValue {
            arg,
            expected: expected.into(),
            actual: format!("{value:?}"),
        })
    }
}

/// Checks that a positive scale parameter (a temperature `τ`, the sampling temperature) is usable in
/// f32, the type the kernels compute in: `x` and `numerator / x` are finite and > 0 there.
pub(crate) fn check_positive_scale(
    name: &'static str,
    x: f64,
    numerator: f64,
    expected: &'static str,
) -> Result<()> {
    let usable = |v: f64| v.is_finite() && v > 0.0 && (v as f32).is_finite() && (v as f32) > 0.0;
    check_config(usable(x) && usable(numerator / x), name, expected, x)
}

/// Checks that `tensor` has exactly `expected` dims.
pub(crate) fn check_shape(arg: &'static str, tensor: &Tensor, expected: &[usize]) -> Result<()> {
    if tensor.dims() == expected {
        Ok(())
    } else {
        Err(Error::Shape {
            arg,
            expected: format!("{expected:?}"),
            actual: tensor.dims().to_vec(),
        })
    }
}

/// The `(B, T)` of a `[B, T]` tensor, else a shape error naming `arg`.
pub(crate) fn matrix_dims(arg: &'static str, tensor: &Tensor) -> Result<(usize, usize)> {
    match tensor.dims() {
        &[b, t] => Ok((b, t)),
        other => Err(Error::Shape {
            arg,
            expected: "[B, T]".into(),
            actual: other.to_vec(),
        }),
    }
}

/// Checks that `tensor` is on the same device as `reference`.
pub(crate) fn check_device(arg: &'static str, tensor: &Tensor, reference: &Tensor) -> Result<()> {
    if tensor.device().same_device(reference.device()) {
        Ok(())
    } else {
        Err(Error::Device {
            arg,
            expected: format!("{:?}", reference.device().location()),
            actual: format!("{:?}", tensor.device().location()),
        })
    }
}

/// Checks that `tensor` is a floating-point tensor (f16, bf16, f32, f64).
pub(crate) fn check_float(arg: &'static str, tensor: &Tensor) -> Result<()> {
    match tensor.dtype() {
        DType::F16 | DType::BF16 | DType::F32 | DType::F64 => Ok(()),
        actual => Err(Error::DType {
            arg,
            expected: "a float dtype (f16, bf16, f32, f64)",
            actual,
        }),
    }
}

/// The first violated check of `counts` (in [`ValueCheck::ALL`]'s order from `first`), if any.
pub(crate) fn first_violation(counts: &[f64], first: usize) -> Result<()> {
    match counts.iter().position(|&c| c > 0.0) {
        Some(k) => Err(ValueCheck::ALL[first + k].error(counts[k])),
        None => Ok(()),
    }
}
