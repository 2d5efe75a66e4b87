//! SAPO's soft trust-region gate.
//!
//! ```text
//! f(ρ; τ) = σ(τ·(ρ − 1)) · 4/τ          the gate value (replaces PPO's clip(ρ))
//! f'(ρ; τ) = 4·p·(1 − p),  p = σ(τ(ρ−1)) the gradient weight: 1 at ρ = 1, → 0 far off-policy
//! ```
//!
//! The scalar functions ([`value_scalar`], [`weight_scalar`]) work on `f32` and `f64` and use a
//! sign-split sigmoid, so they are finite and accurate for every ρ in `[0, e^20]` and τ in
//! `(0, 1000]`. The tensor functions ([`value`], [`weight`]) are composed of differentiable candle
//! ops, so the gate can sit inside any autograd graph.

use candle_core::Tensor;

use crate::error::{check_config, Result};

/// Floats the scalar gate is defined on: `f32` and `f64`.
pub trait GateFloat: Copy + sealed::Sealed {
    /// Numerically stable logistic sigmoid.
    fn sigmoid(self) -> Self;
    /// `f(ρ; τ) = σ(τ(ρ−1))·4/τ`.
    fn gate_value(self, tau: Self) -> Self;
    /// `4·σ(x)·σ(−x)` with `x = τ(ρ−1)`.
    fn gate_weight(self, tau: Self) -> Self;
}

mod sealed {
    pub trait Sealed {}
    impl Sealed for f32 {}
    impl Sealed for f64 {}
}

macro_rules! impl_gate_float {
    ($t:ty) => {
        impl GateFloat for $t {
            #[inline]
            fn sigmoid(self) -> Self {
                if self >= 0.0 {
                    1.0 / (1.0 + (-self).exp())
                } else {
                    let e = self.exp();
                    e / (1.0 + e)
                }
            }
            #[inline]
            fn gate_value(self, tau: Self) -> Self {
                (tau * (self - 1.0)).sigmoid() * (4.0 / tau)
            }
            #[inline]
            fn gate_weight(self, tau: Self) -> Self {
                let x = tau * (self - 1.0);
                4.0 * x.sigmoid() * (-x).sigmoid()
            }
        }
    };
}
impl_gate_float!(f32);
impl_gate_float!(f64);

/// The gate value `f(ρ; τ) = σ(τ(ρ−1))·4/τ` on a scalar.
///
/// ```
/// let f = sapo::gate::value_scalar(1.0f64, 1.0);
/// assert!((f - 2.0).abs() < 1e-12); // σ(0)·4/1
/// assert!(sapo::gate::value_scalar(20f32.exp(), 1000.0).is_finite());
/// ```
pub fn value_scalar<F: GateFloat>(rho: F, tau: F) -> F {
    rho.gate_value(tau)
}

/// The gradient weight `f'(ρ; τ) = 4·p·(1−p)`, `p = σ(τ(ρ−1))`, on a scalar.
///
/// ```
/// assert_eq!(sapo::gate::weight_scalar(1.0f32, 1.05), 1.0);
/// assert!(sapo::gate::weight_scalar(2.0f64, 1.0) < 1.0);
/// ```
pub fn weight_scalar<F: GateFloat>(rho: F, tau: F) -> F {
    rho.gate_weight(tau)
}

fn check_tau(tau: f64) -> Result<()> {
    check_config(tau.is_finite() && tau > 0.0, "tau", "finite and > 0", tau)
}

/// The gate value `f(ρ; τ) = σ(τ(ρ−1))·4/τ` elementwise, differentiable with respect to `rho`.
///
/// `tau` must be finite and > 0, else [`crate::Error::InvalidConfig`].
///
/// ```
/// use candle_core::{Device, Tensor};
/// let rho = Tensor::new(&[0.5f32, 1.0, 1.5], &Device::Cpu)?;
/// let f = sapo::gate::value(&rho, 1.0)?.to_vec1::<f32>()?;
/// assert!((f[1] - 2.0).abs() < 1e-6);
/// # Ok::<(), sapo::Error>(())
/// ```
pub fn value(rho: &Tensor, tau: f64) -> Result<Tensor> {
    check_tau(tau)?;
    let x = rho.affine(tau, -tau)?;
    Ok(candle_nn::ops::sigmoid(&x)?.affine(4.0 / tau, 0.0)?)
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
    check_tau(tau)?;
    let x = rho.affine(tau, -tau)?;
    weight_of_logit(&x)
}

/// `f(ρ; τ)` with a per-element temperature tensor `tau` (same shape as `rho`).
pub(crate) fn value_per_element(rho: &Tensor, tau: &Tensor) -> Result<Tensor> {
    let x = (rho - 1.0)?.mul(tau)?;
    Ok(candle_nn::ops::sigmoid(&x)?.mul(&(tau.recip()? * 4.0)?)?)
}

/// `f'(ρ; τ)` with a per-element temperature tensor `tau`.
pub(crate) fn weight_per_element(rho: &Tensor, tau: &Tensor) -> Result<Tensor> {
    let x = (rho - 1.0)?.mul(tau)?;
    weight_of_logit(&x)
}

fn weight_of_logit(x: &Tensor) -> Result<Tensor> {
    let p = candle_nn::ops::sigmoid(x)?;
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
        assert_relative_eq!(value_scalar(1.5f64, 1.0), want, max_relative = 1e-14);
        // τ = 2: σ(2·(0.5−1))·2 = 2·σ(−1)
        let want = 2.0 / (1.0 + 1f64.exp());
        assert_relative_eq!(value_scalar(0.5f64, 2.0), want, max_relative = 1e-14);
        // weight at ρ = 1.5, τ = 1: 4 σ(.5) σ(−.5)
        let p = 1.0 / (1.0 + (-0.5f64).exp());
        assert_relative_eq!(
            weight_scalar(1.5f64, 1.0),
            4.0 * p * (1.0 - p),
            max_relative = 1e-14
        );
    }

    #[test]
    fn weight_is_derivative_of_value() {
        for &(rho, tau) in &[(0.3f64, 1.0), (1.0, 1.05), (1.7, 0.5), (2.5, 8.0)] {
            let h = 1e-6;
            let fd = (value_scalar(rho + h, tau) - value_scalar(rho - h, tau)) / (2.0 * h);
            assert_relative_eq!(weight_scalar(rho, tau), fd, max_relative = 1e-6);
        }
    }

    #[test]
    fn scalar_gate_is_finite_on_extremes() {
        for &rho in &[0.0f32, 1e-30, 1.0, 20f32.exp()] {
            for &tau in &[1e-6f32, 0.5, 1.0, 1000.0] {
                let v = value_scalar(rho, tau);
                let w = weight_scalar(rho, tau);
                assert!(v.is_finite() && v >= 0.0, "value({rho},{tau}) = {v}");
                assert!(
                    w.is_finite() && (0.0..=1.0).contains(&w),
                    "weight({rho},{tau}) = {w}"
                );
            }
        }
        // Far below the trust region the weight underflows to 0 but never to NaN.
        assert_eq!(weight_scalar(20f64.exp(), 1000.0), 0.0);
        // Small deviations keep full relative accuracy in f32.
        let x = 1e-4f32;
        assert_relative_eq!(weight_scalar(1.0 + x, 1.0), 1.0, max_relative = 1e-7);
    }

    #[test]
    fn tensor_gate_matches_scalar_gate() -> Result<()> {
        let rhos = [0.0f32, 0.25, 1.0, 1.3, 5.0, 20f32.exp()];
        let rho = Tensor::new(&rhos, &Device::Cpu)?;
        for tau in [0.5, 1.0, 1.05, 1000.0] {
            let v = value(&rho, tau)?.to_vec1::<f32>()?;
            let w = weight(&rho, tau)?.to_vec1::<f32>()?;
            for (i, &r) in rhos.iter().enumerate() {
                assert_relative_eq!(v[i], value_scalar(r, tau as f32), max_relative = 1e-5);
                assert_relative_eq!(
                    w[i],
                    weight_scalar(r, tau as f32),
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
        for tau in [0.0, -1.0, f64::NAN, f64::INFINITY] {
            let err = value(&rho, tau).unwrap_err();
            assert!(matches!(
                err,
                crate::Error::InvalidConfig { name: "tau", .. }
            ));
            assert!(weight(&rho, tau).is_err());
        }
    }
}
