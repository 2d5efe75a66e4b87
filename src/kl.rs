//! KL penalty to a frozen reference policy (Schulman's estimators, as verl and TRL name them).
//! Every formula, with the peer it matches: [the formulas page](crate::formulas).
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
//! not. Both forms live here side by side: [`kl_penalty`] on tensors (composed, differentiable)
//! and the scalar form the kernels run; their kinks follow `piecewise.rs` (`|d|` has
//! gradient 0 at `d = 0`, a clamp has gradient 0 at its bounds).

use candle_core::Tensor;

use crate::aggregation::Aggregation;
use crate::checks::check_finite;
use crate::error::{
    check_config, check_device, check_float, check_shape, Error, Result, ValueCheck,
};
use crate::piecewise::{self, abs_scalar, clamp_scalar};
use crate::real::Real;

/// Which KL estimator the penalty uses (`d = ℓ − ℓref`: k1 `d`, abs `|d|`, k2 `½d²`, k3
/// `e^{−d} + d − 1`, k3+ the value of k3 with the gradient of k2).
///
/// ```
/// use sapo::{KlEstimator, KlPenalty};
/// let verl = KlPenalty::new(0.001, KlEstimator::K3); // kl_loss_type=low_var_kl
/// assert_eq!(verl.estimator, KlEstimator::K3);
/// ```
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
    /// Every estimator, in the order of the enum (for sweeps over all of them).
    ///
    /// ```
    /// assert_eq!(sapo::KlEstimator::ALL.len(), 5);
    /// ```
    pub const ALL: [KlEstimator; 5] = [
        KlEstimator::K1,
        KlEstimator::Abs,
        KlEstimator::K2,
        KlEstimator::K3,
        KlEstimator::K3Plus,
    ];

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
    /// Multiply each token's estimate by the policy term's ratio `R` (token `ρ`, sequence `s`),
    /// not detached: TRL/Liger's `use_bias_correction_kl` (DeepSeek-V3.2); default `false`.
    pub importance_weighted: bool,
}

impl KlPenalty {
    /// A penalty `β·agg(k)` with coefficient `coef`, `token-mean` aggregation and verl's clamp.
    ///
    /// ```
    /// let kl = sapo::KlPenalty::new(0.04, sapo::KlEstimator::K3);
    /// assert!(kl.clamp);
    /// ```
    pub fn new(coef: f64, estimator: KlEstimator) -> Self {
        Self {
            coef,
            estimator,
            aggregation: Aggregation::TokenMean,
            clamp: true,
            importance_weighted: false,
        }
    }
    /// Sets the aggregation of the penalty (verl: the actor's mode).
    ///
    /// ```
    /// use sapo::{Aggregation, KlEstimator, KlPenalty};
    /// let kl = KlPenalty::new(0.1, KlEstimator::K1).with_aggregation(Aggregation::SeqMeanTokenMean);
    /// assert_eq!(kl.aggregation, Aggregation::SeqMeanTokenMean);
    /// ```
    pub fn with_aggregation(mut self, aggregation: Aggregation) -> Self {
        self.aggregation = aggregation;
        self
    }
    /// Turns verl's k3 clamps (`|ℓref − ℓ| ≤ 20`, `|k3| ≤ 10`) on or off (TRL: off).
    ///
    /// ```
    /// assert!(!sapo::KlPenalty::new(0.04, sapo::KlEstimator::K3).with_clamp(false).clamp);
    /// ```
    pub fn with_clamp(mut self, clamp: bool) -> Self {
        self.clamp = clamp;
        self
    }
    /// Weighs the estimate by the policy's importance ratio, `k̂ = k·R` with `R` not detached
    /// (TRL `use_bias_correction_kl`): the ratio of the objective's level, with its log-ratio
    /// clamp if it has one (TRL has none), before any two-sided `δ`.
    ///
    /// ```
    /// let kl = sapo::KlPenalty::new(0.04, sapo::KlEstimator::K3).with_importance_weighting(true);
    /// assert!(kl.importance_weighted);
    /// ```
    pub fn with_importance_weighting(mut self, on: bool) -> Self {
        self.importance_weighted = on;
        self
    }
    /// Rejects a negative or non-finite coefficient and a bad aggregation.
    ///
    /// ```
    /// assert!(sapo::KlPenalty::new(-1.0, sapo::KlEstimator::K2).validate().is_err());
    /// ```
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

/// verl's bound on k3's log-ratio: `clamp(ℓref − ℓ, −20, 20)` (when [`KlPenalty::clamp`] is
/// set).
///
/// ```
/// assert_eq!(sapo::kl::K3_LOG_RATIO_BOUND, 20.0);
/// ```
pub const K3_LOG_RATIO_BOUND: f64 = 20.0;
/// verl's bound on k3's value: `clamp(k3, −10, 10)` (when [`KlPenalty::clamp`] is set).
///
/// ```
/// assert_eq!(sapo::kl::K3_VALUE_BOUND, 10.0);
/// ```
pub const K3_VALUE_BOUND: f64 = 10.0;

// ---------------------------------------------------------------------------------------------
// Scalar form (the kernels').

/// `(k, ∂k/∂ℓ)` of an estimator at `d = ℓ − ℓref`, with the subgradients of [`crate::piecewise`].
#[inline(always)]
pub(crate) fn value_and_slope<R: Real>(estimator: KlEstimator, clamp: bool, d: R) -> (R, R) {
    let half = R::from_f64(0.5);
    let bound = |c: f64| if clamp { R::from_f64(c) } else { R::INFINITY };
    let k3 = || {
        let (c1, c2) = (bound(K3_LOG_RATIO_BOUND), bound(K3_VALUE_BOUND));
        let (neg, dneg) = clamp_scalar(-d, -c1, c1);
        let e = neg.exp();
        let (value, dvalue) = clamp_scalar(e - neg - R::ONE, -c2, c2);
        // ∂/∂ℓ of e^{−d} + d − 1 through both clamps.
        (value, (R::ONE - e) * dneg * dvalue)
    };
    match estimator {
        KlEstimator::K1 => (d, R::ONE),
        KlEstimator::Abs => abs_scalar(d),
        KlEstimator::K2 => (half * d * d, d),
        KlEstimator::K3 => k3(),
        KlEstimator::K3Plus => (k3().0, d),
    }
}

/// Whether weighting the estimate by the ratio (`k·R`) puts two terms of size `R·e^{−d}` into
/// its slope that cancel: k3 without its clamps. [`weighted_slope`] and the composed path's
/// [`weighted_k3`] take this case apart; every other estimate is multiplied as it is.
pub(crate) fn weighting_cancels(estimator: KlEstimator, clamp: bool) -> bool {
    estimator == KlEstimator::K3 && !clamp
}

/// `∂(k·R)/∂ℓ = R·k′ + k·R′` of an estimate weighted by the ratio `R` (TRL's
/// `use_bias_correction_kl`), from `(k, k′)` of [`value_and_slope`] at `d = ℓ − ℓref` and
/// `(R, R′)`. For k3 without its clamps, `k′ = 1 − e^{−d}` and `k = e^{−d} + d − 1` share
/// `e^{−d}`; with `R′ = c·R` (a token's own ratio: `c = 1`, or 0 where the ratio is clamped) the
/// slope is `R·((1 − c)·k′ + c·d)`, where the two `e^{−d}` cancel in the formula rather than in
/// floating point (summed as two terms of size `R·e^{−d}`, they left an error of about
/// `R·e^{−d}·ε`: all of the slope at `d = −80` in f32). Every other case (`R = 0` included) sums
/// the two terms, which cancel nothing large.
#[inline(always)]
pub(crate) fn weighted_slope<R: Real>(
    estimator: KlEstimator,
    clamp: bool,
    d: R,
    (k, dk): (R, R),
    (weight, dweight): (R, R),
) -> R {
    let summed = weight * dk + k * dweight;
    if !weighting_cancels(estimator, clamp) {
        return summed;
    }
    let c = dweight / weight;
    let combined = weight * ((R::ONE - c) * dk + c * d);
    R::select(weight > R::ZERO, combined, summed)
}

// ---------------------------------------------------------------------------------------------
// Tensor form (the composed path's).

/// Per-token KL estimate `k(ℓ, ℓref)`, differentiable with respect to `log_probs` (`ref_log_probs`
/// is a constant: it is detached and converted to `log_probs`' dtype).
///
/// Errors: a non-float tensor, `ref_log_probs` of another shape or device than `log_probs`, a
/// non-finite value in either (there is no mask here: every element counts), and with k3 or k3+
/// unclamped, `ℓref − ℓ` beyond `ln(max)` of `log_probs`' dtype (the dtype it is computed in:
/// 11.09 in f16, 88.72 in bf16 and f32, 709.78 in f64), where `e^{ℓref−ℓ}` overflows. These value
/// checks read on the host.
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
    check_float("log_probs", log_probs)?;
    check_float("ref_log_probs", ref_log_probs)?;
    check_device("ref_log_probs", ref_log_probs, log_probs)?;
    check_shape("ref_log_probs", ref_log_probs, log_probs.dims())?;
    let reference = ref_log_probs.detach().to_dtype(log_probs.dtype())?;
    check_finite("log_probs", log_probs)?;
    check_finite("ref_log_probs", &reference)?;
    if !clamp && matches!(estimator, KlEstimator::K3 | KlEstimator::K3Plus) {
        let d = (&reference - log_probs.detach())?;
        let above = d
            .gt(crate::real::ln_max(log_probs.dtype()))?
            .to_dtype(candle_core::DType::F64)?
            .sum_all()?
            .to_scalar::<f64>()?;
        if above > 0.0 {
            return Err(ValueCheck::K3Overflow.error(above));
        }
    }
    kl_values(log_probs, &reference, estimator, clamp)
}

/// `k·R`, the unclamped k3 `k = e^{−d} + d − 1` weighted by the ratio `R = e^L` (TRL's
/// `use_bias_correction_kl`), as `e^{L − d} + (d − 1)·R`: the tensor form of
/// [`weighted_slope`]'s cancellation. `L` and `d` in the first term are computed at a copy of
/// `ℓ` that nothing else reads (`exponent_at_copy`, `d_at_copy`), so that its two slopes,
/// `L′·e^{L−d}` and `−e^{L−d}`, meet at the copy and cancel there (exactly where `L′ = 1`)
/// before the smaller ones, `R + (d − 1)·R′` from `d` and `ratio` at `ℓ`, join them at `ℓ`:
/// summed at `ℓ` in autograd's order, the small terms were absorbed into the large ones, all
/// of the slope at `d = −80` in f32.
pub(crate) fn weighted_k3(
    exponent_at_copy: &Tensor,
    d_at_copy: &Tensor,
    d: &Tensor,
    ratio: &Tensor,
) -> Result<Tensor> {
    let large = (exponent_at_copy - d_at_copy)?.exp()?;
    Ok((large + (d - 1.0)?.mul(ratio)?)?)
}

/// [`kl_penalty`] on inputs already checked: `reference` detached, of `log_probs`' dtype.
pub(crate) fn kl_values(
    log_probs: &Tensor,
    reference: &Tensor,
    estimator: KlEstimator,
    clamp: bool,
) -> Result<Tensor> {
    let diff = log_probs.sub(reference)?;
    let bound = |c: f64| clamp.then_some(c);
    let k3 = || -> Result<Tensor> {
        let (lo, hi) = (bound(-K3_LOG_RATIO_BOUND), bound(K3_LOG_RATIO_BOUND));
        let neg = piecewise::clamp(&diff.neg()?, lo, hi)?;
        let value = ((neg.exp()? - &neg)? - 1.0)?;
        piecewise::clamp(&value, bound(-K3_VALUE_BOUND), bound(K3_VALUE_BOUND))
    };
    let k2 = || -> Result<Tensor> { Ok((diff.sqr()? * 0.5)?) };
    Ok(match estimator {
        KlEstimator::K1 => diff.clone(),
        KlEstimator::Abs => piecewise::abs(&diff)?,
        KlEstimator::K2 => k2()?,
        KlEstimator::K3 => k3()?,
        KlEstimator::K3Plus => {
            let k2 = k2()?;
            ((&k2 - k2.detach())? + k3()?.detach())?
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device, Var};

    #[test]
    fn tensor_and_scalar_forms_agree_at_ties_and_bounds() -> Result<()> {
        // d = 0 (the tie ℓ = ℓref), beyond both k3 clamps, and ordinary values.
        let ds = [0.0f64, -25.0, 25.0, -2.5, 0.7, 3.0];
        let dev = Device::Cpu;
        let lp = Var::new(&ds, &dev)?;
        let reference = Tensor::zeros(ds.len(), DType::F64, &dev)?;
        for estimator in KlEstimator::ALL {
            for clamp in [true, false] {
                let k = kl_penalty(lp.as_tensor(), &reference, estimator, clamp)?;
                let grads = k.sum_all()?.backward()?;
                let slope = grads.get(lp.as_tensor()).unwrap().to_vec1::<f64>()?;
                let value = k.to_vec1::<f64>()?;
                for (j, &d) in ds.iter().enumerate() {
                    let (v, s) = value_and_slope(estimator, clamp, d);
                    let what = format!("{estimator:?} clamp={clamp} d={d}");
                    assert!((v - value[j]).abs() <= 1e-12 * (1.0 + v.abs()), "{what}");
                    assert!((s - slope[j]).abs() <= 1e-12 * (1.0 + s.abs()), "{what}");
                }
            }
        }
        // PyTorch's subgradients at the tie: |x|' = 0, k1' = 1, k2' = k3' = 0.
        assert_eq!(value_and_slope(KlEstimator::Abs, true, 0.0f32), (0.0, 0.0));
        assert_eq!(value_and_slope(KlEstimator::K1, true, 0.0f32), (0.0, 1.0));
        assert_eq!(value_and_slope(KlEstimator::K3, true, 0.0f32), (0.0, 0.0));
        Ok(())
    }

    /// The importance-weighted unclamped k3's slope in f32 equals the closed form
    /// `R·((1 − c)(1 − e^{−d}) + c·d)`, with `R′ = R` (`c = 1`) and a constant `R` (`c = 0`), at
    /// `d` down to −80 (summed as `R·k′ + k·R′` it was all rounding there).
    #[test]
    fn weighted_k3_slope_keeps_its_digits_at_large_d() {
        let ds = [-80.0f64, -60.0, -30.0, -15.0, -2.5, 0.0, 0.7, 3.0];
        let r = (-0.3f64).exp();
        for c in [1.0, 0.0] {
            for d in ds {
                let want = r * ((1.0 - c) * (1.0 - (-d).exp()) + c * d);
                let (k, dk) = value_and_slope(KlEstimator::K3, false, d as f32);
                let weights = (r as f32, (c * r) as f32);
                let got = weighted_slope(KlEstimator::K3, false, d as f32, (k, dk), weights);
                assert!(
                    (f64::from(got) - want).abs() <= 1e-5 * want.abs().max(1e-3),
                    "c={c} d={d}: {got} vs {want}"
                );
            }
        }
    }
}
