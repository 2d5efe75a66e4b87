//! The fused CPU kernel of the unified surrogate: loss, gradient and metric sums of every ratio
//! level × trust region × aggregation × KL estimator × rollout weights, in one parallel pass over
//! the rows. The gradient is produced in the forward pass and handed to the backward.
//!
//! Per row (rows run in parallel, each on its own gradient slice): a sweep that validates the
//! inputs (and sums the log-ratio for the sequence levels), a sweep that evaluates `−f(ρ)·A`, its
//! derivative and the metrics, a sweep for the KL penalty when there is one, and the store of the
//! row's gradient. Row results are reduced in row order, so the bits do not depend on the number
//! of threads.

use std::sync::Mutex;

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, DType, Layout, Shape, Tensor, WithDType};
use half::{bf16, f16};
use rayon::prelude::*;

use super::simd::{multiversion, Load, Real, Store, LANES};
use super::{cpu_slice, kernel_error};
use crate::aggregation::{row_coefficient, Normalizer};
use crate::config::{PolicyLossConfig, RatioLevel, TrustRegion};
use crate::error::Error;
use crate::kl::KlEstimator;
use crate::metrics::{self, NUM_SLOTS};

/// Output layout: `[loss, metric sums (NUM_SLOTS), ratio min, ratio max]`.
pub(crate) const OUT_LEN: usize = 1 + NUM_SLOTS + 2;

/// The fused policy loss as a candle op on `log_probs`; every other input rides along.
pub(crate) struct FusedPolicyLoss {
    pub config: PolicyLossConfig,
    /// `[B,T]`, contiguous, `log_probs`' dtype.
    pub old_log_probs: Tensor,
    /// `[B]` or `[B,T]`, contiguous, `log_probs`' dtype.
    pub advantages: Tensor,
    /// `[B,T]`, contiguous, `u8` or `log_probs`' dtype.
    pub mask: Tensor,
    pub ref_log_probs: Option<Tensor>,
    pub is_weights: Option<Tensor>,
    pub normalizer: Normalizer,
    /// `∂loss/∂log_probs`, written by the forward pass.
    pub grad: Mutex<Option<Tensor>>,
}

/// What one token contributes, from the trust region.
#[derive(Clone, Copy)]
struct Eval<R> {
    value: R,
    /// `∂value/∂ρ`.
    slope: R,
    clipped: R,
    dual: R,
    low: R,
    high: R,
    gate_weight: R,
    gate_value: R,
}

trait TrustShape<R: Real>: Sync {
    fn eval(&self, r: R, a: R) -> Eval<R>;
}

struct Soft<R> {
    tau_pos: R,
    tau_neg: R,
    four_over_pos: R,
    four_over_neg: R,
}

impl<R: Real> TrustShape<R> for Soft<R> {
    #[inline(always)]
    fn eval(&self, r: R, a: R) -> Eval<R> {
        let positive = a > R::ZERO;
        let tau = R::select(positive, self.tau_pos, self.tau_neg);
        let four_over_tau = R::select(positive, self.four_over_pos, self.four_over_neg);
        let x = tau * (r - R::ONE);
        let abs = R::select(x < R::ZERO, -x, x);
        let e = (-abs).exp();
        let big = R::ONE / (R::ONE + e);
        let small = e * big;
        let up = x >= R::ZERO;
        let p = R::select(up, big, small);
        let q = R::select(up, small, big);
        let four = R::from_f64(4.0);
        let gate_value = p * four_over_tau;
        let gate_weight = four * p * q;
        Eval {
            value: -(gate_value * a),
            slope: -(a * gate_weight),
            clipped: R::ZERO,
            dual: R::ZERO,
            low: R::ZERO,
            high: R::ZERO,
            gate_weight,
            gate_value,
        }
    }
}

struct Clip<R> {
    low: R,
    high: R,
    delta: Option<R>,
    dual: Option<R>,
}

impl<R: Real> TrustShape<R> for Clip<R> {
    #[inline(always)]
    fn eval(&self, r: R, a: R) -> Eval<R> {
        let half = R::from_f64(0.5);
        let (u, du) = match self.delta {
            Some(d) => (R::select(r > d, d, r), R::indicator(r <= d)),
            None => (r, R::ONE),
        };
        let (l1, d1) = (-(a * u), -(a * du));
        let clamped = R::select(
            r < self.low,
            self.low,
            R::select(r > self.high, self.high, r),
        );
        let inside = R::indicator(r >= self.low && r <= self.high);
        let (l2, d2) = (-(a * clamped), -(a * inside));
        let clipped = l2 > l1;
        let tie = l1 == l2;
        let loss = R::select(clipped, l2, l1);
        let slope = R::select(tie, half * (d1 + d2), R::select(clipped, d2, d1));
        let (loss, slope, dual) = match self.dual {
            Some(c) => {
                let floor = -(c * a);
                let negative = a < R::ZERO;
                let cut = negative && loss > floor;
                let tie = negative && loss == floor;
                (
                    R::select(cut, floor, loss),
                    R::select(cut, R::ZERO, R::select(tie, half * slope, slope)),
                    R::indicator(cut),
                )
            }
            None => (loss, slope, R::ZERO),
        };
        Eval {
            value: loss,
            slope,
            clipped: R::indicator(clipped),
            dual,
            low: R::indicator(r < self.low && a < R::ZERO),
            high: R::indicator(r > self.high && a > R::ZERO),
            gate_weight: R::ZERO,
            gate_value: R::ZERO,
        }
    }
}

struct Plain;

impl<R: Real> TrustShape<R> for Plain {
    #[inline(always)]
    fn eval(&self, r: R, a: R) -> Eval<R> {
        Eval {
            value: -(a * r),
            slope: -a,
            clipped: R::ZERO,
            dual: R::ZERO,
            low: R::ZERO,
            high: R::ZERO,
            gate_weight: R::ZERO,
            gate_value: R::ZERO,
        }
    }
}

/// The inputs of all rows.
struct Inputs<'a, F, M> {
    t: usize,
    log_probs: &'a [F],
    old: &'a [F],
    advantages: &'a [F],
    per_token_advantages: bool,
    mask: &'a [M],
    reference: Option<&'a [F]>,
    weights: Option<&'a [F]>,
}

/// Per-call constants in the compute type.
struct Params<R> {
    level: RatioLevel,
    clamp: Option<R>,
    seq_max: Option<R>,
    kl: Option<(KlEstimator, bool)>,
}

/// What one row returns; reduced in row order.
#[derive(Clone, Debug)]
struct RowOut {
    /// `Σ m·w·l`.
    policy: f64,
    /// `Σ m·k`.
    kl: f64,
    sums: [f64; NUM_SLOTS],
    min: f64,
    max: f64,
    /// Unmasked non-finite values of log_probs, old_log_probs, advantages, is_weights,
    /// ref_log_probs.
    bad: [f64; 5],
}

/// One row's computation: row index, scratch buffer, the row's gradient.
type RowFn<'a, R, F> = dyn Fn(usize, &mut Vec<R>, &mut [F]) -> RowOut + Sync + 'a;

/// Per-row coefficients: the policy aggregation's and `β` times the KL aggregation's.
struct RowCoefficients<R> {
    policy: R,
    kl: R,
    tokens: R,
}

#[inline(always)]
fn sum_lanes<R: Real>(lanes: &[R; LANES]) -> f64 {
    lanes.iter().fold(0.0, |acc, v| acc + v.to_f64())
}

/// Clamped token log-ratio and its derivative.
#[inline(always)]
fn log_ratio<R: Real>(raw: R, clamp: Option<R>) -> (R, R) {
    match clamp {
        Some(c) => {
            let out = raw > c || raw < -c;
            (
                R::select(raw > c, c, R::select(raw < -c, -c, raw)),
                R::indicator(!out),
            )
        }
        None => (raw, R::ONE),
    }
}

#[inline(always)]
fn policy_row<F, M, R, S>(
    x: &Inputs<'_, F, M>,
    row: usize,
    p: &Params<R>,
    shape: &S,
    coef: &RowCoefficients<R>,
    scratch: &mut Vec<R>,
    grad: &mut [F],
) -> RowOut
where
    F: Load<R> + Store<R>,
    M: Load<R>,
    R: Real,
    S: TrustShape<R>,
{
    let t = x.t;
    let base = row * t;
    let mask = |j: usize| x.mask[base + j].load() != R::ZERO;
    let get = |s: &[F], j: usize, keep: bool| R::select(keep, s[base + j].load(), R::ZERO);
    let adv = |j: usize, keep: bool| {
        let k = if x.per_token_advantages {
            base + j
        } else {
            row
        };
        R::select(keep, x.advantages[k].load(), R::ZERO)
    };
    let finite_flag = |keep: bool, v: R| R::indicator(keep && !v.is_finite_value());

    // Sweep 1: validation, and Σ m·δ for the sequence ratio.
    let mut bad = [[R::ZERO; LANES]; 4];
    let mut sum_delta = [R::ZERO; LANES];
    let sweep1 = |j: usize, l: usize, bad: &mut [[R; LANES]; 4], sum_delta: &mut [R; LANES]| {
        let keep = mask(j);
        let raw_lp = R::select(keep, x.log_probs[base + j].load(), R::ZERO);
        let raw_old = R::select(keep, x.old[base + j].load(), R::ZERO);
        let a = adv(j, keep);
        let w = x.weights.map_or(R::ONE, |w| get(w, j, keep));
        bad[0][l] = bad[0][l] + finite_flag(keep, raw_lp);
        bad[1][l] = bad[1][l] + finite_flag(keep, raw_old);
        bad[2][l] = bad[2][l] + finite_flag(keep, a);
        bad[3][l] = bad[3][l] + finite_flag(keep, w);
        let (delta, _) = log_ratio(raw_lp - raw_old, p.clamp);
        sum_delta[l] = sum_delta[l] + R::select(keep, delta, R::ZERO);
    };
    let full = t / LANES * LANES;
    for b in (0..full).step_by(LANES) {
        for l in 0..LANES {
            sweep1(b + l, l, &mut bad, &mut sum_delta);
        }
    }
    for j in full..t {
        sweep1(j, j - full, &mut bad, &mut sum_delta);
    }
    let bad_counts = [
        sum_lanes(&bad[0]),
        sum_lanes(&bad[1]),
        sum_lanes(&bad[2]),
        sum_lanes(&bad[3]),
    ];

    // The sequence ratio s_i (value for both sequence levels).
    let n = coef.tokens;
    let seq = R::from_f64(sum_lanes(&sum_delta)) / n.max_of(R::ONE);
    let (log_s, dseq) = match p.seq_max {
        Some(m) => (R::select(seq > m, m, seq), R::indicator(seq <= m)),
        None => (seq, R::ONE),
    };
    let s = log_s.exp();
    let token_level = p.level == RatioLevel::Token;
    let seq_token = p.level == RatioLevel::SequenceToken;

    // Sweep 2: the surrogate, its gradient and the metrics.
    scratch.clear();
    scratch.resize(t, R::ZERO);
    const POLICY: usize = 0;
    const SEQ_SLOPE: usize = 1;
    let mut acc = [[R::ZERO; LANES]; 12];
    let mut lo = [R::INFINITY; LANES];
    let mut hi = [-R::INFINITY; LANES];
    let sweep2 = |j: usize,
                  l: usize,
                  acc: &mut [[R; LANES]; 12],
                  lo: &mut [R; LANES],
                  hi: &mut [R; LANES],
                  g: &mut R| {
        let keep = mask(j);
        let m = R::indicator(keep);
        let raw = get(x.log_probs, j, keep) - get(x.old, j, keep);
        let (delta, ddelta) = log_ratio(raw, p.clamp);
        let r = R::select(token_level, delta.exp(), s);
        let a = adv(j, keep);
        let w = x.weights.map_or(R::ONE, |w| get(w, j, keep));
        let e = shape.eval(r, a);
        let dratio = R::select(
            token_level,
            r * ddelta,
            R::select(seq_token, s * dseq, R::ZERO),
        );
        *g = R::select(keep, coef.policy * w * e.slope * dratio, R::ZERO);
        let mw = m * w;
        acc[POLICY][l] = acc[POLICY][l] + mw * e.value;
        acc[SEQ_SLOPE][l] = acc[SEQ_SLOPE][l] + mw * e.slope;
        acc[2 + metrics::NEG_LOG_RATIO][l] = acc[2 + metrics::NEG_LOG_RATIO][l] - m * delta;
        acc[2 + metrics::RATIO][l] = acc[2 + metrics::RATIO][l] + m * r;
        acc[2 + metrics::CLIPPED][l] = acc[2 + metrics::CLIPPED][l] + m * e.clipped;
        acc[2 + metrics::DUAL_CLIPPED][l] = acc[2 + metrics::DUAL_CLIPPED][l] + m * e.dual;
        acc[2 + metrics::CLIP_LOW][l] = acc[2 + metrics::CLIP_LOW][l] + m * e.low;
        acc[2 + metrics::CLIP_HIGH][l] = acc[2 + metrics::CLIP_HIGH][l] + m * e.high;
        acc[2 + metrics::GATE_WEIGHT][l] = acc[2 + metrics::GATE_WEIGHT][l] + m * e.gate_weight;
        acc[2 + metrics::GATE_VALUE][l] = acc[2 + metrics::GATE_VALUE][l] + m * e.gate_value;
        lo[l] = R::select(keep, lo[l].min_of(r), lo[l]);
        hi[l] = R::select(keep, hi[l].max_of(r), hi[l]);
    };
    for b in (0..full).step_by(LANES) {
        for (l, g) in scratch[b..b + LANES].iter_mut().enumerate() {
            sweep2(b + l, l, &mut acc, &mut lo, &mut hi, g);
        }
    }
    for (l, g) in scratch[full..].iter_mut().enumerate() {
        sweep2(full + l, l, &mut acc, &mut lo, &mut hi, g);
    }

    // Sweep 3 (sequence ratio): every token of the row shares ∂l/∂s.
    if p.level == RatioLevel::Sequence {
        let shared =
            coef.policy * R::from_f64(sum_lanes(&acc[SEQ_SLOPE])) * s * dseq / n.max_of(R::ONE);
        for (j, g) in scratch.iter_mut().enumerate() {
            let keep = mask(j);
            let raw = get(x.log_probs, j, keep) - get(x.old, j, keep);
            let (_, ddelta) = log_ratio(raw, p.clamp);
            *g = R::select(keep, shared * ddelta, R::ZERO);
        }
    }

    // Sweep 4: the KL penalty.
    let mut kl_sum = 0.0;
    let mut bad_ref = 0.0;
    if let (Some((estimator, clamp)), Some(reference)) = (p.kl, x.reference) {
        let mut kl_lanes = [R::ZERO; LANES];
        let mut bad_lanes = [R::ZERO; LANES];
        for (j, g) in scratch.iter_mut().enumerate() {
            let keep = mask(j);
            let rf = R::select(keep, reference[base + j].load(), R::ZERO);
            let d = get(x.log_probs, j, keep) - rf;
            let (k, dk) = kl_value(estimator, clamp, d);
            kl_lanes[j % LANES] = kl_lanes[j % LANES] + R::indicator(keep) * k;
            bad_lanes[j % LANES] = bad_lanes[j % LANES] + finite_flag(keep, rf);
            *g = *g + R::select(keep, coef.kl * dk, R::ZERO);
        }
        kl_sum = sum_lanes(&kl_lanes);
        bad_ref = sum_lanes(&bad_lanes);
    }

    for (dst, g) in grad.iter_mut().zip(scratch.iter()) {
        *dst = F::store(*g);
    }

    let mut sums = [0.0; NUM_SLOTS];
    for (slot, lanes) in acc[2..].iter().enumerate() {
        sums[slot] = sum_lanes(lanes);
    }
    sums[metrics::TOKENS] = n.to_f64();
    sums[metrics::KL] = kl_sum;
    RowOut {
        policy: sum_lanes(&acc[POLICY]),
        kl: kl_sum,
        sums,
        min: lo.iter().fold(f64::INFINITY, |m, v| m.min(v.to_f64())),
        max: hi.iter().fold(f64::NEG_INFINITY, |m, v| m.max(v.to_f64())),
        bad: [
            bad_counts[0],
            bad_counts[1],
            bad_counts[2],
            bad_counts[3],
            bad_ref,
        ],
    }
}

multiversion!(fn policy_row_best<F: Load<R> | Store<R>, M: Load<R>, R: Real, S: TrustShape<R>>(
    x: &Inputs<'_, F, M>,
    row: usize,
    p: &Params<R>,
    shape: &S,
    coef: &RowCoefficients<R>,
    scratch: &mut Vec<R>,
    grad: &mut [F],
) -> RowOut = policy_row);

/// `(k, ∂k/∂ℓ)` of a KL estimator at `d = ℓ − ℓref`.
#[inline(always)]
fn kl_value<R: Real>(estimator: KlEstimator, clamp: bool, d: R) -> (R, R) {
    let half = R::from_f64(0.5);
    let k3 = || {
        let neg = -d;
        let (neg, dneg) = if clamp {
            let c = R::from_f64(20.0);
            let out = neg > c || neg < -c;
            (
                R::select(neg > c, c, R::select(neg < -c, -c, neg)),
                R::indicator(!out),
            )
        } else {
            (neg, R::ONE)
        };
        let e = neg.exp();
        let value = e - neg - R::ONE;
        let slope = (R::ONE - e) * dneg;
        if clamp {
            let c = R::from_f64(10.0);
            let out = value > c || value < -c;
            (
                R::select(value > c, c, R::select(value < -c, -c, value)),
                R::select(out, R::ZERO, slope),
            )
        } else {
            (value, slope)
        }
    };
    match estimator {
        KlEstimator::K1 => (d, R::ONE),
        KlEstimator::Abs => (
            R::select(d < R::ZERO, -d, d),
            R::select(
                d > R::ZERO,
                R::ONE,
                R::select(d < R::ZERO, -R::ONE, R::ZERO),
            ),
        ),
        KlEstimator::K2 => (half * d * d, d),
        KlEstimator::K3 => k3(),
        KlEstimator::K3Plus => (k3().0, d),
    }
}

/// `n_i` of every row, and whether the mask holds only 0 and 1.
fn row_tokens<M: Load<R>, R: Real>(mask: &[M], t: usize) -> (Vec<f64>, f64) {
    let per_row: Vec<(f64, f64)> = mask
        .par_chunks(t.max(1))
        .map(|row| {
            let mut n = [R::ZERO; LANES];
            let mut bad = [R::ZERO; LANES];
            for (j, v) in row.iter().enumerate() {
                let v = v.load();
                n[j % LANES] = n[j % LANES] + v;
                bad[j % LANES] = bad[j % LANES] + R::indicator(v != R::ZERO && v != R::ONE);
            }
            (sum_lanes(&n), sum_lanes(&bad))
        })
        .collect();
    let bad = per_row.iter().map(|(_, b)| b).sum();
    (per_row.into_iter().map(|(n, _)| n).collect(), bad)
}

impl FusedPolicyLoss {
    fn run<F, M, R>(
        &self,
        lp: &[F],
        mask: &[M],
        dims: &[usize],
    ) -> candle_core::Result<(Vec<R>, Vec<F>)>
    where
        F: Load<R> + Store<R> + WithDType,
        M: Load<R> + WithDType,
        R: Real,
    {
        let (b, t) = (dims[0], dims[1]);
        let (old_guard, old_layout) = self.old_log_probs.storage_and_layout();
        let old = cpu_slice::<F>(&old_guard, old_layout)?;
        let (adv_guard, adv_layout) = self.advantages.storage_and_layout();
        let advantages = cpu_slice::<F>(&adv_guard, adv_layout)?;
        let reference = self.ref_log_probs.as_ref().map(|r| r.storage_and_layout());
        let reference = match &reference {
            Some((g, l)) => Some(cpu_slice::<F>(g, l)?),
            None => None,
        };
        let weights = self.is_weights.as_ref().map(|w| w.storage_and_layout());
        let weights = match &weights {
            Some((g, l)) => Some(cpu_slice::<F>(g, l)?),
            None => None,
        };

        let (tokens, bad_mask) = row_tokens::<M, R>(mask, t);
        if bad_mask > 0.0 {
            return Err(kernel_error(crate::inputs::mask_error(bad_mask)));
        }
        let total_tokens: f64 = tokens.iter().sum();
        let sequences = tokens.iter().filter(|&&n| n > 0.0).count() as f64;

        let config = &self.config;
        let params = Params {
            level: config.ratio_level,
            clamp: config.log_ratio_clamp.map(R::from_f64),
            seq_max: config.seq_log_ratio_max.map(R::from_f64),
            kl: config.kl.map(|k| (k.estimator, k.clamp)),
        };
        let x = Inputs {
            t,
            log_probs: lp,
            old,
            advantages,
            per_token_advantages: self.advantages.rank() == 2,
            mask,
            reference,
            weights,
        };
        let norm = &self.normalizer;
        let coefficient = |row: usize| RowCoefficients {
            policy: R::from_f64(row_coefficient(
                config.aggregation,
                tokens[row],
                total_tokens,
                sequences,
                t,
                norm,
            )),
            kl: R::from_f64(config.kl.map_or(0.0, |k| {
                k.coef
                    * row_coefficient(k.aggregation, tokens[row], total_tokens, sequences, t, norm)
            })),
            tokens: R::from_f64(tokens[row]),
        };
        let mut grad = vec![F::store(R::ZERO); b * t];
        let rows: Vec<RowOut> = {
            let mut run_rows = |shape: &RowFn<'_, R, F>| {
                grad.par_chunks_mut(t.max(1))
                    .enumerate()
                    .map_init(Vec::new, |scratch, (row, g)| shape(row, scratch, g))
                    .collect::<Vec<_>>()
            };
            match config.trust_region {
                TrustRegion::SoftGate { tau_pos, tau_neg } => {
                    let s = Soft {
                        tau_pos: R::from_f64(tau_pos),
                        tau_neg: R::from_f64(tau_neg),
                        four_over_pos: R::from_f64(4.0 / tau_pos),
                        four_over_neg: R::from_f64(4.0 / tau_neg),
                    };
                    run_rows(&|row, scratch, g| {
                        policy_row_best(&x, row, &params, &s, &coefficient(row), scratch, g)
                    })
                }
                TrustRegion::HardClip(c) => {
                    let s = Clip {
                        low: R::from_f64(1.0 - c.eps_low),
                        high: R::from_f64(1.0 + c.eps_high),
                        delta: c.delta.map(R::from_f64),
                        dual: c.dual_clip.map(R::from_f64),
                    };
                    run_rows(&|row, scratch, g| {
                        policy_row_best(&x, row, &params, &s, &coefficient(row), scratch, g)
                    })
                }
                TrustRegion::Unclipped => run_rows(&|row, scratch, g| {
                    policy_row_best(&x, row, &params, &Plain, &coefficient(row), scratch, g)
                }),
            }
        };

        // Reduce in row order: deterministic whatever the number of threads.
        let names = [
            "log_probs",
            "old_log_probs",
            "advantages",
            "is_weights",
            "ref_log_probs",
        ];
        for (k, name) in names.iter().enumerate() {
            let bad: f64 = rows.iter().map(|r| r.bad[k]).sum();
            if bad > 0.0 {
                return Err(kernel_error(Error::InvalidValue {
                    arg: name,
                    expected: "finite values at unmasked positions".into(),
                    actual: format!("{bad} non-finite"),
                }));
            }
        }
        let mut loss = 0.0;
        let mut sums = [0.0; NUM_SLOTS];
        let (mut min, mut max) = (f64::INFINITY, f64::NEG_INFINITY);
        for (row, out) in rows.iter().enumerate() {
            let c = coefficient(row);
            loss += c.policy.to_f64() * out.policy + c.kl.to_f64() * out.kl;
            for (s, v) in sums.iter_mut().zip(&out.sums) {
                *s += v;
            }
            min = min.min(out.min);
            max = max.max(out.max);
        }
        let mut output = Vec::with_capacity(OUT_LEN);
        output.push(R::from_f64(loss));
        output.extend(sums.iter().map(|&v| R::from_f64(v)));
        output.push(R::from_f64(min));
        output.push(R::from_f64(max));
        Ok((output, grad))
    }

    fn run_dtype<F>(&self, lp: &[F], dims: &[usize]) -> candle_core::Result<CpuStorage>
    where
        F: Load<f32> + Store<f32> + WithDType,
    {
        let (guard, layout) = self.mask.storage_and_layout();
        let (output, grad) = match self.mask.dtype() {
            DType::U8 => self.run::<F, u8, f32>(lp, cpu_slice::<u8>(&guard, layout)?, dims)?,
            _ => self.run::<F, F, f32>(lp, cpu_slice::<F>(&guard, layout)?, dims)?,
        };
        self.keep_grad(grad, dims)?;
        Ok(CpuStorage::F32(output))
    }

    fn keep_grad<F: WithDType>(&self, grad: Vec<F>, dims: &[usize]) -> candle_core::Result<()> {
        let grad = Tensor::from_vec(grad, dims, &candle_core::Device::Cpu)?;
        *self.grad.lock().expect("gradient lock") = Some(grad);
        Ok(())
    }
}

impl CustomOp1 for FusedPolicyLoss {
    fn name(&self) -> &'static str {
        "sapo-fused-policy-loss"
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let dims = layout.shape().dims().to_vec();
        let (start, end) = layout
            .contiguous_offsets()
            .ok_or_else(|| candle_core::Error::Msg("log_probs must be contiguous".into()))?;
        let out = match storage {
            CpuStorage::F32(v) => self.run_dtype::<f32>(&v[start..end], &dims)?,
            CpuStorage::F16(v) => self.run_dtype::<f16>(&v[start..end], &dims)?,
            CpuStorage::BF16(v) => self.run_dtype::<bf16>(&v[start..end], &dims)?,
            CpuStorage::F64(v) => {
                let (guard, mlayout) = self.mask.storage_and_layout();
                let (output, grad) = match self.mask.dtype() {
                    DType::U8 => self.run::<f64, u8, f64>(
                        &v[start..end],
                        cpu_slice::<u8>(&guard, mlayout)?,
                        &dims,
                    )?,
                    _ => self.run::<f64, f64, f64>(
                        &v[start..end],
                        cpu_slice::<f64>(&guard, mlayout)?,
                        &dims,
                    )?,
                };
                self.keep_grad(grad, &dims)?;
                CpuStorage::F64(output)
            }
            other => candle_core::bail!("log_probs: unsupported dtype {:?}", other.dtype()),
        };
        Ok((out, Shape::from(OUT_LEN)))
    }

    fn bwd(
        &self,
        _arg: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        let grad = self
            .grad
            .lock()
            .expect("gradient lock")
            .clone()
            .ok_or_else(|| candle_core::Error::Msg("backward before forward".into()))?;
        // Only the loss (slot 0) carries gradient; the metrics are detached.
        let upstream = grad_res
            .narrow(0, 0, 1)?
            .to_dtype(DType::F64)?
            .to_vec1::<f64>()?[0];
        Ok(Some(if upstream == 1.0 {
            grad
        } else {
            grad.affine(upstream, 0.0)?
        }))
    }
}
