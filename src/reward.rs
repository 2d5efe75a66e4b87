//! Reward shaping around the loss: DAPO's soft overlong penalty ([`OverlongPenalty`]) and the KL
//! penalty put into the reward with its fixed or adaptive controller ([`KlController`],
//! [`kl_in_reward`]). Every formula, with the peer it matches: [the formulas page](crate::formulas).
//!
//! ```text
//! overlong, linear (verl, AReaL):  p = min(−(L − (L_max − b))/b · f, 0)          (no floor past L_max)
//! overlong, cap (TRL):             p = 0 | (L_max − b − L)/b | −1 past L_max     (b = 0 allowed)
//! KL in the reward (verl):         r = s − β·k(ℓold, ℓref)·m,   current_kl = (1/B) Σ_i Σ_t k·m/(n_i + 1e-8)
//! adaptive controller:             β ← β·(1 + clip(current_kl/target − 1, ±0.2)·n_steps/horizon)
//! ```
//!
//! Tensor in, tensor out, on the inputs' device; bad input is a typed error naming the argument.

use candle_core::{DType, Tensor, D};

use crate::aggregation::COUNT_GUARD;
use crate::checks::{check_finite, scrubbed_matrices, Scrubbed};
use crate::error::{check_config, check_device, check_float, check_shape, check_value, Result};
use crate::kl::{kl_values, KlEstimator};

/// What the overlong penalty does past the maximum length.
///
/// ```
/// assert_ne!(sapo::reward::BeyondMax::Linear, sapo::reward::BeyondMax::Cap);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BeyondMax {
    /// Keeps falling linearly (verl's `DAPORewardManager` overlong buffer, AReaL's
    /// `reward_overlong_penalty`).
    Linear,
    /// −1 (TRL's `get_soft_overlong_punishment`).
    Cap,
}

/// DAPO's soft overlong penalty (arXiv 2503.14476, Eq. 13): 0 up to `max_length − buffer`
/// tokens, then falling linearly to `−penalty_factor` at `max_length`.
///
/// ```
/// use sapo::reward::OverlongPenalty;
/// let verl = OverlongPenalty::verl(16, 4, 1.0)?;
/// assert_eq!(verl.penalty(14), -0.5);
/// assert_eq!(verl.penalty(18), -1.5); // no floor
/// let trl = OverlongPenalty::trl(16, 4)?;
/// assert_eq!(trl.penalty(18), -1.0);
/// # Ok::<(), sapo::Error>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct OverlongPenalty {
    /// `L_max`, the maximum response length in tokens (> 0).
    pub max_length: usize,
    /// `b`, the soft buffer before it (≤ `L_max`; > 0 for [`BeyondMax::Linear`]).
    pub buffer: usize,
    /// `f`, the penalty at `L_max` (finite, ≥ 0; TRL's is 1).
    pub penalty_factor: f64,
    /// Past `L_max`.
    pub beyond_max: BeyondMax,
}

impl OverlongPenalty {
    /// verl's and AReaL's form (`overlong_buffer.len`, `penalty_factor`), checked:
    /// `p = min(−(L − (L_max − b))/b · f, 0)`, no floor past `L_max`.
    ///
    /// ```
    /// use sapo::reward::{BeyondMax, OverlongPenalty};
    /// let p = OverlongPenalty::verl(1024, 256, 0.5)?;
    /// assert_eq!((p.beyond_max, p.penalty(1024)), (BeyondMax::Linear, -0.5));
    /// assert!(OverlongPenalty::verl(1024, 2048, 0.5).is_err()); // b > L_max
    /// # Ok::<(), sapo::Error>(())
    /// ```
    pub fn verl(max_length: usize, buffer: usize, penalty_factor: f64) -> Result<Self> {
        let out = Self {
            max_length,
            buffer,
            penalty_factor,
            beyond_max: BeyondMax::Linear,
        };
        out.validate()?;
        Ok(out)
    }

    /// TRL's form (`max_completion_len`, `soft_punish_cache`), checked:
    /// `p = 0` up to `L_max − b`, `(L_max − b − L)/b` up to `L_max`, `−1` past it (`f = 1`).
    ///
    /// ```
    /// use sapo::reward::{BeyondMax, OverlongPenalty};
    /// let p = OverlongPenalty::trl(1024, 0)?; // b = 0: a step at L_max
    /// assert_eq!((p.beyond_max, p.penalty(1024), p.penalty(1025)), (BeyondMax::Cap, 0.0, -1.0));
    /// # Ok::<(), sapo::Error>(())
    /// ```
    pub fn trl(max_length: usize, buffer: usize) -> Result<Self> {
        let out = Self {
            max_length,
            buffer,
            penalty_factor: 1.0,
            beyond_max: BeyondMax::Cap,
        };
        out.validate()?;
        Ok(out)
    }

    /// Checks `L_max > 0`, `b ≤ L_max` (and `b > 0` for the linear form, as verl asserts), `f`
    /// finite and ≥ 0.
    ///
    /// ```
    /// assert!(sapo::reward::OverlongPenalty::verl(16, 0, 1.0).is_err());
    /// assert!(sapo::reward::OverlongPenalty::trl(16, 0).is_ok());
    /// ```
    pub fn validate(&self) -> Result<()> {
        check_config(self.max_length > 0, "max_length", "> 0", self.max_length)?;
        let linear = self.beyond_max == BeyondMax::Linear;
        check_config(
            self.buffer <= self.max_length && (!linear || self.buffer > 0),
            "buffer",
            "<= max_length, and > 0 for the linear form",
            self.buffer,
        )?;
        check_config(
            self.penalty_factor.is_finite() && self.penalty_factor >= 0.0,
            "penalty_factor",
            "finite and >= 0",
            self.penalty_factor,
        )
    }

    /// The penalty `p` of a response of `length` tokens (the formulas of [`Self::verl`] and
    /// [`Self::trl`], by [`Self::beyond_max`]).
    ///
    /// ```
    /// let p = sapo::reward::OverlongPenalty::verl(16, 4, 2.0)?;
    /// // 0 up to L_max − b = 12, then −(L − 12)/4 · 2
    /// assert_eq!([p.penalty(12), p.penalty(13), p.penalty(16)], [0.0, -0.5, -2.0]);
    /// # Ok::<(), sapo::Error>(())
    /// ```
    pub fn penalty(&self, length: usize) -> f64 {
        let start = (self.max_length - self.buffer) as f64;
        let length = length as f64;
        match self.beyond_max {
            BeyondMax::Linear => {
                (-(length - start) / self.buffer as f64 * self.penalty_factor).min(0.0)
            }
            BeyondMax::Cap if length <= start => 0.0,
            BeyondMax::Cap if length <= self.max_length as f64 => {
                (start - length) / self.buffer as f64 * self.penalty_factor
            }
            BeyondMax::Cap => -self.penalty_factor,
        }
    }

    /// The penalties `[B]` (f32, on `lengths`' device) of the response lengths `[B]` (`u8`,
    /// `u32` or `i64`; a negative length is an error).
    ///
    /// ```
    /// use candle_core::{Device, Tensor};
    /// let lengths = Tensor::new(&[12u32, 15, 20], &Device::Cpu)?;
    /// let p = sapo::reward::OverlongPenalty::verl(16, 4, 1.0)?.penalties(&lengths)?;
    /// assert_eq!(p.to_vec1::<f32>()?, [0.0, -0.75, -2.0]);
    /// # Ok::<(), sapo::Error>(())
    /// ```
    pub fn penalties(&self, lengths: &Tensor) -> Result<Tensor> {
        self.validate()?;
        check_value(
            lengths.rank() == 1,
            "lengths",
            "a [B] tensor",
            lengths.dims(),
        )?;
        check_value(
            matches!(lengths.dtype(), DType::U8 | DType::U32 | DType::I64),
            "lengths",
            "u8, u32 or i64 token counts",
            lengths.dtype(),
        )?;
        let host = lengths.to_dtype(DType::I64)?.to_vec1::<i64>()?;
        let mut out = Vec::with_capacity(host.len());
        for &length in &host {
            check_value(length >= 0, "lengths", "counts >= 0", length)?;
            out.push(self.penalty(length as usize) as f32);
        }
        Ok(Tensor::from_vec(out, host.len(), lengths.device())?)
    }

    /// `scores + p`: the shaped rewards `[B]` in `scores`' dtype (`scores` `[B]`, finite).
    ///
    /// ```
    /// use candle_core::{Device, Tensor};
    /// let scores = Tensor::new(&[1.0f32, 0.0], &Device::Cpu)?;
    /// let lengths = Tensor::new(&[14u32, 3], &Device::Cpu)?;
    /// let r = sapo::reward::OverlongPenalty::verl(16, 4, 1.0)?.apply(&scores, &lengths)?;
    /// assert_eq!(r.to_vec1::<f32>()?, [0.5, 0.0]);
    /// # Ok::<(), sapo::Error>(())
    /// ```
    pub fn apply(&self, scores: &Tensor, lengths: &Tensor) -> Result<Tensor> {
        check_float("scores", scores)?;
        check_device("lengths", lengths, scores)?;
        check_shape("scores", scores, lengths.dims())?;
        check_finite("scores", scores)?;
        let penalties = self.penalties(lengths)?.to_dtype(scores.dtype())?;
        Ok((scores + penalties)?)
    }
}

/// The coefficient `β` of the KL penalty in the reward, kept by the training loop and updated
/// once a batch (verl's `FixedKLController`, `AdaptiveKLController`; Ziegler et al., arXiv
/// 1909.08593).
///
/// ```
/// use sapo::reward::KlController;
/// let mut c = KlController::adaptive(0.05, 0.1, 64)?;
/// c.update(0.2, 4)?; // current KL twice the target: β grows by 0.2·4/64
/// assert!((c.coef() - 0.05 * (1.0 + 0.2 * 4.0 / 64.0)).abs() < 1e-15);
/// # Ok::<(), sapo::Error>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum KlController {
    /// `β` never changes.
    Fixed {
        /// `β`.
        coef: f64,
    },
    /// `β ← β·(1 + clip(current_kl/target − 1, −0.2, 0.2)·n_steps/horizon)`.
    Adaptive {
        /// The current `β`.
        coef: f64,
        /// The KL the controller steers to (> 0).
        target: f64,
        /// The horizon in steps (> 0).
        horizon: usize,
    },
}

impl KlController {
    /// A fixed `β` (finite, ≥ 0; verl's `FixedKLController`).
    ///
    /// ```
    /// use sapo::reward::KlController;
    /// assert_eq!(KlController::fixed(0.001)?.coef(), 0.001);
    /// assert!(KlController::fixed(-0.1).is_err());
    /// # Ok::<(), sapo::Error>(())
    /// ```
    pub fn fixed(coef: f64) -> Result<Self> {
        check_coef(coef)?;
        Ok(Self::Fixed { coef })
    }

    /// An adaptive controller from `β₀` (finite, ≥ 0) toward `target` (finite, > 0) over
    /// `horizon` steps (> 0; verl's `AdaptiveKLController`):
    /// `β ← β·(1 + clip(current_kl/target − 1, −0.2, 0.2)·n_steps/horizon)` at each
    /// [`Self::update`].
    ///
    /// ```
    /// use sapo::reward::KlController;
    /// let mut c = KlController::adaptive(0.1, 0.05, 100)?;
    /// c.update(0.0, 10)?; // no KL at all: the error clips at −0.2, β shrinks by 0.2·10/100
    /// assert!((c.coef() - 0.1 * 0.98).abs() < 1e-15);
    /// assert!(KlController::adaptive(0.1, 0.0, 100).is_err());
    /// # Ok::<(), sapo::Error>(())
    /// ```
    pub fn adaptive(init_coef: f64, target: f64, horizon: usize) -> Result<Self> {
        check_coef(init_coef)?;
        check_config(
            target.is_finite() && target > 0.0,
            "target",
            "finite and > 0",
            target,
        )?;
        check_config(horizon > 0, "horizon", "> 0", horizon)?;
        Ok(Self::Adaptive {
            coef: init_coef,
            target,
            horizon,
        })
    }

    /// The current `β`.
    ///
    /// ```
    /// let c = sapo::reward::KlController::adaptive(0.2, 6.0, 10_000)?;
    /// assert_eq!(c.coef(), 0.2); // β₀ until the first update
    /// # Ok::<(), sapo::Error>(())
    /// ```
    pub fn coef(&self) -> f64 {
        match *self {
            Self::Fixed { coef } | Self::Adaptive { coef, .. } => coef,
        }
    }

    /// One update with the batch's `current_kl` (finite) over `n_steps` steps (verl passes the
    /// batch size). verl's `β` would turn negative for `n_steps > 5·horizon`; that is an error
    /// here.
    ///
    /// ```
    /// let mut c = sapo::reward::KlController::fixed(0.02)?;
    /// c.update(1.0, 8)?;
    /// assert_eq!(c.coef(), 0.02);
    /// assert!(c.update(f64::NAN, 8).is_err());
    /// # Ok::<(), sapo::Error>(())
    /// ```
    pub fn update(&mut self, current_kl: f64, n_steps: usize) -> Result<()> {
        check_value(current_kl.is_finite(), "current_kl", "finite", current_kl)?;
        if let Self::Adaptive {
            coef,
            target,
            horizon,
        } = self
        {
            let error = (current_kl / *target - 1.0).clamp(-0.2, 0.2);
            let factor = 1.0 + error * n_steps as f64 / *horizon as f64;
            check_value(
                factor >= 0.0,
                "n_steps",
                "<= 5 × horizon (the coefficient would turn negative)",
                n_steps,
            )?;
            *coef *= factor;
        }
        Ok(())
    }
}

fn check_coef(coef: f64) -> Result<()> {
    check_config(
        coef.is_finite() && coef >= 0.0,
        "init_coef",
        "finite and >= 0",
        coef,
    )
}

/// What [`kl_in_reward`] returns.
///
/// ```
/// use candle_core::{Device, Tensor};
/// use sapo::reward::{kl_in_reward, KlController};
/// let dev = Device::Cpu;
/// let scores = Tensor::new(&[[0.0f32, 1.0], [0.0, 0.0]], &dev)?;
/// let old = Tensor::new(&[[-1.0f32, -1.0], [-1.0, 9.0]], &dev)?;
/// let reference = Tensor::new(&[[-1.5f32, -1.5], [-1.0, 0.0]], &dev)?;
/// let mask = Tensor::new(&[[1u8, 1], [1, 0]], &dev)?;
/// let controller = KlController::fixed(0.1)?;
/// let out = kl_in_reward(&scores, &old, &reference, &mask, sapo::KlEstimator::K1, false, &controller)?;
/// // k1 = ℓold − ℓref: 0.5 per token in the first row, 0 in the second (its padding ignored);
/// // current_kl = the mean over the rows of each row's token mean
/// assert!((out.current_kl - 0.25).abs() < 1e-6);
/// assert_eq!(out.rewards.to_vec2::<f32>()?, [[-0.05, 0.95], [0.0, 0.0]]);
/// # Ok::<(), sapo::Error>(())
/// ```
#[derive(Debug, Clone)]
pub struct KlInReward {
    /// `[B,T]` `s − β·k·m`, in `scores`' dtype.
    pub rewards: Tensor,
    /// `(1/B) Σ_i Σ_t k·m / (n_i + 1e-8)`: the batch's mean KL (an empty row counts as 0, and an
    /// empty batch's is 0).
    pub current_kl: f64,
}

/// verl's `apply_kl_penalty`: the token-level rewards `s − β·k(ℓold, ℓref)·m` with the
/// controller's current `β`, and the batch's `current_kl` to update it with (then call
/// `controller.update(current_kl, B)`, as verl does). `estimator` as in [`crate::KlEstimator`]
/// (verl `kl` = K1, `mse` = K2, `low_var_kl` = K3 with `clamp`, `k3+` = K3's value), `clamp`
/// verl's k3 clamps. All `[B,T]`; masked positions may hold anything (their reward is the score).
///
/// ```
/// use candle_core::{Device, Tensor};
/// use sapo::reward::{kl_in_reward, KlController};
/// let dev = Device::Cpu;
/// let scores = Tensor::new(&[[0.0f32, 1.0]], &dev)?;
/// let old = Tensor::new(&[[-1.0f32, -0.5]], &dev)?;
/// let reference = Tensor::new(&[[-1.5f32, -0.5]], &dev)?;
/// let mask = Tensor::new(&[[1u8, 1]], &dev)?;
/// let mut controller = KlController::fixed(0.1)?;
/// let out = kl_in_reward(&scores, &old, &reference, &mask, sapo::KlEstimator::K1, false, &controller)?;
/// assert_eq!(out.rewards.to_vec2::<f32>()?, [[-0.05, 1.0]]);
/// controller.update(out.current_kl, 1)?;
/// # Ok::<(), sapo::Error>(())
/// ```
pub fn kl_in_reward(
    scores: &Tensor,
    old_log_probs: &Tensor,
    ref_log_probs: &Tensor,
    mask: &Tensor,
    estimator: KlEstimator,
    clamp: bool,
    controller: &KlController,
) -> Result<KlInReward> {
    // Computed in f32 (f64 stays f64); every value checked in one host read; padding zeroed.
    let Scrubbed { mask: m, values } = scrubbed_matrices(
        &[
            ("scores", scores),
            ("old_log_probs", old_log_probs),
            ("ref_log_probs", ref_log_probs),
        ],
        mask,
    )?;
    let (old, reference) = (&values[1], &values[2]);
    let k = kl_values(old, reference, estimator, clamp)?.mul(&m)?;
    let beta = controller.coef();
    // Masked positions keep their score (verl's); the KL term is 0 there.
    let rewards = (scores.to_dtype(m.dtype())? - k.affine(beta, 0.0)?)?.to_dtype(scores.dtype())?;
    let n = m.sum_keepdim(D::Minus1)?.to_dtype(DType::F64)?;
    let row_kl = k
        .to_dtype(DType::F64)?
        .sum_keepdim(D::Minus1)?
        .div(&(n + COUNT_GUARD)?)?;
    // An empty batch (B = 0) has drifted by nothing: 0, not the NaN of a mean over no rows.
    let current_kl = if row_kl.elem_count() == 0 {
        0.0
    } else {
        row_kl.mean_all()?.to_scalar::<f64>()?
    };
    Ok(KlInReward {
        rewards,
        current_kl,
    })
}
