//! verl's advantage estimators with token-level inputs, as its trainer calls them
//! (`ray_trainer.compute_advantage` → `core_algos`), on `[B,T]` token rewards and a 0/1 mask.
//!
//! The outcome estimators score a response by `S_i = Σ_t r[i,t]` over **every** position, masked
//! ones included, as verl does (its reward managers write the score at the response's last
//! token, and an empty response's at `T−1`, a masked position). Group statistics: mean and sample
//! standard deviation (n−1); a group of one has mean 0 and std 1. `whiten` is verl's
//! `masked_whiten` over the batch's unmasked entries:
//!
//! ```text
//! whiten(x) = (x − μ)/sqrt(σ² + 1e-8),  μ = Σ m·x/(N + 1e-8),  σ² = Σ m·(x − μ)²/(N + 1e-8) · N/(N − 1),  N = Σ m ≥ 2
//! ```
//!
//! Every output is multiplied by the mask.

use candle_core::{DType, Tensor};

use super::{group_index, Groups};
use crate::checks::check_mask_values;
use crate::error::{check_config, Error, Result};

/// The token-level estimators (verl's `adv_estimator` names).
///
/// ```
/// use sapo::TokenEstimator;
/// let gae = TokenEstimator::Gae { gamma: 1.0, lambda: 0.95 };
/// assert_eq!(gae.name(), "gae");
/// ```
#[derive(Debug, Clone, PartialEq)]
pub enum TokenEstimator {
    /// `reinforce_plus_plus`: `A = whiten(G)`, `G[t] = r[t] + γ·G[t+1]` over the unmasked tokens
    /// (a masked token passes the carry through, its reward dropped); returns `G`.
    ReinforcePlusPlus {
        /// Discount `γ ∈ [0, 1]`.
        gamma: f64,
    },
    /// `reinforce_plus_plus_baseline`: `A = whiten(a_i·m)`, `a_i = S_i − mean_g(S)`.
    ReinforcePlusPlusBaseline,
    /// `grpo_passk`: the group's best member gets `(S_max − S_2nd)/(std_g + ε)` (or
    /// `S_max − S_2nd` without `norm_by_std`), every other member 0; groups need ≥ 2 members.
    GrpoPassK {
        /// Added to the standard deviation (1e-6 in verl).
        epsilon: f64,
        /// verl's `norm_adv_by_std_in_grpo`.
        norm_by_std: bool,
    },
    /// `opo`: `A = S_i − b_g`, `b_g = Σ_j n_j·S_j / Σ_j n_j` (length-weighted over the group, `n_j`
    /// the response's unmasked tokens; a group of one gets 0).
    Opo,
    /// `gpg`: `A = α·(S_i − mean_g(S))`, `α = B / max(#{j: S_j ≠ 0}, 1)`.
    Gpg,
    /// `gdpo`: `A = whiten(a_i·m)`, `a_i = Σ_k w_k·(c[i,k] − mean_g c_k)/(std_g c_k + ε)` over the
    /// reward components `c` `[B,K]`.
    Gdpo {
        /// Added to each component's standard deviation (1e-6 in verl).
        epsilon: f64,
        /// `w`, one per component; `None`: all 1 (verl's `gdpo_reward_weights`).
        reward_weights: Option<Vec<f64>>,
    },
    /// `gae`: `A = whiten(Â)`, `Â[t] = δ[t] + γλ·Â[t+1]`, `δ[t] = r[t] + γ·v[t+1] − v[t]` over the
    /// unmasked tokens (a masked token passes both carries through); returns `Â + v`.
    Gae {
        /// Discount `γ ∈ [0, 1]`.
        gamma: f64,
        /// GAE's `λ ∈ [0, 1]`.
        lambda: f64,
    },
    /// `remax`: `A = R − b_i`, `R[t] = Σ_{u≥t} m[u]·r[u]`, `b_i` the greedy baseline's reward;
    /// returns `R`.
    Remax,
}

impl TokenEstimator {
    /// verl's name for it.
    ///
    /// ```
    /// assert_eq!(sapo::TokenEstimator::Opo.name(), "opo");
    /// ```
    pub fn name(&self) -> &'static str {
        match self {
            Self::ReinforcePlusPlus { .. } => "reinforce_plus_plus",
            Self::ReinforcePlusPlusBaseline => "reinforce_plus_plus_baseline",
            Self::GrpoPassK { .. } => "grpo_passk",
            Self::Opo => "opo",
            Self::Gpg => "gpg",
            Self::Gdpo { .. } => "gdpo",
            Self::Gae { .. } => "gae",
            Self::Remax => "remax",
        }
    }
}

/// The inputs; each estimator reads the ones its formula names (see [`TokenEstimator`]) and a
/// missing one is an error naming it.
///
/// ```
/// # use candle_core::{Device, Tensor};
/// let mask = Tensor::new(&[[1f32, 1.0, 0.0]], &Device::Cpu)?;
/// let rewards = Tensor::new(&[[0f32, 1.0, 0.0]], &Device::Cpu)?;
/// let inputs = sapo::TokenAdvantageInputs::new(&mask).with_token_level_rewards(&rewards);
/// # Ok::<(), candle_core::Error>(())
/// ```
#[derive(Debug, Clone, Copy)]
pub struct TokenAdvantageInputs<'a> {
    /// `m`, `[B,T]`, 0/1.
    pub mask: &'a Tensor,
    /// `r`, `[B,T]`.
    pub token_level_rewards: Option<&'a Tensor>,
    /// The group of every response (the grouped estimators).
    pub groups: Option<Groups<'a>>,
    /// `v`, `[B,T]` (gae).
    pub values: Option<&'a Tensor>,
    /// `c`, `[B,K]` (gdpo).
    pub reward_components: Option<&'a Tensor>,
    /// `b`, `[B]` (remax).
    pub reward_baselines: Option<&'a Tensor>,
}

impl<'a> TokenAdvantageInputs<'a> {
    /// The mask alone; add what the estimator reads.
    ///
    /// ```
    /// # use candle_core::{Device, Tensor};
    /// let mask = Tensor::new(&[[1u8, 0]], &Device::Cpu)?;
    /// let inputs = sapo::TokenAdvantageInputs::new(&mask);
    /// assert!(inputs.token_level_rewards.is_none() && inputs.groups.is_none());
    /// # Ok::<(), candle_core::Error>(())
    /// ```
    pub fn new(mask: &'a Tensor) -> Self {
        Self {
            mask,
            token_level_rewards: None,
            groups: None,
            values: None,
            reward_components: None,
            reward_baselines: None,
        }
    }
    /// With the token rewards `r` `[B,T]` (every estimator reads them but `gdpo`).
    ///
    /// ```
    /// # use candle_core::{Device, Tensor};
    /// use sapo::{token_advantages, TokenAdvantageInputs, TokenEstimator};
    /// let mask = Tensor::new(&[[1f32, 1.0]], &Device::Cpu)?;
    /// let rewards = Tensor::new(&[[1f32, 2.0]], &Device::Cpu)?;
    /// let inputs = TokenAdvantageInputs::new(&mask).with_token_level_rewards(&rewards);
    /// // reinforce_plus_plus with γ = 1: the returns G[t] = Σ_{u≥t} r[u]
    /// let out = token_advantages(&TokenEstimator::ReinforcePlusPlus { gamma: 1.0 }, &inputs)?;
    /// assert_eq!(out.returns.unwrap().to_vec2::<f32>()?, [[3.0, 2.0]]);
    /// # Ok::<(), sapo::Error>(())
    /// ```
    pub fn with_token_level_rewards(self, rewards: &'a Tensor) -> Self {
        Self {
            token_level_rewards: Some(rewards),
            ..self
        }
    }
    /// With the group of every response (`grpo_passk`, `opo`, `gpg`, `gdpo` and
    /// `reinforce_plus_plus_baseline`).
    ///
    /// ```
    /// # use candle_core::{Device, Tensor};
    /// use sapo::{token_advantages, Groups, TokenAdvantageInputs, TokenEstimator};
    /// let mask = Tensor::new(&[[1f32, 1.0], [1.0, 1.0]], &Device::Cpu)?;
    /// let rewards = Tensor::new(&[[0f32, 1.0], [0.0, 0.0]], &Device::Cpu)?;
    /// let inputs = TokenAdvantageInputs::new(&mask)
    ///     .with_token_level_rewards(&rewards)
    ///     .with_groups(Groups::Size(2));
    /// // gpg: A = α·(S_i − mean_g S), S = [1, 0], α = B / #{S ≠ 0} = 2
    /// let out = token_advantages(&TokenEstimator::Gpg, &inputs)?;
    /// assert_eq!(out.advantages.to_vec2::<f32>()?, [[1.0, 1.0], [-1.0, -1.0]]);
    /// # Ok::<(), sapo::Error>(())
    /// ```
    pub fn with_groups(self, groups: Groups<'a>) -> Self {
        Self {
            groups: Some(groups),
            ..self
        }
    }
    /// With the critic's values `v` `[B,T]` (`gae`).
    ///
    /// ```
    /// # use candle_core::{Device, Tensor};
    /// use sapo::{token_advantages, TokenAdvantageInputs, TokenEstimator};
    /// let mask = Tensor::new(&[[1f32, 1.0]], &Device::Cpu)?;
    /// let rewards = Tensor::new(&[[0f32, 1.0]], &Device::Cpu)?;
    /// let values = Tensor::new(&[[0.5f32, 0.5]], &Device::Cpu)?;
    /// let inputs = TokenAdvantageInputs::new(&mask)
    ///     .with_token_level_rewards(&rewards)
    ///     .with_values(&values);
    /// // δ = r[t] + γ·v[t+1] − v[t] = [0, 0.5], Â = [0.5, 0.5]; the returns are Â + v
    /// let gae = TokenEstimator::Gae { gamma: 1.0, lambda: 1.0 };
    /// let out = token_advantages(&gae, &inputs)?;
    /// assert_eq!(out.returns.unwrap().to_vec2::<f32>()?, [[1.0, 1.0]]);
    /// # Ok::<(), sapo::Error>(())
    /// ```
    pub fn with_values(self, values: &'a Tensor) -> Self {
        Self {
            values: Some(values),
            ..self
        }
    }
    /// With the reward components `c` `[B,K]` (`gdpo`).
    ///
    /// ```
    /// # use candle_core::{Device, Tensor};
    /// use sapo::{token_advantages, Groups, TokenAdvantageInputs, TokenEstimator};
    /// let mask = Tensor::new(&[[1f32], [1.0]], &Device::Cpu)?;
    /// let components = Tensor::new(&[[1f32, 0.0], [0.0, 0.0]], &Device::Cpu)?;
    /// let inputs = TokenAdvantageInputs::new(&mask)
    ///     .with_reward_components(&components)
    ///     .with_groups(Groups::Size(2));
    /// let gdpo = TokenEstimator::Gdpo { epsilon: 1e-6, reward_weights: None };
    /// let a = token_advantages(&gdpo, &inputs)?.advantages.to_vec2::<f32>()?;
    /// // the first response is better on the first component, equal on the second
    /// assert!(a[0][0] > 0.0 && a[1][0] < 0.0);
    /// # Ok::<(), sapo::Error>(())
    /// ```
    pub fn with_reward_components(self, components: &'a Tensor) -> Self {
        Self {
            reward_components: Some(components),
            ..self
        }
    }
    /// With the greedy baselines' rewards `b` `[B]` (`remax`).
    ///
    /// ```
    /// # use candle_core::{Device, Tensor};
    /// use sapo::{token_advantages, TokenAdvantageInputs, TokenEstimator};
    /// let mask = Tensor::new(&[[1f32, 1.0]], &Device::Cpu)?;
    /// let rewards = Tensor::new(&[[0f32, 1.0]], &Device::Cpu)?;
    /// let baselines = Tensor::new(&[0.25f32], &Device::Cpu)?;
    /// let inputs = TokenAdvantageInputs::new(&mask)
    ///     .with_token_level_rewards(&rewards)
    ///     .with_reward_baselines(&baselines);
    /// // A = R − b with R[t] = Σ_{u≥t} m·r
    /// let out = token_advantages(&TokenEstimator::Remax, &inputs)?;
    /// assert_eq!(out.advantages.to_vec2::<f32>()?, [[0.75, 0.75]]);
    /// # Ok::<(), sapo::Error>(())
    /// ```
    pub fn with_reward_baselines(self, baselines: &'a Tensor) -> Self {
        Self {
            reward_baselines: Some(baselines),
            ..self
        }
    }
}

/// The advantages `[B,T]` and, for `reinforce_plus_plus`, `gae` and `remax`, the returns `[B,T]`;
/// both 0 on masked positions, in the mask's float dtype (f32 for an integer mask) on its device.
///
/// ```
/// # use candle_core::{Device, Tensor};
/// use sapo::{token_advantages, TokenAdvantageInputs, TokenEstimator};
/// let mask = Tensor::new(&[[1u8, 1, 0]], &Device::Cpu)?;
/// let rewards = Tensor::new(&[[0f32, 1.0, 7.0]], &Device::Cpu)?;
/// let inputs = TokenAdvantageInputs::new(&mask).with_token_level_rewards(&rewards);
/// let out = token_advantages(&TokenEstimator::ReinforcePlusPlus { gamma: 1.0 }, &inputs)?;
/// // an integer mask gives f32; the masked position is 0 in both, its reward dropped
/// assert_eq!(out.returns.unwrap().to_vec2::<f32>()?, [[1.0, 1.0, 0.0]]);
/// assert_eq!(out.advantages.to_vec2::<f32>()?[0][2], 0.0);
/// # Ok::<(), sapo::Error>(())
/// ```
#[derive(Debug, Clone)]
pub struct TokenAdvantages {
    /// `A`, `[B,T]`.
    pub advantages: Tensor,
    /// The critic's targets (`reinforce_plus_plus`: `G`; `gae`: `Â + v`; `remax`: `R`), `[B,T]`.
    pub returns: Option<Tensor>,
}

/// A `[B,T]` host matrix, row-major.
struct Matrix {
    data: Vec<f64>,
    t: usize,
}

impl Matrix {
    fn row(&self, i: usize) -> &[f64] {
        &self.data[i * self.t..(i + 1) * self.t]
    }
}

fn matrix(arg: &'static str, x: &Tensor, dims: &[usize]) -> Result<Vec<f64>> {
    if x.dims() != dims {
        return Err(Error::Shape {
            arg,
            expected: format!("{dims:?}"),
            actual: x.dims().to_vec(),
        });
    }
    Ok(x.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?)
}

fn required<T>(value: Option<T>, arg: &'static str, estimator: &TokenEstimator) -> Result<T> {
    value.ok_or_else(|| Error::InvalidValue {
        arg,
        expected: format!("given (the {} estimator reads it)", estimator.name()),
        actual: "None".into(),
    })
}

fn check_finite(arg: &'static str, values: &[f64], mask: Option<&[f64]>) -> Result<()> {
    let bad = values
        .iter()
        .enumerate()
        .find(|(j, v)| !v.is_finite() && mask.is_none_or(|m| m[*j] != 0.0));
    match bad {
        Some((j, v)) => Err(Error::InvalidValue {
            arg,
            expected: match mask {
                Some(_) => "finite values at unmasked positions".into(),
                None => "finite values".into(),
            },
            actual: format!("{v} at flat index {j}"),
        }),
        None => Ok(()),
    }
}

/// verl's `masked_whiten` over the unmasked entries, times the mask.
fn whiten(x: &[f64], mask: &[f64]) -> Result<Vec<f64>> {
    let n: f64 = mask.iter().sum();
    if n < 2.0 {
        return Err(Error::InvalidValue {
            arg: "mask",
            expected: "at least 2 unmasked tokens in the batch (the whitening's variance)".into(),
            // A count (`n` of an empty batch is −0.0).
            actual: format!("{}", n as usize),
        });
    }
    let mean = x.iter().zip(mask).map(|(v, m)| v * m).sum::<f64>() / (n + 1e-8);
    let var = x
        .iter()
        .zip(mask)
        .map(|(v, m)| m * (v - mean).powi(2))
        .sum::<f64>()
        / (n + 1e-8)
        * (n / (n - 1.0));
    let scale = 1.0 / (var + 1e-8).sqrt();
    Ok(x.iter()
        .zip(mask)
        .map(|(v, m)| if *m != 0.0 { (v - mean) * scale } else { 0.0 })
        .collect())
}

/// Per group: mean and sample std of `scores` (a group of one: 0 and 1).
fn group_stats(scores: &[f64], group_of: &[usize], groups: usize) -> Vec<(f64, f64)> {
    let mut members: Vec<Vec<f64>> = vec![Vec::new(); groups];
    for (&g, &s) in group_of.iter().zip(scores) {
        members[g].push(s);
    }
    members
        .iter()
        .map(|m| {
            if m.len() < 2 {
                return (0.0, 1.0);
            }
            let mean = m.iter().sum::<f64>() / m.len() as f64;
            let var = m.iter().map(|s| (s - mean).powi(2)).sum::<f64>() / (m.len() - 1) as f64;
            (mean, var.sqrt())
        })
        .collect()
}

/// One value per response, spread over its unmasked tokens.
fn per_response(values: &[f64], mask: &[f64], t: usize) -> Vec<f64> {
    mask.iter()
        .enumerate()
        .map(|(j, m)| if *m != 0.0 { values[j / t] } else { 0.0 })
        .collect()
}

/// Token-level advantages (and returns) of verl's estimators: see [`TokenEstimator`] for each
/// formula. Bad input is a typed error: shapes, `γ` or `λ` outside [0, 1], a negative or
/// non-finite `ε`, reward weights of the wrong length, a missing input, a group of one for
/// `grpo_passk`, fewer than 2 unmasked tokens for the whitened ones, non-finite values where they
/// are read (the outcome estimators read every reward position, as verl sums them; the per-token
/// ones only the unmasked positions, whose garbage never reaches a value).
///
/// ```
/// use candle_core::{Device, Tensor};
/// use sapo::{token_advantages, Groups, TokenAdvantageInputs, TokenEstimator};
/// let dev = Device::Cpu;
/// let mask = Tensor::new(&[[1f32, 1.0, 0.0], [1.0, 1.0, 1.0]], &dev)?;
/// let rewards = Tensor::new(&[[0f32, 1.0, 0.0], [0.0, 0.0, 0.0]], &dev)?;
/// let out = token_advantages(
///     &TokenEstimator::Remax,
///     &TokenAdvantageInputs::new(&mask)
///         .with_token_level_rewards(&rewards)
///         .with_reward_baselines(&Tensor::new(&[0.5f32, 0.0], &dev)?),
/// )?;
/// // remax: R[t] = Σ_{u≥t} m·r, A = R − b
/// assert_eq!(out.advantages.to_vec2::<f32>()?, vec![vec![0.5, 0.5, 0.0], vec![0.0; 3]]);
/// assert_eq!(out.returns.unwrap().to_vec2::<f32>()?[0], vec![1.0, 1.0, 0.0]);
/// # Ok::<(), sapo::Error>(())
/// ```
pub fn token_advantages(
    estimator: &TokenEstimator,
    inputs: &TokenAdvantageInputs<'_>,
) -> Result<TokenAdvantages> {
    let (b, t) = crate::error::matrix_dims("mask", inputs.mask)?;
    check_mask_values(inputs.mask)?;
    let unit =
        |arg: &'static str, v: f64| check_config((0.0..=1.0).contains(&v), arg, "in [0, 1]", v);
    let eps = |v: f64| check_config(v.is_finite() && v >= 0.0, "epsilon", "finite and >= 0", v);
    match estimator {
        TokenEstimator::ReinforcePlusPlus { gamma } => unit("gamma", *gamma)?,
        TokenEstimator::Gae { gamma, lambda } => {
            unit("gamma", *gamma)?;
            unit("lambda", *lambda)?;
        }
        TokenEstimator::GrpoPassK { epsilon, .. } | TokenEstimator::Gdpo { epsilon, .. } => {
            eps(*epsilon)?
        }
        _ => {}
    }
    let mask = matrix("mask", inputs.mask, &[b, t])?;
    let rewards = |m: Option<&[f64]>| -> Result<Matrix> {
        let r = required(inputs.token_level_rewards, "token_level_rewards", estimator)?;
        let data = matrix("token_level_rewards", r, &[b, t])?;
        check_finite("token_level_rewards", &data, m)?;
        Ok(Matrix { data, t })
    };
    let groups = || -> Result<(Vec<usize>, usize)> {
        group_index(required(inputs.groups, "group_ids", estimator)?, b)
    };
    // Σ_t r[i,t] over every position (verl's scores).
    let scores = |r: &Matrix| -> Vec<f64> { (0..b).map(|i| r.row(i).iter().sum()).collect() };
    let (advantages, returns) = match estimator {
        TokenEstimator::ReinforcePlusPlus { gamma } => {
            let r = rewards(Some(&mask))?;
            let mut g = vec![0.0; b * t];
            for i in 0..b {
                let mut carry = 0.0;
                for k in (0..t).rev() {
                    if mask[i * t + k] != 0.0 {
                        carry = r.data[i * t + k] + gamma * carry;
                        g[i * t + k] = carry;
                    }
                }
            }
            (whiten(&g, &mask)?, Some(g))
        }
        TokenEstimator::ReinforcePlusPlusBaseline => {
            let s = scores(&rewards(None)?);
            let (group_of, n) = groups()?;
            let stats = group_stats(&s, &group_of, n);
            let a: Vec<f64> = (0..b).map(|i| s[i] - stats[group_of[i]].0).collect();
            (whiten(&per_response(&a, &mask, t), &mask)?, None)
        }
        TokenEstimator::GrpoPassK {
            epsilon,
            norm_by_std,
        } => {
            let s = scores(&rewards(None)?);
            let (group_of, n) = groups()?;
            let stats = group_stats(&s, &group_of, n);
            let mut members: Vec<Vec<usize>> = vec![Vec::new(); n];
            for (i, &g) in group_of.iter().enumerate() {
                members[g].push(i);
            }
            let mut a = vec![0.0; b];
            for (g, rows) in members.iter().enumerate() {
                if rows.len() < 2 {
                    return Err(Error::InvalidValue {
                        arg: "group_ids",
                        expected: "groups of at least 2 responses (grpo_passk)".into(),
                        actual: format!("a group of {} (response {})", rows.len(), rows[0]),
                    });
                }
                let mut sorted: Vec<usize> = rows.clone();
                sorted.sort_by(|x, y| s[*y].total_cmp(&s[*x]));
                let gap = s[sorted[0]] - s[sorted[1]];
                a[sorted[0]] = if *norm_by_std {
                    gap / (stats[g].1 + epsilon)
                } else {
                    gap
                };
            }
            (per_response(&a, &mask, t), None)
        }
        TokenEstimator::Opo => {
            let s = scores(&rewards(None)?);
            let (group_of, n) = groups()?;
            let lengths: Vec<f64> = (0..b)
                .map(|i| mask[i * t..(i + 1) * t].iter().sum())
                .collect();
            let (mut weighted, mut total, mut size) = (vec![0.0; n], vec![0.0; n], vec![0usize; n]);
            for i in 0..b {
                weighted[group_of[i]] += lengths[i] * s[i];
                total[group_of[i]] += lengths[i];
                size[group_of[i]] += 1;
            }
            let a: Vec<f64> = (0..b)
                .map(|i| {
                    let g = group_of[i];
                    if size[g] < 2 || total[g] == 0.0 {
                        0.0
                    } else {
                        s[i] - weighted[g] / total[g]
                    }
                })
                .collect();
            (per_response(&a, &mask, t), None)
        }
        TokenEstimator::Gpg => {
            let s = scores(&rewards(None)?);
            let (group_of, n) = groups()?;
            let stats = group_stats(&s, &group_of, n);
            let nonzero = s.iter().filter(|v| **v != 0.0).count().max(1);
            let alpha = b as f64 / nonzero as f64;
            let a: Vec<f64> = (0..b)
                .map(|i| alpha * (s[i] - stats[group_of[i]].0))
                .collect();
            (per_response(&a, &mask, t), None)
        }
        TokenEstimator::Gdpo {
            epsilon,
            reward_weights,
        } => {
            let c = required(inputs.reward_components, "reward_components", estimator)?;
            let k = match c.dims() {
                &[rows, k] if rows == b && k >= 1 => k,
                other => {
                    return Err(Error::Shape {
                        arg: "reward_components",
                        expected: format!("[B, K] = [{b}, K] with K >= 1"),
                        actual: other.to_vec(),
                    })
                }
            };
            let weights = match reward_weights {
                Some(w) if w.len() != k => {
                    return Err(Error::InvalidValue {
                        arg: "reward_weights",
                        expected: format!("{k} weights (one per reward component)"),
                        actual: format!("{} weights", w.len()),
                    })
                }
                Some(w) => {
                    check_finite("reward_weights", w, None)?;
                    w.clone()
                }
                None => vec![1.0; k],
            };
            let c = matrix("reward_components", c, &[b, k])?;
            check_finite("reward_components", &c, None)?;
            let (group_of, n) = groups()?;
            let mut a = vec![0.0; b];
            for (col, w) in weights.iter().enumerate() {
                let column: Vec<f64> = (0..b).map(|i| c[i * k + col]).collect();
                let stats = group_stats(&column, &group_of, n);
                for i in 0..b {
                    let (mean, std) = stats[group_of[i]];
                    a[i] += w * (column[i] - mean) / (std + epsilon);
                }
            }
            (whiten(&per_response(&a, &mask, t), &mask)?, None)
        }
        TokenEstimator::Gae { gamma, lambda } => {
            let r = rewards(Some(&mask))?;
            let v = required(inputs.values, "values", estimator)?;
            let v = matrix("values", v, &[b, t])?;
            check_finite("values", &v, Some(&mask))?;
            let mut adv = vec![0.0; b * t];
            for i in 0..b {
                let (mut next_value, mut carry) = (0.0, 0.0);
                for k in (0..t).rev() {
                    let j = i * t + k;
                    if mask[j] != 0.0 {
                        let delta = r.data[j] + gamma * next_value - v[j];
                        carry = delta + gamma * lambda * carry;
                        next_value = v[j];
                        adv[j] = carry;
                    }
                }
            }
            let returns: Vec<f64> = (0..b * t)
                .map(|j| if mask[j] != 0.0 { adv[j] + v[j] } else { 0.0 })
                .collect();
            (whiten(&adv, &mask)?, Some(returns))
        }
        TokenEstimator::Remax => {
            let r = rewards(Some(&mask))?;
            let baselines = required(inputs.reward_baselines, "reward_baselines", estimator)?;
            let baselines = matrix("reward_baselines", baselines, &[b])?;
            check_finite("reward_baselines", &baselines, None)?;
            let mut returns = vec![0.0; b * t];
            for i in 0..b {
                let mut sum = 0.0;
                for k in (0..t).rev() {
                    let j = i * t + k;
                    if mask[j] != 0.0 {
                        sum += r.data[j];
                        returns[j] = sum;
                    }
                }
            }
            let adv = (0..b * t)
                .map(|j| {
                    if mask[j] != 0.0 {
                        returns[j] - baselines[j / t]
                    } else {
                        0.0
                    }
                })
                .collect();
            (adv, Some(returns))
        }
    };
    let dtype = if inputs.mask.dtype().is_float() {
        inputs.mask.dtype()
    } else {
        DType::F32
    };
    let device = inputs.mask.device();
    let tensor = |v: Vec<f64>| -> Result<Tensor> {
        Ok(Tensor::from_vec(v, (b, t), device)?.to_dtype(dtype)?)
    };
    Ok(TokenAdvantages {
        advantages: tensor(advantages)?,
        returns: returns.map(tensor).transpose()?,
    })
}
