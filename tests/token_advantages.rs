//! verl's token-level advantage estimators (`sapo::token_advantages`): hand-computed values,
//! cross-checks between estimators (proptest), padding, and one test per bad input. Their golden
//! cases (verl's own code, `../shared/golden/round3`, copied into `tests/golden/`) run in
//! `tests/golden.rs`.

use candle_core::{Device, Tensor};
use proptest::prelude::*;
use sapo::{token_advantages, Error, Groups, TokenAdvantageInputs, TokenEstimator};

fn t2(rows: &[Vec<f64>]) -> Tensor {
    Tensor::new(rows.to_vec(), &Device::Cpu).unwrap()
}

fn rows(t: &Tensor) -> Vec<Vec<f64>> {
    t.to_vec2::<f64>().unwrap()
}

fn mask() -> Tensor {
    t2(&[vec![1.0, 1.0, 0.0, 1.0], vec![1.0, 1.0, 1.0, 0.0]])
}

#[test]
fn reinforce_plus_plus_carries_through_masked_tokens() {
    let rewards = t2(&[vec![0.0, 0.0, 5.0, 1.0], vec![1.0, 0.0, 2.0, 7.0]]);
    let out = token_advantages(
        &TokenEstimator::ReinforcePlusPlus { gamma: 0.5 },
        &TokenAdvantageInputs::new(&mask()).with_token_level_rewards(&rewards),
    )
    .unwrap();
    // Row 0: the masked 5 is dropped, the carry passes it: G = [0.25, 0.5, 0, 1].
    // Row 1: G = [1 + 0.5·0.5·2, 0 + 0.5·2, 2, 0] = [1.5, 1, 2, 0].
    let g = rows(&out.returns.unwrap());
    assert_eq!(g, vec![vec![0.25, 0.5, 0.0, 1.0], vec![1.5, 1.0, 2.0, 0.0]]);
    // whitened over the 6 unmasked returns
    let unmasked = [0.25, 0.5, 1.0, 1.5, 1.0, 2.0];
    let mean = unmasked.iter().sum::<f64>() / (6.0 + 1e-8);
    let var = unmasked.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (6.0 + 1e-8) * 6.0 / 5.0;
    let a = rows(&out.advantages);
    approx::assert_relative_eq!(
        a[1][2],
        (2.0 - mean) / (var + 1e-8).sqrt(),
        max_relative = 1e-12
    );
    assert_eq!(a[0][2], 0.0);
    assert_eq!(a[1][3], 0.0);
}

#[test]
fn outcome_estimators_by_hand() {
    // Scores over every position (the masked ones too): S = [6, 3, 6, 0].
    let mask = t2(&[
        vec![1.0, 1.0, 0.0],
        vec![1.0, 0.0, 0.0],
        vec![1.0, 1.0, 1.0],
        vec![1.0, 1.0, 0.0],
    ]);
    let rewards = t2(&[
        vec![0.0, 5.0, 1.0],
        vec![3.0, 0.0, 0.0],
        vec![0.0, 0.0, 6.0],
        vec![0.0, 0.0, 0.0],
    ]);
    let ids = [0i64, 0, 1, 1];
    let run = |e: TokenEstimator| {
        let inputs = TokenAdvantageInputs::new(&mask)
            .with_token_level_rewards(&rewards)
            .with_groups(Groups::Ids(&ids));
        rows(&token_advantages(&e, &inputs).unwrap().advantages)
    };
    // opo: b_0 = (2·6 + 1·3)/3 = 5, b_1 = (3·6 + 2·0)/5 = 3.6.
    let opo = run(TokenEstimator::Opo);
    assert_eq!(opo[0], vec![1.0, 1.0, 0.0]);
    assert_eq!(opo[1], vec![-2.0, 0.0, 0.0]);
    approx::assert_relative_eq!(opo[2][2], 2.4, max_relative = 1e-12);
    approx::assert_relative_eq!(opo[3][0], -3.6, max_relative = 1e-12);
    // gpg: α = 4/3 (three non-zero scores), means 4.5 and 3.
    let gpg = run(TokenEstimator::Gpg);
    approx::assert_relative_eq!(gpg[0][0], 4.0 / 3.0 * 1.5, max_relative = 1e-12);
    approx::assert_relative_eq!(gpg[3][1], 4.0 / 3.0 * -3.0, max_relative = 1e-12);
    // grpo_passk without std: the best member gets the gap to the second, the others 0.
    let passk = run(TokenEstimator::GrpoPassK {
        epsilon: 1e-6,
        norm_by_std: false,
    });
    assert_eq!(passk[0], vec![3.0, 3.0, 0.0]);
    assert_eq!(passk[1], vec![0.0; 3]);
    assert_eq!(passk[2], vec![6.0; 3]);
    assert_eq!(passk[3], vec![0.0; 3]);
}

#[test]
fn grpo_passk_ties_give_zero() {
    let mask = t2(&[vec![1.0], vec![1.0], vec![1.0]]);
    let rewards = t2(&[vec![1.0], vec![1.0], vec![0.0]]);
    let out = token_advantages(
        &TokenEstimator::GrpoPassK {
            epsilon: 1e-6,
            norm_by_std: true,
        },
        &TokenAdvantageInputs::new(&mask)
            .with_token_level_rewards(&rewards)
            .with_groups(Groups::Size(3)),
    )
    .unwrap();
    assert_eq!(rows(&out.advantages), vec![vec![0.0]; 3]);
}

/// Garbage (NaN, ±inf) at masked positions of the per-token estimators' inputs changes nothing.
#[test]
fn masked_garbage_never_reaches_a_value() {
    let clean_r = t2(&[vec![1.0, 2.0, 0.0, 3.0], vec![0.5, -1.0, 2.0, 0.0]]);
    let dirty_r = t2(&[
        vec![1.0, 2.0, f64::NAN, 3.0],
        vec![0.5, -1.0, 2.0, f64::INFINITY],
    ]);
    let clean_v = t2(&[vec![0.1, 0.2, 0.0, 0.3], vec![0.4, 0.5, 0.6, 0.0]]);
    let dirty_v = t2(&[
        vec![0.1, 0.2, f64::NEG_INFINITY, 0.3],
        vec![0.4, 0.5, 0.6, f64::NAN],
    ]);
    let baselines = Tensor::new(&[0.5f64, 1.0], &Device::Cpu).unwrap();
    for estimator in [
        TokenEstimator::ReinforcePlusPlus { gamma: 0.9 },
        TokenEstimator::Gae {
            gamma: 0.9,
            lambda: 0.8,
        },
        TokenEstimator::Remax,
    ] {
        let m = mask();
        let run = |r: &Tensor, v: &Tensor| {
            let out = token_advantages(
                &estimator,
                &TokenAdvantageInputs::new(&m)
                    .with_token_level_rewards(r)
                    .with_values(v)
                    .with_reward_baselines(&baselines),
            )
            .unwrap();
            (rows(&out.advantages), rows(&out.returns.unwrap()))
        };
        assert_eq!(
            run(&clean_r, &clean_v),
            run(&dirty_r, &dirty_v),
            "{estimator:?}"
        );
    }
}

fn err(estimator: TokenEstimator, inputs: TokenAdvantageInputs<'_>) -> Error {
    token_advantages(&estimator, &inputs).unwrap_err()
}

fn arg_of(e: &Error) -> &'static str {
    match e {
        Error::InvalidValue { arg, .. }
        | Error::Shape { arg, .. }
        | Error::InvalidConfig { name: arg, .. } => arg,
        other => panic!("unexpected error {other:?}"),
    }
}

#[test]
fn bad_inputs_are_typed_errors_naming_the_argument() {
    let m = mask();
    let r = t2(&[vec![1.0, 2.0, 0.0, 3.0], vec![0.5, -1.0, 2.0, 0.0]]);
    let base = || TokenAdvantageInputs::new(&m).with_token_level_rewards(&r);
    let rpp = |gamma| TokenEstimator::ReinforcePlusPlus { gamma };
    assert_eq!(arg_of(&err(rpp(1.5), base())), "gamma");
    assert_eq!(arg_of(&err(rpp(f64::NAN), base())), "gamma");
    let gae = |gamma, lambda| TokenEstimator::Gae { gamma, lambda };
    assert_eq!(
        arg_of(&err(gae(0.9, -0.1), base().with_values(&r))),
        "lambda"
    );
    assert_eq!(arg_of(&err(gae(0.9, 0.9), base())), "values");
    assert_eq!(arg_of(&err(TokenEstimator::Opo, base())), "group_ids");
    assert_eq!(
        arg_of(&err(TokenEstimator::Remax, base())),
        "reward_baselines"
    );
    assert_eq!(
        arg_of(&err(rpp(1.0), TokenAdvantageInputs::new(&m))),
        "token_level_rewards"
    );
    // Shapes.
    let short = t2(&[vec![1.0, 2.0, 0.0]]);
    assert_eq!(
        arg_of(&err(
            rpp(1.0),
            TokenAdvantageInputs::new(&m).with_token_level_rewards(&short)
        )),
        "token_level_rewards"
    );
    let flat = Tensor::new(&[1f64, 1.0], &Device::Cpu).unwrap();
    assert_eq!(
        arg_of(&err(rpp(1.0), TokenAdvantageInputs::new(&flat))),
        "mask"
    );
    assert_eq!(
        arg_of(&err(
            TokenEstimator::Opo,
            base().with_groups(Groups::Ids(&[1, 2, 3]))
        )),
        "group_ids"
    );
    // Values.
    let not_01 = t2(&[vec![1.0, 0.5, 0.0, 1.0], vec![1.0; 4]]);
    assert!(token_advantages(
        &rpp(1.0),
        &TokenAdvantageInputs::new(&not_01).with_token_level_rewards(&r)
    )
    .is_err());
    let nan_unmasked = t2(&[vec![f64::NAN, 2.0, 0.0, 3.0], vec![0.5, -1.0, 2.0, 0.0]]);
    assert_eq!(
        arg_of(&err(
            rpp(1.0),
            TokenAdvantageInputs::new(&m).with_token_level_rewards(&nan_unmasked)
        )),
        "token_level_rewards"
    );
    // The outcome estimators sum every position (as verl does): a NaN anywhere is an error.
    let nan_masked = t2(&[vec![1.0, 2.0, f64::NAN, 3.0], vec![0.5, -1.0, 2.0, 0.0]]);
    assert_eq!(
        arg_of(&err(
            TokenEstimator::Gpg,
            TokenAdvantageInputs::new(&m)
                .with_token_level_rewards(&nan_masked)
                .with_groups(Groups::Size(2))
        )),
        "token_level_rewards"
    );
    // grpo_passk needs groups of two.
    let passk = TokenEstimator::GrpoPassK {
        epsilon: 1e-6,
        norm_by_std: true,
    };
    assert_eq!(
        arg_of(&err(passk.clone(), base().with_groups(Groups::Size(1)))),
        "group_ids"
    );
    let bad_eps = TokenEstimator::GrpoPassK {
        epsilon: -1.0,
        norm_by_std: true,
    };
    assert_eq!(
        arg_of(&err(bad_eps, base().with_groups(Groups::Size(2)))),
        "epsilon"
    );
    // gdpo: components shape and weights length.
    let c = t2(&[vec![1.0, 0.0], vec![0.0, 1.0]]);
    let gdpo = |w: Option<Vec<f64>>| TokenEstimator::Gdpo {
        epsilon: 1e-6,
        reward_weights: w,
    };
    let with_c = TokenAdvantageInputs::new(&m)
        .with_reward_components(&c)
        .with_groups(Groups::Size(2));
    assert_eq!(
        arg_of(&err(gdpo(Some(vec![1.0])), with_c)),
        "reward_weights"
    );
    assert!(token_advantages(&gdpo(None), &with_c).is_ok());
    let c3 = t2(&[vec![1.0, 0.0]]);
    assert_eq!(
        arg_of(&err(
            gdpo(None),
            TokenAdvantageInputs::new(&m)
                .with_reward_components(&c3)
                .with_groups(Groups::Size(1))
        )),
        "reward_components"
    );
    // Whitening needs two unmasked tokens.
    let one = t2(&[vec![1.0, 0.0, 0.0, 0.0], vec![0.0; 4]]);
    assert_eq!(
        arg_of(&err(
            rpp(1.0),
            TokenAdvantageInputs::new(&one).with_token_level_rewards(&r)
        )),
        "mask"
    );
    // An empty batch: the count it reports is 0 (not the −0.0 of an empty float sum).
    let empty = Tensor::zeros((0, 4), candle_core::DType::F64, &Device::Cpu).unwrap();
    match err(
        rpp(1.0),
        TokenAdvantageInputs::new(&empty).with_token_level_rewards(&empty),
    ) {
        Error::InvalidValue { arg, actual, .. } => {
            assert_eq!((arg, actual.as_str()), ("mask", "0"))
        }
        other => panic!("{other:?}"),
    }
}

proptest! {
    /// With γ = λ = 1, three estimators share their returns: REINFORCE++'s `G`, GAE's `Â + v` and
    /// ReMax's `R` are all the sum of the rewards from `t` on (unmasked tokens only).
    #[test]
    fn undiscounted_returns_agree(
        cells in prop::collection::vec((-3.0f64..3.0, -2.0f64..2.0, 0u8..3), 12..=12),
    ) {
        let (b, t) = (3, 4);
        // A token is masked with probability 1/3; the first of each row never is.
        let mask: Vec<Vec<f64>> = (0..b)
            .map(|i| (0..t).map(|k| if k == 0 || cells[i * t + k].2 > 0 { 1.0 } else { 0.0 }).collect())
            .collect();
        let rewards: Vec<Vec<f64>> = (0..b).map(|i| (0..t).map(|k| cells[i * t + k].0).collect()).collect();
        let values: Vec<Vec<f64>> = (0..b).map(|i| (0..t).map(|k| cells[i * t + k].1).collect()).collect();
        let (m, r, v) = (t2(&mask), t2(&rewards), t2(&values));
        let baselines = Tensor::zeros(b, candle_core::DType::F64, &Device::Cpu).unwrap();
        let inputs = TokenAdvantageInputs::new(&m)
            .with_token_level_rewards(&r)
            .with_values(&v)
            .with_reward_baselines(&baselines);
        let returns = |e: TokenEstimator| rows(&token_advantages(&e, &inputs).unwrap().returns.unwrap());
        let rpp = returns(TokenEstimator::ReinforcePlusPlus { gamma: 1.0 });
        let gae = returns(TokenEstimator::Gae { gamma: 1.0, lambda: 1.0 });
        let remax = returns(TokenEstimator::Remax);
        for i in 0..b {
            for k in 0..t {
                let want: f64 = if mask[i][k] != 0.0 {
                    (k..t).filter(|&u| mask[i][u] != 0.0).map(|u| rewards[i][u]).sum()
                } else {
                    0.0
                };
                prop_assert!((rpp[i][k] - want).abs() < 1e-9);
                prop_assert!((gae[i][k] - want).abs() < 1e-9);
                prop_assert!((remax[i][k] - want).abs() < 1e-9);
            }
        }
    }
}
