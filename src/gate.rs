//! SAPO's soft trust-region gate: the one source of its formula, for every path.
//! Every formula, with the peer it matches: [the formulas page](crate::formulas).
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
