//! Token log-probs and entropy on the CPU: traversal and memory only — the formulas are the
//! scalar forms of `logprobs.rs`.
//!
//! Forward: one streaming pass per row — blocks of the row give a block maximum, the running
//! sums are rescaled once per block (online max), and `Σ e^{z−max}` and `Σ e^{z−max}·z` are
//! accumulated in lanes. Backward: the softmax is recomputed on the fly and the logits' gradient
//! written once. No `[N,V]` temporary exists besides that gradient; f16/bf16 logits are read in
//! place and accumulated in f32. Rows run in parallel; each row's arithmetic is fixed, so the
//! bits do not depend on the number of threads.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, DType, Layout, Tensor};
use rayon::prelude::*;

use crate::kernels::cpu_slice;
use crate::kernels::memory;
use crate::kernels::simd::{dispatch, Load, Store, Vectorized, LANES};
use crate::real::Real;
use crate::softmax::{finish_row, logit_gradient, weighted_logit};

/// Block of the online maximum: fits L1 comfortably.
const BLOCK: usize = 512;

/// The target ids of a contiguous u8/u32/i64 tensor, read from its storage.
pub(crate) fn target_ids(targets: &Tensor) -> candle_core::Result<Vec<usize>> {
    let (guard, layout) = targets.storage_and_layout();
    Ok(match targets.dtype() {
        DType::U8 => cpu_slice::<u8>(&guard, layout)?
            .iter()
            .map(|&v| usize::from(v))
            .collect(),
        DType::U32 => cpu_slice::<u32>(&guard, layout)?
            .iter()
            .map(|&v| v as usize)
            .collect(),
        _ => cpu_slice::<i64>(&guard, layout)?
            .iter()
            .map(|&v| v as usize)
            .collect(),
    })
}

/// Adds `e^{z−max}` and `e^{z−max}·z` of one lane block to the lane sums.
#[inline(always)]
fn accumulate<F: Load<R>, R: Real>(
    block: &[F; LANES],
    inv_t: R,
    max: R,
    sum: &mut [R; LANES],
    weighted: &mut [R; LANES],
) {
    for l in 0..LANES {
        let z = block[l].load() * inv_t;
        let e = (z - max).exp();
        sum[l] = sum[l] + e;
        weighted[l] = weighted[l] + weighted_logit(e, z);
    }
}

/// The running maximum and sums of a row: `max`, `Σ e^{z−max}`, `Σ e^{z−max}·z`.
pub(crate) struct Online<R> {
    max: R,
    sum: R,
    weighted: R,
}

impl<R: Real> Online<R> {
    /// The state before any logit.
    pub(crate) fn new() -> Self {
        Self {
            max: -R::INFINITY,
            sum: R::ZERO,
            weighted: R::ZERO,
        }
    }

    /// Moves the running maximum up to `block_max`, rescaling the sums accumulated against the
    /// old one (`e^{−inf} = 0` at the start).
    #[inline(always)]
    fn rescale(&mut self, block_max: R) {
        if block_max > self.max {
            let scale = (self.max - block_max).exp();
            self.sum = self.sum * scale;
            self.weighted = self.weighted * scale;
            self.max = block_max;
        }
    }

    /// Folds the logits of `span` (raw, divided by the temperature here) into the state: blocks
    /// of `BLOCK` give a block maximum, the sums are accumulated in lanes.
    #[inline(always)]
    pub(crate) fn fold<F: Load<R>>(&mut self, span: &[F], inv_t: R) {
        let neg_inf = -R::INFINITY;
        let (chunks, tail) = span.as_chunks::<LANES>();
        for group in chunks.chunks(BLOCK / LANES) {
            let mut lane_max = [neg_inf; LANES];
            for block in group {
                for l in 0..LANES {
                    lane_max[l] = lane_max[l].max_of(block[l].load() * inv_t);
                }
            }
            self.rescale(lane_max.iter().fold(neg_inf, |m, &v| m.max_of(v)));
            if self.max == neg_inf {
                continue;
            }
            let mut lane_sum = [R::ZERO; LANES];
            let mut lane_weighted = [R::ZERO; LANES];
            for block in group {
                accumulate(block, inv_t, self.max, &mut lane_sum, &mut lane_weighted);
            }
            for l in 0..LANES {
                self.sum = self.sum + lane_sum[l];
                self.weighted = self.weighted + lane_weighted[l];
            }
        }
        // The tail is one more (short) block.
        let tail_max = tail.iter().fold(neg_inf, |m, v| m.max_of(v.load() * inv_t));
        self.rescale(tail_max);
        if self.max > neg_inf {
            for v in tail {
                let z = v.load() * inv_t;
                let e = (z - self.max).exp();
                self.sum = self.sum + e;
                self.weighted = self.weighted + weighted_logit(e, z);
            }
        }
    }

    /// `(ℓ, H, lse)` given the target's scaled logit `z_y`.
    #[inline(always)]
    pub(crate) fn finish(&self, z_target: R) -> (R, R, R) {
        finish_row(self.max, self.sum, self.weighted, z_target)
    }
}

/// `(ℓ, H, lse)` of one row.
#[inline(always)]
fn forward_row<F: Load<R>, R: Real>(row: &[F], target: usize, inv_t: R) -> (R, R, R) {
    let mut online = Online::new();
    online.fold(row, inv_t);
    online.finish(row[target].load() * inv_t)
}

/// [`forward_row`] as a body for [`dispatch`].
struct ForwardRow<'a, F, R> {
    row: &'a [F],
    target: usize,
    inv_t: R,
}

impl<F: Load<R>, R: Real> Vectorized for ForwardRow<'_, F, R> {
    type Output = (R, R, R);
    #[inline(always)]
    fn run(self) -> (R, R, R) {
        forward_row(self.row, self.target, self.inv_t)
    }
}

/// `[N·V]` logits → `[3·N]`: the log-probs, then the entropies, then the log-sum-exps.
pub(super) fn forward<F: Load<R>, R: Real>(
    logits: &[F],
    vocab: usize,
    targets: &[usize],
    inv_t: R,
) -> Vec<R> {
    let rows: Vec<(R, R, R)> = logits
        .par_chunks(vocab)
        .zip(targets.par_iter())
        .map(|(row, &target)| dispatch(ForwardRow { row, target, inv_t }))
        .collect();
    stack_rows(&rows)
}

/// `[3·N]` from each row's `(ℓ, H, lse)`: the log-probs, then the entropies, then the
/// log-sum-exps (the ops' `[3,N]` output).
pub(crate) fn stack_rows<R: Copy>(rows: &[(R, R, R)]) -> Vec<R> {
    let mut out = Vec::with_capacity(3 * rows.len());
    out.extend(rows.iter().map(|r| r.0));
    out.extend(rows.iter().map(|r| r.1));
    out.extend(rows.iter().map(|r| r.2));
    out
}

/// A `[3, N]` tensor's values (`ℓ`, `H`, `lse` or their upstream gradients), read on the CPU.
pub(crate) struct RowStats {
    values: Vec<f64>,
    n: usize,
}

impl RowStats {
    pub(crate) fn new(storage: &CpuStorage, layout: &Layout) -> candle_core::Result<Self> {
        let n = layout.shape().dims2()?.1;
        let (start, end) = layout
            .contiguous_offsets()
            .ok_or_else(|| candle_core::Error::Msg("row statistics must be contiguous".into()))?;
        let values = match storage {
            CpuStorage::F32(v) => v[start..end].iter().map(|&x| f64::from(x)).collect(),
            CpuStorage::F64(v) => v[start..end].to_vec(),
            other => candle_core::bail!("row statistics: unsupported dtype {:?}", other.dtype()),
        };
        Ok(Self { values, n })
    }
    /// A `[6, N]` tensor as two `[3, N]` ones (the forward's output, then its gradient).
    pub(crate) fn split(self) -> (Self, Self) {
        let n = self.n;
        let mut first = self.values;
        let second = first.split_off(3 * n);
        (Self { values: first, n }, Self { values: second, n })
    }

    fn get(&self, k: usize, row: usize) -> f64 {
        self.values[k * self.n + row]
    }
}

/// What the backward of one row needs besides its logits.
#[derive(Clone, Copy)]
pub(crate) struct RowGrad<R> {
    target: usize,
    inv_t: R,
    lse: R,
    entropy: R,
    grad_log_prob: R,
    grad_entropy: R,
}

impl<R: Real> RowGrad<R> {
    /// A row with log-sum-exp `lse` and entropy `entropy`, whose log-prob and entropy get the
    /// upstream gradients `grad_log_prob`, `grad_entropy`.
    pub(crate) fn from_values(
        target: usize,
        inv_t: R,
        (lse, entropy): (R, R),
        (grad_log_prob, grad_entropy): (R, R),
    ) -> Self {
        Self {
            target,
            inv_t,
            lse,
            entropy,
            grad_log_prob,
            grad_entropy,
        }
    }

    /// The row's state from the forward's `[3,N]` output and its upstream gradient.
    pub(crate) fn new(
        target: usize,
        inv_t: R,
        res: &RowStats,
        grad: &RowStats,
        row: usize,
    ) -> Self {
        Self {
            target,
            inv_t,
            lse: R::from_f64(res.get(2, row)),
            entropy: R::from_f64(res.get(1, row)),
            grad_log_prob: R::from_f64(grad.get(0, row)),
            grad_entropy: R::from_f64(grad.get(1, row)),
        }
    }

    /// Whether the row gets no gradient: its upstream gradient is 0, or its `lse` is not finite
    /// (garbage never reaches the gradient).
    #[inline(always)]
    pub(crate) fn silent(&self) -> bool {
        let zero = self.grad_log_prob == R::ZERO && self.grad_entropy == R::ZERO;
        zero || !self.lse.is_finite_value()
    }

    /// Writes `∂(g_ℓ·ℓ + g_H·H)/∂x` for the logits `span`, which start at vocabulary id `first`.
    #[inline(always)]
    pub(crate) fn write<F: Load<R>, G: Store<R>>(&self, span: &[F], first: usize, out: &mut [G]) {
        let (g_lp, g_h) = (self.grad_log_prob, self.grad_entropy);
        let grad = |x: R| logit_gradient(x, self.inv_t, self.lse, self.entropy, g_lp, g_h);
        for (dst, x) in out.iter_mut().zip(span) {
            *dst = G::store(grad(x.load()));
        }
        if let Some(k) = self.target.checked_sub(first).filter(|&k| k < span.len()) {
            out[k] = G::store(grad(span[k].load()) + self.inv_t * g_lp);
        }
    }
}

/// Writes `∂(g_ℓ·ℓ + g_H·H)/∂logits` of one row (zeros for a silent row).
#[inline(always)]
fn backward_row<F: Load<R> + Store<R>, R: Real>(row: &[F], out: &mut [F], r: RowGrad<R>) {
    if r.silent() {
        out.fill(F::store(R::ZERO));
    } else {
        r.write(row, 0, out);
    }
}

/// [`backward_row`] as a body for [`dispatch`].
struct BackwardRow<'a, F, R> {
    row: &'a [F],
    out: &'a mut [F],
    r: RowGrad<R>,
}

impl<F: Load<R> + Store<R>, R: Real> Vectorized for BackwardRow<'_, F, R> {
    type Output = ();
    #[inline(always)]
    fn run(self) {
        backward_row(self.row, self.out, self.r)
    }
}

/// The backward pass over all rows.
pub(super) struct Backward<'a> {
    pub vocab: usize,
    pub targets: &'a [usize],
    /// The forward's `ℓ`, `H`, `lse`.
    pub res: &'a RowStats,
    /// Their upstream gradients.
    pub grad: &'a RowStats,
}

impl Backward<'_> {
    /// The logits' gradient `[N·V]`, in the logits' storage type, computed in `R`.
    pub(super) fn run<F: Load<R> + Store<R>, R: Real>(&self, logits: &[F], inv_t: R) -> Vec<F> {
        let mut out = memory::zeroed::<F>(logits.len());
        out.par_chunks_mut(self.vocab)
            .zip(logits.par_chunks(self.vocab))
            .enumerate()
            .for_each(|(i, (out, row))| {
                let r = RowGrad::new(self.targets[i], inv_t, self.res, self.grad, i);
                dispatch(BackwardRow { row, out, r })
            });
        out
    }
}
