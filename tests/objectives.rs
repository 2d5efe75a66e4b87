//! The later objectives and corrections (CISPO, GMPO, GPG, DRO, KL-Cov, DPPO, VESPO, LUSPO,
//! bypass mode, entropy bonus, IS-corrected KL, `[B,1]` rollout weights, rollout correction):
//! hand-computed values on both paths, equivalences, and one test per invalid config or input.

mod common;

use candle_core::{Device, Tensor, Var};
use common::{f64s, BACKENDS};
use sapo::*;

fn dev() -> Device {
    Device::Cpu
}

fn t2(rows: &[&[f64]]) -> Tensor {
    let t = rows[0].len();
    let flat: Vec<f64> = rows.iter().flat_map(|r| r.iter().copied()).collect();
    Tensor::from_vec(flat, (rows.len(), t), &dev()).unwrap()
}

/// Loss and `∂loss/∂ℓ` of `config` on both paths (asserted equal), f64.
fn run(
    config: PolicyLossConfig,
    lp: &[&[f64]],
    old: &[&[f64]],
    adv: &[f64],
    mask: &[&[f64]],
) -> (f64, Vec<f64>, MetricSums) {
    let loss = config.build().unwrap();
    let mut results = vec![];
    for backend in BACKENDS {
        let x = Var::from_tensor(&t2(lp)).unwrap();
        let (old, mask) = (t2(old), t2(mask));
        let adv = Tensor::new(adv, &dev()).unwrap();
        let inputs = PolicyInputs::new(x.as_tensor(), &old, &adv, &mask);
        let out = loss.with_backend(backend).forward(&inputs).unwrap();
        let grad = f64s(out.loss.backward().unwrap().get(x.as_tensor()).unwrap());
        results.push((f64s(&out.loss)[0], grad, out.metrics.read().unwrap()));
    }
    let (a, b) = (&results[0], &results[1]);
    assert!(
        (a.0 - b.0).abs() < 1e-12,
        "fused {} vs composed {}",
        a.0,
        b.0
    );
    for (x, y) in a.1.iter().zip(&b.1) {
        assert!((x - y).abs() < 1e-12, "grad fused {x} vs composed {y}");
    }
    results.swap_remove(0)
}

fn close(got: f64, want: f64) {
    assert!((got - want).abs() < 1e-12, "got {got}, want {want}");
}

const LP: [f64; 3] = [-1.0, -0.5, -2.0];
const OLD: [f64; 3] = [-1.2, -0.5, -1.0];

#[test]
fn cispo_weighs_the_log_prob_by_the_clipped_detached_ratio() {
    // verl's bounds [0.8, 1.28], token-mean over 3 tokens, A = 2.
    let cfg = Cispo {
        clip: IsWeightClip::Bounds {
            eps_low: 0.2,
            eps_high: 0.28,
        },
    }
    .config();
    let (loss, grad, m) = run(cfg, &[&LP], &[&OLD], &[2.0], &[&[1.0, 1.0, 1.0]]);
    let w = [0.2f64.exp().min(1.28), 1.0, (-1.0f64).exp().max(0.8)];
    let want: f64 = (0..3).map(|k| -w[k] * 2.0 * LP[k]).sum::<f64>() / 3.0;
    close(loss, want);
    for k in 0..3 {
        close(grad[k], -w[k] * 2.0 / 3.0);
    }
    // ρ = e^{0.2} inside, 1 inside, e^{−1} below 0.8: one token clipped.
    close(m.clip_fraction().unwrap(), 1.0 / 3.0);
    // TRL's cap: min(ρ, 1.1) clips the first token, counted by clip_ratio (A > 0).
    let trl = Cispo {
        clip: IsWeightClip::RatioMax(1.1),
    }
    .config();
    let (_, grad, m) = run(trl, &[&LP], &[&OLD], &[2.0], &[&[1.0, 1.0, 1.0]]);
    close(grad[0], -1.1 * 2.0 / 3.0);
    close(grad[2], -(-1.0f64).exp() * 2.0 / 3.0);
    close(m.clip_ratio().unwrap(), 1.0 / 3.0);
}

#[test]
fn gpg_and_dro_are_policy_gradients_on_the_log_prob() {
    let mask: &[f64] = &[1.0, 1.0, 0.0];
    let (loss, grad, _) = run(Gpg.config(), &[&LP], &[&OLD], &[-1.5], &[mask]);
    close(loss, -(-1.5) * (LP[0] + LP[1]) / 2.0);
    assert_eq!(grad, vec![0.75, 0.75, 0.0]);
    let (loss, grad, m) = run(Dro { beta: 0.5 }.config(), &[&LP], &[&OLD], &[1.0], &[mask]);
    let d = [0.2, 0.0];
    close(loss, -((LP[0] - 0.25 * d[0] * d[0]) + (LP[1] - 0.0)) / 2.0);
    close(grad[0], -(1.0 - 0.5 * d[0]) / 2.0);
    close(grad[1], -0.5);
    close(m.approx_kl().unwrap(), -0.1);
}

#[test]
fn kl_cov_penalises_the_top_covariance_tokens_only() {
    // Two rows, A = (1, −1): c_j = (A_j − 0)(ℓ_j − mean ℓ); ratio 0.25 of 4 tokens → k = 1.
    let lp: [&[f64]; 2] = [&[-0.2, -3.0], &[-1.0, -0.4]];
    let old: [&[f64]; 2] = [&[-0.5, -3.0], &[-1.2, -0.4]];
    let cfg = KlCov {
        ratio: 0.25,
        coef: 2.0,
    }
    .config();
    let (loss, grad, m) = run(cfg, &lp, &old, &[1.0, -1.0], &[&[1.0, 1.0], &[1.0, 1.0]]);
    // mean ℓ = −1.15: c = (0.95, −1.85, 0.15, −0.75) → the first token.
    let rho = [0.3f64.exp(), 1.0, 0.2f64.exp(), 1.0];
    let a = [1.0, 1.0, -1.0, -1.0];
    let pg: f64 = (0..4).map(|j| -a[j] * rho[j]).sum();
    close(loss, (pg + 2.0 * 0.3) / 4.0);
    close(grad[0], (-rho[0] + 2.0) / 4.0);
    close(grad[2], rho[2] / 4.0);
    close(m.mean_abs_log_ratio().unwrap(), 0.5 / 4.0);
}

#[test]
fn dppo_masks_tokens_outside_the_binary_trust_region() {
    // TV, δ = 0.1, A = −1: valid iff p − p_old ≥ −0.1; p − p_old = (0.067, 0, −0.233).
    let cfg = Dppo::new(Divergence::BinaryTv, 0.1, 0.1, 3.0).config();
    let (loss, grad, m) = run(cfg, &[&LP], &[&OLD], &[-1.0], &[&[1.0, 1.0, 1.0]]);
    let rho = [0.2f64.exp(), 1.0, (-1.0f64).exp()];
    let valid = [1.0, 1.0, 0.0];
    let want: f64 = (0..3).map(|k| rho[k] * LP[k] * valid[k]).sum::<f64>() / 3.0;
    close(loss, want);
    for k in 0..3 {
        close(grad[k], rho[k] * valid[k] / 3.0);
    }
    close(m.clip_fraction().unwrap(), 1.0 / 3.0);
    close(m.truncated_fraction().unwrap(), 0.0);
    // The cap C truncates the detached weight: C = 1.1 < e^{0.2}.
    let cfg = Dppo::new(Divergence::BinaryTv, 0.1, 0.1, 1.1).config();
    let (_, grad, m) = run(cfg, &[&LP], &[&OLD], &[-1.0], &[&[1.0, 1.0, 1.0]]);
    close(grad[0], 1.1 / 3.0);
    close(m.truncated_fraction().unwrap(), 1.0 / 3.0);
}

#[test]
fn vespo_weighs_by_its_gamma_sequence_weight() {
    // u = Σ δ = 0.2 + 0 − 1 = −0.8; A ≥ 0 takes (k, λ) = (2, 3).
    let all: &[f64] = &[1.0, 1.0, 1.0];
    let (loss, grad, _) = run(Vespo::default().config(), &[&LP], &[&OLD], &[0.5], &[all]);
    let u: f64 = -0.8;
    let phi = (3.0 + 2.0 * u - 3.0 * u.exp()).exp();
    close(loss, -phi * 0.5 * (LP[0] + LP[1] + LP[2]) / 3.0);
    for g in grad {
        close(g, -phi * 0.5 / 3.0);
    }
    // φ(0) = 1: on-policy VESPO is the plain policy gradient.
    let (_, grad, _) = run(Vespo::default().config(), &[&LP], &[&LP], &[0.5], &[all]);
    for g in grad {
        close(g, -0.5 / 3.0);
    }
}

#[test]
fn vespo_adds_a_per_sequence_log_weight_once() {
    // TRL/Liger sum ln w over the weight tensor's last axis: a [B,1] weight counts once per row,
    // a [B,T] one once per token.
    let all: &[f64] = &[1.0, 1.0, 1.0];
    let (x, old, adv, mask) = (
        t2(&[&LP]),
        t2(&[&OLD]),
        Tensor::new(&[0.5f64], &dev()).unwrap(),
        t2(&[all]),
    );
    let phi = |u: f64| (3.0 + 2.0 * u - 3.0 * u.exp()).exp();
    let w_row = Tensor::new(&[[1.5f64]], &dev()).unwrap();
    let w_tok = t2(&[&[1.5, 1.5, 1.5]]);
    for backend in BACKENDS {
        for (w, u) in [
            (&w_row, -0.8 + 1.5f64.ln()),
            (&w_tok, -0.8 + 3.0 * 1.5f64.ln()),
        ] {
            let lp = Var::from_tensor(&x).unwrap();
            let inputs = PolicyInputs::new(lp.as_tensor(), &old, &adv, &mask).with_is_weights(w);
            let out = Vespo::default()
                .build()
                .unwrap()
                .with_backend(backend)
                .forward(&inputs)
                .unwrap();
            let g = f64s(out.loss.backward().unwrap().get(lp.as_tensor()).unwrap());
            for gk in g {
                assert!(
                    (gk + phi(u) * 0.5 / 3.0).abs() < 1e-12,
                    "{backend:?} {gk} vs φ({u})"
                );
            }
        }
    }
}

#[test]
fn gmpo_is_the_geometric_mean_of_sign_aware_clipped_ratios() {
    // Row 0 (A = 1): x = (0.2, 0, −1) clipped to ≤ 0.1 → y = (0.1, 0, −1); row 1 empty.
    let clip = GeometricClip {
        log_clip_low: 0.4,
        log_clip_high: 0.1,
    };
    let (loss, grad, m) = run(
        Gmpo { clip }.config(),
        &[&LP, &LP],
        &[&OLD, &OLD],
        &[1.0, 1.0],
        &[&[1.0, 1.0, 1.0], &[0.0, 0.0, 0.0]],
    );
    let s = ((0.1 + 0.0 - 1.0) / 3.0f64).exp();
    // (1/B)·(−Ā·S) with B = 2 rows (the empty one counts).
    close(loss, -s / 2.0);
    assert_eq!(grad[0], 0.0); // the clamp is active
    close(grad[1], -s / 3.0 / 2.0);
    close(grad[2], -s / 3.0 / 2.0); // x < −ε_low with A > 0 keeps the unclipped x
    close(m.clip_fraction_pos().unwrap(), 2.0 / 3.0);
    close(m.clip_fraction_neg().unwrap(), 0.0);
}

#[test]
fn entropy_bonus_reaches_the_entropy_and_the_logits() {
    let logits = Var::new(&[[[0.5f64, -1.0, 2.0], [0.0, 0.3, -0.2]]], &dev()).unwrap();
    let targets = Tensor::new(&[[2u32, 1]], &dev()).unwrap();
    let adv = Tensor::new(&[1.0f64], &dev()).unwrap();
    let mask = Tensor::new(&[[1.0f64, 1.0]], &dev()).unwrap();
    let bonus = EntropyBonus::new(0.1).with_aggregation(Aggregation::TokenSum);
    let loss = Grpo::default()
        .config()
        .with_entropy(Some(bonus))
        .build()
        .unwrap();
    let mut grads = vec![];
    for backend in BACKENDS {
        let (lp, h) =
            token_log_probs_and_entropy_with(logits.as_tensor(), &targets, 1.0, backend).unwrap();
        let old = lp.detach();
        let inputs = PolicyInputs::new(&lp, &old, &adv, &mask).with_entropy(&h);
        let out = loss.with_backend(backend).forward(&inputs).unwrap();
        // ρ = 1: loss = −mean A − 0.1·Σ H.
        let h_sum: f64 = f64s(&h).iter().sum();
        close(f64s(&out.loss)[0], -1.0 - 0.1 * h_sum);
        close(out.metrics.read().unwrap().entropy_loss.unwrap(), h_sum);
        grads.push(f64s(
            out.loss
                .backward()
                .unwrap()
                .get(logits.as_tensor())
                .unwrap(),
        ));
    }
    for (a, b) in grads[0].iter().zip(&grads[1]) {
        assert!((a - b).abs() < 1e-12);
    }
    // ∂loss/∂H = −c at every unmasked token, 0 where masked (NaN there never reaches it).
    let h = Var::new(&[[1.0f64, f64::NAN]], &dev()).unwrap();
    let lp = Tensor::new(&[[-1.0f64, -1.0]], &dev()).unwrap();
    let mask = Tensor::new(&[[1.0f64, 0.0]], &dev()).unwrap();
    for backend in BACKENDS {
        let inputs = PolicyInputs::new(&lp, &lp, &adv, &mask).with_entropy(h.as_tensor());
        let out = loss.with_backend(backend).forward(&inputs).unwrap();
        let g = f64s(out.loss.backward().unwrap().get(h.as_tensor()).unwrap());
        assert_eq!(g, vec![-0.1, 0.0]);
    }
}

#[test]
fn importance_weighted_kl_multiplies_k3_by_the_live_ratio() {
    let kl = KlPenalty::new(0.5, KlEstimator::K3)
        .with_clamp(false)
        .with_importance_weighting(true);
    let loss = Gpg.config().with_kl(Some(kl)).build().unwrap();
    for backend in BACKENDS {
        let x = Var::new(&[[-1.0f64]], &dev()).unwrap();
        let old = Tensor::new(&[[-1.2f64]], &dev()).unwrap();
        let rf = Tensor::new(&[[-0.7f64]], &dev()).unwrap();
        let adv = Tensor::new(&[0.0f64], &dev()).unwrap();
        let mask = Tensor::new(&[[1.0f64]], &dev()).unwrap();
        let inputs = PolicyInputs::new(x.as_tensor(), &old, &adv, &mask).with_ref_log_probs(&rf);
        let out = loss.with_backend(backend).forward(&inputs).unwrap();
        let (d, r) = (-0.3f64, 0.2f64.exp()); // d = ℓ − ℓref, R = e^{ℓ − ℓold}
        let k3 = (-d).exp() + d - 1.0;
        close(f64s(&out.loss)[0], 0.5 * k3 * r);
        close(out.metrics.read().unwrap().kl_mean().unwrap(), k3 * r);
        let g = f64s(out.loss.backward().unwrap().get(x.as_tensor()).unwrap())[0];
        close(g, 0.5 * (r * (1.0 - (-d).exp()) + k3 * r));
    }
}

#[test]
fn per_sequence_rollout_weights_equal_their_broadcast() {
    let x = t2(&[&LP, &[-0.3, -0.9, -1.1]]);
    let old = t2(&[&OLD, &[-0.4, -0.9, -1.0]]);
    let adv = Tensor::new(&[1.0f64, -0.5], &dev()).unwrap();
    let mask = t2(&[&[1.0, 1.0, 1.0], &[1.0, 1.0, 0.0]]);
    let w_row = Tensor::new(&[[0.7f64], [1.3]], &dev()).unwrap();
    let w_full = w_row.broadcast_as((2, 3)).unwrap().contiguous().unwrap();
    let losses = [
        Sapo::default().build().unwrap(),
        Gspo::default().build().unwrap(),
        Cispo::default().build().unwrap(),
        Gmpo::default().build().unwrap(),
    ];
    for loss in losses {
        for backend in BACKENDS {
            let run = |w: &Tensor| {
                let lp = Var::from_tensor(&x).unwrap();
                let inputs =
                    PolicyInputs::new(lp.as_tensor(), &old, &adv, &mask).with_is_weights(w);
                let out = loss.with_backend(backend).forward(&inputs).unwrap();
                let g = f64s(out.loss.backward().unwrap().get(lp.as_tensor()).unwrap());
                (f64s(&out.loss), g)
            };
            assert_eq!(run(&w_row), run(&w_full));
        }
    }
}

#[test]
fn bypass_mode_is_the_correction_then_the_loss_on_its_mask() {
    let x = t2(&[&LP, &[-0.3, -0.9, -1.1]]);
    let old = t2(&[&OLD, &[-0.4, -0.9, -1.0]]);
    let adv = Tensor::new(&[1.0f64, -0.5], &dev()).unwrap();
    let mask = t2(&[&[1.0, 1.0, 1.0], &[1.0, 1.0, 0.0]]);
    let correction = RolloutCorrection::new()
        .with_importance_weights(ImportanceWeights::new(
            WeightLevel::Token,
            WeightMode::Truncate { upper: 1.1 },
        ))
        .with_rejection(RejectionFilter::new(
            FilterStatistic::Token,
            FilterDivergence::K1,
            Some(0.5),
            2.0,
        ));
    let manual = rollout_correction(&x, &old, &mask, &correction).unwrap();
    // The k1 filter rejects the token with ℓ − ℓold = −1 (π_rollout/π_train = e > 2).
    assert_eq!(f64s(&manual.mask), vec![1.0, 1.0, 0.0, 1.0, 1.0, 0.0]);
    let clip = HardClip::new(0.2, 0.28).with_dual_clip(3.0);
    let cases = [
        (
            Bypass::reinforce(correction),
            Gpg.config(),
            manual.weights.clone(),
        ),
        (
            Bypass::ppo_clip(correction, clip),
            PolicyLossConfig::new(RatioLevel::Token, TrustRegion::HardClip(clip)),
            None,
        ),
    ];
    for (bypass, plain, weights) in cases {
        for backend in BACKENDS {
            let lp = Var::from_tensor(&x).unwrap();
            let inputs = PolicyInputs::new(lp.as_tensor(), &old, &adv, &mask);
            let out = bypass
                .build()
                .unwrap()
                .with_backend(backend)
                .forward(&inputs)
                .unwrap();
            let g = f64s(out.loss.backward().unwrap().get(lp.as_tensor()).unwrap());
            assert_eq!(out.rollout_correction.as_ref(), Some(&manual.metrics));
            let lp2 = Var::from_tensor(&x).unwrap();
            let mut inputs = PolicyInputs::new(lp2.as_tensor(), &old, &adv, &manual.mask);
            if let Some(w) = &weights {
                inputs = inputs.with_is_weights(w);
            }
            let want = plain
                .build()
                .unwrap()
                .with_backend(backend)
                .forward(&inputs)
                .unwrap();
            let gw = f64s(want.loss.backward().unwrap().get(lp2.as_tensor()).unwrap());
            assert_eq!(f64s(&out.loss), f64s(&want.loss));
            assert_eq!(g, gw);
        }
    }
    // Bypass mode computes its own weights: none from the caller.
    let w = mask.clone();
    let inputs = PolicyInputs::new(&x, &old, &adv, &mask).with_is_weights(&w);
    let err = Bypass::reinforce(correction)
        .build()
        .unwrap()
        .forward(&inputs)
        .unwrap_err();
    assert!(matches!(
        err,
        Error::InvalidValue {
            arg: "is_weights",
            ..
        }
    ));
}

#[test]
fn rollout_correction_hand_computed_weights_and_mask() {
    let trainer = t2(&[&[-1.0, -0.5, -2.0], &[-0.3, -1.2, -0.7]]);
    let engine = t2(&[&[-1.1, -0.4, -2.0], &[-0.3, -2.0, f64::NAN]]);
    let mask = t2(&[&[1.0, 1.0, 1.0], &[1.0, 1.0, 0.0]]);
    let rc = RolloutCorrection::new()
        .with_importance_weights(ImportanceWeights::new(
            WeightLevel::Sequence,
            WeightMode::Mask {
                lower: 0.5,
                upper: 2.0,
            },
        ))
        .with_rejection(RejectionFilter::new(
            FilterStatistic::Token,
            FilterDivergence::K2,
            None,
            0.1,
        ));
    let out = rollout_correction(&trainer, &engine, &mask, &rc).unwrap();
    // Row sums of d = ℓold − ℓroll: 0.1 − 0.1 + 0 = 0 → w = 1; 0 + 0.8 → e^{0.8} = 2.23 > 2 → 0.
    let w = f64s(&out.weights.unwrap());
    for (got, want) in w.iter().zip([1.0, 1.0, 1.0, 0.0, 0.0, 0.0]) {
        close(*got, want);
    }
    // k2 = ½d²: the token with d = 0.8 (k2 = 0.32) is rejected.
    assert_eq!(f64s(&out.mask), vec![1.0, 1.0, 1.0, 1.0, 0.0, 0.0]);
    close(
        out.metrics["rollout_rs_token_k2_masked_fraction"],
        1.0 / (5.0 + 1e-8),
    );
    close(out.metrics["rollout_is_seq_fraction_high"], 0.5);
    assert!(out.metrics.contains_key("rollout_is_oob_ratio"));
}

#[test]
fn rollout_correction_errors_are_typed() {
    let x = t2(&[&[-1.0, -0.5]]);
    let ones = t2(&[&[1.0, 1.0]]);
    let rc = RolloutCorrection::new();
    let err = |r: sapo::error::Result<RolloutCorrectionOutput>| r.unwrap_err();
    assert!(matches!(
        err(rollout_correction(&x, &x, &t2(&[&[0.0, 0.0]]), &rc)),
        Error::InvalidValue { arg: "mask", .. }
    ));
    assert!(matches!(
        err(rollout_correction(
            &x,
            &t2(&[&[f64::NAN, -0.5]]),
            &ones,
            &rc
        )),
        Error::InvalidValue {
            arg: "rollout_log_probs",
            ..
        }
    ));
    assert!(matches!(
        err(rollout_correction(&x, &t2(&[&[-1.0]]), &ones, &rc)),
        Error::Shape {
            arg: "rollout_log_probs",
            ..
        }
    ));
    assert!(matches!(
        err(rollout_correction(&x, &x, &t2(&[&[1.0, 2.0]]), &rc)),
        Error::InvalidValue { arg: "mask", .. }
    ));
    // IcePop rejecting every token: verl divides by zero, here a typed error.
    let icepop = rc.with_importance_weights(ImportanceWeights::new(
        WeightLevel::Token,
        WeightMode::Mask {
            lower: 0.5,
            upper: 2.0,
        },
    ));
    assert!(matches!(
        err(rollout_correction(
            &x,
            &t2(&[&[-5.0, -5.5]]),
            &ones,
            &icepop
        )),
        Error::InvalidValue {
            arg: "old_log_probs",
            ..
        }
    ));
}

#[test]
fn entropy_inputs_are_checked() {
    let x = t2(&[&LP]);
    let ones = x.ones_like().unwrap();
    let adv = Tensor::new(&[1.0f64], &dev()).unwrap();
    let with = Grpo::default()
        .config()
        .with_entropy(Some(EntropyBonus::new(0.01)))
        .build()
        .unwrap();
    let without = Grpo::default().build().unwrap();
    let bad = t2(&[&[1.0, f64::NAN, 1.0]]);
    let short = t2(&[&[1.0, 1.0]]);
    for backend in BACKENDS {
        let inputs = PolicyInputs::new(&x, &x, &adv, &ones);
        let arg = |r: sapo::error::Result<PolicyLossOutput>| match r.unwrap_err() {
            Error::InvalidValue { arg, .. } | Error::Shape { arg, .. } => arg,
            other => panic!("{other:?}"),
        };
        assert_eq!(arg(with.with_backend(backend).forward(&inputs)), "entropy");
        let loss = without.with_backend(backend);
        assert_eq!(arg(loss.forward(&inputs.with_entropy(&ones))), "entropy");
        let loss = with.with_backend(backend);
        assert_eq!(arg(loss.forward(&inputs.with_entropy(&bad))), "entropy");
        assert_eq!(arg(loss.forward(&inputs.with_entropy(&short))), "entropy");
    }
}

#[test]
fn adaptive_entropy_moves_toward_its_target_within_bounds() {
    let mut a = AdaptiveEntropy::new(0.998).unwrap();
    assert_eq!(a.update(0.1).unwrap(), 1.0); // below target, capped at max
    close(a.update(0.5).unwrap(), 0.995);
    assert!(a.update(f64::NAN).is_err());
    let mut restored = AdaptiveEntropy::new(a.coef).unwrap();
    assert_eq!(restored.update(0.5).unwrap(), a.update(0.5).unwrap());
    assert!(AdaptiveEntropy::new(-0.5).is_err());
}

fn invalid(config: PolicyLossConfig, name: &str) {
    match config.build() {
        Err(Error::InvalidConfig { name: got, .. }) => assert_eq!(got, name),
        other => panic!("{name}: expected InvalidConfig, got {other:?}"),
    }
}

#[test]
fn every_new_invalid_config_is_rejected_when_built() {
    let cispo = |clip| Cispo { clip }.config();
    let bounds = |eps_low, eps_high| IsWeightClip::Bounds { eps_low, eps_high };
    invalid(cispo(bounds(1.5, 0.2)), "eps_low");
    invalid(cispo(bounds(0.2, -0.1)), "eps_high");
    invalid(cispo(IsWeightClip::RatioMax(0.0)), "ratio_max");
    invalid(cispo(IsWeightClip::RatioMax(f64::INFINITY)), "ratio_max");
    invalid(Dro { beta: 0.0 }.config(), "dro_beta");
    invalid(
        KlCov {
            ratio: 0.0,
            coef: 1.0,
        }
        .config(),
        "kl_cov_ratio",
    );
    invalid(
        KlCov {
            ratio: 1.5,
            coef: 1.0,
        }
        .config(),
        "kl_cov_ratio",
    );
    invalid(
        KlCov {
            ratio: 0.1,
            coef: -1.0,
        }
        .config(),
        "kl_cov_coef",
    );
    let dppo = |low, high, cap| Dppo::new(Divergence::BinaryTv, low, high, cap).config();
    invalid(dppo(-0.1, 0.1, 3.0), "divergence_low");
    invalid(dppo(0.1, f64::NAN, 3.0), "divergence_high");
    invalid(dppo(0.1, 0.1, 0.0), "ratio_max");
    let vespo = Vespo::default();
    invalid(
        Vespo {
            k_neg: -1.0,
            ..vespo
        }
        .config(),
        "k_neg",
    );
    invalid(
        Vespo {
            lambda_pos: f64::NAN,
            ..vespo
        }
        .config(),
        "lambda_pos",
    );
    invalid(
        Vespo {
            log_w_max: -20.0,
            ..vespo
        }
        .config(),
        "log_w_max",
    );
    let gmpo = |log_clip_low, log_clip_high| {
        Gmpo {
            clip: GeometricClip {
                log_clip_low,
                log_clip_high,
            },
        }
        .config()
    };
    invalid(gmpo(-0.1, 0.4), "log_clip_low");
    invalid(gmpo(0.4, f64::INFINITY), "log_clip_high");
    // The per-token objectives have no sequence level.
    for cfg in [
        Gpg.config(),
        Dro { beta: 0.1 }.config(),
        KlCov::default().config(),
        Dppo::new(Divergence::BinaryKl, 0.05, 0.05, 3.0).config(),
        Vespo::default().config(),
    ] {
        invalid(cfg.with_ratio_level(RatioLevel::Sequence), "ratio_level");
    }
    let grpo = Grpo::default().config();
    invalid(
        grpo.with_entropy(Some(EntropyBonus::new(f64::NAN))),
        "entropy.coef",
    );
    let horizon = Aggregation::SeqMeanTokenSumNorm { horizon: Some(0) };
    invalid(
        grpo.with_entropy(Some(EntropyBonus::new(0.1).with_aggregation(horizon))),
        "horizon",
    );
    // Bypass: the loss must match the trust region, the correction's bounds must be valid.
    let rc = RolloutCorrection::new();
    let mismatched = Bypass {
        correction: rc,
        loss: BypassLoss::PpoClip,
    };
    invalid(Gpg.config().with_bypass(Some(mismatched)), "bypass.loss");
    let icepop = |lower, upper| {
        Bypass::reinforce(rc.with_importance_weights(ImportanceWeights::new(
            WeightLevel::Token,
            WeightMode::Mask { lower, upper },
        )))
    };
    invalid(icepop(2.5, 2.0), "importance_weights.lower");
    invalid(icepop(0.5, -1.0), "importance_weights.upper");
    let filter = |s, d, lower, upper| {
        Bypass::reinforce(rc.with_rejection(RejectionFilter::new(s, d, lower, upper)))
    };
    use FilterDivergence::{K1, K2, K3};
    use FilterStatistic::{SeqMax, SeqMean, SeqSum, Token};
    invalid(filter(Token, K1, None, 2.0), "rejection.lower");
    invalid(filter(Token, K1, Some(3.0), 2.0), "rejection.lower");
    invalid(filter(SeqMax, K1, Some(0.5), 2.0), "rejection.filter");
    invalid(filter(SeqSum, K2, Some(0.5), 2.0), "rejection.lower");
    invalid(filter(SeqMean, K3, None, 0.0), "rejection.upper");
    invalid(
        Bypass::reinforce(rc.with_log_ratio_clamp(-1.0)),
        "rollout_correction.log_ratio_clamp",
    );
    assert!(matches!(
        RejectionFilter::from_name("seq_median_k2", None, 0.1),
        Err(Error::InvalidConfig {
            name: "rejection.filter",
            ..
        })
    ));
}

#[test]
fn empty_batches_give_zero_for_every_new_objective() {
    let configs = [
        Cispo::default().config(),
        Gmpo::default().config(),
        Gpg.config(),
        Dro { beta: 0.1 }.config(),
        KlCov::default().config(),
        Dppo::new(Divergence::BinaryKl, 0.05, 0.05, 3.0).config(),
        Vespo::default().config(),
        Luspo::default().config(),
    ];
    for cfg in configs {
        let (loss, grad, _) = run(cfg, &[&LP], &[&OLD], &[1.0], &[&[0.0, 0.0, 0.0]]);
        assert_eq!(loss, 0.0, "{cfg:?}");
        assert_eq!(grad, vec![0.0; 3], "{cfg:?}");
    }
}

#[test]
fn entropy_bonus_from_hidden_states_uses_their_own_entropy() {
    let hidden = Var::new(
        &[
            [[0.3f64, -0.2], [0.1, 0.5], [-0.4, 0.2]],
            [[0.0, 0.1], [0.2, -0.3], [0.6, 0.1]],
        ],
        &dev(),
    )
    .unwrap();
    let weight = Var::new(
        &[[0.5f64, -0.1], [0.2, 0.3], [-0.4, 0.1], [0.1, 0.1]],
        &dev(),
    )
    .unwrap();
    let targets = Tensor::new(&[[0u32, 1, 2], [3, 2, 1]], &dev()).unwrap();
    let adv = Tensor::new(&[1.0f64, -0.5], &dev()).unwrap();
    let mask = t2(&[&[1.0, 1.0, 1.0], &[1.0, 1.0, 0.0]]);
    let (lp, h) =
        linear_log_probs_and_entropy(hidden.as_tensor(), weight.as_tensor(), None, &targets, 1.0)
            .unwrap();
    let old = (lp.detach() - 0.1).unwrap();
    let bonus = EntropyBonus::new(0.05).with_aggregation(Aggregation::SeqMeanTokenMean);
    let loss = Sapo::default()
        .config()
        .with_entropy(Some(bonus))
        .build()
        .unwrap();
    let two_step = loss
        .forward(&PolicyInputs::new(&lp, &old, &adv, &mask).with_entropy(&h))
        .unwrap();
    let head = LmHead::new(hidden.as_tensor(), weight.as_tensor(), &targets);
    let from_hidden = loss
        .forward_from_hidden(&PolicyInputs::new(head, &old, &adv, &mask))
        .unwrap();
    close(f64s(&from_hidden.loss)[0], f64s(&two_step.loss)[0]);
    let (g1, g2) = (
        two_step.loss.backward().unwrap(),
        from_hidden.loss.backward().unwrap(),
    );
    let (a, b) = (
        f64s(g1.get(weight.as_tensor()).unwrap()),
        f64s(g2.get(weight.as_tensor()).unwrap()),
    );
    for (x, y) in a.iter().zip(&b) {
        assert!((x - y).abs() < 1e-12);
    }
    // An entropy input is rejected there: the bonus takes the hidden states' own.
    let err = loss
        .forward_from_hidden(&PolicyInputs::new(head, &old, &adv, &mask).with_entropy(&h))
        .unwrap_err();
    assert!(matches!(err, Error::InvalidValue { arg: "entropy", .. }));
}
