//! Group-relative advantages from outcome rewards.
//! Every formula, with the peer it matches: [the formulas page](crate::formulas).
//!
//! Responses to the same prompt share a group; with `mean_g`, `std_g` the group's mean and sample
//! standard deviation (n−1):
//!
//! | estimator | advantage |
//! |---|---|
//! | [`Grpo`](AdvantageEstimator::Grpo) | `(R − mean_g) / (std_g + ε)` |
//! | [`DrGrpo`](AdvantageEstimator::DrGrpo) | `R − mean_g` |
//! | [`Rloo`](AdvantageEstimator::Rloo) | `n/(n−1)·(R − mean_g)` (mean of the others subtracted) |
//! | [`BatchStd`](AdvantageEstimator::BatchStd) | `(R − mean_g) / (std_batch + ε)` (TRL `scale_rewards="batch"`) |
//!
//! A group of one takes mean 0 and std 1 (verl): `grpo` gives `R/(1+ε)`, `dr_grpo` and `rloo`
//! give `R`. A group whose rewards are all equal gives 0 for every member.

use std::collections::HashMap;

use candle_core::{DType, Tensor};

use crate::error::{check_config, Error, Result};

mod token;
pub use token::{token_advantages, TokenAdvantageInputs, TokenAdvantages, TokenEstimator};

/// Which group-relative estimator. verl and TRL use `epsilon = 1e-6`:
/// `AdvantageEstimator::Grpo { epsilon: 1e-6 }`.
///
/// ```
/// use sapo::{group_advantages_vec, AdvantageEstimator, Groups};
/// let grpo = AdvantageEstimator::Grpo { epsilon: 1e-6 };
/// let adv = group_advantages_vec(&[1.0, 0.0], Groups::Size(2), grpo)?;
/// assert!(adv[0] > 0.0 && adv[1] < 0.0);
/// # Ok::<(), sapo::Error>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum AdvantageEstimator {
    /// GRPO: standardised within the group; `epsilon` = 1e-6 in verl and TRL.
    Grpo {
        /// Added to the standard deviation.
        epsilon: f64,
    },
    /// Dr. GRPO: centred, not scaled.
    DrGrpo,
    /// REINFORCE leave-one-out.
    Rloo,
    /// Centred by group, scaled by the whole batch's standard deviation.
    BatchStd {
        /// Added to the standard deviation.
        epsilon: f64,
    },
}

/// How responses are grouped.
///
/// ```
/// use sapo::{group_advantages_vec, AdvantageEstimator, Groups};
/// let by_id = group_advantages_vec(&[1.0, 0.0, 1.0], Groups::Ids(&[4, 9, 4]), AdvantageEstimator::DrGrpo)?;
/// let by_size = group_advantages_vec(&[1.0, 0.0], Groups::Size(2), AdvantageEstimator::DrGrpo)?;
/// assert_eq!(by_size, vec![0.5, -0.5]);
/// # Ok::<(), sapo::Error>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Groups<'a> {
    /// One id per response; members of a group need not be adjacent.
    Ids(&'a [i64]),
    /// Consecutive runs of this many responses.
    Size(usize),
}

fn std_sample(values: &[f64], mean: f64) -> f64 {
    let n = values.len() as f64;
    (values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (n - 1.0)).sqrt()
}

/// The group of every one of `n` responses (groups numbered in order of first appearance) and
/// the number of groups.
fn group_index(groups: Groups<'_>, n: usize) -> Result<(Vec<usize>, usize)> {
    let group_of: Vec<usize> = match groups {
        Groups::Ids(ids) => {
            if ids.len() != n {
                return Err(Error::Shape {
                    arg: "group_ids",
                    expected: format!("[N] = [{n}] (one id per response)"),
                    actual: vec![ids.len()],
                });
            }
            let mut index = HashMap::new();
            ids.iter()
                .map(|id| {
                    let next = index.len();
                    *index.entry(*id).or_insert(next)
                })
                .collect()
        }
        Groups::Size(size) => {
            if size == 0 || !n.is_multiple_of(size) {
                return Err(Error::InvalidValue {
                    arg: "group_size",
                    expected: format!("a divisor of the number of responses ({n}), >= 1"),
                    actual: size.to_string(),
                });
            }
            (0..n).map(|j| j / size).collect()
        }
    };
    let num_groups = group_of.iter().max().map_or(0, |g| g + 1);
    Ok((group_of, num_groups))
}

/// Group-relative advantages on host values.
///
/// ```
/// use sapo::{group_advantages_vec, AdvantageEstimator, Groups};
/// let adv = group_advantages_vec(&[1.0, 0.0, 0.5, 0.5], Groups::Size(2), AdvantageEstimator::DrGrpo)?;
/// assert_eq!(adv, vec![0.5, -0.5, 0.0, 0.0]);
/// # Ok::<(), sapo::Error>(())
/// ```
pub fn group_advantages_vec(
    rewards: &[f64],
    groups: Groups<'_>,
    estimator: AdvantageEstimator,
) -> Result<Vec<f64>> {
    if let AdvantageEstimator::Grpo { epsilon } | AdvantageEstimator::BatchStd { epsilon } =
        estimator
    {
        check_config(
            epsilon.is_finite() && epsilon >= 0.0,
            "epsilon",
            "finite and >= 0",
            epsilon,
        )?;
    }
    if let Some(i) = rewards.iter().position(|r| !r.is_finite()) {
        return Err(Error::InvalidValue {
            arg: "rewards",
            expected: "finite values".into(),
            actual: format!("{} at index {i}", rewards[i]),
        });
    }
    let n = rewards.len();
    let (group_of, num_groups) = group_index(groups, n)?;
    let mut members: Vec<Vec<f64>> = vec![Vec::new(); num_groups];
    for (&g, &r) in group_of.iter().zip(rewards) {
        members[g].push(r);
    }
    let stats: Vec<(f64, f64, bool)> = members
        .iter()
        .map(|m| {
            let len = m.len() as f64;
            let all_equal = m.len() > 1 && m.iter().all(|&r| r == m[0]);
            if m.len() == 1 {
                (0.0, 1.0, false)
            } else {
                let mean = m.iter().sum::<f64>() / len;
                (mean, std_sample(m, mean), all_equal)
            }
        })
        .collect();
    let batch_std = if n > 1 {
        std_sample(rewards, rewards.iter().sum::<f64>() / n as f64)
    } else {
        1.0
    };
    Ok(group_of
        .iter()
        .zip(rewards)
        .map(|(&g, &r)| {
            let (mean, std, all_equal) = stats[g];
            if all_equal {
                return 0.0;
            }
            let len = members[g].len() as f64;
            match estimator {
                AdvantageEstimator::Grpo { epsilon } => (r - mean) / (std + epsilon),
                AdvantageEstimator::DrGrpo => r - mean,
                AdvantageEstimator::Rloo if len > 1.0 => len / (len - 1.0) * (r - mean),
                AdvantageEstimator::Rloo => r,
                AdvantageEstimator::BatchStd { epsilon } => (r - mean) / (batch_std + epsilon),
            }
        })
        .collect())
}

/// Group-relative advantages of a `[N]` reward tensor; returns `[N]` in the rewards' float dtype
/// (f32 for integer rewards) on the rewards' device.
///
/// ```
/// use candle_core::{Device, Tensor};
/// use sapo::{group_advantages, AdvantageEstimator, Groups};
/// let rewards = Tensor::new(&[1f32, 0., 0., 1.], &Device::Cpu)?;
/// let adv = group_advantages(&rewards, Groups::Ids(&[7, 7, 3, 3]), AdvantageEstimator::Grpo { epsilon: 1e-6 })?;
/// let adv = adv.to_vec1::<f32>()?;
/// assert!(adv[0] > 0.0 && adv[1] < 0.0 && adv[3] > 0.0);
/// # Ok::<(), sapo::Error>(())
/// ```
pub fn group_advantages(
    rewards: &Tensor,
    groups: Groups<'_>,
    estimator: AdvantageEstimator,
) -> Result<Tensor> {
    if rewards.rank() != 1 {
        return Err(Error::Shape {
            arg: "rewards",
            expected: "[N]".into(),
            actual: rewards.dims().to_vec(),
        });
    }
    let host = rewards.to_dtype(DType::F64)?.to_vec1::<f64>()?;
    let advantages = group_advantages_vec(&host, groups, estimator)?;
    let dtype = if rewards.dtype().is_float() {
        rewards.dtype()
    } else {
        DType::F32
    };
    Ok(Tensor::new(advantages, rewards.device())?.to_dtype(dtype)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use approx::assert_relative_eq;

    #[test]
    fn grpo_matches_hand_computation() {
        // group {1, 2, 6}: mean 3, sample std sqrt((4 + 1 + 9)/2) = sqrt(7)
        let adv = group_advantages_vec(
            &[1.0, 2.0, 6.0],
            Groups::Size(3),
            AdvantageEstimator::Grpo { epsilon: 1e-6 },
        )
        .unwrap();
        let s = 7f64.sqrt() + 1e-6;
        for (a, want) in adv.iter().zip([-2.0 / s, -1.0 / s, 3.0 / s]) {
            assert_relative_eq!(*a, want, max_relative = 1e-12);
        }
    }

    #[test]
    fn rloo_subtracts_mean_of_others() {
        let r = [1.0, 2.0, 6.0];
        let adv = group_advantages_vec(&r, Groups::Size(3), AdvantageEstimator::Rloo).unwrap();
        assert_relative_eq!(adv[0], 1.0 - 4.0, max_relative = 1e-12);
        assert_relative_eq!(adv[2], 6.0 - 1.5, max_relative = 1e-12);
    }

    #[test]
    fn non_adjacent_ids_and_singletons() {
        let r = [1.0, 5.0, 3.0, 2.0];
        let ids = [9, 4, 9, 8];
        let adv = group_advantages_vec(&r, Groups::Ids(&ids), AdvantageEstimator::DrGrpo).unwrap();
        assert_eq!(adv, vec![-1.0, 5.0, 1.0, 2.0]);
        let adv = group_advantages_vec(
            &r,
            Groups::Ids(&ids),
            AdvantageEstimator::Grpo { epsilon: 1e-6 },
        )
        .unwrap();
        assert_relative_eq!(adv[1], 5.0 / (1.0 + 1e-6), max_relative = 1e-12);
    }

    #[test]
    fn equal_rewards_give_zero() {
        for est in [
            AdvantageEstimator::Grpo { epsilon: 1e-6 },
            AdvantageEstimator::Grpo { epsilon: 0.0 },
            AdvantageEstimator::DrGrpo,
            AdvantageEstimator::Rloo,
            AdvantageEstimator::BatchStd { epsilon: 1e-6 },
        ] {
            let adv = group_advantages_vec(
                &[0.1, 0.1, 0.1, 0.7, 0.2],
                Groups::Ids(&[0, 0, 0, 1, 2]),
                est,
            )
            .unwrap();
            assert_eq!(&adv[..3], &[0.0, 0.0, 0.0], "{est:?}");
        }
    }

    #[test]
    fn batch_std_uses_whole_batch() {
        let r = [0.0, 1.0, 0.0, 3.0];
        let adv = group_advantages_vec(
            &r,
            Groups::Size(2),
            AdvantageEstimator::BatchStd { epsilon: 0.0 },
        )
        .unwrap();
        let std = std_sample(&r, 1.0);
        assert_relative_eq!(adv[3], 1.5 / std, max_relative = 1e-12);
    }

    #[test]
    fn group_ids_length_mismatch_is_an_error() {
        let err = group_advantages_vec(&[1.0, 2.0], Groups::Ids(&[0]), AdvantageEstimator::Rloo)
            .unwrap_err();
        assert!(
            matches!(
                err,
                Error::Shape {
                    arg: "group_ids",
                    ..
                }
            ),
            "{err}"
        );
    }

    #[test]
    fn bad_group_size_epsilon_and_rewards_are_errors() {
        let e = group_advantages_vec(&[1.0, 2.0, 3.0], Groups::Size(2), AdvantageEstimator::Rloo);
        assert!(matches!(
            e,
            Err(Error::InvalidValue {
                arg: "group_size",
                ..
            })
        ));
        let e = group_advantages_vec(
            &[1.0],
            Groups::Size(1),
            AdvantageEstimator::Grpo { epsilon: -1.0 },
        );
        assert!(matches!(
            e,
            Err(Error::InvalidConfig {
                name: "epsilon",
                ..
            })
        ));
        let e = group_advantages_vec(&[f64::NAN], Groups::Size(1), AdvantageEstimator::Rloo);
        assert!(matches!(e, Err(Error::InvalidValue { arg: "rewards", .. })));
    }
}
