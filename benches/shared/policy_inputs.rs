//! The policy-loss benchmarks' inputs and objectives, shared by `benches/policy_loss.rs` (on the
//! CPU) and `examples/gpu_bench.rs` (on a CUDA device): the inputs and settings of
//! `../shared/bench/torch_baseline.py`. Old log-probs `log(U·0.96 + 0.02)`, log-probs
//! `old + 0.05·N(0,1)`, one `N(0,1)` advantage per row, prefix masks of random length; SAPO τ
//! 1.0/1.05 with seq-mean-token-mean, GSPO-token ε 3e-4/4e-4 with `log s ≤ 10`, GRPO ε 0.2/0.2
//! with dual clip 3 and token-mean, then the later objectives.
#![allow(dead_code)]

use candle_core::{Device, Tensor, Var};
use sapo::{Aggregation, Grpo, Gspo, PolicyInputs, PolicyLoss, PolicyMasks, RatioLevel, Sapo};

/// A splitmix64 stream.
pub struct Rng(pub u64);

impl Rng {
    pub fn uniform(&mut self) -> f64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        ((z ^ (z >> 31)) >> 11) as f64 / (1u64 << 53) as f64
    }
    pub fn normal(&mut self) -> f64 {
        let u = self.uniform().max(f64::MIN_POSITIVE);
        (-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * self.uniform()).cos()
    }
}

/// Puts the process's allocator in the state of a training process before anything is timed:
/// frees one 16 MiB buffer, as a training step does many times over (the logits, the
/// activations). glibc's malloc raises its mmap threshold to the largest mapped buffer freed so
/// far (up to 32 MiB) and its trim threshold to twice that; a micro-benchmark whose largest
/// freed buffer is 1 MiB keeps them at 1 MiB and 2 MiB, returns the 2 MiB of candle's backward
/// (its zeros and its sum) to the system after every call and maps them back in, a page fault
/// per 4 KiB, during the next — on the README's AMD machine, up to twice the call's time, and
/// bimodal from one run to the next. Other allocators ignore this; it changes no value.
pub fn like_a_training_process() {
    let freed = std::hint::black_box(vec![1u8; 16 << 20]);
    drop(freed);
}

/// One batch: `[B,T]` tensors (advantages broadcast over the row).
pub struct Inputs {
    pub log_probs: Var,
    pub old: Tensor,
    pub advantages: Tensor,
    pub mask: Tensor,
}

pub fn inputs(b: usize, t: usize, dev: &Device) -> Inputs {
    let mut rng = Rng(0);
    let old: Vec<f32> = (0..b * t)
        .map(|_| (rng.uniform() * 0.96 + 0.02).ln() as f32)
        .collect();
    let lp: Vec<f32> = old.iter().map(|o| o + 0.05 * rng.normal() as f32).collect();
    let adv: Vec<f32> = (0..b).map(|_| rng.normal() as f32).collect();
    let adv: Vec<f32> = (0..b * t).map(|j| adv[j / t]).collect();
    let lengths: Vec<usize> = (0..b)
        .map(|_| 1 + (rng.uniform() * t as f64) as usize)
        .collect();
    let mask: Vec<f32> = (0..b * t)
        .map(|j| f32::from(u8::from(j % t < lengths[j / t])))
        .collect();
    let m = |v: Vec<f32>| Tensor::from_vec(v, (b, t), dev).unwrap();
    Inputs {
        log_probs: Var::from_tensor(&m(lp)).unwrap(),
        old: m(old),
        advantages: m(adv),
        mask: m(mask),
    }
}

/// The masks' extra inputs: behaviour log-probs `old + 0.1·N(0,1)` and entropies `3·U`.
pub fn mask_inputs(x: &Inputs, b: usize, t: usize) -> (Tensor, Tensor) {
    let mut rng = Rng(7);
    let old = x.old.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let rollout: Vec<f32> = old.iter().map(|o| o + 0.1 * rng.normal() as f32).collect();
    let entropy: Vec<f32> = (0..b * t).map(|_| 3.0 * rng.uniform() as f32).collect();
    let dev = x.old.device();
    let m = |v: Vec<f32>| Tensor::from_vec(v, (b, t), dev).unwrap();
    (m(rollout), m(entropy))
}

/// M2PO's `τ` of the setting `m2po` of [`mask_settings`], which masks the tokens of largest
/// drift (also the `τ` of the reduced mask taken once, `masks/m2po_taken_once`).
pub const M2PO_CUTTING: f64 = 0.008;

/// The masks of the criterion group `masks/` (and of `examples/masks_overhead.rs`), the call
/// without a mask first: OPSM (δ 0.002) drops part of the negative rows, the entropy quantile
/// keeps 20%, M2PO (τ 0.008) masks the tokens of largest drift; `m2po_idle` (τ 0.04, above the
/// mean second moment 0.01) masks nothing, AReaL's usual case.
pub fn mask_settings() -> Vec<(&'static str, PolicyMasks)> {
    vec![
        ("none", PolicyMasks::default()),
        (
            "opsm",
            PolicyMasks::default().with_off_policy_threshold(0.002),
        ),
        (
            "top_entropy",
            PolicyMasks::default().with_top_entropy_quantile(0.2),
        ),
        (
            "m2po",
            PolicyMasks::default().with_m2_threshold(M2PO_CUTTING),
        ),
        ("m2po_idle", PolicyMasks::default().with_m2_threshold(0.04)),
    ]
}

/// The loss's inputs on the batch `x`, with the extra inputs of [`mask_inputs`] that `masks` read.
pub fn masked_inputs<'a>(
    x: &'a Inputs,
    masks: &PolicyMasks,
    (rollout, entropy): &'a (Tensor, Tensor),
) -> PolicyInputs<'a> {
    let mut inputs = PolicyInputs::new(x.log_probs.as_tensor(), &x.old, &x.advantages, &x.mask);
    if masks.off_policy_threshold.is_some() || masks.m2_threshold.is_some() {
        inputs = inputs.with_rollout_log_probs(rollout);
    }
    if masks.top_entropy_quantile.is_some() {
        inputs = inputs.with_entropy(entropy);
    }
    inputs
}

/// The benchmarked objectives, SAPO, GSPO-token and GRPO first.
pub fn objectives() -> Vec<(&'static str, PolicyLoss)> {
    vec![
        ("sapo", Sapo::default().build().unwrap()),
        (
            "gspo",
            Gspo::default()
                .config()
                .with_ratio_level(RatioLevel::SequenceToken)
                .build()
                .unwrap(),
        ),
        (
            "grpo",
            Grpo {
                dual_clip: Some(3.0),
                ..Grpo::default()
            }
            .config()
            .with_aggregation(Aggregation::TokenMean)
            .build()
            .unwrap(),
        ),
        // The later objectives, on the same kernel.
        ("cispo", sapo::Cispo::default().build().unwrap()),
        ("gmpo", sapo::Gmpo::default().build().unwrap()),
        (
            "dppo_kl",
            sapo::Dppo::new(sapo::Divergence::BinaryKl, 0.05, 0.05, 3.0)
                .build()
                .unwrap(),
        ),
        ("vespo", sapo::Vespo::default().build().unwrap()),
        ("kl_cov", sapo::KlCov::default().build().unwrap()),
    ]
}
