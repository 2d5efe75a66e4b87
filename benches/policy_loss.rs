//! Forward + backward of each objective on the CPU, composed ops vs the fused kernel.
//!
//! Ids: `<objective>/<path>/<B>x<T>`, objective in sapo, gspo, grpo; path in composed, fused.
//! Inputs and objective settings follow `../shared/bench/torch_baseline.py`: old log-probs
//! `log(U·0.96 + 0.02)`, log-probs `old + 0.05·N(0,1)`, one `N(0,1)` advantage per row, prefix
//! masks of random length; SAPO τ 1.0/1.05 with seq-mean-token-mean, GSPO-token ε 3e-4/4e-4
//! with `log s ≤ 10`, GRPO ε 0.2/0.2 with dual clip 3 and token-mean.

use candle_core::{Device, Tensor, Var};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use sapo::{Aggregation, Backend, Grpo, Gspo, PolicyInputs, PolicyLoss, RatioLevel, Sapo};

struct Rng(u64);

impl Rng {
    fn uniform(&mut self) -> f64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        ((z ^ (z >> 31)) >> 11) as f64 / (1u64 << 53) as f64
    }
    fn normal(&mut self) -> f64 {
        let u = self.uniform().max(f64::MIN_POSITIVE);
        (-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * self.uniform()).cos()
    }
}

struct Inputs {
    log_probs: Var,
    old: Tensor,
    advantages: Tensor,
    mask: Tensor,
}

fn inputs(b: usize, t: usize) -> Inputs {
    let mut rng = Rng(0);
    let dev = Device::Cpu;
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
    let m = |v: Vec<f32>| Tensor::from_vec(v, (b, t), &dev).unwrap();
    Inputs {
        log_probs: Var::from_tensor(&m(lp)).unwrap(),
        old: m(old),
        advantages: m(adv),
        mask: m(mask),
    }
}

fn objectives() -> Vec<(&'static str, PolicyLoss)> {
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

fn bench(c: &mut Criterion) {
    for (name, loss) in objectives() {
        let mut group = c.benchmark_group(name);
        group.sample_size(20);
        for (b, t) in [(8, 1024), (64, 4096)] {
            let x = inputs(b, t);
            for (path, backend) in [("composed", Backend::Composed), ("fused", Backend::Auto)] {
                let loss = loss.with_backend(backend);
                group.bench_function(BenchmarkId::new(path, format!("{b}x{t}")), |bencher| {
                    bencher.iter(|| {
                        let inputs = PolicyInputs::new(
                            x.log_probs.as_tensor(),
                            &x.old,
                            &x.advantages,
                            &x.mask,
                        );
                        let out = loss.forward(&inputs).unwrap();
                        out.loss.backward().unwrap()
                    })
                });
            }
        }
        group.finish();
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
