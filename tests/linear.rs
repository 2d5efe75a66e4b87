//! The fused linear log-probs (hidden states → lm_head → log-probs and entropy without the
//! logits) against composed candle ops and finite differences, with its edge cases and errors.

mod common;

use candle_core::{DType, Device, Tensor, Var};
use common::{assert_same_bits_across_threads, f64s, noise};
use proptest::prelude::*;
use sapo::{linear_log_probs_and_entropy_with, Backend, Error};

fn dev() -> Device {
    Device::Cpu
}

struct Problem {
    hidden: Vec<f64>,
    weight: Vec<f64>,
    bias: Option<Vec<f64>>,
    targets: Vec<u32>,
    w_lp: Vec<f64>,
    w_h: Vec<f64>,
    n: usize,
    h: usize,
    v: usize,
}

fn problem(n: usize, h: usize, v: usize, with_bias: bool, seed: u64) -> Problem {
    Problem {
        hidden: noise(n * h, seed).iter().map(|x| 4.0 * x).collect(),
        weight: noise(v * h, seed + 1).iter().map(|x| 2.0 * x).collect(),
        bias: with_bias.then(|| noise(v, seed + 2)),
        targets: (0..n)
            .map(|i| ((i * 7919 + seed as usize) % v) as u32)
            .collect(),
        w_lp: noise(n, seed + 3),
        w_h: noise(n, seed + 4),
        n,
        h,
        v,
    }
}

/// `(ℓ, H, ∂hidden, ∂W, ∂b)` of `Σ w_ℓ·ℓ + Σ w_H·H` in `dtype` on `backend`.
type Outputs = (Vec<f64>, Vec<f64>, Vec<f64>, Vec<f64>, Option<Vec<f64>>);

fn run(p: &Problem, dtype: DType, backend: Backend, temperature: f64) -> Outputs {
    let var = |v: &Vec<f64>, shape: &[usize]| {
        Var::from_tensor(
            &Tensor::from_vec(v.clone(), shape, &dev())
                .unwrap()
                .to_dtype(dtype)
                .unwrap(),
        )
        .unwrap()
    };
    let hidden = var(&p.hidden, &[p.n, p.h]);
    let weight = var(&p.weight, &[p.v, p.h]);
    let bias = p.bias.as_ref().map(|b| var(b, &[p.v]));
    let targets = Tensor::from_vec(p.targets.clone(), p.n, &dev()).unwrap();
    let (lp, ent) = linear_log_probs_and_entropy_with(
        hidden.as_tensor(),
        weight.as_tensor(),
        bias.as_ref().map(Var::as_tensor),
        &targets,
        temperature,
        backend,
    )
    .unwrap();
    let w = |v: &Vec<f64>| {
        Tensor::from_vec(v.clone(), p.n, &dev())
            .unwrap()
            .to_dtype(lp.dtype())
            .unwrap()
    };
    // The weights select rows; a NaN output times a zero weight must stay out of the sum.
    let keep = |x: &Tensor, w: Tensor| -> Tensor {
        let active = w.ne(0.0).unwrap();
        active
            .where_cond(&x.mul(&w).unwrap(), &w.zeros_like().unwrap())
            .unwrap()
    };
    let obj = (keep(&lp, w(&p.w_lp)).sum_all().unwrap() + keep(&ent, w(&p.w_h)).sum_all().unwrap())
        .unwrap();
    let grads = obj.backward().unwrap();
    let g = |v: &Var| f64s(grads.get(v.as_tensor()).unwrap());
    (
        f64s(&lp),
        f64s(&ent),
        g(&hidden),
        g(&weight),
        bias.as_ref().map(g),
    )
}

fn assert_close(what: &str, a: &[f64], b: &[f64], tol: f64) {
    assert_eq!(a.len(), b.len(), "{what}: lengths");
    for (j, (x, y)) in a.iter().zip(b).enumerate() {
        let ok = (x.is_nan() && y.is_nan()) || (x - y).abs() <= tol * (1.0 + y.abs());
        assert!(ok, "{what}[{j}]: {x} vs {y}");
    }
}

fn assert_same(a: &Outputs, b: &Outputs, tol: f64) {
    assert_close("log_probs", &a.0, &b.0, tol);
    assert_close("entropy", &a.1, &b.1, tol);
    assert_close("grad hidden", &a.2, &b.2, tol);
    assert_close("grad weight", &a.3, &b.3, tol);
    if let (Some(x), Some(y)) = (&a.4, &b.4) {
        assert_close("grad bias", x, y, tol);
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    /// f64, random shapes up to two vocabulary tiles and more than one block of rows.
    #[test]
    fn fused_matches_composed_in_f64(
        n in 1usize..80, h in 1usize..24, v in 1usize..4500, with_bias in any::<bool>(),
        seed in 0u64..1000, temperature in 0.3..2.0f64,
    ) {
        let p = problem(n, h, v, with_bias, seed);
        let fused = run(&p, DType::F64, Backend::Auto, temperature);
        let composed = run(&p, DType::F64, Backend::Composed, temperature);
        assert_same(&fused, &composed, 1e-10);
    }
}

#[test]
fn fused_matches_composed_in_half_and_single_precision() {
    let p = problem(37, 16, 2100, true, 5);
    let reference = run(&p, DType::F64, Backend::Composed, 1.0);
    for (dtype, tol) in [(DType::F32, 1e-4), (DType::BF16, 5e-2), (DType::F16, 2e-2)] {
        let fused = run(&p, dtype, Backend::Auto, 1.0);
        assert_close(&format!("{dtype:?} log_probs"), &fused.0, &reference.0, tol);
        assert_close(
            &format!("{dtype:?} grad weight"),
            &fused.3,
            &reference.3,
            tol,
        );
    }
}

#[test]
fn gradients_match_finite_differences() {
    let p = problem(3, 4, 9, true, 11);
    let (_, _, gh, gw, gb) = run(&p, DType::F64, Backend::Auto, 0.7);
    let objective = |p: &Problem| {
        let (lp, ent, ..) = run(p, DType::F64, Backend::Auto, 0.7);
        let dot = |x: &[f64], w: &[f64]| x.iter().zip(w).map(|(a, b)| a * b).sum::<f64>();
        dot(&lp, &p.w_lp) + dot(&ent, &p.w_h)
    };
    let eps = 1e-6;
    let check = |get: &dyn Fn(&mut Problem) -> &mut Vec<f64>, grad: &[f64], what: &str| {
        for (j, g) in grad.iter().enumerate() {
            let (mut plus, mut minus) = (problem(3, 4, 9, true, 11), problem(3, 4, 9, true, 11));
            get(&mut plus)[j] += eps;
            get(&mut minus)[j] -= eps;
            let fd = (objective(&plus) - objective(&minus)) / (2.0 * eps);
            assert!((fd - g).abs() < 1e-6, "{what}[{j}]: {fd} vs {g}");
        }
    };
    check(&|p| &mut p.hidden, &gh, "hidden");
    check(&|p| &mut p.weight, &gw, "weight");
    check(&|p| p.bias.as_mut().unwrap(), &gb.unwrap(), "bias");
}

#[test]
fn single_rows_empty_batches_and_3d_hidden_states() {
    for backend in [Backend::Auto, Backend::Composed] {
        let p = problem(1, 5, 3000, false, 3);
        let one = run(&p, DType::F64, backend, 1.0);
        assert_eq!(one.0.len(), 1);
        let hidden = Var::zeros((0, 5), DType::F32, &dev()).unwrap();
        let weight = Tensor::zeros((7, 5), DType::F32, &dev()).unwrap();
        let targets = Tensor::zeros(0, DType::U32, &dev()).unwrap();
        let (lp, ent) = linear_log_probs_and_entropy_with(
            hidden.as_tensor(),
            &weight,
            None,
            &targets,
            1.0,
            backend,
        )
        .unwrap();
        assert_eq!((lp.dims(), ent.dims()), (&[0][..], &[0][..]));
        let grads = (lp.sum_all().unwrap() + ent.sum_all().unwrap())
            .unwrap()
            .backward()
            .unwrap();
        if let Some(g) = grads.get(hidden.as_tensor()) {
            assert_eq!(g.dims(), &[0, 5]);
        }
        // [B,T,H] hidden states give [B,T] results.
        let hidden = Tensor::ones((2, 3, 5), DType::F32, &dev()).unwrap();
        let weight = Tensor::ones((4, 5), DType::F32, &dev()).unwrap();
        let targets = Tensor::zeros((2, 3), DType::I64, &dev()).unwrap();
        let (lp, _) =
            linear_log_probs_and_entropy_with(&hidden, &weight, None, &targets, 1.0, backend)
                .unwrap();
        assert_eq!(lp.dims(), &[2, 3]);
        // Every logit ties with the target's: uniform over V = 4.
        for x in f64s(&lp) {
            assert!((x + 4f64.ln()).abs() < 1e-6, "{backend:?}: {x}");
        }
    }
}

#[test]
fn garbage_rows_with_zero_upstream_get_no_gradient() {
    let mut clean = problem(6, 4, 2500, true, 9);
    // Rows 1 and 3 are padding: no upstream gradient.
    for row in [1, 3] {
        clean.w_lp[row] = 0.0;
        clean.w_h[row] = 0.0;
    }
    let mut dirty = problem(6, 4, 2500, true, 9);
    dirty.w_lp.clone_from(&clean.w_lp);
    dirty.w_h.clone_from(&clean.w_h);
    dirty.hidden[4] = f64::NAN; // row 1
    dirty.hidden[3 * 4..4 * 4].fill(f64::NEG_INFINITY); // row 3
    for backend in [Backend::Auto, Backend::Composed] {
        let a = run(&clean, DType::F32, backend, 1.0);
        let b = run(&dirty, DType::F32, backend, 1.0);
        assert!(b.0[1].is_nan() && b.0[3].is_nan(), "{backend:?}");
        assert!(b.2.iter().chain(&b.3).all(|g| g.is_finite()), "{backend:?}");
        // The weight's gradient is the clean one (garbage rows had no upstream gradient).
        assert_close("grad weight", &b.3, &a.3, 1e-6);
        assert_eq!(&b.2[4..8], &[0.0; 4], "{backend:?}");
    }
}

#[test]
fn fused_kernel_is_deterministic_across_thread_counts() {
    let p = problem(130, 12, 5000, true, 21);
    let bits = || {
        let (lp, ent, gh, gw, gb) = run(&p, DType::F32, Backend::Auto, 1.0);
        lp.into_iter()
            .chain(ent)
            .chain(gh)
            .chain(gw)
            .chain(gb.unwrap())
            .map(f64::to_bits)
            .collect::<Vec<_>>()
    };
    assert_same_bits_across_threads("fused linear log-probs", bits);
}

#[test]
fn bad_inputs_are_typed_errors() {
    let hidden = Tensor::zeros((2, 4), DType::F32, &dev()).unwrap();
    let weight = Tensor::zeros((5, 4), DType::F32, &dev()).unwrap();
    let targets = Tensor::new(&[0u32, 4], &dev()).unwrap();
    let call =
        |hidden: &Tensor, weight: &Tensor, bias: Option<&Tensor>, targets: &Tensor, t: f64| {
            linear_log_probs_and_entropy_with(hidden, weight, bias, targets, t, Backend::Auto)
                .unwrap_err()
        };
    let wrong_h = Tensor::zeros((5, 3), DType::F32, &dev()).unwrap();
    assert!(matches!(
        call(&hidden, &wrong_h, None, &targets, 1.0),
        Error::Shape { arg: "weight", .. }
    ));
    let too_big = Tensor::new(&[0u32, 5], &dev()).unwrap();
    assert!(matches!(
        call(&hidden, &weight, None, &too_big, 1.0),
        Error::InvalidValue { arg: "targets", .. }
    ));
    let ints = Tensor::zeros((2, 4), DType::I64, &dev()).unwrap();
    assert!(matches!(
        call(&ints, &weight, None, &targets, 1.0),
        Error::DType { arg: "hidden", .. }
    ));
    let float_targets = Tensor::zeros(2, DType::F32, &dev()).unwrap();
    assert!(matches!(
        call(&hidden, &weight, None, &float_targets, 1.0),
        Error::DType { arg: "targets", .. }
    ));
    let no_features = Tensor::zeros((2, 0), DType::F32, &dev()).unwrap();
    let weight_0 = Tensor::zeros((5, 0), DType::F32, &dev()).unwrap();
    assert!(matches!(
        call(&no_features, &weight_0, None, &targets, 1.0),
        Error::Shape { arg: "hidden", .. }
    ));
    let bias = Tensor::zeros(4, DType::F32, &dev()).unwrap();
    assert!(matches!(
        call(&hidden, &weight, Some(&bias), &targets, 1.0),
        Error::Shape { arg: "bias", .. }
    ));
    for t in [f64::NAN, 0.0, f64::INFINITY] {
        assert!(matches!(
            call(&hidden, &weight, None, &targets, t),
            Error::InvalidConfig {
                name: "temperature",
                ..
            }
        ));
    }
}

mod one_pass {
    use super::*;
    use sapo::{
        Aggregation, HardClip, KlEstimator, KlPenalty, LmHead, PolicyInputs, PolicyLoss,
        PolicyLossConfig, PolicyMasks, RatioLevel, TrustRegion,
    };

    fn configs() -> Vec<PolicyLossConfig> {
        let shapes = [
            TrustRegion::SoftGate {
                tau_pos: 1.0,
                tau_neg: 1.05,
                gate: sapo::GateFunction::Sigmoid,
            },
            TrustRegion::SoftGate {
                tau_pos: 1.0,
                tau_neg: 1.05,
                gate: sapo::GateFunction::Erf,
            },
            TrustRegion::HardClip(HardClip::new(0.2, 0.28).with_dual_clip(3.0)),
            TrustRegion::HardClip(HardClip::new(0.1, 0.1).with_delta(1.5)),
            TrustRegion::Unclipped,
            TrustRegion::Cispo(sapo::IsWeightClip::RatioMax(1.5)),
            TrustRegion::PolicyGradient,
            TrustRegion::Dro(sapo::Dro { beta: 0.2 }),
            TrustRegion::Dppo(sapo::Dppo::new(sapo::Divergence::BinaryKl, 0.05, 0.05, 3.0)),
            TrustRegion::Vespo(sapo::Vespo::default()),
            TrustRegion::GeometricClip(sapo::GeometricClip {
                log_clip_low: 0.2,
                log_clip_high: 0.3,
            }),
            TrustRegion::KlCov(sapo::KlCov {
                ratio: 0.3,
                coef: 1.0,
            }),
        ];
        let aggregations = [
            Aggregation::TokenMean,
            Aggregation::TokenSum,
            Aggregation::SeqMeanTokenMean,
            Aggregation::SeqMeanTokenSum,
            Aggregation::SeqMeanTokenSumNorm { horizon: Some(9) },
        ];
        let kls = [
            None,
            Some(KlPenalty::new(0.1, KlEstimator::K3)),
            Some(KlPenalty::new(0.3, KlEstimator::Abs).with_aggregation(Aggregation::TokenSum)),
        ];
        let mut out = vec![];
        // The masks (OPSM, top-entropy tokens, M2PO, all three) and TOPR, at the token level.
        let masks = [
            PolicyMasks::default().with_off_policy_threshold(0.05),
            PolicyMasks::default().with_top_entropy_quantile(0.4),
            PolicyMasks::default().with_m2_threshold(0.04),
            PolicyMasks::default()
                .with_off_policy_threshold(0.02)
                .with_top_entropy_quantile(0.7)
                .with_m2_threshold(0.05),
        ];
        for (k, m) in masks.into_iter().enumerate() {
            for shape in &shapes[..3] {
                out.push(
                    PolicyLossConfig::new(RatioLevel::Token, *shape)
                        .with_masks(m)
                        .with_aggregation(aggregations[k])
                        .with_kl(kls[k % kls.len()]),
                );
            }
        }
        out.push(sapo::Topr::default().config());
        out.push(
            sapo::ClipCov {
                ratio: 0.2,
                cov_lower: -2.0,
                cov_upper: 2.0,
                seed: 5,
                ..Default::default()
            }
            .config(),
        );
        out.push(
            sapo::Topr {
                positive_weight: 0.7,
                negative_weight: 1.3,
            }
            .config()
            .with_masks(masks[3]),
        );
        for level in [
            RatioLevel::Token,
            RatioLevel::Sequence,
            RatioLevel::SequenceToken,
        ] {
            for shape in shapes {
                for (k, aggregation) in aggregations.iter().enumerate() {
                    let kl = kls[k % kls.len()].map(|p| p.with_importance_weighting(k % 2 == 1));
                    let config = PolicyLossConfig::new(level, shape)
                        .with_aggregation(*aggregation)
                        .with_kl(kl);
                    // The per-token objectives are defined at the token level only.
                    if config.validate().is_ok() {
                        out.push(config);
                    }
                }
            }
        }
        out
    }

    /// Loss, metrics (approx_kl, ratio mean, clip and gate means) and the gradients of hidden,
    /// weight and bias.
    fn outcome(
        loss: &PolicyLoss,
        p: &Problem,
        (b, t): (usize, usize),
        one_pass: bool,
        backend: Backend,
    ) -> (Vec<f64>, Vec<f64>) {
        let var = |v: &Vec<f64>, shape: &[usize]| {
            Var::from_tensor(&Tensor::from_vec(v.clone(), shape, &dev()).unwrap()).unwrap()
        };
        let hidden = var(&p.hidden, &[b, t, p.h]);
        let weight = var(&p.weight, &[p.v, p.h]);
        let bias = var(p.bias.as_ref().unwrap(), &[p.v]);
        let targets = Tensor::from_vec(p.targets.clone(), (b, t), &dev()).unwrap();
        let noise = |seed| Tensor::from_vec(noise(b * t, seed), (b, t), &dev()).unwrap();
        let (initial, _) = sapo::linear_log_probs_and_entropy(
            hidden.as_tensor(),
            weight.as_tensor(),
            Some(bias.as_tensor()),
            &targets,
            0.9,
        )
        .unwrap();
        let old = (initial.detach() + noise(40).affine(0.6, 0.0).unwrap()).unwrap();
        let reference = (initial.detach() + noise(41)).unwrap();
        let weights = noise(42).affine(1.0, 1.0).unwrap();
        let adv = noise(43).affine(3.0, 0.0).unwrap();
        let mask: Vec<f64> = (0..b * t)
            .map(|j| {
                if j / t == 1 || (j * 5) % 7 == 0 {
                    0.0
                } else {
                    1.0
                }
            })
            .collect();
        let mask = Tensor::from_vec(mask, (b, t), &dev()).unwrap();
        let kl = loss.config().kl.is_some();
        let masks = loss.config().masks;
        let rollout = (&old + noise(44).affine(0.3, 0.0).unwrap()).unwrap();
        let rollout = (masks.off_policy_threshold.is_some() || masks.m2_threshold.is_some())
            .then_some(&rollout);
        let scores = Tensor::from_vec((0..b).map(|i| i as f64 - 1.0).collect(), b, &dev()).unwrap();
        let scores = matches!(loss.config().trust_region, TrustRegion::Topr(_)).then_some(&scores);
        let loss = loss.with_backend(backend);
        let out = if one_pass {
            let head = LmHead::new(hidden.as_tensor(), weight.as_tensor(), &targets)
                .with_bias(bias.as_tensor())
                .with_temperature(0.9);
            let mut inputs = PolicyInputs::new(head, &old, &adv, &mask).with_is_weights(&weights);
            if kl {
                inputs = inputs.with_ref_log_probs(&reference);
            }
            inputs.rollout_log_probs = rollout;
            inputs.scores = scores;
            loss.forward_from_hidden(&inputs).unwrap()
        } else {
            let (lp, entropy) = linear_log_probs_and_entropy_with(
                hidden.as_tensor(),
                weight.as_tensor(),
                Some(bias.as_tensor()),
                &targets,
                0.9,
                backend,
            )
            .unwrap();
            let mut inputs = PolicyInputs::new(&lp, &old, &adv, &mask).with_is_weights(&weights);
            if kl {
                inputs = inputs.with_ref_log_probs(&reference);
            }
            inputs.rollout_log_probs = rollout;
            inputs.scores = scores;
            if masks.top_entropy_quantile.is_some() {
                inputs = inputs.with_entropy(&entropy);
            }
            loss.forward(&inputs).unwrap()
        };
        let m = out.metrics.read().unwrap();
        let values = [
            Some(f64s(&out.loss)[0]),
            m.approx_kl(),
            m.ratio_mean(),
            m.clip_fraction(),
            m.gate_weight_mean(),
            m.kl_mean(),
        ];
        let grads = out.loss.backward().unwrap();
        let g = |v: &Var| f64s(grads.get(v.as_tensor()).unwrap());
        let gradients = [g(&hidden), g(&weight), g(&bias)].concat();
        (values.iter().map(|v| v.unwrap_or(0.0)).collect(), gradients)
    }

    #[test]
    fn one_pass_matches_the_linear_log_probs_then_the_loss() {
        let (b, t) = (3, 7);
        let p = problem(b * t, 6, 300, true, 17);
        for config in configs() {
            let loss = config.build().unwrap();
            let fused = outcome(&loss, &p, (b, t), true, Backend::Auto);
            let composed = outcome(&loss, &p, (b, t), false, Backend::Auto);
            let reference = outcome(&loss, &p, (b, t), false, Backend::Composed);
            let what = format!("{config:?}");
            assert_close(&format!("{what} values"), &fused.0, &composed.0, 1e-12);
            assert_close(&format!("{what} grads"), &fused.1, &composed.1, 1e-12);
            assert_close(
                &format!("{what} values vs composed ops"),
                &fused.0,
                &reference.0,
                1e-9,
            );
            assert_close(
                &format!("{what} grads vs composed ops"),
                &fused.1,
                &reference.1,
                1e-9,
            );
        }
    }

    /// A frozen lm_head (a constant, not a `Var`): the sweep skips `∂W`; the loss and the other
    /// gradients are bit for bit those of a trainable head, and the head gets no gradient.
    #[test]
    fn a_frozen_lm_head_gets_no_gradient_and_changes_nothing_else() {
        let (b, t) = (2, 5);
        let p = problem(b * t, 8, 200, false, 29);
        let hidden =
            Var::from_tensor(&Tensor::from_vec(p.hidden.clone(), (b, t, p.h), &dev()).unwrap())
                .unwrap();
        let constant = Tensor::from_vec(p.weight.clone(), (p.v, p.h), &dev()).unwrap();
        let trainable = Var::from_tensor(&constant).unwrap();
        let targets = Tensor::from_vec(p.targets.clone(), (b, t), &dev()).unwrap();
        let old = Tensor::from_vec(noise(b * t, 3), (b, t), &dev())
            .unwrap()
            .affine(0.3, -5.5)
            .unwrap();
        let adv = Tensor::new(&[1.3f64, -0.4], &dev()).unwrap();
        let mask = Tensor::ones((b, t), DType::U8, &dev()).unwrap();
        for config in [
            sapo::Sapo::default().config(),
            sapo::Grpo::default().config(),
        ] {
            let loss = config.build().unwrap();
            let run = |weight: &Tensor| {
                let head = LmHead::new(hidden.as_tensor(), weight, &targets);
                let out = loss
                    .forward_from_hidden(&PolicyInputs::new(head, &old, &adv, &mask))
                    .unwrap();
                let grads = out.loss.backward().unwrap();
                let grad_hidden = f64s(grads.get(hidden.as_tensor()).unwrap());
                (f64s(&out.loss), grad_hidden, grads.get(weight).is_some())
            };
            let (loss_t, hidden_t, has_t) = run(trainable.as_tensor());
            let (loss_c, hidden_c, has_c) = run(&constant);
            assert!(has_t && !has_c);
            let bits = |v: &[f64]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&loss_t), bits(&loss_c));
            assert_eq!(bits(&hidden_t), bits(&hidden_c));
        }
    }

    #[test]
    fn one_pass_is_deterministic_across_thread_counts() {
        let (b, t) = (5, 60);
        let p = problem(b * t, 16, 3000, true, 23);
        let loss = sapo::Sapo::default().build().unwrap();
        let bits = || {
            let (values, grads) = outcome(&loss, &p, (b, t), true, Backend::Auto);
            values
                .into_iter()
                .chain(grads)
                .map(f64::to_bits)
                .collect::<Vec<_>>()
        };
        let pool = |n| {
            rayon::ThreadPoolBuilder::new()
                .num_threads(n)
                .build()
                .unwrap()
        };
        let one = pool(1).install(bits);
        assert_eq!(one, pool(2).install(bits));
        assert_eq!(one, pool(3).install(bits));
    }

    #[test]
    fn flat_hidden_states_are_a_shape_error() {
        let hidden = Tensor::zeros((6, 4), DType::F32, &dev()).unwrap();
        let weight = Tensor::zeros((5, 4), DType::F32, &dev()).unwrap();
        let targets = Tensor::zeros((2, 3), DType::U32, &dev()).unwrap();
        let old = Tensor::zeros((2, 3), DType::F32, &dev()).unwrap();
        let adv = Tensor::zeros(2, DType::F32, &dev()).unwrap();
        let head = LmHead::new(&hidden, &weight, &targets);
        let err = sapo::Sapo::default()
            .build()
            .unwrap()
            .forward_from_hidden(&PolicyInputs::new(head, &old, &adv, &old))
            .unwrap_err();
        assert!(matches!(err, Error::Shape { .. }), "{err}");
    }
}
