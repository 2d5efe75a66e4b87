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

/// Both implementations on the CPU: the fused kernel and the composed ops.
pub const BACKENDS: [Backend; 2] = [Backend::Auto, Backend::Composed];

/// The device the shared helpers put tensors on: the CPU, or — with the `cuda` feature and
/// `SAPO_TEST_DEVICE=cuda`, on a machine with a GPU (`scripts/gpu-check.sh`) — the CUDA device.
pub fn device() -> Device {
    #[cfg(feature = "cuda")]
    if std::env::var("SAPO_TEST_DEVICE").is_ok_and(|d| d == "cuda") {
        static CUDA: std::sync::OnceLock<Device> = std::sync::OnceLock::new();
        return CUDA
            .get_or_init(|| Device::new_cuda(0).expect("SAPO_TEST_DEVICE=cuda, but no CUDA device"))
            .clone();
    }
    Device::Cpu
}

/// Both implementations on [`device`]: the fused kernel (the CPU's, or on the CUDA device its
/// kernels) and the composed ops.
pub fn backends() -> [Backend; 2] {
    if device().is_cpu() {
        [Backend::Auto, Backend::Composed]
    } else {
        [Backend::Fused, Backend::Composed]
    }
}

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
) -> sapo::error::Result<CrateResult> {
    let dev = device();
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

/// erf by its series of positive terms, `2/√π·e^{−x²}·Σ 2ⁿx^{2n+1}/(2n+1)!!` (no cancellation).
fn erf(x: f64) -> f64 {
    // erfc(6) ≈ 2e-17: beyond, erf is ±1 in f64 (and the series would overflow).
    if x.abs() > 6.0 {
        return x.signum();
    }
    let (mut term, mut sum) = (x, x);
    for n in 1..4000 {
        term *= 2.0 * x * x / f64::from(2 * n + 1);
        sum += term;
        if term.abs() < 1e-18 * sum.abs() {
            break;
        }
    }
    2.0 / std::f64::consts::PI.sqrt() * (-x * x).exp() * sum
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
        TrustRegion::SoftGate {
            tau_pos,
            tau_neg,
            gate,
        } => {
            let tau = if a > 0.0 { *tau_pos } else { *tau_neg };
            let x = tau * (r - 1.0);
            let u = x / 2.0;
            let (f, df) = match gate {
                sapo::GateFunction::Sigmoid => {
                    (sigmoid(x) * 4.0 / tau, 4.0 * sigmoid(x) * sigmoid(-x))
                }
                sapo::GateFunction::Erf => (
                    2.0 / tau + std::f64::consts::PI.sqrt() / tau * erf(u),
                    (-u * u).exp(),
                ),
                sapo::GateFunction::Arctan => (2.0 / tau * (1.0 + u.atan()), 1.0 / (1.0 + u * u)),
                sapo::GateFunction::Softsign => (
                    2.0 / tau * (1.0 + u / (1.0 + u.abs())),
                    1.0 / (1.0 + u.abs()).powi(2),
                ),
            };
            (-f * a, -a * df)
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
        TrustRegion::Unclipped | TrustRegion::GeometricClip(_) => (-a * r, -a),
        other => panic!("{other:?} reads more than the ratio: use `token_loss`"),
    }
}

/// One token as the reference sees it.
pub struct TokenIn {
    pub lp: f64,
    pub old: f64,
    /// The ratio the objective sees (token or sequence).
    pub r: f64,
    pub a: f64,
    /// VESPO's row statistic `u_i`.
    pub row: f64,
    /// KL-Cov's selection.
    pub selected: bool,
}

/// `(value, ∂/∂ratio, ∂/∂ℓ at fixed ratio)` of every objective's per-token loss, from the
/// formulas page.
pub fn token_loss(trust: &TrustRegion, x: &TokenIn) -> (f64, f64, f64) {
    let (lp, old, r, a, selected) = (x.lp, x.old, x.r, x.a, x.selected);
    match trust {
        TrustRegion::Cispo(clip) => {
            let w = match clip {
                sapo::IsWeightClip::Bounds { eps_low, eps_high } => {
                    r.max(1.0 - eps_low).min(1.0 + eps_high)
                }
                sapo::IsWeightClip::RatioMax(m) => r.min(*m),
            };
            (-w * a * lp, 0.0, -w * a)
        }
        TrustRegion::PolicyGradient => (-a * lp, 0.0, -a),
        TrustRegion::Dro(d) => {
            let x = lp - old;
            (-(a * lp - 0.5 * d.beta * x * x), 0.0, -(a - d.beta * x))
        }
        TrustRegion::KlCov(k) => {
            let x = lp - old;
            let sign = if x > 0.0 {
                1.0
            } else if x < 0.0 {
                -1.0
            } else {
                0.0
            };
            let pen = if selected { k.coef } else { 0.0 };
            (-a * r + pen * x.abs(), -a, pen * sign)
        }
        TrustRegion::Dppo(d) => {
            let (p, q) = (lp.exp(), old.exp());
            let valid = match d.divergence {
                sapo::Divergence::BinaryTv => {
                    if a > 0.0 {
                        p - q <= d.delta_high
                    } else {
                        p - q >= -d.delta_low
                    }
                }
                sapo::Divergence::BinaryKl => {
                    let kl =
                        q * (old - lp) + (1.0 - q) * ((1.0 - q + 1e-8) / (1.0 - p + 1e-8)).ln();
                    if a > 0.0 {
                        kl <= d.delta_high || p <= q
                    } else {
                        kl <= d.delta_low || p >= q
                    }
                }
            };
            let w = if valid { r.min(d.ratio_max) } else { 0.0 };
            (-a * w * lp, 0.0, -a * w)
        }
        TrustRegion::Vespo(v) => {
            let u = x.row.max(v.log_w_min).min(v.log_w_max);
            let (k, l) = if a >= 0.0 {
                (v.k_pos, v.lambda_pos.max(1e-4))
            } else {
                (v.k_neg, v.lambda_neg.max(1e-4))
            };
            let phi = (l + k * u - l * u.exp()).exp();
            let phi = if phi.is_finite() { phi } else { 0.0 };
            (-phi * a * lp, 0.0, -phi * a)
        }
        other => {
            let (v, dv) = per_token(other, r, a);
            (v, dv, 0.0)
        }
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
            Aggregation::SeqMean => {
                w / (norm.global_sequences.unwrap_or(batch.b as f64).max(1.0) * n[i].max(1.0))
            }
        })
        .collect()
}

/// KL-Cov's selection over the unmasked tokens (row-major): the `max(1, ⌊N·ratio⌋)` largest
/// covariances `(A − mean A)(ℓ − mean ℓ)`, ties in token order.
pub fn kl_cov_selection(ratio: f64, batch: &Batch) -> Vec<bool> {
    let t = batch.t;
    let idx: Vec<usize> = (0..batch.b * t).filter(|&j| batch.mask[j] != 0.0).collect();
    let mut selected = vec![false; batch.b * t];
    if idx.is_empty() {
        return selected;
    }
    let n = idx.len() as f64;
    let adv = |j: usize| batch.adv(j / t, j % t);
    let ma = idx.iter().map(|&j| adv(j)).sum::<f64>() / n;
    let ml = idx.iter().map(|&j| batch.log_probs[j]).sum::<f64>() / n;
    let cov: Vec<(usize, f64)> = idx
        .iter()
        .map(|&j| (j, (adv(j) - ma) * (batch.log_probs[j] - ml)))
        .collect();
    let k = ((n * ratio).floor() as usize).max(1);
    for _ in 0..k {
        // The largest remaining, the earliest on ties.
        let mut best: Option<(usize, f64)> = None;
        for &(j, c) in &cov {
            if !selected[j] && best.is_none_or(|(_, b)| c > b) {
                best = Some((j, c));
            }
        }
        selected[best.unwrap().0] = true;
    }
    selected
}

/// GMPO's sign-aware clip `(y, ∂y/∂x)`, ties split.
fn log_clip(x: f64, a: f64, low: f64, high: f64) -> (f64, f64) {
    let (c, dc) = clamp_d(x, -low, high);
    if a == 0.0 {
        (0.0, 0.0)
    } else if x == c {
        (x, 0.5 * (1.0 + dc))
    } else if (a > 0.0 && c < x) || (a < 0.0 && c > x) {
        (c, dc)
    } else {
        (x, 1.0)
    }
}

/// Loss and closed-form `∂loss/∂ℓ`, straight from the formulas page.
pub fn reference(config: &PolicyLossConfig, batch: &Batch, norm: &Normalizer) -> (f64, Vec<f64>) {
    let (b, t) = (batch.b, batch.t);
    let coef = coefficients(config.aggregation, batch, norm);
    let trust = &config.trust_region;
    let selection = match trust {
        TrustRegion::KlCov(k) => kl_cov_selection(k.ratio, batch),
        _ => vec![false; b * t],
    };
    let kl_coef = config
        .kl
        .map(|pen| coefficients(pen.aggregation, batch, norm));
    let mut loss = 0.0;
    let mut grad = vec![0.0; b * t];
    for i in 0..b {
        let idx = |k: usize| i * t + k;
        let m = |k: usize| batch.mask[idx(k)];
        let n = (0..t).map(m).sum::<f64>().max(1.0);
        let w_of = |k: usize| batch.is_weights.as_ref().map_or(1.0, |w| w[idx(k)]);
        let mut delta = vec![0.0; t];
        let mut ddelta = vec![0.0; t];
        let mut y = vec![0.0; t];
        let mut dy = vec![0.0; t];
        for k in 0..t {
            if m(k) == 0.0 {
                continue;
            }
            let raw = batch.log_probs[idx(k)] - batch.old_log_probs[idx(k)];
            (delta[k], ddelta[k]) = match config.log_ratio_clamp {
                Some(c) => clamp_d(raw, -c, c),
                None => (raw, 1.0),
            };
            (y[k], dy[k]) = match trust {
                TrustRegion::GeometricClip(g) => {
                    log_clip(delta[k], batch.adv(i, k), g.log_clip_low, g.log_clip_high)
                }
                _ => (delta[k], 1.0),
            };
        }
        let seq: f64 = (0..t).map(|k| m(k) * y[k]).sum::<f64>() / n;
        let (log_s, dseq) = match config.seq_log_ratio_max {
            Some(mx) => clamp_d(seq, f64::NEG_INFINITY, mx),
            None => (seq, 1.0),
        };
        let s = log_s.exp();
        // VESPO's u_i; GMPO's geometric-mean weight.
        let row: f64 = (0..t)
            .filter(|&k| m(k) != 0.0)
            .map(|k| delta[k] + w_of(k).ln().max((1e-8f64).ln()).min(20.0))
            .sum();
        let geometric = ((0..t)
            .filter(|&k| m(k) != 0.0)
            .map(|k| (w_of(k) + 1e-10).ln())
            .sum::<f64>()
            / n)
            .exp();
        let mut seq_acc = 0.0;
        for k in 0..t {
            if m(k) == 0.0 {
                continue;
            }
            let w = match trust {
                TrustRegion::Vespo(_) => 1.0,
                TrustRegion::GeometricClip(_) if batch.is_weights.is_some() => geometric,
                _ => w_of(k),
            };
            let ratio = match config.ratio_level {
                RatioLevel::Token => y[k].exp(),
                _ => s,
            };
            let token = TokenIn {
                lp: batch.log_probs[idx(k)],
                old: batch.old_log_probs[idx(k)],
                r: ratio,
                a: batch.adv(i, k),
                row,
                selected: selection[idx(k)],
            };
            let (v, dv, direct) = token_loss(trust, &token);
            let c = coef[i] * w;
            loss += c * v;
            grad[idx(k)] += c * direct;
            // ∂ratio/∂ℓ_k through the token's own ℓ.
            let own = match config.ratio_level {
                RatioLevel::Token => ratio * dy[k] * ddelta[k],
                RatioLevel::SequenceToken => s * dseq,
                RatioLevel::Sequence => 0.0,
            };
            grad[idx(k)] += c * dv * own;
            if config.ratio_level == RatioLevel::Sequence {
                seq_acc += c * dv;
            }
            if let (Some(pen), Some(rf), Some(kc)) = (&config.kl, &batch.ref_log_probs, &kl_coef) {
                let (kv, dk) = kl(pen.estimator, pen.clamp, token.lp, rf[idx(k)]);
                let a = pen.coef * kc[i];
                let (weight, dweight) = if pen.importance_weighted {
                    (ratio, own)
                } else {
                    (1.0, 0.0)
                };
                loss += a * kv * weight;
                grad[idx(k)] += a * (dk * weight + kv * dweight);
                if pen.importance_weighted && config.ratio_level == RatioLevel::Sequence {
                    seq_acc += a * kv;
                }
            }
        }
        if config.ratio_level == RatioLevel::Sequence {
            for k in 0..t {
                grad[idx(k)] += seq_acc * s * dseq * m(k) * ddelta[k] * dy[k] / n;
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
    // Read on the CPU: candle's CUDA backend cannot cast an empty tensor (a zero-block launch).
    t.to_device(&candle_core::Device::Cpu)
        .unwrap()
        .flatten_all()
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

/// Asserts that `bits` gives the same result with 1, 2 and 3 threads (rayon pools) and on
/// candle's CPU pool (called outside rayon).
pub fn assert_same_bits_across_threads<T: Send + PartialEq + std::fmt::Debug>(
    what: &str,
    bits: impl Fn() -> T + Send + Sync,
) {
    let one = in_pool(1, &bits);
    // Outside any rayon pool the CPU kernels run on candle's own pool.
    assert_eq!(one, bits(), "{what}: 1 thread vs candle's pool");
    assert_eq!(one, in_pool(2, &bits), "{what}: 1 vs 2 threads");
    assert_eq!(one, in_pool(3, &bits), "{what}: 1 vs 3 threads");
}

/// The objectives after SAPO, GSPO and GRPO, each from its preset (two with an
/// importance-weighted KL penalty).
pub fn later_objectives() -> Vec<sapo::PolicyLoss> {
    use sapo::KlPenalty;
    vec![
        sapo::Cispo::default()
            .config()
            .with_kl(Some(
                KlPenalty::new(0.04, KlEstimator::K3)
                    .with_clamp(false)
                    .with_importance_weighting(true),
            ))
            .build()
            .unwrap(),
        sapo::Cispo {
            clip: sapo::IsWeightClip::Bounds {
                eps_low: 0.2,
                eps_high: 0.28,
            },
        }
        .build()
        .unwrap(),
        sapo::Gmpo::default().build().unwrap(),
        sapo::Gpg.build().unwrap(),
        sapo::Dro { beta: 0.1 }.build().unwrap(),
        sapo::KlCov {
            ratio: 0.2,
            coef: 1.0,
        }
        .build()
        .unwrap(),
        sapo::Dppo::new(sapo::Divergence::BinaryTv, 0.15, 0.15, 3.0)
            .build()
            .unwrap(),
        sapo::Dppo::new(sapo::Divergence::BinaryKl, 0.05, 0.05, 3.0)
            .build()
            .unwrap(),
        sapo::Vespo::default().build().unwrap(),
        sapo::Luspo::default()
            .config()
            .with_kl(Some(
                KlPenalty::new(0.04, KlEstimator::K3).with_importance_weighting(true),
            ))
            .build()
            .unwrap(),
    ]
}
