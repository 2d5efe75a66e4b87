//! Order statistics of `i32` keys spread over several slices (the top-entropy selection's keys,
//! collected per chunk by its pass): one pass over the keys between two pivots a small sample
//! puts around the wanted ranks, the same again among those keys while they are many, then a
//! selection among the few left (Floyd and Rivest's select). The pass has an AVX-512 form
//! (compares as mask registers, the keys between the pivots gathered by one compress per block)
//! and an AVX2 form (the same by a permutation table, `vectorize::PACK`) beside the portable one,
//! which is branch-free too (a branch per key in no order is mispredicted half the time).
//!
//! ```text
//! v_(0) ≤ v_(1) ≤ … ≤ v_(n−1):  the keys of every slice, sorted (ties counted);  v_(n) := v_(n−1)
//! order_pair(parts, j) = (v_(j), v_(j+1))
//! ```
//!
//! Layer: math (a selection and its traversal, beside `vectorize` and `pool`; what the ranks
//! mean is the masks' business).

/// Up to this many keys the selection runs directly on all of them (`select_nth_unstable`).
const DIRECT: usize = 1024;

/// Keys in the sample that places the pivots.
const SAMPLE: usize = 128;

/// The margin, in sample ranks, of a bracket around the sample's rank at fraction `p` of its `s`
/// values: three standard deviations of that rank (binomial), plus four — the pivots here, and
/// the top-entropy quantile's and M2PO's cut's brackets over the batch (`losses::masks`).
pub(crate) fn bracket_margin(s: usize, p: f64) -> usize {
    (3.0 * (s as f64 * p * (1.0 - p)).sqrt()) as usize + 4
}

/// `(v_(j), v_(j+1))` of the keys of every slice of `parts` taken together, `v_(n) := v_(n−1)`
/// (see the module's formula); `j` < the total count `n`, which is not 0.
pub(crate) fn order_pair(parts: &[&[i32]], j: usize) -> (i32, i32) {
    let n: usize = parts.iter().map(|p| p.len()).sum();
    order_statistics(parts, (j, (j + 1).min(n.saturating_sub(1))))
}

/// `(v_(i), v_(j))` of the keys of every slice of `parts` taken together, `i ≤ j <` their total
/// count `n`.
///
/// Two pivots from a sample of [`SAMPLE`] evenly spaced keys, three standard deviations (plus
/// four) of the sample's rank below `i`'s and above `j`'s; one pass counts the keys below the
/// lower pivot and collects those between the two; the same again among those while they are
/// more than [`DIRECT`] and at most half the keys, then a selection. When the pivots miss a
/// rank (a chance of a few in a thousand), the selection runs on every key.
pub(crate) fn order_statistics(parts: &[&[i32]], (i, j): (usize, usize)) -> (i32, i32) {
    let n: usize = parts.iter().map(|p| p.len()).sum();
    assert!(i <= j && j < n, "ranks {i} and {j} of {n} keys");
    if n <= DIRECT {
        return select_two(&mut parts.concat(), (i, j));
    }
    let mut sample = evenly_spaced(parts, n);
    let s = sample.len();
    // The sample's rank of a rank of the keys, and its margin.
    let place = |rank: usize| {
        let q = (rank as f64 + 0.5) / n as f64;
        (((q * s as f64) as usize).min(s - 1), bracket_margin(s, q))
    };
    let ((ri, mi), (rj, mj)) = (place(i), place(j));
    let lo = match ri.checked_sub(mi) {
        Some(k) => *sample.select_nth_unstable(k).1,
        None => i32::MIN,
    };
    let hi = if rj + mj < s {
        *sample.select_nth_unstable(rj + mj).1
    } else {
        i32::MAX
    };
    let mut middle = Vec::new();
    let below: usize = parts
        .iter()
        .map(|part| split(part, (lo, hi), &mut middle))
        .sum();
    if i < below || j >= below + middle.len() {
        return select_two(&mut parts.concat(), (i, j));
    }
    let ranks = (i - below, j - below);
    if middle.len() > DIRECT && middle.len() <= n / 2 {
        // The keys between the pivots are still many: the same again among them (not when the
        // pivots took in most keys, as many equal keys make them do: that would not end).
        order_statistics(&[&middle], ranks)
    } else {
        select_two(&mut middle, ranks)
    }
}

/// `(v_(i), v_(j))` of `keys` (reordered), `i ≤ j < keys.len()`: the second selected among the
/// keys the first one's selection left above it.
fn select_two(keys: &mut [i32], (i, j): (usize, usize)) -> (i32, i32) {
    let (_, vi, upper) = keys.select_nth_unstable(i);
    let vj = if j == i {
        *vi
    } else {
        *upper.select_nth_unstable(j - i - 1).1
    };
    (*vi, vj)
}

/// The keys at the flat positions `i·n/SAMPLE`, `i < SAMPLE`, of the slices taken in order
/// (`n` their total count).
fn evenly_spaced(parts: &[&[i32]], n: usize) -> Vec<i32> {
    let mut sample = Vec::with_capacity(SAMPLE);
    let mut start = 0;
    for part in parts {
        let end = start + part.len();
        // The sample's positions inside this slice: `i·n/SAMPLE` in `[start, end)`.
        let mut i = (start * SAMPLE).div_ceil(n);
        while i < SAMPLE && i * n / SAMPLE < end {
            sample.push(part[i * n / SAMPLE - start]);
            i += 1;
        }
        start = end;
    }
    sample
}

/// One slice's pass: the count of keys `< lo`, and the keys in `[lo, hi]` appended to `middle`
/// in order; the AVX-512 form where the CPU has one, else the AVX2 form where it has that.
fn split(keys: &[i32], bounds: (i32, i32), middle: &mut Vec<i32>) -> usize {
    #[cfg(target_arch = "x86_64")]
    {
        if crate::vectorize::has_avx512() {
            // SAFETY: `has_avx512` checked at run time that the CPU has the features the
            // function is compiled for.
            return unsafe { split_avx512(keys, bounds, middle) };
        }
        if crate::vectorize::has_avx2() {
            // SAFETY: `has_avx2` checked at run time that the CPU has the features the function
            // is compiled for.
            return unsafe { split_avx2(keys, bounds, middle) };
        }
    }
    split_portable(keys, bounds, middle)
}

/// [`split`]'s portable form, without a branch per key: the keys come in no order, so a branch
/// on each would be mispredicted about half the time (on a CPU without AVX-512 that cost more
/// than the rest of the top-entropy selection's order statistics). Every key is written after
/// those found so far, and the end of the found keys moves past it only when it lies between
/// the pivots; the count below `lo` is a sum of flags.
fn split_portable(keys: &[i32], (lo, hi): (i32, i32), middle: &mut Vec<i32>) -> usize {
    let start = middle.len();
    // Room for every key: the key at index `k` is written at `start + k` at the latest.
    middle.resize(start + keys.len(), 0);
    let (mut below, mut found) = (0usize, start);
    for &k in keys {
        middle[found] = k;
        found += usize::from((lo <= k) & (k <= hi));
        below += usize::from(k < lo);
    }
    middle.truncate(found);
    below
}

/// [`split`] by its definition (the reference of the tests): a branch per key.
#[cfg(test)]
fn split_by_definition(keys: &[i32], (lo, hi): (i32, i32), middle: &mut Vec<i32>) -> usize {
    let mut below = 0;
    for &k in keys {
        if k < lo {
            below += 1;
        } else if k <= hi {
            middle.push(k);
        }
    }
    below
}

/// [`split`] with AVX-512: per block of 16 keys, the two compares as mask registers, the count
/// in vector lanes, the keys between the pivots compressed to the front of a vector and stored
/// after those already found (a full store into reserved room: the register form of the
/// compress, which is fast where the memory form is not); the last block's keys loaded under a
/// mask. The portable form's result exactly.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512vl,avx2,fma,popcnt")]
fn split_avx512(keys: &[i32], (lo, hi): (i32, i32), middle: &mut Vec<i32>) -> usize {
    use std::arch::x86_64::*;
    const LANES: usize = 16;
    let (vlo, vhi, one) = (
        _mm512_set1_epi32(lo),
        _mm512_set1_epi32(hi),
        _mm512_set1_epi32(1),
    );
    let mut below = _mm512_setzero_si512();
    // Room for every key and one store's overhang.
    middle.reserve(keys.len() + LANES);
    let (out, mut found) = (middle.as_mut_ptr(), middle.len());
    let mut block = |v: __m512i, valid: __mmask16| {
        let lt = _mm512_mask_cmplt_epi32_mask(valid, v, vlo);
        let within = _mm512_mask_cmple_epi32_mask(valid & !lt, v, vhi);
        below = _mm512_mask_add_epi32(below, lt, below, one);
        // SAFETY: `found` ≤ the keys before this pass + the keys passed, so the 16 lanes stored
        // fit in the room reserved above.
        unsafe {
            _mm512_storeu_si512(
                out.add(found).cast(),
                _mm512_maskz_compress_epi32(within, v),
            )
        };
        found += within.count_ones() as usize;
    };
    let (blocks, tail) = keys.as_chunks::<LANES>();
    for b in blocks {
        // SAFETY: `b` holds 16 keys, the unaligned load's width.
        block(unsafe { _mm512_loadu_si512(b.as_ptr().cast()) }, u16::MAX);
    }
    if !tail.is_empty() {
        let valid = (1u16 << tail.len()) - 1;
        // SAFETY: only the `tail.len()` lanes of `valid` are read, all inside `tail`.
        block(
            unsafe { _mm512_maskz_loadu_epi32(valid, tail.as_ptr().cast()) },
            valid,
        );
    }
    // SAFETY: the keys up to `found` were there or written by the stores above (each store's
    // first `within.count_ones()` lanes are its block's keys between the pivots, in order).
    unsafe { middle.set_len(found) };
    let mut counts = [0u32; LANES];
    // SAFETY: `counts` holds 16 u32, the unaligned store's width.
    unsafe { _mm512_storeu_si512(counts.as_mut_ptr().cast(), below) };
    counts.iter().map(|&c| c as usize).sum()
}

/// [`split`] with AVX2, for CPUs without AVX-512: per block of 8 keys, the two compares, the
/// count below in vector lanes (a compare's all-ones lane is −1, subtracted), the keys between
/// the pivots moved to the front of a vector by a row of [`PACK`] and stored after those already
/// found (a full store into reserved room); the last partial block by the portable form. The
/// portable form's result exactly.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn split_avx2(keys: &[i32], (lo, hi): (i32, i32), middle: &mut Vec<i32>) -> usize {
    use crate::vectorize::PACK;
    use std::arch::x86_64::*;
    const LANES: usize = 8;
    let (vlo, vhi) = (_mm256_set1_epi32(lo), _mm256_set1_epi32(hi));
    let mut below = _mm256_setzero_si256();
    // Room for every key and one store's overhang.
    middle.reserve(keys.len() + LANES);
    let (out, mut found) = (middle.as_mut_ptr(), middle.len());
    let (blocks, tail) = keys.as_chunks::<LANES>();
    for b in blocks {
        // SAFETY: `b` holds 8 keys, the unaligned load's width.
        let v = unsafe { _mm256_loadu_si256(b.as_ptr().cast()) };
        // `k < lo` and `k > hi`; between the pivots is neither.
        let lt = _mm256_cmpgt_epi32(vlo, v);
        let outside = _mm256_or_si256(lt, _mm256_cmpgt_epi32(v, vhi));
        below = _mm256_sub_epi32(below, lt);
        let within = !_mm256_movemask_ps(_mm256_castsi256_ps(outside)) as usize & 0xff;
        // SAFETY: a row of `PACK` is 8 u32, the load's width; `found` ≤ the keys before this
        // pass + the keys passed, so the 8 lanes stored fit in the room reserved above.
        unsafe {
            let order = _mm256_loadu_si256(PACK[within].as_ptr().cast());
            _mm256_storeu_si256(out.add(found).cast(), _mm256_permutevar8x32_epi32(v, order));
        }
        found += within.count_ones() as usize;
    }
    // SAFETY: the keys up to `found` were there or written by the stores above (each store's
    // first `within.count_ones()` lanes are its block's keys between the pivots, in order).
    unsafe { middle.set_len(found) };
    let mut counts = [0u32; LANES];
    // SAFETY: `counts` holds 8 u32, the unaligned store's width.
    unsafe { _mm256_storeu_si256(counts.as_mut_ptr().cast(), below) };
    counts.iter().map(|&c| c as usize).sum::<usize>() + split_portable(tail, (lo, hi), middle)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// `(v_(j), v_(j+1))` by a full sort.
    fn pair_by_sort(parts: &[Vec<i32>], j: usize) -> (i32, i32) {
        let mut all: Vec<i32> = parts.concat();
        all.sort_unstable();
        (all[j], all[(j + 1).min(all.len() - 1)])
    }

    /// Keys from a few levels (ties) or from the whole range, split into up to four slices.
    fn parts_and_rank() -> impl Strategy<Value = (Vec<Vec<i32>>, usize)> {
        (
            1usize..6_000,
            prop::sample::select(vec![3i64, 50, 1 << 31]),
            any::<u64>(),
            prop::collection::vec(0usize..6_000, 0..4),
            any::<prop::sample::Index>(),
        )
            .prop_map(|(n, levels, seed, cuts, rank)| {
                let mut state = seed | 1;
                let keys: Vec<i32> = (0..n)
                    .map(|_| {
                        state ^= state << 13;
                        state ^= state >> 7;
                        state ^= state << 17;
                        ((state % levels as u64) as i64 - levels / 2) as i32
                    })
                    .collect();
                let mut cuts: Vec<usize> = cuts.into_iter().map(|c| c % (n + 1)).collect();
                cuts.sort_unstable();
                let mut parts = vec![];
                let mut start = 0;
                for c in cuts.into_iter().chain([n]) {
                    parts.push(keys[start..c].to_vec());
                    start = c;
                }
                (parts, rank.index(n))
            })
    }

    proptest! {
        /// Both values are the sorted keys', on many keys and few, ties, the extreme ranks and
        /// empty slices among the parts.
        #[test]
        fn order_pair_is_the_sorted_pair((parts, j) in parts_and_rank(), gap in 0usize..300) {
            let views: Vec<&[i32]> = parts.iter().map(Vec::as_slice).collect();
            let n: usize = parts.iter().map(Vec::len).sum();
            for j in [j, 0, n - 1] {
                prop_assert_eq!(order_pair(&views, j), pair_by_sort(&parts, j));
            }
            // Two ranks apart (the top-entropy bracket's), equal ones included.
            let mut sorted = parts.concat();
            sorted.sort_unstable();
            let i = j.saturating_sub(gap);
            prop_assert_eq!(order_statistics(&views, (i, j)), (sorted[i], sorted[j]));
        }

        /// The portable pass, the AVX-512 pass and the AVX2 pass (where the CPU has them) give
        /// the definition's count and keys (in order, after the keys already there), the bounds
        /// at the keys' own values, empty brackets (`hi < lo`) and the extremes included.
        #[test]
        fn split_forms_are_the_definition(
            keys in prop::collection::vec(-40i32..40, 0..200),
            lo in -45i32..45,
            width in -3i32..30,
            extreme in any::<bool>(),
        ) {
            let bounds = if extreme { (i32::MIN, i32::MAX) } else { (lo, lo + width) };
            let mut want = vec![7];
            let below = split_by_definition(&keys, bounds, &mut want);
            let mut got = vec![7];
            prop_assert_eq!(split_portable(&keys, bounds, &mut got), below);
            prop_assert_eq!(&got, &want);
            #[cfg(target_arch = "x86_64")]
            {
                type Form = unsafe fn(&[i32], (i32, i32), &mut Vec<i32>) -> usize;
                let forms: [(&str, bool, Form); 2] = [
                    ("AVX-512", crate::vectorize::has_avx512(), split_avx512),
                    ("AVX2", crate::vectorize::has_avx2(), split_avx2),
                ];
                for (name, runs_here, form) in forms {
                    if !runs_here {
                        eprintln!("{name} form not run: this CPU has no {name}");
                        continue;
                    }
                    let mut got = vec![7];
                    // SAFETY: the CPU has the form's features (checked above).
                    prop_assert_eq!(unsafe { form(&keys, bounds, &mut got) }, below);
                    prop_assert_eq!(&got, &want);
                }
            }
        }
    }
}
