//! Forward + backward from hidden states through the lm_head to a SAPO loss on the CPU, as in
//! `../shared/bench/torch_baseline.py` (`linear_case`: hidden `N(0,1)`, weight `N(0,1)/√H`,
//! uniform targets, old log-probs = the initial ones + `0.05·N(0,1)`, advantages `N(0,1)`):
//! `composed` materialises the logits with candle's matmul and runs composed ops, `fused` runs
//! the fused linear log-probs and the fused policy kernel. Gradients reach `hidden` and `weight`.
//!
//! Ids: `linear_logprobs/<path>/<N>x<H>x<V>`.

use candle_core::{DType, Device, Tensor, Var};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use sapo::{Backend, PolicyInputs, Sapo};

fn bench(c: &mut Criterion) {
    let dev = Device::Cpu;
    let mut group = c.benchmark_group("linear_logprobs");
    group.sample_size(10);
    for (n, h, v) in [(1024usize, 512usize, 32768usize), (4096, 256, 32768)] {
        let hidden = Var::randn(0f32, 1.0, (n, h), &dev).unwrap();
        let weight = Var::from_tensor(
            &(Tensor::randn(0f32, 1.0, (v, h), &dev).unwrap() / (h as f64).sqrt()).unwrap(),
        )
        .unwrap();
        let targets = Tensor::from_vec(
            (0..n as u32).map(|i| i * 7919 % v as u32).collect(),
            n,
            &dev,
        )
        .unwrap();
        let (initial, _) = sapo::linear_log_probs_and_entropy(
            hidden.as_tensor(),
            weight.as_tensor(),
            None,
            &targets,
            1.0,
        )
        .unwrap();
        let noise = (Tensor::randn(0f32, 1.0, n, &dev).unwrap() * 0.05).unwrap();
        let old = (initial.detach() + noise).unwrap().unsqueeze(0).unwrap();
        let adv = Tensor::randn(0f32, 1.0, 1, &dev).unwrap();
        let mask = Tensor::ones((1, n), DType::U8, &dev).unwrap();
        for (path, backend) in [("composed", Backend::Composed), ("fused", Backend::Auto)] {
            let loss = Sapo::default().build().unwrap().with_backend(backend);
            group.bench_function(BenchmarkId::new(path, format!("{n}x{h}x{v}")), |bencher| {
                bencher.iter(|| {
                    let (lp, _) = sapo::linear_log_probs_and_entropy_with(
                        hidden.as_tensor(),
                        weight.as_tensor(),
                        None,
                        &targets,
                        1.0,
                        backend,
                    )
                    .unwrap();
                    let lp = lp.unsqueeze(0).unwrap();
                    let out = loss
                        .forward(&PolicyInputs::new(&lp, &old, &adv, &mask))
                        .unwrap();
                    out.loss.backward().unwrap()
                })
            });
        }
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
