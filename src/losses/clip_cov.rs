//! Clip-Cov (verl `clip_cov`, *The Entropy Mechanism of RL for Reasoning LMs*, arXiv 2505.22617):
//! PPO's clipped loss, with the per-token loss of a few randomly drawn high-covariance tokens
//! multiplied by 0 (their gradient detached).
//!
//! ```text
//! c_t = (A_t − mean A)·(ℓ_t − mean ℓ)               means over the N unmasked tokens, ℓ detached
//! candidates: unmasked, not clipped by PPO (−A·clip(ρ) ≤ −A·ρ), lb < c_t < ub
//! S = min(#candidates, max(1, ⌊N·r⌋)) candidates drawn uniformly (seeded)
//! l = max(−A·ρ, −A·clip(ρ, 1−ε_low, 1+ε_high)) · [t ∉ S]
//! ```
//!
//! verl draws with `torch.randperm`; the crate draws from the caller's seed (SplitMix64, a
//! partial Fisher–Yates over the candidates in token order): the same seed gives the same tokens
//! on every path and thread count. Metric: `clip_fraction` = the fraction zeroed (verl's
//! `pg_clipfrac` for this loss).

use candle_core::{DType, Tensor};

use crate::checks::compute_dtype;
use crate::error::{check_config, Result};
use crate::losses::clip::{ClipBounds, HardClip};
use crate::losses::metrics::CLIPPED;
use crate::losses::objective::{
    Batch, Eval, GpuShape, Objective, PerToken, Prepass, Shape, Token, TokenTensors,
};
use crate::real::Real;

/// Clip-Cov's parameters (verl's defaults: `clip_cov_ratio` 2e-4, `clip_cov_lb` 1,
/// `clip_cov_ub` 5, the clip's ε 0.2 / 0.2), and the seed of its draw.
///
/// Draw a new subset each step by giving each step its own seed
/// (`ClipCov { seed: step, ..ClipCov::default() }`).
///
/// ```
/// let clip_cov = sapo::ClipCov { seed: 7, ..sapo::ClipCov::default() };
/// assert!(clip_cov.validate().is_ok());
/// assert!(sapo::ClipCov { cov_lower: 5.0, cov_upper: 1.0, ..clip_cov }.validate().is_err());
/// ```
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ClipCov {
    /// `ε_low`, in [0, 1) (verl `clip_ratio_low`).
    pub eps_low: f64,
    /// `ε_high` ≥ 0 (verl `clip_ratio_high`).
    pub eps_high: f64,
    /// `r`, the drawn fraction of the unmasked tokens, in (0, 1] (verl `clip_cov_ratio`).
    pub ratio: f64,
    /// `lb`, the covariance band's lower bound (verl `clip_cov_lb`).
    pub cov_lower: f64,
    /// `ub` > `lb`, its upper bound (verl `clip_cov_ub`).
    pub cov_upper: f64,
    /// The seed of the draw.
    pub seed: u64,
}

impl Default for ClipCov {
    fn default() -> Self {
        Self {
            eps_low: 0.2,
            eps_high: 0.2,
            ratio: 2e-4,
            cov_lower: 1.0,
            cov_upper: 5.0,
            seed: 0,
        }
    }
}

impl ClipCov {
    /// Checks the clip's bounds, the ratio and the band.
    ///
    /// ```
    /// assert!(sapo::ClipCov { ratio: 0.0, ..Default::default() }.validate().is_err());
    /// ```
    pub fn validate(&self) -> Result<()> {
        self.clip().validate()?;
        check_config(
            self.ratio > 0.0 && self.ratio <= 1.0,
            "clip_cov_ratio",
            "in (0, 1]",
            self.ratio,
        )?;
        check_config(
            self.cov_lower.is_finite(),
            "clip_cov_lb",
            "finite",
            self.cov_lower,
        )?;
        check_config(
            self.cov_upper.is_finite() && self.cov_upper > self.cov_lower,
            "clip_cov_ub",
            "finite and > clip_cov_lb",
            self.cov_upper,
        )
    }

    /// PPO's clip with these bounds (no dual clip, no δ).
    fn clip(&self) -> HardClip {
        HardClip::new(self.eps_low, self.eps_high)
    }
}

/// A SplitMix64 stream: the draw's random numbers.
struct SplitMix64(u64);

impl SplitMix64 {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in `0..n` (n > 0), without modulo bias (Lemire's multiply-and-reject).
    fn below(&mut self, n: u64) -> u64 {
        loop {
            let m = u128::from(self.next()) * u128::from(n);
            let low = m as u64;
            if low >= n.wrapping_neg() % n {
                return (m >> 64) as u64;
            }
        }
    }
}

/// The drawn tokens (flat indices, in draw order) from the host values of one batch: `ℓ`, `ℓold`,
/// the advantages per token and the mask (non-zero: unmasked), and the log-ratio clamp of the
/// ratio the clip sees.
pub(crate) fn draw(
    clip_cov: &ClipCov,
    (log_probs, old, advantages, mask): (&[f64], &[f64], &[f64], &[f64]),
    log_ratio_clamp: Option<f64>,
) -> Vec<usize> {
    let unmasked: Vec<usize> = (0..mask.len()).filter(|&j| mask[j] != 0.0).collect();
    let n = unmasked.len();
    if n == 0 {
        return vec![];
    }
    let mean = |x: &[f64]| unmasked.iter().map(|&j| x[j]).sum::<f64>() / n as f64;
    let (mean_adv, mean_lp) = (mean(advantages), mean(log_probs));
    let (low, high) = (1.0 - clip_cov.eps_low, 1.0 + clip_cov.eps_high);
    let mut candidates: Vec<usize> = unmasked
        .iter()
        .copied()
        .filter(|&j| {
            let delta = log_probs[j] - old[j];
            let delta = log_ratio_clamp.map_or(delta, |c| delta.clamp(-c, c));
            let ratio = delta.exp();
            let a = advantages[j];
            let clipped = -a * ratio.clamp(low, high) > -a * ratio;
            let cov = (a - mean_adv) * (log_probs[j] - mean_lp);
            !clipped && clip_cov.cov_lower < cov && cov < clip_cov.cov_upper
        })
        .collect();
    let count = ((n as f64 * clip_cov.ratio).floor() as usize)
        .max(1)
        .min(candidates.len());
    let mut rng = SplitMix64(clip_cov.seed);
    for i in 0..count {
        let k = i + rng.below((candidates.len() - i) as u64) as usize;
        candidates.swap(i, k);
    }
    candidates.truncate(count);
    candidates
}

/// The values of a tensor on the host as f64.
fn host(x: &Tensor) -> Result<Vec<f64>> {
    Ok(x.detach()
        .flatten_all()?
        .to_dtype(DType::F64)?
        .to_vec1::<f64>()?)
}

// ---------------------------------------------------------------------------------------------
// Scalar form (the kernels').

pub(crate) struct ClipCovShape<R> {
    clip: ClipBounds<R>,
}

impl<R: Real> Shape<R> for ClipCovShape<R> {
    const SLOTS: &'static [usize] = &[CLIPPED];

    #[inline(always)]
    fn eval(&self, t: &Token<R>) -> Eval<R> {
        let e = self.clip.eval(t);
        let kept = R::ONE - t.flag;
        Eval::through_ratio(
            e.value * kept,
            e.slope * kept,
            [t.flag, R::ZERO, R::ZERO, R::ZERO],
        )
    }
}

// ---------------------------------------------------------------------------------------------
// Tensor form (the composed path's).

pub(crate) fn per_token(clip_cov: &ClipCov, x: &TokenTensors<'_>) -> Result<PerToken> {
    let clipped = crate::losses::clip::per_token(&clip_cov.clip(), x.ratio, x.advantages)?;
    let flags = match x.flags {
        Some(f) => f.clone(),
        None => x.advantages.zeros_like()?,
    };
    Ok(PerToken {
        loss: clipped.loss.mul(&(1.0 - &flags)?)?,
        metrics: vec![(CLIPPED, flags)],
    })
}

impl Objective for ClipCov {
    const NAME: &'static str = "clip_cov";
    const ID: i32 = 11;
    const DEVICE: &'static str = include_str!("clip_cov.h");
    const TOKEN_ONLY: bool = true;
    const BATCH_PREPASS: bool = true;
    type Scalar<R: Real> = ClipCovShape<R>;

    fn validate(&self) -> Result<()> {
        ClipCov::validate(self)
    }
    fn scalar<R: Real>(&self) -> ClipCovShape<R> {
        ClipCovShape {
            clip: self.clip().bounds(),
        }
    }
    fn per_token(&self, x: &TokenTensors<'_>) -> Result<PerToken> {
        per_token(self, x)
    }
    fn gpu(&self) -> GpuShape {
        // clip.h's layout: low, high, δ (none: +inf), dual (off).
        let b = self.clip().bounds::<f32>();
        GpuShape::new(&[b.low, b.high, b.delta, 0.0])
    }
    /// The drawn tokens, as flags (one host read of `ℓ`, `ℓold`, `A` and the mask).
    fn prepass(&self, batch: &Batch<'_>) -> Result<Prepass> {
        let inputs = batch.inputs;
        let dims = inputs.log_probs.dims().to_vec();
        let advantages = inputs.advantages(batch.t)?;
        let advantages = if advantages.rank() == 1 {
            advantages
                .unsqueeze(1)?
                .broadcast_as(dims.as_slice())?
                .contiguous()?
        } else {
            advantages
        };
        let (lp, old, adv) = (
            host(inputs.log_probs)?,
            host(inputs.old_log_probs)?,
            host(&advantages)?,
        );
        let mask = host(inputs.mask)?;
        let mut flags = vec![0f64; mask.len()];
        for j in draw(self, (&lp, &old, &adv, &mask), batch.log_ratio_clamp) {
            flags[j] = 1.0;
        }
        let dtype = compute_dtype(inputs.log_probs.dtype());
        Ok(Prepass {
            is_weights: None,
            flags: Some(Tensor::from_vec(flags, dims, inputs.log_probs.device())?.to_dtype(dtype)?),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// A batch: values on a grid (ties), mask, per-token advantages.
    fn batch() -> impl Strategy<Value = (Vec<f64>, Vec<f64>, Vec<f64>, Vec<f64>)> {
        let grid = |lo: i32, hi: i32, step: f64| {
            prop::collection::vec((lo..hi).prop_map(move |v| f64::from(v) * step), 60)
        };
        (
            grid(-12, 0, 0.25),
            grid(-12, 0, 0.25),
            grid(-8, 9, 0.5),
            prop::collection::vec(
                prop::bool::weighted(0.8).prop_map(|m| f64::from(u8::from(m))),
                60,
            ),
        )
    }

    proptest! {
        /// The count, the band, PPO's clipped tokens never drawn, the same draw for the same seed.
        #[test]
        fn the_draw_follows_the_rule(
            (lp, old, adv, mask) in batch(),
            ratio in 0.01f64..0.5,
            band in (-1.0f64..1.0, 0.1f64..4.0),
            seed in any::<u64>(),
        ) {
            let clip_cov = ClipCov {
                ratio,
                cov_lower: band.0,
                cov_upper: band.0 + band.1,
                seed,
                ..ClipCov::default()
            };
            let drawn = draw(&clip_cov, (&lp, &old, &adv, &mask), None);
            prop_assert_eq!(&drawn, &draw(&clip_cov, (&lp, &old, &adv, &mask), None));
            let unmasked: Vec<usize> = (0..60).filter(|&j| mask[j] != 0.0).collect();
            let n = unmasked.len() as f64;
            let mean = |x: &[f64]| unmasked.iter().map(|&j| x[j]).sum::<f64>() / n;
            let candidates: Vec<usize> = unmasked
                .iter()
                .copied()
                .filter(|&j| {
                    let r = (lp[j] - old[j]).exp();
                    let clipped = -adv[j] * r.clamp(0.8, 1.2) > -adv[j] * r;
                    let cov = (adv[j] - mean(&adv)) * (lp[j] - mean(&lp));
                    !clipped && band.0 < cov && cov < band.0 + band.1
                })
                .collect();
            let want = if unmasked.is_empty() {
                0
            } else {
                ((n * ratio).floor() as usize).max(1).min(candidates.len())
            };
            prop_assert_eq!(drawn.len(), want);
            let mut unique = drawn.clone();
            unique.sort_unstable();
            unique.dedup();
            prop_assert_eq!(unique.len(), drawn.len());
            prop_assert!(drawn.iter().all(|j| candidates.contains(j)));
        }
    }

    /// Different seeds draw different subsets (of many candidates), each uniformly: over many
    /// seeds every candidate is drawn about equally often.
    #[test]
    fn the_draw_is_uniform_over_seeds() {
        let n = 40;
        let lp: Vec<f64> = (0..n).map(|j| -1.0 - (j % 2) as f64).collect();
        let adv: Vec<f64> = (0..n)
            .map(|j| if j % 2 == 0 { -3.0 } else { 3.0 })
            .collect();
        // ρ = 1: nothing is clipped. A alternates −3, 3 (mean 0), ℓ −1, −2 (mean −1.5): every
        // covariance is −1.5, inside the band (−2, 0).
        let clip_cov = ClipCov {
            ratio: 0.1,
            cov_lower: -2.0,
            cov_upper: 0.0,
            ..ClipCov::default()
        };
        let mask = vec![1.0; n];
        let mut counts = vec![0usize; n];
        let seeds = 4000;
        for seed in 0..seeds {
            let c = ClipCov { seed, ..clip_cov };
            let drawn = draw(&c, (&lp, &lp, &adv, &mask), None);
            assert_eq!(drawn.len(), 4);
            for j in drawn {
                counts[j] += 1;
            }
        }
        // Expected 4000 · 4 / 40 = 400 each; 6 standard deviations (√(400·0.9) = 19).
        for (j, c) in counts.iter().enumerate() {
            assert!((*c as f64 - 400.0).abs() < 114.0, "token {j}: {c} draws");
        }
    }
}
