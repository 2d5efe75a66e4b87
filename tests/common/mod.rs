//! A plain-f64 reference of the formulas page, loop by loop, with closed-form gradients. Used to
//! check the crate's autograd gradients and values.
#![allow(dead_code, clippy::needless_range_loop)]

use candle_core::{DType, Device, Tensor, Var};
use sapo::{
    Aggregation, Backend, KlEstimator, Normalizer, PolicyInputs, PolicyLossConfig, RatioLevel,
    TrustRegion,
};

/// One batch, row-major `[B,T]` vectors.
#[derive(Debug, Clone)]
pub struct Batch {
    pub b: usize,
    pub t: usize,
    pub log_probs: Vec<f64>,
    pub old_log_probs: Vec<f64>,
    /// `[B]` when `per_token_advantages` is false, else `[B,T]`.
    pub advantages: Vec<f64>,
    pub per_token_advantages: bool,
    pub mask: Vec<f64>,
    pub ref_log_probs: Option<Vec<f64>>,
    pub is_weights: Option<Vec<f64>>,
}

impl Batch {
    pub fn adv(&self, i: usize, t: usize) -> f64 {
        if self.per_token_advantages {
            self.advantages[i * self.t + t]
        } else {
            self.advantages[i]
        }
    }

    /// Rows `lo..hi` as a batch of their own.
    pub fn rows(&self, lo: usize, hi: usize) -> Batch {
        let tok = |v: &Vec<f64>| v[lo * self.t..hi * self.t].to_vec();
        Batch {
            b: hi - lo,
            t: self.t,
            log_probs: tok(&self.log_probs),
            old_log_probs: tok(&self.old_log_probs),
            advantages: if self.per_token_advantages {
                tok(&self.advantages)
            } else {
                self.advantages[lo..hi].to_vec()
            },
            per_token_advantages: self.per_token_advantages,
            mask: tok(&self.mask),
            ref_log_probs: self.ref_log_probs.as_ref().map(tok),
            is_weights: self.is_weights.as_ref().map(tok),
        }
    }
}

/// Both implementations: the fused kernel and the composed ops.
pub const BACKENDS: [Backend; 2] = [Backend::Auto, Backend::Composed];

/// The crate's loss, gradient and metric sums on `batch`, in `dtype`.
pub struct CrateResult {
    pub loss: f64,
    pub grad: Vec<f64>,
    pub metrics: sapo::MetricSums,
}

pub fn run_crate(
    config: &PolicyLossConfig,
    batch: &Batch,
    normalizer: Normalizer,
    dtype: DType,
    backend: Backend,
) -> sapo::Result<CrateResult> {
    let dev = Device::Cpu;
    let mat = |v: &Vec<f64>| -> candle_core::Result<Tensor> {
        Tensor::from_vec(v.clone(), (batch.b, batch.t), &dev)?.to_dtype(dtype)
    };
    let lp = Var::from_tensor(&mat(&batch.log_probs)?)?;
    let old = mat(&batch.old_log_probs)?;
    let adv = if batch.per_token_advantages {
        mat(&batch.advantages)?
    } else {
        Tensor::from_vec(batch.advantages.clone(), batch.b, &dev)?.to_dtype(dtype)?
    };
    let mask = mat(&batch.mask)?;
    let reference = batch.ref_log_probs.as_ref().map(mat).transpose()?;
    let weights = batch.is_weights.as_ref().map(mat).transpose()?;
    let mut inputs =
        PolicyInputs::new(lp.as_tensor(), &old, &adv, &mask).with_normalizer(normalizer);
    if let Some(r) = &reference {
        inputs = inputs.with_ref_log_probs(r);
    }
    if let Some(w) = &weights {
        inputs = inputs.with_is_weights(w);
    }
    let out = config.build()?.with_backend(backend).forward(&inputs)?;
    let grads = out.loss.backward()?;
    let grad = match grads.get(lp.as_tensor()) {
        Some(g) => g.flatten_all()?.to_dtype(DType::F64)?.to_vec1::<f64>()?,
        None => vec![0.0; batch.b * batch.t],
    };
    Ok(CrateResult {
        loss: out.loss.to_dtype(DType::F64)?.to_scalar::<f64>()?,
        grad,
        metrics: out.metrics.read()?,
    })
}

fn sigmoid(x: f64) -> f64 {
    if x >= 0.0 {
        1.0 / (1.0 + (-x).exp())
    } else {
        x.exp() / (1.0 + x.exp())
    }
}

/// `(value, derivative)` of `clamp(x, lo, hi)`: derivative 1 strictly inside, 0 at the bounds
/// (PyTorch's convention with scalar bounds, as the formulas page states).
fn clamp_d(x: f64, lo: f64, hi: f64) -> (f64, f64) {
    if x <= lo {
        (lo, 0.0)
    } else if x >= hi {
        (hi, 0.0)
    } else {
        (x, 1.0)
    }
}

/// `(value, d value / d ratio)` of the per-token policy loss `−f(ρ)·A`.
pub fn per_token(trust: &TrustRegion, r: f64, a: f64) -> (f64, f64) {
    match trust {
        TrustRegion::SoftGate { tau_pos, tau_neg } => {
            let tau = if a > 0.0 { *tau_pos } else { *tau_neg };
            let x = tau * (r - 1.0);
            (
                -sigmoid(x) * 4.0 / tau * a,
                -a * 4.0 * sigmoid(x) * sigmoid(-x),
            )
        }
        TrustRegion::HardClip(c) => {
            let (u, du) = match c.delta {
                Some(d) => clamp_d(r, f64::NEG_INFINITY, d),
                None => (r, 1.0),
            };
            let (l1, d1) = (-a * u, -a * du);
            let (cr, dc) = clamp_d(r, 1.0 - c.eps_low, 1.0 + c.eps_high);
            let (l2, d2) = (-a * cr, -a * dc);
            let (l, d) = if l1 > l2 {
                (l1, d1)
            } else if l2 > l1 {
                (l2, d2)
            } else {
                (l1, 0.5 * (d1 + d2))
            };
            match c.dual_clip {
                Some(cc) if a < 0.0 => {
                    let floor = -cc * a;
                    if l > floor {
                        (floor, 0.0)
                    } else if l < floor {
                        (l, d)
                    } else {
                        (l, 0.5 * d)
                    }
                }
                _ => (l, d),
            }
        }
        TrustRegion::Unclipped => (-a * r, -a),
    }
}

/// `(value, d/dℓ)` of the KL estimator.
pub fn kl(estimator: KlEstimator, clamp: bool, lp: f64, rf: f64) -> (f64, f64) {
    let d = lp - rf;
    let k3 = || {
        let (neg, dneg) = if clamp {
            clamp_d(-d, -20.0, 20.0)
        } else {
            (-d, 1.0)
        };
        let v = neg.exp() - neg - 1.0;
        let dv = -(neg.exp() - 1.0) * dneg;
        if clamp {
            let (v, dc) = clamp_d(v, -10.0, 10.0);
            (v, dv * dc)
        } else {
            (v, dv)
        }
    };
    match estimator {
        KlEstimator::K1 => (d, 1.0),
        KlEstimator::Abs => (
            d.abs(),
            if d > 0.0 {
                1.0
            } else if d < 0.0 {
                -1.0
            } else {
                0.0
            },
        ),
        KlEstimator::K2 => (0.5 * d * d, d),
        KlEstimator::K3 => k3(),
        KlEstimator::K3Plus => (k3().0, d),
    }
}

/// Coefficient of `m·L[i,t]` in the aggregated scalar.
fn coefficients(agg: Aggregation, batch: &Batch, norm: &Normalizer) -> Vec<f64> {
    let n: Vec<f64> = (0..batch.b)
        .map(|i| batch.mask[i * batch.t..(i + 1) * batch.t].iter().sum())
        .collect();
    let tokens: f64 = n.iter().sum();
    let seqs = n.iter().filter(|&&x| x > 0.0).count() as f64;
    let w = norm.world_size as f64;
    let tok = norm.global_tokens.unwrap_or(tokens).max(1.0);
    let bp = norm.global_sequences.unwrap_or(seqs).max(1.0);
    (0..batch.b)
        .map(|i| match agg {
            Aggregation::TokenMean => w / tok,
            Aggregation::TokenSum => w,
            Aggregation::SeqMeanTokenMean => w / (bp * n[i].max(1.0)),
            Aggregation::SeqMeanTokenSum => w / bp,
            Aggregation::SeqMeanTokenSumNorm { horizon } => {
                w / (bp * horizon.unwrap_or(batch.t) as f64)
            }
        })
        .collect()
}

/// Loss and closed-form `∂loss/∂ℓ`, straight from the formulas page.
pub fn reference(config: &PolicyLossConfig, batch: &Batch, norm: &Normalizer) -> (f64, Vec<f64>) {
    let (b, t) = (batch.b, batch.t);
    let coef = coefficients(config.aggregation, batch, norm);
    let mut loss = 0.0;
    let mut grad = vec![0.0; b * t];
    for i in 0..b {
        let idx = |k: usize| i * t + k;
        let m = |k: usize| batch.mask[idx(k)];
        let n = (0..t).map(m).sum::<f64>().max(1.0);
        let mut delta = vec![0.0; t];
        let mut ddelta = vec![0.0; t];
        for k in 0..t {
            if m(k) == 0.0 {
                continue;
            }
            let raw = batch.log_probs[idx(k)] - batch.old_log_probs[idx(k)];
            (delta[k], ddelta[k]) = match config.log_ratio_clamp {
                Some(c) => clamp_d(raw, -c, c),
                None => (raw, 1.0),
            };
        }
        let seq: f64 = (0..t).map(|k| m(k) * delta[k]).sum::<f64>() / n;
        let (log_s, dseq) = match config.seq_log_ratio_max {
            Some(mx) => clamp_d(seq, f64::NEG_INFINITY, mx),
            None => (seq, 1.0),
        };
        let s = log_s.exp();
        let mut seq_acc = 0.0;
        for k in 0..t {
            if m(k) == 0.0 {
                continue;
            }
            let w = batch.is_weights.as_ref().map_or(1.0, |w| w[idx(k)]);
            let ratio = match config.ratio_level {
                RatioLevel::Token => delta[k].exp(),
                _ => s,
            };
            let (v, dv) = per_token(&config.trust_region, ratio, batch.adv(i, k));
            let c = coef[i] * w;
            loss += c * v;
            match config.ratio_level {
                RatioLevel::Token => grad[idx(k)] += c * dv * ratio * ddelta[k],
                RatioLevel::SequenceToken => grad[idx(k)] += c * dv * s * dseq,
                RatioLevel::Sequence => seq_acc += c * dv,
            }
        }
        if config.ratio_level == RatioLevel::Sequence {
            for k in 0..t {
                grad[idx(k)] += seq_acc * s * dseq * m(k) * ddelta[k] / n;
            }
        }
    }
    if let (Some(pen), Some(rf)) = (&config.kl, &batch.ref_log_probs) {
        let coef = coefficients(pen.aggregation, batch, norm);
        for i in 0..b {
            for k in 0..t {
                let j = i * t + k;
                if batch.mask[j] == 0.0 {
                    continue;
                }
                let (v, dv) = kl(pen.estimator, pen.clamp, batch.log_probs[j], rf[j]);
                loss += pen.coef * coef[i] * v;
                grad[j] += pen.coef * coef[i] * dv;
            }
        }
    }
    (loss, grad)
}

/// `|a − b| ≤ abs + rel·|b|` elementwise, with a message naming the first miss.
pub fn assert_close(what: &str, got: &[f64], want: &[f64], abs: f64, rel: f64) {
    assert_eq!(got.len(), want.len(), "{what}: lengths differ");
    for (j, (g, w)) in got.iter().zip(want).enumerate() {
        assert!(
            (g - w).abs() <= abs + rel * w.abs(),
            "{what}[{j}]: got {g}, want {w}"
        );
    }
}

/// All of a tensor's values as f64.
pub fn f64s(t: &Tensor) -> Vec<f64> {
    t.flatten_all()
        .unwrap()
        .to_dtype(DType::F64)
        .unwrap()
        .to_vec1::<f64>()
        .unwrap()
}

/// A deterministic pseudo-random vector in [−0.5, 0.5).
pub fn noise(n: usize, seed: u64) -> Vec<f64> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 11) as f64 / (1u64 << 53) as f64 - 0.5
        })
        .collect()
}

/// Runs `f` in a rayon pool of `threads` threads.
pub fn in_pool<T: Send>(threads: usize, f: impl FnOnce() -> T + Send) -> T {
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .unwrap()
        .install(f)
}

/// Asserts that `bits` gives the same result with 1, 2 and 3 threads.
pub fn assert_same_bits_across_threads<T: Send + PartialEq + std::fmt::Debug>(
    what: &str,
    bits: impl Fn() -> T + Send + Sync,
) {
    let one = in_pool(1, &bits);
    assert_eq!(one, in_pool(2, &bits), "{what}: 1 vs 2 threads");
    assert_eq!(one, in_pool(3, &bits), "{what}: 1 vs 3 threads");
}
