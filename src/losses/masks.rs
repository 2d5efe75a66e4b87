//! Masks inside the policy loss: off-policy sequence masking (OPSM), the top-entropy tokens and
//! M2PO's second-moment mask. Each is a batch-wide decision taken once, on the host, before the
//! loss runs:
//!
//! - OPSM and the top-entropy selection multiply the per-token policy loss by a 0/1 factor and
//!   change nothing else (the normalisers, the KL and entropy terms and the metrics keep counting
//!   the dropped tokens): the factor multiplies the rollout weights `w`. The composed path, the
//!   lm_head path and the GPU kernels take the factor as a `[B,T]` (or `[B,1]`) tensor
//!   ([`keep_weights`]); the CPU kernel takes the decisions themselves ([`KeepRule`]: a flag per
//!   row for OPSM, `θ` for the entropy) and zeroes `w` while it loads a tile, so that no `[B,T]`
//!   factor is written or read.
//! - M2PO replaces the mask `m` itself, so the normalisers and the metrics shrink with it; every
//!   path takes the reduced mask, written as 0/1 bytes (a `u8` mask, which every path reads; the
//!   pass that writes it checks the mask's values on the way, since bytes would hide a 0.5).
//!
//! The host passes read the batch once, in blocks of lanes without branches (counts and f64 sums
//! in fixed lanes: the same bits whatever the number of threads), passing over the spans of
//! padding after one read of their mask; a sample brackets the quantile or the cut and only the
//! few values inside the bracket are collected, by their bits. Where the CPU has AVX-512, the
//! top-entropy pass runs in a hand-written form beside its portable body
//! (`entropy_chunk_avx512`: a compress instruction gathers the inside values, with no branch per
//! value), which gives the same counts, flags and values — tested against the portable body.
//!
//! ```text
//! OPSM       KL_i = Σ_t m·(ℓs − sg[ℓ]) / max(n_i, 1)       keep = (A ≥ 0) ∨ (KL_i ≤ δ)
//! top-H      θ = the batch's (1 − ρ) quantile of H over unmasked tokens (linear interpolation)
//!            keep = H ≥ θ
//! M2PO       u = d², d = ℓroll − ℓold in f32; drop the k largest u, k the smallest with mean(rest) < τ
//! ```
//!
//! The selections need no full sort: the quantile is two order statistics (`order_statistics`:
//! a pass between two pivots a small sample places, then `select_nth_unstable` among the few
//! keys between them), the M2PO cut a quickselect-style search on the sums of the smaller
//! values, both O(N).
//!
//! Layer: objectives.

use std::mem::MaybeUninit;

use candle_core::{DType, Tensor};

use crate::checks::{check_host_mask_values, check_matrix, with_host, MaskValue};
use crate::error::{check_config, Error, Result};
use crate::losses::inputs::PolicyInputs;
use crate::order_statistics::{bracket_margin, order_pair, order_statistics};
use crate::pool::{self, CHUNK};
use crate::vectorize::{dispatch, Vectorized};

#[cfg(target_arch = "x86_64")]
mod avx2;

/// The masks of the policy loss: [TRL's and slime's off-policy sequence masking][opsm], [TRL's
/// top-entropy tokens][topent] and [AReaL's M2PO][m2po]. Each is off (`None`) by default.
///
/// | field | peer key | effect |
/// |---|---|---|
/// | `off_policy_threshold` `δ` | TRL `off_policy_mask_threshold`, slime `--opsm-delta` | drops the policy term of tokens with `A < 0` in rows whose mean `ℓs − ℓ` exceeds `δ` |
/// | `top_entropy_quantile` `ρ` | TRL `top_entropy_quantile` | keeps the policy term of the tokens whose entropy is at or above the batch's `(1−ρ)` quantile |
/// | `m2_threshold` `τ` | AReaL `actor.m2_threshold` | masks the tokens with the largest `(ℓroll − ℓold)²` until the rest's mean is below `τ` |
///
/// OPSM reads `ℓs` = [`PolicyInputs::rollout_log_probs`] when given, else `old_log_probs`; the
/// top-entropy selection reads [`PolicyInputs::entropy`] (required); M2PO reads
/// `rollout_log_probs` (required). OPSM and the top-entropy selection leave every denominator,
/// the KL and entropy terms and the metrics as they are; M2PO's reduced mask replaces `mask`
/// everywhere. Formulas: [the formulas page](crate::formulas), §2.
///
/// [opsm]: https://arxiv.org/abs/2512.02556
/// [topent]: https://arxiv.org/abs/2506.01939
/// [m2po]: https://arxiv.org/abs/2510.01161
///
/// ```
/// use sapo::PolicyMasks;
/// let masks = PolicyMasks::default().with_off_policy_threshold(0.05).with_top_entropy_quantile(0.2);
/// let loss = sapo::Grpo::default().config().with_masks(masks).build()?;
/// assert!(PolicyMasks::default().with_top_entropy_quantile(1.5).validate().is_err());
/// # Ok::<(), sapo::Error>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct PolicyMasks {
    /// OPSM's `δ` (finite and > 0).
    pub off_policy_threshold: Option<f64>,
    /// The kept fraction `ρ` of the top-entropy tokens, in (0, 1].
    pub top_entropy_quantile: Option<f64>,
    /// M2PO's `τ` (finite and > 0).
    pub m2_threshold: Option<f64>,
}

impl PolicyMasks {
    /// Turns OPSM on with threshold `δ`.
    ///
    /// ```
    /// let m = sapo::PolicyMasks::default().with_off_policy_threshold(0.05);
    /// assert_eq!(m.off_policy_threshold, Some(0.05));
    /// ```
    pub fn with_off_policy_threshold(mut self, delta: f64) -> Self {
        self.off_policy_threshold = Some(delta);
        self
    }
    /// Keeps the policy term of the top `ρ` fraction of tokens by entropy.
    ///
    /// ```
    /// let m = sapo::PolicyMasks::default().with_top_entropy_quantile(0.2);
    /// assert_eq!(m.top_entropy_quantile, Some(0.2));
    /// ```
    pub fn with_top_entropy_quantile(mut self, rho: f64) -> Self {
        self.top_entropy_quantile = Some(rho);
        self
    }
    /// Turns M2PO on with threshold `τ`.
    ///
    /// ```
    /// let m = sapo::PolicyMasks::default().with_m2_threshold(0.04);
    /// assert_eq!(m.m2_threshold, Some(0.04));
    /// ```
    pub fn with_m2_threshold(mut self, tau: f64) -> Self {
        self.m2_threshold = Some(tau);
        self
    }
    /// Whether any mask is on.
    ///
    /// ```
    /// assert!(!sapo::PolicyMasks::default().any());
    /// ```
    pub fn any(&self) -> bool {
        self.off_policy_threshold.is_some()
            || self.top_entropy_quantile.is_some()
            || self.m2_threshold.is_some()
    }
    /// Whether a mask multiplies the policy term (OPSM or the top-entropy selection).
    pub(crate) fn keeps(&self) -> bool {
        self.off_policy_threshold.is_some() || self.top_entropy_quantile.is_some()
    }
    /// Whether a mask reads `rollout_log_probs` (M2PO needs it, OPSM takes it).
    pub(crate) fn reads_rollout(&self) -> bool {
        self.off_policy_threshold.is_some() || self.m2_threshold.is_some()
    }
    /// Checks the thresholds, each error naming the peer's key.
    ///
    /// ```
    /// assert!(sapo::PolicyMasks::default().with_m2_threshold(f64::NAN).validate().is_err());
    /// ```
    pub fn validate(&self) -> Result<()> {
        if let Some(d) = self.off_policy_threshold {
            check_config(
                d.is_finite() && d > 0.0,
                "off_policy_mask_threshold",
                "finite and > 0",
                d,
            )?;
        }
        if let Some(rho) = self.top_entropy_quantile {
            check_config(
                rho > 0.0 && rho <= 1.0,
                "top_entropy_quantile",
                "in (0, 1]",
                rho,
            )?;
        }
        if let Some(tau) = self.m2_threshold {
            check_config(
                tau.is_finite() && tau > 0.0,
                "m2_threshold",
                "finite and > 0",
                tau,
            )?;
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// Host reads.

/// The first unmasked non-finite value of `x`, as the typed error naming `arg`.
fn check_finite<M: MaskValue>(arg: &'static str, x: &[f32], mask: &[M]) -> Result<()> {
    let first_bad = pool::chunks(x, CHUNK, |c, part| {
        let start = c * CHUNK;
        (start..start + part.len()).find(|&j| mask[j].on() && !x[j].is_finite())
    })
    .into_iter()
    .flatten()
    .next();
    match first_bad {
        None => Ok(()),
        Some(j) => Err(Error::InvalidValue {
            arg,
            expected: "finite values at unmasked positions".into(),
            actual: format!("{} at flat index {j}", x[j]),
        }),
    }
}

/// The number of values the selections sample before their one full pass.
const SAMPLE: usize = 4096;

/// M2PO decides its route from every `ROUTE_EVERY`-th run of the sample (about
/// `SAMPLE / ROUTE_EVERY` values): when they mask nothing, the whole sample is not needed.
const ROUTE_EVERY: usize = 4;

/// Consecutive positions per run of the sample: one cache line of f32 values, so that the
/// sample reads `SAMPLE / RUN` lines of each input rather than `SAMPLE`.
const RUN: usize = 16;

/// The sample's runs are gathered in this many pieces of consecutive runs, in parallel: each
/// run's loads wait on memory (the runs lie a page or more apart), so two threads gather the
/// sample in about half the time one takes.
const SAMPLE_PIECES: usize = 4;

/// The unmasked positions of `SAMPLE / RUN` evenly spaced runs of `RUN` consecutive positions
/// (every position when `len ≤ SAMPLE`), `f` of each index: about `SAMPLE` values.
fn sample<M: MaskValue, T: Send + Sync>(
    len: usize,
    mask: &[M],
    f: impl Fn(usize) -> T + Sync,
) -> Vec<T> {
    sample_runs(len, mask, f, |_| true)
}

/// [`sample`]'s values from the runs whose ordinal `k` (`0, 1, …` along the batch) `pick`
/// takes: a part of the sample, which the other part completes. The values come in the order
/// of their positions, whatever the number of threads.
///
/// The runs are gathered in [`SAMPLE_PIECES`] pieces on the pool's threads (one piece when the
/// batch is small). In each piece the runs' first and last positions are read first, in a loop
/// of independent loads the CPU overlaps (the runs lie a page or more apart, beyond the
/// hardware prefetcher's reach), so that the loop that builds the sample finds its lines in the
/// cache instead of waiting for each.
fn sample_runs<M: MaskValue, T: Send + Sync>(
    len: usize,
    mask: &[M],
    f: impl Fn(usize) -> T + Sync,
    pick: impl Fn(usize) -> bool + Sync,
) -> Vec<T> {
    let stride = (len / (SAMPLE / RUN)).max(RUN);
    let runs = len.div_ceil(stride);
    let gather = |ordinals: std::ops::Range<usize>| {
        let starts = || ordinals.clone().filter(|&k| pick(k)).map(|k| k * stride);
        for start in starts() {
            let last = (start + RUN).min(len) - 1;
            std::hint::black_box((mask[start].on(), mask[last].on(), f(start), f(last)));
        }
        let mut values = Vec::with_capacity(ordinals.len() * RUN);
        for start in starts() {
            let end = (start + RUN).min(len);
            for (k, m) in mask[start..end].iter().enumerate() {
                if m.on() {
                    values.push(f(start + k));
                }
            }
        }
        values
    };
    if len <= SAMPLE {
        return gather(0..runs);
    }
    let pieces = pool::map(SAMPLE_PIECES, |p| {
        gather(p * runs / SAMPLE_PIECES..(p + 1) * runs / SAMPLE_PIECES)
    });
    let mut values = Vec::with_capacity(pieces.iter().map(Vec::len).sum());
    for piece in pieces {
        values.extend(piece);
    }
    values
}

/// Values per block of the host passes' branch-free loops (one bit each in a `u32`).
const BLOCK: usize = 16;

/// `visit(x, mask)` for the blocks of `BLOCK` positions of `x` and `mask` (equal lengths), the
/// last one padded with masked positions (value 0).
#[inline(always)]
fn for_blocks<M: MaskValue>(
    x: &[f32],
    mask: &[M],
    mut visit: impl FnMut(&[f32; BLOCK], &[M; BLOCK]),
) {
    let (xs, x_tail) = x.as_chunks::<BLOCK>();
    let (ms, m_tail) = mask.as_chunks::<BLOCK>();
    for (x, m) in xs.iter().zip(ms) {
        visit(x, m);
    }
    if !x_tail.is_empty() {
        visit(&padded(x_tail, 0.0), &padded(m_tail, M::from_f64(0.0)));
    }
}

/// `tail` followed by `fill` up to `N` values.
fn padded<T: Copy, const N: usize>(tail: &[T], fill: T) -> [T; N] {
    let mut block = [fill; N];
    block[..tail.len()].copy_from_slice(tail);
    block
}

/// `f(j)` for every set bit `j` of `bits`, lowest first.
#[inline(always)]
fn for_bits(mut bits: u32, mut f: impl FnMut(usize)) {
    while bits != 0 {
        f(bits.trailing_zeros() as usize);
        bits &= bits - 1;
    }
}

/// Positions per span of the host passes: a span whose mask holds no unmasked position (the
/// padding before and after a sequence) is passed over after one read of its mask, as the CPU
/// kernel passes over its padding tiles; it would add nothing to any count or sum. A multiple of
/// [`BLOCK`] and of [`LANES`], so that every position keeps its lane.
const SPAN: usize = 256;

/// Whether `mask` holds an unmasked position: one OR over the span, without an early exit, so
/// that the compiler vectorizes it.
#[inline(always)]
fn any_on<M: MaskValue>(mask: &[M]) -> bool {
    mask.iter().fold(false, |any, m| any | m.on())
}

/// Lanes of M2PO's passes: `LANES` independent chains of f64 sums the compiler vectorizes,
/// added in lane order at the end (the same bits whatever the number of threads).
const LANES: usize = 8;

/// Per lane: a count and an f64 sum (M2PO's `Σu`, OPSM's row `Σ (ℓs − ℓ)`).
#[derive(Default)]
struct LaneSums {
    n: [u32; LANES],
    total: [f64; LANES],
}

impl LaneSums {
    /// The count and the sum over the lanes, in lane order.
    fn reduce(&self) -> (usize, f64) {
        (
            self.n.iter().map(|&n| n as usize).sum(),
            self.total.iter().sum(),
        )
    }
}

/// The lane blocks of two inputs and the mask (M2PO's `(ℓroll, ℓold, mask)`, OPSM's
/// `(ℓs, ℓ, mask)`; equal lengths): whole blocks, then the tail padded with masked positions
/// (value 0).
type LaneBlocks<'a, M, const N: usize> = (
    &'a [[f32; N]],
    &'a [[f32; N]],
    &'a [[M; N]],
    [[f32; N]; 2],
    [M; N],
);

/// Two inputs and the mask in blocks of `N` lanes ([`LaneBlocks`]).
fn lane_blocks<'a, M: MaskValue, const N: usize>(
    a: &'a [f32],
    b: &'a [f32],
    mask: &'a [M],
) -> LaneBlocks<'a, M, N> {
    let (a, a_tail) = a.as_chunks::<N>();
    let (b, b_tail) = b.as_chunks::<N>();
    let (m, m_tail) = mask.as_chunks::<N>();
    (
        a,
        b,
        m,
        [padded(a_tail, 0.0), padded(b_tail, 0.0)],
        padded(m_tail, M::from_f64(0.0)),
    )
}

/// One block of a [`MaskedSums`] pass: per lane, the count and the sum of `v` over the unmasked
/// positions, `v` M2PO's `u` of `(a, b)` when `SQUARED` ([`second_moment`]: `a − b` in f32,
/// squared exactly in f64), else `a − b` in f64 (OPSM's term); a masked position is selected to
/// 0 by a bit mask, whatever its values hold.
#[inline(always)]
fn masked_sum_block<M: MaskValue, const SQUARED: bool>(
    a: &[f32; LANES],
    b: &[f32; LANES],
    m: &[M; LANES],
    sums: &mut LaneSums,
) {
    for j in 0..LANES {
        let on = m[j].on();
        let v = if SQUARED {
            second_moment(a[j], b[j])
        } else {
            f64::from(a[j]) - f64::from(b[j])
        };
        sums.n[j] += u32::from(on);
        sums.total[j] += selected(v, on);
    }
}

/// `v` where `on`, else `0` (whatever `v` holds, NaN and ±inf included), selected with a bit
/// mask rather than a branch so that the lanes vectorize.
#[inline(always)]
fn selected(v: f64, on: bool) -> f64 {
    f64::from_bits(v.to_bits() & u64::from(on).wrapping_neg())
}

/// The byte of M2PO's reduced mask at a kept position: the bracket pass writes it at the
/// unmasked positions below the bracket and, provisionally, inside it (the exact cut then
/// zeroes those it drops, usually fewer than it keeps); masked positions and those above the
/// bracket get 0 (dropped).
const KEPT: u8 = 1;

/// The mark the portable bracket pass writes at an unmasked position inside the bracket, until
/// [`for_inside_positions`] collects the position and writes [`KEPT`] there.
const INSIDE: u8 = 2;

/// Lanes of M2PO's bracket pass: its compares run on f32 (`|d|`, [`second_moment`]), sixteen to
/// a 512-bit vector; its sums of `u` in f64, sixteen lanes added in lane order.
const CUT_LANES: usize = 16;

/// M2PO's bracket `[lo, hi]` on `u` as bounds on `|d|` (f32, `u = d²`): `u < lo` exactly when
/// `|d| < √lo` and `u ≤ hi` exactly when `|d| ≤ √hi`, since `u` and the bounds (values of `u`
/// from the sample, or ±∞) are exact squares of f32 values, whose roots are exact.
fn bracket_on_differences((lo, hi): (f64, f64)) -> (f32, f32) {
    let root = |u: f64| {
        if u < 0.0 {
            f32::NEG_INFINITY
        } else {
            u.sqrt() as f32
        }
    };
    (root(lo), root(hi))
}

/// One block of M2PO's bracket pass: per lane, the count of unmasked positions, the count and
/// `Σu` of those below the bracket, and the count of bad positions (a mask value neither 0 nor
/// 1, or an unmasked `d` that is not finite); a byte per position in `keep` ([`KEPT`] for
/// `u < lo`, [`INSIDE`] for `lo ≤ u ≤ hi`, else 0). The position's class comes from `|d|`
/// against the bracket's roots ([`bracket_on_differences`]), in f32; only the sum below needs
/// `u` in f64. Bytes and counts rather than bits and flags: the compiler keeps them in vector
/// lanes.
#[inline(always)]
fn m2_cut_block<M: MaskValue>(
    r: &[f32; CUT_LANES],
    o: &[f32; CUT_LANES],
    m: &[M; CUT_LANES],
    (lo, hi): (f32, f32),
    sums: &mut M2CutSums,
    keep: &mut [MaybeUninit<u8>; CUT_LANES],
) {
    for j in 0..CUT_LANES {
        let on = m[j].on();
        let d = r[j] - o[j];
        let size = d.abs();
        let below = on & (size < lo);
        let inside = on & (size >= lo) & (size <= hi);
        sums.n[j] += u32::from(on);
        sums.below[j] += u32::from(below);
        sums.below_sum[j] += selected(exact_square(d), below);
        sums.bad[j] += u32::from(!m[j].binary() | (on & !d.is_finite()));
        keep[j] = MaybeUninit::new(u8::from(below) * KEPT + u8::from(inside) * INSIDE);
    }
}

/// Per lane, M2PO's bracket pass: the unmasked count, the count and `Σu` below the bracket
/// and the count of bad positions ([`m2_cut_block`]).
#[derive(Default)]
struct M2CutSums {
    n: [u32; CUT_LANES],
    below: [u32; CUT_LANES],
    below_sum: [f64; CUT_LANES],
    bad: [u32; CUT_LANES],
}

impl M2CutSums {
    /// Whether an unmasked `d` was not finite or a mask value was neither 0 nor 1.
    fn bad(&self) -> bool {
        self.bad.iter().any(|&bad| bad > 0)
    }
}

/// `f(j)` for each position `j` of `bytes` that holds [`INSIDE`] (a few percent of them), in
/// order, 64 at a time, and [`KEPT`] written there: the bytes hold 0, [`KEPT`] or [`INSIDE`],
/// so bit 1 of a byte is set only by [`INSIDE`]; each word of eight bytes gives its eight marks
/// as one byte of a 64-bit mask (the multiplication gathers bit 0 of each byte into the top
/// byte, no carries for 0/1 bytes), and only the set bits of the mask cost a branch. No buffer
/// of positions: the pass calls it once per span, while the span is in cache.
#[inline(always)]
fn for_inside_positions(bytes: &mut [u8], mut f: impl FnMut(usize)) {
    const ONES: u64 = u64::from_le_bytes([1; 8]);
    const GATHER: u64 = 0x0102_0408_1020_4080;
    let (groups, rest) = bytes.as_chunks_mut::<64>();
    for (g, group) in groups.iter_mut().enumerate() {
        let mut bits = 0u64;
        for (w, word) in group.as_chunks::<8>().0.iter().enumerate() {
            let marks = (u64::from_le_bytes(*word) >> 1) & ONES;
            bits |= (marks.wrapping_mul(GATHER) >> 56) << (8 * w);
        }
        while bits != 0 {
            let k = bits.trailing_zeros() as usize;
            group[k] = KEPT;
            f(g * 64 + k);
            bits &= bits - 1;
        }
    }
    let start = groups.len() * 64;
    for (k, byte) in rest.iter_mut().enumerate() {
        if *byte == INSIDE {
            *byte = KEPT;
            f(start + k);
        }
    }
}

/// The top-entropy selection's pass over one chunk of `H` and the mask: per lane, the unmasked
/// count, the count below `lo` and whether an unmasked value is not finite; the [`order_key`]s of
/// the values inside `[lo, hi]` (a few percent), in order. A [`Vectorized`] body, so that its
/// lanes are compiled for the CPU's widest vectors; [`entropy_chunk`] runs it, or its AVX-512
/// form where the CPU has one.
struct EntropyChunk<'a, M> {
    h: &'a [f32],
    m: &'a [M],
    lo: f32,
    hi: f32,
}

/// [`EntropyChunk`]'s result: the lanes' unmasked counts and counts below the bracket, the keys
/// inside it, and the lanes' flags of a non-finite unmasked value.
type EntropyPart = ([u32; BLOCK], [u32; BLOCK], Vec<i32>, [bool; BLOCK]);

impl<M: MaskValue> Vectorized for EntropyChunk<'_, M> {
    type Output = EntropyPart;

    #[inline(always)]
    fn run(self) -> Self::Output {
        let EntropyChunk { h, m, lo, hi } = self;
        let (mut n, mut below, mut bad) = ([0u32; BLOCK], [0u32; BLOCK], [false; BLOCK]);
        let mut inside = vec![];
        for (h, m) in h.chunks(SPAN).zip(m.chunks(SPAN)) {
            if !any_on(m) {
                continue;
            }
            for_blocks(h, m, |h, m| {
                let mut within = 0u32;
                for j in 0..BLOCK {
                    let (v, on) = (h[j], m[j].on());
                    n[j] += u32::from(on);
                    bad[j] |= on & !v.is_finite();
                    below[j] += u32::from(on & (v < lo));
                    within |= u32::from(on & (v >= lo) & (v <= hi)) << j;
                }
                for_bits(within, |j| inside.push(order_key(h[j])));
            });
        }
        (n, below, inside, bad)
    }
}

/// The walk of the top-entropy pass's SIMD forms: `block(h, m, out)` for each block of the
/// spans that hold an unmasked position ([`for_blocks`]), `out` the end of the keys found so
/// far, with room for [`BLOCK`] keys there (room is reserved for every position of the span,
/// and padding is never inside); `block` returns how many keys it stored there, in order, its
/// block's inside keys. The keys, in order.
///
/// # Safety
///
/// `block` writes nothing beyond [`BLOCK`] keys from `out`, and the first `k` keys it returns
/// are written.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn collect_inside_keys<M: MaskValue>(
    h: &[f32],
    m: &[M],
    mut block: impl FnMut(&[f32; BLOCK], &[M; BLOCK], *mut i32) -> usize,
) -> Vec<i32> {
    let mut inside: Vec<i32> = vec![];
    for (h, m) in h.chunks(SPAN).zip(m.chunks(SPAN)) {
        if !any_on(m) {
            continue;
        }
        inside.reserve(h.len() + BLOCK);
        let (keys_out, mut found) = (inside.as_mut_ptr(), inside.len());
        // SAFETY: `found` ≤ the keys before the span + the span's positions passed (a block
        // stores no more keys than it has positions), so `BLOCK` keys from it fit the room.
        for_blocks(h, m, |h, m| {
            found += block(h, m, unsafe { keys_out.add(found) })
        });
        // SAFETY: the keys up to `found` were there or written by the blocks (the caller's
        // contract).
        unsafe { inside.set_len(found) };
    }
    inside
}

/// [`EntropyChunk`]'s pass, in its AVX-512 form where the CPU has one (the same result: the
/// inside values are gathered by one compress per block instead of a branch per value, which
/// the portable form pays as a mispredicted branch), in its AVX2 form on a CPU with AVX2 and
/// without AVX-512 ([`avx2::entropy_chunk`], the same result, packed by a permutation), else the
/// portable body through [`dispatch`].
fn entropy_chunk<M: MaskValue>(chunk: EntropyChunk<'_, M>) -> EntropyPart {
    #[cfg(target_arch = "x86_64")]
    if crate::vectorize::has_avx512() {
        // SAFETY: `has_avx512` checked at run time that the CPU has the features the function
        // is compiled for.
        return unsafe { entropy_chunk_avx512(chunk) };
    }
    #[cfg(target_arch = "x86_64")]
    if avx2::usable::<M>() {
        // SAFETY: `usable` checked at run time that the CPU has the features the function is
        // compiled for.
        return unsafe { avx2::entropy_chunk(chunk) };
    }
    dispatch(chunk)
}

/// [`EntropyChunk`]'s pass with AVX-512: per block of 16, the compares as mask registers, the
/// counts in vector lanes, and the keys of the inside values compressed to the front of a vector
/// and stored after those already found. Every count, flag and key is the portable body's.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512vl,avx2,fma,popcnt")]
fn entropy_chunk_avx512<M: MaskValue>(chunk: EntropyChunk<'_, M>) -> EntropyPart {
    use std::arch::x86_64::*;
    let EntropyChunk { h, m, lo, hi } = chunk;
    let (vlo, vhi) = (_mm512_set1_ps(lo), _mm512_set1_ps(hi));
    let (one, infinity) = (_mm512_set1_epi32(1), _mm512_set1_ps(f32::INFINITY));
    let (mut n, mut below, mut bad) = (_mm512_setzero_si512(), _mm512_setzero_si512(), 0u16);
    let block = |h: &[f32; BLOCK], m: &[M; BLOCK], out: *mut i32| {
        let on = on_bits_avx512(m);
        // SAFETY: `h` holds 16 values, the unaligned load's width.
        let v = unsafe { _mm512_loadu_ps(h.as_ptr()) };
        let lt = _mm512_mask_cmp_ps_mask::<_CMP_LT_OQ>(on, v, vlo);
        let at_least = _mm512_mask_cmp_ps_mask::<_CMP_GE_OQ>(on, v, vlo);
        let within = _mm512_mask_cmp_ps_mask::<_CMP_LE_OQ>(at_least, v, vhi);
        // Not finite: not `|v| < ∞` (NaN included).
        bad |= _mm512_mask_cmp_ps_mask::<_CMP_NLT_UQ>(on, _mm512_abs_ps(v), infinity);
        n = _mm512_mask_add_epi32(n, on, n, one);
        below = _mm512_mask_add_epi32(below, lt, below, one);
        // The inside values' [`order_key`]s ([`flip_negative`] in vector form).
        let bits = _mm512_castps_si512(v);
        let flip = _mm512_srli_epi32::<1>(_mm512_srai_epi32::<31>(bits));
        let keys = _mm512_maskz_compress_epi32(within, _mm512_xor_si512(bits, flip));
        // SAFETY: `out` has room for 16 keys ([`collect_inside_keys`]).
        unsafe { _mm512_storeu_si512(out.cast(), keys) };
        within.count_ones() as usize
    };
    // SAFETY: each block stores 16 keys from `out` and returns how many of them are its inside
    // keys (compressed to the front, in order).
    let inside = unsafe { collect_inside_keys(h, m, block) };
    let lanes = |v: __m512i| {
        let mut out = [0u32; BLOCK];
        // SAFETY: `out` holds 16 u32, the unaligned store's width.
        unsafe { _mm512_storeu_si512(out.as_mut_ptr().cast(), v) };
        out
    };
    let flags = std::array::from_fn(|j| bad & (1 << j) != 0);
    (lanes(n), lanes(below), inside, flags)
}

/// The unmasked positions of a block of 16 as the bits of an AVX-512 mask: one compare for the
/// `f32` and `u8` masks every caller passes (the types told apart by their `TypeId`, a constant
/// the compiler folds), one bit at a time for another type.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512vl,avx2,fma,popcnt")]
#[inline]
fn on_bits_avx512<M: MaskValue>(m: &[M; BLOCK]) -> u16 {
    use std::any::TypeId;
    use std::arch::x86_64::*;
    let is = |t: TypeId| TypeId::of::<M>() == t;
    if is(TypeId::of::<f32>()) {
        // SAFETY: `M` is `f32`, so the block is 16 f32, the load's width.
        let m = unsafe { _mm512_loadu_ps(m.as_ptr().cast()) };
        // `m ≠ 0`, true for NaN, as `MaskValue::on`.
        _mm512_cmp_ps_mask::<_CMP_NEQ_UQ>(m, _mm512_setzero_ps())
    } else if is(TypeId::of::<u8>()) {
        // SAFETY: `M` is `u8`, so the block is 16 bytes, the load's width.
        let m = _mm512_cvtepu8_epi32(unsafe { _mm_loadu_si128(m.as_ptr().cast()) });
        _mm512_test_epi32_mask(m, m)
    } else {
        m.iter()
            .enumerate()
            .fold(0, |bits, (j, m)| bits | (u16::from(m.on()) << j))
    }
}

/// A pass over `(a, b, mask)` in lane blocks: per lane, the unmasked count and the sum of
/// M2PO's `u` (`SQUARED`: its idle pass, `Σu` over `(ℓroll, ℓold)`, [`second_moment`]) or of
/// `a − b` (OPSM's row sum over `(ℓs, ℓ)`) ([`masked_sum_block`]). A [`Vectorized`] body.
struct MaskedSums<'a, M, const SQUARED: bool> {
    a: &'a [f32],
    b: &'a [f32],
    m: &'a [M],
}

impl<M: MaskValue, const SQUARED: bool> Vectorized for MaskedSums<'_, M, SQUARED> {
    type Output = LaneSums;

    #[inline(always)]
    fn run(self) -> LaneSums {
        let mut sums = LaneSums::default();
        let spans = self.a.chunks(SPAN).zip(self.b.chunks(SPAN));
        for ((a, b), m) in spans.zip(self.m.chunks(SPAN)) {
            if !any_on(m) {
                continue;
            }
            let (a, b, m, [a_tail, b_tail], m_tail) = lane_blocks::<M, LANES>(a, b, m);
            for ((a, b), m) in a.iter().zip(b).zip(m) {
                masked_sum_block::<M, SQUARED>(a, b, m, &mut sums);
            }
            masked_sum_block::<M, SQUARED>(&a_tail, &b_tail, &m_tail, &mut sums);
        }
        sums
    }
}

/// M2PO's bracket pass over one chunk of `(ℓroll, ℓold, mask)` and its bytes of the reduced
/// mask ([`m2_cut_block`]). A [`Vectorized`] body.
struct M2CutChunk<'a, M> {
    r: &'a [f32],
    o: &'a [f32],
    m: &'a [M],
    /// The bracket as bounds on `|d|` ([`bracket_on_differences`]).
    bracket: (f32, f32),
    /// The chunk's bytes of the reduced mask, every one written by the pass.
    keep: &'a mut [MaybeUninit<u8>],
    /// The flat index of the chunk's first position.
    start: usize,
}

impl<M: MaskValue> Vectorized for M2CutChunk<'_, M> {
    type Output = (M2CutSums, Vec<InsideDrift>);

    #[inline(always)]
    fn run(self) -> Self::Output {
        self.walk::<false>()
    }
}

impl<M: MaskValue> M2CutChunk<'_, M> {
    /// The pass over the chunk's spans, each by [`m2_cut_span`] or (`AVX2`, only from
    /// [`m2_cut_chunk_avx2`]) its AVX2 form.
    #[inline(always)]
    fn walk<const AVX2: bool>(self) -> (M2CutSums, Vec<InsideDrift>) {
        let mut sums = M2CutSums::default();
        let mut inside = vec![];
        // The AVX2 form's inside positions of a span.
        #[cfg(target_arch = "x86_64")]
        let mut positions: Vec<u32> = vec![];
        for (s, keep) in self.keep.chunks_mut(SPAN).enumerate() {
            let span = s * SPAN..s * SPAN + keep.len();
            let (r, o, m) = (
                &self.r[span.clone()],
                &self.o[span.clone()],
                &self.m[span.clone()],
            );
            if !any_on(m) {
                // Padding: every position masked, so dropped.
                keep.fill(MaybeUninit::new(0));
                continue;
            }
            let mut add = |j: usize| {
                inside.push(InsideDrift::new(r[j] - o[j], self.start + span.start + j));
            };
            #[cfg(target_arch = "x86_64")]
            if AVX2 {
                positions.clear();
                // SAFETY: `AVX2` is set only by `m2_cut_chunk_avx2`, which runs where
                // `avx2::usable` found the features this form is compiled for.
                unsafe {
                    avx2::m2_cut_span(r, o, m, self.bracket, &mut sums, keep, &mut positions);
                }
                positions.iter().for_each(|&j| add(j as usize));
                continue;
            }
            let bytes = m2_cut_span(r, o, m, self.bracket, &mut sums, keep);
            // The positions inside the bracket, collected while the span is in cache.
            for_inside_positions(bytes, &mut add);
        }
        (sums, inside)
    }
}

/// M2PO's bracket pass over one chunk ([`M2CutChunk`]): in its AVX2 form on a CPU with AVX2
/// and without AVX-512 ([`avx2`]: the same result), else the body [`dispatch`] compiles for
/// the CPU's widest vectors.
fn m2_cut_chunk<M: MaskValue>(chunk: M2CutChunk<'_, M>) -> (M2CutSums, Vec<InsideDrift>) {
    #[cfg(target_arch = "x86_64")]
    if avx2::usable::<M>() {
        // SAFETY: `usable` checked at run time that the CPU has the features the function is
        // compiled for.
        return unsafe { m2_cut_chunk_avx2(chunk) };
    }
    dispatch(chunk)
}

/// [`M2CutChunk::walk`] with the AVX2 form of each span's pass.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,popcnt")]
fn m2_cut_chunk_avx2<M: MaskValue>(chunk: M2CutChunk<'_, M>) -> (M2CutSums, Vec<InsideDrift>) {
    chunk.walk::<true>()
}

/// M2PO's bracket pass over one span of `(ℓroll, ℓold, mask)` ([`m2_cut_block`]): writes every
/// byte of `keep` (fresh memory, never zeroed first) and returns them.
#[inline(always)]
fn m2_cut_span<'k, M: MaskValue>(
    r: &[f32],
    o: &[f32],
    m: &[M],
    bracket: (f32, f32),
    sums: &mut M2CutSums,
    keep: &'k mut [MaybeUninit<u8>],
) -> &'k mut [u8] {
    let (rs, os, ms, [r_tail, o_tail], m_tail) = lane_blocks::<M, CUT_LANES>(r, o, m);
    let (keep_blocks, keep_tail) = keep.as_chunks_mut::<CUT_LANES>();
    for (((r, o), m), keep) in rs.iter().zip(os).zip(ms).zip(keep_blocks) {
        m2_cut_block(r, o, m, bracket, sums, keep);
    }
    if !keep_tail.is_empty() {
        m2_cut_tail(&r_tail, &o_tail, &m_tail, bracket, sums, keep_tail);
    }
    // SAFETY: every byte of `keep` was written above (the whole blocks by `m2_cut_block`, the
    // rest by `m2_cut_tail`).
    unsafe { written(keep) }
}

/// M2PO's bracket pass over a span's last, partial block ([`m2_cut_block`] on the block that
/// [`lane_blocks`] pads with masked positions): writes every byte of `keep` (the block's real
/// positions) and returns them.
#[inline(always)]
fn m2_cut_tail<'k, M: MaskValue>(
    r: &[f32; CUT_LANES],
    o: &[f32; CUT_LANES],
    m: &[M; CUT_LANES],
    bracket: (f32, f32),
    sums: &mut M2CutSums,
    keep: &'k mut [MaybeUninit<u8>],
) -> &'k mut [u8] {
    let mut block = [MaybeUninit::new(0u8); CUT_LANES];
    m2_cut_block(r, o, m, bracket, sums, &mut block);
    keep.copy_from_slice(&block[..keep.len()]);
    // SAFETY: the copy wrote every byte of `keep`.
    unsafe { written(keep) }
}

/// Bytes the bracket pass wrote, as bytes.
///
/// # Safety
///
/// Every byte of `keep` is written.
#[inline(always)]
unsafe fn written(keep: &mut [MaybeUninit<u8>]) -> &mut [u8] {
    // SAFETY: the caller's contract; `MaybeUninit<u8>` has `u8`'s layout.
    unsafe { &mut *(std::ptr::from_mut::<[MaybeUninit<u8>]>(keep) as *mut [u8]) }
}

// ---------------------------------------------------------------------------------------------
// The selections (scalar form, on the host).

/// OPSM's per-row `KL_i = Σ m·(ℓs − ℓ) / max(n, 1)` of the row `i` (slices of one row): the
/// sum in `LANES` f64 lanes added in lane order ([`MaskedSums`]).
#[inline]
fn opsm_row_kl<M: MaskValue>(sampling: &[f32], log_probs: &[f32], mask: &[M]) -> f64 {
    let (n, sum) = dispatch(MaskedSums::<M, false> {
        a: sampling,
        b: log_probs,
        m: mask,
    })
    .reduce();
    sum / n.max(1) as f64
}

/// OPSM's `KL_i` of every row (rows of `t` tokens, `t > 0`), in parallel.
fn opsm_row_kls<M: MaskValue>(
    sampling: &[f32],
    log_probs: &[f32],
    mask: &[M],
    t: usize,
) -> Vec<f64> {
    pool::chunks(sampling, t, |i, s| {
        let row = i * t..i * t + s.len();
        opsm_row_kl(s, &log_probs[row.clone()], &mask[row])
    })
}

/// OPSM's per-row decision: whether row `i`'s `KL_i` exceeds `δ` (then its tokens with `A < 0`
/// lose their policy term).
#[cfg(test)]
pub(crate) fn opsm_rows_off<M: MaskValue>(
    sampling: &[f32],
    log_probs: &[f32],
    mask: &[M],
    t: usize,
    delta: f64,
) -> Vec<bool> {
    if t == 0 {
        return vec![];
    }
    opsm_row_kls(sampling, log_probs, mask, t)
        .into_iter()
        .map(|kl| kl > delta)
        .collect()
}

/// The entropy threshold `θ` by its definition: the `(1 − ρ)` quantile of the unmasked
/// entropies with `torch.quantile`'s linear interpolation (two order statistics,
/// [`order_pair`]); `None` without an unmasked token.
pub(crate) fn entropy_threshold<M: MaskValue>(
    entropy: &[f32],
    mask: &[M],
    rho: f64,
) -> Option<f64> {
    let keys: Vec<i32> = entropy
        .iter()
        .zip(mask)
        .filter(|(_, m)| m.on())
        .map(|(h, _)| order_key(*h))
        .collect();
    let n = keys.len();
    if n == 0 {
        return None;
    }
    let (j, frac) = quantile_rank(rho, n);
    Some(interpolate_at(&[&keys], j, frac))
}

/// The rank `j` and the interpolation weight of the `(1 − ρ)` quantile of `n` values.
fn quantile_rank(rho: f64, n: usize) -> (usize, f64) {
    let p = (1.0 - rho) * (n - 1) as f64;
    let j = (p.floor() as usize).min(n - 1);
    (j, p - j as f64)
}

/// The key of `v` in `f32::total_cmp`'s order, as an `i32`: the bits, with the magnitude
/// bits flipped for negative values (the transform `total_cmp` itself applies). Integer keys
/// select faster than `total_cmp`'s comparisons and give the same order statistics.
#[inline(always)]
fn order_key(v: f32) -> i32 {
    flip_negative(v.to_bits() as i32)
}

/// The value of an [`order_key`] (the transform is its own inverse).
#[inline(always)]
fn from_order_key(key: i32) -> f32 {
    f32::from_bits(flip_negative(key) as u32)
}

/// `bits` with its 31 magnitude bits flipped when its sign bit is set ([`order_key`]'s
/// transform, `entropy_chunk_avx512`'s in vector form).
#[inline(always)]
fn flip_negative(bits: i32) -> i32 {
    bits ^ (((bits >> 31) as u32) >> 1) as i32
}

/// `v_(j) + frac·(v_(j+1) − v_(j))` of the values whose [`order_key`]s are the keys of `parts`
/// taken together, `v_(n) := v_(n−1)` ([`order_pair`]).
fn interpolate_at(parts: &[&[i32]], j: usize, frac: f64) -> f64 {
    let (below, above) = order_pair(parts, j);
    let below = f64::from(from_order_key(below));
    if frac == 0.0 {
        return below;
    }
    below + frac * (f64::from(from_order_key(above)) - below)
}

/// The bracket `[lo, hi]` of the top-entropy quantile: the order statistics of a sample
/// ([`sample`]) a margin of three standard deviations (plus four) below and above the sample's
/// own quantile, so that the batch's two order statistics lie inside it but for a chance of a
/// few in a thousand; `(−∞, ∞)` without a sampled value. Both statistics come from one
/// [`order_statistics`] call.
fn entropy_bracket<M: MaskValue>(entropy: &[f32], mask: &[M], rho: f64) -> (f32, f32) {
    let sample = sample(entropy.len(), mask, |j| order_key(entropy[j]));
    if sample.is_empty() {
        return (f32::NEG_INFINITY, f32::INFINITY);
    }
    let s = sample.len();
    let (r, _) = quantile_rank(rho, s);
    let margin = bracket_margin(s, rho);
    // The two ranks, each `None` beyond the sample (then the bracket is open on that side).
    let lower = r.checked_sub(margin);
    let upper = Some(r + margin + 1).filter(|&k| k < s);
    let ranks = (lower.unwrap_or(0), upper.unwrap_or(s - 1));
    let (lo, hi) = order_statistics(&[&sample], ranks);
    (
        lower.map_or(f32::NEG_INFINITY, |_| from_order_key(lo)),
        upper.map_or(f32::INFINITY, |_| from_order_key(hi)),
    )
}

/// `θ` from a pass over the bracket of [`entropy_bracket`]: `n > 0` unmasked values, `below`
/// of them under the bracket, the [`order_key`]s of those inside it (the chunks' keys). `None`
/// when the bracket misses one of the two order statistics `θ` interpolates (then the
/// definition, [`entropy_threshold`], decides).
fn threshold_in_bracket(rho: f64, n: usize, below: usize, inside: &[&[i32]]) -> Option<f64> {
    let (j, frac) = quantile_rank(rho, n);
    let last = if frac == 0.0 { j } else { (j + 1).min(n - 1) };
    let count: usize = inside.iter().map(|part| part.len()).sum();
    (j >= below && last < below + count).then(|| interpolate_at(inside, j - below, frac))
}

/// The top-entropy threshold `θ` in one full pass ([`entropy_threshold`]'s value, `None` without
/// an unmasked token): a sample brackets the quantile ([`entropy_bracket`]), the pass counts the
/// unmasked values below the bracket and collects those inside it, whose exact order statistics
/// give `θ` (the definition when the bracket misses). Nothing of size `[B,T]` is written.
fn top_entropy_threshold<M: MaskValue>(
    entropy: &[f32],
    mask: &[M],
    rho: f64,
) -> Result<Option<f64>> {
    let (lo, hi) = entropy_bracket(entropy, mask, rho);
    // Per chunk: unmasked count, count below the bracket, the keys of the bracket's values, and
    // whether an unmasked value is not finite; blocks of compares without branches, counted in
    // lanes; the values inside the bracket (a few percent) are collected by their bits.
    type Part = (usize, usize, Vec<i32>, bool);
    let parts: Vec<Part> = pool::chunks(entropy, CHUNK, |c, h| {
        let m = &mask[c * CHUNK..c * CHUNK + h.len()];
        let (n, below, inside, bad) = entropy_chunk(EntropyChunk { h, m, lo, hi });
        let count = |lanes: [u32; BLOCK]| lanes.iter().map(|&n| n as usize).sum::<usize>();
        (count(n), count(below), inside, bad.iter().any(|&bad| bad))
    });
    if parts.iter().any(|p| p.3) {
        check_finite("entropy", entropy, mask)?;
    }
    let n: usize = parts.iter().map(|p| p.0).sum();
    if n == 0 {
        return Ok(None);
    }
    let below: usize = parts.iter().map(|p| p.1).sum();
    // The chunks' keys where they are (no copy).
    let inside: Vec<&[i32]> = parts.iter().map(|p| p.2.as_slice()).collect();
    Ok(threshold_in_bracket(rho, n, below, &inside)
        // The sample missed: the definition over every unmasked value.
        .or_else(|| entropy_threshold(entropy, mask, rho)))
}

/// The top-entropy keep `m ∧ (H ≥ θ)` of every position (for the paths that take the 0/1
/// factor as rollout weights).
fn top_entropy_keep<M: MaskValue>(entropy: &[f32], mask: &[M], rho: f64) -> Result<Vec<f32>> {
    let theta = top_entropy_threshold(entropy, mask, rho)?.unwrap_or(f64::INFINITY);
    let mut keep = vec![0f32; entropy.len()];
    pool::chunks_mut(&mut keep, CHUNK, |c, keep| {
        let start = c * CHUNK;
        for (j, keep) in (start..).zip(keep) {
            *keep = f32::from(u8::from(mask[j].on() && f64::from(entropy[j]) >= theta));
        }
    });
    Ok(keep)
}

/// `θ` rounded up to `f32`: for every `f32` value `h`, `h ≥ θ` in `f64` exactly when `h ≥` the
/// result in `f32` (the CPU kernel's comparison).
pub(crate) fn threshold_f32(theta: f64) -> f32 {
    let rounded = theta as f32;
    if f64::from(rounded) < theta {
        rounded.next_up()
    } else {
        rounded
    }
}

/// M2PO's reduced mask by its definition: `false` for the `k` unmasked tokens of largest
/// `u = (ℓroll − ℓold)²` ([`second_moment`]), `k` the smallest with the mean of the others
/// below `τ` (`N − 1` if there is none). Ties of `u` at the cut: the later tokens are masked
/// first. A quickselect search on the sums of the smaller values, O(N).
pub(crate) fn m2po_keep<M: MaskValue>(
    rollout: &[f32],
    old: &[f32],
    mask: &[M],
    tau: f64,
) -> Vec<bool> {
    let mut keep: Vec<bool> = mask.iter().map(|m| m.on()).collect();
    let n = keep.iter().filter(|&&k| k).count();
    let total: f64 = (0..old.len())
        .filter(|&j| keep[j])
        .map(|j| second_moment(rollout[j], old[j]))
        .sum();
    if n == 0 || total < tau * n as f64 {
        return keep;
    }
    let mut order: Vec<Drift> = (0..old.len())
        .filter(|&j| keep[j])
        .map(|j| drift(rollout, old, j))
        .collect();
    // Ascending (u, token) order; the kept tokens are a prefix of it.
    let kept = cut(&mut order, 0.0, tau).max(1);
    if kept < n {
        order.select_nth_unstable(kept - 1);
        for &(_, j) in &order[kept..] {
            keep[j] = false;
        }
    }
    keep
}

/// The largest `m` with `start + Σ_{i ≤ m} (u_(i) − τ) < 0` over the ascending order of `order`
/// (`m = 0` when only `start < 0` holds, and when nothing does), leaving the `m` smallest first.
/// The excess is decreasing while `u < τ` and increasing after, so a quickselect-style search
/// on the sums of the smaller values finds it in O(n).
/// Generic over the values' form ([`Moment`]): the sample's cut orders bare `u` (only its
/// values matter), the exact cut [`Drift`]s.
fn cut<D: Moment>(order: &mut [D], start: f64, tau: f64) -> usize {
    let (mut lo, mut hi, mut prefix) = (0usize, order.len(), start);
    while lo < hi {
        let mid = lo + (hi - lo) / 2;
        let slice = &mut order[lo..hi];
        slice.select_nth_unstable(mid - lo);
        let part = excess(&slice[..=mid - lo], tau);
        if prefix + part < 0.0 {
            prefix += part;
            lo = mid + 1;
        } else {
            hi = mid;
        }
    }
    lo
}

/// `Σ (u − τ)` over `values`, in [`LANES`] f64 chains added in lane order: the additions of
/// one chain wait for each other, those of different chains do not (one chain made the sums of
/// M2PO's cuts wait four cycles per value).
fn excess<D: Moment>(values: &[D], tau: f64) -> f64 {
    let mut lanes = [0.0f64; LANES];
    let (blocks, tail) = values.as_chunks::<LANES>();
    for block in blocks {
        for (lane, &d) in lanes.iter_mut().zip(block) {
            *lane += d.u() - tau;
        }
    }
    for (lane, &d) in lanes.iter_mut().zip(tail) {
        *lane += d.u() - tau;
    }
    lanes.iter().sum()
}

/// M2PO's `u = d²` with `d = ℓroll − ℓold` in f32 (as AReaL's f32 tensors take it), squared
/// in f64, where the square of an f32 is exact (24 significant bits squared fit f64's 53): `u`
/// orders the tokens as `|d|` does, which lets the bracket pass compare `|d|` in f32
/// ([`bracket_on_differences`]). Log-probs (≤ 0) never overflow `d`; values of opposite signs
/// beyond `f32::MAX` apart give `d = ±∞`, `u = ∞`: such a token goes first.
#[inline(always)]
fn second_moment(rollout: f32, old: f32) -> f64 {
    exact_square(rollout - old)
}

/// `d²` in f64, exact for every f32 `d` ([`second_moment`] of a difference already taken; the
/// bracket pass has `d` at hand for its compares).
#[inline(always)]
fn exact_square(d: f32) -> f64 {
    let d = f64::from(d);
    d * d
}

/// A token's `u = (ℓroll − ℓold)²` as the bits of its f64, then the token: the total order of
/// M2PO's cut is the tuples' own order (by `u`, then by token), since the bits of non-negative
/// floats order as their values — integer comparisons, cheaper than `f64::total_cmp`. (A NaN
/// `u`, of either sign, sorts last; the pass answers it with the inputs' typed error before the
/// cut decides anything.)
type Drift = (u64, usize);

/// Token `j`'s [`Drift`].
#[inline(always)]
fn drift(rollout: &[f32], old: &[f32], j: usize) -> Drift {
    (second_moment(rollout[j], old[j]).to_bits(), j)
}

/// A value of M2PO's cut, ordered by its `u` (then, for a [`Drift`] or an [`InsideDrift`], by
/// its token): the bits of `u`'s f64 alone (the sample's, where only values matter; a `u64`
/// orders and moves more cheaply than a tuple), a [`Drift`] (the definition's) or an
/// [`InsideDrift`] (the one-pass cut's).
trait Moment: Copy + Ord {
    /// The `u` it holds.
    fn u(self) -> f64;
}

impl Moment for u64 {
    #[inline(always)]
    fn u(self) -> f64 {
        f64::from_bits(self)
    }
}

impl Moment for Drift {
    #[inline(always)]
    fn u(self) -> f64 {
        f64::from_bits(self.0)
    }
}

/// A [`Drift`] of the one-pass cut ([`m2po_reduced`]) packed in one `u64`: the bits of `|d|`'s
/// f32 above the token's position (below 2³², which `m2po_reduced` checks). Its order is
/// [`Drift`]'s — `|d|` orders the tokens as `u = d²` does, ties included (`d²` is exact, see
/// [`second_moment`]), and the bits of non-negative floats order as their values — and a
/// `u64` selects and moves faster than a tuple of two (M2PO's exact cut selects among the
/// thousands of tokens inside the bracket).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct InsideDrift(u64);

impl InsideDrift {
    /// Token `j`'s value, `d = ℓroll − ℓold` its difference.
    #[inline(always)]
    fn new(d: f32, j: usize) -> Self {
        debug_assert!(u32::try_from(j).is_ok());
        Self((u64::from(d.abs().to_bits()) << 32) | j as u64)
    }

    /// The token's position.
    #[inline(always)]
    fn position(self) -> usize {
        (self.0 & u64::from(u32::MAX)) as usize
    }
}

impl Moment for InsideDrift {
    #[inline(always)]
    fn u(self) -> f64 {
        exact_square(f32::from_bits((self.0 >> 32) as u32))
    }
}

/// M2PO's reduced mask from [`m2po_keep`], the definition, as 0/1 bytes.
fn m2po_by_definition<M: MaskValue>(rollout: &[f32], old: &[f32], mask: &[M], tau: f64) -> Vec<u8> {
    m2po_keep(rollout, old, mask, tau)
        .into_iter()
        .map(u8::from)
        .collect()
}

/// M2PO's reduced mask in one full pass, or `None` when it masks nothing (the mean of `u` is
/// already below `τ`): a sample brackets the cut, the pass sums `u` below the bracket, keeps
/// what is below it, drops what is above it and collects what is inside; the exact cut inside
/// the bracket comes from those few values ([`m2po_keep`], the definition, when it misses).
/// When a quarter of the sample's runs mask nothing (AReaL's usual case), a pass only sums `u`
/// and writes nothing, and the rest of the sample is not read unless that pass finds a cut.
/// A mask value other than 0 and 1 is the mask's typed error whenever a mask is written.
fn m2po_reduced<M: MaskValue>(
    rollout: &[f32],
    old: &[f32],
    mask: &[M],
    tau: f64,
) -> Result<Option<Vec<u8>>> {
    let len = old.len();
    let u_bits = |j: usize| second_moment(rollout[j], old[j]).to_bits();
    // The route first, from a quarter of the sample's runs: whether they mask nothing, from
    // their whole excess `Σ (u − τ)` (the excess falls while `u < τ` and rises after, so its
    // last prefix is negative exactly when every token is kept) — one sum, no selection. Only
    // the route depends on it: each route checks its own result against the batch.
    let route_runs = |k: usize| k.is_multiple_of(ROUTE_EVERY);
    let mut sample = sample_runs(len, mask, u_bits, route_runs);
    if sample.is_empty() || excess(&sample, tau) < 0.0 {
        // They mask nothing (AReaL's usual case): one read of the batch, nothing written, to
        // confirm it; the cutting route below when it does not hold.
        let (n, total) = pool::chunks(rollout, CHUNK, |c, a| {
            let chunk = c * CHUNK..c * CHUNK + a.len();
            let (b, m) = (&old[chunk.clone()], &mask[chunk]);
            dispatch(MaskedSums::<M, true> { a, b, m }).reduce()
        })
        .into_iter()
        // In chunk order: the same sum whatever the number of threads.
        .fold((0, 0.0), |a, b| (a.0 + b.0, a.1 + b.1));
        if !total.is_finite() {
            check_finite("rollout_log_probs", rollout, mask)?;
            check_finite("old_log_probs", old, mask)?;
        }
        if n == 0 || total < tau * n as f64 {
            return Ok(None);
        }
    }
    // The rest of the sample's runs.
    sample.extend(sample_runs(len, mask, u_bits, |k| !route_runs(k)));
    let s = sample.len();
    let by_definition = || -> Result<Option<Vec<u8>>> {
        check_host_mask_values(mask)?;
        Ok(Some(m2po_by_definition(rollout, old, mask, tau)))
    };
    // The pass packs positions in 32 bits ([`InsideDrift`]).
    if s == 0 || u32::try_from(len - 1).is_err() {
        return by_definition();
    }
    // The sample's cut: the largest m with Σ_{i ≤ m} (u_(i) − τ) < 0, the m smallest first.
    let sample_cut = cut(&mut sample, 0.0, tau);
    // The bracket: the sample's order statistics `margin` below and above its cut.
    let (lo, hi) = {
        let f = sample_cut as f64 / s as f64;
        let margin = bracket_margin(s, f);
        let (smaller, larger) = sample.split_at_mut(sample_cut);
        let lo = match sample_cut.checked_sub(margin) {
            Some(k) => smaller.select_nth_unstable(k).1.u(),
            None => f64::NEG_INFINITY,
        };
        let hi = if margin < larger.len() {
            larger.select_nth_unstable(margin).1.u()
        } else {
            f64::INFINITY
        };
        (lo, hi)
    };
    // Per chunk: the unmasked count, the count and Σu below the bracket, and the bracket's
    // values; a byte per token (kept below and, until the cut, inside the bracket, dropped
    // above it), written into memory that is not zeroed first (the pass writes every byte).
    // Blocks of lanes without branches; the positions inside the bracket (a few percent) are
    // collected while the span is in cache; the padding's spans are only filled with zeros.
    let mut keep: Vec<u8> = Vec::with_capacity(len);
    let fresh = &mut keep.spare_capacity_mut()[..len];
    let parts: Vec<(M2CutSums, Vec<InsideDrift>)> = pool::chunks_mut(fresh, CHUNK, |c, keep| {
        let chunk = c * CHUNK..c * CHUNK + keep.len();
        m2_cut_chunk(M2CutChunk {
            r: &rollout[chunk.clone()],
            o: &old[chunk.clone()],
            m: &mask[chunk],
            bracket: bracket_on_differences((lo, hi)),
            keep,
            start: c * CHUNK,
        })
    });
    // SAFETY: the pass wrote each of the `len` bytes: the chunks cover them, and each chunk
    // writes every byte of its spans ([`M2CutChunk`]).
    unsafe { keep.set_len(len) };
    if parts.iter().any(|p| p.0.bad()) {
        check_finite("rollout_log_probs", rollout, mask)?;
        check_finite("old_log_probs", old, mask)?;
        check_host_mask_values(mask)?;
    }
    // In chunk order: the same sums whatever the number of threads.
    let count = |lanes: &[u32; CUT_LANES]| lanes.iter().map(|&n| n as usize).sum::<usize>();
    let n: usize = parts.iter().map(|p| count(&p.0.n)).sum();
    let below: usize = parts.iter().map(|p| count(&p.0.below)).sum();
    let below_sum: f64 = parts
        .iter()
        .map(|p| p.0.below_sum.iter().sum::<f64>())
        .sum();
    let mut inside: Vec<InsideDrift> = Vec::with_capacity(parts.iter().map(|p| p.1.len()).sum());
    for (_, part) in parts {
        inside.extend(part);
    }
    let above = n - below - inside.len();
    let start = below_sum - tau * below as f64;
    let end = start + excess(&inside, tau);
    // The bracket holds the cut when the excess is negative at its start (or nothing is below
    // it) and the first value above it (> hi) already makes the excess non-negative.
    let holds = (below == 0 || start < 0.0)
        && (above == 0 || (hi >= tau && end + (hi - tau) >= 0.0))
        && !(below == 0 && inside.is_empty());
    if !holds {
        return by_definition();
    }
    let mut kept = cut(&mut inside, start, tau);
    if below + kept == 0 {
        // Nothing makes the mean fall below τ: the smallest token stays.
        inside.select_nth_unstable(0);
        kept = 1;
    }
    if below + kept == n {
        // The mean of every u is below τ: M2PO masks nothing.
        return Ok(None);
    }
    // The pass wrote `KEPT` inside the bracket: only the values the cut drops change.
    for d in &inside[kept..] {
        keep[d.position()] = 0;
    }
    Ok(Some(keep))
}

// ---------------------------------------------------------------------------------------------
// The pre-pass the loss runs.

/// Checks that the inputs the masks read are there (and no `rollout_log_probs` no mask reads).
pub(crate) fn check_inputs<L>(masks: &PolicyMasks, inputs: &PolicyInputs<'_, L>) -> Result<()> {
    if masks.m2_threshold.is_some() && inputs.rollout_log_probs.is_none() {
        return Err(Error::InvalidValue {
            arg: "rollout_log_probs",
            expected: "a [B, T] tensor (m2_threshold reads the behaviour policy's log-probs)"
                .into(),
            actual: "None".into(),
        });
    }
    if !masks.reads_rollout() && inputs.rollout_log_probs.is_some() {
        return Err(Error::InvalidValue {
            arg: "rollout_log_probs",
            expected: "None (only off_policy_mask_threshold and m2_threshold read it)".into(),
            actual: "a tensor".into(),
        });
    }
    Ok(())
}

/// M2PO's reduced mask (a `u8` 0/1 tensor on the mask's device), or `None` when M2PO is off or
/// masks nothing ([`m2po_reduced`] on the host values).
pub(crate) fn m2po_mask<L>(
    masks: &PolicyMasks,
    inputs: &PolicyInputs<'_, L>,
) -> Result<Option<Tensor>> {
    match (masks.m2_threshold, inputs.rollout_log_probs) {
        (Some(tau), Some(rollout)) => reduced_mask(inputs.mask, rollout, inputs.old_log_probs, tau),
        _ => Ok(None),
    }
}

/// M2PO's reduced mask of `mask` (a `u8` 0/1 tensor on its device), or `None` when it masks
/// nothing. A mask value other than 0 and 1 is the mask's typed error here (the byte mask
/// would hide it from the checks that follow).
fn reduced_mask(mask: &Tensor, rollout: &Tensor, old: &Tensor, tau: f64) -> Result<Option<Tensor>> {
    fn reduced<M: MaskValue>(
        mask: &[M],
        rollout: &Tensor,
        old: &Tensor,
        tau: f64,
        like: &Tensor,
    ) -> Result<Option<Tensor>> {
        with_host::<f32, _>(rollout, |rollout| {
            with_host::<f32, _>(old, |old| match m2po_reduced(rollout, old, mask, tau)? {
                None => Ok(None),
                Some(keep) => Ok(Some(Tensor::from_vec(keep, like.dims(), like.device())?)),
            })
        })
    }
    match mask.dtype() {
        DType::U8 => with_host::<u8, _>(mask, |m| reduced(m, rollout, old, tau, mask)),
        _ => with_host::<f32, _>(mask, |m| reduced(m, rollout, old, tau, mask)),
    }
}

/// [M2PO][m2po]'s reduced mask `m′` of a batch, taken once: the mask to pass as
/// [`PolicyInputs::mask`] with [`PolicyMasks::m2_threshold`] off, for the same loss, to the
/// bit, as with it on (AReaL `actor.m2_threshold`).
///
/// ```text
/// u = (ℓroll − ℓold)² on the N unmasked tokens, sorted descending u_(1) ≥ … ≥ u_(N)
/// k = the smallest k ≥ 0 with mean(u_(k+1), …, u_(N)) < τ;   k = N − 1 if there is none
/// m′ = m with the k tokens of largest u set to 0
/// ```
///
/// The cut reads only the behaviour policy's `ℓroll` and the proximal `ℓold`, both fixed
/// before the update, so a loop that runs several updates on one batch (PPO epochs) can take
/// it once instead of in every call: the loss with `m2_threshold` on runs this same pass on
/// every call. The cut is batch-wide: take it on the tokens the loss call sees (the same
/// rows), or the loss differs from the one with `m2_threshold` on. `d = ℓroll − ℓold` is taken
/// in f32 (f64 and half-precision inputs are converted first, as the loss does); the exact cut
/// needs no full sort. A value at a masked position reaches nothing (padding may hold garbage).
///
/// Returns a `u8` 0/1 tensor on the mask's device when M2PO drops tokens, else `mask` itself.
/// Errors: `m2_threshold` not finite and > 0 ([`Error::InvalidConfig`]); `mask` not `[B, T]`,
/// `rollout_log_probs` or `old_log_probs` not a float `[B, T]` tensor on the mask's device; a
/// mask value other than 0 and 1; a non-finite `ℓroll` or `ℓold` at an unmasked position — each
/// naming its argument. Formulas: [the formulas page](crate::formulas), §2.
///
/// [m2po]: https://arxiv.org/abs/2510.01161
///
/// ```
/// use candle_core::{DType, Device, Tensor};
/// let dev = Device::Cpu;
/// let mask = Tensor::ones((1, 4), DType::F32, &dev)?;
/// let old = Tensor::new(&[[-1.0f32, -1.0, -1.0, -1.0]], &dev)?;
/// let rollout = Tensor::new(&[[-1.0f32, -1.1, -1.0, -3.0]], &dev)?;
/// // u = [0, 0.01, 0, 4]: the mean 1.0025 is above τ = 0.1; without the last token it is 0.0033.
/// let reduced = sapo::m2po_reduced_mask(&mask, &rollout, &old, 0.1)?;
/// assert_eq!(reduced.to_vec2::<u8>()?, [[1, 1, 1, 0]]);
/// # Ok::<(), sapo::Error>(())
/// ```
pub fn m2po_reduced_mask(
    mask: &Tensor,
    rollout_log_probs: &Tensor,
    old_log_probs: &Tensor,
    m2_threshold: f64,
) -> Result<Tensor> {
    PolicyMasks::default()
        .with_m2_threshold(m2_threshold)
        .validate()?;
    let (b, t) = crate::error::matrix_dims("mask", mask)?;
    check_matrix("rollout_log_probs", rollout_log_probs, &[b, t], mask)?;
    check_matrix("old_log_probs", old_log_probs, &[b, t], mask)?;
    match reduced_mask(mask, rollout_log_probs, old_log_probs, m2_threshold)? {
        Some(reduced) => Ok(reduced),
        None => {
            // The pass that finds nothing to drop does not read the mask's values: the loss
            // checks them later, this function now.
            crate::checks::check_mask_values(mask)?;
            Ok(mask.clone())
        }
    }
}

/// OPSM's and the top-entropy selection's decisions in the form the fused CPU kernel applies
/// while it loads a tile: no `[B,T]` factor is written or read. A token's rollout weight `w`
/// becomes 0 when its row is in `off_rows` and `A < 0`, and when `H < θ` — the same 0/1 factor
/// [`keep_weights`] multiplies into the weights for the other paths.
#[derive(Debug, Default)]
pub(crate) struct KeepRule {
    /// OPSM: whether each row's `KL_i` exceeds `δ` (`B` values).
    pub off_rows: Option<Vec<bool>>,
    /// The top-entropy selection: `H` (`[B,T]`, f32, contiguous) and `θ` rounded up to f32
    /// ([`threshold_f32`]).
    pub entropy: Option<(Tensor, f32)>,
}

/// The [`KeepRule`] of OPSM and the top-entropy selection; `None` when neither is on.
/// `log_probs` is the current policy's `ℓ` (read detached).
pub(crate) fn keep_rule(
    masks: &PolicyMasks,
    inputs: &PolicyInputs<'_>,
    t: usize,
) -> Result<Option<KeepRule>> {
    if !masks.keeps() {
        return Ok(None);
    }
    let entropy = check_entropy(masks, inputs)?;
    fn decide<M: MaskValue>(
        masks: &PolicyMasks,
        inputs: &PolicyInputs<'_>,
        entropy: Option<&Tensor>,
        mask: &[M],
        t: usize,
    ) -> Result<KeepRule> {
        let entropy = match (masks.top_entropy_quantile, entropy) {
            (Some(rho), Some(entropy)) => {
                let entropy = entropy.detach().to_dtype(DType::F32)?.contiguous()?;
                let theta = with_host::<f32, _>(&entropy, |h| top_entropy_threshold(h, mask, rho))?;
                Some((entropy, theta.map_or(f32::INFINITY, threshold_f32)))
            }
            _ => None,
        };
        Ok(KeepRule {
            off_rows: opsm_off_rows(masks, inputs, mask, t)?,
            entropy,
        })
    }
    Ok(Some(match inputs.mask.dtype() {
        DType::U8 => with_host::<u8, _>(inputs.mask, |m| decide(masks, inputs, entropy, m, t)),
        _ => with_host::<f32, _>(inputs.mask, |m| decide(masks, inputs, entropy, m, t)),
    }?))
}

/// The entropy the top-entropy selection reads: a typed error when it is on without one.
fn check_entropy<'a>(masks: &PolicyMasks, inputs: &PolicyInputs<'a>) -> Result<Option<&'a Tensor>> {
    if masks.top_entropy_quantile.is_some() && inputs.entropy.is_none() {
        return Err(Error::InvalidValue {
            arg: "entropy",
            expected: "a [B, T] tensor (top_entropy_quantile selects by entropy)".into(),
            actual: "None".into(),
        });
    }
    Ok(inputs.entropy)
}

/// The rollout weights with OPSM's and the top-entropy selection's 0/1 factor multiplied in
/// (`weights`: the objective's or the caller's, `None` = 1); `None` when neither mask is on and
/// there were no weights. `log_probs` is the current policy's `ℓ` (read detached). The paths
/// other than the CPU kernel take the masks this way; the CPU kernel takes [`keep_rule`].
pub(crate) fn keep_weights(
    masks: &PolicyMasks,
    inputs: &PolicyInputs<'_>,
    weights: Option<&Tensor>,
    t: usize,
) -> Result<Option<Tensor>> {
    if !masks.keeps() {
        return Ok(weights.cloned());
    }
    let log_probs = inputs.log_probs;
    let b = log_probs.dim(0)?;
    let advantages = inputs.advantages(t)?;
    let per_token_adv = advantages.rank() == 2 && t != 1;
    // The factor is per row (`[B,1]`) with row advantages and no entropy selection.
    let row_wise = masks.top_entropy_quantile.is_none() && !per_token_adv;
    let entropy = check_entropy(masks, inputs)?;
    let keep = match inputs.mask.dtype() {
        DType::U8 => with_host::<u8, _>(inputs.mask, |m| {
            keep_factor(masks, inputs, entropy, m, &advantages, (b, t), row_wise)
        }),
        _ => with_host::<f32, _>(inputs.mask, |m| {
            keep_factor(masks, inputs, entropy, m, &advantages, (b, t), row_wise)
        }),
    }?;
    let shape = if row_wise { (b, 1) } else { (b, t) };
    let dtype = weights.map_or(log_probs.dtype(), Tensor::dtype);
    let keep = Tensor::from_vec(keep, shape, log_probs.device())?.to_dtype(dtype)?;
    Ok(Some(match weights {
        None => keep,
        Some(w) => w.detach().broadcast_mul(&keep)?,
    }))
}

/// The 0/1 factor of OPSM and the top-entropy selection (`B` values when `row_wise`, else
/// `B·T`).
fn keep_factor<M: MaskValue>(
    masks: &PolicyMasks,
    inputs: &PolicyInputs<'_>,
    entropy: Option<&Tensor>,
    mask: &[M],
    advantages: &Tensor,
    (b, t): (usize, usize),
    row_wise: bool,
) -> Result<Vec<f32>> {
    let mut keep = match (masks.top_entropy_quantile, entropy) {
        (Some(rho), Some(entropy)) => {
            with_host::<f32, _>(&entropy.detach(), |h| top_entropy_keep(h, mask, rho))?
        }
        _ => vec![1f32; if row_wise { b } else { b * t }],
    };
    let Some(off_rows) = opsm_off_rows(masks, inputs, mask, t)? else {
        return Ok(keep);
    };
    with_host::<f32, _>(advantages, |adv| {
        let row_len = if row_wise { 1 } else { t };
        pool::chunks_mut(&mut keep, row_len, |i, keep| {
            if !off_rows[i] {
                return;
            }
            for (k, keep) in keep.iter_mut().enumerate() {
                let a = if adv.len() == b {
                    adv[i]
                } else {
                    adv[i * t + k]
                };
                if a < 0.0 {
                    *keep = 0.0;
                }
            }
        });
        Ok(())
    })?;
    Ok(keep)
}

/// OPSM's per-row decision, `KL_i > δ` for every row (its tokens with `A < 0` then lose their
/// policy term), in one parallel pass over `ℓs`, `ℓ` and the mask; `None` when OPSM is off. A
/// non-finite `KL_i` is the typed error naming the input that holds the non-finite value.
fn opsm_off_rows<M: MaskValue>(
    masks: &PolicyMasks,
    inputs: &PolicyInputs<'_>,
    mask: &[M],
    t: usize,
) -> Result<Option<Vec<bool>>> {
    let Some(delta) = masks.off_policy_threshold else {
        return Ok(None);
    };
    if t == 0 {
        return Ok(Some(vec![]));
    }
    let (sampling, sampling_arg) = match inputs.rollout_log_probs {
        Some(r) => (r, "rollout_log_probs"),
        None => (inputs.old_log_probs, "old_log_probs"),
    };
    with_host::<f32, _>(sampling, |s| {
        with_host::<f32, _>(&inputs.log_probs.detach(), |lp| {
            let kl = opsm_row_kls(s, lp, mask, t);
            if kl.iter().any(|kl| !kl.is_finite()) {
                // Name the input (a NaN or ±inf somewhere made a row's KL non-finite).
                check_finite(sampling_arg, s, mask)?;
                check_finite("log_probs", lp, mask)?;
            }
            Ok(Some(kl.into_iter().map(|kl| kl > delta).collect()))
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// The quantile by a full sort (the definition, `torch.quantile`'s linear interpolation).
    fn threshold_by_sort(h: &[f32], m: &[bool], rho: f64) -> Option<f64> {
        let mut v: Vec<f64> = (0..h.len())
            .filter(|&j| m[j])
            .map(|j| f64::from(h[j]))
            .collect();
        if v.is_empty() {
            return None;
        }
        v.sort_by(f64::total_cmp);
        let p = (1.0 - rho) * (v.len() - 1) as f64;
        let j = p.floor() as usize;
        let above = v.get(j + 1).copied().unwrap_or(v[j]);
        Some(v[j] + (p - j as f64) * (above - v[j]))
    }

    /// M2PO by its definition: sort descending, drop until the rest's mean is below τ.
    fn m2po_by_sort(roll: &[f32], old: &[f32], m: &[bool], tau: f64) -> Vec<bool> {
        let u = |j: usize| f64::from(roll[j] - old[j]).powi(2);
        let mut order: Vec<usize> = (0..old.len()).filter(|&j| m[j]).collect();
        // Descending u; among equal u the later token first (the crate's tie rule).
        order.sort_by(|&a, &b| u(b).total_cmp(&u(a)).then(b.cmp(&a)));
        let n = order.len();
        let mut keep = m.to_vec();
        if n == 0 {
            return keep;
        }
        let k = (0..n)
            .find(|&k| {
                let rest = &order[k..];
                rest.iter().map(|&j| u(j)).sum::<f64>() / (rest.len() as f64) < tau
            })
            .unwrap_or(n - 1);
        for &j in &order[..k] {
            keep[j] = false;
        }
        keep
    }

    /// The top-entropy keep by the sorted threshold.
    fn keep_by_sort(h: &[f32], m: &[bool], rho: f64) -> Vec<f32> {
        let theta = threshold_by_sort(h, m, rho);
        (0..h.len())
            .map(|j| {
                f32::from(u8::from(
                    m[j] && theta.is_some_and(|t| f64::from(h[j]) >= t),
                ))
            })
            .collect()
    }

    /// The one-pass M2PO as bools (the mask unchanged when it masks nothing).
    fn reduced_as_bools(roll: &[f32], old: &[f32], mask: &[f32], tau: f64) -> Vec<bool> {
        match m2po_reduced(roll, old, mask, tau).unwrap() {
            Some(out) => out.iter().map(|&m| m != 0).collect(),
            None => mask.iter().map(|&m| m != 0.0).collect(),
        }
    }

    /// A xorshift stream of uniforms in `[0, 1)` from `state` (non-zero).
    fn uniforms(mut state: u64) -> impl FnMut() -> f64 {
        move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 11) as f64 / (1u64 << 53) as f64
        }
    }

    /// Batches far larger than the sample (the bracket's path and its misses), on values with
    /// many ties and on smooth ones: the one-pass selections are their definitions.
    #[test]
    fn one_pass_selections_on_large_batches() {
        let mut next = uniforms(0x2545_F491_4F6C_DD1Du64);
        for (len, coarse) in [(20_000, false), (50_000, true), (9_000, false)] {
            let value = |x: f64| {
                if coarse {
                    (x * 16.0).floor() as f32 / 4.0
                } else {
                    x as f32 * 3.0
                }
            };
            let h: Vec<f32> = (0..len).map(|_| value(next())).collect();
            let m: Vec<bool> = (0..len).map(|_| next() < 0.8).collect();
            let mask: Vec<u8> = m.iter().map(|&m| u8::from(m)).collect();
            for rho in [0.01, 0.2, 0.5, 0.97, 1.0] {
                assert_eq!(
                    top_entropy_keep(&h, &mask, rho).unwrap(),
                    keep_by_sort(&h, &m, rho),
                    "ρ {rho}"
                );
            }
            let old: Vec<f32> = (0..len).map(|_| -(next() as f32) * 3.0).collect();
            let roll: Vec<f32> = old
                .iter()
                .map(|o| o + value(next() - 0.5) * 0.1 * if next() < 0.02 { 10.0 } else { 1.0 })
                .collect();
            let maskf: Vec<f32> = m.iter().map(|&m| f32::from(u8::from(m))).collect();
            for tau in [1e-4, 1e-3, 0.004, 0.02, 1.0] {
                assert_eq!(
                    reduced_as_bools(&roll, &old, &maskf, tau),
                    m2po_by_sort(&roll, &old, &m, tau),
                    "τ {tau}"
                );
            }
        }
        // A sample that sees no outlier predicts that M2PO masks nothing; the batch's outliers
        // (between the sample's runs) say otherwise: the definition decides.
        let len = 40_000;
        let stride = len / (SAMPLE / RUN);
        let old = vec![-1f32; len];
        let roll: Vec<f32> = (0..len)
            .map(|j| {
                if j % 9 == 5 && j < 400 && j % stride >= RUN {
                    2.0
                } else {
                    -0.99
                }
            })
            .collect();
        let ones = vec![1f32; len];
        let all = vec![true; len];
        assert!(sample(len, &ones, |j| roll[j]).iter().all(|&r| r == -0.99));
        let reduced = reduced_as_bools(&roll, &old, &ones, 1e-3);
        assert_eq!(reduced, m2po_by_sort(&roll, &old, &all, 1e-3));
        assert!(reduced.iter().any(|k| !k), "nothing masked");
        // The route's quarter of the runs sees no drift, the rest of the batch drifts: the
        // route's pass finds the cut, and the whole sample then brackets it.
        let roll: Vec<f32> = (0..len)
            .map(|j| {
                if (j / stride).is_multiple_of(ROUTE_EVERY) && j % stride < RUN {
                    -1.0
                } else {
                    -0.9
                }
            })
            .collect();
        let route = sample_runs(len, &ones, |j| roll[j], |k| k.is_multiple_of(ROUTE_EVERY));
        assert!(route.iter().all(|&r| r == -1.0));
        let reduced = reduced_as_bools(&roll, &old, &ones, 5e-3);
        assert_eq!(reduced, m2po_by_sort(&roll, &old, &all, 5e-3));
        assert!(reduced.iter().any(|k| !k), "nothing masked");
    }

    /// Rows with padding before and after their tokens (spans of [`SPAN`] all masked, passed
    /// over) holding garbage (NaN, ±inf, huge values): every selection is its definition, and
    /// the garbage reaches no decision and raises no error.
    #[test]
    fn padding_spans_are_passed_over() {
        let mut next = uniforms(0x9E37_79B9_7F4A_7C15u64);
        let (b, t) = (40, 1000);
        let mut m = vec![false; b * t];
        for row in 0..b {
            let first = (next() * 600.0) as usize;
            let last = first + (next() * (t - first) as f64) as usize;
            m[row * t + first..row * t + last].fill(true);
        }
        let garbage = [f32::NAN, f32::INFINITY, f32::NEG_INFINITY, 3e38, -3e38];
        let mut draw = |on: bool, x: f32| {
            if on {
                x
            } else {
                garbage[(next() * 5.0) as usize]
            }
        };
        let old: Vec<f32> = (0..b * t)
            .map(|j| draw(m[j], (j % 7) as f32 * -0.3))
            .collect();
        let roll: Vec<f32> = (0..b * t)
            .map(|j| draw(m[j], old[j] + ((j * 31 % 17) as f32 - 8.0) * 0.02))
            .collect();
        let h: Vec<f32> = (0..b * t)
            .map(|j| draw(m[j], (j * 13 % 29) as f32 * 0.1))
            .collect();
        let lp: Vec<f32> = (0..b * t).map(|j| draw(m[j], old[j] + 0.01)).collect();
        let maskf: Vec<f32> = m.iter().map(|&m| f32::from(u8::from(m))).collect();
        let masku: Vec<u8> = m.iter().map(|&m| u8::from(m)).collect();
        for rho in [0.05, 0.2, 1.0] {
            assert_eq!(
                top_entropy_keep(&h, &masku, rho).unwrap(),
                keep_by_sort(&h, &m, rho),
                "ρ {rho}"
            );
        }
        for tau in [1e-3, 0.01, 0.03, 1.0] {
            assert_eq!(
                reduced_as_bools(&roll, &old, &maskf, tau),
                m2po_by_sort(&roll, &old, &m, tau),
                "τ {tau}"
            );
        }
        let rows = opsm_rows_off(&roll, &lp, &masku, t, 0.005);
        for (i, off) in rows.iter().enumerate() {
            let row = i * t..(i + 1) * t;
            let n = row.clone().filter(|&j| m[j]).count();
            let sum: f64 = row
                .filter(|&j| m[j])
                .map(|j| f64::from(roll[j]) - f64::from(lp[j]))
                .sum();
            assert_eq!(*off, sum / n.max(1) as f64 > 0.005, "row {i}");
        }
    }

    /// `θ` rounded up to f32 decides as `θ` in f64 does, for the f32 values around it.
    #[test]
    fn threshold_f32_decides_as_the_f64_threshold() {
        for theta in [
            0.1f64,
            -0.3,
            1.0 / 3.0,
            2.5,
            1e-40,
            -1e-40,
            0.0,
            1e39,
            f64::INFINITY,
        ] {
            let rounded = threshold_f32(theta);
            let mut h = theta as f32;
            for _ in 0..3 {
                h = h.next_down();
            }
            for _ in 0..7 {
                assert_eq!(h >= rounded, f64::from(h) >= theta, "θ {theta}, h {h}");
                h = h.next_up();
            }
        }
    }

    /// Values on a coarse grid, so that ties are common.
    fn grid(len: usize) -> impl Strategy<Value = Vec<f32>> {
        prop::collection::vec((0u8..12).prop_map(|v| f32::from(v) * 0.25), len)
    }

    /// Values where the top-entropy pass's compares differ: ±0, ±∞, NaN, the bracket's ends
    /// `0.5` and `1.5` and their neighbours, negatives.
    fn entropy_values() -> impl Strategy<Value = f32> {
        prop::sample::select(vec![
            0.0f32,
            -0.0,
            0.5,
            0.5f32.next_down(),
            1.5,
            1.5f32.next_up(),
            1.0,
            -1.0,
            2.0,
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::NAN,
        ])
    }

    /// The AVX-512 and AVX2 forms of the top-entropy pass (where the CPU has them) against the
    /// portable body, for a mask type.
    #[cfg(target_arch = "x86_64")]
    fn entropy_forms_agree<M: MaskValue + std::fmt::Debug>(
        h: &[f32],
        mask: &[M],
    ) -> std::result::Result<(), TestCaseError> {
        let chunk = || EntropyChunk {
            h,
            m: mask,
            lo: 0.5,
            hi: 1.5,
        };
        let portable = dispatch(chunk());
        if crate::vectorize::has_avx512() {
            // SAFETY: the CPU has AVX-512 (checked just above).
            let wide = unsafe { entropy_chunk_avx512(chunk()) };
            prop_assert_eq!(&wide, &portable, "AVX-512, mask {:?}", mask);
        }
        if avx2::runs_here() && avx2::takes::<M>() {
            // SAFETY: the CPU has the AVX2 form's features (checked just above).
            let wide = unsafe { avx2::entropy_chunk(chunk()) };
            prop_assert_eq!(&wide, &portable, "AVX2, mask {:?}", mask);
        }
        Ok(())
    }

    proptest! {
        /// M2PO's bracket pass classifies by `|d|` in f32 exactly as by `u` in f64: for any two
        /// log-prob pairs, `u < lo` and `u ≤ hi` hold where their bounds on `|d|` do, the
        /// bracket taken from another pair's `u` (as the sample gives it) or ±∞.
        #[test]
        fn bracket_on_differences_classifies_as_u(
            r in -30f32..0.0,
            o in -30f32..0.0,
            bound_r in -30f32..0.0,
            bound_o in -30f32..0.0,
            which in 0u8..3,
        ) {
            let u = second_moment(r, o);
            // The bound's `d` one ulp on either side of this one (close calls), or another's.
            let d = (r - o).abs();
            let bound = match which {
                0 => f64::from(d.next_up()).powi(2),
                1 => f64::from(d.next_down().max(0.0)).powi(2),
                _ => second_moment(bound_r, bound_o),
            };
            for (lo, hi) in [(bound, bound), (f64::NEG_INFINITY, bound), (bound, f64::INFINITY), (u, u)] {
                let (lo_d, hi_d) = bracket_on_differences((lo, hi));
                prop_assert_eq!(u < lo, d < lo_d, "u {} lo {}", u, lo);
                prop_assert_eq!(u <= hi, d <= hi_d, "u {} hi {}", u, hi);
            }
        }
    }

    /// Log-probs for the bracket pass's AVX2 test: a grid of close values (ties of `|d|` and
    /// values at the bracket's bounds), and the non-finite ones.
    fn log_prob_values() -> impl Strategy<Value = f32> {
        prop_oneof![
            8 => (0u8..12).prop_map(|k| -0.25 * f32::from(k)),
            2 => -30f32..0.0,
            1 => prop::sample::select(vec![f32::NEG_INFINITY, f32::INFINITY, f32::NAN, f32::MAX, -f32::MAX]),
        ]
    }

    /// M2PO's bracket pass over one chunk, the portable body and the AVX2 form, for a mask type:
    /// the same counts, the same `Σu` lane by lane (bits), the same bad flag, bytes and inside
    /// positions.
    #[cfg(target_arch = "x86_64")]
    fn bracket_forms_agree<M: MaskValue>(
        r: &[f32],
        o: &[f32],
        m: &[M],
        bracket: (f32, f32),
    ) -> std::result::Result<(), TestCaseError> {
        let len = r.len();
        let run = |avx2: bool| {
            let mut keep = vec![MaybeUninit::new(7u8); len];
            let chunk = M2CutChunk {
                r,
                o,
                m,
                bracket,
                keep: &mut keep,
                start: 3,
            };
            // SAFETY: the caller checked `avx2::runs_here()`.
            let (sums, inside) = if avx2 {
                unsafe { m2_cut_chunk_avx2(chunk) }
            } else {
                chunk.walk::<false>()
            };
            // SAFETY: the pass writes every byte.
            let bytes: Vec<u8> = keep.iter().map(|b| unsafe { b.assume_init() }).collect();
            let count = |lanes: &[u32; CUT_LANES]| lanes.iter().sum::<u32>();
            let sum_bits: Vec<u64> = sums.below_sum.iter().map(|v| v.to_bits()).collect();
            (
                count(&sums.n),
                count(&sums.below),
                sum_bits,
                sums.bad(),
                bytes,
                inside,
            )
        };
        let portable = run(false);
        prop_assert_eq!(&run(true), &portable);
        Ok(())
    }

    proptest! {
        /// The AVX-512 and AVX2 forms of the top-entropy pass give the portable body's counts,
        /// flags and keys (in order), on every kind of value, with `f32`, `u8` and `f64` masks
        /// (AVX-512 takes the last one bit at a time; AVX2 leaves it to the portable body),
        /// across spans of padding and a last partial block.
        #[test]
        fn entropy_pass_simd_forms_are_the_portable_pass(
            h in prop::collection::vec(entropy_values(), 0..700),
            on in prop::collection::vec(prop::sample::select(vec![0u8, 1, 2]), 700),
            padding in prop::collection::vec(any::<bool>(), 3),
        ) {
            #[cfg(target_arch = "x86_64")]
            {
                if !crate::vectorize::has_avx512() && !avx2::runs_here() {
                    eprintln!("not run: this CPU has neither AVX-512 nor AVX2 (the portable pass runs instead)");
                    return Ok(());
                }
                // Spans of padding: whole thirds of the positions masked.
                let len = h.len();
                let masked = |j: usize| padding[(3 * j / len.max(1)).min(2)];
                let bytes: Vec<u8> = (0..len).map(|j| if masked(j) { 0 } else { on[j] }).collect();
                let floats: Vec<f32> = bytes.iter().map(|&b| f32::from(b)).collect();
                let doubles: Vec<f64> = bytes.iter().map(|&b| f64::from(b)).collect();
                entropy_forms_agree(&h, &bytes)?;
                entropy_forms_agree(&h, &floats)?;
                entropy_forms_agree(&h, &doubles)?;
                // A NaN in an `f32` mask counts as unmasked, as `MaskValue::on` says.
                let nan_mask: Vec<f32> = floats.iter().map(|&m| if m == 2.0 { f32::NAN } else { m }).collect();
                entropy_forms_agree(&h, &nan_mask)?;
            }
        }

        /// The AVX2 form of M2PO's bracket pass gives the portable body's counts, `Σu` lanes,
        /// bad flag, bytes and inside positions, with `f32` and `u8` masks (values 0, 1 and 2,
        /// NaN in the `f32` one), non-finite log-probs, ties at the bracket's bounds, spans of
        /// padding and a last partial block.
        #[test]
        fn bracket_pass_avx2_is_the_portable_pass(
            pairs in prop::collection::vec((log_prob_values(), log_prob_values()), 0..700),
            on in prop::collection::vec(prop::sample::select(vec![0u8, 1, 1, 1, 2]), 700),
            padding in prop::collection::vec(any::<bool>(), 3),
            bounds in (0usize..700, 0usize..700, 0u8..4),
        ) {
            #[cfg(target_arch = "x86_64")]
            {
                if !avx2::runs_here() {
                    eprintln!("not run: this CPU has no AVX2 (the portable pass runs instead)");
                    return Ok(());
                }
                let len = pairs.len();
                let (r, o): (Vec<f32>, Vec<f32>) = pairs.into_iter().unzip();
                let masked = |j: usize| padding[(3 * j / len.max(1)).min(2)];
                let bytes: Vec<u8> = (0..len).map(|j| if masked(j) { 0 } else { on[j] }).collect();
                let floats: Vec<f32> = bytes.iter().map(|&b| f32::from(b)).collect();
                let nan_mask: Vec<f32> = floats.iter().map(|&m| if m == 2.0 { f32::NAN } else { m }).collect();
                // The bracket from two tokens' `u` (as the sample gives it), or open on a side.
                let u = |j: usize| if len == 0 { 0.0 } else { second_moment(r[j % len], o[j % len]) };
                let (a, b) = (u(bounds.0), u(bounds.1));
                let (lo, hi) = match bounds.2 {
                    0 => (a.min(b), a.max(b)),
                    1 => (f64::NEG_INFINITY, a),
                    2 => (a, f64::INFINITY),
                    _ => (a, a),
                };
                let bracket = bracket_on_differences((lo, hi));
                bracket_forms_agree(&r, &o, &bytes, bracket)?;
                bracket_forms_agree(&r, &o, &floats, bracket)?;
                bracket_forms_agree(&r, &o, &nan_mask, bracket)?;
            }
        }

        /// The packed values of the one-pass cut order as the definition's [`Drift`]s (by `u`,
        /// then by token), ties of `|d|` and of `d` across signs, zeros of both signs and
        /// infinite `d` included, and give back the token and the bits of `u`.
        #[test]
        fn inside_drifts_order_as_drifts(
            values in prop::collection::vec(
                // A NaN `d` never reaches a cut: the pass answers it with the typed error.
                (log_prob_values(), log_prob_values())
                    .prop_filter("d is not NaN", |(r, o)| !(r - o).is_nan()),
                0..60,
            ),
            signed_zeros in any::<bool>(),
        ) {
            let (mut r, mut o): (Vec<f32>, Vec<f32>) = values.into_iter().unzip();
            if signed_zeros && !r.is_empty() {
                // `d = −0` and `d = +0`.
                (r[0], o[0]) = (-0.0, 0.0);
                r.push(0.0);
                o.push(-0.0);
            }
            let tokens = 0..r.len();
            let mut drifts: Vec<Drift> = tokens.clone().map(|j| drift(&r, &o, j)).collect();
            let mut packed: Vec<InsideDrift> =
                tokens.map(|j| InsideDrift::new(r[j] - o[j], j)).collect();
            for (d, p) in drifts.iter().zip(&packed) {
                prop_assert_eq!(p.position(), d.1);
                prop_assert_eq!(p.u().to_bits(), d.u().to_bits());
            }
            drifts.sort_unstable();
            packed.sort_unstable();
            let order: Vec<usize> = packed.iter().map(|p| p.position()).collect();
            prop_assert_eq!(order, drifts.iter().map(|d| d.1).collect::<Vec<_>>());
        }

        /// The integer keys order as `f32::total_cmp` and give the values back.
        #[test]
        fn order_keys_are_total_cmp(a in any::<f32>(), b in any::<f32>()) {
            prop_assert_eq!(order_key(a).cmp(&order_key(b)), a.total_cmp(&b));
            prop_assert_eq!(from_order_key(order_key(a)).to_bits(), a.to_bits());
        }

        /// The bracket pass's bytes scanned a word at a time give every [`INSIDE`] position
        /// once (several in a word, and in the bytes after the last whole word, included) and
        /// are left [`KEPT`] there, unchanged elsewhere.
        #[test]
        fn inside_positions_are_the_inside_bytes(
            bytes in prop::collection::vec(prop::sample::select(vec![0u8, KEPT, INSIDE]), 0..300),
        ) {
            // Several groups of 64 and a tail; the positions in order.
            let mut got = vec![];
            let mut marked = bytes.clone();
            for_inside_positions(&mut marked, |j| got.push(j));
            let want: Vec<usize> = (0..bytes.len()).filter(|&j| bytes[j] == INSIDE).collect();
            prop_assert_eq!(got, want);
            // Each mark is now `KEPT`; the other bytes are as they were.
            let kept: Vec<u8> = bytes.iter().map(|&b| if b == INSIDE { KEPT } else { b }).collect();
            prop_assert_eq!(marked, kept);
        }

        #[test]
        fn entropy_threshold_is_the_sorted_quantile(
            h in grid(40),
            m in prop::collection::vec(any::<bool>(), 40),
            rho in 0.01f64..=1.0,
        ) {
            let mask: Vec<u8> = m.iter().map(|&m| u8::from(m)).collect();
            let got = entropy_threshold(&h, &mask, rho);
            let want = threshold_by_sort(&h, &m, rho);
            match (got, want) {
                (Some(g), Some(w)) => prop_assert!((g - w).abs() <= 1e-12 * w.abs().max(1.0)),
                (g, w) => prop_assert_eq!(g, w),
            }
            prop_assert_eq!(top_entropy_keep(&h, &mask, rho).unwrap(), keep_by_sort(&h, &m, rho));
        }

        /// The bracket's two order statistics of the sample (the upper one selected among the
        /// values the lower one's selection left above it) are those of the sorted sample, on
        /// batches larger than the sample (a strided sample) and smaller, with ties.
        #[test]
        fn entropy_bracket_is_the_sorted_samples(
            len in 1usize..12_000,
            seed in any::<u64>(),
            levels in 2u32..100_000,
            rho in 0.01f64..=1.0,
        ) {
            let mut next = uniforms(seed | 1);
            let h: Vec<f32> =
                (0..len).map(|_| (next() * f64::from(levels)).floor() as f32 * 0.01).collect();
            let mask: Vec<u8> = (0..len).map(|_| u8::from(next() >= 0.25)).collect();
            let mut sorted = sample(len, &mask, |j| order_key(h[j]));
            sorted.sort_unstable();
            let want = if sorted.is_empty() {
                (f32::NEG_INFINITY, f32::INFINITY)
            } else {
                let s = sorted.len();
                let (r, _) = quantile_rank(rho, s);
                let margin = bracket_margin(s, rho);
                (
                    r.checked_sub(margin).map_or(f32::NEG_INFINITY, |k| from_order_key(sorted[k])),
                    sorted.get(r + margin + 1).map_or(f32::INFINITY, |&k| from_order_key(k)),
                )
            };
            let got = entropy_bracket(&h, &mask, rho);
            prop_assert_eq!((got.0.to_bits(), got.1.to_bits()), (want.0.to_bits(), want.1.to_bits()));
        }

        #[test]
        fn m2po_matches_its_definition(
            roll in grid(48),
            old in grid(48),
            m in prop::collection::vec(any::<bool>(), 48),
            tau in 0.01f64..2.0,
        ) {
            let mask: Vec<f32> = m.iter().map(|&m| f32::from(u8::from(m))).collect();
            let got = m2po_keep(&roll, &old, &mask, tau);
            prop_assert_eq!(got.clone(), m2po_by_sort(&roll, &old, &m, tau));
            prop_assert_eq!(reduced_as_bools(&roll, &old, &mask, tau), got.clone());
            // Only unmasked tokens are dropped, and one stays when there was one.
            prop_assert!(got.iter().zip(&m).all(|(g, m)| !*g || *m));
            prop_assert!(!m.iter().any(|&m| m) || got.iter().any(|&g| g));
        }

        #[test]
        fn opsm_rows_are_the_row_means(
            s in grid(30),
            lp in grid(30),
            m in prop::collection::vec(any::<bool>(), 30),
            delta in 0.01f64..1.0,
        ) {
            let mask: Vec<u8> = m.iter().map(|&m| u8::from(m)).collect();
            let got = opsm_rows_off(&s, &lp, &mask, 6, delta);
            for (i, off) in got.iter().enumerate() {
                let row = i * 6..(i + 1) * 6;
                let n = row.clone().filter(|&j| m[j]).count();
                let sum: f64 = row.filter(|&j| m[j]).map(|j| f64::from(s[j]) - f64::from(lp[j])).sum();
                prop_assert_eq!(*off, sum / n.max(1) as f64 > delta);
            }
        }
    }

    /// The edges: ρ = 1 keeps every token (θ is the minimum), no unmasked token gives no θ,
    /// M2PO keeps everything when the mean is already below τ, and one token when none is.
    #[test]
    fn edges_by_hand() {
        let h = [0.5f32, 2.0, 1.0, 3.0];
        let (on, off) = ([1u8; 4], [0u8; 4]);
        assert_eq!(entropy_threshold(&h, &on, 1.0), Some(0.5));
        assert_eq!(entropy_threshold(&h, &off, 0.5), None);
        // ρ = 0.5 over 4 values: p = 1.5, θ = 1.0 + 0.5·(2.0 − 1.0).
        assert_eq!(entropy_threshold(&h, &on, 0.5), Some(1.5));
        let old = [0f32; 4];
        let roll = [0.1f32, 0.1, 0.1, 0.1];
        assert_eq!(m2po_keep(&roll, &old, &on, 0.5), vec![true; 4]);
        assert!(m2po_reduced(&roll, &old, &on, 0.5).unwrap().is_none());
        let roll = [2f32, 3.0, 4.0, 5.0];
        assert_eq!(
            m2po_keep(&roll, &old, &on, 0.5),
            vec![true, false, false, false]
        );
        assert_eq!(
            m2po_reduced(&roll, &old, &on, 0.5).unwrap(),
            Some(vec![1, 0, 0, 0])
        );
    }
}
