//! The scalar formulas of the log-probs and entropy of a softmax row, streamed over the logits
//! (what the kernels run; the tensor form is in [`crate::logprobs`]): the weighted logit, the
//! row's finish `(ℓ, H, lse)` and the gradient of one logit.
//!
//! Layer: math.

use crate::real::Real;

/// `p_v·z_v` from `e = e^{z−max}` (proportional to `p_v`): 0 where `e = 0`, so that `z = −∞`
/// contributes nothing.
#[inline(always)]
pub(crate) fn weighted_logit<R: Real>(e: R, z: R) -> R {
    R::select(e > R::ZERO, e * z, R::ZERO)
}

/// `(ℓ, H, lse)` of a row from its running maximum, `Σ e^{z−max}`, `Σ e^{z−max}·z` and the
/// target's `z_y`; NaN log-prob and entropy when `lse` is not finite.
#[inline(always)]
pub(crate) fn finish_row<R: Real>(max: R, sum: R, weighted: R, z_target: R) -> (R, R, R) {
    let lse = max + sum.ln();
    if lse.is_finite_value() {
        (z_target - lse, lse - weighted / sum, lse)
    } else {
        (R::NAN, R::NAN, lse)
    }
}

/// `∂(g_ℓ·ℓ + g_H·H)/∂x_v` of one logit `x` (`z = x/τ`), without the target's own `g_ℓ/τ`.
#[inline(always)]
pub(crate) fn logit_gradient<R: Real>(
    x: R,
    inv_t: R,
    lse: R,
    entropy: R,
    grad_log_prob: R,
    grad_entropy: R,
) -> R {
    let z = x * inv_t;
    let p = (z - lse).exp();
    let term = R::select(p > R::ZERO, p * (z - lse + entropy), R::ZERO);
    -(inv_t * (grad_log_prob * p + grad_entropy * term))
}
