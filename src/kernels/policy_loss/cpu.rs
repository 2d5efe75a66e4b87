//! The policy loss on the CPU: traversal and memory only — the per-token chain is
//! `losses/chain.rs`, the formulas come from their concept files (`losses/ratio.rs`, each
//! objective's file, `gate.rs`, `kl.rs`, `aggregation.rs`).
//!
//! Rows run in parallel on candle's CPU pool (`crate::pool`), each writing its own gradient slice.
//! A row is processed in tiles that stay in L1: each tile is loaded once from the storage dtype
//! (f16/bf16 read in place) with the masked positions zeroed and the inputs validated; one
//! vectorized sweep evaluates the per-token loss, its derivative and the metric streams; the
//! streams are summed into f64 lanes; the KL penalty is added; the tile's gradient is stored. The
//! sequence levels first sum the row's log-ratios (in f64), and `Sequence` stores its gradient
//! after the row, once `∂l/∂s` is known. Row results are reduced in row order, so the bits do not
//! depend on the number of threads.

use std::mem::MaybeUninit;
use std::ops::Range;

use candle_core::{Tensor, WithDType};

use super::FusedPolicyLoss;
use crate::aggregation::row_coefficient;
use crate::error::Error;
use crate::kernels::simd::{
    dispatch, lane_max, lane_min, lane_sum, total, Load, Store, Vectorized, LANES,
};
use crate::kernels::{cpu_slice, kernel_error, memory};
use crate::losses::chain::{
    effective_weight, kl_terms, ratio_terms, token_terms, KlParams, Params, SequenceRatio,
    TokenInputs,
};
use crate::losses::metrics::{self, NUM_SLOTS};
use crate::losses::objective::{Objective, Shape, Visit};
use crate::losses::ratio::{self, RatioLevel};
use crate::losses::trust_region::TrustRegion;
use crate::pool;
use crate::real::Real;

/// Tokens per tile: a tile's buffers stay in L1.
const TILE: usize = 256;

/// The inputs of all rows, as slices of their storage.
pub(crate) struct Inputs<'a, F, M> {
    pub t: usize,
    pub log_probs: &'a [F],
    pub old: &'a [F],
    pub advantages: &'a [F],
    pub per_token_advantages: bool,
    pub mask: &'a [M],
    pub reference: Option<&'a [F]>,
    pub weights: Option<&'a [F]>,
    /// KL-Cov's per-token selection.
    pub flags: Option<&'a [F]>,
    /// OPSM's rows whose tokens with `A < 0` lose their policy term (`w` set to 0).
    pub off_rows: Option<&'a [bool]>,
    /// The top-entropy selection: `H` and `θ`; a token with `H < θ` loses its policy term.
    pub entropy: Option<(&'a [f32], f32)>,
}

/// Per-row coefficients: the policy aggregation's and `β` times the KL aggregation's.
pub(crate) struct RowCoefficients<R> {
    pub policy: R,
    pub kl: R,
    /// The KL aggregation's alone (for the `kl_loss` metric).
    pub kl_agg: f64,
    pub tokens: f64,
}

/// Names of the checked inputs, in the order of `RowOut::bad`.
const CHECKED: [&str; 5] = [
    "log_probs",
    "old_log_probs",
    "advantages",
    "is_weights",
    "ref_log_probs",
];

/// What one row returns; reduced in row order.
struct RowOut {
    /// `Σ m·w·l`.
    policy: f64,
    /// `Σ m·k`.
    kl: f64,
    sums: [f64; NUM_SLOTS],
    min: f64,
    max: f64,
    /// Unmasked non-finite values of each input of `CHECKED`.
    bad: [u32; 5],
}

/// Per-thread tile buffers in the compute type: the inputs, the gradient and the per-token
/// streams. The sweep writes streams (no loop-carried dependency, so LLVM vectorizes it) that are
/// then summed in fixed lanes.
struct Tile<R> {
    keep: Vec<R>,
    lp: Vec<R>,
    old: Vec<R>,
    adv: Vec<R>,
    w: Vec<R>,
    rf: Vec<R>,
    flag: Vec<R>,
    g: Vec<R>,
    value: Vec<R>,
    slope: Vec<R>,
    neg_delta: Vec<R>,
    excess: Vec<R>,
    lo: Vec<R>,
    hi: Vec<R>,
    kl: Vec<R>,
    kl_raw: Vec<R>,
    shape: [Vec<R>; 4],
}

impl<R: Real> Tile<R> {
    fn new() -> Self {
        let v = || vec![R::ZERO; TILE];
        Self {
            keep: v(),
            lp: v(),
            old: v(),
            adv: v(),
            w: v(),
            rf: v(),
            flag: v(),
            g: v(),
            value: v(),
            slope: v(),
            neg_delta: v(),
            excess: v(),
            lo: v(),
            hi: v(),
            kl: v(),
            kl_raw: v(),
            shape: [v(), v(), v(), v()],
        }
    }
}

/// A row's running sums.
struct RowAcc<R> {
    policy: [f64; LANES],
    slope: [f64; LANES],
    kl: [f64; LANES],
    kl_raw: [f64; LANES],
    sums: [[f64; LANES]; NUM_SLOTS],
    lo: [R; LANES],
    hi: [R; LANES],
    bad: [u32; 5],
}

/// Whether tokens `start..start + len` of row `row` are all masked.
#[inline(always)]
fn all_masked<F, M: Load<R>, R: Real>(
    x: &Inputs<'_, F, M>,
    row: usize,
    (start, len): (usize, usize),
) -> bool {
    let begin = row * x.t + start;
    // A count, not an early exit: the compiler keeps it in vector lanes.
    let unmasked: u32 = x.mask[begin..begin + len]
        .iter()
        .map(|m| u32::from(m.load() != R::ZERO))
        .sum();
    unmasked == 0
}

/// The tile `k` of a row of `t` tokens: its first token and its length.
#[inline(always)]
fn tile_at(t: usize, k: usize) -> (usize, usize) {
    (k * TILE, TILE.min(t - k * TILE))
}

/// The indices of row `row`'s tiles from its first to its last tile that holds an unmasked
/// token. The tiles outside that span (the padding before and after a sequence) add nothing to
/// any sum — every stream, the KL terms and the sequence ratio's sums are weighted by the mask,
/// and the ratio's extremes take `±∞` there — and their gradient is zero: the traversal skips
/// them after one read of their mask and writes their zeros ([`zero_outside`]), instead of
/// loading, evaluating and storing them. Found once per row, before the row's loops, so that
/// each loop is the plain traversal the compiler vectorizes.
#[inline(always)]
fn live_span<F, M: Load<R>, R: Real>(x: &Inputs<'_, F, M>, row: usize) -> Range<usize> {
    let count = x.t.div_ceil(TILE);
    let first = (0..count)
        .find(|&k| !all_masked(x, row, tile_at(x.t, k)))
        .unwrap_or(count);
    let last = (first..count)
        .rev()
        .find(|&k| !all_masked(x, row, tile_at(x.t, k)))
        .map_or(first, |k| k + 1);
    first..last
}

/// The tiles of a row of `t` tokens whose indices lie in `span` ([`live_span`]).
#[inline(always)]
fn tiles(t: usize, span: &Range<usize>) -> impl Iterator<Item = (usize, usize)> {
    span.clone().map(move |k| tile_at(t, k))
}

/// Loads `src` into a padded buffer (zero where masked and in the padding); returns the number
/// of unmasked non-finite values.
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

/// As [`load_tile`] for one value broadcast over the tile.
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

/// Loads the mask (0/1, padding 0), `ℓ` and `ℓold` of tokens `span`; returns the padded length.
#[inline(always)]
fn load_ratio_inputs<F: Load<R>, M: Load<R>, R: Real>(
    x: &Inputs<'_, F, M>,
    start: usize,
    len: usize,
    tile: &mut Tile<R>,
) -> (usize, [u32; 2]) {
    let padded = len.div_ceil(LANES) * LANES;
    let span = start..start + len;
    for (k, m) in tile.keep.iter_mut().zip(&x.mask[span.clone()]) {
        *k = R::indicator(m.load() != R::ZERO);
    }
    tile.keep[len..padded].fill(R::ZERO);
    let keep = &tile.keep[..padded];
    let bad_lp = load_tile(&x.log_probs[span.clone()], keep, &mut tile.lp[..padded]);
    let bad_old = load_tile(&x.old[span], keep, &mut tile.old[..padded]);
    (padded, [bad_lp, bad_old])
}

/// Loads every input of a tile of row `row`; returns the padded length.
#[inline(always)]
fn load<F: Load<R>, M: Load<R>, R: Real>(
    x: &Inputs<'_, F, M>,
    row: usize,
    start: usize,
    len: usize,
    tile: &mut Tile<R>,
    bad: &mut [u32; 5],
) -> usize {
    let begin = row * x.t + start;
    let (padded, [bad_lp, bad_old]) = load_ratio_inputs(x, begin, len, tile);
    let span = begin..begin + len;
    let keep = &tile.keep[..padded];
    let bad_adv = if x.per_token_advantages {
        load_tile(&x.advantages[span.clone()], keep, &mut tile.adv[..padded])
    } else {
        load_broadcast(x.advantages[row], len, keep, &mut tile.adv[..padded])
    };
    let bad_w = match (x.weights, x.entropy) {
        (Some(w), _) => load_tile(&w[span.clone()], keep, &mut tile.w[..padded]),
        // The top-entropy rule without weights: `w` is the mask's keep where `H ≥ θ`, in the
        // one loop that writes it.
        (None, Some((entropy, theta))) => {
            let w = &mut tile.w[..padded];
            for ((w, k), h) in w.iter_mut().zip(keep).zip(&entropy[span.clone()]) {
                *w = R::select(*h >= theta, *k, R::ZERO);
            }
            w[len..].fill(R::ZERO);
            0
        }
        (None, None) => {
            tile.w[..padded].copy_from_slice(keep);
            0
        }
    };
    let bad_rf = match x.reference {
        Some(r) => load_tile(&r[span.clone()], keep, &mut tile.rf[..padded]),
        None => 0,
    };
    if let Some(f) = x.flags {
        load_tile(&f[span.clone()], keep, &mut tile.flag[..padded]);
    }
    // The masks' decisions (`losses/masks.rs`), applied to the weight as their 0/1 factor.
    if x.off_rows.is_some_and(|off| off[row]) {
        let (w, adv) = (&mut tile.w[..padded], &tile.adv[..padded]);
        for (w, a) in w.iter_mut().zip(adv) {
            *w = R::select(*a < R::ZERO, R::ZERO, *w);
        }
    }
    // The top-entropy rule after the caller's weights (without them it wrote `w` above).
    if let (Some(_), Some((entropy, theta))) = (x.weights, x.entropy) {
        for (w, h) in tile.w[..len].iter_mut().zip(&entropy[span]) {
            *w = R::select(*h >= theta, *w, R::ZERO);
        }
    }
    for (b, v) in bad
        .iter_mut()
        .zip([bad_lp, bad_old, bad_adv, bad_w, bad_rf])
    {
        *b += v;
    }
    padded
}

/// The row's pre-pass: `Σ_t m·y` (the shape's log-ratio) and `Σ_t m·row_term` in f64 lanes,
/// then the sequence ratio and the row statistic.
#[inline(always)]
fn sequence_ratio<F: Load<R>, M: Load<R>, R: Real, S: Shape<R>>(
    x: &Inputs<'_, F, M>,
    row: usize,
    p: &Params<R>,
    shape: &S,
    n: f64,
    live: &Range<usize>,
    tile: &mut Tile<R>,
) -> SequenceRatio<R> {
    let (mut sum, mut stat) = ([0.0; LANES], [0.0; LANES]);
    let mut bad = [0u32; 5];
    for (start, len) in tiles(x.t, live) {
        let padded = load(x, row, start, len, tile, &mut bad);
        // Every slice cut to the tile's length: the loop runs without bounds checks and
        // vectorizes (indexing the tile's fields directly kept it scalar).
        let (keeps, lp, old, adv, w) = (
            &tile.keep[..padded],
            &tile.lp[..padded],
            &tile.old[..padded],
            &tile.adv[..padded],
            &tile.w[..padded],
        );
        let (value, slope) = (&mut tile.value[..padded], &mut tile.slope[..padded]);
        for j in 0..padded {
            let delta = ratio::log_ratio(lp[j] - old[j], p.clamp).0;
            let keep = keeps[j];
            value[j] = keep * shape.log_ratio(delta, adv[j]).0;
            slope[j] = keep * shape.row_term(delta, R::select(keep != R::ZERO, w[j], R::ONE));
        }
        lane_sum(&tile.value[..padded], &mut sum);
        if S::ROW_STATISTIC {
            lane_sum(&tile.slope[..padded], &mut stat);
        }
    }
    let (log_s, dseq) = ratio::sequence_log_ratio(total(&sum), n, p.seq_max);
    let (s, ds) = ratio::ratio(R::from_f64(log_s));
    SequenceRatio {
        s,
        ds: ds * R::from_f64(dseq),
        // Saturating as the ratio does.
        excess: n * log_s.min(R::MAX_EXP_ARG.to_f64()).exp_m1(),
        row: R::from_f64(total(&stat)),
    }
}

/// The per-token sweep: loss, derivatives, gradient (except the `Sequence` level's row-shared
/// part), KL terms and metric streams.
#[inline(always)]
fn sweep<R: Real, S: Shape<R>>(
    tile: &mut Tile<R>,
    padded: usize,
    p: &Params<R>,
    shape: &S,
    coef: &RowCoefficients<R>,
    seq: SequenceRatio<R>,
) {
    let n = padded;
    let t = &mut *tile;
    // Every slice cut to the tile's length, so that the loop runs without bounds checks.
    let (keep, lp, old, adv, w, flag) = (
        &t.keep[..n],
        &t.lp[..n],
        &t.old[..n],
        &t.adv[..n],
        &t.w[..n],
        &t.flag[..n],
    );
    let (g, value, slope) = (&mut t.g[..n], &mut t.value[..n], &mut t.slope[..n]);
    let (neg_delta, excess) = (&mut t.neg_delta[..n], &mut t.excess[..n]);
    let (lo, hi) = (&mut t.lo[..n], &mut t.hi[..n]);
    let [s0, s1, s2, s3] = &mut t.shape;
    let mut streams = [&mut s0[..n], &mut s1[..n], &mut s2[..n], &mut s3[..n]];
    let slots = S::SLOTS.len();
    for j in 0..n {
        let m = keep[j];
        let weight = effective_weight::<R, S>(w[j], m);
        let inputs = TokenInputs {
            old: old[j],
            adv: adv[j],
            w: weight,
            flag: flag[j],
        };
        let terms = token_terms(lp[j], inputs, p, shape, coef.policy, seq);
        let (e, r) = (terms.e, terms.r);
        g[j] = terms.g;
        value[j] = weight * e.value;
        slope[j] = weight * e.slope;
        neg_delta[j] = -(m * terms.delta);
        excess[j] = m * (r - R::ONE);
        lo[j] = R::select(m != R::ZERO, r, R::INFINITY);
        hi[j] = R::select(m != R::ZERO, r, -R::INFINITY);
        // `slots` is a constant of `S`: the unused streams cost nothing.
        for (k, stream) in streams.iter_mut().enumerate() {
            if k < slots {
                stream[j] = m * e.metrics[k];
            }
        }
    }
    // The KL penalty in a loop of its own (few streams per loop keep both vectorized); the
    // importance-weighted form recomputes the ratio.
    if let Some(kl) = p.kl {
        let (g, keep, lp, old, adv, rf) = (
            &mut t.g[..n],
            &t.keep[..n],
            &t.lp[..n],
            &t.old[..n],
            &t.adv[..n],
            &t.rf[..n],
        );
        let (kl_value, kl_raw) = (&mut t.kl[..n], &mut t.kl_raw[..n]);
        for j in 0..n {
            let ratio = if kl.importance_weighted {
                let terms = ratio_terms(lp[j], old[j], adv[j], p, shape, seq);
                (terms.r, terms.dr)
            } else {
                (R::ONE, R::ZERO)
            };
            let (k_hat, k, dk) = kl_terms(kl, keep[j], coef.kl, lp[j], rf[j], ratio);
            kl_value[j] = k_hat;
            kl_raw[j] = k;
            g[j] = g[j] + dk;
        }
    }
}

/// Adds a tile's streams to the row's lane sums.
#[inline(always)]
fn accumulate<R: Real, S: Shape<R>>(tile: &Tile<R>, padded: usize, kl: bool, acc: &mut RowAcc<R>) {
    lane_sum(&tile.value[..padded], &mut acc.policy);
    lane_sum(&tile.slope[..padded], &mut acc.slope);
    lane_sum(
        &tile.neg_delta[..padded],
        &mut acc.sums[metrics::NEG_LOG_RATIO],
    );
    lane_sum(&tile.excess[..padded], &mut acc.sums[metrics::RATIO_EXCESS]);
    lane_min(&tile.lo[..padded], &mut acc.lo);
    lane_max(&tile.hi[..padded], &mut acc.hi);
    for (k, &slot) in S::SLOTS.iter().enumerate() {
        lane_sum(&tile.shape[k][..padded], &mut acc.sums[slot]);
    }
    if kl {
        lane_sum(&tile.kl[..padded], &mut acc.kl);
        lane_sum(&tile.kl_raw[..padded], &mut acc.kl_raw);
    }
}

/// Stores a tile's gradient (every value of `grad`).
#[inline(always)]
fn store<F: Store<R>, R: Real>(tile: &Tile<R>, grad: &mut [MaybeUninit<F>]) {
    for (dst, v) in grad.iter_mut().zip(&tile.g) {
        dst.write(F::store(*v));
    }
}

/// Writes the zero gradient of a row's tokens outside the tiles of `live` ([`live_span`]).
#[inline(always)]
fn zero_outside<F: Store<R>, R: Real>(t: usize, live: &Range<usize>, grad: &mut [MaybeUninit<F>]) {
    let begin = (live.start * TILE).min(t);
    let end = (live.end * TILE).clamp(begin, t);
    let zero = MaybeUninit::new(F::store(R::ZERO));
    grad[..begin].fill(zero);
    grad[end..].fill(zero);
}

/// One row: loss, metrics and gradient; writes every value of `grad` (the row's slice): the
/// tiles of the row's [`live_span`] by [`store`], the others by [`zero_outside`].
#[inline(always)]
fn policy_row<F, M, R, S>(
    x: &Inputs<'_, F, M>,
    row: usize,
    p: &Params<R>,
    shape: &S,
    coef: &RowCoefficients<R>,
    tile: &mut Tile<R>,
    grad: &mut [MaybeUninit<F>],
) -> RowOut
where
    F: Load<R> + Store<R>,
    M: Load<R>,
    R: Real,
    S: Shape<R>,
{
    let mut acc = RowAcc {
        policy: [0.0; LANES],
        slope: [0.0; LANES],
        kl: [0.0; LANES],
        kl_raw: [0.0; LANES],
        sums: [[0.0; LANES]; NUM_SLOTS],
        lo: [R::INFINITY; LANES],
        hi: [-R::INFINITY; LANES],
        bad: [0; 5],
    };
    let live = live_span(x, row);
    zero_outside::<F, R>(x.t, &live, grad);
    let seq = if p.level == RatioLevel::Token && !S::ROW_STATISTIC {
        SequenceRatio::token_level()
    } else {
        sequence_ratio(x, row, p, shape, coef.tokens, &live, tile)
    };
    let sequence = p.level == RatioLevel::Sequence;
    let kl = p.kl.is_some();
    for (start, len) in tiles(x.t, &live) {
        let padded = load(x, row, start, len, tile, &mut acc.bad);
        sweep(tile, padded, p, shape, coef, seq);
        accumulate::<R, S>(tile, padded, kl, &mut acc);
        if !sequence {
            store(tile, &mut grad[start..start + len]);
        }
    }
    if sequence {
        // Every token of the row shares ∂l/∂s (and, importance-weighted, the KL's Σ k·∂s), known
        // only now.
        let importance = p.kl.is_some_and(|k| k.importance_weighted);
        let kl_share = if importance {
            coef.kl * R::from_f64(total(&acc.kl_raw))
        } else {
            R::ZERO
        };
        let shared = (coef.policy * R::from_f64(total(&acc.slope)) + kl_share) * seq.ds
            / R::from_f64(coef.tokens.max(1.0));
        let mut bad = [0; 5];
        for (start, len) in tiles(x.t, &live) {
            let padded = load(x, row, start, len, tile, &mut bad);
            sweep(tile, padded, p, shape, coef, seq);
            for j in 0..padded {
                let terms = ratio_terms(tile.lp[j], tile.old[j], tile.adv[j], p, shape, seq);
                tile.g[j] = tile.g[j] + shared * tile.keep[j] * terms.factor;
            }
            store(tile, &mut grad[start..start + len]);
        }
    }
    row_out(acc, coef, p.level != RatioLevel::Token, seq)
}

/// Reduces a row's lanes.
fn row_out<R: Real>(
    acc: RowAcc<R>,
    coef: &RowCoefficients<R>,
    sequence_level: bool,
    seq: SequenceRatio<R>,
) -> RowOut {
    let mut sums = acc.sums.map(|lanes| total(&lanes));
    sums[metrics::TOKENS] = coef.tokens;
    sums[metrics::KL] = total(&acc.kl);
    if sequence_level {
        // From the f64 log-ratio: `ratio_mean − 1` keeps its digits.
        sums[metrics::RATIO_EXCESS] = seq.excess;
    }
    RowOut {
        policy: total(&acc.policy),
        kl: sums[metrics::KL],
        sums,
        min: acc.lo.iter().fold(f64::INFINITY, |m, v| m.min(v.to_f64())),
        max: acc
            .hi
            .iter()
            .fold(f64::NEG_INFINITY, |m, v| m.max(v.to_f64())),
        bad: acc.bad,
    }
}

/// [`policy_row`] as a body for [`dispatch`].
struct PolicyRow<'a, 'b, F, M, R, S> {
    x: &'a Inputs<'b, F, M>,
    row: usize,
    p: &'a Params<R>,
    shape: &'a S,
    coef: &'a RowCoefficients<R>,
    tile: &'a mut Tile<R>,
    grad: &'a mut [MaybeUninit<F>],
}

impl<F, M, R, S> Vectorized for PolicyRow<'_, '_, F, M, R, S>
where
    F: Load<R> + Store<R>,
    M: Load<R>,
    R: Real,
    S: Shape<R>,
{
    type Output = RowOut;
    #[inline(always)]
    fn run(self) -> RowOut {
        policy_row(
            self.x, self.row, self.p, self.shape, self.coef, self.tile, self.grad,
        )
    }
}

/// Every row with trust-region shape `S`, in parallel.
fn rows_with<F, M, R, S>(
    x: &Inputs<'_, F, M>,
    p: &Params<R>,
    shape: &S,
    coefficients: &[RowCoefficients<R>],
    grad: &mut [MaybeUninit<F>],
) -> Vec<RowOut>
where
    F: Load<R> + Store<R>,
    M: Load<R>,
    R: Real,
    S: Shape<R>,
{
    pool::chunks_mut_init(grad, x.t, Tile::new, |tile, row, grad| {
        let coef = &coefficients[row];
        dispatch(PolicyRow {
            x,
            row,
            p,
            shape,
            coef,
            tile,
            grad,
        })
    })
}

/// `n_i` of every row, and the number of mask values other than 0 and 1.
fn row_tokens<M: Load<R>, R: Real>(mask: &[M], t: usize) -> (Vec<f64>, f64) {
    let per_row: Vec<(f64, f64)> = pool::chunks(mask, t, |_, row| {
        dispatch(RowTokens::<M, R>(row, std::marker::PhantomData))
    });
    let bad = per_row.iter().map(|(_, b)| b).sum();
    (per_row.into_iter().map(|(n, _)| n).collect(), bad)
}

/// One row's count of ones and of values other than 0 and 1, as a body for [`dispatch`] (integer
/// counts: the compiler vectorizes them at the CPU's widest lanes).
struct RowTokens<'a, M, R>(&'a [M], std::marker::PhantomData<R>);

impl<M: Load<R>, R: Real> Vectorized for RowTokens<'_, M, R> {
    type Output = (f64, f64);

    #[inline(always)]
    fn run(self) -> (f64, f64) {
        let (mut n, mut bad) = (0u32, 0u32);
        for v in self.0 {
            let v = v.load();
            n += u32::from(v == R::ONE);
            bad += u32::from(v != R::ZERO && v != R::ONE);
        }
        (f64::from(n), f64::from(bad))
    }
}

fn coefficients<R: Real>(
    op: &FusedPolicyLoss,
    tokens: &[f64],
    t: usize,
) -> Vec<RowCoefficients<R>> {
    let total_tokens: f64 = tokens.iter().sum();
    let sequences = tokens.iter().filter(|&&n| n > 0.0).count() as f64;
    let batch = (total_tokens, sequences, tokens.len() as f64);
    let config = &op.config;
    let coefficient = |agg, n| row_coefficient(agg, n, batch, t, &op.normalizer);
    tokens
        .iter()
        .map(|&n| {
            let kl_agg = config.kl.map_or(0.0, |k| coefficient(k.aggregation, n));
            RowCoefficients {
                policy: R::from_f64(coefficient(config.aggregation, n)),
                kl: R::from_f64(config.kl.map_or(0.0, |k| k.coef) * kl_agg),
                kl_agg,
                tokens: n,
            }
        })
        .collect()
}

/// The op's constants as slices, its parameters and its row coefficients: what every CPU
/// traversal of the policy loss needs besides the log-probs (`x.log_probs`).
pub(crate) struct Constants<'a, F, M, R> {
    pub x: Inputs<'a, F, M>,
    pub p: Params<R>,
    pub coefficients: Vec<RowCoefficients<R>>,
}

/// Runs `body` with the [`Constants`] of `op` for `[B,T]` = `dims` (after checking the mask).
pub(crate) fn with_constants<F, M, R, T>(
    op: &FusedPolicyLoss,
    log_probs: &[F],
    mask: &[M],
    dims: (usize, usize),
    body: impl FnOnce(&Constants<'_, F, M, R>) -> candle_core::Result<T>,
) -> candle_core::Result<T>
where
    F: Load<R> + WithDType,
    M: Load<R> + WithDType,
    R: Real,
{
    let t = dims.1;
    let (old_guard, old_layout) = op.old_log_probs.storage_and_layout();
    let (adv_guard, adv_layout) = op.advantages.storage_and_layout();
    let reference = op.ref_log_probs.as_ref().map(Tensor::storage_and_layout);
    let weights = op.is_weights.as_ref().map(Tensor::storage_and_layout);
    let flags = op.flags.as_ref().map(Tensor::storage_and_layout);
    let rule = op.keep_rule.as_ref();
    let entropy = rule
        .and_then(|r| r.entropy.as_ref())
        .map(|(h, theta)| (h.storage_and_layout(), *theta));
    let x = Inputs {
        t,
        log_probs,
        old: cpu_slice::<F>(&old_guard, old_layout)?,
        advantages: cpu_slice::<F>(&adv_guard, adv_layout)?,
        per_token_advantages: op.advantages.rank() == 2,
        mask,
        reference: match &reference {
            Some((guard, layout)) => Some(cpu_slice::<F>(guard, layout)?),
            None => None,
        },
        weights: match &weights {
            Some((guard, layout)) => Some(cpu_slice::<F>(guard, layout)?),
            None => None,
        },
        flags: match &flags {
            Some((guard, layout)) => Some(cpu_slice::<F>(guard, layout)?),
            None => None,
        },
        off_rows: rule.and_then(|r| r.off_rows.as_deref()),
        entropy: match &entropy {
            Some(((guard, layout), theta)) => Some((cpu_slice::<f32>(guard, layout)?, *theta)),
            None => None,
        },
    };
    let (tokens, bad_mask) = row_tokens::<M, R>(mask, t);
    if bad_mask > 0.0 {
        return Err(kernel_error(crate::checks::mask_error(bad_mask)));
    }
    let config = &op.config;
    let p = Params {
        level: config.ratio_level,
        clamp: config.log_ratio_clamp.map_or(R::INFINITY, R::from_f64),
        seq_max: config.seq_log_ratio_max,
        kl: config.kl.map(|k| KlParams {
            estimator: k.estimator,
            clamp: k.clamp,
            importance_weighted: k.importance_weighted,
        }),
    };
    let coefficients = coefficients::<R>(op, &tokens, t);
    body(&Constants { x, p, coefficients })
}

/// A body run with the trust-region shape of a config, in the compute type.
pub(crate) trait WithShape<R: Real> {
    type Output;
    fn run<S: Shape<R>>(self, shape: &S) -> Self::Output;
}

/// Runs `body` with the scalar form, in the compute type, of the objective `trust_region` holds
/// (through [`TrustRegion::visit`], the one dispatch).
pub(crate) fn with_shape<R: Real, W: WithShape<R>>(
    trust_region: &TrustRegion,
    body: W,
) -> W::Output {
    struct Scalar<W, R>(W, std::marker::PhantomData<R>);
    impl<R: Real, W: WithShape<R>> Visit for Scalar<W, R> {
        type Output = W::Output;
        fn visit<O: Objective>(self, objective: &O) -> W::Output {
            self.0.run(&objective.scalar::<R>())
        }
    }
    trust_region.visit(Scalar(body, std::marker::PhantomData))
}

/// Every row of the policy loss, as a [`WithShape`] body.
struct AllRows<'a, 'b, F, M, R> {
    c: &'a Constants<'b, F, M, R>,
    grad: &'a mut [MaybeUninit<F>],
}

impl<F, M, R> WithShape<R> for AllRows<'_, '_, F, M, R>
where
    F: Load<R> + Store<R>,
    M: Load<R>,
    R: Real,
{
    type Output = Vec<RowOut>;
    fn run<S: Shape<R>>(self, shape: &S) -> Vec<RowOut> {
        rows_with(&self.c.x, &self.c.p, shape, &self.c.coefficients, self.grad)
    }
}

/// Runs the kernel: the output `[loss, sums (NUM_SLOTS), ratio min, ratio max]` and the
/// gradient.
pub(crate) fn run<F, M, R>(
    op: &FusedPolicyLoss,
    log_probs: &[F],
    mask: &[M],
    dims: (usize, usize),
) -> candle_core::Result<(Vec<R>, Vec<F>)>
where
    F: Load<R> + Store<R> + WithDType,
    M: Load<R> + WithDType,
    R: Real,
{
    with_constants(op, log_probs, mask, dims, |c| {
        let len = dims.0 * dims.1;
        let mut grad = memory::room::<F>(len);
        let fresh = &mut grad.spare_capacity_mut()[..len];
        let rows = with_shape(&op.config.trust_region, AllRows { c, grad: fresh });
        // SAFETY: the rows cover the `len` values (`t` each), and each row wrote every one of
        // its values ([`policy_row`]).
        unsafe { grad.set_len(len) };
        Ok((reduce(&rows, &c.coefficients)?, grad))
    })
}

/// Reduces the rows in row order (the same bits whatever the number of threads) into the
/// output, after checking the inputs' values.
fn reduce<R: Real>(
    rows: &[RowOut],
    coefficients: &[RowCoefficients<R>],
) -> candle_core::Result<Vec<R>> {
    for (k, name) in CHECKED.iter().enumerate() {
        let bad: u64 = rows.iter().map(|r| u64::from(r.bad[k])).sum();
        if bad > 0 {
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
    for (out, c) in rows.iter().zip(coefficients) {
        loss += c.policy.to_f64() * out.policy + c.kl.to_f64() * out.kl;
        for (s, v) in sums.iter_mut().zip(&out.sums) {
            *s += v;
        }
        sums[metrics::KL_LOSS] += c.kl_agg * out.kl;
        min = min.min(out.min);
        max = max.max(out.max);
    }
    let mut output = Vec::with_capacity(1 + NUM_SLOTS + 2);
    output.push(R::from_f64(loss));
    output.extend(sums.iter().map(|&v| R::from_f64(v)));
    output.extend([R::from_f64(min), R::from_f64(max)]);
    Ok(output)
}
