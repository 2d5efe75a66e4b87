//! The masks inside the policy loss (OPSM, top-entropy tokens, M2PO), TOPR and Clip-Cov, on every path
//! (the fused CPU kernel, the composed ops and, under `gpu-sim`, the simulated CUDA and Metal
//! kernels): each against its definition written out by hand here (OPSM and the top-entropy
//! selection as rollout weights, M2PO as a reduced mask), their typed errors, and padding
//! garbage that never reaches a value.

use candle_core::{DType, Device, Tensor, Var};
use sapo::{
    ClipCov, Error, Grpo, PolicyInputs, PolicyLoss, PolicyLossConfig, PolicyMasks, Sapo, Topr,
    Vespo,
};

#[path = "common/sim.rs"]
mod sim;

const B: usize = 6;
const T: usize = 9;

fn dev() -> Device {
    Device::Cpu
}

/// A deterministic pseudo-random vector in [−0.5, 0.5).
fn noise(n: usize, seed: u64) -> Vec<f32> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            ((state >> 11) as f64 / (1u64 << 53) as f64 - 0.5) as f32
        })
        .collect()
}

/// A tensor's values, flattened, as f32.
fn values_f32(t: &Tensor) -> Vec<f32> {
    let t = t.to_dtype(DType::F32).unwrap().flatten_all().unwrap();
    t.to_vec1().unwrap()
}

fn mat(v: Vec<f32>) -> Tensor {
    Tensor::from_vec(v, (B, T), &dev()).unwrap()
}

/// One batch: rows of different lengths (one empty), row advantages of both signs, rollout
/// log-probs that drift from the old ones by row, entropies on a grid (ties).
struct Batch {
    log_probs: Vec<f32>,
    old: Vec<f32>,
    rollout: Vec<f32>,
    entropy: Vec<f32>,
    advantages: Vec<f32>,
    mask: Vec<f32>,
}

fn batch() -> Batch {
    let n = B * T;
    let old: Vec<f32> = noise(n, 1).iter().map(|x| -1.5 + 2.0 * x).collect();
    let log_probs: Vec<f32> = old
        .iter()
        .zip(noise(n, 2))
        .map(|(o, e)| o + 0.4 * e)
        .collect();
    let rollout: Vec<f32> = (0..n)
        .map(|j| old[j] + (j / T) as f32 * 0.06 * (1.0 + noise(n, 3)[j]))
        .collect();
    let entropy = noise(n, 4)
        .iter()
        .map(|x| ((x + 0.5) * 8.0).floor() * 0.25)
        .collect();
    let advantages = vec![1.0, -0.8, -1.2, 0.5, -0.3, -2.0];
    let mask = (0..n)
        .map(|j| {
            let (i, t) = (j / T, j % T);
            if i == 4 || t >= T - i {
                0.0
            } else {
                1.0
            }
        })
        .collect();
    Batch {
        log_probs,
        old,
        rollout,
        entropy,
        advantages,
        mask,
    }
}

/// Loss and gradient of `loss` on `batch` with the optional inputs given, on every path.
fn run_all(
    loss: &PolicyLoss,
    x: &Batch,
    weights: Option<Vec<f32>>,
    mask: Option<Vec<f32>>,
    with: (bool, bool),
) -> Vec<(&'static str, f64, Vec<f64>)> {
    run_all_in(loss, x, weights, mask, with, DType::F32)
}

/// [`run_all`] with every float input in `dtype` (the mask stays f32).
fn run_all_in(
    loss: &PolicyLoss,
    x: &Batch,
    weights: Option<Vec<f32>>,
    mask: Option<Vec<f32>>,
    with: (bool, bool),
    dtype: DType,
) -> Vec<(&'static str, f64, Vec<f64>)> {
    let cast = |v: Vec<f32>| mat(v).to_dtype(dtype).unwrap();
    let lp = Var::from_tensor(&cast(x.log_probs.clone())).unwrap();
    let old = cast(x.old.clone());
    let rollout = cast(x.rollout.clone());
    let entropy = cast(x.entropy.clone());
    // Row advantages, or per-token ones.
    let adv = if x.advantages.len() == B {
        Tensor::new(x.advantages.as_slice(), &dev())
            .unwrap()
            .to_dtype(dtype)
            .unwrap()
    } else {
        cast(x.advantages.clone())
    };
    let mask = mat(mask.unwrap_or_else(|| x.mask.clone()));
    let weights = weights.map(cast);
    let mut out = vec![];
    for (name, backend, sim) in sim::paths() {
        let _guard = sim.enter();
        let mut inputs = PolicyInputs::new(lp.as_tensor(), &old, &adv, &mask);
        if with.0 {
            inputs = inputs.with_rollout_log_probs(&rollout);
        }
        if with.1 {
            inputs = inputs.with_entropy(&entropy);
        }
        inputs.is_weights = weights.as_ref();
        let (loss, grad) = loss_and_grad(&loss.with_backend(backend), &inputs, &lp);
        out.push((name, loss, grad));
    }
    out
}

/// The loss of `inputs` (its metrics checked) and its gradient with respect to `log_probs`,
/// in f64.
fn loss_and_grad(loss: &PolicyLoss, inputs: &PolicyInputs<'_>, log_probs: &Var) -> (f64, Vec<f64>) {
    let result = loss.forward(inputs).unwrap();
    result.metrics.check().unwrap();
    let grads = result.loss.backward().unwrap();
    let flat = |t: &Tensor| -> Vec<f64> {
        let t = t.flatten_all().unwrap().to_dtype(DType::F64).unwrap();
        t.to_vec1().unwrap()
    };
    let grad = flat(grads.get(log_probs.as_tensor()).unwrap());
    (flat(&result.loss)[0], grad)
}

fn assert_same(what: &str, got: &[(&str, f64, Vec<f64>)], want: &[(&str, f64, Vec<f64>)]) {
    for ((path, l, g), (_, wl, wg)) in got.iter().zip(want) {
        assert!(
            (l - wl).abs() <= 1e-6 * wl.abs().max(1.0),
            "{what} [{path}] loss {l} vs {wl}"
        );
        for (j, (a, b)) in g.iter().zip(wg).enumerate() {
            assert!(
                (a - b).abs() <= 1e-6,
                "{what} [{path}] grad[{j}] {a} vs {b}"
            );
        }
    }
}

/// OPSM's keep written out: `KL_i` of the unmasked tokens, `(A ≥ 0) ∨ (KL_i ≤ δ)`.
fn opsm_keep(x: &Batch, sampling: &[f32], delta: f64) -> Vec<f32> {
    (0..B * T)
        .map(|j| {
            let i = j / T;
            let row = i * T..(i + 1) * T;
            let n = row.clone().filter(|&k| x.mask[k] != 0.0).count();
            let kl: f64 = row
                .filter(|&k| x.mask[k] != 0.0)
                .map(|k| f64::from(sampling[k]) - f64::from(x.log_probs[k]))
                .sum::<f64>()
                / n.max(1) as f64;
            let a = if x.advantages.len() == B {
                x.advantages[i]
            } else {
                x.advantages[j]
            };
            f32::from(u8::from(a >= 0.0 || kl <= delta))
        })
        .collect()
}

fn with_masks(loss: PolicyLossConfig, masks: PolicyMasks) -> PolicyLoss {
    loss.with_masks(masks).build().unwrap()
}

#[test]
fn opsm_is_its_keep_as_rollout_weights() {
    let x = batch();
    for delta in [0.02, 0.05] {
        for config in [Sapo::default().config(), Grpo::default().config()] {
            let masks = PolicyMasks::default().with_off_policy_threshold(delta);
            // With the rollout log-probs as the sampling policy, and without (the old ones).
            for (with_rollout, sampling) in [(true, &x.rollout), (false, &x.old)] {
                let keep = opsm_keep(&x, sampling, delta);
                if with_rollout {
                    assert!(
                        keep.contains(&0.0) && keep.contains(&1.0),
                        "δ {delta}: trivial"
                    );
                }
                let got = run_all(
                    &with_masks(config, masks),
                    &x,
                    None,
                    None,
                    (with_rollout, false),
                );
                let want = run_all(
                    &config.build().unwrap(),
                    &x,
                    Some(keep),
                    None,
                    (false, false),
                );
                assert_same(&format!("OPSM δ {delta}"), &got, &want);
            }
        }
    }
}

/// With and without the caller's weights (the CPU kernel writes `w` from the decision in the
/// loop that loads the weights, or from the mask's keep when there are none).
#[test]
fn top_entropy_is_its_keep_as_rollout_weights_times_the_callers() {
    let x = batch();
    let caller: Vec<f32> = noise(B * T, 9).iter().map(|w| 1.0 + w).collect();
    for rho in [0.2, 0.5, 1.0] {
        let keep = keep_by_sort(&x.entropy, &x.mask, rho);
        for weights in [None, Some(caller.clone())] {
            let both: Vec<f32> = match &weights {
                Some(w) => keep.iter().zip(w).map(|(k, w)| k * w).collect(),
                None => keep.clone(),
            };
            for config in [Grpo::default().config(), Sapo::default().config()] {
                let masks = PolicyMasks::default().with_top_entropy_quantile(rho);
                let got = run_all(
                    &with_masks(config, masks),
                    &x,
                    weights.clone(),
                    None,
                    (false, true),
                );
                let want = run_all(
                    &config.build().unwrap(),
                    &x,
                    Some(both.clone()),
                    None,
                    (false, false),
                );
                let callers = if weights.is_some() { "with" } else { "without" };
                assert_same(
                    &format!("top-entropy ρ {rho}, {callers} the caller's weights"),
                    &got,
                    &want,
                );
            }
        }
    }
}

/// OPSM and the top-entropy selection together, with per-token advantages (signs that change
/// within a row) and the caller's weights: the product of the two factors and the weights, on
/// every path (the CPU kernel applies the decisions while it loads a tile; the other paths take
/// the factor), in f32, bf16 and f64.
#[test]
fn opsm_and_top_entropy_with_per_token_advantages() {
    let mut x = batch();
    x.advantages = noise(B * T, 11).iter().map(|a| 3.0 * a).collect();
    let caller: Vec<f32> = noise(B * T, 12).iter().map(|w| 1.0 + w).collect();
    for (delta, rho) in [(0.02, 0.3), (0.05, 0.75)] {
        let opsm = opsm_keep(&x, &x.rollout, delta);
        let top = keep_by_sort(&x.entropy, &x.mask, rho);
        // Neither factor is trivial on the unmasked tokens.
        let unmasked = |keep: &[f32], v: f32| (0..B * T).any(|j| x.mask[j] != 0.0 && keep[j] == v);
        assert!(unmasked(&opsm, 0.0) && unmasked(&opsm, 1.0), "δ {delta}");
        assert!(unmasked(&top, 0.0) && unmasked(&top, 1.0), "ρ {rho}");
        let both: Vec<f32> = (0..B * T).map(|j| opsm[j] * top[j] * caller[j]).collect();
        let masks = PolicyMasks::default()
            .with_off_policy_threshold(delta)
            .with_top_entropy_quantile(rho);
        for config in [Sapo::default().config(), Grpo::default().config()] {
            for dtype in [DType::F32, DType::BF16, DType::F64] {
                let got = run_all_in(
                    &with_masks(config, masks),
                    &x,
                    Some(caller.clone()),
                    None,
                    (true, true),
                    dtype,
                );
                let want = run_all_in(
                    &config.build().unwrap(),
                    &x,
                    Some(both.clone()),
                    None,
                    (false, false),
                    dtype,
                );
                assert_same(
                    &format!("OPSM δ {delta} and top-entropy ρ {rho}, {dtype:?}"),
                    &got,
                    &want,
                );
            }
        }
    }
}

#[test]
fn m2po_is_a_reduced_mask() {
    let x = batch();
    for tau in [0.004, 0.012] {
        let (reduced, k) = m2po_definition(&x, tau);
        assert!(k > 0, "τ {tau}: nothing masked");
        for config in [Grpo::default().config(), Sapo::default().config()] {
            let masks = PolicyMasks::default().with_m2_threshold(tau);
            let got = run_all(&with_masks(config, masks), &x, None, None, (true, false));
            let want = run_all(
                &config.build().unwrap(),
                &x,
                None,
                Some(reduced.clone()),
                (false, false),
            );
            assert_same(&format!("M2PO τ {tau}"), &got, &want);
        }
    }
}

/// M2PO's reduced mask by its definition: the mask without the `k` unmasked tokens of largest
/// `u`, ties dropped from the later token, `k` the smallest with the rest's mean below `τ`; and
/// `k`.
fn m2po_definition(x: &Batch, tau: f64) -> (Vec<f32>, usize) {
    let u: Vec<f64> = (0..B * T)
        .map(|j| f64::from(x.rollout[j] - x.old[j]).powi(2))
        .collect();
    let mut order: Vec<usize> = (0..B * T).filter(|&j| x.mask[j] != 0.0).collect();
    order.sort_by(|&a, &b| u[b].total_cmp(&u[a]).then(b.cmp(&a)));
    let k = (0..order.len())
        .find(|&k| {
            let rest = &order[k..];
            rest.iter().map(|&j| u[j]).sum::<f64>() / (rest.len() as f64) < tau
        })
        .unwrap_or(order.len() - 1);
    let mut reduced = x.mask.clone();
    for &j in &order[..k] {
        reduced[j] = 0.0;
    }
    (reduced, k)
}

/// M2PO's reduced mask is its definition on every path, ties at the cut included (the later
/// token dropped first), with per-row counts (`seq-mean-token-mean`, the sequence-level ratio of
/// GSPO-token), inputs in f32 and f64, and beside OPSM and the entropy bonus.
#[test]
fn m2po_cut_is_its_definition_with_ties_and_rows() {
    let mut x = batch();
    // Exact ties: rows 1, 2 and 5 drift by 0.25 at their even tokens (u = 0.0625).
    for j in 0..B * T {
        if matches!(j / T, 1 | 2 | 5) && (j % T).is_multiple_of(2) {
            x.old[j] = -1.25;
            x.rollout[j] = -1.5;
        }
    }
    let tied: Vec<usize> = (0..B * T)
        .filter(|&j| x.mask[j] != 0.0 && x.rollout[j] == -1.5)
        .collect();
    let mut split_ties = 0;
    for tau in (1..=24).map(|k| f64::from(k) * 0.0025) {
        let (reduced, k) = m2po_definition(&x, tau);
        if k == 0 {
            continue;
        }
        let kept_ties = tied.iter().filter(|&&j| reduced[j] != 0.0).count();
        split_ties += usize::from(kept_ties > 0 && kept_ties < tied.len());
        let m2po = PolicyMasks::default().with_m2_threshold(tau);
        let bonus = Some(sapo::EntropyBonus::new(0.01));
        let configs = [
            (
                Sapo::default()
                    .config()
                    .with_aggregation(sapo::Aggregation::SeqMeanTokenMean),
                m2po,
                (true, false),
            ),
            (
                Grpo::default()
                    .config()
                    .with_ratio_level(sapo::RatioLevel::SequenceToken),
                m2po,
                (true, false),
            ),
            // OPSM that drops nothing.
            (
                Grpo::default().config(),
                m2po.with_off_policy_threshold(1e9),
                (true, false),
            ),
            (
                Sapo::default().config().with_entropy(bonus),
                m2po,
                (true, true),
            ),
        ];
        for (config, masks, with) in configs {
            for dtype in [DType::F32, DType::F64] {
                let got = run_all_in(&with_masks(config, masks), &x, None, None, with, dtype);
                let want = run_all_in(
                    &config.build().unwrap(),
                    &x,
                    None,
                    Some(reduced.clone()),
                    (false, with.1),
                    dtype,
                );
                assert_same(&format!("M2PO τ {tau} {dtype:?}"), &got, &want);
            }
        }
    }
    assert!(split_ties > 0, "no τ cut through the ties");
}

/// M2PO's reduced mask taken once (`m2po_reduced_mask`) and passed as the mask with M2PO off is
/// the loss with M2PO on, to the bit, on every path (token- and sequence-level ratios, OPSM
/// beside it, f32 and f64 inputs); the mask it returns is the definition's, and the mask itself
/// when M2PO drops nothing; garbage at masked positions reaches nothing; bad inputs are typed
/// errors naming their argument.
#[test]
fn m2po_mask_taken_once_is_the_loss_with_m2po_on() {
    let x = batch();
    let bits = |(loss, grad): (f64, Vec<f64>)| -> (u64, Vec<u64>) {
        (loss.to_bits(), grad.iter().map(|g| g.to_bits()).collect())
    };
    let mut dirty = x.rollout.clone();
    for (j, r) in dirty.iter_mut().enumerate() {
        if x.mask[j] == 0.0 {
            *r = f32::NAN;
        }
    }
    let mut dropped_somewhere = false;
    for tau in [0.004, 0.012, 1e9] {
        let (definition, k) = m2po_definition(&x, tau);
        dropped_somewhere |= k > 0;
        for dtype in [DType::F32, DType::F64] {
            let cast = |v: &[f32]| mat(v.to_vec()).to_dtype(dtype).unwrap();
            let (old, rollout, mask) = (cast(&x.old), cast(&dirty), mat(x.mask.clone()));
            let reduced = sapo::m2po_reduced_mask(&mask, &rollout, &old, tau).unwrap();
            assert_eq!(values_f32(&reduced), definition, "τ {tau} {dtype:?}");
            if k == 0 {
                assert_eq!(
                    reduced.dtype(),
                    mask.dtype(),
                    "τ {tau}: not the mask itself"
                );
            }
            let lp = Var::from_tensor(&cast(&x.log_probs)).unwrap();
            let adv = Tensor::new(x.advantages.as_slice(), &dev())
                .unwrap()
                .to_dtype(dtype)
                .unwrap();
            let m2po = PolicyMasks::default().with_m2_threshold(tau);
            let configs = [
                (Sapo::default().config(), m2po, PolicyMasks::default()),
                (
                    Grpo::default()
                        .config()
                        .with_ratio_level(sapo::RatioLevel::SequenceToken),
                    m2po,
                    PolicyMasks::default(),
                ),
                (
                    Grpo::default().config(),
                    m2po.with_off_policy_threshold(0.01),
                    PolicyMasks::default().with_off_policy_threshold(0.01),
                ),
            ];
            for (config, on, off) in configs {
                for (path, backend, sim) in sim::paths() {
                    let _guard = sim.enter();
                    let on_loss = with_masks(config, on).with_backend(backend);
                    let off_loss = with_masks(config, off).with_backend(backend);
                    let inputs = PolicyInputs::new(lp.as_tensor(), &old, &adv, &mask)
                        .with_rollout_log_probs(&rollout);
                    // OPSM still reads `ℓroll`; nothing else does.
                    let taken_once = PolicyInputs {
                        mask: &reduced,
                        rollout_log_probs: off.off_policy_threshold.and(Some(&rollout)),
                        ..inputs
                    };
                    let want = bits(loss_and_grad(&on_loss, &inputs, &lp));
                    let got = bits(loss_and_grad(&off_loss, &taken_once, &lp));
                    assert_eq!(got, want, "τ {tau} {dtype:?} [{path}] {on:?}");
                }
            }
        }
    }
    assert!(dropped_somewhere, "no τ dropped a token");

    // Bad inputs: typed errors naming the argument.
    let arg_of = |e: Error| match e {
        Error::InvalidConfig { name, .. } => name,
        Error::InvalidValue { arg, .. } | Error::Shape { arg, .. } | Error::DType { arg, .. } => {
            arg
        }
        other => panic!("untyped error {other}"),
    };
    let (old, rollout, mask) = (
        mat(x.old.clone()),
        mat(x.rollout.clone()),
        mat(x.mask.clone()),
    );
    let reduce = |mask: &Tensor, rollout: &Tensor, old: &Tensor, tau: f64| {
        sapo::m2po_reduced_mask(mask, rollout, old, tau)
            .map(|_| ())
            .map_err(arg_of)
    };
    for tau in [0.0, -0.1, f64::NAN, f64::INFINITY] {
        assert_eq!(reduce(&mask, &rollout, &old, tau), Err("m2_threshold"));
    }
    let short = Tensor::zeros((B, T - 1), DType::F32, &dev()).unwrap();
    let vector = Tensor::zeros(B * T, DType::F32, &dev()).unwrap();
    let bytes = rollout.to_dtype(DType::U8).unwrap();
    assert_eq!(reduce(&vector, &rollout, &old, 0.01), Err("mask"));
    assert_eq!(reduce(&mask, &short, &old, 0.01), Err("rollout_log_probs"));
    assert_eq!(reduce(&mask, &bytes, &old, 0.01), Err("rollout_log_probs"));
    assert_eq!(reduce(&mask, &rollout, &short, 0.01), Err("old_log_probs"));
    let unmasked = x.mask.iter().position(|&m| m != 0.0).unwrap();
    let mut odd = x.mask.clone();
    odd[unmasked] = 0.5;
    for tau in [1e-4, 1e9] {
        assert_eq!(reduce(&mat(odd.clone()), &rollout, &old, tau), Err("mask"));
    }
    let mut nan = x.rollout.clone();
    nan[unmasked] = f32::NAN;
    for tau in [1e-4, 1e9] {
        assert_eq!(
            reduce(&mask, &mat(nan.clone()), &old, tau),
            Err("rollout_log_probs")
        );
        assert_eq!(
            reduce(&mask, &rollout, &mat(nan.clone()), tau),
            Err("old_log_probs")
        );
    }
}

/// Garbage (NaN, ±inf) at masked positions of `rollout_log_probs` and `entropy` reaches nothing.
#[test]
fn padding_garbage_never_reaches_the_masks() {
    let x = batch();
    let mut dirty = batch();
    for j in 0..B * T {
        if x.mask[j] == 0.0 {
            dirty.rollout[j] = f32::NAN;
            dirty.entropy[j] = if j % 2 == 0 { f32::INFINITY } else { f32::NAN };
        }
    }
    let masks = PolicyMasks::default()
        .with_off_policy_threshold(0.05)
        .with_top_entropy_quantile(0.5)
        .with_m2_threshold(0.02);
    let loss = with_masks(Grpo::default().config(), masks);
    let clean = run_all(&loss, &x, None, None, (true, true));
    let got = run_all(&loss, &dirty, None, None, (true, true));
    assert_same("garbage", &got, &clean);
    // M2PO alone.
    let masks = PolicyMasks::default().with_m2_threshold(0.02);
    let loss = with_masks(Grpo::default().config(), masks);
    let clean = run_all(&loss, &x, None, None, (true, false));
    let got = run_all(&loss, &dirty, None, None, (true, false));
    assert_same("garbage, M2PO alone", &got, &clean);
}

/// Every bad input is a typed error naming its argument (the peers' key).
#[test]
fn bad_masks_and_inputs_are_typed_errors() {
    let arg_of = |e: Error| match e {
        Error::InvalidConfig { name, .. } => name,
        Error::InvalidValue { arg, .. } | Error::Shape { arg, .. } => arg,
        other => panic!("untyped error {other}"),
    };
    let bad = [
        (
            PolicyMasks::default().with_top_entropy_quantile(0.0),
            "top_entropy_quantile",
        ),
        (
            PolicyMasks::default().with_top_entropy_quantile(1.01),
            "top_entropy_quantile",
        ),
        (
            PolicyMasks::default().with_top_entropy_quantile(f64::NAN),
            "top_entropy_quantile",
        ),
        (
            PolicyMasks::default().with_off_policy_threshold(0.0),
            "off_policy_mask_threshold",
        ),
        (
            PolicyMasks::default().with_off_policy_threshold(f64::INFINITY),
            "off_policy_mask_threshold",
        ),
        (
            PolicyMasks::default().with_m2_threshold(-0.1),
            "m2_threshold",
        ),
        (
            PolicyMasks::default().with_m2_threshold(f64::NAN),
            "m2_threshold",
        ),
    ];
    for (masks, key) in bad {
        let err = Grpo::default()
            .config()
            .with_masks(masks)
            .build()
            .unwrap_err();
        assert_eq!(arg_of(err), key, "{masks:?}");
    }
    // VESPO's weights enter its sequence weight: OPSM's factor cannot multiply them.
    let err = Vespo::default()
        .config()
        .with_masks(PolicyMasks::default().with_off_policy_threshold(0.1))
        .build()
        .unwrap_err();
    assert_eq!(arg_of(err), "off_policy_mask_threshold");

    let x = batch();
    let lp = mat(x.log_probs.clone());
    let adv = Tensor::new(x.advantages.as_slice(), &dev()).unwrap();
    let mask = mat(x.mask.clone());
    let inputs = PolicyInputs::new(&lp, &lp, &adv, &mask);
    let forward = |masks: PolicyMasks, inputs: &PolicyInputs<'_>| {
        with_masks(Grpo::default().config(), masks)
            .forward(inputs)
            .map(|_| ())
            .map_err(arg_of)
    };
    let top = PolicyMasks::default().with_top_entropy_quantile(0.5);
    assert_eq!(forward(top, &inputs), Err("entropy"));
    let m2 = PolicyMasks::default().with_m2_threshold(0.1);
    assert_eq!(forward(m2, &inputs), Err("rollout_log_probs"));
    // rollout_log_probs that no mask reads, of the wrong shape, or non-finite where unmasked.
    assert_eq!(
        forward(PolicyMasks::default(), &inputs.with_rollout_log_probs(&lp)),
        Err("rollout_log_probs")
    );
    let short = Tensor::zeros((B, T - 1), candle_core::DType::F32, &dev()).unwrap();
    assert_eq!(
        forward(m2, &inputs.with_rollout_log_probs(&short)),
        Err("rollout_log_probs")
    );
    let mut nan = x.log_probs.clone();
    nan[0] = f32::NAN;
    let nan = mat(nan);
    assert_eq!(
        forward(m2, &inputs.with_rollout_log_probs(&nan)),
        Err("rollout_log_probs")
    );
    assert_eq!(forward(top, &inputs.with_entropy(&nan)), Err("entropy"));
    // M2PO's reduced mask is 0/1 bytes: a mask value other than 0 and 1 stays the mask's error,
    // whether M2PO masks tokens (small τ) or nothing (large τ), and a non-finite `ℓold` where
    // unmasked is `old_log_probs`'s on the pass that masks tokens.
    let drift: Vec<f32> = (0..B * T)
        .map(|j| x.log_probs[j] + 0.1 * (j % 7) as f32)
        .collect();
    let drift = mat(drift);
    let unmasked = x.mask.iter().position(|&m| m != 0.0).unwrap();
    for odd_value in [0.5f32, 2.0] {
        let mut odd = x.mask.clone();
        odd[unmasked] = odd_value;
        let odd = mat(odd);
        for tau in [1e-4, 1e9] {
            let inputs = PolicyInputs::new(&lp, &lp, &adv, &odd).with_rollout_log_probs(&drift);
            let m2 = PolicyMasks::default().with_m2_threshold(tau);
            assert_eq!(forward(m2, &inputs), Err("mask"), "{odd_value} τ {tau}");
        }
    }
    let nan_old = PolicyInputs::new(&lp, &nan, &adv, &mask).with_rollout_log_probs(&drift);
    let m2 = PolicyMasks::default().with_m2_threshold(1e-4);
    assert_eq!(forward(m2, &nan_old), Err("old_log_probs"));
    // TOPR needs scores; no other objective takes them.
    let scores = Tensor::new(&[1f32, 0., -1., 2., 0., 1.], &dev()).unwrap();
    let topr = Topr::default().build().unwrap();
    assert_eq!(
        topr.forward(&inputs).map(|_| ()).map_err(arg_of),
        Err("scores")
    );
    assert_eq!(
        forward(PolicyMasks::default(), &inputs.with_scores(&scores)),
        Err("scores")
    );
    let wrong = Tensor::new(&[1f32, 0.], &dev()).unwrap();
    assert_eq!(
        topr.forward(&inputs.with_scores(&wrong))
            .map(|_| ())
            .map_err(arg_of),
        Err("scores")
    );
    let inf = Tensor::new(&[1f32, 0., f32::INFINITY, 2., 0., 1.], &dev()).unwrap();
    assert_eq!(
        topr.forward(&inputs.with_scores(&inf))
            .map(|_| ())
            .map_err(arg_of),
        Err("scores")
    );
}

/// TOPR by hand on every path: with every score positive it is REINFORCE (`−A·ℓ`) with weight
/// `w₊`; on the negative rows the weight is `w₋·min(ρ, 1)`, whatever the advantage's sign.
#[test]
fn topr_by_hand() {
    let x = batch();
    let lp = Var::from_tensor(&mat(x.log_probs.clone())).unwrap();
    let old = mat(x.old.clone());
    let adv = Tensor::new(x.advantages.as_slice(), &dev()).unwrap();
    let mask = mat(x.mask.clone());
    let scores = [0.5f32, 1.0, -1.0, 0.0, 2.0, -0.5];
    let topr = Topr {
        positive_weight: 0.7,
        negative_weight: 1.3,
    };
    let n = x.mask.iter().filter(|&&m| m != 0.0).count() as f64;
    let mut want_loss = 0.0;
    let mut want_grad = vec![0.0; B * T];
    for j in (0..B * T).filter(|&j| x.mask[j] != 0.0) {
        let i = j / T;
        let rho = (f64::from(x.log_probs[j]) - f64::from(x.old[j])).exp();
        let w = if scores[i] > 0.0 {
            0.7
        } else {
            1.3 * rho.min(1.0)
        };
        let a = f64::from(x.advantages[i]);
        want_loss += -w * a * f64::from(x.log_probs[j]) / n;
        want_grad[j] = -w * a / n;
    }
    let scores = Tensor::new(&scores, &dev()).unwrap();
    let config = topr.config().with_aggregation(sapo::Aggregation::TokenMean);
    for (name, backend, sim) in sim::paths() {
        let _guard = sim.enter();
        let out = config
            .build()
            .unwrap()
            .with_backend(backend)
            .forward(&PolicyInputs::new(lp.as_tensor(), &old, &adv, &mask).with_scores(&scores))
            .unwrap();
        out.metrics.check().unwrap();
        let loss = f64::from(out.loss.to_scalar::<f32>().unwrap());
        assert!(
            (loss - want_loss).abs() < 1e-5,
            "[{name}] {loss} vs {want_loss}"
        );
        let grad = out.loss.backward().unwrap();
        let grad = grad
            .get(lp.as_tensor())
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        for (j, (g, w)) in grad.iter().zip(&want_grad).enumerate() {
            assert!(
                (f64::from(*g) - w).abs() < 1e-6,
                "[{name}] grad[{j}] {g} vs {w}"
            );
        }
        assert!(out.metrics.read().unwrap().truncated_fraction().is_some());
    }
}

/// Clip-Cov on every path: GRPO's clip (no dual clip, no clamp) with the loss of
/// `max(1, ⌊N·r⌋)` drawn tokens zeroed — the same tokens on every path and thread count for a
/// seed, other tokens for another seed — and exactly GRPO's loss when the band holds no token.
#[test]
fn clip_cov_is_grpo_with_drawn_tokens_zeroed() {
    let x = batch();
    let lp = Var::from_tensor(&mat(x.log_probs.clone())).unwrap();
    let old = mat(x.old.clone());
    let adv = Tensor::new(x.advantages.as_slice(), &dev()).unwrap();
    let mask = mat(x.mask.clone());
    let n = x.mask.iter().filter(|&&m| m != 0.0).count();
    let grpo = sapo::HardClip::new(0.2, 0.2);
    let grpo = PolicyLossConfig::new(sapo::RatioLevel::Token, sapo::TrustRegion::HardClip(grpo))
        .with_log_ratio_clamp(None);
    let run = |config: PolicyLossConfig, backend, sim: &sim::Sim| {
        let _guard = sim.enter();
        let out = config
            .build()
            .unwrap()
            .with_backend(backend)
            .forward(&PolicyInputs::new(lp.as_tensor(), &old, &adv, &mask))
            .unwrap();
        out.metrics.check().unwrap();
        let fraction = out.metrics.read().unwrap().clip_fraction();
        let loss = f64::from(out.loss.to_scalar::<f32>().unwrap());
        let grads = out.loss.backward().unwrap();
        let grad: Vec<f32> = grads
            .get(lp.as_tensor())
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        (loss, grad, fraction)
    };
    // The covariances here are small: a band around them selects; one far away selects nothing.
    let selecting = ClipCov {
        ratio: 0.1,
        cov_lower: -0.5,
        cov_upper: 0.5,
        seed: 3,
        ..ClipCov::default()
    };
    let mut drawn_sets = vec![];
    for seed in [3, 4] {
        let clip_cov = ClipCov { seed, ..selecting };
        let mut first: Option<Vec<usize>> = None;
        for (name, backend, sim) in sim::paths() {
            let (loss, grad, fraction) = run(clip_cov.config(), backend, &sim);
            let (grpo_loss, grpo_grad, _) = run(grpo, backend, &sim);
            let zeroed: Vec<usize> = (0..B * T)
                .filter(|&j| grad[j] == 0.0 && grpo_grad[j] != 0.0)
                .collect();
            let want = ((n as f64 * 0.1).floor() as usize).max(1);
            assert_eq!(zeroed.len(), want, "[{name}] seed {seed}");
            assert_eq!(fraction, Some(want as f64 / n as f64), "[{name}]");
            // The zeroed tokens' GRPO losses (unclipped: −A·ρ/N) are what the loss lacks.
            let lacking: f64 = zeroed
                .iter()
                .map(|&j| {
                    let rho = (f64::from(x.log_probs[j]) - f64::from(x.old[j])).exp();
                    -f64::from(x.advantages[j / T]) * rho / n as f64
                })
                .sum();
            assert!((loss - (grpo_loss - lacking)).abs() < 1e-5, "[{name}]");
            for j in (0..B * T).filter(|j| !zeroed.contains(j)) {
                assert_eq!(grad[j], grpo_grad[j], "[{name}] grad[{j}]");
            }
            match &first {
                None => first = Some(zeroed),
                Some(f) => assert_eq!(f, &zeroed, "[{name}]: another draw than the first path's"),
            }
        }
        drawn_sets.push(first.unwrap());
    }
    assert_ne!(
        drawn_sets[0], drawn_sets[1],
        "two seeds drew the same tokens"
    );
    let none = ClipCov {
        cov_lower: 100.0,
        cov_upper: 200.0,
        ..selecting
    };
    for (name, backend, sim) in sim::paths() {
        let (loss, grad, fraction) = run(none.config(), backend, &sim);
        let (grpo_loss, grpo_grad, _) = run(grpo, backend, &sim);
        assert_eq!(loss, grpo_loss, "[{name}]");
        assert_eq!(grad, grpo_grad, "[{name}]");
        assert_eq!(fraction, Some(0.0));
    }
}

/// A batch larger than the selections' sample (4096 values), so that the top-entropy bracket is
/// a strided sample's and most values fall outside it: `b` rows of `t` tokens of
/// different lengths (one empty, one full), NaN and ±inf in the entropy's padding, row
/// advantages of both signs, a reference policy for the KL penalty, the caller's weights, and
/// entropies continuous or on a grid of a few values (ties at `θ`).
struct Large {
    dims: (usize, usize),
    log_probs: Vec<f32>,
    old: Vec<f32>,
    reference: Vec<f32>,
    advantages: Vec<f32>,
    mask: Vec<f32>,
    entropy: Vec<f32>,
    weights: Vec<f32>,
}

fn large(ties: bool) -> Large {
    let (b, t) = (24, 1000);
    let n = b * t;
    let old: Vec<f32> = noise(n, 11).iter().map(|x| -1.5 + 2.0 * x).collect();
    let log_probs = old
        .iter()
        .zip(noise(n, 12))
        .map(|(o, e)| o + 0.4 * e)
        .collect();
    let reference = old
        .iter()
        .zip(noise(n, 13))
        .map(|(o, e)| o + 0.2 * e)
        .collect();
    let advantages = noise(b, 14).iter().map(|a| 4.0 * a).collect();
    let mask = (0..n)
        .map(|j| {
            let (i, k) = (j / t, j % t);
            let len = match i {
                5 => 0,
                7 => t,
                _ => t - (i * 37) % 600,
            };
            f32::from(u8::from(k < len))
        })
        .collect::<Vec<f32>>();
    let entropy = noise(n, 15)
        .iter()
        .enumerate()
        .map(|(j, x)| match (mask[j] != 0.0, ties) {
            (false, _) => [f32::NAN, f32::INFINITY, f32::NEG_INFINITY][j % 3],
            (true, false) => (x + 0.5) * 3.0,
            (true, true) => ((x + 0.5) * 8.0).floor() * 0.25,
        })
        .collect();
    let weights = noise(n, 16).iter().map(|w| 1.0 + w).collect();
    Large {
        dims: (b, t),
        log_probs,
        old,
        reference,
        advantages,
        mask,
        entropy,
        weights,
    }
}

/// The top-entropy keep of `entropy` (as the loss reads it, in f32) written out: a full sort,
/// linear interpolation, `H ≥ θ`.
fn keep_by_sort(entropy: &[f32], mask: &[f32], rho: f64) -> Vec<f32> {
    let mut v: Vec<f64> = (0..mask.len())
        .filter(|&j| mask[j] != 0.0)
        .map(|j| f64::from(entropy[j]))
        .collect();
    v.sort_by(f64::total_cmp);
    let p = (1.0 - rho) * (v.len() - 1) as f64;
    let j = p.floor() as usize;
    let theta = v[j] + (p - j as f64) * (v.get(j + 1).copied().unwrap_or(v[j]) - v[j]);
    (0..mask.len())
        .map(|j| f32::from(u8::from(mask[j] != 0.0 && f64::from(entropy[j]) >= theta)))
        .collect()
}

/// Loss and gradient on the fused CPU path of `loss` on `x` in `dtype`, with `weights` and,
/// when given, the entropy.
fn run_large(
    loss: &PolicyLoss,
    x: &Large,
    weights: &[f32],
    entropy: Option<&[f32]>,
    dtype: DType,
) -> (f64, Vec<f64>) {
    let cast = |v: &[f32]| {
        Tensor::from_slice(v, x.dims, &dev())
            .unwrap()
            .to_dtype(dtype)
            .unwrap()
    };
    let lp = Var::from_tensor(&cast(&x.log_probs)).unwrap();
    let (old, reference, weights) = (cast(&x.old), cast(&x.reference), cast(weights));
    let adv = Tensor::from_slice(&x.advantages, x.dims.0, &dev())
        .unwrap()
        .to_dtype(dtype)
        .unwrap();
    let mask = Tensor::from_slice(&x.mask, x.dims, &dev()).unwrap();
    let entropy = entropy.map(cast);
    let mut inputs = PolicyInputs::new(lp.as_tensor(), &old, &adv, &mask);
    inputs.is_weights = Some(&weights);
    if loss.config().kl.is_some() {
        inputs = inputs.with_ref_log_probs(&reference);
    }
    if let Some(entropy) = &entropy {
        inputs = inputs.with_entropy(entropy);
    }
    loss_and_grad(loss, &inputs, &lp)
}

/// On batches larger than the sample, the fused CPU path's top-entropy selection (`θ` from the
/// sample's bracket and one pass, the kernel cutting `H` at `θ` while it loads a tile) is the
/// keep written out, multiplied into the caller's weights: the same loss and gradient to the
/// bit — for token-level and sequence-level objectives, with ties at `θ`, NaN and ±inf in
/// the padding, a KL penalty, and f32 and bf16 inputs.
#[test]
fn top_entropy_on_batches_larger_than_the_sample_is_its_keep() {
    let kl = sapo::KlPenalty::new(0.1, sapo::KlEstimator::K3);
    let configs = [
        ("SAPO", Sapo::default().config()),
        ("GRPO with KL", Grpo::default().config().with_kl(Some(kl))),
        ("GSPO", sapo::Gspo::default().config()),
        (
            "SAPO at the sequence-token level",
            Sapo::default()
                .config()
                .with_ratio_level(sapo::RatioLevel::SequenceToken),
        ),
    ];
    for ties in [false, true] {
        let x = large(ties);
        for dtype in [DType::F32, DType::BF16] {
            // The entropy as the loss reads it (rounded to `dtype`, in f32).
            let entropy = values_f32(
                &Tensor::from_slice(&x.entropy, x.dims, &dev())
                    .unwrap()
                    .to_dtype(dtype)
                    .unwrap(),
            );
            for rho in [0.05, 0.3, 1.0] {
                let keep = keep_by_sort(&entropy, &x.mask, rho);
                let kept: Vec<f32> = keep.iter().zip(&x.weights).map(|(k, w)| k * w).collect();
                for (name, config) in configs {
                    let what = format!("{name}, ρ {rho}, ties {ties}, {dtype:?}");
                    let masks = PolicyMasks::default().with_top_entropy_quantile(rho);
                    let got = run_large(
                        &with_masks(config, masks),
                        &x,
                        &x.weights,
                        Some(&entropy),
                        dtype,
                    );
                    let want = run_large(&config.build().unwrap(), &x, &kept, None, dtype);
                    assert!(got.0 == want.0, "{what}: loss {} vs {}", got.0, want.0);
                    for (j, (a, b)) in got.1.iter().zip(&want.1).enumerate() {
                        assert!(a == b, "{what}: grad[{j}] {a} vs {b}");
                    }
                }
            }
        }
    }
}
