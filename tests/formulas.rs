//! Each formula against values computed by hand.

use approx::assert_relative_eq;
use candle_core::{DType, Device, Tensor, Var};
use sapo::{
    Aggregation, Grpo, Gspo, KlEstimator, KlPenalty, PolicyInputs, PolicyLoss, RatioLevel, Sapo,
};

fn dev() -> Device {
    Device::Cpu
}

/// One row of tokens with the given log-ratios (old log-probs −1), advantages per token.
fn run(loss: &PolicyLoss, log_ratios: &[f64], adv: &[f64]) -> (f64, Vec<f64>, sapo::MetricSums) {
    let t = log_ratios.len();
    let old = Tensor::from_vec(vec![-1.0f64; t], (1, t), &dev()).unwrap();
    let lp = Var::from_tensor(
        &(&old + Tensor::from_vec(log_ratios.to_vec(), (1, t), &dev()).unwrap()).unwrap(),
    )
    .unwrap();
    let adv = Tensor::from_vec(adv.to_vec(), (1, t), &dev()).unwrap();
    let mask = Tensor::ones((1, t), DType::U8, &dev()).unwrap();
    let out = loss
        .forward(&PolicyInputs::new(lp.as_tensor(), &old, &adv, &mask))
        .unwrap();
    let g = out.loss.backward().unwrap();
    let grad = g
        .get(lp.as_tensor())
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f64>()
        .unwrap();
    (
        out.loss.to_scalar::<f64>().unwrap(),
        grad,
        out.metrics.read().unwrap(),
    )
}

#[test]
fn sapo_on_policy_is_the_plain_policy_gradient() {
    // ρ = 1: f = σ(0)·4/τ = 2/τ; gradient weight 1, so ∂l/∂ℓ = −A.
    let loss = Sapo::default().build().unwrap();
    let (v, g, m) = run(&loss, &[0.0, 0.0], &[2.0, -1.0]);
    // token mean of (−2·2, +1·2/1.05)
    assert_relative_eq!(v, (-4.0 + 2.0 / 1.05) / 2.0, max_relative = 1e-12);
    assert_relative_eq!(g[0], -2.0 / 2.0, max_relative = 1e-12);
    assert_relative_eq!(g[1], 1.0 / 2.0, max_relative = 1e-12);
    assert_relative_eq!(m.gate_weight_mean().unwrap(), 1.0, max_relative = 1e-12);
}

#[test]
fn sapo_off_policy_token_is_softly_damped() {
    // ρ = e^0.5, A = 1, τ = 1: l = −σ(ρ−1)·4, ∂l/∂ℓ = −4σ(x)σ(−x)·ρ.
    let loss = Sapo::default().build().unwrap();
    let rho = 0.5f64.exp();
    let p = 1.0 / (1.0 + (-(rho - 1.0)).exp());
    let (v, g, _) = run(&loss, &[0.5], &[1.0]);
    assert_relative_eq!(v, -4.0 * p, max_relative = 1e-12);
    assert_relative_eq!(g[0], -4.0 * p * (1.0 - p) * rho, max_relative = 1e-12);
}

#[test]
fn grpo_clip_and_dual_clip() {
    let rho = 1.5f64.ln();
    let grpo = Grpo::default().build().unwrap();
    // A = 1, ρ = 1.5 > 1.2: clipped, l = −1.2, no gradient.
    let (v, g, m) = run(&grpo, &[rho], &[1.0]);
    assert_relative_eq!(v, -1.2, max_relative = 1e-12);
    assert_eq!(g[0], 0.0);
    assert_eq!(m.clip_fraction(), Some(1.0));
    assert_eq!(m.clip_ratio_high(), Some(1.0));
    // A = −1, ρ = 1.5: unclipped term wins, l = 1.5, ∂l/∂ℓ = −A·ρ = 1.5.
    let (v, g, m) = run(&grpo, &[rho], &[-1.0]);
    assert_relative_eq!(v, 1.5, max_relative = 1e-12);
    assert_relative_eq!(g[0], 1.5, max_relative = 1e-12);
    assert_eq!(m.clip_fraction(), Some(0.0));
    // Dual clip c = 1.4 caps it at −c·A = 1.4.
    let dual = Grpo {
        dual_clip: Some(1.4),
        ..Grpo::default()
    }
    .build()
    .unwrap();
    let (v, g, m) = run(&dual, &[rho], &[-1.0]);
    assert_relative_eq!(v, 1.4, max_relative = 1e-12);
    assert_eq!(g[0], 0.0);
    assert_eq!(m.dual_clip_fraction(), Some(1.0));
}

#[test]
fn grpo_two_sided_delta() {
    // ρ = 3 with A = 1 and δ = 2: l = −min(min(3, 2)·1, 1.2·1) ... = max(−2, −1.2) = −1.2
    // With A = −1: l = max(2, 0.8) = 2 (δ caps the unclipped term), no gradient.
    let loss = Grpo {
        delta: Some(2.0),
        ..Grpo::default()
    }
    .build()
    .unwrap();
    let (v, g, _) = run(&loss, &[3f64.ln()], &[-1.0]);
    assert_relative_eq!(v, 2.0, max_relative = 1e-12);
    assert_eq!(g[0], 0.0);
}

#[test]
fn gspo_sequence_ratio() {
    // δ = (0.1, 0.3): s = e^0.2; ε = 0.3/0.3 keeps it unclipped; A = 1.
    // l = −s; ∂l/∂ℓ_t = −A·s/n.
    let loss = Gspo {
        eps_low: 0.3,
        eps_high: 0.3,
    }
    .build()
    .unwrap();
    let s = 0.2f64.exp();
    let (v, g, m) = run(&loss, &[0.1, 0.3], &[1.0, 1.0]);
    assert_relative_eq!(v, -s, max_relative = 1e-12);
    assert_relative_eq!(g[0], -s / 2.0, max_relative = 1e-12);
    assert_relative_eq!(g[1], -s / 2.0, max_relative = 1e-12);
    assert_relative_eq!(m.ratio_mean().unwrap(), s, max_relative = 1e-12);
    // Default ε 3e-4/4e-4: s = e^0.2 is clipped, the whole sequence gets no gradient.
    let (_, g, m) = run(&Gspo::default().build().unwrap(), &[0.1, 0.3], &[1.0, 1.0]);
    assert_eq!(g, vec![0.0, 0.0]);
    assert_eq!(m.clip_fraction(), Some(1.0));
}

#[test]
fn gspo_token_gradient_stays_on_its_token() {
    // GSPO-token: ∂l_t/∂ℓ_t = −A_t·s, each token with its own advantage.
    let loss = Gspo {
        eps_low: 0.5,
        eps_high: 0.5,
    }
    .config()
    .with_ratio_level(RatioLevel::SequenceToken)
    .with_aggregation(Aggregation::TokenSum)
    .build()
    .unwrap();
    let s = 0.2f64.exp();
    let (v, g, _) = run(&loss, &[0.1, 0.3], &[1.0, -2.0]);
    assert_relative_eq!(v, -s + 2.0 * s, max_relative = 1e-12);
    assert_relative_eq!(g[0], -s, max_relative = 1e-12);
    assert_relative_eq!(g[1], 2.0 * s, max_relative = 1e-12);
}

#[test]
fn log_ratio_clamp_caps_the_ratio() {
    let loss = Grpo::default()
        .config()
        .with_log_ratio_clamp(Some(1.0))
        .build()
        .unwrap();
    let (v, g, m) = run(&loss, &[5.0], &[-1.0]);
    assert_relative_eq!(v, 1f64.exp(), max_relative = 1e-12);
    assert_eq!(g[0], 0.0);
    assert_relative_eq!(m.approx_kl().unwrap(), -1.0, max_relative = 1e-12);
}

#[test]
fn kl_estimators() {
    // d = ℓ − ℓref = 0.5
    let lp = Var::new(&[[-1.0f64]], &dev()).unwrap();
    let rf = Tensor::new(&[[-1.5f64]], &dev()).unwrap();
    let want = [
        (KlEstimator::K1, 0.5, 1.0),
        (KlEstimator::Abs, 0.5, 1.0),
        (KlEstimator::K2, 0.125, 0.5),
        (
            KlEstimator::K3,
            (-0.5f64).exp() + 0.5 - 1.0,
            1.0 - (-0.5f64).exp(),
        ),
        (KlEstimator::K3Plus, (-0.5f64).exp() + 0.5 - 1.0, 0.5),
    ];
    for (est, value, grad) in want {
        let k = sapo::kl_penalty(lp.as_tensor(), &rf, est, true).unwrap();
        assert_relative_eq!(
            k.to_vec2::<f64>().unwrap()[0][0],
            value,
            max_relative = 1e-12
        );
        let g = k.sum_all().unwrap().backward().unwrap();
        let g = g.get(lp.as_tensor()).unwrap().to_vec2::<f64>().unwrap()[0][0];
        assert_relative_eq!(g, grad, max_relative = 1e-12);
    }
    // verl's clamp: k3 of a huge gap is capped at 10 (no gradient), TRL's is not.
    let far = Tensor::new(&[[-40.0f64]], &dev()).unwrap();
    let near = Tensor::new(&[[-1.0f64]], &dev()).unwrap();
    let clamped = sapo::kl_penalty(&near, &far, KlEstimator::K3, true).unwrap();
    assert_eq!(clamped.to_vec2::<f64>().unwrap()[0][0], 10.0);
    let raw = sapo::kl_penalty(&near, &far, KlEstimator::K3, false).unwrap();
    assert_relative_eq!(
        raw.to_vec2::<f64>().unwrap()[0][0],
        (-39f64).exp() + 39.0 - 1.0
    );
}

#[test]
fn kl_penalty_is_added_with_its_own_aggregation() {
    // Two rows of lengths 1 and 3, KL k1 with token-sum: β·Σ d.
    let lp = Var::new(&[[-1.0f64, 0.0, 0.0], [-1.0, -1.0, -1.0]], &dev()).unwrap();
    let rf = Tensor::new(&[[-2.0f64, 0.0, 0.0], [-1.5, -1.5, -1.5]], &dev()).unwrap();
    let adv = Tensor::new(&[0.0f64, 0.0], &dev()).unwrap();
    let mask = Tensor::new(&[[1u8, 0, 0], [1, 1, 1]], &dev()).unwrap();
    let kl = KlPenalty::new(0.1, KlEstimator::K1).with_aggregation(Aggregation::TokenSum);
    let loss = Sapo::default().config().with_kl(Some(kl)).build().unwrap();
    let out = loss
        .forward(
            &PolicyInputs::new(lp.as_tensor(), lp.as_tensor(), &adv, &mask).with_ref_log_probs(&rf),
        )
        .unwrap();
    assert_relative_eq!(
        out.loss.to_scalar::<f64>().unwrap(),
        0.1 * (1.0 + 1.5),
        max_relative = 1e-12
    );
    assert_relative_eq!(
        out.metrics.read().unwrap().kl_mean().unwrap(),
        2.5 / 4.0,
        max_relative = 1e-12
    );
}

#[test]
fn aggregation_modes_by_hand() {
    // L = [[1, 2, 3], [4, ·, ·]] with row lengths 3 and 1, T = 3.
    let l = Tensor::new(&[[1.0f64, 2., 3.], [4., 99., 99.]], &dev()).unwrap();
    let m = Tensor::new(&[[1.0f64, 1., 1.], [1., 0., 0.]], &dev()).unwrap();
    let norm = sapo::Normalizer::default();
    let cases = [
        (Aggregation::TokenMean, 10.0 / 4.0),
        (Aggregation::TokenSum, 10.0),
        (Aggregation::SeqMeanTokenMean, (2.0 + 4.0) / 2.0),
        (Aggregation::SeqMeanTokenSum, 10.0 / 2.0),
        (
            Aggregation::SeqMeanTokenSumNorm { horizon: None },
            10.0 / 2.0 / 3.0,
        ),
        (
            Aggregation::SeqMeanTokenSumNorm { horizon: Some(8) },
            10.0 / 2.0 / 8.0,
        ),
    ];
    for (agg, want) in cases {
        let got = sapo::aggregate(&l, &m, agg, &norm)
            .unwrap()
            .to_scalar::<f64>()
            .unwrap();
        assert_relative_eq!(got, want, max_relative = 1e-12);
    }
    // Global normalizer: this shard's sum over 8 global tokens, times world size 2.
    let norm = sapo::Normalizer::default()
        .with_global_tokens(8.0)
        .with_world_size(2);
    let got = sapo::aggregate(&l, &m, Aggregation::TokenMean, &norm).unwrap();
    assert_relative_eq!(
        got.to_scalar::<f64>().unwrap(),
        2.0 * 10.0 / 8.0,
        max_relative = 1e-12
    );
}

#[test]
fn rollout_weights_scale_the_policy_term() {
    let lp = Var::new(&[[-1.0f64, -1.0]], &dev()).unwrap();
    let adv = Tensor::new(&[1.0f64], &dev()).unwrap();
    let mask = Tensor::new(&[[1u8, 1]], &dev()).unwrap();
    let old = Tensor::new(&[[-1.0f64, -1.0]], &dev()).unwrap();
    let w = Tensor::new(&[[0.5f64, 2.0]], &dev()).unwrap();
    let loss = Grpo::default()
        .config()
        .with_aggregation(Aggregation::TokenSum)
        .build()
        .unwrap();
    let out = loss
        .forward(&PolicyInputs::new(lp.as_tensor(), &old, &adv, &mask).with_is_weights(&w))
        .unwrap();
    assert_relative_eq!(
        out.loss.to_scalar::<f64>().unwrap(),
        -2.5,
        max_relative = 1e-12
    );
    let g = out.loss.backward().unwrap();
    let g = g.get(lp.as_tensor()).unwrap().to_vec2::<f64>().unwrap();
    assert_eq!(g, vec![vec![-0.5, -2.0]]);
}

#[test]
fn half_precision_inputs_are_computed_in_f32_and_get_gradients() {
    for dtype in [DType::BF16, DType::F16] {
        let lp = Var::from_tensor(
            &Tensor::new(&[[-1.0f32, -0.5]], &dev())
                .unwrap()
                .to_dtype(dtype)
                .unwrap(),
        )
        .unwrap();
        let old = Tensor::new(&[[-1.1f32, -0.5]], &dev())
            .unwrap()
            .to_dtype(dtype)
            .unwrap();
        let adv = Tensor::new(&[1.0f32], &dev())
            .unwrap()
            .to_dtype(dtype)
            .unwrap();
        let mask = Tensor::new(&[[1u8, 1]], &dev()).unwrap();
        let out = Sapo::default()
            .build()
            .unwrap()
            .forward(&PolicyInputs::new(lp.as_tensor(), &old, &adv, &mask))
            .unwrap();
        assert_eq!(out.loss.dtype(), DType::F32);
        let g = out.loss.backward().unwrap();
        let g = g.get(lp.as_tensor()).unwrap();
        assert_eq!(g.dtype(), dtype);
        assert!(
            g.to_dtype(DType::F32)
                .unwrap()
                .abs()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap()
                > 0.0
        );
    }
}

#[test]
fn token_log_probs_and_entropy_by_hand() {
    // logits (0, ln 3) at τ = 1: p = (1/4, 3/4).
    let logits = Var::new(&[[0.0f64, 3f64.ln()]], &dev()).unwrap();
    let targets = Tensor::new(&[1u32], &dev()).unwrap();
    let (lp, h) = sapo::token_log_probs_and_entropy(logits.as_tensor(), &targets, 1.0).unwrap();
    assert_relative_eq!(
        lp.to_vec1::<f64>().unwrap()[0],
        0.75f64.ln(),
        max_relative = 1e-12
    );
    let want_h = -(0.25 * 0.25f64.ln() + 0.75 * 0.75f64.ln());
    assert_relative_eq!(h.to_vec1::<f64>().unwrap()[0], want_h, max_relative = 1e-12);
    // ∂ℓ/∂logits = 1[v=y] − p
    let g = lp.sum_all().unwrap().backward().unwrap();
    let g = g.get(logits.as_tensor()).unwrap().to_vec2::<f64>().unwrap();
    assert_relative_eq!(g[0][0], -0.25, max_relative = 1e-12);
    assert_relative_eq!(g[0][1], 0.25, max_relative = 1e-12);
    // Temperature 2 halves the logits.
    let lp2 = sapo::token_log_probs(logits.as_tensor(), &targets, 2.0).unwrap();
    let z = 3f64.ln() / 2.0;
    assert_relative_eq!(
        lp2.to_vec1::<f64>().unwrap()[0],
        z - (1.0 + z.exp()).ln(),
        max_relative = 1e-12
    );
}
