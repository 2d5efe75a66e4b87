//! Forward + backward of token log-probs from logits on the CPU, composed ops vs the fused
//! kernel: the loss is `Σ w·log_prob` with one random weight per row, as in
//! `../shared/bench/torch_baseline.py` (logits `3·N(0,1)`, uniform targets).
//!
//! Ids: `logprobs/<path>/<N>x<V>`, and `candle_accumulation/<rows>x<cols>`: what candle 0.11's
//! backward itself does with the first gradient of a tensor of that size (`zeros_like`, then an
//! add into it), timed alone — the floor stock candle sets under every fused path (the policy
//! loss's `[B,T]` log-probs at 64×4096, the logits at 1024×32768).

use candle_core::{Device, Tensor, Var};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use sapo::Backend;

fn splitmix(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

fn bench(c: &mut Criterion) {
    let dev = Device::Cpu;
    let mut group = c.benchmark_group("logprobs");
    group.sample_size(10);
    for (n, v) in [(1024usize, 32768usize), (256, 151936)] {
        let mut state = 7u64;
        let logits = (Tensor::randn(0f32, 1.0, (n, v), &dev).unwrap() * 3.0).unwrap();
        let logits = Var::from_tensor(&logits).unwrap();
        let targets: Vec<u32> = (0..n)
            .map(|_| (splitmix(&mut state) % v as u64) as u32)
            .collect();
        let targets = Tensor::from_vec(targets, n, &dev).unwrap();
        let weights = Tensor::randn(0f32, 1.0, n, &dev).unwrap();
        for (path, backend) in [("composed", Backend::Composed), ("fused", Backend::Auto)] {
            group.bench_function(BenchmarkId::new(path, format!("{n}x{v}")), |bencher| {
                bencher.iter(|| {
                    let (lp, _) = sapo::token_log_probs_and_entropy_with(
                        logits.as_tensor(),
                        &targets,
                        1.0,
                        backend,
                    )
                    .unwrap();
                    lp.mul(&weights)
                        .unwrap()
                        .sum_all()
                        .unwrap()
                        .backward()
                        .unwrap()
                })
            });
        }
    }
    group.finish();
}

fn bench_candle_accumulation(c: &mut Criterion) {
    let mut group = c.benchmark_group("candle_accumulation");
    group.sample_size(20);
    for (rows, cols) in [(64, 4096), (1024, 32768)] {
        let gradient = Tensor::ones((rows, cols), candle_core::DType::F32, &Device::Cpu).unwrap();
        group.bench_function(BenchmarkId::from_parameter(format!("{rows}x{cols}")), |b| {
            b.iter(|| gradient.zeros_like().unwrap().add(&gradient).unwrap())
        });
    }
    group.finish();
}

criterion_group!(benches, bench, bench_candle_accumulation);
criterion_main!(benches);
