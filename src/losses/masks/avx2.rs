//! The masks' host passes written for AVX2, for CPUs without AVX-512: the portable bodies,
//! compiled for AVX2 by [`crate::vectorize::dispatch`], keep their sixteen lanes of counts and
//! sums in more vectors than AVX2's sixteen registers hold, and spill them to the stack on
//! every block. These forms work on two halves of eight lanes: M2PO's keeps its sixteen f64
//! sums in four registers (one FMA per four lanes) and its counts and flags in three,
//! the top-entropy pass its counts and flags in six; both pack the values they collect with a
//! permutation table. They give every count, sum, byte and key the portable body gives, bit for
//! bit (the f64 sums in the same lanes, added in the same order; proptests in the parent module
//! hold them to it).

use std::arch::x86_64::*;
use std::mem::MaybeUninit;

use crate::vectorize::PACK;

use super::{
    collect_inside_keys, for_inside_positions, lane_blocks, m2_cut_tail, EntropyChunk, EntropyPart,
    M2CutSums, MaskValue, BLOCK, CUT_LANES, KEPT,
};

/// Byte `j` of `SPREAD[b]` is bit `j` of `b`: eight sign bits of a compare as eight 0/1 bytes.
const SPREAD: [u64; 256] = {
    let mut table = [0u64; 256];
    let mut b = 0;
    while b < 256 {
        let mut j = 0;
        while j < 8 {
            if b >> j & 1 == 1 {
                table[b] |= 1 << (8 * j);
            }
            j += 1;
        }
        b += 1;
    }
    table
};

// The bracket pass's bytes are the bits of `kept` spread: 1 for kept, 0 for dropped.
const _: () = assert!(KEPT == 1);

/// Whether the AVX2 forms take masks of type `M`: the `f32` and `u8` masks every caller
/// passes (other types run the portable body).
pub(super) fn takes<M: MaskValue>() -> bool {
    use std::any::TypeId;
    let id = TypeId::of::<M>();
    id == TypeId::of::<f32>() || id == TypeId::of::<u8>()
}

/// Eight mask values as AVX2 lanes: all ones where unmasked ([`MaskValue::on`]), and all ones
/// where the value is neither 0 nor 1 (not [`MaskValue::binary`]). `M` is `f32` or `u8`
/// ([`takes`]).
#[target_feature(enable = "avx2,fma,popcnt")]
#[inline]
fn mask_lanes<M: MaskValue>(m: &[M]) -> (__m256, __m256) {
    use std::any::TypeId;
    debug_assert!(m.len() >= 8 && takes::<M>());
    if TypeId::of::<M>() == TypeId::of::<f32>() {
        // SAFETY: `M` is `f32` and `m` holds at least 8 of them, the load's width.
        let v = unsafe { _mm256_loadu_ps(m.as_ptr().cast()) };
        // `m ≠ 0`, true for NaN, as `MaskValue::on`; neither 0 nor 1: `m ≠ 0` and `m ≠ 1`.
        let on = _mm256_cmp_ps::<_CMP_NEQ_UQ>(v, _mm256_setzero_ps());
        let not_one = _mm256_cmp_ps::<_CMP_NEQ_UQ>(v, _mm256_set1_ps(1.0));
        (on, _mm256_and_ps(on, not_one))
    } else {
        // SAFETY: `M` is `u8` ([`takes`]) and `m` holds at least 8 bytes, the load's width.
        let v = _mm256_cvtepu8_epi32(unsafe { _mm_loadl_epi64(m.as_ptr().cast()) });
        let off = _mm256_cmpeq_epi32(v, _mm256_setzero_si256());
        let on = _mm256_xor_si256(off, _mm256_set1_epi32(-1));
        let not_binary = _mm256_cmpgt_epi32(v, _mm256_set1_epi32(1));
        (_mm256_castsi256_ps(on), _mm256_castsi256_ps(not_binary))
    }
}

/// The sum of the eight `i32` lanes of `v`.
#[target_feature(enable = "avx2,fma,popcnt")]
#[inline]
fn lane_total(v: __m256i) -> u32 {
    let half = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256::<1>(v));
    let pair = _mm_add_epi32(half, _mm_unpackhi_epi64(half, half));
    let one = _mm_add_epi32(pair, _mm_shuffle_epi32::<0b01>(pair));
    _mm_cvtsi128_si32(one) as u32
}

/// M2PO's bracket pass over one span ([`super::m2_cut_span`]'s sums and bytes, bit for bit):
/// per block of 16, two halves of eight lanes; `Σu` below the bracket in the four vectors of
/// the sixteen f64 lanes ([`M2CutSums::below_sum`], read at the start of the span and written
/// back at its end: `d` selected to 0 outside, converted and added as `d·d + Σ` by one FMA,
/// exact since `d²` is), the counts and the bad flag in vector lanes (a compare's all-ones
/// lane is −1, subtracted), the block's sixteen bytes ([`KEPT`] below and inside the bracket)
/// from the compares' sign bits by a table, and the span's positions inside the bracket
/// appended to `inside` in order (packed by a row of [`PACK`], without a branch per position).
/// The tail block runs the portable [`m2_cut_tail`] on the same sums.
#[target_feature(enable = "avx2,fma,popcnt")]
pub(super) fn m2_cut_span<M: MaskValue>(
    r: &[f32],
    o: &[f32],
    m: &[M],
    (lo, hi): (f32, f32),
    sums: &mut M2CutSums,
    keep: &mut [MaybeUninit<u8>],
    inside: &mut Vec<u32>,
) {
    const { assert!(CUT_LANES == 16) };
    let (rs, os, ms, [r_tail, o_tail], m_tail) = lane_blocks::<M, CUT_LANES>(r, o, m);
    let (keep_blocks, keep_tail) = keep.as_chunks_mut::<CUT_LANES>();
    let (vlo, vhi) = (_mm256_set1_ps(lo), _mm256_set1_ps(hi));
    let magnitude = _mm256_castsi256_ps(_mm256_set1_epi32(i32::MAX));
    let infinity = _mm256_set1_ps(f32::INFINITY);
    // SAFETY: `below_sum` holds 16 f64, four loads of four.
    let mut lanes: [__m256d; 4] =
        std::array::from_fn(|q| unsafe { _mm256_loadu_pd(sums.below_sum[4 * q..].as_ptr()) });
    let zero = _mm256_setzero_si256();
    let (mut n, mut below, mut bad) = (zero, zero, _mm256_setzero_ps());
    // Room for every position of the span: each store writes 8 from the cursor.
    inside.reserve(r.len() + 8);
    let (positions_out, mut found) = (inside.as_mut_ptr(), inside.len());
    let eight = _mm256_set1_epi32(8);
    let mut lane_positions = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    for (((r, o), m), keep) in rs.iter().zip(os).zip(ms).zip(keep_blocks) {
        let mut bytes = [0u64; 2];
        for (half, bytes) in bytes.iter_mut().enumerate() {
            let at = 8 * half;
            let (on, not_binary) = mask_lanes(&m[at..]);
            // SAFETY: `r` and `o` hold 16 values; each load reads 8 from `at` ≤ 8.
            let d = unsafe {
                _mm256_sub_ps(
                    _mm256_loadu_ps(r.as_ptr().add(at)),
                    _mm256_loadu_ps(o.as_ptr().add(at)),
                )
            };
            let size = _mm256_and_ps(d, magnitude);
            let is_below = _mm256_and_ps(on, _mm256_cmp_ps::<_CMP_LT_OQ>(size, vlo));
            let is_inside = _mm256_and_ps(
                _mm256_and_ps(on, _mm256_cmp_ps::<_CMP_LE_OQ>(size, vhi)),
                _mm256_cmp_ps::<_CMP_GE_OQ>(size, vlo),
            );
            // Kept unless the cut decides otherwise: below the bracket or inside it.
            let kept = _mm256_or_ps(is_below, is_inside);
            // Not finite: not `|d| < ∞` (NaN included).
            let not_finite = _mm256_cmp_ps::<_CMP_NLT_UQ>(size, infinity);
            bad = _mm256_or_ps(bad, _mm256_or_ps(not_binary, _mm256_and_ps(on, not_finite)));
            n = _mm256_sub_epi32(n, _mm256_castps_si256(on));
            below = _mm256_sub_epi32(below, _mm256_castps_si256(is_below));
            // `u = d²` in f64 (exact, [`super::exact_square`]), selected below the bracket.
            let selected = _mm256_and_ps(d, is_below);
            for (k, d) in [
                _mm256_castps256_ps128(selected),
                _mm256_extractf128_ps::<1>(selected),
            ]
            .into_iter()
            .enumerate()
            {
                let d = _mm256_cvtps_pd(d);
                let lane = &mut lanes[2 * half + k];
                *lane = _mm256_fmadd_pd(d, d, *lane);
            }
            *bytes = SPREAD[_mm256_movemask_ps(kept) as usize];
            let inside_bits = _mm256_movemask_ps(is_inside) as usize;
            // SAFETY: a row of `PACK` is 8 u32, the load's width; `found` ≤ the positions
            // before the span + the span's positions passed, so the 8 stored fit the room.
            unsafe {
                let order = _mm256_loadu_si256(PACK[inside_bits].as_ptr().cast());
                _mm256_storeu_si256(
                    positions_out.add(found).cast(),
                    _mm256_permutevar8x32_epi32(lane_positions, order),
                );
            }
            found += inside_bits.count_ones() as usize;
            lane_positions = _mm256_add_epi32(lane_positions, eight);
        }
        // SAFETY: `keep` holds 16 bytes, two unaligned stores of eight.
        unsafe {
            let out = keep.as_mut_ptr().cast::<u64>();
            out.write_unaligned(bytes[0].to_le());
            out.add(1).write_unaligned(bytes[1].to_le());
        }
    }
    for (q, lane) in lanes.iter().enumerate() {
        // SAFETY: `below_sum` holds 16 f64, four stores of four.
        unsafe { _mm256_storeu_pd(sums.below_sum[4 * q..].as_mut_ptr(), *lane) };
    }
    // Counts are integers: whichever lane holds them, their totals are the portable body's.
    sums.n[0] += lane_total(n);
    sums.below[0] += lane_total(below);
    sums.bad[0] += u32::from(_mm256_movemask_ps(bad) != 0);
    // SAFETY: the positions up to `found` were there or written by the stores above (each
    // store's first `inside_bits.count_ones()` lanes are its half's inside positions, in order).
    unsafe { inside.set_len(found) };
    if !keep_tail.is_empty() {
        let start = r.len() - keep_tail.len();
        let bytes = m2_cut_tail(&r_tail, &o_tail, &m_tail, (lo, hi), sums, keep_tail);
        for_inside_positions(bytes, |k| inside.push((start + k) as u32));
    }
}

/// Whether the AVX2 forms run here: a CPU with AVX2, FMA and `popcnt` but without AVX-512
/// (where the portable bodies, compiled for AVX-512's 32 registers, keep their lanes in
/// registers), and masks of a type they take ([`takes`]).
pub(super) fn usable<M: MaskValue>() -> bool {
    runs_here() && !crate::vectorize::has_avx512() && takes::<M>()
}

/// Whether this CPU has the features the AVX2 forms are compiled for.
pub(super) fn runs_here() -> bool {
    crate::vectorize::has_avx2() && std::arch::is_x86_feature_detected!("popcnt")
}

/// The top-entropy pass over one chunk ([`super::entropy_chunk`]'s result, bit for bit): per
/// block of 16, two halves of eight lanes; the counts and flags in vector lanes (a compare's
/// all-ones lane is −1, subtracted), the inside values' [`super::order_key`]s packed to the
/// front of a vector by a row of [`PACK`] and stored after those already found.
#[target_feature(enable = "avx2,fma,popcnt")]
pub(super) fn entropy_chunk<M: MaskValue>(chunk: EntropyChunk<'_, M>) -> EntropyPart {
    const { assert!(BLOCK == 16) };
    let EntropyChunk { h, m, lo, hi } = chunk;
    let (vlo, vhi) = (_mm256_set1_ps(lo), _mm256_set1_ps(hi));
    let magnitude = _mm256_castsi256_ps(_mm256_set1_epi32(i32::MAX));
    let infinity = _mm256_set1_ps(f32::INFINITY);
    let zero = _mm256_setzero_si256();
    let (mut n, mut below, mut bad) = ([zero; 2], [zero; 2], [zero; 2]);
    let block = |h: &[f32; BLOCK], m: &[M; BLOCK], out: *mut i32| {
        let mut found = 0;
        for half in 0..2 {
            let at = 8 * half;
            let (on, _) = mask_lanes(&m[at..]);
            // SAFETY: `h` holds 16 values; the load reads 8 from `at` ≤ 8.
            let v = unsafe { _mm256_loadu_ps(h.as_ptr().add(at)) };
            let is_below = _mm256_and_ps(on, _mm256_cmp_ps::<_CMP_LT_OQ>(v, vlo));
            let within = _mm256_and_ps(
                on,
                _mm256_and_ps(
                    _mm256_cmp_ps::<_CMP_GE_OQ>(v, vlo),
                    _mm256_cmp_ps::<_CMP_LE_OQ>(v, vhi),
                ),
            );
            // Not finite: not `|v| < ∞` (NaN included).
            let not_finite = _mm256_and_ps(
                on,
                _mm256_cmp_ps::<_CMP_NLT_UQ>(_mm256_and_ps(v, magnitude), infinity),
            );
            n[half] = _mm256_sub_epi32(n[half], _mm256_castps_si256(on));
            below[half] = _mm256_sub_epi32(below[half], _mm256_castps_si256(is_below));
            bad[half] = _mm256_or_si256(bad[half], _mm256_castps_si256(not_finite));
            // The inside values' keys ([`super::flip_negative`] in vector form), packed.
            let bits = _mm256_castps_si256(v);
            let flip = _mm256_srli_epi32::<1>(_mm256_srai_epi32::<31>(bits));
            let keys = _mm256_xor_si256(bits, flip);
            let mask = _mm256_movemask_ps(within) as usize;
            // SAFETY: a row of `PACK` is 8 u32, the load's width.
            let order = unsafe { _mm256_loadu_si256(PACK[mask].as_ptr().cast()) };
            // SAFETY: `found` ≤ 8, so the 8 stored fit the block's room of 16.
            unsafe {
                _mm256_storeu_si256(
                    out.add(found).cast(),
                    _mm256_permutevar8x32_epi32(keys, order),
                );
            }
            found += mask.count_ones() as usize;
        }
        found
    };
    // SAFETY: each half stores 8 keys from `out` + the keys of the halves before it (at most 8
    // in all: 16 from `out`), and the block returns how many are inside keys, packed in order.
    let inside = unsafe { collect_inside_keys(h, m, block) };
    let lanes = |v: [__m256i; 2]| {
        let mut out = [0u32; BLOCK];
        for (half, v) in v.into_iter().enumerate() {
            // SAFETY: `out` holds 16 u32; each store writes 8 from `8 · half` ≤ 8.
            unsafe { _mm256_storeu_si256(out.as_mut_ptr().add(8 * half).cast(), v) };
        }
        out
    };
    let flags = lanes(bad).map(|flag| flag != 0);
    (lanes(n), lanes(below), inside, flags)
}
