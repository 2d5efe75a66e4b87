//! Property tests, on both implementations (fused kernel and composed ops): gradients equal the
//! closed-form gradients for every objective and ratio level; outputs stay finite on extreme
//! inputs; micro-batches with global normalizers reproduce the full batch; masked positions never
//! matter.

mod common;

use candle_core::DType;
use common::{assert_close, backends, reference, run_crate, Batch};
use proptest::prelude::*;
use sapo::{
    Aggregation, Divergence, Dppo, Dro, GeometricClip, HardClip, IsWeightClip, KlCov, KlEstimator,
    KlPenalty, Normalizer, PolicyLossConfig, RatioLevel, TrustRegion, Vespo,
};

fn ratio_level() -> impl Strategy<Value = RatioLevel> {
    prop_oneof![
        Just(RatioLevel::Token),
        Just(RatioLevel::Sequence),
        Just(RatioLevel::SequenceToken)
    ]
}

fn trust_region(max_tau: f64) -> impl Strategy<Value = TrustRegion> {
    let gate = prop_oneof![
        2 => Just(sapo::GateFunction::Sigmoid),
        1 => Just(sapo::GateFunction::Erf),
        1 => Just(sapo::GateFunction::Arctan),
        1 => Just(sapo::GateFunction::Softsign),
    ];
    let soft = (0.05..max_tau, 0.05..max_tau, gate).prop_map(|(tau_pos, tau_neg, gate)| {
        TrustRegion::SoftGate {
            tau_pos,
            tau_neg,
            gate,
        }
    });
    let hard = (
        prop_oneof![3 => 0.0..0.6f64, 1 => Just(0.0)],
        0.0..0.6f64,
        proptest::option::of(1.2..5.0f64),
        proptest::option::of(0.05..2.0f64),
    )
        .prop_map(|(lo, hi, dual, delta)| {
            TrustRegion::HardClip(HardClip {
                eps_low: lo,
                eps_high: hi,
                dual_clip: dual,
                delta: delta.map(|d| 1.0 + hi + d),
            })
        });
    let cispo = prop_oneof![
        (0.0..1.0f64, 0.0..0.6f64)
            .prop_map(|(eps_low, eps_high)| IsWeightClip::Bounds { eps_low, eps_high }),
        (0.5..6.0f64).prop_map(IsWeightClip::RatioMax),
    ]
    .prop_map(TrustRegion::Cispo);
    let dppo =
        (any::<bool>(), 0.0..0.3f64, 0.0..0.3f64, 0.5..20.0f64).prop_map(|(kl, low, high, cap)| {
            let divergence = if kl {
                Divergence::BinaryKl
            } else {
                Divergence::BinaryTv
            };
            TrustRegion::Dppo(Dppo::new(divergence, low, high, cap))
        });
    let vespo = (0.0..4.0f64, 0.0..4.0f64, 0.0..4.0f64, 0.0..4.0f64).prop_map(
        |(k_pos, lambda_pos, k_neg, lambda_neg)| {
            TrustRegion::Vespo(Vespo {
                k_pos,
                lambda_pos,
                k_neg,
                lambda_neg,
                ..Vespo::default()
            })
        },
    );
    let gmpo = (0.0..0.6f64, 0.0..0.6f64).prop_map(|(log_clip_low, log_clip_high)| {
        TrustRegion::GeometricClip(GeometricClip {
            log_clip_low,
            log_clip_high,
        })
    });
    let kl_cov = (0.01..1.0f64, 0.0..2.0f64)
        .prop_map(|(ratio, coef)| TrustRegion::KlCov(KlCov { ratio, coef }));
    prop_oneof![
        2 => soft,
        2 => hard,
        1 => Just(TrustRegion::Unclipped),
        1 => Just(TrustRegion::PolicyGradient),
        1 => cispo,
        1 => (0.01..2.0f64).prop_map(|beta| TrustRegion::Dro(Dro { beta })),
        1 => kl_cov,
        1 => dppo,
        1 => vespo,
        1 => gmpo,
    ]
}

/// Whether an objective is defined at the token level only.
fn token_only(trust: &TrustRegion) -> bool {
    matches!(
        trust,
        TrustRegion::PolicyGradient
            | TrustRegion::Dro(_)
            | TrustRegion::KlCov(_)
            | TrustRegion::Dppo(_)
            | TrustRegion::Vespo(_)
    )
}

fn aggregation() -> impl Strategy<Value = Aggregation> {
    prop_oneof![
        Just(Aggregation::TokenMean),
        Just(Aggregation::TokenSum),
        Just(Aggregation::SeqMeanTokenMean),
        Just(Aggregation::SeqMeanTokenSum),
        proptest::option::of(1usize..100)
            .prop_map(|horizon| Aggregation::SeqMeanTokenSumNorm { horizon }),
        Just(Aggregation::SeqMean),
    ]
}

fn kl_penalty() -> impl Strategy<Value = Option<KlPenalty>> {
    let est = prop_oneof![
        Just(KlEstimator::K1),
        Just(KlEstimator::Abs),
        Just(KlEstimator::K2),
        Just(KlEstimator::K3),
        Just(KlEstimator::K3Plus)
    ];
    proptest::option::of(
        (
            0.0..1.0f64,
            est,
            aggregation(),
            any::<bool>(),
            any::<bool>(),
        )
            .prop_map(
                |(coef, estimator, aggregation, clamp, importance_weighted)| KlPenalty {
                    coef,
                    estimator,
                    aggregation,
                    clamp,
                    importance_weighted,
                },
            ),
    )
}

fn config(max_tau: f64) -> impl Strategy<Value = PolicyLossConfig> {
    (
        ratio_level(),
        trust_region(max_tau),
        proptest::option::of(0.5..25.0f64),
        // The bound is > 0 (s = 1 must pass it); small ones keep it active.
        proptest::option::of(0.05..12.0f64),
        aggregation(),
        kl_penalty(),
    )
        .prop_map(|(level, trust, clamp, seq_max, agg, kl)| {
            let level = if token_only(&trust) {
                RatioLevel::Token
            } else {
                level
            };
            PolicyLossConfig::new(level, trust)
                .with_log_ratio_clamp(clamp)
                .with_seq_log_ratio_max(seq_max)
                .with_aggregation(agg)
                .with_kl(kl)
        })
}

/// Batches up to 16×64 with empty rows, log-ratios up to ±30, exact ties with `ℓold` and `ℓref`.
fn batch(with_ref: bool) -> impl Strategy<Value = Batch> {
    (1usize..=16, 1usize..=64, any::<bool>(), any::<bool>()).prop_flat_map(
        move |(b, t, per_token, weighted)| {
            let n = b * t;
            // Exact ties (ℓ = ℓold, ℓ = ℓref) are frequent: PyTorch's subgradients decide there.
            let log_ratio = prop_oneof![3 => -0.5..0.5f64, 1 => -30.0..30.0f64, 1 => Just(0.0)];
            let ref_shift = prop_oneof![3 => -2.0..2.0f64, 1 => Just(0.0)];
            (
                proptest::collection::vec(-10.0..-0.01f64, n),
                proptest::collection::vec(log_ratio, n),
                proptest::collection::vec(-3.0..3.0f64, if per_token { n } else { b }),
                proptest::collection::vec(prop_oneof![3 => Just(1.0), 1 => Just(0.0)], n),
                proptest::collection::vec(prop_oneof![3 => Just(false), 1 => Just(true)], b),
                proptest::collection::vec(ref_shift, n),
                proptest::collection::vec(0.0..2.0f64, n),
            )
                .prop_map(
                    move |(old, log_ratio, advantages, bits, empty, ref_shift, weights)| {
                        let mask = (0..n)
                            .map(|j| if empty[j / t] { 0.0 } else { bits[j] })
                            .collect();
                        let log_probs: Vec<f64> =
                            old.iter().zip(&log_ratio).map(|(o, r)| o + r).collect();
                        let ref_log_probs = with_ref.then(|| {
                            log_probs
                                .iter()
                                .zip(&ref_shift)
                                .map(|(l, s)| l + s)
                                .collect()
                        });
                        Batch {
                            b,
                            t,
                            log_probs,
                            old_log_probs: old,
                            advantages,
                            per_token_advantages: per_token,
                            mask,
                            ref_log_probs,
                            is_weights: weighted.then_some(weights),
                        }
                    },
                )
        },
    )
}

fn config_and_batch(max_tau: f64) -> impl Strategy<Value = (PolicyLossConfig, Batch)> {
    config(max_tau).prop_flat_map(|cfg| (Just(cfg), batch(cfg.kl.is_some())))
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 192, ..ProptestConfig::default() })]

    #[test]
    fn autograd_gradient_equals_closed_form((cfg, batch) in config_and_batch(8.0)) {
        let norm = Normalizer::default();
        let (loss, grad) = reference(&cfg, &batch, &norm);
        for backend in backends() {
            let got = run_crate(&cfg, &batch, norm, DType::F64, backend).unwrap();
            assert_close(&format!("{backend:?} loss"), &[got.loss], &[loss], 1e-9, 1e-9);
            assert_close(&format!("{backend:?} grad"), &got.grad, &grad, 1e-9, 1e-8);
            for (j, m) in batch.mask.iter().enumerate() {
                if *m == 0.0 {
                    prop_assert_eq!(got.grad[j], 0.0);
                }
            }
        }
    }

    #[test]
    fn outputs_stay_finite_in_f32((cfg, batch) in config_and_batch(1000.0)) {
        for backend in backends() {
            let got = run_crate(&cfg, &batch, Normalizer::default(), DType::F32, backend).unwrap();
            prop_assert!(got.loss.is_finite(), "{:?} loss {}", backend, got.loss);
            prop_assert!(got.grad.iter().all(|g| g.is_finite()));
            let m = got.metrics;
            for v in [m.approx_kl(), m.ratio_mean(), m.clip_fraction(), m.gate_weight_mean(),
                      m.gate_value_mean(), m.kl_mean(), m.clip_ratio(), m.clip_fraction_pos(),
                      m.clip_fraction_neg(), m.truncated_fraction(), m.mean_abs_log_ratio(),
                      m.kl_loss].into_iter().flatten() {
                prop_assert!(v.is_finite());
            }
        }
    }

    #[test]
    fn micro_batches_reproduce_the_full_batch(
        (cfg, batch) in config_and_batch(8.0),
        pieces in 1usize..=4,
    ) {
        for backend in backends() {
            let full = run_crate(&cfg, &batch, Normalizer::default(), DType::F64, backend).unwrap();
            let n: Vec<f64> = batch.mask.chunks(batch.t).map(|r| r.iter().sum()).collect();
            let pieces = pieces.min(batch.b);
            // KL-Cov selects over the batch the call sees (as verl, per micro-batch).
            prop_assume!(!matches!(cfg.trust_region, TrustRegion::KlCov(_)) || pieces == 1);
            // `seq-mean` counts every row, the other sequence modes the non-empty ones: one
            // normalizer cannot serve both.
            let all_rows = cfg.aggregation == Aggregation::SeqMean
                || cfg.kl.is_some_and(|k| k.aggregation == Aggregation::SeqMean);
            let seq_modes = |a: Aggregation| !matches!(a, Aggregation::TokenMean | Aggregation::TokenSum);
            prop_assume!(!all_rows || [Some(cfg.aggregation), cfg.kl.map(|k| k.aggregation)]
                .into_iter().flatten().all(|a| a == Aggregation::SeqMean || !seq_modes(a)));
            let sequences = if all_rows {
                batch.b as f64
            } else {
                n.iter().filter(|&&x| x > 0.0).count() as f64
            };
            let norm = Normalizer::default()
                .with_global_tokens(n.iter().sum())
                .with_global_sequences(sequences)
                .with_world_size(pieces);
            let mut loss = 0.0;
            let mut grad = vec![];
            let mut metrics: Option<sapo::MetricSums> = None;
            for k in 0..pieces {
                let (lo, hi) = (k * batch.b / pieces, (k + 1) * batch.b / pieces);
                let part = run_crate(&cfg, &batch.rows(lo, hi), norm, DType::F64, backend).unwrap();
                loss += part.loss / pieces as f64;
                grad.extend(part.grad.iter().map(|g| g / pieces as f64));
                metrics = Some(match metrics {
                    None => part.metrics,
                    Some(m) => m.merge(&part.metrics).unwrap(),
                });
            }
            assert_close("loss", &[loss], &[full.loss], 1e-9, 1e-9);
            assert_close("grad", &grad, &full.grad, 1e-9, 1e-8);
            let merged = metrics.unwrap();
            prop_assert_eq!(merged.token_count, full.metrics.token_count);
            assert_close("approx_kl", &[merged.approx_kl().unwrap_or(0.0)],
                         &[full.metrics.approx_kl().unwrap_or(0.0)], 1e-9, 1e-9);
            prop_assert_eq!(merged.clipped_count, full.metrics.clipped_count);
            prop_assert_eq!(merged.highest_ratio, full.metrics.highest_ratio);
        }
    }

    #[test]
    fn masked_positions_change_nothing(
        (cfg, batch) in config_and_batch(8.0),
        garbage in prop_oneof![Just(f64::NAN), Just(f64::INFINITY), Just(f64::NEG_INFINITY),
                               Just(1e30), -50.0..50.0f64],
    ) {
        for backend in backends() {
            let clean = run_crate(&cfg, &batch, Normalizer::default(), DType::F32, backend).unwrap();
            let mut dirty = batch.clone();
            let spoil = |v: &mut Vec<f64>| {
                for (x, m) in v.iter_mut().zip(&batch.mask) {
                    if *m == 0.0 {
                        *x = garbage;
                    }
                }
            };
            spoil(&mut dirty.log_probs);
            spoil(&mut dirty.old_log_probs);
            if dirty.per_token_advantages {
                spoil(&mut dirty.advantages);
            }
            if let Some(r) = dirty.ref_log_probs.as_mut() {
                spoil(r);
            }
            if let Some(w) = dirty.is_weights.as_mut() {
                spoil(w);
            }
            let got = run_crate(&cfg, &dirty, Normalizer::default(), DType::F32, backend).unwrap();
            prop_assert_eq!(got.loss.to_bits(), clean.loss.to_bits());
            prop_assert_eq!(
                got.grad.iter().map(|g| g.to_bits()).collect::<Vec<_>>(),
                clean.grad.iter().map(|g| g.to_bits()).collect::<Vec<_>>()
            );
            prop_assert_eq!(format!("{:?}", got.metrics), format!("{:?}", clean.metrics));
        }
    }
}

/// Closed-form `ℓ`, `H` and the gradient of `Σ w_ℓ·ℓ + Σ w_H·H` for one row of logits.
fn logprob_reference(z_raw: &[f64], y: usize, tau: f64, wl: f64, wh: f64) -> (f64, f64, Vec<f64>) {
    let z: Vec<f64> = z_raw.iter().map(|x| x / tau).collect();
    let max = z.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    let lse = max + z.iter().map(|v| (v - max).exp()).sum::<f64>().ln();
    let p: Vec<f64> = z.iter().map(|v| (v - lse).exp()).collect();
    let h = lse - p.iter().zip(&z).map(|(p, z)| p * z).sum::<f64>();
    let grad = (0..z.len())
        .map(|v| {
            let dl = (if v == y { 1.0 } else { 0.0 }) - p[v];
            let dh = -p[v] * (z[v] - lse + h);
            (wl * dl + wh * dh) / tau
        })
        .collect();
    (z[y] - lse, h, grad)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn log_prob_gradients_equal_closed_form(
        (n, v, logits, targets, wl, wh) in (1usize..8, 1usize..64).prop_flat_map(|(n, v)| (
            Just(n), Just(v),
            proptest::collection::vec(-30.0..30.0f64, n * v),
            proptest::collection::vec(0..v, n),
            proptest::collection::vec(-2.0..2.0f64, n),
            proptest::collection::vec(-2.0..2.0f64, n),
        )),
        tau in 0.3..3.0f64,
    ) {
        let dev = common::device();
        let x = candle_core::Var::from_vec(logits.clone(), (n, v), &dev).unwrap();
        let y = candle_core::Tensor::from_vec(targets.iter().map(|&t| t as u32).collect::<Vec<_>>(), n, &dev).unwrap();
        for backend in backends() {
        let (lp, h) = sapo::token_log_probs_and_entropy_with(x.as_tensor(), &y, tau, backend).unwrap();
        let wl_t = candle_core::Tensor::from_vec(wl.clone(), n, &dev).unwrap();
        let wh_t = candle_core::Tensor::from_vec(wh.clone(), n, &dev).unwrap();
        let obj = (lp.mul(&wl_t).unwrap().sum_all().unwrap() + h.mul(&wh_t).unwrap().sum_all().unwrap()).unwrap();
        let g = obj.backward().unwrap();
        let g = g.get(x.as_tensor()).unwrap().flatten_all().unwrap().to_vec1::<f64>().unwrap();
        let (lp, h) = (lp.to_vec1::<f64>().unwrap(), h.to_vec1::<f64>().unwrap());
        for i in 0..n {
            let (rl, rh, rg) = logprob_reference(&logits[i * v..(i + 1) * v], targets[i], tau, wl[i], wh[i]);
            assert_close("log_prob", &[lp[i]], &[rl], 1e-10, 1e-10);
            assert_close("entropy", &[h[i]], &[rh], 1e-10, 1e-10);
            assert_close("grad", &g[i * v..(i + 1) * v], &rg, 1e-10, 1e-9);
        }
        }
    }
}
