//! Where the crate's CPU work runs in parallel: on candle's own CPU thread pool
//! (`candle_core::utils::barrier_pool`), the threads every candle CPU op already uses, rather
//! than on a second pool beside them.
//!
//! After each of its ops candle's pool worker spins for a while before it parks, waiting for
//! the next one. Work handed to another pool (rayon's, which the kernels used before) runs
//! beside that spinning thread: on a machine with two cores one of its two threads shared a
//! core with the spinner, and a pre-pass over a `[64, 4096]` batch ran on one thread in practice
//! (measured inside the loss: every chunk of M2PO's bracket pass on one rayon thread, about
//! 300 µs; on candle's pool both threads start at once and it takes about 170 µs). Work handed to
//! candle's pool is picked up by that spinning worker at once.
//!
//! The closures handed to it must not run candle ops: the calling thread holds candle's pool
//! while it takes its own share of the items, and candle's pool is not reentrant from that
//! thread. Every caller hands it loops over host slices only.
//!
//! Called from inside a rayon pool (a caller's own parallel work, or the tests' pools of 1, 2
//! and 3 threads), the work runs on that pool instead.
//!
//! Items are claimed from a shared cursor (candle's `execute_chunked`, which also runs the items
//! inline when called from inside the pool) and each item's result is stored at its index: the
//! results come back in index order, so a reduction over them gives the same bits whatever the
//! number of threads.

use rayon::prelude::*;
use std::sync::{Mutex, OnceLock};

/// Elements per parallel task of the host passes over a whole batch (the masks' passes, the
/// mask check): fixed, so that their per-chunk sums, added in chunk order, are the same bits
/// whatever the number of threads.
pub(crate) const CHUNK: usize = 1 << 14;

/// `f(state, i)` for every `i < n`, in parallel on candle's CPU pool, the results in index
/// order; `state` comes from `init` once per run of consecutive items a thread claims
/// (a kernel's scratch tile).
pub(crate) fn map_init<S, R, I, F>(n: usize, init: I, f: F) -> Vec<R>
where
    R: Send + Sync,
    I: Fn() -> S + Sync,
    F: Fn(&mut S, usize) -> R + Sync,
{
    if rayon::current_thread_index().is_some() {
        // Called from inside a rayon pool (the caller's own parallel work, or a test's pool of
        // a chosen size): run there, on that pool's threads, in index order as well.
        return (0..n)
            .into_par_iter()
            .map_init(&init, |state, i| f(state, i))
            .collect();
    }
    let results: Vec<OnceLock<R>> = (0..n).map(|_| OnceLock::new()).collect();
    candle_core::utils::barrier_pool().execute_chunked(n, |range| {
        let mut state = init();
        for i in range {
            // Each index is claimed once: the cell is empty.
            let _ = results[i].set(f(&mut state, i));
        }
    });
    results
        .into_iter()
        .map(|cell| {
            cell.into_inner()
                .expect("candle's execute_chunked runs every index once")
        })
        .collect()
}

/// `f(i)` for every `i < n`, in parallel on candle's CPU pool, the results in index order.
pub(crate) fn map<R, F>(n: usize, f: F) -> Vec<R>
where
    R: Send + Sync,
    F: Fn(usize) -> R + Sync,
{
    map_init(n, || (), |(), i| f(i))
}

/// `f(i, chunk_i)` for the consecutive chunks of `len` values of `data` (the last one shorter),
/// in parallel on candle's CPU pool, the results in chunk order.
pub(crate) fn chunks<T, R, F>(data: &[T], len: usize, f: F) -> Vec<R>
where
    T: Sync,
    R: Send + Sync,
    F: Fn(usize, &[T]) -> R + Sync,
{
    let len = len.max(1);
    map(data.len().div_ceil(len), |i| {
        f(i, &data[i * len..((i + 1) * len).min(data.len())])
    })
}

/// `f(state, i, chunk_i)` for the consecutive mutable chunks of `len` values of `data` (the
/// last one shorter), in parallel on candle's CPU pool, the results in chunk order; `state` as
/// in [`map_init`].
pub(crate) fn chunks_mut_init<T, S, R, I, F>(data: &mut [T], len: usize, init: I, f: F) -> Vec<R>
where
    T: Send,
    R: Send + Sync,
    I: Fn() -> S + Sync,
    F: Fn(&mut S, usize, &mut [T]) -> R + Sync,
{
    // One lock per chunk, each taken once, never contended: the safe way to hand disjoint
    // mutable chunks to the pool's threads.
    let parts: Vec<Mutex<&mut [T]>> = data.chunks_mut(len.max(1)).map(Mutex::new).collect();
    map_init(parts.len(), init, |state, i| {
        let mut part = parts[i]
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        f(state, i, &mut part)
    })
}

/// [`chunks_mut_init`] without a state.
pub(crate) fn chunks_mut<T, R, F>(data: &mut [T], len: usize, f: F) -> Vec<R>
where
    T: Send,
    R: Send + Sync,
    F: Fn(usize, &mut [T]) -> R + Sync,
{
    chunks_mut_init(data, len, || (), |(), i, part| f(i, part))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn results_in_index_order_whatever_the_lengths() {
        check_index_order();
        for threads in [1, 2, 3] {
            rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap()
                .install(check_index_order);
        }
    }

    fn check_index_order() {
        for n in [0usize, 1, 2, 7, 64, 1000] {
            assert_eq!(map(n, |i| i * 3), (0..n).map(|i| i * 3).collect::<Vec<_>>());
            let data: Vec<usize> = (0..n).collect();
            for len in [0usize, 1, 3, 16, 5000] {
                let sums = chunks(&data, len, |i, c| (i, c.iter().sum::<usize>()));
                let expected: Vec<_> = data
                    .chunks(len.max(1))
                    .enumerate()
                    .map(|(i, c)| (i, c.iter().sum::<usize>()))
                    .collect();
                assert_eq!(sums, expected);
                let mut written = vec![0usize; n];
                let counts = chunks_mut_init(
                    &mut written,
                    len,
                    || 10usize,
                    |state, i, part| {
                        for (k, v) in part.iter_mut().enumerate() {
                            *v = i * len.max(1) + k + *state;
                        }
                        part.len()
                    },
                );
                assert_eq!(counts.iter().sum::<usize>(), n);
                assert_eq!(written, (10..n + 10).collect::<Vec<_>>());
            }
        }
    }
}
