//! The memory of the CPU kernels' large outputs (the logits' gradient, the lm_head's weight
//! gradient): a zeroed buffer that, when it is large, is fresh memory from the operating system,
//! advised on Linux as transparent huge pages before its first write.
//!
//! Why: a fresh buffer is mapped page by page as the kernel first writes it, one page fault per
//! 4 KiB — on the machines of the README's tables, writing a fresh 128 MiB buffer took 82 ms, of
//! which the faults are most (the same buffer already mapped: a few ms). With
//! `madvise(MADV_HUGEPAGE)` on the buffer's 2 MiB-aligned middle, each fault maps 2 MiB, where the
//! system's transparent huge pages are `always` or `madvise` (the Linux default of most
//! distributions); elsewhere the advice is refused and nothing changes. The advice covers only
//! the buffer's own memory and never the process's allocator settings.

use half::{bf16, f16};

/// Outputs smaller than this are left to the allocator as they come (they are rarely fresh
/// memory, and hold at most one huge page).
const HUGE_PAGE_MIN_BYTES: usize = 4 << 20;

/// Types whose all-zero bit pattern is their zero.
///
/// # Safety
///
/// Implement only for types for which every byte `0` is a valid value, equal to zero.
pub(crate) unsafe trait ZeroBits: Copy {}

// SAFETY: IEEE 754 +0.0 is the all-zero pattern in each of these formats.
unsafe impl ZeroBits for f32 {}
// SAFETY: as above.
unsafe impl ZeroBits for f64 {}
// SAFETY: as above (binary16).
unsafe impl ZeroBits for f16 {}
// SAFETY: as above (bfloat16, the upper half of an f32).
unsafe impl ZeroBits for bf16 {}

/// `len` zeros, for a kernel to write into: `vec![0; len]`, with the huge-page advice when the
/// buffer is at least 4 MiB. The allocation is the global allocator's `alloc_zeroed` (glibc's
/// `calloc` maps a large one fresh and does not write it), so the advice comes before any page
/// is touched and the kernel's own (parallel) writes are the first.
pub(crate) fn zeroed<T: ZeroBits>(len: usize) -> Vec<T> {
    let bytes = len.saturating_mul(size_of::<T>());
    if bytes < HUGE_PAGE_MIN_BYTES {
        return vec![zero::<T>(); len];
    }
    let layout =
        std::alloc::Layout::array::<T>(len).expect("a buffer of an existing tensor's size");
    // SAFETY: `layout` has a non-zero size (`bytes ≥ 4 MiB`).
    let ptr = unsafe { std::alloc::alloc_zeroed(layout) }.cast::<T>();
    if ptr.is_null() {
        std::alloc::handle_alloc_error(layout);
    }
    advise_huge_pages(ptr.cast(), bytes);
    // SAFETY: `ptr` was allocated by the global allocator with `Layout::array::<T>(len)` (what
    // `Vec` uses for capacity `len`), and its `len` elements are zero bytes, valid `T` zeros
    // (`ZeroBits`).
    unsafe { Vec::from_raw_parts(ptr, len, len) }
}

/// Room for `len` values that a kernel then writes, every one of them: an empty `Vec` of
/// capacity `len`, with the huge-page advice of [`zeroed`] when it is at least 4 MiB. Nothing
/// is written first — no serial pass over the buffer before the kernel's parallel one (on the
/// README's AMD machine, `zeroed`'s fill of a reused 1 MiB block took 16 to 160 µs of the policy
/// loss's call, on one thread while the other waited). The kernel writes the values through
/// [`Vec::spare_capacity_mut`], then sets the length.
pub(crate) fn room<T>(len: usize) -> Vec<T> {
    let mut buffer = Vec::<T>::with_capacity(len);
    let bytes = len.saturating_mul(size_of::<T>());
    if bytes >= HUGE_PAGE_MIN_BYTES {
        advise_huge_pages(buffer.as_mut_ptr().cast(), bytes);
    }
    buffer
}

/// The zero of `T`.
fn zero<T: ZeroBits>() -> T {
    // SAFETY: `ZeroBits`: the all-zero pattern is a valid `T`.
    unsafe { std::mem::zeroed() }
}

/// Advises the 2 MiB-aligned pages inside `[start, start + bytes)` as huge pages. Best effort:
/// a refusal (no transparent huge pages in the kernel, or a non-Linux system) changes nothing.
#[cfg(target_os = "linux")]
fn advise_huge_pages(start: *mut u8, bytes: usize) {
    use std::ffi::{c_int, c_void};
    unsafe extern "C" {
        fn madvise(addr: *mut c_void, len: usize, advice: c_int) -> c_int;
    }
    /// `MADV_HUGEPAGE` of `<asm-generic/mman-common.h>` (every Linux architecture).
    const MADV_HUGEPAGE: c_int = 14;
    /// The huge page of x86-64 and of aarch64 with 4 KiB pages.
    const HUGE_PAGE_BYTES: usize = 2 << 20;
    let begin = (start as usize).next_multiple_of(HUGE_PAGE_BYTES);
    let end = (start as usize + bytes) / HUGE_PAGE_BYTES * HUGE_PAGE_BYTES;
    if end > begin {
        // SAFETY: `[begin, end)` lies inside the live allocation `[start, start + bytes)` and is
        // page-aligned; MADV_HUGEPAGE changes how its pages are mapped, never their contents.
        // The result is ignored: the advice is an optimisation.
        unsafe { madvise(begin as *mut c_void, end - begin, MADV_HUGEPAGE) };
    }
}

#[cfg(not(target_os = "linux"))]
fn advise_huge_pages(_start: *mut u8, _bytes: usize) {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zeroed_buffers_hold_zeros_at_every_size() {
        for len in [
            0,
            1,
            1000,
            (4 << 20) / 4 - 1,
            (4 << 20) / 4,
            (9 << 20) / 4 + 3,
        ] {
            let buffer = zeroed::<f32>(len);
            assert_eq!(buffer.len(), len);
            assert!(buffer.iter().all(|&v| v.to_bits() == 0), "len {len}");
        }
        let halves = zeroed::<bf16>(3 << 20);
        assert!(halves.iter().all(|&v| v.to_bits() == 0));
        let doubles = zeroed::<f64>(1 << 20);
        assert!(doubles.iter().all(|&v| v.to_bits() == 0));
    }

    #[test]
    fn room_is_an_empty_vector_of_that_capacity() {
        for len in [0, 1, 1000, (4 << 20) / 4, (9 << 20) / 4 + 3] {
            let mut buffer = room::<f32>(len);
            assert!(buffer.is_empty());
            assert!(buffer.capacity() >= len, "len {len}");
            buffer.extend((0..len).map(|j| j as f32));
            assert!(buffer.iter().enumerate().all(|(j, &v)| v == j as f32));
        }
    }

    #[test]
    fn zeroed_buffers_are_ordinary_vectors() {
        let mut buffer = zeroed::<f32>(2 << 20);
        buffer[12345] = 1.5;
        buffer.push(2.0);
        buffer.truncate(10);
        assert_eq!(buffer, vec![0.0; 10]);
    }
}
