//! Forward + backward of each objective on the CPU, composed ops vs the fused kernel.
//!
//! Ids: `<objective>/<path>/<B>x<T>`, objective in sapo, gspo, grpo; path in composed, fused.
//! Inputs and objective settings follow `../shared/bench/torch_baseline.py`: old log-probs
//! `log(U·0.96 + 0.02)`, log-probs `old + 0.05·N(0,1)`, one `N(0,1)` advantage per row, prefix
//! masks of random length; SAPO τ 1.0/1.05 with seq-mean-token-mean, GSPO-token ε 3e-4/4e-4
//! with `log s ≤ 10`, GRPO ε 0.2/0.2 with dual clip 3 and token-mean.

use candle_core::Device;
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use sapo::{Backend, PolicyInputs, Sapo};

#[path = "shared/policy_inputs.rs"]
mod policy_inputs;

use policy_inputs::{
    inputs, like_a_training_process, mask_inputs, mask_settings, masked_inputs, objectives,
};

fn bench(c: &mut Criterion) {
    like_a_training_process();
    for (name, loss) in objectives() {
        let mut group = c.benchmark_group(name);
        group.sample_size(20);
        for (b, t) in [(8, 1024), (64, 4096)] {
            let x = inputs(b, t, &Device::Cpu);
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

/// SAPO on the fused CPU path at 64×4096 with each mask inside the loss
/// ([`policy_inputs::mask_settings`]), against the same call without it (ids
/// `masks/<mask>/64x4096`). The behaviour policy drifts from the old one by `0.1·N(0,1)` per
/// token, the entropies are `3·U`.
fn bench_masks(c: &mut Criterion) {
    let (b, t) = (64, 4096);
    like_a_training_process();
    let x = inputs(b, t, &Device::Cpu);
    let extra = mask_inputs(&x, b, t);
    let mut group = c.benchmark_group("masks");
    group.sample_size(30);
    for (name, masks) in mask_settings() {
        let loss = Sapo::default().config().with_masks(masks).build().unwrap();
        group.bench_function(BenchmarkId::new(name, format!("{b}x{t}")), |bencher| {
            bencher.iter(|| {
                let out = loss.forward(&masked_inputs(&x, &masks, &extra)).unwrap();
                out.loss.backward().unwrap()
            })
        });
    }
    // M2PO's reduced mask taken once (`m2po_reduced_mask`, τ of `m2po`): what taking it
    // costs, and the call that reads it with M2PO off (each later update on the same batch).
    let (rollout, tau) = (&extra.0, policy_inputs::M2PO_CUTTING);
    group.bench_function(
        BenchmarkId::new("m2po_reduced_mask", format!("{b}x{t}")),
        |bencher| bencher.iter(|| sapo::m2po_reduced_mask(&x.mask, rollout, &x.old, tau).unwrap()),
    );
    {
        let reduced = sapo::m2po_reduced_mask(&x.mask, rollout, &x.old, tau).unwrap();
        let loss = Sapo::default().build().unwrap();
        group.bench_function(
            BenchmarkId::new("m2po_taken_once", format!("{b}x{t}")),
            |bencher| {
                bencher.iter(|| {
                    let inputs =
                        PolicyInputs::new(x.log_probs.as_tensor(), &x.old, &x.advantages, &reduced);
                    let out = loss.forward(&inputs).unwrap();
                    out.loss.backward().unwrap()
                })
            },
        );
    }
    // Beside the masks, the caller's own `[B, T]` rollout weights (all ones): their check.
    let ones = x.old.ones_like().unwrap();
    {
        let (name, w) = ("token_is_weights", &ones);
        let loss = Sapo::default().build().unwrap();
        group.bench_function(BenchmarkId::new(name, format!("{b}x{t}")), |bencher| {
            bencher.iter(|| {
                let inputs =
                    PolicyInputs::new(x.log_probs.as_tensor(), &x.old, &x.advantages, &x.mask)
                        .with_is_weights(w);
                let out = loss.forward(&inputs).unwrap();
                out.loss.backward().unwrap()
            })
        });
    }
    group.finish();
}

criterion_group!(benches, bench, bench_masks);
criterion_main!(benches);
