//! The fused CPU kernels: same bits whatever the thread count, the same results as the composed
//! ops in every dtype, and the same typed errors.

mod common;

use candle_core::{DType, Device, Tensor, Var};
use common::{assert_same_bits_across_threads, f64s};
use sapo::{
    Aggregation, Backend, Error, Grpo, Gspo, KlEstimator, KlPenalty, PolicyInputs, PolicyLoss,
    RatioLevel, Sapo,
};

fn dev() -> Device {
    Device::Cpu
}

/// A deterministic pseudo-random vector in f32.
fn noise(n: usize, seed: u64) -> Vec<f32> {
    common::noise(n, seed)
        .into_iter()
        .map(|x| x as f32)
        .collect()
}

struct Batch {
    log_probs: Tensor,
    old: Tensor,
    adv: Tensor,
    mask: Tensor,
    reference: Tensor,
    weights: Tensor,
}

fn batch(b: usize, t: usize, dtype: DType) -> Batch {
    let m = |v: Vec<f32>| {
        Tensor::from_vec(v, (b, t), &dev())
            .unwrap()
            .to_dtype(dtype)
            .unwrap()
    };
    let old: Vec<f32> = noise(b * t, 1).iter().map(|x| -1.5 + 2.0 * x).collect();
    let lp: Vec<f32> = old
        .iter()
        .zip(noise(b * t, 2))
        .map(|(o, d)| o + 0.6 * d)
        .collect();
    let mask: Vec<f32> = (0..b * t)
        .map(|j| {
            if j % t < t * (1 + j / t % 4) / 4 {
                1.0
            } else {
                0.0
            }
        })
        .collect();
    Batch {
        log_probs: m(lp.clone()),
        old: m(old),
        adv: Tensor::from_vec(noise(b, 3).iter().map(|x| 4.0 * x).collect(), b, &dev())
            .unwrap()
            .to_dtype(dtype)
            .unwrap(),
        mask: Tensor::from_vec(mask, (b, t), &dev()).unwrap(),
        reference: m(lp.iter().zip(noise(b * t, 4)).map(|(l, d)| l + d).collect()),
        weights: m(noise(b * t, 5).iter().map(|x| 1.0 + x).collect()),
    }
}

fn losses() -> Vec<PolicyLoss> {
    let kl =
        Some(KlPenalty::new(0.05, KlEstimator::K3).with_aggregation(Aggregation::SeqMeanTokenSum));
    let mut losses = vec![
        Sapo::default().build().unwrap(),
        Sapo::default().config().with_kl(kl).build().unwrap(),
        Gspo::default().build().unwrap(),
        Gspo {
            eps_low: 0.2,
            eps_high: 0.2,
        }
        .config()
        .with_ratio_level(RatioLevel::SequenceToken)
        .build()
        .unwrap(),
        Grpo {
            dual_clip: Some(3.0),
            eps_high: 0.28,
            ..Grpo::default()
        }
        .config()
        .with_aggregation(Aggregation::TokenMean)
        .with_kl(Some(KlPenalty::new(0.1, KlEstimator::K3Plus)))
        .build()
        .unwrap(),
    ];
    // The later objectives, each on the same kernel.
    losses.extend(common::later_objectives());
    losses
}

/// Loss, gradient and metrics of one forward + backward on `backend`; the gradient must come
/// back in `log_probs`' dtype.
fn values(
    loss: &PolicyLoss,
    x: &Batch,
    mask: &Tensor,
    backend: Backend,
) -> (f64, Vec<f64>, sapo::MetricSums) {
    let lp = Var::from_tensor(&x.log_probs).unwrap();
    let mut inputs =
        PolicyInputs::new(lp.as_tensor(), &x.old, &x.adv, mask).with_is_weights(&x.weights);
    if loss.config().kl.is_some() {
        inputs = inputs.with_ref_log_probs(&x.reference);
    }
    let out = loss.with_backend(backend).forward(&inputs).unwrap();
    let grads = out.loss.backward().unwrap();
    let grad = grads.get(lp.as_tensor()).unwrap();
    assert_eq!(grad.dtype(), x.log_probs.dtype());
    (f64s(&out.loss)[0], f64s(grad), out.metrics.read().unwrap())
}

/// Loss, gradient and metrics of the default (fused) path as raw bits.
fn run_bits(loss: &PolicyLoss, x: &Batch, mask: &Tensor) -> Vec<u64> {
    let (loss, grad, m) = values(loss, x, mask, Backend::Auto);
    let metrics = [
        m.token_count,
        m.neg_log_ratio_sum,
        m.ratio_excess_sum,
        m.lowest_ratio,
        m.highest_ratio,
    ];
    std::iter::once(loss)
        .chain(grad)
        .chain(metrics)
        .map(f64::to_bits)
        .collect()
}

#[test]
fn policy_kernel_is_deterministic_across_thread_counts() {
    for dtype in [DType::F32, DType::BF16] {
        let x = batch(24, 333, dtype);
        for loss in losses() {
            let what = format!("{:?}", loss.config());
            assert_same_bits_across_threads(&what, || run_bits(&loss, &x, &x.mask));
        }
    }
}

fn logprob_bits(logits: &Tensor, targets: &Tensor) -> Vec<u64> {
    let x = Var::from_tensor(logits).unwrap();
    let (lp, h) = sapo::token_log_probs_and_entropy(x.as_tensor(), targets, 0.9).unwrap();
    let obj = (lp.sum_all().unwrap() + (h * 0.3).unwrap().sum_all().unwrap()).unwrap();
    let grads = obj.backward().unwrap();
    // f32 → f64 is exact, so the f64 bits identify the f32 values.
    let grad = grads.get(x.as_tensor()).unwrap();
    f64s(&lp)
        .into_iter()
        .chain(f64s(grad))
        .map(f64::to_bits)
        .collect()
}

#[test]
fn logprob_kernel_is_deterministic_across_thread_counts() {
    let (n, v) = (37, 2051);
    let logits = Tensor::from_vec(
        noise(n * v, 9).iter().map(|x| 12.0 * x).collect(),
        (n, v),
        &dev(),
    )
    .unwrap();
    let targets = Tensor::from_vec(
        (0..n as u32).map(|i| i * 53 % v as u32).collect(),
        n,
        &dev(),
    )
    .unwrap();
    assert_same_bits_across_threads("log-probs", || logprob_bits(&logits, &targets));
}

#[test]
fn fused_matches_composed_in_every_dtype_and_mask_dtype() {
    for dtype in [DType::F32, DType::F16, DType::BF16, DType::F64] {
        let x = batch(9, 70, dtype);
        let masks = [
            x.mask.clone(),
            x.mask.to_dtype(DType::U8).unwrap(),
            x.mask.to_dtype(DType::I64).unwrap(),
            x.mask.to_dtype(dtype).unwrap(),
        ];
        // Half precision rounds the inputs once; both paths see the same rounded values.
        let tol = if matches!(dtype, DType::F16 | DType::BF16) {
            2e-2
        } else {
            2e-5
        };
        for loss in losses() {
            for mask in &masks {
                let (lf, gf, mf) = values(&loss, &x, mask, Backend::Auto);
                let (lc, gc, mc) = values(&loss, &x, mask, Backend::Composed);
                assert!(
                    (lf - lc).abs() <= tol * (1.0 + lc.abs()),
                    "{dtype:?} loss {lf} vs {lc}"
                );
                for (a, b) in gf.iter().zip(&gc) {
                    assert!(
                        (a - b).abs() <= tol * (1e-3 + b.abs()) + 1e-6,
                        "{dtype:?} grad {a} vs {b}"
                    );
                }
                assert_eq!(mf.token_count, mc.token_count);
                assert_eq!(mf.clipped_count, mc.clipped_count);
                assert!(
                    (mf.neg_log_ratio_sum - mc.neg_log_ratio_sum).abs()
                        <= tol * (1.0 + mc.neg_log_ratio_sum.abs())
                );
            }
        }
    }
}

#[test]
fn fused_logprobs_match_composed_for_3d_and_half_logits() {
    let (b, t, v) = (3, 5, 301);
    for dtype in [DType::F32, DType::BF16, DType::F16] {
        let logits = Tensor::from_vec(
            noise(b * t * v, 11).iter().map(|x| 10.0 * x).collect(),
            (b, t, v),
            &dev(),
        )
        .unwrap()
        .to_dtype(dtype)
        .unwrap();
        let targets = Tensor::from_vec(
            (0..(b * t) as i64).map(|i| i * 37 % v as i64).collect(),
            (b, t),
            &dev(),
        )
        .unwrap();
        let mut results = vec![];
        for backend in [Backend::Auto, Backend::Composed] {
            let x = Var::from_tensor(&logits).unwrap();
            let (lp, h) =
                sapo::token_log_probs_and_entropy_with(x.as_tensor(), &targets, 1.3, backend)
                    .unwrap();
            assert_eq!(lp.dims(), &[b, t]);
            let obj = (lp.sum_all().unwrap() - h.sum_all().unwrap()).unwrap();
            let grads = obj.backward().unwrap();
            let g = grads.get(x.as_tensor()).unwrap();
            assert_eq!(g.dtype(), dtype);
            results.push((f64s(&lp), f64s(&h), f64s(g)));
        }
        let tol = if dtype == DType::F32 { 1e-5 } else { 2e-2 };
        for (a, b) in [
            (&results[0].0, &results[1].0),
            (&results[0].1, &results[1].1),
            (&results[0].2, &results[1].2),
        ] {
            for (x, y) in a.iter().zip(b.iter()) {
                assert!(
                    (x - y).abs() <= tol * (1.0 + y.abs()),
                    "{dtype:?}: {x} vs {y}"
                );
            }
        }
    }
}

#[test]
fn fused_kernel_reports_typed_errors() {
    let x = batch(4, 8, DType::F32);
    let bad_mask = (&x.mask * 0.5).unwrap();
    let loss = Sapo::default().build().unwrap();
    let err = loss
        .forward(&PolicyInputs::new(&x.log_probs, &x.old, &x.adv, &bad_mask))
        .unwrap_err();
    assert!(
        matches!(err, Error::InvalidValue { arg: "mask", .. }),
        "{err}"
    );
    let nan = Tensor::full(f32::NAN, (4, 8), &dev()).unwrap();
    let ones = Tensor::ones((4, 8), DType::F32, &dev()).unwrap();
    let err = loss
        .forward(&PolicyInputs::new(&x.log_probs, &nan, &x.adv, &ones))
        .unwrap_err();
    assert!(
        matches!(
            err,
            Error::InvalidValue {
                arg: "old_log_probs",
                ..
            }
        ),
        "{err}"
    );
    let kl = Sapo::default()
        .config()
        .with_kl(Some(KlPenalty::new(0.1, KlEstimator::K1)))
        .build()
        .unwrap();
    let err = kl
        .forward(&PolicyInputs::new(&x.log_probs, &x.old, &x.adv, &ones).with_ref_log_probs(&nan))
        .unwrap_err();
    assert!(
        matches!(
            err,
            Error::InvalidValue {
                arg: "ref_log_probs",
                ..
            }
        ),
        "{err}"
    );
}

#[test]
fn mixed_dtypes_lose_no_precision_and_masks_are_checked_in_their_own_dtype() {
    let x = batch(5, 40, DType::F32);
    let lp = x.log_probs.to_dtype(DType::BF16).unwrap();
    // f32 old log-probs with a bf16 log_probs: both paths compute in f32.
    let loss = Sapo::default().build().unwrap();
    let run = |backend: Backend| {
        let out = loss
            .with_backend(backend)
            .forward(&PolicyInputs::new(&lp, &x.old, &x.adv, &x.mask))
            .unwrap();
        out.loss.to_scalar::<f32>().unwrap()
    };
    let (fused, composed) = (run(Backend::Auto), run(Backend::Composed));
    assert!(
        (fused - composed).abs() <= 1e-5 * (1.0 + composed.abs()),
        "{fused} vs {composed}"
    );
    // An f64 mask value that would round to 1 in bf16 is still rejected.
    let almost_one = (x.mask.to_dtype(DType::F64).unwrap() * (1.0 + 1e-6)).unwrap();
    for backend in [Backend::Auto, Backend::Composed] {
        let err = loss
            .with_backend(backend)
            .forward(&PolicyInputs::new(&lp, &lp, &x.adv, &almost_one))
            .unwrap_err();
        assert!(
            matches!(err, Error::InvalidValue { arg: "mask", .. }),
            "{backend:?}: {err}"
        );
    }
}

#[test]
fn kept_gradient_is_scaled_by_the_upstream_gradient_and_survives_a_second_backward() {
    let x = batch(6, 50, DType::F32);
    for loss in losses() {
        let run = |backend: Backend, scale: f64| {
            let lp = Var::from_tensor(&x.log_probs).unwrap();
            let mut inputs = PolicyInputs::new(lp.as_tensor(), &x.old, &x.adv, &x.mask);
            if loss.config().kl.is_some() {
                inputs = inputs.with_ref_log_probs(&x.reference);
            }
            let out = loss.with_backend(backend).forward(&inputs).unwrap();
            let scaled = (&out.loss * scale).unwrap();
            let first = f64s(scaled.backward().unwrap().get(lp.as_tensor()).unwrap());
            let second = f64s(scaled.backward().unwrap().get(lp.as_tensor()).unwrap());
            assert_eq!(first, second, "{backend:?}: a second backward differs");
            first
        };
        let composed = run(Backend::Composed, 2.5);
        let fused = run(Backend::Auto, 2.5);
        for (a, b) in fused.iter().zip(&composed) {
            assert!(
                (a - b).abs() <= 1e-5 * (1e-3 + b.abs()) + 1e-7,
                "{a} vs {b}"
            );
        }
    }
}

/// The CPU kernel skips the tiles (256 tokens) before a row's first and after its last unmasked
/// token. Rows of 1300 tokens (five whole tiles and a partial one) whose only unmasked tokens
/// sit at tile edges (the last token of a tile, the first of the next live one), inside holes,
/// in the partial tile, or nowhere; garbage (NaN, ±∞) everywhere padding is. Every loss must
/// match the composed ops, give the same bits as the same batch with finite padding, and leave
/// an exact zero gradient on every masked token (the kernel writes the zeros of the tiles it
/// skips: its buffer is not zeroed first).
#[test]
fn padding_tiles_are_skipped_without_changing_a_value() {
    let (b, t) = (7, 1300);
    let live: [&[(usize, usize)]; 7] = [
        &[(255, 256), (768, 769)],  // last token of tile 0, first of tile 3
        &[(0, 1300)],               // no padding
        &[],                        // all padding
        &[(1299, 1300)],            // the partial tile's last token only
        &[(300, 310), (900, 1030)], // a hole of whole tiles between two runs
        &[(0, 256)],                // exactly the first tile
        &[(1024, 1280)],            // exactly the last whole tile
    ];
    let unmasked = |j: usize| {
        live[j / t]
            .iter()
            .any(|&(start, end)| (start..end).contains(&(j % t)))
    };
    let mask: Vec<f32> = (0..b * t)
        .map(|j| f32::from(u8::from(unmasked(j))))
        .collect();
    let garbage = [f32::NAN, f32::INFINITY, f32::NEG_INFINITY];
    let with_padding = |values: Vec<f32>, fill: &dyn Fn(usize) -> f32| -> Tensor {
        let v = (0..b * t)
            .map(|j| if unmasked(j) { values[j] } else { fill(j) })
            .collect();
        Tensor::from_vec(v, (b, t), &dev()).unwrap()
    };
    let clean = batch(b, t, DType::F32);
    let dirty_fill = |j: usize| garbage[j % 3];
    let tidy_fill = |j: usize| -0.5 - (j % 7) as f32 * 0.1;
    let make = |fill: &dyn Fn(usize) -> f32| Batch {
        log_probs: with_padding(f32s(&clean.log_probs), fill),
        old: with_padding(f32s(&clean.old), fill),
        adv: clean.adv.clone(),
        mask: Tensor::from_vec(mask.clone(), (b, t), &dev()).unwrap(),
        reference: with_padding(f32s(&clean.reference), fill),
        weights: with_padding(f32s(&clean.weights), fill),
    };
    let (dirty, tidy) = (make(&dirty_fill), make(&tidy_fill));
    for loss in losses() {
        let what = format!("{:?}", loss.config());
        let bits = run_bits(&loss, &dirty, &dirty.mask);
        assert_eq!(bits, run_bits(&loss, &tidy, &tidy.mask), "{what}");
        // The kernel's gradient buffer is not zeroed before it is written: leave a freed block of
        // its size holding NaN, which the allocator is likely to hand out next.
        drop(std::hint::black_box(vec![f32::NAN; b * t]));
        let (lf, gf, mf) = values(&loss, &dirty, &dirty.mask, Backend::Auto);
        let (lc, gc, mc) = values(&loss, &tidy, &tidy.mask, Backend::Composed);
        assert!(
            (lf - lc).abs() <= 2e-5 * (1.0 + lc.abs()),
            "{what}: loss {lf} vs {lc}"
        );
        for (j, (a, c)) in gf.iter().zip(&gc).enumerate() {
            if unmasked(j) {
                assert!(
                    (a - c).abs() <= 2e-5 * (1e-3 + c.abs()) + 1e-6,
                    "{what}: ∂ℓ[{j}] {a} vs {c}"
                );
            } else {
                assert_eq!(*a, 0.0, "{what}: masked ∂ℓ[{j}]");
            }
        }
        assert_eq!(mf.token_count, mc.token_count, "{what}");
        for (got, want) in [
            (mf.neg_log_ratio_sum, mc.neg_log_ratio_sum),
            (mf.ratio_excess_sum, mc.ratio_excess_sum),
            (mf.lowest_ratio, mc.lowest_ratio),
            (mf.highest_ratio, mc.highest_ratio),
        ] {
            assert!(
                (got - want).abs() <= 2e-5 * (1.0 + want.abs()),
                "{what}: {got} vs {want}"
            );
        }
    }
}

fn f32s(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1().unwrap()
}
