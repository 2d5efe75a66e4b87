//! KL penalty to a frozen reference policy (Schulman's estimators, as verl and TRL name them).
//!
//! With `d = ℓ − ℓref`:
//!
//! | estimator | value | gradient w.r.t. `ℓ` |
//! |---|---|---|
//! | [`K1`](KlEstimator::K1) | `d` | `1` |
//! | [`Abs`](KlEstimator::Abs) | `|d|` | `sign(d)` |
//! | [`K2`](KlEstimator::K2) (`mse`) | `½ d²` | `d` |
//! | [`K3`](KlEstimator::K3) (`low_var_kl`) | `e^{−d} + d − 1` | `1 − e^{−d}` |
//! | [`K3Plus`](KlEstimator::K3Plus) | value of k3 | gradient of k2 (straight-through) |
//!
//! verl clamps k3's `−d` to ±20 and its value to ±10 ([`KlPenalty::clamp`] = `true`); TRL does
//! not.

use candle_core::Tensor;

use crate::aggregation::Aggregation;
use crate::error::{check_config, Error, Result};

/// Which KL estimator the penalty uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KlEstimator {
    /// `ℓ − ℓref` (verl `kl`/`k1`).
    K1,
    /// `|ℓ − ℓref|` (verl `abs`).
    Abs,
    /// `½(ℓ − ℓref)²` (verl `mse`/`k2`): its gradient is the unbiased KL gradient.
    K2,
    /// `e^{ℓref−ℓ} − (ℓref−ℓ) − 1` (verl `low_var_kl`/`k3`, TRL's `beta` term).
    K3,
    /// Value of k3, gradient of k2: `k2 − sg[k2] + sg[k3]` (verl `k3+`).
    K3Plus,
}

impl KlEstimator {
    /// Parses the names verl uses (`kl`, `k1`, `abs`, `mse`, `k2`, `low_var_kl`, `k3`, `k3+`,
    /// `low_var_kl+`).
    ///
    /// ```
    /// assert_eq!(sapo::KlEstimator::from_name("low_var_kl")?, sapo::KlEstimator::K3);
    /// # Ok::<(), sapo::Error>(())
    /// ```
    pub fn from_name(name: &str) -> Result<Self> {
        Ok(match name {
            "k1" | "kl" => Self::K1,
            "abs" => Self::Abs,
            "k2" | "mse" => Self::K2,
            "k3" | "low_var_kl" => Self::K3,
            "k3+" | "low_var_kl+" => Self::K3Plus,
            other => {
                return Err(Error::InvalidConfig {
                    name: "kl.estimator",
                    expected: "one of k1, abs, k2, k3, k3+",
                    actual: format!("{other:?}"),
                })
            }
        })
    }
}

/// A KL penalty `β · agg(k(ℓ, ℓref))` added to the policy loss.
///
/// ```
/// use sapo::{Aggregation, KlEstimator, KlPenalty};
/// let kl = KlPenalty::new(0.04, KlEstimator::K3).with_clamp(false); // TRL's `beta = 0.04`
/// assert_eq!(kl.aggregation, Aggregation::TokenMean);
/// ```
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct KlPenalty {
    /// `β` ≥ 0.
    pub coef: f64,
    /// The estimator `k`.
    pub estimator: KlEstimator,
    /// How the per-token penalty is reduced (default `token-mean`, as verl).
    pub aggregation: Aggregation,
    /// verl's clamps on k3 (`ℓref − ℓ` to ±20, the value to ±10); default `true`.
    pub clamp: bool,
}

impl KlPenalty {
    /// A penalty with coefficient `coef`, `token-mean` aggregation and verl's clamp.
    pub fn new(coef: f64, estimator: KlEstimator) -> Self {
        Self {
            coef,
            estimator,
            aggregation: Aggregation::TokenMean,
            clamp: true,
        }
    }
    /// Sets the aggregation.
    pub fn with_aggregation(mut self, aggregation: Aggregation) -> Self {
        self.aggregation = aggregation;
        self
    }
    /// Turns verl's k3 clamps on or off.
    pub fn with_clamp(mut self, clamp: bool) -> Self {
        self.clamp = clamp;
        self
    }
    /// Rejects a negative or non-finite coefficient and a bad aggregation.
    pub fn validate(&self) -> Result<()> {
        check_config(
            self.coef.is_finite() && self.coef >= 0.0,
            "kl.coef",
            "finite and >= 0",
            self.coef,
        )?;
        self.aggregation.validate()
    }
}

/// Per-token KL estimate `k(ℓ, ℓref)`, differentiable with respect to `log_probs`.
///
/// ```
/// use candle_core::{Device, Tensor};
/// use sapo::{kl_penalty, KlEstimator};
/// let lp = Tensor::new(&[-1.0f64, -2.0], &Device::Cpu)?;
/// let rf = Tensor::new(&[-1.5f64, -2.0], &Device::Cpu)?;
/// let k3 = kl_penalty(&lp, &rf, KlEstimator::K3, true)?.to_vec1::<f64>()?;
/// assert!((k3[0] - ((-0.5f64).exp() + 0.5 - 1.0)).abs() < 1e-12);
/// assert_eq!(k3[1], 0.0);
/// # Ok::<(), sapo::Error>(())
/// ```
pub fn kl_penalty(
    log_probs: &Tensor,
    ref_log_probs: &Tensor,
    estimator: KlEstimator,
    clamp: bool,
) -> Result<Tensor> {
    let diff = log_probs.sub(ref_log_probs)?;
    let k3 = || -> Result<Tensor> {
        let neg = diff.neg()?;
        let neg = if clamp { neg.clamp(-20.0, 20.0)? } else { neg };
        let value = ((neg.exp()? - &neg)? - 1.0)?;
        Ok(if clamp {
            value.clamp(-10.0, 10.0)?
        } else {
            value
        })
    };
    let k2 = || -> Result<Tensor> { Ok((diff.sqr()? * 0.5)?) };
    Ok(match estimator {
        KlEstimator::K1 => diff.clone(),
        KlEstimator::Abs => diff.abs()?,
        KlEstimator::K2 => k2()?,
        KlEstimator::K3 => k3()?,
        KlEstimator::K3Plus => {
            let k2 = k2()?;
            ((&k2 - k2.detach())? + k3()?.detach())?
        }
    })
}
