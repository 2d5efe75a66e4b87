//! The GPU kernels against the CPU kernels: the CUDA and Metal kernel sources run on the CPU by the
//! GPU simulation (`--features gpu-sim`; g++ and clang++ needed; `SAPO_SIM_TSAN=1` compiles them
//! under ThreadSanitizer), the Metal ones with SIMD groups of 32 and of 8, and — with `--features
//! cuda` and `SAPO_TEST_DEVICE=cuda` on a machine with a GPU (`scripts/gpu-check.sh`) — the CUDA
//! kernels on the device itself: the same results as the CPU kernels for every objective, level,
//! aggregation, KL estimator, weights, dtype and mask dtype, with garbage at masked positions;
//! invalid values counted on the device and raised as the typed error when the metrics are read.
#![cfg(any(feature = "gpu-sim", feature = "cuda"))]

mod common;

#[path = "common/sim.rs"]
mod sim;
use candle_core::{DType, Device, Tensor, Var};
use common::noise;
use sapo::{
    Aggregation, Backend, Error, Grpo, Gspo, KlEstimator, KlPenalty, Normalizer, PolicyInputs,
    PolicyLoss, PolicyLossConfig, RatioLevel, Sapo, TrustRegion,
};
use sim::Sim;

/// Where a GPU kernel runs: its backend and the device its tensors live on.
#[derive(Debug, Clone)]
struct Gpu {
    name: &'static str,
    backend: Backend,
    device: Device,
    /// The GPU this thread simulates while the path runs.
    sim: Sim,
}

impl Gpu {
    /// The CPU kernels, the reference.
    fn cpu() -> Self {
        Self {
            name: "cpu",
            backend: Backend::Auto,
            device: Device::Cpu,
            sim: Sim::none(),
        }
    }

    /// `x` on this GPU's device.
    fn put(&self, x: &Tensor) -> Tensor {
        x.to_device(&self.device).unwrap()
    }
}

/// Every GPU at hand: the simulated CUDA sources and Metal sources at SIMD widths 32 and 8 (under
/// `gpu-sim`), and the CUDA device (under `cuda`, when `SAPO_TEST_DEVICE=cuda`). None at hand:
/// the tests say so and check nothing.
fn gpus() -> Vec<Gpu> {
    #[allow(unused_mut)]
    let mut all: Vec<Gpu> = vec![];
    #[cfg(feature = "gpu-sim")]
    all.extend(
        [
            ("cuda", sapo::simulation::Gpu::Cuda),
            ("metal", sapo::simulation::Gpu::Metal),
            ("metal-simd8", sapo::simulation::Gpu::MetalSimd8),
        ]
        .map(|(name, gpu)| Gpu {
            name,
            backend: Backend::Fused,
            device: Device::Cpu,
            sim: Sim::gpu(gpu),
        }),
    );
    #[cfg(feature = "cuda")]
    if std::env::var("SAPO_TEST_DEVICE").is_ok_and(|d| d == "cuda") {
        all.push(Gpu {
            name: "cuda-device",
            backend: Backend::Fused,
            device: Device::new_cuda(0).expect("SAPO_TEST_DEVICE=cuda, but no CUDA device"),
            sim: Sim::none(),
        });
    }
    if all.is_empty() {
        // Written to stderr itself, past the test harness's capture: a passing test's captured
        // output is never shown.
        use std::io::Write;
        let _ = writeln!(
            std::io::stderr(),
            "gpu_sim: no GPU at hand (build with --features gpu-sim, or run with --features cuda \
             and SAPO_TEST_DEVICE=cuda on a GPU machine): this test checked nothing"
        );
    }
    all
}

struct Batch {
    log_probs: Tensor,
    old: Tensor,
    adv: Tensor,
    mask: Tensor,
    reference: Tensor,
    weights: Tensor,
}

impl Batch {
    /// The batch on `gpu`'s device.
    fn on(&self, gpu: &Gpu) -> Batch {
        Batch {
            log_probs: gpu.put(&self.log_probs),
            old: gpu.put(&self.old),
            adv: gpu.put(&self.adv),
            mask: gpu.put(&self.mask),
            reference: gpu.put(&self.reference),
            weights: gpu.put(&self.weights),
        }
    }
}

/// A `[b,t]` batch whose masked positions hold NaN and ±inf; advantages per row, or per token.
fn batch(b: usize, t: usize, dtype: DType, per_token: bool, seed: u64) -> Batch {
    let n = b * t;
    let mask: Vec<f32> = (0..n)
        .map(|j| {
            let (row, col) = (j / t, j % t);
            // Rows of different lengths; the last row is empty when b > 2.
            let len = if b > 2 && row == b - 1 {
                0
            } else {
                t - (row * 7) % t.max(1)
            };
            f32::from(col < len)
        })
        .collect();
    let garbage = |v: Vec<f64>| -> Vec<f32> {
        v.iter()
            .zip(&mask)
            .enumerate()
            .map(|(j, (&x, &m))| {
                if m == 1.0 {
                    x as f32
                } else {
                    [f32::NAN, f32::INFINITY, f32::NEG_INFINITY][j % 3]
                }
            })
            .collect()
    };
    let old: Vec<f64> = noise(n, seed).iter().map(|x| -1.5 + 2.0 * x).collect();
    let lp: Vec<f64> = old
        .iter()
        .zip(noise(n, seed + 1))
        .map(|(o, d)| (o + 0.5 * d).min(-1e-3))
        .collect();
    let reference: Vec<f64> = lp
        .iter()
        .zip(noise(n, seed + 2))
        .map(|(l, d)| l + d)
        .collect();
    let weights: Vec<f64> = noise(n, seed + 3).iter().map(|x| 1.0 + 0.9 * x).collect();
    let m = |v: Vec<f32>| {
        Tensor::from_vec(v, (b, t), &Device::Cpu)
            .unwrap()
            .to_dtype(dtype)
            .unwrap()
    };
    let adv = if per_token {
        m(garbage(
            noise(n, seed + 4).iter().map(|x| 3.0 * x).collect(),
        ))
    } else {
        let a: Vec<f32> = noise(b, seed + 4)
            .iter()
            .map(|x| (3.0 * x) as f32)
            .collect();
        Tensor::from_vec(a, b, &Device::Cpu)
            .unwrap()
            .to_dtype(dtype)
            .unwrap()
    };
    Batch {
        log_probs: m(garbage(lp)),
        old: m(garbage(old)),
        adv,
        mask: Tensor::from_vec(mask.clone(), (b, t), &Device::Cpu).unwrap(),
        reference: m(garbage(reference)),
        weights: m(garbage(weights)),
    }
}

/// Every trust region, ratio level, aggregation and KL estimator at least once.
fn losses() -> Vec<PolicyLoss> {
    let kl = |estimator| Some(KlPenalty::new(0.05, estimator));
    let mut out = vec![
        Sapo::default().build().unwrap(),
        Sapo::default()
            .config()
            .with_kl(kl(KlEstimator::K3).map(|k| k.with_aggregation(Aggregation::SeqMeanTokenSum)))
            .build()
            .unwrap(),
        Gspo::default().build().unwrap(),
        Gspo::default()
            .config()
            .with_seq_log_ratio_max(Some(0.05))
            .build()
            .unwrap(),
        Gspo::default()
            .config()
            .with_ratio_level(RatioLevel::SequenceToken)
            .with_kl(kl(KlEstimator::K2))
            .build()
            .unwrap(),
        Gspo::default()
            .config()
            .with_kl(kl(KlEstimator::K3).map(|k| k.with_importance_weighting(true)))
            .build()
            .unwrap(),
        Grpo {
            dual_clip: Some(3.0),
            eps_high: 0.28,
            ..Grpo::default()
        }
        .config()
        .with_aggregation(Aggregation::TokenMean)
        .with_kl(kl(KlEstimator::K3Plus))
        .build()
        .unwrap(),
        PolicyLossConfig::new(
            RatioLevel::Token,
            TrustRegion::HardClip(sapo::HardClip::new(0.2, 0.2).with_delta(1.5)),
        )
        .with_log_ratio_clamp(Some(0.3))
        .with_kl(kl(KlEstimator::Abs).map(|k| k.with_clamp(false)))
        .build()
        .unwrap(),
        PolicyLossConfig::new(RatioLevel::Token, TrustRegion::Unclipped)
            .with_kl(kl(KlEstimator::K1).map(|k| k.with_importance_weighting(true)))
            .build()
            .unwrap(),
    ];
    out.extend(common::later_objectives());
    // The gate family (on the sequence level too, where the gate sees s) and Clip-Cov.
    for (gate, level) in [
        (sapo::GateFunction::Erf, RatioLevel::Token),
        (sapo::GateFunction::Arctan, RatioLevel::Sequence),
        (sapo::GateFunction::Softsign, RatioLevel::Token),
    ] {
        out.push(
            Sapo {
                gate,
                ..Sapo::default()
            }
            .config()
            .with_ratio_level(level)
            .build()
            .unwrap(),
        );
    }
    out.push(
        sapo::ClipCov {
            ratio: 0.05,
            cov_lower: -1.0,
            cov_upper: 1.0,
            seed: 11,
            ..Default::default()
        }
        .build()
        .unwrap(),
    );
    for aggregation in [
        Aggregation::TokenSum,
        Aggregation::SeqMeanTokenMean,
        Aggregation::SeqMeanTokenSumNorm { horizon: Some(64) },
        Aggregation::SeqMeanTokenSumNorm { horizon: None },
        Aggregation::SeqMean,
    ] {
        out.push(
            Sapo::default()
                .config()
                .with_aggregation(aggregation)
                .build()
                .unwrap(),
        );
    }
    out
}

struct Run {
    loss: f64,
    grad: Vec<f64>,
    metrics: sapo::MetricSums,
}

fn run(loss: &PolicyLoss, x: &Batch, mask: &Tensor, norm: Normalizer, gpu: &Gpu) -> Run {
    let (x, mask, backend) = (&x.on(gpu), &gpu.put(mask), gpu.backend);
    let lp = Var::from_tensor(&x.log_probs).unwrap();
    let mut inputs = PolicyInputs::new(lp.as_tensor(), &x.old, &x.adv, mask)
        .with_is_weights(&x.weights)
        .with_normalizer(norm);
    if loss.config().kl.is_some() {
        inputs = inputs.with_ref_log_probs(&x.reference);
    }
    let out = loss.with_backend(backend).forward(&inputs).unwrap();
    let grads = out.loss.backward().unwrap();
    let grad = grads.get(lp.as_tensor()).unwrap();
    assert_eq!(grad.dtype(), x.log_probs.dtype());
    Run {
        loss: common::f64s(&out.loss)[0],
        grad: common::f64s(grad),
        metrics: out.metrics.read().unwrap(),
    }
}

fn close(what: &str, got: f64, want: f64, tol: f64) {
    let ok = (got - want).abs() <= tol * (1e-3 + want.abs()) || (got == want);
    assert!(ok, "{what}: simulated {got} vs CPU {want}");
}

fn compare(what: &str, sim: &Run, cpu: &Run, tol: f64) {
    close(&format!("{what} loss"), sim.loss, cpu.loss, tol);
    for (j, (a, b)) in sim.grad.iter().zip(&cpu.grad).enumerate() {
        close(&format!("{what} grad[{j}]"), *a, *b, tol);
    }
    let (s, c) = (&sim.metrics, &cpu.metrics);
    assert_eq!(s.token_count, c.token_count, "{what} tokens");
    let pairs = [
        (
            "neg_log_ratio_sum",
            s.neg_log_ratio_sum,
            c.neg_log_ratio_sum,
        ),
        ("ratio_excess_sum", s.ratio_excess_sum, c.ratio_excess_sum),
        ("lowest_ratio", s.lowest_ratio, c.lowest_ratio),
        ("highest_ratio", s.highest_ratio, c.highest_ratio),
    ];
    for (name, a, b) in pairs {
        close(&format!("{what} {name}"), a, b, tol);
    }
    let options = [
        ("clipped", s.clipped_count, c.clipped_count),
        ("dual_clipped", s.dual_clipped_count, c.dual_clipped_count),
        ("clip_low", s.clip_low_count, c.clip_low_count),
        ("clip_high", s.clip_high_count, c.clip_high_count),
        ("gate_weight", s.gate_weight_sum, c.gate_weight_sum),
        ("gate_value", s.gate_value_sum, c.gate_value_sum),
        ("kl", s.kl_sum, c.kl_sum),
        ("kl_loss", s.kl_loss, c.kl_loss),
        ("clipped_pos", s.clipped_pos_count, c.clipped_pos_count),
        ("clipped_neg", s.clipped_neg_count, c.clipped_neg_count),
        ("truncated", s.truncated_count, c.truncated_count),
        ("abs_log_ratio", s.abs_log_ratio_sum, c.abs_log_ratio_sum),
    ];
    for (name, a, b) in options {
        assert_eq!(a.is_some(), b.is_some(), "{what} {name} presence");
        if let (Some(a), Some(b)) = (a, b) {
            close(&format!("{what} {name}"), a, b, tol);
        }
    }
}

#[test]
fn simulated_gpus_policy_loss_matches_the_cpu_kernel() {
    for target in gpus() {
        let _gpu = target.sim.enter();
        let gpu = target.name;
        let norms = [
            Normalizer::default(),
            // Global counts of 4 shards, each at most 1,200 tokens and 5 rows.
            Normalizer {
                global_tokens: Some(5000.0),
                global_sequences: Some(20.0),
                world_size: 4,
            },
        ];
        // Every objective in every dtype, each at three row lengths (one warp; several warps with
        // the tail of a warp; 256 threads striding over a row longer than the block).
        let shapes = [(4, 300), (3, 7), (5, 40)];
        let dtypes = [DType::F32, DType::F16, DType::BF16];
        for (k, loss) in losses().iter().enumerate() {
            for (d, &dtype) in dtypes.iter().enumerate() {
                let case = (k * dtypes.len() + d) as u64;
                let (b, t) = shapes[(k + d) % shapes.len()];
                let tol = if dtype == DType::F32 { 2e-4 } else { 2e-2 };
                let x = batch(b, t, dtype, k % 3 == 1, case);
                let mask = if case.is_multiple_of(2) {
                    x.mask.to_dtype(DType::U8).unwrap()
                } else {
                    x.mask.to_dtype(dtype).unwrap()
                };
                let norm = norms[(case % 2) as usize];
                let what = format!("{gpu} [{b}x{t} {dtype:?} loss {k}]");
                let sim = run(loss, &x, &mask, norm, &target);
                let cpu = run(loss, &x, &mask, norm, &Gpu::cpu());
                compare(&what, &sim, &cpu, tol);
            }
        }
    }
}

#[test]
fn simulated_gpus_counts_invalid_values_and_raises_them_when_metrics_are_read() {
    for target in gpus() {
        let _gpu = target.sim.enter();
        let (gpu, backend) = (target.name, target.backend);
        let x = batch(3, 50, DType::F32, false, 7);
        let loss = Grpo::default()
            .config()
            .with_kl(Some(KlPenalty::new(0.1, KlEstimator::K3)))
            .build()
            .unwrap()
            .with_backend(backend);
        let mut poisoned = x.log_probs.to_vec2::<f32>().unwrap();
        poisoned[0][0] = f32::NAN; // unmasked: row 0 has every token
        let lp = Tensor::new(poisoned, &target.device).unwrap();
        let x = x.on(&target);
        let inputs =
            PolicyInputs::new(&lp, &x.old, &x.adv, &x.mask).with_ref_log_probs(&x.reference);
        // The forward reads nothing back: it returns, and the check surfaces with the metrics.
        let out = loss.forward(&inputs).unwrap();
        for err in [
            out.metrics.check().unwrap_err(),
            out.metrics.read().unwrap_err(),
        ] {
            eprintln!("{gpu}: {err}");
            assert!(
                matches!(
                    err,
                    Error::InvalidValue {
                        arg: "log_probs",
                        ..
                    }
                ),
                "{err:?}"
            );
        }
        // A merged metric carries the flag on.
        assert!(out.metrics.merge(&out.metrics).unwrap().check().is_err());

        let mut mask = x.mask.to_vec2::<f32>().unwrap();
        mask[1][3] = 2.0;
        let mask = Tensor::new(mask, &target.device).unwrap();
        let out = loss
            .forward(
                &PolicyInputs::new(&x.log_probs, &x.old, &x.adv, &mask)
                    .with_ref_log_probs(&x.reference),
            )
            .unwrap();
        assert!(matches!(
            out.metrics.read().unwrap_err(),
            Error::InvalidValue { arg: "mask", .. }
        ));
        let mut reference = x.reference.to_vec2::<f32>().unwrap();
        reference[1][1] = f32::INFINITY;
        let reference = Tensor::new(reference, &target.device).unwrap();
        let out = loss
            .forward(
                &PolicyInputs::new(&x.log_probs, &x.old, &x.adv, &x.mask)
                    .with_ref_log_probs(&reference),
            )
            .unwrap();
        assert!(matches!(
            out.metrics.read().unwrap_err(),
            Error::InvalidValue {
                arg: "ref_log_probs",
                ..
            }
        ));
        // Garbage at masked positions only: no error.
        let clean = PolicyInputs::new(&x.log_probs, &x.old, &x.adv, &x.mask)
            .with_ref_log_probs(&x.reference);
        let out = loss.forward(&clean).unwrap();
        out.metrics.check().unwrap();
    }
}

#[test]
fn simulated_gpus_handles_empty_batches() {
    for target in gpus() {
        let _gpu = target.sim.enter();
        let gpu = target.name;
        for (b, t) in [(0, 5), (3, 0)] {
            let x = batch(b, t, DType::F32, false, 3);
            for loss in [
                Sapo::default().build().unwrap(),
                Gspo::default().build().unwrap(),
            ] {
                let sim = run(&loss, &x, &x.mask, Normalizer::default(), &target);
                let cpu = run(&loss, &x, &x.mask, Normalizer::default(), &Gpu::cpu());
                compare(&format!("{gpu} [{b}x{t}]"), &sim, &cpu, 0.0);
            }
        }
    }
}

/// The CPU copy of `x` (an empty tensor on a GPU is only moved, never computed on: candle's CUDA
/// backend refuses zero-block launches).
fn host(x: &Tensor) -> Tensor {
    x.to_device(&Device::Cpu).unwrap()
}

/// The gradient of `Σ outputs` (summed on the CPU) with respect to each of `inputs`, on the CPU:
/// `None` where none reaches it.
fn empty_grads(outputs: &[&Tensor], inputs: &[&Var]) -> Vec<Option<Tensor>> {
    let mut total = Tensor::zeros((), DType::F32, &Device::Cpu).unwrap();
    for x in outputs {
        assert_eq!(x.elem_count(), 0, "an empty batch gives empty results");
        total = (total + host(x).sum_all().unwrap()).unwrap();
    }
    let grads = total.backward().unwrap();
    inputs
        .iter()
        .map(|v| grads.get(v.as_tensor()).map(host))
        .collect()
}

#[test]
fn simulated_gpus_log_probs_of_empty_batches_are_empty_and_differentiable() {
    for target in gpus() {
        let _gpu = target.sim.enter();
        let gpu = target.name;
        let mut results = vec![];
        for on in [&target, &Gpu::cpu()] {
            let mut got = vec![];
            for dtype in [DType::F32, DType::BF16] {
                // Token log-probs of [0, V] logits.
                let logits = Tensor::zeros((0, 7), dtype, &Device::Cpu).unwrap();
                let logits = Var::from_tensor(&on.put(&logits)).unwrap();
                let targets = on.put(&Tensor::zeros(0, DType::U32, &Device::Cpu).unwrap());
                let (lp, h) = sapo::token_log_probs_and_entropy_with(
                    logits.as_tensor(),
                    &targets,
                    1.0,
                    on.backend,
                )
                .unwrap();
                assert_eq!((lp.dims(), h.dims()), (&[0][..], &[0][..]), "{gpu}");
                assert!(lp.device().same_device(&on.device), "{gpu}: ℓ's device");
                got.push(empty_grads(&[&lp, &h], &[&logits]));
                // Linear log-probs and the policy loss from [2, 0, H] hidden states.
                let hidden = Tensor::zeros((2, 0, 4), dtype, &Device::Cpu).unwrap();
                let hidden = Var::from_tensor(&on.put(&hidden)).unwrap();
                let weight =
                    Var::from_tensor(&on.put(&floats(24, 61, 0.5).reshape((6, 4)).unwrap()))
                        .unwrap();
                let targets = on.put(&Tensor::zeros((2, 0), DType::U32, &Device::Cpu).unwrap());
                let (lp, h) = sapo::linear_log_probs_and_entropy_with(
                    hidden.as_tensor(),
                    weight.as_tensor(),
                    None,
                    &targets,
                    1.0,
                    on.backend,
                )
                .unwrap();
                assert_eq!((lp.dims(), h.dims()), (&[2, 0][..], &[2, 0][..]), "{gpu}");
                got.push(empty_grads(&[&lp, &h], &[&hidden, &weight]));
                let empty = on.put(&Tensor::zeros((2, 0), DType::F32, &Device::Cpu).unwrap());
                let mask = on.put(&Tensor::zeros((2, 0), DType::U8, &Device::Cpu).unwrap());
                let adv = on.put(&floats(2, 62, 1.0));
                let head = sapo::LmHead::new(hidden.as_tensor(), weight.as_tensor(), &targets);
                let out = Sapo::default()
                    .build()
                    .unwrap()
                    .with_backend(on.backend)
                    .forward_from_hidden(&PolicyInputs::new(head, &empty, &adv, &mask))
                    .unwrap();
                assert!(
                    out.loss.device().same_device(&on.device),
                    "{gpu}: the loss's device"
                );
                let loss = common::f64s(&out.loss)[0];
                assert_eq!(loss, 0.0, "{gpu}: the loss of no token");
                assert_eq!(out.metrics.read().unwrap().token_count, 0.0, "{gpu}");
                let grads = host(&out.loss).backward().unwrap();
                got.push(vec![grads.get(hidden.as_tensor()).map(host)]);
            }
            results.push(got);
        }
        // The same gradients reach the same inputs (all empty) on the GPU as on the CPU.
        let shapes = |r: &Vec<Vec<Option<Tensor>>>| -> Vec<Vec<Option<Vec<usize>>>> {
            r.iter()
                .map(|g| {
                    g.iter()
                        .map(|x| x.as_ref().map(|x| x.dims().to_vec()))
                        .collect()
                })
                .collect()
        };
        assert_eq!(shapes(&results[0]), shapes(&results[1]), "{gpu}");
    }
}

/// `(ℓ, H, ∂(Σ u·ℓ + Σ v·H)/∂logits)` of `[n, vocab]` logits on `gpu`.
fn log_probs_run(
    logits: &Tensor,
    targets: &Tensor,
    temperature: f64,
    gpu: &Gpu,
) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
    let var = Var::from_tensor(&gpu.put(logits)).unwrap();
    let targets = &gpu.put(targets);
    let (lp, h) =
        sapo::token_log_probs_and_entropy_with(var.as_tensor(), targets, temperature, gpu.backend)
            .unwrap();
    assert_eq!(lp.dtype(), DType::F32);
    let n = lp.dim(0).unwrap();
    let u = Tensor::from_vec(
        noise(n, 11).iter().map(|x| *x as f32).collect::<Vec<_>>(),
        n,
        &gpu.device,
    )
    .unwrap();
    let v = Tensor::from_vec(
        noise(n, 12).iter().map(|x| *x as f32).collect::<Vec<_>>(),
        n,
        &gpu.device,
    )
    .unwrap();
    let objective =
        ((&lp * &u).unwrap().sum_all().unwrap() + (&h * &v).unwrap().sum_all().unwrap()).unwrap();
    let grads = objective.backward().unwrap();
    let grad = grads.get(var.as_tensor()).unwrap();
    assert_eq!(grad.dtype(), logits.dtype());
    (common::f64s(&lp), common::f64s(&h), common::f64s(grad))
}

#[test]
fn simulated_gpus_log_probs_match_the_cpu_kernel() {
    for target in gpus() {
        let _gpu = target.sim.enter();
        let gpu = target.name;
        let cases = [
            (3, 7, DType::F32),
            (4, 700, DType::F16),
            (2, 5000, DType::BF16),
            (5, 33, DType::F32),
        ];
        for (k, &(n, vocab, dtype)) in cases.iter().enumerate() {
            // Some logits at −∞ (a masked vocabulary), a peak at the target of row 0.
            let values: Vec<f32> = noise(n * vocab, 20 + k as u64)
                .iter()
                .enumerate()
                .map(|(j, x)| {
                    if j % 11 == 3 {
                        f32::NEG_INFINITY
                    } else {
                        (6.0 * x) as f32
                    }
                })
                .collect();
            let logits = Tensor::from_vec(values, (n, vocab), &Device::Cpu)
                .unwrap()
                .to_dtype(dtype)
                .unwrap();
            let ids: Vec<u32> = (0..n).map(|i| ((i * 7919 + 1) % vocab) as u32).collect();
            let ids = Tensor::from_vec(ids, n, &Device::Cpu).unwrap();
            let targets = match k % 3 {
                0 => ids,
                1 => ids.to_dtype(DType::I64).unwrap(),
                _ => ids.to_dtype(DType::U8).unwrap(),
            };
            let temperature = [1.0, 0.7, 1.3][k % 3];
            let tol = if dtype == DType::F32 { 1e-5 } else { 2e-2 };
            let sim = log_probs_run(&logits, &targets, temperature, &target);
            let cpu = log_probs_run(&logits, &targets, temperature, &Gpu::cpu());
            let what = format!("{gpu} [{n}x{vocab} {dtype:?}]");
            for (name, a, b) in [
                ("ℓ", &sim.0, &cpu.0),
                ("H", &sim.1, &cpu.1),
                ("grad", &sim.2, &cpu.2),
            ] {
                for (j, (x, y)) in a.iter().zip(b).enumerate() {
                    close(&format!("{what} {name}[{j}]"), *x, *y, tol);
                }
            }
        }
    }
}

#[test]
fn simulated_gpus_log_probs_turn_bad_target_ids_into_nan_without_a_host_read() {
    for target in gpus() {
        let _gpu = target.sim.enter();
        let (gpu, backend) = (target.name, target.backend);
        let logits = Tensor::from_vec(
            noise(12, 3).iter().map(|x| *x as f32).collect::<Vec<_>>(),
            (3, 4),
            &Device::Cpu,
        )
        .unwrap();
        let targets = Tensor::new(&[1u32, 9, 3], &Device::Cpu).unwrap();
        // The CPU path reads the ids on the host and refuses them.
        assert!(matches!(
            sapo::token_log_probs_and_entropy_with(&logits, &targets, 1.0, Backend::Auto),
            Err(Error::InvalidValue { arg: "targets", .. })
        ));
        // The GPU kernel makes the row NaN; the policy loss then reports it as a typed error.
        let (lp, h) = sapo::token_log_probs_and_entropy_with(
            &target.put(&logits),
            &target.put(&targets),
            1.0,
            backend,
        )
        .unwrap();
        let (lp, h) = (common::f64s(&lp), common::f64s(&h));
        assert!(lp[1].is_nan() && h[1].is_nan(), "{gpu}: {lp:?} {h:?}");
        assert!(lp[0].is_finite() && lp[2].is_finite() && h[0].is_finite());
        let dev = &target.device;
        let lp = Tensor::from_vec(lp.iter().map(|x| *x as f32).collect(), (1, 3), dev).unwrap();
        let adv = Tensor::new(&[1.0f32], dev).unwrap();
        let mask = Tensor::new(&[[1u8, 1, 1]], dev).unwrap();
        let out = Grpo::default()
            .build()
            .unwrap()
            .with_backend(backend)
            .forward(&PolicyInputs::new(&lp, &lp.detach(), &adv, &mask))
            .unwrap();
        assert!(matches!(
            out.metrics.check(),
            Err(Error::InvalidValue {
                arg: "log_probs",
                ..
            })
        ));
    }
}

/// `len` pseudo-random f32 values in `[−scale, scale]`, as a `[len]` tensor.
fn floats(len: usize, seed: u64, scale: f64) -> Tensor {
    let values: Vec<f32> = noise(len, seed)
        .iter()
        .map(|x| (scale * x) as f32)
        .collect();
    Tensor::from_vec(values, len, &Device::Cpu).unwrap()
}

/// `(ℓ, H, ∂h, ∂W, ∂b)` of the fused linear log-probs on `gpu`, with `Σ u·ℓ + Σ v·H` as the
/// objective.
fn linear_run(
    (hidden, weight, bias): (&Tensor, &Tensor, Option<&Tensor>),
    targets: &Tensor,
    gpu: &Gpu,
) -> Vec<Vec<f64>> {
    let (h, w) = (
        Var::from_tensor(&gpu.put(hidden)).unwrap(),
        Var::from_tensor(&gpu.put(weight)).unwrap(),
    );
    let b = bias.map(|b| Var::from_tensor(&gpu.put(b)).unwrap());
    let (targets, backend) = (&gpu.put(targets), gpu.backend);
    let (lp, ent) = sapo::linear_log_probs_and_entropy_with(
        h.as_tensor(),
        w.as_tensor(),
        b.as_ref().map(Var::as_tensor),
        targets,
        0.8,
        backend,
    )
    .unwrap();
    let n = lp.elem_count();
    let weights = |seed| {
        Tensor::from_vec(
            noise(n, seed).iter().map(|x| *x as f32).collect::<Vec<_>>(),
            lp.shape(),
            &gpu.device,
        )
        .unwrap()
    };
    let objective = ((&lp * weights(31)).unwrap().sum_all().unwrap()
        + (&ent * weights(32)).unwrap().sum_all().unwrap())
    .unwrap();
    let grads = objective.backward().unwrap();
    let mut out = vec![
        common::f64s(&lp),
        common::f64s(&ent),
        common::f64s(grads.get(h.as_tensor()).unwrap()),
        common::f64s(grads.get(w.as_tensor()).unwrap()),
    ];
    if let Some(b) = &b {
        out.push(common::f64s(grads.get(b.as_tensor()).unwrap()));
    }
    out
}

#[test]
fn simulated_gpus_fused_linear_log_probs_match_the_cpu_kernel() {
    for target in gpus() {
        let _gpu = target.sim.enter();
        let gpu = target.name;
        // 17 rows and 150 ids: the simulation's chunks of 7 rows and tiles of 64 ids leave partial
        // chunks and tiles.
        let (n, h, v) = (17, 12, 150);
        let hidden = floats(n * h, 41, 1.0).reshape((1, n, h)).unwrap();
        let weight = floats(v * h, 42, 0.8).reshape((v, h)).unwrap();
        let bias = floats(v, 43, 0.5);
        let ids: Vec<u32> = (0..n).map(|i| ((i * 37 + 5) % v) as u32).collect();
        let targets = Tensor::from_vec(ids, (1, n), &Device::Cpu).unwrap();
        for (half, bias) in [(false, Some(&bias)), (true, None)] {
            // bf16 hidden states are computed in f32 on both paths.
            let hidden = if half {
                hidden.to_dtype(DType::BF16).unwrap()
            } else {
                hidden.clone()
            };
            let sim = linear_run((&hidden, &weight, bias), &targets, &target);
            let cpu = linear_run((&hidden, &weight, bias), &targets, &Gpu::cpu());
            let names = ["ℓ", "H", "∂hidden", "∂weight", "∂bias"];
            for ((name, a), b) in names.iter().zip(&sim).zip(&cpu) {
                assert_eq!(a.len(), b.len());
                for (j, (x, y)) in a.iter().zip(b).enumerate() {
                    close(
                        &format!("{gpu} bias {} {name}[{j}]", bias.is_some()),
                        *x,
                        *y,
                        2e-4,
                    );
                }
            }
        }
    }
}

#[test]
fn simulated_gpus_policy_loss_from_hidden_states_matches_the_cpu_one_pass() {
    for target in gpus() {
        let _gpu = target.sim.enter();
        let gpu = target.name;
        let (b, t, h, v) = (2, 9, 8, 70);
        let hidden =
            Var::from_tensor(&floats(b * t * h, 51, 1.0).reshape((b, t, h)).unwrap()).unwrap();
        let weight = Var::from_tensor(&floats(v * h, 52, 0.7).reshape((v, h)).unwrap()).unwrap();
        let ids: Vec<u32> = (0..b * t).map(|i| ((i * 13 + 2) % v) as u32).collect();
        let targets = Tensor::from_vec(ids, (b, t), &Device::Cpu).unwrap();
        // Old log-probs near the current ones: the ratios stay around 1.
        let (lp, _) = sapo::linear_log_probs_and_entropy(
            hidden.as_tensor(),
            weight.as_tensor(),
            None,
            &targets,
            1.0,
        )
        .unwrap();
        let old = (lp.detach() + floats(b * t, 53, 0.3).reshape((b, t)).unwrap()).unwrap();
        let adv = floats(b, 54, 2.0);
        let mask = Tensor::ones((b, t), DType::U8, &Device::Cpu).unwrap();
        let mut results = vec![];
        for on in [&target, &Gpu::cpu()] {
            let hidden = Var::from_tensor(&on.put(hidden.as_tensor())).unwrap();
            let weight = Var::from_tensor(&on.put(weight.as_tensor())).unwrap();
            let targets = on.put(&targets);
            let head = sapo::LmHead::new(hidden.as_tensor(), weight.as_tensor(), &targets);
            let (old, adv, mask) = (on.put(&old), on.put(&adv), on.put(&mask));
            let inputs = PolicyInputs::new(head, &old, &adv, &mask);
            let out = Sapo::default()
                .build()
                .unwrap()
                .with_backend(on.backend)
                .forward_from_hidden(&inputs)
                .unwrap();
            let grads = out.loss.backward().unwrap();
            results.push((
                common::f64s(&out.loss)[0],
                common::f64s(grads.get(hidden.as_tensor()).unwrap()),
                common::f64s(grads.get(weight.as_tensor()).unwrap()),
            ));
        }
        let (sim, cpu) = (&results[0], &results[1]);
        close(&format!("{gpu} loss"), sim.0, cpu.0, 2e-4);
        for (j, (x, y)) in sim
            .1
            .iter()
            .zip(&cpu.1)
            .chain(sim.2.iter().zip(&cpu.2))
            .enumerate()
        {
            close(&format!("{gpu} grad[{j}]"), *x, *y, 2e-4);
        }
    }
}

#[test]
fn simulated_gpus_results_do_not_depend_on_thread_scheduling() {
    // The device's own scheduling too: the same bits run after run.
    for target in gpus() {
        let _gpu = target.sim.enter();
        let gpu = target.name;
        // The simulation's threads interleave differently on every run: fixed reduction orders must
        // still give the same bits.
        let x = batch(4, 300, DType::F32, false, 77);
        let kl = KlPenalty::new(0.05, KlEstimator::K3).with_importance_weighting(true);
        let loss = Gspo::default().config().with_kl(Some(kl)).build().unwrap();
        let bits = || {
            let r = run(&loss, &x, &x.mask, Normalizer::default(), &target);
            let metrics = [r.metrics.neg_log_ratio_sum, r.metrics.ratio_excess_sum];
            std::iter::once(r.loss)
                .chain(r.grad)
                .chain(metrics)
                .map(f64::to_bits)
                .collect::<Vec<_>>()
        };
        let first = bits();
        for _ in 0..2 {
            assert_eq!(first, bits(), "{gpu}");
        }
        let logits = floats(3 * 2000, 61, 5.0).reshape((3, 2000)).unwrap();
        let targets = Tensor::new(&[5u32, 1999, 0], &Device::Cpu).unwrap();
        let once = log_probs_run(&logits, &targets, 1.0, &target);
        assert_eq!(
            once,
            log_probs_run(&logits, &targets, 1.0, &target),
            "{gpu}"
        );
    }
}
