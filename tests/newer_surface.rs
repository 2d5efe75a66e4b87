//! Regression tests for what a new user hit on the newer surface (the KL penalty unclamped, merged
//! metrics, normalizers, padding targets, values without meaning, unchecked public forms, merge
//! errors), one test per defect, each on every path: the fused CPU kernel, the composed ops and,
//! under the `gpu-sim` feature, the CUDA and Metal kernel sources run on the CPU (whose value
//! checks surface at `metrics.check()`).

use candle_core::{DType, Device, Tensor, Var};
use sapo::{
    aggregate, gate, kl_penalty, rollout_correction, AdaptiveEntropy, Aggregation, Backend,
    EntropyBonus, Error, Gmpo, Grpo, Gspo, KlEstimator, KlPenalty, LmHead, MetricSums, Normalizer,
    PolicyInputs, PolicyLoss, PolicyLossOutput, RolloutCorrection, Sapo,
};

fn dev() -> Device {
    Device::Cpu
}

#[path = "common/sim.rs"]
mod sim;
use sim::paths as backends;

/// The forward's result with the GPU paths' deferred checks applied, as a user who reads the
/// metrics before stepping sees it.
fn run(loss: &PolicyLoss, inputs: &PolicyInputs<'_>) -> sapo::error::Result<PolicyLossOutput> {
    let out = loss.forward(inputs)?;
    out.metrics.check()?;
    Ok(out)
}

/// GRPO with `aggregation` on `backend`.
fn grpo(aggregation: Aggregation, backend: Backend) -> PolicyLoss {
    Grpo::default()
        .config()
        .with_aggregation(aggregation)
        .build()
        .unwrap()
        .with_backend(backend)
}

/// GRPO with TRL's unclamped k3 penalty (β 0.04) on `backend`.
fn grpo_unclamped_k3(backend: Backend) -> PolicyLoss {
    Grpo::default()
        .config()
        .with_kl(Some(
            KlPenalty::new(0.04, KlEstimator::K3).with_clamp(false),
        ))
        .build()
        .unwrap()
        .with_backend(backend)
}

fn invalid_value_arg(err: &Error) -> &'static str {
    match err {
        Error::InvalidValue { arg, .. } => arg,
        other => panic!("expected InvalidValue, got {other}"),
    }
}

fn config_name(err: &Error) -> &'static str {
    match err {
        Error::InvalidConfig { name, .. } => name,
        other => panic!("expected InvalidConfig, got {other}"),
    }
}

/// 1. Unclamped k3 with `ℓref − ℓ` beyond f32's exp range: a typed error naming
///    `ref_log_probs` on every path (was `inf` loss and a NaN gradient fused, `−inf` composed);
///    below the bound the loss and gradient are finite; f64 has its own, wider bound.
#[test]
fn unclamped_k3_overflow_is_a_typed_error_on_every_path() {
    let lp = Tensor::new(&[[-101.0f32, -1.0]], &dev()).unwrap();
    let reference = Tensor::new(&[[-1.0f32, -1.0]], &dev()).unwrap();
    let adv = Tensor::new(&[1.0f32], &dev()).unwrap();
    let mask = Tensor::ones((1, 2), DType::U8, &dev()).unwrap();
    for importance in [false, true] {
        let kl = KlPenalty::new(0.04, KlEstimator::K3)
            .with_clamp(false)
            .with_importance_weighting(importance);
        for estimator in [KlEstimator::K3, KlEstimator::K3Plus] {
            let kl = KlPenalty { estimator, ..kl };
            for (name, backend, sim) in backends() {
                let _gpu = sim.enter();
                let loss = Grpo::default()
                    .config()
                    .with_kl(Some(kl))
                    .build()
                    .unwrap()
                    .with_backend(backend);
                let inputs =
                    PolicyInputs::new(&lp, &lp, &adv, &mask).with_ref_log_probs(&reference);
                let err = run(&loss, &inputs).unwrap_err();
                assert_eq!(invalid_value_arg(&err), "ref_log_probs", "{name}: {err}");
                // Masked, the same token is padding: no error.
                let half = Tensor::new(&[[0u8, 1]], &dev()).unwrap();
                let inputs =
                    PolicyInputs::new(&lp, &lp, &adv, &half).with_ref_log_probs(&reference);
                let out = run(&loss, &inputs).unwrap();
                assert!(out.loss.to_scalar::<f32>().unwrap().is_finite(), "{name}");
            }
        }
    }
    // Just inside the f32 bound: finite loss and gradient, on both CPU paths.
    let lp = Var::new(&[[-88.0f32, -1.0]], &dev()).unwrap();
    let reference = Tensor::new(&[[0.0f32, -1.0]], &dev()).unwrap();
    for (name, backend, sim) in backends() {
        let _gpu = sim.enter();
        let loss = grpo_unclamped_k3(backend);
        let old = lp.detach();
        let inputs =
            PolicyInputs::new(lp.as_tensor(), &old, &adv, &mask).with_ref_log_probs(&reference);
        let out = run(&loss, &inputs).unwrap();
        let grad = out.loss.backward().unwrap();
        let grad = grad.get(lp.as_tensor()).unwrap().to_vec2::<f32>().unwrap();
        assert!(out.loss.to_scalar::<f32>().unwrap().is_finite(), "{name}");
        assert!(grad[0].iter().all(|g| g.is_finite()), "{name}: {grad:?}");
    }
    // f64 computes in f64: ℓref − ℓ = 100 is fine there, 800 is not.
    let adv64 = Tensor::new(&[1.0f64], &dev()).unwrap();
    for (gap, ok) in [(100.0f64, true), (800.0, false)] {
        let lp = Tensor::new(&[[-gap - 1.0, -1.0]], &dev()).unwrap();
        let reference = Tensor::new(&[[-1.0f64, -1.0]], &dev()).unwrap();
        for backend in [Backend::Auto, Backend::Composed] {
            let loss = grpo_unclamped_k3(backend);
            let inputs = PolicyInputs::new(&lp, &lp, &adv64, &mask).with_ref_log_probs(&reference);
            assert_eq!(run(&loss, &inputs).is_ok(), ok, "gap {gap} {backend:?}");
        }
    }
}

/// 2. Merged `kl_loss` and `entropy_loss` over `W` micro-batches equal the full batch's (they
///    were `W` times it), as every other merged metric does.
#[test]
fn merged_kl_and_entropy_losses_equal_the_full_batch() {
    let lp = Tensor::new(
        &[
            [-1.0f32, -0.5, -2.0],
            [-0.3, -1.2, -0.7],
            [-0.9, -0.1, -1.5],
            [-2.0, -0.4, -0.6],
        ],
        &dev(),
    )
    .unwrap();
    let old = (&lp + 0.1).unwrap();
    let reference = (&lp - 0.3).unwrap();
    let entropy = Tensor::new(
        &[
            [1.0f32, 2.0, 0.5],
            [0.7, 1.1, 3.0],
            [2.2, 0.3, 0.9],
            [1.4, 1.9, 0.2],
        ],
        &dev(),
    )
    .unwrap();
    let adv = Tensor::new(&[0.5f32, -1.0, 0.3, 1.2], &dev()).unwrap();
    let mask = Tensor::new(&[[1u8, 1, 0], [1, 1, 1], [1, 0, 0], [1, 1, 1]], &dev()).unwrap();
    let config = Sapo::default()
        .config()
        .with_kl(Some(KlPenalty::new(0.04, KlEstimator::K3)))
        .with_entropy(Some(EntropyBonus::new(0.01)));
    for (name, backend, sim) in backends() {
        let _gpu = sim.enter();
        let loss = config.build().unwrap().with_backend(backend);
        let full = loss
            .forward(
                &PolicyInputs::new(&lp, &old, &adv, &mask)
                    .with_ref_log_probs(&reference)
                    .with_entropy(&entropy),
            )
            .unwrap();
        let full_metrics = full.metrics.read().unwrap();
        for parts in [2usize, 4] {
            let rows = 4 / parts;
            let slice = |x: &Tensor, i: usize| x.narrow(0, i * rows, rows).unwrap();
            let masks: Vec<Tensor> = (0..parts).map(|i| slice(&mask, i)).collect();
            let mask_refs: Vec<&Tensor> = masks.iter().collect();
            let normalizer =
                Normalizer::for_micro_batches(&mask_refs, Aggregation::SeqMeanTokenMean).unwrap();
            let mut merged: Option<sapo::PolicyMetrics> = None;
            let mut loss_sum = 0.0;
            for (i, micro_mask) in masks.iter().enumerate() {
                let (l, o, a, r, h) = (
                    slice(&lp, i),
                    slice(&old, i),
                    slice(&adv, i),
                    slice(&reference, i),
                    slice(&entropy, i),
                );
                let out = loss
                    .forward(
                        &PolicyInputs::new(&l, &o, &a, micro_mask)
                            .with_ref_log_probs(&r)
                            .with_entropy(&h)
                            .with_normalizer(normalizer),
                    )
                    .unwrap();
                loss_sum += out.loss.to_scalar::<f32>().unwrap() as f64;
                merged = Some(match merged {
                    Some(m) => m.merge(&out.metrics).unwrap(),
                    None => out.metrics,
                });
            }
            let m = merged.unwrap().read().unwrap();
            let close = |a: f64, b: f64| (a - b).abs() <= 1e-5 * (1.0 + b.abs());
            let what = format!("{name}, {parts} micro-batches");
            assert!(
                close(
                    loss_sum / parts as f64,
                    full.loss.to_scalar::<f32>().unwrap() as f64
                ),
                "{what}: loss"
            );
            assert!(
                close(m.kl_loss.unwrap(), full_metrics.kl_loss.unwrap()),
                "{what}: kl_loss {:?} vs {:?}",
                m.kl_loss,
                full_metrics.kl_loss
            );
            assert!(
                close(m.entropy_loss.unwrap(), full_metrics.entropy_loss.unwrap()),
                "{what}: entropy_loss {:?} vs {:?}",
                m.entropy_loss,
                full_metrics.entropy_loss
            );
            assert_eq!(m.token_count, full_metrics.token_count, "{what}");
        }
    }
}

/// 3. `world_size > 1` without the global count the aggregation divides by is rejected (it gave
///    `W` times the loss), for the policy term, the KL's and the bonus's aggregations, and by
///    `aggregate`.
#[test]
fn world_size_without_the_needed_global_count_is_rejected() {
    let lp = Tensor::new(&[[-1.0f32, -0.5]], &dev()).unwrap();
    let adv = Tensor::new(&[1.0f32], &dev()).unwrap();
    let mask = Tensor::ones((1, 2), DType::U8, &dev()).unwrap();
    let tokens_only = Normalizer::default()
        .with_global_tokens(8.0)
        .with_world_size(4);
    let sequences_only = Normalizer::default()
        .with_global_sequences(4.0)
        .with_world_size(4);
    for (name, backend, sim) in backends() {
        let _gpu = sim.enter();
        // SAPO: seq-mean-token-mean needs global_sequences.
        let sapo = Sapo::default().build().unwrap().with_backend(backend);
        let err = sapo
            .forward(&PolicyInputs::new(&lp, &lp, &adv, &mask).with_normalizer(tokens_only))
            .unwrap_err();
        assert_eq!(config_name(&err), "normalizer.global_sequences", "{name}");
        // token-mean needs global_tokens; a KL with token-mean on a seq-mean loss needs both.
        let err = grpo(Aggregation::TokenMean, backend)
            .forward(&PolicyInputs::new(&lp, &lp, &adv, &mask).with_normalizer(sequences_only))
            .unwrap_err();
        assert_eq!(config_name(&err), "normalizer.global_tokens", "{name}");
        let with_kl = Sapo::default()
            .config()
            .with_kl(Some(KlPenalty::new(0.1, KlEstimator::K1)))
            .build()
            .unwrap()
            .with_backend(backend);
        let err = with_kl
            .forward(
                &PolicyInputs::new(&lp, &lp, &adv, &mask)
                    .with_ref_log_probs(&lp)
                    .with_normalizer(sequences_only),
            )
            .unwrap_err();
        assert_eq!(config_name(&err), "normalizer.global_tokens", "{name}");
        // token-sum divides by nothing: W alone is fine.
        let w_only = Normalizer::default().with_world_size(4);
        run(
            &grpo(Aggregation::TokenSum, backend),
            &PolicyInputs::new(&lp, &lp, &adv, &mask).with_normalizer(w_only),
        )
        .unwrap();
    }
    let loss_mat = Tensor::new(&[[1.0f32, 2.0]], &dev()).unwrap();
    let err = aggregate(&loss_mat, &mask, Aggregation::TokenMean, &sequences_only).unwrap_err();
    assert_eq!(config_name(&err), "normalizer.global_tokens");
}

/// 4. Global counts below this batch's own are rejected (0, or fewer tokens or rows than the
///    batch has), on every path and by `aggregate`.
#[test]
fn impossible_global_counts_are_rejected() {
    let lp = Tensor::new(&[[-1.0f32, -0.5, -0.2], [-0.3, -0.1, -2.0]], &dev()).unwrap();
    let adv = Tensor::new(&[1.0f32, -1.0], &dev()).unwrap();
    let mask = Tensor::new(&[[1u8, 1, 0], [1, 0, 0]], &dev()).unwrap();
    let cases = [
        (
            Aggregation::TokenMean,
            Normalizer::default().with_global_tokens(0.0),
            "normalizer.global_tokens",
        ),
        (
            Aggregation::TokenMean,
            Normalizer::default().with_global_tokens(2.0),
            "normalizer.global_tokens",
        ),
        (
            Aggregation::SeqMeanTokenMean,
            Normalizer::default().with_global_sequences(0.0),
            "normalizer.global_sequences",
        ),
        (
            Aggregation::SeqMeanTokenSum,
            Normalizer::default().with_global_sequences(1.0),
            "normalizer.global_sequences",
        ),
    ];
    for (aggregation, normalizer, arg) in cases {
        for (name, backend, sim) in backends() {
            let _gpu = sim.enter();
            let loss = grpo(aggregation, backend);
            let inputs = PolicyInputs::new(&lp, &lp, &adv, &mask).with_normalizer(normalizer);
            let err = run(&loss, &inputs).unwrap_err();
            assert_eq!(
                invalid_value_arg(&err),
                arg,
                "{name} {aggregation:?}: {err}"
            );
        }
        let err = aggregate(&lp, &mask, aggregation, &normalizer).unwrap_err();
        assert_eq!(invalid_value_arg(&err), arg);
    }
    // The exact counts (and larger ones) pass.
    let exact = Normalizer::default()
        .with_global_tokens(3.0)
        .with_global_sequences(2.0);
    for (_, backend, sim) in backends() {
        let _gpu = sim.enter();
        let loss = Sapo::default().build().unwrap().with_backend(backend);
        run(
            &loss,
            &PolicyInputs::new(&lp, &lp, &adv, &mask).with_normalizer(exact),
        )
        .unwrap();
    }
    // GMPO's seq-mean counts every row: 1 global row for a batch of 2 is impossible.
    let gmpo = Gmpo::default().build().unwrap();
    let err = gmpo
        .forward(
            &PolicyInputs::new(&lp, &lp, &adv, &mask)
                .with_normalizer(Normalizer::default().with_global_sequences(1.0)),
        )
        .unwrap_err();
    assert_eq!(invalid_value_arg(&err), "normalizer.global_sequences");
}

/// 5. Hugging Face's padding id −100 (and any id past the vocabulary) at masked positions is
///    padding on every path of `forward_from_hidden`; out of range where unmasked it stays an
///    error.
#[test]
fn padding_target_ids_are_accepted_where_masked() {
    let hidden = Var::randn(0f32, 1.0, (2, 3, 4), &dev()).unwrap();
    let weight = Var::randn(0f32, 0.5, (7, 4), &dev()).unwrap();
    let mask = Tensor::new(&[[1u8, 1, 0], [1, 0, 0]], &dev()).unwrap();
    let padded = Tensor::new(&[[3i64, 6, -100], [2, -100, 99]], &dev()).unwrap();
    let clean = Tensor::new(&[[3i64, 6, 0], [2, 0, 0]], &dev()).unwrap();
    let adv = Tensor::new(&[1.0f32, -0.5], &dev()).unwrap();
    let (old, _) = sapo::linear_log_probs_and_entropy(
        hidden.as_tensor(),
        weight.as_tensor(),
        None,
        &clean,
        1.0,
    )
    .unwrap();
    let old = old.detach();
    for (name, backend, sim) in backends() {
        let _gpu = sim.enter();
        for loss in [
            Sapo::default().build().unwrap(),
            Gspo::default().build().unwrap(),
        ] {
            let loss = loss.with_backend(backend);
            let value = |targets: &Tensor| -> sapo::error::Result<f32> {
                let head = LmHead::new(hidden.as_tensor(), weight.as_tensor(), targets);
                let out = loss.forward_from_hidden(&PolicyInputs::new(head, &old, &adv, &mask))?;
                out.metrics.check()?;
                Ok(out.loss.to_scalar::<f32>()?)
            };
            assert_eq!(
                value(&padded).unwrap(),
                value(&clean).unwrap(),
                "{name}: padding changed the loss"
            );
            // Out of range where unmasked: an error (on the GPU paths at `check()`).
            let bad = Tensor::new(&[[3i64, -100, 0], [2, 0, 0]], &dev()).unwrap();
            assert!(value(&bad).is_err(), "{name}");
        }
    }
}

/// 6. Values without meaning are rejected: negative rollout weights (on every path), a sequence
///    log-ratio bound ≤ 0, a negative entropy for the adaptive coefficient, a temperature whose
///    gate f32 cannot resolve.
#[test]
fn values_without_meaning_are_rejected() {
    let lp = Tensor::new(&[[-1.0f32, -0.5]], &dev()).unwrap();
    let adv = Tensor::new(&[1.0f32], &dev()).unwrap();
    let mask = Tensor::ones((1, 2), DType::U8, &dev()).unwrap();
    let negative = Tensor::new(&[[1.0f32, -0.5]], &dev()).unwrap();
    let negative_row = Tensor::new(&[[-1.0f32]], &dev()).unwrap();
    for (name, backend, sim) in backends() {
        let _gpu = sim.enter();
        for loss in [
            Sapo::default().build().unwrap(),
            Grpo::default().build().unwrap(),
            Gmpo::default().build().unwrap(),
        ] {
            let loss = loss.with_backend(backend);
            for w in [&negative, &negative_row] {
                let inputs = PolicyInputs::new(&lp, &lp, &adv, &mask).with_is_weights(w);
                let err = run(&loss, &inputs).unwrap_err();
                assert_eq!(invalid_value_arg(&err), "is_weights", "{name}: {err}");
            }
            // A negative weight at a masked position is padding.
            let half = Tensor::new(&[[1u8, 0]], &dev()).unwrap();
            run(
                &loss,
                &PolicyInputs::new(&lp, &lp, &adv, &half).with_is_weights(&negative),
            )
            .unwrap();
        }
    }
    for max in [-1.0, 0.0] {
        let err = Gspo::default()
            .config()
            .with_seq_log_ratio_max(Some(max))
            .build()
            .unwrap_err();
        assert_eq!(config_name(&err), "seq_log_ratio_max");
    }
    let mut adaptive = AdaptiveEntropy::new(0.01).unwrap();
    let err = adaptive.update(-1.0).unwrap_err();
    assert_eq!(config_name(&err), "entropy");
    assert_eq!(
        adaptive.coef, 0.01,
        "a rejected update moved the coefficient"
    );
    for tau in [1e-6, 1e-3] {
        let err = Sapo {
            tau_pos: tau,
            ..Sapo::default()
        }
        .build()
        .unwrap_err();
        assert_eq!(config_name(&err), "tau_pos", "τ = {tau}");
        assert!(gate::value(&lp, tau).is_err());
    }
    // The smallest accepted temperature keeps f32 close to f64 on a zero-mean batch.
    let lp32 = Tensor::new(&[[-1.0f32, -0.52], [-0.3, -0.31]], &dev()).unwrap();
    let old32 = Tensor::new(&[[-1.01f32, -0.5], [-0.29, -0.3]], &dev()).unwrap();
    let adv32 = Tensor::new(&[1.0f32, -1.0], &dev()).unwrap();
    let mask2 = Tensor::ones((2, 2), DType::U8, &dev()).unwrap();
    let tau = 5e-3;
    let sapo = Sapo {
        tau_pos: tau,
        tau_neg: tau,
        ..Sapo::default()
    }
    .build()
    .unwrap();
    let f32_loss = sapo
        .forward(&PolicyInputs::new(&lp32, &old32, &adv32, &mask2))
        .unwrap()
        .loss
        .to_scalar::<f32>()
        .unwrap() as f64;
    let to64 = |x: &Tensor| x.to_dtype(DType::F64).unwrap();
    let f64_loss = sapo
        .forward(&PolicyInputs::new(
            &to64(&lp32),
            &to64(&old32),
            &to64(&adv32),
            &mask2,
        ))
        .unwrap()
        .loss
        .to_scalar::<f64>()
        .unwrap();
    assert!(
        (f32_loss - f64_loss).abs() <= 1e-3 * f64_loss.abs().max(1e-2),
        "f32 {f32_loss} vs f64 {f64_loss}"
    );
}

/// 7. The public forms that returned NaN or inf without a word: `aggregate` with NaN where
///    unmasked, `kl_penalty` with a non-finite reference or an overflowing unclamped k3, the
///    gate's scalar forms with a bad τ, f64 GSPO without its bound and GMPO at |Δ| = 1e4, the
///    rollout correction's diagnostics at |Δ| = 1e4.
#[test]
fn public_forms_never_return_a_silent_nan_or_inf() {
    let mask = Tensor::new(&[[1f32, 1.0, 0.0]], &dev()).unwrap();
    let with_nan = Tensor::new(&[[1f32, f32::NAN, 2.0]], &dev()).unwrap();
    let err = aggregate(
        &with_nan,
        &mask,
        Aggregation::TokenMean,
        &Normalizer::default(),
    )
    .unwrap_err();
    assert_eq!(invalid_value_arg(&err), "loss_mat");
    // NaN where masked is padding.
    let masked_nan = Tensor::new(&[[1f32, 2.0, f32::NAN]], &dev()).unwrap();
    aggregate(
        &masked_nan,
        &mask,
        Aggregation::TokenMean,
        &Normalizer::default(),
    )
    .unwrap();

    let lp = Tensor::new(&[-1.0f32, -2.0], &dev()).unwrap();
    let inf_ref = Tensor::new(&[-1.0f32, f32::INFINITY], &dev()).unwrap();
    for estimator in [KlEstimator::K1, KlEstimator::K3] {
        let err = kl_penalty(&lp, &inf_ref, estimator, true).unwrap_err();
        assert_eq!(invalid_value_arg(&err), "ref_log_probs");
    }
    let far_ref = Tensor::new(&[-1.0f32, 98.0], &dev()).unwrap();
    let err = kl_penalty(&lp, &far_ref, KlEstimator::K3, false).unwrap_err();
    assert_eq!(invalid_value_arg(&err), "ref_log_probs");
    assert!(kl_penalty(&lp, &far_ref, KlEstimator::K3, true).is_ok());
    // f16 computes in f16: e^12 overflows it, so ℓref − ℓ = 14 is out of range there.
    let lp16 = lp.to_dtype(DType::F16).unwrap();
    let near_ref = Tensor::new(&[-1.0f32, 12.0], &dev())
        .unwrap()
        .to_dtype(DType::F16)
        .unwrap();
    let err = kl_penalty(&lp16, &near_ref, KlEstimator::K3Plus, false).unwrap_err();
    assert_eq!(invalid_value_arg(&err), "ref_log_probs");
    let k = kl_penalty(&lp16, &near_ref, KlEstimator::K3, true).unwrap();
    assert!(k.to_dtype(DType::F32).unwrap().to_vec1::<f32>().unwrap()[1].is_finite());

    assert!(gate::value_scalar(1.0f32, 0.0).is_err());
    assert!(gate::value_scalar(1.0f64, -1.0).is_err());
    assert!(gate::weight_scalar(1.0f64, f64::NAN).is_err());
    assert!(gate::value_scalar(-1.0f64, 1.0).is_err());
    assert!(gate::weight_scalar(f64::INFINITY, 1.0).is_err());

    // |Δ| = 1e4 in f64 and f32: finite losses that agree (every dtype saturates alike).
    let far = |dtype: DType| {
        let lp = Tensor::new(&[[0.0f64, -1.0], [-2.0, -1.0]], &dev())
            .unwrap()
            .to_dtype(dtype)
            .unwrap();
        let old = Tensor::new(&[[-1e4f64, -1.0], [-2.0, 1e4]], &dev())
            .unwrap()
            .to_dtype(dtype)
            .unwrap();
        let adv = Tensor::new(&[1.0f64, -1.0], &dev())
            .unwrap()
            .to_dtype(dtype)
            .unwrap();
        (lp, old, adv)
    };
    let mask2 = Tensor::ones((2, 2), DType::U8, &dev()).unwrap();
    for config in [
        Gspo::default().config().with_seq_log_ratio_max(None),
        Gmpo::default().config(),
    ] {
        for backend in [Backend::Auto, Backend::Composed] {
            let loss = config.build().unwrap().with_backend(backend);
            let mut values = vec![];
            for dtype in [DType::F32, DType::F64] {
                let (lp, old, adv) = far(dtype);
                let out = loss
                    .forward(&PolicyInputs::new(&lp, &old, &adv, &mask2))
                    .unwrap();
                let value = out
                    .loss
                    .to_dtype(DType::F64)
                    .unwrap()
                    .to_scalar::<f64>()
                    .unwrap();
                let m = out.metrics.read().unwrap();
                assert!(
                    value.is_finite(),
                    "{config:?} {backend:?} {dtype:?}: {value}"
                );
                assert!(
                    m.ratio_mean().unwrap().is_finite(),
                    "{config:?} {backend:?} {dtype:?}: {m:?}"
                );
                values.push(value);
            }
            let (a, b) = (values[0], values[1]);
            assert!(
                (a - b).abs() <= 1e-5 * a.abs().max(b.abs()).max(1.0),
                "{config:?} {backend:?}: f32 {a} vs f64 {b}"
            );
        }
    }

    let old = Tensor::new(&[[-1.0f32, -1e4]], &dev()).unwrap();
    let rollout = Tensor::new(&[[-1.0f32, -1.0]], &dev()).unwrap();
    let ones = Tensor::ones((1, 2), DType::F32, &dev()).unwrap();
    let err = rollout_correction(&old, &rollout, &ones, &RolloutCorrection::new()).unwrap_err();
    assert!(matches!(err, Error::InvalidValue { .. }), "{err}");
    let err = rollout_correction(&rollout, &old, &ones, &RolloutCorrection::new()).unwrap_err();
    assert!(matches!(err, Error::InvalidValue { .. }), "{err}");
}

/// 8. Merge errors a user can read, batches of two dtypes merged, and `MetricSums::default()`
///    the identity of `merge`.
#[test]
fn metrics_merge_readably_across_dtypes_and_from_default() {
    let lp = Tensor::new(&[[-1.0f32, -0.5]], &dev()).unwrap();
    let adv = Tensor::new(&[1.0f32], &dev()).unwrap();
    let mask = Tensor::ones((1, 2), DType::U8, &dev()).unwrap();
    let inputs = PolicyInputs::new(&lp, &lp, &adv, &mask);
    let sapo = Sapo::default().build().unwrap().forward(&inputs).unwrap();
    let grpo = Grpo::default().build().unwrap().forward(&inputs).unwrap();
    let err = sapo.metrics.merge(&grpo.metrics).unwrap_err();
    let text = err.to_string();
    assert!(
        text.contains("gate_weight_sum") && text.contains("clipped_count"),
        "{text}"
    );
    assert!(!text.contains("MetricKind"), "{text}");

    let lp64 = lp.to_dtype(DType::F64).unwrap();
    let adv64 = adv.to_dtype(DType::F64).unwrap();
    let sapo64 = Sapo::default()
        .build()
        .unwrap()
        .forward(&PolicyInputs::new(&lp64, &lp64, &adv64, &mask))
        .unwrap();
    let both = sapo.metrics.merge(&sapo64.metrics).unwrap().read().unwrap();
    assert_eq!(both.token_count, 4.0);
    assert_eq!(both.gate_weight_mean(), Some(1.0));

    let one = sapo.metrics.read().unwrap();
    assert_eq!(MetricSums::default().merge(&one).unwrap(), one);
    assert_eq!(one.merge(&MetricSums::default()).unwrap(), one);
    let folded = [one, one]
        .iter()
        .try_fold(MetricSums::default(), |acc, m| acc.merge(m))
        .unwrap();
    assert_eq!(folded.token_count, 4.0);
    assert_eq!(folded.ratio_min(), Some(1.0));
    let other = grpo.metrics.read().unwrap();
    let err = one.merge(&other).unwrap_err().to_string();
    assert!(
        err.contains("gate sums") && err.contains("clip counts"),
        "{err}"
    );
}

/// Frictions: a `Var`'s log-probs go straight into the inputs; `use sapo::*` leaves `Result`
/// alone; the entropy coefficient changes without a rebuild.
#[test]
fn frictions_of_a_real_loop_are_gone() {
    #[allow(unused_imports)]
    use sapo::*;
    fn main_like() -> Result<(), Box<dyn std::error::Error>> {
        let lp = Var::new(&[[-1.0f32, -0.5]], &Device::Cpu)?;
        let (old, adv, mask) = (
            lp.detach(),
            Tensor::new(&[1.0f32], &Device::Cpu)?,
            lp.ones_like()?,
        );
        let out = Grpo::default()
            .build()?
            .forward(&PolicyInputs::new(&lp, &old, &adv, &mask))?;
        assert!(out.loss.backward()?.get(lp.as_tensor()).is_some());
        Ok(())
    }
    main_like().unwrap();

    let loss = Grpo::default()
        .config()
        .with_entropy(Some(EntropyBonus::new(0.01)))
        .build()
        .unwrap();
    let loss = loss.with_entropy_coef(0.02).unwrap();
    assert_eq!(loss.config().entropy.unwrap().coef, 0.02);
    assert!(loss.with_entropy_coef(f64::NAN).is_err());
}
