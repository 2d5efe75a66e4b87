//! SAPO's soft trust-region gate: the one source of its formula, for every path.
//! Every formula, with the peer it matches: [the formulas page](crate::formulas).
//!
//! The gate is one of a family ([`GateFunction`]: sigmoid, erf, arctan, softsign); SAPO's own:
//!
//! ```text
//! f(ρ; τ) = σ(τ·(ρ − 1)) · 4/τ          the gate value (replaces PPO's clip(ρ))
//! f'(ρ; τ) = 4·p·(1 − p),  p = σ(τ(ρ−1)) the gradient weight: 1 at ρ = 1, → 0 far off-policy
//! ```
//!
//! Two forms side by side: the tensor form ([`value`], [`weight`]) is composed of differentiable
//! candle ops, so the gate sits inside any autograd graph on any device; the scalar form
//! ([`value_scalar`], [`weight_scalar`], generic over [`Real`]) is what the fused kernels run, token
//! by token. Both use a sign-split sigmoid, so they are finite and accurate for every ρ in
//! `[0, e^20]` and τ in `(0, 1000]`.

use candle_core::Tensor;

use crate::error::{check_float, check_positive_scale, Result};
use crate::real::Real;

/// The finest ratio change the gate must resolve in f32, the dtype the kernels compute in: the
/// gate's values lie in `(0, 4/τ)` and move by `f'(1) = 1` per unit of `ρ`, so f32's spacing at
/// `4/τ` (`4/τ · 2⁻²³`) must not exceed it. This bounds `τ` below by `4·2⁻²³/10⁻⁴ ≈ 4.8e-3`;
/// smaller temperatures make `−f(ρ)·A` a sum of near-equal constants `±(2/τ)·A` that f32 cannot
/// tell apart (τ = 1e-6: loss −0.0625 in f32 where f64 gives −0.0319).
///
/// ```
/// use sapo::gate::{value_scalar, GATE_RESOLUTION};
/// // the smallest τ accepted: f32's spacing at 4/τ is the resolution
/// let tau_min = 4.0 * f64::from(f32::EPSILON) / GATE_RESOLUTION;
/// assert!(value_scalar(1.0, tau_min * 1.01).is_ok());
/// assert!(value_scalar(1.0, tau_min * 0.99).is_err());
/// ```
pub const GATE_RESOLUTION: f64 = 1e-4;

/// Checks that a temperature `τ` is finite and > 0, that `4/τ` is finite in f32, and that f32
/// resolves the gate's values to [`GATE_RESOLUTION`].
pub(crate) fn check_tau(name: &'static str, tau: f64) -> Result<()> {
    const EXPECTED: &str = "finite and > 0, with 4/tau finite in f32 and 4/tau * 2^-23 <= 1e-4 \
                            (tau >= 4.8e-3: f32 must resolve the gate's values)";
    check_positive_scale(name, tau, 4.0, EXPECTED)?;
    crate::error::check_config(
        4.0 / tau * f64::from(f32::EPSILON) <= GATE_RESOLUTION,
        name,
        EXPECTED,
        tau,
    )
}

/// The gate function of SAPO's soft trust region: SAPO's sigmoid (the default) or one of the
/// family that behaves the same at `ρ = 1` (arXiv 2602.19345 trains with error-function,
/// arctangent and softsign gates). With `u = τ(ρ − 1)/2`:
///
/// | gate | `f(ρ)` | `f'(ρ)` |
/// |---|---|---|
/// | `Sigmoid` | `(2/τ)(1 + tanh u)` = `σ(τ(ρ−1))·4/τ` | `sech² u` = `4p(1−p)` |
/// | `Erf` | `2/τ + (√π/τ)·erf u` | `exp(−u²)` |
/// | `Arctan` | `(2/τ)(1 + arctan u)` | `1/(1 + u²)` |
/// | `Softsign` | `(2/τ)(1 + u/(1 + |u|))` | `1/(1 + |u|)²` |
///
/// All four have `f(1) = 2/τ` and `f'(1) = 1`; the smooth three also share `f''(1) = 0`, so a
/// temperature means the same under each. They differ in their tails: the weight `f'` decays as
/// `e^{−2|u|}` (sigmoid), `e^{−u²}` (erf), `u⁻²` (arctan, softsign).
///
/// ```
/// use sapo::GateFunction;
/// for gate in GateFunction::ALL {
///     let (value, weight) = gate.value_and_weight(1.0f64, 1.05);
///     assert!((value - 2.0 / 1.05).abs() < 1e-12 && (weight - 1.0).abs() < 1e-12);
/// }
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum GateFunction {
    /// SAPO's gate, `σ(τ(ρ−1))·4/τ`.
    #[default]
    Sigmoid,
    /// The error-function gate.
    Erf,
    /// The arctangent gate.
    Arctan,
    /// The softsign gate.
    Softsign,
}

impl GateFunction {
    /// Every gate, in the order of their GPU ids.
    ///
    /// ```
    /// let names: Vec<_> = sapo::GateFunction::ALL.iter().map(|g| g.name()).collect();
    /// assert_eq!(names, ["sigmoid", "erf", "arctan", "softsign"]);
    /// ```
    pub const ALL: [GateFunction; 4] = [Self::Sigmoid, Self::Erf, Self::Arctan, Self::Softsign];

    /// Its name (`sigmoid`, `erf`, `arctan`, `softsign`).
    ///
    /// ```
    /// assert_eq!(sapo::GateFunction::Erf.name(), "erf");
    /// ```
    pub fn name(self) -> &'static str {
        match self {
            Self::Sigmoid => "sigmoid",
            Self::Erf => "erf",
            Self::Arctan => "arctan",
            Self::Softsign => "softsign",
        }
    }

    /// The gate of a name (as [`GateFunction::name`] gives it).
    ///
    /// ```
    /// assert_eq!(sapo::GateFunction::from_name("arctan")?, sapo::GateFunction::Arctan);
    /// assert!(sapo::GateFunction::from_name("tanh").is_err());
    /// # Ok::<(), sapo::Error>(())
    /// ```
    pub fn from_name(name: &str) -> Result<Self> {
        Self::ALL
            .into_iter()
            .find(|g| g.name() == name)
            .ok_or_else(|| crate::error::Error::InvalidValue {
                arg: "gate",
                expected: "sigmoid, erf, arctan or softsign".into(),
                actual: name.to_string(),
            })
    }

    /// Its id in the GPU kernels (`SAPO_GATE_*`, generated from [`GateFunction::ALL`]).
    #[cfg_attr(
        not(any(feature = "cuda", feature = "metal", feature = "gpu-sim", test)),
        allow(dead_code)
    )]
    pub(crate) fn id(self) -> i32 {
        Self::ALL.iter().position(|&g| g == self).unwrap_or(0) as i32
    }

    /// The gate value `f(ρ)` and its weight `f'(ρ)` (scalar form, what the kernels run).
    ///
    /// ```
    /// let (f, df) = sapo::GateFunction::Softsign.value_and_weight(3.0f64, 1.0);
    /// // u = 1: f = 2·(1 + 1/2), f' = 1/4.
    /// assert_eq!((f, df), (3.0, 0.25));
    /// ```
    #[inline(always)]
    pub fn value_and_weight<R: Real>(self, rho: R, tau: R) -> (R, R) {
        let half = R::from_f64(0.5);
        let u = half * tau * (rho - R::ONE);
        let base = R::from_f64(2.0) / tau;
        match self {
            Self::Sigmoid => value_and_weight(rho, tau),
            Self::Erf => {
                let root_pi = R::from_f64(std::f64::consts::PI.sqrt());
                let u2 = u * u;
                let weight = R::select(u2 < R::MAX_EXP_ARG, (-u2).exp(), R::ZERO);
                (base + root_pi / tau * u.erf(), weight)
            }
            Self::Arctan => (base * (R::ONE + u.atan()), R::ONE / (R::ONE + u * u)),
            Self::Softsign => {
                let s = R::ONE / (R::ONE + R::select(u < R::ZERO, -u, u));
                (base * (R::ONE + u * s), s * s)
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Scalar form (the kernels').

/// `(f(ρ; τ), f'(ρ; τ))` in one evaluation of the sigmoid, branch-free.
#[inline(always)]
pub(crate) fn value_and_weight<R: Real>(rho: R, tau: R) -> (R, R) {
    let x = tau * (rho - R::ONE);
    // σ(x) and σ(−x) from e^{−|x|}: no overflow for any x.
    let e = (-R::select(x < R::ZERO, -x, x)).exp();
    let big = R::ONE / (R::ONE + e);
    let small = e * big;
    let up = x >= R::ZERO;
    let (p, q) = (R::select(up, big, small), R::select(up, small, big));
    let four = R::from_f64(4.0);
    (p * (four / tau), four * p * q)
}

/// Checks a scalar form's arguments as the tensor forms do: `ρ` finite and ≥ 0 (a ratio), `τ` as
/// [`check_tau`].
fn check_scalar<R: Real>(rho: R, tau: R) -> Result<()> {
    check_tau("tau", tau.to_f64())?;
    let r = rho.to_f64();
    crate::error::check_value(r.is_finite() && r >= 0.0, "rho", "finite and >= 0", r)
}

/// The gate value `f(ρ; τ) = σ(τ(ρ−1))·4/τ` on a scalar.
///
/// Errors: `τ` out of range (as [`value`]), `ρ` negative or not finite.
///
/// ```
/// let f = sapo::gate::value_scalar(1.0f64, 1.0)?;
/// assert!((f - 2.0).abs() < 1e-12); // σ(0)·4/1
/// assert!(sapo::gate::value_scalar(20f32.exp(), 1000.0)?.is_finite());
/// assert!(sapo::gate::value_scalar(1.0f32, 0.0).is_err());
/// # Ok::<(), sapo::Error>(())
/// ```
pub fn value_scalar<R: Real>(rho: R, tau: R) -> Result<R> {
    check_scalar(rho, tau)?;
    Ok(value_and_weight(rho, tau).0)
}

/// The gradient weight `f'(ρ; τ) = 4·p·(1−p)`, `p = σ(τ(ρ−1))`, on a scalar.
///
/// Errors: as [`value_scalar`].
///
/// ```
/// assert_eq!(sapo::gate::weight_scalar(1.0f32, 1.05)?, 1.0);
/// assert!(sapo::gate::weight_scalar(2.0f64, 1.0)? < 1.0);
/// assert!(sapo::gate::weight_scalar(1.0f64, -1.0).is_err());
/// # Ok::<(), sapo::Error>(())
/// ```
pub fn weight_scalar<R: Real>(rho: R, tau: R) -> Result<R> {
    check_scalar(rho, tau)?;
    Ok(value_and_weight(rho, tau).1)
}

// ---------------------------------------------------------------------------------------------
// Tensor form (the composed path's).

/// The gate value `f(ρ; τ) = σ(τ(ρ−1))·4/τ` elementwise, differentiable with respect to `rho`.
///
/// `rho` must be a float tensor; `tau` must be finite and > 0 with `4/τ` finite in f32, else
/// [`crate::Error::InvalidConfig`].
///
/// ```
/// use candle_core::{Device, Tensor};
/// let rho = Tensor::new(&[0.5f32, 1.0, 1.5], &Device::Cpu)?;
/// let f = sapo::gate::value(&rho, 1.0)?.to_vec1::<f32>()?;
/// assert!((f[1] - 2.0).abs() < 1e-6);
/// # Ok::<(), sapo::Error>(())
/// ```
pub fn value(rho: &Tensor, tau: f64) -> Result<Tensor> {
    check_float("rho", rho)?;
    check_tau("tau", tau)?;
    value_per_element(rho, &rho.ones_like()?.affine(tau, 0.0)?)
}

/// The gradient weight `f'(ρ; τ) = 4·σ(x)·σ(−x)`, `x = τ(ρ−1)`, elementwise.
///
/// ```
/// use candle_core::{Device, Tensor};
/// let rho = Tensor::new(&[1.0f32, 3.0], &Device::Cpu)?;
/// let w = sapo::gate::weight(&rho, 1.0)?.to_vec1::<f32>()?;
/// assert_eq!(w[0], 1.0);
/// assert!(w[1] < 0.5);
/// # Ok::<(), sapo::Error>(())
/// ```
pub fn weight(rho: &Tensor, tau: f64) -> Result<Tensor> {
    check_float("rho", rho)?;
    check_tau("tau", tau)?;
    weight_per_element(rho, &rho.ones_like()?.affine(tau, 0.0)?)
}

/// `f(ρ; τ)` with a per-element temperature tensor `tau` (same shape as `rho`).
/// `f(ρ)` of `gate` per element (tensor form, differentiable: erf's derivative is candle's, the
/// arctangent is composed of candle ops, [`atan`]).
pub(crate) fn gate_value_per_element(
    gate: GateFunction,
    rho: &Tensor,
    tau: &Tensor,
) -> Result<Tensor> {
    let u = || -> Result<Tensor> { Ok((rho - 1.0)?.mul(tau)?.affine(0.5, 0.0)?) };
    let two_over_tau = || -> Result<Tensor> { Ok(tau.recip()?.affine(2.0, 0.0)?) };
    Ok(match gate {
        GateFunction::Sigmoid => value_per_element(rho, tau)?,
        GateFunction::Erf => {
            let scaled = u()?.erf()?.affine(std::f64::consts::PI.sqrt(), 2.0)?;
            scaled.mul(&tau.recip()?)?
        }
        GateFunction::Arctan => (atan(&u()?)? + 1.0)?.mul(&two_over_tau()?)?,
        GateFunction::Softsign => (softsign(&u()?)? + 1.0)?.mul(&two_over_tau()?)?,
    })
}

/// `u/(1 + |u|)` elementwise, whose autograd gradient is `1/(1 + |u|)²` at every `u`. Autograd
/// of the quotient itself takes the derivative as `1/s − |u|/s²` (`s = 1 + |u|`): two terms that
/// cancel, and beyond `|u| ≈ 1.8e19` (a log-ratio above about 44 in f32) `s²` overflows, the
/// second term vanishes, and the gradient with respect to the log-ratio comes out as `ρ/s ≈ 2/τ`
/// instead of ≈ 0. Here the value is the quotient's (accurate near 0) and the gradient flows
/// through `sgn(u)·(1 − 1/s)`, the same value written so that its derivative is the single term
/// `1/s²` (candle's `|u|'` is `sgn(u)` with `sgn(0) = 1`, so `1` at `u = 0`): `q + g − sg[g]`
/// with `q = sg[u/s]`, where `g − sg[g]` is exactly 0.
fn softsign(u: &Tensor) -> Result<Tensor> {
    let s = (u.abs()? + 1.0)?;
    let quotient = u.div(&s)?.detach();
    let sign = u
        .ge(0.0)?
        .where_cond(&u.ones_like()?, &u.ones_like()?.neg()?)?;
    let gradient_path = (s.recip()?.neg()? + 1.0)?.mul(&sign)?;
    Ok(((quotient + &gradient_path)? - gradient_path.detach())?)
}

/// `f'(ρ)` of `gate` per element (tensor form, for the metric).
pub(crate) fn gate_weight_per_element(
    gate: GateFunction,
    rho: &Tensor,
    tau: &Tensor,
) -> Result<Tensor> {
    let u = (rho - 1.0)?.mul(tau)?.affine(0.5, 0.0)?;
    Ok(match gate {
        GateFunction::Sigmoid => weight_per_element(rho, tau)?,
        GateFunction::Erf => u.sqr()?.neg()?.exp()?,
        GateFunction::Arctan => (u.sqr()? + 1.0)?.recip()?,
        GateFunction::Softsign => (u.abs()? + 1.0)?.sqr()?.recip()?,
    })
}

/// `arctan x` of candle ops (candle has no arctangent), differentiable and odd: `|x| > 1` is
/// reflected (`±π/2 − arctan(1/x)`), two half-angle steps `x/(1 + √(1 + x²))` bring the argument
/// below `tan(π/16) ≈ 0.199`, where 13 terms of the odd series reach 1e-17.
pub(crate) fn atan(x: &Tensor) -> Result<Tensor> {
    let big = x.abs()?.gt(1.0)?;
    let safe = big.where_cond(x, &x.ones_like()?)?;
    let reduced = big.where_cond(&safe.recip()?, x)?;
    let half = |y: &Tensor| -> Result<Tensor> { Ok(y.div(&((y.sqr()? + 1.0)?.sqrt()? + 1.0)?)?) };
    let w = half(&half(&reduced)?)?;
    let w2 = w.sqr()?;
    // Horner in w²: Σ_{k<13} (−1)^k w^{2k+1}/(2k+1).
    let mut series = w2.zeros_like()?;
    for k in (0..13).rev() {
        let coef = if k % 2 == 0 { 1.0 } else { -1.0 } / f64::from(2 * k + 1);
        series = (series.mul(&w2)? + coef)?;
    }
    let core = series.mul(&w)?.affine(4.0, 0.0)?;
    let quarter = x
        .ge(0.0)?
        .where_cond(&x.ones_like()?, &x.ones_like()?.neg()?)?
        .affine(std::f64::consts::FRAC_PI_2, 0.0)?;
    Ok(big.where_cond(&(quarter - &core)?, &core)?)
}

pub(crate) fn value_per_element(rho: &Tensor, tau: &Tensor) -> Result<Tensor> {
    let x = (rho - 1.0)?.mul(tau)?;
    Ok(candle_nn::ops::sigmoid(&x)?.mul(&(tau.recip()? * 4.0)?)?)
}

/// `f'(ρ; τ)` with a per-element temperature tensor `tau`.
pub(crate) fn weight_per_element(rho: &Tensor, tau: &Tensor) -> Result<Tensor> {
    let x = (rho - 1.0)?.mul(tau)?;
    let p = candle_nn::ops::sigmoid(&x)?;
    let q = candle_nn::ops::sigmoid(&x.neg()?)?;
    Ok((p.mul(&q)? * 4.0)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Each gate against its closed form (written here in f64 with std's functions; erf by its
    /// series), its weight against finite differences of its value, the shared `f(1) = 2/τ`,
    /// `f'(1) = 1`, and the tensor form (value, weight, autograd gradient) against the scalar.
    #[test]
    fn gate_family_closed_forms_and_derivatives() -> Result<()> {
        fn erf_series(x: f64) -> f64 {
            if x.abs() > 6.0 {
                return x.signum();
            }
            // 2/√π · e^{−x²} Σ 2ⁿ x^{2n+1} / (1·3·…·(2n+1)): positive terms, no cancellation.
            let (mut term, mut sum) = (x, x);
            for n in 1..4000 {
                term *= 2.0 * x * x / f64::from(2 * n + 1);
                sum += term;
                if term.abs() < 1e-18 * sum.abs() {
                    break;
                }
            }
            2.0 / std::f64::consts::PI.sqrt() * (-x * x).exp() * sum
        }
        let closed = |gate: GateFunction, rho: f64, tau: f64| -> (f64, f64) {
            let u = tau * (rho - 1.0) / 2.0;
            match gate {
                GateFunction::Sigmoid => ((2.0 / tau) * (1.0 + u.tanh()), 1.0 / u.cosh().powi(2)),
                GateFunction::Erf => (
                    2.0 / tau + std::f64::consts::PI.sqrt() / tau * erf_series(u),
                    (-u * u).exp(),
                ),
                GateFunction::Arctan => ((2.0 / tau) * (1.0 + u.atan()), 1.0 / (1.0 + u * u)),
                GateFunction::Softsign => (
                    (2.0 / tau) * (1.0 + u / (1.0 + u.abs())),
                    1.0 / (1.0 + u.abs()).powi(2),
                ),
            }
        };
        let rhos = [0.0, 0.3, 0.9, 0.999, 1.0, 1.001, 1.2, 1.7, 3.0, 9.0];
        for gate in GateFunction::ALL {
            for tau in [0.5, 1.0, 1.05, 4.0] {
                let (f1, w1) = gate.value_and_weight(1.0f64, tau);
                assert_relative_eq!(f1, 2.0 / tau, max_relative = 1e-15);
                assert_relative_eq!(w1, 1.0, max_relative = 1e-15);
                for rho in rhos {
                    let (f, w) = gate.value_and_weight(rho, tau);
                    let (cf, cw) = closed(gate, rho, tau);
                    assert_relative_eq!(f, cf, max_relative = 1e-13, epsilon = 1e-15);
                    assert_relative_eq!(w, cw, max_relative = 1e-12, epsilon = 1e-30);
                    let (f32v, w32) = gate.value_and_weight(rho as f32, tau as f32);
                    assert_relative_eq!(f64::from(f32v), cf, max_relative = 2e-6, epsilon = 1e-6);
                    assert_relative_eq!(f64::from(w32), cw, max_relative = 2e-5, epsilon = 1e-6);
                    if rho > 0.0 && !(gate == GateFunction::Softsign && rho == 1.0) {
                        let h = 1e-6;
                        let fd = (gate.value_and_weight(rho + h, tau).0
                            - gate.value_and_weight(rho - h, tau).0)
                            / (2.0 * h);
                        assert_relative_eq!(w, fd, max_relative = 1e-6, epsilon = 1e-8);
                    }
                }
                // The tensor form: values, weights, and autograd's gradient = the weight.
                let rho = candle_core::Var::new(&rhos, &Device::Cpu)?;
                let taus = rho.ones_like()?.affine(tau, 0.0)?;
                let value = gate_value_per_element(gate, rho.as_tensor(), &taus)?;
                let weight = gate_weight_per_element(gate, rho.as_tensor(), &taus)?;
                let grad = value.sum_all()?.backward()?;
                let grad = grad.get(rho.as_tensor()).unwrap().to_vec1::<f64>()?;
                let (value, weight) = (value.to_vec1::<f64>()?, weight.to_vec1::<f64>()?);
                for (i, &r) in rhos.iter().enumerate() {
                    let (f, w) = gate.value_and_weight(r, tau);
                    assert_relative_eq!(value[i], f, max_relative = 1e-14, epsilon = 1e-15);
                    assert_relative_eq!(weight[i], w, max_relative = 1e-13, epsilon = 1e-30);
                    assert_relative_eq!(grad[i], w, max_relative = 1e-12, epsilon = 1e-12);
                }
            }
        }
        Ok(())
    }

    /// The tensor forms' autograd at ratios up to `e^88` in f32 (no log-ratio clamp): the
    /// gradient with respect to the log-ratio, `f'(ρ)·ρ`, is the closed form's (≈ 0 there for
    /// every gate). The composed softsign once gave `≈ 2/τ`: its quotient's derivative
    /// cancelled two terms of which one vanished once `(1 + |u|)²` overflowed.
    #[test]
    fn tensor_forms_gradients_at_huge_ratios() -> Result<()> {
        let log_ratios = [
            -80.0f32, -20.0, 0.0, 1e-3, 20.0, 30.0, 44.0, 45.0, 60.0, 80.0, 88.0,
        ];
        let rhos: Vec<f32> = log_ratios.iter().map(|l| l.exp()).collect();
        for gate in GateFunction::ALL {
            for tau in [1.0f64, 1.05] {
                let rho = candle_core::Var::new(rhos.as_slice(), &Device::Cpu)?;
                let taus = rho.ones_like()?.affine(tau, 0.0)?;
                let value = gate_value_per_element(gate, rho.as_tensor(), &taus)?;
                let grad = value.sum_all()?.backward()?;
                let grad = grad.get(rho.as_tensor()).unwrap().to_vec1::<f32>()?;
                for (i, &r) in rhos.iter().enumerate() {
                    let r64 = f64::from(r);
                    let want = gate.value_and_weight(r64, tau).1 * r64;
                    let got = f64::from(grad[i]) * r64;
                    assert!(
                        (got - want).abs() <= 1e-5 * want.abs().max(1.0),
                        "{gate:?} τ {tau} log-ratio {}: f'·ρ {got} vs {want}",
                        log_ratios[i]
                    );
                }
            }
        }
        Ok(())
    }

    /// The composed arctangent over its whole range (both reflections, both signs, 0, huge).
    #[test]
    fn composed_atan_matches_std() -> Result<()> {
        let xs: Vec<f64> = (-400..=400)
            .map(|i| f64::from(i) * 0.0137)
            .chain([0.0, 1.0, -1.0, 1e-300, 1e12, -1e12, 0.19891, 0.41421356])
            .collect();
        let got = atan(&Tensor::new(xs.as_slice(), &Device::Cpu)?)?.to_vec1::<f64>()?;
        for (x, g) in xs.iter().zip(got) {
            assert_relative_eq!(g, x.atan(), max_relative = 2e-15, epsilon = 1e-300);
        }
        Ok(())
    }
    use approx::assert_relative_eq;
    use candle_core::Device;

    #[test]
    fn scalar_values_match_hand_computation() {
        // σ(0.5)·4 = 4/(1+e^-0.5)
        let want = 4.0 / (1.0 + (-0.5f64).exp());
        assert_relative_eq!(value_and_weight(1.5f64, 1.0).0, want, max_relative = 1e-14);
        // τ = 2: σ(2·(0.5−1))·2 = 2·σ(−1)
        let want = 2.0 / (1.0 + 1f64.exp());
        assert_relative_eq!(value_and_weight(0.5f64, 2.0).0, want, max_relative = 1e-14);
        // weight at ρ = 1.5, τ = 1: 4 σ(.5) σ(−.5)
        let p = 1.0 / (1.0 + (-0.5f64).exp());
        assert_relative_eq!(
            value_and_weight(1.5f64, 1.0).1,
            4.0 * p * (1.0 - p),
            max_relative = 1e-14
        );
    }

    #[test]
    fn weight_is_derivative_of_value() {
        for &(rho, tau) in &[(0.3f64, 1.0), (1.0, 1.05), (1.7, 0.5), (2.5, 8.0)] {
            let h = 1e-6;
            let fd =
                (value_and_weight(rho + h, tau).0 - value_and_weight(rho - h, tau).0) / (2.0 * h);
            assert_relative_eq!(value_and_weight(rho, tau).1, fd, max_relative = 1e-6);
        }
    }

    #[test]
    fn scalar_gate_is_finite_on_extremes() {
        for &rho in &[0.0f32, 1e-30, 1.0, 20f32.exp(), f32::MAX_EXP_ARG.exp()] {
            for &tau in &[1e-6f32, 0.5, 1.0, 1000.0] {
                let v = value_and_weight(rho, tau).0;
                let w = value_and_weight(rho, tau).1;
                assert!(v.is_finite() && v >= 0.0, "value({rho},{tau}) = {v}");
                assert!(
                    w.is_finite() && (0.0..=1.0).contains(&w),
                    "weight({rho},{tau}) = {w}"
                );
            }
        }
        // Far below the trust region the weight underflows to 0 but never to NaN.
        assert_eq!(value_and_weight(20f64.exp(), 1000.0).1, 0.0);
        // Small deviations keep full relative accuracy in f32.
        let x = 1e-4f32;
        assert_relative_eq!(value_and_weight(1.0 + x, 1.0).1, 1.0, max_relative = 1e-7);
    }

    #[test]
    fn tensor_gate_matches_scalar_gate() -> Result<()> {
        let rhos = [0.0f32, 0.25, 1.0, 1.3, 5.0, 20f32.exp()];
        let rho = Tensor::new(&rhos, &Device::Cpu)?;
        for tau in [0.5, 1.0, 1.05, 1000.0] {
            let v = value(&rho, tau)?.to_vec1::<f32>()?;
            let w = weight(&rho, tau)?.to_vec1::<f32>()?;
            for (i, &r) in rhos.iter().enumerate() {
                assert_relative_eq!(v[i], value_and_weight(r, tau as f32).0, max_relative = 1e-5);
                assert_relative_eq!(
                    w[i],
                    value_and_weight(r, tau as f32).1,
                    max_relative = 1e-5,
                    epsilon = 1e-30
                );
            }
        }
        Ok(())
    }

    #[test]
    fn tensor_gate_gradient_is_weight() -> Result<()> {
        let rho = candle_core::Var::new(&[0.5f64, 1.0, 1.4, 3.0], &Device::Cpu)?;
        let grads = value(rho.as_tensor(), 1.05)?.sum_all()?.backward()?;
        let got = grads.get(rho.as_tensor()).unwrap().to_vec1::<f64>()?;
        let want = weight(rho.as_tensor(), 1.05)?.to_vec1::<f64>()?;
        for (g, w) in got.iter().zip(&want) {
            assert_relative_eq!(g, w, max_relative = 1e-12);
        }
        Ok(())
    }

    #[test]
    fn bad_tau_is_rejected() {
        let rho = Tensor::new(&[1.0f32], &Device::Cpu).unwrap();
        // 1e-40: 4/τ overflows f32; 1e39: τ itself does.
        for tau in [0.0, -1.0, f64::NAN, f64::INFINITY, 1e-40, 1e39] {
            let err = value(&rho, tau).unwrap_err();
            assert!(matches!(
                err,
                crate::Error::InvalidConfig { name: "tau", .. }
            ));
            assert!(weight(&rho, tau).is_err());
        }
    }

    #[test]
    fn integer_rho_is_a_typed_error() {
        let rho = Tensor::new(&[1i64], &Device::Cpu).unwrap();
        let err = value(&rho, 1.0).unwrap_err();
        assert!(
            matches!(err, crate::Error::DType { arg: "rho", .. }),
            "{err}"
        );
        assert!(matches!(
            weight(&rho, 1.0).unwrap_err(),
            crate::Error::DType { arg: "rho", .. }
        ));
    }
}
