//! The piecewise functions of the formulas, with PyTorch's subgradients at their kinks, in one
//! place: every path (composed ops, CPU kernels, future GPU kernels) takes its kinks from here.
//!
//! | function | value | derivative at the kink |
//! |---|---|---|
//! | `clamp(x, lo, hi)` | `min(max(x, lo), hi)` | 1 strictly inside `(lo, hi)`, **0 at `x = lo` or `x = hi`** and beyond (PyTorch 2.15 with scalar bounds) |
//! | `|x|` | | `sign(x)`, with `sign(0) = 0` |
//! | `max(u, v)`, `min(u, v)` at `u = v` | `u` | the gradient is split equally between `u` and `v` (candle's `maximum`/`minimum` do the same) |
//!
//! Sign tests at `A = 0` are the formulas' own (`A > 0` takes τ_pos, the dual clip needs `A < 0`).

use candle_core::Tensor;

use crate::error::Result;
use crate::real::Real;

/// `clamp(x, lo, hi)` elementwise (`None`: no bound on that side), differentiable: the gradient
/// passes strictly inside `(lo, hi)` and is 0 at the bounds and beyond.
pub(crate) fn clamp(x: &Tensor, lo: Option<f64>, hi: Option<f64>) -> Result<Tensor> {
    let dtype = x.dtype();
    let mut inside: Option<Tensor> = None;
    let mut bounded = x.detach();
    if let Some(lo) = lo {
        inside = Some(x.gt(lo)?.to_dtype(dtype)?);
        bounded = bounded.maximum(lo)?;
    }
    if let Some(hi) = hi {
        let below = x.lt(hi)?.to_dtype(dtype)?;
        inside = Some(match inside {
            Some(i) => i.mul(&below)?,
            None => below,
        });
        bounded = bounded.minimum(hi)?;
    }
    match inside {
        // value: the bounded x; gradient: 1 inside, 0 elsewhere (`where` sends the gradient to
        // the branch taken, and the bound branch is a constant).
        Some(inside) => Ok(inside.ne(0.0)?.where_cond(x, &bounded)?),
        None => Ok(x.clone()),
    }
}

/// `(clamp(x, lo, hi), d/dx)`: the scalar form of [`clamp`] (pass `±R::INFINITY` for no bound).
#[inline(always)]
pub(crate) fn clamp_scalar<R: Real>(x: R, lo: R, hi: R) -> (R, R) {
    (
        R::select(x < lo, lo, R::select(x > hi, hi, x)),
        R::indicator(x > lo && x < hi),
    )
}

/// `(|x|, sign(x))` with `sign(0) = 0`.
#[inline(always)]
pub(crate) fn abs_scalar<R: Real>(x: R) -> (R, R) {
    (
        R::select(x < R::ZERO, -x, x),
        R::select(
            x > R::ZERO,
            R::ONE,
            R::select(x < R::ZERO, -R::ONE, R::ZERO),
        ),
    )
}

/// `|x|` elementwise with gradient `sign(x)`, `sign(0) = 0` (candle's `abs` gives 1 at 0).
pub(crate) fn abs(x: &Tensor) -> Result<Tensor> {
    Ok(x.mul(&x.detach().sign()?)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    fn grad_of(f: impl Fn(&Tensor) -> Result<Tensor>, xs: &[f64]) -> (Vec<f64>, Vec<f64>) {
        let x = Var::new(xs, &Device::Cpu).unwrap();
        let y = f(x.as_tensor()).unwrap();
        let g = y.sum_all().unwrap().backward().unwrap();
        (
            y.to_vec1().unwrap(),
            g.get(x.as_tensor()).unwrap().to_vec1().unwrap(),
        )
    }

    #[test]
    fn clamp_gradient_is_zero_at_and_beyond_the_bounds() {
        let xs = [-3.0, -1.0, 0.0, 2.0, 5.0];
        let (v, g) = grad_of(|x| clamp(x, Some(-1.0), Some(2.0)), &xs);
        assert_eq!(v, vec![-1.0, -1.0, 0.0, 2.0, 2.0]);
        assert_eq!(g, vec![0.0, 0.0, 1.0, 0.0, 0.0]);
        for (k, &x) in xs.iter().enumerate() {
            assert_eq!(clamp_scalar(x, -1.0, 2.0), (v[k], g[k]));
        }
        let (v, g) = grad_of(|x| clamp(x, None, Some(2.0)), &xs);
        assert_eq!(v, vec![-3.0, -1.0, 0.0, 2.0, 2.0]);
        assert_eq!(g, vec![1.0, 1.0, 1.0, 0.0, 0.0]);
    }

    #[test]
    fn abs_has_zero_subgradient_at_zero() {
        let (v, g) = grad_of(abs, &[-2.0, 0.0, 3.0]);
        assert_eq!(v, vec![2.0, 0.0, 3.0]);
        assert_eq!(g, vec![-1.0, 0.0, 1.0]);
        assert_eq!(abs_scalar(0.0f32), (0.0, 0.0));
        assert_eq!(abs_scalar(-2.0f64), (2.0, -1.0));
    }
}
