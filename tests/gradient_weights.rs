//! `PolicyLoss::gradient_weights`: each token's gradient weight relative to on-policy, against
//! its closed forms (SAPO `ρ·4p(1−p)`, GRPO `ρ` or 0, GSPO one value a row), on every path the
//! loss runs on, with padding, zero advantages and a property over every preset.

use candle_core::{DType, Device, Tensor};
use proptest::prelude::*;
use sapo::{Cispo, GradientWeightSummary, Grpo, Gspo, PolicyInputs, PolicyLoss, Sapo};

#[path = "common/sim.rs"]
mod sim;
use sim::paths as backends;

struct Batch {
    log_probs: Tensor,
    old_log_probs: Tensor,
    advantages: Tensor,
    mask: Tensor,
}

impl Batch {
    fn new(log_probs: &[[f32; 3]], old: &[[f32; 3]], adv: &[f32], mask: &[[u8; 3]]) -> Batch {
        let dev = Device::Cpu;
        let b = adv.len();
        let matrix = |rows: &[[f32; 3]]| Tensor::from_vec(rows.concat(), (b, 3), &dev).unwrap();
        Batch {
            log_probs: matrix(log_probs),
            old_log_probs: matrix(old),
            advantages: Tensor::new(adv, &dev).unwrap(),
            mask: Tensor::from_vec(mask.concat(), (b, 3), &dev).unwrap(),
        }
    }
    fn inputs(&self) -> PolicyInputs<'_> {
        PolicyInputs::new(
            &self.log_probs,
            &self.old_log_probs,
            &self.advantages,
            &self.mask,
        )
    }
    fn ratio(&self, i: usize, t: usize) -> f64 {
        let lp = self.log_probs.to_vec2::<f32>().unwrap();
        let old = self.old_log_probs.to_vec2::<f32>().unwrap();
        (lp[i][t] as f64 - old[i][t] as f64).exp()
    }
}

/// Two rows, the second padded at its end with garbage; one zero advantage in a third row.
fn batch() -> Batch {
    Batch::new(
        &[
            [-1.0, -0.2, -2.5],
            [-0.7, -1.9, f32::NAN],
            [-0.4, -0.4, -0.4],
        ],
        &[[-1.0, -1.0, -2.0], [-0.5, -0.6, 7.0], [-0.3, -0.9, -0.4]],
        &[1.0, -0.5, 0.0],
        &[[1, 1, 1], [1, 1, 0], [1, 1, 1]],
    )
}

fn weights(loss: &PolicyLoss, batch: &Batch) -> (Vec<Vec<f32>>, Vec<Vec<f32>>) {
    let w = loss.gradient_weights(&batch.inputs()).unwrap();
    (
        w.relative.to_vec2::<f32>().unwrap(),
        w.defined.to_vec2::<f32>().unwrap(),
    )
}

fn close(what: &str, got: f32, want: f64) {
    assert!(
        (got as f64 - want).abs() <= 1e-5 * want.abs().max(1.0),
        "{what}: got {got}, want {want}"
    );
}

#[test]
fn sapo_weights_are_rho_times_the_gate_weight() {
    let batch = batch();
    for (name, backend, sim) in backends() {
        let _gpu = sim.enter();
        let loss = Sapo::default().build().unwrap().with_backend(backend);
        let (relative, defined) = weights(&loss, &batch);
        for (i, t) in [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1)] {
            let rho = batch.ratio(i, t);
            let tau = if i == 0 { 1.0 } else { 1.05 };
            let p = 1.0 / (1.0 + (-tau * (rho - 1.0)).exp());
            close(
                &format!("{name} [{i},{t}]"),
                relative[i][t],
                rho * 4.0 * p * (1.0 - p),
            );
            assert_eq!(defined[i][t], 1.0, "{name} [{i},{t}]");
        }
        // Padding and a zero advantage: no on-policy gradient, so no weight.
        assert_eq!((relative[1][2], defined[1][2]), (0.0, 0.0), "{name}");
        assert_eq!(defined[2], [0.0; 3], "{name}");
        assert_eq!(relative[2], [0.0; 3], "{name}");
    }
}

#[test]
fn grpo_weights_are_rho_inside_the_clip_and_zero_where_it_holds() {
    let batch = batch();
    for (name, backend, sim) in backends() {
        let _gpu = sim.enter();
        let loss = Grpo::default().build().unwrap().with_backend(backend);
        let (relative, _) = weights(&loss, &batch);
        // Row 0 (A > 0): ρ = 1 → 1; ρ = e^0.8 > 1.2 → clipped; ρ = e^-0.5 < 0.8 with A > 0 → ρ.
        close(name, relative[0][0], 1.0);
        assert_eq!(relative[0][1], 0.0, "{name}");
        close(name, relative[0][2], batch.ratio(0, 2));
        // Row 1 (A < 0): ρ = e^-0.2 inside → ρ; ρ = e^-1.3 < 0.8 → clipped.
        close(name, relative[1][0], batch.ratio(1, 0));
        assert_eq!(relative[1][1], 0.0, "{name}");
        let summary = loss
            .gradient_weights(&batch.inputs())
            .unwrap()
            .summary()
            .unwrap();
        let want = GradientWeightSummary {
            tokens: 5,
            sequences: 2,
            mean_weight: (1.0 + batch.ratio(0, 2) + batch.ratio(1, 0)) / 5.0,
            active_token_share: 3.0 / 5.0,
            silenced_token_share: 2.0 / 5.0,
            silenced_sequence_share: 0.0,
        };
        assert!(
            (summary.mean_weight - want.mean_weight).abs() < 1e-6,
            "{name}: {summary:?}"
        );
        assert_eq!(
            GradientWeightSummary {
                mean_weight: want.mean_weight,
                ..summary
            },
            want,
            "{name}"
        );
    }
}

#[test]
fn gspo_gives_one_weight_to_a_whole_row_and_silences_rows_outside_its_clip() {
    // Row 0: s = 1 exactly (log-ratios cancel) → every token 1. Row 1: one off-policy token moves
    // the sequence ratio far outside ε = 3e-4 → the whole row gets nothing.
    let batch = Batch::new(
        &[[-1.0, -0.5, -1.5], [-0.7, -0.1, -0.5]],
        &[[-1.0, -1.0, -1.0], [-0.7, -0.6, -0.5]],
        &[1.0, 1.0],
        &[[1, 1, 1], [1, 1, 1]],
    );
    for (name, backend, sim) in backends() {
        let _gpu = sim.enter();
        let loss = Gspo::default().build().unwrap().with_backend(backend);
        let w = loss.gradient_weights(&batch.inputs()).unwrap();
        let relative = w.relative.to_vec2::<f32>().unwrap();
        for (t, (kept, silenced)) in relative[0].iter().zip(&relative[1]).enumerate() {
            close(name, *kept, 1.0);
            assert_eq!(*silenced, 0.0, "{name} [1,{t}]");
        }
        let summary = w.summary().unwrap();
        assert_eq!(summary.silenced_sequence_share, 0.5, "{name}");
        assert_eq!(summary.active_token_share, 0.5, "{name}");
        // SAPO on the same batch down-weights only the off-policy token of row 1 (ρ = e^0.5
        // keeps ρ·4p(1−p) ≈ 1.49 at τ = 1), and no row is silenced.
        let sapo = Sapo::default().build().unwrap().with_backend(backend);
        let summary = sapo
            .gradient_weights(&batch.inputs())
            .unwrap()
            .summary()
            .unwrap();
        assert_eq!(summary.silenced_sequence_share, 0.0, "{name}");
        assert_eq!(summary.active_token_share, 1.0, "{name}");
    }
}

#[test]
fn tracked_inputs_are_detached_and_errors_are_the_forwards() {
    let batch = batch();
    let loss = Cispo::default().build().unwrap();
    // A tracked log-probs tensor: the diagnostic differentiates detached copies only.
    let var = candle_core::Var::from_tensor(&batch.log_probs).unwrap();
    let tracked = (var.as_tensor() * 1.0).unwrap();
    let inputs = PolicyInputs::new(
        &tracked,
        &batch.old_log_probs,
        &batch.advantages,
        &batch.mask,
    );
    loss.gradient_weights(&inputs).unwrap();
    // A shape the forward rejects is rejected here with the forward's error.
    let short = Tensor::zeros((3, 2), DType::F32, &Device::Cpu).unwrap();
    let bad = PolicyInputs::new(&short, &batch.old_log_probs, &batch.advantages, &batch.mask);
    let err = loss.gradient_weights(&bad).unwrap_err();
    assert!(err.to_string().contains("log_probs"), "{err}");
}

fn presets() -> Vec<(&'static str, PolicyLoss)> {
    vec![
        ("sapo", Sapo::default().build().unwrap()),
        ("gspo", Gspo::default().build().unwrap()),
        ("grpo", Grpo::default().build().unwrap()),
        ("cispo", Cispo::default().build().unwrap()),
        ("gmpo", sapo::Gmpo::default().build().unwrap()),
        ("vespo", sapo::Vespo::default().build().unwrap()),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]

    /// On-policy (`ℓ = ℓold`) every token with a learning signal keeps its whole weight, for every
    /// objective and path; a token is defined exactly when it is unmasked with `A ≠ 0`.
    #[test]
    fn on_policy_every_weight_is_one(
        old in prop::collection::vec(-6.0f32..-0.01, 12),
        adv in prop::collection::vec(prop_oneof![Just(0.0f32), -2.0f32..2.0], 3),
        mask in prop::collection::vec(prop::bool::weighted(0.8), 12),
    ) {
        let dev = Device::Cpu;
        let old = Tensor::from_vec(old, (3, 4), &dev).unwrap();
        let adv_t = Tensor::from_vec(adv.clone(), 3, &dev).unwrap();
        let mask_u8: Vec<u8> = mask.iter().map(|&m| m as u8).collect();
        let mask_t = Tensor::from_vec(mask_u8, (3, 4), &dev).unwrap();
        let inputs = PolicyInputs::new(&old, &old, &adv_t, &mask_t);
        for (name, preset) in presets() {
            for (path, backend, sim) in backends() {
 let _gpu = sim.enter();
                let w = preset.with_backend(backend).gradient_weights(&inputs).unwrap();
                let relative = w.relative.to_vec2::<f32>().unwrap();
                let defined = w.defined.to_vec2::<f32>().unwrap();
                for i in 0..3 {
                    for t in 0..4 {
                        let signal = mask[i * 4 + t] && adv[i].abs() > 1e-3;
                        if signal {
                            prop_assert_eq!(defined[i][t], 1.0, "{} {} [{},{}]", name, path, i, t);
                            prop_assert!((relative[i][t] - 1.0).abs() < 1e-5,
                                "{} {} [{},{}]: {}", name, path, i, t, relative[i][t]);
                        } else if !mask[i * 4 + t] || adv[i] == 0.0 {
                            prop_assert_eq!(defined[i][t], 0.0, "{} {} [{},{}]", name, path, i, t);
                        }
                    }
                }
                let summary = w.summary().unwrap();
                if summary.tokens > 0 {
                    prop_assert_eq!(summary.active_token_share, 1.0, "{} {}", name, path);
                    prop_assert_eq!(summary.silenced_sequence_share, 0.0, "{} {}", name, path);
                }
            }
        }
    }
}
