//! A differential sweep: random settings of every objective (aggregation, KL estimator with its
//! clamp and importance weighting and its own aggregation, entropy bonus, the three masks,
//! rollout weights, the data-parallel normalizer, verl's ±20 clamp or none) on one padded f32
//! batch (a padded row, an empty row, NaN and ±∞ in the padding), each run on every path: the
//! fused CPU kernel, the composed ops and, under `gpu-sim`, the simulated CUDA and Metal
//! kernels. Every path must give the fused kernel's loss, gradient and metric sums, or the same
//! error. Two batches: log-ratios within ±0.6 (near on-policy) and within ±7.
//!
//! `SAPO_SWEEP_PER` settings per objective and batch (default 3, what CI runs; the README's
//! Correctness reports a run of 40 and 25).

use candle_core::{Device, Tensor, Var};
use sapo::{
    Aggregation, EntropyBonus, KlEstimator, KlPenalty, Normalizer, PolicyInputs, PolicyLossConfig,
    PolicyMasks,
};

mod common;
#[path = "common/objectives.rs"]
mod objectives;
#[path = "common/sim.rs"]
mod sim;

use common::f64s;
use objectives::objectives;

const B: usize = 6;
const T: usize = 9;

/// A 64-bit linear congruential generator: the same settings on every machine.
struct Lcg(u64);

impl Lcg {
    fn uniform(&mut self) -> f64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (self.0 >> 11) as f64 / (1u64 << 53) as f64
    }
    fn range(&mut self, lo: f64, hi: f64) -> f64 {
        lo + (hi - lo) * self.uniform()
    }
    fn below(&mut self, n: usize) -> usize {
        ((self.uniform() * n as f64) as usize).min(n - 1)
    }
    fn chance(&mut self, p: f64) -> bool {
        self.uniform() < p
    }
}

/// The batch's `[B,T]` inputs.
struct Batch {
    log_probs: Tensor,
    old: Tensor,
    reference: Tensor,
    rollout: Tensor,
    entropy: Tensor,
    weights: Tensor,
    mask: Tensor,
    advantages: Tensor,
    scores: Tensor,
}

/// Log-ratios `ℓ − ℓold` within `±spread`; row 2 padded after 4 tokens, row 5 empty, garbage in
/// the padding.
fn batch(rng: &mut Lcg, spread: f64) -> Batch {
    let n = B * T;
    let mut columns = vec![vec![0f32; n]; 6];
    let mut mask = vec![1f32; n];
    for j in 0..n {
        let lp = rng.range(-4.0, 0.0);
        let old = (lp + rng.range(-spread, spread)).min(0.0);
        columns[0][j] = lp as f32;
        columns[1][j] = old as f32;
        columns[2][j] = (lp + rng.range(-1.3 * spread, 1.3 * spread)).min(0.0) as f32;
        columns[3][j] = (old + rng.range(-0.5 * spread, 0.5 * spread)).min(0.0) as f32;
        columns[4][j] = rng.range(0.0, 3.0) as f32;
        columns[5][j] = rng.range(0.3, 2.0) as f32;
        let (row, t) = (j / T, j % T);
        if (row == 2 && t >= 4) || row == 5 {
            mask[j] = 0.0;
            let garbage = [
                f32::NAN,
                f32::INFINITY,
                f32::NAN,
                f32::NEG_INFINITY,
                f32::NAN,
                -1.0,
            ];
            for (column, value) in columns.iter_mut().zip(garbage) {
                column[j] = value;
            }
        }
    }
    let dev = Device::Cpu;
    let matrix = |v: &Vec<f32>| Tensor::from_vec(v.clone(), (B, T), &dev).unwrap();
    Batch {
        log_probs: matrix(&columns[0]),
        old: matrix(&columns[1]),
        reference: matrix(&columns[2]),
        rollout: matrix(&columns[3]),
        entropy: matrix(&columns[4]),
        weights: matrix(&columns[5]),
        mask: matrix(&mask),
        advantages: Tensor::new(&[1.0f32, -1.0, 0.5, -0.7, 0.0, 2.0], &dev).unwrap(),
        scores: Tensor::new(&[1.0f32, 0.0, 1.0, -1.0, 0.5, 1.0], &dev).unwrap(),
    }
}

/// One random setting of `base`, and which optional inputs it reads.
struct Setting {
    config: PolicyLossConfig,
    /// 0 none, 1 OPSM, 2 top-entropy, 3 M2PO, 4 all three.
    masks: usize,
    weights: bool,
    normalizer: Option<Normalizer>,
}

fn setting(rng: &mut Lcg, base: &PolicyLossConfig) -> Setting {
    const AGGREGATIONS: [Aggregation; 6] = [
        Aggregation::TokenMean,
        Aggregation::TokenSum,
        Aggregation::SeqMeanTokenMean,
        Aggregation::SeqMeanTokenSum,
        Aggregation::SeqMeanTokenSumNorm { horizon: Some(16) },
        Aggregation::SeqMean,
    ];
    let mut config = base.with_aggregation(AGGREGATIONS[rng.below(6)]);
    if rng.chance(0.5) {
        config = config.with_log_ratio_clamp(None);
    }
    if rng.chance(0.7) {
        // Drawn in argument order (coefficient, estimator, clamp, weighting, aggregation): the
        // settings that follow depend on it.
        let kl = KlPenalty::new(rng.range(0.01, 0.5), KlEstimator::ALL[rng.below(5)])
            .with_clamp(rng.chance(0.5))
            .with_importance_weighting(rng.chance(0.5))
            .with_aggregation(AGGREGATIONS[rng.below(6)]);
        config = config.with_kl(Some(kl));
    }
    if rng.chance(0.5) {
        let bonus = EntropyBonus::new(0.01).with_aggregation(AGGREGATIONS[rng.below(6)]);
        config = config.with_entropy(Some(bonus));
    }
    let masks = rng.below(5);
    let mut policy_masks = PolicyMasks::default();
    if masks == 1 || masks == 4 {
        policy_masks = policy_masks.with_off_policy_threshold(0.05);
    }
    if masks == 2 || masks == 4 {
        policy_masks = policy_masks.with_top_entropy_quantile(0.4);
    }
    if masks == 3 || masks == 4 {
        policy_masks = policy_masks.with_m2_threshold(0.08);
    }
    let weights = rng.chance(0.4);
    let normalizer = rng.chance(0.3).then(|| {
        Normalizer::default()
            .with_global_tokens(60.0)
            .with_global_sequences(7.0)
            .with_world_size(2)
    });
    Setting {
        config: config.with_masks(policy_masks),
        masks,
        weights,
        normalizer,
    }
}

/// A path's loss, gradient and metric sums (in the order of their `Debug` form), or its error.
type Outcome = Result<(f64, Vec<f64>, Vec<f64>), String>;

fn run(s: &Setting, x: &Batch, topr: bool, backend: sapo::Backend) -> Outcome {
    let log_probs = Var::from_tensor(&x.log_probs).unwrap();
    let mut inputs = PolicyInputs::new(log_probs.as_tensor(), &x.old, &x.advantages, &x.mask);
    if s.config.kl.is_some() {
        inputs = inputs.with_ref_log_probs(&x.reference);
    }
    if s.config.entropy.is_some() || s.masks == 2 || s.masks == 4 {
        inputs = inputs.with_entropy(&x.entropy);
    }
    if matches!(s.masks, 1 | 3 | 4) {
        inputs = inputs.with_rollout_log_probs(&x.rollout);
    }
    if topr {
        inputs = inputs.with_scores(&x.scores);
    }
    if s.weights {
        inputs = inputs.with_is_weights(&x.weights);
    }
    if let Some(normalizer) = s.normalizer {
        inputs = inputs.with_normalizer(normalizer);
    }
    let loss = s
        .config
        .build()
        .map_err(|e| e.to_string())?
        .with_backend(backend);
    let out = loss.forward(&inputs).map_err(|e| e.to_string())?;
    out.metrics.check().map_err(|e| e.to_string())?;
    let value = f64s(&out.loss)[0];
    let grads = out.loss.backward().unwrap();
    let grad = grads
        .get(log_probs.as_tensor())
        .map(f64s)
        .unwrap_or_else(|| vec![0.0; B * T]);
    let sums = format!("{:?}", out.metrics.read().unwrap());
    let numbers = sums
        .split(|c: char| !(c.is_ascii_alphanumeric() || c == '.' || c == '-'))
        .filter_map(|w| w.parse::<f64>().ok())
        .collect();
    Ok((value, grad, numbers))
}

fn close(a: f64, b: f64) -> bool {
    a == b || (a - b).abs() <= 2e-4 * a.abs().max(b.abs()).max(1e-3)
}

/// What differs between the reference path's outcome and another's (empty: nothing).
fn differences(reference: &Outcome, other: &Outcome) -> Vec<String> {
    match (reference, other) {
        (Ok(a), Ok(b)) => {
            let mut found = vec![];
            if !a.0.is_finite() || !close(a.0, b.0) {
                found.push(format!("loss {} vs {}", a.0, b.0));
            }
            for (j, (x, y)) in a.1.iter().zip(&b.1).enumerate() {
                if !x.is_finite() || !close(*x, *y) {
                    found.push(format!("gradient [{j}] {x} vs {y}"));
                }
            }
            if a.2.len() != b.2.len() || a.2.iter().zip(&b.2).any(|(x, y)| !close(*x, *y)) {
                found.push(format!("metric sums {:?} vs {:?}", a.2, b.2));
            }
            found
        }
        (Err(a), Err(b)) if a == b => vec![],
        (a, b) => vec![format!("{:?} vs {:?}", a.as_ref().err(), b.as_ref().err())],
    }
}

#[test]
fn every_path_agrees_on_random_settings() {
    let per: usize = std::env::var("SAPO_SWEEP_PER")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3);
    let mut rng = Lcg(12345);
    let (mut settings, mut failures, mut errors) = (0, vec![], vec![]);
    for spread in [0.6, 7.0] {
        let x = batch(&mut rng, spread);
        for (name, base) in objectives() {
            for _ in 0..per {
                let s = setting(&mut rng, &base);
                let topr = name.starts_with("topr");
                let mut outcomes = vec![];
                for (path, backend, sim) in sim::paths() {
                    let _gpu = sim.enter();
                    outcomes.push((path, run(&s, &x, topr, backend)));
                }
                settings += 1;
                let (first, reference) = &outcomes[0];
                if let Err(e) = reference {
                    errors.push(format!("{name}, spread {spread}: {e}"));
                }
                for (path, outcome) in &outcomes[1..] {
                    let found = differences(reference, outcome);
                    if !found.is_empty() {
                        failures.push(format!(
                            "{name}, spread {spread}, {:?}, masks {}, weights {}, {:?}: \
                             {first} vs {path}: {}",
                            s.config,
                            s.masks,
                            s.weights,
                            s.normalizer,
                            found[..found.len().min(3)].join("; ")
                        ));
                    }
                }
            }
        }
    }
    println!(
        "{settings} settings on {} paths; {} refused alike on every path:\n{}",
        sim::paths().len(),
        errors.len(),
        errors.join("\n")
    );
    // A setting every path refuses compares nothing: they stay few.
    assert!(errors.len() * 10 <= settings, "{}", errors.join("\n"));
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
