//! Forward + backward from hidden states through the lm_head to a SAPO loss on the CPU, as in
//! `../shared/bench/torch_baseline.py` (`linear_case`: hidden `N(0,1)`, weight `N(0,1)/√H`,
//! uniform targets, old log-probs = the initial ones + `0.05·N(0,1)`, advantages `N(0,1)`).
//! Gradients reach `hidden` and `weight`.
//!
//! Ids: `linear_logprobs/<path>/<N>x<H>x<V>`, the log-probs then the loss: `composed`
//! materialises the logits with candle's matmul and runs composed ops, `fused` runs the fused
//! linear log-probs (four gemms per tile) and the fused policy kernel;
//! `linear_loss/fused/<N>x<H>x<V>`: the whole objective in one pass
//! (`PolicyLoss::forward_from_hidden`, three gemms per block of tokens).
//!
//! Each benchmark's throughput is set to the floating-point operations of its matrix products
//! (`2·N·H·V` per gemm: three for the composed path and the one pass, four for the fused linear
//! log-probs, whose backward recomputes the logits), so criterion's `thrpt` reads in GFLOP/s
//! (`Gelem/s`), the figure to hold against the machine's peak and PyTorch's matmul.

use candle_core::{DType, Device, Tensor, Var};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use sapo::{Backend, LmHead, PolicyInputs, Sapo};

const SHAPES: [(usize, usize, usize); 2] = [(1024, 512, 32768), (4096, 256, 32768)];

struct Setup {
    hidden: Var,
    weight: Var,
    targets: Tensor,
    old: Tensor,
    adv: Tensor,
    mask: Tensor,
}

fn setup(n: usize, h: usize, v: usize) -> Setup {
    let dev = Device::Cpu;
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
    Setup {
        old: (initial.detach() + noise).unwrap().unsqueeze(0).unwrap(),
        adv: Tensor::randn(0f32, 1.0, 1, &dev).unwrap(),
        mask: Tensor::ones((1, n), DType::U8, &dev).unwrap(),
        hidden,
        weight,
        targets,
    }
}

fn bench(c: &mut Criterion) {
    let setups: Vec<_> = SHAPES
        .iter()
        .map(|&(n, h, v)| ((n, h, v), setup(n, h, v)))
        .collect();
    let mut group = c.benchmark_group("linear_logprobs");
    group.sample_size(10);
    for ((n, h, v), s) in &setups {
        for (path, backend, gemms) in [
            ("composed", Backend::Composed, 3),
            ("fused", Backend::Auto, 4),
        ] {
            group.throughput(Throughput::Elements(gemms * 2 * (n * h * v) as u64));
            let loss = Sapo::default().build().unwrap().with_backend(backend);
            group.bench_function(BenchmarkId::new(path, format!("{n}x{h}x{v}")), |bencher| {
                bencher.iter(|| {
                    let (lp, _) = sapo::linear_log_probs_and_entropy_with(
                        s.hidden.as_tensor(),
                        s.weight.as_tensor(),
                        None,
                        &s.targets,
                        1.0,
                        backend,
                    )
                    .unwrap();
                    let lp = lp.unsqueeze(0).unwrap();
                    let out = loss
                        .forward(&PolicyInputs::new(&lp, &s.old, &s.adv, &s.mask))
                        .unwrap();
                    out.loss.backward().unwrap()
                })
            });
        }
    }
    group.finish();
    let mut group = c.benchmark_group("linear_loss");
    group.sample_size(10);
    let loss = Sapo::default().build().unwrap();
    for ((n, h, v), s) in &setups {
        let hidden = s.hidden.as_tensor().reshape((1, *n, *h)).unwrap();
        let targets = s.targets.reshape((1, *n)).unwrap();
        group.throughput(Throughput::Elements(3 * 2 * (n * h * v) as u64));
        group.bench_function(
            BenchmarkId::new("fused", format!("{n}x{h}x{v}")),
            |bencher| {
                bencher.iter(|| {
                    let head = LmHead::new(&hidden, s.weight.as_tensor(), &targets);
                    let out = loss
                        .forward_from_hidden(&PolicyInputs::new(head, &s.old, &s.adv, &s.mask))
                        .unwrap();
                    out.loss.backward().unwrap()
                })
            },
        );
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
