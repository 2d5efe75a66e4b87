//! The run-time choice of instruction set: a loop body ([`Vectorized`]) compiled for AVX-512,
//! or AVX2 and FMA, and run in the widest build the CPU has ([`dispatch`]). It holds no
//! kernel logic, so it sits in the math layer, where the fused CPU kernels
//! (`kernels::simd` re-exports it) and the objectives' batch-wide pre-passes (the masks'
//! host passes, `losses::masks`) both use it. Every build performs the same operations in the
//! same order, so the choice never changes a bit of a result.

/// Whether the AVX-512 builds can run here (see [`has_avx2`]), and the masks' hand-written
/// AVX-512 passes (`losses::masks`), which also count bits with `popcnt` (every CPU with
/// AVX-512 has it).
#[cfg(target_arch = "x86_64")]
pub(crate) fn has_avx512() -> bool {
    static DETECTED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *DETECTED.get_or_init(|| {
        has_avx2()
            && std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512vl")
            && std::arch::is_x86_feature_detected!("popcnt")
    })
}

/// Whether the AVX2 + FMA builds can run here. Every build performs the same
/// operations in the same order (nothing is contracted into FMA without fast-math, and the
/// reductions run in fixed lanes), so their results are identical; the wider builds only use
/// wider and more registers. (Other architectures run the portable build.)
#[cfg(target_arch = "x86_64")]
pub(crate) fn has_avx2() -> bool {
    static DETECTED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *DETECTED.get_or_init(|| {
        std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
    })
}

/// Row `b` of `PACK` moves the lanes of the set bits of `b` to the front, in order: with
/// `_mm256_permutevar8x32_epi32`, AVX2's form of AVX-512's compress (the masks' AVX2 passes and
/// `order_statistics`' AVX2 split gather the values they collect with it).
#[cfg(target_arch = "x86_64")]
pub(crate) const PACK: [[u32; 8]; 256] = {
    let mut table = [[0u32; 8]; 256];
    let mut b = 0;
    while b < 256 {
        let (mut j, mut k) = (0, 0);
        while j < 8 {
            if b >> j & 1 == 1 {
                table[b][k] = j as u32;
                k += 1;
            }
            j += 1;
        }
        b += 1;
    }
    table
};

/// A loop body that [`dispatch`] compiles for the widest instruction set the CPU has.
/// `run` must be `#[inline(always)]`, so that it is compiled into each build.
pub(crate) trait Vectorized {
    type Output;
    fn run(self) -> Self::Output;
}

/// Runs `body` compiled for AVX-512, or AVX2 and FMA, when the CPU has them, and the portable
/// build otherwise (the `unsafe` calls of the CPU kernels and the masks' host passes).
#[inline]
pub(crate) fn dispatch<K: Vectorized>(body: K) -> K::Output {
    #[cfg(target_arch = "x86_64")]
    {
        #[target_feature(enable = "avx512f,avx512vl,avx2,fma")]
        fn avx512<K: Vectorized>(body: K) -> K::Output {
            body.run()
        }
        #[target_feature(enable = "avx2,fma")]
        fn avx2<K: Vectorized>(body: K) -> K::Output {
            body.run()
        }
        if has_avx512() {
            // SAFETY: `has_avx512` checked at run time that the CPU supports every feature
            // `avx512` is compiled for.
            return unsafe { avx512(body) };
        }
        if has_avx2() {
            // SAFETY: `has_avx2` checked at run time that the CPU supports avx2 and fma.
            return unsafe { avx2(body) };
        }
    }
    body.run()
}
