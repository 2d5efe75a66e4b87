//! The fused CPU kernel of the unified surrogate: loss, gradient and metric sums of every ratio
//! level × trust region × aggregation × KL estimator × rollout weights, in one parallel pass over
//! the rows. The gradient is produced in the forward pass and handed to the backward.
//!
//! Rows run in parallel (rayon), each writing its own gradient slice. A row is processed in
//! tiles that stay in L1: each tile is loaded once from the storage dtype (f16/bf16 read in
//! place) with the masked positions zeroed and the inputs validated; one vectorized sweep
//! evaluates `−f(ρ)·A`, its derivative and the per-token metric streams; the streams are summed
//! in fixed lanes; the KL penalty is added; the tile's gradient is stored. The sequence levels
//! first sum the row's log-ratios (and `Sequence` stores its gradient after the row, once
//! `∂l/∂s` is known). Row results are reduced in row order, so the bits do not depend on the
//! number of threads.

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
    /// Whether the shape defines the hard-clip metrics.
    const CLIP: bool;
    /// Whether the shape defines the gate metrics.
    const GATE: bool;
    fn eval(&self, r: R, a: R) -> Eval<R>;
}

struct Soft<R> {
    tau_pos: R,
    tau_neg: R,
    four_over_pos: R,
    four_over_neg: R,
}

impl<R: Real> TrustShape<R> for Soft<R> {
    const CLIP: bool = false;
    const GATE: bool = true;
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
    const CLIP: bool = true;
    const GATE: bool = false;
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
    const CLIP: bool = false;
    const GATE: bool = false;
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
type RowFn<'a, R, F> = dyn Fn(usize, &mut RowBuffers<R>, &mut [F]) -> RowOut + Sync + 'a;

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

/// Tokens per tile: a tile's buffers (`BUFFERS × TILE` values) stay in L1.
const TILE: usize = 256;

/// Buffers of one tile: the inputs (keep, log_probs, old, advantages, weights, reference), the
/// gradient, and the per-token streams (value, slope, −δ, ratio, ratio for the minimum, clipped,
/// dual, low, high, gate weight, gate value, KL).
const BUFFERS: usize = 19;

/// Per-thread tile buffers in the compute type. The main sweep writes per-token streams (no
/// loop-carried dependency, so LLVM vectorizes it) and the streams are then summed into `LANES`
/// independent lanes (vectorized, and in a fixed order: the bits do not depend on the thread
/// that ran the row).
struct RowBuffers<R> {
    data: Vec<R>,
}

impl<R: Real> RowBuffers<R> {
    fn new() -> Self {
        Self {
            data: vec![R::ZERO; BUFFERS * TILE],
        }
    }

    /// The `BUFFERS` slices of `TILE` values. Their contents are stale: every sweep writes what
    /// it reads.
    fn split(&mut self) -> Vec<&mut [R]> {
        self.data.chunks_exact_mut(TILE).collect()
    }
}

#[inline(always)]
fn lanes<R>(v: &[R]) -> &[[R; LANES]] {
    v.as_chunks::<LANES>().0
}

/// Adds a padded stream into `LANES` lane sums.
#[inline(always)]
fn lane_sum<R: Real>(v: &[R], acc: &mut [R; LANES]) {
    for block in lanes(v) {
        for l in 0..LANES {
            acc[l] = acc[l] + block[l];
        }
    }
}

#[inline(always)]
fn lane_min<R: Real>(v: &[R], acc: &mut [R; LANES]) {
    for block in lanes(v) {
        for l in 0..LANES {
            acc[l] = acc[l].min_of(block[l]);
        }
    }
}

#[inline(always)]
fn lane_max<R: Real>(v: &[R], acc: &mut [R; LANES]) {
    for block in lanes(v) {
        for l in 0..LANES {
            acc[l] = acc[l].max_of(block[l]);
        }
    }
}

/// Loads a tile of one input into a padded buffer (zero where masked and in the padding) and
/// counts its unmasked non-finite values.
#[inline(always)]
fn load_tile<F: Load<R>, R: Real>(src: &[F], keep: &[R], dst: &mut [R]) -> u32 {
    let mut bad = 0u32;
    for ((d, v), k) in dst.iter_mut().zip(src).zip(keep) {
        let (v, keep) = (v.load(), *k != R::ZERO);
        bad += u32::from(keep && !v.is_finite_value());
        *d = R::select(keep, v, R::ZERO);
    }
    dst[src.len()..].fill(R::ZERO);
    bad
}

/// As [`load_tile`] for one value broadcast over `len` tokens.
#[inline(always)]
fn load_broadcast<F: Load<R>, R: Real>(src: F, len: usize, keep: &[R], dst: &mut [R]) -> u32 {
    let v = src.load();
    let mut bad = 0u32;
    for (d, k) in dst[..len].iter_mut().zip(keep) {
        let keep = *k != R::ZERO;
        bad += u32::from(keep && !v.is_finite_value());
        *d = R::select(keep, v, R::ZERO);
    }
    dst[len..].fill(R::ZERO);
    bad
}

/// Loads the mask of tokens `range` into `keep` (0/1, padding 0).
#[inline(always)]
fn load_keep<M: Load<R>, R: Real>(mask: &[M], keep: &mut [R]) {
    for (k, m) in keep.iter_mut().zip(mask) {
        *k = R::indicator(m.load() != R::ZERO);
    }
    keep[mask.len()..].fill(R::ZERO);
}

#[inline(always)]
fn policy_row<F, M, R, S>(
    x: &Inputs<'_, F, M>,
    row: usize,
    p: &Params<R>,
    shape: &S,
    coef: &RowCoefficients<R>,
    buf: &mut RowBuffers<R>,
    grad: &mut [F],
) -> RowOut
where
    F: Load<R> + Store<R>,
    M: Load<R>,
    R: Real,
    S: TrustShape<R>,
{
    let t = x.t;
    let row_start = row * t;
    let mut b = buf.split();
    let [keep, lp, old, adv, w, rf, g, value, slope, neg_delta, ratio, ratio_min, clipped, dual, low, high, gate_w, gate_v, kl] =
        &mut b[..]
    else {
        unreachable!("BUFFERS slices")
    };
    let tiles = || {
        (0..t)
            .step_by(TILE)
            .map(move |start| (start, TILE.min(t - start)))
    };
    let n = coef.tokens;

    // Sequence levels: the row's Σ m·δ first, then s_i.
    let (s, dseq) = if p.level == RatioLevel::Token {
        (R::ONE, R::ONE)
    } else {
        let mut sum = [R::ZERO; LANES];
        for (start, len) in tiles() {
            let span = row_start + start..row_start + start + len;
            let padded = len.div_ceil(LANES) * LANES;
            load_keep(&x.mask[span.clone()], &mut keep[..padded]);
            load_tile(&x.log_probs[span.clone()], keep, &mut lp[..padded]);
            load_tile(&x.old[span], keep, &mut old[..padded]);
            for j in 0..padded {
                neg_delta[j] = keep[j] * log_ratio(lp[j] - old[j], p.clamp).0;
            }
            lane_sum(&neg_delta[..padded], &mut sum);
        }
        let seq = R::from_f64(sum_lanes(&sum)) / n.max_of(R::ONE);
        let (log_s, dseq) = match p.seq_max {
            Some(m) => (R::select(seq > m, m, seq), R::indicator(seq <= m)),
            None => (seq, R::ONE),
        };
        (log_s.exp(), dseq)
    };
    let token_level = p.level == RatioLevel::Token;
    let seq_token = p.level == RatioLevel::SequenceToken;
    let sequence = p.level == RatioLevel::Sequence;

    let mut bad = [0u32; 5];
    let zero = [R::ZERO; LANES];
    let (mut policy, mut seq_slope, mut kl_lanes) = (zero, zero, zero);
    let mut sums = [zero; NUM_SLOTS];
    let mut lo = [R::INFINITY; LANES];
    let mut hi = [-R::INFINITY; LANES];

    // Adds the KL penalty of a loaded tile to its gradient and the KL lanes.
    let add_kl = |padded: usize,
                  keep: &[R],
                  lp: &[R],
                  rf: &[R],
                  g: &mut [R],
                  kl: &mut [R],
                  lanes: &mut [R; LANES]| {
        if let Some((estimator, clamp)) = p.kl {
            for j in 0..padded {
                let (k, dk) = kl_value(estimator, clamp, lp[j] - rf[j]);
                kl[j] = keep[j] * k;
                g[j] = g[j] + keep[j] * coef.kl * dk;
            }
            lane_sum(&kl[..padded], lanes);
        }
    };

    for (start, len) in tiles() {
        let span = row_start + start..row_start + start + len;
        let padded = len.div_ceil(LANES) * LANES;

        // Load the tile once (storage dtype → compute type), zero the masked positions, count
        // the unmasked non-finite values.
        load_keep(&x.mask[span.clone()], &mut keep[..padded]);
        bad[0] += load_tile(&x.log_probs[span.clone()], keep, &mut lp[..padded]);
        bad[1] += load_tile(&x.old[span.clone()], keep, &mut old[..padded]);
        bad[2] += if x.per_token_advantages {
            load_tile(&x.advantages[span.clone()], keep, &mut adv[..padded])
        } else {
            load_broadcast(x.advantages[row], len, keep, &mut adv[..padded])
        };
        match x.weights {
            Some(weights) => bad[3] += load_tile(&weights[span.clone()], keep, &mut w[..padded]),
            None => w[..padded].copy_from_slice(&keep[..padded]),
        }
        if let Some(reference) = x.reference {
            bad[4] += load_tile(&reference[span.clone()], keep, &mut rf[..padded]);
        }

        // The surrogate, its gradient and the per-token metric streams.
        let (keep, lp, old, adv, w) = (
            &keep[..padded],
            &lp[..padded],
            &old[..padded],
            &adv[..padded],
            &w[..padded],
        );
        let (g, value, slope, neg_delta, ratio, ratio_min) = (
            &mut g[..padded],
            &mut value[..padded],
            &mut slope[..padded],
            &mut neg_delta[..padded],
            &mut ratio[..padded],
            &mut ratio_min[..padded],
        );
        let (clipped, dual, low, high, gate_w, gate_v) = (
            &mut clipped[..padded],
            &mut dual[..padded],
            &mut low[..padded],
            &mut high[..padded],
            &mut gate_w[..padded],
            &mut gate_v[..padded],
        );
        for j in 0..padded {
            let m = keep[j];
            let (delta, ddelta) = log_ratio(lp[j] - old[j], p.clamp);
            let r = R::select(token_level, delta.exp(), s);
            let e = shape.eval(r, adv[j]);
            let dratio = R::select(
                token_level,
                r * ddelta,
                R::select(seq_token, s * dseq, R::ZERO),
            );
            let mw = w[j];
            g[j] = coef.policy * mw * e.slope * dratio;
            value[j] = mw * e.value;
            slope[j] = mw * e.slope;
            neg_delta[j] = -(m * delta);
            ratio[j] = m * r;
            ratio_min[j] = R::select(m != R::ZERO, r, R::INFINITY);
            if S::CLIP {
                clipped[j] = m * e.clipped;
                dual[j] = m * e.dual;
                low[j] = m * e.low;
                high[j] = m * e.high;
            }
            if S::GATE {
                gate_w[j] = m * e.gate_weight;
                gate_v[j] = m * e.gate_value;
            }
        }
        lane_sum(value, &mut policy);
        lane_sum(slope, &mut seq_slope);
        lane_sum(neg_delta, &mut sums[metrics::NEG_LOG_RATIO]);
        lane_sum(ratio, &mut sums[metrics::RATIO]);
        lane_min(ratio_min, &mut lo);
        lane_max(ratio, &mut hi);
        if S::CLIP {
            lane_sum(clipped, &mut sums[metrics::CLIPPED]);
            lane_sum(dual, &mut sums[metrics::DUAL_CLIPPED]);
            lane_sum(low, &mut sums[metrics::CLIP_LOW]);
            lane_sum(high, &mut sums[metrics::CLIP_HIGH]);
        }
        if S::GATE {
            lane_sum(gate_w, &mut sums[metrics::GATE_WEIGHT]);
            lane_sum(gate_v, &mut sums[metrics::GATE_VALUE]);
        }
        if !sequence {
            add_kl(padded, keep, lp, rf, g, kl, &mut kl_lanes);
            for (dst, v) in grad[start..start + len].iter_mut().zip(g.iter()) {
                *dst = F::store(*v);
            }
        }
    }

    // Sequence ratio: every token of the row shares ∂l/∂s, known only now.
    if sequence {
        let shared = coef.policy * R::from_f64(sum_lanes(&seq_slope)) * s * dseq / n.max_of(R::ONE);
        for (start, len) in tiles() {
            let span = row_start + start..row_start + start + len;
            let padded = len.div_ceil(LANES) * LANES;
            load_keep(&x.mask[span.clone()], &mut keep[..padded]);
            load_tile(&x.log_probs[span.clone()], keep, &mut lp[..padded]);
            load_tile(&x.old[span.clone()], keep, &mut old[..padded]);
            if let Some(reference) = x.reference {
                load_tile(&reference[span], keep, &mut rf[..padded]);
            }
            for j in 0..padded {
                g[j] = keep[j] * shared * log_ratio(lp[j] - old[j], p.clamp).1;
            }
            add_kl(padded, keep, lp, rf, g, kl, &mut kl_lanes);
            for (dst, v) in grad[start..start + len].iter_mut().zip(g.iter()) {
                *dst = F::store(*v);
            }
        }
    }

    let kl_sum = sum_lanes(&kl_lanes);
    let mut out = [0.0; NUM_SLOTS];
    for (o, lanes) in out.iter_mut().zip(&sums) {
        *o = sum_lanes(lanes);
    }
    out[metrics::TOKENS] = n.to_f64();
    out[metrics::KL] = kl_sum;
    RowOut {
        policy: sum_lanes(&policy),
        kl: kl_sum,
        sums: out,
        min: lo.iter().fold(f64::INFINITY, |m, v| m.min(v.to_f64())),
        max: if n > R::ZERO {
            hi.iter().fold(f64::NEG_INFINITY, |m, v| m.max(v.to_f64()))
        } else {
            f64::NEG_INFINITY
        },
        bad: bad.map(f64::from),
    }
}

multiversion!(fn policy_row_best<F: Load<R> | Store<R>, M: Load<R>, R: Real, S: TrustShape<R>>(
    x: &Inputs<'_, F, M>,
    row: usize,
    p: &Params<R>,
    shape: &S,
    coef: &RowCoefficients<R>,
    buf: &mut RowBuffers<R>,
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
            let (mut n, mut bad) = (0u32, 0u32);
            for v in row {
                let v = v.load();
                n += u32::from(v == R::ONE);
                bad += u32::from(v != R::ZERO && v != R::ONE);
            }
            (f64::from(n), f64::from(bad))
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
        let coefficients: Vec<RowCoefficients<R>> = (0..tokens.len())
            .map(|row| RowCoefficients {
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
                        * row_coefficient(
                            k.aggregation,
                            tokens[row],
                            total_tokens,
                            sequences,
                            t,
                            norm,
                        )
                })),
                tokens: R::from_f64(tokens[row]),
            })
            .collect();
        let mut grad = vec![F::store(R::ZERO); b * t];
        let rows: Vec<RowOut> = {
            let mut run_rows = |shape: &RowFn<'_, R, F>| {
                grad.par_chunks_mut(t.max(1))
                    .enumerate()
                    .map_init(RowBuffers::new, |buf, (row, g)| shape(row, buf, g))
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
                        policy_row_best(&x, row, &params, &s, &coefficients[row], scratch, g)
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
                        policy_row_best(&x, row, &params, &s, &coefficients[row], scratch, g)
                    })
                }
                TrustRegion::Unclipped => run_rows(&|row, scratch, g| {
                    policy_row_best(&x, row, &params, &Plain, &coefficients[row], scratch, g)
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
            let c = &coefficients[row];
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

    /// Runs the kernel for log-probs of storage type `F` computed in `R`, with a `u8` mask or
    /// one of `F`, and keeps the gradient for the backward.
    fn run_dtype<F, R>(&self, lp: &[F], dims: &[usize]) -> candle_core::Result<CpuStorage>
    where
        F: Load<R> + Store<R> + WithDType,
        u8: Load<R>,
        R: Real + WithDType,
    {
        let (guard, layout) = self.mask.storage_and_layout();
        let (output, grad) = match self.mask.dtype() {
            DType::U8 => self.run::<F, u8, R>(lp, cpu_slice::<u8>(&guard, layout)?, dims)?,
            _ => self.run::<F, F, R>(lp, cpu_slice::<F>(&guard, layout)?, dims)?,
        };
        self.keep_grad(grad, dims)?;
        Ok(R::to_cpu_storage_owned(output))
    }

    fn keep_grad<F: WithDType>(&self, grad: Vec<F>, dims: &[usize]) -> candle_core::Result<()> {
        let grad = Tensor::from_vec(grad, dims, &candle_core::Device::Cpu)?;
        // A poisoned lock only means an earlier call panicked; the slot is overwritten anyway.
        *self.grad.lock().unwrap_or_else(|e| e.into_inner()) = Some(grad);
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
            CpuStorage::F32(v) => self.run_dtype::<f32, f32>(&v[start..end], &dims)?,
            CpuStorage::F16(v) => self.run_dtype::<f16, f32>(&v[start..end], &dims)?,
            CpuStorage::BF16(v) => self.run_dtype::<bf16, f32>(&v[start..end], &dims)?,
            CpuStorage::F64(v) => self.run_dtype::<f64, f64>(&v[start..end], &dims)?,
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
            .unwrap_or_else(|e| e.into_inner())
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
