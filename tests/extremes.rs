//! Every objective on every path (the fused CPU kernel, the composed ops and, under `gpu-sim`,
//! the simulated CUDA and Metal kernels) on one f32 batch of extreme inputs: log-ratios up to
//! ±80 without a clamp (and with verl's ±20), log-probs of exactly 0 (`p = 1`, a token the policy
//! is sure of) beside old log-probs a hair below 0, padding full of garbage. Each path's loss and
//! gradient are finite and equal the fused kernel's. A differential sweep of this kind found two
//! defects of the composed path, each pinned by its own test below: the softsign gate's autograd
//! at huge ratios, and DPPO's binary KL at `p = 1`; a wider one found a third on every path, the
//! importance-weighted unclamped k3's gradient at large `ℓref − ℓ`, pinned below too.

use candle_core::{DType, Device, Tensor, Var};
use sapo::{
    Divergence, Dppo, GateFunction, KlEstimator, KlPenalty, PolicyInputs, PolicyLossConfig,
    RatioLevel, Sapo,
};

mod common;
#[path = "common/objectives.rs"]
mod objectives;
#[path = "common/sim.rs"]
mod sim;

use common::f64s;
use objectives::objectives;

const B: usize = 5;
const T: usize = 6;

fn matrix(rows: [[f32; T]; B]) -> Tensor {
    Tensor::from_vec(rows.concat(), (B, T), &Device::Cpu).unwrap()
}

/// The batch and its rows' reward scores (TOPR's). Row 4 is padded after two tokens (NaN and
/// ±∞ there); row 3 holds the exact zeros.
fn batch() -> (Inputs, Tensor) {
    let nan = f32::NAN;
    let log_probs = matrix([
        [-80.0, 0.0, -0.5, -45.0, -1e-3, -3.0],
        [-1.0, -30.0, -0.2, 0.0, -5e-4, -2.0],
        [0.0, -60.0, -20.0, -0.7, -1e-4, -0.3],
        [0.0, 0.0, -5e-4, -1e-4, 0.0, -1.0],
        [-0.4, -0.9, nan, f32::INFINITY, nan, f32::NEG_INFINITY],
    ]);
    let old = matrix([
        [-0.1, -80.0, -0.5, -0.05, 0.0, -3.5],
        [-1.2, -0.3, -0.2, -1e-4, 0.0, -1.5],
        [-50.0, -0.1, -0.2, -0.7, 0.0, -0.3],
        [-1e-4, 0.0, 0.0, 0.0, -5e-4, -0.8],
        [-0.5, -0.9, 7.0, nan, -1.0, 3.0],
    ]);
    let advantages = Tensor::new(&[1.0f32, -1.0, 0.5, -0.5, 2.0], &Device::Cpu).unwrap();
    let mut mask = [[1u8; T]; B];
    mask[4] = [1, 1, 0, 0, 0, 0];
    let mask = Tensor::from_vec(mask.concat(), (B, T), &Device::Cpu).unwrap();
    let scores = Tensor::new(&[1.0f32, 0.0, 1.0, -1.0, 0.5], &Device::Cpu).unwrap();
    ((log_probs, old, advantages, mask), scores)
}

/// One batch: `(log_probs, old_log_probs, advantages, mask)`.
type Inputs = (Tensor, Tensor, Tensor, Tensor);

/// Loss and `∂loss/∂ℓ` of `config` on one path, with TOPR's `scores` and the KL's
/// `ref_log_probs` when given.
fn loss_and_gradient(
    config: &PolicyLossConfig,
    backend: sapo::Backend,
    (log_probs, old, advantages, mask): &Inputs,
    (scores, ref_log_probs): (Option<&Tensor>, Option<&Tensor>),
) -> (f64, Vec<f64>) {
    let log_probs = Var::from_tensor(log_probs).unwrap();
    let mut inputs = PolicyInputs::new(log_probs.as_tensor(), old, advantages, mask);
    if let Some(scores) = scores {
        inputs = inputs.with_scores(scores);
    }
    if let Some(reference) = ref_log_probs {
        inputs = inputs.with_ref_log_probs(reference);
    }
    let out = config
        .build()
        .unwrap()
        .with_backend(backend)
        .forward(&inputs)
        .unwrap();
    out.metrics.check().unwrap();
    let grads = out.loss.backward().unwrap();
    let grad = f64s(grads.get(log_probs.as_tensor()).unwrap());
    (f64s(&out.loss)[0], grad)
}

/// A `[rows, 1]` f32 tensor.
fn column(values: &[f32]) -> Tensor {
    Tensor::from_vec(values.to_vec(), (values.len(), 1), &Device::Cpu).unwrap()
}

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() <= 1e-4 * a.abs().max(b.abs()).max(1.0)
}

#[test]
fn every_objective_agrees_across_paths_at_extreme_inputs() {
    let (inputs, scores) = batch();
    for (name, config) in objectives() {
        for clamp in [None, Some(20.0)] {
            let config = config.with_log_ratio_clamp(clamp);
            let scores = Some(&scores).filter(|_| name.starts_with("topr"));
            let paths = sim::paths();
            let reference = loss_and_gradient(&config, paths[0].1, &inputs, (scores, None));
            for (path, backend, sim) in paths {
                let _gpu = sim.enter();
                let (loss, grad) = loss_and_gradient(&config, backend, &inputs, (scores, None));
                let what = format!("{name}, clamp {clamp:?}, {path}");
                assert!(
                    loss.is_finite() && close(loss, reference.0),
                    "{what}: loss {loss} vs the fused kernel's {}",
                    reference.0
                );
                for (j, (g, want)) in grad.iter().zip(&reference.1).enumerate() {
                    assert!(
                        g.is_finite() && close(*g, *want),
                        "{what}: gradient [{j}] {g} vs the fused kernel's {want}"
                    );
                }
                // Padding gets no gradient.
                for (j, g) in grad.iter().enumerate().skip(4 * T + 2) {
                    assert_eq!(*g, 0.0, "{what}: gradient at padding [{j}]");
                }
            }
        }
    }
}

/// SAPO's softsign gate at a log-ratio of 60 (no clamp): `f'(ρ)·ρ = ρ/(1 + |u|)² ≈ 0` on every
/// path. The composed path's autograd of `u/(1 + |u|)` once gave `≈ 1` (a gradient of `−A/n`):
/// `(1 + |u|)²` overflowed f32 and one of the two terms its derivative cancels vanished.
#[test]
fn softsign_gate_gradient_vanishes_at_huge_ratios_on_every_path() {
    let config = Sapo {
        gate: GateFunction::Softsign,
        ..Sapo::default()
    }
    .config()
    .with_log_ratio_clamp(None);
    // One row: a log-ratio of 60, then ρ = 1.
    let dev = Device::Cpu;
    let inputs = (
        Tensor::new(&[[60.0f32, 0.0]], &dev).unwrap(),
        Tensor::zeros((1, 2), DType::F32, &dev).unwrap(),
        Tensor::new(&[1.0f32], &dev).unwrap(),
        Tensor::ones((1, 2), DType::F32, &dev).unwrap(),
    );
    for (path, backend, sim) in sim::paths() {
        let _gpu = sim.enter();
        let (_, grad) = loss_and_gradient(&config, backend, &inputs, (None, None));
        // Token 0: ≈ 0. Token 1 (ρ = 1): −A·f'(1)·1/n = −1/2.
        assert!(grad[0].abs() < 1e-6, "{path}: {}", grad[0]);
        assert!((grad[1] + 0.5).abs() < 1e-6, "{path}: {}", grad[1]);
    }
}

/// DPPO's binary KL at `p = 1` (a log-prob of exactly 0) and at `p_old = 1`, in f32, on every
/// path: the divergence as verl writes it, `(1 − p_old)·ln((1 − p_old + 1e-8)/(1 − p + 1e-8))`,
/// keeps its guard (the composed path once added `1 + 1e-8` first, which rounds to 1 in f32,
/// and took `ln 0`: such tokens fell outside the trust region).
#[test]
fn dppo_binary_kl_at_log_probs_of_zero_on_every_path() {
    let (delta, cap) = (0.05, 10.0);
    let config = Dppo::new(Divergence::BinaryKl, delta, delta, cap).config();
    // (ℓ, ℓold, A): each inside the trust region by verl's formula in f64.
    let tokens = [
        (-5e-4f32, 0.0f32, -1.0f32),
        (0.0, -1e-4, 1.0),
        (0.0, 0.0, 1.0),
        (-0.3, -0.2, 1.0),
    ];
    let valid = |lp: f32, old: f32, a: f32| -> bool {
        let (lp, old) = (f64::from(lp), f64::from(old));
        let (p, p_old) = (lp.exp(), old.exp());
        let d = p_old * (old - lp) + (1.0 - p_old) * ((1.0 - p_old + 1e-8) / (1.0 - p + 1e-8)).ln();
        if a > 0.0 {
            d <= delta || p <= p_old
        } else {
            d <= delta || p >= p_old
        }
    };
    let n = tokens.len() as f64;
    let inputs = (
        column(&tokens.map(|t| t.0)),
        column(&tokens.map(|t| t.1)),
        Tensor::new(tokens.map(|t| t.2).as_slice(), &Device::Cpu).unwrap(),
        column(&[1.0; 4]),
    );
    for (path, backend, sim) in sim::paths() {
        let _gpu = sim.enter();
        let (_, grad) = loss_and_gradient(&config, backend, &inputs, (None, None));
        for (j, &(lp, old, a)) in tokens.iter().enumerate() {
            assert!(valid(lp, old, a), "token {j} is inside by the formula");
            // ∂l/∂ℓ = −A·min(ρ, C)·valid, token-mean over n tokens.
            let rho = (f64::from(lp) - f64::from(old)).exp().min(cap);
            let want = -f64::from(a) * rho / n;
            assert!(
                (grad[j] - want).abs() < 1e-6,
                "{path}: token {j}: gradient {} vs {want}",
                grad[j]
            );
        }
    }
}

/// The log-probs, reference log-probs and old log-probs of the two importance-weighted k3 tests
/// below: `d = ℓ − ℓref` from −60 to 0.5, log-ratios within ±0.5.
const K3_LOG_PROBS: [f32; 4] = [-60.5, -30.2, -15.1, -0.5];
const K3_REFERENCE: [f32; 4] = [-0.5, -0.2, -0.1, -1.0];
const K3_OLD: [f32; 4] = [-60.0, -30.0, -15.0, -0.6];

/// TRL's `use_bias_correction_kl`: k3 without verl's clamp, weighted by the ratio.
fn unclamped_weighted_k3(beta: f64) -> KlPenalty {
    KlPenalty::new(beta, KlEstimator::K3)
        .with_clamp(false)
        .with_importance_weighting(true)
}

/// The importance-weighted k3 without its clamp (TRL's `use_bias_correction_kl`) at
/// `d = ℓ − ℓref` far below 0, on every path: with zero advantages (no policy term), the loss is
/// `β·mean(k·R)` and its gradient at a token is `β·(R·k′ + Σ_s k_s·∂R_s/∂ℓ)/N`. At the token and
/// GSPO-token levels (`∂R/∂ℓ = c·R` on the token's own ℓ alone, `c = 0` where verl's ±20 clamp
/// holds the log-ratio) that is `β·R·((1 − c)·k′ + c·d)/N`: where `c = 1` the `e^{−d}` of
/// `k′ = 1 − e^{−d}` and of `k = e^{−d} + d − 1` cancel. Summed as two terms of size `R·e^{−d}`,
/// every path once lost it in f32 (0 at `d = −80`). At the sequence level (`∂R/∂ℓ_t = c_t·R/n`)
/// it is `β·R·(k′_t + c_t·Σ_s k_s/n)/N`, which cancels nothing large.
#[test]
fn importance_weighted_k3_gradient_at_large_log_ratios() {
    let dev = Device::Cpu;
    let (log_probs, ref_values) = (K3_LOG_PROBS, K3_REFERENCE);
    // The second: token 0's log-ratio −30.5, held at −20 by the clamp (c = 0).
    let olds = [K3_OLD, [-30.0, -30.0, -15.0, -0.6]];
    let row = |v: [f32; 4]| Tensor::new(&[v], &dev).unwrap();
    let reference = row(ref_values);
    let beta = 0.5;
    let kl = unclamped_weighted_k3(beta);
    let n = log_probs.len() as f64;
    let d: Vec<f64> = (0..4)
        .map(|j| f64::from(log_probs[j]) - f64::from(ref_values[j]))
        .collect();
    let k: Vec<f64> = d.iter().map(|d| (-d).exp() + d - 1.0).collect();
    let slope: Vec<f64> = d.iter().map(|d| 1.0 - (-d).exp()).collect();
    for old in olds {
        let inputs = (
            row(log_probs),
            row(old),
            Tensor::zeros(1, DType::F32, &dev).unwrap(),
            Tensor::ones((1, 4), DType::F32, &dev).unwrap(),
        );
        let raw: Vec<f64> = (0..4)
            .map(|j| f64::from(log_probs[j]) - f64::from(old[j]))
            .collect();
        let log_ratio: Vec<f64> = raw.iter().map(|x| x.clamp(-20.0, 20.0)).collect();
        let c: Vec<f64> = raw.iter().map(|x| f64::from(x.abs() < 20.0)).collect();
        let mean = log_ratio.iter().sum::<f64>() / n;
        for level in [
            RatioLevel::Token,
            RatioLevel::SequenceToken,
            RatioLevel::Sequence,
        ] {
            let config = Sapo::default()
                .config()
                .with_ratio_level(level)
                .with_kl(Some(kl));
            let ratio = |j: usize| match level {
                RatioLevel::Token => log_ratio[j].exp(),
                _ => mean.exp(),
            };
            let want_loss = beta * (0..4).map(|j| k[j] * ratio(j)).sum::<f64>() / n;
            let want = |j: usize| {
                beta / n
                    * ratio(j)
                    * match level {
                        RatioLevel::Token => (1.0 - c[j]) * slope[j] + c[j] * d[j],
                        RatioLevel::SequenceToken => d[j],
                        RatioLevel::Sequence => slope[j] + c[j] * k.iter().sum::<f64>() / n,
                    }
            };
            for (path, backend, sim) in sim::paths() {
                let _gpu = sim.enter();
                let (loss, grad) =
                    loss_and_gradient(&config, backend, &inputs, (None, Some(&reference)));
                let what = format!("{level:?}, old {old:?}, {path}");
                assert!(
                    (loss - want_loss).abs() <= 1e-5 * want_loss,
                    "{what}: loss {loss} vs {want_loss}"
                );
                for (j, &got) in grad.iter().enumerate() {
                    let want = want(j);
                    assert!(
                        (got - want).abs() <= 1e-4 * want.abs(),
                        "{what}: token {j} (d = {}): gradient {got} vs {want}",
                        d[j]
                    );
                }
            }
        }
    }
}

/// The same k3 through the lm_head ([`sapo::PolicyLoss::forward_from_hidden`]), on every path
/// (at the token level the CPU runs its fused lm_head sweep, whose KL slope is the kernels'):
/// one hidden unit, two vocabulary rows `W = [[0], [1]]` and target 0, so that
/// `ℓ = −softplus(h)` and `∂ℓ/∂h = −σ(h)`; the gradient at `h` is `β·R·d/N·(−σ(h))`.
#[test]
fn importance_weighted_k3_gradient_at_large_log_ratios_through_the_lm_head() {
    let dev = Device::Cpu;
    let hidden: Vec<f32> = K3_LOG_PROBS
        .iter()
        .map(|&l| ((-f64::from(l)).exp_m1()).ln() as f32)
        .collect();
    let log_probs: Vec<f64> = hidden
        .iter()
        .map(|&h| -(f64::from(h).exp().ln_1p()))
        .collect();
    let (ref_values, old) = (K3_REFERENCE, K3_OLD);
    let beta = 0.5;
    let kl = unclamped_weighted_k3(beta);
    let n = old.len() as f64;
    let weight = Tensor::new(&[[0.0f32], [1.0]], &dev).unwrap();
    let targets = Tensor::zeros((1, 4), DType::U32, &dev).unwrap();
    let (old_t, reference) = (
        Tensor::new(&[old], &dev).unwrap(),
        Tensor::new(&[ref_values], &dev).unwrap(),
    );
    let advantages = Tensor::zeros(1, DType::F32, &dev).unwrap();
    let mask = Tensor::ones((1, 4), DType::F32, &dev).unwrap();
    let config = Sapo::default().config().with_kl(Some(kl));
    for (path, backend, sim) in sim::paths() {
        let _gpu = sim.enter();
        let h =
            Var::from_tensor(&Tensor::from_vec(hidden.clone(), (1, 4, 1), &dev).unwrap()).unwrap();
        let head = sapo::LmHead::new(h.as_tensor(), &weight, &targets);
        let inputs =
            PolicyInputs::new(head, &old_t, &advantages, &mask).with_ref_log_probs(&reference);
        let out = config
            .build()
            .unwrap()
            .with_backend(backend)
            .forward_from_hidden(&inputs)
            .unwrap();
        let grad = f64s(out.loss.backward().unwrap().get(h.as_tensor()).unwrap());
        for j in 0..4 {
            let ratio = (log_probs[j] - f64::from(old[j])).exp();
            let d = log_probs[j] - f64::from(ref_values[j]);
            let sigmoid = 1.0 / (1.0 + (-f64::from(hidden[j])).exp());
            let want = beta * ratio * d / n * -sigmoid;
            assert!(
                (grad[j] - want).abs() <= 1e-3 * want.abs(),
                "{path}: token {j} (d = {d}): gradient {} vs {want}",
                grad[j]
            );
        }
    }
}
