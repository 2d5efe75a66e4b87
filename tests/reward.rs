//! Reward shaping: the overlong penalty and the KL controller against their formulas, their
//! properties and their errors (the peers' own numbers are golden cases in `tests/golden/`).

use candle_core::{Device, Tensor};
use proptest::prelude::*;
use sapo::reward::{kl_in_reward, BeyondMax, KlController, OverlongPenalty};
use sapo::{Error, KlEstimator};

proptest! {
    /// Both forms: 0 up to `L_max − b`, non-increasing in the length, `−f` at `L_max`; the cap
    /// stays at `−f` past it, the linear form keeps falling.
    #[test]
    fn overlong_penalty_shape(max in 1usize..64, buffer_frac in 0.0f64..1.0, factor in 0.0f64..3.0, length in 0usize..128) {
        let buffer = ((max as f64 * buffer_frac) as usize).max(1).min(max);
        for beyond in [BeyondMax::Linear, BeyondMax::Cap] {
            let p = OverlongPenalty { max_length: max, buffer, penalty_factor: factor, beyond_max: beyond };
            prop_assert!(p.validate().is_ok());
            if length <= max - buffer {
                prop_assert_eq!(p.penalty(length), 0.0);
            }
            prop_assert!(p.penalty(length + 1) <= p.penalty(length));
            prop_assert!((p.penalty(max) + factor).abs() < 1e-12);
            let past = p.penalty(max + 1);
            match beyond {
                BeyondMax::Cap => prop_assert_eq!(past, -factor),
                BeyondMax::Linear => prop_assert!((past + factor * (1.0 + 1.0 / buffer as f64)).abs() < 1e-9),
            }
        }
    }

    /// The adaptive update is the formula, its step bounded by ±0.2·n/horizon; the fixed one
    /// never moves.
    #[test]
    fn controller_update(init in 0.0f64..1.0, target in 0.01f64..1.0, kl in -2.0f64..2.0, n in 0usize..64) {
        let mut adaptive = KlController::adaptive(init, target, 64).unwrap();
        adaptive.update(kl, n).unwrap();
        let error = (kl / target - 1.0).clamp(-0.2, 0.2);
        prop_assert!((adaptive.coef() - init * (1.0 + error * n as f64 / 64.0)).abs() < 1e-12);
        let mut fixed = KlController::fixed(init).unwrap();
        fixed.update(kl, n).unwrap();
        prop_assert_eq!(fixed.coef(), init);
    }
}

#[test]
fn bad_settings_are_typed_errors() {
    let named = |e: Error, want: &str| match e {
        Error::InvalidConfig { name, .. } => assert_eq!(name, want),
        Error::InvalidValue { arg, .. } => assert_eq!(arg, want),
        other => panic!("{other:?}"),
    };
    named(OverlongPenalty::verl(0, 0, 1.0).unwrap_err(), "max_length");
    named(OverlongPenalty::verl(16, 0, 1.0).unwrap_err(), "buffer");
    named(OverlongPenalty::trl(16, 17).unwrap_err(), "buffer");
    named(
        OverlongPenalty::verl(16, 4, f64::NAN).unwrap_err(),
        "penalty_factor",
    );
    named(KlController::adaptive(0.1, 0.0, 10).unwrap_err(), "target");
    named(KlController::adaptive(0.1, 0.1, 0).unwrap_err(), "horizon");
    named(KlController::fixed(-1.0).unwrap_err(), "init_coef");
    let mut c = KlController::adaptive(0.1, 0.1, 10).unwrap();
    named(c.update(0.0, 51).unwrap_err(), "n_steps");
    let dev = Device::Cpu;
    let p = OverlongPenalty::verl(16, 4, 1.0).unwrap();
    let lengths = Tensor::new(&[3i64, -1], &dev).unwrap();
    named(p.penalties(&lengths).unwrap_err(), "lengths");
    let floats = Tensor::new(&[3.0f32], &dev).unwrap();
    named(p.penalties(&floats).unwrap_err(), "lengths");
    let scores = Tensor::new(&[f32::NAN], &dev).unwrap();
    let err = p
        .apply(&scores, &Tensor::new(&[3u32], &dev).unwrap())
        .unwrap_err();
    // `[B]` scores have no mask: the error does not speak of unmasked positions.
    assert!(
        matches!(&err, Error::InvalidValue { expected, .. } if expected == "finite values"),
        "{err:?}"
    );
    named(err, "scores");
}

/// An empty batch (`B = 0`) has `current_kl = 0`, not the NaN of a mean over no rows, and the
/// adaptive controller's update with it leaves `β` as it was.
#[test]
fn kl_in_reward_of_an_empty_batch() {
    let dev = Device::Cpu;
    let empty = Tensor::zeros((0, 4), candle_core::DType::F32, &dev).unwrap();
    let mut c = KlController::adaptive(0.1, 0.1, 10).unwrap();
    let out = kl_in_reward(&empty, &empty, &empty, &empty, KlEstimator::K1, false, &c).unwrap();
    assert_eq!(out.rewards.dims(), [0, 4]);
    assert_eq!(out.current_kl, 0.0);
    c.update(out.current_kl, 0).unwrap();
    assert_eq!(c.coef(), 0.1);
}

/// Padding never reaches a reward's KL term or `current_kl`; an unmasked non-finite log-prob is
/// an error naming it.
#[test]
fn kl_in_reward_ignores_padding() {
    let dev = Device::Cpu;
    let scores = Tensor::new(&[[0.0f32, 1.0, 0.0]], &dev).unwrap();
    let old = Tensor::new(&[[-1.0f32, -0.5, f32::NAN]], &dev).unwrap();
    let reference = Tensor::new(&[[-1.5f32, -0.5, f32::INFINITY]], &dev).unwrap();
    let mask = Tensor::new(&[[1u8, 1, 0]], &dev).unwrap();
    let c = KlController::fixed(0.1).unwrap();
    let out = kl_in_reward(&scores, &old, &reference, &mask, KlEstimator::K3, true, &c).unwrap();
    let r = out.rewards.to_vec2::<f32>().unwrap();
    assert_eq!(r[0][2], 0.0);
    assert!(out.current_kl.is_finite());
    let all = Tensor::new(&[[1u8, 1, 1]], &dev).unwrap();
    match kl_in_reward(&scores, &old, &reference, &all, KlEstimator::K1, false, &c).unwrap_err() {
        Error::InvalidValue { arg, .. } => assert_eq!(arg, "old_log_probs"),
        other => panic!("{other:?}"),
    }
}
