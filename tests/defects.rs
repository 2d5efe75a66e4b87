//! Regression tests for the defects a new user hit (issue "The `losses` module, ..."), one per
//! defect, each on every path (fused kernel and composed ops).

mod common;

use candle_core::{DType, Device, Tensor, Var};
use common::f64s;
use sapo::{
    gate, kl_penalty, token_log_probs_and_entropy_with, Backend, Error, Grpo, Gspo, KlEstimator,
    KlPenalty, PolicyInputs, PolicyLoss, Sapo,
};

const BACKENDS: [Backend; 2] = [Backend::Auto, Backend::Composed];

fn dev() -> Device {
    Device::Cpu
}

/// Loss and gradient of one forward + backward.
fn loss_and_grad(loss: &PolicyLoss, inputs: PolicyInputs<'_>, lp: &Var) -> (f64, Vec<f64>) {
    let out = loss.forward(&inputs).unwrap();
    let grads = out.loss.backward().unwrap();
    (f64s(&out.loss)[0], f64s(grads.get(lp.as_tensor()).unwrap()))
}

/// 1. Empty micro-batches (every group filtered out) are normal: no panic, typed or empty.
#[test]
fn empty_logits_batches_give_empty_results() {
    for dims in [(0usize, 5usize), (3, 0)] {
        for backend in BACKENDS {
            let logits = Var::zeros((dims.0, dims.1, 7), DType::F32, &dev()).unwrap();
            let targets = Tensor::zeros(dims, DType::U32, &dev()).unwrap();
            let (lp, h) =
                token_log_probs_and_entropy_with(logits.as_tensor(), &targets, 1.0, backend)
                    .unwrap();
            assert_eq!(lp.dims(), &[dims.0, dims.1]);
            assert_eq!(h.dims(), &[dims.0, dims.1]);
            let total = (lp.sum_all().unwrap() + h.sum_all().unwrap()).unwrap();
            assert_eq!(total.to_scalar::<f32>().unwrap(), 0.0);
            let grads = total.backward().unwrap();
            if let Some(g) = grads.get(logits.as_tensor()) {
                assert_eq!(g.dims(), logits.dims());
            }
        }
    }
}

/// 2. Constant inputs are detached inside the crate: the same gradient on both paths, and none
///    reaches them.
#[test]
fn constant_inputs_are_detached_on_every_path() {
    let v = |x: &[[f32; 3]; 2]| Var::new(x, &dev()).unwrap();
    let lp = v(&[[-1.0, -0.5, -2.0], [-0.3, -1.2, -0.7]]);
    let old = v(&[[-1.1, -0.6, -1.9], [-0.4, -1.0, -0.7]]);
    let reference = v(&[[-1.3, -0.5, -1.0], [-0.2, -1.1, -0.9]]);
    let weights = v(&[[0.5, 1.0, 2.0], [1.0, 0.3, 1.0]]);
    let adv = Var::new(&[0.8f32, -0.4], &dev()).unwrap();
    let mask = Tensor::ones((2, 3), DType::U8, &dev()).unwrap();
    let kl = Some(KlPenalty::new(0.1, KlEstimator::K3));
    let mut results = vec![];
    for backend in BACKENDS {
        let loss = Sapo::default()
            .config()
            .with_kl(kl)
            .build()
            .unwrap()
            .with_backend(backend);
        let inputs = PolicyInputs::new(lp.as_tensor(), old.as_tensor(), adv.as_tensor(), &mask)
            .with_ref_log_probs(reference.as_tensor())
            .with_is_weights(weights.as_tensor());
        let out = loss.forward(&inputs).unwrap();
        let grads = out.loss.backward().unwrap();
        for constant in [&old, &reference, &weights, &adv] {
            assert!(grads.get(constant.as_tensor()).is_none(), "{backend:?}");
        }
        results.push(f64s(grads.get(lp.as_tensor()).unwrap()));
    }
    for (a, b) in results[0].iter().zip(&results[1]) {
        assert!((a - b).abs() < 1e-6, "{a} vs {b}");
    }
}

/// 3. A −inf logit (top-k or vocabulary masking) gives the right entropy and gradient on both
///    paths, not NaN.
#[test]
fn minus_infinity_logits_give_finite_entropy_and_gradient() {
    let ninf = f32::NEG_INFINITY;
    let data = [[0.5f32, ninf, 1.0, 2.0], [ninf, ninf, 0.0, 0.0]];
    let targets = Tensor::new(&[0u32, 2], &dev()).unwrap();
    let mut results = vec![];
    for backend in BACKENDS {
        let logits = Var::new(&data, &dev()).unwrap();
        let (lp, h) =
            token_log_probs_and_entropy_with(logits.as_tensor(), &targets, 0.9, backend).unwrap();
        let obj = (lp.sum_all().unwrap() + h.sum_all().unwrap()).unwrap();
        let g = f64s(obj.backward().unwrap().get(logits.as_tensor()).unwrap());
        let (lp, h) = (f64s(&lp), f64s(&h));
        assert!(
            h.iter().chain(&lp).chain(&g).all(|x| x.is_finite()),
            "{backend:?}"
        );
        // Second row: uniform over two tokens.
        assert!((h[1] - 2f64.ln()).abs() < 1e-6);
        assert_eq!((g[1], g[4], g[5]), (0.0, 0.0, 0.0));
        results.push((lp, h, g));
    }
    let (a, b) = (&results[0], &results[1]);
    for (x, y) in
        a.0.iter()
            .chain(&a.1)
            .chain(&a.2)
            .zip(b.0.iter().chain(&b.1).chain(&b.2))
    {
        assert!((x - y).abs() < 1e-5, "{x} vs {y}");
    }
}

/// 4. Without the log-ratio clamp, a log-ratio past f32's exp range gives a finite loss and a
///    gradient of exactly 0 where the gate or the clip cuts it (not 0·inf = NaN).
#[test]
fn overflowing_log_ratios_have_finite_zero_gradients_where_cut() {
    let cases: [(PolicyLoss, f32); 4] = [
        (Sapo::default().build().unwrap(), 1.0),
        (Sapo::default().build().unwrap(), -1.0),
        (Grpo::default().build().unwrap(), 1.0),
        (
            Grpo {
                dual_clip: Some(3.0),
                ..Default::default()
            }
            .build()
            .unwrap(),
            -1.0,
        ),
    ];
    for (loss, a) in cases {
        let loss = loss.config().with_log_ratio_clamp(None).build().unwrap();
        for backend in BACKENDS {
            let lp = Var::new(&[[-0.5f32, -1.0]], &dev()).unwrap();
            // Token 0: log-ratio 100 > 88.7; token 1: on-policy.
            let old = Tensor::new(&[[-100.5f32, -1.0]], &dev()).unwrap();
            let adv = Tensor::new(&[a], &dev()).unwrap();
            let mask = Tensor::ones((1, 2), DType::U8, &dev()).unwrap();
            let inputs = PolicyInputs::new(lp.as_tensor(), &old, &adv, &mask);
            let (value, grad) = loss_and_grad(&loss.with_backend(backend), inputs, &lp);
            let what = format!("{:?} A={a} {backend:?}", loss.config().trust_region);
            assert!(value.is_finite(), "{what}: loss {value}");
            assert_eq!(grad[0], 0.0, "{what}");
            assert!(grad[1].is_finite() && grad[1] != 0.0, "{what}");
        }
    }
}

/// 5. `kl_penalty` and the tensor gate functions name the argument in a typed error; integer
///    tensors no longer panic inside candle.
#[test]
fn kl_penalty_and_gate_reject_bad_tensors_with_typed_errors() {
    let ints = Tensor::new(&[[1i64, 2]], &dev()).unwrap();
    let floats = Tensor::new(&[[1f32, 2.0]], &dev()).unwrap();
    let other_shape = Tensor::new(&[1f32, 2.0], &dev()).unwrap();
    let err = kl_penalty(&ints, &ints, KlEstimator::K3, true).unwrap_err();
    assert!(
        matches!(
            err,
            Error::DType {
                arg: "log_probs",
                ..
            }
        ),
        "{err}"
    );
    let err = kl_penalty(&floats, &other_shape, KlEstimator::Abs, true).unwrap_err();
    assert!(
        matches!(
            err,
            Error::Shape {
                arg: "ref_log_probs",
                ..
            }
        ),
        "{err}"
    );
    // Another float dtype is converted, not an error.
    let f64s = floats.to_dtype(DType::F64).unwrap();
    let k = kl_penalty(&floats, &f64s, KlEstimator::K2, true).unwrap();
    assert_eq!(k.dtype(), DType::F32);
    let err = gate::value(&ints, 1.0).unwrap_err();
    assert!(matches!(err, Error::DType { arg: "rho", .. }), "{err}");
    let err = gate::weight(&ints, 1.0).unwrap_err();
    assert!(matches!(err, Error::DType { arg: "rho", .. }), "{err}");
}

/// 6. Garbage logits at padded positions (a row of −inf, a NaN) put nothing into the logits'
///    gradient once the loss masks those positions.
#[test]
fn garbage_logit_rows_get_zero_gradient_where_masked() {
    let (t, v) = (3, 5);
    let clean: Vec<f32> = (0..2 * t * v)
        .map(|j| ((j * 7) % 11) as f32 * 0.3 - 1.0)
        .collect();
    let mut dirty = clean.clone();
    dirty[t * v..(t + 1) * v].fill(f32::NEG_INFINITY); // row 1, token 0
    dirty[(t + 2) * v + 1] = f32::NAN; // row 1, token 2
    let targets = Tensor::new(&[[1u32, 2, 3], [0, 4, 1]], &dev()).unwrap();
    let mask = Tensor::new(&[[1u8, 1, 1], [0, 1, 0]], &dev()).unwrap();
    let old = Tensor::new(&[[-1.5f32, -1.6, -1.7], [-1.5, -1.6, -1.7]], &dev()).unwrap();
    let adv = Tensor::new(&[1.0f32, -0.5], &dev()).unwrap();
    for backend in BACKENDS {
        let run = |values: &[f32]| {
            let logits = Var::from_vec(values.to_vec(), (2, t, v), &dev()).unwrap();
            let (lp, _) =
                token_log_probs_and_entropy_with(logits.as_tensor(), &targets, 1.0, backend)
                    .unwrap();
            let loss = Sapo::default().build().unwrap().with_backend(backend);
            let out = loss
                .forward(&PolicyInputs::new(&lp, &old, &adv, &mask))
                .unwrap();
            let grads = out.loss.backward().unwrap();
            f64s(grads.get(logits.as_tensor()).unwrap())
        };
        let (g_clean, g_dirty) = (run(&clean), run(&dirty));
        assert!(g_dirty.iter().all(|g| g.is_finite()), "{backend:?}");
        let masked_rows = [t, t + 2];
        for (j, (a, b)) in g_clean.iter().zip(&g_dirty).enumerate() {
            if masked_rows.contains(&(j / v)) {
                assert_eq!(*b, 0.0, "{backend:?} logit {j}");
            } else {
                assert_eq!(a, b, "{backend:?} logit {j}");
            }
        }
    }
}

fn config_error_name(err: Error) -> &'static str {
    match err {
        Error::InvalidConfig { name, .. } => name,
        other => panic!("expected a config error, got {other}"),
    }
}

/// 7. A temperature whose `4/τ` or `1/T` overflows f32 is rejected when built or called.
#[test]
fn temperatures_that_overflow_f32_are_rejected() {
    let tiny = Sapo {
        tau_pos: 1e-40,
        ..Sapo::default()
    }
    .build();
    assert_eq!(config_error_name(tiny.unwrap_err()), "tau_pos");
    let huge = Sapo {
        tau_neg: 1e39,
        ..Sapo::default()
    }
    .build();
    assert_eq!(config_error_name(huge.unwrap_err()), "tau_neg");
    let rho = Tensor::new(&[1.0f32], &dev()).unwrap();
    assert_eq!(
        config_error_name(gate::value(&rho, 1e-40).unwrap_err()),
        "tau"
    );
    let logits = Tensor::zeros((2, 3), DType::F32, &dev()).unwrap();
    let targets = Tensor::zeros(2, DType::U32, &dev()).unwrap();
    for t in [1e-40, 1e39] {
        let err = sapo::token_log_probs(&logits, &targets, t).unwrap_err();
        assert_eq!(config_error_name(err), "temperature");
    }
}

/// 8. GSPO's sequence ratio over a very long row keeps f32's precision (row sums in f64).
#[test]
fn long_sequence_ratios_keep_their_precision() {
    let t = 262_144;
    let old: Vec<f32> = (0..t).map(|j| -1.0 - (j % 97) as f32 * 0.01).collect();
    // Log-ratios of ±1e-3 around a mean of 2e-5 (exact in f32 after the subtraction).
    let lp: Vec<f32> = old
        .iter()
        .enumerate()
        .map(|(j, o)| o + if j % 2 == 0 { 1.02e-3 } else { -0.98e-3 })
        .collect();
    let mean: f64 = lp
        .iter()
        .zip(&old)
        .map(|(l, o)| f64::from(l - o))
        .sum::<f64>()
        / t as f64;
    let s = mean.exp();
    let loss_fn = Gspo {
        eps_low: 0.2,
        eps_high: 0.2,
    }
    .build()
    .unwrap();
    for backend in BACKENDS {
        let lp_t = Tensor::from_vec(lp.clone(), (1, t), &dev()).unwrap();
        let old_t = Tensor::from_vec(old.clone(), (1, t), &dev()).unwrap();
        let adv = Tensor::new(&[1.0f32], &dev()).unwrap();
        let mask = Tensor::ones((1, t), DType::U8, &dev()).unwrap();
        let out = loss_fn
            .with_backend(backend)
            .forward(&PolicyInputs::new(&lp_t, &old_t, &adv, &mask))
            .unwrap();
        let loss = f64s(&out.loss)[0];
        assert!(
            ((loss + s) / s).abs() < 1e-6,
            "{backend:?}: loss {loss} vs {}",
            -s
        );
        let m = out.metrics.read().unwrap();
        let excess = m.ratio_mean().unwrap() - 1.0;
        assert!(
            ((excess - mean.exp_m1()) / mean.exp_m1()).abs() < 1e-4,
            "{backend:?}: ratio_mean − 1 = {excess} vs {}",
            mean.exp_m1()
        );
    }
}

/// 9. Exact ties (`ℓ = ℓold`, `ℓ = ℓref`) follow PyTorch's subgradients on every path: the `abs`
///    estimator's gradient is 0 at the tie, a clip at ratio 1 is inactive.
#[test]
fn exact_ties_follow_pytorch_on_every_path() {
    let values = [[-1.0f32, -0.5, -2.0, -0.25]];
    let adv = Tensor::new(&[1.5f32], &dev()).unwrap();
    let mask = Tensor::ones((1, 4), DType::U8, &dev()).unwrap();
    let kl = KlPenalty::new(0.5, KlEstimator::Abs);
    for backend in BACKENDS {
        let lp = Var::new(&values, &dev()).unwrap();
        let same = Tensor::new(&values, &dev()).unwrap();
        let loss = Grpo {
            dual_clip: Some(3.0),
            eps_high: 0.28,
            ..Default::default()
        }
        .config()
        .with_kl(Some(kl))
        .with_aggregation(sapo::Aggregation::TokenMean)
        .build()
        .unwrap()
        .with_backend(backend);
        let inputs =
            PolicyInputs::new(lp.as_tensor(), &same, &adv, &mask).with_ref_log_probs(&same);
        let (value, grad) = loss_and_grad(&loss, inputs, &lp);
        assert_eq!(value, -1.5, "{backend:?}");
        // −A/N from the ratio, nothing from |ℓ − ℓref| at 0.
        for g in grad {
            assert!((g + 1.5 / 4.0).abs() < 1e-7, "{backend:?}: {g}");
        }
    }
}

/// TRL's `[B,1]` advantages are accepted and mean the same as `[B]`.
#[test]
fn trl_shaped_advantages_are_accepted() {
    let lp = Tensor::new(&[[-1.0f32, -0.5], [-0.3, -1.2]], &dev()).unwrap();
    let old = Tensor::new(&[[-1.1f32, -0.4], [-0.3, -1.0]], &dev()).unwrap();
    let mask = Tensor::ones((2, 2), DType::U8, &dev()).unwrap();
    let flat = Tensor::new(&[0.7f32, -1.3], &dev()).unwrap();
    let column = flat.unsqueeze(1).unwrap();
    for backend in BACKENDS {
        let loss = Sapo::default().build().unwrap().with_backend(backend);
        let a = loss
            .forward(&PolicyInputs::new(&lp, &old, &flat, &mask))
            .unwrap();
        let b = loss
            .forward(&PolicyInputs::new(&lp, &old, &column, &mask))
            .unwrap();
        assert_eq!(f64s(&a.loss), f64s(&b.loss), "{backend:?}");
    }
    let bad = Tensor::new(&[[0.7f32, 1.0, 2.0], [-1.3, 0.0, 0.0]], &dev()).unwrap();
    let err = Sapo::default()
        .build()
        .unwrap()
        .forward(&PolicyInputs::new(&lp, &old, &bad, &mask))
        .unwrap_err();
    assert!(
        matches!(
            err,
            Error::Shape {
                arg: "advantages",
                ..
            }
        ),
        "{err}"
    );
}
