//! The critic's clipped value loss against its formula, with padding and bad input (verl's own
//! numbers are golden cases in `tests/golden/`).

use candle_core::{Device, Tensor, Var};
use proptest::prelude::*;
use sapo::{Aggregation, Error, ValueLoss};

fn matrix(v: &[f32], t: usize) -> Tensor {
    Tensor::from_vec(v.to_vec(), (v.len() / t, t), &Device::Cpu).unwrap()
}

proptest! {
    /// Token-mean: `½·mean(max((v−R)², (v̂−R)²))` and its gradient, by the scalar formula.
    #[test]
    fn matches_the_scalar_formula(
        rows in proptest::collection::vec((-3.0f32..3.0, -3.0f32..3.0, -3.0f32..3.0), 6),
        clip in 0.0f64..2.0,
    ) {
        let v: Vec<f32> = rows.iter().map(|r| r.0).collect();
        let old: Vec<f32> = rows.iter().map(|r| r.1).collect();
        let ret: Vec<f32> = rows.iter().map(|r| r.2).collect();
        let pred = Var::from_tensor(&matrix(&v, 3)).unwrap();
        let mask = matrix(&[1.0; 6], 3);
        let out = ValueLoss::new(clip)
            .forward(pred.as_tensor(), &matrix(&old, 3), &matrix(&ret, 3), &mask)
            .unwrap();
        let grad = out.loss.backward().unwrap().get(pred.as_tensor()).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let (mut loss, mut clipped) = (0.0f64, 0.0);
        for i in 0..6 {
            let (v, o, r) = (v[i] as f64, old[i] as f64, ret[i] as f64);
            let vc = v.clamp(o - clip, o + clip);
            let (a, b) = ((v - r).powi(2), (vc - r).powi(2));
            loss += 0.5 * a.max(b) / 6.0;
            clipped += f64::from(u8::from(b > a)) / 6.0;
            // Where the clipped term is strictly larger v is outside the range: no gradient.
            let want = if b > a { 0.0 } else if a > b { (v - r) / 6.0 } else { grad[i] as f64 };
            prop_assert!((grad[i] as f64 - want).abs() < 1e-5, "token {i}: {} vs {want}", grad[i]);
        }
        prop_assert!((out.loss.to_scalar::<f32>().unwrap() as f64 - loss).abs() < 1e-4 * (1.0 + loss));
        prop_assert!((out.clip_fraction.to_scalar::<f32>().unwrap() as f64 - clipped).abs() < 1e-5);
    }
}

/// Garbage at masked positions reaches neither the loss, the metrics nor the gradient.
#[test]
fn padding_never_reaches_a_value() {
    let pred = Var::from_tensor(&matrix(&[0.5, f32::NAN, 1.0, 2.0], 2)).unwrap();
    let old = matrix(&[0.4, f32::INFINITY, 1.0, 1.0], 2);
    let ret = matrix(&[1.0, f32::NAN, 0.0, 1.0], 2);
    let mask = Tensor::new(&[[1u8, 0], [1, 1]], &Device::Cpu).unwrap();
    let l = ValueLoss::new(0.5).with_aggregation(Aggregation::SeqMeanTokenMean);
    let out = l.forward(pred.as_tensor(), &old, &ret, &mask).unwrap();
    assert!(out.loss.to_scalar::<f32>().unwrap().is_finite());
    assert!(out.vpred_mean.to_scalar::<f32>().unwrap().is_finite());
    let g = out
        .loss
        .backward()
        .unwrap()
        .get(pred.as_tensor())
        .unwrap()
        .to_vec2::<f32>()
        .unwrap();
    assert_eq!(g[0][1], 0.0);
    assert!(g.iter().flatten().all(|x| x.is_finite()));
}

#[test]
fn bad_input_is_a_typed_error() {
    let x = matrix(&[0.0, 1.0], 2);
    let mask = Tensor::new(&[[1u8, 1]], &Device::Cpu).unwrap();
    let arg = |e: Error| match e {
        Error::InvalidConfig { name, .. } => name.to_string(),
        Error::InvalidValue { arg, .. } | Error::Shape { arg, .. } => arg.to_string(),
        other => panic!("{other:?}"),
    };
    assert_eq!(
        arg(ValueLoss::new(-1.0).forward(&x, &x, &x, &mask).unwrap_err()),
        "clip"
    );
    let bad = matrix(&[f32::NAN, 1.0], 2);
    assert_eq!(
        arg(ValueLoss::new(0.5)
            .forward(&x, &x, &bad, &mask)
            .unwrap_err()),
        "returns"
    );
    let wide = matrix(&[0.0, 1.0, 2.0], 3);
    assert_eq!(
        arg(ValueLoss::new(0.5)
            .forward(&x, &wide, &x, &mask)
            .unwrap_err()),
        "old_values"
    );
    let odd_mask = Tensor::new(&[[1u8, 2]], &Device::Cpu).unwrap();
    assert_eq!(
        arg(ValueLoss::new(0.5)
            .forward(&x, &x, &x, &odd_mask)
            .unwrap_err()),
        "mask"
    );
}
