//! Every bad input gets a typed error naming the argument — one test per case.

use candle_core::{DType, Device, Tensor, Var};
use sapo::{
    AdvantageEstimator, Aggregation, Error, Groups, Grpo, HardClip, KlEstimator, KlPenalty,
    Normalizer, PolicyInputs, PolicyLossConfig, RatioLevel, Sapo, TrustRegion,
};

fn dev() -> Device {
    Device::Cpu
}

fn ones(shape: &[usize]) -> Tensor {
    Tensor::ones(shape, DType::F32, &dev()).unwrap()
}

fn policy_error(inputs: PolicyInputs<'_>) -> Error {
    Sapo::default()
        .build()
        .unwrap()
        .forward(&inputs)
        .unwrap_err()
}

fn assert_shape_error(err: Error, want_arg: &str) {
    match err {
        Error::Shape { arg, expected, .. } => {
            assert_eq!(arg, want_arg);
            assert!(expected.starts_with('['), "{expected}");
        }
        other => panic!("expected a shape error for {want_arg}, got {other}"),
    }
}

fn assert_config_error(result: sapo::error::Result<sapo::PolicyLoss>, want: &str) {
    match result {
        Err(Error::InvalidConfig { name, .. }) => assert_eq!(name, want),
        Err(other) => panic!("expected InvalidConfig({want}), got {other}"),
        Ok(_) => panic!("expected InvalidConfig({want}), got a loss"),
    }
}

#[test]
fn mismatched_old_log_probs_shape() {
    let (lp, old, adv, mask) = (ones(&[2, 3]), ones(&[2, 4]), ones(&[2]), ones(&[2, 3]));
    let err = policy_error(PolicyInputs::new(&lp, &old, &adv, &mask));
    assert!(err.to_string().contains("old_log_probs"), "{err}");
    assert!(err.to_string().contains("[2, 4]"), "{err}");
    assert_shape_error(err, "old_log_probs");
}

#[test]
fn mismatched_mask_shape() {
    let (lp, adv, mask) = (ones(&[2, 3]), ones(&[2]), ones(&[3, 2]));
    assert_shape_error(
        policy_error(PolicyInputs::new(&lp, &lp, &adv, &mask)),
        "mask",
    );
}

#[test]
fn mismatched_advantages_shape() {
    let (lp, adv, mask) = (ones(&[2, 3]), ones(&[3]), ones(&[2, 3]));
    assert_shape_error(
        policy_error(PolicyInputs::new(&lp, &lp, &adv, &mask)),
        "advantages",
    );
}

#[test]
fn wrong_rank_log_probs() {
    let (lp, adv) = (ones(&[2, 3, 4]), ones(&[2]));
    assert_shape_error(
        policy_error(PolicyInputs::new(&lp, &lp, &adv, &lp)),
        "log_probs",
    );
}

#[test]
fn mismatched_ref_and_weights_shapes() {
    let (lp, adv, mask, bad) = (ones(&[2, 3]), ones(&[2]), ones(&[2, 3]), ones(&[2, 2]));
    let loss = Sapo::default()
        .config()
        .with_kl(Some(KlPenalty::new(0.1, KlEstimator::K3)))
        .build()
        .unwrap();
    let err = loss
        .forward(&PolicyInputs::new(&lp, &lp, &adv, &mask).with_ref_log_probs(&bad))
        .unwrap_err();
    assert_shape_error(err, "ref_log_probs");
    let err = policy_error(PolicyInputs::new(&lp, &lp, &adv, &mask).with_is_weights(&bad));
    assert_shape_error(err, "is_weights");
}

#[test]
fn integer_log_probs_are_a_dtype_error() {
    let lp = Tensor::zeros((2, 3), DType::I64, &dev()).unwrap();
    let (adv, mask) = (ones(&[2]), ones(&[2, 3]));
    match policy_error(PolicyInputs::new(&lp, &lp, &adv, &mask)) {
        Error::DType { arg, actual, .. } => {
            assert_eq!(arg, "log_probs");
            assert_eq!(actual, DType::I64);
        }
        other => panic!("{other}"),
    }
}

#[test]
fn missing_or_unexpected_ref_log_probs() {
    let (lp, adv, mask) = (ones(&[2, 3]), ones(&[2]), ones(&[2, 3]));
    let with_kl = Grpo::default()
        .config()
        .with_kl(Some(KlPenalty::new(0.1, KlEstimator::K1)))
        .build()
        .unwrap();
    let err = with_kl
        .forward(&PolicyInputs::new(&lp, &lp, &adv, &mask))
        .unwrap_err();
    assert!(
        matches!(
            err,
            Error::InvalidValue {
                arg: "ref_log_probs",
                ..
            }
        ),
        "{err}"
    );
    let err = policy_error(PolicyInputs::new(&lp, &lp, &adv, &mask).with_ref_log_probs(&lp));
    assert!(
        matches!(
            err,
            Error::InvalidValue {
                arg: "ref_log_probs",
                ..
            }
        ),
        "{err}"
    );
}

#[test]
fn mask_with_values_other_than_zero_and_one() {
    let (lp, adv) = (ones(&[2, 3]), ones(&[2]));
    for bad in [0.5f32, 2.0, -1.0, f32::NAN] {
        let mask = Tensor::new(&[[1f32, 0., 1.], [1., bad, 0.]], &dev()).unwrap();
        match policy_error(PolicyInputs::new(&lp, &lp, &adv, &mask)) {
            Error::InvalidValue { arg, actual, .. } => {
                assert_eq!(arg, "mask");
                assert!(actual.contains('1'), "{actual}");
            }
            other => panic!("{other}"),
        }
    }
    // Integer masks with 0/1 are fine; a 2 is not.
    let mask = Tensor::new(&[[1u8, 0, 2], [1, 1, 1]], &dev()).unwrap();
    assert!(matches!(
        policy_error(PolicyInputs::new(&lp, &lp, &adv, &mask)),
        Error::InvalidValue { arg: "mask", .. }
    ));
}

#[test]
fn non_finite_unmasked_values_are_rejected() {
    let adv = ones(&[2]);
    let mask = ones(&[2, 3]);
    let lp = Tensor::new(&[[-1f32, f32::NEG_INFINITY, -1.], [-1., -1., -1.]], &dev()).unwrap();
    let ok = ones(&[2, 3]);
    let err = policy_error(PolicyInputs::new(&lp, &ok, &adv, &mask));
    assert!(
        matches!(
            err,
            Error::InvalidValue {
                arg: "log_probs",
                ..
            }
        ),
        "{err}"
    );
    let err = policy_error(PolicyInputs::new(&ok, &lp, &adv, &mask));
    assert!(
        matches!(
            err,
            Error::InvalidValue {
                arg: "old_log_probs",
                ..
            }
        ),
        "{err}"
    );
    let nan_adv = Tensor::new(&[f32::NAN, 1.], &dev()).unwrap();
    let err = policy_error(PolicyInputs::new(&ok, &ok, &nan_adv, &mask));
    assert!(
        matches!(
            err,
            Error::InvalidValue {
                arg: "advantages",
                ..
            }
        ),
        "{err}"
    );
}

#[test]
fn target_id_out_of_vocabulary() {
    let logits = Tensor::zeros((2, 3, 5), DType::F32, &dev()).unwrap();
    let targets = Tensor::new(&[[0u32, 4, 5], [1, 2, 3]], &dev()).unwrap();
    match sapo::token_log_probs(&logits, &targets, 1.0).unwrap_err() {
        Error::InvalidValue {
            arg,
            expected,
            actual,
        } => {
            assert_eq!(arg, "targets");
            assert!(
                expected.contains('5') && actual.contains('5'),
                "{expected} / {actual}"
            );
        }
        other => panic!("{other}"),
    }
    let negative = Tensor::new(&[[0i64, -1, 1], [1, 2, 3]], &dev()).unwrap();
    assert!(sapo::token_log_probs(&logits, &negative, 1.0).is_err());
}

#[test]
fn targets_shape_dtype_and_temperature() {
    let logits = Tensor::zeros((2, 3, 5), DType::F32, &dev()).unwrap();
    let wrong_shape = Tensor::zeros((2, 4), DType::U32, &dev()).unwrap();
    assert_shape_error(
        sapo::token_log_probs(&logits, &wrong_shape, 1.0).unwrap_err(),
        "targets",
    );
    let float_targets = Tensor::zeros((2, 3), DType::F32, &dev()).unwrap();
    assert!(matches!(
        sapo::token_log_probs(&logits, &float_targets, 1.0).unwrap_err(),
        Error::DType { arg: "targets", .. }
    ));
    let targets = Tensor::zeros((2, 3), DType::U32, &dev()).unwrap();
    for t in [0.0, -1.0, f64::NAN] {
        assert!(matches!(
            sapo::token_log_probs(&logits, &targets, t).unwrap_err(),
            Error::InvalidConfig {
                name: "temperature",
                ..
            }
        ));
    }
    let rank1 = Tensor::zeros(5, DType::F32, &dev()).unwrap();
    assert_shape_error(
        sapo::token_log_probs(&rank1, &targets, 1.0).unwrap_err(),
        "logits",
    );
}

#[test]
fn tau_not_positive_or_not_finite() {
    for bad in [0.0, -0.5, f64::NAN, f64::INFINITY] {
        assert_config_error(
            Sapo {
                tau_pos: bad,
                ..Sapo::default()
            }
            .build(),
            "tau_pos",
        );
        assert_config_error(
            Sapo {
                tau_neg: bad,
                ..Sapo::default()
            }
            .build(),
            "tau_neg",
        );
    }
}

#[test]
fn negative_epsilon() {
    assert_config_error(
        Grpo {
            eps_low: -0.1,
            ..Grpo::default()
        }
        .build(),
        "eps_low",
    );
    assert_config_error(
        Grpo {
            eps_high: -0.1,
            ..Grpo::default()
        }
        .build(),
        "eps_high",
    );
}

#[test]
fn eps_low_at_least_one() {
    assert_config_error(
        Grpo {
            eps_low: 1.0,
            ..Grpo::default()
        }
        .build(),
        "eps_low",
    );
    assert_config_error(
        sapo::Gspo {
            eps_low: 1.5,
            eps_high: 0.1,
        }
        .build(),
        "eps_low",
    );
}

#[test]
fn dual_clip_not_above_one() {
    for c in [1.0, 0.5, f64::NAN] {
        assert_config_error(
            Grpo {
                dual_clip: Some(c),
                ..Grpo::default()
            }
            .build(),
            "dual_clip",
        );
    }
}

#[test]
fn delta_not_above_one_plus_eps_high() {
    let clip = HardClip::new(0.2, 0.28).with_delta(1.28);
    assert_config_error(
        PolicyLossConfig::new(RatioLevel::Token, TrustRegion::HardClip(clip)).build(),
        "delta",
    );
}

#[test]
fn horizon_zero() {
    let cfg = Grpo::default()
        .config()
        .with_aggregation(Aggregation::SeqMeanTokenSumNorm { horizon: Some(0) });
    assert_config_error(cfg.build(), "horizon");
    let kl = KlPenalty::new(0.1, KlEstimator::K3)
        .with_aggregation(Aggregation::SeqMeanTokenSumNorm { horizon: Some(0) });
    assert_config_error(
        Grpo::default().config().with_kl(Some(kl)).build(),
        "horizon",
    );
}

#[test]
fn negative_kl_coefficient() {
    let kl = KlPenalty::new(-0.01, KlEstimator::K3);
    assert_config_error(
        Sapo::default().config().with_kl(Some(kl)).build(),
        "kl.coef",
    );
}

#[test]
fn bad_log_ratio_clamps() {
    assert_config_error(
        Sapo::default()
            .config()
            .with_log_ratio_clamp(Some(0.0))
            .build(),
        "log_ratio_clamp",
    );
    assert_config_error(
        sapo::Gspo::default()
            .config()
            .with_seq_log_ratio_max(Some(f64::NAN))
            .build(),
        "seq_log_ratio_max",
    );
}

#[test]
fn bad_normalizer() {
    let (lp, adv, mask) = (ones(&[2, 3]), ones(&[2]), ones(&[2, 3]));
    let norm = Normalizer::default().with_world_size(0);
    let err = policy_error(PolicyInputs::new(&lp, &lp, &adv, &mask).with_normalizer(norm));
    assert!(
        matches!(
            err,
            Error::InvalidConfig {
                name: "normalizer.world_size",
                ..
            }
        ),
        "{err}"
    );
    let norm = Normalizer::default().with_global_tokens(-3.0);
    let err = policy_error(PolicyInputs::new(&lp, &lp, &adv, &mask).with_normalizer(norm));
    assert!(matches!(
        err,
        Error::InvalidConfig {
            name: "normalizer.global_tokens",
            ..
        }
    ));
}

#[test]
fn group_ids_length_differs_from_rewards() {
    let rewards = Tensor::new(&[1f32, 0., 1.], &dev()).unwrap();
    let err = sapo::group_advantages(
        &rewards,
        Groups::Ids(&[0, 0]),
        AdvantageEstimator::Grpo { epsilon: 1e-6 },
    )
    .unwrap_err();
    match err {
        Error::Shape { arg, actual, .. } => {
            assert_eq!(arg, "group_ids");
            assert_eq!(actual, vec![2]);
        }
        other => panic!("{other}"),
    }
    let matrix = Tensor::zeros((2, 2), DType::F32, &dev()).unwrap();
    assert_shape_error(
        sapo::group_advantages(&matrix, Groups::Size(2), AdvantageEstimator::Rloo).unwrap_err(),
        "rewards",
    );
}

#[test]
fn unknown_names_are_config_errors() {
    assert!(matches!(
        Aggregation::from_name("seq-median", None),
        Err(Error::InvalidConfig {
            name: "aggregation",
            ..
        })
    ));
    assert!(matches!(
        KlEstimator::from_name("k4"),
        Err(Error::InvalidConfig {
            name: "kl.estimator",
            ..
        })
    ));
}

#[test]
fn empty_batch_gives_zero_loss_and_zero_gradient() {
    let lp = Var::new(&[[-1f32, f32::NAN], [f32::NEG_INFINITY, -2.]], &dev()).unwrap();
    let adv = Tensor::new(&[1f32, -1.], &dev()).unwrap();
    let mask = Tensor::zeros((2, 2), DType::U8, &dev()).unwrap();
    for loss in [
        Sapo::default().build().unwrap(),
        sapo::Gspo::default().build().unwrap(),
        Grpo::default()
            .config()
            .with_aggregation(Aggregation::TokenMean)
            .build()
            .unwrap(),
    ] {
        let out = loss
            .forward(&PolicyInputs::new(
                lp.as_tensor(),
                lp.as_tensor(),
                &adv,
                &mask,
            ))
            .unwrap();
        assert_eq!(out.loss.to_scalar::<f32>().unwrap(), 0.0);
        let grads = out.loss.backward().unwrap();
        let g = grads.get(lp.as_tensor()).unwrap().to_vec2::<f32>().unwrap();
        assert_eq!(g, vec![vec![0.0, 0.0], vec![0.0, 0.0]]);
        let m = out.metrics.read().unwrap();
        assert_eq!(m.token_count, 0.0);
        assert_eq!(m.approx_kl(), None);
        assert_eq!(m.ratio_min(), None);
    }
}

#[test]
fn merging_metrics_of_different_objectives_fails() {
    let (lp, adv, mask) = (ones(&[1, 2]), ones(&[1]), ones(&[1, 2]));
    let inputs = PolicyInputs::new(&lp, &lp, &adv, &mask);
    let a = Sapo::default()
        .build()
        .unwrap()
        .forward(&inputs)
        .unwrap()
        .metrics;
    let b = Grpo::default()
        .build()
        .unwrap()
        .forward(&inputs)
        .unwrap()
        .metrics;
    assert!(matches!(a.merge(&b), Err(Error::MetricsMismatch(_))));
    let (ra, rb) = (a.read().unwrap(), b.read().unwrap());
    assert!(matches!(ra.merge(&rb), Err(Error::MetricsMismatch(_))));
}

#[test]
fn errors_convert_into_candle_errors() {
    fn inner() -> candle_core::Result<()> {
        Sapo {
            tau_pos: -1.0,
            ..Sapo::default()
        }
        .build()?;
        Ok(())
    }
    let e = inner().unwrap_err();
    assert!(e.to_string().contains("tau_pos"), "{e}");
}

#[test]
fn empty_shapes_give_zero_loss() {
    for (b, t) in [(0usize, 4usize), (3, 0), (0, 0)] {
        let lp = Tensor::zeros((b, t), DType::F32, &dev()).unwrap();
        let adv = Tensor::zeros(b, DType::F32, &dev()).unwrap();
        for backend in [sapo::Backend::Auto, sapo::Backend::Composed] {
            let loss = Sapo::default().build().unwrap().with_backend(backend);
            let out = loss.forward(&PolicyInputs::new(&lp, &lp, &adv, &lp));
            let out = out.unwrap_or_else(|e| panic!("{b}x{t} {backend:?}: {e}"));
            assert_eq!(
                out.loss.to_scalar::<f32>().unwrap(),
                0.0,
                "{b}x{t} {backend:?}"
            );
            assert_eq!(out.metrics.read().unwrap().token_count, 0.0);
        }
    }
}

#[test]
fn many_bad_values_in_a_u8_mask_are_counted_without_wrapping() {
    // 256 twos: a count kept in u8 would wrap to 0.
    let (lp, adv) = (ones(&[2, 128]), ones(&[2]));
    let mask = Tensor::full(2u8, (2, 128), &dev()).unwrap();
    for backend in [sapo::Backend::Auto, sapo::Backend::Composed] {
        let loss = Sapo::default().build().unwrap().with_backend(backend);
        match loss
            .forward(&PolicyInputs::new(&lp, &lp, &adv, &mask))
            .unwrap_err()
        {
            Error::InvalidValue { arg, actual, .. } => {
                assert_eq!(arg, "mask");
                assert!(actual.starts_with("256"), "{actual}");
            }
            other => panic!("{other}"),
        }
    }
}
